"""Continuous batching's decode step: a batch of slots whose rows join and leave at any step.

What it is. `Slots(model, capacity, max_new_tokens, max_source_tokens)` holds the decoder state of up
to `capacity` rows, each at its own position: its own self-attention keys/values (one slot of the
static cache per row), its own cross-attention keys/values (projected once from its source's encoder
output when it joins) and its own source mask. `admit` puts new rows into free slots; `step()` runs
the one-token decoder step for every slot at once and returns the next-token logits; `advance`
writes the chosen tokens and moves each live row one position on; `release` frees slots.

Why our own. transformers' caches keep one position for the whole batch (StaticCache's
`cumulative_length`), so a row that joins a running batch would attend at the wrong positions, and
T5's relative bias and BART's learned positions are computed from that one position. Serving needs
rows at different positions in one step (a request's rows join the next step after their encoder
pass; finished rows leave at once), as vLLM schedules decoder-only models and as no library does for
encoder-decoder ones. The step runs the model's own modules (its Linear layers, norms, feed-forward
blocks, embeddings and relative-bias table, so LoRA layers apply as in the model's forward) with
per-row positions: T5's layers through flantune.t5_decode's `layer_step`, the decoding engine's
layer, given each row's position and bias; BART's step is written here (`_bart_step`). Every tensor the step reads or writes is
allocated in __init__, and positions are tensors, so one captured CUDA graph serves any mix of
positions.

Rows of several LoRA adapters: given `adapters` (the PEFT model's adapter names), each slot holds its
row's adapter index and every LoRA layer gathers the rows' A and B by it (flantune.lora_rows), so the
mix of adapters is a tensor too and the step stays capturable. Without `adapters` the model's
modules are called as they are: PEFT's `adapter_names` hooks, set by the caller, route the rows
(eager only: their row indices are Python lists).

Architectures: T5 (FLAN-T5, mT5) and BART. `supports(model)` says whether a model can use it.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import Tensor

from flantune import decode_attention, engine, t5_decode
from flantune.engine import cross_projections, fused_layers
from flantune.graphs import StaticSources
from flantune.graphs import record as _record
from flantune.graphs import warm_up as _warm_up
from flantune.lora_rows import LoraRows

MODEL_TYPES = frozenset({"t5", "mt5", "bart"})
WARMUP_STEPS = 2  # eager calls of the step before its capture (torch's CUDA-graph docs do the same)
SOURCE_MULTIPLE = 64  # a captured join's source length: the sources' rounded up to this (at most the slots')
# Joins captured as CUDA graphs (`Slots.join`), on a GPU. On issue 21's serving load (H200,
# docs/benchmarks.md) a captured join took 5.6 ms against 30 ms eagerly, and the server went from
# 36 to 67 requests/s. FLANTUNE_CAPTURE_JOINS=0 runs joins eagerly for a process (a server under
# bench/serve_load.py inherits it), for comparing both or for ruling the capture out.
CAPTURE_JOINS = os.environ.get("FLANTUNE_CAPTURE_JOINS", "1") != "0"


def _can_capture(device: torch.device) -> bool:
    return device.type == "cuda"


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supports(model) -> bool:
    """BART, and T5 / mT5 models whose decoder layers flantune.t5_decode's step runs (its
    `unsupported` says why not: hooks on the blocks, adapters around the attentions, ...)."""
    model_type = _base_model(model).config.model_type
    return model_type == "bart" or (model_type in MODEL_TYPES and t5_decode.unsupported(model) is None)


def _shape(config) -> tuple[int, int, int]:
    """(decoder layers, heads, head_dim) of the decoder's attention."""
    if config.model_type == "bart":
        heads = config.decoder_attention_heads
        return config.decoder_layers, heads, config.d_model // heads
    return config.num_decoder_layers, config.num_heads, config.d_kv


def cache_bytes(model, capacity: int, max_new_tokens: int, max_source_tokens: int,
                dtype: torch.dtype | None = None) -> int:  # fmt: skip
    """Bytes of the caches `Slots` allocates with these sizes: per decoder layer, keys and values of
    capacity x heads x (max_new_tokens + max_source_tokens) x head_dim (self- and cross-attention).
    Everything else it holds is per row (a few numbers)."""
    base = _base_model(model)
    layers, heads, head_dim = _shape(base.config)
    itemsize = (dtype or base.get_output_embeddings().weight.dtype).itemsize
    return layers * 2 * capacity * heads * (max_new_tokens + max_source_tokens) * head_dim * itemsize


class Slots:
    """The decoder state of `capacity` rows at independent positions (module docstring).

    Shapes: R = capacity, L = max_new_tokens (self-attention slots per row), S = max_source_tokens,
    H heads of dk, d = d_model, V vocabulary. Per decoder layer: keys/values (R, H, L, dk) for
    self-attention and (R, H, S, dk) for cross-attention."""

    def __init__(self, model, capacity: int, max_new_tokens: int, max_source_tokens: int,
                 dtype: torch.dtype | None = None, adapters: list[str] | None = None,
                 graphs: bool | None = None):  # fmt: skip
        if not supports(model):
            model_type = _base_model(model).config.model_type
            why = t5_decode.unsupported(model) if model_type in MODEL_TYPES else None
            raise ValueError(f"{model_type}: continuous batching drives {', '.join(sorted(MODEL_TYPES))} models"
                             + (f" whose decode step flantune runs ({why})" if why else ""))  # fmt: skip
        self.model = model
        base = _base_model(model)
        config = base.config
        weight = base.get_output_embeddings().weight
        dtype, device = dtype or weight.dtype, weight.device
        self.capacity, self.max_new_tokens, self.max_source_tokens = capacity, max_new_tokens, max_source_tokens
        self.bart = config.model_type == "bart"
        layers, self.heads, self.head_dim = _shape(config)
        R, H, L, S, dk = capacity, self.heads, max_new_tokens, max_source_tokens, self.head_dim
        self.keys = [torch.zeros(R, H, L, dk, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(R, H, L, dk, dtype=dtype, device=device) for _ in range(layers)]
        self.cross_keys = [torch.zeros(R, H, S, dk, dtype=dtype, device=device) for _ in range(layers)]
        self.cross_values = [torch.zeros(R, H, S, dk, dtype=dtype, device=device) for _ in range(layers)]
        # A free slot attends to its first source position only (a fully masked row would be NaN).
        self.source_mask = torch.zeros(R, S, dtype=torch.bool, device=device)  # (R, S)
        self.source_mask[:, 0] = True
        self.positions = torch.zeros(R, dtype=torch.long, device=device)  # (R,) the position each row writes
        self.tokens = torch.zeros(R, dtype=torch.long, device=device)  # (R,) the input token of each row
        self.live = torch.zeros(R, dtype=torch.bool, device=device)  # (R,) slots holding a row
        self.slot_range = torch.arange(R, device=device)
        self.key_range = torch.arange(L, device=device)  # BART's causal mask (`_bart_step`)
        if not self.bart:
            # T5's step is flantune.t5_decode's layer (the engine's), each row at its own position:
            # the self-attention bias of every (query, key) position pair once (L, H, L), a row's
            # taken by its position at each step; the stacked projections and the output products
            # into the residual where the engine takes them. The weights are read now (the bias
            # table, the stacked copies): the model must not change while the slots serve it.
            compute = base.get_decoder().embed_tokens.weight.dtype  # the step's dtype (its hidden states)
            self.bias = t5_decode.bias_table(model, L, compute).transpose(0, 1).contiguous()  # (L query, H, L key)
            self.fused = t5_decode.fused_weights(model, compute)
            if self.fused is not None:
                self.fused.refresh(base)
            self.layer_options = t5_decode.layer_options(model, self.fused)  # the slots hold the model anyway
            self.head = t5_decode.weights_of(self.fused.head, base.lm_head) if self.fused is not None else None
            self.output_scale = t5_decode.scale_of(model)
        # Per-row LoRA (its `rows` (R,) is each slot's adapter index, 0 the base), or None.
        self.lora = LoraRows(model, adapters, capacity) if adapters else None
        # Captured steps per row bucket (`run`): on by default on CUDA.
        if graphs and not _can_capture(device):
            raise ValueError(f"graphs=True needs the model on a CUDA device (it is on {device})")
        self.graphs = _can_capture(device) if graphs is None else graphs
        self._captured: dict[int, tuple] = {}  # bucket -> (graph, logits (bucket, V))
        self._joins: dict[tuple[int, int], _Join] = {}  # (row bucket, source bucket) -> captured pass
        self._pool = None

    def _linear(self, module, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """module(x), with each row's LoRA adapter when the slots gather them."""
        return module(x) if self.lora is None else self.lora.linear(module, x, rows)

    # ---- rows joining and leaving --------------------------------------------------------------

    @torch.no_grad()
    def join(self, slots: list[int], input_ids: Tensor, attention_mask: Tensor, start_id: int,
             adapters: list[str | None] | None = None) -> None:  # fmt: skip
        """Rows join in `slots` from their sources (n, s) (token ids and mask, padded): the encoder
        pass (each row under its adapter, for slots made with `adapters`), then `admit`.

        With graphs (and CAPTURE_JOINS, the default), the pass and the cross-attention projections are replayed from
        a CUDA graph captured per (row bucket, source length rounded up to SOURCE_MULTIPLE), at its
        first use.
        Eagerly, flan-t5-base's pass with LoRA is some 4,400 operator calls, host work that took
        33-38 ms a join on an H200 while the GPU waited (docs/benchmarks.md); replayed, the host work is a few copies. Padding rows
        repeat the last real row (the same inputs, so the same values written to the same slot) and
        padding source positions are masked, so the rows' values are the eager pass's up to the
        rounding of products of other shapes. A model whose rows mix through PEFT's adapter names
        (slots made without `adapters` on a PEFT model with several) runs eagerly under the
        caller's hooks."""
        n, s = input_ids.shape
        if s > self.max_source_tokens:
            raise ValueError(f"a source of {s} tokens is over this batch's {self.max_source_tokens}")
        if adapters is not None and self.lora is None:
            raise ValueError("rows name adapters, but these slots were made without `adapters`")
        peft = hasattr(self.model, "get_base_model")
        index = torch.tensor(slots, device=input_ids.device)  # (n,)
        rows = self.lora.indices(adapters or [None] * n, index.device) if self.lora is not None else None  # (n,)
        if not (self.graphs and CAPTURE_JOINS) or (peft and self.lora is None) or self._joins is None:
            encoder = self.model.get_encoder()
            with self.lora.routed(encoder, rows) if rows is not None else contextlib.nullcontext():
                hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)[0]  # (n, s, d)
            self._admit(index, hidden, attention_mask, start_id, rows)
            return
        key = (self.bucket(n), min(-(-s // SOURCE_MULTIPLE) * SOURCE_MULTIPLE, self.max_source_tokens))
        entry = self._joins.get(key)
        if entry is None:
            entry = self._joins[key] = _Join(*key, input_ids.device)
        entry.load(input_ids, attention_mask, index, rows)
        if entry.graph is None:
            if self._pool is None and torch.cuda.is_available():
                self._pool = torch.cuda.graph_pool_handle()
            try:  # recorded with the fused norms and activations (flantune.engine.FUSED_LAYERS)
                with fused_layers(self.model, engine.FUSED_LAYERS):
                    stream = _warm_up(lambda: self._encode(entry), WARMUP_STEPS)
                    entry.graph, _ = _record(lambda: self._encode(entry), stream, self._pool)
            except RuntimeError as e:  # an encoder whose forward cannot be captured: joins run eagerly
                warnings.warn(f"continuous batching: the encoder pass could not be captured ({e}); "
                              "joining requests run it eagerly", stacklevel=2)  # fmt: skip
                self._joins = None
                self.join(slots, input_ids, attention_mask, start_id, adapters)
                return
        entry.graph.replay()
        self._start(index, attention_mask, start_id, rows)

    def _encode(self, entry: _Join) -> Tensor:
        """The captured part of `join`: the encoder over the entry's static inputs and each decoder
        layer's cross-attention keys/values written into the entry's slots. Returns a token tensor
        (record wants an output; nothing reads it)."""
        rows = entry.sources.rows if self.lora is not None else None
        hidden = entry.sources.encode(self.model.get_encoder(), self.lora if rows is not None else None)  # (n', s', d)
        self._write_cross(entry.index, hidden, rows)
        return entry.index

    def _write_cross(self, index: Tensor, encoder_hidden: Tensor, rows: Tensor | None) -> None:
        """Each decoder layer's cross-attention keys/values of encoder_hidden (n, s, d) into slots
        `index` (n,), zeroed past s first (no earlier row's values stay behind); `rows` (n,): each
        row's adapter index, where the slots gather LoRA."""
        n, s = encoder_hidden.shape[:2]
        for i, (project_keys, project_values) in enumerate(cross_projections(self.model)):
            shape = (n, s, self.heads, self.head_dim)
            keys = self._linear(project_keys, encoder_hidden, rows).view(shape).transpose(1, 2)  # (n, H, s, dk)
            values = self._linear(project_values, encoder_hidden, rows).view(shape).transpose(1, 2)
            # index_fill_ takes the 0 as a kernel argument (`[index] = 0` copies a host tensor,
            # which capture refuses)
            self.cross_keys[i].index_fill_(0, index, 0)
            self.cross_values[i].index_fill_(0, index, 0)
            self.cross_keys[i][index, :, :s] = keys.to(self.cross_keys[i].dtype)
            self.cross_values[i][index, :, :s] = values.to(self.cross_values[i].dtype)

    def admit(self, slots: list[int], encoder_hidden: Tensor, encoder_mask: Tensor, start_id: int,
              adapters: list[str | None] | None = None) -> None:  # fmt: skip
        """Rows join in `slots`: their sources' encoder output (n, s, d) and mask (n, s) become their
        cross-attention keys/values; they start at position 0 with the decoder start token.
        adapters: each row's LoRA adapter (None: the base), for slots made with `adapters`."""
        n, s = encoder_mask.shape
        if s > self.max_source_tokens:
            raise ValueError(f"a source of {s} tokens is over this batch's {self.max_source_tokens}")
        if adapters is not None and self.lora is None:
            raise ValueError("rows name adapters, but these slots were made without `adapters`")
        index = torch.tensor(slots, device=self.positions.device)
        rows = self.lora.indices(adapters or [None] * n, index.device) if self.lora is not None else None  # (n,)
        self._admit(index, encoder_hidden, encoder_mask, start_id, rows)

    def _admit(self, index: Tensor, encoder_hidden: Tensor, encoder_mask: Tensor, start_id: int,
               rows: Tensor | None) -> None:  # fmt: skip
        self._write_cross(index, encoder_hidden, rows)
        self._start(index, encoder_mask, start_id, rows)

    def _start(self, index: Tensor, encoder_mask: Tensor, start_id: int, rows: Tensor | None) -> None:
        """Rows `index` (n,) with source mask (n, s) and adapter indices `rows` (n,) (slots that gather
        LoRA): live at position 0 with the decoder start token."""
        if rows is not None:
            self.lora.rows[index] = rows
        s = encoder_mask.shape[1]
        self.source_mask[index] = False
        self.source_mask[index, :s] = encoder_mask.bool()
        self.positions[index] = 0
        self.tokens[index] = start_id
        self.live[index] = True

    def release(self, slots: list[int]) -> None:
        index = torch.tensor(slots, device=self.positions.device)
        self.live[index] = False
        if self.lora is not None:
            self.lora.rows[index] = 0
        self.source_mask[index] = False
        self.source_mask[index, 0] = True
        self.positions[index] = 0

    def advance(self, tokens: Tensor) -> None:
        """The chosen tokens (R,) become the next step's inputs; live rows move one position on."""
        self.tokens.copy_(torch.where(self.live, tokens, self.tokens))
        self.positions.add_(self.live.long())
        # A row at its last slot stays there (its owner ends it; a write past L would be out of range).
        self.positions.clamp_(max=self.max_new_tokens - 1)

    # ---- the step -------------------------------------------------------------------------------

    def bucket(self, rows: int) -> int:
        """The rows a captured step computes for `rows`: the next power of two, at most capacity."""
        return min(self.capacity, 1 << (rows - 1).bit_length())

    def run(self, rows: int) -> Tensor:
        """(rows, V) logits of `step` over the first `rows` slots. With graphs, by replaying the step
        captured for `bucket(rows)` slots (recorded at its first use, kept for the life of the
        slots); the extra slots are free or live ones, and their results are dropped. The logits
        are the graph's output tensor, rewritten by the next replay: read them before the next
        `run`. Without graphs, `step(rows)`.

        Capture is safe mid-stream: the step is a function of the slots' tensors that writes each
        row's key/value at its own position and moves nothing (`advance` does), so the warm-up calls
        and the recording write what the replay then writes again. The model must not change
        between replays (the graph reads its weights' memory), and rows of several adapters must
        come through `adapters` (PEFT's adapter names are Python lists a graph cannot follow)."""
        if not self.graphs:
            return self.step(rows)
        bucket = self.bucket(rows)
        entry = self._captured.get(bucket)
        if entry is None:
            if self._pool is None and torch.cuda.is_available():
                self._pool = torch.cuda.graph_pool_handle()  # one pool for every bucket's graph
            with fused_layers(self.model, engine.FUSED_LAYERS):  # as the engine's captured steps
                stream = _warm_up(lambda: self.step(bucket), WARMUP_STEPS)
                entry = self._captured[bucket] = _record(lambda: self.step(bucket), stream, self._pool)
        graph, logits = entry
        graph.replay()
        return logits[:rows]

    @torch.no_grad()
    def step(self, rows: int | None = None) -> Tensor:
        """(R, V) next-token logits of the first `rows` slots (all by default; free slots give
        garbage, ignored), writing each row's self-attention key/value at its own position. Slots
        past `rows` are not computed: a caller that fills the lowest slots first pays for the rows it
        holds. No host sync, no allocation that depends on the positions: capturable as a CUDA graph
        (per `rows`)."""
        R = rows or self.capacity
        if self.bart:
            return _bart_step(self, R)
        base = _base_model(self.model)
        decoder = base.get_decoder()
        tokens, positions, source_mask = self.tokens[:R], self.positions[:R], self.source_mask[:R]
        with self.lora.routed(base, self.lora.rows[:R]) if self.lora is not None else contextlib.nullcontext():
            hidden = decoder.embed_tokens(tokens[:, None])  # (R, 1, d)
            if hidden.dtype != self.keys[0].dtype:
                raise ValueError(f"these slots hold {self.keys[0].dtype} caches; T5's step runs in the model's "
                                 f"{hidden.dtype}: make them with dtype={hidden.dtype}")  # fmt: skip
            # Each row's bias at its position, contiguous (R, H, 1, L); future slots masked in the table.
            bias = self.bias.index_select(0, positions)[:, :, None, :]
            # The engine's attention kernels where it takes them (CUDA): the source mask as it is.
            kernels = decode_attention.ready(self.keys[0], self.head_dim)
            cross_bias = None
            if not kernels:
                low = torch.finfo(hidden.dtype).min
                cross_bias = torch.zeros(source_mask.shape, dtype=hidden.dtype, device=hidden.device)
                cross_bias = cross_bias.masked_fill(~source_mask, low)[:, None, None, :]  # (R, 1, 1, S)
            for i, (block, options) in enumerate(zip(decoder.block, self.layer_options, strict=True)):
                hidden = t5_decode.layer_step(block, hidden, self.keys[i][:R], self.values[i][:R], self.cross_keys[i][:R],
                                              self.cross_values[i][:R], positions, bias, cross_bias,
                                              slots=self.slot_range[:R], cross_mask=source_mask, kernels=kernels,
                                              **options)  # fmt: skip
            hidden = decoder.final_layer_norm(hidden)
            if self.output_scale is not None:
                hidden = hidden * self.output_scale
            return t5_decode.project(hidden, base.lm_head, self.head)[:, 0]  # (R, V)


def _bart_step(self: Slots, R: int) -> Tensor:
    """BART's decoder step for the first R slots: learned positions per row (offset 2, as BART's
    embedding does), post-norm layers, scaled queries, the logits bias. Same contract as `step`."""
    import torch.nn.functional as F

    base = _base_model(self.model)
    decoder = base.get_decoder()
    H, dk = self.heads, self.head_dim
    tokens, positions, source_mask = self.tokens[:R], self.positions[:R], self.source_mask[:R]
    slot_range = self.slot_range[:R]
    embed = decoder.embed_positions
    hidden = decoder.embed_tokens(tokens[:, None])  # (R, 1, d), scaled inside when the config says so
    hidden = hidden + F.embedding(positions[:, None] + embed.offset, embed.weight).to(hidden.dtype)
    hidden = decoder.layernorm_embedding(hidden)
    dtype = hidden.dtype
    low = torch.finfo(dtype).min
    relative = self.key_range[None, :] - positions[:, None]  # (R, L)
    causal = torch.zeros(relative.shape, dtype=dtype, device=hidden.device).masked_fill(relative > 0, low)
    causal = causal[:, None, None, :]  # (R, 1, 1, L)
    cross_bias = torch.zeros(source_mask.shape, dtype=dtype, device=hidden.device)
    cross_bias = cross_bias.masked_fill(~source_mask, low)[:, None, None, :]  # (R, 1, 1, S)
    for i, layer in enumerate(decoder.layers):
        attention = layer.self_attn
        query = (self._linear(attention.q_proj, hidden) * attention.scaling).view(R, 1, H, dk).transpose(1, 2)
        key = self._linear(attention.k_proj, hidden).view(R, H, dk)
        value = self._linear(attention.v_proj, hidden).view(R, H, dk)
        self.keys[i][slot_range, :, positions] = key.to(self.keys[i].dtype)
        self.values[i][slot_range, :, positions] = value.to(self.values[i].dtype)
        out = _attend(query, self.keys[i][:R], self.values[i][:R], causal)
        hidden = layer.self_attn_layer_norm(hidden + self._linear(attention.out_proj, out))

        attention = layer.encoder_attn
        query = (self._linear(attention.q_proj, hidden) * attention.scaling).view(R, 1, H, dk).transpose(1, 2)
        out = _attend(query, self.cross_keys[i][:R], self.cross_values[i][:R], cross_bias)
        hidden = layer.encoder_attn_layer_norm(hidden + self._linear(attention.out_proj, out))

        feed = self._linear(layer.fc2, layer.activation_fn(self._linear(layer.fc1, hidden)))
        hidden = layer.final_layer_norm(hidden + feed)
    logits = self._linear(base.lm_head, hidden)[:, 0]  # (R, V)
    return logits + base.final_logits_bias.to(logits.dtype)


class _Join:
    """Static inputs of a captured join (`Slots.join`) for up to `rows` sources of up to `source_len`
    tokens: the sources (flantune.graphs.StaticSources: ids, mask, adapter indices), each row's slot
    (rows,); the graph."""

    def __init__(self, rows: int, source_len: int, device):
        self.sources = StaticSources(rows, source_len, device)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph = None

    def load(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor, rows: Tensor | None) -> None:
        """This join's n sources (n, s) in; the padding rows repeat the last real one (the same slot,
        the same values), padding positions are masked."""
        self.sources.load(input_ids, attention_mask, rows)
        n = input_ids.shape[0]
        self.index[:n] = index
        self.index[n:] = index[-1]


def _attend(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
    """Attention of one query per row (R, H, 1, dk), already scaled (T5 does not scale; BART's query
    comes multiplied by 1/sqrt(dk)), over keys/values (R, H, K, dk) with an additive bias
    (R or 1, H or 1, 1, K); (R, 1, H * dk)."""
    scores = torch.matmul(query, keys.to(query.dtype).transpose(2, 3)) + bias  # (R, H, 1, K)
    # The softmax in float32 at least (bf16 probabilities over long rows lose the small ones).
    weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(query.dtype)
    out = torch.matmul(weights, values.to(query.dtype))  # (R, H, 1, dk)
    return out.transpose(1, 2).reshape(query.shape[0], 1, -1)
