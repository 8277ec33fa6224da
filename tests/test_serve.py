"""flantune serve: each route, each limit, auth, and adapters that answer exactly as direct generation
does, also when requests for different adapters interleave and are batched."""

import base64
import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")

import httpx
import torch
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from flantune import engine, serve
from flantune.cli import app as cli
from flantune.config import GenerationConfig
from flantune.decoding import generate_texts
from flantune.serve import Limits, Service, create_app, load_service_model

from .conftest import ASSETS, load_for_generation, need
from .test_train import METHODS, make_recipe, tiny_model_dir, write_copy_task

SOURCES = ["reverse: a b c", "copy: x y", "reverse: one two three four five six", "b", "copy: sky blue"]
CFG = GenerationConfig(max_new_tokens=8)
_BUILT: dict[str, tuple[Path, dict[str, Path]]] = {}


def adapters_of_one_base(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """A tiny random-weight T5 base and three LoRA adapters trained on it for a few steps each with
    different data and learning rates, so each answers differently. Built once per session."""
    if "built" not in _BUILT:
        from flantune.train import train

        folder = tmp_path_factory.mktemp("serve")
        base = tiny_model_dir(folder / "base", str(need(ASSETS / "flan-t5-small")))
        finals = {}
        for name, kind, steps, lr in (("alpha", "reverse", 2, 5e-2), ("beta", "copy", 3, 3e-2),
                                      ("gamma", "reverse", 1, 1e-1)):  # fmt: skip
            data = write_copy_task(folder, n=16, kind=kind)
            recipe = make_recipe(base, data, folder / name, METHODS["lora"], max_steps=steps, lr=lr)
            finals[name] = train(recipe).final_dir
        _BUILT["built"] = (base, finals)
    return _BUILT["built"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return adapters_of_one_base(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(adapters):
    """The base with every adapter, loaded once; each test wraps it in its own app and limits."""
    _, finals = adapters
    return load_service_model(None, {name: str(path) for name, path in finals.items()}, device="cpu")


@pytest.fixture(scope="module")
def expected(adapters):
    """Direct generation, one model per adapter, outside the server: what the server must answer."""
    base, finals = adapters
    answers = {}
    for name in (None, *finals):
        if name is None:
            model, tokenizer = load_for_generation(str(base), recorded_by=str(finals["alpha"]), device="cpu")
        else:
            model, tokenizer = load_for_generation(str(finals[name]), device="cpu")
        answers[name] = dict(zip(SOURCES, generate_texts(model, tokenizer, SOURCES, CFG), strict=True))
    return answers


def make_app(loaded, token=None, mixed=None, continuous=None, **limits):
    model, tokenizer, base, kinds = loaded
    service = Service(model, tokenizer, base=base, kinds=kinds, limits=Limits(**limits), mixed=mixed,
                      continuous=continuous)  # fmt: skip
    return create_app(service, token=token)


@contextmanager
def live_server(app):
    """A real uvicorn server on a free loopback port, in a thread; stops gracefully on exit."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def ask(client, adapter, inputs, **options):
    return client.post(
        "/v1/generate", json={"adapter": adapter, "inputs": inputs, "max_new_tokens": 8, **options}
    )


def slow_steps(patch, seconds: float) -> None:
    """Each continuous step slowed by `seconds`, so that requests sent one after the other overlap."""
    from flantune.continuous import Slots

    real_step = Slots.step

    def slow_step(self, *args):
        time.sleep(seconds)
        return real_step(self, *args)

    patch.setattr(Slots, "step", slow_step)


def wait_until_decoding(worker) -> None:
    deadline = time.monotonic() + 10
    while not worker.active:
        assert time.monotonic() < deadline, "the long request did not start"
        time.sleep(0.005)


def test_each_route(loaded, expected):
    with TestClient(make_app(loaded)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        models = client.get("/v1/models").json()
        assert [a["name"] for a in models["adapters"]] == ["alpha", "beta", "gamma"]
        assert {a["kind"] for a in models["adapters"]} == {"lora"}
        assert models["limits"]["max_new_tokens"] == 512
        # The continuous batch's cache, said before the first request: what its slots then hold.
        batching, limits = models["batching"], models["limits"]
        assert batching["mode"] == "continuous" and "continuous batching: 32 rows" in batching["line"]
        from flantune.continuous import Slots

        slots = Slots(loaded[0], limits["max_batch"], limits["max_new_tokens"], limits["max_input_tokens"])
        held = sum(t.numel() * t.element_size() for t in (*slots.keys, *slots.values, *slots.cross_keys,
                                                          *slots.cross_values))  # fmt: skip
        assert batching["cache_gib"] == round(held / 2**30, 3) > 0
        assert "swagger" in client.get("/docs").text.lower()
        assert "/v1/generate" in client.get("/openapi.json").json()["paths"]
        page = client.get("/")
        assert page.status_code == 200 and "playground.js" in page.text
        assert client.get("/static/playground.js").status_code == 200

        for adapter in (None, "alpha", "beta", "gamma"):
            answer = ask(client, adapter, SOURCES).json()
            assert answer["adapter"] == adapter
            assert answer["outputs"] == [expected[adapter][s] for s in SOURCES]
            assert answer["input_tokens"] == [len(loaded[1](s)["input_ids"]) for s in SOURCES]
            assert len(answer["output_tokens"]) == len(SOURCES)
            assert all(0 < n <= 8 + 2 for n in answer["output_tokens"])
            assert answer["timing"]["total_ms"] >= answer["timing"]["generate_ms"] > 0
    # The adapters really differ, so a server that mixed them up would fail the comparison above.
    assert len({tuple(expected[name].values()) for name in expected}) == 4


@pytest.mark.parametrize(("mixed", "continuous"), [(True, None), (True, False), (False, None)],
                         ids=["mixed-batches", "mixed-waves", "one-adapter-batches"])  # fmt: skip
def test_interleaved_adapters_are_batched_and_each_gets_its_own_output(loaded, expected, mixed, continuous):
    """LoRA adapters mix in one batch by default (continuous, or in waves with --no-continuous: each
    adapter's matrices gathered per row); either way every request gets the answer of its own
    adapter, as direct generation with that adapter alone gives it."""
    from flantune.lora_rows import LoraRows

    assert serve.mixable(loaded[0])
    rng = random.Random(0)
    requests = [(rng.choice([None, "alpha", "beta", "gamma"]), rng.choice(SOURCES)) for _ in range(40)]
    app = make_app(loaded, mixed=mixed, continuous=continuous, batch_wait_ms=30, max_batch=8)
    with TestClient(app) as client, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda r: ask(client, r[0], [r[1]]), requests))
    assert [a.status_code for a in answers] == [200] * len(requests)
    for (adapter, source), answer in zip(requests, answers, strict=True):
        assert answer.json()["outputs"] == [expected[adapter][source]], (adapter, source)
    batches = [a.json()["batch"] for a in answers]
    assert max(b["requests"] for b in batches) > 1, "concurrent requests should share a batch"
    assert max(b["inputs"] for b in batches) <= 8
    if mixed:
        assert max(b["models"] for b in batches) > 1, "rows of several adapters should share a batch"
    else:
        assert max(b["models"] for b in batches) == 1
    worker = app.state.service.worker
    # Mixed LoRA rows decode in the continuous batch unless told otherwise; adapters kept apart
    # decode in waves.
    assert isinstance(worker, serve.ContinuousWorker) == (mixed and continuous is None)
    if continuous is False:
        assert isinstance(worker._gathered, LoraRows)  # mixed waves gathered rows per adapter
    if not mixed:
        assert worker.batches < len(requests)


def test_mixed_waves_fall_back_to_pefts_adapter_names(loaded, expected, monkeypatch):
    """Adapters whose rows cannot be gathered (LoraRows.unsupported says why: modules of their own,
    a LoRA variant) still mix in a wave through PEFT's adapter names, each request answered by its
    own adapter."""
    from flantune.lora_rows import LoraRows

    monkeypatch.setattr(LoraRows, "unsupported", staticmethod(lambda model: "not gatherable (test)"))
    requests = [(name, source) for name in (None, "alpha", "beta", "gamma") for source in SOURCES[:2]]
    app = make_app(loaded, mixed=True, continuous=False, batch_wait_ms=200, max_batch=16)
    with TestClient(app) as client, ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: ask(client, r[0], [r[1]]), requests))
    for (adapter, source), answer in zip(requests, answers, strict=True):
        assert answer.json()["outputs"] == [expected[adapter][source]], (adapter, source)
    assert max(a.json()["batch"]["models"] for a in answers) > 1  # adapters shared a wave
    assert app.state.service.worker._gathered is False


def test_waves_batch_requests_of_other_caps_each_cut_at_its_own(loaded):
    """Batching in waves, requests with different max_new_tokens share a batch (decoded to the
    largest cap); each answer equals generation with its own cap alone, streamed pieces included;
    beam search keeps its cap in the batch key."""
    model, tokenizer = loaded[0], loaded[1]
    caps = [2, 8, 5, 3, 8, 1]
    jobs = [("alpha" if i % 2 else "beta", SOURCES[i % len(SOURCES)], cap) for i, cap in enumerate(caps)]
    want = []
    for name, source, cap in jobs:
        model.set_adapter(name)
        want.append(generate_texts(model, tokenizer, [source], GenerationConfig(max_new_tokens=cap))[0])
    assert len({len(tokenizer(w).input_ids) for w in want}) > 1  # the caps cut the answers differently
    app = make_app(loaded, mixed=False, continuous=False, batch_wait_ms=200, max_batch=16)
    with TestClient(app) as client, ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda r: ask(client, r[0], [r[1]], max_new_tokens=r[2]), jobs))
    assert [a.json()["outputs"][0] for a in answers] == want
    assert max(a.json()["batch"]["requests"] for a in answers) > 2  # other caps, one batch
    worker = app.state.service.worker
    assert worker.caps_mix and not isinstance(worker, serve.ContinuousWorker)
    one = serve.Job("alpha", ["x"], GenerationConfig(max_new_tokens=4))
    other = serve.Job("alpha", ["x"], GenerationConfig(max_new_tokens=9))
    assert one.key(False, caps=True) == other.key(False, caps=True) != one.key(False)
    beams = [serve.Job("alpha", ["x"], GenerationConfig(max_new_tokens=n, num_beams=2)) for n in (4, 9)]
    assert beams[0].key(False, caps=True) != beams[1].key(False, caps=True)


def test_waves_stream_no_token_past_a_requests_cap(loaded):
    """A streamed request batched in waves with a longer one: its streamed pieces add up to its
    own answer (no token past its cap reaches the client)."""
    openai = pytest.importorskip("openai")
    model, tokenizer = loaded[0], loaded[1]
    model.set_adapter("alpha")
    short = generate_texts(model, tokenizer, [SOURCES[2]], GenerationConfig(max_new_tokens=2))[0]
    app = make_app(loaded, mixed=False, continuous=False, batch_wait_ms=300)
    with live_server(app) as (_, _, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(2) as pool:
            long = pool.submit(client.completions.create, model="alpha", prompt=SOURCES[2], max_tokens=8,
                               temperature=0)  # fmt: skip
            events = list(client.completions.create(model="alpha", prompt=SOURCES[2], max_tokens=2, temperature=0,
                                                    stream=True))  # fmt: skip
            long.result()
    assert app.state.service.worker.batches == 1  # the two shared one batch, decoded to 8 tokens
    assert "".join(c.text for event in events for c in event.choices) == short


def test_beam_search_is_batched_per_adapter(loaded):
    """Beam-search requests never mix adapters in a batch, and answer as each adapter alone does."""
    model, tokenizer = loaded[0], loaded[1]
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3)
    want = {}
    for name in (None, "alpha", "beta"):
        if name is None:
            with model.disable_adapter():
                want[name] = generate_texts(model, tokenizer, SOURCES[:3], cfg)
        else:
            model.set_adapter(name)
            want[name] = generate_texts(model, tokenizer, SOURCES[:3], cfg)
    app = make_app(loaded, batch_wait_ms=50)
    with TestClient(app) as client, ThreadPoolExecutor(6) as pool:
        jobs = [(name, source) for name in want for source in SOURCES[:3]]
        answers = list(pool.map(lambda r: ask(client, r[0], [r[1]], num_beams=3), jobs))
    for (name, source), answer in zip(jobs, answers, strict=True):
        assert answer.json()["outputs"] == [want[name][SOURCES.index(source)]], (name, source)
        assert answer.json()["batch"]["models"] == 1


def test_each_limit_is_a_4xx_with_a_message(loaded):
    app = make_app(loaded, max_input_tokens=12, max_new_tokens=8, max_inputs=3, max_body_bytes=2000)
    with TestClient(app, raise_server_exceptions=False) as client:
        cases = [
            (ask(client, None, ["word " * 30]), 422, "inputs[0]: 31 tokens, over this server's limit of 12"),
            (ask(client, None, ["a"], max_new_tokens=9), 422, "max_new_tokens: 9 is over this server's limit of 8"),
            (ask(client, None, ["a"] * 4), 422, "4 inputs, this server takes at most 3 per request"),
            (ask(client, None, ["a"], temperature=0, do_sample=True), 422, "temperature"),
            (ask(client, None, []), 422, "at least 1"),
            (ask(client, None, ["a"], colour="red"), 422, "colour"),
            (client.post("/v1/generate", content=b'{"inputs": ["a"], "temperature": NaN}',
                         headers={"content-type": "application/json"}), 422, "finite number"),
            (client.post("/v1/generate", content=b'{"inputs": ["a", "\\ud800"], "max_new_tokens": 2}',
                         headers={"content-type": "application/json"}), 422, "inputs[1]: not valid Unicode"),
            (ask(client, "nope", ["a"]), 404, "adapter 'nope' is not served here (adapters: alpha, beta, gamma"),
            (ask(client, str(Path.cwd()), ["a"]), 404, "is not served here"),
            (client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"}),
             422, "JSON"),
            (ask(client, None, ["a" * 3000]), 413, "request body over the 2000-byte limit"),
            # A chunked body announces no length: it is counted as it arrives.
            (client.post("/v1/generate", content=iter([b'{"inputs": ["', b"a" * 3000, b'"]}']),
                         headers={"content-type": "application/json"}), 413, "2000-byte limit"),
        ]  # fmt: skip
        for response, status, message in cases:
            assert response.status_code == status, response.text
            assert message in json.dumps(response.json()), response.text
        assert ask(client, None, ["a"] * 3).status_code == 200  # at the limits is fine


def test_timeout_is_a_504_its_generation_stops_and_the_server_lives_on(loaded, monkeypatch):
    """The first generation runs until told to stop (or 10 s): the request times out with a 504, the
    worker's stop signal reaches the running generation, and the next request is answered."""
    stopped, calls = threading.Event(), []
    real = serve.generate_outputs

    def slow(*args, stop, **kwargs):
        calls.append(1)
        deadline = time.monotonic() + 10
        while len(calls) == 1 and not stop() and time.monotonic() < deadline:
            time.sleep(0.01)
        if stop():
            stopped.set()
        return real(*args, stop=stop, **kwargs)

    monkeypatch.setattr(serve, "generate_outputs", slow)
    # 1 s: the next request's real generation must fit it on a loaded 2-core machine too (0.3 s did not).
    with TestClient(make_app(loaded, timeout_s=1.0, continuous=False)) as client:
        started = time.monotonic()
        response = ask(client, None, ["a"])
        assert response.status_code == 504
        assert "within the 1 s limit" in response.json()["detail"]
        assert stopped.wait(5) and time.monotonic() - started < 5, "the abandoned generation did not stop"
        assert ask(client, "alpha", ["a"]).status_code == 200


def test_auth_guards_every_route_but_healthz(loaded, monkeypatch):
    token = "s3cret-token"
    with TestClient(make_app(loaded, token=token)) as client:
        routes = [("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/models"),
                  ("GET", "/static/playground.js"), ("POST", "/v1/generate"), ("GET", "/no-such-route")]  # fmt: skip
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                response = client.request(method, path, headers=headers, json={"inputs": ["a"]})
                assert response.status_code == 401, (method, path, headers)
                assert "token" in response.json()["detail"]
        assert "Basic" in client.get("/").headers["www-authenticate"]  # the browser asks for it
        assert client.get("/healthz").status_code == 200
        good = {"Authorization": f"Bearer {token}"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert (
            client.post("/v1/generate", headers=good, json={"inputs": ["a"], "max_new_tokens": 2}).status_code
            == 200
        )
        basic = base64.b64encode(f"anyone:{token}".encode()).decode()
        assert client.get("/", headers={"Authorization": f"Basic {basic}"}).status_code == 200

    # The CLI takes the token from the environment and passes every limit on.
    built = {}
    monkeypatch.setattr(serve, "run", lambda app, host, port: built.update(app=app, host=host, port=port))
    monkeypatch.setattr(serve, "load_service_model", lambda *a, **k: loaded)
    monkeypatch.setenv("FLANTUNE_SERVE_TOKEN", token)
    result = CliRunner().invoke(cli, ["serve", "--adapter", "alpha=x", "--port", "8123", "--max-inputs", "5"])
    assert result.exit_code == 0, result.output
    assert built["port"] == 8123 and built["app"].state.service.limits.max_inputs == 5
    # Before serving, the line that says how it batches and what the continuous batch reserves.
    assert built["app"].state.service.batching["line"] in " ".join(result.output.split())
    assert "continuous batching: 32 rows x (1024 source + 512 new tokens)" in result.output
    with TestClient(built["app"]) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_unservable_adapters_are_refused_with_a_message(adapters, tmp_path):
    _, finals = adapters
    bottleneck = tmp_path / "bottleneck"
    bottleneck.mkdir()
    (bottleneck / "adapter_config.json").write_text(json.dumps({"kind": "bottleneck"}))
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    runner = CliRunner()
    cases = [
        (["--adapter", f"b={bottleneck}"], "bottleneck adapters are layers inserted into the model"),
        (["--adapter", f"a={finals['alpha']}", "--adapter", f"i={ia3}"], "adapters of one PEFT type"),
        (["--adapter", f"a={finals['alpha']}", "--adapter", f"a={finals['beta']}"], "the name 'a' is given twice"),
        (["--adapter", str(finals["alpha"])], "expected NAME=PATH"),
        (["--adapter", f"../x={finals['alpha']}"], "names are 1-64 letters"),
        (["--adapter", f"a={tmp_path}"], "no adapter_config.json there"),
        (["--model", str(finals["alpha"])], "is an adapter folder"),
        ([], "--model: give the base model"),
        (["--adapter", f"a={finals['alpha']}", "--max-batch", "0"], "--max-batch: must be positive"),
    ]  # fmt: skip
    for args, message in cases:
        result = runner.invoke(cli, ["serve", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_a_base_alone_is_served(adapters, expected):
    """No adapters: the base answers (adapter null) as direct generation does; any name is a 404."""
    base, finals = adapters
    # The random-weight base, rebuilt with the seed its adapters recorded.
    model, tokenizer = load_for_generation(str(base), recorded_by=str(finals["alpha"]), device="cpu")
    assert not serve.mixable(model)
    service = Service(model, tokenizer, base=str(base), kinds={}, limits=Limits())
    with TestClient(create_app(service)) as client:
        assert client.get("/v1/models").json()["adapters"] == []
        answer = ask(client, None, SOURCES)
        assert answer.status_code == 200 and answer.json()["outputs"] == [expected[None][s] for s in SOURCES]
        assert ask(client, "alpha", SOURCES[:1]).status_code == 404


@pytest.mark.parametrize("continuous", [False, True], ids=["waves", "continuous"])
def test_shutdown_finishes_requests_in_flight(loaded, expected, monkeypatch, continuous):
    from flantune.continuous import Slots

    started, release = threading.Event(), threading.Event()
    real = Slots.step if continuous else serve.generate_outputs

    def slow(*args, **kwargs):
        started.set()
        release.wait(10)
        return real(*args, **kwargs)

    if continuous:  # the first decoding step waits; the second request queues meanwhile
        monkeypatch.setattr(Slots, "step", slow)
    else:
        monkeypatch.setattr(serve, "generate_outputs", slow)
    app = make_app(loaded, batch_wait_ms=0, continuous=continuous)
    with live_server(app) as (server, thread, url), ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{url}/v1/generate", json={"inputs": [SOURCES[0]], "max_new_tokens": 8},
                              timeout=30)  # fmt: skip
        assert started.wait(10)
        # A second request queues behind the first (another adapter: not in its batch).
        queued = pool.submit(httpx.post, f"{url}/v1/generate",
                             json={"adapter": "beta", "inputs": [SOURCES[1]], "max_new_tokens": 8}, timeout=30)  # fmt: skip
        deadline = time.monotonic() + 10
        while not app.state.service.worker.pending:
            assert time.monotonic() < deadline, "the second request did not arrive"
            time.sleep(0.01)
        server.should_exit = True  # what SIGINT/SIGTERM do
        time.sleep(0.3)
        assert thread.is_alive(), "the server must wait for the requests in flight"
        release.set()
        first, second = running.result(), queued.result()
        thread.join(20)
    assert first.status_code == second.status_code == 200
    assert first.json()["outputs"] == [expected[None][SOURCES[0]]]
    assert second.json()["outputs"] == [expected["beta"][SOURCES[1]]]
    assert not thread.is_alive() and not app.state.service.worker.thread.is_alive()


def test_draining_answers_503(loaded):
    app = make_app(loaded)
    with TestClient(app) as client:
        app.state.service.draining = True
        assert client.get("/healthz").status_code == 503
        response = ask(client, None, ["a"])
        assert response.status_code == 503 and "shutting down" in response.json()["detail"]
        app.state.service.draining = False


# ---- the OpenAI-compatible routes and the metrics ------------------------------------------------


def test_the_openai_client_talks_to_the_server(loaded, expected):
    """The real `openai` client against a live server on loopback: the model list, greedy completions
    per model equal to direct generation, n samples per prompt, stop strings, the errors it raises,
    and the bearer token it sends as its api_key."""
    openai = pytest.importorskip("openai")
    base = loaded[2]
    with live_server(make_app(loaded, token="s3cret")) as (_, _, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in client.models.list()] == [base, "alpha", "beta", "gamma"]

        for name in (None, "alpha", "beta"):
            done = client.completions.create(model=name or base, prompt=SOURCES, max_tokens=8, temperature=0)
            assert done.model == (name or base) and done.object == "text_completion"
            assert [c.index for c in done.choices] == list(range(len(SOURCES)))
            assert [c.text for c in done.choices] == [expected[name][s] for s in SOURCES]
            assert all(c.finish_reason in ("stop", "length") for c in done.choices)
            prompt_tokens = sum(len(loaded[1](s)["input_ids"]) for s in SOURCES)
            assert done.usage.prompt_tokens == prompt_tokens
            assert 0 < done.usage.completion_tokens <= 8 * len(SOURCES)
            assert done.usage.total_tokens == prompt_tokens + done.usage.completion_tokens

        one = client.completions.create(model="alpha", prompt=SOURCES[0], max_tokens=8, temperature=0)
        assert [c.text for c in one.choices] == [expected["alpha"][SOURCES[0]]]

        sampled = client.completions.create(model="beta", prompt=SOURCES[:2], max_tokens=8, temperature=1.0, n=3)
        assert [c.index for c in sampled.choices] == list(range(6))
        assert all(isinstance(c.text, str) for c in sampled.choices)

        # A stop string cuts the text before it and ends the choice with "stop".
        text = expected["gamma"][SOURCES[2]]
        assert len(text) > 2, text
        cut_at = text[1:].find(text[1]) + 1 if text[1] in text[2:] else 1  # a later occurrence counts not
        stop = text[cut_at:]
        done = client.completions.create(model="gamma", prompt=SOURCES[2], max_tokens=8, temperature=0, stop=[stop])
        assert done.choices[0].text == text[: text.find(stop)] and done.choices[0].finish_reason == "stop"

        with pytest.raises(openai.NotFoundError, match="model 'delta' is not served here"):
            client.completions.create(model="delta", prompt="x", max_tokens=4)
        with pytest.raises(openai.UnprocessableEntityError, match="n: several completions"):
            client.completions.create(model="alpha", prompt="x", max_tokens=4, temperature=0, n=2)
        with pytest.raises(openai.UnprocessableEntityError, match="logprobs: served without stream only"):
            client.completions.create(model="alpha", prompt="x", max_tokens=4, logprobs=2, stream=True)
        with pytest.raises(openai.UnprocessableEntityError, match="echo: not served by this server"):
            client.completions.create(model="alpha", prompt="x", max_tokens=4, echo=True)

        # logprobs: the model's own log-probability of each token, as the engine's greedy decoding gives it.
        done = client.completions.create(model="beta", prompt=SOURCES[:2], max_tokens=8, temperature=0, logprobs=2)
        model, tokenizer = loaded[0], loaded[1]
        model.set_adapter("beta")
        batch = tokenizer(SOURCES[:2], return_tensors="pt", padding=True)
        reference = engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8,
                                    return_logprobs=True)  # fmt: skip
        model.set_adapter("alpha")
        for row, choice in enumerate(done.choices):
            lp = choice.logprobs
            n = len(lp.tokens)
            assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
            ids = reference.sequences[row, 1 : 1 + n].tolist()
            assert lp.tokens == [tokenizer.decode([t]) for t in ids]
            torch.testing.assert_close(torch.tensor(lp.token_logprobs, dtype=torch.float64),
                                       reference.logprobs[row, :n].double(), atol=1e-4, rtol=0)  # fmt: skip
            for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
                assert len(top) == 2 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy: the top one
        with pytest.raises(openai.UnprocessableEntityError, match="over this server's limit of 512"):
            client.completions.create(model="alpha", prompt="x", max_tokens=513)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_count_requests_tokens_and_latency(loaded):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(make_app(loaded)) as client:
        assert ask(client, "alpha", SOURCES[:2]).status_code == 200
        assert ask(client, "delta", SOURCES[:1]).status_code == 404
        done = client.post("/v1/completions", json={"model": "beta", "prompt": SOURCES, "max_tokens": 8,
                                                     "temperature": 0})  # fmt: skip
        assert done.status_code == 200
        page = client.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(page.text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

    def value(name, **labels):
        return samples[name, tuple(sorted(labels.items()))]

    assert value("flantune_requests_total", route="/v1/generate", model="alpha", status="200") == 1
    assert value("flantune_requests_total", route="/v1/generate", model="unknown", status="404") == 1
    assert value("flantune_requests_total", route="/v1/completions", model="beta", status="200") == 1
    generated = done.json()["usage"]["completion_tokens"]
    assert value("flantune_generated_tokens_total", model="beta") == generated > 0
    assert value("flantune_generated_tokens_total", model="alpha") > 0
    assert value("flantune_time_to_first_token_seconds_count") == 2
    assert value("flantune_time_to_first_token_seconds_sum") > 0
    assert value("flantune_time_per_output_token_seconds_count") == 2
    assert value("flantune_queue_inputs") == 0 and value("flantune_running_batch_inputs") == 0
    # Where the continuous worker's time went: one encoder pass per request (they came one after
    # the other), its sources, and the steps with their rows (2 of alpha's, then beta's).
    assert value("flantune_encoder_pass_seconds_count") == 2 and value("flantune_encoder_pass_seconds_sum") > 0
    assert value("flantune_encoder_pass_inputs_sum") == 2 + len(SOURCES)
    steps = value("flantune_decode_step_seconds_count")
    assert steps == value("flantune_decode_step_rows_count") and value("flantune_decode_step_seconds_sum") > 0
    assert 2 * steps < value("flantune_decode_step_rows_sum") < len(SOURCES) * steps


@pytest.mark.parametrize("which", ["t5", "bart"])
def test_the_incremental_detokenizer_gives_the_whole_decode(which, t5_small_path, bart_path):
    """A stream's text, token by token (each decoded once in a short window), is at every step a
    prefix of decoding every token so far at once (the tokenizer's space clean-up, the strip) and
    equal to it once no character waits for more bytes: real text with punctuation the clean-up
    rewrites (" ." -> "."), and random ids (BART's byte-level pieces can split a character)."""
    from transformers import AutoTokenizer

    from flantune.decoding import decode

    tokenizer = AutoTokenizer.from_pretrained(t5_small_path if which == "t5" else bart_path)
    text = "Hello , world . It 's a test : do n't stop ! Ünïcödé ✓ 漢字 and 42 + 7 = 49 ?  Done ."
    rng = random.Random(0)
    sequences = [tokenizer(text, add_special_tokens=False).input_ids]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(60)] for _ in range(20)]
    for ids in sequences:
        stream = serve.Detokenizer(tokenizer)
        for n, token in enumerate(ids, 1):
            stream.add(token)
            whole, got = decode(tokenizer, ids[:n]), stream.text()
            assert whole.startswith(got), (ids[:n], whole, got)
            if not whole.endswith("\ufffd"):
                assert got == whole, (ids[:n], whole, got)


def test_streamed_completions_add_up_to_the_answer(loaded, expected):
    """stream=True through the openai client: server-sent chunks per choice, arriving as the worker
    decodes (more chunks than choices), adding up to the non-streamed text, each choice ending with
    its finish_reason; with a stop string too."""
    openai = pytest.importorskip("openai")
    with live_server(make_app(loaded)) as (_, _, url):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        texts, reasons, chunks = {}, {}, 0
        for event in client.completions.create(model="alpha", prompt=SOURCES, max_tokens=8, temperature=0,
                                               stream=True):  # fmt: skip
            for choice in event.choices:
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                chunks += 1
                if choice.finish_reason is not None:
                    assert choice.index not in reasons
                    reasons[choice.index] = choice.finish_reason
        assert [texts[i] for i in range(len(SOURCES))] == [expected["alpha"][s] for s in SOURCES]
        assert set(reasons) == set(range(len(SOURCES))) and set(reasons.values()) <= {"stop", "length"}
        assert chunks > 2 * len(SOURCES)  # pieces as they were decoded, not one block per choice

        text = expected["gamma"][SOURCES[2]]
        stop = text[len(text) // 2 :]
        pieces = client.completions.create(model="gamma", prompt=SOURCES[2], max_tokens=8, temperature=0,
                                           stop=stop, stream=True)  # fmt: skip
        streamed = [(c.text, c.finish_reason) for event in pieces for c in event.choices]
        assert "".join(t for t, _ in streamed) == text[: text.find(stop)]
        assert streamed[-1][1] == "stop"


def test_a_stream_interval_sends_fewer_longer_pieces(loaded, expected):
    """--stream-interval-ms: the first token at once, the rest handed to the stream at most that
    often and at the end: fewer streamed pieces, adding up to the same text; 0 hands every step."""
    openai = pytest.importorskip("openai")
    counts = {}
    for interval in (0.0, 60_000.0):
        with live_server(make_app(loaded, stream_interval_ms=interval)) as (_, _, url):
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            events = list(client.completions.create(model="beta", prompt=SOURCES[:2], max_tokens=8, temperature=0,
                                                    stream=True))  # fmt: skip
        pieces = [c for event in events for c in event.choices if c.text]
        for i in range(2):
            assert "".join(c.text for c in pieces if c.index == i) == expected["beta"][SOURCES[i]]
        counts[interval] = max(sum(c.index == i for c in pieces) for i in range(2))
    assert counts[60_000.0] <= 3 < counts[0.0], counts  # first token, the rest, the final text


@pytest.mark.parametrize("continuous", [False, True], ids=["waves", "continuous"])
def test_a_client_that_leaves_a_stream_frees_its_rows(loaded, continuous):
    """The model told never to end (EOS suppressed) and 500 tokens asked: the client reads one chunk
    and disconnects; the worker stops decoding its rows within a few steps instead of running on."""
    from flantune.continuous import Slots

    model, tokenizer = loaded[0], loaded[1]
    steps = []
    real = serve.generate_outputs
    real_step = Slots.step

    def counting(*args, on_step, **kwargs):
        def step(t, rows, tokens):
            steps.append(t)
            time.sleep(0.005)  # a step slow enough that the disconnect arrives mid-generation
            on_step(t, rows, tokens)

        return real(*args, on_step=step, **kwargs)

    def counting_step(self, *args):
        steps.append(len(steps))
        time.sleep(0.005)
        return real_step(self, *args)

    gen = model.generation_config
    gen.suppress_tokens = [tokenizer.eos_token_id]
    try:
        with pytest.MonkeyPatch.context() as patch:
            if continuous:
                patch.setattr(Slots, "step", counting_step)
            else:
                patch.setattr(serve, "generate_outputs", counting)
            app = make_app(loaded, continuous=continuous)
            with live_server(app) as (_, _, url), httpx.Client(timeout=30) as client:
                body = {"model": "alpha", "prompt": "copy: x y", "max_tokens": 500, "temperature": 0, "stream": True}
                with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    first = next(response.iter_lines())
                    assert first.startswith("data: {")
                deadline = time.monotonic() + 10
                while loaded_worker_running(url) and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert client.get(f"{url}/v1/models").status_code == 200  # the server lives on
    finally:
        gen.suppress_tokens = None
    assert 0 < len(steps) < 250, len(steps)  # stopped long before its 500 steps


def loaded_worker_running(url: str) -> bool:
    metrics = httpx.get(f"{url}/metrics").text
    return "flantune_running_batch_inputs 0.0" not in metrics


def test_continuous_batching_rows_join_a_running_batch_and_leave_when_done(loaded):
    """A long request for alpha is decoding (EOS suppressed, 200 tokens, slow steps); a short request
    for beta arrives, joins the running batch at the next step, shares its steps (two requests, two
    models) and is answered while the long one still runs, with what beta alone generates."""
    model, tokenizer = loaded[0], loaded[1]
    gen = model.generation_config
    gen.suppress_tokens = [tokenizer.eos_token_id]
    try:
        model.set_adapter("beta")
        want = generate_texts(model, tokenizer, [SOURCES[1]], GenerationConfig(max_new_tokens=5))
        model.set_adapter("alpha")
        with pytest.MonkeyPatch.context() as patch:
            slow_steps(patch, 0.01)
            app = make_app(loaded, batch_wait_ms=0)
            worker = app.state.service.worker
            assert isinstance(worker, serve.ContinuousWorker)
            with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
                long = pool.submit(ask, client, "alpha", [SOURCES[0]], max_new_tokens=200)
                wait_until_decoding(worker)
                short = ask(client, "beta", [SOURCES[1]], max_new_tokens=5)
                assert not long.done(), "the short request waited for the long one"
                assert short.status_code == 200
                assert short.json()["outputs"] == want
                assert short.json()["batch"] == {"requests": 2, "inputs": 2, "models": 2}
                assert long.result().status_code == 200
                assert long.result().json()["output_tokens"][0] > 5
    finally:
        gen.suppress_tokens = None
        model.set_adapter("alpha")


def test_a_request_larger_than_the_continuous_batch_is_answered(loaded, expected):
    """More inputs than the continuous batch holds (max_batch 2, 5 inputs): the request runs apart,
    in batches of its own, and is answered as direct generation answers it."""
    with TestClient(make_app(loaded, max_batch=2)) as client:
        assert isinstance(client.app.state.service.worker, serve.ContinuousWorker)
        answer = ask(client, "gamma", SOURCES)
        assert answer.status_code == 200
        assert answer.json()["outputs"] == [expected["gamma"][s] for s in SOURCES]


def test_a_bart_model_is_served_with_continuous_batching(bart_path):
    """BART decodes in the continuous batch too (learned positions per row): the completions equal
    direct generation with the engine."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from .conftest import tiny_config

    cfg = tiny_config(bart_path)
    cfg.update({"init_std": 0.3})
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    tokenizer = AutoTokenizer.from_pretrained(bart_path)
    want = generate_texts(model, tokenizer, SOURCES, CFG)
    service = Service(model, tokenizer, base="tiny-bart", kinds={}, limits=Limits())
    assert isinstance(service.worker, serve.ContinuousWorker)
    with TestClient(create_app(service)) as client, ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda source: client.post("/v1/completions", json={
            "model": "tiny-bart", "prompt": source, "max_tokens": 8, "temperature": 0}).json(), SOURCES))  # fmt: skip
    assert [a["choices"][0]["text"] for a in answers] == want
    assert len(set(want)) > 1
    # BART forces EOS at the cap: batched in waves, requests of other caps do not share a batch.
    assert not service.worker.caps_mix and model.generation_config.forced_eos_token_id is not None


def test_continuous_rows_apply_processors_that_read_their_history(loaded):
    """Repetition penalty and no-repeat n-grams read each row's ids so far: in the continuous batch
    (kept on the device per request) they answer as direct generation does."""
    model, tokenizer = loaded[0], loaded[1]
    options = {"max_new_tokens": 24, "no_repeat_ngram_size": 1}  # no token twice in a row's output
    gen = model.generation_config
    gen.suppress_tokens = [tokenizer.eos_token_id]  # outputs run to the cap: long histories
    try:
        model.set_adapter("gamma")
        want = generate_texts(model, tokenizer, SOURCES, GenerationConfig(**options))
        plain = generate_texts(model, tokenizer, SOURCES, GenerationConfig(max_new_tokens=24))
        model.set_adapter("alpha")
        assert want != plain  # the processor changes these outputs
        with TestClient(make_app(loaded)) as client:
            assert isinstance(client.app.state.service.worker, serve.ContinuousWorker)
            answer = ask(client, "gamma", SOURCES, **options)
    finally:
        gen.suppress_tokens = None
        model.set_adapter("alpha")
    assert answer.json()["outputs"] == want


def test_requests_arriving_while_a_batch_decodes_share_one_encoder_pass(loaded):
    """While a long request decodes (slow steps), two requests that arrive 30 ms apart, within
    batch_wait_ms (300 ms), join in one encoder pass; an idle batch admits its first request at once.
    Both answers are what each alone generates."""
    model, tokenizer = loaded[0], loaded[1]
    real_admit = serve.ContinuousWorker._admit
    admitted = []

    def admit(self, jobs, engine):
        admitted.append(sorted(job.adapter for job in jobs))
        return real_admit(self, jobs, engine)

    gen = model.generation_config
    gen.suppress_tokens = [tokenizer.eos_token_id]
    try:
        want = {}
        for name in ("beta", "gamma"):
            model.set_adapter(name)
            want[name] = generate_texts(model, tokenizer, [SOURCES[1]], GenerationConfig(max_new_tokens=5))
        model.set_adapter("alpha")
        with pytest.MonkeyPatch.context() as patch:
            slow_steps(patch, 0.01)
            patch.setattr(serve.ContinuousWorker, "_admit", admit)
            app = make_app(loaded, batch_wait_ms=300)
            worker = app.state.service.worker
            with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
                long = pool.submit(ask, client, "alpha", [SOURCES[0]], max_new_tokens=100)
                wait_until_decoding(worker)
                first = pool.submit(ask, client, "beta", [SOURCES[1]], max_new_tokens=5)
                time.sleep(0.03)
                second = pool.submit(ask, client, "gamma", [SOURCES[1]], max_new_tokens=5)
                assert first.result().json()["outputs"] == want["beta"]
                assert second.result().json()["outputs"] == want["gamma"]
                assert long.result().status_code == 200
    finally:
        gen.suppress_tokens = None
        model.set_adapter("alpha")
    assert admitted == [["alpha"], ["beta", "gamma"]], admitted


def test_rows_warped_together_equal_transformers_warpers_row_by_row():
    """warp_rows: each row's scores equal what transformers' temperature, top-k and top-p warpers
    make of that row alone with its own settings, including ties at the k-th value and rows with
    no filter."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    settings = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.9), (0.5, 40, 0.8), (2.0, 3, 0.5),
                (1.0, 200, 0.95), (0.9, 1, 1.0)]  # fmt: skip
    scores = torch.randn(len(settings), 200) * 3
    scores[2, :8] = scores[2].max() + 1  # 8 tied at the top, top-k 5 keeps all 8 (as transformers does)
    temperature, top_k, top_p = (torch.tensor(column) for column in zip(*settings, strict=True))
    ours = serve.warp_rows(scores.clone(), temperature.float(), top_k.long(), top_p.float())
    for row, (t, k, p) in enumerate(settings):
        warpers = LogitsProcessorList()
        if t != 1.0:
            warpers.append(TemperatureLogitsWarper(t))
        if k:
            warpers.append(TopKLogitsWarper(k))
        if p < 1.0:
            warpers.append(TopPLogitsWarper(p))
        expected = warpers(torch.zeros(1, 1, dtype=torch.long), scores[row : row + 1].clone())[0]
        assert torch.equal(ours[row].isinf(), expected.isinf()), row  # the same tokens kept
        torch.testing.assert_close(ours[row], expected, rtol=1e-6, atol=0), row
    assert int((~ours[2].isinf()).sum()) == 8 and int((~ours[7].isinf()).sum()) == 1


def test_sampled_rows_of_several_requests_share_a_step(loaded, expected):
    """Requests sampling with their own settings share the continuous steps with greedy ones: top-k 1
    is greedy whatever the temperature (so its answer is the greedy one), and rows at a very low
    temperature with top-p 0.5 keep only the most likely token too."""
    with pytest.MonkeyPatch.context() as patch:
        slow_steps(patch, 0.005)
        app = make_app(loaded)
        with TestClient(app) as client, ThreadPoolExecutor(3) as pool:
            asks = [
                pool.submit(ask, client, "alpha", SOURCES[:2]),
                pool.submit(ask, client, "beta", SOURCES[:2], do_sample=True, temperature=1.7, top_k=1),
                pool.submit(ask, client, "gamma", SOURCES[:2], do_sample=True, temperature=0.01, top_p=0.5),
            ]
            answers = [done.result() for done in asks]
    assert all(answer.status_code == 200 for answer in answers), [a.text for a in answers]
    for answer, name in zip(answers, ("alpha", "beta", "gamma"), strict=True):
        assert answer.json()["outputs"] == [expected[name][s] for s in SOURCES[:2]], name
    assert max(answer.json()["batch"]["requests"] for answer in answers) >= 2  # they shared steps
