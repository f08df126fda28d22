"""FLUX.1 transformer loading: time and peak RSS, ours vs diffusers' `from_pretrained`, on a ~1 GB bf16 checkpoint.

Each load runs in a fresh process. RSS is measured above the bare imports (torch + the loader's module); after the
load every weight is read once (a sum), as the first forward would, so lazily mmapped pages are counted too.
Target: our peak RSS <= 1.05x the weights' bytes (never copy weights on load). The two sides alternate.

    python benchmarks/bench_flux1_load.py [--repeats 3] [--dir /tmp/flux1-load-bench]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import torch
from common import current_rss_bytes, peak_rss_bytes
side, folder = sys.argv[1], sys.argv[2]
if side == "ours":
    import flux1
else:
    from diffusers import FluxTransformer2DModel
base = current_rss_bytes()
t0 = time.perf_counter()
if side == "ours":
    model = flux1.load_transformer(folder + "/flux1-dev.safetensors", dtype=torch.bfloat16)
else:
    model = FluxTransformer2DModel.from_pretrained(folder + "/transformer", torch_dtype=torch.bfloat16)
t_load = time.perf_counter() - t0
rss_load = current_rss_bytes() - base
with torch.no_grad():
    total = sum(p.sum().item() for p in model.parameters())  # touch every weight once, no copies
t_touch = time.perf_counter() - t0
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps(dict(load_s=t_load, touch_s=t_touch, rss_after_load=rss_load, peak=peak_rss_bytes() - base,
                      weights=nbytes)))
"""


def write_checkpoints(folder: Path):
    """The same random bf16 weights as a BFL single file and as a diffusers `transformer/` folder."""
    import torch
    from diffusers import FluxTransformer2DModel
    from fakes import flux_to_bfl
    from safetensors.torch import save_file

    config = dict(num_layers=1, num_single_layers=1, guidance_embeds=True)  # 3072 wide: ~0.5B params, ~1 GB in bf16
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**config)
    g = torch.Generator().manual_seed(0)
    sd = {k: (0.02 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in meta.state_dict().items()}
    model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    model.load_state_dict(sd)
    model.save_pretrained(folder / "transformer", max_shard_size="10GB")
    save_file(flux_to_bfl(sd), folder / "flux1-dev.safetensors")
    (folder / "done").write_text("ok")


def drop_page_cache():
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        sys.exit(f"--cold needs Linux and root to drop the page cache: {e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "flux1-load-bench"))
    ap.add_argument("--cold", action="store_true", help="drop the page cache before each load (Linux, as root)")
    args = ap.parse_args()
    bench = Path(__file__).resolve().parent
    sys.path[:0] = [str(bench.parent), str(bench.parent / "tests")]
    folder = Path(args.dir)
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_checkpoints(folder)
    child = CHILD.format(root=str(bench.parent), bench=str(bench))
    results = {"ours": [], "diffusers": []}
    for _ in range(args.repeats):
        for side in results:
            if args.cold:
                drop_page_cache()
            out = subprocess.run([sys.executable, "-c", child, side, str(folder)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    weights = results["ours"][0]["weights"]
    cache = "cold page cache" if args.cold else "warm page cache"
    print(f"checkpoint: {weights / 2**30:.2f} GiB of bf16 weights, {cache}; median of {args.repeats} fresh processes")
    for side, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"{side:9s}: load {med['load_s']:.2f} s (+ first read of every weight: {med['touch_s']:.2f} s), "
            f"RSS after load {med['rss_after_load'] / weights:.2f}x, peak RSS {med['peak'] / weights:.2f}x the weights"
        )


if __name__ == "__main__":
    main()
