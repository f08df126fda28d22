"""FLUX.2-klein-4B-sized transformer step on a GPU at 1024x1024 (4096 image + 512 text tokens): bf16, and with
int8.quantize (torch._int_mm), forward and a LoRA training step (forward + backward). Random weights: one block of each
kind copied to klein-4B's depth (5 double + 20 single, hidden 3072), ~3.9B parameters, ~7.8 GB in bf16.

    python benchmarks/bench_flux2_gpu.py [--iters 5] [--batch 1]

Needs CUDA; exits with a message otherwise. Prints median seconds per forward / training step, the INT8 speed-up, the
INT8 output's relative difference from bf16, and peak device memory."""

import argparse
import copy
import statistics
import sys
import time

import common  # noqa: F401  (puts the project root on sys.path)
import torch
from fakes import rel

import flux2_klein as fk
import int8
import lora


def build(device) -> fk.Flux2:
    params = fk.Flux2Params()  # klein-4B
    small = fk.Flux2Params(depth=1, depth_single_blocks=1)
    torch.manual_seed(0)
    model = fk.Flux2(small).to(torch.bfloat16)  # nn.Linear's init on the host, for one block of each kind only
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.double_blocks = torch.nn.ModuleList(copy.deepcopy(model.double_blocks[0]) for _ in range(params.depth))
    model.single_blocks = torch.nn.ModuleList(
        copy.deepcopy(model.single_blocks[0]) for _ in range(params.depth_single_blocks)
    )
    model.params = params
    return model.to(device).eval().requires_grad_(False)


def timed(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_flux2_gpu.py needs a CUDA device; none here.")
        return 0
    device = torch.device("cuda")
    model = build(device)
    b, h, w = args.batch, 64, 64
    img = torch.randn(b, h * w, 128, device=device, dtype=torch.bfloat16)
    txt = torch.randn(b, 512, 7680, device=device, dtype=torch.bfloat16)
    ids, tids, sigma = fk.token_ids(h, w, 0, device), fk.text_ids(512, device), torch.full((b,), 0.6, device=device)
    n = sum(p.numel() for p in model.parameters())
    print(f"klein-4B-sized transformer, {n / 1e9:.2f}B params, batch {b}, 4096 + 512 tokens")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")

    def forward():
        with torch.no_grad():
            return model(img, ids, txt, tids, sigma)

    def train_step():
        model(img, ids, txt, tids, sigma).float().square().mean().backward()

    results, reference = {}, forward().float()
    for name in ("bf16", "int8"):
        if name == "int8":
            int8.quantize(model)
        torch.cuda.reset_peak_memory_stats()
        results[name] = timed(forward, args.iters)
        err = rel(forward(), reference)
        lora.add_lora(model, fk.LORA_TARGETS, rank=16)  # fp32 LoRA on the default targets, on this base
        results[name + " step"] = timed(train_step, args.iters)
        lora.remove_lora(model)
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"{name}: forward {results[name]:.3f} s, LoRA step {results[name + ' step']:.3f} s, "
            f"rel diff from bf16 {err:.1e}, peak {peak:.1f} GiB"
        )
    forward_speedup, step_speedup = results["bf16"] / results["int8"], results["bf16 step"] / results["int8 step"]
    print(f"INT8 speed-up: forward {forward_speedup:.2f}x, LoRA step {step_speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
