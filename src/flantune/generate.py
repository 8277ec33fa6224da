"""flantune generate: outputs for input texts or a JSON-lines file, from a model or a run's final/.

The model comes from `flantune.final.load_final` and the outputs from `flantune.decoding`; this
module reads the inputs and writes the outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from flantune.config import GenerationConfig
from flantune.errors import GenerateError  # re-exported: flantune.generate.GenerateError


def read_inputs(path: str, field: str = "source") -> list[str]:
    """Sources from a JSON-lines file: one object per line with a `field` string."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise GenerateError(f"--file: {path} is a directory; give a JSON lines file")
    if not file.is_file():
        raise GenerateError(f"--file: {path} not found")
    sources = []
    for number, raw in enumerate(file.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise GenerateError(
                f"--file: {path} line {number}: bytes that are not UTF-8 (at column {e.start + 1}); "
                "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(
                f"--file: {path} line {number}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise GenerateError(
                f"--file: {path} line {number}: expected an object with a string {field!r} (set --field)"
            )
        sources.append(row[field])
    if not sources:
        raise GenerateError(f"--file: {path}: the file holds no input rows")
    return sources


def check_out(out: str, inputs: list[str] = ()) -> None:
    """Refuse an --out that cannot take the outputs, before anything is generated: a directory, one
    of the input files (an output never overwrites an input), or a file whose folder is missing
    or not writable."""
    import os

    target = Path(out).expanduser()
    if target.is_dir():
        raise GenerateError(
            f"--out: {out} is a directory; give a file path, e.g. {Path(out) / 'outputs.jsonl'}"
        )
    resolved = target.resolve()
    for given in inputs:
        if Path(given).expanduser().resolve() == resolved:
            raise GenerateError(
                f"--out: {out} is the input file --file {given}; an output never overwrites its input"
            )
    parent = resolved.parent
    if parent.exists() and not parent.is_dir():
        raise GenerateError(f"--out: {parent} is a file, not a folder; choose another path")
    if not parent.is_dir():
        raise GenerateError(f"--out: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise GenerateError(f"--out: {out} cannot be written (permission denied); choose another path")


def generate(
    model: str,
    adapter: str | None,
    sources: list[str],
    cfg: GenerationConfig,
    *,
    batch_size: int | str = "auto",
    labels: list[str] | None = None,
    out: str | None = None,
    other_base: bool = False,
) -> list[str]:
    """Generate one output per source and write {source, output} JSON lines to `out` (or stdout).
    other_base: the adapter may go on another MODEL than the base recorded beside it."""
    from flantune.decoding import generate_texts
    from flantune.final import load_final

    # MODEL may itself be a run's final/: an adapter then goes on the base recorded beside it.
    if adapter:
        loaded = load_final(
            {"default": adapter}, base=model, what="--adapter", base_what="MODEL", other_base=other_base
        )
    else:
        loaded = load_final(model, what="MODEL")
    outputs = generate_texts(
        loaded.model, loaded.tokenizer, sources, cfg, batch_size=batch_size, labels=labels
    )
    lines = "".join(
        json.dumps({"source": s, "output": o}, ensure_ascii=False) + "\n"
        for s, o in zip(sources, outputs, strict=True)
    )
    if out:
        Path(out).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    return outputs
