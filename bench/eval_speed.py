"""`flantune eval` wall time: the command's own function (flantune.evaluate.run_eval) on SciQ rows,
decoding with flantune's engine against the same command decoding with transformers' generate
(default dynamic cache, as the command did before the engine; bench/_decoders.py), one process.

The model is a random-weight flan-t5-base (the published shape, from <shared>/assets, built as
flantune's `init: random` builds it) saved as a model folder, evaluated as a user evaluates one:
the sciq task with its support paragraph, sources cut at 512 tokens, the recipe's generation
settings (greedy, max_new_tokens 32 unless --max-new-tokens), eval.batch_size as the recipe's default
("auto": flantune.decoding.auto_rows) unless a decoder is named with its own, e.g. `transformers:32`
(the command as it ran before the engine, when eval.batch_size defaulted to 32), the first --rows
rows of SciQ's validation file. Random weights rarely emit EOS, so outputs run to the cap: the wall
time is for the longest outputs the setting allows. What is timed: run_eval from the call to its
return (loading the model folder, tokenizing, generating, scoring, writing the report), per
decoder; each decoder runs once untimed first (CUDA context, kernels chosen, graphs captured), then
--repeats timed runs (median). The share of predictions equal between the two decoders is printed.

    PYTHONPATH=src python bench/eval_speed.py --shared ../shared --out eval.json [--rows 1000]
        [--decoders transformers:32,transformers,engine]
        [--shape flan-t5-base] [--max-new-tokens 32] [--repeats 2] [--dtype bfloat16] [--profile] [--kernels engine]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _decoders import decoder

from flantune.config import recipe_from_dict
from flantune.evaluate import run_eval
from flantune.models import load_model, load_tokenizer


def model_folder(shared: Path, shape: str, folder: Path) -> Path:
    path = str(shared / "assets" / shape)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(0)
    model = load_model(path, init="random", tokenizer=tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# What run_eval spends its time in: (module, attribute) of the calls timed, by a label. Each is wrapped
# for one run with a timer that synchronizes CUDA at its start and end, so a part's seconds include
# the GPU work it launched (cProfile cannot say that: kernels run after their Python calls return).
# Nested parts ("decoding" holds "encoder" and "step captures") are not added up.
PARTS = {
    "load model": ("flantune.evaluate", "load_final"),
    "load and tokenize rows": ("flantune.evaluate", "load_split"),
    "score_split (generate + metrics)": ("flantune.evaluate", "score_split"),
    "decoding (engine or transformers)": ("flantune.engine", "generate"),
    "encoder (engine)": ("flantune.engine", "_encode"),
    "decode step captures (engine)": ("flantune.engine._GraphedDecoder", "_capture"),
    "graph recordings (engine: steps and encoders)": ("flantune.engine", "_record"),
    "metrics": ("flantune.scoring", "compute_metrics"),
    "report and figures": ("flantune.figures", "draw_report"),
}


def timed_parts(recipe, folder: Path, out: Path, dtype: str) -> dict:
    """Seconds and calls of eval's parts (PARTS) in one more run of run_eval, each part timed between
    CUDA synchronizations; "total" is the run's wall time with the timers' synchronizations in it."""
    import importlib

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    seconds = {label: 0.0 for label in PARTS}
    calls = {label: 0 for label in PARTS}
    patched = []

    def timer(label, fn):
        def timed(*args, **kwargs):
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                seconds[label] += time.perf_counter() - start
                calls[label] += 1

        return timed

    for label, (module, name) in PARTS.items():
        path, _, cls = module.partition("._")  # a class of the module: "flantune.engine._GraphedDecoder"
        owner = importlib.import_module(path)
        owner = getattr(owner, "_" + cls) if cls else owner
        original = getattr(owner, name)
        patched.append((owner, name, original))
        setattr(owner, name, timer(label, original))
    try:
        sync()
        start = time.perf_counter()
        run_eval(recipe, str(folder), out=out, dtype=dtype)
        sync()
        total = time.perf_counter() - start
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return {"total": round(total, 3),
            **{label: {"s": round(seconds[label], 3), "calls": calls[label]} for label in PARTS}}  # fmt: skip


def kernel_profile(recipe, folder: Path, out: Path, dtype: str, top: int = 25) -> dict:
    """One more run of run_eval under torch.profiler: its wall time, the GPU time by kind of kernel
    (bench/train_speed.py's KERNEL_KINDS) and the `top` kernels by GPU self time with their counts.
    CUPTI reports the kernels of replayed CUDA graphs one by one, so the decode steps' kernels are
    in it. The profiler's own cost is in the wall time."""
    from generate_speed import annotation
    from torch.profiler import ProfilerActivity, profile
    from train_speed import KERNEL_KINDS

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        run_eval(recipe, str(folder), out=out, dtype=dtype)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
        wall = time.perf_counter() - start
    # Named ranges (flantune.engine.encoder, .load) are not kernels: their time is their kernels', again.
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and not annotation(e)]
    kinds: dict[str, float] = {}
    for event in kernels:
        kind = next((k for k, keys in KERNEL_KINDS if any(x in event.key.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1e6
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {
        "wall_s": round(wall, 3),
        "gpu_s": round(sum(kinds.values()), 3),
        "gpu_s_by_kind": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"kernel": e.key[:120], "calls": e.count, "gpu_s": round(e.self_device_time_total / 1e6, 4)}
                        for e in ranked],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--out", default="eval.json")
    parser.add_argument("--shape", default="flan-t5-base")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--decoders", default="transformers,engine",
                        help="comma-separated, each a decoder of bench/_decoders.py with an optional :rows "
                             "(eval.batch_size; none: the recipe's default)")
    parser.add_argument("--dtype", default="float32", help="flantune eval's --dtype (float32, bfloat16, float16)")
    parser.add_argument("--profile", action="store_true",
                        help="one more run per decoder with eval's parts timed between CUDA synchronizations "
                             "(loading, tokenizing, encoding, decoding, captures, scoring, the report) into the "
                             "result file")
    parser.add_argument("--kernels", default="",
                        help="comma-separated names among --decoders: one more run of each under torch.profiler, "
                             "GPU time by kind of kernel and the kernels with the most GPU time, into the result "
                             "file (transformers' side launches ~10^6 kernels: a slow trace)")
    args = parser.parse_args()
    shared = Path(args.shared).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(shared, args.shape, Path(tmp) / "model")
        recipe = recipe_from_dict({
            "model": {"path": str(folder)},
            "data": {"task": "sciq", "task_options": {"include_support": True},
                     "test": {"path": str(shared / "data/sciq/valid.json"), "rows": f"0:{args.rows}"},
                     "max_source_tokens": 512, "max_target_tokens": 32, "overlong": "truncate"},
            "eval": {"max_rows": args.rows},
            "generation": {"max_new_tokens": args.max_new_tokens, "num_beams": 1},
            "output_dir": str(Path(tmp) / "runs"),
        })  # fmt: skip
        results, predictions = {}, {}
        for name in args.decoders.split(","):
            kind, _, rows = name.partition(":")
            side = recipe if not rows else replace(recipe, eval=replace(recipe.eval, batch_size=int(rows)))
            times = []
            for i in range(1 + args.repeats):
                out = Path(tmp) / f"eval-{name}-{i}"
                with decoder(kind):
                    torch.cuda.synchronize() if torch.cuda.is_available() else None
                    start = time.perf_counter()
                    report = run_eval(side, str(folder), out=out, dtype=args.dtype)
                    torch.cuda.synchronize() if torch.cuda.is_available() else None
                    seconds = time.perf_counter() - start
                if i:
                    times.append(seconds)
                rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
                predictions[name] = [r["fine-tuned"]["prediction"] for r in rows]
                print(f"{name} run {i}: {seconds:.1f} s{' (untimed first run)' if not i else ''}", flush=True)
            wall = statistics.median(times)
            results[name] = {"wall_s": wall, "rows_per_s": report["rows"] / wall, "first_run_s": None}
            if args.profile:
                with decoder(kind):
                    results[name]["parts_s"] = timed_parts(side, folder, Path(tmp) / f"eval-{name}-profile",
                                                           args.dtype)
                print(f"{name} parts: {json.dumps(results[name]['parts_s'])}", flush=True)
            if name in args.kernels.split(","):
                with decoder(kind):
                    found = kernel_profile(side, folder, Path(tmp) / f"eval-{name}-kernels", args.dtype)
                results[name]["kernels"] = found
                print(f"{name} kernels: wall {found['wall_s']} s, GPU {found['gpu_s']} s, "
                      f"{json.dumps(found['gpu_s_by_kind'])}", flush=True)
                for row in found["top_kernels"][:12]:
                    print(f"  {row['gpu_s']:8.3f} s {row['calls']:7d}x {row['kernel']}", flush=True)
        names = list(results)
        summary = {
            "shape": args.shape, "rows": args.rows, "max_new_tokens": args.max_new_tokens, "dtype": args.dtype,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "results": results,
        }  # fmt: skip
        # Each decoder against the last one named (the engine, as the default order puts it).
        last = names[-1]
        summary["ratios_over_last"], summary["equal_predictions"] = {}, {}
        for name in names[:-1]:
            a, b = predictions[name], predictions[last]
            equal = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
            ratio = results[name]["wall_s"] / results[last]["wall_s"]
            summary["ratios_over_last"][name], summary["equal_predictions"][name] = ratio, equal
            print(f"{last} vs {name}: {ratio:.2f}x faster wall time; equal predictions {equal:.3f}")
    Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
