"""Porting NVlabs/edm networks: our SongUNet / DhariwalUNet, given edm's tensors, compute edm's function.

The fixtures in tests/fixtures/edm/ were produced with edm's own ``training/networks.py`` (with its
``torch_utils`` and ``dnnlib``) at commit 008a4e5316c8e3bfe61a62f874bddba254295afb, torch 2.13 CPU,
float32; no edm code is in this repository. For each case, edm's network was built (after
``torch.manual_seed(0)``) with the constructor arguments stored in the file's ``edm_kwargs`` metadata:

* ``ddpmpp``: ``SongUNet(img_resolution=16, in_channels=3, out_channels=3, label_dim=4, augment_dim=9,
  model_channels=16, channel_mult=[1, 2, 2], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8],
  dropout=0.0)`` (positional embedding, standard encoder/decoder, [1, 1] filter);
* ``ncsnpp``: the same without labels/augmentation, with ``embedding_type="fourier",
  channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1]``;
* ``songunet_skip``: ``in_channels=out_channels=2, num_blocks=2, attn_resolutions=[8, 4],
  encoder_type="skip", decoder_type="skip", resample_filter=[1, 3, 3, 1]``, otherwise as ``ddpmpp``
  without labels;
* ``adm``: ``DhariwalUNet(img_resolution=16, in_channels=3, out_channels=6, label_dim=5, augment_dim=2,
  model_channels=32, channel_mult=[1, 2, 4], channel_mult_emb=2, num_blocks=1, attn_resolutions=[8, 4],
  dropout=0.0)`` -- twice the output channels, as edm's iDDPMPrecond builds it; two attention heads at 4x4.

Every parameter was then overwritten by :func:`generated_weights` (so no tensor is zero and every
path carries signal; the file stores only the parameter names and shapes, plus a checksum per
tensor), edm's buffers (``resample_filter``, ``map_noise.freqs``) are stored verbatim as
``state.<key>``, and the inputs (``x`` and ``augment_labels`` from ``torch.Generator().manual_seed(7)``
randn, the ``noise_labels`` in the file, one-hot ``class_labels`` of ``arange(3) % label_dim``) went
through ``net.eval()`` under ``torch.no_grad()`` as ``net(x, noise_labels, class_labels,
augment_labels)``; its result is ``output``. Before the layouts were aligned these cases differed
from edm by 10-20% of the output's scale; now by ~3e-7.
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
from elucidate.nets import build_network
from elucidate.nets.edm_port import EDM_ARCHS, convert_edm_state_dict, edm_network_kwargs, load_edm_network

DATA = Path(__file__).resolve().parents[1] / "fixtures" / "edm"
CASES = {"ddpmpp": "ddpmpp", "ncsnpp": "ncsnpp", "songunet_skip": "ddpmpp", "adm": "adm"}  # fixture -> arch

pytestmark = pytest.mark.usefixtures("one_thread")


def generated_weights(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """Deterministic weights: uniform in +-sqrt(3 / fan_in) (matrices, kernels) or +-0.5 (vectors),
    drawn in sorted key order from ``torch.Generator().manual_seed(1234)``."""
    gen = torch.Generator().manual_seed(1234)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        bound = math.sqrt(3 * shape[0] / math.prod(shape)) if len(shape) >= 2 else 0.5
        out[key] = (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return out


def load_case(name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(edm's state dict, the fixture's tensors, edm's constructor arguments)."""
    with safe_open(DATA / f"{name}.safetensors", "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    weights = generated_weights(json.loads(meta["shapes"]))
    for key, total in json.loads(meta["checksums"]).items():
        assert abs(float(weights[key].double().sum()) - total) < 1e-4, f"generated {key} differs from the fixture's"
    state = {**weights, **{k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}}
    return state, tensors, json.loads(meta["edm_kwargs"])


def call(net: torch.nn.Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return net(t["x"], t["noise_labels"], class_labels=t.get("class_labels"),
                   augment_labels=t.get("augment_labels"))


def assert_matches_edm(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("name", CASES)
def test_load_edm_network_matches_edm(name, tmp_path):
    state, t, edm_kwargs = load_case(name)
    path = tmp_path / "net.safetensors"
    save_file({f"model.{k}": v for k, v in state.items()}, path)  # as exported from a whole Precond
    net = load_edm_network(path, CASES[name])  # every structural argument read off the tensors
    assert not net.training and net.out_channels == edm_kwargs["in_channels"]
    assert_matches_edm(call(net, t), t["output"][:, :net.out_channels])


@pytest.mark.parametrize("name", CASES)
def test_convert_with_edm_constructor_arguments(name):
    """Our constructors take edm's argument names: edm's kwargs build a network the converted state fits."""
    state, t, edm_kwargs = load_case(name)
    out_channels = edm_kwargs["out_channels"]  # adm: keep the iDDPM variance channels too
    net = build_network(CASES[name], **edm_kwargs).eval()
    net.load_state_dict(convert_edm_state_dict(state, CASES[name], out_channels=out_channels))
    assert_matches_edm(call(net, t), t["output"])
    inferred = edm_network_kwargs(state, CASES[name])
    assert all(tuple(v) == inferred[k] if isinstance(v, list) else v == inferred[k]
               for k, v in edm_kwargs.items() if k not in ("out_channels", "dropout"))


def test_iddpm_variance_channels_dropped_and_precond_buffer_ignored():
    state, t, _ = load_case("adm")
    assert state["out_conv.weight"].shape[0] == 6
    wrapped = {**{f"model.{k}": v for k, v in state.items()}, "u": torch.linspace(80, 0.002, 1001)}
    ours = convert_edm_state_dict(wrapped, "adm")
    assert ours["out_conv.weight"].shape[0] == 3 and torch.equal(ours["out_conv.bias"], state["out_conv.bias"][:3])
    assert not any("resample_filter" in k for k in ours) and "u" not in ours


@pytest.fixture
def ddpmpp_state():
    return load_case("ddpmpp")[0]


def save(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(state, path)
    return path


def test_unexpected_key(ddpmpp_state, tmp_path):
    with pytest.raises(UserError, match=r"unexpected key 'foo\.weight' in the edm state dict"):
        convert_edm_state_dict({**ddpmpp_state, "foo.weight": torch.zeros(1)}, "ddpmpp")
    bogus = {**ddpmpp_state, "enc.16x16_block0.bogus.weight": torch.zeros(1)}
    with pytest.raises(UserError, match=r"^unexpected key 'enc\.16x16_block0\.bogus\.weight' in .*net.safetensors"):
        load_edm_network(save(bogus, tmp_path / "net.safetensors"), "ddpmpp")
    with pytest.raises(UserError, match=r"unexpected key 'ema\.map_layer0\.weight'.*outside the Precond"):
        convert_edm_state_dict({"model.map_layer0.weight": torch.zeros(1), "ema.map_layer0.weight": torch.zeros(1)},
                               "ddpmpp")
    ours = build_network("unet", img_resolution=8, in_channels=1).state_dict()
    with pytest.raises(UserError, match=r"unexpected key '.*' in the edm state dict \(not a SongUNet"):
        convert_edm_state_dict(ours, "ddpmpp")


def test_missing_key(ddpmpp_state, tmp_path):
    del ddpmpp_state["enc.8x8_block0.qkv.weight"]  # dec.8x8_block1 still has attention
    with pytest.raises(UserError, match=r"^missing key in .*: the ddpmpp network .* has 'enc\.1\.blocks\.0\.attn\.qkv\."
                                        r"weight', the edm state has no tensor for it$"):
        load_edm_network(save(ddpmpp_state, tmp_path / "net.safetensors"), "ddpmpp")
    with pytest.raises(UserError, match=r"missing key 'enc\.<R>x<R>_conv\.weight'"):
        convert_edm_state_dict({}, "adm")


def test_wrong_shape(ddpmpp_state, tmp_path):
    ddpmpp_state["dec.4x4_in0.qkv.weight"] = ddpmpp_state["dec.4x4_in0.qkv.weight"][:-3]
    with pytest.raises(UserError, match=r"^edm key 'dec\.4x4_in0\.qkv\.weight' in .* has shape \[93, 32, 1, 1\] but "
                                        r"the ddpmpp network .* expects \[96, 32, 1, 1\] \('dec\.0\.mid\.0\.attn"):
        load_edm_network(save(ddpmpp_state, tmp_path / "net.safetensors"), "ddpmpp")
    path = save(load_case("adm")[0], tmp_path / "adm.safetensors")
    with pytest.raises(UserError, match=r"edm key 'map_label\.weight' .* shape \[64, 5\] .* expects \[64, 7\]"):
        load_edm_network(path, "adm", label_dim=7)  # an explicit argument that contradicts the tensors


def test_resample_filter_mismatch(tmp_path):
    path = save(load_case("ncsnpp")[0], tmp_path / "net.safetensors")
    with pytest.raises(UserError, match=r"resamples with the filter \[1\.0, 3\.0, 3\.0, 1\.0\] but the network"):
        load_edm_network(path, "ncsnpp", resample_filter=(1, 1))


def test_file_errors_and_explicit_torch_load(ddpmpp_state, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_edm_network(tmp_path / "missing.safetensors", "ddpmpp")
    pickled = tmp_path / "net.pt"
    torch.save(ddpmpp_state, pickled)
    with pytest.raises(UserError, match=r"not a readable safetensors file .*allow_torch_load=True"):
        load_edm_network(pickled, "ddpmpp")
    net = load_edm_network(pickled, "ddpmpp", allow_torch_load=True)  # torch.load(weights_only=True)
    assert torch.equal(net.map_layer0.weight, ddpmpp_state["map_layer0.weight"])
    torch.save({"net": torch.nn.Linear(2, 2)}, pickled)  # a pickled module: refused by weights_only=True
    with pytest.raises(UserError, match=r"not a state dict readable by torch\.load\(weights_only=True\)"):
        load_edm_network(pickled, "ddpmpp", allow_torch_load=True)
    with pytest.raises(UserError, match=r"is a SongUNet \(arch 'ddpmpp' or 'ncsnpp'\), not arch 'adm'"):
        convert_edm_state_dict(ddpmpp_state, "adm")
    with pytest.raises(UserError, match=r"the edm state dict is a DhariwalUNet \(arch 'adm'\), not arch 'ncsnpp'"):
        edm_network_kwargs(load_case("adm")[0], "ncsnpp")
    with pytest.raises(UserError, match="unknown edm arch 'unet'; choose one of ddpmpp, ncsnpp, adm"):
        convert_edm_state_dict(ddpmpp_state, "unet")
    assert EDM_ARCHS == ("ddpmpp", "ncsnpp", "adm")
