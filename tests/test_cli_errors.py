"""User mistakes end in one clear message: exit status 2, no traceback, a message naming the file,
row, key or flag given, and every file the user gave left byte-identical.

Each row of CASES is one mistake run through the real command line in a subprocess. Starting
Python with torch and transformers takes seconds, so the rows run in a few processes (two at a
time), each calling the CLI once per row in order; rows marked `alone` run as their own
`python -m flantune.cli` process, as a user would type them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pytest

from .conftest import ASSETS, ROOT, need

T5 = ASSETS / "flan-t5-small"


class Case(NamedTuple):
    args: list[str]
    """The command line after `flantune`; `{w}` is the folder of the files the test wrote."""
    expected: list[str]
    """Fragments the message holds (the file, row, key or flag, and what to do)."""
    alone: bool = False
    """Run as its own `python -m flantune.cli` process."""


R = "{w}/recipe.yaml"
GEN = ["generate", str(T5)]

CASES: dict[str, Case] = {
    # ---- recipes ----------------------------------------------------------------------------
    "recipe missing": Case(["check", "{w}/nope.yaml"], ["file not found: {w}/nope.yaml"]),
    "recipe is a directory": Case(["check", "{w}"], ["{w} is a directory"]),
    "yaml error with a markup-like path": Case(
        ["check", "{w}/broken.yaml"], ["recipe {w}/broken.yaml: not valid YAML", "[/tmp/x"], alone=True
    ),
    "top level is a list": Case(["check", "{w}/list.yaml"], ["top level must be a mapping"]),
    "recipe not utf-8": Case(["check", "{w}/latin1.yaml"], ["{w}/latin1.yaml", "not valid YAML"]),
    "key given twice": Case(
        ["check", "{w}/dup.yaml"], ["recipe {w}/dup.yaml", "lr: given twice", "lines 3 and 4 of {w}/dup.yaml"]
    ),
    "lr nan": Case(["check", R, "train.lr=.nan"], ["train.lr: expected a finite number", "nan"]),
    "lr inf": Case(["check", R, "train.lr=.inf"], ["train.lr: expected a finite number", "inf"]),
    "beta nan word": Case(["check", R, "rl.beta=nan"], ["rl.beta: expected a number"]),
    "beta nan": Case(["check", R, "rl.beta=.nan"], ["rl.beta: expected a finite number"]),
    "unknown task": Case(
        ["check", R, "data.task=sciqq"], ["data.task: unknown task 'sciqq' (did you mean sciq"]
    ),
    "unknown mixture task": Case(
        ["check", "{w}/mixture.yaml"], ["data.mixture[1].task: unknown task 'samsun' (did you mean samsum"]
    ),
    "unknown task option": Case(["check", R, "data.task_options.sorce={x}"], ["data.task_options.sorce"]),
    "misspelt key": Case(["check", R, "train.learning_rate=1"], ["train.learning_rate: unknown key", "lr"]),
    "override without =": Case(["check", R, "train.lr"], ["override 'train.lr'", "section.key=value"]),
    "max_bad_fraction out of range": Case(
        ["check", R, "data.max_bad_fraction=2"], ["data.max_bad_fraction: must be in [0, 1]"]
    ),
    "extends a missing file": Case(["check", "{w}/extends.yaml"], ["extends: file not found", "base.yaml"]),
    # ---- model.path -------------------------------------------------------------------------
    "train model path too many slashes": Case(
        ["train", R, "model.path=nobody/none/x"],
        ["model.path: folder nobody/none/x does not exist"],
        alone=True,
    ),
    "train hub id transformers rejects": Case(
        ["train", R, "model.path=bad id!"], ["model.path", "'bad id!'"]
    ),
    "train model path with markup": Case(["train", R, "model.path='[/INST]'"], ["model.path", "'[/INST]'"]),
    "train model path is a file": Case(
        ["train", R, "model.path={w}/recipe.yaml"], ["is a file, not a folder"]
    ),
    "train model folder without config": Case(["train", R, "model.path={w}/empty"], ["has no config.json"]),
    "rl model path": Case(["rl", R, "model.path=nobody/none/x"], ["model.path: folder nobody/none/x"]),
    "preview model path": Case(["data", "preview", R, "model.path=a//b"], ["model.path: folder a//b"]),
    # ---- data -------------------------------------------------------------------------------
    "data file is a directory": Case(
        ["data", "preview", R, "data.train={w}/folder.jsonl"], ["data.train: {w}/folder.jsonl is a directory"]
    ),
    "data file missing, brackets in name": Case(
        ["data", "preview", R, "data.train={w}/sciq[train].jsonl"], ["file not found: {w}/sciq[train].jsonl"]
    ),
    "bad row": Case(["data", "preview", R, "data.train={w}/bad.jsonl"], ["{w}/bad.jsonl line 2", "'answer'"]),
    "too many bad rows skipped": Case(
        ["data", "preview", R, "data.train={w}/bad.jsonl", "data.bad_rows=skip"],
        ["split train: 2 of 4 rows are bad", "data.max_bad_fraction=0.1", "{w}/bad.jsonl line 2"],
    ),
    "overlong row": Case(
        ["data", "preview", R, "data.train={w}/long.jsonl", "data.overlong=error"],
        ["{w}/long.jsonl line 3 (split train): source has", "data.max_source_tokens=32"],
    ),
    "data not utf-8": Case(
        ["data", "preview", R, "data.train={w}/latin1.jsonl"], ["latin1.jsonl line 2", "UTF-8"]
    ),
    "unsupported data type": Case(
        ["data", "preview", R, "data.train={w}/notes.txt"], ["unsupported file type"]
    ),
    "broken json array": Case(
        ["data", "preview", R, "data.train={w}/array.json"],
        ["{w}/array.json: line 3 column 1: malformed JSON"],
    ),
    "csv without header": Case(["data", "preview", R, "data.train={w}/empty.csv"], ["has no header row"]),
    "data row text with markup": Case(
        ["data", "preview", R, "data.train={w}/markup.jsonl", "data.task_options.target='{missing}'"],
        ["markup.jsonl line 1", "'missing'"],
    ),
    "train stops on a data error": Case(["train", R, "data.train={w}/folder.jsonl"], ["is a directory"]),
    # ---- generate -----------------------------------------------------------------------------
    "generate file not utf-8": Case(
        [*GEN, "--file", "{w}/latin1.jsonl"], ["--file: {w}/latin1.jsonl line 2"]
    ),
    "generate file malformed": Case(
        [*GEN, "--file", "{w}/array.json"], ["array.json line 1: malformed JSON"]
    ),
    "generate file missing": Case([*GEN, "--file", "{w}/nope.jsonl"], ["--file: {w}/nope.jsonl not found"]),
    "generate file is a directory": Case([*GEN, "--file", "{w}"], ["--file: {w} is a directory"]),
    "generate out is a directory": Case(
        [*GEN, "--file", "{w}/inputs.jsonl", "--out", "{w}/empty"], ["--out: {w}/empty is a directory"]
    ),
    "generate out is the input": Case(
        [*GEN, "--file", "{w}/inputs.jsonl", "--out", "{w}/../{name}/inputs.jsonl"], ["never overwrites"]
    ),
    "generate out folder missing": Case(
        [*GEN, "--file", "{w}/inputs.jsonl", "--out", "{w}/no/out.jsonl"],
        ["--out: the folder {w}/no does not"],
    ),
    "generate out under a file": Case(
        [*GEN, "--input", "hi", "--out", "{w}/inputs.jsonl/out.jsonl"], ["is a file, not a folder"]
    ),
    "generate no input": Case(GEN, ["give either --input"]),
    "generate max new tokens": Case(
        [*GEN, "--input", "hi", "--max-new-tokens", "0"], ["--max-new-tokens: must"]
    ),
    "generate batch size": Case(
        [*GEN, "--input", "hi", "--batch-size", "0"], ["--batch-size: must be at least 1 or auto, got 0"]
    ),
    "generate batch size word": Case(
        [*GEN, "--input", "hi", "--batch-size", "many"], ["--batch-size: must be at least 1 or auto, got many"]
    ),
    "generate model missing": Case(["generate", "{w}/no/model", "--input", "hi"], ["MODEL: {w}/no/model"]),
    "generate bad hub id": Case(["generate", "bad id!", "--input", "hi"], ["MODEL", "'bad id!'"]),
    # ---- serve, eval, merge -------------------------------------------------------------------
    "serve port too large": Case(["serve", "--port", "70000"], ["--port: must be in 1-65535, got 70000"]),
    "serve port negative": Case(["serve", "--port", "-5"], ["--port: must be in 1-65535, got -5"]),
    "serve timeout": Case(["serve", "--model", str(T5), "--timeout", "0"], ["--timeout: must be positive"]),
    "serve model missing": Case(["serve", "--model", "{w}/no/model"], ["--model: {w}/no/model"]),
    "serve adapter spec": Case(["serve", "--adapter", "sciq"], ["--adapter: expected NAME=PATH"]),
    "serve dtype": Case(["serve", "--model", str(T5), "--dtype", "fp8"], ["--dtype: expected"]),
    "eval without model": Case(["eval", R], ["--model: give the model"]),
    "eval dtype": Case(["eval", R, "--model", str(T5), "--dtype", "fp8"], ["--dtype: expected float32, bfloat16 or float16, got 'fp8'"]),
    "eval model missing": Case(["eval", R, "--model", "{w}/no/model"], ["--model: {w}/no/model"]),
    "merge not an adapter": Case(["merge", "{w}/empty", "--out", "{w}/merged"], ["{w}/empty", "adapter"]),
    # ---- run folders ----------------------------------------------------------------------------
    "output_dir is a file": Case(["train", R, "output_dir={w}/recipe.yaml"], ["{w}/recipe.yaml is a file"]),
    "output_dir holds the user's files": Case(
        ["train", R, "output_dir={w}"], ["output_dir {w} holds files a run did not write", "data.jsonl"]
    ),
    "resume without a checkpoint": Case(
        ["train", R, "--resume", "output_dir={w}/fresh"], ["holds no complete checkpoint", "--restart"]
    ),
    "resume and restart together": Case(
        ["train", R, "--resume", "--restart"], ["train.resume and train.restart"]
    ),
    "rl output_dir is a file": Case(
        ["rl", R, "rl.output_dir={w}/data.jsonl", "rl.start={w}/empty"],
        ["rl.output_dir {w}/data.jsonl is a file"],
    ),
    "save_every_minutes zero": Case(
        ["check", R, "train.save_every_minutes=0"], ["train.save_every_minutes: must be > 0 or null"]
    ),
}

DRIVER = """
import contextlib, io, json, sys, traceback
from flantune.cli import app
results = []
for args in json.loads(sys.argv[1]):
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app(args, prog_name="flantune")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print("RESULTS" + json.dumps(results))
"""


def write_files(w: Path) -> None:
    rows = [{"text": f"reverse: a b {i}", "answer": f"{i} b a"} for i in range(8)]
    (w / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "model": {"path": str(T5), "init": "random"},
        "method": {"kind": "full"},
        "data": {"task": "template", "task_options": {"source": "{text}", "target": "{answer}"},
                 "train": str(w / "data.jsonl"), "max_source_tokens": 32, "max_target_tokens": 16},
        "train": {"max_steps": 1, "batch_size": 2},
        "output_dir": str(w / "run"),
    }  # fmt: skip
    (w / "recipe.yaml").write_text(json.dumps(recipe))
    (w / "broken.yaml").write_text("model: {path: x}\ntrain: [/tmp/x\n")
    (w / "list.yaml").write_text("- model\n- data\n")
    (w / "latin1.yaml").write_bytes("model: {path: caf\xe9}\n".encode("latin-1"))
    (w / "dup.yaml").write_text("model: {path: x}\ntrain:\n  lr: 1.0e-4\n  lr: 3.0e-4\ndata: {task: sciq}\n")
    (w / "mixture.yaml").write_text(
        "model: {path: x}\ndata:\n  mixture:\n    - {task: sciq, train: a.jsonl}\n"
        "    - {task: samsun, train: b.jsonl}\n"
    )
    (w / "extends.yaml").write_text("extends: base.yaml\ntrain: {lr: 1.0e-4}\n")
    (w / "empty").mkdir()
    (w / "folder.jsonl").mkdir()
    good = json.dumps(rows[0])
    (w / "bad.jsonl").write_text(f'{good}\n{{"text": "x"}}\n{{"text": "y"}}\n{good}\n')
    (w / "long.jsonl").write_text(
        f"{good}\n{good}\n" + json.dumps({"text": "word " * 80, "answer": "a"}) + "\n"
    )
    first = json.dumps({**rows[0], "source": "reverse: a b"}).encode()
    (w / "latin1.jsonl").write_bytes(first + b'\n{"text": "caf\xe9", "source": "caf\xe9"}\n')
    (w / "notes.txt").write_text("reverse: a b\n")
    (w / "array.json").write_text('[\n{"text": "a"\n')
    (w / "empty.csv").write_text("")
    (w / "markup.jsonl").write_text(
        json.dumps({"text": "[/INST] [bold]x[/bold]", "answer": "[/tmp/x"}) + "\n"
    )
    (w / "inputs.jsonl").write_text('{"source": "reverse: a b"}\n')


def digests(w: Path) -> dict[str, str]:
    return {
        str(p.relative_to(w)): hashlib.sha256(p.read_bytes()).hexdigest() for p in w.rglob("*") if p.is_file()
    }


def run_batch(batch: list[list[str]], alone: bool) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    if alone:
        (args,) = batch
        command = [sys.executable, "-m", "flantune.cli", *args]
    else:
        command = [sys.executable, "-c", DRIVER, json.dumps(batch)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if alone:
        return [{"rc": done.returncode, "stdout": done.stdout, "stderr": done.stderr}]
    marker = done.stdout.rfind("RESULTS")
    assert marker >= 0, f"the driver failed: {done.stderr[-3000:]}"
    return json.loads(done.stdout[marker + len("RESULTS") :])


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once: {name: result}, and the files' digests before and after."""
    need(T5)
    w = tmp_path_factory.mktemp("mistakes")
    write_files(w)
    before = digests(w)

    def fill(text: str) -> str:
        return text.replace("{w}", str(w)).replace("{name}", w.name)

    names = list(CASES)
    together = [n for n in names if not CASES[n].alone]
    jobs = [([n], True) for n in names if CASES[n].alone] + [(together[i::2], False) for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [(job, pool.submit(run_batch, [[fill(a) for a in CASES[n].args] for n in job], alone))
                   for job, alone in jobs]  # fmt: skip
        results = {n: r for job, future in futures for n, r in zip(job, future.result(), strict=True)}
    return results, before, digests(w), fill


@pytest.mark.parametrize("name", list(CASES))
def test_mistake_ends_in_one_clear_message(name, outcomes):
    results, before, after, fill = outcomes
    result, case = results[name], CASES[name]
    stderr = result["stderr"]
    assert "Traceback" not in stderr and "Traceback" not in result["stdout"], stderr
    assert result["rc"] == 2, f"exit {result['rc']}: {stderr}"
    message = " ".join(stderr.split())  # rich may wrap a long message
    for fragment in case.expected:
        assert " ".join(fill(fragment).split()) in message, f"{fill(fragment)!r} not in {stderr!r}"
    assert message.count("error:") <= 1, stderr
    changed = {f for f in before if after.get(f) != before[f]}
    assert not changed, f"files changed: {changed}"
