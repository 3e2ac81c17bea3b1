"""Cross-validation folds: multilabel-stratified on class presence and one-hot bins, duplicate- and source-aware.

One row per image (``NAME,fold``). The unit of the split is a *duplicate group* (exact or near-duplicate images
share a group and therefore a fold). Each unit is described by a 0/1 label vector: one column per class present
plus **one-hot** bins of box count, box size, image size, colour statistics and inferred acquisition source, and
:class:`iterstrat.ml_stratifiers.MultilabelStratifiedKFold` balances every column across folds. (The library casts
labels to bool, so passing integer bin codes, as the 1st-place notebook did, silently collapses every non-zero bin
into one; :func:`stratification_labels` builds real one-hot blocks.)

``mode="group-source"`` instead keeps every inferred source (with the duplicate groups that link to it) in a single
fold -- a leave-source-out split that measures how a model transfers to an unseen hospital.

Combined data sets (``cytologia combine``: several data sets in one folder, the data set of each image in
``sources.csv``, :func:`cytologia.data.combine.read_datasets`): given ``datasets``, the stratified mode also balances
the share of each data set across folds (one more one-hot block), and ``mode="group-dataset"`` keeps each data set
wholly in one fold -- leave one data set out, with ``k`` = the number of data sets (or fewer: then folds hold several
data sets, the largest first).
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS, CLASSES, FOLD_COLUMNS, TRAIN_COLUMNS
from cytologia.data.sources import FEATURE_COLUMNS, UNKNOWN_SOURCE, image_features, infer_sources
from cytologia.errors import CytologiaInputError, ValidationError

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("stratified", "group-source", "group-dataset")
_MAX_PROBLEMS = 20  # bad rows listed in an error message of read_split_table (the total is counted)
MISSING = "missing"  # the bin of a unit whose statistic is unknown (unreadable image, no images at all)
# Binned features, in label-column order; columns are named "<feature>=<level>". Each block is one-hot.
BINNED_FEATURES: tuple[str, ...] = ("boxes", "box_size", "img_size", "L_mean", "a_mean", "b_mean", "source", "dataset")
_N_BINS = {"box_size": 4, "img_size": 3, "L_mean": 3, "a_mean": 3, "b_mean": 3}  # quantile bins per feature
_BOX_COUNT_LEVELS = ("1", "2", "3+")  # 93 % of real images hold one box, 5 % two; 3+ is the long tail


@dataclass
class FoldReport:
    """What :func:`make_folds` did, and how balanced the folds are (deviations in percentage points)."""

    k: int
    seed: int
    mode: str
    n_images: int
    n_boxes: int
    n_units: int  # rows given to the splitter: duplicate groups (stratified) or source blocks (group-source)
    fold_images: list[int]
    fold_boxes: list[int]
    classes: list[str]
    global_share_boxes: dict[str, float]  # fraction of all boxes that are the class
    global_share_images: dict[str, float]  # fraction of all images that hold the class
    worst_dev_boxes: dict[str, float]  # max over folds of |fold share - global share|, points, box-based
    worst_dev_images: dict[str, float]  # same, image-based (share of the fold's images holding the class)
    max_dev_boxes: float
    max_dev_images: float
    images_used: bool
    n_unreadable: int
    unreadable: list[str]
    n_duplicate_groups: int  # groups of >= 2 images
    n_sources: int | None  # inferred (or given) sources, unknown excluded; None when no source information
    source_folds: dict[str, int] | None  # group-source mode: source id -> fold
    label_columns: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    n_datasets: int | None = None  # data sets of a combined folder (None: not given)
    dataset_folds: dict[str, int] | None = None  # group-dataset mode: data set -> fold

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """Human-readable fold-balance summary: fold sizes and each class's worst deviation (points)."""
        lines = [
            f"folds: k={self.k} seed={self.seed} mode={self.mode}: {self.n_images} images, {self.n_boxes} boxes, "
            f"{self.n_units} units, {self.seconds:.2f} s",
            f"images per fold: {self.fold_images}   boxes per fold: {self.fold_boxes}",
            f"sources: {self.n_sources if self.n_sources is not None else 'not inferred'}   "
            f"duplicate groups: {self.n_duplicate_groups}   unreadable images: {self.n_unreadable}",
            "worst per-class deviation from the global share, points (box share | image share):",
        ]
        for c in self.classes:
            lines.append(
                f"  {c:<9} global {100 * self.global_share_boxes[c]:6.2f}% | {100 * self.global_share_images[c]:6.2f}%"
                f"   worst dev {self.worst_dev_boxes[c]:5.2f} | {self.worst_dev_images[c]:5.2f}"
            )
        worst_b = max(self.worst_dev_boxes, key=self.worst_dev_boxes.__getitem__) if self.classes else "-"
        worst_i = max(self.worst_dev_images, key=self.worst_dev_images.__getitem__) if self.classes else "-"
        lines.append(
            f"max deviation: {self.max_dev_boxes:.2f} points ({worst_b}) box share, "
            f"{self.max_dev_images:.2f} points ({worst_i}) image share"
        )
        return "\n".join(lines)


def _check_args(table: pd.DataFrame, k: int, mode: str) -> None:
    if mode not in MODES:
        raise CytologiaInputError(f"unknown folds mode {mode!r}; valid modes: {', '.join(MODES)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise CytologiaInputError(f"number of folds k must be an integer >= 2, got {k!r}")
    missing = [c for c in ("NAME", *BOX_COLUMNS, "class") if c not in table.columns]
    if missing:
        raise CytologiaInputError(f"annotation table lacks column(s) {', '.join(missing)}")
    if table.empty:
        raise CytologiaInputError("annotation table has no rows: nothing to split")


def _quantile_codes(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Quantile-bin codes 0..n_bins-1; NaN -> n_bins (the missing bin). Tied values share a bin (edges deduplicated),
    so a feature where 90 % of images are 360x368 gets fewer, uneven bins rather than an arbitrary cut."""
    codes = np.full(len(values), n_bins, dtype=np.int64)
    finite = np.isfinite(values)
    if finite.any():
        inner = np.quantile(values[finite], np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        codes[finite] = np.searchsorted(np.unique(inner), values[finite], side="right")
    return codes


def _one_hot(name: str, codes: np.ndarray, levels: list[str]) -> pd.DataFrame:
    """One 0/1 column per level actually used; exactly one 1 per row."""
    mat = np.zeros((len(codes), len(levels)), dtype=np.uint8)
    mat[np.arange(len(codes)), codes] = 1
    used = mat.any(axis=0)
    return pd.DataFrame(mat[:, used], columns=[f"{name}={lv}" for lv, u in zip(levels, used) if u])


def stratification_labels(units: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The 0/1 label matrix of the splitter, one row per unit.

    ``units`` holds ``class=<c>`` presence columns (0/1) and the raw features ``n_boxes``, ``box_size``,
    ``img_size``, ``L_mean``, ``a_mean``, ``b_mean`` (NaN = unknown) and optionally ``source`` (int, -1 unknown).
    Class columns are multi-hot (a unit can hold several classes); every binned feature is a one-hot block of
    columns ``<feature>=<level>``. A block whose units all fall in one level carries no information and is left out.
    """
    blocks = [units[[f"class={c}" for c in classes]].astype(np.uint8).reset_index(drop=True)]
    n_boxes = units["n_boxes"].to_numpy(np.int64)
    blocks.append(_one_hot("boxes", np.clip(n_boxes, 1, 3) - 1, list(_BOX_COUNT_LEVELS)))
    for feat, n_bins in _N_BINS.items():
        levels = [f"q{i}" for i in range(n_bins)] + [MISSING]
        blocks.append(_one_hot(feat, _quantile_codes(units[feat].to_numpy(float), n_bins), levels))
    if "source" in units:
        src = units["source"].to_numpy(np.int64)
        ids = sorted(set(src.tolist()) - {UNKNOWN_SOURCE})
        pos = {s: i for i, s in enumerate(ids)}
        codes = np.array([pos.get(s, len(ids)) for s in src], dtype=np.int64)
        blocks.append(_one_hot("source", codes, [str(s) for s in ids] + [MISSING]))
    if "dataset" in units:  # integer codes of the data sets of a combined folder
        codes = units["dataset"].to_numpy(np.int64)
        blocks.append(_one_hot("dataset", codes, [str(d) for d in range(int(codes.max()) + 1)]))
    labels = pd.concat([blocks[0]] + [b for b in blocks[1:] if b.shape[1] > 1], axis=1)
    labels.index = units.index
    return labels


def _image_table(table: pd.DataFrame, feats: pd.DataFrame | None) -> tuple[pd.DataFrame, list[str], np.ndarray]:
    """Per-image features: class presence, box count, box size, image size, colour. Returns (images, classes,
    image index of every box row)."""
    names = pd.unique(table["NAME"].astype(str))
    img_idx = pd.Index(names).get_indexer(table["NAME"].astype(str))
    present = set(table["class"].astype(str))
    classes = [c for c in CLASSES if c in present] + sorted(present - set(CLASSES))
    cls_idx = pd.Index(classes).get_indexer(table["class"].astype(str))
    images = pd.DataFrame(index=pd.Index(names, name="NAME"))
    presence = np.zeros((len(names), len(classes)), dtype=np.uint8)
    presence[img_idx, cls_idx] = 1
    for j, c in enumerate(classes):
        images[f"class={c}"] = presence[:, j]
    images["n_boxes"] = np.bincount(img_idx, minlength=len(names))

    w = np.full(len(names), np.nan)
    h = np.full(len(names), np.nan)
    if feats is not None:
        w, h = feats["img_w"].to_numpy(float), feats["img_h"].to_numpy(float)
    elif {"img_w", "img_h"} <= set(table.columns):  # validated table: -1 when no image was read
        sizes = table.groupby(img_idx)[["img_w", "img_h"]].first().to_numpy(float)
        sizes[sizes <= 0] = np.nan
        w, h = sizes[:, 0], sizes[:, 1]
    img_side = np.sqrt(w * h)
    images["img_size"] = img_side

    bw = (table["x2"].to_numpy(float) - table["x1"].to_numpy(float)).clip(min=0)
    bh = (table["y2"].to_numpy(float) - table["y1"].to_numpy(float)).clip(min=0)
    side = pd.Series(np.sqrt(bw * bh)).groupby(img_idx).median().to_numpy()
    # Box size relative to the image when every image size is known (a 150 px cell means something else on a 360 px
    # and on a 600 px image); absolute otherwise, so that one unknown size does not mix two scales in one feature.
    images["box_size"] = side / img_side if np.isfinite(img_side).all() else side
    for c in ("L_mean", "a_mean", "b_mean"):
        images[c] = feats[c].to_numpy(float) if feats is not None else np.nan
    return images, classes, img_idx


def _unit_ids(names: pd.Index, dup_groups: pd.Series | None) -> tuple[np.ndarray, int]:
    """Unit (duplicate group) index of every image, and the number of groups of >= 2 images."""
    if dup_groups is None:
        return np.arange(len(names)), 0
    gid = pd.Series(dup_groups).groupby(level=0).first().reindex(names).fillna(-1).to_numpy(np.int64)
    singles = gid < 0
    # Unique images get keys past every real group id, so they never collide with a group.
    key = np.where(singles, gid.max(initial=0) + 1 + np.arange(len(names)), gid)
    units = pd.factorize(key, sort=False)[0]
    sizes = np.bincount(units)
    return units, int((sizes >= 2).sum())


def _stratified_split(labels: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

    y = labels.to_numpy(np.uint8)
    if y.shape[1] < 2:  # sklearn's type_of_target calls a single column "binary", not multilabel
        y = np.column_stack([y, np.zeros(len(y), dtype=np.uint8)])
    # shuffle=True: the seed then also permutes the processing order, not only the tie-breaks.
    splitter = MultilabelStratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = np.full(len(y), -1, dtype=np.int64)
    for f, (_, test) in enumerate(splitter.split(np.zeros((len(y), 1)), y)):
        fold[test] = f
    return fold


def _source_blocks(units: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Connected components of images linked by a shared duplicate group or a shared known source."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(units)
    known = sources != UNKNOWN_SOURCE
    src_codes = pd.factorize(sources[known], sort=True)[0]
    n_units = units.max() + 1
    # Nodes: images 0..n-1, units n..n+U-1, sources after; edges image-unit and image-source.
    rows = np.concatenate([np.arange(n), np.flatnonzero(known)])
    cols = np.concatenate([n + units, n + n_units + src_codes])
    size = n + n_units + (src_codes.max() + 1 if len(src_codes) else 0)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(size, size))
    _, comp = connected_components(graph, directed=False)
    return pd.factorize(comp[:n], sort=False)[0]


def _group_source_split(
    blocks: np.ndarray, has_source: np.ndarray, k: int, seed: int, what: str = "source"
) -> tuple[np.ndarray, int]:
    """Largest-first greedy assignment of whole blocks to the fold with the fewest images (ties broken by seed).

    ``has_source[b]`` says whether block ``b`` holds a known source; at least ``k`` such blocks are needed, so that
    every fold holds a source of its own (blocks of unreadable images alone only fill up the folds). ``what``:
    ``source`` or ``dataset``, for the message."""
    sizes = np.bincount(blocks)
    n_source_blocks = int(has_source.sum())
    if n_source_blocks < k:
        hint = "set --sources" if what == "source" else "combine more data sets"
        raise CytologiaInputError(
            f"group-{what} mode needs at least k={k} separable {what}s, found {n_source_blocks} "
            f"(lower --k, {hint}, or use --mode stratified)"
        )
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    load = np.zeros(k, dtype=np.int64)
    block_fold = np.empty(len(sizes), dtype=np.int64)
    for b in order:
        lightest = np.flatnonzero(load == load.min())
        f = lightest[rng.randint(len(lightest))]
        block_fold[b] = f
        load[f] += sizes[b]
    return block_fold[blocks], len(sizes)


def _balance(
    fold: np.ndarray, images: pd.DataFrame, classes: list[str], box_img: np.ndarray, box_cls: np.ndarray, k: int
) -> dict[str, object]:
    box_fold = fold[box_img]
    box_counts = np.zeros((k, len(classes)))
    np.add.at(box_counts, (box_fold, box_cls), 1)
    presence = images[[f"class={c}" for c in classes]].to_numpy(float)
    img_counts = np.stack([presence[fold == f].sum(axis=0) for f in range(k)])
    n_img = np.bincount(fold, minlength=k).astype(float)
    n_box = box_counts.sum(axis=1)
    g_box = box_counts.sum(axis=0) / box_counts.sum()
    g_img = presence.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        dev_box = np.nan_to_num(np.abs(box_counts / n_box[:, None] - g_box)).max(axis=0) * 100
        dev_img = np.nan_to_num(np.abs(img_counts / n_img[:, None] - g_img)).max(axis=0) * 100
    return {
        "fold_images": n_img.astype(int).tolist(),
        "fold_boxes": n_box.astype(int).tolist(),
        "global_share_boxes": {c: round(float(v), 6) for c, v in zip(classes, g_box)},
        "global_share_images": {c: round(float(v), 6) for c, v in zip(classes, g_img)},
        "worst_dev_boxes": {c: round(float(v), 4) for c, v in zip(classes, dev_box)},
        "worst_dev_images": {c: round(float(v), 4) for c, v in zip(classes, dev_img)},
        "max_dev_boxes": round(float(dev_box.max(initial=0.0)), 4),
        "max_dev_images": round(float(dev_img.max(initial=0.0)), 4),
    }


def make_folds(
    table: pd.DataFrame,
    k: int = 4,
    seed: int = 42,
    mode: str = "stratified",
    image_dir: Path | None = None,
    dup_groups: pd.Series | None = None,
    *,
    features: pd.DataFrame | None = None,
    sources: pd.Series | None = None,
    n_sources: int | None = None,
    workers: int | None = None,
    datasets: pd.Series | None = None,
) -> tuple[pd.DataFrame, FoldReport]:
    """Assign every image of an annotation table (one row per box) to one of ``k`` folds.

    - ``mode="stratified"``: multilabel-stratified over duplicate groups on class presence + one-hot bins of box
      count, box size, image size, L*a*b* colour means and inferred source.
    - ``mode="group-source"``: each inferred source entirely in one fold, fold sizes balanced.
    - ``mode="group-dataset"``: each data set of ``datasets`` (NAME -> data set name, a combined folder's
      ``sources.csv``) entirely in one fold; with ``datasets`` the stratified mode balances their shares too.

    ``image_dir`` (optional) is read for image size, JPEG tables and colour (or pass ``features`` from
    :func:`cytologia.data.sources.image_features`); without either, image statistics are skipped with a warning.
    ``dup_groups`` maps NAME -> duplicate group id (-1 = unique); a group never straddles two folds. ``sources``
    (NAME -> source id, -1 unknown) overrides source inference; ``n_sources`` fixes the number of inferred sources.
    Same inputs and seed give the same folds. Returns the ``NAME,fold`` table (rows in first-appearance order of
    the annotation table) and a :class:`FoldReport`.
    """
    start = time.perf_counter()
    _check_args(table, k, mode)
    notes: list[str] = []

    def warn(msg: str) -> None:
        log.warning(msg)
        notes.append(msg)

    names = pd.Index(pd.unique(table["NAME"].astype(str)), name="NAME")
    if features is None and image_dir is not None:
        if not Path(image_dir).is_dir():
            raise CytologiaInputError(f"image folder {image_dir} does not exist")
        features = image_features(Path(image_dir), list(names), workers=workers)
    elif features is not None:
        missing_cols = [c for c in FEATURE_COLUMNS if c not in features.columns]
        if missing_cols:
            raise CytologiaInputError(f"features table lacks column(s) {', '.join(missing_cols)}")
        features = features.drop_duplicates("NAME").set_index("NAME").reindex(names).reset_index()
        features["readable"] = features["readable"].fillna(False).astype(bool)
        features["q_hash"] = features["q_hash"].fillna("none")
        features["sampling"] = features["sampling"].fillna(-1).astype(np.int64)
    unreadable: list[str] = []
    if features is None:
        warn(
            "no images: image statistics (size, JPEG tables, colour, source) skipped; folds stratified on class "
            "presence, box count and absolute box size only"
        )
    else:
        unreadable = features.loc[~features["readable"], "NAME"].astype(str).tolist()
        if unreadable:
            warn(f"{len(unreadable)} image(s) unreadable or missing; their statistics go to the '{MISSING}' bins")

    images, classes, box_img = _image_table(table, features)
    box_cls = pd.Index(classes).get_indexer(table["class"].astype(str))

    src: np.ndarray | None = None
    if sources is not None:
        src = pd.Series(sources).groupby(level=0).first().reindex(names).fillna(UNKNOWN_SOURCE).to_numpy(np.int64)
    elif features is not None:
        # The clustering's own fixed seed, not the folds' seed: the sources are a property of the images, and a new
        # fold seed should reshuffle the folds, not redraw the sources.
        src = infer_sources(features, n_sources=n_sources).to_numpy(np.int64)
    n_src = None if src is None else len(set(src.tolist()) - {UNKNOWN_SOURCE})
    if src is not None:
        images["source"] = src
    ds_names: list[str] = []
    if datasets is not None:
        given = pd.Series(datasets).groupby(level=0).first().reindex(names)
        if given.isna().any():
            raise CytologiaInputError(
                f"{int(given.isna().sum())} image(s) have no data set (e.g. {given.index[given.isna()][0]}): the "
                "data sets table must name every image of the annotation table"
            )
        codes, uniques = pd.factorize(given.astype(str), sort=True)
        images["dataset"], ds_names = codes.astype(np.int64), [str(u) for u in uniques]
    elif mode == "group-dataset":
        raise CytologiaInputError(
            "group-dataset mode needs the data set of every image: a combined folder (cytologia combine) has them "
            "in sources.csv"
        )

    units, n_dup = _unit_ids(names, dup_groups)
    if mode == "stratified":
        agg: dict[str, str] = {f"class={c}": "max" for c in classes}
        agg.update(n_boxes="max", box_size="mean", img_size="mean", L_mean="mean", a_mean="mean", b_mean="mean")
        if src is not None:
            agg["source"] = "first"
        if datasets is not None:
            agg["dataset"] = "first"
        unit_table = images.reset_index(drop=True).groupby(units, sort=True).agg(agg)
        n_units = len(unit_table)
        if k > n_units:
            raise CytologiaInputError(f"k={k} folds but only {n_units} image(s)/duplicate group(s) to split")
        labels = stratification_labels(unit_table, classes)
        fold = _stratified_split(labels, k, seed)[units]
        label_columns = labels.columns.tolist()
        source_folds = None
    elif mode == "group-dataset":
        codes = images["dataset"].to_numpy(np.int64)
        blocks = _source_blocks(units, codes)
        has_dataset = np.ones(blocks.max() + 1, dtype=bool)
        fold, n_units = _group_source_split(blocks, has_dataset, k, seed, what="dataset")
        label_columns, source_folds = [], None
        linked = pd.Series(codes).groupby(blocks).nunique()
        if (linked > 1).any():
            warn(f"duplicate images link {int(linked[linked > 1].sum())} data sets to others: linked ones share a fold")
    else:
        if src is None:
            raise CytologiaInputError(
                "group-source mode needs acquisition sources: give an image folder (or features) to infer them, "
                "or a sources table"
            )
        blocks = _source_blocks(units, src)
        has_source = np.bincount(blocks, weights=(src != UNKNOWN_SOURCE).astype(float)) > 0
        fold, n_units = _group_source_split(blocks, has_source, k, seed)
        label_columns = []
        known = src != UNKNOWN_SOURCE
        source_folds = {str(s): int(f) for s, f in sorted(set(zip(src[known].tolist(), fold[known].tolist())))}
        per_block = pd.Series(src[known]).groupby(blocks[known]).nunique()
        if (per_block > 1).any():
            warn(
                f"duplicate images link {int(per_block[per_block > 1].sum())} sources to others: linked sources "
                "share a fold"
            )

    folds = pd.DataFrame({"NAME": names.to_numpy(), "fold": fold.astype(np.int64)}, columns=list(FOLD_COLUMNS))
    report = FoldReport(
        k=int(k),
        seed=int(seed),
        mode=mode,
        n_images=len(names),
        n_boxes=len(table),
        n_units=int(n_units),
        classes=classes,
        images_used=features is not None,
        n_unreadable=len(unreadable),
        unreadable=unreadable,
        n_duplicate_groups=n_dup,
        n_sources=n_src,
        source_folds=source_folds,
        label_columns=label_columns,
        seconds=0.0,
        warnings=notes,
        n_datasets=len(ds_names) if datasets is not None else None,
        dataset_folds=(
            {ds_names[c]: int(f) for c, f in sorted(set(zip(images["dataset"].tolist(), fold.tolist())))}
            if mode == "group-dataset"
            else None
        ),
        **_balance(fold, images, classes, box_img, box_cls, k),  # type: ignore[arg-type]
    )
    report.seconds = round(time.perf_counter() - start, 3)
    return folds, report


# ------------------------------------------------------------------------------------------------ a data folder
def read_split_table(path: Path) -> pd.DataFrame:
    """The annotation table (one row per box), checked for what the split needs: the columns, a non-empty NAME and
    class, and numeric corners. A bad row raises a :class:`ValidationError` naming the file and the (1-based) row."""
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CytologiaInputError(f"{path}: not a readable CSV table ({err})") from err
    missing = [c for c in TRAIN_COLUMNS if c not in table.columns]
    if missing:
        raise ValidationError(
            path, [(None, f"missing column(s) {', '.join(missing)}; expected {','.join(TRAIN_COLUMNS)}")]
        )
    problems: list[tuple[int | None, str]] = []
    for col in ("NAME", "class"):
        for row in np.flatnonzero(table[col].str.strip().to_numpy() == ""):
            problems.append((int(row) + 1, f"empty {col}"))
    for col in BOX_COLUMNS:
        raw = table[col].to_numpy()
        values = pd.to_numeric(table[col], errors="coerce")
        for row in np.flatnonzero(~np.isfinite(values.to_numpy(float))):
            problems.append((int(row) + 1, f"{col}={raw[row]!r} is not a number"))
        table[col] = values
    if problems:
        problems.sort(key=lambda p: p[0] or 0)
        raise ValidationError(path, problems[:_MAX_PROBLEMS], total=len(problems))
    return table


def _duplicate_groups(image_dir: Path, names: list[str], near_threshold: int) -> pd.Series | None:
    """NAME -> duplicate group id from cytologia.data.hygiene, or None (with a warning) when it is not available."""
    try:
        hygiene = importlib.import_module("cytologia.data.hygiene")
    except ModuleNotFoundError as err:
        if err.name != "cytologia.data.hygiene":
            raise
        log.warning("cytologia.data.hygiene is not available: duplicate images are not grouped")
        return None
    dups = hygiene.find_duplicates(image_dir, names, near_threshold=near_threshold)
    return dups.set_index("NAME")["dup_group"]


def folds_for_folder(
    data: str | Path,
    out: str | Path,
    *,
    k: int = 4,
    seed: int = 42,
    mode: str = "stratified",
    images: str | Path | None = None,
    use_images: bool = True,
    n_sources: int | None = None,
    dedup: bool = True,
    near_threshold: int = 4,
    workers: int | None = None,
    sources_out: str | Path | None = None,
) -> tuple[pd.DataFrame, FoldReport]:
    """Folds of every image of ``data/train.csv`` (:func:`make_folds`), written to ``out`` (``NAME,fold``) with the
    report as ``folds_report.json`` beside it; returns both.

    With the images (``images``, default ``data/images``, skipped with a warning when absent; ``use_images=False``
    ignores them) the split also uses image statistics (``workers`` decoding threads), duplicate groups (``dedup``,
    perceptual-hash distance ``near_threshold``) and the inferred acquisition sources (``n_sources``, default auto;
    written as ``NAME,source`` to ``sources_out`` when given). A combined folder's data sets (the ``dataset`` column of
    ``data/sources.csv``) are passed on as ``datasets``."""
    from cytologia.data.prepare import FOLDS_REPORT

    data, out = Path(data), Path(out)
    table = read_split_table(data / "train.csv")
    _check_args(table, k, mode)  # before the (slow) image reading
    names = list(pd.unique(table["NAME"].astype(str)))
    image_dir: Path | None = (Path(images) if images is not None else data / "images") if use_images else None
    if image_dir is not None and not image_dir.is_dir():
        if images is not None:
            raise CytologiaInputError(f"image folder {image_dir} does not exist")
        log.warning("%s has no images/ folder: image statistics skipped", data)
        image_dir = None

    features = image_features(image_dir, names, workers=workers) if image_dir is not None else None
    dup_groups = _duplicate_groups(image_dir, names, near_threshold) if image_dir is not None and dedup else None
    sources = None
    if features is not None:
        sources = infer_sources(features, n_sources=n_sources)  # fixed clustering seed: see make_folds
        if sources_out is not None:
            sources_out = Path(sources_out)
            sources_out.parent.mkdir(parents=True, exist_ok=True)
            sources.reset_index().to_csv(sources_out, index=False)

    from cytologia.data.combine import read_datasets

    folds, report = make_folds(
        table,
        k=k,
        seed=seed,
        mode=mode,
        dup_groups=dup_groups,
        features=features,
        sources=sources,
        datasets=read_datasets(data),  # a combined folder's data sets (None for one data set)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(out, index=False)
    (out.parent / FOLDS_REPORT).write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return folds, report
