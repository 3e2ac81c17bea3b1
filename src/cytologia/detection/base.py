"""The :class:`Detector` interface: what every detector backend implements, and what all of them share.

A backend (a registry entry, :mod:`cytologia.detection.registry`) implements only what differs between detectors:

- names: :meth:`~Detector.models`; its checkpoints: :meth:`~Detector.checkpoint_model`, :meth:`~Detector.save_random`
  (a random-weight checkpoint, for tests and timing) and, for files written before checkpoints recorded their
  backend, :meth:`~Detector.recognizes`;
- training: :meth:`~Detector.train`;
- the network: :meth:`~Detector.load_network` (input float32 (B, 3, S, S) RGB in [0, 1] -> raw output (B, 5, anchors):
  centre-size boxes in input pixels and a score), its decoding :meth:`~Detector.decode` (score threshold + NMS) and
  :meth:`~Detector.write_onnx` (the same network as an ONNX graph, NMS outside).

Written once here: the prediction loop (letterbox -> network -> decode -> boxes back to each image's pixels, with the
mirrored pass of flip TTA: :meth:`~Detector.predict`, :meth:`~Detector.detect_images`, which also runs an ONNX
Runtime session, :class:`cytologia.detection.export.OnnxDetector`), the cached network on a device, the ONNX export
that records the backend in the graph, and the ONNX Runtime vs torch parity check (:meth:`~Detector.verify_onnx`).

This module imports neither torch nor a backend's package at import time.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd

from cytologia.errors import CytologiaInputError

# The largest stride of every registered backend's heads (YOLO11's P5, YOLOX's (8, 16, 32)): a detector's input side
# must be a multiple of it.
MAX_STRIDE = 32

if TYPE_CHECKING:
    import torch

    from cytologia.detection.export import ParityReport
    from cytologia.detection.letterbox import Frame
    from cytologia.detection.registry import DetectionData, TrainResult, TrainSettings

# Columns of :meth:`Detector.predict`: the boxes of one pass; ``tta`` is "none" or the flip that made it ("hflip").
PREDICT_COLUMNS: tuple[str, ...] = ("NAME", "x1", "y1", "x2", "y2", "score", "tta")
# The key under which a checkpoint (top-level dict of the torch file) and an exported graph (ONNX metadata) record the
# registry name of the backend that wrote them.
BACKEND_KEY = "detector_backend"


@dataclass(frozen=True)
class CheckpointHeader:
    """What a checkpoint file says about itself without running any of its code (:func:`read_header`): its top
    level with every class, function and tensor replaced by an inert stand-in, and the ``module.name`` of every
    class and function its pickle refers to."""

    path: Path
    content: Any
    globals: frozenset[str]

    def get(self, key: str, default: Any = None) -> Any:
        """A top-level entry of the checkpoint (a dict) or ``default``."""
        return self.content.get(key, default) if isinstance(self.content, dict) else default

    def refers_to(self, package: str) -> bool:
        """Whether the pickle names a class or function of ``package`` (e.g. ``ultralytics``)."""
        return any(g == package or g.startswith(f"{package}.") for g in self.globals)


class Detector(ABC):
    """A single-class box detector. Construct through :func:`~cytologia.detection.registry.create_detector` or
    :func:`~cytologia.detection.registry.load_detector`; see the module docstring for what a backend implements."""

    backend: ClassVar[str] = ""  # registry name (set on registration)

    def __init__(self, model: str, weights: str | Path | None = None, checkpoint: str | Path | None = None) -> None:
        self.model = model
        self.weights = weights
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self._net: Any = None
        self._net_device: Any = None

    # ------------------------------------------------------------------------------------- what a backend implements
    @classmethod
    @abstractmethod
    def models(cls) -> list[str]:
        """Architecture names this backend builds."""

    @classmethod
    @abstractmethod
    def checkpoint_model(cls, checkpoint: str | Path) -> str:
        """The architecture name a trained checkpoint of this backend was built as."""

    @classmethod
    @abstractmethod
    def save_random(cls, model: str, path: str | Path, *, img_size: int, seed: int = 0) -> Path:
        """Write a checkpoint of architecture ``model`` with random weights (seeded) that :meth:`load_network`
        reads and that records :data:`BACKEND_KEY`; for tests and timing (speed does not depend on the weights)."""

    @classmethod
    def recognizes(cls, header: CheckpointHeader) -> bool:
        """Whether a checkpoint that does not record its backend (written before checkpoints did) is of this
        backend, judged from its format. A backend whose checkpoints always recorded it keeps the default."""
        return False

    @abstractmethod
    def train(self, data: DetectionData, out_dir: Path, settings: TrainSettings) -> TrainResult:
        """Train on every fold but ``data.fold``, select a checkpoint on the held-out fold; weights go under
        ``out_dir`` (the selected ones as a checkpoint recording :data:`BACKEND_KEY`). Afterwards the detector
        predicts with the selected weights (reset ``self._net``)."""

    @abstractmethod
    def load_network(self, device: torch.device) -> torch.nn.Module:
        """The trained network of ``self.checkpoint`` for inference (eval, fp32) on ``device``: input float32
        (B, 3, S, S) RGB in [0, 1], output (B, 5, anchors) -- or a tuple whose first element is that."""

    @classmethod
    @abstractmethod
    def decode(cls, raw: Any, *, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
        """Raw output (B, 5, anchors; a torch tensor or numpy array) -> per image an (n, 5) float64 array
        ``x1, y1, x2, y2, score`` in input pixels: scores above ``conf``, class-agnostic NMS at ``iou``, at most
        ``max_det`` boxes, highest score first."""

    @abstractmethod
    def write_onnx(self, path: Path, *, img_size: int, opset: int | None) -> Path:
        """Write the network of ``self.checkpoint`` to ONNX at ``path``: input ``images`` (B, 3, S, S), output
        ``output0`` (B, 5, anchors), what :meth:`load_network` computes (NMS stays outside the graph)."""

    # ---------------------------------------------------------------------------------------- shared: the network
    def network(self, device: str = "auto") -> torch.nn.Module:
        """The trained network (:meth:`load_network`) on ``device``; loaded once per device."""
        from cytologia.device import resolve_device

        if self.checkpoint is None:
            raise CytologiaInputError(f"{self.model}: no trained checkpoint to predict with (train first)")
        dev = resolve_device(device, key="detector.device")
        if self._net is None or self._net_device != dev:
            self._net, self._net_device = self.load_network(dev), dev
        return self._net

    def forward_fn(self, device: str = "auto") -> Callable[[np.ndarray], torch.Tensor]:
        """The trained network as a function: network input (float32 numpy) -> raw output (B, 5, anchors), a float32
        tensor on ``device``, under ``torch.inference_mode`` -- what the ONNX graph computes."""
        import torch

        net = self.network(device)
        dev = self._net_device

        def forward(x: np.ndarray) -> torch.Tensor:
            with torch.inference_mode():
                out = net(torch.from_numpy(x).to(dev))
            return (out[0] if isinstance(out, (list, tuple)) else out).float()

        return forward

    # --------------------------------------------------------------------------------- shared: the prediction loop
    @classmethod
    def boxes_from_output(
        cls,
        raw: Any,
        frames: Sequence[Frame],
        size: int,
        *,
        conf: float,
        iou: float,
        max_det: int,
        flipped: bool = False,
    ) -> list[np.ndarray]:
        """Raw output of a batch -> per image an (n, 5) array ``x1, y1, x2, y2, score`` in the image's own pixels:
        :meth:`decode`, then un-mirrored when the input was ``flipped``, mapped through each image's letterbox
        ``frames`` and clipped to the image."""
        from cytologia.detection.letterbox import map_back

        return map_back(cls.decode(raw, conf=conf, iou=iou, max_det=max_det), frames, size, flipped)

    @classmethod
    def detect_images(
        cls,
        forward: Callable[[np.ndarray], Any],
        images: Sequence[str | Path],
        names: Sequence[str] | None = None,
        *,
        img_size: int,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 50,
        tta_flip: bool = False,
        batch_size: int = 16,
        workers: int | None = None,
    ) -> pd.DataFrame:
        """Run ``forward`` (a torch network, an ONNX Runtime session: network input -> raw output) over ``images``
        in batches and decode it the way this backend does; a :data:`PREDICT_COLUMNS` table (``tta`` = ``"none"``,
        or ``"hflip"`` for the mirrored pass). Decoding runs in ``workers`` threads; an unreadable image is an error
        naming it."""
        from cytologia.data.schema import BOX_COLUMNS
        from cytologia.detection.letterbox import detect_in_batches

        def decode_output(raw: Any, frames: list[Frame], flipped: bool) -> list[np.ndarray]:
            return cls.boxes_from_output(raw, frames, img_size, conf=conf, iou=iou, max_det=max_det, flipped=flipped)

        return detect_in_batches(
            forward,
            decode_output,
            images,
            names,
            img_size=img_size,
            tta_flip=tta_flip,
            batch_size=batch_size,
            workers=workers,
            columns=PREDICT_COLUMNS,
            types={c: np.float64 for c in (*BOX_COLUMNS, "score")},
        )

    def predict(
        self,
        images: Sequence[str | Path],
        *,
        img_size: int,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 50,
        tta_flip: bool = False,
        batch_size: int = 16,
        device: str = "auto",
        names: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """Boxes (:data:`PREDICT_COLUMNS`) of each image in its own pixel frame; ``tta_flip`` adds a pass on the
        mirrored image (rows with ``tta == "hflip"``, boxes mapped back). ``names`` default to the file names."""
        return self.detect_images(
            self.forward_fn(device),
            images,
            names,
            img_size=img_size,
            conf=conf,
            iou=iou,
            max_det=max_det,
            tta_flip=tta_flip,
            batch_size=batch_size,
        )

    # ----------------------------------------------------------------------------------------- shared: ONNX export
    def export_onnx(self, path: str | Path, *, img_size: int, opset: int | None = None) -> Path:
        """Write the trained network to ONNX at ``path`` (:meth:`write_onnx`; raw outputs, NMS outside the graph),
        with the backend recorded in the graph's metadata (:data:`BACKEND_KEY`)."""
        from cytologia.detection.export import record_backend

        if self.checkpoint is None:
            raise CytologiaInputError(f"{self.model}: no trained checkpoint to export (train first)")
        return record_backend(self.write_onnx(Path(path), img_size=img_size, opset=opset), self.backend)

    def verify_onnx(
        self,
        onnx_path: str | Path,
        images: Sequence[str | Path],
        img_size: int,
        *,
        conf: float = 0.001,
        iou: float = 0.6,
        max_det: int = 50,
    ) -> ParityReport:
        """ONNX Runtime against this detector on ``images`` (:func:`cytologia.detection.export.verify_onnx`)."""
        from cytologia.detection.export import verify_onnx

        return verify_onnx(self, onnx_path, images, img_size, conf=conf, iou=iou, max_det=max_det)


@functools.cache
def _stand_in(qualname: str) -> type:
    """An inert class standing for ``qualname`` in :func:`read_header`: built from anything, holds nothing."""

    def ignore(self: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _stand_in(f"{qualname}()")()

    methods = {"__init__": ignore, "__setstate__": ignore, "__setitem__": ignore, "append": ignore, "extend": ignore}
    return type("StandIn", (), {"qualname": qualname, "__call__": call, **methods})


def read_header(path: str | Path) -> CheckpointHeader:
    """The top level of a torch checkpoint (a zip archive holding ``data.pkl``) read without running its code or
    loading its tensors: every class and function the pickle names becomes an inert stand-in (recorded in
    ``globals``), tensors become None. Plain values (strings, numbers, dicts, lists) are read as they are."""
    import io
    import pickle
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: detector checkpoint not found")
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            data = archive.read(min(pkl, key=len)) if pkl else None
    except (zipfile.BadZipFile, OSError) as err:
        raise CytologiaInputError(f"{path}: not a detector checkpoint (not a torch zip archive: {err})") from None
    if data is None:
        raise CytologiaInputError(f"{path}: not a detector checkpoint (a zip archive without data.pkl)")
    seen: set[str] = set()

    class Peek(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            seen.add(f"{module}.{name}")
            return _stand_in(f"{module}.{name}")

        def persistent_load(self, pid: Any) -> Any:
            return None

    try:
        content = Peek(io.BytesIO(data)).load()
    except Exception as err:  # a damaged pickle can raise almost anything
        raise CytologiaInputError(f"{path}: not a readable detector checkpoint ({type(err).__name__}: {err})") from None
    return CheckpointHeader(path, content, frozenset(seen))


def recorded_backend(header: CheckpointHeader) -> str | None:
    """The backend a checkpoint records (:data:`BACKEND_KEY`), None when it records none."""
    value = header.get(BACKEND_KEY)
    if value is not None and not isinstance(value, str):
        raise CytologiaInputError(f"{header.path}: {BACKEND_KEY} is {value!r}, not a backend name")
    return value
