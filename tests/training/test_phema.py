"""Post-hoc EMA (EDM2 Section 3, Appendix C): profiles, sigma_rel <-> gamma, the tracker, snapshots and
least-squares reconstruction, checked against quadrature, the paper's numbers and directly tracked EMAs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.integrate import quad

from elucidate.errors import UserError
from elucidate.training.ema import (
    MAX_SIGMA_REL,
    PowerEMA,
    gamma_to_sigma_rel,
    list_snapshots,
    power_beta,
    profile,
    profile_inner,
    read_snapshot_info,
    reconstruct,
    save_snapshot,
    sigma_rel_to_gamma,
    snapshot_name,
    solve_weights,
)


class Vec(torch.nn.Module):
    """A 'network' whose weights are one vector, plus a persistent buffer (copied, not averaged)."""

    def __init__(self, dim: int, dtype=torch.float32) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim, dtype=dtype))
        self.register_buffer("seen", torch.zeros((), dtype=torch.int64))


def _quad(f, a, b, points=None):
    return quad(f, a, b, points=points, limit=200, epsabs=1e-12, epsrel=1e-10)[0]


# ---------------------------------------------------------------------------------------- math
@pytest.mark.parametrize("t,gamma", [(1.0, 6.94), (250.0, 16.97), (7.0, 0.5), (1e4, 3.0)])
def test_profiles_integrate_to_one_and_have_the_stated_relative_std(t, gamma):
    f = lambda tau: float(profile(tau, t, gamma))  # noqa: E731
    assert _quad(f, 0, t) == pytest.approx(1.0, abs=1e-9)
    assert _quad(f, t, 2 * t) == 0.0  # no weight after the current time
    mean = _quad(lambda tau: tau * f(tau), 0, t)
    var = _quad(lambda tau: (tau - mean) ** 2 * f(tau), 0, t)
    assert math.sqrt(var) / t == pytest.approx(gamma_to_sigma_rel(gamma), rel=1e-7)  # eq. 123


def test_sigma_rel_gamma_paper_values_and_round_trip():
    # EDM2 Section 3.1: "sigma_rel = 0.05 and 0.10 (gamma = 16.97 and 6.94)".
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for s in np.linspace(0.005, 0.28, 40):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(float(s))) == pytest.approx(s, rel=1e-10)
    for g in (0.01, 1.0, 6.94, 16.97, 500.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(g)) == pytest.approx(g, rel=1e-8)
    assert gamma_to_sigma_rel(1e-12) == pytest.approx(MAX_SIGMA_REL)
    for bad in (0.0, -0.1, MAX_SIGMA_REL, 0.3, float("nan")):
        with pytest.raises(UserError, match="sigma_rel"):
            sigma_rel_to_gamma(bad)
    with pytest.raises(UserError, match="gamma"):
        gamma_to_sigma_rel(0.0)


@pytest.mark.parametrize("a,b", [((3.0, 16.97), (10.0, 6.94)), ((10.0, 16.97), (3.0, 6.94)),
                                 ((5.0, 2.0), (5.0, 9.0)), ((0.2, 1.5), (0.9, 30.0))])
def test_profile_inner_product_closed_form_matches_quadrature(a, b):
    numeric = _quad(lambda tau: float(profile(tau, *a) * profile(tau, *b)), 0, min(a[0], b[0]))
    assert float(profile_inner(*a, *b)) == pytest.approx(numeric, rel=1e-8)
    assert float(profile_inner(*a, *b)) == pytest.approx(float(profile_inner(*b, *a)), rel=1e-14)


def test_tracker_weights_are_the_profile_integrated_over_each_step():
    """With theta_k = e_k the tracked average IS the weight vector: w_k = (k^(g+1) - (k-1)^(g+1)) / T^(g+1),
    i.e. the continuous profile integrated over (k-1, k]; they sum to 1."""
    T = 60
    net = Vec(T, torch.float64)
    tracker = PowerEMA(net, stds=(0.05, 0.10, 0.25))
    for k in range(1, T + 1):
        net.w.data.zero_()
        net.w.data[k - 1] = 1.0
        tracker.update(net, k)
    k = np.arange(1, T + 1, dtype=np.float64)
    for i, gamma in enumerate(tracker.gammas):
        w = tracker.averages[i][0].numpy()
        closed = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / T ** (gamma + 1)
        np.testing.assert_allclose(w, closed, rtol=1e-10, atol=1e-300)
        assert w.sum() == pytest.approx(1.0, abs=1e-12)
        for j in (0, 29, 59):
            step_mass = _quad(lambda tau, g=gamma: float(profile(tau, T, g)), j, j + 1)
            assert w[j] == pytest.approx(step_mass, rel=1e-8)
    assert power_beta(9, 10, 6.94) == pytest.approx((1 - 1 / 10) ** 7.94)  # eq. 127
    with pytest.raises(UserError, match="increase"):
        tracker.update(net, T)


def test_solve_weights_exact_for_a_snapshot_profile_and_close_between():
    times = np.repeat(np.arange(1, 11) * 100.0, 2)
    gammas = np.tile([sigma_rel_to_gamma(0.05), sigma_rel_to_gamma(0.10)], 10)
    x = solve_weights(times, gammas, 1000.0, gammas[-1])
    np.testing.assert_allclose(x, np.eye(20)[-1], atol=1e-9)
    g = sigma_rel_to_gamma(0.075)
    x = solve_weights(times, gammas, 1000.0, g)
    assert x.sum() == pytest.approx(1.0)
    # L2 residual of the fitted profile, relative to the target profile's norm (closed forms).
    target = profile_inner(1000.0, g, 1000.0, g)
    A = profile_inner(times[:, None], gammas[:, None], times[None, :], gammas[None, :])
    b = profile_inner(times, gammas, 1000.0, g)
    residual = target - 2 * x @ b + x @ A @ x
    assert math.sqrt(max(residual, 0.0) / target) < 0.02
    with pytest.raises(UserError, match="as many"):
        solve_weights([1.0, 2.0], [3.0], 2.0, 3.0)


# ------------------------------------------------------------------------- tracker + snapshots
def _train(tmp_path, steps=1000, every=100, dim=512, resume_at=None):
    """A synthetic run: weights follow a random walk with drift; the tracker holds sigma_rel 0.05 and
    0.10 and is snapshotted every ``every`` steps; ``direct`` tracks 0.075 and 0.15 for comparison."""
    net = Vec(dim)
    tracker, direct = PowerEMA(net, (0.05, 0.10)), PowerEMA(net, (0.075, 0.15))
    g = torch.Generator().manual_seed(0)
    trajectory = []
    for k in range(1, steps + 1):
        net.w.data += 0.01 * torch.randn(dim, generator=g) + 0.001
        net.seen += 1
        trajectory.append(net.w.detach().double().clone())
        tracker.update(net, k)
        direct.update(net, k)
        if k % every == 0:
            save_snapshot(tmp_path / snapshot_name(k), tracker, k, {"note": "synthetic"})
        if k == resume_at:  # round-trip the state through a safetensors file into a fresh tracker
            save_file(tracker.state_dict(), str(tmp_path / "state.safetensors"))
            tracker = PowerEMA(Vec(dim), (0.05, 0.10))
            tracker.load_state_dict(load_file(str(tmp_path / "state.safetensors")))
    return net, tracker, direct, torch.stack(trajectory)


def test_reconstruction_matches_directly_tracked_emas(tmp_path):
    net, tracker, direct, trajectory = _train(tmp_path)
    paths = list_snapshots(tmp_path)
    assert [p.name for p in paths] == [snapshot_name(k) for k in range(100, 1001, 100)]
    info = read_snapshot_info(paths[-1])
    assert (info.step, info.time, info.stds, info.meta) == (1000, 1000.0, (0.05, 0.10), {"note": "synthetic"})
    assert info.gammas == pytest.approx((16.97, 6.94), abs=0.005)

    # A tracked profile is reproduced to float32 rounding (the solve returns a unit vector).
    for i, std in enumerate(tracker.stds):
        rec = reconstruct(tmp_path, std)
        assert set(rec) == {"w", "seen"} and int(rec["seen"]) == 1000
        torch.testing.assert_close(rec["w"], tracker.averages[i][0], rtol=0, atol=1e-6)
    net.load_state_dict(reconstruct(paths, 0.10), strict=True)

    # Stds between / outside the tracked ones vs. EMAs tracked directly, relative to the distance
    # between the two tracked profiles (what choosing the wrong one of them would cost).
    scale = (tracker.averages[0][0] - tracker.averages[1][0]).double().norm()
    errors = {}
    for i, std in enumerate(direct.stds):
        rec = reconstruct(tmp_path, std)["w"].double()
        errors[std] = float((rec - direct.averages[i][0].double()).norm() / scale)
    print(f"relative reconstruction errors: {errors}")
    assert errors[0.075] < 0.01 and errors[0.15] < 0.05

    # The reconstruction is exactly sum_k w_rec(k) theta_k with the discrete profile weights.
    times = np.repeat(np.arange(100, 1001, 100, dtype=np.float64), 2)
    gammas = np.tile(info.gammas, 10)
    x = solve_weights(times, gammas, 1000.0, sigma_rel_to_gamma(0.075))
    k = np.arange(1, 1001, dtype=np.float64)[:, None]
    w = np.where(k <= times, (k ** (gammas + 1) - (k - 1) ** (gammas + 1)) / times ** (gammas + 1), 0.0) @ x
    expected = torch.from_numpy(w) @ trajectory
    torch.testing.assert_close(reconstruct(tmp_path, 0.075)["w"].double(), expected, rtol=0, atol=1e-5)

    # An earlier snapshot time uses only the snapshots up to it.
    early = reconstruct(tmp_path, 0.05, target_time=500)
    torch.testing.assert_close(early["w"], load_file(str(paths[4]))["0.w"], rtol=0, atol=1e-6)


def test_resume_through_safetensors_is_bit_exact(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, whole, _, _ = _train(tmp_path / "a", steps=300, every=50)
    _, resumed, _, _ = _train(tmp_path / "b", steps=300, every=50, resume_at=137)
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(list_snapshots(tmp_path / "a"), list_snapshots(tmp_path / "b")):
        assert p.read_bytes() == q.read_bytes()


def test_errors_are_one_line_user_errors(tmp_path):
    net = Vec(4)
    tracker = PowerEMA(net, (0.05, 0.10))
    with pytest.raises(UserError, match="not been updated"):
        save_snapshot(tmp_path / snapshot_name(0), tracker, 0)
    other = PowerEMA(net, (0.05, 0.12))
    with pytest.raises(UserError, match="stds"):
        tracker.load_state_dict(other.state_dict())
    with pytest.raises(UserError, match="missing"):
        tracker.load_state_dict(PowerEMA(Vec(4), (0.05,)).state_dict())
    for bad in ((), (0.05, 0.05), 0.05, (0.5,)):
        with pytest.raises(UserError):
            PowerEMA(net, bad)
    with pytest.raises(UserError, match="no power EMA snapshots"):
        reconstruct(tmp_path, 0.1)
    tracker.update(net, 1)
    save_snapshot(tmp_path / snapshot_name(1), tracker, 1)
    (tmp_path / "phema-1.safetensors.tmp").write_bytes(b"junk")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    assert list_snapshots(tmp_path) == [tmp_path / snapshot_name(1)]
    with pytest.raises(UserError, match="not a power EMA snapshot"):
        read_snapshot_info(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="not a readable"):
        read_snapshot_info(tmp_path / "phema-1.safetensors.tmp")
    with pytest.raises(UserError, match="target_time=2"):
        reconstruct(tmp_path, 0.1, target_time=2)
