"""Shared fixtures: small exact-denoiser problems and the k-diffusion reference samplers."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch

from elucidate import GaussianMixture

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest -n 2) on the 2-core machine: one thread each, for torch here and
    # for the processes the tests start (CLI runs, torchrun ranks), so the workers do not oversubscribe.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


#: The longest end-to-end tests (seconds at one thread: 570, 120, 330, 245), in the order they start. `make test`
#: runs two workers that are handed two tests each, then one at a time (``-n 2 --maxschedchunk 1``): the
#: first worker starts with the demo run and the rotations, the second with the seed snippet and guided digits.
LONGEST = ("test_demo_digits_are_recognizable", "test_rotations_do_not_leak", "test_seed_snippet_runs_verbatim",
           "test_guided_digits_are_their_class")


def pytest_collection_modifyitems(config, items):
    """The longest tests first, then the other slow ones, then the rest (stable otherwise): with two workers
    the end-to-end runs overlap the many short tests instead of starting last or queueing on one worker."""
    def rank(item):
        if item.originalname in LONGEST:
            return LONGEST.index(item.originalname)
        return len(LONGEST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored after): like a torchrun rank or a subprocess with
    OMP_NUM_THREADS=1, and fast for tiny networks. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kdiff():
    """k-diffusion 0.1.1's ``sampling`` module, loaded without the package ``__init__``
    (which imports torchvision). Its only use of ``k_diffusion.utils`` is ``append_dims``."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        pytest.fail("k-diffusion is a test dependency: "
                    "pip install --no-deps k-diffusion torchsde torchdiffeq trampoline")
    root = spec.submodule_search_locations[0]
    package = types.ModuleType("_kdiff_ref")
    package.__path__ = [root]
    utils = types.ModuleType("_kdiff_ref.utils")
    utils.append_dims = lambda x, n: x[(...,) + (None,) * (n - x.ndim)]
    sys.modules.setdefault("_kdiff_ref", package)
    sys.modules.setdefault("_kdiff_ref.utils", utils)
    package.utils = utils
    sampling_spec = importlib.util.spec_from_file_location("_kdiff_ref.sampling", f"{root}/sampling.py")
    module = importlib.util.module_from_spec(sampling_spec)
    sys.modules["_kdiff_ref.sampling"] = module
    sampling_spec.loader.exec_module(module)
    return module


def _gmm() -> GaussianMixture:
    means = torch.tensor([[1.0, -0.5, 0.3, 0.0], [-1.0, 0.8, -0.2, 0.5], [0.2, 0.1, 1.2, -1.0]])
    stds = torch.tensor([0.2, 0.35, 0.15])
    return GaussianMixture(means, stds, [0.5, 0.3, 0.2])


@pytest.fixture
def gmm() -> GaussianMixture:
    """A 4-D, 3-component mixture with unequal weights and spreads (float64)."""
    return _gmm()


@pytest.fixture(scope="module")
def gmm_module() -> GaussianMixture:
    """The same mixture, shared by a module's tests (for expensive derived fixtures)."""
    return _gmm()
