"""Consistency distillation (cd) and easy consistency tuning (ect) of a trained run (docs/distillation.md): one step's
loss by hand, distillation of an exact Gaussian mixture's ODE into a one-step sampler, bit-exact resume (fp16 too),
the command line end to end and its bad inputs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from elucidate import Denoiser
from elucidate.errors import UserError
from elucidate.formulations import EDM, Consistency
from elucidate.run import RunDir, load_checkpoint
from elucidate.run.model import load_run, resolve_checkpoint
from elucidate.runtime.rng import derive_seed, derived_generator
from elucidate.training.distill import (
    DistillTrainer,
    cd_levels,
    consistency_distance,
    distill,
    distill_config,
    teacher_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def quiet(*args, **kwargs):
    pass


def trainer_for(trained_run, out: Path, method: str, overrides=(), epsilon=0.002) -> DistillTrainer:
    ckpt = resolve_checkpoint(trained_run)
    teacher = load_run(ckpt, device="cpu")
    config = distill_config(teacher.config, ckpt, method, steps=4, epsilon=epsilon if method == "cd" else 0.0,
                            dim=64, overrides=list(overrides))
    trainer = DistillTrainer(config, out, device="cpu", progress=False, log=quiet)
    ema = {k: v.clone() for k, v in teacher.denoiser.net.state_dict().items()}
    trainer.start_from({"net": ema, "ema": ema}, source="test")
    return trainer


# ------------------------------------------------------------------------------------------------ one step by hand
def test_one_cd_step_loss_is_the_hand_computation(trained_run, tmp_path):
    # dropout on, so the test also checks that student and target share one dropout mask
    trainer = trainer_for(trained_run, tmp_path / "cd", "cd", ["network.dropout=0.3"])
    try:
        y, cond, _, z = trainer._batch(0)
        B = y.shape[0]
        g = derived_generator(trainer.t.seed, "distill", 0)
        n = torch.randint(0, 17, (B,), generator=g)
        f = Consistency(epsilon=0.002)  # the teacher is EDM with defaults
        levels = torch.tensor([(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)],
                              dtype=torch.float64).flip(0)  # EDM eq. 5, ascending
        assert torch.allclose(cd_levels(f, 18), levels, rtol=1e-12)
        s, s_to = levels[n + 1].float(), levels[n].float()
        teacher = Denoiser(load_run(resolve_checkpoint(trained_run)).denoiser.net, EDM()).eval()
        x = y + s[:, None, None, None] * z
        with torch.no_grad():
            Dx = teacher(x, s, **cond)
            d = (x - Dx) / s[:, None, None, None]
            x_e = x + (s_to - s)[:, None, None, None] * d
            d2 = (x_e - teacher(x_e, s_to, **cond)) / s_to[:, None, None, None]
            x_hat = x + (s_to - s)[:, None, None, None] * (d + d2) / 2  # Heun (EDM Algorithm 1)
            student = Denoiser(trainer.net, f).train()
            torch.manual_seed(derive_seed(trainer.t.seed, "dropout", 0, 0, 0))
            pred = student(x, s, **cond)
            torch.manual_seed(derive_seed(trainer.t.seed, "dropout", 0, 0, 0))
            target = student(x_hat, s_to, **cond)
        expected = (pred - target).square().mean(dim=(1, 2, 3))
        (losses, sigma), applied = trainer.optimizer_step(0)
        assert applied and torch.equal(sigma, s)
        assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-10), (losses, expected)
        assert expected.sum() > 0
    finally:
        trainer.close()


def test_one_ect_step_loss_is_the_hand_computation(trained_run, tmp_path):
    trainer = trainer_for(trained_run, tmp_path / "ect", "ect",
                          ["network.dropout=0.3", "distill.double=2", "distill.p_mean=0.5"])
    step = 1  # stage 1 // 2 = 0: r = t (1 - (1/2)^1 (1 + 8 sigmoid(-t))), 0 where t < ln 7
    try:
        y, cond, _, z = trainer._batch(step)
        B = y.shape[0]
        g = derived_generator(trainer.t.seed, "distill", step)
        t = (torch.randn(B, generator=g) * 2.0 + 0.5).exp()
        r = (t * (1 - 0.5 * (1 + 8 / (1 + torch.exp(t))))).clamp(min=0)
        assert (r == 0).any() and (r > 0).any()  # both branches of the target
        f = Denoiser(trainer.net, EDM()).train()
        with torch.no_grad():
            torch.manual_seed(derive_seed(trainer.t.seed, "dropout", step, 0, 0))
            pred = f(y + t[:, None, None, None] * z, t, **cond)
            torch.manual_seed(derive_seed(trainer.t.seed, "dropout", step, 0, 0))
            r_eval = torch.where(r > 0, r, t)
            target = f(y + r_eval[:, None, None, None] * z, r_eval, **cond)
        target = torch.where((r > 0)[:, None, None, None], target, y)
        expected = (pred - target).square().sum(dim=(1, 2, 3)).sqrt() / (t - r)  # ECT: ||.|| / (t - r), c = 0
        (losses, sigma), applied = trainer.optimizer_step(step)
        assert applied and torch.equal(sigma, t)
        assert torch.allclose(losses, expected, rtol=1e-5), (losses, expected)
    finally:
        trainer.close()


def test_consistency_distance():
    a, b = torch.zeros(2, 1, 2, 2), torch.tensor([3.0, 4.0, 0.0, 0.0]).reshape(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert torch.allclose(consistency_distance(a, b, "l2"), torch.full((2,), 25 / 4))
    assert torch.allclose(consistency_distance(a, b, "pseudo_huber", 0.0), torch.full((2,), 5.0))
    assert torch.allclose(consistency_distance(a, b, "pseudo_huber", 12.0), torch.full((2,), 13.0 - 12.0))


# ------------------------------------------------------------------------------------------------ it learns
class MLP(nn.Module):
    def __init__(self, d: int = 4, h: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + 1, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h),
                                 nn.SiLU(), nn.Linear(h, d))

    def forward(self, x, c_noise, **cond):
        return self.net(torch.cat([x, c_noise.reshape(-1, 1).expand(x.shape[0], 1)], 1))


def test_cd_of_an_exact_mixture_ode_gives_one_step_samples_with_its_weights(gmm):
    # the teacher's ODE is exact (the mixture's own denoiser); a small MLP student, distilled from scratch for 1500
    # steps (about 10 s), maps sigma_max noise to the components in the mixture's proportions (0.5, 0.3, 0.2)
    torch.manual_seed(0)
    f = Consistency(sigma_data=0.6)
    student = Denoiser(MLP(), f)
    levels = cd_levels(f, 18).float()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)

    def teacher(x, s):
        return gmm.denoise(x.double(), s.double()).float()

    g = torch.Generator().manual_seed(1)
    for _ in range(1500):
        y = gmm.sample(512, generator=g).float()
        n = torch.randint(0, 17, (512,), generator=g)
        s, s_to = levels[n + 1], levels[n]
        x = y + s[:, None] * torch.randn(512, 4, generator=g)
        with torch.no_grad():
            target = student(teacher_step(teacher, x, s, s_to), s_to)
        loss = consistency_distance(student(x, s), target, "l2").mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = torch.randn(4000, 4, generator=torch.Generator().manual_seed(9)) * 80
        y = student(x, torch.full((4000,), 80.0))
    shares = torch.bincount(gmm.classify(y.double()), minlength=3).double() / 4000
    assert torch.allclose(shares, gmm.weights, atol=0.05), shares  # measured: 0.48, 0.32, 0.20


# ------------------------------------------------------------------------------------------------ a run
def _tensors(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"ckpt-{step:08d}.safetensors"))


@pytest.mark.parametrize("method", ["cd", "ect"])
def test_distill_stopped_then_resumed_is_bit_exact(trained_run, tmp_path, method):
    sets = ["distill.double=1"] if method == "ect" else ["distill.levels=6"]  # ect: a new stage every step
    straight = distill(trained_run, tmp_path / "a", method=method, steps=4, overrides=sets, progress=False, log=quiet)
    assert straight["step"] == 4
    distill(trained_run, tmp_path / "b", method=method, steps=2, overrides=sets, progress=False, log=quiet)
    resumed = distill(trained_run, tmp_path / "b", method=method, overrides=["training.steps=4"], progress=False,
                      log=quiet)
    assert resumed["step"] == 4
    a, b = _tensors(tmp_path / "a", 4), _tensors(tmp_path / "b", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = _tensors(tmp_path / "a", 0)  # step 0 is the teacher's EMA
    assert not all(torch.equal(a[k], start[k]) for k in a if k.startswith("net."))


@pytest.mark.parametrize("method", ["cd", "ect"])
def test_distill_trains_in_fp16_with_a_scaler_and_resumes_bit_exactly(trained_run, tmp_path, method):
    # (ect keeps its default stage length: with a stage a step, 1/(t - r) doubles as fast as the scale backs off)
    sets = ["training.precision=fp16"] + (["distill.levels=6"] if method == "cd" else [])
    trainer = trainer_for(trained_run, tmp_path / "step", method, sets)
    try:  # the student runs under fp16 autocast, its loss scaled
        assert trainer.scaler.is_enabled()
        seen, original = [], trainer.model.forward

        def spy(*args, **kwargs):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return original(*args, **kwargs)
        trainer.model.forward = spy
        trainer.optimizer_step(0)
        assert seen == [torch.float16, torch.float16]  # f_theta and its stop-gradient target
    finally:
        trainer.close()
    straight = distill(trained_run, tmp_path / "a", method=method, steps=4, overrides=sets, progress=False, log=quiet)
    distill(trained_run, tmp_path / "b", method=method, steps=2, overrides=sets, progress=False, log=quiet)
    distill(trained_run, tmp_path / "b", method=method, overrides=["training.steps=4"], progress=False, log=quiet)
    (a, meta_a), (b, meta_b) = (load_checkpoint(RunDir(tmp_path / d).latest_checkpoint()) for d in ("a", "b"))
    assert meta_a["step"] == meta_b["step"] == 4 and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["grad_scaler"] == meta_b["grad_scaler"] and meta_a["grad_scaler"]["scale"] > 0
    assert meta_a["precision"] == "fp16" and meta_a["skipped_steps"] == meta_b["skipped_steps"]
    start = _tensors(tmp_path / "a", 0)
    assert straight["skipped_steps"] < 4 and not all(torch.equal(a[k], start[k]) for k in a if k.startswith("net."))


def test_cli_end_to_end(trained_run, tmp_path, cli_main):
    out = tmp_path / "cd"
    code, _ = cli_main(["distill", trained_run, "--method", "cd", "--out", out, "--steps", "2", "--no-progress"])
    assert code == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["distill"]["method"] == "cd" and Path(config["distill"]["teacher"]).is_file()
    assert config["diffusion"]["type"] == "Consistency" and config["diffusion"]["epsilon"] == 0.002
    assert config["sampling"]["sampler"] == "consistency" and config["sampling"]["steps"] == 2
    run = load_run(out)
    assert isinstance(run.denoiser.formulation, Consistency)
    for steps in (1, 2, 4):
        code, _ = cli_main(["sample", out, "--seeds", "0-3", "--steps", steps, "--out", tmp_path / f"s{steps}.npz"])
        assert code == 0
    import numpy as np
    one, two = (np.load(tmp_path / f"s{k}.npz")["samples"] for k in (1, 2))
    assert one.shape == two.shape and not np.array_equal(one, two)
    # resume with more steps
    code, _ = cli_main(["distill", trained_run, "--method", "cd", "--out", out, "--steps", "3", "--no-progress"])
    assert code == 0 and (out / "checkpoints" / "ckpt-00000003.safetensors").is_file()
    # ect: the student keeps the teacher's EDM (boundary 0): at step 0 it equals the teacher exactly
    code, _ = cli_main(["distill", trained_run, "--method", "ect", "--out", tmp_path / "ect", "--steps", "1",
                        "--no-progress"])
    assert code == 0
    config = yaml.safe_load((tmp_path / "ect" / "config.yaml").read_text())
    assert config["diffusion"]["type"] == "EDM" and config["distill"]["metric"] == "pseudo_huber"
    teacher, start = _tensors(trained_run, 6), _tensors(tmp_path / "ect", 0)
    assert all(torch.equal(start["net." + k[len("ema."):]], v) for k, v in teacher.items() if k.startswith("ema."))


@pytest.fixture(scope="module")
def vae_run(tiny_vae_config, tmp_path_factory):
    from elucidate.cli import main

    root = tmp_path_factory.mktemp("vae")
    (root / "vae.yaml").write_text(yaml.safe_dump(tiny_vae_config(training={"steps": 1, "checkpoint_every": 1})))
    assert main(["train-vae", str(root / "vae.yaml"), "--out", str(root / "vae"), "--no-progress"]) == 0
    return root / "vae"


def test_bad_inputs_are_one_line(trained_run, vae_run, tmp_path, cli_main, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse: an unknown method
        cli_main(["distill", trained_run, "--method", "nope", "--out", tmp_path / "o3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "invalid choice: 'nope'" in err[0], err
    with pytest.raises(UserError, match="unknown distillation method 'nope'"):  # the library
        distill(trained_run, tmp_path / "o3", method="nope")
    cases = [
        (["distill", tmp_path / "missing", "--method", "cd", "--out", tmp_path / "o1"], "does not exist"),
        (["distill", vae_run, "--method", "cd", "--out", tmp_path / "o2"], "not a diffusion run"),
        (["distill", trained_run, "--method", "cd", "--out", tmp_path / "o4", "--steps", "0"], "--steps 0"),
        (["distill", trained_run, "--method", "cd", "--out", tmp_path / "o5", "--epsilon", "0.01"], "epsilon"),
        (["distill", trained_run, "--method", "cd", "--out", tmp_path / "o6", "--set", "distill.method=x"],
         "distill.method"),
        (["distill", trained_run, "--method", "cd", "--out", trained_run], "not a distilled run"),
    ]
    for argv, words in cases:
        code, err = cli_main(argv + ["--no-progress"])
        assert code == 2 and len(err) == 1 and words in err[0], (argv, err)
    for k in range(1, 7):
        assert not (tmp_path / f"o{k}" / "checkpoints").exists()


def test_cd_needs_its_teacher_to_resume(trained_run, tmp_path, cli_main):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(trained_run, teacher)
    out = tmp_path / "cd"
    assert cli_main(["distill", teacher, "--method", "cd", "--out", out, "--steps", "1", "--no-progress"])[0] == 0
    shutil.rmtree(teacher)
    code, err = cli_main(["distill", teacher, "--method", "cd", "--out", out, "--steps", "2", "--no-progress"])
    assert code == 2 and len(err) == 1 and "teacher" in err[0] and "missing" in err[0], err



@pytest.fixture(scope="module")
def edm2_augmented_run(tiny_config, tmp_path_factory):
    """A tiny run of the EDM2 network (forced weight normalization) trained with augmentation (augment labels)."""
    from elucidate.cli import main

    root = tmp_path_factory.mktemp("edm2")
    raw = tiny_config(network={"arch": "edm2", "model_channels": 8, "channel_mult": [1], "num_blocks": 1,
                               "attn_resolutions": []},
                      training={"steps": 2, "augment": {"p": 0.5, "xflip": 1}, "loss_weighting": "uncertainty"})
    (root / "run.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(root / "run.yaml"), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


@pytest.mark.parametrize("method", ["cd", "ect"])
def test_an_edm2_teacher_trained_with_augmentation_distills(edm2_augmented_run, tmp_path, cli_main, method):
    # the student keeps the teacher's network, augment input included (fed nothing: zeros, as sampling does), and an
    # in-place weight renormalization in the training-mode calls (edm2's MPConv) does not break the backward pass
    out = tmp_path / method
    code, err = cli_main(["distill", edm2_augmented_run, "--method", method, "--out", out, "--steps", "2",
                          "--no-progress"])
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["training"]["augment"] is None and config["network"]["augment_dim"] > 0
    assert config["training"]["loss_weighting"] == "fixed"
    start, end = _tensors(out, 0), _tensors(out, 2)
    teacher = _tensors(edm2_augmented_run, 2)
    assert all(torch.equal(start["net." + k[len("ema."):]], v) for k, v in teacher.items() if k.startswith("ema."))
    assert any(not torch.equal(start[k], end[k]) for k in start if k.startswith("net."))
    assert torch.isfinite(load_run(out).sample(range(2))).all()


def test_a_run_that_cannot_start_is_not_left_behind(trained_run, tmp_path, monkeypatch):
    def fail(self, states, source):
        raise UserError("the weights do not fit")

    monkeypatch.setattr(DistillTrainer, "start_from", fail)
    with pytest.raises(UserError, match="do not fit"):
        distill(trained_run, tmp_path / "new", method="ect", steps=1, progress=False, log=quiet)
    assert not (tmp_path / "new").exists()


def test_ect_trains_in_fp32_unless_told_otherwise(trained_run):
    # ECT's 1 / (t - r) with t - r shrinking by q per stage needs fp32 (bf16 collapsed after stage 8 on the digits,
    # docs/distillation.md); cd keeps the teacher's precision; --set still decides
    ckpt = resolve_checkpoint(trained_run)
    teacher = load_run(ckpt, device="cpu").config
    teacher.training.precision = "bf16"
    ect = distill_config(teacher, ckpt, "ect", steps=2, epsilon=0.0, dim=64)
    cd = distill_config(teacher, ckpt, "cd", steps=2, epsilon=0.002, dim=64)
    told = distill_config(teacher, ckpt, "ect", steps=2, epsilon=0.0, dim=64, overrides=["training.precision=bf16"])
    assert (ect.training.precision, cd.training.precision, told.training.precision) == ("fp32", "bf16", "bf16")
