"""Z-Image (Turbo and Base, Tongyi-MAI) in plain PyTorch.

Reads top to bottom: configs and variants, the Qwen3 text encoder and its chat-template tokenizer, the single-stream
transformer (the repo's `transformer/` key names, which are diffusers' and Tongyi's own), loading, and the pipeline.
The autoencoder is FLUX.1's, imported from flux1.py and read from the repo's diffusers-format `vae/`.

Time convention: Z-Image's own time runs the other way (t = 1 is data) and the network predicts x0 - noise. The
`velocity()` of this file converts both, so it speaks the shared sigma convention (sigma = 1 is noise,
v = noise - x0) and every solver in solvers.py works with it.
"""

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import Tensor, nn

import flux1
import lora
import solvers
from flux1 import (
    apply_rope,
    as_list,
    canvas,
    config_from_dict,
    load_into,
    read_config,
    read_weights,
    require_files,
    rope,
    run_sampler,
)

# ----------------------------------------------------------------------------------------------------------------------
# Configs and variants


@dataclass
class ZImageParams:
    """Transformer hyper-parameters; defaults are Z-Image's (6B), both variants. Read from `transformer/config.json`."""

    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    norm_eps: float = 1e-5
    cap_feat_dim: int = 2560  # Qwen3-4B hidden size
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    patch_size: int = 2

    @classmethod
    def from_config(cls, config: dict) -> "ZImageParams":
        names = {f.name for f in fields(cls)}
        params = cls(**{k: v for k, v in config.items() if k in names})
        params.axes_dims = tuple(params.axes_dims)
        if list(config.get("all_patch_size", [2])) != [2] or list(config.get("all_f_patch_size", [1])) != [1]:
            raise ValueError(
                "only Z-Image's 2x2 image patches are supported (all_patch_size [2], all_f_patch_size [1])"
            )
        return params


@dataclass
class Variant:
    repo: str
    steps: int
    cfg: float  # official parameterisation: v = v_c + cfg (v_c - v_u), applied only for cfg > 1 (official rule)
    shift: float  # static timestep shift; the repo's scheduler/scheduler_config.json overrides it when present
    # The repo's scheduler_config.json may set use_dynamic_shifting: then FLUX.1's resolution-dependent mu replaces
    # `shift`, with (base_shift, max_shift, base_image_seq_len, max_image_seq_len) from the same file.
    dynamic_shift: tuple[float, float, int, int] | None = None
    solver: str = "euler"
    size: tuple[int, int] = (1024, 1024)
    cfg_truncation: float = 1.0  # no CFG once Z-Image time (1 - sigma) exceeds this; 1.0 never truncates
    cfg_normalization: float = 0.0  # > 0: cap the guided output's norm at this multiple of the conditional one
    distilled: bool = False  # step-distilled: LoRA training on it undoes the distillation (train.py refuses by default)


VARIANTS = {
    # Distilled to 8 steps without CFG.
    "zimage-turbo": Variant("Tongyi-MAI/Z-Image-Turbo", steps=8, cfg=0.0, shift=3.0, distilled=True),
    # The undistilled foundation model: official recommendation 50 steps, guidance 4, no CFG normalisation.
    "zimage-base": Variant("Tongyi-MAI/Z-Image", steps=50, cfg=4.0, shift=6.0),
}
DEFAULT_VARIANT = "zimage-turbo"
TRAIN_VARIANT = "zimage-base"  # LoRAs train on the undistilled base model; they also apply to Turbo
PIXELS_PER_TOKEN = 16  # FLUX.1's 8x autoencoder, then 2x2 patches
SEQ_MULTIPLE = 32  # the official model pads the image and the caption sequences to multiples of 32 with learned tokens

# ----------------------------------------------------------------------------------------------------------------------
# Qwen3 text encoder and tokenizer (Qwen/Qwen3-4B; FLUX.2-klein imports these too). Pre-RMSNorm causal transformer,
# grouped-query attention with a per-head QK-norm, RoPE, SwiGLU; key names are transformers' Qwen3Model's. Z-Image
# conditions on the raw output of the second-to-last layer (35 of 36, no final norm), one variable-length feature
# sequence per prompt.


class RMSNorm(nn.Module):
    """Scale-only RMSNorm (Qwen3's and the DiT's): normalised in fp32, rounded to the weight dtype, then scaled, as
    the official code and transformers do."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(self.weight.dtype) * self.weight


class Qwen3Tokenizer:
    """Qwen3's byte-level BPE from the repo's `tokenizer/tokenizer.json`, plus its chat template as plain strings."""

    pad_token = "<|endoftext|>"  # the pad token `tokenizer_config.json` declares

    def __init__(self, tokenizer_json_path: str | Path, max_length: int = 512):
        require_files(tokenizer_json_path)
        tok = Tokenizer.from_file(str(tokenizer_json_path))
        # The file adds no BOS/EOS; the chat template supplies the special tokens. Padding is done in __call__.
        tok.no_padding()
        tok.enable_truncation(max_length)  # keeps the first max_length tokens, dropping the end of the template
        self.tokenizer, self.max_length, self.pad_id = tok, max_length, tok.token_to_id(self.pad_token)  # 151643

    def chat(self, prompts: list[str] | str, enable_thinking: bool = True) -> list[str]:
        """Each prompt as one user message followed by the assistant's turn, as Qwen3's chat template writes it
        with add_generation_prompt. Z-Image keeps thinking enabled, which writes nothing more; FLUX.2-klein
        disables it, which writes an empty think block."""
        if isinstance(prompts, str):
            prompts = [prompts]
        think = "" if enable_thinking else "<think>\n\n</think>\n\n"
        return [f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{think}" for p in prompts]

    def __call__(self, texts: list[str] | str, padding: str = "max_length") -> tuple[Tensor, Tensor]:
        """(ids, attention_mask), both (B, L) int64, right-padded with <|endoftext|>: to max_length ("max_length",
        as the Z-Image and FLUX.2 pipelines do) or to the batch's longest text ("longest")."""
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest', not {padding!r}")
        if isinstance(texts, str):
            texts = [texts]
        encodings = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        length = self.max_length if padding == "max_length" else max(map(len, encodings))
        ids = torch.full((len(encodings), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), length), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e)], mask[i, : len(e)] = torch.tensor(e, dtype=torch.long), 1
        return ids, mask


@dataclass
class Qwen3Config:
    """Defaults are Qwen3-4B (Z-Image's `text_encoder/config.json`)."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0

    @classmethod
    def from_dict(cls, config: dict) -> "Qwen3Config":
        # transformers 4.x writes `rope_theta` (and `rope_scaling`) at the top level, 5.x a `rope_parameters` dict.
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        unsupported = {
            "rope_type": rope.get("rope_type", rope.get("type", "default")) != "default",
            "hidden_act": config.get("hidden_act", "silu") != "silu",
            "attention_bias": config.get("attention_bias", False),
            "use_sliding_window": config.get("use_sliding_window", False),
        }
        if any(unsupported.values()):
            raise ValueError(f"unsupported Qwen3 config: {', '.join(k for k, v in unsupported.items() if v)}")
        theta = rope.get("rope_theta", config.get("rope_theta", cls.rope_theta))
        return config_from_dict(cls, {**config, "rope_theta": theta})


def qwen3_rope(length: int, head_dim: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (length, head_dim) fp32, for positions 0..length-1. Channel i and i + head_dim/2 rotate as a
    pair ("rotate-half" layout, not interleaved), both with frequency theta^(-2i/head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, dtype=torch.float32, device=device)[:, None] * inv_freq.to(device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_qwen3_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Qwen3Attention(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        c, d = config, config.head_dim
        self.head_dim, self.kv_groups = d, c.num_attention_heads // c.num_key_value_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * d, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(d, c.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(d, c.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, -1, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, L, -1, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, L, -1, self.head_dim).transpose(1, 2)
        q, k = apply_qwen3_rope(q, cos, sin), apply_qwen3_rope(k, cos, sin)
        # Each run of kv_groups consecutive query heads shares one key/value head. k and v are repeated rather than
        # passed with SDPA's enable_gqa, which together with a mask was 6x slower on CPU (transformers avoids it too).
        k, v = k.repeat_interleave(self.kv_groups, dim=1), v.repeat_interleave(self.kv_groups, dim=1)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(x.transpose(1, 2).reshape(B, L, -1))


class Qwen3MLP(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen3Layer(nn.Module):
    def __init__(self, config: Qwen3Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen3MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Encoder(nn.Module):
    """The first num_layers decoder layers of Qwen3 (no final norm, no LM head), used as a text encoder."""

    def __init__(self, config: Qwen3Config, num_layers: int):
        super().__init__()
        if not 0 <= num_layers <= config.num_hidden_layers:
            raise ValueError(f"num_layers must be in 0..{config.num_hidden_layers}, got {num_layers}")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen3Layer(config) for _ in range(num_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_layers: list[int]) -> list[Tensor]:
        """input_ids, attention_mask (B, L), right-padded -> for each k in output_layers, the (B, L, hidden) output of
        decoder layer k (k = 0: the token embeddings), as transformers' `hidden_states[k]` for k < num_hidden_layers.
        Padded positions get values too (FLUX.2-klein keeps them), computed like transformers: they see the prompt's
        tokens, never other pads; real tokens never see pads."""
        if not all(0 <= k <= len(self.layers) for k in output_layers):
            raise ValueError(f"output_layers {output_layers} must be in 0..{len(self.layers)} (the layers built)")
        L = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = (t.to(x.dtype) for t in qwen3_rope(L, self.config.head_dim, self.config.rope_theta, x.device))
        # (B, 1, L, L), True = may attend: causal, and only to real (unpadded) keys.
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = causal & attention_mask.bool()[:, None, None, :]
        outputs = {0: x}
        for i, layer in enumerate(self.layers[: max(output_layers, default=0)], start=1):
            x = layer(x, cos, sin, mask)
            if i in output_layers:
                outputs[i] = x
        return [outputs[k] for k in output_layers]


def load_qwen3(folder: str | Path, num_layers: int, device="cpu", dtype: torch.dtype = torch.float32) -> Qwen3Encoder:
    """Qwen3Encoder with the first num_layers layers, from a transformers folder (Z-Image's `text_encoder/`,
    Qwen/Qwen3-4B): Qwen3Model keys, or Qwen3ForCausalLM's (prefixed `model.`, plus `lm_head.weight`)."""
    config = Qwen3Config.from_dict(read_config(folder))
    state_dict = read_weights(folder)
    state_dict.pop("lm_head.weight", None)  # the language-model head; an encoder has no use for it
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}

    def unused(key: str) -> bool:  # the layers after num_layers and the final norm are not built
        layer = re.match(r"layers\.(\d+)\.", key)
        return key == "norm.weight" or (layer is not None and num_layers <= int(layer[1]) < config.num_hidden_layers)

    state_dict = {k: v for k, v in state_dict.items() if not unused(k)}
    with torch.device("meta"):
        model = Qwen3Encoder(config, num_layers)
    return load_into(model, state_dict, folder).to(device, dtype).eval().requires_grad_(False)


def encode_captions(
    encoder: Qwen3Encoder, tokenizer: Qwen3Tokenizer, prompts: list[str] | str, device=None
) -> list[Tensor]:
    """Z-Image's caption features: a list of (L_i, hidden) tensors, the output of the encoder's last layer (35 of
    Qwen3-4B's 36: transformers' `hidden_states[-2]`) at the prompt's tokens, padding removed.

    The pipelines pad to 512 tokens; padding to the longest prompt instead gives the same features (real tokens
    never attend to pads) in a fraction of the time."""
    device = device or encoder.embed_tokens.weight.device
    ids, mask = tokenizer(tokenizer.chat(prompts, enable_thinking=True), padding="longest")
    ids, mask = ids.to(device), mask.to(device).bool()
    (features,) = encoder(ids, mask, [len(encoder.layers)])
    return [f[m] for f, m in zip(features, mask)]


# ----------------------------------------------------------------------------------------------------------------------
# Transformer (key names as in the repo's transformer/: Tongyi's own, which diffusers also uses)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(dim // n_heads, eps=1e-5)
        self.norm_k = RMSNorm(dim // n_heads, eps=1e-5)

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None) -> Tensor:
        """x (B, L, dim); freqs (B, 1, L, head_dim / 2, 2, 2) rotations; mask (B, 1, 1, L) keys to attend, or None."""
        q, k, v = (proj(x).unflatten(-1, (self.n_heads, -1)) for proj in (self.to_q, self.to_k, self.to_v))
        q, k = self.norm_q(q), self.norm_k(k)  # QK-norm per head, before the rotation
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020, arXiv 2002.05202): w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


ADALN_DIM = 256  # width of the timestep embedding that modulates every block (min(dim, 256) officially)


class TransformerBlock(nn.Module):
    """Pre- and post-norm ("sandwich") attention and SwiGLU; modulated blocks scale the pre-normed input by
    (1 + scale) and the output by tanh(gate), both from the timestep embedding (no shift terms)."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, modulation: bool):
        super().__init__()
        self.attention = Attention(dim, n_heads)
        self.feed_forward = FeedForward(dim, int(dim / 3 * 8))
        self.attention_norm1 = RMSNorm(dim, norm_eps)
        self.ffn_norm1 = RMSNorm(dim, norm_eps)
        self.attention_norm2 = RMSNorm(dim, norm_eps)
        self.ffn_norm2 = RMSNorm(dim, norm_eps)
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, ADALN_DIM), 4 * dim))

    def forward(self, x: Tensor, freqs: Tensor, mask: Tensor | None, adaln: Tensor | None = None) -> Tensor:
        if adaln is None:  # the context refiner: plain sandwich-norm block
            x = x + self.attention_norm2(self.attention(self.attention_norm1(x), freqs, mask))
            return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln)[:, None].chunk(4, dim=-1)
        attn = self.attention(self.attention_norm1(x) * (1 + scale_msa), freqs, mask)
        x = x + gate_msa.tanh() * self.attention_norm2(attn)
        return x + gate_mlp.tanh() * self.ffn_norm2(self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp)))


class TimestepEmbedder(nn.Module):
    def __init__(self, out_size: int, mid_size: int = 1024):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size))

    def forward(self, t: Tensor, t_scale: float) -> Tensor:
        # The same sinusoidal embedding as FLUX.1 (cos first, 10000 max period), of t * 1000.
        return self.mlp(flux1.timestep_embedding(t, 256, time_factor=t_scale).to(self.mlp[0].weight.dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, ADALN_DIM), dim))

    def forward(self, x: Tensor, adaln: Tensor) -> Tensor:
        scale = 1 + self.adaLN_modulation(adaln)[:, None]
        return self.linear(F.layer_norm(x, x.shape[-1:], eps=1e-6) * scale)


def pad_length(n: int) -> int:
    return -(-n // SEQ_MULTIPLE) * SEQ_MULTIPLE


class ZImageTransformer(nn.Module):
    """Single-stream DiT (arXiv 2511.22699): image tokens pass 2 timestep-modulated "noise refiner" blocks, caption
    tokens 2 unmodulated "context refiner" blocks, then [image, caption] go through 30 modulated blocks together."""

    def __init__(self, params: ZImageParams):
        super().__init__()
        p = self.params = params
        if sum(p.axes_dims) != p.dim // p.n_heads:
            raise ValueError(f"axes_dims {p.axes_dims} must sum to the head dim {p.dim // p.n_heads}")
        patch_dim = p.patch_size * p.patch_size * p.in_channels
        # The checkpoint keys a patch size "2-1" (2x2 pixels, 1 frame); only that one exists.
        self.all_x_embedder = nn.ModuleDict({"2-1": nn.Linear(patch_dim, p.dim)})
        self.all_final_layer = nn.ModuleDict({"2-1": FinalLayer(p.dim, patch_dim)})
        self.noise_refiner = nn.ModuleList(
            TransformerBlock(p.dim, p.n_heads, p.norm_eps, modulation=True) for _ in range(p.n_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(
            TransformerBlock(p.dim, p.n_heads, p.norm_eps, modulation=False) for _ in range(p.n_refiner_layers)
        )
        self.t_embedder = TimestepEmbedder(min(p.dim, ADALN_DIM))
        self.cap_embedder = nn.Sequential(RMSNorm(p.cap_feat_dim, p.norm_eps), nn.Linear(p.cap_feat_dim, p.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, p.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, p.dim))
        self.layers = nn.ModuleList(
            TransformerBlock(p.dim, p.n_heads, p.norm_eps, modulation=True) for _ in range(p.n_layers)
        )

    def forward(self, x: Tensor, t: Tensor, caps: list[Tensor]) -> Tensor:
        """x (B, 16, H, W) latents; t (B,) Z-Image time (1 = data); caps: B caption features (L_i, cap_feat_dim) of
        different lengths. Returns the model output (B, 16, H, W), which points from noise to data."""
        p, dtype, device = self.params, self.x_pad_token.dtype, x.device
        b, c, height, width = x.shape
        h, w = height // p.patch_size, width // p.patch_size
        n_img, n_img_pad = h * w, pad_length(h * w)
        cap_lens = [pad_length(len(cap)) for cap in caps]  # each caption padded to a multiple of 32
        n_cap = max(cap_lens)
        adaln = self.t_embedder(t, p.t_scale).to(dtype)

        # Image tokens: 2x2 patches in (ph, pw, c) order, then learned pad tokens up to a multiple of 32.
        img = x.view(b, c, h, 2, w, 2).permute(0, 2, 4, 3, 5, 1).reshape(b, n_img, 4 * c)
        img = self.all_x_embedder["2-1"](img.to(dtype))
        img = torch.cat([img, self.x_pad_token.expand(b, n_img_pad - n_img, -1)], dim=1)
        # Caption tokens: embedded, pad tokens up to each caption's multiple of 32, then zeros (masked out) up to the
        # longest caption of the batch.
        cap = torch.zeros(b, n_cap, p.cap_feat_dim, dtype=dtype, device=device)
        for i, feats in enumerate(caps):
            cap[i, : len(feats)] = feats
        cap = self.cap_embedder(cap)
        j = torch.arange(n_cap, device=device)
        real = j[None] < torch.tensor([len(f) for f in caps], device=device)[:, None]
        in_caption = j[None] < torch.tensor(cap_lens, device=device)[:, None]
        cap = torch.where(real[..., None], cap, self.cap_pad_token)

        # Positions (official placement): caption token j at (1 + j, 0, 0); image tokens at (caption length + 1, row,
        # column), with the caption's padded length; image pad tokens at (0, 0, 0).
        cap_ids = torch.stack([1 + j, torch.zeros_like(j), torch.zeros_like(j)], dim=-1).expand(b, -1, -1)
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        img_ids = torch.zeros(b, n_img_pad, 3, dtype=torch.long, device=device)
        img_ids[:, :n_img, 0] = torch.tensor(cap_lens, device=device)[:, None] + 1
        img_ids[:, :n_img, 1], img_ids[:, :n_img, 2] = rows.flatten(), cols.flatten()
        img_freqs = rope(img_ids, p.axes_dims, p.rope_theta, angle_dtype=torch.float32)[:, None]
        cap_freqs = rope(cap_ids, p.axes_dims, p.rope_theta, angle_dtype=torch.float32)[:, None]

        # Batch padding (captions shorter than the longest) is masked out of attention, so it never leaks.
        ragged = min(cap_lens) != n_cap
        cap_mask = in_caption[:, None, None, :] if ragged else None
        for block in self.noise_refiner:
            img = block(img, img_freqs, None, adaln)
        for block in self.context_refiner:
            cap = block(cap, cap_freqs, cap_mask)

        x = torch.cat([img, cap], dim=1)  # image first, then caption
        freqs = torch.cat([img_freqs, cap_freqs], dim=2)
        mask = None
        if ragged:
            mask = torch.cat([torch.ones(b, n_img_pad, dtype=torch.bool, device=device), in_caption], 1)
            mask = mask[:, None, None, :]
        for block in self.layers:
            x = block(x, freqs, mask, adaln)
        out = self.all_final_layer["2-1"](x[:, :n_img], adaln)
        return out.view(b, h, w, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


def load_transformer(folder, device="cpu", dtype=torch.bfloat16) -> ZImageTransformer:
    """The repo's `transformer/` folder: config.json and sharded safetensors with their index."""
    params = ZImageParams.from_config(read_config(folder))
    with torch.device("meta"):
        model = ZImageTransformer(params)
    return load_into(model, read_weights(folder), folder).to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: default trained layers, the file format written, and ComfyUI's fused names LoRAs from the wild may use

LORA_TARGETS = [  # attention and SwiGLU of every block (main layers and both refiners); modulation stays frozen
    "*.attention.to_q",
    "*.attention.to_k",
    "*.attention.to_v",
    "*.attention.to_out.0",
    "*.feed_forward.w1",
    "*.feed_forward.w2",
    "*.feed_forward.w3",
]
LORA_FORMAT = "comfy"  # diffusion_model.<official name>: ai-toolkit's convention, loaded by ComfyUI and diffusers


# What kohya's musubi-tuner writes for Z-Image LoRAs (its utils/sai_model_spec.py and architectures.py).
LORA_METADATA = {
    "ss_base_model_version": "z_image",
    "modelspec.architecture": "Z-Image/lora",
    "modelspec.implementation": "https://github.com/Tongyi-MAI/Z-Image",
}


def lora_aliases(model: nn.Module) -> dict[str, list[tuple[str, slice, slice]]]:
    """ComfyUI's own names for Z-Image's attention -> ours (lora.route): one fused `attention.qkv`, whose rows are q,
    k and v in turn, and `attention.out`."""
    dim, whole = model.params.dim, slice(None)
    aliases = {}
    for block in (n.removesuffix(".attention") for n, _ in model.named_modules() if n.endswith(".attention")):
        qkv = [(f"{block}.attention.to_{c}", slice(i * dim, (i + 1) * dim), whole) for i, c in enumerate("qkv")]
        aliases |= {
            f"{block}.attention.qkv": qkv,
            f"{block}.attention.out": [(f"{block}.attention.to_out.0", whole, whole)],
        }
    return aliases


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def component_files(v: Variant) -> list[str]:
    return ["transformer/*", "text_encoder/*", "tokenizer/*", "vae/*", "scheduler/*"]


def load(
    name_or_path=DEFAULT_VARIANT, variant: str | None = None, device="cpu", dtype=torch.bfloat16, progress=False
) -> "ZImagePipeline":
    """Load from a variant name (downloads from Hugging Face) or a folder laid out like the official repo:
    `transformer/`, `text_encoder/` (Qwen3), `tokenizer/`, `vae/` (FLUX.1's autoencoder), `scheduler/`. A local
    folder is taken as Turbo unless `variant` says otherwise (the two repos' files look alike)."""
    detect = lambda root: DEFAULT_VARIANT  # noqa: E731
    root, variant = flux1.locate(name_or_path, variant, VARIANTS, "Z-Image", detect, component_files)
    tokenizer = Qwen3Tokenizer(root / "tokenizer" / "tokenizer.json")
    with flux1.loading_bar(variant, 3, progress) as bar:
        transformer = load_transformer(root / "transformer", device, dtype)
        bar.update()
        text_config = read_config(root / "text_encoder")
        # Z-Image reads the second-to-last layer's output, so the last layer (and the final norm) are never built.
        text_encoder = load_qwen3(root / "text_encoder", text_config["num_hidden_layers"] - 1, device, dtype)
        bar.update()
        ae = flux1.load_ae(root / "vae", device, dtype)
        bar.update()
    defaults = scheduler_defaults(VARIANTS[variant], root / "scheduler" / "scheduler_config.json")
    return ZImagePipeline(transformer, text_encoder, tokenizer, ae, variant, defaults)


def scheduler_defaults(defaults: Variant, config_file: Path) -> Variant:
    """The repo's own schedule is the official default: its static `shift`, or, with use_dynamic_shifting, the
    resolution-dependent shift of FLUX.1 (the official loader and pipeline read the same keys, same fallbacks)."""
    if not config_file.is_file():
        return defaults
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    dynamic = None
    if config.get("use_dynamic_shifting", False):
        dynamic = (
            float(config.get("base_shift", 0.5)),
            float(config.get("max_shift", 1.15)),
            int(config.get("base_image_seq_len", 256)),
            int(config.get("max_image_seq_len", 4096)),
        )
    return Variant(**{**defaults.__dict__, "shift": float(config.get("shift", 3.0)), "dynamic_shift": dynamic})


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def schedule(steps: int, shift: float, dynamic_shift=None, height: int = 0, width: int = 0) -> Tensor:
    """Z-Image's static shift of an even grid (the released repos' scheduler ignores the resolution), or, when the
    scheduler config sets use_dynamic_shifting, FLUX.1's mu for this image size (`Variant.dynamic_shift`)."""
    if dynamic_shift is None:
        return solvers.static_shift(solvers.linear_sigmas(steps), shift)
    base_shift, max_shift, base_len, max_len = dynamic_shift
    mu = dict(base_seq_len=base_len, max_seq_len=max_len, base_shift=base_shift, max_shift=max_shift)
    return flux1.schedule(steps, height, width, **mu)  # FLUX.1's autoencoder and patches: the same tokens per pixel


def official_time(sigma: float) -> float:
    """Z-Image's normalised time (1 = data) exactly as its pipeline computes it: timestep = sigma * 1000 and
    (1000 - timestep) / 1000, both in float32. CFG truncation compares this value, so ties fall as they do there."""
    t = torch.tensor(sigma, dtype=torch.float32) * 1000
    return ((1000 - t) / 1000).item()


class ZImagePipeline:
    def __init__(self, transformer, text_encoder, tokenizer, ae, variant: str, defaults: Variant | None = None):
        self.transformer, self.text_encoder, self.tokenizer, self.ae = transformer, text_encoder, tokenizer, ae
        self.variant = variant
        self.defaults = defaults or VARIANTS[variant]

    vae = flux1.Flux1Pipeline.vae

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device, unless offload.py set an execution device."""
        return getattr(self, "execution_device", None) or self.transformer.x_pad_token.device

    @torch.no_grad()
    def encode_prompt(self, prompts) -> dict[str, list[Tensor]]:
        """Qwen3 features of each prompt's real tokens (chat template applied): {"caps": [(L_i, 2560), ...]}."""
        device = next(self.text_encoder.parameters()).device
        return {"caps": encode_captions(self.text_encoder, self.tokenizer, as_list(prompts), device)}

    def velocity(self, x: Tensor, sigma, cond: dict[str, list[Tensor]]) -> Tensor:
        """x (B, 16, H/8, W/8) latents at noise level sigma (float or (B,)) -> velocity (noise - x0) in float32."""
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w} must be even (image sides a multiple of {PIXELS_PER_TOKEN})")
        caps = [c.to(x.device) for c in cond["caps"]]
        caps = caps * b if len(caps) == 1 and b > 1 else caps
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(b)
        # Z-Image's time is 1 - sigma and its output is x0 - noise: both flipped into the shared convention here.
        return -self.transformer(x, 1 - sigma, caps).float()

    def sigmas(self, steps: int, height: int, width: int) -> Tensor:
        """The schedule generate() samples on (for samplers outside it, e.g. edit.py)."""
        return schedule(steps, self.defaults.shift, self.defaults.dynamic_shift, height, width)

    def sampling_kwargs(self, guidance=None) -> dict:
        if guidance is not None:
            raise ValueError("Z-Image has no distilled guidance; use cfg (the official guidance scale) instead")
        return {}

    def null_condition(self, n: int = 1) -> dict[str, list[Tensor]]:
        """The unconditional condition (RF-inversion's null text, edit.py): the empty prompt's features, as Z-Image's
        classifier-free guidance uses."""
        return self.encode_prompt([""] * n)

    def load_lora(self, path, scale: float = 1.0, strict: bool = False) -> list[str]:
        """Apply a LoRA file (ComfyUI/ai-toolkit, kohya/musubi, diffusers/PEFT, LyCORIS keys; see lora.py) to the
        transformer and the text encoder at `scale`; returns the layers it changed. Several files stack. What cannot
        be applied is named in a warning, or with `strict` raises a ValueError."""
        components = {"transformer": self.transformer, "text_encoder": self.text_encoder}
        return lora.load(path, components, scale, {"transformer": lora_aliases(self.transformer)}, strict)

    def training_kwargs(self) -> dict:
        return {}

    # The same autoencoder as FLUX.1, so the same pixels <-> normalised latents code.
    encode, decode = flux1.Flux1Pipeline.encode, flux1.Flux1Pipeline.decode

    @torch.no_grad()
    def generate(
        self,
        prompts,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        solver: str | None = None,
        guidance=None,
        cfg: float | None = None,
        negative_prompt="",
        seed=0,
        noise: Tensor | None = None,
        init_image=None,
        strength: float = 0.6,
        sigmas: Tensor | None = None,
        cfg_truncation: float | None = None,
        cfg_normalization: float | None = None,
        output: str = "pil",
        progress: bool = True,
    ):
        """Text (or image) to image; unset settings take the variant's defaults (see flux1's generate for the shared
        arguments). cfg is the official guidance scale w: v = v_c + w (v_c - v_u), 0 = off. cfg_truncation: no CFG
        once Z-Image time 1 - sigma exceeds it (official option; 1.0 = never). cfg_normalization k > 0: rescale the
        guided velocity so its norm is at most k times the conditional one's (official option).

        As in Tongyi's pipeline, CFG runs only for cfg > 1 (0 < cfg <= 1 is no CFG, although the formula would
        change the output; diffusers' ZImagePipeline applies it for any cfg > 0), and truncation compares the
        float32 time the official loop computes (`official_time`)."""
        self.sampling_kwargs(guidance)  # refuses a distilled guidance
        d = self.defaults
        steps, solver = steps or d.steps, solver or d.solver
        cfg = d.cfg if cfg is None else cfg
        cfg_truncation = d.cfg_truncation if cfg_truncation is None else cfg_truncation
        cfg_normalization = d.cfg_normalization if cfg_normalization is None else float(cfg_normalization)
        init, height, width = canvas(init_image, noise, height, width, d.size)
        prompts = as_list(prompts)
        n = noise.shape[0] if noise is not None else len(prompts)
        cond = self.encode_prompt(as_list(prompts, n))
        uncond = self.encode_prompt(as_list(negative_prompt, n)) if cfg > 1 else None

        def velocity_fn(x, sigma):
            v = self.velocity(x, sigma, cond)
            if uncond is None or (cfg_truncation <= 1 and official_time(sigma) > cfg_truncation):
                return v
            guided = torch.lerp(self.velocity(x, sigma, uncond), v, 1 + cfg)  # v_c + cfg (v_c - v_u)
            if cfg_normalization > 0:
                norm_c = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
                norm_g = torch.linalg.vector_norm(guided, dim=(1, 2, 3), keepdim=True)
                guided = guided * (cfg_normalization * norm_c / norm_g).clamp(max=1)
            return guided

        sigmas = schedule(steps, d.shift, d.dynamic_shift, height, width) if sigmas is None else sigmas
        return run_sampler(
            self, velocity_fn, n, height, width, sigmas, solver, seed, noise, init, strength, output, progress
        )
