"""train.py under torchrun on the CPU (gloo, 2 processes, one thread each): the same LoRA as one process with the same
global batch (data parallel and --shard), exact resume, a shared caching pass, and failures that end every rank.

The ranks are separate Python processes started like torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), either
by torchrun itself or by `launch` below, which can also install test hooks in them (count encoder calls, make one rank
fail) and kill one of them."""

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import losses, make_dataset

import distributed
import train

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds for one multi-process run on this shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, size: int, port: int) -> dict:
    return {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(size),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(size),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }


def start(argv: list, logs: Path, size: int = 2, **hooks) -> list[subprocess.Popen]:
    """`size` processes running train.main(argv) as torchrun's workers would, each through `worker` (hooks applied),
    stdout/stderr to logs/rank<r>.out/.err."""
    logs.mkdir(parents=True, exist_ok=True)
    port, spec = free_port(), json.dumps({"argv": [str(a) for a in argv], "hooks": hooks, "logs": str(logs)})
    procs = []
    for rank in range(size):
        out, err = open(logs / f"rank{rank}.out", "w"), open(logs / f"rank{rank}.err", "w")  # noqa: SIM115
        env = rank_env(rank, size, port) | {"RF_TEST_SPEC": spec}
        code = "import test_distributed; test_distributed.worker()"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err, cwd=ROOT))
    return procs


def finish(procs, logs: Path, timeout: float = TIMEOUT) -> list[tuple[int, str, str]]:
    deadline = time.time() + timeout
    try:
        codes = [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [
        (code, (logs / f"rank{r}.out").read_text(), (logs / f"rank{r}.err").read_text()) for r, code in enumerate(codes)
    ]


def launch(argv, logs: Path, size: int = 2, **hooks):
    return finish(start(argv, logs, size, **hooks), logs)


def worker():
    """One rank: apply the test hooks, then run train.py's command line as `python train.py` would."""
    spec = json.loads(os.environ["RF_TEST_SPEC"])
    hooks, rank = spec["hooks"], int(os.environ["RANK"])
    torch.set_num_threads(1)
    if hooks.get("count_encoders"):
        import atexit

        import flux1

        calls = {"encode": 0, "encode_prompt": 0}
        for name in calls:
            original = getattr(flux1.Flux1Pipeline, name)

            def counting(self, *args, _name=name, _original=original, **kwargs):
                calls[_name] += 1
                return _original(self, *args, **kwargs)

            setattr(flux1.Flux1Pipeline, name, counting)
        atexit.register(lambda: (Path(spec["logs"]) / f"calls{rank}.json").write_text(json.dumps(calls)))
    if "int8_min_features" in hooks:
        import int8

        original_quantize = int8.quantize
        int8.quantize = lambda m: original_quantize(m, min_features=hooks["int8_min_features"])
    if hooks.get("record_shards"):  # what FSDP2 made of the first INT8 layer and the first LoRA weight
        import distributed

        original_shard = distributed.shard

        def shard(world, transformer, device):
            original_shard(world, transformer, device)
            import int8
            import lora

            layer = next(iter(int8.quantized_layers(transformer).values()))
            seen = {"int8": layer.weight, "lora_A": next(iter(lora.lora_layers(transformer).values())).lora_A}
            record = {
                k: [type(t).__name__, str(t.dtype), list(t.shape), list(t.to_local().shape)] for k, t in seen.items()
            }
            (Path(spec["logs"]) / f"shards{rank}.json").write_text(json.dumps(record))

        distributed.shard = shard
    if hooks.get("full_disk_on_rank") == rank:  # this rank's disk is full while it caches its share
        import errno

        def full(path, tensors):
            raise OSError(errno.ENOSPC, "No space left on device")

        train.save_tensors = lambda path, tensors: train.atomic_write(path, lambda tmp: full(tmp, tensors))
    sys.exit(train.main(spec["argv"]))


def common(repo, data, out, *extra, model="flux1"):
    return [
        model,
        "--weights",
        repo,
        "--data",
        data,
        "--output",
        out,
        "--resolution",
        "64",
        "--bucket-step",
        "16",
        "--device",
        "cpu",
        "--quiet",
        "--rank",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--save-dtype",
        "fp32",
        *extra,
    ]


def lora_close(a_path, b_path, median=1e-5, worst=1e-2):
    """The issue's rule: a batch-2 forward and two batch-1 forwards differ by float rounding, which Adam's per-element
    scaling amplifies in a few tensors; so the median tensor within `median`, every tensor within `worst`."""
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    rel = sorted(float((a[k] - b[k]).norm() / a[k].norm()) for k in a if a[k].norm() > 0)
    assert rel and rel[len(rel) // 2] <= median and rel[-1] <= worst, (rel[len(rel) // 2], rel[-1])
    return rel


def make_data(folder: Path) -> Path:
    """Five images in three buckets (so a bucket's last global batch is short) and one that is broken past its header
    (its size reads fine; decoding fails while caching): sample 5, so rank 1's share."""
    make_dataset(folder, 5)
    Image.new("RGB", (64, 64), (200, 10, 10)).save(folder / "zz_broken.png")
    data = (folder / "zz_broken.png").read_bytes()
    (folder / "zz_broken.png").write_bytes(data[: len(data) // 2])
    (folder / "zz_broken.txt").write_text("a broken picture")
    return folder


# ---------------------------------------------------------------------------------------------------------------------


def test_share_splits_every_global_batch_exactly():
    for size in (2, 3, 4):
        for n in range(1, 13):
            parts = []
            for rank in range(size):
                group = object.__new__(distributed.Group)
                group.rank, group.size = rank, size
                parts.append(group.share(n))
            covered = [i for part, weight in parts if weight > 0 for i in range(n)[part]]
            assert covered == list(range(n))  # each sample once, in order
            assert abs(sum(w for _, w in parts) - 1) < 1e-12
            assert all(weight == len(range(n)[part]) / n or weight == 0 for part, weight in parts)
            if n == 2 * size:  # a full batch of --batch-size 2: two each
                assert all(len(range(n)[part]) == 2 for part, _ in parts)
    assert distributed.current().share(4) is None  # one process: micro_step's own path


@pytest.fixture(scope="module")
def reference(flux1_repo, tmp_path_factory):
    """One process, --batch-size 4 (= 2 processes x 2), grad-accum 2, caption dropout: 3 steps (2, then resumed: one
    process resumes exactly, see test_train; its step-2 checkpoint is kept as one-step2.pt). Returns the folder, the
    repo, the data, the common arguments and the run's "data:" line."""
    root = tmp_path_factory.mktemp("ddp")
    data = make_data(root / "data")
    repo = flux1_repo[0]
    extra = ["--steps", "3", "--grad-accum", "2", "--caption-dropout", "0.3", "--checkpoint-every", "2"]
    first = [*extra[:1], "2", *extra[2:]]  # --steps 2
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train.main([str(a) for a in common(repo, data, root / "one", *first, "--batch-size", "4")]) == 0
        shutil.copy(root / "one" / "checkpoint.pt", root / "one-step2.pt")
        argv = common(repo, data, root / "one", *extra, "--batch-size", "4", "--resume")
        assert train.main([str(a) for a in argv]) == 0
    line = next(x for x in printed.getvalue().splitlines() if x.startswith("data:"))
    return root, repo, data, extra, line.split(" (the rest")[0]


@pytest.mark.slow
def test_two_processes_train_the_one_process_lora(reference):
    root, repo, data, extra, one_line = reference
    two = root / "two"
    results = launch(common(repo, data, two, *extra, "--batch-size", "2"), root / "logs-two", count_encoders=True)
    assert [code for code, _, _ in results] == [0, 0], results
    rel = lora_close(root / "one" / "lora-flux1.safetensors", two / "lora-flux1.safetensors")
    print(f"data parallel vs one process: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")
    assert losses(two) == pytest.approx(losses(root / "one"), rel=1e-5)
    # The broken file (in rank 1's share) is skipped and counted as one process counts it, and the totals of the
    # caching pass are one process's: rank 0 prints the same line.
    line = next(x for x in results[0][1].splitlines() if x.startswith("data:"))
    assert line.split(" (the rest")[0] == one_line
    assert "skipped {'unreadable image': 1}" in line and "encoded 5 latents and 4 prompts" in line, line
    # Not repeated: each image and each distinct prompt went through an encoder once, on one of the ranks.
    calls = [json.loads((root / "logs-two" / f"calls{r}.json").read_text()) for r in range(2)]
    assert [c["encode"] for c in calls] == [3, 2]  # samples 0, 2, 4 and 1, 3 (5 is the broken one)
    assert [c["encode_prompt"] for c in calls] == [2, 2]  # 3 distinct captions and the empty one
    # Rank 1 is silent; rank 0 speaks as one process does.
    assert results[1][1] == "" and results[1][2] == ""
    assert "wrote" in results[0][1]


@pytest.mark.slow
def test_resume_under_two_processes_is_exact(reference, capsys):
    """With --lora-dropout too: each rank's own RNG state is in the checkpoint."""
    root, repo, data, extra, _ = reference
    extra = [*extra, "--lora-dropout", "0.2", "--batch-size", "2"]
    first = [*extra[:1], "2", *extra[2:]]  # --steps 2
    straight, stopped = root / "dropout-straight", root / "dropout-stopped"
    assert [c for c, _, _ in launch(common(repo, data, straight, *extra), root / "l0")] == [0, 0]
    assert [c for c, _, _ in launch(common(repo, data, stopped, *first), root / "l1")] == [0, 0]
    checkpoint = torch.load(stopped / "checkpoint.pt", weights_only=False)
    assert checkpoint["world_size"] == 2 and len(checkpoint["rank_rng"]) == 2 and checkpoint["position"]["step"] == 2
    results = launch(common(repo, data, stopped, *extra, "--resume"), root / "l2")
    assert [c for c, _, _ in results] == [0, 0], results
    rel = lora_close(straight / "lora-flux1.safetensors", stopped / "lora-flux1.safetensors", median=1e-6, worst=1e-6)
    with capsys.disabled():
        print(f"resumed under 2 processes vs straight: worst tensor {rel[-1]:.1e}")
    assert losses(stopped) == pytest.approx(losses(straight), rel=1e-6)
    # --lora-dropout masks are drawn per process: with another number of processes, refused.
    capsys.readouterr()
    argv = common(repo, data, stopped, *extra[:-1], "4", "--resume")  # --batch-size 4, one process
    assert train.main([str(a) for a in argv]) == 2
    assert "resumes exactly only with 2 processes" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_another_number_of_processes_and_the_same_global_batch(reference, capsys):
    """One process's checkpoint (--batch-size 4) resumed by 2 processes x 2: it ends where one process ends."""
    root, repo, data, extra, _ = reference
    out = root / "one-then-two"
    out.mkdir()
    shutil.copy(root / "one-step2.pt", out / "checkpoint.pt")
    results = launch(common(repo, data, out, *extra, "--batch-size", "2", "--resume"), root / "l3")
    assert [c for c, _, _ in results] == [0, 0], results
    rel = lora_close(root / "one" / "lora-flux1.safetensors", out / "lora-flux1.safetensors")
    with capsys.disabled():
        print(f"1-process checkpoint resumed by 2: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")
    # A different global micro-batch is refused before anything is loaded, naming both.
    shutil.copy(root / "one-step2.pt", out / "checkpoint.pt")
    assert train.main([str(a) for a in common(repo, data, out, *extra, "--batch-size", "2", "--resume")]) == 2
    assert "--batch-size 4 (now 2)" in capsys.readouterr().err


def torchrun(argv, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 train.py ...` itself, on a free port."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(port), "train.py", *map(str, argv)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_shard_under_torchrun_trains_and_resumes_the_one_process_lora(reference):
    """--shard (FSDP2 per block) with gradient checkpointing, launched by torchrun itself: 2 steps, then resumed
    (sharded again) to the reference's 3, with a preview at the end."""
    root, repo, data, extra, _ = reference
    out = root / "shard"
    first = [*extra[:1], "2", *extra[2:]]  # --steps 2
    done = torchrun(common(repo, data, out, *first, "--batch-size", "2", "--shard", "--gradient-checkpointing"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # rank 0 only
    previews = ["--preview-every", "3", "--preview", "a red square", "--preview-steps", "1", "--preview-size", "32x32"]
    argv = common(repo, data, out, *extra, "--batch-size", "2", "--shard", "--gradient-checkpointing", *previews)
    done = torchrun([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from step 2" in done.stdout
    rel = lora_close(root / "one" / "lora-flux1.safetensors", out / "lora-flux1.safetensors")
    print(f"--shard, resumed at step 2, vs one process: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")
    assert losses(out) == pytest.approx(losses(root / "one"), rel=1e-5)
    assert [p.name for p in (out / "previews").iterdir()] == ["step000003-00.png"]  # every rank renders, rank 0 writes


@pytest.mark.slow
def test_shard_with_int8_base_on_zimage(zimage_repo, tmp_path, monkeypatch):
    """Z-Image, INT8 base, --shard: int8.py's INT8 weights (buffers) are sharded as frozen parameters."""
    import int8

    repo, data = zimage_repo[0], make_dataset(tmp_path / "data", 3)
    extra = ["--steps", "2", "--int8", "--caption-dropout", "0.5"]
    original = int8.quantize
    monkeypatch.setattr(int8, "quantize", lambda m: original(m, min_features=16))  # the tiny layers are narrow
    argv = common(repo, data, tmp_path / "one", *extra, "--batch-size", "2", model="zimage")
    assert train.main([str(a) for a in argv]) == 0
    argv = common(repo, data, tmp_path / "two", *extra, "--batch-size", "1", "--shard", model="zimage")
    results = launch(argv, tmp_path / "logs", int8_min_features=16, record_shards=True)
    assert [code for code, _, _ in results] == [0, 0], results
    for rank in range(2):  # each rank holds half of every INT8 weight (rows) and of every LoRA weight
        shards = json.loads((tmp_path / "logs" / f"shards{rank}.json").read_text())
        for kind, (cls, _, shape, local) in shards.items():
            rows = [-(-shape[0] // 2), shape[0] - -(-shape[0] // 2)][rank]  # torch.chunk's split of dim 0
            assert cls == "DTensor" and local == [rows, *shape[1:]], (kind, shards)
        assert shards["int8"][1] == "torch.int8" and shards["lora_A"][1] == "torch.float32"
    rel = lora_close(tmp_path / "one" / "lora-zimage.safetensors", tmp_path / "two" / "lora-zimage.safetensors")
    print(f"Z-Image INT8 --shard vs one process: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")


@pytest.mark.slow
def test_an_error_on_one_rank_stops_every_rank_said_once(flux1_repo, tmp_path):
    data = make_dataset(tmp_path / "data", 3)
    results = launch(
        common(flux1_repo[0], data, tmp_path / "out", "--steps", "2"), tmp_path / "logs", full_disk_on_rank=1
    )
    assert [code for code, _, _ in results] == [2, 2]  # the same exit code everywhere, no hang
    (line,) = results[0][2].strip().splitlines()
    assert line.startswith("error: rank 1: could not write") and "No space left on device" in line, line
    assert results[1][2] == ""  # said once, by rank 0
    # Bad arguments under torchrun itself: every rank refuses them, rank 0 says so.
    done = torchrun(["flux1", "--data", data, "--output", tmp_path / "o", "--shard", "--offload", "--device", "cpu"])
    assert done.returncode != 0 and (done.stdout + done.stderr).count("--shard and --offload do not combine") == 1


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_a_clear_message(flux1_repo, tmp_path):
    data = make_dataset(tmp_path / "data", 3)
    out, logs = tmp_path / "out", tmp_path / "logs"
    procs = start(common(flux1_repo[0], data, out, "--steps", "100000", "--checkpoint-every", "2"), logs)
    deadline = time.time() + TIMEOUT
    while not ((out / "log.csv").is_file() and len((out / "log.csv").read_text().splitlines()) > 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "training did not start"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    (code, _, err), _ = finish(procs, logs, timeout=60)
    print(f"rank 0 stopped {time.time() - killed:.1f} s after rank 1 was killed")
    assert code == 1
    (line,) = err.strip().splitlines()
    assert "lost contact with another process" in line and "--resume" in line, err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["position"]["step"] >= 2  # intact


@pytest.mark.slow
def test_shard_on_flux2_klein_edit_pairs(tmp_path_factory, tmp_path):
    """FLUX.2-klein edit pairs (reference images cached and sliced by rank with their targets) under --shard; the
    buckets of one and of two references end in short batches, so a rank also runs the weight-0 stand-in."""
    from fakes import write_flux2_repo
    from test_flux2_klein_train import make_edit_pairs

    repo = tmp_path_factory.mktemp("klein-base")
    write_flux2_repo(repo, "flux-2-klein-base-4b.safetensors", distilled=False)
    data = make_edit_pairs(tmp_path / "data")
    extra = ["--steps", "3", "--caption-dropout", "0.3"]
    assert (
        train.main([str(a) for a in common(repo, data, tmp_path / "one", *extra, "--batch-size", "2", model="flux2")])
        == 0
    )
    results = launch(
        common(repo, data, tmp_path / "two", *extra, "--batch-size", "1", "--shard", model="flux2"), tmp_path / "l"
    )
    assert [code for code, _, _ in results] == [0, 0], results
    rel = lora_close(tmp_path / "one" / "lora-flux2.safetensors", tmp_path / "two" / "lora-flux2.safetensors")
    print(f"FLUX.2-klein edit pairs --shard vs one process: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["wan22", "wan22-t2v-a14b"])
def test_video_training_under_two_processes(variant, wan22_repo, wan22_t2v_a14b_repo, tmp_path):
    """Clips, frame folders and a still image: TI2V-5B with first-frame training (its loss leaves the given frame out)
    data parallel; T2V-A14B's two experts, in turns, each sharded (FSDP2) as its own root. Both give the LoRA(s) of
    one process with the same global batch."""
    from test_wan22_train import make_clips

    repo = wan22_repo[0] if variant == "wan22" else wan22_t2v_a14b_repo[0]
    data = make_clips(tmp_path / "data")
    extra = ["--steps", "3" if variant == "wan22" else "4", "--frames", "9", "5", "--caption-dropout", "0.3"]
    extra += ["--bucket-step", "32", "--first-frame", "0.5"] if variant == "wan22" else []  # A14B: 2 steps an expert
    one = common(repo, data, tmp_path / "one", *extra, "--batch-size", "2", model=variant)
    assert train.main([str(a) for a in one]) == 0
    sharded = ["--shard"] if variant != "wan22" else []
    results = launch(
        common(repo, data, tmp_path / "two", *extra, "--batch-size", "1", *sharded, model=variant), tmp_path
    )
    assert [code for code, _, _ in results] == [0, 0], results
    names = (
        [f"lora-{variant}.safetensors"]
        if variant == "wan22"
        else [f"lora-{variant}_{e}_noise.safetensors" for e in ("high", "low")]
    )
    assert sorted(p.name for p in (tmp_path / "two").glob("*.safetensors")) == sorted(names)
    for name in names:
        rel = lora_close(tmp_path / "one" / name, tmp_path / "two" / name)
        how = "2 processes" + (" --shard" if sharded else "")
        print(f"{name}, {how} vs one: median {rel[len(rel) // 2]:.1e}, worst {rel[-1]:.1e}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    line = next(x for x in results[0][1].splitlines() if x.startswith("data:"))
    assert "'unreadable clip': 1" in line
