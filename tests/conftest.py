"""Shared fixtures. Tests never reach a hub: models come from ../shared/assets, data from files.

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


def load_for_generation(model: str, adapter: str | None = None, device: str = "cpu", recorded_by=None):
    """(model, tokenizer) as `flantune generate MODEL [--adapter ADAPTER]` loads them."""
    from flantune.final import load_final

    if adapter:
        loaded = load_final({"default": adapter}, base=model, device=device, what="--adapter")
    else:
        loaded = load_final(model, device=device, recorded_by=recorded_by, what="--model")
    return loaded.model, loaded.tokenizer
