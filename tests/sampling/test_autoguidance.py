"""Autoguidance (Karras et al. 2024), the guidance interval (Kynkäänniemi et al. 2024) and x̂0 clipping /
dynamic thresholding (Saharia et al. 2022) as denoiser wrappers: each equals its formula, and the interval spends
exactly one forward of the main model per call outside it."""
from __future__ import annotations

import pytest
import torch

from elucidate import Clipped, Denoiser, GaussianMixture, Guided, Thresholded, build_network, sample
from elucidate.formulations import EDM

f64 = torch.float64


class Counted:
    """A denoiser that counts its calls and the batch sizes it saw."""

    def __init__(self, D):
        self.D, self.batches = D, []

    def __call__(self, x, sigma, **cond):
        self.batches.append(x.shape[0])
        return self.D(x, sigma, **cond)


def _pair():
    """An exact 2-D mixture and the same mixture blurred (inflated covariances): a good and a bad denoiser."""
    means = torch.tensor([[1.0, 0.5], [-1.0, -0.3]])
    return GaussianMixture(means, [0.2, 0.3], [0.6, 0.4]), GaussianMixture(means, [0.6, 0.7], [0.6, 0.4])


def test_autoguidance_equals_the_formula_and_keeps_cfg_otherwise():
    good, bad = _pair()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=f64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 2.0, 5.0, 20.0], dtype=f64)
    for w in (0.0, 1.0, 2.0, 3.5):
        ours = Guided(good, w, guide=bad)(x, sigma)
        torch.testing.assert_close(ours, bad(x, sigma) + w * (good(x, sigma) - bad(x, sigma)), rtol=0, atol=1e-12)
    assert not torch.equal(Guided(good, 2.0, guide=bad)(x, sigma), good(x, sigma))  # it does something
    # without a guide and without a condition, w changes nothing (classifier-free guidance has nothing to mix)
    torch.testing.assert_close(Guided(good, 3.0)(x, sigma), good(x, sigma), rtol=0, atol=0)


def test_autoguidance_passes_the_condition_to_both_models():
    torch.manual_seed(0)
    nets = [build_network("unet", img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1,
                          label_dim=3).eval() for _ in range(2)]
    for net in nets:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    D, G = (Denoiser(net, EDM()) for net in nets)
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0])
    labels = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    with torch.no_grad():
        want = G(x, sigma, class_labels=labels) + 2.0 * (D(x, sigma, class_labels=labels) - G(x, sigma,
                                                                                               class_labels=labels))
        torch.testing.assert_close(Guided(D, 2.0, guide=G)(x, sigma, class_labels=labels), want)


@pytest.mark.parametrize("autoguided", [True, False])
def test_guidance_interval_is_one_forward_outside_and_the_formula_inside(autoguided):
    good, bad = _pair()
    main, guide = Counted(good), Counted(bad)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=f64)
    cond = {} if autoguided else {"class_labels": torch.ones(4, 3)}

    def plain(x, sigma, class_labels=None):  # a "conditional" mixture: the label shifts the prediction
        out = good(x, sigma)
        return out if class_labels is None else out + 0.1 * class_labels.sum(1, keepdim=True)

    main = Counted(good if autoguided else plain)
    D = Guided(main, 2.0, guide=guide if autoguided else None, interval=(0.5, 3.0))
    for sigma in (0.1, 10.0, torch.full((4,), 0.2, dtype=f64)):  # outside: one forward of the main model alone
        main.batches.clear(), guide.batches.clear()
        out = D(x, sigma, **cond)
        assert main.batches == [4] and guide.batches == []
        torch.testing.assert_close(out, main.D(x, sigma, **cond), rtol=0, atol=0)
    for sigma in (0.5, 1.0, 3.0):  # inside (the ends included): the guided formula
        unguided = Guided(main.D, 2.0, guide=bad if autoguided else None)
        torch.testing.assert_close(D(x, sigma, **cond), unguided(x, sigma, **cond), rtol=0, atol=1e-12)
        assert not torch.allclose(D(x, sigma, **cond), main.D(x, sigma, **cond))
    # a batch straddling the interval: each sample as if alone
    sigma = torch.tensor([0.1, 1.0, 10.0, 2.0], dtype=f64)
    full = D(x, sigma, **cond)
    for i in range(4):
        one = D(x[i:i + 1], sigma[i:i + 1], **{k: v[i:i + 1] for k, v in cond.items()})
        torch.testing.assert_close(full[i:i + 1], one, rtol=0, atol=1e-12)


def test_interval_and_guide_arguments_are_checked():
    good, bad = _pair()
    for interval in ((2.0, 1.0), (-1.0, 1.0), (1.0,), "0.5"):
        with pytest.raises(ValueError, match="interval"):
            Guided(good, 2.0, interval=interval)
    with pytest.raises(ValueError, match="guide must be a denoiser"):
        Guided(good, 2.0, guide=3.0)
    assert Guided(good, 2.0, interval=(0.1, float("inf"))).interval == (0.1, float("inf"))


def test_autoguided_sampling_of_the_mixture_sharpens_it():
    good, bad = _pair()
    plain = sample(good, (2000, 2), seeds=range(2000), steps=16)
    guided = sample(Guided(good, 2.5, guide=bad), (2000, 2), seeds=range(2000), steps=16)
    spread = lambda x: (x - good.means[good.classify(x)]).pow(2).sum(1).mean()  # noqa: E731
    assert spread(guided) < 0.8 * spread(plain)  # autoguidance pulls samples towards the modes


def test_clipped_and_thresholded_equal_their_formulas():
    good, _ = _pair()
    scaled = lambda x, sigma: 3.0 * good(x, sigma)  # noqa: E731  (predictions well outside [-1, 1])
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=f64)
    raw = scaled(x, 0.5)
    torch.testing.assert_close(Clipped(scaled)(x, 0.5), raw.clamp(-1, 1), rtol=0, atol=0)
    torch.testing.assert_close(Clipped(scaled, range=(-2, 0.5))(x, 0.5), raw.clamp(-2, 0.5), rtol=0, atol=0)
    s = torch.quantile(raw.abs(), 0.9, dim=1).clamp(min=1)[:, None]
    torch.testing.assert_close(Thresholded(scaled, percentile=0.9)(x, 0.5), raw.clamp(-s, s) / s)
    capped = Thresholded(scaled, percentile=0.9, max_value=1.5)(x, 0.5)
    torch.testing.assert_close(capped, raw.clamp(-s.clamp(max=1.5), s.clamp(max=1.5)) / s.clamp(max=1.5))
    assert Thresholded(scaled)(x, 0.5).abs().max() <= 1
    with pytest.raises(ValueError, match="range"):
        Clipped(good, range=(1, -1))
    with pytest.raises(ValueError, match="percentile"):
        Thresholded(good, percentile=0)
    with pytest.raises(ValueError, match="max_value"):
        Thresholded(good, max_value=0.5)


def test_wrappers_keep_the_formulation_and_the_network():
    net = build_network("unet", img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1,), num_blocks=1)
    D = Denoiser(net, EDM())
    for wrapped in (Clipped(D), Thresholded(D), Guided(Clipped(D), 2.0, interval=(0.1, 1.0))):
        assert wrapped.formulation is D.formulation and wrapped.supported_range == D.supported_range
    assert Clipped(D).net is net
