"""YOLOX weight files: this project's trained checkpoints, and initial weights in the official release's layout.

A **trained checkpoint** (``detector.pt``) is a dict of plain values and tensors, read with
``torch.load(weights_only=True)`` (no arbitrary unpickling)::

    {"format": "cytologia-yolox", "version": 1, "detector_backend": "yolox", "model": "yolox_s", "num_classes": 1,
     "img_size": 512, "epoch": 12, "metrics": {...}, "train_args": {...}, "state_dict": {...}}

(``detector_backend``: the registry name, :data:`cytologia.detection.base.BACKEND_KEY`; absent in files written
before checkpoints recorded it, which are recognised by ``format``.)

Its ``state_dict`` uses the key names of the official release, so ``{"model": state_dict}`` is also a checkpoint the
official code loads.

**Initial weights** (``detector.weights``) may be:

- an official release file (``yolox_s.pth`` ...): a dict whose ``"model"`` entry is the state dict (other entries,
  e.g. ``"optimizer"``, ``"start_epoch"``, are ignored); key names such as ``backbone.backbone.stem.conv.conv.weight``,
  ``backbone.lateral_conv0.conv.weight``, ``head.cls_preds.0.weight`` map one to one onto
  :class:`cytologia.detection.yolox.model.YOLOX`;
- a trained checkpoint of this project (fine-tune further);
- a bare state dict.

Loading is strict (:func:`cytologia.weights.load_state_dict_checked`): every tensor must exist with the same shape,
except the class predictions ``head.cls_preds.*``, skipped when their shape differs (the 80 COCO classes of a release
file vs our 1 class) and then left at their initialisation.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cytologia.detection.base import BACKEND_KEY
from cytologia.detection.yolox.model import SIZES, YOLOX, build_yolox
from cytologia.errors import CytologiaInputError
from cytologia.weights import LoadReport, load_state_dict_checked

log = logging.getLogger(__name__)

FORMAT = "cytologia-yolox"
VERSION = 1
BACKEND = "yolox"  # this backend's registry name, recorded in its checkpoints
CLASS_HEAD = ("head.cls_preds.",)  # skipped by shape when loading initial weights


def _load(path: Path) -> Any:
    if not path.is_file():
        raise CytologiaInputError(f"{path}: YOLOX weight file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CytologiaInputError(
            f"{path}: holds Python objects besides tensors and plain values; refusing to unpickle it ({err})"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise CytologiaInputError(f"{path}: not a readable torch file ({err})") from None


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a trained YOLOX checkpoint of this project (reads the file)."""
    try:
        obj = _load(Path(path))
    except CytologiaInputError:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_checkpoint(
    path: str | Path,
    model: YOLOX,
    name: str,
    *,
    img_size: int,
    epoch: int,
    metrics: Mapping[str, float],
    train_args: Mapping[str, Any],
) -> Path:
    """Write ``model``'s weights as a trained checkpoint (atomically: temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        BACKEND_KEY: BACKEND,
        "model": name,
        "num_classes": model.num_classes,
        "img_size": int(img_size),
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "train_args": dict(train_args),
        "state_dict": state,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A trained checkpoint's content, checked: format, version, a known model name, a state dict."""
    path = Path(path)
    obj = _load(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        raise CytologiaInputError(
            f"{path}: not a trained YOLOX checkpoint of cytologia (found {found}); initial weights such as an official "
            "yolox_s.pth go in detector.weights"
        )
    if obj.get("version") != VERSION:
        raise CytologiaInputError(f"{path}: YOLOX checkpoint version {obj.get('version')!r}, this code reads {VERSION}")
    if obj.get("model") not in SIZES:
        raise CytologiaInputError(f"{path}: unknown YOLOX model {obj.get('model')!r}; sizes: {', '.join(SIZES)}")
    if not isinstance(obj.get("state_dict"), dict):
        raise CytologiaInputError(f"{path}: YOLOX checkpoint without a state_dict")
    return obj


def load_trained(path: str | Path) -> tuple[YOLOX, dict[str, Any]]:
    """The network of a trained checkpoint (eval mode, CPU) and the checkpoint's other entries."""
    info = read_checkpoint(path)
    model = build_yolox(info["model"], int(info.get("num_classes", 1)))
    load_state_dict_checked(model, info.pop("state_dict"), source=str(path))
    return model.eval(), info


def state_dict_of(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded weight file: official layout (``"model"``), ours (``"state_dict"``) or bare.
    A ``module.`` prefix on every key (a model saved from DataParallel) is removed."""
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj.get("state_dict")
    elif isinstance(obj, dict) and isinstance(obj.get("model"), Mapping):
        state = obj["model"]
    else:
        state = obj
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CytologiaInputError(
            f"{source}: no YOLOX state dict found (expected the official layout {{'model': state_dict}}, a cytologia "
            "checkpoint, or a bare state dict)"
        )
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def init_from_weights(model: YOLOX, path: str | Path) -> LoadReport:
    """Load initial weights into ``model`` strictly, skipping the class head when its shape differs (see the module
    docstring); returns what was loaded and skipped. ``path`` must already be verified
    (:func:`cytologia.weights.verified_path`)."""
    path = Path(path)
    state = state_dict_of(_load(path), str(path))
    report = load_state_dict_checked(model, state, skip_mismatched=CLASS_HEAD, source=str(path))
    if report.skipped:
        skipped = ", ".join(report.skipped)
        log.info("%s: %d tensors loaded, class head left at init (%s)", path, len(report.loaded), skipped)
    return report
