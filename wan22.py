"""Wan2.2 (Alibaba's Wan team): TI2V-5B (text- and image-to-video, one DiT) and T2V-A14B / I2V-A14B (two DiT experts,
one for high noise and one for low noise) in plain PyTorch.

Reads top to bottom: configs and variants; reading fp32 checkpoints straight into bf16; the umT5-XXL tokenizer (with
the official prompt cleaning) and encoder (FLUX.1's T5 blocks, each with its own relative position bias); the Wan DiT
(official key names, so `diffusion_pytorch_model-*.safetensors` loads as it is; diffusers' `transformer/` through one
rename map); the Wan VAEs, 2.2 (TI2V-5B) and 2.1 (A14B), built from the same causal 3D convolutions streamed through a
per-convolution cache (`Wan2.2_VAE.pth` / `Wan2.1_VAE.pth` names, diffusers' `vae/` through a rename map); LoRA names;
loading; the pipeline.

Video latents are (B, C, F, H, W): F = 1 + (frames - 1) / 4 latent frames, H = height / s, W = width / s with C = 48,
s = 16 for TI2V-5B's VAE and C = 16, s = 8 for A14B's; the DiT cuts them into 1x2x2 patches, so frame sides are
multiples of 2 s pixels (32 or 16) and frame counts 4k + 1.

Time convention: the official sampler feeds the DiT the integer timestep int(sigma * 1000) and reads its output as
noise - x0, which is the shared convention of this project (sigma = 1 is noise, v = noise - x0). `velocity()` does the
integer timestep, so every solver in solvers.py works with Wan. A14B's experts are chosen from the same integer
timestep, as the official code chooses them (Variant.boundary).
"""

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

import flux1
import lora
import solvers
from flux1 import (
    T5Block,
    T5Config,
    T5RMSNorm,
    T5Tokenizer,
    as_list,
    image_to_tensor,
    load_into,
    read_config,
    read_weights,
    t5_relative_position_buckets,
)

try:  # optional: the official prompt cleaning runs ftfy.fix_text first (requirements-video.txt)
    import ftfy
except ImportError:  # pragma: no cover - exercised where ftfy is not installed
    ftfy = None

# ----------------------------------------------------------------------------------------------------------------------
# Configs and variants


@dataclass
class WanParams:
    """DiT hyper-parameters; defaults are TI2V-5B's (Wan-Video/Wan2.2 `configs/wan_ti2v_5B.py`). Loading reads them
    from the checkpoint's shapes and config.json."""

    dim: int = 3072
    ffn_dim: int = 14336
    freq_dim: int = 256
    text_dim: int = 4096  # umT5-XXL hidden size
    in_dim: int = 48
    out_dim: int = 48
    num_heads: int = 24  # head_dim 128
    num_layers: int = 30
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) of one token, in latents
    eps: float = 1e-6
    text_len: int = 512  # the context is always 512 umT5 states, zeros past each prompt


@dataclass
class VAEParams:
    """The Wan VAEs; defaults are `Wan2.2_VAE.pth` (`vae2_2.py`): a 160-wide encoder and 256-wide decoder, 48 latent
    channels, 2x2 pixel patches in front (so 16x spatial and 4x temporal compression in all), and parameter-free
    shortcuts around each down/upsampling stage (`residual`). `Wan2.1_VAE.pth` (`vae2_1.py`, the A14B models'; its
    parameters read from its weights, see vae_params): 96 wide, 16 channels, no patchify, no shortcuts: 8x spatial, 4x
    temporal."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2
    residual: bool = True




@dataclass
class Variant:
    repo: str
    # Sampling defaults: the official ones (Wan-Video/Wan2.2 configs/wan_*.py, configs/shared_config.py, generate.py's
    # default --size per task).
    frames: int = 121
    fps: int = 24
    size: tuple[int, int] = (704, 1280)  # (height, width); with a first frame, only the area counts
    steps: int = 50
    cfg: float | tuple[float, float] = 5.0  # two experts: (low-noise, high-noise), the configs' sample_guide_scale
    shift: float = 5.0
    solver: str = "unipc"
    vae_file: str = "Wan2.2_VAE.pth"
    pixels_per_token: int = 32  # frame sides are multiples of this: VAE stride x the DiT's 2x2 patches
    image: str = "optional"  # a first frame: "optional" (TI2V), "required" (I2V-A14B) or "none" (T2V-A14B)
    # Two experts (A14B): the high-noise one runs while the official integer timestep int(sigma * 1000) is at or above
    # boundary * 1000 (text2video.py / image2video.py: `t.item() >= boundary * num_train_timesteps`), the low-noise one
    # after. None: one DiT (TI2V-5B).
    boundary: float | None = None
    # Training (train.py): the share of clips trained as image-to-video, conditioned on their first frame (1 for
    # I2V-A14B, whose DiT always takes the condition; TI2V-5B does both, so half, as LTX-2's recipe mixes them).
    train_first_frame: float = 0.0


A14B = dict(frames=81, fps=16, size=(720, 1280), steps=40, vae_file="Wan2.1_VAE.pth", pixels_per_token=16)
VARIANTS = {
    "wan22-ti2v-5b": Variant("Wan-AI/Wan2.2-TI2V-5B", train_first_frame=0.5),
    "wan22-t2v-a14b": Variant(
        "Wan-AI/Wan2.2-T2V-A14B", **A14B, cfg=(3.0, 4.0), shift=12.0, image="none", boundary=0.875
    ),
    "wan22-i2v-a14b": Variant(
        "Wan-AI/Wan2.2-I2V-A14B",
        **A14B,
        cfg=(3.5, 3.5),
        shift=5.0,
        image="required",
        boundary=0.9,
        train_first_frame=1.0,
    ),
}
DEFAULT_VARIANT = "wan22-ti2v-5b"
TRAIN_VARIANT = "wan22-ti2v-5b"
PIXELS_PER_TOKEN = 32  # TI2V-5B: 16x VAE (8x convolutions after a 2x2 pixel patchify), then 2x2 DiT patches; A14B: 16
NUM_TRAIN_TIMESTEPS = 1000  # the official timestep is int(sigma * 1000)
TEMPORAL_STRIDE = 4  # the VAE keeps the first frame and folds every 4 after it into one latent frame: 4k + 1 frames

# The official default negative prompt (Wan-Video/Wan2.2 configs/shared_config.py `sample_neg_prompt`). The official
# pipelines substitute it for an empty negative prompt, and so does generate().
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)

# Per-channel statistics of the Wan2.2 VAE's latents (official vae2_2.py): latents are (z - mean) / std.
WAN22_VAE_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
WAN22_VAE_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip
# The Wan2.1 VAE's (official vae2_1.py), for the A14B models.
WAN21_VAE_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_VAE_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
VAE_STATISTICS = {48: (WAN22_VAE_MEAN, WAN22_VAE_STD), 16: (WAN21_VAE_MEAN, WAN21_VAE_STD)}  # by latent channels

# ----------------------------------------------------------------------------------------------------------------------
# Reading weights into a dtype. The official DiT checkpoints are float32 (TI2V-5B ~20 GB, each A14B expert ~57 GB):
# tensors already in the wanted dtype stay memory-mapped (flux1.read_weights); the others are read from the file in
# 64 MB pieces, each converted into the new tensor as it arrives. Peak memory is then the converted weights plus one
# piece, where converting mmapped tensors would keep every float32 page read resident until the file is closed.

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
READ_CHUNK_BYTES = 64 << 20


def safetensors_layout(file: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
    """{key: (dtype, shape, first byte, end byte)} of a safetensors file, from its JSON header."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    start = 8 + size
    return {
        k: (SAFETENSORS_DTYPES[v["dtype"]], v["shape"], start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in header.items()
    }


def read_converted(file: Path, layout: tuple, dtype: torch.dtype) -> Tensor:
    """One tensor of a safetensors file in another dtype, read piece by piece (no copy of the source in memory)."""
    src, shape, begin, end = layout
    out = torch.empty(shape, dtype=dtype)
    flat, size = out.view(-1), src.itemsize
    buffer = torch.empty(min(READ_CHUNK_BYTES, end - begin), dtype=torch.uint8)
    with open(file, "rb", buffering=0) as f:
        f.seek(begin)
        done = 0
        while done < end - begin:
            n = min(len(buffer), end - begin - done)
            view, got = memoryview(buffer.numpy())[:n], 0
            while got < n:  # a raw read may return fewer bytes than asked
                read = f.readinto(view[got:])
                if not read:
                    raise ValueError(f"{file} is truncated (download it again)")
                got += read
            flat[done // size : (done + n) // size] = buffer[:n].view(src)
            done += n
    return out


def read_weights_as(path, dtype_of) -> dict[str, Tensor]:
    """flux1.read_weights (a .safetensors file, a sharded index, a .pth or a folder), each tensor in dtype_of(key).
    Safetensors tensors of another dtype are converted while read from the file (see above); .pth tensors (the VAE and
    the umT5 checkpoint, both small next to the DiT) are converted from the memory map."""
    file = flux1.weight_file(path)
    if file.suffix in (".pth", ".pt"):
        return {k: v.to(dtype_of(k)) for k, v in read_weights(file).items()}
    state_dict = read_weights(file)  # mmapped; checks that every shard is there and readable
    if file.name.endswith(".index.json"):
        shard_of = {k: file.parent / s for k, s in json.loads(file.read_text())["weight_map"].items()}
    else:
        shard_of = dict.fromkeys(state_dict, file)
    layouts = {}
    for key, tensor in state_dict.items():
        dtype = dtype_of(key)
        if tensor.dtype != dtype and tensor.is_floating_point():
            shard = shard_of[key]
            if shard not in layouts:
                layouts[shard] = safetensors_layout(shard)
            state_dict[key] = read_converted(shard, layouts[shard][key], dtype)
    return state_dict


# ----------------------------------------------------------------------------------------------------------------------
# umT5-XXL tokenizer and encoder (google/umt5-xxl). The official code cleans each prompt, tokenizes it to 512 ids
# (</s>, then <pad> = 0), runs the encoder with the padding masked out, and keeps the states of the real tokens; the DiT
# pads them back to 512 with zeros. Here the padded states are zeroed directly, which is the same context.


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning (wan/modules/tokenizers.py, clean='whitespace'): ftfy.fix_text (when ftfy is installed,
    as diffusers does: it repairs mojibake and straightens curly quotes, among others), HTML entities unescaped twice,
    runs of whitespace collapsed to one space, stripped. The official code matches whitespace with the `regex` module,
    whose \\s lacks the four ASCII separators U+001C..U+001F that Python's `re` counts as space."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"[^\S\x1c-\x1f]+", " ", text).strip()


class UMT5Tokenizer(T5Tokenizer):
    """umT5's SentencePiece tokenizer (the `tokenizer.json` in `google/umt5-xxl/`): FLUX.1's T5 tokenizer, which gives
    transformers' ids for it too, after the official prompt cleaning."""

    def __call__(self, prompts: list[str] | str) -> tuple[Tensor, Tensor]:
        """(ids, attention_mask), both (B, 512) int64: the cleaned prompt's tokens, </s>, then <pad> (0)."""
        encodings = self.tokenizer.encode_batch([clean_prompt(p) for p in as_list(prompts)])
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        return ids, torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)


class UMT5Block(T5Block):
    """A T5 v1.1 block that owns its relative position bias: umT5 learns one table per layer (T5 shares layer 0's)."""

    def forward(self, x: Tensor, buckets: Tensor, key_bias: Tensor) -> Tensor:
        table = self.layer[0].SelfAttention.relative_attention_bias
        return super().forward(x, table(buckets).permute(2, 0, 1)[None] + key_bias)


class UMT5Encoder(nn.Module):
    """input_ids, attention_mask (B, L) -> (B, L, d_model) last hidden states, zero at padded positions. transformers'
    UMT5EncoderModel key names (the -Diffusers repos' `text_encoder/`); Wan's own .pth is renamed on load."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        blocks = [UMT5Block(config, has_relative_attention_bias=True) for _ in range(config.num_layers)]
        norm = T5RMSNorm(config.d_model, config.layer_norm_epsilon)
        self.encoder = nn.ModuleDict(dict(block=nn.ModuleList(blocks), final_layer_norm=norm))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        c = self.config
        x = self.shared(input_ids)
        buckets = t5_relative_position_buckets(
            input_ids.shape[1], c.relative_attention_num_buckets, c.relative_attention_max_distance, x.device
        )
        # Padding keys are masked out (official and transformers); the pads' own outputs are zeroed below.
        real = attention_mask.bool()[:, None, None, :]
        key_bias = torch.zeros(real.shape, dtype=x.dtype, device=x.device).masked_fill(~real, torch.finfo(x.dtype).min)
        for block in self.encoder.block:
            x = block(x, buckets, key_bias)
        return self.encoder.final_layer_norm(x) * attention_mask[..., None].to(x.dtype)


# Wan's own umT5 names (`models_t5_umt5-xxl-enc-bf16.pth`, wan/modules/t5.py) -> transformers' names.
UMT5_FROM_WAN = [
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),  # the GELU branch
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]


def rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def umt5_config(sd: dict[str, Tensor]) -> T5Config:
    """umT5 hyper-parameters from the shapes (Wan's .pth has no config; the defaults are XXL's but for the vocabulary
    and per-layer bias, which the shapes give)."""
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
        d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")}),
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


def load_umt5(path, device="cpu", dtype=torch.bfloat16) -> UMT5Encoder:
    """umT5 from Wan's `models_t5_umt5-xxl-enc-bf16.pth` (Wan names) or a transformers folder (`text_encoder/`)."""
    path = Path(path)
    if path.is_dir():
        state_dict = read_weights_as(path, lambda k: dtype)
        embed = state_dict.pop("encoder.embed_tokens.weight", None)  # transformers' tied alias of `shared`
        if "shared.weight" not in state_dict and embed is not None:
            state_dict["shared.weight"] = embed
        config = T5Config.from_dict(read_config(path))
    else:
        state_dict = {rename(k, UMT5_FROM_WAN): v for k, v in read_weights_as(path, lambda k: dtype).items()}
        if "shared.weight" not in state_dict:
            raise ValueError(f"{path}: not Wan's umT5 checkpoint (no token_embedding.weight)")
        config = umt5_config(state_dict)
    with torch.device("meta"):
        model = UMT5Encoder(config)
    model = load_into(model, state_dict, path).to(device).eval().requires_grad_(False)
    if dtype == torch.float16:  # as flux1.load_t5: T5's feed-forward outputs overflow fp16
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# The Wan DiT (wan/modules/model.py; key names mirror it). Video tokens: 1x2x2 latent patches, each block
# self-attention with 3D RoPE, cross-attention to the 512 umT5 states, an MLP; modulation by the timestep as in DiT
# (arXiv 2212.09748), one set per latent frame. Where the official code computes in float32 under bf16 autocast (the
# timestep embedding and projection, the modulation, the norms, the head), so does this one, and it keeps those
# weights in float32 (keeps_fp32); the RoPE rotation is done in float64, as in the official code.


def keeps_fp32(key: str) -> bool:
    """The DiT tensors kept in float32 whatever the compute dtype (the official model computes with them in fp32)."""
    fp32_modules = ("time_embedding", "time_projection", "head.head", "modulation", "norm3", "norm_q", "norm_k")
    return any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", key) for m in fp32_modules)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for the timestep embedding and RoPE, as the official code; float32 where the device has no float64
    (Apple's MPS), as diffusers does there."""
    return torch.float32 if device.type == "mps" else torch.float64


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos, sin] of t * 10000^(-k / (dim/2)), k < dim/2, in float64 like the official code (t is an integer
    timestep up to 999: float32 would be off by ~1e-4 rad at the fastest frequency)."""
    half, dtype = dim // 2, wide_dtype(t.device)
    freqs = torch.pow(10000, -torch.arange(half, dtype=dtype, device=t.device).div(half))
    args = t.to(dtype)[..., None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def rope_freqs(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0, device=None) -> Tensor:
    """(F * H * W, 1, head_dim / 2) complex128 rotations of the video tokens, in (frame, row, column) order.

    The head's channel pairs are split over the three axes, (22, 21, 21) pairs for head_dim 128: frames get
    head_dim/2 - 2 (head_dim/2 // 3) pairs, rows and columns head_dim/2 // 3 each. Each axis rotates its pairs by
    position * theta^(-2i/d) (RoFormer, arXiv 2104.09864) with d its own width, positions from 0."""
    pairs = head_dim // 2
    widths = (pairs - 2 * (pairs // 3), pairs // 3, pairs // 3)
    dtype = wide_dtype(torch.device(device or "cpu"))
    axes = []
    for n, w in zip(grid, widths):
        omega = 1.0 / torch.pow(theta, torch.arange(0, 2 * w, 2, dtype=dtype, device=device) / (2 * w))
        angles = torch.outer(torch.arange(n, dtype=dtype, device=device), omega)
        axes.append(torch.polar(torch.ones_like(angles), angles))
    f, h, w = grid
    table = torch.cat(
        [
            axes[0].view(f, 1, 1, -1).expand(f, h, w, -1),
            axes[1].view(1, h, 1, -1).expand(f, h, w, -1),
            axes[2].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return table.reshape(f * h * w, 1, -1)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, L, heads, head_dim) in float64; float32 out (the official rope_apply)."""
    wide = torch.float64 if freqs.dtype == torch.complex128 else torch.float32
    rotated = torch.view_as_complex(x.to(wide).unflatten(-1, (-1, 2)).contiguous()) * freqs
    return torch.view_as_real(rotated).flatten(-2).float()


class WanRMSNorm(nn.Module):
    """RMSNorm over the whole width (all heads at once): normalised in fp32, rounded to the input's dtype, then scaled
    by the (fp32) weight, as the official WanRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32, returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).type_as(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x (B, L, C) * (1 + scale) + shift in fp32, with shift, scale (B, G, 1, C): one pair per group of L / G
    consecutive tokens (a latent frame, or G = 1: all tokens)."""
    groups = shift.shape[1]
    return (x.float().unflatten(1, (groups, -1)) * (1 + scale) + shift).flatten(1, 2)


def gated(y: Tensor, gate: Tensor) -> Tensor:
    return (y.unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)


class WanSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = WanRMSNorm(dim, eps), WanRMSNorm(dim, eps)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dtype: torch.dtype) -> Tensor:
        """q (B, Lq, heads, d), k, v (B, Lk, heads, d) -> (B, Lq, heads * d) through the output projection. The scores
        run in the compute dtype (the official code casts q, k, v to bf16 for flash attention)."""
        q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    def forward(self, x: Tensor, freqs: Tensor, dtype: torch.dtype) -> Tensor:
        x = x.to(dtype)
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1))
        v = self.v(x).unflatten(-1, (self.num_heads, -1))
        return self.attend(apply_rope(q, freqs), apply_rope(k, freqs), v, dtype)


class WanCrossAttention(WanSelfAttention):
    """Queries from the video tokens, keys and values from the 512 text states (zero pads included, unmasked, as in the
    official model); no RoPE."""

    def forward(self, x: Tensor, context: Tensor, dtype: torch.dtype) -> Tensor:
        q = self.norm_q(self.q(x.to(dtype))).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(context)).unflatten(-1, (self.num_heads, -1))
        v = self.v(context).unflatten(-1, (self.num_heads, -1))
        return self.attend(q, k, v, dtype)


class WanAttentionBlock(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        self.norm1 = WanLayerNorm(p.dim, p.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(p.dim, p.num_heads, p.eps)
        self.norm3 = WanLayerNorm(p.dim, p.eps, elementwise_affine=True)  # before cross-attention (official name)
        self.cross_attn = WanCrossAttention(p.dim, p.num_heads, p.eps)
        self.norm2 = WanLayerNorm(p.dim, p.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(p.dim, p.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(p.ffn_dim, p.dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, p.dim))  # learned offsets added to the time projection

    def forward(self, x: Tensor, e: Tensor, context: Tensor, freqs: Tensor) -> Tensor:
        """x (B, L, dim); e (B, G, 6, dim) fp32 time projection per token group; context (B, 512, dim) embedded text in
        the compute dtype. The residual stream becomes fp32 at the first gated add, as under the official autocast."""
        dtype = context.dtype
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unsqueeze(3).unbind(2)
        x = x + gated(self.self_attn(modulate(self.norm1(x), shift1, scale1), freqs, dtype), gate1)
        x = x + self.cross_attn(self.norm3(x), context, dtype)
        return x + gated(self.ffn(modulate(self.norm2(x), shift2, scale2).to(dtype)), gate2)


class Head(nn.Module):
    def __init__(self, p: WanParams):
        super().__init__()
        self.norm = WanLayerNorm(p.dim, p.eps, elementwise_affine=False)
        self.head = nn.Linear(p.dim, math.prod(p.patch_size) * p.out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, p.dim))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        shift, scale = (self.modulation + e.unsqueeze(2)).unsqueeze(3).unbind(2)  # from e (B, G, dim)
        return self.head(modulate(self.norm(x), shift, scale).to(self.head.weight.dtype))


class WanModel(nn.Module):
    def __init__(self, params: WanParams):
        super().__init__()
        p = self.params = params
        if p.dim % p.num_heads or (p.dim // p.num_heads) % 2:
            raise ValueError(f"dim {p.dim} must split into {p.num_heads} heads of an even width")
        self.patch_embedding = nn.Conv3d(p.in_dim, p.dim, kernel_size=p.patch_size, stride=p.patch_size)
        self.text_embedding = nn.Sequential(
            nn.Linear(p.text_dim, p.dim), nn.GELU(approximate="tanh"), nn.Linear(p.dim, p.dim)
        )
        self.time_embedding = nn.Sequential(nn.Linear(p.freq_dim, p.dim), nn.SiLU(), nn.Linear(p.dim, p.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(p.dim, 6 * p.dim))
        self.blocks = nn.ModuleList(WanAttentionBlock(p) for _ in range(p.num_layers))
        self.head = Head(p)

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """x (B, in_dim, F, H, W) latents; t (B,) or (B, F) timesteps in [0, 1000], one for all tokens or one per
        latent frame (the official per-token timesteps are constant within a frame: frame 0 gets 0 in image-to-video);
        context (B, <= 512, text_dim) umT5 states, zero-padded here to 512. Returns (B, out_dim, F, H, W) in fp32."""
        p = self.params
        dtype = self.patch_embedding.weight.dtype  # the compute dtype (never quantised: a convolution)
        b = x.shape[0]
        x = self.patch_embedding(x.to(dtype))
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        t = t.reshape(b, -1)
        if t.shape[1] not in (1, grid[0]):
            raise ValueError(f"timesteps {tuple(t.shape)}: expected one per sample or one per latent frame ({grid[0]})")
        e = self.time_embedding(sinusoidal_embedding(t, p.freq_dim).float())  # (B, G, dim) fp32
        e0 = self.time_projection(e).unflatten(-1, (6, p.dim))
        if context.shape[1] > p.text_len:
            raise ValueError(f"text context has {context.shape[1]} states; the model takes at most {p.text_len}")
        context = F.pad(context, (0, 0, 0, p.text_len - context.shape[1]))
        context = self.text_embedding(context.to(dtype))
        freqs = rope_freqs(grid, p.dim // p.num_heads, device=x.device)
        for block in self.blocks:
            x = block(x, e0, context, freqs)
        x = self.head(x, e)
        # Unpatchify: token (f, h, w) holds a (pf, ph, pw, C) patch.
        f, h, w = grid
        pf, ph, pw = p.patch_size
        x = x.view(b, f, h, w, pf, ph, pw, p.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, p.out_dim, f * pf, h * ph, w * pw).float()


# diffusers' WanTransformer3DModel names -> the official ones (the inverse of diffusers'
# convert_wan_transformer_to_diffusers), for parameters and for module paths (LoRA files in diffusers names).
DIT_FROM_DIFFUSERS = [
    (r"^condition_embedder\.time_embedder\.linear_1(?=\.|$)", "time_embedding.0"),
    (r"^condition_embedder\.time_embedder\.linear_2(?=\.|$)", "time_embedding.2"),
    (r"^condition_embedder\.time_proj(?=\.|$)", "time_projection.1"),
    (r"^condition_embedder\.text_embedder\.linear_1(?=\.|$)", "text_embedding.0"),
    (r"^condition_embedder\.text_embedder\.linear_2(?=\.|$)", "text_embedding.2"),
    (r"^proj_out(?=\.|$)", "head.head"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
    (r"_attn\.to_([qkv])(?=\.|$)", r"_attn.\1"),
    (r"_attn\.to_out\.0(?=\.|$)", "_attn.o"),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj(?=\.|$)", r"blocks.\1.ffn.0"),
    (r"^blocks\.(\d+)\.ffn\.net\.2(?=\.|$)", r"blocks.\1.ffn.2"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # diffusers' norm2 is the affine norm before cross-attention
]
DIT_TO_DIFFUSERS = [
    (r"^time_embedding\.0(?=\.|$)", "condition_embedder.time_embedder.linear_1"),
    (r"^time_embedding\.2(?=\.|$)", "condition_embedder.time_embedder.linear_2"),
    (r"^time_projection\.1(?=\.|$)", "condition_embedder.time_proj"),
    (r"^text_embedding\.0(?=\.|$)", "condition_embedder.text_embedder.linear_1"),
    (r"^text_embedding\.2(?=\.|$)", "condition_embedder.text_embedder.linear_2"),
    (r"^head\.head(?=\.|$)", "proj_out"),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"_attn\.([qkv])(?=\.|$)", r"_attn.to_\1"),
    (r"_attn\.o(?=\.|$)", "_attn.to_out.0"),
    (r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"blocks.\1.attn2."),
    (r"^blocks\.(\d+)\.ffn\.0(?=\.|$)", r"blocks.\1.ffn.net.0.proj"),
    (r"^blocks\.(\d+)\.ffn\.2(?=\.|$)", r"blocks.\1.ffn.net.2"),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),
]


def wan_params(sd: dict[str, Tensor], config: dict) -> WanParams:
    """DiT hyper-parameters from the checkpoint's shapes; the head count from config.json (the official `num_heads`
    or diffusers' `num_attention_heads`), else 128-wide heads as in every Wan model."""
    if "patch_embedding.weight" not in sd:
        raise ValueError("not a Wan DiT checkpoint (no patch_embedding.weight)")
    dim, in_dim, *patch = sd["patch_embedding.weight"].shape
    return WanParams(
        dim=dim,
        ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0],
        freq_dim=sd["time_embedding.0.weight"].shape[1],
        text_dim=sd["text_embedding.0.weight"].shape[1],
        in_dim=in_dim,
        out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
        num_heads=config.get("num_heads") or config.get("num_attention_heads") or dim // 128,
        num_layers=len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        patch_size=tuple(patch),
        eps=config.get("eps", 1e-6),
        text_len=config.get("text_len", 512),
    )


def load_transformer(folder, device="cpu", dtype=torch.bfloat16) -> WanModel:
    """The DiT from the official repo root (config.json and `diffusion_pytorch_model*.safetensors` in Wan's names, fp32)
    or a diffusers `transformer/` folder, straight into `dtype` but for the float32 parts (keeps_fp32)."""
    folder = Path(folder)
    config = read_config(folder)
    diffusers = config.get("_class_name") == "WanTransformer3DModel"
    official = (lambda k: rename(k, DIT_FROM_DIFFUSERS)) if diffusers else (lambda k: k)
    wanted = lambda k: torch.float32 if keeps_fp32(official(k)) else dtype  # noqa: E731
    state_dict = {official(k): v for k, v in read_weights_as(folder, wanted).items()}
    try:
        params = wan_params(state_dict, config)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{folder}: {e}") from None
    with torch.device("meta"):
        model = WanModel(params)
    return load_into(model, state_dict, folder).to(device).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# The Wan VAEs (wan/modules/vae2_2.py and vae2_1.py; key names mirror them). Both are built from the same causal
# layers: Wan2.2 groups each encoder/decoder stage into a DownBlock/UpBlock with a parameter-free shortcut around it and
# patchifies the pixels 2x2; Wan2.1 lists the same residual blocks and resamplings flat, and halves the width at each
# upsampling. Causal 3D convolutions: a frame only sees itself and earlier frames, so a video can go through in pieces,
# each convolution carrying the last input frames it saw into the next piece (CACHE_T). The official code sends the
# first frame alone, then 4 frames at a time (encoding) or one latent frame at a time (decoding), and its temporal
# down/upsampling layers treat the very first frame apart. Here that rule is written so that any split gives the same
# result: each stateful layer (CausalConv3d, Resample, DupUp3D) keeps what it needs across calls, and
# Encoder3d/Decoder3d reset it at the start of each clip. Chunked and one-shot runs are equal.

CACHE_T = 2


def start_clip(module: nn.Module):
    """Forget the frames the streaming layers of `module` have seen: the next call starts a new clip."""
    for m in module.modules():
        if isinstance(m, CausalConv3d | Resample | DupUp3D):
            m.start_clip()


class CausalConv3d(nn.Conv3d):
    """A 3D convolution padded only on the past side in time (2 * the time padding, zeros at the clip's start).
    Between calls it keeps its last CACHE_T input frames and puts them in front of the next piece instead of zeros."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        t, h, w = self.padding
        self.time_pad, self.space_pad = 2 * t, (w, w, h, h)
        self.padding = (0, 0, 0)
        self.past = None

    def start_clip(self):
        self.past = None

    def forward(self, x: Tensor) -> Tensor:
        pad = self.time_pad
        if pad:
            if self.past is not None:
                x = torch.cat([self.past.to(x), x], dim=2)
                pad -= self.past.shape[2]
            self.past = x[:, :, -CACHE_T:].clone()
        return super().forward(F.pad(x, (*self.space_pad, pad, 0)))


class ChannelRMSNorm(nn.Module):
    """Wan's RMS_norm: L2-normalise over channels, times sqrt(channels) and a learned gain (`gamma`)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)  # fp32: bf16 support


def per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2D layer to every frame of x (B, C, T, H, W)."""
    b, _, t = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial up/downsampling, and in the "3d" modes 2x temporal too (the first frame of a clip excepted).

    upsample3d: `time_conv` makes 2 output frames from each input frame (a causal 3-frame convolution); the clip's
    first frame is not doubled and does not enter time_conv, whose stream starts at the second frame with zeros.
    downsample3d: the first frame passes; after it, frames (2m-1, 2m) become one, through a stride-2 convolution over
    frames (2m-2, 2m-1, 2m). Both as the official code does with its cache."""

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        out_dim = out_dim or dim  # Wan2.1's upsampling halves the width here
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.started, self.last = False, None

    def start_clip(self):
        self.started, self.last = False, None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "upsample3d":
            head, x = (x[:, :, :0], x) if self.started else (x[:, :, :1], x[:, :, 1:])
            self.started = True
            if x.shape[2]:
                b, c, t, h, w = x.shape
                y = self.time_conv(x).view(b, 2, c, t, h, w)  # two new frames per frame, interleaved
                x = y.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
            x = torch.cat([head, x], dim=2)
        x = per_frame(self.resample, x)
        if self.mode == "downsample3d":
            if self.last is None:
                out = [x[:, :, :1]] + ([self.time_conv(x)] if x.shape[2] > 1 else [])
            else:
                out = [self.time_conv(torch.cat([self.last, x], dim=2))]
            self.last = x[:, :, -1:].clone()
            x = torch.cat(out, dim=2)
        return x


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            ChannelRMSNorm(in_dim),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            ChannelRMSNorm(out_dim),
            nn.SiLU(),
            nn.Identity(),  # dropout 0 in the official model; kept so the checkpoint's indices line up
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.shortcut(x) + self.residual(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(-1, -2).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: Tensor) -> Tensor:
        return x + per_frame(self.attend, x)


class AvgDown3D(nn.Module):
    """Wan2.2's parameter-free shortcut around a downsampling stage: each (ft, fs, fs) block of frames and pixels moves
    into channels, then groups of channels are averaged down to out_dim. A clip's frame count 1 + 2k is padded with one
    zero frame in front, so the first frame pairs with it, and frames (2m-1, 2m) after it: the main path's pairing."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
        return x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs).mean(dim=2)


class DupUp3D(nn.Module):
    """The parameter-free shortcut around an upsampling stage: channels repeated and moved into (ft, fs, fs) blocks of
    frames and pixels; a clip's first frame makes one frame, not ft (the first ft - 1 are dropped)."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim
        self.started = False

    def start_clip(self):
        self.started = False

    def forward(self, x: Tensor) -> Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1).view(b, self.out_dim, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, self.out_dim, t * ft, h * fs, w * fs)
        if not self.started:
            x, self.started = x[:, :, ft - 1 :], True
        return x


class DownBlock(nn.Module):
    """One encoder stage (official Down_ResidualBlock): residual blocks and a downsampling, plus AvgDown3D around it."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        self.downsamples = nn.Sequential(*down_stage(num_res_blocks, in_dim, out_dim, temporal, down))

    def forward(self, x: Tensor) -> Tensor:
        return self.downsamples(x) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder stage (official Up_ResidualBlock): residual blocks and an upsampling, plus DupUp3D around it."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        self.upsamples = nn.Sequential(*up_stage(num_res_blocks, in_dim, out_dim, temporal, up, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        out = self.upsamples(x)
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x)


def head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def down_stage(num_res: int, in_dim: int, out_dim: int, temporal: bool, down: bool) -> list[nn.Module]:
    """Wan2.1's encoder stage, as a flat list: residual blocks, then the downsampling (the last stage has none)."""
    layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res)]
    return layers + ([Resample(out_dim, "downsample3d" if temporal else "downsample2d")] if down else [])


def up_stage(num_res: int, in_dim: int, out_dim: int, temporal: bool, up: bool, resample_out=None) -> list[nn.Module]:
    """Wan2.1's decoder stage, flat: one more residual block than the encoder's, then an upsampling that halves the
    width (so every stage after the first starts from half the width before it)."""
    layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res + 1)]
    mode = "upsample3d" if temporal else "upsample2d"
    return layers + ([Resample(out_dim, mode, resample_out or out_dim // 2)] if up else [])


class Encoder3d(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        dims = [p.dim * m for m in (1, *p.dim_mult)]
        last = len(p.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * p.patch_size**2, dims[0], 3, padding=1)
        stages = [(dims[i], dims[i + 1], i < last and p.temporal_downsample[i], i != last) for i in range(last + 1)]
        if p.residual:
            self.downsamples = nn.Sequential(*(DownBlock(a, b, p.num_res_blocks, t, d) for a, b, t, d in stages))
        else:
            self.downsamples = nn.Sequential(*(m for stage in stages for m in down_stage(p.num_res_blocks, *stage)))
        self.middle = middle(dims[-1])
        self.head = head(dims[-1], 2 * p.z_dim)

    def forward(self, x: Tensor, chunk: int | None = 4) -> Tensor:
        """Patchified pixels (B, 3 p^2, 1 + 4k, H, W) -> (B, 2 z_dim, 1 + k, H/8, W/8) (mean and log-variance before
        the 1x1 `conv1`). chunk: pixel frames per call after the first frame (a multiple of 4; the official 4 by
        default), or None for the whole clip at once. The result is the same either way."""
        if chunk is not None and (chunk < 4 or chunk % 4):
            raise ValueError(f"encoder chunks must be a positive multiple of 4 frames, got {chunk}")
        pieces = [x] if chunk is None else [x[:, :, :1], *x[:, :, 1:].split(chunk, dim=2)]
        pieces = [piece for piece in pieces if piece.shape[2]]
        start_clip(self)
        out = torch.cat([self.head(self.middle(self.downsamples(self.conv1(piece)))) for piece in pieces], dim=2)
        start_clip(self)  # frees the caches
        return out


class Decoder3d(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        mult = p.dim_mult
        dims = [p.dec_dim * m for m in (mult[-1], *mult[::-1])]
        last = len(mult) - 1
        temporal = p.temporal_downsample[::-1]
        self.conv1 = CausalConv3d(p.z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0])
        stages = [(dims[i], dims[i + 1], i < last and temporal[i], i != last) for i in range(last + 1)]
        if p.residual:
            self.upsamples = nn.Sequential(*(UpBlock(a, b, p.num_res_blocks, t, u) for a, b, t, u in stages))
        else:  # each stage after the first gets the halved width of the upsampling before it
            stages = [(a // 2 if i else a, b, t, u) for i, (a, b, t, u) in enumerate(stages)]
            self.upsamples = nn.Sequential(*(m for stage in stages for m in up_stage(p.num_res_blocks, *stage)))
        self.head = head(dims[-1], 3 * p.patch_size**2)

    def forward(self, z: Tensor, chunk: int | None = 1, progress=None) -> Tensor:
        """(B, z_dim, F, h, w) latents after the 1x1 `conv2` -> patchified pixels (B, 3 p^2, 1 + 4 (F - 1), 8 h, 8 w).
        chunk: latent frames per call (the official 1 by default, the least memory), or None for all at once; the
        result is the same either way. progress(n) is called after each piece with its number of latent frames."""
        pieces = [z] if chunk is None else z.split(chunk, dim=2)
        start_clip(self)
        out = []
        for piece in pieces:
            out.append(self.head(self.upsamples(self.middle(self.conv1(piece)))))
            if progress is not None:
                progress(piece.shape[2])
        start_clip(self)
        return torch.cat(out, dim=2)


def vae_patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, T, H, W) -> (B, C p p, T, H/p, W/p), channel order (c, column offset, row offset) as the official code."""
    b, c, t, h, w = x.shape
    x = x.view(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def vae_unpatchify(x: Tensor, p: int) -> Tensor:
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)


def tiled(fn, x: Tensor, tile: int, overlap: int, factor: float) -> Tensor:
    """fn over overlapping spatial tiles of x (..., H, W), tile and overlap in x's pixels, its outputs `factor` times
    x's size blended together: each tile weighs 0 -> 1 linearly across the overlaps it shares, so seams fade over
    `overlap` instead of showing. Near a seam the result differs from fn(x) (each tile sees less context)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got tile {tile}, overlap {overlap}")
    H, W = x.shape[-2:]

    def starts(n):
        if n <= tile:
            return [0]
        s = list(range(0, n - tile, tile - overlap))
        return s + [n - tile]

    out = weight = None
    for y0 in starts(H):
        for x0 in starts(W):
            y = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])
            if out is None:
                out = y.new_zeros(*y.shape[:-2], round(H * factor), round(W * factor))
                weight = y.new_zeros(round(H * factor), round(W * factor))
            th, tw = y.shape[-2:]
            oy, ox = round(y0 * factor), round(x0 * factor)
            ramp = max(1, round(overlap * factor))
            wy = ramps(th, ramp, y0 > 0, y0 + tile < H, y)
            wx = ramps(tw, ramp, x0 > 0, x0 + tile < W, y)
            w2 = wy[:, None] * wx[None, :]
            out[..., oy : oy + th, ox : ox + tw] += y * w2
            weight[oy : oy + th, ox : ox + tw] += w2
    return out / weight


def ramps(n: int, width: int, rise: bool, fall: bool, like: Tensor) -> Tensor:
    """Per-pixel weights along one side of a tile: (i + 0.5) / width up to 1 from an edge shared with a neighbour."""
    i = torch.arange(n, dtype=like.dtype, device=like.device)
    w = torch.ones(n, dtype=like.dtype, device=like.device)
    if rise:
        w = torch.minimum(w, (i + 0.5) / width)
    if fall:
        w = torch.minimum(w, (n - i - 0.5) / width)
    return w


class WanVAE(nn.Module):
    """Pixels in [-1, 1] (B, 3, 1 + 4k, H, W) <-> normalised latents (B, z_dim, 1 + k, H/s, W/s), s = `stride`
    (16 for Wan2.2, 8 for Wan2.1)."""

    def __init__(self, params: VAEParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder3d(params)
        self.conv1 = CausalConv3d(2 * params.z_dim, 2 * params.z_dim, 1)
        self.conv2 = CausalConv3d(params.z_dim, params.z_dim, 1)
        self.decoder = Decoder3d(params)

    def set_normalization(self, mean, std):
        """The per-channel latent statistics (not in the checkpoint), as fp32 buffers beside the weights."""
        device = self.conv2.weight.device
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device), persistent=False)

    @property
    def stride(self) -> int:
        return self.params.patch_size * 2 ** (len(self.params.dim_mult) - 1)

    def check(self, height: int, width: int):
        if height % self.stride or width % self.stride:
            raise ValueError(f"frame sides must be multiples of {self.stride} pixels for the VAE, got {width}x{height}")

    def encode(self, pixels: Tensor, chunk: int | None = 4, tile: int | None = None, overlap: int = 4) -> Tensor:
        """Pixels in [-1, 1] (B, 3, 1 + 4k, H, W) -> normalised latents (B, z_dim, 1 + k, H/s, W/s), the posterior
        mean as the official pipelines use it. chunk: see Encoder3d. tile (latent pixels, with `overlap`): encode
        overlapping spatial tiles and blend them, for frames too large for memory."""
        *_, t, h, w = pixels.shape
        if (t - 1) % 4:
            raise ValueError(f"the VAE encodes 4k + 1 frames, got {t}")
        self.check(h, w)
        dtype = self.encoder.conv1.weight.dtype

        def run(x):
            mu = self.conv1(self.encoder(vae_patchify(x.to(dtype), self.params.patch_size), chunk))
            return mu[:, : self.params.z_dim].float()

        s = self.stride
        mu = run(pixels) if tile is None else tiled(run, pixels, tile * s, overlap * s, 1 / s)
        shape = (1, -1, 1, 1, 1)  # official: (mu - mean) * (1 / std)
        return (mu - self.mean.view(shape)) * (1.0 / self.std).view(shape)

    def decode(
        self, z: Tensor, chunk: int | None = 1, tile: int | None = None, overlap: int = 4, progress=None
    ) -> Tensor:
        """Normalised latents (B, z_dim, F, h, w) -> pixels in [-1, 1] (B, 3, 1 + 4 (F - 1), s h, s w), clamped as
        the official decode. chunk: latent frames per decoder call (1, the official, needs the least memory; the
        result does not depend on it). tile, overlap (latent pixels): decode overlapping spatial tiles and blend them
        (bounded memory for large frames; see `tiled`)."""
        shape = (1, -1, 1, 1, 1)
        z = z.float() / (1.0 / self.std).view(shape) + self.mean.view(shape)
        dtype = self.decoder.conv1.weight.dtype

        def run(x):
            out = self.decoder(self.conv2(x.to(dtype)), chunk, progress)
            return vae_unpatchify(out, self.params.patch_size).float()

        x = run(z) if tile is None else tiled(run, z, tile, overlap, self.stride)
        return x.clamp(-1, 1)


# diffusers' AutoencoderKLWan names (the -Diffusers repos' `vae/`) -> the official .pth names, the inverse of diffusers'
# converters (Wan2.2: scripts/convert_wan_to_diffusers.py convert_vae_22; Wan2.1: single_file_utils.
# convert_wan_vae_to_diffusers). Residual-block parts first, then the blocks; {R} is num_res_blocks. Wan2.2: stage i's
# residual blocks are downsamples.i.downsamples.j, its resampling downsamples.i.downsamples.{R} (decoder: {R+1}).
# Wan2.1 lists every stage flat: the encoder's layers keep diffusers' numbering, the decoder's stage b holds R + 1
# residual blocks and an upsampling, so its layer j is upsamples.(b (R + 2) + j).
VAE_PARTS_FROM_DIFFUSERS = [
    (r"((?:resnets|down_blocks)\.\d+)\.norm1\.", r"\1.residual.0."),
    (r"((?:resnets|down_blocks)\.\d+)\.conv1\.", r"\1.residual.2."),
    (r"((?:resnets|down_blocks)\.\d+)\.norm2\.", r"\1.residual.3."),
    (r"((?:resnets|down_blocks)\.\d+)\.conv2\.", r"\1.residual.6."),
    (r"((?:resnets|down_blocks)\.\d+)\.conv_shortcut\.", r"\1.shortcut."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
]
VAE22_FROM_DIFFUSERS = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", r"encoder.downsamples.\1.downsamples.{R}."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", r"decoder.upsamples.\1.upsamples.{R+1}."),
]


def vae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    grouped = any(k.startswith("encoder.down_blocks.0.resnets.") for k in sd)  # Wan2.2's stages
    if grouped:
        r = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
        rules = [(p, s.replace("{R}", str(r)).replace("{R+1}", str(r + 1))) for p, s in VAE22_FROM_DIFFUSERS]
    else:
        r = len({k.split(".")[4] for k in sd if k.startswith("decoder.up_blocks.0.resnets.")}) - 1
        layer = lambda block, j: f"decoder.upsamples.{int(block) * (r + 2) + j}."  # noqa: E731
        rules = [
            (r"^encoder\.down_blocks\.(\d+)\.", r"encoder.downsamples.\1."),
            (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: layer(m[1], int(m[2]))),
            (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: layer(m[1], r + 1)),
        ]
    rules = VAE_PARTS_FROM_DIFFUSERS + rules
    return {rename(k, rules): v for k, v in sd.items()}


def vae_params(sd: dict[str, Tensor]) -> VAEParams:
    """The VAE's hyper-parameters from the official names and shapes (Wan2.2's grouped stages or Wan2.1's flat ones)."""
    if "encoder.conv1.weight" not in sd or "decoder.head.2.weight" not in sd:
        raise ValueError("not a Wan VAE checkpoint (no encoder.conv1 / decoder.head.2 weights)")
    dim, in_channels = sd["encoder.conv1.weight"].shape[:2]
    z_dim, dec_dim = sd["conv2.weight"].shape[0], sd["decoder.head.2.weight"].shape[1]
    patch_size = round((in_channels // 3) ** 0.5)
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:  # Wan2.2: downsamples.<stage>.downsamples.<layer>
        stages = len({k.split(".")[2] for k in sd if k.startswith("encoder.downsamples.")})
        first = "encoder.downsamples.0.downsamples."
        res = {int(k.split(".")[4]) for k in sd if k.startswith(first) and ".residual." in k}
        mult = [sd[f"encoder.downsamples.{i}.downsamples.0.residual.6.weight"].shape[0] // dim for i in range(stages)]
        temporal = [f"encoder.downsamples.{i}.downsamples.{len(res)}.time_conv.weight" in sd for i in range(stages - 1)]
        return VAEParams(dim, dec_dim, z_dim, tuple(mult), len(res), tuple(temporal), patch_size, residual=True)
    if "decoder.upsamples.0.residual.2.weight" not in sd:
        raise ValueError("not a Wan VAE checkpoint (neither Wan2.2's nor Wan2.1's decoder.upsamples layout)")
    # Wan2.1: encoder.downsamples.<layer>, a Resample (resample.1 weights) closing every stage but the last.
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    resamples = [i for i in layers if f"encoder.downsamples.{i}.resample.1.weight" in sd]
    num_res = resamples[0] if resamples else len(layers)
    starts = [0] + [i + 1 for i in resamples]  # each stage's first residual block
    mult = [sd[f"encoder.downsamples.{i}.residual.6.weight"].shape[0] // dim for i in starts]
    temporal = [f"encoder.downsamples.{i}.time_conv.weight" in sd for i in resamples]
    return VAEParams(dim, dec_dim, z_dim, tuple(mult), num_res, tuple(temporal), patch_size, residual=False)


def load_vae(path, device="cpu", dtype=torch.float32) -> WanVAE:
    """`Wan2.2_VAE.pth` / `Wan2.1_VAE.pth` (official names; float32, like the official pipelines run them) or a
    diffusers `vae/` folder, whose config.json carries the latent statistics (the .pth files take the official ones)."""
    path = Path(path)
    if path.is_dir():
        config = read_config(path)
        state_dict = vae_from_diffusers(read_weights_as(path, lambda k: dtype))
        mean, std = config.get("latents_mean"), config.get("latents_std")
    else:
        state_dict, mean, std = read_weights_as(path, lambda k: dtype), None, None
    try:
        params = vae_params(state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if mean is None and not path.is_dir():
        mean, std = VAE_STATISTICS.get(params.z_dim, (None, None))
    if mean is None or len(mean) != params.z_dim or len(std) != params.z_dim:
        raise ValueError(f"{path}: expected {params.z_dim} latents_mean/latents_std values in its config.json")
    with torch.device("meta"):
        model = WanVAE(params)
    model = load_into(model, state_dict, path).to(device).eval().requires_grad_(False)
    model.set_normalization(mean, std)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: which layers train by default, the file format written, and the diffusers names LoRAs from the wild may use

LORA_TARGETS = [  # attention and MLP of every block; modulation, embeddings and head stay frozen
    "blocks.*.self_attn.q",
    "blocks.*.self_attn.k",
    "blocks.*.self_attn.v",
    "blocks.*.self_attn.o",
    "blocks.*.cross_attn.q",
    "blocks.*.cross_attn.k",
    "blocks.*.cross_attn.v",
    "blocks.*.cross_attn.o",
    "blocks.*.ffn.0",
    "blocks.*.ffn.2",
]
LORA_FORMAT = "comfy"  # diffusion_model.<official Wan name>: ai-toolkit's convention, loaded by ComfyUI and diffusers


# What musubi-tuner writes for every Wan DiT LoRA, Wan2.2 included (its utils/sai_model_spec.py).
LORA_METADATA = {
    "modelspec.architecture": "wan2.1/lora",
    "modelspec.implementation": "https://github.com/Wan-Video/Wan2.2",
}


def lora_aliases(model: nn.Module) -> dict[str, list[tuple[str, slice, slice]]]:
    """diffusers' names of the DiT's modules and parameters -> the official ones (lora.route), one to one: LoRA files
    written against diffusers' WanTransformer3DModel (PEFT, OneTrainer, diffusers-kohya)."""
    whole = slice(None)
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    return {alias: [(n, whole, whole)] for n in names if (alias := rename(n, DIT_TO_DIFFUSERS)) != n}


# ----------------------------------------------------------------------------------------------------------------------
# Loading. The official repos: Wan-AI/Wan2.2-TI2V-5B (config.json and sharded DiT safetensors at the root,
# Wan2.2_VAE.pth) and Wan-AI/Wan2.2-{T2V,I2V}-A14B (the experts in high_noise_model/ and low_noise_model/, each a
# config.json and sharded safetensors in Wan's names, Wan2.1_VAE.pth), all with models_t5_umt5-xxl-enc-bf16.pth and
# google/umt5-xxl/. Their -Diffusers twins: transformer/ (A14B: the high-noise expert) and transformer_2/ (the low-noise
# one), vae/, text_encoder/, tokenizer/.

OFFICIAL_FILES = {"text_encoder": "models_t5_umt5-xxl-enc-bf16.pth", "tokenizer": "google/umt5-xxl/tokenizer.json"}
EXPERT_FOLDERS = {"official": ("high_noise_model", "low_noise_model"), "diffusers": ("transformer", "transformer_2")}


def component_files(v: Variant) -> list[str]:
    dit = [f"{folder}/*" for folder in EXPERT_FOLDERS["official"]] if v.boundary else ["config.json", "diffusion_*"]
    return [*dit, v.vae_file, OFFICIAL_FILES["text_encoder"], "google/umt5-xxl/*"]


def detect_variant(root: Path) -> str:
    """A14B when the folder holds two experts (I2V when they take 36 input channels), else TI2V-5B."""
    for layout, (high, low) in EXPERT_FOLDERS.items():
        if (root / low).is_dir() and (root / high / "config.json").is_file():
            config = read_config(root / high)
            in_dim = config.get("in_dim" if layout == "official" else "in_channels")
            return "wan22-i2v-a14b" if in_dim == 36 else "wan22-t2v-a14b"
    return DEFAULT_VARIANT


def load(
    name_or_path=DEFAULT_VARIANT,
    variant: str | None = None,
    device="cpu",
    dtype=torch.bfloat16,
    progress=False,
    vae_dtype: torch.dtype = torch.float32,
) -> "WanPipeline":
    """Load the pipeline from a variant name (downloads the official repo from Hugging Face) or a folder laid out like
    the official repo or like its -Diffusers twin. The DiT(s) and umT5 compute in `dtype` (the float32 experts are
    converted while read, see read_weights_as); the VAE runs in float32 by default, as in the official pipelines
    (`vae_dtype=torch.bfloat16` halves its memory). progress: a bar over the parts."""
    root, variant = flux1.locate(name_or_path, variant, VARIANTS, "Wan2.2", detect_variant, component_files)
    v, found = VARIANTS[variant], detect_variant(root)
    if found != variant and (v.boundary or VARIANTS[found].boundary):  # one DiT or two, T2V or I2V: say which
        raise ValueError(f"{root} holds the {found} model, not {variant}: run it as {found}")
    layout = "diffusers" if (root / "transformer").is_dir() else "official"
    if layout == "diffusers":
        parts = {"dit": root / "transformer", "vae": root / "vae", "text_encoder": root / "text_encoder"}
        tokenizer = root / "tokenizer" / "tokenizer.json"
    else:
        dit = root / EXPERT_FOLDERS["official"][0] if v.boundary else root
        parts = {"dit": dit, "vae": root / v.vae_file, "text_encoder": root / OFFICIAL_FILES["text_encoder"]}
        tokenizer = root / OFFICIAL_FILES["tokenizer"]
        if not (dit / "config.json").is_file():
            where = "high_noise_model/, low_noise_model/" if v.boundary else "config.json, diffusion_pytorch_model*"
            raise FileNotFoundError(
                f"{root}: expected the official {variant} layout ({where}, {v.vae_file}, "
                f"{', '.join(OFFICIAL_FILES.values())}) or the diffusers one (transformer/, vae/, text_encoder/, "
                "tokenizer/)"
            )
    if v.boundary:
        parts["dit_2"] = root / EXPERT_FOLDERS[layout][1]
    for name, path in parts.items():
        if not path.exists():
            raise FileNotFoundError(f"{root}: missing {path.relative_to(root)} ({name})")
    tokenizer = UMT5Tokenizer(tokenizer)
    with flux1.loading_bar(variant, len(parts), progress) as bar:
        transformer = load_transformer(parts["dit"], device, dtype)  # A14B: the high-noise expert
        bar.update()
        transformer_2 = None
        if "dit_2" in parts:  # the low-noise expert, loaded after the first is on its device (host peak: one expert)
            transformer_2 = load_transformer(parts["dit_2"], device, dtype)
            bar.update()
        text_encoder = load_umt5(parts["text_encoder"], device, dtype)
        bar.update()
        vae = load_vae(parts["vae"], device, vae_dtype)
        bar.update()
    z = vae.params.z_dim
    for dit in (transformer, transformer_2):  # z noisy channels, or (I2V) z + the 4-channel frame mask + z condition
        if dit is not None and dit.params.in_dim not in (z, 2 * z + 4):
            raise ValueError(f"{root}: the DiT takes {dit.params.in_dim} input channels; the VAE has {z}")
    return WanPipeline(transformer, vae, text_encoder, tokenizer, variant, transformer_2)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline

# The official UniPC schedule starts at its training grid's largest sigma, 1 - 1/1000 held in float32 (diffusers'
# WanPipeline starts at 1 instead).
SIGMA_MAX = torch.tensor(1 - 1 / 1000, dtype=torch.float32).item()


def schedule(steps: int, shift: float) -> Tensor:
    """Wan's sigmas (wan/utils/fm_solvers_unipc.py): steps values evenly spaced from SIGMA_MAX down (excluding 0),
    statically shifted (SD3's shift), then 0; float64 math rounded to float32 as the official scheduler stores them."""
    return solvers.static_shift(solvers.linear_sigmas(steps, SIGMA_MAX), shift).float()


def model_timestep(sigma: Tensor) -> Tensor:
    """The official integer timestep: sigma * 1000 truncated (the scheduler casts its timesteps to int64)."""
    return (sigma.double() * 1000).floor()


def best_output_size(w: int, h: int, dw: int, dh: int, area: int) -> tuple[int, int]:
    """The official choice of output size for a first frame (wan/utils/utils.py): the (width, height), multiples of
    (dw, dh), of at most `area` pixels whose aspect ratio is closest to the image's, rounding width-first or
    height-first, whichever is closer."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(area / oh2 // dw * dw)
    if max(ratio / (ow1 / oh1), (ow1 / oh1) / ratio) < max(ratio / (ow2 / oh2), (ow2 / oh2) / ratio):
        return ow1, oh1
    return ow2, oh2


def open_first_frame(image) -> Image.Image:
    return flux1.read_image(image, "first-frame image").convert("RGB")


def first_frame(image, height: int, width: int) -> Tensor:
    """The TI2V-5B first frame (1, 3, H, W) in [-1, 1], as the official TI2V code prepares it: an output size of the
    same area as height x width with the image's aspect ratio (best_output_size, multiples of 32), the image resized to
    cover it (Lanczos) and center-cropped. A tensor is taken as it is."""
    if isinstance(image, Tensor):
        return image if image.dim() == 4 else image[None]
    image = open_first_frame(image)
    ow, oh = best_output_size(image.width, image.height, PIXELS_PER_TOKEN, PIXELS_PER_TOKEN, height * width)
    return image_to_tensor(image, oh, ow, PIXELS_PER_TOKEN)


def i2v_first_frame(image, height: int, width: int, vae_stride: int = 8, patch: int = 2) -> Tensor:
    """The I2V-A14B first frame (1, 3, h, w) in [-1, 1], as the official image2video.py prepares it: latent sides
    sqrt(area * aspect) // vae_stride rounded down to a multiple of the DiT patch (area = height x width, the image's
    own aspect ratio), the image scaled to them bicubically as a [-1, 1] tensor (no crop, no clamp: the official
    F.interpolate). A tensor is taken as it is."""
    if isinstance(image, Tensor):
        return image if image.dim() == 4 else image[None]
    image = open_first_frame(image)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    aspect, area = image.height / image.width, height * width
    lat_h = round(math.sqrt(area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(area / aspect) // vae_stride // patch * patch)
    if lat_h < patch or lat_w < patch:
        raise ValueError(f"the first frame ({image.width}x{image.height}) is too narrow for a {width}x{height} area")
    return F.interpolate(x[None], size=(lat_h * vae_stride, lat_w * vae_stride), mode="bicubic")


def to_frames(pixels: Tensor) -> Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


def cfg_pair(cfg, experts: bool) -> tuple[float, float]:
    """A CFG setting -> (low-noise expert's, high-noise expert's) scale: one number serves both (official)."""
    if isinstance(cfg, tuple | list):
        if not experts or len(cfg) != 2:
            raise ValueError(f"cfg {cfg}: a pair (low-noise, high-noise) is for the two-expert A14B models")
        return float(cfg[0]), float(cfg[1])
    return float(cfg), float(cfg)


class WanPipeline:
    """TI2V-5B (one DiT) or A14B (`transformer` the high-noise expert, `transformer_2` the low-noise one, as diffusers
    names them; velocity() sends each sample to the expert its timestep selects)."""

    # With offload.enable_model_offload, the DiTs stay on the device from one call to the next until another part
    # runs: each expert is copied once per generation (the low-noise one replaces the high-noise one at the boundary),
    # not once per call.
    offload_stays = ("transformer", "transformer_2")

    def __init__(
        self,
        transformer: WanModel,
        vae: WanVAE,
        text_encoder: UMT5Encoder,
        tokenizer,
        variant: str,
        transformer_2: WanModel | None = None,
    ):
        self.transformer, self.transformer_2, self.vae = transformer, transformer_2, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.variant = variant
        self.defaults = VARIANTS[variant]
        if (transformer_2 is None) != (self.defaults.boundary is None):
            raise ValueError(f"{variant} has {'two experts' if self.defaults.boundary else 'one DiT'}")

    @property
    def ae(self) -> WanVAE:  # the other families' name for the autoencoder (train.py reads it)
        return self.vae

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device, unless offload.py set an execution device."""
        return getattr(self, "execution_device", None) or self.transformer.patch_embedding.weight.device

    @property
    def pixels_per_token(self) -> int:
        """Frame sides are multiples of this: the VAE's stride times the DiT's patch (TI2V-5B 32, A14B 16)."""
        return self.vae.stride * self.transformer.params.patch_size[1]

    def experts(self) -> dict[str, WanModel]:
        """{"high": the high-noise expert, "low": the low-noise one}, or {"": the DiT} (TI2V-5B)."""
        if self.transformer_2 is None:
            return {"": self.transformer}
        return {"high": self.transformer, "low": self.transformer_2}

    def high_noise(self, sigma) -> Tensor:
        """(B,) bool: whether the high-noise expert denoises at sigma (a float or (B,)), by the official rule: the
        integer timestep int(sigma * 1000) at or above boundary * 1000."""
        t = model_timestep(torch.as_tensor(sigma.detach().cpu() if isinstance(sigma, Tensor) else sigma))
        return t.reshape(-1) >= self.defaults.boundary * NUM_TRAIN_TIMESTEPS

    @torch.no_grad()
    def encode_prompt(self, prompts) -> dict[str, Tensor]:
        """umT5 states (B, 512, 4096) of the cleaned prompts, zero past each prompt's </s>."""
        ids, mask = self.tokenizer(as_list(prompts))
        device = self.text_encoder.shared.weight.device
        return {"context": self.text_encoder(ids.to(device), mask.to(device))}

    def velocity(
        self, x: Tensor, sigma, cond: dict[str, Tensor], first_frame=False, condition: Tensor | None = None
    ) -> Tensor:
        """x (B, C, F, H/s, W/s) latents at noise level sigma (float or (B,)) -> velocity (noise - x0) in float32. The
        DiT sees the official integer timestep int(sigma * 1000); with two experts each sample goes to the one its
        timestep selects (high_noise).

        first_frame (TI2V-5B image-to-video): latent frame 0 holds a clean conditioning image, so its tokens get
        timestep 0, as in the official TI2V code; True, or a (B,) bool tensor for some samples of a batch.
        condition (I2V-A14B): the first frame's (B, 4 + C, F, H/s, W/s) frame mask and latents (image_condition),
        appended to x's channels as the official model does with its `y`."""
        b, _, f, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w} must be even (frame sides a multiple of {self.pixels_per_token})")
        sigma = sigma.detach().cpu() if isinstance(sigma, Tensor) else sigma
        t = model_timestep(torch.as_tensor(sigma, dtype=torch.float64).expand(b)).float()
        if condition is not None:
            x = torch.cat([x, condition.to(x).expand(b, -1, -1, -1, -1)], dim=1)
        if x.shape[1] != self.transformer.params.in_dim:
            need = "the first frame's condition (image=)" if x.shape[1] < self.transformer.params.in_dim else "no"
            raise ValueError(f"{self.variant} takes {self.transformer.params.in_dim} latent channels: {need} condition")
        timesteps = t[:, None]
        if first_frame is not False:  # frame 0 at t = 0 where it is a clean condition
            timesteps = t[:, None].expand(b, f).clone()
            timesteps[:, 0] = torch.where(torch.as_tensor(first_frame).cpu(), 0.0, timesteps[:, 0])
        timesteps = timesteps.to(x.device)
        context = cond["context"].to(x.device)
        if context.shape[0] != b:
            context = context.expand(b, -1, -1)
        if self.transformer_2 is None:
            return self.transformer(x, timesteps, context)
        high = self.high_noise(sigma).expand(b)
        if high.all() or not high.any():
            return (self.transformer if high[0] else self.transformer_2)(x, timesteps, context)
        out = None  # a batch across the boundary (training draws): each expert takes its samples
        for expert, rows in ((self.transformer, high), (self.transformer_2, ~high)):
            rows = rows.to(x.device)
            v = expert(x[rows], timesteps[rows], context[rows])
            out = v.new_empty(b, *v.shape[1:]) if out is None else out
            out[rows] = v
        return out

    def load_lora(self, path, scale: float = 1.0, strict: bool = False, expert: str | None = None) -> list[str]:
        """Apply a LoRA file (ComfyUI `diffusion_model.blocks...`, kohya/musubi `lora_unet_blocks_...`, diffusers/PEFT
        `transformer.blocks...`, OneTrainer keys; see lora.py) to the DiT (and umT5) at `scale`; returns the layers it
        changed. Several files stack. What cannot be applied is named in a warning, or with `strict` a ValueError.

        Two experts (A14B): Wan2.2 LoRAs come in pairs, one file per expert (ai-toolkit's `*_high_noise.safetensors` /
        `*_low_noise.safetensors`): a file named so goes to that expert, any other to both (a LoRA trained on one model
        for both, or for Wan2.1-14B). expert "high", "low" or "both" overrides the name."""
        experts = self.experts()
        if expert is None and len(experts) == 2:
            stem = Path(path).stem.lower()
            expert = next((e for e in ("high", "low") if re.search(rf"{e}[_-]?noise", stem)), "both")
        if expert not in (None, "both", *experts):
            raise ValueError(f"expert must be 'high', 'low' or 'both' for {self.variant}, not {expert!r}")
        # One read of the file for every expert it goes to (and the umT5 once): its unusable tensors are counted, and
        # a strict load refused, once and before any expert is changed.
        attributes = {
            "transformer_2" if n == "low" else "transformer": m
            for n, m in experts.items()
            if expert in (None, "both", n)
        }
        components = {"transformer": attributes, "text_encoder": self.text_encoder}
        aliases = {"transformer": lora_aliases(next(iter(attributes.values())))}  # the experts share one architecture
        return lora.load(path, components, scale, aliases, strict)

    # -- training rules (train.py): the noise levels each expert learns, and image-to-video clips

    def training_kwargs(self) -> dict:
        return {}

    def expert_sigmas(self, expert: str) -> tuple[float, float]:
        """The noise levels an expert denoises, so the ones it is trained on: the high-noise expert from the boundary
        up, the low-noise one below it (the official split, sampled as musubi-tuner's --preserve_distribution_shape
        and diffusion-pipe do: the training distribution cut at the boundary); the one DiT of TI2V-5B all of them."""
        if expert == "":
            return 0.0, 1.0
        boundary = self.defaults.boundary
        # Below the boundary means a timestep int(sigma * 1000) < boundary * 1000: sigma just under the boundary.
        return (boundary, 1.0) if expert == "high" else (0.0, math.nextafter(boundary, 0.0))

    @torch.no_grad()
    def training_condition(self, pixels: Tensor) -> dict[str, Tensor]:
        """What an image-to-video training clip (B, 3, F, H, W) in [-1, 1] caches beside its latents: I2V-A14B's
        condition of its first frame (image_condition, as the official pipeline builds it and musubi-tuner caches it);
        nothing for TI2V-5B, whose condition is the clip's own first latent frame (the VAE is causal)."""
        if self.transformer.params.in_dim == self.vae.params.z_dim:
            return {}
        return {"condition": self.image_condition(pixels[:, :, 0], pixels.shape[2])}

    def training_inputs(self, x0: Tensor, x_sigma: Tensor, first_frame: Tensor, extras: dict):
        """(x_sigma, velocity() keywords, loss weights or None) for a training batch whose samples `first_frame`
        ((B,) bool) are image-to-video. TI2V-5B (the official token-replacement conditioning): their latent frame 0 is
        the clean first frame at timestep 0, and is left out of the loss (DiffSynth-Studio's FlowMatchSFTLoss does so;
        the frame is given, not predicted). I2V-A14B: the cached condition enters as extra channels, the whole clip is
        noised at one timestep and every frame is in the loss, as musubi-tuner trains it (wan_train_network.py)."""
        if "condition" in extras:
            return x_sigma, {"condition": extras["condition"]}, None
        if not first_frame.any():
            return x_sigma, {}, None
        rows = first_frame.to(x0.device)
        x_sigma = x_sigma.clone()
        x_sigma[rows, :, :1] = x0[rows, :, :1]
        weights = torch.ones(x0.shape[0], 1, x0.shape[2], 1, 1, device=x0.device)
        weights[rows, :, :1] = 0
        return x_sigma, {"first_frame": first_frame}, weights

    @torch.no_grad()
    def encode(self, pixels: Tensor, **kw) -> Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) images or (B, 3, 1 + 4k, H, W) videos -> normalised latents (B, C, F, H/s,
        W/s), s the VAE's stride. kw: chunk, tile, overlap (see WanVAE.encode)."""
        if pixels.dim() == 4:
            pixels = pixels[:, :, None]
        return self.vae.encode(pixels.to(self.vae.conv2.weight.device), **kw)

    @torch.no_grad()
    def decode(self, z: Tensor, **kw) -> Tensor:
        """Normalised latents -> pixels in [-1, 1] (B, 3, 1 + 4 (F - 1), H, W). kw: chunk, tile, overlap, progress."""
        return self.vae.decode(z.to(self.vae.conv2.weight.device), **kw)

    @torch.no_grad()
    def image_condition(self, pixels: Tensor, frames: int) -> Tensor:
        """I2V-A14B's condition for a first frame (B, 3, H, W) in [-1, 1] and a video of `frames` frames: the 4-channel
        frame mask (ones on latent frame 0, the 4 pixel frames it stands for, zeros after) then the latents of the
        first frame followed by frames - 1 zero frames, as image2video.py builds its `y` (B, 4 + C, F, H/s, W/s)."""
        b, _, height, width = pixels.shape
        video = torch.cat([pixels[:, :, None], pixels.new_zeros(b, 3, frames - 1, height, width)], dim=2)
        latents = self.encode(video).float()
        mask = torch.zeros_like(latents[:, :4])
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)

    @torch.no_grad()
    def generate(
        self,
        prompts,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        steps: int | None = None,
        solver: str | None = None,
        guidance=None,
        cfg: float | tuple[float, float] | None = None,
        shift: float | None = None,
        negative_prompt="",
        seed=0,
        noise: Tensor | None = None,
        image=None,
        images=None,
        init_image=None,
        strength=None,
        sigmas: Tensor | None = None,
        tile: int | None = None,
        output: str = "pil",
        progress: bool = True,
    ):
        """Text to video, or image to video from a first frame. Unset settings take the variant's (official) defaults.

        height, width: the frame size (multiples of pixels_per_token: 32 for TI2V-5B, 16 for A14B); with a first frame
        only their area counts, the aspect ratio follows the image (official). frames: 4k + 1. cfg: v_u + cfg (v_c -
        v_u), 1 = off; with two experts one number for both or a (low-noise, high-noise) pair (the official defaults
        are pairs). negative_prompt: an empty one means the official default (NEGATIVE_PROMPT). image (or
        images=[image]): the first frame, a path, a PIL image or a (1, 3, H, W) tensor in [-1, 1]. TI2V-5B encodes it
        to latent frame 0, put back before every model call and after the last step, its tokens at timestep 0;
        I2V-A14B (which needs it) gives it to the DiT as extra input channels (image_condition); T2V-A14B takes none.
        seed: int (video i uses seed + i) or one per video; `noise` (B, C, F, H/s, W/s) replaces the seeded noise.
        tile: decode in spatial tiles of this many latent pixels (bounded memory for large frames, see
        WanVAE.decode). output: "pil" (a list of frame lists), "np" ((B, F, H, W, 3) uint8), "pt" ((B, 3, F, H, W) in
        [-1, 1]) or "latent"."""
        d = self.defaults
        if guidance is not None:
            raise ValueError("Wan2.2 has no distilled guidance; use cfg (classifier-free guidance) instead")
        if init_image is not None:
            raise ValueError("Wan2.2 has no image-to-image; give a first frame (image=, --image) for image-to-video")
        if images is not None:
            if image is not None or len(as_list(images)) != 1:
                raise ValueError(f"Wan2.2 takes one image, the first frame; got {len(as_list(images))}")
            image = as_list(images)[0]
        if image is not None and d.image == "none":
            raise ValueError(f"{self.variant} is text-to-video; for a first frame use wan22-i2v-a14b or wan22-ti2v-5b")
        if image is None and d.image == "required":
            raise ValueError(f"{self.variant} makes a video from a first frame: give image= (sample.py --image)")
        if output not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output must be 'pil', 'np', 'pt' or 'latent', not {output!r}")
        steps, solver = steps or d.steps, solver or d.solver
        low_cfg, high_cfg = cfg_pair(d.cfg if cfg is None else cfg, self.transformer_2 is not None)
        if solver not in solvers.SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(solvers.SOLVERS)}")
        height, width = height or d.size[0], width or d.size[1]
        frames = frames or d.frames
        s, step = self.vae.stride, self.pixels_per_token
        if noise is not None:
            frames, height, width = 1 + TEMPORAL_STRIDE * (noise.shape[2] - 1), noise.shape[3] * s, noise.shape[4] * s
        if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"frames must be 4k + 1 (e.g. 81, 121), got {frames}")
        device = self.device
        first = condition = None
        if image is not None and self.transformer_2 is None:  # TI2V-5B: the first latent frame
            pixels = first_frame(image, height, width)
            height, width = pixels.shape[-2:]
            first = self.encode(pixels.to(device)).float().to(device)  # (1, C, 1, h, w)
        elif image is not None:  # I2V-A14B: the frame mask and the first frame's latents as extra channels
            pixels = i2v_first_frame(image, height, width, s, step // s)
            height, width = pixels.shape[-2:]
            condition = self.image_condition(pixels.to(device), frames).to(device)
        if noise is not None and image is not None and (height // s, width // s) != tuple(noise.shape[-2:]):
            raise ValueError(f"noise {tuple(noise.shape)} does not fit the first frame's {width}x{height} latents")
        if height % step or width % step:
            raise ValueError(f"height and width must be multiples of {step}, got {width}x{height}")

        prompts = as_list(prompts)
        n = noise.shape[0] if noise is not None else len(prompts)
        cond = self.encode_prompt(as_list(prompts, n))
        negatives = [p or NEGATIVE_PROMPT for p in as_list(negative_prompt, n)]
        uncond = self.encode_prompt(negatives) if (low_cfg, high_cfg) != (1, 1) else None
        if noise is None:
            shape = (self.vae.params.z_dim, 1 + (frames - 1) // TEMPORAL_STRIDE, height // s, width // s)
            noise = flux1.seeded_noise(shape, seed, n, device)
        x = noise.to(device, torch.float32)
        kw = {"first_frame": first is not None, "condition": condition}

        def velocity_fn(x, sigma):
            if first is not None:  # the official TI2V loop writes the image latent into frame 0 after every step
                x = torch.cat([first.expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)
            v = self.velocity(x, sigma, cond, **kw)
            scale = high_cfg if self.transformer_2 is not None and self.high_noise(sigma).all() else low_cfg
            if uncond is not None and scale != 1:  # each expert with its own scale (official sample_guide_scale)
                v = torch.lerp(self.velocity(x, sigma, uncond, **kw), v, scale)
            if first is not None:
                v[:, :, :1] = 0  # frame 0 is data: every solver then keeps it (up to rounding) where it was put
            return v

        sigmas = schedule(steps, d.shift if shift is None else shift) if sigmas is None else sigmas
        if first is not None:
            x[:, :, :1] = first
        with tqdm(total=len(sigmas) - 1, disable=flux1.bar_disabled(progress), desc=self.variant, unit="step") as bar:
            x = solvers.SOLVERS[solver](velocity_fn, x, sigmas.to(device), callback=lambda *_: bar.update())
        if first is not None:
            x[:, :, :1] = first
        if output == "latent":
            return x
        frames_out = 1 + TEMPORAL_STRIDE * (x.shape[2] - 1)
        with tqdm(total=None if tile else x.shape[2], disable=flux1.bar_disabled(progress), desc="VAE decode") as bar:
            pixels = self.decode(x, tile=tile, progress=bar.update)
        assert pixels.shape[2] == frames_out
        if output == "pt":
            return pixels
        video = to_frames(pixels)
        if output == "np":
            return video.numpy()
        return [[Image.fromarray(f) for f in v.numpy()] for v in video]
