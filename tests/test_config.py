"""Recipes: every shipped one parses; bad ones fail at once with the dotted key and what is expected."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from flantune.config import (
    ConfigError,
    DataSource,
    load_recipe,
    merge_recipes,
    parse_yaml,
    recipe_from_dict,
)

from .conftest import ROOT, need

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
OFFLINE = sorted((ROOT / "recipes" / "offline").glob("*.yaml"))
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
        data = load_recipe(path).data
        tasks.update([data.task] if data.task else [m.task for m in data.mixture])
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
        ("eval", {"batch_size": "big"}, "eval.batch_size: expected an integer or one of 'auto', got string 'big'"),
        ("eval", {"batch_size": 0}, "eval.batch_size: must be at least 1 or auto, got 0"),
        ("eval", {"max_rows": 0}, "eval.max_rows: must be at least 1 or null, got 0"),
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


# ----------------------------------------------------------------------------------------------
# `extends`: a recipe laid over another one.


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BASE = """\
model: {path: google/flan-t5-small, dtype: bfloat16}
method: {kind: lora, r: 8, target_modules: [q, k, v, o]}
data:
  task: sciq
  task_options: {include_support: false}
  train: {path: allenai/sciq, split: train, rows: '0:800'}
  eval: allenai/sciq:validation
  test: allenai/sciq:test
train: {lr: 1e-4, batch_size: 16, eval_every: 500}
output_dir: runs/base
"""


def test_merge_recipes_merges_mappings_and_replaces_everything_else():
    base = {"a": {"b": 1, "c": {"d": 2, "e": 3}}, "l": [1, 2, 3], "s": "x", "n": {"k": 1}, "m": "short"}
    overlay = {"a": {"c": {"e": 30, "f": 4}}, "l": [9], "s": None, "n": None, "m": {"path": "p"}, "new": 5}
    merged = merge_recipes(base, overlay)
    assert merged == {"a": {"b": 1, "c": {"d": 2, "e": 30, "f": 4}}, "l": [9], "s": None, "n": None,
                      "m": {"path": "p"}, "new": 5}  # fmt: skip
    assert base["a"]["c"] == {"d": 2, "e": 3}  # the base is left as it was


def test_an_overlay_is_merged_onto_the_recipe_it_extends(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    overlay = write(
        tmp_path / "variants" / "small.yaml",
        "extends: ../base.yaml\n"
        "model: {path: ../shared/assets/flan-t5-small, init: random}\n"  # nested: dtype stays
        "method: {target_modules: [q]}\n"  # a list is replaced, not extended
        "data: {train: {rows: '0:10'}, eval: local/eval.jsonl, test: null}\n"
        "train: {eval_every: null}\n",
    )
    recipe = load_recipe(overlay)
    assert recipe.model.path == "../shared/assets/flan-t5-small" and recipe.model.init == "random"
    assert recipe.model.dtype == "bfloat16"
    assert recipe.method.target_modules == ["q"] and recipe.method.r == 8
    assert recipe.data.task_options == {"include_support": False}
    assert recipe.data.train == DataSource(path="allenai/sciq", split="train", rows="0:10")
    assert recipe.data.eval == DataSource(path="local/eval.jsonl")  # the shorthand replaces a source
    assert recipe.data.test is None and recipe.train.eval_every is None
    assert (recipe.train.lr, recipe.train.batch_size, recipe.output_dir) == (1e-4, 16, "runs/base")


def test_extends_is_relative_to_the_file_and_other_paths_to_the_working_directory(tmp_path, monkeypatch):
    write(tmp_path / "recipes" / "base.yaml", BASE.replace("allenai/sciq:validation", "data/eval.jsonl"))
    overlay = write(tmp_path / "recipes" / "offline" / "o.yaml", "extends: ../base.yaml\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, path in ((tmp_path, "recipes/offline/o.yaml"), (elsewhere, overlay)):
        monkeypatch.chdir(cwd)
        recipe = load_recipe(path)
        assert recipe.data.eval.path == "data/eval.jsonl"  # not rewritten relative to either file
        assert recipe.model.path == "google/flan-t5-small"


def test_an_overlay_of_an_overlay(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    write(tmp_path / "a" / "mid.yaml", "extends: ../base.yaml\ntrain: {lr: 2e-4, batch_size: 4}\n")
    top = write(tmp_path / "b" / "top.yaml", "extends: ../a/mid.yaml\ntrain: {batch_size: 2}\n")
    recipe = load_recipe(top)
    assert (recipe.train.lr, recipe.train.batch_size, recipe.method.r) == (2e-4, 2, 8)


def test_a_cycle_names_the_files(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n" + BASE)
    write(tmp_path / "b.yaml", "extends: sub/../a.yaml\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(ConfigError, match="cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    [problem] = info.value.problems
    assert problem == f"extends: the recipes extend each other in a cycle: {tmp_path / 'a.yaml'} -> " \
        f"{tmp_path / 'b.yaml'} -> {tmp_path / 'a.yaml'}"  # fmt: skip
    write(tmp_path / "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*self\.yaml -> .*self\.yaml"):
        load_recipe(tmp_path / "self.yaml")


def test_a_missing_or_broken_base_names_the_overlay_and_the_key(tmp_path):
    overlay = write(tmp_path / "o.yaml", "extends: ../nope.yaml\ntrain: {lr: 1e-4}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(overlay)
    missing = tmp_path.parent / "nope.yaml"
    assert str(info.value).startswith(f"recipe {overlay}: extends: file not found: {missing}")
    write(tmp_path / "list.yaml", "- a\n- b\n")
    write(tmp_path / "broken.yaml", "model: [unclosed\n")
    bases = {"list.yaml": "the top level must be a mapping", "broken.yaml": "not valid YAML"}
    for base, expected in bases.items():
        overlay.write_text(f"extends: {base}\n")
        with pytest.raises(ConfigError) as info:
            load_recipe(overlay)
        assert info.value.source == str(overlay)
        [problem] = info.value.problems
        assert problem.startswith(f"extends: {tmp_path / base}: {expected}"), problem
    overlay.write_text("extends: [a.yaml]\n")
    with pytest.raises(ConfigError, match="extends: expected the path of a recipe file"):
        load_recipe(overlay)


def test_problems_of_the_merged_recipe_name_their_key_and_every_file(tmp_path):
    base = write(tmp_path / "base.yaml", BASE)
    overlay = write(tmp_path / "o" / "o.yaml", "extends: ../base.yaml\ntrain: {lrr: 1}\nmethod: {r: x}\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(overlay)
    assert info.value.source == f"{overlay} (extends {base})"
    assert any(p.startswith("train.lrr: unknown key (did you mean lr?)") for p in info.value.problems)
    assert "method.r: expected an integer, got string 'x'" in info.value.problems
    # The key is read from files only; a misspelling of it is hinted.
    with pytest.raises(ConfigError, match="extends: only a recipe file can extend another"):
        load_recipe(base, ["extends=other.yaml"])
    write(tmp_path / "typo.yaml", "extend: base.yaml\n" + BASE)
    with pytest.raises(ConfigError, match=r"extend: unknown key \(did you mean extends\?\)"):
        load_recipe(tmp_path / "typo.yaml")


def test_check_prints_the_merged_recipe_without_extends(tmp_path):
    write(tmp_path / "base.yaml", BASE)
    overlay = write(tmp_path / "o" / "o.yaml", "extends: ../base.yaml\ntrain: {batch_size: 2}\n")
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "check", str(overlay), "train.lr=0.01"],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    resolved = parse_yaml(result.stdout)
    assert "extends" not in resolved
    assert resolved["train"]["batch_size"] == 2 and resolved["train"]["lr"] == 0.01
    assert resolved["method"]["target_modules"] == ["q", "k", "v", "o"]
    # What a run folder keeps (dump_recipe) stands alone and loads to the same recipe.
    dumped = write(tmp_path / "run" / "recipe.yaml", result.stdout)
    assert load_recipe(dumped) == load_recipe(overlay, ["train.lr=0.01"])


# ----------------------------------------------------------------------------------------------
# recipes/offline/: overlays of recipes/ that hold only what an offline smoke run changes.

# Where the model and rows come from, how long the run is and where it writes, and what keeps
# decoding cheap: a random model rarely stops before max_new_tokens, so the caps, beam width, rows
# evaluated and RL completions per step set a smoke run's time.
OFFLINE_KEYS = {
    "model.path", "model.init", "data.train", "data.eval", "data.test", "data.mixture",
    "train.max_steps", "train.batch_size", "train.eval_every", "train.save_every", "output_dir",
    "eval.max_rows", "generation.max_new_tokens", "generation.num_beams",
    "rl.max_steps", "rl.prompts_per_step", "rl.group_size", "rl.max_new_tokens", "rl.eval_every",
    "rl.save_every",
}  # fmt: skip
# The template task's options name the columns of its file, and the local file has SQuAD's columns
# and answers longer than the hub recipe's yes / no.
OFFLINE_KEYS_OF = {"template-lora.yaml": {"data.task_options", "data.max_target_tokens"}}


def leaves(raw: dict, prefix: str = "") -> dict[str, object]:
    """Dotted path -> value for every non-mapping value (a list is one value)."""
    out = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        out.update(leaves(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


@pytest.mark.parametrize("path", OFFLINE, ids=[p.name for p in OFFLINE])
def test_offline_recipes_override_only_what_an_offline_run_changes(path):
    text = path.read_text()
    assert text.startswith("# "), "say in one comment line what the variant is"
    overlay = parse_yaml(text)
    assert overlay.pop("extends") == f"../{path.name}"
    hub_path = ROOT / "recipes" / path.name
    hub = leaves(parse_yaml(hub_path.read_text()))
    allowed = OFFLINE_KEYS | OFFLINE_KEYS_OF.get(path.name, set())
    for key, value in leaves(overlay).items():
        assert any(key == a or key.startswith(a + ".") for a in allowed), (
            f"{path.name}: {key} is not a key an offline variant changes; set it in recipes/{path.name}"
        )
        assert key not in hub or hub[key] != value, f"{path.name}: {key} restates the hub recipe's value"

    recipe, hub_recipe = load_recipe(path), load_recipe(hub_path)
    # Every data source comes whole from the overlay: no hub name, split or rows merged into a file.
    for role in ("train", "eval", "test"):
        source, written = getattr(recipe.data, role), overlay.get("data", {}).get(role)
        if source is not None:
            assert written is not None, f"{path.name}: data.{role} is the hub recipe's"
            keys = {k for k, v in dataclasses.asdict(source).items() if v is not None}
            assert keys == (set(written) if isinstance(written, dict) else {"path"}), (
                f"{path.name}: data.{role} has {sorted(keys)}, sets {written}: the rest is the hub source's"
            )
    # A mixture is restated whole (a list): only each item's rows may differ.
    assert len(recipe.data.mixture) == len(hub_recipe.data.mixture)
    for item, hub_item in zip(recipe.data.mixture, hub_recipe.data.mixture, strict=True):
        assert item.task == hub_item.task and item.weight == hub_item.weight
        assert item.task_options == hub_item.task_options
        assert all(s is None or not (s.name or s.split) for s in (item.train, item.eval))


# ----------------------------------------------------------------------------------------------
# report_to: experiment trackers through Accelerate.


@pytest.fixture
def installed(monkeypatch):
    """Which trackers count as installed: Accelerate's own availability list, set by the test."""
    import accelerate.tracking
    from accelerate.utils import LoggerType

    def set_installed(*names: str) -> None:
        listed = [LoggerType(n) for n in names]
        monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: listed)

    return set_installed


def test_report_to_takes_accelerates_installed_trackers(installed):
    installed("tensorboard", "wandb")
    for section in ("train", "rl"):
        assert getattr(recipe_from_dict(with_(section)), section).report_to == []
        assert getattr(recipe_from_dict(with_(section, report_to=["tensorboard", "wandb"])), section).report_to == [
            "tensorboard", "wandb"]  # fmt: skip
        assert getattr(recipe_from_dict(with_(section, report_to="all")), section).report_to == "all"
        [problem] = problems_of(with_(section, report_to=["tensorbord"]))
        assert problem.startswith(f"{section}.report_to: unknown tracker 'tensorbord' (did you mean tensorboard?); "
                                  "Accelerate's trackers are aim, clearml, comet_ml, ")  # fmt: skip
        [problem] = problems_of(with_(section, report_to=["wandb", "mlflow"]))
        assert problem == f"{section}.report_to: mlflow is not installed: pip install mlflow"
    [problem] = problems_of(with_("train", report_to=3))
    assert problem == "train.report_to: expected a list of strings or a string, got integer 3"
    installed()
    assert problems_of(with_("train", report_to="tensorboard")) == [
        "train.report_to: tensorboard is not installed: pip install tensorboard"
    ]
    [problem] = problems_of(with_("rl", report_to="all"))
    assert problem.startswith("rl.report_to: all: none of Accelerate's trackers is installed")


def test_report_to_names_what_accelerator_would_drop(installed):
    """The check agrees with Accelerate: what it passes, an Accelerator keeps; a tracker it refuses
    as not installed, an Accelerator would have dropped without a word."""
    from accelerate import PartialState
    from accelerate.tracking import filter_trackers

    PartialState(cpu=True)  # Accelerate's logging, which filter_trackers uses, needs its state
    installed("tensorboard")
    recipe_from_dict(with_("train", report_to=["tensorboard"]))
    assert [str(t) for t in filter_trackers(["tensorboard"], "logs")] == ["tensorboard"]
    installed()
    problems_of(with_("train", report_to=["tensorboard"]))
    assert filter_trackers(["tensorboard"], "logs") == []


def test_the_retired_tensorboard_key_is_read_as_report_to(installed, tmp_path, capsys):
    from flantune import cli
    from flantune.config import RecipeWarning

    installed("tensorboard", "wandb")
    with pytest.warns(RecipeWarning, match=r"train.tensorboard is retired: .*report_to: \[tensorboard\]"):
        assert recipe_from_dict(with_("train", tensorboard=True)).train.report_to == ["tensorboard"]
    with pytest.warns(RecipeWarning, match="rl.tensorboard"):
        assert recipe_from_dict(with_("rl", tensorboard=True, report_to="wandb")).rl.report_to == [
            "wandb", "tensorboard"]  # fmt: skip
    raw = with_("train", tensorboard=False)
    assert recipe_from_dict(raw).train.report_to == []  # what every earlier recipe.yaml holds: no warning
    assert raw["train"] == {"tensorboard": False}  # the caller's mapping is left as it was
    assert problems_of(with_("train", tensorboard="yes")) == [
        "train.tensorboard: expected true or false, got string 'yes' (a retired key: use train.report_to: "
        "[tensorboard])"
    ]
    path = tmp_path / "r.yaml"
    path.write_text("model: {path: x}\ndata: {task: sciq}\ntrain: {tensorboard: true}\n")
    assert cli._recipe(str(path), []).train.report_to == ["tensorboard"]
    assert capsys.readouterr().err.strip() == (
        f"warning: recipe {path}: train.tensorboard is retired: true is read as train.report_to: "
        "[tensorboard]; write that instead"
    )
