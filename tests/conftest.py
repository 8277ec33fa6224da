"""Shared fixtures. Tests never reach a hub: models come from ../shared/assets, data from files.

Every test says which device it is about. Unmarked tests are about the CPU, CI's device: on a
machine with a GPU they still run on the CPU (CUDA is hidden from them and from the processes they
start), so they check the same numbers everywhere. Tests marked `cuda` run on the GPU (and skip
without one): `pytest -m cuda` runs them alone. Every test starts from a fresh Accelerate state, so
that no test depends on what ran before it.

Tests that need ../shared (the FLAN-T5 and BART configs and tokenizers, the SciQ rows) skip, saying
what is missing, where it is absent. With FLANTUNE_REQUIRE_SHARED=1 (CI sets it in .ci/run) they fail
instead: a green run has run them all.
"""

import os

# Before transformers/datasets are imported anywhere: fail fast instead of trying the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ASSETS = SHARED / "assets"
SCIQ = SHARED / "data" / "sciq" / "valid.json"
REQUIRE_SHARED = os.environ.get("FLANTUNE_REQUIRE_SHARED", "") not in ("", "0")


def need(path: Path) -> Path:
    """`path` under ../shared, or a skip (a failure under FLANTUNE_REQUIRE_SHARED=1) that names it."""
    path = Path(path)
    if path.exists():
        return path
    missing = (
        f"{os.path.normpath(path)} is not present: the shared test assets (FLAN-T5 and BART configs and tokenizers, SciQ rows) "
        f"belong in {SHARED}, beside the repository"
    )
    if REQUIRE_SHARED:
        pytest.fail(f"FLANTUNE_REQUIRE_SHARED=1 and {missing}", pytrace=False)
    pytest.skip(f"{missing} (FLANTUNE_REQUIRE_SHARED=1 makes this a failure)")


# Under pytest-xdist each worker gets its share of the cores: torch's default of one thread per core
# in every worker oversubscribes the machine many times over (12 workers on 16 cores ran the CPU
# training fixtures past 150 s each). Set before torch is imported, so it holds for its thread pools
# and for the processes the tests start.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# The cores this process may run on (a container's cpuset), not the host's count.
_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, _CORES // _WORKERS)))

_DEVICE_PIN = pytest.StashKey[pytest.MonkeyPatch]()


def pytest_sessionstart(session):
    """CUDA initialised once, with the GPUs visible, before any test hides them. The CUDA runtime
    reads CUDA_VISIBLE_DEVICES when it starts and keeps its device count for the life of the process:
    started under a CPU test's pin (CUDA_VISIBLE_DEVICES="") it would see no GPU for the rest of the
    session, and every `cuda` test after that CPU test would skip (as they did in a whole-suite run
    on the GPU machine). The pin below hides the GPU from CPU tests by patching torch's queries and
    from the processes they start by the environment variable."""
    import torch

    if torch.cuda.device_count():  # NVML's count: it does not start the runtime
        torch.cuda.init()
        # Once the runtime has started torch caches the count at its next query, and (torch 2.11) it
        # counts through NVML, which reads CUDA_VISIBLE_DEVICES at the time: queried first inside a
        # CPU test's pin (by code that holds its own reference to device_count, which the pin does
        # not patch) it would cache 0 for the session. Queried here it caches the GPUs.
        torch.cuda.device_count()
        # The same for inductor's "is there a GPU Triton can use", cached for the process at its
        # first call: made first by a compiled CPU test it answers no, and every compile for CUDA
        # after it fails with TritonMissing.
        from torch.utils._triton import has_triton

        has_triton()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    """The test's device, pinned before any of its fixtures is made (module- and session-scoped ones
    too, which a function-scoped fixture would come after): CUDA for tests marked `cuda`, else the
    CPU, with CUDA hidden here and in the processes the test starts. A fixture shared by a module is
    made under the device of the first test that asks for it."""
    import torch

    pin = item.stash[_DEVICE_PIN] = pytest.MonkeyPatch()
    if not item.get_closest_marker("cuda"):
        pin.setattr(torch.cuda, "is_available", lambda: False)
        pin.setattr(torch.cuda, "device_count", lambda: 0)
        pin.setenv("CUDA_VISIBLE_DEVICES", "")
    yield


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_runtest_teardown(item):
    yield
    if _DEVICE_PIN in item.stash:
        item.stash[_DEVICE_PIN].undo()


@pytest.fixture(autouse=True)
def pinned_device(request):
    """Skips a `cuda` test without a GPU; resets Accelerate's process-wide state around every test."""
    import torch
    from accelerate.state import AcceleratorState, GradientState

    if request.node.get_closest_marker("cuda") and not torch.cuda.is_available():
        pytest.skip("marked cuda: needs a CUDA device")
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def in_repo(monkeypatch):
    """Run from the repository root, where recipes' relative paths (../shared/...) resolve."""
    monkeypatch.chdir(ROOT)
    return ROOT


@pytest.fixture(scope="session")
def t5_small_path() -> str:
    return str(need(ASSETS / "flan-t5-small"))


@pytest.fixture(scope="session")
def bart_path() -> str:
    return str(need(ASSETS / "bart-base"))


@pytest.fixture(scope="session")
def t5_tokenizer(t5_small_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(t5_small_path)


@pytest.fixture(scope="session")
def bart_tokenizer(bart_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bart_path)


def tiny_config(path: str, vocab_size: int | None = None):
    """The published architecture of `path`, shrunk to a width of 32 and 2+2 layers."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    if cfg.model_type == "t5":
        cfg.update(dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=16))
    else:
        cfg.update(
            dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                 decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64)
        )  # fmt: skip
    if vocab_size:
        cfg.vocab_size = vocab_size
    return cfg


def load_for_generation(
    model: str, adapter: str | None = None, device: str = "cpu", recorded_by=None, other_base: bool = False
):
    """(model, tokenizer) as `flantune generate MODEL [--adapter ADAPTER] [--other-base]` loads them."""
    from flantune.final import load_final

    if adapter:
        loaded = load_final(
            {"default": adapter}, base=model, device=device, what="--adapter", other_base=other_base
        )
    else:
        loaded = load_final(model, device=device, recorded_by=recorded_by, what="--model")
    return loaded.model, loaded.tokenizer


def free_port() -> str:
    """A TCP port free now, for `accelerate launch --main_process_port`: two multi-process tests
    running at once (pytest -n) must not both wait on Accelerate's default port 29500."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])
