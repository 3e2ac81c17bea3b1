"""Training a YOLOX on one held-out fold: data split, loop, schedule, EMA, multi-scale, checkpoint selection.

The recipe of the YOLOX paper (section 2.1-2.2), scaled by the configuration:

- optimizer: SGD with Nesterov momentum (or AdamW / Adam), weight decay on conv/linear weights only (not on batch
  norm or biases);
- learning rate per iteration: quadratic warm-up over ``warmup_epochs`` from ``warmup_lr``, cosine down to
  ``min_lr_ratio * lr``, then constant ``min_lr_ratio * lr`` for the last ``no_aug_epochs`` epochs;
- the last ``no_aug_epochs`` epochs train without mosaic/mixup (letterbox + flips + HSV) and, with ``l1_loss``, add
  the L1 loss on raw box outputs;
- EMA of the weights, decay ``ema_decay * (1 - exp(-updates / 2000))`` (so it follows the model closely early on);
- multi-scale: every ``multiscale_every`` iterations the batch is resized (bilinear) to a random side in
  ``img_size * (1 +- multiscale)`` (multiples of 32; YOLOX's +-5 x 32 px at 640 px is +-25 %), targets scaled with it;
- mixed precision on CUDA with ``amp`` (fp16 autocast + loss scaling); losses and assignment in fp32.

Precise batch norm (our addition, ``precise_bn_images``): before each evaluation, the batch-norm statistics of the
evaluated (EMA) weights are re-measured on training images letterboxed as prediction sees them (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021). The running statistics, tracked with momentum 0.03, lag behind weights that
change quickly; YOLOX's long runs hide this, a short run does not: measured on a 15-epoch CPU run (yolox_nano, 256 px,
150 iterations, AdamW 0.002), the saved network put its best box on the same border cell of every image (top-1 IoU
0.00 on 16 images), the same weights with re-measured statistics reached top-1 IoU 0.28.

Checkpoint selection: after every epoch the EMA weights predict the held-out fold exactly as the stage will (letterbox,
NMS, boxes in each image's pixels) and are scored with the challenge's box term under the known-count rule
(:func:`cytologia.detection.oof.known_count_giou`); the best epoch (the last one reaching the maximum) is
``best.pt``. With ``time_limit_s`` the run is re-planned after each epoch so that it ends within the limit (fewer
epochs, schedule compressed to fit), as ultralytics' ``time`` argument does.

Several processes (DDP, on one machine): ``detector.device`` listing GPUs (``"0,1"``) trains one process per GPU
(NCCL); ``train_args.ddp_processes: N`` trains N CPU processes (gloo: tests, CPU servers). :func:`fit` spawns them;
each takes its shard of the training images per epoch (``DistributedSampler``, ``batch_size`` images per process and
step: the effective batch is ``batch_size x processes``), gradients are averaged, and rank 0 alone evaluates, selects
and writes checkpoints; the others follow its decisions (early stop, re-planned epochs). The rest of the detector
stage (OOF boxes, metrics) runs once, in the calling process.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import pickle
import shutil
import socket
import time
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from cytologia.boxes import clip
from cytologia.data.images import resolve_image
from cytologia.data.schema import BOX_COLUMNS
from cytologia.detection.base import MAX_STRIDE
from cytologia.detection.oof import known_count_giou
from cytologia.detection.registry import DetectionData, TrainResult, TrainSettings
from cytologia.detection.yolox.assign import ASSIGN_MODES
from cytologia.detection.yolox.augment import AugmentConfig, DetectionDataset, Sample, collate
from cytologia.detection.yolox.checkpoint import save_checkpoint
from cytologia.detection.yolox.losses import BOX_LOSSES, yolox_loss
from cytologia.detection.yolox.model import YOLOX, YoloxInference
from cytologia.device import resolve_device
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

KC_METRIC = "metrics/known_count_giou"  # the history key the stage reads (same as the ultralytics backend's)
OPTIMIZERS: tuple[str, ...] = ("SGD", "AdamW", "Adam")
EMA_TAU = 2000.0  # updates over which the EMA decay ramps up to ema_decay
VAL_CONF = 0.001  # score floor when scoring the held-out fold: known-count keeps the top-N whatever their score
VAL_MAX_DET = 50
DDP_TIMEOUT = timedelta(hours=1)  # longest a DDP rank waits for the others (rank 0's evaluation included)


@dataclass
class YoloxTrainArgs:
    """YOLOX-specific training options (``detector.train_args``); augmentation keys are :class:`AugmentConfig`'s."""

    box_loss: str = "giou"  # "giou" | "iou"
    warmup_epochs: float = 3.0
    warmup_lr: float = 0.0
    min_lr_ratio: float = 0.05
    no_aug_epochs: int = 5  # last epochs without mosaic/mixup, with the L1 loss when l1_loss
    l1_loss: bool = True
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD momentum (Nesterov); Adam(W) beta1
    ema: bool = True
    ema_decay: float = 0.9998
    multiscale: float = 0.25  # random side in img_size * (1 +- multiscale), multiples of 32; 0: fixed size
    multiscale_every: int = 10  # iterations between size changes
    time_limit_s: float = 0.0  # > 0: re-plan the run to end within this many seconds
    precise_bn_images: int = 256  # training images re-measuring batch-norm statistics before each evaluation; 0: off
    assign_mode: str = "center"  # SimOTA prior: "center" | "box_and_center" (the 0.3.0 release's), see yolox.assign
    center_radius: float = 0.0  # SimOTA centre region in strides; 0: the mode's default (1.5 / 2.5)
    val_batch: int = 0  # images per batch when scoring the held-out fold; 0: batch_size
    ddp_processes: int = 0  # > 1: DDP over this many CPU processes (gloo); GPUs: list them in detector.device
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "augment"}
        out.update({k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.augment).items()})
        return out


def _coerce(value: Any, default: Any, key: str) -> Any:
    """``value`` converted to the type of ``default`` (bool, int, float, str, tuple of floats); errors name the key."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError("expected true or false")
            return value
        if isinstance(default, tuple):
            seq = tuple(float(v) for v in value)
            if len(seq) != len(default):
                raise ValueError(f"expected {len(default)} numbers")
            return seq
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        return type(default)(value)
    except (TypeError, ValueError) as err:
        raise CytologiaInputError(f"config key detector.train_args.{key}={value!r}: {err}") from None


def parse_train_args(extra: Mapping[str, Any]) -> YoloxTrainArgs:
    """``detector.train_args`` as :class:`YoloxTrainArgs`; an unknown key or a bad value is an error naming it."""
    args, aug = YoloxTrainArgs(), AugmentConfig()
    own = {f.name for f in fields(YoloxTrainArgs)} - {"augment"}
    aug_keys = {f.name for f in fields(AugmentConfig)}
    for key, value in dict(extra).items():
        if key in own:
            setattr(args, key, _coerce(value, getattr(args, key), key))
        elif key in aug_keys:
            setattr(aug, key, _coerce(value, getattr(aug, key), key))
        else:
            import difflib

            near = difflib.get_close_matches(key, sorted(own | aug_keys), n=3)
            hint = f" (closest: {', '.join(near)})" if near else ""
            raise CytologiaInputError(
                f"config key detector.train_args.{key} is not a YOLOX training option{hint}; options: "
                + ", ".join(sorted(own | aug_keys))
            )
    args.augment = aug
    if args.box_loss not in BOX_LOSSES:
        raise CytologiaInputError(f"detector.train_args.box_loss={args.box_loss!r}: choose one of {BOX_LOSSES}")
    if args.assign_mode not in ASSIGN_MODES:
        raise CytologiaInputError(f"detector.train_args.assign_mode={args.assign_mode!r}: choose one of {ASSIGN_MODES}")
    for key in ("mosaic_prob", "mixup_prob", "flip_lr", "flip_ud", "hsv_prob"):
        if not 0.0 <= getattr(aug, key) <= 1.0:
            raise CytologiaInputError(f"detector.train_args.{key}={getattr(aug, key)} must be in [0, 1]")
    nonneg = (
        "warmup_epochs",
        "no_aug_epochs",
        "weight_decay",
        "multiscale",
        "time_limit_s",
        "val_batch",
        "center_radius",
        "precise_bn_images",
        "ddp_processes",
    )
    for key in nonneg:
        if getattr(args, key) < 0:
            raise CytologiaInputError(f"detector.train_args.{key}={getattr(args, key)} must be >= 0")
    if not 0.0 < args.ema_decay < 1.0 or not 0.0 < args.min_lr_ratio <= 1.0 or args.multiscale_every < 1:
        raise CytologiaInputError(
            "detector.train_args: ema_decay must be in (0, 1), min_lr_ratio in (0, 1], multiscale_every >= 1 "
            f"(got {args.ema_decay}, {args.min_lr_ratio}, {args.multiscale_every})"
        )
    return args


# ------------------------------------------------------------------------------------------------------- split
@dataclass
class Split:
    """The training images (with boxes), the held-out images, their truth boxes and image sizes."""

    train: list[Sample]
    val_paths: list[Path]
    val_names: list[str]
    val_truth: pd.DataFrame  # NAME, x1, y1, x2, y2 (clipped)
    sizes: pd.DataFrame  # index NAME: img_w, img_h
    skipped_empty: int


def make_split(data: DetectionData) -> Split:
    """Training samples (every fold but ``data.fold``; images of the folds without a box are negatives) and the
    held-out fold, boxes clipped to their image. Errors name the images (annotated image without a fold, missing
    file) or the fold; a box empty once clipped is skipped, counted and logged."""
    folds = data.folds[["NAME", "fold"]].copy()
    folds["NAME"] = folds["NAME"].astype(str)
    if folds["NAME"].duplicated().any():
        dup = folds.loc[folds["NAME"].duplicated(), "NAME"].head(5).tolist()
        raise CytologiaInputError(f"folds table lists image(s) twice: {', '.join(dup)}")
    boxes = data.table[["NAME", *BOX_COLUMNS]].copy()
    boxes["NAME"] = boxes["NAME"].astype(str)
    orphans = sorted(set(boxes["NAME"]) - set(folds["NAME"]))
    if orphans:
        raise CytologiaInputError(f"{len(orphans)} annotated image(s) have no fold: {', '.join(orphans[:10])}")
    held = (folds["fold"] == data.fold).to_numpy()
    if not held.any():
        raise CytologiaInputError(f"fold {data.fold} holds no image (folds: {sorted(folds['fold'].unique())})")
    if held.all():
        raise CytologiaInputError(f"every image is in fold {data.fold}: nothing left to train on")
    names = folds["NAME"].tolist()
    sizes = data.image_sizes(names)
    w = boxes["NAME"].map(sizes["img_w"]).to_numpy(np.float64)
    h = boxes["NAME"].map(sizes["img_h"]).to_numpy(np.float64)
    xyxy = clip(boxes[list(BOX_COLUMNS)].to_numpy(np.float64), w, h)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    skipped = int((~keep).sum())
    if skipped:
        log.warning("%d box(es) are empty once clipped to their image and are left out of the detector labels", skipped)
    clipped = pd.DataFrame(xyxy[keep], columns=list(BOX_COLUMNS))
    clipped.insert(0, "NAME", boxes["NAME"].to_numpy()[keep])
    per_image = {n: g[list(BOX_COLUMNS)].to_numpy(np.float32) for n, g in clipped.groupby("NAME", sort=False)}
    paths = [resolve_image(Path(data.image_dir) / n, data.repaired_dir, n) for n in names]
    missing = [n for n, p in zip(names, paths) if not p.is_file()]
    if missing:
        raise CytologiaInputError(f"{len(missing)} image(s) not found in {data.image_dir}: {', '.join(missing[:10])}")
    empty = np.zeros((0, 4), np.float32)
    train = [Sample(p, per_image.get(n, empty)) for n, p, v in zip(names, paths, held) if not v]
    val_names = [n for n, v in zip(names, held) if v]
    return Split(
        train=train,
        val_paths=[p for p, v in zip(paths, held) if v],
        val_names=val_names,
        val_truth=clipped.loc[clipped["NAME"].isin(set(val_names))].reset_index(drop=True),
        sizes=sizes,
        skipped_empty=skipped,
    )


# ------------------------------------------------------------------------------------------ optimiser, schedule
def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """Parameter groups: conv/linear weights with weight decay, batch-norm weights and all biases without."""
    decay, no_decay = [], []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            is_norm = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            (no_decay if pname == "bias" or is_norm else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, betas=(momentum, 0.999))
    raise CytologiaInputError(f"detector.optimizer={name!r} is not available for YOLOX; choose one of {OPTIMIZERS}")


@dataclass
class WarmCosine:
    """Learning rate of iteration ``it`` (1-based): quadratic warm-up, cosine, flat tail (see the module docstring)."""

    lr: float
    total_iters: int
    warmup_iters: int
    flat_iters: int  # the last iterations, at the minimum
    min_lr_ratio: float
    warmup_lr: float = 0.0

    def __call__(self, it: int) -> float:
        low = self.lr * self.min_lr_ratio
        if self.warmup_iters > 0 and it <= self.warmup_iters:
            return (self.lr - self.warmup_lr) * (it / self.warmup_iters) ** 2 + self.warmup_lr
        if it >= self.total_iters - self.flat_iters:
            return low
        span = max(self.total_iters - self.warmup_iters - self.flat_iters, 1)
        return low + 0.5 * (self.lr - low) * (1.0 + math.cos(math.pi * (it - self.warmup_iters) / span))


class ModelEMA:
    """Exponential moving average of a model's weights (buffers copied), decay ramped by the number of updates."""

    def __init__(self, model: torch.nn.Module, decay: float, tau: float = EMA_TAU) -> None:
        self.module = deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1.0 - math.exp(-self.updates / self.tau))
        current = model.state_dict()
        for key, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[key].detach(), alpha=1.0 - d)
            else:
                value.copy_(current[key])


def multiscale_sides(img_size: int, spread: float) -> list[int]:
    """Sides for multi-scale training: the multiples of 32 from ``img_size * (1 - spread)`` to ``img_size * (1 +
    spread)`` (each end rounded to the nearest multiple, at least 32)."""
    low = max(1, round(img_size * (1 - spread) / MAX_STRIDE))
    high = max(low, round(img_size * (1 + spread) / MAX_STRIDE))
    return [MAX_STRIDE * k for k in range(low, high + 1)]


def resize_batch(images: torch.Tensor, targets: list[torch.Tensor], side: int) -> tuple[torch.Tensor, list]:
    """Bilinear resize of a square batch to ``side``; targets (``class, cx, cy, w, h``) scaled alike."""
    scale = side / images.shape[-1]
    if scale == 1.0:
        return images, targets
    images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    scaled = []
    for t in targets:
        t = t.clone()
        t[:, 1:5] *= scale
        scaled.append(t)
    return images, scaled


# --------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def precise_bn(
    model: torch.nn.Module, dataset: DetectionDataset, device: torch.device, n_images: int, batch_size: int
) -> None:
    """Set the batch-norm running statistics of ``model`` to their plain average over ``n_images`` training images
    (a fixed random subset), letterboxed with flips and HSV jitter but no mosaic/mixup -- the images as prediction sees
    them --, weights unchanged. ``n_images`` 0: nothing is done."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if n_images <= 0 or not bns:
        return
    plain = DetectionDataset(dataset.samples, dataset.size, dataset.cfg, seed=dataset.seed + 1)
    plain.set_epoch(dataset.epoch, mosaic=False)
    picks = np.random.default_rng(dataset.seed).permutation(len(plain))[:n_images].tolist()
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    try:
        for start in range(0, len(picks), batch_size):
            images, _ = collate([plain[i] for i in picks[start : start + batch_size]])
            model.raw(images.to(device).float())
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
        model.train(was_training)


def evaluate(
    model: YOLOX, split: Split, device: torch.device, *, img_size: int, iou: float, batch_size: int
) -> tuple[float, float]:
    """Known-count box term of ``model`` on the held-out images (as the stage predicts them), and seconds taken."""
    from cytologia.detection.yolox.backend import YoloxDetector  # (it imports this module)

    start = time.perf_counter()
    net = YoloxInference.from_model(model).to(device)

    def forward(x: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return net(torch.from_numpy(x).to(device)).float().cpu()

    boxes = YoloxDetector.detect_images(
        forward,
        split.val_paths,
        split.val_names,
        img_size=img_size,
        conf=VAL_CONF,
        iou=iou,
        max_det=VAL_MAX_DET,
        tta_flip=False,
        batch_size=batch_size,
    )
    sizes = split.sizes.reset_index()
    value = known_count_giou(boxes, split.val_truth, sizes) if len(split.val_truth) else float("nan")
    return value, time.perf_counter() - start


# ------------------------------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class DdpRank:
    """This process's place in a DDP run: rank, number of processes, its device."""

    rank: int
    world: int
    device: torch.device


def ddp_plan(device: str, processes: int) -> list[str]:
    """The devices of a DDP run, one per process (empty: one process): the GPUs ``device`` lists (``"0,1"``,
    ``"cuda:0,cuda:1"``), or ``processes`` CPU processes when ``processes > 1``."""
    listed = [d.strip() for d in str(device).split(",") if d.strip()]
    if len(listed) > 1:
        if processes > 1:
            raise CytologiaInputError(
                f"detector.device={device!r} lists GPUs and train_args.ddp_processes={processes}: give one of them"
            )
        gpus = [f"cuda:{d}" if d.isdigit() else d for d in listed]
        if not all(g.startswith("cuda:") for g in gpus):
            raise CytologiaInputError(f"detector.device={device!r}: a list must name CUDA devices (0,1 or cuda:0,...)")
        if not torch.cuda.is_available() or torch.cuda.device_count() <= max(int(g[5:]) for g in gpus):
            raise CytologiaInputError(f"detector.device={device!r}: torch sees {torch.cuda.device_count()} GPU(s)")
        return gpus
    if processes > 1:
        if resolve_device(device, key="detector.device").type != "cpu":
            raise CytologiaInputError(
                f"train_args.ddp_processes={processes} runs CPU processes; for GPUs list them in detector.device "
                f'(e.g. "0,1") instead of {device!r}, or set detector.device=cpu'
            )
        return ["cpu"] * processes
    return []


def fit(
    model: YOLOX, name: str, data: DetectionData, out_dir: Path, settings: TrainSettings, args: YoloxTrainArgs
) -> TrainResult:
    """Train ``model`` on the folds but ``data.fold``; ``out_dir/yolox/{best,last}.pt``, ``results.csv`` and
    ``args.yaml``; the selected checkpoint is copied to ``out_dir/detector.pt``. Several devices (:func:`ddp_plan`):
    one spawned process each (see the module docstring)."""
    devices = ddp_plan(settings.device, args.ddp_processes)
    if len(devices) > 1:
        return _fit_ddp(model, name, data, Path(out_dir), settings, args, devices)
    result = _fit(model, name, data, out_dir, settings, args, None)
    assert result is not None
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fit_ddp(
    model: YOLOX,
    name: str,
    data: DetectionData,
    out_dir: Path,
    settings: TrainSettings,
    args: YoloxTrainArgs,
    devices: list[str],
) -> TrainResult:
    """Spawn one process per device (:func:`_ddp_process`) and return rank 0's result."""
    import torch.multiprocessing as mp

    result_file = out_dir / "yolox" / "ddp_result.pkl"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    port = _free_port()
    log.info("YOLOX %s: DDP over %d processes (%s)", name, len(devices), ", ".join(devices))
    payload = (devices, port, model, name, data, out_dir, settings, args, result_file)
    mp.spawn(_ddp_process, args=payload, nprocs=len(devices), join=True)
    return pickle.loads(result_file.read_bytes())


def _ddp_process(
    rank: int,
    devices: list[str],
    port: int,
    model: YOLOX,
    name: str,
    data: DetectionData,
    out_dir: Path,
    settings: TrainSettings,
    args: YoloxTrainArgs,
    result_file: Path,
) -> None:
    """One DDP process: join the process group (NCCL on GPUs, gloo on the CPU), train, rank 0 writes the result."""
    import torch.distributed as dist

    # torch.multiprocessing hands every process the same shared-memory tensors: each rank trains its own copy
    model = deepcopy(model)
    device = torch.device(devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # rank 0 evaluates the held-out fold after every epoch while the others wait for its decision: a long timeout
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(devices), timeout=DDP_TIMEOUT
    )
    try:
        result = _fit(model, name, data, out_dir, settings, args, DdpRank(rank, len(devices), device))
        if result is not None:
            result_file.write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


class _RawForward(torch.nn.Module):
    """``model.raw`` as ``forward``: DDP synchronises gradients of what runs through its wrapped module's forward."""

    def __init__(self, model: YOLOX) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.model.raw(x)


def _fit(
    model: YOLOX,
    name: str,
    data: DetectionData,
    out_dir: Path,
    settings: TrainSettings,
    args: YoloxTrainArgs,
    ddp: DdpRank | None,
) -> TrainResult | None:
    """The training loop of :func:`fit`, in one process or as one DDP rank (None on ranks other than 0)."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    run_dir = out_dir / "yolox"
    run_dir.mkdir(parents=True, exist_ok=True)
    split = make_split(data)
    device = ddp.device if ddp is not None else resolve_device(settings.device, key="detector.device")
    lead = ddp is None or ddp.rank == 0  # evaluates, selects, writes
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    size = settings.img_size
    dataset = DetectionDataset(split.train, size, args.augment, seed=settings.seed)
    sampler = None
    if ddp is not None:  # each rank its shard of every epoch's permutation, the same number of batches everywhere
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=ddp.world, rank=ddp.rank, shuffle=True, seed=settings.seed, drop_last=True
        )
    batch = min(settings.batch_size, len(dataset) // (ddp.world if ddp is not None else 1))
    if batch < 1:
        raise CytologiaInputError(f"{len(dataset)} training images cannot feed {ddp.world if ddp else 1} process(es)")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batch,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=settings.workers,
        collate_fn=collate,
        drop_last=True,
        pin_memory=device.type == "cuda",
        generator=gen,
    )
    iters = len(loader)
    model.to(device).train()
    forward: Any = model.raw
    if ddp is not None:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(_RawForward(model), device_ids=[device] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, settings.optimizer, settings.lr, args.momentum, args.weight_decay)
    epochs = settings.epochs

    def schedule_for(total_epochs: int) -> WarmCosine:
        flat = min(args.no_aug_epochs, total_epochs)
        return WarmCosine(
            lr=settings.lr,
            total_iters=total_epochs * iters,
            warmup_iters=round(args.warmup_epochs * iters),
            flat_iters=flat * iters,
            min_lr_ratio=args.min_lr_ratio,
            warmup_lr=args.warmup_lr,
        )

    schedule = schedule_for(epochs)
    ema = ModelEMA(model, args.ema_decay) if args.ema else None
    amp = bool(settings.amp) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    sides = multiscale_sides(size, args.multiscale) if args.multiscale > 0 else [size]
    side_rng = np.random.default_rng(settings.seed)
    if lead:
        (run_dir / "args.yaml").write_text(
            yaml.safe_dump({"model": name, **_plain_settings(settings), "yolox": args.to_dict()}, sort_keys=False)
        )
    history: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    best_value, best_epoch, stale, it, side = -math.inf, 0, 0, 0, size
    log.info(
        "YOLOX %s: %d training images (%d iterations/epoch of %d), %d held out, device %s, %d epochs",
        name,
        len(dataset),
        iters,
        batch,
        len(split.val_names),
        device,
        epochs,
    )
    epoch = 0
    while epoch < epochs:
        no_aug = epoch >= epochs - min(args.no_aug_epochs, epochs)
        dataset.set_epoch(epoch, mosaic=not no_aug)
        if sampler is not None:
            sampler.set_epoch(epoch)
        use_l1 = no_aug and args.l1_loss
        model.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for images, targets in loader:
            it += 1
            lr = schedule(it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if len(sides) > 1 and (it - 1) % args.multiscale_every == 0:
                side = int(side_rng.choice(sides))
            x = images.to(device, non_blocking=True).float()
            x, targets = resize_batch(x, targets, side)
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                raw, grid, strides = forward(x)
            loss = yolox_loss(
                raw,
                grid,
                strides,
                targets,
                kind=args.box_loss,
                use_l1=use_l1,
                assign_mode=args.assign_mode,
                center_radius=args.center_radius or None,
            )
            if not torch.isfinite(loss.total):
                raise FloatingPointError(f"YOLOX loss is {float(loss.total)} at epoch {epoch + 1}, iteration {it}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss.total).backward()
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            for k, v in loss.as_dict().items():
                sums[k] = sums.get(k, 0.0) + v
        epoch_seconds.append(time.perf_counter() - t0)
        if not lead:  # rank 0 evaluates and decides; the others take its decision
            epoch += 1
            planned, stop = _follow(epochs, False)
            if planned != epochs:
                epochs, schedule = planned, schedule_for(planned)
            if stop:
                break
            continue
        scored = ema.module if ema is not None else model
        precise_bn(scored, dataset, device, args.precise_bn_images, batch)
        value, val_s = evaluate(
            scored, split, device, img_size=size, iou=settings.nms_iou, batch_size=args.val_batch or batch
        )
        row = {"epoch": float(epoch + 1), **{f"train/{k}": v / max(iters, 1) for k, v in sums.items()}}
        row.update({"lr": lr, KC_METRIC: value, "train_seconds": epoch_seconds[-1], "val_seconds": val_s})
        history.append(row)
        meta = {"img_size": size, "epoch": epoch + 1, "metrics": row, "train_args": args.to_dict()}
        save_checkpoint(run_dir / "last.pt", scored, name, **meta)
        if np.isfinite(value) and value >= best_value:
            best_value, best_epoch, stale = value, epoch + 1, 0
            save_checkpoint(run_dir / "best.pt", scored, name, **meta)
        else:
            stale += 1
        _write_history(run_dir / "results.csv", history)
        log.info(
            "epoch %d/%d: loss %.4f, box term %.4f (best %.4f, epoch %d)",
            epoch + 1,
            epochs,
            row.get("train/loss", float("nan")),
            value,
            best_value,
            best_epoch,
        )
        epoch += 1
        stop = bool(settings.patience and stale >= settings.patience)
        if stop:
            log.info("no better box term for %d epochs: stopping after epoch %d", stale, epoch)
        elif args.time_limit_s > 0:
            per_epoch = (time.perf_counter() - start) / epoch
            fits = max(epoch, min(epochs, int(args.time_limit_s / per_epoch)))  # never lengthened again
            if fits != epochs:
                log.info("time limit %.0f s: re-planned to %d epochs", args.time_limit_s, fits)
                epochs, schedule = fits, schedule_for(fits)
        if ddp is not None:
            _follow(epochs, stop)
        if stop:
            break
    if ddp is not None:
        _check_in_sync(model)
    if not lead:
        return None
    if best_epoch == 0:  # no finite score (no truth box held out): keep the last epoch
        best_epoch = epoch
        shutil.copyfile(run_dir / "last.pt", run_dir / "best.pt")
    target = out_dir / "detector.pt"
    shutil.copyfile(run_dir / "best.pt", target)
    return TrainResult(
        weights=target,
        best_epoch=best_epoch,
        metrics=history[best_epoch - 1],
        history=history,
        selection=(
            "best.pt: the epoch with the highest known-count mean rescaled GIoU of the held-out fold (the last one on "
            "a tie), computed after each epoch on the " + ("EMA " if ema is not None else "") + "weights that are saved"
        ),
        seconds=time.perf_counter() - start,
        epoch_seconds=epoch_seconds,
        n_train_images=len(split.train),
        n_val_images=len(split.val_names),
    )


def _follow(epochs: int, stop: bool) -> tuple[int, bool]:
    """Rank 0's (epochs, stop) after an epoch, sent to every DDP rank (rank 0 sends its own values)."""
    import torch.distributed as dist

    backend = dist.get_backend()
    decision = torch.tensor([epochs, int(stop)], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    dist.broadcast(decision, src=0)
    return int(decision[0]), bool(decision[1])


def _check_in_sync(model: torch.nn.Module) -> None:
    """After DDP training every rank must hold the same weights (averaged gradients, same updates): an error if not."""
    import torch.distributed as dist

    # per tensor, its values weighted by their position: a plain sum can hide different weights (Adam moves most
    # values by about +-lr whatever the gradient, and the signs can balance out)
    prints = []
    for p in model.parameters():
        flat = p.detach().double().flatten()
        prints.append((flat * torch.linspace(-1.0, 1.0, flat.numel(), dtype=flat.dtype, device=flat.device)).sum())
    mine = torch.stack(prints)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    worst = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if worst > 1e-9 * max(1.0, float(gathered[0].abs().max())):
        raise RuntimeError(f"DDP ranks hold different weights after training (largest difference {worst:.3g})")


def _plain_settings(settings: TrainSettings) -> dict[str, Any]:
    """The settings without ``extra`` (parsed into :class:`YoloxTrainArgs`, written apart)."""
    return {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "extra"}


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)
