"""LoRA's update added into the base product's own buffer (`train.fused_lora`).

PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(x)) * scaling`. Compiled, Inductor keeps the base
and LoRA products as two buffers and sums them inside each pointwise kernel that reads them, and keeps a scaled
copy of each output gradient for lora_B's. In a checkpointed decoder layer's backward that holds 11 buffers as
wide as the MLP at once: at 8B (bs 4 x 2048), 2.41 GiB of the train peak, where TRL + Liger holds 1.50
(bench/results/peer_h100.txt). Written as one addmm into the base product, with the scaling folded into
lora_B's r x out weight, the same backward holds 6 (a tiny Llama on a CPU, counted in Inductor's generated
code). Loss and gradients are PEFT's (tests/integration/test_speed_paths.py).

On a GPU it is on by default (`auto`): on an H100, 1.0 GiB less train peak at 8B and 13% faster steps at 1B
(bench/results/peer_h100.txt, 2026-12-06). A CPU keeps PEFT's forward unless asked: the embedded default's
measured run stays as it was.
"""

from __future__ import annotations

import types

import torch


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Bound to a PEFT LoRA Linear. One active, unmerged, plain adapter (no DoRA or other variant, no lora_B
    bias); anything else (DPO's reference pass with the adapter off, say) goes to PEFT's own forward."""
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None):
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    rows = x.reshape(-1, x.shape[-1])
    base = self.base_layer(rows)
    down = self.lora_dropout[name](rows).to(a.dtype) @ a.t()
    out = torch.addmm(base, down.to(base.dtype), (b * self.scaling[name]).t().to(base.dtype))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def wanted(params, on_gpu: bool) -> bool:
    """`train.fused_lora`, with auto on a GPU where it applies (`Params.fused_lora_misfit`: plain LoRA whose
    weights each rank holds whole)."""
    if params.train.fused_lora != "auto":
        return params.train.fused_lora
    return on_gpu and params.fused_lora_misfit() is None


def install(model) -> int:
    """Give every PEFT LoRA Linear of `model` the addmm forward; returns how many. The adapter's weights,
    names and saved files do not change."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]  # not the 4-bit or 8-bit subclasses
    for layer in layers:
        layer.forward = types.MethodType(_forward, layer)
    return len(layers)
