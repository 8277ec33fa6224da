"""Checkpoints that survive a crash: written beside their final place, then renamed into it.

A checkpoint folder `checkpoints/step-000040/` holds everything needed to resume exactly:

    trainable.safetensors   the parameters that train (the adapter, or every weight for `full`)
    optimizer.pt            optimizer state
    scheduler.pt            learning-rate schedule position
    rng-<rank>.pt           Python, NumPy and torch (CPU and CUDA) random states of each process
    state.json              step, epoch, position in the epoch, best metric, early-stopping count
    recipe.yaml             the resolved recipe the run was going by (absent in older checkpoints)

It is first written as `checkpoints/.tmp-step-000040`, each file flushed to disk, and only then
renamed: a rename within a folder is atomic, so a folder named `step-*` is always complete, and a
run killed (even with SIGKILL) in the middle of a write leaves only a `.tmp-*` folder, which the
next start removes. Old checkpoints are renamed to `.trash-*` before they are deleted, for the
same reason.

A resume reads every file of the newest checkpoint before it changes anything (`read_checkpoint`):
a checkpoint damaged after it was written (a full disk, a copy cut short, a bad sector) is skipped
with a notice naming the broken file, and the run resumes from the newest intact one
(`start_state`). A resume also checks the recipe against the checkpoint's own (`check_resume`):
changes that would make the saved weights, optimizer state, schedule or data position mean
something else are refused.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flantune.errors import TrainingError

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


def save_checkpoint(
    root: Path, model, optimizer, scheduler, state: TrainState, accelerator, recipe_text: str | None = None
) -> Path:
    """Write checkpoint `step-<state.step>` atomically; every process takes part (RNG per rank).

    `recipe_text`: the resolved recipe (flantune.config.dump_recipe), kept as recipe.yaml so that a
    resume can tell what changed since (`check_resume`)."""
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
    weights, optimizer_state = _whole_state(model, optimizer, accelerator)
    if accelerator.is_main_process:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        if recipe_text is not None:
            (tmp / "recipe.yaml").write_text(recipe_text)
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


def _whole_state(model, optimizer, accelerator) -> tuple[dict | None, dict | None]:
    """(trainable weights, optimizer state) whole, for the main process (None, None elsewhere).

    Under FSDP2 the parameters and the optimizer state are shards (DTensors) on each process:
    every process takes part in gathering them (a collective), as full state dicts on the CPU
    (torch.distributed.checkpoint); the optimizer's is keyed by parameter name, not number."""
    unwrapped = accelerator.unwrap_model(model)
    if not accelerator.is_fsdp2:
        if not accelerator.is_main_process:
            return None, None
        return trainable_state(unwrapped), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # With cpu_offload, only the main process receives the tensors (tied weights under every name).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    whole = get_model_state_dict(unwrapped, options=options)
    optimizer_state = get_optimizer_state_dict(unwrapped, optimizer.optimizer, options=options)
    if not accelerator.is_main_process:
        return None, None
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]  # trainable_state's names
    return {n: whole[n].contiguous() for n in names}, optimizer_state


REQUIRED_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "state.json")
"""The files every checkpoint has; rng-<rank>.pt and recipe.yaml are read when present."""


class BrokenCheckpoint(Exception):
    """A file a resume reads is missing or does not load; the message (one line) names it."""


@dataclass
class CheckpointFiles:
    """Everything a resume reads from one checkpoint, read once (by `read_checkpoint`)."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict
    scheduler: dict
    rng: dict | None
    """This process's random states (None: the checkpoint has no rng-<rank>.pt for it)."""
    state: TrainState


def _why(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 200 else text[:197] + "..."


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    if not file.is_file():
        raise BrokenCheckpoint(f"{file} is missing")
    try:
        return load(file)
    except Exception as e:  # truncated, zeroed, or not what it should be: the loaders raise many types
        raise BrokenCheckpoint(f"{file} is truncated or corrupt ({_why(e)})") from None


def _torch_load(file: Path) -> Any:
    return torch.load(file, weights_only=False, map_location="cpu")


def _read_state(file: Path) -> TrainState:
    raw = json.loads(file.read_text())
    names = {f.name for f in fields(TrainState)}
    if not isinstance(raw, dict):
        raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown fields {unknown}")
    if not isinstance(raw.get("step"), int) or isinstance(raw["step"], bool):
        raise ValueError(f"step must be an integer, got {raw.get('step')!r}")
    state = TrainState(**raw)
    m = STEP_DIR.match(file.parent.name)
    if m and int(m.group(1)) != state.step:
        raise ValueError(f"step {state.step} in the folder of step {int(m.group(1))}")
    return state


def _read_recipe(file: Path) -> dict:
    from flantune.config import parse_yaml

    raw = parse_yaml(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping of recipe sections, got {type(raw).__name__}")
    return raw


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    # safe_open checks the header against the file's length; reading each tensor checks the rest.
    with safe_open(file, framework="pt", device="cpu") as f:
        names = f.keys()  # (safe_open is not iterable)
        return {name: f.get_tensor(name) for name in names}


def read_checkpoint(path: Path, rank: int = 0) -> CheckpointFiles:
    """Read every file a resume of process `rank` needs from `path` (every rng-<rank>.pt present is
    read, so that all processes of a run judge a checkpoint alike); BrokenCheckpoint names the first
    file that is missing or does not load."""
    weights = _read(path / "trainable.safetensors", _read_weights)
    optimizer = _read(path / "optimizer.pt", _torch_load)
    scheduler = _read(path / "scheduler.pt", _torch_load)
    state = _read(path / "state.json", _read_state)
    rng = None
    for file in sorted(path.glob("rng-*.pt")):
        loaded = _read(file, _torch_load)
        if file.name == f"rng-{rank}.pt":
            rng = loaded
    if (path / "recipe.yaml").exists():
        _read(path / "recipe.yaml", _read_recipe)
    return CheckpointFiles(path, weights, optimizer, scheduler, rng, state)


def verify_checkpoint(path: Path) -> str | None:
    """None when every file a resume reads from `path` is present and loads, else a one-line reason
    naming the broken file. It reads them all (as a resume does; `start_state` keeps what it read
    rather than reading twice)."""
    try:
        read_checkpoint(path)
    except BrokenCheckpoint as e:
        return str(e)
    return None


def check_fits(path: Path, weights: dict[str, torch.Tensor], model) -> None:
    """TrainingError unless the checkpoint's tensors are exactly the model's trainable parameters,
    by name and shape (what save_checkpoint wrote from a model built by the same recipe)."""

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    advice = (
        "The recipe's model or method differ from the ones the checkpoint was written with (e.g. method.r, "
        "method.kind, method.target_modules, model.add_tokens); undo that change, or start the run again "
        "from scratch with --restart"
    )

    def more(names: list[str]) -> str:
        return f" (and {len(names) - 1} more)" if len(names) > 1 else ""

    missing = [n for n in params if n not in weights]
    if missing:
        raise TrainingError(
            f"{path}: the checkpoint does not fit the model: the model trains {missing[0]}{more(missing)}, "
            f"which the checkpoint lacks. {advice}"
        )
    extra = [n for n in weights if n not in params]
    if extra:
        raise TrainingError(
            f"{path}: the checkpoint does not fit the model: it holds {extra[0]}{more(extra)}, which the "
            f"model does not train. {advice}"
        )
    for name, param in params.items():  # in the model's order
        if tuple(weights[name].shape) != tuple(param.shape):
            raise TrainingError(
                f"{path}: the checkpoint does not fit the model: {name} has shape {tuple(weights[name].shape)} in "
                f"the checkpoint but {tuple(param.shape)} in the model. {advice}"
            )


def load_checkpoint(
    path: Path, model, optimizer, scheduler, accelerator, files: CheckpointFiles | None = None
) -> TrainState:
    """Restore weights, optimizer, scheduler, RNG and the train state saved in `path` (`files`: what
    read_checkpoint already read from it). BrokenCheckpoint when a file does not load, TrainingError
    when the checkpoint does not fit the model or optimizer."""

    files = files or read_checkpoint(path, accelerator.process_index)
    unwrapped = accelerator.unwrap_model(model)
    check_fits(path, files.weights, unwrapped)
    if accelerator.is_fsdp2:
        # Each process read the whole tensors and keeps its own shards of them.
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        whole = StateDictOptions(full_state_dict=True, strict=False)  # trainable weights only
        set_model_state_dict(unwrapped, files.weights, options=whole)
    else:
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in files.weights.items():
                params[name].copy_(tensor)
    try:
        if accelerator.is_fsdp2:
            set_optimizer_state_dict(unwrapped, optimizer.optimizer, files.optimizer, options=whole)
        else:
            optimizer.load_state_dict(files.optimizer)
        scheduler.load_state_dict(files.scheduler)
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainingError(
            f"{path}: the optimizer or schedule state does not fit this run ({_why(e)}): the recipe's method or "
            "optimizer settings differ from the checkpoint's; undo that change, or start the run again from "
            "scratch with --restart"
        ) from None
    if files.rng is not None:
        set_rng_state(files.rng)
    return files.state


def _set_aside(path: Path) -> Path:
    """Rename a broken checkpoint to broken-step-NNNNNN (kept to inspect; no longer a checkpoint, so a
    new save of that step is not refused and pruning does not count it)."""
    target = path.parent / f"broken-{path.name}"
    n = 1
    while target.exists():
        n += 1
        target = path.parent / f"broken-{path.name}-{n}"
    os.rename(path, target)
    return target


def start_state(
    root: Path,
    resume: bool,
    model,
    optimizer,
    scheduler,
    accelerator,
    notice: Callable[[str], None] | None = None,
    recipe: dict | None = None,
    section: str = "train",
) -> tuple[TrainState, Path | None]:
    """A fresh state, or, when resuming, the one of the newest intact checkpoint under `root`.

    Checkpoints are read newest first; one with a missing or unreadable file is skipped and set aside
    as broken-step-NNNNNN, with a notice (through `notice`, e.g. console.print on the main process)
    naming the file. TrainingError when none is intact, naming every broken file.

    `recipe` (flantune.config.recipe_to_dict of the current recipe) and `section` (`train`, `rl`):
    before anything is loaded, the recipe is checked against the chosen checkpoint's (`check_resume`:
    TrainingError on a refused change); each allowed change goes through `notice` as
    "resume: recipe changed since the checkpoint: <line>".
    """
    if not resume:
        return TrainState(), None

    found = list_checkpoints(root)
    if not found:
        raise TrainingError(f"resume: {root} holds no complete checkpoint to resume from")
    broken: list[tuple[Path, str]] = []
    files = None
    for _, path in reversed(found):
        try:
            files = read_checkpoint(path, accelerator.process_index)
            break
        except BrokenCheckpoint as e:
            broken.append((path, str(e)))
    if broken:
        # Every process read the same files and skipped the same checkpoints; the main one renames
        # them once all have read.
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for path, why in broken:
                where = _set_aside(path) if files is not None else path
                if notice is not None:
                    moved = f"; moved to {where.name}" if where != path else ""
                    notice(f"skipping checkpoint {path.name}: {why}{moved}")
        accelerator.wait_for_everyone()
    if files is None:
        reasons = "; ".join(why for _, why in broken)
        raise TrainingError(
            f"resume: no intact checkpoint under {root}: {reasons}. Start the run again from scratch with "
            "--restart, or put back intact copies of these files"
        )
    if recipe is not None:
        allowed = check_resume(files.path, recipe, section)
        if notice is not None and accelerator.is_main_process:
            for line in allowed:
                notice(f"resume: recipe changed since the checkpoint: {line}")
    return load_checkpoint(files.path, model, optimizer, scheduler, accelerator, files), files.path


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


# ---- the recipe a checkpoint was written under ---------------------------------------------
#
# On resume, each key of the recipe is compared with the checkpoint's recipe.yaml. The rule: a
# change is refused if it changes what the saved weights, optimizer state, schedule or data
# position mean; a change that only steers what happens from here on is allowed (and reported).
#
#   model.*, method.*        refused   the weights' names and shapes, and what they start from
#   data.*                   refused   the rows, their order and tokenization (sources, task,
#                                      task_options, mixture, max_*_tokens, overlong, bad_rows)
#                                      and the eval rows the best metric was measured on
#   output_dir               allowed   the run folder may move
#   eval.*, generation.*     allowed   how evaluation scores (except generation.max_new_tokens
#                                      in `rl` while rl.max_new_tokens is null: the rollouts' length)
#   other sections           ignored   (e.g. rl.* for a `train` resume)
#   <section>.resume, .restart  ignored   how the run was started, not what it is
#   <section>.tensorboard       ignored   retired: read as report_to, which is compared itself
#
# train:
#   refused  batch_size, grad_accum, seed, packing, token_budget, group_by_length   data position
#            lr, weight_decay, schedule, warmup_steps, warmup_ratio                  optimizer, schedule
#            precision, gradient_checkpointing, attention, compile, cuda_graph       numerics of the steps
#            best_metric                                                             state's best value
#   allowed  max_steps, epochs (a linear or cosine schedule then spans the new total: said in the
#            notice), eval_every, save_every, save_every_minutes, log_every, keep_last,
#            early_stopping_patience, max_grad_norm, on_nan, report_to, pin_memory, profile_steps
#
# rl (the schedule is constant after warmup_steps, so max_steps does not change it):
#   refused  start, seed, prompts_per_step, group_size, inner_steps, micro_batch_size, lr,
#            warmup_steps, weight_decay, clip_eps, beta, temperature, top_p, max_new_tokens, rewards,
#            precision, gradient_checkpointing, packing (the log-probability passes' numerics)
#   allowed  max_steps, eval_every, save_every, save_every_minutes, log_every, keep_last,
#            max_grad_norm, report_to, output_dir
#
# A key in neither list (a key added later and not yet classified) is refused. A list-valued or
# nested key (method.target_modules, rl.rewards, data.train) compares as a whole.

SHARED_SECTIONS = ("model", "method", "data")
ALLOWED_SECTIONS = ("eval", "generation")
ALLOWED_KEYS = {
    "train": {
        "max_steps", "epochs", "eval_every", "save_every", "save_every_minutes", "log_every", "keep_last",
        "early_stopping_patience", "max_grad_norm", "on_nan", "report_to", "pin_memory", "profile_steps",
    },
    "rl": {"max_steps", "eval_every", "save_every", "save_every_minutes", "log_every", "keep_last",
           "max_grad_norm", "report_to", "output_dir"},
}  # fmt: skip
REFUSED_KEYS = {
    "train": {
        "batch_size", "grad_accum", "seed", "packing", "token_budget", "group_by_length", "lr", "weight_decay",
        "schedule", "warmup_steps", "warmup_ratio", "precision", "gradient_checkpointing", "attention",
        "compile", "cuda_graph", "best_metric",
    },
    "rl": {
        "start", "seed", "prompts_per_step", "group_size", "inner_steps", "micro_batch_size", "lr",
        "warmup_steps", "weight_decay", "clip_eps", "beta", "temperature", "top_p", "max_new_tokens", "rewards",
        "precision", "gradient_checkpointing", "packing",
    },
}  # fmt: skip
IGNORED_KEYS = {"resume", "restart"}
RETIRED_KEYS = {"tensorboard"}
"""Keys of earlier versions that loading still reads (config._read_retired_keys); they show up here
only in a saved recipe that no longer validates, compared as written."""
_ABSENT = object()


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _changes(saved: dict, current: dict, prefix: str) -> list[tuple[str, str]]:
    """(dotted key, line) for each top-level key of two mappings that differs."""
    saved = saved if isinstance(saved, dict) else {}
    current = current if isinstance(current, dict) else {}
    out = []
    for key in [*saved, *(k for k in current if k not in saved)]:
        old, new = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        if old != new:
            name = f"{prefix}.{key}" if prefix else key
            out.append((name, f"{name}: {_show(old)} -> {_show(new)}"))
    return out


def _schedule_uses_total(cfg: dict) -> bool:
    """Whether train's schedule depends on the run's total steps (max_steps, or epochs)."""
    return cfg.get("schedule", "linear") != "constant" or (
        not cfg.get("warmup_steps") and (cfg.get("warmup_ratio") or 0) > 0
    )


def recipe_changes(saved: dict, current: dict, section: str) -> tuple[list[str], list[str]]:
    """(refused, allowed): lines like "train.batch_size: 8 -> 16" for each difference between the
    resolved recipe a checkpoint was written under and the current one that matters to a resume of
    `section` (`train` or `rl`); see the table above."""
    refused: list[str] = []
    allowed: list[str] = []
    for part in SHARED_SECTIONS:
        refused += [line for _, line in _changes(saved.get(part), current.get(part), part)]
    own_saved, own_current = saved.get(section) or {}, current.get(section) or {}
    for key, line in _changes(own_saved, own_current, section):
        short = key.split(".", 1)[1]
        if short in IGNORED_KEYS or short in RETIRED_KEYS:
            continue
        if section == "train" and short in ("max_steps", "epochs") and _schedule_uses_total(own_current):
            # Lengthening or shortening a run is what a resume is often for: allowed, and said.
            allowed.append(
                f"{line} (the {own_current.get('schedule', 'linear')} schedule now spans the new total)"
            )
        elif short in ALLOWED_KEYS.get(section, ()):
            allowed.append(line)
        else:
            refused.append(line)
    for part in ALLOWED_SECTIONS:
        for key, line in _changes(saved.get(part), current.get(part), part):
            rollouts = section == "rl" and key == "generation.max_new_tokens"
            if rollouts and own_current.get("max_new_tokens") is None:
                refused.append(f"{line} (rl.max_new_tokens is null: the rollouts' length)")
            else:
                allowed.append(line)
    top_saved, top_current = ({k: v for k, v in r.items() if k == "output_dir"} for r in (saved, current))
    allowed += [line for _, line in _changes(top_saved, top_current, "")]
    return refused, allowed


def _normalized(raw: dict) -> dict:
    """A saved recipe with the defaults of this version filled in (keys added since compare equal
    to their defaults); as written when it no longer validates."""
    from flantune.config import ConfigError, RecipeWarning, recipe_from_dict, recipe_to_dict

    try:
        with warnings.catch_warnings():  # a retired key in a saved recipe is not the user's to change
            warnings.simplefilter("ignore", RecipeWarning)
            return recipe_to_dict(recipe_from_dict(raw))
    except (ConfigError, TypeError, ValueError):
        return raw


def check_resume(checkpoint_path: Path, current_recipe: dict, section: str) -> list[str]:
    """TrainingError listing every refused difference between the recipe `checkpoint_path` was
    written under (its recipe.yaml) and `current_recipe` (flantune.config.recipe_to_dict); else the
    allowed differences, for the caller to print and record. A checkpoint without recipe.yaml
    (written before checkpoints kept it) passes unchecked."""

    file = checkpoint_path / "recipe.yaml"
    if not file.is_file():
        return []
    saved = _normalized(_read(file, _read_recipe))
    refused, allowed = recipe_changes(saved, current_recipe, section)
    if refused:
        raise TrainingError(
            "--resume: the recipe differs from the one the checkpoint was written under: "
            + "; ".join(refused)
            + ". Undo these changes, or start a new run in another output_dir."
        )
    return allowed
