"""The decoding engine (flantune.engine) against transformers' generate and a teacher-forced forward:
greedy ids token for token, with LoRA, label restriction and the repetition processors; sampled
log-probabilities and top-k filtering; the static cache never reallocated inside the loop.

CPU, float32, eval mode. The tiny random models get a larger weight scale than their init default
(initializer_factor / init_std): at the default scale they repeat one token or stop at once, which
would leave the cache positions and the EOS/pad handling untested.
"""

import contextlib
import copy
import itertools
import warnings

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flantune import engine
from flantune.decoding import LabelTrie

from .conftest import tiny_config

SOURCES = [
    "question: is the sky blue?",
    "a",
    "sentiment analysis: a long and winding review of a film " * 3,
    "b c",
    "translate English to German: the house is small",
]
MAX_NEW = 10


def tiny_model(path: str, t5_scale: float = 2.0):
    cfg = tiny_config(path)
    cfg.update({"initializer_factor": t5_scale} if cfg.model_type == "t5" else {"init_std": 0.3})
    torch.manual_seed(0)
    return AutoModelForSeq2SeqLM.from_config(cfg).eval()


@pytest.fixture(scope="module", params=["t5", "bart"])
def setup(request, t5_small_path, bart_path):
    path = t5_small_path if request.param == "t5" else bart_path
    model, tokenizer = tiny_model(path), AutoTokenizer.from_pretrained(path)
    return model, tokenizer, tokenizer(SOURCES, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def sampling_setup(setup, t5_small_path):
    """`setup` with T5 at its default weight scale: the logits of the 2x scale reach ~100, where
    float32 rounding alone moves log-probabilities by ~2e-5 (transformers' generate against a
    teacher-forced forward differs by as much), above the 1e-5 the comparison asks."""
    model, tokenizer, batch = setup
    return (tiny_model(t5_small_path, 1.0) if model.config.model_type == "t5" else model), tokenizer, batch


def reference(model, batch, **options) -> torch.Tensor:
    options = {"do_sample": False, "num_beams": 1, **options}
    return model.generate(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=MAX_NEW, **options
    )


def run(model, batch, **options) -> engine.Generation:
    return engine.generate(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW, **options
    )


def stops(ids: torch.Tensor, eos: int) -> list[int | None]:
    """Each row's step of its first EOS (1-based), None for a row that never emitted one."""
    return [row.index(eos) if eos in row else None for row in ids[:, 1:].tolist()]


@contextlib.contextmanager
def eos_made_likelier(model, batch, quantile: float):
    """An EOS logit bias on the output layer, sized from greedy's own logits so that EOS wins at about
    `quantile` of the steps: hypotheses end at different steps (beam search's finished set fills
    while other beams run on)."""
    eos, head = model.config.eos_token_id, model.get_output_embeddings()
    with torch.no_grad():
        plain = run(model, batch).sequences
        logits = model(**batch, decoder_input_ids=plain[:, :-1]).logits[:, : MAX_NEW - 2]  # (B, T, V)
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features, device=head.weight.device))
    with torch.no_grad():
        head.bias[eos] = (logits.max(-1).values - logits[..., eos]).flatten().quantile(quantile)
    try:
        yield
    finally:
        head.bias = None


def test_greedy_equals_generate_and_the_cache_stays_put(setup, monkeypatch):
    """Rows stop at different steps (EOS made likelier), so the pad-after-EOS rule is exercised; the
    cache's key/value tensors are the same storage at every step (nothing reallocated in the loop)."""
    model, tokenizer, batch = setup
    eos = tokenizer.eos_token_id
    # EOS wins at about a third of greedy's steps: some rows end early.
    with eos_made_likelier(model, batch, quantile=0.3):
        pointers = []
        step = engine._Decoder.step

        def recording_step(self):
            logits = step(self)
            pointers.append([t.data_ptr() for t in self.cache_tensors()])
            return logits

        monkeypatch.setattr(engine._Decoder, "step", recording_step)
        monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 10**9)  # one decoder: its cache stays put
        ours = run(model, batch).sequences
        expected = reference(model, batch)
    assert torch.equal(ours, expected), (ours, expected)
    ends = stops(ours, eos)
    assert any(e is not None and e < MAX_NEW - 1 for e in ends), ends  # some row ended early: pads follow
    assert ours.shape[1] > 3 and len({e for e in ends}) > 1, ends  # and others ran on
    for row, end in zip(ours.tolist(), ends, strict=True):
        if end is not None:
            assert set(row[end + 2 :]) <= {tokenizer.pad_token_id}, row
    assert len(pointers) == ours.shape[1] - 1 and all(p == pointers[0] for p in pointers)
    assert all(p != 0 for p in pointers[0])


@pytest.mark.parametrize("sampled", [False, True])
def test_finished_rows_leave_the_batch(setup, monkeypatch, sampled):
    """Compaction (COMPACT_FROM_ROWS lowered to these small batches): at the stopping checks the rows
    still decoding move to a decoder of the smaller bucket with their caches. Greedy: ids equal
    transformers' generate and the engine without compaction; RL's keyed sampling (per-row streams,
    three completions a source): the same completions, log-probabilities within 1e-5. The
    compaction ran (greedy: more than once)."""
    from flantune.decoding import KeyedSampling, row_keys

    model, _, batch = setup
    compactions = []
    real = engine._EagerDecoder.compact
    monkeypatch.setattr(engine._EagerDecoder, "compact", lambda self, keep, position, bucket, tokens: compactions.append(
        (keep.numel(), position)) or real(self, keep, position, bucket, tokens))  # fmt: skip
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)
    group = 3 if sampled else 1
    rows = torch.arange(len(SOURCES) * group)

    def decode():
        if not sampled:
            return run(model, batch)
        keyed = KeyedSampling(row_keys(7, rows), temperature=0.8, top_k=20)
        return run(model, batch, do_sample=True, num_return_sequences=group, logits_processor=[keyed],
                   return_logprobs=True)  # fmt: skip

    with eos_made_likelier(model, batch, quantile=0.4):
        monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 10**9)
        plain = decode()
        assert not compactions
        monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
        compacted = decode()
        expected = None if sampled else reference(model, batch)
    assert len(compactions) >= (1 if sampled else 2), compactions
    assert torch.equal(compacted.sequences, plain.sequences), (compacted.sequences, plain.sequences)
    if sampled:
        # Smaller batches round differently (float32 matrix products of another shape).
        torch.testing.assert_close(compacted.logprobs, plain.logprobs, atol=1e-5, rtol=0)
    else:
        assert torch.equal(compacted.sequences, expected)


def test_which_processors_let_rows_leave_the_batch(setup):
    """transformers' row-wise processors and KeyedSampling (it selects its rows' streams) allow
    compaction; a prefix function (its batch_id is the row's place) or an unknown processor do not."""
    from transformers import LogitsProcessor

    from flantune.decoding import KeyedSampling, row_keys

    model, tokenizer, _ = setup
    options = {"max_new_tokens": 4, "repetition_penalty": 1.2, "no_repeat_ngram_size": 2, "do_sample": True,
               "temperature": 0.7, "top_k": 5, "top_p": 0.9}  # fmt: skip
    assert engine._compactable(engine.logits_processors(model, **options))
    keyed = KeyedSampling(row_keys(1, torch.arange(4)))
    assert engine._compactable(engine.logits_processors(model, max_new_tokens=4, extra=[keyed]))
    picked = engine._select_rows([keyed], torch.tensor([3, 1]))[0]
    assert torch.equal(picked.keys, keyed.keys[[3, 1]])
    trie = LabelTrie(tokenizer, ["yes", "no"], model.config.decoder_start_token_id)
    assert not engine._compactable(engine.logits_processors(model, max_new_tokens=4, prefix_allowed_tokens_fn=trie.allowed))

    class Custom(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores

    assert not engine._compactable(engine.logits_processors(model, max_new_tokens=4, extra=[Custom()]))


@pytest.mark.parametrize(
    "options",
    [{"temperature": 2.0, "top_k": 20}, {"temperature": 1.5, "top_k": 0, "top_p": 0.9},
     {"temperature": 2.0, "top_k": 0, "num_return_sequences": 3}],
    ids=["top-k", "top-p", "copies"],
)  # fmt: skip
def test_sampling_equals_generates_sampling_under_the_same_seed(setup, options):
    """Sampled ids token for token equal to transformers' generate from the same global seed: the
    same processors in the same order, one draw a step from the same random numbers."""
    model, _, batch = setup
    torch.manual_seed(0)
    expected = reference(model, batch, do_sample=True, **options)
    torch.manual_seed(0)
    assert torch.equal(run(model, batch, do_sample=True, **options).sequences, expected)


def test_a_processor_that_decides_is_not_drawn_from_again(setup, monkeypatch):
    """KeyedSampling leaves one token a row (`decides`): the engine takes it by argmax, no softmax
    and draw over the vocabulary a step, and the completions are those its keys choose; sampling
    with an ordinary last processor still draws."""
    from flantune.decoding import KeyedSampling, row_keys

    model, _, batch = setup
    rows = torch.arange(len(SOURCES) * 2)
    keyed = KeyedSampling(row_keys(7, rows), temperature=0.8, top_k=20)
    options = dict(do_sample=True, num_return_sequences=2, logits_processor=[keyed], return_logprobs=True)
    drawn = run(model, batch, **options)
    calls = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(KeyedSampling, "decides", False)
    assert torch.equal(run(model, batch, **options).sequences, drawn.sequences) and calls  # drawn: the same
    monkeypatch.setattr(KeyedSampling, "decides", True)
    calls.clear()
    taken = run(model, batch, **options)
    assert not calls
    assert torch.equal(taken.sequences, drawn.sequences)
    torch.testing.assert_close(taken.logprobs, drawn.logprobs, atol=0, rtol=0)


def test_greedy_with_a_lora_adapter(setup):
    from peft import LoraConfig, get_peft_model

    model, _, batch = setup
    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    torch.manual_seed(1)
    peft_model = get_peft_model(
        _copy(model),
        LoraConfig(
            r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="SEQ_2_SEQ_LM"
        ),
    ).eval()
    ours = run(peft_model, batch).sequences
    assert torch.equal(ours, reference(peft_model, batch))
    with peft_model.disable_adapter():
        base = run(peft_model, batch).sequences
    assert not torch.equal(ours, base)  # the adapter changed the output: it was applied


def test_greedy_under_autocast(setup):
    """float32 weights under bf16 autocast (how `flantune rl` samples on a GPU): the caches take the
    dtype the projections write (bf16), and the tokens equal generate's under the same autocast."""
    model, _, batch = setup
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(model, batch, graphs=False).sequences
        expected = reference(model, batch)
    assert torch.equal(ours, expected), (ours, expected)


def _copy(model):
    clone = AutoModelForSeq2SeqLM.from_config(model.config).eval().to(model.device)
    clone.load_state_dict(model.state_dict())
    return clone


def test_label_restricted_greedy(setup):
    model, tokenizer, batch = setup
    labels = ["yes", "no", "maybe not", "sentiment: True", "the house is small"]
    trie = LabelTrie(tokenizer, labels, model.config.decoder_start_token_id)
    ours = run(model, batch, prefix_allowed_tokens_fn=trie.allowed).sequences
    assert torch.equal(ours, reference(model, batch, prefix_allowed_tokens_fn=trie.allowed))
    texts = tokenizer.batch_decode(ours, skip_special_tokens=True)
    assert all(t.strip() in labels for t in texts), texts
    assert not torch.equal(ours[:, :3], run(model, batch).sequences[:, :3])  # the restriction acted


def test_repetition_penalty_and_no_repeat_ngrams(setup):
    model, tokenizer, batch = setup
    options = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    ours = run(model, batch, **options).sequences
    assert torch.equal(ours, reference(model, batch, **options))
    assert not torch.equal(ours, run(model, batch).sequences)  # the processors acted
    for row in ours[:, 1:].tolist():
        row = [i for i in row if i not in (tokenizer.pad_token_id, tokenizer.eos_token_id)]
        bigrams = list(itertools.pairwise(row))
        assert len(bigrams) == len(set(bigrams)), row


BEAMS = [  # num_beams, early_stopping, length_penalty, num_return_sequences
    (4, False, 1.0, 1),
    (3, True, 1.0, 2),
    (4, "never", 2.0, 1),
    (2, False, -0.5, 2),
]


@pytest.mark.parametrize(("beams", "early", "penalty", "returned"), BEAMS)
def test_beam_search_equals_generate(setup, beams, early, penalty, returned):
    """Token for token with generate(num_beams=...), with hypotheses finishing at different steps
    (EOS made likelier), under each early-stopping rule and length penalty."""
    model, tokenizer, batch = setup
    options = {"num_beams": beams, "early_stopping": early, "length_penalty": penalty,
               "num_return_sequences": returned}  # fmt: skip
    with eos_made_likelier(model, batch, 0.5):
        ours = run(model, batch, **options).sequences
        expected = reference(model, batch, **options)
    assert torch.equal(ours, expected), (ours, expected)
    assert ours.shape[0] == len(SOURCES) * returned
    ends = stops(ours, tokenizer.eos_token_id)
    # Hypotheses of different lengths came back (BART under "never" with a positive length penalty keeps
    # only full-length ones: its forced EOS at the cap ends them all at the same step).
    assert len(set(ends)) > 1 or (model.config.model_type == "bart" and early == "never"), ends


def test_beam_search_with_labels_and_processors(setup):
    model, tokenizer, batch = setup
    labels = ["yes", "no", "maybe not", "sentiment: True", "the house is small"]
    trie = LabelTrie(tokenizer, labels, model.config.decoder_start_token_id)
    for options in (
        {"prefix_allowed_tokens_fn": trie.allowed},
        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2},
    ):
        ours = run(model, batch, num_beams=3, **options).sequences
        assert torch.equal(ours, reference(model, batch, num_beams=3, **options)), options
    texts = tokenizer.batch_decode(run(model, batch, num_beams=3, prefix_allowed_tokens_fn=trie.allowed)
                                   .sequences, skip_special_tokens=True)  # fmt: skip
    assert all(t.strip() in labels for t in texts), texts


def lora_pair(model):
    """A PEFT model with two different random LoRA adapters, "a" and "b"."""
    from peft import LoraConfig, get_peft_model

    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    config = LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False,
                        task_type="SEQ_2_SEQ_LM")  # fmt: skip
    torch.manual_seed(1)
    peft_model = get_peft_model(_copy(model), config, adapter_name="a")
    peft_model.add_adapter("b", config)
    torch.manual_seed(2)
    for name, param in peft_model.named_parameters():
        if ".b." in name or name.endswith(".b.weight"):
            param.data.normal_(0, 0.3)
    return peft_model.eval()


def test_mixed_adapter_rows_equal_each_adapter_alone(setup):
    """Rows of adapters a, b and the base in one batch (PEFT's adapter_names): each row equals that
    row decoded with its adapter alone, greedy and with beams."""
    model, _, batch = setup
    peft_model = lora_pair(model)
    names = ["a", "b", "__base__", "b", "a"]
    for options in ({}, {"num_beams": 2}):
        mixed = run(peft_model, batch, adapter_names=names, **options).sequences
        alone = {}
        for name in ("a", "b"):
            peft_model.set_adapter(name)
            alone[name] = run(peft_model, batch, **options).sequences
        with peft_model.disable_adapter():
            alone["__base__"] = run(peft_model, batch, **options).sequences
        peft_model.set_adapter("a")
        assert len({tuple(alone[n][0].tolist()) for n in alone}) == 3  # the three really differ
        for i, name in enumerate(names):
            row, expected = mixed[i].tolist(), alone[name][i].tolist()
            width = min(len(row), len(expected))
            assert row[:width] == expected[:width], (name, options)
            pad = model.config.pad_token_id
            assert set(row[width:]) <= {pad, model.config.eos_token_id} and set(expected[width:]) <= {
                pad, model.config.eos_token_id}  # fmt: skip
        with pytest.raises(ValueError, match="adapter_names: 2 names for 5 sources"):
            run(peft_model, batch, adapter_names=["a", "b"])


def test_stop_ends_the_generation(setup):
    model, _, batch = setup
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 3

    out = run(model, batch, stop=stop).sequences
    assert out.shape[1] == 1 + 3 and len(asked) == 3
    assert torch.equal(out, run(model, batch).sequences[:, :4])
    asked.clear()
    assert run(model, batch, num_beams=2, stop=stop).sequences.shape[1] <= 1 + 3


def test_the_checkpoints_generation_config_applies(setup):
    """What a checkpoint's generation_config.json sets and generate applies, the engine applies too
    (min_length, bad words, suppressed tokens, greedy and beams); what it cannot apply is refused."""
    model, _, batch = setup
    gen = model.generation_config
    plain = run(model, batch).sequences
    common = sorted(set(plain[:, 1:4].flatten().tolist()) - {0, 1, 2})[:3]  # tokens greedy emits early
    try:
        gen.min_length, gen.bad_words_ids, gen.suppress_tokens = 6, [[common[0]]], [common[1]]
        for options in ({}, {"num_beams": 3}):
            ours = run(model, batch, **options).sequences
            assert torch.equal(ours, reference(model, batch, **options)), options
        assert not torch.equal(ours, plain) and common[0] not in ours and common[1] not in ours
    finally:
        gen.min_length, gen.bad_words_ids, gen.suppress_tokens = None, None, None
    gen.encoder_no_repeat_ngram_size = 2
    try:
        with pytest.raises(ValueError, match="generation_config sets encoder_no_repeat_ngram_size"):
            run(model, batch)
    finally:
        gen.encoder_no_repeat_ngram_size = None


def test_another_architecture_decodes_through_transformers(recwarn):
    """A seq2seq model the engine does not drive (Marian) decodes through transformers' generate with
    its static cache, said once; its output is generate's."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, pad_token_id=63,
                          eos_token_id=0, decoder_start_token_id=63, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    model = MarianMTModel(config).eval()
    assert not engine.supports(model)
    ids = torch.randint(1, 60, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    engine._FALLBACK_SAID.discard("marian")
    for options in ({}, {"num_beams": 2}):
        assert torch.equal(run(model, batch, **options).sequences, reference(model, batch, **options))
    said = [w for w in recwarn if "marian decodes through transformers' generate (static cache)" in str(w.message)]
    assert len(said) == 1
    with pytest.raises(ValueError, match="marian: return_logprobs, generator and graphs need"):
        run(model, batch, return_logprobs=True)


def teacher_forced_logits(model, batch, sequences: torch.Tensor, copies: int) -> torch.Tensor:
    """(N, T, V) logits of one full forward over the generated sequences, sources repeated `copies` times."""
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"].repeat_interleave(copies, 0),
            attention_mask=batch["attention_mask"].repeat_interleave(copies, 0),
            decoder_input_ids=sequences[:, :-1], use_cache=False,
        ).logits.float()  # fmt: skip


def live(sequences: torch.Tensor, pad: int, eos: int) -> torch.Tensor:
    """(N, T) True where a row was still generating (up to and including its EOS)."""
    generated = sequences[:, 1:]
    done_before = torch.cumsum((generated == eos).long(), 1) - (generated == eos).long()
    return done_before == 0


def test_sampled_logprobs_equal_a_teacher_forced_forward(sampling_setup):
    """num_return_sequences copies of each source from one encoder pass; the engine's per-token
    log-probabilities are the raw model's, as one teacher-forced forward computes them."""
    model, tokenizer, batch = sampling_setup
    copies, calls = 3, []
    hook = model.get_encoder().register_forward_hook(lambda m, a, kw, out: calls.append(1), with_kwargs=True)
    try:
        torch.manual_seed(0)
        out = run(model, batch, do_sample=True, temperature=3.0, top_p=0.95, num_return_sequences=copies,
                  return_logprobs=True)  # fmt: skip
    finally:
        hook.remove()
    assert len(calls) == 1  # the encoder ran once for all copies
    sequences, logprobs = out.sequences, out.logprobs
    assert sequences.shape[0] == len(SOURCES) * copies
    assert logprobs.shape == (sequences.shape[0], sequences.shape[1] - 1)
    grouped = sequences.view(len(SOURCES), copies, -1)
    assert any(not torch.equal(g[0], g[1]) for g in grouped)  # the copies are separate samples

    logits = teacher_forced_logits(model, batch, sequences, copies)
    expected = torch.log_softmax(logits, -1).gather(2, sequences[:, 1:, None]).squeeze(2)  # (N, T)
    mask = live(sequences, tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert mask.sum() > sequences.shape[0]  # more than one token per row compared
    # rtol: float32 log-softmax over the vocabulary rounds in proportion to the value; another CPU's
    # vector width sums in another order (measured: 1.1e-5 at a log-probability of -24, AVX-512).
    torch.testing.assert_close(logprobs[mask], expected[mask], atol=1e-5, rtol=1e-6)
    assert (logprobs[~mask] == 0).all()
    # Raw, not processed: the tempered distribution's log-probabilities are another thing.
    tempered = torch.log_softmax(logits / 3.0, -1).gather(2, sequences[:, 1:, None]).squeeze(2)
    assert (logprobs[mask] - tempered[mask]).abs().max() > 1e-2
    torch.manual_seed(0)
    again = run(model, batch, do_sample=True, temperature=3.0, top_p=0.95, num_return_sequences=copies)
    assert torch.equal(again.sequences, sequences)  # a fixed seed gives the same samples


def test_top_k_never_leaves_the_top_k(sampling_setup):
    """At temperature 5 the distribution is flattened, so without top_k tokens outside that step's
    top 5 are drawn (checked as the control); with top_k=5 none is."""
    model, tokenizer, batch = sampling_setup
    copies = 2

    def outside_top5(sequences: torch.Tensor) -> int:
        logits = teacher_forced_logits(model, batch, sequences, copies)  # (N, T, V)
        top5 = logits.topk(5, dim=-1).indices  # (N, T, 5)
        inside = (top5 == sequences[:, 1:, None]).any(-1)  # (N, T)
        mask = live(sequences, tokenizer.pad_token_id, tokenizer.eos_token_id)
        if model.config.model_type == "bart":  # the forced EOS at the cap is not a sample
            mask[:, MAX_NEW - 1] = False
        assert mask.sum() >= sequences.shape[0]
        return int((~inside & mask).sum())

    torch.manual_seed(0)
    free = run(model, batch, do_sample=True, temperature=5.0, num_return_sequences=copies).sequences
    torch.manual_seed(0)
    filtered = run(
        model, batch, do_sample=True, temperature=5.0, top_k=5, num_return_sequences=copies
    ).sequences
    assert outside_top5(free) > 0
    assert outside_top5(filtered) == 0


def test_bad_options_are_refused(setup):
    model, _, batch = setup
    with pytest.raises(ValueError, match="needs do_sample"):
        run(model, batch, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=0)
    with pytest.raises(ValueError, match="graphs=True"):
        run(model, batch, graphs=True)


def test_row_buckets():
    assert [engine.row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 100, 128, 129, 300)] == [
        1, 2, 4, 8, 8, 16, 128, 128, 256, 384,
    ]  # fmt: skip


class EagerGraph:
    """A stand-in for torch.cuda.CUDAGraph on the CPU: replay runs the recorded function again into
    the same output tensor."""

    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        self.output.copy_(self.fn())


@pytest.fixture
def graphs_on_cpu(monkeypatch):
    """The graph branch with the capture swapped for eager calls (the CPU has no CUDA graphs): the
    body of a capture runs (so the cache's positions must be restored after it, as after the
    warm-up), a replay reruns the step into the captured output tensor."""
    calls = Calls(warm_up=0, record=0)  # the decode step's; the encoder pass's in calls.encoder

    def warm_up(fn, times):
        outputs = [fn() for _ in range(times)]
        counts = calls if outputs[-1].dim() == 2 else calls.encoder  # logits (R, V) or hidden (R, S, d)
        counts["warm_up"] += 1

    def record(fn, stream, pool=None):
        output = fn().clone()
        (calls if output.dim() == 2 else calls.encoder)["record"] += 1
        return EagerGraph(fn, output), output

    monkeypatch.setattr(engine, "_can_capture", lambda device: True)
    monkeypatch.setattr(engine, "_warm_up", warm_up)
    monkeypatch.setattr(engine, "_record", record)
    monkeypatch.setattr(engine, "_GRAPHS", type(engine._GRAPHS)())
    monkeypatch.setattr(engine, "_ENCODERS", type(engine._ENCODERS)())
    return calls


def test_finished_rows_leave_the_graph_branch_on_cpu(setup, graphs_on_cpu, monkeypatch):
    """Compaction on the graph branch (captures swapped for eager calls): 15 rows in a bucket of 16;
    at the checks every 8 steps the live rows move to kept decoders of smaller buckets (their
    encoder inputs, both caches and positions copied), each step recorded at the position the rows
    join at (its warm-up and capture run there, then the positions are restored). Greedy ids equal
    the eager loop's and transformers' generate; keyed samples equal the uncompacted run's."""
    from flantune.decoding import KeyedSampling, row_keys

    model, tokenizer, _ = setup
    batch = tokenizer(SOURCES * 3, return_tensors="pt", padding=True)
    monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)
    moved = []
    real = engine._GraphedDecoder.compact
    monkeypatch.setattr(engine._GraphedDecoder, "compact", lambda self, keep, position, bucket, tokens: moved.append(
        (self.rows, keep.numel(), position, bucket)) or real(self, keep, position, bucket, tokens))  # fmt: skip
    keyed = KeyedSampling(row_keys(3, torch.arange(15)), temperature=0.8, top_k=20)
    options = {"max_new_tokens": 24}
    with eos_made_likelier(model, batch, 0.3):
        expected = model.generate(**batch, do_sample=False, num_beams=1, **options)
        eager = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=False, **options)
        graphed = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=True, **options)
        greedy_moves = list(moved)
        sampled = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=True,
                                  do_sample=True, logits_processor=[keyed], **options).sequences  # fmt: skip
        monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 10**9)
        whole = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=True,
                                do_sample=True, logits_processor=[keyed], **options).sequences  # fmt: skip
    assert greedy_moves and all(p % 8 == 0 and b < rows for rows, _, p, b in greedy_moves), greedy_moves
    assert len(moved) > len(greedy_moves)  # the sampled call compacted too
    assert torch.equal(graphed.sequences, eager.sequences), (graphed.sequences, eager.sequences)
    assert torch.equal(graphed.sequences, expected)
    assert torch.equal(sampled, whole)


def test_a_compaction_that_cannot_be_recorded_keeps_the_batch(setup, graphs_on_cpu, monkeypatch):
    """Where the smaller bucket's step cannot be recorded, the call warns once and decodes on at its
    size: the ids are the eager loop's."""
    model, tokenizer, _ = setup
    batch = tokenizer(SOURCES * 3, return_tensors="pt", padding=True)
    monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)
    record = engine._record

    def refuse_small(fn, stream, pool=None):
        graph, output = record(fn, stream, pool)
        if output.dim() == 2 and output.shape[0] < 16:  # a decode step of a compacted bucket
            raise RuntimeError("operation not permitted when stream is capturing")
        return graph, output

    monkeypatch.setattr(engine, "_record", refuse_small)
    options = {"max_new_tokens": 24}
    with eos_made_likelier(model, batch, 0.3):
        eager = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=False, **options)
        with pytest.warns(UserWarning, match="finished rows could not leave the batch") as caught:
            graphed = engine.generate(model, batch["input_ids"], batch["attention_mask"], graphs=True, **options)
    assert torch.equal(graphed.sequences, eager.sequences)
    assert sum("could not leave" in str(w.message) for w in caught) == 1


class Calls(dict):
    """Counts of warm-ups and recordings of the decode step; `encoder`: those of the encoder pass."""

    def __init__(self, **counts):
        super().__init__(**counts)
        self.encoder = {"warm_up": 0, "record": 0}


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-branch"])
def test_a_sources_copies_share_its_cross_attention(t5_small_path, monkeypatch, graphs, request):
    """Samples of one source (RL's groups: per-row keyed streams) read one copy of its cross-attention
    keys/values, (sources, H, S, D) a layer: the same completions as a cache with a copy per row,
    log-probabilities within 1e-5; also when finished sources leave the batch mid-call (compaction
    lowered to these sizes), on the eager loop and on the graph branch (CPU stand-in)."""
    from flantune.decoding import KeyedSampling, row_keys

    if graphs:
        request.getfixturevalue("graphs_on_cpu")
    model = tiny_model(t5_small_path, 1.0)  # logits of ~1: float32 rounding stays below 1e-5 (sampling_setup)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    group = 4
    shapes = []
    fill = engine._Decoder.fill_cross
    monkeypatch.setattr(engine._Decoder, "fill_cross", lambda self: shapes.append(
        tuple(self.cache.cross_attention_cache.layers[0].keys.shape[:1])) or fill(self))  # fmt: skip
    monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)

    def sample(share: bool):
        monkeypatch.setattr(engine, "SHARE_CROSS", share)
        engine.clear_graphs()
        keyed = KeyedSampling(row_keys(5, torch.arange(len(SOURCES) * group)), temperature=1.5)
        return engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12,
                               do_sample=True, num_return_sequences=group, logits_processor=[keyed],
                               return_logprobs=True, graphs=graphs)  # fmt: skip

    with eos_made_likelier(model, batch, quantile=0.3):  # some completions end early, whole sources among them
        shapes.clear()
        copied = sample(False)
        rows = len(SOURCES) * group
        assert shapes[0] == (rows if not graphs else engine.row_bucket(rows),), shapes
        shapes.clear()
        shared = sample(True)
    assert shapes[0] == ((rows if not graphs else engine.row_bucket(rows)) // group,), shapes
    ends = (shared.sequences == model.config.eos_token_id).any(1).view(-1, group).all(1)
    assert ends.any() and not ends.all()  # some sources finished whole, others did not
    assert torch.equal(shared.sequences, copied.sequences)
    torch.testing.assert_close(shared.logprobs, copied.logprobs, atol=1e-5, rtol=0)
    engine.clear_graphs()



def reference_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None):
    """torch.nn.attention.varlen.varlen_attn's arithmetic, one source at a time (the CPU has no flash
    kernels): query (Tq, H, D) against key, value (Tk, H, D), source g's queries at cu_q[g]:cu_q[g+1]
    and keys at cu_k[g]:cu_k[g+1]."""
    out = torch.empty_like(query)
    for g in range(cu_q.shape[0] - 1):
        a, b, c, d = int(cu_q[g]), int(cu_q[g + 1]), int(cu_k[g]), int(cu_k[g + 1])
        assert 0 < b - a <= max_q and 0 < d - c <= max_k
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            query[a:b].transpose(0, 1), key[c:d].transpose(0, 1), value[c:d].transpose(0, 1), scale=scale,
        ).transpose(0, 1)  # fmt: skip
    return out


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-branch"])
def test_packed_cross_attention_equals_the_padded_one(t5_small_path, monkeypatch, graphs, request):
    """T5's step with the cross-attention keys/values packed without padding (PACKED_CROSS; varlen
    flash attention on a GPU, its arithmetic per source here): greedy ids and keyed samples (4 a
    source, shared) equal the padded cache's, log-probabilities within 1e-5, with finished rows and
    sources leaving the batch (compaction lowered to these sizes), and beam search too."""
    from flantune import t5_decode
    from flantune.decoding import KeyedSampling, row_keys

    if graphs:
        request.getfixturevalue("graphs_on_cpu")
    monkeypatch.setattr(t5_decode, "_varlen", lambda: reference_varlen)
    monkeypatch.setattr(t5_decode, "packed_cross_ready", lambda device, dtype, head_dim: t5_decode.PACKED_CROSS)
    monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)
    model = tiny_model(t5_small_path, 1.0)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    packed_seen = []
    fill = engine._Decoder.fill_cross
    monkeypatch.setattr(engine._Decoder, "fill_cross", lambda self: packed_seen.append(self.own.packed) or fill(self))

    def decode(packed: bool, **options):
        monkeypatch.setattr(t5_decode, "PACKED_CROSS", packed)
        engine.clear_graphs()
        return engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, graphs=graphs,
                               **options)  # fmt: skip

    def keyed():
        return {"do_sample": True, "num_return_sequences": 4, "return_logprobs": True,
                "logits_processor": [KeyedSampling(row_keys(5, torch.arange(len(SOURCES) * 4)), temperature=1.5)]}

    with eos_made_likelier(model, batch, quantile=0.3):
        packed_seen.clear()
        for options in ({"return_logprobs": True}, keyed(), {"num_beams": 2, "early_stopping": True}):
            padded, packed = decode(False, **options), decode(True, **(keyed() if "do_sample" in options else options))
            assert torch.equal(packed.sequences, padded.sequences), (options, packed.sequences, padded.sequences)
            if packed.logprobs is not None:
                torch.testing.assert_close(packed.logprobs, padded.logprobs, atol=1e-5, rtol=0)
    assert True in packed_seen and False in packed_seen
    ends = (packed.sequences == model.config.eos_token_id).any(1)
    assert ends.any() and not ends.all()
    engine.clear_graphs()

def test_graph_branch_on_cpu(setup, graphs_on_cpu):
    """5 sources padded to a bucket of 8 rows and 64 positions: the ids and log-probabilities of the
    5 real rows equal the eager loop's. A second batch (6 rows, label-restricted so that every row
    stops early: the output is cut at the last live step although the stopping check runs every 8
    steps) reuses the kept entry: one warm-up and one capture in all."""
    model, tokenizer, batch = setup
    eager = run(model, batch, graphs=False, return_logprobs=True)
    graphed = run(model, batch, graphs=True, return_logprobs=True)
    assert graphed.sequences.shape[0] == len(SOURCES)
    assert torch.equal(graphed.sequences, eager.sequences), (graphed.sequences, eager.sequences)
    # Padded shapes (the encoder's and the step's) round differently, and this model's logits reach
    # ~100 (sampling_setup): 3e-4 in float32 (1.3e-4 measured); in float64, 1e-9 (0 measured).
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, atol=3e-4, rtol=0)
    (entry,) = engine._GRAPHS.values()
    assert entry.rows == 8 and entry.source_len == 64 and entry.decoder.model is None
    assert graphs_on_cpu == {"warm_up": 1, "record": 1}
    assert graphs_on_cpu.encoder == {"warm_up": 0, "record": 0}  # the encoder: eager at a first use

    labels = ["yes", "no", "maybe not", "sentiment: True"]
    trie = LabelTrie(tokenizer, labels, model.config.decoder_start_token_id)
    other = tokenizer([*SOURCES[::-1], "c d e"], return_tensors="pt", padding=True)
    eager = run(model, other, graphs=False, prefix_allowed_tokens_fn=trie.allowed).sequences
    graphed = run(model, other, graphs=True, prefix_allowed_tokens_fn=trie.allowed).sequences
    assert torch.equal(graphed, eager), (graphed, eager)
    assert graphed.shape == (6, max(len(tokenizer(label).input_ids) for label in labels) + 1)
    assert eager.shape[1] < 1 + 8  # every row stopped before the first check: the cut was needed
    assert list(engine._GRAPHS.values()) == [entry]
    assert graphs_on_cpu == {"warm_up": 1, "record": 1}
    assert graphs_on_cpu.encoder == {"warm_up": 1, "record": 1}  # recorded at the second use: 8 x 64
    wide = copy.deepcopy(model).double()  # float64: the padded passes equal the eager ones
    eager, graphed = (run(wide, batch, graphs=g, return_logprobs=True) for g in (False, True))
    assert torch.equal(graphed.sequences, eager.sequences)
    torch.testing.assert_close(graphed.logprobs, eager.logprobs, atol=1e-9, rtol=0)


def test_graph_branch_replays_step_one_with_cross_attention_written_before(setup, graphs_on_cpu, monkeypatch):
    """With graphs, `load` writes every layer's cross-attention keys/values (`_Decoder.fill_cross`),
    so every call of the step, step 1 included, reads them from the cache: step 1 is a replay of the
    recorded step, not transformers' eager first step (~4,000 operator calls for flan-t5-base).
    Greedy and 2 beams equal generate's ids."""
    model, _, batch = setup
    seen = []
    step = engine._Decoder.step

    def recording_step(self):
        seen.append(all(self.cache.is_updated.values()))
        return step(self)

    monkeypatch.setattr(engine._Decoder, "step", recording_step)
    for beams in (1, 2):
        ours = run(model, batch, graphs=True, num_beams=beams).sequences
        expected = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, num_beams=beams)
        assert torch.equal(ours, expected), (beams, ours, expected)
    assert seen and all(seen), seen
    seen.clear()
    run(model, batch, graphs=False)
    if engine.t5_decode.unsupported(model) is None:  # T5's own step reads them from the cache eagerly too
        assert seen and all(seen), seen
    else:  # the eager loop over transformers' step keeps its own first step
        assert seen[0] is False and all(seen[1:])


def test_graph_branch_when_step_one_cannot_be_captured(setup, graphs_on_cpu, monkeypatch):
    """A recording of step 1 that fails (a capture refused): step 1 runs eagerly, step 2 is recorded
    as before cross-attention keys/values were written up front, with a warning; the ids equal the
    eager loop's."""
    model, _, batch = setup
    record = engine._record
    failures = []

    def refuse_once(fn, stream, pool=None):
        if not failures and isinstance(getattr(fn, "__self__", None), engine._Decoder):  # the step's
            failures.append(1)
            raise RuntimeError("operation not permitted when stream is capturing")
        return record(fn, stream, pool)

    monkeypatch.setattr(engine, "_record", refuse_once)
    eager = run(model, batch, graphs=False).sequences
    with pytest.warns(UserWarning, match="step 1 could not be captured"):
        graphed = run(model, batch, graphs=True).sequences
    assert torch.equal(graphed, eager), (graphed, eager)
    assert graphs_on_cpu == {"warm_up": 2, "record": 1}
    assert torch.equal(run(model, batch, graphs=True).sequences, eager)  # the kept recording replays
    assert graphs_on_cpu == {"warm_up": 2, "record": 1}


def test_graph_branch_when_the_encoder_pass_cannot_be_captured(setup, graphs_on_cpu, monkeypatch):
    """An encoder pass whose recording (at the second use of its buckets) fails: a warning, the pass
    runs eagerly (ids equal the eager loop's), and later calls of those buckets run it eagerly
    without trying again."""
    model, _, batch = setup
    record = engine._record

    def refuse_encoder(fn, stream, pool=None):
        if not isinstance(getattr(fn, "__self__", None), engine._Decoder):
            raise RuntimeError("operation not permitted when stream is capturing")
        return record(fn, stream, pool)

    monkeypatch.setattr(engine, "_record", refuse_encoder)
    eager = run(model, batch, graphs=False).sequences
    assert torch.equal(run(model, batch, graphs=True).sequences, eager)  # first use: eager, no recording
    with pytest.warns(UserWarning, match="the encoder pass could not be captured"):
        assert torch.equal(run(model, batch, graphs=True).sequences, eager)
    assert [entry.failed for entry in engine._ENCODERS.values()] == [True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(model, batch, graphs=True).sequences, eager)
    assert graphs_on_cpu.encoder == {"warm_up": 1, "record": 0}


def test_fused_layers_equal_transformers_forms(setup):
    """T5's RMS norms and tanh-GELU as torch's fused kernels: the same logits as transformers' forms
    (float32 within rounding; bfloat16 no farther from float32 than transformers' own bf16 forms),
    and the modules as they were after the block. BART has neither: nothing is patched."""
    model, tokenizer, batch = setup
    labels = tokenizer(["yes", "no", "a b c", "d", "e f"], return_tensors="pt", padding=True).input_ids
    forward = lambda m: m(**batch, labels=labels).logits  # noqa: E731
    with torch.no_grad():
        plain = forward(model)
        with engine.fused_layers(model) as patched:
            fused = forward(model)
            norms = [m for m in model.modules() if type(m).__name__ == "T5LayerNorm"]
            assert all("forward" in vars(m) for m in norms) and bool(norms) == patched
        assert not any("forward" in vars(m) for m in model.modules())
        assert patched == (model.config.model_type == "t5")
        torch.testing.assert_close(fused, plain, atol=1e-5 * plain.abs().max().item(), rtol=0)
        if not patched:
            assert torch.equal(fused, plain)
            return
        half = copy.deepcopy(model).to(torch.bfloat16)
        theirs = forward(half).float()
        with engine.fused_layers(half):
            ours = forward(half).float()
        assert (ours - plain).abs().max() <= 2 * (theirs - plain).abs().max()
        hooked = next(m for m in half.modules() if type(m).__name__ == "T5LayerNorm")
        hooked.forward = lambda x: x  # an instance forward of its own (Accelerate's hooks set one)
        with engine.fused_layers(half):
            assert hooked.forward(torch.ones(1)) == 1
        assert "forward" in vars(hooked)


def test_the_graph_branch_decodes_with_fused_layers(setup, graphs_on_cpu, monkeypatch):
    """Where steps are captured (CUDA; here the capture swapped for eager calls) `generate` runs
    the encoder and records the step with the fused layers (T5), unless FUSED_LAYERS is off or
    the step is compiled (inductor fuses its own kernels); kept recordings are told apart by it."""
    model, _, batch = setup
    t5 = model.config.model_type == "t5"
    fused = lambda: any("forward" in vars(m) for m in model.modules())  # noqa: E731
    seen = []
    for name in ("_encode", "_record"):
        real = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, real=real, name=name, **k: seen.append((name, fused()))
                            or real(*a, **k))  # fmt: skip
    expected = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
    assert torch.equal(run(model, batch, graphs=True).sequences, expected)
    assert seen == [("_encode", t5), ("_record", t5)] and not fused()
    seen.clear()
    monkeypatch.setattr(engine, "FUSED_LAYERS", False)
    assert torch.equal(run(model, batch, graphs=True).sequences, expected)
    assert seen == [("_encode", False), ("_record", False)]
    assert graphs_on_cpu["record"] == 2  # the step recorded with the fused kernels is not replayed without


def test_graph_branch_replays_a_kept_step_of_longer_sources(setup, graphs_on_cpu):
    """An eval's batches come longest first: a batch whose source bucket has no recorded step
    replays the kept one of the smallest bucket up to SOURCE_REUSE times its own (the padding
    positions masked out), with generate's ids; past that it records its own, and a longer batch
    than any kept one records too."""
    model, tokenizer, _ = setup
    words = lambda n: " ".join(["word"] * n)  # noqa: E731  (one token per word, plus EOS)

    def batch_of(*lengths):
        return tokenizer([words(n) for n in lengths], return_tensors="pt", padding=True)

    def check(batch):
        ours = engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                               graphs=True)  # fmt: skip
        expected = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
        assert torch.equal(ours.sequences, expected), (ours.sequences, expected)

    def buckets():
        return sorted(e.source_len for e in engine._GRAPHS.values())

    check(batch_of(180, 150, 130))  # 3 rows (bucket 4), sources in bucket 192: recorded
    assert buckets() == [192] and graphs_on_cpu["record"] == 1
    check(batch_of(120, 100, 97))  # bucket 128: the step of 192 serves it
    check(batch_of(110, 70, 65, 2))
    assert buckets() == [192] and graphs_on_cpu["record"] == 1
    check(batch_of(60, 10, 3))  # bucket 64: 192 is more than twice as long, so one of its own
    assert buckets() == [64, 192] and graphs_on_cpu["record"] == 2
    check(batch_of(120, 90, 80))  # bucket 128 again: the smallest kept step that serves it, 192's
    assert graphs_on_cpu["record"] == 2
    check(batch_of(100))  # one row: another row bucket, recorded
    assert buckets() == [64, 128, 192] and graphs_on_cpu["record"] == 3
    check(batch_of(250, 20, 5))  # longer than any kept step: recorded
    assert buckets() == [64, 128, 192, 256] and graphs_on_cpu["record"] == 4


def test_graph_branch_replays_one_step_for_every_cap_in_a_cache_bucket(setup, graphs_on_cpu):
    """Calls with other max_new_tokens in the same multiple of 64 (a server's requests, each with its
    own cap) replay the one step recorded for that cache size, each with generate's ids for its
    own cap; a cap past 64 records another."""
    model, _, batch = setup
    for cap in (3, MAX_NEW, 17):
        ours = engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=cap, graphs=True)
        expected = model.generate(**batch, max_new_tokens=cap, do_sample=False, num_beams=1)
        assert torch.equal(ours.sequences, expected), (cap, ours.sequences, expected)
    (entry,) = engine._GRAPHS.values()
    assert entry.max_new_tokens == engine.NEW_TOKEN_MULTIPLE
    assert graphs_on_cpu == {"warm_up": 1, "record": 1}
    engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=65, graphs=True)
    assert sorted(e.max_new_tokens for e in engine._GRAPHS.values()) == [64, 128]
    assert graphs_on_cpu["record"] == 2


def test_graph_branch_beam_search_on_cpu(setup, graphs_on_cpu):
    """Beam search through the graph branch (5 sources x 3 beams padded to 16 rows; the cache
    reordered in place between replays; the stopping check every 8 steps) equals generate's."""
    model, _, batch = setup
    options = {"num_beams": 3, "num_return_sequences": 2, "early_stopping": True}
    with eos_made_likelier(model, batch, 0.5):
        graphed = run(model, batch, graphs=True, **options).sequences
        expected = reference(model, batch, **options)
    assert torch.equal(graphed, expected), (graphed, expected)
    # The bias's own greedy run (8 rows) and the beams' step (16 rows): one capture each.
    assert sorted(entry.rows for entry in engine._GRAPHS.values()) == [8, 16]
    assert graphs_on_cpu == {"warm_up": 2, "record": 2}


def test_graph_branch_with_the_step_compiled(setup, graphs_on_cpu, monkeypatch):
    """engine.COMPILE_STEP (experimental): the step goes through torch.compile (dynamo's tracing of
    the model's forward with the engine's caches; the eager backend on the CPU, inductor's kernels
    are the GPU's) before capture, and the tokens equal the eager loop's."""
    model, _, batch = setup
    traced = []

    def backend(graph_module, example_inputs):  # dynamo's FX graphs, run as traced
        traced.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(engine, "COMPILE_STEP", True)
    monkeypatch.setattr(engine, "COMPILE_OPTIONS", {"backend": backend, "dynamic": False})
    torch._dynamo.reset()
    try:
        graphed = run(model, batch, graphs=True).sequences
    finally:
        torch._dynamo.reset()
    assert traced  # the step went through dynamo
    # transformers' own norms in what was compiled (inductor fuses them; no fused layers for it)
    assert not any("rms_norm" in str(g.graph) for g in traced)
    assert torch.equal(graphed, run(model, batch, graphs=False).sequences)
    assert graphs_on_cpu == {"warm_up": 1, "record": 1}


def test_graph_branch_with_lora_and_trainable_tokens(setup, graphs_on_cpu):
    """A LoRA model with trainable token rows (what `model.add_tokens` makes; PEFT wraps the
    embeddings in a wrapper that has no `merged`) goes through the graph branch and equals
    generate; disabling the adapters is another recorded path: recaptured, and equal to the base."""
    from peft import LoraConfig, get_peft_model

    model, _, batch = setup
    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    torch.manual_seed(1)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="SEQ_2_SEQ_LM",
        trainable_token_indices=[5, 6],
    )  # fmt: skip
    peft_model = get_peft_model(_copy(model), config).eval()
    assert torch.equal(run(peft_model, batch, graphs=True).sequences, reference(peft_model, batch))
    assert graphs_on_cpu["record"] == 1
    with peft_model.disable_adapter():
        base = run(peft_model, batch, graphs=True).sequences
    assert graphs_on_cpu["record"] == 2
    assert torch.equal(base, reference(model, batch))


def test_graph_branch_with_adapter_rows_gathered(setup, graphs_on_cpu):
    """Rows of adapters a, b and the base gathered per row (adapter_rows, as the server's waves do)
    take the graph branch and equal PEFT's adapter_names hooks run eagerly, greedy and with beams; a
    batch of another mix of adapters replays the recorded step (its rows buffer is re-read). A row
    buffer smaller than the step's bucket falls back to PEFT's hooks, eagerly."""
    from flantune.lora_rows import LoraRows

    model, _, batch = setup
    peft_model = lora_pair(model)
    gathered = LoraRows(peft_model, ["a", "b"], capacity=16)
    for names in (["a", "b", "__base__", "b", "a"], ["b", "__base__", "a", "a", "b"]):
        for options in ({}, {"num_beams": 2}):
            expected = run(peft_model, batch, adapter_names=names, graphs=False, **options).sequences
            ours = run(peft_model, batch, adapter_names=names, adapter_rows=gathered, graphs=True, **options)
            assert torch.equal(ours.sequences, expected), (names, options)
    # One recording per bucket (8 rows greedy, 16 with two beams), whatever the mix.
    assert graphs_on_cpu["record"] == 2
    small = LoraRows(peft_model, ["a", "b"], capacity=4)
    with pytest.raises(ValueError, match="mixed-adapter step runs eagerly"):
        run(peft_model, batch, adapter_names=names, adapter_rows=small, graphs=True)
    ours = run(peft_model, batch, adapter_names=names, adapter_rows=small).sequences
    assert torch.equal(ours, run(peft_model, batch, adapter_names=names, graphs=False).sequences)
    assert graphs_on_cpu["record"] == 2


def test_graph_branch_sampling_on_cpu(sampling_setup, graphs_on_cpu):
    """Sampling from one seeded generator gives the same samples with and without the graph branch
    (the padding rows draw nothing); a changed model (another mode) is recaptured, not replayed."""
    model, _, batch = sampling_setup
    options = dict(do_sample=True, temperature=2.0, top_k=20, num_return_sequences=2, return_logprobs=True)
    outs = {}
    for graphs in (False, True):
        outs[graphs] = run(model, batch, graphs=graphs, generator=torch.Generator().manual_seed(3), **options)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].logprobs, outs[False].logprobs, atol=1e-5, rtol=0)
    assert graphs_on_cpu["record"] == 1
    model.train()
    try:
        run(model, batch, graphs=True, generator=torch.Generator().manual_seed(3), **options)
    finally:
        model.eval()
    assert graphs_on_cpu["record"] == 2 and len(engine._GRAPHS) == 1


# --- The packed encoder (T5) ---------------------------------------------------------------------------


def _uneven_sources(vocab: int, side: str, lengths=(40, 7, 300, 129, 1, 64)):
    """(ids, mask): sources of these lengths, padded on `side`, one longer than a packed row of 128."""
    gen = torch.Generator().manual_seed(0)
    width = max(lengths)
    ids, mask = torch.zeros(len(lengths), width, dtype=torch.long), torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols], mask[i, cols] = torch.randint(5, vocab, (n,), generator=gen), 1
    return ids, mask


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("first_fit", [True, False])
def test_packed_encoder_equals_transformers_encoder(t5_small_path, side, first_fit, attention):
    """Sources packed first fit into rows of 128 (one longer than that gets a row of its own), each
    with its bias and attention restarted: every real token's output equals transformers' encoder
    over the padded batch; padding positions come back as zeros. eager: the materialized scores;
    sdpa: the bias as SDPA's additive mask."""
    from flantune import fast_t5, packing

    model = tiny_model(t5_small_path)
    ids, mask = _uneven_sources(model.config.vocab_size, side)
    with torch.no_grad():
        expected = model.get_encoder()(input_ids=ids, attention_mask=mask)[0]
        sources = packing.PackedSources(ids, mask, width=128, block=None, first_fit=first_fit)
        got = fast_t5.packed_encoder_output(model, sources, attention)
    real = mask.bool()
    # 300 -> rows of 384; first fit: the rest share one row; else a row each (the padded layout)
    assert (sources.rows, sources.width) == ((2, 384) if first_fit else (6, 384))
    assert got.shape == expected.shape and not got[~real].any()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5)


def test_packed_block_mask_tensors_match_torchs(t5_small_path):
    """The block-mask tensors a PackedSources copies to the device are the ones FlexAttention's own
    construction gives for its pair ids (q side from BlockMask.from_kv_blocks)."""
    from flantune import fast_t5, packing

    ids, mask = _uneven_sources(1000, "right")
    sources = packing.PackedSources(ids, mask, width=128)
    pattern = fast_t5.Pattern(sources.pair, sources.pair, sources.pos, sources.pos, causal=False)
    for got, want in zip(sources.blocks, fast_t5.block_mask_tensors(pattern, fast_t5.BLOCK, q_side="torch"), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_engine_with_the_packed_encoder_equals_generate(setup, monkeypatch, attention):
    """PACKED_ENCODER="eager" or "sdpa" (the packed layout, its attention materialized or through
    SDPA, on the CPU): greedy and beam ids equal transformers' generate for T5; BART keeps
    transformers' encoder."""
    model, _, batch = setup
    monkeypatch.setattr(engine, "PACKED_ENCODER", attention)
    calls = []
    from flantune import fast_t5

    real = fast_t5.packed_encoder_output
    monkeypatch.setattr(fast_t5, "packed_encoder_output", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(run(model, batch).sequences, reference(model, batch))
    options = {"num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(run(model, batch, **options).sequences, reference(model, batch, **options))
    assert len(calls) == (2 if model.config.model_type == "t5" else 0)


def test_packed_encoder_policy(t5_small_path, bart_path, monkeypatch, capsys):
    """auto: the packed encoder on CUDA for T5-family models of one adapter and the kinds the packed
    forward drives, from PACKED_MIN_TOKENS padded source tokens (in 16-bit FlexAttention where its
    compilation pays or is done and did not fail, else SDPA; in float32 SDPA); transformers'
    encoder otherwise."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    from flantune.adapters import AdapterConfig, add_adapters
    from flantune.cli import user_errors
    from flantune.errors import SettingError

    t5, bart = tiny_model(t5_small_path), tiny_model(bart_path)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    mode = engine._packed_encoder_mode
    assert mode(t5, cpu, False, 16384) is None  # CPU: not by default
    assert mode(t5, cuda, False, 16384) == "sdpa"  # float32 weights, no autocast: never flex
    assert mode(t5, cuda, False, 16384, pays=False) == "sdpa"
    half = copy.deepcopy(t5).to(torch.bfloat16)
    assert mode(half, cuda, False, 16384) == "flex"
    assert mode(half, cuda, False, engine.PACKED_MIN_TOKENS - 1) is None  # a small batch: transformers'
    monkeypatch.setattr(engine, "_PACKED_COMPILED", [])
    assert mode(half, cuda, False, 16384, pays=False) == "sdpa"  # a compilation the call would not repay
    monkeypatch.setattr(engine, "_PACKED_COMPILED", [True])
    assert mode(half, cuda, False, 16384, pays=False) == "flex"  # compiled already: free from now on
    monkeypatch.setattr(engine, "_PACKED_FAILED", ["InductorError: ..."])
    assert mode(half, cuda, False, 16384) == "sdpa"  # the compilation failed in this process
    monkeypatch.setattr(engine, "_PACKED_FAILED", [])
    assert mode(half, cuda, True, 16384) is None  # rows of several adapters (PEFT's per-row hooks)
    assert mode(bart.to(torch.bfloat16), cuda, False, 16384) is None  # not T5-family
    lora = get_peft_model(copy.deepcopy(half), LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    assert mode(lora, cuda, False, 16384) == "flex"
    tokens = get_peft_model(copy.deepcopy(half), LoraConfig(r=2, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM",
                                                             trainable_token_indices=[5, 6]))  # fmt: skip
    assert mode(tokens, cuda, False, 16384) == "flex"  # added tokens: the embedding is PEFT's wrapper
    prefix = get_peft_model(copy.deepcopy(half), PrefixTuningConfig(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"))
    assert mode(prefix, cuda, False, 16384) is None  # prompt learning changes the attention itself
    adapted = copy.deepcopy(half)
    add_adapters(adapted, AdapterConfig(reduction_factor=4))
    assert mode(adapted, cuda, False, 16384) is None  # bottleneck adapters wrap the attention modules
    monkeypatch.setattr(engine, "PACKED_ENCODER", "eager")
    assert mode(t5, cpu, False, 16384) == "eager" and mode(bart, cpu, False, 16384) is None
    assert mode(t5, cpu, False, 8) == "eager"  # forced: any batch
    monkeypatch.setattr(engine, "PACKED_ENCODER", "sdpa")
    assert mode(t5, cpu, False, 8) == "sdpa" and mode(bart, cpu, False, 16384) is None
    monkeypatch.setattr(engine, "PACKED_ENCODER", "off")
    assert mode(half, cuda, False, 16384) is None
    monkeypatch.setattr(engine, "PACKED_ENCODER", "fast")
    with pytest.raises(SettingError, match="FLANTUNE_PACKED_ENCODER='fast'"):
        mode(half, cuda, False, 16384)
    # On the command line: one line naming the variable, exit status 2, no traceback.
    with pytest.raises(SystemExit) as stopped:
        user_errors(lambda: mode(half, cuda, False, 16384))()
    assert stopped.value.code == 2 and "FLANTUNE_PACKED_ENCODER='fast'" in capsys.readouterr().err


def test_generate_outputs_from_given_token_ids(setup, monkeypatch):
    """`encoded` (a split's input_ids) is decoded as the tokenized sources are, without tokenizing
    them again; a list of another length is refused."""
    from flantune import decoding
    from flantune.config import GenerationConfig

    model, tokenizer, _ = setup
    cfg = GenerationConfig(max_new_tokens=4)
    expected = decoding.generate_outputs(model, tokenizer, SOURCES, cfg, batch_size=2, max_source_tokens=6)
    encoded = tokenizer(SOURCES, truncation=True, max_length=6)["input_ids"]
    calls = []
    monkeypatch.setattr(type(tokenizer), "__call__", lambda *a, **k: calls.append(a) or pytest.fail("tokenized"))
    got = decoding.generate_outputs(model, tokenizer, SOURCES, cfg, batch_size=2, max_source_tokens=6,
                                    encoded=encoded)  # fmt: skip
    assert got == expected and not calls
    with pytest.raises(ValueError, match="one list of token ids per source"):
        decoding.generate_outputs(model, tokenizer, SOURCES, cfg, encoded=encoded[:-1])


def test_generate_outputs_asks_for_the_packed_encoder_where_it_pays(setup, monkeypatch):
    """generate_outputs passes packed_encoder=True when its batches of at least PACKED_MIN_TOKENS
    padded source tokens hold PACKED_PAYS_TOKENS in all, False otherwise; RL's sample_groups always."""
    from flantune import decoding
    from flantune.config import GenerationConfig

    model, tokenizer, _ = setup
    asked = []
    real = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *a, **k: asked.append(k["packed_encoder"]) or real(*a, **k))
    cfg = GenerationConfig(max_new_tokens=2)
    longest = len(tokenizer(SOURCES[2])["input_ids"])  # the first batch (sorted) starts with it
    monkeypatch.setattr(engine, "PACKED_MIN_TOKENS", 2 * longest)  # the first batch of 2 counts, not the rest
    for pays, expected in ((2 * longest, True), (2 * longest + 1, False)):
        monkeypatch.setattr(engine, "PACKED_PAYS_TOKENS", pays)
        asked.clear()
        decoding.generate_outputs(model, tokenizer, SOURCES, cfg, batch_size=2)
        assert asked == [expected] * 3
    asked.clear()
    batch = tokenizer(SOURCES[:2], return_tensors="pt", padding=True)
    decoding.sample_groups(model, batch["input_ids"], batch["attention_mask"], group_size=2, first_row=0, seed=0,
                           max_new_tokens=2)  # fmt: skip
    assert asked == [True]

# --- On the GPU: the step captured as a real CUDA graph ----------------------------------------------


def on_cuda(path: str, sources: list[str], t5_scale: float = 2.0):
    """(model, tokenizer, batch) as `setup` gives them, on the GPU, in float32; no kept graphs."""
    engine.clear_graphs()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(sources, return_tensors="pt", padding=True).to("cuda")
    return tiny_model(path, t5_scale).cuda(), tokenizer, batch


@pytest.fixture(params=["t5", "bart"])
def cuda_path(request, t5_small_path, bart_path):
    yield t5_small_path if request.param == "t5" else bart_path
    engine.clear_graphs()


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_greedy_with_graphs_equals_generate(cuda_path):
    """The captured step replayed gives generate's greedy ids; graphs=None picks it on CUDA (the
    second call replays the kept graph)."""
    model, _, batch = on_cuda(cuda_path, SOURCES)
    ours = run(model, batch, graphs=True).sequences
    expected = reference(model, batch)
    assert torch.equal(ours, expected), (ours, expected)
    (entry,) = engine._GRAPHS.values()
    assert entry.graph is not None and entry.rows == 8
    assert torch.equal(run(model, batch).sequences, expected)
    assert list(engine._GRAPHS.values()) == [entry]
    assert torch.equal(run(model, batch, graphs=False).sequences, expected)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_sampling_with_and_without_graphs(cuda_path):
    """One seeded CUDA generator, the same samples and log-probabilities with and without graphs."""
    model, _, batch = on_cuda(cuda_path, SOURCES, t5_scale=1.0)
    options = dict(do_sample=True, temperature=2.0, top_p=0.9, num_return_sequences=3, return_logprobs=True)
    outs = {}
    for graphs in (False, True):
        generator = torch.Generator("cuda").manual_seed(3)
        outs[graphs] = run(model, batch, graphs=graphs, generator=generator, **options)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].logprobs, outs[False].logprobs, atol=1e-4, rtol=0)
    assert (outs[True].sequences.shape[0], engine.row_bucket(15)) == (15, 16)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_finished_rows_leave_the_captured_batch(cuda_path, monkeypatch):
    """Compaction under CUDA graphs (float32, COMPACT_FROM_ROWS lowered): at the checks (every 8
    steps) the rows still decoding move to the kept decoder of a smaller bucket, whose step is
    recorded at the position they join at; greedy ids equal generate's and the uncompacted run's,
    keyed samples (RL's streams) equal the uncompacted run's."""
    from flantune.decoding import KeyedSampling, row_keys

    sources = SOURCES * 3  # 15 rows: bucket 16, then 8 or less
    model, _, batch = on_cuda(cuda_path, sources)
    compacted = []
    real = engine._GraphedDecoder.compact
    monkeypatch.setattr(engine._GraphedDecoder, "compact", lambda self, keep, position, bucket, tokens: compacted.append(
        (keep.numel(), position, bucket)) or real(self, keep, position, bucket, tokens))  # fmt: skip
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 4)  # 16 rows, then a bucket of 8 or 4
    keyed = KeyedSampling(row_keys(5, torch.arange(len(sources), device="cuda")), temperature=0.8, top_k=20)
    out = {}
    with eos_made_likelier(model, batch, quantile=0.45):
        expected = model.generate(**batch, max_new_tokens=24, do_sample=False, num_beams=1)
        for lowest in (10**9, 1):
            monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", lowest)
            out[lowest] = (engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24).sequences,
                           engine.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24,
                                           do_sample=True, logits_processor=[keyed]).sequences)  # fmt: skip
    assert compacted and all(position % 8 == 0 and bucket >= 4 for _, position, bucket in compacted), compacted
    assert torch.equal(out[1][0], expected) and torch.equal(out[10**9][0], expected)
    assert torch.equal(out[1][1], out[10**9][1])


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_shorter_sources_replay_the_step_of_longer_ones(cuda_path):
    """Under CUDA graphs, batches of shorter sources (bucket 128, then 64... past SOURCE_REUSE) after
    a batch of bucket 192: the captured step of 192 serves the 128 batch with generate's ids (its
    extra source positions masked out); the 64 batch records its own."""
    words = lambda n: " ".join(["word"] * n)  # noqa: E731
    model, tokenizer, _ = on_cuda(cuda_path, SOURCES)
    for lengths, kept in (((180, 150, 130), [192]), ((120, 100, 97), [192]), ((60, 10, 3), [64, 192])):
        batch = tokenizer([words(n) for n in lengths], return_tensors="pt", padding=True).to("cuda")
        ours = run(model, batch).sequences
        assert torch.equal(ours, reference(model, batch)), lengths
        assert sorted(e.source_len for e in engine._GRAPHS.values()) == kept
        assert all(e.graph is not None for e in engine._GRAPHS.values())


@pytest.mark.cuda
def test_cuda_another_batch_replays_the_kept_graph(cuda_path):
    """A second batch of another size in the same bucket (and longer sources in the same 64) replays
    the graph recorded for the first, with generate's output; the first batch again gives its own
    output (the caches were reset: positions, the cross-attention keys/values)."""
    model, tokenizer, batch = on_cuda(cuda_path, SOURCES)
    first = run(model, batch, graphs=True).sequences
    assert torch.equal(first, reference(model, batch))
    (entry,) = engine._GRAPHS.values()
    graph = entry.graph
    other = tokenizer([*SOURCES[::-1], "c d e", "an answer: " * 8], return_tensors="pt", padding=True)
    other = other.to("cuda")
    second = run(model, other, graphs=True).sequences
    assert torch.equal(second, reference(model, other)), (second, reference(model, other))
    assert list(engine._GRAPHS.values()) == [entry] and entry.graph is graph
    assert torch.equal(run(model, batch, graphs=True).sequences, first)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_beam_search_with_graphs_equals_generate(cuda_path):
    """float32 on the GPU, the step replayed and the cache reordered between replays: the beams
    equal transformers' beam search on the same device."""
    model, _, batch = on_cuda(cuda_path, SOURCES)
    options = {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}
    with eos_made_likelier(model, batch, 0.5):
        graphed = run(model, batch, graphs=True, **options).sequences
        expected = reference(model, batch, **options)
    assert torch.equal(graphed, expected), (graphed, expected)


def _lora_with_token_rows(model, seed: int = 1):
    """A LoRA model of `model` (a copy) with trainable token rows 5 and 6, every weight random."""
    from peft import LoraConfig, get_peft_model

    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False, task_type="SEQ_2_SEQ_LM",
        trainable_token_indices=[5, 6],
    )  # fmt: skip
    peft_model = get_peft_model(_copy(model), config).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0, 1)
    return peft_model


def test_capturable_token_rows_give_pefts_values_and_gradients(setup):
    """Within graphs.capturable_token_rows, PEFT's trainable-token layers (added tokens) read a
    device-held index instead of building one from a list at each forward (a copy that capture
    refuses; BART's embedding scale likewise): the logits and the gradients of the token deltas
    equal PEFT's own, and PEFT's methods are back afterwards."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    from flantune.graphs import capturable_token_rows

    model, _, batch = setup
    peft_model = _lora_with_token_rows(model)
    decoder_ids = torch.tensor([[0, 5, 6, 7]] * batch["input_ids"].shape[0])
    inputs = {**batch, "input_ids": batch["input_ids"].clone()}
    inputs["input_ids"][:, 0] = 6  # the added rows in the encoder's input too

    def logits_and_grads():
        peft_model.zero_grad()
        logits = peft_model(**inputs, decoder_input_ids=decoder_ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n}
        return logits.detach(), grads

    original = TrainableTokensLayer.get_merged_weights, TrainableTokensLayer._get_embed_scale
    expected, expected_grads = logits_and_grads()
    with capturable_token_rows():
        with capturable_token_rows():  # nested (a warm-up inside another): patched once
            patched = TrainableTokensLayer.get_merged_weights, TrainableTokensLayer._get_embed_scale
            assert patched[0] is not original[0] and patched[1] is not original[1]
        assert (TrainableTokensLayer.get_merged_weights, TrainableTokensLayer._get_embed_scale) == patched
        ours, grads = logits_and_grads()
    assert (TrainableTokensLayer.get_merged_weights, TrainableTokensLayer._get_embed_scale) == original
    # The token layers the forward ran (T5: the encoder's and decoder's embeddings, not the unused
    # `shared` wrapper; BART: also its tied head) took the device-held index, and BART's embeddings
    # (BartScaledWordEmbedding, a float scale) the device-held scale.
    ran = [m for m in peft_model.modules() if isinstance(m, TrainableTokensLayer) and "_device_token_index" in m.__dict__]
    assert len(ran) >= 2
    if model.config.model_type == "bart":
        embeddings = [m for m in ran if isinstance(m.base_layer, torch.nn.Embedding)]  # (the tied head: Linear)
        assert embeddings and all(m.__dict__.get("_device_embed_scale") for m in embeddings)
    assert expected_grads and all(g.abs().sum() > 0 for g in expected_grads.values())
    torch.testing.assert_close(ours, expected, atol=0, rtol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-6)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
@pytest.mark.parametrize("compiled", [False, True], ids=["captured", "compiled"])
def test_cuda_lora_with_token_rows_is_captured_and_sees_updates(cuda_path, compiled, monkeypatch):
    """A LoRA policy with added tokens (`flantune rl` of a recipe with model.add_tokens) through the
    captured step, and through the step compiled by inductor then captured: generate's ids; after
    the token deltas and LoRA weights change in place (an optimizer step), the kept graph replays
    with the new values, and gives generate's ids again."""
    monkeypatch.setattr(engine, "COMPILE_STEP", compiled)
    torch._dynamo.reset()
    model, _, batch = on_cuda(cuda_path, SOURCES)
    peft_model = _lora_with_token_rows(model.cpu()).cuda()
    batch = {**batch, "input_ids": batch["input_ids"].clone()}
    batch["input_ids"][:, 0] = 6
    ours = run(peft_model, batch, graphs=True).sequences
    assert torch.equal(ours, reference(peft_model, batch)), (ours, reference(peft_model, batch))
    (entry,) = engine._GRAPHS.values()
    graph = entry.graph
    assert entry.compiled == compiled
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p), alpha=0.5 if "lora_" in name else 2.0)
    again = run(peft_model, batch, graphs=True).sequences
    assert list(engine._GRAPHS.values()) == [entry] and entry.graph is graph  # replayed, not recaptured
    assert torch.equal(again, reference(peft_model, batch)), (again, reference(peft_model, batch))
    assert not torch.equal(again, ours)
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_adapter_rows_are_captured(cuda_path):
    """float32 on the GPU: rows of adapters a, b and the base gathered per row, the step captured and
    replayed for a second mix, equal PEFT's adapter_names hooks run eagerly."""
    from flantune.lora_rows import LoraRows

    model, _, batch = on_cuda(cuda_path, SOURCES)
    peft_model = lora_pair(model)
    gathered = LoraRows(peft_model, ["a", "b"], capacity=8)
    for names in (["a", "b", "__base__", "b", "a"], ["b", "__base__", "a", "a", "b"]):
        expected = run(peft_model, batch, adapter_names=names, graphs=False).sequences
        ours = run(peft_model, batch, adapter_names=names, adapter_rows=gathered).sequences
        assert torch.equal(ours, expected), (names, ours, expected)
    (entry,) = engine._GRAPHS.values()
    assert entry.graph is not None


@pytest.fixture
def compiled_step(monkeypatch):
    """engine.COMPILE_STEP on, with inductor (the GPU's default backend), dynamo's caches reset."""
    monkeypatch.setattr(engine, "COMPILE_STEP", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_compiled_step_equals_generate(cuda_path, compiled_step):
    """The step compiled by inductor, then captured, in float32 on the GPU: greedy and beam search
    give generate's ids token for token; seeded sampling gives the uncompiled graph's samples and
    log-probabilities (within float32 reassociation: inductor fuses the reductions)."""
    model, _, batch = on_cuda(cuda_path, SOURCES)
    ours = run(model, batch, graphs=True).sequences
    assert torch.equal(ours, reference(model, batch)), (ours, reference(model, batch))
    options = {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}
    with eos_made_likelier(model, batch, 0.5):
        beams = run(model, batch, graphs=True, **options).sequences
        expected = reference(model, batch, **options)
    assert torch.equal(beams, expected), (beams, expected)

    sampler = tiny_model(cuda_path, 1.0).cuda() if model.config.model_type == "t5" else model
    options = dict(do_sample=True, temperature=2.0, top_p=0.9, num_return_sequences=3, return_logprobs=True)
    outs = {}
    for compiled in (True, False):
        engine.COMPILE_STEP = compiled
        engine.clear_graphs()
        outs[compiled] = run(sampler, batch, graphs=True, generator=torch.Generator("cuda").manual_seed(3), **options)
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].logprobs, outs[False].logprobs, atol=1e-4, rtol=0)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_compiled_layers_equal_generate(t5_small_path, monkeypatch):
    """T5's own step with its layer compiled by inductor (one graph for every layer), then captured,
    in float32 on the GPU: greedy and beam search give generate's ids token for token, also for a
    second batch of another shape (the recompiled, dynamic layer); seeded sampling gives the
    uncompiled graph's samples and log-probabilities (within float32 reassociation)."""
    torch._dynamo.reset()
    monkeypatch.setattr(engine.t5_decode, "_COMPILED", None)
    model, tokenizer, batch = on_cuda(t5_small_path, SOURCES)
    for sources in (SOURCES, SOURCES[:3] * 3):
        batch = tokenizer(sources, return_tensors="pt", padding=True).to("cuda")
        ours = run(model, batch, graphs=True, compile_layers=True).sequences
        assert torch.equal(ours, reference(model, batch)), (ours, reference(model, batch))
    options = {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}
    with eos_made_likelier(model, batch, 0.5):
        beams = run(model, batch, graphs=True, compile_layers=True, **options).sequences
        expected = reference(model, batch, **options)
    assert torch.equal(beams, expected), (beams, expected)

    sampler = tiny_model(t5_small_path, 1.0).cuda()
    options = dict(do_sample=True, temperature=2.0, top_p=0.9, num_return_sequences=3, return_logprobs=True)
    outs = {}
    for layers in (True, False):
        engine.clear_graphs()
        outs[layers] = run(sampler, batch, graphs=True, compile_layers=layers,
                           generator=torch.Generator("cuda").manual_seed(3), **options)  # fmt: skip
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].logprobs, outs[False].logprobs, atol=1e-4, rtol=0)
    engine.clear_graphs()
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_shared_cross_attention_equals_copies(t5_small_path, monkeypatch):
    """RL's shape on the GPU, float32, captured: 4 prompts x 8 keyed samples reading one copy of each
    prompt's cross-attention keys/values give the completions of a copy per row, log-probabilities
    within float32 rounding; the same with 4 beams against generate."""
    from flantune.decoding import KeyedSampling, row_keys

    model, tokenizer, _ = on_cuda(t5_small_path, SOURCES, t5_scale=1.0)
    batch = tokenizer(SOURCES[:4], return_tensors="pt", padding=True).to("cuda")
    outs = {}
    for share in (True, False):
        monkeypatch.setattr(engine, "SHARE_CROSS", share)
        engine.clear_graphs()
        keyed = KeyedSampling(row_keys(3, torch.arange(32, device="cuda")), temperature=1.5)
        outs[share] = run(model, batch, graphs=True, do_sample=True, num_return_sequences=8, logits_processor=[keyed],
                          return_logprobs=True)  # fmt: skip
    assert torch.equal(outs[True].sequences, outs[False].sequences)
    torch.testing.assert_close(outs[True].logprobs, outs[False].logprobs, atol=1e-5, rtol=0)
    monkeypatch.setattr(engine, "SHARE_CROSS", True)
    options = {"num_beams": 4, "num_return_sequences": 2, "early_stopping": True}
    assert torch.equal(run(model, batch, graphs=True, **options).sequences, reference(model, batch, **options))
    engine.clear_graphs()


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")  # a capture that fell back fails
def test_cuda_packed_cross_attention_equals_the_padded_one(t5_small_path, monkeypatch):
    """The packed cross-attention with torch's variable-length flash attention, bf16 on the GPU:
    step by step (the same tokens fed to both) its logits equal the padded cache's within bf16
    rounding, one row a source and 4 sharing one; captured, with sources leaving the batch, it
    decodes (the packed path taken) and its samples agree with the padded cache's on most rows."""
    from flantune import t5_decode
    from flantune.decoding import KeyedSampling, row_keys

    monkeypatch.setattr(t5_decode, "PACKED_CROSS", True)
    if not t5_decode.packed_cross_ready(torch.device("cuda"), torch.bfloat16, 64):
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn taking `scale`")
    model, _, batch = on_cuda(t5_small_path, SOURCES, t5_scale=1.0)
    model = model.to(torch.bfloat16)
    with torch.no_grad():
        hidden = model.get_encoder()(**batch).last_hidden_state  # (B, S, d)
        for copies in (1, 4):
            logits, tokens = {}, None
            for packed in (False, True):
                monkeypatch.setattr(t5_decode, "PACKED_CROSS", packed)
                decoder = engine._Decoder(model, hidden.repeat_interleave(copies, 0),
                                          batch["attention_mask"].repeat_interleave(copies, 0), 16, copies=copies)  # fmt: skip
                assert decoder.own.packed == packed and decoder.copies == copies
                decoder.tokens.fill_(model.config.decoder_start_token_id)
                decoder.fill_cross()
                steps = []
                for t in range(4):
                    steps.append(decoder.step().float())
                    if tokens is None or len(tokens) <= t:
                        tokens = [*(tokens or []), steps[-1].argmax(-1)]
                    decoder.tokens.copy_(tokens[t][:, None])
                logits[packed] = torch.stack(steps)
            torch.testing.assert_close(logits[True], logits[False], atol=3e-2, rtol=3e-2)

    monkeypatch.setattr(engine, "COMPACT_FROM_ROWS", 1)
    monkeypatch.setattr(engine, "COMPACT_FLOOR", 1)
    outs = {}
    for packed in (False, True):
        monkeypatch.setattr(t5_decode, "PACKED_CROSS", packed)
        engine.clear_graphs()
        keyed = KeyedSampling(row_keys(3, torch.arange(len(SOURCES) * 4, device="cuda")), temperature=1.5)
        outs[packed] = run(model, batch, graphs=True, do_sample=True, num_return_sequences=4,
                           logits_processor=[keyed]).sequences  # fmt: skip
    assert outs[True].shape[0] == len(SOURCES) * 4
    assert rows_equal_share(outs[True], outs[False]) >= 0.5
    engine.clear_graphs()


def rows_equal_share(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of rows equal token for token (the shorter output padded with pad 0)."""
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1])) for x in (a, b))
    return (a == b).all(1).float().mean().item()


@pytest.mark.cuda
def test_cuda_qlora_generates_as_transformers(t5_small_path, tmp_path):
    """A 4-bit (NF4, double quantization) model as `method: qlora` loads it, plain and with a LoRA
    adapter, float32 compute: the engine's ids equal transformers' generate on the same model, eager
    and with the step captured (bitsandbytes' dequantizing matmuls inside the graph)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig

    tiny_model(t5_small_path).save_pretrained(tmp_path / "model")
    quantized = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "model", device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32),
    ).eval()  # fmt: skip
    assert any("4bit" in type(m).__name__ for m in quantized.modules())
    tokenizer = AutoTokenizer.from_pretrained(t5_small_path)
    batch = tokenizer(SOURCES, return_tensors="pt", padding=True).to("cuda")
    engine.clear_graphs()
    expected = reference(quantized, batch)
    for graphs in (False, True):
        ours = run(quantized, batch, graphs=graphs).sequences
        assert torch.equal(ours, expected), (graphs, ours, expected)
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q", "v"], init_lora_weights=False,
                        task_type="SEQ_2_SEQ_LM")  # fmt: skip
    lora = get_peft_model(quantized, config).eval()
    expected_lora = reference(lora, batch)
    assert not torch.equal(expected_lora, expected)  # the adapter changes the answers
    for graphs in (False, True):
        ours = run(lora, batch, graphs=graphs).sequences
        assert torch.equal(ours, expected_lora), (graphs, ours, expected_lora)
    engine.clear_graphs()


@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["flex", "sdpa"])
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")
def test_cuda_packed_flex_encoder_equals_transformers(t5_small_path, attention):
    """FlexAttention over the packed layout, the block compiled (what `auto` runs in 16-bit on a
    GPU; sdpa: the uncompiled blocks with the bias as SDPA's additive mask), against transformers'
    encoder over the padded batch in float32: in float32 every real
    token's output within 5e-5 of the output's largest value; in bfloat16 no farther from the
    float32 output than twice transformers' own bfloat16 encoder is (bf16 alone moves this tiny,
    large-weighted model's outputs by a third of their range on the CPU)."""
    from flantune import fast_t5, packing

    model = tiny_model(t5_small_path).cuda()
    ids, mask = _uneven_sources(model.config.vocab_size, "right", lengths=(40, 7, 600, 129, 1, 64, 500, 300))
    ids, mask, real = ids.cuda(), mask.cuda(), mask.cuda().bool()
    sources = packing.PackedSources(ids, mask, width=512)
    errors = {}
    with torch.no_grad():
        expected = model.get_encoder()(input_ids=ids, attention_mask=mask)[0]
        scale = float(expected[real].abs().max())
        for dtype in (torch.float32, torch.bfloat16):
            cast = copy.deepcopy(model).to(dtype)
            block = engine._packed_block() if attention == "flex" else None
            got = fast_t5.packed_encoder_output(cast, sources, attention, block_fn=block).float()
            theirs = cast.get_encoder()(input_ids=ids, attention_mask=mask)[0].float()
            assert not got[~real].any()
            errors[dtype] = (float((got - expected)[real].abs().max()), float((theirs - expected)[real].abs().max()))
    assert errors[torch.float32][0] <= 5e-5 * scale, errors
    assert errors[torch.bfloat16][0] <= 2 * errors[torch.bfloat16][1], errors


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:decoding engine. (step 1|the encoder pass|the packed encoder)")
def test_cuda_generate_with_the_packed_flex_encoder(t5_small_path, monkeypatch):
    """float32 with the packed FlexAttention encoder forced: generate's greedy and beam ids; in
    bfloat16 `auto` takes it (the compiled block runs, nothing falls back)."""
    from flantune import fast_t5

    model, _, batch = on_cuda(t5_small_path, SOURCES)
    calls = []
    real = fast_t5.packed_encoder_output
    monkeypatch.setattr(fast_t5, "packed_encoder_output", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    monkeypatch.setattr(engine, "PACKED_ENCODER", "flex")
    assert torch.equal(run(model, batch).sequences, reference(model, batch))
    options = {"num_beams": 3, "num_return_sequences": 2}
    assert torch.equal(run(model, batch, **options).sequences, reference(model, batch, **options))
    monkeypatch.setattr(engine, "PACKED_ENCODER", "auto")
    monkeypatch.setattr(engine, "PACKED_MIN_TOKENS", 0)  # these few short sources: packed all the same
    half = model.to(torch.bfloat16)
    ours = run(half, batch, packed_encoder=True).sequences
    assert calls == ["flex"] * 3 and ours.shape[0] == len(SOURCES) and not engine._PACKED_FAILED


def test_a_kept_recording_holds_no_weights_of_its_model(t5_small_path, graphs_on_cpu, monkeypatch):
    """The own T5 step's options name the model's own weights (the residual products, FUSE_PROJECTIONS
    forced on the CPU): they are dropped when the call ends, so the recordings kept for later calls
    hold none of the model's tensors (a deleted model's memory is freed); the next call of the same
    model sets them up again and decodes the same ids."""
    from flantune import t5_decode

    def tensors(value, seen):  # every tensor an object reaches through its attributes and containers
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            for item in value:
                yield from tensors(item, seen)
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item, seen)
        elif hasattr(value, "__dict__") and id(value) not in seen and not isinstance(value, torch.nn.Module):
            seen.add(id(value))
            yield from tensors(vars(value), seen)

    monkeypatch.setattr(t5_decode, "FUSE_PROJECTIONS", "1")
    model = tiny_model(t5_small_path)
    batch = AutoTokenizer.from_pretrained(t5_small_path)(SOURCES, return_tensors="pt", padding=True)
    first = run(model, batch).sequences
    kept = [entry.decoder.own for entry in engine._GRAPHS.values() if entry.decoder.own is not None]
    assert kept and all(own._arguments is None and own._head is None for own in kept)
    weights = {p.data_ptr() for p in model.parameters()}
    assert not any(t.data_ptr() in weights for own in kept for t in tensors(own, set()))
    assert torch.equal(run(model, batch).sequences, first)  # set up again from the model
    calls = [own for own in kept if own._arguments is not None]
    assert not calls  # and dropped again


def test_kept_entries_go_with_their_model(monkeypatch):
    """The recorded steps and encoder passes kept for a model are dropped once the model is
    collected (with their caches and graph pools: at the engine's next call, `drop_collected`), not
    when newer entries push them out; another model's stay."""
    import gc
    import weakref
    from collections import OrderedDict

    monkeypatch.setattr(engine, "_GRAPHS", OrderedDict())
    monkeypatch.setattr(engine, "_ENCODERS", OrderedDict())

    class Entry:
        def __init__(self, model):
            self.model_ref, self.routing_ref, self.fingerprint = weakref.ref(model), (lambda: None), ()

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    for model in (first, second):
        for kept in (engine._GRAPHS, engine._ENCODERS):
            for bucket in (32, 128):
                engine._kept(kept, (id(model), bucket), 8, model, None, (), lambda model=model: Entry(model))
    assert len(engine._GRAPHS) == len(engine._ENCODERS) == 4
    del first, model
    gc.collect()
    engine.drop_collected()  # (noted at the collection, dropped at the engine's next call)
    assert [key[0] for key in engine._GRAPHS] == [id(second)] * 2
    assert [key[0] for key in engine._ENCODERS] == [id(second)] * 2
