"""The one way back from a training run's adapter file to its task and model (``mslora eval``, ``mslora merge``,
``mslora visualize``): the file's metadata holds the run's training config and class names, so the model is
rebuilt without the training data (the data is loaded only to evaluate on it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.utils import set_seed
from torch import nn

from mslora.core.state import read_adapter
from mslora.engine.config import TrainConfig
from mslora.registry import get_task


def adapter_file(adapter: str | Path) -> Path:
    """A run directory's ``adapter.safetensors``, or ``adapter`` itself when it names a file."""
    path = Path(adapter)
    return path / "adapter.safetensors" if path.is_dir() else path


def run_config(adapter: str | Path, **overrides: Any) -> tuple[Path, dict[str, Any], TrainConfig]:
    """(adapter file, its metadata, the run's TrainConfig with ``overrides``) of a training run's adapter.

    Raises:
        FileNotFoundError: no adapter file.
        ValueError: not an adapter file, or one saved by ``mslora.save_adapter`` (no training config), or a config
            this version does not read.
    """
    path = adapter_file(adapter)
    _, meta = read_adapter(path)
    if "train_config" not in meta:
        raise ValueError(f"'{path}' holds no training config (saved by mslora.save_adapter, not by a training run); "
                         "load it with mslora.load_adapter instead")
    cfg = TrainConfig.from_dict({**meta["train_config"], **overrides}, f"adapter file '{path}'")
    return path, meta, cfg


def rebuild(adapter: str | Path, data: str | None = None, load_data: bool = False, **overrides: Any
            ) -> tuple[Any, nn.Module, dict[str, Any]]:
    """(task, trained model, adapter metadata) of a training run: the task built from the run's config (with
    ``overrides``), and its model rebuilt from the adapter file, with the backbone's weights as in training (a
    random-init backbone is re-drawn with the run's seed). With ``load_data`` (or ``data``) the task also loads its
    data, ``data`` or the run's own, for evaluation.

    Raises:
        FileNotFoundError / ValueError: see :func:`run_config`; data whose class count or class names (where both
            have names, not numbers) differ from the run's.
    """
    path, meta, cfg = run_config(adapter, **overrides)
    if load_data or data is not None:
        task = get_task(cfg.task)(cfg, data=data)
        if "num_classes" in meta and task.num_classes != meta["num_classes"]:
            raise ValueError(f"data '{data or cfg.data}' has {task.num_classes} classes, the adapter was trained "
                             f"on {meta['num_classes']}")
        named = [c for c in (task.classes, meta.get("classes")) if c and not all(str(x).isdigit() for x in c)]
        if len(named) == 2 and list(named[0]) != list(named[1]):  # class i of the data must be class i of the run
            diff = next(i for i, (a, b) in enumerate(zip(*named)) if a != b)
            raise ValueError(f"data '{data or cfg.data}' has other classes than the adapter was trained on: class "
                             f"{diff} is '{named[0][diff]}' there, '{named[1][diff]}' in the run")
    else:
        task = get_task(cfg.task)(cfg, classes=meta["classes"])
    set_seed(cfg.seed)  # a random-init backbone (--no-pretrained) is rebuilt exactly as in training
    return task, task.build_model(adapter=path), meta
