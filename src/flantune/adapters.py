"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for T5/mT5 and BART.

Why our own: the AdapterHub `adapters` library pins transformers 4.x, so bottleneck adapters for
transformers 5 live here: small, tested, and saved/loaded like PEFT adapters (a folder holding
adapter_config.json and adapter_model.safetensors).

An adapter is `x + up(act(down(x)))` with d_model -> d_model // reduction_factor -> d_model. It is
inserted by wrapping a sublayer's inner module in place (T5: SelfAttention / EncDecAttention /
DenseReluDense; BART: self_attn / encoder_attn / fc2), so it sees the sublayer's output before the
sublayer's residual add. `houlsby` adapts attention and feed-forward sublayers, `pfeiffer` only the
feed-forward ones. The model class is untouched; note the wrapped modules' parameters move one level
down (`...SelfAttention.base.q.weight`), so save adapters with `save_adapters`, not `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from flantune.checkpoint import fsync_dir, fsync_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KIND = "bottleneck"

# model_type -> {attribute of the wrapped module in its layer: (sublayer kind, its output projection)}.
# The output projection ("" = the module itself) decides the adapter's dtype and device: it is what
# produces the tensor the adapter sees (T5 may keep `wo` in float32 while the rest is bf16).
_T5 = {
    "SelfAttention": ("attention", "o"),
    "EncDecAttention": ("attention", "o"),
    "DenseReluDense": ("ffn", "wo"),
}
_BART = {
    "self_attn": ("attention", "out_proj"),
    "encoder_attn": ("attention", "out_proj"),
    "fc2": ("ffn", ""),
}
SITES = {"t5": _T5, "mt5": _T5, "bart": _BART}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class AdapterConfig:
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int = 16
    non_linearity: Literal["relu", "gelu", "silu"] = "relu"
    base_model_type: str = ""  # filled in by add_adapters, checked on load
    base_model_name_or_path: str = ""  # informational, written to the config file


class Adapter(nn.Module):
    """`x + up(act(down(x)))`; `up` starts at zero, so a new adapter is an exact identity."""

    def __init__(self, d_model: int, bottleneck: int, non_linearity: str = "relu"):
        super().__init__()
        self.non_linearity = non_linearity
        self.down = nn.Linear(d_model, bottleneck)
        self.act = _ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, L, d_model)
        # Compute in the adapter's dtype, add in the stream's, so bf16/fp32 mixes (and autocast) work.
        h = self.act(self.down(x.to(self.down.weight.dtype)))  # (B, L, bottleneck)
        return x + self.up(h).to(x.dtype)  # (B, L, d_model)


class AdaptedSublayer(nn.Module):
    """Runs the original module, then the adapter on its output (element 0 of a tuple: attention
    modules also return weights / T5's position bias, which pass through unchanged)."""

    def __init__(self, base: nn.Module, adapter: Adapter):
        super().__init__()
        self.base = base
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.base(*args, **kwargs)  # kwargs (masks, caches, position bias) pass straight through
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _model_type(model: nn.Module) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SITES:
        raise ValueError(
            f"bottleneck adapters support model types {sorted(SITES)}; got {model_type!r} ({type(model).__name__})"
        )
    return model_type


def _sites(model: nn.Module, placement: str) -> list[tuple[str, nn.Module, str, str]]:
    """(full name, parent, attribute, output projection) of each insertion point, in module order."""
    if placement not in ("houlsby", "pfeiffer"):
        raise ValueError(f"adapter placement must be 'houlsby' or 'pfeiffer', got {placement!r}")
    table = SITES[_model_type(model)]
    found = []
    for parent_name, parent in model.named_modules():
        for attr, _ in parent.named_children():
            if attr in table and (placement == "houlsby" or table[attr][0] == "ffn"):
                found.append((f"{parent_name}.{attr}".lstrip("."), parent, attr, table[attr][1]))
    return found


def _bottleneck(d_model: int, reduction_factor: int) -> int:
    if not isinstance(reduction_factor, int) or not 1 <= reduction_factor <= d_model:
        raise ValueError(f"adapter reduction_factor={reduction_factor!r} does not fit d_model={d_model}")
    return d_model // reduction_factor


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, Adapter) for m in model.modules())


def add_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Insert adapters in place; returns the inserted adapter modules' names. Fills in
    `config.base_model_type` (and an empty `base_model_name_or_path`)."""
    model_type = _model_type(model)
    if config.base_model_type and config.base_model_type != model_type:
        raise ValueError(
            f"adapter config is for model type {config.base_model_type!r}, the model is {model_type!r}"
        )
    if has_adapters(model):
        raise ValueError("the model already has bottleneck adapters")
    if config.non_linearity not in _ACTIVATIONS:
        raise ValueError(
            f"adapter non_linearity must be one of {sorted(_ACTIVATIONS)}, got {config.non_linearity!r}"
        )
    d_model = model.config.d_model
    bottleneck = _bottleneck(d_model, config.reduction_factor)
    sites = _sites(model, config.placement)
    config.base_model_type = model_type
    config.base_model_name_or_path = config.base_model_name_or_path or getattr(
        model.config, "_name_or_path", ""
    )
    for _, parent, attr, out_proj in sites:
        inner = getattr(parent, attr)
        ref = inner.get_submodule(out_proj).weight
        dtype = ref.dtype if ref.is_floating_point() else torch.float32  # quantized weights: train in fp32
        adapter = Adapter(d_model, bottleneck, config.non_linearity).to(device=ref.device, dtype=dtype)
        setattr(parent, attr, AdaptedSublayer(inner, adapter))
    # Kept so save_adapters can check (or supply) the config that describes these weights.
    model._flantune_adapter_config = dataclasses.replace(config)
    return [f"{name}.adapter" for name, *_ in sites]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters only, keyed by their names in `model` (detached, on their device)."""
    return {
        f"{name}.{k}": p.detach()
        for name, m in model.named_modules()
        if isinstance(m, Adapter)
        for k, p in m.named_parameters()
    }


def mark_only_adapters_trainable(model: nn.Module) -> None:
    if not has_adapters(model):
        raise ValueError("the model has no bottleneck adapters: call add_adapters or load_adapters first")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, Adapter):
            m.requires_grad_(True)
    # With the embeddings frozen, no block's input requires grad; reentrant gradient checkpointing then
    # drops the graph of every checkpointed block ("element 0 of tensors does not require grad").
    # Making the embeddings' output require grad fixes that whenever checkpointing is turned on.
    already = getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook")
    if hasattr(model, "enable_input_require_grads") and not already:
        model.enable_input_require_grads()


def save_adapters(
    model: nn.Module, directory: str | os.PathLike, config: AdapterConfig | None = None
) -> None:
    """Write adapter_config.json and adapter_model.safetensors into `directory`. `config` defaults to
    the one add_adapters/load_adapters used, and must describe the model's adapters."""
    used = getattr(model, "_flantune_adapter_config", None)
    if used is None or not has_adapters(model):
        raise ValueError("the model has no bottleneck adapters to save")
    config = dataclasses.replace(config or used)
    for field in ("placement", "reduction_factor", "non_linearity"):
        if getattr(config, field) != getattr(used, field):
            raise ValueError(
                f"save_adapters: config.{field}={getattr(config, field)!r} but the model's adapters were made "
                f"with {getattr(used, field)!r}"
            )
    config.base_model_type = used.base_model_type
    config.base_model_name_or_path = config.base_model_name_or_path or used.base_model_name_or_path
    meta = {"kind": KIND, **dataclasses.asdict(config), "d_model": model.config.d_model}
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Written beside `directory` (same filesystem), then renamed: a reader never sees half a folder.
    # (mkdir, not tempfile.mkdtemp: the folder keeps the umask's permissions, not mkdtemp's 0700.)
    tmp = directory.parent / f".{directory.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fsync_file(tmp / name)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()  # an empty folder made by the caller: replace it whole
        if not directory.exists():
            os.rename(tmp, directory)
        else:
            # A folder with other files (e.g. a tokenizer): replace file by file, the config last, so a
            # config is never newer than the weights beside it.
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(tmp / name, directory / name)
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_adapters(model: nn.Module, directory: str | os.PathLike) -> AdapterConfig:
    """Insert the adapters saved in `directory` into `model` (loaded trainable-ready, weights strict)."""
    config_file, weights_file = Path(directory) / CONFIG_NAME, Path(directory) / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: not an adapter folder")
    meta = json.loads(config_file.read_text())
    if meta.get("kind") != KIND:
        what = f"a PEFT {meta['peft_type']} adapter" if "peft_type" in meta else f"kind={meta.get('kind')!r}"
        raise ValueError(f"{config_file} holds {what}, not bottleneck adapters")
    config = AdapterConfig(
        **{f.name: meta[f.name] for f in dataclasses.fields(AdapterConfig) if f.name in meta}
    )
    model_type, d_model = _model_type(model), model.config.d_model
    if config.base_model_type != model_type or meta.get("d_model") != d_model:
        raise ValueError(
            f"{config_file}: adapters made for model type {config.base_model_type!r} with d_model="
            f"{meta.get('d_model')}, but the model is {model_type!r} with d_model={d_model}"
        )
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} does not exist beside {config_file}")
    saved = load_file(weights_file)
    # Check names and shapes before touching the model, so a bad folder leaves it unchanged.
    bottleneck = _bottleneck(d_model, config.reduction_factor)
    expected = {}
    for name, *_ in _sites(model, config.placement):
        for lin, shape in (("down", (bottleneck, d_model)), ("up", (d_model, bottleneck))):
            expected[f"{name}.adapter.{lin}.weight"] = shape
            expected[f"{name}.adapter.{lin}.bias"] = shape[:1]
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    wrong = [k for k in expected.keys() & saved.keys() if tuple(saved[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{weights_file} does not match {config_file} on this model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}"
        )
    add_adapters(model, config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in saved.items():
            params[k].copy_(v)  # copy_ casts to the adapter's dtype and device
    return config
