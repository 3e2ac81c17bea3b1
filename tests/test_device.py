"""cytologia.device: the one device resolver and its adapters, with and without CUDA (torch.cuda.is_available is
patched; the test marked gpu checks a real device)."""

from __future__ import annotations

import logging

import pytest
import torch

from cytologia.device import lightning_accelerator, lightning_num_nodes, resolve_device, ultralytics_device
from cytologia.errors import CytologiaInputError
from cytologia.runtime.inference import _torch_device as pipeline_device


@pytest.fixture(params=[False, True], ids=["no_cuda", "cuda"])
def cuda(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: request.param)
    return request.param


def test_auto_is_the_first_cuda_device_else_the_cpu(cuda: bool) -> None:
    assert resolve_device() == resolve_device("auto") == torch.device("cuda:0" if cuda else "cpu")
    # the adapters say the same in their library's words
    assert ultralytics_device("auto") == ("0" if cuda else "cpu")
    assert lightning_accelerator("auto") == ("cuda" if cuda else "cpu")
    assert pipeline_device("auto") == torch.device("cuda" if cuda else "cpu")  # the pipeline: no index, as before


def test_explicit_devices(cuda: bool) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" mps ") == torch.device("mps")  # built without asking whether MPS exists
    if cuda:
        assert resolve_device("1") == torch.device("cuda:1")
        assert resolve_device("cuda") == torch.device("cuda")
        assert resolve_device("cuda:2") == torch.device("cuda:2")
        assert pipeline_device("tensorrt") == pipeline_device("cuda") == torch.device("cuda")
        assert lightning_accelerator("gpu") == "gpu"
    else:
        for spec in ("0", "cuda", "cuda:1", "0,1"):
            with pytest.raises(CytologiaInputError, match=rf"detector.device='{spec}': CUDA is not available"):
                resolve_device(spec, key="detector.device")
        with pytest.raises(CytologiaInputError, match="trainer.accelerator=gpu: no CUDA device"):
            lightning_accelerator("gpu")
        with pytest.raises(CytologiaInputError, match="device tensorrt: torch sees no CUDA device"):
            pipeline_device("tensorrt")
    # values other than auto reach ultralytics as written (it parses them itself)
    assert [ultralytics_device(s) for s in ("cpu", "0", "0,1", "mps")] == ["cpu", "0", "0,1", "mps"]
    assert lightning_accelerator("cpu") == "cpu"


def test_a_list_takes_the_first_device_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.WARNING, logger="cytologia.device"):
        assert resolve_device("1, 0", key="detector.device") == torch.device("cuda:1")
    assert "detector.device='1, 0': one device is used, 1" in caplog.text


def test_bad_values_are_named() -> None:
    with pytest.raises(CytologiaInputError, match=r"detector.device='gpu0' is not a device"):
        resolve_device("gpu0", key="detector.device")
    with pytest.raises(CytologiaInputError, match="'gpu' is not one of auto, cpu, cuda"):
        pipeline_device("gpu")


def test_num_nodes_follow_the_launcher() -> None:
    assert lightning_num_nodes({}) == 1  # one machine: Lightning starts the processes
    assert lightning_num_nodes({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5"}) == 2  # torchrun, 2 x 4
    assert lightning_num_nodes({"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}) == 1
    assert lightning_num_nodes({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == 1  # Lightning's own children
    assert lightning_num_nodes({"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_NNODES": "2"}) == 2
    assert lightning_num_nodes({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_NNODES": "4"}) == 1  # one task
    with pytest.raises(CytologiaInputError, match="not a multiple of LOCAL_WORLD_SIZE=4"):
        lightning_num_nodes({"WORLD_SIZE": "6", "LOCAL_WORLD_SIZE": "4"})


@pytest.mark.gpu
def test_a_real_cuda_device() -> None:
    dev = resolve_device("auto")
    assert dev == torch.device("cuda:0")
    assert torch.ones(2, device=dev).sum().item() == 2
    assert ultralytics_device("auto") == "0" and lightning_accelerator("auto") == "cuda"
