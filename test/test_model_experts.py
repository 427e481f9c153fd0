"""Stacked diffusion experts: batched evaluation of an active subset equals per-expert evaluation, and the
stacked layers equal PyTorch's reference layers with each expert's weights."""

import torch
import torch.nn.functional as F
from torch import nn

from smp_ros.model.experts import (StackedConv1d, StackedConvTranspose1d, StackedGroupNorm, StackedLinear,
                                   StackedUnet1D, sinusoidal_embedding)

torch.set_num_threads(1)
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


def _per_layer_gathers(net, x, tau, state, idx):
    """The network written with every layer gathering its own weights at each call (layer(x, ..., idx))."""
    M, E = x.shape[:2]
    emb = sinusoidal_embedding(tau.unsqueeze(1).expand(M, E), net.step_embed_dim).to(x.dtype)  # (M, E, dsed)
    emb = net.step_fc2(F.mish(net.step_fc1(emb, idx)), idx)
    cond = torch.cat([emb, state.unsqueeze(1).expand(M, E, state.shape[-1])], dim=-1)  # (M, E, cond_dim)
    h, skips = torch.asinh(x), []
    for block1, block2, down in net.down:
        h = block2(block1(h, cond, idx), cond, idx)
        skips.append(h)
        h = down(h, idx) if down is not None else h
    for block in net.mid:
        h = block(h, cond, idx)
    for block1, block2, up in net.up:
        h = torch.cat([h, skips.pop()], dim=2)  # (M, E, 2C, T)
        h = block2(block1(h, cond, idx), cond, idx)
        h = up(h, idx) if up is not None else h
    return net.final_proj(net.final_block(h, idx), idx)


def test_weights_gathered_once_equal_per_layer_gathers_and_single_experts():
    net = _unet().float()
    M, H = 2, 8
    active = torch.tensor([6, 1, 4, 3])
    state = torch.randn(M, 12)
    weights = net.gather(active)
    x = torch.randn(M, len(active), 1, H)
    for tau in torch.tensor([[90, 40], [50, 20], [10, 0]]):  # one gather serves every step of a loop
        before = net.expert_evaluations
        out = net.run(x, tau, state, weights)
        assert net.expert_evaluations - before == len(active) and net.last_experts.tolist() == active.tolist()
        assert torch.equal(out, _per_layer_gathers(net, x, tau, state, active))
        assert torch.equal(out, net(x, tau, state, active))
        for j, e in enumerate(active.tolist()):
            single = net.run(x[:, j:j + 1], tau, state, net.gather(torch.tensor([e])))
            torch.testing.assert_close(out[:, j:j + 1], single, atol=1e-6, rtol=0)
        x = out


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
    torch.manual_seed(1)
    idx = torch.tensor([4, 0, 7])
    x = torch.randn(5, 3, 6, 8, dtype=torch.float64)  # (M, E, C, T)

    conv = StackedConv1d(K, 6, 10, 5, padding=2).double()
    tconv = StackedConvTranspose1d(K, 6, 4, 4, stride=2, padding=1).double()
    norm = StackedGroupNorm(K, 6, 3).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    lin = StackedLinear(K, 6, 9).double()
    y_conv, y_tconv, y_norm = conv(x, idx), tconv(x, idx), norm(x, idx)
    y_lin = lin(x[..., 0], idx)
    for j, e in enumerate(idx.tolist()):
        ref_conv = nn.Conv1d(6, 10, 5, padding=2).double()
        ref_conv.weight.data, ref_conv.bias.data = conv.weight[e].data, conv.bias[e].data
        assert torch.allclose(y_conv[:, j], ref_conv(x[:, j]), atol=1e-12)
        ref_t = nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1).double()
        ref_t.weight.data, ref_t.bias.data = tconv.weight[e].data, tconv.bias[e].data
        assert torch.allclose(y_tconv[:, j], ref_t(x[:, j]), atol=1e-12)
        ref_n = nn.GroupNorm(3, 6).double()
        ref_n.weight.data, ref_n.bias.data = norm.weight[e].data, norm.bias[e].data
        assert torch.allclose(y_norm[:, j], ref_n(x[:, j]), atol=1e-10)
        assert torch.allclose(y_lin[:, j], F.linear(x[:, j, :, 0], lin.weight[e], lin.bias[e]), atol=1e-12)


def test_per_expert_diffusion_steps_and_shapes():
    net = _unet()
    x = torch.randn(4, K, 1, 8, dtype=torch.float64)
    tau = torch.randint(0, 100, (4, K))
    out = net(x, tau, torch.randn(4, 12, dtype=torch.float64), net.all_experts())
    assert out.shape == x.shape
    emb = sinusoidal_embedding(torch.tensor([0, 7]), 8)
    assert emb.shape == (2, 8) and torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
