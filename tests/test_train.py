"""train.py end to end on tiny models written in the official layout, and its data pipeline."""

import csv
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import diffusers_zimage_pipeline, rel
from PIL import Image
from safetensors.torch import load_file

import lora
import train
import zimage

SIZES = [(80, 64), (64, 96), (128, 128), (96, 64), (72, 72), (64, 80)]  # (width, height): several aspect ratios


def make_dataset(folder, n=6):
    """Simple generated pictures: a coloured square on a gradient, a caption naming its colour."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}
    for i, (w, h) in enumerate(SIZES[:n]):
        name, colour = list(colours.items())[i % 3]
        arr = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
        arr[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = colour
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {name} square on a gradient")
    return folder


@pytest.fixture
def flux_repo(flux1_repo):
    return flux1_repo[0]


def run(model, repo, data, out, *extra):
    argv = [
        model,
        "--weights",
        str(repo),
        "--data",
        str(data),
        "--output",
        str(out),
        "--resolution",
        "64",
        "--bucket-step",
        "16",
        "--device",
        "cpu",
        "--quiet",
        "--rank",
        "4",
        *map(str, extra),
    ]
    return train.main(argv)


def losses(out):
    with open(out / "log.csv") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------------------------
# Data


def test_bucket_size_never_upscales_and_keeps_aspect():
    assert train.bucket_size(1024, 768, 512, 64) == (384, 576)  # about 512^2 pixels at 4:3, sides multiples of 64
    assert train.bucket_size(1024, 1024, 512, 64) == (512, 512)
    assert train.bucket_size(300, 200, 512, 16) == (192, 288)  # smaller than the target: no upscaling
    assert train.bucket_size(3000, 1000, 512, 64) == (256, 832)  # 3:1 -> about 3.25:1 after rounding down
    assert train.bucket_size(40, 30, 512, 64) is None  # smaller than one step
    for w, h in [(640, 480), (480, 640), (1000, 1000), (1920, 1080)]:
        bh, bw = train.bucket_size(w, h, 512, 16)
        assert bh * bw <= 512 * 512 and bh % 16 == 0 and bw % 16 == 0 and bh <= h and bw <= w
        assert abs(bw / bh - w / h) / (w / h) < 0.1


def test_batches_come_from_one_bucket_and_cover_the_epoch():
    buckets = {(32, 48): [0, 1, 2, 3, 4], (48, 32): [5, 6], (64, 64): [7]}
    batches = train.epoch_batches(buckets, 2, seed=0, epoch=0)
    bucket_of = {i: key for key, ids in buckets.items() for i in ids}
    assert all(len({bucket_of[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches == train.epoch_batches(buckets, 2, seed=0, epoch=0)  # reproducible
    assert batches != train.epoch_batches(buckets, 2, seed=0, epoch=1)


def test_bad_files_are_skipped_and_counted(flux_repo, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 3)
    Image.new("RGB", (64, 64)).save(data / "no_caption.png")
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("broken")
    Image.new("RGB", (8, 8)).save(data / "tiny.png")
    (data / "tiny.txt").write_text("tiny")
    rotated = Image.new("RGB", (96, 64), (10, 200, 10))  # stored landscape, EXIF says rotate: used as portrait
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(data / "rotated.jpg", exif=exif)
    (data / "rotated.txt").write_text("a rotated photo")
    assert run("flux1", flux_repo, data, tmp_path / "out", "--steps", "1") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    assert "'missing caption': 1" in line and "'unreadable image': 1" in line
    assert "'image smaller than one bucket step': 1" in line and "6 captioned images, 4 training samples" in line
    assert train.open_image(data / "rotated.jpg").size == (64, 96)


def test_metadata_files(tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    for i in range(2):
        (data / f"img{i}.txt").unlink()
    rows = [
        {"file_name": "img0.png", "text": "first"},
        {"file_name": "img1.png", "text": ""},
        {"file_name": "gone.png", "text": "x"},
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    items, skipped = train.scan(data)
    assert [(p.name, c) for p, c in items] == [("img0.png", "first")]
    assert skipped == {"missing caption": 1, "missing image file": 1}
    (data / "metadata.jsonl").unlink()
    (data / "metadata.csv").write_text("file,caption\nimg1.png,second one\n")
    assert [(p.name, c) for p, c in train.scan(data)[0]] == [("img1.png", "second one")]


# ---------------------------------------------------------------------------------------------------------------------
# Training


def test_loss_drops(flux_repo, tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "out"
    assert run("flux1", flux_repo, data, out, "--steps", "40", "--lr", "3e-3", "--batch-size", "2", "--seed", "1") == 0
    curve = losses(out)
    assert len(curve) == 40
    first, last = np.mean(curve[:8]), np.mean(curve[-8:])
    assert last < 0.7 * first, (first, last)
    state = load_file(out / "lora-flux1.safetensors")
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in state


def test_resume_continues_exactly(flux_repo, tmp_path):
    data = make_dataset(tmp_path / "data")
    common = [
        "--lr",
        "1e-3",
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--caption-dropout",
        "0.3",
        "--lora-dropout",
        "0.1",
        "--warmup",
        "3",
        "--resolution",
        "64",
        "48",
    ]
    assert run("flux1", flux_repo, data, tmp_path / "straight", "--steps", "6", *common) == 0
    assert run("flux1", flux_repo, data, tmp_path / "resumed", "--steps", "3", *common) == 0
    assert run("flux1", flux_repo, data, tmp_path / "resumed", "--steps", "6", "--resume", *common, "--rank", "8") == 2
    assert run("flux1", flux_repo, data, tmp_path / "resumed", "--steps", "6", "--resume", *common) == 0
    a = load_file(tmp_path / "straight" / "lora-flux1.safetensors")
    b = load_file(tmp_path / "resumed" / "lora-flux1.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_second_run_reuses_the_cache(flux_repo, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 3)
    assert run("flux1", flux_repo, data, tmp_path / "a", "--steps", "1", "--cache-dir", tmp_path / "cache") == 0
    assert "encoded 3 latents and 4 prompts" in capsys.readouterr().out  # 3 captions and the empty one
    assert run("flux1", flux_repo, data, tmp_path / "b", "--steps", "1", "--cache-dir", tmp_path / "cache") == 0
    assert "encoded 0 latents and 0 prompts" in capsys.readouterr().out
    Image.open(data / "img0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(data / "img0.png")  # new content
    assert run("flux1", flux_repo, data, tmp_path / "c", "--steps", "1", "--cache-dir", tmp_path / "cache") == 0
    assert "encoded 1 latents and 0 prompts" in capsys.readouterr().out


def test_previews_and_flex_rules(flux_repo, tmp_path):
    data = make_dataset(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert (
        run(
            "flux1",
            flux_repo,
            data,
            out,
            "--steps",
            "2",
            "--preview-every",
            "2",
            "--preview",
            "a red square",
            "--preview-steps",
            "2",
            "--preview-size",
            "32x32",
            "--gradient-checkpointing",
        )
        == 0
    )
    assert (out / "previews" / "step000002-00.png").is_file()
    import flux1

    assert flux1.VARIANTS["flux1-dev"].train_guidance == 1.0 and flux1.VARIANTS["flex1-alpha"].train_guidance is None


def test_zimage_trains_on_base_and_its_lora_loads_in_diffusers(zimage_repo, tmp_path, capsys):
    root, refs = zimage_repo
    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "out"
    umask = os.umask(0o022)
    try:
        assert run("zimage", root, data, out, "--steps", "3", "--lr", "1e-2") == 0
    finally:
        os.umask(umask)
    path = out / "lora-zimage.safetensors"
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata, dtypes = f.metadata(), {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118
    assert metadata["base_model"] == "zimage-base" and dtypes == {torch.bfloat16}  # bf16 by default
    # The keys kohya's trainers write (musubi-tuner's values for Z-Image), and no local path of this machine.
    assert metadata["ss_base_model_version"] == "z_image" and metadata["modelspec.architecture"] == "Z-Image/lora"
    assert metadata["ss_network_dim"] == "4" and metadata["modelspec.title"] == "lora-zimage"
    assert not [v for v in metadata.values() if str(tmp_path) in v or str(root) in v], metadata
    assert json.loads(metadata["training"])["data"] == "data"
    assert oct(path.stat().st_mode & 0o777) == "0o644"  # readable by others, as the umask says
    pipe = zimage.load(root, dtype=torch.float32)
    pipe.load_lora(path)
    import copy

    ref_pipe = diffusers_zimage_pipeline({**refs, "transformer": copy.deepcopy(refs["transformer"])})
    ref_pipe.load_lora_weights(path)
    torch.manual_seed(0)
    x, caps, sigma = torch.randn(1, 16, 4, 6), [torch.randn(11, 32)], torch.tensor([0.4])
    with torch.no_grad():
        ours = pipe.velocity(x, sigma, {"caps": caps})
        theirs = -ref_pipe.transformer(list(x.unsqueeze(2).unbind(0)), 1 - sigma, caps, return_dict=False)[0][0]
    assert rel(ours, theirs.squeeze(1)[None]) < 1e-5
    assert len(lora.lora_layers(pipe.transformer)) == 28
    # Turbo is distilled: refused unless asked for.
    assert run("zimage-turbo", root, data, tmp_path / "t", "--steps", "1") == 2
    assert "step-distilled" in capsys.readouterr().err
    assert run("zimage-turbo", root, data, tmp_path / "t", "--steps", "1", "--allow-distilled") == 0


def test_bad_input_gets_one_line(tmp_path, capsys):
    assert train.main(["flux9", "--data", str(tmp_path)]) == 2
    assert "unknown model 'flux9'" in capsys.readouterr().err
    assert train.main(["flux1", "--data", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert train.main(["flux1", "--data", str(tmp_path), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "broken.pt").write_bytes(b"garbage")
    assert train.main(["flux1", "--data", str(tmp_path), "--resume", str(tmp_path / "broken.pt")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_int8_base(flux_repo, tmp_path, monkeypatch):
    import int8

    # The tiny model's layers are narrower than int8's default cut-off (128): quantise them all for this test.
    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.extend(original(m, min_features=16)) or quantized)
    data = make_dataset(tmp_path / "data", 3)
    assert run("flux1", flux_repo, data, tmp_path / "out", "--steps", "4", "--int8", "--lr", "1e-3") == 0
    assert "double_blocks.0.img_attn.qkv" in quantized
    assert all(np.isfinite(losses(tmp_path / "out")))
    assert load_file(tmp_path / "out" / "lora-flux1.safetensors")  # the LoRA itself stays float


def test_offload_trains_the_same_lora(flux_repo, tmp_path):
    data = make_dataset(tmp_path / "data", 3)
    common = [
        "--save-dtype",
        "fp32",  # compared at fp32 precision below
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--preview-every",
        "3",
        "--preview",
        "a red square",
        "--preview-steps",
        "1",
        "--preview-size",
        "32x32",
    ]
    assert run("flux1", flux_repo, data, tmp_path / "plain", *common) == 0
    assert run("flux1", flux_repo, data, tmp_path / "offload", *common, "--offload") == 0
    a = load_file(tmp_path / "plain" / "lora-flux1.safetensors")
    b = load_file(tmp_path / "offload" / "lora-flux1.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert {v.dtype for v in a.values()} == {torch.float32}
    assert (tmp_path / "offload" / "previews" / "step000003-00.png").is_file()


# ---------------------------------------------------------------------------------------------------------------------
# Training that loses nothing


def test_exif_rotated_photos_are_bucketed_as_displayed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    photo = Image.new("RGB", (96, 64), (10, 200, 10))  # stored landscape; EXIF 6 = shown rotated, i.e. portrait
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(data / "phone.jpg", exif=exif)
    (data / "phone.txt").write_text("a phone photo")
    items, skipped = train.scan(data)
    (s,) = train.plan_samples(items, [64], 16, skipped)
    height, width = s["bucket"]
    assert height > width and train.open_image(data / "phone.jpg").size == (64, 96)


def test_empty_captions_and_same_bucket_twice(tmp_path):
    data = make_dataset(tmp_path / "data", 3)
    (data / "img1.txt").write_text("  \n")
    Image.new("RGB", (40, 40)).save(data / "nocap.png")
    items, skipped = train.scan(data)
    assert skipped == {"empty caption": 1, "missing caption": 1}
    # img0 is 80x64: never upscaled, so 512 and 1024 both give its own size: trained once there, plus 48's bucket.
    samples = train.plan_samples(items, [512, 1024, 48], 16, skipped)
    assert sorted(s["bucket"] for s in samples if s["path"].name == "img0.png") == [(32, 48), (64, 80)]
    assert len({(s["path"], s["bucket"]) for s in samples}) == len(samples)


def interrupt_at(monkeypatch, call: int):
    """Send a real SIGINT to this process during the call-th micro-step (forward/backward), as Ctrl-C would."""
    import os
    import signal

    calls, original = [0], train.micro_step

    def step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(train, "micro_step", step)


def test_ctrl_c_writes_a_checkpoint_and_resume_is_exact(flux_repo, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data")
    common = ["--lr", "1e-3", "--batch-size", "2", "--caption-dropout", "0.3", "--checkpoint-every", "100"]
    assert run("flux1", flux_repo, data, tmp_path / "straight", "--steps", "5", *common) == 0
    interrupt_at(monkeypatch, 3)
    assert run("flux1", flux_repo, data, tmp_path / "stopped", "--steps", "5", *common) == 130
    err = capsys.readouterr().err
    assert "interrupted: checkpoint of step 3 written" in err and "--resume" in err
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)["position"]["step"] == 3
    monkeypatch.undo()
    assert run("flux1", flux_repo, data, tmp_path / "stopped", "--steps", "5", "--resume", *common) == 0
    a = load_file(tmp_path / "straight" / "lora-flux1.safetensors")
    b = load_file(tmp_path / "stopped" / "lora-flux1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "stopped")


def test_nan_stops_with_the_last_good_checkpoint(flux_repo, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", 3)
    calls, original = [0], train.micro_step

    def poisoned(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs) if calls[0] < 4 else float("nan")

    monkeypatch.setattr(train, "micro_step", poisoned)
    out = tmp_path / "out"
    assert run("flux1", flux_repo, data, out, "--steps", "6", "--checkpoint-every", "2") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged at step 4" in err[0] and "checkpoint.pt (step 2)" in err[0], err
    assert not (out / "lora-flux1.safetensors").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=False)["position"]["step"] == 2
    # Infinite gradients (finite loss) stop it too.
    monkeypatch.setattr(train, "micro_step", original)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: torch.tensor(float("inf")))
    assert run("flux1", flux_repo, data, tmp_path / "inf", "--steps", "2") == 1
    assert "gradient norm inf" in capsys.readouterr().err and not (tmp_path / "inf" / "lora-flux1.safetensors").exists()


def test_resume_with_new_lr_applies_it_and_records_it(flux_repo, tmp_path, capsys):
    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert run("flux1", flux_repo, data, out, "--steps", "2", "--lr", "1e-3") == 0
    assert run("flux1", flux_repo, data, out, "--steps", "4", "--lr", "5e-4", "--resume") == 0
    assert "resumed from step 2 with the new --lr 0.0005" in capsys.readouterr().out
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["lr"] for r in rows] == ["0.001", "0.001", "0.0005", "0.0005"]
    from safetensors import safe_open

    with safe_open(out / "lora-flux1.safetensors", "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["training"])["lr"] == 5e-4
    assert json.loads(meta["resumed_with_changes"]) == [[2, {"lr": 5e-4}]]
    assert str(tmp_path) not in json.dumps(meta)  # no local paths
    # A different model: said as such (not blamed on --rank).
    assert train.main(["zimage", "--data", str(data), "--output", str(out), "--resume", "--quiet"]) == 2
    assert "was trained on flux1-dev, not zimage-base" in capsys.readouterr().err


def test_resume_checks_come_before_loading(flux_repo, tmp_path, monkeypatch, capsys):
    import flux1

    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "out"
    assert run("flux1", flux_repo, data, out, "--steps", "1") == 0
    monkeypatch.setattr(flux1, "load", lambda *a, **k: pytest.fail("loaded the model before checking the checkpoint"))
    assert run("flux1", flux_repo, data, out, "--steps", "2", "--resume", "--rank", "8") == 2
    assert "--rank 4 (now 8)" in capsys.readouterr().err


def test_log_has_no_duplicate_rows_after_resume(flux_repo, tmp_path, monkeypatch):
    """The run wrote rows 1-3 but its last checkpoint is step 2 (as after a crash): resuming rewrites step 3 once,
    and the seconds column carries on from the checkpoint's time."""
    data = make_dataset(tmp_path / "data", 3)
    original = train.save_checkpoint

    def skip_step_3(path, transformer, optimizer, scheduler, position, *rest):
        if position.step != 3:
            original(path, transformer, optimizer, scheduler, position, *rest)

    monkeypatch.setattr(train, "save_checkpoint", skip_step_3)
    out = tmp_path / "out"
    assert run("flux1", flux_repo, data, out, "--steps", "3", "--checkpoint-every", "2") == 0
    monkeypatch.undo()
    assert run("flux1", flux_repo, data, out, "--steps", "4", "--resume") == 0
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    seconds = [float(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds) and seconds[2] >= seconds[1]


def test_full_disk_keeps_the_previous_checkpoint(flux_repo, tmp_path, monkeypatch, capsys):
    data = make_dataset(tmp_path / "data", 3)
    out = tmp_path / "out"
    original, saves = torch.save, [0]

    def save(obj, f, *args, **kwargs):
        saves[0] += 1
        if saves[0] == 2:  # the second checkpoint: the disk fills up half-way
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert run("flux1", flux_repo, data, out, "--steps", "4", "--checkpoint-every", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "previous checkpoint is intact" in err[0]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["position"]["step"] == 2
    assert not list(out.glob("*.tmp"))


def test_progress_bars_for_the_long_phases(flux_repo, tmp_path, monkeypatch):
    import tqdm.auto

    import flux1

    descriptions = []
    real = tqdm.auto.tqdm

    def recording(*args, **kwargs):
        descriptions.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    monkeypatch.setattr(flux1, "tqdm", recording)
    data = make_dataset(tmp_path / "data", 2)
    argv = ["flux1", "--weights", str(flux_repo), "--data", str(data), "--output", str(tmp_path / "o")]
    argv += ["--resolution", "64", "--bucket-step", "16", "--device", "cpu", "--rank", "2", "--steps", "1"]
    assert train.main(argv) == 0  # without --quiet
    assert {"loading flux1-dev", "caching latents", "caching prompts", "train flux1-dev"} <= set(descriptions)
