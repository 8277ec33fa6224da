"""Rewards for reinforcement learning: functions of (prompt, completion, reference row) → float.

Built-ins, each in [0, 1] except the length penalty (≤ 0):

- `correct`: the answer is right. SciQ tasks match the completion (the text inside
  `<answer>…</answer>` when present) against the four options, so naming the right option's text or
  letter counts; other tasks compare with the references, SQuAD-normalized (`mode: normalized`) or
  exactly (`mode: exact`).
- `format`: the completion is `<think> … </think> <answer> … </answer>`, both parts non-empty.
- `rouge`: ROUGE-L F1 against the best reference. `bleu`: sentence BLEU.
- `length`: −(n − target) / target for completions longer than `target_tokens` tokens (n counted by
  the tokenizer), or −n / max_new_tokens when no target is set.

A custom reward is `module:function`, imported once and called as `function(prompt, completion, row)`
with the dataset row (source, target, references, choices, and the raw columns' task fields). It
must return a finite number; anything else stops the run with a message naming it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

from flantune.config import RewardSpec
from flantune.errors import RewardError  # re-exported: flantune.rewards.RewardError
from flantune.metrics import extract_answer, is_well_formed, normalize_answer, row_scores


@dataclass
class Reward:
    name: str
    weight: float
    score: Callable[[list[str], list[str], list[dict]], list[float]]
    """(prompts, completions, rows) → one float per completion."""


def _correct(spec: RewardSpec, multiple_choice: bool, answer_prefix: str | None):
    def score(prompts, completions, rows):
        if multiple_choice:
            refs = [row["references"] for row in rows]
            return [v / 100 for v in [s["mc_accuracy"] for s in row_scores(
                ["mc_accuracy"], completions, refs, choices=[row["choices"] for row in rows],
                answer_prefix=answer_prefix)]]  # fmt: skip
        out = []
        for completion, row in zip(completions, rows, strict=True):
            answer = extract_answer(completion)
            if answer_prefix and answer.startswith(answer_prefix):
                answer = answer[len(answer_prefix) :]
            refs = [extract_answer(r) for r in row["references"]]
            if spec.mode == "exact":
                out.append(float(any(answer.strip() == r.strip() for r in refs)))
            else:
                out.append(float(any(normalize_answer(answer) == normalize_answer(r) for r in refs)))
        return out

    return score


def _format(prompts, completions, rows):
    return [float(is_well_formed(c)) for c in completions]


def _metric(name: str, key: str, answer_prefix: str | None):
    def score(prompts, completions, rows):
        scores = row_scores(
            [name], completions, [row["references"] for row in rows], answer_prefix=answer_prefix
        )
        return [s[key] / 100 for s in scores]

    return score


def _length(spec: RewardSpec, tokenizer, max_new_tokens: int):
    def score(prompts, completions, rows):
        lengths = [len(ids) for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]
        if spec.target_tokens:
            return [-max(0, n - spec.target_tokens) / spec.target_tokens for n in lengths]
        return [-n / max_new_tokens for n in lengths]

    return score


def _custom(spec: RewardSpec):
    module_name, _, function_name = spec.name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise RewardError(f"rl.rewards: cannot load {spec.name}: {e}") from None
    if not callable(function):
        raise RewardError(f"rl.rewards: {spec.name} is not a function")

    def score(prompts, completions, rows):
        values = []
        for prompt, completion, row in zip(prompts, completions, rows, strict=True):
            try:
                value = function(prompt, completion, row)
            except Exception as e:
                raise RewardError(
                    f"reward {spec.name} raised {type(e).__name__}: {e} (on completion {completion[:80]!r})"
                ) from e
            if not isinstance(value, Real) or not math.isfinite(float(value)):
                raise RewardError(
                    f"reward {spec.name} returned {value!r} ({type(value).__name__}); it must return a finite number"
                )
            values.append(float(value))
        return values

    return score


def build_rewards(specs: Sequence[RewardSpec], task, tokenizer, max_new_tokens: int) -> list[Reward]:
    """The recipe's rewards for `task` (a flantune.tasks.Task)."""
    rewards = []
    for spec in specs:
        if spec.name == "correct":
            score = _correct(spec, task.multiple_choice, task.answer_prefix)
        elif spec.name == "format":
            score = _format
        elif spec.name == "rouge":
            score = _metric("rouge", "rougeL", task.answer_prefix)
        elif spec.name == "bleu":
            score = _metric("bleu", "bleu", task.answer_prefix)
        elif spec.name == "length":
            score = _length(spec, tokenizer, max_new_tokens)
        else:
            score = _custom(spec)
        rewards.append(Reward(spec.name, spec.weight, score))
    return rewards


def score_all(
    rewards: Sequence[Reward], prompts: list[str], completions: list[str], rows: list[dict]
) -> tuple[list[float], dict[str, list[float]]]:
    """Total reward per completion (the weighted sum) and each component's raw values."""
    components = {}
    for reward in rewards:
        values = reward.score(prompts, completions, rows)
        if len(values) != len(completions):
            raise RewardError(
                f"reward {reward.name} gave {len(values)} values for {len(completions)} completions"
            )
        components[reward.name] = values
    totals = [
        sum(reward.weight * components[reward.name][i] for reward in rewards) for i in range(len(completions))
    ]
    return totals, components
