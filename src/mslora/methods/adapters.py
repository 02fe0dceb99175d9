"""Feature-space adapter baselines the papers compare against. None of them merges (each has a nonlinearity).
Each is zero-initialised on its output side, so the adapted model starts as its backbone.

- ``adapter`` (Houlsby et al., ICML 2019; RLRR (CVPR 2024) supp. Table 4: 2 * D * D' * L): a bottleneck x + Up(GELU(Down(x)))
  at the MSLoRA sites (after every block; inside ResNet bottlenecks), any layout.
- ``adaptformer`` (Chen et al., NeurIPS 2022, Sec. 3.2 Eq. 4-5, as its released code runs it): a parallel
  bottleneck s * Up(ReLU(Down(x))), s = 0.1, reading the residual stream x that enters each block's MLP
  sub-block and added to that sub-block's output outside drop-path: x + DropPath(MLP(LN(x))) + s * Up(...).
- ``conv_adapter`` (Chen et al. 2022 'Conv-Adapter'; CoLoRA supp. Sec. F): beside every spatial convolution
  (kernel > 1) inside the blocks, a depth-wise conv with the same kernel and stride, a point-wise down-projection
  by the compression factor gamma (4), GELU and a point-wise up-projection, scaled per output channel.
- ``lorand`` (Yin et al. 2023, MSLoRA Table 3 [56]): a bottleneck whose projections are low-rank synthesised,
  W = sum_i P_i K_i Q_i over ``branches`` products with a beta x beta kernel K_i shared by the down- and
  up-projection, placed at the MSLoRA sites. (The LoRand paper is not among our sources; this follows its
  published design, with one module per block where LoRand puts two in each Swin block.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mslora.core.hooks import attach, attach_branch
from mslora.core.layout import Layout
from mslora.core.placement import blocks, find_sites, modules_in_blocks
from mslora.methods.options import finite, option, positive_int
from mslora.registry import register

_NO_MERGE = "it has a nonlinearity between its projections, so it is not a change of the backbone weights"


@dataclass
class AdapterConfig:
    """Options of the Houlsby bottleneck adapter."""

    rank: int = option(8, "D': bottleneck width")
    target_modules: str | None = option(None, "regex over module names overriding the automatic placement")
    layout: str = option("auto", "layout of target_modules outputs: auto, nchw, nhwc, tokens")

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)


class Bottleneck(nn.Module):
    """x + Up(act(Down(x))) with 1x1 projections on the (B, C, H, W) view of any layout; Up starts at zero."""

    def __init__(self, channels: int, rank: int, layout: Layout = Layout(), act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.layout = layout
        self.down, self.act, self.up = nn.Conv2d(channels, rank, 1), act_layer(), nn.Conv2d(rank, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, prefix = self.layout.to_2d(x)  # (B, C, H, W)
        return self.layout.from_2d(f + self.up(self.act(self.down(f))), prefix)


@register("adapter", AdapterConfig, merge_impossible=_NO_MERGE)
def apply_adapter(model: nn.Module, cfg: AdapterConfig) -> None:
    """A :class:`Bottleneck` at every MSLoRA site."""
    for site in find_sites(model, cfg.target_modules, cfg.layout):
        attach(model, site.name, Bottleneck(site.channels, cfg.rank, site.layout), site.mode, item=site.item)


@dataclass
class AdaptFormerConfig:
    """Options of AdaptFormer."""

    rank: int = option(64, "bottleneck width (AdaptFormer's default)")
    scale: float = option(0.1, "s, the fixed scale of the parallel branch")

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)
        finite("scale", self.scale)


class ParallelMLPAdapter(nn.Module):
    """AdaptFormer's branch s * Up(ReLU(Down(x))) on channel-last input (..., C) (or (B, C, H, W) with
    ``channels_first``); Up starts at zero."""

    def __init__(self, channels: int, rank: int, scale: float, channels_first: bool = False) -> None:
        super().__init__()
        self.scale, self.channels_first = scale, channels_first
        self.down, self.up = nn.Linear(channels, rank), nn.Linear(rank, channels)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # AdaptFormer's 'lora' init
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.permute(0, 2, 3, 1) if self.channels_first else x  # (..., C)
        h = self.scale * self.up(F.relu(self.down(h)))
        return h.permute(0, 3, 1, 2) if self.channels_first else h

    def branch(self, kept: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The parallel term added to the MLP sub-block's output, from the residual stream ``kept`` entering it."""
        return self(kept)


@register("adaptformer", AdaptFormerConfig, merge_impossible=_NO_MERGE)
def apply_adaptformer(model: nn.Module, cfg: AdaptFormerConfig) -> None:
    """A :class:`ParallelMLPAdapter` beside the MLP sub-block of every block. Transformer blocks (``norm2``,
    ``mlp``, ``drop_path2``, as timm names them): it reads ``norm2``'s input (the residual stream) and adds to
    ``drop_path2``'s output. Blocks that are one residual MLP unit (ConvNeXt): beside the whole block.

    Raises:
        ValueError: the blocks have no MLP of Linear layers (CNNs other than ConvNeXt).
    """
    names = blocks(model)
    mods = [model.get_submodule(b) for b in names]
    if any(not isinstance(getattr(getattr(m, "mlp", None), "fc1", None), nn.Linear) for m in mods):
        raise ValueError(f"adaptformer needs blocks with an MLP of Linear layers (ViT, Swin, ConvNeXt); "
                         f"{type(model).__name__} has none")
    for name, m in zip(names, mods):
        channels = m.mlp.fc1.in_features
        if all(isinstance(getattr(m, a, None), nn.Module) for a in ("norm2", "drop_path2")):
            attach_branch(model, name, ParallelMLPAdapter(channels, cfg.rank, cfg.scale), f"{name}.norm2",
                          f"{name}.drop_path2")
        else:
            attach(model, name, ParallelMLPAdapter(channels, cfg.rank, cfg.scale, channels_first=True), "parallel")


@dataclass
class ConvAdapterConfig:
    """Options of Conv-Adapter."""

    gamma: int = option(4, "channel compression factor: hidden width = in_channels // gamma (CoLoRA supp. F uses 4)")
    target_modules: str | None = option(None, "regex over module names; default: spatial convs (kernel > 1) in "
                                        "blocks")

    def __post_init__(self) -> None:
        positive_int("gamma", self.gamma)


class ConvAdapter(nn.Module):
    """Parallel branch of a k x k convolution: alpha ⊙ PW_up(GELU(PW_down(DW_k(x)))), with the conv's class,
    stride, padding and dilation so the shapes match; PW_up starts at zero.

    Shapes: x (B, C_in, H, W) -> (B, C_out, H', W') as the convolution's own output."""

    def __init__(self, conv: nn.Conv2d, gamma: int) -> None:
        super().__init__()
        cin, cout, hidden = conv.in_channels, conv.out_channels, max(1, conv.in_channels // gamma)
        # The conv's own class: timm's Conv2dSame (TF 'same' padding) pads in forward, not via .padding.
        self.dw = type(conv)(cin, cin, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=cin)
        self.down, self.act, self.up = nn.Conv2d(cin, hidden, 1), nn.GELU(), nn.Conv2d(hidden, cout, 1)
        self.alpha = nn.Parameter(torch.ones(cout, 1, 1))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.up(self.act(self.down(self.dw(x))))


@register("conv_adapter", ConvAdapterConfig, merge_impossible=_NO_MERGE)
def apply_conv_adapter(model: nn.Module, cfg: ConvAdapterConfig) -> None:
    """A :class:`ConvAdapter` beside every spatial convolution inside the blocks.

    Raises:
        ValueError: no spatial convolution (e.g. a ViT; Conv-Adapter is a ConvNet method) or padding given as a
            string (timm 'same' padding is an explicit number here).
    """
    try:
        names = modules_in_blocks(model, (nn.Conv2d,), cfg.target_modules, keep=lambda m: max(m.kernel_size) > 1)
    except ValueError as e:
        raise ValueError(f"conv_adapter sits beside spatial convolutions (kernel > 1), a ConvNet method: {e}") from None
    for name in names:
        conv = model.get_submodule(name)
        if isinstance(conv.padding, str):
            raise ValueError(f"conv_adapter: {name} uses padding='{conv.padding}', expected explicit padding")
        attach(model, name, ConvAdapter(conv, cfg.gamma), "parallel")


@dataclass
class LoRandConfig:
    """Options of LoRand."""

    hidden: int = option(64, "bottleneck width m")
    branches: int = option(2, "alpha: number of P K Q products summed per projection")
    kernel: int = option(8, "beta: size of the shared kernel matrices K")
    target_modules: str | None = option(None, "regex over module names overriding the automatic placement")
    layout: str = option("auto", "layout of target_modules outputs: auto, nchw, nhwc, tokens")

    def __post_init__(self) -> None:
        for name in ("hidden", "branches", "kernel"):
            positive_int(name, getattr(self, name))


class LowRankSynthesis(nn.Module):
    """W = sum_i P_i K_i Q_i (in_features x out_features) with K given by the caller (shared)."""

    def __init__(self, d_in: int, d_out: int, branches: int, kernel: int, zero: bool = False) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.empty(branches, d_in, kernel))
        self.q = nn.Parameter(torch.empty(branches, kernel, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.kaiming_uniform_(self.p, a=math.sqrt(5))
        nn.init.zeros_(self.q) if zero else nn.init.kaiming_uniform_(self.q, a=math.sqrt(5))

    def weight(self, k: torch.Tensor) -> torch.Tensor:
        """The synthesised (d_in, d_out) matrix for shared kernels k: (branches, beta, beta)."""
        return torch.einsum("bik,bkl,blo->io", self.p, k, self.q)  # (d_in, d_out)


class LoRand(nn.Module):
    """x + Up(GELU(Down(x))) with low-rank-synthesised Down and Up sharing their kernels K_i; Up's Q starts at
    zero. Works on the channel-last view of any layout."""

    def __init__(self, channels: int, cfg: LoRandConfig, layout: Layout = Layout()) -> None:
        super().__init__()
        self.layout = layout
        self.k = nn.Parameter(torch.empty(cfg.branches, cfg.kernel, cfg.kernel))
        nn.init.kaiming_uniform_(self.k, a=math.sqrt(5))
        self.down = LowRankSynthesis(channels, cfg.hidden, cfg.branches, cfg.kernel)
        self.up = LowRankSynthesis(cfg.hidden, channels, cfg.branches, cfg.kernel, zero=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, prefix = self.layout.to_2d(x)
        h = f.permute(0, 2, 3, 1)  # (B, H, W, C)
        h = F.gelu(h @ self.down.weight(self.k) + self.down.bias) @ self.up.weight(self.k) + self.up.bias
        return self.layout.from_2d(f + h.permute(0, 3, 1, 2), prefix)


@register("lorand", LoRandConfig, merge_impossible=_NO_MERGE)
def apply_lorand(model: nn.Module, cfg: LoRandConfig) -> None:
    """A :class:`LoRand` at every MSLoRA site."""
    for site in find_sites(model, cfg.target_modules, cfg.layout):
        attach(model, site.name, LoRand(site.channels, cfg, site.layout), site.mode, item=site.item)
