"""The report's laboratory sections (:func:`cytologia.report.write_report`): the reliability diagram and the
risk-coverage curve of the calibration fitted by ``cytologia tune`` (out-of-fold, cross-fitted) and, with known
truth, measured on the test set; and the differential counts per smear of ``cytologia count``."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytologia.report import _figure, _html_table, _save

Link = Callable[[str, Path], str]


def plot_reliability(tables: Mapping[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    """Reliability diagram: accuracy against mean confidence per bin (marker area ~ boxes), one series per entry of
    ``tables`` (label -> :func:`cytologia.calibration.reliability_table` records), the diagonal = calibrated."""
    fig = _figure(5.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1, label="calibrated")
    colours = ("#d62728", "#3b75af", "#519e3e", "#ef8636")
    for (label, records), colour in zip(tables.items(), colours):
        t = pd.DataFrame(records)
        t = t[t["n"] > 0]
        if t.empty:
            continue
        size = 20 + 200 * t["n"].to_numpy() / t["n"].max()
        ax.plot(t["confidence"], t["accuracy"], color=colour, linewidth=1)
        ax.scatter(t["confidence"], t["accuracy"], s=size, color=colour, alpha=0.7, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean top-class probability in the bin")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def plot_risk_coverage(curves: Mapping[str, list[list[float]]], path: Path, title: str, target: float | None) -> Path:
    """Risk-coverage curves (error rate of the kept boxes against the share kept), one per score; the target error
    and 90 % coverage marked."""
    fig = _figure(5.6, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for label, points in curves.items():
        if points:
            a = np.asarray(points, dtype=np.float64)
            ax.plot(a[:, 0], a[:, 1], linewidth=1.4, label=label)
    if target is not None:
        ax.axhline(target, color="#d62728", linestyle="--", linewidth=1, label=f"target error {target:.0%}")
    ax.axvline(0.9, color="#888888", linestyle=":", linewidth=1, label="90 % coverage")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of boxes kept, the rest referred to an expert)")
    ax.set_ylabel("error rate among kept boxes")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def calibration_section(out: Path, report: Mapping[str, Any], test: Mapping[str, Any] | None, link: Link) -> str:
    """HTML of the calibration section; writes ``reliability.png`` and ``risk_coverage.png`` to ``out``."""
    r = report["reject"]
    rows = [
        ("temperature (ensemble)", f"{report['temperature']:.3f}"),
        (
            f"ECE, {report['ece_bins']} bins, OOF: before / after (cross-fitted)",
            f"{report['ece_before']:.4f} / {report['ece_after_heldout']:.4f}",
        ),
        ("refer-to-expert rule", f"{r['chosen']} < {r['threshold']:.3f} for <= {r['target_error']:.1%} errors kept"),
        ("score choice", r["note"]),
    ]
    for name, s in r["scores"].items():
        rows.append(
            (
                f"OOF {name} (cross-fitted)",
                f"AURC {s['aurc']:.4f}; at the target: {s['heldout_coverage']:.1%} kept, {s['heldout_error']:.1%} "
                f"errors; error at 90 % coverage {s['error_at_90_coverage']:.1%}",
            )
        )
    tables = {"OOF, T = 1": report["reliability_before"], "OOF, calibrated (cross-fitted)": report["reliability_after"]}
    curves = {f"OOF {k}": v for k, v in report["risk_coverage"].items()}
    if test is not None:
        rows.append(("test set: ECE before / after", f"{test['ece_before']:.4f} / {test['ece_after']:.4f}"))
        e90 = ", ".join(f"{k} {v:.1%}" for k, v in test["error_at_90_coverage"].items())
        rows.append(("test set: error at 90 % coverage", e90))
        if "refer_rule" in test:
            t = test["refer_rule"]
            rows.append(("test set: the rule", f"{t['coverage']:.1%} kept, {t['error']:.1%} errors among them"))
        tables["test set, calibrated"] = test["reliability_after"]
        curves.update({f"test {k}": v for k, v in test["risk_coverage"].items() if k == r["chosen"]})
    rel = plot_reliability(tables, out / "reliability.png", "Reliability diagram")
    rc = plot_risk_coverage(curves, out / "risk_coverage.png", "Risk-coverage (refer to an expert)", r["target_error"])
    table = pd.DataFrame(rows, columns=["", "value"])
    return (
        "<h2>Calibration and referral</h2><p class='note'>temperature scaling fitted on out-of-fold logits; "
        "cross-fitted figures use temperatures and thresholds fitted on the other folds</p>"
        f"{_html_table(table)}<p>{link('reliability_png', rel)} {link('risk_coverage_png', rc)}</p>"
        f"<img src='{rel.name}' alt='reliability diagram'> <img src='{rc.name}' alt='risk-coverage curve'>"
    )


def counts_section(out: Path, counts_dir: Path) -> str:
    """HTML of the per-smear counts section; copies the ``cytologia count`` folder to ``out/counts``."""
    from cytologia.counts import counts_section as table_html
    from cytologia.counts import read_count_json

    result = read_count_json(counts_dir / "counts.json")
    target = out / "counts"
    if target.resolve() != counts_dir.resolve():
        shutil.copytree(counts_dir, target, dirs_exist_ok=True)
    extra = ""
    truth_cols = [c for c in result.smears.columns if c.startswith("true ")]
    if truth_cols:
        extra = f"<p class='note'>known truth: {_html_table(result.smears[['smear', *truth_cols]])}</p>"
    return (
        f"<h2>Differential counts per smear</h2>{table_html(result)}{extra}"
        "<p>every smear with its picture: <a href='counts/index.html'>counts/index.html</a></p>"
    )


def lab_sections(
    out: Path,
    calibration: Mapping[str, Any] | None,
    test: Mapping[str, Any] | None,
    counts_dir: str | Path | None,
    link: Link,
) -> str:
    """The report's laboratory sections that have their inputs."""
    parts = []
    if calibration is not None:
        parts.append(calibration_section(out, calibration, test, link))
    if counts_dir is not None and (Path(counts_dir) / "counts.json").is_file():
        parts.append(counts_section(out, Path(counts_dir)))
    return "".join(parts)
