"""flantune export --to ctranslate2: a LoRA run merged and converted answers as flantune does.

The reference is flantune's own decoding engine on the unmerged adapter model (the run's final/ as
`flantune generate` loads it): the float32 CTranslate2 model's greedy tokens must be the same, and
its scores of them the same log-probabilities.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    MinNewTokensLengthLogitsProcessor,
    MT5Config,
    T5Config,
    UMT5Config,
)
from typer.testing import CliRunner

from flantune import engine
from flantune.cli import app
from flantune.export import ExportError, to_ctranslate2
from flantune.final import BaseRecord, load_final, write_final
from flantune.models import add_special_tokens, fit_embeddings, load_model, load_tokenizer

from .test_train import tiny_model_dir

# The test extra installs it (CI's install fails without it); a machine without it skips, saying so.
ctranslate2 = pytest.importorskip("ctranslate2", reason="ctranslate2 (the test extra) is not installed")

N = 12
"""Greedy tokens compared a row: the cap ends most rows (random weights seldom pick EOS; the random
BART's may pick it at once)."""
SOURCES = ["reverse: apple pear plum", "copy: one two <answer>", "a longer source of several words to read"]


def export(*args: str):
    """`flantune export ...` in-process (the typer app the `flantune` script runs)."""
    return CliRunner().invoke(app, ["export", *map(str, args)])


def lora_final(folder: Path, asset: str) -> Path:
    """A LoRA result on a tiny random-weight model of `asset`'s shape, written as a run writes its
    final/. The adapter starts random (a fresh one is the identity) so that it moves the answers,
    and an added token grows the embeddings past the tokenizer's vocabulary."""
    model_dir = tiny_model_dir(folder / "model", asset)
    tokenizer = load_tokenizer(str(model_dir))
    new_ids = add_special_tokens(tokenizer, ["<answer>"])
    model = load_model(str(model_dir), init="random", seed=0)
    fit_embeddings(model, tokenizer, new_ids)
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    record = BaseRecord(path=str(model_dir), init="random", seed=0)
    write_final(model, tokenizer, folder / "final", "lora", record)
    return folder / "final"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, t5_small_path, bart_path):
    """{arch: (final/, its float32 export through the command line)} for FLAN-T5 and BART."""
    result = {}
    for arch, asset in (("t5", t5_small_path), ("bart", bart_path)):
        folder = tmp_path_factory.mktemp(arch)
        final = lora_final(folder, asset)
        run = export(
            final, "--to", "ctranslate2", "--quantization", "float32", "--out", folder / "exports" / "ct2"
        )
        assert run.exit_code == 0, run.output
        # Nothing but the export is left beside it: no merged model, no temporary folder.
        assert [p.name for p in (folder / "exports").iterdir()] == ["ct2"]
        result[arch] = (final, folder / "exports" / "ct2")
    return result


def greedy_reference(model, tokenizer, sources: list[str], min_tokens: int) -> list[list[int]]:
    """flantune's greedy tokens, EOS included when the model ends a row, at most N a row.

    One step more than N is decoded and cut: BART's generation config forces EOS at the last step,
    a rule of transformers' generation config that CTranslate2 does not apply.
    """
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    # EOS held back for the first min_tokens steps (the start token is not counted), as
    # CTranslate2's min_decoding_length does.
    at_least = (
        [MinNewTokensLengthLogitsProcessor(1, min_tokens, tokenizer.eos_token_id)] if min_tokens else None
    )
    sequences = engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=N + 1,
                                logits_processor=at_least).sequences  # fmt: skip
    rows = []
    for ids in sequences[:, 1:].tolist():  # after the decoder start token
        if tokenizer.eos_token_id in ids:
            ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
        rows.append(ids[:N])
    return rows


@torch.no_grad()
def log_probs(model, input_ids: list[int], start: int, target: list[int]) -> torch.Tensor:
    """log p(target[t] | source, target[:t]) under `model`, teacher-forced: (T,)."""
    decoder_ids = torch.tensor([[start, *target[:-1]]])
    logits = model(input_ids=torch.tensor([input_ids]), decoder_input_ids=decoder_ids).logits  # (1, T, V)
    return torch.log_softmax(logits[0].float(), dim=-1).gather(1, torch.tensor(target)[:, None]).squeeze(1)


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_float32_export_answers_as_flantune(arch, exported):
    final, out = exported[arch]
    tokenizer = AutoTokenizer.from_pretrained(out)  # the export carries its tokenizer
    vocabulary = json.loads((out / "shared_vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(vocabulary)}
    assert len(index) == len(vocabulary), "every embedding row has its own token"
    assert vocabulary[: len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))

    loaded = load_final(str(final), device="cpu")  # the adapter unmerged, as flantune generate loads it
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type="float32", intra_threads=1)
    sources = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(SOURCES)["input_ids"]]
    # Free decoding (EOS may come first, as in flantune and transformers), then EOS held back for N
    # tokens: random weights may end a row at once (the random BART does), which compares little.
    for min_tokens in (0, N):
        results = translator.translate_batch(
            sources, beam_size=1, max_decoding_length=N, min_decoding_length=min_tokens, return_end_token=True
        )
        got = [[index[token] for token in r.hypotheses[0]] for r in results]
        assert got == greedy_reference(loaded.model, loaded.tokenizer, SOURCES, min_tokens), min_tokens
    assert all(len(ids) == N for ids in got)

    # The scores, not only the argmax: a wrong output scale (T5) would keep the greedy tokens.
    start = loaded.model.config.decoder_start_token_id
    scored = translator.score_batch(sources, [r.hypotheses[0] for r in results])
    for source, ids, score in zip(SOURCES, got, scored, strict=True):
        target = [*ids, tokenizer.eos_token_id]  # CTranslate2 scores the EOS after the tokens
        source_ids = tokenizer(source)["input_ids"]
        reference = log_probs(loaded.model, source_ids, start, target)
        torch.testing.assert_close(torch.tensor(score.log_probs), reference, atol=1e-4, rtol=0)
        with loaded.model.disable_adapter():  # the test can fail: the adapter moves these scores
            assert (log_probs(loaded.model, source_ids, start, target) - reference).abs().max() > 1e-2


@pytest.mark.parametrize("variant", ["t5", "mt5", "umt5"])
def test_full_model_folders_keep_their_output_scale(variant, t5_small_path, tmp_path):
    """A full model converts as it is. Original T5 (and UMT5) scale the decoder output by
    d_model**-0.5 before the head, mT5 does not (FLAN-T5, which does not either, is above): the
    export's scores are transformers' for each."""
    shape = dict(vocab_size=32128, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                 d_kv=16, decoder_start_token_id=0)  # fmt: skip
    config = {"t5": T5Config, "mt5": MT5Config, "umt5": UMT5Config}[variant](**shape)
    torch.manual_seed(0)
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(t5_small_path).save_pretrained(tmp_path / "model")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "model").eval()
    if variant == "t5":
        assert model.config.scale_decoder_outputs  # a T5Config that does not say otherwise: original T5
    to_ctranslate2(str(tmp_path / "model"), str(tmp_path / "ct2"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ct2")
    translator = ctranslate2.Translator(
        str(tmp_path / "ct2"), device="cpu", compute_type="float32", intra_threads=1
    )
    source_ids = tokenizer(SOURCES[0])["input_ids"]
    source = tokenizer.convert_ids_to_tokens(source_ids)
    tokens = translator.translate_batch([source], beam_size=1, max_decoding_length=6, min_decoding_length=6)
    hypothesis = tokens[0].hypotheses[0]
    vocabulary = json.loads((tmp_path / "ct2" / "shared_vocabulary.json").read_text())
    index = {token: i for i, token in enumerate(vocabulary)}
    target = [*(index[token] for token in hypothesis), tokenizer.eos_token_id]
    scored = translator.score_batch([source], [hypothesis])[0].log_probs
    reference = log_probs(model, source_ids, model.config.decoder_start_token_id, target)
    torch.testing.assert_close(torch.tensor(scored), reference, atol=1e-4, rtol=0)


def test_int8_export(exported, tmp_path):
    """int8 weights: smaller, and the model answers in the same form (its tokens may differ)."""
    final, float32 = exported["t5"]
    result = export(final, "--to", "ctranslate2", "--quantization", "int8", "--out", tmp_path / "int8")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "int8" / "model.bin").stat().st_size < 0.5 * (float32 / "model.bin").stat().st_size
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "int8")
    translator = ctranslate2.Translator(
        str(tmp_path / "int8"), device="cpu", compute_type="int8", intra_threads=1
    )
    sources = [tokenizer.convert_ids_to_tokens(ids) for ids in tokenizer(SOURCES)["input_ids"]]
    results = translator.translate_batch(sources, beam_size=1, max_decoding_length=N, min_decoding_length=N,
                                         return_scores=True)  # fmt: skip
    vocabulary = set(json.loads((tmp_path / "int8" / "shared_vocabulary.json").read_text()))
    assert len(results) == len(SOURCES)
    for r in results:
        assert len(r.hypotheses) == 1 and len(r.hypotheses[0]) == N
        assert set(r.hypotheses[0]) <= vocabulary and r.scores[0] < 0


def test_export_errors(tmp_path, monkeypatch):
    """One message, exit status 2, nothing of the user's overwritten and nothing left behind."""
    empty = tmp_path / "empty"
    empty.mkdir()
    bottleneck = tmp_path / "bottleneck"
    bottleneck.mkdir()
    (bottleneck / "adapter_config.json").write_text(json.dumps({"kind": "bottleneck"}))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 8}))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        ([empty, "--to", "ctranslate2"], ["empty: not a model or adapter folder"]),
        ([gpt2, "--to", "onnx"], ["--to onnx", "ctranslate2"]),
        ([gpt2, "--to", "ctranslate2", "--quantization", "int4"], ["--quantization int4", "int8_float16"]),
        ([gpt2, "--to", "ctranslate2", "--out", taken], ["taken exists and is not empty", "--out"]),
        ([gpt2, "--to", "ctranslate2", "--base", gpt2], ["--base and --other-base are for an adapter"]),
        ([bottleneck, "--to", "ctranslate2", "--out", tmp_path / "out"], ["bottleneck", "cannot be folded"]),
        ([gpt2, "--to", "ctranslate2", "--out", tmp_path / "out"], ["a gpt2 model", "t5", "bart"]),
        ([broken, "--to", "ctranslate2", "--out", tmp_path / "out"], ["broken: cannot read its config.json"]),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, expected in cases:
        result = export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert all(fragment in result.output for fragment in expected), (args, result.output)
        assert "Traceback" not in result.output
    assert (taken / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .merged-* or .tmp-* folder left

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # the package not installed
    with pytest.raises(ExportError, match=r"pip install 'flantune\[ctranslate2\]'"):
        to_ctranslate2(str(gpt2), str(tmp_path / "out"))
