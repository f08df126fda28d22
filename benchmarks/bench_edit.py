"""One RF-inversion edit (edit.py: inversion + edit, 28 steps each) against one plain text-to-image generation of 28
steps, on the mid-size FLUX.1 config, interleaved in one run.

Hidden 3072, 1 double + 2 single blocks (687M params), a 256 x 256 image (256 image tokens) and 128 text tokens,
batch 1, bf16, one thread; the full-size FLUX.1 autoencoder (random weights, bf16) encodes and decodes. The text
encoders are left out: both sides would run them once, and a fixed 128-token condition stands in for them.
Expected: about 2x (twice the transformer calls, plus one autoencoder encode).

    python benchmarks/bench_edit.py [--windows 2] [--calls 1] [--steps 28]
"""

import argparse

import torch
from common import interleaved, peak_rss_bytes

import edit
import flux1


class BenchPipeline(flux1.Flux1Pipeline):
    """FLUX.1 with a fixed text condition instead of the text encoders."""

    def __init__(self, transformer, ae, txt, vec):
        super().__init__(transformer, ae, None, None, None, None, "flux1-dev")
        self.txt, self.vec = txt, vec

    def encode_prompt(self, prompts, *args, **kwargs):
        n = len(flux1.as_list(prompts))
        return {"txt": self.txt.expand(n, -1, -1), "vec": self.vec.expand(n, -1)}

    def null_condition(self, n=1):
        return {"txt": torch.zeros_like(self.txt).expand(n, -1, -1), "vec": torch.zeros_like(self.vec).expand(n, -1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--calls", type=int, default=1)
    ap.add_argument("--steps", type=int, default=28)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    params = flux1.FluxParams(depth=1, depth_single_blocks=2)
    transformer = flux1.Flux(params).to(torch.bfloat16).eval().requires_grad_(False)
    ae = flux1.AutoEncoder(flux1.AutoEncoderParams()).to(torch.bfloat16).eval().requires_grad_(False)
    txt, vec = torch.randn(1, 128, 4096, dtype=torch.bfloat16), torch.randn(1, 768, dtype=torch.bfloat16)
    pipe = BenchPipeline(transformer, ae, txt, vec)
    image = torch.rand(1, 3, 256, 256) * 2 - 1

    def generation():
        pipe.generate("x", height=256, width=256, steps=args.steps, seed=0, output="pt", progress=False)

    def rf_edit():
        edit.edit(pipe, image, "x", steps=args.steps, seed=0, output="pt", progress=False)

    cond, x = pipe.encode_prompt("x"), torch.randn(1, 16, 32, 32)
    parts = interleaved(
        {
            "forward": lambda: pipe.velocity(x, 0.5, cond, guidance=3.5),
            "encode": lambda: pipe.encode(image),
            "decode": lambda: pipe.decode(x),
        },
        windows=1,
        calls=3,
    )
    r = interleaved({"edit": rf_edit, "generation": generation}, args.windows, args.calls)
    print("RF-inversion edit vs generation, FLUX.1 mid-size (1 double + 2 single, 256 + 128 tokens), bf16, 1 thread")
    print(
        f"torch {torch.__version__}; {args.steps} steps; one transformer forward {parts['forward']:.3f} s, "
        f"autoencoder encode {parts['encode']:.3f} s, decode {parts['decode']:.3f} s (util {parts['util']:.2f})"
    )
    print(
        f"time: edit (inversion + edit) {r['edit']:.2f} s, generation {r['generation']:.2f} s, "
        f"ratio {r['edit'] / r['generation']:.3f} (transformer calls: {2 * args.steps} vs {args.steps}), "
        f"util {r['util']:.2f}; peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
