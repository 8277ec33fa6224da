"""The decoding engine: encoder-decoder generation over a preallocated static cache.

What it is. `generate(model, input_ids, attention_mask, ...)` decodes a batch of padded sources with a
seq2seq model (T5, mT5, FLAN-T5, BART, loaded with AutoModelForSeq2SeqLM, PEFT-wrapped or not):

    1. the encoder runs once per source; for `num_return_sequences` copies its output is expanded
       (repeat_interleave), never recomputed. For T5-family models in 16-bit on a GPU it runs on
       the sources' packed layout, no padding, T5's bias per source, with FlexAttention where its
       compilation pays, else SDPA (`PACKED_ENCODER`, flantune.packing.PackedSources);
    2. every tensor the loop needs is allocated before it: the decoder's self-attention cache and the
       cross-attention cache (transformers' StaticCache, initialised ahead of time), the output ids,
       the per-token log-probabilities, the finished flags;
    3. the loop feeds the decoder one token per step (the previous token of every row) with the
       encoder output and the cache; the cross-attention keys/values are computed once (at the first
       step, or before it) and reused after it. T5 and mT5 run flantune.t5_decode's written-out step
       (transformers' arithmetic without what its forward rebuilds every step), where a source's
       samples or beams read one copy of its cross-attention keys/values (SHARE_CROSS); other
       models run transformers' forward;
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

Status. Every command decodes through here (flantune.decoding calls `generate`, nothing calls
`model.generate`). On the CPU the loop is checked token for token against `model.generate` (greedy,
beams, label restriction, the processors, LoRA and mixed-adapter rows). On CUDA (`graphs`, on by
default there) the one-token step is captured as a CUDA graph and replayed for steps 1..T: the
cross-attention keys/values are written into their cache before step 1 (`_Decoder.fill_cross`, the
layers' own projections), so step 1 is the same call as the others; a couple of eager warm-up steps
run on a side stream (their cache writes undone), then `step()` is recorded once with its logits as
a static tensor; each step copies the chosen tokens into the step's input and replays. (A step 1
that cannot be recorded runs eagerly and step 2 is recorded, with a warning.) The encoder pass is
captured too, per (model, row bucket, source bucket), at the second use of those buckets, and kept
(`_CapturedEncoder`; one that cannot be captured warns and runs eagerly). Rows are padded
up to a batch-size bucket (1, 2, 4, ..., 128, then multiples of 128), sources up to a multiple of
64 and the cache to a multiple of 64 new tokens, and the captured step is kept per (model, bucket,
source bucket, cache bucket, dtype, compiled) for the next call (`clear_graphs()` frees them; a
collected model's go at the next call, `drop_collected`); a
batch of a source bucket without one replays a kept step of up to twice its sources (SOURCE_REUSE). The logits processors, the sampling and the beam bookkeeping
stay eager. From COMPACT_FROM_ROWS rows, finished rows leave the batch at the stopping checks: the
rest move, caches and all, to the kept decoder of a smaller bucket. Rows of several LoRA adapters in one batch are captured too when the caller hands their
matrices gathered per row (`adapter_rows`, flantune.lora_rows); through PEFT's adapter names every
step runs eagerly. The CUDA path is
checked by tests/test_engine.py's `cuda` tests, which run on a GPU machine only.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    EncoderDecoderCache,
    ForcedBOSTokenLogitsProcessor,
    ForcedEOSTokenLogitsProcessor,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StaticCache,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_outputs import BaseModelOutput

from flantune import t5_decode
from flantune.errors import SettingError
from flantune.graphs import StaticSources, embedding_dtype
from flantune.graphs import record as _record
from flantune.graphs import warm_up as _warm_up


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


def cross_projections(model) -> list[tuple]:
    """Per decoder layer, its cross-attention's key and value projections (PEFT's wrappers
    included): T5's EncDecAttention.k / .v, BART's encoder_attn.k_proj / .v_proj."""
    decoder = _base_model(model).get_decoder()
    if hasattr(decoder, "block"):  # T5, mT5
        return [(block.layer[1].EncDecAttention.k, block.layer[1].EncDecAttention.v) for block in decoder.block]
    return [(layer.encoder_attn.k_proj, layer.encoder_attn.v_proj) for layer in decoder.layers]


# Generation-config settings that `generate` would apply and the engine does not: a checkpoint that
# sets one is refused rather than decoded differently (none of the T5/BART checkpoints sets them).
_UNSUPPORTED = {
    "sequence_bias": None, "encoder_no_repeat_ngram_size": 0, "exponential_decay_length_penalty": None,
    "remove_invalid_values": False, "renormalize_logits": False, "guidance_scale": None,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "watermarking_config": None,
}  # fmt: skip


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
    num_beams: int = 1,
    device: torch.device | str = "cpu",
) -> LogitsProcessorList:
    """transformers' processors for these options, in the order `generate` applies them
    (GenerationMixin._get_logits_processor).

    Besides the options given, the model's generation config contributes what the checkpoint sets
    and `generate` would apply: bad_words_ids, min_length and min_new_tokens, forced BOS (first token)
    and forced EOS (last token at the cap: BART's forced_eos_token_id), suppress_tokens and
    begin_suppress_tokens. `extra` processors come after those and before the sampling warpers, as
    `generate`'s `logits_processor` argument does. Other generation-config settings are refused
    (ValueError naming them).
    """
    gen = _base_model(model).generation_config
    unsupported = sorted(
        name for name, default in _UNSUPPORTED.items() if getattr(gen, name, default) not in (default, None)
    )
    if unsupported:
        raise ValueError(
            f"the model's generation_config sets {', '.join(unsupported)}, which flantune's decoding engine "
            "does not apply; remove them from generation_config.json"
        )
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = _base_model(model).config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=device)  # (E,)
    processors = LogitsProcessorList()
    if repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty))
    if no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if getattr(gen, "bad_words_ids", None) is not None:
        processors.append(NoBadWordsLogitsProcessor(gen.bad_words_ids, eos))
    if getattr(gen, "min_length", None):
        processors.append(MinLengthLogitsProcessor(gen.min_length, eos, device=device))
    if getattr(gen, "min_new_tokens", None):
        processors.append(MinNewTokensLengthLogitsProcessor(1, gen.min_new_tokens, eos, device=device))
    if prefix_allowed_tokens_fn is not None:
        processors.append(PrefixConstrainedLogitsProcessor(prefix_allowed_tokens_fn, num_beams=num_beams))
    if getattr(gen, "forced_bos_token_id", None) is not None:
        processors.append(ForcedBOSTokenLogitsProcessor(gen.forced_bos_token_id))
    if getattr(gen, "forced_eos_token_id", None) is not None:
        # max_length counts the decoder start token, as generate's does for encoder-decoder models.
        processors.append(ForcedEOSTokenLogitsProcessor(1 + max_new_tokens, gen.forced_eos_token_id, device=device))
    if getattr(gen, "suppress_tokens", None) is not None:
        processors.append(SuppressTokensLogitsProcessor(gen.suppress_tokens, device=device))
    if getattr(gen, "begin_suppress_tokens", None) is not None:
        begin = 1 if getattr(gen, "forced_bos_token_id", None) is None else 2  # after the start token (and BOS)
        processors.append(SuppressTokensAtBeginLogitsProcessor(gen.begin_suppress_tokens, begin, device=device))
    processors.extend(extra or [])
    if do_sample:
        # Beam sampling keeps one more token than there are EOS ids, so a beam can always continue.
        keep = eos.numel() + 1 if num_beams > 1 else 1
        if temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=keep))
        if top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=keep))
    return processors


class _Decoder:
    """One batch's decoder state, all of it allocated in __init__: the static caches and the step's
    input. `step()` is the one-token call that a CUDA graph can capture once the cross-attention
    keys/values are in the cache (after the first step)."""

    def __init__(self, model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, max_new_tokens: int,
                 compiled_layers: bool = False, copies: int = 1):  # fmt: skip
        self.model = model
        config = _base_model(model).config
        rows, source_len = encoder_hidden.shape[:2]  # (N, S, d_model)
        # T5 and mT5 decode through our own step over these caches (flantune.t5_decode: the same
        # arithmetic, fewer kernels); other models through transformers' forward. `compiled_layers`:
        # its layer compiled by torch.compile, one graph for every layer.
        own = t5_decode.OWN_STEP and t5_decode.unsupported(model) is None
        # `copies` adjacent rows per source (samples, beams) whose cross-attention keys/values are that
        # source's: under our own step they are kept once per source (SHARE_CROSS), (N / copies, H,
        # S, D) a layer, and the step attends each source's rows to them together. At 16 sources x 8
        # samples that is 8x fewer bytes a step reads (1.5 GB against 0.19 for flan-t5-base in bf16,
        # sources of 320 positions) and 8x less projection work per batch.
        self.copies = copies if own and SHARE_CROSS and copies > 1 and rows % copies == 0 else 1
        heads, head_dim = _decoder_head_shape(config)
        device = encoder_hidden.device
        # The dtype the attention's key/value projections write: under autocast (flantune rl samples
        # from float32 weights in bf16 autocast) the autocast dtype, not the encoder output's.
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else encoder_hidden.dtype
        # Our step's cross-attention over the sources without padding (t5_decode.PACKED_CROSS): it
        # keeps the keys/values itself, and transformers' cross cache is a placeholder of one position.
        packed = own and t5_decode.packed_cross_ready(device, dtype, head_dim)
        # Self-attention: (N, heads, max_new_tokens, head_dim) keys and values per decoder layer; the
        # step at position t writes slot t. The position itself lives in the cache: each StaticLayer
        # keeps `cumulative_length`, a 0-dim tensor it advances in place (T5's relative bias and
        # BART's learned positions read it), so no position argument changes between steps.
        # (Neither transformers 5.17 nor 5.24 takes a `cache_position` in T5/BART forward.)
        self_cache = StaticCache(config=config, max_cache_len=max_new_tokens)
        # Cross-attention: (N / copies, heads, S, head_dim) per decoder layer, filled once from the
        # encoder output.
        cross_cache = StaticCache(config=config, max_cache_len=1 if packed else source_len)
        for cache, batch in ((self_cache, rows), (cross_cache, rows // self.copies)):
            cache.early_initialization(
                batch_size=batch, num_heads=heads, head_dim=head_dim, dtype=dtype, device=device
            )
        # EncoderDecoderCache.is_updated[layer] (a Python dict of bools) starts False while the cross
        # cache is empty; the first step's cross-attention computes K/V from encoder_hidden, writes them
        # and sets it True; every later step reads them from the cache instead of projecting again.
        self.cache = EncoderDecoderCache(self_cache, cross_cache)
        self.encoder_outputs = BaseModelOutput(last_hidden_state=encoder_hidden)  # (N, S, d_model)
        self.encoder_mask = encoder_mask  # (N, S)
        self.tokens = torch.empty(rows, 1, dtype=torch.long, device=device)  # (N, 1) the step's input
        # (N, max_new_tokens) ones, given explicitly: without it BART builds one as
        # torch.ones(N, cache_length + 1), reading the cache's position tensor on the host (a sync, which
        # a CUDA graph capture refuses). The causal mask hides the slots not written yet.
        self.decoder_mask = torch.ones(rows, max_new_tokens, dtype=torch.long, device=device)
        self.cache_keyword = _cache_keyword(model)
        self.own = (t5_decode.T5Step(model, self.cache, encoder_mask, self.tokens, compiled_layers, self.copies,
                                     (rows // self.copies, source_len) if packed else None)
                    if own else None)  # fmt: skip

    def step(self) -> torch.Tensor:
        """(N, V) logits of the next token after `self.tokens`, advancing the cache by one position."""
        if self.own is not None:
            return self.own(self.model)
        out = self.model(
            encoder_outputs=self.encoder_outputs,
            attention_mask=self.encoder_mask,
            decoder_input_ids=self.tokens,
            decoder_attention_mask=self.decoder_mask,
            use_cache=True,
            return_dict=True,
            **{self.cache_keyword: self.cache},
        )
        return out.logits[:, -1]  # (N, V)

    def fill_cross(self) -> None:
        """Every decoder layer's cross-attention keys/values of the encoder output, written into the
        cross cache and marked computed, as the first step's cross-attention would do it (the layer's
        own projections, the cache's own update): every step, the first one included, then only
        reads them, so the first step is the same call as the others and replays the same graph.
        (Eagerly, transformers' first step is ~4,000 operator calls for flan-t5-base, host time
        while the GPU waits.)"""
        hidden = self.encoder_outputs.last_hidden_state[:: self.copies]  # (N / copies, S, d_model)
        if self.own is not None and self.own.packed:  # our step keeps them packed, without padding
            self.own.fill_cross(cross_projections(self.model), hidden, self.encoder_mask[:: self.copies])
        else:
            rows, source_len = hidden.shape[:2]
            head_dim = _decoder_head_shape(_base_model(self.model).config)[1]
            cross = self.cache.cross_attention_cache
            for layer_idx, (keys, values) in enumerate(cross_projections(self.model)):
                shape = (rows, source_len, -1, head_dim)
                cross.update(keys(hidden).view(shape).transpose(1, 2), values(hidden).view(shape).transpose(1, 2),
                             layer_idx)  # (N, H, S, dk) each  # fmt: skip
                self.cache.is_updated[layer_idx] = True
        if self.own is not None:
            self.own.prepare(self.model)  # the self-attention bias table, per batch

    def reset(self) -> None:
        """Back to before the first step, in place (a captured graph keeps these tensors): positions
        0 in both caches and the cross-attention marked not computed, so that the next first step
        projects the new encoder output into the same cross-attention tensors. Self-attention slots
        keep stale values: slot t is written at step t before anything reads it, and the causal mask
        hides the slots after it."""
        for layer in (*self.cache.self_attention_cache.layers, *self.cache.cross_attention_cache.layers):
            layer.cumulative_length.zero_()
        for layer_idx in self.cache.is_updated:
            self.cache.is_updated[layer_idx] = False

    def snapshot(self, position: int, steps: int) -> list[tuple]:
        """What `steps` calls of `step()` from `position` change: each self-attention layer's position
        and the key/value slots position..position+steps-1 (the cross-attention cache is only read
        once it is filled)."""
        end = position + steps
        return [
            (layer, layer.cumulative_length.clone(), layer.keys[:, :, position:end].clone(),
             layer.values[:, :, position:end].clone(), position)
            for layer in self.cache.self_attention_cache.layers
        ]  # fmt: skip

    @staticmethod
    def restore(saved: list[tuple]) -> None:
        for layer, length, keys, values, position in saved:
            layer.cumulative_length.copy_(length)
            layer.keys[:, :, position : position + keys.shape[2]].copy_(keys)
            layer.values[:, :, position : position + values.shape[2]].copy_(values)

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of the self-attention cache becomes row rows[i] (N,), in place (a
        captured graph keeps these tensors). Rows past len(rows) (a graph's padding) stay. The
        cross-attention cache needs no reorder: every beam of a source holds that source's keys."""
        n = rows.shape[0]
        for layer in self.cache.self_attention_cache.layers:
            layer.keys[:n].copy_(layer.keys[:n].index_select(0, rows))
            layer.values[:n].copy_(layer.values[:n].index_select(0, rows))

    def take_rows(self, other: _Decoder, keep: torch.Tensor) -> None:
        """Rows `keep` (n,) of `other`'s caches into this decoder's first n rows, with its positions and
        its cross-attention marked computed as there (compaction: the rows still decoding move to a
        smaller batch and go on from the same position). With shared cross-attention (`copies` > 1)
        `keep` holds whole sources: all `copies` rows of each."""
        groups = keep[:: self.copies] // self.copies  # (n / copies,) the sources kept
        pairs = [(mine, theirs, keep) for mine, theirs in zip(self.cache.self_attention_cache.layers,
                                                              other.cache.self_attention_cache.layers, strict=True)]
        pairs += [(mine, theirs, groups) for mine, theirs in zip(self.cache.cross_attention_cache.layers,
                                                                 other.cache.cross_attention_cache.layers, strict=True)]
        for mine, theirs, index in pairs:
            n = index.shape[0]
            mine.keys[:n].copy_(theirs.keys.index_select(0, index))  # (n, H, L, D)
            mine.values[:n].copy_(theirs.values.index_select(0, index))
            mine.cumulative_length.copy_(theirs.cumulative_length)
        for layer_idx, done in other.cache.is_updated.items():
            self.cache.is_updated[layer_idx] = done
        if self.own is not None:
            self.own.take_bias(other.own)
            if self.own.packed:
                self.own.take_cross(other.own, groups)

    def cache_tensors(self) -> list[torch.Tensor]:
        """Every key/value tensor of both caches (tests check that the loop never reallocates them)."""
        layers = [*self.cache.self_attention_cache.layers, *self.cache.cross_attention_cache.layers]
        packed = self.own.cross if self.own is not None and self.own.packed else []
        return [t for layer in layers for t in (layer.keys, layer.values)] + [t for pair in packed for t in pair]


# --- The step as a CUDA graph -------------------------------------------------------------------------

WARMUP_STEPS = 2  # eager calls of the step before capture, as torch's CUDA-graph docs do
GRAPHS_KEPT = 4  # captured steps kept for later calls (each holds its caches and a memory pool)
SOURCE_MULTIPLE = 64  # sources are padded up to a multiple of this in the graph's cache key
# A batch whose source bucket has no recorded step replays a kept one of up to this many times its
# source bucket (the padding positions masked out) rather than record its own: an eval's length-
# sorted batches pass through each bucket once, and a recording (warm-up steps, capture) cost
# 85 ms each, 9 of them 0.77 of the 7.9 s of `flantune eval` on 1,000 SciQ rows (flan-t5-base,
# float32, H200; docs/benchmarks.md). The longer step reads more cross-attention keys/values: at 32
# rows and 512 positions, 1.2 GB in float32 against 0.6 at 256 (~0.13 ms a step at the H200's 4.8 TB/s).
SOURCE_REUSE = 2
# The self-attention cache of a captured step holds a multiple of this many positions, so that calls
# with other max_new_tokens (a server's requests, each with its own cap) replay one recorded step
# instead of recording one per cap. The slots past a call's own cap are never written nor attended
# (the causal mask hides every slot after the current position).
NEW_TOKEN_MULTIPLE = 64
# The step compiled by torch.compile (its kernels fused by inductor) before it is captured, so that a
# replay launches fewer kernels: 1.3-1.6x per decoding step on flan-t5-base (H200), for 13-20 s of
# compilation per shape bucket; tokens equal generate's in float32 on a GPU (tests/test_engine.py).
# Off by default: in `flantune rl` (LoRA) it cut the sampling time of a step by 1.48x but the whole
# step did not get faster (docs/benchmarks.md), and a one-off `flantune eval` pays its compilation.
# generate(compile_step=True) asks for it per call. dynamo keeps one cache per code object: past its
# recompile limit (8 buckets recorded in one process) a new bucket's step runs uncompiled, captured.
COMPILE_STEP = False
COMPILE_OPTIONS: dict = {"dynamic": False}
# T5's own step (flantune.t5_decode) with its layer compiled once for every layer before capture.
COMPILE_LAYERS = os.environ.get("FLANTUNE_COMPILE_LAYERS", "0") == "1"
# A source's samples or beams read one copy of its cross-attention keys/values (`_Decoder`; our own
# T5 step only). FLANTUNE_SHARE_CROSS=0 keeps a copy per row (the A/B side of the benchmarks).
SHARE_CROSS = os.environ.get("FLANTUNE_SHARE_CROSS", "1") != "0"
_GRAPHS: OrderedDict[tuple, _GraphedDecoder] = OrderedDict()


def clear_graphs() -> None:
    """Drop every captured step and encoder pass kept for reuse (and the GPU memory their caches and
    pools hold)."""
    _GRAPHS.clear()
    _ENCODERS.clear()
    _ENCODER_POOLS.clear()


def row_bucket(rows: int) -> int:
    """The batch size a captured step is recorded for: the next power of two up to 128, then the
    next multiple of 128."""
    return 1 << (rows - 1).bit_length() if rows <= 128 else -(-rows // 128) * 128


def _can_capture(device: torch.device) -> bool:
    return device.type == "cuda"


def _use_graphs(graphs: bool | None, device: torch.device) -> bool:
    if graphs is None:
        return _can_capture(device)
    if graphs and not _can_capture(device):
        raise ValueError(
            f"graphs=True needs the model on a CUDA device (it is on {device}): CUDA graphs are CUDA's; "
            "leave graphs=None (on with CUDA only) or pass graphs=False"
        )
    return bool(graphs)


def _fingerprint(model) -> tuple:
    """What a recorded step bakes in besides shapes: the parameters' memory (a graph reads those
    addresses), the train/eval mode, and a PEFT model's adapter state (active adapters, disabled,
    merged), which choose the Python path that was recorded. A step recorded under another
    fingerprint is recaptured."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    # The distinct states of PEFT's tuner layers (LoRA, IA3, trainable tokens, ...): the layers, not
    # PEFT's wrappers around them (a trainable-tokens wrapper has no `merged`).
    adapters = {
        (m.disable_adapters, tuple(m.active_adapters), m.merged)
        for m in model.modules()
        if isinstance(m, BaseTunerLayer)
    }
    return model.training, tuple(sorted(adapters)), tuple(p.data_ptr() for p in model.parameters())


def _belongs(entry, model, routing, fingerprint: tuple) -> bool:
    """Whether a kept entry (a recorded step or encoder pass) was recorded for this model, its
    parameters and adapter state (`fingerprint`) and its routing."""
    return (entry.model_ref() is model and entry.fingerprint == fingerprint
            and (routing is None or entry.routing_ref() is routing))  # fmt: skip


# Models whose kept entries go when the model does (`_forget`). Without it a model's recorded steps
# and encoder passes (their caches and graph pools: GBs for flan-t5-xl at 128 rows) stayed until
# newer entries pushed them out: `flantune eval --compare` held each earlier model's while the next
# one decoded, and sized the next one's batches by the memory left.
_WATCHED: set[int] = set()
_COLLECTED: set[int] = set()


def _forget(model_id: int) -> None:
    """weakref.finalize's callback: the model that was `model_id` has been collected, so nothing can
    replay its entries. Only noted here: a collection can run while a dict of kept entries is being
    iterated; `drop_collected` drops them at the engine's next call."""
    _COLLECTED.add(model_id)


def drop_collected() -> None:
    """Drop the kept entries of every model collected since (with their caches and graph pools)."""
    while _COLLECTED:
        model_id = _COLLECTED.pop()
        _WATCHED.discard(model_id)
        for kept in (_GRAPHS, _ENCODERS):
            for key in [key for key in kept if key[0] == model_id]:
                del kept[key]


def _kept(kept: OrderedDict, key: tuple, limit: int, model, routing, fingerprint: tuple, make: Callable):
    """The entry kept under `key` (whose first item is id(model)) while it still `_belongs` to this
    model; else a new one from `make()`. Kept as the most recent, the oldest dropped past `limit`,
    every one of the model's dropped once the model is collected (`drop_collected`)."""
    drop_collected()
    entry = kept.pop(key, None)
    if entry is None or not _belongs(entry, model, routing, fingerprint):
        entry = None  # dropped first: its buffers and graph pool are freed before new ones are made
        entry = make()
    if id(model) not in _WATCHED:
        _WATCHED.add(id(model))
        weakref.finalize(model, _forget, id(model))
    kept[key] = entry
    while len(kept) > limit:
        kept.popitem(last=False)
    return entry


class _GraphedDecoder:
    """A `_Decoder` of `rows` x `source_len` (the buckets) over static encoder inputs, and its step
    recorded as a CUDA graph at the first call that needs it, for this and later batches.

    Per batch: `load` copies the encoder output and mask in (padding rows and source positions) and
    writes the cross-attention keys/values (`_Decoder.fill_cross`); `first()` and `next(tokens)`
    replay the recorded step."""

    def __init__(self, model, rows: int, source_len: int, width: int, max_new_tokens: int, dtype, device,
                 fingerprint: tuple, compiled: bool = False, routing=None, layers: bool = False,
                 copies: int = 1):  # fmt: skip
        self.model_ref = weakref.ref(model)
        # The LoraRows the recorded step gathers adapters through (its tables and rows buffer), or None.
        self.routing_ref = weakref.ref(routing) if routing is not None else (lambda: None)
        self.fingerprint = fingerprint  # _fingerprint(model) when recorded
        self.rows, self.source_len, self.max_new_tokens = rows, source_len, max_new_tokens
        self.compiled, self.layers = compiled, layers
        self.encoder_hidden = torch.zeros(rows, source_len, width, dtype=dtype, device=device)  # (R, S', d)
        self.encoder_mask = torch.zeros(rows, source_len, dtype=torch.long, device=device)  # (R, S')
        self.decoder = _Decoder(model, self.encoder_hidden, self.encoder_mask, max_new_tokens, layers, copies)
        self.decoder.model = None  # held only during a call: a kept entry must not keep the model alive
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # (R, V) the recorded step's output, rewritten by replay
        self.real = 0  # the rows of the current batch
        self.position = 1  # the position of the step `next` runs when it has to record first

    def load(self, model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, start_id: int) -> None:
        """This batch's encoder output (N, S, d) and mask (N, S) into the static inputs, the caches reset.
        Padding source positions are masked out; padding rows attend to their first position only
        (an all-zero mask row would give a softmax over nothing: NaN), and their output is ignored."""
        rows, source_len = encoder_hidden.shape[:2]
        self.decoder.model, self.real = model, rows
        self.encoder_hidden.zero_()
        self.encoder_hidden[:rows, :source_len].copy_(encoder_hidden)
        self.encoder_mask.zero_()
        self.encoder_mask[:rows, :source_len].copy_(encoder_mask)
        self.encoder_mask[rows:, 0] = 1
        self.decoder.reset()
        self.decoder.tokens.fill_(start_id)
        self.decoder.fill_cross()
        self.position = 1

    @property
    def copies(self) -> int:
        """Rows per source sharing its cross-attention keys/values (1: none)."""
        return self.decoder.copies

    def release(self) -> None:
        self.decoder.model = None
        if self.decoder.own is not None:
            self.decoder.own.release()

    def compact(self, keep: torch.Tensor, position: int, bucket: int, tokens: torch.Tensor) -> _GraphedDecoder:
        """The kept decoder of row bucket `bucket` (at least the one `keep` (n,) fits), holding those
        rows' encoder inputs and caches as of `position` and their next `tokens` (n,), its step
        recorded now if that bucket has none yet (this one released once that worked; a recording
        that fails raises RuntimeError and leaves this one as it was)."""
        model, n = self.decoder.model, keep.shape[0]
        hidden = self.encoder_hidden[: self.real].index_select(0, keep)  # (n, S', d)
        # The caches move row for row: the new bucket has this one's source length exactly.
        new = _graphed_decoder(model, hidden, self.max_new_tokens, self.fingerprint, self.compiled, rows=bucket,
                               wider=False, layers=self.layers, copies=self.copies)  # fmt: skip
        new.decoder.model, new.real, new.position = model, n, position
        new.encoder_hidden.zero_()
        new.encoder_hidden[:n].copy_(hidden)
        new.encoder_mask.zero_()
        new.encoder_mask[:n].copy_(self.encoder_mask[: self.real].index_select(0, keep))
        new.encoder_mask[n:, 0] = 1  # padding rows, as `load` leaves them
        new.decoder.tokens.zero_()  # a valid id for the padding rows (a fresh entry's are uninitialized)
        new.decoder.tokens[:n].copy_(tokens[:, None])
        new.decoder.take_rows(self.decoder, keep)
        if new.graph is None:
            try:
                new._capture(position=position)
            except RuntimeError:
                new.release()
                raise
        self.release()
        return new

    def reorder(self, rows: torch.Tensor) -> None:
        self.decoder.reorder(rows)

    def first(self) -> torch.Tensor:
        """(N, V) logits of step 1 (the start tokens in place, the cross-attention keys/values
        written by `load`): a replay of the recorded step, recording it first if this entry has none.
        If recording at step 1 fails, step 1 runs eagerly and step 2 records (the step before
        cross-attention keys/values were written by `load`), with a warning."""
        if self.graph is None:
            try:
                self._capture(position=0)
            except RuntimeError as e:
                import warnings

                warnings.warn(f"decoding engine: step 1 could not be captured ({e}); it runs eagerly and "
                              "step 2 is captured", stacklevel=2)  # fmt: skip
                self.graph = None
                return self.decoder.step()[: self.real]
        self.graph.replay()
        return self.logits[: self.real]

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, V) logits after `tokens` (N,), by replaying the recorded step (recording it first if
        step 1 ran eagerly)."""
        self.decoder.tokens[: self.real].copy_(tokens[:, None])
        if self.graph is None:
            self._capture(position=self.position)
        self.graph.replay()
        return self.logits[: self.real]

    def _capture(self, position: int) -> None:
        # Called with the tokens of the step at `position` in place, so the warm-up steps run on real
        # inputs. Each warm-up call advances every self-attention layer's position (cumulative_length,
        # a 0-dim tensor the step adds to in place) and writes its key/value slot: those positions and
        # slots are saved before and copied back after, so the first replay is that step again.
        # Capture itself only records (nothing runs), the copy after it is for certainty. Fewer
        # warm-up steps when the cache has fewer slots left (a write past its end: an index error).
        warmup = min(WARMUP_STEPS, self.max_new_tokens - position)
        saved = self.decoder.snapshot(position=position, steps=warmup)
        # (compiled: the warm-up's first call compiles; the recording captures the fused kernels)
        step = torch.compile(self.decoder.step, **COMPILE_OPTIONS) if self.compiled else self.decoder.step
        stream = _warm_up(step, warmup)
        _Decoder.restore(saved)
        self.graph, self.logits = _record(step, stream)
        _Decoder.restore(saved)


def _graphed_decoder(model, encoder_hidden: torch.Tensor, max_new_tokens: int, fingerprint: tuple,
                     compiled: bool = False, routing=None, rows: int = 0, wider: bool = True,
                     layers: bool = False, copies: int = 1) -> _GraphedDecoder:  # fmt: skip
    """The kept `_GraphedDecoder` for this model and shape bucket (a row bucket of at least `rows`),
    or with `wider`, where this source bucket has none, the kept one of the smallest source bucket
    up to SOURCE_REUSE times as long; else a new one (kept, the oldest dropped past GRAPHS_KEPT).
    Its cache holds max_new_tokens rounded up to NEW_TOKEN_MULTIPLE.
    `routing`: the LoraRows the step gathers its rows' adapters through (a step recorded with it
    reads its tables and `rows` buffer, so it is kept apart from the plain step)."""
    n, source_len, width = encoder_hidden.shape
    autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
    key = (
        id(model), max(row_bucket(n), rows), -(-source_len // SOURCE_MULTIPLE) * SOURCE_MULTIPLE,
        -(-max_new_tokens // NEW_TOKEN_MULTIPLE) * NEW_TOKEN_MULTIPLE, encoder_hidden.dtype, autocast,
        encoder_hidden.device, compiled, None if routing is None else id(routing), copies,
    )  # fmt: skip
    if wider and not (key in _GRAPHS and _belongs(_GRAPHS[key], model, routing, fingerprint)):
        longer = [k for k, entry in _GRAPHS.items()
                  if k[:2] == key[:2] and k[3:] == key[3:] and key[2] < k[2] <= SOURCE_REUSE * key[2]
                  and _belongs(entry, model, routing, fingerprint)]  # fmt: skip
        key = min(longer, key=lambda k: k[2], default=key)
    return _kept(_GRAPHS, key, GRAPHS_KEPT, model, routing, fingerprint, lambda: _GraphedDecoder(
        model, key[1], key[2], width, key[3], encoder_hidden.dtype, encoder_hidden.device, fingerprint, compiled,
        routing, layers, copies))  # fmt: skip


# Kept encoder passes, up to ENCODERS_KEPT (8: every source bucket of 64 up to 512 tokens, for one
# row bucket).
ENCODERS_KEPT = 8
_ENCODERS: OrderedDict[tuple, _CapturedEncoder] = OrderedDict()
# One memory pool for every kept encoder pass of a device: they never replay at the same time and
# each output is copied out (into the step's static inputs) before another replays, so their
# intermediates can share memory (a pass of flan-t5-large over 128 x 512 sources peaks at GBs).
_ENCODER_POOLS: dict = {}


class _CapturedEncoder:
    """The encoder pass over up to `rows` sources of up to `source_len` tokens (the buckets,
    `flantune.graphs.StaticSources`), recorded as a CUDA graph at the second use of those buckets
    and replayed for later batches. Eagerly, flan-t5-base's encoder is ~2,500 operator calls, which
    small batches wait on (the server's captured joins, the same idea, took a join from 30 to 5.6 ms
    on an H200; docs/benchmarks.md); large T5 batches are GPU-bound and take the packed encoder
    instead where it pays (below)."""

    def __init__(self, model, rows: int, source_len: int, device, fingerprint: tuple, routing=None):
        self.model_ref = weakref.ref(model)
        self.routing_ref = weakref.ref(routing) if routing is not None else (lambda: None)
        self.fingerprint = fingerprint  # _fingerprint(model) when recorded
        self.sources = StaticSources(rows, source_len, device)
        self.graph = None
        self.hidden: torch.Tensor | None = None  # (R, S', d) the recorded output, rewritten by replay
        # Used once already (eagerly). A recording costs a few eager passes (the warm-up), so a shape
        # seen once (an eval's length-sorted batches pass through each source bucket once) stays eager.
        self.seen = False
        self.failed = False  # its recording failed: these buckets run eagerly from then on

    def run(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, source_rows, routing):
        """(n, s, d): the encoder output of these n sources (n, s), a view of the static output
        (valid until the next replay)."""
        n, s = input_ids.shape
        self.sources.load(input_ids, attention_mask, source_rows)
        if self.graph is None:
            device = self.sources.ids.device
            pool = _ENCODER_POOLS.setdefault(device, torch.cuda.graph_pool_handle()) if device.type == "cuda" else None
            encode = lambda: self.sources.encode(model.get_encoder(), routing)  # noqa: E731
            stream = _warm_up(encode, WARMUP_STEPS)
            self.graph, self.hidden = _record(encode, stream, pool)
        self.graph.replay()
        return self.hidden[:n, :s]


# --- The packed encoder (T5) ---------------------------------------------------------------------------

# T5-family encoders run on the sources' packed layout (flantune.packing.PackedSources: no padding,
# the relative bias restarted per source). transformers' T5 attention materializes a (B, H, S, S)
# float32 bias and SDPA runs it on its math path in float32: flan-t5-base's encoder over 32 SciQ
# sources padded to 512 took 48.7 ms on an H200; packed with FlexAttention in one compiled block (the
# kernels training uses) 4.3 ms, packed with SDPA and the bias as an additive mask in the weights'
# dtype (its memory-efficient kernel, nothing compiled) 8.0 ms (128 sources: 177.9, 12.5 and 20.2 ms;
# docs/benchmarks.md, "The packed encoder" and "An encoder without compilation").
# "auto": on CUDA, for T5-family models whose layers the packed forward drives (LoRA and IA3 through
# PEFT, full weights, QLoRA; not prompt learning nor bottleneck adapters) and batches of one adapter:
# in 16-bit (weights or autocast) "flex" where its compilation pays (below), "sdpa" otherwise; in
# float32 "sdpa" (`flantune eval` of 1,000 SciQ rows, flan-t5-base: 6.8 against 7.8 s, one run each);
# "flex", "sdpa" or "eager" (the materialized reference, any device) force one where it applies;
# "off" keeps transformers' encoder. FLANTUNE_PACKED_ENCODER sets it.
PACKED_ENCODER = os.environ.get("FLANTUNE_PACKED_ENCODER", "auto")
PACKED_MODES = ("auto", "flex", "sdpa", "eager", "off")
PACKED_WIDTH = 512  # packed row length (longer sources get rows of their own length, rounded to 128)
# Under "auto", batches of fewer padded source tokens (rows x length) keep transformers' encoder
# (captured from its second use): there the packed pass gained nothing or lost (H200, flan-t5-base:
# 16 x 269 tokens, first token 24.8 against 25.5 ms; 8 x 177, 24.0 against 12.1 ms; 32 x 512: 17.1
# against 53.9 ms).
PACKED_MIN_TOKENS = 8192
# FlexAttention's block compilation (11.2 s from an empty cache, once per process) must pay: a call
# takes it once the block is compiled in this process, or when its caller expects
# enough work (generate(packed_encoder=True): RL's rollouts; flantune.decoding.generate_outputs from
# PACKED_PAYS_TOKENS padded tokens in large batches, ~2.2-2.5 us saved per padded token on the H200).
PACKED_PAYS_TOKENS = 4_000_000
_PACKED_BLOCK: list = []  # the compiled fast_t5.t5_block, made at first use
_PACKED_FAILED: list[str] = []  # why the compiled packed encoder failed, once: then the SDPA one runs
_PACKED_COMPILED: list[bool] = []  # [True] once a packed pass ran compiled in this process


def _packed_encoder_mode(model, device: torch.device, mixed_adapters: bool, source_tokens: int,
                        pays: bool = True) -> str | None:  # fmt: skip
    """"flex", "sdpa", "eager" or None (transformers' encoder) for this model and call
    (PACKED_ENCODER); `source_tokens`: the batch's padded source tokens (rows x length); `pays`: the
    caller expects enough work for the flex block's compilation to pay (else auto takes sdpa until
    the block is compiled). Asked at every call: the cheap refusals come first, the walk over the
    model's modules last."""
    mode = PACKED_ENCODER
    if mode not in PACKED_MODES:
        raise SettingError(f"FLANTUNE_PACKED_ENCODER={mode!r}: the decoding engine's packed encoder takes "
                           f"{', '.join(PACKED_MODES[:-1])} or off")  # fmt: skip
    if mode == "off" or mixed_adapters:
        return None
    base = _base_model(model)
    if mode == "auto":
        if device.type != "cuda" or source_tokens < PACKED_MIN_TOKENS:
            return None
        sixteen = (torch.bfloat16, torch.float16)
        autocast = torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in sixteen
        # float32 (flantune eval's default): SDPA's memory-efficient kernel in float32 too, never the
        # flex block, whose compilation and tiles are for 16-bit.
        float32 = not (autocast or embedding_dtype(base.get_encoder().embed_tokens) in sixteen)
    from flantune.adapters import has_adapters
    from flantune.speed import PACKED_MODEL_TYPES

    if base.config.model_type not in PACKED_MODEL_TYPES or has_adapters(base):
        return None
    kinds = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in (getattr(model, "peft_config", None) or {}).values()}
    if kinds - {"LORA", "IA3"}:
        return None
    if mode == "auto":
        return "flex" if (pays or _PACKED_COMPILED) and not _PACKED_FAILED and not float32 else "sdpa"
    return mode


def _packed_block():
    if not _PACKED_BLOCK:
        from flantune import fast_t5

        # One graph per grad mode and a few shapes (the packed row count varies by batch; torch marks
        # it dynamic at its second value); RL's training blocks share the code object's cache.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _PACKED_BLOCK.append(torch.compile(fast_t5.t5_block))
    return _PACKED_BLOCK[0]


def _encode_packed(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor | None:
    """(B, S, d): the packed encoder's output, or None where its compiled kernels failed (warned once)."""
    from flantune import fast_t5, packing

    sources = packing.PackedSources(input_ids, attention_mask, width=PACKED_WIDTH,
                                    block=fast_t5.BLOCK if mode == "flex" else None)  # fmt: skip
    if mode != "flex":
        return fast_t5.packed_encoder_output(model, sources, mode)
    if PACKED_ENCODER == "auto":
        from flantune.speed import use_compile_cache

        use_compile_cache()  # a later process compiles the block from the cache
    try:
        hidden = fast_t5.packed_encoder_output(model, sources, "flex", block_fn=_packed_block())
        _PACKED_COMPILED[:] = [True]
        return hidden
    except Exception as e:  # inductor and triton fail with many types: say which, go on eagerly
        if PACKED_ENCODER != "auto":
            raise
        import warnings

        _PACKED_FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(f"decoding engine: the packed encoder could not be compiled ({_PACKED_FAILED[0][:300]}); "
                      "it runs uncompiled with SDPA instead", stacklevel=3)  # fmt: skip
        return fast_t5.packed_encoder_output(model, sources, "sdpa")


def _encode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, source_rows, routing,
            fingerprint: tuple | None, packed: str | None = None) -> torch.Tensor:  # fmt: skip
    """(B, S, d): the encoder over the sources, once each. `packed` ("flex", "sdpa", "eager"): on their
    packed layout (`_encode_packed`). Else, with a `fingerprint` (graphs): replayed from the kept
    `_CapturedEncoder` of its buckets (recorded at their second use; the first runs eagerly); else
    eager. A recording that fails warns once per buckets, which then run eagerly."""
    if packed is not None:
        hidden = _encode_packed(model, input_ids, attention_mask, packed)
        if hidden is not None:
            return hidden
    encoder = model.get_encoder()
    if fingerprint is not None:
        rows, source_len = input_ids.shape
        autocast = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        key = (id(model), row_bucket(rows), -(-source_len // SOURCE_MULTIPLE) * SOURCE_MULTIPLE, autocast,
               input_ids.device, None if routing is None else id(routing))  # fmt: skip
        entry = _kept(_ENCODERS, key, ENCODERS_KEPT, model, routing, fingerprint, lambda: _CapturedEncoder(
            model, key[1], key[2], input_ids.device, fingerprint, routing))  # fmt: skip
        if not entry.seen:
            entry.seen = True  # recorded at the second use of these buckets: one-off shapes stay eager
        elif not entry.failed:
            try:
                return entry.run(model, input_ids, attention_mask, source_rows, routing)
            except RuntimeError as e:
                import warnings

                warnings.warn(f"decoding engine: the encoder pass could not be captured ({e}); it runs eagerly",
                              stacklevel=3)  # fmt: skip
                entry.failed = True
    with routing.routed(encoder, source_rows) if routing is not None else contextlib.nullcontext():
        return encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]


class _EagerDecoder:
    """The same interface over a plain `_Decoder` of the batch's own shape, every step eager."""

    def __init__(self, model, encoder_hidden: torch.Tensor, encoder_mask: torch.Tensor, max_new_tokens: int,
                 start_id: int, copies: int = 1):  # fmt: skip
        self.decoder = _Decoder(model, encoder_hidden, encoder_mask, max_new_tokens, copies=copies)
        self.decoder.tokens.fill_(start_id)
        if self.decoder.own is not None:  # our step reads the cross-attention keys/values from the cache
            self.decoder.fill_cross()

    @property
    def copies(self) -> int:
        return self.decoder.copies

    def first(self) -> torch.Tensor:
        return self.decoder.step()

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.decoder.tokens.copy_(tokens[:, None])
        return self.decoder.step()

    def reorder(self, rows: torch.Tensor) -> None:
        self.decoder.reorder(rows)

    def release(self) -> None:
        pass

    def compact(self, keep: torch.Tensor, position: int, bucket: int = 0, tokens=None) -> _EagerDecoder:
        """A decoder of the rows `keep` (n,) only, their caches as of now (no buckets eagerly; the
        next tokens come with `next`)."""
        old = self.decoder
        new = _EagerDecoder.__new__(_EagerDecoder)
        new.decoder = _Decoder(old.model, old.encoder_outputs.last_hidden_state.index_select(0, keep),
                               old.encoder_mask.index_select(0, keep), old.decoder_mask.shape[1],
                               copies=old.copies)  # fmt: skip
        new.decoder.take_rows(old, keep)
        return new


# The architectures whose decoder the engine drives (their cache layout, head shapes and position
# handling are tested against generate). Others decode through transformers' generate.
ENGINE_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "bart"})
_FALLBACK_SAID: set[str] = set()


# On CUDA the decode step runs one kernel after another, each on tiny tensors, so its time follows
# the number of kernels (flan-t5-base: 2.67 ms a step at 32 rows on an H200, replayed from a CUDA
# graph). transformers' T5LayerNorm is 6 kernels (8 with its casts in 16-bit) where torch's
# F.rms_norm is one fused kernel, and its "gelu_new" activation 8 where F.gelu(approximate="tanh")
# is one, the same formula (computed in float32 inside the kernel). Counted with torch.profiler on
# the CPU (each fused op once), a flan-t5-base decode step goes from 662 kernel-sized operator calls
# to 356 with them. During `generate` on CUDA those modules run the fused forms (FUSED_LAYERS;
# FLANTUNE_FUSED_LAYERS=0 keeps transformers' forms); on the CPU the engine keeps transformers' forms,
# whose ids the tests compare token for token.
FUSED_LAYERS = os.environ.get("FLANTUNE_FUSED_LAYERS", "1") != "0"
_RMS_NORMS = ("T5LayerNorm", "MT5LayerNorm", "UMT5LayerNorm", "LongT5LayerNorm")


def _fused_rms_norm(self, hidden: torch.Tensor) -> torch.Tensor:
    if hidden.dtype != self.weight.dtype:  # T5LayerNorm's own casts (float32 weights under autocast)
        return type(self).forward(self, hidden)
    return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), self.weight, self.variance_epsilon)


def _fused_gelu_tanh(self, hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.gelu(hidden, approximate="tanh")


@contextlib.contextmanager
def fused_layers(model, enabled: bool = True):
    """Within the block, `model`'s T5 RMS norms and tanh-GELU activations run torch's fused kernels
    (an instance `forward`, removed after; a module that already has one, such as Accelerate's
    offloading hooks give, is left alone)."""
    from transformers.activations import NewGELUActivation

    patched = []
    if enabled:
        for module in model.modules():
            if "forward" in vars(module):
                continue
            if type(module).__name__ in _RMS_NORMS and hasattr(module, "variance_epsilon"):
                module.forward = _fused_rms_norm.__get__(module)
            elif type(module) is NewGELUActivation:
                module.forward = _fused_gelu_tanh.__get__(module)
            else:
                continue
            patched.append(module)
    try:
        yield bool(patched)
    finally:
        for module in patched:
            del module.forward


def supports(model) -> bool:
    """Whether the engine decodes this model itself (else `generate` falls back to transformers')."""
    return _base_model(model).config.model_type in ENGINE_MODEL_TYPES


def transformers_generate(model, input_ids, attention_mask, *, cache: str = "auto", stop=None, on_step=None,
                          generator=None, return_logprobs=False, graphs=None, **options) -> Generation:  # fmt: skip
    """transformers' `model.generate` behind `generate`'s signature and option meanings (top_k absent
    or 0: no filter). For an architecture the engine does not drive (cache "auto": transformers'
    static cache where the model supports one, `_can_compile_fullgraph`, said once per
    architecture), and as the benchmarks' baseline (cache "dynamic": generate's default cache, the
    decoder flantune's commands used before the engine)."""
    import warnings

    from transformers import StoppingCriteria, StoppingCriteriaList

    model_type = _base_model(model).config.model_type
    if return_logprobs or generator is not None or graphs:
        raise ValueError(
            f"{model_type}: return_logprobs, generator and graphs need flantune's decoding engine, which "
            f"drives {', '.join(sorted(ENGINE_MODEL_TYPES))} models"
        )
    if cache not in ("auto", "dynamic"):
        raise ValueError(f"cache: 'auto' or 'dynamic', not {cache!r}")
    static = cache == "auto" and getattr(type(_base_model(model)), "_can_compile_fullgraph", False)
    if cache == "auto" and model_type not in _FALLBACK_SAID:
        _FALLBACK_SAID.add(model_type)
        warnings.warn(
            f"flantune's decoding engine drives {', '.join(sorted(ENGINE_MODEL_TYPES))} models; {model_type} "
            f"decodes through transformers' generate ({'static' if static else 'dynamic'} cache)",
            stacklevel=3,
        )

    class _Hooks(StoppingCriteria):
        """Asked after every step: `on_step`, then `stop` (True stops every row)."""

        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores, **kwargs):
            if on_step is not None:
                on_step(self.step, input_ids[:, -1])
            self.step += 1
            done = stop is not None and bool(stop())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    options = {k: v for k, v in options.items() if v is not None}
    if options.get("logits_processor"):
        options["logits_processor"] = LogitsProcessorList(options["logits_processor"])
    if options.get("do_sample"):
        options.setdefault("top_k", 0)  # the engine's "no filter", explicit (generate's default is 50)
    else:
        options.pop("top_k", None)  # greedy and beams: generate warns that it ignores top_k
    if static:
        options["cache_implementation"] = "static"
    if stop is not None or on_step is not None:
        options["stopping_criteria"] = StoppingCriteriaList([_Hooks()])
    if options.get("num_beams", 1) == 1:
        options.pop("early_stopping", None)
    sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
    return Generation(sequences=sequences)


def _length_penalty(gen, given: float | None) -> float:
    """The caller's, else the checkpoint's generation config's, else generate's default of 1.0."""
    if given is not None:
        return given
    return gen.length_penalty if getattr(gen, "length_penalty", None) is not None else 1.0


def _adapter_rows(model, adapter_names: list[str] | None, copies: int):
    """PEFT's context for batches that mix LoRA adapters (the one PeftModel.generate enters):
    pre-forward hooks hand every LoRA layer its rows' adapter names ("__base__": no adapter). With
    `copies` rows per source (samples or beams), PEFT repeats each name for the decoder's rows and
    keeps one per source for the encoder (its `num_beams` argument does only that)."""
    if adapter_names is None:
        return contextlib.nullcontext()
    if not hasattr(model, "_enable_peft_forward_hooks"):
        raise ValueError("adapter_names needs a PEFT model with LoRA adapters (this model has none)")
    return model._enable_peft_forward_hooks(adapter_names=list(adapter_names), num_beams=copies)


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
    num_beams: int = 1,
    length_penalty: float | None = None,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    logits_processor: LogitsProcessorList | list | None = None,
    return_logprobs: bool = False,
    generator: torch.Generator | None = None,
    adapter_names: list[str] | None = None,
    stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    graphs: bool | None = None,
    compile_step: bool | None = None,
    adapter_rows=None,
    packed_encoder: bool = False,
    compile_layers: bool | None = None,
) -> Generation:
    """Decode `input_ids` (B, S) with `attention_mask` (B, S), padded sources, one token per step.

    Greedy by default; `do_sample` draws from the processed distribution with torch.multinomial
    (from `generator` if given, else torch's global RNG). `num_return_sequences` gives that many
    completions per source, adjacent, from one encoder pass (sampling: that many samples; beam
    search: the best that many beams). `top_k=0` and `top_p=1.0` mean no filter (unlike generate's
    default top_k of 50). A row stops at the model's EOS and emits pad after it; the loop ends when
    every row has stopped or after `max_new_tokens` steps.

    `num_beams` > 1: beam search, as `model.generate(num_beams=...)` does it (`length_penalty`, the
    model's generation config's when None; `early_stopping` True, False or "never"); with
    `do_sample`, beam sampling. `adapter_names` (one per source, "__base__" for none): the LoRA
    adapter of each row, PEFT's mixed-adapter batches; with `adapter_rows` (a
    flantune.lora_rows.LoraRows holding those adapters, its `rows` buffer at least the step's row
    bucket), each LoRA layer gathers its rows' matrices by an index tensor instead, so the step keeps
    fixed shapes and is captured like any other (the tables are copies: for adapters that do not
    change, as a server's; its `rows` buffer is overwritten). `stop()`, asked at every stopping check,
    ends the generation early when it returns True (what is decoded so far comes back).
    `on_step(t, tokens)` is called once step t (0-based) is issued, with that step's tokens (N,)
    on the device (pad for finished rows; with beams, each running beam's): its kernels are queued,
    not waited for, so a caller that reads the tokens or times the step synchronizes itself.

    `graphs`: replay the decode step as a CUDA graph (module docstring). None: on when the model is
    on CUDA, unless `adapter_names` mix through PEFT (without `adapter_rows`: that step runs
    eagerly); False: every step
    eager; True on another device is an error. The output is the eager loop's (the same kernels;
    padding rows and source positions change no real row). `compile_step`: the captured step is
    compiled by torch.compile first (COMPILE_STEP when None); it only applies with graphs.
    `compile_layers`: T5's own step (flantune.t5_decode) with its layer compiled once for every
    layer before capture (COMPILE_LAYERS when None; with graphs, and not with `compile_step`).
    `packed_encoder`: the caller decodes enough large batches in this process for the packed
    FlexAttention encoder's one compilation to pay (PACKED_ENCODER "auto" takes it then, or once
    compiled; else the uncompiled SDPA packed encoder).
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, got {num_beams}")
    if num_return_sequences > num_beams and not do_sample:
        raise ValueError(
            f"num_return_sequences={num_return_sequences} needs do_sample=True or at least as many beams "
            "(greedy copies would be identical)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if return_logprobs and num_beams > 1:
        raise ValueError("return_logprobs is for greedy decoding and sampling, not beam search")
    if adapter_names is not None and len(adapter_names) != input_ids.shape[0]:
        raise ValueError(f"adapter_names: {len(adapter_names)} names for {input_ids.shape[0]} sources")
    if not supports(model):
        return transformers_generate(
            model, input_ids, attention_mask, stop=stop, on_step=on_step, generator=generator,
            return_logprobs=return_logprobs,
            graphs=graphs, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
            num_return_sequences=num_return_sequences, adapter_names=adapter_names,
            logits_processor=logits_processor,
        )  # fmt: skip
    drop_collected()  # what earlier models left, before this call's memory is sized and allocated
    device = _base_model(model).device
    copies = num_beams if num_beams > 1 else num_return_sequences  # decoder rows per source
    # Rows of several adapters gathered per row (LoraRows) where its row buffer holds the step's
    # bucket; else PEFT's adapter_names hooks, eagerly.
    routing = (
        adapter_rows
        if adapter_names is not None and adapter_rows is not None
        and adapter_rows.rows.numel() >= row_bucket(input_ids.shape[0] * copies)
        else None
    )  # fmt: skip
    if adapter_names is not None and routing is None and graphs:
        raise ValueError("graphs=True with adapter_names: a mixed-adapter step runs eagerly (graphs=None)")
    use_graphs = (adapter_names is None or routing is not None) and _use_graphs(graphs, device)
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
        prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, extra=logits_processor, num_beams=num_beams,
        device=input_ids.device,
    )  # fmt: skip
    # The stopping check reads flags on the host, a sync that stalls the queue of replays: with graphs
    # it is made every 8 steps. Steps run after the loop could have stopped change nothing (finished
    # rows emit pad; beams that can no longer improve are not taken), so the output is the same as
    # checking at every step.
    check_every = 8 if use_graphs else 1

    # What a kept recording bakes in besides shapes (`_fingerprint`, and the fused layers' kernels),
    # read once per call.
    fused = FUSED_LAYERS and _can_capture(device)
    compiled = use_graphs and (COMPILE_STEP if compile_step is None else compile_step)
    layers = use_graphs and not compiled and (COMPILE_LAYERS if compile_layers is None else compile_layers)
    fingerprint = (*_fingerprint(model), fused, t5_decode.OWN_STEP, t5_decode.PACKED_CROSS, layers) if use_graphs else None
    source_rows, decoder_rows = None, contextlib.nullcontext()
    if routing is not None:
        source_rows = routing.indices(adapter_names, input_ids.device)  # (B,) each source's adapter index
        routing.rows.zero_()  # rows past the batch (a captured bucket's padding) run the base
        routing.rows[: input_ids.shape[0] * copies] = source_rows.repeat_interleave(copies)  # (N,)
        decoder_rows = routing.routed(model, routing.rows)  # the buffer a recorded step reads
    packed = None if routing is not None else _packed_encoder_mode(
        model, device, adapter_names is not None, input_ids.numel(), packed_encoder)
    # Compiled passes (the FlexAttention encoder, the compiled step) get their kernels fused by
    # inductor: the fused layers are for the eager and captured ones. Patched once for the call where
    # both parts take them (a walk over the model's modules: ~1 ms for flan-t5-base on the CPU).
    fuse_encoder, fuse_decoder = fused and packed != "flex", fused and not compiled
    with _adapter_rows(model, adapter_names if routing is None else None, copies), \
            fused_layers(model, fuse_encoder and fuse_decoder):  # fmt: skip
        # The encoder, once per source: (B, S, d_model), then (N, S, d_model) with N = B * copies.
        # Named ranges for torch.profiler (bench/generate_speed.py --profile-ttft reads them).
        with torch.profiler.record_function("flantune.engine.encoder"), \
                fused_layers(model, fuse_encoder and not fuse_decoder):  # fmt: skip
            encoder_hidden = _encode(model, input_ids, attention_mask, source_rows, routing, fingerprint, packed)
        encoder_hidden = encoder_hidden.repeat_interleave(copies, dim=0)
        encoder_mask = attention_mask.repeat_interleave(copies, dim=0)
        with decoder_rows, fused_layers(model, fuse_decoder and not fuse_encoder):
            # Everything the loop writes, allocated before it.
            with torch.profiler.record_function("flantune.engine.load"):  # cross-attention keys/values
                # Rows of one source share its cross-attention keys/values unless adapters differ by
                # row (PEFT's names and the gathered rows index the decoder's rows).
                shared = copies if adapter_names is None else 1
                if use_graphs:
                    decoder = _graphed_decoder(model, encoder_hidden, max_new_tokens, fingerprint, compiled, routing,
                                               layers=layers, copies=shared)  # fmt: skip
                    decoder.load(model, encoder_hidden, encoder_mask, start_id)
                else:
                    decoder = _EagerDecoder(model, encoder_hidden, encoder_mask, max_new_tokens, start_id, shared)
            try:
                if num_beams > 1:
                    return _beam_search(
                        decoder, processors, sources=input_ids.shape[0], num_beams=num_beams,
                        max_new_tokens=max_new_tokens, start_id=start_id, pad_id=pad_id, eos_ids=eos_ids,
                        do_sample=do_sample, generator=generator, num_return_sequences=num_return_sequences,
                        length_penalty=_length_penalty(gen, length_penalty),
                        early_stopping=early_stopping, check_every=check_every, stop=stop, on_step=on_step,
                    )  # fmt: skip
                compact = adapter_names is None and not compiled and _compactable(processors)
                return _one_token_per_step(
                    decoder, processors, rows=encoder_hidden.shape[0], max_new_tokens=max_new_tokens,
                    start_id=start_id, pad_id=pad_id, eos_ids=eos_ids, do_sample=do_sample, generator=generator,
                    return_logprobs=return_logprobs, check_every=check_every, stop=stop, on_step=on_step,
                    compact=compact,
                )  # fmt: skip
            finally:
                decoder.release()


# Finished rows stop costing work: at a stopping check, when the rows still decoding fit a row
# bucket at most half the current one, they move to a decoder of that bucket (their caches copied,
# `compact`) and the rest of the call runs the smaller step. Only from COMPACT_FROM_ROWS rows and
# down to COMPACT_FLOOR: the step is launch-bound below that (flan-t5-base on an H200: 2.65 ms a step
# at 32 rows, 3.95 ms at 128; docs/benchmarks.md), so a smaller bucket would save less than its
# recording costs, and few buckets stay among the GRAPHS_KEPT recordings (128, 64, 32).
# Greedy decoding and sampling, with transformers' row-wise processors or ones that take
# `select_rows(index)` (flantune.decoding.KeyedSampling); not with beams, a prefix function (its
# batch_id is the row's place in the batch), mixed adapters or the compiled step (a new bucket would
# compile again).
COMPACT_FROM_ROWS = 64
COMPACT_FLOOR = 32
_ROW_WISE = (RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor, NoBadWordsLogitsProcessor,
             MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor, ForcedBOSTokenLogitsProcessor,
             ForcedEOSTokenLogitsProcessor, SuppressTokensLogitsProcessor, SuppressTokensAtBeginLogitsProcessor,
             TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)  # fmt: skip


def _compactable(processors) -> bool:
    """Whether every processor scores a row from that row alone (so rows can leave the batch)."""
    return all(isinstance(p, _ROW_WISE) or hasattr(p, "select_rows") for p in processors)


def _select_rows(processors, keep: torch.Tensor) -> LogitsProcessorList:
    return LogitsProcessorList([p.select_rows(keep) if hasattr(p, "select_rows") else p for p in processors])


def _one_token_per_step(decoder, processors, *, rows: int, max_new_tokens: int, start_id: int, pad_id: int,
                        eos_ids: torch.Tensor, do_sample: bool, generator, return_logprobs: bool,
                        check_every: int, stop, on_step, compact: bool = False) -> Generation:  # fmt: skip
    """Greedy decoding or sampling: each row picks its next token from its own processed scores.
    `compact`: finished rows leave the batch at the stopping checks (COMPACT_FROM_ROWS)."""
    device = eos_ids.device
    sequences = torch.full((rows, 1 + max_new_tokens), pad_id, dtype=torch.long, device=device)  # (N, 1+T)
    sequences[:, 0] = start_id
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)  # (N, T)
    # The decoder's rows among the N: all of them (a slice: views, no gather) until rows leave, then
    # their (n,) indices.
    live: slice | torch.Tensor = slice(None)
    unfinished = torch.ones(rows, dtype=torch.bool, device=device)  # (n,) of the decoder's rows
    steps = torch.zeros((), dtype=torch.long, device=device)  # the last step any row was generating at
    next_tokens = None
    first = decoder
    # A last processor that leaves one token (flantune.decoding.KeyedSampling, `decides`) has made
    # the draw itself: its argmax is that token, without a softmax and a draw over (n, V) a step.
    draws = do_sample and not (len(processors) and getattr(processors[-1], "decides", False))
    try:
        for t in range(max_new_tokens):
            # (n, V), float32 as generate scores them
            logits = (decoder.first() if t == 0 else decoder.next(next_tokens)).float()
            # The processors see the ids so far (n, 1+t), start token first, as in generate.
            ids = sequences[live, : 1 + t]
            scores = processors(ids, logits)
            if draws:
                probs = torch.softmax(scores, dim=-1)
                next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (n,)
            else:
                next_tokens = scores.argmax(dim=-1)  # (n,)
            next_tokens = torch.where(unfinished, next_tokens, pad_id)
            if return_logprobs:
                raw = torch.log_softmax(logits, dim=-1).gather(1, next_tokens[:, None]).squeeze(1)  # (n,)
                logprobs[live, t] = torch.where(unfinished, raw, 0.0)
            sequences[live, 1 + t] = next_tokens
            steps = torch.where(unfinished.any(), t + 1, steps)
            unfinished &= ~torch.isin(next_tokens, eos_ids)
            if on_step is not None:  # (N,) tokens, pad for the rows that left
                on_step(t, sequences[:, 1 + t])
            if (t + 1) % check_every == 0:
                if not unfinished.any() or (stop is not None and stop()):  # sync
                    break
                n = unfinished.shape[0]
                if compact and row_bucket(n) >= COMPACT_FROM_ROWS and t + 1 < max_new_tokens:
                    # (n',) sync (made at the check above already). Rows that share their source's
                    # cross-attention keys/values leave with the source: when all its rows finished.
                    c = decoder.copies
                    keep = (unfinished.view(-1, c).any(1).repeat_interleave(c) if c > 1 else unfinished).nonzero().squeeze(1)
                    bucket = max(row_bucket(keep.shape[0]), COMPACT_FLOOR)
                    if bucket <= row_bucket(n) // 2:
                        try:
                            smaller = decoder.compact(keep, position=t + 1, bucket=bucket, tokens=next_tokens[keep])
                        except RuntimeError as e:  # the smaller bucket's step could not be recorded
                            import warnings

                            warnings.warn(f"decoding engine: finished rows could not leave the batch ({e}); "
                                          "it decodes at its size", stacklevel=3)  # fmt: skip
                            compact = False
                        else:
                            if decoder is not first:
                                decoder.release()
                            decoder = smaller
                            live = keep if isinstance(live, slice) else live[keep]
                            unfinished, next_tokens = unfinished[keep], next_tokens[keep]
                            processors = _select_rows(processors, keep)
    finally:
        if decoder is not first:
            decoder.release()
    steps = int(steps)
    return Generation(
        sequences=sequences[:, : 1 + steps],
        logprobs=logprobs[:, :steps] if return_logprobs else None,
    )


def _beam_search(decoder, processors, *, sources: int, num_beams: int, max_new_tokens: int, start_id: int,
                 pad_id: int, eos_ids: torch.Tensor, do_sample: bool, generator, num_return_sequences: int,
                 length_penalty: float, early_stopping: bool | str, check_every: int, stop,
                 on_step) -> Generation:  # fmt: skip
    """Beam search over the engine's decoder: transformers' vectorized beam search
    (GenerationMixin._beam_search, v5), its candidates, stopping rule and finished-beam bookkeeping
    step for step, so that the output equals `generate(num_beams=K)`. What differs is the cache: the
    static one, whose self-attention rows are reordered in place after each step (a replayed graph
    reads the same tensors).

    Shapes: B sources, K beams, N = B*K decoder rows, V vocabulary, L = 1 + max_new_tokens;
    C = max(2, 1 + number of EOS ids) * K candidates kept per source and step."""
    B, K, L = sources, num_beams, 1 + max_new_tokens
    device = eos_ids.device
    C = max(2, 1 + eos_ids.numel()) * K
    top_beams = torch.arange(C, device=device) < K  # (C,) the candidates that may finish a beam
    # generate fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 (T5's) falls through to EOS.
    fill = pad_id if pad_id else int(eos_ids[0])
    running = torch.full((B, K, L), fill, dtype=torch.long, device=device)  # (B, K, L)
    running[:, :, 0] = start_id
    finished = running.clone()  # (B, K, L) the best finished hypotheses
    running_scores = torch.zeros(B, K, device=device)  # (B, K) summed log-probabilities
    running_scores[:, 1:] = -1e9  # the first step takes candidates from beam 0 only (the rest are its copies)
    finished_scores = torch.full((B, K), -1e9, device=device)  # (B, K) length-penalized
    is_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # the early-stop heuristic, per source
    running_rows = torch.full((B, K, max_new_tokens), -1, dtype=torch.long, device=device)  # row at each step
    finished_rows = running_rows.clone()
    offset = torch.arange(B, device=device)[:, None] * K  # (B, 1) first row of each source

    def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (B, X, ...) by (B, Y) -> (B, Y, ...)
        return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)

    tokens = None
    for t in range(max_new_tokens):
        length = 1 + t  # ids per row so far, start token included
        logits = (decoder.first() if t == 0 else decoder.next(tokens)).float()  # (N, V)
        flat = running[:, :, :length].reshape(B * K, length)
        log_probs = processors(flat, torch.log_softmax(logits, dim=-1))  # (N, V)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(B, K, vocab) + running_scores[:, :, None]).view(B, K * vocab)
        if do_sample:
            top = torch.multinomial(torch.softmax(total, dim=-1), C, generator=generator)  # (B, C)
            top_scores, order = total.gather(1, top).sort(dim=-1, descending=True)
            top = top.gather(1, order)
        else:
            top_scores, top = total.topk(C)  # (B, C)
        beam, ids = top // vocab, top % vocab
        top_seqs = gather(running, beam)  # (B, C, L)
        top_seqs[:, :, length] = ids
        top_rows = gather(running_rows, beam)  # (B, C, T)
        top_rows[:, :, t] = beam + offset
        # generate's stopping criteria, per candidate: EOS, or the length cap reached.
        hits = torch.isin(ids, eos_ids) | (length + 1 >= L)  # (B, C)

        # The K best candidates that did not finish run on.
        open_scores = top_scores + hits.float() * -1e9
        keep = open_scores.topk(K)[1]  # (B, K)
        running, running_scores, running_rows = gather(top_seqs, keep), gather(open_scores, keep), gather(top_rows, keep)

        # Finished candidates among the top K enter the finished set if they beat its worst.
        just = hits & top_beams[None, :]
        scores = top_scores / (length ** length_penalty)
        full = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        scores = scores + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just).float() * -1e9
        best = torch.cat((finished_scores, scores), dim=1).topk(K)[1]  # (B, K)
        finished = gather(torch.cat((finished, top_seqs), dim=1), best)
        finished_scores = gather(torch.cat((finished_scores, scores), dim=1), best)
        finished_rows = gather(torch.cat((finished_rows, top_rows), dim=1), best)
        is_finished = gather(torch.cat((is_finished, just), dim=1), best)

        # The cache follows the beams: decoder row i continues the hypothesis of row running_rows[i, t].
        decoder.reorder(running_rows[:, :, t].reshape(B * K))
        tokens = running[:, :, length].reshape(B * K)

        # generate's early-stop heuristic: can a running beam still beat the worst finished one?
        hypothetical = max_new_tokens if early_stopping == "never" and length_penalty > 0.0 else length
        best_running = running_scores[:, :1] / (hypothetical**length_penalty)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & (best_running > worst).any(dim=-1, keepdim=True)
        if on_step is not None:
            on_step(t, tokens)
        if (t + 1) % check_every == 0 or t + 1 == max_new_tokens:
            open_beam = not (early_stopping is True and bool(is_finished.all()))  # sync
            if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
                break
            if stop is not None and stop():
                break

    R = num_return_sequences
    sequences = finished[:, :R].reshape(B * R, L)
    rows = finished_rows[:, :R].reshape(B * R, max_new_tokens)
    generated = int((rows >= 0).sum(dim=1).max())  # the longest kept hypothesis
    return Generation(sequences=sequences[:, : 1 + generated])
