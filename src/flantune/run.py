"""Run machinery shared by the commands that train (`flantune train`, `flantune rl`).

Each piece has one owner here, and the commands call it rather than keep copies:

    TrainingError     the error a run stops with (flantune.errors): the message says why and what to do
    start_run         accelerator and precision, the run folder (locked, never overwriting what the
                      user made), the recipe it ran with, seeds
    StopSignals       SIGINT/SIGTERM and time-interval checkpoints
    build_optimizer   AdamW with decay on weight matrices only; build_scheduler, its schedule
    every_process     a number as each process has it (each GPU's own memory peak)
    MetricsLog        metrics.jsonl, cut back to the checkpoint on resume; its numbers also go to the
                      recipe's experiment trackers (report_to), through Accelerate
    StepProfiler      torch.profiler over a window of optimizer steps
    progress_bar      the rich progress bar, with the fields each command shows
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flantune import checkpoint as ckpt
from flantune.errors import RunInterrupted as RunInterrupted  # re-exported for train and rl
from flantune.errors import TrainingError  # re-exported: flantune.run.TrainingError


def model_type_of(path: str, revision: str | None = None) -> str:
    """The config's model_type (t5, mt5, bart, ...) without loading weights; a wrong model.path
    stops here, before the run folder is touched."""
    from flantune.models import model_type

    return model_type(path, revision, what="model.path")


def resolve_precision(precision: str, model_type: str, key: str = "train.precision") -> str:
    """Accelerate's mixed_precision value for a recipe's precision key (train.precision, rl.precision)."""
    if precision == "fp16" and model_type in ("t5", "mt5", "umt5"):
        raise TrainingError(
            f"{key}=fp16: T5-family activations overflow float16 (NaN losses); use bf16 (GPU) or fp32"
        )
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


# ---- the run folder -----------------------------------------------------------------------------

RUN_FILES = {"recipe.yaml", "metrics.jsonl", "checkpoints", "final", "result.json", "profile", "tensorboard"}
"""What a run writes into its folder (`--restart` deletes exactly these)."""
OTHER_COMMANDS = {"rl"}
"""Folders other commands write into a run's folder by default (RL's run; `eval-*` reports)."""
LOCK = ".lock"


def _is_run_entry(name: str) -> bool:
    return (
        name in RUN_FILES
        or name in OTHER_COMMANDS
        or name == LOCK
        or name.startswith(("eval-", ".tmp-", ".trash-"))
        or (name.startswith("recipe.resume-") and name.endswith(".yaml"))
    )


def prepare_run_dir(
    out: Path, resume: bool, restart: bool = False, section: str = "train", key: str = "output_dir"
) -> str | None:
    """Check and claim the run folder; returns a notice to print (a stale lock taken over), or None.

    What the user made is never lost: a folder holding files a run did not write is refused; a
    folder holding a run is refused unless the run is resumed or restarted; a folder another live
    process runs in is refused (its lock names the process).
    """
    flags = f"--resume ({section}.resume=true)", f"--restart ({section}.restart=true)"
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{key} {out} is a file, not a folder: give a folder for the run")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not _is_run_entry(p.name))
        if (out / "recipe.yaml").is_file() and not any(
            (out / n).exists() for n in (*RUN_FILES - {"recipe.yaml"}, LOCK)
        ):
            foreign = sorted(["recipe.yaml", *foreign])  # a recipe beside nothing a run writes: the user's
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise TrainingError(
                f"{key} {out} holds files a run did not write ({shown}); a run never writes into such a "
                f"folder: give an empty or new {key}"
            )
    holder = _read_lock(out / LOCK)
    if holder and _alive(holder):
        raise _in_use(out, holder, key)
    checkpoints = ckpt.list_checkpoints(out / "checkpoints")
    has_run = any((out / name).exists() for name in (*RUN_FILES, LOCK))
    if has_run and not (resume or restart):
        continue_hint = f"{flags[0]} continues it from its last checkpoint, " if checkpoints else ""
        raise TrainingError(
            f"{key} {out} already holds a run: {continue_hint}{flags[1]} starts it again from scratch "
            f"(deleting its checkpoints, metrics and final/), or choose another {key}"
        )
    if resume and not checkpoints:
        raise TrainingError(
            f"{section}.resume=true but {out / 'checkpoints'} holds no complete checkpoint to resume from: "
            f"{flags[1]} starts the run again from scratch"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        notice = acquire_lock(out, key)
    except PermissionError:
        raise TrainingError(f"{key} {out}: permission denied; give a folder you can write to") from None
    except OSError as e:
        raise TrainingError(f"{key} {out}: cannot write there ({e.strerror}); give another folder") from None
    if restart:
        for name in sorted(RUN_FILES):
            _remove(out / name)
    ckpt.clean_partial(out / "checkpoints")
    ckpt.clean_partial(out)
    return notice


def _remove(path: Path) -> None:
    """Delete a file or folder of a run: renamed aside first, so that a kill leaves no half folder."""
    if not path.exists():
        return
    trash = path.parent / f".trash-{path.name}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def acquire_lock(out: Path, key: str = "output_dir") -> str | None:
    """Own `out` for this process: `out/.lock` names the process and host holding it. A lock of a
    process that no longer runs (on this host) is taken over; returns the notice saying so."""
    path = out / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    notice = None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder and _alive(holder):
                raise _in_use(out, holder, key) from None
            if holder and holder["pid"] != os.getpid():
                notice = f"{out}: took over the lock of process {holder['pid']}, which no longer runs"
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        atexit.register(release_lock, out)
        return notice
    raise TrainingError(f"{key} {out}: could not take {path}; another run is starting there")


def _in_use(out: Path, holder: dict, key: str) -> TrainingError:
    return TrainingError(
        f"{key} {out} is in use by process {holder['pid']} on {holder['host']} (since "
        f"{holder.get('since', '?')}); wait for that run to end, or choose another {key}. If that "
        f"process is gone, delete {out / LOCK}"
    )


def release_lock(out: Path) -> None:
    """Give the run folder up (only this process's own lock)."""
    path = out / LOCK
    holder = _read_lock(path)
    if holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder.get("pid"), int) and "host" in holder else None
    except (OSError, ValueError, AttributeError):
        return None  # gone, empty or torn: nobody holds it


def _alive(holder: dict) -> bool:
    """Whether the lock's process runs: another host's is assumed to; this process's own earlier
    run (a failed one, in a notebook or the tests) is not."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def fresh_accelerate_state() -> None:
    """Accelerate keeps one precision and device per process and refuses an Accelerator that asks
    for others. A run in a process that already ran one (quickstart's two trainings, a notebook,
    `train` then `rl` with another precision) starts from Accelerate's defaults, as a new process
    would; the process group of a multi-process launch stays. (Accelerate's own test cases reset
    the same state between tests.)"""
    from accelerate.state import AcceleratorState, GradientState

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    AcceleratorState._reset_state(reset_partial_state=not distributed)
    GradientState._reset_state()


@dataclass
class Run:
    """What every training command starts with."""

    accelerator: object
    out: Path
    main: bool
    """This is the main process: the one that writes files and prints."""
    section: str = "train"
    """The recipe section the run reads (train, rl): error messages name its keys."""
    log: MetricsLog | None = None

    def open_log(self, resume_step: int | None, project: str, config: dict) -> MetricsLog:
        """out/metrics.jsonl, and the trackers of report_to started under `project` with the flat
        `config` (`tracker_config`); `release` closes them."""
        self.log = MetricsLog(self.out / "metrics.jsonl", self.main, resume_step, self.accelerator,
                              project=project, config=config, key=f"{self.section}.report_to")  # fmt: skip
        return self.log

    def release(self) -> None:
        """Close the log's trackers and give the run folder up (the end of the run, or its failure:
        what was logged before an interruption still reaches TensorBoard)."""
        try:
            if self.log is not None:
                self.log.close()
        finally:
            if self.main:
                release_lock(self.out)


def start_run(
    out: Path,
    *,
    resume: bool,
    recipe_text: str,
    precision: str,
    model_type: str,
    seed: int,
    restart: bool = False,
    section: str = "train",
    key: str = "output_dir",
    pin_memory: bool = False,
    report_to: list[str] | str = (),
    console=None,
) -> Run:
    """The accelerator, the run folder (checked, locked, with the resolved recipe written) and the seeds.

    One process or several (`accelerate launch`): every process calls this; only the main one
    touches the folder, and the others wait until it is ready. `report_to`: the experiment
    trackers (Accelerate's names, checked at recipe load); TensorBoard writes under out/tensorboard/.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

    fresh_accelerate_state()
    # cpu=True without CUDA: Accelerate only sets up several CPU processes (gloo) when told so.
    accelerator = Accelerator(
        mixed_precision=resolve_precision(precision, model_type, f"{section}.precision"),
        cpu=not torch.cuda.is_available(),
        # Copies from page-locked batches need not block the host (non_blocking without pinning does).
        dataloader_config=DataLoaderConfiguration(non_blocking=pin_memory),
        log_with=report_to or None,
        # Trackers that keep files locally (TensorBoard; aim's repository) keep them here, in a
        # folder of the run (`--restart` deletes it with the rest of the run).
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tensorboard")),
    )
    main = accelerator.is_main_process
    if main:
        notice = prepare_run_dir(out, resume, restart, section=section, key=key)
        if notice and console is not None:
            console.print(notice, highlight=False, markup=False)
        write_recipe(out, recipe_text, resume)
    accelerator.wait_for_everyone()
    set_seed(seed)
    return Run(accelerator=accelerator, out=out, main=main, section=section)


def write_recipe(out: Path, text: str, resume: bool) -> None:
    """recipe.yaml is the recipe the run started with, never rewritten: a resume under another
    recipe writes it beside, as recipe.resume-N.yaml (N counting the resumes that changed it)."""
    first = out / "recipe.yaml"
    if not (resume and first.exists()):
        first.write_text(text)
        return
    earlier = sorted(out.glob("recipe.resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    latest = earlier[-1] if earlier else first
    if latest.read_text() != text:
        (out / f"recipe.resume-{len(earlier) + 1}.yaml").write_text(text)


class StopSignals:
    """SIGINT/SIGTERM during a run ask it to stop: the step in progress finishes, a checkpoint is
    written, then the run ends (`RunInterrupted`). A second signal stops at once. Also says when a
    checkpoint is due by time (`save_every_minutes`), so that a kill loses bounded work.

    Under several processes every process must stop or save at the same step: `poll` agrees across
    them (one small all-reduce per step).
    """

    def __init__(self, accelerator, save_every_minutes: float | None):
        self.accelerator, self.interval = accelerator, save_every_minutes
        self.signal: str | None = None
        self.last_save = time.monotonic()
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # handlers install there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def poll(self) -> tuple[bool, bool]:
        """(stop, save due by time), the same answer on every process."""
        due = self.interval is not None and time.monotonic() - self.last_save >= 60 * self.interval
        stop = self.signal is not None
        if self.accelerator.num_processes > 1:
            flags = torch.tensor([float(stop), float(due)], device=self.accelerator.device)
            stop, due = (bool(v) for v in self.accelerator.reduce(flags, "max").tolist())
            self.signal = self.signal or ("SIGINT" if stop else None)
        return stop, due


def every_process(accelerator, value: float | None) -> list[float] | None:
    """`value` as each process has it, in process order (e.g. each GPU's own memory peak: the main
    process alone knows only its own). A collective: every process calls it, all with a number or
    all with None (returned as None)."""
    if value is None:
        return None
    if accelerator.num_processes == 1:
        return [value]
    values = accelerator.gather(torch.tensor([value], dtype=torch.float64, device=accelerator.device))
    return values.tolist()  # (processes,)


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm scales; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


def build_scheduler(schedule: str, optimizer, warmup_steps: int, total_steps: int):
    """transformers' schedule by recipe name (linear, cosine, constant with warm-up).

    Not passed through accelerator.prepare: the caller steps it exactly once per optimizer step.
    """
    from transformers import get_scheduler

    name = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


class StepProfiler:
    """train.profile_steps: torch.profiler over optimizer steps first..last, written to
    output_dir/profile/ (main process). The window opens before step `first` fetches its batches
    and closes once step `last` is done (its logging, evaluation or checkpoint included)."""

    def __init__(self, steps: list[int] | None, out: Path, enabled: bool, console=None):
        self.first, self.last = steps if steps and enabled else (None, None)
        self.out, self.prof, self.console = out, None, console

    def before_step(self, step: int) -> None:
        """`step`: the optimizer step about to run (1-based)."""
        if self.prof is None and self.first is not None and self.first <= step <= self.last:
            from torch.profiler import ProfilerActivity, profile

            cuda = torch.cuda.is_available()
            self.prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []))
            self.prof.__enter__()
            self.begin, self.started = step, time.perf_counter()

    def after_step(self, step: int, final: bool = False) -> None:
        """`step`: the last optimizer step done; `final`: the loop ended (close whatever is open)."""
        if final and self.prof is None and self.first is not None and self.console is not None:
            self.console.print(f"train.profile_steps: the run ended at step {step}, before step {self.first}; "
                               "nothing was profiled", highlight=False)  # fmt: skip
        if self.prof is None or (step < self.last and not final):
            return
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.prof.__exit__(None, None, None)
        events = self.prof.key_averages()
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / "trace.json"))
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        text = events.table(sort_by=sort, row_limit=80)
        if cuda:
            # Where the host's time goes (synchronisations, copies, launches, Python-side ops): when
            # device_busy_share is low, the GPU waited on these.
            text += "\n\nBy host time (self CPU):\n" + events.table(
                sort_by="self_cpu_time_total", row_limit=40
            )
        (self.out / "ops.txt").write_text(text)
        summary = {"steps": [self.begin, step], "wall_s": wall}
        if cuda:
            # Kernel (and copy) time summed over the window: the share of wall time the GPU had work.
            device_s = sum(e.self_device_time_total for e in events) / 1e6
            summary |= {"device_s": device_s, "device_busy_share": device_s / wall}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        self.prof, self.first = None, None  # one window per run


class MetricsLog:
    """metrics.jsonl, the run's own record: one JSON object per log step or evaluation, cut back to
    the checkpoint on resume. With trackers (report_to, set on the run's Accelerator) each record's
    numbers also go to them, at the record's step. Main process only (`enabled`)."""

    def __init__(
        self,
        path: Path,
        enabled: bool,
        resume_step: int | None,
        accelerator=None,
        project: str = "flantune",
        config: dict | None = None,
        key: str = "train.report_to",
    ):
        self.path, self.enabled, self.accelerator = path, enabled, accelerator
        if enabled and resume_step is not None and path.exists():
            # Lines after the checkpoint came from steps that the resumed run will redo; a line
            # torn by a kill in the middle of a write is dropped with them.
            kept = [line for line in path.read_text().splitlines() if _logged_step(line, resume_step)]
            path.write_text("".join(line + "\n" for line in kept))
        self.tracking = bool(enabled and accelerator is not None and accelerator.log_with)
        if self.tracking:
            # TensorBoard likewise hides what an interrupted run logged after its checkpoint: a
            # SummaryWriter with purge_step=N drops the directory's earlier events from step N on.
            # Steps continue from the checkpoint's in every tracker.
            init_kwargs = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step is not None else {}
            try:
                accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
            except Exception as e:  # a tracker's own service or login: the user's to fix, not a bug here
                names = ", ".join(str(t) for t in accelerator.log_with)
                raise TrainingError(f"{key}: {names} could not start: {type(e).__name__}: {e}") from e

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracking:
            # Trackers get the numbers; text (a resume's notices) and mappings (the speed plan) stay
            # in metrics.jsonl. The step is the x axis; the epoch is in metrics.jsonl.
            numbers = {k: v for k, v in record.items()
                       if k not in ("step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip
            if numbers:
                self.accelerator.log(numbers, step=record["step"])

    def close(self) -> None:
        """Finish the trackers (TensorBoard's events flushed, a W&B run ended), once. Not
        `accelerator.end_training()`: that also destroys the process group, which the caller may
        still use (quickstart, or a script that runs train and then rl under accelerate launch)."""
        if self.tracking:
            self.tracking = False
            for tracker in self.accelerator.trackers:
                tracker.finish()


def tracker_config(values: dict, prefix: str = "") -> dict:
    """A resolved recipe (config.recipe_to_dict) as flat scalars, for the trackers' hyperparameter
    tables: TensorBoard's hparams take no mappings or lists. Nested keys are dotted (train.lr);
    lists are JSON text (method.target_modules: '["q", "v"]')."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= tracker_config(value, name + ".")
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


def _logged_step(line: str, resume_step: int) -> bool:
    """Whether a metrics.jsonl line is whole and from a step the resumed run keeps."""
    try:
        return json.loads(line)["step"] <= resume_step
    except (json.JSONDecodeError, KeyError, TypeError):
        return False


def progress_bar(console, label: str, fields: str, disable: bool):
    """A rich progress bar: `label`, steps done of total, `fields` (a format string over the task's
    fields, e.g. "loss {task.fields[loss]:.4f}"), elapsed and remaining time."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TextColumn(fields),
        TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=disable, transient=False,
    )  # fmt: skip
