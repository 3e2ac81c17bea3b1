"""cytologia.paths: the checkout's root (None when installed) and the real-data folder that hangs off it."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

import pytest

import cytologia.paths
from cytologia.commands import bench_score
from cytologia.errors import CytologiaInputError
from cytologia.paths import REAL_DATA_ENV, project_root, real_data_dir

ROOT = Path(__file__).resolve().parents[1]


def _installed_copy(tmp_path: Path) -> ModuleType:
    """paths.py copied into a virtual environment's site-packages and imported from there. A pyproject.toml two
    folders above the package (where ``parents[2]`` used to look) must not be taken for a checkout."""
    lib = tmp_path / "venv" / "lib" / "python3.11"
    package = lib / "site-packages" / "cytologia"
    package.mkdir(parents=True)
    (lib / "pyproject.toml").write_text("[project]\nname = 'decoy'\n")
    shutil.copy(Path(cytologia.paths.__file__), package / "paths.py")
    spec = importlib.util.spec_from_file_location("installed_cytologia_paths", package / "paths.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_project_root_is_this_checkout() -> None:
    assert project_root() == ROOT
    assert (ROOT / "configs" / "cleaning" / "short_cpu.yaml").is_file()  # what the pipeline looks up there


def test_installed_package_has_no_project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = _installed_copy(tmp_path)
    assert installed.project_root() is None
    monkeypatch.delenv(REAL_DATA_ENV, raising=False)
    assert installed.real_data_dir() is None
    monkeypatch.setenv(REAL_DATA_ENV, str(tmp_path / "tables"))
    assert installed.real_data_dir() == tmp_path / "tables"


def test_a_src_layout_without_pyproject_is_not_a_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cytologia.paths, "_PACKAGE_DIR", tmp_path / "repo" / "src" / "cytologia")
    assert project_root() is None
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "pyproject.toml").write_text("")
    assert project_root() == tmp_path / "repo"


def test_real_data_dir_env_then_beside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REAL_DATA_ENV, str(tmp_path))
    assert real_data_dir() == tmp_path
    assert bench_score.default_truth() == tmp_path / "train.csv"
    monkeypatch.delenv(REAL_DATA_ENV)
    assert real_data_dir() == ROOT.parent / "shared" / "data" / "cytologia"
    assert bench_score.default_truth() == ROOT.parent / "shared" / "data" / "cytologia" / "train.csv"


def test_bench_score_default_truth_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REAL_DATA_ENV, raising=False)
    monkeypatch.setattr(cytologia.paths, "_PACKAGE_DIR", tmp_path / "site-packages" / "cytologia")
    with pytest.raises(CytologiaInputError, match="installed, not run from a source checkout; pass --truth or set"):
        bench_score.default_truth()
