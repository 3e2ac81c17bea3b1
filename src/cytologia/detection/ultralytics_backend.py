"""Ultralytics YOLO (v8, 11, 12 families) as a single-class leukocyte detector, offline.

Offline: importing :mod:`cytologia` sets ``YOLO_OFFLINE=1`` and ``YOLO_CONFIG_DIR`` before ultralytics is imported
(its ``ONLINE`` flag is computed at import); this module then places a stand-in ``Arial.ttf`` /
``Arial.Unicode.ttf`` in ultralytics' config folder (:func:`cytologia.offline.install_yolo_fonts`), without which
every train/val sends a request for the font whatever ``YOLO_OFFLINE`` says. On CUDA, ultralytics' AMP check loads
``yolo26n.pt`` (a download); training here replaces that check for its duration with :func:`offline_amp_check`
(same GPU deny-list, then a finite-output test of the model being trained under autocast), so ``amp=True`` works
offline. Set ``detector.amp=false`` to train in fp32 instead.

Models are built from the architecture yaml shipped in the ultralytics package (``yolo11s.yaml`` -> ``yolo11.yaml``
at scale ``s``) with random weights, or initialised from a local ``.pt`` checked against ``models/manifest.json``
(:func:`cytologia.weights.verified_path`); the head is rebuilt for one class.

Data: the annotation table + folds become, per held-out fold, an ultralytics dataset in a cache folder keyed by a
hash of its content -- ``images/{train,val}/NAME`` are *symlinks* to the images (no copies), ``labels/{train,val}``
hold YOLO txt labels (class 0, boxes clipped to the image). Ultralytics "restores" a JPEG without an end marker by
writing a new file; it replaces the link (``os.replace``), never the original.

Checkpoint selection: the validator computes, each epoch, the challenge's box term on the held-out fold -- mean
rescaled GIoU under the known-count rule (:func:`cytologia.detection.oof.known_count_giou`) -- and returns it as the
``fitness`` ultralytics uses to pick ``best.pt`` (and for early stopping), instead of its mAP blend.

Prediction does not go through ultralytics' predictor: the shared loop of :class:`cytologia.detection.base.Detector`
(letterbox to a square ``img_size`` with ultralytics' LetterBox rounding and grey 114 padding, batches, boxes mapped
back) with ultralytics' NMS (class-agnostic, :func:`nms`) as this backend's decoding; the same loop runs the exported
ONNX graph (:mod:`cytologia.detection.export`), so torch and ONNX Runtime differ only in the network.

The selected checkpoint ``detector.pt`` is ultralytics' ``best.pt`` with one more top-level entry, the backend's name
(:data:`~cytologia.detection.base.BACKEND_KEY`); one without it is recognised by the ultralytics classes it names.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision  # noqa: F401  (ultralytics' NMS uses torchvision's kernel only when torchvision is imported)
import ultralytics
import ultralytics.data.base as ul_data_base
import yaml
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.models.yolo.detect import DetectionTrainer, DetectionValidator
from ultralytics.utils import RANK, USER_CONFIG_DIR
from ultralytics.utils import ops as yolo_ops
from ultralytics.utils.nms import non_max_suppression

# importing this module imported cytologia first, which set the offline environment before ultralytics was imported
from cytologia.console import route_ultralytics_logs
from cytologia.data.images import attributed, resolve_image
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.base import BACKEND_KEY, PREDICT_COLUMNS, CheckpointHeader, Detector
from cytologia.detection.letterbox import Frame, detect_in_batches, map_back
from cytologia.detection.oof import known_count_giou
from cytologia.detection.registry import CLASS_NAME, DetectionData, TrainResult, TrainSettings
from cytologia.device import ultralytics_device
from cytologia.errors import CytologiaInputError
from cytologia.offline import install_yolo_fonts, tame_ultralytics

log = logging.getLogger(__name__)
install_yolo_fonts(USER_CONFIG_DIR)
tame_ultralytics()  # PIL.Image.open must keep raising UnidentifiedImageError, with no pip call
route_ultralytics_logs()  # its model summaries, argument dumps, tables: to the run's log file, not the console
# its training/validation loaders decode through this: libjpeg's warnings then name the image (capture_jpeg_warnings)
ul_data_base.imread = attributed(ul_data_base.imread)

# family -> architecture yaml inside the ultralytics package; the scales (n, s, m, l, x) are read from the yaml.
# Families with an NMS-free end-to-end head (v10, 26) are left out: their output layout differs.
FAMILIES: dict[str, str] = {"yolov8": "v8/yolov8.yaml", "yolo11": "11/yolo11.yaml", "yolo12": "12/yolo12.yaml"}
KC_METRIC = "metrics/known_count_giou"  # key of the selection metric in ultralytics' results
# Candidates (highest scores) that enter NMS. Greedy NMS decides a box by the higher-scoring ones only, so the kept
# boxes are exactly the full run's kept boxes of rank <= MAX_NMS; at conf 0.001 a 512 px input has ~4,000
# candidates and NMS over all of them costs ~2x (60 vs 33 ms on 2 CPU cores).
MAX_NMS = 1000
# ultralytics arguments the backend owns: set from TrainSettings or fixed by the layout; extra args may not set them
_OWNED_ARGS = frozenset({"data", "project", "name", "exist_ok", "single_cls", "model", "task", "mode", "resume"})
# GPUs ultralytics' own AMP check refuses (NaN losses / zero mAP under fp16 reported on them)
_AMP_DENYLIST = re.compile(
    r"(nvidia|geforce|quadro|tesla).*?(1660|1650|1630|t400|t550|t600|t1000|t1200|t2000|k40m)", re.IGNORECASE
)


# --------------------------------------------------------------------------------------------------------- models
def model_names() -> list[str]:
    """Architecture names of the supported families, e.g. ``yolo11n`` ... ``yolo11x`` (read from the package)."""
    root = Path(ultralytics.__file__).parent / "cfg" / "models"
    names = []
    for family, rel in FAMILIES.items():
        spec = yaml.safe_load((root / rel).read_text())
        names += [f"{family}{scale}" for scale in spec.get("scales", {})]
    return names


def offline_amp_check(model: torch.nn.Module) -> bool:
    """Whether to train with AMP, decided without ultralytics' download of yolo26n.pt: never on CPU/MPS, never on the
    GPUs ultralytics lists as unreliable, and only if the model's forward under autocast gives finite outputs."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return False
    name = torch.cuda.get_device_name(device)
    if _AMP_DENYLIST.search(name):
        log.warning("AMP disabled: %s is on ultralytics' list of GPUs with unreliable fp16 training", name)
        return False
    x = torch.rand(2, 3, 256, 256, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        ok = bool(torch.isfinite(out.float()).all())
    finally:
        model.train(was_training)
    if not ok:
        log.warning("AMP disabled: non-finite outputs under fp16 autocast on %s", name)
    return ok


@contextlib.contextmanager
def keep_torch_threads(yolo: Any, workers: int) -> Iterator[None]:
    """Undo ultralytics' process-wide thread setting around a training run.

    Its ``select_device`` sets torch's thread count to ``cpu_count - 1`` (a core left to the data-loading workers)
    and never sets it back: on a 2-core machine every later step of the process, our classifiers included, then runs
    on one thread. With ``workers=0`` there is no loader to leave a core to, so training gets the caller's count back
    (callbacks right after ultralytics sets it); the caller's count is restored afterwards in every case."""
    before = torch.get_num_threads()
    if workers == 0:
        for event in ("on_pretrain_routine_start", "on_train_start"):
            yolo.add_callback(event, lambda _trainer: torch.set_num_threads(before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _amp_check_offline() -> Iterator[None]:
    """Replace ultralytics' AMP check (it downloads weights) by :func:`offline_amp_check` while training."""
    import ultralytics.engine.trainer as trainer_module

    original = trainer_module.check_amp
    trainer_module.check_amp = offline_amp_check
    try:
        yield
    finally:
        trainer_module.check_amp = original


# -------------------------------------------------------------------------------------------------------- dataset
def _label_path(image_path: str) -> str:
    """ultralytics' rule (img2label_paths): last ``/images/`` -> ``/labels/``, extension -> ``.txt``."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image_path.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def _dataset_key(
    data: DetectionData, boxes: pd.DataFrame, folds: pd.DataFrame, class_names: Sequence[str] | None = None
) -> str:
    h = hashlib.sha256()
    h.update(f"v1|{Path(data.image_dir).resolve()}|{data.repaired_dir}|{data.fold}\n".encode())
    if class_names is not None:  # only then: single-class keys (and caches) stay what they were
        h.update(("classes|" + "|".join(class_names) + "\n").encode())
    h.update(folds.to_csv(index=False).encode())
    h.update(boxes.round(3).to_csv(index=False).encode())
    return h.hexdigest()[:16]


def write_yolo_dataset(data: DetectionData, class_names: Sequence[str] | None = None) -> tuple[Path, dict[str, int]]:
    """Write (or reuse) the ultralytics dataset of one held-out fold; returns its data yaml and counts.

    Training images: every fold but ``data.fold``; validation: ``data.fold``. Images listed in the folds without a
    box are negatives (empty label file). A box that is empty after clipping to its image is skipped and counted
    (``skipped_empty``, logged). Errors name the images: an annotated image missing from the folds, a file name
    ultralytics would not treat as an image, a missing image file.

    ``class_names`` None: one class (:data:`CLASS_NAME`, label 0). Given (e.g. the 23 classes, for a single-stage
    detector that also classifies): ``data.table`` needs a ``class`` column, a box's label is the index of its class
    in ``class_names`` and the data yaml names them; a class not in the list is an error naming its rows.
    """
    folds = data.folds[["NAME", "fold"]].copy()
    folds["NAME"] = folds["NAME"].astype(str)
    if folds["NAME"].duplicated().any():
        dup = folds.loc[folds["NAME"].duplicated(), "NAME"].head(5).tolist()
        raise CytologiaInputError(f"folds table lists image(s) twice: {', '.join(dup)}")
    if class_names is None:
        boxes = data.table[["NAME", *BOX_COLUMNS]].copy()
        label = np.zeros(len(boxes), np.int64)
    else:
        class_names = [str(c) for c in class_names]
        if not class_names or len(set(class_names)) != len(class_names):
            raise CytologiaInputError(f"class_names must be distinct and non-empty: {class_names}")
        if "class" not in data.table.columns:
            raise CytologiaInputError("a multi-class dataset needs a 'class' column in the annotations table")
        boxes = data.table[["NAME", *BOX_COLUMNS, "class"]].copy()
        label = pd.Index(class_names).get_indexer(boxes["class"].astype(str))
        unknown = np.flatnonzero(label < 0)
        if len(unknown):
            shown = ", ".join(f"row {i + 1} ({boxes['NAME'].iat[i]}: {boxes['class'].iat[i]!r})" for i in unknown[:10])
            raise CytologiaInputError(f"{len(unknown)} box(es) with a class outside class_names: {shown}")
    boxes["NAME"] = boxes["NAME"].astype(str)
    orphans = sorted(set(boxes["NAME"]) - set(folds["NAME"]))
    if orphans:
        raise CytologiaInputError(f"{len(orphans)} annotated image(s) have no fold: {', '.join(orphans[:10])}")
    if not (folds["fold"] == data.fold).any():
        raise CytologiaInputError(f"fold {data.fold} holds no image (folds: {sorted(folds['fold'].unique())})")
    if (folds["fold"] == data.fold).all():
        raise CytologiaInputError(f"every image is in fold {data.fold}: nothing left to train on")
    not_image = [n for n in folds["NAME"] if n.rpartition(".")[-1].lower() not in IMG_FORMATS]
    if not_image:
        raise CytologiaInputError(
            f"{len(not_image)} file name(s) without an image extension ({', '.join(sorted(IMG_FORMATS))}): "
            + ", ".join(not_image[:10])
        )
    key = _dataset_key(data, boxes, folds, class_names)
    root = Path(data.cache_dir) / f"yolo_fold{data.fold}_{key}"
    done = root / "complete.txt"
    counts_file = root / "counts.yaml"
    if done.is_file() and counts_file.is_file():
        return root / "data.yaml", yaml.safe_load(counts_file.read_text())

    names = folds["NAME"].to_numpy(dtype=object)
    sizes = data.image_sizes(names)
    w = boxes["NAME"].map(sizes["img_w"]).to_numpy(np.float64)
    h = boxes["NAME"].map(sizes["img_h"]).to_numpy(np.float64)
    xyxy = boxes[list(BOX_COLUMNS)].to_numpy(np.float64)
    lim = np.stack([w, h, w, h], axis=1)
    xyxy = np.clip(xyxy, 0.0, lim)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    skipped = int((~keep).sum())
    if skipped:
        log.warning("%d box(es) are empty once clipped to their image and are left out of the detector labels", skipped)
    cx, cy = (xyxy[:, 0] + xyxy[:, 2]) / 2 / w, (xyxy[:, 1] + xyxy[:, 3]) / 2 / h
    bw, bh = (xyxy[:, 2] - xyxy[:, 0]) / w, (xyxy[:, 3] - xyxy[:, 1]) / h
    lines = pd.Series(
        [f"{k} {a:.6f} {b:.6f} {c:.6f} {d:.6f}" for k, a, b, c, d in zip(label.tolist(), cx, cy, bw, bh)], dtype=object
    )
    per_image = lines[keep].groupby(boxes["NAME"].to_numpy()[keep]).agg("\n".join)

    tmp = root.with_name(f".{root.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    missing = []
    split_of = np.where(folds["fold"].to_numpy() == data.fold, "val", "train")
    for name, split in zip(names, split_of):
        target = resolve_image(Path(data.image_dir) / name, data.repaired_dir, name)
        if not target.is_file():
            missing.append(name)
            continue
        link = tmp / "images" / split / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target.resolve(), link)
        label = Path(_label_path(str(link)))
        label.parent.mkdir(parents=True, exist_ok=True)
        text = per_image.get(name, "")
        label.write_text(text + "\n" if text else "")
    if missing:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CytologiaInputError(f"{len(missing)} image(s) not found in {data.image_dir}: {', '.join(missing[:10])}")
    counts = {
        "train_images": int((split_of == "train").sum()),
        "val_images": int((split_of == "val").sum()),
        "train_boxes": int(keep[boxes["NAME"].map(dict(zip(names, split_of))).to_numpy() == "train"].sum()),
        "val_boxes": int(keep[boxes["NAME"].map(dict(zip(names, split_of))).to_numpy() == "val"].sum()),
        "negatives": int(len(names) - len(set(boxes["NAME"]))),
        "skipped_empty": skipped,
    }
    names_spec = {0: CLASS_NAME} if class_names is None else dict(enumerate(class_names))
    spec = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "names": names_spec}
    (tmp / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp / "counts.yaml").write_text(yaml.safe_dump(counts, sort_keys=False))
    (tmp / "complete.txt").write_text(f"{len(names)} images\n")
    if root.exists():  # an incomplete earlier attempt
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root / "data.yaml", counts


# ---------------------------------------------------------------------------------- training: selection metric
def gather_on_rank0(items: list[Any]) -> list[Any]:
    """Under DDP, every rank's ``items`` concatenated on rank 0 (the other ranks get an empty list); in a single
    process, ``items`` as they are."""
    if RANK == -1:
        return items
    import torch.distributed as dist

    if RANK == 0:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(items, parts, dst=0)
        return [x for part in parts for x in part]
    dist.gather_object(items, None, dst=0)
    return []


class KnownCountValidator(DetectionValidator):
    """ultralytics' detection validator that also scores the challenge's box term (known-count rescaled GIoU) on
    the validation images, in each image's own pixel frame, and returns it as ``fitness``."""

    def init_metrics(self, model: torch.nn.Module) -> None:
        super().init_metrics(model)
        self._kc: list[tuple[str, np.ndarray, np.ndarray, tuple[int, int]]] = []

    def postprocess(self, preds: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """ultralytics' NMS as its validator calls it, without the time limit: on a loaded CPU the limit (2 s + 50 ms
        per image) is reached and the rest of the batch is left without boxes, which would corrupt the selection."""
        outputs = non_max_suppression(
            preds,
            self.args.conf,
            self.args.iou,
            nc=0,
            multi_label=True,
            agnostic=self.args.single_cls or self.args.agnostic_nms,
            max_det=self.args.max_det,
            end2end=getattr(self, "end2end", False),
            max_time_img=float("inf"),
        )
        return [{"bboxes": x[:, :4], "conf": x[:, 4], "cls": x[:, 5], "extra": x[:, 6:]} for x in outputs]

    def update_metrics(self, preds: list[dict[str, torch.Tensor]], batch: dict[str, Any]) -> None:
        super().update_metrics(preds, batch)
        for si, pred in enumerate(preds):
            pbatch = self._prepare_batch(si, batch)
            truth = pbatch["bboxes"].clone()
            if len(truth):
                truth = yolo_ops.scale_boxes(pbatch["imgsz"], truth, pbatch["ori_shape"], ratio_pad=pbatch["ratio_pad"])
            boxes = self.scale_preds(pred, pbatch)["bboxes"]
            det = torch.cat([boxes, pred["conf"][:, None]], dim=1).detach().float().cpu().numpy()
            h, w = (int(v) for v in pbatch["ori_shape"])
            self._kc.append((str(pbatch["im_file"]), truth.detach().float().cpu().numpy(), det, (w, h)))

    def gather_stats(self) -> None:
        super().gather_stats()
        self._kc = gather_on_rank0(self._kc)

    def known_count_giou(self) -> float:
        """The box term over the images seen since :meth:`init_metrics` (NaN without truth boxes)."""
        truth_rows, box_rows, sizes = [], [], {}
        for name, truth, det, size in self._kc:
            sizes[name] = size
            truth_rows += [(name, *t) for t in truth.tolist()]
            box_rows += [(name, *d) for d in det.tolist()]
        truth = pd.DataFrame(truth_rows, columns=["NAME", *BOX_COLUMNS])
        boxes = pd.DataFrame(box_rows, columns=["NAME", *BOX_COLUMNS, "score"])
        return known_count_giou(boxes, truth, sizes)

    def get_stats(self) -> dict[str, Any]:
        stats = super().get_stats()
        value = self.known_count_giou()
        stats[KC_METRIC] = value
        stats["fitness"] = value if np.isfinite(value) else stats.get("fitness", 0.0)
        return stats


class KnownCountTrainer(DetectionTrainer):
    """ultralytics' detection trainer whose validator selects checkpoints on the known-count box term."""

    def get_validator(self) -> KnownCountValidator:
        return KnownCountValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
        )


def train_args(settings: Any, data_yaml: Path, out_dir: Path, *, single_cls: bool, **more: Any) -> dict[str, Any]:
    """ultralytics' ``train`` arguments from our settings (the detector's and the single-stage baseline's share
    them): the run goes to ``out_dir/ultralytics``, without plots, validated each epoch; ``settings.extra`` last."""
    return {
        "data": str(data_yaml),
        "epochs": settings.epochs,
        "imgsz": settings.img_size,
        "batch": settings.batch_size,
        "lr0": settings.lr,
        "optimizer": settings.optimizer,
        "patience": settings.patience,
        "device": ultralytics_device(settings.device),
        "workers": settings.workers,
        "amp": settings.amp,
        "seed": settings.seed,
        "deterministic": True,
        "iou": settings.nms_iou,
        "single_cls": single_cls,
        **more,
        "project": str(Path(out_dir).resolve()),
        "name": "ultralytics",
        "exist_ok": True,
        "plots": False,
        "verbose": False,
        "val": True,
        **settings.extra,
    }


def epoch_timer(yolo: Any) -> list[float]:
    """A list that ``yolo``'s callbacks fill with the wall time of each epoch's training pass (validation excluded)."""
    seconds: list[float] = []
    clock: dict[str, float] = {}
    yolo.add_callback("on_train_epoch_start", lambda _t: clock.__setitem__("start", time.perf_counter()))
    yolo.add_callback("on_train_epoch_end", lambda _t: seconds.append(time.perf_counter() - clock["start"]))
    return seconds


def _history(results_csv: Path) -> list[dict[str, float]]:
    if not results_csv.is_file():
        return []
    frame = pd.read_csv(results_csv)
    frame.columns = [c.strip() for c in frame.columns]
    return [{k: float(v) for k, v in row.items()} for row in frame.to_dict(orient="records")]


@dataclass
class RunBest:
    """ultralytics' ``best.pt`` of a finished training, its per-epoch history and which epoch it holds."""

    checkpoint: Path
    history: list[dict[str, float]]
    index: int  # into history; the last epoch when no epoch has a finite score
    score: float  # the selection metric at that epoch (nan when none is finite)

    @property
    def epoch(self) -> int:
        return int(self.history[self.index]["epoch"]) if self.history else 0


def best_of_run(save_dir: Path, metric: str) -> RunBest:
    """The best checkpoint of the training in ``save_dir``, selected on ``metric`` (a results.csv column)."""
    best = save_dir / "weights" / "best.pt"
    if not best.is_file():
        raise CytologiaInputError(f"training finished without a checkpoint in {save_dir / 'weights'}")
    history = _history(save_dir / "results.csv")
    scores = [row.get(metric, float("nan")) for row in history]
    finite = [i for i, s in enumerate(scores) if np.isfinite(s)]
    # best.pt is rewritten whenever the fitness equals the best so far: the last epoch reaching the maximum
    index = max(finite, key=lambda i: (scores[i], i)) if finite else len(history) - 1
    return RunBest(best, history, index, float(scores[index]) if finite else float("nan"))


# ------------------------------------------------------------------------------------------------------ inference
def nms(
    raw: torch.Tensor | np.ndarray, *, conf: float, iou: float, max_det: int, with_class: bool = False
) -> list[np.ndarray]:
    """Raw head output (B, 4 + nc, anchors: centre-size boxes in input pixels, class scores) -> per image an (n, 5)
    float64 array ``x1, y1, x2, y2, score`` in input pixels: ultralytics' NMS, class-agnostic, the ``MAX_NMS`` best
    candidates, at most ``max_det`` kept.

    ``with_class`` (a multi-class head): (n, 6) arrays, the 6th column the box's class index; a box is one candidate
    with its best class (score = that class's score), not one candidate per class."""
    raw = torch.as_tensor(raw).float()
    # max_time_img=inf: ultralytics' NMS otherwise stops after 2 s + 50 ms/image and leaves the rest of the batch
    # without boxes (seen on a loaded 2-core CPU at 512 px) -- never acceptable for out-of-fold boxes
    dets = non_max_suppression(
        raw, conf, iou, agnostic=True, max_det=max_det, max_nms=MAX_NMS, max_time_img=float("inf")
    )
    return [det[:, : 6 if with_class else 5].cpu().numpy().astype(np.float64) for det in dets]


def detect_with_classes(
    forward: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    images: Sequence[str | Path],
    names: Sequence[str] | None = None,
    *,
    img_size: int,
    conf: float,
    iou: float,
    max_det: int,
    batch_size: int,
    workers: int | None = None,
) -> pd.DataFrame:
    """A multi-class head (the single-stage baseline) through the shared prediction loop: the
    :data:`~cytologia.detection.base.PREDICT_COLUMNS` table with one more column, ``cls`` (int64 class index of
    each box's best class, :func:`nms` ``with_class``), before ``tta``; no flip pass."""
    columns = [*PREDICT_COLUMNS[:-1], "cls", PREDICT_COLUMNS[-1]]
    types: dict[str, Any] = {c: np.float64 for c in (*BOX_COLUMNS, "score")}
    types["cls"] = np.int64

    def decode_output(raw: Any, frames: list[Frame], flipped: bool) -> list[np.ndarray]:
        return map_back(nms(raw, conf=conf, iou=iou, max_det=max_det, with_class=True), frames, img_size, flipped)

    return detect_in_batches(
        forward,
        decode_output,
        images,
        names,
        img_size=img_size,
        tta_flip=False,
        batch_size=batch_size,
        workers=workers,
        columns=columns,
        types=types,
    )


# ------------------------------------------------------------------------------------------------------- backend
class UltralyticsDetector(Detector):
    """YOLO v8/11/12 through ultralytics, one class. See the module docstring for what runs offline and how."""

    @classmethod
    def models(cls) -> list[str]:
        return model_names()

    @classmethod
    def recognizes(cls, header: CheckpointHeader) -> bool:
        """A checkpoint ultralytics wrote (``best.pt``, ``YOLO.save``): it names ultralytics' model classes."""
        return header.refers_to("ultralytics")

    @classmethod
    def save_random(cls, model: str, path: str | Path, *, img_size: int, seed: int = 0) -> Path:
        """A one-class ``model`` with random weights (torch seeded with ``seed``) in ultralytics' checkpoint layout
        (``{"model": DetectionModel, "train_args": {}}``) plus the backend's name; ``img_size`` is not stored."""
        from ultralytics.nn.tasks import DetectionModel

        if model not in model_names():
            raise CytologiaInputError(f"unknown ultralytics detector model {model!r}")
        torch.manual_seed(seed)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        net = DetectionModel(f"{model}.yaml", nc=1, verbose=False)
        torch.save({"model": net, "train_args": {}, BACKEND_KEY: cls.backend}, path)
        return path

    @classmethod
    def checkpoint_model(cls, checkpoint: str | Path) -> str:
        """The architecture name a checkpoint of this backend was built as (``yolo11s`` ...)."""
        from ultralytics.nn.tasks import load_checkpoint

        net, _ = load_checkpoint(str(checkpoint))
        stem = Path(str(getattr(net, "yaml", {}).get("yaml_file", ""))).stem
        if stem not in model_names():
            raise CytologiaInputError(f"{checkpoint}: not a checkpoint of a supported YOLO model (built from {stem!r})")
        return stem

    # -- training
    def _new_model(self) -> Any:
        from ultralytics import YOLO

        yolo = YOLO(f"{self.model}.yaml", task="detect", verbose=False)
        if self.weights is not None:
            from cytologia.weights import verified_path

            given = Path(self.weights)
            # a path is checked against the manifest of its own folder, a bare name against models/ ($CYTOLOGIA_MODELS)
            path = verified_path(given, given.parent if given.is_file() else None)
            yolo.load(str(path))  # layers whose shapes match are copied; the 1-class head keeps its init
            log.info("initialised %s from %s", self.model, path)
        return yolo

    def train(self, data: DetectionData, out_dir: Path, settings: TrainSettings) -> TrainResult:
        """Train on the folds but ``data.fold``; ``best.pt`` is the epoch with the best known-count box term on the
        held-out fold (computed by :class:`KnownCountValidator` on the EMA weights that are saved). The selected
        checkpoint is copied to ``out_dir/detector.pt``."""
        start = time.perf_counter()
        out_dir = Path(out_dir)
        owned = sorted(_OWNED_ARGS & set(settings.extra))
        if owned:
            raise CytologiaInputError(f"detector.train_args may not set {', '.join(owned)} (set by the stage)")
        data_yaml, counts = write_yolo_dataset(data)
        yolo = self._new_model()
        args = train_args(settings, data_yaml, out_dir, single_cls=True)
        epoch_seconds = epoch_timer(yolo)  # the training pass of each epoch, validation excluded
        with _amp_check_offline(), keep_torch_threads(yolo, int(args["workers"])):
            yolo.train(trainer=KnownCountTrainer, **args)
        trainer = yolo.trainer
        run = best_of_run(Path(trainer.save_dir), KC_METRIC)
        target = out_dir / "detector.pt"
        ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False)  # ultralytics' own file, just written
        ckpt[BACKEND_KEY] = self.backend
        torch.save(ckpt, target)
        self.checkpoint, self._net = target, None
        final = {k: float(v) for k, v in (trainer.metrics or {}).items() if isinstance(v, (int, float))}
        return TrainResult(
            weights=target,
            best_epoch=run.epoch,
            metrics=final,
            history=run.history,
            selection=(
                "ultralytics best.pt with fitness = known-count mean rescaled GIoU of the held-out fold, "
                "computed each epoch on the EMA weights that are saved"
            ),
            seconds=time.perf_counter() - start,
            epoch_seconds=epoch_seconds,
            n_train_images=counts["train_images"],
            n_val_images=counts["val_images"],
        )

    # -- inference
    def load_network(self, device: torch.device) -> torch.nn.Module:
        """The trained network, conv+bn fused, eval, fp32, on ``device`` (ultralytics' ``load_checkpoint``)."""
        from ultralytics.nn.tasks import load_checkpoint

        net, _ = load_checkpoint(str(self.checkpoint), device=device, fuse=True)
        return net

    @classmethod
    def decode(cls, raw: Any, *, conf: float, iou: float, max_det: int) -> list[np.ndarray]:
        """ultralytics' NMS, class-agnostic (:func:`nms`)."""
        return nms(raw, conf=conf, iou=iou, max_det=max_det)

    # -- export
    def write_onnx(self, path: Path, *, img_size: int, opset: int | None) -> Path:
        """ONNX through ultralytics' exporter: dynamic batch and size, ``simplify=False`` (no onnxslim), no NMS in the
        graph, fp32; input ``images`` (B, 3, S, S) RGB [0, 1], output ``output0`` (B, 5, anchors)."""
        import tempfile

        from ultralytics import YOLO

        with tempfile.TemporaryDirectory(prefix="cytologia-export-") as tmp:
            src = Path(tmp) / "detector.pt"  # ultralytics writes next to the weights: export from a scratch copy
            shutil.copyfile(self.checkpoint, src)
            kwargs: dict[str, Any] = {
                "format": "onnx",
                "imgsz": img_size,
                "dynamic": True,
                "simplify": False,
                "nms": False,
                "device": "cpu",
                "batch": 1,
            }
            if opset is not None:
                kwargs["opset"] = opset
            written = Path(YOLO(str(src), task="detect").export(**kwargs))
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(written), path)
        return path
