"""The console of a run: Lightning's and ultralytics' INFO lines in the run's log file only (under Hydra's logging,
as train.py sets it up), their warnings once on the console, no Lightning tips, no libjpeg warnings (one line per stage
instead), the config named in one line -- in `train()` and in each pipeline step."""

from __future__ import annotations

import logging
import logging.config
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from cytologia.console import (
    LIGHTNING_LOGGERS,
    RANK_ZERO_LOGGERS,
    ULTRALYTICS_LOGGER,
    RunLogOnly,
    route_lightning_logs,
)
from cytologia.data.images import JPEG_WARNINGS_FILE, decode
from cytologia.data.synthetic.defects import insert_extraneous_bytes

lightning = pytest.importorskip("lightning")
from lightning.pytorch.utilities.rank_zero import rank_zero_info  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LINE = "GPU available: False, used: False"  # an INFO line: the run's log file only
WARN = "a Lightning warning the user should see"
Setup = Callable[[], Path]  # the hydra_logging fixture: sets logging up, returns the run's log file
TIP = "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/project)"


@pytest.fixture()
def hydra_logging(tmp_path: Path) -> Iterator[Setup]:
    """``setup()`` makes logging what ``python train.py`` has: Hydra's default job logging (root: a console handler on
    the standard output and the run's log file, whose path it returns), and Lightning as its import leaves it (its
    own console handler, on the standard error, on the ``lightning`` logger). Call it inside the test, where
    ``capfd`` has replaced the standard streams. Restored afterwards."""
    names = ["", *LIGHTNING_LOGGERS, *RANK_ZERO_LOGGERS]
    saved = {
        n: (
            logging.getLogger(n).handlers[:],
            logging.getLogger(n).propagate,
            logging.getLogger(n).level,
            logging.getLogger(n).filters[:],
        )
        for n in names
    }
    stream = lightning._console.stream

    def setup() -> Path:
        import hydra

        spec = yaml.safe_load((Path(hydra.__file__).parent / "conf/hydra/job_logging/default.yaml").read_text())
        log_file = tmp_path / "train.log"
        spec["handlers"]["file"]["filename"] = str(log_file)
        logging.config.dictConfig(spec)
        for n in LIGHTNING_LOGGERS:  # as a fresh import of Lightning leaves them (an earlier test may have routed)
            logging.getLogger(n).propagate = True
        for n in RANK_ZERO_LOGGERS:
            logging.getLogger(n).filters.clear()
        lightning._console.stream = sys.stderr  # the stream of an import now (it was imported earlier)
        if lightning._console not in logging.getLogger("lightning").handlers:
            logging.getLogger("lightning").addHandler(lightning._console)
        return log_file

    yield setup
    lightning._console.stream = stream
    for n, (handlers, propagate, level, filters) in saved.items():
        logger = logging.getLogger(n)
        for h in logger.handlers[:]:
            if h not in handlers:
                h.close()
        logger.handlers[:], logger.propagate, logger.filters[:] = handlers, propagate, filters
        logger.setLevel(level)


def _count(capfd: pytest.CaptureFixture[str], text: str) -> int:
    out, err = capfd.readouterr()
    return (out + err).count(text)


def _damaged(path: Path) -> Path:
    """A JPEG with junk before its end marker (the synthetic set's defect): libjpeg warns on every decode."""
    image = cv2.resize(np.arange(144, dtype=np.uint8).reshape(6, 8, 3), (96, 72), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", image)
    assert ok
    path.write_bytes(insert_extraneous_bytes(np.random.default_rng(0), buf.tobytes())[0])
    return path


def test_lightning_lines_twice_without_routing(hydra_logging: Setup, capfd: pytest.CaptureFixture[str]) -> None:
    """The problem: Lightning's own console handler and Hydra's root handler both print each line."""
    hydra_logging()
    capfd.readouterr()
    rank_zero_info(LINE)
    assert _count(capfd, LINE) == 2


def _lightning_warning() -> None:
    logging.getLogger("lightning.pytorch.trainer").warning(WARN)


def test_routed_lightning_info_in_the_log_file_warnings_once_tips_nowhere(
    hydra_logging: Setup, capfd: pytest.CaptureFixture[str]
) -> None:
    log_file = hydra_logging()
    route_lightning_logs()
    route_lightning_logs()  # twice does no harm
    capfd.readouterr()
    rank_zero_info(LINE)
    rank_zero_info(TIP)
    _lightning_warning()
    out, err = capfd.readouterr()
    assert LINE not in out + err  # INFO: not on the console...
    assert (out + err).count(WARN) == 1 and WARN in out  # a warning: once, through Hydra's console handler (stdout)
    assert "Tip:" not in out + err
    logged = log_file.read_text()
    assert logged.count(LINE) == 1 and logged.count(WARN) == 1 and "Tip:" not in logged  # ...in the run's log file


def test_routed_lightning_without_a_log_file_or_any_logging(
    hydra_logging: Setup, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where nothing would keep an INFO line (no log file; no logging set up at all) it still reaches the console."""
    hydra_logging()
    route_lightning_logs()
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not isinstance(h, logging.FileHandler)])
    capfd.readouterr()
    rank_zero_info(LINE)
    out, err = capfd.readouterr()
    assert out.count(LINE) == 1 and LINE not in err  # Hydra's console handler, the only root handler left
    monkeypatch.setattr(root, "handlers", [])
    rank_zero_info(LINE)
    out, err = capfd.readouterr()
    assert err.count(LINE) == 1 and LINE not in out  # Lightning's own console handler (standard error)


def _tiny_fit(root: Path) -> None:
    """One epoch of a one-layer model on one batch, logged every step, with ``log_every_n_steps=5``: the fit of a
    classifier on a small fold, with the warnings it gives."""
    import torch
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("loss", loss, on_step=True, on_epoch=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=4)
    trainer = lightning.Trainer(
        max_epochs=1,
        log_every_n_steps=5,
        logger=CSVLogger(root),
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), data)


def test_lightning_warnings_without_news_for_the_user_are_quiet(hydra_logging: Setup, tmp_path: Path) -> None:
    """The two warnings of a small classifier fit that say nothing a user of cytologia can act on (Lightning's own
    use of a deprecated torch API; fewer batches than the logging interval) are gone after routing; others stay."""
    hydra_logging()
    leaf, interval = "`isinstance(treespec, LeafSpec)` is deprecated", "is smaller than the logging interval"
    with warnings.catch_warnings(record=True) as before:
        warnings.simplefilter("always")
        _tiny_fit(tmp_path / "before")
    seen = [str(w.message) for w in before]
    assert any(leaf in m for m in seen) and any(interval in m for m in seen)  # what a fit gives without routing
    with warnings.catch_warnings(record=True) as after:
        warnings.simplefilter("always")
        route_lightning_logs()
        _tiny_fit(tmp_path / "after")
        warnings.warn("some other deprecation", FutureWarning, stacklevel=1)
    seen = [str(w.message) for w in after]
    assert not any(leaf in m or interval in m for m in seen)
    assert "some other deprecation" in seen


def test_train_routes_lightning_and_captures_libjpeg(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``train()`` (what ``python train.py`` runs): a stage's Lightning line once, no tip, no libjpeg warning on the
    console, the list of damaged images in the run folder."""
    import cytologia.train as train_module

    image = _damaged(tmp_path / "damaged.jpg")

    def stage(cfg: object, run_dir: Path) -> dict[str, object]:
        rank_zero_info(LINE)
        rank_zero_info(TIP)
        _lightning_warning()
        decode(image)
        return {}

    monkeypatch.setattr(train_module, "stage_function", lambda name: stage)
    log_file = hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=det_smoke", f"paths.data_dir={tmp_path / 'data'}"])
    capfd.readouterr()
    train_module.train(cfg, run_dir=tmp_path / "run")
    out, err = capfd.readouterr()
    assert LINE not in out + err and (out + err).count(WARN) == 1 and "Tip:" not in out + err
    assert log_file.read_text().count(LINE) == 1
    assert "Corrupt JPEG" not in out + err
    assert (tmp_path / "run" / JPEG_WARNINGS_FILE).is_file()
    assert "detector: 1 image(s) decoded with JPEG warnings" in out


def test_train_names_its_config_file_instead_of_printing_it(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolved config is in the run folder; the console gets one line naming that file, not 100+ lines."""
    import cytologia.train as train_module

    monkeypatch.setattr(train_module, "stage_function", lambda name: lambda cfg, run_dir: {})
    hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=demo", f"paths.data_dir={tmp_path / 'data'}"])
    capfd.readouterr()
    train_module.train(cfg, run_dir=tmp_path / "run")
    out, err = capfd.readouterr()
    config = tmp_path / "run" / "config.yaml"
    assert "exp_name: demo" in config.read_text()
    printed = [line for line in (out + err).splitlines() if line.strip()]
    assert len(printed) == 1 and printed[0].endswith(f"demo: resolved config in {config}") and printed[0] in out


def test_pipeline_classifier_step_routes_lightning(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pipeline Lightning is imported by the classifier step itself: that step routes its logs."""
    import cytologia.classification.stage as cls_stage
    from cytologia.pipeline import _classifier

    monkeypatch.setattr(cls_stage, "run", lambda cfg, out: (rank_zero_info(LINE), _lightning_warning()))
    hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=smoke"])
    capfd.readouterr()
    _classifier(cfg, tmp_path / "cls")
    out, err = capfd.readouterr()
    assert LINE not in out + err and (out + err).count(WARN) == 1


def test_pipeline_steps_keep_libjpeg_off_the_console(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pipeline.run``: a step that decodes a damaged JPEG prints one line, its list lands in the run folder; a
    failing step's error still propagates."""
    import cytologia.pipeline as pipeline

    image = _damaged(tmp_path / "damaged.jpg")

    class Stop(Exception):
        pass

    def ensure_data(cfg: object) -> None:  # the first step's work: decode, then stop the run there
        decode(image)
        os.write(2, b"other output of the step\n")
        raise Stop

    monkeypatch.setattr(pipeline, "ensure_data", ensure_data)
    hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=demo", f"paths.data_dir={tmp_path / 'data'}"])
    capfd.readouterr()
    with pytest.raises(Stop):
        pipeline.run(cfg, tmp_path / "run")
    out, err = capfd.readouterr()
    assert "Corrupt JPEG" not in out + err and "other output of the step\n" in err
    assert "data: 1 image(s) decoded with JPEG warnings" in out
    assert (tmp_path / "run" / "jpeg_warnings_data.csv").is_file()


UL_WARN = "an ultralytics warning the user should see"


@pytest.mark.ultralytics
def test_ultralytics_info_in_the_log_file_only_warnings_on_the_console_too(
    hydra_logging: Setup, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing the detector backend routes ultralytics' logger: its INFO lines (colour codes stripped) go to the
    run's log file only, its warnings to the console too; its progress bars are still drawn; with no logging set up
    its own console handler prints everything, as before."""
    from ultralytics.utils import LOGGER
    from ultralytics.utils.tqdm import TQDM

    import cytologia.detection.ultralytics_backend  # noqa: F401  (importing the backend routes ultralytics' logger)

    assert LOGGER.name == ULTRALYTICS_LOGGER
    assert not [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]  # its console handler: the fallback
    log_file = hydra_logging()
    capfd.readouterr()
    LOGGER.info("\x1b[34m\x1b[1mengine/trainer: \x1b[0mepochs=1, imgsz=32")
    LOGGER.warning(UL_WARN)
    out, err = capfd.readouterr()
    assert "engine/trainer" not in out + err and (out + err).count(UL_WARN) == 1
    logged = log_file.read_text()
    assert "engine/trainer: epochs=1, imgsz=32" in logged and "\x1b[" not in logged and logged.count(UL_WARN) == 1
    bar = TQDM(range(2))
    assert not bar.disable  # ultralytics draws a bar only while its logger shows INFO: the level is left alone
    bar.close()
    router = next(h for h in LOGGER.handlers if isinstance(h, RunLogOnly))
    assert router.fallback is not None
    monkeypatch.setattr(router.fallback, "stream", sys.stdout)  # ultralytics' handler, on the stream capfd reads
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    capfd.readouterr()
    LOGGER.info("model summary")
    assert capfd.readouterr().out.count("model summary") == 1


def _detection_data(root: Path) -> object:
    """Four small random images, three boxes, two folds (fold 1 held out): a detector trains on it in seconds."""
    import pandas as pd

    from cytologia.detection import DetectionData

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    names = [f"im{i}.jpg" for i in range(4)]
    for name in names:
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    table = pd.DataFrame(
        {"NAME": names[:3], "x1": [8.0, 10, 20], "y1": [8.0, 12, 4], "x2": [40.0, 50, 44], "y2": [36.0, 40, 30]}
    )
    folds = pd.DataFrame({"NAME": names, "fold": [0, 0, 1, 1]})
    return DetectionData(table=table, folds=folds, image_dir=root / "images", fold=1, cache_dir=root / "cache")


@pytest.mark.ultralytics
def test_ultralytics_training_prints_its_progress_bars_not_its_tables(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A detector's training: on the console ultralytics' progress bars and nothing of its model summary, argument
    dump, per-epoch validation table or closing lines; all of those in the run's log file."""
    from cytologia.detection import create_detector
    from cytologia.detection.registry import TrainSettings

    data = _detection_data(tmp_path / "data")
    log_file = hydra_logging()
    capfd.readouterr()
    settings = TrainSettings(epochs=1, img_size=32, batch_size=2, device="cpu", workers=0, amp=False)
    create_detector("ultralytics", "yolo11n").train(data, tmp_path / "det", settings)  # type: ignore[arg-type]
    out, err = capfd.readouterr()
    logged = log_file.read_text()
    for chatter in (
        "ultralytics.nn.modules.conv.Conv",
        "YOLO11n summary",
        "engine/trainer:",
        "optimizer:",
        "epochs completed",
        "Optimizer stripped",
        "GPU_mem",
    ):
        assert chatter not in out + err, chatter
        assert chatter in logged, chatter
    assert "1/1" in out + err and "100%" in out + err  # the bar of the one epoch, drawn to its end
