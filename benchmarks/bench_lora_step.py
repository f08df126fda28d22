"""One LoRA training step on the mid-size FLUX.1 config: ours (lora.py) vs diffusers + PEFT, same weights, rank and
target layers, interleaved in one run.

Hidden 3072, 1 double + 2 single blocks, 256 image + 128 text tokens, batch 1, bf16 base, fp32 LoRA (rank 16),
AdamW; one thread. A step = forward + MSE loss + backward + optimizer step. Memory: the bytes autograd saves for the
backward (what activation memory is, deduplicated by storage), plus the trainable parameters and their Adam state.

    python benchmarks/bench_lora_step.py [--windows 5] [--calls 2] [--rank 16]
"""

import argparse

import torch
from common import interleaved
from fakes import flux_to_bfl

import flux1
import lora

# The same layers in diffusers' names: BFL's fused qkv / linear1 are separate projections there.
DIFFUSERS_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]


def saved_bytes(step, model) -> int:
    """Bytes of the activations autograd keeps for backward during one forward (each storage counted once; the
    model's own weights, which backward also references, are not activations and are left out)."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return sum(seen.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    ref = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True)
    bfl = flux_to_bfl(ref.state_dict())
    with torch.device("meta"):
        ours = flux1.Flux(flux1.flux_params_from_state_dict(bfl))
    ours = flux1.load_into(ours, bfl, "benchmark").to(torch.bfloat16)
    del bfl
    ref = ref.to(torch.bfloat16).requires_grad_(False)
    lora.add_lora(ours, flux1.LORA_TARGETS, rank=args.rank)
    ref.add_adapter(
        LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=DIFFUSERS_TARGETS, init_lora_weights=True)
    )
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    for p in ref_params:
        p.data = p.data.float()  # PEFT creates the LoRA in the base dtype; train it in fp32 like ours
    ours_params = lora.lora_parameters(ours)
    opt_ours, opt_ref = torch.optim.AdamW(ours_params, lr=1e-4), torch.optim.AdamW(ref_params, lr=1e-4)

    img, txt, vec = torch.randn(1, 256, 64), torch.randn(1, 128, 4096), torch.randn(1, 768)
    ids, tids, s, g = flux1.image_ids(16, 16, "cpu"), torch.zeros(128, 3), torch.tensor([0.6]), torch.tensor([1.0])
    target = torch.randn(1, 256, 64)
    b = dict(img=img.bfloat16(), txt=txt.bfloat16(), vec=vec.bfloat16())

    def step_ours(backward=True):
        out = ours(b["img"], ids, b["txt"], tids, s, b["vec"], g)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        if backward:
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)

    def step_ref(backward=True):
        out = ref(
            hidden_states=b["img"],
            encoder_hidden_states=b["txt"],
            pooled_projections=b["vec"],
            timestep=s,
            img_ids=ids,
            txt_ids=tids,
            guidance=g,
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(out.float(), target)
        if backward:
            loss.backward()
            opt_ref.step()
            opt_ref.zero_grad(set_to_none=True)

    step_ours(), step_ref()  # warm-up; Adam state now exists on both sides
    act_ours, act_ref = saved_bytes(step_ours, ours), saved_bytes(step_ref, ref)
    train_bytes = lambda ps: sum(p.numel() * 4 * 3 for p in ps)  # noqa: E731  fp32 weight + two Adam moments
    r = interleaved({"ours": step_ours, "diffusers+peft": step_ref}, args.windows, args.calls)
    print(f"LoRA step, FLUX.1 mid-size (1 double + 2 single, 256 + 128 tokens), bf16 base, rank {args.rank}, 1 thread")
    print(
        f"torch {torch.__version__}; LoRA params: ours {sum(p.numel() for p in ours_params) / 1e6:.1f}M "
        f"(fused qkv share one A), diffusers+peft {sum(p.numel() for p in ref_params) / 1e6:.1f}M"
    )
    print(
        f"time per step: ours {r['ours']:.3f} s, diffusers+peft {r['diffusers+peft']:.3f} s, "
        f"ratio {r['ours'] / r['diffusers+peft']:.3f}, util {r['util']:.2f}"
    )
    mem_ours, mem_ref = act_ours + train_bytes(ours_params), act_ref + train_bytes(ref_params)
    print(
        f"saved activations: ours {act_ours / 2**20:.0f} MiB, diffusers+peft {act_ref / 2**20:.0f} MiB; "
        f"+ LoRA weights and Adam state: ours {mem_ours / 2**20:.0f} MiB, diffusers+peft {mem_ref / 2**20:.0f} MiB, "
        f"ratio {mem_ours / mem_ref:.3f}"
    )


if __name__ == "__main__":
    main()
