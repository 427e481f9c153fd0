"""Stacked diffusion experts: batched evaluation of an active subset equals per-expert evaluation, the
stacked layers (training form and inference form) equal PyTorch's reference layers with each expert's
weights, and the network's two forms agree."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smp_ros.model.experts import (StackedConv1d, StackedConvTranspose1d, StackedGroupNorm, StackedLinear,
                                   StackedUnet1D, sinusoidal_embedding)

K = 8


def _unet():
    torch.manual_seed(0)
    return StackedUnet1D(K, 1, 12, (8, 16), kernel_size=5, n_groups=4, step_embed_dim=8, input_asinh=True).double()


def test_two_of_eight_experts_run_exactly_two_and_match_one_by_one():
    net = _unet()
    M, H = 3, 8
    x = torch.randn(M, 2, 1, H, dtype=torch.float64)
    tau = torch.tensor([3, 50, 99])
    state = torch.randn(M, 12, dtype=torch.float64)
    active = torch.tensor([5, 2])
    before = net.expert_evaluations
    out = net(x, tau, state, active)
    assert net.expert_evaluations - before == 2
    assert net.last_experts.tolist() == [5, 2]
    for j, e in enumerate(active.tolist()):
        single = net(x[:, j:j + 1], tau, state, torch.tensor([e]))
        assert torch.allclose(out[:, j:j + 1], single, atol=1e-12)


def test_inference_form_equals_training_form_and_gathers_once():
    """run(gather(experts)) against forward (grouped convolutions), in double precision so that any
    difference is a bug, not rounding; one gather serves every step of a loop."""
    net = _unet()
    M, H = 2, 8
    active = torch.tensor([6, 1, 4, 3])
    state = torch.randn(M, 12, dtype=torch.float64)
    weights = net.gather(active)
    x = torch.randn(M, len(active), 1, H, dtype=torch.float64)
    for tau in torch.tensor([[90, 40], [50, 20], [10, 0]]):
        before = net.expert_evaluations
        out = net.run(x, tau, state, weights)
        assert net.expert_evaluations - before == len(active) and net.last_experts.tolist() == active.tolist()
        torch.testing.assert_close(out, net(x, tau, state, active), atol=1e-12, rtol=0)
        assert torch.equal(out, net.run(x, tau, state, net.gather(active)))
        for j, e in enumerate(active.tolist()):
            single = net.run(x[:, j:j + 1], tau, state, net.gather(torch.tensor([e])))
            torch.testing.assert_close(out[:, j:j + 1], single, atol=1e-12, rtol=0)
        x = out


def test_selecting_from_all_experts_equals_gathering_the_subset():
    net = _unet()
    everyone = net.gather(net.all_experts())
    for active in (torch.tensor([6, 1, 4]), torch.tensor([2])):
        picked, direct = everyone.select(active), net.gather(active)
        assert torch.equal(picked.experts, active)
        for a, b in zip(torch.utils._pytree.tree_leaves(tuple(picked)), torch.utils._pytree.tree_leaves(tuple(direct))):
            assert a is None and b is None or torch.equal(a, b)


def test_inference_form_equals_training_form_in_float32_with_many_channels():
    """The dense baseline's shape (C = D channels, one expert) and a 3-level UNet, in fp32."""
    torch.manual_seed(2)
    net = StackedUnet1D(1, 14, 12, (8, 16, 32), kernel_size=5, n_groups=4, step_embed_dim=8)
    x, state, tau = torch.randn(3, 1, 14, 16), torch.randn(3, 12), torch.tensor([0, 40, 99])
    experts = net.all_experts()
    with torch.no_grad():
        torch.testing.assert_close(net.run(x, tau, state, net.gather(experts)), net(x, tau, state, experts),
                                   atol=2e-5, rtol=0)


def test_unselected_experts_are_untouched():
    net = _unet()
    x = torch.randn(2, 2, 1, 8, dtype=torch.float64)
    out = net(x, torch.tensor([1, 2]), torch.randn(2, 12, dtype=torch.float64), torch.tensor([1, 6]))
    out.sum().backward()
    for p in net.parameters():
        others = [k for k in range(K) if k not in (1, 6)]
        assert torch.count_nonzero(p.grad[others]) == 0
    assert net.final_proj.weight.grad[[1, 6]].abs().sum() > 0


def test_stacked_layers_equal_reference_layers_per_expert():
    """Both forms of every layer against nn.Conv1d / nn.ConvTranspose1d / nn.GroupNorm / F.linear with
    the expert's weights; the inference form takes (E, M, T, C) activations."""
    torch.manual_seed(1)
    idx = torch.tensor([4, 0, 7])
    x = torch.randn(5, 3, 6, 8, dtype=torch.float64)  # (M, E, C, T)
    x_inf = x.permute(1, 0, 3, 2)  # (E, M, T, C)

    def inference(layer, inp):
        return layer.run(inp, layer.gather(idx))

    conv = StackedConv1d(K, 6, 10, 5, padding=2).double()
    down = StackedConv1d(K, 6, 10, 3, stride=2, padding=1).double()
    tconv = StackedConvTranspose1d(K, 6, 4, 4, stride=2, padding=1).double()
    norm = StackedGroupNorm(K, 6, 3).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    lin = StackedLinear(K, 6, 9).double()
    y_lin = lin(x[..., 0], idx)
    y_lin_inf = inference(lin, x_inf[:, :, 0])  # (E, M, 9)
    for j, e in enumerate(idx.tolist()):
        for stacked, ref in ((conv, nn.Conv1d(6, 10, 5, padding=2)), (down, nn.Conv1d(6, 10, 3, stride=2, padding=1)),
                             (tconv, nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1)), (norm, nn.GroupNorm(3, 6))):
            ref = ref.double()
            ref.weight.data, ref.bias.data = stacked.weight[e].data, stacked.bias[e].data
            want = ref(x[:, j])  # (M, C_out, T')
            torch.testing.assert_close(stacked(x, idx)[:, j], want, atol=1e-10, rtol=0)
            torch.testing.assert_close(inference(stacked, x_inf)[j].transpose(1, 2), want, atol=1e-10, rtol=0)
        want = F.linear(x[:, j, :, 0], lin.weight[e], lin.bias[e])
        torch.testing.assert_close(y_lin[:, j], want, atol=1e-12, rtol=0)
        torch.testing.assert_close(y_lin_inf[j], want, atol=1e-12, rtol=0)


def test_per_expert_diffusion_steps_and_shapes():
    net = _unet()
    x = torch.randn(4, K, 1, 8, dtype=torch.float64)
    tau = torch.randint(0, 100, (4, K))
    out = net(x, tau, torch.randn(4, 12, dtype=torch.float64), net.all_experts())
    assert out.shape == x.shape
    emb = sinusoidal_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8) and torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def _anchored_pair():
    """An anchored network and a plain one with the same weights everywhere but the anchor channel's
    taps of the first layer (its convolution and its 1x1 skip), which the plain one does not have."""
    torch.manual_seed(3)
    anchored = StackedUnet1D(K, 1, 12, (8, 16), kernel_size=5, n_groups=4, step_embed_dim=8, input_asinh=True,
                             anchor=True).double()
    plain = _unet()
    first = anchored.down[0][0]
    with torch.no_grad():
        for name, p in plain.named_parameters():
            q = dict(anchored.named_parameters())[name]
            if q.shape == p.shape:
                p.copy_(q)
            else:  # the first layer: input channel 0 is x, channel 1 the anchor
                assert q.shape[2] == p.shape[2] + 1 and name.startswith("down.0.0."), name
                p.copy_(q[:, :, :1])
    return anchored, plain, first


def test_the_anchor_is_one_more_input_channel_constant_over_the_horizon():
    """With the anchor channel's weights zeroed the anchored network is the plain one (whatever the
    anchor); with them, moving an expert's anchor moves that expert's output and no other's, and the
    inference form agrees with the training form in double precision."""
    anchored, plain, first = _anchored_pair()
    M, H = 3, 8
    active = torch.tensor([5, 0, 2])
    x = torch.randn(M, 3, 1, H, dtype=torch.float64)
    tau, state = torch.tensor([3, 50, 99]), torch.randn(M, 12, dtype=torch.float64)
    anchor = 4 * torch.randn(M, 3, dtype=torch.float64)
    out = anchored(x, tau, state, active, anchor)
    torch.testing.assert_close(anchored.run(x, tau, state, anchored.gather(active), anchor), out, atol=1e-12, rtol=0)
    moved = anchor.clone()
    moved[:, 1] += 1.0
    changed = (anchored(x, tau, state, active, moved) - out).abs().amax((0, 2, 3))
    assert changed[1] > 1e-3 and changed[0] == 0 and changed[2] == 0
    with torch.no_grad():
        first.block1.conv.weight[:, :, 1:].zero_()
        first.skip.weight[:, :, 1:].zero_()
    torch.testing.assert_close(anchored(x, tau, state, active, anchor), plain(x, tau, state, active),
                               atol=1e-12, rtol=0)


def test_the_anchor_is_required_exactly_when_the_network_reads_one():
    anchored, plain, _ = _anchored_pair()
    x, tau, state, active = torch.randn(2, 2, 1, 8).double(), torch.tensor([1, 2]), torch.randn(2, 12).double(), \
        torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"anchor is on.*\(M, E\) = \(2, 2\), got None"):
        anchored(x, tau, state, active)
    with pytest.raises(ValueError, match=r"got \(2, 3\)"):
        anchored.run(x, tau, state, anchored.gather(active), torch.zeros(2, 3).double())
    with pytest.raises(ValueError, match="reads no anchor"):
        plain(x, tau, state, active, torch.zeros(2, 2).double())
