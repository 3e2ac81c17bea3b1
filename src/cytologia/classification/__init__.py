"""Classifier stage: cell crops, augmentation, backbones (timm, DinoBloom), losses and ONNX export.

Submodules are imported on use (``from cytologia.classification.models import create_classifier``) so that a
detector run does not pay for timm or albumentations.
"""
