"""Rows of several LoRA adapters in one decoder step, each row's A and B gathered by an index tensor.

What it is. `LoraRows(model, names)` stacks, for every LoRA Linear of a PEFT model, the A and B
matrices of the adapters `names` into two tensors (index 0 is the base: zeros), once. A step then
sets `rows` (R,) to each row's adapter index and calls `linear(module, x)` instead of `module(x)`:
the base layer's output plus, per row, `B[rows[r]] @ A[rows[r]] @ x[r] * scaling[rows[r]]`, as two
batched matrix products over the gathered matrices.

Why our own. PEFT runs rows of several adapters through `adapter_names` (`_mixed_batch_forward`):
for every LoRA layer and every adapter in the batch it builds the adapter's row indices as a Python
list and indexes with it, a host-to-device copy each time (about 200 per step for flan-t5-base with
LoRA on q and v and four models in the batch) and shapes that change with the mix of adapters, so
the step can neither run at the GPU's pace nor be captured as a CUDA graph. Gathering by a tensor
of fixed shape keeps the step's shapes and memory fixed whatever the mix (the approach of
multi-LoRA servers such as S-LoRA and Punica's gathered matrix products, here without custom
kernels: at decode one token per row, the gathered A and B are small).

Plain LoRA on Linear layers only: no DoRA or other variants, no LoRA bias, no LoRA on embeddings,
no per-adapter copies of whole modules (modules_to_save, trainable tokens), adapters not merged.
LoRA dropout is never applied (decoding runs in eval mode). `LoraRows.unsupported(model)` says why a
model is not served this way; PEFT's adapter names still mix its rows, eagerly.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


class LoraRows:
    """Per-row LoRA for the adapters `names` of a PEFT model (module docstring).

    For each LoRA Linear: A (N + 1, r, in) and B (N + 1, out, r) in the adapters' own dtype, zero-
    padded to the largest rank among them (the padding adds exact zeros), and scaling (N + 1,);
    index 0 and adapters without that layer hold zeros. `rows` (R,) long: each row's index, set by
    the caller in place (a captured graph reads the same tensor)."""

    def __init__(self, model, names: list[str], capacity: int):
        problem = self.unsupported(model)
        if problem:
            raise ValueError(problem)
        self.index = {name: k + 1 for k, name in enumerate(names)}
        self.tables: dict[nn.Module, tuple[Tensor, Tensor, Tensor]] = {}
        for module in model.modules():
            if not _is_lora_linear(module):
                continue
            present = [name for name in names if name in module.lora_A]
            if not present:
                continue
            weight = module.lora_A[present[0]].weight
            rank = max(module.lora_A[name].weight.shape[0] for name in present)
            n = len(names) + 1
            a = torch.zeros(n, rank, module.in_features, dtype=weight.dtype, device=weight.device)
            b = torch.zeros(n, module.out_features, rank, dtype=weight.dtype, device=weight.device)
            scaling = torch.zeros(n, dtype=weight.dtype, device=weight.device)
            with torch.no_grad():
                for name in present:
                    k, r = self.index[name], module.lora_A[name].weight.shape[0]
                    a[k, :r] = module.lora_A[name].weight  # (r, in)
                    b[k, :, :r] = module.lora_B[name].weight  # (out, r)
                    scaling[k] = module.scaling[name]
            self.tables[module] = (a, b, scaling)
        device = next(iter(self.tables.values()))[0].device if self.tables else torch.device("cpu")
        self.rows = torch.zeros(capacity, dtype=torch.long, device=device)  # (R,) adapter index per row
        self._under: dict[int, list[nn.Module]] = {}  # id(root) -> the gathered layers under it

    @staticmethod
    def unsupported(model) -> str | None:
        """Why rows of this model's adapters cannot be gathered (None: they can)."""
        from peft import LoraConfig, PeftModel

        if not isinstance(model, PeftModel):
            return "not a PEFT model"
        for name, config in model.peft_config.items():
            if not isinstance(config, LoraConfig):
                return f"adapter {name} is {type(config).__name__}, not LoRA"
            if config.use_dora or getattr(config, "lora_bias", False):
                return f"adapter {name} uses DoRA or a LoRA bias, which per-row gathering does not apply"
        from peft.utils import AuxiliaryTrainingWrapper

        for module in model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save, trainable tokens
                return f"an adapter keeps its own {type(module).__name__} module, which gathering does not route"
            if hasattr(module, "lora_A") and not _is_lora_linear(module):
                return f"a LoRA layer of type {type(module).__name__} (only Linear layers are gathered)"
            if _is_lora_linear(module) and (module.merged or getattr(module, "lora_variant", None)):
                return "an adapter is merged into the weights or uses a LoRA variant"
        return None

    def indices(self, names: list[str | None], device) -> Tensor:
        """(n,) adapter indices of `names` (None or "__base__": the base, index 0). A name these
        tables do not hold is an error, never the base in silence."""
        unknown = sorted({name for name in names if name and name != "__base__" and name not in self.index})
        if unknown:
            raise ValueError(f"adapters {unknown} are not among the gathered ones: {sorted(self.index)}")
        return torch.tensor([self.index[name] if name and name != "__base__" else 0 for name in names],
                            device=device)  # fmt: skip

    def linear(self, module: nn.Module, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """`module(x)` for x (n, t, in) whose row r runs under adapter `rows[r]` (default: self.rows,
        its first n entries). Layers without LoRA are called as they are."""
        table = self.tables.get(module)
        if table is None:
            return module(x)
        a, b, scaling = table
        index = (self.rows if rows is None else rows)[: x.shape[0]]  # (n,)
        result = module.base_layer(x)  # (n, t, out)
        h = torch.bmm(x.to(a.dtype), a[index].transpose(1, 2))  # (n, t, r)
        delta = torch.bmm(h, b[index].transpose(1, 2)) * scaling[index][:, None, None]  # (n, t, out)
        return result + delta.to(result.dtype)


    @contextlib.contextmanager
    def routed(self, root: nn.Module, rows: Tensor):
        """Within the block, a forward of `root` (for instance the model's encoder, run by its own
        transformers code) runs each row r of its batch under adapter `rows[r]` (n,): every gathered
        LoRA layer under `root` computes `linear(module, x, rows)` in place of PEFT's forward, which
        would mix adapters through `adapter_names` (a Python list per layer and adapter). Meant for
        one thread that owns the model, as the server's worker does."""
        layers = self._under.get(id(root))
        if layers is None:
            layers = self._under[id(root)] = [m for m in root.modules() if m in self.tables]

        def forward_of(module):
            return lambda x, *args, **kwargs: self.linear(module, x, rows)

        # An instance attribute: nn.Module.__call__ calls it instead. A forward some other code set
        # on the instance (Accelerate's device hooks do) is put back after.
        own = {module: module.__dict__.get("forward") for module in layers}
        for module in layers:
            module.forward = forward_of(module)
        try:
            yield
        finally:
            for module, before in own.items():
                if before is None:
                    del module.forward
                else:
                    module.forward = before


def _is_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora import Linear

    return isinstance(module, Linear)
