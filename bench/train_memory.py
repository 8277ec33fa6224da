"""Peak memory and throughput of `flantune train` per method, on random weights of published shapes.

Runs the real training engine (bf16 autocast, fused AdamW) on the real SciQ rows for a few steps
per configuration and reports real (non-padding) tokens/s and peak GPU memory. Writes a JSON file
with every figure.

    python bench/train_memory.py --out results.json [--steps 30] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flantune.config import recipe_from_dict
from flantune.train import train

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CASES = [
    # (shape, method, extra method keys, gradient checkpointing)
    ("flan-t5-large", "lora", {}, False),
    ("flan-t5-large", "qlora", {"bits": 4}, False),
    ("flan-t5-large", "qlora", {"bits": 4}, True),
    ("flan-t5-large", "qlora", {"bits": 8}, False),
    ("flan-t5-large", "full", {}, False),
    ("flan-t5-xl", "lora", {}, False),
    ("flan-t5-xl", "qlora", {"bits": 4}, False),
    ("flan-t5-xl", "qlora", {"bits": 4}, True),
]


def run_case(
    shared: Path, shape: str, method: str, extra: dict, checkpointing: bool, steps: int, batch_size: int
) -> dict:
    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_from_dict({
            "model": {"path": str(shared / "assets" / shape), "init": "random"},
            "method": {"kind": method, "r": 16, "alpha": 32, "target_modules": ["q", "v"], **extra},
            "data": {"task": "sciq", "train": {"path": str(shared / "data" / "sciq" / "valid.json"), "rows": "0:800"}, "max_source_tokens": 512,
                     "max_target_tokens": 32},
            "train": {"max_steps": steps, "batch_size": batch_size, "lr": 1e-4 if method == "full" else 3e-4,
                      "precision": "bf16", "log_every": 5, "gradient_checkpointing": checkpointing, "seed": 0},
            "output_dir": str(Path(out) / "run"),
        })  # fmt: skip
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = train(recipe)
        seconds = time.perf_counter() - started
        records = [json.loads(x) for x in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # first window: warm-up
        losses = [r["loss"] for r in records if "loss" in r]
        peak = torch.cuda.max_memory_allocated() / 2**30
        del result
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "shape": shape, "method": method, **extra, "gradient_checkpointing": checkpointing,
        "steps": steps, "batch_size": batch_size, "tokens_per_s": statistics.median(speeds),
        "peak_gib": round(peak, 2), "first_loss": losses[0], "last_loss": losses[-1], "wall_s": round(seconds, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", default=None, help="substring filter on 'shape/method'")
    parser.add_argument("--shared", default=str(SHARED), help="folder holding assets/ and data/sciq/")
    args = parser.parse_args()
    rows = []
    for shape, method, extra, ckpt in CASES:
        if args.only and args.only not in f"{shape}/{method}":
            continue
        try:
            row = run_case(Path(args.shared), shape, method, extra, ckpt, args.steps, args.batch_size)
        except Exception as e:  # record the failure and go on with the other cases
            row = {
                "shape": shape,
                "method": method,
                **extra,
                "gradient_checkpointing": ckpt,
                "error": repr(e)[:500],
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                              "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
