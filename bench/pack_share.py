"""How much of a packed shape is real tokens, counted on the CPU (no model, no GPU).

Two consumers of one fixed packed shape, at rows of 2048 source tokens and at one row per
micro-batch (--row-tokens, a list):

    bench    bench/train_speed.py's steps: 32 random examples a step, every step in the one shape
             that all --steps steps fit (`fixed_shape`); the shape is the worst step's
    train    `flantune train` with train.cuda_graph: `packed_shape` of a 32-example token budget,
             micro-batches filled first fit to that shape (`ShapeBatches`, as many examples as fit)

Data: the real SciQ lengths (T5 tokenizer, flantune's sciq task) and the generated long-target set,
as in bench/train_speed.py. Prints source and target positions per micro-batch and the real share.

    python bench/pack_share.py --shared ../shared
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import bench_data, fixed_shape, step_indices

from flantune.packing import ShapeBatches, packed_shape


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--row-tokens", default="2048,65536", help="source tokens per row, a list")
    parser.add_argument("--steps", type=int, default=8, help="bench steps the fixed shape covers")
    parser.add_argument("--batches", type=int, default=200, help="train micro-batches counted")
    args = parser.parse_args()
    out = []
    for name, examples in bench_data(Path(args.shared)).items():
        sources, targets = [len(s) for s, _ in examples], [len(t) for _, t in examples]
        lengths = [s + t for s, t in zip(sources, targets, strict=True)]
        plan = step_indices(len(examples), 32, args.steps, False, lengths, seed=1)
        budget = round(32 * sum(lengths) / len(lengths))
        for row_tokens in (int(x) for x in args.row_tokens.split(",")):
            shapes = {
                "bench": (fixed_shape(examples, plan, row_tokens), plan),
                "train": (shape := packed_shape(sources, targets, budget, row_tokens=row_tokens),
                          list(ShapeBatches(sources, targets, shape, seed=0))[: args.batches]),
            }  # fmt: skip
            for consumer, ((rows, enc, dec), batches) in shapes.items():
                real = sum(lengths[i] for b in batches for i in b)
                row = {"data": name, "consumer": consumer, "row_tokens": row_tokens, "shape": [rows, enc, dec],
                       "source_positions": rows * enc, "target_positions": rows * dec,
                       "examples_per_batch": round(sum(map(len, batches)) / len(batches), 1),
                       "real_share": round(real / (len(batches) * rows * (enc + dec)), 3)}  # fmt: skip
                out.append(row)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
