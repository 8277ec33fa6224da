"""Rows in, token ids out: read a split, format it with its task, tokenize it, report its lengths.

    read_rows      a local .json/.jsonl/.csv/.parquet file or a hub dataset → raw rows, each with its place
    format_rows    raw rows → (source, target) examples through the task; bad rows error or are skipped
    tokenize       examples → input_ids / labels under the length limits and the over-long policy
    load_splits    all of the above for every split a recipe names, mixtures included

Hub datasets and Parquet files load through `datasets`. JSON, JSON lines and CSV are read here, line
by line, because `datasets`' Arrow readers cannot say which line of a file is broken (or skip it),
and they reject a column whose type varies from row to row before any row can be reported.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flantune.config import DataConfig, DataSource, parse_rows
from flantune.errors import DataError  # re-exported: flantune.data.DataError
from flantune.tasks import Example, RowError, Task, build_task

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
DEFAULT_SPLITS = {"train": "train", "eval": "validation", "test": "test"}


@dataclass
class RawRow:
    where: str
    """Human-readable place of the row, counted from 1: 'data/train.jsonl line 12' (JSON lines, CSV),
    'data/train.json item 3' (a JSON array), 'data/train.parquet row 5' or 'allenai/sciq[train] row 7'."""
    row: dict[str, Any] | None
    problem: str | None = None
    """Set when the row could not even be parsed (malformed JSON, undecodable bytes)."""


@dataclass
class SplitReport:
    """What happened to one split on its way to token ids."""

    split: str
    origin: str
    rows_read: int = 0
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    left_out_by_task: int = 0
    source_lengths: list[int] = field(default_factory=list)
    target_lengths: list[int] = field(default_factory=list)
    overlong_source: int = 0
    overlong_target: int = 0
    dropped: int = 0
    truncated: int = 0
    kept: int = 0

    def percentiles(self, which: str) -> dict[str, int]:
        lengths = self.source_lengths if which == "source" else self.target_lengths
        if not lengths:
            return {}
        values = np.percentile(np.asarray(lengths), [50, 90, 99])
        return {"p50": int(values[0]), "p90": int(values[1]), "p99": int(values[2]), "max": max(lengths)}


def split_summary(report: SplitReport) -> str:
    """One line on what loading did to a split, for the console of every command that loads data:
    `train: 800 rows, 3 bad rows skipped, 12 truncated, 0 dropped` (plus the rows the task left out
    and the over-long rows, when there are any)."""
    parts = [f"{report.rows_read} rows", f"{report.bad_rows} bad rows skipped"]
    if report.left_out_by_task:
        parts.append(f"{report.left_out_by_task} left out by the task")
    parts += [f"{report.truncated} truncated", f"{report.dropped} dropped"]
    line = f"{report.split}: " + ", ".join(parts)
    if report.bad_examples:
        line += f" (first bad row: {report.bad_examples[0]})"
    return line


# ----------------------------------------------------------------------------------------------
# Reading


def read_rows(source: DataSource, role: str, key: str) -> Iterator[RawRow]:
    """Raw rows of one data source. `role` is train/eval/test; `key` the recipe key, for messages."""
    path = Path(source.path).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        if path.is_dir():
            raise DataError(
                f"{key}: {source.path} is a directory; give a data file ({', '.join(LOCAL_SUFFIXES)})"
            )
        if not path.is_file():
            raise DataError(f"{key}: file not found: {source.path}")
        rows = _read_local(path, key)
    else:
        rows = _read_hub(source, role, key)
    window = parse_rows(source.rows) if source.rows else None
    if window is not None:
        rows = list(rows)[window]
    yield from rows


def _read_local(path: Path, key: str) -> list[RawRow]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, key)
    data = path.read_bytes()
    if suffix == ".csv":
        return _read_csv(path, _decode_whole(path, data))
    if suffix in (".json", ".jsonl") or not suffix:
        if data.lstrip()[:1] == b"[":
            return _read_json_array(path, _decode_whole(path, data))
        return _read_json_lines(path, data)
    raise DataError(
        f"{key}: {path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
    )


def _decode_whole(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line}: bytes that are not UTF-8 (at byte {e.start}); "
            "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_json_lines(path: Path, data: bytes) -> list[RawRow]:
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path} line {number}"
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            rows.append(RawRow(where, None, f"bytes that are not UTF-8 at column {e.start + 1}"))
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(RawRow(where, None, f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            rows.append(RawRow(where, None, f"expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append(RawRow(where, row))
    return rows


def _read_json_array(path: Path, text: str) -> list[RawRow]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        # One broken array spoils the whole file: there is no row to skip.
        raise DataError(f"{path}: line {e.lineno} column {e.colno}: malformed JSON ({e.msg})") from None
    rows = []
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of row objects, or one JSON object per line")
    for number, item in enumerate(items, start=1):
        where = f"{path} item {number}"
        if isinstance(item, dict):
            rows.append(RawRow(where, item))
        else:
            rows.append(RawRow(where, None, f"expected a JSON object, got {type(item).__name__}"))
    return rows


_INT = re.compile(r"^-?\d+$")


def _read_csv(path: Path, text: str) -> list[RawRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError(f"{path}: the CSV file has no header row")
    rows = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if None in row:  # more cells than header names
            rows.append(
                RawRow(
                    where,
                    None,
                    f"{len(reader.fieldnames) + len(row[None])} cells for {len(reader.fieldnames)} columns",
                )
            )
        elif any(value is None for value in row.values()):
            rows.append(
                RawRow(where, None, f"fewer cells than the {len(reader.fieldnames)} columns of the header")
            )
        else:
            rows.append(RawRow(where, dict(row)))
    # CSV has no types. Like pandas, read a column as integers when every cell of it is one, so
    # integer labels (IMDB, PAWS, emotion) arrive as ints, as they do from the hub.
    good = [r.row for r in rows if r.row is not None]
    for name in reader.fieldnames:
        if good and all(_INT.match(r[name].strip()) for r in good):
            for r in good:
                r[name] = int(r[name])
    return rows


def _read_parquet(path: Path, key: str) -> list[RawRow]:
    import datasets

    try:
        table = datasets.Dataset.from_parquet(str(path))
    except Exception as e:  # pyarrow raises several unrelated types for a broken file
        raise DataError(f"{key}: {path}: cannot read as Parquet: {e}") from None
    return [RawRow(f"{path} row {i}", row) for i, row in enumerate(table, start=1)]


def _read_hub(source: DataSource, role: str, key: str) -> list[RawRow]:
    import datasets

    split = source.split or DEFAULT_SPLITS[role]
    name = f"{source.path}" + (f"/{source.name}" if source.name else "") + f"[{split}]"
    try:
        table = datasets.load_dataset(source.path, source.name, split=split)
    except FileNotFoundError as e:
        raise DataError(
            f"{key}: {source.path!r} is neither a local file nor a hub dataset that can be reached "
            f"(offline, or a typo?): {e}"
        ) from None
    except (ValueError, ConnectionError, OSError) as e:
        raise DataError(f"{key}: cannot load hub dataset {name}: {e}") from None
    return [RawRow(f"{name} row {i}", row) for i, row in enumerate(table, start=1)]


# ----------------------------------------------------------------------------------------------
# Formatting


def format_rows(
    task: Task, rows: Iterator[RawRow], report: SplitReport, bad_rows: str, wheres: list[str] | None = None
) -> list[Example]:
    """Map raw rows through the task; a bad row raises DataError, or is skipped and counted.
    `wheres`, when given, receives each example's row place (RawRow.where), in order."""
    examples = []
    for raw in rows:
        report.rows_read += 1
        problem = raw.problem
        if problem is None:
            try:
                example = task.format(raw.row)
            except RowError as e:
                problem = f"column {e.column!r}: {e.problem}"
            else:
                if example is None:
                    report.left_out_by_task += 1
                else:
                    examples.append(example)
                    if wheres is not None:
                        wheres.append(raw.where)
                continue
        if bad_rows == "error":
            raise DataError(
                f"{raw.where}: {problem} (task {task.name}; fix the row, or set data.bad_rows=skip to skip such rows)"
            )
        report.bad_rows += 1
        if len(report.bad_examples) < 5:
            report.bad_examples.append(f"{raw.where}: {problem}")
    return examples


# ----------------------------------------------------------------------------------------------
# Tokenizing


def _fit(ids: list[int], limit: int, eos_id: int | None) -> list[int]:
    """Cut to `limit` tokens, keeping the closing EOS so the model still learns to stop."""
    if eos_id is not None and ids and ids[-1] == eos_id:
        return [*ids[: limit - 1], eos_id]
    return ids[:limit]


def tokenize(
    examples: list[Example],
    tokenizer,
    *,
    max_source_tokens: int,
    max_target_tokens: int,
    overlong: str,
    report: SplitReport,
    task_names: list[str] | None = None,
    wheres: list[str] | None = None,
):
    """A `datasets.Dataset` with input_ids, attention_mask and labels, plus the text columns.

    `wheres` gives each example's row place for messages (default: its number in `examples`, from 1).

    labels are not padded here: the collator pads them with -100 (ignored by the loss), never with
    the pad id, so padding never counts as a target token.
    """
    import datasets

    sources = [e.source for e in examples]
    targets = [e.target for e in examples]
    source_ids = tokenizer(sources, add_special_tokens=True)["input_ids"] if sources else []
    target_ids = tokenizer(text_target=targets, add_special_tokens=True)["input_ids"] if targets else []
    eos = tokenizer.eos_token_id
    columns: dict[str, list] = {
        "input_ids": [], "attention_mask": [], "labels": [],
        "source": [], "target": [], "references": [], "choices": [], "task": [],
    }  # fmt: skip
    for i, (example, src, tgt) in enumerate(zip(examples, source_ids, target_ids, strict=True)):
        report.source_lengths.append(len(src))
        report.target_lengths.append(len(tgt))
        long_src, long_tgt = len(src) > max_source_tokens, len(tgt) > max_target_tokens
        report.overlong_source += long_src
        report.overlong_target += long_tgt
        if long_src or long_tgt:
            if overlong == "error":
                what = (
                    f"source has {len(src)} tokens (data.max_source_tokens={max_source_tokens})"
                    if long_src
                    else f"target has {len(tgt)} tokens (data.max_target_tokens={max_target_tokens})"
                )
                where = wheres[i] if wheres else f"{report.origin}: example {i + 1}"
                raise DataError(
                    f"{where} (split {report.split}): {what}; raise the limit, or set "
                    "data.overlong=truncate or data.overlong=drop"
                )
            if overlong == "drop":
                report.dropped += 1
                continue
            report.truncated += 1
            src, tgt = _fit(src, max_source_tokens, eos), _fit(tgt, max_target_tokens, eos)
        columns["input_ids"].append(src)
        columns["attention_mask"].append([1] * len(src))
        columns["labels"].append(tgt)
        columns["source"].append(example.source)
        columns["target"].append(example.target)
        columns["references"].append(list(example.references or (example.target,)))
        columns["choices"].append(list(example.choices))
        columns["task"].append(task_names[i] if task_names else "")
    report.kept = len(columns["input_ids"])
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "attention_mask": datasets.Sequence(datasets.Value("int8")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "source": datasets.Value("string"),
            "target": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
            "choices": datasets.Sequence(datasets.Value("string")),
            "task": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(columns, features=features)


MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]


# ----------------------------------------------------------------------------------------------
# Whole recipes


@dataclass
class Split:
    name: str
    dataset: Any
    """datasets.Dataset with token ids and text columns."""
    report: SplitReport
    tasks: dict[str, Task]
    """The task(s) whose rows are in this split, by name."""
    tokenizer: Any = None
    """The tokenizer that made its input_ids."""
    max_source_tokens: int | None = None
    """Where its input_ids were cut (data.max_source_tokens under the overlong policy)."""

    def source_ids(self, tokenizer, max_source_tokens: int | None) -> list[list[int]] | None:
        """Its sources' token ids where they are what `tokenizer` cut at `max_source_tokens` makes
        (the same tokenizer object, the same cut: data._fit cuts as the tokenizer's truncation),
        else None: a model compared under another tokenizer tokenizes the sources itself."""
        if tokenizer is None or tokenizer is not self.tokenizer or max_source_tokens != self.max_source_tokens:
            return None
        return list(self.dataset["input_ids"])


def _task(name: str, options: dict[str, Any]) -> Task:
    from flantune.tasks import TaskError

    try:
        return build_task(name, options)
    except TaskError as e:
        raise DataError(str(e)) from None


def _origin(source: DataSource) -> str:
    text = (
        source.path
        + (f"/{source.name}" if source.name else "")
        + (f":{source.split}" if source.split else "")
    )
    return text + (f"[{source.rows}]" if source.rows else "")


def load_split(cfg: DataConfig, role: str, tokenizer, seed: int = 0) -> Split | None:
    """One split (train/eval/test) of a recipe, tokenized, or None when the recipe has none."""
    parts: list[tuple[Task, DataSource, str, float]] = []
    if cfg.mixture:
        for i, item in enumerate(cfg.mixture):
            source = item.train if role == "train" else item.eval if role == "eval" else None
            if source is not None:
                parts.append(
                    (_task(item.task, item.task_options), source, f"data.mixture[{i}].{role}", item.weight)
                )
    else:
        source = getattr(cfg, role)
        if source is not None:
            parts.append((_task(cfg.task, cfg.task_options), source, f"data.{role}", 1.0))
    if not parts:
        return None
    report = SplitReport(split=role, origin=" + ".join(_origin(p[1]) for p in parts))
    per_task: list[list[Example]] = []
    per_where: list[list[str]] = []
    for task, source, key, _ in parts:
        per_where.append([])
        per_task.append(format_rows(task, read_rows(source, role, key), report, cfg.bad_rows, per_where[-1]))
    check_bad_share(report, cfg)
    examples, names, wheres = _mix(parts, per_task, per_where, role, seed)
    if not examples:
        raise DataError(
            f"{report.origin}: split {role} has no usable rows ({report.rows_read} read, {report.bad_rows} bad)"
        )
    dataset = tokenize(
        examples,
        tokenizer,
        max_source_tokens=cfg.max_source_tokens,
        max_target_tokens=cfg.max_target_tokens,
        overlong=cfg.overlong,
        report=report,
        task_names=names,
        wheres=wheres,
    )
    return Split(role, dataset, report, {task.name: task for task, *_ in parts}, tokenizer, cfg.max_source_tokens)


def check_bad_share(report: SplitReport, cfg: DataConfig) -> None:
    """With data.bad_rows=skip, refuse a split with more than data.max_bad_fraction bad rows."""
    if cfg.bad_rows != "skip" or not report.rows_read:
        return
    share = report.bad_rows / report.rows_read
    if share > cfg.max_bad_fraction:
        first = f"; the first: {report.bad_examples[0]}" if report.bad_examples else ""
        raise DataError(
            f"{report.origin}: split {report.split}: {report.bad_rows} of {report.rows_read} rows are bad "
            f"({share:.0%}, more than data.max_bad_fraction={cfg.max_bad_fraction:g}){first}; fix the data, "
            "or raise data.max_bad_fraction"
        )


def _mix(
    parts, per_task: list[list[Example]], per_where: list[list[str]], role: str, seed: int
) -> tuple[list[Example], list[str], list[str]]:
    """Concatenate (eval/test) or sample by weight (train) the examples of several tasks.

    FLAN-style mixing: the training set keeps its total size (the sum of the parts) and draws from
    each task in proportion to its weight, repeating a small task's rows when its share exceeds
    them. A single task passes through untouched.
    """
    if len(parts) == 1 or role != "train":
        examples = [e for group in per_task for e in group]
        names = [task.name for (task, *_), group in zip(parts, per_task, strict=True) for _ in group]
        return examples, names, [w for group in per_where for w in group]
    rng = np.random.default_rng(seed)
    weights = np.array([w for *_, w in parts], dtype=float)
    total = sum(len(g) for g in per_task)
    counts = np.floor(weights / weights.sum() * total).astype(int)
    examples, names, wheres = [], [], []
    for (task, *_), group, places, count in zip(parts, per_task, per_where, counts, strict=True):
        if not group:
            continue
        picks = np.concatenate([rng.permutation(len(group)) for _ in range(-(-count // len(group)))])[:count]
        examples.extend(group[i] for i in picks)
        wheres.extend(places[i] for i in picks)
        names.extend([task.name] * int(count))
    order = rng.permutation(len(examples))
    return [examples[i] for i in order], [names[i] for i in order], [wheres[i] for i in order]


def load_splits(
    cfg: DataConfig, tokenizer, roles=("train", "eval", "test"), seed: int = 0
) -> dict[str, Split]:
    splits = {}
    for role in roles:
        split = load_split(cfg, role, tokenizer, seed)
        if split is not None:
            splits[role] = split
    return splits


def make_collator(tokenizer, model=None, pad_to_multiple_of: int | None = None):
    """Pads input_ids with the pad id and labels with -100; builds decoder_input_ids when given the model.

    transformers' own DataCollatorForSeq2Seq, so the tokenized datasets also feed Seq2SeqTrainer.
    """
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(
        tokenizer,
        model=model,
        label_pad_token_id=-100,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )
