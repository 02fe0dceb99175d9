"""CoLoRA: correlated low-rank adaptation of adjacent 1x1 layers (Correlated Low-Rank Adaptation for ConvNets,
supplementary material, Sec. C-D, Eq. 7-15, Tables 1 and 8).

For a pair of adjacent point-wise layers W1 (d -> d') and W2 (d' -> d'') (ConvNeXt ``mlp.fc1``/``mlp.fc2``,
ResNet bottleneck ``conv1``/``conv3``; and, by the same reading, the 1x1 expand/project ``conv_pw``/``conv_pwl``
of EfficientNet and MobileNetV3 inverted residuals), in the paper's row-vector notation Y = X W:
    Y1 = X  (W1 + s1 A1 B1 + s As Bs W2^T)                              (Eq. 14)
    Y2 = Y1 (W2 + s2 A2 B2 + s W1^T As Bs)                              (Eq. 15)
with per-layer ranks rl (A1: d x rl, B1: rl x d', A2: d' x rl, B2: rl x d'') and the shared pair As (d x rs),
Bs (rs x d''). r = rl + rs = min(d, d', d'') // gamma (the bottleneck width in a ResNet bottleneck, C in a
ConvNeXt block) and rs = round(shared_ratio * r) (supp. Table 8). Parameters per pair: r (d + d'') + 2 rl d'
(supp. Table 1). B1, B2 and Bs start at zero, so the model starts as its backbone.

ConvNeXt blocks also get a filtered low-rank branch beside the 7x7 depth-wise convolution: a 1x1 down-projection
to r_dw = C // (2 gamma) channels and an up-projection that is a 3x3 convolution with r_dw groups (9 C
parameters). The supplement does not describe it; it is the one layout we found that reproduces Table 8's counts
(ConvNeXt-B: 4.6M ... 21.9M over its eight settings, within 0.2M, with the biases and norms that the supplement
also trains, ``bias_norm=True``), so it is our reading.

Filtering (Eq. 7-11): the features compressed by A (X A1, X As, Y1 A2, Y1 W1^T As) pass a parameter-free
bilateral filter with a fixed Gaussian spatial kernel (window 11, sigma 1.0) and the range kernel
cos(g (x - y)), computed with four depth-wise convolutions (Eq. 11, eps 1e-5), where g = pi / (2 * range)
per sample and channel keeps g (x - y) within [-pi/2, pi/2]. The supplement gives CoLoRA the inference FLOPs
of plain LoRA (Table 1) and merges it into the weights after training (Sec. D), so the filter can act only
while training: here it runs in train mode and is skipped in eval mode, where the unmerged model therefore
equals the merged one. "Gradients need not be computed for this filtering process" (Sec. C): the filtered
value is computed without a graph and gradients pass through it as through the identity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mslora.core.families import family
from mslora.core.hooks import AdapterHook, add_adapter, keep_handle
from mslora.core.placement import blocks
from mslora.methods.baselines import apply_bitfit, apply_normtune
from mslora.methods.options import finite, option, require
from mslora.registry import register


@dataclass
class CoLoRAConfig:
    """Options of CoLoRA (CoLoRA supplementary material, Sec. C-D and F)."""

    gamma: int = option(16, "compression factor: total rank r = d // gamma per pair (supp. Table 8)")
    shared_ratio: float = option(0.5, "rs / (rs + rl): share of the rank in the cross-layer As, Bs (supp. Table 8)")
    scale: float = option(1.0, "s = s1 = s2, scaling of every low-rank term")
    filtering: bool = option(True, "bilateral filtering of the A-compressed features while training (Eq. 7-11)")
    depthwise: bool = option(True, "ConvNeXt: filtered branch beside the 7x7 depth-wise conv (Table 8 counts; no "
                             "merge)")
    bias_norm: bool = option(False, "also train every bias and norm layer of the backbone (the supplement's "
                             "protocol, Sec. F)")
    window: int = option(11, "spatial kernel window (supp. Sec. C)")
    sigma: float = option(1.0, "spatial kernel standard deviation (supp. Sec. C)")

    def __post_init__(self) -> None:
        require(self.gamma >= 1, "gamma", self.gamma, "an integer >= 1")
        require(0.0 <= self.shared_ratio <= 1.0, "shared_ratio", self.shared_ratio, "in [0, 1]")
        require(self.window >= 1 and self.window % 2 == 1, "window", self.window, "a positive odd integer")
        require(self.sigma > 0, "sigma", self.sigma, "positive")
        finite("scale", self.scale)


def filter_without_gradient(z: torch.Tensor, window: int = 11, sigma: float = 1.0) -> torch.Tensor:
    """``bilateral_filter(z)`` in value, the identity for gradients (supp. Sec. C: no gradient is computed
    through the filter). z: (B, C, H, W) -> (B, C, H, W)."""
    with torch.no_grad():
        change = bilateral_filter(z, window, sigma) - z
    return z + change


def bilateral_filter(z: torch.Tensor, window: int = 11, sigma: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Eq. 11: per-channel bilateral filter with Gaussian spatial kernel and cosine range kernel.

    z: (B, C, H, W) -> (B, C, H, W). No trainable parameters.
    """
    c = z.shape[1]
    ax = torch.arange(window, device=z.device, dtype=z.dtype) - window // 2
    g1 = torch.exp(-ax**2 / (2 * sigma**2))
    ks = (g1[:, None] * g1[None, :]).expand(c, 1, window, window)  # (C, 1, k, k) depth-wise Gaussian
    conv = lambda t: F.conv2d(t, ks, padding=window // 2, groups=c)  # noqa: E731
    with torch.no_grad():
        rng = z.amax(dim=(2, 3), keepdim=True) - z.amin(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
        g = math.pi / (2 * rng + eps)  # g (x - y) in [-pi/2, pi/2]
    cz, sz = torch.cos(g * z), torch.sin(g * z)
    num = cz * conv(cz * z) + sz * conv(sz * z)
    den = cz * conv(cz) + sz * conv(sz) + eps
    return num / den


def _weight_2d(layer: nn.Module) -> torch.Tensor:
    """A 1x1 layer's weight as the paper's (in, out) matrix W (so that Y = X W)."""
    return layer.weight.reshape(layer.weight.shape[0], -1).t()


class CoLoRAPair(nn.Module):
    """The trainable matrices of one adjacent pair (Eq. 14-15) and the forward deltas of both layers.

    The two layers are referenced, not owned (they stay backbone modules). Inputs and outputs of the deltas
    are channel-last (B, H, W, C) maps.
    """

    def __init__(self, first: nn.Module, second: nn.Module, cfg: CoLoRAConfig, name: str) -> None:
        super().__init__()
        d, d1 = _weight_2d(first).shape
        d1b, d2 = _weight_2d(second).shape
        if d1 != d1b:
            raise ValueError(f"colora pair {name}: first layer outputs {d1} channels, second takes {d1b}")
        r = max(1, min(d, d1, d2) // cfg.gamma)
        rs = round(cfg.shared_ratio * r)
        rl = r - rs
        self.cfg, self.layers = cfg, (first, second)  # a tuple: not registered as submodules
        self.dw = None  # ConvNeXt: the depth-wise branch (DepthwiseBranch), set by apply_colora
        w = first.weight
        new = lambda *s: nn.Parameter(torch.zeros(*s, device=w.device, dtype=w.dtype))  # noqa: E731
        self.a1, self.b1, self.a2, self.b2 = new(d, rl), new(rl, d1), new(d1, rl), new(rl, d2)
        self.a_s, self.b_s = new(d, rs), new(rs, d2)
        for a in (self.a1, self.a2, self.a_s):  # LoRA convention: A kaiming-uniform, B zero
            if a.numel():
                nn.init.kaiming_uniform_(a.T, a=math.sqrt(5))

    def _path(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = x @ a  # (B, H, W, r): features compressed by A
        if self.cfg.filtering and self.training and z.shape[-1] > 0:
            z = filter_without_gradient(z.permute(0, 3, 1, 2), self.cfg.window, self.cfg.sigma).permute(0, 2, 3, 1)
        return z @ b

    def first_update(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 14's update of the first layer's output, s1 X A1 B1 + s X As (Bs W2^T): the first layer's input
        x (B, H, W, d) channel-last -> (B, H, W, d')."""
        w2 = _weight_2d(self.layers[1])  # (d', d'')
        return self.cfg.scale * (self._path(x, self.a1, self.b1) + self._path(x, self.a_s, self.b_s @ w2.t()))

    def second_update(self, y1: torch.Tensor) -> torch.Tensor:
        """Eq. 15's update of the second layer's output, s2 Y1 A2 B2 + s Y1 (W1^T As) Bs: the second layer's input
        y1 (B, H, W, d') channel-last -> (B, H, W, d'')."""
        w1 = _weight_2d(self.layers[0])  # (d, d')
        return self.cfg.scale * (self._path(y1, self.a2, self.b2) + self._path(y1, w1.t() @ self.a_s, self.b_s))

    @torch.no_grad()
    def delta_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged updates (dW1, dW2) in the paper's (in, out) orientation, from the unmerged weights."""
        w1, w2 = _weight_2d(self.layers[0]), _weight_2d(self.layers[1])
        s = self.cfg.scale
        return (s * (self.a1 @ self.b1 + self.a_s @ self.b_s @ w2.t()),
                s * (self.a2 @ self.b2 + w1.t() @ self.a_s @ self.b_s))


def _channel_last_hook(delta):
    """Forward hook adding ``delta(input)`` to a 1x1 layer's output, whatever its layout: Linear layers see
    channel-last maps (timm ConvNeXt), Conv2d layers NCHW maps (ResNet)."""

    def hook(module: nn.Module, args, out: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if isinstance(module, nn.Conv2d):
            return out + delta(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out + delta(x)

    return hook


class DepthwiseBranch(nn.Module):
    """Filtered low-rank branch beside a depth-wise k x k convolution (ConvNeXt; see module doc):
    s * Up3x3(filter(Down1x1(x))), Down C -> r (no bias, kaiming-uniform), Up r -> C with r groups (zero), the
    convolution's stride. Shapes: (B, C, H, W) -> (B, C, H', W') as the convolution's output."""

    def __init__(self, conv: nn.Conv2d, cfg: CoLoRAConfig) -> None:
        super().__init__()
        c, r = conv.in_channels, max(1, conv.in_channels // (2 * cfg.gamma))
        while conv.out_channels % r:  # the grouped up-projection needs r | C
            r -= 1
        self.cfg = cfg
        self.down = nn.Conv2d(c, r, 1, bias=False)
        self.up = nn.Conv2d(r, conv.out_channels, 3, stride=conv.stride, padding=1, groups=r, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.down(x)
        if self.cfg.filtering and self.training:
            z = filter_without_gradient(z, self.cfg.window, self.cfg.sigma)
        return self.cfg.scale * self.up(z)


def colora_pairs(model: nn.Module) -> list[tuple[str, str, str, str | None]]:
    """(block, first layer, second layer, depth-wise conv or None) of every block CoLoRA adapts, from the family
    table (:data:`mslora.core.families.FAMILIES`): blocks that have both 1x1 layers as Linear or 1x1 Conv2d.

    Raises:
        ValueError: the backbone has no known pairs (CoLoRA is defined for ConvNets: ConvNeXt, ResNet).
    """
    fam = family(model)
    pairs = []
    if fam is not None and fam.colora is not None:
        first, second, *dw = fam.colora
        for b in blocks(model):
            block = model.get_submodule(b)
            layers = [submodule_or_none(block, first), submodule_or_none(block, second)]
            if all(isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
                                                and m.groups == 1) for m in layers):
                conv = submodule_or_none(block, dw[0]) if dw else None
                pairs.append((b, f"{b}.{first}", f"{b}.{second}", f"{b}.{dw[0]}" if isinstance(conv, nn.Conv2d) else None))
    if not pairs:
        raise ValueError(f"colora adapts adjacent 1x1 layers of ConvNeXt blocks, ResNet bottlenecks or "
                         f"EfficientNet/MobileNetV3 inverted residuals; {type(model).__name__} has none")
    return pairs


def submodule_or_none(block: nn.Module, name: str) -> nn.Module | None:
    """``block.get_submodule(name)``, or None when it has no such submodule."""
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def merge_colora(model: nn.Module, cfg: CoLoRAConfig) -> None:
    """Fold every pair's Eq. 14-15 updates into W1 and W2; hooks and modules are removed by :func:`mslora.merge`.

    Raises:
        ValueError: a depth-wise branch is present (its 1x1 down-projection mixes channels, which the depth-wise
            convolution it sits beside cannot hold; adapt with ``depthwise=False`` to merge), or a merged weight
            is not finite. Nothing is changed then.
    """
    pairs = [m for m in model.modules() if isinstance(m, CoLoRAPair)]
    if any(p.dw is not None for p in pairs):
        raise ValueError("colora's depth-wise branch (ConvNeXt) mixes channels, which a depth-wise convolution "
                         "cannot hold, so it does not merge; adapt with depthwise=False to get a mergeable CoLoRA")
    updates = []
    for pair in pairs:
        for layer, dw in zip(pair.layers, pair.delta_weights()):
            updates.append((layer, layer.weight + dw.t().reshape(layer.weight.shape)))  # (out, in[, 1, 1])
    for layer, new in updates:
        if not torch.isfinite(new).all():
            raise ValueError("merging colora gives non-finite weights; the adapter is not merged")
    with torch.no_grad():
        for layer, new in updates:
            layer.weight.copy_(new)


@register("colora", CoLoRAConfig, merge=merge_colora)
def apply_colora(model: nn.Module, cfg: CoLoRAConfig) -> None:
    """Store a :class:`CoLoRAPair` per adapted block (``model.adapters``) and hook both layers (and the
    depth-wise branch beside ConvNeXt's ``conv_dw``); with ``bias_norm`` every bias and norm layer trains too."""
    for block, first, second, dw in colora_pairs(model):
        l1, l2 = model.get_submodule(first), model.get_submodule(second)
        pair = add_adapter(model, block, CoLoRAPair(l1, l2, cfg, block))
        keep_handle(l1.register_forward_hook(_channel_last_hook(pair.first_update)))
        keep_handle(l2.register_forward_hook(_channel_last_hook(pair.second_update)))
        if dw is not None and cfg.depthwise:
            conv = model.get_submodule(dw)
            pair.dw = DepthwiseBranch(conv, cfg).to(conv.weight.device, conv.weight.dtype)
            pair.dw.train(model.training)
            keep_handle(conv.register_forward_hook(AdapterHook(pair.dw, "parallel")))
    if cfg.bias_norm:  # bias-tune and norm-tune on top (the supplement's protocol)
        apply_bitfit(model, None)
        apply_normtune(model, None)
