"""libjpeg's warnings kept off the console (capture_jpeg_warnings): counted per image, everything else passes."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.data.images import (
    JPEG_WARNING_COLUMNS,
    UNNAMED,
    attributed,
    capture_jpeg_warnings,
    decode,
    thread_map,
)
from cytologia.data.synthetic.defects import insert_extraneous_bytes, truncate_jpeg

LIBJPEG = ("Corrupt JPEG data", "Premature end of JPEG file")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (96, 72), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return buf.tobytes()


@pytest.fixture()
def images(tmp_path: Path) -> dict[str, Path]:
    """A clean JPEG and the synthetic set's two damaged kinds (the defects module's own byte edits)."""
    rng = np.random.default_rng(0)
    out = {"good": tmp_path / "good.jpg", "extra": tmp_path / "extra.jpg", "cut": tmp_path / "cut.jpg"}
    out["good"].write_bytes(_jpeg(0))
    out["extra"].write_bytes(insert_extraneous_bytes(rng, _jpeg(1))[0])
    out["cut"].write_bytes(truncate_jpeg(rng, _jpeg(2))[0])
    return out


def _libjpeg_in(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(m in line for m in LIBJPEG)]


def test_uncaptured_decodes_print_libjpeg_warnings(images: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    """What the capture is for: without it, each decode of a damaged file prints to file descriptor 2."""
    capfd.readouterr()
    decode(images["extra"])
    decode(images["cut"])
    assert len(_libjpeg_in(capfd.readouterr().err)) == 2


def test_capture_keeps_libjpeg_off_fd2_counts_per_image_and_writes_the_list(
    images: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    report = tmp_path / "stage" / "jpeg_warnings.csv"
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="cytologia.data.images"):
        with capture_jpeg_warnings(report, label="detector") as seen:
            decode(images["good"])
            decode(images["extra"])
            decode(images["cut"])
            decode(images["cut"])
            print("python text to stderr", file=sys.stderr)
            os.write(2, b"native text to fd 2\n")
            os.write(2, b"\r 50%|#####     | 5/10")  # a progress bar: no newline, passes as it is
    err = capfd.readouterr().err
    assert _libjpeg_in(err) == []
    assert "python text to stderr\n" in err and "native text to fd 2\n" in err and "\r 50%|#####     | 5/10" in err
    assert {Path(k).name: len(v) for k, v in seen.per_image.items()} == {"extra.jpg": 1, "cut.jpg": 2}
    assert seen.unattributed == [] and seen.n_messages == 3
    table = pd.read_csv(report)
    assert tuple(table.columns) == JPEG_WARNING_COLUMNS
    assert dict(zip(table["image"].map(lambda p: Path(p).name), table["messages"])) == {"extra.jpg": 1, "cut.jpg": 2}
    assert "Premature end of JPEG file" in table.set_index("image").loc[str(images["cut"].resolve()), "message"]
    lines = [r.getMessage() for r in caplog.records if "JPEG warnings" in r.getMessage()]
    assert len(lines) == 1 and str(report) in lines[0]
    assert lines[0].startswith("detector: 2 image(s) decoded with JPEG warnings")
    # a later block that sees no warning does not leave the earlier list behind
    with capture_jpeg_warnings(report, label="detector"):
        decode(images["good"])
    assert not report.exists()


def test_warnings_from_threads_are_named_and_other_decoders_are_counted(
    images: dict[str, Path], capfd: pytest.CaptureFixture[str]
) -> None:
    capfd.readouterr()
    with capture_jpeg_warnings() as seen:
        thread_map(decode, [images["extra"], images["cut"], images["good"]] * 4, workers=4)
        cv2.imread(str(images["cut"]))  # a reader that does not say which file: counted, not named
        attributed(cv2.imread)(str(images["extra"]))  # a wrapped third-party reader: named
    assert _libjpeg_in(capfd.readouterr().err) == []
    assert {Path(k).name: len(v) for k, v in seen.per_image.items()} == {"extra.jpg": 5, "cut.jpg": 4}
    assert seen.unattributed == ["Premature end of JPEG file"]
    assert seen.table()["image"].iloc[-1] == UNNAMED


def test_exceptions_pass_and_fd2_is_restored(images: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with pytest.raises(RuntimeError, match="boom"):
        with capture_jpeg_warnings() as seen:
            decode(images["extra"])
            print("printed before the error", file=sys.stderr)
            raise RuntimeError("boom")
    os.write(2, b"after the block\n")
    decode(images["cut"])  # no capture any more: libjpeg prints again
    err = capfd.readouterr().err
    assert "printed before the error\n" in err and "after the block\n" in err
    assert _libjpeg_in(err) == ["Premature end of JPEG file"]
    assert len(seen.per_image) == 1


def test_nested_captures_report_their_own_warnings(images: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with capture_jpeg_warnings() as outer:
        decode(images["cut"])
        with capture_jpeg_warnings() as inner:
            decode(images["extra"])
            os.write(2, b"inner text\n")
        decode(images["cut"])
    err = capfd.readouterr().err
    assert _libjpeg_in(err) == [] and "inner text\n" in err
    assert {Path(k).name: len(v) for k, v in inner.per_image.items()} == {"extra.jpg": 1}
    assert {Path(k).name: len(v) for k, v in outer.per_image.items()} == {"cut.jpg": 2}


@pytest.mark.ultralytics
def test_ultralytics_loader_reads_name_their_image(images: dict[str, Path], capfd: pytest.CaptureFixture[str]) -> None:
    """The detector backend wraps the reader ultralytics' training and validation loaders decode with."""
    import ultralytics.data.base as ul_base

    import cytologia.detection.ultralytics_backend  # noqa: F401  (importing it wraps the reader)

    capfd.readouterr()
    with capture_jpeg_warnings() as seen:
        assert ul_base.imread(str(images["extra"])) is not None
    assert _libjpeg_in(capfd.readouterr().err) == []
    assert {Path(k).name: len(v) for k, v in seen.per_image.items()} == {"extra.jpg": 1} and not seen.unattributed


def test_the_same_warning_from_two_images_decoded_at_once_goes_once_to_each(tmp_path: Path) -> None:
    """Two truncated files decoded in overlapping spans (threads) each print "Premature end of JPEG file": each image
    gets one, whichever order the lines came in (before, both went to the first name)."""
    from types import SimpleNamespace

    from cytologia.data.images import JpegWarnings, _attribute

    img = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    data = cv2.imencode(".jpg", img)[1].tobytes()
    truncated, header_only = tmp_path / "truncated.jpg", tmp_path / "header_only.jpg"
    truncated.write_bytes(data[: len(data) * 6 // 10])
    header_only.write_bytes(data[: data.index(b"\xff\xda")])
    text = "Premature end of JPEG file"
    spans = [(str(truncated), 0, 100), (str(header_only), 0, 100)]  # both decodes span both lines
    tap = SimpleNamespace(found=[(10, text), (20, text)], spans=spans)
    result = JpegWarnings()
    _attribute(tap, result)  # type: ignore[arg-type]
    assert result.per_image == {str(header_only): [text], str(truncated): [text]} and not result.unattributed
