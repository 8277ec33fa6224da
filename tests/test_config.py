"""Recipes: every shipped one parses; bad ones fail at once with the dotted key and what is expected."""

import subprocess
import sys
from pathlib import Path

import pytest

from flantune.config import ConfigError, DataSource, load_recipe, parse_yaml, recipe_from_dict

from .conftest import ROOT, need

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
MINIMAL = {"model": {"path": "google/flan-t5-small"}, "data": {"task": "sciq", "train": "allenai/sciq:train"}}


def problems_of(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(raw)
    return info.value.problems


def with_(section: str, **values):
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    raw.setdefault(section, {}).update(values)
    return raw


def test_there_are_recipes_for_every_seed_task():
    tasks = set()
    for path in RECIPES:
        data = parse_yaml(path.read_text())["data"]
        tasks.update([data["task"]] if "task" in data else [m["task"] for m in data["mixture"]])
    expected = {"sciq", "squad_qa", "squad_qg", "samsum", "imdb_sentiment", "emotion", "paws_paraphrase",
                "paws_similarity", "mlqa", "wmt16_en_de", "openorca", "hc3", "template"}  # fmt: skip
    assert expected <= tasks


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_every_shipped_recipe_parses(path):
    recipe = load_recipe(path)
    assert recipe.model.path
    assert recipe.data.task or recipe.data.mixture
    if "offline" in path.parts:
        # Offline variants use only local files, so tests and smoke runs need no hub.
        assert recipe.model.init == "random" and Path(recipe.model.path).parts[:2] == ("..", "shared")
        sources = [recipe.data.train, recipe.data.eval, recipe.data.test]
        sources += [s for m in recipe.data.mixture for s in (m.train, m.eval)]
        for source in filter(None, sources):
            if Path(source.path).parts[:2] == ("..", "shared"):
                need(ROOT / source.path)
            else:
                assert (ROOT / source.path).is_file(), source.path


def test_unknown_key_names_its_path_and_suggests():
    [problem] = problems_of(with_("train", learning_rate=1e-4))
    assert problem.startswith("train.learning_rate: unknown key")
    assert "expected one of:" in problem and "lr" in problem
    [problem] = problems_of(with_("model", dtpye="bfloat16"))
    assert "model.dtpye: unknown key (did you mean dtype?)" in problem
    [problem] = problems_of({**MINIMAL, "trian": {}})
    assert "trian: unknown key (did you mean train?)" in problem


@pytest.mark.parametrize(
    ("section", "values", "expected"),
    [
        ("train", {"batch_size": "8"}, "train.batch_size: expected an integer, got string '8'"),
        ("train", {"batch_size": 8.5}, "train.batch_size: expected an integer, got number 8.5"),
        ("train", {"batch_size": True}, "train.batch_size: expected an integer, got boolean True"),
        ("train", {"lr": "fast"}, "train.lr: expected a number, got string 'fast'"),
        ("train", {"gradient_checkpointing": "yes"}, "train.gradient_checkpointing: expected true or false"),
        (
            "model",
            {"init": "randm"},
            "model.init: expected one of 'pretrained', 'random', got string 'randm'",
        ),
        (
            "method",
            {"kind": "lora2"},
            "method.kind: expected one of 'full', 'lora', 'qlora', 'adapter', 'ia3', 'prefix'",
        ),
        ("method", {"bits": 3}, "method.bits: expected one of 4, 8, got integer 3"),
        (
            "method",
            {"target_modules": "q"},
            "method.target_modules: expected a list of strings or one of 'all-linear'",
        ),
        (
            "method",
            {"target_modules": ["q", 1]},
            "method.target_modules[1]: expected a string, got integer 1",
        ),
        ("data", {"overlong": "cut"}, "data.overlong: expected one of 'drop', 'truncate', 'error'"),
        ("data", {"train": {"path": "x", "rows": "a:b"}}, "data.train.rows: expected a slice like '0:800'"),
        ("data", {"train": {"split": "train"}}, "data.train.path: missing required value (a string)"),
        ("data", {"train": 3}, "data.train: expected a data source"),
        (
            "model",
            {"add_tokens": "<think>"},
            "model.add_tokens: expected a list of strings, got string '<think>'",
        ),
        ("generation", {"top_p": 0.0}, "generation.top_p: must be in (0, 1]"),
        ("method", {"r": 0}, "method.r: must be a positive integer, got 0"),
    ],
)
def test_wrong_values_name_the_key_and_the_expectation(section, values, expected):
    problems = problems_of(with_(section, **values))
    assert any(p.startswith(expected) for p in problems), problems


def test_missing_required_values():
    problems = problems_of({"data": {"task": "sciq"}})
    assert problems == ["model: missing required value (a mapping)"]
    problems = problems_of({"model": {}, "data": {}})
    assert "model.path: missing required value (a string)" in problems
    assert any(p.startswith("data.task: missing required value") for p in problems)


def test_all_problems_are_reported_together():
    raw = with_("train", lr="x", batch_size="y")
    raw["model"]["init"] = "z"
    assert len(problems_of(raw)) == 3


def test_data_source_shorthand_and_mapping():
    recipe = recipe_from_dict(
        with_("data", eval={"path": "facebook/mlqa", "name": "mlqa.hi.en", "split": "test"})
    )
    assert recipe.data.train == DataSource(path="allenai/sciq", split="train")
    assert recipe.data.eval == DataSource(path="facebook/mlqa", name="mlqa.hi.en", split="test")


def test_yaml_numbers_read_the_way_people_write_them():
    # YAML 1.1 reads 1e-4 as a string and 1:30 as the integer 90; recipes mean a float and a slice.
    assert parse_yaml("lr: 1e-4\nrows: 1:30\nn: 3\nx: 2.5") == {"lr": 1e-4, "rows": "1:30", "n": 3, "x": 2.5}


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: google/flan-t5-small}\ndata: {task: sciq, train: allenai/sciq:train}\n")
    recipe = load_recipe(path, ["train.lr=1e-4", "method.target_modules=[q, k, v]", "data.train.rows=0:100",
                                "model.add_tokens=[<think>, </think>]", "train.max_steps=null", "output_dir=/tmp/x"])  # fmt: skip
    assert recipe.train.lr == 1e-4
    assert recipe.method.target_modules == ["q", "k", "v"]
    assert recipe.data.train == DataSource(path="allenai/sciq", split="train", rows="0:100")
    assert recipe.model.add_tokens == ["<think>", "</think>"]
    assert recipe.output_dir == "/tmp/x"
    with pytest.raises(
        ConfigError, match=r"override train\.lr: expected section.key=value|expected section\.key=value"
    ):
        load_recipe(path, ["train.lr"])
    with pytest.raises(ConfigError, match="train.lrr: unknown key"):
        load_recipe(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"override model\.path\.x: model\.path is a value, not a section"):
        load_recipe(path, ["model.path.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_recipe(bad)


def test_cli_reports_recipe_errors_without_traceback(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: x, init: randm}\ndata: {task: sciq}\ntrain: {lr: fast}\n")
    result = subprocess.run(
        [sys.executable, "-m", "flantune.cli", "check", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "model.init: expected one of 'pretrained', 'random'" in result.stderr
    assert "train.lr: expected a number" in result.stderr


def test_cli_check_prints_the_resolved_recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: x}\ndata: {task: sciq}\n")
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "check", str(path), "train.lr=0.001"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = parse_yaml(result.stdout)
    assert resolved["train"]["lr"] == 0.001 and resolved["method"]["kind"] == "lora"


@pytest.mark.parametrize("steps", [[3], [0, 2], [5, 4]])
def test_profile_steps_need_a_first_and_last_step(steps):
    [problem] = problems_of(with_("train", profile_steps=steps))
    assert problem.startswith("train.profile_steps: expected [first, last] with 1 <= first <= last")
