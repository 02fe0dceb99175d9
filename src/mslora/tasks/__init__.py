"""Tasks: what the engine trains a model for (:class:`mslora.tasks.base.Task`). Importing this package registers
the built-in ones (classify, detect, segment) in :mod:`mslora.registry`."""
from mslora.registry import get_task, list_tasks, register_task
from mslora.tasks import classify, detect, segment  # noqa: F401  (the plug-ins register themselves)
from mslora.tasks.base import DenseTask, Task

__all__ = ["Task", "DenseTask", "get_task", "list_tasks", "register_task"]
