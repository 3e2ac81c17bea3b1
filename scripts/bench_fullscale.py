"""Every CPU-side step at the real data's size: wall time, CPU time, peak memory and how each grows with the data.

    python scripts/bench_fullscale.py --fraction 0.125 0.25 0.5 1.0 --root /tmp/fullscale --out outputs/fullscale

For each fraction ``f`` a generated set of ``round(69168 f)`` images (the real set's size at ``f = 1``: 48,417
train images / 52,748 boxes, 20,751 test images / 22,689 rows, generated with ``cytologia synth --workers 0``) goes
through the steps of :data:`STEPS`, each in its own process (so that its peak resident memory, ``ru_maxrss`` of the
process and of its children, is its own; ``tracemalloc`` misses numpy/torch/OpenCV buffers):

- ``synth``: ``cytologia synth --images N --workers 0`` (the CLI, in process);
- ``validate_strict``, ``validate_lenient_jpeg``: ``cytologia validate`` strict, then ``--lenient --check-jpeg``
  (every image decoded);
- ``duplicates``: :func:`cytologia.data.hygiene.find_duplicates` over train + test images (pHash + pixel hash);
- ``folds``: :func:`cytologia.data.folds.folds_for_folder` with the images (statistics, duplicate groups, sources);
- ``sim_oof_boxes`` (set-up): out-of-fold boxes made from the truth by the simulated detector of
  ``scripts/eval_cleaning.py`` (localisation noise, misses, red-cell hits, strays, duplicates; 2 TTA views);
- ``cleaning``: :func:`cytologia.detection.cleaning.clean_folder` on those boxes;
- ``background``: :func:`cytologia.detection.background.make_background_set`, the 1st place's 3,469 images scaled
  by ``f``, single-cell images not flagged by the cleaning;
- ``oof_logits`` (set-up): OOF logits of the real shape -- 6 crop members (one with the 24th background label) and
  the multi-label member over every train box (52,748 rows each at ``f = 1``), members of different quality with a
  shared error component, written as run folders;
- ``tune``: :func:`cytologia.ensemble.runs.tune_ensemble` on them (weights, multi-label weight, held-out check,
  calibration);
- ``predict_models`` (set-up): a compact random-weight ensemble (YOLOX-nano 256 px + resnet10t 64 px, ONNX): timing
  only, the submission's classes are noise;
- ``predict``: :func:`cytologia.predict.predict_folder` over the whole test set, ONNX Runtime, 2 threads;
- ``score``: :func:`cytologia.metrics.score` against the hidden ``test_labels.csv``;
- ``report``: :func:`cytologia.report.write_report` (tables, figures, worst-errors gallery).

The growth exponent of a step is the slope of log(CPU seconds) -- and of log(peak memory above the interpreter's
baseline) -- against log(images) over the fractions run: 1 is linear. CPU time, not wall time, because the machine
is shared. Results: ``OUT/fullscale.json`` (every number) and ``OUT/fullscale.md`` (the table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = 69_168  # train + test images of the real set
REAL_BACKGROUND = 3_469  # background images the 1st place painted
OOF_MEMBERS: tuple[tuple[str, str, int, bool, bool, float], ...] = (
    # run name, architecture, input size, background label, multi-label, signal (logit margin of the true class)
    ("vitl224", "vit_large_patch16_224", 224, False, False, 2.6),
    ("vitl224_bg", "vit_large_patch16_224", 224, True, False, 2.5),
    ("dinobloom224", "dinobloom_b", 224, False, False, 2.2),
    ("nextvit384", "nextvit_small", 384, False, False, 2.4),
    ("effnetv2m512", "tf_efficientnetv2_m", 512, False, False, 2.7),
    ("tinyvit512", "tiny_vit_21m_512", 512, False, False, 2.3),
    ("ml_effnetv2m512_bg", "tf_efficientnetv2_m", 512, True, True, 3.0),
)


# ------------------------------------------------------------------------------------------------------- steps
def _cli(args: list[str]) -> dict[str, Any]:
    from cytologia.cli import main

    code = main(args)
    return {"exit_code": int(code or 0)}


def step_synth(d: Path, f: float) -> dict[str, Any]:
    n = round(REAL_IMAGES * f)
    return {"images": n, **_cli(["synth", "--out", str(d / "data"), "--images", str(n), "--workers", "0"])}


def step_validate_strict(d: Path, f: float) -> dict[str, Any]:
    try:
        return _cli(["validate", "--data", str(d / "data"), "--out", str(d / "validate_strict")])
    except Exception as err:  # strict validation stops at the first broken contract: that is its answer
        return {"exit_code": 1, "stopped": f"{type(err).__name__}: {str(err)[:300]}"}


def step_validate_lenient_jpeg(d: Path, f: float) -> dict[str, Any]:
    args = ["validate", "--data", str(d / "data"), "--lenient", "--check-jpeg", "--out", str(d / "validate_lenient")]
    return _cli(args)


def step_duplicates(d: Path, f: float) -> dict[str, Any]:
    import pandas as pd

    from cytologia.data.hygiene import duplicate_summary, find_duplicates

    data = d / "data"
    train = list(pd.unique(pd.read_csv(data / "train.csv", dtype={"NAME": str})["NAME"]))
    test = list(pd.unique(pd.read_csv(data / "test.csv", dtype={"NAME": str})["NAME"]))
    dups = find_duplicates(data / "images", train, 4, test)
    return {"images": len(dups), **{k: int(v) for k, v in duplicate_summary(dups).items()}}


def step_folds(d: Path, f: float) -> dict[str, Any]:
    from cytologia.data.folds import folds_for_folder

    folds, _ = folds_for_folder(d / "data", d / "folds.csv", k=4, seed=42, sources_out=d / "inferred_sources.csv")
    return {"images": len(folds)}


def _eval_cleaning_module() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_cleaning", ROOT / "scripts" / "eval_cleaning.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eval_cleaning"] = module
    spec.loader.exec_module(module)
    return module


def step_sim_oof_boxes(d: Path, f: float) -> dict[str, Any]:
    import pandas as pd

    from cytologia.data.io import read_annotations
    from cytologia.detection.cleaning import clean_truth
    from cytologia.detection.oof import write_boxes

    ec = _eval_cleaning_module()
    data = d / "data"
    ann, _ = read_annotations(data / "train.csv", data / "images", lenient=True)
    noise = pd.read_csv(data / "noise.csv", dtype={"NAME": str}, keep_default_na=False)
    truth, red = clean_truth(ann, noise)
    sizes = ann[["NAME", "img_w", "img_h"]].drop_duplicates("NAME")
    boxes = ec.simulate_detections(truth, red, sizes, ec.SimDetector(models=2), seed=0)
    folds = pd.read_csv(d / "folds.csv", dtype={"NAME": str})
    boxes["fold"] = boxes["NAME"].map(folds.set_index("NAME")["fold"]).fillna(0).astype(int)
    write_boxes(boxes, d / "oof_boxes.csv")
    return {"boxes": len(boxes)}


def step_cleaning(d: Path, f: float) -> dict[str, Any]:
    from cytologia.detection.cleaning import clean_folder

    result = clean_folder(d / "data", d / "oof_boxes.csv", d / "clean")
    return {"kept": len(result.result.cleaned), **{k: v for k, v in result.result.counts.items() if isinstance(v, int)}}


def step_background(d: Path, f: float) -> dict[str, Any]:
    import pandas as pd

    from cytologia.data.io import read_annotations
    from cytologia.detection.background import make_background_set

    data = d / "data"
    ann, _ = read_annotations(d / "clean" / "train_clean.csv", None, lenient=True)
    flagged = pd.read_csv(d / "clean" / "cleaning_report.csv", dtype={"NAME": str})["NAME"].unique()
    folds = pd.read_csv(d / "folds.csv", dtype={"NAME": str})
    n = round(REAL_BACKGROUND * f)
    table = make_background_set(ann, data / "images", folds, d / "background", n, exclude=flagged, max_cells=1)
    return {"painted": int(table["NAME"].nunique())}


def step_oof_logits(d: Path, f: float) -> dict[str, Any]:
    import numpy as np
    import pandas as pd
    import yaml

    from cytologia.classification.oof import make_oof_table, write_oof
    from cytologia.data.io import read_annotations
    from cytologia.data.schema import CLASSES

    truth, _ = read_annotations(d / "data" / "train.csv", lenient=True)
    folds = pd.read_csv(d / "folds.csv", dtype={"NAME": str}).set_index("NAME")["fold"]
    fold = truth["NAME"].map(folds).fillna(0).astype(int).to_numpy()
    code = truth["class"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    rng = np.random.default_rng(0)
    n, k = len(truth), len(CLASSES)
    shared = rng.normal(0, 1.0, (n, k))  # the members' common mistakes (hard pairs, hard images)
    rows = 0
    for run, arch, size, background, multilabel, signal in OOF_MEMBERS:
        logits = 0.7 * shared + rng.normal(0, 1.0, (n, k))
        logits[np.arange(n), code] += signal
        if multilabel:  # one row of sigmoid logits per image (every box of it the same): the classes present
            image, names = pd.factorize(truth["NAME"])
            per_image = -4.0 + rng.normal(0, 1.5, (len(names), k + int(background)))
            per_image[image, code] += 6.0
            logits = per_image[image]
        elif background:
            logits = np.concatenate([logits, rng.normal(-3.0, 1.0, (n, 1))], axis=1)
        model = f"ml:{run}" if multilabel else run
        parts = [
            make_oof_table(truth["NAME"].to_numpy()[m], truth["box_id"].to_numpy()[m], int(fo), model, logits[m])
            for fo in np.unique(fold)
            for m in [fold == fo]
        ]
        folder = d / "oof" / run
        folder.mkdir(parents=True, exist_ok=True)
        write_oof(pd.concat(parts, ignore_index=True), folder / "oof_logits.csv")
        config = {"classifier": {"name": arch, "img_size": size, "background": background, "multilabel": multilabel}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        rows += n
    return {"members": len(OOF_MEMBERS), "rows_per_member": n, "rows": rows}


def step_tune(d: Path, f: float) -> dict[str, Any]:
    from cytologia.ensemble.runs import tune_ensemble

    runs = [d / "oof" / m[0] for m in OOF_MEMBERS]
    tuned = tune_ensemble(runs, d / "data" / "train.csv", d / "tuned_ensemble.json", folds=d / "folds.csv")
    return {"members": len(tuned.ensemble.members), "summary": tuned.lines[0][:200]}


def step_predict_models(d: Path, f: float) -> dict[str, Any]:
    from cytologia.runtime.bench import build_random_ensemble

    path = build_random_ensemble(
        d / "compact", detector="yolox_nano", det_size=256, classifiers=[("resnet10t", 64)], folds=1
    )
    return {"ensemble": str(path)}


def step_predict(d: Path, f: float) -> dict[str, Any]:
    from cytologia.predict import predict_folder

    pred = predict_folder(
        d / "data", d / "compact" / "ensemble.json", d / "submission.csv", runtime="onnx", device="cpu", threads=2
    )
    return {"rows": len(pred.submission), "test_images": int(pred.submission["NAME"].nunique())}


def step_score(d: Path, f: float) -> dict[str, Any]:
    from cytologia.metrics import read_predictions, read_truth, score

    result = score(read_truth(d / "data" / "test_labels.csv"), read_predictions(d / "submission.csv"))
    return {"score": float(result.score), "rows": int(len(result.matched))}


def step_report(d: Path, f: float) -> dict[str, Any]:
    from cytologia.report import write_report

    data = d / "data"
    path = write_report(
        d / "report",
        data / "test_labels.csv",
        d / "submission.csv",
        sources=data / "sources.csv",
        image_dir=data / "images",
        name="compact random-weight ensemble",
    )
    return {"report": str(path)}


STEPS: dict[str, Callable[[Path, float], dict[str, Any]]] = {
    "synth": step_synth,
    "validate_strict": step_validate_strict,
    "validate_lenient_jpeg": step_validate_lenient_jpeg,
    "duplicates": step_duplicates,
    "folds": step_folds,
    "sim_oof_boxes": step_sim_oof_boxes,
    "cleaning": step_cleaning,
    "background": step_background,
    "oof_logits": step_oof_logits,
    "tune": step_tune,
    "predict_models": step_predict_models,
    "predict": step_predict,
    "score": step_score,
    "report": step_report,
}
SETUP_STEPS = {"sim_oof_boxes", "oof_logits", "predict_models"}  # inputs made for the benchmark, not library steps


# ------------------------------------------------------------------------------------------------------ measuring
class TreeSampler:
    """Peak resident memory of this process plus its descendants (summed) and the CPU seconds of the descendants,
    sampled every ``period`` s with psutil: pools started through a fork server (``cytologia synth --workers 0``)
    are not this process's waited children, so ``RUSAGE_CHILDREN`` misses them. Without psutil: nothing sampled."""

    def __init__(self, period: float = 0.2) -> None:
        import threading

        self.period, self.peak_mb, self.child_cpu = period, 0.0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            self._proc = None

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self._proc, *self._proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    if p.pid != self._proc.pid:
                        t = p.cpu_times()
                        self.child_cpu[p.pid] = t.user + t.system
                except psutil.Error:  # exited between listing and reading
                    continue
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self._stop.wait(self.period)

    def __enter__(self) -> TreeSampler:
        if self._proc is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._proc is not None:
            self._thread.join()


def run_step_here(name: str, folder: Path, fraction: float, out: Path) -> None:
    """Run one step in this process and write its measurements to ``out`` (JSON)."""
    import cytologia.offline  # noqa: F401 -- the library's environment (threads, offline)
    import cytologia.runtime.bench  # noqa: F401 -- imports most steps pay anyway: their memory is the baseline

    me0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    base_rss = me0.ru_maxrss / 1024.0  # Linux: KiB
    t0 = time.perf_counter()
    with TreeSampler() as tree:
        extra = STEPS[name](folder, fraction)
    wall = time.perf_counter() - t0
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_cpu = me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
    waited = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    children_cpu = max(waited, sum(tree.child_cpu.values()))  # waited children are in both: take the larger
    peak = max(me1.ru_maxrss / 1024.0, kids1.ru_maxrss / 1024.0, tree.peak_mb)
    record = {"wall_s": wall, "cpu_s": own_cpu + children_cpu, "peak_rss_mb": peak, "baseline_rss_mb": base_rss}
    out.write_text(json.dumps({**record, "extra": extra}, default=str))


def run_step(name: str, folder: Path, fraction: float, timeout: float) -> dict[str, Any]:
    """Run one step in a fresh interpreter; its measurements, or the error."""
    result = folder / f"step_{name}.json"
    result.unlink(missing_ok=True)
    log = folder / f"step_{name}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--dir", str(folder)]
    cmd += ["--fraction", str(fraction), "--step-out", str(result)]
    t0 = time.perf_counter()
    try:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "process_wall_s": time.perf_counter() - t0}
    if code != 0 or not result.is_file():
        return {"error": f"exit {code}: {log.read_text(errors='replace')[-800:]}"}
    return {**json.loads(result.read_text()), "process_wall_s": time.perf_counter() - t0}


def growth(xs: list[float], ys: list[float]) -> float | None:
    """Slope of log(y) against log(x) (least squares); None with fewer than two usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """The markdown table: per step, per fraction wall / CPU seconds and peak memory, then the growth exponents."""
    fractions = sorted(results, key=float)
    images = [round(REAL_IMAGES * float(f)) for f in fractions]
    head = " | ".join(f"{float(f):g} ({n:,} img): wall s / CPU s / peak MB" for f, n in zip(fractions, images))
    lines = [f"| step | {head} | CPU exponent | memory exponent |", "|---" * (len(fractions) + 3) + "|"]
    for step in STEPS:
        cells, cpus, mems = [], [], []
        for f in fractions:
            r = results[f].get(step)
            if r is None:
                cells.append("not run")
                cpus.append(None)
                mems.append(None)
            elif "error" in r:
                cells.append("error")
                cpus.append(None)
                mems.append(None)
            else:
                cells.append(f"{r['wall_s']:.1f} / {r['cpu_s']:.1f} / {r['peak_rss_mb']:.0f}")
                cpus.append(r["cpu_s"])
                mems.append(r["peak_rss_mb"] - r["baseline_rss_mb"])
        xs = [float(n) for n in images]
        k_cpu, k_mem = growth(xs, cpus), growth(xs, mems)
        label = f"{step} (set-up)" if step in SETUP_STEPS else step
        exponents = ["" if k is None else f"{k:.2f}" for k in (k_cpu, k_mem)]
        lines.append(f"| {label} | " + " | ".join([*cells, *exponents]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fraction", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0], help="of the real size")
    p.add_argument("--root", type=Path, default=Path("/tmp/cytologia_fullscale"), help="data + outputs per fraction")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "fullscale", help="fullscale.json / .md here")
    p.add_argument("--steps", default="", help=f"comma-separated subset of {', '.join(STEPS)}")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="per step, seconds")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--step-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step is not None:  # a child: one step
        run_step_here(args.step, args.dir, args.fraction[0], args.step_out)
        return 0
    steps = [s.strip() for s in args.steps.split(",") if s.strip()] or list(STEPS)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "fullscale.json"
    results: dict[str, dict[str, dict[str, Any]]] = json.loads(json_path.read_text()) if json_path.is_file() else {}
    for fraction in args.fraction:
        folder = args.root / f"f{fraction:g}"
        folder.mkdir(parents=True, exist_ok=True)
        key = f"{fraction:g}"
        results.setdefault(key, {})
        for step in steps:
            r = run_step(step, folder, fraction, args.timeout)
            results[key][step] = r
            shown = (
                r.get("error") or f"wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB"
            )
            print(f"[f={key}] {step}: {shown}", flush=True)
            json_path.write_text(json.dumps(results, indent=1, default=str))
            (args.out / "fullscale.md").write_text(table(results))
    print(table(results))
    meta = {"load": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
