"""How optimistic are out-of-fold (OOF) figures when each fold keeps the epoch that scored best on that same fold?

    python scripts/oof_optimism.py [--out outputs/oof_optimism] [--images 400] [--epochs 15] [--seeds 0]
        [--members resnet10t,mobilenetv3_small_100] [--modes last,best_val] [--img-size 64] [--folds 2]

A benchmark (minutes of CPU), not a test. On a generated set (``cytologia synth`` layout: ``train.csv`` with its
defects, ``test_labels.csv`` the clean truth of the held-out test images) it trains the same small classifiers on the
ground-truth boxes with the classifier stage (``cytologia.train``, ``stage=classifier``) once per checkpoint
selection mode (``trainer.select``), tunes the ensemble on their OOF logits with ``cytologia tune``, and predicts
the test boxes with the checkpoints the ensemble file names (each member: the mean of its fold models' logits, the
members blended with the weights tuned on OOF -- what ``cytologia predict`` does on these boxes).

Per mode it reports, for every member, the OOF macro-F1 (pooled over the folds, against the training labels except
the boxes ``noise.csv`` says sit on a red cell), the test macro-F1 of the same fold models (mean over folds: the
models the OOF came from), the gap between the two (the optimism), and the test macro-F1 of the fold-averaged
member; for the ensemble, its gain over the best member (the one with the best OOF macro-F1) on OOF -- in-sample,
and cross-fitted as ``cytologia tune`` checks it -- and on the test set. Only the selection differs between modes:
same data, folds, seeds and training (the val curves are compared to show it), so the difference of the gaps
between modes is the selection's own optimism. Its spread over the boxes is a paired bootstrap over images (OOF and
test resampled together, ``--bootstrap`` draws); the spread over training seeds needs ``--seeds 0,1,...``.

Writes ``<out>/oof_optimism.json`` (everything) and ``<out>/oof_optimism.md`` (the tables); prints the markdown.
Training runs are kept under ``<out>/runs`` and reused when the script is run again with the same arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
log = logging.getLogger("oof_optimism")


# ----------------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "oof_optimism")
    p.add_argument("--data", type=Path, default=None, help="a generated data folder (default: <out>/data, made)")
    p.add_argument("--images", type=int, default=400, help="images to generate (train + test)")
    p.add_argument("--synth-seed", type=int, default=0)
    p.add_argument("--synth-size", type=int, default=None, help="square image side for the generator (default: mixed)")
    p.add_argument("--members", default="resnet10t,mobilenetv3_small_100", help="classifier names, comma-separated")
    p.add_argument("--modes", default="last,best_val", help="trainer.select values to compare")
    p.add_argument("--seeds", default="0", help="training seeds, comma-separated (the data and folds stay fixed)")
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap draws over images (0: none)")
    args = p.parse_args(argv)
    args.members = [m.strip() for m in args.members.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    from cytologia.config import SELECT_MODES

    bad = [m for m in args.modes if m not in SELECT_MODES]
    if bad or not args.modes:
        p.error(f"--modes: {bad or 'none'}; choose from {', '.join(SELECT_MODES)}")
    if len(args.members) < 2:
        p.error("--members: at least two (the ensemble needs them)")
    return args


# ---------------------------------------------------------------------------------------------------------- data
def make_data(args: argparse.Namespace) -> Path:
    """The generated data folder (made once; reused when its train.csv exists)."""
    from cytologia.data.synthetic.generate import SynthConfig, generate

    root = args.data or args.out / "data"
    if not (root / "train.csv").is_file():
        log.info("generating %d images into %s", args.images, root)
        generate(root, args.images, seed=args.synth_seed, config=SynthConfig(size=args.synth_size), workers=1)
    for name in ("train.csv", "test_labels.csv", "images"):
        if not (root / name).exists():
            raise SystemExit(f"{root / name}: missing (a `cytologia synth` folder with its hidden test labels)")
    return root


def red_cell_rows(root: Path) -> set[int]:
    """0-based train.csv rows that box a red cell (``noise.csv``): their class is wrong by construction."""
    path = root / "noise.csv"
    if not path.is_file():
        return set()
    noise = pd.read_csv(path, dtype={"NAME": str}, keep_default_na=False)
    rows = noise.loc[noise["kind"].isin(["red_cell_extra", "red_cell_replace"]), "train_row"]
    return {int(r) - 1 for r in pd.to_numeric(rows, errors="coerce").dropna() if int(r) >= 1}


# ------------------------------------------------------------------------------------------------------ training
def member_config(args: argparse.Namespace, root: Path, name: str, mode: str, seed: int, *extra: str) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "trainer=cpu_tiny",
                "stage=classifier",
                f"data.root={root}",
                "data.synthetic=false",
                f"folds.k={args.folds}",
                "fold=null",
                f"exp_name={name}",
                f"classifier.name={name}",
                f"classifier.img_size={args.img_size}",
                f"trainer.max_epochs={args.epochs}",
                f"trainer.batch_size={args.batch_size}",
                f"trainer.lr={args.lr}",
                "trainer.num_workers=0",
                f"trainer.select={mode}",
                "ensemble.tta_flip=false",
                f"seed={seed}",
                f"paths.output_dir={args.out / 'runs'}",
                *extra,
            ],
        )


def train_member(args: argparse.Namespace, root: Path, name: str, mode: str, seed: int) -> tuple[Path, float]:
    """(run folder, training wall seconds) of one member in one mode; a finished run folder is reused (0 s)."""
    from cytologia.train import train

    run = args.out / "runs" / f"seed{seed}" / mode / name
    if (run / "summary.json").is_file():
        log.info("%s: done before, reused", run)
        return run, 0.0
    # a killed earlier attempt: resume its folds (finished ones are kept, the others continue from last.ckpt)
    cfg = member_config(args, root, name, mode, seed, *(["trainer.resume=true"] if run.exists() else []))
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run / "train.log", "a") as sink, contextlib.redirect_stdout(sink):  # train() prints the config
        train(cfg, run_dir=run)
    seconds = time.perf_counter() - start
    log.info("%s %s seed %d trained in %.0f s", name, mode, seed, seconds)
    return run, seconds


def val_curves(run: Path) -> dict[str, list[float]]:
    """fold -> validation macro-F1 of every epoch (from the fold's merged metrics.csv)."""
    out = {}
    for fold_dir in sorted(run.glob("fold_*")):
        metrics = pd.read_csv(fold_dir / "metrics.csv")
        val = metrics.dropna(subset=["val/macro_f1"]).sort_values("epoch")
        out[fold_dir.name] = [round(float(v), 6) for v in val["val/macro_f1"]]
    return out


# ------------------------------------------------------------------------------------------------- predictions
def predict_test(spec: dict[str, Any], ens_dir: Path, root: Path, test: pd.DataFrame) -> np.ndarray:
    """Logits (folds, n, K) of the test boxes from every fold checkpoint the ensemble file names for ``spec``."""
    from cytologia.classification.datamodule import CropDataModule, CropSource
    from cytologia.classification.module import ClassifierModule, predict_logits

    out = []
    for ckpt in spec["checkpoints"]:
        path = Path(ckpt) if Path(ckpt).is_absolute() else ens_dir / ckpt
        module = ClassifierModule.from_checkpoint(path)
        source = CropSource(test, root / "images")
        data = CropDataModule(
            [source], source, module.label_names, int(spec["img_size"]), margin=int(spec["margin"]), batch_size=64
        )
        logits, _, index = predict_logits(module.model, data.predict_loader())
        if not np.array_equal(index, np.arange(len(test))):
            raise RuntimeError(f"{path}: test predictions out of order")
        out.append(logits)
    return np.stack(out)


# ------------------------------------------------------------------------------------------------------- scoring
def f1(true: np.ndarray, pred: np.ndarray) -> float:
    from cytologia.ensemble.tune import macro_f1_codes

    return macro_f1_codes(true, pred)


def argmax23(logits: np.ndarray) -> np.ndarray:
    return np.asarray(logits)[..., :23].argmax(axis=-1)


def evaluate_mode(
    args: argparse.Namespace,
    root: Path,
    runs: dict[str, Path],
    mode: str,
    seed: int,
    truth: pd.DataFrame,
    test: pd.DataFrame,
    noisy: set[int],
) -> dict[str, Any]:
    """Tune the ensemble of ``runs`` (member -> run folder) and score members and ensemble on OOF and test boxes.
    Also returns the per-box predictions the bootstrap resamples."""
    from cytologia.classification.oof import logits_of, read_oof
    from cytologia.cli import main as cli
    from cytologia.data.schema import CLASSES

    code = {c: i for i, c in enumerate(CLASSES)}
    ens_path = args.out / "runs" / f"seed{seed}" / mode / "ensemble.json"
    argv = ["tune", *[a for r in runs.values() for a in ("--oof", str(r))], "--truth", str(root / "train.csv")]
    with open(ens_path.with_suffix(".log"), "w") as sink, contextlib.redirect_stdout(sink):
        if cli([*argv, "--out", str(ens_path)]) != 0:
            raise RuntimeError(f"cytologia tune failed: {' '.join(argv)}")
    ens = json.loads(ens_path.read_text())
    report = ens["tuning"]
    weights = {m["name"]: float(m["weight"]) for m in ens["members"]}
    bias = ens["blend"].get("class_bias")

    # OOF: every member on the same boxes (the truth's box ids), scored on those whose label is not a red cell.
    oof_logits, keys = {}, None
    for name, run in runs.items():
        table = read_oof(run / "oof_logits.csv")
        table = table[table["model"] == name].sort_values("box_id").reset_index(drop=True)
        if keys is None:
            keys = table[["NAME", "box_id"]]
        elif not table[["NAME", "box_id"]].equals(keys):
            raise RuntimeError(f"{run}: OOF boxes differ from the other members'")
        oof_logits[name] = logits_of(table)
    assert keys is not None
    cls = truth.set_index("box_id")["class"].reindex(keys["box_id"]).map(code)
    clean = cls.notna().to_numpy() & ~keys["box_id"].isin(noisy).to_numpy()
    oof_true = cls.to_numpy()[clean].astype(np.int64)
    oof_names = keys["NAME"].to_numpy()[clean]

    test_true = test["class"].map(code).to_numpy(np.int64)
    members: dict[str, Any] = {}
    oof_pred, test_pred_avg, test_pred_fold, test_logits = {}, {}, {}, {}
    for spec in ens["members"]:
        name = spec["name"]
        per_fold = predict_test(spec, ens_path.parent, root, test)
        test_logits[name] = per_fold.mean(axis=0)  # the member at prediction time: the mean of its fold models
        oof_pred[name] = argmax23(oof_logits[name][clean])
        test_pred_avg[name] = argmax23(test_logits[name])
        test_pred_fold[name] = argmax23(per_fold)  # (folds, n)
        summary = json.loads((runs[name] / "summary.json").read_text())
        members[name] = {
            "select": summary["select"],
            "oof_f1_all_boxes": summary["oof_macro_f1"],  # what the stage reports (train.csv labels, every box)
            "oof_f1": f1(oof_true, oof_pred[name]),
            "test_f1_fold_models": float(np.mean([f1(test_true, p) for p in test_pred_fold[name]])),
            "test_f1": f1(test_true, test_pred_avg[name]),
            "weight": weights[name],
            "checkpoints": [Path(c).name for c in spec["checkpoints"]],
            "best_val_macro_f1": [f["best_val_macro_f1"] for f in summary["folds"]],
            "val_curves": val_curves(runs[name]),
        }
        members[name]["gap"] = members[name]["oof_f1"] - members[name]["test_f1_fold_models"]

    names = list(members)
    w = np.array([weights[n] for n in names])
    b = None if bias is None else np.asarray(bias)
    from cytologia.ensemble import blend_logits

    oof_blend = argmax23(blend_logits(np.stack([oof_logits[n][clean] for n in names]), w, b))
    test_blend = argmax23(blend_logits(np.stack([test_logits[n] for n in names]), w, b))
    best = max(names, key=lambda n: members[n]["oof_f1"])  # the member one would pick on OOF
    heldout = report.get("heldout", {})
    ensemble = {
        "weights": dict(zip(names, [float(x) for x in w])),
        "best_member_by_oof": best,
        "oof_f1": f1(oof_true, oof_blend),
        "oof_gain": f1(oof_true, oof_blend) - members[best]["oof_f1"],
        "tune_in_sample_gain": report["in_sample_f1"] - max(report["single_member_oof_f1"].values()),
        "tune_heldout_gain": heldout.get("gain_over_best_member"),
        "test_f1": f1(test_true, test_blend),
        "test_gain": f1(test_true, test_blend) - members[best]["test_f1"],
        "checkpoint_selection": report.get("checkpoint_selection"),
    }
    per_box = {
        "oof_true": oof_true,
        "oof_names": oof_names,
        "oof_pred": oof_pred,
        "oof_blend": oof_blend,
        "test_true": test_true,
        "test_names": test["NAME"].to_numpy(),
        "test_pred_fold": test_pred_fold,
        "test_pred_avg": test_pred_avg,
        "test_blend": test_blend,
        "best": best,
    }
    return {"members": members, "ensemble": ensemble, "per_box": per_box}


def _image_draws(names: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n`` bootstrap draws of row indices, resampling whole images."""
    codes, uniq = pd.factorize(pd.Series(names))
    rows = [np.flatnonzero(codes == i) for i in range(len(uniq))]
    return [np.concatenate([rows[i] for i in rng.integers(0, len(rows), len(rows))]) for _ in range(n)]


def bootstrap(results: dict[str, dict[str, Any]], n: int, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap over images (the same OOF and test draws for every mode): 5-95 % intervals of each mode's
    member gaps and ensemble gains, and of the difference of the gaps between each mode and the first."""
    if n <= 0:
        return {}
    rng = np.random.default_rng(seed)
    modes = list(results)
    first = results[modes[0]]["per_box"]
    oof_draws = _image_draws(first["oof_names"], n, rng)
    test_draws = _image_draws(first["test_names"], n, rng)
    samples: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        samples.setdefault(key, []).append(value)

    for o, t in zip(oof_draws, test_draws):
        gaps: dict[tuple[str, str], float] = {}
        for mode in modes:
            pb = results[mode]["per_box"]
            for name in pb["oof_pred"]:
                oof = f1(pb["oof_true"][o], pb["oof_pred"][name][o])
                test = float(np.mean([f1(pb["test_true"][t], p[t]) for p in pb["test_pred_fold"][name]]))
                gaps[mode, name] = oof - test
                add(f"{mode}/{name}/gap", oof - test)
            best = pb["best"]
            add(
                f"{mode}/ensemble/oof_gain",
                f1(pb["oof_true"][o], pb["oof_blend"][o]) - f1(pb["oof_true"][o], pb["oof_pred"][best][o]),
            )
            add(
                f"{mode}/ensemble/test_gain",
                f1(pb["test_true"][t], pb["test_blend"][t]) - f1(pb["test_true"][t], pb["test_pred_avg"][best][t]),
            )
        for mode in modes[1:]:
            for name in results[mode]["per_box"]["oof_pred"]:
                add(f"{mode}-{modes[0]}/{name}/gap_difference", gaps[mode, name] - gaps[modes[0], name])
    return {
        k: {"p05": float(np.percentile(v, 5)), "p95": float(np.percentile(v, 95)), "sd": float(np.std(v))}
        for k, v in samples.items()
    }


# ------------------------------------------------------------------------------------------------------- reports
def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return float(np.mean(got)) if got else None


def _fmt(value: float | None, signed: bool = False) -> str:
    return "—" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def _interval(boot: dict[str, Any], key: str) -> str:
    got = boot.get(key)
    return "" if not got else f" [{got['p05']:+.3f}, {got['p95']:+.3f}]"


def markdown(out: dict[str, Any]) -> str:
    """The tables, one row per mode, member (or ensemble) and seed, each value with its own seed's bootstrap
    interval; then the selection's own optimism per seed and its mean over seeds."""
    a, seeds, modes = out["args"], out["seeds"], out["args"]["modes"]
    lines = [
        f"OOF optimism by checkpoint selection (`trainer.select`): {a['images']} generated images "
        f"({out['data']['n_train_boxes']} training boxes in {a['folds']} folds, {out['data']['n_test_boxes']} test "
        f"boxes), members {', '.join(a['members'])} at {a['img_size']} px, {a['epochs']} epochs, training seed(s) "
        f"{', '.join(map(str, seeds))}. [..]: 5–95 % of a paired bootstrap over images, for that seed's models.",
        "",
        "| mode | member | seed | OOF macro-F1 | test macro-F1 (same fold models) | gap = optimism | test macro-F1 "
        "(fold-averaged) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode in modes:
        for name in a["members"]:
            for seed in seeds:
                r, boot = out["results"][str(seed)][mode]["members"][name], out["bootstrap"].get(str(seed), {})
                lines.append(
                    f"| {mode} | {name} | {seed} | {_fmt(r['oof_f1'])} | {_fmt(r['test_f1_fold_models'])} | "
                    f"{_fmt(r['gap'], True)}{_interval(boot, f'{mode}/{name}/gap')} | {_fmt(r['test_f1'])} |"
                )
    lines += [
        "",
        "| mode | seed | ensemble OOF gain over best member (in-sample) | held-out gain (`cytologia tune`, "
        "cross-fitted) | test gain | ensemble test macro-F1 | tuned weights |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode in modes:
        for seed in seeds:
            r, boot = out["results"][str(seed)][mode]["ensemble"], out["bootstrap"].get(str(seed), {})
            weights = ", ".join(f"{k} {v:.2f}" for k, v in r["weights"].items())
            lines.append(
                f"| {mode} | {seed} | {_fmt(r['oof_gain'], True)}{_interval(boot, f'{mode}/ensemble/oof_gain')} | "
                f"{_fmt(r['tune_heldout_gain'], True)} | "
                f"{_fmt(r['test_gain'], True)}{_interval(boot, f'{mode}/ensemble/test_gain')} | "
                f"{_fmt(r['test_f1'])} | {weights} |"
            )
    if len(modes) > 1:
        lines += ["", f"Selection's own optimism (gap of a mode minus gap of `{modes[0]}`, same trained weights):", ""]
        for mode in modes[1:]:
            for name in a["members"]:
                key = f"{mode}-{modes[0]}/{name}/gap_difference"
                diffs, each = [], []
                for seed in seeds:
                    res = out["results"][str(seed)]
                    diffs.append(res[mode]["members"][name]["gap"] - res[modes[0]]["members"][name]["gap"])
                    each.append(
                        f"seed {seed} {_fmt(diffs[-1], True)}{_interval(out['bootstrap'].get(str(seed), {}), key)}"
                    )
                mean = "" if len(seeds) < 2 else f"; mean {_fmt(_mean(diffs), True)}"
                lines.append(f"- {name}, {mode}: {'; '.join(each)}{mean}")
    same = out.get("same_training")
    if same is not None:
        lines += ["", f"Same training in every mode (identical validation curves): {same}."]
    lines += ["", f"Wall time {out['wall_seconds'] / 60:.1f} min ({out['machine']})."]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


# ---------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out = args.out.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import lightning  # noqa: F401  (its loggers exist from here on)

    for name in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities.rank_zero", "cytologia"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*LeafSpec.*", ".*smaller than the logging interval.*", ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=message)
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    root = make_data(args)

    from cytologia.data.io import read_annotations

    truth, _ = read_annotations(root / "train.csv", lenient=True)
    test = pd.read_csv(root / "test_labels.csv", dtype={"NAME": str}, keep_default_na=False)
    test = test.rename(columns={"trustii_id": "box_id"})[["NAME", "box_id", "x1", "y1", "x2", "y2", "class"]]
    noisy = red_cell_rows(root)

    results: dict[str, dict[str, Any]] = {}
    boots: dict[str, Any] = {}
    train_seconds: dict[str, float] = {}
    same_training = True
    for seed in args.seeds:
        results[str(seed)] = {}
        for mode in args.modes:
            runs = {}
            for name in args.members:
                runs[name], seconds = train_member(args, root, name, mode, seed)
                train_seconds[f"seed{seed}/{mode}/{name}"] = round(seconds, 1)
            results[str(seed)][mode] = evaluate_mode(args, root, runs, mode, seed, truth, test, noisy)
            log.info(
                "seed %d %s: %s",
                seed,
                mode,
                {n: round(m["gap"], 3) for n, m in results[str(seed)][mode]["members"].items()},
            )
        for name in args.members:
            curves = [results[str(seed)][m]["members"][name]["val_curves"] for m in args.modes]
            same_training &= all(c == curves[0] for c in curves)
        boots[str(seed)] = bootstrap(results[str(seed)], args.bootstrap, seed)
    for per_seed in results.values():
        for res in per_seed.values():
            res.pop("per_box")
    out = {
        "args": {k: v for k, v in vars(args).items()},
        "data": {
            "root": root,
            "n_train_boxes": int(len(truth)),
            "n_test_boxes": int(len(test)),
            "n_red_cell_boxes_left_out_of_oof": len(noisy),
        },
        "seeds": args.seeds,
        "results": results,
        "bootstrap": boots,
        "same_training": same_training,
        "train_seconds": train_seconds,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
        f"{__import__('torch').get_num_threads()}",
    }
    out = _json_safe(out)
    (args.out / "oof_optimism.json").write_text(json.dumps(out, indent=1) + "\n")
    text = markdown(out)
    (args.out / "oof_optimism.md").write_text(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
