"""The engine's own T5 decode step (flantune.t5_decode) against transformers' T5 step on the same
caches: logits step by step, the key/value slots written, for FLAN-T5 (untied head), T5 with its
decoder output scaled (tied head) and mT5; its layer compiled once for every layer; the models it
leaves to transformers' step. Token equality with `generate` over the whole engine is
tests/test_engine.py's (every T5 case there decodes through this step)."""

import copy

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, MT5Config, MT5ForConditionalGeneration

from flantune import engine, t5_decode

from .conftest import tiny_config

SOURCES = ["question: is the sky blue?", "a", "sentiment analysis: a long and winding review " * 3, "b c"]


def tiny_t5(path: str, **changes):
    cfg = tiny_config(path)
    cfg.update({"initializer_factor": 2.0, **changes})
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg).eval()


def tiny_mt5(path: str):
    t5 = tiny_config(path)
    keep = ("vocab_size", "d_model", "d_ff", "num_layers", "num_decoder_layers", "num_heads", "d_kv",
            "feed_forward_proj", "decoder_start_token_id", "pad_token_id", "eos_token_id")  # fmt: skip
    torch.manual_seed(0)
    return MT5ForConditionalGeneration(MT5Config(**{k: getattr(t5, k) for k in keep}, initializer_factor=2.0)).eval()


def steps(model, batch, own: bool, steps: int = 6, compiled: bool = False, monkeypatch=None):
    """(logits (steps, N, V), self-attention keys after the steps): greedy, one step at a time over
    the engine's `_Decoder`, with the own step or transformers'."""
    monkeypatch.setattr(t5_decode, "OWN_STEP", own)
    with torch.no_grad():
        hidden = model.get_encoder()(**batch).last_hidden_state
        decoder = engine._Decoder(model, hidden, batch["attention_mask"], 16, compiled_layers=compiled)
        assert (decoder.own is not None) == own
        decoder.tokens.fill_(model.config.decoder_start_token_id)
        decoder.fill_cross()
        out = []
        for _ in range(steps):
            logits = decoder.step()
            out.append(logits)
            decoder.tokens.copy_(logits.argmax(-1)[:, None])
    keys = torch.stack([layer.keys for layer in decoder.cache.self_attention_cache.layers])
    return torch.stack(out), keys


@pytest.mark.parametrize("kind", ["flan-t5", "t5-tied", "mt5"])
def test_own_step_equals_transformers_step(t5_small_path, kind, monkeypatch):
    """Logits of every step and the cache slots written equal transformers' step on the same caches
    (float32, sources of uneven length, so the cross-attention mask matters). FLAN-T5's head is
    untied; T5's original tied head scales the decoder output (scale_decoder_outputs); mT5 never
    scales."""
    if kind == "mt5":
        model = tiny_mt5(t5_small_path)
    else:
        model = tiny_t5(t5_small_path, **({"scale_decoder_outputs": True} if kind == "t5-tied" else {}))
    if kind == "t5-tied":
        assert model.config.scale_decoder_outputs
    tokenizer = AutoTokenizer.from_pretrained(t5_small_path)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    theirs, their_keys = steps(model, batch, own=False, monkeypatch=monkeypatch)
    ours, our_keys = steps(model, batch, own=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_keys, their_keys, atol=1e-6, rtol=1e-6)
    assert not torch.equal(ours[0], ours[1])  # the steps differ: positions advance


def test_own_step_with_lora(t5_small_path, monkeypatch):
    """The projections are the layers' own modules: a LoRA adapter (non-zero B) changes the logits,
    and ours still equal transformers' step on the PEFT model."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_t5(t5_small_path), LoraConfig(r=4, target_modules=["q", "k", "v", "o", "wi_0", "wo"],
                                                              init_lora_weights=False)).eval()  # fmt: skip
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    theirs, _ = steps(model, batch, own=False, monkeypatch=monkeypatch)
    ours, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        plain, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    assert not torch.allclose(plain, ours, atol=1e-3)


def test_compiled_layer_is_one_graph_for_every_layer(t5_small_path, monkeypatch):
    """torch.compile of `layer_step` traces one graph that every decoder layer reuses (block 0, which
    holds the relative-bias table, included), and one more for a new batch shape, with dynamic sizes
    after it; the compiled layers' logits equal the eager ones."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    monkeypatch.setattr(t5_decode, "_COMPILED", torch.compile(t5_decode.layer_step, backend=backend))
    model = tiny_t5(t5_small_path, num_layers=4, num_decoder_layers=4)
    tokenizer = AutoTokenizer.from_pretrained(t5_small_path)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True)
    eager, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    compiled, _ = steps(model, batch, own=True, compiled=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    assert len(graphs) == 1, len(graphs)
    more = tokenizer([*SOURCES, *SOURCES], return_tensors="pt", padding=True)
    steps(model, more, own=True, compiled=True, steps=2, monkeypatch=monkeypatch)
    fewer = tokenizer(SOURCES[:3], return_tensors="pt", padding=True)
    steps(model, fewer, own=True, compiled=True, steps=2, monkeypatch=monkeypatch)
    assert len(graphs) == 2, len(graphs)
    torch._dynamo.reset()


def test_models_it_leaves_to_transformers(t5_small_path, bart_path):
    """`unsupported` names why: another architecture, bottleneck adapters around the attentions,
    prefix tuning, dropout in training mode, hooks on a block. Those decode as before, through
    transformers' step (the engine's tests cover them)."""
    from peft import PrefixTuningConfig, get_peft_model

    from flantune.adapters import AdapterConfig, add_adapters

    model = tiny_t5(t5_small_path)
    assert t5_decode.unsupported(model) is None
    assert "BartForConditionalGeneration" in t5_decode.unsupported(AutoModelForSeq2SeqLM.from_config(tiny_config(bart_path)))
    adapted = copy.deepcopy(model)
    add_adapters(adapted, AdapterConfig(placement="houlsby"))
    assert "adapters" in t5_decode.unsupported(adapted)
    prefix = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    assert "prefix" in t5_decode.unsupported(prefix)
    assert "dropout" in t5_decode.unsupported(copy.deepcopy(model).train())
    hooked = copy.deepcopy(model)
    hooked.decoder.block[1].register_forward_hook(lambda *args: None)
    assert "hooks" in t5_decode.unsupported(hooked)


def test_own_step_with_feed_forward_adapters(t5_small_path, monkeypatch):
    """Bottleneck adapters placed after the feed-forward only (pfeiffer, the default) wrap a module
    the step calls as it is: ours equal transformers' step, and the adapters change the logits."""
    from flantune.adapters import AdapterConfig, add_adapters

    model = tiny_t5(t5_small_path)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    plain, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    add_adapters(model, AdapterConfig(placement="pfeiffer"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter." in name:
                param.normal_(0, 0.5)
    assert t5_decode.unsupported(model) is None
    theirs, _ = steps(model, batch, own=False, monkeypatch=monkeypatch)
    ours, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-3)



def fused_residuals(model, batch, monkeypatch) -> int:
    """The in-place addmm_ calls of one decode step of `model` (FUSE_RESIDUALS' products)."""
    from flantune import engine

    calls = []
    addmm_ = torch.Tensor.addmm_

    def counted(self, *args, **kwargs):
        calls.append(self.shape)
        return addmm_(self, *args, **kwargs)

    with torch.no_grad(), monkeypatch.context() as patch:
        hidden = model.get_encoder()(**batch).last_hidden_state
        decoder = engine._Decoder(model, hidden, batch["attention_mask"], 16)
        decoder.tokens.fill_(model.config.decoder_start_token_id)
        decoder.fill_cross()
        patch.setattr(torch.Tensor, "addmm_", counted)
        decoder.step()
    return len(calls)


def test_stacked_projections_equal_the_layers_own(t5_small_path, monkeypatch):
    """FUSE_PROJECTIONS: the step's q, k, v and wi_0, wi_1 products from stacked copies, and its
    output products added into the residual in place (FUSE_RESIDUALS; not under autocast), give
    transformers' step's logits; LoRA-wrapped projections are left to their modules (a layer whose q
    carries LoRA stacks only its feed-forward); a weight changed between two calls (training) is
    copied again at the next batch; "auto" leaves the CPU alone."""
    from peft import LoraConfig, get_peft_model

    from flantune import engine

    model = tiny_t5(t5_small_path)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", "auto")
    assert t5_decode.fused_weights(model, torch.float32) is None  # auto leaves the CPU alone
    monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", "1")
    fused = t5_decode.fused_weights(model, torch.float32)
    assert fused.plan == [(True, True)] * 2 and fused is t5_decode.fused_weights(model, torch.float32)
    theirs, _ = steps(model, batch, own=False, monkeypatch=monkeypatch)
    ours, _ = steps(model, batch, own=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the step reads the stacked copies, not the layers' own products
        hidden = model.get_encoder()(**batch).last_hidden_state
        decoder = engine._Decoder(model, hidden, batch["attention_mask"], 16)
        decoder.tokens.fill_(model.config.decoder_start_token_id)
        decoder.fill_cross()
        for qkv, wi in decoder.own.fused.layers:
            qkv.zero_(), wi.zero_()
        assert not torch.allclose(decoder.step(), ours[0], atol=1e-3)
    monkeypatch.setattr(t5_decode, "FUSE_RESIDUALS", True)
    assert fused_residuals(model, batch, monkeypatch) == 3 * 2  # o, cross o, wo of both layers, in place
    monkeypatch.setattr(t5_decode, "FUSE_RESIDUALS", False)
    assert fused_residuals(model, batch, monkeypatch) == 0
    monkeypatch.setattr(t5_decode, "FUSE_RESIDUALS", True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 residual, bf16 products: the modules
        assert fused_residuals(model, batch, monkeypatch) == 0

    def greedy(fuse: str):
        monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", fuse)
        return engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8).sequences

    greedy("1")
    with torch.no_grad():  # as an optimizer step would: in place, between two calls
        model.decoder.block[1].layer[0].SelfAttention.k.weight.mul_(-3.0)
        model.decoder.block[0].layer[2].DenseReluDense.wi_1.weight.mul_(2.5)
    assert torch.equal(greedy("1"), greedy("0"))

    lora = get_peft_model(tiny_t5(t5_small_path), LoraConfig(r=4, target_modules=["q", "v"], init_lora_weights=False))
    monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", "1")
    assert t5_decode.fused_weights(lora, torch.float32).plan == [(False, True)] * 2
    theirs, _ = steps(lora.eval(), batch, own=False, monkeypatch=monkeypatch)
    ours, _ = steps(lora, batch, own=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_sharded_weights_are_not_stacked():
    """A projection whose weight is an FSDP shard (a DTensor) keeps its module: only plain tensors
    stack (one process over gloo here)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    linear = torch.nn.Linear(8, 8, bias=False)
    assert t5_decode._plain(linear)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
        assert not t5_decode._plain(linear)
    finally:
        if started:
            dist.destroy_process_group()


def test_under_autocast_the_step_reads_weight_copies_in_its_dtype(t5_small_path, monkeypatch):
    """A float32 model under bf16 autocast (RL's rollouts): with
    FUSE_PROJECTIONS the plain single projections (o, cross q, cross o, wo) and the LM head are read
    from bf16 copies made once per batch, where autocast would cast each weight at every step. The
    logits are those of the modules under autocast (each product from the same bf16 weight and
    inputs), the step reads the copies (changing one changes them), and a weight changed between
    two calls is copied again at the next batch."""
    model = tiny_t5(t5_small_path)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", "1")
    fused = t5_decode.fused_weights(model, torch.bfloat16)
    o = model.decoder.block[0].layer[0].SelfAttention.o.weight
    assert fused.singles[0][0].dtype == torch.bfloat16 and fused.singles[0][0] is not o
    assert fused.head.dtype == torch.bfloat16 and fused.bytes > 0
    assert t5_decode.fused_weights(model, torch.float32).singles[0][0] is t5_decode.OWN  # its dtype: no copy

    def logits(fuse: str, spoil: bool = False):
        monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", fuse)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.get_encoder()(**batch).last_hidden_state
            decoder = engine._Decoder(model, hidden, batch["attention_mask"], 16)
            decoder.tokens.fill_(model.config.decoder_start_token_id)
            decoder.fill_cross()
            if spoil:
                for four in decoder.own.fused.singles:
                    four[0].zero_()  # every layer's self-attention o copy
            return decoder.step().float()

    torch.testing.assert_close(logits("1"), logits("0"), atol=0, rtol=0)
    assert not torch.allclose(logits("1", spoil=True), logits("0"), atol=1e-2)
    with torch.no_grad():  # as an optimizer step would: in place, between two batches
        model.decoder.block[1].layer[2].DenseReluDense.wo.weight.mul_(-2.0)
        model.lm_head.weight.mul_(1.5)
    torch.testing.assert_close(logits("1"), logits("0"), atol=0, rtol=0)
