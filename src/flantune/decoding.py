"""Decoding: sources in, texts out, for every command that generates.

eval, in-training evaluation, RL sampling, generate and serve all decode through this module, and
this module decodes through flantune.engine (static cache; the decode step replayed as a CUDA graph
on a GPU), never through `model.generate`.

Batches are formed by source length so a batch holds similar lengths and little padding. The
output cap always comes from the caller (the recipe or a flag): transformers' own default of 20
new tokens would cut answers silently.

    generate_outputs batched generation with the recipe's options, label restriction, stop hooks
    generate_texts   the same, texts only
    auto_rows        rows per batch for batch_size "auto": what the engine's caches fit on the GPU
    sample_groups    G sampled completions per prompt, each row's randomness keyed by its own id
    decode           generated ids → text, keeping added task tokens such as <think>
    LabelTrie        decoding restricted to a task's label strings
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flantune import engine
from flantune.config import GenerationConfig


def generation_kwargs(cfg: GenerationConfig) -> dict:
    """flantune.engine.generate's options for a recipe's `generation` block."""
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


@dataclass
class Output:
    """One source's generated output: its text, the tokens generated (EOS not counted) and whether
    the model ended it (EOS) rather than the cap."""

    text: str
    tokens: int
    finished: bool


@torch.no_grad()
def generate_texts(model, tokenizer, sources: list[str], cfg: GenerationConfig, **options) -> list[str]:
    """Generate one output text per source, in the order of `sources` (`generate_outputs`' texts)."""
    return [out.text for out in generate_outputs(model, tokenizer, sources, cfg, **options)]


AUTO_ROWS_CAP = 128  # the largest power-of-two bucket of the engine's recorded steps
AUTO_ROWS_CPU = 32
AUTO_MEMORY_SHARE = 0.25  # of the device memory free (and reserved by torch but unused) at the call


def auto_rows(model, source_tokens: int, max_new_tokens: int, num_beams: int = 1,
              device: torch.device | str | None = None) -> int:  # fmt: skip
    """Sources per batch under batch_size "auto". On a GPU a decode step is launch-bound: flan-t5-base
    takes 1.9 ms a step at 32 rows and 3.2 ms at 128 (bf16, H200, docs/benchmarks.md), so fewer,
    larger batches decode the same rows in fewer steps. The rows are the largest power of two up to
    AUTO_ROWS_CAP whose engine caches (cross-attention keys/values of `source_tokens` positions,
    self-attention of the cache's new-token bucket, per decoder layer) and per-row working memory
    (the encoder's activations and attention scores, the float32 scores of the vocabulary) take at
    most AUTO_MEMORY_SHARE of the free device memory, counted twice (the engine keeps recorded
    steps with their caches for later batches). On a CPU, where a step's cost grows with its rows,
    AUTO_ROWS_CPU."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type != "cuda":
        return AUTO_ROWS_CPU
    engine.drop_collected()  # the free memory without what the engine kept for collected models
    config = engine._base_model(model).config
    heads, head_dim = engine._decoder_head_shape(config)
    layers = getattr(config, "num_decoder_layers", None) or getattr(config, "decoder_layers", None) or 12
    d_model = getattr(config, "d_model", None) or heads * head_dim
    d_ff = getattr(config, "d_ff", None) or getattr(config, "encoder_ffn_dim", None) or 4 * d_model
    width = getattr(config, "encoder_attention_heads", None) or getattr(config, "num_heads", None) or heads
    size = next(model.parameters()).element_size()
    cache = -(-max_new_tokens // engine.NEW_TOKEN_MULTIPLE) * engine.NEW_TOKEN_MULTIPLE
    decoder = num_beams * layers * 2 * heads * head_dim * (source_tokens + cache) * size
    encoder = source_tokens * (d_ff + 4 * d_model) * size + width * source_tokens * source_tokens * 4
    scores = num_beams * config.vocab_size * 4 * 4
    per_row = 2 * decoder + encoder + scores
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fits = int(AUTO_MEMORY_SHARE * free // max(per_row, 1))
    rows = 1
    while rows * 2 <= min(fits, AUTO_ROWS_CAP):
        rows *= 2
    return rows


@torch.no_grad()
def generate_outputs(
    model,
    tokenizer,
    sources: list[str],
    cfg: GenerationConfig,
    *,
    batch_size: int | str = 32,
    max_source_tokens: int | None = None,
    device: torch.device | str | None = None,
    labels: list[str] | None = None,
    adapter_names: list[str] | None = None,
    adapter_rows=None,
    stop=None,
    on_step=None,
    caps: list[int] | None = None,
    packed_encoder: bool | None = None,
    encoded: list[list[int]] | None = None,
) -> list[Output]:
    """Generate one output per source; the result is in the order of `sources`.

    `batch_size`: sources per batch, or "auto" (`auto_rows` for the longest source).
    With `labels`, decoding can only produce one of those strings (classification tasks).
    `adapter_names` (one per source) picks the LoRA adapter that answers each row, "__base__" for
    the base model: PEFT's mixed-adapter batches, so rows of several adapters share a batch;
    `adapter_rows` (flantune.lora_rows.LoraRows of those adapters) gathers them per row instead, a
    step of fixed shapes that is captured on a GPU (engine.generate).
    `stop` (a function of no arguments) is asked at the engine's stopping checks (every step, every
    8 with CUDA graphs): True ends the generation there (the server stops work nobody waits for).
    `on_step(t, rows, tokens)` is called as each decoding step is issued (flantune.engine.generate):
    `rows` are the indices into `sources` of the batch's rows, `tokens` (len(rows),) their new tokens.
    `caps` (one per source, each at most cfg.max_new_tokens): each source's own cap on new tokens, its
    output cut there (greedy: the output of a run with that cap; the server batches requests of
    other caps together). Not for models whose generation config forces EOS at the cap.
    `packed_encoder` (engine.generate's): None decides from the work, True where the batches of at
    least engine.PACKED_MIN_TOKENS padded source tokens hold engine.PACKED_PAYS_TOKENS in all.
    `encoded`: the sources' token ids where the caller has them (a split's input_ids, cut to
    data.max_source_tokens as the tokenizer cuts them), instead of tokenizing `sources` again.
    """
    sources = list(sources)
    if not sources:
        return []
    if caps is not None and (len(caps) != len(sources) or not all(1 <= c <= cfg.max_new_tokens for c in caps)):
        raise ValueError(f"caps: one per source, each in 1..{cfg.max_new_tokens} (max_new_tokens)")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    if encoded is None:
        encoded = tokenizer(sources, truncation=max_source_tokens is not None, max_length=max_source_tokens)[
            "input_ids"
        ]
    elif len(encoded) != len(sources):
        raise ValueError(f"encoded: one list of token ids per source ({len(sources)}), got {len(encoded)}")
    order = sorted(range(len(sources)), key=lambda i: len(encoded[i]), reverse=True)
    if batch_size == "auto":
        batch_size = auto_rows(model, len(encoded[order[0]]), cfg.max_new_tokens, cfg.num_beams, device)
    outputs: list[Output | None] = [None] * len(sources)
    kwargs = generation_kwargs(cfg)
    if labels:
        config = getattr(model, "config", None)
        trie = LabelTrie(tokenizer, labels, config.decoder_start_token_id)
        kwargs["prefix_allowed_tokens_fn"] = trie.allowed
    ends = {tokenizer.eos_token_id, tokenizer.pad_token_id}
    if packed_encoder is None:  # the padded source tokens of the large batches (sorted: longest first)
        sizes = [len(order[s : s + batch_size]) * len(encoded[order[s]]) for s in range(0, len(order), batch_size)]
        packed_encoder = sum(n for n in sizes if n >= engine.PACKED_MIN_TOKENS) >= engine.PACKED_PAYS_TOKENS
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt").to(device)
        names = None if adapter_names is None else [adapter_names[i] for i in index]
        step = None if on_step is None else (lambda t, tokens, index=index: on_step(t, index, tokens))
        generated = engine.generate(
            model, batch["input_ids"], batch["attention_mask"], adapter_names=names, adapter_rows=adapter_rows,
            stop=stop, on_step=step, packed_encoder=packed_encoder, **kwargs,
        ).sequences  # (B, 1 + T)
        for i, ids in zip(index, generated.tolist(), strict=True):
            ids = ids[1:] if caps is None else ids[1 : 1 + caps[i]]  # the decoder start token, the row's cap
            finished = tokenizer.eos_token_id in ids
            if finished:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            tokens = sum(1 for t in ids if t not in ends)
            outputs[i] = Output(text=decode(tokenizer, ids), tokens=tokens, finished=finished)
    model.train(was_training)
    return outputs


# ---- sampling whose randomness belongs to each row ---------------------------------------------
# transformers' sampling draws from the global RNG, so what a row samples depends on which other
# rows share its batch and process. RL needs every completion to be the same whether its prompt
# was sampled on one process or another (a two-process step must equal the one-process step), so
# each row here draws from its own counter-based stream: Gumbel noise keyed by (seed, row id,
# decoding position, token id), added to the filtered logits, and the argmax taken (the Gumbel-max
# trick: argmax(logits + Gumbel) is an exact sample of softmax(logits)). transformers has no
# per-row random streams, hence our own.

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values below 2**32): every product stays below
    2**63, so it is exact on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seed: int, rows: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys of the random streams of rows with global ids `rows` under `seed`."""
    return _mix32(_mix32(torch.full_like(rows, seed & _MASK32)) ^ (rows & _MASK32))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 uniforms strictly inside (0, 1) from 32-bit hashes (int64 tensors below 2**32): the
    top 23 bits and a half, (k + 0.5) / 2**23, every value exact in float32. (With 24 bits the top
    value, 2**24 - 0.5, rounds to 2**24: a uniform of 1.0, Gumbel noise of +inf, and that token
    chosen whatever its probability, one element in 2**24: a few times a step at 128 x 32,128.)"""
    return ((bits >> 9).float() + 0.5) * 2.0**-23


def keyed_uniforms(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(N, vocab) float32 uniforms inside (0, 1), a pure function of (key, position, token id): integer
    hashing and an exact conversion only, so any device and any compiler give them bit for bit."""
    at = _mix32((keys + position * 0x9E3779B9) & _MASK32)  # (N,)
    tokens = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    bits = _mix32(_mix32(at[:, None] ^ tokens[None, :]) ^ at[:, None])  # (N, V)
    return uniform_from_bits(bits)


# The uniforms compiled by inductor on CUDA, for RL's sampling (`sample_groups`, at every step of a
# long run): eagerly they are ~25 elementwise kernels over (N, V) int64 a step (128 x 32,128: ~33 MB
# read and written by each), compiled one. Only the exact integer part is compiled (the logs of the
# noise stay torch's, whose rounding the CPU/GPU test bounds); dynamic shapes, so the position and
# the rows of a compacted batch recompile nothing. Made at the first use. FLANTUNE_COMPILE_NOISE=0
# keeps them eager (the A/B side of bench/rl_step.py; or where inductor cannot compile).
COMPILE_NOISE = os.environ.get("FLANTUNE_COMPILE_NOISE", "1") != "0"
_COMPILED_UNIFORMS = None


def _compiled_uniforms():
    global _COMPILED_UNIFORMS
    if _COMPILED_UNIFORMS is None:
        _COMPILED_UNIFORMS = torch.compile(keyed_uniforms, dynamic=True)
    return _COMPILED_UNIFORMS


def gumbel_noise(keys: torch.Tensor, position: int, vocab: int, compiled: bool = False) -> torch.Tensor:
    """(N, vocab) float32 standard Gumbel noise, a pure function of (key, position, token id).
    `compiled`: the uniforms through inductor where the keys are on CUDA (the same bits)."""
    fast = compiled and COMPILE_NOISE and keys.is_cuda
    uniforms = (_compiled_uniforms() if fast else keyed_uniforms)(keys, position, vocab)
    return -torch.log(-torch.log(uniforms))  # finite: the uniforms are inside (0, 1)


class KeyedSampling:
    """A transformers logits processor that samples each row from its own stream: temperature, top-k
    and top-p (nucleus) filtering, Gumbel noise by row key, and the argmax made the only token left.

    The engine's sampling (which expands the encoder output for `num_return_sequences`, where greedy
    decoding refuses several sequences) takes that one token: `decides` tells it the draw is made.
    """

    decides = True

    def __init__(self, keys: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 compiled: bool = False):  # fmt: skip
        from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.keys, self.warpers, self.compiled = keys, [], compiled  # compiled: gumbel_noise's
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p))

    def select_rows(self, rows: torch.Tensor) -> KeyedSampling:
        """The same sampling for the batch's rows `rows` (n,) only (the engine's compaction: finished
        rows leave the batch, the others keep their streams)."""
        chosen = KeyedSampling.__new__(KeyedSampling)
        chosen.keys, chosen.warpers = self.keys.to(rows.device).index_select(0, rows), self.warpers
        chosen.compiled = self.compiled
        return chosen

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # input_ids (N, t): the decoder ids so far (start token first); scores (N, V) float.
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = gumbel_noise(self.keys.to(scores.device), input_ids.shape[1], scores.shape[-1], self.compiled)
        choice = (scores.float() + noise).argmax(dim=-1, keepdim=True)  # (N, 1); filtered -inf stays out
        return torch.full_like(scores, float("-inf")).scatter_(1, choice, 0.0)  # probability 1 on the choice


@torch.no_grad()
def sample_groups(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    group_size: int,
    first_row: int,
    seed: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> torch.Tensor:
    """`group_size` sampled completions of each prompt: (B*G, 1 + T) decoder ids, start token first,
    grouped by prompt. The encoder runs once per prompt (the engine expands its output G times).

    Completion j of the prompt numbered p (`first_row` numbers this batch's first prompt) draws from
    the stream of row p * G + j under `seed`: the same completions however prompts are split
    between processes or batches.
    """
    batch = input_ids.shape[0]
    rows = torch.arange(first_row * group_size, (first_row + batch) * group_size, device=input_ids.device)
    # compiled: RL samples at every step of a long run, where the one compilation pays.
    sampling = KeyedSampling(row_keys(seed, rows), temperature=temperature, top_p=top_p, top_k=top_k, compiled=True)
    # The engine samples from the processed scores, where KeyedSampling left one token: the keyed
    # choice, drawn with probability 1. temperature 1, top_k 0, top_p 1: the engine adds no filters.
    return engine.generate(
        model, input_ids, attention_mask, do_sample=True, num_return_sequences=group_size,
        max_new_tokens=max_new_tokens, logits_processor=[sampling],
        packed_encoder=True,  # RL samples at every step of a long run: the one compilation pays
    ).sequences  # fmt: skip
