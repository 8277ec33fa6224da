"""flantune merge: merged LoRA/IA3 models load with plain transformers and match the adapter model."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSeq2SeqLM

from flantune.export import ExportError, merge
from flantune.models import load_model
from flantune.train import train

from .conftest import ROOT
from .test_train import METHODS, make_recipe, tiny_model_dir, write_copy_task


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory, t5_small_path):
    return tiny_model_dir(tmp_path_factory.mktemp("t5"), t5_small_path)


@pytest.mark.parametrize("kind", ["lora", "ia3", "dora"])
def test_merge_matches_the_adapter_model(kind, tiny_t5, tmp_path):
    data = write_copy_task(tmp_path)
    recipe = make_recipe(tiny_t5, data, tmp_path / "run", METHODS[kind], max_steps=4, lr=1e-2)
    recipe.model.add_tokens = ["<answer>"] if kind == "lora" else []
    final = train(recipe).final_dir
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "merge", str(final), "--out", str(tmp_path / "merged")],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    merged = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    base = load_model(str(tiny_t5), init="random", seed=0)  # the run's random base, rebuilt from its seed
    if kind == "lora":
        from flantune.models import fit_embeddings, load_tokenizer

        fit_embeddings(base, load_tokenizer(str(final)))
    adapted = PeftModel.from_pretrained(base, final).eval()
    ids, labels = torch.tensor([[100, 200, 32100 if kind == "lora" else 5, 1]]), torch.tensor([[7, 8, 1]])
    torch.testing.assert_close(merged(input_ids=ids, labels=labels).logits, adapted(input_ids=ids, labels=labels).logits,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert not any("lora" in n or "ia3" in n for n, _ in merged.named_parameters())


@pytest.mark.parametrize("kind", ["prefix", "adapter"])
def test_unmergeable_adapters_are_refused(kind, tiny_t5, tmp_path):
    final = train(
        make_recipe(tiny_t5, write_copy_task(tmp_path), tmp_path / "run", METHODS[kind], max_steps=1)
    ).final_dir
    with pytest.raises(ExportError, match="cannot be"):
        merge(str(final), str(tmp_path / "merged"))


def test_merge_errors(tmp_path):
    with pytest.raises(ExportError, match="no adapter_config.json"):
        merge(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"kind": "bottleneck"}))
    with pytest.raises(ExportError, match="non-linear"):
        merge(str(tmp_path / "a"), str(tmp_path / "out"))


def test_push_says_why_it_did_not_push(tmp_path, monkeypatch):
    from flantune.export import push

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no saved login
    with pytest.raises(ExportError, match="no Hugging Face token"):
        push(str(folder), "me/model")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE"):  # the tests run offline
        push(str(folder), "me/model", token="hf_x")
    with pytest.raises(ExportError, match="not a model or adapter folder"):
        push(str(tmp_path), "me/model", token="hf_x")
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "push", str(folder), "--repo-id", "me/model"],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HOME": str(tmp_path / "hf")})  # fmt: skip
    assert result.returncode == 2 and "not pushed" in result.stderr and "Traceback" not in result.stderr


def test_push_uploads_the_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from flantune.export import push

    folder = tmp_path / "final"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    calls = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, **kw: calls.append(("create", repo_id, kw)) or f"https://hf.co/{repo_id}",
    )
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"], kw["folder_path"])))  # fmt: skip
    assert push(str(folder), "me/model", private=True, token="hf_x") == "https://hf.co/me/model"
    assert calls == [
        ("create", "me/model", {"private": True, "exist_ok": True}),
        ("upload", "me/model", str(folder)),
    ]

    def unreachable(self, **kw):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(HfApi, "upload_folder", unreachable)
    with pytest.raises(ExportError, match="cannot reach the hub"):
        push(str(folder), "me/model", token="hf_x")
