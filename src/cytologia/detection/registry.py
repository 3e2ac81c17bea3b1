"""Detector backends behind one interface, created by name (timm's habit: ``create_detector``, ``list_detectors``).

A backend is a class implementing :class:`~cytologia.detection.base.Detector`, registered under a name with
:func:`register_backend` (or listed in :data:`BACKENDS` as ``"module:Class"``, imported only when used, so listing
backends does not import torch). Each backend names its architectures (``models()``); a miss names what exists, with
the closest names first. Adding a backend: its module, one line in :data:`BACKENDS`, its ``configs/detector/*.yaml``.

A checkpoint records the backend that wrote it (:data:`~cytologia.detection.base.BACKEND_KEY`), so
:func:`load_detector` needs only the file; one written before checkpoints did is recognised by its format.

Every detector here is **single-class** (a leukocyte box); classes are the classifiers' job.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cytologia.detection.base import BACKEND_KEY, PREDICT_COLUMNS, Detector, read_header, recorded_backend
from cytologia.errors import CytologiaInputError

__all__ = [  # Detector and PREDICT_COLUMNS live in cytologia.detection.base; imported from here too
    "BACKENDS",
    "CLASS_NAME",
    "PREDICT_COLUMNS",
    "DetectionData",
    "Detector",
    "TrainResult",
    "TrainSettings",
    "agreed_backend",
    "backend_available",
    "backend_of_model",
    "checkpoint_backend",
    "create_detector",
    "get_backend",
    "list_detectors",
    "load_detector",
    "register_backend",
    "require_optional",
]

log = logging.getLogger(__name__)

CLASS_NAME = "leukocyte"  # the one class every detector is trained on


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

    def image_sizes(self, names: Sequence[str]) -> pd.DataFrame:
        """``NAME -> img_w, img_h`` for ``names`` (in that order): from the table where known, else from the image
        headers (the repaired copy where there is one); an unreadable image is an error naming it."""
        from cytologia.data.images import image_sizes, resolve_image

        known = pd.DataFrame(columns=["img_w", "img_h"], dtype="int64")
        if {"img_w", "img_h"} <= set(self.table.columns):
            known = self.table.drop_duplicates("NAME").set_index("NAME")[["img_w", "img_h"]].astype("int64")
            known = known.loc[(known["img_w"] > 0) & (known["img_h"] > 0)]
        todo = [n for n in names if n not in known.index]
        if todo:
            paths = [resolve_image(Path(self.image_dir) / n, self.repaired_dir, n) for n in todo]
            found, errors = image_sizes(paths)
            bad = [f"{n}: {e}" for n, e in zip(todo, errors) if e is not None]
            if bad:
                raise CytologiaInputError(f"{len(bad)} image(s) cannot be read: " + "; ".join(bad[:10]))
            extra = pd.DataFrame(found, index=pd.Index(todo, name="NAME"), columns=["img_w", "img_h"])
            known = pd.concat([known, extra])
        return known.reindex(list(names))


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
        raise _unknown_backend(name)
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


def _unknown_backend(name: str) -> CytologiaInputError:
    return CytologiaInputError(f"unknown detector backend {name!r}{_closest(name, sorted(BACKENDS))}")


def checkpoint_backend(checkpoint: str | Path) -> str:
    """The backend that wrote ``checkpoint``: the one it records, else the one whose format it matches (a file
    written before checkpoints recorded it). Neither: an error naming the file. The file's code is not run."""
    header = read_header(checkpoint)
    name = recorded_backend(header)
    if name is not None:
        if name not in BACKENDS:
            raise CytologiaInputError(
                f"{header.path}: written by detector backend {name!r}, which is not registered"
                f"{_closest(name, sorted(BACKENDS))}"
            )
        return name
    for name in sorted(BACKENDS):
        need = OPTIONAL_PACKAGES.get(name)
        if not backend_available(name):
            if need is not None and header.refers_to(need[0]):
                require_optional(name)  # the file is of a backend whose package is absent: say how to install it
            continue
        if get_backend(name).recognizes(header):
            return name
    raise CytologiaInputError(
        f"{header.path}: does not record its detector backend ({BACKEND_KEY!r}) and its format is none of "
        f"{', '.join(sorted(BACKENDS))}"
    )


def load_detector(checkpoint: str | Path) -> Detector:
    """A trained detector from its checkpoint; the backend (:func:`checkpoint_backend`) and the architecture are
    read from the file.

    A checkpoint is a pickle: load only files this project (or someone you trust) wrote.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: detector checkpoint not found")
    cls = get_backend(checkpoint_backend(path))
    return cls(cls.checkpoint_model(path), checkpoint=path)


def backend_of_model(model: str) -> str:
    """The backend that builds architecture ``model`` (``yolo11n``, ``yolox_nano`` ...), among the installed ones;
    a miss names the architectures there are, and the backends that are not installed."""
    found = [b for b in sorted(BACKENDS) if backend_available(b) and model in get_backend(b).models()]
    if len(found) == 1:
        return found[0]
    if found:
        raise CytologiaInputError(f"detector model {model!r} is built by several backends: {', '.join(found)}")
    missing = [b for b in sorted(BACKENDS) if not backend_available(b)]
    known = [m for b in sorted(BACKENDS) if backend_available(b) for m in get_backend(b).models()]
    hint = f" (not installed: {', '.join(missing)})" if missing else ""
    raise CytologiaInputError(f"no detector backend builds {model!r}{_closest(model, known)}{hint}")


def agreed_backend(named: str, recorded: Mapping[str, str | None]) -> type[Detector]:
    """The backend class of a set of detector files: :func:`agreed_backend_name`'s backend."""
    return get_backend(agreed_backend_name(named, recorded))


def agreed_backend_name(named: str, recorded: Mapping[str, str | None]) -> str:
    """The backend of a set of detector files, as the files record it (``recorded``: file -> its backend, None for a
    file that records none, e.g. a graph exported before graphs did). ``named`` (what a config or ensemble file
    says) must be a registered backend; it is used only when no file records one, and a file that records another
    wins, with a warning. Files recording different backends are an error naming them. The backend's module is not
    imported (ONNX Runtime prediction needs only its name)."""
    if named not in BACKENDS:
        raise _unknown_backend(named)
    names = {b for b in recorded.values() if b is not None}
    if len(names) > 1:
        shown = ", ".join(f"{f}: {b}" for f, b in recorded.items())
        raise CytologiaInputError(f"detector files of different backends cannot be combined ({shown})")
    if not names:
        return named
    (name,) = names
    if name != named:
        files = ", ".join(str(f) for f, b in recorded.items() if b == name)
        log.warning("detector backend %r named, but %s record(s) %r: using %r", named, files, name, name)
    if name not in BACKENDS:
        raise _unknown_backend(name)
    return name
