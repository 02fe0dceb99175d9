"""Weight-space methods built on :mod:`mslora.core.reparam`: RLRR and SSF. Both merge exactly.

RLRR (Dong et al., "Low-Rank Rescaled Vision Transformer Fine-Tuning: A Residual Design Approach", CVPR 2024,
Sec. 3 Eq. 16-20; CNN extension supp. G; rank-r variant supp. F), laid out as its released code
(github.com/zstarN70/RLRR) runs it:
    W' = W + s_left ⊙ W ⊙ s_right^T,  b' = b + f          (Eq. 16; merged form Eq. 20)
- transformers (blocks with Linear layers): every Linear of the backbone outside the head (ViT: q, k, v, proj,
  fc1, fc2 of every block, with q, k and v each scaled on its own inside timm's fused ``qkv``, as the official
  ViT code's separate layers; Swin: one right scale over the fused ``qkv``, as the official ``swin.py``'s one
  ``RLRRLinear(dim, 3 * dim)``, and its PatchMerging ``reduction``). Every rescaled Linear gets the shift f,
  a bias-free one (Swin's ``reduction``) as a new bias, as the official ``RLRRLinear`` (``bias = shift_bias``
  when the layer has none); convolutions without a bias get none (the official ``RLRRConv``).
  SSF scale and shift on the norm layers inside the blocks and on the final norm
  (``norm``, or ``fc_norm`` where timm normalises after average pooling),
  and on the patch-embedding output of ViT-style models (the official Swin has none there);
- CNNs (no Linear in the blocks): every Conv2d outside the head, stem and shortcuts included, with the kernel
  (O, I, k, k) viewed as an (O k) x (I k) matrix; BatchNorm is left alone (supp. G, Table 12).
Parameters per Linear: out + in + out (3 * o * D* * L, RLRR supp. Table 4); ViT-B/16 with a 100-class head:
0.29M + head, the paper's 0.33M average over VTAB-1k's heads.

SSF (Lian et al., NeurIPS 2022, as RLRR Eq. 13 writes it): y = gamma ⊙ op(x) + beta after every Linear, Conv2d and
norm layer inside the blocks, gamma and beta the very parameters of the released code's ``ssf_ada`` (the
module's output scaled and shifted), folded into the weight and bias for an exact merge
(:func:`mslora.core.reparam.scale_shift`); 2 * o * D* * L parameters (RLRR supp. Table 4).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mslora.core.families import NORM_TYPES, family
from mslora.core.hooks import head_module, is_inside
from mslora.core.placement import modules_in_blocks
from mslora.core.reparam import Rescale, Shift, merge_parametrizations, reparametrize, scale_shift
from mslora.methods.options import one_of, option, positive_int
from mslora.registry import register

RLRR_INITS = ("identity", "official")


def _affine(m: nn.Module) -> bool:
    return getattr(m, "weight", None) is not None


@dataclass
class RLRRConfig:
    """Options of RLRR.

    Raises (on construction):
        ValueError: a rank that is not a positive integer, or an unknown init.
    """

    rank: int = option(1, "rank of S_left @ S_right; 1 is the paper's vector form (Eq. 16), r > 1 is supp. F")
    init: str = option("identity", "'identity': s_left = 0, SSF at 1 / 0, so the model starts as the backbone; "
                       "'official': the released code's kaiming-uniform (a=0) scales and N(1, 0.02) / N(0, 0.02) SSF "
                       "terms")
    norms: bool = option(True, "transformers: SSF scale and shift on the norm layers (blocks, final norm, patch "
                         "embedding)")
    target_modules: str | None = option(None, "regex over module names (Linear, Conv2d, norms); default: the layout "
                                        "above")

    def __post_init__(self) -> None:
        positive_int("rank", self.rank)
        one_of("init", self.init, RLRR_INITS)


def _rlrr_targets(model: nn.Module, cfg: RLRRConfig) -> tuple[list[str], list[str]]:
    """(layers to rescale, layers to scale-and-shift) by the official layout (module doc) or ``target_modules``."""
    if cfg.target_modules is not None:
        layers = modules_in_blocks(model, (nn.Linear, nn.Conv2d), cfg.target_modules)
        rx = re.compile(cfg.target_modules)
        norms = [n for n, m in model.named_modules() if isinstance(m, NORM_TYPES) and _affine(m) and rx.fullmatch(n)]
        return layers, norms if cfg.norms else []
    head = tuple(head_module(model))
    outside_head = [(n, m) for n, m in model.named_modules() if n and not (n in head or is_inside(n, head))]
    if any(isinstance(model.get_submodule(n), nn.Linear) for n in modules_in_blocks(model, (nn.Linear, nn.Conv2d))):
        layers = [n for n, m in outside_head if isinstance(m, nn.Linear)]
        try:
            norms = modules_in_blocks(model, NORM_TYPES, keep=_affine) if cfg.norms else []
        except ValueError:  # blocks without affine norm layers
            norms = []
        for final in ("norm", "fc_norm"):  # the final norm (timm ViTs with average pooling norm after it)
            m = getattr(model, final, None)
            if cfg.norms and isinstance(m, NORM_TYPES) and _affine(m):
                norms.append(final)
                break
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        fam = family(model)
        if cfg.norms and isinstance(proj, nn.Conv2d) and (fam is None or fam.patch_embed_ssf):
            norms.append("patch_embed.proj")
        return layers, norms
    return [n for n, m in outside_head if isinstance(m, nn.Conv2d)], []


@register("rlrr", RLRRConfig, merge=lambda model, cfg: merge_parametrizations(model))
def apply_rlrr(model: nn.Module, cfg: RLRRConfig) -> None:
    """Residual low-rank rescaling (Eq. 16) of the official layout's layers, plus SSF scale and shift.

    The default ``init='identity'`` zeroes s_left and starts SSF at 1 / 0, so the adapted model equals its
    backbone at initialisation (as every method here but VPT and Mona does, and 'merged equals unmerged' is
    checkable from step 0); ``init='official'`` is the released code's. The paper's Table 10 puts a 'zero' init
    within 1.0 point of its own on each VTAB-1k group (82.4 / 85.1 / 60.8 against 82.7 / 85.8 / 61.8).
    A convolution without a bias gets no shift f; a bias-free Linear gets it as a new, trainable bias (module doc;
    the official code's ``shift_bias``), which a merged model keeps as a bias (so a merged RLRR Swin is not a
    plain timm checkpoint) and :func:`mslora.unadapt` takes out.
    """
    std = 0.02 if cfg.init == "official" else 0.0
    layers, norms = _rlrr_targets(model, cfg)
    fam = family(model)
    split_qkv = fam is None or fam.rlrr_split_qkv
    for name in layers:
        m = model.get_submodule(name)
        fused = split_qkv and isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] == "qkv" and m.out_features % 3 == 0
        reparametrize(m, "weight", Rescale(m.weight, cfg.rank, identity=cfg.init == "identity", splits=3 if fused else 1))
        if m.bias is None and isinstance(m, nn.Linear):  # the official RLRRLinear's shift_bias is its bias then:
            m.bias = nn.Parameter(m.weight.new_zeros(m.out_features))  # here too, the shift f itself (from 0)
            m.mslora_added_bias = True  # taken out again by mslora.unadapt
        elif m.bias is not None:
            reparametrize(m, "bias", Shift(m.bias))
    for name in norms:
        scale_shift(model.get_submodule(name), std)


@dataclass
class SSFConfig:
    """Options of SSF."""

    target_modules: str | None = option(None, "regex over module names; default: every Linear, Conv2d and norm in "
                                        "blocks")


@register("ssf", SSFConfig, merge=lambda model, cfg: merge_parametrizations(model))
def apply_ssf(model: nn.Module, cfg: SSFConfig) -> None:
    """Scale and shift the outputs of every Linear, Conv2d and affine norm layer in the blocks (identity init:
    scale 1, shift 0; SSF's own code draws them from N(1, 0.02) and N(0, 0.02))."""
    for name in modules_in_blocks(model, (nn.Linear, nn.Conv2d, *NORM_TYPES), cfg.target_modules, keep=_affine):
        scale_shift(model.get_submodule(name))
