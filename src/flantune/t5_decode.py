"""The T5 decode step, written out: one new token of every row through the decoder, over the engine's
static caches (flantune.engine's `_Decoder`).

Why our own. On a GPU the decode step is launch-bound: a replayed CUDA graph spends ~2.4 us on each
small kernel (docs/benchmarks.md), so what the step does besides its matmuls is what it costs.
transformers' T5 step rebuilds at every step what does not change during a call: each of its 24
attentions (flan-t5-base) clones its cache position and builds its own float mask from the position
bias (`create_position_bias_mask`), the stack builds a causal mask, and layer 0 recomputes the
relative-position buckets. Here:

- the self-attention bias of every (query position, key position) pair of the call, causal mask
  included, is built once per batch (`prepare`: (H, T, T) for the cache's T positions); a step takes
  its row with one index_select, and the cross-attention mask once for all layers;
- a layer writes its key/value slot with index_copy_ and attends with one SDPA call, all layers at
  the one position tensor they share; on CUDA both attentions are flantune.decode_attention's
  kernels instead (the slot written by the self-attention's, the sources' padding not read);
- a source's samples or beams attend its one copy of the cross-attention keys/values together (the
  engine keeps one per source), or, packed (`PACKED_CROSS`), the sources' keys/values without
  their padding through torch's variable-length flash attention;
- plain q, k, v and wi_0, wi_1 projections run as one matrix product each from stacked weight copies
  (`FusedWeights`), and plain output projections (o, cross o, wo) add into the residual in place
  (`FUSE_RESIDUALS`);
- the layer is one function of the layer's modules and tensors (`layer_step`), the same code for
  every layer, so torch.compile compiles it once for all of them (regional compilation: one graph,
  not the whole step's 12 or 24 layers, hence seconds of compilation where the whole step takes
  13-20 s; `compiled_layer`).

Otherwise the projections, norms and feed-forward are the layers' own modules, called as modules:
PEFT's LoRA, DoRA, IA3 and QLoRA layers, trainable tokens, the engine's fused norms and its gathered
LoRA rows run here as they run in transformers' step. The arithmetic is transformers' (the same
buckets, bias, mask value, SDPA call and fp16 clamps): tests/test_t5_decode.py compares logits with
transformers' step, tests/test_engine.py tokens with `generate`. Models this does not cover keep transformers' step (`unsupported` says
why): other architectures (UMT5's bias per layer, BART), bottleneck adapters around the attentions
(houlsby; the feed-forward ones run here), prefix tuning, hooks on the blocks (Accelerate's
offloading), dropout in training mode.
"""

from __future__ import annotations

import functools
import inspect
import os
import weakref

import torch
import torch.nn.functional as F

from flantune import decode_attention

# The model classes whose decode step this module runs, and whether each scales the decoder output by
# d_model**-0.5 before the LM head (transformers: T5 when its config says so, mT5 never).
_SCALES = {
    "T5ForConditionalGeneration": lambda config: bool(config.scale_decoder_outputs),
    "MT5ForConditionalGeneration": lambda config: False,
}
_SUBLAYERS = (("T5LayerSelfAttention", "MT5LayerSelfAttention"), ("T5LayerCrossAttention", "MT5LayerCrossAttention"),
              ("T5LayerFF", "MT5LayerFF"))  # fmt: skip

# Whether the engine decodes T5 and mT5 with this step (False: transformers' step, the A/B side of
# bench/generate_speed.py; FLANTUNE_OWN_STEP=0 in the environment sets it).
OWN_STEP = os.environ.get("FLANTUNE_OWN_STEP", "1") != "0"


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(model) -> str | None:
    """Why this step cannot decode `model` (then the engine runs transformers' step), or None."""
    base = _base(model)
    scale = _SCALES.get(type(base).__name__)
    if scale is None:
        return f"{type(base).__name__} is not a T5 or mT5 model class"
    config = base.config
    if type(base).__name__ == "T5ForConditionalGeneration" and not hasattr(config, "scale_decoder_outputs"):
        return "this transformers version's T5 config has no scale_decoder_outputs"
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and getattr(peft_config, "is_prompt_learning", False):
        return "prefix tuning adds its own keys and values"
    if base.training and config.dropout_rate > 0:
        return "dropout is active (training mode)"
    decoder = base.get_decoder()
    for i, block in enumerate(decoder.block):
        names = tuple(type(sublayer).__name__ for sublayer in block.layer)
        if len(names) != 3 or any(name not in allowed for name, allowed in zip(names, _SUBLAYERS, strict=True)):
            return f"decoder block {i} holds {names}"
        attentions = (block.layer[0].SelfAttention, block.layer[1].EncDecAttention)
        kinds = tuple(type(module).__name__ for module in attentions)
        if any(kind not in ("T5Attention", "MT5Attention") for kind in kinds):
            return f"decoder block {i}: attention modules {kinds} (bottleneck adapters around the attentions)"
        attention = attentions[0]
        if attention.has_relative_attention_bias != (i == 0) or block.layer[1].EncDecAttention.has_relative_attention_bias:
            return f"decoder block {i}: a relative bias other than T5's (one table, in block 0)"
        for module in (block, *block.layer, attention, block.layer[1].EncDecAttention):
            if module._forward_hooks or module._forward_pre_hooks or "forward" in vars(module):
                return f"decoder block {i}: hooks on {type(module).__name__}"
    return None


def _clamp16(hidden: torch.Tensor) -> torch.Tensor:
    """transformers' T5 clamp of infinities in float16 after each sublayer (nothing in other dtypes)."""
    if hidden.dtype != torch.float16:
        return hidden
    top = torch.finfo(hidden.dtype).max
    limit = torch.where(torch.isinf(hidden).any(), top - 1000, top)
    return torch.clamp(hidden, min=-limit, max=limit)


def project(inputs: torch.Tensor, module, weight: torch.Tensor | None) -> torch.Tensor:
    """module(inputs) for a bias-free plain nn.Linear, from `weight`: its weight or a copy of it in the
    step's dtype (FusedWeights), where given and usable (the inputs' dtype, or under autocast, which
    casts the inputs as it would for the module and finds the weight in its dtype already)."""
    if weight is not None and (inputs.dtype == weight.dtype or torch.is_autocast_enabled(inputs.device.type)):
        return F.linear(inputs, weight)
    return module(inputs)


def _add_product(hidden: torch.Tensor, inputs: torch.Tensor, module, weight: torch.Tensor | None) -> torch.Tensor:
    """hidden + module(inputs), hidden (N, 1, d_model). With `weight` (as for `project`) and
    FUSE_RESIDUALS, where hidden, inputs and weight share a dtype, outside autocast: one matrix
    product that adds into `hidden` in place (addmm_: cuBLAS's beta = 1; an out-of-place addmm
    would copy `hidden` first, a kernel more). Else the product (`project`), then the sum (under
    autocast the product is in the autocast dtype and the residual float32)."""
    if (FUSE_RESIDUALS and weight is not None and hidden.dtype == inputs.dtype == weight.dtype
            and hidden.is_contiguous() and not torch.is_autocast_enabled(hidden.device.type)):  # fmt: skip
        flat = hidden.view(-1, hidden.shape[-1])  # (N, d_model), the same memory
        return flat.addmm_(inputs.reshape(-1, inputs.shape[-1]), weight.t()).view(hidden.shape)
    return hidden + project(inputs, module, weight)


def layer_step(block, hidden, self_keys, self_values, cross_keys, cross_values, position, self_bias, cross_bias,
               copies: int = 1, cross_queries=None, cross_lengths=None, max_source: int = 0, qkv=None, wi=None,
               outs=(None, None, None), cross_q=None, slots=None, cross_mask=None, kernels: bool = False):  # fmt: skip
    """One decoder layer for one new token per row; the same code for every layer.

    hidden (N, 1, d_model); self_keys, self_values (N, H, T, D), slot `position` (1,) written here;
    cross_keys, cross_values (N / copies, H, S, D), filled once per batch, one per source whose
    `copies` adjacent rows attend to them as `copies` queries of one attention; self_bias (1, H, 1,
    T) the relative bias of this position with the causal mask in it; cross_bias (N / copies, 1, 1,
    S) the sources' mask. Packed (`cross_lengths` given): cross_keys, cross_values (tokens, H, D) the
    sources' positions without padding, source g's at cross_lengths[g]:cross_lengths[g + 1] (int32,
    cumulative), its rows' queries at cross_queries[g]:cross_queries[g + 1]; no mask. `qkv` (3 inner,
    d_model), `wi` (2 d_ff, d_model): the layer's q, k, v and wi_0, wi_1 weights stacked
    (`FusedWeights`), one matrix product each instead of three and two. `outs`: the weights of the
    self-attention's o, the cross-attention's o and the feed-forward's wo in the step's dtype (each
    or None: the module runs), `cross_q` the cross-attention's q; under FUSE_RESIDUALS the output
    products add into the residual in place: `hidden` is overwritten.
    `slots` (N,): rows at positions of their own (continuous batching, flantune.continuous):
    `position` (N,) is each row's slot, written at self_keys[slots[r], :, position[r]], and
    self_bias (N, H, 1, T) each row's own.
    `kernels` (CUDA, flantune.decode_attention): both attentions through its kernels, the new key
    and value written into the cache by the self-attention's; the cross-attention then takes
    `cross_mask` (N / copies, S), a source's encoder mask row, in place of `cross_bias`.
    Returns the layer's output (N, 1, d_model)."""
    rows = hidden.shape[0]
    attention = block.layer[0].SelfAttention
    heads, head_dim = attention.n_heads, attention.key_value_proj_dim
    normed = block.layer[0].layer_norm(hidden)
    if qkv is not None:
        query, key, value = F.linear(normed, qkv).split(heads * head_dim, dim=-1)  # (N, 1, inner) each
    else:
        query, key, value = attention.q(normed), attention.k(normed), attention.v(normed)
    if kernels:  # the cache write and the attention in one kernel
        out = decode_attention.self_attention(
            query.view(rows, heads, head_dim), key.view(rows, heads, head_dim), value.view(rows, heads, head_dim),
            self_keys, self_values, position, self_bias, attention.scaling, slots,
        ).view(rows, 1, heads * head_dim)  # fmt: skip
    else:
        query = query.view(rows, 1, heads, head_dim).transpose(1, 2)  # (N, H, 1, D)
        if slots is None:  # every row at `position`
            self_keys.index_copy_(2, position, key.view(rows, 1, heads, head_dim).transpose(1, 2))
            self_values.index_copy_(2, position, value.view(rows, 1, heads, head_dim).transpose(1, 2))
        else:  # row r at position[r]; the caches may be kept in another dtype (casts are no-ops otherwise)
            self_keys[slots, :, position] = key.view(rows, heads, head_dim).to(self_keys.dtype)
            self_values[slots, :, position] = value.view(rows, heads, head_dim).to(self_values.dtype)
        out = F.scaled_dot_product_attention(query, self_keys, self_values, attn_mask=self_bias,
                                             scale=attention.scaling)  # fmt: skip
        out = out.transpose(1, 2).reshape(rows, 1, heads * head_dim)
    hidden = _clamp16(_add_product(hidden, out, attention.o, outs[0]))

    cross = block.layer[1].EncDecAttention
    normed = block.layer[1].layer_norm(hidden)
    if cross_lengths is not None:
        query = project(normed, cross.q, cross_q).view(rows, heads, head_dim)  # (N, H, D): `copies` queries a source
        out = _varlen()(query, cross_keys, cross_values, cross_queries, cross_lengths, copies, max_source,
                        scale=cross.scaling)  # (N, H, D)  # fmt: skip
        hidden = _clamp16(_add_product(hidden, out.reshape(rows, 1, heads * head_dim), cross.o, outs[1]))
    else:
        query = project(normed, cross.q, cross_q).view(rows // copies, copies, heads, head_dim)  # (N / c, c, H, D)
        if kernels:  # each source's padding skipped
            out = decode_attention.cross_attention(query, cross_keys, cross_values, cross_mask, cross.scaling)
        else:
            out = F.scaled_dot_product_attention(query.transpose(1, 2), cross_keys, cross_values, attn_mask=cross_bias,
                                                 scale=cross.scaling).transpose(1, 2)  # fmt: skip
        hidden = _clamp16(_add_product(hidden, out.reshape(rows, 1, heads * head_dim), cross.o, outs[1]))
    if wi is None:
        return _clamp16(block.layer[2](hidden))  # the feed-forward sublayer as transformers runs it
    ff = block.layer[2].DenseReluDense  # T5DenseGatedActDense's arithmetic, wi_0 and wi_1 in one product
    gate, linear = F.linear(block.layer[2].layer_norm(hidden), wi).chunk(2, dim=-1)  # (N, 1, d_ff) each
    inner = ff.act(gate) * linear
    # transformers casts the input to wo's dtype (T5 may keep wo in float32); a copy in the step's
    # dtype takes it as it is (under autocast the cast and autocast's cast back cancel exactly).
    wo = outs[2] if outs[2] is not None else ff.wo.weight
    if inner.dtype != wo.dtype and wo.dtype != torch.int8:
        inner = inner.to(wo.dtype)
    return _clamp16(_add_product(hidden, inner, ff.wo, outs[2]))


# Cross-attention over the sources without their padding (PACKED_CROSS): each layer's keys and values
# packed, (tokens, H, D), and attended with torch's variable-length flash attention
# (torch.nn.attention.varlen), which reads each source's own positions only. A step otherwise reads
# every padded position of every source: a batch of the first 128 SciQ rows holds 18,032 real tokens
# in 128 x 512 positions, 2.4 GB of bf16 keys and values a step for flan-t5-base, 72 % of it padding
# (docs/benchmarks.md). CUDA, bf16/fp16, torch 2.10+ only. Off by default: measured on an H200 it
# does not pay (0.95x-1.04x the padded cache's tokens/s for flan-t5-base and flan-t5-large, 0.97x
# in the 72 %-padding cell; docs/benchmarks.md, 2026-12-04). Not profiled; a likely cause: with one
# query per source (greedy) the kernel's query tiles are almost empty.
PACKED_CROSS = os.environ.get("FLANTUNE_PACKED_CROSS", "0") == "1"


@functools.cache
def _varlen():
    """torch's variable-length attention, or None where this torch has none (or none taking `scale`)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn if "scale" in inspect.signature(varlen_attn).parameters else None


def packed_cross_ready(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a decoder on `device` whose keys are `dtype` runs the packed cross-attention."""
    return (PACKED_CROSS and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and head_dim <= 256
            and _varlen() is not None)  # fmt: skip


# Stacked projections (FUSE_PROJECTIONS): a layer's q, k and v weights as one (3 inner, d_model) matrix
# and its gated feed-forward's wi_0 and wi_1 as one (2 d_ff, d_model), so the step runs one matrix
# product where it ran three and two: 36 fewer kernels a step for flan-t5-base (12 layers), the
# step being launch-bound on a GPU. Copies, so only for layers whose projections are plain nn.Linear
# (not PEFT-wrapped, not quantized), refreshed from the model's weights at every batch (a model
# trained between calls), kept once per model and dtype for every decoder of it. "auto": on CUDA
# where the copies take at most FUSE_MEMORY_SHARE of the free memory (flan-t5-base in bf16: 117 MB;
# flan-t5-xxl: 6.4 GB); "1" everywhere; "0" never. Measured on an H200 (flan-t5-base, bf16): 1.05x-1.06x
# the tokens/s of the layers' own products (docs/benchmarks.md, 2026-12-04). With them, a float32
# model decoding under bf16 autocast also reads its other plain projections (o, cross q, cross o, wo)
# and LM head from bf16 copies made once a batch (`FusedWeights.singles`, `head`; ~130 MB more for
# flan-t5-base), where autocast casts each of those weights at every step (up to 49 cast kernels a
# flan-t5-base step; the captured steps run autocast without its weight cache, flantune.graphs, and
# it caches only weights that require grad anyway): the same products, bitwise
# (tests/test_t5_decode.py). In every `cuda` test under autocast and RL's rollouts since 2026-12-04;
# not measured apart.
FUSE_PROJECTIONS = os.environ.get("FLANTUNE_FUSE_PROJECTIONS", "auto")
# With them (wherever FUSE_PROJECTIONS stacks), a layer's three output products (self-attention o,
# cross-attention o, feed-forward wo) add into the residual as one in-place addmm_ each, where the
# layer's module and the sum were two kernels: 36 fewer a step for flan-t5-base. The module's own
# weight (no copy), plain nn.Linear only; not under the compiled layer (inductor fuses the sums
# itself). The sum is rounded once (float32 accumulation, then the dtype) where the module's output
# was rounded before the sum: in bf16 not bitwise transformers' step, in float32 within 1e-6.
FUSE_RESIDUALS = os.environ.get("FLANTUNE_FUSE_RESIDUALS", "1") != "0"
FUSE_MEMORY_SHARE = 0.05
_FUSED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # base model -> {dtype: FusedWeights}


def _plain(module) -> bool:
    """A bias-free nn.Linear as torch makes it, its weight a plain tensor (not PEFT-wrapped, not
    quantized, not sharded: an FSDP DTensor is left to its module), with nothing hooked on it."""
    return (type(module) is torch.nn.Linear and module.bias is None and type(module.weight.data) is torch.Tensor
            and not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module))  # fmt: skip


def _fusable(block) -> tuple[bool, bool]:
    """Whether a decoder block's self-attention q, k, v, and its feed-forward's wi_0, wi_1, can stack."""
    attention, ff = block.layer[0].SelfAttention, block.layer[2].DenseReluDense
    gated = hasattr(ff, "wi_0") and hasattr(ff, "wi_1") and _plain(ff.wi_0) and _plain(ff.wi_1)
    return _plain(attention.q) and _plain(attention.k) and _plain(attention.v), gated


def _singles(block) -> tuple:
    """A decoder block's self-attention o, cross-attention q, cross-attention o and feed-forward wo
    modules (wo None where the feed-forward has none)."""
    cross = block.layer[1].EncDecAttention
    return (block.layer[0].SelfAttention.o, cross.q, cross.o, getattr(block.layer[2].DenseReluDense, "wo", None))


OWN = True
"""A FusedWeights entry for a plain projection already in the step's dtype: its own weight, taken from
the module when a step's options are built (`weights_of`), so that nothing kept holds the model's
tensors."""


def _weight_in(linear, dtype: torch.dtype):
    """OWN where a plain `linear`'s weight is in `dtype`, an empty copy in `dtype` where not (filled by
    `FusedWeights.refresh`), None where the module is not plain (its product runs through it)."""
    if linear is None or not _plain(linear):
        return None
    return OWN if linear.weight.dtype == dtype else torch.empty_like(linear.weight, dtype=dtype)


def weights_of(held, linear) -> torch.Tensor | None:
    """The weight a step reads for a FusedWeights entry `held` of `linear`: the copy, the module's own
    weight (OWN), or None (the module runs)."""
    return linear.weight if held is OWN else held


class FusedWeights:
    """One model's decode weights in one dtype: per decoder layer the stacked (qkv or None, wi or
    None), and the plain single projections (self o, cross q, cross o, wo; `singles`) and the LM head
    (`head`), each OWN where the module's weight is in the dtype (taken from the module when a step
    is set up: nothing here holds the model's tensors), a copy where it is not (a float32 model
    decoding under bf16 autocast, as RL's rollouts do: autocast would cast every one of those weights
    again at every step, a kernel each), or None (the module runs)."""

    def __init__(self, base, dtype: torch.dtype):
        decoder = base.get_decoder()
        self.plan = [_fusable(block) for block in decoder.block]
        self.layers = []
        for block, (attention, ff) in zip(decoder.block, self.plan, strict=True):
            q, wi_0 = block.layer[0].SelfAttention.q.weight, getattr(block.layer[2].DenseReluDense, "wi_0", None)
            self.layers.append((
                torch.empty(3 * q.shape[0], q.shape[1], dtype=dtype, device=q.device) if attention else None,
                torch.empty(2 * wi_0.weight.shape[0], wi_0.weight.shape[1], dtype=dtype, device=q.device) if ff else None,
            ))  # fmt: skip
        self.singles = [tuple(_weight_in(linear, dtype) for linear in _singles(block)) for block in decoder.block]
        self.head = _weight_in(base.lm_head, dtype)
        self.single_plan = single_plan(base)
        held = [t for pair in self.layers for t in pair] + [t for four in self.singles for t in four] + [self.head]
        copies = [t for t in held if isinstance(t, torch.Tensor)]
        self.bytes = sum(t.numel() * t.element_size() for t in copies)  # what the copies take
        self.useful = any(t is not None for t in held)

    @torch.no_grad()
    def refresh(self, base) -> None:
        """Copy the model's current weights in (per batch: 117 MB for flan-t5-base's stacked ones in bf16;
        under autocast ~130 MB more for its single projections and head)."""
        decoder = base.get_decoder()
        for block, four in zip(decoder.block, self.singles, strict=True):
            for linear, held in zip(_singles(block), four, strict=True):
                if isinstance(held, torch.Tensor):
                    held.copy_(linear.weight)
        if isinstance(self.head, torch.Tensor):
            self.head.copy_(base.lm_head.weight)
        for block, (qkv, wi) in zip(decoder.block, self.layers, strict=True):
            if qkv is not None:
                attention, inner = block.layer[0].SelfAttention, qkv.shape[0] // 3
                for k, linear in enumerate((attention.q, attention.k, attention.v)):
                    qkv[k * inner : (k + 1) * inner].copy_(linear.weight)
            if wi is not None:
                ff, width = block.layer[2].DenseReluDense, wi.shape[0] // 2
                wi[:width].copy_(ff.wi_0.weight)
                wi[width:].copy_(ff.wi_1.weight)


def single_plan(base) -> list[tuple[bool, ...]]:
    """Which single projections of each decoder layer, and whether the LM head, are plain."""
    layers = [tuple(linear is not None and _plain(linear) for linear in _singles(block)) for block in base.get_decoder().block]
    return [*layers, (_plain(base.lm_head),)]


def fused_weights(model, dtype: torch.dtype) -> FusedWeights | None:
    """`model`'s FusedWeights in `dtype` (made once and kept while the model lives, made again when
    which layers are plain changed, e.g. PEFT wrapped some), or None where FUSE_PROJECTIONS leaves
    them out or no projection is plain."""
    base = _base(model)
    decoder = base.get_decoder()
    device = decoder.block[0].layer[0].SelfAttention.q.weight.device
    if FUSE_PROJECTIONS == "0" or (FUSE_PROJECTIONS != "1" and device.type != "cuda"):
        return None
    kept = _FUSED.setdefault(base, {})
    fused = kept.get(dtype)
    if (fused is None or fused.plan != [_fusable(block) for block in decoder.block]
            or fused.single_plan != single_plan(base)):  # fmt: skip
        fused = kept[dtype] = FusedWeights(base, dtype)
    if not fused.useful:
        return None
    if FUSE_PROJECTIONS != "1" and fused.bytes > FUSE_MEMORY_SHARE * torch.cuda.mem_get_info(device)[0]:
        del kept[dtype]
        return None
    return fused


# torch.compile of `layer_step`, made once per process: dynamo keeps one cache for the function, so
# every layer of every model reuses the graph while its guards hold (shapes, dtypes, the modules'
# structure). A new shape bucket compiles once more, with dynamic sizes from the second one on.
_COMPILED = None


def compiled_layer():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(layer_step)
    return _COMPILED


@torch.no_grad()
def bias_table(model, length: int, dtype: torch.dtype) -> torch.Tensor:
    """(H, T, T) for T = `length` cache positions: the self-attention bias of query position t for
    key position j, from the model's relative-bias embedding with transformers' buckets
    (`compute_bias`), the dtype's smallest value where j > t (the causal mask, transformers' mask
    value)."""
    attention = _base(model).get_decoder().block[0].layer[0].SelfAttention
    device = attention.relative_attention_bias.weight.device
    positions = torch.arange(length, device=device)
    relative = positions[None, :] - positions[:, None]  # (T, T) key position - query position
    buckets = attention._relative_position_bucket(
        relative, bidirectional=False, num_buckets=attention.relative_attention_num_buckets,
        max_distance=attention.relative_attention_max_distance,
    )  # fmt: skip
    values = attention.relative_attention_bias(buckets).permute(2, 0, 1)  # (H, T, T)
    causal = positions[None, :] <= positions[:, None]
    return torch.where(causal, values.to(dtype), torch.finfo(dtype).min)


def layer_options(model, fused: FusedWeights | None, compiled: bool = False) -> list[dict]:
    """Per decoder layer, the options `layer_step` takes besides tensors: the stacked weights of
    `fused` (FUSE_PROJECTIONS) and, not under the compiled layer (inductor fuses its own), the single
    projections' weights in the step's dtype, whose output products add into the residual
    (FUSE_RESIDUALS)."""
    blocks = _base(model).get_decoder().block
    if fused is None:
        return [{} for _ in blocks]
    options = []
    for block, (qkv, wi), four in zip(blocks, fused.layers, fused.singles, strict=True):
        o, cross_q, cross_o, wo = (weights_of(held, linear) if not compiled else None
                                   for held, linear in zip(four, _singles(block), strict=True))  # fmt: skip
        options.append({"qkv": qkv, "wi": wi, "outs": (o, cross_o, wo), "cross_q": cross_q})
    return options


def scale_of(model) -> float | None:
    """The factor on the decoder's output before the LM head (T5's d_model**-0.5 where its config
    says so), or None."""
    base = _base(model)
    return base.config.d_model**-0.5 if _SCALES[type(base).__name__](base.config) else None


class T5Step:
    """The decode step of one `_Decoder` (its caches, its step input, its encoder mask): `__call__(model)`
    returns the (N, V) logits after `tokens` and advances the position by one.

    Every self-attention layer of the cache keeps its own position tensor, which transformers' cache
    advances layer by layer; here the layers share the first layer's tensor (one add a step), so
    everything that reads or resets positions per layer (the engine's snapshot, restore, reset and
    row moves) sees one value."""

    def __init__(self, model, cache, encoder_mask: torch.Tensor, tokens: torch.Tensor, compiled: bool = False,
                 copies: int = 1, packed_sources: tuple[int, int] | None = None):  # fmt: skip
        # Tensors only: a kept recording must not keep the model alive (the engine's `_Decoder` holds
        # the model during a call only), so the model comes with each call.
        self.scale = scale_of(model)
        self_layers = cache.self_attention_cache.layers
        self.position = self_layers[0].cumulative_length  # 0-dim long: the slot this step writes
        for layer in self_layers[1:]:
            layer.cumulative_length = self.position
        keys = self_layers[0].keys  # (N, H, T, D)
        heads, length = keys.shape[1], keys.shape[2]
        self.dtype = keys.dtype
        # (H, T, T): the bias of query position t for key position j, the smallest value of the dtype
        # where j > t (transformers' mask value), filled by `prepare`.
        self.bias = torch.zeros(heads, length, length, dtype=self.dtype, device=keys.device)
        self.encoder_mask, self.tokens = encoder_mask, tokens  # (N, S), (N, 1): the engine's tensors
        self.zero = torch.zeros((), dtype=self.dtype, device=keys.device)
        self.lowest = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=keys.device)
        self.layer = compiled_layer() if compiled else layer_step
        self.copies = copies  # rows per source in the cross-attention cache (see `layer_step`)
        self.fused = fused_weights(model, self.dtype)  # the stacked projections, or None
        # Packed cross-attention: `packed_sources` (sources, S) the cross cache's shape it replaces.
        self.packed = packed_sources is not None
        packed = {}
        if self.packed:
            sources, source_len = packed_sources
            capacity, head_dim = sources * source_len, keys.shape[3]
            self.cross = [(torch.zeros(capacity, heads, head_dim, dtype=self.dtype, device=keys.device),
                           torch.zeros(capacity, heads, head_dim, dtype=self.dtype, device=keys.device))
                          for _ in self_layers]  # fmt: skip
            self.cross_lengths = torch.zeros(sources + 1, dtype=torch.int32, device=keys.device)  # cumulative
            packed = {"cross_queries": torch.arange(0, keys.shape[0] + 1, copies, dtype=torch.int32, device=keys.device),
                      "cross_lengths": self.cross_lengths, "max_source": source_len}  # fmt: skip
        cross = self.cross if self.packed else [(c.keys, c.values) for c in cache.cross_attention_cache.layers]
        # Each layer's tensors for `layer_step`, in the order of the decoder's blocks, fixed for this
        # decoder's life (its caches and the kept copies are updated in place); with the options,
        # which may name the model's own weights, built at a call's first step and dropped by
        # `release` (`arguments`).
        self.tensors = [(own.keys, own.values, keys_, values_) for own, (keys_, values_) in zip(self_layers, cross,
                                                                                                strict=True)]  # fmt: skip
        self.packed_options, self.compiled = packed, compiled
        self._arguments: list | None = None
        self._head: torch.Tensor | None = None

    def arguments(self, model) -> list:
        """Per layer (tensors, options) for `layer_step` (kept until `release`)."""
        if self._arguments is None:
            options = layer_options(model, self.fused, self.compiled)
            self._arguments = [(tensors, {**self.packed_options, **layer})
                               for tensors, layer in zip(self.tensors, options, strict=True)]  # fmt: skip
            self._head = weights_of(self.fused.head, _base(model).lm_head) if self.fused is not None else None
        return self._arguments

    def release(self) -> None:
        """Drop what names the model's tensors (the end of a call: a kept recording must not keep
        them alive; the engine never replays it for another model)."""
        self._arguments, self._head = None, None

    @torch.no_grad()
    def prepare(self, model) -> None:
        """The self-attention bias table from the model's relative-bias embedding, as transformers'
        `compute_bias` computes it for each position (the same buckets), causal mask included. Per
        batch: a fine-tuned model's table changes between calls."""
        self.bias.copy_(bias_table(model, self.bias.shape[-1], self.dtype))
        if self.fused is not None:
            self.fused.refresh(_base(model))

    def take_bias(self, other: T5Step) -> None:
        """`other`'s bias table (a decoder that takes over another's rows mid-call)."""
        self.bias.copy_(other.bias)

    @torch.no_grad()
    def fill_cross(self, projections: list[tuple], hidden: torch.Tensor, mask: torch.Tensor) -> None:
        """Packed: every layer's cross-attention keys/values of the real positions of `hidden` (sources,
        S, d_model) under `mask` (sources, S), source after source, and their cumulative lengths.
        (A padding source of a captured bucket has its first position in the mask: one position.)"""
        real = hidden[mask.bool()]  # (tokens, d_model), a sync for its size: once per batch
        tokens, head_dim = real.shape[0], self.cross[0][0].shape[2]
        for (keys, values), (key_proj, value_proj) in zip(self.cross, projections, strict=True):
            keys[:tokens].copy_(key_proj(real).view(tokens, -1, head_dim))
            values[:tokens].copy_(value_proj(real).view(tokens, -1, head_dim))
        self.cross_lengths[0] = 0
        self.cross_lengths[1:].copy_(mask.sum(1).cumsum(0))

    @torch.no_grad()
    def take_cross(self, other: T5Step, groups: torch.Tensor) -> None:
        """Packed: the keys/values of `other`'s sources `groups` (g,) as this step's first g sources;
        the sources past them (a bucket's padding) get one position each."""
        lengths = (other.cross_lengths[1:] - other.cross_lengths[:-1]).long().index_select(0, groups)  # (g,)
        starts = other.cross_lengths[:-1].long().index_select(0, groups)
        ends = lengths.cumsum(0)
        tokens = int(ends[-1])  # a sync: compaction happens at a stopping check, which synchronized
        index = torch.repeat_interleave(starts - (ends - lengths), lengths, output_size=tokens)
        index += torch.arange(tokens, device=index.device)  # (tokens,) positions in `other`'s buffers
        for (keys, values), (their_keys, their_values) in zip(self.cross, other.cross, strict=True):
            keys[:tokens].copy_(their_keys.index_select(0, index))
            values[:tokens].copy_(their_values.index_select(0, index))
        g, padding = groups.shape[0], self.cross_lengths.shape[0] - 1 - groups.shape[0]
        self.cross_lengths[0] = 0
        self.cross_lengths[1 : g + 1].copy_(ends)
        self.cross_lengths[g + 1 :].copy_(tokens + torch.arange(1, padding + 1, device=index.device))

    def __call__(self, model) -> torch.Tensor:
        base = _base(model)
        decoder = base.get_decoder()
        hidden = decoder.embed_tokens(self.tokens)  # (N, 1, d_model)
        position = self.position.view(1)
        self_bias = self.bias.index_select(1, position)[None]  # (1, H, 1, T)
        # The attentions through flantune.decode_attention's kernels (CUDA; not in the compiled layer,
        # whose graph inductor makes): they take the sources' mask rows; SDPA takes an additive mask.
        kernels = not self.compiled and decode_attention.ready(self.bias, self.tensors[0][0].shape[-1])
        cross_bias, cross_mask = None, self.encoder_mask[:: self.copies]  # (N / copies, S)
        if not self.packed and not kernels:
            cross_bias = torch.where(cross_mask[:, None, None, :] != 0, self.zero, self.lowest)  # (N / copies, 1, 1, S)
        for block, ((self_keys, self_values, cross_keys, cross_values), options) in zip(
            decoder.block, self.arguments(model), strict=True
        ):
            hidden = self.layer(block, hidden, self_keys, self_values, cross_keys, cross_values, position, self_bias,
                                cross_bias, self.copies, cross_mask=cross_mask, kernels=kernels, **options)  # fmt: skip
        self.position.add_(1)
        hidden = decoder.final_layer_norm(hidden)
        if self.scale is not None:
            hidden = hidden * self.scale
        return project(hidden, base.lm_head, self._head)[:, -1]  # (N, V)
