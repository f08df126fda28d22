"""INT8 linear (int8.Int8Linear, eager and torch.compile'd) against bf16 and fp32 F.linear on FLUX.1's matmul shapes.

Shapes (K in, N out) are the token-wise linears of FLUX.1 at 1024x1024 (the seed document's "Matmul shapes" table),
with the row count M scaled down to fit one CPU thread: the (B, 512) text-token rows run at M = 256, the (B, 4096)
image-token and (B, 4608) joint rows at M = 512. The INT8 layer takes and returns bf16 (what a bf16 pipeline feeds
it) and includes the per-token quantisation of its input; "_int_mm" is the bare int8 GEMM on pre-quantised input.
The two 64-wide layers (img_in, final_layer.linear) are left out: int8.quantize() keeps them float.
GFLOP/s = 2 M K N / median time; one thread, the sides interleaved (benchmarks/common.interleaved).
Aim: compiled INT8 >= 1.3x bf16 on the 3072-wide shapes.

    python benchmarks/bench_int8.py [--quick] [--windows 5] [--calls 3]
"""

import argparse
import platform
import subprocess
import time

import torch
import torch.nn.functional as F
from common import interleaved

import int8

# (M, K, N, what): FLUX.1-dev's token-wise linears; M scaled from 512 -> 256 and 4096 / 4608 -> 512.
SHAPES = [
    (256, 3072, 3072, "txt proj (B,512)"),
    (256, 4096, 3072, "txt_in (B,512)"),
    (256, 3072, 9216, "txt qkv (B,512)"),
    (256, 3072, 12288, "txt mlp.0 (B,512)"),
    (256, 12288, 3072, "txt mlp.2 (B,512)"),
    (512, 3072, 3072, "img proj (B,4096)"),
    (512, 3072, 9216, "img qkv (B,4096)"),
    (512, 3072, 12288, "img mlp.0 (B,4096)"),
    (512, 12288, 3072, "img mlp.2 (B,4096)"),
    (512, 3072, 21504, "single linear1 (B,4608)"),
    (512, 15360, 3072, "single linear2 (B,4608)"),
]
QUICK = [SHAPES[0], SHAPES[7], SHAPES[10]]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        flags = next((line for line in out.splitlines() if line.startswith("Flags")), "").split()
        wanted = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
        return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no VNNI/BF16/AMX'})"
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


SIDES = ("fp32", "bf16", "eager", "compiled", "raw")


def bench_shape(m: int, k: int, n: int, windows: int, calls: int) -> tuple[dict, float]:
    """Median seconds of each side for an (m, k) x (k, n) linear with bias, and the compile time of the INT8 layer."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(k, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=g) * k**-0.5)
    w32, b32 = layer.weight.detach(), layer.bias.detach()
    w16, b16 = w32.bfloat16(), b32.bfloat16()
    q = int8.Int8Linear.from_linear(layer.bfloat16())
    x32 = torch.randn(m, k, generator=g)
    x16 = x32.bfloat16()
    with torch.inference_mode():
        x_q, _ = int8.quantize_rows(x16)
        torch._dynamo.reset()  # a fresh compile per shape: each would count towards dynamo's recompile limit (8)
        compiled = torch.compile(q)
        t = time.perf_counter()
        out = compiled(x16)  # compiles for this shape
        compile_s = time.perf_counter() - t
        ref = q(x16).float()
        if (out.float() - ref).norm() > 1e-2 * ref.norm():  # compiled code must compute the same thing
            raise RuntimeError(f"compiled INT8 output differs from eager at {m}x{k}x{n}")
        sides = {
            "fp32": lambda: F.linear(x32, w32, b32),
            "bf16": lambda: F.linear(x16, w16, b16),
            "eager": lambda: q(x16),
            "compiled": lambda: compiled(x16),
            "raw": lambda: torch._int_mm(x_q, q.weight.t()),
        }
        for fn in sides.values():  # warm-up
            fn()
        return interleaved(sides, windows, calls), compile_s


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help=f"{len(QUICK)} shapes instead of {len(SHAPES)}")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, 1 thread")
    print(f"{args.windows} windows x {args.calls} calls, median; GFLOP/s = 2MKN / time")
    print()
    cols = "| M | K | N | layer | fp32 | bf16 | int8 eager | int8 compiled | _int_mm alone "
    print(cols + "| compiled/bf16 | eager/bf16 | _int_mm/bf16 | compile s | util |")
    print("|---" * 14 + "|")
    t_start = time.perf_counter()
    ratios = []  # compiled INT8 speed / bf16 speed; every FLUX.1 token-wise linear has a 3072-wide side
    for m, k, n, what in QUICK if args.quick else SHAPES:
        r, compile_s = bench_shape(m, k, n, args.windows, args.calls)
        gflops = {name: 2 * m * k * n / r[name] / 1e9 for name in SIDES}
        ratio = r["bf16"] / r["compiled"]
        ratios.append(ratio)
        print(
            f"| {m} | {k} | {n} | {what} | {gflops['fp32']:.0f} | {gflops['bf16']:.0f} | {gflops['eager']:.0f} "
            f"| {gflops['compiled']:.0f} | {gflops['raw']:.0f} | {ratio:.2f}x | {r['bf16'] / r['eager']:.2f}x "
            f"| {r['bf16'] / r['raw']:.2f}x | {compile_s:.1f} | {r['util']:.2f} |"
        )
    print()
    print(
        f"compiled INT8 / bf16 speed: min {min(ratios):.2f}x, max {max(ratios):.2f}x over {len(ratios)} shapes "
        f"(aim >= 1.3x: {'met' if min(ratios) >= 1.3 else 'NOT met'} on every shape); "
        f"total {time.perf_counter() - t_start:.0f} s"
    )


if __name__ == "__main__":
    main()
