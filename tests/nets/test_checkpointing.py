"""network.checkpointing: every network with blocks recomputes them in the backward pass (activation
checkpointing) with the same outputs, gradients and state_dict keys as without."""
from __future__ import annotations

import pytest
import torch

from elucidate.config import parse_config
from elucidate.config.network import DataInfo, build_network_for
from elucidate.nets import build_network
from elucidate.nets.layers import Checkpointed

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "unet": dict(model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=(4,), dropout=0.1),
    "ddpmpp": dict(model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=(4,), dropout=0.1),
    "ncsnpp": dict(model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=(4,), dropout=0.1),
    "adm": dict(model_channels=8, num_blocks=1, channel_mult=(1, 2), attn_resolutions=(4,), dropout=0.1),
    "edm2": dict(model_channels=16, num_blocks=1, channel_mult=(1, 2), attn_resolutions=(4,), dropout=0.1,
                 channels_per_head=8),
    "dit": dict(patch_size=2, hidden_size=16, depth=2, num_heads=2, dropout=0.1),
}


def build(arch: str, checkpointing: bool):
    torch.manual_seed(0)
    net = build_network(arch, img_resolution=8, in_channels=2, label_dim=3, checkpointing=checkpointing,
                        **TINY[arch])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # off the zero initializations, so every path carries signal
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.train()


def count_block_calls(net, calls: list) -> list:
    """Append to ``calls`` at the start of every block call (a pre-hook: a recomputation stops early once it has
    what the backward needs, so a block's end may not be reached again)."""
    blocks = [m for m in net.modules() if isinstance(m, Checkpointed)]
    return [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in blocks]


def run(net, calls: list):
    hooks = count_block_calls(net, calls)
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(3, 2, 8, 8, generator=gen), torch.randn(3, generator=gen)
    labels = torch.tensor([0, 2, 1])
    torch.manual_seed(5)  # the same dropout masks in both networks
    y = net(x, c, class_labels=labels)
    forward_calls = len(calls)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    for h in hooks:
        h.remove()
    return y.detach(), {k: p.grad for k, p in net.named_parameters()}, forward_calls


@pytest.mark.parametrize("arch", list(TINY))
def test_checkpointing_gives_the_same_outputs_and_gradients(arch):
    plain, ckpt = build(arch, False), build(arch, True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # the layout (and edm/edm2 ports) unchanged
    blocks = [m for m in ckpt.modules() if isinstance(m, Checkpointed)]
    assert blocks and all(m.checkpointing for m in blocks)
    plain_calls, ckpt_calls = [], []
    y0, g0, n0 = run(plain, plain_calls)
    y1, g1, n1 = run(ckpt, ckpt_calls)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    assert g0.keys() == g1.keys()
    for k in g0:
        if g0[k] is None:
            assert g1[k] is None, k
        else:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
    assert n0 == n1 == len(plain_calls) > 0  # without checkpointing a block runs once
    assert len(ckpt_calls) == 2 * n1  # with it, each block starts again in the backward pass (pre-hooks: the
    # recomputation stops early once it has what the backward needs)


def test_no_recompute_without_gradients():
    net, calls = build("unet", True), []
    hooks = count_block_calls(net, calls)
    with torch.no_grad():
        net(torch.zeros(1, 2, 8, 8), torch.zeros(1))
    assert calls and len(calls) == sum(1 for _ in hooks)


def test_the_network_section_passes_it_and_rejects_a_non_bool():
    config = parse_config({"data": {"dataset": "digits"}, "network": {"arch": "unet", "checkpointing": True}})
    net = build_network_for(config, DataInfo(1, (8, 8)))
    assert net.checkpointing and all(m.checkpointing for m in net.modules() if isinstance(m, Checkpointed))
    with pytest.raises(ValueError, match="checkpointing must be true or false, got 'yes'"):
        build_network("unet", img_resolution=8, in_channels=1, checkpointing="yes")
