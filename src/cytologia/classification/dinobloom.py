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
and the shapes match exactly. The model's input size is fixed when it is built; at another size the position
embedding is resampled once, when the weights load, by DINOv2's own rule (:func:`resample_pos_embed_dinov2`, a
port of ``DinoVisionTransformer.interpolate_pos_encoding``: bicubic, no antialiasing, scale factor
``(grid + 0.1) / 16``), so the features equal what Meta's code computes at that size. timm's own resampling
(``resample_abs_pos_embed``: antialiased, to an exact output size) samples other positions: a few 1e-3 in the
patch tokens at 112 and 448 px with DinoBloom's smooth embedding, far more with a rough one.
Everything else loads strictly: an unknown key or a wrong shape is an error naming it. The model's classification
head is new (DinoBloom has none) and starts at timm's init.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn
from torch.nn import functional as F

from cytologia.classification.weight_files import (
    head_prefixes,
    read_state_dict,
    strip_wrapper_prefixes,
    unwrap_state_dict,
)
from cytologia.errors import CytologiaInputError
from cytologia.weights import LoadReport, load_state_dict_checked

log = logging.getLogger(__name__)

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
DINOV2_INTERPOLATE_OFFSET = 0.1  # DINOv2's ``interpolate_offset`` (its default, used by DinoBloom)
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


def resample_pos_embed_dinov2(
    pos_embed: torch.Tensor,
    grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    offset: float = DINOV2_INTERPOLATE_OFFSET,
) -> torch.Tensor:
    """``pos_embed`` (1, prefix + M * M, D) for a (rows, cols) patch ``grid``, as DINOv2's ``interpolate_pos_encoding``
    computes it: unchanged when the grid is M x M; otherwise the M x M grid is resized (float32, bicubic, no
    antialiasing) with the scale factors ``(rows + offset) / M`` and ``(cols + offset) / M`` -- a scale factor, not an
    output size, so that the sampling positions are DINOv2's -- to rows x cols. The prefix (class) token's embedding
    is kept; the result has ``pos_embed``'s dtype.

    DINOv2 takes images of whole patches only; for an H x W image whose sides are not multiples of the patch, timm's
    patch embedding (and so ``grid``) covers the top-left ``H // patch`` x ``W // patch`` patches, as DINOv2 would on
    that crop."""
    rows, cols = (int(v) for v in grid)
    n = pos_embed.shape[1] - num_prefix_tokens if pos_embed.dim() == 3 else -1
    side = math.isqrt(n) if n > 0 else 0
    if side * side != n or rows < 1 or cols < 1:
        raise CytologiaInputError(
            f"pos_embed {tuple(pos_embed.shape)} for a {rows}x{cols} grid: expected (1, {num_prefix_tokens} + M * M, D)"
            " (a square grid) and a grid of at least one patch"
        )
    if (rows, cols) == (side, side):
        return pos_embed
    dim = pos_embed.shape[2]
    patches = pos_embed[:, num_prefix_tokens:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = (float(rows + offset) / side, float(cols + offset) / side)
    patches = F.interpolate(patches, scale_factor=scale, mode="bicubic", antialias=False)
    if tuple(patches.shape[-2:]) != (rows, cols):  # floor(M * (rows + offset) / M) == rows for offset in [0, 1)
        raise CytologiaInputError(f"offset {offset}: resized grid {tuple(patches.shape[-2:])} is not {rows}x{cols}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :num_prefix_tokens], patches], dim=1)


def fit_pos_embed_dinov2(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint", *, square_grid: bool = False
) -> dict[str, torch.Tensor]:
    """``state`` with its ``pos_embed`` resampled to ``model``'s patch grid by :func:`resample_pos_embed_dinov2`.

    ``square_grid``: the file's grid is known to be square (a DinoBloom / DINOv2 checkpoint), so it is resampled
    even when the token count matches the model's (16 x 16 into an 8 x 32 model). Otherwise (a plain state dict, e.g.
    this model fine-tuned) an embedding of the model's own shape is kept as it is. Other mismatches are left for the
    strict check, which names them."""
    theirs = state.get("pos_embed")
    ours = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if theirs is None or not isinstance(ours, torch.Tensor) or grid is None or theirs.dim() != 3:
        return state
    if theirs.shape[2] != ours.shape[2] or (theirs.shape == ours.shape and not square_grid):
        return state
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = math.isqrt(max(theirs.shape[1] - prefix, 0))
    if side * side != theirs.shape[1] - prefix:
        return state  # not a square grid: the strict check reports the shape
    out = dict(state)
    out["pos_embed"] = resample_pos_embed_dinov2(theirs, tuple(grid), prefix)
    if out["pos_embed"] is not theirs:
        log.info(
            "%s: pos_embed resampled (DINOv2's rule) from a %dx%d to a %dx%d patch grid", source, side, side, *grid
        )
    return out


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
    timm-format state dict (e.g. a fine-tuned DinoBloom classifier). The position embedding is resampled to the
    model's input size by DINOv2's rule (:func:`fit_pos_embed_dinov2`). Strict; the head is skipped when its shape
    differs or the file has none."""
    if Path(path).suffix == ".safetensors":
        state = strip_wrapper_prefixes(read_state_dict(path), model)
        state = fit_pos_embed_dinov2(state, model, str(path))
        return load_state_dict_checked(model, state, skip_mismatched=head_prefixes(model), source=str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors of all kinds
        raise CytologiaInputError(f"{path}: cannot read as a weights-only torch file ({err})") from None
    teacher = isinstance(obj, Mapping) and "teacher" in obj
    if teacher:
        state = dinobloom_state_dict(obj, str(path))
    else:
        state = strip_wrapper_prefixes(unwrap_state_dict(obj, str(path)), model)
    state = fit_pos_embed_dinov2(state, model, str(path), square_grid=teacher)
    return load_state_dict_checked(model, state, skip_mismatched=head_prefixes(model), source=str(path))
