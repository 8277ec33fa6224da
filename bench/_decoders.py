"""The decoder a benchmark's command runs on: flantune's engine (what users get) or, for the baseline,
transformers' generate in the same command.

Every command that generates reaches the model through one call, `flantune.engine.generate`
(flantune.decoding calls it by attribute). `decoder("transformers")` swaps that one call for
transformers' `model.generate` with its default dynamic cache (the decoder flantune's commands used
before the engine) for the duration of a `with` block; everything else the command does (loading,
tokenizing, batching by length, scoring, writing) is the same code on both sides.
"""

from __future__ import annotations

import contextlib

from flantune import engine

DECODERS = ("transformers", "engine")


def _transformers(model, input_ids, attention_mask, **options) -> engine.Generation:
    """transformers' generate with its default dynamic cache, behind the engine's signature."""
    return engine.transformers_generate(model, input_ids, attention_mask, cache="dynamic", **options)


@contextlib.contextmanager
def decoder(name: str):
    """Within the block, commands decode with `name` ("engine" or "transformers")."""
    if name not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {name!r}")
    if name == "engine":
        yield
        return
    original = engine.generate
    engine.generate = _transformers
    try:
        yield
    finally:
        engine.generate = original
