"""No network: a tiny train + predict (+ export) attempts no connection; the guard itself catches one."""

from __future__ import annotations

from pathlib import Path

import pytest

from cytologia.offline import YOLO_FONTS, install_yolo_fonts

from .conftest import network_guard


@pytest.mark.ultralytics
def test_training_and_prediction_attempt_no_connection(smoke_run) -> None:
    # the whole det_smoke stage (data generation, folds, 1 epoch, validation, OOF prediction) ran under the guard
    assert smoke_run.result["trained"] is True
    assert smoke_run.attempts == [], f"network access attempted: {smoke_run.attempts}"


@pytest.mark.ultralytics
def test_export_attempts_no_connection(smoke_run, tmp_path: Path) -> None:
    from cytologia.detection.export import export_and_verify

    with network_guard() as attempts:
        _, report = export_and_verify(smoke_run.checkpoint, tmp_path / "m.onnx", 128, n_verify=2)
    assert attempts == [], f"network access attempted: {attempts}"
    assert report.passed


@pytest.mark.ultralytics
def test_the_guard_catches_what_ultralytics_would_do_without_a_font() -> None:
    # positive control: a font ultralytics does not find locally makes it ask its asset server (and swallow the error)
    from ultralytics.utils.checks import check_font

    with network_guard() as attempts:
        assert check_font("NoSuchFontForTheTest.ttf") is None
    assert attempts, "the guard saw no connection where ultralytics makes one"


def test_fonts_are_placed_once(tmp_path: Path) -> None:
    placed = install_yolo_fonts(tmp_path)
    assert [p.name for p in placed] == list(YOLO_FONTS) and all(p.stat().st_size > 100_000 for p in placed)
    stamp = placed[0].stat().st_mtime_ns
    assert install_yolo_fonts(tmp_path)[0].stat().st_mtime_ns == stamp
