"""LoRA training on video (train.py with Wan2.2 TI2V-5B, T2V-A14B and I2V-A14B) on tiny official-layout repos: clips
as MP4 files and as folders of numbered frames, images as 1-frame videos, frame sampling, first-frame (image-to-video)
training, one LoRA per A14B expert trained on its own noise levels, the cache, resume, and the files in diffusers."""

import copy

import numpy as np
import pytest
import torch
from fakes import rel
from PIL import Image
from safetensors import safe_open
from test_train import losses

import train
import video
import wan22

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


pytestmark = pytest.mark.usefixtures("one_thread")


def moving_square(frames: int, width: int, height: int, colour, seed: int) -> np.ndarray:
    """(frames, height, width, 3) uint8: a 16-pixel square moving right and down over a dark background."""
    rng = np.random.default_rng(seed)
    clip = np.full((frames, height, width, 3), 30, np.uint8)
    x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
    for i in range(frames):
        x, y = (x0 + 3 * i) % (width - 16), (y0 + 2 * i) % (height - 16)
        clip[i, y : y + 16, x : x + 16] = colour
    return clip


def make_clips(folder, broken: bool = True):
    """Two MP4 clips (13 frames, landscape), a folder of 9 numbered frames (portrait; 1.png ... 9.png, numbered without
    zero padding), a still image and, if `broken`, an unreadable .mp4; each with its caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(("red", "green")):
        video.write_video(folder / f"clip{i}.mp4", moving_square(13, 96, 64, COLOURS[name], i), 16)
        (folder / f"clip{i}.txt").write_text(f"a {name} square moving right")
    frames = folder / "blue"
    frames.mkdir(exist_ok=True)
    for j, frame in enumerate(moving_square(9, 64, 96, COLOURS["blue"], 5)):
        Image.fromarray(frame).save(frames / f"{j + 1}.png")
    (folder / "blue.txt").write_text("a blue square moving right")
    Image.fromarray(moving_square(1, 64, 64, (220, 220, 30), 3)[0]).save(folder / "still.png")
    (folder / "still.txt").write_text("a yellow square")
    if broken:
        (folder / "broken.mp4").write_bytes(b"not a video at all")
        (folder / "broken.txt").write_text("broken")
    return folder


def run(model, repo, data, out, *extra):
    argv = [model, "--weights", str(repo), "--data", str(data), "--output", str(out), "--resolution", "64"]
    argv += ["--bucket-step", "32", "--device", "cpu", "--quiet", "--rank", "4", "--frames", "9", "5", *map(str, extra)]
    return train.main(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Data: clips, frame folders, frame sampling


def test_frame_sampling():
    stride2 = train.ClipFrames([9, 5], "stride", 2)
    assert stride2.indices(13) == [0, 2, 4, 6, 8]  # 9 frames at stride 2 need 17: the 5 that fit
    assert stride2.indices(17) == list(range(0, 17, 2))
    assert stride2.indices(4) == [0]  # too short for 5: its own longest 4k + 1
    uniform = train.ClipFrames([9], "uniform")
    assert uniform.indices(33) == list(range(0, 33, 4))  # spread over the whole clip, first and last included
    assert train.ClipFrames([9, 5], "uniform").indices(7) == [0, 2, 3, 4, 6]
    assert train.ClipFrames([5]).indices(100) == [0, 1, 2, 3, 4]


def test_probe_and_read_frames(tmp_path):
    clip = moving_square(13, 96, 64, COLOURS["red"], 0)
    path = video.write_video(tmp_path / "clip.mp4", clip, 16)
    assert video.probe(path) == (13, 16.0, 96, 64)
    picked = list(video.read_frames(path, [0, 5, 12]))
    assert len(picked) == 3 and picked[0].shape == (64, 96, 3)
    for frame, i in zip(picked, [0, 5, 12]):  # H.264 is lossy: each frame is nearest to the one it should be
        errors = [np.abs(frame.astype(float) - c.astype(float)).mean() for c in clip]
        assert int(np.argmin(errors)) == i and errors[i] < 4
    with pytest.raises(ValueError, match="shorter|frames"):
        list(video.read_frames(path, [0, 20]))
    (tmp_path / "bad.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot read"):
        video.probe(tmp_path / "bad.mp4")


def test_scan_finds_clips_frame_folders_and_images(tmp_path):
    data = make_clips(tmp_path / "data")
    items, skipped = train.scan(data, videos=True)
    assert sorted(p.name for p, _ in items) == ["blue", "broken.mp4", "clip0.mp4", "clip1.mp4", "still.png"]
    assert not skipped
    assert [p.name for p in train.frame_files(data / "blue")] == [f"{j}.png" for j in range(1, 10)]  # 2 before 10
    images, _ = train.scan(data)  # an image model sees the images only (the frames are in a captionless folder)
    assert [p.name for p, _ in images] == ["still.png"]
    skipped = train.Counter()
    samples = train.plan_samples(items, [64], 32, skipped, train.ClipFrames([9, 5]))
    assert skipped == {"unreadable clip": 1}
    kinds = {s["path"].name: (s["kind"], s["frames"], s["bucket"]) for s in samples}
    assert kinds == {
        "blue": ("frames", 9, (64, 32)),  # portrait; sides multiples of 32 (TI2V-5B's granularity)
        "clip0.mp4": ("video", 9, (32, 64)),
        "clip1.mp4": ("video", 9, (32, 64)),
        "still.png": ("image", 1, (64, 64)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# TI2V-5B


def test_loss_falls_and_the_lora_changes_the_output(wan22_repo, tmp_path, capsys):
    data = make_clips(tmp_path / "data")
    out = tmp_path / "out"
    assert run("wan22", wan22_repo[0], data, out, "--steps", "40", "--lr", "1e-2", "--seed", "2") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    assert "5 captioned files, 4 training samples (3 from clips;" in line and "'unreadable clip': 1" in line
    curve = losses(out)
    assert len(curve) == 40
    # The loss of a step depends mostly on its sigma; what the LoRA learnt shows at fixed sigmas and noise.
    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    cached = sorted((out / "cache").glob("clip-*.safetensors"))
    assert len(cached) == 3  # the two MP4s and the frame folder; the still image is cached as an image
    from safetensors.torch import load_file

    x0 = load_file(cached[0])["latent"]
    context = pipe.encode_prompt(["a red fox"])  # any fixed condition: the base and the LoRA see the same
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)

    def held_out_loss():
        total = 0.0
        with torch.no_grad():
            for sigma in (0.2, 0.5, 0.8):
                v = pipe.velocity((1 - sigma) * x0 + sigma * noise, sigma, context)
                total += torch.nn.functional.mse_loss(v, noise - x0).item()
        return total

    before = held_out_loss()
    assert len(pipe.load_lora(out / "lora-wan22.safetensors")) == 20
    after = held_out_loss()
    assert after < 0.8 * before, (before, after)
    assert np.mean(curve[-10:]) < np.mean(curve[:10]), curve


def test_resume_is_exact_and_the_cache_is_reused(wan22_repo, tmp_path, capsys):
    data = make_clips(tmp_path / "data")
    cache = tmp_path / "cache"
    common = ["--lr", "1e-3", "--caption-dropout", "0.3", "--first-frame", "0.5", "--frame-sampling", "uniform"]
    common += ["--batch-size", "2", "--cache-dir", cache]
    assert run("wan22", wan22_repo[0], data, tmp_path / "straight", "--steps", "6", *common) == 0
    assert "encoded 4 latents and 5 prompts" in capsys.readouterr().out
    assert run("wan22", wan22_repo[0], data, tmp_path / "resumed", "--steps", "3", *common) == 0
    assert "encoded 0 latents and 0 prompts" in capsys.readouterr().out
    changed = [*common[:5], "0.25", *common[6:]]  # another --first-frame share: refused on resume
    assert run("wan22", wan22_repo[0], data, tmp_path / "resumed", "--steps", "6", "--resume", *changed) == 2
    assert "--first-frame" in capsys.readouterr().err
    assert run("wan22", wan22_repo[0], data, tmp_path / "resumed", "--steps", "6", "--resume", *common) == 0
    a = tmp_path / "straight" / "lora-wan22.safetensors"
    b = tmp_path / "resumed" / "lora-wan22.safetensors"
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        assert fa.keys() == fb.keys() and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")
    frames = data / "blue" / "3.png"  # a frame that trains (uniform: 0, 2, 4, ...): the clip is encoded again
    Image.open(frames).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(frames)
    assert run("wan22", wan22_repo[0], data, tmp_path / "again", "--steps", "1", *common) == 0
    assert "encoded 1 latents and 0 prompts" in capsys.readouterr().out


def test_first_frame_training_leaves_the_given_frame_out_of_the_loss(wan22_repo):
    """TI2V-5B trained as image-to-video: latent frame 0 is the clean first frame (timestep 0) and is not predicted."""
    pipe = wan22.load(wan22_repo[0], dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 48, 3, 2, 2, generator=g), torch.randn(2, 48, 3, 2, 2, generator=g)
    x_sigma = 0.4 * x0 + 0.6 * noise
    first = torch.tensor([True, False])
    x_in, kwargs, weights = pipe.training_inputs(x0, x_sigma, first, {})
    assert torch.equal(x_in[0, :, 0], x0[0, :, 0]) and torch.equal(x_in[0, :, 1:], x_sigma[0, :, 1:])
    assert torch.equal(x_in[1], x_sigma[1])
    assert weights[0, :, 0].sum() == 0 and weights[0, :, 1:].min() == 1 and weights[1].min() == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--frames", "8"], "4k+1"),
        (["--expert", "high"], "two-expert"),
        (["--first-frame", "1.5"], "between 0 and 1"),
        (["--frame-stride", "0"], "at least 1"),
    ],
)
def test_bad_video_options_get_one_line(wan22_repo, tmp_path, capsys, args, needle):
    data = make_clips(tmp_path / "data", broken=False)
    assert run("wan22", wan22_repo[0], data, tmp_path / "out", "--steps", "1", *args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_video_files_without_a_video_reader_get_one_line(wan22_repo, tmp_path, capsys, monkeypatch):
    data = make_clips(tmp_path / "data", broken=False)
    monkeypatch.setattr(video, "available_backend", lambda: "pillow")  # neither PyAV nor imageio-ffmpeg installed
    assert run("wan22", wan22_repo[0], data, tmp_path / "out", "--steps", "1") == 2
    assert "pip install -r requirements-video.txt" in capsys.readouterr().err


def test_frame_options_on_an_image_model_are_refused(tmp_path, capsys):
    data = make_clips(tmp_path / "data", broken=False)
    assert train.main(["zimage", "--data", str(data), "--frames", "9", "--steps", "1"]) == 2
    assert "for video models" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# A14B: one LoRA per expert, each on its own noise levels


def test_expert_sigmas_keep_the_distribution_shape():
    """Sigmas for an expert come from the training distribution cut at the boundary (not clamped, not re-drawn from
    another distribution): the same shape as rejection sampling from the whole distribution gives."""
    args = train.build_parser().parse_args(["wan22", "--data", "x"])
    g = torch.Generator().manual_seed(0)
    whole = train.draw_sigmas(args, 200_000, g)
    for lo, hi in ((0.875, 1.0), (0.0, 0.875)):
        cut = train.draw_sigmas(args, 4000, g, (lo, hi))
        assert lo <= cut.min() and cut.max() <= hi
        kept = whole[(whole >= lo) & (whole <= hi)][:4000]
        # Two-sample Kolmogorov-Smirnov: the largest gap between the empirical distribution functions, against its
        # critical value at the 0.1% level (1.95 sqrt((n + m) / (n m))).
        grid = torch.cat([cut, kept]).sort().values
        gap = (torch.searchsorted(cut.sort().values, grid, right=True) / len(cut)) - (
            torch.searchsorted(kept.sort().values, grid, right=True) / len(kept)
        )
        assert gap.abs().max() < 1.95 * ((len(cut) + len(kept)) / (len(cut) * len(kept))) ** 0.5


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_a14b_experts_train_on_their_noise_levels_and_load_in_diffusers(
    kind, wan22_t2v_a14b_repo, wan22_i2v_a14b_repo, tmp_path, monkeypatch
):
    from diffusers import WanImageToVideoPipeline, WanPipeline

    repo, refs = wan22_t2v_a14b_repo if kind == "t2v" else wan22_i2v_a14b_repo
    variant = f"wan22-{kind}-a14b"
    data = make_clips(tmp_path / "data", broken=False)
    seen = []
    monkeypatch.setattr(train, "micro_step", recording_micro_step(seen))
    assert run(variant, repo, data, tmp_path / "out", "--steps", "6", "--bucket-step", "16", "--lr", "1e-2") == 0
    monkeypatch.undo()
    boundary = wan22.VARIANTS[variant].boundary
    assert [e for e, _ in seen] == ["high", "low"] * 3  # the experts take turns, step by step
    for expert, sigmas in seen:
        assert all((s >= boundary) == (expert == "high") for s in sigmas), (expert, sigmas, boundary)
    files = {e: tmp_path / "out" / f"lora-{variant}_{e}_noise.safetensors" for e in ("high", "low")}
    for e, f in files.items():
        with safe_open(f, "pt") as fh:
            assert fh.metadata()["expert"] == f"{e}_noise" and float(fh.metadata()["boundary"]) == boundary
            assert any(k.startswith("diffusion_model.blocks.0.self_attn.q.lora_A") for k in fh.keys())

    reference = WanPipeline if kind == "t2v" else WanImageToVideoPipeline
    extra = {"image_encoder": None, "image_processor": None} if kind == "i2v" else {}
    ref = reference(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=None,
        transformer=copy.deepcopy(refs["transformer"]),
        transformer_2=copy.deepcopy(refs["transformer_2"]),
        boundary_ratio=boundary,
        **extra,
    )
    ref.load_lora_weights(files["high"], adapter_name="high")
    ref.load_lora_weights(files["low"], adapter_name="low", load_into_transformer_2=True)
    ours = wan22.load(repo, dtype=torch.float32)
    base = wan22.load(repo, dtype=torch.float32)
    assert len(ours.load_lora(files["high"])) == len(ours.load_lora(files["low"])) == 20
    g = torch.Generator().manual_seed(4)
    channels = ours.transformer.params.in_dim
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    context = torch.randn(1, 512, 32, generator=g)
    kwargs = {}
    if channels > 16:
        kwargs["condition"] = torch.randn(1, channels - 16, 3, 4, 4, generator=g)
    with torch.no_grad():
        for sigma, theirs in ((0.9375, ref.transformer), (0.3125, ref.transformer_2)):  # timesteps 937 and 312
            mine = ours.velocity(x, sigma, {"context": context}, **kwargs)
            hidden = torch.cat([x, kwargs["condition"]], 1) if kwargs else x
            expected = theirs(hidden, torch.tensor([float(int(sigma * 1000))]), context, return_dict=False)[0]
            assert rel(mine, expected) < 1e-5
            assert rel(mine, base.velocity(x, sigma, {"context": context}, **kwargs)) > 1e-3


def recording_micro_step(seen: list):
    micro_step = train.micro_step

    def recording(pipe, batch, conds, args, gen, device, velocity_kwargs, share=None, expert=""):
        velocity = pipe.velocity

        def recorded(x, sigma, *a, **k):
            seen.append((expert, [float(s) for s in sigma.reshape(-1)]))
            return velocity(x, sigma, *a, **k)

        pipe.velocity = recorded
        try:
            return micro_step(pipe, batch, conds, args, gen, device, velocity_kwargs, share, expert)
        finally:
            pipe.velocity = velocity

    return recording


def test_one_expert_writes_one_file(wan22_t2v_a14b_repo, tmp_path):
    data = make_clips(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    assert run("wan22-t2v-a14b", wan22_t2v_a14b_repo[0], data, out, "--steps", "2", "--expert", "low") == 0
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["lora-wan22-t2v-a14b_low_noise.safetensors"]


def test_i2v_refuses_text_only_training(wan22_i2v_a14b_repo, tmp_path, capsys):
    data = make_clips(tmp_path / "data", broken=False)
    out = tmp_path / "out"
    assert run("wan22-i2v-a14b", wan22_i2v_a14b_repo[0], data, out, "--steps", "1", "--first-frame", "0.5") == 2
    assert "always takes a first frame" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["wan22", "wan22-i2v-a14b"])
def test_checkpointing_and_offload_train_the_same_lora_and_previews_are_videos(
    variant, wan22_repo, wan22_i2v_a14b_repo, tmp_path
):
    """--gradient-checkpointing and --offload (block streaming through backward; the idle expert in host memory) train
    the LoRA(s) that a plain run trains; previews are MP4s (I2V-A14B's from the first training clip's first frame)."""
    repo = wan22_repo[0] if variant == "wan22" else wan22_i2v_a14b_repo[0]
    data = make_clips(tmp_path / "data", broken=False)
    common = ["--save-dtype", "fp32", "--steps", "2", "--lr", "1e-3", "--cache-dir", tmp_path / "cache"]
    common += ["--preview-every", "2", "--preview", "a red square", "--preview-steps", "1", "--preview-size", "64x64"]
    common += ["--bucket-step", "32" if variant == "wan22" else "16"]
    runs = {"plain": [], "checkpointed": ["--gradient-checkpointing"], "offload": ["--offload"]}
    for name, extra in runs.items():
        assert run(variant, repo, data, tmp_path / name, *common, *extra) == 0
    for name in runs:
        files = sorted((tmp_path / name).glob("*.safetensors"))
        assert len(files) == (1 if variant == "wan22" else 2)
        for f in files:
            with safe_open(f, "pt") as a, safe_open(tmp_path / "plain" / f.name, "pt") as b:
                for k in b.keys():
                    assert torch.allclose(a.get_tensor(k), b.get_tensor(k), atol=1e-5, rtol=1e-4), (name, f.name, k)
        preview = tmp_path / name / "previews" / "step000002-00.mp4"
        assert video.probe(preview)[0] == 5  # the shortest --frames
