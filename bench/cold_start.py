"""Cold start of `flantune train`: one run of a bench/recipe_speed.py cell in an empty compile cache,
its wall-clock, time to the first optimizer step and that step's compilation and capture.

Two checkouts (or two settings) run one after the other on the same machine give an A/B of what
start-up costs, without the transformers side recipe_speed.py adds. On the GPU machine:

    python3 bench/cold_start.py --shared .gpu_shared --cell flan-t5-base/lora --steps 200 --label dynamic-false --out cold.jsonl

Each run appends one JSON line to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_speed import SHARED, log_every_for, recipe, run_flantune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(SHARED), help="folder holding assets/ and data/sciq/")
    parser.add_argument("--cell", default="flan-t5-base/lora", help="model/method, as recipe_speed.py names cells")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--label", default="run", help="a name for this run in --out")
    parser.add_argument("--out", default="cold_start.jsonl")
    args = parser.parse_args()
    model, method = args.cell.split("/")
    work = Path(tempfile.mkdtemp(prefix="cold-start-"))
    cache = work / "inductor"
    cache.mkdir()
    spec = recipe(Path(args.shared).resolve(), model, method, args.steps, args.batch, log_every_for(args.steps))
    ran = run_flantune(spec, work, args.label, cache)
    row = {"label": args.label, "cell": args.cell, "steps": args.steps, "wall_s": ran.wall_s,
           "tokens_per_s": ran.tokens_per_s, "first_step_s": ran.first_step_s, "startup": ran.details.get("startup"),
           "peak_memory_gib": ran.peak_memory_gib}  # fmt: skip
    print(json.dumps(row), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
