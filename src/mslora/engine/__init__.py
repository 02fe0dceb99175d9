"""The training engine: configuration (:mod:`~mslora.engine.config`), the loop on Accelerate
(:mod:`~mslora.engine.loop`), checkpoints (:mod:`~mslora.engine.checkpoint`), the sampler
(:mod:`~mslora.engine.sampler`) and the way back from an adapter file to its model (:mod:`~mslora.engine.rebuild`)."""
from mslora.engine.config import TrainConfig, main_job
from mslora.engine.loop import TrainingDiverged, evaluate_adapter, resume, train
from mslora.engine.rebuild import rebuild

__all__ = ["TrainConfig", "main_job", "train", "resume", "evaluate_adapter", "rebuild", "TrainingDiverged"]
