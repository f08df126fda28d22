"""LoRA (Hu et al., arXiv 2106.09685) for any model of this project: add, train, merge, save and load.

A LoRA replaces a frozen linear W by W + (alpha / rank) B A with A (rank, in) and B (out, rank) trainable; B starts
at zero so training starts from the base model. `LoRALinear` wraps the base module (an nn.Linear, or int8.Int8Linear)
instead of touching its weight, so it works on bf16, INT8 and meta-loaded bases alike; LoRA weights are kept in
float32 whatever the base dtype.

File formats (what other tools load; each model file's LORA_FORMAT says which it writes):
- kohya / sd-scripts: `lora_unet_<module path with _>.lora_down.weight` (A), `.lora_up.weight` (B), `.alpha`
- diffusers / PEFT: `transformer.<module path>.lora_A.weight`, `.lora_B.weight` (alpha folded or in metadata)
- ComfyUI "original": `diffusion_model.<module path>.lora_A.weight`, `.lora_B.weight` (optional `.alpha`)
`load` reads those, OneTrainer's and SimpleTuner's (`lora_transformer_`, `lycoris_`), the text encoders' keys (kohya's
`lora_te1_`..., diffusers' `text_encoder.`), and besides LoRA what ComfyUI applies: DoRA magnitudes, LoKr, LoHa and
full `.diff` / `.diff_b` changes. A model file gives the pipeline's parts and alias maps for names it does not have
itself (another tool's names for fused or reordered layers); everything else happens here.
"""

import fnmatch
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
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
# Full weight changes (LoKr, LoHa, DoRA, `.diff` from other tools' files): merged into a float base weight, as ComfyUI
# does, or added by a DeltaLinear on a base that cannot absorb them (INT8)


class DeltaLinear(nn.Module):
    """base(x) + scale * x delta^T with delta (out, in) in float32: a full weight change on an INT8 base."""

    def __init__(self, base: nn.Module, delta: Tensor, scale: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("delta", delta.float())  # a buffer: frozen, and moves with the model
        self.scale = scale

    weight, bias = LoRALinear.weight, LoRALinear.bias

    def extra_repr(self) -> str:
        return f"scale={self.scale}"

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        return out + (self.scale * F.linear(x.to(self.delta.dtype), self.delta)).to(out.dtype)


def innermost(layer: nn.Module) -> nn.Module:
    """The base layer under any LoRALinear / DeltaLinear wrappers."""
    while isinstance(layer, LoRALinear | DeltaLinear):
        layer = layer.base
    return layer


def dora(weight: Tensor, delta: Tensor, magnitude: Tensor) -> Tensor:
    """DoRA (Liu et al., arXiv 2402.09353) as a plain weight change: the changed weight W + delta with each row
    (magnitude (out, 1): PEFT's and LyCORIS' default) or each column ((1, in): LyCORIS' wd_on_out=False) rescaled to
    the learned length, minus W. Rows whose magnitude is NaN (a fused layer only part of which has one) keep theirs."""
    changed = weight + delta
    norm = changed.norm(dim=1 if magnitude.shape[1] == 1 else 0, keepdim=True)
    return changed * torch.where(magnitude.isnan(), 1.0, magnitude / norm) - weight


# ----------------------------------------------------------------------------------------------------------------------
# Files: save in the format other tools load, read what every tool writes

SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def save(model: nn.Module, path, fmt: str, metadata: dict | None = None, dtype: torch.dtype = torch.bfloat16):
    """Write the model's LoRAs as safetensors, atomically, in `dtype` (bf16 by default, as kohya and ai-toolkit write
    them; alphas stay float32), with the metadata keys other tools read (kohya's `ss_network_dim` / `ss_network_alpha`,
    the SAI model spec's version and date) beside `metadata` (the model file's LORA_METADATA and the caller's own).
    fmt "kohya": `lora_unet_<name with _>` with lora_down/lora_up/alpha (FLUX.1's convention, read by ComfyUI and
    diffusers); "comfy": `diffusion_model.<name>` lora_A/lora_B with alpha / rank folded into B (Z-Image's)."""
    from safetensors.torch import save as serialize

    state, ranks, alphas = {}, set(), set()
    for name, m in lora_layers(model).items():
        a, b = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(m.alpha)}
            alphas.add(m.alpha)
        elif fmt == "comfy":
            state |= {
                f"diffusion_model.{name}.lora_A.weight": a,
                f"diffusion_model.{name}.lora_B.weight": b * (m.alpha / m.rank),
            }
            alphas.add(float(m.rank))  # alpha / rank is folded into B: the file itself has alpha = rank
        else:
            raise ValueError(f"unknown LoRA format {fmt!r} (kohya or comfy)")
        ranks.add(m.rank)
    state = {k: (v if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in state.items()}
    standard = {"modelspec.sai_model_spec": "1.0.1", "modelspec.date": datetime.now().isoformat(timespec="seconds")}
    if len(ranks) == 1 and len(alphas) == 1:
        standard |= {"ss_network_dim": ranks.pop(), "ss_network_alpha": alphas.pop()}
    data = serialize(state, metadata={k: str(v) for k, v in {**standard, **(metadata or {})}.items()})
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:  # open() honours the umask; safetensors' save_file would leave the file 0600
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Patch:
    """What a file changes in one layer, in float32 with alpha / rank folded in: the weight becomes
    W + up @ down + diff (LoKr and LoHa arrive as a diff), the bias b + diff_b, and a DoRA magnitude, (out, 1) or
    (1, in), then rescales each row or column of the changed weight. `keys`: the file's tensors it was read from."""

    down: Tensor | None = None  # (rank, in)
    up: Tensor | None = None  # (out, rank)
    diff: Tensor | None = None  # the weight's (or any parameter's) shape
    diff_b: Tensor | None = None  # (out,)
    magnitude: Tensor | None = None
    keys: list[str] = field(default_factory=list)


# Key prefixes -> the pipeline component they address (named like the diffusers repo's folders). Prefixes ending in
# "_" are kohya-style: the module path follows with "." written as "_". sd-scripts writes lora_te1 for FLUX.1's CLIP-L
# and lora_te3 for its T5, OneTrainer lora_te2 for T5; ComfyUI reads lora_te1/2/3 for T5 and lora_te1 for CLIP-L.
PREFIXES = {
    "lora_unet_": "transformer",
    "lora_transformer_": "transformer",  # OneTrainer
    "lycoris_": "transformer",  # SimpleTuner's LyCORIS files
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_2",
    "text_encoders.clip_l.transformer.": "text_encoder",  # ComfyUI
    "text_encoders.t5xxl.transformer.": "text_encoder_2",
    "text_encoder.": "text_encoder",  # diffusers / PEFT
    "text_encoder_2.": "text_encoder_2",
    "base_model.model.": "transformer",
    "model.diffusion_model.": "transformer",
    "diffusion_model.": "transformer",
    "transformer.": "transformer",
    "unet.": "transformer",
}

# How the tensors of one layer are named -> what each is (kohya/LyCORIS, diffusers/PEFT and ComfyUI's other spellings,
# the set ComfyUI's comfy/weight_adapter reads). Tried longest first.
ROLES = {
    **dict.fromkeys(
        [".lora_down.weight", ".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight", "_lora.down.weight"],
        "down",
    ),
    **dict.fromkeys([".lora_linear_layer.down.weight", ".lora_A"], "down"),
    **dict.fromkeys([".lora_up.weight", ".lora_B.weight", ".lora_B.default.weight", ".lora.up.weight"], "up"),
    **dict.fromkeys(["_lora.up.weight", ".lora_linear_layer.up.weight", ".lora_B"], "up"),
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
    **dict.fromkeys([".dora_scale", ".lora_magnitude_vector", ".lora_magnitude_vector.weight"], "magnitude"),
    ".lora_magnitude_vector.default.weight": "magnitude",
    **{f".{n}": n for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},
    **{f".{n}": n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")},
}
SUFFIXES = sorted(ROLES, key=len, reverse=True)


def read(path, names: dict[str, list[str]]) -> tuple[dict[str, dict[str, Patch]], list[str]]:
    """A LoRA file of any family -> ({component: {name: Patch}}, the keys of tensors that cannot be used: an unknown
    prefix, component or tensor kind, or an incomplete layer). `names`: for each component, the
    dotted names its keys may use (the model's own and any alias names), needed to undo kohya's "." -> "_"."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors LoRA file: {e}") from None
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"{path}: tensor {key} has NaN or infinite values; refusing to load this LoRA")
    dotted = {c: {n.replace(".", "_"): n for n in ns} for c, ns in names.items()}
    layers, unused = {}, []
    for key, value in state.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        where = suffix and _locate(key[: -len(suffix)], dotted)
        if not where:
            unused.append(key)
            continue
        layers.setdefault(where, {})[ROLES[suffix]] = value.float()
        layers[where].setdefault("keys", []).append(key)
    patches = {}
    for (component, name), tensors in layers.items():
        alpha, rslora = _peft_alpha(metadata, component, name)
        patch = _patch(tensors, tensors.get("alpha", alpha), rslora)
        if patch is None:
            unused += tensors["keys"]
        else:
            patches.setdefault(component, {})[name] = patch
    return patches, unused


def _locate(stem: str, dotted: dict[str, dict[str, str]]) -> tuple[str, str] | None:
    """A key without its tensor suffix -> (component, dotted name), or None for a component the pipeline lacks."""
    prefix = next((p for p in PREFIXES if stem.startswith(p)), "")
    component, stem = PREFIXES.get(prefix, "transformer"), stem[len(prefix) :]  # no prefix: DiffSynth's bare names
    if component == "transformer" and not prefix.endswith("_"):
        for p in ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer."):
            stem = stem.removeprefix(p)
    if prefix.endswith("_"):  # kohya: find the name; ComfyUI also reads lora_te1 as T5 and lora_te2/3 as CLIP-L
        others = [c for c in dotted if c != component and c.startswith("text_encoder") and component != "transformer"]
        found = next(((c, dotted[c][stem]) for c in [component, *others] if stem in dotted.get(c, {})), None)
        return found or ((component, stem) if component in dotted else None)
    return (component, stem) if component in dotted else None


def _peft_alpha(metadata: dict, component: str, name: str) -> tuple[float | None, bool]:
    """The alpha a diffusers-saved file keeps in its `lora_adapter_metadata` (PEFT's LoraConfig, keys prefixed by the
    component), with PEFT's `alpha_pattern` (matched as PEFT does: the pattern ends the module name) and rsLoRA."""
    try:
        config = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return None, False
    config = {k.removeprefix(f"{component}."): v for k, v in config.items() if k.startswith(f"{component}.")}
    pattern = next((p for p in config.get("alpha_pattern") or {} if re.fullmatch(rf"(.*\.)?({p})", name)), None)
    alpha = config["alpha_pattern"][pattern] if pattern else config.get("lora_alpha")
    return (None if alpha is None else float(alpha)), bool(config.get("use_rslora"))


def _patch(t: dict[str, Tensor], alpha: Tensor | float | None, rslora: bool = False) -> Patch | None:
    """One layer's tensors -> its Patch, or None when they do not make a complete change. Scales as LyCORIS and
    ComfyUI do: alpha / rank when the file has an alpha (or a low-rank factor for LoKr), else 1."""
    alpha = None if alpha is None else float(alpha)

    def scale(rank: int | None) -> float:
        if alpha is None or rank is None:
            return 1.0
        return alpha / (math.sqrt(rank) if rslora else rank)

    p = Patch(diff=t.get("diff"), diff_b=t.get("diff_b"), keys=t["keys"])
    if "down" in t or "up" in t:
        if "down" not in t or "up" not in t or t["down"].ndim != 2 or t["up"].ndim != 2:
            return None  # half a LoRA, or a convolution's
        p.down, p.up = t["down"], t["up"] * scale(t["down"].shape[0])
    diffs = []
    if any(k.startswith("lokr_") for k in t):  # LoKr: kron(w1, w2), each factor whole or as a low-rank product
        w1 = t["lokr_w1"] if "lokr_w1" in t else _product(t, "lokr_w1_a", "lokr_w1_b")
        w2 = t["lokr_w2"] if "lokr_w2" in t else _product(t, "lokr_w2_a", "lokr_w2_b")
        if w1 is None or w2 is None:
            return None
        # The rank is the low-rank factor's (w2's if both are factored); with both factors whole the scale is 1.
        rank = next((t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in t), None)
        diffs.append(torch.kron(w1, w2) * scale(rank))
    if any(k.startswith("hada_") for k in t):  # LoHa: the Hadamard product of two low-rank products
        w1, w2 = _product(t, "hada_w1_a", "hada_w1_b"), _product(t, "hada_w2_a", "hada_w2_b")
        if w1 is None or w2 is None or w1.shape != w2.shape:
            return None
        diffs.append(w1 * w2 * scale(t["hada_w1_b"].shape[0]))
    for d in diffs:
        if p.diff is not None and p.diff.shape != d.shape:
            return None
        p.diff = d if p.diff is None else p.diff + d
    if "magnitude" in t:
        m = t["magnitude"]
        p.magnitude = m.reshape(-1, 1) if m.ndim == 1 else m
        if p.magnitude.ndim != 2 or 1 not in p.magnitude.shape:
            return None
    if p.up is None and p.diff is None and p.diff_b is None:
        return None  # an alpha or a magnitude alone changes nothing
    return p


def _product(t: dict[str, Tensor], a: str, b: str) -> Tensor | None:
    if a not in t or b not in t or t[a].ndim != 2 or t[b].ndim != 2 or t[a].shape[1] != t[b].shape[0]:
        return None
    return t[a] @ t[b]


ALL = slice(None)


def route(patches: dict[str, Patch], aliases: dict, model: nn.Module) -> tuple[dict[str, Patch], list[str]]:
    """Patches named as in the file -> patches of the model's own layers or parameters, and the keys of those that
    cannot apply. `aliases`: {name: [(the model's layer, rows of the file's layer, rows of the model's), ...]} for
    names the model does not have itself: a fused qkv takes q, k and v into its rows in turn, a reordered layer (BFL's
    final modulation, diffusers' with its halves swapped) takes its rows in another order. The low-rank parts of one
    file layer keep sharing its A, so a split or reordered LoRA keeps its rank and stays exact."""
    parts, unusable = {}, []
    for name, patch in patches.items():
        routes = aliases.get(name) or ([(name, ALL, ALL)] if _find(model, name) is not None else [])
        whole = all(src == ALL and dst == ALL for _, src, dst in routes)
        fits = all(_accepts(_find(model, target), patch) for target, _, _ in routes)
        by_columns = patch.magnitude is not None and patch.magnitude.shape[0] == 1
        if not routes or not fits or (by_columns and not whole):  # a column norm spans all rows: no reordering it
            unusable += patch.keys
            continue
        for target, src, dst in routes:
            parts.setdefault(target, []).append((name, patch, src, dst))
    return {target: _combine(model, target, p) for target, p in parts.items()}, unusable


def _accepts(found: nn.Module | Tensor | None, p: Patch) -> bool:
    """Linear layers take every kind of change; other modules (norms, embeddings) and parameters take diffs only."""
    if found is None or hasattr(found, "in_features"):
        return found is not None
    has_bias = isinstance(found, nn.Module) and getattr(found, "bias", None) is not None
    return p.up is None and p.magnitude is None and (p.diff_b is None or has_bias)


def _combine(model: nn.Module, target: str, parts: list) -> Patch:
    """Place the rows each file layer gives `target` into one Patch of `target`'s size."""
    found = _find(model, target)
    rows = found.out_features if hasattr(found, "out_features") else _param(found).shape[0]
    out, lowrank = Patch(), {}
    try:
        for name, p, src, dst in parts:
            out.keys += [k for k in p.keys if k not in out.keys]
            if p.up is not None:
                lowrank.setdefault(name, (p.down, p.up.new_zeros(rows, p.down.shape[0])))[1][dst] = p.up[src]
            for kind in ("diff", "diff_b"):
                if (value := getattr(p, kind)) is not None:
                    if getattr(out, kind) is None:
                        setattr(out, kind, value.new_zeros(rows, *value.shape[1:]))
                    getattr(out, kind)[dst] += value[src]
            if p.magnitude is not None and p.magnitude.shape[0] == 1:
                out.magnitude = p.magnitude
            elif p.magnitude is not None:
                if out.magnitude is None:
                    out.magnitude = p.magnitude.new_full((rows, 1), math.nan)
                out.magnitude[dst] = p.magnitude[src]
        if lowrank:
            out.down = torch.cat([a for a, _ in lowrank.values()])
            out.up = torch.cat([b for _, b in lowrank.values()], dim=1)
    except RuntimeError as e:  # the rows do not fit: a LoRA for another model size
        raise ValueError(f"LoRA for {name} does not fit {target} of this model: {e}") from None
    return out


def _find(model: nn.Module, name: str) -> nn.Module | Tensor | None:
    """The module or parameter called `name`, or None."""
    for get in (model.get_submodule, model.get_parameter):
        try:
            return get(name)
        except AttributeError:
            pass
    return None


def _param(found: nn.Module | Tensor) -> Tensor:
    """What a diff of a non-linear module changes: its weight, or its only parameter (BFL's RMSNorm `scale`)."""
    if isinstance(found, Tensor):
        return found
    own = dict(found.named_parameters(recurse=False))
    if "weight" in own or len(own) != 1:
        return found.weight
    return next(iter(own.values()))


@torch.no_grad()
def apply(model: nn.Module, patches: dict[str, Patch], scale: float = 1.0) -> list[str]:
    """Apply patches named after the model's own layers or parameters, each at `scale`. A low-rank change becomes a
    LoRALinear on top of the layer (several files stack, and lora.set_scale still changes it). A full weight change
    (.diff, LoKr, LoHa, DoRA: W + scale (W_dora - W), ComfyUI's rule) or a bias change is merged into a float
    weight, as ComfyUI does, or on an INT8 base added by a DeltaLinear; its scale is fixed once applied."""
    for name, p in patches.items():
        found = _find(model, name)
        if not hasattr(found, "in_features"):  # a norm's scale, an embedding, ...: diffs only (see route)
            _add(_param(found), p.diff, scale, f"{name}.diff")
            if p.diff_b is not None:
                _add(found.bias, p.diff_b, scale, f"{name}.diff_b")
            continue
        shape = (found.out_features, found.in_features)
        if p.up is not None and (p.up.shape[0], p.down.shape[1]) != shape:
            raise ValueError(f"LoRA for {name} is {p.up.shape[0]}x{p.down.shape[1]}, the layer {shape[0]}x{shape[1]}")
        if p.magnitude is not None:  # DoRA renormalises the whole changed weight: one full change
            base = innermost(found)
            weight = base.dequantize() if hasattr(base, "dequantize") else base.weight.float()
            delta = _fit(p.diff, shape, name) if p.diff is not None else torch.zeros(shape)
            if p.up is not None:
                delta = delta + p.up @ p.down
            if p.magnitude.shape not in ((shape[0], 1), (1, shape[1])):
                raise ValueError(f"DoRA magnitude for {name} has shape {tuple(p.magnitude.shape)}, the layer {shape}")
            device = weight.device
            _add_weight(model, name, dora(weight, delta.to(device), p.magnitude.to(device)), scale)
        else:
            if p.up is not None:
                layer = LoRALinear(found, rank=p.down.shape[0])
                layer.lora_A.copy_(p.down), layer.lora_B.copy_(p.up)
                layer.scale = scale
                _replace(model, name, layer.requires_grad_(False))
            if p.diff is not None:
                _add_weight(model, name, _fit(p.diff, shape, name), scale)
        if p.diff_b is not None:
            base = innermost(model.get_submodule(name))
            if base.bias is None:  # a bias change on a layer without one (ComfyUI adds it too)
                dtype = base.weight.dtype if base.weight.is_floating_point() else torch.float32
                zeros = torch.zeros(shape[0], dtype=dtype, device=base.weight.device)
                base.bias = nn.Parameter(zeros, requires_grad=False) if "bias" in base._parameters else zeros
            _add(base.bias, p.diff_b, scale, f"{name}.diff_b")
    return list(patches)


def _fit(delta: Tensor, shape: tuple, name: str) -> Tensor:
    if delta.shape != shape:
        raise ValueError(f"full weight change for {name} has shape {tuple(delta.shape)}, the layer {shape}")
    return delta


def _add(param: Tensor, delta: Tensor | None, scale: float, name: str):
    """param += scale * delta, out of place (the weights may be read-only memory-mapped file data)."""
    if delta is None:
        return
    if delta.shape != param.shape:
        raise ValueError(f"{name} has shape {tuple(delta.shape)}, the model's {tuple(param.shape)}")
    param.data = param.data + (scale * delta).to(param)


def _add_weight(model: nn.Module, name: str, delta: Tensor, scale: float):
    layer = model.get_submodule(name)
    base = innermost(layer)
    if base.weight.is_floating_point():
        _add(base.weight, delta, scale, name)
    else:  # INT8: merging would requantise the weight; keep the change beside it
        _replace(model, name, DeltaLinear(layer, delta.to(base.weight.device), scale))


def _replace(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load(path, components: dict, scale: float = 1.0, aliases=None, strict: bool = False) -> list[str]:
    """Read a LoRA file of any family and apply it at `scale` to the pipeline's parts, `components` ({"transformer":
    ..., "text_encoder": ..., "text_encoder_2": ...}, named like the diffusers repo's folders). A component may also be
    {attribute: module} for several modules of one architecture that all take its layers (Wan2.2 A14B's two experts:
    {"transformer": high, "transformer_2": low}): the file is read and checked once and applied to each. `aliases`:
    {component: alias map} for names the model does not have itself (see route). Whatever in the file cannot be
    applied is named in one warning line on stderr, or with `strict` raised as a ValueError before anything is
    changed. Returns the layers changed, as "attribute.layer" (the component's name for a single module)."""
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale must be a finite number, got {scale}")
    path, aliases = Path(path), aliases or {}
    targets = {c: m if isinstance(m, dict) else {c: m} for c, m in components.items()}
    first = {c: next(iter(modules.values())) for c, modules in targets.items()}  # names and routing: one suffices
    names = {c: _names(m) + list(aliases.get(c, {})) for c, m in first.items()}
    patches, unused = read(path, names)
    total = len(unused) + sum(len(p.keys) for layers in patches.values() for p in layers.values())
    routed = {}
    for component, layers in patches.items():
        routed[component], unusable = route(layers, aliases.get(component, {}), first[component])
        unused += unusable
    if unused:
        examples = ", ".join(unused[:3]) + (", ..." if len(unused) > 3 else "")
        message = (
            f"{path.name}: {len(unused)} of {total} tensors not applied (not in this model, or a kind this loader "
            f"does not apply): {examples}"
        )
        if strict or len(unused) == total:
            raise ValueError(message)
        print(f"warning: {message}", file=sys.stderr)
    changed = []
    for component, layers in routed.items():
        for attribute, module in targets[component].items():
            changed += [f"{attribute}.{name}" for name in apply(module, layers, scale)]
    return changed


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules()] + [n for n, _ in model.named_parameters()]
