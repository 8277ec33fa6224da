"""Training speed: transformers + PEFT against flantune's packed FlexAttention path, one GPU, one process.

For every cell (model shape x method x data set) both sides train on the same examples, the same
number of examples per optimizer step (--batch, 32), random weights of the published shapes, bf16
weights under bf16 autocast, fused AdamW:

- transformers + PEFT: the plain loop (`model(**batch).loss`, backward, step) under four settings,
  eager or sdpa attention x random or length-grouped batches (`group_by_length`'s megabatches); the
  best of the four is the baseline, the strongest setting an HF user can pick.
- flantune: the same examples per step packed into one row (flantune.packing; --row-tokens),
  every step in one fixed shape, FlexAttention with T5's bias inside the kernel, compiled blocks,
  chunked cross-entropy, forward + backward replayed as one CUDA graph (flantune.graphs, as
  `train.cuda_graph`); `--no-graph`: compiled blocks launched one by one. Each step is
  `flantune.train.train_step`, the step `flantune train` runs (token-mean loss, gradient clipping
  at 1.0, fused AdamW), under Accelerate's bf16 autocast.

Printed and written per cell: real (non-padding) tokens/s of both, the ratio, model-FLOP
utilisation against a measured bf16 matmul peak, peak memory. Data: the real SciQ lengths (T5
tokenizer, flantune's sciq task) and a generated long-target set (sources 100-800 tokens, targets
20-120). `--check` compares bf16 logits/loss with transformers first; `--curve N` trains
flan-t5-base both ways for N steps on SciQ and writes both loss curves.

    python bench/train_speed.py --out speed.json [--shared ../shared] [--only large/full]
        [--steps 10] [--warmup 4] [--hf-warmup 2] [--batch 32] [--check] [--curve 300] [--cells 0]
        [--models flan-t5-large,flan-t5-base] [--mode max-autotune-no-cudagraphs]
        [--no-graph [--mode reduce-overhead] [--static]]
        [--row-tokens 2048] [--block 64 --mode max-autotune-no-cudagraphs] [--no-hf]
        [--profile DIR] [--flex-options '{"bwd_num_warps": 4}']

`--no-hf` skips the baseline (a flantune variant's trial; the cell then has no ratio). `--profile`
writes each cell's kernel table for 3 flantune steps and adds GPU ms per step by kind of kernel
(matmul, FlexAttention forward/backward, fused elementwise, optimizer) to the cell.
`--flex-options` sets FlexAttention's kernel_options (fast_t5.KERNEL_OPTIONS) for a tile sweep.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flantune import fast_t5
from flantune.graphs import CapturedStep
from flantune.packing import pack, to_device

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = ("flan-t5-base", "flan-t5-large")
METHODS = ("lora", "full")
DATASETS = ("sciq", "long")


# ---- data -------------------------------------------------------------------------------------


def sciq_examples(shared: Path) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) of the SciQ rows, through flantune's own sciq task and the T5 tokenizer."""
    from transformers import AutoTokenizer

    from flantune.config import recipe_from_dict
    from flantune.data import load_splits

    tokenizer = AutoTokenizer.from_pretrained(shared / "assets" / "flan-t5-base")
    recipe = recipe_from_dict({
        "model": {"path": str(shared / "assets" / "flan-t5-base")},
        "data": {"task": "sciq", "train": str(shared / "data" / "sciq" / "valid.json"),
                 "max_source_tokens": 512, "max_target_tokens": 32},
    })  # fmt: skip
    data = load_splits(recipe.data, tokenizer, roles=("train",))["train"].dataset
    return list(zip(data["input_ids"], data["labels"], strict=True))


def long_examples(n: int = 1000, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Summarization-like lengths: sources 100-800 tokens, targets 20-120 (EOS last)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        src = [rng.randrange(5, 32000) for _ in range(rng.randint(100, 800) - 1)] + [1]
        tgt = [rng.randrange(5, 32000) for _ in range(rng.randint(20, 120) - 1)] + [1]
        out.append((src, tgt))
    return out


def bench_data(shared: Path) -> dict[str, list[tuple[list[int], list[int]]]]:
    """The benchmark's two data sets: real SciQ lengths and the generated long-target set."""
    return {"sciq": sciq_examples(shared), "long": long_examples()}


def step_indices(
    n: int, batch: int, steps: int, grouped: bool, lengths: list[int], seed: int
) -> list[list[int]]:
    """Example indices per step: random batches, or group_by_length's (megabatches of 50 batches,
    each sorted by length; the batches then come in random order, so a few timed steps are a fair
    sample of the epoch rather than its longest batches)."""
    rng = random.Random(seed)
    order = []
    while len(order) < batch * steps:
        order += rng.sample(range(n), n)
    if not grouped:
        order = order[: batch * steps]
        return [order[s : s + batch] for s in range(0, len(order), batch)]
    mega = batch * 50
    order = [
        i for s in range(0, len(order), mega) for i in sorted(order[s : s + mega], key=lambda i: -lengths[i])
    ]
    batches = [order[s : s + batch] for s in range(0, len(order) - batch + 1, batch)]
    rng.shuffle(batches)
    return batches[:steps]


def padded_batch(examples, idx, device) -> dict:
    sources, targets = [examples[i][0] for i in idx], [examples[i][1] for i in idx]
    ids = torch.zeros(len(idx), max(map(len, sources)), dtype=torch.long)
    labels = torch.full((len(idx), max(map(len, targets))), -100, dtype=torch.long)
    for r, (s, t) in enumerate(zip(sources, targets, strict=True)):
        ids[r, : len(s)], labels[r, : len(t)] = torch.tensor(s), torch.tensor(t)
    return {
        "input_ids": ids.to(device),
        "attention_mask": (ids != 0).long().to(device),
        "labels": labels.to(device),
    }


def packed_batch(examples, idx, device, shape=None, block: int = fast_t5.BLOCK) -> dict:
    if shape is not None:  # first fit in this order: longest sources first fill rows best
        idx = sorted(idx, key=lambda i: -len(examples[i][0]))
    batch = pack([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id=0, decoder_start_id=0,
                 shape=shape, block=block)  # fmt: skip
    return to_device(batch, device)


def fixed_shape(examples, plan, row_tokens: int = 65536) -> tuple[int, int, int]:
    """The one packed shape (rows, source length, target length) that every step of `plan` fits,
    rows of `row_tokens` source tokens (longer where a source is; 65536: one row per step)."""
    batches = [
        to_device(pack([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id=0,
                       decoder_start_id=0, row_tokens=row_tokens, block=None), "cpu")
        for idx in plan
    ]  # fmt: skip
    enc = max(b["input_ids"].shape[1] for b in batches)
    dec = max(b["labels"].shape[1] for b in batches)
    rows = max(b["input_ids"].shape[0] for b in batches)
    while True:
        try:
            for idx in plan:
                packed_batch(examples, idx, "cpu", (rows, enc, dec))
            return rows, enc, dec
        except ValueError:
            rows += 1


def graphed_step(model, block_fn):
    """flantune's training step: the packed micro-batch's forward and backward replayed as one CUDA
    graph (flantune.graphs.CapturedStep, as `train.cuda_graph`), gradients scaled to the token mean."""
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_fn(batch):
        return fast_t5.packed_loss_sum(model, batch, "flex", block_fn=block_fn, select_targets=False)

    return CapturedStep(loss_fn, params, torch.bfloat16)


def real_tokens(examples, idx) -> int:
    return sum(len(examples[i][0]) + len(examples[i][1]) for i in idx)


# ---- models ---------------------------------------------------------------------------------


def build(shared: Path, shape: str, method: str, dtype: str):
    from flantune.config import MethodConfig
    from flantune.methods import apply_method
    from flantune.models import load_model

    model = load_model(str(shared / "assets" / shape), init="random", dtype=dtype, seed=0)
    spec = (
        MethodConfig(kind=method, r=16, alpha=32, target_modules=["q", "v"])
        if method == "lora"
        else MethodConfig(kind="full")
    )
    return apply_method(model, spec).cuda()


def optimizer_for(model, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, fused=True)


def matmul_peak() -> float:
    """Measured dense bf16 matmul TFLOP/s (8192^3), the MFU denominator."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (time.perf_counter() - start) / 1e12


def step_flops(model, examples, idx, method: str) -> float:
    """Model FLOPs of one step on the real tokens: matmuls of each stack times its tokens (the
    decoder's cross-attention k and v project the source tokens), the per-pair attention, the
    vocabulary projection. Full: forward + both backward products (6 per weight per token); LoRA:
    the frozen weights need no weight gradient (4; the small adapters counted alike)."""
    base = fast_t5.t5_model(model)
    cfg = base.config

    def weights(stack, keep) -> int:
        return sum(p.numel() for n, p in stack.block.named_parameters() if p.ndim == 2 and keep(n))

    per_weight = 6 if method == "full" else 4
    enc = weights(base.encoder, lambda n: "relative" not in n)
    cross_kv = weights(base.decoder, lambda n: "EncDecAttention.k." in n or "EncDecAttention.v." in n)
    dec = weights(base.decoder, lambda n: "relative" not in n) - cross_kv
    head = base.lm_head.weight.numel()
    inner = cfg.num_heads * cfg.d_kv
    flops = 0.0
    for i in idx:
        s, t = len(examples[i][0]), len(examples[i][1])
        flops += per_weight * ((enc + cross_kv) * s + (dec + head) * t)
        # q.k and p.v: 2 products x 2 FLOPs, forward + 2 backward products = 3x (no masking savings counted).
        attention = 4 * inner * (s * s * cfg.num_layers + (t * t + t * s) * cfg.num_decoder_layers)
        flops += 3 * attention
    return flops


# ---- the two loops ----------------------------------------------------------------------------


def hf_step(model, optimizer, micro_batches: list[dict]) -> None:
    """One optimizer step over the step's micro-batches (one, or several when accumulating)."""
    for batch in micro_batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss / len(micro_batches)
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flantune_step(model, args):
    """`run_step(batch)`: one optimizer step of `flantune train` on a packed micro-batch, through its
    own pieces: `PackedLoss` (compiled blocks), the CUDA-graph step (`CapturedStep`, unless
    --no-graph) and `flantune.train.train_step`, under Accelerate's bf16 autocast."""
    from accelerate import Accelerator

    from flantune.packing import PackedLoss
    from flantune.run import build_optimizer, build_scheduler
    from flantune.train import make_micro_step, train_step

    fast_t5.freeze_relative_bias(model)
    accelerator = Accelerator(mixed_precision="bf16")
    options = {"mode": args.mode} | ({"dynamic": False} if args.static or not args.no_graph else {})
    packed = PackedLoss(model, "flex", compile=True, compile_options=options)
    stepped = accelerator.prepare(packed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = accelerator.prepare(build_optimizer(model, 1e-4, 0.0))
    scheduler = build_scheduler("constant", optimizer, 0, 10**9)
    graphed = None if args.no_graph else CapturedStep(packed.fixed_shape_loss, params, torch.bfloat16)
    micro_step = make_micro_step(stepped, accelerator, packed=True, graphed=graphed)

    def run_step(batch):
        train_step(micro_step, [dict(batch)], stepped=stepped, optimizer=optimizer, scheduler=scheduler,
                   accelerator=accelerator, params=params, max_grad_norm=1.0, set_to_none=graphed is None)  # fmt: skip

    return run_step


def timed(run_step, batches, warmup: int) -> tuple[float, list[float]]:
    """Seconds of the steps after `warmup`, and the per-step times."""
    times = []
    for i, batch in enumerate(batches):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(batch)
        torch.cuda.synchronize()  # note: a sync point per step, for honest per-step times
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sum(times), times


KERNEL_KINDS = (  # (kind, substrings of the kernel name), first match wins
    ("flex backward", ("flex_attention_backward",)),
    ("flex forward", ("flex_attention",)),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas")),
    ("optimizer", ("multi_tensor", "adam")),
    ("fused elementwise (triton)", ("triton_",)),
)


def profile_steps(run_step, batches, out: Path) -> dict:
    """torch.profiler over `batches` (steps already compiled and captured): the kernel table sorted
    by GPU time, written to `out`, and GPU milliseconds per step by kind of kernel."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for batch in batches:
            run_step(batch)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kinds: dict[str, float] = {}
    for event in events:
        kind = next((k for k, keys in KERNEL_KINDS if any(x in event.key.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1000 / len(batches)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=100)
    )
    return {"wall_ms_per_step": 1000 * wall / len(batches), "gpu_ms_per_step": sum(kinds.values()),
            "gpu_ms_by_kind": dict(sorted(kinds.items(), key=lambda kv: -kv[1]))}  # fmt: skip


def run_cell(shared, shape, method, name, examples, args, peak) -> dict:
    model = build(shared, shape, method, "bfloat16")
    base = fast_t5.t5_model(model)
    optimizer = optimizer_for(model, 1e-4)
    lengths = [len(s) + len(t) for s, t in examples]
    n_steps = args.warmup + args.steps
    random_steps = step_indices(len(examples), args.batch, n_steps, False, lengths, seed=1)
    hf_steps = args.hf_warmup + args.steps
    row = {"shape": shape, "method": method, "data": name, "batch": args.batch, "steps": args.steps,
           "row_tokens": args.row_tokens, "block": args.block, "mode": args.mode, "hf": {}}  # fmt: skip
    # An HF user whose step does not fit accumulates gradients over smaller micro-batches: tried
    # (2, 4, 8 micro-batches a step) only when every setting runs out of memory at the whole step.
    for accumulate in (1, 2, 4, 8) if not args.no_hf else ():
        if accumulate > 1 and any(r["tokens_per_s"] > 0 for r in row["hf"].values()):
            break
        size = -(-args.batch // accumulate)
        for attn in ("eager", "sdpa"):
            base.set_attn_implementation(attn)
            for grouped in (False, True):
                steps = step_indices(len(examples), args.batch, hf_steps, grouped, lengths, seed=1)
                # (steps, micro-batches): contiguous slices keep grouped batches' similar lengths together
                batches = [[padded_batch(examples, idx[k : k + size], "cuda") for k in range(0, len(idx), size)]
                           for idx in steps]  # fmt: skip
                torch.cuda.reset_peak_memory_stats()
                key = f"{attn}/{'grouped' if grouped else 'random'}"
                key += f"/accumulate {accumulate}" if accumulate > 1 else ""
                try:
                    seconds, _ = timed(lambda b: hf_step(model, optimizer, b), batches, args.hf_warmup)
                except torch.OutOfMemoryError:
                    optimizer.zero_grad(set_to_none=True)
                    row["hf"][key] = {"tokens_per_s": 0.0, "error": "out of memory"}
                    print(shape, method, name, "hf", key, "out of memory", flush=True)
                    del batches
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                tokens = sum(real_tokens(examples, idx) for idx in steps[args.hf_warmup :])
                padded = sum(b["input_ids"].numel() + b["labels"].numel()
                             for micro in batches[args.hf_warmup :] for b in micro)  # fmt: skip
                row["hf"][key] = {"tokens_per_s": tokens / seconds, "padding_share": 1 - tokens / padded,
                                  "peak_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip
                print(shape, method, name, "hf", key, round(tokens / seconds), flush=True)
                del batches
    best = max(row["hf"], key=lambda k: row["hf"][k]["tokens_per_s"], default=None)
    row["hf_best"] = {
        "setting": best,
        **row["hf"].get(best, {"tokens_per_s": 0.0}),
    }  # tokens_per_s 0: every setting ran out of memory, or --no-hf

    # flantune's side runs flantune.train's own optimizer step (train_step: token-mean loss, gradient
    # clipping at train.max_grad_norm's default 1.0, AdamW, the schedule), as `flantune train` does.
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()  # the baseline's Adam state: not flantune's memory
    run_step = flantune_step(model, args)
    if args.no_graph:
        batches = [packed_batch(examples, idx, "cuda", block=args.block) for idx in random_steps]
    else:
        shape = fixed_shape(examples, random_steps, args.row_tokens)
        row["shape_packed"] = shape
        batches = [packed_batch(examples, idx, "cuda", shape, args.block) for idx in random_steps]
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    seconds, times = timed(run_step, batches, args.warmup)
    warm_s = time.perf_counter() - started - seconds
    tokens = sum(real_tokens(examples, idx) for idx in random_steps[args.warmup :])
    flops = sum(step_flops(model, examples, idx, method) for idx in random_steps[args.warmup :])
    ours = tokens / seconds
    torch.cuda.synchronize()
    mask_start = time.perf_counter()
    fast_t5.patterns(base, batches[-1], "flex", True)
    torch.cuda.synchronize()
    mask_ms = 1000 * (time.perf_counter() - mask_start)
    row["flantune"] = {
        "kernel_options": dict(fast_t5.KERNEL_OPTIONS),
        "tokens_per_s": ours, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "mfu": flops / seconds / 1e12 / peak, "tflops": flops / seconds / 1e12,
        "median_step_ms": 1000 * statistics.median(times), "warmup_s": warm_s,
        "rows_per_step": statistics.mean(b["input_ids"].shape[0] for b in batches),
        "masks_ms": mask_ms, "path": "compiled blocks" if args.no_graph else "compiled blocks + CUDA graph",
    }  # fmt: skip
    if args.profile:
        out = Path(args.profile) / f"{row['shape']}-{method}-{name}.txt"
        row["flantune"]["profile"] = profile_steps(run_step, batches[-3:], out)
        print(json.dumps(row["flantune"]["profile"]), flush=True)
    # The same model FLOPs per real token on both sides.
    row["hf_best"]["mfu"] = row["flantune"]["mfu"] * row["hf_best"]["tokens_per_s"] / ours
    row["ratio"] = ours / row["hf_best"]["tokens_per_s"] if row["hf_best"]["tokens_per_s"] else None
    print(
        json.dumps({k: row[k] for k in ("shape", "method", "data", "hf_best", "flantune", "ratio")}),
        flush=True,
    )
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


# ---- correctness and the loss curve -------------------------------------------------------------


def check(shared: Path, examples) -> dict:
    """bf16 autocast over fp32 weights, eval mode: our packed flex logits/loss vs transformers."""
    model = build(shared, "flan-t5-base", "full", "float32").eval()
    idx = list(range(32))
    out = {}
    for attn in ("eager", "sdpa"):
        fast_t5.t5_model(model).set_attn_implementation(attn)
        padded = padded_batch(examples, idx, "cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            hf = model(**padded)
            packed = packed_batch(examples, idx, "cuda")
            block_fn = torch.compile(fast_t5.t5_block)
            ours = fast_t5.packed_logits(model, packed, "flex") if attn == "eager" else None
            loss_sum = fast_t5.packed_loss_sum(model, packed, "flex", block_fn=block_fn)
        ours_loss = float(loss_sum) / int((packed["labels"] != -100).sum())
        out[f"loss_hf_{attn}"] = float(hf.loss)
        out[f"loss_ours_compiled_vs_{attn}"] = ours_loss
        if ours is not None:
            errs = []
            for r in range(packed["dec_pair"].shape[0]):
                for pair in packed["dec_pair"][r].unique().tolist():
                    if pair < 0:
                        continue
                    sel = packed["dec_pair"][r] == pair
                    target = packed["labels"][r][sel]
                    i = next(i for i in range(len(idx)) if torch.equal(padded["labels"][i, : len(target)], target)
                             and int((padded["labels"][i] != -100).sum()) == len(target))  # fmt: skip
                    ref = hf.logits[i, : len(target)].float()
                    errs.append(float((ours[r][sel].float() - ref).norm() / ref.norm()))
            out["logits_rel_error_max"] = max(errs)
            out["logits_rel_error_mean"] = statistics.mean(errs)
    # fp32 without autocast: the same math should agree to float32 rounding.
    with torch.no_grad():
        fast_t5.t5_model(model).set_attn_implementation("eager")
        hf32 = model(**padded_batch(examples, idx, "cuda")).loss
        ours32 = fast_t5.packed_loss_sum(model, packed_batch(examples, idx, "cuda"), "flex")
    out["loss_fp32_hf"], out["loss_fp32_ours"] = (
        float(hf32),
        float(ours32) / int((packed["labels"] != -100).sum()),
    )
    out["graph"] = graph_check(model, examples, idx)
    print(json.dumps(out), flush=True)
    del model
    torch._dynamo.reset()
    return out


def graph_check(model, examples, idx) -> dict:
    """The CUDA-graph step against the plain packed step on one batch (dropout off, bf16 autocast):
    loss and every gradient, on the first replay and on a later one (inputs copied in again)."""
    fast_t5.freeze_relative_bias(model)
    params = [p for p in model.parameters() if p.requires_grad]
    other_idx = list(range(32, 64))
    shape = fixed_shape(examples, [idx, other_idx])  # one shape for both batches
    fixed, other = (
        packed_batch(examples, idx, "cuda", shape),
        packed_batch(examples, other_idx, "cuda", shape),
    )
    tokens = int((fixed["labels"] != -100).sum())
    block_fn = torch.compile(fast_t5.t5_block, dynamic=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the plain packed step, launched op by op
        loss = fast_t5.packed_loss_sum(model, fixed, "flex", block_fn=block_fn)
    loss.backward()
    ref_loss, ref_grads = float(loss), [p.grad.clone() for p in params]
    del loss  # no autograd graph of these parameters may be alive at capture (flantune.graphs)
    for p in params:
        p.grad = None
    captured = graphed_step(model, block_fn)
    out = {}
    for name, batch in (("first", fixed), ("after_other", other), ("again", fixed)):
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss = float(captured(batch, 1.0))
        if batch is fixed:
            errors = [
                float((p.grad - g).norm() / g.norm().clamp(min=1e-12))
                for p, g in zip(params, ref_grads, strict=True)
            ]
            out[name] = {"loss_rel_error": abs(loss - ref_loss) / ref_loss, "grad_rel_error_max": max(errors),
                         "grad_rel_error_median": statistics.median(errors)}  # fmt: skip
    out["tokens"] = tokens
    del captured
    torch._dynamo.reset()
    return out


def curve(shared: Path, examples, steps: int, batch: int) -> dict:
    """flan-t5-base full fine-tuning from the same random weights on the same batches: transformers
    (eager, attention dropout 0.1) against flantune (packed flex, CUDA-graph step; attention-probability
    dropout off, the other dropouts on; relative bias frozen). fp32 weights under bf16 autocast, as
    flantune train."""
    lengths = [len(s) + len(t) for s, t in examples]
    plan = step_indices(len(examples), batch, steps, False, lengths, seed=7)
    start = build(shared, "flan-t5-base", "full", "float32")
    out = {"steps": steps, "batch": batch, "lr": 3e-4}
    for side in ("hf", "flantune"):
        model = copy.deepcopy(start)
        optimizer = optimizer_for(model, 3e-4)
        torch.manual_seed(0)
        losses = []
        if side == "flantune":
            fast_t5.freeze_relative_bias(model)
            shape = fixed_shape(examples, plan)
            captured = graphed_step(model, torch.compile(fast_t5.t5_block, dynamic=False))
            optimizer.zero_grad(set_to_none=False)
        started = time.perf_counter()
        for idx in plan:
            if side == "hf":
                b = padded_batch(examples, idx, "cuda")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(**b).logits
                labels = b["labels"]
                loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss))
            else:
                b = packed_batch(examples, idx, "cuda", shape)
                tokens = int((b["labels"] != -100).sum())
                loss = captured(b, 1 / tokens) / tokens
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
                losses.append(float(loss))
        out[side] = losses
        out[f"{side}_seconds"] = time.perf_counter() - started
        del model, optimizer
        torch._dynamo.reset()
    out["last50_mean"] = {s: statistics.mean(out[s][-50:]) for s in ("hf", "flantune")}
    print(json.dumps({k: v for k, v in out.items() if k not in ("hf", "flantune")}), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", default=str(SHARED), help="folder holding assets/ and data/sciq/")
    parser.add_argument("--only", default=None, help="substring filter on 'shape/method/data'")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=4, help="flantune steps before timing (compilation)")
    parser.add_argument("--hf-warmup", type=int, default=2)
    parser.add_argument(
        "--mode",
        default=None,
        help="torch.compile mode for flantune's blocks (with the CUDA graph: max-autotune-no-cudagraphs)",
    )
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--curve", type=int, default=0, help="steps of the loss-curve comparison (0: none)")
    parser.add_argument("--cells", type=int, default=1, help="0: skip the speed cells")
    parser.add_argument(
        "--static", action="store_true", help="--no-graph: compile with static shapes (one graph per shape)"
    )
    parser.add_argument(
        "--row-tokens",
        type=int,
        default=65536,
        help="source tokens per packed row of the fixed shape (65536: a step's examples in one row)",
    )
    parser.add_argument(
        "--no-graph",
        action="store_true",
        help="flantune without CUDA graphs (compiled blocks launched one by one)",
    )
    parser.add_argument("--no-hf", action="store_true", help="flantune only (a variant trial)")
    parser.add_argument(
        "--block",
        type=int,
        default=fast_t5.BLOCK,
        help="FlexAttention block size of the masks (64: pairs of ~140 tokens waste less)",
    )
    parser.add_argument("--profile", default=None, help="folder: profile 3 flantune steps of every cell")
    parser.add_argument(
        "--flex-options",
        type=json.loads,
        default={},
        help="FlexAttention kernel_options as JSON, e.g. '{\"bwd_num_warps\": 4}' (fast_t5.KERNEL_OPTIONS)",
    )
    args = parser.parse_args()
    fast_t5.KERNEL_OPTIONS.update(args.flex_options)
    if args.block < fast_t5.BLOCK and args.mode not in ("max-autotune-no-cudagraphs", "max-autotune"):
        # Inductor filters its FlexAttention backward configs by the block size before applying
        # kernel_options; without max-autotune its one sm90 config (64, 128, 128, 64) fits no 64.
        parser.error(f"--block {args.block} compiles only with --mode max-autotune-no-cudagraphs")
    if not args.no_graph and args.mode in ("reduce-overhead", "max-autotune"):
        parser.error(f"--mode {args.mode} records CUDA graphs of its own: use it with --no-graph")

    shared = Path(args.shared)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    data = bench_data(shared)
    peak = matmul_peak()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "matmul_peak_tflops": peak,
              "date": time.strftime("%Y-%m-%d"), "cells": []}  # fmt: skip
    import transformers

    result["transformers"] = transformers.__version__
    print(json.dumps({k: v for k, v in result.items() if k != "cells"}), flush=True)

    def write():
        Path(args.out).write_text(json.dumps(result, indent=2))

    if args.check:
        try:
            result["check"] = check(shared, data["sciq"])
        except Exception as e:
            result["check"] = {"error": repr(e)[:3000]}
            print("check error", repr(e)[:3000], flush=True)
        write()
    for shape in args.models.split(",") if args.cells else ():
        for method in METHODS:
            for name in DATASETS:
                if args.only and args.only not in f"{shape}/{method}/{name}":
                    continue
                try:
                    result["cells"].append(run_cell(shared, shape, method, name, data[name], args, peak))
                except Exception as e:  # record the failure and go on with the other cells
                    result["cells"].append(
                        {"shape": shape, "method": method, "data": name, "error": repr(e)[:800]}
                    )
                    print("error", shape, method, name, repr(e)[:800], flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                write()
    if args.curve:
        result["curve"] = curve(shared, data["sciq"], args.curve, args.batch)
        write()


if __name__ == "__main__":
    main()
