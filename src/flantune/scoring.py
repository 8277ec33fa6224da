"""Scoring: one path from a model and a split to the task's metrics, for every command that scores.

`flantune eval`, evaluation during training and RL's evaluation all call `score_split`, so the
checkpoint a run keeps as its best is chosen on the very scores `flantune eval` reports: the same
rows, the same generation settings (label restriction included) and the same metrics.

    token_loss_sum       the summed cross-entropy over target tokens (training and eval loss)
    score_split          generate on a split, score each task's rows with its metrics
    evaluate_in_run      eval loss + score_split, as the `eval_*` numbers of a training run
    best_metric_name     the number a run keeps its best checkpoint by
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flantune.config import EvalConfig, GenerationConfig
from flantune.data import MODEL_COLUMNS
from flantune.decoding import generate_texts
from flantune.metrics import compute_metrics, row_scores


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over target tokens (labels -100 are padding)."""
    # logits (B, T, V), labels (B, T); float32 for the softmax even under bf16 autocast.
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


@dataclass
class Scores:
    predictions: list[str]
    """One generated text per row of the split, in its order."""
    metrics: dict[str, float]
    """The task's metrics (prefixed `task/` when the split mixes several tasks)."""
    per_row: list[dict]
    """Each row's own scores, for reports."""


def first_rows(split, max_rows: int | None):
    """The split cut to its first `max_rows` rows (eval.max_rows), so runs compare on the same rows."""
    if max_rows is not None and len(split.dataset) > max_rows:
        from dataclasses import replace

        return replace(split, dataset=split.dataset.select(range(max_rows)))
    return split


def restricted_labels(split, generation: GenerationConfig) -> list[str] | None:
    """The label strings decoding is restricted to (generation.restrict_to_labels on a one-task
    classification split), else None."""
    if not generation.restrict_to_labels or len(split.tasks) != 1:
        return None
    return list(next(iter(split.tasks.values())).labels or []) or None


@torch.no_grad()
def score_split(
    model,
    tokenizer,
    split,
    generation: GenerationConfig,
    eval_cfg: EvalConfig,
    *,
    max_source_tokens: int | None = None,
    device=None,
) -> Scores:
    """Generate an output for every row of `split` (already cut to the rows to score) with the
    `generation` settings and score each task's rows with its metrics (or eval.metrics)."""
    dataset = split.dataset
    # Whole columns as lists, not dataset[i] (each reads a whole row), and the split's own token ids
    # where this tokenizer made them (Split.source_ids) instead of tokenizing the sources again: on
    # 1,000 SciQ rows the work around the decoder went from 0.65 to 0.2 s (CPU).
    sources, task_names = list(dataset["source"]), list(dataset["task"])
    predictions = generate_texts(
        model, tokenizer, sources, generation, batch_size=eval_cfg.batch_size,
        max_source_tokens=max_source_tokens, device=device, labels=restricted_labels(split, generation),
        encoded=split.source_ids(tokenizer, max_source_tokens),
    )  # fmt: skip
    metrics: dict[str, float] = {}
    per_row: list[dict] = [{} for _ in sources]
    references = list(dataset["references"])
    choices = list(dataset["choices"]) if any(t.multiple_choice for t in split.tasks.values()) else None
    for name, task in split.tasks.items():
        rows = [i for i, t in enumerate(task_names) if t == name]
        if not rows:
            continue
        names = eval_cfg.metrics or task.metrics
        kwargs = {
            "choices": [choices[i] for i in rows] if task.multiple_choice else None,
            "answer_prefix": task.answer_prefix,
        }
        preds, refs = [predictions[i] for i in rows], [references[i] for i in rows]
        scores = compute_metrics(names, preds, refs, labels=task.labels, **kwargs)
        prefix = f"{name}/" if len(split.tasks) > 1 else ""
        metrics.update({prefix + k: v for k, v in scores.items()})
        for i, row in zip(rows, row_scores(names, preds, refs, **kwargs), strict=True):
            per_row[i] = row
    return Scores(predictions, metrics, per_row)


@torch.no_grad()
def evaluate_in_run(model, tokenizer, split, recipe, collator, accelerator) -> dict[str, float]:
    """A training run's evaluation: eval_loss (token-averaged) and `score_split`'s metrics as
    eval_<metric>, on the first eval.max_rows rows. Every process evaluates the same rows."""
    split = first_rows(split, recipe.eval.max_rows)
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    device = accelerator.device
    loss_sum, tokens = 0.0, 0
    columns = split.dataset.select_columns(MODEL_COLUMNS)
    size = 32 if recipe.eval.batch_size == "auto" else recipe.eval.batch_size  # logits (B, T, V) in float32
    for start in range(0, len(columns), size):
        batch = collator([columns[i] for i in range(start, min(start + size, len(columns)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = unwrapped(**batch).logits  # (B, T, V)
        loss_sum += token_loss_sum(logits, labels).item()
        tokens += int((labels != -100).sum())
    # Generation without autocast, as `flantune eval` runs it: the same scores for the same weights.
    scores = score_split(unwrapped, tokenizer, split, recipe.generation, recipe.eval,
                         max_source_tokens=recipe.data.max_source_tokens, device=device)  # fmt: skip
    unwrapped.train(was_training)
    return {"eval_loss": loss_sum / max(tokens, 1), **{f"eval_{k}": v for k, v in scores.metrics.items()}}


def main_key(metric: str) -> str:
    """The number that represents a metric family (ROUGE is reported as four)."""
    return "rougeL" if metric == "rouge" else metric


def best_metric_name(best_metric: str | None, recipe, split) -> str:
    """The eval_* number a run keeps its best checkpoint by: `best_metric` (train.best_metric) when
    given, else the task's first metric (eval_loss for a mixture or without an eval split)."""
    if best_metric:
        return best_metric if best_metric.startswith("eval_") else f"eval_{best_metric}"
    if split is None or len(split.tasks) > 1:
        return "eval_loss"
    task = next(iter(split.tasks.values()))
    return f"eval_{main_key((recipe.eval.metrics or task.metrics)[0])}"
