"""COCO JSON boxes: ``images`` (``id``, ``file_name``), ``annotations`` (``image_id``, ``category_id``, ``bbox`` =
``[x, y, width, height]`` in pixels) and ``categories`` (``id``, ``name``).

``SRC`` is the JSON file, or a folder holding exactly one ``.json`` (or give ``ImportOptions.annotations``). Images
are looked up under ``ImportOptions.images``, else ``images/`` beside the JSON when it exists, else the JSON's
folder. The class of a box is its category's ``name`` through the class map. A file that does not parse, a missing
list, an annotation without a 4-number ``bbox``, or one naming an image or category id the file does not define, is
``malformed``; an image without annotations holds no cell and is counted as ``no_cell`` (not copied).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cytologia.data.importers.core import Found, ImportOptions, Issues
from cytologia.errors import CytologiaInputError


def _json_file(src: Path, options: ImportOptions) -> Path:
    if options.annotations is not None:
        return Path(options.annotations)
    if src.is_file():
        return src
    files = sorted(src.glob("*.json"))
    if len(files) != 1:
        raise CytologiaInputError(f"{src}: {len(files)} .json files; give the COCO file as SRC or with --annotations")
    return files[0]


def _id(value: Any) -> Any:
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None


def read(src: Path, options: ImportOptions, issues: Issues) -> tuple[Path, list[Found]]:
    """One :class:`Found` per annotation."""
    path = _json_file(src, options)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: COCO annotation file not found")
    root = Path(options.images) if options.images is not None else path.parent
    if options.images is None and (path.parent / "images").is_dir():
        root = path.parent / "images"
    issues.files_read += 1
    name = path.name
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        issues.add("malformed", name, f"not valid JSON ({err})")
        return root, []
    lists = {key: data.get(key) if isinstance(data, dict) else None for key in ("images", "annotations", "categories")}
    bad = [key for key, value in lists.items() if not isinstance(value, list)]
    if bad:
        issues.add("malformed", name, f"lacks the list(s) {', '.join(bad)}")
        return root, []
    images: dict[Any, str] = {}
    for k, im in enumerate(lists["images"]):
        if not isinstance(im, dict) or _id(im.get("id")) is None or not isinstance(im.get("file_name"), str):
            issues.add("malformed", f"{name}, images[{k}]", "needs an id and a file_name")
            continue
        images[im["id"]] = im["file_name"]
    categories: dict[Any, str] = {}
    for k, cat in enumerate(lists["categories"]):
        if not isinstance(cat, dict) or _id(cat.get("id")) is None or not isinstance(cat.get("name"), str):
            issues.add("malformed", f"{name}, categories[{k}]", "needs an id and a name")
            continue
        categories[cat["id"]] = cat["name"]
    found: list[Found] = []
    used: set[Any] = set()
    for k, ann in enumerate(lists["annotations"]):
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        where = f"{name}, annotations[{k}]" + (f" (id {ann_id})" if ann_id is not None else "")
        if not isinstance(ann, dict):
            issues.add("malformed", where, "not an object")
            continue
        image_id, cat_id, bbox = ann.get("image_id"), ann.get("category_id"), ann.get("bbox")
        image = images.get(image_id) if _id(image_id) is not None else None
        label = categories.get(cat_id) if _id(cat_id) is not None else None
        numbers = isinstance(bbox, list) and len(bbox) == 4
        numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        if image is None or label is None or not numbers:
            why = []
            if image is None:
                why.append(f"image_id {image_id!r} is not an image of the file")
            if label is None:
                why.append(f"category_id {cat_id!r} is not a category of the file")
            if not numbers:
                why.append(f"bbox {bbox!r} is not [x, y, width, height]")
            issues.add("malformed", where, "; ".join(why), label or "", image or "")
            continue
        used.add(image_id)
        x, y, w, h = (float(v) for v in bbox)
        found.append(Found(image, where, label, (x, y, x + w, y + h)))
    for image_id, file_name in images.items():
        if image_id not in used:
            issues.add("no_cell", f"{name}, image {image_id!r}", f"{file_name}: no annotation", image=file_name)
    return root, found
