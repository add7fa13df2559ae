"""Image-to-image (SDEdit, ``sample(init=, strength=)``) and inpainting (RePaint, ``inpaint()``) on exact mixtures."""
from __future__ import annotations

import pytest
import torch

from elucidate import GaussianMixture, inpaint, sample
from elucidate.errors import UserError
from elucidate.sampling import SAMPLERS, SeededNoise, karras_sigmas, stepwise_samplers

pytestmark = pytest.mark.usefixtures("one_thread")


def _init(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("sampler", ["heun", "ddpm", "dpmpp_2m"])
def test_strength_zero_returns_the_input_bit_for_bit(gmm, sampler):
    init = _init()
    out = sample(gmm.denoise, init.shape, sampler=sampler, steps=6, init=init, strength=0.0)
    assert out.dtype == init.dtype and torch.equal(out, init)


def test_strength_one_starts_at_sigma_max_from_the_seed_noise(gmm):
    init, seen = _init(), []
    sample(gmm.denoise, init.shape, sampler="euler", steps=5, seeds=[4, 5, 6], init=init, strength=1.0,
           callback=lambda info: seen.append((info["sigma"], info["x"].clone())))
    assert seen[0][0] == pytest.approx(80.0)
    assert torch.allclose(seen[0][1], init + 80.0 * SeededNoise([4, 5, 6], (1, 2, 2))())
    assert len(seen) == 5


@pytest.mark.parametrize(("strength", "first"), [(0.5, 5), (0.3, 7), (0.25, 7), (0.01, 9)])
def test_strength_starts_at_step_n_minus_ceil_strength_n(gmm, strength, first):
    sigmas, seen = karras_sigmas(10, 0.002, 80.0), []
    sample(gmm.denoise, (2, 4), sampler="euler", sigmas=sigmas, init=torch.zeros(4), strength=strength,
           callback=lambda info: seen.append(info["sigma"]))
    assert seen == pytest.approx(sigmas[first:-1].tolist())


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_image_to_image_works_with_every_sampler_and_keeps_per_seed_noise(gmm, sampler):
    init = _init(3)
    both = sample(gmm.denoise, (3, 1, 2, 2), sampler=sampler, steps=6, seeds=[1, 2, 3], init=init, strength=0.6)
    one = sample(gmm.denoise, (1, 1, 2, 2), sampler=sampler, steps=6, seeds=[3], init=init[2:], strength=0.6)
    batched = sample(gmm.denoise, (3, 1, 2, 2), sampler=sampler, steps=6, seeds=[1, 2, 3], init=init, strength=0.6,
                     batch_size=2)
    assert torch.isfinite(both).all()
    assert torch.allclose(both[2:], one, atol=1e-6) and torch.allclose(both, batched, atol=1e-6)
    assert not torch.allclose(both, init)  # it did something


def test_low_strength_stays_close_to_the_input_and_high_strength_does_not(gmm):
    init = gmm.sample(64, generator=torch.Generator().manual_seed(0)).float() + 0.3
    dist = {s: (sample(gmm.denoise, init.shape, steps=10, init=init, strength=s) - init).norm(dim=1).mean().item()
            for s in (0.2, 1.0)}
    assert dist[0.2] < 0.5 * dist[1.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"init": torch.zeros(3, 4), "strength": 1.5}, "strength must be"),
    ({"init": torch.zeros(3, 4), "strength": -0.1}, "strength must be"),
    ({"init": torch.zeros(3, 5), "strength": 0.5}, "init has shape"),
    ({"init": torch.zeros(3, 4)}, "needs both"),
    ({"strength": 0.5}, "needs both"),
])
def test_bad_init_or_strength_is_a_user_error(gmm, kwargs, message):
    with pytest.raises(UserError, match=message):
        sample(gmm.denoise, (3, 4), steps=4, **kwargs)


# ------------------------------------------------------------------------------------------------ inpainting
def test_the_exact_conditional_of_a_mixture_is_bayes_rule_on_the_kept_coordinates(gmm):
    keep = torch.tensor([True, False, True, False])
    x = torch.tensor([0.9, 0.0, 0.2, 0.0], dtype=torch.float64)
    cond = gmm.conditional(x, keep)
    joint = torch.stack([GaussianMixture(gmm.means[k:k + 1, keep], gmm.stds[k:k + 1, keep]).log_prob(x[keep][None])
                         for k in range(3)]).squeeze(1) + gmm.weights.log()
    assert torch.allclose(cond.weights, joint.softmax(0))
    assert torch.equal(cond.means, gmm.means[:, ~keep]) and torch.equal(cond.stds, gmm.stds[:, ~keep])


@pytest.mark.parametrize("sampler", stepwise_samplers())
def test_inpainting_keeps_the_known_pixels_exactly_and_fills_the_rest(gmm, sampler):
    known = _init(4)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = inpaint(gmm.denoise, known, mask, sampler=sampler, steps=5, resample=3, seeds=[9, 8, 7, 6])
    assert torch.equal(out[..., 0, 0], known[..., 0, 0]) and torch.equal(out[..., 1, 1], known[..., 1, 1])
    assert torch.isfinite(out).all() and not torch.allclose(out[..., 0, 1], known[..., 0, 1])


def test_inpainting_gives_image_i_noise_from_seeds_i_only(gmm):
    known, mask = _init(3), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    both = inpaint(gmm.denoise, known, mask, sampler="ddpm", steps=4, resample=2, seeds=[5, 6, 7])
    assert torch.allclose(both, inpaint(gmm.denoise, known, mask, sampler="ddpm", steps=4, resample=2, seeds=[5, 6, 7],
                                        batch_size=2), atol=1e-6)
    one = inpaint(gmm.denoise, known[1:2], mask, sampler="ddpm", steps=4, resample=2, seeds=[6])
    other = inpaint(gmm.denoise, known[1:2], mask, sampler="ddpm", steps=4, resample=2, seeds=[60])
    assert torch.allclose(both[1:2], one, atol=1e-6) and not torch.allclose(one, other)


def test_inpainting_refuses_multistep_samplers_naming_the_ones_that_work(gmm):
    with pytest.raises(UserError, match="multistep.*heun"):
        inpaint(gmm.denoise, _init(), torch.ones(2, 2), sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="unknown sampler"):
        inpaint(gmm.denoise, _init(), torch.ones(2, 2), sampler="nope")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mask": torch.ones(3, 3)}, "does not broadcast"),
    ({"mask": torch.full((2, 2), 2.0)}, r"in \[0, 1\]"),
    ({"resample": 0}, "resample must be"),
    ({"seeds": [1]}, "seeds has 1"),
    ({"eta": 0.5}, "does not take"),
])
def test_bad_inpainting_arguments_are_user_errors(gmm, kwargs, message):
    args = {"mask": torch.ones(2, 2), **kwargs}
    with pytest.raises(UserError, match=message):
        inpaint(gmm.denoise, _init(), args.pop("mask"), sampler="heun", steps=3, **args)


def test_repaint_with_resampling_is_closer_to_the_exact_conditional_than_plain_replacement():
    # two far-apart components; observing x1 = 0.9 puts (exactly) all mass on the one at +1, but plain
    # replacement lets x2 commit to a component before the observation has reached it
    mixture = GaussianMixture([[-1.0, -1.0], [1.0, 1.0]], [0.1, 0.1], [0.5, 0.5])
    keep = torch.tensor([True, False])
    known = torch.tensor([0.9, 0.0]).expand(200, 2)
    assert mixture.conditional(known[0], keep).weights[1] > 0.999
    right = {r: (inpaint(mixture.denoise, known, keep.float(), steps=10, resample=r, dtype=torch.float64)[:, 1] > 0)
             .double().mean().item() for r in (1, 10)}
    assert right[1] < 0.85 and right[10] > 0.97, right
