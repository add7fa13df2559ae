"""precision fp16 (autocast + loss scaling, its state resumed bit-exactly) and training.compile / --compile
(torch.compile with a one-warning fallback to eager that never changes the checkpoint)."""
from __future__ import annotations

import warnings

import pytest
import torch

from elucidate.config import parse_config
from elucidate.errors import UserError
from elucidate.run import RunDir, load_checkpoint
from elucidate.runtime import compile as compile_module
from elucidate.runtime.compile import CompiledOrEager, compiled
from elucidate.runtime.precision import autocast_for, grad_scaler, resolve_precision
from elucidate.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fp16_is_autocast_in_half_and_never_chosen_by_auto():
    assert resolve_precision("fp16", "cpu") == "fp16"
    assert resolve_precision("auto", "cpu") in ("fp32", "bf16")
    with autocast_for("fp16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    assert grad_scaler("fp16", "cpu").is_enabled()
    assert not grad_scaler("fp32", "cpu").is_enabled() and not grad_scaler("bf16", "cpu").is_enabled()


def train(tiny_config, path, steps, **training):
    config = parse_config(tiny_config(training={"steps": steps, "checkpoint_every": 2, "sample_every": 0,
                                                 "log_every": 2, **training}))
    trainer = Trainer(config, path, progress=False, log=lambda *_: None)
    return trainer, trainer.train()


def test_fp16_trains_with_a_scaler_and_resumes_bit_exactly(tiny_config, tmp_path):
    trainer, _ = train(tiny_config, tmp_path / "full", 4, precision="fp16")
    assert trainer.scaler.is_enabled()
    seen = []
    original = trainer.model.forward

    def spy(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)
    trainer.model.forward = spy
    trainer.optimizer_step(4)
    assert seen == [torch.float16]

    train(tiny_config, tmp_path / "part", 2, precision="fp16")
    train(tiny_config, tmp_path / "part", 4, precision="fp16")  # resumed from step 2
    (a, meta_a), (b, meta_b) = (load_checkpoint(RunDir(tmp_path / d).latest_checkpoint()) for d in ("full", "part"))
    assert meta_a["step"] == meta_b["step"] == 4 and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert meta_a["grad_scaler"] == meta_b["grad_scaler"] and meta_a["grad_scaler"]["scale"] > 0
    assert meta_a["precision"] == "fp16" and meta_a["skipped_steps"] == meta_b["skipped_steps"]


def test_an_overflowing_fp16_step_is_skipped_and_backs_the_scale_off(tiny_config, tmp_path):
    config = parse_config(tiny_config(training={"steps": 4, "precision": "fp16"}))
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda *_: None)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # scaled fp32 gradients overflow
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    result, applied = trainer.train_step(0)
    assert not applied and trainer.scaler.get_scale() == 2.0 ** 126
    for key, value in trainer.net.state_dict().items():
        assert torch.equal(value, before[key]), key
    trainer.close()


def test_the_scaler_state_is_saved_and_restored(tiny_config, tmp_path):
    config = parse_config(tiny_config(training={"steps": 4, "precision": "fp16"}))
    trainer = Trainer(config, tmp_path / "run", progress=False, log=lambda *_: None)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)  # not the defaults
    assert trainer.train_step(0)[1]
    trainer.step = 1
    trainer.save()
    state = trainer.scaler.state_dict()
    trainer.close()
    assert state["scale"] == 1024.0 and state["_growth_tracker"] == 1 and state["growth_interval"] == 3
    resumed = Trainer(config, tmp_path / "run", progress=False, log=lambda *_: None)
    assert resumed.step == 1 and resumed.scaler.state_dict() == state
    resumed.close()


def test_fp16_is_refused_by_the_autoencoder_trainer(tiny_vae_config, tmp_path):
    from elucidate.config.vae import parse_vae_config
    from elucidate.training.vae import VAETrainer
    config = parse_vae_config(tiny_vae_config(training={"precision": "fp16"}))
    with pytest.raises(UserError, match="fp16 is not supported by train-vae"):
        VAETrainer(config, tmp_path / "vae", progress=False, log=lambda *_: None)


class Broken:
    """What a torch.compile that fails on the first call returns."""

    def __init__(self, module, **options):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise RuntimeError("backend compiler failed\nwith a long traceback")


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    monkeypatch.setattr(compile_module.torch, "compile", Broken)
    net = torch.nn.Linear(3, 2)
    wrapped = compiled(net)
    assert wrapped.is_compiled and wrapped.in_features == 3  # the network's attributes show through
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match=r"^torch.compile failed for Linear \(RuntimeError: backend compiler "
                                            r"failed\); running it eagerly$"):
        y = wrapped(x)
    assert torch.equal(y, net(x)) and not wrapped.is_compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only: later calls are eager without a word
        assert torch.equal(wrapped(x), net(x))
    assert list(wrapped.state_dict()) == ["module." + k for k in net.state_dict()]


def test_compile_that_raises_at_once_is_eager_too(monkeypatch):
    def refuse(module, **options):
        raise RuntimeError("no backend")
    monkeypatch.setattr(compile_module.torch, "compile", refuse)
    with pytest.warns(RuntimeWarning, match="torch.compile failed for Linear"):
        wrapped = compiled(torch.nn.Linear(3, 2))
    assert not wrapped.is_compiled and wrapped(torch.ones(1, 3)).shape == (1, 2)


def test_training_compile_keeps_the_checkpoint_and_the_weights(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module.torch, "compile", Broken)
    plain, _ = train(tiny_config, tmp_path / "plain", 2)
    with pytest.warns(RuntimeWarning, match="torch.compile failed") as record:
        trainer, _ = train(tiny_config, tmp_path / "compiled", 2, compile=True)
    assert sum("torch.compile" in str(w.message) for w in record) == 1
    assert isinstance(trainer.denoiser.net, CompiledOrEager) and trainer.modules["net"] is trainer.net
    (a, _), (b, _) = (load_checkpoint(RunDir(tmp_path / d).latest_checkpoint()) for d in ("plain", "compiled"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sample_compile_flag(trained_run, cli_main, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_module.torch, "compile", Broken)
    out = tmp_path / "grid.png"
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        code, *_ = cli_main(["sample", trained_run, "--seeds", "0-1", "--out", out, "--compile", "--no-progress"])
    assert code == 0 and out.exists()


def test_real_compile_of_a_tiny_network_matches_eager():  # ~7 s on one CPU thread (torch 2.13)
    from elucidate.nets import build_network
    torch.manual_seed(0)
    net = build_network("unet", img_resolution=8, in_channels=1, model_channels=8, channel_mult=(1, 2),
                        num_blocks=1).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.randn(2)
    wrapped = compiled(net)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y = wrapped(x, c)  # compiled where this torch can, else eager with a warning: equal either way
    fell_back = [str(w.message) for w in record if "torch.compile failed" in str(w.message)]
    assert wrapped.is_compiled != bool(fell_back), fell_back
    torch.testing.assert_close(y, net(x, c), rtol=1e-4, atol=1e-5)


def test_fp16_sampling_runs_the_network_in_half_and_keeps_a_float32_state(trained_run):
    from elucidate.run import load_run
    run = load_run(trained_run)
    seen = []

    def record(module, args, out):
        half = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
        seen.append((half, args[0].dtype))
    fp32 = run.sample(range(2), precision="fp32")
    hook = run.denoiser.net.register_forward_hook(record)
    fp16 = run.sample(range(2), precision="fp16")
    hook.remove()
    assert seen and all(half for half, _ in seen)  # the network under fp16 autocast ...
    assert all(x == torch.float32 for _, x in seen) and fp16.dtype == torch.float32  # ... the solver in float32
    assert torch.isfinite(fp16).all() and 0 < (fp16 - fp32).abs().max() < 0.1
