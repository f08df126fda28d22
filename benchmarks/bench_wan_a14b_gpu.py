"""Wan2.2 A14B and video LoRA training on a GPU (prepared for when a GPU is lent; `--tiny` runs the same code on tiny
configs anywhere, as a check of the script itself).

1. One A14B expert (width 5120, 40 blocks, 16 channels: 14.3B params, random weights, bf16 with the float32 parts
   wan22.keeps_fp32 names): a sampling forward on the latent of an 81-frame video (default 832x480: (16, 21, 60, 104) =
   32,760 tokens), and a LoRA training step (rank 16 on wan22.LORA_TARGETS, gradient checkpointing) on the same latent.
2. The swap between the two experts under `--offload model` (offload.enable_model_offload with the pipeline's
   offload_stays): both experts in pinned host memory, the time of the first call of the high-noise expert and of the
   low-noise one after it (each a host-to-device copy of the whole expert; the call itself is on a 1-frame latent).
3. A TI2V-5B video LoRA training step (rank 16) at the official 1280x704x121 (27,280 tokens) and at 832x480x81 (8,190
   tokens): peak GPU memory with gradient checkpointing (the model on the GPU) and with train.py --offload (block
   streaming, every block checkpointed), the numbers behind the README's estimates.

    python benchmarks/bench_wan_a14b_gpu.py [--device cuda] [--size 832x480] [--frames 81] [--skip swap,5b] [--tiny]
"""

import argparse
import gc
import time
from functools import partial

import torch
from bench_wan_gpu import random_model, timed
from common import ROOT  # noqa: F401 (puts the project on sys.path)

import lora
import offload
import train
import wan22

A14B = wan22.WanParams(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16, out_dim=16)
TINY = dict(dim=96, ffn_dim=128, text_dim=64, num_heads=2, num_layers=2)


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def latent_shape(size: str, frames: int, channels: int, stride: int) -> tuple[int, ...]:
    width, height = (int(v) for v in size.split("x"))
    return (1, channels, 1 + (frames - 1) // 4, height // stride, width // stride)


def tokens(shape) -> int:
    return shape[2] * (shape[3] // 2) * (shape[4] // 2)


def lora_step(dit, x, t, context):
    """One LoRA training step's forward and backward (the loss as train.py's, against a random target)."""
    v = dit(x, t, context)
    torch.nn.functional.mse_loss(v, torch.zeros_like(v)).backward()
    for p in lora.lora_parameters(dit):
        p.grad = None


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def expert_steps(args, device, params):
    shape = latent_shape(args.size, args.frames, params.in_dim, 8)
    with torch.device("meta"):
        dit = wan22.WanModel(params)
    dit = random_model(dit, device, torch.bfloat16, wan22.keeps_fp32)
    n = sum(p.numel() for p in dit.parameters())
    x = torch.randn(shape, device=device)
    t = torch.full((1,), 937.0, device=device)
    context = torch.randn(1, 512, params.text_dim, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        seconds, peak = timed(partial(dit, x, t, context), device, args.repeats)
    print(
        f"A14B expert {n / 1e9:.2f}B params, {tokens(shape)} video + 512 text tokens ({args.size}, {args.frames} "
        f"frames), bf16 forward: {seconds:.2f} s (x2 per step with CFG), peak {gib(peak)}"
    )
    lora.add_lora(dit, wan22.LORA_TARGETS, rank=16)
    for p in lora.lora_parameters(dit):
        p.data = p.data.to(device)
    train.enable_gradient_checkpointing(dit)
    dit.train()
    free(device)
    seconds, peak = timed(partial(lora_step, dit, x, t, context), device, 1)
    print(f"A14B expert LoRA step (rank 16, gradient checkpointing), same latent: {seconds:.2f} s, peak {gib(peak)}")
    del dit, x, context
    free(device)


class TwoExperts:
    """The parts of an A14B pipeline that model offload sees: two experts, kept on the device between calls."""

    offload_stays = wan22.WanPipeline.offload_stays

    def __init__(self, high, low):
        self.transformer, self.transformer_2 = high, low


def swap(args, device, params):
    experts = []
    for _ in range(2):
        with torch.device("meta"):
            dit = wan22.WanModel(params)
        # Random on the device (fast), then to the host, where model offload keeps it.
        experts.append(random_model(dit, device, torch.bfloat16, wan22.keeps_fp32).to("cpu"))
        free(device)
    pipe = TwoExperts(*experts)
    t0 = time.perf_counter()
    handler = offload.enable_model_offload(pipe, device)
    print(f"model offload set up (two experts packed and pinned in host memory): {time.perf_counter() - t0:.1f} s")
    nbytes = sum(p.nbytes for p in handler.packs["transformer"])
    x = torch.randn(1, params.in_dim, 1, 2, 2, device=device)
    context = torch.randn(1, 512, params.text_dim, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        for name, expert, t in (("high-noise", pipe.transformer, 937.0), ("low-noise", pipe.transformer_2, 500.0)):
            for _ in range(2):  # the second call finds the expert on the device: no copy
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                expert(x, torch.full((1,), t, device=device), context)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds = time.perf_counter() - t0
                print(
                    f"  {name} expert call ({'first: copy to the device' if _ == 0 else 'again: already there'}): "
                    f"{seconds:.3f} s ({nbytes / 2**30 / seconds:.1f} GiB/s of {gib(nbytes)}), on device now: "
                    f"{handler.on_device()}"
                )
    loads = [k for e, k in handler.log if e == "load"]
    print(f"  copies to the device: {loads}")
    offload.disable_model_offload(pipe)
    del pipe, experts, handler
    free(device)


def five_b(args, device, params, cases):
    for size, frames in cases:
        shape = latent_shape(size, frames, params.in_dim, 16)
        for mode in ("checkpointing", "offload"):
            with torch.device("meta"):
                dit = wan22.WanModel(params)
            dit = random_model(dit, "cpu" if mode == "offload" else device, torch.bfloat16, wan22.keeps_fp32)
            lora.add_lora(dit, wan22.LORA_TARGETS, rank=16)
            for p in lora.lora_parameters(dit):
                p.data = p.data.to(device)
            if mode == "offload":
                offload.enable_block_streaming(dit, device)
            else:
                train.enable_gradient_checkpointing(dit)
            dit.train()
            x = torch.randn(shape, device=device)
            t = torch.full((1, shape[2]), 937.0, device=device)
            context = torch.randn(1, 512, params.text_dim, device=device, dtype=torch.bfloat16)
            free(device)
            seconds, peak = timed(partial(lora_step, dit, x, t, context), device, 1)
            print(
                f"TI2V-5B LoRA step (rank 16) {size} x {frames} frames = {tokens(shape)} tokens, {mode}: "
                f"{seconds:.2f} s, peak {gib(peak)}"
            )
            if mode == "offload":
                offload.disable_block_streaming(dit)
            del dit, x, context
            free(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default="832x480", help="WIDTHxHEIGHT of the A14B video")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards after one warm-up")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: expert, swap, 5b")
    ap.add_argument("--tiny", action="store_true", help="tiny configs and latents: checks the script on any machine")
    args = ap.parse_args()
    device = torch.device(args.device)
    a14b, five = A14B, wan22.WanParams()
    if args.tiny:
        a14b, five = wan22.WanParams(**TINY, in_dim=16, out_dim=16), wan22.WanParams(**TINY)
        args.size, args.frames = "64x32", 5
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}")
    skip = set(args.skip.split(","))
    if "expert" not in skip:
        expert_steps(args, device, a14b)
    if "5b" not in skip:
        five_b(args, device, five, [("64x64", 5)] if args.tiny else [("1280x704", 121), ("832x480", 81)])
    if "swap" not in skip:  # last: pinning 57 GB of host memory is the step most likely to fail on a small host
        swap(args, device, a14b)


if __name__ == "__main__":
    main()
