"""FlexAttention alone on packed SciQ rows: what the score_mod and the block mask cost.

Encoder self-attention of flan-t5-large's shape (16 heads of 64) on the rows that 32 SciQ examples
pack into, forward + backward, compiled once per variant (static shapes), timed with CUDA events:

    none         no score_mod (the block mask alone)
    positions    bias[h, k_pos[b, k] - q_pos[b, q]]: two gathers per score
    indices      bias[h, k - q]: the same values where the mask allows (pairs are contiguous)
    positions-blockN   positions, with the block mask built at block size N (--blocks N; compiled
                       with max-autotune, whose FlexAttention configs include tiles that divide N)

--row-tokens: source tokens per packed row (65536, the default: the 32 examples in one row; 2048).

    python bench/flex_variants.py --shared ../shared --out flex.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import sciq_examples

from flantune import fast_t5
from flantune.packing import pack, to_device


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="none,positions,indices")
    parser.add_argument("--row-tokens", type=int, default=65536)
    parser.add_argument(
        "--blocks",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[],
        help="other block sizes to time with the positions score_mod, e.g. 64",
    )
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    shared = Path(args.shared)
    examples = sciq_examples(shared)
    batch = to_device(pack([examples[i][0] for i in range(32)], [examples[i][1] for i in range(32)], pad_id=0,
                           decoder_start_id=0, row_tokens=args.row_tokens), "cuda")  # fmt: skip
    pair, pos = batch["enc_pair"], batch["enc_pos"]
    pattern = fast_t5.Pattern(pair, pair, pos, pos, causal=False)
    mask = fast_t5.build_block_mask(pattern, tensors=batch["enc_blocks"])
    rows, length = pair.shape
    heads, dim, reach = 16, 64, 128
    bias = torch.randn(heads, 2 * reach + 1, device="cuda")
    q, k, v = (torch.randn(rows, heads, length, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip

    def positions(score, b, h, q_idx, k_idx):
        distance = (pos[b, k_idx] - pos[b, q_idx]).clamp(-reach, reach)
        return score + bias[h, distance + reach].to(score.dtype)

    def indices(score, b, h, q_idx, k_idx):
        distance = (k_idx - q_idx).clamp(-reach, reach)
        return score + bias[h, distance + reach].to(score.dtype)

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "length": length,
              "real_tokens": int((pair >= 0).sum()), "variants": {}}  # fmt: skip
    compiled = torch.compile(flex_attention, dynamic=False)
    autotuned = torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")
    runs = [(name, score_mod, mask, compiled) for name, score_mod in (("none", None), ("positions", positions),
            ("indices", indices)) if name in args.variants]  # fmt: skip
    for block in args.blocks:  # the same mask at another block size, and the 128 one autotuned alike
        for size in sorted({block, fast_t5.BLOCK}):
            other = fast_t5.build_block_mask(pattern, block=size)
            runs.append((f"positions-block{size}-autotuned", positions, other, autotuned))
    for name, score_mod, mask, fn in runs:
        try:
            for _ in range(3):
                fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0).sum().backward()
        except Exception as e:  # record and go on with the other variants
            result["variants"][name] = {"error": repr(e)[:1000]}
            print(name, "error", repr(e)[:1000], flush=True)
            continue
        times = {}
        for phase in ("forward", "forward+backward"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                out = fn(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0)
                if phase != "forward":
                    out.sum().backward()
            end.record()
            torch.cuda.synchronize()
            times[phase] = start.elapsed_time(end) / args.iters
        result["variants"][name] = times
        print(name, json.dumps(times), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
