"""Block streaming overhead on a GPU: a FLUX.1-dev-sized block stack (19 double + 38 single blocks, hidden 3072,
11.8B parameters, 23.7 GB in bf16; random weights built on the host) at 1024x1024 (4096 image + 512 text tokens).
Reports the time per forward with every block resident vs streamed by offload.enable_block_streaming, their ratio
(target <= 1.3x), the host-to-device bandwidth and peak device memory.

    python benchmarks/bench_offload.py [--batch 1] [--double 19] [--single 38] [--iters 5] [--resident-blocks 0,20]

Streaming cannot beat the copy: a forward moves every streamed block once, so streamed >= max(resident, bytes /
bandwidth). The script prints that floor too, which tells a slow overlap apart from a bus-bound configuration (at
batch 1 the 12B stack is bus-bound on PCIe: ~94 TFLOP against 23.7 GB; larger batches, a backward pass or
--resident-blocks give each copied byte more compute to hide behind).
Needs CUDA; exits with a message otherwise. On a GPU with < 30 GB the stack is made smaller (and it says so)."""

import argparse
import copy
import statistics
import sys
import time

import common  # noqa: F401  (puts the project root on sys.path)
import torch
from torch import nn

import flux1
import offload

HIDDEN, HEADS, MLP_RATIO, AXES = 3072, 24, 4.0, (16, 56, 56)


class BlockStack(nn.Module):
    """Flux.forward's two block loops, without the embedders (a few MB, irrelevant here)."""

    def __init__(self, n_double: int, n_single: int):
        super().__init__()
        double = flux1.DoubleStreamBlock(HIDDEN, HEADS, MLP_RATIO, qkv_bias=True).to(torch.bfloat16)
        single = flux1.SingleStreamBlock(HIDDEN, HEADS, MLP_RATIO).to(torch.bfloat16)
        # Copies of one random block: building 12B parameters with nn.Linear's init would take minutes on the CPU.
        self.double_blocks = nn.ModuleList(copy.deepcopy(double) for _ in range(n_double))
        self.single_blocks = nn.ModuleList(copy.deepcopy(single) for _ in range(n_single))

    def forward(self, img, txt, vec, pe):
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return x


def timed(fn, iters: int) -> float:
    """Median seconds per call (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def h2d_bandwidth(host: torch.Tensor, iters: int) -> float:
    """Bytes per second of one copy from a (page-locked) host buffer, as the streamer does it."""
    device_copy = torch.empty_like(host, device="cuda")
    return host.numel() * host.element_size() / timed(lambda: device_copy.copy_(host, non_blocking=True), iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--double", type=int, default=19, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=38, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument(
        "--resident-blocks", default="0", help="comma-separated resident_blocks values to try, e.g. 0,10,20"
    )
    args = parser.parse_args()
    args.resident_blocks = [int(n) for n in args.resident_blocks.split(",")]
    if not torch.cuda.is_available():
        sys.exit("bench_offload.py measures CUDA streaming and needs a CUDA GPU; torch.cuda.is_available() is False")

    device = torch.device("cuda")
    gpu_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    block_gb = {"double": 0.679, "single": 0.283}  # bf16 bytes per block, from the shapes above
    stack_gb = args.double * block_gb["double"] + args.single * block_gb["single"]
    if gpu_gb < 30 and stack_gb > gpu_gb - 8:  # room for the resident run's activations
        scale = (gpu_gb - 8) / stack_gb
        args.double, args.single = max(1, int(args.double * scale)), max(2, int(args.single * scale))
        print(f"GPU has {gpu_gb:.0f} GB: stack cut down to {args.double} double + {args.single} single blocks")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; batch {args.batch}, 4096 + 512 tokens")

    t = time.perf_counter()
    stack = BlockStack(args.double, args.single).eval().requires_grad_(False)  # frozen: streamable
    print(f"built {args.double} double + {args.single} single blocks on the host in {time.perf_counter() - t:.0f} s")

    b, g = args.batch, torch.Generator(device).manual_seed(0)
    img = torch.randn(b, 4096, HIDDEN, device=device, dtype=torch.bfloat16, generator=g)
    txt = torch.randn(b, 512, HIDDEN, device=device, dtype=torch.bfloat16, generator=g)
    vec = torch.randn(b, HIDDEN, device=device, dtype=torch.bfloat16, generator=g)
    ids = torch.cat((torch.zeros(512, 3, device=device), flux1.image_ids(64, 64, device)))
    pe = flux1.rope(ids, AXES, 10_000)
    inputs = (img, txt, vec, pe)

    # Streamed first (the weights are on the host), then resident on the same weights.
    runs = []
    with torch.no_grad():
        for resident_blocks in args.resident_blocks:
            t = time.perf_counter()
            streamer = offload.enable_block_streaming(stack, device, resident_blocks=resident_blocks)
            print(f"enable_block_streaming(resident_blocks={resident_blocks}): {time.perf_counter() - t:.1f} s")
            if not runs:
                bandwidth = h2d_bandwidth(next(iter(streamer.packs.values())).host, args.iters)
            torch.cuda.reset_peak_memory_stats()
            seconds = timed(lambda: stack(*inputs), args.iters)
            streamed_bytes = sum(p.nbytes for p in streamer.packs.values())
            runs.append((resident_blocks, seconds, torch.cuda.max_memory_allocated(), streamed_bytes))
            offload.disable_block_streaming(stack)
        stack.to(device)
        torch.cuda.reset_peak_memory_stats()
        resident = timed(lambda: stack(*inputs), args.iters)
        peak_resident = torch.cuda.max_memory_allocated()

    print(f"host-to-device copy: {bandwidth / 1e9:.1f} GB/s (page-locked, one block)")
    print(f"resident:                   {resident * 1e3:7.1f} ms/forward, peak {peak_resident / 1e9:.1f} GB")
    for resident_blocks, seconds, peak, streamed_bytes in runs:
        floor = max(resident, streamed_bytes / bandwidth)  # a pass cannot be faster than its copies
        print(
            f"streamed, {resident_blocks:2d} resident blocks: {seconds * 1e3:7.1f} ms/forward, peak {peak / 1e9:.1f} GB"
            f", {seconds / resident:.2f}x resident (target <= 1.3x); copies {streamed_bytes / 1e9:.1f} GB, floor "
            f"{floor * 1e3:.1f} ms: {seconds / floor:.2f}x the floor (1.00 = copies fully hidden)"
        )


if __name__ == "__main__":
    main()
