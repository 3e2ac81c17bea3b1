"""A report folder a researcher reads after a run: the score and what it is made of, where the errors are, and what
the run cost.

:func:`write_report` scores a submission against the truth (:func:`cytologia.metrics.score`) and writes, next to a
static ``index.html`` that links everything:

- ``score.json`` -- the score, its parts and counts; ``comparison.csv`` / ``comparison.png`` -- side by side with other
  results (``extra_scores``: e.g. the single-stage baseline and the null model on the same truth);
- ``per_class_f1.csv`` / ``.png`` -- support, predicted, precision, recall, F1 per label (the 23 classes, then any
  other label the macro average counts, e.g. "None" for images without a prediction);
- ``confusion.csv`` / ``confusion.png`` -- rows: true class, columns: predicted class, colour row-normalised (a row
  sums to 1), the counts written where non-zero; rows of classes absent from the truth are grey;
- ``per_source.csv`` / ``.png`` -- score, GIoU and macro-F1 per acquisition source (``sources.csv``);
- ``errors.csv`` / ``errors.png`` -- the worst truth boxes (wrong class and/or GIoU below :data:`BAD_GIOU`), as a
  gallery of crops: truth box green, predicted box red, true vs predicted class and GIoU above each crop;
- ``config.yaml``, ``folds.csv`` + ``fold_counts.csv``, ``cleaning_report.csv`` + ``cleaning_summary.csv``,
  ``stage_times.csv`` when given.

Pictures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.errors import CytologiaInputError
from cytologia.metrics import F1_WEIGHT, GIOU_WEIGHT, ScoreResult, macro_f1, score

log = logging.getLogger(__name__)

BAD_GIOU = 0.5  # a truth box whose best prediction has a GIoU below this is "badly localised" (rescaled 0.75)
GALLERY_MARGIN = 16  # px around the union of truth and predicted box in a gallery crop (the 1st place's crop margin)
GALLERY_COLUMNS = 6
TRUTH_COLOUR = "#00c000"
PRED_COLOUR = "#ff2020"
DPI = 110
UNKNOWN_SOURCE = "unknown"


# ------------------------------------------------------------------------------------------------------- inputs
def _table(value: pd.DataFrame | str | Path, what: str) -> pd.DataFrame:
    """A table given as a DataFrame or a CSV path (read as text: "None"/"NA" stay strings)."""
    if isinstance(value, pd.DataFrame):
        return value
    path = Path(value)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file ({what})")
    return pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CytologiaInputError(
            f"{what} lacks column(s) {', '.join(missing)}; has {', '.join(map(str, frame.columns))}"
        )


def _sources(sources: pd.DataFrame | str | Path | Mapping[str, str]) -> pd.Series:
    """NAME -> source."""
    if isinstance(sources, Mapping):
        return pd.Series({str(k): str(v) for k, v in sources.items()}, dtype=object)
    frame = _table(sources, "sources")
    _require(frame, ("NAME", "source"), "sources table")
    frame = frame.astype({"NAME": str, "source": str}).drop_duplicates("NAME")
    return frame.set_index("NAME")["source"]


def _score_summary(value: ScoreResult | Mapping[str, Any], name: str) -> dict[str, float]:
    if isinstance(value, ScoreResult):
        return {"score": value.score, "giou": value.giou, "f1": value.f1}
    missing = [k for k in ("score", "giou", "f1") if k not in value]
    if missing:
        raise CytologiaInputError(f"extra score {name!r} lacks {', '.join(missing)} (needs score, giou, f1)")
    return {k: float(value[k]) for k in ("score", "giou", "f1")}


# ------------------------------------------------------------------------------------------------------ tables
def report_labels(result: ScoreResult) -> list[str]:
    """The labels of the report's tables and pictures: the 23 classes in their order, then every other label of the
    score (``"None"``, a string that is not a class) sorted."""
    return [*CLASSES, *sorted(label for label in result.labels if label not in CLASSES)]


def confusion_table(result: ScoreResult) -> pd.DataFrame:
    """Counts, rows true label and columns predicted label, over :func:`report_labels` (zeros filled in)."""
    labels = report_labels(result)
    table = result.confusion.reindex(index=labels, columns=labels, fill_value=0).astype(np.int64)
    table.index.name, table.columns.name = "true", "pred"
    return table


def per_class_table(result: ScoreResult) -> pd.DataFrame:
    """Per label: support (truth boxes), predicted boxes, correct, precision, recall, F1 and whether the label
    counts in the macro average (it occurs in the truth or the predictions)."""
    cm = confusion_table(result)
    tp = np.diag(cm.to_numpy()).astype(np.float64)
    support = cm.sum(axis=1).to_numpy(np.float64)
    predicted = cm.sum(axis=0).to_numpy(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
    return pd.DataFrame(
        {
            "label": cm.index,
            "support": support.astype(np.int64),
            "predicted": predicted.astype(np.int64),
            "correct": tp.astype(np.int64),
            "precision": precision,
            "recall": recall,
            "f1": [result.per_class_f1.get(label, np.nan) for label in cm.index],
            "in_macro": [label in result.per_class_f1 for label in cm.index],
        }
    )


def per_source_table(result: ScoreResult, sources: pd.Series) -> pd.DataFrame:
    """Score, mean rescaled GIoU and macro-F1 over the truth boxes of each acquisition source (the score's rules on
    that subset: its macro average runs over the labels of that subset's truth and predictions). Truth images
    missing from ``sources`` form the source ``"unknown"`` (and are counted in the log)."""
    m = result.matched
    src = m["NAME"].map(sources)
    unknown = src.isna()
    if unknown.any():
        log.warning(
            "%d truth image(s) have no source in sources.csv: grouped as %r",
            m.loc[unknown, "NAME"].nunique(),
            UNKNOWN_SOURCE,
        )
    src = src.fillna(UNKNOWN_SOURCE).astype(str)
    rows = []
    for name, part in m.groupby(src.to_numpy(), sort=True):
        f1 = macro_f1(part["class"].to_numpy(), part["pred_class"].to_numpy())[0]
        giou = float(part["giou_rescaled"].mean())
        rows.append(
            {
                "source": name,
                "n_images": int(part["NAME"].nunique()),
                "n_boxes": len(part),
                "score": GIOU_WEIGHT * giou + F1_WEIGHT * f1,
                "giou": giou,
                "f1": f1,
                "accuracy": float((part["class"] == part["pred_class"]).mean()),
            }
        )
    return pd.DataFrame(rows, columns=["source", "n_images", "n_boxes", "score", "giou", "f1", "accuracy"])


def worst_errors(result: ScoreResult, pred: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` worst truth boxes: misclassified and/or badly localised (GIoU < :data:`BAD_GIOU` or no prediction),
    worst first -- a wrong class counts 1, plus ``1 - rescaled GIoU``. Columns: the truth box and class, the
    prediction it took (``p_x1..p_y2``, NaN when none), pred_class, giou, giou_rescaled, kind."""
    m = result.matched.copy()
    wrong = (m["class"] != m["pred_class"]).to_numpy()
    giou = m["giou"].to_numpy(np.float64)
    bad_box = ~(giou >= BAD_GIOU)  # NaN (no prediction) counts as bad
    m["badness"] = wrong.astype(np.float64) + (1.0 - m["giou_rescaled"].to_numpy(np.float64))
    m["kind"] = np.select([wrong & bad_box, wrong, bad_box], ["class+box", "class", "box"], "")
    errors = m[wrong | bad_box].sort_values(["badness", "trustii_id"], ascending=[False, True], kind="stable").head(n)
    rows = errors["pred_row"].to_numpy(np.int64)
    pbox = np.full((len(errors), 4), np.nan)
    has = rows >= 0
    if has.any():
        pbox[has] = np.column_stack(
            [pd.to_numeric(pred[c], errors="coerce").to_numpy(np.float64)[rows[has]] for c in BOX_COLUMNS]
        )
    out = errors[["trustii_id", "NAME", "class", "pred_class", "giou", "giou_rescaled", "kind"]].reset_index(drop=True)
    for j, c in enumerate(BOX_COLUMNS):
        out[f"p_{c}"] = pbox[:, j]
    return out


# ---------------------------------------------------------------------------------------------------- pictures
def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=DPI, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def plot_confusion(cm: pd.DataFrame, path: Path, title: str = "Confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true, columns: predicted), counts annotated where non-zero; a row of a
    label without truth boxes is grey."""
    from matplotlib import colormaps

    counts = cm.to_numpy(np.int64)
    support = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(support > 0, counts / np.maximum(support, 1), np.nan)
    k = len(cm)
    fig = _figure(0.42 * k + 2.6, 0.42 * k + 1.6)
    ax = fig.add_subplot(1, 1, 1)
    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")  # grey: a row without truth boxes
    image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(k), labels=[str(c) for c in cm.columns], rotation=90, fontsize=8)
    ax.set_yticks(range(k), labels=[f"{c} ({int(s)})" for c, s in zip(cm.index, support[:, 0])], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (truth boxes)")
    ax.set_title(f"{title} -- colour: share of the true class's boxes; numbers: counts", fontsize=10)
    ax.set_xticks(np.arange(-0.5, k, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, k, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.6)
    ax.tick_params(which="minor", length=0)
    for i, j in zip(*np.nonzero(counts)):
        dark = share[i, j] > 0.55
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color="white" if dark else "black")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02, label="row share")
    return _save(fig, path)


def plot_per_class(table: pd.DataFrame, path: Path, macro: float) -> Path:
    """Horizontal bars of F1 per label (labels of the macro average coloured, the others grey), F1 and support
    written at the bar end."""
    k = len(table)
    fig = _figure(8.0, 0.3 * k + 1.4)
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(k)
    f1 = table["f1"].fillna(0.0).to_numpy(np.float64)
    colours = np.where(table["in_macro"].to_numpy(bool), "#3b75af", "#bbbbbb")
    ax.barh(y, f1, color=colours)
    ax.set_yticks(y, labels=[f"{lab} (n={s})" for lab, s in zip(table["label"], table["support"])], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.axvline(macro, color="#d62728", linestyle="--", linewidth=1)
    ax.text(
        macro,
        1.005,
        f"macro-F1 {macro:.3f}",
        color="#d62728",
        fontsize=8,
        ha="center",
        va="bottom",
        transform=ax.get_xaxis_transform(),
    )
    for yi, v, inm in zip(y, table["f1"], table["in_macro"]):
        ax.text((0.0 if np.isnan(v) else v) + 0.01, yi, "absent" if not inm else f"{v:.2f}", va="center", fontsize=7)
    ax.set_xlabel("F1 (grey: label absent from truth and predictions, not in the macro average)")
    ax.set_title("F1 per class (n = truth boxes)", fontsize=10, pad=16)
    return _save(fig, path)


def plot_grouped_bars(
    table: pd.DataFrame, key: str, path: Path, title: str, metrics: Sequence[str] = ("score", "giou", "f1")
) -> Path:
    """Grouped bars of ``metrics`` per row of ``table`` (named by column ``key``), values written on the bars."""
    n, m = len(table), len(metrics)
    fig = _figure(max(5.0, 0.9 * n * m / 2 + 2.5), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / m
    x = np.arange(n)
    colours = ("#3b75af", "#ef8636", "#519e3e", "#c53a32")
    for j, metric in enumerate(metrics):
        values = table[metric].to_numpy(np.float64)
        bars = ax.bar(x + (j - (m - 1) / 2) * width, values, width, label=metric, color=colours[j % len(colours)])
        for bar, v in zip(bars, values):
            ax.text(
                bar.get_x() + bar.get_width() / 2,
                v + 0.01,
                f"{v:.3f}",
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if n * m > 12 else 0,
            )
    labels = [str(v) for v in table[key]]
    if "n_boxes" in table.columns:
        labels = [f"{lab}\n(n={b})" for lab, b in zip(labels, table["n_boxes"])]
    ax.set_xticks(x, labels=labels, fontsize=8)
    ax.set_ylim(0, 1.15)
    ax.legend(fontsize=8, ncols=m, loc="upper right")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _crop_window(box: np.ndarray, pbox: np.ndarray, w: int, h: int) -> tuple[int, int, int, int]:
    """Union of the truth box and the predicted box (when finite), plus :data:`GALLERY_MARGIN`, inside the image."""
    boxes = [box] + ([pbox] if np.isfinite(pbox).all() else [])
    b = np.array(boxes, np.float64)
    x1, y1 = np.floor(b[:, :2].min(axis=0) - GALLERY_MARGIN)
    x2, y2 = np.ceil(b[:, 2:].max(axis=0) + GALLERY_MARGIN)
    x1, y1 = int(max(x1, 0)), int(max(y1, 0))
    x2, y2 = int(min(x2, w)), int(min(y2, h))
    if x2 <= x1 or y2 <= y1:  # the boxes lie outside the image: show the whole image
        return 0, 0, w, h
    return x1, y1, x2, y2


def plot_gallery(errors: pd.DataFrame, truth: pd.DataFrame, image_dir: Path, path: Path) -> tuple[Path, list[bool]]:
    """A grid of crops, one per row of ``errors`` (:func:`worst_errors`): the truth box in green, the prediction it
    took in red, true vs predicted class and GIoU above. Returns the path and, per error, whether it is shown (an
    unreadable image is skipped, logged and counted)."""
    from matplotlib.patches import Rectangle

    from cytologia.data.images import decode

    truth_box = truth.set_index("trustii_id")[list(BOX_COLUMNS)]
    crops, shown = [], []
    for row in errors.to_dict("records"):
        try:
            image = decode(image_dir / row["NAME"])[..., ::-1]  # BGR -> RGB
        except CytologiaInputError as err:
            log.warning("gallery: %s", err)
            shown.append(False)
            continue
        box = truth_box.loc[row["trustii_id"]].to_numpy(np.float64)
        pbox = np.array([row[f"p_{c}"] for c in BOX_COLUMNS], np.float64)
        x1, y1, x2, y2 = _crop_window(box, pbox, image.shape[1], image.shape[0])
        crops.append((row, image[y1:y2, x1:x2], box - [x1, y1, x1, y1], pbox - [x1, y1, x1, y1]))
        shown.append(True)
    if not all(shown):
        log.warning(
            "gallery: %d of %d error image(s) could not be read and are left out", shown.count(False), len(shown)
        )
    n = max(len(crops), 1)
    cols = min(GALLERY_COLUMNS, n)
    rows = int(np.ceil(n / cols))
    fig = _figure(2.3 * cols, 2.75 * rows + 0.5)
    fig.set_layout_engine("constrained")
    fig.suptitle(
        "Worst errors -- green: truth box, red: predicted box (T true / P predicted class; GIoU of the pair)",
        fontsize=10,
    )
    if not crops:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified or badly localised box", ha="center", va="center")
    for k, (row, crop, tb, pb) in enumerate(crops):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.imshow(crop, interpolation="bilinear")
        ax.add_patch(
            Rectangle((tb[0], tb[1]), tb[2] - tb[0], tb[3] - tb[1], fill=False, edgecolor=TRUTH_COLOUR, linewidth=2)
        )
        if np.isfinite(pb).all():
            ax.add_patch(
                Rectangle(
                    (pb[0], pb[1]),
                    pb[2] - pb[0],
                    pb[3] - pb[1],
                    fill=False,
                    edgecolor=PRED_COLOUR,
                    linewidth=1.6,
                    linestyle="--",
                )
            )
        giou = "no prediction" if not np.isfinite(row["giou"]) else f"GIoU {row['giou']:.2f}"
        wrong = row["class"] != row["pred_class"]
        ax.set_title(
            f"T {row['class']} / P {row['pred_class']}\n{giou}  {row['NAME'][:14]}",
            fontsize=7.5,
            color="#b00000" if wrong else "black",
        )
        ax.set_xlim(0, crop.shape[1])
        ax.set_ylim(crop.shape[0], 0)
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path), shown


# ------------------------------------------------------------------------------------------------------ writing
def _write_csv(table: pd.DataFrame, path: Path, index: bool = False) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    table.to_csv(tmp, index=index, float_format="%.6g")
    os.replace(tmp, path)
    return path


def _config_yaml(config: Any) -> str:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_yaml(config, resolve=True)
    import yaml

    if isinstance(config, (str, Path)) and Path(config).is_file():
        return Path(config).read_text()
    if isinstance(config, Mapping):
        return yaml.safe_dump(json.loads(json.dumps(config, default=str)), sort_keys=False)
    raise CytologiaInputError(f"config must be a DictConfig, a mapping or a YAML file; got {type(config).__name__}")


def fold_counts(folds: pd.DataFrame, train: pd.DataFrame | None) -> pd.DataFrame:
    """Per fold: images, and with the annotations (``NAME, class``) boxes and boxes per class."""
    _require(folds, ("NAME", "fold"), "folds table")
    fold = pd.to_numeric(folds["fold"], errors="coerce")
    bad = np.flatnonzero(fold.isna().to_numpy() | (fold != fold.round()).to_numpy())
    if len(bad):
        shown = ", ".join(f"row {i + 1} ({folds['fold'].iat[i]!r})" for i in bad[:10])
        raise CytologiaInputError(f"folds table: {len(bad)} fold value(s) are not integers: {shown}")
    f = folds.assign(NAME=folds["NAME"].astype(str), fold=fold.astype(np.int64))
    out = f.groupby("fold").size().rename("images").to_frame()
    if train is not None:
        _require(train, ("NAME", "class"), "annotations table")
        t = train.assign(NAME=train["NAME"].astype(str)).merge(f[["NAME", "fold"]], on="NAME", how="left")
        lost = t["fold"].isna()
        if lost.any():
            log.warning("%d annotated box(es) belong to images without a fold (counted under fold -1)", int(lost.sum()))
        t["fold"] = t["fold"].fillna(-1).astype(np.int64)
        present = set(t["class"])
        order = [c for c in CLASSES if c in present] + sorted(present - set(CLASSES))
        per = pd.crosstab(t["fold"], t["class"]).reindex(columns=order, fill_value=0)
        out = out.join(t.groupby("fold").size().rename("boxes"), how="outer").join(per, how="outer").fillna(0)
    return out.astype(np.int64).reset_index()


def _cleaning(value: Any) -> tuple[pd.DataFrame | None, dict[str, Any]]:
    """(report rows, counts) from a CleaningResult, a report table, a cleaning_report.csv or a `cytologia clean`
    output folder."""
    if hasattr(value, "report") and hasattr(value, "counts"):
        return value.report, dict(value.counts)
    if isinstance(value, Mapping):
        return None, dict(value)
    if isinstance(value, (str, Path)) and Path(value).is_dir():
        folder = Path(value)
        summary = folder / "cleaning_summary.json"
        counts = json.loads(summary.read_text()).get("counts", {}) if summary.is_file() else {}
        report = folder / "cleaning_report.csv"
        return (_table(report, "cleaning report") if report.is_file() else None), counts
    return _table(value, "cleaning report"), {}


def _cleaning_summary(report: pd.DataFrame | None, counts: Mapping[str, Any]) -> pd.DataFrame:
    rows = [{"what": str(k), "count": v} for k, v in counts.items() if not isinstance(v, (dict, list))]
    if report is not None and len(report):
        _require(report, ("NAME", "flag", "action"), "cleaning report")
        for (flag, action), n in report.groupby(["flag", "action"]).size().items():
            rows.append({"what": f"flag {flag} -> {action}", "count": int(n)})
        rows.append({"what": "images with a flag", "count": int(report["NAME"].nunique())})
    return pd.DataFrame(rows, columns=["what", "count"])


def _html_table(table: pd.DataFrame, floats: str = "{:.4f}", max_rows: int = 60) -> str:
    shown = table.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
    body = []
    for row in shown.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, (float, np.floating)):
                text = "" if np.isnan(v) else floats.format(v)
            else:
                text = str(v)
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p class='note'>first {max_rows} of {len(table)} rows</p>" if len(table) > max_rows else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #ddd}
.note{color:#666;font-size:90%}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""


def write_report(
    out_dir: str | Path,
    truth: pd.DataFrame | str | Path,
    pred: pd.DataFrame | str | Path,
    *,
    sources: pd.DataFrame | str | Path | Mapping[str, str] | None = None,
    image_dir: str | Path | None = None,
    folds: pd.DataFrame | str | Path | None = None,
    train: pd.DataFrame | str | Path | None = None,
    cleaning_report: Any = None,
    stage_times: Mapping[str, float] | None = None,
    config: Any = None,
    extra_scores: Mapping[str, ScoreResult | Mapping[str, float]] | None = None,
    name: str = "this run",
    title: str = "cytologia report",
    n_gallery: int = 24,
    calibration: Mapping[str, Any] | None = None,
    calibrated: pd.DataFrame | str | Path | None = None,
    counts: str | Path | None = None,
) -> Path:
    """Score ``pred`` against ``truth`` (both ``trustii_id,NAME,x1,y1,x2,y2,class``; tables or CSV paths) and write
    the report folder ``out_dir`` (see the module docstring); returns the path of its ``index.html``.

    Optional parts, each written only when given: ``sources`` (NAME -> acquisition source: ``sources.csv`` of a
    generated set, a table or a mapping), ``image_dir`` (for the error gallery), ``folds`` (``NAME,fold``) with
    ``train`` (annotations ``NAME,class``, for per-fold class counts), ``cleaning_report`` (a CleaningResult, its
    report table or CSV, or a `cytologia clean` output folder), ``stage_times`` (stage -> seconds), ``config`` (a
    DictConfig, mapping or YAML file), ``extra_scores`` (name -> ScoreResult or {score, giou, f1}: other results on
    the same truth, shown side by side with this one as ``name``), ``calibration`` (the tuning report's
    ``calibration`` part: reliability diagram, risk-coverage curve) with ``calibrated`` (the per-box calibrated
    output of ``pred``: the same measured on this truth), ``counts`` (a ``cytologia count`` folder: per-smear counts;
    :mod:`cytologia.lab_report`).
    """
    # every input is read and checked before anything is drawn or written
    truth_t = _table(truth, "truth")
    pred_t = _table(pred, "predictions")
    result = score(truth_t, pred_t)
    source_of = _sources(sources) if sources is not None else None
    extras = {str(k): _score_summary(v, str(k)) for k, v in (extra_scores or {}).items()}
    if name in extras:  # the run itself listed among the others: one bar, and it must be the same result
        own = extras.pop(name)
        if abs(own["score"] - result.score) > 1e-9:
            raise CytologiaInputError(
                f"extra score {name!r} ({own['score']:.6f}) has the report's own name but not its score "
                f"({result.score:.6f}): rename one of them"
            )
    folds_t = _table(folds, "folds") if folds is not None else None
    train_t = _table(train, "annotations") if folds is not None and train is not None else None
    counts_t = fold_counts(folds_t, train_t) if folds_t is not None else None
    cleaning = _cleaning(cleaning_report) if cleaning_report is not None else None
    cleaning_t = _cleaning_summary(*cleaning) if cleaning is not None else None
    config_text = _config_yaml(config) if config is not None else None
    if image_dir is not None and not Path(image_dir).is_dir():
        raise CytologiaInputError(f"{image_dir}: no such image folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth_t = truth_t.assign(trustii_id=pd.to_numeric(truth_t["trustii_id"]))
    for c in BOX_COLUMNS:
        truth_t[c] = pd.to_numeric(truth_t[c])
    files: dict[str, str] = {}
    sections: list[str] = []

    def link(key: str, path: Path) -> str:
        files[key] = path.name
        return f"<a href='{html.escape(path.name)}'>{html.escape(path.name)}</a>"

    (out / "score.json").write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    link("score", out / "score.json")

    # --- summary and comparison
    summary = pd.DataFrame(
        [
            ("score", result.score),
            ("mean rescaled GIoU", result.giou),
            ("macro-F1", result.f1),
            ("truth boxes", result.n_truth),
            ("truth images", result.n_images),
            ("images without a prediction", result.n_images_without_prediction),
            ("labels in the macro average", len(result.labels)),
            ("prediction rows (kept)", f"{result.n_pred_rows} ({result.n_pred_kept})"),
        ],
        columns=["", name],
    )
    parts = [
        f"<h2>Summary</h2>{_html_table(summary)}<p>score = {GIOU_WEIGHT} x GIoU + {F1_WEIGHT} x macro-F1; "
        f"details in {link('score', out / 'score.json')}</p>"
    ]
    if extras:
        rows = [{"approach": name, **_score_summary(result, name)}] + [{"approach": k, **v} for k, v in extras.items()]
        comparison = pd.DataFrame(rows, columns=["approach", "score", "giou", "f1"])
        c_csv = _write_csv(comparison, out / "comparison.csv")
        c_png = plot_grouped_bars(comparison, "approach", out / "comparison.png", "Approaches on the same truth")
        parts.append(
            f"<h3>Side by side</h3>{_html_table(comparison)}<p>{link('comparison_csv', c_csv)}</p>"
            f"<img src='{html.escape(c_png.name)}' alt='comparison'>"
        )
        files["comparison_png"] = c_png.name
    if stage_times:
        times = pd.DataFrame(
            {"stage": [str(k) for k in stage_times], "seconds": [float(v) for v in stage_times.values()]}
        )
        times = pd.concat([times, pd.DataFrame({"stage": ["total"], "seconds": [times["seconds"].sum()]})])
        times["minutes"] = times["seconds"] / 60.0
        t_csv = _write_csv(times, out / "stage_times.csv")
        parts.append(f"<h3>Time per stage</h3>{_html_table(times, '{:.1f}')}<p>{link('stage_times', t_csv)}</p>")
    sections.append("".join(parts))

    # --- per class, confusion
    per_class = per_class_table(result)
    pc_csv = _write_csv(per_class, out / "per_class_f1.csv")
    pc_png = plot_per_class(per_class, out / "per_class_f1.png", result.f1)
    cm = confusion_table(result)
    cm_csv = _write_csv(cm, out / "confusion.csv", index=True)
    cm_png = plot_confusion(cm, out / "confusion.png")
    files.update(per_class_png=pc_png.name, confusion_png=cm_png.name)
    sections.append(
        f"<h2>Per class</h2><p>{link('per_class_csv', pc_csv)}</p><img src='{pc_png.name}' alt='per-class F1'>"
        f"<h2>Confusion matrix</h2><p>rows: true class, columns: predicted class; {link('confusion_csv', cm_csv)}"
        f"</p><img src='{cm_png.name}' alt='confusion matrix'>"
    )

    # --- per source
    if source_of is not None:
        per_source = per_source_table(result, source_of)
        ps_csv = _write_csv(per_source, out / "per_source.csv")
        ps_png = plot_grouped_bars(per_source, "source", out / "per_source.png", "Per acquisition source")
        files["per_source_png"] = ps_png.name
        sections.append(
            f"<h2>Per acquisition source</h2><p class='note'>each source scored alone by the challenge's rules: its "
            "macro-F1 averages over the labels of that source's truth and predictions, so a small source with many "
            f"classes scores low F1 even at a fair accuracy</p>{_html_table(per_source)}"
            f"<p>{link('per_source_csv', ps_csv)}</p>"
            f"<img src='{ps_png.name}' alt='per-source scores'>"
        )

    # --- errors
    errors = worst_errors(result, pred_t, n_gallery)
    text = (
        f"{int((result.matched['class'] != result.matched['pred_class']).sum())} misclassified and "
        f"{int((~(result.matched['giou'] >= BAD_GIOU)).sum())} badly localised (GIoU &lt; {BAD_GIOU}) of "
        f"{result.n_truth} truth boxes; the {len(errors)} worst:"
    )
    if image_dir is not None:
        g_png, shown = plot_gallery(errors, truth_t, Path(image_dir), out / "errors.png")
        errors["shown"] = shown
        files["errors_png"] = g_png.name
        gallery = f"<img src='{g_png.name}' alt='error gallery'>"
    else:
        gallery = "<p class='note'>no image folder given: no gallery</p>"
    e_csv = _write_csv(errors, out / "errors.csv")
    sections.append(f"<h2>Worst errors</h2><p>{text} {link('errors_csv', e_csv)}</p>{gallery}")

    # --- calibration, referral and differential counts (cytologia.lab_report)
    if calibration is not None or counts is not None:
        from cytologia.calibration import evaluate_calibrated, read_calibrated
        from cytologia.ensemble import CalibrationSpec, RejectSpec
        from cytologia.lab_report import lab_sections

        test_eval = None
        if calibration is not None and calibrated is not None:
            rule = calibration["reject"]
            spec = CalibrationSpec(
                calibration["temperature"], reject=RejectSpec(rule["chosen"], rule["threshold"], rule["target_error"])
            )
            cal_t = calibrated if isinstance(calibrated, pd.DataFrame) else read_calibrated(calibrated)
            test_eval = evaluate_calibrated(cal_t, pred_t, truth_t, spec)
            (out / "calibration_test.json").write_text(json.dumps(test_eval, indent=1) + "\n")
        sections.append(lab_sections(out, calibration, test_eval, counts, link))

    # --- data: folds, cleaning, config
    data_parts = []
    if folds_t is not None and counts_t is not None:
        f_csv = _write_csv(folds_t[["NAME", "fold"]], out / "folds.csv")
        fc_csv = _write_csv(counts_t, out / "fold_counts.csv")
        shown_cols = [c for c in ("fold", "images", "boxes") if c in counts_t.columns]
        data_parts.append(
            f"<h3>Folds</h3>{_html_table(counts_t[shown_cols])}<p>{link('folds', f_csv)}, per-class counts: "
            f"{link('fold_counts', fc_csv)}</p>"
        )
    if cleaning is not None and cleaning_t is not None:
        cs_csv = _write_csv(cleaning_t, out / "cleaning_summary.csv")
        extra = ""
        if cleaning[0] is not None:
            extra = ", rows: " + link("cleaning_report", _write_csv(cleaning[0], out / "cleaning_report.csv"))
        data_parts.append(f"<h3>Cleaning</h3>{_html_table(cleaning_t)}<p>{link('cleaning_summary', cs_csv)}{extra}</p>")
    if config_text is not None:
        cfg_path = out / "config.yaml"
        cfg_path.write_text(config_text)
        data_parts.append(f"<h3>Configuration</h3><p>resolved: {link('config', cfg_path)}</p>")
    if data_parts:
        sections.append("<h2>Data and run</h2>" + "".join(data_parts))

    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(name)}: score <b>{result.score:.4f}</b> (GIoU {result.giou:.4f}, macro-F1 "
        f"{result.f1:.4f}) on {result.n_truth} truth boxes</p>{''.join(sections)}</body></html>\n"
    )
    index = out / "index.html"
    index.write_text(page)
    (out / "files.json").write_text(json.dumps(files, indent=1) + "\n")
    return index
