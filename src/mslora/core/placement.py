"""Where adapters go in a timm backbone: one table of the model families the library knows, a generic rule for
every other family, and sites described by measurement.

- **Blocks.** A family in :data:`mslora.core.families.FAMILIES` names its blocks by a regular expression (and, for MSLoRA, a site
  inside the block where the paper fixes one: ResNet bottlenecks, Sec. 3 and Fig. 2 right). Any other timm model
  takes its blocks from its own ``group_matcher(coarse=False)`` (the per-block groups timm uses for layer-wise
  learning-rate decay), else from ``feature_info`` (one site per feature stage).
- **Sites, measured.** A probe forward at the model's input size and at a second size, on a meta-device copy
  of the model (no weights, no compute), records each site's output. The axis that does not change between the
  sizes is the channel axis, which tells NCHW from NHWC; for token sequences (B, N, C), N = P + (H/s)(W/s) at
  both sizes gives the stride s and the prefix count P per site (CaiT's and XCiT's blocks carry no class token
  even though the model does). Models that take one input size only are probed at that size, with their patch
  grid. A site that returns a tuple or list (MViTv2's ``(x, size)``, PiT's ``(x, cls_tokens)``, TNT's
  ``(pixel_embed, patch_embed)``, SelecSLS's lists) is adapted on the one tensor that carries the batch's features:
  the one element of rank 3 or 4 whose leading axis is the batch (the probe runs a batch of two, so TNT's
  (B * N, ...) pixel tokens are not it) and that is not an input passed through; the other elements pass through.
  Where several elements qualify (HRNet's stages: one map per resolution) the site is refused with the reason.
  NesT's (B, T, N, C) blocks (T square blocks of N tokens each; the axis that follows the input size is T) are
  read through NesT's own ``deblockify``. A site whose axes cannot be told apart is refused with the reason.
- **Pre-norm.** A block is pre-norm (MSLoRA Sec. 4.1: a LayerNorm is prepended at the adapter's input) when
  the first layer with parameters that runs inside it is a norm layer; the table overrides this for families
  whose residual branch normalises after a first depth-wise conv (ConvNeXt).
"""
from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from mslora.core.families import family, is_norm
from mslora.core.layout import Layout

@dataclass(frozen=True)
class Site:
    """One place where a feature-space adapter goes.

    Attributes:
        name: qualified module name in the model (``model.get_submodule(name)``).
        layout: layout of the features there, measured (:class:`mslora.core.layout.Layout`).
        channels: channel count C of those features.
        pre_norm: the features are an un-normalised residual stream (see module doc).
        on_input: the site is the module's input (a forward pre-hook), not its output.
        item: where the module returns a tuple or list, the index of the element adapted (see module doc).
    """

    name: str
    layout: Layout
    channels: int
    pre_norm: bool = False
    on_input: bool = False
    item: int | None = None

    @property
    def mode(self) -> str:
        """How :func:`mslora.core.hooks.attach` hooks an adapter here: ``'input'`` or ``'output'``."""
        return "input" if self.on_input else "output"


def _regex(target_modules: str) -> re.Pattern:
    try:
        return re.compile(target_modules)
    except re.error as e:
        raise ValueError(f"target_modules='{target_modules}' is not a valid regex: {e}") from None


def innermost(names: list[str]) -> list[str]:
    """Drop names that contain another name of the list (keep the finest blocks)."""
    return [n for n in names if not any(o.startswith(n + ".") for o in names)]


def _matcher_blocks(model: nn.Module) -> list[str]:
    """Blocks by timm's ``group_matcher(coarse=False)``: modules whose names fully match a per-block regex (the
    entries timm groups one by one; stems and tail entries, e.g. final norms grouped as (99999,), are left out)."""
    get = getattr(model, "group_matcher", None)
    try:
        spec = get(coarse=False) if get is not None else None
    except Exception:  # a model whose matcher needs arguments or fails: no opinion
        return []
    if not isinstance(spec, dict):  # a callable matcher (CaiT, XCiT) names no modules
        return []
    regexes = []
    for key, value in spec.items():
        if key.startswith("stem"):  # 'stem', or CoaT's 'stem1' ... 'stem4'
            continue
        for rx, group in ([(value, None)] if isinstance(value, str) else value):
            if group is None:
                regexes.append(re.compile(rx))
    return innermost([n for n, _ in model.named_modules() if n and any(rx.fullmatch(n) for rx in regexes)])


def _feature_blocks(model: nn.Module) -> list[str]:
    """One block per feature stage of timm's ``feature_info`` (stride >= 4: the stem is not a stage)."""
    info = getattr(model, "feature_info", None) or []
    names = [f.get("module") for f in info if isinstance(f, dict) and f.get("reduction", 4) >= 4]
    have = dict(model.named_modules())
    return innermost([n for n in names if n and n in have])


def blocks(model: nn.Module) -> list[str]:
    """Module names of the backbone's blocks: the family table's, else timm's group matcher's, else one per
    ``feature_info`` stage.

    Raises:
        ValueError: none of the three finds a block (pass ``target_modules``).
    """
    fam = family(model)
    if fam is not None:
        names = [n for n, _ in model.named_modules() if re.fullmatch(fam.blocks, n)]
    else:
        names = _matcher_blocks(model) or _feature_blocks(model)
    if not names:
        raise ValueError(f"no automatic adapter placement for {type(model).__name__}: neither the family table, "
                         "timm's group_matcher nor feature_info names its blocks; pass target_modules=REGEX "
                         "(a regular expression over module names, e.g. 'stages\\.\\d+\\.blocks\\.\\d+')")
    return names


def _inner_site(model: nn.Module, block: str) -> tuple[str, bool]:
    """ResNet family: the site inside a block at the bottleneck width (MSLoRA Fig. 2 right): after the 3x3
    conv's activation ``act2`` of a bottleneck, after ``act1`` of a basic block; blocks of the same base class
    without those layers (Res2Net, SK-ResNet) take the input of the layer that follows (``conv3``, ``conv2``).
    Returns (module name, on_input)."""
    b = model.get_submodule(block)
    act, nxt = ("act2", "conv3") if hasattr(b, "conv3") else ("act1", "conv2")
    if isinstance(getattr(b, act, None), nn.Module):
        return f"{block}.{act}", False
    if isinstance(getattr(b, nxt, None), nn.Module):
        return f"{block}.{nxt}", True
    return block, False


PEFT_PARTS = ("lora_", "hira_")  # PEFT's per-adapter containers inside a wrapped layer


def modules_in_blocks(model: nn.Module, types: tuple[type, ...], target_modules: str | None = None,
                     keep=lambda m: True) -> list[str]:
    """Names of modules of ``types`` (and passing ``keep``) inside the blocks of :func:`blocks`, or matching the
    ``target_modules`` regex (in full) when given. Weight-space methods use this for their default targets.

    Raises:
        ValueError: no module qualifies, an invalid regex, or no blocks and no regex.
    """
    if target_modules is not None:
        rx = _regex(target_modules)
        inside = lambda n: rx.fullmatch(n) is not None  # noqa: E731
    else:
        prefixes = tuple(b + "." for b in blocks(model))
        inside = lambda n: n.startswith(prefixes)  # noqa: E731
    # A model holding named adapter sets with PEFT layers (mslora.core.named): a wrapped layer counts by its own
    # name (PEFT adds another adapter to it), the adapters' own layers (lora_A, ...) not at all.
    plain = ((n.removesuffix(".base_layer"), m) for n, m in model.named_modules()
             if not any(part.startswith(PEFT_PARTS) for part in n.split(".")))
    names = [n for n, m in plain if isinstance(m, types) and keep(m) and inside(n)]
    if not names:
        where = f"matches target_modules={target_modules!r}" if target_modules else "is inside its blocks"
        raise ValueError(f"no {'/'.join(t.__name__ for t in types)} module of {type(model).__name__} {where}")
    return names


def input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model expects by default: its patch embedding's fixed size (``patch_embed``, TNT's
    ``pixel_embed``), else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = cfg.get("input_size", (3, 224, 224))
    embed = getattr(model, "patch_embed", None) or getattr(model, "pixel_embed", None)
    fixed = getattr(embed, "img_size", None)
    if fixed is not None:
        h, w = (fixed, fixed) if isinstance(fixed, int) else fixed
    return c, h, w


def meta_tensors_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose tensors are on the meta device (shapes only: no memory, no compute)."""
    memo = {}
    for t in model.buffers():
        memo[id(t)] = torch.empty_like(t, device="meta")
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    return copy.deepcopy(model, memo)


PROBE_BATCH = 2  # the probe's batch: a feature tensor's leading axis equals it


def feature_item(value, args=()) -> int | None:
    """Index of the element of a tuple or list that carries the batch's features: the one tensor of rank 3 or 4
    whose leading axis is the probe's batch (:data:`PROBE_BATCH`) and that is not one of the module's inputs
    passed through (SelecSLS hands its first block's map on unchanged); its first index where it appears twice
    (SelecSLS's first block returns ``[out, out]``). None when there is no such tensor or more than one (HRNet's
    stages return one map per resolution: which to adapt is the user's choice)."""
    inputs = {id(a) for arg in args for a in (arg if isinstance(arg, (tuple, list)) else (arg,))}
    found = [i for i, v in enumerate(value) if torch.is_tensor(v) and v.ndim in (3, 4) and v.shape[0] == PROBE_BATCH
             and id(v) not in inputs]
    return found[0] if len({id(value[i]) for i in found}) == 1 else None


class _Probe:
    """Forward hooks recording each site's output (shape, or its type when not one tensor; for a tuple or list,
    the shape of its :func:`feature_item` and that index in ``item``) and the first parameterised layer that runs
    inside it."""

    def __init__(self, model: nn.Module, names: list[str], on_input: dict[str, bool]) -> None:
        self.out: dict[str, tuple[int, ...] | str] = {}
        self.item: dict[str, int] = {}
        self.first: dict[str, nn.Module] = {}
        self.handles = []
        for n in names:
            m = model.get_submodule(n)
            if on_input.get(n):
                self.handles.append(m.register_forward_pre_hook(self._record(n, True)))
            else:
                self.handles.append(m.register_forward_hook(self._record(n, False)))
        prefixes = {n: n + "." for n in names}
        for mname, m in model.named_modules():
            if next(m.parameters(recurse=False), None) is None:
                continue
            owners = [n for n, p in prefixes.items() if mname.startswith(p)]
            if owners:
                self.handles.append(m.register_forward_pre_hook(self._first(owners, m)))

    def _record(self, name: str, on_input: bool):
        def hook(_m, args, out=None):
            x = args[0] if on_input else out
            if name in self.out:
                return
            i = feature_item(x, args) if isinstance(x, (tuple, list)) and not on_input else None
            if i is not None:
                self.item[name], x = i, x[i]
            self.out[name] = (tuple(x.shape) if torch.is_tensor(x) else f"a {type(x).__name__}" +
                              (f" of {len(x)} without exactly one new (batch, ...) feature tensor"
                               if isinstance(x, (tuple, list)) else ""))
        return hook

    def _first(self, owners: list[str], module: nn.Module):
        def hook(_m, _args):
            for o in owners:
                self.first.setdefault(o, module)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def probe_forward(model: nn.Module, names: list[str], on_input: dict[str, bool], size: tuple[int, int]) -> _Probe:
    """One probe forward of a batch of :data:`PROBE_BATCH` zero images of ``size`` (H, W) in eval mode, without
    gradients."""
    probe = _Probe(model, names, on_input)
    p = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(PROBE_BATCH, input_size(model)[0], *size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        probe.remove()
    return probe


def _probe(model: nn.Module, names: list[str], on_input: dict[str, bool]) -> tuple[list[_Probe], list[tuple[int, int]]]:
    """Probe at the default input size and at a second one (two patches more each side, 32 px for CNNs and patch-16
    models, else twice the size; on the meta
    copy, with timm's ``set_input_size`` when the model takes one size only). Returns the probes that ran and
    their sizes.

    Raises:
        ValueError: the model does not run even at its default size (the message has the model's error).
    """
    _, h, w = input_size(model)
    try:
        meta_copy = meta_tensors_copy(model)
        first = probe_forward(meta_copy, names, on_input, (h, w))
    except Exception:  # an op without a meta kernel: probe the model itself, at its size only
        try:
            return [probe_forward(model, names, on_input, (h, w))], [(h, w)]
        except Exception as e:
            raise ValueError(f"cannot run {type(model).__name__} on a {h}x{w} image to find its adapter sites: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None) or 16
    ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)[:2]
    # a second size two patches larger (32 px at patch 16): at patch 14 (EVA-02, DINOv2) h + 32 splits into no grid
    for size in ((h + 2 * ph, w + 2 * pw), (2 * h, 2 * w)):
        try:
            return [first, probe_forward(meta_copy, names, on_input, size)], [(h, w), size]
        except Exception:
            pass
    timm_log = logging.getLogger("timm")
    level = timm_log.level
    try:
        timm_log.setLevel(logging.WARNING)  # not "Resized position embedding" on every adapt
        size = (h + 2 * ph, w + 2 * pw)
        meta_copy.set_input_size(img_size=size)
        return [first, probe_forward(meta_copy, names, on_input, size)], [(h, w), size]
    except Exception:
        return [first], [(h, w)]
    finally:
        timm_log.setLevel(level)


def measure_layout(name: str, shapes: list, sizes: list[tuple[int, int]], model: nn.Module, kind: str, raster: bool
              ) -> tuple[Layout, int]:
    """Layout and channel count of one site from its output shapes at the probe sizes (see module doc).

    Raises:
        ValueError: not one tensor, an unsupported rank, or axes that cannot be told apart.
    """
    shape = shapes[0]
    if isinstance(shape, str):
        raise ValueError(f"module '{name}' returns {shape}, not one feature map; pass target_modules=REGEX naming "
                         f"modules inside it that return one tensor each")
    if kind in ("nchw", "nhwc"):
        if len(shape) != 4:
            raise ValueError(f"layout='{kind}' for '{name}', but its output has shape {shape}")
        return Layout(kind), shape[1] if kind == "nchw" else shape[3]
    if len(shape) == 4 and kind == "auto":
        if len(shapes) == 2 and shapes[0] != shapes[1]:
            same = [i for i in (1, 2, 3) if shapes[0][i] == shapes[1][i]]
            kinds = {(1,): "nchw", (3,): "nhwc"}
            found = kinds.get(tuple(same))
            blocked = same == [2, 3] and all(_square(s[1]) and _square(s[2]) for s in shapes)
        else:  # one size, or a model that resizes its input (the map does not change): square maps tell
            b, x, y, z = shape
            found = "nchw" if y == z != x else "nhwc" if x == y != z else None
            blocked = found is None and x != y and _square(x) and _square(y)
        if blocked:  # NesT: (B, T, N, C), T square blocks (following the input size) of N tokens
            return Layout("blocks", block_size=math.isqrt(shape[2])), shape[3]
        if found is None:
            raise ValueError(f"cannot tell the channel axis of '{name}' (output {shapes[0]} at {sizes[0]}"
                             + (f", {shapes[1]} at {sizes[1]}" if len(shapes) == 2 else "") +
                             "): expected (B, C, H, W) or (B, H, W, C) with H, W following the input size, or NesT's "
                             "(B, T, N, C) blocks; pass "
                             "target_modules naming such modules, with layout='nchw' or 'nhwc'")
        return Layout(found), shape[1] if found == "nchw" else shape[3]
    if len(shape) == 3 and kind in ("auto", "tokens"):
        found = _token_grid(shapes, sizes, model) if raster else None
        if found is None:
            return Layout("tokens", 0, None, spatial=False), shape[2]
        prefix, grid, stride = found
        return Layout("tokens", prefix, grid, stride=stride), shape[2]
    raise ValueError(f"module '{name}' outputs shape {shape}; expected (B, C, H, W), (B, H, W, C), (B, N, C) or "
                     "NesT's (B, T, N, C)")


def _square(n: int) -> bool:
    return math.isqrt(n) ** 2 == n


def _token_grid(shapes: list, sizes: list[tuple[int, int]], model: nn.Module
                ) -> tuple[int, tuple[int, int], int | None] | None:
    """(prefix tokens P, patch grid at the default size, stride in pixels or None) of a (B, N, C) site, or None when
    N is not P + grid.

    Two sizes: N_i = P + (H_i W_i) / s^2 gives s and P. One size: the patch embedding's grid, else a square
    grid after the model's prefix count (or after the fewest prefix tokens, at most 8, that leave a square); the
    stride is then the input size over the grid where that divides.
    """
    n = [s[1] for s in shapes]
    if len(shapes) == 2 and n[0] != n[1]:
        a = [h * w for h, w in sizes]
        s2 = (a[1] - a[0]) / (n[1] - n[0])
        s = round(math.sqrt(s2)) if s2 > 0 else 0
        if s and all(h % s == 0 and w % s == 0 for h, w in sizes):
            grid = (sizes[0][0] // s, sizes[0][1] // s)
            p = n[0] - grid[0] * grid[1]
            if p >= 0 and n[1] - (sizes[1][0] // s) * (sizes[1][1] // s) == p:
                return p, grid, s
        return None
    # One size, or a model that resizes its input to a fixed size (CrossViT): N is read at the default size.
    h = sizes[0][0]
    stride = lambda g: h // g[0] if h % g[0] == 0 and len(shapes) == 1 else None  # noqa: E731
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and 0 <= n[0] - grid[0] * grid[1] <= 64:
        return n[0] - grid[0] * grid[1], tuple(grid), stride(grid)
    known = getattr(model, "num_prefix_tokens", None)
    for p in ([int(known)] if known is not None else []) + list(range(9)):  # the model's count, else the fewest
        side = math.isqrt(max(n[0] - p, 0))
        if side > 1 and side * side == n[0] - p:
            return p, (side, side), stride((side, side))
    return None


def find_sites(model: nn.Module, target_modules: str | None = None, layout: str = "auto",
               inner: bool = True) -> list[Site]:
    """Adapter sites of ``model``, each described by measurement (see module doc).

    Args:
        model: a timm model.
        target_modules: regex matched in full against module names; None: the blocks of :func:`blocks`.
        layout: with ``target_modules``: ``"auto"`` (measured), ``"nchw"``, ``"nhwc"`` or ``"tokens"``.
        inner: in the ResNet family, the site inside each block at the bottleneck width (MSLoRA Fig. 2 right)
            rather than the block's output.

    Raises:
        ValueError: an invalid regex or one that matches nothing; no blocks; a site that does not run, returns
            several tensors, or whose layout cannot be told.
    """
    if layout not in ("auto", "nchw", "nhwc", "tokens"):
        raise ValueError(f"layout='{layout}' is not one of auto, nchw, nhwc, tokens")
    fam = family(model)
    if target_modules is None:
        names, kind = blocks(model), "auto"
        on_input = {}
        if inner and fam is not None and fam.inner_site:
            resolved = [_inner_site(model, b) for b in names]
            names, on_input = [n for n, _ in resolved], {n: i for n, i in resolved}
    else:
        rx = _regex(target_modules)
        names = [n for n, _ in model.named_modules() if n and rx.fullmatch(n)]
        kind, on_input = layout, {}
        if not names:
            raise ValueError(f"target_modules='{target_modules}' matches no module of {type(model).__name__}")
    probes, sizes = _probe(model, names, on_input)
    sites = []
    for name in names:
        shapes = [p.out.get(name) for p in probes]
        if shapes[0] is None:
            raise ValueError(f"module '{name}' did not run in a forward pass, so no adapter can act on it")
        shapes = [s for s in shapes if s is not None]
        lay, channels = measure_layout(name, shapes, sizes[:len(shapes)], model, kind,
                                  fam.raster if fam is not None and target_modules is None else True)
        first = probes[0].first.get(name)
        if fam is not None and fam.pre_norm is not None and target_modules is None:
            pre = fam.pre_norm
        else:
            pre = first is not None and is_norm(first)
        sites.append(Site(name, lay, channels, pre, on_input.get(name, False), probes[0].item.get(name)))
    return sites


def spatial_only(sites: list[Site], method: str) -> None:
    """Refuse sites whose features are not a 2D grid (a depth-wise convolution over them would mix unrelated
    positions).

    Raises:
        ValueError: naming the first such site.
    """
    for site in sites:
        if not site.layout.spatial:
            raise ValueError(f"{method} needs a spatial grid, but the tokens at '{site.name}' are not one (not in "
                             "raster order, or their count does not follow the input size); adapt sites with "
                             "(B, C, H, W) or (B, H, W, C) features via target_modules, or use a point-wise method "
                             "(adapter, lorand, lora)")
