"""``sample --init PATH --strength S`` and ``sample --init PATH --mask PATH``: images, folders and .npz files in, the
known pixels kept exactly, ``--compare`` grids, and one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from elucidate.cli.editing import read_images
from elucidate.data.pixels import to_uint8
from elucidate.run import load_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def inputs(trained_run, tmp_path_factory):
    """Two 8x8 digit PNGs (in a folder, and one alone), the same as sample --out .npz writes, and a top-half mask."""
    root = tmp_path_factory.mktemp("edit")
    run = load_run(trained_run)
    digits = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8).repeat(2, 1, 1, 1)
    digits[1] = digits[1].flip(-1)
    pixels = to_uint8(digits, normalizer=run.normalizer)  # [N, H, W, C]
    (root / "folder").mkdir()
    for i, p in enumerate(pixels):
        Image.fromarray(p[..., 0]).save(root / "folder" / f"{i}.png")
    np.savez(root / "digits.npz", samples=pixels)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255  # keep the top half
    Image.fromarray(mask).save(root / "mask.png")
    np.savez(root / "mask.npz", mask=(mask > 0).astype(np.float32))
    return root, pixels


def _pixels(path) -> np.ndarray:
    with np.load(path) as data:
        return data["samples"]


@pytest.mark.parametrize("init", ["folder", "folder/1.png", "digits.npz"])
@pytest.mark.parametrize("mask", ["mask.png", "mask.npz"])
def test_inpainting_keeps_the_known_pixels_of_every_kind_of_input(trained_run, inputs, cli_main, tmp_path, init, mask):
    root, pixels = inputs
    out = tmp_path / "out.npz"
    code, err = cli_main(["sample", trained_run, "--init", root / init, "--mask", root / mask, "--seeds", "0-2",
                          "--resample", "2", "--steps", "3", "--out", out, "--no-progress"])
    assert code == 0, err
    got = _pixels(out)
    first = 1 if init == "folder/1.png" else 0
    expected = pixels[[first, 1, first] if init == "folder/1.png" else [0, 1, 0]]  # cyclic over the seeds
    assert np.array_equal(got[:, :4], expected[:, :4])  # the kept half, pixel for pixel
    assert not np.array_equal(got[:, 4:], expected[:, 4:])


def test_img2img_strength_zero_returns_the_input_and_one_does_not(trained_run, inputs, cli_main, tmp_path):
    root, pixels = inputs
    for strength in ("0", "1"):
        code, err = cli_main(["sample", trained_run, "--init", root / "digits.npz", "--strength", strength,
                              "--seeds", "0-1", "--out", tmp_path / f"s{strength}.npz", "--no-progress"])
        assert code == 0, err
    assert np.array_equal(_pixels(tmp_path / "s0.npz"), pixels)
    assert not np.array_equal(_pixels(tmp_path / "s1.npz"), pixels)


def test_images_convert_to_model_units_through_the_run_normalizer(trained_run, inputs):
    root, _ = inputs
    run = load_run(trained_run)
    x = read_images(root / "folder", run, "--init")
    assert x.shape == (2, 1, 8, 8)
    assert torch.allclose(x[0], torch.linspace(-1, 1, 64).reshape(1, 8, 8), atol=2 / 255 * 1.01)


def test_compare_writes_input_mask_and_result_side_by_side(trained_run, inputs, cli_main, tmp_path):
    root, _ = inputs
    code, err = cli_main(["sample", trained_run, "--init", root / "folder", "--mask", root / "mask.png", "--seeds",
                          "0-1", "--resample", "1", "--steps", "3", "--compare", "--out", tmp_path / "c.png"])
    assert code == 0, err
    width, height = Image.open(tmp_path / "c.png").size
    assert width > 2.5 * height / 2 and height > 1.5 * width / 3  # 3 columns, 2 rows


@pytest.mark.parametrize(("args", "needle"), [
    (["--strength", "0.5"], "--strength needs --init"),
    (["--init", "{root}/digits.npz"], "needs --strength S"),
    (["--init", "{root}/digits.npz", "--strength", "0.5", "--mask", "{root}/mask.png"], "give one"),
    (["--init", "{root}/digits.npz", "--mask", "{root}/mask.png", "--sampler", "dpmpp_2m"], "multistep"),
    (["--init", "{root}/nothing.png", "--strength", "0.5"], "no such file"),
    (["--init", "{root}/mask.npz", "--strength", "0.5"], "expected uint8 pixels"),
    (["--init", "{root}/digits.npz", "--mask", "{root}/digits.npz"], "expected [8, 8], [1, 8, 8] or [N, 1, 8, 8]"),
    (["--init", "{root}/digits.npz", "--strength", "0.5", "--compare", "--out", "{root}/x.npz"], "must be a .png"),
])
def test_editing_errors_are_one_line(trained_run, inputs, cli_main, tmp_path, args, needle):
    root, _ = inputs
    code, err = cli_main(["sample", trained_run, "--out", tmp_path / "x.png",
                          *[a.format(root=root) for a in args]])
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x.png").exists()
