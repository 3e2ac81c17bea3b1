"""Images: header size, decoding, corrupt/truncated JPEG detection and repair into a cache folder.

The real Cytologia set holds JPEGs on which libjpeg prints ``Corrupt JPEG data: N extraneous bytes before marker
0xd9`` (junk between the end of the entropy-coded data and the EOI marker) and truncated files (no EOI; libjpeg
prints ``Premature end of JPEG file`` and fills the missing rows). Neither OpenCV nor Pillow reports these warnings
to Python, and where the entropy-coded data really ends is only known to a Huffman decoder, so :func:`check_jpeg`
decodes with OpenCV while capturing what libjpeg writes to the process's standard error (file descriptor 2), and
adds a structural check of the marker stream (SOI, segment lengths, an SOS, an EOI after it). The capture redirects
a process-wide descriptor, so checked decodes are serialised by a lock (plain :func:`decode` is not affected), and
libjpeg messages that other threads of the process print during a check would be attributed to the checked file:
do not run checks concurrently with unrelated decoding. Junk short enough to be swallowed by libjpeg's read-ahead
(a few bytes) makes no warning and no pixel difference; it is not reported.

Repair never touches an original: :func:`repair_jpeg` re-encodes the decodable pixels into a cache folder under the
same name, and :func:`resolve_image` returns that copy when there is one.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TypeVar

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from cytologia.data.errors import CytologiaInputError

log = logging.getLogger(__name__)

# Status of a checked image (column ``status`` of :func:`scan_images`).
OK = "ok"
EXTRANEOUS = "corrupt-extraneous-bytes"  # junk before a marker (usually EOI); pixels decode fine
CORRUPT = "corrupt"  # other libjpeg "Corrupt JPEG data" warnings (bad Huffman code, ...); decoded with damage
TRUNCATED = "truncated"  # no EOI marker / premature end of file; the missing part decodes as grey
UNREADABLE = "unreadable"  # missing, empty, not an image, or a header libjpeg cannot parse
STATUSES: tuple[str, ...] = (OK, EXTRANEOUS, CORRUPT, TRUNCATED, UNREADABLE)
REPAIRABLE: frozenset[str] = frozenset({EXTRANEOUS, CORRUPT, TRUNCATED})  # decodable but not clean
SCAN_COLUMNS: tuple[str, ...] = ("NAME", "status", "message", "extraneous_bytes", "img_w", "img_h")

REPAIR_QUALITY = 95  # JPEG quality of repaired copies: visually lossless, ~2x smaller than PNG for smears
# Decode flags: colour, and the stored pixel orientation (no EXIF rotation) so that a decoded array always has the
# header's width x height, the frame the boxes are given in.
_DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_EXTRANEOUS_RE = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0x([0-9a-fA-F]{2})")
_LIBJPEG_LINE = re.compile(r"(Corrupt JPEG data|Premature end of JPEG file|JPEG|Invalid|Bogus|Warning)", re.I)
# Markers without a length field: TEM, RST0-7, SOI, EOI.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})


def _read_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise CytologiaInputError(f"{path}: image file not found") from None
    except OSError as err:
        raise CytologiaInputError(f"{path}: cannot read image file ({err.strerror or err})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image from its header only (Pillow opens lazily: no pixel is decoded)."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise CytologiaInputError(f"{path}: image file not found") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises UnidentifiedImageError (an OSError) and others
        raise CytologiaInputError(f"{path}: cannot read image header ({err})") from None
    return int(w), int(h)


def image_sizes(paths: Sequence[str | Path], workers: int | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Header sizes of many images in a thread pool: an (n, 2) int64 array of (w, h), -1 where unreadable, and the
    per-image error message (None when read)."""

    def one(p: str | Path) -> tuple[int, int, str | None]:
        try:
            return (*image_size(p), None)
        except CytologiaInputError as err:
            return -1, -1, str(err)

    rows = thread_map(one, list(paths), workers)
    sizes = np.array([(w, h) for w, h, _ in rows], dtype=np.int64).reshape(-1, 2)
    return sizes, [e for _, _, e in rows]


def decode(path: str | Path) -> np.ndarray:
    """Decode an image to a BGR uint8 array (H, W, 3); missing or undecodable files raise
    :class:`CytologiaInputError` naming the file.

    Reads through OpenCV's file reader (``cv2.imread``): libjpeg warnings (corrupt data) are not errors, and a
    truncated JPEG decodes with its missing rows grey. (``cv2.imdecode`` on the same bytes in memory fails on
    truncated files instead.)
    """
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: image file not found")
    image = cv2.imread(str(path), _DECODE_FLAGS)
    if image is None:
        raise CytologiaInputError(f"{path}: cannot decode image ({path.stat().st_size} bytes)")
    return image


@dataclass(frozen=True)
class JpegCheck:
    """Result of :func:`check_jpeg`: ``status`` is one of :data:`STATUSES`; ``message`` says why."""

    path: str
    status: str
    message: str = ""
    extraneous_bytes: int = 0  # summed over libjpeg's "N extraneous bytes" warnings
    width: int = -1  # decoded size; -1 when unreadable
    height: int = -1

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def decodable(self) -> bool:
        return self.status != UNREADABLE

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class _Fd2Capture:
    """Captures what native code writes to file descriptor 2 while decoding (one capture at a time per process)."""

    lock = threading.Lock()
    _tmp: IO[bytes] | None = None  # reused scratch file

    @classmethod
    @contextmanager
    def capture(cls) -> Iterator[list[str]]:
        lines: list[str] = []
        with cls.lock:
            try:
                sys.stderr.flush()
                if cls._tmp is None:
                    cls._tmp = tempfile.TemporaryFile()
                fd = cls._tmp.fileno()
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                saved = os.dup(2)
            except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters): no capture
                yield lines
                return
            os.dup2(fd, 2)
            try:
                yield lines
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 1 << 20).decode("utf-8", "replace")
                for line in text.splitlines():
                    if _LIBJPEG_LINE.search(line):
                        lines.append(line.strip())
                    elif line.strip():  # someone else's output written during the window: pass it on
                        print(line, file=sys.stderr)


def decode_checked(path: str | Path) -> tuple[np.ndarray | None, list[str]]:
    """Decode an image file as :func:`decode` does and return (BGR array or None, libjpeg's warning lines)."""
    with _Fd2Capture.capture() as lines:
        image = cv2.imread(str(path), _DECODE_FLAGS)
    return image, lines


def _structure(data: bytes) -> tuple[str | None, str]:
    """Walk the marker stream up to the first SOS and look for an EOI after it.

    Returns (problem status or None, message). Entropy-coded data is not parsed (that needs the Huffman tables);
    the decoder's warnings cover what happens inside it.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return UNREADABLE, "not a JPEG file (no SOI marker)"
    pos = 2
    while True:
        while pos < n and data[pos] == 0xFF and pos + 1 < n and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos + 1 >= n:
            return TRUNCATED, f"file ends in the headers at byte {pos} (no SOS marker)"
        if data[pos] != 0xFF:
            return CORRUPT, f"expected a marker at byte {pos}, found 0x{data[pos]:02x}"
        marker = data[pos + 1]
        if marker == 0xD9:
            return UNREADABLE, f"EOI marker at byte {pos} before any image data"
        if marker in _STANDALONE:
            pos += 2
            continue
        if pos + 4 > n:
            return TRUNCATED, f"file ends inside the header of marker 0x{marker:02x} at byte {pos}"
        length = (data[pos + 2] << 8) | data[pos + 3]
        end = pos + 2 + length
        if length < 2 or end > n:
            return TRUNCATED, f"segment 0x{marker:02x} at byte {pos} runs past the end of the file"
        if marker == 0xDA:  # SOS: entropy-coded data follows; the image must end with an EOI after it
            if data.rfind(b"\xff\xd9", end) < 0:
                return TRUNCATED, "no EOI marker after the image data (file truncated)"
            return None, ""
        pos = end


def check_jpeg(path: str | Path) -> JpegCheck:
    """Check one image file: decode it, capture libjpeg's warnings and check the marker structure.

    ``truncated`` wins over ``corrupt`` (a cut file usually also has a broken last segment); a file that is not a
    JPEG but decodes (PNG, ...) is ``ok`` with a message saying so.
    """
    path = Path(path)
    try:
        data = _read_bytes(path)
    except CytologiaInputError as err:
        return JpegCheck(str(path), UNREADABLE, str(err))
    if not data:
        return JpegCheck(str(path), UNREADABLE, f"{path}: empty file")
    is_jpeg = data[:2] == b"\xff\xd8"
    image, warnings = decode_checked(path)
    if image is None:
        why = "; ".join(warnings) or ("cannot decode" if is_jpeg else "not a decodable image")
        return JpegCheck(str(path), UNREADABLE, f"{path}: {why}")
    h, w = image.shape[:2]
    if not is_jpeg:
        return JpegCheck(str(path), OK, "not a JPEG file; decodes fine", 0, w, h)
    struct_status, struct_msg = _structure(data)
    extraneous = sum(int(m.group(1)) for m in map(_EXTRANEOUS_RE.search, warnings) if m)
    premature = any("Premature end" in line for line in warnings)
    other = [line for line in warnings if not _EXTRANEOUS_RE.search(line) and "Premature end" not in line]
    messages = [*warnings, *([struct_msg] if struct_msg else [])]
    if struct_status == TRUNCATED or premature:
        status = TRUNCATED
    elif other or struct_status is not None:
        status = CORRUPT
    elif extraneous:
        status = EXTRANEOUS
    else:
        status = OK
    return JpegCheck(str(path), status, "; ".join(messages), extraneous, w, h)


_T = TypeVar("_T")
_R = TypeVar("_R")


def thread_map(fn: Callable[[_T], _R], items: list[_T], workers: int | None) -> list[_R]:
    """``[fn(x) for x in items]`` in a thread pool of ``workers`` threads (default: CPU count, at most 8); OpenCV and
    Pillow release the GIL while decoding, so threads scale."""
    workers = max(1, min(os.cpu_count() or 1, 8) if workers is None else workers)
    if workers == 1 or len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items, chunksize=32))


def scan_images(image_dir: str | Path, names: Sequence[str] | None = None, workers: int | None = None) -> pd.DataFrame:
    """:func:`check_jpeg` over a folder (all ``*.jpg``/``*.jpeg`` files, or the given relative ``names``) in a thread
    pool; a table with columns :data:`SCAN_COLUMNS`, one row per name, in order. A warning counts the problems."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise CytologiaInputError(f"image folder {image_dir} does not exist")
    if names is None:
        names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    names = list(names)
    checks: list[JpegCheck] = thread_map(lambda n: check_jpeg(image_dir / n), names, workers)
    table = pd.DataFrame(
        {
            "NAME": pd.Series(names, dtype=object),
            "status": [c.status for c in checks],
            "message": [c.message for c in checks],
            "extraneous_bytes": np.array([c.extraneous_bytes for c in checks], dtype=np.int64),
            "img_w": np.array([c.width for c in checks], dtype=np.int64),
            "img_h": np.array([c.height for c in checks], dtype=np.int64),
        },
        columns=list(SCAN_COLUMNS),
    )
    bad = table["status"] != OK
    if bad.any():
        counts = table.loc[bad, "status"].value_counts().to_dict()
        log.warning("%d of %d images in %s are not clean: %s", int(bad.sum()), len(table), image_dir, counts)
    return table


def repair_jpeg(
    path: str | Path, cache_dir: str | Path, name: str | None = None, quality: int = REPAIR_QUALITY
) -> Path:
    """Re-encode a decodable image into ``cache_dir/name`` (default: the file's own name) at JPEG ``quality``.

    The original is only read. Truncated files keep libjpeg's grey fill for the missing rows. Undecodable files raise
    :class:`CytologiaInputError`. Returns the path of the repaired copy (written atomically).
    """
    path = Path(path)
    target = Path(cache_dir) / (name if name is not None else path.name)
    if target.resolve() == path.resolve():
        raise CytologiaInputError(f"{path}: the repair cache must not be the image's own folder")
    if not path.is_file():
        raise CytologiaInputError(f"{path}: image file not found")
    image, warnings = decode_checked(path)
    if image is None:
        raise CytologiaInputError(f"{path}: cannot decode, nothing to repair ({'; '.join(warnings) or 'no detail'})")
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise CytologiaInputError(f"{path}: re-encoding failed")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(buf.tobytes())
    os.replace(tmp, target)
    return target


def resolve_image(path: str | Path, cache_dir: str | Path | None, name: str | None = None) -> Path:
    """The repaired copy ``cache_dir/name`` (default: the file's name) when it exists, else ``path`` itself."""
    path = Path(path)
    if cache_dir is not None:
        cached = Path(cache_dir) / (name if name is not None else path.name)
        if cached.is_file():
            return cached
    return path


def repair_images(image_dir: str | Path, scan: pd.DataFrame, cache_dir: str | Path) -> pd.DataFrame:
    """Repair every decodable-but-unclean image of a :func:`scan_images` table into ``cache_dir``; returns the rows
    repaired with a ``repaired`` column (the cached path)."""
    todo = scan.loc[scan["status"].isin(REPAIRABLE)].copy()
    todo["repaired"] = [str(repair_jpeg(Path(image_dir) / n, cache_dir, name=n)) for n in todo["NAME"]]
    if len(todo):
        log.info("repaired %d images into %s", len(todo), cache_dir)
    return todo
