"""Bottleneck adapters on tiny T5 (v1.1, gated-gelu) and BART models built from the shared configs."""

import json
import warnings

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from flantune.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Adapter,
    AdapterConfig,
    adapter_state_dict,
    add_adapters,
    has_adapters,
    load_adapters,
    mark_only_adapters_trainable,
    save_adapters,
)

from .conftest import tiny_config

ARCHS = ["t5", "bart"]
PLACEMENTS = ["houlsby", "pfeiffer"]


@pytest.fixture
def make(request):
    """make(arch, seed=0, dropout=True, **overrides) -> a tiny model in eval mode; same seed, same weights."""

    def _make(arch, seed=0, dropout=True, **overrides):
        path = request.getfixturevalue("t5_small_path" if arch == "t5" else "bart_path")
        cfg = tiny_config(path, vocab_size=128)
        if arch == "bart":
            cfg.max_position_embeddings = 64
        if not dropout:  # for comparing gradients of two runs
            cfg.update(dict(dropout_rate=0.0, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0))
        cfg.update(overrides)
        torch.manual_seed(seed)
        return AutoModelForSeq2SeqLM.from_config(cfg).eval()

    return _make


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(3, 128, (2, 9), generator=g),
        labels=torch.randint(3, 128, (2, 6), generator=g),
    )


def n_sites(model, placement):
    """Insertion points: FF in every layer; houlsby adds self-attention everywhere and cross-attention in the decoder."""
    c = model.config
    enc, dec = (
        (c.num_layers, c.num_decoder_layers) if c.model_type == "t5" else (c.encoder_layers, c.decoder_layers)
    )
    return enc + dec if placement == "pfeiffer" else 2 * enc + 3 * dec


def perturb(model, seed=1):
    """Give every adapter a non-zero up-projection, so it is no longer the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Adapter):
                for p in m.up.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def enable_checkpointing(model, reentrant):
    # transformers 5.23 renamed it (the old name warns); the GPU image's 5.17 may only have the old one.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": reentrant})
    model.config.use_cache = False


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_adapters_are_an_exact_identity(make, arch, placement):
    model = make(arch)
    with torch.no_grad():
        before = model(**batch()).logits
        names = add_adapters(model, AdapterConfig(placement=placement, reduction_factor=4))
        after = model(**batch()).logits
    assert torch.equal(before, after)
    assert len(names) == n_sites(model, placement) and has_adapters(model)
    assert all(isinstance(model.get_submodule(n), Adapter) for n in names)


@pytest.mark.parametrize("rf", [4, 16])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_matches_formula(make, arch, placement, rf):
    model = make(arch)
    config = AdapterConfig(placement=placement, reduction_factor=rf)
    add_adapters(model, config)
    d, b = 32, 32 // rf
    assert sum(t.numel() for t in adapter_state_dict(model).values()) == n_sites(model, placement) * (
        2 * d * b + b + d
    )
    assert config.base_model_type == arch  # filled in by add_adapters


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adamw_moves_every_adapter_parameter_and_no_base_parameter(make, arch, placement):
    model = make(arch).train()
    add_adapters(model, AdapterConfig(placement=placement, reduction_factor=4))
    mark_only_adapters_trainable(model)
    adapter_keys = set(adapter_state_dict(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == adapter_keys
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Every parameter goes to the optimizer: a base parameter would move if it got a gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)

    def step(seed):
        opt.zero_grad()
        model(**batch(seed)).loss.backward()
        opt.step()

    step(0)
    now = dict(model.named_parameters())
    assert all(now[n].grad is None for n in start if n not in adapter_keys)
    # With `up` at zero, `down` gets no gradient at the first step (as LoRA's A with B = 0): only `up` moves.
    for n in adapter_keys:
        assert torch.equal(now[n], start[n]) == (".down." in n), n
    step(1)
    for n, p in model.named_parameters():
        assert torch.equal(p, start[n]) == (n not in adapter_keys), n


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_into_a_fresh_base_gives_equal_logits(make, tmp_path, arch, placement):
    model = make(arch)
    config = AdapterConfig(placement=placement, reduction_factor=8, non_linearity="gelu")
    add_adapters(model, config)
    perturb(model)
    save_adapters(model, tmp_path / "adapter", config)
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary folder left behind
    meta = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert meta["kind"] == "bottleneck" and meta["base_model_type"] == arch and meta["d_model"] == 32

    fresh = make(arch)
    with torch.no_grad():
        base = fresh(**batch()).logits
        loaded = load_adapters(fresh, tmp_path / "adapter")
        assert torch.equal(fresh(**batch()).logits, model(**batch()).logits)
    assert not torch.allclose(base, model(**batch()).logits)  # the adapters do something
    assert (loaded.placement, loaded.reduction_factor, loaded.non_linearity) == (placement, 8, "gelu")
    assert isinstance(
        fresh.get_submodule(next(iter(adapter_state_dict(fresh))).rsplit(".", 2)[0]).act, torch.nn.GELU
    )


def test_save_into_an_existing_folder_keeps_its_other_files(make, tmp_path):
    model = make("t5")
    add_adapters(model, AdapterConfig())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    save_adapters(model, tmp_path / "out")  # config defaults to the one add_adapters used
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, "tokenizer.json"]
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(ValueError, match="placement"):
        save_adapters(model, tmp_path / "other", AdapterConfig(placement="houlsby"))


def test_bart_adapters_in_t5_raise_a_clear_error(make, tmp_path):
    bart = make("bart")
    add_adapters(bart, AdapterConfig())
    save_adapters(bart, tmp_path / "bart-adapter")
    t5 = make("t5")
    with pytest.raises(ValueError, match=r"adapter_config\.json.*'bart'.*'t5'"):
        load_adapters(t5, tmp_path / "bart-adapter")
    assert not has_adapters(t5)  # a refused folder leaves the model untouched


def test_d_model_mismatch_and_bad_folders_raise(make, tmp_path):
    small = make("t5")
    add_adapters(small, AdapterConfig())
    save_adapters(small, tmp_path / "a")
    with pytest.raises(ValueError, match=r"d_model=32.*d_model=64"):
        load_adapters(make("t5", d_model=64), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_adapters(make("t5"), tmp_path / "missing")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="PEFT LORA"):
        load_adapters(make("t5"), tmp_path / "peft")
    # Weights that do not match the config (here: made with pfeiffer, config says houlsby).
    meta = json.loads((tmp_path / "a" / CONFIG_NAME).read_text())
    (tmp_path / "a" / CONFIG_NAME).write_text(json.dumps({**meta, "placement": "houlsby"}))
    with pytest.raises(ValueError, match="missing"):
        load_adapters(make("t5"), tmp_path / "a")


def test_unsupported_architecture_and_bad_configs_raise(make):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=32))
    with pytest.raises(ValueError, match=r"\['bart', 'mt5', 't5'\].*'gpt2'"):
        add_adapters(gpt2, AdapterConfig())
    model = make("t5")
    for bad, match in [
        (AdapterConfig(reduction_factor=0), "reduction_factor"),
        (AdapterConfig(reduction_factor=64), "reduction_factor"),
        (AdapterConfig(placement="everywhere"), "placement"),
        (AdapterConfig(non_linearity="tanh"), "non_linearity"),
        (AdapterConfig(base_model_type="bart"), "'bart'"),
    ]:
        with pytest.raises(ValueError, match=match):
            add_adapters(model, bad)
    assert not has_adapters(model)
    with pytest.raises(ValueError, match="no bottleneck adapters"):
        mark_only_adapters_trainable(model)
    add_adapters(model, AdapterConfig())
    with pytest.raises(ValueError, match="already"):
        add_adapters(model, AdapterConfig())


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_trains_the_adapters(make, arch, reentrant):
    def adapter_grads(checkpointing):
        model = make(arch, dropout=False).train()
        add_adapters(model, AdapterConfig(placement="houlsby", reduction_factor=4))
        perturb(model)  # so every adapter parameter, `down` included, gets a non-zero gradient
        if checkpointing:
            enable_checkpointing(model, reentrant)
            # Some transformers versions make the embeddings' output require grad when checkpointing is
            # turned on; take that away, so the test shows mark_only_adapters_trainable is enough.
            model.disable_input_require_grads()
            if reentrant:  # the failure being guarded against: frozen embeddings, nothing to backpropagate
                for p in model.parameters():
                    p.requires_grad_(False)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    assert not model(**batch()).loss.requires_grad
        mark_only_adapters_trainable(model)
        model(**batch()).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    expected, got = adapter_grads(checkpointing=False), adapter_grads(checkpointing=True)
    assert got.keys() == expected.keys()
    for n, g in got.items():
        assert g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(g, expected[n], msg=n)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_weights(make, arch):
    model = make(arch).to(torch.bfloat16)
    if arch == "t5":  # as from_pretrained does for T5 (_keep_in_fp32_modules = ["wo"])
        for block in [*model.encoder.block, *model.decoder.block]:
            block.layer[-1].DenseReluDense.wo.float()
    with torch.no_grad():
        before = model(**batch()).logits
        names = add_adapters(model, AdapterConfig(placement="houlsby", reduction_factor=4))
        assert torch.equal(model(**batch()).logits, before)
    for n in names:
        want = (
            torch.float32 if "DenseReluDense" in n else torch.bfloat16
        )  # follows the wrapped output projection
        assert {p.dtype for p in model.get_submodule(n).parameters()} == {want}, n
    mark_only_adapters_trainable(model)
    perturb(model)
    model.train()(**batch()).loss.backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_generate(make, arch):
    model = make(arch)
    ids = batch()["input_ids"]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    base = model.generate(ids, **kwargs)
    add_adapters(model, AdapterConfig(placement="houlsby", reduction_factor=4))
    assert torch.equal(model.generate(ids, **kwargs), base)
    perturb(model)
    # The key/value cache goes through the wrapped attention modules: cached and uncached decoding agree.
    cached = model.generate(ids, use_cache=True, **kwargs)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))
    assert cached.shape == base.shape
