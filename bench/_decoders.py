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


def _transformers(model, input_ids, attention_mask, *, stop=None, on_step=None, generator=None,
                  return_logprobs=False, graphs=None, **options) -> engine.Generation:  # fmt: skip
    from transformers import LogitsProcessorList

    if return_logprobs or generator is not None or stop is not None or on_step is not None:
        raise ValueError("the transformers baseline takes no log-probabilities, generator or step hooks")
    options = {k: v for k, v in options.items() if v is not None}
    if options.get("logits_processor"):
        options["logits_processor"] = LogitsProcessorList(options["logits_processor"])
    if options.get("num_beams", 1) == 1:
        options.pop("early_stopping", None)
    options.setdefault("top_k", 0)  # the engine's "no filter", explicit (generate's default is 50)
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    return engine.Generation(sequences=sequences)


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
