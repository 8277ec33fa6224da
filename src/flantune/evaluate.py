"""flantune eval: generate on a split, score, and write a report a person can read.

The report folder holds predictions.jsonl (source, reference, prediction and per-row scores, for
each model), metrics.json, report.md and a self-contained report.html: the metric table (base
versus fine-tuned with the difference, when --compare is given), the figures that flantune/figures.py
draws (scores by model, confusion matrices of label tasks, output lengths, the training and RL
curves of the runs the models came from) inline, and the rows where the two models differ most.
Each figure is also a PNG file beside the report. Compared models see exactly the same rows with the
same generation settings. The evaluated model's scores also go into its model card (README.md, in
the Hub's model-index form) when it is a local folder with a card, or a run's final/.
"""

from __future__ import annotations

import gc
import html
import json
from dataclasses import asdict
from pathlib import Path

from flantune import checkpoint as ckpt
from flantune import engine, figures
from flantune.config import ConfigError, Recipe
from flantune.data import load_split
from flantune.final import add_scores, load_final
from flantune.models import ModelLoadError
from flantune.scoring import first_rows, score_split

SPLIT_ROLES = {"test": "test", "eval": "eval", "validation": "eval", "train": "train"}


def run_eval(
    recipe: Recipe,
    model: str,
    adapter: str | None = None,
    compare: str | list[str] | None = None,
    split_name: str = "test",
    out: Path | str | None = None,
    other_base: bool = False,
    dtype: str = "float32",
) -> dict:
    """Evaluate `model` (+ `adapter`), and each `compare` model, on the same rows; write the report.

    `compare` is a model path or a list of them, each optionally named `NAME=PATH` (default names:
    base, then compare-2, compare-3, ...). The first one is what the differences are measured from.

    Both models generate with the recipe's generation settings on exactly the same rows (the first
    `eval.max_rows` of the split); each uses its own tokenizer, so a fine-tuned model with added
    tokens compares fairly against a base without them. `dtype`: the weights every model is loaded
    in (float32: the scores evaluation during training gives; recorded in metrics.json).
    """
    if split_name not in SPLIT_ROLES:
        raise ConfigError([f"--split: expected one of {', '.join(SPLIT_ROLES)}, got {split_name!r}"])
    role = SPLIT_ROLES[split_name]
    if adapter:
        tuned = load_final(
            {"default": adapter}, base=model, what="--adapter", base_what="--model", other_base=other_base,
            dtype=dtype,
        )  # fmt: skip
    else:
        tuned = load_final(model, what="--model", dtype=dtype)
    split = load_split(recipe.data, role, tuned.tokenizer, seed=recipe.train.seed)
    if split is None:
        raise ConfigError([f"data.{role}: the recipe names no {split_name} split to evaluate on"])
    split = first_rows(split, recipe.eval.max_rows)
    out = Path(out or Path(recipe.output_dir) / f"eval-{split_name}")
    _check_out(out)
    others = compare_models(compare)
    results = {"model": model, "adapter": adapter, "compare": dict(others), "split": split_name,
               "rows": len(split.dataset), "dtype": dtype, "generation": asdict(recipe.generation),
               "models": {}}  # fmt: skip

    def score(loaded) -> tuple:
        scores = score_split(loaded.model, loaded.tokenizer, split, recipe.generation, recipe.eval,
                             max_source_tokens=recipe.data.max_source_tokens)  # fmt: skip
        return scores.predictions, scores.metrics, scores.per_row

    runs = {"fine-tuned": score(tuned)}
    del tuned
    scored = {}
    for label, path in others:
        # The model before is gone, with what the decoding engine kept for it (its caches and graphs),
        # before the next one loads: collected now, whatever cycles hold it, and its entries dropped.
        gc.collect()
        engine.drop_collected()
        # A comparison that names the base of a random-init adapter is rebuilt from its record.
        scored[label] = score(load_final(path, recorded_by=adapter or model, what="--compare", dtype=dtype))
    runs = {**scored, **runs}
    for label, (_, metrics, _) in runs.items():
        results["models"][label] = metrics
    logs = _run_logs(results)
    curves = _training_curves(_run_log(Path(adapter or model))[1])
    differ = _largest_differences(split, runs) if others else []
    with ckpt.atomic_dir(out) as tmp:
        with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
            texts = zip(list(split.dataset["source"]), list(split.dataset["target"]), strict=True)
            for i, (source, target) in enumerate(texts):  # whole columns: dataset[i] reads a whole row
                row = {"source": source, "reference": target}
                for label, (predictions, _, per_row) in runs.items():
                    row[label] = {"prediction": predictions[i], "scores": per_row[i]}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(results, indent=2))
        drawn = figures.draw_report(
            tmp, results["models"], {label: run[0] for label, run in runs.items()},
            list(split.dataset["target"]), _label_rows(split), logs,
        )  # fmt: skip
        (tmp / "report.md").write_text(_markdown(results, curves, differ, drawn), encoding="utf-8")
        (tmp / "report.html").write_text(_html(results, drawn, differ), encoding="utf-8")
    results["out"] = str(out)
    # The report stands whatever happens to the card: a card that cannot be updated is a note.
    try:
        card = add_scores(adapter or model, results["models"]["fine-tuned"], recipe.data, role)
        results["card"] = str(card) if card else None
    except (ModelLoadError, OSError) as e:
        results["card"], results["card_note"] = None, f"model card not updated: {e}"
    return results


REPORT_FILES = {"predictions.jsonl", "metrics.json", "report.md", "report.html", *figures.FILES}


def _check_out(out: Path) -> None:
    """A report replaces an earlier report, never a folder holding anything else."""
    if out.exists() and (not out.is_dir() or set(p.name for p in out.iterdir()) - REPORT_FILES):
        raise ConfigError(
            [f"--out: {out} exists and holds other files than an eval report; choose another folder"]
        )


def _run_log(model_dir: Path) -> tuple[Path | None, list[dict]]:
    """The metrics.jsonl (path, records) of the run whose final/ (or checkpoint) this model is."""
    if not model_dir.is_dir():  # a hub id names no run (and its parent is no run folder)
        return None, []
    for folder in (model_dir.parent, model_dir.parent.parent):
        log = folder / "metrics.jsonl"
        if log.is_file():
            records = []
            for line in log.read_text().splitlines():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line torn by a kill in the middle of a write
            return log, [r for r in records if isinstance(r, dict) and "step" in r]
    return None, []


def _run_logs(results: dict) -> dict[str, list[dict]]:
    """The training logs of the runs the compared models came from, by model name; names of models
    from the same run share its entry ("sft, fine-tuned")."""
    paths = {**results["compare"], "fine-tuned": results["adapter"] or results["model"]}
    names: dict[Path, list[str]] = {}
    logs: dict[Path, list[dict]] = {}
    for name in results["models"]:
        log, records = _run_log(Path(paths[name]))
        if log is not None:
            names.setdefault(log.resolve(), []).append(name)
            logs[log.resolve()] = records
    return {", ".join(names[log]): records for log, records in logs.items()}


def _training_curves(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The numeric series of a run's records, by key, for report.md's summary table."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key not in ("step", "epoch", "tokens_per_s", "grad_norm", "first_step_s") and isinstance(
                value, (int, float)
            ):
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def _label_rows(split) -> list[figures.LabelRows]:
    """The rows of each classification or multiple-choice task of the split (for confusion matrices)."""
    tasks = list(split.dataset["task"])
    found = []
    for name, task in split.tasks.items():
        rows = [i for i, t in enumerate(tasks) if t == name]
        if rows and task.labels:
            found.append(figures.LabelRows(name, rows, task.labels))
        elif rows and task.multiple_choice:
            choices = split.dataset.select(rows)["choices"]
            found.append(figures.LabelRows(name, rows, None, [list(c) for c in choices]))
    return found


def _main_score(scores: dict) -> float:
    for key in ("rougeL", "exact_match", "mc_accuracy", "accuracy", "bleu", "chrf", "f1", "format_rate"):
        if key in scores:
            return scores[key]
    return 0.0


def compare_models(compare: str | list[str] | None) -> list[tuple[str, str]]:
    """[(name, path)] from `NAME=PATH` or `PATH` items; names must differ from each other."""
    items = [compare] if isinstance(compare, str) else list(compare or [])
    pairs = []
    for i, item in enumerate(items):
        name, sep, path = item.partition("=")
        if not sep or "/" in name or not name:
            name, path = ("base" if i == 0 else f"compare-{i + 1}"), item
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names) or "fine-tuned" in names:
        raise ConfigError([f"--compare: names must be distinct and not 'fine-tuned', got {names}"])
    return pairs


def _largest_differences(split, runs, n: int = 10) -> list[dict]:
    """Rows where the evaluated model and the first comparison differ most in the main score."""
    first = next(iter(runs))
    base_rows, tuned_rows = runs[first][2], runs["fine-tuned"][2]
    order = sorted(
        range(len(base_rows)), key=lambda i: -abs(_main_score(tuned_rows[i]) - _main_score(base_rows[i]))
    )
    return [{"source": split.dataset[i]["source"], "reference": split.dataset[i]["target"],
             "base": runs[first][0][i], "fine-tuned": runs["fine-tuned"][0][i], "base_name": first,
             "difference": _main_score(tuned_rows[i]) - _main_score(base_rows[i])} for i in order[:n]]  # fmt: skip


def metric_rows(results: dict) -> list[tuple[str, list[str]]]:
    models = results["models"]
    keys = list(dict.fromkeys(k for m in models.values() for k in m))
    rows = []
    for key in keys:
        values = [f"{models[m][key]:.2f}" if key in models[m] else "" for m in models]
        if len(models) >= 2:
            first, last = (models[m].get(key) for m in (next(iter(models)), list(models)[-1]))
            values.append(f"{last - first:+.2f}" if first is not None and last is not None else "")
        rows.append((key, values))
    return rows


def difference_label(models) -> str:
    """The difference column: the evaluated model minus the first comparison."""
    return "difference" if len(models) == 2 else f"fine-tuned − {next(iter(models))}"


def _markdown(results: dict, curves: dict, differ: list[dict], drawn: list[figures.Drawn]) -> str:
    models = list(results["models"])
    header = ["metric", *models] + ([difference_label(models)] if len(models) >= 2 else [])
    lines = [f"# Evaluation: {results['model']}" + (f" + {results['adapter']}" if results["adapter"] else ""), "",
             f"{results['rows']} rows of the {results['split']} split.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]  # fmt: skip
    lines += ["| " + " | ".join([key, *values]) + " |" for key, values in metric_rows(results)]
    if curves:
        lines += ["", "## Training run", "", "| series | first | last | min | max |", "|---|---|---|---|---|"]
        for name, points in curves.items():
            values = [v for _, v in points]
            lines.append(
                f"| {name} | {values[0]:.4g} | {values[-1]:.4g} | {min(values):.4g} | {max(values):.4g} |"
            )
        lines += ["", "The curves are plotted in report.html."]
    if drawn:
        lines += ["", "## Figures"] + [line for d in drawn for line in ("", f"![{d.title}]({d.file})")]
    if differ:
        lines += ["", "## Rows where the models differ most", ""]
        for d in differ:
            lines += [f"- **source**: {d['source'][:300]}", f"  - reference: {d['reference']}", f"  - {d['base_name']}: {d['base']}",
                      f"  - fine-tuned: {d['fine-tuned']} ({d['difference']:+.1f})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def _html(results: dict, drawn: list[figures.Drawn], differ: list[dict]) -> str:
    models = list(results["models"])
    header = ["metric", *models] + ([difference_label(models)] if len(models) >= 2 else [])
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    for key, values in metric_rows(results):
        table += "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in [key, *values]) + "</tr>"
    table += "</table>"
    evaluation = "".join(f"<figure>{d.svg}</figure>" for d in drawn if d.name not in figures.TRAINING)
    training = "".join(f"<figure>{d.svg}</figure>" for d in drawn if d.name in figures.TRAINING)
    rows = "".join(
        f"<tr><td>{html.escape(d['source'][:300])}</td><td>{html.escape(d['reference'])}</td>"
        f"<td>{html.escape(d['base'])}</td><td>{html.escape(d['fine-tuned'])}</td><td>{d['difference']:+.1f}</td></tr>"
        for d in differ
    )
    differ_html = (f"<h2>Rows where the models differ most</h2><table><tr><th>source</th><th>reference</th><th>{html.escape(differ[0]['base_name'])}</th>"
                   f"<th>fine-tuned</th><th>difference</th></tr>{rows}</table>") if differ else ""  # fmt: skip
    title = html.escape(results["model"] + (f" + {results['adapter']}" if results["adapter"] else ""))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>flantune eval: {title}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}}figure{{margin:1em 0}}
svg{{max-width:100%;height:auto}}</style>
</head><body><h1>Evaluation: {title}</h1><p>{results["rows"]} rows of the {html.escape(results["split"])} split.</p>
{table}{evaluation}<h2>Training curves</h2>{training or "<p>No training log found beside the models.</p>"}{differ_html}
</body></html>
"""
