"""flantune rl: GRPO (group relative policy optimization) for encoder-decoder models.

TRL's GRPO, RLOO and PPO trainers support causal LMs only: they concatenate prompt and completion
into one sequence. An encoder-decoder model reads the prompt with its encoder and writes the
completion with its decoder, so this loop is our own. One step:

1. Take `prompts_per_step` prompts (B) from data.train, in a resumable per-epoch order. Under
   several processes (`accelerate launch`) each process takes its own contiguous share of them.
2. Sample G = `group_size` completions per prompt (`flantune.decoding.sample_groups`: the encoder
   runs once per prompt; completion j of prompt p draws from its own random stream, so the
   completions are the same however the prompts are split between processes).
3. Score each completion with the recipe's rewards (a weighted sum); normalize the rewards within
   each group: A = (r - mean_group) / (std_group + 1e-4). A group never spans two processes.
4. Per completion token, log-probabilities under the sampling policy (old), the reference policy
   (the model RL starts from), and, with gradients, the current policy (new). No optimizer step has
   run between sampling and the first inner step, and there is no dropout, so the old values are
   the first inner step's new ones, detached (no pass of their own; TRL does the same when it takes
   one step per batch). The encoder runs once
   per prompt and its states are repeated for the group; or, with `rl.packing` (T5 family, on a
   GPU by default), on packed rows: each source once in an encoder row, its G completions side by
   side in the decoder row (`flantune.packing.pack_groups`, `flantune.fast_t5`), no padding.
5. `inner_steps` optimizer steps on the clipped objective
       loss = mean over completion tokens of  -min(ρ A, clip(ρ, 1-ε, 1+ε) A) + β KL
   with ρ = exp(new - old) and the k3 estimator KL = exp(ref - new) - (ref - new) - 1, averaged
   over all completion tokens of the step, on every process together (not per sequence first):
   one all-reduced update, equal to one process taking all the prompts.

The reference is the policy at the start of RL. With adapters (LoRA, QLoRA, IA3, prefix,
bottleneck) it is the same model with the starting adapter weights swapped in for the reference
pass: the adapters are small, so there is no second copy of the model; when RL starts with a fresh
adapter this is exactly the base with its adapters disabled. With full fine-tuning it is a frozen
copy, or nothing with `beta: 0`.

Dropout is off throughout (the model stays in eval mode): with dropout, old and new
log-probabilities of the same weights would differ and the ratio would measure noise.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flantune import checkpoint as ckpt
from flantune.config import Recipe, dump_recipe, recipe_to_dict
from flantune.data import load_splits, make_collator, split_summary
from flantune.decoding import decode, sample_groups
from flantune.final import BaseRecord, load_final, read_final, write_final
from flantune.methods import apply_method, quantization_config, trainable_line
from flantune.models import is_local, load_model_and_tokenizer
from flantune.packing import PackedModule
from flantune.rewards import build_rewards, score_all
from flantune.run import (
    RunInterrupted,
    StopSignals,
    TrainingError,
    build_optimizer,
    build_scheduler,
    model_type_of,
    progress_bar,
    start_run,
    tracker_config,
)
from flantune.samplers import EpochSampler
from flantune.scoring import best_metric_name, evaluate_in_run
from flantune.speed import RunFacts, packing_problem, run_facts, unpacked_attention, use_compile_cache

# ---- the math (unit-tested against hand-computed values) -----------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """(B*G,) rewards, grouped consecutively by prompt → (B*G,) advantages normalized per group.

    The standard deviation is the unbiased one (as in TRL's GRPO); a group whose completions all
    earn the same reward gets advantage 0 and teaches nothing.
    """
    grouped = rewards.view(-1, group_size)  # (B, G)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True)
    return ((grouped - mean) / (std + eps)).view(-1)


def kl_k3(new_logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(new ‖ ref) estimate exp(ref − new) − (ref − new) − 1: unbiased, never negative."""
    delta = ref_logprobs - new_logprobs
    return torch.exp(delta) - delta - 1


def clipped_objective(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy loss −min(ρA, clip(ρ)A) and a 0/1 mask of tokens where the clip is active.

    new/old (N, T) log-probabilities, advantages (N,) broadcast over the completion's tokens.
    """
    ratio = torch.exp(new_logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)  # (N, 1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv
    was_clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
    return -torch.minimum(unclipped, clipped), was_clipped.float()


def grpo_loss_sum(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over completion tokens (mask (N, T), 1 for real tokens) of policy loss + β KL.

    Returned as a sum so micro-batches add up; the caller divides by the batch's token count.
    """
    policy, was_clipped = clipped_objective(new_logprobs, old_logprobs, advantages, clip_eps)
    per_token = policy
    stats = {"clip_sum": float((was_clipped * mask).sum())}
    if ref_logprobs is not None and beta > 0:
        kl = kl_k3(new_logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        stats["kl_sum"] = float((kl.detach() * mask).sum())
    return (per_token * mask).sum(), stats


def completion_logprobs(model, encoder_states, encoder_mask, decoder_ids, group_size: int) -> torch.Tensor:
    """Log-probabilities of each completion token under `model`: (N, T-1) for decoder_ids (N, T).

    decoder_ids start with the decoder start token (as generate returns them); encoder_states
    (B, S, d) come from one encoder pass per prompt and are repeated for its G completions.
    """
    from transformers.modeling_outputs import BaseModelOutput

    states = encoder_states.repeat_interleave(group_size, dim=0)  # (B*G, S, d)
    mask = encoder_mask.repeat_interleave(group_size, dim=0)  # (B*G, S)
    inputs, targets = decoder_ids[:, :-1], decoder_ids[:, 1:]  # (N, T-1) each
    logits = model(
        encoder_outputs=BaseModelOutput(last_hidden_state=states), attention_mask=mask,
        decoder_input_ids=inputs, use_cache=False,
    ).logits  # (N, T-1, V)  # fmt: skip
    return token_logprobs(logits, targets)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per token: logits (..., V), targets (...) -> (...).

    In float32 at least: the ratio exp(new - old) amplifies bf16 rounding otherwise (float64 stays).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def packed_logprobs(model, batch: dict, attention: str = "eager", block_fn=None) -> torch.Tensor:
    """(K,) log-probabilities of the completion tokens of a `packing.pack_groups` batch, in its
    token_at order (completion by completion). `block_fn`: an optional compiled `fast_t5.t5_block`."""
    from flantune import fast_t5

    hidden = fast_t5.decoder_hidden(model, batch, attention, block_fn=block_fn)  # (R, Ld, d)
    hidden = hidden.flatten(0, 1)[batch["token_at"]]  # (K, d): completion tokens only
    targets = batch["labels"].flatten()[batch["token_at"]]  # (K,)
    logits = fast_t5.t5_model(model).lm_head(hidden)  # (K, V)
    return token_logprobs(logits, targets)


def to_grid(values: torch.Tensor, batch: dict, rows: int, width: int) -> torch.Tensor:
    """(rows, width): the (K,) per-token `values` of a `pack_groups` batch at their completion
    positions (where completion_mask is 1), 0 elsewhere; differentiable in `values`."""
    return values.new_zeros(rows * width).index_put((batch["grid_at"],), values).view(rows, width)


class PackedLogprobs(PackedModule):
    """The policy as a module whose forward is `packed_logprobs` of a packed batch (DDP wraps this
    module: see flantune.packing.PackedModule)."""

    def forward(self, batch: dict) -> torch.Tensor:
        return packed_logprobs(self.model, batch, self.attention, self.block_fn)


def packed_attention(packing: bool | str, facts: RunFacts) -> str | None:
    """The attention of the packed log-probability passes that `rl.packing` asks for under
    `facts` (flex on a GPU, eager on a CPU), or None for the unpacked path. auto packs on a GPU
    where `flantune.speed.packing_problem` finds nothing; true where it finds something is an error."""
    if packing is False:
        return None
    problem = packing_problem(facts)
    if packing is True:
        if problem:
            raise TrainingError(
                f"rl.packing=true: the packed path cannot run here: {problem}; set rl.packing=false"
            )
        return "flex" if facts.cuda else "eager"
    return "flex" if facts.cuda and problem is None else None


def completion_mask(decoder_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, T-1) 1 for completion tokens up to and including the first EOS, 0 for the padding after."""
    targets = decoder_ids[:, 1:]
    is_eos = (targets == eos_id).int()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).float()


# ---- the policy, its reference, the step ---------------------------------------------------------


class Reference:
    """The policy RL starts from, for the KL term.

    Adapter methods: a copy of the starting trainable (adapter) weights, swapped in for the
    reference pass and back out afterwards. Full fine-tuning: a frozen copy of the whole model.
    """

    def __init__(self, model, full: bool):
        self.frozen = None
        self.params: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if full:
            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)
        else:
            self.params = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def weights(self, model):
        """Inside the block, `model` computes the reference policy (full: the frozen copy)."""
        if self.frozen is not None:
            yield self.frozen
            return
        current = [p.detach().clone() for p, _ in self.params]
        with torch.no_grad():
            for p, start in self.params:
                p.copy_(start)
        try:
            yield model
        finally:
            with torch.no_grad():
                for (p, _), saved in zip(self.params, current, strict=True):
                    p.copy_(saved)


@dataclass
class RLResult:
    output_dir: Path
    final_dir: Path
    steps: int
    seconds: float
    eval_metrics: dict[str, float] = field(default_factory=dict)
    model: object = field(default=None, repr=False)


def resolve_start(recipe: Recipe) -> str | None:
    """rl.start, else the SFT run's final/ when there is one, else None (the base, fresh method)."""
    if recipe.rl.start:
        if is_local(recipe.rl.start) and not Path(recipe.rl.start).exists():
            raise TrainingError(
                f"rl.start: {recipe.rl.start} does not exist (give an SFT run's final/, a model folder or a hub id)"
            )
        return recipe.rl.start
    final = Path(recipe.output_dir) / "final"
    return str(final) if final.is_dir() else None


def load_policy(recipe: Recipe):
    """(model, tokenizer, method kind, base record) of the policy: RL's starting point, trainable.

    A final/ folder continues with the method it was trained with (flantune.final); without one,
    the recipe's model gets a fresh recipe method.
    """
    cfg = recipe.rl
    start = resolve_start(recipe)
    if start is not None:
        loaded = load_final(start, trainable=True, method=recipe.method, dtype=recipe.model.dtype,
                            gradient_checkpointing=cfg.gradient_checkpointing, what="rl.start")  # fmt: skip
        return loaded.model, loaded.tokenizer, loaded.method, loaded.base
    loaded = load_model_and_tokenizer(
        recipe.model, seed=cfg.seed, quantization_config=quantization_config(recipe.method)
    )
    model = apply_method(loaded.model, recipe.method, added_token_ids=loaded.added_token_ids,
                         gradient_checkpointing=cfg.gradient_checkpointing)  # fmt: skip
    return model, loaded.tokenizer, recipe.method.kind, BaseRecord.of(recipe.model, cfg.seed)


def run_rl(recipe: Recipe, console=None) -> RLResult:
    """GRPO from the recipe's starting model; writes rl.output_dir like a training run."""
    from rich.console import Console

    console = console or Console()
    cfg = recipe.rl
    out = Path(cfg.output_dir or Path(recipe.output_dir) / "rl")
    # How Accelerate itself tells an FSDP launch (accelerate launch --use_fsdp sets it). Refused
    # before the run folder is touched: sampling, the reference policy and the log-probability
    # passes each need the whole policy in every process, which FSDP shards.
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise TrainingError(
            "flantune rl runs in one process or under DDP (`accelerate launch --multi_gpu`), not FSDP: "
            "each process samples with the whole policy; launch it without --use_fsdp"
        )
    if cfg.packing is True:
        # Refused before the run folder is touched, from what the recipe and rl.start say; grpo_run
        # decides again on the loaded policy.
        start = resolve_start(recipe)
        info = read_final(start) if start else None
        path = str(info.folder) if info is not None and info.kind == "full" else recipe.model.path
        packed_attention(True, run_facts(model_type_of(path, recipe.model.revision),
                                         info.method if info is not None else recipe.method.kind))  # fmt: skip
    run = start_run(out, resume=cfg.resume, restart=cfg.restart, recipe_text=dump_recipe(recipe),
                    precision=cfg.precision, model_type=model_type_of(recipe.model.path, recipe.model.revision),
                    seed=cfg.seed, section="rl", key="rl.output_dir", report_to=cfg.report_to,
                    console=console)  # fmt: skip
    try:
        return grpo_run(recipe, run, console)
    finally:
        run.release()


def grpo_run(recipe: Recipe, run, console) -> RLResult:
    """The RL run in its claimed folder: policy, data, rewards, the GRPO steps, final/."""
    cfg, out = recipe.rl, run.out
    accelerator, main = run.accelerator, run.main
    if cfg.prompts_per_step < accelerator.num_processes:
        raise TrainingError(
            f"rl.prompts_per_step={cfg.prompts_per_step}: each of the {accelerator.num_processes} processes "
            "needs at least one prompt a step; raise it or start fewer processes"
        )

    model, tokenizer, method_kind, base_record = load_policy(recipe)
    if main:
        console.print(trainable_line(model), highlight=False)
    splits = load_splits(recipe.data, tokenizer, roles=("train", "eval"), seed=cfg.seed)
    if main:  # rows read, bad rows skipped, rows dropped or truncated for length
        for split in splits.values():
            console.print(split_summary(split.report), highlight=False, markup=False)
    if "train" not in splits:
        raise TrainingError("data.train: flantune rl needs prompts (data.train)")
    train_split, eval_split = splits["train"], splits.get("eval")
    if len(train_split.tasks) != 1:
        raise TrainingError("data: flantune rl takes one task (a mixture's rewards would differ per task)")
    task = next(iter(train_split.tasks.values()))
    max_new_tokens = cfg.max_new_tokens or recipe.generation.max_new_tokens
    rewards = build_rewards(cfg.rewards, task, tokenizer, max_new_tokens)
    collator = make_collator(tokenizer, model=model)

    attention = packed_attention(cfg.packing, run_facts(model.config.model_type, method_kind))
    packed = None
    if attention is None:
        model = accelerator.prepare(model)
        # After prepare: the reference lives on the same device as the policy.
        unwrapped = accelerator.unwrap_model(model)
    else:
        from flantune import fast_t5

        if attention == "flex":
            # Their gradient through FlexAttention is 29x slower (flantune.fast_t5); frozen before
            # the reference and the optimizer take the trainable parameters.
            fast_t5.freeze_relative_bias(model)
            use_compile_cache()
        # DDP wraps the packed module (its forward arms the all-reduce); `model` stays the plain
        # policy for sampling, evaluation and checkpoints.
        packed = accelerator.prepare(PackedLogprobs(model, attention, compile=attention == "flex"))
        unwrapped = model
        if main:
            name = {"flex": "FlexAttention", "eager": "eager attention"}[attention]
            console.print(f"rl: log-probabilities on packed rows, {name}", highlight=False, markup=False)
    reference = Reference(unwrapped, full=method_kind == "full") if cfg.beta > 0 else None
    optimizer = accelerator.prepare(build_optimizer(model, cfg.lr, cfg.weight_decay))
    scheduler = build_scheduler("constant", optimizer, cfg.warmup_steps, cfg.max_steps * cfg.inner_steps)
    checkpoints = out / "checkpoints"
    notices: list[str] = []  # checkpoints skipped as broken, recipe changes allowed on resume
    state, path = ckpt.start_state(checkpoints, cfg.resume, model, optimizer, scheduler, accelerator,
                                   notice=notices.append, recipe=recipe_to_dict(recipe), section="rl")  # fmt: skip
    if path and main:
        for line in [*notices, f"resumed from {path} (step {state.step})"]:
            console.print(line, highlight=False, markup=False)
    # Trackers file RL runs beside their SFT run's: the project is output_dir's name with -rl.
    log = run.open_log(state.step if cfg.resume else None, project=f"{Path(recipe.output_dir).resolve().name}-rl",
                       config=tracker_config(recipe_to_dict(recipe)))  # fmt: skip
    sampler = EpochSampler(len(train_split.dataset), cfg.seed)
    unwrapped.eval()  # no dropout anywhere in RL: see the module docstring
    params = [p for p in model.parameters() if p.requires_grad]
    best_name = best_metric_name(None, recipe, eval_split) if eval_split is not None else None

    def run_eval() -> dict[str, float]:
        metrics = evaluate_in_run(model, tokenizer, eval_split, recipe, collator, accelerator)
        unwrapped.eval()
        log.write({"step": state.step, "epoch": state.epoch, **metrics})
        return metrics

    saved_step = -1

    def save() -> None:
        nonlocal saved_step
        saved_step = state.step
        ckpt.save_checkpoint(checkpoints, model, optimizer, scheduler, state, accelerator,
                             recipe_text=dump_recipe(recipe))  # fmt: skip
        if main:
            ckpt.prune(checkpoints, cfg.keep_last, set())

    progress = progress_bar(
        console, "rl", "reward {task.fields[reward]:.3f}  kl {task.fields[kl]:.4f}  "
        "{task.fields[cps]:,.1f} completions/s", disable=not main,
    )  # fmt: skip
    task_id = progress.add_task("rl", total=cfg.max_steps, completed=state.step, reward=float("nan"),
                                kl=0.0, cps=0.0)  # fmt: skip
    last_eval: dict[str, float] = {}
    started = time.perf_counter()
    with progress, StopSignals(accelerator, cfg.save_every_minutes) as signals:
        while state.step < cfg.max_steps:
            step_start = time.perf_counter()
            index = next_prompts(sampler, state, cfg.prompts_per_step)  # the step's prompts, every process
            with accelerator.split_between_processes(list(range(len(index)))) as mine:
                first, count = mine[0], len(mine)  # this process's contiguous share
            rows = [train_split.dataset[index[i]] for i in range(first, first + count)]
            try:
                stats = grpo_step(
                    model, unwrapped, reference, rows, tokenizer, rewards, optimizer, scheduler, accelerator,
                    params, cfg, seed=cfg.seed * 1_000_003 + state.step, first_prompt=first,
                    max_new_tokens=max_new_tokens, packed=packed,
                )  # fmt: skip
            except torch.cuda.OutOfMemoryError:
                raise TrainingError(
                    f"out of GPU memory in RL step {state.step + 1} ({count} prompts x {cfg.group_size} completions "
                    f"of up to {max_new_tokens} tokens on this process, rl.micro_batch_size {cfg.micro_batch_size}): "
                    "lower rl.micro_batch_size (completions per forward and backward pass), rl.prompts_per_step "
                    "or rl.max_new_tokens, or set rl.gradient_checkpointing: true"
                ) from None
            state.step += 1
            seconds = time.perf_counter() - step_start
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                record = {"step": state.step, "epoch": state.epoch, **stats, "lr": scheduler.get_last_lr()[0],
                          "prompts_per_s": len(index) / seconds,
                          "completions_per_s": len(index) * cfg.group_size / seconds, "step_seconds": seconds}  # fmt: skip
                log.write(record)
                progress.update(
                    task_id, reward=record["reward"], kl=record["kl"], cps=record["completions_per_s"]
                )
            progress.update(task_id, completed=state.step)
            if eval_split is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                last_eval = run_eval()
            if cfg.save_every and state.step % cfg.save_every == 0:
                save()
            # A checkpoint due by time (rl.save_every_minutes), or SIGINT/SIGTERM: checkpoint, then stop.
            if saved_step == state.step:
                signals.saved()
            stop, due = signals.poll()
            if (stop or due) and saved_step != state.step:
                save()
                signals.saved()
            if stop:
                raise RunInterrupted(
                    f"{signals.signal} after step {state.step}: checkpoint written to {checkpoints}; continue "
                    "the run with `flantune rl RECIPE --resume` (rl.resume=true)"
                )

    if eval_split is not None and (not cfg.eval_every or state.step % cfg.eval_every):
        last_eval = run_eval()
    save()
    final_dir = out / "final"
    if main:
        # result.json and the model card in final/ carry the same numbers.
        result = {"steps": state.step, "seconds": time.perf_counter() - started, "eval": last_eval,
                  "best_metric": best_name, "final_dir": str(final_dir),
                  "processes": accelerator.num_processes}  # fmt: skip
        write_final(unwrapped, tokenizer, final_dir, method_kind, base_record,
                    recipe=recipe, result=result, command="rl")  # fmt: skip
        (out / "result.json").write_text(json.dumps(result, indent=2))
        console.print(
            f"RL done: {state.step} steps; final/ written to {final_dir}", highlight=False, markup=False
        )
    accelerator.wait_for_everyone()
    log.close()
    return RLResult(out, final_dir, state.step, time.perf_counter() - started, last_eval, unwrapped)


def next_prompts(sampler: EpochSampler, state: ckpt.TrainState, count: int) -> list[int]:
    """The next `count` row indices, continuing across epochs; the position is part of `state`."""
    chosen = []
    while len(chosen) < count:
        sampler.set_epoch(state.epoch)
        order = list(iter(sampler))
        take = order[state.batches_in_epoch : state.batches_in_epoch + count - len(chosen)]
        chosen += take
        state.batches_in_epoch += len(take)
        if state.batches_in_epoch >= len(order):
            state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    return chosen


def grpo_step(model, unwrapped, reference, rows, tokenizer, rewards, optimizer, scheduler, accelerator,
              params, cfg, *, seed: int, first_prompt: int, max_new_tokens: int,
              packed=None) -> dict[str, float]:  # fmt: skip
    """Sample, score and update on this process's prompts `rows` (numbered from `first_prompt`
    among the step's prompts); returns the step's statistics over every process.

    packed: the (prepared) `PackedLogprobs` of the policy: log-probabilities on packed rows; None:
    transformers' forward (`_logprobs`)."""
    device, G = accelerator.device, cfg.group_size
    prompts = [row["source"] for row in rows]
    enc = tokenizer.pad({"input_ids": [row["input_ids"] for row in rows]}, return_tensors="pt").to(device)

    # -- sample G completions per prompt (the encoder runs once per prompt inside generate)
    sample_start = _clock(device)
    with torch.no_grad(), accelerator.autocast():
        sequences = sample_groups(
            unwrapped, enc["input_ids"], enc["attention_mask"], group_size=G, first_row=first_prompt, seed=seed,
            max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        )  # (b*G, 1 + T): decoder start token, then the completion  # fmt: skip
    rewards_start = _clock(device)
    completions = [decode(tokenizer, ids) for ids in sequences.tolist()]
    group_rows = [row for row in rows for _ in range(G)]
    totals, components = score_all(rewards, [p for p in prompts for _ in range(G)], completions, group_rows)
    reward_t = torch.tensor(totals, device=device, dtype=torch.float32)
    advantages = group_advantages(reward_t, G)  # (b*G,)
    mask = completion_mask(sequences, tokenizer.eos_token_id)  # (b*G, T)
    # Every process divides by the completion tokens of the whole step.
    n_tokens = accelerator.reduce(mask.sum(), "sum").clamp(min=1)
    logprobs_start = _clock(device)

    # -- reference log-probabilities, no gradients (the old ones come with the first inner step)
    chunks = _chunks(len(prompts), max(1, cfg.micro_batch_size // G))
    if packed is None:

        def logprobs(module, c: int) -> torch.Tensor:  # (chunk's b*G, T)
            with unpacked_attention():  # every step brings new shapes: no cuDNN plans per shape
                return _logprobs(module, enc, sequences, *chunks[c], G)

    else:
        # Packed once per step on the CPU: the reference and new passes read the same rows.
        inner = accelerator.unwrap_model(packed)
        batches = _packed_chunks(rows, sequences, mask, chunks, G, tokenizer.pad_token_id,
                                 block=inner.attention == "flex", device=device)  # fmt: skip

        def logprobs(module, c: int) -> torch.Tensor:  # (chunk's b*G, T), 0 after each first EOS
            lo, hi = chunks[c]
            if module is packed:  # the new pass, through the module DDP wraps
                values = module(batches[c])
            else:  # the reference pass: the policy with the reference weights, or the frozen copy
                values = packed_logprobs(module, batches[c], inner.attention, inner.block_fn)
            return to_grid(values, batches[c], (hi - lo) * G, mask.shape[1])

    ref_lp = None
    with torch.no_grad(), accelerator.autocast():
        if reference is not None:
            with reference.weights(unwrapped) as ref_model:
                ref_lp = torch.cat([logprobs(ref_model, c) for c in range(len(chunks))])

    # -- inner optimizer steps on the clipped objective
    update_start = _clock(device)
    sums = torch.zeros(3, device=device)  # loss, clipped tokens, KL (summed over tokens)
    first_norm = None
    old_lp = [None] * len(chunks)  # per chunk (chunk's b*G, T): the first inner step's, detached
    for inner in range(cfg.inner_steps):
        for c, (lo, hi) in enumerate(chunks):
            part = slice(lo * G, hi * G)
            # Gradients are all-reduced once per optimizer step, in the last chunk's backward.
            stepped = model if packed is None else packed  # the module DDP wraps
            with nullcontext() if c == len(chunks) - 1 else accelerator.no_sync(stepped):
                with accelerator.autocast():
                    new_lp = logprobs(stepped, c)
                if inner == 0:  # the sampling policy's weights still: its log-probabilities
                    old_lp[c] = new_lp.detach()
                loss_sum, stats = grpo_loss_sum(
                    new_lp, old_lp[c], None if ref_lp is None else ref_lp[part], advantages[part],
                    mask[part], cfg.clip_eps, cfg.beta,
                )  # fmt: skip
                # DDP averages gradients over processes; scale so the result is the token mean.
                accelerator.backward(loss_sum * accelerator.num_processes / n_tokens)
            sums[0] += loss_sum.detach() / cfg.inner_steps
            if inner == cfg.inner_steps - 1:  # the statistics of the last pass
                sums[1] += stats["clip_sum"]
                sums[2] += stats.get("kl_sum", 0.0)
        if cfg.max_grad_norm:
            norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            if inner == 0:  # before any update of this step: the gradient of the sampled batch
                first_norm = float(norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    update_end = _clock(device)

    # -- the step's statistics over every process (shares may differ in size: sums, not gathers)
    sums = accelerator.reduce(sums, "sum") / n_tokens
    names = list(components)
    totals_t = torch.tensor([len(totals), sum(totals), sum(t * t for t in totals),
                             *(sum(components[k]) for k in names)], device=device, dtype=torch.float64)  # fmt: skip
    count, total, squares, *parts = accelerator.reduce(totals_t, "sum").tolist()
    mean = total / count
    std = (max(squares - count * mean * mean, 0.0) / max(count - 1, 1)) ** 0.5  # unbiased, as torch.std
    shares = accelerator.gather(torch.tensor([len(rows)], device=device)).tolist()
    return {
        "loss": sums[0].item(), "reward": mean, "reward_std": std,
        **{f"reward_{name}": value / count for name, value in zip(names, parts, strict=True)},
        "kl": sums[2].item(), "clip_fraction": sums[1].item(), "completion_tokens": float(n_tokens) / count,
        # Where this process's step went (each phase ends at a CUDA synchronization, so it holds its
        # GPU work): sampling; decoding the texts and the rewards; packing and the reference
        # pass; the inner steps (new passes, backward, optimizer).
        "generate_seconds": rewards_start - sample_start, "rewards_seconds": logprobs_start - rewards_start,
        "logprob_seconds": update_start - logprobs_start, "update_seconds": update_end - update_start,
        "prompts_per_process": shares,
        **({"grad_norm": first_norm} if first_norm is not None else {}),
    }  # fmt: skip


def _clock(device: torch.device) -> float:
    """The time once the device's queued work is done (a phase timed by two of these holds its GPU
    work; one synchronization per phase, four per step)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _packed_chunks(rows, sequences, mask, chunks, group_size: int, pad_id: int, *, block: bool,
                   device) -> list[dict]:  # fmt: skip
    """One `pack_groups` batch per chunk of prompts, on `device`: each completion up to and
    including its first EOS (the tokens completion_mask keeps)."""
    from flantune.fast_t5 import BLOCK
    from flantune.packing import pack_groups, to_device

    lengths = mask.sum(dim=1).long().tolist()  # (b*G,) completion tokens; a host sync, once a step
    ids = sequences.tolist()  # (b*G, 1 + T): the decoder start token, then the completion
    out = []
    for lo, hi in chunks:
        completions = [ids[j][1 : 1 + lengths[j]] for j in range(lo * group_size, hi * group_size)]
        batch = pack_groups([list(rows[p]["input_ids"]) for p in range(lo, hi)], completions,
                            width=mask.shape[1], pad_id=pad_id, decoder_start_id=ids[0][0],
                            block=BLOCK if block else None)  # fmt: skip
        out.append(to_device(batch, device))
    return out


def _logprobs(model, enc, sequences, lo: int, hi: int, group_size: int) -> torch.Tensor:
    """Token log-probabilities of the completions of prompts lo..hi.

    The encoder runs once per prompt and its states are repeated for the group. Prefix tuning puts
    virtual tokens into the encoder through the model's own forward, and a DDP wrapper syncs
    gradients only through its forward: those run the whole model on repeated prompts instead.
    """
    ids, attention = enc["input_ids"][lo:hi], enc["attention_mask"][lo:hi]
    completions = sequences[lo * group_size : hi * group_size]
    prefix = getattr(getattr(model, "peft_config", {}).get("default"), "peft_type", None) == "PREFIX_TUNING"
    if hasattr(model, "get_encoder") and not prefix:
        states = model.get_encoder()(input_ids=ids, attention_mask=attention).last_hidden_state  # (b, S, d)
        return completion_logprobs(model, states, attention, completions, group_size)
    logits = model(
        input_ids=ids.repeat_interleave(group_size, dim=0), attention_mask=attention.repeat_interleave(group_size, dim=0),
        decoder_input_ids=completions[:, :-1], use_cache=False,
    ).logits  # (b*G, T-1, V)  # fmt: skip
    return token_logprobs(logits, completions[:, 1:])
