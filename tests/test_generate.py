"""Generation: batching keeps order, every option works, outputs can be restricted to labels,
and bad input gives clear errors."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flantune.config import GenerationConfig
from flantune.decoding import decode, generate_texts
from flantune.generate import GenerateError, read_inputs
from flantune.models import ModelLoadError

from .conftest import ROOT, load_for_generation, tiny_config

SOURCES = [
    "question: is the sky blue?",
    "a",
    "sentiment analysis: a long and winding review of a film " * 3,
    "b c",
]


def saved_model(folder, asset):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(asset))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(asset).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["t5", "bart"])
def model_dir(request, tmp_path_factory, t5_small_path, bart_path):
    return saved_model(
        tmp_path_factory.mktemp(request.param), t5_small_path if request.param == "t5" else bart_path
    )


def test_batches_by_length_keep_the_callers_order(model_dir):
    model, tokenizer = load_for_generation(str(model_dir))
    cfg = GenerationConfig(max_new_tokens=6)
    one_by_one = [generate_texts(model, tokenizer, [s], cfg)[0] for s in SOURCES]
    assert generate_texts(model, tokenizer, SOURCES, cfg, batch_size=3) == one_by_one


def test_stop_ends_generation_at_the_next_step(tmp_path, t5_small_path):
    """`stop` is asked after each decoding step: True ends every row there. (The tiny random T5
    rarely emits EOS, so without it the rows run to the cap.)"""
    model, tokenizer = load_for_generation(str(saved_model(tmp_path / "t5", t5_small_path)))
    cfg = GenerationConfig(max_new_tokens=16)
    asked = []

    def stop_at_third_step():
        asked.append(1)
        return len(asked) >= 3

    full = generate_texts(model, tokenizer, SOURCES, cfg, stop=lambda: False)
    stopped = generate_texts(model, tokenizer, SOURCES, cfg, batch_size=len(SOURCES), stop=stop_at_third_step)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (*full, *stopped)]
    # Re-tokenizing decoded text may count one token more than were generated (16 and 3 here).
    assert min(lengths[: len(SOURCES)]) >= 15 and max(lengths[len(SOURCES) :]) <= 4
    assert len(asked) == 3


@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 3, "early_stopping": True},
        {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
    ],
)
def test_each_option_runs_and_the_cap_holds(options, model_dir):
    model, tokenizer = load_for_generation(str(model_dir))
    torch.manual_seed(0)
    outputs = generate_texts(model, tokenizer, SOURCES, GenerationConfig(max_new_tokens=5, **options))
    assert len(outputs) == len(SOURCES)
    for text in outputs:
        assert len(tokenizer(text_target=text, add_special_tokens=False)["input_ids"]) <= 5 + 2


def test_the_cap_is_ours_not_the_20_token_default(model_dir):
    model, tokenizer = load_for_generation(str(model_dir))
    model.generation_config.max_length = 20  # transformers' silent default
    texts = generate_texts(
        model, tokenizer, SOURCES[:1], GenerationConfig(max_new_tokens=40, repetition_penalty=1.0)
    )
    produced = tokenizer(text_target=texts[0], add_special_tokens=False)["input_ids"]
    # A random model rarely stops on its own: it runs to our cap of 40, past the default of 20.
    assert len(produced) > 20 or texts[0] == ""


def test_label_restricted_decoding(model_dir):
    model, tokenizer = load_for_generation(str(model_dir))
    labels = ["yes", "no", "maybe not", "sentiment: True"]
    for beams in (1, 3):
        outputs = generate_texts(
            model, tokenizer, SOURCES, GenerationConfig(max_new_tokens=10, num_beams=beams), labels=labels
        )
        assert all(o in labels for o in outputs), outputs


def test_decode_keeps_task_tokens(t5_tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(t5_tokenizer.name_or_path)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=True)
    ids = [0, *tokenizer("<think> x </think>", add_special_tokens=False)["input_ids"], 1, 0]
    assert decode(tokenizer, ids).replace(" ", "") == "<think>x</think>"


def test_read_inputs_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(GenerateError, match="holds no input rows"):
        read_inputs(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a"}\n{"source": \n')
    with pytest.raises(GenerateError, match=r"bad.jsonl line 2: malformed JSON"):
        read_inputs(str(bad))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "a"}\n')
    with pytest.raises(
        GenerateError, match=r"line 1: expected an object with a string 'source' \(set --field\)"
    ):
        read_inputs(str(wrong))
    assert read_inputs(str(wrong), field="text") == ["a"]


def test_load_errors(tmp_path, model_dir):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_for_generation(str(tmp_path / "missing"))
    fake_adapter = tmp_path / "adapter"
    fake_adapter.mkdir()
    (fake_adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="does not say its base model"):
        load_for_generation(str(fake_adapter))
    with pytest.raises(ModelLoadError, match="is an adapter folder"):
        load_for_generation(str(fake_adapter), str(fake_adapter))


def test_cli_generate_input_and_file(tmp_path, model_dir):
    """The command in-process (CliRunner: the same typer app the `flantune` script runs)."""
    from typer.testing import CliRunner

    from flantune.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(model_dir), "--input", "hello", "--input", "world",
                                 "--max-new-tokens", "4", "--label", "yes", "--label", "no"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.stdout.splitlines()]
    assert [r["source"] for r in rows] == ["hello", "world"] and all(
        r["output"] in ("yes", "no") for r in rows
    )
    file = tmp_path / "in.jsonl"
    file.write_text('{"source": "one"}\n{"source": "two"}\n')
    out = tmp_path / "out.jsonl"
    result = runner.invoke(
        app, ["generate", str(model_dir), "--file", str(file), "--out", str(out), "--num-beams", "2"]
    )
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 2
    # A bad path through the real script: exit code 2, a message, no traceback.
    bad = subprocess.run([sys.executable, "-m", "flantune.cli", "generate", str(tmp_path / "nope"), "--input", "x"],
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "does not exist" in bad.stderr


def test_adapter_for_another_base_is_refused(tmp_path, t5_small_path, bart_path):
    """An adapter goes on the base recorded beside it: another base, even of the same shape (it
    would answer wrongly without a word), is refused unless --other-base says so; a base it cannot
    fit is then a clear error naming both."""
    from peft import LoraConfig, get_peft_model

    t5 = saved_model(tmp_path / "t5", t5_small_path)
    bart = saved_model(tmp_path / "bart", bart_path)
    torch.manual_seed(1)
    other_t5 = tmp_path / "other-t5"  # the same shape, other weights
    AutoModelForSeq2SeqLM.from_config(tiny_config(t5_small_path)).save_pretrained(other_t5)
    AutoTokenizer.from_pretrained(t5_small_path).save_pretrained(other_t5)
    base = AutoModelForSeq2SeqLM.from_pretrained(t5)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q", "v"])).save_pretrained(tmp_path / "adapter")
    adapter = str(tmp_path / "adapter")
    for other in (other_t5, bart):
        with pytest.raises(
            ModelLoadError,
            match=rf"--adapter: .*adapter was trained on .*t5, not .*{other.name}: .*--other-base",
        ):
            load_for_generation(str(other), adapter)
    model, tokenizer = load_for_generation(str(other_t5), adapter, other_base=True)  # the user says so
    assert generate_texts(model, tokenizer, ["a"], GenerationConfig(max_new_tokens=2))
    load_for_generation(str(t5), adapter)  # the recorded base needs no flag
    with pytest.raises(ModelLoadError, match=r"--adapter: .*adapter does not fit .*bart"):
        load_for_generation(str(bart), adapter, other_base=True)
    cli = [
        sys.executable,
        "-m",
        "flantune.cli",
        "generate",
        str(other_t5),
        "--adapter",
        adapter,
        "--input",
        "a",
    ]
    refused = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "--other-base" in refused.stderr and "Traceback" not in refused.stderr
    allowed = subprocess.run(
        [*cli, "--other-base", "--max-new-tokens", "2"], capture_output=True, text=True, cwd=ROOT
    )
    assert allowed.returncode == 0, allowed.stderr[-2000:]


# ---- sampling from per-row streams (RL) -----------------------------------------------------------


def test_gumbel_noise_is_standard_gumbel_and_a_function_of_its_key():
    from flantune.decoding import gumbel_noise, row_keys

    keys = row_keys(7, torch.arange(64))
    noise = gumbel_noise(keys, 3, 4096)  # (64, 4096)
    # Standard Gumbel: mean = Euler's constant 0.5772, variance pi^2 / 6 = 1.6449.
    assert noise.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert noise.var().item() == pytest.approx(1.6449, abs=0.03)
    assert torch.equal(gumbel_noise(keys[10:12], 3, 4096), noise[10:12])  # a row's noise is its own
    assert not torch.equal(gumbel_noise(keys, 4, 4096), noise)  # each position draws anew
    assert not torch.equal(gumbel_noise(row_keys(8, torch.arange(64)), 3, 4096), noise)  # and each seed


def test_gumbel_noise_is_finite_at_every_hash():
    """The uniforms behind the noise stay strictly inside (0, 1) at the extreme hashes, so no token's
    noise is infinite (an infinite noise would choose its token whatever its probability, a filtered
    one included); and over many steps of a RL-sized batch none is."""
    from flantune.decoding import gumbel_noise, row_keys, uniform_from_bits

    bits = torch.tensor([0, 1, 2**31, 2**32 - 2**9 - 1, 2**32 - 2**9, 2**32 - 1])
    uniform = uniform_from_bits(bits)
    assert bool((uniform > 0).all()) and bool((uniform < 1).all())
    assert torch.isfinite(-torch.log(-torch.log(uniform))).all()
    assert uniform.tolist() == [((int(b) >> 9) + 0.5) / 2**23 for b in bits]  # each exact in float32
    keys = row_keys(0, torch.arange(128))
    # 40 steps of 128 x 32,128: with 24 bits, ~10 infinities were expected
    assert all(torch.isfinite(gumbel_noise(keys, position, 32128)).all() for position in range(1, 41))


def test_keyed_sampling_draws_from_the_filtered_softmax():
    from flantune.decoding import KeyedSampling, row_keys

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    rows = 40_000
    scores = logits.expand(rows, -1).clone()
    ids = torch.zeros(rows, 2, dtype=torch.long)
    for temperature, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.8)):
        out = KeyedSampling(row_keys(0, torch.arange(rows)), temperature=temperature, top_p=top_p)(
            ids, scores
        )
        assert torch.isfinite(out).sum(dim=1).eq(1).all()  # one token left per row
        counts = torch.bincount(out.argmax(dim=1), minlength=5).float() / rows
        expected = torch.softmax(logits / temperature, dim=0)
        if top_p < 1:  # the nucleus: the most likely tokens whose mass reaches top_p, renormalized
            keep = torch.cumsum(expected, 0) - expected < top_p
            expected = torch.where(keep, expected, 0) / expected[keep].sum()
        torch.testing.assert_close(counts, expected, atol=0.01, rtol=0)


def test_sampled_groups_do_not_depend_on_how_prompts_are_split(tmp_path, t5_small_path):
    """Completion j of prompt p is the same whether p is sampled with the others or alone (another
    process's share, another batch): each row's stream is keyed by (seed, p * G + j)."""
    from flantune.decoding import sample_groups

    model_path = saved_model(tmp_path / "t5", t5_small_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)

    def sample(prompts, first_row, seed=3):
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        out = sample_groups(model, enc["input_ids"], enc["attention_mask"], group_size=4, first_row=first_row,
                            seed=seed, max_new_tokens=6)  # fmt: skip
        return [decode(tokenizer, ids) for ids in out.tolist()]

    together = sample(SOURCES, 0)
    apart = sample(SOURCES[:1], 0) + sample(SOURCES[1:3], 1) + sample(SOURCES[3:], 3)
    assert together == apart
    assert len(set(together[:4])) > 1  # a group's completions differ: they are samples, not copies
    assert sample(SOURCES, 0, seed=4) != together


@pytest.mark.cuda
def test_gumbel_noise_is_the_same_on_the_gpu():
    """The streams are integer hashes, equal bit for bit on the CPU and the GPU; the float transform
    to Gumbel noise may round the last bit differently (each device's own log)."""
    from flantune.decoding import _mix32, gumbel_noise, row_keys

    keys = row_keys(11, torch.arange(0, 4096, 7))
    assert torch.equal(row_keys(11, torch.arange(0, 4096, 7).cuda()).cpu(), keys)
    assert torch.equal(_mix32(keys.cuda()).cpu(), _mix32(keys))
    for position in (1, 17):
        torch.testing.assert_close(gumbel_noise(keys.cuda(), position, 32128).cpu(), gumbel_noise(keys, position, 32128),
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.cuda
def test_compiled_uniforms_equal_the_eager_ones_bit_for_bit():
    """RL's keyed uniforms compiled by inductor (gumbel_noise(compiled=True), CUDA) are the eager
    ones bit for bit, at several positions (one compilation: dynamic shapes) and for a compacted
    batch's rows; so is the noise made from them."""
    from flantune import decoding

    keys = decoding.row_keys(5, torch.arange(0, 128 * 7, 7)).cuda()
    for position in (1, 2, 33):
        compiled = decoding._compiled_uniforms()(keys, position, 32128)
        assert torch.equal(compiled, decoding.keyed_uniforms(keys, position, 32128))
    rows = torch.tensor([3, 64, 127], device="cuda")
    assert torch.equal(decoding.gumbel_noise(keys[rows], 9, 32128, compiled=True),
                       decoding.gumbel_noise(keys[rows], 9, 32128))  # fmt: skip


@pytest.mark.cuda
def test_sampled_groups_on_the_gpu_through_the_compiled_step(tmp_path, t5_small_path, monkeypatch):
    """RL's sampling on a GPU through the captured step compiled by inductor (engine.COMPILE_STEP,
    float32): the same completions as the step run eagerly, every step (the keyed streams make the
    samples comparable)."""
    from flantune import engine
    from flantune.decoding import sample_groups

    model_path = saved_model(tmp_path / "t5", t5_small_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_path).eval().cuda()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    enc = tokenizer(SOURCES, return_tensors="pt", padding=True).to("cuda")
    options = dict(group_size=4, first_row=0, seed=3, max_new_tokens=6)
    monkeypatch.setattr(engine, "COMPILE_STEP", True)
    torch._dynamo.reset()
    engine.clear_graphs()
    try:
        compiled = sample_groups(model, enc["input_ids"], enc["attention_mask"], **options)
        (entry,) = engine._GRAPHS.values()
        assert entry.compiled and entry.graph is not None
        real = engine.generate
        monkeypatch.setattr(engine, "generate", lambda *a, **k: real(*a, **{**k, "graphs": False}))
        eager = sample_groups(model, enc["input_ids"], enc["attention_mask"], **options)
    finally:
        torch._dynamo.reset()
        engine.clear_graphs()
    assert torch.equal(compiled, eager), (compiled, eager)


def test_auto_rows_fill_a_share_of_free_gpu_memory(monkeypatch, t5_small_path, bart_path):
    """batch_size "auto": 32 on the CPU; on a GPU the largest power of two whose caches fit a quarter
    of the free memory, at most 128 (the device is mocked: the rows are a function of the numbers)."""
    from flantune import decoding

    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 10 * free["bytes"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    for asset in (t5_small_path, bart_path):
        model = AutoModelForSeq2SeqLM.from_config(tiny_config(asset))
        assert decoding.auto_rows(model, 512, 32) == decoding.AUTO_ROWS_CPU
        config = model.config
        heads, head_dim = 2, 16
        layers = 2
        # One row's engine caches at 512 sources and 64 cache slots (32 new tokens, rounded up), float32.
        cache = layers * 2 * heads * head_dim * (512 + 64) * 4
        free["bytes"] = 10**12
        assert decoding.auto_rows(model, 512, 32, device="cuda") == decoding.AUTO_ROWS_CAP
        per_row_least = 2 * cache + config.vocab_size * 16  # the caches twice and the float32 scores
        free["bytes"] = 4 * 10 * per_row_least  # a quarter holds fewer than 10 rows
        rows = decoding.auto_rows(model, 512, 32, device="cuda")
        assert rows in (1, 2, 4, 8) and rows * per_row_least <= free["bytes"] / 4
        assert decoding.auto_rows(model, 512, 32, num_beams=4, device="cuda") <= max(rows // 4, 1)
        free["bytes"] = 1
        assert decoding.auto_rows(model, 512, 32, device="cuda") == 1


def test_auto_batches_equal_fixed_batches(model_dir):
    model, tokenizer = load_for_generation(str(model_dir))
    cfg = GenerationConfig(max_new_tokens=6)
    assert generate_texts(model, tokenizer, SOURCES, cfg, batch_size="auto") == generate_texts(
        model, tokenizer, SOURCES, cfg, batch_size=1
    )
