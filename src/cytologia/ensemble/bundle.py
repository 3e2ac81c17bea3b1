"""A portable inference bundle (``cytologia export ensemble --out DIR``): one folder that predicts anywhere.

Layout::

    DIR/ensemble.json      the ensemble file, every model path relative to DIR (ONNX files only, no checkpoint)
    DIR/models/*.onnx      detector_fold<k>.onnx, <member>_fold<k>.onnx: the graphs the pipeline runs
    DIR/classes.txt        the 23 class names, one per line, in the models' output order
    DIR/checksums.sha256   sha256 of every other file (``sha256sum -c checksums.sha256`` checks it too)

The folder can be moved or copied to another machine as a whole. Reading it (``cytologia predict --ensemble DIR``,
:func:`read_bundle`) checks every checksum and the class list first, and names the file that differs. Predicting
from it with ONNX Runtime needs only the inference dependencies (``pip install 'cytologia[infer]'``: numpy, pandas,
OpenCV, Pillow, onnx, onnxruntime): no torch, Lightning, timm or ultralytics is imported (tested with them blocked).
Members of weight 0 keep their entry, without files (they are not run). Models the source ensemble lists only as
checkpoints are exported once (:func:`cytologia.runtime.inference.cached_onnx`), which needs the training install.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cytologia.data.schema import CLASSES
from cytologia.ensemble.schema import Ensemble, MemberSpec, read_ensemble, write_ensemble
from cytologia.errors import CytologiaInputError

ENSEMBLE_FILE = "ensemble.json"
CLASSES_FILE = "classes.txt"
CHECKSUMS_FILE = "checksums.sha256"
MODELS_DIR = "models"
_CHUNK = 1 << 20  # bytes per read while hashing


@dataclass
class Bundle:
    """What :func:`export_bundle` wrote: the folder, its files (relative paths) and their total size in bytes."""

    path: Path
    files: list[str]
    size_bytes: int

    def summary(self) -> str:
        n = len([f for f in self.files if f.endswith(".onnx")])
        return f"wrote {self.path}: {n} ONNX file(s), {len(self.files)} files, {self.size_bytes / 1e6:.1f} MB"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a bundle folder (it holds :data:`ENSEMBLE_FILE` and :data:`CHECKSUMS_FILE`)."""
    path = Path(path)
    return path.is_dir() and (path / ENSEMBLE_FILE).is_file() and (path / CHECKSUMS_FILE).is_file()


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _place(source: Path | bytes, target: Path) -> None:
    if isinstance(source, bytes):
        target.write_bytes(source)
    else:
        shutil.copyfile(source, target)


def _graphs(ens: Ensemble, onnx: list[str], checkpoints: list[str], img_size: int, kind: str) -> list[Path | bytes]:
    """The ONNX graphs of one model list: its ONNX files, else its checkpoints exported (once)."""
    if onnx:
        paths = [ens.resolve(p) for p in onnx]
        for p in paths:
            if not p.is_file():
                raise CytologiaInputError(f"{p}: ONNX file listed in the ensemble file not found")
        return list(paths)
    if not checkpoints:
        raise CytologiaInputError(f"a {kind} of the ensemble file lists neither ONNX files nor checkpoints")
    from cytologia.runtime.inference import cached_onnx

    return [cached_onnx(ens.resolve(c), img_size, kind) for c in checkpoints]


def export_bundle(ensemble: str | Path | Ensemble, out: str | Path, *, overwrite: bool = False) -> Bundle:
    """Write the bundle of ``ensemble`` (a file or an :class:`Ensemble`) to the folder ``out`` (see the module doc).

    ``out`` must not exist (or be empty), unless ``overwrite``. The folder is written beside ``out`` and renamed into
    place, so a failed export leaves no half bundle."""
    ens = read_ensemble(ensemble) if isinstance(ensemble, (str, Path)) else ensemble
    if ens.detector is None:
        raise CytologiaInputError("the ensemble file has no detector: a bundle predicts, it needs one")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CytologiaInputError(f"{out}: exists and is not empty (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / MODELS_DIR).mkdir()
        det = ens.detector
        det_files = []
        for k, graph in enumerate(_graphs(ens, det.onnx, det.checkpoints, det.img_size, "detector")):
            rel = f"{MODELS_DIR}/detector_fold{k}.onnx"
            _place(graph, tmp / rel)
            det_files.append(rel)
        ml_weight = ens.blend.multilabel_weight
        cell_weight = {m.name: w for m, w in zip(ens.cell_members, ens.weights())}
        members: list[MemberSpec] = []
        for m in ens.members:
            runs = cell_weight.get(m.name, 0.0) > 0 if m.kind == "cell" else ml_weight > 0
            files = []
            if runs:
                for k, graph in enumerate(_graphs(ens, m.onnx, m.checkpoints, m.img_size, "classifier")):
                    rel = f"{MODELS_DIR}/{_safe(m.name)}_fold{k}.onnx"
                    _place(graph, tmp / rel)
                    files.append(rel)
            members.append(replace(m, checkpoints=[], onnx=files))
        bundled = replace(
            ens, members=members, detector=replace(det, checkpoints=[], onnx=det_files), base_dir=tmp.resolve()
        )
        write_ensemble(bundled, tmp / ENSEMBLE_FILE)
        (tmp / CLASSES_FILE).write_text("\n".join(CLASSES) + "\n")
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        lines = [f"{sha256_file(tmp / f)}  {f}" for f in files]
        (tmp / CHECKSUMS_FILE).write_text("\n".join(lines) + "\n")
        size = sum((tmp / f).stat().st_size for f in files)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Bundle(out, [*files, CHECKSUMS_FILE], size)


def verify_bundle(folder: str | Path) -> None:
    """Check a bundle: every file of :data:`CHECKSUMS_FILE` present with its sha256, every ONNX file under
    ``models/`` listed, and the class list equal to this cytologia's. An error names the file."""
    folder = Path(folder)
    sums = folder / CHECKSUMS_FILE
    if not sums.is_file():
        raise CytologiaInputError(f"{folder}: not an inference bundle (no {CHECKSUMS_FILE})")
    listed: dict[str, str] = {}
    for i, line in enumerate(sums.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CytologiaInputError(f"{sums}: line {i} is not '<sha256>  <relative path>': {line!r}")
        listed[rel] = digest
    for rel, digest in listed.items():
        path = folder / rel
        if not path.is_file():
            raise CytologiaInputError(f"{path}: listed in {sums} but missing (copy the whole bundle folder)")
        if sha256_file(path) != digest:
            raise CytologiaInputError(f"{path}: checksum differs from {sums} (the file changed since the export)")
    stray = sorted(p.relative_to(folder).as_posix() for p in (folder / MODELS_DIR).glob("*.onnx"))
    stray = [r for r in stray if r not in listed]
    if stray:
        raise CytologiaInputError(f"{folder}: ONNX file(s) not in {CHECKSUMS_FILE}: {', '.join(stray)}")
    if ENSEMBLE_FILE not in listed or CLASSES_FILE not in listed:
        raise CytologiaInputError(f"{sums}: must list {ENSEMBLE_FILE} and {CLASSES_FILE}")
    classes = tuple((folder / CLASSES_FILE).read_text().split())
    if classes != CLASSES:
        raise CytologiaInputError(
            f"{folder / CLASSES_FILE}: the bundle's classes ({len(classes)}) are not this cytologia's {len(CLASSES)} "
            "classes in order"
        )


def read_bundle(folder: str | Path) -> Ensemble:
    """The ensemble of a bundle folder, after :func:`verify_bundle`; its paths resolve inside the folder."""
    verify_bundle(folder)
    return read_ensemble(Path(folder) / ENSEMBLE_FILE)
