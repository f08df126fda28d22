"""Tiny official-layout repos shared by every test file (written once per session; tests only read them)."""

import pytest
import torch
from fakes import write_flux1_repo, write_wan22_repo, write_zimage_repo


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): a second thread buys nothing
    on small matmuls, and when the VM's other core is busy OpenMP's spin-waits for it cost seconds (once made the INT8
    LoRA training test ~100x slower, 0.3 s -> 30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flux1_repo(tmp_path_factory):
    """(folder, reference diffusers/transformers modules) of a tiny FLUX.1-dev repo."""
    root = tmp_path_factory.mktemp("flux1-dev")
    return root, write_flux1_repo(root)


@pytest.fixture(scope="session")
def zimage_repo(tmp_path_factory):
    """(folder, reference modules) of a tiny Z-Image repo."""
    root = tmp_path_factory.mktemp("z-image")
    return root, write_zimage_repo(root)


@pytest.fixture(scope="session")
def wan22_repo(tmp_path_factory):
    """(folder, reference modules) of a tiny Wan2.2 TI2V-5B repo in the official layout."""
    root = tmp_path_factory.mktemp("wan22-ti2v-5b")
    return root, write_wan22_repo(root)


@pytest.fixture(scope="session")
def wan22_diffusers_repo(tmp_path_factory):
    """(folder, reference modules) of the same tiny Wan2.2 TI2V-5B repo in the -Diffusers layout."""
    root = tmp_path_factory.mktemp("wan22-ti2v-5b-diffusers")
    return root, write_wan22_repo(root, layout="diffusers")


@pytest.fixture(scope="session")
def flux2_repo(tmp_path_factory):
    """(folder, reference modules) of a tiny FLUX.2-klein-4B repo (distilled; BFL transformer, diffusers vae/)."""
    from fakes import write_flux2_repo

    root = tmp_path_factory.mktemp("flux2-klein-4b")
    return root, write_flux2_repo(root)


@pytest.fixture(scope="session")
def wan22_t2v_a14b_repo(tmp_path_factory):
    """(folder, reference modules) of a tiny Wan2.2 T2V-A14B repo (two experts, Wan2.1 VAE) in the official layout."""
    from fakes import write_wan22_a14b_repo

    root = tmp_path_factory.mktemp("wan22-t2v-a14b")
    return root, write_wan22_a14b_repo(root, "t2v")


@pytest.fixture(scope="session")
def wan22_i2v_a14b_repo(tmp_path_factory):
    """(folder, reference modules) of a tiny Wan2.2 I2V-A14B repo (36-channel experts) in the official layout."""
    from fakes import write_wan22_a14b_repo

    root = tmp_path_factory.mktemp("wan22-i2v-a14b")
    return root, write_wan22_a14b_repo(root, "i2v", seed=20)
