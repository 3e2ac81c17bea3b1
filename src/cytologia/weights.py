"""Local weight files: the sha256 manifest in ``models/`` and strict state-dict loading.

Nothing is downloaded here (the one deliberate download is ``cytologia weights pull``,
:mod:`cytologia.weights_catalog`). A loader calls :func:`verified_path` before reading a file: the file must be
listed in ``models/manifest.json`` with the same sha256 (a truncated copy or a different release is caught before it
silently trains from wrong weights). :func:`load_state_dict_checked` loads strictly or says exactly which keys did
not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cytologia.errors import CytologiaInputError

MANIFEST_NAME = "manifest.json"


def models_dir() -> Path:
    """``$CYTOLOGIA_MODELS`` or ``./models``."""
    return Path(os.environ.get("CYTOLOGIA_MODELS", "models"))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path | None = None) -> dict[str, dict[str, Any]]:
    """``file name -> {sha256, size, source}`` from ``directory/manifest.json`` (empty when there is none)."""
    path = Path(directory or models_dir()) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        files = data["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CytologiaInputError(f"{path}: not a weights manifest ({err})") from None
    if not isinstance(files, dict):
        raise CytologiaInputError(f"{path}: 'files' must be an object of file name -> entry")
    return files


def add_to_manifest(file: Path, source: str = "", directory: Path | None = None, **extra: Any) -> dict[str, Any]:
    """Record ``file`` (which must lie in the models folder) with its sha256 and size (plus ``extra`` fields, e.g.
    ``licence``); returns the entry."""
    directory = Path(directory or models_dir())
    file = Path(file)
    if not file.is_file():
        raise CytologiaInputError(f"{file}: no such weight file")
    if file.resolve().parent != directory.resolve():
        raise CytologiaInputError(f"{file}: weight files must be placed directly in {directory}/")
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text()) if path.is_file() else {"files": {}}
    entry = {"sha256": sha256_file(file), "size": file.stat().st_size, "source": source, **extra}
    data.setdefault("files", {})[file.name] = entry
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return entry


def verified_path(file: str | Path, directory: Path | None = None) -> Path:
    """The path of a weight file after checking it against the manifest; errors name the file and the hashes.

    ``file`` is a path, or a bare name looked up in the models folder.
    """
    directory = Path(directory or models_dir())
    path = Path(file)
    if not path.is_file() and not path.is_absolute() and (directory / path).is_file():
        path = directory / path
    if not path.is_file():
        raise CytologiaInputError(f"{file}: weight file not found (place it in {directory}/, see models/README.md)")
    entry = read_manifest(directory).get(path.name)
    if entry is None:
        raise CytologiaInputError(
            f"{path}: not listed in {directory / MANIFEST_NAME}; register it with `cytologia weights add {path}`"
        )
    if path.stat().st_size != entry.get("size", path.stat().st_size):
        raise CytologiaInputError(f"{path}: size {path.stat().st_size} B, manifest says {entry['size']} B")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise CytologiaInputError(f"{path}: sha256 {actual} does not match the manifest's {entry['sha256']}")
    return path


@dataclass
class LoadReport:
    """What :func:`load_state_dict_checked` did: keys loaded, and every key that did not match, by reason."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    shape_mismatch: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # key, ckpt, model
    skipped: list[str] = field(default_factory=list)  # allowed mismatches (e.g. a classification head)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self, limit: int = 20) -> str:
        parts = []
        for what, keys in (("missing from checkpoint", self.missing), ("unexpected in checkpoint", self.unexpected)):
            if keys:
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:limit])}{' ...' if len(keys) > limit else ''}")
        if self.shape_mismatch:
            shown = ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.shape_mismatch[:limit])
            parts.append(f"{len(self.shape_mismatch)} shape mismatch: {shown}")
        return "; ".join(parts) or f"all {len(self.loaded)} tensors matched"


def load_state_dict_checked(
    model: Any,
    state: dict[str, Any],
    *,
    allow_missing: tuple[str, ...] = (),
    skip_mismatched: tuple[str, ...] = (),
    source: str = "checkpoint",
) -> LoadReport:
    """Load ``state`` into a torch ``model`` strictly; raise naming every key that did not match.

    Keys starting with a prefix in ``skip_mismatched`` are left at the model's init when their shape differs or they
    are absent from the model (e.g. an 80-class detection head fine-tuned to 1 class); keys starting with a prefix in
    ``allow_missing`` may be missing from the checkpoint. Everything else must match exactly.
    """
    own = model.state_dict()
    report = LoadReport()
    to_load = {}
    for key, value in state.items():
        skippable = key.startswith(skip_mismatched) if skip_mismatched else False
        if key not in own:
            (report.skipped if skippable else report.unexpected).append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            if skippable:
                report.skipped.append(key)
            else:
                report.shape_mismatch.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    for key in own:
        if key not in to_load and key not in report.skipped and not any(k == key for k, _, _ in report.shape_mismatch):
            if not (allow_missing and key.startswith(allow_missing)) and not (
                skip_mismatched and key.startswith(skip_mismatched)
            ):
                report.missing.append(key)
    if not report.ok:
        raise CytologiaInputError(f"{source}: does not fit {type(model).__name__}: {report.describe()}")
    model.load_state_dict(to_load, strict=False)
    report.loaded = sorted(to_load)
    return report
