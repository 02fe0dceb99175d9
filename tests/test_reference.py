"""Each method with a formula against an independent reference: the paper's equations written here with plain
tensor operations (F.conv2d, F.linear, einsum), or the official released module copied verbatim, compared on
random, non-zero weights (so that a changed operator, order or scale cannot pass as the identity at init would).

- MSLoRA (arXiv 2511.12400, Sec. 3, Eq. 1-3): F' = F + Up(Proj(F) * Trans(F)).
- RLRR (CVPR 2024, Eq. 16-20, supp. G): the official ``RLRRLinear`` / ``RLRRConv`` forward (github.com/zstarN70/RLRR).
- CoLoRA (supp. Eq. 14-15): the two adjacent layers' outputs; the bilateral filter of Eq. 11 against Eq. 7's loop.
- SSF (as mslora folds it): gamma * (W x) + b + beta.
- Mona (CVPR 2025): the released ``Mona`` module (github.com/Leiyi-Hu/mona, swin_transformer_mona.py).
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mslora
from conftest import make_model, sample_input


def randomise(module: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Every parameter of ``module`` drawn from N(0, scale) (norm weights around 1), in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * scale
            p.copy_(1.0 + noise if name.endswith("weight") and p.ndim == 1 else noise)


# --- MSLoRA, Eq. 1-3 -------------------------------------------------------------------------------------------

def layer_norm_2d(x, weight, bias, eps=1e-6):
    """LayerNorm over the channels of (B, C, H, W) (timm LayerNorm2d, eps 1e-6)."""
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * weight[:, None, None] + bias[:, None, None]


def mslora_reference(m, f, groups, kernel_sizes, input_norm, enhance):
    """Eq. 1-3 from the paper: H(F) = Up(Proj(F) * PW(post(sum_k GELU(DW_k(Down(F)))))); F' = F + H(F)."""
    p = dict(m.named_parameters())
    h = layer_norm_2d(f, p["norm.weight"], p["norm.bias"]) if input_norm else f
    proj = F.conv2d(h, p["proj.weight"], p["proj.bias"], groups=groups)  # Proj: grouped 1x1, C -> D
    t = F.conv2d(h, p["trans.down.weight"], p["trans.down.bias"], groups=groups)  # Trans' own down-projection
    d = t.shape[1]
    s = sum(F.gelu(F.conv2d(t, p[f"trans.paths.{i}.weight"], p[f"trans.paths.{i}.bias"], padding=k // 2, groups=d))
            for i, k in enumerate(kernel_sizes))  # multi-scale depth-wise, GELU each, summed (Eq. 2)
    if enhance:  # LayerNorm + GELU after the sum (Sec. 3.4)
        s = F.gelu(layer_norm_2d(s, p["trans.post.0.weight"], p["trans.post.0.bias"]))
    trans = F.conv2d(s, p["trans.pw.weight"], p["trans.pw.bias"])  # point-wise 1x1
    up = F.conv2d(proj * trans, p["up.weight"], p["up.bias"], groups=groups)  # element-wise product, Up
    return f + up


@pytest.mark.parametrize("groups,kernels,input_norm,enhance", [(4, (3, 5, 7), False, True), (2, (3, 7), True, True),
                                                              (1, (5,), False, False)])
def test_mslora_module_computes_eq_1_to_3(groups, kernels, input_norm, enhance):
    from mslora.methods.mslora import MSLoRA

    m = MSLoRA(16, rank=8, groups=groups, kernel_sizes=kernels, input_norm=input_norm, enhance=enhance)
    randomise(m)
    f = torch.randn(2, 16, 9, 11, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(m(f), mslora_reference(m, f, groups, kernels, input_norm, enhance),
                               rtol=1e-5, atol=1e-5)


def test_mslora_on_tokens_leaves_prefix_tokens_and_adapts_the_patch_grid():
    from mslora.core.layout import Layout
    from mslora.methods.mslora import MSLoRA

    m = MSLoRA(8, rank=4, groups=2, layout=Layout("tokens", 2, (3, 4)))
    randomise(m)
    x = torch.randn(2, 2 + 12, 8)
    out = m(x)
    grid = x[:, 2:].transpose(1, 2).reshape(2, 8, 3, 4)  # raster order: row-major over (H, W)
    expected = mslora_reference(m, grid, 2, (3, 5, 7), False, True).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out[:, :2], x[:, :2], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 2:], expected, rtol=1e-5, atol=1e-5)


def test_adapted_resnet_equals_the_backbone_with_eq_1_to_3_at_every_site():
    """The whole adapted model against the plain backbone with the reference applied by hooks at the same sites
    (inside each block, after the 3x3 conv's activation: MSLoRA Fig. 2 right)."""
    model = make_model("resnet").eval()
    reference = make_model("resnet").eval()
    mslora.adapt(model, "mslora", rank=8, groups=2)
    randomise(model.adapters)
    from mslora.core.placement import find_sites

    sites = dict(zip((s.name for s in find_sites(reference)), model.adapters.values()))
    assert len(sites) == len(model.adapters) > 1 and all(n.endswith(("act1", "act2")) for n in sites)
    for name, m in sites.items():
        reference.get_submodule(name).register_forward_hook(
            lambda _mod, _args, out, m=m: mslora_reference(m, out, 2, (3, 5, 7), False, True))
    x = sample_input(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


# --- RLRR, the official modules ------------------------------------------------------------------------------

class OfficialRLRRLinear(nn.Module):
    """zstarN70/RLRR models/networks.py RLRRLinear.forward (weight * scale_col * scale_line + weight, bias + shift)."""

    def __init__(self, linear, scale_col, scale_line, shift):
        super().__init__()
        self.mlp, self.scale_col, self.scale_line, self.shift_bias = linear, scale_col, scale_line, shift

    def forward(self, x):
        weight = (self.mlp.weight * self.scale_col * self.scale_line) + self.mlp.weight
        return F.linear(x, weight, self.mlp.bias + self.shift_bias)


class OfficialRLRRConv(nn.Conv2d):
    """zstarN70/RLRR models/RLRR_ResNet.py RLRRConv, its __convert / __deconvert verbatim."""

    def convert(self, scale_line, scale_col):
        k = self.kernel_size[0]
        weight = self.weight.permute(0, 2, 1, 3).reshape(self.out_channels * k, self.in_channels * k)
        scaled = weight * scale_line * scale_col
        return self.weight + scaled.reshape(self.out_channels, k, self.in_channels, k).permute(0, 2, 1, 3)


def test_rlrr_linear_and_conv_compute_the_official_forward():
    from mslora.core.reparam import Rescale, Shift, reparametrize

    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    reparametrize(lin, "weight", Rescale(lin.weight, identity=False))
    reparametrize(lin, "bias", Shift(lin.bias, std=0.5))
    r, s = lin.parametrizations.weight[0], lin.parametrizations.bias[0]
    official = OfficialRLRRLinear(nn.Linear(6, 5), r.s_right[0], r.s_left, s.shift)
    official.mlp.weight.data.copy_(w), official.mlp.bias.data.copy_(b)
    x = torch.randn(3, 6)
    torch.testing.assert_close(lin(x), official(x))

    conv = nn.Conv2d(4, 3, 3, padding=1, bias=False)
    ref = OfficialRLRRConv(4, 3, 3, padding=1, bias=False)
    ref.weight.data.copy_(conv.weight)
    reparametrize(conv, "weight", Rescale(conv.weight, identity=False))
    r = conv.parametrizations.weight[0]
    x = torch.randn(2, 4, 7, 7)
    expected = F.conv2d(x, ref.convert(r.s_left, r.s_right[0]), None, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_rlrr_fused_qkv_gives_q_k_v_each_the_official_right_scale():
    """timm's fused qkv holds the official code's separate q, k and v RLRRLinear layers (ViT), each with its own
    scale_col; the shared s_left rows split the same way."""
    model = mslora.adapt(make_model("vit"), "rlrr", init="official").eval()
    qkv = model.blocks[0].attn.qkv
    r = qkv.parametrizations.weight[0]
    w = qkv.parametrizations.weight.original.detach()
    x = torch.randn(2, 5, w.shape[1])
    c = w.shape[0] // 3
    parts = []
    for i in range(3):
        lin = nn.Linear(w.shape[1], c, bias=False)
        lin.weight.data.copy_(w[i * c:(i + 1) * c])
        off = OfficialRLRRLinear(lin, r.s_right[i], r.s_left[i * c:(i + 1) * c], torch.zeros(c))
        lin.bias = None
        parts.append(F.linear(x, (off.mlp.weight * off.scale_col * off.scale_line) + off.mlp.weight))
    bias = qkv.bias  # the shift f folded into it
    torch.testing.assert_close(qkv(x), torch.cat(parts, -1) + bias, rtol=1e-5, atol=1e-5)


class OfficialSwinRLRRLinear(nn.Linear):
    """zstarN70/RLRR models/swin.py RLRRLinear.forward: one scale_col over the whole layer (its ``qkv`` is one
    ``RLRRLinear(dim, 3 * dim)``), and ``shift_bias`` as the bias of a bias-free layer (PatchMerging)."""

    def forward_with(self, x, scale_col, scale_line, shift_bias, has_bias):
        weight = (self.weight * scale_line * scale_col) + self.weight
        bias = (self.bias + shift_bias) if has_bias else shift_bias
        return F.linear(x, weight, bias)


def test_rlrr_on_swin_is_the_official_swin_layout():
    model = mslora.adapt(make_model("swin"), "rlrr", init="official").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the trainable tensors off their init (the shifts start at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    for name, has_bias in (("layers.0.blocks.0.attn.qkv", True), ("layers.1.downsample.reduction", False)):
        layer = model.get_submodule(name)
        r = layer.parametrizations.weight[0]
        shift = layer.parametrizations.bias[0].shift if has_bias else layer.bias  # the bias-free layer's is f
        assert r.s_right.shape[0] == 1  # one right scale over the fused qkv
        w = layer.parametrizations.weight.original.detach()
        ref = OfficialSwinRLRRLinear(w.shape[1], w.shape[0])
        ref.weight.data.copy_(w)
        if has_bias:
            ref.bias.data.copy_(layer.parametrizations.bias.original)
        x = torch.randn(2, 5, w.shape[1])
        with torch.no_grad():
            expected = ref.forward_with(x, r.s_right[0], r.s_left, shift, has_bias)
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    x = sample_input(model)
    with torch.no_grad():
        adapted = model(x)
        merged = mslora.merge(copy.deepcopy(model))  # the reduction keeps its shift as a bias
        torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-4)
        assert merged.layers[1].downsample.reduction.bias is not None
        mslora.unadapt(model)  # the backbone as it was: no bias on the reduction
    assert model.layers[1].downsample.reduction.bias is None
    assert set(model.state_dict()) == set(make_model("swin").state_dict())


# --- SSF -----------------------------------------------------------------------------------------------------

def official_ssf_ada(x, scale, shift):
    """SSF's released ``ssf_ada`` (github.com/dongzelian/SSF, models/vision_transformer.py): the module's output
    scaled and shifted on its channel axis, last (Linear, LayerNorm) or second (convolutions, BatchNorm)."""
    if x.shape[-1] == scale.shape[0]:
        return x * scale + shift
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


@pytest.mark.parametrize("make,shape", [(lambda: nn.Linear(6, 5), (4, 6)), (lambda: nn.LayerNorm(6), (4, 3, 6)),
                                        (lambda: nn.Conv2d(3, 5, 3, padding=1), (2, 3, 7, 7)),
                                        (lambda: nn.BatchNorm2d(3).eval(), (2, 3, 7, 7))])
def test_ssf_is_the_official_ssf_ada_of_the_same_parameters(make, shape):
    # gamma * module(x) + beta with the very (gamma, beta) of SSF's code: the bias scaled by gamma too, so the
    # gradients (not only the functions) are the released code's
    from mslora.core.reparam import merge_parametrizations, scale_shift

    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():
        layer.bias.normal_()  # a bias of 0 would hide whether gamma scales it
    plain = copy.deepcopy(layer)
    layer.requires_grad_(False)  # the frozen backbone layer
    scale_shift(layer, std=0.3)  # gamma ~ N(1, 0.3), beta ~ N(0, 0.3): not the identity
    gamma, beta = layer.parametrizations.weight[0].scale, layer.parametrizations.bias[0].shift
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == [
        "parametrizations.bias.0.shift", "parametrizations.weight.0.scale"]  # gamma held once
    x = torch.randn(*shape)
    ours = layer(x)
    ref_gamma, ref_beta = gamma.detach().clone().requires_grad_(), beta.detach().clone().requires_grad_()
    ref = official_ssf_ada(plain(x), ref_gamma, ref_beta)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    ours.backward(g)
    ref.backward(g)
    torch.testing.assert_close(gamma.grad, ref_gamma.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(beta.grad, ref_beta.grad, rtol=1e-4, atol=1e-5)
    merged = copy.deepcopy(layer)
    merge_parametrizations(merged)
    torch.testing.assert_close(merged(x), ref, rtol=1e-5, atol=1e-5)


# --- CoLoRA, Eq. 14-15 and Eq. 7 / 11 ------------------------------------------------------------------------

def test_colora_pair_computes_eq_14_and_15():
    """ConvNeXt's mlp.fc1 / mlp.fc2 (Linear, channel-last) with CoLoRA's updates, in the paper's row-vector
    notation Y1 = X (W1 + s A1 B1 + s As Bs W2^T), Y2 = Y1 (W2 + s A2 B2 + s W1^T As Bs); eval mode (no filter)."""
    model = mslora.adapt(make_model("convnext"), "colora", gamma=2, shared_ratio=0.5, scale=0.7,
                         depthwise=False).eval()
    pair = next(iter(model.adapters.values()))
    randomise(pair, scale=0.2)
    fc1, fc2 = pair.layers
    w1, w2 = fc1.weight.detach().T, fc2.weight.detach().T  # (d, d'), (d', d'')
    a1, b1, a2, b2, a_s, b_s = (getattr(pair, n).detach() for n in ("a1", "b1", "a2", "b2", "a_s", "b_s"))
    assert a_s.shape[1] > 0 and a1.shape[1] > 0  # both the per-layer and the shared ranks are in play
    s = 0.7
    x = torch.randn(2, 3, 3, w1.shape[0])
    y1 = x @ (w1 + s * a1 @ b1 + s * a_s @ b_s @ w2.T) + fc1.bias
    with torch.no_grad():
        torch.testing.assert_close(fc1(x), y1, rtol=1e-4, atol=1e-4)
        z = torch.randn(2, 3, 3, w2.shape[0])
        torch.testing.assert_close(fc2(z), z @ (w2 + s * a2 @ b2 + s * w1.T @ a_s @ b_s) + fc2.bias,
                                   rtol=1e-4, atol=1e-4)


def test_bilateral_filter_equals_eq_7_by_brute_force():
    """Eq. 11's four depth-wise convolutions against Eq. 7's double loop over the 11x11 window (positions outside
    the map are absent: the convolutions pad with zeros, which add nothing to either sum)."""
    from mslora.methods.colora import bilateral_filter

    z = torch.randn(1, 2, 7, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    window, sigma, eps = 11, 1.0, 1e-5
    out = bilateral_filter(z, window, sigma, eps)
    _, c, hh, ww = z.shape
    expected = torch.empty_like(z)
    half = window // 2
    for ch in range(c):
        zc = z[0, ch]
        gamma = math.pi / (2 * (zc.max() - zc.min()) + eps)  # gamma_c (x - y) within [-pi/2, pi/2]
        for h in range(hh):
            for w in range(ww):
                num = den = 0.0
                for dh in range(-half, half + 1):
                    for dw in range(-half, half + 1):
                        if 0 <= h + dh < hh and 0 <= w + dw < ww:
                            ks = math.exp(-(dh * dh + dw * dw) / (2 * sigma ** 2))
                            kr = torch.cos(gamma * (zc[h, w] - zc[h + dh, w + dw]))
                            num += ks * kr * zc[h + dh, w + dw]
                            den += ks * kr
                expected[0, ch, h, w] = num / (den + eps)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


# --- Mona, the released module -------------------------------------------------------------------------------

class ReleasedMonaOp(nn.Module):
    """Leiyi-Hu/mona Swin-Transformer-Classification/mmcls/models/backbones/swin_transformer_mona.py, verbatim."""

    def __init__(self, in_features):
        super().__init__()
        self.conv1 = nn.Conv2d(in_features, in_features, kernel_size=3, padding=3 // 2, groups=in_features)
        self.conv2 = nn.Conv2d(in_features, in_features, kernel_size=5, padding=5 // 2, groups=in_features)
        self.conv3 = nn.Conv2d(in_features, in_features, kernel_size=7, padding=7 // 2, groups=in_features)
        self.projector = nn.Conv2d(in_features, in_features, kernel_size=1, )

    def forward(self, x):
        identity = x
        conv1_x = self.conv1(x)
        conv2_x = self.conv2(x)
        conv3_x = self.conv3(x)
        x = (conv1_x + conv2_x + conv3_x) / 3.0 + identity
        identity = x
        x = self.projector(x)
        return identity + x


class ReleasedMona(nn.Module):
    """The released ``Mona`` (BaseModule -> nn.Module), verbatim otherwise."""

    def __init__(self, in_dim, factor=4):
        super().__init__()
        self.project1 = nn.Linear(in_dim, 64)
        self.nonlinear = F.gelu
        self.project2 = nn.Linear(64, in_dim)
        self.dropout = nn.Dropout(p=0.1)
        self.adapter_conv = ReleasedMonaOp(64)
        self.norm = nn.LayerNorm(in_dim)
        self.gamma = nn.Parameter(torch.ones(in_dim) * 1e-6)
        self.gammax = nn.Parameter(torch.ones(in_dim))

    def forward(self, x, hw_shapes=None):
        identity = x
        x = self.norm(x) * self.gamma + x * self.gammax
        project1 = self.project1(x)
        b, n, c = project1.shape
        h, w = hw_shapes
        project1 = project1.reshape(b, h, w, c).permute(0, 3, 1, 2)
        project1 = self.adapter_conv(project1)
        project1 = project1.permute(0, 2, 3, 1).reshape(b, n, c)
        nonlinear = self.nonlinear(project1)
        nonlinear = self.dropout(nonlinear)
        project2 = self.project2(nonlinear)
        return identity + project2


def test_mona_equals_the_released_module():
    from mslora.core.layout import Layout
    from mslora.methods.mona import Mona, MonaConfig

    ours = Mona(24, MonaConfig(), Layout("tokens", 0, (5, 6))).eval()
    randomise(ours, scale=0.2)
    released = ReleasedMona(24).eval()
    names = {"adapter_conv.convs.0": "adapter_conv.conv1", "adapter_conv.convs.1": "adapter_conv.conv2",
             "adapter_conv.convs.2": "adapter_conv.conv3"}
    state = {}
    for k, v in ours.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        state[k] = v
    released.load_state_dict(state, strict=True)
    x = torch.randn(2, 30, 24)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), released(x, (5, 6)), rtol=1e-5, atol=1e-5)
