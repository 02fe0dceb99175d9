"""MSLoRA: multi-scale low-rank adaptation by attention reweighting (arXiv 2511.12400).

F' = F + Up(Proj(F) * Trans(F))                                       (Sec. 1 residual form, Eq. 1)
Proj(F)  = GConv1x1_G(F)                 C_in -> D, G groups          (Sec. 3.1)
Trans(F) = PW( sum_k GELU(DW_k(GConv1x1_G(F))) )  [+ LN + GELU]       (Eq. 2, Sec. 3.2, 3.4)
Up       = GConv1x1_G                    D -> C_in, zero-initialised

Parameters (Sec. 3.6, Eq. 3) for kernels (3, 5, 7): 3*C_in*D/G + D^2 + 83*D, plus biases (6*D + C_in: Proj,
the down-projection, three depth-wise convs and the point-wise conv have D each, Up has C_in) and LayerNorms
(2*D for ``enhance``, 2*C_in for ``input_norm``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from mslora.core.hooks import attach
from mslora.core.layout import Layout
from mslora.core.placement import find_sites, spatial_only
from mslora.methods.options import odd_sizes, option, positive_int
from mslora.registry import register


@dataclass
class MSLoRAConfig:
    """Options of MSLoRA, with the paper's names and defaults (Sec. 4.1: G=4, D=128).

    Raises (on construction):
        ValueError: a rank or groups that is not a positive integer, groups not dividing rank, or kernel sizes
            that are not a non-empty list of odd sizes.
    """

    rank: int = option(128, "D: width of both low-rank branches (Sec. 3.1, Table 2b)")
    groups: int = option(4, "G: groups of the 1x1 down- and up-projections (Sec. 3.1, Table 1, Table 2a)")
    kernel_sizes: tuple[int, ...] = option((3, 5, 7), "parallel depth-wise kernels, odd (Eq. 2, Table 2c)")
    enhance: bool = option(True, "LayerNorm + GELU after the multi-scale sum (Sec. 3.4, Table 2e)")
    global_pool: bool = option(False, "extra global-average-pooling path (Sec. 3.5, Table 2f)")
    gate: bool = option(False, "gated attention: one sigmoid gate map per parallel path (Sec. 3.5, Table 2f)")
    channel_shuffle: bool = option(False, "shuffle channels across groups before the up-projection (Sec. 3.5)")
    input_norm: bool | None = option(None, "LayerNorm at the input; None: on at pre-norm sites (Sec. 4.1)")
    zero_init: bool = option(True, "zero up-projection, so the adapted model equals its backbone at initialisation")
    target_modules: str | None = option(None, "regex over module names overriding the automatic placement")
    layout: str = option("auto", "layout of target_modules outputs: auto, nchw, nhwc, tokens")
    grad_checkpointing: bool = option(False, "recompute each module's activations in backward: less memory, more "
                                      "time", runtime=True)

    def __post_init__(self) -> None:
        self.kernel_sizes = odd_sizes("kernel_sizes", self.kernel_sizes)
        positive_int("rank", self.rank)
        positive_int("groups", self.groups)
        if self.rank % self.groups:
            raise ValueError(f"groups={self.groups} must divide rank={self.rank}")


class MultiScaleTransform(nn.Module):
    """Nonlinear branch Trans(F) of Eq. 1-2: grouped 1x1 down-projection, parallel depth-wise convs each
    followed by GELU, summed without normalisation, optional LayerNorm + GELU (Sec. 3.4), point-wise 1x1.

    Shapes: (B, C_in, H, W) -> (B, D, H, W).
    """

    def __init__(self, in_channels: int, *, rank: int, groups: int, kernel_sizes: tuple[int, ...],
                 enhance: bool = True, global_pool: bool = False, gate: bool = False,
                 act_layer: type[nn.Module] = nn.GELU, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.down = nn.Conv2d(in_channels, rank, 1, groups=groups, **dd)  # independent of the linear branch (Sec. 3.2)
        self.paths = nn.ModuleList(nn.Conv2d(rank, rank, k, padding=k // 2, groups=rank, **dd) for k in kernel_sizes)
        # Global pooling path (Sec. 3.5): image-level summary, one depth-wise scale + bias, broadcast back.
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(rank, rank, 1, groups=rank, **dd)) \
            if global_pool else None
        n_paths = len(kernel_sizes) + int(global_pool)
        # Gated attention (Sec. 3.5): a single attention map per parallel path, applied multiplicatively.
        self.gates = nn.ModuleList(nn.Conv2d(rank, 1, 1, **dd) for _ in range(n_paths)) if gate else None
        self.act = act_layer()
        self.post = nn.Sequential(LayerNorm2d(rank, **dd), act_layer()) if enhance else nn.Identity()
        self.pw = nn.Conv2d(rank, rank, 1, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Trans(F): (B, C_in, H, W) -> (B, D, H, W)."""
        t = self.down(x)  # (B, D, H, W)
        outs = [self.act(conv(t)) for conv in self.paths]
        if self.pool is not None:
            outs.append(self.act(self.pool(t)))  # (B, D, 1, 1), broadcast in the sum
        if self.gates is not None:
            outs = [o * torch.sigmoid(g(o)) for o, g in zip(outs, self.gates)]  # gate (B, 1, h, w) per path
        s = outs[0]
        for o in outs[1:]:
            s = s + o  # summed without normalisation (Sec. 3.2)
        return self.pw(self.post(s))


class MSLoRA(nn.Module):
    """The MSLoRA module (Fig. 2, Eq. 1-3): F' = F + Up(Proj(F) * Trans(F)).

    Input and output have the same shape, in ``layout`` ((B, C, H, W), (B, H, W, C) or tokens (B, P + H*W, C)
    whose P prefix tokens pass through unchanged). ``grad_checkpointing``: while gradients are recorded, keep only
    the input for backward and recompute H(F) there (same values and gradients; about 10 rank-D maps per module
    not kept, one more forward of the module paid).

    Raises:
        ValueError: ``groups`` does not divide ``in_channels`` or ``rank``; bad ``kernel_sizes``.
    """

    def __init__(self, in_channels: int, *, rank: int = 128, groups: int = 4,
                 kernel_sizes: tuple[int, ...] = (3, 5, 7), enhance: bool = True, global_pool: bool = False,
                 gate: bool = False, channel_shuffle: bool = False, input_norm: bool = False, zero_init: bool = True,
                 layout: Layout = Layout(), name: str = "", grad_checkpointing: bool = False, device=None,
                 dtype=None) -> None:
        super().__init__()
        where = f" of {name}" if name else ""
        if in_channels % groups:
            near = min((g for g in range(1, math.gcd(in_channels, rank) + 1) if in_channels % g == 0 and rank % g == 0),
                       key=lambda g: (abs(g - groups), -g))
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}{where}; pass groups that divide "
                             f"every site's channel count (here the nearest is groups={near}; groups=1 always does)")
        if rank % groups:
            raise ValueError(f"groups={groups} must divide rank={rank}")
        dd = {"device": device, "dtype": dtype}
        self.layout, self.grad_checkpointing, self.site = layout, grad_checkpointing, name  # site: the block it adapts
        self.norm = LayerNorm2d(in_channels, **dd) if input_norm else nn.Identity()  # pre-norm backbones (Sec. 4.1)
        self.proj = nn.Conv2d(in_channels, rank, 1, groups=groups, **dd)  # linear branch Proj (Sec. 3.1)
        self.trans = MultiScaleTransform(in_channels, rank=rank, groups=groups, kernel_sizes=kernel_sizes,
                                         enhance=enhance, global_pool=global_pool, gate=gate, **dd)
        self.shuffle = nn.ChannelShuffle(groups) if channel_shuffle and groups > 1 else nn.Identity()
        self.up = nn.Conv2d(rank, in_channels, 1, groups=groups, **dd)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def reweighting(self, f: torch.Tensor) -> torch.Tensor:
        """The reweighting H(F) = Up(Proj(F) * Trans(F)) of Eq. 1: (B, C, H, W) -> (B, C, H, W)."""
        h = self.norm(f)
        h = self.proj(h) * self.trans(h)  # (B, D, H, W): attention reweighting, Eq. 1
        return self.up(self.shuffle(h))  # (B, C, H, W)

    @staticmethod
    @torch.no_grad()
    def stack(modules: list["MSLoRA"]) -> tuple[torch.Tensor, dict[str, tuple[int, torch.Size]]]:
        """The tensors of S alike modules (same options and shapes) for :meth:`forward_stacked`: one (S, P) tensor,
        row s all of module s's tensors flattened, and name -> (offset, shape) in a row. Every 1x1 convolution is
        kept as a dense (C_in, C_out) matrix (block-diagonal over its groups), the rest as it is (one gather per
        batch fetches every row's tensors). Modules that are not alike give rows that do not stack (RuntimeError)."""
        rows, index = [], {}
        for m in modules:
            dense = {}
            for name, conv in m.named_modules():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.groups < conv.out_channels:
                    og = conv.out_channels // conv.groups  # (C_out, C_in / G, 1, 1) -> block-diagonal (C_in, C_out)
                    w = conv.weight[:, :, 0, 0]
                    dense[f"{name}.weight"] = torch.block_diag(*(w[g * og:(g + 1) * og].t()
                                                                 for g in range(conv.groups)))
            tensors = [(name, dense.get(name, t)) for name, t in m.named_parameters()]
            offset = 0
            for name, t in tensors:
                index[name] = (offset, t.shape)
                offset += t.numel()
            rows.append(torch.cat([t.reshape(-1) for _, t in tensors]))
        return torch.stack(rows), index

    def forward_stacked(self, state: tuple[torch.Tensor, dict], x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of S alike modules at once, row b of ``x`` through module ``which[b]``: what a mixed
        batch of several named adapters runs (``mslora.mixed_batch``), one chain of batched operations whatever
        the batch's make-up (no padding, no vmap). ``state``: :meth:`stack` of the S modules; ``x`` in this
        module's layout (B rows); ``which`` (B,) long in [0, S). Equal to each row through its own module up to
        float rounding; no gradients (the stacked tensors are copies)."""
        f, prefix = self.layout.to_2d(x)  # (B, C, H, W)
        b, c, h, w = f.shape
        flat, index = state
        mine = flat[which]  # (B, P): each row's module's tensors
        p = {k: mine[:, o:o + shape.numel()].view(b, *shape) for k, (o, shape) in index.items()}

        def lin(name: str, v: torch.Tensor) -> torch.Tensor:  # 1x1 conv on (B, HW, C_in) -> (B, HW, C_out)
            return torch.baddbmm(p[f"{name}.bias"].unsqueeze(1), v, p[f"{name}.weight"])

        def norm(name: str, v: torch.Tensor, eps: float) -> torch.Tensor:  # LayerNorm2d over the last dim
            return F.layer_norm(v, v.shape[-1:], eps=eps) * p[f"{name}.weight"].unsqueeze(1) \
                + p[f"{name}.bias"].unsqueeze(1)

        tokens = f.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C): a view of channels-last maps
        t = norm("norm", tokens, self.norm.eps) if isinstance(self.norm, LayerNorm2d) else tokens
        tr = self.trans
        down = lin("trans.down", t)  # (B, HW, D)
        d = down.shape[-1]
        maps = down.transpose(1, 2).reshape(1, b * d, h, w)  # each row's D channels as groups of one conv
        outs = []
        for i, conv in enumerate(tr.paths):  # depth-wise: B * D groups, each row's own kernels
            k = conv.kernel_size[0]
            y = F.conv2d(maps, p[f"trans.paths.{i}.weight"].reshape(b * d, 1, k, k),
                         p[f"trans.paths.{i}.bias"].reshape(-1), padding=k // 2, groups=b * d)
            outs.append(tr.act(y).view(b, d, h * w))  # (B, D, HW)
        if tr.pool is not None:
            pooled = down.mean(1) * p["trans.pool.1.weight"].view(b, d) + p["trans.pool.1.bias"]
            outs.append(tr.act(pooled).unsqueeze(-1))  # (B, D, 1), broadcast in the sum
        if tr.gates is not None:
            outs = [o * torch.sigmoid(torch.einsum("bdp,bd->bp", o, p[f"trans.gates.{i}.weight"].view(b, d))
                                      + p[f"trans.gates.{i}.bias"]).unsqueeze(1) for i, o in enumerate(outs)]
        s = outs[0]
        for o in outs[1:]:
            s = s + o
        s = s.transpose(1, 2)  # (B, HW, D)
        if isinstance(tr.post, nn.Sequential):
            s = tr.post[1](norm("trans.post.0", s, tr.post[0].eps))
        hid = lin("proj", t) * lin("trans.pw", s)  # Eq. 1
        if not isinstance(self.shuffle, nn.Identity):
            g = self.shuffle.groups
            hid = hid.view(b, h * w, g, d // g).transpose(2, 3).reshape(b, h * w, d)
        out = (tokens + lin("up", hid)).view(b, h, w, c).permute(0, 3, 1, 2)  # F + H(F), (B, C, H, W)
        return self.layout.from_2d(out, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F' = F + H(F) on ``x`` in this module's layout; same shape out, prefix tokens unchanged."""
        f, prefix = self.layout.to_2d(x)  # (B, C, H, W)
        if self.grad_checkpointing and torch.is_grad_enabled():
            # Keep only F for backward and recompute the rank-D maps there (torch.utils.checkpoint): on early,
            # high-resolution sites those maps outweigh full fine-tuning's gradients and optimiser state.
            h = checkpoint(self.reweighting, f, use_reentrant=False)
        else:
            h = self.reweighting(f)
        return self.layout.from_2d(f + h, prefix)  # residual, F' = F + H(F)


@register(
    "mslora",
    MSLoRAConfig,
    merge_impossible="its update depends nonlinearly on the features (GELU, LayerNorm, element-wise product), "
    "so no change of the backbone weights reproduces it",
)
def apply_mslora(model: nn.Module, cfg: MSLoRAConfig) -> None:
    """Insert one :class:`MSLoRA` at every site of :func:`mslora.core.placement.find_sites` (Sec. 3, Fig. 2
    right); ``input_norm=None`` prepends the LayerNorm at pre-norm sites (Sec. 4.1).

    Raises:
        ValueError: a site whose features are not a spatial grid (its depth-wise convolutions need one), or any
            placement error of :func:`~mslora.core.placement.find_sites`.
    """
    sites = find_sites(model, cfg.target_modules, cfg.layout)
    spatial_only(sites, "mslora")
    for site in sites:
        module = MSLoRA(site.channels, rank=cfg.rank, groups=cfg.groups, kernel_sizes=cfg.kernel_sizes,
                        enhance=cfg.enhance, global_pool=cfg.global_pool, gate=cfg.gate,
                        channel_shuffle=cfg.channel_shuffle,
                        input_norm=cfg.input_norm if cfg.input_norm is not None else site.pre_norm,
                        zero_init=cfg.zero_init, layout=site.layout, name=site.name,
                        grad_checkpointing=cfg.grad_checkpointing)
        attach(model, site.name, module, site.mode, item=site.item)
