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
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cytologia.data.errors import CytologiaInputError
from cytologia.detection.registry import DetectionData, Detector, TrainResult, TrainSettings
from cytologia.detection.yolox.checkpoint import init_from_weights, load_trained, read_checkpoint
from cytologia.detection.yolox.infer import detect_images
from cytologia.detection.yolox.model import SIZES, YOLOX, YoloxInference, build_yolox
from cytologia.detection.yolox.train import fit, parse_train_args
from cytologia.device import resolve_device

log = logging.getLogger(__name__)


class YoloxDetector(Detector):
    """YOLOX, one class (a leukocyte), written in this project. See the module docstring."""

    backend = "yolox"

    def __init__(self, model: str, weights: str | Path | None = None, checkpoint: str | Path | None = None) -> None:
        super().__init__(model, weights, checkpoint)
        self._net: YoloxInference | None = None
        self._net_device: torch.device | None = None

    @classmethod
    def models(cls) -> list[str]:
        return list(SIZES)

    @classmethod
    def checkpoint_model(cls, checkpoint: str | Path) -> str:
        """The size a trained checkpoint was built as (``yolox_s`` ...), read from the file."""
        return str(read_checkpoint(checkpoint)["model"])

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
    def network(self, device: str = "auto") -> YoloxInference:
        """The trained network for inference (fused, eval, fp32; channels-last on the CPU) on ``device``; loaded
        once."""
        if self.checkpoint is None:
            raise CytologiaInputError(f"{self.model}: no trained checkpoint to predict with (train first)")
        dev = resolve_device(device, key="detector.device")
        if self._net is None or self._net_device != dev:
            model, _ = load_trained(self.checkpoint)
            net = YoloxInference.from_model(model).to(dev)
            if dev.type == "cpu":  # oneDNN convolutions are faster on NHWC
                net = net.to(memory_format=torch.channels_last)
            self._net, self._net_device = net, dev
        return self._net

    def forward_fn(self, device: str = "auto") -> Callable[[np.ndarray], torch.Tensor]:
        """Network input (float32 numpy (B, 3, S, S), RGB [0, 1]) -> raw output (B, 5, anchors) on the CPU."""
        net = self.network(device)
        dev = self._net_device

        def forward(x: np.ndarray) -> torch.Tensor:
            with torch.inference_mode():
                return net(torch.from_numpy(x).to(dev)).float().cpu()

        return forward

    def predict(
        self,
        images: Sequence[str | Path],
        *,
        img_size: int,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 50,
        tta_flip: bool = False,
        batch_size: int = 16,
        device: str = "auto",
        names: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        return detect_images(
            self.forward_fn(device), images, names, img_size=img_size, conf=conf, iou=iou, max_det=max_det,
            tta_flip=tta_flip, batch_size=batch_size,
        )  # fmt: skip

    def export_onnx(self, path: str | Path, *, img_size: int, opset: int | None = None) -> Path:
        """ONNX with the decoding in the graph (:func:`cytologia.detection.yolox.export.export_onnx`): input ``images``
        (B, 3, S, S) RGB [0, 1], output ``output0`` (B, 5, anchors); batch and size dynamic."""
        from cytologia.detection.yolox.export import export_onnx

        if self.checkpoint is None:
            raise CytologiaInputError(f"{self.model}: no trained checkpoint to export (train first)")
        model, _ = load_trained(self.checkpoint)
        return export_onnx(YoloxInference.from_model(model), path, img_size, opset)
