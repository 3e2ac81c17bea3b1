"""`cytologia synth`, the contact sheet, the renderer's determinism and the generation benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cytologia.cli import main
from cytologia.data.schema import CLASSES
from cytologia.data.synthetic.bench import TARGET_PER_CORE, bench_synth
from cytologia.data.synthetic.preview import contact_sheet
from cytologia.data.synthetic.render import render_scene


def test_cli_writes_a_set_with_the_asked_rates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    args = ["synth", "--out", str(out), "--images", "12", "--seed", "4", "--size", "128", "--no-defects"]
    assert main([*args, "--rate-box-jitter", "0.5", "--test-fraction", "0.25"]) == 0
    info = json.loads((out / "synth.json").read_text())
    assert info["rates"]["box_jitter"] == 0.5 and info["rates"]["past_border"] == 0.0
    assert info["test_fraction"] == 0.25 and info["size"] == 128
    noise = pd.read_csv(out / "noise.csv", keep_default_na=False)
    assert set(noise.kind) == {"box_jitter"}
    assert info["counts"]["test_images"] == 3
    assert "wrote 12 images" in capsys.readouterr().out
    assert main(args) == 2  # the folder holds a set now: refused without --overwrite
    assert "already holds a data set" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--rate-red-cell", "2"])
    with pytest.raises(SystemExit):
        main(["synth", "--out", str(tmp_path), "--size", "8"])
    assert main(["synth"]) == 2  # neither --out nor --contact-sheet


def test_contact_sheet(tmp_path: Path) -> None:
    path = contact_sheet(tmp_path / "sheet.png", per_class=4, classes=["B", "MBL", "Thromb"], scenes=2, tile=64)
    img = cv2.imread(str(path))
    assert img is not None
    assert img.shape[0] == 3 * 64 + 128  # 3 class rows, then 2 whole images (2x tile) in one row
    with pytest.raises(ValueError, match="unknown class"):
        contact_sheet(tmp_path / "x.png", classes=["nope"])


def test_cli_contact_sheet_only(tmp_path: Path) -> None:
    assert main(["synth", "--contact-sheet", str(tmp_path / "s.png"), "--size", "96"]) == 0
    img = cv2.imread(str(tmp_path / "s.png"))
    assert img is not None and img.shape[0] >= len(CLASSES) * 112


def test_render_scene_is_deterministic_and_boxes_are_inside() -> None:
    a = render_scene(np.random.default_rng(1), "S04", ["PNN", "LY", "Thromb"], 200)
    b = render_scene(np.random.default_rng(1), "S04", ["PNN", "LY", "Thromb"], 200)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
    assert a.image.shape == (200, 200, 3)
    assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2:] <= 200).all()
    assert [c.cls for c in a.cells] == ["PNN", "LY", "Thromb"]
    with pytest.raises(ValueError, match="unknown class"):
        render_scene(np.random.default_rng(0), "S01", ["XX"], 128)


@pytest.mark.bench
def test_generation_speed_per_core() -> None:
    """Issue #3: at least 100 images/s per core at 368 px (end to end, one process)."""
    res = bench_synth(n_images=300, size=368, workers=1)
    assert res["per_core_images_per_s"] >= TARGET_PER_CORE, res
