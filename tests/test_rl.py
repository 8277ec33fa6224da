"""GRPO for encoder-decoder models: reference values for the math, rewards, every method, resume,
and a task where reinforcement learning must beat the supervised model it starts from."""

import json
import math
import random
import string
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flantune.config import RewardSpec, recipe_from_dict
from flantune.quickstart import build_tokenizer, write_jsonl
from flantune.rewards import RewardError, build_rewards, score_all
from flantune.rl import (
    Reference,
    clipped_objective,
    completion_logprobs,
    completion_mask,
    group_advantages,
    grpo_loss_sum,
    kl_k3,
    run_rl,
)
from flantune.tasks import build_task
from flantune.train import train

# ---- the math ------------------------------------------------------------------------------------


def test_group_advantages_reference_values():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²) / 3) = 0.5; group 2: all equal → 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]) / (0.5 + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 4), expected)


def test_kl_k3_reference_values():
    new, ref = torch.log(torch.tensor([0.5, 0.3])), torch.log(torch.tensor([0.25, 0.3]))
    # exp(ref - new) - (ref - new) - 1 = 0.5 + ln 2 - 1 for the first token, 0 where they agree
    torch.testing.assert_close(kl_k3(new, ref), torch.tensor([0.5 + math.log(2) - 1, 0.0]))


def test_clipped_objective_reference_values():
    old = torch.zeros(4, 1)
    new = torch.log(torch.tensor([[1.5], [0.5], [0.5], [1.5]]))  # ratios
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, clipped = clipped_objective(new, old, adv, clip_eps=0.2)
    # min(ρA, clip(ρ)A): 1.2 (clipped), 0.5, -0.8 (clipped), -1.5; the loss is its negative
    torch.testing.assert_close(loss, torch.tensor([[-1.2], [-0.5], [0.8], [1.5]]))
    assert clipped.flatten().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_loss_gradient_at_ratio_one_is_minus_advantage_over_tokens():
    new = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    loss, stats = grpo_loss_sum(new, new.detach(), new.detach(), adv, mask, 0.2, beta=0.5)
    (loss / mask.sum()).backward()
    # policy gradient -A per real token, KL gradient 0 where new == ref, averaged over the 5 tokens
    torch.testing.assert_close(new.grad, -adv.unsqueeze(1) * mask / 5)
    assert stats["kl_sum"] == 0.0 and stats["clip_sum"] == 0.0


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[0, 5, 6, 1, 0], [0, 1, 0, 0, 0], [0, 5, 6, 7, 8]])  # start, tokens, EOS=1, pad
    assert completion_mask(ids, eos_id=1).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_completion_logprobs_equal_the_models_own_cross_entropy(t5_small_path):
    from transformers import AutoModelForSeq2SeqLM

    from .conftest import tiny_config

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(t5_small_path)).eval()
    prompts = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    attention = (prompts != 0).long()
    completions = torch.tensor([[0, 11, 12, 1], [0, 13, 1, 0], [0, 14, 15, 16], [0, 1, 0, 0]])  # G = 2
    states = model.get_encoder()(input_ids=prompts, attention_mask=attention).last_hidden_state
    ours = completion_logprobs(model, states, attention, completions, group_size=2)
    logits = model(input_ids=prompts.repeat_interleave(2, 0), attention_mask=attention.repeat_interleave(2, 0),
                   decoder_input_ids=completions[:, :-1]).logits  # fmt: skip
    reference = -torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), completions[:, 1:], reduction="none"
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_reference_swaps_adapter_weights_in_and_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    ref = Reference(model, full=False)
    start = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    trained = model[1].weight.detach().clone()
    with ref.weights(model) as m:
        torch.testing.assert_close(m[1].weight, start)  # the starting policy
    torch.testing.assert_close(model[1].weight, trained)  # and back to the trained one
    assert len(ref.params) == 2  # only the trainable weight and bias are copied


# ---- rewards -------------------------------------------------------------------------------------


def bad_reward(prompt, completion, row):
    raise KeyError("missing")


def text_reward(prompt, completion, row):
    return "high"


def test_rewards_builtin_and_custom(t5_tokenizer):
    sciq = build_task("sciq_think")
    row = {"references": ["oxygen"], "choices": ["nitrogen", "oxygen", "carbon", "helium"]}
    rewards = build_rewards(
        [RewardSpec("correct"), RewardSpec("format", weight=0.5), RewardSpec("length", weight=0.1, target_tokens=4)],
        sciq, t5_tokenizer, max_new_tokens=16,
    )  # fmt: skip
    completions = ["<think> air </think> <answer> oxygen </answer>", "<answer> carbon </answer>", "B"]
    totals, parts = score_all(rewards, ["p"] * 3, completions, [row] * 3)
    assert parts["correct"] == [1.0, 0.0, 1.0]  # "B" names the second option
    assert parts["format"] == [1.0, 0.0, 0.0]
    assert parts["length"][2] == 0.0 and parts["length"][0] < 0  # only over-long completions lose
    assert totals[0] == pytest.approx(1.0 + 0.5 + 0.1 * parts["length"][0])
    squad = build_task("squad_qa")
    exact = build_rewards(
        [RewardSpec("correct", mode="exact"), RewardSpec("correct")], squad, t5_tokenizer, 16
    )
    _, parts = score_all(exact[:1], ["p"], ["The Eiffel tower"], [{"references": ["Eiffel tower"]}])
    assert parts["correct"] == [0.0]
    _, parts = score_all(exact[1:], ["p"], ["The Eiffel tower"], [{"references": ["Eiffel tower"]}])
    assert parts["correct"] == [1.0]  # normalized: articles dropped
    module = __name__
    for name, message in (
        (f"{module}:bad_reward", "raised KeyError"),
        (f"{module}:text_reward", "must return a finite number"),
    ):
        (reward,) = build_rewards([RewardSpec(name)], squad, t5_tokenizer, 16)
        with pytest.raises(RewardError, match=rf"reward {name} .*{message}"):
            score_all([reward], ["p"], ["x"], [{"references": ["x"]}])
    with pytest.raises(RewardError, match="cannot load nomodule:f"):
        build_rewards([RewardSpec("nomodule:f")], squad, t5_tokenizer, 16)


# ---- end to end ----------------------------------------------------------------------------------


def sort_rows(rng, n, wrong=0.0):
    """'sort: q c m' → 'c m q'; with `wrong`, that share of targets is reverse-sorted instead."""
    rows = []
    for _ in range(n):
        letters = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
        truth = sorted(letters)
        target = truth[::-1] if rng.random() < wrong else truth
        rows.append(
            {"text": "sort: " + " ".join(letters), "sorted": " ".join(target), "truth": " ".join(truth)}
        )
    return rows


@pytest.fixture(scope="module")
def sort_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    (root / "model").mkdir()
    build_tokenizer(root / "model")  # the quickstart's small T5 with a word-level tokenizer
    rng = random.Random(0)
    write_jsonl(root / "sft.jsonl", sort_rows(rng, 3000, wrong=0.6))
    write_jsonl(root / "rl.jsonl", sort_rows(rng, 500))
    write_jsonl(root / "test.jsonl", sort_rows(rng, 100))
    return root


def sort_recipe(root, out, stage, method=None, **rl):
    return recipe_from_dict({
        "model": {"path": str(root / "model"), "init": "random"},
        "method": method or {"kind": "full"},
        "data": {"task": "template",
                 "task_options": {"source": "{text}", "target": "{sorted}" if stage == "sft" else "{truth}",
                                  "metrics": ["exact_match"]},
                 "train": str(root / ("sft.jsonl" if stage == "sft" else "rl.jsonl")), "eval": str(root / "test.jsonl"),
                 "max_source_tokens": 16, "max_target_tokens": 16},
        "train": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "schedule": "cosine", "warmup_steps": 30,
                  "log_every": 50, "precision": "fp32", "group_by_length": False},  # the order the figures below were measured in
        "generation": {"max_new_tokens": 8},
        "rl": {"max_steps": 40, "prompts_per_step": 8, "group_size": 8, "inner_steps": 2, "lr": 2e-4,
               "beta": 0.04, "eval_every": 20, "save_every": None, **rl},
        "output_dir": str(out),
    })  # fmt: skip


@pytest.fixture(scope="module")
def sft_run(sort_data):
    result = train(sort_recipe(sort_data, sort_data / "run", "sft"))
    return result


def test_rl_beats_the_supervised_model_it_starts_from(sort_data, sft_run, monkeypatch):
    """SFT learned from targets of which 60% are deliberately wrong (reverse-sorted), so it answers
    correctly only some of the time; GRPO with a verifier reward (exact match with the true sort)
    must raise held-out exact match far above that. Seeds are fixed; it takes about 10 s. Its
    unpacked log-probability passes run with SDPA's cuDNN backend off (flantune.speed.unpacked_attention)."""
    from flantune import rl as rl_module

    cudnn_on, logprobs = [], rl_module._logprobs
    monkeypatch.setattr(rl_module, "_logprobs", lambda *a, **k: (
        cudnn_on.append(torch.backends.cuda.cudnn_sdp_enabled()), logprobs(*a, **k))[1])  # fmt: skip
    sft_em = sft_run.eval_metrics["eval_exact_match"]
    result = run_rl(sort_recipe(sort_data, sort_data / "run", "rl"))
    assert cudnn_on and not any(cudnn_on), cudnn_on
    # Per step (one chunk of 8 prompts x 8): the reference pass and a new pass per inner step (2); the
    # old log-probabilities are the first inner step's own, no pass of their own.
    assert len(cudnn_on) == 40 * (1 + 2)
    rl_em = result.eval_metrics["eval_exact_match"]
    assert rl_em >= sft_em + 20, (sft_em, rl_em)  # measured: 9 → 44
    log = [json.loads(line) for line in (sort_data / "run" / "rl" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if "reward" in r]
    for key in ("reward", "reward_std", "reward_correct", "kl", "clip_fraction", "completion_tokens",
                "prompts_per_s", "completions_per_s", "lr"):  # fmt: skip
        assert key in steps[0], key
    assert [r["step"] for r in log if "eval_exact_match" in r] == [20, 40]
    phases = ("generate_seconds", "rewards_seconds", "logprob_seconds", "update_seconds")
    for r in steps:  # where each step went: every phase timed, together within the step's time
        assert all(r[k] > 0 for k in phases), r
        assert sum(r[k] for k in phases) <= r["step_seconds"], r
    assert any(r["kl"] > 0 for r in steps[1:])  # the policy moves away from the reference
    from transformers import AutoModelForSeq2SeqLM

    AutoModelForSeq2SeqLM.from_pretrained(result.final_dir)  # final/ in standard form
    from huggingface_hub import ModelCard

    card = ModelCard.load(result.final_dir / "README.md")  # its model card says what made it
    assert {"flantune", "full", "grpo"} <= set(card.data.tags) and card.data.library_name == "transformers"
    assert "| GRPO steps | 40: 8 prompts × 8 completions, 2 optimizer steps each |" in card.text
    assert f"| eval_exact_match | {rl_em:.4f} |" in card.text


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_rl_with_adapters_from_an_sft_adapter(kind, sort_data, sft_run, tmp_path):
    """An SFT adapter run's final/ is the start; the base (the full SFT model here) stays frozen,
    only the adapter moves, and the result is an adapter folder again."""
    method = {"kind": kind, "r": 4, "alpha": 8, "target_modules": ["q", "v"]} if kind == "lora" else {
        "kind": "adapter", "reduction_factor": 4}  # fmt: skip
    sft = sort_recipe(sort_data, tmp_path / "sft", "sft", method)
    sft.model.path, sft.model.init, sft.train.max_steps = str(sft_run.final_dir), "pretrained", 2
    adapter = train(sft).final_dir
    recipe = sort_recipe(sort_data, tmp_path / "sft", "rl", max_steps=2, eval_every=None, lr=1e-2)
    recipe.model.path = str(sft_run.final_dir)
    result = run_rl(recipe)  # rl.start defaults to output_dir/final: the adapter
    assert (result.final_dir / "adapter_config.json").is_file()
    before, after = (load_file(next(p.glob("*.safetensors"))) for p in (adapter, result.final_dir))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_rl_out_of_gpu_memory_names_the_settings(sort_data, sft_run, tmp_path, monkeypatch):
    """A step that runs out of GPU memory ends in one message naming the step, the shapes and the
    settings that lower the memory (rl.micro_batch_size first), not a traceback."""
    import flantune.rl as rl_module
    from flantune.errors import TrainingError

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(rl_module, "grpo_step", out_of_memory)
    recipe = sort_recipe(sort_data, tmp_path / "oom", "rl", max_steps=2, eval_every=None, save_every=None,
                         micro_batch_size=16)  # fmt: skip
    recipe.rl.start = str(sft_run.final_dir)
    with pytest.raises(TrainingError, match=r"RL step 1 .*rl\.micro_batch_size 16\): lower rl\.micro_batch_size"):
        run_rl(recipe)


def test_rl_resume_equals_uninterrupted(sort_data, sft_run, tmp_path):
    """A resumed RL run takes the same steps as an uninterrupted one; with rl.report_to
    [tensorboard] its rewards reach TensorBoard (rl's folder, tensorboard/) at the same steps and
    values as metrics.jsonl, the resumed run's steps continuing the first one's."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    from .test_train import logged, tensorboard_scalars

    def recipe(out, steps, **kw):
        r = sort_recipe(sort_data, out, "rl", max_steps=steps, eval_every=None, save_every=2, **kw)
        r.rl.start, r.rl.output_dir = str(sft_run.final_dir), str(out)
        return r

    whole = run_rl(recipe(tmp_path / "a", 4))
    run_rl(recipe(tmp_path / "b", 2, report_to=["tensorboard"]))
    resumed = run_rl(recipe(tmp_path / "b", 4, resume=True, report_to=["tensorboard"]))
    for name, p in whole.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], p, msg=name)
    a, b = ((tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("a", "b"))
    rewards = [[r["reward"] for r in map(json.loads, lines) if "reward" in r] for lines in (a, b)]
    assert len(rewards[0]) == 4 and rewards[0] == rewards[1]
    for key in ("reward", "reward_correct", "kl"):
        expected = logged(tmp_path / "b", key)
        shown = tensorboard_scalars(tmp_path / "b" / "tensorboard" / "b-rl", key)
        assert [step for step, _ in shown] == [step for step, _ in expected] == [1, 2, 3, 4]
        assert [v for _, v in shown] == pytest.approx([v for _, v in expected], rel=1e-6, abs=1e-12)


def test_rl_refuses_what_it_cannot_do(sort_data, sft_run, tmp_path):
    from flantune.config import ConfigError
    from flantune.run import TrainingError

    recipe = sort_recipe(sort_data, tmp_path, "rl", max_steps=1, eval_every=None)
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    recipe.rl.start, recipe.rl.output_dir = str(sft_run.final_dir), str(earlier)
    with pytest.raises(TrainingError, match="already holds a run"):
        run_rl(recipe)
    assert (earlier / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched
    recipe.rl.start, recipe.rl.output_dir = str(tmp_path / "no-such-run" / "final"), str(tmp_path / "new")
    with pytest.raises(TrainingError, match="rl.start: .* does not exist"):
        run_rl(recipe)
    with pytest.raises(ConfigError, match="group_size"):
        sort_recipe(sort_data, tmp_path, "rl", group_size=1)
    from flantune.methods import MethodError

    recipe = sort_recipe(sort_data, tmp_path / "q", "rl", {"kind": "qlora"}, max_steps=1)
    with pytest.raises((MethodError, TrainingError), match="GPU"):  # the test's device is the CPU
        run_rl(recipe)


def test_rl_under_fsdp_is_refused_before_the_run_folder(sort_data, tmp_path, monkeypatch):
    """`accelerate launch --use_fsdp ... flantune rl` (Accelerate marks it ACCELERATE_USE_FSDP):
    one clear error naming the way that works, and no run folder."""
    from flantune.run import TrainingError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    recipe = sort_recipe(sort_data, tmp_path / "run", "rl", max_steps=1)
    with pytest.raises(TrainingError, match=r"not FSDP: .* launch it without --use_fsdp"):
        run_rl(recipe)
    assert not (tmp_path / "run").exists()


def test_rl_command_line(sort_data, sft_run, tmp_path):
    import subprocess

    from flantune.config import dump_recipe

    from .conftest import ROOT

    recipe = sort_recipe(sort_data, tmp_path, "rl", max_steps=1, eval_every=None)
    recipe.rl.start = str(sft_run.final_dir)
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    result = subprocess.run([sys.executable, "-m", "flantune.cli", "rl", str(path), "rl.group_size=2"],
                            capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "rl" / "final" / "config.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "flantune.cli", "rl", str(path), "rl.rewards=[{name: nomod:f}]",
                          "rl.output_dir=" + str(tmp_path / "x")], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "cannot load nomod:f" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("packing", [False, True], ids=["unpacked", "packed"])
def test_two_process_rl_equals_one_process(sort_data, sft_run, tmp_path, packing):
    """`accelerate launch` with two CPU processes (gloo): each process samples its own half of a
    step's prompts, and the all-reduced update equals one process taking all the prompts. Every
    completion draws from its own random stream, so both runs sample the same completions. Packed:
    the log-probability passes on packed rows (eager attention on the CPU), whose gradients reach
    DDP's all-reduce through the wrapper module DDP wraps (rl.PackedLogprobs)."""
    import os
    import subprocess

    from flantune.config import dump_recipe

    from .conftest import ROOT, free_port

    def write(name: str) -> Path:
        # micro_batch_size 8 = 2 prompts of 4 completions: several backward passes per update.
        recipe = sort_recipe(sort_data, tmp_path / name, "rl", max_steps=2, prompts_per_step=4, group_size=4,
                             micro_batch_size=8, eval_every=None, save_every=None, lr=1e-4)  # fmt: skip
        recipe.rl.start, recipe.rl.output_dir = str(sft_run.final_dir), str(tmp_path / name)
        recipe.rl.packing = packing
        path = tmp_path / f"{name}.yaml"
        path.write_text(dump_recipe(recipe))
        return path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", free_port(),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flantune.cli", "rl"]  # fmt: skip
    two = subprocess.run(
        [*launch, str(write("two"))], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "flantune.cli", "rl", str(write("one"))], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for run in (one, two):  # the path each run says it took
        assert ("rl: log-probabilities on packed rows, eager attention" in run.stdout) is packing, run.stdout[-2000:]

    logs = {}
    for name in ("one", "two"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logs[name] = [r for r in map(json.loads, lines) if "reward" in r]
    assert [r["prompts_per_process"] for r in logs["two"]] == [[2, 2], [2, 2]]
    assert [r["prompts_per_process"] for r in logs["one"]] == [[4], [4]]
    # The gradient of the first sampled batch, before any update: equal up to summation order.
    assert logs["two"][0]["grad_norm"] == pytest.approx(logs["one"][0]["grad_norm"], rel=1e-5)
    for a, b in zip(logs["one"], logs["two"], strict=True):
        # The same completions: the same rewards and lengths, at every step.
        assert (a["reward"], a["completion_tokens"]) == (b["reward"], b["completion_tokens"])
        # After an update, float rounding differences pass through Adam's normalization
        # (measured: up to 1.1e-4 relative on CPU).
        for key in ("grad_norm", "loss", "kl", "clip_fraction", "reward_std"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-7), key
    # The weights: 2 steps x 2 inner updates of Adam at lr 1e-4 move each weight up to 4e-4. Adam's
    # first steps take sign(g) for any gradient above its eps, so weights whose gradient is ~0
    # follow the rounding (unpacked, each process pads its own batch: other shapes, other rounding);
    # the scale of the gradient is checked by grad_norm above (Adam hides it). Measured (torch 2.13,
    # transformers 5.24, accelerate 1.16): unpacked, 5,803 of 796,416 weights differ by more than
    # 1e-5, nearly all in one layer's cross-attention q and k (largest 1.6e-4), the mean difference
    # 0.16 % of the mean movement; packed, none. (With transformers 5.17-era versions: 621, 7.4e-5.)
    # Gradients left unsynchronized would move most weights apart by a sizeable share of their movement.
    start = load_file(sft_run.final_dir / "model.safetensors")
    one, two = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("one", "two"))
    moved = sum(int((one[k] != start[k]).sum()) for k in one)
    differ = sum(int(((one[k] - two[k]).abs() > 1e-5).sum()) for k in one)
    total = sum(v.numel() for v in one.values())
    movement = sum(float((one[k] - start[k]).abs().sum()) for k in one)
    difference = sum(float((one[k] - two[k]).abs().sum()) for k in one)
    assert moved > total / 2, (moved, total)
    assert differ < total / 50, (differ, total)
    assert difference < movement / 100, (difference, movement)
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 4e-4


def test_rl_signals_checkpoint_a_second_run_is_refused_and_a_killed_run_restarts(
    sort_data, tmp_path, request
):
    """`flantune rl` as `flantune train`: while a run takes steps, a second run into its folder is
    refused naming the first's process; SIGTERM makes the run write a checkpoint and stop (exit 130),
    and --resume continues it; a run killed (SIGKILL) before any checkpoint is refused with the way
    out (--restart), which starts it again and takes over the dead process's lock."""
    import os
    import signal
    import subprocess
    import time

    from flantune import checkpoint as ckpt
    from flantune.config import dump_recipe

    from .conftest import ROOT

    # A fresh policy from the tiny model (no SFT run: output_dir has no final/), small steps. A tiny lr:
    # Adam's first steps move every weight of a random policy by lr, which at the fixture's 2e-4 sends
    # its KL to the reference to ~1e13 (finite here, but nothing in this test is about learning).
    recipe = sort_recipe(sort_data, tmp_path / "sft", "rl", max_steps=100000, prompts_per_step=2, group_size=2,
                         lr=1e-6, eval_every=None, save_every=None)  # fmt: skip
    out = tmp_path / "run"
    recipe.rl.output_dir = str(out)
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    cli = [sys.executable, "-m", "flantune.cli", "rl", str(path)]
    # One thread each: the run going on leaves a core to the run started beside it.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def steps_logged(folder: Path, running: bool = False) -> list[int]:
        if not (folder / "metrics.jsonl").exists():
            return []
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        if running:  # the last line may be in the middle of its write
            lines = lines[:-1]
        return [r["step"] for r in map(json.loads, lines) if "reward" in r]

    def start(folder: Path, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*cli, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT, env=env
        )
        request.addfinalizer(proc.kill)  # a failed assertion leaves no run going on
        deadline = time.time() + 120  # until it has logged two steps (and goes on)
        while time.time() < deadline and len(steps_logged(folder, running=True)) < 2 and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is not None or len(steps_logged(folder, running=True)) < 2:
            proc.kill()
            pytest.fail(f"no run taking steps in {folder}: {proc.communicate()[1].decode()[-2000:]}")
        return proc

    proc = start(out)
    second = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT, env=env)
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by process {proc.pid}" in " ".join(second.stderr.split())
    assert "Traceback" not in second.stderr
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, stderr[-2000:]
    message = " ".join(stderr.split())
    assert "Traceback" not in stderr
    *_, (step, checkpoint) = ckpt.list_checkpoints(out / "checkpoints")
    assert f"stopped: SIGTERM after step {step}: checkpoint written" in message
    assert "flantune rl RECIPE --resume` (rl.resume=true)" in message
    assert step >= 2 and not (out / "final").exists() and not (out / ".lock").exists()
    resumed = subprocess.run([*cli, "--resume", f"rl.max_steps={step + 1}"], capture_output=True, text=True,
                             cwd=ROOT, env=env)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # (rich folds a long path anywhere: compared without white space)
    assert "".join(f"resumed from {checkpoint} (step {step})".split()) in "".join(resumed.stdout.split())
    assert json.loads((out / "result.json").read_text())["steps"] == step + 1
    # Every step logged once: the first run's up to its checkpoint, then the resumed run's.
    assert steps_logged(out) == list(range(1, step + 2))
    assert (out / "final" / "config.json").is_file() and not (out / ".lock").exists()

    killed = tmp_path / "killed"
    proc = start(killed, f"rl.output_dir={killed}")
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not ckpt.list_checkpoints(killed / "checkpoints")  # killed before its first checkpoint
    again = subprocess.run(
        [*cli, f"rl.output_dir={killed}"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    message = " ".join(again.stderr.split())
    assert again.returncode == 2 and "already holds a run: --restart (rl.restart=true)" in message, message
    assert "Traceback" not in again.stderr
    restarted = subprocess.run([*cli, f"rl.output_dir={killed}", "--restart", "rl.max_steps=2"],
                               capture_output=True, text=True, cwd=ROOT, env=env)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    assert f"took over the lock of process {proc.pid}" in " ".join(restarted.stdout.split())
    assert steps_logged(killed) == [1, 2]  # from scratch: the killed run's steps are gone
    assert json.loads((killed / "result.json").read_text())["steps"] == 2


@pytest.mark.cuda
@pytest.mark.parametrize("method", [{"kind": "full"}, {"kind": "lora", "r": 4, "alpha": 8, "target_modules": ["q", "v"]}],
                         ids=["full", "lora"])  # fmt: skip
def test_rl_on_a_gpu_with_its_defaults(sort_data, tmp_path, capsys, method):
    """`flantune rl` on the GPU as a user runs it: rl.precision auto (float32 weights sampled and
    scored under bf16 autocast), rl.packing auto (log-probabilities on packed rows, FlexAttention),
    the engine's captured decoding steps. It runs to the end with finite losses, says the path it
    took, and its final/ loads."""
    recipe = sort_recipe(sort_data, tmp_path / "sft", "rl", method, max_steps=3, lr=1e-6, eval_every=None,
                         save_every=None)  # fmt: skip
    result = run_rl(recipe)
    said = " ".join(capsys.readouterr().out.split())
    assert "rl: log-probabilities on packed rows, FlexAttention" in said, said[-2000:]
    steps = [json.loads(line) for line in (result.final_dir.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["kl"]) and math.isfinite(r["reward"]) for r in steps), steps
    assert "eval_exact_match" in result.eval_metrics  # the final greedy evaluation ran on the engine
    assert (result.final_dir / ("adapter_config.json" if method["kind"] == "lora" else "config.json")).is_file()
