"""Weight-space adaptation: a method is a function W -> W + dW(W) on a frozen tensor (the minLoRA design),
registered with ``torch.nn.utils.parametrize``. The same code serves Linear, Conv2d and norm layers, and
merging is evaluating the function once (``remove_parametrizations(..., leave_parametrized=True)``), so the
training-time forward and the merged weights cannot disagree.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


class Rescale(nn.Module):
    """RLRR residual rescaling (seed 003, Eq. 16 and 19-20; rank-r form of supp. F):
    W' = W + (S_left @ S_right) ⊙ W, with W viewed as (out, in * k * k) for convolutions (supp. G).

    rank=1 is the paper's W + s_left ⊙ W ⊙ s_right^T. ``identity=True`` zeroes S_left so W' = W at
    initialisation; otherwise both factors are kaiming-uniform, as in the official code.
    """

    def __init__(self, weight: torch.Tensor, rank: int = 1, identity: bool = True) -> None:
        super().__init__()
        out, cols = weight.shape[0], weight[0].numel()
        self.s_left = nn.Parameter(torch.empty(out, rank, device=weight.device, dtype=weight.dtype))
        self.s_right = nn.Parameter(torch.empty(rank, cols, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.s_right, a=math.sqrt(5))
        if identity:
            nn.init.zeros_(self.s_left)
        else:
            nn.init.kaiming_uniform_(self.s_left, a=math.sqrt(5))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        w2 = w.reshape(w.shape[0], -1)  # (out, in * k * k)
        return w + ((self.s_left @ self.s_right) * w2).view_as(w)


class Scale(nn.Module):
    """SSF scale on a layer's outputs, folded into its weight: W' = diag(gamma) W (gamma per output channel).
    Initialised to 1 (identity)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(weight.shape[0], device=weight.device, dtype=weight.dtype))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale.view(-1, *([1] * (w.ndim - 1)))


class Shift(nn.Module):
    """Shift of a layer's outputs, folded into its bias: b' = b + f (RLRR Eq. 16 and 20; SSF's beta, which
    with gamma ⊙ (Wx + b) + beta = (gamma ⊙ W)x + b + (gamma ⊙ b - b + beta) spans the same functions).
    Initialised to 0 (identity)."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros_like(bias))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return b + self.shift


def reparametrize(module: nn.Module, name: str, fn: nn.Module) -> None:
    """Register ``fn`` as a parametrization of ``module.<name>`` (the original tensor stays frozen)."""
    parametrize.register_parametrization(module, name, fn, unsafe=False)


def scale_shift(module: nn.Module) -> None:
    """SSF-style scale and shift of a module's outputs (scale into the weight, shift into the bias).

    A layer without a bias gets no shift: its output feeds a norm layer whose own shift covers it, and the
    merged model keeps exactly the backbone's parameters.
    """
    reparametrize(module, "weight", Scale(module.weight))
    if getattr(module, "bias", None) is not None:
        reparametrize(module, "bias", Shift(module.bias))


def merge_parametrizations(model: nn.Module) -> None:
    """Fold every parametrization into its tensor, in place; the folded tensors stay frozen.

    Raises:
        ValueError: a merged tensor is not finite (the adapter diverged); nothing is changed then.
    """
    targets = [(m, n) for m in model.modules() if parametrize.is_parametrized(m) for n in list(m.parametrizations)]
    with torch.no_grad():
        for m, n in targets:
            if not torch.isfinite(getattr(m, n)).all():
                raise ValueError(f"merging {type(m).__name__}.{n} gives non-finite values; the adapter is not merged")
    for m, n in targets:
        parametrize.remove_parametrizations(m, n, leave_parametrized=True)
        getattr(m, n).requires_grad_(False)
