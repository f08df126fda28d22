"""Solvers on the tiny models: the final latent's distance to a many-step reference solution at matched model calls.

The tiny FLUX.1-dev and Z-Image base repos of tests/fakes.py (random weights, official layouts; they copy the real
tokenizers from ../shared/tokenizers) are loaded by our loaders and sampled through `generate()` with each solver on
the schedule the pipeline uses: FLUX.1's mu at 1024x1024 (mu = 1.15, shift e^1.15 = 3.16, guidance 3.5) and Z-Image
base's static shift 6 (CFG 4 against the empty prompt, so one model call is two transformer passes, for every solver
alike). The latents are 16x16 (128x128 px) to keep it quick; the schedule does not depend on the canvas here because
it is passed explicitly. Error: ||x - x*|| / ||x*|| of the final latent, x* = rfpc at 400 steps (checked against
UniPC at 400 steps, printed as "reference check").

Random weights make a velocity field unlike a trained one. In particular the random time embedding (sinusoids of
1000 sigma up to 1 rad per unit, i.e. periods down to 0.006 in sigma) makes v oscillate in sigma far faster than any
4-50 step schedule resolves, so on the models "as written" every solver mostly measures where it samples sigma. The
"smooth in sigma" rows zero the time embedder's weights on the fast sinusoids (periods < 0.3 in sigma), which leaves
a random but sigma-smooth field, closer to what trained models present to a sampler. Neither says how images look.

    flock /tmp/bench.lock python benchmarks/bench_solvers.py [--calls 6,8,10,12,15,20,28,40,50] [--ref-steps 400]
"""

import argparse
import math
import tempfile
import time

import torch
from common import peak_rss_bytes
from fakes import rel, write_flux1_repo, write_zimage_repo

import flux1
import solvers
import zimage

EXTRA_CALLS = {"rfpc": 2, "rfpc1": 1}  # model calls beyond one per step (spent inside the last interval)
PROMPT = "a photo of a red fox in the snow"


def smooth_in_sigma(first_layer: torch.nn.Linear, cutoff: float = 20.0):
    """Zero the columns of the time embedder's first layer that read sinusoids faster than `cutoff` rad per unit of
    sigma (flux1.timestep_embedding: [cos, sin] of 1000 t exp(-ln(1e4) k / 128), k = 0..127)."""
    k = torch.arange(128)
    fast = 1000 * torch.exp(-math.log(10_000) * k / 128) > cutoff
    with torch.no_grad():
        first_layer.weight[:, torch.cat([fast, fast])] = 0


def error_at(points, target):
    """Calls at which the error first reaches `target`, log-log interpolated between measured budgets."""
    for (c0, e0), (c1, e1) in zip(points, points[1:]):
        if e0 <= target:
            return f"<={c0}"
        if e1 <= target:
            f = math.log(e0 / target) / math.log(e0 / e1)
            return f"{math.exp(math.log(c0) + f * math.log(c1 / c0)):.0f}"
    return f"<={points[0][0]}" if points and points[0][1] <= target else f">{points[-1][0]}"


def run(name, pipe, schedule, calls, ref_steps, noise):
    sample = lambda solver, steps: pipe.generate(  # noqa: E731
        PROMPT, noise=noise, sigmas=schedule(steps), solver=solver, output="latent", progress=False
    )
    t0 = time.perf_counter()
    reference = sample("rfpc", ref_steps)
    check = rel(sample("unipc", ref_steps), reference)
    table = {}
    for solver in solvers.SOLVERS:
        extra = EXTRA_CALLS.get(solver, 0)
        table[solver] = [(c, rel(sample(solver, c - extra), reference)) for c in calls if c - extra >= 1]
    print(
        f"\n== {name}   (reference check: UniPC at {ref_steps} steps differs by {check:.1e}; "
        f"{time.perf_counter() - t0:.0f} s)"
    )
    print(f"{'solver':<10}" + "".join(f"{c:>9}" for c in calls) + "   calls for Euler@28  Euler@50  UniPC@50")
    euler, unipc = dict(table["euler"]), dict(table["unipc"])
    targets = [euler.get(28), euler.get(50), unipc.get(50)]
    for solver, points in table.items():
        cells = {c: f"{e:.2e}" for c, e in points}
        matches = [error_at(points, t) if t is not None else "-" for t in targets]
        print(
            f"{solver:<10}" + "".join(f"{cells.get(c, '-'):>9}" for c in calls) + "".join(f"{m:>12}" for m in matches)
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", default="6,8,10,12,15,20,28,40,50", help="model-call budgets")
    ap.add_argument("--ref-steps", type=int, default=400)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (latent side / 8)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    calls = [int(c) for c in args.calls.split(",")]
    noise = torch.randn(2, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        write_flux1_repo(f"{tmp}/flux1-dev")
        write_zimage_repo(f"{tmp}/zimage-base", shift=6.0)
        for smooth in (False, True):
            label = "smooth in sigma" if smooth else "as written"
            pipe = flux1.load(f"{tmp}/flux1-dev", device="cpu", dtype=torch.float32)
            if smooth:
                smooth_in_sigma(pipe.transformer.time_in.in_layer)
            mu = solvers.flux1_mu(4096)  # what the pipeline sets at 1024x1024
            run(
                f"tiny FLUX.1-dev, {label}: mu = {mu:.2f} (1024px), guidance 3.5",
                pipe,
                lambda n: flux1.schedule(n, 1024, 1024),
                calls,
                args.ref_steps,
                noise,
            )
            pipe = zimage.load(f"{tmp}/zimage-base", variant="zimage-base", device="cpu", dtype=torch.float32)
            if smooth:
                smooth_in_sigma(pipe.transformer.t_embedder.mlp[0])
            shift = pipe.defaults.shift  # read from the repo's scheduler config, as the pipeline does
            run(
                f"tiny Z-Image base, {label}: shift {shift:g}, CFG {pipe.defaults.cfg:g}",
                pipe,
                lambda n, shift=shift: zimage.schedule(n, shift),
                calls,
                args.ref_steps,
                noise,
            )
    print(f"\npeak RSS {peak_rss_bytes() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
