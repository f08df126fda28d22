"""The bad-input table: what a user can get wrong in sample.py and train.py, the exit code, and the one line that says
what to do. Every row must end in exactly one line on stderr, never a traceback, and a non-zero exit code.

Rows that need no model run in-process (fast); the tiny FLUX.1 repo is used where the failure comes after loading."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample
import train

ROOT = Path(__file__).resolve().parents[1]
NO_FILE = "/no/such/place"

# (command, arguments, exit code, text the one line must contain)
TABLE = [
    # sample.py
    ("sample", ["flux3", "a cat"], 2, "unknown model 'flux3'"),
    ("sample", ["flux1", "a cat", "--weights", NO_FILE], 2, f"--weights {NO_FILE}: no such folder"),
    ("sample", ["flux1", "a cat", "--size", "1000x1000"], 2, "multiples of 16"),
    ("sample", ["flux1", "a cat", "--size", "big"], 2, "expected WIDTHxHEIGHT"),
    ("sample", ["flux1", "a cat", "--solver", "heun"], 2, "unknown solver 'heun'"),
    ("sample", ["flux1", "a cat", "--guidance", "lots"], 2, "--guidance 'lots': expected a finite number"),
    ("sample", ["flux1", "a cat", "--guidance", "nan"], 2, "--guidance 'nan': expected a finite number"),
    ("sample", ["flux1", "a cat", "--cfg", "inf"], 2, "--cfg inf: must be a finite number"),
    ("sample", ["flux1", "a cat", "--strength", "1.5"], 2, "--strength 1.5: must be between 0 and 1"),
    ("sample", ["flux1", "a cat", "--steps", "0"], 2, "--num and --steps must be at least 1"),
    ("sample", ["flux1", "a cat", "--seed", "-1"], 2, "--seed -1: must be between 0 and 2**63"),
    ("sample", ["flux1", "a cat", "--seed", str(2**64)], 2, f"--seed {2**64}: must be between 0 and 2**63"),
    ("sample", ["flux1", "a cat", "--device", "toaster"], 2, "--device 'toaster': not a device name"),
    ("sample", ["flux1", "a cat", "--device", "meta"], 2, "--device meta holds no data"),
    ("sample", ["flux1", "a cat", "--init-image", NO_FILE + ".png"], 2, "cannot read --init-image"),
    ("sample", ["flux1", "a cat", "--lora", NO_FILE + ".safetensors"], 2, "no such file"),
    ("sample", ["flux1", "a cat", "--frames", "5"], 2, "--frames and --fps are for video models"),
    ("sample", ["wan22", "a cat", "--frames", "10"], 2, "--frames 10: must be 4k+1"),
    ("sample", ["wan22", "a cat", "--size", "1000x704"], 2, "multiples of 32"),
    ("sample", ["wan22", "a cat", "--image", NO_FILE + ".png"], 2, "cannot read --image"),
    ("sample", ["wan22", "a cat", "--fps", "inf"], 2, "--fps inf: must be a finite number"),
    ("sample", ["flux2", "a cat", "--image", NO_FILE + ".png"], 2, "cannot read --image"),
    # train.py
    ("train", ["flux9", "--data", "{data}"], 2, "unknown model 'flux9'"),
    ("train", ["flux1", "--data", NO_FILE], 2, f"--data {NO_FILE}: no such folder"),
    ("train", ["flux1", "--data", "{empty}"], 2, "no usable images in"),
    ("train", ["flux1", "--data", "{data}", "--lr", "0"], 2, "--lr 0.0: must be a positive number"),
    ("train", ["flux1", "--data", "{data}", "--lr", "nan"], 2, "--lr nan: must be a positive number"),
    ("train", ["flux1", "--data", "{data}", "--rank", "0"], 2, "--rank must be at least 1"),
    ("train", ["flux1", "--data", "{data}", "--caption-dropout", "2"], 2, "--caption-dropout must be in [0, 1]"),
    ("train", ["flux1", "--data", "{data}", "--bucket-step", "24"], 2, "--bucket-step must be a multiple of 16"),
    ("train", ["flux1", "--data", "{data}", "--resolution", "32"], 2, "--resolution 32 is smaller than --bucket"),
    ("train", ["flux1", "--data", "{data}", "--output", "{file}"], 2, "is a file; give a folder"),
    ("train", ["flux1", "--data", "{data}", "--resume"], 2, "--resume: no checkpoint at"),
    ("train", ["flux1", "--data", "{data}", "--resume", "{file}"], 2, "--resume: cannot read"),
    ("train", ["flux1", "--data", "{data}", "--preview-size", "7x7"], 2, "--size 7x7"),
    ("train", ["zimage-turbo", "--data", "{data}"], 2, "step-distilled"),
    ("train", ["flux2-klein-4b", "--data", "{data}"], 2, "step-distilled"),
    ("train", ["flux1", "--data", "{data}", "--shard"], 2, "--shard splits the model over the processes of a torchrun"),
    ("train", ["flux1", "--data", "{data}", "--shard", "--offload"], 2, "--shard and --offload do not combine"),
]


@pytest.fixture
def places(tmp_path):
    data, empty = tmp_path / "data", tmp_path / "empty"
    data.mkdir(), empty.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    (empty / "notes.txt").write_text("no images here")
    (tmp_path / "file.bin").write_bytes(b"not a checkpoint")
    return {"data": str(data), "empty": str(empty), "file": str(tmp_path / "file.bin")}


@pytest.mark.parametrize("command, argv, code, message", TABLE, ids=[" ".join(r[1][:4]) for r in TABLE])
def test_bad_input_table(command, argv, code, message, places, capsys, monkeypatch):
    import flux1

    # None of these may get as far as loading a model: the cheap checks come first.
    monkeypatch.setattr(flux1, "load", lambda *a, **k: pytest.fail("loaded a model before refusing bad input"))
    argv = [a.format(**places) for a in argv]
    out = [] if "--output" in argv else ["--output", str(Path(places["data"]).parent / "out")]
    if command == "sample":
        got = sample.main([*argv, "--out", str(Path(places["data"]).parent / "out"), "--quiet"])
    else:
        got = train.main([*argv, *out, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert got == code
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_every_default_is_shown_in_help():
    for parser in (train.build_parser(), sample.build_parser()):
        text = parser.format_help()
        assert "Traceback" not in text
    help_text = train.build_parser().format_help()
    assert "write OUTPUT/checkpoint.pt every N steps (default: 250)" in " ".join(help_text.split())
    assert "(default: 0.0001)" in help_text and "(default: logit_normal)" in help_text


def test_out_file_name(flux1_repo, tmp_path):
    repo = flux1_repo[0]
    common = ["flux1", "x", "--weights", str(repo), "--size", "32x32", "--steps", "1", "--device", "cpu", "--quiet"]
    assert sample.main([*common, "--seed", "5", "--out", str(tmp_path / "one" / "fox.png")]) == 0
    assert [p.name for p in (tmp_path / "one").iterdir()] == ["fox.png"]  # a file, not a folder named fox.png
    two = [common[0], "x", "y", *common[2:]]
    assert sample.main([*two, "--seed", "5", "--out", str(tmp_path / "two" / "fox.png")]) == 0
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["fox-00000.png", "fox-00001.png"]
    assert Image.open(tmp_path / "two" / "fox-00001.png").text["seed"] == "6"


def test_full_disk_while_writing_a_png(flux1_repo, tmp_path, monkeypatch, capsys):
    repo = flux1_repo[0]

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    argv = ["flux1", "x", "--weights", str(repo), "--size", "32x32", "--steps", "1", "--device", "cpu", "--quiet"]
    assert sample.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "00000-" in err[0]
    assert list((tmp_path / "out").iterdir()) == []  # no .tmp left behind, no half-written PNG


def test_internal_errors_keep_their_traceback(monkeypatch):
    """A bug is not bad input: run_cli lets it through (with its traceback) instead of a misleading one-liner."""

    def broken(args):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        sample.run_cli(broken, None)
    assert sample.run_cli(lambda args: (_ for _ in ()).throw(KeyboardInterrupt()), None) == 130
    assert sample.run_cli(lambda args: (_ for _ in ()).throw(PermissionError(13, "Permission denied", "/x")), None) == 1


def test_ctrl_c_in_sample_is_one_line(flux1_repo, tmp_path):
    """A real SIGINT to a running sample.py: one line, exit code 130."""
    import signal
    import time

    repo = flux1_repo[0]
    cmd = [sys.executable, str(ROOT / "sample.py"), "flux1", "x", "--weights", str(repo), "--size", "64x64"]
    cmd += ["--steps", "100000", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(5)  # usually sampling by now; an interrupt during start-up must give the same one line
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err


def test_readme_stands_alone():
    text = (ROOT / "README.md").read_text()
    assert "../shared" not in text and "shared/" not in text
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text


def test_default_training_output_is_ignored_by_git():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "/output/" in ignored
