"""ONNX export of classifiers (legacy exporter, static spatial size) and torch-vs-ONNX-Runtime parity."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from cytologia.classification.export import (
    PARITY_ATOL,
    OnnxParityError,
    check_onnx_parity,
    export_classifier_onnx,
    onnx_metadata,
)
from cytologia.classification.models import create_classifier
from cytologia.errors import CytologiaInputError


def _scale_logits(model: torch.nn.Module, size: int, target: float = 10.0) -> None:
    """Rescale the (randomly initialised, ~0.01-logit) head so that the largest logit is ``target``: a trained
    model's scale, so that a 1e-4 tolerance means a 1e-5 relative agreement, not a vacuous one."""
    head = model.get_classifier()
    torch.nn.init.normal_(head.weight)
    with torch.no_grad():
        was = model.training
        peak = model.eval()(torch.randn(4, 3, size, size)).abs().max()
        head.weight *= target / peak
        head.bias.zero_()
        model.train(was)


@pytest.mark.parametrize(
    "name, size",
    [
        ("resnet10t", 32),
        ("test_vit", 32),  # attention + LayerNorm
        ("tf_mobilenetv3_small_minimal_100", 64),  # a tf_ model: TF "SAME" padding computed from the static size
    ],
)
def test_export_parity(tmp_path: Path, name: str, size: int) -> None:
    model = create_classifier(name, 5, img_size=size).train()
    _scale_logits(model, size)
    path = export_classifier_onnx(model, tmp_path / "out" / f"{name}.onnx", size, metadata={"labels": "a b c d e"})
    assert model.training  # the caller's mode is restored
    graph = onnx.load(str(path)).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "image" and dims == ["batch", 3, size, size]
    assert graph.output[0].name == "logits"
    diff = check_onnx_parity(model, path, n=3)  # raises past PARITY_ATOL
    assert diff <= PARITY_ATOL, f"{name}: max |torch - onnxruntime| = {diff:.2e}"

    meta = onnx_metadata(path)
    assert meta["img_size"] == str(size) and meta["labels"] == "a b c d e" and "mean" in meta


def test_static_batch_and_checks(tmp_path: Path) -> None:
    model = create_classifier("resnet10t", 4)
    path = export_classifier_onnx(model, tmp_path / "static.onnx", 32, dynamic_batch=False)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    assert check_onnx_parity(model, path, n=2) < 1e-4  # run one image at a time
    assert sorted(p.name for p in tmp_path.iterdir()) == ["static.onnx"]  # no temporary file left
    with pytest.raises(CytologiaInputError, match="opset"):
        export_classifier_onnx(model, tmp_path / "old.onnx", 32, opset=13)
    with pytest.raises(CytologiaInputError, match="not found"):
        check_onnx_parity(model, tmp_path / "absent.onnx")
    # The parity check detects a model that no longer matches its export: an error past the tolerance, naming the
    # file and both figures; atol=None only measures.
    with torch.no_grad():
        model.fc.bias += 1.0
    with pytest.raises(OnnxParityError, match=rf"static\.onnx: .* differ .* by \S+ .*tolerance {PARITY_ATOL:g}"):
        check_onnx_parity(model, path)
    assert check_onnx_parity(model, path, atol=None) == pytest.approx(1.0, abs=1e-4)
    with torch.no_grad():
        model.fc.bias -= 1.0 - 2 * PARITY_ATOL  # just past the tolerance
    with pytest.raises(OnnxParityError):
        check_onnx_parity(model, path)
    assert check_onnx_parity(model, path, atol=4 * PARITY_ATOL) == pytest.approx(2 * PARITY_ATOL, rel=0.05)
