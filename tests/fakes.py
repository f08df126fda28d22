"""Tiny random-weight models written to disk in the official checkpoint formats and Hugging Face repo layouts.

The reference models come from diffusers / transformers (test-only oracles); the files we write are what the
official repos ship, so our loaders are exercised exactly as on real checkpoints."""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"

# Tiny FLUX.1: 2 heads of 32 channels (rope axes (4, 14, 14), the (16, 56, 56) split scaled down), 2 + 2 blocks.
FLUX_TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(4, 14, 14),
)
# Four levels like the real AE (8x downsampling); GroupNorm(32) needs widths that are multiples of 32.
AE_TINY = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)


def randomize(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere (diffusers zero-initialises some output layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------------------------------------------------------
# diffusers -> BFL (the inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers, dimension-agnostic)

_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
}
_FLUX_DOUBLE = {
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
_FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
    "proj_out": "linear2",
}


def flux_to_bfl(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        module, param = key.rsplit(".", 1)
        if param == "weight" and ("norm_q" in module or "norm_k" in module or "norm_added" in module):
            param = "scale"
        if module in _FLUX_TOP:
            out[f"{_FLUX_TOP[module]}.{param}"] = value
        elif module == "norm_out.linear":  # diffusers stores (scale, shift); BFL (shift, scale)
            scale, shift = value.chunk(2, dim=0)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
        elif m := re.match(r"transformer_blocks\.(\d+)\.(.+)", module):
            i, rest = m.groups()
            if rest in _FLUX_DOUBLE:
                out[f"double_blocks.{i}.{_FLUX_DOUBLE[rest]}.{param}"] = value
            elif rest not in {
                "attn.to_q",
                "attn.to_k",
                "attn.to_v",
                "attn.add_q_proj",
                "attn.add_k_proj",
                "attn.add_v_proj",
            }:
                raise KeyError(key)
        elif m := re.match(r"single_transformer_blocks\.(\d+)\.(.+)", module):
            i, rest = m.groups()
            if rest in _FLUX_SINGLE:
                out[f"single_blocks.{i}.{_FLUX_SINGLE[rest]}.{param}"] = value
            elif rest not in {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}:
                raise KeyError(key)
        else:
            raise KeyError(key)
    # Fused projections: BFL concatenates q, k, v (and, in single blocks, the MLP input) into one linear.
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks.")}
    singles = {int(k.split(".")[1]) for k in sd if k.startswith("single_transformer_blocks.")}
    for param in ("weight", "bias"):
        for i in blocks:
            b = f"transformer_blocks.{i}.attn"
            out[f"double_blocks.{i}.img_attn.qkv.{param}"] = torch.cat([sd[f"{b}.to_{c}.{param}"] for c in "qkv"])
            out[f"double_blocks.{i}.txt_attn.qkv.{param}"] = torch.cat([sd[f"{b}.add_{c}_proj.{param}"] for c in "qkv"])
        for i in singles:
            b = f"single_transformer_blocks.{i}"
            parts = [sd[f"{b}.attn.to_{c}.{param}"] for c in "qkv"] + [sd[f"{b}.proj_mlp.{param}"]]
            out[f"single_blocks.{i}.linear1.{param}"] = torch.cat(parts)
    return out


def tiny_flux_transformer(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return randomize(FluxTransformer2DModel(**{**FLUX_TINY, **overrides}), std=0.15, seed=seed).eval()


def tiny_ae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return randomize(AutoencoderKL(**AE_TINY), std=0.05, seed=seed).eval()


def tiny_clip(seed: int = 0, vocab_size: int = 49408, hidden_size: int = 24, eos_token_id: int = 2, std=0.3):
    """eos_token_id=2 as in FLUX.1-dev's text_encoder/config.json: pooled at argmax(input_ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
        projection_dim=hidden_size,
    )
    return randomize(CLIPTextModel(config), std=std, seed=seed).eval()


def tiny_t5(seed: int = 0, vocab_size: int = 32128, d_model: int = 48, std=0.3):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    )
    model = randomize(T5EncoderModel(config), std=std, seed=seed).eval()
    with torch.no_grad():  # a strong position bias, so a wrong relative bucket changes the output
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.normal_(0, 2.0)
    return model


def write_flux1_repo(
    root: Path,
    transformer_file: str = "flux1-dev.safetensors",
    prefix: str = "",
    vae_format: str = "bfl",
    seed: int = 0,
    **transformer_overrides,
) -> dict:
    """A FLUX.1 repo in the official layout; returns the diffusers/transformers reference models."""
    from flux1 import ae_from_diffusers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    transformer = tiny_flux_transformer(seed, **transformer_overrides)
    bfl = {prefix + k: v.contiguous() for k, v in flux_to_bfl(transformer.state_dict()).items()}
    save_file(bfl, root / transformer_file)

    ae = tiny_ae(seed + 1)
    if vae_format == "bfl":
        save_file({k: v.contiguous() for k, v in ae_from_diffusers(ae.state_dict()).items()}, root / "ae.safetensors")
    else:
        ae.save_pretrained(root / "vae")

    clip, t5 = tiny_clip(seed + 2), tiny_t5(seed + 3)
    clip.save_pretrained(root / "text_encoder", max_shard_size="200KB")
    t5.save_pretrained(root / "text_encoder_2", max_shard_size="500KB")
    (root / "tokenizer").mkdir(exist_ok=True)
    (root / "tokenizer_2").mkdir(exist_ok=True)
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZERS / "clip_l" / f, root / "tokenizer" / f)
    shutil.copy(TOKENIZERS / "t5_xxl" / "tokenizer.json", root / "tokenizer_2" / "tokenizer.json")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return {"transformer": transformer, "ae": ae, "clip": clip, "t5": t5}


def diffusers_flux_pipeline(refs: dict):
    """diffusers' FluxPipeline assembled from the same reference modules and the real tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTokenizer, T5TokenizerFast

    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
        shift=3.0,
        use_dynamic_shifting=True,
        time_shift_type="exponential",
    )
    clip_dir = TOKENIZERS / "clip_l"
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_dir), model_max_length=77)
    tokenizer_2 = T5TokenizerFast(tokenizer_file=str(TOKENIZERS / "t5_xxl" / "tokenizer.json"))
    return FluxPipeline(
        scheduler=scheduler,
        vae=refs["ae"],
        text_encoder=refs["clip"],
        tokenizer=tokenizer,
        text_encoder_2=refs["t5"],
        tokenizer_2=tokenizer_2,
        transformer=refs["transformer"],
    )
