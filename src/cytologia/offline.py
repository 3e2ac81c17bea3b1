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


# Threads that wait for work sleep instead of spinning (GNU OpenMP, read when torch loads it). Measured on a 2-core VM
# at load ~5 (resnet18, 64 px, batch 16, 40 SGD steps, 2 torch threads): the default spinning took 73-107 CPU-s and
# 109-206 s wall, passive waiting 11-12 CPU-s and 11-26 s wall. A spinning thread burns CPU while its partner is
# descheduled, so on a shared machine it slows training several-fold and makes process CPU time -- the single-stage
# baseline's budget (cytologia.clock) -- count the waiting. Export OMP_WAIT_POLICY=ACTIVE to spin anyway.
THREADING_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}


def yolo_config_dir() -> Path:
    """Folder ultralytics uses for its settings (and fonts); ours, so nothing in $HOME is touched."""
    base = os.environ.get("CYTOLOGIA_CACHE", str(Path.home() / ".cache" / "cytologia"))
    return Path(base) / "ultralytics"


def apply() -> None:
    """Set the offline and threading variables (without overriding values the user exported)."""
    for key, value in {**OFFLINE_ENV, **THREADING_ENV}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("YOLO_CONFIG_DIR", str(yolo_config_dir()))


apply()


# Font names ultralytics asks for (check_font): Arial.ttf for ASCII class names, Arial.Unicode.ttf otherwise. When
# neither is in its config dir it sends a HEAD request to its asset server on every train/val -- even with
# YOLO_OFFLINE=1 -- so a stand-in is placed there first.
YOLO_FONTS: tuple[str, ...] = ("Arial.ttf", "Arial.Unicode.ttf")


def install_yolo_fonts(directory: Path | None = None) -> list[Path]:
    """Place a stand-in font under each name in :data:`YOLO_FONTS` in ultralytics' config folder; returns the paths.

    ``directory`` is ultralytics' ``USER_CONFIG_DIR`` (``$YOLO_CONFIG_DIR/Ultralytics``, the default here). The font
    is matplotlib's bundled DejaVu Sans (a dependency already): only plot labels use it. Files already present are
    left alone; the copy goes through a temporary name so a concurrent reader never sees half a file.
    """
    import shutil

    import matplotlib

    if directory is None:
        directory = Path(os.environ.get("YOLO_CONFIG_DIR", str(yolo_config_dir()))).expanduser() / "Ultralytics"
    directory = Path(directory)
    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    placed = []
    for name in YOLO_FONTS:
        target = directory / name
        if not target.is_file():
            directory.mkdir(parents=True, exist_ok=True)
            tmp = directory / f".{name}.{os.getpid()}.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        placed.append(target)
    return placed


def tame_ultralytics() -> None:
    """Undo the one ultralytics import side effect that breaks offline use and our error handling.

    Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, on the first file Pillow cannot identify,
    tries to pip-install ``pi-heif`` (a network call) and then raises ModuleNotFoundError instead of
    ``UnidentifiedImageError`` -- so an unreadable image anywhere in the process, even in code that never touches
    ultralytics, would stop being reported as unreadable. Marking its HEIF plugin as already registered makes the
    wrapper call Pillow directly. Call this right after importing ultralytics.
    """
    import sys

    patches = sys.modules.get("ultralytics.utils.patches")
    if patches is not None and hasattr(patches, "_pil_plugins_registered"):
        patches._pil_plugins_registered = True
