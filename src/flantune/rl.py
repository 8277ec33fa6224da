"""flantune rl: GRPO (group relative policy optimization) for encoder-decoder models.

TRL's GRPO, RLOO and PPO trainers support causal LMs only: they concatenate prompt and completion
into one sequence. An encoder-decoder model reads the prompt with its encoder and writes the
completion with its decoder, so this loop is our own. One step:

1. Take `prompts_per_step` prompts (B) from data.train, in a resumable per-epoch order.
2. Sample G = `group_size` completions per prompt with `generate(num_return_sequences=G)`, which
   runs the encoder once per prompt and expands its output G times.
3. Score each completion with the recipe's rewards (a weighted sum); normalize the rewards within
   each group: A = (r - mean_group) / (std_group + 1e-4).
4. Per completion token, log-probabilities under the sampling policy (old), the reference policy
   (the model RL starts from), and, with gradients, the current policy (new). The encoder runs once
   per prompt and its states are repeated for the group.
5. `inner_steps` optimizer steps on the clipped objective
       loss = mean over completion tokens of  -min(ρ A, clip(ρ, 1-ε, 1+ε) A) + β KL
   with ρ = exp(new - old) and the k3 estimator KL = exp(ref - new) - (ref - new) - 1, averaged
   over all completion tokens of the batch (not per sequence first).

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
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from flantune import checkpoint as ckpt
from flantune.config import Recipe, dump_recipe
from flantune.data import load_splits, make_collator
from flantune.generate import decode
from flantune.methods import apply_method, quantization_config, save_final, trainable_line
from flantune.models import fit_embeddings, load_model, load_tokenizer, recorded_base
from flantune.rewards import build_rewards, score_all
from flantune.train import (
    EpochSampler,
    MetricsLog,
    TrainingError,
    build_optimizer,
    default_best_metric,
    evaluate,
    prepare_run_dir,
    resolve_precision,
)

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
    # float32 log-softmax: the ratio exp(new - old) amplifies bf16 rounding otherwise.
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_mask(decoder_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N, T-1) 1 for completion tokens up to and including the first EOS, 0 for the padding after."""
    targets = decoder_ids[:, 1:]
    is_eos = (targets == eos_id).int()
    after_eos = (is_eos.cumsum(dim=1) - is_eos) > 0  # strictly after the first EOS
    return (~after_eos).float()


# ---- the policy, its reference, the run ----------------------------------------------------------


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
        from flantune.models import is_local

        if is_local(recipe.rl.start) and not Path(recipe.rl.start).exists():
            raise TrainingError(
                f"rl.start: {recipe.rl.start} does not exist (give an SFT run's final/, a model folder or a hub id)"
            )
        return recipe.rl.start
    final = Path(recipe.output_dir) / "final"
    return str(final) if final.is_dir() else None


def _method_of(start: Path, recipe: Recipe) -> str:
    """The method an adapter folder was trained with (flantune.json, else its PEFT type)."""
    if (start / "flantune.json").is_file():
        kind = json.loads((start / "flantune.json").read_text()).get("method")
        if kind:
            return kind
    config = json.loads((start / "adapter_config.json").read_text())
    if config.get("kind") == "bottleneck":
        return "adapter"
    peft_type = config.get("peft_type", "LORA")
    by_type = {
        "LORA": "qlora" if recipe.method.kind == "qlora" else "lora",
        "IA3": "ia3",
        "PREFIX_TUNING": "prefix",
    }
    return by_type.get(peft_type, "lora")


def load_policy(recipe: Recipe, seed: int):
    """(model, tokenizer, method, base record) for the policy: RL's starting point made trainable."""
    start = resolve_start(recipe)
    if start is not None and (Path(start) / "adapter_config.json").is_file():
        record = recorded_base(start)
        if not record["path"]:
            raise TrainingError(
                f"rl.start: {start} does not say its base model (no flantune.json or base path)"
            )
        method = replace(recipe.method, kind=_method_of(Path(start), recipe))
        tokenizer = load_tokenizer(start)
        model = load_model(record["path"], init=record["init"], seed=record["seed"], revision=record["revision"],
                           quantization_config=quantization_config(method))  # fmt: skip
        fit_embeddings(model, tokenizer)
        model = apply_method(model, method, gradient_checkpointing=recipe.train.gradient_checkpointing,
                             adapter_path=start)  # fmt: skip
        return model, tokenizer, method, record
    if start is not None:  # a full model folder: it all trains
        method = replace(recipe.method, kind="full")
        tokenizer = load_tokenizer(start)
        model = load_model(start, dtype=recipe.model.dtype)
        fit_embeddings(model, tokenizer)
        model = apply_method(model, method, gradient_checkpointing=recipe.train.gradient_checkpointing)
        return model, tokenizer, method, {"path": start, "init": "pretrained", "seed": seed, "revision": None}
    from flantune.models import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(
        recipe.model, seed=seed, quantization_config=quantization_config(recipe.method)
    )
    model = apply_method(loaded.model, recipe.method, added_token_ids=loaded.added_token_ids,
                         gradient_checkpointing=recipe.train.gradient_checkpointing)  # fmt: skip
    record = {
        "path": recipe.model.path,
        "init": recipe.model.init,
        "seed": seed,
        "revision": recipe.model.revision,
    }
    return model, loaded.tokenizer, recipe.method, record


def run_rl(recipe: Recipe, console=None) -> RLResult:
    """GRPO from the recipe's starting model; writes rl.output_dir like a training run."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from rich.console import Console
    from transformers import AutoConfig, get_scheduler

    console = console or Console()
    cfg, seed = recipe.rl, recipe.train.seed
    out = Path(cfg.output_dir or Path(recipe.output_dir) / "rl")
    model_type = AutoConfig.from_pretrained(recipe.model.path, revision=recipe.model.revision).model_type
    accelerator = Accelerator(
        mixed_precision=resolve_precision(recipe.train.precision, model_type),
        cpu=not torch.cuda.is_available(),
    )
    main = accelerator.is_main_process
    if main:
        prepare_run_dir(out, cfg.resume, section="rl", key="rl.output_dir")
        (out / "recipe.yaml").write_text(dump_recipe(recipe))
    accelerator.wait_for_everyone()
    set_seed(seed)

    model, tokenizer, method, base_record = load_policy(recipe, seed)
    if main:
        console.print(trainable_line(model), highlight=False)
    splits = load_splits(recipe.data, tokenizer, roles=("train", "eval"), seed=seed)
    if "train" not in splits:
        raise TrainingError("data.train: flantune rl needs prompts (data.train)")
    train_split, eval_split = splits["train"], splits.get("eval")
    if len(train_split.tasks) != 1:
        raise TrainingError("data: flantune rl takes one task (a mixture's rewards would differ per task)")
    task = next(iter(train_split.tasks.values()))
    max_new_tokens = cfg.max_new_tokens or recipe.generation.max_new_tokens
    rewards = build_rewards(cfg.rewards, task, tokenizer, max_new_tokens)
    collator = make_collator(tokenizer, model=model)

    model = accelerator.prepare(model)
    # After prepare: the reference lives on the same device as the policy.
    reference = (
        Reference(accelerator.unwrap_model(model), full=method.kind == "full") if cfg.beta > 0 else None
    )
    optimizer = accelerator.prepare(build_optimizer(model, cfg.lr, cfg.weight_decay))
    total_updates = cfg.max_steps * cfg.inner_steps
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_updates)  # fmt: skip
    checkpoints = out / "checkpoints"
    state, path = ckpt.start_state(checkpoints, cfg.resume, model, optimizer, scheduler, accelerator)
    if path and main:
        console.print(f"resumed from {path} (step {state.step})", highlight=False)
    log = MetricsLog(
        out / "metrics.jsonl", main, recipe.train.tensorboard, state.step if cfg.resume else None
    )
    sampler = EpochSampler(len(train_split.dataset), seed)
    rows = train_split.dataset
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()  # no dropout anywhere in RL: see the module docstring
    params = [p for p in model.parameters() if p.requires_grad]
    eval_recipe = replace(recipe, eval=replace(recipe.eval))
    best_name = default_best_metric(recipe, eval_split) if eval_split is not None else None

    def next_prompts() -> list[int]:
        """The next B row indices, continuing across epochs; the position is part of `state`."""
        chosen = []
        while len(chosen) < cfg.prompts_per_step:
            sampler.set_epoch(state.epoch)
            order = list(iter(sampler))
            take = order[state.batches_in_epoch : state.batches_in_epoch + cfg.prompts_per_step - len(chosen)]
            chosen += take
            state.batches_in_epoch += len(take)
            if state.batches_in_epoch >= len(order):
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
        return chosen

    def run_eval() -> dict[str, float]:
        metrics = evaluate(model, tokenizer, eval_split, eval_recipe, collator, accelerator)
        unwrapped.eval()
        log.write({"step": state.step, "epoch": state.epoch, **metrics})
        return metrics

    def save() -> None:
        ckpt.save_checkpoint(checkpoints, model, optimizer, scheduler, state, accelerator)
        if main:
            ckpt.prune(checkpoints, cfg.keep_last, set())

    from flantune.train import _progress

    progress = _progress(console, disable=not main)
    task_id = progress.add_task(
        "rl", total=cfg.max_steps, completed=state.step, loss=float("nan"), lr=0.0, tps=0.0
    )
    device = accelerator.device
    G = cfg.group_size
    last_eval: dict[str, float] = {}
    started = time.perf_counter()
    with progress:
        while state.step < cfg.max_steps:
            step_start = time.perf_counter()
            index = next_prompts()
            batch_rows = [rows[i] for i in index]
            prompts = [row["source"] for row in batch_rows]
            enc = tokenizer.pad(
                {"input_ids": [row["input_ids"] for row in batch_rows]}, return_tensors="pt"
            ).to(device)

            # -- sample G completions per prompt (the encoder runs once per prompt inside generate)
            with torch.no_grad(), accelerator.autocast():
                sequences = unwrapped.generate(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], do_sample=True,
                    num_return_sequences=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                    max_new_tokens=max_new_tokens,
                )  # (B*G, 1 + T): decoder start token, then the completion  # fmt: skip
            generate_seconds = time.perf_counter() - step_start
            completions = [decode(tokenizer, ids) for ids in sequences.tolist()]
            group_rows = [row for row in batch_rows for _ in range(G)]
            totals, components = score_all(
                rewards, [p for p in prompts for _ in range(G)], completions, group_rows
            )
            reward_t = torch.tensor(totals, device=device, dtype=torch.float32)
            advantages = group_advantages(reward_t, G)  # (B*G,)
            mask = completion_mask(sequences, tokenizer.eos_token_id)  # (B*G, T)
            n_tokens = mask.sum().clamp(min=1)

            # -- old (sampling) and reference log-probabilities, no gradients
            chunks = _chunks(len(prompts), max(1, cfg.micro_batch_size // G))
            with torch.no_grad(), accelerator.autocast():
                old_lp = torch.cat([_logprobs(unwrapped, enc, sequences, lo, hi, G) for lo, hi in chunks])
                ref_lp = None
                if reference is not None:
                    with reference.weights(unwrapped) as ref_model:
                        ref_lp = torch.cat(
                            [_logprobs(ref_model, enc, sequences, lo, hi, G) for lo, hi in chunks]
                        )

            # -- inner optimizer steps on the clipped objective
            stats = {"clip_sum": 0.0, "kl_sum": 0.0}
            loss_value = 0.0
            for inner in range(cfg.inner_steps):
                for lo, hi in chunks:
                    rows_slice = slice(lo * G, hi * G)
                    with accelerator.autocast():
                        new_lp = _logprobs(model, enc, sequences, lo, hi, G)
                    loss_sum, part = grpo_loss_sum(
                        new_lp, old_lp[rows_slice], None if ref_lp is None else ref_lp[rows_slice],
                        advantages[rows_slice], mask[rows_slice], cfg.clip_eps, cfg.beta,
                    )  # fmt: skip
                    accelerator.backward(loss_sum / n_tokens)
                    loss_value += float(loss_sum.detach()) / float(n_tokens) / cfg.inner_steps
                    if inner == cfg.inner_steps - 1:  # the statistics of the last pass
                        for key, value in part.items():
                            stats[key] += value
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            seconds = time.perf_counter() - step_start

            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                record = {
                    "step": state.step, "epoch": state.epoch, "loss": loss_value,
                    "reward": reward_t.mean().item(), "reward_std": reward_t.std().item(),
                    **{f"reward_{name}": sum(v) / len(v) for name, v in components.items()},
                    "kl": stats["kl_sum"] / float(n_tokens), "clip_fraction": stats["clip_sum"] / float(n_tokens),
                    "completion_tokens": float(n_tokens) / len(completions), "lr": scheduler.get_last_lr()[0],
                    "prompts_per_s": len(prompts) / seconds, "completions_per_s": len(completions) / seconds,
                    "generate_seconds": generate_seconds, "step_seconds": seconds,
                }  # fmt: skip
                log.write(record)
                progress.update(
                    task_id, loss=record["reward"], lr=record["lr"], tps=record["completions_per_s"]
                )
            progress.update(task_id, completed=state.step)
            if eval_split is not None and cfg.eval_every and state.step % cfg.eval_every == 0:
                last_eval = run_eval()
            if cfg.save_every and state.step % cfg.save_every == 0:
                save()

    if eval_split is not None and (not cfg.eval_every or state.step % cfg.eval_every):
        last_eval = run_eval()
    save()
    final_dir = out / "final"
    if main:
        with ckpt.atomic_dir(final_dir) as tmp:
            save_final(unwrapped, tokenizer, tmp, method, base_record)
        result = {"steps": state.step, "seconds": time.perf_counter() - started, "eval": last_eval,
                  "best_metric": best_name, "final_dir": str(final_dir)}  # fmt: skip
        (out / "result.json").write_text(json.dumps(result, indent=2))
        console.print(f"RL done: {state.step} steps; final/ written to {final_dir}", highlight=False)
    accelerator.wait_for_everyone()
    log.close()
    return RLResult(out, final_dir, state.step, time.perf_counter() - started, last_eval, unwrapped)


def _progress(console, disable: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]rl"), BarColumn(), MofNCompleteColumn(),
        TextColumn("reward {task.fields[reward]:.3f}  kl {task.fields[kl]:.4f}  {task.fields[cps]:,.1f} completions/s"),
        TimeElapsedColumn(), console=console, disable=disable,
    )  # fmt: skip


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


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
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, completions[:, 1:].unsqueeze(-1)).squeeze(-1)
