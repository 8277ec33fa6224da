"""CUDA graphs: a packed micro-batch's forward and backward captured once and replayed (training),
and the capture of a one-token decode step (`warm_up`, `record`: the decoding engine's and
continuous batching's steps) and of an encoder pass over static sources (`StaticSources`: the
engine's and continuous batching's joins).

Why: at 32 SciQ examples a step, flan-t5-large runs about 60 ms of GPU kernels per step, and
launching them one by one from Python (48 blocks, their LoRA layers, autograd) costs about 100 ms
more: the GPU waits for the CPU. A CUDA graph launches the whole recorded forward and backward at
once (docs/benchmarks.md, "Training speed"). torch.compile's own CUDA graphs
(mode="reduce-overhead") need the whole model in one compiled graph, which takes minutes to compile
for T5-large; here only one T5 block is compiled (the shape every block shares) and the graph is
recorded around the eager loop over blocks.

What capture needs, and how it is met:
- fixed shapes: every micro-batch is packed to one (rows, encoder length, decoder length)
  (`flantune.packing.pack(shape=...)`, `ShapeBatches`);
- no host synchronization: the loss projects every decoder position and masks padding
  (`fast_t5.packed_loss_sum(select_targets=False)`);
- the same memory on every replay: inputs are copied into static tensors; gradients accumulate
  into `.grad` tensors that exist before capture and must never be replaced, so the optimizer's
  `zero_grad(set_to_none=False)` is what clears them between steps;
- autocast without its weight-cast cache, whose copies would outlive the capture.
Dropout stays on: PyTorch's CUDA generator gives every replay fresh random numbers.

Capture fails (cudaErrorStreamCaptureImplicit) while an autograd graph through the same
parameters, built on the default stream, is still alive: its gradient accumulators carry that
stream into the captured backward (seen on an H200 with torch 2.11). Drop such outputs first; the
training loop captures at its first step, before any exists.

One process only: DDP's gradient all-reduce runs in hooks that capture does not record.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor


def _static_copy(value):
    return tuple(t.clone() for t in value) if isinstance(value, tuple) else value.clone()


def _copy_into(static, value) -> None:
    if isinstance(static, tuple):
        for target, source in zip(static, value, strict=True):
            target.copy_(source, non_blocking=True)
    else:
        static.copy_(value, non_blocking=True)


class CapturedStep:
    """`step(batch, scale)`: backward of `loss_fn(batch) * scale` (gradients accumulate into
    `.grad`), returns the loss, each call replaying one CUDA graph recorded at the first call.

    loss_fn(batch) -> scalar tensor: the summed loss of a packed micro-batch (dict of tensors and
    tuples of tensors, all on the GPU). params: the trainable parameters. dtype: the autocast dtype
    (None: no autocast). A batch of another shape than the first is an error: pack to one shape.
    """

    def __init__(
        self, loss_fn: Callable[[dict], Tensor], params: list[torch.nn.Parameter],
        dtype: torch.dtype | None = torch.bfloat16, warmup: int = 2,
    ):  # fmt: skip
        self.loss_fn, self.params, self.dtype, self.warmup = loss_fn, params, dtype, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict = {}
        self.scale: Tensor | None = None
        self.loss: Tensor | None = None
        self.capture_s: float | None = None  # warm-up (compilation included) and recording, seconds

    def _shapes(self, batch: dict) -> dict:
        return {k: tuple(t.shape for t in v) if isinstance(v, tuple) else v.shape for k, v in batch.items()}

    def _run(self) -> Tensor:
        context = (
            torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)
            if self.dtype is not None
            else torch.autocast("cuda", enabled=False)
        )
        with context:
            loss = self.loss_fn(self.static)
        (loss * self.scale).backward()
        return loss.detach()

    def _capture(self, batch: dict, scale: float) -> None:
        import time

        started = time.perf_counter()
        self.static = {k: _static_copy(v) for k, v in batch.items()}
        self.scale = torch.tensor(scale, device=self.params[0].device, dtype=torch.float32)
        # Gradients must exist before capture (the graph adds into them in place) and must hold,
        # after warm-up, what they held before it: the warm-up passes are not training steps.
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        kept = [p.grad.clone() for p in self.params]
        # Warm-up on a side stream, as capture requires: compiled blocks finish compiling here,
        # and lazily created CUDA state (cuBLAS workspaces, autograd streams) exists before capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), capturable_token_rows():
            for _ in range(self.warmup):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), capturable_token_rows():
            self.loss = self._run()
        with torch.no_grad():
            for p, g in zip(self.params, kept, strict=True):
                p.grad.copy_(g)
        self.shapes = self._shapes(batch)
        self.grad_ptrs = [p.grad.data_ptr() for p in self.params]
        torch.cuda.synchronize()  # note: a sync point, once: the capture's time is its own
        self.capture_s = round(time.perf_counter() - started, 3)

    def __call__(self, batch: dict, scale: float) -> Tensor:
        if self.graph is None:
            self._capture(batch, scale)
        elif self._shapes(batch) != self.shapes:
            raise ValueError(
                f"a captured step replays one shape; this micro-batch has {self._shapes(batch)}, "
                f"the captured one {self.shapes}: pack every micro-batch to one shape"
            )
        for key, value in batch.items():
            _copy_into(self.static[key], value)
        self.scale.fill_(scale)
        if [None if p.grad is None else p.grad.data_ptr() for p in self.params] != self.grad_ptrs:
            raise RuntimeError(
                "a parameter's .grad was replaced after capture (the graph adds into the old one): "
                "clear gradients with zero_grad(set_to_none=False) between replays"
            )
        self.graph.replay()
        return self.loss.clone()


# ---- PEFT's added-token rows under capture -------------------------------------------------------------


def _peft_token_layer():
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # a PEFT without trainable tokens has nothing to patch
        return None
    return TrainableTokensLayer


def _merged_token_weights(self, active_adapters) -> Tensor:
    """PEFT's TrainableTokensLayer.get_merged_weights (peft 0.17-0.21), with the token index held on the
    device. PEFT builds it on every forward as torch.tensor(list).to(device): a host-to-device copy,
    which a CUDA graph capture refuses ("Cannot copy between CPU and CUDA tensors during CUDA graph
    capture"). The index is made once per layer, adapter and device, on the layer, where it lives as
    long as the graphs that read it. The deltas stay PEFT's parameters, read at each replay, so an
    optimizer step between replays (RL) is seen."""
    weight = self.base_layer.weight  # (V, d)
    kept = self.__dict__.setdefault("_device_token_index", {})
    for name in active_adapters:
        key = (name, weight.device, tuple(self.token_indices[name]))
        if key not in kept:
            kept[key] = torch.tensor(self.token_indices[name], device=weight.device)
        deltas = self.trainable_tokens_delta[name].to(weight)  # (added, d)
        weight = weight.index_copy(dim=0, index=kept[key], source=deltas)
    return weight


def _embed_scale_once(original):
    """PEFT's BaseTunerLayer._get_embed_scale (`original`), with a scale given as a Python number
    (BART's scaled embeddings) made into a device tensor once per layer rather than at every forward
    (the same host-to-device copy as above); any other scale is PEFT's answer."""

    def embed_scale(self):
        base = self.get_base_layer()
        scale = getattr(base, "embed_scale", None)
        if not isinstance(scale, int | float):
            return original(self)
        kept = self.__dict__.setdefault("_device_embed_scale", {})
        key = (scale, base.weight.device, base.weight.dtype)
        if key not in kept:
            kept[key] = torch.tensor(scale, device=base.weight.device, dtype=base.weight.dtype)
        return kept[key]

    return embed_scale


@contextlib.contextmanager
def capturable_token_rows():
    """Within it, PEFT's trainable-token layers (a method's added tokens) read a device-held index, so
    a step through them can be warmed up and captured; outside it, PEFT's own methods run. Its
    warm-up must run inside it before capture does (the index is made there, outside the capture).
    Nested uses patch once: the outermost puts PEFT's methods back."""
    layer = _peft_token_layer()
    if layer is None or layer.get_merged_weights is _merged_token_weights:
        yield
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    original = layer.get_merged_weights
    original_scale = BaseTunerLayer.__dict__.get("_get_embed_scale")  # peft >= 0.18
    layer.get_merged_weights = _merged_token_weights
    if original_scale is not None:
        BaseTunerLayer._get_embed_scale = _embed_scale_once(original_scale)
    try:
        yield
    finally:
        layer.get_merged_weights = original
        if original_scale is not None:
            BaseTunerLayer._get_embed_scale = original_scale


# ---- capturing a decode step ------------------------------------------------------------------------


def capture_context():
    """Autocast as the caller set it, without its weight-cast cache (whose copies would outlive the
    capture, as above); nothing when autocast is off."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


def warm_up(fn: Callable[[], Tensor], times: int) -> torch.cuda.Stream:
    """`fn()` run `times` times on a side stream, as capture requires: lazily created CUDA state
    (cuBLAS/cuBLASLt handles and workspaces, which are per stream; kernels chosen at first use)
    exists before it is recorded. Returns that stream: capture records on the same one, so that no
    handle is first created mid-capture (torch's make_graphed_callables does the same)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), capture_context(), capturable_token_rows():
        for _ in range(times):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    return side


def record(fn: Callable[[], Tensor], stream, pool=None) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """(graph, output): `fn()` recorded on `stream`, not run; each `graph.replay()` reruns it into
    `output`. pool: a memory pool shared with other graphs that never replay at the same time
    (torch.cuda.graph_pool_handle()), so that several captured shapes share one pool's memory."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream), capture_context(), capturable_token_rows():
        output = fn()
    return graph, output


def embedding_dtype(embed) -> torch.dtype:
    """The dtype of an embedding's weight, also inside PEFT's trainable-tokens wrapper (whose first
    parameter is the wrapped embedding's)."""
    weight = getattr(embed, "weight", None)
    return weight.dtype if isinstance(weight, Tensor) else next(embed.parameters()).dtype


class StaticSources:
    """The static inputs of a captured encoder pass over up to `rows` sources of up to `source_len`
    tokens (the buckets): ids and mask (rows, source_len), and each row's LoRA adapter index (rows,)
    where rows gather their adapters (flantune.lora_rows).

    `load` copies a batch in: padding rows repeat the last real row (an all-masked row would be a
    softmax over nothing) and padding positions are masked, so real rows get the eager pass's values
    up to the rounding of products of other shapes. `encode` runs the encoder on them with the mask
    as the additive 4-D one transformers would build from it: from a 2-D mask its mask functions may
    ask the host whether any position is padding, a sync that capture refuses."""

    def __init__(self, rows: int, source_len: int, device):
        self.ids = torch.zeros(rows, source_len, dtype=torch.long, device=device)  # (R, S')
        self.mask = torch.zeros(rows, source_len, dtype=torch.long, device=device)  # (R, S')
        self.rows = torch.zeros(rows, dtype=torch.long, device=device)  # (R,)

    def load(self, input_ids: Tensor, attention_mask: Tensor, rows: Tensor | None = None) -> None:
        """n sources (n, s) in, and their adapter indices (n,) where given."""
        n, s = input_ids.shape
        self.ids.zero_()
        self.mask.zero_()
        self.ids[:n, :s] = input_ids
        self.mask[:n, :s] = attention_mask
        self.ids[n:] = self.ids[n - 1]
        self.mask[n:] = self.mask[n - 1]
        if rows is not None:
            self.rows[:n] = rows
            self.rows[n:] = rows[-1]

    def encode(self, encoder, routing=None) -> Tensor:
        """(R, S', d): `encoder` (T5Stack, BartEncoder) over the static sources; `routing` (a
        LoraRows): each row under adapter `self.rows[r]`."""
        # The dtype transformers makes its mask in (inputs_embeds'): T5's and BART's encoders both
        # keep `embed_tokens`.
        dtype = embedding_dtype(encoder.embed_tokens)
        mask = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
        mask = mask.masked_fill(self.mask == 0, torch.finfo(dtype).min)[:, None, None, :]  # (R, 1, 1, S')
        with routing.routed(encoder, self.rows) if routing is not None else contextlib.nullcontext():
            return encoder(input_ids=self.ids, attention_mask=mask, return_dict=True)[0]
