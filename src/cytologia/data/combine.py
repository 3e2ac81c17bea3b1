"""Several data folders (Cytologia, imported sets) as one, the data set kept as a grouping key.

:func:`combine_folders` validates each folder's ``train.csv`` against its ``images/`` and writes one folder:
``train.csv`` (every box; ``NAME`` = ``<dataset>__<name>``), ``images/`` (hard links, or copies across devices),
``sources.csv`` (``NAME,source,dataset,origin``: ``dataset`` the key the folder was given, ``source`` the folder's own
source when its ``sources.csv`` names one -- ``<dataset>:<source>`` -- else the data set) and ``combine.json``.
Training, folds (``folds.mode=group-dataset``: leave one data set out) and sampling weights
(``data.sampling_weights``) read the data set back with :func:`read_datasets`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from cytologia.data.importers.core import SOURCES_COLUMNS, dataset_name, output_name, place_image
from cytologia.data.schema import BOX_COLUMNS
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.paths import require_new_folder

log = logging.getLogger(__name__)

SOURCES_FILE = "sources.csv"
REPORT_FILE = "combine.json"


def read_datasets(root: str | Path) -> pd.Series | None:
    """NAME -> data set of a data folder, from the ``dataset`` column of its ``sources.csv``; None when the folder
    has no such file or column (a single data set). An empty data set name is an error naming the row."""
    path = Path(root) / SOURCES_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if "dataset" not in table.columns:
        return None
    if "NAME" not in table.columns:
        raise ValidationError(path, [(None, f"missing column NAME; header {list(table.columns)}")])
    empty = (table["dataset"].str.strip() == "").to_numpy().nonzero()[0]
    if len(empty):
        raise ValidationError(path, [(int(i) + 1, "empty dataset") for i in empty[:20]], len(empty))
    return table.drop_duplicates("NAME").set_index("NAME")["dataset"]


def _own_sources(folder: Path) -> pd.Series | None:
    path = folder / SOURCES_FILE
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    return table.drop_duplicates("NAME").set_index("NAME")["source"] if {"NAME", "source"} <= set(table) else None


def combine_folders(
    parts: Mapping[str, str | Path], out: str | Path, *, link: bool = True, lenient: bool = False
) -> dict[str, object]:
    """Write the data folders ``parts`` (data set name -> folder with ``train.csv`` and ``images/``) as one folder
    ``out`` (see the module docstring); each is validated first (``lenient``: as ``cytologia validate --lenient``).
    Returns the summary also written to ``combine.json``: boxes, images and classes per data set."""
    from cytologia.data.io import read_annotations, write_csv

    out = Path(out)
    if len(parts) < 1:
        raise CytologiaInputError("combine needs at least one data folder")
    names = {dataset_name(k, Path(k)): Path(v) for k, v in parts.items()}
    if len(names) != len(parts):
        raise CytologiaInputError(f"data set names {list(parts)} collide once lower-cased")
    require_new_folder(out, "combine")
    tables, summary = [], {}
    for dataset, folder in names.items():
        if not (folder / "images").is_dir():
            raise CytologiaInputError(f"{folder}: no images/ folder (data set {dataset!r})")
        table, report = read_annotations(folder / "train.csv", folder / "images", lenient=lenient)
        own = _own_sources(folder)
        table = table.assign(dataset=dataset, folder=str(folder))
        table["source"] = dataset if own is None else dataset + ":" + table["NAME"].map(own).fillna("unknown")
        tables.append(table)
        summary[dataset] = {
            "folder": str(folder),
            "boxes": len(table),
            "images": int(table["NAME"].nunique()),
            "classes": {str(k): int(v) for k, v in table["class"].value_counts().sort_index().items()},
            "validation": report.summary(),
        }
    (out / "images").mkdir(parents=True)
    taken: set[str] = set()
    rows, sources = [], []
    for table in tables:
        dataset, folder = table["dataset"].iat[0], Path(table["folder"].iat[0])
        new = {n: output_name(f"{dataset}__{n}", taken) for n in pd.unique(table["NAME"])}
        for name, target in new.items():
            place_image(folder / "images" / name, out / "images" / target, link)
        rows.append(table.assign(NAME=table["NAME"].map(new))[["NAME", *BOX_COLUMNS, "class"]])
        first = table.drop_duplicates("NAME")
        sources.append(
            pd.DataFrame(
                {
                    "NAME": first["NAME"].map(new).to_numpy(),
                    "source": first["source"].to_numpy(),
                    "dataset": dataset,
                    "origin": [str(folder / "images" / n) for n in first["NAME"]],
                },
                columns=list(SOURCES_COLUMNS),
            )
        )
    write_csv(pd.concat(rows, ignore_index=True), out / "train.csv")
    write_csv(pd.concat(sources, ignore_index=True), out / SOURCES_FILE)
    (out / REPORT_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    log.info("combined %s into %s", ", ".join(f"{k} ({v['boxes']} boxes)" for k, v in summary.items()), out)
    return summary
