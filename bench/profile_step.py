"""Where a packed flantune training step spends its time, and what each compile strategy gains.

One GPU, one model shape and method, the same SciQ batches (32 examples a step) for every variant.
Each variant runs one untimed pass over the batches (compilation, CUDA-graph recording for every
shape the batches have), then a timed pass over the same batches: the steady state of a long run,
where the few packed shapes recur. Variants:

    block       torch.compile of one T5 block, reused by every block (dynamic shapes)
    block-ro    the same with CUDA graphs (mode="reduce-overhead")
    graph       the whole step (forward, backward, AdamW) captured as one CUDA graph by hand, every
                batch padded to one fixed shape (the largest of the plan), loss over every decoder
                position; real tokens/s counts the same real tokens as the others

For the first variant it also records a torch.profiler trace of 3 steps and writes the kernel
table (sorted by GPU time) and GPU milliseconds per step by kind of kernel (train_speed.profile_steps).

    python bench/profile_step.py --shared ../shared --shape flan-t5-large --method lora \
        --variants block,graph --out profile.json

(A whole-stack compile variant ran on 2026-11-30 and did not finish compiling flan-t5-large in
200 s; it was removed for the graph variant, which compiles one block.)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import (
    build,
    optimizer_for,
    packed_batch,
    profile_steps,
    real_tokens,
    sciq_examples,
    step_indices,
)

from flantune import fast_t5
from flantune.packing import pack, to_device


def packed_step(model, optimizer, batch, block_fn) -> torch.Tensor:
    """A packed step stripped to forward, backward and AdamW, for comparing compile strategies of
    the block (bench/train_speed.py times flantune.train.train_step itself)."""
    tokens = (batch["labels"] != -100).sum()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fast_t5.packed_loss_sum(model, batch, "flex", block_fn=block_fn) / tokens
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def make_step(model, optimizer, variant: str):
    mode = "reduce-overhead" if variant.endswith("-ro") else None
    block_fn = torch.compile(fast_t5.t5_block, mode=mode)

    def step(batch):
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        return packed_step(model, optimizer, batch, block_fn)

    return step


def make_graph_step(model, lr: float, first: dict):
    """The whole step (forward, backward, AdamW) captured once as a CUDA graph and replayed: no
    per-kernel CPU cost at all. Needs fixed shapes (`pack(..., shape=...)`), the loss over every
    decoder position (`select_targets=False`, no host sync) and a capturable optimizer. The blocks
    are compiled first (warm-up on a side stream), then captured as they run."""
    block_fn = torch.compile(fast_t5.t5_block)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True, capturable=True)
    static = {k: tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone() for k, v in first.items()}

    def loss_fn():
        tokens = (static["labels"] != -100).sum()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return (
                fast_t5.packed_loss_sum(model, static, "flex", block_fn=block_fn, select_targets=False)
                / tokens
            )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            loss_fn().backward()
            optimizer.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # backward inside the capture allocates .grad from its pool
    with torch.cuda.graph(graph):
        loss = loss_fn()
        loss.backward()
        optimizer.step()

    def step(batch):
        for key, value in batch.items():
            if isinstance(value, tuple):
                for target, source in zip(static[key], value, strict=True):
                    target.copy_(source, non_blocking=True)
            else:
                static[key].copy_(value, non_blocking=True)
        graph.replay()
        return loss.detach()

    return step


def timed_pass(step, batches) -> list[float]:
    times = []
    for batch in batches:
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(batch)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--shape", default="flan-t5-large")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--variants", default="block,block-ro,graph")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    shared = Path(args.shared)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._dynamo.config.cache_size_limit = 64
    examples = sciq_examples(shared)
    lengths = [len(s) + len(t) for s, t in examples]
    plan = step_indices(len(examples), args.batch, args.steps, False, lengths, seed=1)
    tokens = sum(real_tokens(examples, idx) for idx in plan)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "method": args.method, "batch": args.batch, "steps": args.steps, "variants": {}}  # fmt: skip
    out = Path(args.out)

    model = build(shared, args.shape, args.method, "bfloat16")
    fast_t5.freeze_relative_bias(model)
    batches = [packed_batch(examples, idx, "cuda") for idx in plan]
    result["shapes"] = sorted({(tuple(b["input_ids"].shape), tuple(b["labels"].shape)) for b in batches})
    base = fast_t5.t5_model(model)
    fast_t5.patterns(base, batches[0], "flex", True)  # the first call loads CUDA modules: not timed
    torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        fast_t5.patterns(base, b, "flex", True)
    torch.cuda.synchronize()
    result["masks_ms_per_step"] = 1000 * (time.perf_counter() - start) / len(batches)
    print(json.dumps(result), flush=True)
    # The graph variant replays one captured shape: every step padded to the largest of the plan.
    shape = tuple(
        max(b[k].shape[d] for b in batches) for k, d in (("input_ids", 0), ("input_ids", 1), ("labels", 1))
    )
    fixed = [to_device(pack([examples[i][0] for i in idx], [examples[i][1] for i in idx], pad_id=0,
                            decoder_start_id=0, shape=shape), "cuda") for idx in plan]  # fmt: skip
    result["graph_shape"] = shape
    for i, variant in enumerate(args.variants.split(",")):
        started = time.perf_counter()
        try:
            step = (
                make_graph_step(model, 1e-5, fixed[0])
                if variant == "graph"
                else make_step(model, optimizer_for(model, 1e-5), variant)
            )
            batches_now = fixed if variant == "graph" else batches
            timed_pass(step, batches_now)  # compile, record
            warm = time.perf_counter() - started
            times = timed_pass(step, batches_now)
        except Exception as e:  # record and go on with the next variant
            result["variants"][variant] = {"error": repr(e)[:2000]}
            print(variant, "error", repr(e)[:2000], flush=True)
            torch._dynamo.reset()
            continue
        row = {
            "warm_s": warm,
            "median_step_ms": 1000 * statistics.median(times),
            "tokens_per_s": tokens / sum(times),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
        if i == 0:
            row["profile"] = profile_steps(step, batches_now[:3], out.with_name(f"profile-{variant}.txt"))
        result["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
        out.write_text(json.dumps(result, indent=2))
        del step
        gc.collect()
        torch._dynamo.reset()
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
