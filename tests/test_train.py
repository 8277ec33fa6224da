"""Training end to end on tiny T5 and BART: each method learns, trains the right weights, saves
standard folders, resumes exactly, survives SIGKILL, and refuses NaN."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from flantune import checkpoint as ckpt
from flantune import train as train_module
from flantune.config import recipe_from_dict
from flantune.train import TrainingError, train

from .conftest import ROOT, tiny_config

WORDS = [
    "red",
    "green",
    "blue",
    "black",
    "white",
    "small",
    "large",
    "fast",
    "slow",
    "cold",
    "warm",
    "new",
    "old",
    "happy",
    "sad",
]


def write_copy_task(folder: Path, n: int = 96, seed: int = 0, kind: str = "reverse") -> Path:
    """'reverse: a b c' -> 'c b a' (or 'copy: a b c' -> 'a b c') over a few words: learnable by a
    tiny model in a few dozen steps."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        answer = reversed(words) if kind == "reverse" else words
        rows.append({"text": f"{kind}: " + " ".join(words), "answer": " ".join(answer)})
    path = folder / f"{kind}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_model_dir(folder: Path, asset: str) -> Path:
    """A folder with a tiny config of `asset`'s architecture and its real tokenizer."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tiny_config(asset).save_pretrained(folder)
    AutoTokenizer.from_pretrained(asset).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, t5_small_path):
    return tiny_model_dir(tmp_path_factory.mktemp("t5"), t5_small_path)


@pytest.fixture(scope="module")
def tiny_bart(tmp_path_factory, bart_path):
    return tiny_model_dir(tmp_path_factory.mktemp("bart"), bart_path)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tiny_t5, tiny_bart):
    """Tiny bases that already learned the 'reverse' task (full fine-tuning from random weights):
    parameter-efficient methods adapt a trained model, not noise."""
    bases = {}
    for arch, model_dir in (("t5", tiny_t5), ("bart", tiny_bart)):
        folder = tmp_path_factory.mktemp(f"pre-{arch}")
        data = write_copy_task(folder, n=192)
        result = train(make_recipe(model_dir, data, folder / "run", max_steps=100, lr=3e-3, log_every=10))
        bases[arch] = result.final_dir
    return bases


def make_recipe(model_dir, data, out, method=None, **train_kw):
    train_cfg = {
        "max_steps": 30,
        "batch_size": 8,
        "lr": 3e-3,
        "log_every": 1,
        "seed": 0,
        "schedule": "constant",
        **train_kw,
    }
    return recipe_from_dict({
        "model": {"path": str(model_dir), "init": "random"},
        "method": method or {"kind": "full"},
        "data": {"task": "template", "task_options": {"source": "{text}", "target": "{answer}", "metrics": ["exact_match"]},
                 "train": str(data), "max_source_tokens": 32, "max_target_tokens": 16},
        "train": train_cfg,
        "generation": {"max_new_tokens": 8},
        "output_dir": str(out),
    })  # fmt: skip


def losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


METHODS = {
    "full": {"kind": "full"},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "ia3": {"kind": "ia3", "target_modules": ["k", "v", "wo"]},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 4},
    "adapter": {"kind": "adapter", "placement": "houlsby", "reduction_factor": 4},
}
BART_TARGETS = {"ia3": ["k_proj", "v_proj", "fc2"]}


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("kind", list(METHODS))
def test_method_learns_and_trains_exactly_its_weights(kind, arch, pretrained, tmp_path):
    method = dict(METHODS[kind])
    if arch == "bart" and kind in BART_TARGETS:
        method["target_modules"] = BART_TARGETS[kind]
    data = write_copy_task(tmp_path, n=8, kind="copy")  # one batch of a new task for the trained base
    recipe = make_recipe(
        pretrained[arch], data, tmp_path / "run", method, lr=3e-2 if kind != "full" else 3e-3
    )
    recipe.model.init = "pretrained"

    # Watch the weights: compare the model before and after training, parameter by parameter.
    from flantune.methods import apply_method
    from flantune.models import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(recipe.model, seed=0)
    reference = apply_method(loaded.model, recipe.method)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    should_train = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert should_train

    result = train(recipe)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    # It learns: on one repeated batch the loss falls (slowly for IA3 and prefixes on a tiny base).
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.01, curve

    trained = dict(result.model.named_parameters())
    changed = {n for n, p in trained.items() if not torch.equal(p.detach(), before[n])}
    assert changed == should_train, changed ^ should_train
    assert (
        result.final_dir / ("model.safetensors" if kind == "full" else "adapter_config.json")
    ).exists() or kind == "adapter"


def test_lora_trainable_line_for_flan_t5_small(in_repo, capsys):
    from rich.console import Console

    from flantune.methods import apply_method, trainable_line
    from flantune.models import load_model

    recipe = recipe_from_dict({"model": {"path": "../shared/assets/flan-t5-small", "init": "random"},
                               "method": {"kind": "lora", "r": 2, "target_modules": ["q", "v"]},
                               "data": {"task": "sciq"}})  # fmt: skip
    model = apply_method(load_model(recipe.model.path, init="random"), recipe.method)
    Console().print(trainable_line(model))
    assert (
        "trainable params: 86,016 || all params: 77,047,168 || trainable%: 0.1116" in capsys.readouterr().out
    )


def test_final_folders_load_with_plain_libraries_and_match(tiny_t5, tmp_path):
    from peft import PeftModel

    data = write_copy_task(tmp_path)
    ids = torch.tensor([[100, 200, 300, 1]])
    labels = torch.tensor([[5, 6, 1]])
    for kind in ("full", "lora"):
        out = tmp_path / kind
        live = train(make_recipe(tiny_t5, data, out, METHODS[kind], max_steps=5)).model.eval()
        if kind == "full":
            loaded = AutoModelForSeq2SeqLM.from_pretrained(out / "final").eval()
        else:
            from flantune.models import load_model

            loaded = PeftModel.from_pretrained(
                load_model(str(tiny_t5), init="random", seed=0), out / "final"
            ).eval()
        torch.testing.assert_close(
            loaded(input_ids=ids, labels=labels).logits, live(input_ids=ids, labels=labels).logits
        )


def test_resume_equals_uninterrupted_run(tiny_t5, tmp_path, monkeypatch):
    data = write_copy_task(tmp_path)
    kw = dict(max_steps=8, save_every=4, schedule="linear", warmup_steps=2)
    method = {
        "kind": "lora",
        "r": 4,
        "target_modules": "all-linear",
        "dropout": 0.1,
    }  # dropout: RNG must be restored
    train(make_recipe(tiny_t5, data, tmp_path / "a", method, **kw))
    uninterrupted = losses(tmp_path / "a")

    real_save = ckpt.save_checkpoint

    def save_then_crash(root, model, optimizer, scheduler, state, accelerator):
        path = real_save(root, model, optimizer, scheduler, state, accelerator)
        if state.step == 4:
            raise KeyboardInterrupt  # as if the machine went away right after the checkpoint
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(make_recipe(tiny_t5, data, tmp_path / "b", method, **kw))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    # Data position matters too: with batch 8 over 96 rows, step 4 is mid-epoch.
    train(make_recipe(tiny_t5, data, tmp_path / "b", method, **kw, resume=True))
    assert losses(tmp_path / "b") == uninterrupted


def test_refuses_to_overwrite_a_run(tiny_t5, tmp_path):
    data = write_copy_task(tmp_path)
    train(make_recipe(tiny_t5, data, tmp_path / "run", max_steps=2))
    with pytest.raises(TrainingError, match="already holds a run; set train.resume=true"):
        train(make_recipe(tiny_t5, data, tmp_path / "run", max_steps=2))
    with pytest.raises(TrainingError, match="holds no complete checkpoint"):
        train(make_recipe(tiny_t5, data, tmp_path / "other", max_steps=2, resume=True))


def test_nan_loss_stops_without_a_poisoned_checkpoint(tiny_t5, tmp_path, monkeypatch):
    data = write_copy_task(tmp_path)
    real = train_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("nan") if calls["n"] == 5 else loss  # the 5th micro-batch: step 5

    monkeypatch.setattr(train_module, "token_loss_sum", poisoned)
    with pytest.raises(
        TrainingError, match=r"step 5: the loss is nan .* the last good checkpoint is .*step-000004"
    ):
        train(make_recipe(tiny_t5, data, tmp_path / "stop", max_steps=10, save_every=2))
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "stop" / "checkpoints")]
    assert steps == [2, 4]
    for _, path in ckpt.list_checkpoints(tmp_path / "stop" / "checkpoints"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path / "trainable.safetensors").values())

    calls["n"] = 0
    result = train(make_recipe(tiny_t5, data, tmp_path / "skip", max_steps=10, on_nan="skip"))
    records = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [5]
    assert result.steps == 10 and all(torch.isfinite(p).all() for p in result.model.parameters())


def test_fp16_is_refused_for_t5(tiny_t5, tmp_path):
    data = write_copy_task(tmp_path)
    with pytest.raises(TrainingError, match="T5-family activations overflow float16"):
        train(make_recipe(tiny_t5, data, tmp_path / "run", precision="fp16"))


def test_sigkill_leaves_loadable_checkpoints(tiny_t5, tmp_path):
    data = write_copy_task(tmp_path, n=400)
    recipe = tmp_path / "r.yaml"
    out = tmp_path / "run"
    recipe.write_text(
        f"model: {{path: {tiny_t5}, init: random}}\nmethod: {{kind: full}}\n"
        f"data: {{task: template, task_options: {{source: '{{text}}', target: '{{answer}}'}}, train: {data}}}\n"
        f"train: {{max_steps: 100000, batch_size: 4, save_every: 1, keep_last: 2, log_every: 1}}\noutput_dir: {out}\n"
    )
    for kill_after in (1.0, 1.7, 2.4):  # kill at different moments of the write cycle
        args = [sys.executable, "-m", "flantune.cli", "train", str(recipe)]
        if (out / "checkpoints").exists():
            args.append("--resume")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.time() + 120
        while time.time() < deadline and len(ckpt.list_checkpoints(out / "checkpoints")) < 1:
            time.sleep(0.05)
        time.sleep(kill_after)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        found = ckpt.list_checkpoints(out / "checkpoints")
        assert found, proc.stderr.read().decode()[-2000:]
        for _, path in found:  # every complete-looking checkpoint is complete
            assert {p.name for p in path.iterdir()} >= {
                "trainable.safetensors",
                "optimizer.pt",
                "scheduler.pt",
                "state.json",
                "rng-0.pt",
            }
            json.loads((path / "state.json").read_text())
            from safetensors.torch import load_file

            load_file(path / "trainable.safetensors")
            torch.load(path / "optimizer.pt", weights_only=False)
    # ... and training resumes from the newest one.
    last_step = found[-1][0]
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "train", str(recipe), f"train.max_steps={last_step + 2}",
                             "--resume"], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final").is_dir()
