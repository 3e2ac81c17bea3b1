"""Single-class leukocyte detection: one :class:`Detector` interface (:mod:`~cytologia.detection.base`), backends by
name (registry), training stage, out-of-fold boxes, ONNX export.

``from cytologia.detection import create_detector, list_detectors`` does not import torch or ultralytics; a backend's
module is imported when a detector of it is created.
"""

from cytologia.detection.registry import (
    CLASS_NAME,
    DetectionData,
    Detector,
    TrainResult,
    TrainSettings,
    checkpoint_backend,
    create_detector,
    get_backend,
    list_detectors,
    load_detector,
    register_backend,
)

__all__ = [
    "CLASS_NAME",
    "DetectionData",
    "Detector",
    "TrainResult",
    "TrainSettings",
    "checkpoint_backend",
    "create_detector",
    "get_backend",
    "list_detectors",
    "load_detector",
    "register_backend",
]
