"""T5's two attentions of a decode step (one new query per row) as Triton kernels, for CUDA.

Why our own. Measured on an H200 (docs/benchmarks.md, 2026-12-04, twelfth sitting), torch's SDPA
sends the decode step's attentions to cuDNN's flash kernels, whose query tiles are 16-64 rows for one
query: in flan-t5-large's 128-row greedy step the self-attention over 64 cache positions took 29 us a
layer and the cross-attention over 128 x 512 padded source positions 73 us, 2.5 of the step's 4.6
GPU milliseconds of kernels; in float32 (flantune eval) SDPA's memory-efficient kernel took 1.03 of
2.44 GPU seconds. A decode attention reads each row's keys and values once: these kernels do that and no more.

- `self_attention`: one program per (row, head) writes the new key and value into the static cache
  at the row's position (where the step ran an index_copy_ each) and attends over the positions up
  to it (the future positions of the cache are not read), with T5's relative bias row added.
- `cross_attention`: one program per (source, head) attends a source's `copies` queries (its
  samples or beams) over its keys and values; blocks of positions the source's mask holds no
  token in (its padding) are skipped, not read.

Scores, softmax and sums in float32, as SDPA's kernels keep them; no scaling beyond `scale` (T5's
is 1). No library offers this step: FlexAttention's decoding kernel does split-K decoding with a
score_mod and a block mask, but only through torch.compile, whose guards compile again for every
shape bucket the engine captures (and fall back to its unfused reference past dynamo's recompile
limit); transformers and vLLM have no T5 decode kernels. tests/test_decode_attention.py compares
both with SDPA in float32 (within 1e-5) through Triton's interpreter on the CPU, and on the GPU
(`cuda`) holds each as close to the float64 result as SDPA in float32 and bf16. Measured: 1.22x-1.43x
the tokens/s of the same step over SDPA for flan-t5-large (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import os
import warnings

import torch


def _mode(value: str) -> str:
    """FLANTUNE_DECODE_ATTENTION's value as a mode: "auto" (or 1) the kernels on CUDA where Triton
    imports; "sdpa" (or 0) torch's SDPA everywhere (the A/B side of bench/generate_speed.py). Any
    other value is named in a warning and taken as "auto"."""
    if value in ("auto", "1"):
        return "auto"
    if value in ("sdpa", "0"):
        return "sdpa"
    warnings.warn(f"FLANTUNE_DECODE_ATTENTION={value!r}: expected auto or sdpa (1 or 0); decoding takes auto "
                  "(the kernels on CUDA where Triton imports)", stacklevel=2)  # fmt: skip
    return "auto"


DECODE_ATTENTION = _mode(os.environ.get("FLANTUNE_DECODE_ATTENTION", "auto"))
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _kernels():
    """The jitted kernels (Triton imported at first use), or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def self_kernel(Q, KN, VN, K, V, POS, SLOTS, BIAS, OUT,
                    sq_n, sq_h, skn_n, skn_h, svn_n, svn_h, sk_n, sk_h, sk_t, sv_n, sv_h, sv_t,
                    s_pos, sb_n, sb_h, sb_t, so_n, so_h,
                    SCALE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
                    HAS_SLOTS: tl.constexpr):  # fmt: skip
        n = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        p = tl.load(POS + n * s_pos)  # this row's position: the cache slot written now
        row = tl.load(SLOTS + n) if HAS_SLOTS else n  # the cache row of this row
        q = tl.load(Q + n * sq_n + h * sq_h + d, mask=dmask, other=0.0).to(tl.float32)
        key = tl.load(KN + n * skn_n + h * skn_h + d, mask=dmask, other=0.0)
        value = tl.load(VN + n * svn_n + h * svn_h + d, mask=dmask, other=0.0)
        bias = BIAS + n * sb_n + h * sb_h  # (T,) this row's bias over the key positions
        # The new position's score first: it starts the running maximum (softmax over the cache
        # positions 0..p, the new one included, in blocks).
        new = tl.sum(q * key.to(tl.float32), axis=0) * SCALE + tl.load(bias + p * sb_t).to(tl.float32)
        top = new
        total = new * 0.0 + 1.0
        acc = value.to(tl.float32)
        keys = K + row * sk_n + h * sk_h
        values = V + row * sv_n + h * sv_h
        for start in range(0, p, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            tmask = t < p
            both = tmask[:, None] & dmask[None, :]
            # Every load of the block first, so that they are in flight together.
            k = tl.load(keys + t[:, None] * sk_t + d[None, :], mask=both, other=0.0).to(tl.float32)  # (BLOCK_T, D)
            v = tl.load(values + t[:, None] * sv_t + d[None, :], mask=both, other=0.0).to(tl.float32)
            b = tl.load(bias + t * sb_t, mask=tmask, other=0.0).to(tl.float32)
            s = tl.where(tmask, tl.sum(k * q[None, :], axis=1) * SCALE + b, float("-inf"))
            high = tl.maximum(top, tl.max(s, axis=0))
            alpha = tl.exp(top - high)
            weights = tl.exp(s - high)  # (BLOCK_T,), 0 past p
            total = total * alpha + tl.sum(weights, axis=0)
            acc = acc * alpha + tl.sum(weights[:, None] * v, axis=0)
            top = high
        tl.store(OUT + n * so_n + h * so_h + d, (acc / total).to(OUT.dtype.element_ty), mask=dmask)
        # The slot is written after the loop, which reads only the slots before it.
        tl.store(keys + p * sk_t + d, key.to(K.dtype.element_ty), mask=dmask)
        tl.store(values + p * sv_t + d, value.to(V.dtype.element_ty), mask=dmask)

    @triton.jit
    def cross_kernel(Q, K, V, MASK, OUT, S,
                     sq_g, sq_c, sq_h, sk_g, sk_h, sk_s, sv_g, sv_h, sv_s, sm_g, so_g, so_c, so_h,
                     SCALE: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr, EXACT: tl.constexpr):  # fmt: skip
        g = tl.program_id(0)
        h = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        d = tl.arange(0, BLOCK_D)
        cmask = c < C
        dmask = d < D
        qmask = cmask[:, None] & dmask[None, :]
        mask_row = MASK + g * sm_g
        # The source's last token + 1 (from its mask row: a few KB, shared by its H programs in L2):
        # the positions after it, its padding, are not read.
        end = tl.full((), 0, tl.int32)
        for start in range(0, S, BLOCK_M):
            m_idx = start + tl.arange(0, BLOCK_M)
            held = tl.load(mask_row + m_idx, mask=m_idx < S, other=0) != 0
            end = tl.maximum(end, tl.max(tl.where(held, m_idx + 1, 0), axis=0))
        q = tl.load(Q + g * sq_g + h * sq_h + c[:, None] * sq_c + d[None, :], mask=qmask, other=0.0)  # (BLOCK_C, D)
        top = tl.full((BLOCK_C,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
        keys = K + g * sk_g + h * sk_h
        values = V + g * sv_g + h * sv_h
        for start in range(0, end, BLOCK_S):
            s_idx = start + tl.arange(0, BLOCK_S)
            inside = s_idx < end
            both = inside[:, None] & dmask[None, :]
            k = tl.load(keys + s_idx[:, None] * sk_s + d[None, :], mask=both, other=0.0)  # (BLOCK_S, D)
            v = tl.load(values + s_idx[:, None] * sv_s + d[None, :], mask=both, other=0.0)
            valid = tl.load(mask_row + s_idx, mask=inside, other=0) != 0  # (BLOCK_S,): holes in the mask too
            if EXACT:  # noqa: SIM108  (float32: the products as float32 products, no TF32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # (BLOCK_C, BLOCK_S), float32 accumulation
            s = tl.where(valid[None, :], s * SCALE, float("-inf"))
            high = tl.maximum(top, tl.max(s, axis=1))
            alpha = tl.exp(top - high)
            weights = tl.exp(s - high[:, None])
            total = total * alpha + tl.sum(weights, axis=1)
            if EXACT:
                acc = acc * alpha[:, None] + tl.dot(weights, v, input_precision="ieee")
            else:  # the weights in the keys' dtype for the product, as flash kernels round them
                acc = acc * alpha[:, None] + tl.dot(weights.to(v.dtype), v)
            top = high
        total = tl.where(total > 0, total, 1.0)  # a source without any token: zeros, not NaN
        out = acc / total[:, None]
        tl.store(OUT + g * so_g + h * so_h + c[:, None] * so_c + d[None, :], out.to(OUT.dtype.element_ty), mask=qmask)

    return triton, self_kernel, cross_kernel


def ready(tensor: torch.Tensor, head_dim: int) -> bool:
    """Whether a step whose caches are `tensor`'s (device, dtype) runs these kernels: not while
    torch.compile traces the step (the engine's compiled step: inductor makes its own kernels of
    SDPA's graph), and on the CPU only through Triton's interpreter (the tests)."""
    if torch.compiler.is_compiling():  # first: a constant while dynamo traces, nothing else is read
        return False
    return (DECODE_ATTENTION != "sdpa" and (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and tensor.dtype in _DTYPES and head_dim <= 256 and _kernels() is not None)  # fmt: skip


def _out_dtype(query: torch.Tensor) -> torch.dtype:
    """SDPA's output dtype: autocast's where it is on (it casts the inputs), else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


def self_attention(query, key, value, keys, values, position, bias, scale: float, slots=None) -> torch.Tensor:
    """query, key, value (N, H, D) (views, last dimension contiguous): this step's; keys, values
    (R, H, T, D) the static cache, this step's key and value written at each row's position;
    position (1,) or (N,) int64: the slot written (and the last one attended); bias (1 or N, H, 1,
    T): the relative bias of that position over the cache's, future positions masked in it (never
    read here); slots (N,) or None: each row's cache row (None: row n is cache row n).
    Returns (N, H, D): softmax(q k^T * scale + bias) v over positions 0..position."""
    triton, self_kernel, _ = _kernels()
    # The kernels step through the last dimension with stride 1: inputs that are not are copied; the
    # caches, written in place, are the engine's contiguous buffers.
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode_attention.self_attention: the caches must be contiguous in their last dimension")
    rows, heads, head_dim = query.shape
    out = torch.empty(rows, heads, head_dim, dtype=_out_dtype(query), device=query.device)
    position = position.reshape(-1)
    self_kernel[(rows, heads)](
        query, key, value, keys, values, position, slots if slots is not None else position, bias, out,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        position.stride(0) if position.numel() > 1 else 0, bias.stride(0) if bias.shape[0] > 1 else 0,
        bias.stride(1), bias.stride(3), out.stride(0), out.stride(1),
        SCALE=float(scale), D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_T=64,
        HAS_SLOTS=slots is not None,
    )  # fmt: skip
    return out


def cross_attention(query, keys, values, mask, scale: float) -> torch.Tensor:
    """query (G, C, H, D): the C = copies rows of each of G sources; keys, values (G, H, S, D); mask
    (G, S) (strided: a source's row of the encoder mask), nonzero where a source position holds a
    token. Returns (G, C, H, D): each row's attention over its source's tokens."""
    triton, _, cross_kernel = _kernels()
    query, keys, values, mask = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys, values, mask))
    sources, copies, heads, head_dim = query.shape
    length = keys.shape[2]
    out = torch.empty(sources, copies, heads, head_dim, dtype=_out_dtype(query), device=query.device)
    exact = torch.float32 in (query.dtype, keys.dtype) and not torch.is_autocast_enabled(query.device.type)
    if query.dtype != keys.dtype:  # autocast: the products in the keys' dtype, as SDPA casts them
        query = query.to(keys.dtype)
    cross_kernel[(sources, heads)](
        query, keys, values, mask, out, length,
        query.stride(0), query.stride(1), query.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), mask.stride(0), out.stride(0), out.stride(1), out.stride(2),
        SCALE=float(scale), C=copies, BLOCK_C=max(16, triton.next_power_of_2(copies)), D=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_S=64, BLOCK_M=1024, EXACT=exact,
    )  # fmt: skip
    return out
