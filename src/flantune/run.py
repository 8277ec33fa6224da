"""Run machinery shared by the commands that train (`flantune train`, `flantune rl`).

Each piece has one owner here, and the commands call it rather than keep copies:

    TrainingError     the error a run stops with: the message says why and what to do
    start_run         accelerator and precision, the run folder (never overwriting a run), seeds
    build_optimizer   AdamW with decay on weight matrices only; build_scheduler, its schedule
    MetricsLog        metrics.jsonl (and a TensorBoard mirror), cut back to the checkpoint on resume
    StepProfiler      torch.profiler over a window of optimizer steps
    progress_bar      the rich progress bar, with the fields each command shows
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flantune import checkpoint as ckpt


class TrainingError(RuntimeError):
    """A run cannot start or go on; the message says why and what to do."""


def model_type_of(path: str, revision: str | None = None) -> str:
    """The config's model_type (t5, mt5, bart, ...) without loading weights."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=revision).model_type


def resolve_precision(precision: str, model_type: str, key: str = "train.precision") -> str:
    """Accelerate's mixed_precision value for a recipe's precision key (train.precision, rl.precision)."""
    if precision == "fp16" and model_type in ("t5", "mt5", "umt5"):
        raise TrainingError(
            f"{key}=fp16: T5-family activations overflow float16 (NaN losses); use bf16 (GPU) or fp32"
        )
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


def prepare_run_dir(out: Path, resume: bool, section: str = "train", key: str = "output_dir") -> None:
    """Refuse to overwrite an earlier run: what the user made is never lost."""
    has_run = (out / "metrics.jsonl").exists() or ckpt.list_checkpoints(out / "checkpoints")
    if has_run and not resume:
        raise TrainingError(
            f"{key} {out} already holds a run; set {section}.resume=true to continue it, or choose another {key}"
        )
    if resume and not ckpt.list_checkpoints(out / "checkpoints"):
        raise TrainingError(
            f"{section}.resume=true but {out / 'checkpoints'} holds no complete checkpoint to resume from"
        )
    out.mkdir(parents=True, exist_ok=True)
    ckpt.clean_partial(out / "checkpoints")
    ckpt.clean_partial(out)


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


def start_run(
    out: Path,
    *,
    resume: bool,
    recipe_text: str,
    precision: str,
    model_type: str,
    seed: int,
    section: str = "train",
    key: str = "output_dir",
    pin_memory: bool = False,
) -> Run:
    """The accelerator, the run folder (checked, with the resolved recipe written) and the seeds.

    One process or several (`accelerate launch`): every process calls this; only the main one
    touches the folder, and the others wait until it is ready.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    fresh_accelerate_state()
    # cpu=True without CUDA: Accelerate only sets up several CPU processes (gloo) when told so.
    accelerator = Accelerator(
        mixed_precision=resolve_precision(precision, model_type, f"{section}.precision"),
        cpu=not torch.cuda.is_available(),
        # Copies from page-locked batches need not block the host (non_blocking without pinning does).
        dataloader_config=DataLoaderConfiguration(non_blocking=pin_memory),
    )
    main = accelerator.is_main_process
    if main:
        prepare_run_dir(out, resume, section=section, key=key)
        (out / "recipe.yaml").write_text(recipe_text)
    accelerator.wait_for_everyone()
    set_seed(seed)
    return Run(accelerator=accelerator, out=out, main=main)


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
    """metrics.jsonl: one JSON object per log step or evaluation; optional TensorBoard mirror."""

    def __init__(self, path: Path, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.path, self.enabled, self.writer = path, enabled, None
        if enabled and resume_step is not None and path.exists():
            # Lines after the checkpoint came from steps that the resumed run will redo; a line
            # torn by a kill in the middle of a write is dropped with them.
            kept = [line for line in path.read_text().splitlines() if _logged_step(line, resume_step)]
            path.write_text("".join(line + "\n" for line in kept))
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError(
                    "train.tensorboard=true needs tensorboard: pip install 'flantune[tensorboard]'"
                ) from None
            self.writer = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
