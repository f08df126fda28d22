"""Z-Image: official-layout loading and parity with diffusers/transformers fed the same weights (fp32, tiny configs)."""

import numpy as np
import pytest
import torch
from fakes import diffusers_zimage_pipeline, rel, tiny_zimage_transformer

import sample
import zimage

PROMPTS = ["a photo of a cat", "一只在雪地里的狐狸, watercolor, highly detailed, soft morning light, 4k!"]


@pytest.fixture(scope="module")
def pipe(zimage_repo):
    return zimage.load(zimage_repo[0], device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def ref_pipe(zimage_repo):
    return diffusers_zimage_pipeline(zimage_repo[1], shift=3.0)


def diffusers_transformer(ref, x, t, caps):
    out = ref(list(x.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
    return torch.stack(out).squeeze(2)


def test_load_reads_official_layout(zimage_repo, pipe):
    root, refs = zimage_repo
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()  # sharded
    assert (root / "text_encoder" / "model.safetensors.index.json").is_file()
    p = pipe.transformer.params
    assert (p.dim, p.n_layers, p.n_refiner_layers, p.n_heads, p.cap_feat_dim) == (64, 2, 1, 2, 32)
    # Every tensor arrived intact (the strict load already refused missing or unexpected keys).
    ours, theirs = pipe.transformer.state_dict(), refs["transformer"].state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert len(pipe.text_encoder.layers) == 2  # of 3: the last layer is never built or run
    assert pipe.variant == "zimage-turbo" and pipe.defaults.shift == 3.0 and pipe.defaults.steps == 8


@pytest.mark.parametrize("latent_size", [(6, 10), (8, 8)])  # 15 image tokens (not a multiple of 32), and 16
def test_velocity_matches_diffusers(pipe, zimage_repo, latent_size):
    ref = zimage_repo[1]["transformer"]
    torch.manual_seed(0)
    x = torch.randn(2, 16, *latent_size)
    caps = [torch.randn(7, 32), torch.randn(40, 32)]  # two prompts of different lengths
    sigma = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, {"caps": caps})
        theirs = diffusers_transformer(ref, x, 1 - sigma, caps)
    assert theirs.abs().mean() > 1e-2
    assert rel(ours, -theirs) < 1e-5  # velocity = -(model output), at model time 1 - sigma


def test_batch_padding_does_not_leak():
    # In float64, so kernel rounding (masked vs unmasked attention) cannot hide a real leak.
    ref = tiny_zimage_transformer(seed=3)
    with torch.device("meta"):
        model = zimage.ZImageTransformer(zimage.ZImageParams.from_config(dict(ref.config)))
    model = zimage.load_into(model, ref.state_dict(), "test").double()
    torch.manual_seed(1)
    x, t = torch.randn(3, 16, 6, 10, dtype=torch.float64), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    caps = [torch.randn(n, 32, dtype=torch.float64) for n in (5, 70, 33)]
    with torch.no_grad():
        batch = model(x, t, caps)
        alone = torch.cat([model(x[i : i + 1], t[i : i + 1], caps[i : i + 1]) for i in range(3)])
    assert (batch - alone).abs().max() < 1e-10


def test_prompt_features_match_transformers(pipe, ref_pipe):
    prompts = [*PROMPTS, "", "long " * 600]  # the last one is truncated at 512 tokens
    ours = pipe.encode_prompt(prompts)["caps"]
    with torch.no_grad():
        theirs, _ = ref_pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert [len(c) for c in ours] == [len(c) for c in theirs] and len(ours[3]) == 512
    for a, b in zip(ours, theirs):
        assert rel(a, b) < 1e-5


def generate_both(pipe, ref_pipe, steps=4, cfg=0.0, negative=None, **options):
    noise = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(4))  # 48x80 pixels
    kw = dict(steps=steps, cfg=cfg, negative_prompt=negative or "", noise=noise, output="latent", progress=False)
    ours = pipe.generate(PROMPTS, **kw, **options)
    with torch.no_grad():
        theirs = ref_pipe(
            prompt=PROMPTS,
            negative_prompt=negative,
            guidance_scale=cfg,
            height=48,
            width=80,
            num_inference_steps=steps,
            latents=noise,
            output_type="latent",
            **options,
        ).images
    return ours, theirs


def test_generate_turbo_matches_diffusers(pipe, ref_pipe):
    ours, theirs = generate_both(pipe, ref_pipe)
    assert rel(ours, theirs) < 1e-4


def test_generate_base_with_cfg_matches_diffusers(pipe, ref_pipe):
    ours, theirs = generate_both(pipe, ref_pipe, cfg=3.0, negative=["blurry", "低质量, text"])
    assert rel(ours, theirs) < 1e-4
    plain, _ = generate_both(pipe, ref_pipe, steps=1)
    assert rel(ours, plain) > 1e-3


@pytest.mark.parametrize("options", [{"cfg_truncation": 0.5}, {"cfg_normalization": 1.1}])
def test_official_cfg_options_match_diffusers(pipe, ref_pipe, options):
    ours, theirs = generate_both(pipe, ref_pipe, cfg=4.0, negative=["", "ugly"], **options)
    assert rel(ours, theirs) < 1e-4
    unchanged, _ = generate_both(pipe, ref_pipe, cfg=4.0, negative=["", "ugly"])
    assert rel(ours, unchanged) > 1e-4  # the option really changed the result


def test_decoded_pixels_match_diffusers(pipe, ref_pipe):
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(5))
    ours = pipe.generate(PROMPTS[0], steps=2, noise=noise, output="pt", progress=False)
    with torch.no_grad():
        theirs = ref_pipe(
            prompt=PROMPTS[0],
            guidance_scale=0.0,
            height=32,
            width=48,
            num_inference_steps=2,
            latents=noise,
            output_type="pt",
        ).images
    assert rel(((ours + 1) / 2).clamp(0, 1), theirs) < 1e-4


def test_batch_of_prompts_equals_one_at_a_time(pipe):
    kw = dict(height=32, width=48, steps=3, output="latent", progress=False, cfg=2.0, negative_prompt="blurry")
    batch = pipe.generate(PROMPTS, seed=[3, 4], **kw)
    alone = torch.cat([pipe.generate(p, seed=s, **kw) for p, s in zip(PROMPTS, [3, 4])])
    assert rel(batch, alone) < 1e-5


@pytest.fixture(scope="module")
def smooth_pipe(zimage_repo):
    """A random model's velocity oscillates in time as fast as the highest timestep-embedding frequency (a period
    of ~0.006 in sigma) and is nearly chaotic; a trained one is smooth. Damped weights and no high time frequencies
    make the tiny model's ODE smooth enough for step counts a test can afford."""
    pipe = zimage.load(zimage_repo[0], device="cpu", dtype=torch.float32)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "norm" not in name:
                p.mul_(0.5)
        w = pipe.transformer.t_embedder.mlp[0].weight  # inputs: 128 cosines then 128 sines, fastest first
        w[:, :64], w[:, 128:192] = 0, 0
    return pipe


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "unipc", "rfpc"])
def test_solvers_agree_as_steps_grow(smooth_pipe, solver):
    kw = dict(height=32, width=32, seed=0, output="latent", progress=False)
    fine = smooth_pipe.generate(PROMPTS[0], steps=200, solver="unipc", **kw)
    errors = [rel(smooth_pipe.generate(PROMPTS[0], steps=n, solver=solver, **kw), fine) for n in (5, 40)]
    assert all(np.isfinite(errors)) and errors[1] < errors[0] / 4 and errors[1] < 0.05


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate("x", height=40, width=48, steps=1, progress=False)
    with pytest.raises(ValueError, match="no distilled guidance"):
        pipe.generate("x", height=32, width=32, steps=1, guidance=3.5, progress=False)


def test_sample_cli(zimage_repo, tmp_path, capsys):
    from PIL import Image

    common = ["--weights", str(zimage_repo[0]), "--size", "48x32", "--steps", "2", "--device", "cpu", "--quiet"]
    assert sample.main(["zimage", "a fox", "--seed", "2", "--out", str(tmp_path / "a"), *common]) == 0
    assert (
        sample.main(
            [
                "zimage-base",
                "a fox",
                "--seed",
                "2",
                "--out",
                str(tmp_path / "b"),
                "--cfg",
                "3",
                "--negative",
                "blurry",
                *common,
            ]
        )
        == 0
    )
    a = Image.open(tmp_path / "a" / "00000-2.png")
    b = Image.open(tmp_path / "b" / "00000-2.png")
    assert a.size == (48, 32) and a.text["variant"] == "zimage-turbo" and b.text["variant"] == "zimage-base"
    assert b.text["cfg"] == "3.0" and b.text["negative_prompt"] == "blurry"
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    assert sample.main(["zimage", "a fox", "--guidance", "2", "--out", str(tmp_path / "c"), *common]) == 2
    assert "no distilled guidance" in capsys.readouterr().err


def test_broken_repo_gets_one_line_errors(zimage_repo, tmp_path, capsys):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(zimage_repo[0], broken)
    shutil.rmtree(broken / "text_encoder")
    common = ["--weights", str(broken), "--size", "32x32", "--steps", "1", "--device", "cpu", "--quiet"]
    assert sample.main(["zimage", "x", "--out", str(tmp_path / "o"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "text_encoder" in err
    shutil.copytree(zimage_repo[0] / "text_encoder", broken / "text_encoder")
    (broken / "tokenizer" / "tokenizer.json").unlink()
    assert sample.main(["zimage", "x", "--out", str(tmp_path / "o"), *common]) == 2
    assert "missing tokenizer file" in capsys.readouterr().err
    assert sample.main(["zimage", "x", "--out", str(tmp_path / "o"), *common, "--size", "40x40"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Where the official pipeline (Tongyi's src/zimage/pipeline.py) and diffusers differ, we follow the official one.


def count_calls(pipe, monkeypatch) -> list:
    """Record each transformer call's conditioning count (1 = conditional only)."""
    calls = []
    original = pipe.velocity

    def spy(x, sigma, cond):
        calls.append(sigma)
        return original(x, sigma, cond)

    monkeypatch.setattr(pipe, "velocity", spy)
    return calls


def test_cfg_only_above_one(pipe, monkeypatch):
    """Official: do_classifier_free_guidance = guidance_scale > 1, so 0 < cfg <= 1 is plain sampling."""
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(7))
    kw = dict(steps=3, noise=noise, output="latent", progress=False, negative_prompt="blurry")
    calls = count_calls(pipe, monkeypatch)
    plain = pipe.generate(PROMPTS[0], cfg=0.0, **kw)
    assert len(calls) == 3
    for cfg in (0.5, 1.0):
        calls.clear()
        assert torch.equal(pipe.generate(PROMPTS[0], cfg=cfg, **kw), plain) and len(calls) == 3
    calls.clear()
    guided = pipe.generate(PROMPTS[0], cfg=1.5, **kw)
    assert len(calls) == 6 and rel(guided, plain) > 1e-4


def test_cfg_truncation_ties_fall_as_official(pipe, monkeypatch):
    """Truncation 0.6 on sigmas 1, .8, .6, .4, .2, 0: at sigma 0.4 the official float32 time (1000 - 1000 * 0.4) /
    1000 is 0.6000000238 > 0.6, so CFG is off there; 1 - sigma in float64 (0.59999999) would have kept it."""
    import solvers

    sigmas = solvers.linear_sigmas(5)
    # The official loop's rule: timestep = sigma * 1000 and t_norm = (1000 - timestep) / 1000 in float32, then
    # `t_norm.item() > cfg_truncation` between python floats.
    t = sigmas.numpy().astype(np.float32) * np.float32(1000)
    t_norm = ((np.float32(1000) - t) / np.float32(1000)).astype(np.float64)
    expected_uncond = int(sum(t_norm[:-1] <= 0.6))
    assert expected_uncond == 3  # sigma 1, .8, .6 (not .4)
    calls = count_calls(pipe, monkeypatch)
    noise = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(8))
    pipe.generate(PROMPTS[0], cfg=3.0, cfg_truncation=0.6, sigmas=sigmas, noise=noise, output="latent", progress=False)
    assert len(calls) == 5 + expected_uncond


def test_scheduler_dynamic_shifting_is_honoured(zimage_repo, tmp_path):
    """A repo whose scheduler_config.json sets use_dynamic_shifting gets FLUX.1's resolution-dependent mu, with the
    file's parameters, as the official loader and diffusers' scheduler give."""
    import json
    import shutil

    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path / "repo"
    shutil.copytree(zimage_repo[0], root)
    config = {
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.4,
        "max_shift": 1.3,
        "base_image_seq_len": 128,
        "max_image_seq_len": 2048,
    }
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    pipe = zimage.load(root, device="cpu", dtype=torch.float32)
    assert pipe.defaults.dynamic_shift == (0.4, 1.3, 128, 2048)
    for height, width, steps in [(512, 512, 8), (1024, 768, 20)]:
        tokens = (height // 16) * (width // 16)
        mu = 0.4 + (1.3 - 0.4) / (2048 - 128) * (tokens - 128)
        ref = FlowMatchEulerDiscreteScheduler(**config)
        ref.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:-1], mu=mu)  # the pipelines' grid (sigma_min 0)
        ours = zimage.schedule(steps, pipe.defaults.shift, pipe.defaults.dynamic_shift, height, width)
        assert torch.allclose(ours.float(), ref.sigmas, atol=1e-6)
        static = zimage.schedule(steps, 3.0)
        assert (ours - static).abs().max() > 1e-2  # really a different schedule
