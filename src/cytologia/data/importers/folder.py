"""Folder-per-class layout (PBC / Acevedo 2020, Raabin-WBC, LISC): ``SRC/<class>/**/<image>``, one cell per image.

The class is the first folder under ``SRC``; images may sit deeper (``Train/<class>`` layouts: point ``SRC`` at
``Train``). The label is ``<class>:<prefix>`` when the file name has a ``PREFIX_`` part (PBC names its immature
granulocytes ``PMY_``, ``MY_``, ``MMY_``; the class map falls back to ``<class>`` when it does not list the prefix).
Files that are not images (by suffix) are skipped as ``not_image``; hidden files and folders are ignored; an image
directly in ``SRC`` has no class and is a ``malformed`` layout problem. The box is chosen by the importer
(``ImportOptions.box``).
"""

from __future__ import annotations

from pathlib import Path

from cytologia.data.importers.core import IMAGE_SUFFIXES, Found, ImportOptions, Issues
from cytologia.errors import CytologiaInputError


def _label(folder: str, file: Path) -> str:
    prefix, sep, _ = file.stem.partition("_")
    return f"{folder}:{prefix}" if sep and prefix else folder


def read(src: Path, options: ImportOptions, issues: Issues) -> tuple[Path, list[Found]]:
    """One :class:`Found` (box None) per image under a class folder of ``src``."""
    if not src.is_dir():
        raise CytologiaInputError(f"{src}: the folder-per-class layout needs a folder of class folders")
    found: list[Found] = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        issues.files_read += 1
        where = rel.as_posix()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            issues.add("not_image", where, f"not an image file (suffix {path.suffix or 'none'})")
        elif len(rel.parts) < 2:
            issues.add("malformed", where, f"image directly in {src}: it must sit in a class folder")
        else:
            found.append(Found(where, where, _label(rel.parts[0], path)))
    return src, found
