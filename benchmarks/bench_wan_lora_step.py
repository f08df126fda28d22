"""One video LoRA training step on a mid-size Wan2.2 config: ours (wan22 + lora.py) vs diffusers'
WanTransformer3DModel + PEFT, same weights, rank and target layers, interleaved in one run.

TI2V-5B width (3072 = 24 heads x 128, ffn 14336, 48 latent channels), 2 blocks, a (48, 5, 16, 24) video latent (5 x
8 x 12 = 480 video tokens) + 512 text tokens, image-to-video timesteps (frame 0 at t = 0, as train.py's first-frame
samples), batch 1, bf16 base as each library runs it (ours: wan22.keeps_fp32's float32 parts; diffusers: its
`_keep_in_fp32_modules`), fp32 LoRA (rank 16) on the attention q/k/v/o of both attentions and the MLP of every block
(wan22.LORA_TARGETS; in diffusers' names attn1/attn2 to_q/to_k/to_v/to_out.0, ffn.net.0.proj, ffn.net.2), AdamW; one
thread. A step = forward + MSE loss + backward + optimizer step. Memory: the bytes autograd saves for the backward
(activations, deduplicated by storage; the model's weights left out), plus the LoRA weights and their Adam state.

    python benchmarks/bench_wan_lora_step.py [--windows 5] [--calls 1] [--rank 16]
"""

import argparse

import torch
from bench_lora_step import saved_bytes
from bench_wan_transformer import CONFIG  # TI2V-5B width, 2 blocks
from common import interleaved, peak_rss_bytes

import lora
import wan22

DIFFUSERS_TARGETS = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")] + [
    "ffn.net.0.proj",
    "ffn.net.2",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    ref = WanTransformer3DModel(**CONFIG).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    official = {wan22.rename(k, wan22.DIT_FROM_DIFFUSERS): v for k, v in ref.state_dict().items()}
    with torch.device("meta"):
        ours = wan22.WanModel(wan22.wan_params(official, {"num_heads": 24}))
    cast = {k: v.to(torch.float32 if wan22.keeps_fp32(k) else torch.bfloat16) for k, v in official.items()}
    ours = wan22.load_into(ours, cast, "benchmark")
    del official, cast
    ref.to(torch.bfloat16)
    for module_name in ref._keep_in_fp32_modules:  # what from_pretrained(torch_dtype=bfloat16) keeps in float32
        for n, m in ref.named_modules():
            if n.split(".")[-1] == module_name or n == module_name:
                m.float()

    lora.add_lora(ours, wan22.LORA_TARGETS, rank=args.rank)
    ref.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=DIFFUSERS_TARGETS, init_lora_weights=True)
    )
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for p in ref_params:
        p.data = p.data.float()  # PEFT creates the LoRA in the base dtype; train it in fp32 like ours
    ours_params = lora.lora_parameters(ours)
    assert sum(p.numel() for p in ours_params) == sum(p.numel() for p in ref_params)  # the same layers and rank
    with torch.no_grad():  # the same nonzero LoRA on both sides (B starts at zero), so the steps compute the same
        ours_lora, ref_lora = lora.lora_layers(ours), {n: m for n, m in ref.named_modules() if hasattr(m, "lora_A")}
        for name, layer in ours_lora.items():
            theirs = ref_lora[wan22.rename(name, wan22.DIT_TO_DIFFUSERS)]
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            layer.lora_B.normal_(0, 0.01)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    ours.train(), ref.train()
    opt_ours, opt_ref = torch.optim.AdamW(ours_params, lr=1e-4), torch.optim.AdamW(ref_params, lr=1e-4)

    f, h, w = 5, 16, 24
    x, target = torch.randn(1, 48, f, h, w), torch.randn(1, 48, f, h, w)
    context = torch.randn(1, 512, 4096)
    context[:, 40:] = 0  # a 40-token prompt, zero-padded to 512 as umT5's output is
    t = torch.tensor([[0.0] + [937.0] * (f - 1)])  # per latent frame: frame 0 is the clean first frame
    t_tokens = t[:, :, None].expand(1, f, h // 2 * w // 2).reshape(1, -1)  # per token, as diffusers takes it
    ctx = context.bfloat16()

    def step_ours(backward=True):
        loss = torch.nn.functional.mse_loss(ours(x, t, ctx).float(), target)
        if backward:
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
        return loss

    def step_ref(backward=True):
        out = ref(x.bfloat16(), t_tokens, ctx, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        if backward:
            loss.backward()
            opt_ref.step()
            opt_ref.zero_grad(set_to_none=True)
        return loss

    with torch.no_grad():
        a, b = step_ours(backward=False).item(), step_ref(backward=False).item()
    step_ours(), step_ref()  # warm-up; Adam state now exists on both sides
    act_ours, act_ref = saved_bytes(step_ours, ours), saved_bytes(step_ref, ref)
    train_bytes = lambda ps: sum(p.numel() * 4 * 3 for p in ps)  # noqa: E731  fp32 weight + two Adam moments
    r = interleaved({"ours": step_ours, "diffusers+peft": step_ref}, args.windows, args.calls)
    params = sum(p.numel() for p in ref.parameters() if not p.requires_grad)
    print(
        f"video LoRA step, Wan2.2 mid-size ({params / 1e6:.0f}M params, 2 blocks), {f * h // 2 * w // 2} video + "
        f"512 text tokens, bf16 base, rank {args.rank}, 1 thread, torch {torch.__version__}"
    )
    n = sum(p.numel() for p in ours_params)
    print(f"first loss: ours {a:.5f}, diffusers+peft {b:.5f}; LoRA params {n / 1e6:.2f}M on each side")
    print(
        f"time per step: ours {r['ours']:.3f} s, diffusers+peft {r['diffusers+peft']:.3f} s, "
        f"ratio {r['ours'] / r['diffusers+peft']:.3f}, util {r['util']:.2f}"
    )
    mem_ours, mem_ref = act_ours + train_bytes(ours_params), act_ref + train_bytes(ref_params)
    print(
        f"saved activations: ours {act_ours / 2**20:.0f} MiB, diffusers+peft {act_ref / 2**20:.0f} MiB; "
        f"+ LoRA weights and Adam state: ours {mem_ours / 2**20:.0f} MiB, diffusers+peft {mem_ref / 2**20:.0f} MiB, "
        f"ratio {mem_ours / mem_ref:.3f}; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
