"""FLUX.1 transformer forward: ours vs diffusers' FluxTransformer2DModel on the same weights.

Mid-size config (hidden 3072 = 24 heads x 128, 1 double + 2 single blocks, 256 image + 128 text tokens, batch 1),
one thread, fp32 and bf16, the two sides interleaved. Target: ours <= 0.9x diffusers' time.

    python benchmarks/bench_flux1_transformer.py [--windows 5] [--calls 3]
"""

import argparse
from functools import partial

import torch
from common import interleaved
from fakes import flux_to_bfl, rel

import flux1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides first")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True).eval().requires_grad_(False)
    bfl = flux_to_bfl(ref.state_dict())
    with torch.device("meta"):
        ours = flux1.Flux(flux1.flux_params_from_state_dict(bfl))
    ours = flux1.load_into(ours, bfl, "benchmark").eval().requires_grad_(False)
    del bfl
    params = sum(p.numel() for p in ours.parameters())

    img_h, img_w, txt_len = 16, 16, 128
    x = torch.randn(1, 16, 2 * img_h, 2 * img_w)
    txt, vec = torch.randn(1, txt_len, 4096), torch.randn(1, 768)
    sigma, guidance = torch.tensor([0.6]), torch.tensor([3.5])
    img, img_ids, txt_ids = flux1.patchify(x), flux1.image_ids(img_h, img_w, "cpu"), torch.zeros(txt_len, 3)

    print(f"FLUX.1 transformer, {params / 1e6:.0f}M params, {img_h * img_w} image + {txt_len} text tokens, 1 thread")
    print(f"torch {torch.__version__}")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours.to(dtype), ref.to(dtype)
        a = dict(
            img=img.to(dtype),
            img_ids=img_ids,
            txt=txt.to(dtype),
            txt_ids=txt_ids,
            timesteps=sigma,
            y=vec.to(dtype),
            guidance=guidance,
        )
        b = dict(
            hidden_states=a["img"],
            encoder_hidden_states=a["txt"],
            pooled_projections=a["y"],
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )
        run_ours, run_ref = (torch.compile(ours), torch.compile(ref)) if args.compile else (ours, ref)
        with torch.inference_mode():
            out_ours, out_ref = run_ours(**a), run_ref(**b)[0]  # warm-up, and a sanity check that both compute the same
            err = rel(out_ours, out_ref)
            sides = {"ours": partial(run_ours, **a), "diffusers": partial(run_ref, **b)}
            r = interleaved(sides, args.windows, args.calls)
        print(
            f"{name}{' compiled' if args.compile else ''}: ours {r['ours']:.3f} s, diffusers {r['diffusers']:.3f} s, "
            f"ratio {r['ours'] / r['diffusers']:.3f} (target <= 0.9), util {r['util']:.2f}, rel diff {err:.1e}"
        )


if __name__ == "__main__":
    main()
