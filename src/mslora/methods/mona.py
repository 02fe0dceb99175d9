"""Mona: multi-cognitive visual adapter (Yin et al., "5%>100%: Breaking Performance Shackles of Full Fine-Tuning
on Visual Recognition Tasks", CVPR 2025, Sec. 3, Fig. 3; released code github.com/Leiyi-Hu/mona,
``swin_transformer_mona.py``).

    Mona(x) = x + Up(Dropout(GELU(MonaOp(Down(LN(x) * gamma + x * gammax)))))
    MonaOp(z) = z' + Proj1x1(z'),  z' = (DW3(z) + DW5(z) + DW7(z)) / 3 + z

with Down: C -> 64 and Up: 64 -> C Linear layers, depth-wise convolutions over the 64-channel map, gamma
initialised to 1e-6 and gammax to 1, dropout 0.1. The released code places two modules in every Swin block:
one after the attention sub-block's residual addition (before ``norm2``) and one after the MLP sub-block's;
here the same in every transformer block that timm builds as ``x + drop_path1(...)``, ``x + drop_path2(...)``,
and one after every block elsewhere (CNNs), where no second residual sub-block exists.

The released code's ``init_weights`` draws every Linear from a truncated normal (std 0.02, bias 0) before the
backbone checkpoint is loaded over it, so Mona does not start as its backbone; ``init='identity'`` zeroes Up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mslora.core.hooks import attach, attach_branch
from mslora.core.layout import Layout
from mslora.core.placement import find_sites, input_size, meta_tensors_copy, probe_forward, spatial_only
from mslora.methods.options import odd_sizes, one_of, option, positive_int, probability
from mslora.registry import register

MONA_INITS = ("official", "identity")


@dataclass
class MonaConfig:
    """Options of Mona, with the released code's values as defaults.

    Raises (on construction):
        ValueError: an option out of range, naming it.
    """

    rank: int = option(64, "bottleneck width (fixed at 64 in the released code)")
    kernel_sizes: tuple[int, ...] = option((3, 5, 7), "depth-wise kernels of MonaOp, averaged")
    dropout: float = option(0.1, "dropout after the GELU")
    init: str = option("official", "'official': trunc-normal(0.02) projections; 'identity': Up zero, starts as the "
                       "backbone")
    target_modules: str | None = option(None, "regex over module names: one Mona after each (instead of two per "
                                        "block)")
    layout: str = option("auto", "layout of target_modules outputs: auto, nchw, nhwc, tokens")

    def __post_init__(self) -> None:
        self.kernel_sizes = odd_sizes("kernel_sizes", self.kernel_sizes)
        positive_int("rank", self.rank)
        probability("dropout", self.dropout)
        one_of("init", self.init, MONA_INITS)


class MonaOp(nn.Module):
    """Multi-cognitive convolutional filters: mean of depth-wise k x k convolutions plus identity, then a 1x1
    projection plus identity. Shapes: (B, D, H, W) -> (B, D, H, W)."""

    def __init__(self, channels: int, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels)
                                   for k in kernel_sizes)
        self.projector = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """MonaOp(z) = z' + Proj1x1(z'), z' = mean_k DW_k(z) + z: (B, D, H, W) -> (B, D, H, W)."""
        x = sum(conv(x) for conv in self.convs) / len(self.convs) + x
        return x + self.projector(x)


class Mona(nn.Module):
    """One Mona module on features in ``layout`` (prefix tokens pass through unchanged).

    Shapes: input and output alike, (B, C, H, W), (B, H, W, C) or (B, P + H*W, C).
    """

    def __init__(self, channels: int, cfg: MonaConfig, layout: Layout = Layout()) -> None:
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(channels)
        self.gamma = nn.Parameter(torch.full((channels,), 1e-6))
        self.gammax = nn.Parameter(torch.ones(channels))
        self.project1, self.project2 = nn.Linear(channels, cfg.rank), nn.Linear(cfg.rank, channels)
        self.adapter_conv = MonaOp(cfg.rank, cfg.kernel_sizes)
        self.dropout = nn.Dropout(cfg.dropout)
        for lin in (self.project1, self.project2):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if cfg.init == "identity":
            nn.init.zeros_(self.project2.weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """Mona(x) - x, in the layout of ``x`` (zero on prefix tokens)."""
        f, prefix = self.layout.to_2d(x)
        h = f.permute(0, 2, 3, 1)  # (B, H, W, C)
        h = self.norm(h) * self.gamma + h * self.gammax
        h = self.adapter_conv(self.project1(h).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # (B, H, W, D)
        h = self.project2(self.dropout(F.gelu(h)))  # (B, H, W, C)
        return self.layout.from_2d(h.permute(0, 3, 1, 2), None if prefix is None else torch.zeros_like(prefix))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mona(x) = x + delta(x), in the layout of ``x``."""
        return x + self.delta(x)

    def branch(self, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Between two residual sub-blocks: the attention sub-block's output ``out`` is added to its input
        ``kept``; returns the change Mona makes to that sum."""
        return self.delta(kept + out)


def _two_per_block(model: nn.Module, names: list[str]) -> set[str]:
    """Blocks that take Mona's first module between their two residual sub-blocks: those with timm's
    ``drop_path1`` / ``drop_path2`` whose attention sub-block keeps the shape of the block's input (MViTv2's
    pooled or projected shortcuts do not: the input and the branch could not be added), by a probe forward on a
    meta-device copy (:func:`mslora.core.placement.probe_forward`)."""
    names = [n for n in names if all(isinstance(getattr(model.get_submodule(n), a, None), nn.Module)
                                     for a in ("drop_path1", "drop_path2"))]
    if not names:
        return set()
    branch = [f"{n}.drop_path1" for n in names]
    try:
        probe = probe_forward(meta_tensors_copy(model), names + branch, dict.fromkeys(names, True),
                              input_size(model)[1:])
    except Exception:  # an op without a meta kernel: the probe of find_sites ran on the model itself; so here
        probe = probe_forward(model, names + branch, dict.fromkeys(names, True), input_size(model)[1:])
    return {n for n, b in zip(names, branch) if probe.out.get(n) is not None and probe.out.get(n) == probe.out.get(b)}


@register("mona", MonaConfig, merge_impossible="it has nonlinearities (GELU, LayerNorm) between its projections")
def apply_mona(model: nn.Module, cfg: MonaConfig) -> None:
    """Two :class:`Mona` modules per transformer block (after each residual sub-block), one after every other
    block or every ``target_modules`` match.

    Raises:
        ValueError: a site whose features are not a spatial grid, or any placement error.
    """
    sites = find_sites(model, cfg.target_modules, cfg.layout, inner=False)
    spatial_only(sites, "mona")
    two = _two_per_block(model, [s.name for s in sites]) if cfg.target_modules is None else set()
    for site in sites:  # without target_modules the sites are the blocks (inner=False)
        if site.name in two:
            attach_branch(model, f"{site.name}.mona1", Mona(site.channels, cfg, site.layout), site.name,
                          f"{site.name}.drop_path1")
            attach(model, site.name, Mona(site.channels, cfg, site.layout), key=f"{site.name}.mona2", item=site.item)
        else:
            attach(model, site.name, Mona(site.channels, cfg, site.layout), item=site.item)
