"""Real-image editing by RF-inversion (Rout et al., "Semantic Image Inversion and Editing using Rectified Stochastic
Differential Equations", arXiv 2410.10792), for every image family of this project.

Two controlled ODEs, integrated with Euler steps on the family's own sampling schedule and in the shared convention
(sigma = 1 is noise, sigma = 0 is data, the model's velocity is v = noise - x0 = dx/dsigma):

    inversion, the controlled forward ODE (Alg. 1, Eq. 8): from the clean latent y0 at sigma = 0 up to sigma = 1,
        the model's velocity under the null condition, pulled towards a fixed noise y1 by the velocity of the straight
        path to it:   u_hat = u + gamma (u_c - u),   u = v(Y, sigma, null),   u_c = (y1 - Y) / (1 - sigma)
    editing, the controlled reverse ODE (Alg. 2): from the inverted latent down to sigma = 0 under the target prompt,
        pulled back towards y0 while the controller is on:
                      v_hat = v + eta_i (v_c - v),   v = v(X, sigma, prompt),   v_c = (X - y0) / sigma

The paper writes the reverse pass in its own time t = 1 - sigma, with the velocity -v and the target (y0 - X) / (1 - t);
the sign flips cancel, which tests/test_edit.py checks step by step. gamma = 0 is the plain ODE inversion, eta = 0
plain sampling from the inverted latent; gamma = 1 lands exactly on y1 and eta = 1 on every step exactly on y0. For
any gamma > 0 the exact (continuous) controlled ODE ends at y1 too, since Y - y1 decays like sigma's distance to 1 to
the power gamma; what the inverted latent keeps of the image is what the schedule's finite last steps leave.

Defaults are the authors' FLUX.1 settings (the example in their README, github.com/LituRout/RF-Inversion): 28 steps,
gamma 0.5, eta 0.9 on steps [0, 7) of 28. The paper tabulates its start/stop times in steps of a 28-step schedule;
`start` and `stop` here are in those units and scale with `steps`. diffusers' community pipeline
(examples/community/pipeline_flux_rf_inversion.py) has 28 steps and gamma 0.5 as defaults, eta 1.0 as its argument
default (0.9 in its example), start 0 and stop 0.25 as fractions of the schedule (= 7 of 28), and inverts at distilled
guidance 0 with the empty prompt, telling the model the unshifted time i / (steps + 1) while stepping along the shifted
schedule; here the inversion uses the family's null condition (`pipe.null_condition`) and the same velocity arguments
as the edit, as the reference implementation (gau-nernst/rectified-flow) does, and both passes give the model the
sigma of the schedule point they step from.

The reference implementation (rf_inversion_flux.py) no longer runs: it calls its FLUX.1 model with a stale argument
order, and hard-codes 16 latent channels, 8x downsampling, "cuda" and bf16 noise; its `start_t` also cuts the start
off the whole schedule rather than starting the controller late. Here nothing knows a model: the velocity, the
schedule (`pipe.sigmas`), the null condition and the sampling arguments (`pipe.sampling_kwargs`) come from the
pipeline, the noise is drawn in float32 from a seeded CPU generator like every other sampler in the project, and the
controller is on for the steps [start, stop) of the full schedule, as in the paper.
"""

import importlib

import torch
from torch import Tensor
from tqdm.auto import tqdm

from flux1 import as_list, draw_noise, image_to_tensor, to_pil

STEPS = 28  # the paper's FLUX.1 setting; START and STOP count steps of a 28-step schedule (the paper's units)
GAMMA = 0.5  # controller guidance of the inversion
ETA = 0.9  # controller guidance of the edit
START, STOP = 0, 7  # the edit is pulled towards the input on steps [START, STOP) of 28


def _sigma_list(sigmas) -> list[float]:
    s = torch.as_tensor(sigmas, dtype=torch.float64).tolist()
    if len(s) < 2 or not all(a > b for a, b in zip(s, s[1:])) or s[0] > 1 or s[-1] < 0:
        raise ValueError("sigmas must be a decreasing schedule within [0, 1]")
    return s


def check_settings(gamma: float = GAMMA, eta: float = ETA, start: float = START, stop: float = STOP):
    """A clear error for controller settings outside the paper's ranges."""
    for name, value in (("gamma", gamma), ("eta", eta)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got start {start}, stop {stop}")


def eta_schedule(steps: int, eta: float, start: float = START, stop: float = STOP) -> list[float]:
    """The edit's controller strength at each of `steps` steps: eta on the steps [start, stop) counted in steps of a
    28-step schedule (the paper's units), rescaled to `steps` and truncated to whole steps as diffusers' community
    pipeline does; 0 elsewhere."""
    check_settings(eta=eta, start=start, stop=stop)
    first, last = int(start * steps / STEPS), min(int(stop * steps / STEPS), steps)
    return [float(eta) if first <= i < last else 0.0 for i in range(steps)]


def invert(velocity_fn, y0: Tensor, y1: Tensor, sigmas, gamma: float = GAMMA, callback=None) -> Tensor:
    """Controlled forward ODE (Alg. 1): integrate from the clean latent y0 (sigma 0) to sigma 1 along the schedule
    `sigmas` (a sampling schedule, decreasing; walked backwards), blending the model's velocity with the straight path
    to the noise y1. Returns the structured noise. `velocity_fn(x, sigma)` speaks the sigma convention."""
    check_settings(gamma=gamma)
    s = _sigma_list(sigmas)[::-1]
    n = len(s) - 1
    y = y0.to(torch.promote_types(y0.dtype, torch.float32))  # float32 at least, as in sampling
    y1 = y1.to(y)
    for i in range(n):
        u = velocity_fn(y, s[i]).to(y.dtype)
        u_c = (y1 - y) / (1 - s[i])  # s[i] < 1 on every step: the last one starts below the top of the schedule
        y = y + (s[i + 1] - s[i]) * torch.lerp(u, u_c, gamma)
        if callback is not None:
            callback(i + 1, n, y)
    return y


def reverse(velocity_fn, x: Tensor, y0: Tensor, sigmas, etas, callback=None) -> Tensor:
    """Controlled reverse ODE (Alg. 2): integrate from x (at sigmas[0]) down the schedule, blending the model's
    velocity with the straight path back to y0 by etas[i] on step i. With every eta 0 this is solvers.euler."""
    s = _sigma_list(sigmas)
    n = len(s) - 1
    if len(etas) != n:
        raise ValueError(f"need {n} eta values, one per step, got {len(etas)}")
    for eta in etas:
        check_settings(eta=eta)
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    y0 = y0.to(x)
    for i in range(n):
        v = velocity_fn(x, s[i]).to(x.dtype)
        if etas[i]:
            v = torch.lerp(v, (x - y0) / s[i], etas[i])  # s[i] > 0 on every step: only the last one ends at 0
        x = x + (s[i + 1] - s[i]) * v
        if callback is not None:
            callback(i + 1, n, x)
    return x


def _family(pipe):
    """The model file a pipeline comes from (its PIXELS_PER_TOKEN)."""
    return importlib.import_module(type(pipe).__module__)


@torch.no_grad()
def invert_image(
    pipe,
    image,
    steps: int = STEPS,
    gamma: float = GAMMA,
    guidance=None,
    seed: int = 0,
    noise: Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Encode `image` (path, PIL image, or (1, 3, H, W) pixels in [-1, 1]; resized to cover height x width and
    center-cropped, or kept at its size cropped to the model's multiple) and invert it. Returns (y0, inverted latent,
    the schedule); the inversion runs under the family's null condition, so it does not depend on any prompt."""
    if isinstance(image, Tensor):
        init = image
    else:
        init = image_to_tensor(image, height, width, _family(pipe).PIXELS_PER_TOKEN)
    device = pipe.device
    y0 = pipe.encode(init.to(device)).float().to(device)
    y1 = draw_noise(tuple(y0.shape[1:]), [seed], device) if noise is None else noise.to(device, torch.float32)
    sigmas = pipe.sigmas(steps, init.shape[-2], init.shape[-1])
    kw, null = pipe.sampling_kwargs(guidance), pipe.null_condition(1)
    with tqdm(total=steps, disable=not progress, desc="invert") as bar:
        inverted = invert(lambda x, s: pipe.velocity(x, s, null, **kw), y0, y1, sigmas, gamma, lambda *_: bar.update())
    return y0, inverted, sigmas


@torch.no_grad()
def edit_inverted(
    pipe,
    prompts,
    y0: Tensor,
    inverted: Tensor,
    sigmas: Tensor,
    eta: float = ETA,
    start: float = START,
    stop: float = STOP,
    guidance=None,
    output: str = "pil",
    progress: bool = True,
):
    """Run the controlled reverse ODE from an inverted latent towards each prompt; output "pil", "pt" or "latent"."""
    prompts = as_list(prompts)
    cond, kw = pipe.encode_prompt(prompts), pipe.sampling_kwargs(guidance)
    etas = eta_schedule(len(sigmas) - 1, eta, start, stop)
    x = inverted.expand(len(prompts), *inverted.shape[1:])
    with tqdm(total=len(etas), disable=not progress, desc="edit") as bar:
        x = reverse(lambda x, s: pipe.velocity(x, s, cond, **kw), x, y0, sigmas, etas, lambda *_: bar.update())
    if output == "latent":
        return x
    pixels = pipe.decode(x)
    return pixels if output == "pt" else to_pil(pixels)


def edit(
    pipe,
    image,
    prompts,
    steps: int = STEPS,
    gamma: float = GAMMA,
    eta: float = ETA,
    start: float = START,
    stop: float = STOP,
    guidance=None,
    seed: int = 0,
    noise: Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    output: str = "pil",
    progress: bool = True,
):
    """Edit a real image towards `prompts`: invert it (gamma), then regenerate it under each prompt, pulled towards
    the input on the steps [start, stop) of 28 (eta). guidance: FLUX.1's distilled guidance (the variant's default
    unless given). gamma = eta = 0 is plain inversion followed by plain regeneration."""
    check_settings(gamma, eta, start, stop)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    y0, inverted, sigmas = invert_image(pipe, image, steps, gamma, guidance, seed, noise, height, width, progress)
    return edit_inverted(pipe, prompts, y0, inverted, sigmas, eta, start, stop, guidance, output, progress)
