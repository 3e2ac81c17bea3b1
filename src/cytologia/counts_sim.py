"""Simulated smears from a calibrated classifier, to measure the differential count's intervals and flags without
training anything (``scripts/eval_calibration.py``, ``tests/test_counts.py``).

A smear is a vector of class shares ``pi`` drawn around a profile (:data:`PROFILES`: normal blood, blast-rich,
lymphoma-rich, borderline blasts; every class keeps a small share, so a true share is never exactly 0). Its ``n``
cells draw their class from ``pi``; each cell's classifier output is the exact Bayes posterior of a Gaussian model --
features ``x ~ N(separation * e_y, I)`` in 23 dimensions, the hard pairs of
:data:`cytologia.data.schema.HARD_GROUPS` closer together -- under the *training* class shares ``prior``:
``p(y | x) ∝ prior_y N(x; mu_y, I)``. So the probabilities are calibrated for data with the training mix, as a
temperature-scaled classifier is on out-of-fold boxes, and are shifted on a smear whose mix differs -- the situation
the count's prior shift corrects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cytologia.data.schema import CLASSES, HARD_GROUPS

K = len(CLASSES)
IDX = {c: i for i, c in enumerate(CLASSES)}
BLASTS = ("B", "MBL", "LyB", "MoB")
LYMPHOMA = ("LF", "LLC", "LM", "LZMG", "SS")
FLOOR = 0.002  # every class's share before normalising: rare cells exist in any smear
CONCENTRATION = 60.0  # Dirichlet concentration of a smear around its profile (higher: closer to the profile)
HARD_PAIR_SHARE = 0.5  # the class means of a hard group share this fraction of their direction (closer together)

# Mean shares (before the floor): normal adult blood (neutrophils ~60 %, lymphocytes ~30 %, monocytes ~6 %,
# eosinophils ~3 %, basophils ~1 %); a blast-rich smear (acute leukaemia); a lymphoma-rich smear (leukaemic lymphoma).
PROFILES: dict[str, dict[str, float]] = {
    "normal": {"PNN": 0.58, "LY": 0.28, "MO": 0.06, "EO": 0.03, "BA": 0.01, "LGL": 0.02, "Thromb": 0.01, "Lysee": 0.01},
    "blasts": {"PNN": 0.35, "LY": 0.2, "MO": 0.05, "B": 0.12, "MBL": 0.12, "MoB": 0.04, "LyB": 0.04, "Lysee": 0.02},
    "lymphoma": {"PNN": 0.35, "LY": 0.15, "MO": 0.04, "LLC": 0.2, "LM": 0.08, "LZMG": 0.08, "LF": 0.05, "SS": 0.02},
    # borderline: blasts around the usual 5 % flag threshold, so a flag's sensitivity and specificity mean something
    "borderline": {"PNN": 0.55, "LY": 0.28, "MO": 0.06, "EO": 0.03, "B": 0.02, "MBL": 0.02, "MoB": 0.005, "LyB": 0.005},
}


@dataclass
class SimSmear:
    """One simulated smear: its profile, true shares, the cells' true classes and calibrated probabilities."""

    profile: str
    shares: np.ndarray  # (K,)
    labels: np.ndarray  # (n,)
    probs: np.ndarray  # (n, K)


def class_means(separation: float) -> np.ndarray:
    """(K, K) class means: ``separation * e_y``, the members of a hard group pulled towards their group's mean."""
    mu = np.eye(K)
    for group in HARD_GROUPS:
        idx = [IDX[c] for c in group]
        centre = mu[idx].mean(axis=0)
        mu[idx] = (1 - HARD_PAIR_SHARE) * mu[idx] + HARD_PAIR_SHARE * centre
    return separation * mu


def posterior(x: np.ndarray, mu: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Bayes posterior ``p(y | x) ∝ prior_y exp(-|x - mu_y|^2 / 2)`` (n, K)."""
    z = x @ mu.T - 0.5 * (mu**2).sum(axis=1) + np.log(prior)
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def draw_shares(rng: np.random.Generator, profile: str) -> np.ndarray:
    """A smear's class shares around ``profile``."""
    mean = np.full(K, FLOOR)
    for c, v in PROFILES[profile].items():
        mean[IDX[c]] += v
    mean /= mean.sum()
    return rng.dirichlet(CONCENTRATION * mean)


def simulate_smear(
    rng: np.random.Generator, profile: str, n_cells: int, prior: np.ndarray, separation: float = 3.0
) -> SimSmear:
    """A smear of ``n_cells`` cells of ``profile`` with calibrated (under ``prior``) classifier probabilities."""
    shares = draw_shares(rng, profile)
    labels = rng.choice(K, size=n_cells, p=shares)
    mu = class_means(separation)
    x = mu[labels] + rng.normal(size=(n_cells, K))
    return SimSmear(profile, shares, labels, posterior(x, mu, np.asarray(prior, dtype=np.float64)))


def simulate_training_set(
    rng: np.random.Generator, n_cells: int, prior: np.ndarray, separation: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """Cells with the training mix: (labels, calibrated probabilities) -- what calibration sees out of fold."""
    prior = np.asarray(prior, dtype=np.float64)
    labels = rng.choice(K, size=n_cells, p=prior)
    mu = class_means(separation)
    x = mu[labels] + rng.normal(size=(n_cells, K))
    return labels, posterior(x, mu, prior)
