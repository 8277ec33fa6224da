"""Load test of `flantune serve` on loopback: N requests at C concurrent connections.

Starts `flantune serve` in a subprocess (so the load generator does not share its interpreter) with a
base model of a published shape on random weights and K LoRA adapters (random, non-zero weights, so
each answers differently), sends one SciQ question per request to the base and the adapters in turn
with httpx's async client, then stops the server with SIGTERM (a graceful shutdown, checked to exit
0). Reports latency p50/p99 as the client sees it, requests/s over the whole run, and errors.
Random weights rarely emit EOS, so every answer runs to its token cap: the longest answers that
setting allows.

--api generate (default) posts to /v1/generate with --max-new-tokens. --api openai posts to the
OpenAI-compatible /v1/completions with stream=true (`model`: the base's name from /v1/models or an
adapter's) and also records the time to the first token (the first streamed text) per request;
--new-tokens LO-HI gives each request its own max_tokens, drawn uniformly from LO..HI with a fixed
seed (mixed traffic: the same draws on every run). Output tokens come from the server's own count
(`usage`, or /v1/generate's `output_tokens`).

Where the server's worker spent the timed run (continuous batching; from its /metrics, read before
and after the timed requests): decoding steps (count, mean ms, mean rows per step) and encoder passes
of joining requests (count, mean ms, mean sources per pass), and the share of the run's wall time the
two took (the rest: the worker waiting for requests, and its other host work between steps).

    python bench/serve_load.py --shared ../shared --shape tiny --out serve-cpu.json
    python bench/serve_load.py --shared .gpu_shared --shape flan-t5-base --device cuda --dtype bfloat16 --out serve-gpu.json
        [--no-continuous]   (the same load on the server batching in waves, for comparison)
    python bench/serve_load.py --shared .gpu_shared --shape flan-t5-base --device cuda --dtype bfloat16 \
        --api openai --adapters 8 --requests 2000 --concurrency 64 --new-tokens 8-128 --out serve-openai.json

The server before continuous batching and the OpenAI API (commit 059d8c9: batches in waves on
transformers' generate, /v1/generate only), under the same load through --api generate:

    git worktree add /tmp/serve-059d8c9 059d8c9
    python bench/serve_load.py ... --api generate --server-src /tmp/serve-059d8c9/src --out serve-before.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch


def make_base(shared: Path, shape: str, folder: Path) -> Path:
    """`tiny`: flan-t5-small's architecture at width 32 (the tests' model); else the published shape."""
    from transformers import AutoConfig, AutoTokenizer

    source = shared / "assets" / ("flan-t5-small" if shape == "tiny" else shape)
    if shape != "tiny":
        return source
    cfg = AutoConfig.from_pretrained(source)
    cfg.update(dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16))
    base = folder / "tiny"
    cfg.save_pretrained(base)
    AutoTokenizer.from_pretrained(source).save_pretrained(base)
    return base


def make_adapters(base: Path, count: int, folder: Path) -> dict[str, Path]:
    """LoRA adapters (r=16 on q, v) of the random-init base, recorded the way `flantune train` does."""
    from peft import LoraConfig, get_peft_model

    from flantune.models import load_model

    model = load_model(str(base), init="random", seed=0)
    adapters = {}
    for k in range(count):
        torch.manual_seed(k + 1)
        lora = LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], init_lora_weights=False)
        peft_model = get_peft_model(model, lora)
        out = folder / f"adapter-{k}"
        peft_model.save_pretrained(out)
        model = peft_model.unload()  # the plain base again, for the next adapter
        record = {
            "method": "lora",
            "base": {"path": str(base), "init": "random", "seed": 0, "revision": None},
        }
        (out / "flantune.json").write_text(json.dumps(record))
        adapters[f"lora-{k}"] = out
    return adapters


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def questions(shared: Path, n: int) -> list[str]:
    rows = json.loads((shared / "data" / "sciq" / "valid.json").read_text())
    return [f"question: {r['question']}" for r in rows[:n]]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def send_generate(client: httpx.AsyncClient, body: dict) -> dict:
    """One /v1/generate request: its answer with `latency_ms` and `output_tokens` (summed)."""
    started = time.perf_counter()
    response = await client.post("/v1/generate", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
    answer = response.json()
    answer["latency_ms"] = (time.perf_counter() - started) * 1000
    answer["tokens"] = sum(answer["output_tokens"])
    return answer


async def send_openai(client: httpx.AsyncClient, body: dict) -> dict:
    """One streamed /v1/completions request, read event by event: `latency_ms` (to `[DONE]`),
    `ttft_ms` (to the first event with text) and `tokens` (the server's usage count)."""
    started, ttft, tokens = time.perf_counter(), None, None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if ttft is None and any(choice.get("text") for choice in event.get("choices", [])):
                ttft = (time.perf_counter() - started) * 1000
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return {"latency_ms": (time.perf_counter() - started) * 1000, "ttft_ms": ttft, "tokens": tokens}


async def fire(
    url: str, bodies: list[dict], concurrency: int, time_limit: float | None = None, send=send_generate,
    drain: float | None = None,
) -> tuple[list[float], list[dict], list[str], float, int]:
    """Every body once through `send`, `concurrency` at a time, none sent after `time_limit`
    seconds, and the requests still in flight `drain` seconds after that cancelled (so that a slow
    side still ends, and reports what was answered); (latencies in ms, answers, errors, seconds,
    requests cancelled in flight)."""
    latencies, answers, errors = [], [], []
    in_flight = [0]
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    run_started = time.perf_counter()

    async def connection(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            if time_limit is not None and time.perf_counter() - run_started > time_limit:
                return
            body = queue.get_nowait()
            in_flight[0] += 1
            try:
                answer = await send(client, body)
            except (httpx.HTTPError, RuntimeError) as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            finally:
                in_flight[0] -= 1
            latencies.append(answer["latency_ms"])
            answers.append(answer)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        tasks = [asyncio.create_task(connection(client)) for _ in range(concurrency)]
        deadline = None if time_limit is None or drain is None else time_limit + drain
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        cancelled = in_flight[0] if pending else 0
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return latencies, answers, errors, time.perf_counter() - run_started, cancelled


WORKER_HISTOGRAMS = ("flantune_decode_step_seconds", "flantune_decode_step_rows", "flantune_encoder_pass_seconds",
                     "flantune_encoder_pass_inputs")  # fmt: skip


def worker_totals(url: str) -> dict[str, float]:
    """The continuous worker's histogram sums and counts from /metrics ({} for a server in waves)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    response = httpx.get(f"{url}/metrics", timeout=30)
    if response.status_code == 404:  # a version without /metrics
        return totals
    for family in text_string_to_metric_families(response.text):
        if family.name in WORKER_HISTOGRAMS:
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    totals[sample.name] = sample.value
    return totals


def worker_time(before: dict[str, float], after: dict[str, float], seconds: float) -> dict | None:
    """What the worker did between two readings of worker_totals, over `seconds` of wall time."""
    if not after:
        return None
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    steps, passes = delta["flantune_decode_step_seconds_count"], delta["flantune_encoder_pass_seconds_count"]
    step_s, pass_s = delta["flantune_decode_step_seconds_sum"], delta["flantune_encoder_pass_seconds_sum"]
    return {
        "steps": int(steps), "steps_per_s": steps / seconds,
        "mean_step_ms": 1000 * step_s / steps if steps else None,
        "mean_rows_per_step": delta["flantune_decode_step_rows_sum"] / steps if steps else None,
        "encoder_passes": int(passes), "mean_encoder_pass_ms": 1000 * pass_s / passes if passes else None,
        "mean_sources_per_pass": delta["flantune_encoder_pass_inputs_sum"] / passes if passes else None,
        "share_in_steps": step_s / seconds, "share_in_encoder_passes": pass_s / seconds,
    }  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default="../shared")
    parser.add_argument("--shape", default="tiny", help="tiny, or an asset folder name such as flan-t5-base")
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", default=None, help="LO-HI: each request's own cap, drawn from LO..HI")
    parser.add_argument("--api", choices=("generate", "openai"), default="generate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--stream-interval-ms", type=float, default=None, help="the server's --stream-interval-ms")
    parser.add_argument("--time-limit", type=float, default=None, help="send no request after this many s")
    parser.add_argument("--drain-limit", type=float, default=None,
                        help="with --time-limit: cancel what is still in flight this many s after it, and report "
                             "the count (cancelled_in_flight); default: wait for every answer")
    parser.add_argument("--no-mixed-batches", action="store_true", help="batch per adapter only")
    parser.add_argument("--no-continuous", action="store_true", help="batch in waves (the server's --no-continuous)")
    parser.add_argument("--server-src", default=None,
                        help="run the server from this source folder (another version's src/, e.g. a git "
                             "worktree of an earlier release), for a comparison in the same sitting")
    parser.add_argument("--out", default="serve-load.json")
    args = parser.parse_args()
    if args.drain_limit is not None and args.time_limit is None:
        parser.error("--drain-limit counts from --time-limit: give --time-limit too")
    shared = Path(args.shared)
    low = high = args.max_new_tokens
    if args.new_tokens:
        try:
            low, high = (int(x) for x in args.new_tokens.split("-"))
        except ValueError:
            parser.error(f"--new-tokens: expected LO-HI such as 8-128, got {args.new_tokens!r}")
        if not 1 <= low <= high:
            parser.error(f"--new-tokens: expected 1 <= LO <= HI, got {args.new_tokens!r}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = make_base(shared, args.shape, folder)
        adapters = make_adapters(base, args.adapters, folder)
        say(f"{len(adapters)} adapters written; starting the server")
        port = free_port()
        command = [sys.executable, "-m", "flantune.cli", "serve", "--model", str(base), "--port", str(port),
                   "--device", args.device, "--dtype", args.dtype, "--max-batch", str(args.max_batch),
                   "--batch-wait-ms", str(args.batch_wait_ms), "--max-new-tokens", str(max(high, 512))]  # fmt: skip
        if args.no_mixed_batches:
            command.append("--no-mixed-batches")
        if args.stream_interval_ms is not None:
            command += ["--stream-interval-ms", str(args.stream_interval_ms)]
        if args.no_continuous:
            command.append("--no-continuous")
        for name, path in adapters.items():
            command += ["--adapter", f"{name}={path}"]
        log = open(folder / "server.log", "w+")  # noqa: SIM115 - read back after the server ends
        env = os.environ.copy()
        if args.server_src:  # that version's flantune first on the server's path
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.server_src).resolve()), env.get("PYTHONPATH", "")])
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the server did not start:\n{log.read()[-3000:]}")
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            say("server up; warming up")
            texts = questions(shared, args.requests)
            draw = random.Random(0)
            caps = [draw.randint(low, high) for _ in range(args.requests)]
            if args.api == "openai":
                base_name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                names = [base_name, *adapters]
                bodies = [
                    {"model": names[i % len(names)], "prompt": texts[i % len(texts)], "max_tokens": caps[i],
                     "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
                    for i in range(args.requests)
                ]  # fmt: skip
                send = send_openai
            else:
                names = [None, *adapters]
                bodies = [
                    {"adapter": names[i % len(names)], "inputs": [texts[i % len(texts)]], "max_new_tokens": caps[i]}
                    for i in range(args.requests)
                ]  # fmt: skip
                send = send_generate
            # warm-up (a slow server's within the same limits as the timed run)
            asyncio.run(fire(url, bodies[: 2 * args.concurrency], args.concurrency, args.time_limit, send=send,
                             drain=args.drain_limit))  # fmt: skip
            say(f"{args.requests} requests at {args.concurrency} concurrent connections ({args.api})")
            before = worker_totals(url)
            latencies, answers, errors, seconds, cancelled = asyncio.run(
                fire(url, bodies, args.concurrency, args.time_limit, send=send, drain=args.drain_limit)
            )
            worker = worker_time(before, worker_totals(url), seconds)
            say(f"done in {seconds:.1f} s; stopping the server")
        finally:
            server.send_signal(signal.SIGTERM)
            exit_code = server.wait(120)
            log.seek(0)
            server_log = log.read()
            log.close()

    ttfts = [a["ttft_ms"] for a in answers if a.get("ttft_ms") is not None]
    batched = [a for a in answers if "batch" in a]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "shape": args.shape, "adapters": args.adapters, "requests": args.requests,
        "concurrency": args.concurrency, "api": args.api, "new_tokens": [low, high], "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
        "cpu_threads": torch.get_num_threads(), "dtype": args.dtype, "max_batch": args.max_batch,
        "batch_wait_ms": args.batch_wait_ms, "stream_interval_ms": args.stream_interval_ms,
        "mixed_batches": not args.no_mixed_batches,
        "continuous": not args.no_continuous, "server_src": args.server_src,
        "torch": torch.__version__,
        "ok": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "stopped_by_time_limit": len(latencies) + len(errors) < args.requests,
        # Requests still unanswered --drain-limit s after the time limit, cancelled: the latency
        # percentiles leave them out, so they read low when this is not 0.
        "cancelled_in_flight": cancelled,
        "p50_ms": percentile(latencies, 50) if latencies else None,
        "p99_ms": percentile(latencies, 99) if latencies else None,
        "mean_ms": statistics.fmean(latencies) if latencies else None,
        "requests_per_s": len(latencies) / seconds, "seconds": seconds,
        "ttft_p50_ms": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": percentile(ttfts, 99) if ttfts else None,
        # /v1/generate answers say how they were batched; the OpenAI answers do not.
        "mean_requests_per_batch": statistics.fmean(a["batch"]["requests"] for a in batched) if batched else None,
        "mean_models_per_batch": statistics.fmean(a["batch"]["models"] for a in batched) if batched else None,
        "median_generate_ms": statistics.median(a["timing"]["generate_ms"] for a in batched) if batched else None,
        "output_tokens_per_s": sum(a["tokens"] for a in answers) / seconds,
        "worker": worker,
        # uvicorn re-raises the SIGTERM it caught once shutdown is done: the exit code is -15 either way.
        "server_exit_code": exit_code, "graceful_shutdown": "Application shutdown complete." in server_log,
        "server_log_tail": server_log[-1500:],
        "command": " ".join(["python", *sys.argv]),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: result[k] for k in ("device_name", "ok", "errors", "p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms",
                                      "requests_per_s", "output_tokens_per_s", "mean_requests_per_batch",
                                      "graceful_shutdown", "worker")}  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
