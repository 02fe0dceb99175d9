"""``mslora serve``: trained adapters behind HTTP, on LitServe (dynamic batching, workers per device) rather than a
server of our own (the optional extra ``pip install -e ".[serve]"``).

- ``POST /predict``: an image (multipart field ``image``, or JSON ``{"image": BASE64}``) and an ``adapter`` name
  (optional with one adapter), optional ``draw`` -> the prediction as JSON (:func:`encode`), with the image drawn
  (``image_png``, base64) when ``draw`` is set for detection and segmentation.
- ``GET /adapters``: each adapter's name, task, method, backbone and classes.
- ``GET /health``: LitServe's own (200 "ok" once the workers have loaded the models).
- ``GET /``: a page to pick an adapter, upload an image and see the result.

Classification adapters trained on the same backbone weights share one backbone in each worker (named adapter sets,
``mslora.load_runs``); requests for different adapters that arrive together are answered by one mixed batch
(``mslora.predict(..., adapter_names=...)``). Detection and segmentation runs each keep a model of their own.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
import torch
from fastapi import HTTPException
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError

from mslora.core.state import read_adapter
from mslora.engine.rebuild import adapter_file
from mslora.inference import Run, as_image, load_run, load_runs, predict
from mslora.tools.predict import draw_detections, overlay

PAGE = Path(__file__).with_name("serve_page.html")


def describe(runs: dict[str, str]) -> dict[str, dict[str, Any]]:
    """name -> what ``GET /adapters`` says of it (task, method, backbone, classes, input size), from the files'
    metadata alone.

    Raises:
        FileNotFoundError / ValueError: a run without an adapter file, or a file without a training config.
    """
    out = {}
    for name, run in runs.items():
        _, meta = read_adapter(adapter_file(run))
        if "train_config" not in meta or "classes" not in meta:
            raise ValueError(f"adapter '{name}' ({run}) was not written by a training run (no training config or "
                             "classes); serve runs of mslora train")
        tc = meta["train_config"]
        out[name] = {"task": tc["task"], "method": meta["method"], "backbone": meta.get("backbone"),
                     "classes": meta["classes"], "img_size": tc["img_size"],
                     "_share": (meta.get("backbone"), meta.get("backbone_sha256")) if tc["task"] == "classify"
                     else None}
    return out


def load_models(runs: dict[str, str], info: dict[str, dict[str, Any]], device: str | None) -> dict[str, Any]:
    """name -> the model answering for it: one shared model per group of classification runs on the same backbone
    weights (:func:`mslora.load_runs`), a :func:`mslora.load_run` of its own for each other run."""
    groups: dict[Any, dict[str, str]] = {}
    for name, run in runs.items():
        groups.setdefault(info[name]["_share"] or name, {})[name] = run
    models = {}
    for key, members in groups.items():
        if info[next(iter(members))]["_share"] is None:
            models[key] = load_run(members[key], device=device)
        else:
            shared = load_runs(members, device=device)
            models.update(dict.fromkeys(members, shared))
    return models


def decode_image(value: Any) -> torch.Tensor:
    """An uploaded file (multipart), raw bytes or a base64 string (a ``data:`` URL too) -> uint8 RGB (3, H, W).

    Raises:
        ValueError: nothing that decodes as an image (the reason).
    """
    if hasattr(value, "file"):  # starlette UploadFile
        value = value.file.read()
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.split(",", 1)[1] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"'image' is not base64: {e}") from None
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"'image' must be a file or a base64 string, got {type(value).__name__}")
    try:
        return as_image(Image.open(io.BytesIO(value)))
    except UnidentifiedImageError:
        raise ValueError(f"'image' ({len(value)} bytes) is not an image file PIL can read (PNG, JPEG, ...)") from None
    except OSError as e:
        raise ValueError(f"'image' does not decode: {e}") from None


def png_base64(image: Image.Image) -> str:
    """A PIL image as base64 PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def encode(task: str, classes: list[str], image: torch.Tensor, pred: dict[str, Any], top_k: int,
           score_threshold: float, draw: bool) -> dict[str, Any]:
    """A prediction of :func:`mslora.predict` as JSON: classify ``label``, ``top_k`` [{label, probability}],
    ``probabilities`` (class order); detect ``boxes`` xyxy pixels, ``labels``, ``scores`` at or above
    ``score_threshold``; segment ``label_map_png`` (base64 palette PNG, index = class) and ``classes_present``.
    ``draw``: detection and segmentation add ``image_png``, the image with the result drawn."""
    if task == "classify":
        probs = torch.tensor(pred["probabilities"])
        top = probs.topk(min(top_k, len(classes)))
        return {"label": pred["label"], "probabilities": pred["probabilities"],
                "top_k": [{"label": classes[int(i)], "probability": float(p)} for p, i in zip(*top)]}
    if task == "detect":
        drawn, keep = draw_detections(image, pred, score_threshold)
        out = {"boxes": pred["boxes"][keep].tolist(), "scores": pred["scores"][keep].tolist(),
               "labels": [lb for lb, k in zip(pred["labels"], keep.tolist()) if k]}
        return {**out, **({"image_png": png_base64(Image.fromarray(drawn.permute(1, 2, 0).numpy()))} if draw else {})}
    labels, blended = overlay(image, pred["label_map"])
    present = [classes[i] for i in np.unique(pred["label_map"].numpy()) if i < len(classes)]
    return {"label_map_png": png_base64(labels), "classes_present": present,
            **({"image_png": png_base64(blended)} if draw else {})}


class AdapterAPI(ls.LitAPI):
    """The LitServe API serving ``runs`` (name -> run directory or adapter file; ``info`` from :func:`describe`).
    One request: (adapter name, image, draw); a batch of them is answered by :func:`mslora.predict` per model, mixed
    across the adapters that share it. A module-level class: LitServe's worker processes are spawned with it."""

    def __init__(self, runs: dict[str, str], info: dict[str, dict[str, Any]], top_k: int, score_threshold: float,
                 **litapi: Any) -> None:
        super().__init__(**litapi)
        self.runs, self.info, self.top_k, self.score_threshold = runs, info, top_k, score_threshold

    def setup(self, device: str) -> None:
        """Load the models in the worker (:func:`load_models`)."""
        self.models = load_models(self.runs, self.info, device)

    def decode_request(self, request):  # unannotated: LitServe gives the JSON or form payload
        """A JSON or form request -> (adapter name, uint8 (3, H, W) image, draw).

        Raises:
            HTTPException: 400 for an adapter that is not served, no image, or one that does not decode.
        """
        runs = self.runs
        name = request.get("adapter") or (next(iter(runs)) if len(runs) == 1 else None)
        if name not in runs:
            raise HTTPException(400, f"adapter {name!r} is not served; choose one of: {', '.join(runs)}")
        if request.get("image") is None:
            raise HTTPException(400, "the request has no 'image' (a multipart file, or base64 in JSON)")
        try:
            image = decode_image(request["image"])
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return name, image, str(request.get("draw", "")).lower() in ("1", "true", "yes", "on")

    def batch(self, inputs: list) -> list:
        """The decoded requests as they are (images of any size; :func:`mslora.predict` batches them)."""
        return inputs

    def predict(self, inputs: Any) -> Any:
        """One answer per request (a single request without batching), each :func:`encode` d."""
        single = isinstance(inputs, tuple)
        items = [inputs] if single else inputs
        out: list[dict[str, Any] | None] = [None] * len(items)
        by_model: dict[int, list[int]] = {}
        for i, (name, _, _) in enumerate(items):
            by_model.setdefault(id(self.models[name]), []).append(i)
        for rows in by_model.values():
            model = self.models[items[rows[0]][0]]
            names = [items[i][0] for i in rows]
            preds = predict(model, [items[i][1] for i in rows], batch_size=len(rows),
                            adapter_names=None if isinstance(model, Run) else names)
            for i, pred in zip(rows, preds):
                name, image, draw = items[i]
                a = self.info[name]
                out[i] = {"adapter": name, "task": a["task"], **encode(a["task"], a["classes"], image, pred,
                                                                      self.top_k, self.score_threshold, draw)}
        return out[0] if single else out

    def unbatch(self, output: list) -> list:
        """The per-request answers of :meth:`predict`."""
        return output

    def encode_response(self, output):  # unannotated: LitServe returns it as JSON
        """The answer as JSON."""
        return output


def serve(runs: dict[str, str], host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          max_batch_size: int = 16, batch_timeout: float = 0.01, device: str = "auto", top_k: int = 5,
          score_threshold: float = 0.5) -> None:
    """Serve ``runs`` (name -> run) until interrupted: LitServe with ``workers`` inference processes per device,
    requests batched up to ``max_batch_size`` within ``batch_timeout`` seconds.

    Raises:
        FileNotFoundError / ValueError: a run that cannot be served (see :func:`describe`) or an invalid option.
    """
    if not runs:
        raise ValueError("serve needs at least one --adapter NAME=RUN")
    if workers < 1 or max_batch_size < 1 or top_k < 1 or batch_timeout < 0:
        raise ValueError(f"workers={workers}, max_batch_size={max_batch_size} and top_k={top_k} must be positive, "
                         f"batch_timeout={batch_timeout} not negative")
    info = describe(runs)
    api = AdapterAPI(runs, info, top_k, score_threshold, max_batch_size=max_batch_size, batch_timeout=batch_timeout)
    accelerator = "cpu" if device == "cpu" else ("cuda" if device.startswith("cuda") else "auto")
    server = ls.LitServer(api, accelerator=accelerator, workers_per_device=workers, timeout=60,
                          model_metadata={"adapters": list(runs)})
    public = {n: {k: v for k, v in a.items() if not k.startswith("_")} for n, a in info.items()}
    server.app.add_api_route("/adapters", lambda: public, methods=["GET"])
    page = PAGE.read_text()
    server.app.router.routes[:] = [r for r in server.app.router.routes if getattr(r, "path", None) != "/"]
    server.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])  # in place of "litserve running"
    server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
