"""Model loading: published shapes (untied FLAN-T5 head), special tokens, clear load errors."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flantune.config import ModelConfig
from flantune.models import (
    ModelLoadError,
    add_special_tokens,
    count_parameters,
    fit_embeddings,
    heads_are_tied,
    load_model,
    load_model_and_tokenizer,
)

from .conftest import tiny_config


def test_random_flan_t5_small_has_the_published_shape_with_an_untied_head(t5_small_path):
    model = load_model(t5_small_path, init="random", seed=0)
    assert not heads_are_tied(model)
    assert model.config.tie_word_embeddings is False
    assert model.config.scale_decoder_outputs is False  # T5 v1.1 does not rescale before the head
    # 60,511,616 with a tied head; FLAN-T5-small's published checkpoint has 76,961,152.
    assert count_parameters(model) == (76_961_152, 76_961_152)
    assert not torch.equal(model.lm_head.weight, model.shared.weight)


def test_untied_head_survives_save_and_load(tmp_path, t5_small_path):
    model = load_model(t5_small_path, init="random", seed=1).eval()
    model.save_pretrained(tmp_path)
    again = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert not heads_are_tied(again)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    ids, labels = torch.randint(0, 32000, (2, 9)), torch.randint(0, 32000, (2, 4))
    torch.testing.assert_close(
        again(input_ids=ids, labels=labels).logits, model(input_ids=ids, labels=labels).logits
    )


def test_bart_keeps_its_tied_head(bart_path):
    model = load_model(bart_path, init="random")
    assert heads_are_tied(model)


def test_random_init_is_seeded(t5_small_path):
    a = load_model(t5_small_path, init="random", seed=3)
    b = load_model(t5_small_path, init="random", seed=3)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert torch.equal(
        a.encoder.block[0].layer[0].SelfAttention.q.weight, b.encoder.block[0].layer[0].SelfAttention.q.weight
    )


def test_bfloat16_dtype(t5_small_path):
    model = load_model(t5_small_path, init="random", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_added_tokens_t5_fit_in_spare_rows_and_start_at_the_mean(t5_small_path):
    loaded = load_model_and_tokenizer(
        ModelConfig(path=t5_small_path, init="random", add_tokens=["<think>", "</think>"])
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.added_token_ids == [32100, 32101]
    assert model.shared.weight.shape[0] == 32128  # T5's 28 spare rows hold them: no resize
    ids = tokenizer("a <think> b </think>").input_ids
    assert 32100 in ids and 32101 in ids  # never split into pieces
    for table in (model.shared.weight, model.lm_head.weight):
        expected = table[:32100].mean(dim=0)
        torch.testing.assert_close(table[32100], expected)
        torch.testing.assert_close(table[32101], expected)
    assert not heads_are_tied(model)


def test_added_tokens_bart_grow_embeddings_and_tied_head(bart_path):
    loaded = load_model_and_tokenizer(
        ModelConfig(path=bart_path, init="random", add_tokens=["<think>", "<answer>"])
    )
    model, tokenizer = loaded.model, loaded.tokenizer
    assert len(tokenizer) == 50267 and loaded.added_token_ids == [50265, 50266]
    assert model.get_input_embeddings().weight.shape[0] == 50272  # padded to a multiple of 8
    assert heads_are_tied(model)
    assert model.get_output_embeddings().weight.shape[0] == 50272
    out = model(input_ids=torch.tensor([[0, 50265, 2]]), labels=torch.tensor([[50266, 2]]))
    assert out.logits.shape[-1] == 50272


def test_reloading_a_model_that_has_the_tokens_keeps_their_rows(tmp_path, t5_small_path):
    tokenizer = AutoTokenizer.from_pretrained(t5_small_path)
    new = add_special_tokens(tokenizer, ["<think>"])
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(t5_small_path))
    fit_embeddings(model, tokenizer, new)
    with torch.no_grad():
        model.shared.weight[new[0]] = 7.0  # as if trained
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again = load_model_and_tokenizer(ModelConfig(path=str(tmp_path), add_tokens=["<think>"]))
    assert again.added_token_ids == []
    assert torch.all(again.model.shared.weight[new[0]] == 7.0)


def test_clear_errors(tmp_path, t5_small_path):
    with pytest.raises(ModelLoadError, match="no weights.*model.init=random"):
        load_model(t5_small_path, init="pretrained")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"), init="random")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path / "empty"), init="random")
    # Tests run with HF_HUB_OFFLINE=1: a hub id that is not cached fails with a message, not a traceback.
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("nobody-has/this-model", init="pretrained")


def test_mt5_builds_with_an_untied_head(tmp_path, t5_small_path):
    from transformers import AutoTokenizer, MT5Config

    config = MT5Config(vocab_size=32128, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=2,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False)  # fmt: skip
    config.save_pretrained(tmp_path)
    raw = __import__("json").loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(__import__("json").dumps({**raw, "tie_word_embeddings": False}))
    AutoTokenizer.from_pretrained(t5_small_path).save_pretrained(tmp_path)
    loaded = load_model_and_tokenizer(ModelConfig(path=str(tmp_path), init="random", add_tokens=["<answer>"]))
    assert loaded.model.config.model_type == "mt5"
    assert not heads_are_tied(loaded.model)
    out = loaded.model(input_ids=torch.tensor([[32100, 5, 1]]), labels=torch.tensor([[32100, 1]]))
    assert torch.isfinite(out.loss)
