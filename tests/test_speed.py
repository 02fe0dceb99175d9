"""What the speed work relies on (issue 9): adapters compile without graph breaks, keep the channels-last layout
they are given, and weight-space methods compute each reparametrised weight once per training step."""
import pytest
import timm
import torch
from torch.nn.utils import parametrize

import mslora
from mslora.core.layout import Layout
from mslora.methods.mslora import MSLoRA

CASES = [  # (layout, input shape, shape the module sees as NCHW)
    (Layout("nchw"), (2, 16, 6, 10)),
    (Layout("nhwc"), (2, 6, 10, 16)),
    (Layout("tokens", num_prefix_tokens=1, grid_size=(6, 10)), (2, 1 + 60, 16)),
]


@pytest.mark.parametrize("layout,shape", CASES, ids=[c[0].kind for c in CASES])
def test_mslora_module_compiles_without_graph_breaks(layout, shape):
    torch.manual_seed(0)
    m = MSLoRA(16, rank=8, groups=4, global_pool=True, gate=True, channel_shuffle=True, input_norm=True, zero_init=False,
               layout=layout)
    x = torch.randn(shape, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    out = compiled(x)
    torch.testing.assert_close(out, m(x))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    (ref,) = torch.autograd.grad(m(x).square().sum(), x)
    torch.testing.assert_close(g, ref)


def test_mslora_keeps_channels_last_and_nhwc_without_copies():
    m = MSLoRA(16, rank=8, groups=4, zero_init=False)
    x = torch.randn(2, 16, 6, 10).contiguous(memory_format=torch.channels_last)
    assert m(x).is_contiguous(memory_format=torch.channels_last)
    m.layout = Layout("nhwc")
    y = m(torch.randn(2, 6, 10, 16))  # Swin's (B, H, W, C): computed as a channels-last view, returned as NHWC
    assert y.shape == (2, 6, 10, 16) and y.is_contiguous()


@pytest.mark.parametrize("method", ["rlrr", "ssf"])
def test_weight_space_methods_compute_each_weight_once_per_step(method):
    model = mslora.adapt(timm.create_model("test_vit", num_classes=4), method)
    calls = []
    owners = [m for m in model.modules() if parametrize.is_parametrized(m)]
    assert owners
    for m in owners:
        for plist in m.parametrizations.values():
            for p in plist:
                p.register_forward_hook(lambda *a: calls.append(1))
    n = sum(len(plist) for m in owners for plist in m.parametrizations.values())
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert len(calls) == n  # one evaluation per reparametrised tensor, forward and backward together


def test_mslora_grad_checkpointing_same_gradients_less_saved():
    torch.manual_seed(0)
    plain = MSLoRA(16, rank=32, groups=4, zero_init=False)
    ckpt = MSLoRA(16, rank=32, groups=4, zero_init=False, grad_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 24, 24)

    def run(m):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = m(x.clone().requires_grad_(True))
        out.square().sum().backward()
        return out, [p.grad for p in m.parameters()], sum(saved)

    out, grads, saved = run(plain)
    out_c, grads_c, saved_c = run(ckpt)
    torch.testing.assert_close(out_c, out)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g)
    assert saved_c * 5 < saved  # the input alone against ~10 rank-32 maps
