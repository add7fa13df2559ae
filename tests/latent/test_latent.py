"""The latent-diffusion autoencoder: posterior maths, the loss (adaptive weight, GAN losses, disc_start,
learned log-variance), perceptual networks, config validation, training runs (layout, exact resume),
load_vae, and real-image round trips."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from elucidate.config.vae import load_vae_config
from elucidate.errors import ConfigError, UserError
from elucidate.latent import (
    AutoencoderKL,
    DiagonalGaussianDistribution,
    PerceptualLoss,
    VAELoss,
    adaptive_weight,
    generator_loss,
    hinge_d_loss,
    load_feature_network,
    vanilla_d_loss,
)
from elucidate.run import RunDir, load_vae
from elucidate.run.checkpoint import load_checkpoint, save_checkpoint
from elucidate.training import VAETrainer, train_vae
from elucidate.training.optim import OptimizerGroup

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def all_tensors(run: Path) -> dict:
    return load_checkpoint(RunDir(run).latest_checkpoint())[0]


# --- posterior -------------------------------------------------------------------------------------

def test_posterior_against_closed_forms():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 2, 5, dtype=torch.float64)
    q = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    normal = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    std_normal = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl_ref = torch.distributions.kl_divergence(normal, std_normal).sum(dim=(1, 2, 3))
    torch.testing.assert_close(q.kl(), kl_ref)
    other = DiagonalGaussianDistribution(torch.randn(3, 8, 2, 5, dtype=torch.float64))
    kl_other = torch.distributions.kl_divergence(normal, torch.distributions.Normal(other.mean, other.std))
    torch.testing.assert_close(q.kl(other), kl_other.sum(dim=(1, 2, 3)))
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    torch.testing.assert_close(q.nll(x), -normal.log_prob(x).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(q.nll(x, dims=[1]), -normal.log_prob(x).sum(dim=1))
    assert torch.equal(q.mode(), mean)
    noise = torch.randn_like(mean)
    torch.testing.assert_close(q.sample(noise=noise), mean + (0.5 * logvar).exp() * noise)
    # a closed form by hand: N(1, e^0) vs N(0, 1) in one element: 1/2 (1 + 1 - 1 - 0) = 1/2
    one = DiagonalGaussianDistribution(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
    assert one.kl().item() == pytest.approx(0.5)
    # log-variance is clamped to [-30, 20]
    wild = DiagonalGaussianDistribution(torch.tensor([0.0, 0.0, 100.0, -100.0]).view(1, 4, 1, 1))
    assert wild.logvar.flatten().tolist() == [20.0, -30.0]


def test_posterior_sample_statistics():
    mean, logvar = torch.tensor([1.5, -0.5]), torch.tensor([math.log(0.25), math.log(4.0)])
    params = torch.cat([mean, logvar]).view(1, 4, 1, 1).expand(20000, -1, -1, -1)
    z = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(0))[:, :, 0, 0]
    std = torch.tensor([0.5, 2.0])
    assert ((z.mean(0) - mean).abs() < 4 * std / math.sqrt(20000)).all()
    assert ((z.std(0) / std - 1).abs() < 0.03).all()
    again = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(0))[:, :, 0, 0]
    assert torch.equal(z, again)


def test_deterministic_posterior():
    mean = torch.randn(2, 3, 4, 4)
    q = DiagonalGaussianDistribution.from_mean(mean)
    assert torch.equal(q.kl(), torch.zeros(2)) and torch.equal(q.nll(mean + 1), torch.zeros(2))
    assert torch.equal(q.sample(torch.Generator().manual_seed(1)), mean) and torch.equal(q.mode(), mean)
    vae = AutoencoderKL(8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1, double_z=False)
    rec, post = vae(torch.randn(2, 1, 8, 8))
    assert post.deterministic and torch.equal(post.kl(), torch.zeros(2)) and rec.shape == (2, 1, 8, 8)


# --- the autoencoder ---------------------------------------------------------------------------------

def test_autoencoder_shapes_and_checks():
    vae = AutoencoderKL((16, 24), in_channels=3, out_channels=2, ch=8, ch_mult=(1, 2, 2), num_res_blocks=1,
                        attn_resolutions=(8,), z_channels=3, embed_dim=5)
    x = torch.randn(2, 3, 16, 24)
    post = vae.encode(x)
    assert post.mean.shape == (2, 5, 4, 6) and vae.latent_shape == (5, 4, 6)
    assert vae.decode(post.sample()).shape == (2, 2, 16, 24)
    rec, _ = vae(x, sample_posterior=False)
    assert torch.equal(rec, vae.decode(post.mode()))
    assert vae.last_layer is vae.decoder.conv_out.weight
    attention = [n for n, _ in vae.named_modules() if n.endswith("attn") and "mid" not in n]
    assert attention and all(".1." in n or "up.1" in n or "down.1" in n for n in attention)  # level 1: 8 x 12
    with pytest.raises(ValueError, match=r"expects \[B, 3, H, W\] with H and W divisible by 4"):
        vae.encode(torch.randn(2, 3, 10, 24))
    with pytest.raises(ValueError, match=r"decode expects \[B, 5, h, w\]"):
        vae.decode(torch.randn(2, 4, 4, 6))
    with pytest.raises(ValueError, match="divisible by 2"):
        AutoencoderKL(9, in_channels=1, ch_mult=(1, 2))


# --- the loss ------------------------------------------------------------------------------------------

def test_adaptive_weight_by_hand():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([1.0, -1.0])
    nll = (w @ a) ** 2          # grad 2 (w.a) a = [66, 88], norm 110
    g = 0.5 * (w @ b)           # grad [0.5, -0.5], norm sqrt(1/2)
    assert adaptive_weight(nll, g, w).item() == pytest.approx(110 / (math.sqrt(0.5) + 1e-4), rel=1e-6)
    keep_first = torch.tensor([1.0, 0.0])  # reduce is applied to both gradients before the norms
    assert adaptive_weight(nll, g, w, reduce=lambda t: t * keep_first).item() == pytest.approx(66 / 0.5001)
    flat = 0.0 * w.sum()        # no adversarial gradient: 110 / 1e-4, clamped to 1e4
    assert adaptive_weight(nll, flat, w).item() == 1e4
    assert not adaptive_weight(nll, g, w).requires_grad


def test_gan_losses_by_hand():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-0.5, 0.3])
    # hinge: 1/2 (mean(relu(1 - r)) + mean(relu(1 + f))) = 1/2 ((0.5 + 0) / 2 + (0.5 + 1.3) / 2)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.575)
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  softplus
    vanilla = 0.5 * ((sp(-0.5) + sp(-2.0)) / 2 + (sp(-0.5) + sp(0.3)) / 2)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(vanilla)
    assert generator_loss(fake).item() == pytest.approx(0.1)


def _loss_inputs(seed=0):
    torch.manual_seed(seed)
    vae = AutoencoderKL(8, in_channels=1, ch=8, ch_mult=(1, 2), num_res_blocks=1)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    rec, post = vae(x, generator=torch.Generator().manual_seed(1))
    return vae, x, rec, post


def test_generator_loss_terms_and_disc_start():
    vae, x, rec, post = _loss_inputs()
    loss_fn = VAELoss(1, kl_weight=1e-3, disc_weight=0.7, disc_start=3, disc_layers=1, disc_channels=8,
                      logvar_init=0.3)
    before, logs = loss_fn.generator_loss(x, rec, post, step=2, last_layer=vae.last_layer)
    s = torch.tensor(0.3)
    nll = ((x - rec).abs() / s.exp() + s).sum() / 4
    torch.testing.assert_close(before, nll + 1e-3 * post.kl().sum() / 4)
    assert logs["disc_factor"] == 0 and logs["g_loss"] == 0 and not loss_fn.adversarial(2)
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=2)
    assert d_loss == 0 and not d_loss.requires_grad
    after, logs = loss_fn.generator_loss(x, rec, post, step=3, last_layer=vae.last_layer)
    g = generator_loss(loss_fn.discriminator(rec))
    weight = 0.7 * adaptive_weight(nll, g, vae.last_layer)
    torch.testing.assert_close(after, before + weight * g)
    assert logs["disc_factor"] == 1 and logs["d_weight"].item() == pytest.approx(weight.item(), rel=1e-5)
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=3)
    logits = loss_fn.discriminator(torch.cat([x, rec.detach()]))
    torch.testing.assert_close(d_loss, hinge_d_loss(*logits.chunk(2)))
    after.backward()  # the generator pass leaves the discriminator's parameters alone
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())


def test_logvar_gradient_is_the_closed_form():
    vae, x, rec, post = _loss_inputs()
    loss_fn = VAELoss(1, disc_weight=0.0, logvar_init=-0.2)
    loss, _ = loss_fn.generator_loss(x, rec.detach(), post, step=0)
    loss.backward()
    r = (x - rec.detach()).abs()  # d/ds sum(r e^-s + s) / B = (numel - e^-s sum r) / B
    expected = (r.numel() - math.exp(0.2) * r.sum()) / 4
    assert loss_fn.logvar.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_logvar_is_trained_and_the_discriminator_only_after_disc_start(tiny_vae_config, tmp_path):
    trainer = VAETrainer(load_vae_config(tiny_vae_config()), tmp_path / "run", progress=False, log=lambda *a: None)
    assert any(p is trainer.loss.logvar for g in trainer.optimizers[0].param_groups for p in g["params"])
    disc0 = [p.clone() for p in trainer.loss.discriminator.parameters()]
    logvar = [trainer.loss.logvar.item()]
    for step in range(5):
        logs, applied = trainer.train_step(step)
        assert applied and logs["disc_factor"].item() == (step >= 3)
        logvar.append(trainer.loss.logvar.item())
        moved = any(not torch.equal(a, b) for a, b in zip(disc0, trainer.loss.discriminator.parameters()))
        assert moved == (step >= 3), step
    assert all(a != b for a, b in zip(logvar, logvar[1:]))  # every step updates the log-variance


# --- perceptual networks ---------------------------------------------------------------------------------

def test_perceptual_loss_from_the_digits_classifier():
    loss = PerceptualLoss(load_feature_network("digits"))
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.equal(loss(x, x), torch.zeros(3))
    d = loss(x, y)
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())
    rgb = loss(x.expand(-1, 3, -1, -1), y.detach().expand(-1, 3, -1, -1))  # RGB is averaged to gray
    torch.testing.assert_close(rgb, d.detach())


def test_feature_networks_from_safetensors(tmp_path):
    from elucidate.metrics import load_digits_classifier

    digits_file = tmp_path / "digits.safetensors"
    save_file(load_digits_classifier().state_dict(), str(digits_file))
    x, y = torch.rand(2, 1, 8, 8) * 2 - 1, torch.rand(2, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(PerceptualLoss(load_feature_network(digits_file))(x, y),
                               PerceptualLoss(load_feature_network("digits"))(x, y))
    g = torch.Generator().manual_seed(0)
    vgg = {"features.0.weight": torch.randn(4, 3, 3, 3, generator=g), "features.0.bias": torch.zeros(4),
           "features.2.weight": torch.randn(4, 4, 3, 3, generator=g), "features.2.bias": torch.zeros(4),
           "features.5.weight": torch.randn(6, 4, 3, 3, generator=g), "features.5.bias": torch.zeros(6)}
    vgg_file = tmp_path / "vgg.safetensors"
    save_file(vgg, str(vgg_file))
    net = load_feature_network(vgg_file)
    taps = net(torch.rand(2, 1, 16, 16) * 2 - 1)  # pool after the 2nd conv (index gap 3): taps 16x16, 8x8
    assert [tuple(t.shape) for t in taps] == [(2, 4, 16, 16), (2, 6, 8, 8)]
    ref = F.relu(F.conv2d(F.relu(F.conv2d(((torch.zeros(1, 3, 4, 4) + 1) / 2 - net.mean) / net.std,
                                         vgg["features.0.weight"], padding=1)), vgg["features.2.weight"], padding=1))
    torch.testing.assert_close(net(torch.zeros(1, 1, 4, 4))[0], ref)
    bad = tmp_path / "bad.safetensors"
    save_file({"something": torch.zeros(2)}, str(bad))
    with pytest.raises(UserError, match="not a VGG-style"):
        load_feature_network(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_feature_network(tmp_path / "missing.safetensors")


# --- config ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change,message", [
    ({"model": {"chmult": [1, 2]}}, r"unknown key model.chmult \(did you mean 'ch_mult'\?\)"),
    ({"model": {"ch_mult": []}}, r"model.ch_mult = \[\]: expected a non-empty list"),
    ({"model": {"double_z": "yes"}}, r"model.double_z = 'yes': expected true or false"),
    ({"loss": {"disc_loss": "wgan"}}, r"loss.disc_loss = 'wgan': expected one of \['hinge', 'vanilla'\]"),
    ({"loss": {"perceptual": None, "perceptual_weight": 1.0}}, r"loss.perceptual_weight = 1.0 needs loss.perceptual"),
    ({"loss": {"perceptual": "vgg.pth"}}, r"loss.perceptual = 'vgg.pth': expected 'digits', a path"),
    ({"training": {"holdout": 0}}, r"training.holdout = 0: expected a number > 0"),
    ({"training": {"holdout": 2.5}}, r"training.holdout = 2.5: expected a fraction in \(0, 1\) or a count"),
    ({"training": {"precision": "fp8"}}, r"training.precision = 'fp8'"),
    ({"training": {"betas": [0.5]}}, r"training.betas"),
    ({"training": {"fd_features": "clip"}}, r"training.fd_features = 'clip'"),
    ({"sampling": {}}, r"unknown key config.sampling"),
])
def test_config_errors_name_the_key(tiny_vae_config, change, message):
    with pytest.raises(ConfigError, match=message):
        load_vae_config(tiny_vae_config(**change))


def test_config_defaults_overrides_and_the_shipped_config():
    config = load_vae_config({"data": {"dataset": "digits"}, "loss": {"perceptual": "digits"}},
                             ["training.steps=7", "model.ch_mult=[1, 2]"])
    assert config.training.steps == 7 and config.model.ch_mult == (1, 2)
    assert config.loss.perceptual_weight == 1.0 and config.training.disc_lr == config.training.lr
    assert load_vae_config({"data": {"dataset": "digits"}}).loss.perceptual_weight == 0.0
    with pytest.raises(ConfigError, match="unknown key config.network"):
        load_vae_config({"data": {"dataset": "digits"}}, ["network.arch=dit"])
    shipped = load_vae_config(ROOT / "configs" / "digits-vae.yaml")
    assert shipped.data["resolution"] == 32 and len(shipped.model.ch_mult) == 3 and shipped.model.embed_dim == 4


def test_optimizer_group_round_trip():
    """train-vae's two optimizers (autoencoder, discriminator) in one checkpoint slot."""
    a, b = torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)
    pair = OptimizerGroup(torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.2))
    for opt, net in zip(pair.optimizers, (a, b)):
        net(torch.randn(4, net.in_features)).sum().backward()
        opt.step()
    state = pair.state_dict()
    assert sorted(state["state"]) == [0, 1, 2, 3] and state["param_groups"][1]["params"] == [2, 3]
    fresh = OptimizerGroup(torch.optim.Adam(a.parameters(), lr=0.1), torch.optim.Adam(b.parameters(), lr=0.2))
    fresh.load_state_dict(state)
    second, expected = fresh.optimizers[1].state_dict()["state"][1], pair.optimizers[1].state_dict()["state"][1]
    assert torch.equal(second["exp_avg"], expected["exp_avg"])
    assert fresh.optimizers[1].param_groups[0]["lr"] == 0.2


# --- training runs ---------------------------------------------------------------------------------

def test_run_directory_layout_metrics_and_load_vae(tiny_vae_config, tmp_path):
    run = RunDir(tmp_path / "run")
    summary = train_vae(tiny_vae_config(training={"steps": 4, "eval_every": 2, "sample_every": 2}), run.path,
                        progress=False)
    assert summary["step"] == 4 and summary["psnr"] > 0 and summary["fd"] is not None
    assert run.config.is_file() and summary["checkpoint"] == run.latest_checkpoint() == run.checkpoint(4)
    assert sorted(run.samples.iterdir()) == [run.sample_grid(2), run.sample_grid(4)]
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    train_lines, evals = [r for r in records if "loss" in r], [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in train_lines] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    assert {"rec_loss", "kl_loss", "logvar", "d_weight", "d_loss", "lr", "disc_lr"} <= set(train_lines[0])
    assert evals[-1]["fd_features"] == "fd_digits" and evals[-1]["count"] == 20
    tensors, meta = load_checkpoint(summary["checkpoint"])
    assert meta["kind"] == "vae" and meta["latent_shape"] == [4, 4, 4] and meta["eval"]["psnr"] == summary["psnr"]
    assert meta["precision"] == "fp32"  # the resolved precision (the tiny config's default)
    assert "net.loss.logvar" in tensors and any(k.startswith("optimizer.state.") for k in tensors)
    vae = load_vae(run.path)
    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert all(torch.equal(v, tensors["net.vae." + k]) for k, v in vae.state_dict().items())
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(load_vae(summary["checkpoint"]).encode(x).mode(), vae.encode(x).mode())
    with pytest.raises(UserError, match="no checkpoints"):
        load_vae(tmp_path)
    diffusion = save_checkpoint(tmp_path / "ckpt-00000001.safetensors", net=torch.nn.Linear(1, 1), ema=None,
                                optimizer=None, meta={"step": 1, "config": {}, "data": {}})
    with pytest.raises(UserError, match="not an autoencoder checkpoint"):
        load_vae(diffusion)


def test_a_deterministic_autoencoder_trains_without_kl(tiny_vae_config, tmp_path):
    run = RunDir(tmp_path / "run")
    train_vae(tiny_vae_config(model={"double_z": False}, training={"steps": 2, "checkpoint_every": 2}), run.path,
              progress=False)
    lines = [json.loads(x) for x in run.metrics.read_text().splitlines()]
    assert [r["kl_loss"] for r in lines if "kl_loss" in r] == [0.0]
    assert load_vae(run.path).encode(torch.zeros(1, 1, 8, 8)).deterministic


def test_resume_is_bit_exact(tiny_vae_config, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train_vae(tiny_vae_config(), full, progress=False)
    train_vae(tiny_vae_config(), resumed, overrides=["training.steps=4"], progress=False)  # stop at step 4 ...
    summary = train_vae(tiny_vae_config(), resumed, progress=False)                        # ... and resume to 8
    assert summary["step"] == 8
    a, b = all_tensors(full), all_tensors(resumed)
    assert a.keys() == b.keys() and any(k.startswith("optimizer.state.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with pytest.raises(UserError, match="loss.kl_weight"):
        train_vae(tiny_vae_config(), resumed, overrides=["loss.kl_weight=0.1", "training.steps=9"], progress=False)


def _photo_patches(path: Path, n: int = 512, size: int = 16) -> Path:
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg and flower.jpg, 427 x 640 RGB
    rng = np.random.default_rng(0)
    patches = []
    for k in range(n):
        img = photos[k % 2]
        top, left = rng.integers(0, img.shape[0] - size), rng.integers(0, img.shape[1] - size)
        patches.append(img[top:top + size, left:left + size])
    np.savez(path, images=np.stack(patches).astype(np.uint8))
    return path


# measured (torch 2.13 CPU): photos 22.4 dB, digits 22.7 dB with fd_digits 6.6 (about 800 at initialization)
PHOTO_PSNR, DIGITS_PSNR, DIGITS_FD = 21.0, 21.5, 10.0


@pytest.mark.slow
def test_round_trip_on_photo_patches_and_digits(tmp_path):
    """A small autoencoder learns to reconstruct held-out real images: 16x16 RGB photo patches through
    8x8x4 latents (3x compression) and 8x8 digits through 4x4x4 latents."""
    common = {"loss": {"disc_weight": 0.0}, "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1},
              "training": {"steps": 300, "batch_size": 32, "lr": 2e-3, "log_every": 100, "checkpoint_every": 300,
                           "sample_every": 0, "eval_every": 0, "holdout": 64}}
    data = _photo_patches(tmp_path / "patches.npz")
    photos = train_vae({**common, "data": {"dataset": "npz", "path": str(data), "layout": "NHWC"}},
                       tmp_path / "photos", progress=False)
    digits = train_vae({**common, "data": {"dataset": "digits"}}, tmp_path / "digits", progress=False)
    assert photos["psnr"] > PHOTO_PSNR and photos["fd"] is None  # no feature network for photos by default
    assert digits["psnr"] > DIGITS_PSNR and digits["fd"] < DIGITS_FD


def test_cli_train_vae_writes_a_run_and_errors_are_one_line(tiny_vae_config, write_config, cli_main, tmp_path,
                                                           capsys):
    from elucidate.cli import main
    from elucidate.run.lock import RunLock

    cfg = write_config(tiny_vae_config(training={"steps": 2, "checkpoint_every": 2}), tmp_path / "vae.yaml")
    run = RunDir(tmp_path / "run")
    assert main(["train-vae", str(cfg), "--out", str(run), "--no-progress"]) == 0
    assert "trained to step 2" in capsys.readouterr().out and run.latest_checkpoint() == run.checkpoint(2)
    with RunLock(run.path, "test"):  # a second writer is refused at once
        code, err = cli_main(["train-vae", cfg, "--out", run, "--no-progress", "--set", "training.steps=4"])
    assert code == 2 and len(err) == 1 and "in use" in err[0], err
    code, err = cli_main(["train-vae", cfg, "--out", tmp_path / "x", "--set", "model.bogus=1"])
    assert code == 2 and len(err) == 1 and "bogus" in err[0], err
