"""Weight-file primitives shared by the classifier loaders: read a state dict, unwrap a checkpoint, strip wrapper
prefixes, name the classification head.

Both :mod:`cytologia.classification.models` (timm-format files) and :mod:`cytologia.classification.dinobloom`
(DinoBloom checkpoints) build on these; this module imports neither, so the two do not import each other in a
cycle (``models`` imports ``dinobloom`` to register DinoBloom S/B/L).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cytologia.errors import CytologiaInputError


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weight file: ``.safetensors``, or a torch file read with ``weights_only=True`` (no code
    runs). A checkpoint dict is unwrapped through its ``state_dict`` / ``model`` / ``model_state_dict`` entry."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise CytologiaInputError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of all kinds
        raise CytologiaInputError(f"{path}: cannot read as a weights-only torch file ({err})") from None
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Descend through ``state_dict`` / ``model`` / ``model_state_dict`` entries to a dict of tensors."""
    for _ in range(4):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        inner = next(
            (obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)), None
        )
        if inner is None:
            break
        obj = inner
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CytologiaInputError(f"{source}: no state dict of tensors found (top-level keys: {keys})")


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Remove a ``module.`` (DDP), ``_orig_mod.`` (torch.compile) or ``model.`` (Lightning) prefix carried by every
    key of ``state`` when the model's own keys do not have it."""
    own = list(model.state_dict())
    state = dict(state)
    changed = True
    while changed and state:
        changed = False
        for prefix in ("module.", "_orig_mod.", "model."):
            if all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in own):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the classification head (timm's ``pretrained_cfg['classifier']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ("head", "fc", "classifier")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)
