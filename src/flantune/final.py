"""The final/ folder: what a run hands to every later command (rl, eval, generate, serve, merge).

A final/ folder is in standard Hugging Face form — a PEFT adapter folder, a full model folder, or
a bottleneck adapter folder (flantune.adapters) — with the tokenizer beside it, plus
flantune.json: the method it was trained with and how to rebuild the base it was trained on (a
random-init base has no weights to load, only the seed that made them). Plain transformers and
PEFT load it without flantune. This module alone writes, reads and loads it:

    BaseRecord      the base a result was trained on: path, init, seed, revision
    FinalInfo       what a folder holds (`read_final`): full model or adapter, which method, its base
    write_final     a run's result, written atomically, with its model card (README.md)
    load_final      model + tokenizer from a final/ folder, a model folder or a hub id: for
                    generation, or trainable (RL continues it); one adapter or several on one base
    write_card      the Hugging Face model card: metadata the Hub reads, the recipe, the result,
                    how to load it (every writer of a model folder calls it: train, rl, merge, push)
    add_scores      `flantune eval`'s scores into a card's model-index
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flantune import checkpoint as ckpt
from flantune.config import ConfigError, DataConfig, DataSource, MethodConfig, Recipe, load_recipe
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


def write_final(
    model,
    tokenizer,
    directory: Path,
    method_kind: str,
    base: BaseRecord,
    *,
    recipe: Recipe | None = None,
    result: dict | None = None,
    command: str | None = None,
    state_dict: dict | None = None,
) -> None:
    """Write a run's result to `directory` atomically (a kill leaves the previous one or none):
    a PEFT adapter folder, a bottleneck adapter folder or a full model folder, the tokenizer,
    flantune.json, and the model card made from the run's `recipe` and `result` (what result.json
    holds) by `command` (train or rl). `state_dict`: the model's whole weights where `model` holds
    only shards of them (FSDP), gathered by the caller."""
    from peft import PeftModel

    with ckpt.atomic_dir(directory) as tmp:
        if isinstance(model, PeftModel):
            model.save_pretrained(tmp, state_dict=state_dict)
        elif method_kind == "adapter":
            from flantune import adapters

            adapters.save_adapters(model, tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        save_tokenizer(tokenizer, tmp)
        (tmp / RECORD_FILE).write_text(json.dumps({"method": method_kind, "base": asdict(base)}, indent=2))
        # After PEFT's save_pretrained, which writes a card template of its own (with a local
        # base path the Hub refuses): ours replaces it.
        write_card(tmp, at=directory, recipe=recipe, result=result, command=command)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer, and the files its slow form is read from (T5's spiece.model, BART's vocab.json
    and merges.txt): transformers 5 saves tokenizer.json alone, which sentencepiece, older
    transformers' slow tokenizers and other toolkits cannot read. Added tokens live in
    tokenizer_config.json, which both forms read."""
    tokenizer.save_pretrained(folder)
    for key, name in tokenizer.vocab_files_names.items():
        source = tokenizer.init_kwargs.get(key)  # the resolved file it was loaded from, if any
        wanted = key != "tokenizer_file" and not (folder / name).exists()
        if wanted and isinstance(source, str) and Path(source).is_file():
            shutil.copyfile(source, folder / name)


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


# ---- the model card (README.md) ------------------------------------------------------------

CARD_FILE = "README.md"
PIPELINE_TAG = "text2text-generation"
"""The Hub's task for encoder-decoder text-to-text models (transformers 5 dropped its pipeline of
that name; the Hub still files these models under it)."""
LIBRARIES = {"peft": "peft", "full": "transformers"}
"""The library that loads a folder of each kind; bottleneck adapters need flantune itself."""
MODEL_ID_LINE = 'model_id = "'
"""How the card's code begins; `flantune push` points it at the hub repository."""


def write_card(
    folder: str | Path,
    *,
    at: str | Path | None = None,
    base: BaseRecord | None = None,
    recipe: Recipe | None = None,
    result: dict | None = None,
    command: str | None = None,
    merged_from: FinalInfo | None = None,
) -> Path:
    """Write a Hugging Face model card, README.md, into the model folder `folder`, which will live
    at `at` (default `folder`: write_final writes into a temporary folder first).

    The metadata block is what the Hub reads, built with huggingface_hub's ModelCardData:
    base_model (only a hub id the weights came from: the Hub refuses a local path, and a random
    init did not come from there, so the text names those), library_name (peft for an adapter,
    transformers for a full model), pipeline_tag, the training datasets that are hub ids, tags
    (flantune, the method, the tasks) and the base's license where its own card states it. The text
    gives the recipe's essentials, the run's result (result.json's numbers) and how to load it.

    base: the base it was trained on (default: the one recorded in the folder). command: train or
    rl. merged_from: the adapter a merged model was folded from (`flantune merge`).
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder, at = Path(folder), Path(at or folder)
    info = read_final(folder)
    if info is None:
        raise ModelLoadError(f"{at}: not a model or adapter folder (no config.json or adapter_config.json)")
    base = base or info.base
    method = merged_from.method if merged_from else info.method
    tasks = _recipe_tasks(recipe)
    tags = [
        "flantune",
        method,
        *tasks,
        *(["grpo"] if command == "rl" else []),
        *(["merged"] if merged_from else []),
    ]
    data = ModelCardData(
        model_name=_model_name(at),
        base_model=base.path if _from_hub(base) else None,
        library_name=LIBRARIES.get(info.kind),
        pipeline_tag=PIPELINE_TAG,
        datasets=_hub_datasets(recipe) or None,
        tags=list(dict.fromkeys(tags)),
        license=_base_license(base),
    )
    text = _card_text(info, at, base, method, tasks, recipe, result, command, merged_from)
    path = folder / CARD_FILE
    _replace_text(path, str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")))
    return path


def ensure_card(folder: str | Path, repo_id: str | None = None) -> Path:
    """The folder's README.md, written first when it has none (a run from before cards, a folder
    made elsewhere) from what lies beside it: flantune.json, and the run's recipe.yaml and
    result.json when the folder is a run's final/. With `repo_id`, a card's code that flantune
    wrote loads from that hub repository instead of the local folder. A folder in the hub cache is
    left as it is."""
    folder = Path(folder)
    path = folder / CARD_FILE
    if _in_hub_cache(folder):  # the hub's own copy: never written to
        return path
    if not path.is_file():
        write_card(folder, **run_record(folder))
    if repo_id is not None:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        pointed = [f'{MODEL_ID_LINE}{repo_id}"  # {_MODEL_ID_NOTE}\n' if _is_model_id_line(line) else line
                   for line in lines]  # fmt: skip
        if pointed != lines:
            _replace_text(path, "".join(pointed))
    return path


def add_scores(model: str, metrics: dict[str, float], data: DataConfig, role: str) -> Path | None:
    """Add `flantune eval`'s `metrics` on the recipe's `role` split (train, eval or test, read from
    `data`) to the model card of the evaluated `model`, in the Hub's model-index form
    (huggingface_hub's EvalResult). Returns the card, or None when the model has none to update: a
    hub id, a folder in the hub cache, or a folder without a card that flantune did not write (a
    run's final/ from before cards gets one first).

    Each result names the dataset and split it was scored on (a mixture's `task/metric` goes with
    its task's rows); an earlier result for the same dataset, split and metric is replaced, not
    repeated.
    """
    from huggingface_hub import EvalResult, ModelCard

    from flantune.data import DEFAULT_SPLITS

    folder = Path(model).expanduser()
    if not is_local(model) or not folder.is_dir() or _in_hub_cache(folder):
        return None
    path = folder / CARD_FILE
    if not path.is_file():
        if not (folder / RECORD_FILE).is_file():
            return None  # a folder someone else made: its text is theirs to write
        ensure_card(folder)
    try:
        card = ModelCard.load(path)
    except ValueError as e:  # metadata that is not a YAML mapping, a malformed model-index
        raise ModelLoadError(
            f"{path}: its metadata cannot be read, so the scores were not added: {e}"
        ) from None
    if data.mixture:
        sources = {item.task: getattr(item, role, None) for item in data.mixture}
    else:
        sources = {data.task: getattr(data, role)}
    new = []
    for key, value in metrics.items():
        task, _, metric = key.rpartition("/")  # a mixture's metrics are task/metric
        task = task or next(iter(sources))
        source = sources.get(task) or next(s for s in sources.values() if s is not None)
        new.append(EvalResult(
            task_type=PIPELINE_TAG, task_name=task, dataset_type=_dataset_id(source),
            dataset_name=_source_text(source, short=True), dataset_config=source.name,
            dataset_split=source.split or DEFAULT_SPLITS[role], metric_type=metric, metric_name=metric,
            metric_value=value,
        ))  # fmt: skip

    def place(r) -> tuple:
        return r.task_type, r.dataset_type, r.dataset_config, r.dataset_split, r.metric_type

    replaced = {place(r) for r in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if place(r) not in replaced] + new
    card.data.model_name = card.data.model_name or _model_name(folder.resolve())
    _replace_text(path, str(card))
    return path


_MODEL_ID_NOTE = "this folder, or the hub repository it was pushed to"


def _is_model_id_line(line: str) -> bool:
    return line.startswith(MODEL_ID_LINE) and line.rstrip().endswith(f"# {_MODEL_ID_NOTE}")


def _replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a kill mid-write leaves the old card), never through a
    symlink into someone else's file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _in_hub_cache(folder: Path) -> bool:
    from huggingface_hub import constants

    return folder.resolve().is_relative_to(Path(constants.HF_HUB_CACHE).expanduser().resolve())


def run_record(folder: Path) -> dict:
    """What the run whose final/ `folder` is recorded beside it, as write_card's recipe, result and
    command (each None where absent or unreadable: the card then says less)."""
    folder = Path(folder)
    run = folder.parent
    record = {"recipe": None, "result": None, "command": None}
    if folder.name != "final":
        return record
    resumed = sorted(run.glob("recipe.resume-*.yaml"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    recipe_file = resumed[-1] if resumed else run / "recipe.yaml"
    if recipe_file.is_file():
        with contextlib.suppress(ConfigError):  # a recipe of an older flantune: the card says less
            record["recipe"] = load_recipe(recipe_file)
    try:
        result = json.loads((run / "result.json").read_text())
    except (OSError, ValueError):
        return record
    record["result"] = result
    # Which command wrote it: train records a training loss, rl the processes it ran on.
    record["command"] = "train" if "train_loss" in result else "rl" if "processes" in result else None
    return record


def _model_name(at: Path) -> str:
    """A run's name: its folder's for final/ (runs/sciq-lora/final → sciq-lora; an RL run's
    runs/sciq-think/rl/final → sciq-think-rl), else the folder's own."""
    at = Path(os.path.abspath(at))
    if at.name != "final":
        return at.name
    run = at.parent
    return f"{run.parent.name}-rl" if run.name == "rl" else run.name


def _from_hub(base: BaseRecord) -> bool:
    """Whether the weights came from a hub model that base_model may name."""
    return base.path is not None and base.init == "pretrained" and not is_local(base.path)


def _base_license(base: BaseRecord) -> str | None:
    """The license in the card of the (pretrained) base, where that card is on this machine: a
    local folder's README.md, or one in the hub cache (never fetched)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if base.path is None or base.init != "pretrained":
        return None
    if is_local(base.path):
        readme = Path(base.path).expanduser() / CARD_FILE
    else:
        cached = try_to_load_from_cache(base.path, CARD_FILE, revision=base.revision)
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return None
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except ValueError:
        return None


def _is_local_data(source: DataSource) -> bool:
    """As flantune.data reads it: a file (by suffix or because it exists), else a hub dataset."""
    from flantune.data import LOCAL_SUFFIXES

    path = Path(source.path).expanduser()
    return path.suffix.lower() in LOCAL_SUFFIXES or path.exists()


def _dataset_id(source: DataSource) -> str:
    """The hub id of a hub dataset; a local file's name (the Hub refuses paths)."""
    return Path(source.path).name if _is_local_data(source) else source.path


def _source_text(source: DataSource, short: bool = False) -> str:
    """How the recipe names a data source; `short`: a local file by its name alone."""
    text = (
        (Path(source.path).name if short and _is_local_data(source) else source.path)
        + (f"/{source.name}" if source.name else "")
        + (f":{source.split}" if source.split else "")
    )
    return text + (f"[{source.rows}]" if source.rows else "")


def _train_sources(recipe: Recipe | None) -> list[DataSource]:
    if recipe is None:
        return []
    if recipe.data.mixture:
        return [item.train for item in recipe.data.mixture]
    return [recipe.data.train] if recipe.data.train is not None else []


def _hub_datasets(recipe: Recipe | None) -> list[str]:
    return list(dict.fromkeys(s.path for s in _train_sources(recipe) if not _is_local_data(s)))


def _recipe_tasks(recipe: Recipe | None) -> list[str]:
    if recipe is None:
        return []
    if recipe.data.mixture:
        return list(dict.fromkeys(item.task for item in recipe.data.mixture))
    return [recipe.data.task] if recipe.data.task else []


def _base_text(base: BaseRecord) -> str:
    if base.path is None:
        return "a base model that is not recorded"
    if base.init == "random":
        return f"a randomly initialised model of the shape of `{base.path}` (seed {base.seed})"
    return f"`{base.path}`" + (f" (revision {base.revision})" if base.revision else "")


def _method_text(method: str, cfg: MethodConfig | None) -> str:
    """The method and its key settings (from the recipe when it trained this method)."""
    names = {"full": "full fine-tuning (every weight)", "lora": "LoRA", "qlora": "QLoRA", "ia3": "IA3",
             "prefix": "prefix tuning", "adapter": "bottleneck adapters"}  # fmt: skip
    text = names.get(method, method)
    if cfg is None or cfg.kind != method:
        return text
    targets = cfg.target_modules if isinstance(cfg.target_modules, str) else ", ".join(cfg.target_modules)
    if method in ("lora", "qlora"):
        text = (
            "DoRA" if cfg.use_dora else text
        ) + f": r {cfg.r}, alpha {cfg.alpha:g}, dropout {cfg.dropout:g}, on {targets}"
        text += f"; base quantized to {cfg.bits}-bit" if method == "qlora" else ""
    elif method == "ia3":
        text += f" on {targets}"
    elif method == "prefix":
        text += f": {cfg.num_virtual_tokens} virtual tokens"
    elif method == "adapter":
        text += f": {cfg.placement}, reduction factor {cfg.reduction_factor}"
    if cfg.modules_to_save:
        text += f"; {', '.join(cfg.modules_to_save)} trained whole"
    return text


def _card_text(info: FinalInfo, at: Path, base: BaseRecord, method: str, tasks: list[str],
               recipe: Recipe | None, result: dict | None, command: str | None,
               merged_from: FinalInfo | None) -> str:  # fmt: skip
    """The card below its metadata: what the model is, the recipe, the result, how to load it."""
    on = f" on {', '.join(tasks)}" if tasks else ""
    if merged_from is not None:
        what = (f"{_base_text(base)} with a {_method_text(method, None)} adapter merged into its weights "
                f"(`flantune merge`): a plain transformers model. The adapter was trained{on} with flantune.")  # fmt: skip
    elif info.kind == "full":
        what = f"{_base_text(base)} fine-tuned{on} with flantune: a plain transformers model."
    elif info.kind == "peft":
        what = f"A {_method_text(method, None)} adapter (PEFT) for {_base_text(base)}, trained{on} with flantune."
    else:
        what = f"Bottleneck adapters for {_base_text(base)}, trained{on} with flantune."
    if command == "rl":
        what += " Its last stage is reinforcement learning with GRPO (`flantune rl`)."
    what = what[0].upper() + what[1:]
    lines = [f"# {_model_name(at)}", "", what, ""]
    settings = _settings(base, method, recipe, command)
    if settings:
        lines += [
            "## Training",
            "",
            "| setting | value |",
            "|---|---|",
            *(f"| {k} | {v} |" for k, v in settings),
            "",
        ]
    numbers = _result_rows(result)
    if numbers:
        lines += ["## Result", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in numbers), ""]
    lines += ["## Use", "", *_use_text(info, at, base, recipe)]
    return "\n".join(lines) + "\n"


def _settings(
    base: BaseRecord, method: str, recipe: Recipe | None, command: str | None
) -> list[tuple[str, str]]:
    if recipe is None:
        return [("base model", _base_text(base)), ("method", _method_text(method, None))]
    rows = [("base model", _base_text(base))]
    if recipe.data.mixture:
        rows += [
            (f"task {item.task}", f"{_source_text(item.train)}, weight {item.weight:g}")
            for item in recipe.data.mixture
        ]
    else:
        rows += [("task", str(recipe.data.task)),
                 ("training data", _source_text(recipe.data.train) if recipe.data.train else "")]  # fmt: skip
    rows.append(("method", _method_text(method, recipe.method)))
    if command == "rl":
        rl = recipe.rl
        rewards = ", ".join(f"{r.name} × {r.weight:g}" for r in rl.rewards)
        rows += [("GRPO steps", f"{rl.max_steps}: {rl.prompts_per_step} prompts × {rl.group_size} completions, "
                                f"{rl.inner_steps} optimizer steps each"),
                 ("learning rate", f"{rl.lr:g}"), ("KL weight (beta)", f"{rl.beta:g}"), ("rewards", rewards)]  # fmt: skip
        return rows
    cfg = recipe.train
    warmup = "no warm-up"
    if cfg.warmup_steps or cfg.warmup_ratio:
        warmup = (
            f"{cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else f"warm-up ratio {cfg.warmup_ratio:g}"
        )
    rows += [("steps", str(cfg.max_steps) if cfg.max_steps else f"{cfg.epochs:g} epochs"),
             ("learning rate", f"{cfg.lr:g}, {cfg.schedule}, {warmup}"),
             ("batch", f"{cfg.batch_size} examples a micro-batch, gradient accumulation {cfg.grad_accum}, per process"),
             ("seed", str(cfg.seed))]  # fmt: skip
    return rows


def _result_rows(result: dict | None) -> list[tuple[str, str]]:
    """result.json's numbers (train or rl)."""
    if not result:
        return []
    rows = []
    if result.get("steps") is not None:
        rows.append(("steps", str(result["steps"])))
    if result.get("seconds") is not None:
        rows.append(("time", f"{result['seconds']:.1f} s"))
    if result.get("train_loss") is not None:
        rows.append(("final train loss", f"{result['train_loss']:.4f}"))
    for key, value in (result.get("eval_metrics") or result.get("eval") or {}).items():
        rows.append((key, f"{value:.4f}"))
    if result.get("best_step") is not None and result.get("best_value") is not None:
        rows.append(
            ("best", f"{result['best_metric']} = {result['best_value']:.4f} at step {result['best_step']}")
        )
    return rows


def _use_text(info: FinalInfo, at: Path, base: BaseRecord, recipe: Recipe | None) -> list[str]:
    """How to load and run it: plain transformers for a full model, PEFT for an adapter."""
    max_new = recipe.generation.max_new_tokens if recipe is not None else 64
    model_id = f'{MODEL_ID_LINE}{at.as_posix()}"  # {_MODEL_ID_NOTE}'
    generate = ['inputs = tokenizer("your input text", return_tensors="pt")',
                f"outputs = model.generate(**inputs, max_new_tokens={max_new})",
                "print(tokenizer.decode(outputs[0], skip_special_tokens=True))"]  # fmt: skip
    flantune = [f'With flantune: `flantune generate {at.as_posix()} --input "your input text"`.']
    if info.kind == "full":
        return ["```python", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "", model_id,
                "tokenizer = AutoTokenizer.from_pretrained(model_id)",
                "model = AutoModelForSeq2SeqLM.from_pretrained(model_id)", *generate, "```", "", *flantune]  # fmt: skip
    if info.kind != "peft" or base.path is None or base.init == "random":
        why = ("bottleneck adapters load with flantune.adapters" if info.kind != "peft" else
               "its base was randomly initialised, and flantune rebuilds it from the seed")  # fmt: skip
        return [f"Load it with flantune ({why}): `flantune generate {at.as_posix()} --input \"your input text\"`, "
                f"or in Python `flantune.final.load_final(\"{at.as_posix()}\")`."]  # fmt: skip
    grow = ["# the run added tokens: the embeddings grow as they did in training",
            "if len(tokenizer) > base.get_input_embeddings().num_embeddings:",
            "    base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)"]  # fmt: skip
    added = recipe is not None and recipe.model.add_tokens
    revision = f', revision="{base.revision}"' if base.revision else ""
    return ["```python", "from peft import PeftModel", "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer", "",
            model_id, "tokenizer = AutoTokenizer.from_pretrained(model_id)",
            f'base = AutoModelForSeq2SeqLM.from_pretrained("{base.path}"{revision})', *(grow if added else []),
            "model = PeftModel.from_pretrained(base, model_id)", *generate, "```", "", *flantune]  # fmt: skip
