"""ONNX export of a trained YOLOX with the decoding in the graph.

The graph is :class:`cytologia.detection.yolox.model.YoloxInference` (batch norm fused, input convention folded into
the stem): input ``images`` float32 (B, 3, H, W) RGB in [0, 1], output ``output0`` (B, 5, anchors) = centre-size box
in input pixels and score. Batch, height and width are dynamic (the grid is built from the feature-map shapes in the
graph). NMS stays outside (:meth:`cytologia.detection.yolox.backend.YoloxDetector.decode`), shared with torch, so the
two differ only in the network. Running the graph, the parity check and the timing are every backend's:
:mod:`cytologia.detection.export`. Nothing here imports ultralytics.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from cytologia.detection.yolox.model import YoloxInference

DEFAULT_OPSET = 17


def export_onnx(net: YoloxInference, path: str | Path, img_size: int, opset: int | None = None) -> Path:
    """Write ``net`` (CPU, fp32) to ONNX at ``path`` with dynamic batch/height/width; the file is checked by
    ``onnx.checker``."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.cpu().float().eval()
    dummy = torch.zeros(1, 3, img_size, img_size)
    # The TorchScript exporter (dynamo=False) is the one ultralytics uses too; torch marks it deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (dummy,),
            str(path),
            dynamo=False,
            input_names=["images"],
            output_names=["output0"],
            opset_version=opset or DEFAULT_OPSET,
            do_constant_folding=True,
            dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 2: "anchors"}},
        )
    onnx.checker.check_model(str(path))
    return path
