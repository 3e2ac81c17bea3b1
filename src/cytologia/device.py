"""One device resolver: a device setting -> the torch device it means, with thin adapters for the libraries that
take another form.

``auto`` is the first CUDA device when torch sees one, else the CPU. :func:`resolve_device` also takes ``cpu``,
``mps``, a CUDA index (``0``, ``1``), ``cuda`` / ``cuda:1``, and a list (``0,1``: the first one, with a warning --
these callers run on one device). Adapters: :func:`ultralytics_device` (ultralytics' strings: ``"cpu"``, ``"0"``,
``"0,1"``), :func:`lightning_accelerator` (Lightning's accelerator names). torch is imported only when called.
"""

from __future__ import annotations

import logging
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
