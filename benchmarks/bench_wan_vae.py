"""Wan2.2 VAE decode: ours vs diffusers' AutoencoderKLWan on the same weights, and chunked vs one-shot memory.

The real Wan2.2 VAE config (160-wide encoder, 256-wide decoder, 48 channels; random weights), float32 as the official
pipelines run it.
- time: decode of a (48, 2, 6, 6) latent (5 frames of 96x96), one thread, the two sides interleaved, medians;
- memory: decode of a (48, --frames, 8, 8) latent (1 + 4 (F - 1) frames of 128x128) in fresh processes: our chunked
  decode (one latent frame per call, the official way), our one-shot decode (all frames in one call) and diffusers'
  decode (chunked too). Peak RSS above the RSS with the model loaded = the decode's working memory.

    python benchmarks/bench_wan_vae.py [--windows 3] [--calls 1] [--frames 5] [--dir /tmp/wan-vae-bench]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from common import ROOT, interleaved
from fakes import rel

import wan22

CHILD = r"""
import json, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import torch
torch.set_num_threads({threads})
from common import current_rss_bytes, hwm_peak_bytes
import wan22

side, folder, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
if side == "diffusers":
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(folder + "/vae")
else:
    vae = wan22.load_vae(folder + "/Wan2.2_VAE.pth")
z = torch.randn(1, 48, frames, 8, 8, generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    sum(p.sum().item() for p in vae.parameters())  # weights resident before the baseline
base = current_rss_bytes()
t0 = time.perf_counter()
with torch.no_grad():
    if side == "diffusers":
        out = vae.decode(z).sample
    else:
        out = vae.decode(z, chunk=1 if side == "ours-chunked" else None)
seconds = time.perf_counter() - t0
print(json.dumps(dict(seconds=seconds, peak=hwm_peak_bytes() - base, shape=list(out.shape),
                      output=out.numel() * 4)))
"""


def reference_vae():
    from diffusers import AutoencoderKLWan

    config = dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
        latents_mean=list(wan22.WAN22_VAE_MEAN),
        latents_std=list(wan22.WAN22_VAE_STD),
    )
    torch.manual_seed(0)
    return AutoencoderKLWan(**config).eval().requires_grad_(False)


def time_decode(ref, ours, args):
    params = sum(p.numel() for p in ours.parameters())
    print(f"Wan2.2 VAE, {params / 1e6:.0f}M params (float32), torch {torch.__version__}")
    z = torch.randn(1, 48, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    mean, std = ours.mean.view(1, -1, 1, 1, 1), ours.std.view(1, -1, 1, 1, 1)
    run_ours = partial(ours.decode, z)

    def run_ref():  # diffusers takes un-normalised latents and clamps nothing
        return ref.decode(z * std + mean).sample.clamp(-1, 1)

    with torch.inference_mode():
        a, b = run_ours(), run_ref()
        err = rel(a, b)
        r = interleaved({"ours": run_ours, "diffusers": run_ref}, args.windows, args.calls)
    print(
        f"decode (48, 2, 6, 6) -> {tuple(a.shape)}, 1 thread: ours {r['ours']:.2f} s, "
        f"diffusers {r['diffusers']:.2f} s, ratio {r['ours'] / r['diffusers']:.3f}, util {r['util']:.2f}, "
        f"rel diff {err:.1e}"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--frames", type=int, default=5, help="latent frames of the memory runs")
    ap.add_argument("--threads", type=int, default=1, help="threads of the memory runs")
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "wan-vae-bench"))
    ap.add_argument("--memory-only", action="store_true", help="skip the timing comparison")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.dir)
    ref = reference_vae()
    if not (folder / "done").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        ref.save_pretrained(folder / "vae")
        torch.save(wan22.vae_from_diffusers(ref.state_dict()), folder / "Wan2.2_VAE.pth")
        (folder / "done").write_text("ok")
    if not args.memory_only:
        time_decode(ref, wan22.load_vae(folder / "Wan2.2_VAE.pth"), args)
    del ref

    child = CHILD.format(root=str(ROOT), bench=str(Path(__file__).parent), threads=args.threads)
    for side in ("ours-chunked", "ours-one-shot", "diffusers"):
        out = subprocess.run(
            [sys.executable, "-c", child, side, str(folder), str(args.frames)], capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(out.stderr)
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"memory, decode (48, {args.frames}, 8, 8) -> {m['shape']}: {side:13s} working memory "
            f"{m['peak'] / 2**20:7.0f} MiB ({m['peak'] / m['output']:.1f}x the output), {m['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
