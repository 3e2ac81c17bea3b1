"""Other public leukocyte data sets through the Trustii contract: ``cytologia import FORMAT SRC --out DIR``.

One reader per layout, listed in :data:`FORMATS` as ``"module:function"`` (imported only when used). A reader has the
signature ``read(src: Path, options: ImportOptions, issues: Issues) -> (image_root, list[Found])``: it parses its
layout and nothing else; :func:`cytologia.data.importers.core.import_dataset` maps the classes, checks and writes.
Adding a layout = one module with ``read`` + one line here. Class maps: :mod:`cytologia.data.importers.class_maps`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from cytologia.data.importers.core import Found, ImportOptions, ImportReport, Issues, import_dataset
from cytologia.errors import CytologiaInputError

__all__ = ["FORMATS", "Found", "ImportOptions", "ImportReport", "Issues", "get_reader", "import_dataset"]

Reader = Callable[[Path, ImportOptions, Issues], tuple[Path, list[Found]]]

# layout name -> "module:function"
FORMATS: dict[str, str] = {
    "folder": "cytologia.data.importers.folder:read",  # one folder per class, one cell per image (PBC, Raabin, LISC)
    "voc": "cytologia.data.importers.voc:read",  # Pascal VOC XML boxes (BCCD)
    "coco": "cytologia.data.importers.coco:read",  # COCO JSON boxes
    "yolo": "cytologia.data.importers.yolo:read",  # YOLO txt labels + class names
}


def get_reader(fmt: str) -> Reader:
    """The reader of layout ``fmt``; a miss names the layouts."""
    if fmt not in FORMATS:
        raise CytologiaInputError(f"unknown import format {fmt!r}; formats: {', '.join(FORMATS)}")
    module, _, func = FORMATS[fmt].partition(":")
    return getattr(importlib.import_module(module), func)
