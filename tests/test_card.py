"""The model card in every final/ (README.md the Hub reads), eval scores in it, push uploading it; and
the ways people use a result with plain transformers and PEFT, on a tiny T5 trained by flantune."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard

from flantune.config import DataSource
from flantune.evaluate import run_eval
from flantune.final import add_scores, ensure_card, write_card
from flantune.models import load_model
from flantune.train import train

from .conftest import ASSETS, load_for_generation, need
from .test_train import METHODS, make_recipe, tiny_model_dir, write_copy_task

SOURCES = ["reverse: red green blue", "reverse: cold warm", "reverse: small new old fast"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, t5_small_path):
    """A tiny T5 of FLAN-T5's architecture with its real tokenizer files (spiece.model too, as a hub
    FLAN-T5 has), trained by full fine-tuning and by LoRA; each recipe has a test split."""
    folder = tmp_path_factory.mktemp("card")
    base = tiny_model_dir(folder / "base", t5_small_path)
    shutil.copyfile(need(ASSETS / "flan-t5-small" / "spiece.model"), base / "spiece.model")
    (folder / "test").mkdir()
    data, test = write_copy_task(folder), write_copy_task(folder / "test", n=6, seed=1)
    out = {"base": base}
    for kind in ("full", "lora"):
        recipe = make_recipe(base, data, folder / kind, METHODS[kind], max_steps=3)
        recipe.data.test = DataSource(path=str(test))
        recipe.eval.max_rows = 4
        result = train(recipe)
        out[kind], out[f"{kind}-recipe"] = result.final_dir, recipe
    return out


def card_of(folder):
    return ModelCard.load(folder / "README.md")


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_every_final_has_a_card_the_hub_reads(kind, runs):
    final = runs[kind]
    card = card_of(final)
    assert card.data.library_name == {"full": "transformers", "lora": "peft"}[kind]
    assert card.data.pipeline_tag == "text2text-generation"
    assert {"flantune", kind, "template"} <= set(card.data.tags)
    # A random-init base came from no hub model (and the Hub refuses a path): the text names it instead.
    assert card.data.base_model is None and str(runs["base"]) in card.text
    assert card.data.datasets is None  # the data is a local file
    # The result section carries result.json's own numbers.
    result = json.loads((final.parent / "result.json").read_text())
    assert f"| final train loss | {result['train_loss']:.4f} |" in card.text
    assert f"| steps | {result['steps']} |" in card.text
    assert "| method | " + ("full fine-tuning" if kind == "full" else "LoRA: r 4, alpha 8") in card.text
    if kind == "full":
        assert f'model_id = "{final.as_posix()}"' in card.text
    else:  # its random base is rebuilt from the seed: flantune loads it
        assert f"flantune generate {final.as_posix()}" in card.text


def test_card_metadata_names_a_hub_base_its_license_and_hub_datasets(runs, tmp_path):
    recipe = runs["lora-recipe"]
    hub_recipe = make_recipe(runs["base"], "allenai/sciq", tmp_path / "run", METHODS["lora"])
    folder = tmp_path / "adapter"
    shutil.copytree(runs["lora"], folder)
    record = json.loads((folder / "flantune.json").read_text())
    record["base"] = {"path": "google/flan-t5-small", "init": "pretrained", "seed": 0, "revision": None}
    (folder / "flantune.json").write_text(json.dumps(record))
    card = ModelCard.load(write_card(folder, recipe=hub_recipe))
    assert card.data.base_model == "google/flan-t5-small" and card.data.datasets == ["allenai/sciq"]
    assert card.data.license is None  # no card of the base on this machine says one
    assert 'AutoModelForSeq2SeqLM.from_pretrained("google/flan-t5-small")' in card.text
    assert "PeftModel.from_pretrained(base, model_id)" in card.text
    # A local pretrained base: its own card's license carries over; base_model stays out (a path).
    local_base = tmp_path / "local-base"
    local_base.mkdir()
    (local_base / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base\n")
    record["base"] = {"path": str(local_base), "init": "pretrained", "seed": 0, "revision": None}
    (folder / "flantune.json").write_text(json.dumps(record))
    card = ModelCard.load(write_card(folder, recipe=recipe))
    assert card.data.license == "apache-2.0" and card.data.base_model is None


def test_eval_puts_its_scores_in_the_card_and_replaces_them_on_re_eval(runs, tmp_path):
    recipe, final = runs["full-recipe"], runs["full"]
    card_path = final / "README.md"
    card = ModelCard.load(card_path)
    # What an earlier eval on the test split left (its value is not this model's), and a result on
    # another split, which stays.
    earlier = EvalResult(task_type="text2text-generation", task_name="template", dataset_type="reverse.jsonl",
                         dataset_name="earlier", dataset_split="test", metric_type="exact_match", metric_value=123.0)  # fmt: skip
    other_split = EvalResult(task_type="text2text-generation", task_name="template", dataset_type="reverse.jsonl",
                             dataset_name="x", dataset_split="validation", metric_type="exact_match", metric_value=7.0)  # fmt: skip
    card.data.eval_results = [earlier, other_split]
    card_path.write_text(str(card))
    results = run_eval(recipe, str(final), out=tmp_path / "report")
    assert results["card"] == str(card_path)
    scores = json.loads((tmp_path / "report" / "metrics.json").read_text())["models"]["fine-tuned"]
    card = card_of(final)
    entries = [r for r in card.data.eval_results if r.dataset_split == "test"]
    assert len(entries) == len(scores) and {r.metric_type: r.metric_value for r in entries} == scores
    assert {(r.dataset_type, r.task_name) for r in entries} == {("reverse.jsonl", "template")}
    assert [r.metric_value for r in card.data.eval_results if r.dataset_split == "validation"] == [7.0]
    assert card.text.startswith("\n# full") and card.data.library_name == "transformers"  # the rest stays


def test_eval_cards_an_older_run_given_as_an_adapter(runs, tmp_path):
    """`--model BASE --adapter FINAL`: the adapter's card gets the scores; a final/ written before
    cards gets one first, from the recipe and result beside it."""
    older = tmp_path / "older"
    shutil.copytree(runs["lora"].parent, older, ignore=shutil.ignore_patterns("README.md", "checkpoints"))
    run_eval(runs["lora-recipe"], str(runs["base"]), adapter=str(older / "final"), out=tmp_path / "report")
    card = card_of(older / "final")
    scores = json.loads((tmp_path / "report" / "metrics.json").read_text())["models"]["fine-tuned"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == scores
    assert card.data.library_name == "peft"
    result = json.loads((older / "result.json").read_text())
    assert f"| final train loss | {result['train_loss']:.4f} |" in card.text


def test_scores_never_go_into_folders_flantune_did_not_make_or_the_hub_cache(runs, tmp_path, monkeypatch):
    from huggingface_hub import constants

    data, scores = runs["full-recipe"].data, {"exact_match": 50.0}
    theirs = tmp_path / "theirs"  # a model folder made elsewhere, without a card
    shutil.copytree(runs["full"], theirs, ignore=shutil.ignore_patterns("README.md", "flantune.json"))
    assert add_scores(str(theirs), scores, data, "test") is None and not (theirs / "README.md").exists()
    assert add_scores("google/flan-t5-small", scores, data, "test") is None
    cache = tmp_path / "hub"
    snapshot = cache / "models--me--m" / "snapshots" / "abc"
    shutil.copytree(runs["full"], snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    before = (snapshot / "README.md").read_text()
    assert add_scores(str(snapshot), scores, data, "test") is None
    assert (snapshot / "README.md").read_text() == before
    (snapshot / "README.md").unlink()
    ensure_card(snapshot, "me/m")  # what push does first: nothing, in the hub cache
    assert not (snapshot / "README.md").exists()


def test_push_uploads_the_card_and_makes_one_where_there_is_none(runs, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    from flantune.export import push

    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kw):  # what the hub would receive
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://hf.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    older = tmp_path / "run"  # a run written before final/ had a card
    shutil.copytree(runs["full"].parent, older, ignore=shutil.ignore_patterns("README.md", "checkpoints"))
    push(str(older / "final"), "me/tiny", token="hf_x")
    assert "README.md" in uploaded and "model.safetensors" in uploaded
    card = ModelCard(uploaded["README.md"].decode())
    assert card.data.library_name == "transformers" and {"full", "template"} <= set(card.data.tags)
    assert 'model_id = "me/tiny"' in card.text  # the card's code loads from where it was pushed
    # A card someone wrote goes up as it is.
    mine = tmp_path / "mine"
    shutil.copytree(runs["full"], mine)
    (mine / "README.md").write_text("---\nlicense: mit\n---\n# my model\n")
    uploaded.clear()
    push(str(mine), "me/mine", token="hf_x")
    assert uploaded["README.md"] == b"---\nlicense: mit\n---\n# my model\n"


def test_merge_writes_the_merged_models_card(runs, tmp_path):
    from flantune.export import merge

    out = merge(str(runs["lora"]), str(tmp_path / "merged"))
    card = card_of(out)
    assert card.data.library_name == "transformers" and {"lora", "merged"} <= set(card.data.tags)
    assert "AutoModelForSeq2SeqLM.from_pretrained(model_id)" in card.text
    assert (out / "spiece.model").is_file()


# ---- the ways people use a result, without flantune ----------------------------------------


def test_t5_classes_and_the_sentencepiece_tokenizer_load_a_full_run(runs, tmp_path):
    """T5Tokenizer and T5ForConditionalGeneration from final/ answer as flantune does; final/
    carries spiece.model, so the tokenizer also builds from it alone (sentencepiece), as older
    transformers' slow T5Tokenizer and other toolkits read it. (transformers 5 removed the
    text2text-generation pipeline; `generate` is what it ran.)"""
    from transformers import T5ForConditionalGeneration, T5Tokenizer

    from flantune.decoding import generate_texts

    final = runs["full"]
    assert (final / "spiece.model").read_bytes() == (ASSETS / "flan-t5-small" / "spiece.model").read_bytes()
    tokenizer = T5Tokenizer.from_pretrained(final)
    model = T5ForConditionalGeneration.from_pretrained(final).eval()
    max_new = runs["full-recipe"].generation.max_new_tokens
    plain = [
        tokenizer.decode(model.generate(**tokenizer(s, return_tensors="pt"), max_new_tokens=max_new, do_sample=False)[0],
                         skip_special_tokens=True)
        for s in SOURCES
    ]  # fmt: skip
    ours = generate_texts(*load_for_generation(str(final)), SOURCES, runs["full-recipe"].generation)
    assert plain == ours and any(plain)
    slow_only = tmp_path / "slow"
    shutil.copytree(final, slow_only, ignore=shutil.ignore_patterns("tokenizer.json"))
    from_spiece = T5Tokenizer.from_pretrained(slow_only)
    for text in [*SOURCES, "Zürich, 3 apples"]:
        assert from_spiece(text).input_ids == tokenizer(text).input_ids


def test_peft_loads_a_lora_run_trainable_and_a_step_changes_it(runs):
    from peft import PeftModel

    base = load_model(str(runs["base"]), init="random", seed=0)  # the run's random base, from its seed
    model = PeftModel.from_pretrained(base, runs["lora"], is_trainable=True)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = model(input_ids=torch.tensor([[100, 200, 300, 1]]), labels=torch.tensor([[5, 6, 1]])).loss
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(not torch.equal(after[n], before) for n, before in trainable.items())
    assert all(torch.equal(after[n], before) for n, before in frozen.items())
