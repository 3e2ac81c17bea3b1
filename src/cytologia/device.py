"""One device resolver: a device setting -> the torch device it means, with thin adapters for the libraries that
take another form.

``auto`` is the first CUDA device when torch sees one, else the CPU. :func:`resolve_device` also takes ``cpu``,
``mps``, a CUDA index (``0``, ``1``), ``cuda`` / ``cuda:1``, and a list (``0,1``: the first one, with a warning --
these callers run on one device). Adapters: :func:`ultralytics_device` (ultralytics' strings: ``"cpu"``, ``"0"``,
``"0,1"``), :func:`lightning_accelerator` (Lightning's accelerator names), :func:`lightning_num_nodes` (the nodes of a
torchrun / SLURM launch). torch is imported only when called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cytologia.errors import CytologiaInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

AUTO = "auto"


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    import torch

    return torch.cuda.is_available()


def resolve_device(spec: str = AUTO, *, key: str = "device") -> torch.device:
    """The torch device of a setting: ``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ``"1"`` ->
    ``cuda:1``; ``"0,1"`` -> the first (warned). ``key`` names the setting in errors: one that is not a device, or a
    CUDA device on a machine without CUDA, is a :class:`CytologiaInputError`."""
    import torch

    if spec == AUTO:
        return torch.device("cuda:0" if cuda_available() else "cpu")
    first = str(spec).split(",")[0].strip()
    if "," in str(spec):
        log.warning("%s=%r: one device is used, %s", key, spec, first)
    if first.isdigit():
        first = f"cuda:{first}"
    try:
        dev = torch.device(first)
    except RuntimeError as err:
        raise CytologiaInputError(f"{key}={spec!r} is not a device ({err})") from None
    if dev.type == "cuda" and not cuda_available():
        raise CytologiaInputError(f"{key}={spec!r}: CUDA is not available on this machine")
    return dev


def ultralytics_device(spec: str = AUTO) -> str:
    """ultralytics' device string: ``auto`` -> ``"0"`` (the first CUDA device) or ``"cpu"``, as :func:`resolve_device`
    decides; any other value is passed as written (ultralytics parses ``cpu``, ``0``, ``0,1``, ``mps`` itself)."""
    if spec != AUTO:
        return spec
    dev = resolve_device(AUTO)
    return "cpu" if dev.type == "cpu" else str(dev.index)


def lightning_accelerator(name: str = AUTO, *, key: str = "trainer.accelerator") -> str:
    """Lightning's accelerator: ``auto`` -> ``"cuda"`` or ``"cpu"``, as :func:`resolve_device` decides; ``cuda`` /
    ``gpu`` on a machine without CUDA is a :class:`CytologiaInputError`; other names pass through."""
    if name == AUTO:
        return resolve_device(AUTO).type
    if name in ("cuda", "gpu") and not cuda_available():
        raise CytologiaInputError(f"config key {key}={name}: no CUDA device is available")
    return name


def lightning_num_nodes(environ: Mapping[str, str] | None = None) -> int:
    """Lightning's ``num_nodes`` for the way this process was launched: under ``torchrun`` (``WORLD_SIZE`` and
    ``LOCAL_WORLD_SIZE`` exported) the number of nodes is their ratio; in a SLURM ``srun`` task of a multi-task job,
    ``SLURM_NNODES``; otherwise 1 (one machine: Lightning starts the processes itself). ``trainer.devices`` must then
    be the processes per node. An inconsistent torchrun environment is a :class:`CytologiaInputError`."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        try:
            world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        except ValueError:
            raise CytologiaInputError(
                f"WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_WORLD_SIZE={env['LOCAL_WORLD_SIZE']!r}: not integers"
            ) from None
        if local < 1 or world < local or world % local:
            raise CytologiaInputError(
                f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}: every node must run as many "
                "processes (torchrun --nproc_per_node)"
            )
        return world // local
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS") or 1) > 1:
        return int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or 1)
    return 1
