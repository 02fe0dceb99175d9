"""Weight-space adaptation: a method is a function W -> W + dW(W) on a frozen tensor (the minLoRA design),
registered with ``torch.nn.utils.parametrize``. The same code serves Linear, Conv2d and norm layers, and
merging is evaluating the function once (``remove_parametrizations(..., leave_parametrized=True)``), so the
training-time forward and the merged weights cannot disagree.
"""
from __future__ import annotations


import torch
from torch import nn
from torch.nn.utils import parametrize


class Rescale(nn.Module):
    """RLRR residual rescaling (RLRR, CVPR 2024, Sec. 3.2 Eq. 16 and 19-20; rank-r form, supp. F):
    W' = W + (S_left @ S_right) ⊙ W.

    A Linear weight is used as it is, (out, in). A convolution kernel (O, I, k_h, k_w) is viewed as the
    (O k_h) x (I k_w) matrix of the official code (supp. G, Fig. 3: kernels concatenated), whose row and column
    scales reproduce supp. Table 12's counts. ``splits`` > 1 gives each of that many equal row blocks its own
    S_right (timm's fused ``qkv`` Linear holds the official code's separate q, k and v layers, each with its own
    right scale). rank=1 is the paper's W + s_left ⊙ W ⊙ s_right^T. Init: S_right kaiming-uniform (the official
    code's default ``a=0``); S_left zero with ``identity=True`` (W' = W at initialisation), else kaiming-uniform.
    Parameters: rank * (rows + splits * cols).
    """

    def __init__(self, weight: torch.Tensor, rank: int = 1, identity: bool = True, splits: int = 1) -> None:
        super().__init__()
        rows, cols = self._matrix_shape(weight)
        if rows % splits:
            raise ValueError(f"splits={splits} must divide the {rows} rows of the weight")
        self.splits = splits
        kw = dict(device=weight.device, dtype=weight.dtype)
        self.s_left = nn.Parameter(torch.empty(rows, rank, **kw))
        self.s_right = nn.Parameter(torch.empty(splits, rank, cols, **kw))
        for block in self.s_right.data:
            nn.init.kaiming_uniform_(block)  # (rank, cols): fan_in = cols, as the official (1, in) vector
        if identity:
            nn.init.zeros_(self.s_left)
        else:
            nn.init.kaiming_uniform_(self.s_left)  # (rows, rank): fan_in = rank, as the official (out, 1) vector

    @staticmethod
    def _matrix_shape(w: torch.Tensor) -> tuple[int, int]:
        if w.ndim == 4:
            o, i, kh, kw = w.shape
            return o * kh, i * kw
        return w.shape[0], w[0].numel()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """W' = W + (S_left @ S_right) ⊙ W for the frozen weight ``w``: (out, in) of a Linear, or (O, I, k_h, k_w)
        of a convolution (rescaled as its (O k_h) x (I k_w) matrix); returns a tensor of ``w``'s shape."""
        if w.ndim == 4:
            o, i, kh, kw = w.shape
            w2 = w.permute(0, 2, 1, 3).reshape(o * kh, i * kw)  # (O k_h, I k_w)
        else:
            w2 = w.reshape(w.shape[0], -1)
        rows, cols = w2.shape
        scale = (self.s_left.view(self.splits, rows // self.splits, -1) @ self.s_right).reshape(rows, cols)
        out = w2 + scale * w2
        if w.ndim == 4:
            return out.view(o, kh, i, kw).permute(0, 2, 1, 3)
        return out.view_as(w)


class Scale(nn.Module):
    """SSF scale on a layer's outputs, folded into its weight: W' = diag(gamma) W (gamma per output channel).
    Initialised to 1 (identity), or drawn from N(1, std) as SSF's and RLRR's code do."""

    def __init__(self, weight: torch.Tensor, std: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(weight.shape[0], device=weight.device, dtype=weight.dtype))
        if std:
            nn.init.normal_(self.scale, 1.0, std)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """diag(gamma) W: each output channel's row of ``w`` (any shape (out, ...)) scaled; same shape out."""
        return w * self.scale.view(-1, *([1] * (w.ndim - 1)))


class Shift(nn.Module):
    """Shift of a layer's outputs, folded into its bias: b' = b + f (RLRR Eq. 16 and 20, the f of its rescaled
    layers). Initialised to 0 (identity), or drawn from N(0, std)."""

    def __init__(self, bias: torch.Tensor, std: float = 0.0) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros_like(bias))
        if std:
            nn.init.normal_(self.shift, 0.0, std)

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        """b + f for the frozen bias ``b`` (out,)."""
        return b + self.shift


class ScaledShift(Shift):
    """SSF's shift with its scale, folded into a layer's bias: b' = gamma ⊙ b + beta, so that the layer computes
    gamma ⊙ (W x + b) + beta = ``ssf_ada(module(x), scale, shift)`` of SSF's released code (Lian et al., NeurIPS
    2022, github.com/dongzelian/SSF: ``x * scale + shift`` on the module's output), the same function of the same
    parameters, not only the same set of functions. ``scale``: the :class:`Scale` of the layer's weight, whose
    gamma this reads (held outside the module tree, so the adapter's tensors hold gamma once)."""

    def __init__(self, bias: torch.Tensor, scale: Scale, std: float = 0.0) -> None:
        super().__init__(bias, std)
        object.__setattr__(self, "_scale", scale)  # not a submodule: gamma is the weight parametrization's

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        """gamma ⊙ b + beta for the frozen bias ``b`` (out,)."""
        return b * self._scale.scale + self.shift


def reparametrize(module: nn.Module, name: str, fn: nn.Module) -> None:
    """Register ``fn`` as a parametrization of ``module.<name>`` (torch.nn.utils.parametrize; the original tensor
    stays frozen)."""
    parametrize.register_parametrization(module, name, fn, unsafe=False)


def scale_shift(module: nn.Module, std: float = 0.0) -> None:
    """SSF scale and shift of a module's outputs, y = gamma ⊙ module(x) + beta (SSF's ``ssf_ada``), with gamma
    folded into the weight and the bias (:class:`Scale`, :class:`ScaledShift`) so that merging is exact; ``std``
    > 0 draws them from N(1, std) and N(0, std) (SSF's init) instead of the identity.

    A layer without a bias gets no shift (SSF's code adds one to every layer): its output feeds a norm layer
    whose own shift covers it, and the merged model keeps exactly the backbone's parameters.
    """
    scale = Scale(module.weight, std)
    reparametrize(module, "weight", scale)
    if getattr(module, "bias", None) is not None:
        reparametrize(module, "bias", ScaledShift(module.bias, scale, std))


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
    for m in {id(m): m for m, _ in targets}.values():
        _private_class(m)
    for m, n in targets:
        parametrize.remove_parametrizations(m, n, leave_parametrized=True)
        getattr(m, n).requires_grad_(False)


def _private_class(module: nn.Module) -> None:
    """Give ``module`` its own copy of its parametrized class. ``copy.deepcopy`` shares that class between the copy
    and the original, and ``remove_parametrizations`` deletes the tensor's property from the class, so merging a
    copy would break the original (``'ParametrizedConv2d' object has no attribute 'weight'``)."""
    cls = type(module)
    attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, attrs)
