"""Losses: focal loss against hand computations, hard and soft targets, label smoothing, the config's names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cytologia.classification.losses import (
    LOSS_NAMES,
    FocalLoss,
    MultiLabelBCELoss,
    MultiLabelFocalLoss,
    SoftCrossEntropyLoss,
    create_loss,
)
from cytologia.config import LOSSES
from cytologia.errors import CytologiaInputError


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_focal_loss_by_hand() -> None:
    logits = [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]
    targets = [0, 2]
    alpha = [0.25, 1.0, 2.0]
    gamma = 2.0
    expected = []
    for row, t in zip(logits, targets):
        p = _softmax(row)[t]
        expected.append(-alpha[t] * (1 - p) ** gamma * math.log(p))
    loss = FocalLoss(gamma=gamma, alpha=alpha)(torch.tensor(logits), torch.tensor(targets))
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    # The numbers: p_y = 0.84379 and 0.14024, so (0.25 * 0.15621^2 * 0.16985 + 2 * 0.85976^2 * 1.96437) / 2.
    assert loss.item() == pytest.approx((0.25 * 0.15621**2 * 0.16985 + 2 * 0.85976**2 * 1.96437) / 2, rel=1e-4)


def test_focal_loss_soft_targets_and_smoothing_by_hand() -> None:
    logits = [1.0, -0.5, 0.25, 0.0]
    q = [0.6, 0.4, 0.0, 0.0]
    eps, k, gamma = 0.1, 4, 1.5
    qs = [v * (1 - eps) + eps / k for v in q]
    p = _softmax(logits)
    expected = -sum(qi * (1 - pi) ** gamma * math.log(pi) for qi, pi in zip(qs, p))
    loss = FocalLoss(gamma=gamma, label_smoothing=eps)(torch.tensor([logits]), torch.tensor([q]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    for eps in (0.0, 0.1):
        ce = F.cross_entropy(logits, y, label_smoothing=eps)
        assert FocalLoss(gamma=0.0, label_smoothing=eps)(logits, y).item() == pytest.approx(ce.item(), rel=1e-5)
        assert SoftCrossEntropyLoss(label_smoothing=eps)(logits, y).item() == pytest.approx(ce.item(), rel=1e-6)
    # focusing lowers the loss of every sample (all p < 1)
    per_sample = FocalLoss(gamma=2.0, reduction="none")(logits, y)
    assert (per_sample < F.cross_entropy(logits, y, reduction="none")).all()
    assert FocalLoss(reduction="sum")(logits, y).item() == pytest.approx(per_sample.sum().item(), rel=1e-6)


def test_soft_one_hot_equals_hard_targets() -> None:
    torch.manual_seed(1)
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    q = F.one_hot(y, 4).float()
    weight = [1.0, 2.0, 0.5, 1.0]
    for loss in (
        FocalLoss(label_smoothing=0.1, alpha=weight),
        SoftCrossEntropyLoss(label_smoothing=0.1, weight=weight),
    ):
        assert loss(logits, q).item() == pytest.approx(loss(logits, y).item(), rel=1e-5)
    # Weighted cross-entropy is a plain batch mean of w_y * CE_i (torch's hard-target mean divides by sum w_y).
    per_sample = F.cross_entropy(logits, y, reduction="none")
    by_hand = (torch.tensor(weight)[y] * per_sample).mean()
    assert SoftCrossEntropyLoss(weight=weight)(logits, y).item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_multilabel_focal_by_hand() -> None:
    x = [[1.0, -2.0], [0.0, 3.0]]
    y = [[1.0, 0.0], [1.0, 1.0]]
    gamma, a = 2.0, 0.25
    terms = []
    for xr, yr in zip(x, y):
        for xi, yi in zip(xr, yr):
            s = 1 / (1 + math.exp(-xi))
            if yi:
                terms.append(-a * (1 - s) ** gamma * math.log(s))
            else:
                terms.append(-(1 - a) * s**gamma * math.log(1 - s))
    loss = MultiLabelFocalLoss(gamma=gamma, alpha=a)(torch.tensor(x), torch.tensor(y))
    assert loss.item() == pytest.approx(sum(terms) / 4, rel=1e-6)


def test_multilabel_gamma_zero_is_bce_and_index_targets() -> None:
    torch.manual_seed(2)
    logits = torch.randn(5, 24)
    y = (torch.rand(5, 24) > 0.8).float()
    bce = F.binary_cross_entropy_with_logits(logits, y)
    assert MultiLabelFocalLoss(gamma=0.0)(logits, y).item() == pytest.approx(bce.item(), rel=1e-6)
    assert MultiLabelBCELoss()(logits, y).item() == pytest.approx(bce.item(), rel=1e-6)
    smoothed = F.binary_cross_entropy_with_logits(logits, y * 0.9 + 0.05)
    assert MultiLabelBCELoss(label_smoothing=0.1)(logits, y).item() == pytest.approx(smoothed.item(), rel=1e-6)
    idx = torch.tensor([0, 3, 23, 1, 1])
    one_hot = F.one_hot(idx, 24).float()
    assert MultiLabelBCELoss()(logits, idx).item() == pytest.approx(MultiLabelBCELoss()(logits, one_hot).item())


def test_create_loss_names_match_the_config() -> None:
    assert set(LOSS_NAMES) == set(LOSSES)
    torch.manual_seed(3)
    logits = torch.randn(4, 24, requires_grad=True)
    y = torch.tensor([0, 5, 23, 7])
    for name in LOSS_NAMES:
        loss = create_loss(name, 24, label_smoothing=0.1, gamma=2.0)
        value = loss(logits, y)
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value) and torch.isfinite(logits.grad).all()
        logits.grad = None
    assert isinstance(create_loss("focal", 3, alpha=[1, 2, 3]), FocalLoss)
    with pytest.raises(CytologiaInputError, match="unknown loss"):
        create_loss("hinge", 3)
    with pytest.raises(CytologiaInputError, match="alpha"):
        create_loss("focal", 3, alpha=[1.0, 2.0])
    with pytest.raises(CytologiaInputError, match="label_smoothing"):
        create_loss("cross_entropy", 3, label_smoothing=1.0)
    with pytest.raises(CytologiaInputError, match="0..2"):
        create_loss("focal", 3)(torch.randn(2, 3), torch.tensor([0, 3]))
