"""Classifier-free guidance: the guided denoiser (one batched forward), condition dropout in training,
and the seed config block training under every formulation type."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from elucidate import Denoiser, GaussianMixture, build_network, sample
from elucidate.config import Config, ConfigWarning, DataInfo, parse_config
from elucidate.config.sampling import SamplingConfig
from elucidate.denoiser import Guided, with_null_condition
from elucidate.formulations import EDM, FORMULATIONS
from elucidate.run import LoadedRun
from elucidate.training import Trainer

f64 = torch.float64


def _labelled_net(label_dim=3):
    torch.manual_seed(0)
    net = build_network("unet", img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2),
                        num_blocks=1, label_dim=label_dim)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def test_guided_denoiser_is_one_batched_forward_of_the_cfg_formula():
    D = Denoiser(_labelled_net(), EDM())
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 1.0, 5.0, 20.0])
    labels = torch.tensor([0, 2, 1, 2])
    one_hot = torch.nn.functional.one_hot(labels, 3).float()
    with torch.no_grad():
        cond, uncond = D(x, sigma, class_labels=one_hot), D(x, sigma, class_labels=torch.zeros(4, 3))
        for w in (0.0, 1.0, 2.5):
            guided = Guided(D, w)(x, sigma, class_labels=labels)
            assert torch.allclose(guided, uncond + w * (cond - uncond), atol=1e-5)
        assert torch.equal(Guided(D, 1.0)(x, sigma, class_labels=labels), D(x, sigma, class_labels=labels))
    calls = []
    D.net.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        Guided(D, 3.0)(x, sigma, class_labels=labels)
    assert calls == [8]  # conditional and unconditional halves in one forward
    value, null = with_null_condition(D.net, "class_labels", labels)
    assert torch.equal(value, one_hot) and torch.equal(null, torch.zeros(4, 3))
    with pytest.raises(ValueError):
        Guided(D, -1.0)


def test_guidance_on_an_exact_class_conditional_mixture_concentrates_on_the_class():
    # D(x; sigma, c) is the exact denoiser of component c; the null condition gives the whole mixture.
    means = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]], dtype=f64)
    gmm = GaussianMixture(means, torch.tensor([0.3, 0.3, 0.3], dtype=f64), [1 / 3] * 3)
    parts = [GaussianMixture(means[k:k + 1], torch.tensor([0.3], dtype=f64), [1.0]) for k in range(3)]

    class Exact(torch.nn.Module):
        label_dim = 3

        def forward(self, x, sigma, class_labels=None):
            out = gmm.denoise(x, sigma)
            if class_labels is None:
                return out
            if not class_labels.is_floating_point():
                class_labels = torch.nn.functional.one_hot(class_labels, 3)
            for k in range(3):
                rows = class_labels[:, k] > 0
                out[rows] = parts[k].denoise(x[rows], sigma[rows])
            return out

    D = Exact()
    D.net = D  # with_null_condition finds label_dim on D.net
    n = 600
    labels = torch.full((n,), 1)
    for w in (1.0, 3.0):
        y = sample(Guided(D, w), (n, 2), sampler="heun", steps=24, dtype=f64, seeds=range(n),
                   cond={"class_labels": labels})
        assert (gmm.classify(y) == 1).float().mean() > 0.99
    spread = [sample(Guided(D, w), (n, 2), sampler="heun", steps=24, dtype=f64, seeds=range(n),
                     cond={"class_labels": labels}).std(0).mean() for w in (1.0, 3.0)]
    assert spread[1] < spread[0]  # guidance w > 1 sharpens the class (lower variance than the true 0.3)


@pytest.fixture(scope="module")
def conditional(tiny_config):
    """``conditional(**training)``: a tiny class-conditional run (label_dim auto: the 10 digit classes)."""
    def make(**training) -> dict:
        return tiny_config(network={"label_dim": "auto"}, training={"steps": 2, **training})
    return make


def test_condition_dropout_is_seeded_and_drops_the_asked_fraction(conditional, tmp_path):
    trainer = Trainer(parse_config(conditional(cond_drop_prob=0.3, batch_size=512)), tmp_path / "run",
                      progress=False, log=lambda *a: None)
    _, cond, _, _ = trainer._batch(5)
    labels = cond["class_labels"]
    assert labels.shape == (512, 10) and labels.is_floating_point()
    dropped = (labels.sum(1) == 0).float().mean()
    assert 0.24 < dropped < 0.36
    assert torch.equal(trainer._batch(5)[1]["class_labels"], labels)  # a pure function of (seed, step)
    assert not torch.equal(trainer._batch(6)[1]["class_labels"][:, :], labels)
    plain = Trainer(parse_config(conditional(batch_size=512)), tmp_path / "plain", progress=False,
                    log=lambda *a: None)
    assert plain._batch(5)[1]["class_labels"].dtype == torch.int64  # no dropout: labels as they are


def test_a_run_samples_with_its_configs_guidance():
    D = Denoiser(_labelled_net(), EDM())
    labels = torch.tensor([0, 1])
    cfg = SamplingConfig(steps=4, guidance=2.0)
    run = LoadedRun(D, Config(sampling=cfg), DataInfo(1, (8, 8), 10), None, 0, Path("run"))
    guided = run.sample([3, 4], class_labels=labels)
    by_hand = sample(Guided(D, 2.0), (2, 1, 8, 8), sampler="heun", steps=4, seeds=[3, 4],
                     sigmas=D.formulation.sampling_sigmas(4), cond={"class_labels": labels})
    assert torch.allclose(guided, by_hand)


SEED_BLOCK = {"diffusion": {"sigma_data": 1.0, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "p_mean": -1.2,
                            "p_std": 1.2},
              "sampling": {"steps": 4, "sampler": "heun", "s_churn": 40.0, "s_min": 0.05, "s_max": 50.0,
                           "s_noise": 1.003}}


@pytest.mark.parametrize("kind", list(FORMULATIONS))
def test_the_seed_config_block_trains_under_every_type(tiny_config, kind, tmp_path):
    raw = tiny_config(training={"steps": 2}, diffusion={"type": kind, **SEED_BLOCK["diffusion"]},
                      sampling=SEED_BLOCK["sampling"])
    assert raw["sampling"] == SEED_BLOCK["sampling"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = parse_config(raw)
    unused = [w for w in caught if issubclass(w.category, ConfigWarning)]
    if issubclass(FORMULATIONS[kind], EDM):  # EDM and Consistency (EDM with a boundary) take every key
        assert not unused
    else:  # sigma_data, p_mean, p_std are EDM's; named in one warning and ignored
        assert len(unused) == 1 and "sigma_data" in str(unused[0].message) and kind in str(unused[0].message)
    if "sigma_min" not in config.diffusion:  # not its own parameters: they drive the sampling schedule
        assert (config.sampling.sigma_min, config.sampling.sigma_max, config.sampling.rho) == (0.002, 80.0, 7.0)
    summary = Trainer(config, tmp_path / kind, progress=False, log=lambda *a: None).train()
    assert summary["step"] == 2 and summary["samples"] is not None


def test_cli_samples_a_class_with_guidance(conditional, write_config, tmp_path):
    from elucidate.cli import main

    cfg = write_config(conditional(cond_drop_prob=0.2), tmp_path / "cond.yaml")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = tmp_path / "threes.npz"
    assert main(["sample", str(tmp_path / "run"), "--class", "3", "--guidance", "2.0", "--seeds", "0-3",
                 "--steps", "3", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", str(tmp_path / "run"), "--guidance", "-1", "--out", str(tmp_path / "x.png")]) == 2
    assert main(["sample", str(tmp_path / "run"), "--class", "12", "--out", str(tmp_path / "x.png")]) == 2


@pytest.mark.slow
def test_guided_digits_are_their_class(tmp_path):
    # configs/digits-cond.yaml, shortened to 1000 of its 3000 steps for the test suite; the full run gives
    # 97.4 % (w = 1) and 100 % (w = 2) of 500 samples classified as the asked class (docs/guidance.md).
    import dataclasses

    from elucidate.config import load_config
    from elucidate.data.pixels import to_pixels
    from elucidate.metrics import load_digits_classifier
    from elucidate.run.model import load_run

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "digits-cond.yaml",
                         ["training.steps=1000", "training.sample_every=0"])
    Trainer(config, tmp_path / "cond", progress=False, log=lambda *a: None).train()
    run = load_run(tmp_path / "cond")
    labels = torch.arange(10).repeat_interleave(20)
    cfg = dataclasses.replace(run.config.sampling, guidance=2.0)
    x = run.sample(range(200), cfg, class_labels=labels, batch_size=200)
    with torch.no_grad():
        predicted = load_digits_classifier().predict_proba(to_pixels(x, run.normalizer)).argmax(1)
    assert (predicted == labels).float().mean() >= 0.9
