"""Checkpoints on resume: every file read before anything changes, a damaged checkpoint skipped for
the newest intact one, a checkpoint that does not fit the model refused by name, and the recipe
compared with the one the checkpoint was written under."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from flantune import checkpoint as ckpt
from flantune.config import RLConfig, TrainConfig, dump_recipe, parse_yaml, recipe_from_dict, recipe_to_dict
from flantune.run import TrainingError, build_optimizer, build_scheduler
from flantune.train import train

from .test_train import losses, make_recipe, tiny_model_dir, write_copy_task


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, t5_small_path):
    return tiny_model_dir(tmp_path_factory.mktemp("t5"), t5_small_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_t5):
    """A 4-step full fine-tuning run with checkpoints at steps 2 and 4 (and its data)."""
    folder = tmp_path_factory.mktemp("run")
    data = write_copy_task(folder, n=48)
    train(make_recipe(tiny_t5, data, folder / "run", max_steps=4, save_every=2, keep_last=3))
    return folder / "run", data


@pytest.fixture
def run_copy(finished, tmp_path):
    """A copy of the finished run to damage."""
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "trainable.safetensors": truncate,
    "optimizer.pt": truncate,
    "scheduler.pt": lambda f: f.unlink(),
    "state.json": lambda f: f.write_text(""),
    "rng-0.pt": truncate,
}


def fresh_training(model_dir, d_ff: int | None = None):
    """(model, optimizer, scheduler, accelerator) built as `train` builds them for make_recipe's
    full fine-tuning with a constant schedule (`d_ff`: another width, a model the checkpoint does
    not fit)."""
    from accelerate import Accelerator

    from flantune.models import load_model

    if d_ff:
        wider = Path(str(model_dir) + f"-dff{d_ff}")
        if not wider.exists():
            shutil.copytree(model_dir, wider)
            config = json.loads((wider / "config.json").read_text())
            (wider / "config.json").write_text(json.dumps({**config, "d_ff": d_ff}))
        model_dir = wider
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(load_model(str(model_dir), init="random", seed=1))
    optimizer = accelerator.prepare(build_optimizer(model, 3e-3, 0.0))
    scheduler = build_scheduler("constant", optimizer, 0, 4)
    return model, optimizer, scheduler, accelerator


@pytest.mark.parametrize("name", DAMAGE)
def test_verify_names_the_broken_file(run_copy, name):
    root = run_copy / "checkpoints"
    assert ckpt.verify_checkpoint(root / "step-000004") is None
    DAMAGE[name](root / "step-000004" / name)
    why = ckpt.verify_checkpoint(root / "step-000004")
    assert why is not None and "\n" not in why
    assert why.startswith(str(root / "step-000004" / name) + " is ")
    assert why.endswith("is missing") if name == "scheduler.pt" else "is truncated or corrupt (" in why
    assert ckpt.verify_checkpoint(root / "step-000002") is None


def test_verify_checks_the_state_and_the_recipe(run_copy):
    path = run_copy / "checkpoints" / "step-000004"
    (path / "state.json").write_text(json.dumps({"step": 2}))
    assert "state.json is truncated or corrupt (ValueError: step 2 in the folder of step 4)" in (
        ckpt.verify_checkpoint(path)
    )
    (path / "state.json").write_text(json.dumps({"step": 4, "lr": 1.0}))
    assert "unknown fields ['lr']" in ckpt.verify_checkpoint(path)
    (path / "state.json").write_text(json.dumps({"step": 4}))
    assert ckpt.verify_checkpoint(path) is None
    (path / "recipe.yaml").write_text("train: [unclosed")
    assert ckpt.verify_checkpoint(path).startswith(f"{path / 'recipe.yaml'} is truncated or corrupt")


@pytest.mark.parametrize("name", ["trainable.safetensors", "optimizer.pt", "state.json"])
def test_start_state_falls_back_to_the_newest_intact_checkpoint(run_copy, tiny_t5, name):
    root = run_copy / "checkpoints"
    DAMAGE[name](root / "step-000004" / name)
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5)
    notices = []
    state, path = ckpt.start_state(
        root, True, model, optimizer, scheduler, accelerator, notice=notices.append
    )
    assert (state.step, path) == (2, root / "step-000002")
    assert len(notices) == 1 and notices[0].startswith(
        f"skipping checkpoint step-000004: {root / 'step-000004' / name}"
    )
    assert notices[0].endswith("; moved to broken-step-000004")
    # Set aside, so that the resumed run can write its own step 4 (a save keeps an existing step).
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-000002"]
    assert (root / "broken-step-000004" / name).exists()
    saved = ckpt.read_checkpoint(root / "step-000002").weights
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), saved[n], rtol=0, atol=0)
    assert scheduler.last_epoch == 2 and optimizer.state_dict()["state"]


def test_a_resumed_run_continues_from_the_older_checkpoint(finished, run_copy):
    """Through `train`: the newest checkpoint damaged, the resume redoes steps 3 and 4 exactly."""
    truncate(run_copy / "checkpoints" / "step-000004" / "optimizer.pt")
    train(resume_recipe(finished[0], run_copy))
    assert losses(run_copy) == pytest.approx(losses(finished[0]), rel=1e-6)
    assert ckpt.verify_checkpoint(run_copy / "checkpoints" / "step-000004") is None
    assert (run_copy / "checkpoints" / "broken-step-000004").is_dir()


def resume_recipe(first: Path, out: Path):
    """The recipe of the run in `first`, resuming in `out`."""
    recipe = recipe_from_dict(parse_yaml((first / "recipe.yaml").read_text()))
    return dataclasses.replace(
        recipe, output_dir=str(out), train=dataclasses.replace(recipe.train, resume=True)
    )


def test_no_intact_checkpoint_is_an_error_naming_every_broken_file(run_copy, tiny_t5):
    root = run_copy / "checkpoints"
    truncate(root / "step-000004" / "trainable.safetensors")
    (root / "step-000002" / "state.json").write_text("")
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5)
    notices = []
    with pytest.raises(TrainingError) as error:
        ckpt.start_state(root, True, model, optimizer, scheduler, accelerator, notice=notices.append)
    message = str(error.value)
    assert message.startswith(
        f"resume: no intact checkpoint under {root}: {root / 'step-000004' / 'trainable.safetensors'} is truncated or corrupt ("
    )
    assert f"; {root / 'step-000002' / 'state.json'} is truncated or corrupt (" in message
    assert message.endswith(
        ". Start the run again from scratch with --restart, or put back intact copies of these files"
    )
    assert len(notices) == 2
    # Nothing is renamed when nothing could be resumed: the files stay where the user looks for them.
    assert [p.name for _, p in ckpt.list_checkpoints(root)] == ["step-000002", "step-000004"]


def test_a_checkpoint_that_does_not_fit_the_model_says_which_tensor(run_copy, tiny_t5):
    root = run_copy / "checkpoints"
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5, d_ff=128)
    with pytest.raises(TrainingError) as error:
        ckpt.start_state(root, True, model, optimizer, scheduler, accelerator)
    assert str(error.value) == (
        f"{root / 'step-000004'}: the checkpoint does not fit the model: "
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight has shape (64, 32) in the checkpoint but (128, 32) "
        "in the model. The recipe's model or method differ from the ones the checkpoint was written with "
        "(e.g. method.r, method.kind, method.target_modules, model.add_tokens); undo that change, or start the "
        "run again from scratch with --restart"
    )


def test_missing_and_extra_tensors_are_named(tiny_t5, run_copy):
    model = fresh_training(tiny_t5)[0]
    weights = ckpt.read_checkpoint(run_copy / "checkpoints" / "step-000004").weights
    lacking = {n: t for n, t in weights.items() if n != "shared.weight"}
    with pytest.raises(
        TrainingError, match=r"the model trains shared\.weight, which the checkpoint lacks\. "
    ):
        ckpt.check_fits(run_copy, lacking, model)
    extra = {**weights, "lora_A.weight": torch.zeros(2, 2), "lora_B.weight": torch.zeros(2, 2)}
    with pytest.raises(
        TrainingError, match=r"it holds lora_A\.weight \(and 1 more\), which the model does not"
    ):
        ckpt.check_fits(run_copy, extra, model)
    ckpt.check_fits(run_copy, weights, model)


def test_save_checkpoint_keeps_the_recipe(tiny_t5, tmp_path):
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5)
    text = dump_recipe(make_recipe(tiny_t5, tmp_path / "data.jsonl", tmp_path / "run"))
    state = ckpt.TrainState(step=3)
    path = ckpt.save_checkpoint(tmp_path, model, optimizer, scheduler, state, accelerator, recipe_text=text)
    assert (path / "recipe.yaml").read_text() == text
    assert ckpt.verify_checkpoint(path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003"]  # no .tmp- left


# ---- the recipe a checkpoint was written under ---------------------------------------------


def recipe(tmp_path, method=None, data_kw=None, **train_kw):
    """make_recipe's resolved dict (the model and data paths need not exist)."""
    raw = recipe_to_dict(
        make_recipe(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "run", method, **train_kw)
    )
    raw["data"].update(data_kw or {})
    return raw


def test_recipe_changes_refused_and_allowed(tmp_path):
    saved = recipe(tmp_path, {"kind": "lora", "r": 16}, save_every=2)
    current = recipe(tmp_path, {"kind": "lora", "r": 8}, {"max_source_tokens": 64}, batch_size=16, save_every=5,
                     max_steps=60, eval_every=10, resume=True)  # fmt: skip
    current["generation"]["num_beams"] = 4
    current["rl"]["lr"] = 1.0  # another section: not this resume's business
    current["output_dir"] = str(tmp_path / "moved")
    refused, allowed = ckpt.recipe_changes(saved, current, "train")
    assert refused == ["method.r: 16 -> 8", "data.max_source_tokens: 32 -> 64", "train.batch_size: 8 -> 16"]
    assert allowed == [
        "train.max_steps: 30 -> 60",  # the constant schedule does not span the total steps
        "train.eval_every: null -> 10",
        "train.save_every: 2 -> 5",
        "generation.num_beams: 1 -> 4",
        f"output_dir: {tmp_path / 'run'} -> {tmp_path / 'moved'}",
    ]
    assert ckpt.recipe_changes(saved, saved, "train") == ([], [])


def test_recipe_changes_of_the_schedule_and_whole_values(tmp_path):
    saved = recipe(tmp_path, {"kind": "lora", "target_modules": ["q", "v"]}, schedule="linear")
    current = recipe(
        tmp_path, {"kind": "lora", "target_modules": ["q", "k", "v"]}, schedule="linear", max_steps=60
    )
    refused, allowed = ckpt.recipe_changes(saved, current, "train")
    assert refused == ['method.target_modules: ["q", "v"] -> ["q", "k", "v"]']
    # A longer run is what a resume is often for: allowed, saying that the schedule stretches.
    assert allowed == ["train.max_steps: 30 -> 60 (the linear schedule now spans the new total)"]


def test_recipe_changes_for_rl(tmp_path):
    saved = recipe(tmp_path)
    current = recipe(tmp_path, batch_size=32)  # a train key: irrelevant to an rl resume
    current["rl"].update(max_steps=500, group_size=4, rewards=[{"name": "correct", "weight": 2.0}])
    current["generation"]["max_new_tokens"] = 4
    refused, allowed = ckpt.recipe_changes(saved, current, "rl")
    assert refused == [
        "rl.group_size: 8 -> 4",
        'rl.rewards: [{"name": "correct", "weight": 1.0, "mode": "normalized", "target_tokens": 0}] -> '
        '[{"name": "correct", "weight": 2.0}]',
        "generation.max_new_tokens: 8 -> 4 (rl.max_new_tokens is null: the rollouts' length)",
    ]
    assert allowed == ["rl.max_steps: 100 -> 500"]


def test_every_run_key_is_classified():
    for section, cls in (("train", TrainConfig), ("rl", RLConfig)):
        keys = {f.name for f in dataclasses.fields(cls)}
        assert keys == ckpt.ALLOWED_KEYS[section] | ckpt.REFUSED_KEYS[section] | ckpt.IGNORED_KEYS
        assert not ckpt.ALLOWED_KEYS[section] & ckpt.REFUSED_KEYS[section]


def test_check_resume(tmp_path):
    path = tmp_path / "step-000004"
    path.mkdir()
    current = recipe(tmp_path, {"kind": "lora", "r": 8}, batch_size=16, save_every=4)
    assert ckpt.check_resume(path, current, "train") == []  # an older checkpoint: no recipe.yaml
    saved = make_recipe(
        tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "run", {"kind": "lora", "r": 16}
    )
    (path / "recipe.yaml").write_text(dump_recipe(saved))
    with pytest.raises(TrainingError) as error:
        ckpt.check_resume(path, current, "train")
    assert str(error.value) == (
        "--resume: the recipe differs from the one the checkpoint was written under: method.r: 16 -> 8; "
        "train.batch_size: 8 -> 16. Undo these changes, or start a new run in another output_dir."
    )
    current = recipe(tmp_path, {"kind": "lora", "r": 16}, save_every=4, resume=True)
    assert ckpt.check_resume(path, current, "train") == ["train.save_every: null -> 4"]


def test_check_resume_fills_in_keys_added_since(tmp_path):
    """A recipe.yaml written before a key existed compares as if it held the key's default."""
    path = tmp_path / "step-000004"
    path.mkdir()
    current = recipe(tmp_path)
    older = json.loads(json.dumps(current))
    del older["train"]["pin_memory"], older["method"]["use_dora"]
    (path / "recipe.yaml").write_text(json.dumps(older))
    assert ckpt.check_resume(path, current, "train") == []


def test_check_resume_reads_the_retired_tensorboard_key(tmp_path):
    """A recipe.yaml written before report_to holds train.tensorboard: false compares equal to
    report_to [] (no notice, no warning); `true` compares as report_to [tensorboard]."""
    import warnings

    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    path = tmp_path / "step-000004"
    path.mkdir()
    older = recipe(tmp_path)
    del older["train"]["report_to"], older["rl"]["report_to"]
    for flag in (False, True):
        older["train"]["tensorboard"] = older["rl"]["tensorboard"] = flag
        (path / "recipe.yaml").write_text(json.dumps(older))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a saved recipe's retired key is not the user's to fix
            same = recipe(tmp_path, report_to=["tensorboard"] if flag else [])
            assert ckpt.check_resume(path, same, "train") == []
            assert ckpt.check_resume(path, recipe(tmp_path, report_to=["tensorboard"]), "train") == (
                [] if flag else ['train.report_to: [] -> ["tensorboard"]'])  # fmt: skip


def test_start_state_checks_the_recipe_before_loading(run_copy, tiny_t5):
    """The recipe's refused change is named before the checkpoint's tensors are compared."""
    root = run_copy / "checkpoints"
    written = parse_yaml((run_copy / "recipe.yaml").read_text())
    for _, path in ckpt.list_checkpoints(root):
        (path / "recipe.yaml").write_text(json.dumps(written))
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5, d_ff=128)
    changed = json.loads(json.dumps(written))
    changed["train"]["lr"] = 0.1
    with pytest.raises(
        TrainingError, match=r"^--resume: the recipe differs .*: train\.lr: 0\.003 -> 0\.1\. Undo"
    ):
        ckpt.start_state(root, True, model, optimizer, scheduler, accelerator, recipe=changed)
    model, optimizer, scheduler, accelerator = fresh_training(tiny_t5)
    longer = {**written, "train": {**written["train"], "max_steps": 8, "resume": True}}
    notices = []
    state, path = ckpt.start_state(
        root, True, model, optimizer, scheduler, accelerator, notice=notices.append, recipe=longer
    )
    assert (state.step, path.name) == (4, "step-000004")
    assert notices == ["resume: recipe changed since the checkpoint: train.max_steps: 4 -> 8"]
