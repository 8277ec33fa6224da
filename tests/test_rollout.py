"""flantune.rollout: the merged copy of the policy that RL samples from, against the policy itself."""

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from flantune import rollout
from flantune.config import MethodConfig
from flantune.methods import apply_method

from .conftest import tiny_config


def policy_of(asset, method: dict):
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(tiny_config(asset))
    return apply_method(model, MethodConfig(**method)).eval()


def logits(model, ids):
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids[:, :5]).logits


def move(policy, scale: float = 0.1):
    """An optimizer step's worth of change to every trained parameter, in place."""
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))


METHODS = {
    "full": {"kind": "full"},
    "lora": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q", "v", "wo", "q_proj", "fc2"]},
    "lora+modules_to_save": {"kind": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear",
                             "modules_to_save": ["lm_head"]},
}


@pytest.mark.parametrize("method", list(METHODS), ids=list(METHODS))
@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_the_copy_computes_the_policy_and_follows_it_in_place(method, arch, t5_small_path, bart_path):
    """float32 copy on the CPU: the policy's logits within float32 rounding (W + s·BA against the
    LoRA path), after the trained weights move too (refresh), the copy's tensors never reallocated
    (the engine's recorded steps keep them); without the refresh the copy lags (the refresh is what
    follows the policy)."""
    policy = policy_of(t5_small_path if arch == "t5" else bart_path, METHODS[method])
    move(policy)  # LoRA's B starts at 0: a delta that is not zero
    copy = rollout.SamplingCopy(policy, torch.float32, "cpu")
    assert not any(n.endswith(("lora_A.default.weight", "base_layer.weight")) for n, _ in copy.model.named_parameters())
    ids = torch.randint(3, 100, (3, 9))
    with torch.no_grad():
        torch.testing.assert_close(logits(copy.model, ids), logits(policy, ids), rtol=1e-4, atol=1e-4)
        pointers = [p.data_ptr() for p in copy.model.parameters()]
        move(policy)
        assert not torch.allclose(logits(copy.model, ids), logits(policy, ids), atol=1e-3)
        copy.refresh()
        torch.testing.assert_close(logits(copy.model, ids), logits(policy, ids), rtol=1e-4, atol=1e-4)
        assert [p.data_ptr() for p in copy.model.parameters()] == pointers
    assert all(not p.requires_grad for p in copy.model.parameters())
    if method != "full":  # LoRA: only the merged layers and the trained modules are written again
        assert copy.merged and len(copy.trained) == (1 if method == "lora+modules_to_save" else 0)


def test_a_bf16_copy_is_the_policy_in_bf16(t5_small_path):
    policy = policy_of(t5_small_path, METHODS["lora"])
    move(policy)
    copy = rollout.SamplingCopy(policy, torch.bfloat16, "cpu")
    assert {p.dtype for p in copy.model.parameters()} == {torch.bfloat16}
    ids = torch.randint(3, 100, (3, 9))
    with torch.no_grad():
        exact = logits(policy, ids)
        err = (logits(copy.model, ids).float() - exact).abs().max()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the policy as RL runs it under bf16
            err_autocast = (logits(policy, ids).float() - exact).abs().max()
    assert err <= 4 * err_autocast + 1e-3, (float(err), float(err_autocast))


@pytest.mark.parametrize(
    ("method", "why"),
    [({"kind": "lora", "use_dora": True}, "DoRA"), ({"kind": "ia3"}, "ia3 layers"), ({"kind": "prefix"}, "prefix tuning"),
     ({"kind": "adapter", "reduction_factor": 4}, "has no place in a plain model")],
    ids=["dora", "ia3", "prefix", "bottleneck"],
)  # fmt: skip
def test_kinds_without_a_merged_form_are_refused_with_their_reason(method, why, t5_small_path):
    policy = policy_of(t5_small_path, method)
    reason = rollout.unsupported(policy)
    if reason is None:  # not a PEFT layer: caught by the parameter check
        with pytest.raises(ValueError, match=why):
            rollout.SamplingCopy(policy, torch.float32, "cpu")
    else:
        assert why in reason


def test_plan():
    plan = rollout.plan
    assert plan(False, device_type="cuda", reason=None, needed=1, free=10) == "rl.sampling_copy=false"
    assert plan("auto", device_type="cuda", reason=None, needed=5, free=10) is None
    assert "half of the" in plan("auto", device_type="cuda", reason=None, needed=6, free=10)
    assert "CPU" in plan("auto", device_type="cpu", reason=None, needed=1, free=None)
    assert plan(True, device_type="cpu", reason=None, needed=1, free=None) is None
    assert plan("auto", device_type="cuda", reason="DoRA x", needed=1, free=10) == "DoRA x"
    with pytest.raises(ValueError, match="rl.sampling_copy=true: DoRA x; set it to auto or false"):
        plan(True, device_type="cuda", reason="DoRA x", needed=1, free=10)

