"""FLUX.2 [klein] (4B and 9B, step-distilled and base) in plain PyTorch: text to image and multi-reference editing.

Reads top to bottom: configs and variants, the text encoder (zimage.py's Qwen3, three of its layers), the transformer
(Black Forest Labs' key names, so `flux-2-klein-4b.safetensors` loads as is), the autoencoder (BFL's `ae.safetensors`
names; the diffusers `vae/` folder that the open klein repos ship through one rename map), reference images, LoRA
names, loading, and the pipeline.

What FLUX.2 changes from FLUX.1 (flux1.py, whose pieces are imported where they are the same): no biases anywhere,
SwiGLU MLPs, one modulation per stream for the whole model instead of one per block, no pooled text vector, RoPE over
four axes (time, row, column, text position) with theta 2000, Qwen3 instead of CLIP + T5, and an autoencoder with 32
channels whose latents are 2x2 patches (128 channels) normalised by BatchNorm running statistics. Editing appends the
tokens of reference images to the sequence, at time positions 10, 20, ...

Time convention: as FLUX.1, which FLUX.2 is trained in: sigma = 1 is noise, x_sigma = (1 - sigma) x0 + sigma noise,
velocity = noise - x0.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

import flux1
import lora
import solvers
from flux1 import (
    AutoEncoderParams,
    LastLayer,
    MLPEmbedder,
    Modulation,
    QKNorm,
    SelfAttention,
    as_list,
    attention,
    canvas,
    double_stream,
    load_into,
    modulate,
    read_config,
    read_weights,
    rope,
    run_sampler,
    seeded_noise,
    timestep_embedding,
)
from zimage import Qwen3Encoder, Qwen3Tokenizer, load_qwen3

# ----------------------------------------------------------------------------------------------------------------------
# Configs and variants


@dataclass
class Flux2Params:
    """Transformer hyper-parameters; defaults are klein-4B. Loading reads them from the checkpoint's shapes."""

    in_channels: int = 128  # 32 latent channels x 2x2 patch
    context_in_dim: int = 7680  # 3 x Qwen3-4B's hidden size (three of its layers, concatenated)
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 20
    mlp_ratio: float = 3.0
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # (time, row, column, text position)
    theta: int = 2000
    guidance_embed: bool = False  # FLUX.2-dev has a guidance embedder; klein has none


@dataclass
class Variant:
    repo: str  # Hugging Face repo id
    transformer_file: str  # BFL-format single file at the repo root
    distilled: bool  # step-distilled: LoRA training on it undoes the distillation (train.py refuses by default)
    steps: int
    cfg: float  # true classifier-free guidance, v_u + cfg (v_c - v_u); 1 = off (no unconditional pass)
    gated: bool = False
    solver: str = "euler"
    size: tuple[int, int] = (1024, 1024)  # (height, width)


# BFL's defaults (their sampling code and model cards): the distilled models take 4 steps without CFG, the base models
# 50 steps with CFG 4. The 9B models are under BFL's non-commercial licence, which the Hub asks to accept first.
VARIANTS = {
    "flux2-klein-4b": Variant("black-forest-labs/FLUX.2-klein-4B", "flux-2-klein-4b.safetensors", True, 4, 1.0),
    "flux2-klein-9b": Variant(
        "black-forest-labs/FLUX.2-klein-9B", "flux-2-klein-9b.safetensors", True, 4, 1.0, gated=True
    ),
    "flux2-klein-base-4b": Variant(
        "black-forest-labs/FLUX.2-klein-base-4B", "flux-2-klein-base-4b.safetensors", False, 50, 4.0
    ),
    "flux2-klein-base-9b": Variant(
        "black-forest-labs/FLUX.2-klein-base-9B", "flux-2-klein-base-9b.safetensors", False, 50, 4.0, gated=True
    ),
}
DEFAULT_VARIANT = "flux2-klein-4b"
TRAIN_VARIANT = "flux2-klein-base-4b"  # LoRAs train on the undistilled base model; they also apply to the distilled one
PIXELS_PER_TOKEN = 16  # 8x autoencoder, then 2x2 patches: image sides must be multiples of 16

# ----------------------------------------------------------------------------------------------------------------------
# Text encoder: Qwen3 (Qwen3-4B for klein-4B, Qwen3-8B for klein-9B) from zimage.py. The prompt goes through Qwen3's
# chat template with thinking disabled, padded to 512 tokens; the outputs of decoder layers 9, 18 and 27 are
# concatenated per token, and all 512 positions (padding included) go to the transformer, as in BFL's code. Layers
# after 27 and the final norm are never built.

TEXT_LAYERS = (9, 18, 27)
TEXT_LENGTH = 512


def encode_text(encoder: Qwen3Encoder, tokenizer: Qwen3Tokenizer, prompts: list[str], device=None) -> Tensor:
    """(B, 512, 3 x hidden) features: [layer 9 | layer 18 | layer 27] of each token."""
    device = device or encoder.embed_tokens.weight.device
    ids, mask = tokenizer(tokenizer.chat(prompts, enable_thinking=False), padding="max_length")
    return torch.cat(encoder(ids.to(device), mask.to(device), list(TEXT_LAYERS)), dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Transformer (names mirror BFL's flux2/model.py). FLUX.1's layers are reused where FLUX.2 only drops their biases.


def bias_free(module: nn.Module) -> nn.Module:
    """FLUX.2 is FLUX.1's layers without biases: remove them from a module built by flux1.py."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.register_parameter("bias", None)
    return module


class SwiGLU(nn.Module):
    """silu(first half) * second half (Shazeer 2020, arXiv 2002.05202): the linear before it is twice as wide."""

    def forward(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def swiglu_mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * hidden, bias=False), SwiGLU(), nn.Linear(hidden, dim, bias=False))


class DoubleStreamBlock(nn.Module):
    """FLUX.1's MM-DiT block with SwiGLU MLPs; its modulation comes from outside (shared by every block)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_attn = bias_free(SelfAttention(hidden_size, num_heads, qkv_bias=False))
        self.img_mlp = swiglu_mlp(hidden_size, mlp_hidden)
        self.txt_attn = bias_free(SelfAttention(hidden_size, num_heads, qkv_bias=False))
        self.txt_mlp = swiglu_mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, pe: Tensor, mod_img: Tensor, mod_txt: Tensor) -> tuple[Tensor, Tensor]:
        return double_stream(self, img, txt, pe, mod_img.chunk(6, dim=-1), mod_txt.chunk(6, dim=-1))


class SingleStreamBlock(nn.Module):
    """Parallel attention + SwiGLU MLP: one fused input linear (q, k, v, MLP gate and up), one fused output linear."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, 3 * hidden_size + 2 * self.mlp_hidden_dim, bias=False)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.mlp_act = SwiGLU()

    def forward(self, x: Tensor, pe: Tensor, mod: Tensor) -> Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden_size, 2 * self.mlp_hidden_dim], -1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp_in)), 2))


class Flux2(nn.Module):
    def __init__(self, params: Flux2Params):
        super().__init__()
        p = self.params = params
        flux1.check_rope_axes(p.axes_dim, p.hidden_size // p.num_heads)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size, bias=False)
        self.time_in = bias_free(MLPEmbedder(256, p.hidden_size))
        self.guidance_in = bias_free(MLPEmbedder(256, p.hidden_size)) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        # One modulation per stream, computed once per forward from the timestep and shared by all of its blocks.
        self.double_stream_modulation_img = bias_free(Modulation(p.hidden_size, double=True))
        self.double_stream_modulation_txt = bias_free(Modulation(p.hidden_size, double=True))
        self.single_stream_modulation = bias_free(Modulation(p.hidden_size, double=False))
        self.final_layer = bias_free(LastLayer(p.hidden_size, p.in_channels))

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L_img, 128) latent tokens (reference tokens appended), txt (B, L_txt, 3 x Qwen3 hidden), timesteps
        (B,) sigma in [0, 1], guidance (B,) or None, ids (L, 4) positions (t, row, column, text index). Returns
        (B, L_img, 128)."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if guidance is not None and self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        # Each stream's modulation as one (B, 1, k x dim) tensor, split inside the blocks: checkpointed blocks (train.py
        # --gradient-checkpointing, offload.py's streamed blocks) carry gradients through tensor arguments only.
        mods = self.double_stream_modulation_img, self.double_stream_modulation_txt, self.single_stream_modulation
        mod_img, mod_txt, mod_single = (m.lin(F.silu(vec))[:, None] for m in mods)
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        pe = rope(torch.cat((txt_ids, img_ids), 0), self.params.axes_dim, self.params.theta)  # text first, as below
        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, pe, mod_single)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def flux2_params_from_state_dict(sd: dict[str, Tensor], axes_dim=None) -> Flux2Params:
    """Depth, widths and the guidance embedder, read from the checkpoint (klein-4B and 9B differ only in these). The
    RoPE split of the head is not in the weights: `axes_dim` (from the repo's transformer/config.json) or four equal
    parts, BFL's (32, 32, 32, 32) for a 128-wide head."""
    hidden, in_channels = sd["img_in.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    if depth:
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = sd["double_blocks.0.img_mlp.2.weight"].shape[1]
    else:
        head_dim = sd["single_blocks.0.norm.query_norm.scale"].shape[0]
        mlp_hidden = sd["single_blocks.0.linear2.weight"].shape[1] - hidden
    if axes_dim is None:
        axes_dim = (head_dim // 4,) * 4
        flux1.check_rope_axes(axes_dim, head_dim, source="inferred from FLUX.2's four equal axes")
    else:
        flux1.check_rope_axes(axes_dim, head_dim, source="transformer/config.json")
    return Flux2Params(
        in_channels=in_channels,
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=tuple(axes_dim),
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def load_transformer(path, device="cpu", dtype=torch.bfloat16, axes_dim=None) -> Flux2:
    """The BFL single file; `axes_dim`: the RoPE split of a head if the repo states it (else four equal parts)."""
    sd = flux1.read_bfl_transformer(path)  # ComfyUI-style single files' prefix removed
    if "vector_in.in_layer.weight" in sd:
        raise ValueError(f"{path} is a FLUX.1 checkpoint, not FLUX.2 (use flux1 / sample.py flux1)")
    if "img_in.weight" not in sd:
        raise ValueError(f"{path}: not a FLUX.2 transformer in BFL format (no img_in.weight)")
    with torch.device("meta"):
        model = Flux2(flux2_params_from_state_dict(sd, axes_dim))
    return load_into(model, sd, path).to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Autoencoder (BFL flux2/autoencoder.py): FLUX.1's encoder and decoder with 32 latent channels and a 1x1 convolution
# on each side of the latent. Latents are then cut into 2x2 patches (128 channels, order (c, pi, pj)) and normalised
# with BatchNorm running statistics stored in the checkpoint (eval mode: never updated).


class Encoder(flux1.Encoder):
    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(super().forward(x))


class Decoder(flux1.Decoder):
    def __init__(self, p: AutoEncoderParams):
        super().__init__(p)
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.post_quant_conv(z))


class LatentNorm(nn.Module):
    """BatchNorm2d(affine=False) in eval mode, both ways; kept in float32 whatever the model's dtype (see load_ae)."""

    def __init__(self, channels: int, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, z: Tensor, inverse: bool = False) -> Tensor:
        mean = self.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.running_var.view(1, -1, 1, 1) + self.eps)
        return z * std + mean if inverse else (z - mean) / std


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel order (c, pi, pj) as in BFL's code."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(z: Tensor) -> Tensor:
    b, c, h, w = z.shape
    return z.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, 2 * h, 2 * w)


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams, bn_eps: float = 1e-4):
        super().__init__()
        self.params = params  # FLUX.1's fields; its scale/shift factors are unused (BatchNorm statistics instead)
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.bn = LatentNorm(4 * params.z_channels, bn_eps)

    def encode(self, x: Tensor) -> Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> normalised latents (B, 128, H/16, W/16) in float32: the posterior mean
        (no sampling, as BFL's pipeline), patchified, then normalised."""
        mean = self.encoder(x.to(self.encoder.conv_in.weight.dtype)).chunk(2, dim=1)[0]
        return self.bn(patchify(mean.float()))

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, 128, h, w) -> pixels (B, 3, 16h, 16w), nominally in [-1, 1] (not clamped)."""
        z = unpatchify(self.bn(z.float(), inverse=True))
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


def ae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKLFlux2 names (the klein repos' `vae/`) -> BFL names: FLUX.1's rules, plus the two 1x1
    convolutions that BFL keeps inside the encoder and the decoder."""
    out = {}
    for key, value in flux1.ae_from_diffusers(sd).items():
        if key.startswith("quant_conv."):
            key = "encoder." + key
        elif key.startswith("post_quant_conv."):
            key = "decoder." + key
        out[key] = value
    return out


def load_ae(path, device="cpu", dtype=torch.float32) -> AutoEncoder:
    """BFL's `ae.safetensors` (a file), or a diffusers `vae/` folder with its config.json."""
    path = Path(path)
    eps = 1e-4
    if path.is_dir():
        config = read_config(path)
        if tuple(config.get("patch_size", (2, 2))) != (2, 2):
            raise ValueError(f"{path}: only FLUX.2's 2x2 latent patches are supported")
        eps = config.get("batch_norm_eps", eps)
        sd = ae_from_diffusers(read_weights(path))
    else:
        sd = read_weights(path)
    # BatchNorm's update counter is training state; in eval mode it is never read.
    sd = {k: v for k, v in sd.items() if k != "bn.num_batches_tracked"}
    if "encoder.conv_in.weight" not in sd or "bn.running_mean" not in sd:
        raise ValueError(f"{path}: not a FLUX.2 autoencoder (needs encoder.conv_in.weight and bn.running_mean)")
    with torch.device("meta"):
        model = AutoEncoder(flux1.ae_params_from_state_dict(sd), eps)
    model = load_into(model, sd, path)
    model.encoder.to(device, dtype), model.decoder.to(device, dtype)
    model.bn.to(device, torch.float32)  # the statistics stay exact in bf16 pipelines; encode/decode normalise in fp32
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Reference images for editing: BFL's preparation (flux2/sampling.py `encode_image_refs` and `default_prep`).

MAX_REFERENCES = 4  # BFL documents up to 4 reference images for klein (docs.bfl.ai, "Reference Images per Model")
MIN_REFERENCE_SIDE, MAX_REFERENCE_ASPECT = 64, 8
# Area caps: BFL's code writes 2024**2 (sic) for one reference and 1024**2 for several. diffusers' Flux2KleinPipeline
# caps every reference at 1024**2; we follow BFL. Under the caps both only crop.
ONE_REFERENCE_PIXELS, REFERENCE_PIXELS = 2024**2, 1024**2


def reference_pixels(images) -> list[Tensor]:
    """Reference images (PIL images or paths) -> (1, 3, h, w) tensors in [-1, 1], with BFL's rules: RGB; each side at
    least 64 pixels and an aspect ratio of at most 8 (else a ValueError, as BFL's code raises); larger than the area cap
    -> scaled down (Lanczos) to fit it; then center-cropped to multiples of 16."""
    images = [] if images is None else flux1.image_list(images)
    if len(images) > MAX_REFERENCES:
        raise ValueError(f"FLUX.2-klein takes at most {MAX_REFERENCES} reference images, got {len(images)}")
    limit = ONE_REFERENCE_PIXELS if len(images) == 1 else REFERENCE_PIXELS
    out = []
    for i, source in enumerate(images):
        name = source if isinstance(source, str | Path) else f"#{i + 1}"
        image = flux1.read_image(source, "reference image").convert("RGB")
        w, h = image.size
        if min(w, h) < MIN_REFERENCE_SIDE:
            raise ValueError(f"reference image {name} is {w}x{h}: both sides must be at least {MIN_REFERENCE_SIDE}")
        if max(w / h, h / w) > MAX_REFERENCE_ASPECT:
            raise ValueError(f"reference image {name} is {w}x{h}: aspect ratio above {MAX_REFERENCE_ASPECT}:1")
        if w * h > limit:
            scale = math.sqrt(limit / (w * h))
            image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)
            w, h = image.size
        left, top = (w - w // 16 * 16) // 2, (h - h // 16 * 16) // 2
        image = image.crop((left, top, left + w // 16 * 16, top + h // 16 * 16))
        out.append(flux1.from_pil(image))
    return out


def token_ids(h: int, w: int, t: int, device) -> Tensor:
    """Positions (t, row, column, 0) of an h x w grid of latent tokens, row-major."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ids = torch.stack([torch.full_like(rows, t), rows, cols, torch.zeros_like(rows)], dim=-1)
    return ids.reshape(h * w, 4).float()


def text_ids(length: int, device) -> Tensor:
    """Text token j sits at (0, 0, 0, j)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def tokens(z: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h w, C) tokens, row-major (the latents are already 2x2 patches)."""
    return z.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: default trained layers, the file format written, and the diffusers names LoRAs from the wild may use

# FLUX.1's: attention and MLP of every block; the shared modulations stay frozen. Both linears of every single block:
# diffusers before 0.37 failed on files where a single block lacks linear1 (huggingface/diffusers#13107), so a file
# trained with the defaults always has both.
LORA_TARGETS = flux1.LORA_TARGETS
# diffusion_model.<BFL name>.lora_A/B: what ai-toolkit writes for FLUX.2, read by ComfyUI and by diffusers'
# Flux2KleinPipeline.load_lora_weights.
LORA_FORMAT = "comfy"

# diffusers' Flux2Transformer2DModel names -> BFL names (diffusers' single-file converter, inverted). Projections that
# BFL fuses are listed in the order of their concatenation.
DIFFUSERS_TOP = {
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) there, (shift, scale) here
}
DIFFUSERS_DOUBLE = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
DIFFUSERS_FUSED_DOUBLE = flux1.DIFFUSERS_FUSED_DOUBLE  # q, k, v: the same names as FLUX.1's
DIFFUSERS_SINGLE = {  # diffusers keeps FLUX.2's single-block linears fused: pure renames
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}


def lora_aliases(params: Flux2Params) -> dict[str, list[tuple[str, slice, slice]]]:
    """diffusers' names of FLUX.2's layers, as PEFT files use them -> rows of ours (lora.route): q, k and v take their
    rows of BFL's fused qkv, and the final modulation's halves swap (diffusers: scale, shift; BFL: shift, scale)."""
    return flux1.lora_aliases(params, DIFFUSERS_TOP, DIFFUSERS_DOUBLE, DIFFUSERS_FUSED_DOUBLE, DIFFUSERS_SINGLE, {})


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def detect_variant(root: Path) -> str:
    """By the transformer's file name; else distilled or base from the diffusers model_index.json (the 4B and 9B
    variants share their defaults, so the size does not matter here)."""
    for name, v in VARIANTS.items():
        if (root / v.transformer_file).is_file():
            return name
    index = root / "model_index.json"
    if index.is_file() and json.loads(index.read_text()).get("is_distilled") is False:
        return TRAIN_VARIANT
    return DEFAULT_VARIANT


def component_files(v: Variant) -> list[str]:
    # The autoencoder from the repo's own diffusers vae/ folder: BFL's ae.safetensors lives only in the gated
    # FLUX.2-dev repo.
    files = [v.transformer_file, "transformer/config.json", "text_encoder/*", "tokenizer/*", "vae/*"]
    return files + ["model_index.json"]


def load(
    name_or_path=DEFAULT_VARIANT, variant: str | None = None, device="cpu", dtype=torch.bfloat16, progress=False
) -> "Flux2KleinPipeline":
    """Load the whole pipeline from a variant name (downloads from Hugging Face) or a folder laid out like the repo:
    `flux-2-klein-*.safetensors` (BFL format), `vae/` (diffusers) or `ae.safetensors` (BFL), `text_encoder/` (Qwen3),
    `tokenizer/`, and `transformer/config.json` if present (for the RoPE split). progress: a bar over the parts."""
    root, variant = flux1.locate(name_or_path, variant, VARIANTS, "FLUX.2-klein", detect_variant, component_files)
    transformer_file = flux1.find_transformer_file(root, VARIANTS[variant])
    ae_path = root / "ae.safetensors" if (root / "ae.safetensors").is_file() else root / "vae"
    if not ae_path.exists():
        raise FileNotFoundError(f"{root}: expected the autoencoder as a diffusers vae/ folder or ae.safetensors")
    text_config = read_config(root / "text_encoder")
    if text_config.get("num_hidden_layers", 0) < max(TEXT_LAYERS):
        raise ValueError(f"{root / 'text_encoder'}: FLUX.2-klein reads Qwen3 layer {max(TEXT_LAYERS)}; it has fewer")
    tokenizer = Qwen3Tokenizer(root / "tokenizer" / "tokenizer.json", max_length=TEXT_LENGTH)
    with flux1.loading_bar(variant, 3, progress) as bar:
        transformer = load_transformer(transformer_file, device, dtype, flux1.repo_axes_dim(root))
        bar.update()
        ae = load_ae(ae_path, device, dtype)
        bar.update()
        text_encoder = load_qwen3(root / "text_encoder", max(TEXT_LAYERS), device, dtype)
        bar.update()
    width = 3 * text_encoder.config.hidden_size
    if width != transformer.params.context_in_dim:
        raise ValueError(
            f"{root}: the text encoder gives {width} features per token, the transformer takes "
            f"{transformer.params.context_in_dim} (mixed 4B and 9B files?)"
        )
    return Flux2KleinPipeline(transformer, text_encoder, tokenizer, ae, variant)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def schedule(steps: int, height: int, width: int) -> Tensor:
    """FLUX.2's empirical shift, which depends on the image size and the step count (solvers.flux2_mu)."""
    image_tokens = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
    return solvers.time_shift(solvers.linear_sigmas(steps), solvers.flux2_mu(image_tokens, steps))


class Flux2KleinPipeline:
    def __init__(self, transformer: Flux2, text_encoder: Qwen3Encoder, tokenizer: Qwen3Tokenizer, ae, variant: str):
        self.transformer, self.text_encoder, self.tokenizer, self.ae = transformer, text_encoder, tokenizer, ae
        self.variant = variant
        self.defaults = VARIANTS[variant]

    vae, device = flux1.Flux1Pipeline.vae, flux1.Flux1Pipeline.device

    @torch.no_grad()
    def encode_prompt(self, prompts) -> dict[str, Tensor]:
        """{"txt": (B, 512, 3 x hidden)} Qwen3 features of each prompt in the chat template (thinking disabled)."""
        device = next(self.text_encoder.parameters()).device
        return {"txt": encode_text(self.text_encoder, self.tokenizer, as_list(prompts), device)}

    def velocity(
        self,
        x: Tensor,
        sigma,
        cond: dict[str, Tensor],
        references: list[Tensor] | None = None,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        """x (B, 128, H/16, W/16) latents at noise level sigma (float or (B,)) -> velocity (noise - x0) in float32.
        references: latents of reference images from encode(), each (1 or B, 128, h_i, w_i); their tokens join the
        sequence at time positions 10, 20, ... and are dropped from the output. guidance: only for checkpoints with a
        guidance embedder (klein has none)."""
        b, _, h, w = x.shape
        device = x.device
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(b)
        txt = cond["txt"].to(device)
        if txt.shape[0] != b:
            txt = txt.expand(b, -1, -1)
        if guidance is not None:
            if self.transformer.guidance_in is None:
                raise ValueError("FLUX.2-klein has no guidance embedder; use cfg (true classifier-free guidance)")
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(b)
        img, ids = [tokens(x)], [token_ids(h, w, 0, device)]
        for i, ref in enumerate(references or []):
            img.append(tokens(ref.to(device)).expand(b, -1, -1))
            ids.append(token_ids(ref.shape[2], ref.shape[3], 10 * (i + 1), device))  # BFL's encode_image_refs
        out = self.transformer(torch.cat(img, 1), torch.cat(ids), txt, text_ids(txt.shape[1], device), sigma, guidance)
        return out[:, : h * w].float().transpose(1, 2).reshape(b, -1, h, w)

    def sigmas(self, steps: int, height: int, width: int) -> Tensor:
        """The schedule generate() samples on (for samplers outside it, e.g. edit.py)."""
        return schedule(steps, height, width)

    def sampling_kwargs(self, guidance=None) -> dict:
        """velocity() arguments for sampling: klein has no guidance embedder (FLUX.2-dev's would take `guidance`)."""
        return {} if guidance is None else {"guidance": float(guidance)}

    def null_condition(self, n: int = 1) -> dict[str, Tensor]:
        """The unconditional condition (RF-inversion's null text, edit.py): the empty prompt's features, what klein's
        classifier-free guidance uses as its negative."""
        return self.encode_prompt([""] * n)

    def load_lora(self, path, scale: float = 1.0, strict: bool = False) -> list[str]:
        """Apply a LoRA file (ComfyUI/ai-toolkit, kohya, diffusers/PEFT, LyCORIS keys; see lora.py) to the transformer
        and the text encoder at `scale`; returns the layers it changed. Several files stack. What cannot be applied is
        named in a warning, or with `strict` raises a ValueError."""
        components = {"transformer": self.transformer, "text_encoder": self.text_encoder}
        aliases = {"transformer": lora_aliases(self.transformer.params)}
        return lora.load(path, components, scale, aliases, strict)

    def training_kwargs(self) -> dict:
        return {}

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1] (B, 3, H, W), sides multiples of 16 -> latents (B, 128, H/16, W/16)."""
        if pixels.shape[-2] % PIXELS_PER_TOKEN or pixels.shape[-1] % PIXELS_PER_TOKEN:
            raise ValueError(f"image sides must be multiples of {PIXELS_PER_TOKEN}, got {tuple(pixels.shape[-2:])}")
        return self.ae.encode(pixels.to(self.ae.encoder.conv_in.weight.device))

    decode = flux1.Flux1Pipeline.decode

    @torch.no_grad()
    def encode_references(self, images) -> list[Tensor]:
        """Reference images (PIL images or paths; at most 4) -> their latents, (1, 128, h_i, w_i) each, prepared
        with BFL's size rules (see reference_pixels). Encoded once per generate() call."""
        return [self.encode(pixels) for pixels in reference_pixels(images)]

    @torch.no_grad()
    def generate(
        self,
        prompts,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        solver: str | None = None,
        guidance: float | None = None,
        cfg: float | None = None,
        negative_prompt="",
        seed=0,
        noise: Tensor | None = None,
        images=None,
        init_image=None,
        strength: float = 0.6,
        sigmas: Tensor | None = None,
        output: str = "pil",
        progress: bool = True,
    ):
        """Text to image, or editing with reference images; unset settings take the variant's defaults (see flux1's
        generate for the shared arguments).

        images: up to 4 reference images (PIL images or paths) to edit or combine; without height/width the output
        takes the first reference's size (as diffusers' Flux2KleinPipeline; BFL's CLI `match_image_size=0`). cfg:
        true CFG v_u + cfg (v_c - v_u), 1 = off; the base models default to 4, the distilled ones to 1. `noise`
        (B, 128, H/16, W/16) replaces the seeded noise."""
        d = self.defaults
        steps, solver = steps or d.steps, solver or d.solver
        cfg = d.cfg if cfg is None else cfg
        references = self.encode_references(images)
        if noise is not None:
            height, width = noise.shape[-2] * PIXELS_PER_TOKEN, noise.shape[-1] * PIXELS_PER_TOKEN
        elif references and init_image is None and height is None and width is None:
            height, width = (PIXELS_PER_TOKEN * s for s in references[0].shape[-2:])
        init, height, width = canvas(init_image, None, height, width, d.size)
        prompts = as_list(prompts)
        n = noise.shape[0] if noise is not None else len(prompts)
        cond = self.encode_prompt(as_list(prompts, n))
        uncond = self.encode_prompt(as_list(negative_prompt, n)) if cfg != 1 else None
        if noise is None:
            shape = (self.transformer.params.in_channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN)
            noise = seeded_noise(shape, seed, n, self.device)

        def velocity_fn(x, sigma):
            v = self.velocity(x, sigma, cond, references, guidance)
            if uncond is not None:  # true CFG: v_u + cfg (v_c - v_u), the references in both passes
                v = torch.lerp(self.velocity(x, sigma, uncond, references, guidance), v, cfg)
            return v

        sigmas = schedule(steps, height, width) if sigmas is None else sigmas
        return run_sampler(
            self, velocity_fn, n, height, width, sigmas, solver, seed, noise, init, strength, output, progress
        )
