"""bench/multi_gpu.py, the scaling benchmark: its figures from run folders written here (steady
rates, curves, the resume check), its kill of a launched command's whole process tree, and one
real call on the CPU (one process, then two gloo processes through `accelerate launch`)."""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from .conftest import ROOT, SCIQ, SHARED, need


def load_bench():
    if str(ROOT / "bench") not in sys.path:  # its shared helpers (bench/_steady.py), as when run as a script
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_multi_gpu", ROOT / "bench" / "multi_gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_bench()


def write_run(folder: Path, records: list[dict], result: dict | None = None):
    """A run folder as flantune writes it: metrics.jsonl (and result.json); its bench.Run."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if result is not None:
        (folder / "result.json").write_text(json.dumps(result))
    return bench.Run(name=folder.name, command=[], folder=str(folder), processes=1, status="ok")


def windows(steps: list[int], rates: list[float], losses: list[float]) -> list[dict]:
    return [
        {"step": s, "loss": loss, "tokens_per_s": r} for s, r, loss in zip(steps, rates, losses, strict=True)
    ]


def test_steady_rate_ratio_and_loss_curves_from_run_files(tmp_path):
    # 50 steps logged every 10: the first 20% (steps 1-10) are left out, the rest weigh 10 steps each.
    one = write_run(
        tmp_path / "one",
        [{"step": 0, "resumed_from": "x"}, *windows([10, 20, 30, 40, 50], [9999, 100, 100, 200, 200], [3.0, 2.0, 1.5, 1.2, 1.0])],
        {"first_step_s": 12.5, "peak_memory_gib": 3.0, "peak_memory_gib_per_process": [3.0],
         "speed": {"line": "speed: packed rows"}, "startup": {"setup_s": 2.0}, "steps": 50, "seconds": 30.0},
    )  # fmt: skip
    multi = write_run(
        tmp_path / "multi",
        windows([10, 20, 30, 40, 50], [5, 290, 310, 300, 300], [3.3, 2.0, 1.5, 1.2, 1.0]),
        {"peak_memory_gib": 2.0, "peak_memory_gib_per_process": [2.0, 2.5]},
    )  # fmt: skip
    a, b = bench.train_figures(one, 50, 10), bench.train_figures(multi, 50, 10)
    assert a["tokens_per_s"] == pytest.approx(150) and b["tokens_per_s"] == pytest.approx(300)
    assert bench.ratio(b["tokens_per_s"], a["tokens_per_s"]) == pytest.approx(2.0)
    assert a["counted_from_step"] == 11 and a["first_step_s"] == 12.5 and a["speed"] == "speed: packed rows"
    assert b["peak_memory_gib_per_process"] == [2.0, 2.5] and b["first_step_s"] is None
    assert a["loss"] == {"steps": [10, 20, 30, 40, 50], "values": [3.0, 2.0, 1.5, 1.2, 1.0]} and a["finite"]
    curves = [dict(zip(*x["loss"].values(), strict=True)) for x in (b, a)]
    assert bench.max_rel_diff(*curves)["max"] == pytest.approx(0.1)  # step 10: 3.3 against 3.0

    # An uneven last window (45 steps) weighs the steps it spans; a NaN loss is not finite.
    uneven = write_run(
        tmp_path / "uneven", windows([10, 20, 30, 40, 45], [1, 10, 20, 30, 60], [1, 1, 1, 1, math.nan])
    )
    figures = bench.train_figures(uneven, 45, 10)
    assert figures["tokens_per_s"] == pytest.approx((10 * 10 + 10 * 20 + 10 * 30 + 5 * 60) / 35)
    assert not figures["finite"]


def test_resume_check_compares_after_the_resume_and_finds_gaps_and_duplicates(tmp_path):
    setting = bench.Setting(model=tmp_path, method="lora", steps=6, batch=8, processes=2, data=tmp_path,
                            rows=None, source_tokens=32, log_every=1)  # fmt: skip
    losses = [3.0, 2.5, 2.0, 1.8, 1.6, 1.5]
    multi = write_run(tmp_path / "multi", windows([1, 2, 3, 4, 5, 6], [1] * 6, losses))
    # Killed after step 4, resumed from the checkpoint of step 3: metrics.jsonl cut back to step 3.
    resumed = write_run(
        tmp_path / "resumed",
        [*windows([1, 2, 3], [1] * 3, losses[:3]), {"step": 3, "resumed_from": "checkpoints/step-000003"},
         *windows([4, 5, 6], [1] * 3, [1.8, 1.616, 1.5])],
    )  # fmt: skip
    check = bench.resume_check(resumed, multi, setting)
    assert check["made"] and check["resumed_from_step"] == 3 and check["steps_compared"] == [4, 5, 6]
    assert check["loss_max_rel_diff_after_resume"] == pytest.approx(0.01)
    assert check["log_continues"] and check["log_gaps"] == [] and check["log_duplicates"] == []

    # A log that was not cut back (step 3 twice) and misses step 5.
    broken = write_run(
        tmp_path / "broken",
        [*windows([1, 2, 3], [1] * 3, losses[:3]), {"step": 2, "resumed_from": "checkpoints/step-000002"},
         *windows([3, 4, 6], [1] * 3, [2.0, 1.8, 1.5])],
    )  # fmt: skip
    check = bench.resume_check(broken, multi, setting)
    assert check["resumed_from_step"] == 2 and not check["log_continues"]
    assert check["log_gaps"] == [5] and check["log_duplicates"] == [3]

    failed = bench.Run(name="r", command=[], folder=str(tmp_path / "none"), processes=2, status="failed")
    assert not bench.resume_check(failed, multi, setting)["made"]


def test_rl_figures_count_prompts_over_step_time_after_the_first_steps(tmp_path):
    records = [
        {"step": s, "reward": r, "loss": 0.1, "kl": 0.0, "prompts_per_s": 16 / sec, "completions_per_s": 128 / sec,
         "step_seconds": sec, "prompts_per_process": [8, 8], "completion_tokens": 96.0, "generate_seconds": 0.5}
        for s, r, sec in [(1, 0.1, 60.0), (2, 0.2, 2.0), (3, 0.3, 2.0), (4, 0.2, 4.0), (5, 0.4, 2.0)]
    ]  # fmt: skip
    run = write_run(tmp_path / "rl", records, {"steps": 5, "seconds": 70.0, "processes": 2})
    figures = bench.rl_figures(run, 5)
    # Step 1 (compilation) left out: 4 steps of 16 prompts in 10 s.
    assert figures["prompts_per_s"] == pytest.approx(6.4) and figures["counted_from_step"] == 2
    assert figures["completions_per_s"] == pytest.approx(51.2)
    assert figures["reward"]["values"] == [0.1, 0.2, 0.3, 0.2, 0.4] and figures["prompts_per_process"] == [
        [8, 8]
    ]
    assert figures["finite"] and figures["processes"] == 2


FAKE_LAUNCHER = """
import subprocess, sys
# As torch's elastic agent starts its workers: each in a session (and process group) of its own.
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
open(sys.argv[2], "w").write(str(worker.pid))
worker.wait()
"""
FAKE_WORKER = """
import json, os, time
out = {out!r}
for step in range(1, 1200):  # a minute at most, should a kill miss it
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({{"step": step, "loss": 1.0}}) + "\\n")
    if step == 2:
        os.makedirs(os.path.join(out, "checkpoints", "step-000002"))
    time.sleep(0.05)
"""


def test_the_kill_reaches_workers_in_sessions_of_their_own(tmp_path):
    """The resume check's SIGKILL after the first checkpoint ends the launcher and its workers,
    which `accelerate launch` (torch's elastic agent) starts outside the launcher's process group."""
    out, pid_file = tmp_path / "run", tmp_path / "worker.pid"
    out.mkdir()
    runner = bench.Bench(argparse.Namespace(time_limit=60, device="cpu"), tmp_path)
    launcher = subprocess.Popen([sys.executable, "-c", FAKE_LAUNCHER, FAKE_WORKER.format(out=str(out)), str(pid_file)],
                                start_new_session=True)  # fmt: skip
    try:
        kill = runner._kill_after_checkpoint(launcher, out, {"max_steps": 100, "log_every": 1}, 0.5, 0.01)
        assert launcher.wait(timeout=10) == -9
        worker = int(pid_file.read_text())
        assert kill["killed"] and kill["first_checkpoint"] == 2 and kill["checkpoints"] == [2]
        deadline = time.monotonic() + 10
        while psutil.pid_exists(worker) and psutil.Process(worker).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the worker outlived the kill"
            time.sleep(0.05)
    finally:
        bench.kill_tree(launcher)
        if pid_file.exists():  # a worker the kill missed (the launcher is gone: not in its tree)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_a_cpu_call_runs_one_process_and_two_through_accelerate(tmp_path):
    """`--mode ddp --device cpu --runs one,multi`: the real commands, the same global batch, every
    run recorded with its command and exit status, finite losses of every logged step, the ratio."""
    need(SCIQ)
    need(SHARED / "assets" / "flan-t5-small")
    out, work = tmp_path / "ddp.json", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    cmd = [sys.executable, "bench/multi_gpu.py", "--device", "cpu", "--mode", "ddp", "--runs", "one,multi",
           "--steps", "4", "--shared", str(SHARED), "--out", str(out), "--work", str(work)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    one, multi = report["runs"]
    assert [one["status"], multi["status"]] == ["ok", "ok"] and one["exit_code"] == multi["exit_code"] == 0
    assert one["command"][1:4] == ["-m", "flantune.cli", "train"]
    assert multi["command"][1:3] == ["-m", "accelerate.commands.launch"]
    assert multi["command"][multi["command"].index("--num_processes") + 1] == "2"
    # The same examples per step: batch_size is per process.
    sizes = [
        yaml.safe_load(Path(run["command"][-1]).read_text())["train"]["batch_size"] for run in (one, multi)
    ]
    assert sizes == [8, 4]
    for run in (one, multi):
        figures = run["figures"]
        assert figures["finite"] and figures["loss"]["steps"] == [1, 2, 3, 4]
        assert figures["tokens_per_s"] > 0 and "peak_memory_gib_per_process" in figures
        assert not (Path(run["folder"]) / "checkpoints").exists()  # large folders deleted once read
    cell = report["cells"][0]
    assert cell["tokens_ratio"] == pytest.approx(
        multi["figures"]["tokens_per_s"] / one["figures"]["tokens_per_s"]
    )
    assert math.isfinite(cell["loss_max_rel_diff"])
    assert report["child_env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
