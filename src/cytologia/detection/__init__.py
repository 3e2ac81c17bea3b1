"""Single-class leukocyte detection: backends (registry), training stage, out-of-fold boxes, ONNX export.

``from cytologia.detection import create_detector, list_detectors`` does not import torch or ultralytics; a backend's
module is imported when a detector of it is created.
"""

from cytologia.detection.registry import (
    CLASS_NAME,
    DetectionData,
    Detector,
    TrainResult,
    TrainSettings,
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
    "create_detector",
    "get_backend",
    "list_detectors",
    "load_detector",
    "register_backend",
]
