"""``mslora visualize``: what MSLoRA changes, drawn as the MSLoRA paper's Fig. 1 and Fig. 3 draw it
(arXiv 2511.12400, Sec. 1 and Sec. 4.3).

For each image and each chosen site (the last MSLoRA module of every feature-map resolution, so one per stage of a
hierarchical backbone; four evenly spaced modules of a plain ViT), one row of four panels: the image, the frozen
backbone's activation at that site (every adapter bypassed: mean |F| over channels), the adapted model's output
there (mean |F + H(F)|), and the reweighting H(F) = Up(Proj(F) * Trans(F)) of Eq. 1 (mean |H(F)|), each map
normalised to [0, 1] and upsampled over the image. One PNG per image.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import nn

from mslora.data.images import load_rgb
from mslora.data.transforms import build_transforms
from mslora.engine.rebuild import rebuild, run_config
from mslora.methods.mslora import MSLoRA


def mslora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's MSLoRA modules in forward order (their registration order)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MSLoRA)]


@torch.no_grad()
def site_maps(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per MSLoRA module: ``name`` (its module path), ``site`` (the backbone block it adapts) and channel-mean
    magnitude maps (B, H, W) of the frozen backbone's features
    (``frozen``, all adapters bypassed), the adapted output (``adapted``) and the reweighting (``update``).

    Raises:
        ValueError: the model has no MSLoRA module.
    """
    mods = mslora_modules(model)
    if not mods:
        raise ValueError("the model has no MSLoRA module: visualize draws MSLoRA's reweighting")
    model.eval()
    frozen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: frozen.__setitem__(n, mod.layout.to_2d(args[0])[0])
                                     or args[0]) for n, m in mods]  # returning the input bypasses the adapter
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    rows: list[dict[str, Any]] = []

    def record(mod, args, out, n):
        f = mod.layout.to_2d(args[0])[0]
        h = mod.reweighting(f)
        rows.append({"name": n, "site": getattr(mod, "site", "") or n, "frozen": frozen[n].abs().mean(1),
                     "adapted": (f + h).abs().mean(1), "update": h.abs().mean(1)})

    hooks = [m.register_forward_hook(lambda mod, args, out, n=n: record(mod, args, out, n)) for n, m in mods]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return rows


def choose_sites(rows: list[dict[str, Any]], per_plain: int = 4) -> list[dict[str, Any]]:
    """The last site of each resolution in forward order; with a single resolution (plain ViT), ``per_plain``
    evenly spaced sites."""
    sizes = [tuple(r["frozen"].shape[-2:]) for r in rows]
    if len(set(sizes)) == 1:
        k = min(per_plain, len(rows))
        return [rows[round((i + 1) * len(rows) / k) - 1] for i in range(k)]
    return [r for i, r in enumerate(rows) if i + 1 == len(rows) or sizes[i + 1] != sizes[i]]


def _overlay(ax, image, heat, title: str, vmin: float, vmax: float):
    """``heat`` (h, w) upsampled over ``image`` on the colour scale [vmin, vmax]; returns the mappable."""
    up = F.interpolate(heat[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    ax.imshow(image)
    shown = ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    ax.set_title(title, fontsize="small")
    ax.axis("off")
    return shown


def draw(image, rows: list[dict[str, Any]], path: Path, index: int = 0, caption: str = "") -> Path:
    """Write the figure for one image (``image``: (H, W, 3) array in [0, 1]) of the chosen ``rows``: per site, the
    frozen and adapted magnitudes on one shared colour scale (so they compare) and the reweighting on its own, each
    with its colour bar; ``caption`` (e.g. the predicted class) above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 4, figsize=(11, 2.7 * len(rows) + 0.4), squeeze=False)
    for ax_row, r in zip(axes, rows):
        h, w = r["frozen"].shape[-2:]
        ax_row[0].imshow(image)
        ax_row[0].set_title(f"{r.get('site') or r['name']} ({h}x{w})", fontsize="small")  # the backbone's block
        ax_row[0].axis("off")
        both = torch.stack([r["frozen"][index], r["adapted"][index]])
        lo, hi = float(both.min()), max(float(both.max()), float(both.min()) + 1e-12)
        for ax, key, title in ((ax_row[1], "frozen", "frozen backbone |F|"), (ax_row[2], "adapted", "adapted |F + H(F)|")):
            fig.colorbar(_overlay(ax, image, r[key][index], title, lo, hi), ax=ax, fraction=0.046, pad=0.02)
        u = r["update"][index]
        shown = _overlay(ax_row[3], image, u, "reweighting |H(F)|", float(u.min()), max(float(u.max()), float(u.min()) + 1e-12))
        fig.colorbar(shown, ax=ax_row[3], fraction=0.046, pad=0.02)
    if caption:
        fig.suptitle(caption, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def visualize(adapter: str | Path, images: list[str | Path], output: str | Path, img_size: int | None = None,
              device: str = "cpu") -> list[Path]:
    """Draw one PNG per image for the MSLoRA adapter of a classification run (``adapter``: its directory or
    ``adapter.safetensors``), ``STEM_mslora.png`` (``STEM_<k>_mslora.png`` for images that share a file name, k
    their position); ``img_size`` overrides the run's (larger images give finer maps).

    ``images``: files, folders (their images, any depth) or glob patterns (:func:`mslora.tools.predict.collect`).

    Raises:
        FileNotFoundError: no adapter file or image.
        ValueError: not an MSLoRA classification run, or an unreadable image (named).
    """
    path, meta, cfg = run_config(adapter, workers=0)
    if meta["method"] != "mslora":
        raise ValueError(f"'{path}' is a {meta['method']} adapter; visualize draws MSLoRA's reweighting")
    if cfg.task != "classify":
        raise ValueError(f"'{path}' is not from an mslora classification run (mslora train --task classify)")
    from mslora.tools.predict import collect

    images = collect([str(img) for img in images])  # files, folders (their images), glob patterns
    _, model, _ = rebuild(path, workers=0)
    model = model.to(device).eval()
    dc = resolve_model_data_config(model)
    tf = build_transforms(img_size or cfg.img_size, dc["mean"], dc["std"], dc.get("crop_pct", 0.875), train=False)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    mean, std = torch.tensor(dc["mean"])[:, None, None], torch.tensor(dc["std"])[:, None, None]
    stems = [Path(img).stem for img in images]
    for k, img in enumerate(images):
        x = tf(load_rgb(str(img)))[None]
        rows = choose_sites([{k: v.cpu() if torch.is_tensor(v) else v for k, v in r.items()}
                             for r in site_maps(model, x.to(device))])
        shown = (x[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        with torch.no_grad():
            probs = model(x.to(device)).float().softmax(-1)[0].cpu()
        top = int(probs.argmax())
        caption = f"{Path(img).name}: predicted {meta['classes'][top] if meta.get('classes') else top} ({probs[top]:.0%})"
        name = stems[k] if stems.count(stems[k]) == 1 else f"{stems[k]}_{k}"  # two images of one name: both kept
        written.append(draw(shown, rows, out / f"{name}_mslora.png", caption=caption))
    return written
