"""The configuration fitted to the data and the machine (``elucidate train --data``, ``elucidate init``):
the rules on a given step time, the YAML round trip, one real timing probe, and the two commands end to end."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from elucidate.config import parse_config
from elucidate.training import fit

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """12 RGB photos of 10x14 (non-square, odd-sized) in a folder."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8)).save(root / f"p{i}.png")
    return root


@pytest.fixture
def step_time(monkeypatch):
    """``step_time(seconds_by_width)``: the timing probe answers from the table (no training steps)."""
    def install(table: dict[int, float]):
        calls = []

        def fake(raw, dataset, device, log, steps=8):
            calls.append(raw["network"]["model_channels"])
            return table[raw["network"]["model_channels"]]
        monkeypatch.setattr(fit, "_time_steps", fake)
        return calls
    return install


@pytest.mark.parametrize("side, limit, expected", [(8, 32, 8), (28, 32, 28), (25, 32, 24), (30, 32, 28),
                                                   (26, 32, 24), (64, 32, 32), (64, 64, 64), (5, 32, 8)])
def test_training_side(side, limit, expected):
    assert fit._fit_side(side, limit) == expected


def test_fit_reads_the_data_and_explains_each_choice(photos, step_time):
    calls = step_time({32: 0.05})
    lines = []
    fitted = fit.fit_config(photos, minutes=2, device="cpu", log=lines.append)
    assert calls == [32]
    assert lines[0].startswith(f"data: 12 images from {photos} (folder), 10x14 -> 8x8, 3 channels (RGB), uint8")
    assert lines[1].startswith("machine: cpu")
    data, t = fitted.raw["data"], fitted.raw["training"]
    assert data["resolution"] == 8 and data["center_crop"] is True
    assert t["batch_size"] == 12  # fewer images than a batch: all of them every step
    assert t["steps"] == int(2 * 60 * fit.SHARE_TRAINING / 0.05) - fit.GRIDS * 12
    images = t["steps"] * t["batch_size"]
    assert abs(t["lr_rampup"] - images / 10) <= images / 100 and t["ema_halflife"] == t["lr_rampup"]
    assert t["augment"] == {"p": 0.12}  # 12 images seen thousands of times each
    assert t["checkpoint_every"] == min(t["steps"], round(120 / 0.05))
    assert fitted.config.training.steps == t["steps"]
    assert fitted.dataset is not None and fitted.dataset.resolution == (8, 8)
    for key in ("data.resolution", "data.center_crop", "training.steps", "training.lr_rampup",
                "network.model_channels", "diffusion.sigma_data", "training.augment"):
        assert key in fitted.reasons, key
    text = "\n".join(fitted.lines())
    assert "training.steps = " in text and "# 2 minutes" in text
    assert any("memorize" in n for n in fitted.notes)


def test_the_yaml_is_the_configuration_with_its_reasons(photos, step_time):
    step_time({32: 0.1})
    fitted = fit.fit_config(photos, minutes=1, device="cpu", log=lambda *a: None)
    text = fitted.yaml()
    assert yaml.safe_load(text) == fitted.raw
    assert parse_config(yaml.safe_load(text)) == fitted.config
    assert "# 1 minutes x 85% at 100 ms" in text and text.startswith("# Fitted by `elucidate init`")
    assert fitted.raw["training"]["steps"] == 474 and "augment" not in fitted.raw["training"]
    assert any("expect near-copies" in n for n in fitted.notes)  # 474 passes over 12 images: the user is told
    assert "# note: each image is seen ~474 times" in text


def test_a_slow_machine_gets_a_narrower_network_and_a_fast_one_a_wider(photos, step_time):
    calls = step_time({32: 1.0, 16: 0.3})
    fitted = fit.fit_config(photos, minutes=5, device="cpu", log=lambda *a: None)
    assert calls == [32, 16] and fitted.raw["network"]["model_channels"] == 16
    assert "fewer than 400" in fitted.reasons["network.model_channels"]

    calls = step_time({32: 1.0, 16: 0.95})  # the width is not where the time goes: keep 32
    fitted = fit.fit_config(photos, minutes=5, device="cpu", log=lambda *a: None)
    assert calls == [32, 16] and fitted.raw["network"]["model_channels"] == 32
    assert any("--minutes" in n for n in fitted.notes)  # and the user hears that the budget is short

    calls = step_time({32: 0.002, 64: 0.004})
    fitted = fit.fit_config(photos, minutes=5, device="cpu", log=lambda *a: None)
    assert calls == [32, 64] and fitted.raw["network"]["model_channels"] == 64
    assert fitted.raw["training"]["lr"] == fit.LR / 2


def test_a_folder_of_mixed_sizes_and_modes_is_fitted_to_one_size_in_rgb(tmp_path, step_time):
    step_time({32: 0.05})
    Image.new("L", (20, 12)).save(tmp_path / "a.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.png")
    fitted = fit.fit_config(tmp_path, minutes=1, device="cpu", log=lambda *a: None)
    data = fitted.raw["data"]
    assert (data["resolution"], data["center_crop"], data["channels"]) == (32, True, 3)
    assert "mixed sizes" in fitted.reasons["data.resolution"] and "data.channels" in fitted.reasons
    from elucidate.data import build_dataset

    assert build_dataset(data).images.shape[1:] == (3, 32, 32)  # training loads what the fit saw


def test_bad_inputs_are_one_line_errors(tmp_path):
    from elucidate.errors import UserError

    with pytest.raises(UserError, match="no such folder or file"):
        fit.fit_config(tmp_path / "missing", minutes=1)
    with pytest.raises(UserError, match="--minutes 0"):
        fit.fit_config("digits", minutes=0)


def test_the_probe_times_real_training_steps(photos):
    fitted_raw = {"data": {"dataset": "folder", "path": str(photos), "resolution": 8, "center_crop": True},
                  "network": {"arch": "unet", "model_channels": 8, "channel_mult": [1, 2]},
                  "training": {"batch_size": 4, "lr": 1e-3, "steps": 10}}
    from elucidate.data import build_dataset

    dataset = build_dataset(fitted_raw["data"])
    seconds = fit._time_steps(fitted_raw, dataset, __import__("torch").device("cpu"), lambda *a: None, steps=2)
    assert 0 < seconds < 5


def test_init_then_train_and_train_from_data(photos, step_time, tmp_path, capsys, monkeypatch):
    from elucidate.cli import main

    def cli(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    monkeypatch.chdir(tmp_path)
    step_time({32: 0.05})
    code, out, err = cli("init", photos, "--out", "config.yaml", "--minutes", "1")
    assert code == 0, err
    assert f"data: 12 images from {photos} (folder), 10x14 -> 8x8" in out and "training.steps = " in out
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["data"]["path"] == str(photos) and written["data"]["resolution"] == 8
    code, out, err = cli("init", photos, "--out", "config.yaml")
    assert code == 2 and "--force" in err

    tiny = ["--set", "training.steps=2", "--set", "training.sample_every=0"]
    code, out, err = cli("train", "--data", photos, "--out", "run", "--minutes", "1", "--no-progress", *tiny)
    assert code == 0, err
    assert "data: 12 images" in out and "# 1 minutes x 85%" in out
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["training"]["steps"] == 2 and stored["data"]["resolution"] == 8
    code, out, err = cli("train", "--data", photos, "--out", "run", "--no-progress", "--set", "training.steps=3")
    assert code == 0, err
    assert out.startswith("resuming run with its stored configuration") and "trained to step 3" in out

    code, out, err = cli("train", "config.yaml", "--out", "run2", *tiny, "--no-progress")
    assert code == 0, err
    assert f"data: 12 images from {photos}, 8x8, 3 channels, uint8" in out  # a config's data is described too

    code, out, err = cli("train", "--out", "run3")
    assert code == 2 and "--data PATH" in err
    code, out, err = cli("train", "config.yaml", "--data", photos, "--out", "run3")
    assert code == 2 and "not both" in err
