"""One GPU check that fits in minutes: tests, training speed, DDP and the prediction pipeline, one JSON + one table.

    python scripts/gpu_check.py --out outputs/gpu_check            # on a CUDA machine: at most --budget-s (540 s)
    python scripts/gpu_check.py --cpu --out outputs/gpu_check_cpu  # CPU: small sizes, CUDA-only rows skipped (~1 min)

Sections, in this order (each records its own error and the script goes on; on a GPU each runs in its own process,
so a crash, a hang or a poisoned CUDA context costs only that section):

- ``env``: GPU, driver-visible memory, torch/CUDA/cuDNN/NCCL, ONNX Runtime and its providers, TensorRT.
- ``gpu_tests``: the tests marked ``gpu`` (``pytest -m gpu`` over the files that hold them), one row per test.
- ``train_<exp>``: bf16 autocast training images/s and peak memory of ``vitl224``, ``effnetv2m512``, ``dinobloom224``
  (the classifier each experiment config composes, built by the project's ``ClassifierModule`` with random weights,
  its loss and the trainer's batch size, lr and weight decay; AdamW on parameter groups as in training) and of
  ``det_yoloxs_512`` (the project's YOLOX-S at 512 px: SimOTA assignment + GIoU loss, the config's optimiser) on
  generated tensors: ``--warmup`` steps, then ``--steps`` timed steps.
- ``ddp``: a DDP training step with NCCL: 2 processes when 2 GPUs are visible, else one process (NCCL init +
  all-reduce + a DDP step), saying why; ``--cpu``: 2 processes on gloo.
- ``pipeline_*``: the 1st place's prediction pipeline (``/work/shared/RECIPES.md``): YOLOX-S 512 detector and 7
  members (ViT-L 224, ViT-L 224 + background, DinoBloom-B 224, NextViT 384, EfficientNetV2-M 512, TinyViT 512, the
  multi-label EfficientNetV2-M 512 on the full image), 4 folds each, hflip TTA where the recipe has it (detector,
  ViT-Ls, DinoBloom, NextViT, multi-label), known-count mode, through the library's ``Pipeline`` (decode, letterbox,
  NMS + WBF, crops, blend included), random weights, generated images: ms/image at batch 1 and images/s at batch 32,
  in eager torch fp32, torch bf16 autocast, torch fp16 autocast (the library's own CUDA path), ONNX Runtime CUDA
  fp16 and ONNX Runtime TensorRT fp16 -- each only where available, else a row saying why. The four folds of a member
  are four loaded copies of one random checkpoint (speed does not depend on the weights).

``--cpu`` runs the same code at toy sizes (documented per row): small stand-ins for the big backbones
(:data:`CPU_STANDINS`), 2 folds, 1 step. ``--budget-s`` is a guard: a section whose estimate does not fit in what is
left is skipped with that reason, and an isolated section is killed at the deadline. See ``docs/gpu_check.md`` for
the one-call command on the GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("cytologia") is None:  # run from a checkout without the package installed (GPU machine)
    sys.path.insert(0, str(ROOT / "src"))

GPU_BUDGET_S = 540.0  # 9 minutes on one H100/H200
CPU_BUDGET_S = 90.0  # --cpu on a 2-core machine: about a minute of work, with room for a loaded machine
CLASSIFIER_EXPS: tuple[str, ...] = ("vitl224", "effnetv2m512", "dinobloom224")
DETECTOR_EXP = "det_yoloxs_512"
# The 1st place's members (RECIPES.md): experiment, hflip TTA, blend weight. Groups weigh 0.25 each: EfficientNetV2-M;
# mean(ViT-L, ViT-L + background, DinoBloom-B); NextViT; TinyViT. The multi-label member is blended on single-cell
# images with weight ML_WEIGHT.
FIRST_PLACE_MEMBERS: tuple[tuple[str, bool, float], ...] = (
    ("vitl224", True, 0.25 / 3),
    ("vitl224_bg", True, 0.25 / 3),
    ("dinobloom224", True, 0.25 / 3),
    ("nextvit384", True, 0.25),
    ("effnetv2m512", False, 0.25),
    ("tinyvit512", False, 0.25),
    ("ml_effnetv2m512_bg", True, 0.0),
)
ML_WEIGHT = 0.543  # the 1st place's share of the multi-label member on single-cell images
FIRST_PLACE_FOLDS = 4
# --cpu: the same builders with small members of the same families, at small sizes (multiples of the patch size)
CPU_STANDINS: dict[str, tuple[str, int]] = {
    "vit_large_patch16_224": ("vit_tiny_patch16_224", 32),
    "tf_efficientnetv2_m": ("tf_efficientnetv2_b0", 32),
    "dinobloom_b": ("dinobloom_s", 28),
    "nextvit_small": ("resnet10t", 32),
    "tiny_vit_21m_512": ("resnet10t", 32),
}
CPU_PIPELINE_MEMBER = ("resnet10t", 32)  # --cpu pipeline: every member is this (cheap to write, export and load)
CPU_DET_SIZE = 128
CPU_FOLDS = 2
# Seconds each section is expected to need (GPU, CPU): a section is skipped when this does not fit the budget left.
ESTIMATES: dict[str, tuple[float, float]] = {
    "env": (10, 2),
    "gpu_tests": (90, 0),
    "train_vitl224": (45, 10),
    "train_effnetv2m512": (45, 8),
    "train_dinobloom224": (35, 6),
    "train_yolox_s": (45, 6),
    "ddp": (60, 25),
    "pipeline_torch": (150, 15),
    "pipeline_onnx": (120, 10),
    "pipeline_tensorrt": (150, 0),
}
# Longest an isolated section may run (GPU) before it is killed, whatever the budget left.
CAPS_S: dict[str, float] = {"gpu_tests": 150, "ddp": 120, "pipeline_torch": 240, "pipeline_onnx": 200}
DEFAULT_CAP_S = 120.0


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One line of the table: a check, its status (ok | skipped | failed | error), a readable result, the peak
    memory it used (MB; CUDA max allocated on a GPU, process peak RSS on the CPU), a note, and its numbers."""

    section: str
    check: str
    status: str
    result: str = ""
    peak_mem_mb: float | None = None
    note: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    """What every section needs: CPU or CUDA, step counts, folders, and the deadline (``time.time()``)."""

    cpu: bool
    steps: int
    warmup: int
    work: Path
    out: Path
    deadline: float

    def left(self) -> float:
        return self.deadline - time.time()


def _err(section: str, check: str, exc: BaseException) -> Row:
    tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]).strip()
    return Row(section, check, "error", note=f"{type(exc).__name__}: {exc}"[:400], data={"traceback": tail[-2000:]})


# ------------------------------------------------------------------------------------------------------ helpers
def _torch_device(ctx: Ctx) -> Any:
    import torch

    return torch.device("cpu" if ctx.cpu else "cuda:0")


def _mem_reset(device: Any) -> None:
    import torch

    from cytologia.runtime.bench import reset_peak_rss

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()


def _mem_peak(device: Any) -> float:
    import torch

    from cytologia.runtime.bench import peak_rss_mb

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(exp: str) -> Any:
    """The config ``python train.py +exp=<exp>`` composes (Hydra, the project's ``configs/``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"+exp={exp}"])


def _arch(name: str, size: int, cpu: bool) -> tuple[str, int, str]:
    """The architecture and input size a row runs, and a note when ``--cpu`` replaced them."""
    if cpu:
        small, small_size = CPU_STANDINS.get(name, (name, min(size, 32)))
        return small, small_size, f"--cpu stand-in {small} at {small_size} px for {name} at {size} px"
    return name, size, ""


def _timed_steps(step: Callable[[], None], device: Any, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones (device synchronised around)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- sections
def section_env(ctx: Ctx) -> list[Row]:
    """What the machine is."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception as exc:  # NCCL missing from this build
            info["nccl"] = f"unavailable ({exc})"
        info["gpus"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "bf16": torch.cuda.is_bf16_supported(),
            }
            for i in range(torch.cuda.device_count())
        ]
    try:
        import onnxruntime as ort

        from cytologia.runtime.sessions import tensorrt_installed

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = list(ort.get_available_providers())
        info["tensorrt_libs"] = tensorrt_installed()
    except Exception as exc:  # onnxruntime absent or broken
        info["onnxruntime"] = f"unavailable ({exc})"
    for package in ("timm", "lightning", "onnxruntime-gpu"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # no git, or the tree is a copy without .git
        info["commit"] = ""
    gpus = info.get("gpus") or []
    where = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in gpus) or f"CPU only, {info['cpus']} cores"
    result = f"{where}; torch {info['torch']}" + (f", CUDA {info['cuda']}" if gpus else "")
    return [Row("env", "machine", "ok", result, data=info)]


def gpu_test_files() -> list[Path]:
    """Test files that hold a test marked ``gpu``."""
    return sorted(p for p in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def section_gpu_tests(ctx: Ctx) -> list[Row]:
    """``pytest -m gpu`` over the files holding gpu-marked tests; one row per test."""
    if ctx.cpu:
        return [Row("gpu_tests", "pytest -m gpu", "skipped", note="needs CUDA; the gpu-marked tests skip without it")]
    files = gpu_test_files()
    if not files:
        return [Row("gpu_tests", "pytest -m gpu", "skipped", note="no test is marked gpu")]
    xml = ctx.work / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    cmd += [str(f.relative_to(ROOT)) for f in files]
    start = time.perf_counter()
    env = _child_env()
    timeout = max(10.0, min(CAPS_S["gpu_tests"], ctx.left() - 5))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [Row("gpu_tests", "pytest -m gpu", "error", note=f"timed out after {timeout:.0f} s")]
    seconds = time.perf_counter() - start
    rows = []
    if xml.is_file():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            status, note = "ok", ""
            for tag, st in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
                found = case.find(tag)
                if found is not None:
                    status, note = st, (found.get("message") or "")[:300]
            rows.append(Row("gpu_tests", name, status, f"{float(case.get('time', 0)):.1f} s", note=note))
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    rows.append(
        Row(
            "gpu_tests",
            "pytest -m gpu (all)",
            "ok" if proc.returncode == 0 else "failed",
            f"{summary} in {seconds:.0f} s",
            note="" if proc.returncode == 0 else (proc.stdout + proc.stderr)[-600:],
            data={"returncode": proc.returncode, "files": [str(f.relative_to(ROOT)) for f in files]},
        )
    )
    return rows


def train_classifier(ctx: Ctx, exp: str) -> list[Row]:
    """bf16 training speed of the classifier ``exp`` composes (random weights, generated tensors)."""
    import torch
    from omegaconf import OmegaConf

    from cytologia.classification.module import ClassifierModule, decay_groups
    from cytologia.data.schema import labels

    cfg = compose(exp)
    c, t = cfg.classifier, cfg.trainer
    name, size, note = _arch(str(c.name), int(c.img_size), ctx.cpu)
    batch = 2 if ctx.cpu else int(t.batch_size)
    device = _torch_device(ctx)
    _mem_reset(device)
    module = ClassifierModule(
        name,
        list(labels(bool(c.background))),
        size,
        weights=None,  # random weights: speed does not depend on them
        drop_path=float(c.drop_path),
        train_last_k=c.train_last_k,
        loss=OmegaConf.to_container(c.loss, resolve=True),
        lr=float(t.lr),
        weight_decay=float(t.weight_decay),
        multilabel=bool(c.multilabel),
    ).to(device)
    module.train()
    optimizer = torch.optim.AdamW(decay_groups(module.model, float(t.weight_decay)), lr=float(t.lr))
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    y = torch.randint(0, module.n_cell_classes, (batch,), device=device, generator=gen)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = module(x)
        loss = module.criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _timed_steps(step, device, ctx.warmup, ctx.steps)
    ips = ctx.steps * batch / seconds
    params = sum(p.numel() for p in module.parameters()) / 1e6
    data = {
        "arch": name,
        "img_size": size,
        "batch": batch,
        "steps": ctx.steps,
        "images_per_s": ips,
        "step_ms": 1000 * seconds / ctx.steps,
        "params_m": params,
    }
    result = f"{ips:.1f} images/s (batch {batch}, {1000 * seconds / ctx.steps:.0f} ms/step, {size} px)"
    return [Row(f"train_{exp}", f"{name} bf16 train step", "ok", result, _mem_peak(device), note, data)]


def section_train_yolox(ctx: Ctx) -> list[Row]:
    """bf16 training speed of the project's YOLOX-S at 512 px (SimOTA + GIoU loss, the config's optimiser)."""
    import torch

    from cytologia.detection.yolox.losses import yolox_loss
    from cytologia.detection.yolox.model import build_yolox
    from cytologia.detection.yolox.train import build_optimizer, parse_train_args

    cfg = compose(DETECTOR_EXP)
    d = cfg.detector
    args = parse_train_args(d.train_args)
    size = CPU_DET_SIZE if ctx.cpu else int(d.img_size)
    batch = 2 if ctx.cpu else int(d.batch_size)
    note = f"--cpu: {size} px for {d.img_size} px" if ctx.cpu else ""
    note += ("; " if note else "") + "bf16 autocast (training's own default on CUDA is fp16 + loss scaling)"
    device = _torch_device(ctx)
    _mem_reset(device)
    torch.manual_seed(0)
    model = build_yolox(str(d.model)).to(device).train()
    optimizer = build_optimizer(model, str(d.optimizer), float(d.lr), args.momentum, args.weight_decay)
    x = torch.randint(0, 256, (batch, 3, size, size), device=device).float()  # BGR 0-255, as the loader gives
    targets = []
    for b in range(batch):  # 1-3 cells per image, 15-25 % of the side, inside the image
        n = 1 + b % 3
        wh = torch.rand(n, 2, device=device) * 0.1 * size + 0.15 * size
        centre = wh / 2 + torch.rand(n, 2, device=device) * (size - wh)
        targets.append(torch.cat((torch.zeros(n, 1, device=device), centre, wh), dim=1))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            raw, grid, strides = model.raw(x)
        loss = yolox_loss(
            raw,
            grid,
            strides,
            targets,
            kind=args.box_loss,
            assign_mode=args.assign_mode,
            center_radius=args.center_radius or None,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        optimizer.step()

    seconds = _timed_steps(step, device, ctx.warmup, ctx.steps)
    ips = ctx.steps * batch / seconds
    data = {
        "arch": str(d.model),
        "img_size": size,
        "batch": batch,
        "steps": ctx.steps,
        "images_per_s": ips,
        "step_ms": 1000 * seconds / ctx.steps,
        "optimizer": str(d.optimizer),
    }
    result = f"{ips:.1f} images/s (batch {batch}, {1000 * seconds / ctx.steps:.0f} ms/step, {size} px)"
    return [Row("train_yolox_s", f"{d.model} bf16 train step", "ok", result, _mem_peak(device), note, data)]


# ------------------------------------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ddp_worker(rank: int, world: int, port: int, backend: str, spec: dict[str, Any], out: Path) -> None:
    """One DDP process: init the process group, all-reduce, then ``spec['steps']`` DDP training steps of the
    classifier in ``spec``; writes its numbers as JSON to ``out``."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cytologia.classification.models import create_classifier

    cuda = backend == "nccl"
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    probe = torch.full((4,), float(rank + 1), device=device)
    dist.all_reduce(probe)
    _sync(device)
    init_s = time.perf_counter() - t0
    expected = world * (world + 1) / 2
    big = torch.ones(64 * 2**20 // 4, device=device)  # 64 MiB of fp32: a gradient bucket's order of magnitude
    dist.all_reduce(big)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(big)
    _sync(device)
    allreduce_ms = 1000 * (time.perf_counter() - t1) / 3
    torch.manual_seed(0)
    model = create_classifier(spec["arch"], 23, img_size=spec["img_size"]).to(device)
    ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    torch.manual_seed(1 + rank)  # each rank its own batch: only the averaged gradients keep the weights equal
    x = torch.randn(spec["batch"], 3, spec["img_size"], spec["img_size"], device=device)
    y = torch.randint(0, 23, (spec["batch"],), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(ddp(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = _timed_steps(step, device, spec["warmup"], spec["steps"])
    # the gradients of every rank were averaged: the weights stay identical across processes
    check = torch.tensor([float(sum(p.detach().double().sum() for p in model.parameters()))], device=device)
    gathered = [torch.zeros_like(check) for _ in range(world)]
    dist.all_gather(gathered, check)
    same = all(torch.allclose(g, gathered[0]) for g in gathered)
    out.write_text(
        json.dumps(
            {
                "rank": rank,
                "init_s": init_s,
                "allreduce_ok": bool(torch.allclose(probe, torch.full_like(probe, expected))),
                "allreduce_64mib_ms": allreduce_ms,
                "step_ms": 1000 * seconds / spec["steps"],
                "images_per_s": spec["steps"] * spec["batch"] / seconds,
                "weights_in_sync": same,
            }
        )
    )
    dist.destroy_process_group()


def _forked_worker(rank: int, world: int, port: int, backend: str, spec: dict[str, Any], out: Path, log: Path) -> None:
    """A forked CPU rank: one intra-op thread (the parent's OpenMP pool does not survive a fork), errors to ``log``."""
    import torch

    torch.set_num_threads(1)
    try:
        ddp_worker(rank, world, port, backend, spec, out)
    except BaseException:
        log.write_text(traceback.format_exc())
        raise


def _launch_ddp(
    cpu: bool, world: int, backend: str, spec: dict[str, Any], outs: list[Path], logs: list[Path], timeout: float
) -> list[int | None]:
    """Start ``world`` ranks of :func:`ddp_worker` and wait for them (killed at ``timeout``); their exit codes (None:
    killed). CPU ranks are forked from this process (no second torch import: seconds on a small machine); CUDA ranks
    are fresh interpreters, as CUDA cannot be used in a forked child."""
    import multiprocessing

    port = _free_port()
    deadline = time.time() + timeout
    if cpu:
        fork = multiprocessing.get_context("fork")
        workers = [
            fork.Process(target=_forked_worker, args=(r, world, port, backend, spec, outs[r], logs[r]))
            for r in range(world)
        ]
        for w in workers:
            w.start()
        codes: list[int | None] = []
        for w in workers:
            w.join(max(1.0, deadline - time.time()))
            if w.is_alive():
                w.kill()
                w.join()
                codes.append(None)
            else:
                codes.append(w.exitcode)
        return codes
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", json.dumps(spec), "--world", str(world)]
    cmd += ["--port", str(port), "--backend", backend]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as f:  # the child keeps its own copy of the file descriptor
            argv = [*cmd, "--rank", str(r), "--rank-out", str(outs[r])]
            procs.append(subprocess.Popen(argv, env=_child_env(), stdout=f, stderr=subprocess.STDOUT))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(None)
    return codes


def section_ddp(ctx: Ctx) -> list[Row]:
    """DDP: NCCL on GPUs (2 processes when 2 GPUs are visible, else 1), gloo with 2 CPU processes under --cpu."""
    import torch

    rows = []
    cfg = compose("dinobloom224")
    arch, size, note = str(cfg.classifier.name), int(cfg.classifier.img_size), ""
    if ctx.cpu:
        arch, size = CPU_PIPELINE_MEMBER
        note = f"--cpu stand-in {arch} at {size} px for {cfg.classifier.name} at {cfg.classifier.img_size} px"
    if ctx.cpu:
        backend, world = "gloo", 2
        rows.append(Row("ddp", "NCCL", "skipped", note="needs CUDA; ran the same DDP step on 2 CPU processes (gloo)"))
    else:
        backend, n_gpu = "nccl", torch.cuda.device_count()
        world = 2 if n_gpu >= 2 else 1
        if n_gpu < 2:
            rows.append(
                Row("ddp", "NCCL 2 processes", "skipped", note=f"{n_gpu} GPU visible: ran one NCCL process instead")
            )
    spec = {
        "arch": arch,
        "img_size": size,
        "batch": 2 if ctx.cpu else int(cfg.trainer.batch_size),
        "steps": ctx.steps,
        "warmup": ctx.warmup,
    }
    outs = [ctx.work / f"ddp_rank{r}.json" for r in range(world)]
    for o in outs:
        o.unlink(missing_ok=True)
    logs = [ctx.work / f"ddp_rank{r}.log" for r in range(world)]
    timeout = max(10.0, min(CAPS_S["ddp"], ctx.left() - 5))
    codes = _launch_ddp(ctx.cpu, world, backend, spec, outs, logs, timeout)
    label = f"{backend} x{world} DDP step ({arch}, bf16)"
    if any(c != 0 for c in codes) or not all(o.is_file() for o in outs):
        tail = " | ".join(log.read_text(errors="replace")[-300:] for log in logs if log.is_file())
        why = "timed out" if None in codes else f"exit codes {codes}"
        return [*rows, Row("ddp", label, "error", note=f"{why}: {tail}"[:600])]
    res = [json.loads(o.read_text()) for o in outs]
    ok = all(r["allreduce_ok"] and r["weights_in_sync"] for r in res)
    ips = sum(r["images_per_s"] for r in res)
    result = (
        f"init + all-reduce {max(r['init_s'] for r in res):.1f} s; 64 MiB all-reduce "
        f"{max(r['allreduce_64mib_ms'] for r in res):.1f} ms; {ips:.1f} images/s over {world} process(es), "
        f"{max(r['step_ms'] for r in res):.0f} ms/step (batch {spec['batch']} per process)"
    )
    status = "ok" if ok else "failed"
    why = "" if ok else "all-reduce gave a wrong sum or the weights differ across processes"
    return [*rows, Row("ddp", label, status, result, note="; ".join(x for x in (note, why) if x), data={"ranks": res})]


# ------------------------------------------------------------------------------------------------------ pipeline
def _first_place_ensemble(ctx: Ctx, onnx: str | None) -> tuple[Path, list[str]]:
    """The 1st place's ensemble with random weights in ``ctx.work/ensemble`` (files written once and reused);
    ``onnx``: None (checkpoints only), ``fp32`` or ``fp16`` (graphs listed). Returns the ensemble file and notes."""
    from cytologia.data.schema import labels
    from cytologia.ensemble import BlendSpec, DetectorSpec, Ensemble, MemberSpec, write_ensemble
    from cytologia.runtime.bench import save_random_classifier, save_random_detector

    folder = ctx.work / "ensemble"
    folder.mkdir(parents=True, exist_ok=True)
    folds = CPU_FOLDS if ctx.cpu else FIRST_PLACE_FOLDS
    notes = (
        [
            f"--cpu: {folds} folds, every member {CPU_PIPELINE_MEMBER[0]} at {CPU_PIPELINE_MEMBER[1]} px, detector "
            f"at {CPU_DET_SIZE} px"
        ]
        if ctx.cpu
        else []
    )
    members = []
    for exp, flip, weight in FIRST_PLACE_MEMBERS:
        c = compose(exp).classifier
        name, size = CPU_PIPELINE_MEMBER if ctx.cpu else (str(c.name), int(c.img_size))
        background = bool(c.background)
        ckpt = folder / f"{exp}.ckpt"
        if not ckpt.is_file():
            save_random_classifier(name, size, ckpt, None, seed=len(members), background=background)
        graphs = [_onnx_for(ckpt, size, onnx, detector=False)] * folds if onnx else []
        members.append(
            MemberSpec(
                exp,
                kind="multilabel" if bool(c.multilabel) else "cell",
                arch=name,
                img_size=size,
                margin=float(c.margin),
                tta_flip=flip,
                num_labels=len(labels(background)),
                weight=weight if not c.multilabel else 1.0,
                checkpoints=[ckpt.name] * folds,  # the fold models: copies of one random checkpoint
                onnx=[g.name for g in graphs],
            )
        )
    d = compose(DETECTOR_EXP).detector
    det_size = CPU_DET_SIZE if ctx.cpu else int(d.img_size)
    det_ckpt = folder / "detector.pt"
    backend = save_random_detector(str(d.model), det_ckpt, None, det_size) if not det_ckpt.is_file() else None
    if backend is None:
        from cytologia.detection.registry import backend_of_model

        backend = backend_of_model(str(d.model))
    det_graphs = [_onnx_for(det_ckpt, det_size, onnx, detector=True)] * folds if onnx else []
    detector = DetectorSpec(
        backend=backend,
        arch=str(d.model),
        img_size=det_size,
        checkpoints=[det_ckpt.name] * folds,
        onnx=[g.name for g in det_graphs],
        conf=float(d.conf),
        nms_iou=float(d.nms_iou),
        max_det=int(d.max_det),
        tta_flip=bool(d.tta_flip),
    )
    ens = Ensemble(
        members, detector=detector, blend=BlendSpec(multilabel_weight=ML_WEIGHT), tuning={"note": "random weights"}
    )
    return write_ensemble(ens, folder / f"ensemble_{onnx or 'torch'}.json"), notes


def _onnx_for(ckpt: Path, size: int, precision: str, detector: bool) -> Path:
    """The ONNX graph of ``ckpt`` (exported once), converted to fp16 (float16 inputs and outputs, so that the session
    runs it as it is) when ``precision`` is ``fp16``."""
    import onnx

    fp32 = ckpt.with_suffix(".onnx")
    if not fp32.is_file():
        if detector:
            from cytologia.detection.export import export_detector

            export_detector(ckpt, fp32, size)
        else:
            from cytologia.classification.export import export_classifier_onnx
            from cytologia.classification.module import ClassifierModule

            export_classifier_onnx(ClassifierModule.from_checkpoint(ckpt).model, fp32, size)
    if precision != "fp16":
        return fp32
    half = ckpt.with_suffix(".fp16.onnx")
    if not half.is_file():
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=False), str(half))
    return half


def _test_images(ctx: Ctx) -> tuple[list[Path], Any]:
    """Generated test images (the project's synthetic set, real image sizes on a GPU) and their cell counts."""
    from cytologia.data.synthetic.generate import SynthConfig, generate
    from cytologia.runtime.bench import image_list

    data = ctx.work / "images"
    if not (data / "test.csv").is_file():
        n = 12 if ctx.cpu else 110  # 90 % test images: ~10 / ~99
        generate(data, n, seed=0, config=SynthConfig(size=96 if ctx.cpu else None, test_fraction=0.9), overwrite=True)
    return image_list(data, None)


def _time_pipeline(pipe: Any, paths: list[Path], counts: Any, device: Any, ctx: Ctx) -> dict[str, float]:
    """ms/image at batch 1 (p50 and mean of the images) and images/s at batch 32 (batch 4 under --cpu)."""
    from cytologia.runtime.bench import stage_stats

    n1, nb, big = (2, 8, 4) if ctx.cpu else (16, 64, 32)
    pipe.batch_size = 1
    pipe.predict(paths[:2], counts=counts, mode="known-count", prefetch=False)  # warm-up
    one = pipe.predict(paths[:n1], counts=counts, mode="known-count", prefetch=False)
    stats = stage_stats(one)["total"]
    pipe.batch_size = big
    pipe.predict(paths[:big], counts=counts, mode="known-count", prefetch=False)  # warm-up at this batch
    _mem_reset(device)
    many = pipe.predict(paths[:nb], counts=counts, mode="known-count", prefetch=False)
    return {
        "b1_ms_p50": stats["p50"],
        "b1_ms_mean": stats["mean"],
        "b1_images": n1,
        "batch": big,
        "batch_images_per_s": nb / many.wall_seconds,
        "batch_images": nb,
        "boxes": len(many.boxes),
        "peak_mem_mb": _mem_peak(device),
    }


def _pipeline_row(section: str, check: str, t: dict[str, float], note: str) -> Row:
    result = (
        f"batch 1: {t['b1_ms_p50']:.1f} ms/image p50 ({t['b1_ms_mean']:.1f} mean, {t['b1_images']} images); "
        f"batch {t['batch']}: {t['batch_images_per_s']:.1f} images/s ({t['batch_images']} images)"
    )
    return Row(section, check, "ok", result, t.pop("peak_mem_mb"), note, t)


_TORCH_PRECISION = ["fp32"]  # what the switchable torch networks run next: fp32 | bf16 | fp16


def _switchable_network(module: Any, device: Any, numpy_out: bool) -> Any:
    """The torch runtime's network wrapper (``runtime.inference._torch_network``) with the autocast dtype read from
    :data:`_TORCH_PRECISION` at each call, so that one loaded pipeline is timed in fp32, bf16 and fp16."""
    import numpy as np
    import torch

    module = module.eval().to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)

    def run(x: Any) -> Any:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(_TORCH_PRECISION[0])
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = module(torch.from_numpy(np.ascontiguousarray(x)).to(device))
        out = out[0] if isinstance(out, (list, tuple)) else out
        return out.float().cpu().numpy() if numpy_out else out.float()

    return run


def section_pipeline_torch(ctx: Ctx) -> list[Row]:
    """The pipeline on torch, loaded once, timed in fp32 (eager), bf16 autocast and fp16 autocast."""
    from cytologia.ensemble import read_ensemble
    from cytologia.runtime import inference

    t0 = time.perf_counter()
    path, notes = _first_place_ensemble(ctx, onnx=None)
    paths, counts = _test_images(ctx)
    device = _torch_device(ctx)
    original = inference._torch_network
    inference._torch_network = _switchable_network  # see _switchable_network: the library runs fp16 on CUDA
    try:
        pipe = inference.Pipeline(read_ensemble(path), runtime="torch", device=device.type, threads=None)
    finally:
        inference._torch_network = original
    setup = time.perf_counter() - t0
    rows = []
    precisions = ("fp32", "bf16") if ctx.cpu else ("fp32", "bf16", "fp16")
    for precision in precisions:
        if ctx.left() < (10 if ctx.cpu else 40):
            rows.append(Row("pipeline_torch", f"torch {precision}", "skipped", note=f"budget: {ctx.left():.0f} s left"))
            continue
        _TORCH_PRECISION[0] = precision
        try:
            t = _time_pipeline(pipe, paths, counts, device, ctx)
        except Exception as exc:  # one precision failing leaves the others
            rows.append(_err("pipeline_torch", f"torch {precision}", exc))
            continue
        label = {"fp32": "eager fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast (the library's CUDA path)"}
        note = "; ".join([*notes, f"set-up {setup:.0f} s (models written and loaded)"] if precision == "fp32" else [])
        rows.append(_pipeline_row("pipeline_torch", f"torch {label[precision]}", t, note))
    return rows


def _ort_pipeline(ctx: Ctx, section: str, device: str, precision: str) -> list[Row]:
    from cytologia.ensemble import read_ensemble
    from cytologia.runtime.inference import Pipeline

    t0 = time.perf_counter()
    path, notes = _first_place_ensemble(ctx, onnx=precision)
    paths, counts = _test_images(ctx)
    trt_cache = ctx.work / "trt_cache"
    pipe = Pipeline(read_ensemble(path), runtime="onnx", device=device, threads=None, trt_cache=trt_cache)
    setup = time.perf_counter() - t0
    described = pipe.describe()
    models = described["detector"]["models"] + [m for member in described["members"] for m in member["models"]]
    providers = sorted({p for m in models for p in m.get("providers", [])})
    precisions = sorted({str(m.get("precision")) for m in models})
    t = _time_pipeline(pipe, paths, counts, _torch_device(ctx), ctx)
    if not ctx.cpu:
        t["peak_mem_mb"] = None  # ONNX Runtime's CUDA arena is not torch's allocator: not measured
    notes += [
        f"set-up {setup:.0f} s (export, conversion, sessions)",
        f"providers {providers}",
        f"precision {precisions}",
    ]
    label = {"cpu": "ONNX Runtime CPU fp32", "cuda": "ONNX Runtime CUDA fp16", "tensorrt": "ONNX Runtime TensorRT fp16"}
    return [_pipeline_row(section, label[device], t, "; ".join(notes))]


def section_pipeline_onnx(ctx: Ctx) -> list[Row]:
    """ONNX Runtime: CUDA fp16 on a GPU, CPU fp32 under --cpu."""
    from cytologia.runtime.sessions import CUDA, available_providers

    if ctx.cpu:
        return _ort_pipeline(ctx, "pipeline_onnx", "cpu", "fp32")
    if CUDA not in available_providers():
        why = f"this onnxruntime build has no {CUDA} ({available_providers()}): install onnxruntime-gpu instead"
        return [Row("pipeline_onnx", "ONNX Runtime CUDA fp16", "skipped", note=why)]
    return _ort_pipeline(ctx, "pipeline_onnx", "cuda", "fp16")


def section_pipeline_tensorrt(ctx: Ctx) -> list[Row]:
    """ONNX Runtime's TensorRT provider, fp16 engines (cached under the work folder)."""
    from cytologia.runtime.sessions import TENSORRT, available_providers, tensorrt_installed

    if ctx.cpu:
        return [Row("pipeline_tensorrt", "ONNX Runtime TensorRT fp16", "skipped", note="needs CUDA")]
    if TENSORRT not in available_providers():
        why = f"this onnxruntime build has no {TENSORRT} ({available_providers()})"
        return [Row("pipeline_tensorrt", "ONNX Runtime TensorRT fp16", "skipped", note=why)]
    if not tensorrt_installed():
        why = "TensorRT's libraries (libnvinfer / the tensorrt wheels) are not installed"
        return [Row("pipeline_tensorrt", "ONNX Runtime TensorRT fp16", "skipped", note=why)]
    return _ort_pipeline(ctx, "pipeline_tensorrt", "tensorrt", "fp32")


SECTIONS: dict[str, Callable[[Ctx], list[Row]]] = {
    "env": section_env,
    "gpu_tests": section_gpu_tests,
    **{f"train_{exp}": (lambda ctx, exp=exp: train_classifier(ctx, exp)) for exp in CLASSIFIER_EXPS},
    "train_yolox_s": section_train_yolox,
    "ddp": section_ddp,
    "pipeline_torch": section_pipeline_torch,
    "pipeline_onnx": section_pipeline_onnx,
    "pipeline_tensorrt": section_pipeline_tensorrt,
}


# -------------------------------------------------------------------------------------------------------- runner
def section_estimate(name: str, cpu: bool) -> float:
    """Seconds ``name`` is expected to need (:data:`ESTIMATES`); an ONNX Runtime section whose provider is missing
    only writes its skip row, so it needs none (its row then says why, not "budget")."""
    if not cpu and name in ("pipeline_onnx", "pipeline_tensorrt"):
        try:
            from cytologia.runtime.sessions import CUDA, TENSORRT, available_providers

            if (TENSORRT if name == "pipeline_tensorrt" else CUDA) not in available_providers():
                return 0.0
        except Exception:  # onnxruntime missing or broken: the section itself reports it
            return 0.0
    return ESTIMATES[name][1 if cpu else 0]


def _child_env() -> dict[str, str]:
    """The environment of child processes: this one, with ``src/`` importable and unbuffered output."""
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_section(name: str, ctx: Ctx) -> list[Row]:
    """Run one section here; its exception becomes an error row."""
    try:
        return SECTIONS[name](ctx)
    except Exception as exc:  # any failure of a section is recorded, the others still run
        return [_err(name, name, exc)]


def run_isolated(name: str, ctx: Ctx, argv: list[str]) -> list[Row]:
    """Run one section in a child process (killed at its cap or the deadline); its rows come back as JSON."""
    rows_file = ctx.work / f"rows_{name}.json"
    rows_file.unlink(missing_ok=True)
    timeout = max(5.0, min(CAPS_S.get(name, DEFAULT_CAP_S), ctx.left() - 3))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--section", name, "--rows-out", str(rows_file)]
    cmd += ["--deadline", str(time.time() + timeout)]
    log = ctx.work / f"{name}.log"
    try:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=_child_env()).returncode
    except subprocess.TimeoutExpired:
        tail = log.read_text(errors="replace")[-300:] if log.is_file() else ""
        return [Row(name, name, "error", note=f"killed after {timeout:.0f} s (cap or budget): {tail}")]
    if rows_file.is_file():
        return [Row(**r) for r in json.loads(rows_file.read_text())]
    tail = log.read_text(errors="replace")[-500:] if log.is_file() else ""
    return [Row(name, name, "error", note=f"process exited {code} without results: {tail}")]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The table: one line per row, the machine and budget above it."""
    lines = [
        f"# GPU check ({'CPU mode' if meta['cpu'] else 'CUDA'})",
        "",
        f"Machine: {meta.get('machine', '?')}. Budget {meta['budget_s']:.0f} s, used {meta['elapsed_s']:.0f} s. "
        f"Command: `{meta['command']}`",
        "",
        "| section | check | status | result | peak memory (MB) | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mem = "" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        lines.append(
            f"| {r.section} | {_cell(r.check)} | {r.status} | {_cell(r.result)} | {mem} | {_cell(r.note)[:300]} |"
        )
    lines.append("")
    lines.append(
        "Peak memory: torch's max allocated CUDA memory on a GPU, the process's peak resident set on the CPU. "
        "Random weights and generated inputs throughout: speed does not depend on the weights."
    )
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": [asdict(r) for r in rows]}
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(rows, meta))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="run on the CPU at toy sizes (CUDA-only rows skipped)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check", help="where the JSON + table go")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (models, images); default: a temporary one")
    p.add_argument(
        "--budget-s", type=float, default=None, help=f"guard ({GPU_BUDGET_S:.0f} s; --cpu {CPU_BUDGET_S:.0f})"
    )
    p.add_argument("--steps", type=int, default=None, help="timed training steps (20; --cpu 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; --cpu 1)")
    p.add_argument("--only", default="", help=f"comma-separated sections ({', '.join(SECTIONS)})")
    p.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each section in its own process (default: on a GPU yes, --cpu no)",
    )
    # internal: one section in a child process, a DDP worker
    p.add_argument("--section", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rows-out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    p.add_argument("--rank-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import cytologia.offline  # noqa: F401 -- offline and threading environment, as every cytologia entry point

    if args.ddp_worker is not None:
        ddp_worker(args.rank, args.world, args.port, args.backend, json.loads(args.ddp_worker), args.rank_out)
        return 0
    started = time.time()
    budget = args.budget_s if args.budget_s is not None else (CPU_BUDGET_S if args.cpu else GPU_BUDGET_S)
    steps = args.steps if args.steps is not None else (1 if args.cpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    work = args.work or Path(tempfile.mkdtemp(prefix="cytologia-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    deadline = args.deadline if args.deadline is not None else started + budget
    ctx = Ctx(cpu=args.cpu, steps=steps, warmup=warmup, work=work, out=args.out, deadline=deadline)
    if args.section is not None:  # a child process: one section, rows to --rows-out
        rows = run_section(args.section, ctx)
        args.rows_out.write_text(json.dumps([asdict(r) for r in rows], default=str))
        return 0
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device; run with --cpu for the CPU variant", file=sys.stderr)
            return 2
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"gpu_check: unknown section(s) {unknown}; sections: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    isolate = (not args.cpu) if args.isolate is None else args.isolate
    child_argv = ["--work", str(work), "--steps", str(steps), "--warmup", str(warmup)] + (["--cpu"] if args.cpu else [])
    command = "python scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta: dict[str, Any] = {"cpu": args.cpu, "budget_s": budget, "command": command.strip(), "sections": names}
    rows: list[Row] = []
    for name in names:
        estimate = section_estimate(name, args.cpu)
        t0 = time.time()
        if ctx.left() < estimate:
            rows.append(Row(name, name, "skipped", note=f"budget: {ctx.left():.0f} s left, needs ~{estimate:.0f} s"))
        else:
            rows += run_isolated(name, ctx, child_argv) if isolate else run_section(name, ctx)
        seconds = time.time() - t0
        for r in rows:
            if r.section == name:
                r.data.setdefault("section_s", round(seconds, 1))
        if name == "env" and rows and rows[0].status == "ok":
            meta["machine"] = rows[0].result
        meta["elapsed_s"] = time.time() - started
        write_results(args.out, rows, meta)  # after every section: a killed run keeps what it measured
        print(
            f"[{meta['elapsed_s']:5.0f} s] {name}: "
            + ", ".join(f"{r.check}={r.status}" for r in rows if r.section == name),
            flush=True,
        )
    bad = [r for r in rows if r.status in ("error", "failed")]
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'}; {len(bad)} error/failed row(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
