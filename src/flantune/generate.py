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
) -> list[str]:
    """Generate one output per source; the result is in the order of `sources`."""
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
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt").to(device)
        generated = model.generate(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
        for i, ids in zip(index, generated.tolist(), strict=True):  # (B, T_out)
            outputs[i] = decode(tokenizer, ids)
    model.train(was_training)
    return outputs
