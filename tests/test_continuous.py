"""Continuous batching's decode step (flantune.continuous.Slots), T5 and BART, against transformers' forward: rows
that join a running batch at different steps, each at its own position, get the logits a
teacher-forced forward of their own sequence gives; with a LoRA adapter, and with rows of two
adapters and the base in one step (PEFT's adapter names)."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from flantune import continuous

from .conftest import tiny_config

SOURCES = ["question: is the sky blue?", "a", "translate English to German: the house is small", "b c d e f"]


@pytest.fixture(scope="module", params=["t5", "bart"])
def t5(request, t5_small_path, bart_path):
    """A tiny random T5 or BART of the published architecture, float64, weights scaled up so that
    greedy decoding moves (at the default scale it repeats one token)."""
    path = t5_small_path if request.param == "t5" else bart_path
    cfg = tiny_config(path)
    cfg.update({"initializer_factor": 2.0} if cfg.model_type == "t5" else {"init_std": 0.3})
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval().double()
    return model, AutoTokenizer.from_pretrained(path)


def assert_logits_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """float64 on both sides: the sums over 8 cache slots (future ones masked) and over the t keys a
    forward sees differ only by rounding, far below 1e-9 of the largest logit (near 100 for T5 at the
    2x weight scale, near 7 for BART)."""
    scale = expected.abs().max()
    assert scale > 1
    torch.testing.assert_close(got, expected, atol=float(1e-9 * scale), rtol=0)


def reference_logits(model, tokenizer, source: str, decoder_ids: list[int]) -> torch.Tensor:
    """(T, V) logits of a teacher-forced forward of one row alone."""
    batch = tokenizer([source], return_tensors="pt")
    with torch.no_grad():
        ids = torch.tensor([decoder_ids], device=batch["input_ids"].device)
        return model(**batch, decoder_input_ids=ids).logits[0]


def hooks(model, names):
    """PEFT's per-row adapter names for the calls inside (nothing without names)."""
    import contextlib

    return contextlib.nullcontext() if names is None else model._enable_peft_forward_hooks(adapter_names=names)


def run_staggered(model, tokenizer, joins: dict[int, int], steps: int, names: dict[int, str] | None = None,
                  gathered: bool = False, graphs: bool | None = False):  # fmt: skip
    """Rows join at the steps `joins` gives (source index -> step), each in its own slot; every row
    feeds greedy's tokens back. `names`: each source's LoRA adapter ("__base__": none), all in one
    step, routed by PEFT's adapter names, or with `gathered` by the slots' own per-row LoRA (in the
    encoder pass too). Returns, per source, the logits of each of its steps and its
    ids. graphs: the slots' `graphs` (the step then runs through `run`, over the slots in use)."""
    start = model.config.decoder_start_token_id if not hasattr(model, "get_base_model") else \
        model.get_base_model().config.decoder_start_token_id  # fmt: skip
    adapters = sorted(model.peft_config) if gathered else None
    slots = continuous.Slots(model, capacity=6, max_new_tokens=steps + 2, max_source_tokens=32, adapters=adapters,
                             graphs=graphs)  # fmt: skip
    logits_of = {i: [] for i in joins}
    ids_of = {i: [start] for i in joins}
    slot_of = {}
    for t in range(steps + max(joins.values())):
        joining = [i for i, at in joins.items() if at == t]
        if joining:  # the sources joining at this step: one pass, padded to the longest
            for i in joining:
                slot_of[i] = len(slot_of) + 1  # slot 0 stays free: free slots must not disturb live ones
            batch = tokenizer([SOURCES[i] for i in joining], return_tensors="pt", padding=True)
            row_adapters = [None if names[i] == "__base__" else names[i] for i in joining] if gathered else None
            with hooks(model, None if names is None or gathered else [names[i] for i in joining]):
                slots.join([slot_of[i] for i in joining], batch["input_ids"], batch["attention_mask"], start,
                           adapters=row_adapters)  # fmt: skip
        by_slot = ["__base__"] * slots.capacity
        for i, slot in slot_of.items():
            by_slot[slot] = names[i] if names else "__base__"
        with hooks(model, None if names is None or gathered else by_slot):
            # run's logits are the captured step's output, rewritten by the next replay: kept as copies.
            logits = slots.run(1 + max(slot_of.values())).clone() if graphs is not False else slots.step()  # (R, V)
        chosen = torch.zeros(slots.capacity, dtype=torch.long, device=logits.device)  # (R,)
        chosen[: logits.shape[0]] = logits.argmax(-1)
        for i, slot in slot_of.items():
            if len(ids_of[i]) <= steps:
                logits_of[i].append(logits[slot])
                ids_of[i].append(int(chosen[slot]))
        slots.advance(chosen)
    return logits_of, ids_of


def test_rows_joining_at_different_steps_match_their_own_forward(t5):
    model, tokenizer = t5
    steps = 6
    joins = {0: 0, 1: 2, 2: 3, 3: 3}
    logits_of, ids_of = run_staggered(model, tokenizer, joins, steps)
    for i in joins:
        expected = reference_logits(model, tokenizer, SOURCES[i], ids_of[i][:-1])  # (steps, V)
        assert_logits_close(torch.stack(logits_of[i]), expected)
    assert len({tuple(ids) for ids in ids_of.values()}) > 1


def two_adapters(model):
    """A PEFT copy of `model` with LoRA adapters a (r 4) and b (r 2, another scaling) on attention
    and feed-forward layers, random non-zero weights."""
    from peft import LoraConfig, get_peft_model

    clone = AutoModelForSeq2SeqLM.from_config(model.config).eval().to(model.dtype).to(model.device)
    clone.load_state_dict(model.state_dict())
    targets = ["q", "v", "o", "wi_0"] if model.config.model_type == "t5" else ["q_proj", "v_proj", "out_proj", "fc1"]
    torch.manual_seed(1)
    peft_model = get_peft_model(clone, LoraConfig(r=4, lora_alpha=32, target_modules=targets, init_lora_weights=False,
                                                  task_type="SEQ_2_SEQ_LM"), adapter_name="a")  # fmt: skip
    peft_model.add_adapter("b", LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False,
                                           task_type="SEQ_2_SEQ_LM"))  # fmt: skip
    torch.manual_seed(2)
    for name, param in peft_model.named_parameters():
        if ".b." in name:
            param.data.normal_(0, 0.3)
    return peft_model.eval()


def check_each_row(peft_model, tokenizer, names, logits_of, ids_of, close=None) -> None:
    """Each row's logits equal a forward of its own sequence under its own adapter alone."""
    for i, name in names.items():
        if name == "__base__":
            with peft_model.disable_adapter():
                expected = reference_logits(peft_model, tokenizer, SOURCES[i], ids_of[i][:-1])
        else:
            peft_model.set_adapter(name)
            expected = reference_logits(peft_model, tokenizer, SOURCES[i], ids_of[i][:-1])
        (close or assert_logits_close)(torch.stack(logits_of[i]), expected)
    peft_model.set_adapter("a")


MIXED = {0: "a", 1: "b", 2: "__base__", 3: "b"}  # each source's adapter
MIXED_JOINS = {0: 0, 1: 1, 2: 1, 3: 1}  # the step each source joins at (three at once at step 1)


class EagerGraph:
    """A captured step's stand-in on the CPU: replay reruns the step into the recorded output."""

    def __init__(self, fn, output):
        self.fn, self.output = fn, output

    def replay(self):
        self.output.copy_(self.fn())


def test_the_captured_step_branch_on_cpu(t5, monkeypatch):
    """`run` and `join` with graphs, the capture swapped for eager calls (the CPU has none): rows of
    two adapters and the base joining at different steps get their own forward's logits. One step
    capture is made per row bucket used (slots 0-1, then 0-4 of 6: buckets 2 and 6, the capacity),
    none again when a bucket comes back; one join capture per (row bucket, source length): one
    source, then three (a bucket of 4: a padding row repeating the last), none for a join that
    comes back to a bucket."""
    model, tokenizer = t5
    peft_model = two_adapters(model)
    recorded, fused = [], []

    def record(fn, stream, pool=None):
        fused.append(any("forward" in vars(m) for m in peft_model.modules()))
        output = fn().clone()
        # a step's logits (rows, V); a join's slot index (rows,)
        recorded.append(output.shape[0] if output.dim() == 2 else ("join", output.shape[0]))
        return EagerGraph(fn, output), output

    monkeypatch.setattr(continuous, "_can_capture", lambda device: True)
    monkeypatch.setattr(continuous, "CAPTURE_JOINS", True)
    monkeypatch.setattr(continuous, "_warm_up", lambda fn, times: [fn() for _ in range(times)])
    monkeypatch.setattr(continuous, "_record", record)
    logits_of, ids_of = run_staggered(peft_model, tokenizer, MIXED_JOINS, 5, MIXED, gathered=True, graphs=True)
    check_each_row(peft_model, tokenizer, MIXED, logits_of, ids_of)
    assert recorded == [("join", 1), 2, ("join", 4), 6]
    # Recorded with the fused norms and activations (flantune.engine.fused_layers), put back after.
    t5_layers = model.config.model_type == "t5"  # BART has no T5 norms nor gelu_new: nothing to fuse
    assert fused == [t5_layers] * 4 and not any("forward" in vars(m) for m in peft_model.modules())
    recorded.clear()
    logits_of, ids_of = run_staggered(peft_model, tokenizer, {0: 0, 1: 0, 2: 1, 3: 2}, 4, MIXED, gathered=True,
                                      graphs=True)  # fmt: skip
    check_each_row(peft_model, tokenizer, MIXED, logits_of, ids_of)


def test_with_a_lora_adapter_and_mixed_adapter_rows(t5):
    model, tokenizer = t5
    peft_model = two_adapters(model)
    peft_model.set_adapter("a")
    logits_of, ids_of = run_staggered(peft_model, tokenizer, {0: 0, 2: 1}, 5)
    for i in (0, 2):
        expected = reference_logits(peft_model, tokenizer, SOURCES[i], ids_of[i][:-1])
        assert_logits_close(torch.stack(logits_of[i]), expected)
    with peft_model.disable_adapter():
        base_logits = reference_logits(peft_model, tokenizer, SOURCES[0], ids_of[0][:-1])
    assert not torch.allclose(base_logits, torch.stack(logits_of[0]), atol=1e-3)  # the adapter acted

    # Rows of adapters a and b (another rank and scaling: the gathered tables pad ranks with zeros)
    # and of the base in the same steps, each equal to its adapter alone: routed by PEFT's adapter
    # names, then by each row's A and B gathered by index.
    for gathered in (False, True):
        logits_of, ids_of = run_staggered(peft_model, tokenizer, MIXED_JOINS, 5, MIXED, gathered=gathered)
        check_each_row(peft_model, tokenizer, MIXED, logits_of, ids_of)


def test_cache_bytes_are_what_the_slots_hold(t5):
    model, _ = t5
    slots = continuous.Slots(model, capacity=3, max_new_tokens=5, max_source_tokens=7, dtype=torch.bfloat16)
    held = sum(t.numel() * t.element_size() for t in (*slots.keys, *slots.values, *slots.cross_keys, *slots.cross_values))
    assert continuous.cache_bytes(model, 3, 5, 7, torch.bfloat16) == held
    assert continuous.cache_bytes(model, 3, 5, 7) == 4 * held  # the model's own float64


def test_other_architectures_are_refused():
    from transformers import MarianConfig, MarianMTModel

    model = MarianMTModel(MarianConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                       decoder_ffn_dim=32, max_position_embeddings=64, pad_token_id=63,
                                       decoder_start_token_id=63))  # fmt: skip
    assert not continuous.supports(model)
    with pytest.raises(ValueError, match="marian: continuous batching drives bart, mt5, t5 models"):
        continuous.Slots(model, capacity=2, max_new_tokens=4, max_source_tokens=8)


def test_t5_models_the_decode_step_does_not_run_are_refused(t5_small_path):
    """T5's continuous step is flantune.t5_decode's layer: a T5 it does not run (here a hook on a
    decoder block, as Accelerate's offloading sets) is refused, with t5_decode's reason."""
    cfg = tiny_config(t5_small_path)
    model = AutoModelForSeq2SeqLM.from_config(cfg).eval()
    assert continuous.supports(model)
    model.decoder.block[1].register_forward_hook(lambda *args: None)
    assert not continuous.supports(model)
    with pytest.raises(ValueError, match=r"t5: continuous batching .* \(decoder block 1: hooks on T5Block\)"):
        continuous.Slots(model, capacity=2, max_new_tokens=4, max_source_tokens=8)


def test_a_step_over_the_lowest_slots_equals_the_full_step(t5):
    """step(rows=k) computes slots 0..k-1 only, with the logits and cache writes of a full step (up to
    float64 rounding: matrix products of another row count may sum in another order)."""
    model, tokenizer = t5
    batch = tokenizer(SOURCES[:2], return_tensors="pt", padding=True)
    outs = []
    for rows in (None, 2):
        slots = continuous.Slots(model, capacity=5, max_new_tokens=4, max_source_tokens=32)
        hidden = model.get_encoder()(**batch).last_hidden_state
        slots.admit([0, 1], hidden, batch["attention_mask"], model.config.decoder_start_token_id)
        logits = []
        for _ in range(3):
            step = slots.step(rows)[:2]
            logits.append(step)
            chosen = torch.zeros(5, dtype=torch.long)
            chosen[:2] = step.argmax(-1)
            slots.advance(chosen)
        outs.append((torch.stack(logits), [k[:2].clone() for k in slots.keys]))
    assert_logits_close(outs[1][0], outs[0][0])
    for full, part in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(part, full, atol=1e-12, rtol=0)


@pytest.mark.cuda
def test_cuda_rows_joining_at_different_steps_match_their_own_forward(t5):
    """On the GPU in float32: the staggered rows' logits equal each row's own forward (float32
    products of other shapes round differently, and two sources joining together are padded to the
    longer: within 1e-4 of the largest logit; on the CPU in float32 the padded row is off by 9.4e-6
    of it at this weight scale, in float64 by less than 1e-9, the CPU tests' bound)."""
    model, tokenizer = t5
    model = AutoModelForSeq2SeqLM.from_config(model.config).eval().cuda()
    model.load_state_dict({k: v.float() for k, v in t5[0].state_dict().items()})

    class OnCuda:  # the tokenizer's tensors on the GPU
        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs).to("cuda")

    joins = {0: 0, 1: 2, 2: 3, 3: 3}
    logits_of, ids_of = run_staggered(model, OnCuda(), joins, 6)
    for i in joins:
        expected = reference_logits(model, OnCuda(), SOURCES[i], ids_of[i][:-1])
        got = torch.stack(logits_of[i])
        torch.testing.assert_close(got, expected, atol=float(1e-4 * expected.abs().max()), rtol=0)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error:continuous batching")  # a join that could not be captured fails here
def test_cuda_captured_mixed_adapter_rows_match_their_own_forward(t5, monkeypatch):
    """On the GPU in float32, the step captured per row bucket and replayed, and each join's encoder
    pass captured per bucket: rows of two LoRA adapters and the base, gathered per row, joining at
    different steps (three at once: a padded join), each get the logits of its own forward under its
    own adapter (within 1e-4 of the largest logit: float32 products of other shapes and padded
    sources round differently, as in the test above)."""
    monkeypatch.setattr(continuous, "CAPTURE_JOINS", True)
    model, tokenizer = t5
    on_gpu = AutoModelForSeq2SeqLM.from_config(model.config).eval().cuda()
    on_gpu.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    peft_model = two_adapters(on_gpu)

    class OnCuda:  # the tokenizer's tensors on the GPU
        def __call__(self, *args, **kwargs):
            return tokenizer(*args, **kwargs).to("cuda")

    logits_of, ids_of = run_staggered(peft_model, OnCuda(), MIXED_JOINS, 5, MIXED, gathered=True, graphs=None)

    def close(got, expected):
        torch.testing.assert_close(got, expected, atol=float(1e-4 * expected.abs().max()), rtol=0)

    check_each_row(peft_model, OnCuda(), MIXED, logits_of, ids_of, close)


def test_gathered_lora_refuses_what_it_cannot_route(t5):
    """Per-row gathering takes plain LoRA on Linear layers only, says why not otherwise, and refuses
    an adapter name it does not hold (never the base in silence)."""
    from peft import LoraConfig, get_peft_model

    from flantune.lora_rows import LoraRows

    model, _ = t5
    peft_model = two_adapters(model)
    rows = LoraRows(peft_model, ["a", "b"], capacity=2)
    assert rows.indices([None, "__base__", "b", "a"], "cpu").tolist() == [0, 0, 2, 1]
    with pytest.raises(ValueError, match=r"adapters \['c'\] are not among the gathered ones"):
        rows.indices(["a", "c"], "cpu")
    assert LoraRows.unsupported(model) == "not a PEFT model"
    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    for extra, reason in (({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "ModulesToSaveWrapper")):
        clone = AutoModelForSeq2SeqLM.from_config(model.config).eval().double()
        other = get_peft_model(clone, LoraConfig(r=2, target_modules=targets, task_type="SEQ_2_SEQ_LM", **extra))
        assert reason in LoraRows.unsupported(other)
        with pytest.raises(ValueError, match=reason):
            LoraRows(other, ["default"], capacity=2)


def test_routing_puts_back_a_forward_set_on_the_instance(t5):
    """LoraRows.routed replaces the LoRA layers' forward for the block only: a layer's own instance
    forward (as Accelerate's device hooks set one) is back after it, the others have none."""
    from flantune.lora_rows import LoraRows

    model, _ = t5
    peft_model = two_adapters(model)
    rows = LoraRows(peft_model, ["a", "b"], capacity=2)
    encoder = peft_model.get_encoder()
    layers = [m for m in encoder.modules() if m in rows.tables]
    hooked = layers[0].forward = layers[0].forward  # a bound method stored on the instance
    with rows.routed(encoder, rows.indices(["a"], "cpu")):
        assert all("forward" in m.__dict__ and m.__dict__["forward"] is not hooked for m in layers)
    assert layers[0].__dict__["forward"] is hooked
    assert all("forward" not in m.__dict__ for m in layers[1:])
