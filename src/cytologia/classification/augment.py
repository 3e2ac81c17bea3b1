"""Augmentations for cell crops (albumentations 2.x) and MixUp / CutMix per batch (torch).

Albumentations 2.x only *warns* about an argument it does not know (a 1.4 name such as ``var_limit`` or
``max_holes``) and then ignores it, so a misspelt argument would silently fall back to the default:
:func:`build_transforms` checks every transform's ``invalid_args`` and raises instead. (``Compose(strict=True)`` would
do the same but also rejects the ``cell_box`` data key that :class:`BBoxAwareRotate` reads.)

Stain colour carries class information (eosinophil granules, basophil granules), so hue/saturation jitter is off
by default. Geometric transforms keep the cell inside the crop: flips and 90-degree rotations map the square crop
onto itself, the affine jitter is bounded by the margin (16 px around a ~100 px box is ~12 % of the crop per side),
and :class:`BBoxAwareRotate` rotates the cell alone, on its own background, shrinking it only when the rotated
cell would not fit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.core.transforms_interface import BaseTransformInitSchema
from pydantic import Field

from cytologia.classification.crops import border_colour
from cytologia.errors import CytologiaInputError

STRENGTHS: tuple[str, ...] = ("light", "default", "strong")
# Mean ImageNet colour in 0..255 RGB: dropout holes filled with it are ~0 after normalisation.
_HOLE_FILL = (124, 116, 104)
# Per-strength magnitudes. translate is a fraction of the crop side; it stays below the ~0.12 a 16 px margin leaves
# around a 100 px box, with the zoom included. noise_std is a fraction of 255.
_MAGNITUDE: dict[str, dict[str, Any]] = {
    "light": dict(
        scale=(0.95, 1.03),
        translate=0.02,
        bc=0.08,
        bc_p=0.3,
        noise_std=(0.005, 0.02),
        noise_p=0.0,
        holes=(1, 1),
        hole=(0.04, 0.08),
        dropout_p=0.0,
    ),
    "default": dict(
        scale=(0.9, 1.05),
        translate=0.04,
        bc=0.12,
        bc_p=0.5,
        noise_std=(0.01, 0.04),
        noise_p=0.2,
        holes=(1, 3),
        hole=(0.05, 0.12),
        dropout_p=0.3,
    ),
    "strong": dict(
        scale=(0.85, 1.08),
        translate=0.06,
        bc=0.2,
        bc_p=0.6,
        noise_std=(0.02, 0.06),
        noise_p=0.3,
        holes=(1, 6),
        hole=(0.06, 0.16),
        dropout_p=0.5,
    ),
}


# ------------------------------------------------------------------------------------------------ bbox-aware rotate
def fill_region(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` with the pixels where ``mask`` is true replaced by a smooth fill from the pixels around them.

    Push-pull fill: the unmasked pixels and their weights are averaged down an image pyramid (area resize by 2)
    until one pixel is left; going back up, each level keeps its own mean where it has data and takes the
    upsampled coarser estimate where it has none. Linear in the pixel count (~1 ms on a 224 px crop, where OpenCV's
    inpainting of a cell-sized hole takes tens of ms); a smear's background is smooth, so the blur is harmless.
    When nothing is left unmasked, the image's border colour fills it.
    """
    mask = np.asarray(mask, dtype=bool)
    out = image.copy()
    if not mask.any():
        return out
    if mask.all():
        out[mask] = border_colour(image).astype(image.dtype)
        return out
    weight = (~mask).astype(np.float32)
    values = image.astype(np.float32) * (weight[..., None] if image.ndim == 3 else weight)
    levels: list[tuple[np.ndarray, np.ndarray]] = []
    while max(weight.shape) > 1:
        levels.append((values, weight))
        size = (max(1, (weight.shape[1] + 1) // 2), max(1, (weight.shape[0] + 1) // 2))
        values = cv2.resize(values, size, interpolation=cv2.INTER_AREA)
        weight = cv2.resize(weight, size, interpolation=cv2.INTER_AREA)
    fill = values / max(float(weight.reshape(-1)[0]), 1e-6)
    for values, weight in reversed(levels[1:]):
        up = cv2.resize(fill, (weight.shape[1], weight.shape[0]), interpolation=cv2.INTER_LINEAR)
        w = np.clip(weight, 0.0, 1.0)
        if values.ndim == 3:
            w = w[..., None]
        # values are weight-premultiplied means: w * (values / w) + (1 - w) * up
        fill = values + (1.0 - w) * up.reshape(values.shape)
    # Full resolution: the weights are 0 or 1, so masked pixels simply take the upsampled estimate.
    up = cv2.resize(fill, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(image.shape)
    out[mask] = np.clip(up[mask] + 0.5, 0, 255).astype(image.dtype) if image.dtype == np.uint8 else up[mask]
    return out


def rotate_cell(
    image: np.ndarray,
    cell_box: Sequence[float] | np.ndarray,
    angle: float,
    *,
    cell_scale: float = 1.1,
    feather: float = 1.5,
) -> np.ndarray:
    """Rotate the cell of a crop by ``angle`` degrees about its box centre and paste it back on its background.

    The cell is the ellipse inscribed in ``cell_box`` enlarged by ``cell_scale`` (a little of its own background,
    so the seam falls on background), clipped to the box plus ``2 * feather`` px, with edges softened by a Gaussian
    of ``feather`` px. The area it leaves is filled from the surrounding background (:func:`fill_region`). When the
    rotated cell would cross the crop's border it is shrunk just enough to fit, so the cell always stays whole.
    """
    h, w = image.shape[:2]
    x1, y1, x2, y2 = np.clip(np.asarray(cell_box, dtype=np.float64).reshape(4), 0, [w, h, w, h])
    a, b = (x2 - x1) / 2, (y2 - y1) / 2
    if a < 1 or b < 1:  # nothing to rotate
        return image
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    mask = np.zeros((h, w), np.float32)
    # cv2.ellipse takes integer centre/axes; the shift of 4 fractional bits draws at 1/16 px precision.
    s = 16
    cv2.ellipse(
        mask,
        (round(cx * s - s / 2), round(cy * s - s / 2)),
        (round(a * cell_scale * s), round(b * cell_scale * s)),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_8,
        4,
    )
    # Clip to the box grown by 2 feather widths: a cell touches its box, and the blur must not fade its rim.
    pad = 2 * feather
    box_mask = np.zeros_like(mask)
    box_mask[max(0, math.floor(y1 - pad)) : math.ceil(y2 + pad), max(0, math.floor(x1 - pad)) : math.ceil(x2 + pad)] = 1
    mask *= box_mask
    if feather > 0:
        mask = cv2.GaussianBlur(mask, (0, 0), feather)
    background = fill_region(image, mask > 0.01)
    # Extent of the rotated cell: the tighter of the rotated ellipse's and the rotated box's half-sizes.
    t = math.radians(angle)
    c, sn = abs(math.cos(t)), abs(math.sin(t))
    ea, eb = a * cell_scale, b * cell_scale
    half_w = min(math.sqrt((ea * c) ** 2 + (eb * sn) ** 2), a * c + b * sn) + 2 * feather
    half_h = min(math.sqrt((ea * sn) ** 2 + (eb * c) ** 2), a * sn + b * c) + 2 * feather
    fit = min(1.0, cx / half_w, (w - cx) / half_w, cy / half_h, (h - cy) / half_h)
    # OpenCV's pixel centres are integers; pixel-edge centre (cx, cy) is (cx - 0.5, cy - 0.5) there.
    m = cv2.getRotationMatrix2D((cx - 0.5, cy - 0.5), angle, fit)
    alpha = cv2.warpAffine(mask, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    ys, xs = np.nonzero(alpha > 0)
    if not len(ys):
        return background
    # Composite only inside the rotated cell's bounding rectangle; elsewhere the background is already right.
    r0, r1, c0, c1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    m_local = m.copy()
    m_local[:, 2] -= (c0, r0)  # the same warp, written straight into the rectangle
    rotated = cv2.warpAffine(
        image, m_local, (int(c1 - c0), int(r1 - r0)), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )
    a = alpha[r0:r1, c0:c1]
    if image.ndim == 3:
        a = a[..., None]
    patch = background[r0:r1, c0:c1].astype(np.float32)
    patch += a * (rotated.astype(np.float32) - patch)
    out = background
    out[r0:r1, c0:c1] = np.clip(patch + 0.5, 0, 255).astype(image.dtype) if image.dtype == np.uint8 else patch
    return out


class BBoxAwareRotate(A.ImageOnlyTransform):
    """Rotate the cell alone by a random angle and paste it back on its own background (the 2nd place's trick).

    The cell box comes from the data key ``cell_box`` (x1, y1, x2, y2 in the crop's pixels; :class:`CropDataset
    <cytologia.classification.crops.CropDataset>` passes it) or, when absent, is the centre of the crop minus
    ``margin_fraction`` of its side on every side. Put it first in a pipeline: later geometric transforms do not
    update ``cell_box``. See :func:`rotate_cell`.
    """

    class InitSchema(BaseTransformInitSchema):
        limit: tuple[float, float]
        margin_fraction: float = Field(ge=0, lt=0.5)
        cell_scale: float = Field(ge=1.0, le=1.5)

    def __init__(
        self,
        limit: tuple[float, float] = (-180.0, 180.0),
        margin_fraction: float = 0.1,
        cell_scale: float = 1.1,
        p: float = 0.5,
    ) -> None:
        super().__init__(p=p)
        if limit[0] > limit[1]:
            raise CytologiaInputError(f"BBoxAwareRotate limit {limit}: low > high")
        self.limit = (float(limit[0]), float(limit[1]))
        self.margin_fraction = float(margin_fraction)
        self.cell_scale = float(cell_scale)

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        box = data.get("cell_box")
        if box is None:
            m = self.margin_fraction
            box = (m * w, m * h, (1 - m) * w, (1 - m) * h)
        return {"angle": self.py_random.uniform(*self.limit), "cell_box": np.asarray(box, dtype=np.float64)}

    def apply(
        self, img: np.ndarray, angle: float = 0.0, cell_box: np.ndarray | None = None, **params: Any
    ) -> np.ndarray:
        if cell_box is None:
            return img
        return rotate_cell(img, cell_box, angle, cell_scale=self.cell_scale)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("limit", "margin_fraction", "cell_scale")


# -------------------------------------------------------------------------------------------------------- pipelines
def build_transforms(
    img_size: int,
    train: bool,
    *,
    hue_saturation: bool = False,
    bbox_aware_p: float = 0.5,
    strength: str = "default",
) -> A.Compose:
    """The augmentation pipeline for ``img_size`` square uint8 RGB crops.

    Evaluation (``train=False``): identity (crops come at the model's size). Training: :class:`BBoxAwareRotate`
    (probability ``bbox_aware_p``), horizontal/vertical flips, 90-degree rotations, a margin-bounded affine jitter
    (isotropic zoom and shift, replicated border), light brightness/contrast, Gaussian noise, coarse dropout (holes
    of 5-12 % of ``img_size`` filled with the ImageNet mean colour), and hue/saturation only when
    ``hue_saturation``.
    ``strength`` scales the photometric and affine magnitudes: ``light``, ``default`` or ``strong``.
    """
    if strength not in STRENGTHS:
        raise CytologiaInputError(f"augmentation strength {strength!r}: must be one of {', '.join(STRENGTHS)}")
    if img_size < 8:
        raise CytologiaInputError(f"img_size={img_size}: too small for augmentation (>= 8)")
    if not 0 <= bbox_aware_p <= 1:
        raise CytologiaInputError(f"bbox_aware_p={bbox_aware_p}: must be in [0, 1]")
    if not train:
        return A.Compose([])
    g = _MAGNITUDE[strength]
    hole = tuple(max(1, round(f * img_size)) for f in g["hole"])
    t = g["translate"]
    steps: list[A.BasicTransform] = [
        BBoxAwareRotate(p=bbox_aware_p),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=1.0),
        A.Affine(
            scale=g["scale"],
            translate_percent=(-t, t),
            rotate=0.0,
            keep_ratio=True,
            # Replicate, not reflect: a reflected border mirrors the cell's edge back into the crop as a ghost.
            border_mode=cv2.BORDER_REPLICATE,
            p=0.5,
        ),
        A.RandomBrightnessContrast(brightness_limit=g["bc"], contrast_limit=g["bc"], p=g["bc_p"]),
    ]
    if hue_saturation:
        steps.append(A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=12, val_shift_limit=0, p=0.3))
    if g["noise_p"] > 0:
        steps.append(A.GaussNoise(std_range=g["noise_std"], p=g["noise_p"]))
    if g["dropout_p"] > 0:
        steps.append(
            A.CoarseDropout(
                num_holes_range=g["holes"],
                hole_height_range=hole,
                hole_width_range=hole,
                fill=_HOLE_FILL,
                p=g["dropout_p"],
            )
        )
    check_arguments(steps)
    return A.Compose(steps)


def check_arguments(transforms: Sequence[Any]) -> None:
    """Raise when an albumentations transform (or one nested in a compose) was given an argument it ignores."""
    for t in transforms:
        if getattr(t, "invalid_args", None):
            raise CytologiaInputError(
                f"{type(t).__name__}: argument(s) {', '.join(t.invalid_args)} are not valid in albumentations "
                f"{A.__version__} (1.x names are ignored there)"
            )
        if isinstance(t, A.BaseCompose):
            check_arguments(t.transforms)


# ---------------------------------------------------------------------------------------------------- mixup, cutmix
def _one_hot(targets: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    if targets.dim() == 2:
        if targets.shape[1] != num_classes:
            raise CytologiaInputError(f"soft targets have {targets.shape[1]} columns, expected {num_classes}")
        return targets.to(dtype)
    if targets.dim() != 1:
        raise CytologiaInputError(f"targets of shape {tuple(targets.shape)}: expected (B,) indices or (B, K)")
    if len(targets) and (targets.min() < 0 or targets.max() >= num_classes):
        raise CytologiaInputError(f"targets must lie in 0..{num_classes - 1}; got {targets.min()}..{targets.max()}")
    return torch.nn.functional.one_hot(targets.long(), num_classes).to(dtype)


def mixup_cutmix(
    images: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    alpha_mixup: float = 0.8,
    alpha_cutmix: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix of a batch with its reversed self (timm's ``Mixup`` in batch mode).

    ``images`` (B, C, H, W); ``targets`` class indices (B,) or probabilities (B, K). With probability ``prob`` the
    batch is mixed: CutMix with probability ``switch_prob`` (when both alphas are > 0), else MixUp, with
    ``lam ~ Beta(alpha, alpha)``; for CutMix, ``lam`` is corrected to the pasted box's actual area. Returns the
    images and soft targets (B, K) in probability space -- a cross-entropy / focal loss applies label smoothing on
    top. ``generator`` makes the draws reproducible (it seeds a NumPy generator for the Beta draw).
    """
    if images.dim() != 4 or len(images) != len(targets):
        raise CytologiaInputError(f"images {tuple(images.shape)} / targets {tuple(targets.shape)}: need (B,C,H,W), B")
    if alpha_mixup < 0 or alpha_cutmix < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
        raise CytologiaInputError("alphas must be >= 0 and prob / switch_prob in [0, 1]")
    dtype = images.dtype if images.is_floating_point() else torch.float32
    soft = _one_hot(targets, num_classes, dtype).to(images.device)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    rng = np.random.default_rng(seed)
    if len(images) < 2 or (alpha_mixup == 0 and alpha_cutmix == 0) or rng.random() >= prob:
        return images, soft
    use_cutmix = alpha_cutmix > 0 and (alpha_mixup == 0 or rng.random() < switch_prob)
    lam = float(rng.beta(alpha_cutmix, alpha_cutmix) if use_cutmix else rng.beta(alpha_mixup, alpha_mixup))
    flipped = images.flip(0)
    if use_cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y1, y2 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x1, x2 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = flipped[:, :, y1:y2, x1:x2]
        lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    else:
        mixed = images * lam + flipped * (1.0 - lam)
    return mixed, soft * lam + soft.flip(0) * (1.0 - lam)
