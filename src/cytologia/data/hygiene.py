"""Data hygiene: clip boxes to their image, find exact and near-duplicate images.

Duplicates
----------
*Exact* duplicates have identical decoded pixels (a hash of the decoded array, so byte-different files with the same
pixels -- stripped metadata, re-optimised Huffman tables -- match too). *Near* duplicates have perceptual hashes
within ``near_threshold`` bits of Hamming distance. The perceptual hash is a 64-bit DCT pHash (the usual recipe:
32x32 grey, 2-D DCT, the 8x8 lowest frequencies compared with their median) computed on a 1/4-scale decode
(``cv2.IMREAD_REDUCED_GRAYSCALE_4``: libjpeg scales in the DCT domain, several times faster than a full decode).

No all-pairs comparison: by the pigeonhole principle, two 64-bit hashes within distance ``t`` agree exactly on at
least one of ``t + 1`` disjoint chunks, so images are bucketed by each chunk and only bucket-mates are compared.
Only images that have a candidate twin are fully decoded for the exact pixel hash. Groups are the connected
components of the duplicate pairs (union-find; SciPy's sparse ``connected_components``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from cytologia.data.images import imread, thread_map
from cytologia.data.schema import BOX_COLUMNS
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

DUPLICATE_COLUMNS: tuple[str, ...] = ("NAME", "split", "dup_group", "kind", "group_split", "phash", "readable")
EXACT, NEAR = "exact", "near"
MAX_NEAR_THRESHOLD = 16  # beyond 16 bits the 17+ chunks are ~3 bits wide: buckets hold n/8 images, i.e. all-pairs
# Candidates for the exact (pixel) check: hashes this close. Identical pixels give identical pHashes when both files
# are JPEGs (same DCT coefficients); 2 bits of slack cover a JPEG and a PNG of the same pixels, whose 1/4-scale
# decodes differ slightly (libjpeg scales in the DCT domain, other formats are resized after decoding).
_EXACT_CANDIDATE_BITS = 2
_HASH_SIDE = 32  # pHash input side (px) and kept low-frequency block (8x8 = 64 bits)
_HASH_LOW = 8


# ---------------------------------------------------------------------------------------------------------- clipping
def clip_boxes(table: pd.DataFrame, sizes: pd.DataFrame | Mapping[str, tuple[int, int]] | None = None) -> pd.DataFrame:
    """Clip boxes to their image: x to [0, img_w], y to [0, img_h] (corner coordinates, so x2 may equal img_w).

    ``sizes`` is a table ``NAME,img_w,img_h`` or a mapping NAME -> (w, h); when None the table's own ``img_w``,
    ``img_h`` columns are used. Rows whose size is unknown (missing or -1) are left as they are. Returns a copy with
    ``img_w``/``img_h`` filled and two boolean columns: ``clipped`` (a coordinate changed) and ``empty`` (x2 <= x1 or
    y2 <= y1 after clipping: nothing of the box is inside the image). Vectorised.
    """
    out = table.copy()
    if sizes is not None:
        if isinstance(sizes, Mapping):
            names = list(sizes)
            sizes = pd.DataFrame(
                {"NAME": names, "img_w": [sizes[n][0] for n in names], "img_h": [sizes[n][1] for n in names]}
            )
        lookup = sizes.drop_duplicates("NAME").set_index("NAME")
        idx = lookup.index.get_indexer(out["NAME"])
        w = np.where(idx >= 0, lookup["img_w"].to_numpy(np.int64)[idx], -1)
        h = np.where(idx >= 0, lookup["img_h"].to_numpy(np.int64)[idx], -1)
        out["img_w"], out["img_h"] = w, h
    elif "img_w" not in out.columns or "img_h" not in out.columns:
        raise ValueError("clip_boxes: no sizes given and the table has no img_w/img_h columns")
    w = out["img_w"].to_numpy(np.float64)
    h = out["img_h"].to_numpy(np.float64)
    known = (w > 0) & (h > 0)
    box = out[list(BOX_COLUMNS)].to_numpy(np.float64)
    lim = np.stack([w, h, w, h], axis=1)
    clipped = np.where(known[:, None], np.clip(box, 0.0, lim), box)
    out[list(BOX_COLUMNS)] = clipped
    out["clipped"] = (clipped != box).any(axis=1)
    out["empty"] = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    return out


# ------------------------------------------------------------------------------------------------------------ hashes
def phash_array(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a greyscale image (any size): bit i is set when the i-th of the 8x8
    lowest-frequency DCT coefficients of the 32x32 area-resized image exceeds their median (row-major, bit 63 first)."""
    small = cv2.resize(gray, (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:_HASH_LOW, :_HASH_LOW].ravel()
    bits = low > np.median(low)
    return int(np.packbits(bits).view(">u8")[0])


def _phash_file(path: Path) -> int | None:
    gray = imread(path, cv2.IMREAD_REDUCED_GRAYSCALE_4 | cv2.IMREAD_IGNORE_ORIENTATION)
    if gray is None or gray.size == 0:
        return None
    return phash_array(gray)


def perceptual_hash(path: str | Path) -> int:
    """The pHash of an image file (1/4-scale decode); unreadable files raise :class:`CytologiaInputError`."""
    value = _phash_file(Path(path))
    if value is None:
        raise CytologiaInputError(f"{path}: cannot decode image")
    return value


def pixel_hash(path: str | Path) -> str | None:
    """Hex BLAKE2b digest of the decoded BGR pixels and their shape; None when the file cannot be decoded."""
    image = imread(path, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.asarray(image.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) of 64-bit hashes within ``threshold`` bits, without comparing all pairs.

    Pigeonhole: split the 64 bits into ``threshold + 1`` chunks; a pair within the threshold shares at least one
    chunk exactly. For each chunk the hashes are sorted by chunk value and each one is compared with the next
    members of its run (offset 1, 2, ... until no run is that long), so the work is the number of bucket-mate pairs.
    """
    if not 0 <= threshold <= MAX_NEAR_THRESHOLD:
        raise ValueError(f"near threshold must be in [0, {MAX_NEAR_THRESHOLD}] bits, got {threshold}")
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    found_i: list[np.ndarray] = []
    found_j: list[np.ndarray] = []
    bounds = np.linspace(0, 64, threshold + 2).astype(int)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        keys = (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        order = np.argsort(keys, kind="stable")
        k = keys[order]
        new_run = np.r_[True, k[1:] != k[:-1]]
        starts = np.flatnonzero(new_run)
        run = np.cumsum(new_run) - 1
        sizes = np.diff(np.r_[starts, n])
        later = sizes[run] - (np.arange(n) - starts[run]) - 1  # members after this one in its run
        idx = np.flatnonzero(later > 0)
        d = 1
        while idx.size:
            a, b = order[idx], order[idx + d]
            close = popcount64(h[a] ^ h[b]) <= threshold
            found_i.append(np.minimum(a, b)[close])
            found_j.append(np.maximum(a, b)[close])
            idx = idx[later[idx] > d]
            d += 1
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    code = np.unique(np.concatenate(found_i).astype(np.int64) * n + np.concatenate(found_j))
    return code // n, code % n


def _components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group id per node (0..G-1 in order of first member) for groups of >= 2 nodes; -1 for singletons."""
    from scipy.sparse import coo_matrix  # here, not at the top: prediction imports this module (clip_boxes) without
    from scipy.sparse.csgraph import connected_components  # scipy, a training dependency (cytologia[infer])

    out = np.full(n, -1, np.int64)
    if n == 0:
        return out
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    grouped = np.bincount(labels)[labels] >= 2
    if grouped.any():
        _, first = np.unique(labels[grouped], return_index=True)  # first member (in node order) of each group
        rank = np.empty(len(first), np.int64)
        rank[np.argsort(first)] = np.arange(len(first))
        _, inverse = np.unique(labels[grouped], return_inverse=True)
        out[grouped] = rank[inverse]
    return out


# -------------------------------------------------------------------------------------------------------- duplicates
def find_duplicates(
    image_dir: str | Path,
    names: Sequence[str],
    near_threshold: int | None = 4,
    test_names: Sequence[str] | None = None,
    *,
    test_dir: str | Path | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Exact and near-duplicate groups over train images ``names`` (and optionally test images ``test_names``).

    Images are read from ``image_dir`` (test images from ``test_dir``, default the same folder). Returns one row per
    input name (train first, then test, in order) with columns :data:`DUPLICATE_COLUMNS`:

    - ``dup_group``: int, equal for images of one group, -1 for an image without a duplicate (or unreadable);
    - ``kind``: ``"exact"`` when the image has a pixel-identical twin, ``"near"`` when it is only grouped by its
      perceptual hash (distance <= ``near_threshold``; None disables near grouping), ``""`` when unique;
    - ``split``: ``"train"``/``"test"``; ``group_split``: ``"train"``, ``"test"`` or ``"train-test"`` for the splits
      of the image's group (``""`` when unique); ``phash``: 16 hex digits (``""`` when unreadable);
    - ``readable``: False for missing/undecodable files (logged with a count).

    Groups are transitive (A~B and B~C puts A, B, C in one group). :func:`duplicate_summary` counts them.
    """
    image_dir = Path(image_dir)
    test_dir = image_dir if test_dir is None else Path(test_dir)
    if near_threshold is not None and not 0 <= near_threshold <= MAX_NEAR_THRESHOLD:
        raise ValueError(f"near_threshold must be in [0, {MAX_NEAR_THRESHOLD}] or None, got {near_threshold}")
    names = [str(n) for n in names]
    test_names = [str(n) for n in (test_names or ())]
    for split, listed in (("train", names), ("test", test_names)):
        if len(set(listed)) != len(listed):
            raise CytologiaInputError(f"find_duplicates: the {split} names repeat (give each image once)")
    paths = [image_dir / n for n in names] + [test_dir / n for n in test_names]
    n = len(paths)
    hashes_opt = thread_map(_phash_file, paths, workers)
    readable = np.array([v is not None for v in hashes_opt], dtype=bool)
    hashes = np.array([v if v is not None else 0 for v in hashes_opt], dtype=np.uint64)
    if not readable.all():
        bad = [str(p) for p, ok in zip(paths, readable) if not ok]
        log.warning(
            "%d of %d images could not be decoded and are left ungrouped: %s%s",
            len(bad),
            n,
            ", ".join(bad[:5]),
            " ..." if len(bad) > 5 else "",
        )
    ok_idx = np.flatnonzero(readable)

    # Candidate pairs at the larger of the two radii, then split into exact (same pixels) and near (<= threshold).
    radius = max(_EXACT_CANDIDATE_BITS, near_threshold or 0)
    ci, cj = near_pairs(hashes[ok_idx], radius)
    ci, cj = ok_idx[ci], ok_idx[cj]
    distance = popcount64(hashes[ci] ^ hashes[cj])
    to_hash = np.unique(np.r_[ci, cj])
    pixel = np.full(n, "", dtype=object)  # "" = not hashed or undecodable
    for k, digest in zip(to_hash, thread_map(pixel_hash, [paths[k] for k in to_hash], workers)):
        pixel[k] = digest or ""
    same = (pixel[ci] == pixel[cj]) & (pixel[ci] != "")
    keep = same | ((distance <= near_threshold) if near_threshold is not None else np.zeros(len(ci), bool))
    group = _components(n, ci[keep], cj[keep])

    exact_member = np.zeros(n, dtype=bool)
    exact_member[ci[same]] = True
    exact_member[cj[same]] = True
    kind = np.where(group < 0, "", np.where(exact_member, EXACT, NEAR))
    split = np.array(["train"] * len(names) + ["test"] * len(test_names), dtype=object)
    table = pd.DataFrame(
        {
            "NAME": pd.Series(names + test_names, dtype=object),
            "split": split,
            "dup_group": group,
            "kind": kind.astype(object),
            "phash": [f"{int(v):016x}" if ok else "" for v, ok in zip(hashes, readable)],
            "readable": readable,
        }
    )
    in_group = table["dup_group"] >= 0
    splits = table.loc[in_group].groupby("dup_group")["split"].agg(lambda s: "-".join(sorted(set(s), reverse=True)))
    group_split = splits.to_dict()
    table["group_split"] = pd.Series([group_split.get(g, "") for g in group.tolist()], dtype=object)
    table = table[list(DUPLICATE_COLUMNS)]
    if in_group.any():
        summary = duplicate_summary(table)
        log.info(
            "duplicates: %d groups (%d exact, %d near) over %d images; %d train-only, %d train-test",
            summary["groups"],
            summary["exact_groups"],
            summary["near_groups"],
            summary["images_in_groups"],
            summary["train_only_groups"],
            summary["train_test_groups"],
        )
    return table


def duplicate_summary(dups: pd.DataFrame) -> dict[str, int]:
    """Counts of a :func:`find_duplicates` table: groups by kind (a group is ``exact`` when all its members are
    pixel-identical) and by split (train-only, train-test, test-only), images in groups, and the train images a
    train-only de-duplication would remove (all but one per train-only group)."""
    g = dups.loc[dups["dup_group"] >= 0]
    per_group = pd.DataFrame(
        {
            "size": g.groupby("dup_group").size(),
            "all_exact": (g["kind"] == EXACT).groupby(g["dup_group"]).all(),
            "split": g.groupby("dup_group")["group_split"].first(),
        }
    )
    train_only = per_group["split"] == "train"
    return {
        "images": int(len(dups)),
        "unreadable": int((~dups["readable"].astype(bool)).sum()),
        "groups": int(len(per_group)),
        "exact_groups": int(per_group["all_exact"].sum()),
        "near_groups": int(len(per_group) - per_group["all_exact"].sum()),
        "images_in_groups": int(len(g)),
        "train_only_groups": int(train_only.sum()),
        "train_test_groups": int((per_group["split"] == "train-test").sum()),
        "test_only_groups": int((per_group["split"] == "test").sum()),
        "train_removable": int((per_group.loc[train_only, "size"] - 1).sum()),
    }
