"""sample.py end to end on a tiny FLUX.1 repo written in the official layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(flux1_repo):
    return flux1_repo[0]


def cli(*args):
    """Run sample.py as a user would: a separate process, exit code and output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_cli_writes_pngs_with_metadata(repo, tmp_path):
    out = tmp_path / "new" / "folder"  # created if missing
    r = cli(
        "flux1",
        "a photo of a cat",
        "--weights",
        repo,
        "--size",
        "48x32",
        "--steps",
        "2",
        "--seed",
        "11",
        "--num",
        "2",
        "--out",
        out,
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-11.png", "00001-12.png"]
    assert r.stdout.strip().splitlines()[-1].startswith("wrote 2 image(s)") and str(files[1]) in r.stdout
    image = Image.open(files[0])
    assert image.size == (48, 32)
    meta = image.text
    assert meta["prompt"] == "a photo of a cat" and meta["seed"] == "11" and meta["steps"] == "2"
    settings = json.loads(meta["parameters"])
    assert settings["model"] == "flux1" and settings["variant"] == "flux1-dev" and settings["size"] == "48x32"
    assert settings["solver"] == "euler" and settings["guidance"] == 3.5 and settings["cfg"] == 1.0


def test_same_seed_same_image_and_more_options(repo, tmp_path):
    common = ["--weights", str(repo), "--size", "32x32", "--steps", "2", "--device", "cpu", "--quiet"]
    assert sample.main(["flux1-dev", "a fox", "--seed", "5", "--out", str(tmp_path / "a"), *common]) == 0
    assert sample.main(["flux1-dev", "a fox", "--seed", "5", "--out", str(tmp_path / "b"), *common]) == 0
    assert sample.main(["flux1-dev", "a fox", "--seed", "6", "--out", str(tmp_path / "c"), *common]) == 0
    a, b, c = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # CFG with a negative prompt, bypassed guidance, another solver, image-to-image: all recorded.
    init = tmp_path / "init.jpg"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(init)
    argv = [
        "flux1-dev",
        "a fox",
        "--seed",
        "1",
        "--out",
        str(tmp_path / "d"),
        "--cfg",
        "2",
        "--negative",
        "blurry",
        "--guidance",
        "off",
        "--solver",
        "unipc",
        "--init-image",
        str(init),
        "--strength",
        "0.5",
        *common[2:],
    ]
    argv.remove("--size"), argv.remove("32x32")
    assert sample.main(argv + ["--weights", str(repo)]) == 0
    image = Image.open(next((tmp_path / "d").glob("*.png")))
    assert image.size == (48, 32)  # the init image's size, cropped to a multiple of 16
    settings = json.loads(image.text["parameters"])
    assert settings["guidance"] == "off" and settings["cfg"] == 2.0 and settings["negative_prompt"] == "blurry"
    assert settings["solver"] == "unipc" and settings["strength"] == 0.5 and settings["init_image"] == str(init)


def test_outputs_are_never_overwritten(repo, tmp_path):
    common = [*tiny_run(repo, seed=3), "--out", str(tmp_path)]
    assert sample.main(common) == 0 and sample.main(common) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-3.png", "00001-3.png"]


def tiny_run(repo, seed: int) -> list[str]:
    """Arguments of a fast sample.py run on the tiny repo."""
    return [
        "flux1",
        "x",
        "--weights",
        str(repo),
        "--size",
        "32x32",
        "--steps",
        "2",
        "--seed",
        str(seed),
        "--device",
        "cpu",
        "--quiet",
    ]


def one_line_error(r, *needles):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["flux3", "a cat"], ["unknown model 'flux3'", "flux1-dev", "flex1-alpha"]),
        (["flux1", "a cat", "--weights", "/no/such/folder"], ["/no/such/folder"]),
        (["flux1", "a cat", "--size", "1000x1000"], ["multiples of 16"]),
        (["flux1", "a cat", "--size", "big"], ["WIDTHxHEIGHT"]),
        (["flux1", "a cat", "--solver", "heun"], ["unknown solver 'heun'", "dpmpp_2m"]),
        (["flux1", "a cat", "--init-image", __file__], ["cannot read --init-image"]),
        (["flux1", "a cat", "--guidance", "lots"], ["--guidance"]),
        (["flux1", "a cat", "--device", "toaster"], ["--device 'toaster'"]),
    ],
)
def test_bad_input_gets_one_line(args, needles):
    device = [] if "--device" in args else ["--device", "cpu"]
    one_line_error(cli(*args, *device), *needles)


def test_broken_weights_folder_gets_one_line(repo, tmp_path):
    import shutil

    broken = tmp_path / "repo"
    shutil.copytree(repo, broken)
    shutil.rmtree(broken / "text_encoder_2")
    one_line_error(cli("flux1", "a cat", "--weights", broken, "--device", "cpu"), "text_encoder_2")
    shutil.copytree(repo / "text_encoder_2", broken / "text_encoder_2")
    data = (broken / "flux1-dev.safetensors").read_bytes()
    (broken / "flux1-dev.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(cli("flux1", "a cat", "--weights", broken, "--device", "cpu"), "flux1-dev.safetensors")


def test_lora_option(repo, tmp_path):
    import torch

    import flux1
    import lora

    pipe = flux1.load(repo, dtype=torch.float32)
    lora.add_lora(pipe.transformer, flux1.LORA_TARGETS, rank=2)
    with torch.no_grad():
        for p in lora.lora_parameters(pipe.transformer):
            p.normal_(0, 0.5)
    lora.save(pipe.transformer, tmp_path / "style.safetensors", flux1.LORA_FORMAT)
    common = tiny_run(repo, seed=3)
    assert sample.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert (
        sample.main([*common, "--out", str(tmp_path / "lora"), "--lora", f"{tmp_path / 'style.safetensors'}:0.8"]) == 0
    )
    plain, styled = (Image.open(next((tmp_path / d).glob("*.png"))) for d in ("plain", "lora"))
    assert not np.array_equal(np.asarray(plain), np.asarray(styled))
    assert styled.text["loras"] == "style.safetensors:0.8"
    one_line_error(cli(*common, "--lora", tmp_path / "missing.safetensors"), "--lora", "no such file")
    # A bad scale is reported as that, not as a missing file; a tensor the model cannot take is named in a warning,
    # and --lora-strict refuses the file.
    one_line_error(cli(*common, "--lora", f"{tmp_path / 'style.safetensors'}:abc"), "the scale 'abc'")
    from safetensors.torch import load_file, save_file

    extra = load_file(tmp_path / "style.safetensors") | {"lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4)}
    save_file(extra, tmp_path / "extra.safetensors")
    r = cli(*common, "--out", tmp_path / "extra", "--lora", tmp_path / "extra.safetensors")
    assert r.returncode == 0 and "warning: extra.safetensors: 1 of" in r.stderr, r.stderr
    one_line_error(cli(*common, "--lora", tmp_path / "extra.safetensors", "--lora-strict"), "lora_unet_no_such_layer")


def test_lora_argument_parsing(tmp_path):
    (tmp_path / "a.safetensors").touch()
    (tmp_path / "odd:name.safetensors").touch()
    assert sample.parse_lora(f"{tmp_path}/a.safetensors:0.5") == (tmp_path / "a.safetensors", 0.5)
    assert sample.parse_lora(f"{tmp_path}/a.safetensors") == (tmp_path / "a.safetensors", 1.0)
    assert sample.parse_lora(f"{tmp_path}/odd:name.safetensors") == (tmp_path / "odd:name.safetensors", 1.0)
    for text, message in [
        ("a.safetensors:abc", "the scale 'abc'"),
        ("a.safetensors:nan", "finite"),
        ("a.safetensors:-inf", "finite"),
        ("missing.safetensors:0.5", "no such file"),
        ("missing:abc", "no such file"),
    ]:
        with pytest.raises(sample.UsageError, match=message):
            sample.parse_lora(f"{tmp_path}/{text}")


def test_int8_option(repo, tmp_path, monkeypatch):
    import int8

    quantized = []
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: quantized.extend(original(m, min_features=16)) or quantized)
    common = tiny_run(repo, seed=3)
    assert sample.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert sample.main([*common, "--out", str(tmp_path / "int8"), "--int8"]) == 0
    assert "single_blocks.0.linear1" in quantized
    plain, quant = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))).astype(float) for d in ("plain", "int8"))
    assert 0 < np.abs(plain - quant).mean() < 20  # close to float, but not the float path


@pytest.mark.parametrize("mode", ["model", "blocks"])
def test_offload_option_gives_the_same_image(repo, tmp_path, mode):
    common = tiny_run(repo, seed=4)
    assert sample.main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert sample.main([*common, "--out", str(tmp_path / "offload"), "--offload", mode]) == 0
    plain, offloaded = (np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("plain", "offload"))
    assert np.abs(plain.astype(int) - offloaded.astype(int)).max() <= 1  # bit-exact up to rounding of the last step
