"""Z-Image transformer forward: ours vs diffusers' ZImageTransformer2DModel on the same weights.

Mid-size config (width 3840 = 30 heads x 128, 2 main layers, 1 noise- and 1 context-refiner layer), 1024 image
tokens (a 64x64 latent) + 128 caption tokens, batch 1, one thread, bf16 (and fp32 with --dtypes), the two sides
interleaved. Target: ours <= 0.9x diffusers' time.

    python benchmarks/bench_zimage_transformer.py [--windows 5] [--calls 3] [--dtypes bf16,fp32]
"""

import argparse
from functools import partial

import torch
from common import interleaved
from fakes import rel

import zimage


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    ref = ZImageTransformer2DModel(n_layers=2, n_refiner_layers=1).eval().requires_grad_(False)
    with torch.no_grad():  # diffusers zero-initialises the pad tokens and some outputs; make every weight count
        for p in ref.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    with torch.device("meta"):
        ours = zimage.ZImageTransformer(zimage.ZImageParams.from_config(dict(ref.config)))
    ours = zimage.load_into(ours, ref.state_dict(), "benchmark").eval().requires_grad_(False)  # shares the tensors
    params = sum(p.numel() for p in ours.parameters())

    x = torch.randn(1, 16, 64, 64)  # 32 x 32 = 1024 image tokens
    caps = [torch.randn(128, 2560)]
    t = torch.tensor([0.4])
    print(f"Z-Image transformer, {params / 1e6:.0f}M params, 1024 image + 128 caption tokens, 1 thread")
    print(f"torch {torch.__version__}")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours.to(dtype), ref.to(dtype)
        xd, cd = x.to(dtype), [c.to(dtype) for c in caps]
        run_ours = partial(ours, xd, t, cd)
        run_ref = partial(ref, list(xd.unsqueeze(2).unbind(0)), t, cd, return_dict=False)
        with torch.inference_mode():
            a, b = run_ours(), torch.stack(run_ref()[0]).squeeze(2)  # warm-up and sanity check
            err = rel(a, b)
            r = interleaved({"ours": run_ours, "diffusers": run_ref}, args.windows, args.calls)
        print(
            f"{name}: ours {r['ours']:.3f} s, diffusers {r['diffusers']:.3f} s, "
            f"ratio {r['ours'] / r['diffusers']:.3f} (target <= 0.9), util {r['util']:.2f}, rel diff {err:.1e}"
        )


if __name__ == "__main__":
    main()
