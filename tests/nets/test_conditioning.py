"""Conditioning (latent diffusion's conditioning_key): adm (class labels), concat (spatial map on the input
channels), crossattn (token context) and hybrid, in every network, in the data, and in build_network_for."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from elucidate.config import ConfigError, parse_config
from elucidate.config.network import DataInfo, build_network_for
from elucidate.data import DataError, build_dataset
from elucidate.data.bundled import DIGIT_NAMES
from elucidate.denoiser import Denoiser, Guided
from elucidate.formulations import EDM
from elucidate.nets import build_network

ARCHS = ["unet", "ddpmpp", "ncsnpp", "adm"]
KINDS = {"none": {}, "adm": dict(label_dim=4), "concat": dict(cond_channels=2), "crossattn": dict(context_dim=6),
         "hybrid": dict(cond_channels=2, context_dim=6)}
TINY_NET = dict(model_channels=8, num_blocks=1, dropout=0.0, channel_mult=(1, 2, 2), attn_resolutions=(6,))

pytestmark = pytest.mark.usefixtures("one_thread")


def net_for(arch: str, seed: int = 0, res=(12, 20), **kwargs):
    torch.manual_seed(seed)
    return build_network(arch, img_resolution=res, in_channels=3, **{**TINY_NET, **kwargs})


@torch.no_grad()
def perturb(net: torch.nn.Module, seed: int = 1, scale: float = 0.05, skip=()) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for name, p in net.named_parameters():
        step = scale * torch.randn(p.shape, generator=gen)
        if not any(s in name for s in skip):
            p.add_(step)
    return net


def conditions(net, batch: int, tokens: int = 3, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    if net.label_dim:
        out["class_labels"] = torch.arange(batch) % net.label_dim
    if net.cond_channels:
        out["concat"] = torch.randn(batch, net.cond_channels, *net.img_resolution, generator=g)
    if net.context_dim:
        out["context"] = torch.randn(batch, tokens, net.context_dim, generator=g)
    return out


# --- networks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", [*ARCHS, "edm2"])
def test_every_network_takes_every_conditioning(arch, kind):
    net = perturb(net_for(arch, **KINDS[kind]))
    x = torch.randn(3, 3, 12, 20)  # non-square
    cond = conditions(net, 3, tokens=2 + [*ARCHS, "edm2"].index(arch))  # any number of tokens (one ignores queries)
    out = net(x, torch.tensor([-1.0, 0.0, 0.7]), **cond)
    assert out.shape == (3, 3, 12, 20)
    out.square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kind != "none":
        other = {k: (v.flip(0) if k == "class_labels" else -v) for k, v in cond.items()}
        assert (net(x, torch.zeros(3), **other) - net(x, torch.zeros(3), **cond)).abs().max() > 1e-4


# Computed on main (1401c6f) before conditioning existed: sha256 of the sorted "key:[shape]" lines of the
# state dict, the sum of |initial parameters|, and [sum, sum |.|, out[0,0,0,0], out[1,2,11,19]] of a
# perturbed label-conditional (label_dim=4) network's output.
MAIN = {"unet": ("0171b3eb7a52ad98", 2410.872, [244.01642, 367.45017, 0.299216, 0.114286]),
        "ddpmpp": ("1523a01bdb98b545", 5233.223, [136.88702, 361.57845, 0.16209, -0.319098]),
        "ncsnpp": ("a2742b2b3286693b", 5530.495, [271.23222, 343.86517, -0.230263, -0.011229]),
        "adm": ("5c5b889148a91121", 4041.0, [-215.87796, 354.28648, -0.258962, 0.011352])}


@pytest.mark.parametrize("arch", ARCHS)
def test_unconditional_networks_are_unchanged(arch):
    net = net_for(arch, label_dim=4)
    state = net.state_dict()
    keys = hashlib.sha256("\n".join(f"{k}:{list(v.shape)}" for k, v in sorted(state.items())).encode()).hexdigest()
    assert keys[:16] == MAIN[arch][0]
    assert sum(float(v.double().abs().sum()) for v in state.values()) == pytest.approx(MAIN[arch][1], abs=2e-3)
    perturb(net, seed=1)
    x = torch.randn(2, 3, 12, 20, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = net.eval()(x, torch.tensor([-0.5, 0.8]), class_labels=torch.tensor([1, 3])).double()
    got = [float(out.sum()), float(out.abs().sum()), float(out[0, 0, 0, 0]), float(out[1, 2, 11, 19])]
    assert got == pytest.approx(MAIN[arch][2], abs=2e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_conditional_network_ignores_its_conditions(arch):
    """Same seed: the conditional network's other parameters are the unconditional one's, its new layers
    start at zero, so it computes the unconditional function whatever the concat / context."""
    plain, cond = net_for(arch), net_for(arch, cond_channels=2, context_dim=6)
    plain_state, cond_state = plain.state_dict(), cond.state_dict()
    widened = [k for k in plain_state if plain_state[k].shape != cond_state[k].shape]
    assert len(widened) == 1 and cond_state[widened[0]].shape[1] == 3 + 2  # the first convolution
    assert torch.equal(cond_state[widened[0]][:, :3], plain_state[widened[0]])
    assert not cond_state[widened[0]][:, 3:].any()
    assert all(torch.equal(cond_state[k], v) for k, v in plain_state.items() if k not in widened)
    assert all(".xattn." in k for k in set(cond_state) - set(plain_state))
    # train-like state: every shared weight off zero, the new layers' q/k/v too (output projections stay 0)
    perturb(plain)
    perturb(cond, seed=9, skip=(*plain_state, "xattn.proj"))
    with torch.no_grad():
        for k, v in plain.state_dict().items():
            cond.state_dict()[k][:, :3].copy_(v) if k in widened else cond.state_dict()[k].copy_(v)
    x, c = torch.randn(2, 3, 12, 20), torch.randn(2)
    ref = cond(x, c)
    torch.testing.assert_close(ref, plain(x, c), rtol=1e-5, atol=1e-6)
    for seed in (1, 2):
        assert torch.equal(cond(x, c, **conditions(cond, 2, seed=seed)), ref)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", ["concat", "crossattn"])
def test_a_trained_network_uses_its_condition(arch, kind):
    """Target +1 or -1 everywhere, told only by the condition: unconditionally the best MSE is 1."""
    net = net_for(arch, res=8, channel_mult=(1, 2), attn_resolutions=(4,), **KINDS[kind])
    g = torch.Generator().manual_seed(0)
    signs = torch.tensor([1.0, -1.0]).repeat(4)
    if kind == "concat":
        key, values = "concat", signs.reshape(-1, 1, 1, 1) * torch.ones(8, 2, 8, 8)
    else:
        key, values = "context", signs.reshape(-1, 1, 1) * torch.randn(1, 2, 6, generator=g).expand(8, -1, -1)
    target = signs.reshape(-1, 1, 1, 1).expand(8, 3, 8, 8)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(40):
        x = torch.randn(8, 3, 8, 8, generator=g)
        loss = (net(x, torch.zeros(8), **{key: values}) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(8, 3, 8, 8, generator=g)
    with torch.no_grad():
        assert (net(x, torch.zeros(8), **{key: values}) - target).square().mean() < 0.3
        assert (net(x, torch.zeros(8), **{key: values}) - net(x, torch.zeros(8))).abs().mean() > 0.3


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_rows_equal_separate_forwards(arch):
    """Rows with zeros as concat/context (the "no condition" of guidance) batched with conditional rows
    give what the two groups give alone; zeros are exactly None; Guided is one such forward."""
    net = perturb(net_for(arch, cond_channels=2, context_dim=6)).eval()
    x, c = torch.randn(4, 3, 12, 20), torch.randn(4)
    cond = conditions(net, 4)
    drop = torch.tensor([False, True, False, True])
    mixed = {k: torch.where(drop.reshape(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v) for k, v in cond.items()}
    with torch.no_grad():
        out = net(x, c, **mixed)
        keep = ~drop
        alone = net(x[keep], c[keep], **{k: v[keep] for k, v in cond.items()})
        null = net(x[drop], c[drop])
        torch.testing.assert_close(out[keep], alone, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out[drop], null, rtol=1e-5, atol=1e-6)
        assert (alone - net(x[keep], c[keep])).abs().max() > 1e-3  # the perturbed condition layers matter
        D = Denoiser(net, EDM())
        sigma = torch.tensor([0.3, 1.0, 2.0, 5.0])
        w = 2.5
        guided = Guided(D, w)(x, sigma, **cond)
        expected = D(x, sigma) + w * (D(x, sigma, **cond) - D(x, sigma))
        torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)


def test_zero_tokens_are_padding():
    net = perturb(net_for("adm", context_dim=6)).eval()
    x, c = torch.randn(2, 3, 12, 20), torch.randn(2)
    context = torch.randn(2, 3, 6)
    padded = torch.cat([context, torch.zeros(2, 2, 6)], dim=1)
    padded[1] = torch.cat([context[1, :2], torch.zeros(1, 6), context[1, 2:], torch.zeros(1, 6)])  # anywhere
    with torch.no_grad():
        torch.testing.assert_close(net(x, c, context=padded), net(x, c, context=context), rtol=1e-5, atol=1e-6)
        one = net(x[:1], c[:1], context=context[:1])
        torch.testing.assert_close(net(x[:1].expand(2, -1, -1, -1), c[:1].expand(2), context=context[:1]),
                                   one.expand(2, -1, -1, -1), rtol=1e-5, atol=1e-6)  # one context broadcasts


@pytest.mark.parametrize("arch", ["unet", "ddpmpp"])
def test_conditions_under_bf16_autocast(arch):
    net = perturb(net_for(arch, cond_channels=2, context_dim=6))
    x, c = torch.randn(2, 3, 12, 20), torch.randn(2)
    cond = conditions(net, 2)
    ref = net(x, c, **cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, c, **cond)
        out.square().mean().backward()
    assert out.dtype == torch.float32 and (out - ref).norm() / ref.norm() < 0.05
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_conditions_are_one_line_errors_naming_the_key(arch):
    net, plain = net_for(arch, cond_channels=2, context_dim=6), net_for(arch)
    x, c = torch.randn(2, 3, 12, 20), torch.zeros(2)
    cases = [(net, dict(concat=torch.zeros(2, 3, 12, 20)), r"concat must have shape \[2, 2, 12, 20\]"),
             (net, dict(concat=torch.zeros(2, 2, 20, 12)), r"concat must have shape \[2, 2, 12, 20\]"),
             (net, dict(concat=torch.zeros(3, 2, 12, 20)), r"concat .* got \[3, 2, 12, 20\]"),
             (net, dict(concat=torch.zeros(2, 12, 20)), r"concat must have shape"),
             (net, dict(context=torch.zeros(2, 4, 5)), r"context must have shape \[2, L, 6\]"),
             (net, dict(context=torch.zeros(2, 6)), r"context must have shape \[2, L, 6\] .* got \[2, 6\]"),
             (net, dict(context=torch.zeros(2, 0, 6)), r"context must have shape"),
             (net, dict(context=torch.zeros(2, 1, 6, dtype=torch.long)), "context must be a float tensor"),
             (plain, dict(concat=torch.zeros(2, 2, 12, 20)), r"cond_channels=0\) but concat was given"),
             (plain, dict(context=torch.zeros(2, 1, 6)), r"context_dim=0\) but context was given")]
    for model, kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            model(x, c, **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="accepted: class_labels, augment_labels, concat, context"):
        net(x, c, text=torch.zeros(2, 1, 6))
    with pytest.raises(ValueError, match="cond_channels must be an int >= 0"):
        net_for(arch, cond_channels=-1)


# --- data --------------------------------------------------------------------------------------

def test_digits_derived_conditions():
    plain = build_dataset({"dataset": "digits", "max_size": 20})
    assert plain.get_conditions(torch.arange(3)) == {} and plain.cond_channels == 0 and plain.context_shape is None
    data = build_dataset({"dataset": "digits", "max_size": 20, "xflip": True, "condition": ["lowres", "class_tokens"]})
    assert data.cond_channels == 1 and data.context_shape == (5, 31)
    idx = torch.tensor([0, 3, 20 + 3])  # item 3 and its mirror image
    images, labels = data.get_batch(idx)
    cond = data.get_conditions(idx)
    assert cond["concat"].shape == (3, 1, 8, 8) and cond["context"].shape == (3, 5, 31)
    # lowres: each 2x2 block is the block's mean image value (normalization is affine); mirrored with its image
    blocks = images.reshape(3, 1, 4, 2, 4, 2).mean(dim=(3, 5))
    torch.testing.assert_close(cond["concat"][:, :, ::2, ::2], blocks)
    torch.testing.assert_close(cond["concat"][2], cond["concat"][1].flip(-1))
    # class_tokens spell the label's name; padding tokens are zero
    letters = "abcdefghijklmnopqrstuvwxyz"
    for tokens, label in zip(cond["context"], labels):
        real = tokens[tokens.ne(0).any(dim=1)]
        assert "".join(letters[int(t[:26].argmax())] for t in real) == DIGIT_NAMES[int(label)]
        assert [int(t[26:].argmax()) for t in real] == list(range(len(real)))
    with pytest.raises(DataError, match="condition class_tokens needs the labels"):
        build_dataset({"dataset": "digits", "labels": False, "condition": "class_tokens"})
    with pytest.raises(DataError, match="condition='text'"):
        build_dataset({"dataset": "digits", "condition": "text"})
    with pytest.raises(DataError, match="even height and width"):
        build_dataset({"dataset": "digits", "resolution": 9, "condition": "lowres"})


def test_npz_conditions(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 12, 3), dtype=np.uint8)  # NHWC
    cond = rng.integers(0, 256, (6, 4, 6, 2), dtype=np.uint8)  # NHWC at half resolution
    context = rng.standard_normal((6, 4, 5)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, images=images, seg=cond, text=context, labels=np.arange(6) % 2, vec=context[:, 0])
    data = build_dataset({"dataset": "npz", "path": str(path), "key": "images", "labels_key": "labels",
                          "cond_key": "seg", "context_key": "text", "layout": "NHWC", "xflip": True})
    assert data.cond_channels == 2 and data.context_shape == (4, 5) and data.num_classes == 2
    got = data.get_conditions(torch.tensor([1, 7]))
    assert got["concat"].shape == (2, 2, 8, 12)  # resized to the images' size
    assert -1 <= float(got["concat"].min()) and float(got["concat"].max()) <= 1  # uint8 -> [-1, 1] like the images
    torch.testing.assert_close(got["concat"][1], got["concat"][0].flip(-1))
    assert torch.equal(got["context"], torch.from_numpy(context[[1, 1]]))
    std = build_dataset({"dataset": "npz", "path": str(path), "key": "images", "cond_key": "seg", "layout": "NHWC",
                         "cond_normalize": "standardize"}).get_conditions(torch.arange(6))["concat"]
    torch.testing.assert_close(std.std(dim=(0, 2, 3), unbiased=False), torch.full((2,), 0.5), rtol=1e-3, atol=1e-4)
    one = build_dataset({"dataset": "npz", "path": str(path), "key": "images", "context_key": "vec", "layout": "NHWC"})
    assert one.context_shape == (1, 5)  # [N, D] is one token per item
    # the images array is found without `key` when the other arrays are named
    np.savez(tmp_path / "e.npz", images=images, seg=cond[:5])
    with pytest.raises(DataError, match="seg: has 5 items but the images have 6"):
        build_dataset({"dataset": "npz", "path": str(tmp_path / "e.npz"), "cond_key": "seg", "layout": "NHWC"})
    with pytest.raises(DataError, match="no condition array 'nope'"):
        build_dataset({"dataset": "npz", "path": str(path), "key": "images", "cond_key": "nope"})
    with pytest.raises(DataError, match="context must be a float"):
        build_dataset({"dataset": "npz", "path": str(path), "key": "images", "context_key": "labels"})
    with pytest.raises(DataError, match="cond_key applies only to dataset 'npz'"):
        build_dataset({"dataset": "digits", "cond_key": "seg"})
    with pytest.raises(DataError, match="condition applies only to the bundled"):
        build_dataset({"dataset": "npz", "path": str(path), "condition": "lowres"})


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_folders_as_classes(tmp_path):
    files = {"dog/a.png": 10, "cat/b.png": 20, "cat/c.png": 30, "zebra/x/d.png": 40}
    for name, value in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(_png(value))
    data = build_dataset({"dataset": "folder", "path": str(tmp_path), "labels": True})
    assert data.class_names == ["cat", "dog", "zebra"] and data.num_classes == 3
    images, labels = data.get_batch(torch.arange(4))  # path order: cat/b, cat/c, dog/a, zebra/x/d
    assert labels.tolist() == [0, 0, 1, 2]
    assert build_dataset({"dataset": "folder", "path": str(tmp_path), "labels": True, "max_size": 1}).num_classes == 3
    assert build_dataset({"dataset": "folder", "path": str(tmp_path)}).num_classes == 0  # default: dataset.json only
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, value in files.items():
            z.writestr(name, _png(value))
    assert build_dataset({"dataset": "zip", "path": str(archive), "labels": True}).get_batch(
        torch.arange(4))[1].tolist() == [0, 0, 1, 2]
    (tmp_path / "loose.png").write_bytes(_png(5))
    with pytest.raises(DataError, match="'loose.png' is not in a sub-folder"):
        build_dataset({"dataset": "folder", "path": str(tmp_path), "labels": True})
    names = sorted([*files, "loose.png"])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, i % 2] for i, n in enumerate(names)]}))
    data = build_dataset({"dataset": "folder", "path": str(tmp_path), "labels": True})  # dataset.json wins
    assert data.class_names is None and data.get_batch(torch.arange(5))[1].tolist() == [0, 1, 0, 1, 0]


# --- build_network_for and DataInfo --------------------------------------------------------------

@pytest.fixture(scope="module")
def config_with(tiny_config):
    """``config_with(**network)``: the parsed tiny run config with those network keys."""
    return lambda **network: parse_config(tiny_config(network=network))


DIGITS = DataInfo(1, (8, 8), 10)
DIGITS_COND = DataInfo(1, (8, 8), 10, cond_channels=1, context_shape=(5, 31))


@pytest.mark.parametrize("conditioning,sizes", [("none", (0, 0, 0)), ("adm", (10, 0, 0)), ("concat", (0, 1, 0)),
                                                ("crossattn", (0, 0, 31)), ("hybrid", (0, 1, 31))])
def test_build_network_for_sizes_the_conditions_from_the_data(config_with, conditioning, sizes):
    net = build_network_for(config_with(conditioning=conditioning), DIGITS_COND)
    assert (net.label_dim, net.cond_channels, net.context_dim) == sizes
    assert net.stem.in_channels == 1 + sizes[1]


def test_build_network_for_rejects_mismatches(config_with):
    cases = [(dict(conditioning="crossattn"), DIGITS, r"network.conditioning = crossattn needs a context"),
             (dict(conditioning="concat"), DIGITS, r"network.conditioning = concat needs a spatial condition"),
             (dict(conditioning="adm"), DataInfo(1, (8, 8)), r"network.conditioning = adm needs class labels"),
             (dict(conditioning="text"), DIGITS, r"network.conditioning = 'text': expected one of none, adm"),
             (dict(conditioning="concat", label_dim=10), DIGITS_COND, "network.label_dim = 10 contradicts"),
             (dict(cond_channels=3), DIGITS_COND, r"network.cond_channels = 3 does not match the data \(1\)"),
             (dict(context_dim=31), DIGITS, r"network.context_dim = 31 needs a context"),
             (dict(context_dim=4.5), DIGITS_COND, "network.context_dim = 4.5: expected 'auto' or an integer"),
             (dict(label_dim=5), DIGITS, r"network.label_dim = 5 does not match the data \(10\)")]
    for network, info, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            build_network_for(config_with(**network), info)
        assert "\n" not in str(err.value)
    # explicit keys without `conditioning`, as label_dim always worked; auto on unlabeled data stays 0
    net = build_network_for(config_with(label_dim="auto", cond_channels="auto", context_dim=31), DIGITS_COND)
    assert (net.label_dim, net.cond_channels, net.context_dim) == (10, 1, 31)
    assert build_network_for(config_with(label_dim="auto"), DataInfo(1, (8, 8))).label_dim == 0
    assert build_network_for(config_with(context_dim="auto"), DIGITS).context_dim == 0
    assert build_network_for(config_with(conditioning="adm", label_dim=12), DIGITS).label_dim == 12


def test_data_info_round_trip_and_old_metadata():
    data = build_dataset({"dataset": "digits", "max_size": 10, "condition": ["lowres", "class_tokens"]})
    info = DataInfo.from_dataset(data)
    assert info == DataInfo(1, (8, 8), int(data.labels.max()) + 1, 1, (5, 31))
    assert DataInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    old = {"channels": 1, "resolution": [8, 8], "num_classes": 10}  # checkpoints written before conditions
    assert DataInfo.from_dict(old) == DataInfo(1, (8, 8), 10, 0, None)
    assert DataInfo.from_dataset(build_dataset({"dataset": "digits", "max_size": 10})).context_shape is None


@pytest.mark.parametrize("conditioning, condition", [("concat", "lowres"), ("crossattn", "class_tokens"),
                                                     ("hybrid", ["lowres", "class_tokens"])])
def test_the_training_loop_feeds_the_data_conditions(tmp_path, monkeypatch, tiny_config, conditioning, condition):
    from elucidate.training import Trainer

    raw = tiny_config(data={"max_size": 32, "condition": condition},
                      network={"attn_resolutions": [4], "conditioning": conditioning},
                      training={"steps": 1, "batch_size": 4, "checkpoint_every": 1})
    trainer = Trainer(parse_config(raw), tmp_path / "run", progress=False, log=lambda *a: None)
    seen = {}
    forward = type(trainer.net).forward

    def spy(self, x, c_noise, **cond):
        seen.update({k: v for k, v in cond.items() if v is not None})
        return forward(self, x, c_noise, **cond)

    monkeypatch.setattr(type(trainer.net), "forward", spy)
    trainer.train_step(0)
    wanted = {"concat": conditioning in ("concat", "hybrid"),
              "context": conditioning in ("crossattn", "hybrid")}
    assert {k for k, on in wanted.items() if on} <= set(seen)
    if wanted["concat"]:
        assert seen["concat"].shape[1] == trainer.net.cond_channels
    if wanted["context"]:
        assert seen["context"].shape[-1] == trainer.net.context_dim
