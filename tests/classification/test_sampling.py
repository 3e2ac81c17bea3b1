"""Per-data-set sampling weights (``data.sampling_weights``): the draw probabilities, the loader that uses them, and
a combined training run (a generated Cytologia set + an imported folder-per-class set, leave-one-data-set-out folds,
weights from the config)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import WeightedRandomSampler

from cytologia.classification.datamodule import UNGROUPED, CropDataModule, CropSource, sampling_weights
from cytologia.data.combine import combine_folders
from cytologia.data.importers import ImportOptions, import_dataset
from cytologia.data.schema import labels
from cytologia.data.synthetic.generate import SynthConfig, generate
from cytologia.data.synthetic.render import render_image
from cytologia.errors import CytologiaInputError
from cytologia.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _share(prob: np.ndarray, groups: list[str]) -> dict[str, float]:
    return pd.Series(prob).groupby(np.asarray(groups)).sum().round(10).to_dict()


def test_sampling_weights_shares() -> None:
    groups = ["big"] * 90 + ["small"] * 10
    assert _share(sampling_weights(groups, {"big": 1, "small": 1}), groups) == {"big": 0.5, "small": 0.5}
    # An unnamed group keeps its natural share (20 %); the named ones split the other 80 % as 1:3.
    groups = ["a"] * 60 + ["b"] * 20 + [UNGROUPED] * 20
    assert _share(sampling_weights(groups, {"a": 1, "b": 3}), groups) == {"a": 0.2, "b": 0.6, UNGROUPED: 0.2}
    prob = sampling_weights(groups, {"a": 0, "b": 1})
    assert prob[:60].sum() == 0 and prob[60:80].sum() == pytest.approx(0.8)
    assert np.allclose(prob[60:80], prob[60])  # uniform within a group
    # A held-out data set's weight is ignored: the others keep their weights among themselves.
    assert _share(sampling_weights(groups, {"a": 1, "b": 3, "held_out": 5}), groups) == {
        "a": 0.2,
        "b": 0.6,
        UNGROUPED: 0.2,
    }
    assert np.allclose(sampling_weights(groups, {"held_out": 1}), 1 / 100)  # nothing named trains: uniform
    with pytest.raises(CytologiaInputError, match="must be >= 0"):
        sampling_weights(groups, {"a": -1, "b": 1})
    with pytest.raises(CytologiaInputError, match="all 0"):
        sampling_weights(groups, {"a": 0, "b": 0})


def test_loader_draws_by_data_set(tmp_path: Path) -> None:
    boxes = pd.DataFrame({"NAME": "x.jpg", "box_id": range(100), "x1": 0, "y1": 0, "x2": 8, "y2": 8, "class": "LY"})
    boxes["dataset"] = ["cytologia"] * 90 + ["pbc"] * 10
    background = boxes.iloc[:20].drop(columns="dataset").assign(**{"class": "background"})
    sources = [CropSource(boxes, tmp_path), CropSource(background, tmp_path)]
    names = list(labels(background=True))
    weights = {"pbc": 1, "cytologia": 1}
    data = CropDataModule(sources, CropSource(boxes, tmp_path), names, 16, batch_size=10, sampling=weights)
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler) and loader.sampler.num_samples == 120
    torch.manual_seed(0)
    draws = np.concatenate([list(iter(loader.sampler)) for _ in range(50)])  # indices only: nothing decoded
    groups = np.array(boxes["dataset"].tolist() + [UNGROUPED] * 20)
    # The background (no dataset column) keeps its natural 20/120; pbc and cytologia split the rest 1:1, so the 10
    # pbc crops are drawn as often as the 90 cytologia ones.
    observed = pd.Series(groups[draws]).value_counts(normalize=True)
    assert observed["pbc"] == pytest.approx(5 / 12, abs=0.03) and observed["cytologia"] == pytest.approx(
        5 / 12, abs=0.03
    )
    assert observed[UNGROUPED] == pytest.approx(1 / 6, abs=0.02)
    # Without weights: plain shuffling, every item once.
    plain = CropDataModule(sources, CropSource(boxes, tmp_path), names, 16, batch_size=10)
    assert not isinstance(plain.train_dataloader().sampler, WeightedRandomSampler)


class _Grab:
    """Records, per training loader built, its items' data sets and the draw probabilities it got."""

    def __init__(self) -> None:
        self.fits: list[tuple[list[str], np.ndarray | None]] = []

    def wrap(self, method):  # noqa: ANN001, ANN201
        def recorded(data: CropDataModule) -> np.ndarray | None:
            prob = method(data)
            groups = [g for s in data.train_sources for g in s.table.get("dataset", [UNGROUPED] * len(s.table))]
            self.fits.append((groups, prob))
            return prob

        return recorded


def _folder_set(root: Path, cells: list[tuple[str, str]], seed: int) -> Path:
    """Rendered single cells in class folders (folder name, Cytologia class to render), 64 px."""
    for k, (folder, cls) in enumerate(cells):
        image, _ = render_image(np.random.default_rng(seed + k), f"S0{3 + seed % 5}", [cls], 64)
        (root / folder).mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / folder / f"{k}.jpg"), image)
    return root


@pytest.fixture(scope="module")
def combined(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Cytologia set (40 images) + imported Raabin-style (12 cells) and LISC-style (8 cells) folder sets,
    combined into one folder."""
    base = tmp_path_factory.mktemp("combined")
    generate(base / "cytologia", 40, seed=0, config=SynthConfig(size=96, test_fraction=0.0))
    raabin = _folder_set(base / "raabin", [("Neutrophil", "PNN"), ("Lymphocyte", "LY"), ("Monocyte", "MO")] * 4, 0)
    lisc = _folder_set(base / "lisc", [("neut", "PNN"), ("lymp", "LY")] * 4, 1)
    import_dataset("folder", raabin, base / "raabin_in", ImportOptions(class_map="raabin"))
    import_dataset("folder", lisc, base / "lisc_in", ImportOptions(class_map="lisc"))
    parts = {"cytologia": base / "cytologia", "raabin": base / "raabin_in", "lisc": base / "lisc_in"}
    combine_folders(parts, base / "all", lenient=True)
    return base / "all"


def _cfg(root: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                "+exp=smoke",
                f"data.root={root}",
                "data.synthetic=false",
                f"paths.output_dir={out}",
                "classifier.name=test_convnext",
                "classifier.img_size=32",
                "folds=group_dataset",
                "trainer.batch_size=4",
                *overrides,
            ],
        )


def test_combined_training_leave_one_data_set_out_with_weights(
    combined: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grab = _Grab()
    monkeypatch.setattr(CropDataModule, "train_probabilities", grab.wrap(CropDataModule.train_probabilities))
    cfg = _cfg(combined, tmp_path, "fold=null", "data.sampling_weights={raabin: 1, lisc: 3}")
    result = train(cfg, run_dir=tmp_path / "run")
    assert result["folds_trained"] == [0, 1]

    folds = pd.read_csv(combined / "folds.csv")
    datasets = pd.read_csv(combined / "sources.csv").set_index("NAME")["dataset"]
    by_dataset = folds.groupby(folds["NAME"].map(datasets))["fold"].agg(["nunique", "first"])
    assert (by_dataset["nunique"] == 1).all()  # each data set wholly in one fold
    assert by_dataset.loc["raabin", "first"] == by_dataset.loc["lisc", "first"] != by_dataset.loc["cytologia", "first"]

    # The fold holding out Cytologia trains on raabin + lisc, drawn 1:3 whatever their sizes (12 and 8 cells).
    ((groups, prob),) = [fit for fit in grab.fits if "cytologia" not in fit[0]]
    assert set(groups) == {"raabin", "lisc"} and prob is not None
    assert _share(prob, groups) == {"lisc": 0.75, "raabin": 0.25}
    # The fold holding out raabin + lisc trains on Cytologia alone, which the weights do not name: uniform draws.
    ((groups, prob),) = [fit for fit in grab.fits if "cytologia" in fit[0]]
    assert set(groups) == {"cytologia"} and np.allclose(prob, 1 / len(prob))
    # A misspelt data set is refused before training.
    with pytest.raises(CytologiaInputError, match="names data set\\(s\\) rabin that"):
        train(_cfg(combined, tmp_path, "data.sampling_weights={rabin: 1}"), run_dir=tmp_path / "run2")


def test_sampling_weights_need_data_sets(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    generate(root, 12, seed=0, config=SynthConfig(size=96, test_fraction=0.0))
    (root / "sources.csv").unlink()
    cfg = _cfg(root, tmp_path, "folds=stratified", "folds.k=2", "data.sampling_weights={cytologia: 1}")
    with pytest.raises(CytologiaInputError, match="no dataset column: combine the data sets first"):
        train(cfg, run_dir=tmp_path / "run")
