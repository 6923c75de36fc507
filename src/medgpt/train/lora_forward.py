"""PEFT's LoRA linear layers with the adapter's update fused into one `addmm`.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as four passes over the layer's output: the
`lora_B` product, the multiplication by `scaling`, the addition, and (in the backward) the same again. On a CPU,
where those element-wise passes are memory-bound, they cost about a seventh of a LoRA step of a small model
(bench/train_throughput.py). `fuse` makes each adapted linear layer compute the same sum as
`addmm(base(x), lora_A(dropout(x)), lora_B.weight.T, alpha=scaling)`, which adds the scaled update into the
base output in the product itself (and its backward is two products, no element-wise pass).

The fused path is taken only where it computes exactly PEFT's formula: one active, unmerged, enabled plain
LoRA adapter (no DoRA or other variant, no `lora_B` bias, no per-row adapter names) whose weights share the
input's dtype (or run under autocast, which casts the `addmm` as it casts PEFT's products). Anything else (a disabled adapter, as DPO's reference pass uses; a merged
one; mixed adapters) calls PEFT's own forward. Under DeepSpeed ZeRO-3, which gathers each module's weights in
that module's own forward hook, nothing is fused.

Imported only where PEFT is (the training set-up).
"""

from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear


def fuse(model) -> int:
    """Give every plain PEFT LoRA `Linear` in `model` the fused forward; returns how many layers got it."""
    count = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(fused_forward, module)
            count += 1
    return count


def fused_forward(self, x, *args, **kwargs):
    """PEFT's `lora.Linear.forward`, with the plain single-adapter case as one `addmm`."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return Linear.forward(self, x, *args, **kwargs)
    name = self.active_adapters[0]
    if name not in self.lora_A or name in self.lora_variant:
        return Linear.forward(self, x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    weight = getattr(self.base_layer, "weight", None)
    same_dtype = torch.is_autocast_enabled(x.device.type) or (
        weight is not None and x.dtype == weight.dtype == lora_a.weight.dtype == lora_b.weight.dtype)
    if lora_b.bias is not None or not same_dtype:
        return Linear.forward(self, x)
    result = self.base_layer(x)
    update = lora_a(self.lora_dropout[name](x))
    out = torch.addmm(result.reshape(-1, result.shape[-1]), update.reshape(-1, update.shape[-1]),
                      lora_b.weight.t(), alpha=self.scaling[name])
    return out.view(result.shape)


def apply(trainer) -> int:
    """Fuse the LoRA layers of the trainer's model unless DeepSpeed ZeRO-3 partitions its weights."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        return 0
    return fuse(trainer.model)
