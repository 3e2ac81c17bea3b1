"""The blend rule (``logit_mean``), the same in tuning (:mod:`cytologia.ensemble.tune`) and at prediction time.

Each cell member contributes the first 23 columns of its logits (a member trained with a 24th "background" label loses
it: every challenge box needs a cell class), the members' logits are summed with weights on the simplex (``w >= 0``,
``sum w = 1``: the blend keeps the scale of one member's logits), an optional per-class bias is added, and the softmax
gives the probabilities. When the ensemble has a multi-label full-image member, its per-class sigmoids (normalised to
sum 1) are mixed in on **single-cell images** only, ``p = (1 - a) p_cells + a p_image`` -- the 1st place's rule; on a
multi-cell image a full-image label cannot say which cell it belongs to.
"""

from __future__ import annotations

import numpy as np

from cytologia.ensemble.schema import N_CLASSES

_EPS = 1e-12


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax (float32 input stays float32: tuning evaluates it hundreds of times; else float64)."""
    z = np.asarray(z)
    z = z if z.dtype == np.float32 else z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    e /= e.sum(axis=-1, keepdims=True)
    return e


def multilabel_probabilities(logits: np.ndarray) -> np.ndarray:
    """Per-class sigmoids of a multi-label model's first 23 logits, normalised to sum 1 per row."""
    z = np.asarray(logits, dtype=np.float64)[..., :N_CLASSES]
    s = 1.0 / (1.0 + np.exp(-z))
    return s / np.maximum(s.sum(axis=-1, keepdims=True), _EPS)


def blend_logits(member_logits: np.ndarray, weights: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``sum_m w_m z_m[:, :23] + bias``: ``member_logits`` is (M, n, K >= 23), ``weights`` (M,) on the simplex."""
    logits = np.asarray(member_logits)[..., :N_CLASSES]
    # float32 logits stay float32 (a matrix-vector product, no float64 copy of the whole stack)
    dtype = np.float32 if logits.dtype == np.float32 else np.float64
    z = np.tensordot(np.asarray(weights, dtype), logits, axes=1)
    return z + np.asarray(bias, dtype) if bias is not None else z


def blend_probabilities(
    member_logits: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray | None = None,
    image_prob: np.ndarray | None = None,
    single_cell: np.ndarray | None = None,
    multilabel_weight: float = 0.0,
) -> np.ndarray:
    """The ensemble's class probabilities (n, 23); see the module docstring. ``image_prob`` (n, 23) is the
    multi-label member's :func:`multilabel_probabilities` of each box's image (NaN rows: none), mixed in where
    ``single_cell`` is true."""
    p = softmax(blend_logits(member_logits, weights, bias))
    if image_prob is not None and multilabel_weight > 0:
        use = np.isfinite(image_prob).all(axis=1)
        if single_cell is not None:
            use &= np.asarray(single_cell, dtype=bool)
        p[use] = (1.0 - multilabel_weight) * p[use] + multilabel_weight * image_prob[use]
    return p
