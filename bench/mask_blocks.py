"""How many 128 x 128 attention blocks FlexAttention visits per step, with and without skipping
blocks of padding alone (`fast_t5.block_mask_tensors`), on the benchmark's fixed-shape batches.

CPU only: counts the block masks the packer makes for the steps `bench/train_speed.py` times (32
random examples a step, one fixed shape), per attention kind, summed over the steps. "before"
treats padding as one more pair (padding attends padding), as the masks did before the skip.

    python bench/mask_blocks.py --shared ../shared [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import bench_data, fixed_shape, packed_batch, step_indices

from flantune import fast_t5


def visited(pattern: fast_t5.Pattern) -> int:
    tensors = fast_t5.block_mask_tensors(pattern)
    return int(tensors[0].sum() + tensors[2].sum())  # partial + full kv blocks over all query blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    out = {}
    for name, examples in bench_data(Path(args.shared)).items():
        lengths = [len(s) + len(t) for s, t in examples]
        plan = step_indices(len(examples), 32, args.steps, False, lengths, seed=1)
        shape = fixed_shape(examples, plan)
        counts = {kind: {"before": 0, "after": 0} for kind in ("enc", "dec", "cross")}
        for idx in plan:
            b = packed_batch(examples, idx, "cpu", shape)
            enc, dec = (b["enc_pair"], b["enc_pos"]), (b["dec_pair"], b["dec_pos"])
            for kind, (q, k, causal) in {"enc": (enc, enc, False), "dec": (dec, dec, True),
                                         "cross": (dec, enc, False)}.items():  # fmt: skip
                counts[kind]["after"] += visited(fast_t5.Pattern(q[0], k[0], q[1], k[1], causal))
                as_pair = [torch.where(p == fast_t5.PAD_PAIR, 10**6, p) for p in (q[0], k[0])]
                counts[kind]["before"] += visited(fast_t5.Pattern(*as_pair, q[1], k[1], causal))
        out[name] = {"shape": shape, "steps": args.steps, "blocks": counts}
        print(name, json.dumps(out[name]), flush=True)


if __name__ == "__main__":
    main()
