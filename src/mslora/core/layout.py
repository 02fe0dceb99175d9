"""Feature layouts: NCHW maps, NHWC maps and token sequences with prefix tokens, to and from NCHW.

Feature-space adapters (MSLoRA, Sec. 3) work on 2D maps. Backbones hand them three layouts:
- ``nchw``: (B, C, H, W), CNNs (ResNet, ConvNeXt, EfficientNet, RegNet, ...);
- ``nhwc``: (B, H, W, C), timm Swin blocks;
- ``tokens``: (B, P + H*W, C) with P prefix tokens (class, distillation, register tokens) first,
  ViT / DeiT blocks. Patch tokens are reshaped to their (H, W) grid, prefix tokens pass through unchanged.
  Tokens that are not a raster-order grid (``spatial=False``: Hiera's unrolled order, or a count that does not
  follow the input size) are viewed as a (B, C, N, 1) column, which point-wise layers may use and spatial ones
  (depth-wise convolutions) must refuse.
- ``blocks``: (B, T, N, C), NesT's blocked image (arXiv 2105.12723): T = g^2 square blocks of N = b^2 tokens
  each, in NesT's ``blockify`` order; read as the (B, C, g b, g b) image by NesT's ``deblockify`` (timm
  ``nest.py``), which takes square grids only, as here.
"""
from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import dataclass

import torch

# (H, W) of the image the model is running on, set by a forward pre-hook on the adapted model (and by
# mslora.backbones.Features for timm's forward_intermediates): token grids of non-square images are read from it.
IMAGE_SIZE: ContextVar[tuple[int, int] | None] = ContextVar("mslora_image_size", default=None)


def record_image_size(module, args) -> None:
    """Forward pre-hook on a model's root: remember the (H, W) of its input image for :class:`Layout`."""
    if args and torch.is_tensor(args[0]) and args[0].ndim == 4:
        IMAGE_SIZE.set(tuple(args[0].shape[-2:]))

LAYOUTS = ("nchw", "nhwc", "tokens", "blocks")


@dataclass(frozen=True)
class Layout:
    """How a feature tensor is laid out.

    Attributes:
        kind: one of ``"nchw"``, ``"nhwc"``, ``"tokens"``, ``"blocks"``.
        num_prefix_tokens: tokens layout only: leading tokens that are not patches.
        grid_size: tokens layout only: (H, W) of the patch grid at the model's default input size.
        stride: tokens layout only: input pixels per token along each side (measured), so that the grid of any
            image, square or not, is (H / stride, W / stride); without it, another patch count is read as square.
        spatial: False when the features are not a 2D grid (see module doc).
        block_size: blocks layout only: b, the side of one block in tokens.
    """

    kind: str = "nchw"
    num_prefix_tokens: int = 0
    grid_size: tuple[int, int] | None = None
    spatial: bool = True
    stride: int | None = None
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout='{self.kind}' is not one of {', '.join(LAYOUTS)}")

    def to_2d(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return ``(maps, prefix)``: maps (B, C, H, W) (a view where possible; (B, C, N, 1) when not spatial) and
        prefix tokens (B, P, C) or None.

        Raises:
            ValueError: a tokens tensor whose patch count fits neither ``grid_size`` nor a square grid.
        """
        if self.kind == "nchw":
            return x, None
        if self.kind == "nhwc":
            return x.permute(0, 3, 1, 2), None  # (B, H, W, C) -> (B, C, H, W), channels_last view
        if self.kind == "blocks":  # timm nest.deblockify: (B, T, N, C) -> (B, g b, g b, C), as NCHW
            b, t, _, c = x.shape
            g, k = math.isqrt(t), self.block_size
            if g * g != t:
                raise ValueError(f"{t} blocks do not form a square grid (NesT's deblockify takes square grids only)")
            x = x.reshape(b, g, g, k, k, c).transpose(2, 3).reshape(b, g * k, g * k, c)
            return x.permute(0, 3, 1, 2), None
        p = self.num_prefix_tokens
        prefix, patches = x[:, :p], x[:, p:]  # (B, P, C), (B, N, C)
        b, n, c = patches.shape
        h, w = self._grid(n) if self.spatial else (n, 1)
        return patches.transpose(1, 2).reshape(b, c, h, w), prefix  # (B, C, H, W)

    def from_2d(self, maps: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """Inverse of :meth:`to_2d`: maps (B, C, H, W) back to this layout."""
        if self.kind == "nchw":
            return maps
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1)  # (B, H, W, C)
        if self.kind == "blocks":  # timm nest.blockify: (B, C, H, W) -> (B, T, N, C)
            b, c, h, w = maps.shape
            k = self.block_size
            x = maps.permute(0, 2, 3, 1).reshape(b, h // k, k, w // k, k, c)
            return x.transpose(2, 3).reshape(b, (h // k) * (w // k), k * k, c)
        tokens = maps.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return torch.cat([prefix, tokens], dim=1)  # (B, P + H*W, C), prefix first

    def _grid(self, n: int) -> tuple[int, int]:
        """(H, W) of n patch tokens: from the current image size and the stride, else the default grid, else square."""
        size = IMAGE_SIZE.get()
        if size is not None and self.stride:
            for rnd in (math.floor, math.ceil):
                h, w = rnd(size[0] / self.stride), rnd(size[1] / self.stride)
                if h * w == n:
                    return h, w
        if self.grid_size is not None and self.grid_size[0] * self.grid_size[1] == n:
            return self.grid_size
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{n} patch tokens (after {self.num_prefix_tokens} prefix tokens) fit neither the image "
                f"{size} at stride {self.stride}, grid_size={self.grid_size}, nor a square grid"
            )
        return side, side
