"""Shared fixtures: where the real annotation tables are, and skipping of GPU tests on CPU-only machines."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

# The real Cytologia tables (no images) live outside the repository: ../shared/data/cytologia/ next to the checkout,
# or wherever CYTOLOGIA_REAL_DATA points. CI (.ci/run, which tests a copy in a temporary folder) sets both
# CYTOLOGIA_REAL_DATA and CYTOLOGIA_CI=1: there a missing table fails the test instead of skipping it.
REAL_DATA = Path(os.environ.get("CYTOLOGIA_REAL_DATA", Path(__file__).resolve().parents[2] / "shared/data/cytologia"))
REAL_TABLES: tuple[str, ...] = ("train.csv", "test.csv")
# The winners' recipe tables (../shared/RECIPES.md), which tests/test_recipes.py checks the configs against: the same
# rule, with CYTOLOGIA_RECIPES (set by .ci/run from the checkout's parent).
RECIPES_FILE = Path(os.environ.get("CYTOLOGIA_RECIPES", Path(__file__).resolve().parents[2] / "shared/RECIPES.md"))


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """True when CYTOLOGIA_CI is set to anything but empty, 0, false or no."""
    return environ.get("CYTOLOGIA_CI", "").strip().lower() not in ("", "0", "false", "no")


def require_real_data(folder: Path, ci: bool) -> Path:
    """``folder`` when it holds every real table; otherwise skip the test (with the reason) or, in CI, fail it
    naming the missing path and the variable to set."""
    missing = [folder / name for name in REAL_TABLES if not (folder / name).is_file()]
    if not missing:
        return folder
    reason = f"real Cytologia table(s) not found: {', '.join(map(str, missing))} (set CYTOLOGIA_REAL_DATA)"
    if ci:
        pytest.fail(f"{reason}; CYTOLOGIA_CI is set, so a missing real table is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


def require_file(path: Path, variable: str, ci: bool) -> Path:
    """``path`` when it is a file; otherwise skip the test or, in CI, fail it naming the path and the variable."""
    if path.is_file():
        return path
    reason = f"{path} not found (set {variable})"
    if ci:
        pytest.fail(f"{reason}; CYTOLOGIA_CI is set, so a missing shared file is a failure, not a skip", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """Folder holding the real train.csv/test.csv; the test is skipped (with the reason) when it is absent, and
    fails instead under CYTOLOGIA_CI=1."""
    return require_real_data(REAL_DATA, in_ci())


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
