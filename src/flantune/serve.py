"""`flantune serve`: one base model and many fine-tuned adapters behind an HTTP API and a playground.

The base and every adapter live in one PEFT model in memory. A single worker thread owns that
model: requests queue up per (adapter, generation options), and the worker runs the oldest queue
next, taking every request of it that arrives within a short wait window (up to a maximum batch) as
one `generate_texts` call. One owner means adapters can never be switched under a running
generation, so interleaved requests for different adapters each get their own adapter's output.

Routes: POST /v1/generate (this server's own API, which the playground uses), POST
/v1/completions (OpenAI's completions API: `model` is the base's or an adapter's name, `prompt` the
source), GET /v1/models (OpenAI's list form with this server's details beside it), GET /metrics
(Prometheus), GET /healthz, the OpenAPI docs at /docs, and the playground page at /.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field

from flantune.config import GenerationConfig
from flantune.decoding import generate_outputs

STATIC = Path(str(resources.files("flantune") / "static"))
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
TOKEN_ENV = "FLANTUNE_SERVE_TOKEN"


class ServeError(ValueError):
    """The server cannot start as asked (a bad adapter, a mismatched base); the message says why."""


@dataclass
class Limits:
    """What one request may ask for; each violation is answered with a 4xx and a message."""

    max_input_tokens: int = 1024
    """Tokens of one input (with EOS); longer inputs are refused, never truncated silently."""
    max_new_tokens: int = 512
    """The largest max_new_tokens a request may ask for."""
    max_inputs: int = 64
    """Inputs in one request."""
    max_body_bytes: int = 1 << 20
    """Size of a request body."""
    timeout_s: float = 60.0
    """Queue wait plus generation time of one request."""
    max_batch: int = 32
    """Inputs the worker generates together (several requests of one adapter share a batch)."""
    batch_wait_ms: float = 10.0
    """How long the first request of a batch waits for others of the same adapter."""
    stream_interval_ms: float = 0.0
    """Continuous batching: a streamed request's tokens are handed to its stream at most this often
    (its first token and its end at once; 0: every decoding step). Streaming costs the HTTP side
    work per handed piece, under the interpreter lock the decoding loop needs too; a longer interval
    sends several tokens a piece (vLLM's --stream-interval does the same, counted in tokens)."""

    def check(self) -> list[str]:
        problems = []
        for key, value in dataclasses.asdict(self).items():
            smallest = 0 if key in ("batch_wait_ms", "stream_interval_ms") else 1e-9
            flag = "--timeout" if key == "timeout_s" else f"--{key.replace('_', '-')}"  # the serve flags
            if not value >= smallest:  # NaN too
                problems.append(
                    f"{flag}: must be {'0 or more' if smallest == 0 else 'positive'}, got {value}"
                )
        return problems


# ---- loading: one base, many adapters ---------------------------------------------------------


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """NAME=PATH pairs from the command line, in order; names are what requests may ask for."""
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ServeError(f"--adapter: expected NAME=PATH, got {spec!r}")
        if not NAME.match(name):
            raise ServeError(
                f"--adapter {spec}: names are 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name in adapters:
            raise ServeError(f"--adapter: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def load_service_model(
    model: str | None,
    adapters: dict[str, str],
    *,
    device: str | None = None,
    dtype: str = "float32",
    other_base: bool = False,
):
    """(model, tokenizer, base path, adapter kinds): the base with every adapter loaded under its name
    (`flantune.final.load_final`, which checks that they share one base and one tokenizer)."""
    from flantune.final import load_final, read_final

    if model and (info := read_final(model)) is not None and info.is_adapter:
        raise ServeError(f"--model: {model} is an adapter folder; give it as --adapter NAME={model}")
    kinds = {}
    for name, path in adapters.items():
        info = read_final(path)
        if info is None or not info.is_adapter:
            raise ServeError(f"--adapter {name}={path}: no adapter_config.json there")
        if info.kind == "bottleneck":
            raise ServeError(
                f"--adapter {name}={path}: bottleneck adapters are layers inserted into the model and cannot "
                "share one base with other adapters; use `flantune generate BASE --adapter PATH` for it, "
                "or serve a LoRA adapter"
            )
        kinds[name] = "lora" if info.method == "qlora" else info.method  # served on an unquantized base
    if len(set(kinds.values())) > 1:
        raise ServeError(
            f"--adapter: adapters of one PEFT type can share a base; got {kinds}. Serve each type separately"
        )
    if not adapters and not model:
        raise ServeError("--model: give the base model (a folder or hub id)")
    what = "--adapter" if adapters else "--model"
    loaded = load_final(
        adapters or model, base=model, dtype=dtype, device=device, what=what, base_what="--model",
        other_base=other_base,
    )  # fmt: skip
    return loaded.model, loaded.tokenizer, loaded.base.path, kinds


def mixable(model) -> bool:
    """Whether rows of different adapters can share a batch: plain LoRA adapters (no DoRA), which
    PEFT runs per row with `adapter_names`. Other kinds are batched per adapter."""
    from peft import LoraConfig, PeftModel

    if not isinstance(model, PeftModel):
        return False
    return all(isinstance(c, LoraConfig) and not c.use_dora for c in model.peft_config.values())


# ---- the worker: one thread owns the model, batches requests of one adapter ---------------------


@dataclass
class Job:
    adapter: str | None
    inputs: list[str]
    cfg: GenerationConfig
    future: Future = field(default_factory=Future)
    queued: float = field(default_factory=time.perf_counter)
    abandoned: threading.Event = field(default_factory=threading.Event)  # the client stopped waiting
    # Streaming requests: called from the worker thread after each decoding step with
    # [(row of this job, token id), ...] (the step's tokens of this job's rows).
    stream: object = None
    logprobs: int | None = None  # per generated token, its log-probability and this many alternatives

    def key(self, mixed: bool, caps: bool = False) -> tuple:
        # Requests share a batch only when the same options serve them and, unless the adapters
        # can mix in one batch, the same adapter. Beam search does not mix: PEFT's per-row adapters
        # gave other beams than each adapter alone (checked with PEFT 0.21). caps: requests of other
        # max_new_tokens share a batch too (decoded to the largest, each cut at its own; not beams,
        # whose hypotheses depend on the cap).
        cfg = self.cfg
        if caps and cfg.num_beams == 1:
            cfg = dataclasses.replace(cfg, max_new_tokens=0)
        return (None if self.mixes(mixed) else self.adapter, *dataclasses.astuple(cfg))

    def mixes(self, mixed: bool) -> bool:
        return mixed and self.cfg.num_beams == 1


class Worker:
    """One thread owns the model and generates batches of queued requests.

    mixed: every adapter is plain LoRA, so one batch may hold rows of several adapters and of the
    base (PEFT's `adapter_names`); otherwise a batch serves one adapter.
    """

    def __init__(self, model, tokenizer, *, max_batch: int, batch_wait_ms: float, mixed: bool = False):
        self.model, self.tokenizer, self.mixed = model, tokenizer, mixed
        # Requests of other max_new_tokens share a batch, unless the model forces EOS at the cap
        # (BART's generation config does: a row's last token then depends on its own cap).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.caps_mix = getattr(base.generation_config, "forced_eos_token_id", None) is None
        self.max_batch, self.wait_s = max_batch, batch_wait_ms / 1000
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="flantune-generate", daemon=True)
        self.batches = 0
        self.running = 0  # inputs of the batch being generated now (the /metrics gauge)
        self._gathered = None  # LoraRows of every adapter for mixed batches (`gathered_rows`), made once

    def queued_inputs(self) -> int:
        with self.cond:
            return sum(len(job.inputs) for job in self.pending)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every queued request, then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join()

    def submit(self, adapter: str | None, inputs: list[str], cfg: GenerationConfig, stream=None,
               logprobs: int | None = None) -> Job:  # fmt: skip
        job = Job(adapter, inputs, cfg, stream=stream, logprobs=logprobs)
        with self.cond:
            if self.stopping:
                raise RuntimeError("the worker is stopping")
            self.pending.append(job)
            self.cond.notify_all()
        return job

    def _take_batch(self) -> list[Job] | None:
        with self.cond:
            while not self.pending:
                if self.stopping:
                    return None
                self.cond.wait()
            first = self.pending[0]
            # The window starts when the oldest request arrived: one that already waited behind
            # another adapter's batch does not wait again.
            deadline = first.queued + self.wait_s
            while True:
                batch, size = [], 0
                for job in self.pending:
                    if job.key(self.mixed, self.caps_mix) == first.key(self.mixed, self.caps_mix) and (
                        not batch or size + len(job.inputs) <= self.max_batch
                    ):
                        batch.append(job)
                        size += len(job.inputs)
                left = deadline - time.perf_counter()
                if size >= self.max_batch or left <= 0 or self.stopping:
                    break
                self.cond.wait(left)
            for job in batch:
                self.pending.remove(job)
        # A request whose client gave up (timeout) while queued is dropped here.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        sources = [text for job in batch for text in job.inputs]
        first_step = []  # when the batch's first decoding step had run

        # Once every request of the batch has timed out, decoding stops at the next step.
        def stop() -> bool:
            return all(job.abandoned.is_set() for job in batch)

        owners = [(job, row) for job in batch for row in range(len(job.inputs))]  # by source index
        streaming = any(job.stream is not None for job in batch)
        # Requests of other caps share the batch (Job.key): it decodes to the largest, each row is
        # cut at its own request's cap (streamed tokens too).
        caps = [job.cfg.max_new_tokens for job, _ in owners]
        cfg = dataclasses.replace(batch[0].cfg, max_new_tokens=max(caps))

        def on_step(t: int, rows: list[int], tokens: torch.Tensor) -> None:
            if t == 0:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()  # once per batch: the first step's kernels have run
                first_step.append(time.perf_counter())
            if streaming:
                ids = tokens.tolist()  # a sync at every step, only while a request streams
                updates: dict[int, tuple[Job, list]] = {}
                for source, token in zip(rows, ids, strict=True):
                    job, row = owners[source]
                    if job.stream is not None and t < caps[source]:
                        updates.setdefault(id(job), (job, []))[1].append((row, token))
                for job, pairs in updates.values():
                    job.stream(pairs)

        self.running = len(sources)
        try:
            if batch[0].mixes(self.mixed):
                names = [job.adapter or "__base__" for job in batch for _ in job.inputs]
                outputs = generate_outputs(self.model, self.tokenizer, sources, cfg, batch_size=self.max_batch,
                                           adapter_names=names, adapter_rows=self.gathered_rows(), stop=stop,
                                           on_step=on_step, caps=caps)  # fmt: skip
            else:
                outputs = self._generate(batch[0].adapter, sources, cfg, stop, on_step, caps)
            texts = [out.text for out in outputs]
            counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        except Exception as e:  # a failed batch answers its requests; the worker lives on
            for job in batch:
                job.future.set_exception(e)
            return
        finally:
            self.running = 0
        self.batches += 1
        models = len({job.adapter for job in batch})
        ended = time.perf_counter()
        generate_ms = (ended - started) * 1000
        first_ms = ((first_step[0] if first_step else ended) - started) * 1000
        at = 0
        for job in batch:
            n = len(job.inputs)
            mine = outputs[at : at + n]
            job.future.set_result({
                "outputs": texts[at : at + n], "output_tokens": counts[at : at + n],
                "generated_tokens": [out.tokens for out in mine], "finished": [out.finished for out in mine],
                "batch": {"requests": len(batch), "inputs": len(sources), "models": models},
                "queue_ms": (started - job.queued) * 1000, "generate_ms": generate_ms, "first_step_ms": first_ms,
            })  # fmt: skip
            at += n

    def gathered_rows(self):
        """The adapters' matrices gathered per row (flantune.lora_rows) for mixed batches: the step
        keeps fixed shapes whatever the mix and is captured on a GPU, where PEFT's adapter names run
        it eagerly, adapter by adapter. None where the adapters cannot be gathered (PEFT's way then).
        Made on the worker thread at the first mixed batch; the served adapters never change."""
        from flantune.engine import row_bucket
        from flantune.lora_rows import LoraRows

        if self._gathered is None:  # False once found unsupported: asked once
            supported = LoraRows.unsupported(self.model) is None
            names = sorted(self.model.peft_config)
            self._gathered = supported and LoraRows(self.model, names, capacity=row_bucket(self.max_batch))
        return self._gathered or None

    def _generate(self, adapter: str | None, sources: list[str], cfg: GenerationConfig, stop, on_step,
                  caps: list[int] | None = None):  # fmt: skip
        from peft import PeftModel

        model = self.model
        options = {"batch_size": self.max_batch, "stop": stop, "on_step": on_step, "caps": caps}
        if not isinstance(model, PeftModel):
            return generate_outputs(model, self.tokenizer, sources, cfg, **options)
        if adapter is None:
            with model.disable_adapter():
                return generate_outputs(model, self.tokenizer, sources, cfg, **options)
        model.set_adapter(adapter)
        return generate_outputs(model, self.tokenizer, sources, cfg, **options)


def _warpers() -> tuple[type, ...]:
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    return TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper


_WARPERS = _warpers()


def warp_rows(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """(n, V) float scores of rows that each have their own sampling options, processed as
    transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (in that order,
    min_tokens_to_keep 1) process each row alone, in one batched computation: temperature (n,)
    (1.0: none), top_k (n,) long (0: none), top_p (n,) (1.0: none). transformers' warpers take one
    setting for the whole batch; continuous batching holds rows of many requests in one step.

    One ascending sort serves both filters: top-k only sets values below the k-th largest to -inf,
    which keeps the sorted order, and top-p then reads the cumulative probabilities of that order."""
    scores = scores / temperature[:, None]
    vocab = scores.shape[-1]
    ascending, order = scores.sort(dim=-1)  # (n, V)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)  # (n,)
    kth = ascending.gather(1, (vocab - k)[:, None])  # (n, 1) the k-th largest (ties kept, as transformers)
    ascending = ascending.masked_fill(ascending < kth, float("-inf"))
    remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)[:, None]  # (n, V)
    remove[:, -1] = False  # the most likely token always stays
    remove = remove | (ascending == float("-inf"))
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


@dataclass
class _Running:
    """A request whose rows are in the continuous batch: their slots, ids so far and state."""

    job: Job
    slots: list[int]
    index: torch.Tensor  # (n,) the slots, on the device
    history: torch.Tensor  # (n, 1 + max_new_tokens) the ids so far on the device, for the processors
    processors: object
    started: float
    first_step: float | None = None
    steps: int = 0
    # Streaming: (row, token) pairs not handed to the stream yet, and when it was last handed some.
    unsent: list[tuple[int, int]] = field(default_factory=list)
    sent_at: float | None = None
    ids: list[list[int]] = field(default_factory=list)
    done: list[bool] = field(default_factory=list)
    # With job.logprobs: per step, the rows' chosen-token log-probabilities (n,) and the top ones
    # (n, k) with their ids, on the device until the request is answered.
    logprobs: list[tuple] = field(default_factory=list)
    # Greedy with no logits processor and no log-probabilities asked: its rows take the step's
    # shared argmax, with no per-request work on the device.
    plain: bool = False
    # Sampling whose only processors are temperature, top-k and top-p (and no log-probabilities
    # asked): (n, 3) [temperature, top_k, top_p] per row; these rows are warped and sampled together
    # (`warp_rows`). None otherwise.
    warp: torch.Tensor | None = None


class ContinuousWorker(Worker):
    """Continuous (iteration-level) batching on `flantune.continuous.Slots`: between two decoding
    steps, queued requests run their encoder pass and their rows join the batch; a finished request's
    rows leave at once, and so do the rows of a request nobody waits for any more (a timed-out or
    disconnected client). Rows of every LoRA adapter and of the base share each step (each slot's
    adapter gathered per row, flantune.lora_rows, in the encoder pass and in the step).
    Requests with beam search or label restriction, or for adapters that cannot mix, run apart in a
    batch of their own (`Worker._run`) between steps. On a GPU the step is captured as a CUDA graph
    per row bucket at its first use and replayed (`Slots.run`).

    Each step costs the same for any number of rows up to the capacity (`max_batch`), so the
    slots' caches are sized once: max_batch rows x the largest max_new_tokens and source a request
    may ask for (Limits)."""

    def __init__(self, model, tokenizer, *, max_batch: int, batch_wait_ms: float, mixed: bool,
                 max_new_tokens: int, max_source_tokens: int, stream_interval_ms: float = 0.0):  # fmt: skip
        super().__init__(model, tokenizer, max_batch=max_batch, batch_wait_ms=batch_wait_ms, mixed=mixed)
        self.stream_interval_s = stream_interval_ms / 1000
        self.max_new_tokens, self.max_source_tokens = max_new_tokens, max_source_tokens
        self.slots = None  # made on the worker thread at its first request (the model's device)
        self.active: list[_Running] = []
        # Observers of the worker's time (Metrics sets them): each encoder pass (seconds, sources)
        # and each decoding step (seconds, rows).
        self.on_encoder_pass = self.on_step = None

    def running_rows(self) -> int:
        return sum(len(run.slots) for run in self.active)

    def fits(self, job: Job) -> bool:
        """Whether the job's rows can decode in the shared batch (else they run apart)."""
        return (job.cfg.num_beams == 1 and len(job.inputs) <= self.max_batch
                and (self.mixed or not self._is_peft()))  # fmt: skip

    def _is_peft(self) -> bool:
        return hasattr(self.model, "get_base_model")

    def _loop(self) -> None:
        from flantune import engine
        from flantune.continuous import Slots

        self.model.eval()
        while True:
            with self.cond:
                while not self.pending and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending and not self.active:
                    return
                free = self.max_batch - sum(len(run.slots) for run in self.active)
                # While a batch decodes, requests wait up to batch_wait_ms for others to share their
                # encoder pass (about the cost of a step, whether it encodes 1 source or 8); an idle
                # batch, or requests enough to fill the free slots, are admitted at once.
                fitting = [job for job in self.pending if self.fits(job)]
                waited = bool(fitting) and time.perf_counter() - fitting[0].queued >= self.wait_s
                if self.active and not self.stopping and not waited and sum(len(job.inputs) for job in fitting) < free:
                    free = 0
                joining, apart = [], []
                for job in list(self.pending):
                    if not self.fits(job):
                        apart.append(job)
                        self.pending.remove(job)
                    elif len(job.inputs) <= free:
                        joining.append(job)
                        self.pending.remove(job)
                        free -= len(job.inputs)
                    else:
                        break  # first come, first served: later requests do not overtake this one
            for job in apart:  # a batch of its own, between two steps
                if job.future.set_running_or_notify_cancel():
                    self._run([job])
            joining = [job for job in joining if job.future.set_running_or_notify_cancel()]
            try:
                if self.slots is None and (joining or self.active):
                    adapters = sorted(self.model.peft_config) if self._is_peft() else None
                    self.slots = Slots(self.model, self.max_batch, self.max_new_tokens, self.max_source_tokens,
                                       adapters=adapters)  # fmt: skip
                if joining:
                    began = time.perf_counter()
                    self._admit(joining, engine)
                    if self.slots.positions.is_cuda:
                        torch.cuda.synchronize()  # the pass's own time (the step would wait for it anyway)
                    if self.on_encoder_pass is not None:
                        self.on_encoder_pass(time.perf_counter() - began, sum(len(job.inputs) for job in joining))
                if self.active:
                    began, rows = time.perf_counter(), self.running_rows()
                    self._step()  # ends with its one sync
                    if self.on_step is not None:
                        self.on_step(time.perf_counter() - began, rows)
            except Exception as e:  # the step failed: answer every request in it; the worker lives on
                for run in self.active:
                    if not run.job.future.done():
                        run.job.future.set_exception(e)
                self.active = []
                self.slots = None

    def _admit(self, jobs: list[Job], engine) -> None:
        """The joining requests' rows into free slots, after one encoder pass for all of them (each
        row under its request's adapter)."""
        used = {slot for run in self.active for slot in run.slots}
        free = iter(i for i in range(self.max_batch) if i not in used)
        device = self.slots.positions.device
        sources = [text for job in jobs for text in job.inputs]
        adapters = [job.adapter for job in jobs for _ in job.inputs]
        batch = self.tokenizer(sources, return_tensors="pt", padding=True).to(device)
        start = engine._base_model(self.model).config.decoder_start_token_id
        slots = [[next(free) for _ in job.inputs] for job in jobs]
        lora = self.slots.lora
        # Each row's adapter in the encoder pass: gathered per row by an index tensor where the slots
        # gather (a few batched products per layer; the pass is then captured on a GPU, Slots.join),
        # else PEFT's adapter names (per layer, a Python loop over the adapters in the batch).
        routing = contextlib.nullcontext() if lora is not None else self._adapter_rows(adapters)
        with torch.no_grad(), routing:  # (PEFT's names route the cross-attention projections too)
            self.slots.join([slot for group in slots for slot in group], batch["input_ids"], batch["attention_mask"],
                            start, adapters=adapters if lora is not None else None)  # fmt: skip
        now = time.perf_counter()
        for job, group in zip(jobs, slots, strict=True):
            cfg = job.cfg
            processors = engine.logits_processors(
                self.model, max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample, temperature=cfg.temperature,
                top_k=cfg.top_k, top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                no_repeat_ngram_size=cfg.no_repeat_ngram_size, device=device,
            )  # fmt: skip
            n = len(job.inputs)
            history = torch.full((n, 1 + cfg.max_new_tokens), self.tokenizer.pad_token_id, device=device)
            history[:, 0] = start
            plain = not cfg.do_sample and len(processors) == 0 and job.logprobs is None
            warp = None
            if cfg.do_sample and job.logprobs is None and all(isinstance(p, _WARPERS) for p in processors):
                settings = [cfg.temperature, cfg.top_k or 0, cfg.top_p]
                warp = torch.tensor([settings] * n, dtype=torch.float32, device=device)  # (n, 3)
            self.active.append(_Running(job, group, torch.tensor(group, device=device), history, processors, now,
                                        ids=[[start] for _ in range(n)], done=[False] * n, plain=plain,
                                        warp=warp))  # fmt: skip

    def _adapter_rows(self, adapters: list[str | None]):
        """PEFT's per-row adapter names for the calls inside ("__base__" for the base)."""
        if not self._is_peft():
            return contextlib.nullcontext()
        return self.model._enable_peft_forward_hooks(adapter_names=[name or "__base__" for name in adapters])

    def _step(self) -> None:
        """One decoding step of every row in the batch, then each request's rows take their tokens."""
        slots = self.slots
        self.running = sum(len(run.slots) for run in self.active)
        shared = {"requests": len(self.active), "inputs": self.running,
                  "models": len({run.job.adapter for run in self.active})}  # fmt: skip
        # Rows take the lowest free slots: the step computes slots 0..highest used only.
        rows = 1 + max(slot for run in self.active for slot in run.slots)
        logits = slots.run(rows).float()  # (rows, V); each slot's adapter is in the slots (admit)
        chosen = torch.zeros(self.max_batch, dtype=torch.long, device=logits.device)  # (R,)
        if any(run.plain for run in self.active):  # one argmax for every plain greedy row at once
            chosen[:rows] = logits.argmax(dim=-1)
        warped = [run for run in self.active if run.warp is not None]
        if warped:  # every plainly sampled row at once, each with its own temperature, top-k, top-p
            index = torch.cat([run.index for run in warped])  # (n,)
            settings = torch.cat([run.warp for run in warped])  # (n, 3)
            scores = warp_rows(logits[index], settings[:, 0], settings[:, 1].long(), settings[:, 2])
            chosen[index] = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
        for run in self.active:  # each other request's own processors and choice, on its rows
            if run.plain or run.warp is not None:
                continue
            index = run.index
            scores = run.processors(run.history[:, : 1 + run.steps], logits[index])  # ids so far (n, 1 + t)
            if run.job.cfg.do_sample:
                chosen[index] = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            else:
                chosen[index] = scores.argmax(dim=-1)
            run.history[:, 1 + run.steps] = chosen[index]  # finished rows' entries are never read back
            if run.job.logprobs is not None:  # the model's own distribution, before any processor
                raw = torch.log_softmax(logits[index], dim=-1)  # (n, V)
                top = raw.topk(max(run.job.logprobs, 1), dim=-1)
                run.logprobs.append((raw.gather(1, chosen[index][:, None])[:, 0], top.values, top.indices))
        values = chosen.tolist()  # the step's one sync
        now = time.perf_counter()
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        finished_runs = []
        for run in self.active:
            run.first_step = run.first_step or now
            run.steps += 1
            pairs = []
            for row, slot in enumerate(run.slots):
                token = values[slot]
                if run.done[row]:
                    token = pad
                else:
                    pairs.append((row, token))
                    run.done[row] = token == eos or run.steps >= run.job.cfg.max_new_tokens
                run.ids[row].append(token)
            ended = all(run.done) or run.job.abandoned.is_set()
            if run.job.stream is not None:
                run.unsent += pairs
                # The first token at once, then at most every stream_interval_s, the rest at the end.
                due = run.sent_at is None or now - run.sent_at >= self.stream_interval_s or ended
                if run.unsent and due:
                    run.job.stream(run.unsent)
                    run.unsent, run.sent_at = [], now
            if ended:
                finished_runs.append(run)
        slots.advance(chosen)
        for run in finished_runs:
            self.active.remove(run)
            slots.release(run.slots)
        # The gauge first: a client that reads /metrics right after its answer sees its rows gone.
        self.running = sum(len(run.slots) for run in self.active)
        for run in finished_runs:
            if not run.job.abandoned.is_set():
                self._answer(run, shared)

    def _logprobs(self, run: _Running) -> list[dict]:
        """Per row, OpenAI's completion logprobs: each generated token (EOS included, as the model
        chose it) with its log-probability and the `job.logprobs` most likely tokens at that step."""
        chosen = torch.stack([step[0] for step in run.logprobs], dim=1).tolist()  # (n, T)
        top_values = torch.stack([step[1] for step in run.logprobs], dim=1).tolist()  # (n, T, k)
        top_ids = torch.stack([step[2] for step in run.logprobs], dim=1).tolist()
        eos, k = self.tokenizer.eos_token_id, run.job.logprobs
        rows = []
        for row, ids in enumerate(run.ids):
            generated = ids[1:]
            length = generated.index(eos) + 1 if eos in generated else len(generated)
            tokens = [self.tokenizer.decode([t]) for t in generated[:length]]
            offsets, at = [], 0
            for piece in tokens:
                offsets.append(at)
                at += len(piece)
            top = [
                {self.tokenizer.decode([t]): v for t, v in zip(top_ids[row][i][:k], top_values[row][i][:k], strict=True)}
                for i in range(length)
            ] if k else None  # fmt: skip
            rows.append({"tokens": tokens, "token_logprobs": chosen[row][:length], "top_logprobs": top,
                         "text_offset": offsets})  # fmt: skip
        return rows

    def _answer(self, run: _Running, shared: dict) -> None:
        from flantune.decoding import decode

        eos = self.tokenizer.eos_token_id
        texts, generated, finished = [], [], []
        for ids in run.ids:
            ids = ids[1:]
            ended = eos in ids
            if ended:
                ids = ids[: ids.index(eos)]
            texts.append(decode(self.tokenizer, ids))
            generated.append(sum(1 for t in ids if t not in (eos, self.tokenizer.pad_token_id)))
            finished.append(ended)
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        ended_at = time.perf_counter()
        extra = {"logprobs": self._logprobs(run)} if run.job.logprobs is not None else {}
        run.job.future.set_result({
            **extra,
            "outputs": texts, "output_tokens": counts, "generated_tokens": generated, "finished": finished,
            "batch": shared,  # the last step it shared
            "queue_ms": (run.started - run.job.queued) * 1000, "generate_ms": (ended_at - run.started) * 1000,
            "first_step_ms": ((run.first_step or ended_at) - run.started) * 1000,
        })  # fmt: skip


# ---- the HTTP API ----------------------------------------------------------------------------


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter: str | None = Field(
        None, description="An adapter name from GET /v1/models; null: the base model."
    )
    inputs: list[str] = Field(..., min_length=1, description="Input texts; one output each, in order.")
    max_new_tokens: int = Field(128, ge=1, description="Output cap in tokens.")
    num_beams: int = Field(1, ge=1, le=16)
    early_stopping: bool = False
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)


class Timing(BaseModel):
    queue_ms: float = Field(description="Waiting for the worker (other batches, the batching window).")
    generate_ms: float = Field(description="Generation of the batch this request ran in.")
    total_ms: float = Field(description="From the request's arrival to its answer.")


class Batch(BaseModel):
    requests: int
    inputs: int
    models: int = Field(description="Distinct models (adapters, or the base) the batch served.")


class GenerateResponse(BaseModel):
    adapter: str | None
    outputs: list[str]
    input_tokens: list[int]
    output_tokens: list[int]
    batch: Batch = Field(description="The batch this request was generated in (requests batched together).")
    timing: Timing


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="A last chunk, with no choices, that holds `usage`.")


class CompletionRequest(BaseModel):
    """OpenAI's completions request, as far as this server serves it: `prompt` is the source text.

    Fields OpenAI has and this server does not serve (suffix, echo, best_of, logit_bias, penalties,
    seed, ...) are refused with a 422 that names them, never ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(description="The base model's name or an adapter's, as GET /v1/models lists them.")
    prompt: str | list[str] = Field(description="The source text, or a list of them.")
    max_tokens: int = Field(16, ge=1, description="Output cap in tokens (OpenAI's default, 16).")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy decoding; otherwise sampling.")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="Completions per prompt (sampling only).")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first.")
    stream: bool = Field(False, description="Server-sent events: the text as it is generated, then [DONE].")
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5, description="Per token, its log-probability and this many alternatives.")
    user: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict | None = None
    finish_reason: str = Field(description="stop: the model ended it or a stop string; length: max_tokens.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class Metrics:
    """The Prometheus metrics of one server (its own registry, so that several apps in one process
    never share counters), exported at GET /metrics."""

    def __init__(self, worker: Worker):
        self.registry = CollectorRegistry()
        self.requests = Counter("flantune_requests", "Requests answered, by route, model and HTTP status.",
                                ["route", "model", "status"], registry=self.registry)  # fmt: skip
        self.tokens = Counter("flantune_generated_tokens", "Output tokens generated (EOS not counted), by model.",
                              ["model"], registry=self.registry)  # fmt: skip
        Gauge("flantune_queue_inputs", "Inputs waiting for the worker.",
              registry=self.registry).set_function(worker.queued_inputs)  # fmt: skip
        Gauge("flantune_running_batch_inputs", "Inputs of the batch being generated now.",
              registry=self.registry).set_function(lambda: worker.running)  # fmt: skip
        latency = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.first_token = Histogram("flantune_time_to_first_token_seconds",
                                     "From a request's arrival to its batch's first decoding step.",
                                     buckets=latency, registry=self.registry)  # fmt: skip
        self.per_token = Histogram("flantune_time_per_output_token_seconds",
                                   "Decoding time of a request's batch after the first step, per step it ran.",
                                   buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1),
                                   registry=self.registry)  # fmt: skip

        if isinstance(worker, ContinuousWorker):  # where the worker's time goes, pass by pass
            seconds, counts = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1), tuple(2**i for i in range(9))

            def histogram(name: str, text: str, buckets: tuple) -> Histogram:
                return Histogram(name, text, buckets=buckets, registry=self.registry)

            self.encoder_pass = histogram("flantune_encoder_pass_seconds",
                                          "Encoder passes of requests joining the continuous batch.", seconds)  # fmt: skip
            self.encoder_inputs = histogram("flantune_encoder_pass_inputs", "Sources per encoder pass.", counts)
            self.step = histogram("flantune_decode_step_seconds",
                                  "Continuous batching's decoding steps (every row's token).", seconds)  # fmt: skip
            self.step_rows = histogram("flantune_decode_step_rows", "Rows per decoding step.", counts)

            def on_encoder_pass(seconds: float, inputs: int) -> None:
                self.encoder_pass.observe(seconds)
                self.encoder_inputs.observe(inputs)

            def on_step(seconds: float, rows: int) -> None:
                self.step.observe(seconds)
                self.step_rows.observe(rows)

            worker.on_encoder_pass, worker.on_step = on_encoder_pass, on_step

    def observe(self, result: dict, model: str) -> None:
        """A request's timings and tokens, from the worker's result for it."""
        self.first_token.observe((result["queue_ms"] + result["first_step_ms"]) / 1000)
        steps = max(result["generated_tokens"], default=0)
        if steps > 1:
            self.per_token.observe((result["generate_ms"] - result["first_step_ms"]) / 1000 / (steps - 1))
        self.tokens.labels(model).inc(sum(result["generated_tokens"]))


class Service:
    """What the routes share: the worker, the names it serves, the limits and a tokenizer for counting."""

    def __init__(self, model, tokenizer, *, base: str, kinds: dict[str, str], limits: Limits,
                 mixed: bool | None = None, continuous: bool | None = None):  # fmt: skip
        """continuous: iteration-level batching (ContinuousWorker); None: wherever the model allows
        it (flantune.continuous drives it, and its adapters, if any, can mix in one batch)."""
        from flantune import continuous as rows
        from flantune.lora_rows import LoraRows

        mixed = mixable(model) if mixed is None else mixed
        if continuous is None:
            # Adapters' rows share the continuous step gathered per row (flantune.lora_rows); models
            # whose adapters cannot be gathered batch in waves, where PEFT's adapter names mix them.
            peft = hasattr(model, "get_base_model")
            continuous = rows.supports(model) and (not peft or (mixed and LoraRows.unsupported(model) is None))
        options = {"max_batch": limits.max_batch, "batch_wait_ms": limits.batch_wait_ms, "mixed": mixed}
        if continuous:
            self.worker = ContinuousWorker(model, tokenizer, **options, max_new_tokens=limits.max_new_tokens,
                                           max_source_tokens=limits.max_input_tokens,
                                           stream_interval_ms=limits.stream_interval_ms)  # fmt: skip
            cache = rows.cache_bytes(model, limits.max_batch, limits.max_new_tokens, limits.max_input_tokens)
            # What the continuous batch reserves at its first request, said at start (and in
            # /v1/models) so that a too large --max-batch / --max-new-tokens / --max-input-tokens is
            # seen before requests come.
            self.batching = {
                "mode": "continuous", "cache_gib": round(cache / 2**30, 3),
                "line": f"continuous batching: {limits.max_batch} rows x ({limits.max_input_tokens} source + "
                        f"{limits.max_new_tokens} new tokens) of decoder cache, {cache / 2**30:.2f} GiB "
                        f"({str(next(model.parameters()).dtype).removeprefix('torch.')}), allocated at the first request",
            }  # fmt: skip
        else:
            self.worker = Worker(model, tokenizer, **options)
            self.batching = {"mode": "waves", "cache_gib": None,
                             "line": "batching in waves: a batch forms, decodes to its end, then the next"}  # fmt: skip
        # The worker thread uses the tokenizer while requests are counted on the event loop; a Rust
        # tokenizer used from two threads at once can fail ("Already borrowed"), so each has its own.
        self.counter = copy.deepcopy(tokenizer)
        self.base, self.kinds, self.limits = base, kinds, limits
        self.device = str(next(model.parameters()).device)
        self.draining = False
        self.started = time.time()
        self.metrics = Metrics(self.worker)


def create_app(service: Service, token: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.worker.start()
        yield
        # uvicorn runs this after the requests in flight have been answered; anything still queued
        # is generated before the worker ends.
        service.draining = True
        await asyncio.to_thread(service.worker.stop)

    app = FastAPI(
        title="flantune serve",
        summary="One base model and its fine-tuned adapters: batched text-to-text generation.",
        version="1",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_middleware(Guard, service=service, token=token)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        """Liveness without auth; 503 while shutting down so a balancer stops sending traffic."""
        if service.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    def models() -> dict:
        """The base model and the adapters requests may name: OpenAI's list form (`data`, each `id` a
        name that /v1/completions takes as `model`), with this server's own details beside it."""
        created = int(service.started)
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "flantune", "root": service.base,
             "parent": None if name == service.base else service.base}
            for name in (service.base, *service.kinds)
        ]  # fmt: skip
        return {
            "object": "list",
            "data": data,
            "base": {"name": service.base, "device": service.device},
            "adapters": [{"name": name, "kind": kind} for name, kind in service.kinds.items()],
            "limits": dataclasses.asdict(service.limits),
            "batching": service.batching,
        }

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        """Prometheus text format: requests by route, model and status; queue and running batch;
        tokens generated; time to first token and per output token."""
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @contextmanager
    def counted(route: str, model: str):
        """Counts the request under its HTTP status once it is answered."""
        status = 500
        try:
            yield
            status = 200
        except HTTPException as e:
            status = e.status_code
            raise
        finally:
            service.metrics.requests.labels(route, model, str(status)).inc()

    async def run_job(adapter: str | None, inputs: list[str], cfg: GenerationConfig, logprobs: int | None = None) -> dict:
        """The worker's result for these inputs, or the HTTP error that answers the request."""
        try:
            job = service.worker.submit(adapter, inputs, cfg, logprobs=logprobs)
        except RuntimeError:
            raise HTTPException(503, "the server is shutting down") from None
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), service.limits.timeout_s)
        except TimeoutError:
            # Still queued: never generated. Running: its batch stops decoding once no request of
            # it is waited for.
            job.abandoned.set()
            job.future.cancel()
            raise HTTPException(
                504, f"generation did not finish within the {service.limits.timeout_s:g} s limit"
            ) from None
        except torch.cuda.OutOfMemoryError:
            raise HTTPException(
                503, "out of GPU memory for this batch: retry with fewer inputs or a smaller max_new_tokens"
            ) from None
        except Exception as e:  # the model failed: say so, the server lives on
            raise HTTPException(500, f"generation failed: {type(e).__name__}: {e}") from None
        service.metrics.observe(result, adapter or service.base)
        return result

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(request: GenerateRequest) -> GenerateResponse:
        """Generate one output per input with the base (adapter null) or a named adapter."""
        arrived = time.perf_counter()
        known = request.adapter is None or request.adapter in service.kinds
        with counted("/v1/generate", (request.adapter or service.base) if known else "unknown"):
            check_adapter(request.adapter, service)
            cfg = generation_config(request, service.limits)
            input_tokens = count_inputs(request, service)
            result = await run_job(request.adapter, request.inputs, cfg)
        total_ms = (time.perf_counter() - arrived) * 1000
        return GenerateResponse(
            adapter=request.adapter, outputs=result["outputs"], input_tokens=input_tokens,
            output_tokens=result["output_tokens"], batch=Batch(**result["batch"]),
            timing=Timing(queue_ms=result["queue_ms"], generate_ms=result["generate_ms"], total_ms=total_ms),
        )  # fmt: skip

    @app.post("/v1/completions", response_model=CompletionResponse)
    async def completions(request: CompletionRequest) -> CompletionResponse:
        """OpenAI's completions API: `model` names the base or an adapter, `prompt` is the source text;
        `n` completions per prompt, cut before the first `stop` string."""
        known = request.model == service.base or request.model in service.kinds
        with counted("/v1/completions", request.model if known else "unknown"):
            adapter = completion_adapter(request.model, service)
            prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
            stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
            problems = completion_problems(request, prompts, stops, service.limits)
            if problems:
                raise HTTPException(422, "; ".join(problems))
            # n samples of a prompt are n rows of it, each sampled on its own.
            inputs = [p for p in prompts for _ in range(request.n)]
            as_generate = GenerateRequest(
                adapter=adapter, inputs=inputs, max_new_tokens=request.max_tokens, do_sample=request.temperature > 0,
                temperature=request.temperature or 1.0, top_p=request.top_p, top_k=0,
            )  # fmt: skip
            cfg = generation_config(as_generate, service.limits)
            prompt_tokens = count_inputs(as_generate.model_copy(update={"inputs": prompts}), service)
            if request.logprobs is not None:
                worker = service.worker
                if request.stream:
                    raise HTTPException(422, "logprobs: served without stream only; send stream=false")
                if not (isinstance(worker, ContinuousWorker) and worker.fits(Job(adapter, inputs, cfg))):
                    raise HTTPException(422, "logprobs: served for requests in the continuous batch only (this one "
                                             "would decode apart: --no-continuous, or more inputs than --max-batch)")  # fmt: skip
            if request.stream:
                return StreamingResponse(
                    stream_completion(service, request, adapter, inputs, cfg, stops, sum(prompt_tokens)),
                    media_type="text/event-stream",
                )
            result = await run_job(adapter, inputs, cfg, request.logprobs)
        choices = []
        for i, (whole, finished) in enumerate(zip(result["outputs"], result["finished"], strict=True)):
            text, reason = cut_at_stop(whole, stops, finished)
            logprobs = None
            if request.logprobs is not None:
                logprobs = result["logprobs"][i]
                if len(text) < len(whole):  # cut at a stop string: the tokens before it
                    keep = sum(1 for at in logprobs["text_offset"] if at < len(text))
                    logprobs = {key: None if value is None else value[:keep] for key, value in logprobs.items()}
            choices.append(CompletionChoice(index=i, text=text, finish_reason=reason, logprobs=logprobs))
        completion_tokens = sum(result["generated_tokens"])
        return CompletionResponse(
            id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model, choices=choices,
            usage=Usage(prompt_tokens=sum(prompt_tokens), completion_tokens=completion_tokens,
                        total_tokens=sum(prompt_tokens) + completion_tokens),
        )  # fmt: skip

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return app


def error_body(status: int, detail) -> dict:
    """An error answer both kinds of client read: FastAPI's `detail` and OpenAI's `error` object
    (whose `message` the openai client shows)."""
    message = detail if isinstance(detail, str) else "; ".join(
        f"{'.'.join(str(x) for x in d.get('loc') or ())}: {d.get('msg')}" for d in detail
    )  # fmt: skip
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"detail": detail, "error": {"message": message, "type": kind, "param": None, "code": status}}


async def http_error(request, error: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(error.status_code, error.detail), status_code=error.status_code,
                        headers=getattr(error, "headers", None))  # fmt: skip


async def validation_error(request, error: RequestValidationError) -> JSONResponse:
    """422 with where and what, without echoing the input: it may hold NaN or Infinity, which JSON
    cannot carry back (FastAPI's own handler would fail on it with a 500). A field this server does
    not serve (an OpenAI option it does not implement) is named as such."""
    detail = []
    for e in error.errors():
        msg = e.get("msg")
        if e.get("type") == "extra_forbidden":
            msg = "not served by this server (remove it)"
        detail.append({"loc": e.get("loc"), "msg": msg, "type": e.get("type")})
    return JSONResponse(error_body(422, jsonable_encoder(detail)), status_code=422)


def generation_config(request: GenerateRequest, limits: Limits) -> GenerationConfig:
    """The request's generation options, refused (422) when invalid or over the limits."""
    if request.max_new_tokens > limits.max_new_tokens:
        raise HTTPException(
            422,
            f"max_new_tokens: {request.max_new_tokens} is over this server's limit of {limits.max_new_tokens}",
        )
    if len(request.inputs) > limits.max_inputs:
        raise HTTPException(
            422,
            f"inputs: {len(request.inputs)} inputs, this server takes at most {limits.max_inputs} per request",
        )
    options = request.model_dump(exclude={"adapter", "inputs"})
    cfg = GenerationConfig(**options)
    problems = cfg.check("request")
    if problems:
        raise HTTPException(422, "; ".join(problems))
    return cfg


def check_adapter(name: str | None, service: Service) -> None:
    """Only names from the server's own list: a request can never make the server load a path."""
    if name is not None and name not in service.kinds:
        names = ", ".join(service.kinds) or "none"
        raise HTTPException(
            404, f"adapter {name!r} is not served here (adapters: {names}; null for the base)"
        )


def cut_at_stop(text: str, stops: list[str], finished: bool) -> tuple[str, str]:
    """(text before the first stop string, finish_reason): stop for a stop string or the model's EOS,
    length for the max_tokens cap."""
    cut = min((at for at in (text.find(s) for s in stops) if at >= 0), default=-1)
    if cut >= 0:
        return text[:cut], "stop"
    return text, "stop" if finished else "length"


class Detokenizer:
    """A streamed row's text as its tokens come, each token decoded once in a window of a few (vLLM's
    and TGI's incremental detokenization): decoding the whole row again at every step costs the
    event loop, which shares the interpreter with the decoding loop, time that grows with the row.
    `text()` equals `decoding.decode` of the tokens so far, except that a character whose bytes
    are not all there yet waits for the next token: the raw pieces are decoded without the
    tokenizer's clean-up of spaces, which is applied to the joined text (it looks at a few
    characters around a space), and the text is stripped as `decode` strips it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.drop = {tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id}
        self.ids: list[int] = []
        self.raw = ""
        self.prefix = self.read = 0  # ids[prefix:read]: the window already decoded into raw

    def add(self, token: int) -> None:
        if token not in self.drop:
            self.ids.append(token)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def text(self) -> str:
        if self.read < len(self.ids):
            # The window's first token decodes the same in both (a leading space dropped or not), so
            # the difference is what the new tokens add.
            before, after = self._decode(self.ids[self.prefix : self.read]), self._decode(self.ids[self.prefix :])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                self.raw += after[len(before) :]
                self.prefix, self.read = self.read, len(self.ids)
        clean = self.tokenizer.clean_up_tokenization_spaces
        return (self.tokenizer.clean_up_tokenization(self.raw) if clean else self.raw).strip()


class _Inbox:
    """One stream's deliveries from the worker thread: each handed piece's (row, token) pairs, then
    None when the job is done. The stream takes everything delivered since its last round at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []
        self.ready = asyncio.Event()

    def post(self, item) -> None:
        """From any thread: `item` delivered on the stream's loop."""
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody reads it any more
            self.loop.call_soon_threadsafe(self._deliver, item)

    def _deliver(self, item) -> None:
        self.items.append(item)
        self.ready.set()

    async def take(self, timeout: float) -> list:
        """Everything delivered since the last take (waiting up to `timeout` s for something)."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        self.ready.clear()
        items, self.items = self.items, []
        return items


async def stream_completion(service: Service, request: CompletionRequest, adapter: str | None,
                            inputs: list[str], cfg: GenerationConfig, stops: list[str], prompt_tokens: int):  # fmt: skip
    """Server-sent events for a streaming completion, as OpenAI sends them: a `text_completion`
    chunk per piece of text as the worker decodes it, each choice's last chunk with its
    finish_reason, then `data: [DONE]`.

    Text is sent once it is stable: the tokens so far are decoded whole and the new suffix sent,
    holding back what could still be the start of a stop string or an incomplete character. The
    last chunk of each choice comes from the worker's final text, so the streamed pieces add up to
    exactly what the same request without streaming answers. A client that disconnects marks its
    request abandoned: its batch stops decoding once no request of it is waited for."""
    inbox = _Inbox(asyncio.get_running_loop())
    try:
        job = service.worker.submit(adapter, inputs, cfg, stream=inbox.post)
    except RuntimeError:
        yield _event({"error": {"message": "the server is shutting down", "type": "server_error", "code": 503}})
        return
    job.future.add_done_callback(lambda _: inbox.post(None))
    tokenizer = service.counter
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    hold = max((len(s) for s in stops), default=1) - 1
    texts = [Detokenizer(tokenizer) for _ in inputs]
    sent, stopped = [""] * len(inputs), [False] * len(inputs)

    def chunk(index: int, text: str, reason: str | None = None) -> str:
        return _event({"id": ident, "object": "text_completion", "created": created, "model": request.model,
                       "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]})  # fmt: skip

    deadline = job.queued + service.limits.timeout_s
    try:
        while True:
            try:
                # Every step's tokens delivered since the last round at once (a loop that fell
                # behind decodes each row once for several steps); None: the worker is done.
                delivered = await inbox.take(max(deadline - time.perf_counter(), 0))
            except TimeoutError:
                job.abandoned.set()
                job.future.cancel()
                message = f"generation did not finish within the {service.limits.timeout_s:g} s limit"
                yield _event({"error": {"message": message, "type": "server_error", "code": 504}})
                break
            done = None in delivered  # (after the request's last step: the future resolves then)
            pairs = [pair for step in delivered if step is not None for pair in step]
            touched = []
            for row, token in pairs:
                if stopped[row]:
                    continue
                texts[row].add(token)  # (EOS, pad and BOS add nothing)
                if row not in touched:
                    touched.append(row)
            for row in touched:
                text, reason = cut_at_stop(texts[row].text(), stops, False)
                stopped[row] = reason == "stop"
                stable = text if stopped[row] else text[: max(len(text) - hold, 0)]
                stable = stable.rstrip("\ufffd")  # a character whose bytes are not all decoded yet
                if len(stable) > len(sent[row]) and stable.startswith(sent[row]):
                    yield chunk(row, stable[len(sent[row]) :])
                    sent[row] = stable
            if done:  # the worker is done with the request
                if job.future.cancelled() or job.future.exception() is not None:
                    error = "cancelled" if job.future.cancelled() else job.future.exception()
                    message = f"generation failed: {type(error).__name__}: {error}"
                    yield _event({"error": {"message": message, "type": "server_error", "code": 500}})
                    break
                result = job.future.result()
                service.metrics.observe(result, adapter or service.base)
                for row, (text, finished) in enumerate(zip(result["outputs"], result["finished"], strict=True)):
                    text, reason = cut_at_stop(text, stops, finished)
                    rest = text[len(sent[row]) :] if text.startswith(sent[row]) else ""
                    yield chunk(row, rest, reason)
                if request.stream_options is not None and request.stream_options.include_usage:
                    completion_tokens = sum(result["generated_tokens"])
                    yield _event({"id": ident, "object": "text_completion", "created": created, "model": request.model,
                                  "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                  "completion_tokens": completion_tokens,
                                  "total_tokens": prompt_tokens + completion_tokens}})  # fmt: skip
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.future.done():
            job.abandoned.set()  # the client went away (or the stream failed): nobody waits any more


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def completion_adapter(model: str, service: Service) -> str | None:
    """The adapter a completion's `model` names (None: the base), or 404 naming what is served."""
    if model == service.base:
        return None
    if model in service.kinds:
        return model
    names = ", ".join([service.base, *service.kinds])
    raise HTTPException(404, f"model {model!r} is not served here (models: {names}; GET /v1/models lists them)")


def completion_problems(request: CompletionRequest, prompts: list[str], stops: list[str], limits: Limits) -> list[str]:
    problems = []
    if not prompts:
        problems.append("prompt: give a text or a non-empty list of texts")
    if len(stops) > 4 or any(not s for s in stops):
        problems.append("stop: up to 4 non-empty strings")
    if request.n > 1 and request.temperature == 0:
        problems.append("n: several completions of a prompt need temperature > 0 (greedy ones are identical)")
    if len(prompts) * request.n > limits.max_inputs:
        problems.append(f"prompt x n: {len(prompts)} x {request.n} completions, this server makes at most "
                        f"{limits.max_inputs} per request")  # fmt: skip
    return problems


def count_inputs(request: GenerateRequest, service: Service) -> list[int]:
    """Tokens of each input (with EOS), refused (422) over the limit rather than truncated."""
    for i, text in enumerate(request.inputs):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (\ud800) that JSON allows but a tokenizer does not
            raise HTTPException(422, f"inputs[{i}]: not valid Unicode text ({e.reason})") from None
    counts = [len(ids) for ids in service.counter(request.inputs)["input_ids"]]
    for i, n in enumerate(counts):
        if n > service.limits.max_input_tokens:
            raise HTTPException(
                422, f"inputs[{i}]: {n} tokens, over this server's limit of {service.limits.max_input_tokens}"
            )
    return counts


class Guard:
    """Checks every request before any route: shutting down (503), auth (401), body size (413).

    An ASGI middleware rather than a route dependency so that it also covers /docs, /openapi.json and
    the static files.
    """

    def __init__(self, app, *, service: Service, token: str | None):
        self.app, self.service = app, service
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        if self.service.draining and path != "/healthz":
            return await _answer(scope, receive, send, 503, "the server is shutting down")
        if self.token and path != "/healthz" and not self._authorized(headers.get(b"authorization", b"")):
            # Basic lets a browser open the playground: it asks for the token as the password. One
            # challenge per header line, since browsers read only the first of a list.
            challenges = ['Bearer realm="flantune"', 'Basic realm="flantune", charset="UTF-8"']
            detail = "missing or wrong token: send 'Authorization: Bearer TOKEN'"
            return await _answer(scope, receive, send, 401, detail, challenges)
        limit = self.service.limits.max_body_bytes
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _answer(scope, receive, send, 413, f"request body over the {limit}-byte limit")
        received = 0

        async def limited_receive():
            # A chunked body has no Content-Length: count what arrives.
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body over the {limit}-byte limit")
            return message

        await self.app(scope, limited_receive, send)

    def _authorized(self, header: bytes) -> bool:
        scheme, _, credentials = header.partition(b" ")
        if scheme.lower() == b"bearer":
            given = credentials.strip()
        elif scheme.lower() == b"basic":
            try:
                given = base64.b64decode(credentials.strip(), validate=True).partition(b":")[2]
            except ValueError:
                return False
        else:
            return False
        return hmac.compare_digest(given, self.token)


async def _answer(scope, receive, send, status: int, detail: str, challenges: list[str] = ()) -> None:
    response = JSONResponse(error_body(status, detail), status_code=status)
    for challenge in challenges:
        response.headers.append("www-authenticate", challenge)
    await response(scope, receive, send)


def build_app(
    model: str | None,
    adapter_specs: list[str],
    *,
    limits: Limits | None = None,
    token: str | None = None,
    device: str | None = None,
    dtype: str = "float32",
    mixed: bool = True,
    continuous: bool | None = None,
    other_base: bool = False,
) -> FastAPI:
    """The app for `flantune serve`: load the base and adapters, check the limits, wire the routes.

    mixed: rows of different LoRA adapters may share a batch (where `mixable`); False batches per adapter.
    continuous: iteration-level batching (None: where the model allows it; False: batches in waves).
    """
    limits = limits or Limits()
    problems = limits.check()
    if problems:
        raise ServeError("; ".join(problems))
    adapters = parse_adapters(adapter_specs)
    loaded, tokenizer, base, kinds = load_service_model(
        model, adapters, device=device, dtype=dtype, other_base=other_base
    )
    service = Service(
        loaded, tokenizer, base=base, kinds=kinds, limits=limits, mixed=mixed and mixable(loaded),
        continuous=continuous,
    )
    return create_app(service, token=token)


def run(app: FastAPI, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; uvicorn then stops accepting, finishes requests in flight, and runs
    the lifespan's shutdown (which drains the worker)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=None)
