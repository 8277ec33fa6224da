"""The weights RL's rollouts decode with: a copy of the policy in its compute dtype, LoRA merged in.

Why. `flantune rl` samples G completions per prompt every step through the decoding engine, and on
a GPU each decode step is a replayed chain of small kernels. Sampled from the policy itself, that
chain carries two costs that no completion needs: under bf16 autocast every float32 weight is cast
again at every step (a kernel per linear layer, 6 bytes of memory traffic per parameter), and every
LoRA layer adds its own kernels (A, B, the scaling, the sum) to the frozen layer's. A copy of the
policy in the autocast dtype whose LoRA layers hold W + scale * B @ A is a plain transformers model:
the step the engine records for it is the one `bench/generate_speed.py` measures. The copy is
written again after each optimizer step (`refresh`; for LoRA only the merged layers and the trained
modules, ~3 kernels each). TRL samples the same way when it syncs a policy's weights into vLLM (it
merges the adapter and copies the weights), there into another engine, here into a copy in the
same process; no library makes such a copy for an encoder-decoder policy in its own process.

What stays exact. The copy samples from the policy up to the copy's rounding (one bf16 weight
against bf16 casts of W and of the LoRA path). GRPO's ratio does not see it: the old
log-probabilities are the first inner step's own (flantune.rl), computed by the policy.

Which policies. Full fine-tuning (every weight copied at each refresh) and LoRA on linear layers
without DoRA, with or without modules_to_save. The others (DoRA, IA3, prefix tuning, bottleneck
adapters, QLoRA's quantized base, trainable token rows) sample from the policy itself:
`unsupported` names why, and every parameter of the policy must have its place in the copy or the
copy is refused (so a kind this module does not know is never half-copied).
"""

from __future__ import annotations

import torch

MEMORY_SHARE = 0.5  # auto makes a copy when it takes at most this share of the free device memory


def _peft_types():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    return LoraLinear, BaseTunerLayer, AuxiliaryTrainingWrapper, ModulesToSaveWrapper


def _base(policy):
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def unsupported(policy) -> str | None:
    """Why `policy` has no merged copy; None when it has one."""
    lora_linear, tuner, auxiliary, modules_to_save = _peft_types()
    configs = getattr(policy, "peft_config", None) or {}
    if any(getattr(c, "is_prompt_learning", False) for c in configs.values()):
        return "prefix tuning's virtual tokens are not weights of the model"
    for name, module in policy.named_modules():
        if isinstance(module, tuner):
            if type(module) is not lora_linear:  # peft.tuners.<kind>.layer
                kind = type(module).__module__.removeprefix("peft.tuners.").split(".")[0]
                return f"{kind} layers ({name}) have no merged form here"
            if any(module.use_dora.get(a, False) for a in module.active_adapters):
                return "DoRA rescales each merged weight by its norm (not merged here)"
        elif isinstance(module, auxiliary) and not isinstance(module, modules_to_save):
            return f"{type(module).__name__} ({name}) is not merged here"
    if any(not p.dtype.is_floating_point for p in policy.parameters()):
        return "the base weights are quantized"
    return None


class SamplingCopy:
    """A plain model of the policy's architecture in `dtype` on `device`, its weights the policy's with
    each LoRA layer merged. Build it once the policy's weights are loaded (a resumed run's
    included); `refresh()` after every change of the trained weights, before sampling."""

    def __init__(self, policy, dtype: torch.dtype, device: torch.device | str):
        reason = unsupported(policy)
        if reason is not None:
            raise ValueError(reason)
        lora_linear, _, _, modules_to_save = _peft_types()
        self.policy, base = policy, _base(policy)
        with torch.device("meta"):
            model = type(base)(base.config)
        self.static: list[tuple[torch.Tensor, torch.Tensor]] = []  # (copy, policy) frozen: copied once
        self.trained: list[tuple[torch.Tensor, torch.Tensor]] = []  # copied at every refresh
        self.merged: list[tuple[torch.Tensor, object]] = []  # (copy's weight, the policy's LoRA layer)
        placed: set[int] = set()  # ids of the policy's parameters the copy takes its values from
        for name, module in model.named_modules():
            try:
                source = base.get_submodule(name)
            except AttributeError:  # a module of the policy's own in between (bottleneck adapters)
                raise ValueError(f"{name} has no place in a plain model: the policy's layers differ") from None
            if isinstance(source, modules_to_save):  # the trained module, when its adapter is active
                active = [a for a in source.active_adapters if a in source.modules_to_save]
                on = active and not source.disable_adapters
                source = source.modules_to_save[active[0]] if on else source.original_module
            if isinstance(source, lora_linear):
                placed.update(id(p) for p in source.parameters())  # every adapter's A and B, the base layer
                lora, source = source, source.base_layer
            else:
                lora = None
            for key, param in list(module.named_parameters(recurse=False)):
                mine = torch.empty(param.shape, dtype=dtype, device=device)
                module._parameters[key] = torch.nn.Parameter(mine, requires_grad=False)
                theirs = getattr(source, key)
                placed.add(id(theirs))
                if lora is not None and key == "weight":
                    self.merged.append((mine, lora))
                else:
                    (self.trained if theirs.requires_grad else self.static).append((mine, theirs))
            for key in [k for k, b in module._buffers.items() if b is not None]:
                module._buffers[key] = getattr(source, key).detach().to(device=device, copy=True)
        missing = [n for n, p in policy.named_parameters() if id(p) not in placed]
        if missing:
            raise ValueError(f"{missing[0]} (and {len(missing) - 1} more) has no place in a plain model")
        model.generation_config = base.generation_config
        self.model = model.eval().requires_grad_(False)
        with torch.no_grad():
            for mine, theirs in self.static:
                mine.copy_(theirs)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """The policy's current weights into the copy, in place (the engine's recorded steps keep
        these tensors): the trained ones, and each LoRA layer's W + its active adapters' deltas."""
        for mine, theirs in self.trained:
            mine.copy_(theirs)
        for mine, layer in self.merged:
            weight = layer.base_layer.weight  # (out, in)
            if not layer.merged and not layer.disable_adapters:
                for adapter in layer.active_adapters:
                    if adapter in layer.lora_A:
                        weight = weight + layer.get_delta_weight(adapter)  # scale * B @ A, (out, in)
            mine.copy_(weight)

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def copy_bytes(policy, dtype: torch.dtype) -> int:
    """What a copy of `policy` in `dtype` takes: the plain model's parameters (LoRA's A and B are not
    in it)."""
    lora_linear = _peft_types()[0]
    adapter_params = {id(p) for m in policy.modules() if isinstance(m, lora_linear)
                      for name, p in m.named_parameters() if not name.startswith("base_layer.")}  # fmt: skip
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in policy.parameters() if id(p) not in adapter_params) * size


def plan(setting: bool | str, *, device_type: str, reason: str | None, needed: int, free: int | None) -> str | None:
    """Whether RL's rollouts sample from a merged copy (rl.sampling_copy): None when they do, else why
    not. `reason`: `unsupported(policy)`; `needed`: the copy's bytes; `free`: the device's free memory
    (None on a CPU). An explicit true that cannot be honoured raises ValueError with its reason."""
    if setting is False:
        return "rl.sampling_copy=false"
    if reason is not None:
        if setting is True:
            raise ValueError(f"rl.sampling_copy=true: {reason}; set it to auto or false")
        return reason
    if setting is True:
        return None
    if device_type != "cuda":
        return "on a CPU a decode step has no kernel launches to save"
    if free is not None and needed > MEMORY_SHARE * free:
        return f"its {needed / 2**30:.1f} GiB would take more than half of the {free / 2**30:.1f} GiB free"
    return None
