"""Data for every task: one reader per format (:mod:`~mslora.data.formats`, :mod:`~mslora.data.coco`,
:mod:`~mslora.data.dense`), image files (:mod:`~mslora.data.images`), transforms (:mod:`~mslora.data.transforms`),
the splits of classification data (:mod:`~mslora.data.classify`) and the offline scene set
(:mod:`~mslora.data.scenes`)."""
from mslora.data.classify import SPLITS, ClassificationData, load_classification
from mslora.data.dense import DenseData, load_dense
from mslora.data.images import load_rgb
from mslora.data.transforms import Subset, build_transforms

__all__ = ["SPLITS", "ClassificationData", "DenseData", "Subset", "build_transforms", "load_classification",
           "load_dense", "load_rgb"]
