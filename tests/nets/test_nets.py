"""The networks package: shapes, gradients, validation, conditioning, init, precision, layout."""
from __future__ import annotations

import pytest
import torch

from elucidate.nets import NETWORKS, DhariwalUNet, SongUNet, UNet, UnknownArgumentError, build_network, count_parameters
from elucidate.nets.layers import Conv2d, num_groups

ARCHS = ["unet", "ddpmpp", "ncsnpp", "adm", "edm2"]
TINY_NET = dict(model_channels=8, num_blocks=1, dropout=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


# (channels, H, W, channel_mult): odd channel counts, non-square, not powers of two, 1 level at 25x25.
SHAPES = [(1, 8, 8, (1, 2)), (3, 12, 20, (1, 2, 2)), (5, 24, 24, (1, 2, 2)), (2, 25, 25, (1,))]


def tiny_net(arch: str, channels: int = 1, res=8, channel_mult=(1, 2), seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    side = res if isinstance(res, int) else min(res)
    kw = dict(TINY_NET, channel_mult=channel_mult, attn_resolutions=(side // 2,))  # attention at level 1
    kw.update(kwargs)
    return build_network(arch, img_resolution=res, in_channels=channels, **kw)


@torch.no_grad()
def perturb(net: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its (zero) initialization so all paths carry signal."""
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen))
    return net


def test_networks_registry():
    assert NETWORKS == ("unet", "ddpmpp", "ncsnpp", "adm", "diffusers_unet2d", "dit", "edm2")
    assert isinstance(tiny_net("unet"), UNet)
    assert isinstance(tiny_net("ddpmpp"), SongUNet) and isinstance(tiny_net("ncsnpp"), SongUNet)
    assert isinstance(tiny_net("adm"), DhariwalUNet)
    assert tiny_net("ncsnpp").encoder_type == "residual"


@pytest.mark.parametrize("channels,height,width,mult", SHAPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_forward_backward(arch, channels, height, width, mult):
    net = perturb(tiny_net(arch, channels, (height, width), mult, out_channels=channels + 1))
    x = torch.randn(3, channels, height, width)
    out = net(x, torch.tensor([-1.2, 0.0, 0.7]))
    assert out.shape == (3, channels + 1, height, width) and out.dtype == x.dtype
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("encoder_type,decoder_type", [("skip", "skip"), ("residual", "skip")])
def test_song_encoder_decoder_variants(encoder_type, decoder_type):
    net = perturb(tiny_net("ddpmpp", 3, (12, 20), (1, 2, 2), encoder_type=encoder_type,
                           decoder_type=decoder_type, resample_filter=(1, 3, 3, 1)))
    out = net(torch.randn(2, 3, 12, 20), torch.randn(2))
    out.mean().backward()
    assert out.shape == (2, 3, 12, 20)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_network_outputs_exactly_zero(arch):
    net = tiny_net(arch, 3, (12, 20), (1, 2, 2), label_dim=4)
    out = net(torch.randn(2, 3, 12, 20), torch.randn(2), class_labels=torch.tensor([0, 3]))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("arch", ARCHS)
def test_impossible_resolution(arch):
    with pytest.raises(ValueError, match=r"25x25.*channel_mult \(1, 2, 2\).*divisible by .* 4"):
        build_network(arch, img_resolution=25, in_channels=1, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="12x18"):
        build_network(arch, img_resolution=(12, 18), in_channels=1, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="img_resolution"):
        build_network(arch, img_resolution=(8, 8, 8), in_channels=1)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrong_input_shape(arch):
    net = tiny_net(arch, 1, 8)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 1, 8, 8\]"):
        net(torch.randn(2, 2, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="expects x of shape"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match="c_noise has 3 values"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(3))
    assert net(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)  # a scalar c_noise broadcasts


def test_unknown_arch_and_kwargs():
    with pytest.raises(ValueError, match="unet, ddpmpp, ncsnpp, adm"):
        build_network("resnet", img_resolution=8, in_channels=1)
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match=r"model_chanels.*accepted: .*model_channels"):
            build_network("ddpmpp", img_resolution=8, in_channels=1, model_chanels=4)
    with pytest.raises(UnknownArgumentError, match="encoder_type"):
        build_network("adm", img_resolution=8, in_channels=1, encoder_type="skip")
    with pytest.raises(ValueError, match="encoder_type"):
        build_network("ncsnpp", img_resolution=8, in_channels=1, encoder_type="fancy")


@pytest.mark.parametrize("arch", ARCHS)
def test_unknown_or_unsupported_conditioning(arch):
    net = tiny_net(arch)
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    with pytest.raises(TypeError, match="text_embedding.*accepted: class_labels"):
        net(x, c, text_embedding=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="label_dim=0"):
        net(x, c, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="augment_dim=0"):
        net(x, c, augment_labels=torch.zeros(2, 9))
    labelled = tiny_net(arch, label_dim=3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        labelled(x, c, class_labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"shape \[2, 3\]"):
        labelled(x, c, class_labels=torch.zeros(2, 4))


@pytest.mark.parametrize("arch", ARCHS)
def test_class_conditioning(arch):
    net = perturb(tiny_net(arch, 3, (12, 20), (1, 2, 2), label_dim=4, augment_dim=2)).eval()
    x, c = torch.randn(4, 3, 12, 20), torch.randn(4)
    ints = torch.tensor([0, 1, 2, 3])
    out_int = net(x, c, class_labels=ints)
    assert torch.equal(out_int, net(x, c, class_labels=torch.eye(4)[ints]))
    assert not torch.allclose(out_int, net(x, c, class_labels=ints.flip(0)))
    # None == an all-zero label vector == "unconditional"
    assert torch.equal(net(x, c), net(x, c, class_labels=torch.zeros(4, 4)))
    assert not torch.allclose(net(x, c), out_int)
    assert not torch.allclose(net(x, c, augment_labels=torch.ones(4, 2)), net(x, c))


@pytest.mark.parametrize("arch", ARCHS)
def test_label_dropout_only_in_training(arch):
    net = perturb(tiny_net(arch, label_dim=5, label_dropout=1.0))
    x, c, labels = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([1, 2, 3, 4])
    net.train()
    if arch == "edm2":  # each training-mode call re-normalizes edm2's weights in place, moving them by ~eps
        torch.testing.assert_close(net(x, c, class_labels=labels), net(x, c), rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(net(x, c, class_labels=labels), net(x, c))  # every label dropped
    net.eval()
    assert not torch.allclose(net(x, c, class_labels=labels), net(x, c))
    half = tiny_net(arch, label_dim=5, label_dropout=0.5).train()
    torch.manual_seed(0)
    ints, cpu = torch.arange(200) % 5, torch.device("cpu")
    kept = half.prepare_labels(ints, 200, cpu).sum(dim=1)
    assert 60 < kept.sum() < 140 and set(kept.tolist()) <= {0.0, 1.0}
    assert half.eval().prepare_labels(ints, 200, cpu).sum() == 200


@pytest.mark.parametrize("arch", ARCHS)
def test_noise_embedding_resolves_both_scales(arch):
    net = perturb(tiny_net(arch)).eval()
    x = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1)
    out = net(x, torch.tensor([-0.30, -0.25, 500.0, 501.0]))  # ln(sigma)/4-like and timestep-like
    for i, j in [(0, 1), (2, 3), (1, 2)]:
        assert (out[i] - out[j]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_autocast_close_to_fp32(arch):
    net = perturb(tiny_net(arch, 3, (12, 20), (1, 2, 2), label_dim=3))
    x, c, y = torch.randn(2, 3, 12, 20), torch.randn(2), torch.tensor([0, 2])
    ref = net(x, c, class_labels=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c, class_labels=y)
        out.square().mean().backward()
    assert out.dtype == torch.float32
    assert (out - ref).norm() / ref.norm() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_channels_last(arch):
    net = perturb(tiny_net(arch, 3, (12, 20), (1, 2, 2)))
    x, c = torch.randn(2, 3, 12, 20), torch.randn(2)
    ref = net(x, c)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.contiguous(memory_format=torch.channels_last), c)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_fp32(arch):
    def run():
        net = perturb(tiny_net(arch, 1, 8, dropout=0.1, label_dim=2, label_dropout=0.5, seed=3))
        torch.manual_seed(4)
        out = net(torch.randn(3, 1, 8, 8), torch.randn(3), class_labels=torch.tensor([0, 1, 1]))
        out.square().sum().backward()
        return out, [p.grad for p in net.parameters()]
    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb, strict=True))


def test_float64_and_any_channel_count():
    net = perturb(tiny_net("ncsnpp", 3, (12, 20), (1, 3), model_channels=10)).double()
    out = net(torch.randn(2, 3, 12, 20, dtype=torch.float64), torch.randn(2, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (2, 3, 12, 20)
    assert [num_groups(c) for c in (1, 3, 8, 10, 30, 64, 200)] == [1, 1, 2, 2, 6, 16, 25]


@pytest.mark.parametrize("taps", [(1, 1), (1, 3, 3, 1)])
def test_resampling_preserves_constants(taps):
    x = torch.full((1, 2, 6, 10), 3.0)
    down = Conv2d(2, 2, 0, down=True, resample_filter=taps)(x)
    up = Conv2d(2, 2, 0, up=True, resample_filter=taps)(x)
    assert down.shape == (1, 2, 3, 5) and up.shape == (1, 2, 12, 20)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))  # borders see zero padding
    torch.testing.assert_close(down[inner], torch.full_like(down[inner], 3.0))
    torch.testing.assert_close(up[inner], torch.full_like(up[inner], 3.0))


def test_digits_preset_size():
    net = build_network("unet", img_resolution=8, in_channels=1, out_channels=1)
    assert 1_000_000 <= count_parameters(net) <= 3_000_000
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())


def test_multihead_attention_matches_reference():
    from elucidate.nets.layers import SelfAttention
    torch.manual_seed(0)
    attn = perturb(SelfAttention(8, num_heads=2))
    x = torch.randn(2, 8, 3, 5)
    qkv = attn.qkv(attn.norm(x)).flatten(2)  # edm's layout: channel 3 * (h * C/heads + c) + j, j = q, k, v
    q, k, v = qkv[:, 0::3], qkv[:, 1::3], qkv[:, 2::3]  # [B, C, N] each; heads = 4-channel slices
    heads = []
    for h in range(2):
        s = slice(4 * h, 4 * h + 4)
        w = torch.softmax(torch.einsum("bcq,bck->bqk", q[:, s], k[:, s]) / 2.0, dim=-1)
        heads.append(torch.einsum("bqk,bck->bcq", w, v[:, s]))
    ref = attn.proj(torch.cat(heads, dim=1).reshape(2, 8, 3, 5))
    torch.testing.assert_close(attn(x), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_placement_by_smaller_side(arch):
    from elucidate.nets.edm2 import EDM2Block
    from elucidate.nets.layers import SelfAttention
    heads = {"num_heads": 2} if arch in ("ddpmpp", "ncsnpp") else {"channels_per_head": 4}
    net = tiny_net(arch, 3, (12, 20), (1, 2, 2), attn_resolutions=(6,), **heads)  # level 1 is 6x10
    assert [net.use_attention(level) for level in range(3)] == [False, True, False]
    seen = []
    for m in net.modules():
        if isinstance(m, SelfAttention) or isinstance(m, EDM2Block) and m.num_heads:
            assert m.num_heads >= 2
            m.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[2:])))
    net(torch.randn(1, 3, 12, 20), torch.zeros(1))
    assert set(seen) == {(6, 10), (3, 5)}  # level 1 and the lowest-resolution middle block
