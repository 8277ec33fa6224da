"""Checkpoints that survive a crash: written beside their final place, then renamed into it.

A checkpoint folder `checkpoints/step-000040/` holds everything needed to resume exactly:

    trainable.safetensors   the parameters that train (the adapter, or every weight for `full`)
    optimizer.pt            optimizer state
    scheduler.pt            learning-rate schedule position
    rng-<rank>.pt           Python, NumPy and torch (CPU and CUDA) random states of each process
    state.json              step, epoch, position in the epoch, best metric, early-stopping count

It is first written as `checkpoints/.tmp-step-000040`, each file flushed to disk, and only then
renamed: a rename within a folder is atomic, so a folder named `step-*` is always complete, and a
run killed (even with SIGKILL) in the middle of a write leaves only a `.tmp-*` folder, which the
next start removes. Old checkpoints are renamed to `.trash-*` before they are deleted, for the
same reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current pass over the training set."""
    batches_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (the data position)."""
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def clean_partial(root: Path) -> None:
    """Remove what an interrupted write or delete left behind."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train, by name (a parameter shared by two modules appears once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, model, optimizer, scheduler, state: TrainState, accelerator) -> Path:
    """Write checkpoint `step-<state.step>` atomically; every process takes part (RNG per rank)."""
    final = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-step-{state.step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank_file = tmp / f"rng-{accelerator.process_index}.pt"
    torch.save(rng_state(), rank_file)
    fsync_file(rank_file)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = trainable_state(accelerator.unwrap_model(model))
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        for f in tmp.iterdir():
            fsync_file(f)
        fsync_dir(tmp)
        if final.exists():  # the same step saved twice (e.g. best and periodic): keep the first
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
            fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and the train state saved in `path`."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(accelerator.unwrap_model(model).named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"{path}: the checkpoint holds parameters this model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False, map_location="cpu"))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rank_file = path / f"rng-{accelerator.process_index}.pt"
    if rank_file.exists():
        set_rng_state(torch.load(rank_file, weights_only=False))
    return TrainState(**json.loads((path / "state.json").read_text()))


def start_state(
    root: Path, resume: bool, model, optimizer, scheduler, accelerator
) -> tuple[TrainState, Path | None]:
    """A fresh state, or the one of the last complete checkpoint under `root` when resuming."""
    if not resume:
        return TrainState(), None
    _, path = list_checkpoints(root)[-1]
    return load_checkpoint(path, model, optimizer, scheduler, accelerator), path


def load_trainable(path: Path, model) -> None:
    """Only the weights of a checkpoint (to export the best one)."""
    weights = load_file(path / "trainable.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)


def prune(root: Path, keep_last: int, keep: set[int]) -> None:
    """Delete all but the newest `keep_last` checkpoints and those in `keep` (the best)."""
    found = list_checkpoints(root)
    for step, path in found[: max(0, len(found) - keep_last)]:
        if step in keep:
            continue
        trash = root / f".trash-{path.name}"
        os.rename(path, trash)  # atomic: the step folder disappears whole
        shutil.rmtree(trash, ignore_errors=True)


def atomic_dir(final: Path):
    """A context that yields a temporary folder and renames it to `final` when the block succeeds."""
    return _AtomicDir(final)


class _AtomicDir:
    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.parent / f".tmp-{final.name}"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(self.tmp)
        if self.final.exists():
            old = self.final.parent / f".trash-{self.final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
        fsync_dir(self.final.parent)
