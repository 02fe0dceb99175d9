"""Weight-space methods built on :mod:`mslora.core.reparam`: RLRR and SSF. Both merge exactly.

RLRR (seed 003, Sec. 3 Eq. 16-20; CNN extension supp. G; rank-r variant supp. F):
    W' = W + s_left ⊙ W ⊙ s_right^T,  b' = b + f          (Eq. 16; merged form Eq. 20)
on every Linear (attention qkv/proj, MLP fc1/fc2) and Conv2d (kernel viewed as (out, in*k*k)) inside the
backbone's blocks, with SSF-style scale and shift on the blocks' norm layers "as SSF does" (Sec. 4.4 ablation).
Parameters per layer: out + in*k*k + out (RLRR supp. Table 4: 3 * o * D* * L for square layers).

SSF (Lian et al. 2022, as cited by seed 003 Eq. 13): y = gamma ⊙ op(x) + beta after every Linear, Conv2d and
norm layer inside the blocks; 2 * o * D* * L parameters (seed 003 supp. Table 4).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mslora.core.inject import modules_in_blocks
from mslora.core.reparam import NORMS, Rescale, Shift, merge_parametrizations, reparametrize, scale_shift
from mslora.registry import register

RLRR_INITS = ("identity", "official")


def _affine(m: nn.Module) -> bool:
    return getattr(m, "weight", None) is not None


@dataclass
class RLRRConfig:
    """Options of RLRR (seed 003)."""

    rank: int = 1  # rank of S_left @ S_right; 1 is the paper's vector form (Eq. 16), r > 1 is supp. F
    init: str = "identity"  # 'identity': s_left = 0 so the model starts as the backbone; 'official': both kaiming-uniform
    norms: bool = True  # SSF-style scale and shift on the norm layers inside the blocks
    target_modules: str | None = None  # regex over module names (Linear, Conv2d, norms); default: all inside blocks

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank={self.rank} must be a positive integer")
        if self.init not in RLRR_INITS:
            raise ValueError(f"init='{self.init}' is not one of {', '.join(RLRR_INITS)}")


@register("rlrr", RLRRConfig, merge=lambda model, cfg: merge_parametrizations(model))
def apply_rlrr(model: nn.Module, cfg: RLRRConfig) -> None:
    """Residual low-rank rescaling (Eq. 16) of every Linear and Conv2d in the blocks, plus norm scale/shift.

    The default ``init='identity'`` zeroes s_left, so the adapted model equals its backbone at initialisation
    (as every method here but VPT does, and 'merged equals unmerged' is checkable from step 0); the official
    code's kaiming-uniform init of both scales (``init='official'``) starts elsewhere. The paper's Table 10
    puts its 'zero' init within 1.0 point of its own on each VTAB-1k group (82.4 / 85.1 / 60.8 against
    82.7 / 85.8 / 61.8); the identity init here is not measured against it.
    A layer without a bias gets no shift f (see :func:`mslora.core.reparam.scale_shift`).
    """
    for name in modules_in_blocks(model, (nn.Linear, nn.Conv2d), cfg.target_modules):
        m = model.get_submodule(name)
        reparametrize(m, "weight", Rescale(m.weight, cfg.rank, identity=cfg.init == "identity"))
        if m.bias is not None:
            reparametrize(m, "bias", Shift(m.bias))
    if cfg.norms:
        for name in modules_in_blocks(model, NORMS, cfg.target_modules, keep=_affine):
            scale_shift(model.get_submodule(name))


@dataclass
class SSFConfig:
    """Options of SSF."""

    target_modules: str | None = None  # regex over module names; default: every Linear, Conv2d and norm in blocks


@register("ssf", SSFConfig, merge=lambda model, cfg: merge_parametrizations(model))
def apply_ssf(model: nn.Module, cfg: SSFConfig) -> None:
    """Scale and shift the outputs of every Linear, Conv2d and affine norm layer in the blocks (identity init:
    scale 1, shift 0; SSF's own code draws them from N(1, 0.02) and N(0, 0.02))."""
    for name in modules_in_blocks(model, (nn.Linear, nn.Conv2d, *NORMS), cfg.target_modules, keep=_affine):
        scale_shift(model.get_submodule(name))
