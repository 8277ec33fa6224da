"""The decoder a benchmark's command runs on: flantune's engine (what users get) or, for the baseline,
transformers' generate in the same command.

Every command that generates reaches the model through one call, `flantune.engine.generate`
(flantune.decoding calls it by attribute). `decoder("transformers")` swaps that one call for
transformers' `model.generate` with its default dynamic cache (the decoder flantune's commands used
before the engine) for the duration of a `with` block; everything else the command does (loading,
tokenizing, batching by length, scoring, writing) is the same code on both sides.
`decoder("engine-compiled")`: the engine with its captured step compiled by torch.compile
(`compile_step=True` on every call; off in the product), to measure what that buys a command.
`decoder("engine-layers")`: the engine with T5's own step's layer compiled once for every layer
(`compile_layers=True` on every call). `decoder("engine-hf-step")`: the engine over transformers'
T5 decode step instead of its own (flantune.t5_decode.OWN_STEP off).
"""

from __future__ import annotations

import contextlib

from flantune import engine

DECODERS = ("transformers", "engine", "engine-compiled", "engine-layers", "engine-hf-step")


def _transformers(model, input_ids, attention_mask, **options) -> engine.Generation:
    """transformers' generate with its default dynamic cache, behind the engine's signature."""
    for own in ("compile_step", "packed_encoder", "compile_layers"):  # the engine's own options
        options.pop(own, None)
    return engine.transformers_generate(model, input_ids, attention_mask, cache="dynamic", **options)


@contextlib.contextmanager
def decoder(name: str):
    """Within the block, commands decode with `name` ("engine" or "transformers")."""
    if name not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {name!r}")
    if name == "engine":
        yield
        return
    original, own_step = engine.generate, engine.t5_decode.OWN_STEP
    if name == "transformers":
        engine.generate = _transformers
    elif name == "engine-hf-step":
        engine.t5_decode.OWN_STEP = False
    else:
        option = "compile_step" if name == "engine-compiled" else "compile_layers"
        engine.generate = lambda *args, **options: original(*args, **{**options, option: True})
    try:
        yield
    finally:
        engine.generate, engine.t5_decode.OWN_STEP = original, own_step
