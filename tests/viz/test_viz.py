"""elucidate.viz: every plot renders to a non-trivial PNG; grids map values exactly; recorders count steps."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from elucidate import GaussianMixture
from elucidate.sampling import heun, karras_sigmas
from elucidate.viz import (
    TrajectoryRecorder,
    default_alpha_bar_curves,
    flow_paths,
    image_grid,
    loss_by_sigma_stages,
    plot_alpha_bar,
    plot_flow,
    plot_flow_comparison,
    plot_loss,
    plot_loss_by_sigma,
    plot_quality_vs_nfe,
    plot_schedules,
    plot_trajectory,
    quality_series,
    read_metrics,
    save_figure,
    save_image_grid,
    to_uint8,
)
from elucidate.viz.common import new_figure


def check_png(path: Path, min_width: int = 300, min_height: int = 200) -> np.ndarray:
    """Reload a written PNG: big enough and not a single flat colour."""
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_width and im.height >= min_height, im.size
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10.0, "the image is (nearly) a flat colour"
    assert not list(path.parent.glob(f".{path.name}.*")), "temporary file left behind"
    return pixels


# --- grids ---------------------------------------------------------------------------------------
def test_image_grid_float_exact_mapping_and_layout():
    # four 2x2 grey images with known values; -1 -> 0, 0 -> 128, 0.5 -> 191, 1 -> 255, NaN -> 0
    base = torch.tensor([[-1.0, 0.0], [0.5, 1.0]])
    images = torch.stack([base, -base, base.flip(0), torch.full((2, 2), 7.0)])[:, None]
    grid = image_grid(images, pad=1, pad_value=33)
    assert grid.shape == (7, 7, 1) and grid.dtype == np.uint8
    expected = [[[0, 128], [191, 255]], [[255, 128], [64, 0]], [[191, 255], [0, 128]], [[255, 255], [255, 255]]]
    for k, tile in enumerate(expected):
        r, c = divmod(k, 2)
        np.testing.assert_array_equal(grid[1 + 3 * r:3 + 3 * r, 1 + 3 * c:3 + 3 * c, 0], tile)
    assert (grid[0] == 33).all() and (grid[:, 3] == 33).all() and (grid[-1] == 33).all()
    assert to_uint8(torch.tensor([[[[float("nan")]]]]))[0, 0, 0, 0] == 0


def test_image_grid_uint8_rgb_nrow_and_scale():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 2, 3, 3), dtype=np.uint8)  # [N, H, W, C]
    grid = image_grid(images, nrow=2, pad=2, pad_value=0)
    assert grid.shape == (3 * 2 + 4 * 2, 2 * 3 + 3 * 2, 3)  # 3 rows x 2 columns of 2x3 tiles
    np.testing.assert_array_equal(grid[2:4, 7:10], images[1])
    np.testing.assert_array_equal(grid[10:12, 2:5], images[4])
    assert (grid[10:12, 7:10] == 0).all()  # the empty sixth cell
    big = image_grid(images[:1], pad=0, scale=3)
    assert big.shape == (6, 9, 3)
    np.testing.assert_array_equal(big[::3, ::3], images[0])
    np.testing.assert_array_equal(big[2::3, 2::3], images[0])


def test_image_grid_multichannel_rows_of_colormapped_panels():
    images = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])  # C = 3 stays RGB
    assert image_grid(images).shape[-1] == 3
    fields = torch.zeros(2, 4, 2, 2)  # N = 2 samples, C = 4 channels
    fields[0, 1], fields[1, 2] = -1.0, 1.0
    grid = image_grid(fields, pad=1, pad_value=255)
    assert grid.shape == (2 * 2 + 3, 4 * 2 + 5, 3)  # one row of 4 channel panels per sample
    lut = matplotlib.colormaps["viridis"](np.array([0.0, 1.0]))[:, :3] * 255
    np.testing.assert_allclose(grid[1, 4], lut[0], atol=1)  # sample 0, channel 1 = -1
    np.testing.assert_allclose(grid[4, 7], lut[1], atol=1)  # sample 1, channel 2 = +1
    assert (grid[1:3, 1:3] == grid[4:6, 1:3]).all()  # channel 0 = 0 in both samples
    assert (grid[:, 3] == 255).all()  # padding between panels


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError):
        image_grid(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        image_grid(torch.zeros(0, 1, 4, 4))
    with pytest.raises(ValueError):
        image_grid(torch.zeros(1, 1, 4, 4), scale=0)


def test_save_image_grid_upscales_tiny_digits(tmp_path):
    digits = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = save_image_grid(digits, tmp_path / "grid.png")
    with Image.open(path) as im:
        assert im.mode == "L" and im.size == (4 * 64 + 5, 4 * 64 + 5)  # auto scale 8
    check_png(path, 200, 200)


# --- trajectories --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_mixture() -> GaussianMixture:
    patterns = torch.full((3, 8, 8), -1.0)
    patterns[0, 1:7, 3:5] = 1
    patterns[1, 3:5, 1:7] = 1
    patterns[2, 1:7, 1:7], patterns[2, 2:6, 2:6] = 1, -1
    return GaussianMixture(patterns.reshape(3, -1), torch.full((3,), 0.1))


def test_trajectory_recorder_counts_heun_steps(image_mixture):
    steps = 12
    sigmas = karras_sigmas(steps)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 80
    rec = TrajectoryRecorder(max_images=3)
    out = heun(image_mixture, x, sigmas, callback=rec)
    assert len(rec) == steps and rec.steps == list(range(steps))
    np.testing.assert_allclose(rec.sigmas, sigmas[:-1].tolist())
    assert all(t.shape == (3, 1, 8, 8) and t.dtype == torch.float32 and t.device.type == "cpu"
               for t in rec.xs + rec.denoised)
    assert torch.equal(rec.xs[0], x[:3].float())  # a copy of x_0, not aliased to the solver state
    rec.finish(out)
    assert len(rec) == steps + 1 and rec.sigmas[-1] == 0.0 and torch.equal(rec.xs[-1], rec.denoised[-1])
    xs, ds = rec.stacked()
    assert xs.shape == ds.shape == (steps + 1, 3, 1, 8, 8)


def test_plot_trajectory(tmp_path, image_mixture):
    rec = TrajectoryRecorder()
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 80
    rec.finish(heun(image_mixture, x, karras_sigmas(10), callback=rec))
    fig = plot_trajectory(rec, num_columns=6, max_images=2)
    assert len(fig.axes) == 2 * 2 * 6
    check_png(save_figure(fig, tmp_path / "trajectory.png"))
    assert not fig.axes  # save_figure closed (cleared) the figure


# --- schedules -----------------------------------------------------------------------------------
def test_plot_schedules_and_alpha_bar(tmp_path):
    check_png(save_figure(plot_schedules(num_steps=18), tmp_path / "schedules.png"), 800, 300)
    curves = default_alpha_bar_curves()
    assert set(len(a) for a in curves.values()) == {1000}
    for a in curves.values():
        assert np.all(np.diff(a) < 0) and 0 < a[-1] < a[0] <= 1
    ddpm, cosine, vp = curves.values()
    assert np.abs(np.sqrt(ddpm) - np.sqrt(vp)).max() < 0.01  # VP is DDPM's continuous limit
    t = np.arange(1, 1001) / 1000
    classic = np.cos(0.5 * np.pi * (t + 0.008) / 1.008) ** 2 / np.cos(0.5 * np.pi * 0.008 / 1.008) ** 2
    assert np.abs(cosine[:-50] - classic[:-50]).max() < 1e-3
    check_png(save_figure(plot_alpha_bar(curves), tmp_path / "alpha_bar.png"), 800, 300)


# --- 1-D flows -----------------------------------------------------------------------------------
def test_flow_paths_ode_is_order_preserving_and_reaches_the_modes():
    mixture = GaussianMixture([[-1.0], [1.0]], [0.1, 0.1])
    sigmas, paths, labels = flow_paths(mixture, "ode", 10, sigma_max=3.0, num_steps=64)
    assert sigmas[0] == 0 and math.isclose(sigmas[-1], 3.0) and np.all(np.diff(sigmas) > 0)
    assert paths.shape == (len(sigmas), 10)
    assert np.all(np.diff(paths, axis=1) > 0)  # quantile starts stay ordered: flow lines never cross
    assert np.all(np.abs(np.abs(paths[0]) - 1) < 0.35) and sorted(labels) == [0] * 5 + [1] * 5
    sigmas, paths, labels = flow_paths(mixture, "forward", 6, num_steps=32)
    assert sigmas[0] == 0 and np.all(np.abs(np.abs(paths[0]) - 1) < 0.5)
    with pytest.raises(ValueError):
        flow_paths(GaussianMixture([[0.0, 0.0]], [1.0]), "ode", 4)


@pytest.mark.parametrize("kind", ["ode", "sde", "forward"])
def test_plot_flow(tmp_path, kind):
    fig = plot_flow(kind=kind, num_paths=8, num_steps=48)
    check_png(save_figure(fig, tmp_path / f"flow_{kind}.png"), 800, 300)


def test_plot_flow_log_axis_and_comparison(tmp_path):
    check_png(save_figure(plot_flow(kind="ode", sigma_axis="log", sigma_max=20.0, num_paths=8, num_steps=48),
                          tmp_path / "flow_log.png"), 800, 300)
    check_png(save_figure(plot_flow_comparison(num_steps=40, num_paths=6), tmp_path / "flows.png"), 1200, 300)


# --- training curves -----------------------------------------------------------------------------
EDGES = [0.002, 0.02, 0.2, 2.0, 20.0, 80.0]


def training_line(step: int, loss: float, by_sigma=None, counts=None) -> str:
    return json.dumps({"step": step, "kimg": step * 0.064, "loss": loss, "lr": 1e-3, "images_per_sec": 800.0,
                       "seconds": step * 0.1, "sigma_edges": EDGES,
                       "loss_by_sigma": by_sigma or [1.0, 0.8, 0.5, 0.7, 0.95],
                       "count_by_sigma": counts or [5, 20, 40, 20, 5], "skipped_steps": 0})


def test_read_metrics_ignores_events_and_truncated_tail(tmp_path):
    lines = [training_line(100, 0.9), json.dumps({"event": "sample", "step": 100, "path": "x.png"}),
             training_line(200, 0.8), "[1, 2]", training_line(300, 0.7),
             json.dumps({"event": "resume", "step": 200}), training_line(300, 0.65), training_line(400, 0.6)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + '\n{"step": 500, "loss": 0.')
    records = read_metrics(path)
    assert [r["step"] for r in records] == [100, 200, 300, 400]
    assert records[2]["loss"] == 0.65  # the resumed run's line replaces the old step 300
    path.write_text(training_line(1, 1.0) + "\n{garbage\n" + training_line(2, 0.9) + "\n")
    with pytest.warns(UserWarning, match="not valid JSON"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_loss_by_sigma_stages_count_weighted():
    records = [json.loads(training_line(s, 1.0, [1.0, 2.0, None, 0.5, 0.5], [1, 1, 0, 1, 1])) for s in (1, 2)]
    records += [json.loads(training_line(3, 1.0, [3.0, 4.0, None, 0.5, 0.5], [3, 1, 0, 1, 1]))]
    edges, stages, total = loss_by_sigma_stages(records, num_stages=1)
    assert list(edges) == EDGES and list(total) == [5, 3, 0, 3, 3]
    (label, mean), = stages
    assert "steps 1–3" in label
    np.testing.assert_allclose(mean[[0, 1, 3]], [(1 + 1 + 9) / 5, (2 + 2 + 4) / 3, 0.5])
    assert np.isnan(mean[2])


def test_plot_loss_and_loss_by_sigma(tmp_path):
    rng = np.random.default_rng(0)
    records = []
    for k in range(60):
        by_sigma = list(np.array([1.0, 0.8, 0.5, 0.7, 0.95]) * (1 - 0.3 * k / 60) + rng.normal(0, 0.01, 5))
        records.append(json.loads(training_line(10 * (k + 1), math.exp(-k / 30) + 0.2 + rng.normal(0, 0.02),
                                                by_sigma)))
    check_png(save_figure(plot_loss(records), tmp_path / "loss.png"))
    check_png(save_figure(plot_loss_by_sigma(records), tmp_path / "loss_by_sigma.png"))
    with pytest.raises(ValueError):
        plot_loss([])


def test_plot_quality_vs_nfe(tmp_path):
    table = [{"sampler": s, "steps": str(n), "value": str(10 / n + (1 if s == "euler" else 0.5))}
             for s in ("euler", "heun") for n in (4, 8, 16, 32)]
    series = quality_series(table)
    assert list(series["heun"][0]) == [7, 15, 31, 63] and list(series["euler"][0]) == [4, 8, 16, 32]
    check_png(save_figure(plot_quality_vs_nfe(table, "fd_digits"), tmp_path / "quality.png"))


# --- plumbing ------------------------------------------------------------------------------------
def test_save_figure_is_atomic_and_formats_by_suffix(tmp_path):
    fig = new_figure(2, 2)
    fig.subplots().plot([0, 1], [1, 0])
    target = tmp_path / "sub" / "plot.svg"
    save_figure(fig, target)
    assert target.read_text().lstrip().startswith("<?xml") and list(target.parent.iterdir()) == [target]


def test_viz_never_imports_pyplot(env):
    code = ("import sys; import elucidate.viz as v; v.figure_to_png(v.plot_schedules(4)); "
            "print('matplotlib.pyplot' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
