"""Sharded prediction: the images split across processes, one table gathered, the outputs written once.

Two launchers, one rule:

- ``torchrun --nproc_per_node=N -m cytologia predict ...`` (several GPUs, several nodes: ``--nnodes``, or under
  SLURM with ``srun torchrun ...``): each rank predicts its slice, sends its table to rank 0 with
  ``torch.distributed.gather_object`` (gloo: CPU tensors, any node; no shared file system needed), rank 0 merges and
  writes the submission. On a GPU each rank takes its ``LOCAL_RANK`` device (``CUDA_VISIBLE_DEVICES`` is narrowed
  to it before any session exists).
- ``cytologia predict --shards N``: N local processes (spawned: no torch needed, the inference-only install runs
  it), gathered by the calling process.

The slices are runs of whole batches (:func:`shard_slices`): every batch holds the same images as in one process,
so every network sees the same inputs in the same batch shapes, and the merged table -- hence the submission -- is
the same, byte for byte (tested with 2 CPU processes). ``--int8 measure`` is refused (each process would decide on
its own crops).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import pandas as pd

from cytologia.errors import CytologiaInputError

if TYPE_CHECKING:
    from cytologia.predict import PredictJob
    from cytologia.runtime.inference import PipelineResult

log = logging.getLogger(__name__)


def shard_slices(n_images: int, batch_size: int, world: int) -> list[slice]:
    """``world`` contiguous slices of ``n_images`` images, each a run of whole batches of ``batch_size`` (the last
    batch may be short), as even as whole batches allow; a shard may be empty when there are fewer batches."""
    if world < 1 or batch_size < 1:
        raise CytologiaInputError(f"shards ({world}) and batch size ({batch_size}) must be >= 1")
    n_batches = -(-n_images // batch_size)
    bounds = [r * n_batches // world for r in range(world + 1)]
    return [
        slice(min(bounds[r] * batch_size, n_images), min(bounds[r + 1] * batch_size, n_images)) for r in range(world)
    ]


def merge_results(parts: list[PipelineResult], wall_seconds: float, mode: str) -> PipelineResult:
    """The results of consecutive slices as one :class:`~cytologia.runtime.inference.PipelineResult` (tables in
    slice order: the table one process makes)."""
    from cytologia.runtime.inference import PipelineResult

    filled = [p.boxes for p in parts if len(p.boxes)]  # an empty slice's table has object columns: left out
    boxes = pd.concat(filled, ignore_index=True) if filled else parts[0].boxes
    sizes, problems, names, timings = {}, {}, [], []
    for p in parts:
        sizes.update(p.sizes)
        problems.update(p.problems)
        names += p.names
        timings += p.timings
    info = {**next((p.info for p in parts if p.names), parts[0].info), "shards": len(parts), "shard_mode": mode}
    info["shard_seconds"] = [round(p.wall_seconds, 3) for p in parts]
    return PipelineResult(boxes, sizes, timings, wall_seconds, info, problems, names)


def predict_sharded(job: PredictJob, shards: int, rank: int, world: int) -> PipelineResult | None:
    """Predict ``job`` in ``shards`` local processes (``world`` == 1) or as rank ``rank`` of a ``torchrun`` group of
    ``world``; returns the merged result (None on a rank other than 0)."""
    start = time.perf_counter()
    if world > 1:
        if shards > 1:
            raise CytologiaInputError("--shards is for one process; under torchrun every rank is already a shard")
        return _torchrun(job, rank, world, start)
    return _local(job, shards, start)


def _run_part(job: PredictJob, part: slice, progress: bool | None) -> PipelineResult:
    return job.run(part, progress=progress)[0]


def _local(job: PredictJob, shards: int, start: float) -> PipelineResult:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    slices = shard_slices(len(job.paths), int(job.pipeline["batch_size"]), shards)
    if job.pipeline.get("threads") is None:  # the cores shared out, not each process taking them all
        job = replace(job, pipeline={**job.pipeline, "threads": max(1, (os.cpu_count() or 1) // shards)})
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's ONNX Runtime / OpenMP thread state
    with ProcessPoolExecutor(max_workers=shards, mp_context=ctx) as pool:
        progress = job.predict.get("progress")
        futures = [pool.submit(_run_part, job, part, progress if r == 0 else False) for r, part in enumerate(slices)]
        parts = [f.result() for f in futures]
    return merge_results(parts, time.perf_counter() - start, "processes")


def _torchrun(job: PredictJob, rank: int, world: int, start: float) -> PipelineResult | None:
    try:
        import torch.distributed as dist
    except ImportError:
        raise CytologiaInputError(
            f"WORLD_SIZE={world}: a torchrun launch needs torch; without it use cytologia predict --shards N"
        ) from None
    local = os.environ.get("LOCAL_RANK")
    if job.pipeline.get("device") in ("auto", "cuda", "tensorrt") and local is not None:
        _narrow_gpus(int(local))
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")  # torchrun's env:// rendezvous; gloo gathers Python objects on any node
    try:
        part = shard_slices(len(job.paths), int(job.pipeline["batch_size"]), world)[rank]
        result = _run_part(job, part, job.predict.get("progress") if rank == 0 else False)
        gathered: list[PipelineResult] | None = [result] * world if rank == 0 else None
        dist.gather_object(result, gathered, dst=0)
    finally:
        if own:
            dist.destroy_process_group()
    if rank != 0:
        log.info("rank %d/%d: %d images predicted, sent to rank 0", rank, world, len(result.names))
        return None
    assert gathered is not None
    return merge_results(gathered, time.perf_counter() - start, f"torchrun, {world} ranks")


def _narrow_gpus(local_rank: int) -> None:
    """Make this rank's GPU the only one its sessions see: the ``local_rank``-th of ``CUDA_VISIBLE_DEVICES`` (or of
    all GPUs). Done before any CUDA context exists; one GPU per rank, as torchrun's ``--nproc_per_node`` = GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v for v in visible.split(",") if v.strip()] if visible else None
    if ids is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank)
    elif local_rank < len(ids):
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[local_rank]
    else:
        raise CytologiaInputError(f"LOCAL_RANK {local_rank}: only {len(ids)} GPU(s) in CUDA_VISIBLE_DEVICES={visible}")
