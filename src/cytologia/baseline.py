"""The null model every result should beat (``cytologia baseline``).

Every expected box of ``test.csv`` gets the same prior: a box centred in its image whose width and height are the
median *relative* box size of ``train.csv`` (relative to the image, read from the JPEG header; absolute pixels when
the training images are absent), and the most frequent training class. It needs no model, so it runs anywhere and
anchors the score scale: a real pipeline must beat it by far.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.schema import SUBMISSION_COLUMNS
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)


def _sizes(image_dir: Path, names: list[str]) -> np.ndarray:
    from cytologia.data.images import image_size

    return np.array([image_size(image_dir / n) for n in names], dtype=np.float64).reshape(-1, 2)


def prior_submission(train: pd.DataFrame, test: pd.DataFrame, image_dir: Path | None) -> pd.DataFrame:
    """The baseline submission (columns :data:`SUBMISSION_COLUMNS`, one row per ``test`` row, in its order)."""
    bw = (train["x2"] - train["x1"]).to_numpy(np.float64)
    bh = (train["y2"] - train["y1"]).to_numpy(np.float64)
    cls = train["class"].value_counts().idxmax()
    test_names = test["NAME"].astype(str).tolist()
    if image_dir is not None and image_dir.is_dir():
        tr_names = train["NAME"].astype(str).tolist()
        uniq = list(dict.fromkeys(tr_names))
        size = pd.DataFrame(_sizes(image_dir, uniq), index=uniq).loc[tr_names].to_numpy()
        rel_w, rel_h = np.median(bw / size[:, 0]), np.median(bh / size[:, 1])
        uniq_t = list(dict.fromkeys(test_names))
        t_size = pd.DataFrame(_sizes(image_dir, uniq_t), index=uniq_t).loc[test_names].to_numpy()
        w, h = rel_w * t_size[:, 0], rel_h * t_size[:, 1]
        cx, cy = t_size[:, 0] / 2, t_size[:, 1] / 2
    else:
        log.warning("no images: the prior box is absolute (median train box) at a 368 px image's centre")
        w = np.full(len(test), np.median(bw))
        h = np.full(len(test), np.median(bh))
        cx = cy = np.full(len(test), 184.0)  # MISSION.md: images are mostly ~360x368 px
    out = pd.DataFrame(
        {
            "trustii_id": test["trustii_id"].to_numpy(),
            "NAME": test_names,
            "x1": np.round(cx - w / 2).astype(int),
            "y1": np.round(cy - h / 2).astype(int),
            "x2": np.round(cx + w / 2).astype(int),
            "y2": np.round(cy + h / 2).astype(int),
            "class": cls,
        }
    )
    return out[list(SUBMISSION_COLUMNS)]


def null_baseline(data: str | Path, out: str | Path | None = None) -> pd.DataFrame:
    """The null-model submission of a data folder (``train.csv``, ``test.csv``, and ``images/`` when present), see
    :func:`prior_submission`; written to ``out`` when given."""
    data = Path(data)
    for name in ("train.csv", "test.csv"):
        if not (data / name).is_file():
            raise CytologiaInputError(f"{data / name}: no such file")
    from cytologia.data.io import read_annotations, read_test

    image_dir = data / "images" if (data / "images").is_dir() else None
    train, _ = read_annotations(data / "train.csv", image_dir, lenient=True)
    test = read_test(data / "test.csv", image_dir)
    sub = prior_submission(train, test, image_dir)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        sub.to_csv(out, index=False)
    return sub


def summary_line(sub: pd.DataFrame, out: str | Path) -> str:
    """What ``cytologia baseline`` prints after writing ``sub`` to ``out``."""
    return f"wrote {out}: {len(sub)} rows, class {sub['class'].iloc[0]!r} everywhere"
