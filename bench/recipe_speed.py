"""Training speed as a user meets it: `flantune train` with its defaults against transformers'
`Seq2SeqTrainer` set up as a user would, the same recipe, one process, one GPU.

Per cell (model x method) both sides train for --steps optimizer steps on the same tokenized rows
(SciQ validation through flantune's sciq task: support paragraph included, sources cut to 512
tokens, targets to 32), --batch examples per optimizer step (no accumulation), random weights of
the published shape (seed 42; FLAN-T5's lm_head untied, as flantune's `init: random` builds it),
lr 3e-4 on a linear schedule without warm-up, clipping at 1.0, fused AdamW, bf16 autocast over fp32
weights on a GPU (fp32 on the CPU). No evaluation and no checkpoints during the run; each side ends
with the same writes: a resumable checkpoint of the last step (weights, optimizer, scheduler, RNG;
`flantune train` always writes one, and Seq2SeqTrainer does at its last step under its default
save_strategy "steps") and the final model. LoRA: r 16, alpha 32, dropout 0.05 on q and v (T5) or q_proj and
v_proj (BART); full: every weight trains.

- flantune: the real command in a subprocess, `python -m flantune.cli train recipe.yaml`, the recipe
  setting only what is listed above (plus max_steps, log_every and save_every_minutes: null), so
  every speed setting is flantune's default. Its run also ends with the checkpoint that
  `flantune train` always writes beside final/.
- transformers: `Seq2SeqTrainer` in a subprocess of this script (--hf-worker), on the rows that
  flantune's own `load_splits` makes, DataCollatorForSeq2Seq with the model, length-grouped batches,
  the default pinned loader, `optim="adamw_torch_fused"` (GPU), `bf16=True`, the checkpoint its
  default save strategy writes at the last step (save_steps = --steps, so no earlier one), then
  `save_model()`. (Before 2026-12-03, fourth sitting, it ran with save_strategy "no": no checkpoint.)
  Its attention is the faster of sdpa and eager by a short trial of each (--trial-steps, 15: the
  last two thirds timed); both trial figures are kept. --hf-attention sdpa|eager skips the trials
  and uses the one given (recorded as given, not measured).

Figures per side:
- wall_s: the whole subprocess (interpreter start, imports, model, data, compilation, training,
  writing the final model), timed by this script.
- tokens_per_s: steady-state real tokens/s, source + target tokens without padding. The first 20%
  of the steps are left out (rounded up to flantune's log window, --steps / 10 steps, at most 10;
  200 steps: steps 41-200 count); flantune: the mean of its metrics.jsonl windows over the counted
  steps (each window's real tokens/s, weighted by the steps it spans); transformers: real tokens of
  the counted steps' batches over their time, a TrainerCallback closing each optimizer step (CUDA
  synchronized) and the collator counting each batch's tokens. The transformers run also keeps
  tokens_per_s_windows, its steps cut into flantune's windows and averaged as flantune's are (the
  two agree when step times are steady; length-grouped batches make them uneven).
- first_step_s: flantune: result.json's "first_step_s"; transformers: from this script's launch of
  the subprocess to the end of the first optimizer step.
- peak_memory_gib: CUDA peak allocated memory (flantune: result.json's "peak_memory_gib"; None on
  the CPU). flantune's "speed" (its "line" says which path the run took) is kept too.
  (result.json keys the run does not write are recorded as None.)

Compile cache: flantune compiles on a GPU. The first T5 cell runs flantune twice, with
TORCHINDUCTOR_CACHE_DIR (and TRITON_CACHE_DIR inside it) first an empty folder ("cold", the cell's
figures) and then the same folder again ("warm"). Every other flantune run uses one cache folder
made empty for this benchmark, so a cell can only profit from cells run before it in the same call.

--curve N trains --model (flan-t5-base) with LoRA twice through `flantune train` for N steps:
flantune's defaults and `train.packing=false` (the unpacked path), and writes both loss curves
(logged every min(10, N/10) steps) and their relative difference per logged step.

    PYTHONPATH=src python bench/recipe_speed.py --out results.json [--steps 200] [--batch 32]
        [--cells flan-t5-base/lora,bart-base/full] [--trial-steps 15] [--shared ../shared]
    PYTHONPATH=src python bench/recipe_speed.py --curve 300 [--model flan-t5-base] --out curve.json

Cells: flan-t5-base/lora, flan-t5-base/full, flan-t5-large/lora, flan-t5-large/full, bart-base/full
(all by default); flan-t5-small/lora and flan-t5-small/full for quick checks on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from _steady import log_every_for, log_windows, steady_rate, steady_start, tail
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CELLS = (
    "flan-t5-base/lora",
    "flan-t5-base/full",
    "flan-t5-large/lora",
    "flan-t5-large/full",
    "bart-base/full",
)
CHECK_CELLS = ("flan-t5-small/lora", "flan-t5-small/full")
LORA_TARGETS = {"t5": ["q", "v"], "bart": ["q_proj", "v_proj"]}
SEED, LR, MAX_GRAD_NORM = 42, 3e-4, 1.0
STEADY_RULE = (
    "real tokens/s after the first 20% of steps, rounded up to a log window: flantune, the mean of its "
    "metrics.jsonl windows weighted by their steps; transformers, the steps' real tokens over their time"
)


# ---- the shared recipe ---------------------------------------------------------------------------


def data_section(shared: Path) -> dict:
    return {
        "task": "sciq", "task_options": {"include_support": True},
        "train": str(shared / "data" / "sciq" / "valid.json"),
        "max_source_tokens": 512, "max_target_tokens": 32, "overlong": "truncate",
    }  # fmt: skip


def model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def method_section(folder: Path, method: str) -> dict:
    if method == "full":
        return {"kind": "full"}
    targets = LORA_TARGETS[model_type(folder)]
    return {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "target_modules": targets}


def recipe(shared: Path, model: str, method: str, steps: int, batch: int, log_every: int,
           train_overrides: dict | None = None) -> dict:  # fmt: skip
    """The recipe both sides follow, as `flantune train` reads it; speed settings left at their defaults."""
    folder = shared / "assets" / model
    return {
        "model": {"path": str(folder), "init": "random"},
        "method": method_section(folder, method),
        "data": data_section(shared),
        "train": {
            "max_steps": steps, "batch_size": batch, "grad_accum": 1, "lr": LR, "schedule": "linear",
            "warmup_steps": 0, "max_grad_norm": MAX_GRAD_NORM, "seed": SEED, "log_every": log_every,
            "save_every_minutes": None, **(train_overrides or {}),
        },
    }  # fmt: skip





# ---- results --------------------------------------------------------------------------------------


@dataclass
class SideResult:
    """One side's run of a cell."""

    wall_s: float
    """The whole subprocess, as this script timed it."""
    tokens_per_s: float | None
    """Steady-state real (non-padding) source + target tokens/s; None when too few steps."""
    first_step_s: float | None
    peak_memory_gib: float | None
    details: dict = field(default_factory=dict)


@dataclass
class CellResult:
    cell: str
    steps: int
    batch: int
    flantune: SideResult
    hf: SideResult
    hf_attention: str
    """The attention the measured transformers run used: the faster in the trials."""
    hf_trials: dict
    """Per attention implementation: the trial's steady tokens/s, or the error that stopped it."""
    flantune_warm: SideResult | None = None
    """First T5 cell only: flantune again, with the compile cache its cold run filled."""
    tokens_ratio: float | None = None
    """flantune / transformers steady tokens/s."""
    wall_ratio: float | None = None
    """transformers / flantune wall-clock."""

    def __post_init__(self):
        if self.flantune.tokens_per_s and self.hf.tokens_per_s:
            self.tokens_ratio = self.flantune.tokens_per_s / self.hf.tokens_per_s
        self.wall_ratio = self.hf.wall_s / self.flantune.wall_s


class SubprocessFailed(RuntimeError):
    def __init__(self, name: str, returncode: int, tail: str):
        super().__init__(f"{name} exited with status {returncode}; the end of its output:\n{tail}")



def run_logged(cmd: list[str], env: dict, logs: Path, name: str) -> tuple[float, list[tuple[float, str]]]:
    """Run `cmd` to its end, its output in logs/name.out and .err; returns its wall-clock seconds and
    its timeline: each stdout line with the seconds since launch it was read at (also in name.out),
    then ("exit") at the end, so the start-up and the end of a run can be read apart.
    A failure raises with the end of its stderr (of its stdout when stderr is empty)."""
    out, err = logs / f"{name}.out", logs / f"{name}.err"
    timeline: list[tuple[float, str]] = []
    start = time.perf_counter()
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
        for line in process.stdout:
            at = time.perf_counter() - start
            if line.strip():
                timeline.append((round(at, 2), line.rstrip()[:160]))
            stdout.write(f"{at:8.2f} {line}")
        code = process.wait()
    seconds = time.perf_counter() - start
    timeline.append((round(seconds, 2), "(exit)"))
    if code != 0:
        raise SubprocessFailed(name, code, tail(err) or tail(out))
    return seconds, timeline


def child_env(**extra: str) -> dict:
    """This environment with src/ importable (the subprocesses import flantune from this checkout)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra)  # lines arrive as printed: the timeline
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p)
    return env


def cache_env(cache: Path) -> dict:
    # Triton keeps its own kernel cache (~/.triton unless told); inside the inductor folder, it
    # starts empty with it.
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache), "TRITON_CACHE_DIR": str(cache / "triton")}


# ---- flantune: the real command ------------------------------------------------------------------


def run_flantune(spec: dict, work: Path, name: str, cache: Path) -> SideResult:
    """`flantune train` on `spec` in a fresh process; figures from its metrics.jsonl and result.json."""
    import yaml

    folder = work / name
    folder.mkdir(parents=True)
    out = folder / "run"
    spec = {**spec, "output_dir": str(out)}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"  flantune train {name} ...", flush=True)
    cmd = [sys.executable, "-m", "flantune.cli", "train", str(path)]
    wall, timeline = run_logged(cmd, child_env(**cache_env(cache)), work, name)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((out / "result.json").read_text())
    windows = [r for r in records if "tokens_per_s" in r]
    steps, log_every = spec["train"]["max_steps"], spec["train"]["log_every"]
    skip = steady_start(steps, log_every)
    tokens = steady_rate(log_windows(records), skip)
    shutil.rmtree(out)  # a large model's final/ and last checkpoint: gigabytes
    print(f"    wall {wall:.1f} s, {number(tokens)} real tokens/s, first step {result.get('first_step_s')} s, "
          f"peak {result.get('peak_memory_gib')} GiB; {(result.get('speed') or {}).get('line')}; "
          f"start-up {result.get('startup')}", flush=True)  # fmt: skip
    for at, line in timeline:
        print(f"      {at:7.2f} s  {line[:100]}", flush=True)
    return SideResult(
        wall_s=wall, tokens_per_s=tokens, first_step_s=result.get("first_step_s"),
        peak_memory_gib=result.get("peak_memory_gib"),
        details={"timeline": timeline, "speed": result.get("speed"), "startup": result.get("startup"),
                 "steps": result.get("steps"),
                 "train_loss": result.get("train_loss"),
                 "seconds_in_train": result.get("seconds"), "counted_from_step": skip + 1, "windows": windows},
    )  # fmt: skip


# ---- transformers: Seq2SeqTrainer as a user sets it up ------------------------------------------


def run_hf(spec: dict, work: Path, name: str) -> SideResult:
    """The --hf-worker below in a fresh process (a fresh CUDA memory peak); its figures."""
    print(f"  Seq2SeqTrainer {name} ...", flush=True)
    spec = {**spec, "output_dir": str(work / name / "run"), "result": str(work / f"{name}.json"),
            "launched": time.time()}  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", json.dumps(spec)]
    wall, timeline = run_logged(cmd, child_env(), work, name)
    figures = json.loads(Path(spec["result"]).read_text())
    shutil.rmtree(work / name, ignore_errors=True)
    print(f"    wall {wall:.1f} s, {number(figures['tokens_per_s'])} real tokens/s, first step "
          f"{figures['first_step_s']} s, peak {figures['peak_memory_gib']} GiB", flush=True)  # fmt: skip
    return SideResult(wall_s=wall, tokens_per_s=figures.pop("tokens_per_s"), first_step_s=figures.pop("first_step_s"),
                      peak_memory_gib=figures.pop("peak_memory_gib"),
                      details={**figures, "timeline": timeline})  # fmt: skip


def hf_worker(spec: dict) -> None:
    """Train one cell with Seq2SeqTrainer and write its figures to spec["result"]."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import (
        AutoConfig,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
    )

    from flantune.config import recipe_from_dict
    from flantune.data import MODEL_COLUMNS, load_splits
    from flantune.models import config_ties_embeddings, heads_are_tied, untie_lm_head

    path, cuda = spec["model"], torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # The very rows `flantune train` trains on: its data loading, the same data section.
    data = recipe_from_dict({"model": {"path": path}, "data": spec["data"]}).data
    train_set = load_splits(data, tokenizer, roles=("train",), seed=SEED)["train"].dataset
    train_set = train_set.select_columns(MODEL_COLUMNS)

    # The same random model as flantune's `init: random`: from the config under the same seed, the
    # head untied again where the config file says so (transformers 5 ties it when building).
    config = AutoConfig.from_pretrained(path)
    torch.manual_seed(SEED)
    model = AutoModelForSeq2SeqLM.from_config(
        config, dtype=torch.float32, attn_implementation=spec["attention"]
    )
    if not config_ties_embeddings(path) and heads_are_tied(model):
        untie_lm_head(model)
    base = model
    if spec["method"]["kind"] == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        method = spec["method"]
        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM, r=method["r"], lora_alpha=method["alpha"],
            lora_dropout=method["dropout"], target_modules=method["target_modules"],
        ))  # fmt: skip

    collator = CountingCollator(DataCollatorForSeq2Seq(tokenizer, model=base, label_pad_token_id=-100))
    clock = StepClock(spec["launched"], cuda)
    # transformers 5 replaced `group_by_length=True` with `train_sampling_strategy` in a minor
    # release; ask for length grouping in whichever form the installed version takes.
    takes = inspect.signature(Seq2SeqTrainingArguments.__init__).parameters
    grouping = (
        {"train_sampling_strategy": "group_by_length"}
        if "train_sampling_strategy" in takes
        else {"group_by_length": True}
    )
    bf16 = cuda and torch.cuda.is_bf16_supported()  # as flantune's precision auto
    args = Seq2SeqTrainingArguments(
        output_dir=spec["output_dir"], max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0, seed=SEED, bf16=bf16,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        eval_strategy="no", logging_steps=10**6, report_to=[], disable_tqdm=True,
        # The measured run ends with a checkpoint, as flantune's does (the trainer's default
        # strategy saves one at the last step); the attention trials write nothing.
        save_strategy="steps" if spec["save"] else "no", save_steps=spec["steps"],
        **grouping,
    )  # fmt: skip
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                             processing_class=tokenizer, callbacks=[clock])  # fmt: skip
    output = trainer.train()
    if spec["save"]:
        trainer.save_model()

    steps, skip, window = spec["steps"], spec["skip"], spec["window"]
    ends = [clock.train_begin, *clock.step_ends]  # ends[s]: the end of step s (0: training started)
    # Batches are collated in the order they are trained on (a prefetched one may follow the last
    # step): the s-th batch collated is step s's.
    tokens = collator.tokens
    # From `skip` on, windows of `window` steps: flantune's log windows (the trials: one window).
    bounds = sorted({0, *range(skip, steps, window), steps})
    rates = [(a, b, sum(tokens[a:b]) / (ends[b] - ends[a])) for a, b in itertools.pairwise(bounds)]
    figures = {
        "tokens_per_s": sum(tokens[skip:steps]) / (ends[steps] - ends[skip]),
        "tokens_per_s_windows": steady_rate(rates, skip),
        "first_step_s": clock.first_step_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "first_step_in_train_s": clock.step_ends[0] - clock.train_begin,
        "counted_from_step": skip + 1, "train_loss": output.training_loss,
        "attention": base.config._attn_implementation, "bf16": bf16, "optim": args.optim,
        "grouping": grouping, "batches_collated": len(collator.tokens),
        "step_ms": [1000 * (b - a) for a, b in itertools.pairwise(ends)],
    }  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(figures, default=str))


class CountingCollator:
    """The user's collator, counting each batch's real tokens (non-padding source + target)."""

    def __init__(self, collator):
        self.collator, self.tokens = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        self.tokens.append(int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum()))
        return batch


class StepClock(TrainerCallback):
    """The end of each optimizer step (CUDA synchronized), and of the first one since the launch."""

    def __init__(self, launched: float, cuda: bool):
        self.launched, self.cuda = launched, cuda
        self.step_ends: list[float] = []
        self.train_begin = self.first_step_s = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # note: a sync point, so that a step's time holds its GPU work
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_begin = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(self._now())
        if self.first_step_s is None:
            self.first_step_s = time.time() - self.launched


# ---- cells, the loss curve, the command ----------------------------------------------------------


def run_cell(cell: str, args, work: Path, shared: Path, cold_cache: bool) -> CellResult:
    """Both sides of one cell. cold_cache: flantune runs twice, in an empty compile cache and again."""
    model, method = cell.split("/")
    steps, log_every = args.steps, log_every_for(args.steps)
    spec = recipe(shared, model, method, steps, args.batch, log_every)
    tag = cell.replace("/", "-")
    print(f"{cell}:", flush=True)
    warm = None
    if cold_cache:
        cache = work / "inductor-cold"
        ours = run_flantune(spec, work, f"{tag}-flantune-cold", cache)
        if not args.no_warm:
            warm = run_flantune(spec, work, f"{tag}-flantune-warm", cache)
    else:
        ours = run_flantune(spec, work, f"{tag}-flantune", work / "inductor")

    hf_spec = {
        "model": spec["model"]["path"],
        "method": spec["method"],
        "data": spec["data"],
        "batch": args.batch,
    }
    if args.hf_attention != "trial":  # chosen by the user: no trials, the choice recorded as such
        attention, trials = args.hf_attention, {args.hf_attention: "given by --hf-attention (no trial)"}
    else:
        attention, trials = hf_attention_trials(hf_spec, args, work, tag, cell)
    skip = steady_start(steps, log_every)
    measured = {"attention": attention, "steps": steps, "skip": skip, "window": log_every, "save": True}
    hf = run_hf({**hf_spec, **measured}, work, f"{tag}-hf")
    return CellResult(cell=cell, steps=steps, batch=args.batch, flantune=ours, hf=hf, hf_attention=attention,
                      hf_trials=trials, flantune_warm=warm)  # fmt: skip


def hf_attention_trials(hf_spec: dict, args, work: Path, tag: str, cell: str) -> tuple[str, dict]:
    """(the faster attention, each one's trial tokens/s or the error that stopped it): a short
    Seq2SeqTrainer run with sdpa and one with eager."""
    trials: dict[str, float | str] = {}
    for attention in ("sdpa", "eager"):
        trial = {
            "attention": attention,
            "steps": args.trial_steps,
            "skip": args.trial_steps // 3,
            "window": args.trial_steps - args.trial_steps // 3,
            "save": False,
        }
        try:
            trials[attention] = run_hf({**hf_spec, **trial}, work, f"{tag}-hf-trial-{attention}").tokens_per_s
        except SubprocessFailed as e:  # an implementation this transformers refuses for the model
            print(f"  {e}", flush=True)
            trials[attention] = str(e)[-3000:]
    ran = {a: t for a, t in trials.items() if isinstance(t, float)}
    if not ran:
        raise RuntimeError(f"{cell}: neither attention implementation trained (output above)")
    return max(ran, key=ran.get), trials


def number(value: float | None, spec: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, spec)


def show(r: CellResult) -> None:
    f, h = r.flantune, r.hf
    speed = (f.details.get("speed") or {}).get("line") or "(result.json has no speed line)"
    trials = ", ".join(
        f"{a} {number(t) if isinstance(t, float) else t if t.startswith('given') else 'failed'}"
        for a, t in r.hf_trials.items()
    )
    lines = [
        f"{r.cell}: real tokens/s  flantune {number(f.tokens_per_s)} | transformers {number(h.tokens_per_s)} "
        f"({r.hf_attention})  ratio {number(r.tokens_ratio, '.2f')}",
        f"  wall s            flantune {f.wall_s:.1f} | transformers {h.wall_s:.1f}  "
        f"transformers/flantune {r.wall_ratio:.2f}",
        f"  first step s      flantune {number(f.first_step_s, '.1f')} | transformers {number(h.first_step_s, '.1f')}",
        f"  peak GiB          flantune {number(f.peak_memory_gib, '.2f')} | transformers {number(h.peak_memory_gib, '.2f')}",
        f"  transformers attention trials, tokens/s: {trials}",
    ]  # fmt: skip
    if r.flantune_warm is not None:
        w = r.flantune_warm
        lines.append(f"  flantune compile cache: cold wall {f.wall_s:.1f} s, first step {number(f.first_step_s, '.1f')} s;"
                     f" warm wall {w.wall_s:.1f} s, first step {number(w.first_step_s, '.1f')} s")  # fmt: skip
    lines.append(f"  flantune path: {speed}")
    print("\n".join(lines), flush=True)


def run_curve(args, work: Path, shared: Path) -> dict:
    """flantune train's loss curve with its defaults against the unpacked path (train.packing=false)."""
    steps, log_every = args.curve, log_every_for(args.curve)
    out = {"model": args.model, "method": "lora", "steps": steps, "batch": args.batch, "log_every": log_every}
    for name, overrides in (("defaults", {}), ("unpacked", {"packing": False})):
        spec = recipe(shared, args.model, "lora", steps, args.batch, log_every, overrides)
        side = run_flantune(spec, work, f"curve-{name}", work / "inductor")
        windows = side.details["windows"]
        out[name] = {"steps": [w["step"] for w in windows], "loss": [w["loss"] for w in windows],
                     "wall_s": side.wall_s, "tokens_per_s": side.tokens_per_s,
                     "speed": side.details["speed"]}  # fmt: skip
    ours, plain = (dict(zip(out[n]["steps"], out[n]["loss"], strict=True)) for n in ("defaults", "unpacked"))
    logged = [s for s in ours if s in plain]
    out["rel_diff"] = {"steps": logged, "value": [abs(ours[s] - plain[s]) / abs(plain[s]) for s in logged]}
    out["max_rel_diff"] = max(out["rel_diff"]["value"])
    print(f"curve {args.model} lora, {steps} steps: max relative loss difference, defaults vs unpacked, "
          f"{out['max_rel_diff']:.4f} over {len(logged)} logged steps", flush=True)  # fmt: skip
    for s in logged:
        print(f"  step {s}: {ours[s]:.4f} vs {plain[s]:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="recipe_speed.json", help="JSON file with every figure")
    parser.add_argument("--shared", default=str(SHARED), help="folder holding assets/ and data/sciq/")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=32, help="examples per optimizer step")
    parser.add_argument(
        "--cells", default="all", help="comma-separated model/method, or all: " + ", ".join(CELLS)
    )
    parser.add_argument(
        "--trial-steps", type=int, default=15, help="steps of each attention trial (last 2/3 timed)"
    )
    parser.add_argument(
        "--hf-attention",
        default="trial",
        choices=("trial", "sdpa", "eager"),
        help="the transformers side's attention: the faster of a trial of each (default), or this one",
    )
    parser.add_argument("--curve", type=int, default=0, help="instead of the cells: the loss curves, N steps")
    parser.add_argument("--model", default="flan-t5-base", help="--curve: the model (a folder of assets/)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the first T5 cell's second flantune run from the compile cache")
    parser.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hf_worker is not None:
        hf_worker(json.loads(args.hf_worker))
        return
    cells = list(CELLS) if args.cells == "all" else [c.strip() for c in args.cells.split(",") if c.strip()]
    unknown = [c for c in cells if c not in CELLS + CHECK_CELLS]
    if unknown:
        parser.error(f"--cells: unknown {', '.join(unknown)}; choose from {', '.join(CELLS + CHECK_CELLS)}")
    if args.steps < 2 or args.trial_steps < 3 or args.curve < 0:
        parser.error("--steps must be at least 2, --trial-steps at least 3, --curve at least 0")

    shared = Path(args.shared).resolve()
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        **{name: importlib.metadata.version(name) for name in ("torch", "transformers", "peft", "accelerate")},
        "date": time.strftime("%Y-%m-%d %H:%M"), "batch": args.batch,
    }  # fmt: skip
    if not args.curve:
        result |= {
            "steps": args.steps,
            "trial_steps": args.trial_steps,
            "steady_rule": STEADY_RULE,
            "cells": [],
        }
    print(json.dumps({k: v for k, v in result.items() if k != "cells"}), flush=True)

    def write() -> None:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))

    # A stopped benchmark stops its run too: SIGTERM becomes SystemExit, on which subprocess.run
    # kills the child it waits for.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="recipe-speed-"))
    (work / "inductor").mkdir()
    (work / "inductor-cold").mkdir()
    first_t5 = next((c for c in cells if c.startswith("flan-t5")), None)
    started = time.perf_counter()
    try:
        if args.curve:
            result["curve"] = run_curve(args, work, shared)
            write()
        else:
            for cell in cells:
                row = run_cell(cell, args, work, shared, cold_cache=cell == first_t5)
                result["cells"].append(asdict(row))
                show(row)
                write()
    except RuntimeError as e:  # a run failed (SubprocessFailed), or both attention trials did
        write()
        sys.exit(f"{e}\n\nstopped; figures so far in {args.out}, every run's output in {work}")
    result["seconds"] = time.perf_counter() - started
    write()
    shutil.rmtree(work, ignore_errors=True)
    print(f"written {args.out} ({result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
