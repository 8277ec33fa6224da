"""CPU cost of packing a micro-batch: `flantune.packing.pack` with and without the FlexAttention
block masks, `fast_t5.patterns` on a packed batch whose masks the packer made, and the three
block masks alone with their q side made directly or through torch's `BlockMask.from_kv_blocks`.

The same 32 real SciQ examples a step as bench/train_speed.py (T5 tokenizer, flantune's sciq task),
flan-t5-base's shape for `patterns` (its relative-bias tables on the CPU). Medians over --repeats.

    python bench/pack_cpu.py --shared ../shared
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
from train_speed import sciq_examples, step_indices

from flantune import fast_t5
from flantune.packing import pack


def median_ms(run, repeats: int) -> float:
    run()  # first call: imports and caches, not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    shared = Path(args.shared)
    examples = sciq_examples(shared)
    idx = step_indices(len(examples), 32, 1, False, [0] * len(examples), seed=1)[0]
    sources, targets = [examples[i][0] for i in idx], [examples[i][1] for i in idx]
    model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(shared / "assets" / "flan-t5-base"))
    batch = pack(sources, targets, pad_id=0, decoder_start_id=0)
    result = {
        "cpu_threads": torch.get_num_threads(),
        "rows": batch["input_ids"].shape[0],
        "pack_ms": median_ms(
            lambda: pack(sources, targets, pad_id=0, decoder_start_id=0, block=None), args.repeats
        ),
        "pack_with_masks_ms": median_ms(
            lambda: pack(sources, targets, pad_id=0, decoder_start_id=0), args.repeats
        ),
        "patterns_ms": median_ms(lambda: fast_t5.patterns(model, batch, "flex", True), args.repeats),
    }
    # The three block masks alone, their q side (the backward's) made directly and through torch's
    # BlockMask.from_kv_blocks (what pack used before 2026-11-30's change): the same tensors.
    plain = fast_t5.patterns(model, batch, "eager", True)
    for q_side in ("direct", "torch"):
        result[f"three_masks_{q_side}_ms"] = median_ms(
            lambda q_side=q_side: [fast_t5.block_mask_tensors(p, q_side=q_side) for p in plain], args.repeats
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
