"""CoLoRA: correlated low-rank adaptation of adjacent 1x1 layers (seed 004, supp. Sec. C-D, Eq. 7-15).

For a pair of adjacent point-wise layers W1 (d -> d') and W2 (d' -> d'') (ConvNeXt ``mlp.fc1``/``mlp.fc2``,
ResNet bottleneck ``conv1``/``conv3``; and, by the same reading, the 1x1 expand/project ``conv_pw``/``conv_pwl``
of EfficientNet and MobileNetV3 inverted residuals), in the paper's row-vector notation Y = X W:
    Y1 = X  (W1 + s1 A1 B1 + s As Bs W2^T)                              (Eq. 14)
    Y2 = Y1 (W2 + s2 A2 B2 + s W1^T As Bs)                              (Eq. 15)
with per-layer ranks rl (A1: d x rl, B1: rl x d', A2: d' x rl, B2: rl x d'') and the shared pair As (d x rs),
Bs (rs x d''). r = rl + rs = d // gamma and rs = round(shared_ratio * r) (supp. Table 8). Parameters per pair:
r (d + d'') + 2 rl d' (supp. Table 1). B1, B2 and Bs start at zero, so the model starts as its backbone.

Filtering (Eq. 7-11): the features compressed by A (X A1, X As, Y1 A2, Y1 W1^T As) pass a parameter-free
bilateral filter with a fixed Gaussian spatial kernel (window 11, sigma 1.0) and the range kernel
cos(g (x - y)), computed with four depth-wise convolutions (Eq. 11, eps 1e-5), where g = pi / (2 * range)
per sample and channel keeps g (x - y) within [-pi/2, pi/2]. The supplement gives CoLoRA the inference FLOPs
of plain LoRA (Table 1) and merges it into the weights after training (Sec. D), so the filter can act only
while training: here it runs in train mode and is skipped in eval mode, where the unmerged model therefore
equals the merged one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mslora.core.inject import blocks, family, keep_handle
from mslora.registry import register


@dataclass
class CoLoRAConfig:
    """Options of CoLoRA (seed 004)."""

    gamma: int = 16  # compression factor: total rank r = d // gamma per pair (supp. Table 8)
    shared_ratio: float = 0.5  # rs / (rs + rl): share of the rank in the cross-layer As, Bs (supp. Table 8)
    scale: float = 1.0  # s = s1 = s2, scaling of every low-rank term
    filtering: bool = True  # bilateral filtering of the A-compressed features while training (Eq. 7-11)
    window: int = 11  # spatial kernel window (supp. Sec. C)
    sigma: float = 1.0  # spatial kernel standard deviation (supp. Sec. C)

    def __post_init__(self) -> None:
        checks = [(self.gamma >= 1, "gamma", self.gamma, "an integer >= 1"),
                  (0.0 <= self.shared_ratio <= 1.0, "shared_ratio", self.shared_ratio, "in [0, 1]"),
                  (self.window >= 1 and self.window % 2 == 1, "window", self.window, "a positive odd integer"),
                  (self.sigma > 0, "sigma", self.sigma, "positive"),
                  (math.isfinite(self.scale), "scale", self.scale, "a finite number")]
        for ok, name, value, expected in checks:
            if not ok:
                raise ValueError(f"{name}={value} must be {expected}")


def bilateral_filter(z: torch.Tensor, window: int = 11, sigma: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Eq. 11: per-channel bilateral filter with Gaussian spatial kernel and cosine range kernel.

    z: (B, C, H, W) -> (B, C, H, W). No trainable parameters; gradients flow to ``z``.
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
        r = max(1, d // cfg.gamma)
        rs = round(cfg.shared_ratio * r)
        rl = r - rs
        self.cfg, self.layers = cfg, (first, second)  # a tuple: not registered as submodules
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
            z = bilateral_filter(z.permute(0, 3, 1, 2), self.cfg.window, self.cfg.sigma).permute(0, 2, 3, 1)
        return z @ b

    def delta1(self, x: torch.Tensor) -> torch.Tensor:
        """Eq. 14 update of the first layer: s1 X A1 B1 + s X As (Bs W2^T)."""
        w2 = _weight_2d(self.layers[1])  # (d', d'')
        return self.cfg.scale * (self._path(x, self.a1, self.b1) + self._path(x, self.a_s, self.b_s @ w2.t()))

    def delta2(self, y1: torch.Tensor) -> torch.Tensor:
        """Eq. 15 update of the second layer: s2 Y1 A2 B2 + s Y1 (W1^T As) Bs."""
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


def colora_pairs(model: nn.Module) -> list[tuple[str, str, str]]:
    """(block, first layer, second layer) names of the adjacent 1x1 pairs CoLoRA adapts.

    Raises:
        ValueError: the backbone has no known pairs (CoLoRA is defined for ConvNets: ConvNeXt, ResNet).
    """
    fam = family(model)
    pairs = []
    if fam == "ConvNeXt":
        pairs = [(b, f"{b}.mlp.fc1", f"{b}.mlp.fc2") for b in blocks(model)[0]]
    elif fam == "ResNet":
        pairs = [(b, f"{b}.conv1", f"{b}.conv3") for b in blocks(model)[0] if hasattr(model.get_submodule(b), "conv3")]
    elif fam in ("EfficientNet", "MobileNetV3"):  # inverted residuals: 1x1 expand, depth-wise, 1x1 project
        pairs = [(b, f"{b}.conv_pw", f"{b}.conv_pwl") for b in blocks(model)[0]
                 if all(isinstance(getattr(model.get_submodule(b), n, None), nn.Conv2d) for n in ("conv_pw", "conv_pwl"))]
    if not pairs:
        raise ValueError(f"colora adapts adjacent 1x1 layers of ConvNeXt blocks, ResNet bottlenecks or "
                         f"EfficientNet/MobileNetV3 inverted residuals; {type(model).__name__} has none")
    return pairs


def merge_colora(model: nn.Module, cfg: CoLoRAConfig) -> None:
    """Fold every pair's Eq. 14-15 updates into W1 and W2 and remove the adapter.

    Raises:
        ValueError: a merged weight is not finite (nothing is changed then).
    """
    pairs = [(n, m) for n, m in model.named_modules() if isinstance(m, CoLoRAPair)]
    updates = []
    for _, pair in pairs:
        for layer, dw in zip(pair.layers, pair.delta_weights()):
            new = layer.weight + dw.t().reshape(layer.weight.shape)  # (out, in[, 1, 1])
            if not torch.isfinite(new).all():
                raise ValueError("merging colora gives non-finite weights; the adapter is not merged")
            updates.append((layer, new))
    with torch.no_grad():
        for layer, new in updates:
            layer.weight.copy_(new)
    for name, pair in pairs:
        for handle in pair.handles:
            handle.remove()
        parent, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent), child)


@register("colora", CoLoRAConfig, merge=merge_colora)
def apply_colora(model: nn.Module, cfg: CoLoRAConfig) -> None:
    """Attach a :class:`CoLoRAPair` to every block with an adjacent 1x1 pair and hook both layers."""
    for block, first, second in colora_pairs(model):
        l1, l2 = model.get_submodule(first), model.get_submodule(second)
        pair = CoLoRAPair(l1, l2, cfg, block)
        model.get_submodule(block).add_module("colora", pair)
        pair.handles = (keep_handle(l1.register_forward_hook(_channel_last_hook(pair.delta1))),
                        keep_handle(l2.register_forward_hook(_channel_last_hook(pair.delta2))))
