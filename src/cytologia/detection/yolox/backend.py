"""YOLOX as a detector backend (registry name ``yolox``): train, predict, export -- no ultralytics involved.

Architectures: ``yolox_nano``, ``yolox_tiny``, ``yolox_s``, ``yolox_m``, ``yolox_l``, ``yolox_x``
(:data:`cytologia.detection.yolox.model.SIZES`). ``detector.weights`` may name an official release file
(``yolox_s.pth``) or a checkpoint of this backend: loaded strictly, the class head skipped by shape
(:mod:`cytologia.detection.yolox.checkpoint`). ``detector.train_args`` holds the YOLOX options
(:class:`cytologia.detection.yolox.train.YoloxTrainArgs` and the augmentation keys of
:class:`cytologia.detection.yolox.augment.AugmentConfig`); an unknown key is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cytologia.detection.base import CheckpointHeader, Detector
from cytologia.detection.registry import DetectionData, TrainResult, TrainSettings
from cytologia.detection.yolox.checkpoint import FORMAT, init_from_weights, load_trained, read_checkpoint
from cytologia.detection.yolox.infer import nms_boxes
from cytologia.detection.yolox.model import SIZES, YOLOX, YoloxInference, build_yolox
from cytologia.detection.yolox.train import fit, parse_train_args
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)


class YoloxDetector(Detector):
    """YOLOX, one class (a leukocyte), written in this project. See the module docstring."""

    @classmethod
    def models(cls) -> list[str]:
        return list(SIZES)

    @classmethod
    def checkpoint_model(cls, checkpoint: str | Path) -> str:
        """The size a trained checkpoint was built as (``yolox_s`` ...), read from the file."""
        return str(read_checkpoint(checkpoint)["model"])

    @classmethod
    def recognizes(cls, header: CheckpointHeader) -> bool:
        """A trained checkpoint of this backend written before checkpoints recorded their backend: its ``format``."""
        return header.get("format") == FORMAT

    @classmethod
    def save_random(cls, model: str, path: str | Path, *, img_size: int, seed: int = 0) -> Path:
        """A ``model`` with random weights (torch seeded with ``seed``) as a trained checkpoint of epoch 0."""
        from cytologia.detection.yolox.checkpoint import save_checkpoint

        if model not in SIZES:
            raise CytologiaInputError(f"unknown yolox detector model {model!r}; sizes: {', '.join(SIZES)}")
        torch.manual_seed(seed)
        return save_checkpoint(path, build_yolox(model), model, img_size=img_size, epoch=0, metrics={}, train_args={})

    def build(self) -> YOLOX:
        """A fresh network of this size, initialised from ``weights`` when given: a path is checked against the
        manifest of its own folder, a bare name is looked up in ``models/`` (:func:`cytologia.weights.verified_path`).
        """
        net = build_yolox(self.model)
        if self.weights is not None:
            from cytologia.weights import verified_path

            given = Path(self.weights)
            path = verified_path(given, given.parent if given.is_file() else None)
            report = init_from_weights(net, path)
            log.info("initialised %s from %s: %s", self.model, path, report.describe())
        return net

    def train(self, data: DetectionData, out_dir: Path, settings: TrainSettings) -> TrainResult:
        """Train on the folds but ``data.fold``; ``out_dir/detector.pt`` is the epoch with the best known-count box term
        on the held-out fold (:func:`cytologia.detection.yolox.train.fit`)."""
        args = parse_train_args(settings.extra)
        result = fit(self.build(), self.model, data, Path(out_dir), settings, args)
        self.checkpoint, self._net = result.weights, None
        return result

    # -- inference
    def load_network(self, device: torch.device) -> YoloxInference:
        """The trained network for inference (fused, eval, fp32; channels-last on the CPU) on ``device``."""
        model, _ = load_trained(self.checkpoint)
        net = YoloxInference.from_model(model).to(device)
        if device.type == "cpu":  # oneDNN convolutions are faster on NHWC
            net = net.to(memory_format=torch.channels_last)
        return net

    @classmethod
    def decode(cls, raw: Any, *, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
        """Score threshold, the best candidates, torchvision's class-agnostic NMS (:func:`~.infer.nms_boxes`)."""
        return [d.cpu().numpy().astype(np.float64) for d in nms_boxes(raw, conf=conf, iou=iou, max_det=max_det)]

    def write_onnx(self, path: Path, *, img_size: int, opset: int | None) -> Path:
        """ONNX with the decoding in the graph (:func:`cytologia.detection.yolox.export.export_onnx`): input ``images``
        (B, 3, S, S) RGB [0, 1], output ``output0`` (B, 5, anchors); batch and size dynamic."""
        from cytologia.detection.yolox.export import export_onnx

        model, _ = load_trained(self.checkpoint)
        return export_onnx(YoloxInference.from_model(model), path, img_size, opset)
