"""Find where adapters go in a timm backbone, freeze the backbone, attach feature-space adapters.

Placement follows MSLoRA Sec. 3 and Fig. 2 (right): one module after every block of transformer and
modern CNN backbones, and inside ResNet/ResNeXt bottlenecks at the bottleneck width. Backbones the
rules do not know take an explicit ``target_modules`` regex.

Feature-space adapters are attached as a child module of the target (so backbone parameter names do
not change and backbone checkpoints still load) and run by a forward hook on the target's output.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from mslora.core.layout import Layout

# (timm model class names, regex over module names, layout). A class matches when it or one of its
# base classes has one of the names, so DeiT-distilled matches VisionTransformer.
_BLOCK_RULES: list[tuple[tuple[str, ...], str, str]] = [
    (("VisionTransformer", "Eva", "Beit", "VisionTransformerRelPos"), r"blocks\.\d+", "tokens"),
    (("SwinTransformer", "SwinTransformerV2"), r"layers\.\d+\.blocks\.\d+", "nhwc"),
    (("ConvNeXt",), r"stages\.\d+\.blocks\.\d+", "nchw"),
    (("EfficientNet", "MobileNetV3"), r"blocks\.\d+\.\d+", "nchw"),
    (("RegNet",), r"s\d+\.b\d+", "nchw"),
]
# Families whose blocks output the un-normalised residual stream (pre-norm design, Sec. 4.1): MSLoRA
# prepends a LayerNorm at its input there.
PRE_NORM_FAMILIES = ("VisionTransformer", "Eva", "Beit", "VisionTransformerRelPos", "SwinTransformer",
                     "SwinTransformerV2", "ConvNeXt")


@dataclass(frozen=True)
class Site:
    """One place where an adapter goes.

    Attributes:
        name: qualified module name in the model (``model.get_submodule(name)``).
        layout: layout of that module's output.
        channels: channel count C of that output.
    """

    name: str
    layout: Layout
    channels: int


def family(model: nn.Module) -> str | None:
    """The first known timm family name among the model's classes (for placement rules), or None."""
    known = {n for rule in _BLOCK_RULES for n in rule[0]} | {"ResNet"}
    for cls in type(model).__mro__:
        if cls.__name__ in known:
            return cls.__name__
    return None


def blocks(model: nn.Module) -> tuple[list[str], str]:
    """Module names of the backbone's blocks by the family rules, and the layout of their outputs.

    Raises:
        ValueError: the backbone's family has no rule (pass ``target_modules``).
    """
    fam = family(model)
    for classes, pattern, kind in (*_BLOCK_RULES, (("ResNet",), r"layer\d+\.\d+", "nchw")):
        if fam in classes:
            return [n for n, _ in model.named_modules() if re.fullmatch(pattern, n)], kind
    raise ValueError(
        f"no automatic adapter placement for {type(model).__name__}; pass target_modules=REGEX "
        f"(a regular expression over module names, e.g. 'stages\\.\\d+\\.blocks\\.\\d+')"
    )


def block_names(model: nn.Module) -> tuple[list[str], str]:
    """Module names of the MSLoRA sites by the family rules, and their layout kind: the blocks, except in
    ResNets, where the site is inside each bottleneck after the 3x3 conv's activation, i.e. at the bottleneck
    width (Fig. 2 right); a BasicBlock has no bottleneck, its inner width is after act1.

    Raises:
        ValueError: the backbone's family has no placement rule (pass ``target_modules``).
    """
    names, kind = blocks(model)
    if family(model) == "ResNet":
        names = [f"{n}.act2" if hasattr(model.get_submodule(n), "conv3") else f"{n}.act1" for n in names]
    return names, kind


def _regex(target_modules: str) -> re.Pattern:
    try:
        return re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"target_modules='{target_modules}' is not a valid regex: {e}") from None


def modules_in_blocks(model: nn.Module, types: tuple[type, ...], target_modules: str | None = None,
                      keep=lambda m: True) -> list[str]:
    """Names of modules of ``types`` (and passing ``keep``) inside the family's blocks, or matching the
    ``target_modules`` regex (in full) when given. Weight-space methods use this for their default targets.

    Raises:
        ValueError: no module qualifies, an invalid regex, or a family without rules and no regex.
    """
    if target_modules is not None:
        rx = _regex(target_modules)
        inside = lambda n: rx.fullmatch(n) is not None  # noqa: E731
    else:
        prefixes = tuple(b + "." for b in blocks(model)[0])
        inside = lambda n: n.startswith(prefixes)  # noqa: E731
    names = [n for n, m in model.named_modules() if isinstance(m, types) and keep(m) and inside(n)]
    if not names:
        raise ValueError(f"no {'/'.join(t.__name__ for t in types)} module of {type(model).__name__} matches "
                         f"target_modules={target_modules!r}")
    return names


def find_sites(model: nn.Module, target_modules: str | None = None, layout: str = "auto") -> list[Site]:
    """Adapter sites of ``model`` with the layout and channel count of each site's output.

    Args:
        model: a timm model.
        target_modules: regex matched in full against module names; None uses the family rules.
        layout: with ``target_modules``: ``"auto"`` (3D output -> tokens, 4D -> nchw), ``"nchw"``,
            ``"nhwc"`` or ``"tokens"``.

    Channel counts come from one forward pass of a zero image at the model's input size (on the model's
    device, so a model on the meta device costs nothing).

    Raises:
        ValueError: the regex is invalid or matches no module, or the family has no rule.
    """
    if target_modules is None:
        names, kind = block_names(model)
    else:
        rx = _regex(target_modules)
        names = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
        kind = layout
    if not names:
        raise ValueError(f"target_modules='{target_modules}' matches no module of {type(model).__name__}")
    shapes = _probe_output_shapes(model, names)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    sites = []
    for name in names:
        shape = shapes.get(name)
        if shape is None:
            raise ValueError(f"module '{name}' did not run in a forward pass, so no adapter can act on it")
        k = kind if kind != "auto" else ("tokens" if len(shape) == 3 else "nchw")
        lay = Layout(k, prefix if k == "tokens" else 0, tuple(grid) if (k == "tokens" and grid) else None)
        sites.append(Site(name, lay, shape[1] if k == "nchw" else shape[-1]))
    return sites


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects by default: its patch embedding's fixed size, else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if fixed is not None:
        h, w = fixed
    return c, h, w


def _probe_output_shapes(model: nn.Module, names: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_m, _a, out) -> None:  # returns None: the output is left as it is
            if torch.is_tensor(out):
                shapes.setdefault(name, tuple(out.shape))

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    p = next(model.parameters())
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_size(model), device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


def head_module(model: nn.Module) -> list[str]:
    """Qualified names of the classifier head modules (timm ``get_classifier()``); empty if none."""
    get = getattr(model, "get_classifier", None)
    if get is None:
        return []
    heads = get()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in model.named_modules() if id(m) in ids and n]


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the qualified name ``name`` lies inside one of the modules named in ``prefixes``."""
    return any(name.startswith(p + ".") for p in prefixes)


_HANDLES: ContextVar[list | None] = ContextVar("mslora_hook_handles", default=None)


def keep_handle(handle):
    """Hand a hook's ``RemovableHandle`` to the adaptation being built (:func:`collect_handles`), so that
    ``mslora.merge`` and ``mslora.unadapt`` can remove the hook; returns the handle."""
    pending = _HANDLES.get()
    if pending is not None:
        pending.append(handle)
    return handle


@contextmanager
def collect_handles():
    """Within the block, :func:`keep_handle` appends to the yielded list (``mslora.adapt`` uses this)."""
    token = _HANDLES.set([])
    try:
        yield _HANDLES.get()
    finally:
        _HANDLES.reset(token)


def _keep_eval(module: nn.Module, _args) -> None:
    # Frozen BatchNorm: normalise with the pretrained running statistics even in train mode (Sec. 4.1).
    module.training = False


def freeze_backbone(model: nn.Module, trainable_prefixes: list[str]) -> None:
    """Freeze every parameter except those under ``trainable_prefixes`` and freeze BatchNorm statistics.

    BatchNorm layers outside the trainable prefixes get a forward pre-hook that puts them in eval mode,
    so ``model.train()`` leaves their running statistics unchanged and they normalise with them; other
    train-mode behaviour (DropPath, dropout) stays active, as MSLoRA Sec. 4.1 prescribes.
    """
    prefixes = tuple(trainable_prefixes)
    for name, p in model.named_parameters():
        p.requires_grad_(under(name, prefixes))
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not (name in prefixes or under(name, prefixes)):
            keep_handle(m.register_forward_pre_hook(_keep_eval))


def _run_adapter(attr: str, parallel: bool):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        adapter = getattr(module, attr)
        return output + adapter(args[0]) if parallel else adapter(output)

    return hook


def attach(model: nn.Module, target: str, attr: str, adapter: nn.Module, parallel: bool = False) -> None:
    """Attach ``adapter`` as child ``attr`` of module ``target`` and run it by a forward hook: on the module's
    output (sequential, the default), or beside the module, adding ``adapter(input)`` to its output (parallel).

    The adapter is moved to the device and dtype of the model's parameters.
    """
    module = model.get_submodule(target)
    p = next(model.parameters())
    module.add_module(attr, adapter.to(device=p.device, dtype=p.dtype))
    keep_handle(module.register_forward_hook(_run_adapter(attr, parallel)))
