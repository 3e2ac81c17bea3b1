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

Training decodes the same damaged files every epoch, and libjpeg prints its warning each time, from C, where Python's
``warnings`` cannot catch it. :func:`capture_jpeg_warnings` keeps them off the console for a block (a pipeline stage):
file descriptor 2 goes to a temporary file, a thread copies everything else on to the real standard error as it comes
(progress bars stay live, tracebacks and Python warnings pass), and the block ends with one line that counts the
images, their list written to a CSV file. The image a message is about is known when it was decoded through
:func:`decode`, :func:`imread` or a reader wrapped by :func:`attributed` (ultralytics' is).
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
from dataclasses import asdict, dataclass, field
from functools import wraps
from pathlib import Path
from typing import IO, Any, TypeVar

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from cytologia.errors import CytologiaInputError

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
# libjpeg's warnings (jerror.h, JWRN_*) as its default error manager prints them: one line, written whole by one
# fprintf, at most one per decoded image. Only these are kept off the console; any other output passes.
_LIBJPEG_WARNING = re.compile(
    rb"(?:Corrupt JPEG data: [^\n]{1,120}|Premature end of JPEG file|Invalid SOS parameters for sequential JPEG"
    rb"|Inconsistent progression sequence for component \d+ coefficient \d+|Unknown Adobe color transform code \d+"
    rb"|Warning: unknown JFIF revision number \d+\.\d+|Warning: thumbnail image size does not match data length \d+"
    rb"|Application transferred too many scanlines)\n"
)
_LIBJPEG_STARTS: tuple[bytes, ...] = (
    b"Corrupt JPEG data: ",
    b"Premature end of JPEG file",
    b"Invalid SOS parameters",
    b"Inconsistent progression",
    b"Unknown Adobe color",
    b"Warning: unknown JFIF",
    b"Warning: thumbnail image",
    b"Application transferred",
)
JPEG_WARNINGS_FILE = "jpeg_warnings.csv"  # per-image list a capture writes next to its stage's outputs
JPEG_WARNING_COLUMNS: tuple[str, ...] = ("image", "messages", "message")
UNNAMED = "(decoder did not name the image)"  # ``image`` of the row counting messages no decode claimed

_T = TypeVar("_T")
_R = TypeVar("_R")


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
    image = imread(path, _DECODE_FLAGS)
    if image is None:
        raise CytologiaInputError(f"{path}: cannot decode image ({path.stat().st_size} bytes)")
    return image


def imread(path: str | Path, flags: int = _DECODE_FLAGS) -> np.ndarray | None:
    """``cv2.imread(path, flags)`` (None when unreadable) that names the file to an active
    :func:`capture_jpeg_warnings`, so that libjpeg's message is listed under it."""
    tap = _StderrTap.current()
    if tap is None:
        return cv2.imread(str(path), flags)
    start = tap.mark()
    try:
        return cv2.imread(str(path), flags)
    finally:
        tap.note(str(path), start)


def attributed(read: Callable[..., _R]) -> Callable[..., _R]:
    """``read(path, ...)`` (a third-party image reader) wrapped like :func:`imread`: what libjpeg prints while it
    runs is listed under ``path`` by an active :func:`capture_jpeg_warnings`. Wrapping twice wraps once."""
    if getattr(read, "_cytologia_attributed", False):
        return read

    @wraps(read)
    def wrapper(path: Any, *args: Any, **kwargs: Any) -> _R:
        tap = _StderrTap.current()
        if tap is None:
            return read(path, *args, **kwargs)
        start = tap.mark()
        try:
            return read(path, *args, **kwargs)
        finally:
            tap.note(str(path), start)

    wrapper._cytologia_attributed = True  # type: ignore[attr-defined]
    return wrapper


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


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            n = os.write(fd, data)
        except InterruptedError:
            continue
        except OSError:  # the console went away: nothing to do about it here
            return
        data = data[n:]


def _maybe_libjpeg(tail: bytes) -> int:
    """Length of the end of ``tail`` that may be the start of a libjpeg warning not fully read yet (0: none)."""
    tail = tail[max(tail.rfind(b"\n"), tail.rfind(b"\r")) + 1 :][-160:]  # a warning line is shorter than that
    for i in range(len(tail)):
        rest = tail[i:]
        if any(start.startswith(rest) or rest.startswith(start) for start in _LIBJPEG_STARTS):
            return len(rest)
    return 0


class _StderrTap:
    """File descriptor 2 -> an unlinked temporary file (appended to) while active. A thread copies what arrives on to
    the previous descriptor 2 every :attr:`POLL_S` seconds, except libjpeg's warnings, which it keeps with their
    offset in the file. Decodes record the span of the file written while they ran (:meth:`mark`, :meth:`note`), which
    names the image of each warning. Taps nest (last in, first out): an inner one passes output on to the outer one.

    Child processes forked inside (data-loading workers) inherit the descriptor: their output passes the same way,
    their warnings are counted but not attributed; what a child writes after the tap closed is lost."""

    POLL_S = 0.05
    MAX_SPANS = 100_000  # spans kept per tap (only decodes during which something was written are kept)
    _stack: list[_StderrTap] = []

    def __init__(self) -> None:
        self.out = os.dup(2)  # the standard error of before: where everything else goes, and what fd 2 gets back
        fd, name = tempfile.mkstemp(prefix="cytologia-stderr-")
        try:
            self.wfd = os.open(name, os.O_WRONLY | os.O_APPEND)
            self.rfd = os.open(name, os.O_RDONLY)
        except OSError:
            os.close(self.out)
            raise
        finally:
            os.close(fd)
            os.unlink(name)
        self.pos = 0  # bytes of the file read so far
        self.pending = b""  # read, but possibly the start of a libjpeg warning: held for one more read
        self.found: list[tuple[int, str]] = []  # (offset in the file, libjpeg warning)
        self.spans: list[tuple[str, int, int]] = []  # (image, start, end) of decodes that saw output
        self.closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cytologia-stderr-tap", daemon=True)

    @classmethod
    def current(cls) -> _StderrTap | None:
        return cls._stack[-1] if cls._stack else None

    def mark(self) -> int:
        try:
            return os.fstat(self.wfd).st_size
        except OSError:  # closed meanwhile (a decode still running in another thread when the block ended)
            return -1

    def note(self, image: str, start: int) -> None:
        if self.closed or start < 0:
            return
        end = self.mark()
        if end > start and len(self.spans) < self.MAX_SPANS:
            self.spans.append((image, start, end))

    def open(self) -> None:
        os.dup2(self.wfd, 2)
        _StderrTap._stack.append(self)
        self._thread.start()

    def close(self) -> None:
        _StderrTap._stack.remove(self)
        os.dup2(self.out, 2)
        self._stop.set()
        self._thread.join()
        self._pump(final=True)
        self.closed = True
        for fd in (self.wfd, self.rfd, self.out):
            os.close(fd)

    def _run(self) -> None:
        while not self._stop.wait(self.POLL_S):
            self._pump(final=False)

    def _pump(self, final: bool) -> None:
        fresh = False
        while True:
            size = os.fstat(self.rfd).st_size
            if size <= self.pos:
                break
            chunk = os.pread(self.rfd, min(size - self.pos, 1 << 20), self.pos)
            if not chunk:
                break
            fresh = True
            base = self.pos - len(self.pending)  # file offset of buf[0]
            buf = self.pending + chunk
            self.pos += len(chunk)
            passed, last = [], 0
            for m in _LIBJPEG_WARNING.finditer(buf):
                passed.append(buf[last : m.start()])
                self.found.append((base + m.start(), m.group().decode("ascii", "replace").strip()))
                last = m.end()
            rest = buf[last:]
            held = 0 if final else _maybe_libjpeg(rest)
            passed.append(rest[: len(rest) - held])
            self.pending = rest[len(rest) - held :]
            _write_all(self.out, b"".join(passed))
        # libjpeg writes a warning in one call: a start still incomplete one read later is someone else's output
        if self.pending and (final or not fresh):
            _write_all(self.out, self.pending)
            self.pending = b""


@dataclass
class JpegWarnings:
    """What libjpeg printed during a :func:`capture_jpeg_warnings` block: ``per_image`` maps an image to its
    messages (in order), ``unattributed`` holds the messages of decodes that did not name their image."""

    per_image: dict[str, list[str]] = field(default_factory=dict)
    unattributed: list[str] = field(default_factory=list)

    @property
    def n_messages(self) -> int:
        return sum(map(len, self.per_image.values())) + len(self.unattributed)

    def table(self) -> pd.DataFrame:
        """One row per image (and one for the unattributed messages): :data:`JPEG_WARNING_COLUMNS`."""
        rows = [(k, len(v), "; ".join(dict.fromkeys(v))) for k, v in sorted(self.per_image.items())]
        if self.unattributed:
            rows.append((UNNAMED, len(self.unattributed), "; ".join(dict.fromkeys(self.unattributed))))
        return pd.DataFrame(rows, columns=list(JPEG_WARNING_COLUMNS))

    def summary(self, label: str, path: Path) -> str:
        """The one console line of a block; ``path``: where the list is."""
        n, u = len(self.per_image), len(self.unattributed)
        what = f"{n} image(s) decoded with JPEG warnings" + (
            f", and {u} warning(s) from decodes that did not name their image" if u else ""
        )
        return f"{label + ': ' if label else ''}{what} (list in {path}; {self.n_messages} libjpeg line(s) not printed)"


def _attribute(tap: _StderrTap, result: JpegWarnings) -> None:
    """Name the image of each warning: the decode whose span holds it; several overlapping (threads): the one whose
    own check (:func:`check_jpeg`) prints that warning."""
    checked: dict[str, str] = {}
    given: dict[tuple[str, str], int] = {}  # (image, warning) -> times attributed so far
    for offset, text in tap.found:
        names = sorted({p for p, s, e in tap.spans if s <= offset < e})
        if len(names) > 1:
            for p in names:
                if p not in checked:
                    checked[p] = check_jpeg(p).message
            names = [p for p in names if text in checked[p]]
            # several images print the same warning (two truncated files decoded at once): each takes as many as its
            # own check prints, first come first served, before any takes more
            names = sorted(names, key=lambda p: given.get((p, text), 0) >= checked[p].count(text))
        if names:  # a link (ultralytics' dataset folders) counts as the image it points to
            given[(names[0], text)] = given.get((names[0], text), 0) + 1
            result.per_image.setdefault(os.path.realpath(names[0]), []).append(text)
        else:
            result.unattributed.append(text)


@contextmanager
def capture_jpeg_warnings(report: str | Path | None = None, label: str = "") -> Iterator[JpegWarnings]:
    """Keep libjpeg's warnings off the console for the block; yields the :class:`JpegWarnings` filled at its end.

    Everything else written to the standard error (progress bars, Python warnings, tracebacks, other libraries'
    messages) still reaches it while the block runs. At the end, when libjpeg printed anything: with ``report`` (a
    CSV path, :data:`JPEG_WARNING_COLUMNS`), the list is written there and one line is logged, e.g. ``detector: 2
    image(s) decoded with JPEG warnings (list in ...)``; a list left there by an earlier run that now sees none is
    removed. Without a usable descriptor 2 (an embedded interpreter), nothing is captured.
    """
    result = JpegWarnings()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        tap = _StderrTap()
    except (OSError, ValueError, AttributeError):
        yield result
        return
    tap.open()
    try:
        yield result
    finally:
        if sys.stderr is not None:
            try:
                sys.stderr.flush()  # Python-level text written in the block goes through the tap, in order
            except (OSError, ValueError):
                pass
        tap.close()
        _attribute(tap, result)
        if report is not None:
            _write_jpeg_report(result, Path(report), label)


def _write_jpeg_report(result: JpegWarnings, path: Path, label: str) -> None:
    if not result.n_messages:
        path.unlink(missing_ok=True)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        result.table().to_csv(path, index=False)
    except OSError as err:
        log.warning("%s: cannot write the list of JPEG warnings to %s (%s)", label, path, err)
    log.info(result.summary(label, path))


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
