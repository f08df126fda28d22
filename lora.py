"""LoRA (Hu et al., arXiv 2106.09685) for any model of this project: add, train, merge, save and load.

A LoRA replaces a frozen linear W by W + (alpha / rank) B A with A (rank, in) and B (out, rank) trainable; B starts
at zero so training starts from the base model. `LoRALinear` wraps the base module (an nn.Linear, or int8.Int8Linear)
instead of touching its weight, so it works on bf16, INT8 and meta-loaded bases alike; LoRA weights are kept in
float32 whatever the base dtype.

File formats (what other tools load, see each model file's `lora_format`):
- kohya / sd-scripts: `lora_unet_<module path with _>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`
- diffusers / PEFT: `transformer.<module path>.lora_A.weight`, `.lora_B.weight` (alpha folded or in metadata)
- ComfyUI "original": `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` (optional `.alpha`)
"""

import fnmatch
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """base(x) + scale * (alpha / rank) * B(A(dropout(x))), with A, B in float32."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.scale = 1.0  # user-facing strength (pipe.load_lora(..., scale=0.8)); training uses 1
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        if device.type == "meta":
            device = "cpu"
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and PEFT's
        self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale}"

    @property
    def weight(self) -> Tensor:  # some code reads .weight.dtype / .device of what used to be an nn.Linear
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta(self) -> Tensor:
        """The weight update (out, in) this LoRA adds, in float32."""
        return (self.scale * self.alpha / self.rank) * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or self.scale == 0:
            return out
        h = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return out + (self.scale * self.alpha / self.rank) * h.to(out.dtype)


def find_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Names of the linear layers (nn.Linear or anything with in/out_features and a weight) matching any of the
    fnmatch-style `targets` patterns, e.g. "double_blocks.*.img_attn.qkv"."""
    names = []
    for name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear) or (
            hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, LoRALinear)
        )
        if is_linear and any(fnmatch.fnmatchcase(name, t) for t in targets) and ".base" not in f".{name}":
            names.append(name)
    return names


def add_lora(model: nn.Module, targets: list[str], rank: int = 16, alpha: float | None = None, dropout: float = 0.0):
    """Wrap every linear layer matching `targets` in a LoRALinear; freeze everything else. Returns the wrapped names.
    LoRA weights are created on the base layer's device (CPU for a meta base)."""
    names = find_linears(model, targets)
    if not names:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), rank, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_layers(model).values() for p in (m.lora_A, m.lora_B)]


def set_scale(model: nn.Module, scale: float):
    for m in lora_layers(model).values():
        if m.merged:
            raise ValueError("unmerge the LoRA before changing its scale")
        m.scale = scale


@torch.no_grad()
def merge(model: nn.Module):
    """Fold each LoRA into its base weight (no extra cost per step); unmerge() undoes it exactly up to rounding."""
    for m in lora_layers(model).values():
        if not m.merged:
            weight = m.base.weight
            if not weight.is_floating_point():
                raise ValueError("cannot merge a LoRA into an INT8 base; keep it unmerged")
            weight.add_(m.delta().to(weight.dtype))
            m.merged = True


@torch.no_grad()
def unmerge(model: nn.Module):
    for m in lora_layers(model).values():
        if m.merged:
            m.base.weight.sub_(m.delta().to(m.base.weight.dtype))
            m.merged = False


def remove_lora(model: nn.Module):
    """Put the base layers back (merged LoRAs stay folded into them)."""
    for name, m in lora_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base)
