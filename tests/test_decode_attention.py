"""flantune.decode_attention's kernels (T5's self- and cross-attention of a decode step) against torch's
SDPA on the same tensors, and the engine's T5 step through them against a float64 reference.

On the CPU they run through Triton's interpreter (TRITON_INTERPRET=1; skipped where Triton is not
installed); the `cuda` tests run them compiled, in float32 and bf16, and the engine's greedy tokens
through them against transformers' `generate`."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from flantune import decode_attention, engine

from .test_t5_decode import SOURCES, tiny_t5

INTERPRETED = 7  # the tests below that take the `interpreted` fixture


@pytest.fixture
def interpreted():
    """The kernels through Triton's interpreter on the CPU: only in the child process of
    `test_the_kernels_through_tritons_interpreter`, which sets TRITON_INTERPRET=1 before anything
    imports Triton (its library functions are jitted at import, interpreted or not by the
    environment then; in this process the GPU's compiled kernels must stay compiled)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs in the interpreter's child process (test_the_kernels_through_tritons_interpreter)")


def test_the_kernels_through_tritons_interpreter():
    """The `interpreted` tests of this file, in a child process with TRITON_INTERPRET=1: every one
    must run and pass."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this is the child")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
                           "-p", "no:warnings", __file__, "-k", "interpreted_", "-m", "not cuda"],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert f"{INTERPRETED} passed" in done.stdout, done.stdout[-2000:]


def test_the_setting_takes_auto_or_sdpa_and_names_any_other_value():
    assert decode_attention._mode("auto") == decode_attention._mode("1") == "auto"
    assert decode_attention._mode("sdpa") == decode_attention._mode("0") == "sdpa"
    with pytest.warns(UserWarning, match=r"FLANTUNE_DECODE_ATTENTION='off': expected auto or sdpa"):
        assert decode_attention._mode("off") == "auto"


def reference_self(query, key, value, keys, values, position, bias):
    """SDPA over the cache with the new key/value written at `position` (one position for all rows)."""
    keys, values = keys.clone(), values.clone()
    keys[:, :, position] = key
    values[:, :, position] = value
    out = F.scaled_dot_product_attention(query[:, :, None], keys, values, attn_mask=bias, scale=1.0)
    return out[:, :, 0], keys, values


def self_case(dtype, device, rows=3, heads=2, length=80, dim=16, position=70):
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, heads, dim, dtype=dtype, device=device) for _ in range(3))
    keys, values = (torch.randn(rows, heads, length, dim, dtype=dtype, device=device) for _ in range(2))
    table = torch.randn(heads, length, length, dtype=dtype, device=device)
    causal = torch.arange(length, device=device) <= position
    bias = table[:, position][None, :, None, :].masked_fill(~causal, torch.finfo(dtype).min)  # (1, H, 1, T)
    return q, k, v, keys, values, bias


def cross_case(dtype, device, sources=3, copies=4, heads=2, length=150, dim=16):
    """Queries (G, C, H, D), keys and values (G, H, S, D), a mask (G, S): source 0 full, source 1
    with a hole and its last 100 positions padding (whole blocks skipped), source 2 of one token."""
    torch.manual_seed(1)
    query = torch.randn(sources, copies, heads, dim, dtype=dtype, device=device)
    keys, values = (torch.randn(sources, heads, length, dim, dtype=dtype, device=device) for _ in range(2))
    mask = torch.ones(sources, length, dtype=torch.long, device=device)
    mask[1, 50:] = 0
    mask[1, 7] = 0
    mask[2, 1:] = 0
    return query, keys, values, mask


def reference_cross(query, keys, values, mask):
    additive = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device)
    additive = additive.masked_fill(mask == 0, torch.finfo(query.dtype).min)[:, None, None, :]  # (G, 1, 1, S)
    return F.scaled_dot_product_attention(query.transpose(1, 2), keys, values, attn_mask=additive,
                                          scale=1.0).transpose(1, 2)  # fmt: skip


def test_interpreted_self_attention_equals_sdpa_and_writes_the_slot(interpreted):
    """The output equals SDPA's over positions 0..p (float32), the new key and value are in slot p,
    and nothing past p is read: garbage (NaN) there changes nothing."""
    q, k, v, keys, values, bias = self_case(torch.float32, "cpu")
    ref, ref_keys, ref_values = reference_self(q, k, v, keys, values, 70, bias)
    keys[:, :, 71:] = float("nan")
    values[:, :, 71:] = float("nan")
    out = decode_attention.self_attention(q, k, v, keys, values, torch.tensor([70]), bias, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys[:, :, :71], ref_keys[:, :, :71], atol=0, rtol=0)
    torch.testing.assert_close(values[:, :, :71], ref_values[:, :, :71], atol=0, rtol=0)


def test_interpreted_self_attention_per_row_positions_and_slots(interpreted):
    """Continuous batching: each row at its own position, in its own cache row (`slots`), with its
    own bias row; each equals SDPA on that row alone."""
    q, k, v, keys, values, _ = self_case(torch.float32, "cpu", rows=3, length=40, position=20)
    table = torch.randn(2, 40, 40)
    positions = torch.tensor([0, 17, 39])
    slots = torch.tensor([2, 0, 1])  # row r's cache row
    causal = torch.arange(40)[None, :] <= positions[:, None]  # (N, T)
    bias = table[:, positions].transpose(0, 1)[:, :, None, :]  # (N, H, 1, T)
    bias = bias.masked_fill(~causal[:, None, None, :], torch.finfo(torch.float32).min)
    before_keys, before_values = keys.clone(), values.clone()
    out = decode_attention.self_attention(q, k, v, keys, values, positions, bias, 1.0, slots=slots)
    for r in range(3):
        s, p = int(slots[r]), int(positions[r])
        ref, ref_keys, _ = reference_self(q[r : r + 1], k[r : r + 1], v[r : r + 1], before_keys[s : s + 1],
                                          before_values[s : s + 1], p, bias[r : r + 1])  # fmt: skip
        torch.testing.assert_close(out[r : r + 1], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[s, :, p], k[r], atol=0, rtol=0)
        torch.testing.assert_close(keys[s : s + 1], ref_keys, atol=0, rtol=0)


def test_interpreted_cross_attention_equals_sdpa_over_the_sources_tokens(interpreted):
    """Every copy of a source attends its tokens only (holes in the mask included); padding blocks are
    not read (NaN there changes nothing); a source of one token gives that token's value."""
    query, keys, values, mask = cross_case(torch.float32, "cpu")
    ref = reference_cross(query, keys, values, mask)
    keys[1, :, 64:] = float("nan")  # source 1's padding past its first block: never loaded
    values[1, :, 64:] = float("nan")
    out = decode_attention.cross_attention(query, keys, values, mask, 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2], values[2, :, 0][None].expand(4, -1, -1), atol=1e-6, rtol=1e-6)


def test_interpreted_cross_attention_of_strided_mask_rows(interpreted):
    """The engine hands a source's row of the (N, S) encoder mask, every `copies`-th row: a strided view."""
    query, keys, values, mask = cross_case(torch.float32, "cpu", copies=2)
    rows = mask.repeat_interleave(2, dim=0)  # (N, S), a source's rows adjacent
    out = decode_attention.cross_attention(query, keys, values, rows[::2], 1.0)
    torch.testing.assert_close(out, reference_cross(query, keys, values, mask), atol=1e-5, rtol=1e-5)
    strided = query.transpose(-1, -2).contiguous().transpose(-1, -2)  # the same values, last stride not 1
    assert strided.stride(-1) != 1
    torch.testing.assert_close(decode_attention.cross_attention(strided, keys, values, rows[::2], 1.0), out,
                               atol=0, rtol=0)  # fmt: skip


def test_interpreted_the_step_through_the_kernels_is_as_close_to_float64_as_sdpa(t5_small_path, interpreted):
    """The engine's T5 step with the kernels (interpreted), and with SDPA, against the same step in
    float64: the kernels' logits are as close to it as SDPA's (each float32 step's error is
    rounding, and the kernels add none beyond it), and the kernels are what ran."""
    model = tiny_t5(t5_small_path)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    calls = []
    original = decode_attention.cross_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def logits(model, mode: str, steps: int = 3):
        decode_attention.DECODE_ATTENTION = mode
        try:
            with torch.no_grad():
                hidden = model.get_encoder()(**batch).last_hidden_state
                decoder = engine._Decoder(model, hidden, batch["attention_mask"], 16)
                decoder.tokens.fill_(model.config.decoder_start_token_id)
                decoder.fill_cross()
                out = []
                for _ in range(steps):
                    out.append(decoder.step().double())
                    decoder.tokens.copy_(out[-1].argmax(-1)[:, None])
        finally:
            decode_attention.DECODE_ATTENTION = "auto"
        return torch.stack(out)

    decode_attention.cross_attention = counted
    try:
        ours = logits(model, "auto")
    finally:
        decode_attention.cross_attention = original
    assert len(calls) == 3 * 2  # every step, both layers
    sdpa = logits(model, "sdpa")
    exact = logits(copy_double(model), "sdpa")
    assert torch.equal(ours.argmax(-1), exact.argmax(-1))
    assert (ours - exact).abs().max() <= 2 * (sdpa - exact).abs().max() + 1e-6


def test_interpreted_not_while_torch_compile_traces(interpreted):
    """Under torch.compile (the engine's compiled step) the step takes SDPA, which inductor compiles:
    `ready` is False while dynamo traces, with no graph break, and True outside."""

    def step(x):
        return x + 1 if decode_attention.ready(x, 16) else x - 1

    assert decode_attention.ready(torch.zeros(2), 16)
    assert torch.equal(torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2)), -torch.ones(2))


def test_interpreted_continuous_rows_through_the_kernels(t5_small_path, interpreted):
    """The server's continuous step (each row at its own position, in its own slot) through the
    kernels: float32 rows joining at different steps, of two LoRA adapters and the base gathered in
    one step, get the logits of their own forward within float32 rounding."""
    from flantune import continuous

    from .test_continuous import MIXED, MIXED_JOINS, check_each_row, run_staggered, two_adapters

    model = tiny_t5(t5_small_path)
    tokenizer = AutoTokenizer.from_pretrained(t5_small_path)
    peft_model = two_adapters(model)
    assert decode_attention.ready(torch.zeros(1), 16)
    calls = []
    original = decode_attention.self_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    def close(got, expected):  # float32 step against float32 forward: ~1e-5 of the largest logit apart
        torch.testing.assert_close(got, expected, atol=float(5e-5 * expected.abs().max()), rtol=0)

    decode_attention.self_attention = counted
    try:
        logits_of, ids_of = run_staggered(peft_model, tokenizer, MIXED_JOINS, 5, names=MIXED, gathered=True)
    finally:
        decode_attention.self_attention = original
    assert calls and continuous.supports(peft_model)
    check_each_row(peft_model, tokenizer, MIXED, logits_of, ids_of, close=close)


def copy_double(model):
    import copy

    return copy.deepcopy(model).double()


# ---- CUDA ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_are_as_close_to_float64_as_sdpa(dtype):
    """Compiled, on the GPU, flan-t5-large's head shape (D 64, 16 heads), 128 rows: each kernel's
    output is as close to the float64 result as SDPA's in the same dtype (no TF32 in float32's
    products; bf16 rounding no worse than SDPA's), and the self-attention writes the cache slot."""

    def error(got, exact):
        return float((got.double() - exact).abs().max())

    q, k, v, keys, values, bias = self_case(dtype, "cuda", rows=128, heads=16, length=128, dim=64, position=70)
    exact, _, _ = reference_self(*(t.double() for t in (q, k, v, keys, values)), 70, bias.double())
    ref, ref_keys, _ = reference_self(q, k, v, keys, values, 70, bias)
    out = decode_attention.self_attention(q, k, v, keys, values, torch.tensor([70], device="cuda"), bias, 1.0)
    assert out.dtype == dtype and error(out, exact) <= 2 * error(ref, exact) + 1e-6
    torch.testing.assert_close(keys, ref_keys, atol=0, rtol=0)
    for copies in (1, 8):
        query, keys, values, mask = cross_case(dtype, "cuda", sources=16, copies=copies, heads=16, length=512, dim=64)
        mask[3:, 300:] = 0
        exact = reference_cross(query.double(), keys.double(), values.double(), mask)
        out = decode_attention.cross_attention(query, keys, values, mask, 1.0)
        assert error(out, exact) <= 2 * error(reference_cross(query, keys, values, mask), exact) + 1e-6, copies


@pytest.mark.cuda
def test_cuda_engine_through_the_kernels_gives_generates_tokens(t5_small_path):
    """The engine on the GPU (float32, captured steps, the kernels by default there) gives
    transformers' greedy tokens, and the kernels are what it ran (SDPA's cross-attention is
    not called)."""
    assert decode_attention.ready(torch.zeros(1, device="cuda"), 16)
    model = tiny_t5(t5_small_path).cuda()
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True).to("cuda")
    theirs = model.generate(**batch, max_new_tokens=12, do_sample=False)
    calls = []
    original = decode_attention.cross_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    decode_attention.cross_attention = counted
    try:
        for _ in range(3):  # eager, then captured and replayed
            ours = engine.generate(model, **batch, max_new_tokens=12, do_sample=False).sequences
            assert torch.equal(ours, theirs)
    finally:
        decode_attention.cross_attention = original
    assert calls
