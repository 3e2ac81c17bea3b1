"""DinoBloom: DINOv2 ViTs pretrained on blood-cell images (Koch et al. 2024), read into timm's ViT.

The public checkpoints (``DinoBloom-S.pth``, ``-B``, ``-L`` on the MarrLab/DinoBloom Hugging Face page) are DINOv2
training checkpoints: a dict whose ``teacher`` entry is the teacher's state dict, with keys ``backbone.*`` (the ViT),
``dino_head.*`` and ``ibot_head.*`` (the self-supervision heads). The backbone keys are DINOv2's own names, which
are timm's names for ``vit_*_patch14_dinov2`` apart from:

- ``mask_token`` (the masked-image-modelling token, unused outside training; timm has no such parameter): dropped;
- ``blocks.<chunk>.<i>.*`` when trained with FSDP block chunks: flattened to ``blocks.<i>.*``;
- ``mlp.w12`` / ``mlp.w3`` (SwiGLU, the giant model only): renamed ``mlp.fc1`` / ``mlp.fc2`` as timm does.

DINOv2 was trained at 224 px with 14 px patches: the checkpoint's ``pos_embed`` is (1, 1 + 16 * 16, D) = (1, 257, D).
timm's ``vit_*_patch14_dinov2`` defaults to 518 px (37 x 37 patches), so the model is built with ``img_size=224``
and the shapes match exactly; at another size the position embedding is resampled bicubically (timm's
``resample_abs_pos_embed``; DINOv2's own runtime interpolation differs slightly, with its 0.1 offset). Everything
else loads strictly: an unknown key or a wrong shape is an error naming it. The model's classification head is
new (DinoBloom has none) and starts at timm's init.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cytologia.data.errors import CytologiaInputError
from cytologia.weights import LoadReport, load_state_dict_checked

DINOBLOOM_ARCH: dict[str, str] = {
    "dinobloom_s": "vit_small_patch14_dinov2",
    "dinobloom_b": "vit_base_patch14_dinov2",
    "dinobloom_l": "vit_large_patch14_dinov2",
}
DINOBLOOM_FILES: dict[str, str] = {  # file names of the public release, for messages and docs
    "dinobloom_s": "DinoBloom-S.pth",
    "dinobloom_b": "DinoBloom-B.pth",
    "dinobloom_l": "DinoBloom-L.pth",
}
DINOBLOOM_IMG_SIZE = 224  # DINOv2's training size: 16 x 16 patches of 14 px
_DROPPED_HEADS = ("dino_head.", "ibot_head.")
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")
_SWIGLU = re.compile(r"^(blocks\.\d+\.mlp\.)(w12|w3)\.")


def create_dinobloom(
    variant: str, num_classes: int, img_size: int = DINOBLOOM_IMG_SIZE, drop_path: float = 0.0, **kwargs: Any
) -> nn.Module:
    """timm's ``vit_{small,base,large}_patch14_dinov2`` for DinoBloom ``variant`` at ``img_size``, random init."""
    if variant not in DINOBLOOM_ARCH:
        raise CytologiaInputError(f"unknown DinoBloom variant {variant!r}; valid: {', '.join(DINOBLOOM_ARCH)}")
    if kwargs.pop("pretrained", False):
        raise CytologiaInputError("pretrained=True would download weights: pass the DinoBloom file as weights=")
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    return timm.create_model(
        DINOBLOOM_ARCH[variant], pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
    )


def dinobloom_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The timm state dict of a DinoBloom checkpoint's teacher backbone (see the module docstring)."""
    teacher = checkpoint.get("teacher") if isinstance(checkpoint, Mapping) else None
    if not isinstance(teacher, Mapping):
        keys = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CytologiaInputError(f"{source}: not a DinoBloom checkpoint (no 'teacher' dict; top-level keys: {keys})")
    out: dict[str, torch.Tensor] = {}
    for key, value in teacher.items():
        if key.startswith(_DROPPED_HEADS):
            continue
        if not key.startswith("backbone."):
            raise CytologiaInputError(
                f"{source}: unexpected teacher key {key!r} (expected backbone.*, dino_head.*, ibot_head.*)"
            )
        if not isinstance(value, torch.Tensor):
            raise CytologiaInputError(f"{source}: teacher key {key!r} is a {type(value).__name__}, not a tensor")
        name = key[len("backbone.") :]
        if name == "mask_token":
            continue
        name = _SWIGLU.sub(
            lambda m: m.group(1) + ("fc1." if m.group(2) == "w12" else "fc2."), _CHUNKED.sub(r"blocks.\1.", name)
        )
        if name in out:
            raise CytologiaInputError(f"{source}: two teacher keys map to {name!r}")
        out[name] = value
    if not out:
        raise CytologiaInputError(f"{source}: the teacher dict holds no backbone.* tensors")
    return out


def load_dinobloom_weights(model: nn.Module, path: Path) -> LoadReport:
    """Load a (manifest-verified) file into a DinoBloom model: a DinoBloom checkpoint (``teacher`` dict), or a plain
    timm-format state dict (e.g. a fine-tuned DinoBloom classifier). Strict; the head is skipped when its shape
    differs or the file has none."""
    from cytologia.classification.models import (
        adapt_pos_embed,
        head_prefixes,
        read_state_dict,
        strip_wrapper_prefixes,
        unwrap_state_dict,
    )

    if Path(path).suffix == ".safetensors":
        state = strip_wrapper_prefixes(read_state_dict(path), model)
        state = adapt_pos_embed(state, model, str(path))
        return load_state_dict_checked(model, state, skip_mismatched=head_prefixes(model), source=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of all kinds
        raise CytologiaInputError(f"{path}: cannot read as a weights-only torch file ({err})") from None
    if isinstance(obj, Mapping) and "teacher" in obj:
        state = dinobloom_state_dict(obj, str(path))
    else:
        state = strip_wrapper_prefixes(unwrap_state_dict(obj, str(path)), model)
    state = adapt_pos_embed(state, model, str(path))
    return load_state_dict_checked(model, state, skip_mismatched=head_prefixes(model), source=str(path))
