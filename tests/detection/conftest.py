"""One tiny detector run shared by the detection tests (training is the slow part): the ``det_smoke`` experiment end
to end -- synthetic data generated, folds made, 1 epoch of YOLO11n at 128 px on CPU, out-of-fold boxes with flip
TTA -- run with every network call made to fail and recorded (:func:`network_guard`)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@contextmanager
def network_guard() -> Iterator[list[str]]:
    """Make every IP connection and DNS lookup raise, and record it in the yielded list (Unix-domain sockets, which
    multiprocessing uses between local processes, stay allowed).

    Recording matters: ultralytics swallows connection errors in places (``is_url(check=True)`` returns False), so a
    raised error alone could go unnoticed; the tests assert the list is empty.
    """
    attempts: list[str] = []
    inet = (socket.AF_INET, socket.AF_INET6)

    def refuse(what: str, target: object) -> None:
        attempts.append(f"{what}({target!r})")
        raise OSError(f"network access attempted in an offline test: {what}({target!r})")

    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if self.family in inet:
            refuse("connect", address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in inet:
            refuse("connect_ex", address)
        return real_connect_ex(self, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "create_connection", lambda address, *a, **k: refuse("create_connection", address))
        mp.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse("getaddrinfo", host))
        yield attempts


@dataclass
class SmokeRun:
    run_dir: Path
    data_dir: Path
    result: dict
    attempts: list[str] = field(default_factory=list)
    threads: tuple[int, int] = (0, 0)  # torch's thread count set before training, and found after it

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "fold_0" / "detector.pt"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    from cytologia.train import train

    base = tmp_path_factory.mktemp("det_smoke")
    cfg = compose_config(
        "+exp=det_smoke",
        f"paths.data_dir={base / 'data'}",
        f"paths.output_dir={base / 'outputs'}",
        f"paths.cache_dir={base / 'cache'}",
        "fold=0",
    )
    import torch
    from ultralytics.utils import NUM_THREADS  # what ultralytics' select_device sets torch's thread count to

    caller = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)  # a count ultralytics would overwrite
    try:
        with network_guard() as attempts:
            result = train(cfg, run_dir=base / "run")
        threads = (NUM_THREADS + 1, torch.get_num_threads())
    finally:
        torch.set_num_threads(caller)
    return SmokeRun(base / "run", base / "data" / "synthetic", result, list(attempts), threads)
