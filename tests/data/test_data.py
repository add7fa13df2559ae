"""elucidate.data: every dataset kind (files made in tmp_path), transforms, x-flip, normalizers, errors."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elucidate.data import (
    CONFIG_KEYS,
    DATASETS,
    ArrayDataset,
    DataError,
    DigitsDataset,
    ImageDataset,
    ImageFolderDataset,
    Normalizer,
    ZipImageDataset,
    build_dataset,
)
from elucidate.data.pixels import to_uint8
from elucidate.data.transforms import crop_box


def expect_error(func, *needles: str) -> str:
    """Call ``func``; it must raise a one-line DataError containing every needle."""
    with pytest.raises(DataError) as info:
        func()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def rgb(seed: int, height: int = 10, width: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


LOSSLESS = ["a/b/two.bmp", "a/one.png", "c/UPPER.PNG", "c/four.webp"]
ALL_NAMES = sorted(LOSSLESS + ["z.jpg"])
LABELS = {name: i % 3 for i, name in enumerate(ALL_NAMES)}


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "imgs"
    arrays = {name: rgb(i) for i, name in enumerate(ALL_NAMES)}
    for name, array in arrays.items():
        options = {".webp": {"lossless": True}, ".jpg": {"quality": 100, "subsampling": 0}}
        save(root / name, array, **options.get(Path(name).suffix, {}))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"garbage")  # hidden files are skipped
    (root / "dataset.json").write_text(json.dumps({"labels": [[n, LABELS[n]] for n in ALL_NAMES]}))
    return root, arrays


def zip_folder(root: Path, target: Path) -> Path:
    with zipfile.ZipFile(target, "w") as archive:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(root).as_posix())
    return target


def check_image_dataset(ds: ImageDataset, arrays: dict[str, np.ndarray]) -> None:
    assert len(ds) == len(ALL_NAMES) and ds.channels == 3 and ds.resolution == (10, 12)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (5, 3, 10, 12)
    assert ds.labels.tolist() == [LABELS[n] for n in ALL_NAMES] and ds.num_classes == 3
    for i, name in enumerate(ALL_NAMES):
        stored = ds.images[i].permute(1, 2, 0).numpy()
        if name in LOSSLESS:
            np.testing.assert_array_equal(stored, arrays[name])
        else:
            assert np.abs(stored.astype(int) - arrays[name]).mean() < 8  # JPEG is lossy
        image, label = ds[i]
        assert image.dtype == torch.float32 and label.dtype == torch.int64 and label.ndim == 0
        assert int(label) == LABELS[name]
        torch.testing.assert_close(image, ds.images[i].float() / 127.5 - 1)
    assert ds.normalizer.mode == "minus_one_one"


def test_folder_and_zip_recursive_sorted_with_labels(folder, tmp_path):
    root, arrays = folder
    ds = build_dataset({"dataset": "folder", "path": str(root)})
    assert isinstance(ds, ImageFolderDataset) and ds.name == "imgs"
    check_image_dataset(ds, arrays)
    zipped = build_dataset({"dataset": "zip", "path": str(zip_folder(root, tmp_path / "imgs.zip"))})
    assert isinstance(zipped, ZipImageDataset) and zipped.name == "imgs"
    check_image_dataset(zipped, arrays)
    assert torch.equal(zipped.images, ds.images)


def test_labels_false_and_unlabeled(folder):
    root, _ = folder
    ds = build_dataset({"dataset": "folder", "path": str(root), "labels": False, "max_size": 2})
    assert ds.labels is None and ds.num_classes == 0 and len(ds) == 2
    assert int(ds[1][1]) == -1 and ds.get_batch(torch.tensor([0, 1]))[1].tolist() == [-1, -1]
    (root / "dataset.json").write_text(json.dumps({"labels": None}))
    assert ImageFolderDataset(root).labels is None


def make_array(channels: int, dtype: str, n: int = 6, h: int = 5, w: int = 9) -> np.ndarray:
    rng = np.random.default_rng(channels)
    if dtype == "uint8":
        return rng.integers(0, 256, (n, channels, h, w), dtype=np.uint8)
    return (rng.standard_normal((n, channels, h, w)) * 3 + 1).astype(dtype)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", ["uint8", "float32", "float64"])
@pytest.mark.parametrize("channels", [1, 7])
def test_npz_layouts_dtypes_channels(tmp_path, layout, dtype, channels):
    base = make_array(channels, dtype, h=8)  # layout auto-detected: channels is the small axis
    np.savez(tmp_path / "fields.npz", data=base if layout == "NCHW" else base.transpose(0, 2, 3, 1))
    ds = build_dataset({"dataset": "npz", "path": str(tmp_path / "fields.npz")})
    assert ds.name == "fields" and ds.channels == channels and ds.resolution == (8, 9) and len(ds) == 6
    np.testing.assert_array_equal(ds.images.numpy(), base.astype(np.float32) if dtype != "uint8" else base)
    image, label = ds[2]
    assert image.shape == (channels, 8, 9) and int(label) == -1 and ds.labels is None
    if dtype == "uint8":
        assert ds.normalizer.mode == "minus_one_one"
        torch.testing.assert_close(image, torch.from_numpy(base[2]).float() / 127.5 - 1)
    else:
        assert ds.normalizer.mode == "none"
        torch.testing.assert_close(image, torch.from_numpy(base[2].astype(np.float32)))


def test_npy_gray_and_layout_override(tmp_path):
    gray = make_array(1, "uint8")[:, 0]
    np.save(tmp_path / "gray.npy", gray)
    ds = build_dataset({"dataset": "npz", "path": str(tmp_path / "gray.npy")})
    assert ds.channels == 1 and torch.equal(ds.images[:, 0], torch.from_numpy(gray))
    wide = np.zeros((2, 8, 8, 16), np.float32)  # small-axis rule says NCHW; override to NHWC
    np.save(tmp_path / "wide.npy", wide)
    assert ArrayDataset(tmp_path / "wide.npy").channels == 8
    assert ArrayDataset(tmp_path / "wide.npy", layout="NHWC").channels == 16
    assert ArrayDataset(tmp_path / "wide.npy", channels=16).channels == 16  # channels picks the axis
    cube = np.zeros((2, 4, 4, 4), np.float32)
    np.save(tmp_path / "cube.npy", cube)
    expect_error(lambda: ArrayDataset(tmp_path / "cube.npy"), "cube.npy", "layout")  # tie: 4 vs 4
    assert ArrayDataset(tmp_path / "cube.npy", layout="NHWC").channels == 4


def test_npz_key_and_labels_key(tmp_path):
    images, other = make_array(3, "uint8"), make_array(2, "float32")
    labels = np.array([0, 1, 2, 3, 4, 1], dtype=np.int32)
    path = tmp_path / "multi.npz"
    np.savez(path, images=images, other=other, y=labels)
    expect_error(lambda: build_dataset({"dataset": "npz", "path": str(path)}), "multi.npz", "images", "other", "y")
    ds = build_dataset({"dataset": "npz", "path": str(path), "key": "other"})
    assert ds.channels == 2 and ds.labels is None
    ds = build_dataset({"dataset": "npz", "path": str(path), "key": "images", "labels_key": "y"})
    assert ds.labels.tolist() == labels.tolist() and ds.num_classes == 5 and ds.labels.dtype == torch.int64
    np.savez(tmp_path / "pair.npz", x=images, y=labels)  # one array besides labels: no key needed
    ds = build_dataset({"dataset": "npz", "path": str(tmp_path / "pair.npz"), "labels_key": "y", "max_size": 4})
    assert ds.labels.tolist() == labels[:4].tolist() and len(ds) == 4
    assert build_dataset({"dataset": "npz", "path": str(tmp_path / "pair.npz"), "labels_key": "y",
                          "labels": False}).labels is None


@pytest.fixture(scope="module")
def digits() -> DigitsDataset:
    return build_dataset({"dataset": "digits"})


def test_digits(digits):
    assert len(digits) == 1797 and digits.channels == 1 and digits.resolution == (8, 8)
    assert digits.labels.unique().tolist() == list(range(10)) and digits.num_classes == 10
    assert float(digits.images.min()) == 0 and float(digits.images.max()) == 16
    assert digits.images.dtype == torch.float32
    assert torch.equal(digits.images, digits.images.round())  # integer levels 0..16
    x, y = digits.get_batch(torch.arange(1797))
    assert float(x.min()) == -1 and float(x.max()) == 1
    torch.testing.assert_close(digits.normalizer.from_model(x), digits.images)
    assert to_uint8(x, normalizer=digits.normalizer).max() == 255


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_upsampled(digits, resolution):
    up = DigitsDataset(resolution=resolution, max_size=50)
    assert up.resolution == (resolution, resolution) and len(up) == 50
    assert torch.equal(up.labels, digits.labels[:50])
    x, _ = up.get_batch(torch.arange(50))
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3
    torch.testing.assert_close(up.images.mean(dim=(2, 3)), digits.images[:50].mean(dim=(2, 3)), atol=0.05, rtol=0)
    nearest = DigitsDataset(resolution=resolution, max_size=5, interpolation="nearest")
    factor = resolution // 8
    expected = digits.images[:5].repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    assert torch.equal(nearest.images, expected)


def test_faces_offline():
    pytest.importorskip("skimage")
    faces = build_dataset({"dataset": "faces", "resolution": 32})
    assert len(faces) == 100 and faces.resolution == (32, 32) and faces.labels is None
    x, _ = faces.get_batch(torch.arange(100))
    assert x.min() >= -1 and x.max() <= 1


def test_xflip_doubles_and_mirrors(folder):
    root, _ = folder
    plain, flipped = ImageFolderDataset(root), ImageFolderDataset(root, xflip=True)
    n = len(plain)
    assert len(flipped) == 2 * n and flipped.num_images == n
    for i in range(n):
        torch.testing.assert_close(flipped[i][0], plain[i][0], rtol=0, atol=0)
        torch.testing.assert_close(flipped[i + n][0], plain[i][0].flip(-1), rtol=0, atol=0)
        assert int(flipped[i + n][1]) == int(plain[i][1])
    assert torch.equal(flipped[-1][0], flipped[2 * n - 1][0])
    with pytest.raises(IndexError):
        flipped[2 * n]
    with pytest.raises(IndexError):
        flipped.get_batch(torch.tensor([0, 2 * n]))


@pytest.mark.parametrize("xflip", [False, True])
def test_get_batch_equals_stacked_getitem(digits, xflip):
    ds = DigitsDataset(xflip=xflip, max_size=40)
    indices = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:17]
    images, labels = ds.get_batch(indices)
    items = [ds[int(i)] for i in indices]
    assert images.shape == (17, 1, 8, 8) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(images, torch.stack([x for x, _ in items]))
    assert torch.equal(labels, torch.stack([y for _, y in items]))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    first_images, first_labels = next(iter(loader))
    assert torch.equal(first_images, ds.get_batch(torch.arange(8))[0]) and first_labels.shape == (8,)


def test_resize_and_center_crop_shapes(tmp_path):
    for i in range(3):
        save(tmp_path / "wide" / f"{i}.png", rgb(i, 20, 30))
    wide = tmp_path / "wide"
    assert ImageFolderDataset(wide, resolution=16).resolution == (16, 16)  # stretched
    assert ImageFolderDataset(wide, resolution=[8, 12]).resolution == (8, 12)
    assert ImageFolderDataset(wide, center_crop=True).resolution == (20, 20)
    cropped = ImageFolderDataset(wide, center_crop=True, max_size=1)
    assert torch.equal(cropped.images[0], torch.from_numpy(rgb(0, 20, 30)[:, 5:25]).permute(2, 0, 1))
    assert ImageFolderDataset(wide, resolution=40, center_crop=True).resolution == (40, 40)
    assert crop_box(20, 30, None) == (0, 5, 20, 20)
    assert crop_box(30, 20, (1, 2)) == (10, 0, 10, 20)
    assert crop_box(10, 40, (2, 1)) == (0, 17, 10, 5)
    array = make_array(7, "float32", h=12, w=20)
    np.save(tmp_path / "f.npy", array)
    crop = ArrayDataset(tmp_path / "f.npy", center_crop=True)
    np.testing.assert_array_equal(crop.images.numpy(), array[:, :, :, 4:16])
    assert ArrayDataset(tmp_path / "f.npy", resolution=[6, 10]).resolution == (6, 10)
    assert ArrayDataset(tmp_path / "f.npy", resolution=24, center_crop=True).images.shape == (6, 7, 24, 24)
    np.save(tmp_path / "u.npy", make_array(7, "uint8", h=12, w=20))
    small = ArrayDataset(tmp_path / "u.npy", resolution=6, center_crop=True)
    assert small.images.shape == (6, 7, 6, 6) and small.images.dtype == torch.uint8


@pytest.mark.parametrize("mode", ["minmax", "standardize", "none", "zero_one", "minus_one_one", "auto"])
def test_normalizer_round_trip_float(tmp_path, mode):
    data = make_array(3, "float32")
    if mode in ("zero_one", "minus_one_one"):
        data = (data - data.min()) / (data.max() - data.min())
    np.save(tmp_path / "x.npy", data)
    ds = ArrayDataset(tmp_path / "x.npy", normalize=mode, target_std=0.7)
    x, _ = ds.get_batch(torch.arange(len(ds)))
    torch.testing.assert_close(ds.normalizer.from_model(x), torch.from_numpy(data), atol=1e-5, rtol=0)
    if mode == "minmax":
        assert abs(float(x.min()) + 1) < 1e-6 and abs(float(x.max()) - 1) < 1e-6
    if mode == "standardize":
        torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.full((3,), 0.7), atol=1e-5, rtol=0)
    restored = Normalizer.from_config(json.loads(json.dumps(ds.normalizer.to_config())))
    assert restored == ds.normalizer
    assert torch.equal(restored.to_model(ds.images), x)


@pytest.mark.parametrize("mode", ["auto", "minus_one_one", "zero_one", "minmax", "standardize"])
def test_normalizer_round_trip_uint8(folder, mode):
    root, _ = folder
    ds = ImageFolderDataset(root, normalize=mode)
    x, _ = ds.get_batch(torch.arange(len(ds)))
    back = ds.normalizer.from_model(x)  # [0, 255] floats
    assert (back - ds.images.float()).abs().max() < 0.5
    assert torch.equal(torch.from_numpy(to_uint8(x, normalizer=ds.normalizer)).permute(0, 3, 1, 2), ds.images)
    config = json.loads(json.dumps(ds.normalizer.to_config()))
    assert config["dtype"] == "uint8" and config["value_range"] == [0.0, 255.0]
    assert Normalizer.from_config(config) == ds.normalizer


def test_folder_errors(tmp_path, folder):
    root, _ = folder
    expect_error(lambda: ImageFolderDataset(tmp_path / "nope"), "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    expect_error(lambda: build_dataset({"dataset": "folder", "path": str(tmp_path / "empty")}), "empty", "no images")
    (root / "a" / "bad.png").write_bytes(b"\x89PNG not really")  # not an image: found by the index
    expect_error(lambda: ImageFolderDataset(root, labels=False), "bad.png")
    (root / "a" / "bad.png").unlink()
    # a sound header over damaged data: found when decoded (images are decoded lazily), naming the file
    (root / "a" / "trunc.png").write_bytes((root / "a/one.png").read_bytes()[:200])
    lazy = ImageFolderDataset(root, labels=False)
    expect_error(lambda: lazy.get_batch(torch.arange(lazy.num_images)), "trunc.png")
    (root / "a" / "trunc.png").unlink()
    # dataset.json: missing entry, listed-but-missing file, bad JSON, bad label
    save(root / "extra.png", rgb(9))
    expect_error(lambda: ImageFolderDataset(root), "dataset.json", "extra.png")
    (root / "extra.png").unlink()
    labels_json = root / "dataset.json"
    labels_json.write_text(json.dumps({"labels": [[n, 0] for n in ALL_NAMES] + [["ghost.png", 1]]}))
    expect_error(lambda: ImageFolderDataset(root), "dataset.json", "ghost.png")
    labels_json.write_text("{not json")
    expect_error(lambda: ImageFolderDataset(root), "dataset.json")
    labels_json.write_text(json.dumps({"labels": [[n, "cat"] for n in ALL_NAMES]}))
    expect_error(lambda: ImageFolderDataset(root), "dataset.json", "cat")


def test_mixed_sizes_and_modes(tmp_path):
    save(tmp_path / "sizes" / "a.png", rgb(0, 10, 10))
    save(tmp_path / "sizes" / "b.png", rgb(1, 12, 10))
    expect_error(lambda: ImageFolderDataset(tmp_path / "sizes"), "a.png", "b.png", "resolution")
    assert ImageFolderDataset(tmp_path / "sizes", resolution=8).resolution == (8, 8)
    save(tmp_path / "modes" / "a.png", rgb(0))
    save(tmp_path / "modes" / "b.png", rgb(1)[:, :, 0])
    expect_error(lambda: ImageFolderDataset(tmp_path / "modes"), "a.png", "RGB", "b.png", "L", "channels")
    assert ImageFolderDataset(tmp_path / "modes", channels=3).channels == 3
    gray = ImageFolderDataset(tmp_path / "modes", channels=1)
    assert gray.channels == 1 and torch.equal(gray.images[1, 0], torch.from_numpy(rgb(1)[:, :, 0]))
    expect_error(lambda: ImageFolderDataset(tmp_path / "modes", channels=5), "channels=5")
    Image.fromarray(rgb(2)).convert("P").save(tmp_path / "modes" / "c.png")  # palette counts as RGB
    assert ImageFolderDataset(tmp_path / "modes", max_size=1).channels == 3
    assert ImageFolderDataset(tmp_path / "modes", channels=3).num_images == 3
    save(tmp_path / "deep" / "x.png", (np.arange(100, dtype=np.uint16) * 600).reshape(10, 10))
    expect_error(lambda: ImageFolderDataset(tmp_path / "deep"), "x.png", "mode")


def test_zip_errors(tmp_path):
    expect_error(lambda: ZipImageDataset(tmp_path / "missing.zip"), "missing.zip")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    expect_error(lambda: build_dataset({"dataset": "zip", "path": str(tmp_path / "bad.zip")}), "bad.zip")
    with zipfile.ZipFile(tmp_path / "corrupt.zip", "w") as archive:
        archive.writestr("d/img.png", b"garbage")
    expect_error(lambda: ZipImageDataset(tmp_path / "corrupt.zip"), "corrupt.zip", "d/img.png")
    with zipfile.ZipFile(tmp_path / "labels.zip", "w") as archive:
        archive.writestr("img.png", save(tmp_path / "img.png", rgb(0)).read_bytes())
        archive.writestr("dataset.json", json.dumps({"labels": []}))
    expect_error(lambda: ZipImageDataset(tmp_path / "labels.zip"), "dataset.json", "img.png")
    assert ZipImageDataset(tmp_path / "labels.zip", labels=False).num_images == 1


def test_array_errors(tmp_path):
    def npz(**arrays) -> str:
        path = tmp_path / f"{'_'.join(arrays)}.npz"
        np.savez(path, **arrays)
        return str(path)

    expect_error(lambda: ArrayDataset(tmp_path / "missing.npz"), "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    expect_error(lambda: ArrayDataset(tmp_path / "junk.npz"), "junk.npz")
    (tmp_path / "data.txt").write_text("1")
    expect_error(lambda: ArrayDataset(tmp_path / "data.txt"), "data.txt", ".npy")
    good = make_array(3, "uint8")
    expect_error(lambda: ArrayDataset(npz(images=good), key="nope"), "images.npz", "nope", "images")
    expect_error(lambda: ArrayDataset(npz(images=good), labels_key="y"), "images.npz", "y")
    expect_error(lambda: ArrayDataset(npz(flat=np.zeros((4, 5), np.uint8))), "flat.npz", "ndim 2")
    expect_error(lambda: ArrayDataset(npz(five=np.zeros((2, 1, 3, 4, 4), np.uint8))), "five.npz", "ndim 5")
    expect_error(lambda: ArrayDataset(npz(ints=good.astype(np.int64))), "ints.npz", "int64")
    expect_error(lambda: ArrayDataset(npz(cplx=good.astype(np.complex64))), "cplx.npz", "complex64")
    bad = make_array(2, "float32")
    bad[3, 1, 2, 2] = np.nan
    expect_error(lambda: ArrayDataset(npz(nan=bad)), "nan.npz", "NaN", "item 3")
    bad[3, 1, 2, 2] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    expect_error(lambda: ArrayDataset(tmp_path / "inf.npy"), "inf.npy", "non-finite")
    expect_error(lambda: ArrayDataset(npz(chan=good), channels=4), "chan.npz", "3 channels", "channels=4")
    expect_error(lambda: ArrayDataset(npz(x=good, lab=np.arange(5))), "x_lab.npz")  # two arrays, no key
    expect_error(lambda: ArrayDataset(npz(x=good, lab=np.arange(5)), key="x", labels_key="lab"), "lab", "length 6")
    expect_error(lambda: ArrayDataset(npz(x=good, flab=np.zeros(6)), key="x", labels_key="flab"), "flab", "float64")
    expect_error(lambda: ArrayDataset(npz(x=good, neg=-np.ones(6, int)), key="x", labels_key="neg"), "neg", ">= 0")
    np.save(tmp_path / "one.npy", good)
    expect_error(lambda: ArrayDataset(tmp_path / "one.npy", key="x"), "one.npy", "key")
    expect_error(lambda: ArrayDataset(tmp_path / "one.npy", layout="CHWN"), "one.npy", "CHWN")
    wide = make_array(1, "float32") * 10
    expect_error(lambda: ArrayDataset(npz(wide=wide), normalize="minus_one_one"), "wide.npz", "[0, 1]", "minmax")


def test_build_dataset_config_errors(tmp_path):
    assert set(DATASETS) >= {"digits", "folder", "zip", "npz"} and "max_size" in CONFIG_KEYS
    message = expect_error(lambda: build_dataset({"dataset": "digits", "resoluton": 16}), "resoluton")
    assert all(key in message for key in CONFIG_KEYS)
    expect_error(lambda: build_dataset({"dataset": "cifar10"}), "cifar10", "digits")
    expect_error(lambda: build_dataset({"path": "x"}), "dataset")
    expect_error(lambda: build_dataset({"dataset": "folder"}), "folder", "path")
    expect_error(lambda: build_dataset({"dataset": "digits", "path": "x"}), "path", "digits")
    expect_error(lambda: build_dataset({"dataset": "folder", "path": str(tmp_path), "key": "x"}), "key", "npz")
    expect_error(lambda: build_dataset({"dataset": "digits", "xflip": "yes"}), "xflip")
    expect_error(lambda: build_dataset({"dataset": "digits", "normalize": "unit"}), "normalize", "unit")
    expect_error(lambda: build_dataset({"dataset": "digits", "resolution": [16]}), "resolution")
    expect_error(lambda: build_dataset({"dataset": "digits", "max_size": 0}), "max_size")
    expect_error(lambda: build_dataset({"dataset": "digits", "channels": 3}), "digits", "channels=3")
    expect_error(lambda: build_dataset({"dataset": "digits", "target_std": -1}), "target_std")
    expect_error(lambda: build_dataset({"dataset": "digits", "center_crop": 1}), "center_crop")
    expect_error(lambda: build_dataset({"dataset": "npz", "path": str(tmp_path), "layout": 4}), "layout")
    expect_error(lambda: build_dataset({"dataset": "npz", "path": str(tmp_path / "no.npz")}), "no.npz")
    expect_error(lambda: Normalizer.from_config({"mode": "none", "scale": [1.0], "bias": [0.0], "x": 1}), "'x'")
    expect_error(lambda: Normalizer.from_config({"mode": "none", "scale": [0.0], "bias": [0.0]}), "scale")
    ds = build_dataset({"dataset": "digits", "max_size": 10, "labels": False, "resolution": None})
    assert len(ds) == 10 and ds.labels is None
