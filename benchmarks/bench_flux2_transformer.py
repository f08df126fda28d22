"""FLUX.2-klein transformer forward: ours vs diffusers' Flux2Transformer2DModel on the same weights.

Mid-size config: width 3072 (24 heads x 128, klein-4B's), 1 double + 2 single blocks, klein-4B's text width (7680 =
3 x Qwen3-4B), 1024 image tokens (a 512x512 picture) + 512 text tokens (klein always pads to 512), batch 1, one thread,
bf16 and fp32, the two sides interleaved. Target: ours <= 0.9x diffusers' time.

    python benchmarks/bench_flux2_transformer.py [--windows 3] [--calls 2] [--dtypes bf16,fp32] [--references 0]
"""

import argparse
from functools import partial

import torch
from common import interleaved, peak_rss_bytes
from fakes import flux2_to_bfl, rel

import flux2_klein as fk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--references", type=int, default=0, help="reference images of 1024 tokens each appended")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    ref = Flux2Transformer2DModel(  # klein-4B's widths (diffusers' defaults are FLUX.2-dev's)
        num_layers=1, num_single_layers=2, num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False
    )
    ref = ref.eval().requires_grad_(False)
    with torch.no_grad():  # diffusers zero-initialises some outputs; make every weight count
        for p in ref.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    bfl = flux2_to_bfl(ref.state_dict())  # shares every tensor but the fused q/k/v
    with torch.device("meta"):
        ours = fk.Flux2(fk.flux2_params_from_state_dict(bfl, tuple(ref.config.axes_dims_rope)))
    ours = fk.load_into(ours, bfl, "benchmark").eval().requires_grad_(False)
    del bfl
    params = sum(p.numel() for p in ours.parameters())

    h = w = 32
    n_img, txt_len = (1 + args.references) * h * w, 512
    img = torch.randn(1, n_img, 128)
    ids = torch.cat([fk.token_ids(h, w, 10 * i, "cpu") for i in range(1 + args.references)])
    txt, txt_ids = torch.randn(1, txt_len, 7680), fk.text_ids(txt_len, "cpu")
    sigma = torch.tensor([0.6])
    print(
        f"FLUX.2 transformer, {params / 1e6:.0f}M params, {n_img} image + {txt_len} text tokens, 1 thread; "
        f"torch {torch.__version__}"
    )
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        ours.to(dtype), ref.to(dtype)
        a = dict(img=img.to(dtype), img_ids=ids, txt=txt.to(dtype), txt_ids=txt_ids, timesteps=sigma)
        b = dict(
            hidden_states=a["img"],
            encoder_hidden_states=a["txt"],
            timestep=sigma,
            img_ids=ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )
        with torch.inference_mode():
            out_ours, out_ref = ours(**a), ref(**b)[0]  # warm-up, and a check that both compute the same
            err = rel(out_ours, out_ref)
            r = interleaved({"ours": partial(ours, **a), "diffusers": partial(ref, **b)}, args.windows, args.calls)
        print(
            f"{name}: ours {r['ours']:.3f} s, diffusers {r['diffusers']:.3f} s, ratio {r['ours'] / r['diffusers']:.3f} "
            f"(target <= 0.9), util {r['util']:.2f}, rel diff {err:.1e}"
        )
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
