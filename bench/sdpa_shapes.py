"""What a new batch shape costs under each attention: bart-base forward + backward + fused AdamW
step, bf16 autocast over fp32 weights, 32 rows with padding (a mask), 29 target tokens, ten source
lengths drawn from 100-511 (seed 0), each length run twice (first pass: every shape new; second
pass: every shape seen). Backends: SDPA with torch's own choice ("sdpa"), SDPA without cuDNN
("sdpa-no-cudnn", what flantune's unpacked training runs: flantune.speed.unpacked_attention),
transformers' eager attention, and SDPA with sources padded to a multiple of 64 ("sdpa-pad64").
Prints per-step milliseconds and the attention kernels SDPA ran; writes them to --out.

    python3 bench/sdpa_shapes.py --shared ../shared --out sdpa_shapes.json
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from flantune.speed import unpacked_attention

IMPLEMENTATIONS = ("sdpa", "sdpa-no-cudnn", "eager", "sdpa-pad64")
ROWS, TARGET, PADDED_ROWS, PAD = 32, 29, 16, 37  # 16 rows end in 37 padding positions


def attention_kernels(model, ids, mask, labels) -> list[str]:
    """Names of the CUDA kernels of one forward + backward that look like attention."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", torch.bfloat16):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        torch.cuda.synchronize()
    keys = ("fmha", "attention", "cudnn", "flash", "sdpa", "mha")
    return sorted({e.name for e in prof.events() if any(k in e.name.lower() for k in keys)})


def run(config, impl: str, lengths: list[int]) -> dict:
    torch.manual_seed(0)
    attention = "eager" if impl == "eager" else "sdpa"
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attention).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times = []
    for _pass in range(2):
        for length in lengths:
            length = -(-length // 64) * 64 if impl == "sdpa-pad64" else length
            ids = torch.randint(5, 1000, (ROWS, length), device="cuda")  # (B, S)
            mask = torch.ones_like(ids)
            mask[:PADDED_ROWS, length - PAD :] = 0
            labels = torch.randint(5, 1000, (ROWS, TARGET), device="cuda")  # (B, T)
            torch.cuda.synchronize()
            start = time.perf_counter()
            chosen = unpacked_attention() if impl == "sdpa-no-cudnn" else contextlib.nullcontext()
            with chosen, torch.autocast("cuda", torch.bfloat16):
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            torch.cuda.synchronize()  # note: a sync point per step, to time it
            times.append(round((time.perf_counter() - start) * 1000, 1))
    result = {"first_pass_ms": times[: len(lengths)], "second_pass_ms": times[len(lengths) :]}
    if impl == "sdpa":
        result["kernels"] = attention_kernels(model, ids, mask, labels)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--out", default="sdpa_shapes.json")
    args = parser.parse_args()
    config = AutoConfig.from_pretrained(Path(args.shared) / "assets" / "bart-base")
    lengths = [int(x) for x in torch.randint(100, 512, (10,), generator=torch.Generator().manual_seed(0))]
    order = getattr(torch._C, "_get_sdp_priority_order", lambda: None)()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "sdp_priority_order": order, "lengths": lengths}  # fmt: skip
    print(json.dumps(out), flush=True)
    for impl in IMPLEMENTATIONS:
        out[impl] = run(config, impl, lengths)
        print(impl, json.dumps(out[impl]), flush=True)
        torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
