"""ONNX export of a classifier, and a torch-vs-ONNX-Runtime parity check.

The legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used: in our measurements it exported
these models 2-5x faster than the ``torch.export``-based one with the same runtime, and it needs no ``onnxscript``.
The spatial size is static (the ``tf_`` EfficientNets compute their SAME padding from it); the batch axis is
dynamic unless asked otherwise. The graph has one input ``image`` (float32 N x 3 x H x W, normalised as in
training) and one output ``logits`` (N x K); the image size, and the model's mean/std when it has timm's
``pretrained_cfg``, are written into the file's metadata.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cytologia.errors import CytologiaInputError

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MIN_OPSET = 17  # LayerNormalization is a single op from opset 17 on (ViTs export and run as one fused node)
# Max |torch - ONNX Runtime| of the logits allowed by :func:`check_onnx_parity`. Logits of a trained model are O(10):
# a 1e-5 relative agreement (measured: 4.8e-6 to 5.7e-6 on resnet10t, test_vit, tf_mobilenetv3 at logit scale 10).
PARITY_ATOL = 1e-4


class OnnxParityError(RuntimeError):
    """An exported graph's output differs from the torch model's by more than the tolerance."""


def export_classifier_onnx(
    model: nn.Module,
    path: str | Path,
    img_size: int,
    opset: int = 17,
    dynamic_batch: bool = True,
    *,
    in_chans: int = 3,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Export ``model`` to ``path`` (written atomically) for ``img_size`` x ``img_size`` inputs; returns the path.

    The model is traced in eval mode (its train/eval mode is restored afterwards) on its own device, with a batch of
    2 so that no shape is specialised to a batch of 1. The file is checked with ``onnx.checker``.
    """
    import onnx

    if opset < MIN_OPSET:
        raise CytologiaInputError(f"opset {opset}: must be >= {MIN_OPSET}")
    if img_size < 1:
        raise CytologiaInputError(f"img_size={img_size}: must be >= 1")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dummy = torch.randn(2 if dynamic_batch else 1, in_chans, img_size, img_size, device=device)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The legacy exporter is deprecated upstream (the warning says so on every call); we choose it on purpose.
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx\.")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None,
            )
        proto = onnx.load(str(tmp))
        meta = {"img_size": str(img_size), "producer": "cytologia", "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cfg = getattr(model, "pretrained_cfg", None) or {}
        for key in ("mean", "std"):
            if cfg.get(key) is not None:
                meta[key] = json.dumps([float(v) for v in cfg[key]])
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        if tmp.exists():
            tmp.unlink()
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The metadata written into an exported file (img_size, mean, std, ...)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def check_onnx_parity(
    model: nn.Module, path: str | Path, n: int = 2, *, seed: int = 0, atol: float | None = PARITY_ATOL
) -> float:
    """Max absolute difference of the logits of ``model`` (torch, eval mode, float32, its own device) and of the
    exported file (ONNX Runtime, CPU) on ``n`` random standard-normal images of the file's input size.

    Raises :class:`OnnxParityError` (naming the file, the difference and the tolerance) when it exceeds ``atol``
    (default :data:`PARITY_ATOL`; a NaN exceeds any); ``atol=None`` only measures."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: ONNX file not found")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = inp.shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise CytologiaInputError(f"{path}: input {inp.name} has shape {shape}; expected N x C x H x W, static C/H/W")
    batch = shape[0] if isinstance(shape[0], int) else n
    x = torch.randn(n, *shape[1:], generator=torch.Generator().manual_seed(seed))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(x.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    got = np.concatenate(
        [session.run(None, {inp.name: x[i : i + batch].numpy()})[0] for i in range(0, n, batch)], axis=0
    )
    if got.shape != expected.shape:
        raise CytologiaInputError(f"{path}: ONNX logits {got.shape} vs torch {expected.shape}")
    diff = float(np.abs(got - expected).max())
    if atol is not None and not diff <= atol:
        raise OnnxParityError(
            f"{path}: ONNX Runtime logits differ from torch's by {diff:.3e} (max |diff| on {n} random images), "
            f"more than the tolerance {atol:g}"
        )
    return diff
