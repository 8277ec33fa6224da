"""What a packed micro-batch costs the training process to receive from a loader worker.

`flantune train` packs on CUDA in two worker processes (`flantune.packing.packed_loader`). What
arrives in the training process is one micro-batch of 32 tensors (the packed columns and three
FlexAttention block masks, about 100 KB). As plain tensors each crosses through shared memory, one
file-descriptor round trip to the worker per tensor; `PackedBatch` crosses by value (its arrays,
pickled). Both loaders here run the same packed SciQ micro-batches (32 real examples per micro-batch,
one row, the block masks; the fixed shape of `train.cuda_graph`), with a simulated training step
(--step-ms of sleep) between calls so that the workers are ahead: the time inside `next()` is then
the hand-off alone, paid by the training loop's own thread.

    python bench/loader_handoff.py --shared ../shared [--batches 30] [--step-ms 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import sciq_examples

from flantune.packing import BLOCK, PackedCollator, ShapeBatches, packed_shape


def handoff_ms(rows, sampler, collate, batches: int, step_s: float) -> list[float]:
    from torch.utils.data import DataLoader

    loader = DataLoader(
        rows, batch_sampler=sampler, collate_fn=collate, num_workers=2, persistent_workers=True
    )
    it, times = iter(loader), []
    for _ in range(min(batches, len(sampler))):  # one epoch at most
        start = time.perf_counter()
        next(it)
        times.append(1000 * (time.perf_counter() - start))
        time.sleep(step_s)
    return times[5:]  # the first ones wait for the workers to start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--step-ms", type=float, default=40.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    examples = sciq_examples(Path(args.shared))
    rows = [{"input_ids": s, "labels": t} for s, t in examples]
    sources, targets = [len(s) for s, _ in examples], [len(t) for _, t in examples]
    budget = round(32 * (sum(sources) + sum(targets)) / len(examples))  # 32 examples a micro-batch
    shape = packed_shape(sources, targets, budget)
    collator = PackedCollator(pad_id=0, decoder_start_id=0, shape=shape)
    batch = collator(rows[:8])
    result = {"cpu_threads": torch.get_num_threads(), "shape": shape, "block": BLOCK,
              "tensors": sum(len(v) if isinstance(v, tuple) else 1 for v in batch.values()),
              "step_ms": args.step_ms}  # fmt: skip

    def as_plain_dict(examples):  # the same micro-batch as shared-memory tensors
        return dict(collator(examples))

    for name, collate in (("shared-memory tensors", as_plain_dict), ("by value (PackedBatch)", collator)):
        times = handoff_ms(rows, ShapeBatches(sources, targets, shape, seed=0), collate, args.batches,
                           args.step_ms / 1000)  # fmt: skip
        result[name] = {"median_ms": statistics.median(times), "p90_ms": sorted(times)[int(0.9 * len(times))]}
        print(name, json.dumps(result[name]), flush=True)
    result["ratio"] = (
        result["shared-memory tensors"]["median_ms"] / result["by value (PackedBatch)"]["median_ms"]
    )
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
