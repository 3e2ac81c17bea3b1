"""Pascal VOC XML boxes (BCCD): ``SRC/Annotations/*.xml`` (or every ``*.xml`` under ``SRC`` when there is no
``Annotations/``), images in ``SRC/JPEGImages/`` (else beside the XML file).

Each ``<object>`` with ``<name>`` and ``<bndbox>`` (``xmin ymin xmax ymax``) is a cell candidate; its class goes
through the class map (BCCD: only ``WBC`` boxes become cells, with the subtype from the image labels). VOC pixel
indices are 1-based and inclusive, so ``x1 = xmin - 1``, ``x2 = xmax`` (corner coordinates, as Trustii's). The image
is ``<filename>`` (``<path>`` is ignored: it names the annotator's machine); a file name without a suffix, or one
that is absent, is looked up as the XML's stem with an image suffix. A file that does not parse, or an object
lacking a field or holding a non-number, is ``malformed``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from cytologia.data.importers.core import IMAGE_SUFFIXES, Found, ImportOptions, Issues
from cytologia.errors import CytologiaInputError

_BOX_TAGS = ("xmin", "ymin", "xmax", "ymax")


def _image_for(src: Path, xml: Path, filename: str) -> str:
    """The image path relative to ``src`` (returned even when missing: the importer names it)."""
    folders = [src / "JPEGImages", xml.parent] if (src / "JPEGImages").is_dir() else [xml.parent]
    names = ([filename] if filename else []) + [xml.stem + s for s in sorted(IMAGE_SUFFIXES)]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return (folder / name).relative_to(src).as_posix()
    return (folders[0] / (filename or xml.stem)).relative_to(src).as_posix()


def read(src: Path, options: ImportOptions, issues: Issues) -> tuple[Path, list[Found]]:
    """One :class:`Found` per ``<object>`` of every annotation file."""
    if not src.is_dir():
        raise CytologiaInputError(f"{src}: the VOC layout needs a folder (Annotations/ and JPEGImages/)")
    xml_dir = src / "Annotations"
    files = sorted(xml_dir.glob("*.xml")) if xml_dir.is_dir() else sorted(src.rglob("*.xml"))
    if not files:
        raise CytologiaInputError(f"{src}: no .xml annotation file (looked in {xml_dir if xml_dir.is_dir() else src})")
    found: list[Found] = []
    for xml in files:
        issues.files_read += 1
        rel = xml.relative_to(src).as_posix()
        try:
            root = ET.parse(xml).getroot()
        except ET.ParseError as err:
            issues.add("malformed", rel, f"not well-formed XML ({err})")
            continue
        filename = (root.findtext("filename") or "").strip()
        if "/" in filename or "\\" in filename:
            image = filename  # a path in <filename>: checked against the source folder by the importer
        else:
            image = _image_for(src, xml, filename)
        for k, obj in enumerate(root.iter("object"), start=1):
            name = (obj.findtext("name") or "").strip()
            where = f"{rel}, object {k}" + (f" ({name})" if name else "")
            box = obj.find("bndbox")
            text = [None if box is None else box.findtext(t) for t in _BOX_TAGS]
            if not name or any(t is None for t in text):
                missing = ["name"] if not name else [t for t, v in zip(_BOX_TAGS, text) if v is None]
                issues.add("malformed", where, f"object lacks {', '.join(missing)}", name, image)
                continue
            try:
                xmin, ymin, xmax, ymax = (float(t) for t in text)  # type: ignore[arg-type]
            except ValueError:
                issues.add("malformed", where, f"bndbox {text} holds a non-number", name, image)
                continue
            found.append(Found(image, where, name, (xmin - 1.0, ymin - 1.0, xmax, ymax)))
    return src, found
