"""DiT (nets/dit.py): the network contract (shapes, conditioning, label dropout, precision), adaLN-Zero
initialization, patch layout and position codes, and that training makes the output depend on c."""
from __future__ import annotations

import math

import pytest
import torch

from elucidate import EDM, Denoiser, denoising_loss
from elucidate.nets import DiT, build_network, count_parameters
from elucidate.nets.dit import sincos_position_embedding

TINY_DIT = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, noise_channels=16)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(channels=1, res=8, seed=0, **kwargs) -> DiT:
    torch.manual_seed(seed)
    return build_network("dit", img_resolution=res, in_channels=channels, **{**TINY_DIT, **kwargs})


@torch.no_grad()
def perturb(net, seed=1, scale=0.05):
    """Move every parameter off its (zero) initialization so all paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def test_registered_with_dit_s2_defaults():
    net = build_network("dit", img_resolution=32, in_channels=4)
    assert isinstance(net, DiT)
    assert (net.patch_size, net.hidden_size, net.depth, net.num_heads) == (2, 384, 12, 6)
    assert 32e6 < count_parameters(net) < 34e6  # DiT-S/2: 33M (Peebles & Xie, Table 1)


@pytest.mark.parametrize("channels,res,patch,out", [(1, 8, 2, None), (3, (12, 20), 4, 2), (4, (8, 6), 2, 8),
                                                    (2, 5, 1, None)])
def test_forward_backward_shapes(channels, res, patch, out):
    net = perturb(tiny_dit(channels, res, patch_size=patch, out_channels=out, label_dim=3, augment_dim=2))
    H, W = (res, res) if isinstance(res, int) else res
    x = torch.randn(3, channels, H, W)
    y = net(x, torch.tensor([-1.2, 0.0, 0.7]), class_labels=torch.tensor([0, 2, 1]),
            augment_labels=torch.randn(3, 2))
    assert y.shape == (3, out or channels, H, W) and y.dtype == x.dtype
    y.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_fresh_network_outputs_exactly_zero():
    net = tiny_dit(3, (12, 20), label_dim=4, augment_dim=2)
    out = net(torch.randn(2, 3, 12, 20), torch.randn(2), class_labels=torch.tensor([0, 3]),
              augment_labels=torch.randn(2, 2))
    assert torch.equal(out, torch.zeros_like(out))
    blocks = net.blocks
    assert all(torch.equal(b.adaLN_modulation.weight, torch.zeros_like(b.adaLN_modulation.weight)) for b in blocks)


def test_invalid_configurations_and_inputs():
    with pytest.raises(ValueError, match=r"12x18 is not divisible by patch_size = 4"):
        tiny_dit(1, (12, 18), patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        tiny_dit(1, 8, hidden_size=30, num_heads=4)
    net = tiny_dit(1, 8)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 1, 8, 8\]"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="label_dim=0"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), class_labels=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="text_embedding"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), text_embedding=torch.zeros(2, 3))
    assert net(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)  # a scalar c_noise broadcasts


def test_class_and_augment_conditioning():
    net = perturb(tiny_dit(3, (12, 20), label_dim=4, augment_dim=2)).eval()
    x, c, ints = torch.randn(4, 3, 12, 20), torch.randn(4), torch.tensor([0, 1, 2, 3])
    out = net(x, c, class_labels=ints)
    assert torch.equal(out, net(x, c, class_labels=torch.eye(4)[ints]))
    assert not torch.allclose(out, net(x, c, class_labels=ints.flip(0)))
    assert torch.equal(net(x, c), net(x, c, class_labels=torch.zeros(4, 4)))  # None = the null label
    assert not torch.allclose(net(x, c, augment_labels=torch.ones(4, 2)), net(x, c))


def test_label_dropout_only_in_training():
    net = perturb(tiny_dit(label_dim=5, label_dropout=1.0))
    x, c, labels = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([1, 2, 3, 4])
    net.train()
    assert torch.equal(net(x, c, class_labels=labels), net(x, c))  # every label dropped
    net.eval()
    assert not torch.allclose(net(x, c, class_labels=labels), net(x, c))
    half = tiny_dit(label_dim=5, label_dropout=0.5).train()
    torch.manual_seed(0)
    kept = half.prepare_labels(torch.arange(200) % 5, 200, torch.device("cpu")).sum(dim=1)
    assert 60 < kept.sum() < 140 and set(kept.tolist()) <= {0.0, 1.0}


def test_training_makes_the_output_depend_on_noise_level_and_label():
    """adaLN-Zero: at init the output is 0 for every condition; a few steps on a target that depends
    on c_noise and the label must make the output depend on both (the gates open)."""
    net = tiny_dit(1, 8, label_dim=3).train()
    x = torch.randn(1, 1, 8, 8).expand(6, -1, -1, -1)
    c_noise, labels = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0, 0.0]), torch.tensor([0, 1, 0, 1, 2, 2])
    target = x * c_noise[:, None, None, None] + labels[:, None, None, None].float()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        (net(x, c_noise, class_labels=labels) - target).square().mean().backward()
        opt.step()
    net.eval()
    same = torch.zeros(2)
    out_c = net(x[:2], torch.tensor([-1.0, 1.0]), class_labels=same.long())
    out_y = net(x[:2], same, class_labels=torch.tensor([0, 2]))
    assert (out_c[0] - out_c[1]).abs().max() > 1e-3
    assert (out_y[0] - out_y[1]).abs().max() > 1e-3


def test_noise_embedding_resolves_both_scales():
    net = perturb(tiny_dit()).eval()
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    out = net(x, torch.tensor([-0.30, -0.25, 500.0, 501.0]))  # ln(sigma)/4-like and timestep-like
    for i, j in [(0, 1), (2, 3), (1, 2)]:
        assert (out[i] - out[j]).abs().max() > 1e-4


def test_patch_layout_round_trip():
    """Tokens are row-major patches with (row-in-patch, column-in-patch, channel) features, the
    layout the patch embedding produces and ``unpatchify`` inverts."""
    net = tiny_dit(3, (8, 12), patch_size=4, out_channels=3)
    x = torch.randn(2, 3, 8, 12)
    tokens = x.reshape(2, 3, 2, 4, 3, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 6, 48)  # by hand
    assert torch.equal(net.unpatchify(tokens), x)
    # the convolutional patch embedding is a linear map of those same tokens
    w = net.patch_embed.weight.permute(0, 2, 3, 1).reshape(net.hidden_size, -1)
    by_hand = tokens @ w.T + net.patch_embed.bias
    conv = net.patch_embed(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conv, by_hand, rtol=1e-5, atol=1e-5)


def test_position_embedding_closed_form():
    pe = sincos_position_embedding(8, 3, 5)  # dim/4 = 2 frequencies: 1 and 1/100
    assert pe.shape == (15, 8)
    row, col = 2, 3
    token = pe[row * 5 + col]
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(token, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    assert len({tuple(t.tolist()) for t in pe}) == 15  # every position distinct


def test_bf16_autocast_and_determinism():
    net = perturb(tiny_dit(3, (12, 20), label_dim=3))
    x, c, y = torch.randn(2, 3, 12, 20), torch.randn(2), torch.tensor([0, 2])
    ref = net(x, c, class_labels=y)
    assert torch.equal(ref, net(x, c, class_labels=y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c, class_labels=y)
    assert out.dtype == torch.float32 and (out - ref).norm() / ref.norm() < 0.05


def test_trains_as_a_latent_space_denoiser():
    """As the network of a Denoiser on 4-channel 8x8 latents (a few fixed latent codes, so there is
    something to learn beyond the Gaussian optimum that the preconditioning gives at F = 0): the
    EDM loss decreases."""
    torch.manual_seed(0)
    latents = (torch.randn(4, 4, 8, 8) * 0.5).repeat(16, 1, 1, 1)
    net = tiny_dit(4, 8)
    D = Denoiser(net, EDM(sigma_data=0.5))
    opt = torch.optim.Adam(net.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        sigma = (torch.randn(64, generator=gen) * 1.2 - 1.2).exp()
        loss = denoising_loss(D, latents, sigma=sigma, noise=torch.randn(latents.shape, generator=gen)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < 0.95 * sum(losses[:10])
