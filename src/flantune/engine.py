"""The decoding engine: encoder-decoder generation over a preallocated static cache.

What it is. `generate(model, input_ids, attention_mask, ...)` decodes a batch of padded sources with a
seq2seq model (T5, mT5, FLAN-T5, BART, loaded with AutoModelForSeq2SeqLM, PEFT-wrapped or not):

    1. the encoder runs once per source; for `num_return_sequences` copies its output is expanded
       (repeat_interleave), never recomputed;
    2. every tensor the loop needs is allocated before it: the decoder's self-attention cache and the
       cross-attention cache (transformers' StaticCache, initialised ahead of time), the output ids,
       the per-token log-probabilities, the finished flags;
    3. the loop feeds the decoder one token per step (the previous token of every row) with the
       encoder output and the cache; the cross-attention keys/values are computed at the first step
       and reused after it;
    4. the next token is chosen by greedy argmax or by sampling, after transformers' own logits
       processors (repetition penalty, no-repeat n-grams, a prefix-allowed-tokens function such as
       LabelTrie.allowed, the model's forced BOS/EOS, temperature, top-k, top-p).

It returns ids in `model.generate`'s layout (decoder start token first, finished rows padded with
pad_token_id, as long as the longest row), so callers can swap it in for `generate`.

Why our own. Every command that generates (eval, in-training eval, RL sampling, generate, serve)
spends its time in the one-token decode step, and on a GPU that step is launch-bound: it wants a
static cache and the step captured as a CUDA graph per batch-size bucket. No library does this for
encoder-decoder models: transformers' generate grows a dynamic cache by default and its static-cache
path targets compiling decoder-only models; vLLM, which had CUDA-graph decoding for BART/T5-style
models, dropped encoder-decoder support in its V1 engine. This module keeps the model and the cache
classes of transformers and owns only the loop, so that the step is one fixed-shape call.

Status. This is the CPU-correct first step: the loop is eager, greedy output equals
`model.generate(do_sample=False, num_beams=1)` token for token. The step (`_Decoder.step`) reads and
writes only tensors allocated before the loop, so it can be captured as a CUDA graph next. Beam
search is not here: callers keep `model.generate` for beams until the engine has them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    EncoderDecoderCache,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput


@dataclass
class Generation:
    """What `generate` returns.

    sequences  (N, 1 + T) int64: decoder start token first, then the generated tokens; a row that
               emitted EOS holds pad_token_id after it. N = batch * num_return_sequences, copies of
               a source adjacent; T = the steps run (at most max_new_tokens).
    logprobs   (N, T) float32 or None: log-probability of each generated token under the model's raw
               distribution, log_softmax of the logits before any processor, temperature or
               filter (what a teacher-forced forward of the model gives); 0.0 where the row emitted pad.
    """

    sequences: torch.Tensor
    logprobs: torch.Tensor | None = None


def _base_model(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_keyword(model) -> str:
    """The forward argument that takes the cache: `past_key_values` up to transformers 5.2x, `cache`
    from the versions that renamed it (5.24 takes both and warns on the old name)."""
    parameters = inspect.signature(_base_model(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _decoder_head_shape(config) -> tuple[int, int]:
    """(heads, head_dim) of the decoder's attention: T5/mT5 name them num_heads and d_kv (d_kv is not
    d_model / heads in FLAN-T5-small: 64 x 6 != 512); BART divides d_model."""
    if config.model_type in ("t5", "mt5", "umt5"):
        return config.num_heads, config.d_kv
    heads = config.decoder_attention_heads
    return heads, config.d_model // heads


def logits_processors(
    model,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
    extra: LogitsProcessorList | list | None = None,
) -> LogitsProcessorList:
    """transformers' processors for these options, in the order `generate` applies them.

    Besides the options given, the model's generation config contributes what the checkpoint's
    convention needs and `generate` would apply: forced BOS (first token) and forced EOS (last
    token at the cap: BART's forced_eos_token_id). `extra` processors come after the penalties and
    before the sampling warpers, as `generate`'s `logits_processor` argument does.
    """
    gen = _base_model(model).generation_config
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if prefix_allowed_tokens_fn is not None:
        processors.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, num_beams=1))
    if getattr(gen, "forced_bos_token_id", None) is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(gen.forced_bos_token_id))
    if getattr(gen, "forced_eos_token_id", None) is not None:
        # max_length counts the decoder start token, as generate's does for encoder-decoder models.
        processors.append(ForcedEOSTokenLogitsProcessor(1 + max_new_tokens, gen.forced_eos_token_id))
    processors.extend(extra or [])
    if do_sample:
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


class _Decoder:
    """One batch's decoder state, all of it allocated in __init__: the static caches and the step's
    input. `step()` is the one-token call that a CUDA graph can capture once the cross-attention
    keys/values are in the cache (after the first step)."""

    def __init__(self, model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, max_new_tokens: int):
        self.model = model
        config = _base_model(model).config
        rows, source_len = encoder_hidden.shape[:2]  # (N, S, d_model)
        heads, head_dim = _decoder_head_shape(config)
        dtype, device = encoder_hidden.dtype, encoder_hidden.device
        # Self-attention: (N, heads, max_new_tokens, head_dim) keys and values per decoder layer; the
        # step at position t writes slot t. The position itself lives in the cache: each StaticLayer
        # keeps `cumulative_length`, a 0-dim tensor it advances in place (T5's relative bias and
        # BART's learned positions read it), so no position argument changes between steps.
        # (Neither transformers 5.17 nor 5.24 takes a `cache_position` in T5/BART forward.)
        self_cache = StaticCache(config=config, max_cache_len=max_new_tokens)
        # Cross-attention: (N, heads, S, head_dim) per decoder layer, filled once from the encoder output.
        cross_cache = StaticCache(config=config, max_cache_len=source_len)
        for cache in (self_cache, cross_cache):
            cache.early_initialization(
                batch_size=rows, num_heads=heads, head_dim=head_dim, dtype=dtype, device=device
            )
        # EncoderDecoderCache.is_updated[layer] (a Python dict of bools) starts False while the cross
        # cache is empty; the first step's cross-attention computes K/V from encoder_hidden, writes them
        # and sets it True; every later step reads them from the cache instead of projecting again.
        self.cache = EncoderDecoderCache(self_cache, cross_cache)
        self.encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)  # (N, S, d_model)
        self.encoder_mask = encoder_mask  # (N, S)
        self.tokens = torch.empty(rows, 1, dtype=torch.long, device=device)  # (N, 1) the step's input
        self.cache_keyword = _cache_keyword(model)

    def step(self) -> torch.Tensor:
        """(N, V) logits of the next token after `self.tokens`, advancing the cache by one position."""
        out = self.model(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.encoder_mask,
            decoder_input_ids=self.tokens,
            use_cache=True,
            return_dict=True,
            **{self.cache_keyword: self.cache},
        )
        return out.logits[:, -1]  # (N, V)

    def cache_tensors(self) -> list[torch.Tensor]:
        """Every key/value tensor of both caches (tests check that the loop never reallocates them)."""
        layers = [*self.cache.self_attention_cache.layers, *self.cache.cross_attention_cache.layers]
        return [t for layer in layers for t in (layer.keys, layer.values)]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], list[int]] | None = None,
    num_return_sequences: int = 1,
    logits_processor: LogitsProcessorList | list | None = None,
    return_logprobs: bool = False,
    generator: torch.Generator | None = None,
) -> Generation:
    """Decode `input_ids` (B, S) with `attention_mask` (B, S), padded sources, one token per step.

    Greedy by default; `do_sample` draws from the processed distribution with torch.multinomial
    (from `generator` if given, else torch's global RNG). `num_return_sequences` (sampling only) gives
    that many completions per source, adjacent, from one encoder pass. `top_k=0` and `top_p=1.0` mean
    no filter (unlike generate's default top_k of 50). A row stops at the model's EOS and emits pad
    after it; the loop ends when every row has stopped or after `max_new_tokens` steps.
    Beam search is not here (use `model.generate`).
    """
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy copies would be identical)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    config = _base_model(model).config
    gen = _base_model(model).generation_config
    start_id, pad_id, eos = (
        getattr(gen, name) if getattr(gen, name) is not None else getattr(config, name)
        for name in ("decoder_start_token_id", "pad_token_id", "eos_token_id")
    )
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=input_ids.device)  # (E,)
    processors = logits_processors(
        model, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
        top_p=top_p, repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, extra=logits_processor,
    )  # fmt: skip

    # The encoder, once per source: (B, S, d_model), then (N, S, d_model) with N = B * copies.
    encoder_hidden = model.get_encoder()(
        input_ids=input_ids, attention_mask=attention_mask, return_dict=True
    )[0]
    encoder_hidden = encoder_hidden.repeat_interleave(num_return_sequences, dim=0)
    encoder_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
    rows = encoder_hidden.shape[0]
    device = encoder_hidden.device

    # Everything the loop writes, allocated before it.
    decoder = _Decoder(model, encoder_hidden, encoder_mask, max_new_tokens)
    sequences = torch.full((rows, 1 + max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, 1+T)
    sequences[:, 0] = start_id
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)  # (N, T)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)  # (N,)
    decoder.tokens.copy_(sequences[:, :1])

    steps = 0
    for t in range(max_new_tokens):
        logits = decoder.step().float()  # (N, V), float32 as generate scores them
        # The processors see the ids so far (N, 1+t), start token first, as in generate.
        scores = processors(sequences[:, : 1 + t], logits)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (N,)
        else:
            next_tokens = scores.argmax(dim=-1)  # (N,)
        next_tokens = torch.where(unfinished, next_tokens, pad_id)
        if return_logprobs:
            raw = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)  # (N,)
            logprobs[:, t] = torch.where(unfinished, raw, 0.0)
        sequences[:, 1 + t] = next_tokens
        decoder.tokens.copy_(next_tokens[:, None])
        unfinished &= ~torch.isin(next_tokens, eos_ids)
        steps = t + 1
        if not unfinished.any():  # one host sync per step: generate's own stopping rule
            break
    return Generation(
        sequences=sequences[:, : 1 + steps],
        logprobs=logprobs[:, :steps] if return_logprobs else None,
    )
