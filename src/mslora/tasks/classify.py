"""Image classification: the adapted timm model with its own classifier head, cross-entropy, top-1 / top-5.

Recipe details that belong to the task (MSLoRA Sec. 4.1 and the RLRR official code):
- the new classifier head is zero-initialised (``head_init='zero'``, as RLRR's official code does): the first
  loss is exactly ln(num_classes) and the first steps train the head alone, instead of starting from timm's
  uniform(+-1/sqrt(fan_in)) head whose first-epoch losses of about 9 pushed the adapters far from the backbone;
- torchvision v2 transforms: RandomResizedCrop + horizontal flip for training, Resize(size / crop_pct) +
  CenterCrop for evaluation, with the model's own normalisation (timm ``resolve_model_data_config``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from timm.data import resolve_model_data_config
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2
from tqdm import tqdm

from mslora.backbones import build_backbone
from mslora.core.adapt import adapt, load_adapter
from mslora.data.classify import ClassificationData, load_classification
from mslora.data.transforms import build_transforms
from mslora.registry import register_task
from mslora.tasks.base import Task


def zero_head(model: nn.Module) -> None:
    """Zero the weights and biases of the classifier head (timm ``get_classifier()``), in place."""
    heads = model.get_classifier() if hasattr(model, "get_classifier") else ()
    for head in heads if isinstance(heads, (tuple, list)) else (heads,):
        for p in head.parameters() if isinstance(head, nn.Module) else ():
            nn.init.zeros_(p)


@register_task("classify")
class Classification(Task):
    """Classification of ``cfg.data`` into its classes with ``cfg.method`` on ``cfg.backbone``.

    Raises (on construction):
        ValueError / FileNotFoundError: bad method option, backbone name or data (nothing written yet).
    """

    best_metric = "top1"

    def load_data(self, data: str) -> ClassificationData:
        """The source split as ``cfg.split`` says (:func:`mslora.data.classify.load_classification`); records the
        split used in ``cfg.split`` (the run's config and metrics say it) and whether the last epoch is kept."""
        cfg = self.cfg
        loaded = load_classification(data, cfg.split, cfg.split_seed, cfg.data_format)
        self.keep_last = loaded.val_in_train  # validation images were trained on: no epoch is picked on them
        cfg.split = loaded.split
        return loaded

    def build_model(self, adapter: str | Path | None = None) -> nn.Module:
        """The backbone with a ``num_classes`` head, adapted by the method, or, with ``adapter``, adapted and loaded
        from that adapter file. With ``head_init='zero'`` a new head (random init, or another size than the
        pretrained one) is zeroed; a pretrained head of the right size is kept."""
        cfg = self.cfg
        model = self.backbone()
        if adapter is not None:
            return load_adapter(model, adapter)
        loaded_head = (cfg.pretrained or cfg.weights) and \
            (getattr(model, "pretrained_cfg", None) or {}).get("num_classes") == self.num_classes
        if cfg.head_init == "zero" and not loaded_head:  # a pretrained head of the right size is kept
            zero_head(model)
        return adapt(model, cfg.method, **cfg.method_options)

    def backbone(self) -> nn.Module:
        """The plain timm backbone with a ``num_classes`` head (:func:`mslora.backbones.build_backbone`), before any
        method: what :meth:`build_model` adapts, and what named adapters share (``mslora.load_runs``)."""
        cfg = self.cfg
        return build_backbone(cfg.backbone, self.num_classes, cfg.pretrained, cfg.weights, img_size=cfg.img_size,
                              drop_path_rate=cfg.drop_path_rate)

    def set_transforms(self, model: nn.Module) -> None:
        """Training and evaluation transforms at ``cfg.img_size`` with the model's normalisation (timm
        ``resolve_model_data_config``), recorded in :attr:`preprocessing`."""
        dc = resolve_model_data_config(model)
        self.preprocessing = {"img_size": self.cfg.img_size, "mean": list(dc["mean"]), "std": list(dc["std"]),
                              "crop_pct": dc.get("crop_pct", 0.875), "interpolation": dc.get("interpolation", "bicubic")}
        self.data.with_transforms(build_transforms(**self.preprocessing, train=True),
                                  self.input_transform(self.preprocessing))

    def input_transform(self, preprocessing: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """Resize(img_size / crop_pct) + CenterCrop(img_size) + normalisation: an image (PIL, or uint8 (3, H, W)
        tensor, resized as a PIL image, as the training data was) -> float (3, img_size, img_size)."""
        return v2.Compose([v2.ToPILImage(), build_transforms(**preprocessing, train=False)])

    @torch.no_grad()
    def predict(self, model: nn.Module, images: list[torch.Tensor], sizes: list[tuple[int, int]]
                ) -> list[dict[str, Any]]:
        """Per image: ``label`` (the top class's name) and ``probabilities`` (softmax over the classes, in class
        order)."""
        return self.answer(model(torch.stack(images)))

    def answer(self, logits: torch.Tensor) -> list[dict[str, Any]]:
        """Logits (B, num_classes) -> per image ``label`` (the top class's name) and ``probabilities`` (softmax over
        the classes, in class order)."""
        probs = logits.float().softmax(-1).cpu()
        return [{"label": self.classes[int(p.argmax())], "probabilities": p.tolist()} for p in probs]

    def losses(self, model: nn.Module, batch: Any) -> tuple[dict[str, torch.Tensor], int]:
        """Cross-entropy of a batch ``(x: (B, 3, H, W), y: (B,))``."""
        x, y = batch
        return {"ce": nn.functional.cross_entropy(model(x).float(), y)}, len(y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, gather: Callable[[Any], Any], desc: str = "eval") -> dict[str, float]:
        """Top-1, top-5 (fractions in [0, 1], torchmetrics micro accuracy; top-5 only with more than 5 classes,
        where it is not always 1) and mean cross-entropy over every image of the split, gathered from all
        processes."""
        model.eval()
        c = self.num_classes
        top1 = MulticlassAccuracy(c, top_k=1, average="micro")
        top5 = MulticlassAccuracy(c, top_k=5, average="micro") if c > 5 else None
        loss_sum, n = 0.0, 0
        for x, y in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
            logits, y = gather((model(x).float(), y))
            logits, y = logits.cpu(), y.cpu()
            loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
            top1.update(logits, y)
            if top5 is not None:
                top5.update(logits, y)
        return {"top1": top1.compute().item(), **({"top5": top5.compute().item()} if top5 is not None else {}),
                "loss": loss_sum / max(n, 1), "images": n}

    def collapsed(self, history: list[dict[str, Any]]) -> str | None:
        """Collapsed: a non-finite training loss, or after two or more epochs a last-epoch training loss still at
        90% of chance level ln(num_classes) or more while the last epoch's validation top-1 is at most twice chance
        (the model ended at chance, whatever an earlier epoch reached: a run that learnt in epoch 1 and then fell to
        chance is collapsed)."""
        c = self.num_classes
        if not history:
            return None
        last = history[-1]["train_loss"]
        if not math.isfinite(last):
            return f"training loss is {last}"
        final = history[-1]["val_top1"]
        if len(history) >= 2 and c > 1 and last >= 0.9 * math.log(c) and final <= 2.0 / c:
            return (f"training loss {last:.3f} stayed at chance level ln({c}) = {math.log(c):.3f} and the last "
                    f"validation top-1 is {final:.3f} (chance {1 / c:.3f})")
        return None
