"""Shared fixtures: where the real annotation tables are, and skipping of GPU tests on CPU-only machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real Cytologia tables (no images) live outside the repository: ../shared/data/cytologia/ next to the checkout,
# or wherever CYTOLOGIA_REAL_DATA points.
REAL_DATA = Path(os.environ.get("CYTOLOGIA_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/cytologia"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder holding the real train.csv/test.csv; the test is skipped (with the reason) when it is absent."""
    if not (REAL_DATA / "train.csv").is_file():
        pytest.skip(f"real Cytologia tables not found at {REAL_DATA} (set CYTOLOGIA_REAL_DATA)")
    return REAL_DATA


def _ultralytics_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("ultralytics") is not None
    except (ImportError, ValueError):  # blocked by an import hook
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``ultralytics`` are skipped with a reason when the ultralytics extra is absent (an Apache-only
    install); tests marked ``gpu`` when CUDA is not available (even when selected with -m gpu)."""
    ul_items = [i for i in items if i.get_closest_marker("ultralytics")]
    if ul_items and not _ultralytics_installed():
        skip_ul = pytest.mark.skip(reason="needs the ultralytics extra: pip install 'cytologia[ultralytics]'")
        for item in ul_items:
            item.add_marker(skip_ul)
    gpu_items = [i for i in items if i.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in gpu_items:
        item.add_marker(skip)
