"""The `flantune` command: a thin layer over one function per command.

Every command that takes a recipe accepts `section.key=value` overrides after it. Errors a user can
fix (a bad recipe, a missing file, a bad row) print one clear message and exit with status 2; they
never end in a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated

# Quiet third-party chatter before those libraries are imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from flantune.config import ConfigError, Recipe, RecipeWarning, load_recipe

app = typer.Typer(
    name="flantune",
    help="Fine-tune encoder-decoder language models (FLAN-T5, T5, BART, mT5) on text-to-text tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Look at a recipe's data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")



def _console(stderr: bool = False) -> Console:
    """rich cuts what it prints to 80 columns when the output is not a terminal (a log file, a pipe),
    and tables then lose their numbers (`sour…  p50/…`): there the width is 200, unless COLUMNS
    sets one."""
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=200 if wide else None)


console = _console()
err_console = _console(stderr=True)

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file.", show_default=False)]
OtherBaseOpt = Annotated[
    bool,
    typer.Option(
        "--other-base",
        help="Load the adapter on another base than the one recorded beside it (same shape and weights).",
    ),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides as section.key=value, e.g. train.lr=1e-4.", show_default=False),
]


class UsageError(ValueError):
    """A command-line flag or argument is wrong; the message names it as the user typed it."""


def flag_problems(problems: list[str], section: str) -> list[str]:
    """Config problems (`generation.max_new_tokens: ...`) named by their flags (`--max-new-tokens: ...`)."""
    prefix = section + "."
    return [
        "--" + p[len(prefix) :].replace("_", "-", p[len(prefix) :].index(":")) if p.startswith(prefix) else p
        for p in problems
    ]


def user_errors(fn):
    """Print user-fixable errors as one line on stderr and exit 2; let real bugs raise."""
    # flantune.errors holds them all, so that decorating the commands imports none of the modules
    # that raise them (torch, transformers, rouge: seconds of every command's start).
    from flantune.errors import USER_ERRORS, RunInterrupted
    from flantune.tasks import TaskError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RunInterrupted as e:  # not an error: stopped on request, after a checkpoint
            err_console.print(
                Text.assemble(("stopped:", "bold"), " ", str(e)), highlight=False, soft_wrap=True
            )
            sys.exit(130)
        except (UsageError, ConfigError, TaskError, *USER_ERRORS) as e:
            fail(str(e))

    return wrapper


def fail(message: str) -> None:
    """Print a user-fixable error as one message on stderr and exit with status 2."""
    # The message may hold user text such as `[/INST]`, `sciq[train]` or a path ending in a
    # backslash: it is printed as plain text, never read as markup.
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True)
    sys.exit(2)


def plain(*values: object) -> list[Text]:
    """Table cells or headers that print verbatim: user text (paths, labels, model names) is no markup."""
    return [Text(str(v)) for v in values]


def _recipe(path: str, overrides: list[str] | None) -> Recipe:
    """The recipe, loaded; a retired key it still reads (config.RecipeWarning) is said in one line."""
    import warnings

    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RecipeWarning)
            return load_recipe(path, overrides or [])
    finally:  # said also when the recipe has errors besides; other warnings go on as they came
        for warning in caught:
            if issubclass(warning.category, RecipeWarning):
                err_console.print(Text.assemble(("warning:", "bold yellow"), f" recipe {path}: {warning.message}"),
                                  highlight=False, soft_wrap=True)  # fmt: skip
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


@app.command("tasks")
def tasks_command() -> None:
    """List the built-in tasks with their metrics."""
    from flantune.tasks import TASK_NAMES, build_task

    table = Table(title="built-in tasks")
    for column in ("task", "metrics", "labels", "what"):
        table.add_column(column)
    for name in TASK_NAMES:
        options = {"source": "{text}", "target": "{label}"} if name == "template" else None
        task = build_task(name, options)
        labels = ", ".join(task.labels) if task.labels else ""
        table.add_row(*plain(name, ", ".join(task.metrics), labels, task.description))
    console.print(table)


@app.command("check")
@user_errors
def check_command(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Validate a recipe and print it resolved: what it extends merged in, every default filled in."""
    from flantune.config import dump_recipe

    console.print(dump_recipe(_recipe(recipe, overrides)), highlight=False, markup=False)


@data_app.command("preview")
@user_errors
def data_preview_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    n: Annotated[int, typer.Option("--n", "-n", help="Examples to print per split.")] = 3,
) -> None:
    """Print formatted examples and a length report for every split of a recipe."""
    from flantune.data import load_splits, split_summary
    from flantune.models import add_special_tokens, load_tokenizer

    cfg = _recipe(recipe, overrides)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.revision)
    add_special_tokens(tokenizer, cfg.model.add_tokens)
    splits = load_splits(cfg.data, tokenizer, seed=cfg.train.seed)
    if not splits:
        raise ConfigError(
            ["data: the recipe names no split (set data.train, data.eval or data.test)"], recipe
        )
    for split in splits.values():
        console.rule(Text.assemble((split.name, "bold"), f" · {split.report.origin}"))
        for i in range(min(n, len(split.dataset))):
            row = split.dataset[i]
            for name, style, ids in (("source", "cyan", "input_ids"), ("target", "green", "labels")):
                console.print(
                    Text.assemble((name, style), f" ({len(row[ids])} tokens): ", row[name]), highlight=False
                )
            console.print()
    console.print(length_table([s.report for s in splits.values()], splits_cfg=cfg))
    for split in splits.values():
        console.print(split_summary(split.report), highlight=False, markup=False)


@app.command("train")
@user_errors
def train_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from the last checkpoint (train.resume=true).")
    ] = False,
    restart: Annotated[
        bool,
        typer.Option(
            "--restart", help="Start again from scratch in a folder holding a run (train.restart=true)."
        ),
    ] = False,
) -> None:
    """Fine-tune a model as a recipe says; writes output_dir/ with metrics, checkpoints and final/."""
    from flantune.train import train

    flags = [*(["train.resume=true"] if resume else []), *(["train.restart=true"] if restart else [])]
    cfg = _recipe(recipe, [*(overrides or []), *flags])
    train(cfg, console=console)


@app.command("rl")
@user_errors
def rl_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last RL checkpoint.")] = False,
    restart: Annotated[
        bool, typer.Option("--restart", help="Start the RL run again from scratch (rl.restart=true).")
    ] = False,
) -> None:
    """Reinforcement learning after SFT: GRPO with the recipe's rewards; writes rl.output_dir."""
    from flantune.rl import run_rl

    flags = [*(["rl.resume=true"] if resume else []), *(["rl.restart=true"] if restart else [])]
    cfg = _recipe(recipe, [*(overrides or []), *flags])
    run_rl(cfg, console=console)


@app.command("quickstart")
@user_errors
def quickstart_command(
    out: Annotated[str, typer.Option("--out", help="Run folder.")] = "runs/quickstart",
    method: Annotated[str, typer.Option("--method", help="full or lora.")] = "full",
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps.")] = 300,
) -> None:
    """Train and evaluate a small model on an embedded task: no network, no files needed."""
    from pathlib import Path

    from flantune.quickstart import quickstart

    if method not in ("full", "lora"):
        raise UsageError(f"--method: expected full or lora, got {method!r}")
    quickstart(Path(out), method=method, steps=steps, console=console)


@app.command("generate")
@user_errors
def generate_command(
    model: Annotated[str, typer.Argument(help="Base or full model: a folder or hub id.", show_default=False)],
    adapter: Annotated[str | None, typer.Option(help="A PEFT or bottleneck adapter folder.")] = None,
    other_base: OtherBaseOpt = False,
    input: Annotated[list[str] | None, typer.Option("--input", help="Input text (repeatable).")] = None,
    file: Annotated[str | None, typer.Option("--file", help="JSON lines with a 'source' field.")] = None,
    field: Annotated[str, typer.Option(help="The input field of --file rows.")] = "source",
    out: Annotated[str | None, typer.Option(help="Write JSON lines here instead of stdout.")] = None,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    early_stopping: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 50,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    batch_size: Annotated[
        str, typer.Option(help="Inputs decoded together: a number, or auto (on a GPU as many as fit, up to 128).")
    ] = "auto",
    labels: Annotated[
        list[str] | None, typer.Option("--label", help="Restrict outputs to these strings (repeatable).")
    ] = None,
) -> None:
    """Generate outputs for --input texts or a --file of JSON lines, batched by length."""
    from flantune.config import GenerationConfig
    from flantune.generate import check_out, generate, read_inputs

    if bool(input) == bool(file):
        raise UsageError("give either --input TEXT (repeatable) or --file FILE.jsonl")
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, num_beams=num_beams, early_stopping=early_stopping, do_sample=do_sample,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )  # fmt: skip
    problems = flag_problems(cfg.check("generation"), "generation")
    if batch_size != "auto":
        if not batch_size.isdigit() or int(batch_size) < 1:
            problems.append(f"--batch-size: must be at least 1 or auto, got {batch_size}")
        else:
            batch_size = int(batch_size)
    if top_k < 0:
        problems.append(f"--top-k: must be 0 (off) or more, got {top_k}")
    if no_repeat_ngram_size < 0:
        problems.append(f"--no-repeat-ngram-size: must be 0 (off) or more, got {no_repeat_ngram_size}")
    if repetition_penalty <= 0:
        problems.append(f"--repetition-penalty: must be > 0, got {repetition_penalty}")
    if problems:
        raise UsageError("; ".join(problems))
    if out:
        check_out(out, [file] if file else [])
    sources = list(input) if input else read_inputs(file, field)
    generate(
        model, adapter, sources, cfg, batch_size=batch_size, labels=labels, out=out, other_base=other_base
    )


@app.command("merge")
@user_errors
def merge_command(
    adapter: Annotated[
        str, typer.Argument(help="A LoRA or IA3 adapter folder (e.g. a run's final/).", show_default=False)
    ],
    out: Annotated[str, typer.Option("--out", help="Folder for the merged model.")],
    base: Annotated[
        str | None, typer.Option(help="Base model; default: the one the adapter was trained on.")
    ] = None,
    other_base: OtherBaseOpt = False,
) -> None:
    """Fold an adapter into its base: a plain transformers model folder."""
    from flantune.export import merge

    console.print(
        f"merged model written to {merge(adapter, out, base, other_base)}", highlight=False, markup=False
    )


@app.command("export")
@user_errors
def export_command(
    folder: Annotated[
        str,
        typer.Argument(
            help="A run's final/ (a LoRA or IA3 adapter is merged into its base first) or a model folder.",
            show_default=False,
        ),
    ],
    to: Annotated[str, typer.Option("--to", help="The format: ctranslate2.", show_default=False)],
    quantization: Annotated[
        str | None,
        typer.Option(
            help="Weight type: int8, int8_float16, int8_bfloat16, int8_float32, int16, float16, bfloat16 or "
            "float32; default: the weights' own."
        ),
    ] = None,
    out: Annotated[str | None, typer.Option(help="Output folder; default: FOLDER-ctranslate2.")] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model of an adapter; default: the one it was trained on.")
    ] = None,
    other_base: OtherBaseOpt = False,
) -> None:
    """Convert a model or adapter for another inference engine (CTranslate2)."""
    from flantune.export import to_ctranslate2

    if to != "ctranslate2":
        raise UsageError(f"--to {to}: the export formats are: ctranslate2")
    written = to_ctranslate2(folder, out, quantization, base, other_base)
    console.print(f"CTranslate2 model written to {written}", highlight=False, markup=False)


@app.command("eval")
@user_errors
def eval_command(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    model: Annotated[
        str, typer.Option(help="Full model or base: a folder or hub id; or a run's final/.")
    ] = "",
    adapter: Annotated[str | None, typer.Option(help="A PEFT or bottleneck adapter folder.")] = None,
    compare: Annotated[
        list[str] | None,
        typer.Option(help="A model to evaluate on the same rows, as PATH or NAME=PATH (repeatable)."),
    ] = None,
    split: Annotated[str, typer.Option(help="test, eval (validation) or train.")] = "test",
    other_base: OtherBaseOpt = False,
    out: Annotated[str | None, typer.Option(help="Report folder; default output_dir/eval-SPLIT.")] = None,
    dtype: Annotated[
        str,
        typer.Option(help="Weights of every evaluated model: float32 (the scores of evaluation during "
                          "training), bfloat16 or float16 (half the memory; faster on a GPU)."),
    ] = "float32",
) -> None:
    """Generate on a split, score, and write predictions, metrics and a report (md + html)."""
    from flantune.evaluate import run_eval

    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    cfg = _recipe(recipe, overrides)
    if not model:
        raise UsageError("--model: give the model to evaluate (a folder, hub id, or a run's final/)")
    results = run_eval(cfg, model, adapter, compare, split, out, other_base=other_base, dtype=dtype)
    models = list(results["models"])
    table = Table(title=Text(f"{results['rows']} rows of the {split} split"))
    from flantune.evaluate import difference_label

    for column in ["metric", *models] + ([difference_label(models)] if len(models) >= 2 else []):
        table.add_column(Text(column), justify="left" if column == "metric" else "right")
    from flantune.evaluate import metric_rows

    for key, values in metric_rows(results):
        table.add_row(*plain(key, *values))
    console.print(table)
    console.print(f"report written to {results['out']}", highlight=False, markup=False)
    if results.get("card"):
        console.print(f"scores added to the model card {results['card']}", highlight=False, markup=False)
    elif results.get("card_note"):
        console.print(results["card_note"], highlight=False, markup=False)


@app.command("push")
@user_errors
def push_command(
    folder: Annotated[
        str, typer.Argument(help="A run's final/, a merged model, any model folder.", show_default=False)
    ],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repository, e.g. you/flan-t5-sciq-lora.")],
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
    token: Annotated[
        str | None, typer.Option(help="Hub token; default: HF_TOKEN or the saved login.")
    ] = None,
) -> None:
    """Upload a model or adapter folder to the Hugging Face Hub."""
    from flantune.export import push

    console.print(
        f"pushed {folder} to {push(folder, repo_id, private=private, token=token)}",
        highlight=False,
        markup=False,
    )


@app.command("serve")
@user_errors
def serve_command(
    model: Annotated[
        str | None, typer.Option(help="Base model: a folder or hub id; default: the adapters' recorded base.")
    ] = None,
    adapter: Annotated[
        list[str] | None, typer.Option("--adapter", help="An adapter to serve, as NAME=PATH (repeatable).")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="FLANTUNE_SERVE_TOKEN", help="Require 'Authorization: Bearer TOKEN' (not on /healthz)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cpu, ...; default: cuda when available.")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    max_input_tokens: Annotated[int, typer.Option(help="Tokens of one input.")] = 1024,
    max_new_tokens: Annotated[int, typer.Option(help="The largest max_new_tokens a request may ask.")] = 512,
    max_inputs: Annotated[int, typer.Option(help="Inputs in one request.")] = 64,
    max_body_bytes: Annotated[int, typer.Option(help="Size of a request body.")] = 1 << 20,
    timeout: Annotated[float, typer.Option(help="Seconds one request may take, queue included.")] = 60.0,
    max_batch: Annotated[int, typer.Option(help="Inputs generated together.")] = 32,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests (continuous batching: how long requests wait, while a batch decodes, to share one encoder pass).")] = 10.0,
    stream_interval_ms: Annotated[float, typer.Option(help="Continuous batching: hand a streamed request its tokens at most this often (its first token and its end at once; 0: every step). Larger: fewer, longer streamed pieces and less work on the HTTP side.")] = 0.0,
    mixed_batches: Annotated[
        bool, typer.Option(help="Let rows of different LoRA adapters (and the base) share one batch.")
    ] = True,
    continuous: Annotated[
        bool, typer.Option(help="Continuous batching: requests join the running batch at the next step (T5 models).")
    ] = True,
    other_base: OtherBaseOpt = False,
) -> None:
    """Serve a base model and its adapters: OpenAI's completions API, /v1/generate, /metrics, a playground at /."""
    from flantune.generate import GenerateError

    if not 1 <= port <= 65535:
        raise UsageError(f"--port: must be in 1-65535, got {port}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    try:
        from flantune.serve import Limits, build_app, run
    except ImportError as e:
        if e.name not in {"fastapi", "starlette", "uvicorn", "pydantic", "prometheus_client"}:
            raise
        raise GenerateError(
            f"flantune serve needs FastAPI, uvicorn and prometheus-client: pip install 'flantune[serve]' ({e})"
        ) from None
    limits = Limits(
        max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens, max_inputs=max_inputs,
        max_body_bytes=max_body_bytes, timeout_s=timeout, max_batch=max_batch, batch_wait_ms=batch_wait_ms,
        stream_interval_ms=stream_interval_ms,
    )  # fmt: skip
    from flantune.serve import ServeError

    try:
        served = build_app(
            model,
            adapter or [],
            limits=limits,
            token=token,
            device=device,
            dtype=dtype,
            mixed=mixed_batches,
            continuous=None if continuous else False,
            other_base=other_base,
        )
    except ServeError as e:
        fail(str(e))
    console.print(served.state.service.batching["line"], highlight=False, markup=False)
    console.print(f"serving on http://{host}:{port}/ (API docs at /docs)", highlight=False, markup=False)
    run(served, host, port)


def length_table(reports, splits_cfg: Recipe) -> Table:
    data = splits_cfg.data
    table = Table(
        title=f"lengths in tokens · limits {data.max_source_tokens} source / {data.max_target_tokens} target · "
        f"over-long rows: {data.overlong}"
    )
    for column in ("split", "rows", "bad rows", "left out", "source p50/p90/p99/max", "target p50/p90/p99/max",
                   "over-long src/tgt", "dropped", "truncated", "kept"):  # fmt: skip
        table.add_column(column, justify="right" if column != "split" else "left")
    for r in reports:
        src, tgt = r.percentiles("source"), r.percentiles("target")
        table.add_row(
            *plain(
                r.split,
                str(r.rows_read),
                str(r.bad_rows),
                str(r.left_out_by_task),
                "/".join(str(v) for v in src.values()),
                "/".join(str(v) for v in tgt.values()),
                f"{r.overlong_source}/{r.overlong_target}",
                str(r.dropped),
                str(r.truncated),
                str(r.kept),
            )
        )
    return table


@app.callback()
def _setup() -> None:
    """Keep the terminal for flantune's own progress: no per-file loading bars from transformers."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def main() -> None:  # pragma: no cover - the console script's entry point
    try:
        app()
    finally:
        # The interpreter's last garbage collections walk every object the command made (a GPU run's
        # compilation leaves millions): 3 s at the end of a small CPU run, for memory the process is
        # about to give back whole. Frozen objects are left out of them.
        import gc

        gc.freeze()


if __name__ == "__main__":  # pragma: no cover
    main()
