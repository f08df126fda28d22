"""Wan2.2 TI2V-5B: official-layout loading and parity with diffusers/transformers fed the same weights (fp32, tiny
configs), the VAE's chunked/tiled decoding, the umT5 tokenizer, LoRA files, and sample.py end to end."""

import copy
import json

import numpy as np
import pytest
import torch
from fakes import (
    TOKENIZERS,
    VARIED_PROMPTS,
    check_wan_vae,
    diffusers_sigmas,
    diffusers_wan_pipeline,
    random_image,
    random_prompts,
    rel,
)
from safetensors import safe_open
from safetensors.torch import save_file

import lora
import sample
import video
import wan22

PROMPTS = ["a red fox in the snow", "一只小猫在草地上奔跑, watercolor, soft light"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(wan22_repo):
    return wan22.load(wan22_repo[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def refs(wan22_repo):
    return wan22_repo[1]


# ----------------------------------------------------------------------------------------------------------------------
# Loading


def test_official_layout_loads_every_tensor(wan22_repo, pipe):
    root, refs = wan22_repo
    assert (root / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(root.glob("diffusion_pytorch_model-0000?-of-00003.safetensors"))) == 3
    assert (root / "Wan2.2_VAE.pth").is_file() and (root / "models_t5_umt5-xxl-enc-bf16.pth").is_file()
    assert (root / "google" / "umt5-xxl" / "tokenizer.json").is_file()
    p = pipe.transformer.params
    assert (p.dim, p.num_heads, p.num_layers, p.ffn_dim, p.text_dim, p.in_dim, p.out_dim) == (48, 2, 2, 64, 32, 48, 48)
    # load_into already refused missing or unexpected keys; every tensor also arrived intact, in its place.
    dit = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in refs["transformer"].state_dict().items()}
    ours = pipe.transformer.state_dict()
    assert ours.keys() == dit.keys() and all(torch.equal(ours[k], dit[k]) for k in ours)
    vae = wan22.vae_from_diffusers(refs["vae"].state_dict())
    ours = pipe.vae.state_dict()
    assert ours.keys() == vae.keys() and all(torch.equal(ours[k], vae[k]) for k in ours)
    t5 = refs["text_encoder"].state_dict()
    t5.pop("encoder.embed_tokens.weight")
    ours = pipe.text_encoder.state_dict()
    assert ours.keys() == t5.keys() and all(torch.equal(ours[k], t5[k]) for k in ours)
    assert pipe.vae.params == wan22.VAEParams(8, 16, 48, (1, 2, 4, 4), 2, (False, True, True), 2)
    assert pipe.variant == "wan22-ti2v-5b" and pipe.defaults.frames == 121 and pipe.defaults.fps == 24


def test_diffusers_layout_loads_the_same_model(wan22_diffusers_repo, pipe):
    root, _ = wan22_diffusers_repo
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    other = wan22.load(root, device="cpu", dtype=torch.float32)
    for a, b in [(other.transformer, pipe.transformer), (other.vae, pipe.vae), (other.text_encoder, pipe.text_encoder)]:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(other.vae.mean, pipe.vae.mean) and torch.equal(other.vae.std, pipe.vae.std)


def test_dit_names_round_trip_through_diffusers_converter(refs):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    sd = refs["transformer"].state_dict()
    official = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in sd.items()}
    assert {wan22.rename(k, wan22.DIT_TO_DIFFUSERS) for k in official} == set(sd)  # our two maps are inverses
    back = convert_wan_transformer_to_diffusers(dict(official))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_fp32_checkpoint_loads_as_bf16_piece_by_piece(wan22_repo, monkeypatch):
    root, refs = wan22_repo
    monkeypatch.setattr(wan22, "READ_CHUNK_BYTES", 1000)  # many pieces per tensor, and a last short one
    model = wan22.load_transformer(root, dtype=torch.bfloat16)
    expected = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in refs["transformer"].state_dict().items()}
    kept = {k for k in expected if wan22.keeps_fp32(k)}
    assert {"time_projection.1.weight", "head.head.weight", "blocks.0.modulation", "blocks.1.norm3.bias"} <= kept
    assert "blocks.0.self_attn.q.weight" not in kept and "blocks.0.self_attn.norm_q.weight" in kept
    for key, tensor in model.state_dict().items():
        if key in kept:
            assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[key]), key
        else:
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[key].bfloat16()), key


def test_truncated_shard_is_a_clear_error(wan22_repo, tmp_path):
    import shutil

    shutil.copytree(wan22_repo[0], tmp_path / "repo")
    shard = tmp_path / "repo" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="00002-of-00003"):
        wan22.load_transformer(tmp_path / "repo", dtype=torch.bfloat16)
    vae = tmp_path / "repo" / "Wan2.2_VAE.pth"
    vae.write_bytes(vae.read_bytes()[:1000])
    with pytest.raises(ValueError, match="Wan2.2_VAE.pth is not a readable checkpoint"):
        wan22.load_vae(vae)
    vae.unlink()
    with pytest.raises(FileNotFoundError, match="Wan2.2_VAE.pth"):
        wan22.load(tmp_path / "repo", dtype=torch.float32)


def test_legacy_pth_format_is_read_whole(wan22_repo, tmp_path):
    """torch's pre-zip .pth format cannot be memory-mapped; such a file is read whole rather than refused."""
    sd = torch.load(wan22_repo[0] / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    legacy = wan22.load_umt5(tmp_path / "legacy.pth", dtype=torch.float32)
    mapped = wan22.load_umt5(wan22_repo[0] / "models_t5_umt5-xxl-enc-bf16.pth", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(legacy.state_dict().values(), mapped.state_dict().values()))


# ----------------------------------------------------------------------------------------------------------------------
# Parity of the parts


def test_dit_matches_diffusers_with_per_frame_timesteps(pipe, refs):
    torch.manual_seed(0)
    x = torch.randn(2, 48, 3, 4, 6)
    context = torch.randn(2, 512, 32)
    context[0, 9:], context[1, 30:] = 0, 0  # umT5 states are zero past each prompt
    t = torch.tensor([[0.0, 617.0, 617.0], [999.0, 999.0, 999.0]])  # image-to-video: frame 0 at t = 0
    with torch.no_grad():
        ours = pipe.transformer(x, t, context)
        per_token = t[:, :, None].expand(2, 3, 2 * 3).reshape(2, -1)  # diffusers: one timestep per token
        theirs = refs["transformer"](x, per_token, context, return_dict=False)[0]
        plain = pipe.transformer(x, t[:, 1:2], context)  # one timestep for every token
    assert theirs.abs().mean() > 0.1
    assert rel(ours, theirs) < 2e-5  # the official float64 timestep embedding vs diffusers' float32 one
    assert rel(ours[1], plain[1]) < 1e-6 and rel(ours[0], plain[0]) > 1e-3


def test_velocity_speaks_the_sigma_convention(pipe, refs):
    torch.manual_seed(1)
    x, context = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 512, 32)
    with torch.no_grad():
        v = pipe.velocity(x, 0.7009, {"context": context})
        theirs = refs["transformer"](x, torch.full((1, 8), 700.0), context, return_dict=False)[0]  # int(700.9)
    assert rel(v, theirs) < 2e-5


def test_umt5_matches_transformers(pipe, refs, wan22_diffusers_repo):
    prompts = [*PROMPTS, "", "long " * 600]  # the last is truncated to 512 tokens
    ids, mask = pipe.tokenizer(prompts)
    assert ids.shape == (4, 512) and mask[3].all() and mask[2].sum() == 1  # an empty prompt is just </s>
    from_folder = wan22.load_umt5(wan22_diffusers_repo[0] / "text_encoder", dtype=torch.float32)
    with torch.no_grad():
        theirs = refs["text_encoder"](ids, mask).last_hidden_state * mask[..., None]
        for encoder in (pipe.text_encoder, from_folder):
            ours = encoder(ids, mask)
            assert rel(ours, theirs) < 1e-5
            assert (ours[0, mask[0].sum() :] == 0).all()  # padded positions are zero
    assert torch.equal(pipe.encode_prompt(prompts[:1])["context"][0], ours[0])


@pytest.mark.parametrize("frames", [5, 9])
def test_vae_matches_diffusers(pipe, refs, frames):
    torch.manual_seed(frames)
    pixels = torch.rand(1, 3, frames, 64, 96) * 2 - 1
    check_wan_vae(pipe, refs["vae"], pixels, (1, 48, 1 + (frames - 1) // 4, 4, 6))


def test_chunked_vae_equals_one_shot(pipe):
    """The causal cache makes chunking exact: any split of the frames gives the one-shot result."""
    torch.manual_seed(2)
    pixels = torch.rand(1, 3, 13, 64, 64) * 2 - 1
    with torch.no_grad():
        official = pipe.vae.encode(pixels)  # first frame, then 4 at a time
        for chunk in (8, None):
            assert (pipe.vae.encode(pixels, chunk=chunk) - official).abs().max() < 1e-5
        z = torch.randn(1, 48, 4, 4, 4)
        official = pipe.vae.decode(z)  # one latent frame at a time
        for chunk in (2, 3, None):
            assert (pipe.vae.decode(z, chunk=chunk) - official).abs().max() < 1e-5
    with pytest.raises(ValueError, match="multiple of 4"):
        pipe.vae.encode(pixels, chunk=3)
    with pytest.raises(ValueError, match="4k"):
        pipe.vae.encode(pixels[:, :, :6])


def test_tiled_vae_within_tolerance(pipe):
    """Tiles see less of the frame than the whole (the mid-block attention is global per frame), so tiled decoding is
    not exact: with 6-latent tiles overlapping by 2, this model's pixels stay within 0.1 of the untiled ones (mean
    error < 0.01, pixels in [-1, 1]); tiled encoding's latents within 0.1 (mean < 5% of their mean magnitude). A tile
    as large as the frame is the untiled result exactly."""
    torch.manual_seed(3)
    z = torch.randn(1, 48, 2, 8, 8)
    pixels = torch.rand(1, 3, 5, 128, 128) * 2 - 1
    with torch.no_grad():
        full, tiled = pipe.decode(z), pipe.decode(z, tile=6, overlap=2)
        assert torch.equal(pipe.decode(z, tile=8), full)
        encoded, encoded_tiled = pipe.encode(pixels), pipe.encode(pixels, tile=6, overlap=2)
    error = (tiled - full).abs()
    assert 0 < error.mean() < 0.01 and error.max() < 0.1
    error = (encoded_tiled - encoded).abs()
    assert 0 < error.mean() < 0.05 * encoded.abs().mean() and error.max() < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# Schedule and first-frame preparation (the official rules)


def test_schedule_is_the_official_one():
    sigmas = wan22.schedule(50, 5.0)
    # The official scheduler: np.linspace(float32(0.999), 0, 51)[:-1], shifted by 5 s / (1 + 4 s), float32, then 0.
    grid = np.linspace(np.float32(0.999).item(), 0, 51)[:-1]
    official = 5 * grid / (1 + 4 * grid)
    assert torch.allclose(sigmas[:-1].double(), torch.from_numpy(official), rtol=0, atol=1e-7) and sigmas[-1] == 0
    timesteps = wan22.model_timestep(sigmas[:-1]).long().tolist()
    assert timesteps == (official * 1000).astype(np.int64).tolist()
    assert [round(s, 4) for s in sigmas[:3].tolist()] == [0.9998, 0.9957, 0.9915]
    assert round(sigmas[-2].item(), 4) == 0.0925


def test_best_output_size_and_first_frame():
    # 1920x1080 into the 1280x704 area: width-first rounding (1248x704) is closer to 16:9 than 1280x704.
    assert wan22.best_output_size(1920, 1080, 32, 32, 1280 * 704) == (1248, 704)
    assert wan22.best_output_size(704, 1280, 32, 32, 1280 * 704) == (704, 1280)
    frame = wan22.first_frame(random_image(300, 200), 64, 96)  # 3:2 into the 64x96 area: 96x64 (w x h)
    assert frame.shape == (1, 3, 64, 96) and -1 <= frame.min() and frame.max() <= 1
    with pytest.raises(ValueError, match="first-frame image"):
        wan22.first_frame(__file__, 64, 64)


def test_clean_prompt_matches_diffusers():
    """Wan's cleaning (ftfy, double HTML unescape, whitespace) as diffusers' WanPipeline reimplements it."""
    pytest.importorskip("ftfy", reason="ftfy is optional: without it the cleaning skips ftfy.fix_text, as diffusers")
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = VARIED_PROMPTS + random_prompts(200, seed=5) + ["a&amp;amp;b", "x\x1cy\x1f z", "“quoted” ﬁne"]
    for prompt in prompts:
        assert wan22.clean_prompt(prompt) == prompt_clean(prompt), repr(prompt)


def test_tokenizer_matches_transformers_on_the_real_vocabulary():
    path = TOKENIZERS / "umt5_xxl" / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"real umT5 tokenizer not found at {path}")
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean
    from transformers import T5TokenizerFast

    chinese = [
        "一只可爱的小猫在阳光明媚的草地上奔跑",
        "夕阳下的海滩，海浪轻轻拍打着岸边，电影感，4K",
        "赛博朋克风格的城市夜景，霓虹灯闪烁，雨后的街道倒映着灯光",
        "一位穿着红色汉服的女孩在樱花树下跳舞，慢动作",
        wan22.NEGATIVE_PROMPT,
        "中英混合 prompt: a dragon 飞过 the mountains，水墨画风格",
    ]
    prompts = chinese + VARIED_PROMPTS + random_prompts(100, seed=7)
    assert len(prompts) >= 50
    ours = wan22.UMT5Tokenizer(path)
    ref = T5TokenizerFast(tokenizer_file=str(path))  # what the official code's AutoTokenizer gives for google/umt5-xxl
    ids, mask = ours(prompts)
    expected = ref([prompt_clean(p) for p in prompts], padding="max_length", max_length=512, truncation=True)
    for i, prompt in enumerate(prompts):
        assert ids[i].tolist() == expected.input_ids[i], f"umT5 ids differ for {prompt!r}"
        assert mask[i].tolist() == expected.attention_mask[i]
    assert ids[0, : mask[0].sum()].tolist()[-1] == 1  # </s>


# ----------------------------------------------------------------------------------------------------------------------
# The whole pipeline against diffusers' WanPipeline / WanImageToVideoPipeline, from the same noise


def test_text_to_video_matches_diffusers(pipe, refs):
    ref = diffusers_wan_pipeline(refs)
    noise = torch.randn(2, 48, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    negative = ["blurry", "低质量"]
    kw = dict(noise=noise, steps=4, sigmas=diffusers_sigmas(4), output="latent", progress=False)
    ours = pipe.generate(PROMPTS, negative_prompt=negative, **kw)
    with torch.no_grad():
        theirs = ref(
            prompt=PROMPTS,
            negative_prompt=negative,
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=4,
            guidance_scale=5.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
    assert rel(ours, theirs) < 1e-4
    no_cfg = pipe.generate(PROMPTS, cfg=1.0, **kw)
    assert rel(ours, no_cfg) > 1e-2


def test_image_to_video_matches_diffusers(pipe, refs):
    ref = diffusers_wan_pipeline(refs, image_to_video=True)
    image = random_image(96, 64)
    noise = torch.randn(1, 48, 3, 4, 6, generator=torch.Generator().manual_seed(4))
    kw = dict(noise=noise, steps=4, sigmas=diffusers_sigmas(4), negative_prompt="blurry", progress=False)
    ours = pipe.generate(PROMPTS[0], image=image, height=64, width=96, output="latent", **kw)
    with torch.no_grad():
        theirs = ref(
            image=image,
            prompt=PROMPTS[0],
            negative_prompt="blurry",
            height=64,
            width=96,
            num_frames=9,
            num_inference_steps=4,
            guidance_scale=5.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
    assert rel(ours, theirs) < 1e-4
    first = pipe.encode(wan22.first_frame(image, 64, 96))
    assert torch.equal(ours[:, :, :1], first)  # latent frame 0 is the image's
    text_only = pipe.generate(PROMPTS[0], output="latent", **kw)
    assert rel(ours[:, :, 1:], text_only[:, :, 1:]) > 1e-2  # and it conditions the other frames
    video_frames = pipe.generate(PROMPTS[0], images=[image], height=64, width=96, output="np", **kw)
    assert video_frames.shape == (1, 9, 64, 96, 3) and video_frames.dtype == np.uint8


def test_empty_negative_prompt_means_the_official_one(pipe):
    kw = dict(height=64, width=64, frames=5, steps=1, seed=1, output="latent", progress=False)
    official = pipe.generate("a cat", negative_prompt=wan22.NEGATIVE_PROMPT, **kw)
    assert torch.equal(pipe.generate("a cat", **kw), official)


def test_batch_equals_one_at_a_time(pipe):
    kw = dict(height=64, width=64, frames=5, steps=2, output="latent", progress=False, negative_prompt="blurry")
    batch = pipe.generate(PROMPTS, seed=[3, 4], **kw)
    alone = torch.cat([pipe.generate(p, seed=s, **kw) for p, s in zip(PROMPTS, [3, 4])])
    assert rel(batch, alone) < 1e-5


def test_bad_arguments(pipe):
    kw = dict(steps=1, progress=False, output="latent")
    with pytest.raises(ValueError, match="4k \\+ 1"):
        pipe.generate("x", height=64, width=64, frames=10, **kw)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe.generate("x", height=48, width=64, frames=5, **kw)
    with pytest.raises(ValueError, match="one image"):
        pipe.generate("x", images=[random_image(64, 64), random_image(64, 64)], frames=5, **kw)
    with pytest.raises(ValueError, match="no distilled guidance"):
        pipe.generate("x", guidance=3.5, **kw)
    with pytest.raises(ValueError, match="no image-to-image"):
        pipe.generate("x", init_image=random_image(64, 64), **kw)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA


def velocity_both(pipe, ref_transformer):
    torch.manual_seed(6)
    x, context = torch.randn(1, 48, 2, 4, 4), torch.randn(1, 512, 32)
    with torch.no_grad():
        ours = pipe.velocity(x, 0.5, {"context": context})
        theirs = ref_transformer(x, torch.full((1,), 500.0), context, return_dict=False)[0]
    return ours, theirs


def test_trained_lora_loads_in_diffusers(wan22_repo, refs, tmp_path):
    from diffusers import WanPipeline

    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    names = lora.add_lora(pipe.transformer, wan22.LORA_TARGETS, rank=4, alpha=8.0)
    assert len(names) == 10 * 2
    with torch.no_grad():
        for p in lora.lora_parameters(pipe.transformer):
            p.normal_(0, 0.3)
    path = tmp_path / "wan_lora.safetensors"
    lora.save(pipe.transformer, path, wan22.LORA_FORMAT, wan22.LORA_METADATA, dtype=torch.float32)
    with safe_open(path, "pt") as f:
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in f.keys()
        assert f.metadata()["modelspec.architecture"] == "wan2.1/lora"
    ref = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=copy.deepcopy(refs["transformer"])
    )
    ref.load_lora_weights(path)
    ours, theirs = velocity_both(pipe, ref.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, velocity_both(pipe, refs["transformer"])[1]) > 1e-2
    fresh = wan22.load(wan22_repo[0], dtype=torch.float32)
    assert len(fresh.load_lora(path)) == 20 and rel(velocity_both(fresh, refs["transformer"])[0], ours) < 1e-6


@pytest.mark.parametrize("family", ["musubi", "peft", "comfy", "onetrainer"])
def test_loras_from_the_wild(wan22_repo, refs, tmp_path, family):
    """The same LoRA written as musubi-tuner (lora_unet_ + alpha), diffusers/PEFT (transformer. + diffusers names),
    ComfyUI (diffusion_model. + Wan names) or OneTrainer (lora_transformer_ + diffusers names) gives our model what
    diffusers gives its own with the file (with the PEFT file for OneTrainer's, which diffusers does not read)."""
    from diffusers import WanPipeline

    parts = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]
    modules = [f"blocks.{i}.{part}" for i in range(2) for part in parts]
    g = torch.Generator().manual_seed(8)
    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    layers = dict(pipe.transformer.named_modules())
    shapes = {m: (layers[m].in_features, layers[m].out_features) for m in modules}
    pairs = {m: (0.3 * torch.randn(4, i, generator=g), torch.randn(o, 4, generator=g)) for m, (i, o) in shapes.items()}
    state, peft = {}, {}
    for name, (a, b) in pairs.items():
        if family == "musubi":  # every module with an alpha: diffusers' musubi converter requires it
            key = "lora_unet_" + name.replace(".", "_")
            state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b * 2, f"{key}.alpha": torch.tensor(2.0)}
        elif family == "onetrainer":
            key = "lora_transformer_" + wan22.rename(name, wan22.DIT_TO_DIFFUSERS).replace(".", "_")
            state |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b * 2, f"{key}.alpha": torch.tensor(2.0)}
        elif family == "comfy":
            state |= {f"diffusion_model.{name}.lora_A.weight": a, f"diffusion_model.{name}.lora_B.weight": b}
        peft_key = "transformer." + wan22.rename(name, wan22.DIT_TO_DIFFUSERS)
        peft |= {f"{peft_key}.lora_A.weight": a, f"{peft_key}.lora_B.weight": b}
    save_file(state or peft, path := tmp_path / f"{family}.safetensors")
    save_file(peft, tmp_path / "peft-ref.safetensors")
    assert len(pipe.load_lora(path, scale=0.7)) == len(modules)
    ref = WanPipeline(
        tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=copy.deepcopy(refs["transformer"])
    )
    ref.load_lora_weights(tmp_path / "peft-ref.safetensors" if family == "onetrainer" else path, adapter_name="x")
    ref.set_adapters("x", 0.7)
    ours, theirs = velocity_both(pipe, ref.transformer)
    assert rel(ours, theirs) < 1e-5
    assert rel(theirs, velocity_both(pipe, refs["transformer"])[1]) > 1e-2


# ----------------------------------------------------------------------------------------------------------------------
# sample.py end to end


def run_sample(repo, out, *extra):
    common = ["--weights", str(repo), "--size", "96x64", "--frames", "5", "--steps", "2", "--device", "cpu", "--quiet"]
    return sample.main(["wan22", "a red fox", "--seed", "3", "--out", str(out), *common, *extra])


def test_sample_writes_a_playable_mp4(wan22_repo, tmp_path, capsys):
    pytest.importorskip("av", reason="reading the MP4 back needs PyAV (requirements-video.txt)")
    assert run_sample(wan22_repo[0], tmp_path, "--fps", "12") == 0
    (path,) = tmp_path.glob("*.mp4")
    assert path.name == "00000-3.mp4" and "wrote 1 video(s)" in capsys.readouterr().out
    frames, fps, meta = video.read_video(path)
    assert frames.shape == (5, 64, 96, 3) and fps == 12
    assert meta["prompt"] == "a red fox" and meta["frames"] == 5 and meta["fps"] == 12 and meta["size"] == "96x64"
    assert meta["variant"] == "wan22-ti2v-5b" and meta["solver"] == "unipc" and meta["cfg"] == 5.0
    import av

    with av.open(str(path)) as container:  # H.264, as players expect
        assert container.streams.video[0].codec_context.name == "h264"
    # The same settings give the frames generate() gives, up to H.264's loss (the tiny model's pixel noise is what
    # 4:2:0 chroma and CRF 18 drop first, so 8x8 block averages are compared).
    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    direct = pipe.generate("a red fox", height=64, width=96, frames=5, steps=2, seed=3, output="np", progress=False)
    blocks = lambda v: v.astype(float).reshape(5, 8, 8, 12, 8, 3).mean(axis=(2, 4))  # noqa: E731
    assert np.abs(blocks(direct[0]) - blocks(frames)).mean() < 3


def test_sample_image_to_video_and_webp_fallback(wan22_repo, tmp_path, monkeypatch):
    image = tmp_path / "first.png"
    random_image(300, 200).save(image)
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")  # neither PyAV nor imageio-ffmpeg
    assert run_sample(wan22_repo[0], tmp_path / "out", "--image", str(image)) == 0
    (path,) = (tmp_path / "out").glob("*")
    assert path.suffix == ".webp"
    frames, fps, meta = video.read_video(path)
    assert frames.shape == (5, 64, 96, 3) and round(fps) == 24  # 3:2 image into the 96x64 area
    assert meta["images"] == str(image) and meta["fps"] == 24


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--frames", "10"], "--frames 10: must be 4k+1"),
        (["--image", "/no/such/first.png"], "cannot read --image /no/such/first.png"),
        (["--size", "100x64"], "multiples of 32"),
        (["--fps", "0"], "--fps 0.0: must be positive"),
    ],
)
def test_sample_bad_input_gets_one_line(wan22_repo, tmp_path, capsys, args, needle):
    assert run_sample(wan22_repo[0], tmp_path, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
    assert not list(tmp_path.glob("*"))


def test_sample_frames_on_an_image_model_is_refused(capsys):
    assert sample.main(["flux1", "x", "--frames", "5", "--device", "cpu"]) == 2
    assert "video models" in capsys.readouterr().err


def test_sample_out_file_names(wan22_repo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")
    assert run_sample(wan22_repo[0], tmp_path / "fox.png") == 2  # checked before loading
    assert "this model writes .mp4 files" in capsys.readouterr().err
    assert run_sample(wan22_repo[0], tmp_path / "fox.mp4") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["fox.webp"]  # the fallback container, beside the name given


@pytest.mark.parametrize("mode", ["int8", "model", "blocks"])
def test_sample_int8_and_offload(wan22_repo, tmp_path, monkeypatch, mode):
    """--offload gives the video of the plain run; --int8 a close one (the tiny model's linears are 48-64 wide, so the
    test quantises from 16 features up)."""
    import int8

    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.extend(original(m, min_features=16)) or quantized)
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")  # lossless enough to compare
    assert run_sample(wan22_repo[0], tmp_path / "plain") == 0
    extra = ["--int8"] if mode == "int8" else ["--offload", mode]
    assert run_sample(wan22_repo[0], tmp_path / mode, *extra) == 0
    plain, other = (video.read_video(next((tmp_path / d).glob("*")))[0].astype(int) for d in ("plain", mode))
    if mode == "int8":
        assert "blocks.0.self_attn.q" in quantized and "head.head" not in quantized
        assert 0 < np.abs(plain - other).mean() < 20
    else:
        assert np.abs(plain - other).max() <= 1


def test_block_streaming_and_model_offload_keep_every_weight_on_the_device(wan22_repo):
    """The DiT's blocks stream and the other parts (umT5, VAE encoder/decoder) are offloaded; every leaf computes with a
    device copy (a weight read outside its module's forward would be caught)."""
    from test_offload import OnDeviceCheck, all_packs

    import offload

    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    kw = dict(height=64, width=64, frames=5, steps=2, seed=1, output="pt", progress=False)
    image = random_image(64, 64)
    ref = pipe.generate("a cat", image=image, **kw)
    streamer = offload.enable_block_streaming(pipe.transformer, "cpu")
    handler = offload.enable_model_offload(pipe, "cpu")
    assert list(streamer.packs) == ["blocks.0", "blocks.1"]
    assert set(handler.packs) == {"text_encoder", "vae.encoder", "vae.conv1", "vae.conv2", "vae.decoder"}
    # The VAE's 1x1 quant convolutions are components by themselves; a global pre-hook runs before their own offload
    # hook, so the check leaves them out (their loads are in the log below).
    leaves = [p for name in ("vae.conv1", "vae.conv2") for p in handler.packs[name]]
    packs = [p for p in all_packs(streamer) + all_packs(handler) if all(p is not q for q in leaves)]
    with OnDeviceCheck(packs) as check:
        out = pipe.generate("a cat", image=image, **kw)
    assert rel(out, ref) < 1e-5 and check.ran > 50 and not check.bad, check.bad
    assert streamer.blocks_on_device == [] and handler.on_device() == []
    assert {k for e, k in handler.log if e == "load"} == set(handler.packs)
    assert [k for e, k in handler.log if e == "load"].count("vae.decoder") == 1  # one call decodes every chunk
    offload.disable_model_offload(pipe)
    offload.disable_block_streaming(pipe.transformer)


def test_settings_metadata_is_json(wan22_repo, tmp_path, monkeypatch):
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")
    assert run_sample(wan22_repo[0], tmp_path, "--negative", "blurry", "--cfg", "3") == 0
    (path,) = tmp_path.glob("*")
    meta = video.read_video(path)[2]
    assert json.loads(json.dumps(meta)) == meta and meta["negative_prompt"] == "blurry" and meta["cfg"] == 3.0
