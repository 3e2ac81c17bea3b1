"""Noisy-box cleaning from out-of-fold detections: reproducible, threshold-driven, no hand-picked lists.

Each training image is predicted by the detector of the fold that did not train on it (out-of-fold boxes). Per image,
truth boxes and detections (score >= ``min_score``) are paired by the assignment that maximises the total GIoU
(Hungarian, :func:`scipy.optimize.linear_sum_assignment`; a plain argmax where one side has a single box); a pair
counts as a *match* when its IoU reaches ``match_iou``. Then, per truth box and per image:

==============  ==================================================================  ==============================
flag            rule                                                                typical cause
==============  ==================================================================  ==============================
``duplicate``   a truth box repeats an earlier box of its image (IoU >= dup_iou)    a row written twice
``unconfirmed`` no match, or the matched detection scores below ``confirm_score``   a red cell boxed, a wrong box
``misplaced``   matched and confirmed, but IoU < ``misplaced_iou``                  a jittered / sloppy box
``unannotated`` a detection with score >= ``unannotated_score`` that overlaps no    a leukocyte left out (often
                truth box (IoU < ``match_iou`` with all)                            cut by the border)
==============  ==================================================================  ==============================

What happens to a flagged box is an *action* per flag (:class:`CleaningConfig`): ``keep`` (only reported),
``drop_box``, ``drop_image`` (every box of the image goes: the 1st place removed flagged images whole), or ``fix``
(misplaced only: the box takes the detection's coordinates). An ``unannotated`` cell has no class, so it cannot be
added: ``drop_image`` or ``keep``.

Boxes are clipped to their image first (when ``img_w``/``img_h`` are known): a box written past the border is a
data-contract quirk fixed by clipping, not a cleaning flag. :func:`evaluate_cleaning` scores the flags against the
synthetic generator's ``noise.csv`` (precision and recall per flag and per defect kind).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.boxes import iou as aligned_iou
from cytologia.boxes import pairwise_iou
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.fusion import IOU_EPS, weighted_box_fusion
from cytologia.detection.oof import validate_boxes
from cytologia.errors import CytologiaInputError, ValidationError
from cytologia.metrics import giou_pairs

log = logging.getLogger(__name__)

DUPLICATE, UNCONFIRMED, MISPLACED, UNANNOTATED = "duplicate", "unconfirmed", "misplaced", "unannotated"
FLAGS: tuple[str, ...] = (DUPLICATE, UNCONFIRMED, MISPLACED, UNANNOTATED)
KEEP, DROP_BOX, DROP_IMAGE, FIX = "keep", "drop_box", "drop_image", "fix"
ACTIONS: dict[str, tuple[str, ...]] = {
    DUPLICATE: (KEEP, DROP_BOX, DROP_IMAGE),
    UNCONFIRMED: (KEEP, DROP_BOX, DROP_IMAGE),
    MISPLACED: (KEEP, DROP_BOX, DROP_IMAGE, FIX),
    UNANNOTATED: (KEEP, DROP_IMAGE),
}
# One row per flag. box_id: the truth box (-1 for an unannotated detection); x1..y2: the truth box (the detection for
# unannotated); det_*: the detection paired with it (NaN when none); iou/giou: of that pair (for an unconfirmed box
# without a pair: its best IoU with any detection, giou NaN); score: the detection's score.
REPORT_COLUMNS: tuple[str, ...] = (
    "NAME",
    "box_id",
    "flag",
    "action",
    "iou",
    "giou",
    "score",
    *BOX_COLUMNS,
    "det_x1",
    "det_y1",
    "det_x2",
    "det_y2",
)
# Which noise.csv kinds each flag is meant to catch (cytologia.data.synthetic.defects). A red cell that replaced a
# leukocyte's box leaves two defects: the box on the red cell (unconfirmed) and the leukocyte now unannotated.
EXPECTED_KINDS: dict[str, tuple[str, ...]] = {
    DUPLICATE: (),
    UNCONFIRMED: ("red_cell_extra", "red_cell_replace"),
    MISPLACED: ("box_jitter",),
    UNANNOTATED: ("unannotated_border", "red_cell_replace"),
}
ROW_KINDS: tuple[str, ...] = ("box_jitter", "red_cell_extra", "red_cell_replace", "past_border")  # a train row
MISSING_KINDS: tuple[str, ...] = ("unannotated_border", "red_cell_replace")  # a cell with no train row
NOT_CLEANING: tuple[str, ...] = (  # handled by data.hygiene (duplicates) and data.images (corrupt files)
    "duplicate_exact",
    "duplicate_reencoded",
    "duplicate_shifted",
    "truncated_jpeg",
    "extraneous_bytes",
)


@dataclass(frozen=True)
class CleaningConfig:
    """Thresholds and actions of :func:`clean_annotations` (``configs/cleaning/default.yaml`` holds the same
    defaults)."""

    min_score: float = 0.05  # detections below this score are ignored altogether
    fusion_iou: float = 0.55  # WBF IoU when the boxes table holds several models (TTA variants) per image
    match_iou: float = 0.3  # IoU at which an assigned (truth, detection) pair is the same cell
    confirm_score: float = 0.3  # a matched detection confirms its truth box from this score on
    misplaced_iou: float = 0.75  # a confirmed truth box whose IoU with its detection is below this is misplaced
    unannotated_score: float = 0.5  # an unmatched detection this confident is an unannotated cell
    duplicate_iou: float = 0.9  # two truth boxes of an image this similar are one box written twice
    unconfirmed_action: str = DROP_IMAGE
    misplaced_action: str = DROP_IMAGE
    unannotated_action: str = DROP_IMAGE
    duplicate_action: str = DROP_BOX

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_action"):
                flag = f.name.removesuffix("_action")
                if value not in ACTIONS[flag]:
                    raise ValueError(f"cleaning {f.name}={value!r} must be one of {', '.join(ACTIONS[flag])}")
            elif not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"cleaning {f.name}={value!r} must be a number in [0, 1]")

    def action(self, flag: str) -> str:
        return str(getattr(self, f"{flag}_action"))

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, object], source: str = "cleaning config") -> CleaningConfig:
        """Build from a mapping (a YAML file, a Hydra node); an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CytologiaInputError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        try:
            return cls(**dict(values))  # type: ignore[arg-type]
        except (TypeError, ValueError) as err:
            raise CytologiaInputError(f"{source}: {err}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> CleaningConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise CytologiaInputError(f"{path}: no such file")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise CytologiaInputError(f"{path}: expected a mapping of cleaning settings")
        return cls.from_mapping(data, str(path))


@dataclass
class CleaningResult:
    """What :func:`clean_annotations` returns: the cleaned table, one report row per flag, and counts."""

    cleaned: pd.DataFrame
    report: pd.DataFrame
    counts: dict[str, int]

    def summary(self) -> str:
        c = self.counts
        flags = ", ".join(f"{f} {c[f]}" for f in FLAGS)
        return (
            f"{c['boxes']} boxes / {c['images']} images -> {c['boxes_kept']} / {c['images_kept']}; flags: {flags}; "
            f"{c['images_flagged']} images flagged, {c['images_dropped']} dropped, {c['boxes_dropped']} boxes "
            f"dropped, {c['boxes_fixed']} fixed; {c['images_without_detection']} images without any detection"
        )


# ----------------------------------------------------------------------------------------------------------------
def _annotations(annotations: pd.DataFrame, source: str) -> pd.DataFrame:
    missing = [c for c in ("NAME", *BOX_COLUMNS) if c not in annotations.columns]
    if missing:
        raise ValidationError(source, [(None, f"missing column(s) {', '.join(missing)}")])
    ann = annotations.reset_index(drop=True).copy()
    ann["NAME"] = ann["NAME"].astype(str)
    if "box_id" not in ann.columns:
        ann["box_id"] = np.arange(len(ann), dtype=np.int64)
    if ann["box_id"].duplicated().any():
        raise ValidationError(source, [(None, "box_id values repeat; they must identify the boxes")])
    xyxy = ann[list(BOX_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = np.flatnonzero(~np.isfinite(xyxy).all(axis=1))
    if len(bad):
        raise ValidationError(source, [(int(i) + 1, "coordinate missing or not a number") for i in bad[:20]], len(bad))
    if {"img_w", "img_h"} <= set(ann.columns):  # clip to the image where its size is known
        w = pd.to_numeric(ann["img_w"], errors="coerce").fillna(-1).to_numpy(np.float64)
        h = pd.to_numeric(ann["img_h"], errors="coerce").fillna(-1).to_numpy(np.float64)
        known = (w > 0) & (h > 0)
        lim = np.stack([w, h, w, h], axis=1)
        xyxy = np.where(known[:, None], np.clip(xyxy, 0.0, np.where(known[:, None], lim, np.inf)), xyxy)
    ann[list(BOX_COLUMNS)] = xyxy
    return ann


def _detections(boxes: pd.DataFrame, cfg: CleaningConfig, source: str) -> pd.DataFrame:
    det = validate_boxes(boxes, source, require_fold=False)
    n_models = det.groupby("NAME")["model"].nunique()
    if len(n_models) and n_models.max() > 1:  # TTA variants / several checkpoints per image: fuse them first
        log.info(
            "%s: several models per image (%s); fusing with WBF (IoU %.2f)",
            source,
            ", ".join(map(str, pd.unique(det["model"])[:6])),
            cfg.fusion_iou,
        )
        det = weighted_box_fusion(det, iou_thr=cfg.fusion_iou, source=source)
    det = det[det["score"].to_numpy() >= cfg.min_score].reset_index(drop=True)
    return det


def _runs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of runs of equal values in a sorted integer array."""
    if len(codes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(codes[1:] != codes[:-1]) + 1
    return np.concatenate([[0], change]), np.concatenate([change, [len(codes)]])


def _duplicates(img: np.ndarray, box_id: np.ndarray, xyxy: np.ndarray, thr: float) -> np.ndarray:
    """Mask of truth boxes that repeat an earlier box (by box_id) of their image with IoU >= thr."""
    dup = np.zeros(len(img), dtype=bool)
    order = np.lexsort((box_id, img))
    starts, ends = _runs(img[order])
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < 2:
            continue
        rows = order[s:e]
        same = pairwise_iou(xyxy[rows], xyxy[rows], eps=IOU_EPS) >= thr
        earlier = np.triu(same, k=1)  # [i, j]: j repeats the earlier i
        dup[rows[earlier.any(axis=0)]] = True
    return dup


def _assign(img: np.ndarray, ti: np.ndarray, di: np.ndarray, giou: np.ndarray) -> np.ndarray:
    """Indices of the (truth, detection) pairs -- parallel arrays -- of the max-total-GIoU one-to-one assignment of
    each image. Where an image has one truth box or one detection this is that box's best partner (vectorised); the
    Hungarian algorithm runs only on images with several of both."""
    from scipy.optimize import linear_sum_assignment

    frame = pd.DataFrame({"img": img, "ti": ti, "di": di})
    nt = frame.groupby("img")["ti"].transform("nunique").to_numpy()
    nd = frame.groupby("img")["di"].transform("nunique").to_numpy()
    simple = (nt == 1) | (nd == 1)
    # best pair per image among the simple ones: sort by image then decreasing GIoU, take the first of each image
    idx = np.flatnonzero(simple)
    idx = idx[np.lexsort((-giou[idx], img[idx]))]
    first = np.ones(len(idx), dtype=bool)
    first[1:] = img[idx][1:] != img[idx][:-1]
    chosen = [idx[first]]
    hard = np.flatnonzero(~simple)
    hard = hard[np.lexsort((di[hard], ti[hard], img[hard]))]
    starts, ends = _runs(img[hard])
    for s, e in zip(starts.tolist(), ends.tolist()):
        block = hard[s:e]
        t_uni, t_loc = np.unique(ti[block], return_inverse=True)
        d_uni, d_loc = np.unique(di[block], return_inverse=True)
        cost = np.full((len(t_uni), len(d_uni)), 10.0)  # GIoU >= -1, so a missing pair (10) never wins
        cost[t_loc, d_loc] = -giou[block]
        where = np.full((len(t_uni), len(d_uni)), -1, np.int64)
        where[t_loc, d_loc] = block
        r, c = linear_sum_assignment(cost)
        picked = where[r, c]
        chosen.append(picked[picked >= 0])
    return np.concatenate(chosen).astype(np.int64)


def clean_annotations(
    annotations: pd.DataFrame,
    boxes: pd.DataFrame,
    config: CleaningConfig | None = None,
    source: str = "boxes",
) -> CleaningResult:
    """Flag and clean training boxes with out-of-fold detections (see the module doc for the rules).

    ``annotations``: ``NAME, x1..y2`` (+ ``class``, ``box_id``, ``img_w``, ``img_h``, ... kept as they are; the
    validated annotations table of :func:`cytologia.data.io.read_annotations`); every image of it is taken to have
    been predicted -- an image without any detection has all its boxes unconfirmed (counted in
    ``images_without_detection``). ``boxes``: a boxes table (``NAME, x1..y2, score, model``; several models per image
    are fused first). Returns the cleaned annotations (same columns; ``fixes`` gains ``moved`` where a misplaced box
    was fixed), the report (:data:`REPORT_COLUMNS`) and counts.
    """
    cfg = config or CleaningConfig()
    ann = _annotations(annotations, "annotations")
    det = _detections(boxes, cfg, source)
    det = det[det["NAME"].isin(set(ann["NAME"]))].reset_index(drop=True)
    t_xyxy = ann[list(BOX_COLUMNS)].to_numpy(np.float64)
    d_xyxy = det[list(BOX_COLUMNS)].to_numpy(np.float64)
    d_score = det["score"].to_numpy(np.float64)

    # image codes shared by both tables
    codes, _ = pd.factorize(pd.concat([ann["NAME"], det["NAME"]], ignore_index=True))
    t_img, d_img = codes[: len(ann)], codes[len(ann) :]
    dup = _duplicates(t_img, ann["box_id"].to_numpy(), t_xyxy, cfg.duplicate_iou)
    # every (truth, detection) pair of an image, duplicates left out
    left = pd.DataFrame({"img": t_img[~dup], "ti": np.flatnonzero(~dup)})
    right = pd.DataFrame({"img": d_img, "di": np.arange(len(det))})
    pairs = left.merge(right, on="img", how="inner")
    ti, di = pairs["ti"].to_numpy(), pairs["di"].to_numpy()
    pairs["giou"] = giou_pairs(t_xyxy[ti], d_xyxy[di])
    pairs["iou"] = aligned_iou(t_xyxy[ti], d_xyxy[di], eps=IOU_EPS)
    chosen = pairs.iloc[_assign(pairs["img"].to_numpy(), ti, di, pairs["giou"].to_numpy())] if len(pairs) else pairs
    chosen = chosen[chosen["iou"].to_numpy() >= cfg.match_iou]

    n = len(ann)
    match_d = np.full(n, -1, np.int64)
    match_iou = np.full(n, np.nan)
    match_giou = np.full(n, np.nan)
    match_d[chosen["ti"].to_numpy()] = chosen["di"].to_numpy()
    match_iou[chosen["ti"].to_numpy()] = chosen["iou"].to_numpy()
    match_giou[chosen["ti"].to_numpy()] = chosen["giou"].to_numpy()
    best_iou = pairs.groupby("ti")["iou"].max().reindex(np.arange(n)).to_numpy() if len(pairs) else np.full(n, np.nan)
    best_di = (
        pairs.loc[pairs.groupby("ti")["iou"].idxmax()].set_index("ti")["di"].reindex(np.arange(n)).to_numpy()
        if len(pairs)
        else np.full(n, np.nan)
    )
    matched = match_d >= 0
    m_score = np.where(matched, d_score[np.maximum(match_d, 0)] if len(det) else np.nan, np.nan)

    unconfirmed = ~dup & (~matched | (m_score < cfg.confirm_score))
    misplaced = ~dup & matched & ~unconfirmed & (match_iou < cfg.misplaced_iou)
    # detections that overlap no truth box (duplicates included) and are confident: an unannotated cell
    d_best = np.zeros(len(det))
    if len(det):
        all_pairs = pd.DataFrame({"img": t_img, "ti": np.arange(n)}).merge(right, on="img", how="inner")
        if len(all_pairs):
            iou_all = aligned_iou(t_xyxy[all_pairs["ti"].to_numpy()], d_xyxy[all_pairs["di"].to_numpy()], eps=IOU_EPS)
            d_best = pd.Series(iou_all).groupby(all_pairs["di"].to_numpy()).max().reindex(np.arange(len(det)))
            d_best = d_best.fillna(0.0).to_numpy()
    d_matched = np.zeros(len(det), dtype=bool)
    d_matched[match_d[matched]] = True
    unannotated = ~d_matched & (d_best < cfg.match_iou) & (d_score >= cfg.unannotated_score)

    # ---- report
    parts = []

    def truth_rows(mask: np.ndarray, flag: str, iou: np.ndarray, giou: np.ndarray, det_idx: np.ndarray) -> None:
        if not mask.any():
            return
        idx = np.flatnonzero(mask)
        dj = det_idx[idx]
        has = np.isfinite(dj) & (dj >= 0)
        dj_i = np.where(has, dj, 0).astype(np.int64)
        frame = pd.DataFrame(
            {
                "NAME": ann["NAME"].to_numpy()[idx],
                "box_id": ann["box_id"].to_numpy()[idx],
                "flag": flag,
                "action": cfg.action(flag),
                "iou": iou[idx],
                "giou": giou[idx],
                "score": np.where(has, d_score[dj_i] if len(det) else np.nan, np.nan),
                **{c: t_xyxy[idx, k] for k, c in enumerate(BOX_COLUMNS)},
                **{
                    f"det_{c}": np.where(has, d_xyxy[dj_i, k] if len(det) else np.nan, np.nan)
                    for k, c in enumerate(BOX_COLUMNS)
                },
            }
        )
        parts.append(frame)

    nan = np.full(n, np.nan)
    truth_rows(dup, DUPLICATE, nan, nan, np.full(n, -1.0))
    unc_det = np.where(matched, match_d, best_di).astype(np.float64)
    unc_iou = np.where(matched, match_iou, best_iou)
    truth_rows(unconfirmed, UNCONFIRMED, unc_iou, np.where(matched, match_giou, np.nan), unc_det)
    truth_rows(misplaced, MISPLACED, match_iou, match_giou, match_d.astype(np.float64))
    if unannotated.any():
        k = np.flatnonzero(unannotated)
        parts.append(
            pd.DataFrame(
                {
                    "NAME": det["NAME"].to_numpy()[k],
                    "box_id": -1,
                    "flag": UNANNOTATED,
                    "action": cfg.unannotated_action,
                    "iou": d_best[k],
                    "giou": np.nan,
                    "score": d_score[k],
                    **{c: d_xyxy[k, j] for j, c in enumerate(BOX_COLUMNS)},
                    **{f"det_{c}": d_xyxy[k, j] for j, c in enumerate(BOX_COLUMNS)},
                }
            )
        )
    report = (
        pd.concat(parts, ignore_index=True)[list(REPORT_COLUMNS)]
        if parts
        else pd.DataFrame(
            {c: pd.Series(dtype=object if c in ("NAME", "flag", "action") else float) for c in REPORT_COLUMNS}
        )
    )
    report["box_id"] = report["box_id"].astype(np.int64)
    report = report.sort_values(["NAME", "box_id", "flag"], kind="stable").reset_index(drop=True)

    # ---- actions
    drop_images = set(report.loc[report["action"] == DROP_IMAGE, "NAME"])
    drop_boxes = set(report.loc[report["action"] == DROP_BOX, "box_id"])
    fix = report[(report["action"] == FIX) & (report["flag"] == MISPLACED)]
    cleaned = annotations.reset_index(drop=True).copy()
    cleaned[list(BOX_COLUMNS)] = t_xyxy  # clipped
    if len(fix):
        pos = pd.Series(np.arange(n), index=ann["box_id"].to_numpy()).reindex(fix["box_id"]).to_numpy()
        cleaned.loc[pos, list(BOX_COLUMNS)] = fix[["det_x1", "det_y1", "det_x2", "det_y2"]].to_numpy()
        if "fixes" in cleaned.columns:
            old = cleaned.loc[pos, "fixes"].fillna("").astype(str)
            cleaned.loc[pos, "fixes"] = np.where(old == "", "moved", old + ";moved")
    keep = ~ann["NAME"].isin(drop_images).to_numpy() & ~ann["box_id"].isin(drop_boxes).to_numpy()
    cleaned = cleaned[keep].reset_index(drop=True)

    images = ann["NAME"].nunique()
    counts = {
        "boxes": n,
        "images": int(images),
        **{f: int((report["flag"] == f).sum()) for f in FLAGS},
        "images_flagged": int(report["NAME"].nunique()),
        "images_dropped": len(drop_images),
        "boxes_dropped": int((~keep).sum()),
        "boxes_fixed": len(fix),
        "boxes_kept": len(cleaned),
        "images_kept": int(cleaned["NAME"].nunique()),
        "images_without_detection": int(images - det["NAME"].nunique()),
        "detections": len(det),
    }
    if images and counts["images_without_detection"] > 0.2 * images:
        log.warning(
            "%s: %d of %d training images have no detection at all -- is it the out-of-fold table of this data set?",
            source,
            counts["images_without_detection"],
            images,
        )
    return CleaningResult(cleaned=cleaned, report=report, counts=counts)


# ----------------------------------------------------------------------------------------------------------------
# evaluation against the synthetic generator's noise.csv


def _noise_table(noise: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("NAME", "kind", "train_row", *BOX_COLUMNS) if c not in noise.columns]
    if missing:
        raise ValidationError("noise.csv", [(None, f"missing column(s) {', '.join(missing)}")])
    out = noise.copy()
    if "split" in out.columns:
        out = out[out["split"].astype(str) == "train"]
    out["NAME"] = out["NAME"].astype(str)
    out["train_row"] = pd.to_numeric(out["train_row"], errors="coerce").fillna(-1).astype(np.int64)
    for c in BOX_COLUMNS:
        out[c] = pd.to_numeric(out[c], errors="coerce")
    return out.reset_index(drop=True)


def _red_cell_box(details: str) -> tuple[float, float, float, float] | None:
    """The ``red_cell=x1 y1 x2 y2`` box of a red_cell_replace row's details."""
    for part in str(details).split(";"):
        part = part.strip()
        if part.startswith("red_cell="):
            values = part.removeprefix("red_cell=").split()
            if len(values) == 4:
                return tuple(float(v) for v in values)  # type: ignore[return-value]
    return None


def clean_truth(annotations: pd.DataFrame, noise: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The clean training truth of a generated set, undoing the box defects listed in ``noise.csv``.

    ``annotations`` is the training table as read (``box_id`` = 0-based data row of train.csv; clipped boxes), as
    :func:`cytologia.data.io.read_annotations` returns it. Jittered and past-border boxes get their clean box back,
    a row added on a red cell is removed, a row moved onto a red cell gets its leukocyte back, and unannotated border
    leukocytes are added (``box_id`` -1). Returns ``(truth, red_cells)``: truth ``NAME, box_id, x1..y2, class,
    defect`` (the kind undone, "" for clean rows) and the boxed red cells ``NAME, x1..y2``.
    """
    ann = _annotations(annotations, "annotations")
    nz = _noise_table(noise)
    truth = ann[["NAME", "box_id", *BOX_COLUMNS, *(["class"] if "class" in ann.columns else [])]].copy()
    truth["defect"] = ""
    pos = pd.Series(np.arange(len(truth)), index=truth["box_id"].to_numpy())
    rows = nz[nz["kind"].isin(ROW_KINDS) & (nz["train_row"] >= 1)]
    at = pos.reindex(rows["train_row"].to_numpy() - 1).to_numpy()
    lost = np.isnan(at)
    if lost.any():
        log.warning("clean_truth: %d noise row(s) refer to train rows not in the annotations", int(lost.sum()))
    rows, at = rows[~lost], at[~lost].astype(np.int64)
    drop = np.zeros(len(truth), dtype=bool)
    red = []
    for (_, r), i in zip(rows.iterrows(), at):
        kind = r["kind"]
        truth.iat[i, truth.columns.get_loc("defect")] = kind
        if kind == "red_cell_extra":
            drop[i] = True
            red.append((r["NAME"], *(r[c] for c in BOX_COLUMNS)))
        else:
            truth.iloc[i, [truth.columns.get_loc(c) for c in BOX_COLUMNS]] = [r[c] for c in BOX_COLUMNS]
            if kind == "red_cell_replace":
                box = _red_cell_box(r.get("details", ""))
                if box is not None:
                    red.append((r["NAME"], *box))
    extra = nz[nz["kind"] == "unannotated_border"]
    added = pd.DataFrame(
        {"NAME": extra["NAME"].to_numpy(), "box_id": -1, **{c: extra[c].to_numpy(np.float64) for c in BOX_COLUMNS}}
    )
    if "class" in truth.columns:
        added["class"] = extra["class"].to_numpy() if "class" in extra.columns else ""
    added["defect"] = "unannotated_border"
    truth = pd.concat([truth[~drop], added], ignore_index=True)
    red_cells = pd.DataFrame(red, columns=["NAME", *BOX_COLUMNS])
    return truth, red_cells


def evaluate_cleaning(report: pd.DataFrame, noise: pd.DataFrame, cell_iou: float = 0.5) -> pd.DataFrame:
    """Precision and recall of the cleaning flags against ``noise.csv`` (training rows only).

    Rows (``scope``, ``name``):

    - ``flag``: each flag against the defect kinds it is meant to catch (:data:`EXPECTED_KINDS`); ``precision_any``
      counts a flag on a box with *any* defect as right (a badly jittered box flagged unconfirmed is still a bad box).
      An ``unannotated`` flag is right when its detection overlaps a missed leukocyte (``unannotated_border`` or the
      cell a ``red_cell_replace`` row should box) with IoU >= ``cell_iou`` (one flag per cell).
    - ``kind``: each defect kind, recall by any flag (``n_flagged`` = defects flagged). ``past_border`` boxes are
      fixed by clipping and should *not* be flagged: their recall is the false-flag rate.
    - ``image``: images with a box defect or a missed cell vs images with any flag.
    """
    nz = _noise_table(noise)
    rep = report.copy()
    rep["NAME"] = rep["NAME"].astype(str)
    row_nz = nz[nz["kind"].isin(ROW_KINDS) & (nz["train_row"] >= 1)].assign(box_id=lambda f: f["train_row"] - 1)
    defect_ids = set(row_nz.loc[row_nz["kind"] != "past_border", "box_id"])
    ids_of = {k: set(row_nz.loc[row_nz["kind"] == k, "box_id"]) for k in ROW_KINDS}
    on_rows = rep[rep["box_id"] >= 0]
    out = []

    def add(scope: str, name: str, n_true: int, n_flagged: int, tp: int, tp_any: int | None = None) -> None:
        per_flag = scope != "kind"  # a kind row has a recall only: what flagged its defects is any flag
        out.append(
            {
                "scope": scope,
                "name": name,
                "n_true": n_true,
                "n_flagged": n_flagged,
                "tp": tp,
                "precision": tp / n_flagged if n_flagged and per_flag else np.nan,
                "recall": tp / n_true if n_true else np.nan,
                "precision_any": (tp if tp_any is None else tp_any) / n_flagged if n_flagged and per_flag else np.nan,
            }
        )

    for flag in (DUPLICATE, UNCONFIRMED, MISPLACED):
        flagged = set(on_rows.loc[on_rows["flag"] == flag, "box_id"])
        true = set().union(*(ids_of[k] for k in EXPECTED_KINDS[flag] if k in ids_of))
        add("flag", flag, len(true), len(flagged), len(flagged & true), len(flagged & defect_ids))

    # unannotated flags vs missed cells, one-to-one per image by IoU
    cells = nz[nz["kind"].isin(MISSING_KINDS)].dropna(subset=list(BOX_COLUMNS)).reset_index(drop=True)
    flags = rep[rep["flag"] == UNANNOTATED].reset_index(drop=True)
    found = np.zeros(len(cells), dtype=bool)
    hit = np.zeros(len(flags), dtype=bool)
    for name, f_idx in flags.groupby("NAME").indices.items():
        c_idx = np.flatnonzero(cells["NAME"].to_numpy() == name)
        if not len(c_idx):
            continue
        f_box, c_box = flags.loc[f_idx, list(BOX_COLUMNS)].to_numpy(), cells.loc[c_idx, list(BOX_COLUMNS)].to_numpy()
        iou = pairwise_iou(f_box, c_box, eps=IOU_EPS)
        for _ in range(min(iou.shape)):
            i, j = np.unravel_index(np.argmax(iou), iou.shape)
            if iou[i, j] < cell_iou:
                break
            hit[f_idx[i]], found[c_idx[j]] = True, True
            iou[i, :], iou[:, j] = -1, -1
    add("flag", UNANNOTATED, len(cells), len(flags), int(hit.sum()))

    flagged_any = set(on_rows["box_id"])
    for kind in ROW_KINDS:
        ids = ids_of[kind]
        add("kind", kind, len(ids), len(ids & flagged_any), len(ids & flagged_any))
    for kind in MISSING_KINDS:
        sel = (cells["kind"] == kind).to_numpy()
        name = kind if kind == "unannotated_border" else f"{kind} (missed cell)"
        add("kind", name, int(sel.sum()), int(found[sel].sum()), int(found[sel].sum()))

    bad_images = set(
        nz.loc[nz["kind"].isin([k for k in ROW_KINDS if k != "past_border"] + list(MISSING_KINDS)), "NAME"]
    )
    flagged_images = set(rep["NAME"])
    add("image", "images", len(bad_images), len(flagged_images), len(bad_images & flagged_images))
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------------ a data folder
CLEAN_OUTPUTS: tuple[str, ...] = (
    "train_clean.csv",
    "cleaning_report.csv",
    "cleaning_summary.json",
    "cleaning_eval.csv",
)


@dataclass
class CleanedFolder:
    """What :func:`clean_folder` did: the :class:`CleaningResult`, the evaluation against ``noise.csv`` (a generated
    set only, else None), the summary written as ``cleaning_summary.json``, the output folder, and the lines
    ``cytologia clean`` prints (counts, the evaluation table, the files written)."""

    result: CleaningResult
    evaluation: pd.DataFrame | None
    summary: dict[str, object]
    out: Path
    lines: list[str] = field(default_factory=list)


def clean_folder(
    data: str | Path,
    boxes: str | Path,
    out: str | Path,
    settings: CleaningConfig | None = None,
    images: str | Path | None = None,
) -> CleanedFolder:
    """Clean ``data/train.csv`` (validated leniently; boxes clipped to their image when the image folder is there)
    with the out-of-fold boxes table ``boxes`` and ``settings`` (default: the built-in :class:`CleaningConfig`);
    write to ``out`` the files of :data:`CLEAN_OUTPUTS`: ``train_clean.csv`` (train.csv format, a drop-in
    replacement), ``cleaning_report.csv`` (one row per flag), ``cleaning_summary.json`` and, on a generated set
    (``data/noise.csv`` present), ``cleaning_eval.csv`` (:func:`evaluate_cleaning`). ``images``: the image folder
    (default ``data/images``, skipped with a warning when absent; a given folder must exist)."""
    import json

    from cytologia.data.io import read_annotations, write_csv
    from cytologia.data.schema import TRAIN_COLUMNS
    from cytologia.detection.oof import read_boxes

    data, boxes, out = Path(data), Path(boxes), Path(out)
    cfg = settings if settings is not None else CleaningConfig()
    train_path = data / "train.csv"
    if not train_path.is_file():
        raise CytologiaInputError(f"{train_path}: no such file")
    image_dir: Path | None = Path(images) if images is not None else data / "images"
    if not image_dir.is_dir():
        if images is not None:
            raise CytologiaInputError(f"image folder {image_dir} does not exist")
        log.warning("%s: no images/ folder: boxes are not clipped to their image", data)
        image_dir = None
    ann, validation = read_annotations(train_path, image_dir, lenient=True)
    result = clean_annotations(ann, read_boxes(boxes, require_fold=False), cfg, source=str(boxes))

    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.cleaned[list(TRAIN_COLUMNS)], out / "train_clean.csv")
    write_csv(result.report, out / "cleaning_report.csv")
    summary: dict[str, object] = {
        "data": str(data),
        "boxes": str(boxes),
        "settings": cfg.as_dict(),
        "counts": result.counts,
        "validation": {"rows": validation.rows, "kept": validation.kept, "clipped": validation.clipped},
    }
    evaluation = None
    noise_path = data / "noise.csv"
    if noise_path.is_file():
        noise = pd.read_csv(noise_path, dtype={"NAME": str}, keep_default_na=False)
        evaluation = evaluate_cleaning(result.report, noise)
        write_csv(evaluation, out / "cleaning_eval.csv")
        summary["eval"] = evaluation.to_dict(orient="records")
    (out / "cleaning_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [result.summary()]
    if evaluation is not None:
        with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
            lines.append(evaluation.to_string(index=False))
    lines.append(f"wrote {out / 'train_clean.csv'} ({len(result.cleaned)} rows) and the report to {out}")
    return CleanedFolder(result, evaluation, summary, out, lines)
