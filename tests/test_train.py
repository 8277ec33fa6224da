"""Training end to end on tiny T5 and BART: each method learns, trains the right weights, saves
standard folders, resumes exactly, survives SIGKILL, and refuses NaN."""

import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForSeq2SeqLM

from flantune import checkpoint as ckpt
from flantune import train as train_module
from flantune.config import recipe_from_dict
from flantune.run import TrainingError
from flantune.train import train

from .conftest import ROOT, free_port, tiny_config

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
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "t5":  # FLAN-T5's untied head (T5Config objects always say tied)
        config["tie_word_embeddings"] = False
        (folder / "config.json").write_text(json.dumps(config))
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


RESUME_REL = 1e-6
"""Resumed against uninterrupted losses. Bit-equal on CI's 2-core CPU; on a 16-core host two
identical runs' threaded float32 sums already differed by 8e-8 relative (before any resume), so the
comparison allows float32 rounding: a wrong data position or RNG state moves the loss by far more."""


def losses(out: Path) -> list[float]:
    """The run's logged training losses; never empty (two runs that logged none would compare equal)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in records if "loss" in r]
    assert curve, f"{out / 'metrics.jsonl'} holds no training loss"
    return curve


METHODS = {
    "full": {"kind": "full"},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear"},
    "ia3": {"kind": "ia3", "target_modules": ["k", "v", "wo"]},
    "prefix": {"kind": "prefix", "num_virtual_tokens": 4},
    "adapter": {"kind": "adapter", "placement": "houlsby", "reduction_factor": 4},
    "pfeiffer": {"kind": "adapter", "placement": "pfeiffer", "reduction_factor": 4},
    "dora": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q", "v"], "use_dora": True},
}
BART_TARGETS = {"ia3": ["k_proj", "v_proj", "fc2"], "dora": ["q_proj", "v_proj"]}

# How many parameters each method trains on the tiny bases, counted by hand from their shapes: d_model
# 32, feed-forward 64, 2 encoder + 2 decoder layers, 2 heads of 16 (attention projections are 32 -> 32).
# T5 layers hold q, k, v, o (decoder: twice, self and cross attention) and a gated feed-forward
# wi_0, wi_1 (32 -> 64), wo (64 -> 32); BART layers q/k/v/out_proj (with biases) and fc1, fc2.
TRAINABLE_COUNTS = {
    # LoRA r=4 on every linear layer of the layers ("all-linear" leaves the output head out): r*(in+out)
    # = 256 per attention projection, 384 per feed-forward one.
    # T5: encoder layer 4*256 + 3*384 = 2176, decoder layer 8*256 + 3*384 = 3200.
    ("t5", "lora"): 2 * 2176 + 2 * 3200,  # 10,752
    # BART: encoder layer 4*256 + 2*384 = 1792, decoder layer 8*256 + 2*384 = 2816.
    ("bart", "lora"): 2 * 1792 + 2 * 2816,  # 9,216
    # IA3 on k, v and the feed-forward output (wo / fc2): one vector per layer, out_features long (32), or
    # in_features for a feed-forward layer (64). Encoder layer 32+32+64, decoder layer 4*32+64.
    ("t5", "ia3"): 2 * 128 + 2 * 192,  # 640
    ("bart", "ia3"): 2 * 128 + 2 * 192,
    # Prefix tuning, 4 virtual tokens: one embedding of 4 x (2 layers * 2 (key, value) * 32).
    ("t5", "prefix"): 4 * 2 * 2 * 32,  # 512
    ("bart", "prefix"): 4 * 2 * 2 * 32,
    # Bottleneck adapters, reduction factor 4 (bottleneck 8): down 32*8+8, up 8*32+32 = 552 each.
    # Houlsby: after self-attention and feed-forward in all 4 layers and cross-attention in the 2
    # decoder layers (10); Pfeiffer: after the feed-forward only (4).
    ("t5", "adapter"): 10 * 552,  # 5,520
    ("bart", "adapter"): 10 * 552,
    ("t5", "pfeiffer"): 4 * 552,  # 2,208
    ("bart", "pfeiffer"): 4 * 552,
    # DoRA r=4 on q and v: 256 (LoRA) + a magnitude of 32 each, in 2 encoder + 4 decoder attentions.
    ("t5", "dora"): 12 * (256 + 32),  # 3,456
    ("bart", "dora"): 12 * (256 + 32),
    # Full: every parameter. T5: embeddings 32128 x 32 = 1,028,096 and FLAN-T5's untied head as many;
    # encoder 2 x (4*1024 + 3*2048 + 2 norms of 32) + relative bias 32 buckets x 2 heads + final norm;
    # decoder 2 x (8*1024 + 3*2048 + 3*32) + 64 + 32.
    ("t5", "full"): 2 * 1_028_096 + (2 * 10_304 + 64 + 32) + (2 * 14_432 + 64 + 32),  # 2,105,856
    # BART: embeddings 50265 x 32 = 1,608,480 (the head is tied to them), learned positions 2 x 1026 x 32,
    # 2 embedding norms (64 each); encoder layer 4*(1024+32) + fc1 2112 + fc2 2080 + 2 norms = 8,544;
    # decoder layer 8*(1024+32) + 2112 + 2080 + 3 norms = 12,832.
    ("bart", "full"): 1_608_480 + 2 * 1026 * 32 + 2 * 64 + 2 * 8_544 + 2 * 12_832,  # 1,717,024
}
# Where bottleneck adapters go: the modules they wrap (T5, BART), for each placement.
ADAPTER_SITES = {
    "houlsby": ("SelfAttention", "EncDecAttention", "DenseReluDense", "self_attn", "encoder_attn", "fc2"),
    "pfeiffer": ("DenseReluDense", "fc2"),
}


def expected_trainable(base, kind: str, method: dict) -> set[str]:
    """The names of the parameters `method` trains, from the plain base model's modules and the naming
    of PEFT (base_model.model.<module>.lora_A.default.weight, ...) and of flantune's adapter folders."""
    if kind == "full":
        return {n for n, _ in base.named_parameters()}
    if kind == "prefix":
        return {"prompt_encoder.default.embedding.weight"}
    modules = [n for n, _ in base.named_modules() if n]
    if method["kind"] == "adapter":
        sites = [n for n in modules if n.rsplit(".", 1)[-1] in ADAPTER_SITES[method["placement"]]]
        return {
            f"{site}.adapter.{part}.{p}"
            for site in sites
            for part in ("down", "up")
            for p in ("weight", "bias")
        }
    linear = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    targets = method["target_modules"]
    targeted = [n for n in linear if targets == "all-linear" or n.rsplit(".", 1)[-1] in targets]
    if kind == "ia3":
        return {f"base_model.model.{n}.ia3_l.default" for n in targeted}
    parts = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if method.get("use_dora") else [])
    return {f"base_model.model.{n}.{part}.default.weight" for n in targeted for part in parts}


@pytest.mark.parametrize("arch", ["t5", "bart"])
@pytest.mark.parametrize("kind", list(METHODS))
def test_method_learns_and_trains_exactly_its_weights(kind, arch, pretrained, tmp_path):
    from safetensors.torch import load_file

    method = dict(METHODS[kind])
    if arch == "bart" and kind in BART_TARGETS:
        method["target_modules"] = BART_TARGETS[kind]
    data = write_copy_task(tmp_path, n=8, kind="copy")  # one batch of a new task for the trained base
    recipe = make_recipe(
        pretrained[arch], data, tmp_path / "run", method, lr=3e-2 if kind != "full" else 3e-3
    )
    recipe.model.init = "pretrained"
    expected = expected_trainable(AutoModelForSeq2SeqLM.from_pretrained(pretrained[arch]), kind, method)

    # Watch the weights: compare the model before and after training, parameter by parameter.
    from flantune.methods import apply_method
    from flantune.models import load_model_and_tokenizer

    loaded = load_model_and_tokenizer(recipe.model, seed=0)
    reference = apply_method(loaded.model, recipe.method)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    should_train = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    assert set(should_train) == expected, set(should_train) ^ expected
    assert sum(p.numel() for p in should_train.values()) == TRAINABLE_COUNTS[arch, kind]

    result = train(recipe)
    curve = losses(tmp_path / "run")
    assert len(curve) == 30
    # It learns: on one repeated batch the loss falls (slowly for IA3 and prefixes on a tiny base).
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.01, curve

    trained = dict(result.model.named_parameters())
    assert {n for n, p in trained.items() if p.requires_grad} == expected
    changed = {n for n, p in trained.items() if not torch.equal(p.detach(), before[n])}
    assert changed == expected, changed ^ expected
    # final/ is a full model folder, or an adapter folder of the method's own kind holding what trained.
    final = result.final_dir
    assert json.loads((final / "flantune.json").read_text())["method"] == method["kind"]
    if kind == "full":
        assert (final / "model.safetensors").is_file() and not (final / "adapter_config.json").exists()
        assert AutoModelForSeq2SeqLM.from_pretrained(final).num_parameters() == TRAINABLE_COUNTS[arch, kind]
        return
    assert not (final / "model.safetensors").exists()
    config = json.loads((final / "adapter_config.json").read_text())
    if method["kind"] == "adapter":
        assert (config["kind"], config["placement"]) == ("bottleneck", method["placement"])
    else:
        assert (
            config["peft_type"] == {"lora": "LORA", "ia3": "IA3", "prefix": "PREFIX_TUNING"}[method["kind"]]
        )
        assert config.get("use_dora", False) == method.get("use_dora", False)
    saved = load_file(final / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == TRAINABLE_COUNTS[arch, kind]


def test_lora_trainable_line_for_flan_t5_small(t5_small_path, capsys):
    from rich.console import Console

    from flantune.methods import apply_method, trainable_line
    from flantune.models import load_model

    recipe = recipe_from_dict({"model": {"path": t5_small_path, "init": "random"},
                               "method": {"kind": "lora", "r": 2, "target_modules": ["q", "v"]},
                               "data": {"task": "sciq"}})  # fmt: skip
    model = apply_method(load_model(recipe.model.path, init="random"), recipe.method)
    Console().print(trainable_line(model))
    # LoRA r=2 on q and v (512 -> 6 heads x 64 = 384): 2*(512+384) = 1,792 each, in 8 encoder self-attentions
    # and 8 decoder self- and cross-attentions (48 layers): 86,016, beside FLAN-T5-small's 76,961,152.
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


def crash_and_resume(recipe_of, monkeypatch, crash_after: int) -> None:
    """Train `recipe_of(resume)` until the checkpoint of step `crash_after` is written, end the run
    there (as if the machine went away), then resume it to the end."""
    real_save = ckpt.save_checkpoint

    def save_then_crash(root, model, optimizer, scheduler, state, accelerator, **kw):
        path = real_save(root, model, optimizer, scheduler, state, accelerator, **kw)
        if state.step == crash_after:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(recipe_of(False))
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    train(recipe_of(True))


@pytest.mark.parametrize("group_by_length", [False, True], ids=["random", "grouped"])
def test_resume_equals_uninterrupted_run(tiny_t5, tmp_path, monkeypatch, group_by_length):
    from flantune import train as train_module

    made = []  # the grouped runs must take their batches from LengthGroupedBatches
    real_make = train_module.LengthGroupedBatches._make
    monkeypatch.setattr(
        train_module.LengthGroupedBatches, "_make", lambda *a: made.append(1) or real_make(*a)
    )
    data = write_copy_task(tmp_path)
    kw = dict(max_steps=8, save_every=4, schedule="linear", warmup_steps=2, group_by_length=group_by_length)
    method = {
        "kind": "lora",
        "r": 4,
        "target_modules": "all-linear",
        "dropout": 0.1,
    }  # dropout: RNG must be restored
    train(make_recipe(tiny_t5, data, tmp_path / "a", method, **kw))
    # Data position matters too: with batch 8 over 96 rows, step 4 is mid-epoch.
    crash_and_resume(
        lambda resume: make_recipe(tiny_t5, data, tmp_path / "b", method, **kw, resume=resume), monkeypatch, 4
    )
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=RESUME_REL)
    assert bool(made) == group_by_length


@pytest.mark.parametrize(
    "extra",
    [{}, {"packing": True}, {"packing": True, "token_budget": 160}],
    ids=["plain", "packed", "token-budget"],
)
def test_resume_after_the_first_epoch_equals_uninterrupted_run(tiny_t5, tmp_path, monkeypatch, extra):
    """A resume in epoch 1 sees epoch 1's order and then epoch 2's (Accelerate's loaders count their
    own passes from 0 and set the sampler's epoch from that count, unless the loop sets it)."""
    data = write_copy_task(tmp_path, n=24)  # 3 steps of 8 examples an epoch: step 4 is in epoch 1
    kw = dict(max_steps=10, save_every=4, schedule="constant", **extra)
    train(make_recipe(tiny_t5, data, tmp_path / "a", **kw))
    crash_and_resume(
        lambda resume: make_recipe(tiny_t5, data, tmp_path / "b", **kw, resume=resume), monkeypatch, 4
    )
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=RESUME_REL)


def hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` by relative path, with the hash of its bytes."""
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}  # fmt: skip


def test_a_run_folder_is_never_overwritten(tiny_t5, tmp_path):
    """A second run into a run's folder is refused and changes nothing; --restart starts it again;
    --resume with no checkpoint says to restart; a folder holding the user's own files (a recipe,
    data) and a file given as the folder are refused, byte for byte untouched."""
    from flantune.config import ConfigError

    data = write_copy_task(tmp_path)
    run = tmp_path / "run"
    train(make_recipe(tiny_t5, data, run, max_steps=2))
    before = hashes(run)
    with pytest.raises(
        TrainingError, match=r"already holds a run: --resume .* --restart \(train.restart=true\)"
    ):
        train(make_recipe(tiny_t5, data, run, max_steps=2))
    assert hashes(run) == before
    assert not (run / ".lock").exists()  # released by the run that finished and by the refused one
    train(make_recipe(tiny_t5, data, run, max_steps=3, restart=True))
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    with pytest.raises(ConfigError, match="resume and train.restart"):
        make_recipe(tiny_t5, data, run, resume=True, restart=True)
    with pytest.raises(TrainingError, match="holds no complete checkpoint to resume from: --restart"):
        train(make_recipe(tiny_t5, data, tmp_path / "other", max_steps=2, resume=True))

    mine = tmp_path / "mine"  # output_dir=. in a folder of the user's: their recipe and data
    mine.mkdir()
    (mine / "recipe.yaml").write_text("model: {path: x}\n")
    (mine / "notes.txt").write_text("mine")
    only_recipe = tmp_path / "only-recipe"
    only_recipe.mkdir()
    (only_recipe / "recipe.yaml").write_text("model: {path: x}\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for folder, message in ((mine, r"holds files a run did not write \(notes.txt, recipe.yaml\)"),
                            (only_recipe, r"holds files a run did not write \(recipe.yaml\)"),
                            (a_file, "is a file, not a folder")):  # fmt: skip
        kept = hashes(folder) if folder.is_dir() else a_file.read_bytes()
        for extra in ({}, {"restart": True}):
            with pytest.raises(TrainingError, match=message):
                train(make_recipe(tiny_t5, data, folder, max_steps=1, **extra))
        assert (hashes(folder) if folder.is_dir() else a_file.read_bytes()) == kept


def test_a_run_killed_while_writing_final_resumes_to_a_whole_final(tiny_t5, tmp_path):
    """What a kill during the final/ write leaves on disk (the last checkpoint, a half-written
    .tmp-final, the dead process's lock, no final/): --resume takes the lock over, cleans the half
    folder and writes final/ whole, with the same weights as the uninterrupted run."""
    import shutil
    import subprocess as sp

    data = write_copy_task(tmp_path)
    run = tmp_path / "run"
    train(make_recipe(tiny_t5, data, run, max_steps=3))
    whole = hashes(run / "final")
    del whole["README.md"]  # the model card holds each run's own time
    shutil.move(run / "final", run / ".tmp-final")
    (run / ".tmp-final" / "model.safetensors").write_bytes(b"torn")
    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / ".lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    train(make_recipe(tiny_t5, data, run, max_steps=3, resume=True))
    assert not (run / ".tmp-final").exists() and not (run / ".lock").exists()
    resumed = hashes(run / "final")
    assert resumed.pop("README.md") and resumed == whole


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(tiny_t5, tmp_path):
    import socket

    data = write_copy_task(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": live.pid, "host": socket.gethostname(), "since": "2026-12-02 10:00:00"}
        (run / ".lock").write_text(json.dumps(lock))
        with pytest.raises(TrainingError, match=f"is in use by process {live.pid} on {socket.gethostname()}"):
            train(make_recipe(tiny_t5, data, run, max_steps=1))
        assert json.loads((run / ".lock").read_text()) == lock  # the live run keeps its lock
    finally:
        live.kill()
        live.wait()
    # The process is gone: its lock is stale, and a restart takes the folder over with a notice.
    console = Console(file=io.StringIO(), width=200)
    train(make_recipe(tiny_t5, data, run, max_steps=1, restart=True), console=console)
    assert f"took over the lock of process {live.pid}, which no longer runs" in console.file.getvalue()
    assert not (run / ".lock").exists() and (run / "final").is_dir()


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


def test_signals_checkpoint_a_second_run_is_refused_and_a_killed_run_restarts(tiny_t5, tmp_path):
    """No dead end, nothing overwritten: while a run trains, a second run into its folder is refused
    naming the first's process; SIGTERM makes the run write a checkpoint and stop (exit 130), and
    --resume continues it; a run killed (SIGKILL) before any checkpoint is refused with the way out
    (--restart), which starts it again."""
    data = write_copy_task(tmp_path, n=400)
    recipe, out = tmp_path / "r.yaml", tmp_path / "run"
    recipe.write_text(
        f"model: {{path: {tiny_t5}, init: random}}\nmethod: {{kind: full}}\n"
        f"data: {{task: template, task_options: {{source: '{{text}}', target: '{{answer}}'}}, train: {data}}}\n"
        f"train: {{max_steps: 100000, batch_size: 4, log_every: 1}}\noutput_dir: {out}\n"
    )
    cli = [sys.executable, "-m", "flantune.cli", "train", str(recipe)]

    def start() -> subprocess.Popen:
        proc = subprocess.Popen(cli, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        deadline = time.time() + 120  # until it has taken three steps
        while time.time() < deadline and (
            not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 3
        ):
            time.sleep(0.05)
        return proc

    proc = start()
    second = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert second.returncode == 2 and f"is in use by process {proc.pid}" in " ".join(second.stderr.split())
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, stderr[-2000:]
    assert "stopped: SIGTERM after step" in stderr and "--resume" in stderr and "Traceback" not in stderr
    (step, _), *_ = ckpt.list_checkpoints(out / "checkpoints")
    assert step >= 3 and not (out / "final").exists() and not (out / ".lock").exists()
    resumed = subprocess.run(
        [*cli, "--resume", f"train.max_steps={step + 2}"], capture_output=True, text=True, cwd=ROOT
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "result.json").read_text())["steps"] == step + 2

    killed = tmp_path / "killed"
    recipe.write_text(recipe.read_text().replace(str(out), str(killed)))
    out = killed
    proc = start()
    proc.kill()
    proc.wait()
    assert not ckpt.list_checkpoints(out / "checkpoints")  # killed before its first checkpoint
    again = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    message = " ".join(again.stderr.split())
    assert again.returncode == 2 and "already holds a run: --restart (train.restart=true)" in message
    restarted = subprocess.run(
        [*cli, "--restart", "train.max_steps=2"], capture_output=True, text=True, cwd=ROOT
    )
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert f"took over the lock of process {proc.pid}" in " ".join(restarted.stdout.split())
    assert [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ] == [1, 2]


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


def test_continue_from_an_adapter_trains_it_further(pretrained, tmp_path):
    data = write_copy_task(tmp_path, n=16, kind="copy")
    first = make_recipe(pretrained["t5"], data, tmp_path / "first", METHODS["lora"], max_steps=5, lr=1e-2)
    first.model.init = "pretrained"
    first_result = train(first)
    again = make_recipe(pretrained["t5"], data, tmp_path / "again", METHODS["lora"], max_steps=5, lr=1e-2)
    again.model.init, again.model.adapter = "pretrained", str(first_result.final_dir)
    before = {n: p.detach().clone() for n, p in first_result.model.named_parameters() if "lora_" in n}
    result = train(again)
    after = {n: p for n, p in result.model.named_parameters() if "lora_" in n}
    # A and B of every linear layer of the tiny T5: 2 x (7 per encoder layer + 11 per decoder layer).
    assert len(before) == 2 * (2 * 7 + 2 * 11)
    assert set(after) == set(before) and all(p.requires_grad for p in after.values())  # loaded trainable
    assert all(not torch.equal(after[n], before[n]) for n in before)  # and trained further
    # ... starting where the first run ended (its first loss is the first run's last state's loss).
    assert losses(tmp_path / "again")[0] < losses(tmp_path / "first")[0]


def test_adapter_for_another_base_is_a_clear_error(pretrained, tmp_path):
    from flantune.methods import MethodError

    data = write_copy_task(tmp_path, n=16, kind="copy")
    bart_run = make_recipe(pretrained["bart"], data, tmp_path / "bart", METHODS["lora"], max_steps=1)
    bart_run.model.init = "pretrained"
    adapter = train(bart_run).final_dir
    t5_run = make_recipe(pretrained["t5"], data, tmp_path / "t5", METHODS["lora"], max_steps=1)
    t5_run.model.init, t5_run.model.adapter = "pretrained", str(adapter)
    with pytest.raises(MethodError, match=r"model.adapter: .* does not fit model.path"):
        train(t5_run)


def test_modules_to_save_trains_the_head_beside_lora(pretrained, tmp_path):
    data = write_copy_task(tmp_path, n=16, kind="copy")
    recipe = make_recipe(
        pretrained["t5"],
        data,
        tmp_path / "run",
        {**METHODS["lora"], "modules_to_save": ["lm_head"]},
        max_steps=3,
    )
    recipe.model.init = "pretrained"
    result = train(recipe)
    names = [n for n, p in result.model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in n for n in names)


def test_added_tokens_train_under_lora(tiny_t5, tmp_path):
    rows = [{"text": f"tag: {w}", "answer": f"<think> {w} </think> <answer> {w} </answer>"} for w in WORDS]
    data = tmp_path / "think.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = make_recipe(tiny_t5, data, tmp_path / "run", METHODS["lora"], max_steps=3)
    recipe.model.add_tokens = ["<think>", "</think>", "<answer>", "</answer>"]
    result = train(recipe)
    model = result.model
    deltas = {n: p for n, p in model.named_parameters() if "trainable_tokens_delta" in n}
    # Encoder/decoder input rows (one shared parameter) and the untied head's rows both train.
    assert any("embed_tokens" in n for n in deltas) and any("lm_head" in n for n in deltas)
    assert all(p.requires_grad and p.shape[0] == 4 for p in deltas.values())
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(result.final_dir)
    assert tokenizer.convert_tokens_to_ids("<answer>") == 32102
    # Merging keeps the rows: the merged model's logits equal the adapter model's.
    ids, labels = torch.tensor([[32100, 5, 32101, 1]]), torch.tensor([[32102, 7, 32103, 1]])
    model.eval()
    expected = model(input_ids=ids, labels=labels).logits
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids, labels=labels).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "adapter", "full"])
def test_gradient_checkpointing(kind, tiny_t5, tmp_path, monkeypatch):
    """train.gradient_checkpointing=true runs every block again in the backward pass and takes the same
    steps as without it: the same losses and trained weights. Dropout stays on (FLAN-T5's 0.1; LoRA's
    0.05), so this also checks that the recomputation replays the forward's dropout masks (torch's
    checkpoint restores the RNG state); both runs start from the same seed (train.seed)."""
    from transformers.models.t5.modeling_t5 import T5LayerFF

    from flantune.methods import apply_method
    from flantune.models import load_model_and_tokenizer

    assert json.loads((tiny_t5 / "config.json").read_text())["dropout_rate"] == 0.1
    # Counted in each block's feed-forward sublayer: the checkpointed unit is the whole block, whose
    # forward transformers wraps (patching the block itself would turn its checkpointing off).
    block_calls = []
    real_forward = T5LayerFF.forward

    def counted(self, *args, **kwargs):
        block_calls.append(1)
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(T5LayerFF, "forward", counted)
    data = write_copy_task(tmp_path, n=16, kind="copy")
    runs = {}
    for checkpointing in (False, True):
        block_calls.clear()
        out = tmp_path / f"checkpointing-{checkpointing}"
        recipe = make_recipe(
            tiny_t5, data, out, METHODS[kind], max_steps=3, gradient_checkpointing=checkpointing
        )
        model = train(recipe).model
        weights = {n: p.detach() for n, p in model.named_parameters()}
        runs[checkpointing] = (len(block_calls), losses(out), weights)
    (plain_calls, plain_losses, plain), (ckpt_calls, ckpt_losses, checkpointed) = runs[False], runs[True]
    # 3 steps x 4 blocks (2 encoder, 2 decoder) forward; checkpointing runs each once more in backward.
    assert (plain_calls, ckpt_calls) == (12, 24)
    assert len(plain_losses) == 3
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5, abs=0)
    # The same trained weights. Float rounding differs between the two backward passes (the recomputed
    # graph sums some gradients in another order) and AdamW's normalisation magnifies it in elements
    # whose gradients are near zero: compare each tensor's difference with how far it moved
    # (measured: at most 1e-4 of it; a lost gradient or another dropout mask gives about 1).
    reference = apply_method(load_model_and_tokenizer(recipe.model, seed=0).model, recipe.method)
    start = {n: p.detach() for n, p in reference.named_parameters()}
    trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
    assert trainable and checkpointed.keys() == plain.keys() == start.keys()
    for name, tensor in checkpointed.items():
        if name not in trainable:
            assert torch.equal(tensor, start[name]) and torch.equal(plain[name], start[name]), name
            continue
        moved = float((plain[name] - start[name]).norm())
        assert moved > 0, f"{name} did not train"
        assert float((tensor - plain[name]).norm()) <= 1e-3 * moved, name


# Scripted evaluations (steps 1..6, eval every step, patience 2): best at 1, 2, then 4 (the count of
# evaluations without improvement goes back to 0); 5 equals the best, which is no improvement; 6 is
# the second evaluation in a row without improvement: the run stops there, and keeps step 4.
EARLY_STOP_SCRIPTS = {
    "eval_loss": ([3.0, 2.0, 2.5, 1.5, 1.5, 1.7], 1.6),  # lower is better
    "eval_exact_match": ([10.0, 30.0, 20.0, 50.0, 50.0, 40.0], 45.0),  # higher is better
}


@pytest.mark.parametrize("best_metric", list(EARLY_STOP_SCRIPTS))
def test_eval_best_checkpoint_and_early_stopping(best_metric, tiny_t5, tmp_path, monkeypatch):
    import io

    from rich.console import Console
    from safetensors.torch import load_file

    script, stalled = EARLY_STOP_SCRIPTS[best_metric]
    real_evaluate, values = train_module.evaluate_in_run, iter(script)

    def scripted(*args, **kwargs):  # a real evaluation, with the metric that decides replaced
        return {**real_evaluate(*args, **kwargs), best_metric: next(values, stalled)}

    monkeypatch.setattr(train_module, "evaluate_in_run", scripted)
    data = write_copy_task(tmp_path, n=16, kind="copy")
    recipe = make_recipe(tiny_t5, data, tmp_path / "run", METHODS["full"], max_steps=12, lr=3e-3, eval_every=1,
                         early_stopping_patience=2, best_metric=best_metric.removeprefix("eval_"))  # fmt: skip
    recipe.data.eval = recipe.data.train
    console = Console(file=io.StringIO(), width=200)
    result = train(recipe, console=console)

    assert (result.steps, result.best_step, result.best_value) == (6, 4, script[3])
    assert (
        f"early stopping at step 6: {best_metric} did not improve for 2 evaluations"
        in console.file.getvalue()
    )
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2, 3, 4, 5, 6] and all("eval_exact_match" in r for r in evals)
    assert [r[best_metric] for r in evals] == script
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # nothing after step 6
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert {k: saved[k] for k in ("steps", "best_metric", "best_step", "best_value")} == {
        "steps": 6, "best_metric": best_metric, "best_step": 4, "best_value": script[3]
    }  # fmt: skip
    # final/ holds the weights of step 4 (the best checkpoint), not those of step 6 where it stopped.
    checkpoints = tmp_path / "run" / "checkpoints"
    best, last = (load_file(checkpoints / f"step-{s:06d}" / "trainable.safetensors") for s in (4, 6))
    final = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert "lm_head.weight" in best and set(best) <= set(final)
    for name, tensor in best.items():
        assert torch.equal(final[name], tensor), name
    assert not all(torch.equal(last[n], t) for n, t in best.items())  # steps 5 and 6 did change weights


def test_quickstart_improves_the_score(tmp_path):
    from flantune.quickstart import quickstart

    scores = quickstart(tmp_path / "qs", steps=150)
    assert scores["before"] < 10 and scores["after"] > scores["before"] + 50


def test_seq2seq_trainer_uses_our_datasets_and_collator(tiny_t5, tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    from flantune.data import MODEL_COLUMNS, load_split, make_collator
    from flantune.models import load_model_and_tokenizer

    recipe = make_recipe(tiny_t5, write_copy_task(tmp_path), tmp_path / "run")
    loaded = load_model_and_tokenizer(recipe.model)
    split = load_split(recipe.data, "train", loaded.tokenizer)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=3, per_device_train_batch_size=8,
                                    report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)  # fmt: skip
    trainer = Seq2SeqTrainer(model=loaded.model, args=args, train_dataset=split.dataset.select_columns(MODEL_COLUMNS),
                             data_collator=make_collator(loaded.tokenizer, loaded.model))  # fmt: skip
    output = trainer.train()
    assert output.global_step == 3 and math.isfinite(output.training_loss)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_two_process_ddp_matches_one_process(tiny_t5, tmp_path, packing):
    """Two DDP processes with batch 4 each take the same steps as one process with batch 8: same
    examples per step, gradients averaged over all target tokens of the step (dropout off). Packed,
    the processes' gradients must still be all-reduced (their forward bypasses the model's own)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_t5, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    data = write_copy_task(tmp_path, n=64)

    def write_recipe(name: str, batch_size: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model: {{path: {model_dir}, init: random}}\n"
            "method: {kind: lora, r: 4, dropout: 0.0, target_modules: all-linear}\n"
            f"data: {{task: template, task_options: {{source: '{{text}}', target: '{{answer}}'}}, train: {data}}}\n"
            f"train: {{max_steps: 6, batch_size: {batch_size}, save_every: 3, log_every: 1, lr: 0.01, "
            f"packing: {str(packing).lower()}, group_by_length: false}}\n"
            f"output_dir: {tmp_path / name}\n"
        )
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `--multi_gpu` on a machine without GPUs starts torch.distributed processes on the CPU (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flantune.cli", "train", str(write_recipe("ddp", 4))]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddp"
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # written once, by the main process
    assert records[0]["epoch"] == 0.125  # 8 of 64 examples per step: the processes split the data
    assert {p.name for p in (out / "checkpoints" / "step-000003").iterdir()} >= {"rng-0.pt", "rng-1.pt"}
    assert (out / "final" / "adapter_model.safetensors").exists()

    single = subprocess.run([sys.executable, "-m", "flantune.cli", "train", str(write_recipe("one", 8))],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert losses(out) == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def _every_process_in_two_processes():
    from accelerate import Accelerator

    from flantune.run import every_process

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    # Each process's own number (its GPU's memory peak, in a run), all of them on every process.
    assert every_process(accelerator, 1.5 + accelerator.process_index) == [1.5, 2.5]
    assert every_process(accelerator, None) is None


def test_every_process_gathers_each_process_number():
    """result.json's peak_memory_gib_per_process: one number per process, in process order (two
    CPU processes through Accelerate's test launcher)."""
    from accelerate import debug_launcher

    debug_launcher(_every_process_in_two_processes, num_processes=2)


def test_gradient_accumulation_averages_over_all_target_tokens(tiny_t5, tmp_path):
    """grad_accum=2 x batch 4 takes the same steps as batch 8: the loss is the mean over every target
    token of the step, not a mean of per-micro-batch means (targets here have uneven lengths)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_t5, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    data = write_copy_task(tmp_path, n=64)
    method = {"kind": "lora", "r": 4, "dropout": 0.0, "target_modules": "all-linear"}
    same = dict(max_steps=5, lr=1e-2, group_by_length=False)  # the same examples per step on both sides
    train(make_recipe(model_dir, data, tmp_path / "accum", method, batch_size=4, grad_accum=2, **same))
    train(make_recipe(model_dir, data, tmp_path / "whole", method, batch_size=8, **same))
    assert losses(tmp_path / "accum") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_qlora_needs_a_gpu(tiny_t5, tmp_path):
    from flantune.methods import MethodError

    # The test's device is the CPU (conftest), also on a machine with a GPU.
    with pytest.raises(MethodError, match="method.kind=qlora: .* needs a CUDA GPU"):
        train(make_recipe(tiny_t5, write_copy_task(tmp_path), tmp_path / "run", {"kind": "qlora"}))


def test_two_process_fsdp_matches_one_process_and_resumes(tiny_t5, tmp_path):
    """FSDP (version 2, parameters sharded over two CPU processes) through `accelerate launch`:
    the same losses and final weights as one process with the whole batch, and an exact resume.
    On CPU processes Accelerate would run DDP instead: tests.fsdp_cpu makes it shard, as on GPUs."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_t5, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.0}))
    data = write_copy_task(tmp_path, n=64)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {{path: {model_dir}, init: random}}\nmethod: {{kind: full}}\n"
        f"data: {{task: template, task_options: {{source: '{{text}}', target: '{{answer}}'}}, train: {data}}}\n"
        "train: {max_steps: 4, batch_size: 4, save_every: 2, log_every: 1, lr: 0.001, schedule: constant, "
        "group_by_length: false}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Each T5 block a shard unit of its own (Accelerate finds the class in _no_split_modules).
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
            "--num_processes", "2", "--main_process_port", free_port(), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tests.fsdp_cpu", "train", str(recipe)]  # fmt: skip

    def run(args):
        result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run([*fsdp, f"output_dir={tmp_path / 'fsdp'}"])
    # Sharded: the checkpoint's optimizer state was gathered from the shards, keyed by parameter name.
    saved = torch.load(tmp_path / "fsdp" / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=False)
    assert all(isinstance(name, str) for name in saved["state"]) and saved["state"]
    run(
        [
            sys.executable,
            "-m",
            "flantune.cli",
            "train",
            str(recipe),
            "train.batch_size=8",
            f"output_dir={tmp_path / 'one'}",
        ]
    )
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    sharded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "fsdp" / "final")
    whole = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "one" / "final")
    for a, b in zip(sharded.parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    run([*fsdp, "train.max_steps=2", f"output_dir={tmp_path / 'resumed'}"])
    run([*fsdp, "--resume", f"output_dir={tmp_path / 'resumed'}"])
    assert losses(tmp_path / "resumed") == losses(tmp_path / "fsdp")


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of `tag` as TensorBoard shows the event files in `folder` (one run's folder)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def logged(out: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if key in r]


def test_report_to_tensorboard_logs_what_metrics_jsonl_holds(tiny_t5, tmp_path):
    """train.report_to [tensorboard]: Accelerate's TensorBoard tracker under output_dir/tensorboard/
    (a folder named after the run) holds the loss and learning rate of every logged step, as
    metrics.jsonl does, and the recipe as flat hyperparameters. A run resumed from a checkpoint
    before its last logged steps redoes them: TensorBoard shows each step once, as metrics.jsonl."""
    import shutil

    import yaml

    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    data = write_copy_task(tmp_path)
    out = tmp_path / "run"
    kw = dict(max_steps=4, save_every=2, schedule="linear", report_to=["tensorboard"])
    train(make_recipe(tiny_t5, data, out, **kw))
    # As if the run had been killed after logging steps 3 and 4 but before step 4's checkpoint.
    shutil.rmtree(out / "checkpoints" / "step-000004")
    train(make_recipe(tiny_t5, data, out, **kw, resume=True))
    runs = out / "tensorboard" / "run"
    for key in ("loss", "lr"):
        expected = logged(out, key)
        assert [step for step, _ in expected] == [1, 2, 3, 4]
        shown = tensorboard_scalars(runs, key)
        assert [step for step, _ in shown] == [1, 2, 3, 4]  # the first run's 3 and 4 are hidden
        assert [v for _, v in shown] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32 events
    [hparams, *_] = sorted(runs.glob("*/hparams.yml"))
    recorded = yaml.safe_load(hparams.read_text())
    assert recorded["train.lr"] == 3e-3 and recorded["method.kind"] == "full"
    assert recorded["data.task_options.metrics"] == '["exact_match"]'


def test_length_grouped_batches():
    """Every example once per epoch; batches of similar lengths (each megabatch sorted); the batch
    with the longest example first; the same batches for the same epoch, others for the next."""
    from flantune.samplers import LengthGroupedBatches

    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 500, (1030,), generator=g)]
    sampler = LengthGroupedBatches(lengths, batch_size=8, seed=1)
    batches = sampler.batches()
    assert len(batches) == len(sampler) == 129
    assert sorted(i for b in batches for i in b) == list(range(1030))
    assert max(lengths[i] for i in batches[0]) == max(lengths)
    # Within a batch the lengths are close: far less spread than random batches of 8.
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30, spread  # random batches of 8 over 1..500: ~390
    assert sampler.batches() == batches
    sampler.set_epoch(1)
    assert sampler.batches() != batches
    with pytest.raises(ValueError, match="train.group_by_length: packed runs have no padding to save"):
        recipe_from_dict({"model": {"path": "x"}, "data": {"task": "sciq"},
                          "train": {"group_by_length": True, "packing": True}})  # fmt: skip


def test_length_grouped_batches_under_two_processes():
    """Under DDP (Accelerate's shard of a batch sampler, as `accelerate launch` prepares the loader for
    each process) the two processes take alternate length-grouped batches of the same epoch order:
    every example once per epoch, except one batch repeated to even out an odd count, as
    Accelerate's even_batches does; the next epoch is another order on both processes."""
    from accelerate.data_loader import prepare_data_loader
    from torch.utils.data import DataLoader

    from flantune.samplers import LengthGroupedBatches

    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(1, 500, (1030,), generator=g)]
    seen = {}
    for epoch in (0, 1):
        for process in (0, 1):
            sampler = LengthGroupedBatches(lengths, batch_size=8, seed=1)  # each process builds its own
            loader = prepare_data_loader(
                DataLoader(list(range(len(lengths))), batch_sampler=sampler, collate_fn=list),
                num_processes=2, process_index=process, put_on_device=False,
            )  # fmt: skip
            sampler.set_epoch(epoch)  # as train.micro_batches does, both calls
            loader.set_epoch(epoch)
            seen[epoch, process] = list(loader)
    for epoch in (0, 1):
        first, second = seen[epoch, 0], seen[epoch, 1]
        assert len(first) == len(second) == 65  # 129 batches: one more on the second process
        examples = [i for batch in first + second for i in batch]
        assert set(examples) == set(range(len(lengths)))
        assert len(examples) - len(lengths) <= 8  # only the batch repeated to even out the count
        assert all(set(a).isdisjoint(b) for a, b in zip(first[:-1], second[:-1], strict=True))
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in first) / len(first)
        assert spread < 30, spread  # still grouped by length on each process
    assert seen[0, 0] != seen[1, 0] and seen[0, 1] != seen[1, 1]


def test_data_wait_share_shows_a_slow_loader(tiny_t5, tmp_path, monkeypatch):
    """metrics.jsonl's data_wait_share: the share of each log window spent waiting for batches."""
    import time

    import flantune.train as train_module

    data = write_copy_task(tmp_path)

    def shares(out):
        records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["data_wait_share"] for r in records if "data_wait_share" in r]

    train(make_recipe(tiny_t5, data, tmp_path / "fast", max_steps=4))
    real = train_module.make_collator

    def slow_collator(*args, **kwargs):
        collate = real(*args, **kwargs)

        def slow(rows):
            time.sleep(0.25)
            return collate(rows)

        return slow

    monkeypatch.setattr(train_module, "make_collator", slow_collator)
    train(make_recipe(tiny_t5, data, tmp_path / "slow", max_steps=4))
    fast, slow = shares(tmp_path / "fast"), shares(tmp_path / "slow")
    assert len(fast) == len(slow) == 4 and all(0 <= s <= 1 for s in fast + slow)
    assert min(slow) > 0.5 and min(slow) > max(fast), (fast, slow)


def test_profile_steps_record_the_window(tiny_t5, tmp_path):
    """train.profile_steps writes a trace, an operator table and a summary of exactly that window."""
    data = write_copy_task(tmp_path)
    out = tmp_path / "run"
    train(make_recipe(tiny_t5, data, out, max_steps=5, profile_steps=[2, 3]))
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == [2, 3] and summary["wall_s"] > 0
    names = [e.get("name") for e in json.loads((out / "profile" / "trace.json").read_text())["traceEvents"]]
    assert names.count("Optimizer.step#AdamW.step") == 2  # steps 2 and 3, no more
    assert "aten::" in (out / "profile" / "ops.txt").read_text()
    # A window past the end of the run records nothing (and says so).
    train(make_recipe(tiny_t5, data, tmp_path / "late", max_steps=2, profile_steps=[4, 5]))
    assert not (tmp_path / "late" / "profile").exists()


def test_a_run_says_and_records_its_path_and_time_to_the_first_step(tiny_t5, tmp_path):
    data = write_copy_task(tmp_path, n=32)
    console = Console(file=io.StringIO(), width=300)
    result = train(make_recipe(tiny_t5, data, tmp_path / "run", max_steps=2), console=console)
    said = console.file.getvalue()
    line = (
        "speed: unpacked rows grouped by length, the model's own attention; no packing: no CUDA device "
        "(eager packed attention is not faster than unpacked rows on a CPU)"
    )
    assert line in said and "first optimizer step after" in said
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # one line per log step, the first saying more
    assert records[0]["speed"]["line"] == line and "speed" not in records[1]
    assert records[0]["speed"]["group_by_length"] is True and records[0]["speed"]["packing"] is False
    first = [r["first_step_s"] for r in records if "first_step_s" in r]
    assert len(first) == 1 and 0 < first[0] < result.seconds + 60
    # The breakdown of that time: the set-up before the loop; no compilation or capture on a CPU.
    startup = records[0]["startup"]
    assert startup == {"setup_s": startup["setup_s"], "first_step_s": first[0]} and 0 < startup["setup_s"] < first[0]
    assert "set-up" in said
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["speed"]["line"] == line and saved["first_step_s"] == first[0] and saved["startup"] == startup
    assert saved["peak_memory_gib"] is None  # the CPU has no CUDA memory peak
    # The run's recipe.yaml holds the resolved path, so that a resume that would take another is refused.
    recipe_text = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "packing: false" in recipe_text and "group_by_length: true" in recipe_text
    with pytest.raises(TrainingError, match=r"train.group_by_length: true -> false"):
        train(make_recipe(tiny_t5, data, tmp_path / "run", max_steps=3, resume=True, group_by_length=False))
