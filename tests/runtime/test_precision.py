"""precision: ``auto`` is bf16 only on bf16 hardware; explicit bf16 on other hardware warns once; runs record it."""
import platform
import warnings

import pytest
import torch

from elucidate.config import parse_config
from elucidate.run import RunDir, load_checkpoint
from elucidate.runtime import precision
from elucidate.runtime.precision import autocast_for, native_bf16, resolve_precision
from elucidate.training import Trainer


@pytest.fixture
def cpu_features(monkeypatch):
    """Pretend the CPU has the given features (and forget earlier warnings)."""
    monkeypatch.setattr(precision, "_warned", set())

    def use(**features):
        monkeypatch.setattr(precision, "_cpu_features", lambda: {"cpu_name": "Test CPU", **features})
    return use


@pytest.mark.parametrize("features, native", [({}, False), ({"avx2": True, "avx512_f": True}, False),
                                              ({"avx512_bf16": True}, True), ({"amx_bf16": True}, True)])
def test_auto_is_bf16_exactly_on_bf16_hardware(cpu_features, features, native):
    cpu_features(**features)
    assert native_bf16("cpu") is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32"
    with autocast_for("auto", torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") is native
        y = torch.ones(4, 4) @ torch.ones(4, 4)
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_this_machine_is_read_from_torch():
    # the real probe still answers on x86 (if torch renamed it, the guard would silently say "no bf16" everywhere)
    if platform.machine().lower() in ("x86_64", "amd64"):
        features = precision._cpu_features()
        assert "avx512_bf16" in features and "amx_bf16" in features, sorted(features)
        assert native_bf16("cpu") is bool(features["avx512_bf16"] or features["amx_bf16"])
    assert native_bf16("meta") is False  # a device that is neither a CPU nor CUDA: bf16 is not assumed


def test_explicit_bf16_is_kept_and_warns_once_without_hardware(cpu_features):
    cpu_features(avx2=True)
    with pytest.warns(RuntimeWarning, match="precision bf16 on Test CPU, which has no bf16 hardware"):
        assert resolve_precision("bf16", "cpu") == "bf16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu") == "bf16"  # once per device type
        with autocast_for("bf16", torch.device("cpu")):
            assert torch.is_autocast_enabled("cpu")
    cpu_features(avx512_bf16=True)
    precision._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", "cpu") == "bf16"


def test_unknown_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="precision 'fp8': expected one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", "cpu")


@pytest.mark.parametrize("features, expected", [({}, "fp32"), ({"avx512_bf16": True}, "bf16")])
def test_a_run_with_auto_trains_in_and_records_the_resolved_precision(tiny_config, tmp_path, cpu_features, features,
                                                                      expected):
    cpu_features(**features)
    config = parse_config(tiny_config(training={"steps": 2, "checkpoint_every": 2, "precision": "auto"}))
    assert config.training.precision == "auto"
    lines = []
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lines.append)
    seen = []
    original = trainer.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(*args, **kwargs)
    trainer.model.forward = spy
    trainer.train()
    assert seen and set(seen) == {expected == "bf16"}
    assert any(line.startswith(f"precision auto: {expected} on cpu") for line in lines), lines
    _, meta = load_checkpoint(RunDir(tmp_path / "run").latest_checkpoint())
    assert meta["precision"] == expected
    assert meta["config"]["training"]["precision"] == "auto"  # the config keeps what the user wrote


@pytest.mark.parametrize("features, expected", [({}, "fp32"), ({"amx_bf16": True}, "bf16")])
def test_a_vae_run_with_auto_records_the_resolved_precision(tiny_vae_config, tmp_path, cpu_features, features,
                                                            expected):
    from elucidate.training import train_vae

    cpu_features(**features)
    summary = train_vae(tiny_vae_config(training={"steps": 2, "checkpoint_every": 2, "precision": "auto"}),
                        tmp_path / "vae", progress=False)
    _, meta = load_checkpoint(summary["checkpoint"])
    assert meta["precision"] == expected
