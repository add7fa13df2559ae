"""EDM2's U-Net (``arch: edm2``): given NVlabs/edm2's tensors it computes edm2's ``UNet``, in eval and training
mode (forced weight normalization); its layers preserve magnitudes; its extra conditions start inert.

The fixtures in tests/fixtures/edm2/ were produced with edm2's own ``training/networks_edm2.py`` (with its
``torch_utils`` and ``dnnlib``) at commit 4bf8162f601bcc09472ce8a32dd0cbe8889dc8fc, torch 2.13 CPU, float32,
run from a scratch checkout outside this repository; no edm2 code is in this repository. For each case,
edm2's ``UNet`` was built after ``torch.manual_seed(0)`` with the constructor arguments in the file's
``edm2_kwargs`` metadata (all with ``channels_per_head`` small enough that the attention blocks have heads):

* ``uncond``: ``img_resolution=8, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1, 2],
  num_blocks=1, attn_resolutions=[4], channels_per_head=16`` (edm2's default balances and clip_act);
* ``cond``: ``img_resolution=16, img_channels=4, label_dim=5, model_channels=16, channel_mult=[1, 2, 2],
  channel_mult_noise=1, channel_mult_emb=3, num_blocks=1, attn_resolutions=[8], channels_per_head=16,
  label_balance=0.4, concat_balance=0.6, res_balance=0.25, attn_balance=0.35, clip_act=1.5`` (clipping active);
* ``attn2``: ``img_resolution=16, img_channels=2, label_dim=0, model_channels=16, channel_mult=[1, 2, 2],
  num_blocks=2, attn_resolutions=[8, 4], channels_per_head=8, resample_filter=[1, 3, 3, 1]``.

``init_stats`` holds [sum, sum |.|, sum of squares] of every initial tensor (edm2's draws from seed 0). Every
parameter was then overwritten by :func:`generated_weights` (the file stores the names, shapes and a checksum
per tensor), the buffers ``emb_fourier.freqs`` / ``phases`` are stored verbatim as ``state.<key>``, and the
inputs (``x`` from ``torch.Generator().manual_seed(7)`` randn, ``noise_labels = ln([0.02, 0.7, 40]) / 4``,
``class_labels`` one-hot 0, one-hot label_dim-1 and all zeros) went through ``net.eval()`` under
``torch.no_grad()`` as ``net(x, noise_labels, class_labels)`` -> ``output``; then once through ``net.train()``
(dropout 0) -> ``train_output``, after which ``train_stats`` are the stats of the parameters edm2's forced
weight normalization had rewritten. ``precond_extra_keys`` lists edm2's ``Precond`` tensors outside ``unet.``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from elucidate.errors import UserError
from elucidate.nets import EDM2UNet, build_network, load_edm2_network
from elucidate.nets.edm2 import PRECOND_KEYS, MPConv, edm2_network_kwargs, mp_cat, mp_silu, mp_sum

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "edm2"
CASES = ("uncond", "cond", "attn2")

pytestmark = pytest.mark.usefixtures("one_thread")


def generated_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights: uniform in +-sqrt(3 / fan_in) (matrices, kernels) or +-0.5 (scalar gains),
    drawn in sorted key order from ``torch.Generator().manual_seed(1234)``."""
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        bound = math.sqrt(3 * shape[0] / math.prod(shape)) if len(shape) >= 2 else 0.5
        out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return out


def load_case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(edm2's UNet state dict, the fixture's tensors, the metadata with JSON values decoded)."""
    with safe_open(DATA / f"{name}.safetensors", "pt") as f:
        meta = {k: v if k in ("edm2_commit", "torch") else json.loads(v) for k, v in f.metadata().items()}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = generated_weights(meta["shapes"])
    for key, total in meta["checksums"].items():
        assert abs(float(weights[key].double().sum()) - total) < 1e-4, f"generated {key} differs from the fixture's"
    state = {**weights, **{k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}}
    return state, tensors, meta


def call(net: torch.nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return net(t["x"], t["noise_labels"], class_labels=t.get("class_labels"))


def stats(t: torch.Tensor) -> list[float]:
    t = t.detach().double()
    return [float(t.sum()), float(t.abs().sum()), float(t.square().sum())]


def assert_matches_edm2(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_load_edm2_network_matches_edm2(name, precond, tmp_path):
    state, t, meta = load_case(name)
    if precond:  # a whole Precond's state dict: unet.* and the (ignored) uncertainty head
        assert tuple(meta["precond_extra_keys"]) == PRECOND_KEYS
        state = {**{f"unet.{k}": v for k, v in state.items()}, "logvar_fourier.freqs": torch.randn(8),
                 "logvar_fourier.phases": torch.rand(8), "logvar_linear.weight": torch.randn(1, 8)}
    path = tmp_path / "net.safetensors"
    save_file(state, path)
    kw = meta["edm2_kwargs"]
    net = load_edm2_network(path, channels_per_head=kw["channels_per_head"],  # not in the tensors
                            **{k: kw[k] for k in kw if "balance" in k or k in ("clip_act", "resample_filter")})
    assert isinstance(net, EDM2UNet) and not net.training and net.out_channels == kw["img_channels"]
    assert_matches_edm2(call(net, t), t["output"])


@pytest.mark.parametrize("name", CASES)
def test_built_from_edm2_arguments_and_seed(name):
    """edm2's own constructor arguments (``img_channels``) build our network; the same seed draws edm2's
    initial tensors; the tensors determine the structural arguments."""
    state, t, meta = load_case(name)
    torch.manual_seed(0)
    net = build_network("edm2", **meta["edm2_kwargs"])
    init = net.state_dict()
    assert set(init) == set(meta["init_stats"])
    for key, expected in meta["init_stats"].items():
        assert stats(init[key]) == pytest.approx(expected, rel=1e-6, abs=1e-5), key
    net.load_state_dict(state)
    assert_matches_edm2(call(net.eval(), t), t["output"])
    inferred, kw = edm2_network_kwargs(state), meta["edm2_kwargs"]
    mc = inferred["model_channels"]
    assert [mc * m for m in inferred["channel_mult"]] == [kw["model_channels"] * m for m in kw["channel_mult"]]
    assert (inferred["img_resolution"], inferred["in_channels"], inferred["label_dim"], inferred["num_blocks"],
            inferred["attn_resolutions"]) == (kw["img_resolution"], kw["img_channels"], kw["label_dim"],
                                              kw["num_blocks"], tuple(kw["attn_resolutions"]))


@pytest.mark.parametrize("name", CASES)
def test_training_mode_forced_weight_normalization_matches_edm2(name):
    """One training-mode call rewrites the weights as edm2's does (unit magnitude per output channel)."""
    state, t, meta = load_case(name)
    torch.manual_seed(0)
    net = build_network("edm2", **meta["edm2_kwargs"])
    net.load_state_dict(state)
    net.train()
    assert_matches_edm2(call(net, t), t["train_output"])
    for key, p in net.named_parameters():
        assert stats(p) == pytest.approx(meta["train_stats"][key], rel=2e-5, abs=1e-5), key
        if p.ndim >= 2:  # RMS 1 per output channel, up to edm2's eps: 1 / (1 + 1e-4 sqrt(fan_in) / ||w_before||)
            rms = p.detach().flatten(1).square().mean(dim=1).sqrt()
            norm = state[key].flatten(1).norm(dim=1)
            torch.testing.assert_close(rms, 1 / (1 + 1e-4 * math.sqrt(p[0].numel()) / norm), rtol=1e-5, atol=0)


# --- loading errors ---------------------------------------------------------------------------------

@pytest.fixture
def uncond(tmp_path):
    return load_case("uncond")[0], tmp_path / "net.safetensors"


def test_unexpected_missing_and_misshaped_tensors(uncond):
    state, path = uncond
    save_file({**state, "enc.8x8_block0.bogus.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"^unexpected key 'enc\.8x8_block0\.bogus\.weight' in .*net\.safetensors"):
        load_edm2_network(path, channels_per_head=16)
    save_file({k: v for k, v in state.items() if k != "dec.8x8_block1.emb_gain"}, path)
    with pytest.raises(UserError, match=r"^missing key 'dec\.8x8_block1\.emb_gain' in .*: the edm2 network"):
        load_edm2_network(path, channels_per_head=16)
    save_file({**state, "dec.4x4_in0.attn_qkv.weight": state["dec.4x4_in0.attn_qkv.weight"][:-3]}, path)
    with pytest.raises(UserError, match=r"^edm2 key 'dec\.4x4_in0\.attn_qkv\.weight' in .* has shape \[93, 32, 1, 1\] "
                                        r"but .* expects \[96, 32, 1, 1\]$"):
        load_edm2_network(path, channels_per_head=16)
    save_file(state, path)
    with pytest.raises(UserError, match=r"emb_label\.weight"):  # an argument that contradicts the tensors
        load_edm2_network(path, label_dim=3)
    save_file({"unet.out_gain": state["out_gain"], "ema.out_gain": state["out_gain"].clone()}, path)
    with pytest.raises(UserError, match=r"unexpected key 'ema\.out_gain' .*neither 'unet\.\*' nor the Precond"):
        load_edm2_network(path)
    ours = build_network("unet", img_resolution=8, in_channels=1).state_dict()
    with pytest.raises(UserError, match=r"missing key 'emb_fourier\.freqs' in the edm2 state dict"):
        edm2_network_kwargs(ours)


def test_file_errors_and_explicit_torch_load(uncond):
    state, path = uncond
    with pytest.raises(UserError, match="does not exist"):
        load_edm2_network(path)
    pickled = path.with_suffix(".pt")
    torch.save(state, pickled)
    with pytest.raises(UserError, match=r"not a readable safetensors file .*allow_torch_load=True"):
        load_edm2_network(pickled)
    net = load_edm2_network(pickled, allow_torch_load=True, channels_per_head=16)
    assert torch.equal(net.emb_noise.weight, state["emb_noise.weight"])
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)
    with pytest.raises(UserError, match=r"not a state dict readable by torch\.load\(weights_only=True\)"):
        load_edm2_network(pickled, allow_torch_load=True)


# --- magnitude preservation and our conditions -------------------------------------------------------

def test_layers_preserve_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 64, generator=g), torch.randn(4096, 32, generator=g)

    def rms(t):
        return float(t.detach().square().mean().sqrt())

    assert rms(mp_silu(a)) == pytest.approx(1, abs=0.02)
    assert rms(mp_sum(a[:, :32], b, 0.3)) == pytest.approx(1, abs=0.02)
    assert rms(mp_cat(a, b, t=0.7)) == pytest.approx(1, abs=0.02)
    conv = MPConv(64, 48, ())
    conv.weight.data.mul_(37.0)  # any scale: only the direction of each row matters
    assert rms(conv(a)) == pytest.approx(1, abs=0.03)


def test_attention_needs_divisible_heads_and_arguments_are_checked():
    with pytest.raises(ValueError, match=r"out_channels \(48\) divisible by its number of heads \(5"):
        build_network("edm2", img_resolution=8, in_channels=1, model_channels=24, channel_mult=(1, 2),
                      attn_resolutions=(4,), channels_per_head=9)
    with pytest.raises(ValueError, match="in_channels=2 and img_channels=3 differ"):
        build_network("edm2", img_resolution=8, in_channels=2, img_channels=3)
    with pytest.raises(ValueError, match=r"res_balance must lie in \[0, 1\]"):
        build_network("edm2", img_resolution=8, in_channels=1, res_balance=1.5)


def test_fresh_conditional_network_computes_the_unconditional_one():
    """Same seed: only the first convolution is widened (zero weights after the constant channel, magnitude
    still measured over the image's fan-in); cross-attention and augmentation start with balance/gain 0."""
    kw = dict(img_resolution=(8, 12), in_channels=3, model_channels=8, channel_mult=(1, 2), num_blocks=1,
              attn_resolutions=(4,), channels_per_head=8)
    torch.manual_seed(0)
    plain = build_network("edm2", **kw)
    torch.manual_seed(0)
    cond = build_network("edm2", cond_channels=2, context_dim=6, augment_dim=3, **kw)
    ps, cs = plain.state_dict(), cond.state_dict()
    assert cs["enc.8x12_conv.weight"].shape[1] == 3 + 1 + 2 and not cs["enc.8x12_conv.weight"][:, 4:].any()
    assert all(torch.equal(cs[k], v) for k, v in ps.items() if k != "enc.8x12_conv.weight")
    assert {k.split(".")[0] for k in set(cs) - set(ps)} == {"emb_augment", "augment_gain", "enc", "dec"}
    assert all(".xattn." in k for k in set(cs) - set(ps) if k.startswith(("enc", "dec")))
    with torch.no_grad():
        for p in [*plain.parameters(), *cond.parameters()]:
            if p.ndim == 0:
                p.fill_(0.7) if p is not cond.augment_gain else None  # emb/out gains on; new balances stay 0
        for name, p in cond.named_parameters():
            if name.endswith(".balance"):
                p.zero_()
    x, c = torch.randn(2, 3, 8, 12), torch.randn(2)
    g = torch.Generator().manual_seed(3)
    cond_inputs = dict(concat=torch.randn(2, 2, 8, 12, generator=g), context=torch.randn(2, 4, 6, generator=g),
                       augment_labels=torch.randn(2, 3, generator=g))
    with torch.no_grad():
        ref, out = plain.eval()(x, c), cond.eval()(x, c, **cond_inputs)
        assert ref.abs().max() > 0.01
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # summing zeros too: round-off only
        assert torch.equal(cond(x, c), out)  # the conditions add exactly nothing
