"""Wan2.2 TI2V-5B (Alibaba's Wan team): text-to-video and image-to-video in plain PyTorch.

Reads top to bottom: configs and variants; reading fp32 checkpoints straight into bf16; the umT5-XXL tokenizer (with
the official prompt cleaning) and encoder (FLUX.1's T5 blocks, each with its own relative position bias); the Wan DiT
(official key names, so `diffusion_pytorch_model-*.safetensors` loads as it is; diffusers' `transformer/` through one
rename map); the Wan2.2 VAE (causal 3D convolutions streamed through a per-convolution cache; `Wan2.2_VAE.pth` names,
diffusers' `vae/` through a rename map); LoRA names; loading; the pipeline.

Video latents are (B, 48, F, H, W): F = 1 + (frames - 1) / 4 latent frames, H = height / 16, W = width / 16, and the
DiT cuts them into 1x2x2 patches, so frame sides are multiples of 32 pixels and frame counts 4k + 1.

Time convention: the official sampler feeds the DiT the integer timestep int(sigma * 1000) and reads its output as
noise - x0, which is the shared convention of this project (sigma = 1 is noise, v = noise - x0). `velocity()` does the
integer timestep, so every solver in solvers.py works with Wan.

The A14B models (two experts, the Wan2.1 VAE) reuse the umT5 encoder, the DiT, the causal-convolution VAE parts and
the sampling loop of this file.
"""

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
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
    draw_noise,
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
    """Wan2.2 VAE; defaults are `Wan2.2_VAE.pth` (`vae2_2.py`): a 160-wide encoder and 256-wide decoder, 48 latent
    channels, 2x2 pixel patches in front (so 16x spatial and 4x temporal compression in all)."""

    dim: int = 160
    dec_dim: int = 256
    z_dim: int = 48
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    patch_size: int = 2


@dataclass
class Variant:
    repo: str
    # Sampling defaults: the official ones (configs/wan_ti2v_5B.py, generate.py's 1280*704 size, textimage2video.py).
    frames: int = 121
    fps: int = 24
    size: tuple[int, int] = (704, 1280)  # (height, width); with a first frame, only the area counts
    steps: int = 50
    cfg: float = 5.0
    shift: float = 5.0
    solver: str = "unipc"
    gated: bool = False


VARIANTS = {"wan22-ti2v-5b": Variant("Wan-AI/Wan2.2-TI2V-5B")}
DEFAULT_VARIANT = "wan22-ti2v-5b"
TRAIN_VARIANT = "wan22-ti2v-5b"
PIXELS_PER_TOKEN = 32  # 16x VAE (8x convolutions after a 2x2 pixel patchify), then 2x2 DiT patches
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


def weight_file(path: Path) -> Path:
    """The weights file of a Hugging Face model folder (a single file or a shard index), or `path` itself."""
    if not path.is_dir():
        return path
    for name in flux1.WEIGHT_FILE_NAMES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(flux1.WEIGHT_FILE_NAMES)}")


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


def read_pth(file: Path) -> dict[str, Tensor]:
    """A .pth state dict through torch.load(weights_only=True): memory-mapped, or, for a file in torch's legacy
    (pre-zip) format, which cannot be mapped, read whole. A corrupt file is a one-line error."""
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    try:
        try:
            return read_weights(file)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ... for a broken file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file} is not a readable checkpoint (truncated or corrupt?): {reason}") from None


def read_weights_as(path, dtype_of) -> dict[str, Tensor]:
    """flux1.read_weights (a .safetensors file, a sharded index, a .pth or a folder), each tensor in dtype_of(key).
    Safetensors tensors of another dtype are converted while read from the file (see above); .pth tensors (the VAE and
    the umT5 checkpoint, both small next to the DiT) are converted from the memory map."""
    file = weight_file(Path(path))
    if file.suffix in (".pth", ".pt"):
        return {k: v.to(dtype_of(k)) for k, v in read_pth(file).items()}
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
# Wan2.2 VAE (wan/modules/vae2_2.py; key names mirror it). Causal 3D convolutions: a frame only sees itself and earlier
# frames, so a video can go through in pieces, each convolution carrying the last input frames it saw into the next
# piece (CACHE_T). The official code sends the first frame alone, then 4 frames at a time (encoding) or one latent frame
# at a time (decoding), and its temporal down/upsampling layers treat the very first frame apart. Here that rule is
# written so that any split gives the same result: each stateful layer (CausalConv3d, Resample, DupUp3D) keeps what it
# needs across calls, and Encoder3d/Decoder3d reset it at the start of each clip. Chunked and one-shot runs are equal.

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
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks)]
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsamples(x) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """One decoder stage (official Up_ResidualBlock): residual blocks and an upsampling, plus DupUp3D around it."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(num_res_blocks + 1)]
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = self.upsamples(x)
        return out if self.avg_shortcut is None else out + self.avg_shortcut(x)


def head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(ChannelRMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


def middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


class Encoder3d(nn.Module):
    def __init__(self, p: VAEParams):
        super().__init__()
        dims = [p.dim * m for m in (1, *p.dim_mult)]
        last = len(p.dim_mult) - 1
        self.conv1 = CausalConv3d(3 * p.patch_size**2, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(
            *(
                DownBlock(dims[i], dims[i + 1], p.num_res_blocks, i < last and p.temporal_downsample[i], i != last)
                for i in range(len(p.dim_mult))
            )
        )
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
        self.upsamples = nn.Sequential(
            *(
                UpBlock(dims[i], dims[i + 1], p.num_res_blocks, i < last and temporal[i], i != last)
                for i in range(len(mult))
            )
        )
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
    """Pixels in [-1, 1] (B, 3, 1 + 4k, H, W) <-> normalised latents (B, z_dim, 1 + k, H/16, W/16)."""

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
        """Pixels in [-1, 1] (B, 3, 1 + 4k, H, W) -> normalised latents (B, z_dim, 1 + k, H/16, W/16), the posterior
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

        mu = run(pixels) if tile is None else tiled(run, pixels, tile * self.stride, overlap * self.stride, 1 / 16)
        shape = (1, -1, 1, 1, 1)  # official: (mu - mean) * (1 / std)
        return (mu - self.mean.view(shape)) * (1.0 / self.std).view(shape)

    def decode(
        self, z: Tensor, chunk: int | None = 1, tile: int | None = None, overlap: int = 4, progress=None
    ) -> Tensor:
        """Normalised latents (B, z_dim, F, h, w) -> pixels in [-1, 1] (B, 3, 1 + 4 (F - 1), 16 h, 16 w), clamped as
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


# diffusers' AutoencoderKLWan names (the -Diffusers repos' `vae/`) -> Wan2.2_VAE.pth names, the inverse of diffusers'
# scripts/convert_wan_to_diffusers.py convert_vae_22. Residual-block parts first, then the blocks; {R} is
# num_res_blocks, which indexes the down/upsampling layer after the residual blocks of a stage.
VAE_FROM_DIFFUSERS = [
    (r"(resnets\.\d+)\.norm1\.", r"\1.residual.0."),
    (r"(resnets\.\d+)\.conv1\.", r"\1.residual.2."),
    (r"(resnets\.\d+)\.norm2\.", r"\1.residual.3."),
    (r"(resnets\.\d+)\.conv2\.", r"\1.residual.6."),
    (r"(resnets\.\d+)\.conv_shortcut\.", r"\1.shortcut."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.downsamples.\1.downsamples.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsampler\.", r"encoder.downsamples.\1.downsamples.{R}."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", r"decoder.upsamples.\1.upsamples.\2."),
    (r"^decoder\.up_blocks\.(\d+)\.upsampler\.", r"decoder.upsamples.\1.upsamples.{R+1}."),
    (r"^(encoder|decoder)\.conv_in\.", r"\1.conv1."),
    (r"^(encoder|decoder)\.norm_out\.", r"\1.head.0."),
    (r"^(encoder|decoder)\.conv_out\.", r"\1.head.2."),
    (r"^quant_conv\.", "conv1."),
    (r"^post_quant_conv\.", "conv2."),
]


def vae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    r = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
    rules = [(p, s.replace("{R}", str(r)).replace("{R+1}", str(r + 1))) for p, s in VAE_FROM_DIFFUSERS]
    return {rename(k, rules): v for k, v in sd.items()}


def vae_params(sd: dict[str, Tensor]) -> VAEParams:
    if "encoder.conv1.weight" not in sd or "decoder.upsamples.0.upsamples.0.residual.2.weight" not in sd:
        raise ValueError("not a Wan2.2 VAE checkpoint (no encoder.conv1 / decoder.upsamples.0.upsamples.0 weights)")
    dim, in_channels = sd["encoder.conv1.weight"].shape[:2]
    stages = len({k.split(".")[2] for k in sd if k.startswith("encoder.downsamples.")})
    res = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.downsamples.0.downsamples.") and ".residual." in k}
    mult = [sd[f"encoder.downsamples.{i}.downsamples.0.residual.6.weight"].shape[0] // dim for i in range(stages)]
    temporal = [f"encoder.downsamples.{i}.downsamples.{len(res)}.time_conv.weight" in sd for i in range(stages - 1)]
    return VAEParams(
        dim=dim,
        dec_dim=sd["decoder.head.2.weight"].shape[1],
        z_dim=sd["conv2.weight"].shape[0],
        dim_mult=tuple(mult),
        num_res_blocks=len(res),
        temporal_downsample=tuple(temporal),
        patch_size=round((in_channels // 3) ** 0.5),
    )


def load_vae(path, device="cpu", dtype=torch.float32) -> WanVAE:
    """`Wan2.2_VAE.pth` (official names; float32, like the official pipelines run it) or a diffusers `vae/` folder,
    whose config.json carries the latent statistics."""
    path = Path(path)
    if path.is_dir():
        config = read_config(path)
        state_dict = vae_from_diffusers(read_weights_as(path, lambda k: dtype))
        mean, std = config.get("latents_mean"), config.get("latents_std")
    else:
        state_dict, mean, std = read_weights_as(path, lambda k: dtype), WAN22_VAE_MEAN, WAN22_VAE_STD
    try:
        params = vae_params(state_dict)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
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
# Loading. Two layouts: the official repo (Wan-AI/Wan2.2-TI2V-5B: config.json and sharded DiT safetensors at the root,
# Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/) and the diffusers one (Wan-AI/Wan2.2-TI2V-5B-
# Diffusers: transformer/, vae/, text_encoder/, tokenizer/).

OFFICIAL_FILES = {
    "vae": "Wan2.2_VAE.pth",
    "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "google/umt5-xxl/tokenizer.json",
}


def component_files(v: Variant) -> list[str]:
    return ["config.json", "diffusion_pytorch_model*", *OFFICIAL_FILES.values(), "google/umt5-xxl/*"]


def detect_variant(root: Path) -> str:
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
    the official repo or like its -Diffusers twin. The DiT and umT5 compute in `dtype`; the VAE runs in float32 by
    default, as in the official pipelines (`vae_dtype=torch.bfloat16` halves its memory). progress: a bar over the
    parts."""
    root, variant = flux1.locate(name_or_path, variant, VARIANTS, "Wan2.2", detect_variant, component_files)
    if (root / "transformer").is_dir():
        parts = {"dit": root / "transformer", "vae": root / "vae", "text_encoder": root / "text_encoder"}
        tokenizer = root / "tokenizer" / "tokenizer.json"
    else:
        parts = {"dit": root, **{k: root / OFFICIAL_FILES[k] for k in ("vae", "text_encoder")}}
        tokenizer = root / OFFICIAL_FILES["tokenizer"]
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"{root}: expected the official Wan2.2 layout (config.json, diffusion_pytorch_model*.safetensors, "
                f"{', '.join(OFFICIAL_FILES.values())}) or the diffusers one (transformer/, vae/, text_encoder/, "
                "tokenizer/)"
            )
    for name, path in parts.items():
        if not path.exists():
            raise FileNotFoundError(f"{root}: missing {path.relative_to(root)} ({name})")
    tokenizer = UMT5Tokenizer(tokenizer)
    with flux1.loading_bar(variant, 3, progress) as bar:
        transformer = load_transformer(parts["dit"], device, dtype)
        bar.update()
        text_encoder = load_umt5(parts["text_encoder"], device, dtype)
        bar.update()
        vae = load_vae(parts["vae"], device, vae_dtype)
        bar.update()
    return WanPipeline(transformer, vae, text_encoder, tokenizer, variant)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline

# The official UniPC schedule starts at its training grid's largest sigma, 1 - 1/1000 held in float32 (diffusers'
# WanPipeline starts at 1 instead).
SIGMA_MAX = torch.tensor(1 - 1 / 1000, dtype=torch.float32).item()


def schedule(steps: int, shift: float) -> Tensor:
    """Wan's sigmas (wan/utils/fm_solvers_unipc.py): steps values evenly spaced from SIGMA_MAX down (excluding 0),
    statically shifted (SD3's shift), then 0; float64 math rounded to float32 as the official scheduler stores them."""
    sigmas = torch.linspace(SIGMA_MAX, 0, steps + 1, dtype=torch.float64)[:-1]
    return torch.cat([solvers.static_shift(sigmas, shift), torch.zeros(1, dtype=torch.float64)]).float()


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


def first_frame(image, height: int, width: int) -> Tensor:
    """The image-to-video first frame (1, 3, H, W) in [-1, 1], as the official TI2V code prepares it: an output size
    of the same area as height x width with the image's aspect ratio (best_output_size, multiples of 32), the image
    resized to cover it (Lanczos) and center-cropped. A tensor is taken as it is."""
    if isinstance(image, Tensor):
        return image if image.dim() == 4 else image[None]
    if not isinstance(image, Image.Image):
        try:
            with Image.open(image) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the first-frame image {image}: {e}") from None
    ow, oh = best_output_size(image.width, image.height, PIXELS_PER_TOKEN, PIXELS_PER_TOKEN, height * width)
    return image_to_tensor(image, oh, ow, PIXELS_PER_TOKEN)


def to_frames(pixels: Tensor) -> Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu()


class WanPipeline:
    def __init__(self, transformer: WanModel, vae: WanVAE, text_encoder: UMT5Encoder, tokenizer, variant: str):
        self.transformer, self.vae = transformer, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.variant = variant
        self.defaults = VARIANTS[variant]

    @property
    def ae(self) -> WanVAE:  # the other families' name for the autoencoder (train.py reads it)
        return self.vae

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device, unless offload.py set an execution device."""
        return getattr(self, "execution_device", None) or self.transformer.patch_embedding.weight.device

    @torch.no_grad()
    def encode_prompt(self, prompts) -> dict[str, Tensor]:
        """umT5 states (B, 512, 4096) of the cleaned prompts, zero past each prompt's </s>."""
        ids, mask = self.tokenizer(as_list(prompts))
        device = self.text_encoder.shared.weight.device
        return {"context": self.text_encoder(ids.to(device), mask.to(device))}

    def velocity(self, x: Tensor, sigma, cond: dict[str, Tensor], first_frame: bool = False) -> Tensor:
        """x (B, 48, F, H/16, W/16) latents at noise level sigma (float or (B,)) -> velocity (noise - x0) in float32.
        The DiT sees the official integer timestep int(sigma * 1000). first_frame: latent frame 0 holds a clean
        conditioning image (image-to-video), so its tokens get timestep 0, as in the official TI2V code."""
        b, _, f, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w} must be even (frame sides a multiple of {PIXELS_PER_TOKEN})")
        if isinstance(sigma, Tensor):
            sigma = sigma.detach().cpu()
        t = model_timestep(torch.as_tensor(sigma, dtype=torch.float64).expand(b)).float().to(x.device)[:, None]
        if first_frame:
            t = t.expand(b, f).clone()
            t[:, 0] = 0
        context = cond["context"].to(x.device)
        if context.shape[0] != b:
            context = context.expand(b, -1, -1)
        return self.transformer(x, t, context)

    def load_lora(self, path, scale: float = 1.0, strict: bool = False) -> list[str]:
        """Apply a LoRA file (ComfyUI `diffusion_model.blocks...`, kohya/musubi `lora_unet_blocks_...`, diffusers/PEFT
        `transformer.blocks...`, OneTrainer keys; see lora.py) to the DiT (and umT5) at `scale`; returns the layers it
        changed. Several files stack. What cannot be applied is named in a warning, or with `strict` a ValueError."""
        components = {"transformer": self.transformer, "text_encoder": self.text_encoder}
        return lora.load(path, components, scale, {"transformer": lora_aliases(self.transformer)}, strict)

    def training_kwargs(self) -> dict:
        return {}

    @torch.no_grad()
    def encode(self, pixels: Tensor, **kw) -> Tensor:
        """Pixels in [-1, 1], (B, 3, H, W) images or (B, 3, 1 + 4k, H, W) videos -> normalised latents (B, 48, F, H/16,
        W/16). kw: chunk, tile, overlap (see WanVAE.encode)."""
        if pixels.dim() == 4:
            pixels = pixels[:, :, None]
        return self.vae.encode(pixels.to(self.vae.conv2.weight.device), **kw)

    @torch.no_grad()
    def decode(self, z: Tensor, **kw) -> Tensor:
        """Normalised latents -> pixels in [-1, 1] (B, 3, 1 + 4 (F - 1), H, W). kw: chunk, tile, overlap, progress."""
        return self.vae.decode(z.to(self.vae.conv2.weight.device), **kw)

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
        cfg: float | None = None,
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

        height, width: the frame size (multiples of 32); with a first frame only their area counts, the aspect ratio
        follows the image (official). frames: 4k + 1. cfg: v_u + cfg (v_c - v_u), 1 = off. negative_prompt: an empty
        one means the official default (NEGATIVE_PROMPT). image (or images=[image]): the first frame, a path, a PIL
        image or a (1, 3, H, W) tensor in [-1, 1]; it is encoded to latent frame 0, which is put back before every
        model call and after the last step, its tokens at timestep 0. seed: int (video i uses seed + i) or one per
        video; `noise` (B, 48, F, H/16, W/16) replaces the seeded noise. tile: decode in spatial tiles of this many
        latent pixels (bounded memory for large frames, see WanVAE.decode). output: "pil" (a list of frame lists),
        "np" ((B, F, H, W, 3) uint8), "pt" ((B, 3, F, H, W) in [-1, 1]) or "latent"."""
        if guidance is not None:
            raise ValueError("Wan2.2 has no distilled guidance; use cfg (classifier-free guidance) instead")
        if init_image is not None:
            raise ValueError("Wan2.2 has no image-to-image; give a first frame (image=, --image) for image-to-video")
        if images is not None:
            if image is not None or len(as_list(images)) != 1:
                raise ValueError(f"Wan2.2 TI2V takes one image, the first frame; got {len(as_list(images))}")
            image = as_list(images)[0]
        if output not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output must be 'pil', 'np', 'pt' or 'latent', not {output!r}")
        d = self.defaults
        steps, solver = steps or d.steps, solver or d.solver
        cfg = d.cfg if cfg is None else cfg
        if solver not in solvers.SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(solvers.SOLVERS)}")
        height, width = height or d.size[0], width or d.size[1]
        frames = frames or d.frames
        if noise is not None:
            frames, height, width = 1 + TEMPORAL_STRIDE * (noise.shape[2] - 1), noise.shape[3] * 16, noise.shape[4] * 16
        device = self.device
        first = None
        if image is not None:
            pixels = first_frame(image, height, width)
            height, width = pixels.shape[-2:]
            first = self.encode(pixels.to(device)).float().to(device)  # (1, 48, 1, h, w)
            if noise is not None and first.shape[-2:] != noise.shape[-2:]:
                raise ValueError(f"noise {tuple(noise.shape)} does not fit the first frame's latents {first.shape}")
        if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
            raise ValueError(f"height and width must be multiples of {PIXELS_PER_TOKEN}, got {width}x{height}")
        if frames < 1 or (frames - 1) % TEMPORAL_STRIDE:
            raise ValueError(f"frames must be 4k + 1 (e.g. 81, 121), got {frames}")

        prompts = as_list(prompts)
        n = noise.shape[0] if noise is not None else len(prompts)
        cond = self.encode_prompt(as_list(prompts, n))
        negatives = [p or NEGATIVE_PROMPT for p in as_list(negative_prompt, n)]
        uncond = self.encode_prompt(negatives) if cfg != 1 else None
        if noise is None:
            seeds = [seed + i for i in range(n)] if isinstance(seed, int) else as_list(seed, n)
            shape = (self.vae.params.z_dim, 1 + (frames - 1) // TEMPORAL_STRIDE, height // 16, width // 16)
            noise = draw_noise(shape, seeds, device)
        x = noise.to(device, torch.float32)

        def velocity_fn(x, sigma):
            if first is not None:  # the official loop writes the image latent into frame 0 after every step
                x = torch.cat([first.expand(x.shape[0], -1, -1, -1, -1), x[:, :, 1:]], dim=2)
            v = self.velocity(x, sigma, cond, first_frame=first is not None)
            if uncond is not None:
                v = torch.lerp(self.velocity(x, sigma, uncond, first_frame=first is not None), v, cfg)
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
