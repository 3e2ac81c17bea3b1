"""The portable inference bundle (``cytologia export ensemble``): a folder that moves, predicts with the inference
dependencies only (torch, Lightning, timm and ultralytics made unimportable in a fresh interpreter), and writes the
same submission as the run folder it came from, byte for byte. Checkpoints are exported to ONNX once, not per call."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cytologia.cli import main
from cytologia.ensemble import read_ensemble, write_ensemble
from cytologia.ensemble.bundle import CHECKSUMS_FILE, CLASSES_FILE, ENSEMBLE_FILE, is_bundle
from cytologia.errors import CytologiaInputError
from cytologia.runtime.inference import ONNX_CACHE_SUFFIX

# The top-level modules of the `train` extra (pyproject.toml) and of ultralytics: none may be needed to predict.
BLOCKED = (
    "torch",
    "torchvision",
    "lightning",
    "pytorch_lightning",
    "lightning_fabric",
    "timm",
    "ultralytics",
    "scipy",
    "sklearn",
    "iterstrat",
    "hydra",
    "omegaconf",
    "albumentations",
    "matplotlib",
)
# A fresh interpreter in which the training frameworks cannot be imported (a meta-path finder refuses them), running
# `cytologia predict`; it fails if any of them was asked for, and says which.
NO_TORCH = f"""
import sys
BLOCKED = {BLOCKED!r}
asked = []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            asked.append(name)
            raise ImportError(f"{{name}} is blocked: the inference bundle must not need it")
        return None
sys.meta_path.insert(0, Block())
from cytologia.cli import main
code = main(sys.argv[1:])
assert not asked, asked
assert not [m for m in sys.modules if m.split(".")[0] in BLOCKED]
sys.exit(code)
"""


@pytest.fixture(scope="module")
def run_folder(yolox_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder's ensemble file as `cytologia tune` writes it: checkpoints only, no ONNX file."""
    run = tmp_path_factory.mktemp("run")
    for p in yolox_tiny.models.iterdir():
        if p.suffix in (".pt", ".ckpt"):
            shutil.copy(p, run / p.name)
    ens = yolox_tiny.ensemble()
    assert ens.detector is not None
    members = [
        dataclasses.replace(m, onnx=[], checkpoints=[str(run / Path(c).name) for c in m.checkpoints])
        for m in ens.members
    ]
    det = dataclasses.replace(ens.detector, onnx=[], checkpoints=[str(run / Path(ens.detector.checkpoints[0]).name)])
    return write_ensemble(dataclasses.replace(ens, members=members, detector=det), run / "ensemble.json")


def _predict(data: Path, ensemble: Path, out: Path) -> list[str]:
    return ["predict", "--data", str(data), "--ensemble", str(ensemble), "--out", str(out), "--device", "cpu"]


def test_checkpoints_are_exported_once(yolox_tiny, run_folder: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="cytologia.runtime.inference")
    assert main(_predict(yolox_tiny.data, run_folder, tmp_path / "a.csv")) == 0
    cached = sorted(run_folder.parent.glob(f"*{ONNX_CACHE_SUFFIX}"))
    assert len(cached) == 2  # the detector and the classifier, next to their checkpoints
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    caplog.clear()
    assert main(_predict(yolox_tiny.data, run_folder, tmp_path / "b.csv")) == 0
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # the second call exported nothing
    assert sum("using its ONNX export" in r.getMessage() for r in caplog.records) == 2
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    # a checkpoint written again is exported again
    ckpt = next(p for p in run_folder.parent.iterdir() if p.suffix == ".ckpt")
    later = max(stamps.values()) + 10**9
    os.utime(ckpt, ns=(later, later))
    assert main(_predict(yolox_tiny.data, run_folder, tmp_path / "c.csv")) == 0
    assert sum(p.stat().st_mtime_ns != stamps[p] for p in cached) == 1


def test_bundle_moves_and_predicts_without_torch(yolox_tiny, run_folder: Path, tmp_path: Path, capsys) -> None:
    reference = tmp_path / "from_run_folder.csv"
    assert main(_predict(yolox_tiny.data, run_folder, reference)) == 0
    built = tmp_path / "built" / "bundle"
    assert main(["export", "ensemble", "--ensemble", str(run_folder), "--out", str(built)]) == 0
    assert "2 ONNX file(s)" in capsys.readouterr().out
    moved = tmp_path / "elsewhere" / "bundle"
    moved.parent.mkdir()
    shutil.move(built, moved)  # a bundle is one folder: it moves as a whole
    assert is_bundle(moved) and {p.name for p in moved.iterdir()} == {
        ENSEMBLE_FILE,
        CLASSES_FILE,
        CHECKSUMS_FILE,
        "models",
    }
    assert all(not Path(p).is_absolute() for p in read_ensemble(moved).detector.onnx)  # type: ignore[union-attr]
    text = (moved / ENSEMBLE_FILE).read_text()
    assert str(tmp_path) not in text and ".ckpt" not in text and ".pt" not in text

    out = tmp_path / "from_bundle.csv"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *_predict(yolox_tiny.data, moved, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.read_bytes() == reference.read_bytes()  # the same submission as the run folder, byte for byte


def test_a_changed_bundle_file_is_named(yolox_tiny, run_folder: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    assert main(["export", "ensemble", "--ensemble", str(run_folder), "--out", str(bundle)]) == 0
    with pytest.raises(CytologiaInputError, match="exists and is not empty"):
        from cytologia.ensemble.bundle import export_bundle

        export_bundle(run_folder, bundle)
    graph = next((bundle / "models").glob("detector*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    with pytest.raises(CytologiaInputError, match=rf"{graph.name}: checksum differs"):
        read_ensemble(bundle)
    graph.unlink()
    with pytest.raises(CytologiaInputError, match=rf"{graph.name}: listed in .* but missing"):
        read_ensemble(bundle)
    assert main(_predict(yolox_tiny.data, bundle, tmp_path / "s.csv")) == 2 and not (tmp_path / "s.csv").exists()
