"""Shared fixtures: one thread per test worker, the tiny configs every test trains, one trained run per session,
running the CLI (in-process, as a subprocess, under torchrun), exact-denoiser problems and k-diffusion.

Tests mirror the packages (tests/sampling/, tests/training/, ...); `make test` leaves out the learning-quality
tests marked ``slow``, `make test-all` runs them too.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from elucidate import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest -n 2) on the 2-core machine: one thread each, for torch here and
    # for the processes the tests start (CLI runs, torchrun ranks), so the workers do not oversubscribe.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


#: The longest tests, started first, so that with two workers the long runs overlap the many short tests instead of
#: starting last or queueing on one worker. pytest-xdist hands each worker two tests at the start (then one at a
#: time): the slow ones pair up as (demo, rotations) and (lucidrains snippet, guided digits), about 330 s each.
LONGEST = ("test_demo_digits_are_recognizable", "test_rotations_do_not_leak", "test_lucidrains_snippet_runs_verbatim",
           "test_guided_digits_are_their_class",
           "test_kills_at_random_moments_then_resume_is_bit_identical",
           "test_two_processes_train_the_same_weights_as_one", "test_two_processes_sample_and_evaluate_as_one",
           "test_two_nodes_train_resume_sample_and_evaluate_as_one_process")


def pytest_collection_modifyitems(config, items):
    """The :data:`LONGEST` first, then the other slow tests, then the rest (stable otherwise)."""
    def rank(item):
        if item.originalname in LONGEST:
            return LONGEST.index(item.originalname)
        return len(LONGEST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (restored after): like a torchrun rank or a subprocess with
    OMP_NUM_THREADS=1, and fast for tiny networks. A module uses it with ``pytestmark = pytest.mark.usefixtures(
    "one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ tiny configs
def merge(base: dict, **sections) -> dict:
    """``base`` (a raw config) with each keyword's section updated by its mapping (``None`` removes it)."""
    out = copy.deepcopy(base)
    for name, values in sections.items():
        if values is None:
            out.pop(name, None)
        elif isinstance(values, dict) and isinstance(out.get(name), dict):
            out[name] = {**out[name], **copy.deepcopy(values)}
        else:
            out[name] = copy.deepcopy(values)
    return out


#: A tiny diffusion run: 64 real digits, a one-level 8-channel U-Net, a few steps (about a second).
TINY = {"data": {"dataset": "digits", "max_size": 64},
        "network": {"arch": "unet", "model_channels": 8, "channel_mult": [1], "num_blocks": 1, "attn_resolutions": []},
        "diffusion": {"type": "EDM"},
        "training": {"steps": 4, "batch_size": 8, "lr": 1e-3, "lr_rampup": 16, "ema_halflife": 100,
                     "checkpoint_every": 2, "sample_every": 0, "log_every": 2, "seed": 1, "num_sample_images": 4,
                     "keep_checkpoints": 0},
        "sampling": {"steps": 2}}
#: A tiny autoencoder run: 8x8 digits, a 2-level autoencoder (4x4x4 latents), every loss term on from step 3.
TINY_VAE = {"data": {"dataset": "digits", "max_size": 120},
            "model": {"ch": 8, "ch_mult": [1, 2], "num_res_blocks": 1},
            "loss": {"perceptual": "digits", "perceptual_weight": 0.1, "disc_start": 3, "disc_layers": 1,
                     "disc_channels": 8},
            "training": {"steps": 8, "batch_size": 8, "lr": 1e-3, "log_every": 2, "checkpoint_every": 4,
                         "sample_every": 0, "eval_every": 0, "holdout": 20, "keep_checkpoints": 0,
                         "num_sample_images": 8, "seed": 5}}


def _tiny_config(**sections) -> dict:
    return merge(TINY, **sections)


def _tiny_vae_config(**sections) -> dict:
    return merge(TINY_VAE, **sections)


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**sections)``: the raw config of a tiny diffusion run (:data:`TINY`), each keyword updating
    that section, e.g. ``tiny_config(training={"steps": 6}, network={"model_channels": 16})``."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_vae_config():
    """``tiny_vae_config(**sections)``: the raw config of a tiny autoencoder run (:data:`TINY_VAE`)."""
    return _tiny_vae_config


@pytest.fixture(scope="session")
def write_config():
    """``write_config(raw, path)``: the raw config as YAML at ``path``; returns the path."""
    def write(raw: dict, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw))
        return path
    return write


# ------------------------------------------------------------------------------------------------ one trained run
#: The run every test that only needs "a trained run" shares: 200 digits, a 2-level 16-channel U-Net, 6 steps with
#: checkpoints and sample grids at 3 and 6, power EMA snapshots every 3 steps.
TRAINED = merge(TINY, data={"max_size": 200}, network={"model_channels": 16, "channel_mult": [1, 2]},
                training={"steps": 6, "batch_size": 16, "lr_rampup": 64, "ema_halflife": 200, "checkpoint_every": 3,
                          "sample_every": 3, "log_every": 1, "seed": 5,
                          "ema": {"type": "power", "stds": [0.05, 0.10], "snapshot_every": 3}},
                sampling={"steps": 4})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """:data:`TRAINED`, trained once per test session (per xdist worker) with ``elucidate train``. Read-only:
    a test that writes into a run (tune, eval, ema) uses ``trained_copy``."""
    from elucidate.cli import main

    root = tmp_path_factory.mktemp("trained")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TRAINED))
    assert main(["train", str(cfg), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.fixture
def trained_copy(trained_run, tmp_path) -> Path:
    """A copy of the session's trained run that the test may write into."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


#: The network of :func:`train_diffusers_run`: a tiny diffusers ``UNet2DModel`` (``network.arch: diffusers_unet2d``).
DIFFUSERS_NET = {"arch": "diffusers_unet2d", "block_out_channels": [8, 16], "layers_per_block": 1,
                 "norm_num_groups": 4, "attention_head_dim": 4}
#: Its default diffusion: a 100-step v-prediction DDPM (exportable to diffusers).
DDPM_V = {"type": "DDPM", "num_timesteps": 100, "prediction": "v", "timestep_spacing": "trailing"}


@pytest.fixture(scope="session")
def train_diffusers_run(tiny_config, write_config, tmp_path_factory):
    """``train_diffusers_run(name, network=DIFFUSERS_NET, diffusion=DDPM_V, **sections)``: ``elucidate train`` (3
    steps) of the tiny run config with that network and diffusion section (each replacing the tiny one;
    ``network=None`` keeps the tiny U-Net) and the other sections updated; returns a new run directory named
    ``name`` (the export tests of tests/interop)."""
    from elucidate.cli import main

    def run(name: str, network: dict | None = DIFFUSERS_NET, diffusion: dict = DDPM_V, **sections) -> Path:
        defaults = {"training": {"steps": 3, "checkpoint_every": 3, "log_every": 1, "ema_halflife": 8},
                    "sampling": {"steps": 3, "sampler": "ddim"}}
        raw = tiny_config(**{**defaults, **{k: {**defaults.get(k, {}), **v} if isinstance(v, dict) else v
                                            for k, v in sections.items()}})
        raw["network"], raw["diffusion"] = network or raw["network"], diffusion
        root = tmp_path_factory.mktemp(name)
        config = write_config(raw, root / f"{name}.yaml")
        assert main(["train", str(config), "--out", str(root / name), "--no-progress"]) == 0
        return root / name
    return run


# ------------------------------------------------------------------------------------------------ running the CLI
def subprocess_env(**extra) -> dict:
    """The environment of a subprocess the tests start: one thread, unbuffered, this source tree first, no
    inherited torchrun variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])), **extra)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def env() -> dict:
    """:func:`subprocess_env`."""
    return subprocess_env()


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args, cwd=ROOT)``: ``python -m elucidate ARGS`` as a subprocess (its CompletedProcess)."""
    def run(*args, cwd=ROOT, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "elucidate", *map(str, args)], capture_output=True, text=True,
                              env=subprocess_env(), cwd=cwd, **kwargs)
    return run


@pytest.fixture
def cli_main(capsys):
    """``cli_main(argv)``: ``elucidate ARGV`` in this process; (exit code, the lines it wrote to stderr)."""
    from elucidate.cli import main

    def run(argv) -> tuple[int, list[str]]:
        capsys.readouterr()
        code = main([str(a) for a in argv])
        return code, capsys.readouterr().err.strip().splitlines()
    return run


@pytest.fixture(scope="session")
def torchrun():
    """``torchrun(*args, nproc=2)``: ``torchrun --standalone --nproc_per_node=N ARGS`` (gloo on CPU) as a
    subprocess; ``args`` start with ``-m module`` or a script path."""
    def run(*args, nproc: int = 2, cwd=ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=cwd,
                              timeout=timeout)
    return run


# ------------------------------------------------------------------------------------------------ references
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
