"""flantune eval: reports whose numbers follow from their predictions, and fair comparisons."""

import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest

from flantune.config import ConfigError, recipe_from_dict
from flantune.decoding import generate_texts
from flantune.evaluate import run_eval
from flantune.figures import TITLES
from flantune.models import ModelLoadError
from flantune.quickstart import build_tokenizer, make_rows, write_jsonl
from flantune.train import train

from .conftest import ROOT, load_for_generation
from .test_train import METHODS


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """The quickstart's small T5 and word-level tokenizer, fully fine-tuned from random weights on
    sorting letters (learns in 300 steps), with a test split and an eval every 100 steps."""
    folder = tmp_path_factory.mktemp("eval")
    model_dir = folder / "model"
    model_dir.mkdir()
    build_tokenizer(model_dir)
    rng = random.Random(0)
    write_jsonl(folder / "train.jsonl", make_rows(2000, rng))
    write_jsonl(folder / "test.jsonl", make_rows(24, rng))
    result = train(sort_recipe(folder, model_dir, folder / "run", steps=300))
    return sort_recipe(folder, model_dir, folder / "run", steps=300), model_dir, result.final_dir


def sort_recipe(folder, model_dir, out, steps, method=None, data=None, rl=None):
    return recipe_from_dict({
        "model": {"path": str(model_dir), "init": "random"},
        "method": method or {"kind": "full"},
        "data": {"task": "template", "task_options": {"source": "{text}", "target": "{sorted}", "metrics": ["exact_match"]},
                 "train": str(folder / "train.jsonl"), "eval": str(folder / "test.jsonl"),
                 "test": str(folder / "test.jsonl"), "max_source_tokens": 16, "max_target_tokens": 16, **(data or {})},
        "train": {"max_steps": steps, "batch_size": 32, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 30,
                  "log_every": 10, "eval_every": 100, "precision": "fp32"},
        "generation": {"max_new_tokens": 12},
        **({"rl": rl} if rl else {}),
        "output_dir": str(out),
    })  # fmt: skip


def read_predictions(out):
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def inline_figures(page: str) -> dict[str, str]:
    """report.html's inline <svg> figures by their title (aria-label)."""
    found = re.finditer(r'<svg role="img" aria-label="([^"]*)".*?</svg>', page, re.DOTALL)
    return {match[1]: match[0] for match in found}


def check_figure_files(out, names):
    """The figures drawn are exactly `names`, inline in report.html and as PNG files beside it."""
    page = (out / "report.html").read_text()
    assert set(inline_figures(page)) == {TITLES[n] for n in names}
    assert {p.name for p in out.glob("figure-*")} == {f"figure-{n}.png" for n in names}
    for name in names:
        assert (out / f"figure-{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](figure-{name}.png)" in (out / "report.md").read_text()
    return inline_figures(page)


def test_report_numbers_follow_from_predictions(tuned_run, tmp_path):
    recipe, _, final = tuned_run
    results = run_eval(recipe, str(final), out=tmp_path / "report")
    out = tmp_path / "report"
    figures = ("scores", "lengths", "training")  # no confusion matrix: not a label task
    assert {p.name for p in out.iterdir()} == {
        "predictions.jsonl",
        "metrics.json",
        "report.md",
        "report.html",
        *(f"figure-{name}.png" for name in figures),
    }
    rows = read_predictions(out)
    assert len(rows) == results["rows"] == 24
    # Exact match of the split is the mean of the per-row 0/100 scores, and agrees with the texts.
    em = [r["fine-tuned"]["scores"]["exact_match"] for r in rows]
    assert em == [100.0 if r["fine-tuned"]["prediction"] == r["reference"] else 0.0 for r in rows]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["fine-tuned"]["exact_match"] == pytest.approx(sum(em) / len(em))
    # The predictions are what plain generation with the same settings gives on the same sources.
    model, tokenizer = load_for_generation(str(final))
    direct = generate_texts(model, tokenizer, [r["source"] for r in rows], recipe.generation)
    assert [r["fine-tuned"]["prediction"] for r in rows] == direct
    md = (out / "report.md").read_text()
    assert f"| exact_match | {sum(em) / len(em):.2f} |" in md
    assert "## Training run" in md
    # matplotlib's figures, inline and as files: the score bars carry the score, the lengths are drawn,
    # and the training curves of the run's metrics.jsonl (loss, lr and the eval metric) by their legends.
    svgs = check_figure_files(out, figures)
    assert f">{sum(em) / len(em):.1f}</text>" in svgs[TITLES["scores"]]
    assert ">reference</text>" in svgs[TITLES["lengths"]] and ">fine-tuned</text>" in svgs[TITLES["lengths"]]
    for series in ("train loss", "eval_loss", "lr", "eval_exact_match"):
        assert f">{series}</text>" in svgs[TITLES["training"]]


def test_compare_scores_both_models_on_the_same_rows(tuned_run, tmp_path):
    recipe, model_dir, final = tuned_run
    # The run's recorded base (random init, seed 0) is rebuilt for the comparison.
    results = run_eval(recipe, str(final), compare=str(model_dir), out=tmp_path / "cmp", split_name="test")
    rows = read_predictions(tmp_path / "cmp")
    assert all(set(r) == {"source", "reference", "base", "fine-tuned"} for r in rows)
    base_model, tokenizer = load_for_generation(str(model_dir), None, recorded_by=str(final))
    base_direct = generate_texts(base_model, tokenizer, [r["source"] for r in rows], recipe.generation)
    assert [r["base"]["prediction"] for r in rows] == base_direct
    base_em = sum(r["base"]["scores"]["exact_match"] for r in rows) / len(rows)
    tuned_em = sum(r["fine-tuned"]["scores"]["exact_match"] for r in rows) / len(rows)
    assert results["models"]["base"]["exact_match"] == pytest.approx(base_em)
    assert results["models"]["fine-tuned"]["exact_match"] == pytest.approx(tuned_em)
    assert tuned_em > base_em + 50  # 300 steps on 'sort' beat the random base by far
    md = (tmp_path / "cmp" / "report.md").read_text()
    assert "| metric | base | fine-tuned | difference |" in md
    assert f"{tuned_em - base_em:+.2f}" in md
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "Rows where the models differ most" in page
    # The first row listed is one where the two models' scores differ by the most.
    best = max(
        abs(r["fine-tuned"]["scores"]["exact_match"] - r["base"]["scores"]["exact_match"]) for r in rows
    )
    assert f"{best:+.1f}" in page or f"{-best:+.1f}" in page


def test_eval_decodes_from_the_splits_ids_where_its_tokenizer_made_them(tuned_run, tmp_path, monkeypatch):
    """The evaluated model decodes from the split's input_ids (no second tokenization); a compared
    model, loaded with its own tokenizer, tokenizes the sources itself."""
    from flantune import scoring

    recipe, model_dir, final = tuned_run
    given, real = [], scoring.generate_texts
    monkeypatch.setattr(scoring, "generate_texts",
                        lambda *a, **k: given.append(k["encoded"] is not None) or real(*a, **k))  # fmt: skip
    run_eval(recipe, str(final), compare=str(model_dir), out=tmp_path / "ids", split_name="test")
    assert given == [True, False]


def test_eval_command_end_to_end(tuned_run, tmp_path):
    recipe, model_dir, final = tuned_run
    path = tmp_path / "recipe.yaml"
    from flantune.config import dump_recipe

    path.write_text(dump_recipe(recipe))
    result = subprocess.run(
        [sys.executable, "-m", "flantune.cli", "eval", str(path), "eval.max_rows=5", "--model", str(final),
         "--compare", str(model_dir), "--out", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "exact_match" in result.stdout and "difference" in result.stdout
    assert len(read_predictions(tmp_path / "r")) == 5  # eval.max_rows: the first 5 rows, for both models


def test_eval_in_bfloat16(tuned_run, tmp_path, monkeypatch):
    """--dtype bfloat16: the evaluated model and its comparison generate with bf16 weights (half the
    memory), metrics.json records it, and this model that sorts letters still scores as it does in
    float32 (a near-perfect exact match)."""
    import flantune.evaluate as evaluate

    recipe, model_dir, final = tuned_run
    seen = []
    real = evaluate.score_split
    monkeypatch.setattr(evaluate, "score_split", lambda model, *a, **k: seen.append(
        {p.dtype for p in model.parameters()}) or real(model, *a, **k))  # fmt: skip
    full = run_eval(recipe, str(final), out=tmp_path / "fp32")
    half = run_eval(recipe, str(final), compare=str(model_dir), out=tmp_path / "bf16", dtype="bfloat16")
    import torch

    assert seen == [{torch.float32}, {torch.bfloat16}, {torch.bfloat16}]
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert (metrics["dtype"], full["dtype"]) == ("bfloat16", "float32")
    em = half["models"]["fine-tuned"]["exact_match"]
    assert em >= 90 and abs(em - full["models"]["fine-tuned"]["exact_match"]) <= 10, (em, full["models"])


def test_eval_errors(tuned_run, tmp_path):
    recipe, model_dir, final = tuned_run
    with pytest.raises(ModelLoadError, match="does not exist"):
        run_eval(recipe, str(tmp_path / "missing"), out=tmp_path / "a")
    with pytest.raises(ModelLoadError, match="no adapter_config.json"):
        run_eval(recipe, str(model_dir), adapter=str(final), out=tmp_path / "a")
    with pytest.raises(ConfigError, match="--split"):
        run_eval(recipe, str(final), split_name="dev", out=tmp_path / "a")
    recipe_without_test = sort_recipe(final.parent.parent, model_dir, tmp_path / "run", 1)
    recipe_without_test.data.test = None
    with pytest.raises(ConfigError, match=r"data\.test"):
        run_eval(recipe_without_test, str(final), out=tmp_path / "a")
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds other files"):
        run_eval(recipe, str(final), out=keep)
    assert (keep / "notes.txt").read_text() == "mine"
    result = subprocess.run(
        [sys.executable, "-m", "flantune.cli", "eval", str(ROOT / "recipes/offline/sciq-lora.yaml"), "--model",
         str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_an_adapter_folder_stands_for_its_base_plus_adapter(tuned_run, tmp_path):
    """`--model runs/x/final` of a LoRA run equals `--model BASE --adapter runs/x/final`."""
    recipe, model_dir, final = tuned_run
    lora_recipe = sort_recipe(final.parent.parent, model_dir, tmp_path / "lora", 3, METHODS["lora"])
    lora_recipe.train.eval_every = None
    lora = train(lora_recipe)
    sources = ["sort: a c b", "sort: q e d"]
    outputs = []
    for args in ((str(lora.final_dir),), (str(model_dir), str(lora.final_dir))):
        model, tokenizer = load_for_generation(*args)
        outputs.append(generate_texts(model, tokenizer, sources, recipe.generation))
    assert outputs[0] == outputs[1]
    with pytest.raises(ModelLoadError, match="adapter folder"):
        load_for_generation(str(lora.final_dir), str(lora.final_dir))


def test_three_models_in_one_report(tuned_run, tmp_path):
    """base vs SFT vs RL style: the evaluated model and two named comparisons on the same rows."""
    recipe, model_dir, final = tuned_run
    results = run_eval(
        recipe, str(final), compare=[f"base={model_dir}", f"again={final}"], out=tmp_path / "r"
    )
    assert list(results["models"]) == ["base", "again", "fine-tuned"]
    # the same model under two names: the same predictions row by row
    rows = read_predictions(tmp_path / "r")
    assert all(r["again"]["prediction"] == r["fine-tuned"]["prediction"] for r in rows)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| metric | base | again | fine-tuned | fine-tuned − base |" in md
    with pytest.raises(ConfigError, match="distinct"):
        run_eval(recipe, str(final), compare=[f"x={model_dir}", f"x={final}"], out=tmp_path / "s")


def test_in_training_evaluation_scores_as_flantune_eval(tmp_path):
    """With generation.restrict_to_labels, the scores a run logs at its evaluation (which pick its
    best checkpoint) are the ones `flantune eval` reports for that checkpoint on the same rows:
    one scoring path, the label restriction included."""
    import string

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    build_tokenizer(model_dir)
    rng = random.Random(1)
    rows = []
    for _ in range(160):
        letters = rng.sample(string.ascii_lowercase, 4)
        # Two labels of several tokens each, so decoding walks the label trie.
        rows.append({"text": " ".join(letters), "label": "y e s" if letters[0] < letters[-1] else "n o"})
    write_jsonl(tmp_path / "train.jsonl", rows[:120])
    write_jsonl(tmp_path / "eval.jsonl", rows[120:])
    recipe = recipe_from_dict({
        "model": {"path": str(model_dir), "init": "random"},
        "method": {"kind": "full"},
        "data": {"task": "template",
                 "task_options": {"source": "{text}", "target": "{label}", "labels": ["y e s", "n o"],
                                  "metrics": ["accuracy"]},
                 "train": str(tmp_path / "train.jsonl"), "eval": str(tmp_path / "eval.jsonl"),
                 "max_source_tokens": 16, "max_target_tokens": 8},
        "train": {"max_steps": 2, "batch_size": 16, "lr": 1e-4, "eval_every": 1, "precision": "fp32"},
        "eval": {"max_rows": 30},
        "generation": {"max_new_tokens": 6, "restrict_to_labels": True},
        "output_dir": str(tmp_path / "run"),
    })  # fmt: skip
    result = train(recipe)
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["eval_accuracy"] for r in logged if "eval_accuracy" in r}
    assert set(scores) == {1, 2} and result.best_step in scores
    report = run_eval(recipe, str(result.final_dir), split_name="eval", out=tmp_path / "report")
    assert report["rows"] == 30
    predictions = [row["fine-tuned"]["prediction"] for row in read_predictions(tmp_path / "report")]
    assert set(predictions) <= {"y e s", "n o"}
    # Two steps from random weights: unrestricted, the model writes no label at all (accuracy 0).
    # final/ holds the best checkpoint: flantune eval scores it as the run did when it chose it.
    assert report["models"]["fine-tuned"]["accuracy"] == scores[result.best_step] > 0


def test_a_label_task_report_has_a_confusion_matrix_per_model(tuned_run, tmp_path):
    """The sorting model read as a classifier: each source's label is its letters sorted, but a third
    of the labels are deliberately another label, so the fine-tuned model's matrix has off-diagonal
    cells; the random base rarely writes a label at all (the other/invalid column)."""
    _, model_dir, final = tuned_run
    labels = ["a b c", "a b d", "a c d", "b c d"]
    rng = random.Random(3)
    rows = []
    for i in range(24):
        letters = rng.sample("abcd", 3)
        label = " ".join(sorted(letters)) if i % 3 else rng.choice(labels)
        rows.append({"text": "sort: " + " ".join(letters), "label": label})
    write_jsonl(tmp_path / "labels.jsonl", rows)
    options = {"source": "{text}", "target": "{label}", "labels": labels, "metrics": ["accuracy", "macro_f1"]}
    label_recipe = sort_recipe(tmp_path, model_dir, final.parent, 1, data={
        "task_options": options, "test": str(tmp_path / "labels.jsonl")})  # fmt: skip
    results = run_eval(label_recipe, str(final), compare=str(model_dir), out=tmp_path / "r")
    svgs = check_figure_files(tmp_path / "r", ("scores", "confusion", "lengths", "training"))
    cells = {
        tuple(map(int, cell)): int(count)
        for *cell, count in re.findall(
            r'<g id="confusion-(\d+)-(\d+)-(\d+)-(\d+)">\s*<text[^>]*>(\d+)</text>', svgs[TITLES["confusion"]]
        )
    }
    predictions = read_predictions(tmp_path / "r")
    for m, model in enumerate(["base", "fine-tuned"]):
        # Counted here from predictions.jsonl: reference label (row) by predicted label or other (column).
        expected = Counter()
        for r in predictions:
            predicted = r[model]["prediction"].strip()
            expected[labels.index(r["reference"]), labels.index(predicted) if predicted in labels else 4] += 1
        drawn = {(row, column): n for (t, mm, row, column), n in cells.items() if (t, mm) == (0, m)}
        assert drawn == {(row, column): expected[row, column] for row in range(4) for column in range(5)}
        diagonal = sum(drawn[k, k] for k in range(4))
        assert results["models"][model]["accuracy"] == pytest.approx(100 * diagonal / len(predictions))
    # Not a trivial matrix: the fine-tuned model gives the deliberately wrong labels, the base other text.
    assert sum(n for (_, m, row, column), n in cells.items() if m == 1 and row != column < 4) > 0
    assert sum(n for (_, m, _, column), n in cells.items() if m == 0 and column == 4) > 0


def test_an_rl_run_report_draws_reward_kl_and_completion_length(tuned_run, tmp_path):
    """base → SFT → RL: the RL model's report draws its run's rewards, KL and completion length from
    rl/metrics.jsonl, and the training curves of both runs (SFT's metrics.jsonl and RL's)."""
    from flantune.rl import run_rl

    recipe, model_dir, final = tuned_run
    rl_recipe = sort_recipe(final.parent.parent, model_dir, final.parent, 300, data={"eval": None}, rl={
        "start": str(final), "output_dir": str(tmp_path / "rl"), "max_steps": 2, "prompts_per_step": 4,
        "group_size": 2, "inner_steps": 1, "lr": 1e-4, "eval_every": None, "save_every": None,
        "rewards": [{"name": "correct"}, {"name": "length", "weight": 0.1}]})  # fmt: skip
    rl_final = run_rl(rl_recipe).final_dir
    run_eval(recipe, str(rl_final), compare=f"sft={final}", out=tmp_path / "r")
    svgs = check_figure_files(tmp_path / "r", ("scores", "lengths", "training", "rl"))
    rl = svgs[TITLES["rl"]]
    for text in ("reward (weighted total)", "reward_correct", "reward_length", "kl", "completion_tokens"):
        assert f">{text}</text>" in rl, text
    assert ">fine-tuned: KL to the reference</text>" in rl and ">sft: " not in rl  # SFT's log has no rewards
    for run in ("sft", "fine-tuned"):
        assert f">{run}: loss</text>" in svgs[TITLES["training"]]
