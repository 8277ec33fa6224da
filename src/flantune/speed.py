"""Which training path a run takes: packed rows, attention, compiled blocks, CUDA graphs.

`train.packing`, `train.attention`, `train.compile`, `train.cuda_graph` and `train.group_by_length`
default to `auto`. `resolve_speed` turns them into one `SpeedPlan` from the facts of the run (model
type, method, device, processes, FSDP, gradient checkpointing). It is a pure function of those
inputs, so every case is tested on a CPU. The rules, fastest first (docs/benchmarks.md, "Training
speed" and "Default path"):

- T5 family (t5, mt5, umt5) with a method that wraps linear layers (full, lora, qlora, ia3), on a
  GPU, not under FSDP: packed rows + FlexAttention with T5's bias in the kernel + compiled blocks;
  and, in one process, each micro-batch's forward + backward replayed as one CUDA graph (not with
  QLoRA, gradient checkpointing or train.compile=false).
- Everything else runs transformers' unpacked forward with length-grouped batches, so that no
  default path pads more than it must, and the model's own attention (sdpa where transformers has
  it), except T5-family models on a GPU, which run eager attention (3x sdpa's speed there). Its
  SDPA runs without the cuDNN backend (`unpacked_attention`): each new batch shape costs a plan.

An explicit `true` that cannot be honoured stays an error with its reason; an explicit `false` is
obeyed. The plan's `line()` is printed at start and its `as_dict()` is written to metrics.jsonl,
result.json and each checkpoint's recipe (a resume that would take another path is refused).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flantune.errors import TrainingError

PACKED_MODEL_TYPES = ("t5", "mt5", "umt5")
"""Model types whose packed forward flantune.fast_t5 runs (T5's relative bias restarts per pair)."""
PACKED_METHODS = ("full", "lora", "qlora", "ia3")
"""Methods the packed forward runs: those that wrap (or are) linear layers."""


@dataclass(frozen=True)
class RunFacts:
    """What the plan depends on besides the recipe's train section."""

    model_type: str
    method_kind: str
    cuda: bool
    processes: int = 1
    fsdp: bool = False


@dataclass(frozen=True)
class SpeedPlan:
    """The path a training run takes, and why each faster piece was left out."""

    packing: bool
    attention: str
    """Packed: flex or eager. Unpacked: auto (the model's own), eager or sdpa."""
    compile: bool
    cuda_graph: bool
    group_by_length: bool
    left_out: tuple[str, ...] = ()
    """One reason per piece not used, e.g. 'no CUDA graphs: 2 processes'."""

    def line(self) -> str:
        """`speed: packed rows, FlexAttention, compiled blocks; no CUDA graphs: 2 processes`."""
        if self.packing:
            parts = ["packed rows", {"flex": "FlexAttention", "eager": "eager attention"}[self.attention]]
            parts += ["compiled blocks"] * self.compile + ["CUDA graphs"] * self.cuda_graph
        else:
            rows = "rows grouped by length" if self.group_by_length else "rows in random order"
            attention = (
                "the model's own attention" if self.attention == "auto" else f"{self.attention} attention"
            )
            parts = [f"unpacked {rows}", attention]
        return "speed: " + "; ".join([", ".join(parts), *self.left_out])

    def recipe_values(self) -> dict:
        """The train section's keys as resolved (written to recipe.yaml and checkpoints)."""
        return {
            "packing": self.packing, "attention": self.attention, "compile": self.compile,
            "cuda_graph": self.cuda_graph, "group_by_length": self.group_by_length,
        }  # fmt: skip

    def as_dict(self) -> dict:
        return {**asdict(self), "left_out": list(self.left_out), "line": self.line()}


def packing_problem(facts: RunFacts) -> str | None:
    """Why the packed path cannot run this model/method/setup (a phrase), or None."""
    if facts.model_type not in PACKED_MODEL_TYPES:
        return (
            f"{facts.model_type} is not T5-family (packing restarts T5's relative bias per pair; "
            f"packed: {', '.join(PACKED_MODEL_TYPES)})"
        )
    if facts.method_kind not in PACKED_METHODS:
        return (
            f"method.kind={facts.method_kind} is not a method it runs ({', '.join(PACKED_METHODS)}: "
            "methods that wrap linear layers)"
        )
    if facts.fsdp:
        # FSDP gathers a block's sharded weights in that block's forward, which the packed path does
        # not call (it runs the block's layers itself). DDP works: see packing.PackedLoss.
        return "FSDP is on (it gathers a block's weights in the block's forward, which the packed path skips)"
    return None


def graph_problem(cfg, facts: RunFacts) -> str | None:
    """Why CUDA graphs cannot replay this packed FlexAttention run (a phrase), or None."""
    if facts.processes > 1:
        # DDP's gradient all-reduce runs in hooks that a captured graph does not replay.
        return f"{facts.processes} processes (DDP's all-reduce is not replayed by a graph)"
    if facts.method_kind == "qlora":
        return "method.kind=qlora (bitsandbytes' quantized layers are not verified under graph capture)"
    if cfg.gradient_checkpointing:
        # Its recomputation saves and restores the random state, which capture does not allow.
        return "train.gradient_checkpointing (its recomputation restores the random state mid-graph)"
    return None


def resolve_speed(cfg, facts: RunFacts) -> SpeedPlan:
    """The plan for `cfg` (a TrainConfig) under `facts`; TrainingError for an explicit setting that
    cannot be honoured."""
    left_out: list[str] = []
    # Explicit settings that exist only on the packed path.
    wants_pack = [
        f"train.{key}={value if isinstance(value, str) else 'true'}"
        for key, value in (("attention", cfg.attention), ("compile", cfg.compile), ("cuda_graph", cfg.cuda_graph))
        if value is True or value == "flex"
    ]  # fmt: skip
    if cfg.packing is True or (cfg.packing == "auto" and wants_pack):
        problem = packing_problem(facts)
        if problem:
            asked = "train.packing=true" if cfg.packing is True else wants_pack[0]
            raise TrainingError(
                f"{asked}: the packed path cannot run here: {problem}; set train.packing=false"
            )
        packing = True
    elif cfg.packing is False:
        packing = False
    elif cfg.group_by_length is True or cfg.attention == "sdpa":
        packing = False
        asked = "train.group_by_length=true" if cfg.group_by_length is True else "train.attention=sdpa"
        left_out.append(f"no packing: {asked}")
    else:
        problem = packing_problem(facts)
        if not problem and not facts.cuda:
            problem = "no CUDA device (eager packed attention is not faster than unpacked rows on a CPU)"
        packing = problem is None
        if problem:
            left_out.append(f"no packing: {problem}")
    return (_packed if packing else _unpacked)(cfg, facts, left_out)


def _unpacked(cfg, facts: RunFacts, left_out: list[str]) -> SpeedPlan:
    """transformers' forward: the model's attention (or train.attention), length-grouped batches."""
    for asked in ("compile", "cuda_graph"):
        if getattr(cfg, asked) is True:
            raise TrainingError(
                f"train.{asked}=true: runs on the packed path; set train.packing=true or auto"
            )
    if cfg.attention == "flex":
        raise TrainingError("train.attention=flex: runs on the packed path; set train.packing=true or auto")
    if cfg.token_budget is not None:
        if cfg.packing is False:
            raise TrainingError(
                "train.token_budget: only used with packed rows; set train.packing=true or auto"
            )
        left_out.append("train.token_budget unused (unpacked rows)")
    if cfg.group_by_length is False:
        left_out.append("no length grouping: train.group_by_length=false")
    attention = cfg.attention
    if attention == "auto" and facts.cuda and facts.model_type in PACKED_MODEL_TYPES:
        # transformers hands T5's relative-position bias to sdpa as a dense float mask, which rules
        # out its fused kernels: on an H200, Seq2SeqTrainer on flan-t5-base LoRA ran 5,800 real
        # tokens/s under sdpa against 17,908 under eager (docs/benchmarks.md, "Fast by default").
        attention = "eager"
    return SpeedPlan(False, attention, False, False, cfg.group_by_length is not False, tuple(left_out))


def _packed(cfg, facts: RunFacts, left_out: list[str]) -> SpeedPlan:
    """flantune.fast_t5's packed forward: flex (GPU) or eager attention, compiled blocks, graphs."""
    if cfg.group_by_length is True:
        raise TrainingError(
            "train.group_by_length=true: packed rows have no padding to save; set train.packing=false "
            "or group_by_length auto"
        )
    if cfg.attention == "sdpa":
        raise TrainingError(
            "train.attention=sdpa: the packed path runs flex or eager; use auto, flex or eager"
        )
    attention = ("flex" if facts.cuda else "eager") if cfg.attention == "auto" else cfg.attention
    if attention == "flex" and not facts.cuda:
        raise TrainingError(
            "train.attention=flex: FlexAttention has no CPU backward; use train.attention=eager on a CPU"
        )
    if attention == "eager" and facts.cuda:
        left_out.append("no FlexAttention: train.attention=eager")

    # Graphs: one process, flex, and neither QLoRA nor gradient checkpointing.
    if attention == "flex":
        problem = graph_problem(cfg, facts)
    else:
        problem = (
            "eager attention"
            if facts.cuda
            else "no CUDA device (graphs replay the FlexAttention step on a GPU)"
        )
    if cfg.cuda_graph is True and problem:
        raise TrainingError(f"train.cuda_graph=true: cannot run with {problem}; set it false or auto")
    if cfg.cuda_graph is True or (cfg.cuda_graph == "auto" and not problem and cfg.compile is not False):
        # Graphs replay compiled blocks (FlexAttention outside torch.compile is a slow reference path).
        return SpeedPlan(True, attention, True, True, False, tuple(left_out))

    if cfg.compile is True and not facts.cuda:
        raise TrainingError("train.compile=true: compiles for a GPU; set it false or auto on a CPU")
    compile_ = cfg.compile is True or (cfg.compile == "auto" and attention == "flex")
    if cfg.compile is False:
        left_out.append("not compiled: train.compile=false")
    if attention == "flex":  # on the eager path graphs were never in question
        reason = "train.cuda_graph=false" if cfg.cuda_graph is False else problem or "train.compile=false"
        left_out.append(f"no CUDA graphs: {reason}")
    return SpeedPlan(True, attention, compile_, False, False, tuple(left_out))


def run_facts(model_type: str, method_kind: str) -> RunFacts:
    """The facts of this process's run, read before the accelerator starts (so that a plan that
    cannot be honoured is refused before the run folder is touched): `accelerate launch` sets
    WORLD_SIZE for each process and ACCELERATE_USE_FSDP under FSDP."""
    import os

    import torch

    return RunFacts(
        model_type=model_type,
        method_kind=method_kind,
        cuda=torch.cuda.is_available(),
        processes=int(os.environ.get("WORLD_SIZE", "1")),
        fsdp=os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"),
    )


def _compile_table() -> dict[str, float] | None:
    """TorchDynamo's account of this process's compilation so far, seconds per phase summed over its
    calls; None where this torch does not keep it (a private API: `torch._dynamo.utils.compile_times`)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return dict(zip(names, (float(v) for v in values), strict=True))
    except Exception:  # another torch's layout: the figure is left out, never the run
        return None


def compile_seconds() -> float | None:
    """Seconds torch.compile has spent compiling in this process so far: TorchDynamo's own account
    of its frame compiles (forward graphs, `_compile.compile_inner`) plus AOTAutograd's backward
    compiles, which run at the first backward. None where this torch does not keep that account."""
    table = _compile_table()
    if table is None:
        return None
    if "_compile.compile_inner" not in table:
        return 0.0 if not table else None
    return round(table["_compile.compile_inner"] + table.get("compile_fx.<locals>.bw_compiler", 0.0), 3)


def compile_breakdown(most: int = 8) -> dict | None:
    """Where torch.compile's time went in this process so far, for the run's start-up record: the
    graphs Dynamo compiled, and the `most` costliest phases of its own account (tracing, AOTAutograd,
    inductor's code generation, Triton's compilation, ...) in seconds, each phase summed over its
    calls (phases nest: they do not add up to the compilation). None where this torch does not
    keep that account (`_compile_table`, and Dynamo's private `counters`)."""
    table = _compile_table()
    try:
        from torch._dynamo.utils import counters

        graphs = int(counters["stats"]["unique_graphs"])
    except Exception:  # another torch's layout: the figure is left out, never the run
        return None
    if table is None:
        return None
    costliest = sorted(table.items(), key=lambda item: -item[1])[:most]
    return {"graphs": graphs, "phases_s": {name: round(v, 3) for name, v in costliest}}


def use_compile_cache() -> str:
    """Keep torch.compile's caches (inductor's FX graphs and AOTAutograd results, Triton kernels) in
    one stable folder, so that a second run of the same recipe compiles from cache: the user's
    TORCHINDUCTOR_CACHE_DIR when set, else $XDG_CACHE_HOME/flantune/inductor (~/.cache/...).
    Inductor's own default is under /tmp, which many machines clear at reboot. (Inductor starts its
    compile workers at its first compilation; started here instead, with the set-up, their 16
    imports of torch slowed the set-up by 5.7 s and the compilation did not get shorter:
    docs/benchmarks.md, "1,000 steps, both sides in one call; the compile workers started early".)"""
    import os
    from pathlib import Path

    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flantune" / "inductor"
    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))


def unpacked_attention():
    """The context of an unpacked forward: SDPA may pick flash, memory-efficient or math kernels,
    not cuDNN's. On an H200 (torch 2.11, cuDNN 9.19) SDPA sends BART's masked attention to cuDNN,
    which builds a plan for every new batch shape: 2-4 s for the first shapes, ~0.3 s for each
    later one, against a 50-60 ms step of bart-base at 32 rows (docs/benchmarks.md, "Fast by
    default"). Length-grouped batches bring a new (source, target) shape at most steps, so cuDNN's
    faster step (51 against 62 ms once planned) pays off only after tens of thousands of steps.
    The backward runs the kernel its forward picked, so the forward alone needs the context."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
