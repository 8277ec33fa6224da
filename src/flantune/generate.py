"""Batched generation: sources in, texts out, in the caller's order.

Batches are formed by source length so a batch holds similar lengths and little padding. The
output cap always comes from the caller (the recipe or a flag): transformers' own default of 20
new tokens would cut answers silently.
"""

from __future__ import annotations

import torch

from flantune.config import GenerationConfig


def generation_kwargs(cfg: GenerationConfig) -> dict:
    kwargs = {
        "max_new_tokens": cfg.max_new_tokens,
        "num_beams": cfg.num_beams,
        "do_sample": cfg.do_sample,
        "repetition_penalty": cfg.repetition_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
    }
    if cfg.num_beams > 1:
        kwargs["early_stopping"] = cfg.early_stopping
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    return kwargs


def decode(tokenizer, ids: list[int]) -> str:
    """Text of generated ids without pad/EOS/BOS, but keeping added task tokens like <think>.

    `skip_special_tokens=True` would also drop <think>/<answer> (they are added as special tokens so
    they are never split), which the reasoning tasks need in their output.
    """
    drop = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
    return tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False).strip()


class LabelTrie:
    """Restricts decoding to a fixed set of label strings (classification).

    transformers calls `allowed(batch_id, decoder_ids)` at every step; the answer is the set of
    tokens that continue some label from the prefix decoded so far, and EOS once a label is complete.
    """

    def __init__(self, tokenizer, labels: list[str], decoder_start_id: int):
        self.start = decoder_start_id
        self.eos = tokenizer.eos_token_id
        self.children: dict[tuple[int, ...], set[int]] = {}
        for label in labels:
            # Exactly the ids a target of this label trains on (BART's keep their leading <s>).
            ids = tokenizer(text_target=label)["input_ids"]
            if ids and ids[-1] == self.eos:
                ids = ids[:-1]
            ids = [*ids, self.eos]
            for k in range(len(ids)):
                self.children.setdefault(tuple(ids[:k]), set()).add(ids[k])

    def allowed(self, batch_id: int, decoder_ids: torch.Tensor) -> list[int]:
        prefix = [int(i) for i in decoder_ids.tolist()]
        if prefix and prefix[0] == self.start:
            prefix = prefix[1:]
        return sorted(self.children.get(tuple(prefix), {self.eos}))


@torch.no_grad()
def generate_texts(
    model,
    tokenizer,
    sources: list[str],
    cfg: GenerationConfig,
    *,
    batch_size: int = 32,
    max_source_tokens: int | None = None,
    device: torch.device | str | None = None,
    labels: list[str] | None = None,
    adapter_names: list[str] | None = None,
    stop=None,
) -> list[str]:
    """Generate one output per source; the result is in the order of `sources`.

    With `labels`, decoding can only produce one of those strings (classification tasks).
    `adapter_names` (one per source) picks the LoRA adapter that answers each row, "__base__" for
    the base model: PEFT's mixed-adapter batches, so rows of several adapters share a batch.
    `stop` (a function of no arguments) is asked after every decoding step: True ends the
    generation there (the server stops work nobody waits for any more).
    """
    sources = list(sources)
    if not sources:
        return []
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = tokenizer(sources, truncation=max_source_tokens is not None, max_length=max_source_tokens)[
        "input_ids"
    ]
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]), reverse=True)
    outputs: list[str] = [""] * len(sources)
    kwargs = generation_kwargs(cfg)
    if labels:
        config = getattr(model, "config", None)
        trie = LabelTrie(tokenizer, labels, config.decoder_start_token_id)
        kwargs["prefix_allowed_tokens_fn"] = trie.allowed
    if stop is not None:
        from transformers import StoppingCriteriaList

        kwargs["stopping_criteria"] = StoppingCriteriaList([_Stop(stop)])
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt").to(device)
        if adapter_names is not None:
            kwargs["adapter_names"] = [adapter_names[i] for i in index]
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
        for i, ids in zip(index, generated.tolist(), strict=True):  # (B, T_out)
            outputs[i] = decode(tokenizer, ids)
    model.train(was_training)
    return outputs


class _Stop:
    """A transformers stopping criterion from a function of no arguments: True stops every row."""

    def __init__(self, stop):
        self.stop = stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.stop()), dtype=torch.bool, device=input_ids.device)


class GenerateError(ValueError):
    """The model, adapter or input cannot be used; the message says which and what to do."""


def read_inputs(path: str, field: str = "source") -> list[str]:
    """Sources from a JSON-lines file: one object per line with a `field` string."""
    import json
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise GenerateError(f"--file: {path} not found")
    sources = []
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="strict").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerateError(
                f"{path} line {number}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise GenerateError(
                f"{path} line {number}: expected an object with a string {field!r} (set --field)"
            )
        sources.append(row[field])
    if not sources:
        raise GenerateError(f"{path}: the file holds no input rows")
    return sources


def load_for_generation(
    model_path: str, adapter: str | None = None, device: str | None = None, *, recorded_by: str | None = None
):
    """(model, tokenizer) for generation: a full model, or a base with a PEFT or bottleneck adapter.

    MODEL may itself be an adapter folder (a LoRA run's final/): the base it was trained on is then
    rebuilt as recorded beside it. A base given explicitly that is the recorded random-init base
    (tests, benchmarks) is rebuilt the same way, since such a folder holds no weights.
    `recorded_by` names an adapter folder whose record to use when no adapter is loaded (the base
    of a comparison).
    """
    import json
    from pathlib import Path

    from flantune.models import ModelLoadError, fit_embeddings, load_model, load_tokenizer, recorded_base

    if (Path(model_path) / "adapter_config.json").is_file():
        if adapter:
            raise GenerateError(
                f"{model_path} is an adapter folder: give the base model as MODEL and this folder as --adapter"
            )
        model_path, adapter = None, model_path
    init, seed, revision = "pretrained", 0, None
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise GenerateError(f"--adapter: {adapter} has no adapter_config.json")
    record_folder = adapter or recorded_by
    if record_folder and ((Path(record_folder) / "flantune.json").is_file() or adapter):
        recorded = recorded_base(record_folder)
        if model_path is None:
            if not recorded["path"]:
                raise GenerateError(f"{adapter}: the adapter does not say its base model; give it as MODEL")
            model_path = recorded["path"]
        if recorded["path"] and _same_path(recorded["path"], model_path):
            init, seed, revision = recorded["init"], recorded["seed"], recorded["revision"]
    tokenizer_source = (
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path
    )
    try:
        tokenizer = load_tokenizer(tokenizer_source)
        model = load_model(model_path, init=init, seed=seed, revision=revision)
    except ModelLoadError as e:
        raise GenerateError(str(e)) from None
    fit_embeddings(model, tokenizer)  # the adapter's tokenizer may hold added tokens
    if adapter:
        kind = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("kind")
        try:
            if kind == "bottleneck":
                from flantune.adapters import load_adapters

                load_adapters(model, adapter)
            else:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, adapter)
        except (RuntimeError, ValueError, KeyError) as e:
            raise GenerateError(
                f"--adapter: {adapter} does not fit {model_path}: {str(e).splitlines()[0]}"
            ) from None
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tokenizer


def _same_path(a: str, b: str) -> bool:
    from pathlib import Path

    from flantune.models import is_local

    if is_local(a) and is_local(b):
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    return a == b
