"""flantune quickstart: the whole job on an embedded default, with no network and no files.

1. Make a small text-to-text task: sort a handful of letters ("sort: q c m a" -> "a c m q").
2. Train a word-level tokenizer on it and write a small T5 (v1.1 architecture) config beside it.
3. Score the randomly initialized model on held-out rows (exact match).
4. Fine-tune it with the same engine as `flantune train` (full or LoRA), from a recipe. LoRA adapts
   a trained model, not noise: with --method lora the small model first learns to copy and reverse
   letters (full fine-tuning), and LoRA then teaches that base to sort.
5. Score it again on the same rows and print the improvement.

Everything lands in one run folder, which can be inspected like any other run.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from flantune.config import GenerationConfig, recipe_from_dict

SMALL_T5 = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "d_model": 128,
    "d_ff": 256,
    "d_kv": 32,
    "num_heads": 4,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0,
    "tie_word_embeddings": False,
    "is_encoder_decoder": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}


def make_rows(n: int, rng: random.Random, op: str = "sort") -> list[dict[str, str]]:
    """`op: letters` -> the letters sorted (the task), or copied/reversed (what a LoRA base learns first)."""
    rows = []
    for _ in range(n):
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 6))
        answer = {"sort": sorted(letters), "copy": letters, "reverse": letters[::-1]}[op]
        rows.append({"text": f"{op}: " + " ".join(letters), "sorted": " ".join(answer)})
    return rows


def build_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over the task's words, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "sort:": 3, "copy:": 4, "reverse:": 5}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    config = dict(SMALL_T5, vocab_size=len(vocab))
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def quickstart(
    out: Path, method: str = "full", steps: int = 300, seed: int = 0, console=None
) -> dict[str, float]:
    """Run the embedded default end to end; returns the before/after exact match."""
    from rich.console import Console
    from rich.table import Table

    from flantune.decoding import generate_texts
    from flantune.final import load_final
    from flantune.metrics import compute_metrics
    from flantune.models import load_model, load_tokenizer
    from flantune.run import TrainingError
    from flantune.train import train

    console = console or Console()
    if out.exists() and any(out.iterdir()):
        raise TrainingError(f"--out {out} already exists and is not empty; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = out / "model", out / "data"
    model_dir.mkdir(exist_ok=True)
    data_dir.mkdir(exist_ok=True)
    rng = random.Random(seed)
    write_jsonl(data_dir / "train.jsonl", make_rows(4000, rng))
    test_rows = make_rows(200, rng)
    write_jsonl(data_dir / "test.jsonl", test_rows)
    build_tokenizer(model_dir)
    base_dir, init = model_dir, "random"
    if method == "lora":
        rows = make_rows(2000, rng, "copy") + make_rows(2000, rng, "reverse")
        write_jsonl(data_dir / "base.jsonl", rows)
        console.print("building a base model for LoRA: full fine-tuning on copy/reverse", highlight=False)
        base = train(
            _recipe(model_dir, "random", "full", data_dir / "base.jsonl", None, out / "base", steps, seed),
            console=console,
        )
        base_dir, init = base.final_dir, "pretrained"
    recipe = _recipe(
        base_dir, init, method, data_dir / "train.jsonl", data_dir / "test.jsonl", out / "run", steps, seed
    )

    generation = GenerationConfig(max_new_tokens=12)
    sources = [r["text"] for r in test_rows]
    references = [[r["sorted"]] for r in test_rows]
    tokenizer = load_tokenizer(str(model_dir))

    def score(model) -> float:
        predictions = generate_texts(model, tokenizer, sources, generation, batch_size=100)
        return compute_metrics(["exact_match"], predictions, references)["exact_match"]

    # The same seed builds the same random weights that training starts from.
    before = score(load_model(str(base_dir), init=init, seed=seed))
    console.print(
        f"before fine-tuning: exact match {before:.1f} on {len(sources)} held-out rows", highlight=False
    )
    result = train(recipe, console=console)

    tuned = load_final(str(result.final_dir), device="cpu").model
    after = score(tuned)
    table = Table(title="quickstart: sort letters, exact match on 200 held-out rows")
    for column in ("model", "exact match"):
        table.add_column(column)
    table.add_row(
        "before" + (" (random init)" if init == "random" else " (base: copy/reverse)"), f"{before:.1f}"
    )
    table.add_row(f"fine-tuned, {method} ({steps} steps)", f"{after:.1f}")
    table.add_row("improvement", f"{after - before:+.1f}")
    console.print(table)
    console.print(f"run folder: {out}  (final model in {result.final_dir})", highlight=False)
    return {"before": before, "after": after}


def _recipe(
    model: Path,
    init: str,
    method: str,
    train_file: Path,
    eval_file: Path | None,
    out: Path,
    steps: int,
    seed: int,
):
    return recipe_from_dict({
        "model": {"path": str(model), "init": init},
        "method": {"kind": method, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {
            "task": "template",
            "task_options": {"source": "{text}", "target": "{sorted}", "metrics": ["exact_match"]},
            "train": str(train_file),
            **({"eval": {"path": str(eval_file), "rows": "0:100"}} if eval_file else {}),
            "max_source_tokens": 16,
            "max_target_tokens": 16,
        },
        "train": {
            "max_steps": steps, "batch_size": 32, "lr": 3e-3 if method == "full" else 2e-3,
            "schedule": "cosine", "warmup_steps": 30, "seed": seed, "log_every": 50,
            **({"eval_every": steps // 2} if eval_file else {}),
            "precision": "fp32",
        },
        "eval": {"batch_size": 100},
        "generation": {"max_new_tokens": 12},
        "output_dir": str(out),
    })  # fmt: skip
