"""LoRA (Hu et al., arXiv 2106.09685) for any model of this project: add, train, merge, save and load.

A LoRA replaces a frozen linear W by W + (alpha / rank) B A with A (rank, in) and B (out, rank) trainable; B starts
at zero so training starts from the base model. `LoRALinear` wraps the base module (an nn.Linear, or int8.Int8Linear)
instead of touching its weight, so it works on bf16, INT8 and meta-loaded bases alike; LoRA weights are kept in
float32 whatever the base dtype.

File formats (what other tools load; each model file's LORA_FORMAT says which it writes):
- kohya / sd-scripts: `lora_unet_<module path with _>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`
- diffusers / PEFT: `transformer.<module path>.lora_A.weight`, `.lora_B.weight` (alpha folded or in metadata)
- ComfyUI "original": `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` (optional `.alpha`)
"""

import fnmatch
import math
import os
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------------------
# Files: save in the format other tools load, read any of the three families


def save(model: nn.Module, path, fmt: str, metadata: dict | None = None):
    """Write the model's LoRAs as safetensors (float32), atomically. fmt "kohya": `lora_unet_<name with _>` with
    lora_down/lora_up/alpha (FLUX.1's convention, read by ComfyUI and diffusers); "comfy": `diffusion_model.<name>`
    lora_A/lora_B with alpha / rank folded into B (Z-Image's, read by ComfyUI and diffusers)."""
    from safetensors.torch import save_file

    state = {}
    for name, m in lora_layers(model).items():
        a, b = m.lora_A.detach().float().cpu().contiguous(), m.lora_B.detach().float().cpu().contiguous()
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(m.alpha)}
        elif fmt == "comfy":
            state |= {
                f"diffusion_model.{name}.lora_A.weight": a,
                f"diffusion_model.{name}.lora_B.weight": b * (m.alpha / m.rank),
            }
        else:
            raise ValueError(f"unknown LoRA format {fmt!r} (kohya or comfy)")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")
UNDERSCORED = ("lora_unet_", "lora_transformer_")  # kohya / musubi, OneTrainer: module path with "." -> "_"
DOWN = (".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight", ".lora_A")
UP = (".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight", ".lora.up.weight", ".lora_B")


def read(path, names: list[str]) -> tuple[dict[str, tuple[Tensor, Tensor]], dict]:
    """A LoRA file of any family -> {module path: (A (rank, in), B (out, rank))} with its alpha / rank folded into B,
    and the file's metadata. `names` are the dotted module paths the file may use (the model's own and any alias
    names the model file knows), needed to undo kohya's "." -> "_"."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors LoRA file: {e}") from None
    dotted = {n.replace(".", "_"): n for n in names}
    pairs, alphas = {}, {}
    for key, value in state.items():
        stem, kind = _split(key)
        if kind is None:
            continue  # not a LoRA tensor (e.g. a DoRA scale or a text-encoder key): ignored, reported below
        for prefix in PREFIXES:
            stem = stem.removeprefix(prefix)
        for prefix in UNDERSCORED:
            if stem.startswith(prefix):
                stem = dotted.get(stem[len(prefix) :], stem)
        if kind == "alpha":
            alphas[stem] = float(value)
        else:
            pairs.setdefault(stem, {})[kind] = value.float()
    out = {}
    for stem, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: LoRA module {stem} has only {list(ab)}")
        a, b = ab["A"], ab["B"]
        out[stem] = (a, b * (alphas.get(stem, a.shape[0]) / a.shape[0]))
    if not out:
        raise ValueError(f"{path}: no LoRA weights found (expected kohya, diffusers/PEFT or ComfyUI keys)")
    return out, metadata


def _split(key: str) -> tuple[str, str | None]:
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    for kind, suffixes in (("A", DOWN), ("B", UP)):
        for suffix in suffixes:
            if key.endswith(suffix):
                return key[: -len(suffix)], kind
    return key, None


def fuse(parts: list[tuple[Tensor, Tensor] | None], out_sizes: list[int]) -> tuple[Tensor, Tensor]:
    """LoRAs of separate projections (q, k, v, ...) as one LoRA of their concatenation (a fused qkv linear):
    A stacked, B block-diagonal; a missing part contributes zero rows. Exact, with rank = the sum of ranks."""
    present = [p for p in parts if p is not None]
    a = torch.cat([p[0] for p in present])
    b = torch.zeros(sum(out_sizes), a.shape[0])
    row, col = 0, 0
    for part, size in zip(parts, out_sizes):
        if part is not None:
            r = part[0].shape[0]
            b[row : row + size, col : col + r] = part[1]
            col += r
        row += size
    return a, b


def split(pair: tuple[Tensor, Tensor], out_sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    """A LoRA of a fused linear as LoRAs of its parts: the same A, B split by rows. Exact."""
    a, b = pair
    return [(a, part) for part in b.split(out_sizes)]


def apply(model: nn.Module, pairs: dict[str, tuple[Tensor, Tensor]], scale: float = 1.0) -> list[str]:
    """Add the given LoRAs (alpha folded, so alpha = rank) on top of the model's linear layers, each at `scale`.
    A layer that already has a LoRA gets another one stacked on top, so several files can be combined."""
    modules = dict(model.named_modules())
    unknown = [name for name in pairs if name not in modules and f"{name}.base" not in modules]
    if unknown:
        raise ValueError(f"LoRA modules not in this model: {unknown[:4]} ({len(unknown)} of {len(pairs)})")
    for name, (a, b) in pairs.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        base = getattr(owner, child)
        if (base.out_features, base.in_features) != (b.shape[0], a.shape[1]):
            raise ValueError(
                f"LoRA for {name} has shape {tuple(b.shape)}x{tuple(a.shape)}, the layer is "
                f"{base.out_features}x{base.in_features}"
            )
        layer = LoRALinear(base, rank=a.shape[0])
        with torch.no_grad():
            layer.lora_A.copy_(a), layer.lora_B.copy_(b)
        layer.scale = scale
        layer.requires_grad_(False)
        setattr(owner, child, layer)
    return list(pairs)
