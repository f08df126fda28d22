"""Loading a float32 Wan DiT checkpoint as bf16: peak RSS and time, ours vs a naive cast and diffusers.

The official Wan2.2 DiT checkpoints are float32 (TI2V-5B ~20 GB, each A14B expert ~57 GB) and run in bf16. Here: a
mid-size float32 checkpoint (width 3072, 4 blocks, ~0.74B params, 3 shards + index, official names) loaded three ways,
each in a fresh process, RSS measured above the bare imports, every weight read once after the load (as the first
forward would):
- ours: wan22.load_transformer(dtype=bfloat16), which converts each tensor while reading it from the file;
- naive: flux1.read_weights (mmapped) and .to(bfloat16) per tensor, then load_into;
- diffusers: WanTransformer3DModel.from_pretrained(torch_dtype=bfloat16) on the same weights in diffusers' layout.
Target: ours' peak RSS <= 1.1x the bf16 size of the weights. The three alternate; median of --repeats. Peak RSS is
the process's VmHWM (ru_maxrss would include the parent's RSS at fork time, e.g. after writing the checkpoint).

    python benchmarks/bench_wan_load.py [--repeats 3] [--dir /tmp/wan-load-bench]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_wan_transformer
from common import ROOT  # also puts the project root and tests/ on sys.path

CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import torch
from common import current_rss_bytes, hwm_peak_bytes
import flux1, wan22

side, folder = sys.argv[1], sys.argv[2]
if side == "diffusers":
    from diffusers import WanTransformer3DModel
base = current_rss_bytes()
t0 = time.perf_counter()
if side == "ours":
    model = wan22.load_transformer(folder, dtype=torch.bfloat16)
elif side == "naive":
    sd = {{k: v.to(torch.float32 if wan22.keeps_fp32(k) else torch.bfloat16)
          for k, v in flux1.read_weights(folder + "/diffusion_pytorch_model.safetensors.index.json").items()}}
    with torch.device("meta"):
        model = wan22.WanModel(wan22.wan_params(sd, {{"num_heads": 24}}))
    model = wan22.load_into(model, sd, folder)
    del sd
else:
    model = WanTransformer3DModel.from_pretrained(folder + "/transformer", torch_dtype=torch.bfloat16)
t_load = time.perf_counter() - t0
with torch.no_grad():
    total = sum(p.sum().item() for p in model.parameters())  # touch every weight once (no float copy)
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
bf16 = sum(p.numel() * 2 for p in model.parameters())
print(json.dumps(dict(load_s=t_load, rss_after=current_rss_bytes() - base, peak=hwm_peak_bytes() - base,
                      weights=nbytes, bf16=bf16)))
"""

CONFIG = {**bench_wan_transformer.CONFIG, "num_layers": 4}  # TI2V-5B width, 4 blocks


def write_checkpoints(folder: Path):
    """The same random float32 weights in the official layout (root: config.json + 3 shards + index) and as a
    diffusers `transformer/` folder."""
    import torch
    from diffusers import WanTransformer3DModel
    from fakes import save_sharded

    import wan22

    with torch.device("meta"):
        meta = WanTransformer3DModel(**CONFIG)
    g = torch.Generator().manual_seed(0)
    sd = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in meta.state_dict().items()}
    official = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in sd.items()}
    save_sharded(official, folder, "diffusion_pytorch_model", shards=3)
    (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": 24, "dim": 3072}))
    del official
    model = WanTransformer3DModel(**CONFIG)
    model.load_state_dict(sd)
    del sd
    model.save_pretrained(folder / "transformer", max_shard_size="1GB")
    (folder / "done").write_text("ok")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "wan-load-bench"))
    args = ap.parse_args()
    folder = Path(args.dir)
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoints(folder)
    child = CHILD.format(root=str(ROOT), bench=str(Path(__file__).resolve().parent))
    results = {"ours": [], "naive": [], "diffusers": []}
    for _ in range(args.repeats):
        for side in results:
            out = subprocess.run([sys.executable, "-c", child, side, str(folder)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    fp32 = sum(p.stat().st_size for p in folder.glob("diffusion_pytorch_model-*.safetensors"))
    bf16 = results["ours"][0]["bf16"]
    print(f"checkpoint: {fp32 / 2**30:.2f} GiB float32 on disk, {bf16 / 2**30:.2f} GiB all in bf16", end="; ")
    print(f"median of {args.repeats} fresh processes")
    for side, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{side:9s}: load {med['load_s']:.2f} s, loaded weights {med['weights'] / 2**30:.2f} GiB, "
            f"peak RSS {med['peak'] / 2**30:.2f} GiB = {med['peak'] / bf16:.2f}x the all-bf16 size "
            f"({med['peak'] / med['weights']:.2f}x the loaded weights; target <= 1.1), RSS after "
            f"{med['rss_after'] / med['weights']:.2f}x"
        )


if __name__ == "__main__":
    main()
