"""The inference pipeline: decode -> detect -> crop -> classify -> blend, on ONNX Runtime or on torch.

One pipeline, two network back-ends: everything around the networks (decoding, letterbox, NMS and box mapping,
weighted box fusion, the known-count rule, crops, TTA, the blend) is the same code for both, so ONNX Runtime and
torch differ only in the networks. Images are decoded in a thread pool (OpenCV releases the GIL), the next batch
while the current one runs when ``prefetch`` is on; crops are cut in memory and batched; nothing is written between
stages.

- **decode**: an image that does not decode (missing, empty, not an image) gets the fallback rule -- the pads of an
  image without detection, the prior class -- and is listed (:attr:`PipelineResult.problems`); ``strict`` raises.
- **detect**: each image is letterboxed to the detector's input (:mod:`cytologia.detection.letterbox`) and the raw
  output decoded by its backend's rule -- the backend the checkpoints or graphs record, else the ensemble file's --
  so boxes match the out-of-fold ones: on torch its
  :meth:`~cytologia.detection.base.Detector.boxes_from_output`, on ONNX Runtime the same rule in numpy
  (:func:`cytologia.detection.decode.decode_raw`, the same boxes bit for bit, no torch); every fold model,
  and its mirrored pass with flip TTA, is run; several passes are fused by weighted box fusion
  (:func:`cytologia.detection.fusion.weighted_box_fusion`); boxes without area are dropped. Then the **known-count**
  rule (the top-N per image, padded: :func:`known_count_boxes`) and/or the **open-world** rule (score threshold,
  NMS: :func:`open_world_boxes`) -- the rules of :func:`cytologia.detection.fusion.known_count` and
  :func:`~cytologia.detection.fusion.open_world`, applied per image on arrays (a test checks they agree).
- **crop**: the box plus the member's margin, stretched to its square input
  (:func:`cytologia.classification.geometry.crop_with_margin`), RGB, ImageNet mean/std -- exactly what
  :class:`~cytologia.classification.crops.CropDataset` feeds the classifier in training. A multi-label member sees
  the whole image letterboxed with its border colour (:func:`cytologia.classification.geometry.letterbox`).
- **classify**: each member's logits are the mean over its fold models, and over the plain and mirrored crop with
  flip TTA (the classification stage's ``+hflip`` OOF view). Members of weight 0 are not run.
- **blend**: :func:`cytologia.ensemble.blend_probabilities` -- the rule the weights were tuned with.

ONNX files missing from the ensemble file are exported from the checkpoints at start-up, once: kept next to each
checkpoint (:func:`cached_onnx`; logged) and reused by the next call; the torch runtime needs the checkpoints. An
inference bundle (``cytologia export ensemble``, :mod:`cytologia.ensemble.bundle`) holds only ONNX files: predicting
from it with ONNX Runtime imports neither torch, Lightning nor ultralytics.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.data.schema import BOX_COLUMNS, CLASSES
from cytologia.ensemble import N_CLASSES, Ensemble, MemberSpec, blend_probabilities, multilabel_probabilities
from cytologia.errors import CytologiaInputError
from cytologia.oof_names import flip_model_name

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("decode", "detect", "crop", "classify", "blend")
RUNTIMES: tuple[str, ...] = ("onnx", "torch")
MODES: tuple[str, ...] = ("known-count", "open-world")
PROB_PREFIX = "p_"  # probability columns of the output: p_B, p_BA, ...
PROB_COLUMNS: tuple[str, ...] = tuple(f"{PROB_PREFIX}{c}" for c in CLASSES)
OUTPUT_COLUMNS: tuple[str, ...] = (
    "NAME",
    *BOX_COLUMNS,
    "score",
    "source",
    "known_count",
    "open_world",
    "class",
    *PROB_COLUMNS,
)
DEFAULT_CLASSIFY_BATCH = 64  # crops per classifier call: bounds memory on many-cell batches
# The fallback rule's class when the caller names none: the most frequent class of the real train.csv (PNN: 6,827 of
# 52,748 boxes, data/synthetic/real_stats.json class_counts; a test checks it stays the arg-max there).
FALLBACK_CLASS = "PNN"
FALLBACK_PREFIX = "fallback:"  # ``source`` of a fallback box: fallback:<pad candidate> (prior, full, ...)
# Frame of the fallback boxes of an image whose header cannot be read either: a 368 px square (MISSION.md: images are
# mostly about 360 x 368 px; real_stats.json reference_px).
FALLBACK_FRAME = (368, 368)
Network = Callable[[np.ndarray], Any]  # float32 NCHW batch -> raw output (numpy, or a torch tensor for the detector)


# ---------------------------------------------------------------------------------------------------- networks
def _torch_device(device: str) -> Any:
    """The torch runtime's device for a pipeline device (auto, cpu, cuda; tensorrt runs torch on CUDA), as
    :func:`cytologia.device.resolve_device` decides it: the default device of that type (``cuda``, no index)."""
    import torch

    from cytologia.device import resolve_device

    if device not in ("auto", "cpu", "cuda", "tensorrt"):
        raise CytologiaInputError(f"device {device!r} is not one of auto, cpu, cuda")
    try:
        resolved = resolve_device("cuda" if device == "tensorrt" else device)
    except CytologiaInputError:
        raise CytologiaInputError(f"device {device}: torch sees no CUDA device") from None
    return torch.device(resolved.type)


def _torch_network(module: Any, device: Any, numpy_out: bool) -> Network:
    """A torch module as a :data:`Network`: inference mode, fp16 autocast on CUDA, channels-last on the CPU (oneDNN
    convolutions run faster on NHWC)."""
    import torch

    module = module.eval().to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            out = module(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().cpu().numpy() if numpy_out else out.float()

    return run


def _export_detector_bytes(checkpoint: Path, img_size: int) -> bytes:
    from cytologia.detection.export import export_detector

    with tempfile.TemporaryDirectory(prefix="cytologia-det-") as tmp:
        _, path = export_detector(checkpoint, Path(tmp) / "detector.onnx", img_size)
        return path.read_bytes()


def _export_classifier_bytes(checkpoint: Path, img_size: int) -> bytes:
    from cytologia.classification.export import export_classifier_onnx
    from cytologia.classification.module import ClassifierModule

    module = ClassifierModule.from_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="cytologia-cls-") as tmp:
        return export_classifier_onnx(module.model, Path(tmp) / "classifier.onnx", img_size).read_bytes()


ONNX_CACHE_SUFFIX = "px.onnx"  # <checkpoint>.<img_size>px.onnx: a checkpoint's graph, exported once


def cached_onnx(checkpoint: Path, img_size: int, kind: str) -> Path | bytes:
    """The ONNX graph of a ``kind`` (``detector`` | ``classifier``) checkpoint at ``img_size`` px, exported once:
    ``<checkpoint>.<img_size>px.onnx`` next to it, reused while it is not older than the checkpoint (a checkpoint
    written again is exported again). Returns that path, or the graph's bytes where the folder is not writable (then
    it is exported in memory on every call, as before)."""
    import os

    checkpoint = Path(checkpoint)
    target = checkpoint.with_name(f"{checkpoint.name}.{img_size}{ONNX_CACHE_SUFFIX}")
    if not checkpoint.is_file():
        raise CytologiaInputError(f"{checkpoint}: checkpoint not found")
    if target.is_file() and target.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
        log.info("%s: using its ONNX export %s", checkpoint, target.name)
        return target
    export = _export_detector_bytes if kind == "detector" else _export_classifier_bytes
    log.info("%s: no ONNX file; exporting it at %d px (once: kept as %s)", checkpoint, img_size, target.name)
    data = export(checkpoint, img_size)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        log.info("%s: cannot keep the export (%s); it stays in memory", target, err.strerror or err)
        return data
    return target


def _checkpoint_img_size(checkpoint: Path) -> int | None:
    from cytologia.classification.module import load_checkpoint

    return load_checkpoint(checkpoint).get("hyper_parameters", {}).get("img_size")


# ----------------------------------------------------------------------------------------------------- results
@dataclass
class BatchTiming:
    """Seconds each stage took for one batch of ``n_images`` images (decode: waiting for the decoded images)."""

    n_images: int
    n_boxes: int
    seconds: dict[str, float]


@dataclass(frozen=True)
class ImageProblem:
    """An image the pipeline could not decode, predicted with the fallback rule instead: ``status`` is ``missing``
    (no such file) or ``unreadable``; ``message`` names the file; ``width``/``height`` come from its header when
    that is readable (-1 otherwise: the fallback boxes are then in a :data:`FALLBACK_FRAME` frame)."""

    NAME: str
    status: str
    message: str
    width: int = -1
    height: int = -1

    def as_dict(self) -> dict[str, object]:
        return {"NAME": self.NAME, "status": self.status, "message": self.message, "action": "fallback"}


@dataclass
class PipelineResult:
    """Classified boxes (:data:`OUTPUT_COLUMNS`, image order as given, then decreasing score), image sizes (decoded,
    or read from the header of an image that did not decode), the timing of every batch, the wall time, what ran
    (providers, precision, int8 decisions), and the images predicted with the fallback rule (NAME -> problem)."""

    boxes: pd.DataFrame
    sizes: dict[str, tuple[int, int]]
    timings: list[BatchTiming]
    wall_seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    problems: dict[str, ImageProblem] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # the images in the order they were given

    def rows(self, mode: str) -> pd.DataFrame:
        """The boxes of one rule: ``known-count`` or ``open-world``."""
        column = "known_count" if mode == "known-count" else "open_world"
        return self.boxes[self.boxes[column].to_numpy(bool)].reset_index(drop=True)


@dataclass
class _Boxes:
    """The boxes of one batch as arrays: ``image`` is the index of the box's image in the batch."""

    image: np.ndarray
    xyxy: np.ndarray
    score: np.ndarray
    source: list[str]
    known_count: np.ndarray
    open_world: np.ndarray

    @classmethod
    def empty(cls) -> _Boxes:
        return cls(np.zeros(0, np.int64), np.zeros((0, 4)), np.zeros(0), [], np.zeros(0, bool), np.zeros(0, bool))

    def take(self, order: np.ndarray) -> _Boxes:
        return _Boxes(
            self.image[order],
            self.xyxy[order],
            self.score[order],
            [self.source[int(i)] for i in order],
            self.known_count[order],
            self.open_world[order],
        )

    @classmethod
    def concat(cls, parts: list[_Boxes]) -> _Boxes:
        """The boxes of ``parts`` (their ``image`` indices in one batch), ordered by image, stably: each image's
        rows keep their order (decreasing score)."""
        both = cls(
            np.concatenate([p.image for p in parts]).astype(np.int64),
            np.concatenate([p.xyxy for p in parts]).reshape(-1, 4),
            np.concatenate([p.score for p in parts]),
            [s for p in parts for s in p.source],
            np.concatenate([p.known_count for p in parts]).astype(bool),
            np.concatenate([p.open_world for p in parts]).astype(bool),
        )
        return both.take(np.argsort(both.image, kind="stable"))


def _output_table(names: list[str], outputs: list[tuple[list[int], _Boxes, np.ndarray]]) -> pd.DataFrame:
    """The result table (:data:`OUTPUT_COLUMNS`) of every batch, built once."""
    name_arr = np.asarray(names, dtype=object)
    parts = [(np.asarray(batch)[b.image], b, p) for batch, b, p in outputs if len(b.score)]
    if not parts:
        empty = pd.DataFrame({c: pd.Series(dtype=object) for c in OUTPUT_COLUMNS})
        return empty
    index = np.concatenate([i for i, _, _ in parts])
    xyxy = np.concatenate([b.xyxy for _, b, _ in parts])
    probs = np.concatenate([p for _, _, p in parts]).astype(np.float32)
    data: dict[str, Any] = {"NAME": name_arr[index]}
    data.update({c: xyxy[:, j] for j, c in enumerate(BOX_COLUMNS)})
    data["score"] = np.concatenate([b.score for _, b, _ in parts])
    data["source"] = np.array([s for _, b, _ in parts for s in b.source], dtype=object)
    data["known_count"] = np.concatenate([b.known_count for _, b, _ in parts])
    data["open_world"] = np.concatenate([b.open_world for _, b, _ in parts])
    data["class"] = np.asarray(CLASSES, dtype=object)[probs.argmax(axis=1)]
    data.update({c: probs[:, j] for j, c in enumerate(PROB_COLUMNS)})
    return pd.DataFrame(data, columns=list(OUTPUT_COLUMNS))


@dataclass
class _Member:
    spec: MemberSpec
    weight: float
    nets: list[Network]
    runtime_info: list[dict[str, object]]


class Pipeline:
    """Detector + classifier ensemble of an :class:`~cytologia.ensemble.Ensemble`, ready to predict.

    ``runtime``: ``onnx`` (ONNX Runtime, :class:`~cytologia.runtime.sessions.OrtModel`) or ``torch``. ``device``:
    ``auto``, ``cpu``, ``cuda`` or ``tensorrt`` (ONNX Runtime only). ``threads``: CPU threads of each session / of
    torch (None: the library's default). ``tta_flip``: None follows the file (per member and for the detector),
    True/False forces it everywhere. ``int8`` (ONNX Runtime on the CPU): ``off``; ``on`` quantises every cell
    member's models unmeasured; ``measure`` decides per model on real crops (:meth:`calibrate_int8`, which the caller
    runs on a few images before predicting) and keeps int8 only where it is faster and as accurate
    (:func:`~cytologia.runtime.sessions.measure_int8`).
    """

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        runtime: str = "onnx",
        device: str = "auto",
        threads: int | None = None,
        tta_flip: bool | None = None,
        int8: str = "off",
        batch_size: int = 8,
        classify_batch: int = DEFAULT_CLASSIFY_BATCH,
        workers: int | None = None,
        trt_cache: str | Path | None = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise CytologiaInputError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        if int8 not in ("off", "on", "measure"):
            raise CytologiaInputError(f"int8={int8!r} is not one of off, on, measure")
        if batch_size < 1 or classify_batch < 1:
            raise CytologiaInputError("batch sizes must be >= 1")
        if ensemble.detector is None:
            raise CytologiaInputError("the ensemble file has no detector: predict needs one")
        self.ensemble = ensemble
        self.runtime = runtime
        self.device = device
        self.threads = threads
        self.tta_override = tta_flip
        self.int8 = int8
        self.batch_size = int(batch_size)
        self.classify_batch = int(classify_batch)
        self.workers = workers
        self.trt_cache = trt_cache
        self.int8_decisions: list[dict[str, object]] = []
        self._set_threads()
        det = ensemble.detector
        self.det = det
        self.det_flip = det.tta_flip if tta_flip is None else tta_flip
        self.detectors, self.detector_info, self.detector_backend = self._load_detectors()
        cells = [m for m in ensemble.cell_members]
        weights = ensemble.weights()
        self.members = [
            self._load_member(spec, float(w)) for spec, w in zip(cells, weights) if w > 0
        ]  # members of weight 0 are not run
        ml = ensemble.multilabel_member
        self.multilabel = (
            self._load_member(ml, ensemble.blend.multilabel_weight)
            if ml is not None and ensemble.blend.multilabel_weight > 0
            else None
        )
        self.bias = None if ensemble.blend.class_bias is None else np.asarray(ensemble.blend.class_bias, np.float64)
        if int8 == "on":
            self._requantize_all()

    @property
    def detector_cls(self) -> Any:
        """The detector backend's class (:mod:`cytologia.detection.registry`; importing it imports its framework)."""
        from cytologia.detection.registry import get_backend

        return get_backend(self.detector_backend)

    # -- loading
    def _set_threads(self) -> None:
        if self.threads is not None and self.runtime == "torch":  # ONNX Runtime sessions take their own threads
            import torch

            torch.set_num_threads(int(self.threads))

    def _ort(self, source: Any, name: str) -> Any:
        from cytologia.runtime.sessions import OrtModel

        return OrtModel(source, device=self.device, threads=self.threads, trt_cache=self.trt_cache, name=name)

    def _load_detectors(self) -> tuple[list[Network], list[dict[str, object]], str]:
        """The detector's networks (fold models), their descriptions, and the backend whose rule decodes their
        output: the one the files record (:func:`cytologia.detection.registry.agreed_backend_name`)."""
        from cytologia.detection.export import graph_backend
        from cytologia.detection.registry import agreed_backend_name

        det = self.det
        agreed_backend_name(det.backend, {})  # an unknown backend name fails before any model is loaded
        nets: list[Network] = []
        info: list[dict[str, object]] = []
        recorded: dict[str, str | None] = {}
        if self.runtime == "onnx":
            sources: list[tuple[Any, str]] = [(self.ensemble.resolve(p), p) for p in det.onnx]
            if not sources:
                if not det.checkpoints:
                    raise CytologiaInputError("detector: the ensemble file lists neither onnx files nor checkpoints")
                for ckpt in det.checkpoints:
                    sources.append((cached_onnx(self.ensemble.resolve(ckpt), det.img_size, "detector"), ckpt))
            for source, label in sources:
                model = self._ort(source, f"detector {label}")
                nets.append(model)
                info.append(model.describe())
                recorded[label] = graph_backend(model.session)
        else:
            if not det.checkpoints:
                raise CytologiaInputError("detector: the torch runtime needs checkpoints; the ensemble file has none")
            from cytologia.detection.registry import load_detector

            device = _torch_device(self.device)
            for ckpt in det.checkpoints:
                detector = load_detector(self.ensemble.resolve(ckpt))
                recorded[ckpt] = detector.backend
                where = str(device.index or 0) if device.type == "cuda" else "cpu"
                # the module itself: run under fp16 autocast on CUDA
                nets.append(_torch_network(detector.network(where), device, numpy_out=False))
                info.append({"name": f"detector {ckpt}", "device": str(device), "precision": _torch_precision(device)})
        return nets, info, agreed_backend_name(det.backend, recorded)

    def _load_member(self, spec: MemberSpec, weight: float) -> _Member:
        nets: list[Network] = []
        info: list[dict[str, object]] = []
        if self.runtime == "onnx":
            sources: list[tuple[Any, str]] = [(self.ensemble.resolve(p), p) for p in spec.onnx]
            if not sources:
                if not spec.checkpoints:
                    raise CytologiaInputError(f"member {spec.name}: neither onnx files nor checkpoints in the ensemble")
                for ckpt in spec.checkpoints:
                    sources.append((cached_onnx(self.ensemble.resolve(ckpt), spec.img_size, "classifier"), ckpt))
            for source, label in sources:
                model = self._ort(source, f"{spec.name} {label}")
                _check_input(model.input_shape, spec, label)
                nets.append(model)
                info.append(model.describe())
        else:
            if not spec.checkpoints:
                raise CytologiaInputError(f"member {spec.name}: the torch runtime needs checkpoints; the file has none")
            from cytologia.classification.module import ClassifierModule

            device = _torch_device(self.device)
            for ckpt in spec.checkpoints:
                path = self.ensemble.resolve(ckpt)
                size = _checkpoint_img_size(path)
                if size is not None and int(size) != spec.img_size:
                    raise CytologiaInputError(
                        f"member {spec.name}: {ckpt} was trained at {size} px, the file says img_size {spec.img_size}"
                    )
                module = ClassifierModule.from_checkpoint(path)
                nets.append(_torch_network(module.model, device, numpy_out=True))
                info.append(
                    {"name": f"{spec.name} {ckpt}", "device": str(device), "precision": _torch_precision(device)}
                )
        return _Member(spec, weight, nets, info)

    def _requantize_all(self) -> None:
        """int8 on: every cell member's sessions quantised (no measurement)."""
        from cytologia.runtime.sessions import OrtModel

        if self.runtime != "onnx":
            raise CytologiaInputError("int8 applies to the ONNX Runtime runtime only")
        for member in self.members:
            for k, net in enumerate(member.nets):
                assert isinstance(net, OrtModel)
                if net.on_gpu:
                    raise CytologiaInputError("int8 dynamic quantisation is a CPU option; use --device cpu")
                from cytologia.runtime.sessions import load_proto

                source = self.ensemble.resolve(member.spec.onnx[k]) if member.spec.onnx else None
                if source is None:
                    raise CytologiaInputError(f"member {member.spec.name}: int8 needs its ONNX files")
                member.nets[k] = OrtModel(
                    load_proto(source),
                    device="cpu",
                    threads=self.threads,
                    int8=True,
                    name=f"{member.spec.name} {member.spec.onnx[k]}",
                )
                member.runtime_info[k] = member.nets[k].describe()

    def calibrate_int8(
        self, paths: Sequence[str | Path], names: Sequence[str] | None = None
    ) -> list[dict[str, object]]:
        """``int8="measure"``: run ``paths`` through decode, detect and crop, then measure int8 against fp32 per
        cell member model on those crops and keep it where it is accepted. Returns the decisions."""
        from cytologia.runtime.sessions import OrtModel, load_proto, measure_int8

        if self.runtime != "onnx":
            raise CytologiaInputError("int8 applies to the ONNX Runtime runtime only")
        paths = [Path(p) for p in paths]
        names = [p.name for p in paths] if names is None else list(names)
        images = [_decode(p) for p in paths]
        boxes = self._detect(images, names, None, "open-world", min_rows=True)
        decisions = []
        for member in self.members:
            crops = self._crop_group(images, boxes.image, boxes.xyxy, member.spec.img_size, member.spec.margin)
            if not len(crops):
                continue
            for k, net in enumerate(member.nets):
                if not isinstance(net, OrtModel) or net.on_gpu or not member.spec.onnx:
                    continue
                label = f"{member.spec.name} {member.spec.onnx[k]}"
                proto = load_proto(self.ensemble.resolve(member.spec.onnx[k]))
                decision, session = measure_int8(proto, crops[: self.classify_batch], threads=self.threads, name=label)
                log.info("int8 %s: %s", label, decision.reason)
                decisions.append(decision.as_dict())
                if session is not None:
                    member.nets[k] = session
                    member.runtime_info[k] = session.describe()
        self.int8_decisions = decisions
        return decisions

    # -- stages
    def _passes(self) -> list[bool]:
        return [False, True] if self.det_flip else [False]

    def _raw_boxes(self, images: list[np.ndarray], names: list[str]) -> list[np.ndarray]:
        """Per image an (k, 5) array ``x1, y1, x2, y2, score`` in its own pixels: NMS of each pass, fused by WBF when
        there are several passes (fold models x flip); boxes without area dropped."""
        from cytologia.detection.decode import decode_raw
        from cytologia.detection.fusion import weighted_box_fusion
        from cytologia.detection.letterbox import letterbox, map_back, to_input

        det = self.det
        if self.runtime == "onnx":  # numpy decoding, the backends' rule (cytologia.detection.decode): no torch

            def boxes_from_output(raw: Any, frames: Any, size: int, *, flipped: bool, **kw: Any) -> list[np.ndarray]:
                return map_back(decode_raw(raw, **kw), frames, size, flipped)

        else:
            boxes_from_output = self.detector_cls.boxes_from_output
        boxed = [letterbox(im, det.img_size) for im in images]
        squares, frames = [b[0] for b in boxed], [b[1] for b in boxed]
        passes: list[tuple[str, list[np.ndarray]]] = []
        for k, net in enumerate(self.detectors):
            for flip in self._passes():
                raw = net(to_input(squares, flip))
                dets = boxes_from_output(
                    raw, frames, det.img_size, conf=det.conf, iou=det.nms_iou, max_det=det.max_det, flipped=flip
                )
                passes.append((flip_model_name(f"det{k}") if flip else f"det{k}", [_with_area(d) for d in dets]))
        if len(passes) == 1:
            return passes[0][1]
        parts = [(tag, name, d) for tag, dets in passes for name, d in zip(names, dets) if len(d)]
        if not parts:
            return [np.zeros((0, 5)) for _ in names]
        arr = np.concatenate([d for _, _, d in parts])
        table = pd.DataFrame({"NAME": np.concatenate([[n] * len(d) for _, n, d in parts]).astype(object)})
        for j, c in enumerate((*BOX_COLUMNS, "score")):
            table[c] = arr[:, j]
        table["model"] = np.concatenate([[t] * len(d) for t, _, d in parts]).astype(object)
        fused = weighted_box_fusion(
            table,
            iou_thr=det.wbf_iou,
            skip_thr=det.wbf_skip,
            conf_type=det.wbf_conf_type,
            source="detections",
            weights={tag: 1.0 for tag, _ in passes},
        )
        values = fused[[*BOX_COLUMNS, "score"]].to_numpy(np.float64)
        by_name = {n: _with_area(values[idx]) for n, idx in fused.groupby("NAME", sort=False).indices.items()}
        return [by_name.get(n, np.zeros((0, 5))) for n in names]

    def _detect(
        self,
        images: list[np.ndarray],
        names: list[str],
        counts: Mapping[str, int] | None,
        mode: str,
        min_rows: bool = False,
    ) -> _Boxes:
        """Boxes of a batch, per image in decreasing score.

        Known-count and open-world boxes are chosen per image on arrays (:func:`known_count_boxes`,
        :func:`open_world_boxes`: the rules of :mod:`cytologia.detection.fusion`, without its table overhead, which
        costs more than the detector network at one image per batch); a box both rules keep is one row."""
        det = self.det
        if counts is None and mode == "known-count" and not min_rows:
            raise CytologiaInputError("known-count mode needs the number of cells per image (test.csv)")
        out = _Boxes.empty()
        parts: list[list[list]] = []
        for i, (name, image, d) in enumerate(zip(names, images, self._raw_boxes(images, names))):
            h, w = image.shape[:2]
            rows: list[list] = []  # [box, score, source, known_count, open_world]
            if counts is not None:
                kc_box, kc_score, kc_source = known_count_boxes(d, int(counts[name]), w, h)
                rows = [[kc_box[j], kc_score[j], kc_source[j], True, False] for j in range(len(kc_box))]
            if mode == "open-world" or min_rows:
                for j in open_world_boxes(d, det.open_world_score, det.open_world_iou):
                    box = d[j, :4]
                    same = next(
                        (r for r in rows if r[2] == "detector" and not r[4] and np.array_equal(r[0], box)), None
                    )
                    if same is not None:  # a detection both rules keep: one row
                        same[4] = True
                    else:
                        rows.append([box, d[j, 4], "detector", False, True])
            if min_rows and not rows:  # int8 calibration on an image without detection: its full frame
                rows.append([np.array([0.0, 0.0, w, h]), 0.0, "full", False, False])
            rows.sort(key=lambda r: -r[1])  # stable: equal scores keep their order
            parts.append([[i, *r] for r in rows])
        flat = [r for rows in parts for r in rows]
        if flat:
            out = _Boxes(
                image=np.array([r[0] for r in flat], dtype=np.int64),
                xyxy=np.array([r[1] for r in flat], dtype=np.float64).reshape(-1, 4),
                score=np.array([r[2] for r in flat], dtype=np.float64),
                source=[r[3] for r in flat],
                known_count=np.array([r[4] for r in flat], dtype=bool),
                open_world=np.array([r[5] for r in flat], dtype=bool),
            )
        return out

    def _crop_group(
        self, images: list[np.ndarray], image: np.ndarray, xyxy: np.ndarray, size: int, margin: float
    ) -> np.ndarray:
        """Crops of boxes ``xyxy`` of ``images[image[i]]``: (n, 3, size, size) float32, RGB, ImageNet-normalised."""
        from cytologia.classification.geometry import IMAGENET_MEAN, IMAGENET_STD, crop_with_margin

        out = np.empty((len(xyxy), 3, size, size), dtype=np.float32)
        mean = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)
        for i in range(len(xyxy)):
            crop = crop_with_margin(images[int(image[i])], xyxy[i], margin, size)[..., ::-1]  # BGR -> RGB
            out[i] = ((crop.astype(np.float32) - mean) * inv_std).transpose(2, 0, 1)
        return out

    def _whole_images(self, images: list[np.ndarray], size: int) -> np.ndarray:
        """The multi-label member's input: each whole image letterboxed with its border colour, RGB, normalised --
        :class:`cytologia.classification.fullimage` 's preprocessing, which it was trained with."""
        from cytologia.classification.geometry import IMAGENET_MEAN, IMAGENET_STD, letterbox

        mean = np.asarray(IMAGENET_MEAN, np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(IMAGENET_STD, np.float32) * 255.0)
        out = np.empty((len(images), 3, size, size), dtype=np.float32)
        for i, image in enumerate(images):
            boxed = letterbox(np.ascontiguousarray(image[..., ::-1]), size)  # BGR -> RGB, then as in training
            out[i] = ((boxed.astype(np.float32) - mean) * inv_std).transpose(2, 0, 1)
        return out

    def _classify_member(self, member: _Member, x: np.ndarray) -> np.ndarray:
        flip = member.spec.tta_flip if self.tta_override is None else self.tta_override
        total = None
        for net in member.nets:
            chunks = []
            for start in range(0, len(x), self.classify_batch):
                xb = x[start : start + self.classify_batch]
                z = np.asarray(net(xb), dtype=np.float64)
                if flip:
                    z = (z + np.asarray(net(np.ascontiguousarray(xb[..., ::-1])), dtype=np.float64)) / 2.0
                chunks.append(z)
            z_all = np.concatenate(chunks) if chunks else np.zeros((0, member.spec.num_labels))
            total = z_all if total is None else total + z_all
        assert total is not None
        return total / len(member.nets)

    # -- the whole
    def predict(
        self,
        paths: Sequence[str | Path],
        names: Sequence[str] | None = None,
        counts: pd.Series | dict[str, int] | None = None,
        mode: str = "known-count",
        *,
        prefetch: bool = True,
        strict: bool = False,
        fallback_class: str = FALLBACK_CLASS,
        progress: bool | None = False,
    ) -> PipelineResult:
        """Run the pipeline over ``paths`` (image files; ``names`` default to the file names).

        ``counts`` (NAME -> number of cells, e.g. from ``test.csv``) is required in known-count mode; in open-world
        mode, when given, the known-count boxes are computed too (a submission needs them), classified once with the
        open-world boxes they share.

        An image that cannot be decoded (missing, empty, not an image, a header libjpeg cannot parse) is predicted
        with the fallback rule: its known-count boxes are the pads of an image without detection
        (:func:`known_count_boxes`: the prior box, the full image, ...) in the frame its header gives, with
        ``fallback_class`` (probability 1), ``source`` ``fallback:<pad>``; it is listed in
        :attr:`PipelineResult.problems` and logged. ``strict``: raise :class:`CytologiaInputError` naming the file
        instead. ``progress``: a progress bar on the standard error (:func:`cytologia.console.progress_bar`; None:
        only when it is a terminal).
        """
        from cytologia.console import progress_bar

        if mode not in MODES:
            raise CytologiaInputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        if fallback_class not in CLASSES:
            raise CytologiaInputError(f"fallback class {fallback_class!r} is not one of {', '.join(CLASSES)}")
        paths = [Path(p) for p in paths]
        names = [p.name for p in paths] if names is None else [str(n) for n in names]
        if len(names) != len(paths):
            raise CytologiaInputError(f"{len(names)} names for {len(paths)} images")
        count_series = None if counts is None else pd.Series(counts, dtype=np.int64)
        if mode == "known-count":
            if count_series is None:
                raise CytologiaInputError("known-count mode needs the number of cells per image (test.csv)")
            lacking = [n for n in names if n not in count_series.index]
            if lacking:
                raise CytologiaInputError(f"{len(lacking)} image(s) without a cell count, e.g. {lacking[:3]}")
        count_of = None if count_series is None else count_series.reindex(names).to_dict()
        self._set_threads()
        start_all = time.perf_counter()
        batches = [list(range(i, min(i + self.batch_size, len(paths)))) for i in range(0, len(paths), self.batch_size)]
        timings: list[BatchTiming] = []
        outputs: list[tuple[list[int], _Boxes, np.ndarray]] = []
        sizes: dict[str, tuple[int, int]] = {}
        problems: dict[str, ImageProblem] = {}
        workers = self.workers or min(8, max(1, len(batches[0]) if batches else 1))
        bar = progress_bar(len(paths), "predict", unit="img", enable=progress)
        with ThreadPoolExecutor(max_workers=workers) as pool, bar:

            def submit(b: list[int]) -> list[Future]:
                return [pool.submit(_try_decode, paths[i]) for i in b]

            pending = submit(batches[0]) if batches else []
            for bi, batch in enumerate(batches):
                sec: dict[str, float] = {}
                t0 = time.perf_counter()
                futures = pending if pending else submit(batch)
                decoded = [f.result() for f in futures]
                sec["decode"] = time.perf_counter() - t0
                pending = submit(batches[bi + 1]) if prefetch and bi + 1 < len(batches) else []
                batch_names = [names[i] for i in batch]
                good = [k for k, (im, _) in enumerate(decoded) if im is not None]
                for k, (im, err) in enumerate(decoded):
                    if im is not None:
                        sizes[batch_names[k]] = (int(im.shape[1]), int(im.shape[0]))
                        continue
                    if strict:
                        raise CytologiaInputError(
                            f"{err} (strict: stopped; without --strict the image would be "
                            "predicted with the fallback rule)"
                        )
                    problem = _problem(batch_names[k], paths[batch[k]], err)
                    problems[problem.NAME] = problem
                    if problem.width > 0:
                        sizes[problem.NAME] = (problem.width, problem.height)
                    log.warning("%s; predicted with the fallback rule", err)
                parts: list[_Boxes] = []
                prob_parts: list[np.ndarray] = []
                n_boxes = 0
                if good:
                    images = [decoded[k][0] for k in good]
                    boxes, probs, stage_sec = self._run_batch(images, [batch_names[k] for k in good], count_of, mode)
                    sec.update(stage_sec)
                    boxes.image = np.asarray(good, np.int64)[boxes.image]
                    parts.append(boxes)
                    prob_parts.append(probs)
                if len(good) < len(batch):
                    bad = [k for k in range(len(batch)) if decoded[k][0] is None]
                    fb = _fallback_boxes(bad, [problems[batch_names[k]] for k in bad], count_of)
                    parts.append(fb)
                    prob_parts.append(_one_hot(fallback_class, len(fb.score)))
                boxes = _Boxes.concat(parts)
                probs = np.concatenate(prob_parts)[np.argsort(np.concatenate([p.image for p in parts]), kind="stable")]
                n_boxes = len(boxes.score)
                timings.append(BatchTiming(len(batch), n_boxes, sec))
                outputs.append((batch, boxes, probs))
                bar.update(len(batch))
        table = _output_table(names, outputs)
        wall = time.perf_counter() - start_all
        return PipelineResult(table, sizes, timings, wall, self.describe(), problems, list(names))

    def _run_batch(
        self, images: list[np.ndarray], names: list[str], counts: dict[str, int] | None, mode: str
    ) -> tuple[_Boxes, np.ndarray, dict[str, float]]:
        sec: dict[str, float] = {}
        t = time.perf_counter()
        boxes = self._detect(images, names, counts, mode)
        sec["detect"] = time.perf_counter() - t

        t = time.perf_counter()
        groups: dict[tuple[int, float], np.ndarray] = {}
        for member in self.members:
            key = (member.spec.img_size, float(member.spec.margin))
            if key not in groups:
                groups[key] = self._crop_group(images, boxes.image, boxes.xyxy, *key)
        whole = None
        if self.multilabel is not None:
            whole = self._whole_images(images, self.multilabel.spec.img_size)
        sec["crop"] = time.perf_counter() - t

        t = time.perf_counter()
        logits = [
            self._classify_member(m, groups[(m.spec.img_size, float(m.spec.margin))])[:, :N_CLASSES]
            for m in self.members
        ]
        image_prob = None
        if self.multilabel is not None and whole is not None:
            image_prob = multilabel_probabilities(self._classify_member(self.multilabel, whole))[boxes.image]
        sec["classify"] = time.perf_counter() - t

        t = time.perf_counter()
        weights = np.array([m.weight for m in self.members], np.float64)
        stack = np.stack(logits) if logits else np.zeros((0, len(boxes.score), N_CLASSES))
        rule = boxes.known_count if mode == "known-count" else boxes.open_world
        single = np.bincount(boxes.image, weights=rule, minlength=len(images))[boxes.image] == 1
        ml_weight = self.multilabel.weight if self.multilabel is not None else 0.0
        probs = blend_probabilities(stack, weights / weights.sum(), self.bias, image_prob, single, ml_weight)
        sec["blend"] = time.perf_counter() - t
        return boxes, probs, sec

    def describe(self) -> dict[str, Any]:
        """What runs: runtime, device, the sessions' providers and precision, TTA, int8 decisions."""
        return {
            "runtime": self.runtime,
            "device": self.device,
            "threads": self.threads,
            "batch_size": self.batch_size,
            "detector": {"models": self.detector_info, "img_size": self.det.img_size, "tta_flip": self.det_flip},
            "members": [
                {
                    "name": m.spec.name,
                    "weight": m.weight,
                    "img_size": m.spec.img_size,
                    "models": m.runtime_info,
                    "tta_flip": m.spec.tta_flip if self.tta_override is None else self.tta_override,
                }
                for m in self.members
            ],
            "multilabel": None if self.multilabel is None else self.multilabel.spec.name,
            "int8": self.int8,
            "int8_decisions": self.int8_decisions,
        }


def _torch_precision(device: Any) -> str:
    return "fp16 autocast" if device.type == "cuda" else "fp32"


def _check_input(shape: list[Any], spec: MemberSpec, label: str) -> None:
    """A classifier graph's static input side must be the member's img_size."""
    if len(shape) == 4 and isinstance(shape[2], int) and shape[2] != spec.img_size:
        raise CytologiaInputError(
            f"member {spec.name}: {label} takes {shape[2]} px inputs, the file says {spec.img_size}"
        )


def _decode(path: Path) -> np.ndarray:
    from cytologia.data.images import decode

    return decode(path)


def _try_decode(path: Path) -> tuple[np.ndarray | None, str]:
    """(BGR image, "") or (None, why it cannot be decoded, naming the file)."""
    import cv2

    try:
        return _decode(path), ""
    except CytologiaInputError as err:
        return None, str(err)
    except (cv2.error, OSError, ValueError, MemoryError) as err:  # OpenCV's own limits (pixels, memory), I/O errors
        return None, f"{path}: cannot decode image ({type(err).__name__}: {err})"


def _problem(name: str, path: Path, message: str) -> ImageProblem:
    """What went wrong with an image that did not decode, with its header size when the header is readable."""
    from cytologia.data.images import image_size

    if not path.is_file():
        return ImageProblem(name, "missing", message)
    try:
        w, h = image_size(path)
    except CytologiaInputError:
        return ImageProblem(name, "unreadable", message)
    return ImageProblem(name, "unreadable", message, w, h)


def _fallback_boxes(index: list[int], problems: list[ImageProblem], counts: Mapping[str, int] | None) -> _Boxes:
    """Known-count boxes of images that did not decode: the pads of an image without detection, in the frame of
    the image's header (:data:`FALLBACK_FRAME` when unknown); none without a cell count (open-world only)."""
    parts = []
    for i, problem in zip(index, problems):
        if counts is None:
            continue
        w, h = (problem.width, problem.height) if problem.width > 0 else FALLBACK_FRAME
        xyxy, score, source = known_count_boxes(np.zeros((0, 5)), int(counts[problem.NAME]), w, h)
        n = len(score)
        parts.append(
            _Boxes(
                np.full(n, i, np.int64),
                xyxy,
                score,
                [FALLBACK_PREFIX + s.split(":", 1)[-1] for s in source],
                np.ones(n, bool),
                np.zeros(n, bool),
            )
        )
    return _Boxes.concat(parts) if parts else _Boxes.empty()


def _one_hot(cls: str, n: int) -> np.ndarray:
    probs = np.zeros((n, N_CLASSES), np.float64)
    probs[:, CLASSES.index(cls)] = 1.0
    return probs


def _with_area(d: np.ndarray) -> np.ndarray:
    """Rows of an (k, 5) box array with a positive width and height (a box clipped to the border can lose both)."""
    d = np.asarray(d, dtype=np.float64).reshape(-1, 5)
    keep = (d[:, 2] > d[:, 0]) & (d[:, 3] > d[:, 1])
    if not keep.all():
        log.debug("%d box(es) without area dropped", int((~keep).sum()))
    return d[keep]


def known_count_boxes(d: np.ndarray, n: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The known-count rule on one image's ``(k, 5)`` boxes: the ``n`` highest-scoring (ties: earlier row first),
    padded as :func:`cytologia.detection.fusion.known_count` pads (its :data:`~cytologia.detection.fusion.PAD_ORDER`
    and candidates; pads score 0). Returns boxes ``(n, 4)``, scores and sources ("detector" or "pad:<candidate>")."""
    from cytologia.detection.fusion import PAD_ORDER, PAD_PREFIX, pad_candidates, pad_situation

    if n < 1:
        raise CytologiaInputError(f"cell count {n} must be >= 1")
    d = np.asarray(d, dtype=np.float64).reshape(-1, 5)
    order = np.lexsort((np.arange(len(d)), -d[:, 4]))[:n]
    boxes, scores, sources = [d[order, :4]], [d[order, 4]], ["detector"] * len(order)
    found = len(order)
    if found < n:
        cands = pad_candidates(np.array([width]), np.array([height]), np.array([n]))
        names = PAD_ORDER[pad_situation(found, n)]
        picks = [names[j] if j < len(names) else "full" for j in range(n - found)]
        boxes.append(np.stack([cands[c][0] for c in picks]))
        scores.append(np.zeros(len(picks)))
        sources += [PAD_PREFIX + c for c in picks]
    return np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores), sources


def open_world_boxes(d: np.ndarray, score_thr: float, nms_iou: float) -> np.ndarray:
    """Indices of one image's boxes kept by the open-world rule (:func:`cytologia.detection.fusion.open_world`:
    ``score >= score_thr``, then greedy NMS at ``nms_iou``), in decreasing score."""
    from cytologia.detection.fusion import nms

    d = np.asarray(d, dtype=np.float64).reshape(-1, 5)
    idx = np.flatnonzero(d[:, 4] >= score_thr)
    if not len(idx):
        return idx
    return idx[nms(d[idx, :4], d[idx, 4], nms_iou)]


# --------------------------------------------------------------------------------------------------- outputs
def assign_trustii_ids(boxes: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Every known-count box (all its columns) with the ``trustii_id`` it takes, in id order: per image the ids in
    increasing order take the boxes in decreasing score, ties in table order (any one-to-one assignment scores the
    same: each truth box picks its best prediction). Every image must have exactly as many boxes as ids (the
    known-count rule guarantees it); an image of ``boxes`` without ids is an error too."""
    kc = boxes[boxes["known_count"].to_numpy(bool)] if "known_count" in boxes else boxes
    kc = kc.sort_values(["NAME", "score"], ascending=[True, False], kind="stable").copy()
    kc["_rank"] = kc.groupby("NAME").cumcount()
    ids = test[["trustii_id", "NAME"]].sort_values(["NAME", "trustii_id"], kind="stable").copy()
    ids["_rank"] = ids.groupby("NAME").cumcount()
    have = kc.groupby("NAME").size()
    need = ids.groupby("NAME").size()
    every = need.index.union(have.index)
    have, need = have.reindex(every, fill_value=0), need.reindex(every, fill_value=0)
    wrong = every[have.to_numpy() != need.to_numpy()]
    if len(wrong):
        raise CytologiaInputError(
            f"{len(wrong)} image(s) have not as many boxes as trustii_ids (e.g. {wrong[0]}: "
            f"{int(have[wrong[0]])} boxes, {int(need[wrong[0]])} ids)"
        )
    merged = ids.merge(kc, on=["NAME", "_rank"], how="left").drop(columns="_rank")
    return merged.sort_values("trustii_id", kind="stable").reset_index(drop=True)


def submission_table(boxes: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """The submission's rows: the known-count boxes given to the ``trustii_id`` s of their image
    (:func:`assign_trustii_ids`)."""
    return assign_trustii_ids(boxes, test)[["trustii_id", "NAME", *BOX_COLUMNS, "class"]]


def write_per_image(
    boxes: pd.DataFrame,
    sizes: dict[str, tuple[int, int]],
    csv_path: Path,
    json_path: Path,
    *,
    problems: Mapping[str, ImageProblem] | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """The per-image output: a CSV (one row per box: NAME, box, score, class, probabilities) and a JSON
    (``{"classes": [...], "images": [{"NAME", "width", "height", "status", "boxes": [{"box", "score", "class",
    "probabilities"}]}]}``; images without a box are listed with an empty list). ``status`` is ``ok``, or for an image
    of ``problems`` (predicted with the fallback rule) ``fallback`` with its ``message``; its width and height are
    null when even its header is unreadable. ``names``: the images in order (default: those of ``sizes``, then of
    ``problems``)."""
    import json
    import os

    cols = ["NAME", *BOX_COLUMNS, "score", "class", *PROB_COLUMNS]
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.tmp")
    boxes[cols].to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, csv_path)
    groups = {name: g for name, g in boxes.groupby("NAME", sort=False)}
    problems = problems or {}
    order = list(dict.fromkeys([*sizes, *problems])) if names is None else list(names)
    images = []
    for name in order:
        w, h = sizes.get(name, (None, None))
        g = groups.get(name)
        rows = []
        if g is not None:
            xyxy = g[list(BOX_COLUMNS)].to_numpy(np.float64)
            probs = g[list(PROB_COLUMNS)].to_numpy(np.float64)
            for i in range(len(g)):
                rows.append(
                    {
                        "box": [round(float(v), 2) for v in xyxy[i]],
                        "score": round(float(g["score"].iat[i]), 6),
                        "class": str(g["class"].iat[i]),
                        "probabilities": {c: round(float(p), 6) for c, p in zip(CLASSES, probs[i])},
                    }
                )
        entry: dict[str, Any] = {"NAME": name, "width": w, "height": h, "status": "ok"}
        if name in problems:
            entry.update(status="fallback", message=problems[name].message)
        images.append({**entry, "boxes": rows})
    tmp = json_path.with_name(f".{json_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"classes": list(CLASSES), "images": images}, indent=1) + "\n")
    os.replace(tmp, json_path)
