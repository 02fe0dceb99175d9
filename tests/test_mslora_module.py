"""The MSLoRA module itself: Eq. 1-3, options, layouts."""
import pytest
import torch

from mslora.core.layout import Layout
from mslora.methods.mslora import MSLoRA, MSLoRAConfig


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def expected_params(c, d, g, ks=(3, 5, 7), enhance=True, pool=False, gate=False, input_norm=False):
    """Eq. 3 generalised to any kernel list, plus biases and norms (module docstring)."""
    n = 3 * c * d // g + d * d + sum(k * k for k in ks) * d  # Eq. 3 (83*D for 3, 5, 7)
    n += (3 + len(ks)) * d + c  # biases: proj, down, pw, each depth-wise conv; up
    n += 2 * d if enhance else 0  # LayerNorm after the multi-scale sum
    n += 2 * d if pool else 0  # pooling path: depth-wise 1x1 weight + bias
    n += (len(ks) + pool) * (d + 1) if gate else 0  # one 1-channel 1x1 gate per path
    n += 2 * c if input_norm else 0
    return n


@pytest.mark.parametrize("c,d,g", [(64, 128, 4), (256, 128, 1), (96, 32, 8), (40, 16, 4)])
def test_parameter_count_follows_eq3(c, d, g):
    assert n_params(MSLoRA(c, rank=d, groups=g)) == expected_params(c, d, g)
    assert 3 * c * d // g + d * d + 83 * d == expected_params(c, d, g) - 8 * d - c  # the paper's Eq. 3 term


@pytest.mark.parametrize("opts", [dict(global_pool=True), dict(gate=True), dict(global_pool=True, gate=True),
                                  dict(enhance=False), dict(kernel_sizes=(3,)), dict(input_norm=True),
                                  dict(kernel_sizes=(3, 5, 7, 9))])
def test_parameter_count_with_options(opts):
    ks = opts.get("kernel_sizes", (3, 5, 7))
    m = MSLoRA(64, rank=32, groups=4, **opts)
    assert n_params(m) == expected_params(64, 32, 4, ks, opts.get("enhance", True), opts.get("global_pool", False),
                                          opts.get("gate", False), opts.get("input_norm", False))


@pytest.mark.parametrize("opts", [{}, dict(global_pool=True, gate=True, channel_shuffle=True), dict(input_norm=True)])
def test_identity_at_init_and_not_after(opts):
    x = torch.randn(2, 64, 9, 7)
    m = MSLoRA(64, rank=32, groups=4, **opts)
    assert torch.equal(m(x), x)  # zero-initialised up-projection: exactly the identity
    m_free = MSLoRA(64, rank=32, groups=4, zero_init=False, **opts)
    assert not torch.allclose(m_free(x), x)


def test_channel_shuffle_mixes_groups():
    torch.manual_seed(0)
    x = torch.randn(1, 64, 5, 5)
    plain = MSLoRA(64, rank=32, groups=4, zero_init=False)
    shuffled = MSLoRA(64, rank=32, groups=4, zero_init=False, channel_shuffle=True)
    shuffled.load_state_dict(plain.state_dict())
    # Perturb only group 0 of the input: without shuffle the linear branch keeps the change in group 0's
    # output channels; with shuffle the up-projection of every group sees it.
    plain.trans.pw.weight.data.zero_()  # isolate the linear branch's grouping (trans becomes the pw bias)
    shuffled.trans.pw.weight.data.zero_()
    dx = torch.zeros_like(x)
    dx[:, :16] = 1.0
    d_plain = (plain(x + dx) - plain(x) - dx)[:, 16:].abs().max()
    d_shuf = (shuffled(x + dx) - shuffled(x) - dx)[:, 16:].abs().max()
    assert d_plain == 0 and d_shuf > 0


@pytest.mark.parametrize("kwargs,match", [(dict(in_channels=30, groups=4),
                                           r"groups=4 must divide in_channels=30; .*the nearest is groups=2;"),
                                          (dict(in_channels=10, rank=32, groups=8), r"the nearest is groups=2;"),
                                          (dict(in_channels=32, rank=30, groups=4), "groups=4 must divide rank=30")])
def test_groups_must_divide(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MSLoRA(**kwargs)


@pytest.mark.parametrize("opts,match", [(dict(kernel_sizes=(3, 4)), "odd"), (dict(rank=0), "positive"),
                                        (dict(rank=30, groups=4), "divide rank")])
def test_config_validation(opts, match):
    with pytest.raises(ValueError, match=match):
        MSLoRAConfig(**opts)


def test_nhwc_layout_matches_nchw():
    torch.manual_seed(0)
    x = torch.randn(2, 32, 6, 5)  # (B, C, H, W)
    a = MSLoRA(32, rank=16, groups=4, zero_init=False)
    b = MSLoRA(32, rank=16, groups=4, zero_init=False, layout=Layout("nhwc"))
    b.load_state_dict(a.state_dict())
    out = b(x.permute(0, 2, 3, 1))  # (B, H, W, C) in and out
    assert out.shape == (2, 6, 5, 32)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), a(x), rtol=1e-5, atol=1e-5)


def test_tokens_layout_reshapes_patches_and_passes_prefix():
    torch.manual_seed(0)
    grid = torch.randn(2, 32, 4, 6)  # (B, C, H, W)
    prefix = torch.randn(2, 3, 32)  # cls + 2 register tokens
    tokens = torch.cat([prefix, grid.flatten(2).transpose(1, 2)], 1)  # (B, 3 + 24, C)
    a = MSLoRA(32, rank=16, groups=4, zero_init=False)
    b = MSLoRA(32, rank=16, groups=4, zero_init=False, layout=Layout("tokens", 3, (4, 6)))
    b.load_state_dict(a.state_dict())
    out = b(tokens)
    assert torch.equal(out[:, :3], prefix)
    torch.testing.assert_close(out[:, 3:], a(grid).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_tokens_layout_rejects_non_grid():
    m = MSLoRA(32, rank=16, groups=4, layout=Layout("tokens", 1, (4, 6)))
    with pytest.raises(ValueError, match="fit neither"):
        m(torch.randn(1, 1 + 23, 32))


def test_bad_layout_name():
    with pytest.raises(ValueError, match="layout='nwhc'"):
        Layout("nwhc")


@pytest.mark.parametrize("opts,layout,memory", [
    ({}, Layout(), torch.contiguous_format), ({}, Layout(), torch.channels_last),
    (dict(global_pool=True, gate=True, channel_shuffle=True, input_norm=True), Layout(), torch.channels_last),
    (dict(enhance=False, groups=1, kernel_sizes=(3,)), Layout("nhwc"), torch.contiguous_format),
    (dict(input_norm=True), Layout("tokens", num_prefix_tokens=1, grid_size=(6, 5)), torch.contiguous_format)])
def test_stacked_forward_equals_each_row_through_its_own_module(opts, layout, memory):
    """forward_stacked (a mixed batch of several named MSLoRA sets) = each row through its own module."""
    gen = torch.Generator().manual_seed(0)
    modules = [MSLoRA(16, rank=8, zero_init=False, layout=layout, **opts) for _ in range(3)]
    for m in modules:
        for p in m.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    shape = {"nchw": (7, 16, 6, 5), "nhwc": (7, 6, 5, 16), "tokens": (7, 31, 16)}[layout.kind]
    x = torch.randn(shape, generator=gen)
    x = x.contiguous(memory_format=memory) if x.ndim == 4 else x
    which = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    with torch.no_grad():
        ref = torch.cat([modules[int(k)](x[i:i + 1]) for i, k in enumerate(which)])
        out = modules[0].forward_stacked(MSLoRA.stack(modules), x, which)
    assert out.shape == ref.shape and ref.abs().max() > 1
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
