"""Generation speed: transformers' generate (dynamic cache; static cache + torch.compile) against
flantune's decoding engine, one process, one GPU, the same batches and settings for every side.

Sides:
- hf-default: `model.generate` as transformers ships it (its default dynamic cache, no compile).
- hf-static: `model.generate` with `cache_implementation="static"` and a compiled forward.
  --static-recipe docs (default) follows transformers' "Optimizing inference" guide (llm_optims,
  "Static kv-cache and torch.compile", option 1 "cache_implementation"; v5 docs/source/en/llm_optims.md):
  `model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)` and
  `cache_implementation="static"` on the generate call, nothing else. (On a CUDA device transformers
  v5's generate also wraps the decoding steps in its own torch.compile of `model.__call__` whenever
  the cache is static; under this recipe that happens too, exactly as for a user following the guide.)
  --static-recipe generate: no manual compile, only generate's own v5 path: `cache_implementation=
  "static"` with `compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead")`, which
  compiles the decoding steps (not the prefill). --no-compile: the static cache without any
  compilation (the CPU check; generate's own compile is switched off with `disable_compile=True`).
  torch._dynamo is reset before each hf-static cell, so each cell's compile time is its own.
- engine: flantune's own decoding engine (`flantune.engine`, imported lazily in `engine_side`);
  where that module does not exist the side is recorded as "not available" and the run goes on.
- engine-compiled: the engine with its experimental `COMPILE_STEP` (the decode step compiled by
  torch.compile before capture; off by default in the product until this side shows it pays);
  torch._dynamo is reset first, so its warm-up includes its compilation.
- engine-packed: the engine as a caller with much work calls it (`packed_encoder=True`): for T5 in
  16-bit on a GPU, batches of engine.PACKED_MIN_TOKENS padded source tokens and more run the encoder
  packed with FlexAttention (its block compiled in the first call, the side's warm-up). A plain call
  (engine) takes FlexAttention only once the block is compiled in the process, and until then the
  packed encoder with SDPA, uncompiled (engine.PACKED_ENCODER "auto"); each engine side starts as a
  fresh process would.
- engine-packed-compiled: engine-packed with the step compiled (COMPILE_STEP), torch._dynamo reset
  first as for engine-compiled.
- engine-padded: the engine with transformers' encoder over the padded sources
  (`flantune.engine.PACKED_ENCODER = "off"`).
- engine-unfused: the engine with transformers' own T5 norms and activations
  (`flantune.engine.FUSED_LAYERS = False`; the engine runs torch's fused kernels for them on CUDA).
- engine-hf-step: the engine over transformers' T5 decode step (`flantune.t5_decode.OWN_STEP` off;
  the engine's own written-out T5 step is its default): what that step changes, in the same run.
- engine-copied-cross: the engine with a copy of each source's cross-attention keys/values per
  sample or beam (`flantune.engine.SHARE_CROSS` off; shared is the default): what sharing changes.
- engine-packed-cross: the engine with T5's cross-attention over the sources packed without padding
  (`flantune.t5_decode.PACKED_CROSS`, torch's variable-length flash attention; off by default).
- engine-unstacked: the engine with each layer's q, k, v and wi_0, wi_1 products run apart
  (`flantune.t5_decode.FUSE_PROJECTIONS` "0"; stacked is the default on CUDA).
- engine-unfused-residuals: the engine with each layer's o, cross o and wo products added to the
  residual after them, not into it (`flantune.t5_decode.FUSE_RESIDUALS` off; on is the default).
- engine-sdpa-attention: the engine with T5's decode attentions through torch's SDPA
  (`flantune.decode_attention.DECODE_ATTENTION` "sdpa"; its Triton kernels are the default on CUDA).
- engine-layers: the engine with its own T5 step's layer compiled once for every layer before
  capture (`flantune.engine.COMPILE_LAYERS`); torch._dynamo reset first, so its warm-up includes
  the compilation. engine-packed-layers: the same with `packed_encoder=True`.
- engine-keyed (sampling cells): the engine sampling as `flantune rl` samples (flantune.decoding's
  KeyedSampling: each row's Gumbel noise keyed by its id, the cell's temperature/top-k/top-p applied
  by it), to set RL's sampling beside the engine's plain sampling on the same batch.

Cells (--cells): greedy-32 (batch 32 greedy), greedy-128 (batch 128 greedy), sample-16x8 (16 prompts
x 8 samples: do_sample, temperature 1.0, top_p 1.0, top_k 0 so that no top-k cut applies,
num_return_sequences 8), beam-8x4 (batch 8, 4 beams). Every call is forced to exactly --new-tokens
new tokens (min_new_tokens = max_new_tokens, 64): random weights rarely emit EOS, and a forced
length keeps every side at the same amount of work. Models (--models): flan-t5-base, flan-t5-large
(flan-t5-small for quick checks): random weights of the published shapes from
<shared>/assets/<name>, built as flantune's `init: random` builds them (flantune.models.load_model:
seed 0, FLAN-T5's lm_head untied), bf16 weights on a GPU, float32 on the CPU, the attention
implementation the model gets by default (--attn to set one; recorded). Sources: SciQ validation
rows through flantune's sciq task and the T5 tokenizer (flantune.data.load_splits, support
paragraph included, sources cut to 512 tokens), the first rows of the file, one batch per cell
(rows 0..batch-1), right-padded to the batch's longest source.

What is timed, per side per cell (torch.cuda.synchronize before and after every timed call):
- warmup_s: the first generate call on the cell's batch (compilation included), reported apart.
  A second, untimed call follows (CUDA graphs under reduce-overhead are recorded on a later call).
- wall_s: the median over --repeats (3) timed generate calls of the full --new-tokens.
- ttft_s: time to first token: the median over --repeats timed calls with max_new_tokens=1 on the
  same batch (after one untimed such call); it holds the encoder and the first decoder step.
  Under --static-recipe docs the prefill runs through the compiled forward too; under generate it
  runs eager (transformers compiles only the decoding steps).
- ms_per_step: (wall_s - ttft_s) / (new_tokens - 1) in milliseconds (a difference of two medians
  of separate calls: on a busy CPU with a few new tokens it can even come out negative).
- tokens_per_s: output sequences x new tokens / wall_s (sequences: batch rows, x8 when sampling).
- ttft_profile (--profile-ttft): one more max_new_tokens=1 call under torch.profiler: the engine's
  named ranges (encoder; load: the cross-attention keys and values), the operators with the most
  self time on the GPU and on the CPU, and the operator count (host-bound or GPU-bound).
- step_kernels (--kernels SIDES): one more full call of each named side under torch.profiler:
  GPU ms per decode step by kind of kernel, launches per step, the kernels with the most GPU time.
- peak_gib: CUDA peak allocated memory over the side's calls in the cell, the weights included
  (None on the CPU).
Ratios per cell (of tokens/s, > 1: the first side is faster): engine/hf-default,
engine/hf-static, hf-static/hf-default.
Correctness guard (greedy and beam cells): the fraction of output rows whose ids equal hf-default's
on the timed batch, per side (bf16 kernels may differ, so it is recorded and printed, not enforced).

    PYTHONPATH=src python bench/generate_speed.py --out generate.json [--shared ../shared]
        [--models flan-t5-base,flan-t5-large] [--cells greedy-32,greedy-128,sample-16x8,beam-8x4]
        [--sides hf-default,hf-static,engine] [--new-tokens 64] [--repeats 3]
        [--static-recipe docs|generate] [--no-compile] [--attn eager|sdpa] [--rows N] [--batch N]
        [--profile-ttft] [--kernels engine]

CPU check (tiny): --models flan-t5-small --cells greedy-32 --new-tokens 4 --repeats 1 --rows 8
--no-compile (--rows caps the rows read, so the batch; --batch sets every cell's prompts).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.metadata
import inspect
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODELS = ("flan-t5-base", "flan-t5-large")
SIDES = ("hf-default", "hf-static", "engine", "engine-compiled", "engine-packed", "engine-padded",
         "engine-packed-compiled", "engine-unfused", "engine-keyed", "engine-hf-step", "engine-layers",
         "engine-packed-layers", "engine-copied-cross", "engine-packed-cross", "engine-unstacked",
         "engine-unfused-residuals", "engine-sdpa-attention")
# name -> (prompts per batch, generation settings other than the lengths)
CELLS = {
    "greedy-32": (32, {"do_sample": False, "num_beams": 1}),
    "greedy-128": (128, {"do_sample": False, "num_beams": 1}),
    "sample-16x8": (
        16,
        {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "num_return_sequences": 8},
    ),
    "beam-8x4": (8, {"do_sample": False, "num_beams": 4}),
}
DETERMINISTIC = ("greedy-32", "greedy-128", "beam-8x4")


class NotAvailable(Exception):
    """A side that cannot run in this environment (e.g. flantune.engine not written yet)."""


# ---- data and model ---------------------------------------------------------------------------


def sciq_sources(shared: Path, rows: int) -> list[list[int]]:
    """Source ids of the first `rows` SciQ validation rows, through flantune's sciq task (the text
    flantune evaluates on: question, options and support), cut to 512 tokens."""
    from transformers import AutoTokenizer

    from flantune.config import recipe_from_dict
    from flantune.data import load_splits

    tokenizer = AutoTokenizer.from_pretrained(shared / "assets" / "flan-t5-base")
    recipe = recipe_from_dict({
        "model": {"path": str(shared / "assets" / "flan-t5-base")},
        "data": {"task": "sciq", "eval": {"path": str(shared / "data" / "sciq" / "valid.json"), "rows": f"0:{rows}"},
                 "max_source_tokens": 512, "max_target_tokens": 32, "overlong": "truncate"},
    })  # fmt: skip
    data = load_splits(recipe.data, tokenizer, roles=("eval",))["eval"].dataset
    return [list(ids) for ids in data["input_ids"]]


def padded(sources: list[list[int]], device) -> dict:
    """Right-padded input_ids (pad 0, T5's pad id) and attention_mask."""
    ids = torch.zeros(len(sources), max(map(len, sources)), dtype=torch.long)
    for r, s in enumerate(sources):
        ids[r, : len(s)] = torch.tensor(s)
    return {"input_ids": ids.to(device), "attention_mask": (ids != 0).long().to(device)}


def build_model(shared: Path, name: str, device: str, attn: str | None):
    from flantune.models import heads_are_tied, load_model

    dtype = "bfloat16" if device == "cuda" else "float32"
    model = load_model(str(shared / "assets" / name), init="random", dtype=dtype, seed=0)
    if attn:
        model.set_attn_implementation(attn)
    model.to(device).eval()
    facts = {"dtype": dtype, "attn_implementation": model.config._attn_implementation,
             "lm_head_tied": heads_are_tied(model)}  # fmt: skip
    return model, facts


# ---- sides: each is f(model, batch, settings) -> ids in model.generate's layout -------------------


def hf_default_side(model, batch: dict, settings: dict) -> torch.Tensor:
    return model.generate(**batch, **settings)


def make_hf_static_side(model, recipe: str, compile_: bool) -> tuple[Callable, str]:
    """The hf-static call and a line saying what it is. `model.forward` is restored by `undo_static`."""
    from transformers import CompileConfig

    extra: dict = {"cache_implementation": "static"}
    if not compile_:
        extra["disable_compile"] = True
        what = "static cache, no compile (--no-compile; generate's own compile disabled)"
    elif recipe == "docs":
        model._eager_forward = model.forward
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        what = ('static cache + model.forward = torch.compile(model.forward, mode="reduce-overhead", '
                "fullgraph=True) (transformers docs, llm_optims)")  # fmt: skip
    else:
        extra["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
        what = (
            'static cache + generate\'s own compile (CompileConfig(fullgraph=True, mode="reduce-overhead"))'
        )
    if model.device.type != "cuda" and compile_ and recipe == "generate":
        extra["compile_config"]._compile_all_devices = True  # generate compiles on CUDA only otherwise

    def side(model, batch: dict, settings: dict) -> torch.Tensor:
        return model.generate(**batch, **settings, **extra)

    return side, what


def undo_static(model) -> None:
    if hasattr(model, "_eager_forward"):
        model.forward = model._eager_forward
        del model._eager_forward
    for attr in ("_compiled_call", "_last_compile_config", "_cache"):
        if hasattr(model, attr):
            delattr(model, attr)
    torch._dynamo.reset()


def engine_side(model, batch: dict, settings: dict, after: list | None = None) -> torch.Tensor:
    """flantune's decoding engine (`flantune.engine.generate`), given model.generate's settings:
    min_new_tokens becomes transformers' MinNewTokensLengthLogitsProcessor (as generate builds it),
    the ids come back in generate's layout (`Generation.sequences`)."""
    try:
        engine = importlib.import_module("flantune.engine")
    except ModuleNotFoundError as e:
        if e.name in ("flantune.engine", "flantune"):
            raise NotAvailable("flantune.engine is not in this checkout") from None
        raise
    settings = dict(settings)
    extra = []
    minimum = settings.pop("min_new_tokens", None)
    if minimum:
        from transformers import MinNewTokensLengthLogitsProcessor

        eos = model.generation_config.eos_token_id
        extra.append(MinNewTokensLengthLogitsProcessor(1, minimum, eos, device=batch["input_ids"].device))  # the prompt: the start token
    extra += after or []  # processors that come last (keyed sampling)
    known = set(inspect.signature(engine.generate).parameters)
    unknown = sorted(set(settings) - known)
    if unknown:
        raise NotAvailable(f"the engine does not take {unknown}")
    out = engine.generate(
        model, batch["input_ids"], batch["attention_mask"], logits_processor=extra, **settings
    )
    return out.sequences


def keyed_engine_side(model, batch: dict, settings: dict) -> torch.Tensor:
    """engine_side sampling as flantune rl does: KeyedSampling (after the forced length) with the
    cell's temperature, top-k and top-p; the engine adds no filters of its own."""
    if not settings.get("do_sample"):
        raise NotAvailable("keyed sampling is RL's sampling: sampling cells only")
    from flantune.decoding import KeyedSampling, row_keys

    settings = dict(settings)
    rows = batch["input_ids"].shape[0] * settings.get("num_return_sequences", 1)
    keyed = KeyedSampling(row_keys(0, torch.arange(rows, device=batch["input_ids"].device)),
                          temperature=settings.pop("temperature", 1.0), top_p=settings.pop("top_p", 1.0),
                          top_k=settings.pop("top_k", 0))  # fmt: skip
    return engine_side(model, batch, settings, after=[keyed])


def setting_side(module: str, name: str, value, **options) -> Callable:
    """engine_side with `module.name` set to `value` for the call and restored after it, and the
    engine options `options` added to the cell's settings."""

    def side(model, batch: dict, settings: dict) -> torch.Tensor:
        where = importlib.import_module(module)
        before = getattr(where, name)
        setattr(where, name, value)
        try:
            return engine_side(model, batch, {**settings, **options})
        finally:
            setattr(where, name, before)

    return side


# The engine sides that differ from `engine` by one setting (the module docstring says what each
# measures). engine-packed: as a caller with much work calls it (`packed_encoder=True`: RL's
# rollouts; `flantune generate` over PACKED_PAYS_TOKENS padded tokens and more).
compiled_engine_side = setting_side("flantune.engine", "COMPILE_STEP", True)
packed_compiled_engine_side = setting_side("flantune.engine", "COMPILE_STEP", True, packed_encoder=True)
padded_engine_side = setting_side("flantune.engine", "PACKED_ENCODER", "off")
unfused_engine_side = setting_side("flantune.engine", "FUSED_LAYERS", False)
hf_step_engine_side = setting_side("flantune.t5_decode", "OWN_STEP", False)
copied_cross_engine_side = setting_side("flantune.engine", "SHARE_CROSS", False)
layers_engine_side = setting_side("flantune.engine", "COMPILE_LAYERS", True)
packed_layers_engine_side = setting_side("flantune.engine", "COMPILE_LAYERS", True, packed_encoder=True)
packed_cross_engine_side = setting_side("flantune.t5_decode", "PACKED_CROSS", True)
unstacked_engine_side = setting_side("flantune.t5_decode", "FUSE_PROJECTIONS", "0")
unfused_residuals_engine_side = setting_side("flantune.t5_decode", "FUSE_RESIDUALS", False)
sdpa_attention_engine_side = setting_side("flantune.decode_attention", "DECODE_ATTENTION", "sdpa")


def packed_engine_side(model, batch: dict, settings: dict) -> torch.Tensor:
    return engine_side(model, batch, {**settings, "packed_encoder": True})


# ---- timing -----------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_call(side, model, batch, settings, device) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)  # the same sampling seed for every call (sides draw differently anyway)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        ids = side(model, batch, settings)
    sync(device)
    return time.perf_counter() - start, ids


def ttft_profile(side, model, batch, first: dict, device: str, top: int = 15) -> dict:
    """One more max_new_tokens=1 call under torch.profiler: its wall time, the engine's named
    ranges (flantune.engine.encoder, .load; CPU and GPU milliseconds), and the operators with the
    most self time on the GPU and on the CPU, to say where the time to the first token goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        wall, _ = timed_call(side, model, batch, first, device)
    events = prof.key_averages()

    def device_ms(e, own: bool) -> float:
        name = ("self_" if own else "") + "device_time_total"
        legacy = ("self_" if own else "") + "cuda_time_total"
        return getattr(e, name, getattr(e, legacy, 0.0)) / 1000

    def row(e) -> dict:
        return {"op": e.key[:100], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000,
                "self_gpu_ms": device_ms(e, True)}  # fmt: skip

    ranges = {e.key: {"cpu_ms": e.cpu_time_total / 1000, "gpu_ms": device_ms(e, False)}
              for e in events if e.key.startswith("flantune.")}  # fmt: skip
    return {
        "wall_ms": wall * 1000,
        "ranges": ranges,
        "top_gpu": [row(e) for e in sorted(events, key=lambda e: -device_ms(e, True))[:top]],
        "top_cpu": [row(e) for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]],
        "operator_calls": sum(e.count for e in events),
    }


# Kinds of decode-step kernels, first match of a substring of the (lower-cased) kernel name wins.
STEP_KERNEL_KINDS = (
    ("attention", ("fmha", "flash", "attention", "cudnn", "self_kernel", "cross_kernel")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
    ("fused elementwise (triton)", ("triton_",)),
    ("sort / top-k / sampling", ("sort", "topk", "radix", "multinomial", "cumsum", "scan")),
    ("reduction", ("reduce",)),
    ("copy / index", ("copy", "index", "gather", "scatter", "cat")),
    ("elementwise", ("elementwise", "vectorized")),
)


def annotation(event) -> bool:
    """Whether a profiler event on the GPU is a named range (record_function: the engine's
    flantune.engine.encoder and .load), whose time is its kernels', counted again: not a kernel."""
    return bool(getattr(event, "is_user_annotation", False)) or event.key.startswith("flantune.")


def step_kernels(side, model, batch, settings, new_tokens: int, device: str, top: int = 30) -> dict:
    """One more full call under torch.profiler: GPU milliseconds per decode step by kind of kernel
    (STEP_KERNEL_KINDS) and the `top` kernels with their launches per step. CUPTI reports the
    kernels of replayed CUDA graphs one by one. The call's encoder and set-up are in the totals, so
    the per-step figures are the call's GPU time divided by its steps (the steps dominate at 64)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = timed_call(side, model, batch, settings, device)
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and not annotation(e)]
    kinds: dict[str, float] = {}
    for event in kernels:
        kind = next((k for k, keys in STEP_KERNEL_KINDS if any(x in event.key.lower() for x in keys)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_device_time_total / 1000 / new_tokens
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {
        "wall_ms": round(1000 * wall, 2),
        "gpu_ms_per_step": round(sum(kinds.values()), 4),
        "launches_per_step": round(sum(e.count for e in kernels) / new_tokens, 1),
        "gpu_ms_per_step_by_kind": {k: round(v, 4) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"kernel": e.key[:140], "per_step": round(e.count / new_tokens, 2),
                         "gpu_ms_per_step": round(e.self_device_time_total / 1000 / new_tokens, 4)}
                        for e in ranked],
    }  # fmt: skip


def run_side(side, model, batch, settings, new_tokens: int, repeats: int, device: str,
             profile: bool = False, kernels: bool = False) -> dict:  # fmt: skip
    """Warm-up call (timed apart), an untimed call, `repeats` timed full calls, one untimed and
    `repeats` timed max_new_tokens=1 calls; figures from the medians. `profile`: one more
    max_new_tokens=1 call under torch.profiler (`ttft_profile`); `kernels`: one more full call under
    it (`step_kernels`)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, _ = timed_call(side, model, batch, settings, device)
    timed_call(side, model, batch, settings, device)
    walls, ids = [], None
    for _ in range(repeats):
        wall, ids = timed_call(side, model, batch, settings, device)
        walls.append(wall)
    first = settings | {"max_new_tokens": 1, "min_new_tokens": 1}
    timed_call(side, model, batch, first, device)
    ttfts = [timed_call(side, model, batch, first, device)[0] for _ in range(repeats)]
    wall, ttft = statistics.median(walls), statistics.median(ttfts)
    sequences = ids.shape[0]
    profiled = {"ttft_profile": ttft_profile(side, model, batch, first, device)} if profile else {}
    if kernels:
        profiled["step_kernels"] = step_kernels(side, model, batch, settings, new_tokens, device)
    return {
        **profiled,
        "status": "ran", "warmup_s": warmup, "wall_s": wall, "ttft_s": ttft,
        "ms_per_step": 1000 * (wall - ttft) / (new_tokens - 1) if new_tokens > 1 else None,
        "tokens_per_s": sequences * new_tokens / wall, "sequences": sequences,
        "new_tokens_out": ids.shape[1] - 1, "walls_s": walls, "ttfts_s": ttfts,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "_ids": ids,
    }  # fmt: skip


def rows_equal(ids: torch.Tensor, ref: torch.Tensor) -> float:
    """The fraction of rows of `ids` equal to `ref`'s (0 when the shapes differ)."""
    if ids.shape != ref.shape:
        return 0.0
    return (ids.cpu() == ref.cpu()).all(dim=1).float().mean().item()


def run_cell(model, sources, cell: str, args, device: str) -> dict:
    prompts, options = CELLS[cell]
    prompts = min(args.batch or prompts, len(sources))
    batch = padded(sources[:prompts], device)
    settings = options | {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    result = {"cell": cell, "prompts": prompts, "source_len": batch["input_ids"].shape[1],
              "real_source_tokens": int(batch["attention_mask"].sum()), "settings": settings, "sides": {}}  # fmt: skip
    for name in args.sides:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        what = None
        try:
            if name == "hf-default":
                side = hf_default_side
            elif name == "hf-static":
                side, what = make_hf_static_side(model, args.static_recipe, not args.no_compile)
            elif name in ("engine-compiled", "engine-packed-compiled", "engine-layers", "engine-packed-layers"):
                side = {"engine-compiled": compiled_engine_side, "engine-packed-compiled": packed_compiled_engine_side,
                        "engine-layers": layers_engine_side, "engine-packed-layers": packed_layers_engine_side}[name]  # fmt: skip
                # No step captured or compiled by an earlier side: this side's warm-up pays for both.
                importlib.import_module("flantune.engine").clear_graphs()
                importlib.import_module("flantune.t5_decode")._COMPILED = None
                torch._dynamo.reset()
            else:
                side = {"engine-padded": padded_engine_side, "engine-packed": packed_engine_side,
                        "engine-unfused": unfused_engine_side, "engine-keyed": keyed_engine_side,
                        "engine-hf-step": hf_step_engine_side,
                        "engine-copied-cross": copied_cross_engine_side,
                        "engine-packed-cross": packed_cross_engine_side,
                        "engine-unstacked": unstacked_engine_side,
                        "engine-unfused-residuals": unfused_residuals_engine_side,
                        "engine-sdpa-attention": sdpa_attention_engine_side}.get(name, engine_side)  # fmt: skip
                engine = importlib.import_module("flantune.engine")
                engine.clear_graphs()
                # As in a fresh process: a block an earlier side compiled does not make this side packed.
                engine._PACKED_COMPILED.clear()
            figures = run_side(side, model, batch, settings, args.new_tokens, args.repeats, device,
                               args.profile_ttft, name in args.kernels.split(","))
        except NotAvailable as e:
            figures = {"status": "not available", "why": str(e)}
        except Exception as e:  # a side that fails is recorded, the run goes on
            figures = {"status": "failed", "why": f"{type(e).__name__}: {e}"[:2000]}
        finally:
            if name == "hf-static":
                undo_static(model)
        if what:
            figures["recipe"] = what
        result["sides"][name] = figures
    ref = result["sides"].get("hf-default", {}).get("_ids")
    for name, figures in result["sides"].items():
        ids = figures.pop("_ids", None)
        if cell in DETERMINISTIC and ref is not None and ids is not None and name != "hf-default":
            figures["rows_equal_hf_default"] = rows_equal(ids, ref)
    speed = {n: f["tokens_per_s"] for n, f in result["sides"].items() if f.get("status") == "ran"}
    pairs = (("engine", "hf-default"), ("engine", "hf-static"), ("hf-static", "hf-default"),
             ("engine-compiled", "hf-default"), ("engine-compiled", "hf-static"), ("engine-compiled", "engine"), ("engine", "engine-padded"),
             ("engine-packed", "hf-default"), ("engine-packed", "engine-padded"),
             ("engine-packed-compiled", "hf-default"), ("engine-packed-compiled", "engine-packed"),
             ("engine", "engine-unfused"), ("engine", "engine-hf-step"), ("engine-layers", "hf-default"),
             ("engine-layers", "hf-static"), ("engine-layers", "engine"), ("engine-packed-layers", "hf-default"),
             ("engine-packed-layers", "hf-static"), ("engine-packed-layers", "engine-packed-compiled"),
             ("engine", "engine-copied-cross"), ("engine-packed-cross", "engine"),
             ("engine-packed-cross", "hf-default"), ("engine-packed-cross", "hf-static"), ("engine", "engine-unstacked"),
             ("engine", "engine-unfused-residuals"), ("engine", "engine-sdpa-attention"),
             ("engine-sdpa-attention", "hf-default"))
    result["ratios"] = {f"{a}/{b}": speed[a] / speed[b] for a, b in pairs if a in speed and b in speed}
    return result


def report_line(model_name: str, r: dict) -> str:
    parts = [f"{model_name} {r['cell']} ({r['prompts']} prompts, sources padded to {r['source_len']})"]
    for name, f in r["sides"].items():
        if f.get("status") != "ran":
            parts.append(f"  {name}: {f['status']} ({f.get('why', '')})")
            continue
        step = f"{f['ms_per_step']:.2f} ms/step" if f["ms_per_step"] is not None else "- ms/step"
        line = (f"  {name}: {step}, {f['tokens_per_s']:.0f} tok/s, ttft {1000 * f['ttft_s']:.1f} ms, "
                f"warm-up {f['warmup_s']:.1f} s")  # fmt: skip
        if f["peak_gib"] is not None:
            line += f", peak {f['peak_gib']:.2f} GiB"
        if "rows_equal_hf_default" in f:
            line += f", rows equal to hf-default {f['rows_equal_hf_default']:.2f}"
        parts.append(line)
        if "step_kernels" in f:
            k = f["step_kernels"]
            parts.append(f"    kernels: {k['gpu_ms_per_step']:.3f} GPU ms/step, {k['launches_per_step']} launches/step; "
                         + ", ".join(f"{kind} {ms:.3f}" for kind, ms in k["gpu_ms_per_step_by_kind"].items()))
            parts.extend(f"      {t['gpu_ms_per_step']:.4f} ms x{t['per_step']} {t['kernel']}" for t in k["top_kernels"])
    if r["ratios"]:
        parts.append("  ratios (tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    return "\n".join(parts)


def environment(device: str) -> dict:
    versions = {p: importlib.metadata.version(p) for p in ("torch", "transformers")}
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "versions": versions | {"python": platform.python_version(), "cuda": torch.version.cuda},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--out", default="generate.json")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--cells", default=",".join(CELLS))
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--static-recipe", choices=("docs", "generate"), default="docs")
    parser.add_argument("--no-compile", action="store_true", help="hf-static: static cache without compile")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default=None)
    parser.add_argument("--rows", type=int, default=128, help="SciQ rows read (caps every cell's batch)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per cell, for quick checks")
    parser.add_argument("--profile-ttft", action="store_true",
                        help="profile one more time-to-first-token call per side (ttft_profile in --out)")
    parser.add_argument("--kernels", default="",
                        help="comma-separated sides: one more full call of each under torch.profiler, GPU ms per "
                             "step by kind of kernel and the top kernels (step_kernels in --out, printed)")
    args = parser.parse_args()
    args.sides = args.sides.split(",")
    cells = args.cells.split(",")
    for name in args.sides:
        if name not in SIDES:
            parser.error(f"--sides: unknown side {name!r}; choose from {', '.join(SIDES)}")
    for cell in cells:
        if cell not in CELLS:
            parser.error(f"--cells: unknown cell {cell!r}; choose from {', '.join(CELLS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shared = Path(args.shared)
    sources = sciq_sources(shared, args.rows)
    out = {"environment": environment(device), "new_tokens": args.new_tokens, "repeats": args.repeats,
           "static_recipe": "none (--no-compile)" if args.no_compile else args.static_recipe,
           "rows": len(sources), "models": []}  # fmt: skip
    start = time.perf_counter()
    for name in args.models.split(","):
        model, facts = build_model(shared, name, device, args.attn)
        entry = {"model": name, **facts, "cells": []}
        out["models"].append(entry)
        for cell in cells:
            r = run_cell(model, sources, cell, args, device)
            print(report_line(name, r), flush=True)
            entry["cells"].append(r)
            Path(args.out).write_text(json.dumps(out, indent=2))  # written after every cell
        del model
        gc.collect()
    out["total_s"] = time.perf_counter() - start
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out} ({out['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
