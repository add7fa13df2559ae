"""Tests for elucidate.metrics: Fréchet distance, feature statistics, KID, precision/recall,
the FID Inception-v3 loader and the bundled digits feature network."""
from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from elucidate.metrics import (
    FeatureStats,
    FIDInceptionV3,
    ModuleExtractor,
    classifier_score,
    compute_stats,
    digits_split,
    frechet_distance,
    get_feature_extractor,
    kid,
    knn_radii,
    load_digits_classifier,
    load_digits_metadata,
    load_inception,
    load_stats,
    precision_recall,
    save_stats,
)


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d) + 0.1 * np.eye(d)


def fd_reference(mu1, s1, mu2, s2) -> float:
    """Independent formula: tr((S1^1/2 S2 S1^1/2)^1/2) via symmetric eigendecompositions."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2)
                 - 2 * np.sqrt(np.clip(w2, 0, None)).sum())


# --------------------------------------------------------------------------- Fréchet distance
def test_frechet_closed_form_diagonal_and_commuting():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2  # = 13.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))  # commuting S1, S2
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_identical_and_against_direct_computation():
    rng = np.random.default_rng(1)
    for d in (2, 16, 64):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
        direct = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2)
                       - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
        got = frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(direct, rel=1e-9)
        assert got == pytest.approx(fd_reference(mu1, s1, mu2, s2), rel=1e-7)
        assert got == pytest.approx(frechet_distance(torch.tensor(mu1), torch.tensor(s1), mu2, s2))


def test_frechet_singular_covariances_use_eps_retry():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((5, 12)), rng.standard_normal((6, 12)) + 0.5  # rank-deficient
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    got = frechet_distance(x.mean(0), s1, y.mean(0), s2)
    assert np.isfinite(got)
    assert got == pytest.approx(fd_reference(x.mean(0), s1, y.mean(0), s2), rel=1e-3, abs=1e-3)


def test_frechet_bad_inputs_name_the_argument():
    mu, s = np.zeros(3), np.eye(3)
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(np.zeros((3, 1)), s, mu, s)
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(mu, s, mu, np.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(mu, np.ones((3, 2)), mu, s)
    with pytest.raises(ValueError, match="mu1 and mu2"):
        frechet_distance(mu, s, np.zeros(4), np.eye(4))


# --------------------------------------------------------------------------- FeatureStats / files
def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((n, 7)) * 3 + 100 for n in (1, 5, 64, 2, 30)]
    stats = FeatureStats(keep_features=True)
    for b in batches:
        stats.update(torch.tensor(b, dtype=torch.float32) if len(b) == 5 else b)
    allx = np.concatenate(batches)
    allx[1:6] = allx[1:6].astype(np.float32)  # the tensor batch went through float32
    assert stats.count == len(allx)
    np.testing.assert_allclose(stats.mean, allx.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(allx, rowvar=False), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(stats.features, allx, rtol=1e-6)


def test_feature_stats_errors():
    stats = FeatureStats()
    with pytest.raises(ValueError, match="empty"):
        _ = stats.mean
    with pytest.raises(ValueError, match="features"):
        stats.update(np.zeros(4))
    stats.update(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        _ = stats.cov
    with pytest.raises(ValueError, match="D=5"):
        stats.update(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="keep_features"):
        _ = stats.features


def test_save_load_stats_round_trip_and_errors(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(6), random_spd(rng, 6)
    path = tmp_path / "sub" / "ref.npz"
    save_stats(path, mu, sigma, count=np.int64(123))
    assert sorted(os.listdir(path.parent)) == ["ref.npz"]  # temp file renamed away
    mu2, sigma2 = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert int(np.load(path)["count"]) == 123
    np.savez(tmp_path / "edm.npz", mu=mu.astype(np.float32), sigma=sigma)  # NVlabs/edm layout
    assert load_stats(tmp_path / "edm.npz")[0].dtype == np.float64

    with pytest.raises(ValueError, match="not found: .*nope.npz"):
        load_stats(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError):
        load_stats(tmp_path / "nope.npz")
    np.savez(tmp_path / "nosigma.npz", mu=mu)
    with pytest.raises(ValueError, match=r"nosigma\.npz: missing key 'sigma'"):
        load_stats(tmp_path / "nosigma.npz")
    np.savez(tmp_path / "shape.npz", mu=mu, sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"shape\.npz: sigma"):
        load_stats(tmp_path / "shape.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=r"junk\.npz"):
        load_stats(tmp_path / "junk.npz")
    with pytest.raises(ValueError, match="sigma"):
        save_stats(tmp_path / "bad.npz", mu, np.eye(3))


# --------------------------------------------------------------------------- KID
def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], x.shape[0]
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_matches_brute_force_unbiased_mmd():
    rng = np.random.default_rng(5)
    x, y = rng.standard_normal((25, 4)), rng.standard_normal((25, 4)) + 0.3
    mean, std = kid(x, y, num_subsets=1, subset_size=1000)  # clipped to 25 = the whole set
    assert mean == pytest.approx(brute_force_mmd2(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_same_vs_shifted_distribution():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((600, 16)), rng.standard_normal((500, 16))
    same, same_std = kid(a, b, num_subsets=20, subset_size=300, seed=1)
    shifted, shifted_std = kid(a, b + 0.5, num_subsets=20, subset_size=300, seed=1)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 0.05 and shifted > 10 * shifted_std and shifted > 20 * abs(same)
    assert kid(a, b, num_subsets=5, seed=3) == kid(a, b, num_subsets=5, seed=3)
    with pytest.raises(ValueError, match="features_b"):
        kid(a, b[:, :3])
    with pytest.raises(ValueError, match="features_a"):
        kid(a[0], b)


# --------------------------------------------------------------------------- precision / recall
def test_precision_recall_known_cases():
    rng = np.random.default_rng(7)
    real = rng.standard_normal((200, 2))
    assert precision_recall(real, real.copy(), k=3, batch_size=64) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    two = np.concatenate([rng.standard_normal((300, 2)), rng.standard_normal((300, 2)) + 50.0])
    one = rng.standard_normal((300, 2))  # covers only the first real cluster
    precision, recall = precision_recall(two, one, k=5, batch_size=37)
    assert precision > 0.95
    assert recall == pytest.approx(0.5, abs=0.05)


def test_knn_radii_and_pr_errors():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(knn_radii(x, k=1), [1.0, 1.0, 2.0, 4.0])
    np.testing.assert_allclose(knn_radii(x, k=2, batch_size=3), [3.0, 2.0, 3.0, 6.0])
    with pytest.raises(ValueError, match="k=4 .*real_features"):
        precision_recall(x, np.zeros((10, 1)), k=4)
    with pytest.raises(ValueError, match="fake_features"):
        precision_recall(x, np.zeros((10, 2)), k=1)
    with pytest.raises(ValueError, match="real_features"):
        precision_recall(x[:, 0], x, k=1)


# --------------------------------------------------------------------------- Inception-v3
def _randomized_inception() -> FIDInceptionV3:
    torch.manual_seed(0)
    model = FIDInceptionV3()
    for m in model.modules():  # keep activations O(1) so the comparison is meaningful
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.8, 1.2)
            m.bias.data.uniform_(-0.1, 0.1)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.8, 1.2)
    return model.eval()


def test_inception_weights_round_trip_and_shapes(tmp_path):
    model = _randomized_inception()
    state = model.state_dict()
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in state and state["fc.weight"].shape == (1008, 2048)
    path = tmp_path / "pt_inception-test.pth"
    torch.save(state, path)
    loaded = load_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    # Gray 40x56 through the loaded model == its explicit RGB 299x299 version through the
    # original: checks the weights round trip, channel repeat and bilinear resize together.
    x1 = torch.rand(2, 1, 40, 56) * 255
    x3 = F.interpolate(x1, size=(299, 299), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    with torch.no_grad():
        got, ref = loaded(x1), model(x3)
    assert got.shape == ref.shape == (2, 2048)
    assert ref.abs().mean() > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # The same keys from a .safetensors file, here without the BatchNorm counters (tolerated).
    from safetensors.torch import save_file
    st_path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous().clone() for k, v in state.items()
               if not k.endswith("num_batches_tracked")}, str(st_path))
    st_state = load_inception(st_path).state_dict()
    assert st_state.keys() == state.keys()
    assert all(torch.equal(st_state[k], v) for k, v in state.items())


def test_inception_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth.*pytorch-fid"):
        load_inception(tmp_path / "missing.pth")
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.startswith("Mixed_7c")}
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*Mixed_7c\.branch1x1\.conv\.weight.*extra\.weight"):
        load_inception(bad)
    with pytest.raises(ValueError, match="path="):
        get_feature_extractor("fid")
    with pytest.raises(ValueError, match="channels"):
        FIDInceptionV3()(torch.zeros(1, 2, 8, 8))


# --------------------------------------------------------------------------- digits network
@pytest.fixture(scope="module")
def digits():
    return digits_split(**{k: load_digits_metadata()["split"][k] for k in ("seed", "test_fraction")})


def test_bundled_classifier_accuracy_matches_metadata(digits):
    meta = load_digits_metadata()
    assert len(digits.y_test) == meta["n_test"] and len(digits.y_train) == meta["n_train"]
    clf = load_digits_classifier()
    with torch.no_grad():
        test_acc = (clf(digits.x_test).argmax(1) == digits.y_test).float().mean().item()
        train_acc = (clf(digits.x_train).argmax(1) == digits.y_train).float().mean().item()
    assert abs(test_acc - meta["test_accuracy"]) <= 1.0 / meta["n_test"] + 1e-9
    assert abs(train_acc - meta["train_accuracy"]) <= 1.0 / meta["n_train"] + 1e-9
    assert test_acc >= 0.97
    weights = os.path.join(os.path.dirname(__import__("elucidate").__file__), "assets",
                           "digits_classifier.safetensors")
    assert os.path.getsize(weights) < 300_000


def test_digits_extractor_input_conventions(digits):
    ext = get_feature_extractor("fd_digits")
    x = digits.x_test[:6]
    f = ext(x)
    assert f.shape == (6, ext.dim) and ext.dim == load_digits_metadata()["feature_dim"]
    torch.testing.assert_close(ext(x.repeat(1, 3, 1, 1)), f)  # RGB is averaged to gray
    torch.testing.assert_close(ext(F.interpolate(x, scale_factor=4, mode="nearest")), f)  # area resize
    torch.testing.assert_close(ext(x.round().to(torch.uint8)), ext(x.round()))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        get_feature_extractor("lpips")


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-2.0, 3.0)
    k = torch.exp(-taps**2 / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(x, (k[:, None] * k[None]).view(1, 1, 5, 5), padding=2)


def test_fd_digits_separates_real_blurred_and_noise(digits):
    ext = get_feature_extractor("fd_digits")
    stats = lambda x: compute_stats(ext, x, batch_size=500)  # noqa: E731
    test, train = stats(digits.x_test), stats(digits.x_train)
    noise = torch.rand(digits.x_train.shape, generator=torch.Generator().manual_seed(0)) * 255
    fd = lambda a, b: frechet_distance(a.mean, a.cov, b.mean, b.cov)  # noqa: E731
    fd_real, fd_blur, fd_noise = fd(test, train), fd(test, stats(_blur(digits.x_train, 0.7))), \
        fd(test, stats(noise))
    print(f"fd_digits: real_test vs real_train {fd_real:.2f}, vs blurred(sigma=0.7) train "
          f"{fd_blur:.2f}, vs uniform noise {fd_noise:.2f}")
    assert 10 * fd_real < fd_blur and 3 * fd_blur < fd_noise


def test_compute_stats_iterable_equals_tensor_and_module_extractor(digits):
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    ext = ModuleExtractor(net, preprocess=lambda x: x / 255.0, name="lin")
    with pytest.raises(ValueError, match="dim"):
        _ = ext.dim
    whole = compute_stats(ext, digits.x_test, batch_size=1000)
    parts = compute_stats(ext, (digits.x_test[i:i + 50].numpy() for i in range(0, 360, 50)),
                          keep_features=True)
    assert ext.dim == 5 and parts.features.shape == (360, 5)
    np.testing.assert_allclose(parts.mean, whole.mean, rtol=1e-6)
    np.testing.assert_allclose(parts.cov, whole.cov, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="images"):
        ext(torch.zeros(3, 64))


def test_classifier_score(digits):
    p = np.array([[0.95, 0.05, 0.0], [0.2, 0.7, 0.1], [0.0, 0.01, 0.99], [0.9, 0.1, 0.0]])
    s = classifier_score(p, threshold=0.9)
    assert s.confident_fraction == 0.75 and s.count == 4
    np.testing.assert_array_equal(s.histogram, [2, 1, 1])
    assert s.mean_confidence == pytest.approx((0.95 + 0.7 + 0.99 + 0.9) / 4)
    with pytest.raises(ValueError, match="probabilities"):
        classifier_score(np.array([[2.0, 1.0]]))
    clf = load_digits_classifier()
    real = classifier_score(clf.predict_proba(digits.x_test))
    noise = classifier_score(clf.predict_proba(torch.rand(200, 1, 8, 8) * 255))
    assert real.confident_fraction > 0.95 and real.class_entropy > 0.99 * np.log(10)
    assert noise.confident_fraction < 0.2


def test_copy_check_flags_copies_and_not_fresh_images():
    from elucidate.metrics import copy_check, nearest_neighbors

    g = torch.Generator().manual_seed(0)
    training = torch.rand(40, 1, 6, 6, generator=g)
    d, i = nearest_neighbors(training[:5] + 1e-3, training, k=2)
    brute = torch.cdist(training[:5].flatten(1).double() + 1e-3, training.flatten(1).double())
    assert torch.equal(i[:, 0], torch.arange(5)) and torch.allclose(d, brute.topk(2, largest=False).values)
    copies = copy_check(training[torch.arange(30) % 40] + 1e-4 * torch.randn(30, 1, 6, 6, generator=g), training)
    assert copies["closer_than_any_real"] == 1.0 and copies["ratio_below"] == 1.0
    assert copies["real_ratio_below"] < 0.2 and copies["sample_nn_median"] < 0.01 * copies["real_nn_median"]
    fresh = copy_check(torch.rand(30, 1, 6, 6, generator=g), training)  # new draws of the same distribution
    assert fresh["closer_than_any_real"] <= 0.1 and fresh["ratio_below"] < 0.2
    assert 0.7 < fresh["sample_nn_median"] / fresh["real_nn_median"] < 1.4
