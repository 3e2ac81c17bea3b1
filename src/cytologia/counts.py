"""Differential count per smear: the share of each leukocyte class over a smear's cells, with 95 % intervals that
include the classifier's uncertainty, cells referred to an expert and clinical-threshold flags (``cytologia count``).

**Input**: one row per cell with calibrated class probabilities (``pcal_<class>``, the per-box output of
``cytologia predict``: :func:`cytologia.calibration.write_calibrated`) and a smear key per image -- a table
(``NAME,<column>``, e.g. the generated ``smears.csv``) or a regular expression on NAME (its first group, else the
whole match). A NAME without a key is an error naming it (``lenient``: counted, logged and left out).

**Method** (per smear, :func:`smear_posterior`): the unknown class of cell ``i`` and the smear's class shares ``pi``
are drawn jointly by a Gibbs sampler (data augmentation):

1. class of each cell ``c_i ~ Categorical(q_i)``, ``q_i ∝ p_i * pi / prior`` -- the calibrated probabilities
   ``p_i`` are posteriors under the class shares the classifier was calibrated on (``prior``: the out-of-fold
   truth's, stored in the ensemble file); a smear with another mix (a leukaemia: many blasts) shifts them by
   ``pi / prior`` (Saerens et al., 2002, as a posterior draw rather than EM). Without a prior, ``q_i = p_i``.
2. shares ``pi ~ Dirichlet(n + alpha)``, ``n`` the class counts of the drawn ``c`` -- the sampling of cells from
   the patient's blood; ``alpha`` = :data:`ALPHA` per class (1/23).

After :data:`BURN_IN` sweeps, ``draws`` sweeps are kept; the reported share is their mean, the interval their
2.5 / 97.5 % quantiles, so it holds both the classifier's uncertainty (step 1) and the sampling of cells (step 2).
The estimand is the smear's (patient's) class share, not the share among the counted cells. A flag rule (a group of
classes, a threshold) fires when the posterior probability that the group's share exceeds the threshold is at least
``flag_probability`` (0.5: the posterior median is above it). Interval coverage and flag sensitivity/specificity
are measured on simulated smears by ``scripts/eval_calibration.py`` (:mod:`cytologia.counts_sim`).

**Output** (:func:`write_counts`): ``counts.csv`` (per smear and class: cells, expected count, share, interval,
argmax count), ``smears.csv`` (per smear: cells, referred, flags), ``counts.json`` (both, with the settings), one
``smear_<key>.png`` per smear and ``index.html`` across smears.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.calibration import CAL_PROB_COLUMNS
from cytologia.data.schema import CLASSES
from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

K = len(CLASSES)
# Dirichlet prior per class: 1/23, one pseudo-cell in all (Perks). Measured on simulated smears (counts_sim, 150
# smears of 200 cells, separation 3): per-class coverage of the 95 % intervals 0.941 and of the blast group 0.967
# with 1/23; 0.696 and 0.593 with 1/2 (11.5 pseudo-cells pull every share towards 1/23); without the prior shift
# 0.61 and 0.19 (the blast flag's specificity falls from 0.99 to 0.18).
ALPHA = 1.0 / K
BURN_IN = 200  # Gibbs sweeps discarded (the chain starts at the mean probabilities; it mixes in a few dozen)
DEFAULT_DRAWS = 2000  # kept sweeps: the 2.5 % quantile rests on 50 draws
LEVEL = 0.95


@dataclass(frozen=True)
class FlagRule:
    """Flag a smear when the share of ``classes`` together exceeds ``threshold`` (a fraction)."""

    name: str
    classes: tuple[str, ...]
    threshold: float

    def __post_init__(self) -> None:
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or not self.classes:
            raise CytologiaInputError(f"flag rule {self.name!r}: unknown or no classes {unknown}")
        if not 0.0 < self.threshold < 1.0:
            raise CytologiaInputError(f"flag rule {self.name!r}: threshold {self.threshold} must be in (0, 1)")


# Illustrative defaults, not clinical guidance: blasts (B, MBL, LyB, MoB) and lymphoma cells (LF, LLC, LM, LZMG, SS)
# above 5 % of the leukocytes of a peripheral smear deserve a haematologist's look. Configure per laboratory.
DEFAULT_RULES: tuple[FlagRule, ...] = (
    FlagRule("blasts", ("B", "MBL", "LyB", "MoB"), 0.05),
    FlagRule("lymphoma cells", ("LF", "LLC", "LM", "LZMG", "SS"), 0.05),
)


def parse_rule(text: str) -> FlagRule:
    """A rule from ``NAME=CLASS+CLASS:PERCENT``, e.g. ``blasts=B+MBL+LyB+MoB:5``."""
    m = re.fullmatch(r"\s*([^=]+?)\s*=\s*([A-Za-z0-9_+]+)\s*:\s*([0-9.]+)\s*%?\s*", text)
    if not m:
        raise CytologiaInputError(f"flag rule {text!r}: expected NAME=CLASS+CLASS:PERCENT, e.g. blasts=B+MBL:5")
    return FlagRule(m.group(1), tuple(m.group(2).split("+")), float(m.group(3)) / 100.0)


# ------------------------------------------------------------------------------------------------ smear keys
def smear_keys(
    names: Sequence[str] | pd.Series,
    *,
    table: pd.DataFrame | None = None,
    column: str = "smear",
    regex: str | None = None,
    lenient: bool = False,
) -> pd.Series:
    """The smear of each NAME (a Series aligned with ``names``): from ``table`` (``NAME`` and ``column``) or from
    ``regex`` (its first group, else the whole match). A NAME without a key is an error naming the first ones, or
    with ``lenient`` a NaN key, logged with its count."""
    names = pd.Series(list(names), dtype=object).astype(str)
    if (table is None) == (regex is None):
        raise CytologiaInputError("give the smear key as a table (NAME + a column) or as a regex on NAME, one of them")
    if table is not None:
        missing = [c for c in ("NAME", column) if c not in table.columns]
        if missing:
            raise CytologiaInputError(f"smear table: missing column(s) {', '.join(missing)}")
        t = table.astype({"NAME": str})
        dup = t["NAME"].duplicated(keep=False) & ~t.duplicated(["NAME", column], keep=False)
        if dup.any():
            raise CytologiaInputError(f"smear table: NAME {t.loc[dup, 'NAME'].iat[0]} has several {column} values")
        keys = names.map(t.drop_duplicates("NAME").set_index("NAME")[column].astype(str))
        what = f"no row in the smear table (column {column})"
    else:
        try:
            pattern = re.compile(str(regex))
        except re.error as err:
            raise CytologiaInputError(f"smear regex {regex!r}: {err}") from None

        def key(name: str) -> str | None:
            m = pattern.search(name)
            if m is None:
                return None
            return m.group(1) if pattern.groups else m.group(0)

        keys = names.map(key)
        what = f"no match of the regex {regex!r}"
    lost = keys.isna()
    if lost.any():
        shown = ", ".join(f"row {i + 1} ({names.iat[i]})" for i in np.flatnonzero(lost.to_numpy())[:5])
        message = f"{int(lost.sum())} cell(s) whose NAME has {what}: {shown}"
        if not lenient:
            raise CytologiaInputError(message + " (lenient: leave them out, counted)")
        log.warning("%s -- left out of the counts (lenient)", message)
    return keys


# -------------------------------------------------------------------------------------------------- posterior
def _categorical(rng: np.random.Generator, q: np.ndarray) -> np.ndarray:
    """One class per row of the row-stochastic ``q`` (n, K)."""
    cdf = np.cumsum(q, axis=1)
    u = rng.random(len(q))[:, None] * cdf[:, -1:]
    return np.minimum((cdf < u).sum(axis=1), q.shape[1] - 1)


def smear_posterior(
    probs: np.ndarray,
    prior: np.ndarray | None = None,
    *,
    draws: int = DEFAULT_DRAWS,
    alpha: float = ALPHA,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior draws of a smear's class shares (draws, K) and of its class counts (draws, K) from its cells'
    calibrated probabilities ``probs`` (n, K); see the module docstring."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or not len(probs):
        raise CytologiaInputError("a smear needs at least one cell with class probabilities")
    k = probs.shape[1]
    rng = np.random.default_rng(seed)
    ratio_base = None if prior is None else 1.0 / np.asarray(prior, dtype=np.float64)
    pi = probs.mean(axis=0)
    shares = np.empty((draws, k))
    counts = np.empty((draws, k))
    for sweep in range(BURN_IN + draws):
        q = probs if ratio_base is None else probs * (pi * ratio_base)
        n = np.bincount(_categorical(rng, q), minlength=k)
        pi = rng.dirichlet(n + alpha)
        if sweep >= BURN_IN:
            shares[sweep - BURN_IN] = pi
            counts[sweep - BURN_IN] = n
    return shares, counts


# ------------------------------------------------------------------------------------------------------ counts
@dataclass
class CountResult:
    """Per smear and class (``classes``), per smear (``smears``) and the settings (``settings``)."""

    classes: pd.DataFrame
    smears: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    draws: dict[str, np.ndarray] = field(default_factory=dict)  # smear -> share draws (for the pictures)


def differential_counts(
    cells: pd.DataFrame,
    smear: pd.Series,
    *,
    prior: Sequence[float] | None = None,
    rules: Sequence[FlagRule] = DEFAULT_RULES,
    flag_probability: float = 0.5,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> CountResult:
    """The differential count of every smear: ``cells`` holds ``pcal_<class>`` and ``refer`` (optional) per cell,
    ``smear`` its smear key (aligned; NaN: left out, as :func:`smear_keys` decided). Every cell with a key is counted
    in exactly one smear; the sum of ``n_cells`` over smears is the number of keyed cells."""
    missing = [c for c in CAL_PROB_COLUMNS if c not in cells.columns]
    if missing:
        raise CytologiaInputError(f"cells table lacks calibrated probabilities ({', '.join(missing[:3])}...)")
    if len(smear) != len(cells):
        raise CytologiaInputError(f"{len(smear)} smear keys for {len(cells)} cells")
    if not 0.0 < flag_probability < 1.0:
        raise CytologiaInputError(f"flag probability {flag_probability} must be in (0, 1)")
    prior_arr = None if prior is None else np.asarray(prior, dtype=np.float64)
    probs = cells[list(CAL_PROB_COLUMNS)].to_numpy(np.float64)
    refer = cells["refer"].to_numpy(bool) if "refer" in cells.columns else np.zeros(len(cells), bool)
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    keys = pd.Series(smear).reset_index(drop=True)
    lo_q, hi_q = (1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2
    class_rows, smear_rows, all_draws = [], [], {}
    for i, (key, idx) in enumerate(sorted(keys.dropna().groupby(keys.dropna()).groups.items())):
        rows = np.asarray(idx, dtype=np.int64)
        shares, counts = smear_posterior(probs[rows], prior_arr, draws=draws, seed=seed + i)
        all_draws[str(key)] = shares
        argmax_counts = np.bincount(pred[rows], minlength=K)
        lo, hi = np.quantile(shares, [lo_q, hi_q], axis=0)
        for j, c in enumerate(CLASSES):
            class_rows.append(
                {
                    "smear": str(key),
                    "class": c,
                    "n_cells": len(rows),
                    "expected_count": float(counts[:, j].mean()),
                    "argmax_count": int(argmax_counts[j]),
                    "percent": 100.0 * float(shares[:, j].mean()),
                    "percent_lo": 100.0 * float(lo[j]),
                    "percent_hi": 100.0 * float(hi[j]),
                }
            )
        row: dict[str, Any] = {
            "smear": str(key),
            "n_cells": len(rows),
            "n_images": int(cells["NAME"].iloc[rows].nunique()) if "NAME" in cells.columns else -1,
            "referred": int(refer[rows].sum()),
            "percent_referred": 100.0 * float(refer[rows].mean()),
        }
        flags = []
        for rule in rules:
            cols = [CLASSES.index(c) for c in rule.classes]
            group = shares[:, cols].sum(axis=1)
            p_above = float((group > rule.threshold).mean())
            glo, ghi = np.quantile(group, [lo_q, hi_q])
            row[f"{rule.name} %"] = 100.0 * float(group.mean())
            row[f"{rule.name} % lo"] = 100.0 * float(glo)
            row[f"{rule.name} % hi"] = 100.0 * float(ghi)
            row[f"P({rule.name} > {100 * rule.threshold:g} %)"] = p_above
            if p_above >= flag_probability:
                flags.append(f"{rule.name} > {100 * rule.threshold:g} %")
        row["flags"] = "; ".join(flags)
        smear_rows.append(row)
    settings = {
        "method": "Gibbs: cell classes ~ calibrated probabilities shifted by shares/prior, shares ~ Dirichlet",
        "alpha": ALPHA,
        "burn_in": BURN_IN,
        "draws": draws,
        "level": LEVEL,
        "prior_shift": prior is not None,
        "flag_probability": flag_probability,
        "rules": [asdict(r) for r in rules],
        "seed": seed,
        "cells": len(cells),
        "cells_counted": int(keys.notna().sum()),
    }
    return CountResult(pd.DataFrame(class_rows), pd.DataFrame(smear_rows), settings, all_draws)


# ------------------------------------------------------------------------------------------------------ output
def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80] or "smear"


def plot_smear(result: CountResult, key: str, path: Path) -> Path:
    """Bars of one smear's class shares with their 95 % intervals, the flag rules' groups noted in the title."""
    from cytologia.report import _figure, _save

    t = result.classes[result.classes["smear"] == key]
    s = result.smears[result.smears["smear"] == key].iloc[0]
    fig = _figure(9.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(t))
    pct = t["percent"].to_numpy()
    err = np.vstack([pct - t["percent_lo"].to_numpy(), t["percent_hi"].to_numpy() - pct])
    ax.bar(x, pct, color="#3b75af", label="share (posterior mean)")
    ax.errorbar(x, pct, yerr=np.maximum(err, 0), fmt="none", ecolor="black", capsize=2, linewidth=0.8)
    ax.plot(x, 100.0 * t["argmax_count"].to_numpy() / max(int(s["n_cells"]), 1), "r_", markersize=8, label="argmax %")
    ax.set_xticks(x, labels=list(t["class"]), rotation=90, fontsize=8)
    ax.set_ylabel("% of leukocytes (95 % interval)")
    title = f"smear {key}: {int(s['n_cells'])} cells, {int(s['referred'])} referred"
    ax.set_title(title + (f" -- FLAG: {s['flags']}" if s["flags"] else ""), fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return _save(fig, path)


def write_counts(result: CountResult, out_dir: str | Path, *, pictures: bool = True) -> dict[str, Path]:
    """Write ``counts.csv``, ``smears.csv``, ``counts.json``, a PNG per smear and ``index.html`` to ``out_dir``."""
    from cytologia.report import _CSS, _write_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "counts": _write_csv(result.classes, out / "counts.csv"),
        "smears": _write_csv(result.smears, out / "smears.csv"),
    }
    data = {
        "settings": result.settings,
        "smears": json.loads(result.smears.to_json(orient="records")),
        "counts": json.loads(result.classes.to_json(orient="records")),
    }
    tmp = out / f".counts.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, out / "counts.json")
    files["json"] = out / "counts.json"
    parts = []
    for key in result.smears["smear"]:
        img = ""
        if pictures:
            png = plot_smear(result, str(key), out / f"smear_{_slug(str(key))}.png")
            files[f"png:{key}"] = png
            img = f"<img src='{html.escape(png.name)}' alt='smear {html.escape(str(key))}'>"
        parts.append(f"<h3>smear {html.escape(str(key))}</h3>{img}")
    s = result.settings
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>differential counts</title><style>{_CSS}</style>"
        f"</head><body><h1>Differential counts per smear</h1>{counts_section(result)}"
        f"<p class='note'>method: {html.escape(s['method'])}; {s['draws']} draws, {int(100 * s['level'])} % "
        f"intervals; prior shift {'on' if s['prior_shift'] else 'off'}. Files: counts.csv, smears.csv, "
        f"counts.json</p>{''.join(parts)}</body></html>\n"
    )
    (out / "index.html").write_text(page)
    files["html"] = out / "index.html"
    return files


def counts_section(result: CountResult) -> str:
    """The HTML table across smears (cells, referred, rule shares with intervals, flags)."""
    from cytologia.report import _html_table

    t = result.smears.copy()
    shown = ["smear", "n_cells", "referred"]
    for rule in result.settings.get("rules", []):
        name = rule["name"]
        t[f"{name} % [95 % interval]"] = [
            f"{m:.1f} [{lo:.1f}, {hi:.1f}]" for m, lo, hi in zip(t[f"{name} %"], t[f"{name} % lo"], t[f"{name} % hi"])
        ]
        shown.append(f"{name} % [95 % interval]")
    shown.append("flags")
    return _html_table(t[shown], max_rows=200)


def read_count_json(path: str | Path) -> CountResult:
    """A :class:`CountResult` back from ``counts.json`` (no draws)."""
    path = Path(path)
    if not path.is_file():
        raise CytologiaInputError(f"{path}: no such counts file")
    data = json.loads(path.read_text())
    return CountResult(pd.DataFrame(data["counts"]), pd.DataFrame(data["smears"]), data["settings"])


# ---------------------------------------------------------------------------------------------- the command
@dataclass
class CountRun:
    """What :func:`count_cells` returns: the counts, the files written and the lines ``cytologia count`` prints."""

    result: CountResult
    files: dict[str, Path]
    lines: list[str] = field(default_factory=list)


def truth_shares(truth: pd.DataFrame, smear: pd.Series) -> pd.DataFrame:
    """Per smear and class, the share of the truth's boxes (``class`` column; ``smear`` aligned with it) in %:
    ``smear, class, true_count, true_percent``."""
    t = pd.DataFrame({"smear": pd.Series(smear).astype(str).to_numpy(), "class": truth["class"].astype(str).to_numpy()})
    t = t[pd.Series(smear).notna().to_numpy()]
    n = t.groupby(["smear", "class"]).size().unstack(fill_value=0).reindex(columns=list(CLASSES), fill_value=0)
    long = n.stack().rename("true_count").reset_index()
    long["true_percent"] = 100.0 * long["true_count"] / long.groupby("smear")["true_count"].transform("sum")
    return long


def count_cells(
    cells: str | Path | pd.DataFrame,
    out: str | Path,
    *,
    smears: str | Path | pd.DataFrame | None = None,
    column: str = "smear",
    regex: str | None = None,
    ensemble: str | Path | None = None,
    rules: Sequence[FlagRule] = DEFAULT_RULES,
    flag_probability: float = 0.5,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
    lenient: bool = False,
    truth: str | Path | pd.DataFrame | None = None,
    pictures: bool = True,
) -> CountRun:
    """``cytologia count``: the differential count of every smear of ``cells`` (the per-box calibrated output of
    ``cytologia predict``, or its table) written to the folder ``out`` (:func:`write_counts`).

    The smear of a cell: ``smears`` (a table or CSV with NAME and ``column``) or ``regex`` on NAME
    (:func:`smear_keys`; ``lenient``: cells without one are left out, counted). ``ensemble``: the ensemble file whose
    calibration's class shares the probabilities are calibrated for (the prior shift); without it, or without a
    fitted calibration there, no shift (logged: intervals on smears unlike the training mix are then too narrow).
    ``truth`` (``NAME,class`` per cell, e.g. a generated ``test_labels.csv``): the true share of each class in its
    smear's counted cells is added (``true_percent``), with whether the interval holds it."""
    from cytologia.calibration import read_calibrated

    table = cells if isinstance(cells, pd.DataFrame) else read_calibrated(cells)
    if isinstance(smears, (str, Path)):
        if not Path(smears).is_file():
            raise CytologiaInputError(f"{smears}: no such smear table")
        smears = pd.read_csv(smears, dtype=str, keep_default_na=False)
    keys = smear_keys(table["NAME"], table=smears, column=column, regex=regex, lenient=lenient)
    lines: list[str] = []
    prior = None
    if ensemble is not None:
        from cytologia.ensemble import read_ensemble

        cal = read_ensemble(ensemble).calibration
        prior = cal.class_prior if cal.fitted else None
    if prior is None:
        lines.append(
            "no class prior (an ensemble file with a fitted calibration): probabilities taken as calibrated for every "
            "smear's own mix -- intervals on pathological smears are too narrow (see docs/calibration_and_counts.md)"
        )
        log.warning(lines[-1])
    result = differential_counts(
        table, keys, prior=prior, rules=rules, flag_probability=flag_probability, draws=draws, seed=seed
    )
    if truth is not None:
        t = truth if isinstance(truth, pd.DataFrame) else pd.read_csv(truth, dtype=str, keep_default_na=False)
        t_keys = smear_keys(t["NAME"], table=smears, column=column, regex=regex, lenient=True)
        shares = truth_shares(t, t_keys)
        merged = result.classes.merge(shares, on=["smear", "class"], how="left")
        merged["covered"] = (merged["true_percent"] >= merged["percent_lo"]) & (
            merged["true_percent"] <= merged["percent_hi"]
        )
        result.classes = merged
        for rule in rules:
            true_group = shares[shares["class"].isin(rule.classes)].groupby("smear")["true_percent"].sum()
            result.smears[f"true {rule.name} %"] = result.smears["smear"].map(true_group).to_numpy()
    files = write_counts(result, out, pictures=pictures)
    n_flagged = int((result.smears["flags"] != "").sum()) if len(result.smears) else 0
    lines.append(
        f"{result.settings['cells_counted']} of {len(table)} cells in {len(result.smears)} smear(s), "
        f"{int(result.smears['referred'].sum()) if len(result.smears) else 0} referred to an expert; "
        f"{n_flagged} smear(s) flagged; wrote {Path(out) / 'index.html'}"
    )
    return CountRun(result, files, lines)
