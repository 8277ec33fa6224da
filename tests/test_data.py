"""Data: reading files, bad rows named by file/row/column, length limits, the real SciQ rows."""

import json
import subprocess
import sys

import pytest
import torch

from flantune.config import DataConfig, DataSource, load_recipe
from flantune.data import (
    DataError,
    SplitReport,
    load_split,
    load_splits,
    make_collator,
    read_rows,
    split_summary,
    tokenize,
)
from flantune.tasks import Example

from .conftest import ROOT, SCIQ, need

SQUAD_ROW = {
    "id": "1",
    "title": "Tides",
    "context": "Tides are caused mainly by the gravity of the Moon.",
    "question": "What mainly causes tides?",
    "answers": {"text": ["the gravity of the Moon"], "answer_start": [27]},
}


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def squad_cfg(path, **kw) -> DataConfig:
    return DataConfig(task="squad_qa", train=DataSource(path=str(path)), **kw)


def test_sciq_real_rows_end_to_end(in_repo, t5_tokenizer):
    need(SCIQ)
    recipe = load_recipe("recipes/offline/sciq-lora.yaml")
    splits = load_splits(recipe.data, t5_tokenizer)
    assert {k: len(v.dataset) for k, v in splits.items()} == {"train": 800, "eval": 100, "test": 100}
    report = splits["train"].report
    assert report.rows_read == 800 and report.bad_rows == 0
    # Real, uneven lengths (see shared/README): median ~100 tokens, some rows past 254.
    assert 60 <= report.percentiles("source")["p50"] <= 160
    assert report.percentiles("source")["max"] > 254
    row = splits["train"].dataset[0]
    raw = json.loads(SCIQ.read_text())[0]
    assert row["source"].startswith(f"question: {raw['question']} options: (A) ")
    assert row["target"] == raw["correct_answer"]
    assert sorted(row["choices"]) == sorted(
        [raw["correct_answer"], raw["distractor1"], raw["distractor2"], raw["distractor3"]]
    )
    assert (
        row["input_ids"][-1] == t5_tokenizer.eos_token_id and row["labels"][-1] == t5_tokenizer.eos_token_id
    )
    assert t5_tokenizer.decode(row["labels"], skip_special_tokens=True) == raw["correct_answer"]


def test_collator_pads_labels_with_minus_100(t5_tokenizer):
    examples = [Example("question: a b c d e f", "x"), Example("question: g", "a much longer target text")]
    data = tokenize(examples, t5_tokenizer, max_source_tokens=64, max_target_tokens=64, overlong="error",
                    report=SplitReport("train", "test"))  # fmt: skip
    batch = make_collator(t5_tokenizer)(
        [{k: data[i][k] for k in ("input_ids", "attention_mask", "labels")} for i in range(2)]
    )
    assert batch["labels"].shape == (2, len(data[1]["labels"]))
    short = len(data[0]["labels"])
    assert torch.all(batch["labels"][0, short:] == -100)
    assert t5_tokenizer.pad_token_id not in batch["labels"][0, :short].tolist()
    assert batch["attention_mask"][1].sum() == len(data[1]["input_ids"])


@pytest.mark.parametrize("policy", ["drop", "truncate", "error"])
def test_overlong_policy_is_applied_and_reported(policy, t5_tokenizer):
    long_source = "question: " + "word " * 50
    examples = [
        Example("question: short", "yes"),
        Example(long_source, "no"),
        Example("question: x", "long " * 40),
    ]
    report = SplitReport("train", "memory")
    kwargs = dict(max_source_tokens=16, max_target_tokens=8, overlong=policy, report=report)
    if policy == "error":
        with pytest.raises(
            DataError,
            match=r"memory: example 2 \(split train\): source has \d+ tokens \(data.max_source_tokens=16\)",
        ):
            tokenize(examples, t5_tokenizer, **kwargs)
        return
    data = tokenize(examples, t5_tokenizer, **kwargs)
    assert (report.overlong_source, report.overlong_target) == (1, 1)
    if policy == "drop":
        assert len(data) == 1 and report.dropped == 2
    else:
        assert len(data) == 3 and report.truncated == 2
        assert len(data[1]["input_ids"]) == 16 and data[1]["input_ids"][-1] == t5_tokenizer.eos_token_id
        assert len(data[2]["labels"]) == 8 and data[2]["labels"][-1] == t5_tokenizer.eos_token_id


def test_bart_tokenization_keeps_bos_and_eos_when_truncating(bart_tokenizer):
    report = SplitReport("train", "memory")
    data = tokenize([Example("word " * 40, "a b")], bart_tokenizer, max_source_tokens=10, max_target_tokens=8,
                    overlong="truncate", report=report)  # fmt: skip
    ids = data[0]["input_ids"]
    assert len(ids) == 10 and ids[0] == bart_tokenizer.bos_token_id and ids[-1] == bart_tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["t5_tokenizer", "bart_tokenizer"])
def test_split_ids_are_what_generation_would_tokenize(name, request):
    """Scoring decodes from a split's input_ids (flantune.scoring.score_split) instead of tokenizing
    its sources again: those ids, cut by the overlong policy, are the tokenizer's own truncation."""
    tokenizer = request.getfixturevalue(name)
    examples = [Example("question: short", "a"), Example("question: " + "word " * 50, "b"),
                Example("Ünïcödé, tabs\tand  spaces " * 3, "c")]  # fmt: skip
    data = tokenize(examples, tokenizer, max_source_tokens=16, max_target_tokens=8, overlong="truncate",
                    report=SplitReport("test", "memory"))  # fmt: skip
    sources = [e.source for e in examples]
    assert list(data["input_ids"]) == tokenizer(sources, truncation=True, max_length=16)["input_ids"]
    assert sum(len(ids) == 16 for ids in data["input_ids"]) == 2


def test_a_split_gives_its_ids_only_to_the_tokenizer_that_made_them(t5_tokenizer, tmp_path):
    """Split.source_ids: the split's input_ids for the tokenizer object that made them at the cut they
    were made with (scoring decodes from them); None for another tokenizer (a model compared under its
    own) or another cut, which tokenize the sources themselves."""
    import copy

    from flantune.scoring import first_rows

    rows = [{**SQUAD_ROW, "id": str(i), "question": "What? " * (1 + 4 * i)} for i in range(4)]
    cfg = squad_cfg(write_jsonl(tmp_path / "rows.jsonl", rows), max_source_tokens=16, overlong="truncate")
    split = load_split(cfg, "train", t5_tokenizer)
    expected = t5_tokenizer(list(split.dataset["source"]), truncation=True, max_length=16)["input_ids"]
    assert split.source_ids(t5_tokenizer, 16) == expected
    assert any(len(ids) == 16 for ids in expected)  # a cut row among them
    assert split.source_ids(copy.deepcopy(t5_tokenizer), 16) is None
    assert split.source_ids(t5_tokenizer, 32) is None and split.source_ids(t5_tokenizer, None) is None
    assert first_rows(split, 2).source_ids(t5_tokenizer, 16) == expected[:2]


# ---- bad rows: each kind names file, row and column, or is skipped and counted ----------------

BAD_ROWS = {
    "missing column": ({k: v for k, v in SQUAD_ROW.items() if k != "question"}, "'question'"),
    "null": ({**SQUAD_ROW, "context": None}, "'context'"),
    "wrong type": ({**SQUAD_ROW, "question": 42}, "'question'"),
    "empty target": ({**SQUAD_ROW, "answers": {"text": [""], "answer_start": [0]}}, "'answers'"),
    "malformed JSON": ('{"id": "2", "question": "unclosed', "malformed JSON"),
}


@pytest.mark.parametrize("kind", BAD_ROWS)
def test_bad_row_is_named(kind, tmp_path, t5_tokenizer):
    bad, expected = BAD_ROWS[kind]
    path = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW, SQUAD_ROW, bad, SQUAD_ROW])
    with pytest.raises(DataError) as info:
        load_split(squad_cfg(path), "train", t5_tokenizer)
    message = str(info.value)
    assert f"{path} line 3" in message and expected in message
    assert "data.bad_rows=skip" in message
    split = load_split(squad_cfg(path, bad_rows="skip", max_bad_fraction=0.25), "train", t5_tokenizer)
    assert len(split.dataset) == 3 and split.report.bad_rows == 1 and split.report.rows_read == 4
    assert split.report.bad_examples[0].startswith(f"{path} line 3")
    assert split_summary(split.report).startswith("train: 4 rows, 1 bad rows skipped, 0 truncated, 0 dropped")


def test_undecodable_bytes(tmp_path, t5_tokenizer):
    path = tmp_path / "train.jsonl"
    good = json.dumps(SQUAD_ROW).encode()
    path.write_bytes(
        good + b"\n" + json.dumps({**SQUAD_ROW, "question": "caf"}).encode()[:-3] + b'\xe9"}\n' + good + b"\n"
    )
    with pytest.raises(DataError, match=rf"{path} line 2: bytes that are not UTF-8"):
        load_split(squad_cfg(path), "train", t5_tokenizer)
    split = load_split(squad_cfg(path, bad_rows="skip", max_bad_fraction=0.5), "train", t5_tokenizer)
    assert len(split.dataset) == 2 and split.report.bad_rows == 1
    array = tmp_path / "train.json"
    array.write_bytes(b'[\n{"a": "\xff"}\n]')
    with pytest.raises(DataError, match=rf"{array}: line 2: bytes that are not UTF-8"):
        load_split(squad_cfg(array), "train", t5_tokenizer)


def test_json_array_and_row_not_an_object(tmp_path, t5_tokenizer):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([SQUAD_ROW, ["not", "an", "object"], SQUAD_ROW]))
    with pytest.raises(DataError, match=rf"{path} item 2: expected a JSON object, got list"):
        load_split(squad_cfg(path), "train", t5_tokenizer)
    path.write_text('[{"a": 1},\n {"a": ]')
    with pytest.raises(DataError, match=rf"{path}: line 2 column \d+: malformed JSON"):
        load_split(squad_cfg(path), "train", t5_tokenizer)


def test_csv_types_and_ragged_rows(tmp_path, t5_tokenizer):
    path = tmp_path / "imdb.csv"
    path.write_text('text,label\n"A fine, moving film.",1\nDull.,0\n')
    split = load_split(
        DataConfig(task="imdb_sentiment", train=DataSource(path=str(path))), "train", t5_tokenizer
    )
    assert split.dataset["target"] == ["sentiment: True", "sentiment: False"]
    path.write_text("text,label\nGood.,1\nToo,many,cells\n")
    with pytest.raises(DataError, match=rf"{path} line 3: 3 cells for 2 columns"):
        load_split(DataConfig(task="imdb_sentiment", train=DataSource(path=str(path))), "train", t5_tokenizer)


def test_parquet(tmp_path, t5_tokenizer):
    import datasets

    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list([SQUAD_ROW, SQUAD_ROW]).to_parquet(str(path))
    split = load_split(squad_cfg(path), "train", t5_tokenizer)
    assert split.dataset["target"] == ["the gravity of the Moon"] * 2


def test_rows_slice_and_missing_file(tmp_path, t5_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{**SQUAD_ROW, "question": f"Q{i}?"} for i in range(10)])
    rows = list(read_rows(DataSource(path=str(path), rows="2:5"), "train", "data.train"))
    assert [r.row["question"] for r in rows] == ["Q2?", "Q3?", "Q4?"]
    with pytest.raises(DataError, match=r"data.train: file not found: .*nope.jsonl"):
        load_split(squad_cfg(tmp_path / "nope.jsonl"), "train", t5_tokenizer)


def test_hub_dataset_unreachable_is_a_clear_error(t5_tokenizer):
    cfg = DataConfig(task="squad_qa", train=DataSource(path="nobody-has/this-dataset", split="train"))
    with pytest.raises(DataError, match="data.train: .*nobody-has/this-dataset"):
        load_split(cfg, "train", t5_tokenizer)


def test_task_filters_are_counted_not_errors(tmp_path, t5_tokenizer):
    rows = [{"id": i, "sentence1": f"s{i} a", "sentence2": f"t{i} b", "label": i % 2} for i in range(6)]
    path = write_jsonl(tmp_path / "paws.jsonl", rows)
    split = load_split(
        DataConfig(task="paws_paraphrase", train=DataSource(path=str(path))), "train", t5_tokenizer
    )
    assert len(split.dataset) == 3 and split.report.left_out_by_task == 3


def test_mixture_samples_by_weight(tmp_path, t5_tokenizer):
    from flantune.config import MixtureItem

    squad = write_jsonl(tmp_path / "squad.jsonl", [SQUAD_ROW] * 30)
    sam = write_jsonl(
        tmp_path / "samsum.jsonl",
        [{"id": str(i), "dialogue": f"A: hi {i}", "summary": "A greets."} for i in range(30)],
    )
    cfg = DataConfig(mixture=[
        MixtureItem(task="squad_qa", train=DataSource(path=str(squad)), eval=DataSource(path=str(squad)), weight=3.0),
        MixtureItem(task="samsum", train=DataSource(path=str(sam)), weight=1.0),
    ])  # fmt: skip
    train = load_split(cfg, "train", t5_tokenizer, seed=0)
    assert len(train.dataset) == 60
    assert train.dataset["task"].count("squad_qa") == 45 and train.dataset["task"].count("samsum") == 15
    assert set(train.tasks) == {"squad_qa", "samsum"}
    evaluation = load_split(cfg, "eval", t5_tokenizer)
    assert len(evaluation.dataset) == 30 and set(evaluation.dataset["task"]) == {"squad_qa"}


def test_every_offline_recipe_loads_its_data(in_repo, t5_tokenizer, bart_tokenizer):
    need(SCIQ)
    for path in sorted((ROOT / "recipes" / "offline").glob("*.yaml")):
        recipe = load_recipe(path)
        tokenizer = bart_tokenizer if "bart" in recipe.model.path else t5_tokenizer
        splits = load_splits(recipe.data, tokenizer)
        assert "train" in splits and len(splits["train"].dataset) > 0, path


def test_preview_cli_on_real_sciq(in_repo):
    """Printed to a pipe (as into a log file), the length table keeps every column whole."""
    need(SCIQ)
    env = {k: v for k, v in __import__("os").environ.items() if k != "COLUMNS"}
    result = subprocess.run(
        [sys.executable, "-m", "flantune.cli", "data", "preview", "recipes/offline/sciq-lora.yaml", "--n", "2"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = out[out.index("p50/p90/p99/max") - 200 :]
    assert "…" not in table, table  # nothing cut at 80 columns
    assert out.count("source (") == 6 and "question:" in out  # 2 examples x 3 splits
    assert "p50/p90/p99/max" in out and "truncate" in out
    for split in ("train", "eval", "test"):
        assert f"\n│ {split} " in out or f"┃ {split}" in out or f"│ {split}" in out


def test_preview_cli_bad_row_message(tmp_path, in_repo, t5_small_path):
    path = write_jsonl(tmp_path / "t.jsonl", [SQUAD_ROW, {**SQUAD_ROW, "context": None}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{path: {t5_small_path}, init: random}}\ndata: {{task: squad_qa, train: {path}}}\n"
    )
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "data", "preview", str(recipe)],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "line 2: column 'context'" in result.stderr.replace("\n", "")


def test_too_many_bad_rows_stop_a_skipping_load(tmp_path, t5_tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW, {"x": 1}, {"x": 2}, SQUAD_ROW])
    with pytest.raises(DataError) as info:
        load_split(squad_cfg(path, bad_rows="skip"), "train", t5_tokenizer)
    message = str(info.value)
    assert "split train: 2 of 4 rows are bad" in message and "data.max_bad_fraction=0.1" in message
    assert f"{path} line 2" in message
    split = load_split(squad_cfg(path, bad_rows="skip", max_bad_fraction=0.5), "train", t5_tokenizer)
    assert split.report.bad_rows == 2 and len(split.dataset) == 2


def test_max_bad_fraction_is_checked():
    problems = DataConfig(task="sciq", max_bad_fraction=1.5).check("data")
    assert problems == ["data.max_bad_fraction: must be in [0, 1], got 1.5"]


def test_a_directory_is_not_a_data_file(tmp_path, t5_tokenizer):
    (tmp_path / "train.jsonl").mkdir()
    with pytest.raises(DataError, match=r"data.train: .*train.jsonl is a directory"):
        load_split(squad_cfg(tmp_path / "train.jsonl"), "train", t5_tokenizer)


def test_overlong_error_names_the_file_line(tmp_path, t5_tokenizer):
    long_row = {**SQUAD_ROW, "question": "word " * 80}
    path = write_jsonl(tmp_path / "train.jsonl", [SQUAD_ROW, {"x": 1}, long_row])
    cfg = squad_cfg(path, bad_rows="skip", max_bad_fraction=0.5, overlong="error", max_source_tokens=64)
    with pytest.raises(DataError, match=rf"{path} line 3 \(split train\): source has \d+ tokens"):
        load_split(cfg, "train", t5_tokenizer)
