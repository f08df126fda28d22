"""
Samplers for rectified-flow models: noise schedules and ODE solvers.

Convention: x_sigma = (1 - sigma) * x0 + sigma * noise, sigma = 1 is pure noise, sigma = 0 is data. The model predicts
the velocity v = noise - x0 and sampling integrates dx/dsigma = v from sigma = 1 (or lower, for image-to-image) down
to sigma = 0. Two other views of the same model output are used below:
    data prediction   m = x - sigma * v          (the model's guess of x0)
    log-SNR           lambda = log((1 - sigma) / sigma),  with alpha = 1 - sigma the signal scale
Every solver here calls `velocity_fn(x, sigma)` with sigma as a python float, casts the result to x.dtype (models
often return bf16; the integration itself stays in x's dtype, normally float32), and calls `callback(i, n)` after
step i of n (i = 1..n) if given, e.g. for a progress bar. A schedule is a strictly decreasing 1-D tensor of sigmas.
"""

import math

import numpy as np
import torch

# -----------------------------------------------------------------------------
# schedules


def linear_sigmas(steps, start=1.0):
    """steps + 1 evenly spaced sigmas from `start` to 0, in float64 (.float() rounds them like float32 code would)."""
    return torch.linspace(start, 0.0, steps + 1, dtype=torch.float64)


def static_shift(sigmas, shift):
    """SD3's timestep shift (arXiv 2403.03206, §5.3.2): shift * t / (1 + (shift - 1) * t).
    Shifting > 1 spends more steps at high noise, which larger images need since their pixels are more redundant.
    Written as t / (t + (1 - t) / shift) so that 0 -> 0 and 1 -> 1 hold exactly in floating point."""
    return sigmas / (sigmas + (1 - sigmas) / shift)


def time_shift(sigmas, mu):
    """FLUX's exponential shift exp(mu) / (exp(mu) + 1/t - 1), which is static_shift with shift = exp(mu); this form
    has no 1/t, so t = 0 gives 0 instead of a division by zero."""
    return static_shift(sigmas, math.exp(mu))


def flux1_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """FLUX.1's shift: mu is linear in the number of image tokens (4096 tokens, 1024x1024 px: 1.15; 512 px: 0.63)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux2_mu(image_seq_len, steps):
    """FLUX.2's empirical shift, fitted at 10 and 200 steps and linear in the step count between (few steps want a
    larger shift). Beyond 4300 tokens the 200-step fit is used for every step count."""
    mu_10 = 8.73809524e-5 * image_seq_len + 1.89833333
    mu_200 = 0.00016927 * image_seq_len + 0.45666666
    if image_seq_len > 4300:
        return mu_200
    slope = (mu_200 - mu_10) / 190
    return mu_200 + slope * (steps - 200)


# -----------------------------------------------------------------------------
# helpers shared by the solvers


def _sigma_list(sigmas):
    s = torch.as_tensor(sigmas, dtype=torch.float64).tolist()  # python floats: one device sync, float64 coefficients
    assert all(a > b for a, b in zip(s, s[1:])) and 0 <= s[-1] and s[0] <= 1, "need decreasing sigmas in [0, 1]"
    return s


def _data_prediction(velocity_fn, x, sigma):
    return x - sigma * velocity_fn(x, sigma).to(x.dtype)


def _log_snr(sigma):
    """lambda = log(alpha / sigma) with its exact limits: -inf at pure noise, +inf at clean data."""
    if sigma >= 1:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _exp_step(x, sigma, sigma_next, d):
    """Exact solution of the probability-flow ODE from sigma to sigma_next if the data prediction were the constant d.
    In lambda the data-prediction ODE reads x_t = (sigma_t / sigma_s) x_s + sigma_t * int e^lambda m dlambda, and with
    alpha = 1 - sigma the weight alpha_t * (1 - e^-h) equals 1 - sigma_t / sigma_s, so no lambda appears: this is
    DDIM, and for rectified flow also an Euler step with the velocity (x - d) / sigma. It is finite at sigma = 1
    and gives exactly d at sigma_next = 0, which is how the infinite ends of lambda are taken in their exact limits."""
    r = sigma_next / sigma
    return r * x + (1 - r) * d


# -----------------------------------------------------------------------------
# solvers


def euler(velocity_fn, x, sigmas, callback=None):
    """First-order Euler in sigma, the sampler rectified-flow models are usually trained and distilled for."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        x = x + (s[i + 1] - s[i]) * velocity_fn(x, s[i]).to(x.dtype)
        if callback is not None:
            callback(i + 1, n)
    return x


def dpmpp_2m(velocity_fn, x, sigmas, callback=None):
    """DPM-Solver++(2M) (Lu et al., arXiv 2211.01095, Alg. 2): a multistep exponential integrator in lambda on the data
    prediction, reusing the previous step's prediction for second order at one model call per step.
    The first step has no history and the last step is first order ("lower order final", as in the authors' code, to
    stabilise few-step sampling; into sigma = 0 it is forced anyway, lambda = +inf makes the extrapolation blow up).
    A previous point at sigma = 1 sits at lambda = -inf, so its difference term has weight h / h_prev = 0: the
    exact limit is a first-order step."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    m_prev = None
    for i in range(n):
        m = _data_prediction(velocity_fn, x, s[i])
        d = m
        if m_prev is not None and i < n - 1:
            h = _log_snr(s[i + 1]) - _log_snr(s[i])
            h_prev = _log_snr(s[i]) - _log_snr(s[i - 1])
            d = m + 0.5 * (h / h_prev) * (m - m_prev)  # linear extrapolation of m in lambda, midpoint rule
        x = _exp_step(x, s[i], s[i + 1], d)
        m_prev = m
        if callback is not None:
            callback(i + 1, n)
    return x


def _unipc_weights(r, h):
    """UniPC's rho (arXiv 2302.04867, Thm 3.1 and the B(h) = e^-h - 1 "bh2" choice, data prediction): solve
    sum_k rho_k r_k^(i-1) = i! phi_(i+1)(-h) / phi_1(-h), i = 1..K, with the phi functions phi_1(z) = (e^z - 1) / z,
    phi_(k+1)(z) = (phi_k(z) - 1/k!) / z, computed here as z * phi_k to avoid 0/0."""
    if not r:
        return []
    z = -h
    z_phi = math.expm1(z)  # z * phi_1(z)
    b = []
    for k in range(1, len(r) + 1):
        z_phi = z_phi / z - 1 / math.factorial(k)  # z * phi_(k+1)(z)
        b.append(math.factorial(k) * z_phi / math.expm1(z))
    R = torch.tensor([[rk**i for rk in r] for i in range(len(r))], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x, sigma_next, history, order, m_next=None):
    """One UniP step of the given order from history[-1] = (sigma, m) to sigma_next, or, with m_next (the data
    prediction at the predicted point), the UniC corrector of that same step. Previous points k enter as divided
    differences D_k = (m_k - m) / r_k with r_k = (lambda_k - lambda) / h; the corrector adds the new point at r = 1."""
    sigma, m = history[-1]
    lam = _log_snr(sigma)
    h = _log_snr(sigma_next) - lam
    # A point at sigma = 1 has r_k = -inf: its D_k -> 0 and, in the limit, its row and column leave the linear system
    # for rho, so dropping it is the exact limit (diffusers instead moves sigma = 1 to 1 - 1e-6).
    nodes = [((_log_snr(s_k) - lam) / h, m_k) for s_k, m_k in reversed(history[-order:-1]) if s_k < 1]
    if m_next is not None:
        nodes.append((1.0, m_next))
    if (m_next is None and order == 2) or (m_next is not None and order == 1):
        rhos = [0.5] * len(nodes)  # one difference: any 1/2 + O(h) keeps the order; UniP-2 is then DPM-Solver++(2M)
    else:
        rhos = _unipc_weights([r for r, _ in nodes], h)
    d = m
    for rho, (r, m_k) in zip(rhos, nodes):
        d = d + (rho / r) * (m_k - m)
    return _exp_step(x, sigma, sigma_next, d)


def unipc(velocity_fn, x, sigmas, order=2, callback=None):
    """UniPC (Zhao et al., arXiv 2302.04867) with B(h) = e^-h - 1 ("bh2") on the data prediction: a UniP predictor of
    the given order (2 or 3; lower while warming up and on the last steps), then, once the model has been called at
    the new point, the UniC corrector redoes the step with that value too, which raises the order by one at no extra
    model call. The last step is not corrected, as that would need one more call. Same steps as diffusers'
    UniPCMultistepScheduler(solver_type="bh2", lower_order_final=True), except at sigma = 1 (see _unipc_update)."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    history = []  # (sigma, data prediction) of the last `order` points, newest last
    x_prev, p = x, 1  # state before the previous step and its order, for the corrector
    for i in range(n):
        m = _data_prediction(velocity_fn, x, s[i])
        if i > 0:
            x = _unipc_update(x_prev, s[i], history, p, m_next=m)
        history = (history + [(s[i], m)])[-order:]
        p = min(order, i + 1, n - i)  # warm-up, and lower order on the final steps
        x_prev = x
        x = _unipc_update(x, s[i + 1], history, p)
        if callback is not None:
            callback(i + 1, n)
    return x


# -----------------------------------------------------------------------------
# rfpc: a predictor-corrector for the schedules rectified-flow models ship with
#
# Why the solvers above stall on shifted schedules (SD3/FLUX/Z-Image shift 3-6): the schedule leaves one large last
# interval (sigma_(N-1) = shift / (N + shift - 1), 0.10 at 28 FLUX.1 steps), every reference solver crosses it with a
# first-order step (x_0 = m(sigma_(N-1))), and polynomials in lambda are a poor model of m near either end: lambda is
# infinite there and the lambda-widths of evenly spaced steps near sigma = 0 or 1, log((k + 1) / k), do not shrink as
# N grows. Measured on an exact flow (../shared/solver-bench, D = 16, shift 3, 28 calls) the last step alone is 60%
# of UniPC's error. rfpc keeps UniPC's one-call-per-point predictor-corrector structure and changes three things:
#  1. The data prediction m is interpolated in tau(lambda), which is lambda itself in the middle, -1 <= lambda <= 0
#     (as in DPM-Solver++ and UniPC: there a polynomial in lambda fits m whatever the scale of the data), and near
#     the ends the variable m is smooth in: rho = sigma / alpha = e^-lambda towards sigma = 0 (m = m(0) + O(rho^2),
#     see 3.) and 1 / rho towards sigma = 1 (m = E[x0] + O(alpha)); the pieces are joined C^1. Evenly spaced steps
#     near either end are then evenly spaced in tau, and pure noise (sigma = 1) is an ordinary node, tau = -2.
#  2. The interval into sigma = 0 is split by `tail` extra model calls (at 2/3 and 1/3 of sigma_(N-1) for tail = 2):
#     the schedule's own points are all kept and all visited; the solver spends N + tail calls on N steps.
#  3. The step into sigma = 0 evaluates nothing (x_0 = m(0) exactly) but extrapolates m to rho = 0 from the last three
#     points with the ODE's own flatness: along a solution dm/dsigma = v - v - sigma dv/dsigma = -sigma dv/dsigma,
#     which vanishes at sigma = 0, so m = a + b rho^2 + c rho^3 + O(rho^4) and a is the answer (the Richardson
#     extrapolation idea, with the power series the ODE dictates).
# Each step is an exponential integrator in the data prediction (DPM-Solver++, arXiv 2211.01095, eq. 9) in which m is
# replaced by its interpolating polynomial in tau and integrated exactly, as DEIS does for polynomials in time
# (Zhang & Chen, arXiv 2204.13902, §4); the corrector is UniC's (Zhao et al., arXiv 2302.04867, §3.1): once the model
# has been called at the predicted point, the step is redone with that value as one more node, at no extra call.


def _tau(sigma):
    """rfpc's interpolation variable (item 1 above): lambda on [-1, 0], 1 - rho above, -2 + e / rho below."""
    if sigma >= 1:
        return -2.0
    lam = _log_snr(sigma)
    if lam > 0:
        return -math.expm1(-lam)
    return lam if lam >= -1 else -2 + math.exp(lam + 1)


_GAUSS_X, _GAUSS_W = np.polynomial.legendre.leggauss(8)


def _gauss(lo, hi):
    """Gauss-Legendre points and weights on [lo, hi], 8 per piece of length <= 1."""
    pieces = max(1, math.ceil(hi - lo))
    half = (hi - lo) / pieces / 2
    points = [lo + half * (2 * k + 1) + half * _GAUSS_X for k in range(pieces)]
    return np.concatenate(points), np.tile(half * _GAUSS_W, pieces)


def _pc_weights(sigma, sigma_next, node_sigmas):
    """w_j with x_next = (sigma_next / sigma) x + sum_j w_j m_j exact when m is the polynomial in tau through the
    nodes: by DPM-Solver++'s eq. 9, w_j = sigma_next * int e^lambda l_j(tau) dlambda over the step (l_j the Lagrange
    basis). Computed by Gauss-Legendre quadrature on each piece of tau, exact to rounding: below lambda = -1 in
    y = e^lambda, where e^lambda dlambda = dy and l_j(tau) is a polynomial in y (this also covers a step from
    sigma = 1, y = 0), above it in lambda, where the integrand is smooth. 0 < sigma_next < sigma <= 1."""
    a, b = _log_snr(sigma), _log_snr(sigma_next)
    taus, weights = [], []
    if a < -1:
        y, w = _gauss(math.exp(a), math.exp(min(b, -1.0)))
        taus.append(-2 + math.e * y)
        weights.append(w)
    if a < 0 and b > -1:
        lam, w = _gauss(max(a, -1.0), min(b, 0.0))
        taus.append(lam)
        weights.append(w * np.exp(lam))
    if b > 0:
        lam, w = _gauss(max(a, 0.0), b)
        taus.append(-np.expm1(-lam))
        weights.append(w * np.exp(lam))
    tau, weight = np.concatenate(taus), np.concatenate(weights) * sigma_next
    nodes = [_tau(s) for s in node_sigmas]
    factors = [tau - tk for tk in nodes]
    out = []
    for j, tj in enumerate(nodes):
        basis, scale = weight, 1.0
        for k, tk in enumerate(nodes):
            if k != j:
                basis, scale = basis * factors[k], scale * (tj - tk)
        out.append(float(basis.sum()) / scale)
    return out


def _pc_step(x, sigma, sigma_next, nodes):
    """x at sigma_next from x at sigma (0 < sigma_next < sigma <= 1), with m interpolated through nodes (sigma, m)."""
    if len(nodes) == 1:
        return _exp_step(x, sigma, sigma_next, nodes[0][1])
    out = (sigma_next / sigma) * x
    for w, (_, m) in zip(_pc_weights(sigma, sigma_next, [s for s, _ in nodes]), nodes):
        out = out + w * m
    return out


def _data_at_zero(points):
    """x_0 = m(sigma = 0) from the last (up to) three points (sigma, m) with sigma < 1: the fit
    m = a + b rho^2 + c rho^3 (the flat end of item 3 above) returns a. rho is scaled to at most 1 first, which does
    not change a and keeps the 3x3 system well conditioned however small the last sigmas are."""
    points = ([(s, m) for s, m in points if s < 1] or points)[-3:]  # rho = inf at sigma = 1: m(1) only if alone
    if len(points) == 1:
        return points[0][1]
    rho = [s / (1 - s) for s, _ in points]
    rho = [r / max(rho) for r in rho]
    powers = [0, 2, 3][: len(points)]
    A = torch.tensor([[r**k for k in powers] for r in rho], dtype=torch.float64)
    w = torch.linalg.inv(A)[0].tolist()  # a = first row of A^-1 applied to the m's
    out = w[0] * points[0][1]
    for wj, (_, m) in zip(w[1:], points[1:]):
        out = out + wj * m
    return out


def rfpc(velocity_fn, x, sigmas, callback=None, order=2, tail=2):
    """Predictor-corrector for rectified flow (see the notes above): UniP-style predictor with `order` nodes and
    UniC-style corrector with one more, both interpolating the data prediction in tau and integrated exactly; `tail`
    extra model calls inside the last interval when the schedule ends at sigma = 0, and an extrapolated final step.
    Costs N + tail model calls for N steps (N when the schedule stops above 0). Global order = `order`: the corrector
    adds one in the interior, but it uses m at the predicted point, as UniPC does, and near sigma = 0, where no step is
    small relative to sigma, that point's error enters with an O(1) weight (measured on a Gaussian's exact flow,
    16-128 steps: 1.9-2.0 for order 2; 3.1 from sigma = 0.5 and 3.6 from sigma = 1 for order 3). Order 2 is the
    default: on the exact flows of ../shared/solver-bench it is level with order 3 up to ~25 calls and behind by up to
    2x at 50, but on the tiny random models, whose fields are far rougher, order 3's quadratic extrapolation
    overshoots at few calls (benchmarks/bench_solvers.py). Exact for straight paths; finite on any decreasing
    schedule in [0, 1], including one step from 1 to 0."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    if s[-1] == 0 and tail > 0:
        s = s[:-1] + [s[-2] * (1 - k / (tail + 1)) for k in range(1, tail + 1)] + [0.0]
    history, finals = [], []  # (sigma, m): m at the predicted states, and moved to the corrected states
    x_prev, p = x, 1
    for i in range(len(s) - 1):
        m = _data_prediction(velocity_fn, x, s[i])
        m_corrected = m
        if i > 0:
            x_corrected = _pc_step(x_prev, s[i - 1], s[i], history[-p:] + [(s[i], m)])
            # For the final extrapolation, m moved to the corrected state to first order: dm/dx = 1 - sigma dv/dx,
            # which tends to the identity as sigma -> 0 where these points lie. (The next steps keep using m at the
            # predicted state, as UniPC does: that is where the model was called.)
            m_corrected = m + (x_corrected - x)
            x = x_corrected
        history = (history + [(s[i], m)])[-order:]
        finals = (finals + [(s[i], m_corrected)])[-3:]
        if s[i + 1] == 0:
            x = _data_at_zero(finals)
        else:
            p = min(order, i + 1)
            x_prev = x
            x = _pc_step(x, s[i], s[i + 1], history[-p:])
        if callback is not None and (i + 1 < n or i + 2 == len(s)):
            callback(min(i + 1, n), n)
    return x


def rfpc1(velocity_fn, x, sigmas, callback=None, order=2):
    """rfpc with one extra call instead of two (N + 1 calls for N steps): about half of rfpc's gain on shifted
    schedules, but the better of the two at 4-6 calls on unshifted ones, where a schedule point is worth more."""
    return rfpc(velocity_fn, x, sigmas, callback, order=order, tail=1)


SOLVERS = {"euler": euler, "dpmpp_2m": dpmpp_2m, "unipc": unipc, "rfpc": rfpc, "rfpc1": rfpc1}
