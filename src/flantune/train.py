"""flantune train: supervised fine-tuning of an encoder-decoder model, on Accelerate.

Read top to bottom: recipe → model and method → data → optimizer and schedule → loop → final/.

- The loss of an optimizer step is the mean over ALL target tokens of its micro-batches (and of
  all processes), not a mean of per-micro-batch means: with seq2seq targets of uneven length the
  latter over-weights short targets.
- One process or several (`accelerate launch`, DDP): the same code; only the main process writes.
- A checkpoint is never written from a step whose loss or gradient was not finite.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from flantune import checkpoint as ckpt
from flantune.config import Recipe, dump_recipe
from flantune.data import MODEL_COLUMNS, load_splits, make_collator
from flantune.generate import generate_texts
from flantune.methods import apply_method, quantization_config, save_final, trainable_line
from flantune.metrics import compute_metrics
from flantune.models import load_model_and_tokenizer
from flantune.packing import EpochBatches, epoch_generator, packed_loader


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    train_loss: float | None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    best_metric: str | None = None
    best_value: float | None = None
    best_step: int | None = None
    model: object = field(default=None, repr=False)
    """The trained model in memory (unwrapped), for callers that go on using it."""


class EpochSampler(Sampler):
    """A fresh permutation each epoch, from (seed, epoch) alone, so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


class LengthGroupedBatches(EpochBatches):
    """Batches of similar lengths for unpacked runs (`train.group_by_length`), as transformers'
    `group_by_length`: the epoch's permutation is cut into megabatches of 50 batches, each sorted
    by length and cut into batches; the batches then come in random order, the one holding the
    longest example first (a run that does not fit in memory fails at its first step, not hours in)."""

    MEGA = 50

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(len(lengths), seed)
        self.lengths, self.batch_size = lengths, batch_size

    def _make(self, order: list[int], g: torch.Generator) -> list[list[int]]:
        mega = self.batch_size * self.MEGA
        out = []
        for start in range(0, len(order), mega):
            group = sorted(order[start : start + mega], key=lambda i: -self.lengths[i])
            out += [group[s : s + self.batch_size] for s in range(0, len(group), self.batch_size)]
        out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        longest = max(range(len(out)), key=lambda b: max(self.lengths[i] for i in out[b]))
        out.insert(0, out.pop(longest))
        return out


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over target tokens (labels -100 are padding)."""
    # logits (B, T, V), labels (B, T); float32 for the softmax even under bf16 autocast.
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def packing_setup(cfg, model_type: str, method_kind: str, base, model, accelerator) -> str:
    """Check train.packing/attention against the model; returns the attention path to run.

    Unpacked runs keep transformers' forward (train.attention eager/sdpa picks its backend).
    Packed flex runs freeze T5's relative bias tables (see flantune.fast_t5: their gradient through
    FlexAttention is 29x slower; they are 2 x 32 x heads pretrained numbers).
    """
    from accelerate import DistributedType

    from flantune import fast_t5
    from flantune.packing import packing_problem, resolve_attention

    if not cfg.packing:
        if cfg.attention != "auto":
            base.set_attn_implementation(cfg.attention)
        return cfg.attention
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    problem = packing_problem(model_type, method_kind, fsdp)
    if problem:
        raise TrainingError(problem)
    try:
        attention = resolve_attention(cfg.attention, torch.cuda.is_available())
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if cfg.cuda_graph:
        if attention != "flex":
            raise TrainingError(
                "train.cuda_graph: replays the packed FlexAttention step on a GPU; this run takes the "
                f"{attention} path (no CUDA device, or train.attention={cfg.attention}): set it false"
            )
        if accelerator.num_processes > 1:
            raise TrainingError(
                "train.cuda_graph: one process only (DDP's gradient all-reduce runs in hooks that a "
                "captured graph does not replay); set it false for multi-GPU runs"
            )
        if method_kind == "qlora":
            raise TrainingError(
                "train.cuda_graph: not with method.kind=qlora (bitsandbytes' quantized layers are not "
                "verified under CUDA-graph capture); set it false"
            )
    if attention == "flex":
        fast_t5.freeze_relative_bias(model)
    return attention


class PackedLoss(torch.nn.Module):
    """The model as a module whose forward is the summed target-token loss of a packed micro-batch.

    The packed path calls the model's submodules itself (flantune.fast_t5). DDP arms its gradient
    all-reduce in its own forward, so the module it wraps must be this one: were the model wrapped
    and its submodules called directly, backward would run without synchronizing gradients.
    Accelerate's autocast around forward applies here too.
    """

    def __init__(self, model, attention: str, compile: bool):
        super().__init__()
        from flantune import fast_t5

        self.model, self.attention, self.block_fn = model, attention, None
        # Accelerate reads these to leave a quantized or device-mapped model where it was loaded.
        for name in ("hf_device_map", "is_loaded_in_4bit", "is_loaded_in_8bit"):
            if getattr(model, name, None) is not None:
                setattr(self, name, getattr(model, name))
        if compile:
            # One graph per block kind (encoder, decoder); a few shapes, then dynamic: allow recompiles.
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.block_fn = torch.compile(fast_t5.t5_block)

    def forward(self, batch: dict, labels: torch.Tensor) -> torch.Tensor:
        from flantune import fast_t5

        return fast_t5.packed_loss_sum(
            self.model, {**batch, "labels": labels}, self.attention, block_fn=self.block_fn
        )

    def fixed_shape_loss(self, batch: dict) -> torch.Tensor:
        """The summed loss of a fixed-shape micro-batch (labels included) without a host sync:
        what `flantune.graphs.CapturedStep` records."""
        from flantune import fast_t5

        return fast_t5.packed_loss_sum(
            self.model, batch, self.attention, block_fn=self.block_fn, select_targets=False
        )


def resolve_precision(precision: str, model_type: str) -> str:
    """Accelerate's mixed_precision value for train.precision."""
    if precision == "fp16" and model_type in ("t5", "mt5", "umt5"):
        raise TrainingError(
            "train.precision=fp16: T5-family activations overflow float16 (NaN losses); use bf16 (GPU) or fp32"
        )
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision]


def main_key(metric: str) -> str:
    """The number that represents a metric family (ROUGE is reported as four)."""
    return "rougeL" if metric == "rouge" else metric


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


def build_optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and norm scales; fused kernels on CUDA."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused or None)


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
            # Lines after the checkpoint came from steps that the resumed run will redo.
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
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


@torch.no_grad()
def evaluate(model, tokenizer, split, recipe: Recipe, collator, accelerator) -> dict[str, float]:
    """Eval loss (token-averaged) and the task's generation metrics on the first eval.max_rows rows."""
    dataset = split.dataset
    if recipe.eval.max_rows is not None:
        dataset = dataset.select(range(min(recipe.eval.max_rows, len(dataset))))
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    device = accelerator.device
    loss_sum, tokens = 0.0, 0
    columns = dataset.select_columns(MODEL_COLUMNS)
    for start in range(0, len(columns), recipe.eval.batch_size):
        batch = collator(
            [columns[i] for i in range(start, min(start + recipe.eval.batch_size, len(columns)))]
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = unwrapped(**batch).logits
        loss_sum += token_loss_sum(logits, labels).item()
        tokens += int((labels != -100).sum())
    results = {"eval_loss": loss_sum / max(tokens, 1)}
    predictions = generate_texts(
        unwrapped, tokenizer, list(dataset["source"]), recipe.generation,
        batch_size=recipe.eval.batch_size, max_source_tokens=recipe.data.max_source_tokens, device=device,
    )  # fmt: skip
    for name, task in split.tasks.items():
        rows = [i for i, t in enumerate(list(dataset["task"])) if t == name]
        if not rows:
            continue
        scores = compute_metrics(
            recipe.eval.metrics or task.metrics,
            [predictions[i] for i in rows],
            [dataset[i]["references"] for i in rows],
            choices=[dataset[i]["choices"] for i in rows] if task.name.startswith("sciq") else None,
            labels=task.labels,
            answer_prefix=task.answer_prefix,
        )
        prefix = f"{name}/" if len(split.tasks) > 1 else ""
        results.update({f"eval_{prefix}{k}": v for k, v in scores.items()})
    unwrapped.train(was_training)
    return results


def default_best_metric(recipe: Recipe, split) -> str:
    if recipe.train.best_metric:
        return (
            recipe.train.best_metric
            if recipe.train.best_metric.startswith("eval_")
            else f"eval_{recipe.train.best_metric}"
        )
    if split is None or len(split.tasks) > 1:
        return "eval_loss"
    task = next(iter(split.tasks.values()))
    return f"eval_{main_key((recipe.eval.metrics or task.metrics)[0])}"


def train(recipe: Recipe, console=None) -> TrainResult:
    """Run a recipe's supervised fine-tuning; returns where the result is and its scores."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from rich.console import Console
    from transformers import get_scheduler

    console = console or Console()
    cfg = recipe.train
    out = Path(recipe.output_dir)

    # ---- run directory, accelerator, seeds ---------------------------------------------------
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(recipe.model.path, revision=recipe.model.revision).model_type
    pin = cfg.pin_memory and torch.cuda.is_available()
    # cpu=True without CUDA: Accelerate only sets up several CPU processes (gloo) when told so.
    accelerator = Accelerator(
        mixed_precision=resolve_precision(cfg.precision, model_type), cpu=not torch.cuda.is_available(),
        # Copies from page-locked batches need not block the host (non_blocking without pinning does).
        dataloader_config=DataLoaderConfiguration(non_blocking=pin),
    )  # fmt: skip
    main = accelerator.is_main_process
    if main:
        prepare_run_dir(out, cfg.resume)
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    # ---- model, method, data ----------------------------------------------------------------
    loaded = load_model_and_tokenizer(
        recipe.model, seed=cfg.seed, quantization_config=quantization_config(recipe.method)
    )
    base, tokenizer = loaded.model, loaded.tokenizer
    model = apply_method(
        base, recipe.method, added_token_ids=loaded.added_token_ids,
        gradient_checkpointing=cfg.gradient_checkpointing, adapter_path=recipe.model.adapter,
    )  # fmt: skip
    if main:
        console.print(trainable_line(model), highlight=False)
    splits = load_splits(recipe.data, tokenizer, roles=("train", "eval"), seed=cfg.seed)
    if "train" not in splits:
        raise TrainingError("data.train: missing required value: flantune train needs training rows")
    eval_split = splits.get("eval")
    train_set = splits["train"].dataset.select_columns(MODEL_COLUMNS)
    # The collator builds decoder_input_ids from the labels with the base model's own shift rule.
    collator = make_collator(tokenizer, model=base)
    attention = packing_setup(cfg, model_type, recipe.method.kind, base, model, accelerator)
    if cfg.packing:
        loader, sampler, shape = packed_loader(
            train_set, batch_size=cfg.batch_size, token_budget=cfg.token_budget, seed=cfg.seed,
            pad_id=tokenizer.pad_token_id, decoder_start_id=base.config.decoder_start_token_id,
            block_masks=attention == "flex", fixed_shape=cfg.cuda_graph, pin_memory=pin,
        )  # fmt: skip
        if shape and main:
            console.print(f"packed micro-batches of one shape: {shape[0]} rows of {shape[1]} source and "
                          f"{shape[2]} target tokens", highlight=False)  # fmt: skip
    elif cfg.group_by_length:
        lengths = [len(s) + len(t) for s, t in zip(train_set["input_ids"], train_set["labels"], strict=True)]
        sampler = LengthGroupedBatches(lengths, cfg.batch_size, cfg.seed)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collator, pin_memory=pin,
                            generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    else:
        sampler = EpochSampler(len(train_set), cfg.seed)
        # Its own generator: starting an epoch's iterator must not draw from the global RNG, or a
        # resumed run (which starts one mid-epoch) would shift every later dropout mask.
        loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                            pin_memory=pin, generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip

    # ---- optimizer, schedule ------------------------------------------------------------------
    if cfg.packing:
        # `stepped` is what the loop calls (DDP-wrapped when several processes run); `model` stays
        # the plain model for evaluation and checkpoints.
        # CUDA graphs record compiled blocks (FlexAttention outside torch.compile is a slow reference path).
        packed = PackedLoss(model, attention, cfg.compile or cfg.cuda_graph)
        stepped, loader = accelerator.prepare(packed, loader)
    else:
        model, loader = accelerator.prepare(model, loader)
        stepped = model
    optimizer = accelerator.prepare(build_optimizer(model, cfg.lr, cfg.weight_decay))
    graphed = None
    if cfg.cuda_graph:
        from flantune.graphs import CapturedStep

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        graphed = CapturedStep(
            packed.fixed_shape_loss, [p for p in model.parameters() if p.requires_grad], dtype
        )
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    schedule = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}[cfg.schedule]
    # Not passed through accelerator.prepare: we step it exactly once per optimizer step.
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)

    checkpoints = out / "checkpoints"
    state, path = ckpt.start_state(checkpoints, cfg.resume, model, optimizer, scheduler, accelerator)
    if path and main:
        console.print(f"resumed from {path} (step {state.step}, epoch {state.epoch})", highlight=False)
    log = MetricsLog(out / "metrics.jsonl", main, cfg.tensorboard, state.step if cfg.resume else None)
    best_name = default_best_metric(recipe, eval_split)
    last_eval_step = -1
    lower_is_better = best_name == "eval_loss"

    def micro_batches():
        """Micro-batches across epochs, tracking the data position in `state` for resume."""
        while True:
            sampler.set_epoch(state.epoch)
            skip = state.batches_in_epoch
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            # Accelerate's loader sets the sampler's epoch to its own count of passes when a pass
            # starts, and a loader made on resume (or by skip_first_batches) counts from 0: give it
            # the run's epoch, or a run resumed after its first epoch replays epoch 0's order.
            # (Both calls are needed: under DDP its set_epoch does not reach a batch sampler inside
            # its shard wrapper, which the line above sets.)
            epoch_loader.set_epoch(state.epoch)
            for batch in epoch_loader:
                state.batches_in_epoch += 1
                yield batch
            state.epoch += 1
            state.batches_in_epoch = 0

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, tokenizer, eval_split, recipe, collator, accelerator)
        value = metrics.get(best_name)
        if value is None:
            raise TrainingError(
                f"train.best_metric: {best_name} is not among the eval metrics {sorted(metrics)}"
            )
        improved = state.best_metric is None or (
            value < state.best_metric if lower_is_better else value > state.best_metric
        )
        if improved:
            state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
        else:
            state.evals_without_improvement += 1
        log.write({"step": state.step, "epoch": epoch_progress(), **metrics})
        nonlocal last_eval_step
        last_eval_step = state.step
        return metrics

    def epoch_progress() -> float:
        return round(state.epoch + state.batches_in_epoch / max(len(loader), 1), 4)

    def save() -> None:
        ckpt.save_checkpoint(checkpoints, model, optimizer, scheduler, state, accelerator)
        if main:
            keep = {state.best_step} if state.best_step is not None else set()
            ckpt.prune(checkpoints, cfg.keep_last, keep)

    # ---- the loop -----------------------------------------------------------------------------
    stream = micro_batches()
    params = [p for p in model.parameters() if p.requires_grad]
    window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
    window_data = 0.0  # seconds of the window spent waiting for micro-batches (loader and copy)
    last_eval: dict[str, float] = {}
    train_loss = None
    started = time.perf_counter()
    stepped.train()
    progress = _progress(console, disable=not main)
    task_id = progress.add_task(
        "train", total=total_steps, completed=state.step, loss=float("nan"), lr=0.0, tps=0.0
    )
    profiler = StepProfiler(cfg.profile_steps, out / "profile", main, console)
    with progress:
        while state.step < total_steps:
            profiler.after_step(state.step)
            profiler.before_step(state.step + 1)
            waited = time.perf_counter()
            batches = [next(stream) for _ in range(cfg.grad_accum)]
            window_data += time.perf_counter() - waited  # an input-bound run shows here
            local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
            # Every process must divide by the same count: the target tokens of the whole step.
            step_tokens = int(
                accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum")
            )
            loss_sum = torch.zeros((), device=accelerator.device)
            for i, batch in enumerate(batches):
                labels = batch.pop("labels")
                sync = i == len(batches) - 1
                with nullcontext() if sync else accelerator.no_sync(stepped):
                    if graphed is not None:
                        # Forward and backward replayed at once, scaled as accelerator.backward below.
                        batch_loss = graphed({**batch, "labels": labels}, 1 / max(step_tokens, 1))
                    elif cfg.packing:
                        batch_loss = stepped(batch, labels)
                    else:
                        logits = model(**batch).logits  # (B, T, V)
                        batch_loss = token_loss_sum(logits, labels)
                    if graphed is None:
                        # DDP averages gradients over processes; scale so the result is the token mean.
                        accelerator.backward(batch_loss * accelerator.num_processes / max(step_tokens, 1))
                loss_sum += batch_loss.detach()
                window_real += int(batch["attention_mask"].sum()) + int((labels != -100).sum())
            step_loss = float(accelerator.reduce(loss_sum, "sum")) / max(step_tokens, 1)  # note: a sync point
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm else None
            finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(float(grad_norm)))
            state.step += 1
            if not finite:
                optimizer.zero_grad(set_to_none=graphed is None)
                if cfg.on_nan == "stop":
                    last = ckpt.list_checkpoints(checkpoints)
                    where = (
                        f"the last good checkpoint is {last[-1][1]}"
                        if last
                        else "no checkpoint was written yet"
                    )
                    raise TrainingError(
                        f"step {state.step}: the loss is {step_loss} (gradient norm {grad_norm}); stopped before "
                        f"updating the weights, {where}. Lower train.lr, check the data, or set train.on_nan=skip"
                    )
                state.skipped_steps += 1
                log.write(
                    {"step": state.step, "epoch": epoch_progress(), "skipped": True, "loss": str(step_loss)}
                )
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=graphed is None)
            state.tokens_seen += step_tokens
            window_loss += step_loss * step_tokens
            window_tokens += step_tokens
            train_loss = step_loss

            if state.step % cfg.log_every == 0 or state.step == total_steps:
                seconds = time.perf_counter() - window_start
                record = {
                    "step": state.step,
                    "epoch": epoch_progress(),
                    "loss": window_loss / max(window_tokens, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": window_real * accelerator.num_processes / max(seconds, 1e-9),
                    "data_wait_share": round(window_data / max(seconds, 1e-9), 4),
                }
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                log.write(record)
                progress.update(task_id, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"])
                window_loss, window_tokens, window_real, window_start = 0.0, 0, 0, time.perf_counter()
                window_data = 0.0
            progress.update(task_id, completed=state.step)

            evaluated = False
            if eval_split is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                last_eval, evaluated = run_eval(), True
                if state.best_step == state.step:
                    save()
            if cfg.save_every and state.step % cfg.save_every == 0:
                save()
            if (
                evaluated
                and cfg.early_stopping_patience
                and state.evals_without_improvement >= cfg.early_stopping_patience
            ):
                if main:
                    console.print(f"early stopping at step {state.step}: {best_name} did not improve "
                                  f"for {cfg.early_stopping_patience} evaluations", highlight=False)  # fmt: skip
                break
    profiler.after_step(state.step, final=True)

    # ---- the end: last evaluation, last checkpoint, final/ --------------------------------------
    if eval_split is not None and last_eval_step != state.step:
        last_eval = run_eval()
    save()
    final_dir = out / "final"
    unwrapped = accelerator.unwrap_model(model)
    best_path = checkpoints / f"step-{state.best_step:06d}" if state.best_step is not None else None
    if best_path is not None and state.best_step != state.step and best_path.exists():
        ckpt.load_trainable(best_path, unwrapped)  # final/ holds the best model, as evaluated
    if main:
        with ckpt.atomic_dir(final_dir) as tmp:
            base_info = {
                "path": recipe.model.path,
                "init": recipe.model.init,
                "seed": cfg.seed,
                "revision": recipe.model.revision,
            }
            save_final(unwrapped, tokenizer, tmp, recipe.method, base_info)
    accelerator.wait_for_everyone()
    log.close()
    seconds = time.perf_counter() - started
    result = TrainResult(
        output_dir=out, final_dir=final_dir, steps=state.step, seconds=seconds, train_loss=train_loss,
        eval_metrics={k: v for k, v in last_eval.items()}, best_metric=best_name if eval_split else None,
        best_value=state.best_metric, best_step=state.best_step, model=unwrapped,
    )  # fmt: skip
    if main:
        console.print(summary_table(result, state))
        record = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}
        (out / "result.json").write_text(json.dumps(record, indent=2, default=str))
    return result


def summary_table(result: TrainResult, state: ckpt.TrainState):
    from rich.table import Table

    table = Table(title="training summary", show_header=False)
    table.add_row(
        "steps",
        f"{result.steps}"
        + (f" ({state.skipped_steps} skipped: non-finite loss)" if state.skipped_steps else ""),
    )
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.train_loss is not None:
        table.add_row("last train loss", f"{result.train_loss:.4f}")
    for key, value in result.eval_metrics.items():
        table.add_row(key, f"{value:.4f}")
    if result.best_step is not None:
        table.add_row("best", f"{result.best_metric} = {result.best_value:.4f} at step {result.best_step}")
    table.add_row("final/", str(result.final_dir))
    return table


def _progress(console, disable: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=False,
    )


def remove_run(out: Path) -> None:  # used by tests and quickstart to start clean
    shutil.rmtree(out, ignore_errors=True)
