"""Recipes: one YAML file describes a run; this module types and validates it.

A recipe has the sections `model`, `method`, `data`, `train`, `eval`, `generation` and a top-level
`output_dir`. Each section is a dataclass below with a comment on every field. `load_recipe` reads
the YAML, applies `section.key=value` overrides from the command line, and checks the whole thing
at once: an unknown key, a wrong type or a missing required value is reported with its dotted
path and what was expected, before any model or data is touched.

A recipe file may start from another one: the top-level key `extends: ../sciq-lora.yaml` (a path
relative to the file that holds it) reads that recipe first and lays this file's keys over it
(`merge_recipes`). The result is checked as one recipe, and a resolved recipe (`dump_recipe`, a run
folder's recipe.yaml) holds every key and no `extends`. Paths inside a recipe (model.path, data
files, output_dir) are not rewritten: they are relative to the working directory, whichever file
set them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """One YAML mapping holds the same key twice."""

    def __init__(self, key: Any, first, second):
        self.key = key
        where = f" of {second.name}" if not second.name.startswith("<") else ""
        super().__init__(
            f"{key}: given twice in one mapping (lines {first.line + 1} and {second.line + 1}{where}); keep one"
        )


class _Loader(yaml.SafeLoader):
    """YAML with three YAML 1.1 surprises removed: `1e-4` (no dot) read as a string, `1:30` read
    as a base-60 integer, and a key given twice in one mapping silently taking the last value.
    Learning rates and row slices are written exactly that way; a repeated key is an error."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                except TypeError:  # an unhashable key; the base constructor reports it
                    continue
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [
        (tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?(?:0|[1-9][0-9_]*))$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, name: str | None = None) -> Any:
    """`text` as YAML; `name` (the file) is what error messages call it."""
    loader = _Loader(text)
    if name:
        loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class ConfigError(ValueError):
    """The recipe (or an override) is wrong. Each problem names its dotted key path."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f"recipe {source}: " if source else "recipe: "
        if len(problems) == 1:
            super().__init__(where + problems[0])
        else:
            super().__init__(where + f"{len(problems)} problems\n" + "\n".join(f"  - {p}" for p in problems))


# ----------------------------------------------------------------------------------------------
# The sections. Defaults are what a user gets when a key is left out; `REQUIRED` marks the keys
# that have none.


@dataclass
class ModelConfig:
    path: str
    """Hub id (e.g. google/flan-t5-base) or a local folder with config.json (+ weights for pretrained)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """`random` builds the model from the folder's config.json with fresh weights (tests, benchmarks)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Weight dtype at load. Training keeps float32 weights and uses bf16 autocast (see train.precision)."""
    add_tokens: list[str] = field(default_factory=list)
    """Special tokens to add to the tokenizer (e.g. ["<think>", "</think>"]); embeddings grow to fit."""
    adapter: str | None = None
    """A PEFT/bottleneck adapter folder to continue training from (loaded trainable)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for `init: pretrained`."""


@dataclass
class MethodConfig:
    kind: Literal["full", "lora", "qlora", "adapter", "ia3", "prefix"] = "lora"
    """What trains: every weight (`full`), PEFT adapters, or bottleneck adapters (`adapter`)."""
    r: int = 16
    """LoRA rank."""
    alpha: float = 32.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = field(default_factory=lambda: ["q", "v"])
    """Module names to adapt: T5 uses q, k, v, o, wi_0, wi_1, wo; BART q_proj, v_proj, ...; or all-linear."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    bits: Literal[4, 8] = 4
    """QLoRA: quantize the frozen base to 4-bit NF4 or 8-bit."""
    modules_to_save: list[str] = field(default_factory=list)
    """Whole modules that train beside the adapter (e.g. ["lm_head"])."""
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    """Bottleneck adapters: after attention and feed-forward (houlsby) or feed-forward only (pfeiffer)."""
    reduction_factor: int = 16
    """Bottleneck adapters: hidden size d_model / reduction_factor."""
    num_virtual_tokens: int = 20
    """Prefix tuning: number of virtual tokens."""

    def check(self, path: str) -> list[str]:
        problems = []
        for key in ("r", "reduction_factor", "num_virtual_tokens"):
            if getattr(self, key) <= 0:
                problems.append(f"{path}.{key}: must be a positive integer, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"{path}.dropout: must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            problems.append(f"{path}.target_modules: must name at least one module, or be 'all-linear'")
        return problems


@dataclass
class DataSource:
    path: str
    """A local .json/.jsonl/.csv/.parquet file, or a hub dataset id."""
    name: str | None = None
    """Hub dataset configuration (e.g. mlqa.hi.en)."""
    split: str | None = None
    """Hub split; defaults to train / validation / test for data.train / data.eval / data.test."""
    rows: str | None = None
    """Keep a slice of the rows, Python style: "0:800", ":100", "800:"."""

    def check(self, path: str) -> list[str]:
        if self.rows is not None and parse_rows(self.rows) is None:
            return [f"{path}.rows: expected a slice like '0:800', ':100' or '800:', got {self.rows!r}"]
        return []


@dataclass
class MixtureItem:
    task: str
    """A built-in task name (see `flantune tasks`)."""
    train: DataSource
    """This task's training rows."""
    eval: DataSource | None = None
    """This task's evaluation rows (optional)."""
    weight: float = 1.0
    """Sampling weight in the mixture (rates are normalized over the items)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options of this task."""

    def check(self, path: str) -> list[str]:
        problems = [f"{path}.weight: must be > 0, got {self.weight}"] if self.weight <= 0 else []
        return problems + task_problems(path, self.task, self.task_options)


def task_problems(path: str, task: str | None, options: dict[str, Any]) -> list[str]:
    """The problem with a section's task name or options (unknown task, with a did-you-mean; an
    unknown or mistyped option), as loading the data would report it, named under `path`."""
    from flantune.tasks import TaskError, build_task

    if task is None:
        return []
    try:
        build_task(task, options)
    except TaskError as e:
        return [f"{path}.{e.key.removeprefix('data.')}: {e.message}"]
    return []


@dataclass
class DataConfig:
    task: str | None = None
    """Built-in task name (sciq, squad_qa, samsum, ..., template). Required unless data.mixture is set."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Task options, e.g. {include_support: false} for sciq, {source: ..., target: ...} for template."""
    train: DataSource | None = None
    """Training rows: a local file, or a hub id as `id:split` or {path, name, split, rows}."""
    eval: DataSource | None = None
    """Evaluation rows used during training (loss and generation metric)."""
    test: DataSource | None = None
    """Held-out rows for `flantune eval`."""
    mixture: list[MixtureItem] = field(default_factory=list)
    """Several tasks mixed into one training set with weights (FLAN-style); replaces task/train/eval."""
    max_source_tokens: int = 512
    """Source length limit in tokens (including EOS)."""
    max_target_tokens: int = 128
    """Target length limit in tokens (including EOS)."""
    overlong: Literal["drop", "truncate", "error"] = "truncate"
    """What happens to a row longer than a limit: dropped, truncated, or an error naming it."""
    bad_rows: Literal["error", "skip"] = "error"
    """A row that does not fit the task's schema stops loading with its file/row/column, or is skipped."""
    max_bad_fraction: float = 0.1
    """With bad_rows: skip, the largest share of a split's rows that may be bad; more stops loading
    with the counts (a file in the wrong format is not silently skipped whole)."""

    def check(self, path: str) -> list[str]:
        problems = []
        if self.mixture and (self.task or self.train or self.eval):
            problems.append(f"{path}.mixture: use either data.mixture or data.task/train/eval, not both")
        if not self.mixture and not self.task:
            problems.append(f"{path}.task: missing required value (a task name, or a data.mixture list)")
        problems += task_problems(path, self.task, self.task_options)
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            problems.append(f"{path}.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        for key in ("max_source_tokens", "max_target_tokens"):
            if getattr(self, key) < 2:
                problems.append(f"{path}.{key}: must be at least 2 (room for one token and EOS)")
        return problems


@dataclass
class TrainConfig:
    epochs: float = 1.0
    """Passes over the training set (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Examples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps (or use warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warm-up as a fraction of all steps, when warmup_steps is 0."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; null disables clipping."""
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """Mixed precision: auto = bf16 on a GPU that supports it, fp32 otherwise. T5 refuses fp16."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    seed: int = 42
    """Seed for initialization, data order, dropout and sampling."""
    log_every: int = 10
    """Optimizer steps between metrics.jsonl lines."""
    eval_every: int | None = None
    """Optimizer steps between evaluations (null: only at the end)."""
    save_every: int | None = None
    """Optimizer steps between checkpoints (null: only at the end and save_every_minutes)."""
    save_every_minutes: float | None = 30.0
    """Also write a checkpoint when this many minutes passed since the last one, so that a kill loses
    bounded work (null: only save_every). SIGINT/SIGTERM always write one before the run stops."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    best_metric: str | None = None
    """Metric that picks the best checkpoint (e.g. rougeL, eval_loss); null: the task's first metric."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement of best_metric."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    restart: bool = False
    """Start again from scratch in an output_dir that holds an earlier run (its checkpoints,
    metrics, final/ and result are deleted; other commands' folders such as rl/ or eval-*/ stay)."""
    on_nan: Literal["stop", "skip"] = "stop"
    """A NaN/inf loss stops the run, or skips that optimizer step."""
    report_to: list[str] | str = field(default_factory=list)
    """Experiment trackers that also get the run's numbers, through Accelerate: one name or a list of
    tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio (each must be
    installed); `all`: every one installed; [] (default): metrics.jsonl only. TensorBoard writes under
    output_dir/tensorboard/. (Replaces `tensorboard: true`, still read as [tensorboard].)"""
    packing: bool | Literal["auto"] = "auto"
    """Pack several (source, target) pairs per row, padding-free, attention kept per pair (T5 family).
    auto: on a GPU for T5-family models with full/lora/qlora/ia3, not under FSDP (flantune.speed)."""
    group_by_length: bool | Literal["auto"] = "auto"
    """Unpacked runs: batches of examples of similar length (less padding), in random order.
    auto: whenever the run is unpacked."""
    token_budget: int | None = None
    """With packing: source + target tokens per micro-batch (null: batch_size examples per micro-batch)."""
    attention: Literal["auto", "eager", "sdpa", "flex"] = "auto"
    """auto: flex for packed runs on a GPU, eager for packed runs on a CPU, else the model's own
    (sdpa where transformers has it); flex needs packed rows."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the packed T5 blocks. auto: on the FlexAttention path (the first steps pay the
    compilation; inductor's cache makes a second run of the same recipe compile from cache)."""
    cuda_graph: bool | Literal["auto"] = "auto"
    """Packed flex path in one process: replay each micro-batch's forward and backward as one CUDA
    graph; every micro-batch then fills one fixed shape, one row sized from token_budget (or
    batch_size examples); the blocks are compiled. auto: in one process, not with qlora or
    gradient_checkpointing. The path a run takes is printed at start (`speed: ...`)."""
    pin_memory: bool = True
    """On CUDA: micro-batches in page-locked memory (pinned by the DataLoader's pinning thread),
    copied to the GPU asynchronously, as transformers' dataloader_pin_memory. No effect on the CPU."""
    profile_steps: list[int] | None = None
    """[first, last]: record optimizer steps first..last with torch.profiler (CPU, and CUDA kernels on
    a GPU) into output_dir/profile/: trace.json (Chrome / Perfetto), ops.txt (operators and kernels by
    time), summary.json (wall and device time, device-busy share). Main process only."""

    def check(self, path: str) -> list[str]:
        problems = []
        # Explicit settings that contradict each other; `auto` is resolved at start (flantune.speed).
        packed_only = [
            (k, v) for k, v in (("cuda_graph", self.cuda_graph), ("compile", self.compile)) if v is True
        ]
        packed_only += [("attention", "flex")] if self.attention == "flex" else []
        if self.packing is False:
            budget = [("token_budget", self.token_budget)] if self.token_budget is not None else []
            for key, value in packed_only + budget:
                shown = "true" if value is True else value
                problems.append(f"{path}.{key}={shown}: runs on packed rows; set {path}.packing=true or auto")
        if self.packing is True or packed_only:
            if self.group_by_length is True:
                problems.append(
                    f"{path}.group_by_length: packed runs have no padding to save; set one of them false"
                )
            if self.attention == "sdpa":
                problems.append(
                    f"{path}.attention=sdpa: the packed path runs flex or eager; use auto, flex or eager"
                )
        if self.cuda_graph is True and self.gradient_checkpointing:
            problems.append(
                f"{path}.cuda_graph: not with {path}.gradient_checkpointing (its recomputation saves and "
                "restores the random state, which capture does not allow); set one of them false"
            )
        if self.token_budget is not None and self.token_budget < 1:
            problems.append(f"{path}.token_budget: must be at least 1 or null, got {self.token_budget}")
        for key in ("batch_size", "grad_accum", "log_every", "keep_last"):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "eval_every", "save_every", "early_stopping_patience"):
            value = getattr(self, key)
            if value is not None and value < 1:
                problems.append(f"{path}.{key}: must be at least 1 or null, got {value}")
        problems += run_folder_problems(path, self.resume, self.restart, self.save_every_minutes)
        problems += report_to_problems(path, self.report_to)
        if self.profile_steps is not None and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            problems.append(
                f"{path}.profile_steps: expected [first, last] with 1 <= first <= last (e.g. [20, 24]), "
                f"got {self.profile_steps}"
            )
        if self.lr <= 0:
            problems.append(f"{path}.lr: must be > 0, got {self.lr}")
        if self.epochs <= 0:
            problems.append(f"{path}.epochs: must be > 0, got {self.epochs}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"{path}.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        return problems


@dataclass
class EvalConfig:
    metrics: list[str] | None = None
    """Metrics to compute; null: the task's own (rouge, bleu, chrf, exact_match, f1, accuracy, ...)."""
    max_rows: int | None = None
    """Evaluate on at most this many rows (the first ones, so runs compare on the same rows)."""
    batch_size: int | Literal["auto"] = "auto"
    """Rows decoded together during evaluation. auto: on a GPU as many as the decoding engine's
    caches fit in a quarter of the free memory, at most 128 (a decode step costs about the same
    from 32 rows to 128, so fewer, larger batches take fewer steps; flantune.decoding.auto_rows);
    on a CPU 32. The teacher-forced eval_loss of a training run takes 32 rows a batch under auto."""

    def check(self, path: str) -> list[str]:
        problems = []
        if self.batch_size != "auto" and self.batch_size < 1:
            problems.append(f"{path}.batch_size: must be at least 1 or auto, got {self.batch_size}")
        if self.max_rows is not None and self.max_rows < 1:
            problems.append(f"{path}.max_rows: must be at least 1 or null, got {self.max_rows}")
        return problems


def run_folder_problems(
    path: str, resume: bool, restart: bool, save_every_minutes: float | None
) -> list[str]:
    problems = []
    if resume and restart:
        problems.append(f"{path}.resume and {path}.restart: continue the run or start it again, not both")
    if save_every_minutes is not None and not save_every_minutes > 0:
        problems.append(f"{path}.save_every_minutes: must be > 0 or null, got {save_every_minutes}")
    return problems


_PIP_NAMES = {"aim": "'aim<4'"}
"""Trackers whose pip install line is not their name (Accelerate drives aim 3 only)."""


def report_to_problems(path: str, report_to: list[str] | str) -> list[str]:
    """Each name must be one of Accelerate's trackers, installed: the same names and the same
    availability test (accelerate.tracking.get_available_trackers) that `Accelerator(log_with=...)`
    applies, where a tracker that is not installed would be left out silently."""
    names = [report_to] if isinstance(report_to, str) else report_to
    if not names:
        return []
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = [n for n in LoggerType.list() if n != "all"]
    installed = {str(t) for t in get_available_trackers()}
    problems = []
    for name in dict.fromkeys(names):
        if name == "all":
            if not installed:
                problems.append(
                    f"{path}.report_to: all: none of Accelerate's trackers is installed "
                    "(pip install tensorboard, for one)"
                )
        elif name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(
                f"{path}.report_to: unknown tracker {name!r}{hint}; Accelerate's trackers are "
                f"{', '.join(sorted(known))}, or all (every one installed); [] for none"
            )
        elif name not in installed:
            problems.append(
                f"{path}.report_to: {name} is not installed: pip install {_PIP_NAMES.get(name, name)}"
            )
    return problems


def sampling_problems(path: str, temperature: float, top_p: float) -> list[str]:
    problems = []
    if temperature <= 0:
        problems.append(f"{path}.temperature: must be > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"{path}.top_p: must be in (0, 1], got {top_p}")
    return problems


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    """Output cap in tokens. Never the transformers default of 20: answers are not cut silently."""
    num_beams: int = 1
    """Beam search width (1: greedy or sampling)."""
    early_stopping: bool = False
    """Beam search stops when num_beams finished candidates exist."""
    do_sample: bool = False
    """Sample instead of greedy/beam decoding."""
    temperature: float = 1.0
    """Sampling temperature."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int = 50
    """Top-k sampling (0 disables)."""
    repetition_penalty: float = 1.0
    """Penalty > 1 discourages repeated tokens."""
    no_repeat_ngram_size: int = 0
    """Forbid repeating n-grams of this size (0 disables)."""
    restrict_to_labels: bool = False
    """Classification: decode only the task's label strings."""

    def check(self, path: str) -> list[str]:
        problems = []
        if self.max_new_tokens < 1:
            problems.append(f"{path}.max_new_tokens: must be at least 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            problems.append(f"{path}.num_beams: must be at least 1, got {self.num_beams}")
        problems += sampling_problems(path, self.temperature, self.top_p)
        return problems


@dataclass
class RewardSpec:
    name: str
    """A built-in reward — correct, format, rouge, bleu, length — or a custom `module:function`
    called as function(prompt, completion, row) -> float."""
    weight: float = 1.0
    """Its weight in the total reward (a weighted sum)."""
    mode: Literal["normalized", "exact"] = "normalized"
    """`correct` on free text: SQuAD-normalized or exact string match (SciQ always matches options)."""
    target_tokens: int = 0
    """`length`: completions longer than this many tokens lose (n - target) / target; 0: n / max_new_tokens."""


@dataclass
class RLConfig:
    start: str | None = None
    """Model to start from: an SFT run's final/ (adapter or full model) or a model folder. Default:
    output_dir/final when it exists, else model.path with a fresh method.kind adapter."""
    output_dir: str | None = None
    """RL run directory. Default: output_dir/rl."""
    max_steps: int = 100
    """Policy updates (one batch of prompts each, followed by inner_steps optimizer steps)."""
    prompts_per_step: int = 8
    """Prompts sampled per step; each gets group_size completions."""
    group_size: int = 8
    """Completions per prompt (G); advantages are normalized within each group."""
    inner_steps: int = 2
    """Optimizer steps on each batch of completions (the policy ratio departs from 1 after the first)."""
    micro_batch_size: int = 128
    """Completions per forward/backward pass (memory); the loss is still averaged over all tokens.
    The passes are launch-bound on a GPU: flan-t5-base LoRA, 16 prompts x 8 completions x 64 tokens,
    in one pass of 128 runs 1.3x the prompts/s of two passes of 64, peaking at 8.8 GiB against 5.6
    (H200, docs/benchmarks.md). Lower it for larger models or smaller GPUs."""
    lr: float = 1e-5
    """AdamW learning rate (constant after warm-up)."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (0 disables)."""
    clip_eps: float = 0.2
    """Policy-ratio clipping range: ratios outside [1 - eps, 1 + eps] get no gradient past the bound."""
    beta: float = 0.04
    """KL penalty weight to the reference policy (the model RL starts from); 0 skips the reference."""
    temperature: float = 1.0
    """Sampling temperature of the completions."""
    top_p: float = 1.0
    """Nucleus sampling mass of the completions."""
    max_new_tokens: int | None = None
    """Completion cap in tokens; default: generation.max_new_tokens."""
    rewards: list[RewardSpec] = field(default_factory=lambda: [RewardSpec(name="correct")])
    """The reward: a weighted sum of these."""
    log_every: int = 1
    """Write metrics.jsonl every this many steps."""
    eval_every: int | None = 25
    """Evaluate (greedy, the task's metrics) on data.eval every this many steps; null: only at the end."""
    save_every: int | None = 50
    """Write a checkpoint every this many steps."""
    save_every_minutes: float | None = 30.0
    """Also write a checkpoint when this many minutes passed since the last one (null: only
    save_every). SIGINT/SIGTERM always write one before the run stops."""
    keep_last: int = 2
    """Checkpoints kept."""
    resume: bool = False
    """Continue the RL run in output_dir from its last checkpoint."""
    restart: bool = False
    """Start the RL run again from scratch in an output_dir that holds an earlier one."""
    seed: int = 42
    """Seeds the run: the prompt order, each completion's sampling stream, a fresh adapter's init."""
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """auto: bf16 on a GPU that supports it, else fp32 (fp16 is refused for the T5 family)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, more time)."""
    packing: bool | Literal["auto"] = "auto"
    """Old, reference and new log-probabilities on packed rows (flantune.fast_t5): each prompt's
    source once in an encoder row, its completions side by side in the decoder row, no padding.
    auto: on a GPU (FlexAttention) for T5-family models with full/lora/qlora/ia3, not under FSDP;
    true on a CPU runs eager attention (the reference path)."""
    report_to: list[str] | str = field(default_factory=list)
    """Experiment trackers that also get rl/metrics.jsonl's numbers, as train.report_to (TensorBoard
    under rl/tensorboard/)."""

    def check(self, path: str) -> list[str]:
        problems = []
        for key in (
            "max_steps",
            "prompts_per_step",
            "group_size",
            "inner_steps",
            "micro_batch_size",
            "log_every",
        ):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}: must be at least 1, got {getattr(self, key)}")
        if self.group_size < 2:
            problems.append(
                f"{path}.group_size: GRPO needs at least 2 completions per prompt, got {self.group_size}"
            )
        if self.lr <= 0:
            problems.append(f"{path}.lr: must be > 0, got {self.lr}")
        if not 0 < self.clip_eps < 1:
            problems.append(f"{path}.clip_eps: must be in (0, 1), got {self.clip_eps}")
        if self.beta < 0:
            problems.append(f"{path}.beta: must be >= 0, got {self.beta}")
        problems += run_folder_problems(path, self.resume, self.restart, self.save_every_minutes)
        problems += report_to_problems(path, self.report_to)
        problems += sampling_problems(path, self.temperature, self.top_p)
        if not self.rewards:
            problems.append(f"{path}.rewards: name at least one reward (e.g. [{{name: correct}}])")
        for i, reward in enumerate(self.rewards):
            if not isinstance(reward, RewardSpec):  # already reported by the type check
                continue
            builtin = reward.name in ("correct", "format", "rouge", "bleu", "length")
            if not builtin and not re.fullmatch(r"[\w.]+:\w+", reward.name):
                problems.append(
                    f"{path}.rewards[{i}].name: {reward.name!r} is neither a built-in reward "
                    "(correct, format, rouge, bleu, length) nor module:function"
                )
        return problems


@dataclass
class Recipe:
    model: ModelConfig
    """The base model."""
    data: DataConfig
    """Task and rows."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """How the model is adapted."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during and after training."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Decoding settings for evaluation and generation."""
    rl: RLConfig = field(default_factory=RLConfig)
    """Reinforcement learning after SFT (`flantune rl`): GRPO with verifiable rewards."""
    output_dir: str = "runs/run"
    """The run directory: resolved recipe, metrics.jsonl, checkpoints, final/."""


# ----------------------------------------------------------------------------------------------
# Loading, overrides and validation.


def parse_rows(text: str) -> slice | None:
    """'0:800' → slice(0, 800); None when the text is not a plain start:stop slice."""
    parts = text.split(":")
    if len(parts) != 2:
        return None
    try:
        start, stop = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        return None
    return slice(start, stop)


def data_source_from_string(text: str) -> dict[str, Any]:
    """Shorthand for a data source: a local path, or `hub/id` or `hub/id:split`.

    A local file wins when it exists, so a path holding ':' still works.
    """
    if Path(text).exists() or ":" not in text:
        return {"path": text}
    path, _, split = text.rpartition(":")
    return {"path": path, "split": split}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `section.key=value` pairs; values are parsed as YAML (true, 3, [q, v], null)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override {item!r}: expected section.key=value, e.g. train.lr=1e-4"])
        try:
            value = parse_yaml(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError([f"override {key}: cannot parse {text!r} as a YAML value ({e})"]) from None
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part in ("train", "eval", "test"):
                child = node[part] = data_source_from_string(child)
            elif not isinstance(child, dict):
                dotted = ".".join(parts[: i + 1])
                raise ConfigError([f"override {key}: {dotted} is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return raw


EXTENDS_KEY = "extends"
"""The top-level key naming the recipe file a recipe is laid over."""


def merge_recipes(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` laid over `base`: where both hold a mapping the two merge key by key, recursively;
    any other value in `overlay` (a scalar, a list, null, or a mapping over a non-mapping) replaces
    the base's. Lists are replaced whole, so an overlay that changes one item of `data.mixture`
    restates the list; a data source written as a mapping over a base mapping keeps the base's
    other keys (name, split, rows) unless it sets them, while the string shorthand replaces it all.
    """
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_recipes(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_mapping(path: Path) -> dict[str, Any]:
    """A recipe file's top-level mapping, as written; ConfigError (without a source) if it is none."""
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except DuplicateKeyError as e:
        raise ConfigError([str(e)]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid YAML: {e}"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"the top level must be a mapping of sections, got {type(raw).__name__}"])
    return raw


def _read_recipe_file(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The mapping of the recipe at `path` with the recipes it extends merged in (the base first),
    and the files read, `path` first.

    `chain` holds the files that extend this one, to refuse a cycle. A problem with this file's
    own text is raised without a source; the file that extends it adds itself and its key.
    """
    raw = _read_mapping(path)
    if EXTENDS_KEY not in raw:
        return raw, [path]
    target = raw.pop(EXTENDS_KEY)
    if not isinstance(target, str) or not target.strip():
        expected = "the path of a recipe file, relative to this one"
        raise ConfigError([f"{EXTENDS_KEY}: expected {expected}, got {_describe(target)}"], str(path))
    base_path = Path(os.path.normpath(path.parent / target))
    chain = (*chain, path)
    seen = [f.resolve() for f in chain]
    if base_path.resolve() in seen:
        cycle = " -> ".join(str(f) for f in (*chain[seen.index(base_path.resolve()) :], base_path))
        raise ConfigError([f"{EXTENDS_KEY}: the recipes extend each other in a cycle: {cycle}"], str(path))
    if not base_path.is_file():
        raise ConfigError(
            [f"{EXTENDS_KEY}: file not found: {base_path} ({target!r}, relative to this file's folder)"],
            str(path),
        )
    try:
        base, files = _read_recipe_file(base_path, chain)
    except ConfigError as e:
        if e.source is not None:  # further up the chain; that file is named already
            raise
        raise ConfigError([f"{EXTENDS_KEY}: {base_path}: {p}" for p in e.problems], str(path)) from None
    return merge_recipes(base, raw), [path, *files]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe file (with the recipes it `extends`, merged), apply the overrides and
    validate the result. Raises ConfigError naming every problem found."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            [f"{path} is a directory; give the path to a recipe YAML, e.g. recipes/sciq-lora.yaml"]
        )
    if not path.is_file():
        raise ConfigError(
            [f"file not found: {path} (give the path to a recipe YAML, e.g. recipes/sciq-lora.yaml)"]
        )
    try:
        raw, files = _read_recipe_file(path)
    except ConfigError as e:
        raise ConfigError(e.problems, source=e.source or str(path)) from None
    try:
        return recipe_from_dict(apply_overrides(raw, list(overrides or [])))
    except ConfigError as e:
        # A key may come from any file of the chain: name them all.
        source = str(path) + "".join(f" (extends {f})" for f in files[1:])
        raise ConfigError(e.problems, source=source) from None


class RecipeWarning(FutureWarning):
    """A recipe uses a retired key that is still read; the message says what to write instead."""


def _read_retired_keys(raw: Any, problems: list[str]) -> Any:
    """`train.tensorboard` / `rl.tensorboard` (before `report_to`): true is read as report_to with
    tensorboard added, with a RecipeWarning; false is dropped (it meant nothing, and every
    recipe.yaml written before report_to holds it). `raw` itself is left as it was."""
    if not isinstance(raw, dict):
        return raw
    raw = dict(raw)
    for section in ("train", "rl"):
        body = raw.get(section)
        if not isinstance(body, dict) or "tensorboard" not in body:
            continue
        body = raw[section] = dict(body)
        value = body.pop("tensorboard")
        if value is True:
            warnings.warn(
                f"{section}.tensorboard is retired: true is read as {section}.report_to: [tensorboard]; "
                "write that instead",
                RecipeWarning,
                stacklevel=2,
            )
            current = body.get("report_to", [])
            current = [current] if isinstance(current, str) else current
            if isinstance(current, list) and not {"tensorboard", "all"} & set(map(str, current)):
                body["report_to"] = [*current, "tensorboard"]
        elif value is not False:
            problems.append(
                f"{section}.tensorboard: expected true or false, got {_describe(value)} "
                f"(a retired key: use {section}.report_to: [tensorboard])"
            )
    return raw


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    problems: list[str] = []
    recipe = _build(Recipe, _read_retired_keys(raw, problems), "", problems)
    if problems:
        raise ConfigError(problems)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, allow_unicode=True)


class _Invalid(Exception):
    """One value does not have the expected type; the message says what was expected."""


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, collecting every problem under its dotted path."""
    where = path or "the recipe"
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a mapping of keys, got {_describe(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # load_recipe takes `extends` out of a file; here it can only come from an override. It is
    # listed among the top-level names so that a misspelling of it gets its hint.
    names = [*fields, EXTENDS_KEY] if cls is Recipe else list(fields)
    for key in raw:
        if cls is Recipe and key == EXTENDS_KEY:
            problems.append(f"{EXTENDS_KEY}: only a recipe file can extend another (not an override)")
        elif key not in fields:
            known = ", ".join(names)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{_join(path, key)}: unknown key{hint}; expected one of: {known}")
    values = {}
    for name, f in fields.items():
        key_path = _join(path, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(f"{key_path}: missing required value ({_expected(hints[name])})")
            continue
        try:
            values[name] = _convert(raw[name], hints[name], key_path, problems)
        except _Invalid as e:
            problems.append(f"{key_path}: expected {e}, got {_describe(raw[name])}")
    try:
        obj = cls(**values)
    except TypeError:  # a required value was missing; already reported
        return None
    check = getattr(obj, "check", None)
    if check is not None:
        problems.extend(check(path))
    return obj


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise _Invalid(_expected(tp))
        options = [a for a in args if a is not type(None)]
        # A data source may be written as a string shorthand or as a mapping.
        if DataSource in options and isinstance(value, str):
            return _build(DataSource, data_source_from_string(value), path, problems)
        for option in options:
            try:
                return _convert(value, option, path, problems)
            except _Invalid:
                continue
        raise _Invalid(_expected(tp))
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise _Invalid("one of " + ", ".join(repr(a) for a in args))
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(_expected(tp))
        (item_tp,) = args
        if dataclasses.is_dataclass(item_tp):
            return [_build(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_convert(v, item_tp, f"{path}[{i}]", problems))
            except _Invalid as e:
                problems.append(f"{path}[{i}]: expected {e}, got {_describe(v)}")
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid("a mapping")
        return dict(value)
    if tp is DataSource and isinstance(value, str):
        return _build(DataSource, data_source_from_string(value), path, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid(_expected(tp))
        return _build(tp, value, path, problems)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _Invalid("a finite number (not NaN or infinity)")
            return float(value)
        raise _Invalid("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid("a string")
    if tp is Any:
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in this module, not in a recipe


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], 'mappings')}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return (
            "a data source (a path, 'hub/id:split', or {path, name, split, rows})"
            if tp is DataSource
            else "a mapping"
        )
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind.get(type(value), type(value).__name__)} {text}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
