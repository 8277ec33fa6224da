"""The path a training run takes by default (flantune.speed): a pure function of the recipe's train
section and the run's facts, tested case by case (what a run prints and records of it:
tests/test_train.py, test_a_run_says_and_records_its_path_and_time_to_the_first_step)."""

import re

import pytest

from flantune.config import TrainConfig
from flantune.errors import TrainingError
from flantune.speed import RunFacts, SpeedPlan, resolve_speed

T5_GPU = RunFacts("t5", "lora", cuda=True)


def plan_of(facts: RunFacts = T5_GPU, **train_kw) -> SpeedPlan:
    return resolve_speed(TrainConfig(**train_kw), facts)


@pytest.mark.parametrize(
    ("facts", "train_kw", "line"),
    [
        (T5_GPU, {}, "speed: packed rows, FlexAttention, compiled blocks, CUDA graphs"),
        (
            RunFacts("mt5", "full", cuda=True),
            {},
            "speed: packed rows, FlexAttention, compiled blocks, CUDA graphs",
        ),
        (
            RunFacts("t5", "ia3", cuda=True),
            {},
            "speed: packed rows, FlexAttention, compiled blocks, CUDA graphs",
        ),
        (
            RunFacts("t5", "lora", cuda=True, processes=2),
            {},
            "speed: packed rows, FlexAttention, compiled blocks; no CUDA graphs: 2 processes (DDP's all-reduce "
            "is not replayed by a graph)",
        ),
        (
            RunFacts("t5", "qlora", cuda=True),
            {},
            "speed: packed rows, FlexAttention, compiled blocks; no CUDA graphs: method.kind=qlora "
            "(bitsandbytes' quantized layers are not verified under graph capture)",
        ),
        (
            T5_GPU,
            {"gradient_checkpointing": True},
            "speed: packed rows, FlexAttention, compiled blocks; no CUDA graphs: train.gradient_checkpointing "
            "(its recomputation restores the random state mid-graph)",
        ),
        (
            RunFacts("t5", "lora", cuda=False),
            {},
            "speed: unpacked rows grouped by length, the model's own attention; no packing: no CUDA device "
            "(eager packed attention is not faster than unpacked rows on a CPU)",
        ),
        (
            RunFacts("bart", "full", cuda=True),
            {},
            "speed: unpacked rows grouped by length, the model's own attention; no packing: bart is not "
            "T5-family (packing restarts T5's relative bias per pair; packed: t5, mt5, umt5)",
        ),
        (
            RunFacts("t5", "full", cuda=True, processes=2, fsdp=True),
            {},
            "speed: unpacked rows grouped by length, eager attention; no packing: FSDP is on (it "
            "gathers a block's weights in the block's forward, which the packed path skips)",
        ),
        (
            RunFacts("t5", "prefix", cuda=True),
            {},
            "speed: unpacked rows grouped by length, eager attention; no packing: method.kind=prefix "
            "is not a method it runs (full, lora, qlora, ia3: methods that wrap linear layers)",
        ),
        # Explicit settings are obeyed, and said.
        (
            T5_GPU,
            {"cuda_graph": False},
            "speed: packed rows, FlexAttention, compiled blocks; no CUDA graphs: train.cuda_graph=false",
        ),
        (
            T5_GPU,
            {"compile": False},
            "speed: packed rows, FlexAttention; not compiled: train.compile=false; "
            "no CUDA graphs: train.compile=false",
        ),
        (T5_GPU, {"packing": False}, "speed: unpacked rows grouped by length, eager attention"),
        (
            T5_GPU,
            {"packing": False, "group_by_length": False, "attention": "sdpa"},
            "speed: unpacked rows in random order, sdpa attention; no length grouping: train.group_by_length=false",
        ),
        (
            T5_GPU,
            {"group_by_length": True},
            "speed: unpacked rows grouped by length, eager attention; no packing: train.group_by_length=true",
        ),
        (
            T5_GPU,
            {"attention": "eager"},
            "speed: packed rows, eager attention; no FlexAttention: train.attention=eager",
        ),
        (RunFacts("t5", "full", cuda=False), {"packing": True}, "speed: packed rows, eager attention"),
        (
            RunFacts("t5", "full", cuda=False),
            {"token_budget": 512},
            "speed: unpacked rows grouped by length, "
            "the model's own attention; no packing: no CUDA device (eager packed attention is not faster than "
            "unpacked rows on a CPU); train.token_budget unused (unpacked rows)",
        ),
    ],
    ids=[
        "t5-gpu",
        "mt5-full",
        "ia3",
        "ddp",
        "qlora",
        "grad-ckpt",
        "t5-cpu",
        "bart",
        "fsdp",
        "prefix",
        "no-graphs",
        "no-compile",
        "no-packing",
        "sdpa-random",
        "grouped",
        "eager",
        "cpu-packed",
        "cpu-budget",
    ],
)
def test_auto_resolves_to_the_fastest_path_that_works(facts, train_kw, line):
    plan = plan_of(facts, **train_kw)
    assert plan.line() == line
    # The flags agree with the line, and graphs never run without compiled blocks or packed rows.
    assert plan.packing == line.startswith("speed: packed")
    assert plan.cuda_graph == ("CUDA graphs" in line.split(";")[0])
    assert not plan.cuda_graph or (plan.compile and plan.packing and plan.attention == "flex")
    assert plan.group_by_length == ("grouped by length" in line)


@pytest.mark.parametrize(
    ("facts", "train_kw", "message"),
    [
        (
            RunFacts("bart", "full", cuda=True),
            {"packing": True},
            "train.packing=true: the packed path cannot run here: bart is not T5-family",
        ),
        (
            RunFacts("bart", "full", cuda=True),
            {"cuda_graph": True},
            "train.cuda_graph=true: the packed path cannot run here: bart is not T5-family",
        ),
        (
            RunFacts("t5", "full", cuda=True, fsdp=True, processes=2),
            {"compile": True},
            "train.compile=true: the packed path cannot run here: FSDP is on",
        ),
        (
            RunFacts("t5", "lora", cuda=True, processes=2),
            {"cuda_graph": True},
            "train.cuda_graph=true: cannot run with 2 processes",
        ),
        (
            RunFacts("t5", "qlora", cuda=True),
            {"cuda_graph": True},
            "train.cuda_graph=true: cannot run with method.kind=qlora",
        ),
        (
            RunFacts("t5", "lora", cuda=False),
            {"cuda_graph": True},
            "train.cuda_graph=true: cannot run with no CUDA device",
        ),
        (
            RunFacts("t5", "lora", cuda=False),
            {"attention": "flex"},
            "train.attention=flex: FlexAttention has no CPU backward",
        ),
        (RunFacts("t5", "lora", cuda=False), {"compile": True}, "train.compile=true: compiles for a GPU"),
        (
            T5_GPU,
            {"attention": "eager", "cuda_graph": True},
            "train.cuda_graph=true: cannot run with eager attention",
        ),
        (T5_GPU, {"packing": False, "token_budget": 64}, "train.token_budget: only used with packed rows"),
    ],
)
def test_an_explicit_setting_that_cannot_be_honoured_is_an_error(facts, train_kw, message):
    with pytest.raises(TrainingError, match=re.escape(message)):
        plan_of(facts, **train_kw)


def test_unpacked_training_forwards_keep_sdpa_off_cudnn(bart_path):
    """An unpacked micro-step runs the model's forward with SDPA's cuDNN backend off (on a GPU it
    builds a plan per batch shape, seconds each: flantune.speed.unpacked_attention) and leaves the
    process's SDPA settings as they were. Real tiny BART (sdpa attention), real backward."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from flantune.train import make_micro_step

    from .conftest import tiny_config

    model = AutoModelForSeq2SeqLM.from_config(tiny_config(bart_path), attn_implementation="sdpa")
    seen = []
    model.model.encoder.layers[0].self_attn.register_forward_pre_hook(
        lambda *_: seen.append(torch.backends.cuda.cudnn_sdp_enabled())
    )

    class Accelerator:
        num_processes = 1

        def backward(self, loss):
            loss.backward()

    assert torch.backends.cuda.cudnn_sdp_enabled()
    step = make_micro_step(model, Accelerator(), packed=False)
    ids = torch.randint(4, 100, (2, 7))
    labels = torch.randint(4, 100, (2, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}  # fmt: skip
    loss = step(batch, labels, 0.1)
    assert seen == [False] and torch.isfinite(loss)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # restored after the forward
    assert model.model.encoder.layers[0].self_attn.q_proj.weight.grad is not None



def test_compile_breakdown_names_the_graphs_and_the_costliest_phases():
    """What a compiling run records of its compilation (the run's start-up record): Dynamo's graphs
    and its phases by time. A function compiled here (aot_eager: no C++ compiler needed) adds a graph
    and shows among the phases."""
    import torch

    from flantune.speed import compile_breakdown, compile_seconds

    before = compile_breakdown()
    assert before is not None  # this torch keeps the account
    torch._dynamo.reset()

    def f(x):
        return torch.sin(x) * 2 + x.cos()

    torch.compile(f, backend="aot_eager")(torch.randn(8))
    after = compile_breakdown(most=3)
    assert after["graphs"] >= 1 and 1 <= len(after["phases_s"]) <= 3
    assert "_compile.compile_inner" in compile_breakdown(most=100)["phases_s"]
    assert all(v >= 0 for v in after["phases_s"].values())
    assert list(after["phases_s"].values()) == sorted(after["phases_s"].values(), reverse=True)
    assert compile_seconds() > 0
