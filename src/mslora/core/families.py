"""What the library knows about timm model families: one table, and every per-family fact in it.

A family is matched by class name (base classes included); any other timm model takes the generic rule of
:mod:`mslora.core.placement` (timm's ``group_matcher``, else ``feature_info``). Facts that hold for every family
(which layer types are norms) live here too, so that placement, the weight-space methods and the baselines read
one definition.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

# Norm layers with an affine weight and bias: what norm-tune trains, SSF / RLRR scale and shift, and what marks a
# block as pre-norm when it runs first inside it. timm's own norms subclass these (LayerNorm2d, BatchNormAct2d).
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)
# Class-name suffixes of norm layers that do not subclass torch's (timm's RmsNorm, some LayerNorm variants).
NORM_NAME_SUFFIXES = ("LayerNorm", "LayerNorm2d", "RmsNorm")

_VPT_DEFAULT = "VPT inserts prompts into one global token sequence (ViT, DeiT)"
_POS = "its {} is computed for the patch tokens alone, so prompt tokens do not fit it"


@dataclass(frozen=True)
class Family:
    """What the library knows about one model family (matched by class name, base classes included).

    Attributes:
        classes: timm model class names.
        blocks: regular expression matched in full against module names: the family's blocks.
        pre_norm: the blocks output the un-normalised residual stream (MSLoRA's ``input_norm``); None: measured.
        inner_site: MSLoRA's site is inside each block at the bottleneck width (MSLoRA Fig. 2 right: ResNet),
            not the block's output.
        colora: names, relative to a block, of the adjacent 1x1 layers (first, second) CoLoRA adapts, and of the
            depth-wise convolution that gets CoLoRA's filtered branch (ConvNeXt, CoLoRA supp. Table 8).
        prompts: VPT can insert prompt tokens (one global token sequence, absolute position embedding); a string
            says why not.
        raster: tokens are in raster order, so reshaping them to a grid keeps space (Hiera unrolls them).
        patch_embed_ssf: RLRR scales and shifts the patch embedding's output (the official ViT code does; the
            official Swin code has no SSF there).
        rlrr_split_qkv: RLRR gives q, k and v each their own right scale inside a fused ``qkv`` Linear (the
            official ViT code's separate layers); False: one over the fused layer (the official Swin code's).
    """

    classes: tuple[str, ...]
    blocks: str
    pre_norm: bool | None = None
    inner_site: bool = False
    colora: tuple[str, ...] | None = None
    prompts: bool | str = _VPT_DEFAULT
    raster: bool = True
    patch_embed_ssf: bool = True
    rlrr_split_qkv: bool = True


FAMILIES: tuple[Family, ...] = (
    Family(("VisionTransformer",), r"blocks\.\d+", True, prompts=True),
    Family(("Eva",), r"blocks\.\d+", True, prompts=_POS.format("rotary position embedding")),
    Family(("Beit",), r"blocks\.\d+", True, prompts=_POS.format("relative position bias")),
    Family(("VisionTransformerRelPos",), r"blocks\.\d+", True, prompts=_POS.format("relative position bias")),
    Family(("SwinTransformer", "SwinTransformerV2"), r"layers\.\d+\.blocks\.\d+", True, patch_embed_ssf=False,
           rlrr_split_qkv=False),
    Family(("ConvNeXt",), r"stages\.\d+\.blocks\.\d+", True, colora=("mlp.fc1", "mlp.fc2", "conv_dw")),
    Family(("EfficientNet", "MobileNetV3"), r"blocks\.\d+\.\d+", False, colora=("conv_pw", "conv_pwl")),
    Family(("RegNet",), r"s\d+\.b\d+", False),
    Family(("ResNet",), r"layer\d+\.\d+", False, inner_site=True, colora=("conv1", "conv3")),
    # HRNet's stages return one map per resolution; its branch blocks return one each.
    Family(("HighResolutionNet",), r"layer1\.\d+|stage\d+\.\d+\.branches\.\d+\.\d+", False),
    # CaiT and XCiT: the class-attention blocks see (and return) only the class token, so the patch blocks only.
    Family(("Cait",), r"blocks\.\d+", True),
    Family(("Xcit",), r"blocks\.\d+", True),
    # CrossViT's multi-scale blocks return a list (one sequence per branch); the branch blocks return one each.
    Family(("CrossVit",), r"blocks\.\d+\.blocks\.\d+\.\d+", True),
    Family(("Hiera",), r"blocks\.\d+", True, raster=False),
    # PiT's stages return (x, cls_tokens) and its last stage's patch tokens are dropped (the head reads the class
    # token): the blocks inside, on the joined sequence. MViTv2: its blocks, each returning (x, feat_size).
    Family(("PoolingVisionTransformer",), r"transformers\.\d+\.blocks\.\d+", True),
    Family(("MultiScaleVit",), r"stages\.\d+\.blocks\.\d+", True),
    # CoaT: the serial blocks; the parallel blocks return one sequence per scale (a tuple) and are left out.
    Family(("CoaT",), r"serial_blocks\d\.\d+", True),
)


def family(model: nn.Module) -> Family | None:
    """The :data:`FAMILIES` entry of the model's class or a base class, or None (the generic rule applies)."""
    for cls in type(model).__mro__:
        for fam in FAMILIES:
            if cls.__name__ in fam.classes:
                return fam
    return None


def prompt_support(model: nn.Module) -> bool | str:
    """True when VPT can insert prompt tokens into ``model``, else the reason it cannot (a sentence)."""
    fam = family(model)
    return fam.prompts if fam is not None else _VPT_DEFAULT


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a norm layer (:data:`NORM_TYPES`, or a class named like one)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith(NORM_NAME_SUFFIXES)
