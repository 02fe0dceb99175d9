"""``mslora export``: a trained run as one ONNX file or one ``torch.export`` program (``.pt2``) that carries its class
names and preprocessing, for classification and segmentation runs.

The model is the one :func:`mslora.load_run` rebuilds, merged first when its method merges (LoRA, RLRR, SSF, ...:
then the file is the plain backbone); a method that does not merge (MSLoRA, Mona, adapters) is exported with its
modules, which ``torch.export`` traces through their hooks. ONNX uses PyTorch's own exporter
(``torch.onnx.export(..., dynamo=True)``, which needs the optional packages ``onnx`` and ``onnxscript``:
``pip install -e ".[export]"``); the facts ride in the ONNX file's ``metadata_props`` and in the ``.pt2`` archive's
extra file ``mslora.json``: ``task``, ``method``, ``backbone``, ``classes`` and ``preprocessing`` (JSON).

Detection runs are refused: torchvision's detectors take a list of images of any size and return per-image dicts
whose lengths depend on the data, and ``torch.export`` stops at such a branch (tried with torch 2.14 and
torchvision 0.29 on Faster R-CNN: "Could not guard on data-dependent expression 4*u1 > 4000", torchvision's
``batched_nms`` choosing its algorithm by the number of boxes).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mslora.core.adapt import merge
from mslora.core.state import adaptation
from mslora.inference import load_run
from mslora.registry import get_method

FORMATS = ("onnx", "pt2")


def exportable(model: nn.Module, task: str) -> nn.Module:
    """The run's model ready for export: a classifier merged when its method merges (a plain timm model); others
    as they are.

    Raises:
        ValueError: a detection model (see the module doc).
    """
    if task == "detect":
        raise ValueError("detection runs do not export: torchvision's detectors branch on the number of boxes they "
                         "find (batched_nms), which torch.export cannot trace; export classification or segmentation "
                         "runs, or run the detector with mslora predict")
    rec = adaptation(model)
    if task == "classify" and rec is not None and get_method(rec.method).merge is not None:
        merge(model)
    return model


def export_run(adapter: str | Path, fmt: str, output: str | Path, dynamic_batch: bool = False,
               opset: int | None = None) -> Path:
    """Write the run at ``adapter`` as ``fmt`` ('onnx' or 'pt2') to ``output``; returns the path. The input is one
    (B, 3, S, S) float batch after the run's preprocessing (S = its ``img_size``); B is 2 in the traced example and
    free with ``dynamic_batch``.

    Raises:
        ValueError: an unknown format, an output that exists, a detection run, a missing optional package (named).
        FileNotFoundError: no adapter file.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format='{fmt}' is not one of {', '.join(FORMATS)}")
    out = Path(output)
    if out.exists():
        raise ValueError(f"output '{out}' exists; choose a new file (nothing is overwritten)")
    if fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(f"ONNX export needs {' and '.join(missing)}: pip install -e \".[export]\"")
    run = load_run(adapter, device="cpu")
    task = run.model.mslora_inference[0]
    model = exportable(run.model, task.cfg.task)
    size = task.cfg.img_size
    example = (torch.randn(2, 3, size, size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    info = {"task": task.cfg.task, "method": task.cfg.method, "backbone": task.cfg.backbone,
            "classes": run.classes, "preprocessing": task.preprocessing or {}}
    with torch.no_grad():
        if fmt == "pt2":
            program = torch.export.export(model, example, dynamic_shapes=dynamic)
            torch.export.save(program, str(out), extra_files={"mslora.json": json.dumps(info)})
        else:
            write_onnx(model, example, dynamic, opset, out, info)
    return out


def write_onnx(model: nn.Module, example: tuple[torch.Tensor], dynamic: Any, opset: int | None, out: Path,
               info: dict[str, Any]) -> None:
    """``torch.onnx.export`` (dynamo) to ``out``, then ``info`` as the file's metadata_props (values JSON)."""
    import onnx  # optional: only for ONNX export

    kw = {"opset_version": opset} if opset else {}
    torch.onnx.export(model, example, str(out), dynamo=True, dynamic_shapes=dynamic, input_names=["images"],
                      output_names=["logits"], external_data=False, **kw)
    proto = onnx.load(str(out))
    for key, value in info.items():
        proto.metadata_props.add(key=key, value=value if isinstance(value, str) else json.dumps(value))
    onnx.save(proto, str(out))
