"""Offline-first environment, set before timm / ultralytics / albumentations are imported.

Measured on an air-gapped machine: timm ``pretrained=True`` hangs ~50 s unless ``HF_HUB_OFFLINE=1``; ultralytics
tries to fetch Arial.ttf on every train/val unless ``YOLO_OFFLINE=1`` and its config dir holds a font; ``import
albumentations`` asks PyPI for a newer version unless ``NO_ALBUMENTATIONS_UPDATE=1``. Users never set these
themselves: importing :mod:`cytologia` does it. Values a user already exported are respected.
"""

from __future__ import annotations

import os
from pathlib import Path

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "YOLO_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}


def yolo_config_dir() -> Path:
    """Folder ultralytics uses for its settings (and fonts); ours, so nothing in $HOME is touched."""
    base = os.environ.get("CYTOLOGIA_CACHE", str(Path.home() / ".cache" / "cytologia"))
    return Path(base) / "ultralytics"


def apply() -> None:
    """Set the offline variables (without overriding values the user exported)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(yolo_config_dir()))


apply()
