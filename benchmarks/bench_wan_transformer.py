"""Wan2.2 DiT forward: ours vs diffusers' WanTransformer3DModel on the same weights.

Mid-size TI2V-5B config (width 3072 = 24 heads x 128, ffn 14336, 48 latent channels), 2 blocks, a (48, 4, 24, 64)
latent (4 x 12 x 32 = 1536 video tokens) + 512 text tokens, image-to-video timesteps (frame 0 at t = 0), batch 1, one
thread, the two sides interleaved. bf16 as each library runs it in practice: ours keeps its float32 parts (timestep
embedding/projection, modulation, norms, head; wan22.keeps_fp32), diffusers its `_keep_in_fp32_modules`, as
from_pretrained(torch_dtype=bfloat16) leaves them. Target: ours <= 0.9x diffusers' time.

    python benchmarks/bench_wan_transformer.py [--windows 3] [--calls 1] [--dtypes bf16,fp32]
"""

import argparse
from functools import partial

import torch
from common import interleaved, peak_rss_bytes
from fakes import rel

import wan22

CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=24,
    attention_head_dim=128,
    in_channels=48,
    out_channels=48,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=14336,
    num_layers=2,
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--dtypes", default="bf16,fp32")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(**CONFIG).eval().requires_grad_(False)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make every weight count anyway
        for p in ref.parameters():
            p.normal_(0, 0.02)
    base = {k: v.clone() for k, v in ref.state_dict().items()}  # each dtype starts from these fp32 values
    official = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in base.items()}
    params = sum(p.numel() for p in ref.parameters())

    x = torch.randn(1, 48, 4, 24, 64)
    context = torch.randn(1, 512, 4096)
    context[:, 40:] = 0  # a 40-token prompt, zero-padded to 512 as umT5's output is
    t = torch.tensor([[0.0, 937.0, 937.0, 937.0]])  # per latent frame
    t_tokens = t[:, :, None].expand(1, 4, 12 * 32).reshape(1, -1)  # per token, as diffusers takes it
    print(f"Wan DiT, {params / 1e6:.0f}M params, 1536 video + 512 text tokens, 1 thread, torch {torch.__version__}")
    for name in args.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        with torch.device("meta"):
            ours = wan22.WanModel(wan22.wan_params(official, {"num_heads": 24}))
        cast = {k: v.to(torch.float32 if wan22.keeps_fp32(k) else dtype) for k, v in official.items()}
        ours = wan22.load_into(ours, cast, "benchmark").eval()
        ref.float().load_state_dict(base)  # (load_state_dict copies into the current dtype)
        ref.to(dtype)
        for module_name in ref._keep_in_fp32_modules:
            for n, m in ref.named_modules():
                if n.split(".")[-1] == module_name or n == module_name:
                    m.float()
        run_ours = partial(ours, x, t, context.to(dtype))
        run_ref = partial(ref, x.to(dtype), t_tokens, context.to(dtype), return_dict=False)
        with torch.inference_mode():
            a, b = run_ours(), run_ref()[0]  # warm-up and sanity check
            err = rel(a, b)
            r = interleaved({"ours": run_ours, "diffusers": run_ref}, args.windows, args.calls)
        print(
            f"{name}: ours {r['ours']:.3f} s, diffusers {r['diffusers']:.3f} s, "
            f"ratio {r['ours'] / r['diffusers']:.3f} (target <= 0.9), util {r['util']:.2f}, rel diff {err:.1e}"
        )
        del ours, cast
    print(f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
