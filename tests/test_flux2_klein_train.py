"""train.py on FLUX.2-klein: edit pairs (a target with reference images), the loss, exact resume, the LoRA in
diffusers, the distilled-model rule, --int8 and --offload; on the tiny official-layout repo."""

import copy

import numpy as np
import pytest
import torch
from fakes import diffusers_flux2_pipeline, diffusers_flux2_velocity, rel, write_flux2_repo
from PIL import Image
from safetensors.torch import load_file
from test_train import losses, make_dataset, run

import flux2_klein as fk
import lora
import train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def square(size, colour, at):
    w, h = size
    arr = np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3))
    x, y = at
    arr[y : y + h // 2, x : x + w // 2] = colour
    return Image.fromarray(arr)


def make_edit_pairs(folder, n=4):
    """Edit pairs: the reference has a grey square, the target the same square in a colour the caption names; the
    last pair has a second reference that says where the square goes."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, colour) in enumerate(list(COLOURS.items())[:n]):
        at = (8 * (i % 3), 16 - 8 * (i % 3))
        square((64, 64), (128, 128, 128), at).save(folder / f"pair{i}_ref0.png")
        square((64, 64), colour, at).save(folder / f"pair{i}.png")
        (folder / f"pair{i}.txt").write_text(f"make the square {name}")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(folder / f"pair{n - 1}_ref1.jpg")
    return folder


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory):
    """A tiny klein-base repo (undistilled), as train.py flux2 trains on."""
    root = tmp_path_factory.mktemp("flux2-klein-base-4b")
    return root, write_flux2_repo(root, "flux-2-klein-base-4b.safetensors", distilled=False)


@pytest.mark.slow
def test_loss_falls_on_edit_pairs(base_repo, tmp_path, capsys):
    """30 CPU steps on four generated edit pairs. The tiny random model's output scale is set by its final adaLN
    modulation, which the default targets leave frozen; training that layer as well lets the loss show progress in a
    few steps (the default targets alone are exercised by the tests below)."""
    root, _ = base_repo
    data = make_edit_pairs(tmp_path / "data")
    assert [p.name for p in train.find_references(data / "pair3.png")] == ["pair3_ref0.png", "pair3_ref1.jpg"]
    out = tmp_path / "out"
    targets = ["--lora-targets", *fk.LORA_TARGETS, "final_layer.adaLN_modulation.1"]
    assert run("flux2", root, data, out, "--steps", "30", "--lr", "1e-2", "--batch-size", "3", *targets) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("data:"))
    # 4 targets (the _ref files are not targets) of one size; 4 targets + 5 references, of which pair0_ref0 and
    # pair3_ref0 are the same picture, cached once.
    assert "4 captioned images, 4 training samples (4 edit pairs) in 1 buckets" in line
    assert "encoded 8 latents" in line
    curve = losses(out)
    assert len(curve) == 30
    first, last = np.mean(curve[:6]), np.mean(curve[-6:])
    assert last < 0.6 * first, (first, last)
    state = load_file(out / "lora-flux2.safetensors")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight" in state
    assert all(f"diffusion_model.single_blocks.{i}.linear{j}.lora_B.weight" in state for i in (0, 1) for j in (1, 2))


def test_resume_continues_exactly(base_repo, tmp_path):
    root, _ = base_repo
    data = make_edit_pairs(tmp_path / "data")
    common = ["--lr", "1e-3", "--batch-size", "2", "--caption-dropout", "0.3", "--lora-dropout", "0.1"]
    common += ["--cache-dir", str(tmp_path / "cache")]
    assert run("flux2", root, data, tmp_path / "straight", "--steps", "4", *common) == 0
    assert run("flux2", root, data, tmp_path / "resumed", "--steps", "2", *common) == 0
    assert run("flux2", root, data, tmp_path / "resumed", "--steps", "4", "--resume", *common) == 0
    a = load_file(tmp_path / "straight" / "lora-flux2.safetensors")
    b = load_file(tmp_path / "resumed" / "lora-flux2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "straight") == losses(tmp_path / "resumed")


def test_trained_lora_gives_diffusers_the_same_velocity(base_repo, tmp_path):
    root, refs = base_repo
    data = make_edit_pairs(tmp_path / "data", 2)
    out = tmp_path / "out"
    assert run("flux2", root, data, out, "--steps", "3", "--lr", "1e-2") == 0
    path = out / "lora-flux2.safetensors"
    pipe = fk.load(root, dtype=torch.float32)
    assert pipe.variant == "flux2-klein-base-4b"
    pipe.load_lora(path)
    ref_pipe = diffusers_flux2_pipeline({**refs, "transformer": copy.deepcopy(refs["transformer"])})
    ref_pipe.load_lora_weights(path)
    torch.manual_seed(0)
    x, txt, references = torch.randn(1, 128, 4, 4), torch.randn(1, 11, 48), [torch.randn(1, 128, 4, 4)]
    with torch.no_grad():
        ours = pipe.velocity(x, 0.4, {"txt": txt}, references)
        theirs = diffusers_flux2_velocity(ref_pipe.transformer, x, 0.4, txt, references)
        base = diffusers_flux2_velocity(refs["transformer"], x, 0.4, txt, references)
    assert rel(ours, theirs) < 1e-5 and rel(theirs, base) > 1e-3
    assert len(lora.lora_layers(pipe.transformer)) == 2 * 8 + 2 * 2


def test_distilled_needs_allow_distilled_and_other_models_refuse_edit_pairs(flux2_repo, zimage_repo, tmp_path, capsys):
    data = make_edit_pairs(tmp_path / "data", 2)
    assert run("flux2-klein-4b", flux2_repo[0], data, tmp_path / "a", "--steps", "1") == 2
    assert "step-distilled" in capsys.readouterr().err
    assert run("flux2-klein-4b", flux2_repo[0], data, tmp_path / "a", "--steps", "1", "--allow-distilled") == 0
    capsys.readouterr()
    assert run("zimage", zimage_repo[0], data, tmp_path / "z", "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "takes no reference images" in err


def test_int8_and_offload(base_repo, tmp_path, monkeypatch):
    import int8

    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.extend(original(m, min_features=16)) or quantized)
    root, _ = base_repo
    data = make_edit_pairs(tmp_path / "data", 2)
    make_dataset(data, 2)  # plain text-to-image samples mixed in
    common = ["--steps", "2", "--lr", "1e-3", "--cache-dir", str(tmp_path / "cache")]
    assert run("flux2", root, data, tmp_path / "plain", *common) == 0
    assert run("flux2", root, data, tmp_path / "offload", *common, "--offload") == 0
    assert run("flux2", root, data, tmp_path / "int8", *common, "--int8") == 0
    assert "double_blocks.0.img_attn.qkv" in quantized and not any("modulation" in n for n in quantized)
    a, b = (load_file(tmp_path / d / "lora-flux2.safetensors") for d in ("plain", "offload"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    assert all(np.isfinite(losses(tmp_path / "int8")))
