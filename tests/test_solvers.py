"""solvers.py: convergence orders on a flow with a closed-form velocity, parity with diffusers' schedulers on the same
sigmas, exact behaviour at sigma = 1 and sigma = 0, and the schedule helpers."""

import math

import numpy as np
import pytest
import torch
from fakes import rel

import solvers

try:  # test-only oracle
    import diffusers
except ImportError:
    diffusers = None
needs_diffusers = pytest.mark.skipif(diffusers is None, reason="diffusers is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# ground truth: data from a Gaussian mixture, for which the velocity E[noise - x0 | x_sigma] has a closed form

WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
MEANS = torch.tensor([[-1.0, 0.5], [1.5, 1.0], [0.2, -1.5]], dtype=torch.float64)
STDS = torch.tensor([0.6, 0.8, 0.5], dtype=torch.float64)  # wide enough that the field is smooth down to sigma = 0


def gmm_velocity(x, sigma):
    """Exact velocity for x0 ~ sum_k w_k N(mu_k, s_k^2 I), x_sigma = a x0 + sigma noise, a = 1 - sigma.
    Within component k, (x0, noise, x_sigma) are jointly Gaussian with x_sigma ~ N(a mu_k, var_k I),
    var_k = a^2 s_k^2 + sigma^2, Cov(x0, x_sigma) = a s_k^2 I and Cov(noise, x_sigma) = sigma I, so both posterior
    means are linear in x_sigma; the mixture weights them by the posterior component probabilities. No division
    by sigma or a, so the field is finite at both ends."""
    sigma = float(sigma)
    a = 1 - sigma
    var = a**2 * STDS**2 + sigma**2  # (K,)
    diff = x.double()[:, None, :] - a * MEANS  # (B, K, D)
    log_p = WEIGHTS.log() - 0.5 * (diff**2).sum(-1) / var - 0.5 * x.shape[-1] * var.log()
    resp = log_p.softmax(-1)[..., None]
    x0 = MEANS + (a * STDS**2 / var)[:, None] * diff
    noise = (sigma / var)[:, None] * diff
    return (resp * (noise - x0)).sum(1).to(x.dtype)


def rk4(velocity_fn, x, start, end, steps=1000):
    """Classical RK4 in sigma: fourth order, 1000 steps are exact here to ~1e-12 (2000 steps change it by 8e-13)."""
    s = torch.linspace(start, end, steps + 1, dtype=torch.float64).tolist()
    for a, b in zip(s, s[1:]):
        h = b - a
        k1 = velocity_fn(x, a)
        k2 = velocity_fn(x + h / 2 * k1, a + h / 2)
        k3 = velocity_fn(x + h / 2 * k2, a + h / 2)
        k4 = velocity_fn(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.fixture(scope="module")
def noise():
    return torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


SOLVER_VARIANTS = {
    "euler": solvers.euler,
    "dpmpp_2m": solvers.dpmpp_2m,
    "unipc2": solvers.unipc,
    "unipc3": lambda v, x, s, **kw: solvers.unipc(v, x, s, order=3, **kw),
    "rfpc": solvers.rfpc,
    "rfpc1": solvers.rfpc1,
}
REFERENCES = ["euler", "dpmpp_2m", "unipc2", "unipc3"]  # the published methods, whose orders the test below pins


def observed_order(steps, errors):
    """Least-squares slope of -log(error) against log(steps)."""
    x, y = np.log(steps), np.log(errors)
    return -np.polyfit(x, y, 1)[0]


@pytest.mark.parametrize(
    "start, end, steps, min_order",
    [
        # Inside (0, 1) lambda is bounded and the multistep solvers reach their asymptotic order 2 (the last step is
        # first order, local error O(h^2), so UniPC's corrector cannot lift the global order above 2).
        (0.9, 0.1, [16, 32, 64, 128], 1.8),
        # The full range, with lambda = -inf at the start and +inf at the end: on a grid uniform in sigma the steps
        # nearest the ends have lambda-widths log((k+1)/k) that do not shrink with N, which costs DPM-Solver++(2M) a
        # log factor, error ~ log(N) / N^2 (measured slope 1.67 over 32..256). It must still be clearly above Euler.
        (1.0, 0.0, [32, 64, 128, 256], 1.5),
    ],
)
def test_convergence_order(noise, start, end, steps, min_order):
    reference = rk4(gmm_velocity, noise, start, end)
    errors = {}
    for name in REFERENCES:
        solve, errors[name] = SOLVER_VARIANTS[name], []
        for n in steps:
            x = solve(gmm_velocity, noise, torch.linspace(start, end, n + 1, dtype=torch.float64))
            assert torch.isfinite(x).all()
            errors[name].append((x - reference).pow(2).mean().sqrt().item())
    orders = {name: observed_order(steps, e) for name, e in errors.items()}
    assert 0.8 <= orders["euler"] <= 1.3, orders
    for name in ["dpmpp_2m", "unipc2", "unipc3"]:
        assert min_order <= orders[name] <= 3.5, orders
        assert errors[name][-1] < errors["euler"][-1] / 30, errors
    if start == 1.0:
        # The UniC corrector adds an order in the interior: at equal model calls UniPC beats DPM-Solver++(2M),
        # which is what UniP-2 alone is. Measured ratio 0.43 at 64 steps.
        assert errors["unipc2"][1] < 0.6 * errors["dpmpp_2m"][1], errors


@pytest.mark.parametrize("name", SOLVER_VARIANTS)
def test_straight_paths_are_exact(name):
    # Data concentrated at one point x0 makes every path a straight line x = (1 - sigma) x0 + sigma noise with constant
    # velocity (x - x0) / sigma, and a constant data prediction x0: Euler and the exponential integrators are exact
    # for any grid, including one big step from pure noise straight to sigma = 0.
    x0 = torch.tensor([[0.3, -2.0, 1.0]], dtype=torch.float64)
    noise = torch.tensor([[1.0, 0.5, -0.7]], dtype=torch.float64)
    velocity_fn = lambda x, sigma: (x - x0) / sigma
    for sigmas in [
        solvers.linear_sigmas(1),
        solvers.linear_sigmas(7),
        solvers.static_shift(solvers.linear_sigmas(5), 3),
    ]:
        x = SOLVER_VARIANTS[name](velocity_fn, noise, sigmas)
        torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)
    start = 0.6  # image-to-image: start part-way, from the noised image
    x = SOLVER_VARIANTS[name](velocity_fn, (1 - start) * x0 + start * noise, solvers.linear_sigmas(4, start=start))
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-12)


NO_NAN_SCHEDULES = {
    "1 step": solvers.linear_sigmas(1),
    "2 steps": solvers.linear_sigmas(2),
    "3 steps": solvers.linear_sigmas(3),
    "flux2 4 steps": solvers.time_shift(solvers.linear_sigmas(4), solvers.flux2_mu(4096, 4)),
    "shift 3, 10 steps": solvers.static_shift(solvers.linear_sigmas(10), 3.0),
    "image-to-image": solvers.linear_sigmas(6, start=0.6),
}


@pytest.mark.parametrize("schedule", NO_NAN_SCHEDULES)
@pytest.mark.parametrize("name", SOLVER_VARIANTS)
def test_exact_ends_no_nan(noise, name, schedule):
    # Schedules run from exactly 1.0 (lambda = -inf) to exactly 0.0 (lambda = +inf). The model returns bf16 as a
    # real one would; the solver must keep float32 and stay finite.
    sigmas = NO_NAN_SCHEDULES[schedule].float()
    velocity_fn = lambda x, sigma: gmm_velocity(x, sigma).bfloat16()
    calls = []
    x = SOLVER_VARIANTS[name](velocity_fn, noise.float(), sigmas, callback=lambda i, n: calls.append((i, n)))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    n = len(sigmas) - 1
    assert calls == [(i, n) for i in range(1, n + 1)]
    # and it is the same integration as in float64, up to the bf16 velocities
    x64 = SOLVER_VARIANTS[name](gmm_velocity, noise, sigmas.double())
    assert rel(x, x64) < 1e-2


def test_rejects_bad_sigmas(noise):
    with pytest.raises(AssertionError):
        solvers.euler(gmm_velocity, noise, torch.tensor([0.0, 0.5, 1.0]))


# -----------------------------------------------------------------------------
# parity with diffusers (test-only oracle)

SCHEDULES = {
    "linear 10": solvers.linear_sigmas(10),
    "flux1 1024px 28": solvers.time_shift(solvers.linear_sigmas(28), solvers.flux1_mu(4096)),
    "image-to-image": solvers.linear_sigmas(8, start=0.6),
    "1 step": solvers.linear_sigmas(1),
    "2 steps": solvers.linear_sigmas(2),
    "3 steps": solvers.linear_sigmas(3),
}


def run_diffusers(scheduler, sigmas, x):
    """Drive a diffusers multistep scheduler on exactly our float64 sigmas with the closed-form velocity.
    DPMSolverMultistepScheduler.set_timesteps (0.42.1) takes no sigmas, and UniPC's rounds them to float32 and moves
    sigma = 1 to 1 - 1e-6, so set_timesteps only sizes the state (timesteps, history) and we then overwrite
    scheduler.sigmas, the only schedule step() reads. set_begin_index(0) stops step() from looking the step up by
    integer timestep (which can repeat)."""
    scheduler.set_timesteps(num_inference_steps=len(sigmas) - 1)
    scheduler.sigmas = sigmas.clone()
    scheduler.set_begin_index(0)
    for i, t in enumerate(scheduler.timesteps):
        v = gmm_velocity(x, sigmas[i])  # prediction_type="flow_prediction": the model output is the velocity
        x = scheduler.step(model_output=v, timestep=t, sample=x).prev_sample
    return x


def dpm_scheduler():
    return diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


def unipc_scheduler(order):
    return diffusers.UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        solver_type="bh2",
        predict_x0=True,
        solver_order=order,
        lower_order_final=True,
        final_sigmas_type="zero",
    )


def nudged(sigmas, eps=1e-6):
    """What UniPCMultistepScheduler.set_timesteps does to a schedule starting at 1."""
    sigmas = sigmas.clone()
    if sigmas[0] == 1:
        sigmas[0] = 1 - eps
    return sigmas


@needs_diffusers
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_dpmpp_2m_matches_diffusers(noise, schedule):
    # diffusers' DPM-Solver++ evaluates lambda = log(alpha) - log(sigma) as -inf / +inf at the ends and its formulas
    # happen to reach the same limits we take explicitly, so no nudging is needed. Its step() casts the sample to
    # float32, which limits the agreement to ~1e-7 (measured 1.7e-7 at most).
    sigmas = SCHEDULES[schedule]
    ours = solvers.dpmpp_2m(gmm_velocity, noise, sigmas)
    theirs = run_diffusers(dpm_scheduler(), sigmas, noise)
    assert rel(ours, theirs) < 1e-6


@needs_diffusers
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers(noise, order, schedule):
    # diffusers' UniPC gets NaN from its corrector's linear solve when a history point sits at sigma = 1 exactly
    # (order 3), which is why its set_timesteps moves sigma = 1 to 1 - 1e-6. Compare on that nudged grid, where all
    # lambdas are finite: diffusers keeps the float64 sample, so the agreement is to rounding (measured 5e-16).
    sigmas = nudged(SCHEDULES[schedule])
    ours = solvers.unipc(gmm_velocity, noise, sigmas, order=order)
    theirs = run_diffusers(unipc_scheduler(order), sigmas, noise)
    assert rel(ours, theirs) < 1e-12


@needs_diffusers
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_exact_start_is_the_limit_of_diffusers_nudge(noise, order):
    # Starting exactly at sigma = 1 we drop the lambda = -inf point from UniPC's linear system, its exact limit.
    # diffusers' nudged start 1 - eps puts that point at lambda ~ log(eps), finite, so its result approaches ours
    # only like 1 / log(eps)^2 (a discretisation-size difference: at eps = 1e-6 and 6 steps, 3e-4 for order 2 and
    # 1.5e-3 for order 3). So check that the gap closes monotonically as eps -> 0 rather than expecting a match.
    sigmas = solvers.linear_sigmas(6)
    ours = solvers.unipc(gmm_velocity, noise, sigmas, order=order)
    gaps = [
        rel(ours, run_diffusers(unipc_scheduler(order), nudged(sigmas, eps), noise))
        for eps in [1e-3, 1e-6, 1e-9, 1e-12]
    ]
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < gaps[0] / 4, gaps


@needs_diffusers
def test_unipc2_exact_ends_match_diffusers(noise):
    # With order 2 diffusers' inf arithmetic at sigma = 1 survives (its 2x2 solve pivots on the -inf entry) and lands
    # on the same limit as ours, so here the exact grid can be compared directly.
    sigmas = SCHEDULES["linear 10"]
    assert rel(solvers.unipc(gmm_velocity, noise, sigmas), run_diffusers(unipc_scheduler(2), sigmas, noise)) < 1e-12


# -----------------------------------------------------------------------------
# schedules


def test_linear_sigmas():
    assert solvers.linear_sigmas(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    s = solvers.linear_sigmas(3, start=0.6)
    assert s.dtype == torch.float64 and s[0] == 0.6 and s[-1] == 0 and len(s) == 4


def test_shift_endpoints_exact():
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    for mu in [-2.0, 0.0, 0.63, 1.15, 2.3, 10.0]:
        assert solvers.time_shift(ends, mu).tolist() == [0.0, 1.0]
        assert solvers.time_shift(ends.float(), mu).tolist() == [0.0, 1.0]
    for shift in [0.5, 1.0, 3.0, 12.0]:
        assert solvers.static_shift(ends, shift).tolist() == [0.0, 1.0]
    sigmas = solvers.linear_sigmas(16)
    torch.testing.assert_close(solvers.time_shift(sigmas, math.log(3.0)), solvers.static_shift(sigmas, 3.0))
    torch.testing.assert_close(solvers.time_shift(sigmas, 0.0), sigmas)


def test_static_shift_values():
    s = solvers.static_shift(solvers.linear_sigmas(8), 3.0)
    expected = [1, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0]
    torch.testing.assert_close(s, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def test_mu():
    assert solvers.flux1_mu(256) == pytest.approx(0.5)
    assert solvers.flux1_mu(1024) == pytest.approx(0.63)
    assert solvers.flux1_mu(4096) == pytest.approx(1.15)
    assert solvers.flux2_mu(4096, 4) == pytest.approx(2.291, abs=1e-3)
    assert solvers.flux2_mu(4096, 50) == pytest.approx(2.023, abs=1e-3)
    assert solvers.flux2_mu(1024, 4) == pytest.approx(2.031, abs=1e-3)
    assert solvers.flux2_mu(5000, 4) == solvers.flux2_mu(5000, 50) == pytest.approx(0.00016927 * 5000 + 0.45666666)


@needs_diffusers
@pytest.mark.parametrize("steps", [4, 28, 50])
@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
def test_flux1_schedule_matches_diffusers(steps, image_seq_len):
    # How FLUX.1 pipelines in diffusers build their schedule. diffusers rounds the linspace to float32 before
    # shifting in float32; ours shifts in float64, so the two agree to a couple of float32 ulps (measured <= 1.2e-7).
    mu = solvers.flux1_mu(image_seq_len)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(num_inference_steps=steps, mu=mu, sigmas=np.linspace(1, 1 / steps, steps))
    ours = solvers.time_shift(solvers.linear_sigmas(steps), mu)
    assert scheduler.sigmas.dtype == torch.float32 and scheduler.sigmas[-1] == 0 and ours[-1] == 0
    assert (ours.float() - scheduler.sigmas).abs().max() <= 2 * torch.finfo(torch.float32).eps


# -----------------------------------------------------------------------------
# rfpc: order on a flow with a closed-form solution, exactness, the calls it makes, every schedule from 1 to 100 steps

GAUSS_MEAN = torch.tensor([0.5, -1.0, 0.3, 0.0], dtype=torch.float64)
GAUSS_VAR = torch.tensor([0.2, 0.5, 1.0, 2.0], dtype=torch.float64)


def gaussian_velocity(x, sigma):
    """Exact velocity for x0 ~ N(mean, diag(var)): per coordinate, (x0, noise, x_sigma) are jointly Gaussian, so v is
    affine in x: v = (sigma - a var) / (a^2 var + sigma^2) (x - a mean) - mean, a = 1 - sigma."""
    a = 1 - sigma
    return (sigma - a * GAUSS_VAR) / (a * a * GAUSS_VAR + sigma * sigma) * (x - a * GAUSS_MEAN) - GAUSS_MEAN


def gaussian_solution(noise, sigma):
    """The probability-flow ODE's solution through `noise` at sigma = 1, in closed form: the linear map between the
    Gaussians, x = a mean + sqrt(a^2 var + sigma^2) noise, whose sigma-derivative is gaussian_velocity there."""
    a = 1 - sigma
    return a * GAUSS_MEAN + (a * a * GAUSS_VAR + sigma * sigma).sqrt() * noise


@pytest.mark.parametrize(
    "start, orders",
    [
        # Order = `order` (see rfpc's docstring). From pure noise the first steps, where m is nearly affine in alpha,
        # cost little, so order 3 shows more than 3 over 16..128 steps (measured 3.60); an image-to-image start inside
        # the high-SNR half shows it exactly (measured 3.07). Order 2 (the default) measures 1.93-1.98.
        (1.0, {"rfpc": (1.8, 2.4), "rfpc1": (1.8, 2.4), "rfpc order 3": (3.2, 4.2), "euler": (0.9, 1.1)}),
        (0.5, {"rfpc": (1.8, 2.4), "rfpc1": (1.8, 2.4), "rfpc order 3": (2.8, 3.3), "euler": (0.9, 1.1)}),
    ],
)
def test_rfpc_convergence_order(start, orders):
    noise = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x, reference = gaussian_solution(noise, start), gaussian_solution(noise, 0.0)
    methods = {
        "rfpc": solvers.rfpc,
        "rfpc1": solvers.rfpc1,
        "rfpc order 3": lambda v, x, s: solvers.rfpc(v, x, s, order=3),
        "euler": solvers.euler,
    }
    steps = [16, 32, 64, 128]
    errors = {
        name: [
            (f(gaussian_velocity, x, solvers.linear_sigmas(n, start)) - reference).pow(2).mean().sqrt().item()
            for n in steps
        ]
        for name, f in methods.items()
    }
    measured = {name: observed_order(steps, e) for name, e in errors.items()}
    assert all(lo <= measured[name] <= hi for name, (lo, hi) in orders.items()), measured
    # and at equal model calls (34) it is ahead of UniPC, far ahead at order 3 (measured 1.9-2.1x and 15-20x)
    unipc = (solvers.unipc(gaussian_velocity, x, solvers.linear_sigmas(34, start)) - reference).pow(2).mean().sqrt()
    assert errors["rfpc"][1] < unipc / 1.7 and errors["rfpc order 3"][1] < unipc / 10, (errors, unipc)


def test_rfpc_exact_for_a_flat_data_prediction():
    # v = (x - m(sigma)) / sigma with m = a + b rho^2 (rho = sigma / (1 - sigma)) is affine in x, and m has the flat
    # end at sigma = 0 that the ODE gives every smooth field. Below sigma = 1/2 rfpc interpolates m in rho: with
    # order 3 exactly for this m once three nodes are in (the predictor too, so that the correction of m to the
    # corrected state is zero; the warm-up steps are not exact, so the last three points must be past them), and its
    # final step extrapolates m to rho = 0 in a + b rho^2 + c rho^3: the answer is a exactly. The reference solvers
    # stop at m(sigma_(N-1)) = a + b rho_(N-1)^2.
    a = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.5, 0.4, -3.0]], dtype=torch.float64)
    velocity_fn = lambda x, sigma: (x - a - b * (sigma / (1 - sigma)) ** 2) / sigma
    x = torch.tensor([[1.0, 0.5, -0.7]], dtype=torch.float64)
    for steps in [6, 9, 20]:
        sigmas = solvers.linear_sigmas(steps, start=0.45)
        for tail in [1, 2]:
            out = solvers.rfpc(velocity_fn, x, sigmas, order=3, tail=tail)
            torch.testing.assert_close(out, a, rtol=0, atol=1e-12)
        assert (solvers.unipc(velocity_fn, x, sigmas) - a).abs().max() > 1e-4


def test_rfpc_calls_at_the_schedule_points_and_inside_the_last_interval(noise):
    sigmas = solvers.static_shift(solvers.linear_sigmas(10), 3.0)
    last = sigmas[-2].item()
    seen = []
    recording = lambda x, sigma: seen.append(sigma) or gmm_velocity(x, sigma)
    for solve, tail in [(solvers.rfpc, [2 / 3 * last, 1 / 3 * last]), (solvers.rfpc1, [last / 2])]:
        seen.clear()
        solve(recording, noise, sigmas)
        assert seen == pytest.approx(sigmas[:-1].tolist() + tail, rel=1e-15, abs=0)
    seen.clear()  # a schedule that stops above 0 has no last interval to split: one call per step
    solvers.rfpc(recording, noise, sigmas[:-1])
    assert seen == sigmas[:-2].tolist()


def every_schedule(steps):
    """The schedules the models ship with, at `steps` steps."""
    even = solvers.linear_sigmas(steps)
    return {
        "shift 1": even,
        "shift 3": solvers.static_shift(even, 3.0),
        "shift 6 (Z-Image base)": solvers.static_shift(even, 6.0),
        "FLUX.1 1024px": solvers.time_shift(even, solvers.flux1_mu(4096)),
        "FLUX.2 1024px": solvers.time_shift(even, solvers.flux2_mu(4096, steps)),
        # Wan's FlowUniPC: the even grid starts at 1 - 1/1000, then shift 5
        "Wan": solvers.static_shift(torch.linspace(1 - 1e-3, 0, steps + 1, dtype=torch.float64), 5.0),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rfpc", "rfpc1"])
def test_finite_for_every_step_count_on_every_schedule(name):
    # float32 state and bf16 velocities, as on a GPU; the progress callback sees the schedule's steps.
    solve = solvers.SOLVERS[name]
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
    velocity_fn = lambda x, sigma: gmm_velocity(x, sigma).bfloat16()
    calls = []
    for steps in range(1, 101):
        for schedule, sigmas in every_schedule(steps).items():
            calls.clear()
            out = solve(velocity_fn, x, sigmas.float(), callback=lambda i, n: calls.append(i))
            assert out.dtype == torch.float32 and torch.isfinite(out).all(), (schedule, steps)
            assert calls == list(range(1, steps + 1)), (schedule, steps)


@pytest.fixture(scope="module")
def tiny_flux1(flux1_repo):
    """The tiny FLUX.1-dev's velocity for one random conditioning, with its time embedder low-passed: random weights
    on the fast sinusoids of 1000 sigma (periods down to 0.006 in sigma) make the field oscillate in sigma far faster
    than any schedule resolves, which trained models do not do; zeroing them (periods < 0.3 kept) leaves a random
    field that is smooth in sigma, so that convergence can be seen (benchmarks/bench_solvers.py measures both)."""
    import flux1

    pipe = flux1.load(flux1_repo[0], device="cpu", dtype=torch.float32)
    fast = 1000 * torch.exp(-math.log(10_000) * torch.arange(128) / 128) > 20
    with torch.no_grad():
        pipe.transformer.time_in.in_layer.weight[:, torch.cat([fast, fast])] = 0
    g = torch.Generator().manual_seed(0)
    cond = {"txt": torch.randn(1, 7, 48, generator=g), "vec": torch.randn(1, 24, generator=g)}
    noise = torch.randn(1, 16, 8, 8, generator=g)
    return lambda x, sigma: pipe.velocity(x, sigma, cond, guidance=3.5), noise, flux1.schedule


def test_euler_converges_to_rfpc_on_tiny_flux1(tiny_flux1):
    # The same ODE on a real model's velocity field, with FLUX.1's 1024px schedule: Euler's distance to rfpc's
    # 64-step answer shrinks at first order as its steps grow (measured 1.6e-2, 6.0e-3, 2.2e-3).
    velocity_fn, noise, schedule = tiny_flux1
    sigmas = lambda n: schedule(n, 1024, 1024)
    reference = solvers.rfpc(velocity_fn, noise, sigmas(64))
    euler = [rel(solvers.euler(velocity_fn, noise, sigmas(n)), reference) for n in (16, 32, 64)]
    assert euler[0] > 1.7 * euler[1] > 1.7**2 * euler[2] and euler[2] < 5e-3, euler


def test_sample_cli_lists_every_solver():
    import sample

    help_text = sample.build_parser().format_help()
    assert all(name in help_text for name in solvers.SOLVERS)
