"""Load encoder-decoder models and their tokenizers: pretrained, or freshly built from a config.

Anything `AutoModelForSeq2SeqLM` loads works (T5, FLAN-T5, mT5, BART, ...). Two things need care:

- T5 v1.1 / FLAN-T5 / mT5 have an lm_head that is NOT tied to the input embeddings. transformers 5
  forces `tie_word_embeddings=True` on T5Config and ties the head when a model is built from a
  config (it unties it only when a checkpoint holds `lm_head.weight`). `init: random` therefore
  unties the head again whenever the config file says `tie_word_embeddings: false`, so a random
  model has the published shape (flan-t5-small: 77.0M parameters, not 60.5M).
- Added special tokens (e.g. <think>) need embedding rows. T5 checkpoints already have 28 spare rows
  (32128 rows for 32100 tokens), so the matrix only grows when the tokenizer outgrows it; it never
  shrinks. The rows of new tokens start at the mean of the existing vocabulary's rows, in the
  input embeddings and in an untied head alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, PretrainedConfig

from flantune.errors import ModelLoadError  # re-exported: flantune.models.ModelLoadError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    added_token_ids: list[int]
    """Ids of the tokens from model.add_tokens that were new to the tokenizer (their rows are fresh)."""


def is_local(path: str) -> bool:
    """A path that looks like a folder on disk (rather than a hub id like google/flan-t5-base)."""
    return Path(path).exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def _check_path(path: str, init: str, what: str = "model.path") -> None:
    """Refuse a local-looking `path` that is not a model folder; `what` names the key or flag it came from."""
    if not is_local(path):
        return
    folder = Path(path).expanduser()
    if not folder.is_dir():
        kind = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ModelLoadError(f"{what}: folder {path} {kind} (give a local model folder or a hub id)")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{what}: {path} has no config.json; is it a Hugging Face model folder?")
    if init == "pretrained" and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLoadError(
            f"{what}: {path} has a config.json but no weights (*.safetensors or *.bin). "
            "Use model.init=random to build a randomly initialised model of this shape."
        )


def _hub_hint(path: str) -> str:
    return (
        "" if is_local(path) else " (offline? the hub is unreachable and the model is not in the local cache)"
    )


def model_type(path: str, revision: str | None = None, what: str = "model.path") -> str:
    """The `model_type` of a folder's or hub id's config (t5, bart, ...), checked: a path that is no
    model folder, a malformed hub id or an unreachable one raises ModelLoadError naming `what`.

    Cheap (one config file), so commands call it before building anything."""
    _check_path(path, "random", what)
    try:
        return AutoConfig.from_pretrained(path, revision=revision).model_type
    except (OSError, ValueError) as e:  # a malformed hub id is a ValueError
        raise ModelLoadError(
            f"{what}: cannot read the model config of {path!r}{_hub_hint(path)}: {e}"
        ) from None


def load_tokenizer(path: str, revision: str | None = None, what: str = "model.path"):
    folder = Path(path).expanduser()
    if is_local(path) and not folder.is_dir():  # an adapter folder has a tokenizer but no config.json
        kind = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ModelLoadError(f"{what}: folder {path} {kind} (give a local model folder or a hub id)")
    try:
        return AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{what}: cannot load a tokenizer from {path!r}{_hub_hint(path)}: {e}") from None


def add_special_tokens(tokenizer, tokens: list[str]) -> list[int]:
    """Add tokens that are never split or lowercased; returns the ids of those that were new.

    Tokens the tokenizer already has (e.g. reloading a fine-tuned model) are left alone, so their
    trained embedding rows are not reset.
    """
    before = len(tokenizer)
    if tokens:
        tokenizer.add_tokens(list(tokens), special_tokens=True)
    return list(range(before, len(tokenizer)))


def config_ties_embeddings(path: str, revision: str | None = None) -> bool:
    """What the config FILE says about tying (transformers 5 overrides it on T5Config objects)."""
    raw, _ = PretrainedConfig.get_config_dict(path, revision=revision)
    return bool(raw.get("tie_word_embeddings", True))


def untie_lm_head(model: torch.nn.Module) -> None:
    """Give the model its own lm_head weight, freshly initialized, and record it in the config."""
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    # T5 initializes its untied lm_head as N(0, initializer_factor²), the same law as the embeddings.
    std = float(getattr(model.config, "initializer_factor", 1.0))
    weight = torch.empty_like(embeddings, requires_grad=False).normal_(0.0, std)
    head.weight = torch.nn.Parameter(weight)
    model.config.tie_word_embeddings = False


def heads_are_tied(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def load_model(
    path: str,
    *,
    init: str = "pretrained",
    dtype: str = "float32",
    tokenizer=None,
    revision: str | None = None,
    seed: int = 0,
    quantization_config=None,
    what: str = "model.path",
) -> torch.nn.Module:
    """An encoder-decoder model from a hub id or folder, pretrained or randomly initialized.

    When `tokenizer` holds more tokens than the embedding matrix has rows, the embeddings (and an
    untied head) grow to fit. `what` names the key or flag `path` came from, for messages.
    """
    _check_path(path, init, what)
    try:
        if init == "random" and quantization_config is not None:
            model = _random_quantized(path, dtype, revision, seed, quantization_config)
        elif init == "random":
            config = AutoConfig.from_pretrained(path, revision=revision)
            torch.manual_seed(seed)
            model = AutoModelForSeq2SeqLM.from_config(config, dtype=DTYPES.get(dtype, torch.float32))
            if not config_ties_embeddings(path, revision) and heads_are_tied(model):
                untie_lm_head(model)
        else:
            kwargs = {"revision": revision, "dtype": "auto" if dtype == "auto" else DTYPES[dtype]}
            if quantization_config is not None:
                kwargs["quantization_config"] = quantization_config
            model = AutoModelForSeq2SeqLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"{what}: cannot load {path!r}{_hub_hint(path)}: {e}") from None
    except ValueError as e:
        raise ModelLoadError(
            f"{what}: {path!r} is not an encoder-decoder model AutoModelForSeq2SeqLM loads: {e}"
        ) from None
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


def _random_quantized(path: str, dtype: str, revision, seed: int, quantization_config):
    """A random model of `path`'s shape, quantized: bitsandbytes quantizes while loading weights,
    so the random weights are written to a temporary folder and loaded back through it."""
    import tempfile

    model = load_model(
        path, init="random", dtype="bfloat16" if dtype == "float32" else dtype, revision=revision, seed=seed
    )
    with tempfile.TemporaryDirectory(prefix="flantune-random-") as folder:
        model.save_pretrained(folder)
        del model
        return AutoModelForSeq2SeqLM.from_pretrained(
            folder, quantization_config=quantization_config, dtype=torch.bfloat16
        )


def fit_embeddings(model: torch.nn.Module, tokenizer, new_ids: list[int] = ()) -> None:
    """Grow the embeddings when the tokenizer outgrew them; start `new_ids`' rows at the vocabulary mean."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # mean_resizing=False: we set the new rows ourselves below, the same way for every model.
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=False)
    if not new_ids:
        return
    ids = torch.tensor(list(new_ids))
    base_vocab = min(new_ids)
    with torch.no_grad():
        tables = [model.get_input_embeddings().weight]
        if not heads_are_tied(model) and model.get_output_embeddings() is not None:
            tables.append(model.get_output_embeddings().weight)
        for table in tables:  # (V, d_model)
            table[ids] = table[:base_vocab].float().mean(dim=0).to(table.dtype)


def load_model_and_tokenizer(model_cfg, *, seed: int = 0, quantization_config=None) -> LoadedModel:
    """Build both from a recipe's `model` section."""
    tokenizer = load_tokenizer(model_cfg.path, model_cfg.revision)
    new_ids = add_special_tokens(tokenizer, model_cfg.add_tokens)
    model = load_model(
        model_cfg.path,
        init=model_cfg.init,
        dtype=model_cfg.dtype,
        revision=model_cfg.revision,
        seed=seed,
        quantization_config=quantization_config,
    )
    fit_embeddings(model, tokenizer, new_ids)
    return LoadedModel(model=model, tokenizer=tokenizer, added_token_ids=new_ids)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tensor shared by two modules counts once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
