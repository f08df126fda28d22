"""FLUX.1: official-layout loading and parity with diffusers/transformers fed the same weights (fp32, tiny configs)."""

import numpy as np
import pytest
import torch
from fakes import (
    diffusers_flux_pipeline,
    diffusers_flux_velocity,
    flux_to_bfl,
    rel,
    tiny_ae,
    write_flux1_repo,
)
from safetensors.torch import load_file, save_file

import flux1

PROMPTS = ["a photo of a cat", "Ein Fuchs im Schnee, watercolor, 4k!"]


@pytest.fixture(scope="module")
def pipe(flux1_repo):
    return flux1.load(flux1_repo[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_pipe(flux1_repo):
    return diffusers_flux_pipeline(flux1_repo[1])


def pack(x):  # diffusers' packed latent layout is our patchify
    return flux1.patchify(x)


# ---------------------------------------------------------------------------------------------------------------------
# The key inverse used to write the fake checkpoints is checked against diffusers' own converter.


@pytest.mark.slow
def test_bfl_inverse_round_trips_through_diffusers_converter():
    # diffusers' converter hard-codes FLUX.1's width (3072) and MLP ratio, so this runs at full width, 1 + 1 blocks.
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1, num_single_layers=1, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True
        )
    g = torch.Generator().manual_seed(0)
    original = {
        k: torch.randn(v.shape, generator=g, dtype=torch.float32).bfloat16() for k, v in model.state_dict().items()
    }
    bfl = flux_to_bfl(original)
    assert len(bfl) == 52 and len(original) == 66
    for prefix in ("", "model.diffusion_model."):
        back = convert_flux_transformer_checkpoint_to_diffusers({prefix + k: v for k, v in bfl.items()})
        assert back.keys() == original.keys()
        assert all(torch.equal(back[k], original[k]) for k in original)


def test_ae_inverse_round_trips_through_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ae = tiny_ae()
    original = ae.state_dict()
    back = convert_ldm_vae_checkpoint(flux1.ae_from_diffusers(original), dict(ae.config))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k].reshape(original[k].shape), original[k]) for k in original)


# ---------------------------------------------------------------------------------------------------------------------
# Loading


def test_load_reads_official_layout_exactly(flux1_repo, pipe):
    root, _ = flux1_repo
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()  # sharded, as the real repo
    assert (root / "text_encoder_2" / "model.safetensors.index.json").is_file()
    assert pipe.variant == "flux1-dev"
    p = pipe.transformer.params
    assert (p.depth, p.depth_single_blocks, p.num_heads, p.hidden_size, p.guidance_embed) == (2, 2, 2, 64, True)
    # load_state_dict(strict) already refused any missing/unexpected key; also check every tensor arrived intact.
    on_disk = load_file(root / "flux1-dev.safetensors")
    assert pipe.transformer.state_dict().keys() == on_disk.keys()
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in on_disk.items())


def test_flex_prefixed_single_file_with_diffusers_vae(tmp_path):
    from diffusers import FluxTransformer2DModel

    refs = write_flux1_repo(
        tmp_path, "Flex.1-alpha.safetensors", prefix="model.diffusion_model.", vae_format="diffusers", num_layers=1
    )
    pipe = flux1.load(tmp_path, dtype=torch.float32)
    assert pipe.variant == "flex1-alpha" and pipe.transformer.params.depth == 1
    assert pipe.defaults.train_guidance is None  # Flex trains with the guidance embedder bypassed
    # Bypassing the guidance embedder = the same model without one.
    no_guidance = FluxTransformer2DModel(**{**refs["transformer"].config, "guidance_embeds": False}).eval()
    missing, unexpected = no_guidance.load_state_dict(refs["transformer"].state_dict(), strict=False)
    assert not missing and all("guidance_embedder" in k for k in unexpected)
    x, cond = torch.randn(1, 16, 4, 6), {"txt": torch.randn(1, 5, 48), "vec": torch.randn(1, 24)}
    with torch.no_grad():
        ours = pipe.velocity(x, 0.7, cond, guidance=None)
        ref = diffusers_flux_velocity(no_guidance, x, 0.7, cond)
        with_guidance = pipe.velocity(x, 0.7, cond, guidance=4.0)
    assert rel(pack(ours), ref) < 1e-5
    assert rel(with_guidance, ours) > 1e-3
    # diffusers-format vae/ loads into the same AE as ae.safetensors would.
    assert pipe.ae.params.ch_mult == (1, 1, 2, 2)


def test_load_errors_are_clear(tmp_path, flux1_repo):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        flux1.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown FLUX.1 variant"):
        flux1.load("flux9")
    with pytest.raises(FileNotFoundError, match="flux1-dev.safetensors"):
        flux1.load(tmp_path)
    # A truncated download.
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((flux1_repo[0] / "flux1-dev.safetensors").read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        flux1.load_transformer(broken)
    # A key the model does not have (or a missing one) is named.
    sd = load_file(flux1_repo[0] / "flux1-dev.safetensors")
    sd["double_blocks.0.extra.weight"] = torch.zeros(1)
    del sd["img_in.bias"]
    save_file(sd, tmp_path / "extra.safetensors")
    expected = r"1 missing \(e.g. \['img_in.bias'\]\), 1 unexpected \(e.g. \['double_blocks.0.extra.weight'\]"
    with pytest.raises(ValueError, match=expected):
        flux1.load_transformer(tmp_path / "extra.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# Parity with diffusers / transformers


def test_velocity_matches_diffusers(pipe, flux1_repo):
    ref = flux1_repo[1]["transformer"]
    torch.manual_seed(1)
    x = torch.randn(2, 16, 4, 6)  # batch 2, non-square (32x48 pixels)
    cond = {"txt": torch.randn(2, 7, 48), "vec": torch.randn(2, 24)}
    sigma, guidance = torch.tensor([0.25, 0.9]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, cond, guidance=guidance)
        theirs = diffusers_flux_velocity(ref, x, sigma, cond, guidance)
    assert theirs.abs().mean() > 1e-2  # non-trivial output
    assert rel(pack(ours), theirs) < 1e-5


def test_autoencoder_matches_diffusers(pipe, flux1_repo):
    ref = flux1_repo[1]["ae"]
    torch.manual_seed(2)
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        z = pipe.encode(pixels)
        z_ref = (ref.encode(pixels).latent_dist.mean - ref.config.shift_factor) * ref.config.scaling_factor
        assert z.shape == (2, 16, 4, 6)
        assert rel(z, z_ref) < 1e-5
        out = pipe.decode(z)
        out_ref = ref.decode(z / ref.config.scaling_factor + ref.config.shift_factor).sample
        assert rel(out, out_ref) < 1e-5


def test_text_encoders_match_transformers(pipe, ref_pipe):
    long_prompt = "a very long prompt about " + "many small red foxes and " * 60  # truncated by both tokenizers
    prompts = [*PROMPTS, long_prompt, ""]
    cond = pipe.encode_prompt(prompts)
    with torch.no_grad():
        t5, pooled, _ = ref_pipe.encode_prompt(prompt=prompts, prompt_2=prompts, max_sequence_length=512)
    assert cond["txt"].shape == (4, 512, 48) and cond["vec"].shape == (4, 24)
    assert rel(cond["txt"], t5) < 1e-5
    assert rel(cond["vec"], pooled) < 1e-5


def generate_both(pipe, ref_pipe, steps=4, guidance=3.5, cfg=1.0, negative=None, solver="euler"):
    noise = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    ours = pipe.generate(
        PROMPTS,
        steps=steps,
        guidance=guidance,
        cfg=cfg,
        negative_prompt=negative or "",
        noise=noise,
        output="latent",
        progress=False,
        solver=solver,
    )
    with torch.no_grad():
        theirs = ref_pipe(
            prompt=PROMPTS,
            negative_prompt=negative,
            true_cfg_scale=cfg,
            height=32,
            width=48,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=pack(noise),
            output_type="latent",
        ).images
    return ours, theirs


def test_generate_matches_diffusers_flux_pipeline(pipe, ref_pipe):
    ours, theirs = generate_both(pipe, ref_pipe)
    assert rel(pack(ours), theirs) < 1e-4
    # Decoded pixels too ([-1, 1] here, [0, 1] there).
    noise = torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(3))
    pixels = pipe.generate(PROMPTS, steps=4, guidance=3.5, noise=noise, output="pt", progress=False)
    with torch.no_grad():
        ref_pixels = ref_pipe(
            prompt=PROMPTS,
            height=32,
            width=48,
            num_inference_steps=4,
            guidance_scale=3.5,
            latents=pack(noise),
            output_type="pt",
        ).images
    assert rel(((pixels + 1) / 2).clamp(0, 1), ref_pixels) < 1e-4


def test_generate_true_cfg_matches_diffusers(pipe, ref_pipe):
    ours, theirs = generate_both(pipe, ref_pipe, cfg=2.5, negative=["blurry", "low quality, text"])
    assert rel(pack(ours), theirs) < 1e-4
    plain, _ = generate_both(pipe, ref_pipe, steps=1)
    assert rel(ours, plain) > 1e-3


def test_schedule_matches_diffusers_scheduler(ref_pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for steps, (h, w) in [(4, (32, 48)), (28, (1024, 1024)), (50, (768, 1360))]:
        tokens = (h // 16) * (w // 16)
        mu = calculate_shift(tokens)
        ref_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = flux1.schedule(steps, h, w).float()
        assert torch.allclose(ours, ref_pipe.scheduler.sigmas.float(), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# Pipeline behaviour


def test_batch_equals_one_at_a_time_and_seed_is_reproducible(pipe):
    kw = dict(height=32, width=48, steps=3, output="pt", progress=False)
    batch = pipe.generate(PROMPTS, seed=[7, 8], **kw)
    first = pipe.generate(PROMPTS[0], seed=7, **kw)
    second = pipe.generate(PROMPTS[1], seed=8, **kw)
    assert torch.allclose(batch, torch.cat([first, second]), atol=1e-5)
    assert torch.equal(pipe.generate(PROMPTS[0], seed=7, **kw), first)
    assert rel(pipe.generate(PROMPTS[0], seed=9, **kw), first) > 1e-3


def test_images_come_back_as_pil(pipe):
    images = pipe.generate(PROMPTS, height=48, width=32, steps=2, progress=False)
    assert [im.size for im in images] == [(32, 48), (32, 48)] and images[0].mode == "RGB"


def test_sizes_must_be_multiples_of_16(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate("x", height=40, width=48, steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown solver"):
        pipe.generate("x", height=32, width=32, steps=1, solver="heun", progress=False)


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_other_solvers_agree_with_euler_as_steps_grow(pipe, solver):
    kw = dict(height=32, width=32, seed=0, output="latent", progress=False)
    fine = pipe.generate(PROMPTS[0], steps=64, solver="euler", **kw)
    errors = [rel(pipe.generate(PROMPTS[0], steps=n, solver=solver, **kw), fine) for n in (4, 16)]
    assert all(np.isfinite(errors)) and errors[1] < errors[0] / 2


def test_image_to_image_noise_level_matches_first_model_time(pipe, monkeypatch):
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    seen = []
    velocity = pipe.velocity
    monkeypatch.setattr(
        pipe, "velocity", lambda x, s, *a, **k: seen.append((x.clone(), float(s))) or velocity(x, s, *a, **k)
    )
    steps, strength = 10, 0.45
    out = pipe.generate(
        "a cat", init_image=init, strength=strength, steps=steps, seed=5, output="latent", progress=False
    )
    sigmas = flux1.schedule(steps, 32, 48).float()
    start = int(steps - steps * strength)  # diffusers' FluxImg2ImgPipeline rule: the last `strength` of the steps
    assert len(seen) == steps - start and seen[0][1] == pytest.approx(sigmas[start].item())
    x0 = pipe.encode(flux1.image_to_tensor(init, None, None, 16))
    noise = flux1.draw_noise((16, 4, 6), [5], "cpu")
    expected = (1 - sigmas[start]) * x0 + sigmas[start] * noise  # the noise level the model is told it is at
    assert torch.allclose(seen[0][0], expected, atol=1e-6)
    assert out.shape == (1, 16, 4, 6)


def test_image_to_image_with_strength_zero_returns_the_encoded_image(pipe):
    from PIL import Image

    init = Image.new("RGB", (50, 37), (200, 30, 90))  # cropped down to 48x32
    out = pipe.generate("x", init_image=init, strength=0.0, steps=4, output="latent", progress=False)
    assert out.shape == (1, 16, 4, 6)
    assert torch.allclose(out, pipe.encode(flux1.image_to_tensor(init, None, None, 16)), atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# RoPE axes: read from the repo's transformer/config.json when it has one; inferred ones are checked


def test_rope_axes_from_repo_config(tmp_path):
    """A head split the BFL file cannot tell (here (8, 12, 12) for 32-wide heads instead of FLUX.1's 4:14:14 ratio):
    the repo's transformer/config.json says it, and the velocity then matches diffusers."""
    import json

    refs = write_flux1_repo(tmp_path, axes_dims_rope=(8, 12, 12), num_layers=1)
    x, cond = torch.randn(1, 16, 4, 6), {"txt": torch.randn(1, 5, 48), "vec": torch.randn(1, 24)}
    with torch.no_grad():
        ref = diffusers_flux_velocity(refs["transformer"], x, 0.4, cond, guidance=torch.tensor([3.5]))
        guessed = flux1.load(tmp_path, dtype=torch.float32)  # no config: FLUX.1's ratios, the wrong split here
        assert guessed.transformer.params.axes_dim == (4, 14, 14)
        assert rel(pack(guessed.velocity(x, 0.4, cond, guidance=3.5)), ref) > 1e-3
        (tmp_path / "transformer").mkdir()
        (tmp_path / "transformer" / "config.json").write_text(json.dumps(dict(refs["transformer"].config)))
        pipe = flux1.load(tmp_path, dtype=torch.float32)
        assert pipe.transformer.params.axes_dim == (8, 12, 12)
        assert rel(pack(pipe.velocity(x, 0.4, cond, guidance=3.5)), ref) < 1e-5


def test_invalid_rope_axes_are_refused_clearly(tmp_path):
    import json

    # 24-wide heads: FLUX.1's ratios give (3, 10, 10), odd and summing to 23.
    write_flux1_repo(tmp_path, attention_head_dim=24, axes_dims_rope=(4, 10, 10), num_layers=1)
    with pytest.raises(ValueError, match=r"RoPE axes \(3, 10, 10\).*head_dim 24.*axes_dims_rope"):
        flux1.load(tmp_path, dtype=torch.float32)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"axes_dims_rope": [6, 9, 9]}))
    with pytest.raises(ValueError, match=r"RoPE axes \(6, 9, 9\) \(transformer/config.json\)"):
        flux1.load(tmp_path, dtype=torch.float32)
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"axes_dims_rope": [4, 10, 10]}))
    assert flux1.load(tmp_path, dtype=torch.float32).transformer.params.axes_dim == (4, 10, 10)


@pytest.mark.parametrize(
    "error, gated, expected",
    [
        ("GatedRepoError", True, r"could not download r/x \(access denied: the repo is gated.*accept the licence"),
        ("LocalEntryNotFoundError", True, r"could not download r/x \(no connection to huggingface.co"),
        ("RepositoryNotFoundError", False, r"could not download r/x \(the repo was not found or needs a login"),
        ("RuntimeError", False, r"could not download r/x \(RuntimeError: boom\).*--weights DIR"),
    ],
)
def test_download_failure_says_why_first(monkeypatch, error, gated, expected):
    import huggingface_hub

    def fail(*args, **kwargs):
        raise type(error, (Exception,), {})("boom\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(FileNotFoundError, match=expected) as info:
        flux1.download("r/x", ["a"], gated)
    assert "\n" not in str(info.value)
