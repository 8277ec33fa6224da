"""flantune train: supervised fine-tuning of an encoder-decoder model, on Accelerate.

`train()` reads as its three parts: `setup` (run folder, model and method, data, optimizer, the
resumed state), `fit` (the loop: `train_step`, then logging, evaluation, checkpoints) and `finish`
(last evaluation and checkpoint, final/, result.json).

- The loss of an optimizer step is the mean over ALL target tokens of its micro-batches (and of
  all processes), not a mean of per-micro-batch means: with seq2seq targets of uneven length the
  latter over-weights short targets.
- One process or several (`accelerate launch`, DDP): the same code; only the main process writes.
- A checkpoint is never written from a step whose loss or gradient was not finite.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from flantune import checkpoint as ckpt
from flantune.config import Recipe, dump_recipe, recipe_to_dict
from flantune.data import MODEL_COLUMNS, load_splits, make_collator, split_summary
from flantune.final import BaseRecord, write_final
from flantune.methods import apply_method, quantization_config, trainable_line
from flantune.models import load_model_and_tokenizer
from flantune.packing import PackedLoss, apply_plan, packed_loader
from flantune.run import (
    MetricsLog,
    Run,
    RunInterrupted,
    StepProfiler,
    StopSignals,
    TrainingError,
    build_optimizer,
    build_scheduler,
    every_process,
    model_type_of,
    progress_bar,
    start_run,
    tracker_config,
)
from flantune.samplers import EpochSampler, LengthGroupedBatches
from flantune.scoring import best_metric_name, evaluate_in_run, token_loss_sum
from flantune.speed import (
    SpeedPlan,
    compile_breakdown,
    compile_seconds,
    resolve_speed,
    run_facts,
    unpacked_attention,
    use_compile_cache,
)


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
    speed: dict = field(default_factory=dict)
    """The path the run took (flantune.speed.SpeedPlan.as_dict: packed rows, attention, ...)."""
    first_step_s: float | None = None
    """Seconds from the start of the command's setup to the end of its first optimizer step:
    start-up, data, model, compilation and graph capture."""
    startup: dict = field(default_factory=dict)
    """Where first_step_s went: setup_s (run folder, model, method, data, optimizer), then the first
    step's compile_s (torch.compile, where the run compiles) and capture_s (CUDA-graph warm-up and
    recording, compilation inside it included, where the run captures)."""
    peak_memory_gib: float | None = None
    """Peak GPU memory allocated by this process (torch.cuda.max_memory_allocated), in GiB."""
    peak_memory_gib_per_process: list[float] | None = None
    """The same peak of every process, in process order (under DDP or FSDP each GPU has its own)."""
    model: object = field(default=None, repr=False)
    """The trained model in memory (unwrapped), for callers that go on using it."""


def train(recipe: Recipe, console=None) -> TrainResult:
    """Run a recipe's supervised fine-tuning; returns where the result is and its scores."""
    from rich.console import Console

    session = setup(recipe, console or Console())
    try:
        fit(session)
        return finish(session)
    finally:
        session.run.release()


# ---- the optimizer step ------------------------------------------------------------------------


@dataclass
class StepOutcome:
    loss: float
    """Mean loss per target token of the whole step (all micro-batches, all processes)."""
    grad_norm: float | None
    target_tokens: int
    """Target tokens of the step, all processes."""
    real_tokens: int
    """Source + target tokens of this process's micro-batches (no padding)."""
    finite: bool
    """False: the loss or the gradient was not finite and the weights were left as they were."""


def make_micro_step(stepped, accelerator, *, packed: bool, graphed=None) -> Callable:
    """`micro_step(batch, labels, scale)`: forward and backward of one micro-batch, its gradients
    scaled by `scale` (1 / the step's target tokens); returns its summed loss, detached.

    packed: `stepped` is a (prepared) `PackedLoss`; else the (prepared) model. graphed: a
    `flantune.graphs.CapturedStep` that replays forward and backward at once (one process).
    """

    def micro_step(batch: dict, labels: torch.Tensor, scale: float) -> torch.Tensor:
        if graphed is not None:
            return graphed({**batch, "labels": labels}, scale)
        # Packed: PackedLoss returns the summed loss itself; else the logits (B, T, V) are scored here.
        if packed:
            loss = stepped(batch, labels)
        else:
            with unpacked_attention():
                loss = token_loss_sum(stepped(**batch).logits, labels)
        # DDP averages gradients over processes; scale so the result is the token mean.
        accelerator.backward(loss * accelerator.num_processes * scale)
        return loss.detach()

    return micro_step


def train_step(
    micro_step: Callable,
    batches: list[dict],
    *,
    stepped,
    optimizer,
    scheduler,
    accelerator,
    params: list[torch.nn.Parameter],
    max_grad_norm: float | None,
    set_to_none: bool = True,
) -> StepOutcome:
    """One optimizer step over `batches` (the step's micro-batches): gradients of the mean loss per
    target token, clipped, then the optimizer and the schedule step, unless the loss or the
    gradient is not finite (the gradients are then dropped and the weights stay as they were).

    set_to_none=False keeps the gradient tensors in place (a CUDA graph writes into them).
    """
    local_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    # Every process must divide by the same count: the target tokens of the whole step.
    step_tokens = int(accelerator.reduce(torch.tensor(local_tokens, device=accelerator.device), "sum"))
    scale = 1 / max(step_tokens, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    real = 0
    for i, batch in enumerate(batches):
        labels = batch.pop("labels")
        # Gradients are all-reduced once per step, in the last micro-batch's backward.
        with nullcontext() if i == len(batches) - 1 else accelerator.no_sync(stepped):
            loss_sum += micro_step(batch, labels, scale)
        real += int(batch["attention_mask"].sum()) + int((labels != -100).sum())
    step_loss = float(accelerator.reduce(loss_sum, "sum")) * scale  # note: a sync point
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm else None
    grad_norm = None if grad_norm is None else float(grad_norm)
    finite = math.isfinite(step_loss) and (grad_norm is None or math.isfinite(grad_norm))
    if finite:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=set_to_none)
    return StepOutcome(step_loss, grad_norm, step_tokens, real, finite)


# ---- set up --------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything a training run holds between setup, fit and finish."""

    recipe: Recipe
    console: object
    run: Run
    accelerator: object
    out: Path
    main: bool
    model: torch.nn.Module
    """The model being trained (prepared: DDP-wrapped under several processes)."""
    tokenizer: object
    collator: Callable
    eval_split: object
    loader: DataLoader
    sampler: object
    stepped: object
    """What the loop calls: the prepared model, or the prepared PackedLoss on the packed path."""
    micro_step: Callable
    optimizer: object
    scheduler: object
    graphed: bool
    total_steps: int
    state: ckpt.TrainState
    log: MetricsLog
    best_name: str
    last_eval: dict[str, float] = field(default_factory=dict)
    last_eval_step: int = -1
    saved_step: int = -1
    train_loss: float | None = None
    plan: SpeedPlan | None = None
    launched: float = field(default_factory=time.perf_counter)
    """When setup began (time to the first optimizer step counts from here)."""
    first_step_s: float | None = None
    startup: dict = field(default_factory=dict)
    setup_s: float | None = None
    capture: object = None
    """The CapturedStep of a run that replays CUDA graphs (its capture time), else None."""
    logged: bool = False
    """Whether this process's run has written a log line yet."""
    started: float = field(default_factory=time.perf_counter)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def epoch_progress(self) -> float:
        return round(self.state.epoch + self.state.batches_in_epoch / max(len(self.loader), 1), 4)


def setup(recipe: Recipe, console) -> Session:
    """Run folder and accelerator, model and method, data and loader, optimizer and schedule, and
    the state to start from (a checkpoint's, with train.resume)."""
    launched = time.perf_counter()
    model_type = model_type_of(recipe.model.path, recipe.model.revision)
    # The path the run takes (packed rows, attention, compiled blocks, CUDA graphs), resolved before
    # anything is written: an explicit setting that cannot be honoured is refused here. From here on
    # the recipe holds the resolved values (recipe.yaml, checkpoints: a resume that would take
    # another path is refused as a changed recipe).
    plan = resolve_speed(recipe.train, run_facts(model_type, recipe.method.kind))
    recipe = replace(recipe, train=replace(recipe.train, **plan.recipe_values()))
    cfg = recipe.train
    if plan.compile:
        use_compile_cache()
    pin = cfg.pin_memory and torch.cuda.is_available()
    run = start_run(Path(recipe.output_dir), resume=cfg.resume, restart=cfg.restart, recipe_text=dump_recipe(recipe),
                    precision=cfg.precision, model_type=model_type, seed=cfg.seed, pin_memory=pin,
                    report_to=cfg.report_to, console=console)  # fmt: skip
    accelerator, main = run.accelerator, run.main

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
    if main:  # rows read, bad rows skipped, rows dropped or truncated for length: counts, not silence
        for split in splits.values():
            console.print(split_summary(split.report), highlight=False, markup=False)
    if "train" not in splits:
        raise TrainingError("data.train: missing required value: flantune train needs training rows")
    train_set = splits["train"].dataset.select_columns(MODEL_COLUMNS)
    # The collator builds decoder_input_ids from the labels with the base model's own shift rule.
    collator = make_collator(tokenizer, model=base)
    apply_plan(plan, base, model)
    if main:
        console.print(plan.line(), highlight=False, markup=False)
    loader, sampler = _loader(cfg, plan, train_set, collator, tokenizer, base, pin, console if main else None)

    if plan.packing:
        # The loop calls `stepped` (DDP-wrapped under several processes); `model` stays the plain
        # model for evaluation and checkpoints. CUDA graphs record compiled blocks (FlexAttention
        # outside torch.compile is a slow reference path). Under graphs every batch has one shape,
        # so the blocks compile static (dynamic=False): with torch's default, the decoder block's
        # recompile marks a dimension dynamic, and the first step compiled 45.8 s against 35.6 s
        # static (flan-t5-base LoRA, H200; docs/benchmarks.md, "Compiling static under graphs").
        options = {"dynamic": False} if plan.cuda_graph else None
        packed = PackedLoss(model, plan.attention, plan.compile, options)
        stepped, loader = accelerator.prepare(packed, loader)
        optimizer = accelerator.prepare(build_optimizer(model, cfg.lr, cfg.weight_decay))
    elif accelerator.is_fsdp2:
        # FSDP2 replaces each module's parameters by shards. transformers 5 gives T5's and BART's
        # encoder and decoder embeddings modules of their own that share `shared`'s weight: sharded
        # one by one, they would become three embeddings trained apart. One module in all three
        # places keeps one weight.
        model.set_input_embeddings(model.get_input_embeddings())
        # Prepare points the optimizer at the shards only when both are prepared together (it
        # refuses a model prepared alone).
        optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        stepped = model
    else:
        model, loader = accelerator.prepare(model, loader)
        stepped = model
        optimizer = accelerator.prepare(build_optimizer(model, cfg.lr, cfg.weight_decay))
    graphed = None
    if plan.cuda_graph:
        from flantune.graphs import CapturedStep

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        trainable = [p for p in model.parameters() if p.requires_grad]
        graphed = CapturedStep(packed.fixed_shape_loss, trainable, dtype)
    micro_step = make_micro_step(stepped, accelerator, packed=plan.packing, graphed=graphed)
    steps_per_epoch = max(1, math.ceil(len(loader) / cfg.grad_accum))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total_steps)
    scheduler = build_scheduler(cfg.schedule, optimizer, warmup, total_steps)

    notices: list[str] = []  # checkpoints skipped as broken, recipe changes allowed on resume
    state, path = ckpt.start_state(run.out / "checkpoints", cfg.resume, model, optimizer, scheduler, accelerator,
                                   notice=notices.append, recipe=recipe_to_dict(recipe), section="train")  # fmt: skip
    # Trackers file the run under its folder's name (W&B / MLflow project, TensorBoard's subfolder).
    log = run.open_log(state.step if cfg.resume else None, project=run.out.resolve().name,
                       config=tracker_config(recipe_to_dict(recipe)))  # fmt: skip
    if path and main:
        for line in [*notices, f"resumed from {path} (step {state.step}, epoch {state.epoch})"]:
            console.print(line, highlight=False, markup=False)
        log.write({"step": state.step, "resumed_from": str(path), "notices": notices})
    eval_split = splits.get("eval")
    return Session(
        recipe=recipe, console=console, run=run, accelerator=accelerator, out=run.out, main=main, model=model,
        tokenizer=tokenizer, collator=collator, eval_split=eval_split, loader=loader, sampler=sampler,
        stepped=stepped, micro_step=micro_step, optimizer=optimizer, scheduler=scheduler,
        graphed=graphed is not None, total_steps=total_steps, state=state, log=log,
        best_name=best_metric_name(cfg.best_metric, recipe, eval_split), plan=plan, launched=launched,
        setup_s=round(time.perf_counter() - launched, 3), capture=graphed,
    )  # fmt: skip


def _loader(cfg, plan: SpeedPlan, train_set, collator, tokenizer, base, pin: bool, console):
    """(loader, sampler) of the training micro-batches: packed, length-grouped or plain."""
    if plan.packing:
        loader, sampler, shape = packed_loader(
            train_set, batch_size=cfg.batch_size, token_budget=cfg.token_budget, seed=cfg.seed,
            pad_id=tokenizer.pad_token_id, decoder_start_id=base.config.decoder_start_token_id,
            block_masks=plan.attention == "flex", fixed_shape=plan.cuda_graph, pin_memory=pin,
        )  # fmt: skip
        if shape and console is not None:
            console.print(f"packed micro-batches of one shape: {shape[0]} rows of {shape[1]} source and "
                          f"{shape[2]} target tokens", highlight=False)  # fmt: skip
        return loader, sampler
    # Its own generator: starting an epoch's iterator must not draw from the global RNG, or a
    # resumed run (which starts one mid-epoch) would shift every later dropout mask.
    generator = torch.Generator().manual_seed(cfg.seed)
    if plan.group_by_length:
        lengths = [len(s) + len(t) for s, t in zip(train_set["input_ids"], train_set["labels"], strict=True)]
        sampler = LengthGroupedBatches(lengths, cfg.batch_size, cfg.seed)
        loader = DataLoader(train_set, batch_sampler=sampler, collate_fn=collator, pin_memory=pin,
                            generator=generator)  # fmt: skip
        return loader, sampler
    sampler = EpochSampler(len(train_set), cfg.seed)
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collator,
                        pin_memory=pin, generator=generator)  # fmt: skip
    return loader, sampler


# ---- the loop --------------------------------------------------------------------------------


def micro_batches(session: Session):
    """Micro-batches across epochs, tracking the data position in the state for resume."""
    state, loader, accelerator = session.state, session.loader, session.accelerator
    while True:
        session.sampler.set_epoch(state.epoch)
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


def fit(session: Session) -> None:
    """Optimizer steps until train.max_steps / epochs, or until early stopping."""
    cfg, state = session.recipe.train, session.state
    stream = micro_batches(session)
    params = [p for p in session.model.parameters() if p.requires_grad]
    window = Window()
    session.started = time.perf_counter()
    session.stepped.train()
    progress = progress_bar(session.console, "train",
                            "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[tps]:,.0f} tok/s",
                            disable=not session.main)  # fmt: skip
    task = progress.add_task("train", total=session.total_steps, completed=state.step, loss=float("nan"),
                             lr=0.0, tps=0.0)  # fmt: skip
    profiler = StepProfiler(cfg.profile_steps, session.out / "profile", session.main, session.console)
    with progress, StopSignals(session.accelerator, cfg.save_every_minutes) as signals:
        while state.step < session.total_steps:
            profiler.after_step(state.step)
            profiler.before_step(state.step + 1)
            waited = time.perf_counter()
            batches = [next(stream) for _ in range(cfg.grad_accum)]
            window.data_s += time.perf_counter() - waited  # an input-bound run shows here
            outcome = train_step(
                session.micro_step, batches, stepped=session.stepped, optimizer=session.optimizer,
                scheduler=session.scheduler, accelerator=session.accelerator, params=params,
                max_grad_norm=cfg.max_grad_norm, set_to_none=not session.graphed,
            )  # fmt: skip
            state.step += 1
            window.real += outcome.real_tokens
            if session.first_step_s is None:
                first_step(session)
            if not outcome.finite:
                skip_step(session, outcome)
                continue
            state.tokens_seen += outcome.target_tokens
            window.add(outcome)
            session.train_loss = outcome.loss
            if state.step % cfg.log_every == 0 or state.step == session.total_steps:
                record = window.record(session, outcome)
                if not session.logged:  # the run's first line also says how it runs
                    record.update(first_step_s=session.first_step_s, startup=session.startup,
                                  speed=session.plan.as_dict())  # fmt: skip
                    session.logged = True
                session.log.write(record)
                progress.update(task, loss=record["loss"], lr=record["lr"], tps=record["tokens_per_s"])
                window = Window()
            progress.update(task, completed=state.step)
            if after_step(session):
                break
            stop_or_save(session, signals)
    profiler.after_step(state.step, final=True)


@dataclass
class Window:
    """What the steps since the last log line add up to."""

    loss_sum: float = 0.0
    tokens: int = 0
    real: int = 0
    data_s: float = 0.0
    """Seconds spent waiting for micro-batches (loader and copy)."""
    start: float = field(default_factory=time.perf_counter)

    def add(self, outcome: StepOutcome) -> None:
        self.loss_sum += outcome.loss * outcome.target_tokens
        self.tokens += outcome.target_tokens

    def record(self, session: Session, outcome: StepOutcome) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        record = {
            "step": session.state.step, "epoch": session.epoch_progress(),
            "loss": self.loss_sum / max(self.tokens, 1), "lr": session.scheduler.get_last_lr()[0],
            "tokens_per_s": self.real * session.accelerator.num_processes / seconds,
            "data_wait_share": round(self.data_s / seconds, 4),
        }  # fmt: skip
        if outcome.grad_norm is not None:
            record["grad_norm"] = outcome.grad_norm
        return record


def first_step(session: Session) -> None:
    """Time to the first optimizer step (start-up, data, compilation, graph capture): said and logged."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # note: a sync point, once
    session.first_step_s = round(time.perf_counter() - session.launched, 3)
    startup = {"setup_s": session.setup_s, "first_step_s": session.first_step_s}
    parts = [f"set-up {session.setup_s:.1f} s (model, data, optimizer)"]
    if session.plan.compile:
        startup["compile_s"] = compile_seconds()
        breakdown = compile_breakdown()
        if breakdown is not None:  # in the files only: which phases of the compilation took the time
            startup["compile"] = breakdown
        if startup["compile_s"] is not None:
            parts.append(f"compilation {startup['compile_s']:.1f} s")
    if session.capture is not None and session.capture.capture_s is not None:
        startup["capture_s"] = session.capture.capture_s
        parts.append(f"graph capture {startup['capture_s']:.1f} s (its warm-up compiles)")
    session.startup = startup
    if session.main:
        session.console.print(
            f"first optimizer step after {session.first_step_s:.1f} s: {', '.join(parts)}", highlight=False
        )


def skip_step(session: Session, outcome: StepOutcome) -> None:
    """A step whose loss or gradient was not finite: stop (train.on_nan=stop) or log it and go on."""
    state = session.state
    if session.recipe.train.on_nan == "stop":
        last = ckpt.list_checkpoints(session.checkpoints)
        where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"step {state.step}: the loss is {outcome.loss} (gradient norm {outcome.grad_norm}); stopped before "
            f"updating the weights, {where}. Lower train.lr, check the data, or set train.on_nan=skip"
        )
    state.skipped_steps += 1
    session.log.write(
        {"step": state.step, "epoch": session.epoch_progress(), "skipped": True, "loss": str(outcome.loss)}
    )


def after_step(session: Session) -> bool:
    """Evaluation and checkpoints due after this step; True when early stopping ends the run."""
    cfg, state = session.recipe.train, session.state
    evaluated = False
    if session.eval_split is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
        evaluate(session)
        evaluated = True
        if state.best_step == state.step:
            save(session)
    if cfg.save_every and state.step % cfg.save_every == 0:
        save(session)
    patience = cfg.early_stopping_patience
    if evaluated and patience and state.evals_without_improvement >= patience:
        if session.main:
            session.console.print(f"early stopping at step {state.step}: {session.best_name} did not improve "
                                  f"for {patience} evaluations", highlight=False)  # fmt: skip
        return True
    return False


def evaluate(session: Session) -> None:
    """Score the eval split (flantune.scoring, as `flantune eval`) and track the best step."""
    state = session.state
    metrics = evaluate_in_run(session.model, session.tokenizer, session.eval_split, session.recipe,
                              session.collator, session.accelerator)  # fmt: skip
    value = metrics.get(session.best_name)
    if value is None:
        raise TrainingError(
            f"train.best_metric: {session.best_name} is not among the eval metrics {sorted(metrics)}"
        )
    lower_is_better = session.best_name == "eval_loss"
    if state.best_metric is None or (
        value < state.best_metric if lower_is_better else value > state.best_metric
    ):
        state.best_metric, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    session.log.write({"step": state.step, "epoch": session.epoch_progress(), **metrics})
    session.last_eval, session.last_eval_step = metrics, state.step


def stop_or_save(session: Session, signals: StopSignals) -> None:
    """A checkpoint due by time (train.save_every_minutes), or SIGINT/SIGTERM: checkpoint, then stop."""
    if session.saved_step == session.state.step:
        signals.saved()
    stop, due = signals.poll()
    if (stop or due) and session.saved_step != session.state.step:
        save(session)
        signals.saved()
    if stop:
        raise RunInterrupted(
            f"{signals.signal} after step {session.state.step}: checkpoint written to "
            f"{session.checkpoints / f'step-{session.state.step:06d}'}; continue the run with "
            "`flantune train RECIPE --resume` (train.resume=true)"
        )


def save(session: Session) -> None:
    state = session.state
    session.saved_step = state.step
    ckpt.save_checkpoint(session.checkpoints, session.model, session.optimizer, session.scheduler, state,
                         session.accelerator, recipe_text=dump_recipe(session.recipe))  # fmt: skip
    if session.main:
        keep = {state.best_step} if state.best_step is not None else set()
        ckpt.prune(session.checkpoints, session.recipe.train.keep_last, keep)


# ---- finish ----------------------------------------------------------------------------------


def finish(session: Session) -> TrainResult:
    """Last evaluation and checkpoint; final/ holds the best model as evaluated; result.json."""
    recipe, state, accelerator = session.recipe, session.state, session.accelerator
    if session.eval_split is not None and session.last_eval_step != state.step:
        evaluate(session)
    save(session)
    final_dir = session.out / "final"
    unwrapped = accelerator.unwrap_model(session.model)
    best_path = session.checkpoints / f"step-{state.best_step:06d}" if state.best_step is not None else None
    if best_path is not None and state.best_step != state.step and best_path.exists():
        ckpt.load_trainable(best_path, unwrapped)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
    result = TrainResult(
        output_dir=session.out, final_dir=final_dir, steps=state.step,
        seconds=time.perf_counter() - session.started, train_loss=session.train_loss,
        eval_metrics=dict(session.last_eval),
        best_metric=session.best_name if session.eval_split is not None else None,
        best_value=state.best_metric, best_step=state.best_step, speed=session.plan.as_dict(),
        first_step_s=session.first_step_s, startup=session.startup, model=unwrapped,
        peak_memory_gib=peak, peak_memory_gib_per_process=every_process(accelerator, peak),
    )  # fmt: skip
    # result.json and the model card in final/ carry the same numbers.
    record = {f.name: getattr(result, f.name) for f in fields(result) if f.name != "model"}
    record = json.loads(json.dumps(record, default=str))
    # FSDP2: each process holds shards of the weights; all take part in gathering them for final/.
    whole = accelerator.get_state_dict(session.model) if accelerator.is_fsdp2 else None
    if session.main:
        write_final(unwrapped, session.tokenizer, final_dir, recipe.method.kind,
                    BaseRecord.of(recipe.model, recipe.train.seed), recipe=recipe, result=record, command="train",
                    state_dict=whole)  # fmt: skip
    accelerator.wait_for_everyone()
    session.log.close()
    if session.main:
        session.console.print(summary_table(result, state))
        (session.out / "result.json").write_text(json.dumps(record, indent=2))
    return result


def summary_table(result: TrainResult, state: ckpt.TrainState):
    from rich.table import Table
    from rich.text import Text

    table = Table(title="training summary", show_header=False)
    skipped = f" ({state.skipped_steps} skipped: non-finite loss)" if state.skipped_steps else ""
    table.add_row("steps", f"{result.steps}{skipped}")
    table.add_row("time", f"{result.seconds:.1f} s")
    if result.train_loss is not None:
        table.add_row("last train loss", f"{result.train_loss:.4f}")
    for key, value in result.eval_metrics.items():
        table.add_row(key, f"{value:.4f}")
    if result.best_step is not None:
        table.add_row("best", f"{result.best_metric} = {result.best_value:.4f} at step {result.best_step}")
    table.add_row("final/", Text(str(result.final_dir)))  # a path prints verbatim, never as markup
    return table
