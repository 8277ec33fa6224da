"""The final/ folder: what a run hands to every later command (rl, eval, generate, serve, merge).

A final/ folder is in standard Hugging Face form — a PEFT adapter folder, a full model folder, or
a bottleneck adapter folder (flantune.adapters) — with the tokenizer beside it, plus
flantune.json: the method it was trained with and how to rebuild the base it was trained on (a
random-init base has no weights to load, only the seed that made them). Plain transformers and
PEFT load it without flantune. This module alone writes, reads and loads it:

    BaseRecord      the base a result was trained on: path, init, seed, revision
    FinalInfo       what a folder holds (`read_final`): full model or adapter, which method, its base
    write_final     a run's result, written atomically
    load_final      model + tokenizer from a final/ folder, a model folder or a hub id: for
                    generation, or trainable (RL continues it); one adapter or several on one base
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flantune import checkpoint as ckpt
from flantune.config import MethodConfig
from flantune.models import ModelLoadError, fit_embeddings, is_local, load_model, load_tokenizer

RECORD_FILE = "flantune.json"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_METHODS = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix"}
"""A PEFT adapter's type → the flantune method that makes it (QLoRA saves a LORA adapter)."""


@dataclass(frozen=True)
class BaseRecord:
    """How to rebuild the base model: `load_model(path, init=init, seed=seed, revision=revision)`."""

    path: str | None
    init: str = "pretrained"
    seed: int = 0
    revision: str | None = None

    @classmethod
    def of(cls, model_cfg, seed: int) -> BaseRecord:
        """The base a recipe's `model` section builds (the seed makes a random init's weights)."""
        return cls(path=model_cfg.path, init=model_cfg.init, seed=seed, revision=model_cfg.revision)

    def is_model(self, path: str) -> bool:
        """Whether `path` names this base (the same folder, or the same hub id)."""
        if self.path is None:
            return False
        if is_local(self.path) and is_local(path):
            return Path(self.path).expanduser().resolve() == Path(path).expanduser().resolve()
        return self.path == path

    def on(self, path: str) -> BaseRecord:
        """The record for loading `path`: this one when it names this base, else `path` pretrained."""
        return self if self.is_model(path) else BaseRecord(path=path)


@dataclass(frozen=True)
class FinalInfo:
    """What a model folder holds."""

    folder: Path
    kind: str
    """full (a model folder), peft (a PEFT adapter) or bottleneck (flantune.adapters)."""
    method: str
    """The method that made it: full, lora, qlora, ia3, prefix or adapter."""
    base: BaseRecord
    """The base it was trained from (path None when nothing says): an adapter goes on it."""
    has_tokenizer: bool

    @property
    def is_adapter(self) -> bool:
        return self.kind != "full"


def read_final(folder: str | Path) -> FinalInfo | None:
    """What a local model folder holds; None for a hub id or a folder that is not a model folder.

    flantune.json says the method and the base; PEFT's `base_model_name_or_path` is the fallback for
    adapters made elsewhere.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return None
    record = {}
    if (folder / RECORD_FILE).is_file():
        record = json.loads((folder / RECORD_FILE).read_text())
    base = record.get("base") or {}
    has_tokenizer = (folder / "tokenizer_config.json").is_file()
    if (folder / ADAPTER_CONFIG).is_file():
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        bottleneck = config.get("kind") == "bottleneck"
        peft_type = None if bottleneck else str(config.get("peft_type", "LORA")).upper()
        if not base.get("path") and config.get("base_model_name_or_path"):
            base = {"path": config["base_model_name_or_path"]}
        kind = "bottleneck" if bottleneck else "peft"
        method = record.get("method") or ("adapter" if bottleneck else PEFT_METHODS.get(peft_type, "lora"))
    elif (folder / "config.json").is_file():
        kind, method = "full", "full"
    else:
        return None
    return FinalInfo(
        folder=folder, kind=kind, method=method,
        base=BaseRecord(path=base.get("path"), init=base.get("init", "pretrained"), seed=base.get("seed", 0),
                        revision=base.get("revision")),
        has_tokenizer=has_tokenizer,
    )  # fmt: skip


def write_final(model, tokenizer, directory: Path, method_kind: str, base: BaseRecord) -> None:
    """Write a run's result to `directory` atomically (a kill leaves the previous one or none):
    a PEFT adapter folder, a bottleneck adapter folder or a full model folder, the tokenizer, and
    flantune.json."""
    from peft import PeftModel

    with ckpt.atomic_dir(directory) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp)
        elif method_kind == "adapter":
            from flantune import adapters

            adapters.save_adapters(model, tmp)
        else:
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps({"method": method_kind, "base": asdict(base)}, indent=2))


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    base: BaseRecord
    """The base the model was built on."""
    adapters: dict[str, FinalInfo]
    """The adapters loaded on it, by name (empty for a full model)."""

    @property
    def method(self) -> str:
        """The method of the loaded result (full when no adapter is loaded)."""
        return next(iter(self.adapters.values())).method if self.adapters else "full"


def load_final(
    source: str | dict[str, str],
    *,
    base: str | None = None,
    recorded_by: str | None = None,
    trainable: bool = False,
    method: MethodConfig | None = None,
    gradient_checkpointing: bool = False,
    dtype: str = "float32",
    device: str | None = None,
    what: str = "--model",
    base_what: str | None = None,
    other_base: bool = False,
) -> Loaded:
    """Model and tokenizer from a run's final/, a model folder or a hub id.

    source: a full model (folder or hub id) or an adapter folder; or {name: adapter folder} to load
        several adapters on one base under those names (they must share the base and the tokenizer).
    base: the base an adapter goes on; default the one recorded beside it. When it names the
        recorded base, the record's init and seed rebuild it (a random-init base holds no weights).
    recorded_by: an adapter folder whose record to use for a full `source` that names its base
        (a comparison against the base a random-init adapter was trained on).
    trainable: for more training (RL): the adapter's weights train (method.kind is taken from the
        folder; `method` gives the rest, e.g. QLoRA's bits); a full model trains every weight. The
        model stays on the CPU for Accelerate to place. Otherwise it goes to `device` (default CUDA
        when available) in eval mode.
    what: the flag or key the user gave `source` with, for messages.
    base_what: the flag the user gave `base` with (default: the base recorded beside `what`).
    other_base: let an adapter go on another `base` than the one recorded beside it (the user's
        --other-base). Without it such a base is refused: an adapter on another base of the same
        shape would load without a word and answer wrongly.
    """
    from dataclasses import replace

    named = source if isinstance(source, dict) else None
    infos = {name: _adapter_info(path, what) for name, path in named.items()} if named else {}
    if named is None:
        info = read_final(source)
        if info is not None and info.is_adapter:
            infos = {"default": info}
        elif info is None and is_local(source) and not Path(source).expanduser().exists():
            raise ModelLoadError(
                f"{what}: {source} does not exist (give a model folder, a run's final/ or a hub id)"
            )
    record = _base_of(infos, base, what, other_base)
    if not infos:
        path = str(source)
        record = BaseRecord(path=path)
        if recorded_by is not None and (by := read_final(recorded_by)) is not None:
            record = by.base.on(path)
    quantization = None
    if trainable:
        from flantune.methods import quantization_config

        # The method is the one the folder was trained with; `method` gives its other settings.
        kind = next(iter(infos.values())).method if infos else "full"
        method = replace(method or MethodConfig(), kind=kind)
        quantization = quantization_config(method)
    if not infos:
        model_what = what
    elif base is not None and base_what:
        model_what = base_what
    else:
        model_what = f"{what} (the base recorded with the adapter)"
    tokenizer = _tokenizer(infos, record, model_what)
    model = load_model(record.path, init=record.init, seed=record.seed, revision=record.revision,
                       dtype=dtype, quantization_config=quantization, what=model_what)  # fmt: skip
    fit_embeddings(model, tokenizer)  # the result's tokenizer may hold added tokens
    if trainable:
        model = _trainable(model, infos, method, gradient_checkpointing)
        return Loaded(model, tokenizer, record, infos)
    for name, info in infos.items():
        model = _attach(model, info, name, record, what)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return Loaded(model, tokenizer, record, infos)


def _adapter_info(path: str, what: str) -> FinalInfo:
    info = read_final(path)
    if info is None or not info.is_adapter:
        raise ModelLoadError(
            f"{what}: {path} has no {ADAPTER_CONFIG}; give an adapter folder (a run's final/)"
        )
    return info


def _base_of(
    infos: dict[str, FinalInfo], base: str | None, what: str, other_base: bool = False
) -> BaseRecord | None:
    """The one base every adapter goes on: `base` (with a matching record's init and seed), else
    the recorded one. Another base than the recorded one only with `other_base`."""
    if not infos:
        return None
    if base is not None and (given := read_final(base)) is not None and given.is_adapter:
        raise ModelLoadError(f"{what}: {base} is an adapter folder; give the base model there")
    if base is not None and not other_base:
        for info in infos.values():
            if info.base.path is not None and not info.base.is_model(base):
                raise ModelLoadError(
                    f"{what}: {info.folder} was trained on {info.base.path}, not {base}: give that base, "
                    "or confirm that this one has the same weights with --other-base"
                )
    if base is None:
        paths = {info.base.path for info in infos.values()}
        if None in paths:
            folder = next(info.folder for info in infos.values() if info.base.path is None)
            raise ModelLoadError(f"{what}: {folder}: the adapter does not say its base model; give the base")
        if len(paths) > 1:
            raise ModelLoadError(
                f"{what}: the adapters were trained on different bases ({sorted(paths)}); give one"
            )
        base = paths.pop()
    records = {info.base.on(base) for info in infos.values()}
    if len(records) > 1:
        raise ModelLoadError(
            f"{what}: {', '.join(str(i.folder) for i in infos.values())} were trained on differently "
            f"initialised copies of {base} (init/seed differ in their {RECORD_FILE}) and cannot share one base"
        )
    return records.pop()


def _tokenizer(infos: dict[str, FinalInfo], record: BaseRecord, what: str):
    """The tokenizer saved with the adapters (it may hold added tokens), else the base's. Adapters
    on one base must agree on it: one embedding table serves them all."""
    chosen, chosen_from = None, None
    for info in infos.values():
        if not info.has_tokenizer:
            continue
        tokenizer = load_tokenizer(str(info.folder), what=str(info.folder))
        if chosen is None:
            chosen, chosen_from = tokenizer, info.folder
        elif tokenizer.get_vocab() != chosen.get_vocab():
            raise ModelLoadError(
                f"{info.folder}: its tokenizer differs from {chosen_from}'s (added tokens?); adapters "
                "loaded on one base must share one vocabulary"
            )
    return chosen or load_tokenizer(record.path, record.revision, what=what)


def _attach(model, info: FinalInfo, name: str, record: BaseRecord, what: str):
    """`info`'s adapter on `model` under `name`, frozen."""
    try:
        if info.kind == "bottleneck":
            from flantune.adapters import load_adapters

            load_adapters(model, str(info.folder))
            return model
        from peft import PeftModel

        if isinstance(model, PeftModel):
            model.load_adapter(str(info.folder), adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, str(info.folder), adapter_name=name)
    except (RuntimeError, ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise ModelLoadError(
            f"{what}: the adapter {info.folder} does not fit {record.path}: {str(e).splitlines()[0]}"
        ) from None


def _trainable(model, infos: dict[str, FinalInfo], method, gradient_checkpointing: bool):
    """The loaded result made trainable with its own method (flantune.methods)."""
    from flantune.methods import apply_method

    if len(infos) > 1:
        raise ModelLoadError("one adapter at a time can be loaded for training")
    info = next(iter(infos.values()), None)
    return apply_method(model, method, gradient_checkpointing=gradient_checkpointing,
                        adapter_path=None if info is None else str(info.folder))  # fmt: skip
