"""Data preparation shared by every training stage: the data folder (generated when synthetic and absent), the
validated annotations table, and the folds every stage of one data folder shares (``DATA/folds.csv``).

A detector run and a classifier run on the same folder therefore hold out the same images in fold k, which the
out-of-fold chain (detector OOF boxes -> cleaning -> classifier crops) relies on.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from cytologia.errors import CytologiaInputError, ValidationError

log = logging.getLogger(__name__)

FOLDS_FILE = "folds.csv"  # in the data folder, shared by the detector and classifier stages
FOLDS_REPORT = "folds_report.json"


def ensure_data(cfg: DictConfig) -> Path:
    """The data folder, holding ``train.csv`` and ``images/``; a synthetic set is generated there when configured
    and absent."""
    root = Path(cfg.data.root)
    train_csv = root / "train.csv"
    if not train_csv.is_file():
        if not cfg.data.synthetic:
            raise CytologiaInputError(
                f"{train_csv}: no such file (data.root={cfg.data.root}); place the Cytologia data there "
                "(train.csv + images/) or use data=synthetic"
            )
        if cfg.data.n_images < 1:
            raise CytologiaInputError(f"config key data.n_images={cfg.data.n_images} must be >= 1 to generate data")
        from cytologia.data.synthetic.generate import generate

        workers = max(1, min(4, (os.cpu_count() or 1)))
        log.info("generating %d synthetic images into %s (seed %d)", cfg.data.n_images, root, cfg.data.synth_seed)
        generate(root, cfg.data.n_images, seed=cfg.data.synth_seed, workers=workers)
    if not (root / "images").is_dir():
        raise CytologiaInputError(f"{root / 'images'}: no such folder (the images of {train_csv})")
    return root


def read_train(cfg: DictConfig, root: Path) -> pd.DataFrame:
    """The validated annotations table of ``root/train.csv`` (lenient per ``data.lenient``; the report is logged)."""
    from cytologia.data.io import read_annotations

    table, report = read_annotations(root / "train.csv", root / "images", lenient=cfg.data.lenient)
    log.info("%s", report.summary())
    if table.empty:
        raise CytologiaInputError(f"{root / 'train.csv'}: no usable box left after validation")
    return table


def read_folds(path: Path) -> pd.DataFrame:
    """A ``NAME,fold`` table; bad rows raise :class:`ValidationError` naming the file and rows."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("NAME", "fold") if c not in raw.columns]
    if missing:
        raise ValidationError(path, [(None, f"missing column(s) {', '.join(missing)}")])
    fold = pd.to_numeric(raw["fold"], errors="coerce")
    bad = np.flatnonzero(fold.isna().to_numpy() | (fold < 0).to_numpy() | (fold != fold.round()).to_numpy())
    dup = np.flatnonzero(raw["NAME"].duplicated().to_numpy())
    problems = [(int(i) + 1, f"fold={raw['fold'].iat[i]!r} is not a non-negative integer") for i in bad[:20]]
    problems += [(int(i) + 1, f"NAME {raw['NAME'].iat[i]} repeats") for i in dup[:20]]
    if problems:
        raise ValidationError(path, problems, total=len(bad) + len(dup))
    return pd.DataFrame({"NAME": raw["NAME"], "fold": fold.astype(np.int64)})


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file atomically (temporary file, then rename): a killed run never leaves half a table."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_folds(cfg: DictConfig, table: pd.DataFrame, root: Path) -> pd.DataFrame:
    """``root/folds.csv`` when it exists (checked against the config and the table), else made and written."""
    path = root / FOLDS_FILE
    k = int(cfg.folds.k)
    if path.is_file():
        folds = read_folds(path)
        report_path = root / FOLDS_REPORT
        if report_path.is_file():
            made = json.loads(report_path.read_text())
            wanted = {"k": k, "seed": int(cfg.folds.seed), "mode": str(cfg.folds.mode)}
            differ = {key: made.get(key) for key in wanted if made.get(key) != wanted[key]}
            if differ:
                raise CytologiaInputError(
                    f"{path} was made with {differ} but the config asks for {wanted}: delete {path} (and "
                    f"{report_path}) to remake the folds, or change the folds config"
                )
        found = sorted(set(folds["fold"].tolist()))
        if found != list(range(k)):
            raise CytologiaInputError(f"{path} holds folds {found}, the config asks for folds.k={k}")
    else:
        from cytologia.data.folds import make_folds
        from cytologia.data.hygiene import find_duplicates

        names = list(pd.unique(table["NAME"]))
        dups = find_duplicates(root / "images", names, near_threshold=cfg.folds.near_threshold)
        dup_groups = dups.set_index("NAME")["dup_group"]
        from cytologia.data.combine import read_datasets

        folds, report = make_folds(
            table,
            k=k,
            seed=int(cfg.folds.seed),
            mode=str(cfg.folds.mode),
            image_dir=root / "images",
            dup_groups=dup_groups,
            datasets=read_datasets(root),  # a combined folder's data sets: a stratification block / group-dataset
        )
        write_text_atomic(root / FOLDS_REPORT, json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        write_text_atomic(path, folds.to_csv(index=False))  # last: folds.csv present means its report is too
        log.info("%s\nwrote %s", report.summary(), path)
    lost = ~table["NAME"].isin(folds["NAME"])
    if lost.any():
        first = ", ".join(table.loc[lost, "NAME"].astype(str).unique()[:5])
        raise CytologiaInputError(
            f"{path}: {int(lost.sum())} box(es) of train.csv belong to images without a fold (e.g. {first}); the "
            f"folds are stale: delete {path} to remake them"
        )
    return folds
