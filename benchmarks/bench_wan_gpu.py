"""Wan2.2 TI2V-5B at its official size on a GPU: one DiT step and the VAE decode of the clip (prepared for when a GPU
is lent; `--tiny` runs the same code on a tiny config anywhere, as a check of the script itself).

A 5B-sized DiT (width 3072, 30 blocks, random weights, bf16 with the float32 parts wan22.keeps_fp32 names) on the
latent of a 121-frame 1280x704 video, (48, 31, 44, 80) = 27,280 tokens, image-to-video timesteps; and the Wan2.2 VAE
(float32, as officially, and bf16) decoding that latent one latent frame at a time. Prints the median step time, the
decode time and the peak GPU memory of each.

    python benchmarks/bench_wan_gpu.py [--device cuda] [--steps 5] [--no-decode] [--tiny]
"""

import argparse
import statistics
import time
from functools import partial

import torch
from common import ROOT  # noqa: F401 (puts the project on sys.path)

import wan22


def random_model(model: torch.nn.Module, device, dtype, fp32=lambda name: True) -> torch.nn.Module:
    """Materialise a meta-device model on `device` with small random weights, float32 where fp32(name)."""
    model = model.to_empty(device=device)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = torch.randn(p.shape, generator=g, device=device).mul_(0.02)
            p.data = p.data.to(torch.float32 if fp32(name) else dtype)
    return model.eval().requires_grad_(False)


def timed(fn, device, repeats: int) -> tuple[float, int]:
    """Median seconds of fn() over `repeats` runs after one warm-up, and the peak memory allocated on the device."""
    cuda = torch.device(device).type == "cuda"
    fn()
    times = []
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_allocated(device) if cuda else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=5, help="timed DiT forwards (one sampling step = 2 with CFG)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a tiny config and latent: checks the script on any machine")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16
    if args.tiny:
        params = wan22.WanParams(dim=96, ffn_dim=128, text_dim=64, num_heads=2, num_layers=2)
        vae_params = wan22.VAEParams(dim=8, dec_dim=16)
        latent = (1, 48, 3, 4, 6)
    else:
        params, vae_params, latent = wan22.WanParams(), wan22.VAEParams(), (1, 48, 31, 44, 80)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")

    with torch.device("meta"):
        dit = wan22.WanModel(params)
    dit = random_model(dit, device, dtype, wan22.keeps_fp32)
    n = sum(p.numel() for p in dit.parameters())
    x = torch.randn(latent, device=device)
    t = torch.full((1, latent[2]), 937.0, device=device)
    t[:, 0] = 0  # image-to-video: the first latent frame is clean
    context = torch.randn(1, 512, params.text_dim, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds, peak = timed(partial(dit, x, t, context), device, args.steps)
    tokens = latent[2] * latent[3] // 2 * latent[4] // 2
    print(
        f"DiT {n / 1e9:.2f}B params, {tokens} video + 512 text tokens, bf16: {seconds:.3f} s per forward "
        f"(x2 per step with CFG), peak {peak / 2**30:.1f} GiB"
    )
    del dit
    if args.no_decode:
        return
    for vae_dtype in (torch.float32, torch.bfloat16):
        with torch.device("meta"):
            vae = wan22.WanVAE(vae_params)
        vae = random_model(vae, device, vae_dtype, partial(lambda d, name: d == torch.float32, vae_dtype))
        vae.set_normalization(wan22.WAN22_VAE_MEAN, wan22.WAN22_VAE_STD)
        z = torch.randn(latent, device=device)
        with torch.inference_mode():
            seconds, peak = timed(partial(vae.decode, z), device, 1)
        frames = 1 + 4 * (latent[2] - 1)
        print(
            f"VAE decode {tuple(latent)} -> {frames} frames of {latent[4] * 16}x{latent[3] * 16}, {vae_dtype}: "
            f"{seconds:.1f} s, peak {peak / 2**30:.1f} GiB"
        )
        del vae


if __name__ == "__main__":
    main()
