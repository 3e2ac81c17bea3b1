"""scripts/yolox_parity.py fails (exit 1) past its stated tolerances. The official YOLOX is not installed here, so
the "official" model is ours run through the official API (eval outputs; the total loss from SimOTA in the 0.3.0
release's mode): equal by construction -> exit 0; an offset on one side -> exit 1 naming the figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from cytologia.detection.yolox.losses import yolox_loss
from cytologia.detection.yolox.model import build_yolox

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "yolox_parity.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("yolox_parity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_official(eval_offset: float = 0.0, loss_offset: float = 0.0):
    """``official_model`` stand-in: our YOLOX (same state-dict layout) behind the official call convention --
    ``model(x)`` in eval mode, ``model(x, padded_targets)["total_loss"]`` in train mode, ``head.iou_loss.loss_type``
    and ``head.use_l1`` set by the script -- plus an optional offset on one output."""

    def build(name: str, num_classes: int) -> torch.nn.Module:
        model = build_yolox(name, num_classes)
        model.head.iou_loss = SimpleNamespace(loss_type="iou")
        model.head.use_l1 = False
        plain = model.forward

        def forward(x: torch.Tensor, targets: torch.Tensor | None = None):
            if targets is None:
                return plain(x) + eval_offset
            raw, grid, strides = model.raw(x)
            boxes = [t[t[:, 3] > 0] for t in targets]  # padded rows have zero width
            loss = yolox_loss(
                raw,
                grid,
                strides,
                boxes,
                kind=model.head.iou_loss.loss_type,
                use_l1=model.head.use_l1,
                assign_mode="box_and_center",
            )
            return {"total_loss": loss.total + loss_offset}

        model.forward = forward
        return model

    return build


ARGS = ["--sizes", "yolox_nano", "--classes", "1", "--shapes", "64x64", "64x96"]


def test_equal_models_pass(script, monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(script, "official_model", fake_official())
    assert script.main([*ARGS, "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert f"eval max|diff| <= {script.EVAL_ATOL:g}, total loss |diff| <= {script.LOSS_ATOL:g}: PASS" in out
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["passed"] is True and len(summary["results"]) == 2
    assert summary["max_abs_diff_eval"] <= script.EVAL_ATOL and summary["max_abs_diff_loss"] <= script.LOSS_ATOL


@pytest.mark.parametrize("broken, figure", [("eval_offset", "eval max|diff|"), ("loss_offset", "giou loss |diff|")])
def test_a_difference_past_the_tolerance_exits_1(script, monkeypatch, capsys, broken: str, figure: str) -> None:
    monkeypatch.setattr(script, "official_model", fake_official(**{broken: 1e-3}))
    assert script.main(ARGS) == 1
    captured = capsys.readouterr()
    assert "FAIL (" in captured.out
    lines = [line.strip() for line in captured.err.splitlines() if f"yolox_nano/1cls/64x64: {figure} " in line]
    assert len(lines) == 1 and lines[0].endswith(" > 0.0001"), captured.err
    assert float(lines[0].split()[-3]) == pytest.approx(1e-3, rel=1e-2)  # the offset, as measured
    # the same difference within a looser tolerance passes
    assert script.main([*ARGS, "--eval-atol", "1e-2", "--loss-atol", "1e-2"]) == 0


def test_nan_is_past_any_tolerance(script) -> None:
    row = {"eval_max_abs_diff": float("nan"), **{f"{k}_loss_abs_diff": 0.0 for k in script.LOSS_KINDS}}
    assert script.failures({"m": row}, 1.0, 1.0) == ["m: eval max|diff| nan > 1"]
