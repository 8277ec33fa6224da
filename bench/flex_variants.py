"""FlexAttention alone on packed SciQ rows: what the score_mod and the block mask cost.

Encoder self-attention of flan-t5-large's shape (16 heads of 64) on the rows that 32 SciQ examples
pack into, forward + backward, compiled once per variant (static shapes), timed with CUDA events:

    none         no score_mod (the block mask alone)
    positions    bias[h, k_pos[b, k] - q_pos[b, q]]: two gathers per score
    indices      bias[h, k - q]: the same values where the mask allows (pairs are contiguous)
    positions-blockN   positions, with the block mask built at block size N (--blocks N)

    python bench/flex_variants.py --shared ../shared --out flex.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_speed import packed_batch, sciq_examples

from flantune import fast_t5


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--out", required=True)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--variants", default="none,positions,indices")
    parser.add_argument(
        "--blocks",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[],
        help="other block sizes to time with the positions score_mod, e.g. 64",
    )
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention
    from transformers import AutoTokenizer

    shared = Path(args.shared)
    tokenizer = AutoTokenizer.from_pretrained(shared / "assets" / "flan-t5-base")
    examples = sciq_examples(shared, tokenizer)
    batch = packed_batch(examples, list(range(32)), "cuda")
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
    runs = [(name, score_mod, mask) for name, score_mod in (("none", None), ("positions", positions),
                                                         ("indices", indices)) if name in args.variants]  # fmt: skip
    for block in args.blocks:
        if block != fast_t5.BLOCK:  # the same mask at another block size (FlexAttention's tiles follow it)
            other = fast_t5.build_block_mask(pattern, block=block)
            runs.append((f"positions-block{block}", positions, other))
    for name, score_mod, mask in runs:
        for _ in range(3):
            compiled(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0).sum().backward()
        times = {}
        for phase in ("forward", "forward+backward"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.iters):
                out = compiled(q, k, v, score_mod=score_mod, block_mask=mask, scale=1.0)
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
