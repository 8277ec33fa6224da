"""`flantune train` itself on one GPU: the same recipe unpacked, packed, and packed with CUDA graphs.

Each run trains a random-weight model of the published shape on the real SciQ rows for --steps
optimizer steps (logging every --log-every) and the figure is the real (non-padding) tokens/s that
metrics.jsonl reports, averaged over the logged windows after the first (which pays compilation
and capture). The recipe is recipes/sciq-lora.yaml with local paths; --method full for full
fine-tuning. Loss of the last window is printed too (the runs see different micro-batches: the
unpacked and packed runs take batch_size examples, the CUDA-graph run fills one packed shape).

    python bench/train_loop.py --shared ../shared --shape flan-t5-base --method lora --out loop.json \
        [--profile 31,35]   # train.profile_steps: device-busy share and the op table per run
        [--runs packed+graph,packed+graph+unpinned]   # train.pin_memory's effect
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RUNS = {
    "unpacked": ["train.packing=false"],
    "packed": ["train.packing=true", "train.compile=true"],
    "packed+graph": ["train.packing=true", "train.compile=true", "train.cuda_graph=true"],
    # The same with pageable micro-batches and blocking copies (what train.pin_memory=true replaced).
    "packed+graph+unpinned": [
        "train.packing=true", "train.compile=true", "train.cuda_graph=true", "train.pin_memory=false",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--shape", default="flan-t5-base")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--runs", default="unpacked,packed,packed+graph")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--profile",
        default=None,
        help="first,last: train.profile_steps for every run (summary and ops table kept)",
    )
    args = parser.parse_args()
    import torch

    from flantune.config import load_recipe
    from flantune.train import train

    shared = Path(args.shared).resolve()
    root = Path(__file__).resolve().parents[1]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
              "method": args.method, "steps": args.steps, "runs": {}}  # fmt: skip
    for name in args.runs.split(","):
        out = Path(tempfile.mkdtemp()) / name
        overrides = [
            f"model.path={shared / 'assets' / args.shape}", "model.init=random",
            f"data.train={shared / 'data' / 'sciq' / 'valid.json'}", "data.eval=null", "data.test=null",
            f"method.kind={args.method}", "train.batch_size=32", f"train.max_steps={args.steps}",
            f"train.log_every={args.log_every}", "train.save_every=null", "train.eval_every=null",
            f"output_dir={out}", *RUNS[name],
        ]  # fmt: skip
        if args.profile:
            overrides.append(f"train.profile_steps=[{args.profile}]")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            train(load_recipe(str(root / "recipes" / "sciq-lora.yaml"), overrides))
        except Exception as e:  # record and go on
            result["runs"][name] = {"error": repr(e)[:2000]}
            print(name, "error", repr(e)[:2000], flush=True)
            continue
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        windows = [r for r in records if "tokens_per_s" in r]
        result["runs"][name] = {
            "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in windows[1:]),
            "first_window_tokens_per_s": windows[0]["tokens_per_s"],
            "data_wait_share": statistics.mean(r["data_wait_share"] for r in windows[1:]),
            "last_loss": windows[-1]["loss"],
            # Per log window: an epoch boundary or a slow loader shows in one window, not in the mean.
            "windows": [
                {k: r[k] for k in ("step", "epoch", "tokens_per_s", "data_wait_share") if k in r}
                for r in windows
            ],
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        }
        if (out / "profile" / "summary.json").exists():
            result["runs"][name]["profile"] = json.loads((out / "profile" / "summary.json").read_text())
            ops = Path(args.out).with_name(f"{Path(args.out).stem}-{name.replace('+', '-')}-ops.txt")
            ops.write_text((out / "profile" / "ops.txt").read_text())
        print(name, json.dumps(result["runs"][name]), flush=True)
        torch._dynamo.reset()
        Path(args.out).write_text(json.dumps(result, indent=2))
    base = result["runs"].get("unpacked", {}).get("tokens_per_s")
    for run in result["runs"].values():
        if base and "tokens_per_s" in run:
            run["vs_unpacked"] = run["tokens_per_s"] / base
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
