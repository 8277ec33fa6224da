"""Throughput of one GRPO step (`flantune rl`) on random weights of a published FLAN-T5 shape.

Runs the real RL loop on SciQ prompts in the think/answer format: sampling G completions per
prompt, rewards, reference log-probabilities and the inner optimizer steps; reports prompts/s
and completions/s per step (median over the steps after the first) and where a step's time goes:
sampling, rewards (decoding the texts included), the reference pass (packing included),
the inner steps (flantune.rl records each phase between CUDA synchronizations).
Random weights rarely emit EOS, so completions run to max_new_tokens: the figures are for the
longest completions the setting allows. --decoders transformers,engine runs each case twice: the
same command sampling with transformers' generate (the decoder it used before the engine;
bench/_decoders.py) and with flantune's engine, and prints the ratio of prompts/s.

    python bench/rl_step.py --shared ../shared --out rl.json [--shape flan-t5-base] [--steps 6]
        [--methods lora,full] [--decoders engine] [--separate] [--micro-batch-sizes 64,128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _decoders import decoder

from flantune.config import recipe_from_dict
from flantune.rl import run_rl


def run_case(
    shared: Path, shape: str, method: str, steps: int, prompts: int, group: int, new_tokens: int,
    decoder_name: str = "engine", micro_batch: int | None = None,
) -> dict:
    with tempfile.TemporaryDirectory() as out:
        recipe = recipe_from_dict({
            "model": {"path": str(shared / "assets" / shape), "init": "random",
                      "add_tokens": ["<think>", "</think>", "<answer>", "</answer>"]},
            "method": {"kind": method, "r": 16, "alpha": 32, "target_modules": ["q", "v"]},
            "data": {"task": "sciq_think", "train": {"path": str(shared / "data/sciq/valid.json"), "rows": "0:800"},
                     "max_source_tokens": 256, "max_target_tokens": 96, "overlong": "truncate"},
            "rl": {"seed": 0, "precision": "auto", "max_steps": steps, "prompts_per_step": prompts, "group_size": group, "inner_steps": 2,
                   "lr": 1e-5, "beta": 0.04, "max_new_tokens": new_tokens, "eval_every": None, "save_every": None,
                   "rewards": [{"name": "correct"}, {"name": "format", "weight": 0.2}],
                   **({"micro_batch_size": micro_batch} if micro_batch else {})},
            "output_dir": out,
        })  # fmt: skip
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        with decoder(decoder_name):
            run_rl(recipe)
        log = [json.loads(x) for x in (Path(out) / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps_log = [r for r in log if "reward" in r][1:]  # the first step includes warm-up
    med = lambda key: statistics.median(r[key] for r in steps_log)  # noqa: E731
    return {
        "shape": shape, "method": method, "decoder": decoder_name, "prompts_per_step": prompts, "group_size": group,
        "micro_batch_size": recipe.rl.micro_batch_size,
        "max_new_tokens": new_tokens, "prompts_per_s": med("prompts_per_s"),
        "completions_per_s": med("completions_per_s"), "step_seconds": med("step_seconds"),
        "generate_seconds": med("generate_seconds"), "rewards_seconds": med("rewards_seconds"),
        "logprob_seconds": med("logprob_seconds"), "update_seconds": med("update_seconds"),
        "completion_tokens": med("completion_tokens"),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip


def separate_case(args, method: str, name: str, micro_batch: int | None = None) -> dict:
    """run_case in a fresh interpreter (this script with one method and one decoder)."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        command = [sys.executable, __file__, "--shared", args.shared, "--out", str(out), "--shape", args.shape,
                   "--methods", method, "--decoders", name, "--steps", str(args.steps), "--prompts",
                   str(args.prompts), "--group", str(args.group), "--max-new-tokens", str(args.max_new_tokens),
                   *(["--micro-batch-sizes", str(micro_batch)] if micro_batch else [])]  # fmt: skip
        subprocess.run(command, check=True)
        (result,) = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--out", default="rl.json")
    parser.add_argument("--shape", default="flan-t5-base")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--decoders", default="engine", help="engine, engine-compiled, engine-layers, engine-hf-step, transformers (comma-separated)")
    parser.add_argument("--separate", action="store_true",
                        help="each (method, decoder) case in a process of its own: no case finds what an "
                             "earlier one compiled (dynamo's caches, the training passes' recompilations)")
    parser.add_argument("--micro-batch-sizes", default=None,
                        help="rl.micro_batch_size of each case, comma-separated (completions per forward and "
                             "backward pass); default: the recipe's default")
    args = parser.parse_args()
    micro_batches = [int(m) for m in args.micro_batch_sizes.split(",")] if args.micro_batch_sizes else [None]
    results = []
    for method in args.methods.split(","):
        by_decoder = {}
        for name in args.decoders.split(","):
            for micro in micro_batches:
                if args.separate:
                    r = separate_case(args, method, name, micro)
                else:
                    r = run_case(Path(args.shared), args.shape, method, args.steps, args.prompts, args.group,
                                 args.max_new_tokens, name, micro)  # fmt: skip
                print(json.dumps(r), flush=True)
                results.append(r)
                by_decoder[name] = r
        if {"engine", "transformers"} <= set(by_decoder):
            ratio = by_decoder["engine"]["prompts_per_s"] / by_decoder["transformers"]["prompts_per_s"]
            print(f"{method}: engine {by_decoder['engine']['prompts_per_s']:.1f} prompts/s, transformers "
                  f"{by_decoder['transformers']['prompts_per_s']:.1f}: {ratio:.2f}x", flush=True)  # fmt: skip
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
