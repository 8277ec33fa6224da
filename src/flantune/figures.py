"""The eval report's figures (matplotlib): scores, confusion matrices, lengths, training and RL curves.

    draw_report   every figure the report's data allows: inline SVG for report.html, a PNG file beside it
    confusion     reference label × predicted label counts of one task's rows for one model
    LabelRows     the rows of a classification or multiple-choice task, which get a confusion matrix

Figures are `matplotlib.figure.Figure` objects drawn on their own Agg canvas, never through pyplot:
pyplot keeps global state (the current figure, the backend) that a program using flantune may rely
on. The one setting changed, svg.fonttype, holds only while the SVG is written. matplotlib is
imported inside the functions that draw, so the command line starts without it. A figure whose data is missing (no metrics.jsonl
beside any model, no label task, no RL run) is left out.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flantune.metrics import chosen_option

TITLES = {
    "scores": "Scores by model",
    "confusion": "Confusion matrix: reference label (rows) by predicted label (columns)",
    "lengths": "Output length in words: predictions and references",
    "training": "Training: loss, evaluation metrics and learning rate by step",
    "rl": "RL: reward per component, KL and completion length by step",
}
FILES = frozenset(f"figure-{name}.png" for name in TITLES)
"""Every file draw_report may write (a report folder holds these and no other figures)."""
TRAINING = ("training", "rl")
"""The figures of the runs the models came from, as against the figures of this evaluation."""
OTHER = "other/invalid"
"""The confusion matrix's last column: predictions that name no label (or no option)."""
RASTER_POINTS = 500
"""Past this many rows the lengths figure's scatter is an image inside the SVG, not one element a point."""


@dataclass(frozen=True)
class LabelRows:
    """The rows of one classification or multiple-choice task in the report."""

    task: str
    rows: list[int]
    """Indices into the report's rows."""
    labels: tuple[str, ...] | None
    """The task's labels (exact target strings), or None for multiple choice."""
    choices: list[list[str]] | None = None
    """Multiple choice: the options of each of `rows`, in the order the source shows them (A, B, ...)."""


@dataclass(frozen=True)
class Drawn:
    name: str
    """A key of TITLES; the file is figure-{name}.png."""
    title: str
    svg: str
    """An <svg> element to put inside HTML as it is."""

    @property
    def file(self) -> str:
        return f"figure-{self.name}.png"


def confusion(
    task: LabelRows, predictions: Sequence[str], references: Sequence[str]
) -> tuple[list[str], list[list[int]]]:
    """(classes, counts): counts[r][p] is the number of the task's rows whose reference is class r
    and whose prediction is class p, with p == len(classes) for a prediction outside the classes.

    Labels match as the accuracy metric compares them (stripped text); multiple-choice answers are
    read as mc_accuracy reads them (option text or letter, inside <answer> when tagged) and the
    classes are the option positions A, B, .... A reference that names no class (which no built-in
    task writes) leaves its row out."""
    if task.labels is not None:
        classes = list(task.labels)
        index = {label.strip(): k for k, label in enumerate(classes)}

        def which(text: str, j: int) -> int | None:
            return index.get(text.strip())
    else:
        options = task.choices or []
        classes = [chr(ord("A") + k) for k in range(max((len(c) for c in options), default=0))]

        def which(text: str, j: int) -> int | None:
            return chosen_option(text, options[j])

    counts = [[0] * (len(classes) + 1) for _ in classes]
    for j, i in enumerate(task.rows):
        reference = which(references[i], j)
        if reference is not None:
            predicted = which(predictions[i], j)
            counts[reference][len(classes) if predicted is None else predicted] += 1
    return classes, counts


def draw_report(
    out: Path,
    scores: dict[str, dict[str, float]],
    predictions: dict[str, list[str]],
    references: list[str],
    label_rows: list[LabelRows],
    logs: dict[str, list[dict]],
) -> list[Drawn]:
    """Draw every figure the data allows, write each as `out`/figure-NAME.png, and return them for
    the page. `scores` and `predictions` are by model name (in the report's order); `logs` holds
    the metrics.jsonl records of the runs the models came from, by a name for the run."""
    figures = {
        "scores": _scores_figure(scores),
        "confusion": _confusion_figure(label_rows, predictions, references),
        "lengths": _lengths_figure(predictions, references),
        "training": _training_figure(logs),
        "rl": _rl_figure(logs),
    }
    return [_render(fig, name, out) for name, fig in figures.items() if fig is not None]


# --- rendering ---------------------------------------------------------------------------------------


def _figure(width: float, height: float, title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # its own Agg canvas, whatever backend pyplot was set to
    fig.suptitle(title, fontsize=11)
    return fig


def _render(fig, name: str, out: Path) -> Drawn:
    import matplotlib

    fig.savefig(out / f"figure-{name}.png", dpi=100)
    # The layout was worked out for the PNG (in figure fractions, so at any resolution): the SVG keeps
    # it rather than paying for it again.
    fig.set_layout_engine("none")
    buffer = io.StringIO()
    # Text as <text> elements rather than glyph outlines: a smaller page whose words can be searched
    # and selected. rc_context puts the setting back when the block ends.
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # the XML prolog and doctype have no place inside HTML
    svg = svg.replace("<svg ", f'<svg role="img" aria-label="{html.escape(TITLES[name])}" ', 1)
    return Drawn(name, TITLES[name], svg)


def _color(k: int) -> str:
    return f"C{k % 10}"  # matplotlib's default cycle: each model keeps its colour in every figure


def _short(label: str, width: int = 18) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of `key` in a run's records; non-numbers (a skipped step's "nan" text) are left out."""
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), int | float) and not isinstance(r[key], bool) and "step" in r]  # fmt: skip
    return [s for s, _ in points], [v for _, v in points]


def _line(ax, records: list[dict], key: str, label: str | None = None, **style) -> bool:
    steps, values = _series(records, key)
    if steps:
        style = {"linewidth": 1.2, **style}
        ax.plot(
            steps, values, label=label or key, marker="o" if len(steps) < 30 else None, markersize=3, **style
        )
    return bool(steps)


def _finish(ax, title: str, ylabel: str, drew: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    if drew:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="grey")


# --- the figures -------------------------------------------------------------------------------------


def _scores_figure(scores: dict[str, dict[str, float]]):
    """Grouped bars: one group per metric, one bar per model (every metric is on a 0-100 scale)."""
    keys = list(dict.fromkeys(k for values in scores.values() for k in values))
    if not keys:
        return None
    models = list(scores)
    fig = _figure(min(max(4.5, 1.5 + 0.35 * len(keys) * (len(models) + 1)), 16), 3.4, TITLES["scores"])
    ax = fig.subplots()
    width = 0.8 / len(models)
    top = 100.0
    for k, model in enumerate(models):
        present = [i for i, key in enumerate(keys) if key in scores[model]]
        offset = (k - (len(models) - 1) / 2) * width
        values = [scores[model][keys[i]] for i in present]
        bars = ax.bar([i + offset for i in present], values, width, label=model, color=_color(k))
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        top = max([top, *values])
    ax.set_xticks(range(len(keys)), [_short(k, 24) for k in keys], fontsize=8,
                  rotation=30 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center")  # fmt: skip
    ax.set_ylim(0, top * 1.1)
    ax.set_ylabel("score (0-100)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    # Below the axes, where it can cover no bar.
    fig.legend(fontsize=8, ncols=min(len(models), 5), loc="outside lower center")
    return fig


def _confusion_figure(label_rows: list[LabelRows], predictions: dict[str, list[str]], references: list[str]):
    """One matrix per label task (rows of panels) and model (columns of panels)."""
    if not label_rows:
        return None
    import numpy as np

    models = list(predictions)
    tables = [[confusion(task, predictions[m], references) for m in models] for task in label_rows]
    size = max(len(classes) for row in tables for classes, _ in row)
    cell = min(0.45, 7.0 / (size + 1))  # inches; many labels get smaller cells, not a huge figure
    fig = _figure(min(len(models) * (1.6 + cell * (size + 1)), 18),
                  min(len(label_rows) * (1.7 + cell * size), 20) + 0.4, TITLES["confusion"])  # fmt: skip
    axes = fig.subplots(len(label_rows), len(models), squeeze=False)
    for t, task in enumerate(label_rows):
        for m, model in enumerate(models):
            classes, counts = tables[t][m]
            ax, grid = axes[t][m], np.array(counts)  # (classes, classes + 1)
            # pcolormesh draws vector cells (an image would be embedded as a raster in the SVG).
            ax.pcolormesh(np.arange(grid.shape[1] + 1) - 0.5, np.arange(grid.shape[0] + 1) - 0.5, grid,
                          cmap="Blues", vmin=0, vmax=max(int(grid.max()), 1))  # fmt: skip
            ax.invert_yaxis()
            high = grid.max() * 0.6
            # Counts are written in the cells up to 20 classes; past that the colours alone stay readable.
            for (r, p), count in np.ndenumerate(grid) if len(classes) <= 20 else ():
                # The gid names the cell in the SVG (confusion-TASK-MODEL-ROW-COLUMN, by position).
                ax.text(p, r, str(count), ha="center", va="center", fontsize=7,
                        color="white" if count > high else "black", gid=f"confusion-{t}-{m}-{r}-{p}")  # fmt: skip
            ax.set_xticks(range(len(classes) + 1), [_short(c) for c in [*classes, OTHER]], rotation=45,
                          ha="right", fontsize=7)  # fmt: skip
            ax.set_yticks(range(len(classes)), [_short(c) for c in classes], fontsize=7)
            ax.set_xlabel("predicted", fontsize=8)
            ax.set_ylabel("reference", fontsize=8)
            ax.set_title(model if len(label_rows) == 1 else f"{task.task}: {model}", fontsize=9)
    return fig


def _lengths_figure(predictions: dict[str, list[str]], references: list[str]):
    """Histograms of the word counts, and each row's predicted against reference word count."""
    if not references:
        return None
    reference = [len(r.split()) for r in references]
    lengths = {model: [len(p.split()) for p in texts] for model, texts in predictions.items()}
    top = max([*reference, *(n for values in lengths.values() for n in values), 1])
    # One bin per word count (centred on it) up to 40 words, else 40 equal bins.
    bins = [k - 0.5 for k in range(top + 2)] if top <= 40 else [top * k / 40 for k in range(41)]
    from matplotlib.ticker import MaxNLocator

    fig = _figure(9, 3.4, TITLES["lengths"])
    spread, rows = fig.subplots(1, 2)
    spread.hist(reference, bins, histtype="step", color="black", linewidth=1.6, label="reference")
    for k, (model, values) in enumerate(lengths.items()):
        spread.hist(values, bins, histtype="step", color=_color(k), linewidth=1.2, label=model)
        # Each point is an SVG element: past 500 they are drawn as an image (1,000 SciQ rows: a figure
        # of 164 KB becomes 18 KB, and a third faster to write).
        rows.scatter(reference, values, s=9, alpha=0.5, color=_color(k), label=model,
                     rasterized=len(reference) > RASTER_POINTS)  # fmt: skip
    rows.plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1, label="same length")
    spread.set_xlabel("words", fontsize=8)
    spread.set_ylabel("rows", fontsize=8)
    spread.set_title("how long", fontsize=9)
    rows.set_xlabel("reference words", fontsize=8)
    rows.set_ylabel("predicted words", fontsize=8)
    rows.set_title("row by row", fontsize=9)
    for ax in (spread, rows):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # word and row counts
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    return fig


def _eval_keys(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r if k.startswith("eval_") and k != "eval_loss"))


def _training_figure(logs: dict[str, list[dict]]):
    """Per run (a row of panels): training and evaluation loss, evaluation metrics, learning rate."""
    runs = {name: records for name, records in logs.items()
            if any(_series(records, key)[0] for key in ("loss", "lr", "eval_loss", *_eval_keys(records)))}  # fmt: skip
    if not runs:
        return None
    fig = _figure(11, 0.4 + 2.7 * len(runs), TITLES["training"])
    for (name, records), (loss, metrics, lr) in zip(runs.items(), fig.subplots(len(runs), 3, squeeze=False),
                                                    strict=True):  # fmt: skip
        drew = _line(loss, records, "loss", "train loss")
        drew |= _line(loss, records, "eval_loss")
        _finish(loss, f"{name}: loss", "loss", drew)
        drew = False
        for k, key in enumerate(_eval_keys(records)):
            drew |= _line(metrics, records, key, color=_color(k))
        _finish(metrics, f"{name}: evaluation", "score", drew)
        _finish(lr, f"{name}: learning rate", "lr", _line(lr, records, "lr"))
        lr.yaxis.set_major_formatter("{x:.3g}")  # 0.003, 2e-05: no offset text over the title
    return fig


def _rl_figure(logs: dict[str, list[dict]]):
    """Per RL run (records with "reward", as flantune rl logs them): the total reward with its
    spread over completions, each reward component, the KL to the reference and the completion length."""
    runs = {name: records for name, records in logs.items() if _series(records, "reward")[0]}
    if not runs:
        return None
    fig = _figure(11, 0.4 + 2.7 * len(runs), TITLES["rl"])
    for (name, records), (reward, kl, length) in zip(runs.items(), fig.subplots(len(runs), 3, squeeze=False),
                                                     strict=True):  # fmt: skip
        steps, mean = _series(records, "reward")
        _line(reward, records, "reward", "reward (weighted total)", color="black", linewidth=2.2, zorder=3)
        spread = dict(zip(*_series(records, "reward_std"), strict=True))
        if all(s in spread for s in steps):
            low = [m - spread[s] for s, m in zip(steps, mean, strict=True)]
            high = [m + spread[s] for s, m in zip(steps, mean, strict=True)]
            reward.fill_between(steps, low, high, color="black", alpha=0.1, label="± std over completions")
        components = list(
            dict.fromkeys(k for r in records for k in r if k.startswith("reward_") and k != "reward_std")
        )
        for k, key in enumerate(components):
            _line(reward, records, key, color=_color(k))
        _finish(reward, f"{name}: reward", "reward", True)
        _finish(kl, f"{name}: KL to the reference", "KL", _line(kl, records, "kl", color=_color(3)))
        _finish(length, f"{name}: completion length", "tokens",
                _line(length, records, "completion_tokens", color=_color(4)))  # fmt: skip
    return fig
