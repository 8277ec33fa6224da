"""T5's encoder pass, six ways, on a GPU: transformers' encoder with sdpa (its default) and with
eager attention, over SciQ sources padded to the batch's longest; flantune's T5 blocks with
FlexAttention (the block compiled) and with SDPA (uncompiled; the bias as an additive mask in the
weights' dtype), each over the same padded rows and over the sources packed first fit into rows of
512 (flantune.packing.PackedSources, what the decoding engine runs). Per batch size:
the median of 10 timed calls after 3 (CUDA events), the first packed call's seconds (compilation),
the largest difference of a real token's output from the sdpa encoder's, and whether SDPA's
memory-efficient kernel takes the call (forced: its error, if any).

    python3 bench/encoder_attention.py --shared .gpu_shared --model flan-t5-base --rows 32,128 --out encoder.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import build_model, padded, sciq_sources

from flantune import engine, fast_t5
from flantune.packing import PackedSources


def timed(fn, n: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--model", default="flan-t5-base")
    parser.add_argument("--rows", default="32,128")
    parser.add_argument("--out", default="encoder_attention.json")
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shared = Path(args.shared)
    model, facts = build_model(shared, args.model, "cuda", None)
    encoder = model.get_encoder()
    rows_list = [int(r) for r in args.rows.split(",")]
    every = sciq_sources(shared, max(rows_list))
    out = {"model": args.model, **facts, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "cells": []}  # fmt: skip
    for rows in rows_list:
        batch = padded(every[:rows], "cuda")
        real = batch["attention_mask"].bool()
        cell = {"rows": rows, "padded_len": batch["input_ids"].shape[1], "real_tokens": int(real.sum())}
        with torch.no_grad():
            ref = encoder(**batch, return_dict=True)[0]

            def plain(batch=batch):
                return encoder(**batch, return_dict=True)[0]

            cell["sdpa_ms"] = timed(plain)
            try:
                with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                    cell["sdpa_efficient_ms"] = timed(plain)
            except RuntimeError as e:
                cell["sdpa_efficient_ms"] = f"error: {str(e)[:300]}"
            model.set_attn_implementation("eager")
            cell["eager_ms"] = timed(plain)
            cell["eager_maxdiff"] = float((plain() - ref)[real].abs().max())
            model.set_attn_implementation("sdpa")
            for label, width in (("flex_packed", 512), ("flex_padded", None), ("sdpa_packed", 512), ("sdpa_padded", None)):
                # width None: one source per row, the padded layout (padding blocks skipped)
                sources = PackedSources(batch["input_ids"], batch["attention_mask"],
                                        width=width or batch["input_ids"].shape[1], first_fit=width is not None)  # fmt: skip
                attention = label.split("_")[0]
                block = engine._packed_block() if attention == "flex" else None

                def packed(sources=sources, attention=attention, block=block):
                    return fast_t5.packed_encoder_output(model, sources, attention, block_fn=block)

                start = time.perf_counter()
                got = packed()
                torch.cuda.synchronize()
                cell[f"{label}_first_s"] = round(time.perf_counter() - start, 2)
                cell[f"{label}_rows"] = sources.rows
                cell[f"{label}_ms"] = timed(packed)
                cell[f"{label}_maxdiff"] = float((got - ref)[real].abs().max())
        cell["ref_absmax"] = float(ref[real].abs().max())
        print(json.dumps(cell), flush=True)
        out["cells"].append(cell)
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
