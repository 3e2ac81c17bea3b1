"""The console of a run: each Lightning line once (under Hydra's logging, as train.py sets it up), no Lightning tips,
no libjpeg warnings (one line per stage instead) -- in `train()` and in each pipeline step."""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir

from cytologia.console import LIGHTNING_LOGGERS, RANK_ZERO_LOGGERS, route_lightning_logs
from cytologia.data.images import JPEG_WARNINGS_FILE, decode
from cytologia.data.synthetic.defects import insert_extraneous_bytes

lightning = pytest.importorskip("lightning")
from lightning.pytorch.utilities.rank_zero import rank_zero_info  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LINE = "GPU available: False, used: False"
Setup = Callable[[], Path]  # the hydra_logging fixture: sets logging up, returns the run's log file
TIP = "💡 Tip: For seamless cloud uploads and versioning, try installing [litmodels](https://pypi.org/project)"


@pytest.fixture()
def hydra_logging(tmp_path: Path) -> Iterator[Setup]:
    """``setup()`` makes logging what ``python train.py`` has: Hydra's default job logging (root: a console handler on
    the standard output and the run's log file, whose path it returns), and Lightning as its import leaves it (its
    own console handler, on the standard error, on the ``lightning`` logger). Call it inside the test, where
    ``capfd`` has replaced the standard streams. Restored afterwards."""
    names = ["", *LIGHTNING_LOGGERS, *RANK_ZERO_LOGGERS]
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level,
                 logging.getLogger(n).filters[:]) for n in names}  # fmt: skip
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


def test_routed_lightning_lines_print_once_and_tips_not_at_all(
    hydra_logging: Setup, capfd: pytest.CaptureFixture[str]
) -> None:
    log_file = hydra_logging()
    route_lightning_logs()
    route_lightning_logs()  # twice does no harm
    capfd.readouterr()
    rank_zero_info(LINE)
    rank_zero_info(TIP)
    out, err = capfd.readouterr()
    assert (out + err).count(LINE) == 1 and LINE in out  # once, through Hydra's console handler (stdout)
    assert "Tip:" not in out + err
    logged = log_file.read_text()
    assert logged.count(LINE) == 1 and "Tip:" not in logged  # and in the run's log file


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
        decode(image)
        return {}

    monkeypatch.setattr(train_module, "stage_function", lambda name: stage)
    hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=det_smoke", f"paths.data_dir={tmp_path / 'data'}"])
    capfd.readouterr()
    train_module.train(cfg, run_dir=tmp_path / "run")
    out, err = capfd.readouterr()
    assert (out + err).count(LINE) == 1 and "Tip:" not in out + err
    assert "Corrupt JPEG" not in out + err
    assert (tmp_path / "run" / JPEG_WARNINGS_FILE).is_file()
    assert "detector: 1 image(s) decoded with JPEG warnings" in out


def test_pipeline_classifier_step_routes_lightning(
    hydra_logging: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pipeline Lightning is imported by the classifier step itself: that step routes its logs."""
    import cytologia.classification.stage as cls_stage
    from cytologia.pipeline import _classifier

    monkeypatch.setattr(cls_stage, "run", lambda cfg, out: rank_zero_info(LINE))
    hydra_logging()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+exp=smoke"])
    capfd.readouterr()
    _classifier(cfg, tmp_path / "cls")
    assert _count(capfd, LINE) == 1


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
