"""Write a synthetic Cytologia data set in the exact Trustii layout, with every injected defect listed.

    from cytologia.data.synthetic.generate import SynthConfig, generate
    summary = generate("data/synth", n_images=500, seed=0, config=SynthConfig(size=368), workers=2)

Output folder::

    images/*.jpg       names like the real ones (``[0-9a-f]{8}-[0-9a-f].jpg``), unique
    train.csv          NAME,x1,y1,x2,y2,class            (with the training defects)
    test.csv           trustii_id,NAME                   one row per test box, shuffled, no two rows of one
                                                         image adjacent, ids unique
    test_labels.csv    trustii_id,NAME,x1,y1,x2,y2,class clean truth for scoring, same row order as test.csv
    noise.csv          every injected defect (see :mod:`cytologia.data.synthetic.defects`)
    sources.csv        NAME,source                       acquisition source of every image (evaluation only)
    smears.csv         NAME,smear,profile                the smear (patient) of every image, grouped from the images
                                                         drawn (evaluation only; :mod:`.smears`)
    synth.json         seed, configuration, counts, generator version

Determinism: a plan (splits, sources, classes, which defects go where, file names) is drawn in the calling process
from ``SeedSequence(seed, spawn_key=(0,))``; image ``i`` is then rendered with its own generator
``SeedSequence(seed, spawn_key=(1, i))`` and its defects drawn from ``(2, i)``, so the bytes of every file depend
on (seed, config) only, not on ``workers`` or on the order the workers finish in. ``synth.json`` holds no timing.

Splits: ``test_fraction`` of the images are test images (default: the real 30 %). Cells cut by the image border
occur in both splits at the ``past_border`` rate; only in training are their boxes written unclipped (a defect),
test labels are always clipped to the image.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cytologia.data.schema import CLASSES, SUBMISSION_COLUMNS, TEST_COLUMNS, TRAIN_COLUMNS
from cytologia.data.synthetic.defects import (
    KINDS,
    NOISE_COLUMNS,
    DefectRates,
    draw_shift,
    insert_extraneous_bytes,
    jitter_box,
    reencode,
    shift_boxes,
    shift_image,
    truncate_jpeg,
)
from cytologia.data.synthetic.render import encode_jpeg, render_scene
from cytologia.data.synthetic.smears import ensure_smears
from cytologia.data.synthetic.sources import SOURCES, source_weights
from cytologia.data.synthetic.stats import (
    RealStats,
    assign_classes,
    class_quotas,
    draw_cells_per_image,
    load_real_stats,
)
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"  # bump when the same (seed, config) gives different files
SOURCES_COLUMNS: tuple[str, ...] = ("NAME", "source")
OUTPUT_FILES: tuple[str, ...] = (
    "train.csv",
    "test.csv",
    "test_labels.csv",
    "noise.csv",
    "sources.csv",
    "synth.json",
    "smears.csv",
)
MIN_SIZE, MAX_SIZE = 64, 2048
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SynthConfig:
    """What to generate besides the number of images and the seed."""

    size: int | None = None  # square side in px for every image; None: each source's own size (352-608 px)
    test_fraction: float | None = None  # share of test images; None: the real share (30 %)
    defects: DefectRates = field(default_factory=DefectRates)
    min_per_class: int = 3  # every class gets at least this many boxes per split when the split has room

    def __post_init__(self) -> None:
        if self.size is not None and not (MIN_SIZE <= self.size <= MAX_SIZE):
            raise ValueError(f"size={self.size} px is outside [{MIN_SIZE}, {MAX_SIZE}]")
        if self.test_fraction is not None and not (0.0 <= self.test_fraction < 1.0):
            raise ValueError(f"test_fraction={self.test_fraction} must be in [0, 1)")
        if self.min_per_class < 0:
            raise ValueError(f"min_per_class={self.min_per_class} must be >= 0")


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote. ``seconds`` is wall time (not stored in synth.json)."""

    out_dir: Path
    n_images: int
    n_train_images: int
    n_train_rows: int
    n_test_images: int
    n_test_boxes: int
    defects: dict[str, int]
    seconds: float
    workers: int

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Copy:
    name: str
    kind: str  # duplicate_exact | duplicate_reencoded | duplicate_shifted
    split: str


@dataclass(frozen=True)
class _Task:
    """Everything a worker needs to render one base image (and write its copies)."""

    index: int
    name: str
    split: str
    source: str
    classes: tuple[str, ...]
    past_border: tuple[int, ...] = ()
    jitter: tuple[int, ...] = ()
    unannotated: int = 0
    red_cell: str = ""  # "", "extra" or "replace"
    red_replace_index: int = -1
    corrupt: str = ""  # "", "truncated_jpeg" or "extraneous_bytes"
    copies: tuple[_Copy, ...] = ()


@dataclass
class _Result:
    """A worker's answer: rows per image name (train rows in box order), noise rows and sources."""

    index: int
    train: dict[str, list[tuple]] = field(default_factory=dict)
    test: list[tuple] = field(default_factory=list)
    noise: list[dict[str, Any]] = field(default_factory=list)
    sources: list[tuple[str, str]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# plan


def _sround(rng: np.random.Generator, x: float) -> int:
    """Stochastic rounding: floor(x) plus one with probability frac(x), so counts have the exact expectation."""
    base = math.floor(x)
    return int(base + (rng.random() < x - base))


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` unique names like the real ones: 8 hex digits, '-', 1 hex digit, '.jpg'."""
    out: list[str] = []
    seen: set[int] = set()
    while len(out) < n:
        for v in rng.integers(0, 2**36, size=n - len(out), dtype=np.int64):
            v = int(v)
            if v not in seen:
                seen.add(v)
                out.append(f"{v >> 4:08x}-{v & 15:x}.jpg")
    return out


def _pick(rng: np.random.Generator, pool: np.ndarray, k: int) -> np.ndarray:
    """``k`` distinct elements of ``pool`` (all of it when ``k`` is larger), in draw order."""
    k = min(k, len(pool))
    return rng.choice(pool, size=k, replace=False) if k > 0 else np.array([], dtype=pool.dtype)


def _plan(n_images: int, seed: int, cfg: SynthConfig, stats: RealStats) -> tuple[list[_Task], list[str]]:
    """Draw the whole data set's layout; returns the tasks and the training image names in train.csv order."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    rates = cfg.defects
    test_fraction = 1.0 - stats.train_image_fraction if cfg.test_fraction is None else cfg.test_fraction

    n_exact = _sround(rng, rates.exact_duplicate * n_images)
    n_near = _sround(rng, rates.near_duplicate * n_images)
    n_copies = min(n_exact + n_near, n_images // 2)  # copies never outnumber the images they copy
    n_exact = min(n_exact, n_copies)
    n_base = n_images - n_copies
    n_cross = _sround(rng, rates.cross_split * n_copies) if test_fraction > 0 else 0
    n_test_base = min(max(0, round(test_fraction * n_images) - n_cross), n_base - 1)
    n_train_base = n_base - n_test_base

    src_idx = rng.choice(len(SOURCES), size=n_base, p=source_weights())
    splits = ["train"] * n_train_base + ["test"] * n_test_base
    classes: list[list[str]] = []
    for n_split in (n_train_base, n_test_base):
        cells = draw_cells_per_image(rng, n_split, stats)
        quota = class_quotas(rng, int(cells.sum()), stats, cfg.min_per_class)
        classes += assign_classes(rng, cells, quota, stats) if n_split else []

    # boxes cut by the border: both splits (only training boxes are written unclipped)
    past: dict[int, set[int]] = {i: set() for i in range(n_base)}
    for lo, hi in ((0, n_train_base), (n_train_base, n_base)):
        boxes = np.array([(i, j) for i in range(lo, hi) for j in range(len(classes[i]))], dtype=np.int64)
        if len(boxes):
            for k in _pick(rng, np.arange(len(boxes)), _sround(rng, rates.past_border * len(boxes))):
                past[int(boxes[k, 0])].add(int(boxes[k, 1]))

    train_idx = np.arange(n_train_base)
    unannotated = set(_pick(rng, train_idx, _sround(rng, rates.unannotated_border * n_train_base)).tolist())
    red = _pick(rng, train_idx, _sround(rng, rates.red_cell * n_train_base)).tolist()
    red_mode = {int(i): ("extra" if rng.random() < 0.5 else "replace") for i in red}
    red_index: dict[int, int] = {}
    for i, m in red_mode.items():  # the replaced box is one not already written past the border
        free = [j for j in range(len(classes[i])) if j not in past[i]]
        if m == "replace" and free:
            red_index[i] = int(free[int(rng.integers(len(free)))])
        else:
            red_mode[i], red_index[i] = "extra", -1
    n_trunc = _sround(rng, rates.truncated_jpeg * n_train_base)
    n_extra = _sround(rng, rates.extraneous_bytes * n_train_base)
    corrupt_idx = _pick(rng, train_idx, n_trunc + n_extra).tolist()
    corrupt = {int(i): ("truncated_jpeg" if k < n_trunc else "extraneous_bytes") for k, i in enumerate(corrupt_idx)}

    jitter: dict[int, set[int]] = {i: set() for i in range(n_train_base)}
    boxes = np.array(
        [
            (i, j)
            for i in range(n_train_base)
            for j in range(len(classes[i]))
            if j not in past[i] and j != red_index.get(i)
        ],
        dtype=np.int64,
    ).reshape(-1, 2)
    n_train_boxes = sum(len(classes[i]) for i in range(n_train_base))
    for k in _pick(rng, np.arange(len(boxes)), _sround(rng, rates.box_jitter * n_train_boxes)):
        jitter[int(boxes[k, 0])].add(int(boxes[k, 1]))

    # duplicates: copies of clean-looking training images (no corrupt file, no red cell, no hidden leukocyte)
    names = _names(rng, n_images)
    copies: dict[int, list[_Copy]] = {}
    if n_copies:
        candidates = np.array(
            [i for i in range(n_train_base) if i not in corrupt and i not in red_mode and i not in unannotated]
        )
        if len(candidates) == 0:
            raise ValueError(f"defect rates leave no clean training image to duplicate among {n_images} images")
        originals = rng.choice(candidates, size=n_copies, replace=n_copies > len(candidates))
        cross = set(rng.permutation(n_copies)[:n_cross].tolist())
        for k, orig in enumerate(originals):
            kind = (
                "duplicate_exact"
                if k < n_exact
                else ("duplicate_reencoded" if rng.random() < 0.5 else "duplicate_shifted")
            )
            copies.setdefault(int(orig), []).append(_Copy(names[n_base + k], kind, "test" if k in cross else "train"))

    tasks = [
        _Task(
            index=i,
            name=names[i],
            split=splits[i],
            source=SOURCES[int(src_idx[i])].name,
            classes=tuple(classes[i]),
            past_border=tuple(sorted(past[i])),
            jitter=tuple(sorted(jitter.get(i, ()))),
            unannotated=int(i in unannotated),
            red_cell=red_mode.get(i, ""),
            red_replace_index=red_index.get(i, -1),
            corrupt=corrupt.get(i, ""),
            copies=tuple(copies.get(i, ())),
        )
        for i in range(n_base)
    ]
    train_names = [t.name for t in tasks if t.split == "train"]
    train_names += [c.name for t in tasks for c in t.copies if c.split == "train"]
    order = rng.permutation(len(train_names))
    return tasks, [train_names[k] for k in order]


# ----------------------------------------------------------------------------------------------------------------
# one image (runs in a worker)


def _noise(
    name: str, split: str, kind: str, box_index: int = -1, cls: str = "", box: Box | None = None, details: str = ""
) -> dict[str, Any]:
    x1, y1, x2, y2 = box if box is not None else ("", "", "", "")
    return {
        "NAME": name,
        "split": split,
        "kind": kind,
        "box_index": box_index,
        "class": cls,
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
        "details": details,
    }


def _box_str(b: Box) -> str:
    return " ".join(str(int(v)) for v in b)


def _render_task(task: _Task, images_dir: Path, seed: int, size: int | None) -> _Result:
    """Render one base image and its copies, write their files, return their rows."""
    stats = load_real_stats()
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, task.index)))
    scene = render_scene(
        rng,
        task.source,
        task.classes,
        size,
        past_border=task.past_border,
        unannotated_border=task.unannotated,
        red_cells=1 if task.red_cell else 0,
        stats=stats,
    )
    H, W = scene.image.shape[:2]
    drng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, task.index)))
    res = _Result(task.index)
    name, split = task.name, task.split
    clean = [(c.clipped, c.cls) for c in scene.cells]

    if split == "test":
        res.test = [(name, *b, c) for b, c in clean]
    else:
        rows: list[tuple] = []
        for j, cell in enumerate(scene.cells):
            written = cell.clipped
            if j in task.past_border:
                written = cell.box
                res.noise.append(
                    _noise(name, split, "past_border", j, cell.cls, cell.clipped, f"written={_box_str(written)}")
                )
            elif j == task.red_replace_index:
                written = scene.red_cells[0]
                res.noise.append(
                    _noise(name, split, "red_cell_replace", j, cell.cls, cell.clipped, f"red_cell={_box_str(written)}")
                )
            elif j in task.jitter:
                written = jitter_box(drng, cell.clipped, W, H)
                res.noise.append(
                    _noise(name, split, "box_jitter", j, cell.cls, cell.clipped, f"written={_box_str(written)}")
                )
            rows.append((name, *written, cell.cls))
        if task.red_cell == "extra":
            red_box, cls = scene.red_cells[0], task.classes[0]
            res.noise.append(_noise(name, split, "red_cell_extra", len(rows), cls, red_box, "a red cell, no leukocyte"))
            rows.append((name, *red_box, cls))
        for cell in scene.unannotated:
            res.noise.append(_noise(name, split, "unannotated_border", -1, cell.cls, cell.clipped, "not in train.csv"))
        res.train[name] = rows
    res.sources.append((name, task.source))

    data = encode_jpeg(scene.image, task.source)
    written_bytes = data
    if task.corrupt == "truncated_jpeg":
        written_bytes, details = truncate_jpeg(drng, data)
        res.noise.append(_noise(name, split, task.corrupt, details=details))
    elif task.corrupt == "extraneous_bytes":
        written_bytes, details = insert_extraneous_bytes(drng, data)
        res.noise.append(_noise(name, split, task.corrupt, details=details))
    (images_dir / name).write_bytes(written_bytes)

    scale = min(W, H) / stats.reference_px
    for cp in task.copies:
        boxes = [b for b, _ in clean]
        kind = cp.kind
        shift = draw_shift(drng, boxes, W, H, scale) if kind == "duplicate_shifted" else None
        if kind == "duplicate_shifted" and shift is None:
            kind = "duplicate_reencoded"  # no shift keeps every box in the image (a cell at the very border)
        if kind == "duplicate_exact":
            out, details = data, f"of={name}"
        elif kind == "duplicate_reencoded":
            out, how = reencode(drng, data)
            details = f"of={name} {how}"
        else:
            assert shift is not None
            dx, dy = shift
            decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            out = encode_jpeg(shift_image(decoded, dx, dy), task.source)
            boxes = shift_boxes(boxes, dx, dy, W, H)
            details = f"of={name} dx={dx} dy={dy}"
        (images_dir / cp.name).write_bytes(out)
        cp_rows = [(cp.name, *b, c) for b, (_, c) in zip(boxes, clean)]
        if cp.split == "test":
            res.test += cp_rows
        else:
            res.train[cp.name] = cp_rows
        res.noise.append(_noise(cp.name, cp.split, kind, details=details))
        res.sources.append((cp.name, task.source))
    return res


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core: OpenCV's own threads would only compete


def _run_chunk(args: tuple[list[_Task], str, int, int | None]) -> list[_Result]:
    tasks, images_dir, seed, size = args
    return [_render_task(t, Path(images_dir), seed, size) for t in tasks]


def _mp_context() -> mp.context.BaseContext:
    """forkserver where it exists: workers fork from a clean server process (none of the caller's threads, e.g.
    torch's) and start in milliseconds once the server has imported this module. spawn and forkserver re-import the
    caller's ``__main__`` from its file; a main read from stdin (``python - < script``) has none, so fork then."""
    methods = mp.get_all_start_methods()
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file is not None and not os.path.isfile(main_file) and "fork" in methods:
        return mp.get_context("fork")
    if "forkserver" in methods:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
        return ctx
    return mp.get_context("spawn")


def _results(tasks: list[_Task], images_dir: Path, seed: int, size: int | None, workers: int) -> Iterator[_Result]:
    if workers <= 1 or len(tasks) < 2:
        prev = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            for t in tasks:
                yield _render_task(t, images_dir, seed, size)
        finally:
            cv2.setNumThreads(prev)
        return
    ctx = _mp_context()
    n_chunks = min(len(tasks), workers * 8)
    chunks = [tasks[k::n_chunks] for k in range(n_chunks)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
        for batch in pool.map(_run_chunk, [(c, str(images_dir), seed, size) for c in chunks]):
            yield from batch


# ----------------------------------------------------------------------------------------------------------------
# tables


def spread_rows(rng: np.random.Generator, names: list[str]) -> np.ndarray:
    """A random order of ``names`` in which no two equal names are adjacent (when that is possible)."""
    order = rng.permutation(len(names))
    seq = [names[k] for k in order]
    n = len(seq)

    def ok(pos: int, value: str, skip: int = -1) -> bool:
        return all(not (0 <= q < n and q != skip and seq[q] == value) for q in (pos - 1, pos + 1))

    for i in range(1, n):
        if seq[i] != seq[i - 1]:
            continue
        start = int(rng.integers(n))
        for step in range(n):
            j = (start + step) % n
            if abs(j - i) > 1 and seq[j] != seq[i] and ok(i, seq[j], skip=i) and ok(j, seq[i], skip=j):
                seq[i], seq[j] = seq[j], seq[i]
                order[i], order[j] = order[j], order[i]
                break
    return order


def _clear(out_dir: Path, overwrite: bool) -> Path:
    images = out_dir / "images"
    existing = [p for p in (images, *(out_dir / f for f in OUTPUT_FILES)) if p.exists()]
    if existing and not overwrite:
        raise CytologiaInputError(
            f"{out_dir}: already holds a data set ({', '.join(p.name for p in existing)}); pass overwrite=True "
            "(CLI: --overwrite) to replace it"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    images.mkdir(parents=True)
    return images


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def generate(
    out_dir: str | Path,
    n_images: int,
    seed: int = 0,
    config: SynthConfig | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> SynthSummary:
    """Write a synthetic data set of ``n_images`` images (copies included) to ``out_dir``; see the module doc."""
    if n_images < 1:
        raise ValueError(f"n_images={n_images} must be >= 1")
    workers = max(1, int(workers))
    cfg = config or SynthConfig()
    stats = load_real_stats()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    images_dir = _clear(out_dir, overwrite)
    tasks, train_order = _plan(n_images, seed, cfg, stats)

    results = sorted(_results(tasks, images_dir, seed, cfg.size, workers), key=lambda r: r.index)
    train_by_name: dict[str, list[tuple]] = {}
    test_rows: list[tuple] = []
    noise: list[dict[str, Any]] = []
    sources: list[tuple[str, str]] = []
    for r in results:
        train_by_name.update(r.train)
        test_rows += r.test
        noise += r.noise
        sources += r.sources

    # train.csv in the planned (shuffled) image order; noise rows learn their 1-based row numbers from it
    first_row: dict[str, int] = {}
    train_rows: list[tuple] = []
    for name in train_order:
        first_row[name] = len(train_rows) + 1
        train_rows += train_by_name[name]
    for row in noise:
        bi = row["box_index"]
        row["train_row"] = first_row[row["NAME"]] + bi if bi >= 0 and row["split"] == "train" else -1
    rank = {name: k for k, name in enumerate(train_order)}
    noise.sort(key=lambda r: (rank.get(r["NAME"], len(rank)), r["NAME"], r["box_index"]))

    train = pd.DataFrame(train_rows, columns=list(TRAIN_COLUMNS))
    truth = pd.DataFrame(test_rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"])
    srng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    truth = truth.iloc[spread_rows(srng, truth["NAME"].tolist())].reset_index(drop=True)
    # ids like the real ones: unique integers drawn from 1..(train + test boxes), in no particular order
    pool = len(train) + len(truth)
    truth.insert(0, "trustii_id", srng.choice(np.arange(1, pool + 1), size=len(truth), replace=False))
    _write_csv(train, out_dir / "train.csv")
    _write_csv(truth[list(TEST_COLUMNS)], out_dir / "test.csv")
    _write_csv(truth[list(SUBMISSION_COLUMNS)], out_dir / "test_labels.csv")
    _write_csv(pd.DataFrame(noise, columns=list(NOISE_COLUMNS)), out_dir / "noise.csv")
    src_df = pd.DataFrame(sorted(sources), columns=list(SOURCES_COLUMNS))
    _write_csv(src_df, out_dir / "sources.csv")

    counts = {k: 0 for k in KINDS}
    for row in noise:
        counts[str(row["kind"])] += 1
    n_test_images = int(truth["NAME"].nunique())
    info = {
        "generator": "cytologia.data.synthetic",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_images": int(n_images),
        "size": cfg.size,
        "test_fraction": cfg.test_fraction,
        "min_per_class": cfg.min_per_class,
        "rates": cfg.defects.as_dict(),
        "counts": {
            "train_images": len(train_order),
            "train_rows": len(train),
            "test_images": n_test_images,
            "test_boxes": len(truth),
            "defects": counts,
            "classes_train": {c: int((train["class"] == c).sum()) for c in CLASSES},
            "classes_test": {c: int((truth["class"] == c).sum()) for c in CLASSES},
            "sources": {s.name: int((src_df["source"] == s.name).sum()) for s in SOURCES},
        },
    }
    (out_dir / "synth.json").write_text(json.dumps(info, indent=1) + "\n")
    ensure_smears(out_dir)  # drawn from the tables just written, on a stream of its own: they do not change
    seconds = time.perf_counter() - t0
    summary = SynthSummary(
        out_dir=out_dir,
        n_images=n_images,
        n_train_images=len(train_order),
        n_train_rows=len(train),
        n_test_images=n_test_images,
        n_test_boxes=len(truth),
        defects=counts,
        seconds=seconds,
        workers=workers,
    )
    log.info(
        "wrote %d images (%d train, %d test) to %s in %.1f s (%.0f images/s, %d worker(s)); %d defects",
        n_images,
        summary.n_train_images,
        n_test_images,
        out_dir,
        seconds,
        summary.images_per_s,
        workers,
        sum(counts.values()),
    )
    return summary


def cpu_count() -> int:
    """CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
