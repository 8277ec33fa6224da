"""Scaling over several GPUs as a user meets it: the real `flantune train` / `flantune rl` commands
in one process and, through `accelerate launch`, in several, every figure of a mode from one call
(machines with several GPUs are lent for short calls: the commands below each fit one 10-minute
call).

Each run is the real command in a subprocess: one process runs `python -m flantune.cli train|rl
RECIPE`, several run `python -m accelerate.commands.launch --multi_gpu --num_processes N
--num_machines 1 --main_process_port PORT --mixed_precision bf16 --dynamo_backend no -m
flantune.cli train|rl RECIPE` (FSDP: `--use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy
TRANSFORMER_BASED_WRAP` instead of `--multi_gpu`: every T5 block its own shard unit, Accelerate
taking the class from the model's `_no_split_modules`). Figures come from the run folder's own
files (metrics.jsonl, result.json); every run's command, exit status, output tail and folder go
into the JSON. A failed run is recorded and the next one starts; the script exits with status 1
when any run failed. Children get NCCL_NVLS_ENABLE=0 and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (NVLink
multicast stays off on the lent machines) unless already set. Runs share one compile cache, empty
at the start of the call, and run in the order listed below (a later run may compile from the
cache: first_step_s is comparable only in that light; steady tokens/s is not affected).

The recipe (train modes) is bench/recipe_speed.py's: SciQ validation through the `sciq` task
(support included, sources cut to 512 tokens, targets to 32), random weights of the published
shape (`init: random`, seed 42), lr 3e-4, clipping 1.0, LoRA r 16 / alpha 32 / dropout 0.05 on q
and v, every speed setting at flantune's default. Global batch: --batch examples per optimizer step
whatever the process count: train.batch_size is per process, so N processes get --batch / N each
(grad_accum 1). (One process on a GPU takes the CUDA-graph path, whose micro-batch is one packed
shape sized for --batch examples of the data's mean length; several processes take --batch / N
examples each: the same number of examples per step on average, not the same grouping, so their
loss curves agree only up to sampling noise.)

--mode ddp (per cell of --cells, default flan-t5-large/lora,flan-t5-large/full; schedule linear):
- one: 1 process, --batch examples a step, --steps optimizer steps. multi: --processes processes.
- Per run: steady real tokens/s (the first 20% of steps left out, rounded up to the log window of
  --steps / 10 steps, at most 10; the mean of metrics.jsonl's windows over the rest, weighted by the
  steps each spans: recipe_speed.py's rule; a window's tokens/s is the main process's real tokens
  times the process count over its time), wall_s (the whole command, as this script timed it),
  first_step_s, peak_memory_gib (the main process) and peak_memory_gib_per_process from
  result.json, its `speed` line, and the loss of every logged step. Then tokens/s multi / one
  (target >= 1.9 for 2 processes) and the two loss curves' largest relative difference.
- resume: the multi run again with train.save_every (a quarter of the steps, on a log window), its
  whole process tree SIGKILLed at a random moment (seeded by --seed) after its first checkpoint
  exists (the launcher's process group, then each worker's: torch's elastic agent starts every
  worker in a session of its own), then the same command with --resume to the same --steps. Not
  started when less than twice the multi run's wall time is left. Reported: the kill time and
  step, the checkpoint it resumed from, the largest relative loss difference against the
  uninterrupted multi run over the logged steps after that checkpoint, and whether the resumed
  metrics.jsonl logs every window exactly once (no gap, no duplicate).

--mode fsdp (per cell, default flan-t5-xl/full; schedule constant so that a run may be stopped and
lengthened): FSDP runs unpacked (transformers' forward, length-grouped batches), so `one` is plain
`flantune train` with train.packing=false, the same path without FSDP.
- one: 1 process (an out-of-memory failure is recorded as "does not fit", not as a failure);
  multi: FSDP over --processes processes. Per run the train figures above, with each process' own
  CUDA peak (result.json's peak_memory_gib_per_process).
- resume: FSDP stopped by train.max_steps=K (half the steps, on a log window), then `--resume
  train.max_steps=--steps`: the largest relative loss difference against multi after step K.

--mode rl (per cell, default flan-t5-base/lora; --steps defaults to 30 here): `flantune rl` from a
fresh LoRA adapter (no SFT run), the `sciq_think` task (sources cut to 256 tokens), 16 prompts a
step (--rl-prompts, the same for every process count: each process samples its own contiguous
share), 8 completions each, 96 new tokens at most, 2 inner steps, rewards correct + 0.2 format (as
recipes/sciq-think.yaml), no evaluation. one and multi as above; per run steady prompts/s (the
counted steps' prompts over their step_seconds, the first 20% of steps left out), the reward of
every step, and each process' share of prompts (metrics.jsonl's prompts_per_process); then
prompts/s multi / one (target >= 1.8 for 2 processes) and the largest reward difference.

On the GPU machine, from the repository root (the missing wheels installed first, as
../shared/gpu/wheels.sh says; .gpu_shared: a copy of ../shared carried along):

    python3 bench/multi_gpu.py --shared .gpu_shared --mode ddp --out $OUT/ddp.json
        [--cells flan-t5-large/lora] [--processes 2] [--steps 100] [--batch 32]
        [--runs one,multi,resume] [--time-limit 540] [--seed 0]

One 10-minute call each (`...`: `python3 bench/multi_gpu.py --shared .gpu_shared`; the times are
estimates from the one-GPU figures in docs/benchmarks.md and docs/results/, not measurements: start-up
and compilation dominate, and full fine-tuning writes a checkpoint and final/ at the end of every run):

    ... --mode ddp --cells flan-t5-large/lora --out $OUT/ddp-lora.json                  # 4 runs, 6-8 min
    ... --mode ddp --cells flan-t5-large/full --runs one,multi --out $OUT/ddp-full.json  # 2 runs, 4-6 min
    ... --mode ddp --cells flan-t5-large/full --runs resume --out $OUT/ddp-full-resume.json  # 3 runs, 7-9 min
    ... --mode fsdp --runs one,multi --steps 50 --out $OUT/fsdp.json                     # 2 runs, 6-9 min
    ... --mode fsdp --runs resume --steps 30 --out $OUT/fsdp-resume.json                 # 3 runs, 7-9 min
    ... --mode rl --out $OUT/rl.json                                                     # 2 runs, 5-7 min

A run not started before --time-limit seconds (from the script's start) is recorded as "not run:
time limit"; one still running then is killed and recorded as such, so that one call stays within
the machine's 10-minute limit with its JSON written (after every run). Large run folders
(checkpoints/, final/) are deleted once read (--keep keeps them).

CPU check of the orchestration (gloo, a flan-t5-small config shrunk to width 32 and 2+2 layers
with the real tokenizer, 64 SciQ rows, 12 steps, RL 4; the numbers mean nothing, and Accelerate
runs an FSDP launch on CPU processes as DDP), about a minute per mode on two cores:

    PYTHONPATH=src python bench/multi_gpu.py --device cpu --mode ddp --out /tmp/ddp.json
    PYTHONPATH=src python bench/multi_gpu.py --device cpu --mode fsdp --out /tmp/fsdp.json
    PYTHONPATH=src python bench/multi_gpu.py --device cpu --mode rl --out /tmp/rl.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from _steady import log_every_for, log_windows, steady_rate, steady_start, tail

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_CELLS = {
    "ddp": ("flan-t5-large/lora", "flan-t5-large/full"),
    "fsdp": ("flan-t5-xl/full",),
    "rl": ("flan-t5-base/lora",),
}
CPU_CELLS = {"ddp": ("tiny/lora",), "fsdp": ("tiny/full",), "rl": ("tiny/lora",)}
RUNS = {"ddp": ("one", "multi", "resume"), "fsdp": ("one", "multi", "resume"), "rl": ("one", "multi")}
TARGETS = {"ddp": 1.9, "fsdp": None, "rl": 1.8}
"""The issues' targets for multi / one at 2 processes (tokens/s; RL: prompts/s)."""
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
SEED, LR, MAX_GRAD_NORM = 42, 3e-4, 1.0
MIN_START_S = 30
"""A run is started only with at least this many seconds left before --time-limit (GPU)."""
OOM_MARKS = ("CUDA out of memory", "OutOfMemoryError")


# ---- recipes --------------------------------------------------------------------------------------


def tiny_model(shared: Path, folder: Path) -> Path:
    """flan-t5-small's architecture shrunk to width 32 and 2+2 layers, its real tokenizer and
    FLAN-T5's untied head (as the tests build it), for the CPU check."""
    from transformers import AutoConfig, AutoTokenizer

    if (folder / "config.json").exists():
        return folder
    asset = shared / "assets" / "flan-t5-small"
    config = AutoConfig.from_pretrained(asset)
    config.update(dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16))
    config.save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": False}))
    AutoTokenizer.from_pretrained(asset).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Setting:
    """What a mode's runs share: the machine, the model folder, the sizes."""

    model: Path
    method: str
    steps: int
    batch: int
    processes: int
    data: Path
    rows: str | None
    """A slice of the SciQ rows (`'0:64'`), or None for all."""
    source_tokens: int
    log_every: int


def data_source(s: Setting) -> str | dict:
    return {"path": str(s.data), "rows": s.rows} if s.rows else str(s.data)


def lora(targets: list[str]) -> dict:
    return {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets}


def train_recipe(s: Setting, out: Path, schedule: str, **train: object) -> dict:
    """bench/recipe_speed.py's recipe for `flantune train`, at one process' share of the batch."""
    return {
        "model": {"path": str(s.model), "init": "random"},
        "method": {"kind": "full"} if s.method == "full" else lora(["q", "v"]),
        "data": {
            "task": "sciq", "task_options": {"include_support": True}, "train": data_source(s),
            "max_source_tokens": s.source_tokens, "max_target_tokens": 32, "overlong": "truncate",
        },
        "train": {
            "max_steps": s.steps, "batch_size": s.batch // s.processes, "grad_accum": 1, "lr": LR, "schedule": schedule,
            "warmup_steps": 0, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "log_every": s.log_every,
            "save_every_minutes": None, **train,
        },
        "output_dir": str(out),
    }  # fmt: skip


def rl_recipe(s: Setting, out: Path, prompts: int, group: int, new_tokens: int) -> dict:
    """recipes/sciq-think.yaml's RL section on a fresh adapter, without evaluation."""
    return {
        "model": {"path": str(s.model), "init": "random", "add_tokens": ["<think>", "</think>", "<answer>", "</answer>"]},
        "method": {"kind": "full"} if s.method == "full" else lora(["q", "k", "v", "o"]),
        "data": {"task": "sciq_think", "train": data_source(s), "max_source_tokens": s.source_tokens,
                 "max_target_tokens": 96, "overlong": "truncate"},
        "generation": {"max_new_tokens": new_tokens},
        "rl": {
            "max_steps": s.steps, "prompts_per_step": prompts, "group_size": group, "inner_steps": 2,
            "lr": 2e-5, "beta": 0.04, "clip_eps": 0.2, "temperature": 1.0, "max_new_tokens": new_tokens,
            "rewards": [{"name": "correct", "weight": 1.0}, {"name": "format", "weight": 0.2}],
            "log_every": 1, "eval_every": None, "save_every": None, "save_every_minutes": None, "seed": SEED,
        },
        "output_dir": str(out),
    }  # fmt: skip


# ---- running the real commands --------------------------------------------------------------------


@dataclass
class Run:
    """One command this script ran (or did not run), and what it left."""

    name: str
    command: list[str]
    folder: str
    """The run folder (output_dir; RL: its rl/ folder)."""
    processes: int
    status: str = "not run: time limit"
    """ok, failed, does not fit (out of memory), killed on purpose, killed: time limit, or not run: time limit."""
    exit_code: int | None = None
    wall_s: float | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    logs: str = ""
    """Where its whole stdout and stderr are (NAME.out, NAME.err)."""
    figures: dict = field(default_factory=dict)


class Bench:
    """The call's shared state: the work folder, the deadline, the runs so far, the JSON."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.deadline = time.monotonic() + args.time_limit
        self.min_start = 5 if args.device == "cpu" else MIN_START_S
        self.runs: list[Run] = []
        self.env = child_env(work, cpu=args.device == "cpu")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def launch(self, kind: str, recipe: dict, name: str, processes: int, *, fsdp: bool = False,
               extra: tuple[str, ...] = (), kill: dict | None = None) -> Run:  # fmt: skip
        """`flantune KIND recipe` (kind: train or rl) in `processes` processes, to its end or the
        deadline; kill: {"fraction", "per_step_s"}: SIGKILL it after its first checkpoint exists
        (`_kill_after_checkpoint`)."""
        import yaml

        path = self.work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        cmd = command(kind, path, processes, cpu=self.args.device == "cpu", fsdp=fsdp) + list(extra)
        out = Path(recipe["output_dir"]) / ("rl" if kind == "rl" else "")
        run = Run(name=name, command=cmd, folder=str(out), processes=processes,
                  logs=str(self.work / name))  # fmt: skip
        self.runs.append(run)
        if self.left() < self.min_start:
            print(f"  {name}: not run (time limit)", flush=True)
            return run
        print(f"  {name}: {' '.join(cmd)}", flush=True)
        stdout, stderr = self.work / f"{name}.out", self.work / f"{name}.err"
        start = time.perf_counter()
        with open(stdout, "w") as so, open(stderr, "w") as se:
            # Its own session: a kill reaches the launcher's whole group (and, in kill_tree, the
            # workers, which torch's elastic agent starts in sessions of their own).
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=so, stderr=se, start_new_session=True)
            try:
                if kill is not None:
                    run.figures["kill"] = self._kill_after_checkpoint(proc, out, recipe["train"], **kill)
                code = proc.wait(timeout=max(self.left(), 0.1))
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                code = proc.wait()
                run.status = "killed: time limit"
            except BaseException:  # this script stopped (SIGTERM, Ctrl-C): its run stops too
                kill_tree(proc)
                raise
        run.wall_s = round(time.perf_counter() - start, 2)
        run.exit_code = code
        run.stdout_tail, run.stderr_tail = tail(stdout)[-6000:], tail(stderr)[-6000:]
        if run.status == "killed: time limit":
            pass
        elif run.figures.get("kill", {}).get("killed"):
            run.status = "killed on purpose"
        elif code == 0:
            run.status = "ok"
        elif any(mark in run.stderr_tail + run.stdout_tail for mark in OOM_MARKS):
            run.status = "does not fit"
        else:
            run.status = "failed"
        print(f"    {run.status} (exit {code}) after {run.wall_s:.1f} s", flush=True)
        if run.status == "failed":
            print("    " + (run.stderr_tail or run.stdout_tail)[-2000:].replace("\n", "\n    "), flush=True)
        return run

    def _kill_after_checkpoint(self, proc, out: Path, train: dict, fraction: float,
                               per_step_s: float | None) -> dict:  # fmt: skip
        """Wait for the run's first checkpoint, then SIGKILL its process tree after `fraction` of
        the time its remaining steps take (per_step_s each: the uninterrupted run's; None: the time
        per step up to the first checkpoint, start-up included), or at once when its log reaches
        the last window first (so that the kill comes before the end)."""
        checkpoints = out / "checkpoints"
        steps, last_window = train["max_steps"], train["max_steps"] - train["log_every"]
        started = time.monotonic()
        while proc.poll() is None and self.left() > 0 and not any(checkpoints.glob("step-*")):
            time.sleep(0.02)
        if proc.poll() is not None or self.left() <= 0:
            return {
                "killed": False,
                "why": "the run ended (or the time limit came) before its first checkpoint",
            }
        first = min(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
        per_step = per_step_s or (time.monotonic() - started) / first
        delay = fraction * per_step * max(steps - first - train["log_every"], 1)
        seen = time.monotonic()
        while proc.poll() is None and self.left() > 0:
            logged = logged_steps(out / "metrics.jsonl")
            if time.monotonic() - seen >= delay or (logged and logged[-1] >= last_window):
                after = time.monotonic() - seen
                kill_tree(proc)
                logged = logged_steps(out / "metrics.jsonl")
                saved = sorted(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*"))
                return {"killed": True, "first_checkpoint": first, "after_s": round(after, 3),
                        "drawn_delay_s": round(delay, 3), "last_logged_step": logged[-1] if logged else None,
                        "checkpoints": saved}  # fmt: skip
            time.sleep(0.02)
        return {"killed": False, "why": "the run ended before the kill"}


def free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def command(kind: str, recipe: Path, processes: int, *, cpu: bool, fsdp: bool) -> list[str]:
    """The user's command line: plain in one process, through `accelerate launch` in several."""
    cli = ["-m", "flantune.cli", kind, str(recipe)]
    if processes == 1 and not fsdp:
        return [sys.executable, *cli]
    # `--multi_gpu` on a machine without GPUs starts torch.distributed processes on the CPU (gloo).
    parallel = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"] if fsdp else ["--multi_gpu"]  # fmt: skip
    return [
        sys.executable, "-m", "accelerate.commands.launch", *parallel, "--num_processes", str(processes),
        "--num_machines", "1", "--main_process_port", free_port(), "--mixed_precision", "no" if cpu else "bf16",
        "--dynamo_backend", "no", *cli,
    ]  # fmt: skip


def child_env(work: Path, cpu: bool) -> dict:
    """This environment with src/ importable, NVLink multicast off, one compile cache for the call."""
    env = dict(os.environ)
    for key, value in NCCL_ENV.items():
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    cache = work / "inductor"
    # Triton keeps its own kernel cache (~/.triton unless told); inside the inductor folder.
    env |= {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")  # several processes on a few cores
    return env


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launched command with every process under it. `accelerate launch` runs torch's
    elastic agent, which starts each worker in a session (and process group) of its own: a kill of
    the launcher's group alone would leave the workers training. So: the launcher's group, then
    each descendant's group (its loader workers with it)."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    groups = {proc.pid}
    for child in descendants:
        with contextlib.suppress(ProcessLookupError):
            groups.add(os.getpgid(child.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(descendants, timeout=30)



# ---- reading a run's files --------------------------------------------------------------------------


def read_records(path: Path) -> list[dict]:
    """metrics.jsonl's records (a line torn by a kill is left out)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def logged_steps(path: Path) -> list[int]:
    """The steps of metrics.jsonl's training records (those with a loss), in file order."""
    return [r["step"] for r in read_records(path) if "loss" in r and not r.get("skipped")]





def curve(records: list[dict], key: str = "loss") -> dict[int, float]:
    """step -> value of the training records, the last record of a step winning."""
    return {r["step"]: r[key] for r in records if key in r and not r.get("skipped")}


def max_rel_diff(a: dict[int, float], b: dict[int, float], after: int = 0) -> dict:
    """The largest |a - b| / |b| over the steps both logged after `after`."""
    steps = sorted(s for s in a if s in b and s > after)
    diffs = [abs(a[s] - b[s]) / abs(b[s]) if b[s] else float("inf") for s in steps]
    return {"max": max(diffs) if diffs else None, "steps": steps, "values": diffs}


def expected_log_steps(steps: int, log_every: int) -> list[int]:
    return sorted({*range(log_every, steps + 1, log_every), steps})


def train_figures(run: Run, steps: int, log_every: int) -> dict:
    """Figures of a `flantune train` run from its metrics.jsonl and result.json."""
    out = Path(run.folder)
    records = read_records(out / "metrics.jsonl")
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    skip = steady_start(steps, log_every)
    losses = curve(records)
    return {
        "tokens_per_s": steady_rate(log_windows(records), skip), "counted_from_step": skip + 1,
        "first_step_s": result.get("first_step_s"), "startup": result.get("startup"),
        "peak_memory_gib": result.get("peak_memory_gib"),
        "peak_memory_gib_per_process": result.get("peak_memory_gib_per_process"),
        "speed": (result.get("speed") or {}).get("line"), "steps": result.get("steps"),
        "seconds_in_train": result.get("seconds"), "final_loss": result.get("train_loss"),
        "loss": {"steps": list(losses), "values": list(losses.values())},
        "finite": bool(losses) and all(math.isfinite(v) for v in losses.values()),
    }  # fmt: skip


def rl_figures(run: Run, steps: int) -> dict:
    """Figures of a `flantune rl` run from its rl/metrics.jsonl and rl/result.json."""
    out = Path(run.folder)
    records = [r for r in read_records(out / "metrics.jsonl") if "prompts_per_s" in r]
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    skip = math.ceil(steps / 5) if steps > 1 else 0
    counted = [r for r in records if r["step"] > skip]
    prompts = sum(r["prompts_per_s"] * r["step_seconds"] for r in counted)
    seconds = sum(r["step_seconds"] for r in counted)
    shares = []  # the distinct splits of a step's prompts over the processes, in order of appearance
    for r in records:
        if r.get("prompts_per_process") not in shares:
            shares.append(r.get("prompts_per_process"))
    rewards = curve(records, "reward")
    return {
        "prompts_per_s": prompts / seconds if seconds else None, "counted_from_step": skip + 1,
        "completions_per_s": (sum(r["completions_per_s"] * r["step_seconds"] for r in counted) / seconds
                              if seconds else None),
        "reward": {"steps": list(rewards), "values": list(rewards.values())},
        "loss": [r.get("loss") for r in records], "kl": [r.get("kl") for r in records],
        "completion_tokens": [r.get("completion_tokens") for r in records],
        "prompts_per_process": shares,
        "generate_seconds": [r.get("generate_seconds") for r in records],
        "steps": result.get("steps"), "seconds_in_rl": result.get("seconds"),
        "processes": result.get("processes"),
        "finite": bool(rewards) and all(math.isfinite(r["loss"]) for r in records),
    }  # fmt: skip


def tidy(run: Run, keep: bool) -> None:
    """Delete what a read run left that is large (checkpoints/, final/; gigabytes for large models)."""
    if keep:
        return
    for name in ("checkpoints", "final"):
        shutil.rmtree(Path(run.folder) / name, ignore_errors=True)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def number(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


# ---- the modes ----------------------------------------------------------------------------------------


def ddp_or_fsdp(bench: Bench, s: Setting, cell: str, runs: list[str], fsdp: bool) -> dict:
    """One cell of --mode ddp or fsdp: one process, several, and the resume check."""
    tag = cell.replace("/", "-")
    schedule = "constant" if fsdp else "linear"
    figures = {"cell": cell, "steps": s.steps, "batch": s.batch, "processes": s.processes,
               "log_every": s.log_every, "schedule": schedule, "runs": {}}  # fmt: skip

    def train(name: str, processes: int, folder: Path, extra: tuple[str, ...] = (), kill: dict | None = None,
              **overrides) -> Run:  # fmt: skip
        setting = Setting(**{**asdict(s), "processes": processes})
        recipe = train_recipe(setting, folder, schedule, **overrides)
        run = bench.launch("train", recipe, f"{tag}-{name}", processes, fsdp=fsdp and processes > 1,
                           extra=extra, kill=kill)  # fmt: skip
        if run.status == "ok":
            run.figures |= train_figures(run, s.steps, s.log_every)
        figures["runs"][name] = run.name
        return run

    one = multi = None
    if "one" in runs:
        # FSDP runs unpacked: the one-process run takes the same path without FSDP.
        one = train("one", 1, bench.work / f"{tag}-one", **({"packing": False} if fsdp else {}))
        tidy(one, bench.args.keep)
    if "multi" in runs:
        multi = train("multi", s.processes, bench.work / f"{tag}-multi")
        tidy(multi, bench.args.keep)
    if one is not None and multi is not None:
        a, b = one.figures, multi.figures
        figures["tokens_ratio"] = ratio(b.get("tokens_per_s"), a.get("tokens_per_s"))
        if a.get("loss") and b.get("loss"):
            figures["loss_max_rel_diff"] = max_rel_diff(
                dict(zip(*b["loss"].values(), strict=True)), dict(zip(*a["loss"].values(), strict=True))
            )["max"]
        if fsdp:
            figures["one_fits"] = one.status != "does not fit"
    if "resume" in runs:
        # Two more runs of about the multi run's length: not started when they cannot end in time.
        needed = 2 * (multi.wall_s or 0) if multi is not None else 0
        if multi is None or multi.status != "ok":
            figures["resume"] = {
                "made": False,
                "why": f"the uninterrupted multi run it compares against: {multi.status if multi else 'not asked'}",
            }
        elif bench.left() < needed:
            figures["resume"] = {"made": False, "why": f"not run: time limit (about {needed:.0f} s needed, "
                                                       f"{bench.left():.0f} s left)"}  # fmt: skip
        else:
            figures["resume"] = (fsdp_resume if fsdp else ddp_resume)(bench, s, tag, train, multi)
    return figures


def ddp_resume(bench: Bench, s: Setting, tag: str, train, multi: Run) -> dict:
    """The multi run again with checkpoints, SIGKILLed after its first, then resumed."""
    save_every = max(s.log_every, s.steps // 4 // s.log_every * s.log_every)
    folder = bench.work / f"{tag}-resume"
    fraction = random.Random(bench.args.seed).random()
    f = multi.figures
    # The uninterrupted run's time per step after its first (compilation is in the first).
    loop = (f["seconds_in_train"] - (f["first_step_s"] - f["startup"]["setup_s"])
            if f.get("seconds_in_train") and f.get("first_step_s") and (f.get("startup") or {}).get("setup_s")
            else None)  # fmt: skip
    per_step = loop / (s.steps - 1) if loop and loop > 0 else None
    killed = train("killed", s.processes, folder, kill={"fraction": fraction, "per_step_s": per_step},
                   save_every=save_every)  # fmt: skip
    check = {"save_every": save_every, "kill_fraction": fraction, "per_step_s": per_step,
             "kill": killed.figures.get("kill")}  # fmt: skip
    if killed.status != "killed on purpose":
        check["made"] = False
        check["why"] = (
            f"the run to kill ended as {killed.status!r}: {(killed.figures.get('kill') or {}).get('why')}"
        )
        return check
    resumed = train("resumed", s.processes, folder, extra=("--resume",), save_every=save_every)
    tidy(resumed, bench.args.keep)
    return check | resume_check(resumed, multi, s)


def fsdp_resume(bench: Bench, s: Setting, tag: str, train, multi: Run) -> dict:
    """FSDP stopped by train.max_steps=K (a checkpoint at K), then resumed to --steps."""
    stop = max(s.log_every, s.steps // 2 // s.log_every * s.log_every)
    folder = bench.work / f"{tag}-resume"
    stopped = train("stopped", s.processes, folder, extra=(f"train.max_steps={stop}",))
    check = {"stopped_at": stop}
    if stopped.status != "ok":
        return check | {"made": False, "why": f"the run to stop at step {stop} ended as {stopped.status!r}"}
    if not bench.args.keep:  # the resume needs the checkpoint, not final/ (a full model's size)
        shutil.rmtree(Path(stopped.folder) / "final", ignore_errors=True)
    resumed = train("resumed", s.processes, folder, extra=("--resume", f"train.max_steps={s.steps}"))
    tidy(resumed, bench.args.keep)
    return check | resume_check(resumed, multi, s)


def resume_check(resumed: Run, multi: Run, s: Setting) -> dict:
    """The resumed run's losses against the uninterrupted run after its resume point, and whether
    its metrics.jsonl logs each window once."""
    if resumed.status != "ok":
        return {"made": False, "why": f"the resumed run ended as {resumed.status!r}"}
    records = read_records(Path(resumed.folder) / "metrics.jsonl")
    points = [r["step"] for r in records if "resumed_from" in r]
    at = points[-1] if points else None
    logged = logged_steps(Path(resumed.folder) / "metrics.jsonl")
    expected = expected_log_steps(s.steps, s.log_every)
    after = max_rel_diff(
        curve(records), curve(read_records(Path(multi.folder) / "metrics.jsonl")), after=at or 0
    )
    before = max_rel_diff(curve(records), curve(read_records(Path(multi.folder) / "metrics.jsonl")))
    return {
        "made": at is not None, "resumed_from_step": at,
        "loss_max_rel_diff_after_resume": after["max"], "steps_compared": after["steps"],
        "rel_diff_after_resume": after["values"], "loss_max_rel_diff_all_steps": before["max"],
        "logged_steps": logged, "log_continues": logged == expected,
        "log_gaps": sorted(set(expected) - set(logged)),
        "log_duplicates": sorted({x for x in logged if logged.count(x) > 1}),
    }  # fmt: skip


def rl_cell(bench: Bench, s: Setting, cell: str, runs: list[str]) -> dict:
    """One cell of --mode rl: `flantune rl` in one process and in several, the same prompts a step."""
    tag = cell.replace("/", "-")
    args = bench.args
    figures = {"cell": cell, "steps": s.steps, "prompts_per_step": args.rl_prompts, "group_size": args.rl_group,
               "max_new_tokens": args.rl_new_tokens, "processes": s.processes, "runs": {}}  # fmt: skip
    done = {}
    for name, processes in (("one", 1), ("multi", s.processes)):
        if name not in runs:
            continue
        recipe = rl_recipe(
            s, bench.work / f"{tag}-{name}", args.rl_prompts, args.rl_group, args.rl_new_tokens
        )
        run = bench.launch("rl", recipe, f"{tag}-{name}", processes)
        if run.status == "ok":
            run.figures |= rl_figures(run, s.steps)
        tidy(run, args.keep)
        figures["runs"][name] = run.name
        done[name] = run
    if "one" in done and "multi" in done:
        a, b = done["one"].figures, done["multi"].figures
        figures["prompts_ratio"] = ratio(b.get("prompts_per_s"), a.get("prompts_per_s"))
        if a.get("reward") and b.get("reward"):
            ra, rb = (dict(zip(*x["reward"].values(), strict=True)) for x in (a, b))
            both = [k for k in ra if k in rb]
            figures["reward_max_abs_diff"] = max((abs(ra[k] - rb[k]) for k in both), default=None)
    return figures


def show(mode: str, cell: dict, runs: dict[str, Run], processes: int) -> None:
    """The cell's figures as a few printed lines."""
    named = {k: runs[v] for k, v in cell["runs"].items()}
    lines = [f"{cell['cell']} ({mode}, {processes} processes):"]
    rate, unit = ("prompts_per_s", "prompts/s") if mode == "rl" else ("tokens_per_s", "real tokens/s")
    for key, run in named.items():
        f = run.figures
        line = f"  {key:8s} {run.status:18s} {number(f.get(rate), ',.1f' if mode == 'rl' else ',.0f')} {unit}, " \
               f"wall {number(run.wall_s, '.1f')} s"  # fmt: skip
        if mode == "rl":
            line += f", prompts per process {f.get('prompts_per_process')}"
        else:
            peaks = f.get("peak_memory_gib_per_process")
            line += (f", first step {number(f.get('first_step_s'), '.1f')} s, peak {number(f.get('peak_memory_gib'), '.2f')} GiB"
                     + (f" (per process {peaks})" if peaks else "") + (f"; {f['speed']}" if f.get("speed") else ""))  # fmt: skip
        lines.append(line)
    target = TARGETS[mode] if processes == 2 else None
    key = "prompts_ratio" if mode == "rl" else "tokens_ratio"
    if cell.get(key) is not None:
        verdict = f" (target >= {target}: {'met' if cell[key] >= target else 'NOT met'})" if target else ""
        lines.append(f"  multi / one: {cell[key]:.3f}x{verdict}; per process {cell[key] / processes:.3f}")
    if cell.get("loss_max_rel_diff") is not None:
        lines.append(
            f"  loss curves, largest relative difference multi vs one: {cell['loss_max_rel_diff']:.4f}"
        )
    if cell.get("reward_max_abs_diff") is not None:
        lines.append(f"  reward curves, largest difference multi vs one: {cell['reward_max_abs_diff']:.4f}")
    if "one_fits" in cell and not cell["one_fits"]:
        lines.append("  one process: does not fit (out of memory)")
    check = cell.get("resume")
    if check:
        if check.get("made"):
            lines.append(
                f"  resume from step {check['resumed_from_step']}: largest relative loss difference after it "
                f"{number(check['loss_max_rel_diff_after_resume'], '.2e')}; log continues without gaps or "
                f"duplicates: {check['log_continues']}"
            )  # fmt: skip
        else:
            lines.append(f"  resume check not made: {check.get('why')}")
    print("\n".join(lines), flush=True)


def gpus() -> list[str]:
    """The GPUs' names and memory (nvidia-smi: this process never starts CUDA itself)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", required=True, choices=("ddp", "fsdp", "rl"))
    parser.add_argument("--out", default="multi_gpu.json", help="JSON file with every run and figure")
    parser.add_argument("--shared", default=str(SHARED), help="folder holding assets/ and data/sciq/")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: gloo processes on a tiny model, to check the orchestration")  # fmt: skip
    parser.add_argument(
        "--cells", default=None, help="comma-separated model/method (a folder of assets/ or tiny)"
    )
    parser.add_argument("--processes", type=int, default=2, help="processes of the multi runs (2, 4, 8)")
    parser.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (train: 100; rl: 30; cpu: 12 / 4)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="examples per optimizer step, all processes (32; cpu 8)"
    )
    parser.add_argument(
        "--runs", default=None, help="comma-separated: one, multi, resume (rl: one, multi); default all"
    )
    parser.add_argument(
        "--rl-prompts", type=int, default=None, help="rl: prompts a step, all processes (16; cpu 4)"
    )
    parser.add_argument("--rl-group", type=int, default=None, help="rl: completions per prompt (8; cpu 2)")
    parser.add_argument("--rl-new-tokens", type=int, default=None, help="rl: most new tokens (96; cpu 8)")
    parser.add_argument(
        "--time-limit", type=float, default=540, help="seconds from start; later runs are not started"
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the moment of the resume check's kill")
    parser.add_argument("--work", default=None, help="folder for the runs (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep every run's checkpoints/ and final/")
    args = parser.parse_args()

    cpu = args.device == "cpu"
    mode = args.mode
    cells = args.cells.split(",") if args.cells else (CPU_CELLS if cpu else DEFAULT_CELLS)[mode]
    cells = [c.strip() for c in cells if c.strip()]
    runs = [r.strip() for r in args.runs.split(",")] if args.runs else list(RUNS[mode])
    shared = Path(args.shared).resolve()
    if unknown := [r for r in runs if r not in RUNS[mode]]:
        parser.error(f"--runs: {', '.join(unknown)} is not a run of --mode {mode} ({', '.join(RUNS[mode])})")
    if "resume" in runs and "multi" not in runs:
        runs.insert(runs.index("resume"), "multi")  # the resume check compares against it
        print("--runs: resume compares against the multi run: multi added", flush=True)
    bad = [c for c in cells if c.count("/") != 1 or c.split("/")[1] not in ("lora", "full")
           or (c.split("/")[0] != "tiny" and not (shared / "assets" / c.split("/")[0]).is_dir())]  # fmt: skip
    if bad:
        parser.error(f"--cells: {', '.join(bad)}: expected MODEL/lora or MODEL/full, MODEL a folder of "
                     f"{shared / 'assets'} or tiny")  # fmt: skip
    if args.processes < 2:
        parser.error("--processes: at least 2 (the multi runs are compared with one process)")
    data = shared / "data" / "sciq" / "valid.json"
    if not data.exists():
        parser.error(f"--shared: {data} is missing (the SciQ rows); give the folder holding data/sciq/")
    steps = args.steps or {"rl": 4 if cpu else 30}.get(mode, 12 if cpu else 100)
    batch = args.batch or (8 if cpu else 32)
    if batch % args.processes:
        parser.error(f"--batch {batch}: must divide by --processes {args.processes} (the same global batch)")
    rl_defaults = (4, 2, 8) if cpu else (16, 8, 96)
    args.rl_prompts, args.rl_group, args.rl_new_tokens = (
        given or default for given, default in zip((args.rl_prompts, args.rl_group, args.rl_new_tokens),
                                                   rl_defaults, strict=True)
    )  # fmt: skip
    if mode == "rl" and args.rl_prompts % args.processes:
        parser.error(f"--rl-prompts {args.rl_prompts}: must divide by --processes {args.processes}")
    if steps < 2:
        parser.error("--steps: at least 2")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="multi-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "inductor").mkdir(exist_ok=True)
    bench = Bench(args, work)
    result = {
        "mode": mode, "device": "cpu" if cpu else gpus(), "processes": args.processes,
        **{name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "accelerate")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "steps": steps, "batch": batch, "runs_asked": runs,
        "time_limit_s": args.time_limit, "work": str(work), "child_env": {k: bench.env.get(k) for k in NCCL_ENV},
        "cells": [], "runs": [],
    }  # fmt: skip
    if cpu and mode == "fsdp":
        # accelerate/state.py turns FSDP on only for GPU-like processes.
        result["note"] = "on CPU processes Accelerate runs an FSDP launch as DDP: nothing is sharded"
    print(json.dumps({k: v for k, v in result.items() if k not in ("cells", "runs")}), flush=True)

    def write() -> None:
        result["runs"] = [asdict(r) for r in bench.runs]
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    # A stopped benchmark stops its run too: SIGTERM becomes SystemExit (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        for cell in cells:
            model, method = cell.split("/")
            folder = tiny_model(shared, work / "tiny") if model == "tiny" else shared / "assets" / model
            setting = Setting(
                model=folder, method=method, steps=steps, batch=batch, processes=args.processes,
                data=data, rows="0:64" if cpu else None, source_tokens=(128 if cpu else 256 if mode == "rl" else 512),
                log_every=1 if mode == "rl" else log_every_for(steps),
            )  # fmt: skip
            print(f"{cell}:", flush=True)
            if mode == "rl":
                figures = rl_cell(bench, setting, cell, runs)
            else:
                figures = ddp_or_fsdp(bench, setting, cell, runs, fsdp=mode == "fsdp")
            result["cells"].append(figures)
            write()
            show(mode, figures, {r.name: r for r in bench.runs}, args.processes)
    finally:
        result["seconds"] = round(time.perf_counter() - started, 1)
        write()
    failed = [r.name for r in bench.runs if r.status in ("failed", "killed: time limit")]
    skipped = [r.name for r in bench.runs if r.status.startswith("not run")]
    print(f"written {args.out} ({result['seconds']:.0f} s); run folders and logs in {work}", flush=True)
    if skipped:
        print(f"not run (time limit): {', '.join(skipped)}", flush=True)
    if failed:
        sys.exit(
            f"failed: {', '.join(failed)} (each one's command, exit status and output tail are in {args.out})"
        )


if __name__ == "__main__":
    main()
