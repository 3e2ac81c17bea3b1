"""Defects injected into the synthetic training set, each with its truth kept: rates, kinds and the byte/box edits.

Every defect the generator injects is one row of ``noise.csv`` (:data:`NOISE_COLUMNS`); ``kind`` is one of
:data:`KINDS`. The columns mean, per kind:

=====================  =========================  ==============================================================
kind                   train_row / box_index      x1..y2, class
=====================  =========================  ==============================================================
box_jitter             the jittered row           the clean box and class (the row holds the moved box)
past_border            the row (unclipped box)    the clean box, clipped to the image
red_cell_extra         the added row              the red cell's box and the class written on it (no leukocyte)
red_cell_replace       the row now on a red cell  the leukocyte that row should box (now unannotated); the red
                                                  cell's box is in ``details``
unannotated_border     -1 (no row)                the unannotated leukocyte's clipped box and class
duplicate_exact        -1                         empty; ``NAME`` is the copy, ``details`` names the original
duplicate_reencoded    -1                         empty; the copy was decoded and re-saved with standard tables
duplicate_shifted      -1                         empty; the copy is shifted by (dx, dy) px, its boxes too
truncated_jpeg         -1                         empty; the file ends inside the entropy-coded data
extraneous_bytes       -1                         empty; junk bytes sit before the EOI marker, libjpeg warns
                                                  "Corrupt JPEG data: N extraneous bytes before marker 0xd9"
=====================  =========================  ==============================================================

``train_row`` is 1-based over the data rows of ``train.csv`` (row 1 is the line after the header, as in
:class:`cytologia.errors.ValidationError`); ``box_index`` is the row's 0-based position among its image's rows.
Test labels are never touched: duplicates copied into the test split carry their clean boxes.

Default rates (:class:`DefectRates`) follow the real training table where it tells: ~1,000 of 52,748 boxes pass the
border (~2 %), ~150 exact duplicate images among 48,417 (~0.3 %); the others (jitter, red cells, unannotated cells,
corrupt files) are not counted in the real set and are set to small values of the same order.
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np
from PIL import Image

from cytologia.boxes import iou_scalar

NOISE_COLUMNS: tuple[str, ...] = (
    "NAME",
    "split",
    "kind",
    "train_row",
    "box_index",
    "class",
    "x1",
    "y1",
    "x2",
    "y2",
    "details",
)
BOX_KINDS: tuple[str, ...] = ("box_jitter", "past_border", "red_cell_extra", "red_cell_replace")
IMAGE_KINDS: tuple[str, ...] = ("unannotated_border", "truncated_jpeg", "extraneous_bytes")
DUPLICATE_KINDS: tuple[str, ...] = ("duplicate_exact", "duplicate_reencoded", "duplicate_shifted")
KINDS: tuple[str, ...] = BOX_KINDS + IMAGE_KINDS + DUPLICATE_KINDS

EOI = b"\xff\xd9"  # JPEG end-of-image marker
SOS = b"\xff\xda"  # start-of-scan marker: the entropy-coded data follows its header
# Junk inserted before EOI. libjpeg-turbo's Huffman decoder reads a few bytes ahead of the last MCU (3-6 seen with
# OpenCV 5.0); those are not counted in its warning, so fewer than ~8 inserted bytes may pass silently. 12-48 bytes
# always warn, with a count of (inserted - read-ahead).
EXTRANEOUS_BYTES = (12, 48)
TRUNCATE_KEEP = (0.45, 0.95)  # share of the entropy-coded data a truncated file keeps
SHIFT_PX = (3, 14)  # |shift| of a shifted near-duplicate, px at the reference size (either axis)
REENCODE_QUALITY = (70, 95)  # standard IJG tables at this quality (not the source's tables)


@dataclass(frozen=True)
class DefectRates:
    """How often each defect is injected. Box rates are shares of training boxes, image rates shares of training
    images, duplicate rates shares of all images written (each duplicate is one more file)."""

    box_jitter: float = 0.03  # training boxes moved or resized by 10-35 % of their size
    past_border: float = 0.02  # training boxes of cells cut by the border, written unclipped (real: ~2 %)
    red_cell: float = 0.005  # training images with a red cell boxed as a leukocyte (half extra row, half replacing)
    unannotated_border: float = 0.01  # training images with one more leukocyte, cut by the border, not annotated
    exact_duplicate: float = 0.003  # images that are byte-identical copies of a training image (real: ~0.3 %)
    near_duplicate: float = 0.003  # images that are re-encoded or slightly shifted copies of a training image
    cross_split: float = 0.2  # share of the duplicate copies that land in the test split (the rest: train)
    truncated_jpeg: float = 0.002  # training images whose file is cut short
    extraneous_bytes: float = 0.003  # training images with junk bytes before the EOI marker

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"defect rate {f.name}={v!r} must be a number in [0, 1]")

    @classmethod
    def none(cls) -> DefectRates:
        """All rates zero: a clean data set."""
        return cls(**{f.name: 0.0 for f in fields(cls)})

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def jitter_box(
    rng: np.random.Generator, box: tuple[int, int, int, int], width: int, height: int
) -> tuple[int, int, int, int]:
    """A sloppy annotation of ``box``: shifted by 10-25 % of its size, or grown/shrunk by 15-35 %, clipped to the
    image. Always differs from ``box`` by more than annotator slack (IoU < 0.85)."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    out = box
    for _ in range(20):
        if rng.random() < 0.5:  # shift
            a = rng.uniform(0, 2 * np.pi)
            d = rng.uniform(0.10, 0.25)
            dx, dy = d * w * math.cos(a), d * h * math.sin(a)
            cand = (x1 + dx, y1 + dy, x2 + dx, y2 + dy)
        else:  # resize about a slightly moved centre
            f = 1 + rng.choice([-1, 1]) * rng.uniform(0.15, 0.35)
            cx = (x1 + x2) / 2 + rng.normal(0, 0.04) * w
            cy = (y1 + y2) / 2 + rng.normal(0, 0.04) * h
            cand = (cx - f * w / 2, cy - f * h / 2, cx + f * w / 2, cy + f * h / 2)
        c = (
            max(0, int(round(cand[0]))),
            max(0, int(round(cand[1]))),
            min(width, int(round(cand[2]))),
            min(height, int(round(cand[3]))),
        )
        if c[2] - c[0] >= 4 and c[3] - c[1] >= 4:
            out = c
            if iou_scalar(c, box) < 0.85:
                return c
    return out


def truncate_jpeg(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    """Cut a JPEG inside its entropy-coded data (no EOI any more); returns the bytes and a details string."""
    sos = data.find(SOS)
    if sos < 0:
        raise ValueError("not a baseline JPEG: no start-of-scan marker")
    start = sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")  # after the SOS header
    keep = start + int(rng.uniform(*TRUNCATE_KEEP) * (len(data) - 2 - start))
    return data[:keep], f"kept={keep} of {len(data)} bytes"


def insert_extraneous_bytes(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    """Insert junk (no 0xFF, so no marker is created) right before the final EOI marker; every decoder still reads
    the image, libjpeg with the warning "Corrupt JPEG data: N extraneous bytes before marker 0xd9"."""
    if not data.endswith(EOI):
        raise ValueError("JPEG does not end with the EOI marker")
    n = int(rng.integers(EXTRANEOUS_BYTES[0], EXTRANEOUS_BYTES[1] + 1))
    junk = rng.integers(0, 0xFF, n, dtype=np.uint8).tobytes()  # 0x00..0xFE
    return data[:-2] + junk + EOI, f"inserted={n} bytes before the EOI marker 0xffd9"


def reencode(rng: np.random.Generator, data: bytes) -> tuple[bytes, str]:
    """Decode a JPEG and save it again with standard IJG tables at a random quality (another program's copy)."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("cannot decode the JPEG to re-encode")
    q = int(rng.integers(REENCODE_QUALITY[0], REENCODE_QUALITY[1] + 1))
    sub = int(rng.choice([0, 2]))
    buf = io.BytesIO()
    Image.fromarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB)).save(buf, "JPEG", quality=q, subsampling=sub)
    return buf.getvalue(), f"quality={q} subsampling={'4:4:4' if sub == 0 else '4:2:0'}"


def shift_image(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved by (dx, dy) px; the uncovered strip repeats the border pixels."""
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    h, w = image.shape[:2]
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REPLICATE)


def shift_boxes(
    boxes: list[tuple[int, int, int, int]], dx: int, dy: int, width: int, height: int
) -> list[tuple[int, int, int, int]]:
    """Boxes moved with a shifted image, clipped to it."""
    return [(max(0, x1 + dx), max(0, y1 + dy), min(width, x2 + dx), min(height, y2 + dy)) for x1, y1, x2, y2 in boxes]


def draw_shift(
    rng: np.random.Generator, boxes: list[tuple[int, int, int, int]], width: int, height: int, scale: float
) -> tuple[int, int] | None:
    """A shift (dx, dy) for a near-duplicate that keeps at least 60 % of every box inside the image, or None."""
    lo, hi = max(1, round(SHIFT_PX[0] * scale)), max(2, round(SHIFT_PX[1] * scale))
    for _ in range(20):
        dx, dy = (int(rng.integers(lo, hi + 1)) * int(rng.choice([-1, 1])) for _ in range(2))
        if rng.random() < 0.3:  # sometimes along one axis only
            dx, dy = (dx, 0) if rng.random() < 0.5 else (0, dy)
        moved = shift_boxes(boxes, dx, dy, width, height)
        if all((m[2] - m[0]) * (m[3] - m[1]) >= 0.6 * (b[2] - b[0]) * (b[3] - b[1]) for m, b in zip(moved, boxes)):
            return dx, dy
    return None
