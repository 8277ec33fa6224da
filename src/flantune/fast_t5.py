"""Packed (padding-free) T5 training: our own T5 forward with the relative bias inside the attention.

Why our own code: no library runs packed encoder-decoder attention with T5's relative position bias.
transformers' T5 materializes a (B, H, Lq, Lk) bias for every forward, its `flex_attention` backend
refuses training with dropout, and causal-LM packing (position ids, varlen flash) has no notion of
a decoder row whose tokens must only see their own source in another row.

What this module does, on the transformers model's own parameters (nothing is copied or renamed, so
PEFT's LoRA/IA3 layers, checkpoints and `save_pretrained` are untouched):

- A packed batch (see `flantune.packing`) holds several (source, target) pairs per encoder row and
  per decoder row. Every token carries its pair's id and its position inside its pair; the pair of
  an encoder segment and the pair of a decoder segment in the same row share one id. (Or, with a
  `dec_src` column, several decoder segments name the one encoder segment they all read: a prompt's
  sampled completions in RL.)
- Attention is block-diagonal per pair: encoder self-attention within its source, decoder
  self-attention causal within its target, cross-attention from a target only to its own source.
  T5's relative positions restart at every pair, so each pair sees exactly what it would alone.
- `attention="flex"`: FlexAttention with a `BlockMask` built from the pair ids and a `score_mod`
  that adds bias[h, k_pos - q_pos] from a per-distance table (H, 2M+1) gathered from the 32-bucket
  table once per forward. No (B, H, L, L) tensor exists.
- `attention="eager"`: the same math with the bias and mask materialized; the reference for tests,
  the CPU path (FlexAttention has no CPU backward), and the path that trains the bias table.

Choices (measured facts in docs/benchmarks.md, "Training speed"):

- Dropout: FlexAttention has no dropout on attention probabilities. Under `flex` those are
  dropout-free; T5's other dropouts (embeddings, after every attention and feed-forward sublayer,
  inside the feed-forward, after the final norm) are kept, with the model's dropout_rate.
- Relative bias table under `flex`: frozen (detached). Its gradient through the score_mod turns
  every score into an atomic add into a 32 x H table (29x slower, ../shared/notes/t5-flex-attention.md).
  The tables are 2 x 32 x H numbers (1,024 in flan-t5-large) and already pretrained; under
  LoRA they are frozen anyway. `freeze_relative_bias` makes that explicit for full fine-tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_PAIR = -1
"""Pair id of padding tokens. Padding attends only padding (never a real token) and real tokens
never see padding; in the eager path no row of scores is ever fully masked. (The flex path skips
blocks of padding alone: `block_mask_tensors`.)"""


def relative_bucket(relative: Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of a relative position (key position - query position); the same arithmetic as
    transformers' `T5Attention._relative_position_bucket`, so buckets agree bit for bit."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Distances past max_exact share log-spaced buckets up to max_distance.
    large = (
        max_exact
        + (
            torch.log(distance.float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, distance, large)


def distance_table(attention, bidirectional: bool, frozen: bool) -> Tensor:
    """(H, 2 * max_distance + 1): the bias for every key - query distance in [-max_distance, max_distance].

    Buckets saturate at max_distance (every farther distance shares the last bucket), so a distance
    clamped to that range has the same bias: the table's size never depends on the sequence length
    (one compiled graph serves every length). Gathering once per forward is cheaper inside the
    kernel than bucketing per score, and the gather stays differentiable for the eager path.
    """
    weight = attention.relative_attention_bias.weight  # (num_buckets, H)
    if frozen:
        weight = weight.detach()
    reach = attention.relative_attention_max_distance
    distances = torch.arange(-reach, reach + 1, device=weight.device)
    buckets = relative_bucket(distances, bidirectional, attention.relative_attention_num_buckets, reach)
    return weight[buckets].t().contiguous()  # (H, 2M+1)


@dataclass
class Pattern:
    """Who attends to whom in one kind of attention (encoder self, decoder self, cross) of a batch."""

    q_pair: Tensor  # (B, Lq) pair id of every query token
    k_pair: Tensor  # (B, Lk)
    q_pos: Tensor  # (B, Lq) position inside its pair
    k_pos: Tensor  # (B, Lk)
    causal: bool
    bias: Tensor | None = None  # (H, 2M+1) per-distance table, or None (cross-attention has no bias)
    block_mask: object = None  # FlexAttention BlockMask, built once and shared by all layers
    kernel_options: dict | None = None  # FlexAttention kernel_options (kernel_options_for)

    def allowed(self) -> Tensor:
        """(B, 1, Lq, Lk) bool: the materialized mask (eager path)."""
        same = self.q_pair[:, :, None] == self.k_pair[:, None, :]
        if self.causal:
            same = same & (self.k_pos[:, None, :] <= self.q_pos[:, :, None])
        return same[:, None]

    def dense_bias(self) -> Tensor:
        """(B, H, Lq, Lk) relative bias (eager path)."""
        reach = self.bias.shape[1] // 2
        relative = (self.k_pos[:, None, :] - self.q_pos[:, :, None]).clamp(
            -reach, reach
        ) + reach  # (B, Lq, Lk)
        return self.bias[:, relative].permute(1, 0, 2, 3)

    def additive_mask(self, dtype: torch.dtype) -> Tensor:
        """(B, H, Lq, Lk) (or (B, 1, Lq, Lk) without a bias) in `dtype`: the relative bias where the
        pattern allows, dtype's lowest value elsewhere (the SDPA path). Made once per pattern and
        dtype, shared by every layer, as transformers shares its position bias."""
        cached = self.__dict__.setdefault("_additive", {})
        if dtype not in cached:
            allowed = self.allowed()  # (B, 1, Lq, Lk)
            base = self.dense_bias() if self.bias is not None else torch.zeros(allowed.shape, device=allowed.device)
            # The lowest finite value, not -inf: a query with no allowed key (padding) gets a
            # uniform average instead of NaN; its output is dropped.
            # Cast first, then fill in place: one (B, H, Lq, Lk) tensor in `dtype`, not two float32 ones.
            cached[dtype] = base.to(dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        return cached[dtype]


def mask_mod_of(pattern: Pattern):
    """The exact per-score rule, for FlexAttention's partial blocks."""
    q_pair, k_pair, q_pos, k_pos, causal = (
        pattern.q_pair,
        pattern.k_pair,
        pattern.q_pos,
        pattern.k_pos,
        pattern.causal,
    )

    def mask_mod(b, h, q, k):
        same = q_pair[b, q] == k_pair[b, k]
        if causal:
            same = same & (k_pos[b, k] <= q_pos[b, q])
        return same

    return mask_mod


BLOCK = 128
"""FlexAttention's block size: the block masks are built for it."""

KERNEL_OPTIONS: dict = {}
"""FlexAttention `kernel_options` for every flex call on 16-bit inputs (tiles, warps, stages:
`fwd_BLOCK_M`, `bwd_num_warps`, ...), overriding `kernel_options_for`. Read when a block is compiled."""

SM90_BACKWARD_D64 = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                     "bwd_num_warps": 4}  # fmt: skip
"""Backward tiles for heads of 64 on sm90 (H100/H200), where inductor's default is (64, 128, 128,
64) with 8 warps: 15% less backward time on flan-t5-base's long-source steps (docs/benchmarks.md)."""


def kernel_options_for(device: torch.device, head_dim: int) -> dict | None:
    """FlexAttention kernel options for a device and head size: KERNEL_OPTIONS when set, else the
    measured SM90_BACKWARD_D64 where it applies, else None (inductor's defaults)."""
    if KERNEL_OPTIONS:
        return dict(KERNEL_OPTIONS)
    if device.type == "cuda" and head_dim == 64 and torch.cuda.get_device_capability(device) == (9, 0):
        return dict(SM90_BACKWARD_D64)
    return None


def block_mask_tensors(pattern: Pattern, block: int = BLOCK, q_side: str = "direct") -> tuple[Tensor, ...]:
    """The eight index tensors of the pattern's BlockMask (kv side, then q side, each partial then
    full), from the pair ids without evaluating the mask at every (q, k).

    Pairs sit in a row one after another with ids 0, 1, 2, ... (padding last; a decoder row's
    `dec_src` repeats each id for its segments, in the same order), so a block of 128
    tokens holds every id between its smallest and largest: two blocks share a pair exactly when
    their id ranges overlap, and a block pair is full when both hold one and the same pair (and,
    for the causal decoder, the key block lies before the query block). Blocks of padding alone
    are left out. `create_block_mask` gives
    the same blocks by evaluating mask_mod on all Lq x Lk scores. flantune.packing calls this on the
    CPU while it packs (in the data loader), so a training step only copies the small results.

    q_side: "direct" orders the transposed block masks as the kv side is ordered; "torch" derives
    them with `BlockMask.from_kv_blocks` (the same tensors, about 3 ms more per mask on the CPU
    through its vmap'd dense round trip; the reference in tests and bench/pack_cpu.py).
    """
    from torch.nn.attention.flex_attention import BlockMask

    if q_side not in ("direct", "torch"):
        raise ValueError(f"block_mask_tensors: q_side must be 'direct' or 'torch', not {q_side!r}")
    big = torch.iinfo(torch.int32).max

    def ranges(pair: Tensor) -> tuple[Tensor, Tensor]:
        ids = torch.where(pair == PAD_PAIR, big, pair)  # (B, L) nondecreasing: padding sorts last
        tail = -ids.shape[1] % block
        ids = F.pad(ids, (0, tail), value=big).view(ids.shape[0], -1, block)  # (B, nblocks, block)
        return ids.amin(-1), ids.amax(-1)  # (B, nblocks) each

    q_lo, q_hi = ranges(pattern.q_pair)
    k_lo, k_hi = ranges(pattern.k_pair)
    overlap = (q_lo[:, :, None] <= k_hi[:, None, :]) & (k_lo[:, None, :] <= q_hi[:, :, None])  # (B, nq, nk)
    full = (q_lo == q_hi)[:, :, None] & (k_lo == k_hi)[:, None, :] & (q_lo[:, :, None] == k_lo[:, None, :])
    if pattern.causal:
        q_block = torch.arange(q_lo.shape[1], device=q_lo.device)[:, None]
        k_block = torch.arange(k_lo.shape[1], device=k_lo.device)[None, :]
        overlap = overlap & (k_block <= q_block)
        full = full & (k_block < q_block)
    # Blocks of padding alone are skipped on both sides: a fixed-shape batch can hold whole rows of
    # padding, whose padding-to-padding scores would otherwise cost as much as real attention. Their
    # query rows come out as zeros (FlexAttention's fully masked rows, also in the backward), which
    # reach no real token and no loss.
    real = (q_lo != big)[:, :, None] & (k_lo != big)[:, None, :]
    overlap, full = overlap & real, full & real
    partial = overlap & ~full

    def indices(mask: Tensor) -> tuple[Tensor, Tensor]:
        count = mask.sum(-1, dtype=torch.int32).contiguous()[:, None]  # (B, 1, nq)
        # The blocks to visit first, in key order (a stable sort of "not visited"); argsort keeps a
        # transposed input's strides, and the kernels want row-major indices.
        order = torch.argsort((~mask).to(torch.int32), dim=-1, stable=True)
        order = order.to(torch.int32, memory_format=torch.contiguous_format)[:, None]
        return count, order  # (B, 1, nq, nk)

    count, order = indices(partial)
    full_count, full_order = indices(full)
    if q_side == "torch":
        mask = BlockMask.from_kv_blocks(count, order, full_count, full_order, BLOCK_SIZE=block)
        return (
            mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices,
            mask.q_num_blocks, mask.q_indices, mask.full_q_num_blocks, mask.full_q_indices,
        )  # fmt: skip
    # The q side (the backward's): for every key block, the query blocks that visit it.
    q_count, q_order = indices(partial.transpose(1, 2))  # (B, 1, nk), (B, 1, nk, nq)
    full_q_count, full_q_order = indices(full.transpose(1, 2))
    return count, order, full_count, full_order, q_count, q_order, full_q_count, full_q_order


def tensors_block_size(pattern: Pattern, tensors: tuple[Tensor, ...]) -> int:
    """The block size that `block_mask_tensors` used for `tensors`, from their block counts.

    ceil(L / b) = n with n >= 2 holds for one power of two b at most, so a side of two or more
    blocks decides; where both sides are one block, every b that covers them gives the same mask
    and BLOCK is taken (FlexAttention's default tiles divide it).
    """
    q_blocks = tensors[0].shape[-1]  # kv_num_blocks: (B, 1, q blocks)
    k_blocks = tensors[1].shape[-1]  # kv_indices: (B, 1, q blocks, kv blocks)
    q_len, k_len = pattern.q_pair.shape[1], pattern.k_pair.shape[1]
    fits = [b for b in (BLOCK, *(2**i for i in range(4, 11)))
            if -(-q_len // b) == q_blocks and -(-k_len // b) == k_blocks]  # fmt: skip
    if not fits:
        raise ValueError(f"block-mask tensors of {q_blocks} x {k_blocks} blocks fit no block size for "
                         f"{q_len} x {k_len} positions")  # fmt: skip
    return fits[0]


def build_block_mask(pattern: Pattern, block: int | None = None, tensors: tuple[Tensor, ...] | None = None):
    """The pattern's FlexAttention BlockMask, from `tensors` (block_mask_tensors made while
    packing, on the pattern's device; their block size follows from their shape) or computed here
    (at `block`, default BLOCK)."""
    from torch.nn.attention.flex_attention import BlockMask

    if tensors is None:
        block = block or BLOCK
        tensors = block_mask_tensors(pattern, block)
    else:
        block = tensors_block_size(pattern, tensors)
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
             "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip
    return BlockMask(
        seq_lengths=(pattern.q_pair.shape[1], pattern.k_pair.shape[1]),
        **dict(zip(names, tensors, strict=True)),
        BLOCK_SIZE=(block, block),
        mask_mod=mask_mod_of(pattern),
    )


def attend(module, hidden: Tensor, context: Tensor, pattern: Pattern, attention: str) -> Tensor:
    """One T5Attention (self when context is hidden, else cross) on its own q/k/v/o modules."""
    batch, q_len, _ = hidden.shape
    heads, head_dim = module.n_heads, module.key_value_proj_dim
    q = module.q(hidden).view(batch, q_len, heads, head_dim).transpose(1, 2)  # (B, H, Lq, D)
    k = module.k(context).view(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, Lk, D)
    v = module.v(context).view(batch, -1, heads, head_dim).transpose(1, 2)
    if attention == "flex":
        out = _flex(q, k, v, pattern)
    elif attention == "sdpa":
        # The bias as an additive mask in q's dtype: SDPA's memory-efficient kernel takes it (a
        # float32 mask beside 16-bit q sends SDPA to its float32 math path, which is what
        # transformers' T5 gets). No compilation: the inference encoder's uncompiled path.
        dropout = module.dropout if module.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pattern.additive_mask(q.dtype),
                                             dropout_p=dropout, scale=1.0)  # fmt: skip
    else:
        # T5 does not scale q·k: the 1/sqrt(d) is folded into its initialisation.
        scores = torch.matmul(q, k.transpose(2, 3))  # (B, H, Lq, Lk)
        if pattern.bias is not None:
            scores = scores + pattern.dense_bias()  # float32 bias, as transformers adds it
        scores = scores.masked_fill(~pattern.allowed(), torch.finfo(scores.dtype).min)
        probs = F.softmax(scores.float(), dim=-1).type_as(scores)
        probs = F.dropout(probs, p=module.dropout, training=module.training)
        out = torch.matmul(probs, v)
    out = out.transpose(1, 2).reshape(batch, q_len, heads * head_dim)  # (B, Lq, H*D)
    return module.o(out)


def _flex(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    q_pos, k_pos, bias = pattern.q_pos, pattern.k_pos, pattern.bias
    score_mod = None
    if bias is not None:
        reach = bias.shape[1] // 2

        # bias[h, k_pos - q_pos] with the positions gathered per score. (Where the mask allows,
        # k_pos - q_pos equals k_idx - q_idx, but that form measured 2.9x slower in the forward
        # kernel: bench/flex_variants.py, docs/benchmarks.md.)
        def score_mod(score, b, h, q_idx, k_idx):
            distance = (k_pos[b, k_idx] - q_pos[b, q_idx]).clamp(-reach, reach)
            return score + bias[h, distance + reach].to(score.dtype)

    # FlexAttention wants one dtype for q, k, v (LoRA under autocast may hand back mixed ones).
    dtype = q.dtype if q.dtype == k.dtype == v.dtype else torch.get_autocast_dtype("cuda")
    # q, k, v stay (B, L, H, D) in memory, seen as (B, H, L, D): FlexAttention lays out its output
    # and the gradients in the same order, so the transposes back to (B, L, H*D) copy nothing
    # (contiguous copies here measured 2.5 ms of a 54 ms flan-t5-base step on long sources).
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    return flex_attention(
        q, k, v, score_mod=score_mod, block_mask=pattern.block_mask, scale=1.0,
        # The tuned tiles are for 16-bit inputs; float32 (tests, CPU-sized runs) keeps inductor's.
        kernel_options=pattern.kernel_options if dtype in (torch.bfloat16, torch.float16) else None,
    )  # fmt: skip


def t5_block(
    block, hidden: Tensor, self_pattern: Pattern, attention: str, encoder=None, cross=None
) -> Tensor:
    """One T5Block (mirrors T5Block / T5LayerSelfAttention / T5LayerCrossAttention / T5LayerFF).

    The unit worth `torch.compile`: every block of a stack has the same structure, so one compiled
    graph serves them all (parameters are graph inputs), and compiling takes seconds, not minutes.
    """
    layer = block.layer[0]
    x = layer.layer_norm(hidden)
    hidden = hidden + layer.dropout(attend(layer.SelfAttention, x, x, self_pattern, attention))
    if encoder is not None:
        layer = block.layer[1]
        x = layer.layer_norm(hidden)
        hidden = hidden + layer.dropout(attend(layer.EncDecAttention, x, encoder, cross, attention))
    layer = block.layer[-1]
    return hidden + layer.dropout(layer.DenseReluDense(layer.layer_norm(hidden)))


def _trains(stack) -> bool:
    """Whether any of the stack's block parameters is trained."""
    return any(p.requires_grad for p in stack.block.parameters())


def _stack(
    stack, hidden: Tensor, self_pattern: Pattern, attention: str, encoder=None, cross=None, block_fn=None
):
    """A T5Stack (encoder or decoder) on embeddings: dropout, blocks, final norm, dropout."""
    compiled, block_fn = block_fn is not None, block_fn or t5_block
    checkpointing = getattr(stack, "gradient_checkpointing", False) and stack.training
    hidden = stack.dropout(hidden)
    if compiled and torch.is_grad_enabled() and not hidden.requires_grad and _trains(stack):
        # Frozen embeddings (LoRA and the other adapters): block 0's input needs no gradient, every
        # later block's does, and torch.compile guards on that, so each stack would compile its
        # block twice (4 graphs, not 2: flan-t5-base LoRA compiled 48.5 s instead of 25.6 s on an
        # H200, docs/benchmarks.md). A leaf that asks for a gradient gives block 0 the later
        # blocks' graph; the price is block 0's input gradient (its q, k, v projections' backward,
        # ~1/3 of one block's), then dropped.
        hidden = hidden.detach().requires_grad_()
    for block in stack.block:
        if checkpointing:
            from torch.utils.checkpoint import checkpoint

            hidden = checkpoint(
                block_fn, block, hidden, self_pattern, attention, encoder, cross, use_reentrant=False
            )
        else:
            hidden = block_fn(block, hidden, self_pattern, attention, encoder, cross)
    return stack.dropout(stack.final_layer_norm(hidden))


def t5_model(model):
    """The T5ForConditionalGeneration under PEFT/Accelerate wrappers (its submodules stay wrapped)."""
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model


def patterns(model, batch: dict, attention: str, freeze_bias: bool) -> tuple[Pattern, Pattern, Pattern]:
    """Encoder self, decoder self and cross-attention patterns of a packed batch, built once per
    step and shared by every layer (T5 computes its bias in block 0 and reuses it)."""
    enc_pair, enc_pos = batch["enc_pair"], batch["enc_pos"]  # (B, Le)
    dec_pair, dec_pos = batch["dec_pair"], batch["dec_pos"]  # (B, Ld)
    # dec_src: the encoder pair a decoder token cross-attends to, where several decoder segments
    # share one source (RL's G completions of a prompt: `packing.pack_groups`); default its own pair.
    dec_src = batch.get("dec_src", dec_pair)  # (B, Ld)
    frozen = freeze_bias or attention == "flex"
    enc_attn = model.encoder.block[0].layer[0].SelfAttention
    dec_attn = model.decoder.block[0].layer[0].SelfAttention
    enc = Pattern(enc_pair, enc_pair, enc_pos, enc_pos, causal=False,
                  bias=distance_table(enc_attn, True, frozen))  # fmt: skip
    dec = Pattern(dec_pair, dec_pair, dec_pos, dec_pos, causal=True,
                  bias=distance_table(dec_attn, False, frozen))  # fmt: skip
    cross = Pattern(dec_src, enc_pair, dec_pos, enc_pos, causal=False)
    if attention == "flex":
        options = kernel_options_for(enc_pair.device, enc_attn.key_value_proj_dim)
        for name, pattern in (("enc", enc), ("dec", dec), ("cross", cross)):
            pattern.block_mask = build_block_mask(pattern, tensors=batch.get(f"{name}_blocks"))
            pattern.kernel_options = options
    return enc, dec, cross


def decoder_hidden(
    model, batch: dict, attention: str = "eager", freeze_bias: bool = False, block_fn=None
) -> Tensor:
    """(B, Ld, d_model): the decoder's output of a packed batch, scaled as the model scales it
    before lm_head. `block_fn`: an optional compiled `t5_block`."""
    model = t5_model(model)
    enc, dec, cross = patterns(model, batch, attention, freeze_bias)
    encoded = _stack(
        model.encoder, model.encoder.embed_tokens(batch["input_ids"]), enc, attention, block_fn=block_fn
    )
    embedded = model.decoder.embed_tokens(batch["decoder_input_ids"])
    hidden = _stack(model.decoder, embedded, dec, attention, encoded, cross, block_fn)
    # transformers 5.23 names the rescale of a tied head `scale_decoder_outputs`; 5.17 keyed it on
    # tie_word_embeddings. FLAN-T5 (untied) does not rescale under either.
    scale = getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings)
    return hidden * model.model_dim**-0.5 if scale else hidden


def packed_encoder_output(model, sources, attention: str = "flex", block_fn=None) -> Tensor:
    """(B, S, d_model): T5's encoder over padded sources (`sources`, a flantune.packing.PackedSources),
    run on their packed layout: no work on
    padding, each source's relative bias and attention restarted at its pair (what the encoder gives
    each source alone). For inference (the decoding engine): the bias table is read, not trained."""
    t5 = t5_model(model)
    attn = t5.encoder.block[0].layer[0].SelfAttention
    pattern = Pattern(sources.pair, sources.pair, sources.pos, sources.pos, causal=False,
                      bias=distance_table(attn, True, True))  # fmt: skip
    if attention == "flex":
        pattern.block_mask = build_block_mask(pattern, tensors=sources.blocks)
        pattern.kernel_options = kernel_options_for(sources.ids.device, attn.key_value_proj_dim)
    hidden = _stack(t5.encoder, t5.encoder.embed_tokens(sources.ids), pattern, attention, block_fn=block_fn)
    return sources.unpack(hidden)


def packed_logits(model, batch: dict, attention: str = "eager") -> Tensor:
    """(B, Ld, V) logits of a packed batch (tests and evaluation of the packed path)."""
    return t5_model(model).lm_head(decoder_hidden(model, batch, attention))


def packed_loss_sum(
    model, batch: dict, attention: str = "eager", freeze_bias: bool = False, block_fn=None,
    select_targets: bool = True,
) -> Tensor:  # fmt: skip
    """Sum of the cross-entropy over the target tokens of a packed batch (labels -100 are padding).

    `block_fn`: an optional compiled `t5_block`. The vocabulary projection
    runs through `chunked_cross_entropy`: no (tokens, V) float32 logits are kept. select_targets:
    project only the target positions (least work; a boolean index, so the host waits for the GPU
    and the shape varies); False projects every decoder position and masks the padding, so the
    step has fixed shapes and no host sync (what CUDA-graph capture needs).
    """
    hidden = decoder_hidden(model, batch, attention, freeze_bias, block_fn)  # (B, Ld, d)
    labels = batch["labels"].flatten()  # (B*Ld,)
    hidden = hidden.flatten(0, 1)  # (B*Ld, d)
    if select_targets:
        keep = labels != -100
        hidden, labels = hidden[keep], labels[keep]  # (N, d), (N,) target tokens only
    head = t5_model(model).lm_head
    if type(head) is torch.nn.Linear and head.bias is None:
        return chunked_cross_entropy(hidden, head.weight, labels)
    # A wrapped head (LoRA on lm_head, modules_to_save): plain projection.
    return F.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")


# ----------------------------------------------------------------------------------------------
# Cross-entropy over the vocabulary in chunks of tokens


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, label_i), computed CHUNK tokens at a time (label -100: none).

    Logits exist one chunk at a time, in the compute dtype (bf16 under autocast); the log-sum-exp
    is taken in float32. The backward recomputes each chunk's logits instead of keeping them:
    at 32k vocab the kept fp32 logits of 5k target tokens would be 640 MB.
    """

    CHUNK = 4096

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, dtype: torch.dtype) -> Tensor:
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.shape[0], _ChunkedCrossEntropy.CHUNK):
            h = hidden[start : start + _ChunkedCrossEntropy.CHUNK].to(dtype)
            logits = (h @ weight.to(dtype).t()).float()  # (chunk, V)
            y = labels[start : start + _ChunkedCrossEntropy.CHUNK]
            valid = y != -100  # padding positions add nothing
            picked = logits.gather(1, y.clamp(min=0)[:, None]).squeeze(1)
            total += ((torch.logsumexp(logits, dim=-1) - picked) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels)
        ctx.dtype = dtype
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, weight, labels = ctx.saved_tensors
        dtype = ctx.dtype
        w = weight.to(dtype)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], _ChunkedCrossEntropy.CHUNK):
            h = hidden[start : start + _ChunkedCrossEntropy.CHUNK].to(dtype)
            logits = (h @ w.t()).float()  # (chunk, V)
            y = labels[start : start + _ChunkedCrossEntropy.CHUNK]
            valid = (y != -100)[:, None]  # (chunk, 1)
            d_logits = torch.softmax(logits, dim=-1)
            d_logits.scatter_add_(1, y.clamp(min=0)[:, None], -torch.ones_like(logits[:, :1]))
            d_logits = (d_logits * valid * grad).to(dtype)  # (chunk, V)
            if d_hidden is not None:
                d_hidden[start : start + _ChunkedCrossEntropy.CHUNK] = (d_logits @ w).to(hidden.dtype)
            if d_weight is not None:
                d_weight += (d_logits.t() @ h).float()
        return d_hidden, None if d_weight is None else d_weight.to(weight.dtype), None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """Summed cross-entropy of `hidden` (N, d) projected by `weight` (V, d) against `labels` (N,);
    labels of -100 add nothing (as F.cross_entropy's ignore_index)."""
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, dtype)


def freeze_relative_bias(model) -> int:
    """Freeze the relative attention bias tables (flex path); returns how many numbers were frozen."""
    frozen = 0
    for name, p in t5_model(model).named_parameters():
        if "relative_attention_bias" in name and p.requires_grad:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen
