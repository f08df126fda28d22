"""Wan2.2 A14B (T2V and I2V, two experts) and the Wan2.1 VAE: official-layout loading, the expert switch at the official
boundary, parity with diffusers' WanPipeline / WanImageToVideoPipeline / AutoencoderKLWan fed the same weights (fp32,
tiny configs), LoRA pairs, offloading one expert at a time, and sample.py end to end."""

import copy

import numpy as np
import pytest
import torch
from fakes import (
    check_wan_vae,
    diffusers_sigmas,
    diffusers_wan_a14b_pipeline,
    random_image,
    rel,
    tiny_wan_vae,
    wan21_vae_tiny_config,
    write_wan22_a14b_repo,
)
from safetensors.torch import save_file

import offload
import sample
import video
import wan22

PROMPT = "a red fox running through fresh snow"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t2v(wan22_t2v_a14b_repo):
    return wan22.load(wan22_t2v_a14b_repo[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def i2v(wan22_i2v_a14b_repo):
    return wan22.load(wan22_i2v_a14b_repo[0], device="cpu", dtype=torch.float32)


def same_weights(a: torch.nn.Module, b: dict) -> bool:
    sa = a.state_dict()
    return sa.keys() == b.keys() and all(torch.equal(sa[k], b[k]) for k in sa)


def official_names(model) -> dict:
    return {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in model.state_dict().items()}


def record_experts(pipe) -> tuple[list, list]:
    """Forward pre-hooks on both experts: (expert name, integer timestep of the first sample) per call."""
    calls = []
    hooks = [
        expert.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, int(args[1].flatten()[0]))))
        for name, expert in pipe.experts().items()
    ]
    return calls, hooks


# ----------------------------------------------------------------------------------------------------------------------
# Loading and the official defaults


def test_official_layouts_load_both_experts(wan22_t2v_a14b_repo, wan22_i2v_a14b_repo, t2v, i2v):
    for (root, refs), pipe, kind in ((wan22_t2v_a14b_repo, t2v, "t2v"), (wan22_i2v_a14b_repo, i2v, "i2v")):
        assert (root / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert (root / "low_noise_model" / "config.json").is_file() and (root / "Wan2.1_VAE.pth").is_file()
        assert wan22.detect_variant(root) == pipe.variant == f"wan22-{kind}-a14b"
        # load_into refused any missing or unexpected key; every tensor also arrived in its place, each expert its own.
        assert same_weights(pipe.transformer, official_names(refs["transformer"]))
        assert same_weights(pipe.transformer_2, official_names(refs["transformer_2"]))
        assert not torch.equal(pipe.transformer.blocks[0].ffn[0].weight, pipe.transformer_2.blocks[0].ffn[0].weight)
        assert pipe.transformer.params.in_dim == (36 if kind == "i2v" else 16) and pipe.transformer.params.out_dim == 16
        assert same_weights(pipe.vae, wan22.vae_from_diffusers(refs["vae"].state_dict()))
        assert pipe.vae.params == wan22.VAEParams(8, 8, 16, (1, 2, 4, 4), 2, (False, True, True), 1, residual=False)
        assert pipe.vae.stride == 8 and pipe.pixels_per_token == 16
        assert torch.equal(pipe.vae.mean, torch.tensor(wan22.WAN21_VAE_MEAN))


def test_diffusers_layout_loads_the_same_model(tmp_path, t2v):
    refs = write_wan22_a14b_repo(tmp_path, "t2v", layout="diffusers")
    other = wan22.load(tmp_path, dtype=torch.float32)
    assert other.variant == "wan22-t2v-a14b"
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert same_weights(getattr(other, name), getattr(t2v, name).state_dict()), name
    assert same_weights(other.transformer, official_names(refs["transformer"]))


def test_a_folder_of_another_variant_is_named(wan22_repo, wan22_t2v_a14b_repo, wan22_i2v_a14b_repo):
    with pytest.raises(ValueError, match="holds the wan22-t2v-a14b model, not wan22-ti2v-5b"):
        wan22.load(wan22_t2v_a14b_repo[0], variant="wan22-ti2v-5b", dtype=torch.float32)
    with pytest.raises(ValueError, match="holds the wan22-ti2v-5b model, not wan22-i2v-a14b"):
        wan22.load(wan22_repo[0], variant="wan22-i2v-a14b", dtype=torch.float32)
    with pytest.raises(ValueError, match="holds the wan22-i2v-a14b model, not wan22-t2v-a14b"):
        wan22.load(wan22_i2v_a14b_repo[0], variant="wan22-t2v-a14b", dtype=torch.float32)


def test_official_sampling_defaults():
    """Wan-Video/Wan2.2 configs/wan_t2v_A14B.py, wan_i2v_A14B.py (sample_shift, sample_steps, boundary,
    sample_guide_scale = (low noise, high noise)), shared_config.py (81 frames at 16 fps), generate.py (--size 1280*720
    = width x height)."""
    t, i = wan22.VARIANTS["wan22-t2v-a14b"], wan22.VARIANTS["wan22-i2v-a14b"]
    assert (t.repo, t.shift, t.steps, t.boundary, t.cfg) == ("Wan-AI/Wan2.2-T2V-A14B", 12.0, 40, 0.875, (3.0, 4.0))
    assert (i.repo, i.shift, i.steps, i.boundary, i.cfg) == ("Wan-AI/Wan2.2-I2V-A14B", 5.0, 40, 0.9, (3.5, 3.5))
    for v in (t, i):
        assert (v.frames, v.fps, v.size, v.solver, v.vae_file) == (81, 16, (720, 1280), "unipc", "Wan2.1_VAE.pth")
    assert wan22.component_files(t) == [
        "high_noise_model/*",
        "low_noise_model/*",
        "Wan2.1_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl/*",
    ]


# ----------------------------------------------------------------------------------------------------------------------
# The Wan2.1 VAE


def test_wan21_vae_names_round_trip_through_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    sd = tiny_wan_vae(3, wan21_vae_tiny_config()).state_dict()
    official = wan22.vae_from_diffusers(sd)
    assert "decoder.upsamples.4.shortcut.weight" in official and "decoder.upsamples.11.resample.1.weight" in official
    back = convert_wan_vae_to_diffusers(dict(official))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("frames", [5, 9])
def test_wan21_vae_matches_diffusers(t2v, wan22_t2v_a14b_repo, frames):
    torch.manual_seed(frames)
    pixels = torch.rand(1, 3, frames, 32, 48) * 2 - 1
    check_wan_vae(t2v, wan22_t2v_a14b_repo[1]["vae"], pixels, (1, 16, 1 + (frames - 1) // 4, 4, 6))


def test_wan21_vae_chunked_and_tiled(t2v):
    """Chunked encoding/decoding through the causal cache is exact; tiled decoding stays close (see the TI2V test)."""
    torch.manual_seed(4)
    pixels = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    z = torch.randn(1, 16, 3, 8, 8)
    with torch.no_grad():
        official = t2v.vae.encode(pixels)
        assert (t2v.vae.encode(pixels, chunk=None) - official).abs().max() < 1e-5
        one_by_one = t2v.vae.decode(z)
        for chunk in (2, None):
            assert (t2v.vae.decode(z, chunk=chunk) - one_by_one).abs().max() < 1e-5
        assert torch.equal(t2v.vae.decode(z, tile=8), one_by_one)
        error = (t2v.vae.decode(z, tile=6, overlap=2) - one_by_one).abs()
    assert 0 < error.mean() < 0.01 and error.max() < 0.1


# ----------------------------------------------------------------------------------------------------------------------
# The expert switch


def official_timesteps(steps: int, shift: float) -> list[int]:
    """The official UniPC scheduler's timesteps (wan/utils/fm_solvers_unipc.py set_timesteps), written out: the
    float32 training grid's largest sigma (0.999) down to 0 in steps + 1 points, the last dropped, shifted, times
    1000, cast to int64."""
    grid = np.linspace(np.float32(0.999).item(), 0, steps + 1)[:-1]
    return (shift * grid / (1 + (shift - 1) * grid) * 1000).astype(np.int64).tolist()


@pytest.mark.parametrize(
    "kind, steps, shift",
    [
        ("t2v", 40, 12.0),  # the official defaults
        ("t2v", 10, 5.0),
        ("t2v", 27, 12.0),  # step 17's timestep is exactly 875: the official rule (>=) gives it to the high expert
        ("t2v", 20, 3.0),
        ("i2v", 40, 5.0),  # the official defaults
        ("i2v", 21, 10.0),  # step 11's timestep is exactly 900
        ("i2v", 15, 3.0),
    ],
)
def test_expert_switch_follows_the_official_rule(t2v, i2v, kind, steps, shift):
    """Each step runs the expert the official code picks (`t.item() >= boundary * num_train_timesteps` on the
    scheduler's integer timestep), seen from the calls the experts actually get during generate()."""
    pipe = t2v if kind == "t2v" else i2v
    boundary = 1000 * pipe.defaults.boundary
    expected_t = official_timesteps(steps, shift)
    calls, hooks = record_experts(pipe)
    kw = dict(frames=1, height=32, width=32, steps=steps, shift=shift, cfg=1.0, output="latent", progress=False)
    try:
        pipe.generate(PROMPT, image=torch.zeros(1, 3, 32, 32) if kind == "i2v" else None, **kw)
    finally:
        for hook in hooks:
            hook.remove()
    assert [t for _, t in calls] == expected_t
    assert [name for name, _ in calls] == ["high" if t >= boundary else "low" for t in expected_t]
    switch = next(i for i, t in enumerate(expected_t) if t < boundary)
    assert 0 < switch < steps and [n for n, _ in calls].index("low") == switch
    if (kind, steps) in (("t2v", 27), ("i2v", 21)):
        assert expected_t[switch - 1] == boundary  # at the boundary: still the high-noise expert


def test_a_batch_across_the_boundary_goes_to_both_experts(t2v):
    torch.manual_seed(5)
    x, context = torch.randn(2, 16, 2, 4, 4), torch.randn(2, 512, 32)
    sigma = torch.tensor([0.9375, 0.375])  # exact in binary: timesteps 937 and 375
    with torch.no_grad():
        both = t2v.velocity(x, sigma, {"context": context})
        alone = [t2v.velocity(x[i : i + 1], sigma[i : i + 1], {"context": context[i : i + 1]}) for i in range(2)]
        high = t2v.transformer(x[:1], torch.tensor([[937.0]]), context[:1])
    assert torch.equal(both, torch.cat(alone)) and torch.equal(alone[0], high)
    assert t2v.high_noise(sigma).tolist() == [True, False] and t2v.high_noise(0.875).tolist() == [True]


# ----------------------------------------------------------------------------------------------------------------------
# Whole pipelines against diffusers, from the same noise


def test_text_to_video_matches_diffusers(t2v, wan22_t2v_a14b_repo):
    """Two experts and two guidance scales: diffusers' transformer / guidance_scale above boundary_ratio 0.875,
    transformer_2 / guidance_scale_2 below; ours the official (low, high) = (3, 4) pair."""
    ref = diffusers_wan_a14b_pipeline(wan22_t2v_a14b_repo[1], "t2v", shift=12.0)
    noise = torch.randn(2, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    kw = dict(noise=noise, steps=6, sigmas=diffusers_sigmas(6, 12.0), output="latent", progress=False)
    calls, hooks = record_experts(t2v)
    ours = t2v.generate([PROMPT, "一只小猫"], negative_prompt=["blurry", ""], **kw)
    for hook in hooks:
        hook.remove()
    assert [n for n, _ in calls] == ["high"] * 8 + ["low"] * 4  # 4 steps above the boundary, 2 below; CFG: 2 calls
    with torch.no_grad():
        theirs = ref(
            prompt=[PROMPT, "一只小猫"],
            negative_prompt=["blurry", wan22.NEGATIVE_PROMPT],
            height=32,
            width=32,
            num_frames=5,
            num_inference_steps=6,
            guidance_scale=4.0,
            guidance_scale_2=3.0,
            latents=noise.clone(),
            output_type="latent",
        ).frames
    assert rel(ours, theirs) < 1e-4
    assert rel(t2v.generate([PROMPT, "一只小猫"], cfg=(4.0, 3.0), negative_prompt="blurry", **kw), ours) > 1e-2


def test_image_to_video_matches_diffusers(i2v, wan22_i2v_a14b_repo):
    """The 36-channel input: noisy latents, the 4-channel frame mask, the latents of the first frame followed by zero
    frames. The image is at the output size, so both pipelines' resizing leaves it as it is."""
    ref = diffusers_wan_a14b_pipeline(wan22_i2v_a14b_repo[1], "i2v", shift=5.0)
    image = random_image(96, 64)
    noise = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(4))
    kw = dict(noise=noise, steps=6, sigmas=diffusers_sigmas(6, 5.0), negative_prompt="blurry", progress=False)
    calls, hooks = record_experts(i2v)
    ours = i2v.generate(PROMPT, image=image, height=64, width=96, cfg=(2.5, 4.5), output="latent", **kw)
    for hook in hooks:
        hook.remove()
    assert [n for n, _ in calls] == ["high"] * 6 + ["low"] * 6
    with torch.no_grad():
        theirs = ref(
            image=image,
            prompt=PROMPT,
            negative_prompt="blurry",
            height=64,
            width=96,
            num_frames=9,
            num_inference_steps=6,
            guidance_scale=4.5,
            guidance_scale_2=2.5,
            latents=noise.clone(),
            output_type="latent",
        ).frames
    assert rel(ours, theirs) < 1e-4
    condition = i2v.image_condition(wan22.i2v_first_frame(image, 64, 96), 9)
    assert condition.shape == (1, 20, 3, 8, 12) and condition[:, :4, 0].eq(1).all() and condition[:, :4, 1:].eq(0).all()
    assert rel(i2v.generate(PROMPT, image=torch.zeros(1, 3, 64, 96), output="latent", **kw), ours) > 1e-2


def test_first_frame_sizes_follow_the_official_rule():
    """image2video.py: latent sides sqrt(area * h/w) // 8 // 2 * 2 (and the same with w/h), the image scaled
    bicubically, not cropped."""
    assert wan22.i2v_first_frame(random_image(1920, 1080), 720, 1280).shape == (1, 3, 720, 1280)
    assert wan22.i2v_first_frame(random_image(1000, 1000), 720, 1280).shape == (1, 3, 960, 960)  # sqrt(921600)
    # 832x480: sqrt(921600 * 480 / 832) = 729.2 -> 91 -> 90 latent rows; sqrt(921600 * 832 / 480) = 1263.9 -> 157 -> 156
    assert wan22.i2v_first_frame(random_image(832, 480), 720, 1280).shape == (1, 3, 720, 1248)
    image = random_image(96, 64)
    frame = wan22.i2v_first_frame(image, 64, 96)  # already the size: bicubic at scale 1 changes nothing
    expected = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert frame.shape == (1, 3, 64, 96) and (frame - expected).abs().max() < 1e-6


def test_image_rules(t2v, i2v, wan22_repo):
    kw = dict(frames=1, height=32, width=32, steps=1, output="latent", progress=False)
    with pytest.raises(ValueError, match="makes a video from a first frame"):
        i2v.generate(PROMPT, **kw)
    with pytest.raises(ValueError, match="is text-to-video"):
        t2v.generate(PROMPT, image=random_image(32, 32), **kw)
    with pytest.raises(ValueError, match="multiples of 16"):
        t2v.generate(PROMPT, frames=1, height=40, width=32, steps=1, output="latent", progress=False)
    with pytest.raises(ValueError, match="first frame's condition"):
        i2v.velocity(torch.zeros(1, 16, 1, 4, 4), 0.5, {"context": torch.zeros(1, 512, 32)})
    five = wan22.load(wan22_repo[0], dtype=torch.float32)
    with pytest.raises(ValueError, match="two-expert"):
        five.generate(PROMPT, cfg=(3.0, 4.0), frames=1, height=64, width=64, steps=1, output="latent", progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# LoRA pairs, offloading, INT8


def test_lora_files_go_to_the_expert_they_name(t2v, wan22_t2v_a14b_repo, tmp_path):
    root = wan22_t2v_a14b_repo[0]
    pipe = wan22.load(root, dtype=torch.float32)
    g = torch.Generator().manual_seed(9)
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": 0.3 * torch.randn(4, 48, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(48, 4, generator=g),
    }
    for name in ("style_high_noise", "style_low_noise", "style"):
        save_file(state, tmp_path / f"{name}.safetensors")
    assert pipe.load_lora(tmp_path / "style_high_noise.safetensors") == ["transformer.blocks.0.self_attn.q"]
    assert pipe.load_lora(tmp_path / "style_low_noise.safetensors") == ["transformer_2.blocks.0.self_attn.q"]
    assert len(pipe.load_lora(tmp_path / "style.safetensors", expert="low")) == 1
    assert pipe.load_lora(tmp_path / "style.safetensors") == [
        "transformer.blocks.0.self_attn.q",
        "transformer_2.blocks.0.self_attn.q",
    ]
    from diffusers import WanPipeline

    ref = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        transformer=copy.deepcopy(wan22_t2v_a14b_repo[1]["transformer"]),
        transformer_2=copy.deepcopy(wan22_t2v_a14b_repo[1]["transformer_2"]),
        boundary_ratio=0.875,
    )
    ref.load_lora_weights(tmp_path / "style_high_noise.safetensors", adapter_name="high")
    ref.load_lora_weights(tmp_path / "style_low_noise.safetensors", adapter_name="low", load_into_transformer_2=True)
    fresh = wan22.load(root, dtype=torch.float32)
    fresh.load_lora(tmp_path / "style_high_noise.safetensors")
    fresh.load_lora(tmp_path / "style_low_noise.safetensors")
    torch.manual_seed(6)
    x, context = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 512, 32)
    with torch.no_grad():
        for sigma, theirs in ((0.9375, ref.transformer), (0.3125, ref.transformer_2)):  # exact: timesteps 937, 312
            ours = fresh.velocity(x, sigma, {"context": context})
            expected = theirs(x, torch.tensor([float(int(sigma * 1000))]), context, return_dict=False)[0]
            assert rel(ours, expected) < 1e-5 and rel(ours, t2v.velocity(x, sigma, {"context": context})) > 1e-3


def test_a_lora_for_both_experts_is_read_once(wan22_t2v_a14b_repo, tmp_path, capsys):
    """A file for both experts and the umT5: each expert and the umT5 take their layers, with no warning about the
    umT5's (the file is read and checked once, not once per expert); a strict load that must fail changes nothing."""
    root = wan22_t2v_a14b_repo[0]
    pipe = wan22.load(root, dtype=torch.float32)
    g = torch.Generator().manual_seed(10)
    state = {
        "diffusion_model.blocks.0.self_attn.q.lora_A.weight": 0.3 * torch.randn(4, 48, generator=g),
        "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(48, 4, generator=g),
        "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight": 0.3 * torch.randn(4, 32, generator=g),
        "text_encoder.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight": torch.randn(32, 4, generator=g),
    }
    save_file(state, tmp_path / "both.safetensors")
    save_file({**state, "diffusion_model.no_such_layer.lora_A.weight": torch.ones(4, 48)}, tmp_path / "bad.safetensors")
    torch.manual_seed(6)
    x, context = torch.randn(1, 16, 2, 4, 4), torch.randn(1, 512, 32)
    with torch.no_grad():
        before = [pipe.velocity(x, sigma, {"context": context}) for sigma in (0.9375, 0.3125)]
        with pytest.raises(ValueError, match="1 of 5 tensors not applied"):
            pipe.load_lora(tmp_path / "bad.safetensors", strict=True)
        assert all(torch.equal(pipe.velocity(x, s, {"context": context}), b) for s, b in zip((0.9375, 0.3125), before))
        assert pipe.load_lora(tmp_path / "both.safetensors") == [
            "transformer.blocks.0.self_attn.q",
            "transformer_2.blocks.0.self_attn.q",
            "text_encoder.encoder.block.0.layer.0.SelfAttention.q",
        ]
        assert "warning" not in capsys.readouterr().err
        after = [pipe.velocity(x, sigma, {"context": context}) for sigma in (0.9375, 0.3125)]
    assert all(rel(a, b) > 1e-3 for a, b in zip(after, before))


def test_model_offload_keeps_one_expert_on_the_device(wan22_t2v_a14b_repo):
    """--offload model: each expert is copied to the device once per generation (the low-noise one replacing the
    high-noise one at the boundary), and while one runs the other is on the host, as offload.py's accounting shows."""
    pipe = wan22.load(wan22_t2v_a14b_repo[0], dtype=torch.float32)
    kw = dict(frames=5, height=32, width=32, steps=6, shift=12.0, seed=2, output="pt", progress=False)
    plain = pipe.generate(PROMPT, **kw)
    handler = offload.enable_model_offload(pipe, "cpu")
    seen = []
    hooks = [
        expert.register_forward_pre_hook(lambda m, a, name=name: seen.append((name, tuple(handler.on_device()))))
        for name, expert in (("transformer", pipe.transformer), ("transformer_2", pipe.transformer_2))
    ]
    out = pipe.generate(PROMPT, **kw)
    for hook in hooks:
        hook.remove()
    assert rel(out, plain) < 1e-6
    assert {entry for entry in seen} == {("transformer", ("transformer",)), ("transformer_2", ("transformer_2",))}
    assert len(seen) == 12  # 6 steps x (conditional, unconditional)
    loads = [k for e, k in handler.log if e == "load"]
    assert loads.count("transformer") == 1 and loads.count("transformer_2") == 1
    expert_log = [(e, k) for e, k in handler.log if k.startswith("transformer")]
    assert expert_log == [("load", "transformer"), ("free", "transformer"), ("load", "transformer_2")] + [
        ("free", "transformer_2")
    ]  # the VAE decoder's load sent the last expert home
    assert handler.on_device() == []
    offload.disable_model_offload(pipe)


def run_sample(model, repo, out, *extra):
    common = ["--weights", str(repo), "--size", "48x32", "--frames", "5", "--steps", "3", "--device", "cpu", "--quiet"]
    return sample.main([model, PROMPT, "--seed", "3", "--out", str(out), *common, *extra])


def test_sample_t2v_and_i2v_write_mp4s(wan22_t2v_a14b_repo, wan22_i2v_a14b_repo, tmp_path, capsys):
    pytest.importorskip("av", reason="reading the MP4 back needs PyAV (requirements-video.txt)")
    assert run_sample("wan22-t2v-a14b", wan22_t2v_a14b_repo[0], tmp_path / "t2v") == 0
    image = tmp_path / "first.png"
    random_image(300, 200).save(image)
    assert run_sample("wan22-i2v-a14b", wan22_i2v_a14b_repo[0], tmp_path / "i2v", "--image", str(image)) == 0
    for kind in ("t2v", "i2v"):
        (path,) = (tmp_path / kind).glob("*.mp4")
        frames, fps, meta = video.read_video(path)
        assert frames.shape == (5, 32, 48, 3) and fps == 16 and meta["variant"] == f"wan22-{kind}-a14b"
        assert meta["cfg"] == ([3.0, 4.0] if kind == "t2v" else [3.5, 3.5]) and meta["steps"] == 3
    assert meta["images"] == str(image)
    assert run_sample("wan22-i2v-a14b", wan22_i2v_a14b_repo[0], tmp_path / "x") == 2
    assert "makes a video from a first frame" in capsys.readouterr().err
    assert run_sample("wan22-t2v-a14b", wan22_t2v_a14b_repo[0], tmp_path / "x", "--size", "40x32") == 2
    assert "multiples of 16" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["model", "blocks", "int8"])
def test_sample_offload_and_int8_act_on_both_experts(wan22_t2v_a14b_repo, tmp_path, monkeypatch, mode):
    import int8

    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.append(original(m, min_features=16)) or quantized[-1])
    streamed = []
    enable = offload.enable_block_streaming
    monkeypatch.setattr(offload, "enable_block_streaming", lambda m, d: streamed.append(m) or enable(m, d))
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")  # lossless enough to compare
    root = wan22_t2v_a14b_repo[0]
    assert run_sample("wan22-t2v-a14b", root, tmp_path / "plain", "--cfg", "3") == 0
    extra = ["--int8"] if mode == "int8" else ["--offload", mode]
    assert run_sample("wan22-t2v-a14b", root, tmp_path / mode, "--cfg", "3", *extra) == 0
    plain, other = (video.read_video(next((tmp_path / d).glob("*")))[0].astype(int) for d in ("plain", mode))
    if mode == "int8":
        assert len(quantized) == 2 and all("blocks.0.self_attn.q" in q for q in quantized)
        assert 0 < np.abs(plain - other).mean() < 20
    else:
        assert len(streamed) == (2 if mode == "blocks" else 0) and np.abs(plain - other).max() <= 1
