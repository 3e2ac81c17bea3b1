"""Detector backends behind one interface, created by name (timm's habit: ``create_detector``, ``list_detectors``).

A backend is a class implementing :class:`Detector`, registered under a name with :func:`register_backend` (or listed
in :data:`BACKENDS` as ``"module:Class"``, imported only when used, so listing backends does not import torch). Each
backend names its architectures (``models()``); a miss names what exists, with the closest names first.

Every detector here is **single-class** (a leukocyte box); classes are the classifiers' job.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.errors import CytologiaInputError

CLASS_NAME = "leukocyte"  # the one class every detector is trained on
# Columns of :meth:`Detector.predict`: the boxes of one pass; ``tta`` is "none" or the flip that made it ("hflip").
PREDICT_COLUMNS: tuple[str, ...] = ("NAME", "x1", "y1", "x2", "y2", "score", "tta")


@dataclass
class DetectionData:
    """What a detector trains on: the annotations (``NAME,x1,y1,x2,y2`` + ``img_w,img_h`` when known, one row per
    box), the folds (``NAME,fold``; an image without boxes is a negative), the image folder, and the held-out fold.

    ``repaired_dir``: folder of repaired copies of damaged JPEGs (:func:`cytologia.data.images.resolve_image`); a copy
    there is used instead of the original. ``cache_dir``: where the backend may write its dataset layout.
    """

    table: pd.DataFrame
    folds: pd.DataFrame
    image_dir: Path
    fold: int
    cache_dir: Path
    repaired_dir: Path | None = None


@dataclass
class TrainSettings:
    """Backend-neutral training settings (``configs/detector/*.yaml`` maps onto these)."""

    epochs: int = 30
    img_size: int = 512
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "AdamW"
    patience: int = 0  # 0: never stop early
    device: str = "auto"
    workers: int = 4
    amp: bool = True
    seed: int = 42
    nms_iou: float = 0.6
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific arguments, passed through


@dataclass
class TrainResult:
    """What a training run left: the selected weights, the metrics of the epoch that produced them, per-epoch
    history, and how the checkpoint was selected."""

    weights: Path
    best_epoch: int  # 1-based
    metrics: dict[str, float]
    history: list[dict[str, float]]
    selection: str  # how ``weights`` was chosen, in words
    seconds: float  # the whole call: dataset, every epoch with its validation, final evaluation
    epoch_seconds: list[float]  # the training pass of each epoch (no validation)
    n_train_images: int
    n_val_images: int


class Detector(ABC):
    """A single-class box detector. Construct through :func:`create_detector`."""

    backend: str = ""  # registry name

    def __init__(self, model: str, weights: str | Path | None = None, checkpoint: str | Path | None = None) -> None:
        self.model = model
        self.weights = weights
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None

    @classmethod
    @abstractmethod
    def models(cls) -> list[str]:
        """Architecture names this backend builds."""

    @classmethod
    @abstractmethod
    def checkpoint_model(cls, checkpoint: str | Path) -> str:
        """The architecture name a trained checkpoint of this backend was built as."""

    @abstractmethod
    def train(self, data: DetectionData, out_dir: Path, settings: TrainSettings) -> TrainResult:
        """Train on every fold but ``data.fold``, select a checkpoint on the held-out fold; weights go under
        ``out_dir``. Afterwards the detector predicts with the selected weights."""

    @abstractmethod
    def forward_fn(self, device: str = "auto") -> Callable[[np.ndarray], Any]:
        """The trained network as a function: preprocessed input batch (float32 numpy) -> raw output (what the ONNX
        graph computes); parity checks and benchmarks run it."""

    @abstractmethod
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
        """Boxes (:data:`PREDICT_COLUMNS`) of each image in its own pixel frame; ``tta_flip`` adds a pass on the
        mirrored image (rows with ``tta == "hflip"``, boxes mapped back). ``names`` default to the file names."""

    @abstractmethod
    def export_onnx(self, path: str | Path, *, img_size: int, opset: int | None = None) -> Path:
        """Write the trained network to ONNX at ``path`` (raw outputs; NMS stays outside the graph)."""


# name -> "module:Class" (imported on first use) or the class itself once registered/imported
BACKENDS: dict[str, str | type[Detector]] = {
    "ultralytics": "cytologia.detection.ultralytics_backend:UltralyticsDetector",
    "yolox": "cytologia.detection.yolox.backend:YoloxDetector",
}
# backend -> (third-party package it needs, pip extra that installs it, that package's licence): a backend whose
# package is absent says how to install it instead of failing with a bare ModuleNotFoundError
OPTIONAL_PACKAGES: dict[str, tuple[str, str, str]] = {"ultralytics": ("ultralytics", "ultralytics", "AGPL-3.0")}


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # blocked by an import hook, or sys.modules[package] is None
        return False


def backend_available(backend: str) -> bool:
    """Whether ``backend``'s optional third-party package (if any) is installed."""
    need = OPTIONAL_PACKAGES.get(backend)
    return need is None or _installed(need[0])


def require_optional(backend: str) -> None:
    """Raise a :class:`CytologiaInputError` naming the pip extra when ``backend``'s optional package is missing."""
    need = OPTIONAL_PACKAGES.get(backend)
    if need is None or _installed(need[0]):
        return
    package, extra, licence = need
    raise CytologiaInputError(
        f"detector backend {backend!r} needs the {package!r} package ({licence}), which is not installed: "
        f"pip install 'cytologia[{extra}]' -- or use the Apache-2.0 backend: detector=yolox_s"
    )


def register_backend(name: str):  # noqa: ANN201  (a decorator)
    """Class decorator: make a :class:`Detector` subclass available to :func:`create_detector` as ``name``."""

    def deco(cls: type[Detector]) -> type[Detector]:
        cls.backend = name
        BACKENDS[name] = cls
        return cls

    return deco


def _closest(name: str, options: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    return (f" (closest: {', '.join(near)})" if near else "") + f"; available: {', '.join(options)}"


def get_backend(name: str) -> type[Detector]:
    """The class of a backend; a miss names the registered backends."""
    entry = BACKENDS.get(name)
    if entry is None:
        raise CytologiaInputError(f"unknown detector backend {name!r}{_closest(name, sorted(BACKENDS))}")
    if isinstance(entry, str):
        require_optional(name)
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
        entry.backend = name
        BACKENDS[name] = entry
    return entry


def list_detectors(backend: str | None = None) -> list[str]:
    """``backend/model`` names that :func:`create_detector` builds (of one backend when given; without one, of the
    backends whose optional package is installed)."""
    names = [backend] if backend is not None else [b for b in sorted(BACKENDS) if backend_available(b)]
    return [f"{b}/{m}" for b in names for m in get_backend(b).models()]


def create_detector(
    backend: str, model: str, *, weights: str | Path | None = None, checkpoint: str | Path | None = None
) -> Detector:
    """A detector of ``backend`` with architecture ``model``.

    ``weights``: initial weights for training (a file in ``models/``, checked against its manifest); None = random
    init. ``checkpoint``: a detector this project trained (its own run folder), to predict or export with.
    """
    cls = get_backend(backend)
    known = cls.models()
    if model not in known:
        raise CytologiaInputError(f"unknown {backend} detector model {model!r}{_closest(model, known)}")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise CytologiaInputError(f"{checkpoint}: detector checkpoint not found")
    return cls(model, weights=weights, checkpoint=checkpoint)


def load_detector(checkpoint: str | Path, backend: str = "ultralytics") -> Detector:
    """A trained detector from its checkpoint; the architecture is read from the file.

    A checkpoint is a pickle: load only files this project (or someone you trust) wrote.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: detector checkpoint not found")
    cls = get_backend(backend)
    return cls(cls.checkpoint_model(path), checkpoint=path)
