"""YOLO txt labels: ``SRC/images/**/<stem>.<ext>`` with ``SRC/labels/**/<stem>.txt`` (same relative path), one line
``class x_centre y_centre width height`` per box, coordinates normalised to the image (0-1).

Class names: ``ImportOptions.classes`` (a text file, one name per line, or a YAML with ``names``), else
``SRC/classes.txt``, else ``names`` of ``SRC/data.yaml`` (a list or an index -> name mapping). The box in pixels needs
the image size (read from its header). An image without a label file is a background image of the YOLO convention:
counted as ``no_cell``, not copied. A label file without an image is ``missing_image``; a line without five numbers,
a class index the names do not have, or a label file that is not text, is ``malformed``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cytologia.data.images import image_size
from cytologia.data.importers.core import IMAGE_SUFFIXES, Found, ImportOptions, Issues
from cytologia.errors import CytologiaInputError, ValidationError


def class_names(path: Path) -> list[str]:
    """Class names of a ``classes.txt`` (one per line) or a YAML file with ``names`` (list or index -> name)."""
    if not path.is_file():
        raise CytologiaInputError(f"{path}: class-name file not found")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValidationError(path, [(None, f"not valid YAML ({err})")]) from None
        names = data.get("names") if isinstance(data, dict) else None
        if isinstance(names, dict) and all(isinstance(k, int) for k in names):
            if sorted(names) != list(range(len(names))):
                raise ValidationError(path, [(None, f"names indices {sorted(names)} are not 0..{len(names) - 1}")])
            return [str(names[k]) for k in range(len(names))]
        if isinstance(names, list):
            return [str(n) for n in names]
        raise ValidationError(path, [(None, "needs names: a list, or a mapping index -> name")])
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _names_file(src: Path, options: ImportOptions) -> Path:
    if options.classes is not None:
        return Path(options.classes)
    for candidate in (src / "classes.txt", src / "data.yaml"):
        if candidate.is_file():
            return candidate
    raise CytologiaInputError(f"{src}: no classes.txt or data.yaml: give the class names with --classes FILE")


def read(src: Path, options: ImportOptions, issues: Issues) -> tuple[Path, list[Found]]:
    """One :class:`Found` per label line."""
    images_dir, labels_dir = src / "images", src / "labels"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise CytologiaInputError(f"{src}: the YOLO layout needs images/ and labels/ folders")
    names = class_names(_names_file(src, options))
    images = {p.relative_to(images_dir).with_suffix("").as_posix(): p for p in sorted(images_dir.rglob("*"))}
    images = {k: p for k, p in images.items() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    labels = {p.relative_to(labels_dir).with_suffix("").as_posix(): p for p in sorted(labels_dir.rglob("*.txt"))}
    found: list[Found] = []
    for key in images:
        if key not in labels:
            issues.add("no_cell", f"images/{key}", "no label file: a background image", image=f"images/{key}")
    for key, label_path in labels.items():
        issues.files_read += 1
        rel = label_path.relative_to(src).as_posix()
        image_path = images.get(key)
        image = image_path.relative_to(src).as_posix() if image_path is not None else f"images/{key}"
        try:
            lines = label_path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            issues.add("malformed", rel, f"not a text file ({err})", image=image)
            continue
        if image_path is None:
            issues.add("missing_image", rel, f"no image images/{key}.* for this label file", image=image)
            continue
        size: tuple[int, int] | None = None
        for k, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{rel}, line {k}"
            fields = line.split()
            try:
                values = [float(v) for v in fields]
            except ValueError:
                values = []
            if len(fields) != 5 or len(values) != 5 or not values[0].is_integer():
                message = f"{line.strip()!r} is not 'class x_centre y_centre width height'"
                issues.add("malformed", where, message, image=image)
                continue
            index = int(values[0])
            if not 0 <= index < len(names):
                issues.add("malformed", where, f"class index {index} is not in 0..{len(names) - 1}", image=image)
                continue
            if size is None:
                try:
                    size = image_size(image_path)
                except CytologiaInputError as err:
                    issues.add("unreadable_image", where, str(err), names[index], image)
                    break
            w, h = size
            cx, cy, bw, bh = values[1] * w, values[2] * h, values[3] * w, values[4] * h
            found.append(Found(image, where, names[index], (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2)))
    return src, found
