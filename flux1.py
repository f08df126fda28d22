"""FLUX.1 [dev] and its derivatives (FLUX.1-Krea-dev, Flex.1-alpha) in plain PyTorch.

Reads top to bottom: configs and variants, weight reading, tokenizers and text encoders (CLIP-L, T5-XXL), the
transformer (Black Forest Labs' key names, so `flux1-dev.safetensors` loads as is), the autoencoder (BFL's
`ae.safetensors` names; diffusers' `vae/` names through one rename map), loading, and the pipeline.

Time convention (shared by every model file): sigma = 1 is noise, sigma = 0 is data,
x_sigma = (1 - sigma) x0 + sigma noise, velocity = noise - x0. FLUX.1 is trained in exactly this convention.
"""

import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import SafetensorError, safe_open
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from tqdm.auto import tqdm

import lora
import solvers

# ----------------------------------------------------------------------------------------------------------------------
# Configs and variants


@dataclass
class FluxParams:
    """Transformer hyper-parameters; defaults are FLUX.1-dev (12B). Loading reads them from the checkpoint's shapes."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    vec_in_dim: int = 768  # CLIP-L pooled
    context_in_dim: int = 4096  # T5-XXL hidden
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, int, int] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True


@dataclass
class AutoEncoderParams:
    """FLUX.1 autoencoder; defaults are `ae.safetensors` (also Z-Image's `vae/`)."""

    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


@dataclass
class Variant:
    repo: str  # Hugging Face repo id
    transformer_file: str  # BFL-format single file at the repo root
    ae_file: str | None = "ae.safetensors"  # None: the repo only has the diffusers `vae/` folder
    gated: bool = False
    # Sampling defaults (what `generate` and sample.py use when the caller says nothing).
    steps: int = 50
    guidance: float | None = 3.5  # distilled guidance fed to the guidance embedder; None bypasses it
    cfg: float = 1.0  # true classifier-free guidance (1 = off: no unconditional pass)
    solver: str = "euler"
    size: tuple[int, int] = (1024, 1024)  # (height, width)
    # Training rules (read by train.py): the guidance value the LoRA is trained at.
    train_guidance: float | None = 1.0


VARIANTS = {
    "flux1-dev": Variant("black-forest-labs/FLUX.1-dev", "flux1-dev.safetensors", gated=True),
    "flux1-krea-dev": Variant(
        "black-forest-labs/FLUX.1-Krea-dev", "flux1-krea-dev.safetensors", gated=True, guidance=4.5
    ),
    # Flex.1-alpha: 8 double blocks and a guidance embedder that is meant to be bypassed while training
    # (ostris/ai-toolkit); it samples well with guidance 4 in 25 steps.
    "flex1-alpha": Variant(
        "ostris/Flex.1-alpha", "Flex.1-alpha.safetensors", ae_file=None, steps=25, guidance=4.0, train_guidance=None
    ),
}
DEFAULT_VARIANT = "flux1-dev"
TRAIN_VARIANT = "flux1-dev"  # `train.py flux1` trains on FLUX.1-dev (at guidance 1.0, see Variant.train_guidance)
PIXELS_PER_TOKEN = 16  # 8x VAE downsampling, then 2x2 patches: sizes must be multiples of 16

# ----------------------------------------------------------------------------------------------------------------------
# Reading weights (mmapped: tensors stay backed by the file until something reads them)


WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
)


def weight_file(path) -> Path:
    """The weights file of a Hugging Face model folder (a single file or a shard index), or `path` itself."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"no weights in {path}: expected one of {', '.join(WEIGHT_FILE_NAMES)}")
        return found[0]
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def read_pth(file: Path) -> dict[str, Tensor]:
    try:
        try:
            return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{file} is not a readable checkpoint (truncated or corrupt?): {reason}") from None


def read_weights(path) -> dict[str, Tensor]:
    """All tensors of a .safetensors file, a sharded *.safetensors.index.json, a .pth, or a Hugging Face model folder
    holding one of those. Tensors are memory-mapped: nothing is read until used, and no file is read twice."""
    path = weight_file(path)
    if path.suffix in (".pth", ".pt"):
        return read_pth(path)

    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path} is not a safetensors shard index (a JSON with a 'weight_map'): {e}") from None
        shards = [path.parent / name for name in sorted(set(weight_map.values()))]
    else:
        shards = [path]
    state_dict = {}
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"shard {shard.name} listed in {path.name} is missing from {shard.parent}")
        try:
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    state_dict[key] = f.get_tensor(key)
        except SafetensorError as e:
            raise ValueError(
                f"{shard} is not a valid safetensors file (truncated or corrupt? download it again): {e}"
            ) from None
    return state_dict


def read_config(folder) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder} (expected a Hugging Face model folder)")
    return json.loads((folder / "config.json").read_text())


def load_into(model: nn.Module, state_dict: dict[str, Tensor], source) -> nn.Module:
    """Assign (mmapped) tensors to a model built on the meta device: no copy, and any key mismatch is a clear error."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights in {source} do not match {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers. Both pad/truncate to a fixed length, as FLUX.1 pipelines do (padding="max_length", truncation=True).


def require_files(*paths):
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"missing tokenizer file {path}")


def _encode(tokenizer: Tokenizer, prompts: list[str] | str) -> torch.Tensor:
    if isinstance(prompts, str):  # a bare string would otherwise be read as a list of one-character prompts
        prompts = [prompts]
    return torch.tensor([e.ids for e in tokenizer.encode_batch(list(prompts))], dtype=torch.long)


# CLIP's word pattern (OpenAI's `simple_tokenizer.py`): its special tokens, common English contractions, runs of
# letters, single digits, runs of other non-space characters. Whitespace between matches is dropped.
CLIP_WORD_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class CLIPTokenizer:
    """CLIP's byte-level BPE, giving the same ids as transformers' `CLIPTokenizer`, which FLUX.1 pipelines use.

    OpenAI's original tokenizer also runs ftfy and HTML unescaping; the transformers one does not, and neither
    do we, since FLUX.1 was trained with the transformers one.
    """

    bos_token, eos_token = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, vocab_json_path: str | Path, merges_txt_path: str | Path, max_length: int = 77):
        require_files(vocab_json_path, merges_txt_path)
        # "</w>" marks a word's last symbol, so "cat</w>" (a whole word) and "cat" (a prefix) are different tokens.
        # The vocabulary covers all 256 byte symbols, so the unknown token is never produced.
        bpe = models.BPE.from_file(
            str(vocab_json_path), str(merges_txt_path), end_of_word_suffix="</w>", unk_token=self.eos_token
        )
        tok = Tokenizer(bpe)
        # CLIP's text cleanup: NFC, collapse each whitespace run to one space, lowercase.
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # Split into CLIP's words, then spell each word's UTF-8 bytes with the printable stand-ins the vocabulary is
        # written in. ByteLevel also re-splits with GPT-2's pattern, as in transformers: that leaves CLIP's words
        # whole, except that it breaks "<|endoftext|>" (say, from a typed "<|ENDOFTEXT|>") into "<|", "endoftext", "|>".
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        # Special tokens typed verbatim in a prompt are matched before normalisation, as transformers does.
        specials = [self.bos_token, self.eos_token]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.bos_id, self.eos_id = tok.token_to_id(self.bos_token), tok.token_to_id(self.eos_token)  # 49406, 49407
        tok.post_processor = processors.TemplateProcessing(
            single=f"{self.bos_token} $A {self.eos_token}",
            special_tokens=[(self.bos_token, self.bos_id), (self.eos_token, self.eos_id)],
        )
        # Truncation leaves room for the BOS/EOS added above, so a long prompt still ends with EOS. CLIP pads with EOS.
        tok.enable_truncation(max_length)
        tok.enable_padding(length=max_length, pad_id=self.eos_id, pad_token=self.eos_token)
        self.tokenizer, self.max_length = tok, max_length

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """(B, max_length) int64 ids: BOS, prompt, EOS, then EOS padding."""
        return _encode(self.tokenizer, prompts)


class T5Tokenizer:
    """The SentencePiece-Unigram T5 tokenizer, from the `tokenizer.json` that ships with T5 checkpoints."""

    def __init__(self, tokenizer_json_path: str | Path, max_length: int = 512):
        require_files(tokenizer_json_path)
        tok = Tokenizer.from_file(str(tokenizer_json_path))
        self.eos_id, self.pad_id = tok.token_to_id("</s>"), tok.token_to_id("<pad>")  # 1, 0
        # The official tokenizer ends every sequence with </s> and has no BOS. Set it here rather than rely on the
        # file's post-processor, which not every tokenizer.json has.
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", self.eos_id)])
        tok.enable_truncation(max_length)  # keeps the </s>
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="<pad>")
        self.tokenizer, self.max_length = tok, max_length

    def __call__(self, prompts: list[str] | str) -> torch.Tensor:
        """(B, max_length) int64 ids: prompt, </s>, then <pad> (0) padding."""
        return _encode(self.tokenizer, prompts)


# ----------------------------------------------------------------------------------------------------------------------
# CLIP-L text encoder (OpenAI CLIP ViT-L/14's text tower). Pre-LayerNorm causal transformer with learned positions.


def config_from_dict(cls, config: dict):
    """Build a config dataclass from a transformers config.json dict, ignoring the many fields we do not need."""
    return cls(**{f.name: config[f.name] for f in fields(cls) if f.name in config})


@dataclass
class CLIPTextConfig:
    """Defaults are CLIP-L as in FLUX.1's `text_encoder/config.json`."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    # transformers configs written before its PR #24773 say 2 here (FLUX.1's does); see `CLIPTextModel.forward`.
    eos_token_id: int = 2

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextConfig":
        return config_from_dict(cls, config)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    # The sigmoid approximation of GELU that OpenAI trained CLIP with; exact GELU gives slightly different outputs.
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # transformers' "gelu_pytorch_tanh" (SigLIP)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": gelu_tanh}  # config.hidden_act -> fn


class CLIPAttention(nn.Module):
    """Also SigLIP's vision attention (causal=False)."""

    def __init__(self, config, causal: bool = True):
        super().__init__()
        dim = config.hidden_size
        self.num_heads, self.causal = config.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        # CLIP's text tower: causal, and no padding mask: the tokens up to the first EOS never see the padding behind
        # them anyway. SigLIP's vision tower: every patch sees every patch.
        x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, D))


class CLIPMLP(nn.Module):
    """fc1, the config's activation (ACTIVATIONS), fc2."""

    def __init__(self, config):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer block; also SigLIP's vision encoder layer (causal=False, same key names)."""

    def __init__(self, config, causal: bool = True):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config, causal)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(nn.Module):
    """input_ids (B, L) -> pooled (B, hidden): the final-LayerNorm hidden state at the end-of-text token."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"CLIP hidden_act {config.hidden_act!r} is not supported (expected quick_gelu or gelu)")
        self.config = config
        c = config
        # ModuleDicts only to reproduce the checkpoint's key names (text_model.embeddings.token_embedding.weight, ...).
        self.text_model = nn.ModuleDict(
            dict(
                embeddings=nn.ModuleDict(
                    dict(
                        token_embedding=nn.Embedding(c.vocab_size, c.hidden_size),
                        position_embedding=nn.Embedding(c.max_position_embeddings, c.hidden_size),
                    )
                ),
                encoder=nn.ModuleDict(dict(layers=nn.ModuleList(CLIPLayer(c) for _ in range(c.num_hidden_layers)))),
                final_layer_norm=nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps),
            )
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        tm = self.text_model
        B, L = input_ids.shape
        positions = torch.arange(L, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(positions)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        # Pool at the end-of-text token, with transformers' rule (FLUX.1 was trained on its pooler_output). Configs
        # with eos_token_id == 2 (FLUX.1-dev's) predate a transformers fix and take the argmax of the ids, which is the
        # first EOS because EOS (49407) is the largest id in CLIP's vocabulary. Newer configs take the first position
        # holding eos_token_id. torch.argmax returns the first of tied maxima in both cases.
        if self.config.eos_token_id == 2:
            eos_position = input_ids.argmax(dim=-1)
        else:
            eos_position = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(B, device=x.device), eos_position]


# ----------------------------------------------------------------------------------------------------------------------
# T5 v1.1 encoder (T5-XXL for FLUX.1). Pre-RMSNorm transformer, relative position bias, gated-GELU feed-forward.


@dataclass
class T5Config:
    """Defaults are T5-XXL v1.1 as in FLUX.1's `text_encoder_2/config.json`."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @classmethod
    def from_dict(cls, config: dict) -> "T5Config":
        return config_from_dict(cls, config)


class T5RMSNorm(nn.Module):
    """T5's LayerNorm: scale only, no mean subtraction and no bias. The mean square is taken in fp32 for bf16 inputs."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(self.weight.dtype)


def t5_relative_position_buckets(length: int, num_buckets: int, max_distance: int, device=None) -> torch.Tensor:
    """(length, length) bucket index of the offset key - query, bidirectional as in T5's encoder.

    Half of the buckets are for keys after the query, half for keys at or before it. Within each half, the first
    half of the buckets are the exact distances 0, 1, 2, ...; the rest cover larger distances in logarithmically
    growing bins up to max_distance, and everything farther shares the last bin.
    """
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]
    half = num_buckets // 2
    n_exact = half // 2
    distance = offset.abs()
    # Computed in fp32 and truncated toward zero, like the original Mesh TensorFlow code, so the bins match exactly.
    # The clamp only keeps log() finite for the short distances, which use the exact buckets instead.
    log_ratio = torch.log(distance.clamp(min=n_exact).float() / n_exact) / math.log(max_distance / n_exact)
    log_bucket = (n_exact + (log_ratio * (half - n_exact)).long()).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < n_exact, distance, log_bucket)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:  # only the first block holds the table; all blocks use its bias
            self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        # T5 does not scale scores by 1/sqrt(d_kv) (its initialisation accounts for it), and adds the relative
        # position bias to them. No padding mask: FLUX.1's T5 tokens attend to the <pad> tokens as well.
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=position_bias, scale=1.0)
        return self.o(x.transpose(1, 2).reshape(B, L, -1))


class T5GatedFeedForward(nn.Module):
    """wo(act(wi_0 x) * wi_1 x). transformers calls it DenseReluDense, a name left over from the original T5."""

    def __init__(self, config: T5Config):
        super().__init__()
        # T5 v1.1 is "gated-gelu", meaning GELU's tanh approximation (transformers' "gelu_new").
        activations = {"gated-gelu": lambda x: F.gelu(x, approximate="tanh"), "gated-silu": F.silu}
        if config.feed_forward_proj not in activations:
            raise ValueError(f"T5 feed_forward_proj {config.feed_forward_proj!r} is not one of {list(activations)}")
        self.act = activations[config.feed_forward_proj]
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.wi_0(x)) * self.wi_1(x)
        return self.wo(x.to(self.wo.weight.dtype))  # wo may be kept in fp32, see `load_t5`


class T5Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_epsilon
        # layer.0 is self-attention, layer.1 the feed-forward, each with its own pre-norm (the checkpoint's layout).
        self.layer = nn.ModuleList(
            [
                nn.ModuleDict(
                    dict(SelfAttention=T5Attention(config, has_relative_attention_bias), layer_norm=T5RMSNorm(d, eps))
                ),
                nn.ModuleDict(dict(DenseReluDense=T5GatedFeedForward(config), layer_norm=T5RMSNorm(d, eps))),
            ]
        )

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), position_bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class T5Encoder(nn.Module):
    """input_ids (B, L) -> last hidden state (B, L, d_model)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        blocks = [T5Block(config, has_relative_attention_bias=i == 0) for i in range(config.num_layers)]
        self.encoder = nn.ModuleDict(
            dict(block=nn.ModuleList(blocks), final_layer_norm=T5RMSNorm(config.d_model, config.layer_norm_epsilon))
        )

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, query, key) additive attention bias, computed once and shared by every block."""
        c = self.config
        buckets = t5_relative_position_buckets(
            length, c.relative_attention_num_buckets, c.relative_attention_max_distance, device
        )
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        return table(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.shared(input_ids)
        position_bias = self.position_bias(input_ids.shape[1], input_ids.device)
        for block in self.encoder.block:
            x = block(x, position_bias)
        return self.encoder.final_layer_norm(x)


def load_clip(folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> CLIPTextModel:
    """CLIP text encoder from a transformers folder (FLUX.1's `text_encoder/`)."""
    config = CLIPTextConfig.from_dict(read_config(folder))
    with torch.device("meta"):
        model = CLIPTextModel(config)
    state_dict = read_weights(folder)
    # transformers >= 5 saves CLIPTextModel without the "text_model." prefix that older checkpoints (FLUX.1's) have.
    if not any(k.startswith("text_model.") for k in state_dict):
        state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
    state_dict.pop("text_model.embeddings.position_ids", None)  # a buffer older transformers saved; built in forward
    state_dict.pop("text_projection.weight", None)  # CLIPTextModelWithProjection's head; FLUX.1 uses the pooled state
    return load_into(model, state_dict, folder).to(device, dtype).eval().requires_grad_(False)


def load_t5(folder: str | Path, device="cpu", dtype: torch.dtype = torch.float32) -> T5Encoder:
    """T5 encoder from a transformers folder (FLUX.1's `text_encoder_2/`).

    bf16 (FLUX.1's dtype) runs everything in bf16, as transformers and BFL's code do: bf16 has fp32's range. In fp16
    T5 v1.1's feed-forward outputs overflow, so there, as in transformers, each `wo` stays in fp32, which also makes
    the residual stream fp32 from the first feed-forward on.
    """
    config = T5Config.from_dict(read_config(folder))
    with torch.device("meta"):
        model = T5Encoder(config)
    state_dict = read_weights(folder)
    # encoder.embed_tokens is transformers' tied alias of `shared`; some checkpoints save one, some both.
    embed_tokens = state_dict.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in state_dict and embed_tokens is not None:
        state_dict["shared.weight"] = embed_tokens
    model = load_into(model, state_dict, folder).to(device, dtype).eval().requires_grad_(False)
    if dtype == torch.float16:
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.float()
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Transformer (names mirror BFL's flux/model.py and flux/modules/layers.py, so the checkpoint loads without renames)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10_000.0, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as FLUX was trained), [cos, sin] order, computed in fp32."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope(ids: Tensor, axes_dim, theta: float, angle_dtype=torch.float64) -> Tensor:
    """Rotary table for 3-axis positions `ids` (..., L, 3): one unit complex number e^(i angle) per channel pair,
    shape (..., L, head_dim / 2), complex64.

    Each axis rotates its own slice of the head dimension (RoFormer, arXiv 2104.09864); FLUX pairs adjacent
    channels (2i, 2i+1). The angles are computed in float64 like BFL's code, so large positions stay exact
    (Z-Image's official table rounds them to float32 first: `angle_dtype`)."""
    angles = []
    for i, d in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d)
        angles.append((ids[..., i, None].double() * omega).to(angle_dtype))
    angles = torch.cat(angles, dim=-1)
    return torch.complex(angles.cos().float(), angles.sin().float())


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate the channel pairs of x (..., L, head_dim) in float32: one complex multiply per pair is the 2x2
    rotation [[cos, -sin], [sin, cos]] of BFL's code, in a quarter of the element-wise work."""
    rotated = torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * freqs
    return torch.view_as_real(rotated).flatten(-2).type_as(x)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """q, k, v: (B, heads, L, head_dim) -> (B, L, heads * head_dim)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds the per-stream weights of a double block; the attention itself runs jointly over both streams."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)  # 3, B, H, L, D
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """adaLN-Zero style modulation from the conditioning vector: (shift, scale, gate) once or twice."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: Tensor) -> list[Tensor]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, 1 + scale, F.layer_norm(x, x.shape[-1:], eps=1e-6))


def mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class DoubleStreamBlock(nn.Module):
    """MM-DiT block (SD3, arXiv 2403.03206): image and text keep separate weights and attend jointly."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = mlp(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = mlp(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        return double_stream(self, img, txt, pe, self.img_mod(vec), self.txt_mod(vec))


def double_stream(block, img: Tensor, txt: Tensor, pe: Tensor, img_mod, txt_mod) -> tuple[Tensor, Tensor]:
    """The MM-DiT update of a double block (its img_attn/img_mlp/txt_attn/txt_mlp) given each stream's six modulation
    chunks (shift, scale, gate for attention, then for the MLP): FLUX.1 computes them per block, FLUX.2 once per
    model."""
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = img_mod
    t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = txt_mod
    img_q, img_k, img_v = block.img_attn.qkv_heads(modulate(img, i_shift1, i_scale1))
    txt_q, txt_k, txt_v = block.txt_attn.qkv_heads(modulate(txt, t_shift1, t_scale1))
    # Text tokens come first in the joint sequence, as in the official model (the RoPE table follows that order).
    attn = attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2), pe)
    txt_attn, img_attn = attn.split([txt.shape[1], img.shape[1]], dim=1)
    img = img + i_gate1 * block.img_attn.proj(img_attn)
    img = img + i_gate2 * block.img_mlp(modulate(img, i_shift2, i_scale2))
    txt = txt + t_gate1 * block.txt_attn.proj(txt_attn)
    txt = txt + t_gate2 * block.txt_mlp(modulate(txt, t_shift2, t_scale2))
    return img, txt


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP block (ViT-22B, arXiv 2302.05442) with one fused input and one fused output linear."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe) -> Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp_in = self.linear1(modulate(x, shift, scale)).split([3 * self.hidden_size, self.mlp_hidden_dim], -1)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), F.gelu(mlp_in, approximate="tanh")), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # BFL order: shift first
        return self.linear(modulate(x, shift, scale))


class Flux(nn.Module):
    def __init__(self, params: FluxParams):
        super().__init__()
        p = self.params = params
        check_rope_axes(p.axes_dim, p.hidden_size // p.num_heads)
        self.img_in = nn.Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size)
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else None
        self.txt_in = nn.Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.in_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """img (B, L_img, 64) patchified latents, txt (B, L_txt, 4096) T5 states, y (B, 768) CLIP pooled,
        timesteps (B,) sigma in [0, 1], guidance (B,) or None (Flex.1: bypass the embedder), ids (L, 3)."""
        dtype = self.img_in.weight.dtype
        vec = self.time_in(timestep_embedding(timesteps).to(dtype))
        if guidance is not None and self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        img, txt = self.img_in(img.to(dtype)), self.txt_in(txt.to(dtype))
        pe = rope(torch.cat((txt_ids, img_ids), 0), self.params.axes_dim, self.params.theta)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)


def check_rope_axes(axes_dim, head_dim: int, source: str = "axes_dim"):
    """RoPE rotates channel pairs, axis by axis: every axis needs an even width and together they cover the head."""
    if any(d <= 0 or d % 2 for d in axes_dim) or sum(axes_dim) != head_dim:
        raise ValueError(
            f"RoPE axes {tuple(axes_dim)} ({source}) are invalid for head_dim {head_dim}: each must be a positive even "
            f"number and they must sum to {head_dim}; give them in the repo's transformer/config.json "
            '("axes_dims_rope")'
        )


def flux_params_from_state_dict(sd: dict[str, Tensor], axes_dim=None) -> FluxParams:
    """Read depth, widths and the guidance embedder from the checkpoint (Flex.1-alpha has 8 double blocks). The RoPE
    split of the head is not in the weights: `axes_dim` (from the repo's transformer/config.json) or FLUX.1's."""
    hidden, in_channels = sd["img_in.weight"].shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("double_blocks.")})
    depth_single = len({k.split(".")[1] for k in sd if k.startswith("single_blocks.")})
    if depth:
        head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
        mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in sd
    else:
        head_dim = sd["single_blocks.0.norm.query_norm.scale"].shape[0]
        mlp_hidden = sd["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
        qkv_bias = True
    if axes_dim is None:
        # FLUX.1 splits a 128-wide head as (16, 56, 56) over (unused, row, column); other widths keep the ratios.
        axes_dim = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
        check_rope_axes(axes_dim, head_dim, source="inferred from FLUX.1's 16:56:56 split")
    else:
        check_rope_axes(axes_dim, head_dim, source="transformer/config.json")
    return FluxParams(
        in_channels=in_channels,
        vec_in_dim=sd["vector_in.in_layer.weight"].shape[1],
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=depth_single,
        axes_dim=tuple(axes_dim),
        qkv_bias=qkv_bias,
        guidance_embed="guidance_in.in_layer.weight" in sd,
    )


def read_bfl_transformer(path) -> dict[str, Tensor]:
    """A BFL single-file transformer's weights (FLUX.1 or FLUX.2). Files saved by ComfyUI-style tools (Flex.1-alpha)
    put every key under `model.diffusion_model.`: that prefix is removed, and keys outside it are dropped."""
    sd = read_weights(path)
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_transformer(path, device="cpu", dtype=torch.bfloat16, axes_dim=None) -> Flux:
    """The BFL single file; `axes_dim`: the RoPE split of a head if the repo states it (else FLUX.1's)."""
    sd = read_bfl_transformer(path)
    if "img_in.weight" not in sd:
        raise ValueError(f"{path}: not a FLUX.1 transformer in BFL format (no img_in.weight)")
    with torch.device("meta"):
        model = Flux(flux_params_from_state_dict(sd, axes_dim))
    return load_into(model, sd, path).to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# Autoencoder (BFL flux/modules/autoencoder.py names; a KL autoencoder as in LDM, arXiv 2112.10752)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v, proj_out are 1x1 convolutions in the checkpoint."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))  # B, 1, HW, C
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the checkpoint was trained


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        widths = [p.ch * m for m in p.ch_mult]
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, block_out in enumerate(widths):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else block_out, block_out) for j in range(p.num_res_blocks)
            )
            level.attn = nn.ModuleList()  # empty in FLUX.1, kept for the checkpoint's module layout
            if i != len(widths) - 1:
                level.downsample = Downsample(block_out)
            self.down.append(level)
            block_in = block_out
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(block_in, block_in),
            AttnBlock(block_in),
            ResnetBlock(block_in, block_in),
        )
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        block_in = widths[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(block_in, block_in),
            AttnBlock(block_in),
            ResnetBlock(block_in, block_in),
        )
        # `up[i]` is resolution level i (0 = full size), built from the coarsest level down as in the checkpoint.
        up = []
        for i in reversed(range(len(widths))):
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(block_in if j == 0 else widths[i], widths[i]) for j in range(p.num_res_blocks + 1)
            )
            level.attn = nn.ModuleList()
            if i != 0:
                level.upsample = Upsample(widths[i])
            up.insert(0, level)
            block_in = widths[i]
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, x: Tensor) -> Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> normalised latents (B, 16, H/8, W/8): the posterior mean, shifted and
        scaled to unit variance as FLUX.1 was trained (no sampling: the mean is what the pipelines use)."""
        mean = self.encoder(x.to(self.encoder.conv_in.weight.dtype)).chunk(2, dim=1)[0]
        return (mean.float() - self.params.shift_factor) * self.params.scale_factor

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents -> pixels, nominally in [-1, 1] (not clamped)."""
        z = z.float() / self.params.scale_factor + self.params.shift_factor
        return self.decoder(z.to(self.decoder.conv_in.weight.dtype)).float()


def ae_params_from_state_dict(sd: dict[str, Tensor], **factors) -> AutoEncoderParams:
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in range(levels))
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch_mult=ch_mult,
        num_res_blocks=len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")}),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        **factors,
    )


def ae_from_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers AutoencoderKL names (the `vae/` folder of FLUX.1 and Z-Image repos) -> BFL names.

    The decoder's levels are numbered in reverse, and the mid-block attention is Linear there but 1x1 conv here."""
    num_up = len({k.split(".")[2] for k in sd if k.startswith("decoder.up_blocks.")})
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.",
        ),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
    ]
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # a view, not a copy
        out[key] = value
    return out


def load_ae(root, device="cpu", dtype=torch.float32) -> AutoEncoder:
    """`ae.safetensors` (BFL names) if given a file, or a diffusers `vae/` folder with its config.json."""
    root = Path(root)
    if root.is_dir():
        config = read_config(root)
        sd = ae_from_diffusers(read_weights(root))
        factors = {
            "scale_factor": config.get("scaling_factor", 0.3611),
            "shift_factor": config.get("shift_factor", 0.1159),
        }
    else:
        sd, factors = read_weights(root), {}
    if "encoder.conv_in.weight" not in sd:
        raise ValueError(f"{root}: not a FLUX.1 autoencoder (no encoder.conv_in.weight)")
    with torch.device("meta"):
        model = AutoEncoder(ae_params_from_state_dict(sd, **factors))
    return load_into(model, sd, root).to(device, dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------------------
# FLUX.1 Redux: image prompts. A SigLIP so400m vision tower (google/siglip-so400m-patch14-384; the Redux repo's
# `image_encoder/`, transformers' SiglipVisionModel key names) turns each image into 27 x 27 = 729 feature tokens, and
# the Redux projection (`flux1-redux-dev.safetensors`) maps them to T5's width; the transformer reads them as extra
# text tokens after the T5 tokens (BFL's flux/sampling.py `prepare_redux`).

REDUX_REPO = "black-forest-labs/FLUX.1-Redux-dev"  # gated, like FLUX.1-dev
REDUX_FILE = "flux1-redux-dev.safetensors"  # BFL's format; the repo's diffusers `image_embedder/` has the same keys
REDUX_FILES = [REDUX_FILE, "image_encoder/*", "feature_extractor/*"]


@dataclass
class SiglipVisionConfig:
    """Defaults are SigLIP so400m/14 at 384 px, as in the Redux repo's `image_encoder/config.json`."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_dict(cls, config: dict) -> "SiglipVisionConfig":
        return config_from_dict(cls, config.get("vision_config", config))  # a full SiglipModel config works too


class SiglipVisionModel(nn.Module):
    """pixel_values (B, 3, S, S), normalised -> last hidden state (B, (S / patch)^2, hidden), after the final LayerNorm.
    SigLIP's attention-pooling head is not built: Redux reads the token features, not the pooled embedding."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        if config.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"SigLIP hidden_act {config.hidden_act!r} is not supported (expected gelu_pytorch_tanh)")
        self.config = c = config
        self.vision_model = vm = nn.Module()  # module names reproduce the checkpoint keys (vision_model.encoder...)
        vm.embeddings = nn.Module()
        vm.embeddings.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        vm.embeddings.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.hidden_size)
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList(CLIPLayer(c, causal=False) for _ in range(c.num_hidden_layers))
        vm.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        vm = self.vision_model
        weight = vm.embeddings.patch_embedding.weight
        x = vm.embeddings.patch_embedding(pixel_values.to(weight)).flatten(2).transpose(1, 2)  # row-major patches
        if x.shape[1] != vm.embeddings.position_embedding.num_embeddings:
            raise ValueError(f"SigLIP expects {self.config.image_size}px inputs, got {tuple(pixel_values.shape[-2:])}")
        x = x + vm.embeddings.position_embedding.weight
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)


@dataclass
class SiglipPreprocess:
    """transformers' SiglipImageProcessor settings; defaults are the Redux repo's `feature_extractor/`."""

    size: tuple[int, int] = (384, 384)  # (height, width)
    resample: int = Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_file(cls, path) -> "SiglipPreprocess":
        c = json.loads(Path(path).read_text())
        size = c.get("size", {"height": 384, "width": 384})
        if c.get("do_center_crop") or not c.get("do_resize", True) or not {"height", "width"} <= size.keys():
            raise ValueError(f"{path}: only a plain resize to a fixed height x width is supported")
        return cls(
            size=(size["height"], size["width"]),
            resample=c.get("resample", cls.resample),
            rescale_factor=c.get("rescale_factor", cls.rescale_factor) if c.get("do_rescale", True) else 1.0,
            image_mean=tuple(c.get("image_mean", cls.image_mean)) if c.get("do_normalize", True) else (0.0,) * 3,
            image_std=tuple(c.get("image_std", cls.image_std)) if c.get("do_normalize", True) else (1.0,) * 3,
        )

    def __call__(self, images: list) -> Tensor:
        """PIL images -> (B, 3, H, W) float32, as the processor does it: any transparency composited onto white,
        RGB, one resize of the whole image to H x W (no crop: the aspect ratio is not kept), then x * rescale_factor
        (computed in float64) and (x - mean) / std."""
        out = []
        for image in images:
            if "A" in image.getbands() or image.info.get("transparency") is not None:
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image.convert("RGBA"))
            image = image.convert("RGB").resize(self.size[::-1], resample=self.resample)
            x = (torch.from_numpy(np.asarray(image, dtype=np.float64)) * self.rescale_factor).float()
            mean, std = torch.tensor(self.image_mean), torch.tensor(self.image_std)
            out.append(((x - mean) / std).permute(2, 0, 1))
        return torch.stack(out)


class ReduxImageEncoder(nn.Module):
    """BFL's Redux projection (flux/modules/image_embedders.py): SigLIP features -> 3x-wide Linear, SiLU, Linear to
    the T5 width. diffusers' ReduxImageEncoder has the same names and activation."""

    def __init__(self, redux_dim: int = 1152, txt_in_features: int = 4096):
        super().__init__()
        self.redux_up = nn.Linear(redux_dim, txt_in_features * 3)
        self.redux_down = nn.Linear(txt_in_features * 3, txt_in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


class Redux(nn.Module):
    """Images -> Redux tokens (len(images), 729, 4096): preprocessing, SigLIP, projection."""

    def __init__(self, siglip: SiglipVisionModel, embedder: ReduxImageEncoder, preprocess: SiglipPreprocess, source):
        super().__init__()
        self.siglip, self.embedder, self.preprocess, self.source = siglip, embedder, preprocess, source

    @torch.no_grad()
    def forward(self, images) -> Tensor:
        pixels = self.preprocess([read_image(image, "image prompt") for image in image_list(images)])
        return self.embedder(self.siglip(pixels.to(self.embedder.redux_up.weight.device)))


def image_list(images) -> list:
    """One image (a path or a PIL image) or several -> a list."""
    return [images] if isinstance(images, str | Path | Image.Image) else list(images)


def load_siglip(folder, device="cpu", dtype=torch.float32) -> SiglipVisionModel:
    """SigLIP vision tower from a transformers folder (the Redux repo's `image_encoder/`)."""
    config = SiglipVisionConfig.from_dict(read_config(folder))
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    state_dict = read_weights(folder)
    # transformers >= 5 saves SiglipVisionModel without the "vision_model." prefix that the Redux repo's file has.
    if not any(k.startswith("vision_model.") for k in state_dict):
        state_dict = {f"vision_model.{k}": v for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("vision_model.head.")}  # pooling head
    state_dict.pop("vision_model.embeddings.position_ids", None)  # a buffer older transformers saved
    return load_into(model, state_dict, folder).to(device, dtype).eval().requires_grad_(False)


def load_redux(name_or_path=REDUX_REPO, device="cpu", dtype=torch.bfloat16) -> Redux:
    """FLUX.1 Redux from a folder laid out like black-forest-labs/FLUX.1-Redux-dev (`flux1-redux-dev.safetensors` or
    diffusers' `image_embedder/`, `image_encoder/`, optionally `feature_extractor/`), or that repo (downloaded)."""
    root = Path(str(name_or_path)).expanduser()
    if not root.is_dir():
        if str(name_or_path) != REDUX_REPO:
            raise FileNotFoundError(f"FLUX.1 Redux folder {root} does not exist")
        root = download(REDUX_REPO, REDUX_FILES, gated=True, local="--redux DIR")
    embedder_path = root / REDUX_FILE if (root / REDUX_FILE).is_file() else root / "image_embedder"
    if not embedder_path.exists() or not (root / "image_encoder").is_dir():
        raise FileNotFoundError(f"{root}: expected FLUX.1 Redux weights ({REDUX_FILE} and image_encoder/)")
    sd = read_weights(embedder_path)
    if "redux_up.weight" not in sd:
        raise ValueError(f"{embedder_path}: not a FLUX.1 Redux projection (no redux_up.weight)")
    with torch.device("meta"):
        embedder = ReduxImageEncoder(sd["redux_up.weight"].shape[1], sd["redux_down.weight"].shape[0])
    embedder = load_into(embedder, sd, embedder_path).to(device, dtype).eval().requires_grad_(False)
    siglip = load_siglip(root / "image_encoder", device, dtype)
    preprocess_file = root / "feature_extractor" / "preprocessor_config.json"
    preprocess = SiglipPreprocess.from_file(preprocess_file) if preprocess_file.is_file() else SiglipPreprocess()
    if preprocess.size != (siglip.config.image_size,) * 2:
        size = siglip.config.image_size
        raise ValueError(f"{root}: feature_extractor size {preprocess.size} does not fit SigLIP's {size}px input")
    return Redux(siglip, embedder, preprocess, str(name_or_path))


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: which layers train by default, the file format written, and the diffusers names LoRAs from the wild may use

LORA_TARGETS = [  # attention and MLP of every block; modulation layers stay frozen
    "double_blocks.*.img_attn.qkv",
    "double_blocks.*.img_attn.proj",
    "double_blocks.*.img_mlp.0",
    "double_blocks.*.img_mlp.2",
    "double_blocks.*.txt_attn.qkv",
    "double_blocks.*.txt_attn.proj",
    "double_blocks.*.txt_mlp.0",
    "double_blocks.*.txt_mlp.2",
    "single_blocks.*.linear1",
    "single_blocks.*.linear2",
]
LORA_FORMAT = "kohya"  # lora_unet_<BFL name>: what kohya/ai-toolkit write for FLUX.1, loaded by ComfyUI and diffusers
# What kohya's sd-scripts writes for FLUX.1 LoRAs (library/sai_model_spec.py, flux_utils.MODEL_VERSION_FLUX_V1).
LORA_METADATA = {
    "ss_base_model_version": "flux1",
    "modelspec.architecture": "flux-1-dev/lora",
    "modelspec.implementation": "https://github.com/black-forest-labs/flux",
}

# diffusers' FluxTransformer2DModel names -> BFL names (diffusers' single-file converter, inverted). Projections that
# BFL fuses are listed in order of their concatenation.
DIFFUSERS_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # (scale, shift) there, (shift, scale) here
}
DIFFUSERS_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
DIFFUSERS_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}
DIFFUSERS_FUSED_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
}
DIFFUSERS_FUSED_SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]}


def lora_aliases(
    params: FluxParams,
    top: dict = DIFFUSERS_TOP,
    double: dict = DIFFUSERS_DOUBLE,
    fused_double: dict = DIFFUSERS_FUSED_DOUBLE,
    single: dict = DIFFUSERS_SINGLE,
    fused_single: dict = DIFFUSERS_FUSED_SINGLE,
) -> dict[str, list[tuple[str, slice, slice]]]:
    """diffusers' names of FLUX.1's layers, as PEFT, SimpleTuner, OneTrainer and DiffSynth files use them -> rows of
    ours (lora.route): q, k, v (and the single blocks' MLP input) take their rows of BFL's fused linear, and the final
    modulation's halves swap: diffusers' norm_out.linear gives (scale, shift), BFL's adaLN_modulation (shift, scale).
    The name tables default to FLUX.1's; FLUX.2 (flux2_klein.py) passes its own."""
    h, mlp, whole = params.hidden_size, int(params.hidden_size * params.mlp_ratio), slice(None)
    aliases = {name: [(ours, whole, whole)] for name, ours in top.items()}
    final = top["norm_out.linear"]
    aliases["norm_out.linear"] = [(final, slice(0, h), slice(h, 2 * h)), (final, slice(h, 2 * h), slice(0, h))]
    blocks = [(f"transformer_blocks.{i}", f"double_blocks.{i}", double, fused_double) for i in range(params.depth)]
    blocks += [
        (f"single_transformer_blocks.{i}", f"single_blocks.{i}", single, fused_single)
        for i in range(params.depth_single_blocks)
    ]
    for theirs, ours, renames, fused in blocks:
        aliases |= {f"{theirs}.{name}": [(f"{ours}.{to}", whole, whole)] for name, to in renames.items()}
        for to, parts in fused.items():
            start = 0
            for name, size in zip(parts, [h, h, h, mlp]):  # q, k, v (, mlp) in the order BFL concatenates them
                aliases[f"{theirs}.{name}"] = [(f"{ours}.{to}", whole, slice(start, start + size))]
                start += size
    return aliases


def clip_lora_aliases(clip: nn.Module) -> dict[str, list[tuple[str, slice, slice]]]:
    """CLIP's layer names as transformers >= 5 writes them, without the "text_model." prefix that FLUX.1's checkpoint,
    kohya's lora_te1_ keys and older diffusers files have (and our module keeps)."""
    whole = slice(None)
    return {
        n.removeprefix("text_model."): [(n, whole, whole)]
        for n, _ in clip.named_modules()
        if n.startswith("text_model.")
    }


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def locate(name_or_path, variant: str | None, variants: dict, family: str, detect, files) -> tuple[Path, str]:
    """A local folder laid out like the official repo (its variant given, or told by `detect(folder)`), or a variant
    name whose repo is fetched from Hugging Face (only `files(variant)`). Shared by every model file."""
    if variant is not None and variant not in variants:
        raise ValueError(f"unknown {family} variant {variant!r}; choose one of {', '.join(variants)}")
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path, variant or detect(path)
    if str(name_or_path) in variants:
        variant = str(name_or_path)
        v = variants[variant]
        return download(v.repo, files(v), getattr(v, "gated", False)), variant
    if path.suffix or "/" in str(name_or_path):
        raise FileNotFoundError(f"weights folder {path} does not exist")
    raise ValueError(f"unknown {family} variant {name_or_path!r}; choose one of {', '.join(variants)} or a folder")


def download(repo: str, patterns: list[str], gated: bool, local: str = "--weights DIR") -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as e:  # network, auth and gating errors all end here with one actionable line
        raise FileNotFoundError(download_failure(repo, e, gated, local)) from None


def download_failure(repo: str, error: Exception, gated: bool, local: str = "--weights DIR") -> str:
    """One line: that the download failed, why (as far as the Hub's exception tells), then what to do."""
    name = type(error).__name__
    status = getattr(getattr(error, "response", None), "status_code", None)
    login = "log in once with `hf auth login` (or set HF_TOKEN)"
    licence = f"accept the licence on https://huggingface.co/{repo}"
    if name == "GatedRepoError" or (gated and status in (401, 403)):
        why = "access denied: the repo is gated and you are not logged in or have not accepted its licence"
        fix = f"{licence}, then {login}"
    elif name == "RepositoryNotFoundError" or status == 401:
        why, fix = "the repo was not found or needs a login", f"check the name, {login}"
    elif name in ("LocalEntryNotFoundError", "ConnectionError", "ConnectError", "Timeout", "OfflineModeIsEnabled"):
        why, fix = "no connection to huggingface.co and the files are not in the local cache", "check the network"
    else:
        why = f"{name}: {str(error).splitlines()[0] if str(error) else 'no details'}"
        fix = f"{licence} and {login}" if gated else "try again"
    return (
        f"could not download {repo} ({why}). To fix: {fix}; or pass a local copy laid out like the repo with {local}."
    )


def detect_variant(root: Path) -> str:
    for name, v in VARIANTS.items():
        if (root / v.transformer_file).is_file():
            return name
    return DEFAULT_VARIANT


def component_files(v: Variant) -> list[str]:
    files = [v.transformer_file, "transformer/config.json", "text_encoder/*", "text_encoder_2/*", "tokenizer/*"]
    return files + ["tokenizer_2/*"] + ([v.ae_file] if v.ae_file else ["vae/*"])


def repo_axes_dim(root: Path):
    """The RoPE split the repo states in its diffusers `transformer/config.json` ("axes_dims_rope"), if it has one:
    the only hyper-parameter the BFL file's shapes cannot tell."""
    config = root / "transformer" / "config.json"
    if not config.is_file():
        return None
    axes = read_config(config.parent).get("axes_dims_rope")
    return tuple(int(a) for a in axes) if axes is not None else None


def find_transformer_file(root: Path, v: Variant) -> Path:
    if (root / v.transformer_file).is_file():
        return root / v.transformer_file
    singles = [p for p in root.glob("*.safetensors") if p.name != "ae.safetensors"]
    if len(singles) == 1:
        return singles[0]
    raise FileNotFoundError(f"{root}: expected the transformer file {v.transformer_file} (BFL format)")


def bar_disabled(progress: bool) -> bool | None:
    """tqdm's `disable`: progress bars only on a terminal (None = off when not a TTY), never with progress=False."""
    return None if progress else True


def loading_bar(variant: str, parts: int, progress: bool) -> tqdm:
    """A progress bar over a pipeline's parts while they load (and move to the device): shared by the model files."""
    return tqdm(total=parts, desc=f"loading {variant}", disable=bar_disabled(progress), unit="part", leave=False)


def load(
    name_or_path=DEFAULT_VARIANT, variant: str | None = None, device="cpu", dtype=torch.bfloat16, progress=False
) -> "Flux1Pipeline":
    """Load the whole pipeline from a variant name (downloads from Hugging Face) or a folder laid out like the repo:
    `<transformer>.safetensors`, `ae.safetensors` (or `vae/`), `text_encoder/`, `text_encoder_2/`, `tokenizer/`,
    `tokenizer_2/`. progress: show a bar over the parts."""
    root, variant = locate(name_or_path, variant, VARIANTS, "FLUX.1", detect_variant, component_files)
    v = VARIANTS[variant]
    transformer_file = find_transformer_file(root, v)
    ae_path = root / "ae.safetensors" if (root / "ae.safetensors").is_file() else root / "vae"
    if not ae_path.exists():
        raise FileNotFoundError(f"{root}: expected the autoencoder as ae.safetensors or a diffusers vae/ folder")
    clip_tokenizer = CLIPTokenizer(root / "tokenizer" / "vocab.json", root / "tokenizer" / "merges.txt")
    t5_tokenizer = T5Tokenizer(root / "tokenizer_2" / "tokenizer.json")
    with loading_bar(variant, 4, progress) as bar:
        transformer = load_transformer(transformer_file, device, dtype, repo_axes_dim(root))
        bar.update()
        ae = load_ae(ae_path, device, dtype)
        bar.update()
        clip = load_clip(root / "text_encoder", device, dtype)
        bar.update()
        t5 = load_t5(root / "text_encoder_2", device, dtype)
        bar.update()
    return Flux1Pipeline(transformer, ae, clip, t5, clip_tokenizer, t5_tokenizer, variant)


# ----------------------------------------------------------------------------------------------------------------------
# Pipeline


def patchify(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, channel order (c, ph, pw) as in the official model."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify(x: Tensor, h: int, w: int) -> Tensor:
    b, _, d = x.shape
    return x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device) -> Tensor:
    """Position of each image token: (0, row, column); text tokens all sit at (0, 0, 0)."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(h * w, 3).float()


def to_pil(pixels: Tensor) -> list:
    arr = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def from_pil(image: Image.Image) -> Tensor:
    """An RGB PIL image -> (1, 3, H, W) float32 pixels in [-1, 1] (what to_pil turns back into images)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def read_image(image, what: str = "image") -> Image.Image:
    """A PIL image as is, or a path opened and turned upright by its EXIF orientation; a clear error otherwise."""
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            return ImageOps.exif_transpose(opened)  # a loaded copy, also when there is nothing to turn
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {image}: {e}") from None


def image_to_tensor(image, height: int | None, width: int | None, multiple: int) -> Tensor:
    """A PIL image or a path -> (1, 3, H, W) in [-1, 1], resized to cover (height, width) and center-cropped.
    Without a target size the image keeps its size, cropped down to a multiple of `multiple`."""
    image = ImageOps.exif_transpose(read_image(image, "init image")).convert("RGB")
    height = height or image.height // multiple * multiple
    width = width or image.width // multiple * multiple
    if height < multiple or width < multiple:
        raise ValueError(f"init image {image.size} is smaller than {multiple}x{multiple}")
    scale = max(height / image.height, width / image.width)
    resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(resized, Image.Resampling.LANCZOS) if resized != image.size else image
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return from_pil(image.crop((left, top, left + width, top + height)))


def draw_noise(shape, seeds: list[int], device) -> Tensor:
    """Float32 Gaussian noise, one CPU generator per image: the same seed gives the same image on any device and in
    any batch."""
    noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32) for s in seeds]
    return torch.stack(noise).to(device)


def seeded_noise(shape, seed, n: int, device) -> Tensor:
    """n noises of `shape` from the seeds seed, seed + 1, ... (or a list of n seeds), one generator each."""
    return draw_noise(shape, [seed + i for i in range(n)] if isinstance(seed, int) else as_list(seed, n), device)


def as_list(x, n: int | None = None) -> list:
    x = [x] if isinstance(x, str | int) or x is None else list(x)
    if n is not None and len(x) == 1:
        x = x * n
    if n is not None and len(x) != n:
        raise ValueError(f"expected 1 or {n} values, got {len(x)}")
    return x


def schedule(steps: int, height: int, width: int, **mu) -> Tensor:
    """FLUX.1's resolution-dependent shift (SD3 §5.3.2): more steps at high noise for larger images. `mu`: other
    end points of solvers.flux1_mu's line (base_seq_len, max_seq_len, base_shift, max_shift) than FLUX.1's."""
    tokens = (height // PIXELS_PER_TOKEN) * (width // PIXELS_PER_TOKEN)
    return solvers.time_shift(solvers.linear_sigmas(steps), solvers.flux1_mu(tokens, **mu))


def canvas(init_image, noise, height, width, default_size) -> tuple[Tensor | None, int, int]:
    """The output size: from the init image, else the given noise, else the arguments, else the model's default;
    image sides must be multiples of PIXELS_PER_TOKEN."""
    init = None
    if init_image is not None:
        init = init_image if isinstance(init_image, Tensor) else image_to_tensor(init_image, height, width, 16)
        height, width = init.shape[-2:]
    if noise is not None:
        height, width = noise.shape[-2] * 8, noise.shape[-1] * 8
    height, width = height or default_size[0], width or default_size[1]
    if height % PIXELS_PER_TOKEN or width % PIXELS_PER_TOKEN:
        raise ValueError(f"height and width must be multiples of {PIXELS_PER_TOKEN}, got {width}x{height}")
    return init, height, width


def run_sampler(pipe, velocity_fn, n, height, width, sigmas, solver, seed, noise, init, strength, output, progress):
    """What generate() shares across the image families: seeded noise, the image-to-image start, the solver with a
    progress bar, decoding. `velocity_fn(x, sigma)` speaks the sigma convention (1 = noise)."""
    if solver not in solvers.SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(solvers.SOLVERS)}")
    device = pipe.device
    if noise is None:
        noise = seeded_noise((pipe.ae.params.z_channels, height // 8, width // 8), seed, n, device)
    x = noise.to(device, torch.float32)
    sigmas = sigmas.to(device, torch.float32)
    if init is not None:
        # Start part-way down the schedule (the last `strength` of its steps, as diffusers' img2img pipelines do),
        # with the init latents noised to exactly the sigma the model is then told it is at.
        steps = len(sigmas) - 1
        sigmas = sigmas[int(steps - min(steps * strength, steps)) :]
        x0 = pipe.encode(init.to(device)).expand(n, -1, -1, -1)
        x = torch.lerp(x0.float(), x, sigmas[0])
    with tqdm(total=len(sigmas) - 1, disable=bar_disabled(progress), desc=pipe.variant, unit="step") as bar:
        x = solvers.SOLVERS[solver](velocity_fn, x, sigmas, callback=lambda *_: bar.update())
        if output == "latent":
            return x
        bar.set_postfix_str("decoding")  # the VAE decode is one more silent phase at large sizes
        pixels = pipe.decode(x)
    return pixels if output == "pt" else to_pil(pixels)


class Flux1Pipeline:
    def __init__(self, transformer: Flux, ae: AutoEncoder, clip, t5, clip_tokenizer, t5_tokenizer, variant: str):
        self.transformer, self.ae = transformer, ae
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.variant = variant
        self.defaults = VARIANTS[variant]
        self.redux: Redux | None = None  # image prompts; loaded by load_redux, or by generate(images=...) on first use

    @property
    def vae(self) -> AutoEncoder:
        return self.ae

    @property
    def device(self) -> torch.device:
        """Where sampling runs: the transformer's device, unless offload.py set an execution device."""
        return getattr(self, "execution_device", None) or self.transformer.img_in.weight.device

    @torch.no_grad()
    def encode_prompt(self, prompts, images=None, image_scale: float = 1.0, text_scale: float = 1.0) -> dict:
        """T5-XXL states (B, 512, 4096) for the token stream and the CLIP-L pooled vector (B, 768) for modulation.

        images: FLUX.1 Redux image prompts (paths or PIL images, needs load_redux), their tokens appended after the
        T5 tokens of every prompt; several images are concatenated (as chaining ComfyUI's style-model nodes does).
        image_scale multiplies the image tokens (e.g. 0.2 weakens the image), text_scale the T5 states (> 1
        strengthens the text), as the reference project's README suggests. The pooled vector stays the prompt's."""
        prompts = as_list(prompts)
        t5_ids = self.t5_tokenizer(prompts).to(next(self.t5.parameters()).device)
        clip_ids = self.clip_tokenizer(prompts).to(next(self.clip.parameters()).device)
        cond = {"txt": self.t5(t5_ids), "vec": self.clip(clip_ids)}
        return self.add_images(cond, images, image_scale, text_scale) if images or text_scale != 1 else cond

    def add_images(self, cond: dict, images, image_scale: float = 1.0, text_scale: float = 1.0) -> dict:
        """A prompt's condition with Redux image tokens appended and both scales applied (see encode_prompt)."""
        txt = cond["txt"] * text_scale
        if images:
            if self.redux is None:
                raise ValueError("image prompts need FLUX.1 Redux: call pipe.load_redux() first")
            tokens = self.encode_images(images) * image_scale
            txt = torch.cat([txt, tokens.to(txt).expand(txt.shape[0], -1, -1)], dim=1)
        return {**cond, "txt": txt}

    def load_redux(self, name_or_path=REDUX_REPO) -> "Redux":
        """Load FLUX.1 Redux (a folder laid out like black-forest-labs/FLUX.1-Redux-dev, or that repo) next to T5."""
        t5 = next(self.t5.parameters())
        self.redux = load_redux(name_or_path, t5.device, t5.dtype)
        return self.redux

    @torch.no_grad()
    def encode_images(self, images) -> Tensor:
        """Redux tokens of all images, concatenated: (1, 729 * len(images), 4096)."""
        return self.redux(images).flatten(0, 1)[None]

    def velocity(self, x: Tensor, sigma, cond: dict[str, Tensor], guidance: float | Tensor | None = None) -> Tensor:
        """x (B, 16, H/8, W/8) latents at noise level sigma (float or (B,)) -> velocity (noise - x0) in float32.
        guidance: the distilled guidance scale, or None to bypass the guidance embedder (Flex.1-alpha training)."""
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"latent size {h}x{w} must be even (image sides a multiple of {PIXELS_PER_TOKEN})")
        device = x.device
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device).expand(b)
        txt, vec = cond["txt"].to(device), cond["vec"].to(device)
        if txt.shape[0] != b:
            txt, vec = txt.expand(b, -1, -1), vec.expand(b, -1)
        if guidance is not None:
            guidance = torch.as_tensor(guidance, dtype=torch.float32, device=device).expand(b)
        txt_ids = torch.zeros(txt.shape[1], 3, device=device)
        out = self.transformer(patchify(x), image_ids(h // 2, w // 2, device), txt, txt_ids, sigma, vec, guidance)
        return unpatchify(out.float(), h, w)

    def sigmas(self, steps: int, height: int, width: int) -> Tensor:
        """The schedule generate() samples on (for samplers outside it, e.g. edit.py)."""
        return schedule(steps, height, width)

    def sampling_kwargs(self, guidance: float | bool | None = None) -> dict:
        """velocity() arguments for sampling: the distilled guidance, the variant's default unless given (False
        bypasses the guidance embedder)."""
        if guidance is None:
            return {"guidance": self.defaults.guidance}
        return {"guidance": None if guidance is False else float(guidance)}

    def null_condition(self, n: int = 1) -> dict[str, Tensor]:
        """RF-inversion's unconditional field (edit.py): zero T5 states and a zero pooled vector, as in the reference
        implementation, rather than the empty prompt's embeddings (the paper's Alg. 1 writes the empty prompt, and
        diffusers' community pipeline encodes it). The reference's reason: FLUX.1's text conditioning was most likely
        dropped for classifier-free training by zeroing the embeddings, as SD3 (arXiv 2403.03206) does."""
        t5 = next(self.t5.parameters())
        txt = torch.zeros(n, self.t5_tokenizer.max_length, self.t5.config.d_model, device=t5.device, dtype=t5.dtype)
        return {"txt": txt, "vec": torch.zeros(n, self.clip.config.hidden_size, device=t5.device, dtype=t5.dtype)}

    def load_lora(self, path, scale: float = 1.0, strict: bool = False) -> list[str]:
        """Apply a LoRA file (kohya, diffusers/PEFT, ComfyUI, LyCORIS keys; see lora.py) to the transformer and text
        encoders at `scale`; returns the layers it changed. Several files stack. What cannot be applied is named in a
        warning, or with `strict` raises a ValueError."""
        components = {"transformer": self.transformer, "text_encoder": self.clip, "text_encoder_2": self.t5}
        aliases = {"transformer": lora_aliases(self.transformer.params), "text_encoder": clip_lora_aliases(self.clip)}
        return lora.load(path, components, scale, aliases, strict)

    def training_kwargs(self) -> dict:
        """Extra velocity() arguments while training: FLUX.1-dev trains at guidance 1.0, Flex.1-alpha with the
        guidance embedder bypassed (None)."""
        return {"guidance": self.defaults.train_guidance}

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        return self.ae.encode(pixels.to(self.ae.encoder.conv_in.weight.device))

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.ae.decode(z.to(self.ae.decoder.conv_in.weight.device))

    @torch.no_grad()
    def generate(
        self,
        prompts,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        solver: str | None = None,
        guidance: float | bool | None = None,
        cfg: float | None = None,
        negative_prompt="",
        seed=0,
        noise: Tensor | None = None,
        init_image=None,
        strength: float = 0.6,
        sigmas: Tensor | None = None,
        images=None,
        image_scale: float = 1.0,
        text_scale: float = 1.0,
        redux=None,
        output: str = "pil",
        progress: bool = True,
    ):
        """Text (or image) to image. Unset settings take the variant's defaults.

        guidance: distilled guidance scale; False bypasses the embedder (Flex.1-alpha). cfg > 1 adds true CFG with
        `negative_prompt` (two passes per step). seed: int (image i uses seed + i) or one per image; `noise` (B, 16,
        H/8, W/8) replaces the seeded noise. init_image + strength: image-to-image, skipping the first (1 - strength)
        of the schedule; the init latents are noised to exactly the first sigma the model sees.
        images: FLUX.1 Redux image prompts for every prompt, with image_scale and text_scale (see encode_prompt); Redux
        is loaded on first use from `redux` (a folder) or its Hugging Face repo.
        output: "pil" (list of PIL images), "pt" (pixels in [-1, 1]) or "latent"."""
        d = self.defaults
        steps, solver = steps or d.steps, solver or d.solver
        guidance = self.sampling_kwargs(guidance)["guidance"]
        cfg = d.cfg if cfg is None else cfg
        init, height, width = canvas(init_image, noise, height, width, d.size)
        prompts = as_list(prompts)
        n = noise.shape[0] if noise is not None else len(prompts)
        images = image_list(images) if images is not None else None
        if images and (self.redux is None or (redux is not None and str(redux) != self.redux.source)):
            self.load_redux(REDUX_REPO if redux is None else redux)
        cond = self.encode_prompt(as_list(prompts, n))
        if images or text_scale != 1:
            cond = self.add_images(cond, images, image_scale, text_scale)
        uncond = self.encode_prompt(as_list(negative_prompt, n)) if cfg != 1 else None

        def velocity_fn(x, sigma):
            v = self.velocity(x, sigma, cond, guidance)
            if uncond is not None:  # true CFG: v_u + cfg (v_c - v_u)
                v_u = self.velocity(x, sigma, uncond, guidance)
                v = torch.lerp(v_u, v, cfg)
            return v

        sigmas = schedule(steps, height, width) if sigmas is None else sigmas
        return run_sampler(
            self, velocity_fn, n, height, width, sigmas, solver, seed, noise, init, strength, output, progress
        )
