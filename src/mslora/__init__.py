"""mslora: adapt frozen timm vision backbones with MSLoRA and its peer parameter-efficient methods.

    import timm, mslora
    model = timm.create_model("resnet50", num_classes=10)
    mslora.adapt(model, "mslora", rank=128, groups=4)   # in place, returns the model
    mslora.count_parameters(model)

Importing the package registers the built-in methods (:mod:`mslora.methods`) and tasks (:mod:`mslora.tasks`).
"""
from mslora import methods, tasks  # noqa: F401  (the plug-ins register themselves in mslora.registry)
from mslora.core.adapt import adapt, load_adapter, merge, save_backbone, unadapt
from mslora.core.named import mixed_batch, named_adapters, set_adapter
from mslora.core.peft_format import export_peft, import_peft
from mslora.core.state import VERSION as __version__
from mslora.core.state import adaptation, count_parameters, read_adapter, save_adapter
from mslora.inference import Run, load_run, load_runs, predict
from mslora.registry import list_methods, list_tasks

__all__ = ["__version__", "adapt", "merge", "unadapt", "count_parameters", "save_adapter", "load_adapter",
           "read_adapter", "save_backbone", "adaptation", "list_methods", "list_tasks", "export_peft", "import_peft",
           "load_run", "load_runs", "predict", "Run", "set_adapter", "named_adapters", "mixed_batch"]
