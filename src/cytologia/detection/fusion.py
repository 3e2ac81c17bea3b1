"""Box fusion for the single-class detector: weighted box fusion, the known-count rule, open-world NMS.

Every function takes and returns a *boxes table*, one row per box: ``NAME, x1, y1, x2, y2, score, model`` (absolute
pixel corners; ``model`` names what produced the box -- a checkpoint, a TTA variant, ``"fused"``, or ``"pad:<kind>"``
for the boxes :func:`known_count` adds). A ``fold`` column, when present, is carried through.

- :func:`weighted_box_fusion` -- WBF (Solovyev, Wang & Gabruseva, "Weighted boxes fusion", 2021), class-agnostic,
  per image, with per-model weights. Same numbers as the ``ensemble-boxes`` package (checked on random settings by
  ``tests/detection/test_fusion.py::test_wbf_matches_ensemble_boxes`` in the default test suite; ensemble-boxes is a
  ``dev`` dependency only) but on a pixel table and without the dependency.
- :func:`known_count` -- the test-time rule of the challenge: ``test.csv`` lists how many cells each image holds,
  so keep exactly that many boxes per image, the top-N by score, and pad with the boxes that maximise the expected
  GIoU against the cells the detector missed (see :data:`PAD_ORDER` for the measured figures).
- :func:`open_world` -- real use, where the count is unknown: score threshold then NMS.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd

from cytologia.boxes import best_overlap, giou, iou, pairwise_giou
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.oof import validate_boxes
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

FUSED = "fused"
PAD_PREFIX = "pad:"
CONF_TYPES: tuple[str, ...] = ("avg", "max")
IOU_EPS = 1e-12  # floor on the union in the IoU of WBF and NMS (ensemble-boxes has none: its boxes have an area)

# ----------------------------------------------------------------------------------------------------------------
# Padding for the known-count rule.
#
# When the detector finds k < N boxes in an image that holds N cells, the missing N - k rows must still be filled.
# Each truth box takes the prediction of its image with the highest GIoU, so a pad box can only raise the score
# (max over more candidates); its value is E[max(GIoU(pad, cell), GIoU(best detection, cell))] rescaled (g+1)/2,
# over the cells the detector missed. Candidates, in image-relative coordinates (see :func:`pad_candidates`):
#   full       the whole image: GIoU = IoU = area(cell)/area(image) > 0 for any cell inside, never negative
#   prior      a centred box of the median relative cell size for an image of N cells (single-cell images are
#              crops centred on the cell: the real centre offset is 3.7 px, real_stats.json)
#   halves     left / right / top / bottom half of the image; quadrants; the 3x3 grid cells
# A small box that misses the cell has a negative GIoU (rescaled < 0.5) -- the full image never does.
#
# :func:`pad_study` measures them on a truth table in three situations: no detection in a single-cell image, no
# detection in a multi-cell image (every cell missed), and one cell of a multi-cell image missed while the others are
# found exactly. On the real train.csv geometry (48,417 images; image size taken as twice the box centre in
# single-cell images, which are centred crops, and max(368 px, extent of the boxes) in multi-cell ones; reproduced by
# ``tests/detection/test_fusion.py::test_pad_study_on_real_geometry``, a bench test), mean rescaled GIoU of the
# missed cells with one pad ("none": no pad; 0 when the image has no prediction at all):
#
#   no box, 1 cell (45,283 images)   prior 0.858 | g11 0.825 | full 0.580 | half 0.486 | quadrant 0.432 | none 0
#   no box, N >= 2 (3,134)           full 0.561 | g11 0.536 | prior 0.534 | half 0.470 | quadrant 0.419 | none 0
#   one of N >= 2 missed, at random  prior 0.573 | g11 0.569 | full 0.565 | half 0.487 | none 0.370
#   ... the one nearest the border   full 0.558 | half 0.486 | quadrant 0.462 | prior 0.406 | g11 0.402 | none 0.366
#
# The generated set agrees (test_labels.csv of `cytologia synth` at 1,500 images, seed 1: 427 single-cell and 23
# multi-cell test images, real image sizes): no box, 1 cell: prior 0.847 | full 0.581; no box, N >= 2: full 0.547
# | half 0.462; one missed at random: full 0.551 | left half 0.525 | prior 0.383; nearest the border: full 0.547.
#
# So: a single-cell image with no detection gets the centred prior box (its side, 0.40 of the short image side, is
# the real median and also the best fixed size: 0.35 -> 0.835, 0.40 -> 0.858, 0.45 -> 0.842). When cells were found,
# the full image: it loses 0.008 to the prior if the detector misses cells at random, wins by 0.15 if it misses the
# cells cut by the border (the likely ones), and never goes negative. Further pads of an image follow the greedy
# order of the study for "no box, N >= 2" (each next pad adds most to the expected best-of-pads score): full, prior,
# then quadrants and the edge cells of the 3x3 grid; steps 2-7 are measured on >= 53 images, the tail is a fixed
# spread of the remaining candidates. No two pads of one image are the same box.
_SPREAD = (
    "prior",
    "q_bl",
    "g01",
    "g10",
    "g12",
    "g21",
    "q_br",
    "q_tr",
    "g20",
    "q_tl",
    "g00",
    "g02",
    "g22",
    "g11",
    "left",
    "right",
    "top",
    "bottom",
)
PAD_ORDER: dict[str, tuple[str, ...]] = {
    "empty_single": ("prior", "full"),  # no detection, single-cell image (one pad)
    "empty_multi": ("full", *_SPREAD),  # no detection, several cells
    "partial": ("full", *_SPREAD),  # some cells found, others missed
}
# Median side sqrt(w*h) of a cell box relative to min(image w, h) in single-cell images of the real train.csv, and
# the shrink of the median box with the number of cells in the image (real_stats.json size_by_cells).
PRIOR_REL_SIDE = 0.40
PRIOR_SHRINK: dict[int, float] = {
    1: 1.0,
    2: 0.895,
    3: 0.799,
    4: 0.671,
    5: 0.608,
    6: 0.578,
    7: 0.568,
    8: 0.545,
    9: 0.544,
    10: 0.529,
    11: 0.509,
}
CANDIDATES: tuple[str, ...] = PAD_ORDER["empty_multi"]  # every candidate, once


# ----------------------------------------------------------------------------------------------------------------
# validation


def _sizes_frame(image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]]) -> pd.DataFrame:
    """NAME-indexed frame with float img_w, img_h."""
    if isinstance(image_sizes, pd.DataFrame):
        missing = [c for c in ("NAME", "img_w", "img_h") if c not in image_sizes.columns]
        if missing:
            raise CytologiaInputError(f"image sizes table lacks column(s) {', '.join(missing)}")
        frame = image_sizes.assign(NAME=image_sizes["NAME"].astype(str)).drop_duplicates("NAME").set_index("NAME")
        return frame[["img_w", "img_h"]].astype(np.float64)
    names = [str(n) for n in image_sizes]
    wh = np.array([image_sizes[n] for n in image_sizes], dtype=np.float64).reshape(-1, 2)
    return pd.DataFrame({"img_w": wh[:, 0], "img_h": wh[:, 1]}, index=pd.Index(names, name="NAME"))


def _groups(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of runs of equal values in a sorted array."""
    if len(names) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(names[1:] != names[:-1]) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(names)]])
    return starts, ends


# ----------------------------------------------------------------------------------------------------------------
# weighted box fusion


def _carry_fold(table: pd.DataFrame, names: np.ndarray) -> np.ndarray | None:
    """Fold of each image in ``names`` when the table has a fold column: the images' single fold, -1 when mixed."""
    if "fold" not in table.columns:
        return None
    per = table.groupby("NAME", sort=False)["fold"].agg(["min", "max"])
    per = per.reindex(names)
    return np.where(per["min"] == per["max"], per["min"], -1).astype(np.int64)


def weighted_box_fusion(
    boxes: pd.DataFrame,
    iou_thr: float = 0.55,
    skip_thr: float = 0.0,
    weights: Mapping[str, float] | None = None,
    conf_type: str = "avg",
    source: str = "boxes",
) -> pd.DataFrame:
    """Fuse the boxes of several models per image, class-agnostically (WBF).

    Per image, boxes with ``score >= skip_thr`` and a positive area are taken in decreasing ``score * weight``
    order; a box joins the cluster whose current fused box it overlaps most if that IoU is ``> iou_thr``, else it
    starts a cluster. A cluster's box is the ``score * weight``-weighted mean of its boxes. Its score (``avg``) is
    the mean weighted score times ``min(n_boxes, n_models) / sum(weights)`` -- with unit weights, the mean score
    times the share of models that found the box, so a box one model of four sees is down-weighted four times;
    ``max``: the highest weighted score divided by the largest weight.

    The ensemble members of an image: ``weights`` maps each model name (``model`` column: checkpoint, TTA variant)
    to its weight, and its keys are the models (one that found nothing in an image still counts); without it every
    model of the table weighs 1. With a ``fold`` column a member is a (model, fold) pair and an image's members are
    the models times the folds that predicted it (those seen in its rows): one fold for an out-of-fold table, every
    fold at test time -- a fold whose models found nothing at all in a test image is not seen, which only rescales
    that image's scores. Rows skipped for a low score or an empty box are counted in the log. Returns a boxes table
    (model ``"fused"``, the image's single fold or -1 when several) sorted by NAME and decreasing score.
    """
    if conf_type not in CONF_TYPES:
        raise ValueError(f"conf_type={conf_type!r} is not one of {', '.join(CONF_TYPES)}")
    if not 0.0 <= iou_thr <= 1.0:
        raise ValueError(f"iou_thr={iou_thr} must be in [0, 1]")
    table = validate_boxes(boxes, source, require_fold=False)
    models = table["model"].to_numpy()
    if weights is None:
        weight_of = {m: 1.0 for m in pd.unique(models)}
    else:
        weight_of = {str(k): float(v) for k, v in weights.items()}
        unknown = sorted(set(pd.unique(models)) - set(weight_of))
        if unknown:
            raise CytologiaInputError(f"{source}: model(s) {', '.join(unknown)} have no weight; weights: {weight_of}")
        if any(v <= 0 for v in weight_of.values()):
            raise ValueError(f"weights must be positive: {weight_of}")
    n_models = len(weight_of)
    w_sum = float(sum(weight_of.values()))
    w_max = max(weight_of.values(), default=1.0)
    if "fold" in table.columns:  # members are (model, fold): models x folds that predicted the image
        n_folds = table.groupby("NAME", sort=False)["fold"].nunique()
    else:
        n_folds = pd.Series(1, index=pd.unique(table["NAME"]))

    xyxy = table[list(BOX_COLUMNS)].to_numpy(np.float64)
    score = table["score"].to_numpy(np.float64)
    low = score < skip_thr
    empty = ~low & ((xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1]))
    if empty.any():
        log.warning("%s: %d box(es) with zero or negative area skipped by WBF", source, int(empty.sum()))
    if low.any():
        log.debug("%s: %d box(es) below skip_thr=%s", source, int(low.sum()), skip_thr)
    keep = ~(low | empty)
    names = table["NAME"].to_numpy(dtype=object)[keep]
    xyxy, score = xyxy[keep], score[keep]
    wscore = score * pd.Series(models[keep]).map(weight_of).to_numpy(np.float64)
    # by image, then decreasing weighted score (stable: equal scores keep table order)
    order = np.lexsort((-wscore, names))
    names, xyxy, wscore = names[order], xyxy[order], wscore[order]
    starts, ends = _groups(names)
    folds_of = n_folds.reindex(names[starts]).to_numpy(np.float64) if len(starts) else np.zeros(0)

    # Images with one or two boxes (most of them) are fused vectorised; the cluster loop runs on the others.
    size = ends - starts
    parts_g, parts_box, parts_raw, parts_count = [], [], [], []
    one = np.flatnonzero(size == 1)
    parts_g.append(one)
    parts_box.append(xyxy[starts[one]])
    parts_raw.append(wscore[starts[one]])
    parts_count.append(np.ones(len(one)))
    two = np.flatnonzero(size == 2)
    if len(two):
        i0, i1 = starts[two], starts[two] + 1
        b0, b1, s0, s1 = xyxy[i0], xyxy[i1], wscore[i0], wscore[i1]
        merge = iou(b0, b1, eps=IOU_EPS) > iou_thr
        m, k = two[merge], ~merge
        fused = (s0[merge, None] * b0[merge] + s1[merge, None] * b1[merge]) / (s0[merge] + s1[merge])[:, None]
        raw = (s0[merge] + s1[merge]) / 2 if conf_type == "avg" else np.maximum(s0[merge], s1[merge])
        parts_g += [m, two[k], two[k]]
        parts_box += [fused, b0[k], b1[k]]
        parts_raw += [raw, s0[k], s1[k]]
        parts_count += [np.full(len(m), 2.0), np.ones(int(k.sum())), np.ones(int(k.sum()))]
    for g in np.flatnonzero(size > 2).tolist():
        s, e = int(starts[g]), int(ends[g])
        fused_b, raw, count = _wbf_image(xyxy[s:e], wscore[s:e], iou_thr, conf_type)
        parts_g.append(np.full(len(raw), g))
        parts_box.append(fused_b)
        parts_raw.append(raw)
        parts_count.append(count)
    group = np.concatenate(parts_g).astype(np.int64)
    out_box = np.concatenate(parts_box).reshape(-1, 4)
    raw = np.concatenate(parts_raw)
    count = np.concatenate(parts_count)
    if conf_type == "avg":
        f = folds_of[group]
        out_score = raw * np.minimum(count, n_models * f) / (w_sum * f)
    else:
        out_score = raw / w_max
    out_name = names[starts[group]] if len(group) else np.zeros(0, dtype=object)
    n_out = len(group)
    out = pd.DataFrame({"NAME": out_name[:n_out], **{c: out_box[:n_out, j] for j, c in enumerate(BOX_COLUMNS)}})
    out["score"] = out_score[:n_out]
    out["model"] = FUSED
    fold = _carry_fold(table, out["NAME"].to_numpy())
    if fold is not None:
        out["fold"] = fold
    order = np.lexsort((-out["score"].to_numpy(), out["NAME"].to_numpy(dtype=object)))
    return out.iloc[order].reset_index(drop=True)


def _wbf_image(
    b: np.ndarray, ws: np.ndarray, iou_thr: float, conf_type: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """WBF of one image's boxes, already sorted by decreasing weighted score: (fused boxes, raw fused scores --
    mean or max of the weighted scores --, boxes per cluster).

    Plain Python floats: an image holds a handful of boxes, where numpy's per-call overhead (~1 us per operation)
    costs more than the arithmetic (profiled: 3x faster than the same loop on arrays)."""
    fused: list[list[float]] = []
    acc: list[list[float]] = []
    s_sum: list[float] = []
    s_max: list[float] = []
    count: list[int] = []
    for (x1, y1, x2, y2), w in zip(b.tolist(), ws.tolist()):
        # the cluster it overlaps most (the first of equals); ensemble-boxes: a match needs IoU strictly above iou_thr
        best = best_overlap((x1, y1, x2, y2), fused, above=iou_thr, eps=IOU_EPS)[0]
        if best < 0:
            fused.append([x1, y1, x2, y2])
            acc.append([w * x1, w * y1, w * x2, w * y2])
            s_sum.append(w)
            s_max.append(w)
            count.append(1)
            continue
        a = acc[best]
        a[0] += w * x1
        a[1] += w * y1
        a[2] += w * x2
        a[3] += w * y2
        s_sum[best] += w
        s_max[best] = max(s_max[best], w)
        count[best] += 1
        t = s_sum[best]
        fused[best] = [a[0] / t, a[1] / t, a[2] / t, a[3] / t]
    n = np.array(count, dtype=np.float64)
    raw = np.array(s_sum) / n if conf_type == "avg" else np.array(s_max)
    return np.array(fused, dtype=np.float64).reshape(-1, 4), raw, n


# ----------------------------------------------------------------------------------------------------------------
# known count


def pad_candidates(width: np.ndarray, height: np.ndarray, n_cells: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate pad boxes for images of the given sizes and cell counts: name -> (n, 4) float boxes.

    ``full`` the image; ``prior`` a centred square of side ``PRIOR_REL_SIDE * PRIOR_SHRINK[N] * min(w, h)``;
    ``left``/``right``/``top``/``bottom`` halves; ``q_tl``.. quadrants; ``g<row><col>`` the 3x3 grid cells.
    """
    w = np.asarray(width, np.float64).reshape(-1)
    h = np.asarray(height, np.float64).reshape(-1)
    n = np.asarray(n_cells, np.int64).reshape(-1)
    zero = np.zeros_like(w)

    def rel(fx1: float, fy1: float, fx2: float, fy2: float) -> np.ndarray:
        return np.stack([fx1 * w, fy1 * h, fx2 * w, fy2 * h], axis=1)

    shrink = np.array([PRIOR_SHRINK.get(int(k), PRIOR_SHRINK[max(PRIOR_SHRINK)]) for k in n], dtype=np.float64)
    side = PRIOR_REL_SIDE * shrink * np.minimum(w, h)
    cands = {
        "full": np.stack([zero, zero, w, h], axis=1),
        "prior": np.stack([w / 2 - side / 2, h / 2 - side / 2, w / 2 + side / 2, h / 2 + side / 2], axis=1),
        "left": rel(0, 0, 0.5, 1),
        "right": rel(0.5, 0, 1, 1),
        "top": rel(0, 0, 1, 0.5),
        "bottom": rel(0, 0.5, 1, 1),
        "q_tl": rel(0, 0, 0.5, 0.5),
        "q_tr": rel(0.5, 0, 1, 0.5),
        "q_bl": rel(0, 0.5, 0.5, 1),
        "q_br": rel(0.5, 0.5, 1, 1),
    }
    for r in range(3):
        for c in range(3):
            cands[f"g{r}{c}"] = rel(c / 3, r / 3, (c + 1) / 3, (r + 1) / 3)
    return cands


def pad_situation(n_found: int, n_cells: int) -> str:
    """Key of :data:`PAD_ORDER` for an image with ``n_found`` kept boxes out of ``n_cells``."""
    if n_found == 0:
        return "empty_single" if n_cells == 1 else "empty_multi"
    return "partial"


def known_count(
    boxes: pd.DataFrame,
    counts: pd.Series,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]],
    source: str = "boxes",
) -> pd.DataFrame:
    """Exactly ``counts[NAME]`` boxes per image of ``counts``: the top-N by score, padded when too few.

    ``counts`` is NAME -> number of cells (e.g. ``test.groupby("NAME").size()``); ``image_sizes`` a ``NAME, img_w,
    img_h`` table or a mapping NAME -> (w, h), needed for the images that get pads. Pads follow :data:`PAD_ORDER`
    (no two pads of an image are the same box), score 0 and model ``"pad:<candidate>"``. Boxes of images not in
    ``counts`` are left out (and counted in the log). Returns a boxes table ordered by NAME (as in ``counts``) and
    decreasing score.
    """
    table = validate_boxes(boxes, source, require_fold=False)
    counts = pd.Series(counts)
    counts.index = counts.index.astype(str)
    if counts.index.has_duplicates:
        raise CytologiaInputError(f"counts: image(s) listed twice: {list(counts.index[counts.index.duplicated()][:5])}")
    n_val = pd.to_numeric(counts, errors="coerce")
    if n_val.isna().any() or (n_val < 1).any() or (n_val != np.floor(n_val)).any():
        bad = counts[n_val.isna() | (n_val < 1) | (n_val != np.floor(n_val))]
        raise CytologiaInputError(f"counts must be integers >= 1; bad: {bad.head(5).to_dict()}")
    counts = n_val.astype(np.int64)

    in_counts = table["NAME"].isin(counts.index)
    if (~in_counts).any():
        log.info(
            "%s: %d box(es) of %d image(s) not in the count list left out",
            source,
            int((~in_counts).sum()),
            table.loc[~in_counts, "NAME"].nunique(),
        )
    table = table[in_counts]
    table = table.iloc[np.lexsort((-table["score"].to_numpy(), table["NAME"].to_numpy(dtype=object)))]
    rank = table.groupby("NAME", sort=False).cumcount().to_numpy()
    kept = table[rank < counts.reindex(table["NAME"]).to_numpy()]
    found = kept.groupby("NAME").size().reindex(counts.index, fill_value=0)
    short = counts[found < counts]
    parts = [kept]
    if len(short):
        parts.append(_pads(short, found.reindex(short.index).to_numpy(), image_sizes, table.columns))
        log.info("padded %d image(s) with %d box(es)", len(short), int((short - found.reindex(short.index)).sum()))
    out = pd.concat(parts, ignore_index=True)
    pos = pd.Series(np.arange(len(counts)), index=counts.index)
    order = np.lexsort((-out["score"].to_numpy(), pos.reindex(out["NAME"]).to_numpy()))
    return out.iloc[order].reset_index(drop=True)


def _pads(short: pd.Series, found: np.ndarray, image_sizes, columns: pd.Index) -> pd.DataFrame:
    sizes = _sizes_frame(image_sizes).reindex(short.index)
    unknown = sizes.index[sizes.isna().any(axis=1) | (sizes <= 0).any(axis=1)]
    if len(unknown):
        raise CytologiaInputError(
            f"no image size for {len(unknown)} image(s) that need pad boxes, e.g. {', '.join(unknown[:5])}"
        )
    need = short.to_numpy() - found
    cands = pad_candidates(sizes["img_w"].to_numpy(), sizes["img_h"].to_numpy(), short.to_numpy())
    rows_name, rows_box, rows_model = [], [], []
    for i, name in enumerate(short.index):
        order = PAD_ORDER[pad_situation(int(found[i]), int(short.iloc[i]))]
        for j in range(int(need[i])):
            if j < len(order):
                cand = order[j]
            else:  # more missing cells than distinct candidates (never in the real test list: at most 11 cells)
                cand = "full"
                log.warning(
                    "%s: %d pads needed, only %d distinct candidates; repeating the full box",
                    name,
                    int(need[i]),
                    len(order),
                )
            rows_name.append(name)
            rows_box.append(cands[cand][i])
            rows_model.append(PAD_PREFIX + cand)
    box = np.array(rows_box, dtype=np.float64).reshape(-1, 4)
    pads = pd.DataFrame({"NAME": rows_name, **{c: box[:, j] for j, c in enumerate(BOX_COLUMNS)}})
    pads["score"] = 0.0
    pads["model"] = rows_model
    for col in columns:
        if col not in pads.columns:
            pads[col] = -1 if col == "fold" else pd.NA
    return pads[list(columns)]


def pad_study(
    truth: pd.DataFrame,
    image_sizes: pd.DataFrame | Mapping[str, tuple[int, int]],
    seed: int = 0,
    partial_miss: str = "random",
) -> pd.DataFrame:
    """Expected rescaled GIoU of the pad candidates against missed cells of a truth table (``NAME, x1..y2``).

    Situations (see :data:`PAD_ORDER`): ``empty_single`` / ``empty_multi`` -- the detector found nothing, every
    cell of the image is missed and takes the best of the pads; ``partial`` -- one random cell of each multi-cell
    image is missed, the others are found exactly and the missed cell takes the best of them and the pads. Greedy:
    step 1 scores every candidate alone; each later step adds the candidate that raises the expected value most,
    over the images that need that many pads. ``partial_miss="border"`` misses the cell nearest an image border
    instead of a random one (a detector misses cut cells first). Returns rows (situation, step, candidate, value,
    chosen, n_images); step 0 is the value without any pad.
    """
    if partial_miss not in ("random", "border"):
        raise ValueError(f"partial_miss={partial_miss!r} must be 'random' or 'border'")
    rng = np.random.default_rng(seed)
    t = truth[["NAME", *BOX_COLUMNS]].copy()
    t["NAME"] = t["NAME"].astype(str)
    t = t.sort_values("NAME", kind="stable").reset_index(drop=True)
    names = t["NAME"].to_numpy(dtype=object)
    xyxy = t[list(BOX_COLUMNS)].to_numpy(np.float64)
    starts, ends = _groups(names)
    n_cells = ends - starts
    sizes = _sizes_frame(image_sizes).reindex(names[starts])
    if sizes.isna().any().any():
        raise CytologiaInputError("pad_study: image sizes missing for some truth images")
    cands = pad_candidates(sizes["img_w"].to_numpy(), sizes["img_h"].to_numpy(), n_cells)
    rows = []
    # (situation, images, missed cell rows per image, baseline per missed cell)
    single = np.flatnonzero(n_cells == 1)
    multi = np.flatnonzero(n_cells > 1)
    cases = [("empty_single", single, None), ("empty_multi", multi, None), ("partial", multi, "one")]
    for situation, imgs, mode in cases:
        if not len(imgs):
            continue
        cell_img, cell_row, base = [], [], []
        for i in imgs:
            s, e = int(starts[i]), int(ends[i])
            if mode is None:
                missed = list(range(s, e))
                found: list[int] = []
            else:
                if partial_miss == "border":  # the cell closest to an image border (cut cells are missed first)
                    wi, hi = sizes["img_w"].iloc[i], sizes["img_h"].iloc[i]
                    gap = np.minimum.reduce([xyxy[s:e, 0], xyxy[s:e, 1], wi - xyxy[s:e, 2], hi - xyxy[s:e, 3]])
                    m = s + int(np.argmin(gap))
                else:
                    m = s + int(rng.integers(e - s))
                missed, found = [m], [r for r in range(s, e) if r != m]
            for r in missed:
                cell_img.append(i)
                cell_row.append(r)
                base.append(pairwise_giou(xyxy[r], xyxy[found]).max() if found else -np.inf)
        cell_img_a, cell_row_a = np.array(cell_img), np.array(cell_row)
        best = np.array(base)
        g = {c: giou(cands[c][cell_img_a], xyxy[cell_row_a]) for c in cands}
        # pads an image gets in this situation: every cell when nothing was found, one otherwise
        n_pads = n_cells[cell_img_a] if mode is None else np.ones(len(cell_img_a), np.int64)
        chosen: list[str] = []
        rows.append(
            {
                "situation": situation,
                "step": 0,
                "candidate": "none",
                "value": float(((np.maximum(best, -1.0) + 1) / 2).mean()),
                "chosen": True,
                "n_images": len(imgs),
            }
        )
        for step in range(1, len(cands) + 1):
            active = n_pads >= step
            if not active.any():
                break
            values = {
                c: float(((np.maximum(best[active], g[c][active]) + 1) / 2).mean()) for c in cands if c not in chosen
            }
            pick = max(values, key=lambda c: values[c])
            n_img = len(np.unique(cell_img_a[active]))
            for c, v in values.items():
                rows.append(
                    {
                        "situation": situation,
                        "step": step,
                        "candidate": c,
                        "value": v,
                        "chosen": c == pick,
                        "n_images": n_img,
                    }
                )
            chosen.append(pick)
            best = np.where(active, np.maximum(best, g[pick]), best)
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------------------
# open world


def nms(xyxy: np.ndarray, scores: np.ndarray, iou_thr: float) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, in decreasing score order (ties: earlier row first)."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    xyxy = np.asarray(xyxy, np.float64)[order]
    keep: list[int] = []
    suppressed = np.zeros(len(order), dtype=bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(int(order[i]))
        if i + 1 < len(order):
            suppressed[i + 1 :] |= iou(xyxy[i], xyxy[i + 1 :], eps=IOU_EPS) > iou_thr
    return np.array(keep, dtype=np.int64)


def open_world(
    boxes: pd.DataFrame, score_thr: float = 0.25, nms_iou: float = 0.5, source: str = "boxes"
) -> pd.DataFrame:
    """Boxes with ``score >= score_thr``, then class-agnostic NMS per image (a box is dropped when it overlaps a
    higher-scored kept box of its image with IoU ``> nms_iou``). Returns the boxes table sorted by NAME and
    decreasing score; images with no box left have no row."""
    table = validate_boxes(boxes, source, require_fold=False)
    table = table[table["score"].to_numpy() >= score_thr]
    names = table["NAME"].to_numpy(dtype=object)
    order = np.lexsort((-table["score"].to_numpy(), names))
    table = table.iloc[order].reset_index(drop=True)
    names = names[order]
    xyxy = table[list(BOX_COLUMNS)].to_numpy(np.float64)
    score = table["score"].to_numpy(np.float64)
    starts, ends = _groups(names)
    keep = np.ones(len(table), dtype=bool)
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s > 1:
            kept = nms(xyxy[s:e], score[s:e], nms_iou)
            mask = np.zeros(e - s, dtype=bool)
            mask[kept] = True
            keep[s:e] = mask
    return table[keep].reset_index(drop=True)
