"""RF-inversion (edit.py): the update rules against the paper's algorithms on an exactly known velocity field, the
limits gamma = 0 / eta = 0, reconstruction on the tiny FLUX.1 and Z-Image repos against image-to-image, and
sample.py --invert."""

import json

import numpy as np
import pytest
import torch
from fakes import rel
from PIL import Image
from test_sample import cli, one_line_error

import edit
import flux1
import flux2_klein
import sample
import solvers
import zimage

# ---------------------------------------------------------------------------------------------------------------------
# A toy model whose velocity is exact: data x0 ~ N(mu, s^2) per coordinate, x = (1 - sigma) x0 + sigma noise.


MU, S = 0.7, 0.4


def gaussian_velocity(x, sigma):
    """E[noise - x0 | x_sigma] for Gaussian data: both are linear in x (jointly Gaussian)."""
    var = (1 - sigma) ** 2 * S**2 + sigma**2
    centred = x - (1 - sigma) * MU
    return sigma / var * centred - (MU + (1 - sigma) * S**2 / var * centred)


def flux_schedule(steps):
    return solvers.time_shift(solvers.linear_sigmas(steps), solvers.flux1_mu(1024))


def paper_forward(u, y0, y1, ts, gamma):
    """Alg. 1 as printed, in the paper's time t (0 = data, 1 = noise) on the noise scheduler's grid t_0 < ... < t_N:
    unconditional field u(Y, t), conditional field (y1 - Y) / (1 - t), Y <- Y + u_hat (t_{i+1} - t_i)."""
    y, states = y0, []
    for i in range(len(ts) - 1):
        u_t = u(y, ts[i])
        u_cond = (y1 - y) / (1 - ts[i])
        y = y + (u_t + gamma * (u_cond - u_t)) * (ts[i + 1] - ts[i])
        states.append(y)
    return states


def paper_reverse(u, x, y0, ts, etas):
    """Alg. 2 as printed, in the reverse process's time t (0 = noise, 1 = data): the field -u(X, 1 - t), the
    conditional field (y0 - X) / (1 - t), X <- X + v_hat (t_{i+1} - t_i)."""
    states = []
    for i in range(len(ts) - 1):
        v_t = -u(x, 1 - ts[i])
        v_cond = (y0 - x) / (1 - ts[i])
        x = x + (v_t + etas[i] * (v_cond - v_t)) * (ts[i + 1] - ts[i])
        states.append(x)
    return states


def recorded(fn, *args):
    states = []
    fn(*args, callback=lambda i, n, x: states.append(x))
    return states


@pytest.mark.parametrize("gamma, eta, start, stop", [(0.5, 0.9, 0, 7), (0.3, 1.0, 3, 12), (1.0, 0.6, 0, 28)])
def test_update_rules_equal_the_papers_algorithms(gamma, eta, start, stop):
    g = torch.Generator().manual_seed(0)
    y0 = MU + S * torch.randn(4096, generator=g, dtype=torch.float64)
    y1 = torch.randn(4096, generator=g, dtype=torch.float64)
    sigmas = flux_schedule(28)

    ours = recorded(edit.invert, gaussian_velocity, y0, y1, sigmas, gamma)
    paper = paper_forward(gaussian_velocity, y0, y1, sigmas.flip(0).tolist(), gamma)
    assert len(ours) == len(paper) == 28
    assert max((a - b).abs().max().item() for a, b in zip(ours, paper)) < 1e-6

    etas = edit.eta_schedule(28, eta, start, stop)
    assert etas == [eta if start <= i < stop else 0.0 for i in range(28)]
    inverted = ours[-1]
    ours = recorded(edit.reverse, gaussian_velocity, inverted, y0, sigmas, etas)
    paper = paper_reverse(gaussian_velocity, inverted, y0, (1 - sigmas).tolist(), etas)
    assert len(ours) == len(paper) == 28
    assert max((a - b).abs().max().item() for a, b in zip(ours, paper)) < 1e-6


def test_exact_answers_on_gaussian_data():
    g = torch.Generator().manual_seed(1)
    y0 = MU + S * torch.randn(4096, generator=g, dtype=torch.float64)
    y1 = torch.randn(4096, generator=g, dtype=torch.float64)
    sigmas = flux_schedule(28)
    # gamma = 1 follows the straight path to y1, eta = 1 on every step the straight path back to y0: Euler is exact.
    assert (edit.invert(gaussian_velocity, y0, y1, sigmas, gamma=1.0) - y1).abs().max() < 1e-12
    x = torch.randn(4096, generator=g, dtype=torch.float64)
    assert (edit.reverse(gaussian_velocity, x, y0, sigmas, [1.0] * 28) - y0).abs().max() < 1e-12
    # gamma = 0 is the probability-flow ODE, whose exact inverse maps x0 to the noise (x0 - mu) / s; Euler converges
    # to it at first order, whatever y1 is.
    exact = (y0 - MU) / S
    errors = [rel(edit.invert(gaussian_velocity, y0, y1, flux_schedule(n), gamma=0.0), exact) for n in (100, 400)]
    assert errors[1] < 0.01 and 3 < errors[0] / errors[1] < 5
    # Any gamma > 0 ends exactly at y1 in the continuous limit: Y - y1 decays like (1 - t)^gamma, the conditional field
    # being singular at t = 1. What structure the inverted noise keeps is what the finite last steps leave, shrinking
    # like (1 / steps)^gamma.
    for gamma in (0.25, 0.5):
        to_y1 = [rel(edit.invert(gaussian_velocity, y0, y1, flux_schedule(n), gamma), y1) for n in (100, 400, 1600)]
        for coarse, fine in zip(to_y1, to_y1[1:]):
            assert coarse / fine == pytest.approx(4**gamma, rel=0.05)
    # Inversion then plain sampling (gamma = eta = 0) is a round trip.
    inverted = edit.invert(gaussian_velocity, y0, y1, flux_schedule(400), gamma=0.0)
    assert rel(edit.reverse(gaussian_velocity, inverted, y0, flux_schedule(400), [0.0] * 400), y0) < 0.01


def test_eta_window_and_bad_values():
    assert edit.eta_schedule(28, 0.9) == [0.9] * 7 + [0.0] * 21  # the default: steps [0, 7) of 28
    assert edit.eta_schedule(56, 1.0, 2, 7) == [0.0] * 4 + [1.0] * 10 + [0.0] * 42  # the same window in 56 steps
    assert edit.eta_schedule(50, 1.0, 0, 7) == [1.0] * 12 + [0.0] * 38  # int(7 / 28 * 50), as diffusers truncates
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="gamma"):
        edit.invert(gaussian_velocity, x, x, flux_schedule(4), gamma=1.5)
    with pytest.raises(ValueError, match="start <= stop"):
        edit.eta_schedule(28, 0.9, 8, 7)
    with pytest.raises(ValueError, match="decreasing"):
        edit.reverse(gaussian_velocity, x, x, torch.tensor([0.0, 0.5, 1.0]), [0.0, 0.0])


# ---------------------------------------------------------------------------------------------------------------------
# The tiny official-layout repos


def photo(width=48, height=32) -> Image.Image:
    """A smooth test picture (a random one would give the tiny autoencoder nothing but noise to encode)."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * xx) * 0.5 + 0.5, np.cos(4 * yy) * 0.5 + 0.5, xx * yy], -1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


def load_tamed(module, root):
    """The tiny pipeline, with its output projection scaled so that the velocity has the size a trained model's has
    (that of noise - x0); random weights give velocities ~50x larger, and an ODE that fast goes nowhere useful."""
    pipe = module.load(root, dtype=torch.float32)
    final = pipe.transformer.all_final_layer["2-1"].linear if module is zimage else pipe.transformer.final_layer.linear
    y0 = pipe.encode(flux1.image_to_tensor(photo(), None, None, 16))
    noise = torch.randn(y0.shape, generator=torch.Generator().manual_seed(123))
    v = pipe.velocity(0.5 * y0 + 0.5 * noise, 0.5, pipe.encode_prompt("a photo"), **pipe.sampling_kwargs())
    k = (noise - y0).pow(2).mean().sqrt() / v.pow(2).mean().sqrt()
    final.weight = torch.nn.Parameter(final.weight * k)
    if final.bias is not None:  # FLUX.2 has no biases
        final.bias = torch.nn.Parameter(final.bias * k)
    return pipe


@pytest.fixture(scope="module")
def flux1_pipe(flux1_repo):
    return load_tamed(flux1, flux1_repo[0])


@pytest.fixture(scope="module")
def zimage_pipe(zimage_repo):
    return load_tamed(zimage, zimage_repo[0])


@pytest.fixture(scope="module")
def klein_pipe(flux2_repo):
    return load_tamed(flux2_klein, flux2_repo[0])


@pytest.fixture(params=["flux1", "zimage", "klein"])
def pipe(request):
    return request.getfixturevalue(f"{request.param}_pipe")


def test_gamma_zero_is_the_plain_ode_and_eta_zero_is_plain_sampling(pipe):
    image, steps = photo(32, 32), 6
    y0, a, sigmas = edit.invert_image(pipe, image, steps, gamma=0.0, seed=1, progress=False)
    _, b, _ = edit.invert_image(pipe, image, steps, gamma=0.0, seed=2, progress=False)
    assert torch.equal(a, b)  # with gamma = 0 the target noise has no say
    # The uncontrolled forward ODE, run by the library's Euler solver on the time-reversed field.
    null, kw = pipe.null_condition(1), pipe.sampling_kwargs()
    ode = solvers.euler(lambda x, t: -pipe.velocity(x, 1 - t, null, **kw), y0, 1 - sigmas.flip(0))
    assert rel(a, ode) < 1e-5
    _, c, _ = edit.invert_image(pipe, image, steps, gamma=0.5, seed=1, progress=False)
    assert rel(c, a) > 0.1  # the controller does act

    # eta = 0: the edit is generate() started from the inverted latent.
    prompts = ["a photo", "a painting"]
    ours = edit.edit_inverted(pipe, prompts, y0, c, sigmas, eta=0.0, output="latent", progress=False)
    plain = pipe.generate(prompts, noise=c.expand(2, -1, -1, -1), steps=steps, output="latent", progress=False)
    assert rel(ours, plain) < 1e-6
    pulled = edit.edit_inverted(pipe, prompts, y0, c, sigmas, eta=0.9, stop=28, output="latent", progress=False)
    assert rel(pulled, plain) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux1", "zimage"])
def test_reconstruction_is_closer_than_img2img(family, request):
    """Invert, then regenerate with the source prompt and eta = 1 on the paper's window (steps [0, 7) of 28), against
    image-to-image at the same strength (0.75: it starts at step 7 from the input noised with the same seed's noise).
    Both pass through (1 - sigma_7) y0 + sigma_7 noise at step 7; for RF-inversion that noise is the inverted one."""
    pipe = request.getfixturevalue(f"{family}_pipe")
    image, prompt = photo(32, 32), "a photo"
    y0 = pipe.encode(flux1.image_to_tensor(image, None, None, 16))
    i2i = pipe.generate(prompt, init_image=image, strength=0.75, steps=28, seed=0, output="latent", progress=False)
    img2img = rel(i2i, y0)
    distance = {}
    for gamma in (0.0, 0.5, 1.0):
        out = edit.edit(pipe, image, prompt, gamma=gamma, eta=1.0, seed=0, output="latent", progress=False)
        distance[gamma] = rel(out, y0)
    print(f"{type(pipe).__name__}: distance to the input {distance}, image-to-image {img2img:.3f}")
    assert distance[0.0] < 0.3 * img2img  # the plain inversion: far closer
    assert distance[0.5] < img2img  # the default gamma trades most of that for editability
    assert abs(distance[1.0] - img2img) < 1e-3 * img2img  # gamma = 1 inverts to the seed's noise itself


# ---------------------------------------------------------------------------------------------------------------------
# sample.py --invert


def test_cli_invert_writes_the_edit_with_its_settings(flux1_repo, zimage_repo, tmp_path):
    repo = flux1_repo[0]
    photo_path = tmp_path / "photo.png"
    photo(40, 36).save(photo_path)
    common = ["--weights", str(repo), "--steps", "4", "--seed", "3", "--device", "cpu", "--quiet"]
    argv = ["flux1", "a tiger", "--invert", str(photo_path), "--gamma", "0.3", "--eta", "1", "--stop", "14"]
    assert sample.main([*argv, *common, "--out", str(tmp_path / "a")]) == 0
    image = Image.open(next((tmp_path / "a").glob("*.png")))
    assert image.size == (32, 32)  # the photo's size, cropped to a multiple of 16
    settings = json.loads(image.text["parameters"])
    assert settings["invert"] == str(photo_path) and settings["prompt"] == "a tiger" and settings["steps"] == 4
    assert (settings["gamma"], settings["eta"], settings["start"], settings["stop"]) == (0.3, 1.0, 0, 14.0)
    assert settings["solver"] == "euler" and settings["guidance"] == 3.5

    # --gamma 0 --eta 0: plain inversion, then plain regeneration from the inverted noise.
    argv = ["flux1", "a tiger", "--invert", str(photo_path), "--gamma", "0", "--eta", "0"]
    assert sample.main([*argv, *common, "--out", str(tmp_path / "b")]) == 0
    pipe = flux1.load(repo, dtype=torch.float32)
    _, inverted, _ = edit.invert_image(pipe, str(photo_path), 4, gamma=0.0, seed=3, progress=False)
    (plain,) = pipe.generate("a tiger", noise=inverted, steps=4, progress=False)
    written = np.asarray(Image.open(next((tmp_path / "b").glob("*.png"))))
    assert np.abs(written.astype(int) - np.asarray(plain).astype(int)).max() <= 1

    # Z-Image too; unset controller settings take the defaults (gamma 0.5, eta 0.9 on steps [0, 7) of 28).
    argv = ["zimage", "a fox", "--invert", str(photo_path), *common[2:], "--weights", str(zimage_repo[0])]
    assert sample.main([*argv, "--out", str(tmp_path / "c")]) == 0
    settings = json.loads(Image.open(next((tmp_path / "c").glob("*.png"))).text["parameters"])
    assert (settings["gamma"], settings["eta"], settings["start"], settings["stop"]) == (0.5, 0.9, 0, 7)


def test_cli_invert_bad_input_gets_one_line(flux1_repo, tmp_path, capsys):
    photo_path = tmp_path / "photo.png"
    photo(32, 32).save(photo_path)
    out = tmp_path / "out"
    common = ["--weights", str(flux1_repo[0]), "--steps", "2", "--device", "cpu", "--quiet", "--out", str(out)]
    # As a user runs it: a separate process, one line on stderr and no traceback.
    one_line_error(cli("flux1", "a cat", "--invert", __file__, *common), "cannot read --invert")
    for args, needle in [
        (["--invert", photo_path, "--gamma", "half"], "--gamma 'half': expected a finite number"),
        (["--invert", photo_path, "--stop", "7th"], "--stop '7th': expected a finite number"),
        (["--eta", "0.5"], "set up --invert"),
        (["--invert", photo_path, "--solver", "unipc"], "Euler"),
        (["--invert", photo_path, "--gamma", "2"], "gamma must be between 0 and 1, got 2.0"),
        (["--invert", photo_path, "--start", "8"], "start <= stop"),
        (["--invert", photo_path, "--image", photo_path], "--invert does not take --image"),
    ]:
        assert sample.main(["flux1", "a cat", *map(str, args), *common]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not out.exists() or not list(out.glob("*.png"))
