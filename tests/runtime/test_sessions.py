"""ONNX Runtime sessions: provider choice, fp16 conversion, measured int8; the CUDA path when a GPU is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from cytologia.errors import CytologiaInputError
from cytologia.runtime.sessions import (
    CPU,
    CUDA,
    TENSORRT,
    OrtModel,
    choose_providers,
    input_is_fp16,
    measure_int8,
    to_fp16,
)


@pytest.fixture(scope="module")
def small_graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from cytologia.classification.export import export_classifier_onnx
    from cytologia.classification.models import create_classifier

    torch.manual_seed(0)
    model = create_classifier("resnet10t", 23, img_size=48)
    return export_classifier_onnx(model, tmp_path_factory.mktemp("graph") / "small.onnx", 48)


def test_choose_providers() -> None:
    everything = [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", everything, tensorrt=True) == [TENSORRT, CUDA, CPU]
    assert choose_providers("auto", everything, tensorrt=False) == [CUDA, CPU]  # the build has it, TensorRT is absent
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cuda", everything) == [CUDA, CPU]
    assert choose_providers("tensorrt", everything) == [TENSORRT, CUDA, CPU]
    assert choose_providers("cpu", everything) == [CPU]
    with pytest.raises(CytologiaInputError, match="onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    with pytest.raises(CytologiaInputError, match="TensorrtExecutionProvider"):
        choose_providers("tensorrt", [CUDA, CPU])
    with pytest.raises(CytologiaInputError, match="one of"):
        choose_providers("gpu", everything)


def test_fp16_conversion_keeps_float32_inputs_and_outputs(small_graph: Path) -> None:
    proto = onnx.load(str(small_graph))
    half = to_fp16(proto)
    assert not input_is_fp16(half)  # io types kept: callers feed float32
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dtypes = {init.data_type for init in half.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes
    # on the CPU fp16 is not applied (ONNX Runtime's CPU kernels are fp32): same numbers as fp32
    x = np.random.default_rng(0).normal(size=(2, 3, 48, 48)).astype(np.float32)
    cpu = OrtModel(small_graph, device="cpu", fp16=True, threads=1)
    assert cpu.precision == "fp32" and cpu.providers == [CPU]
    np.testing.assert_allclose(cpu(x), OrtModel(small_graph, device="cpu", threads=1)(x), atol=1e-6)


def test_int8_is_measured_not_assumed(small_graph: Path) -> None:
    x = np.random.default_rng(1).normal(size=(8, 3, 48, 48)).astype(np.float32)
    lenient, session = measure_int8(small_graph, x, threads=1, repeats=2, min_speedup=0.0, max_prob_change=1.0)
    assert lenient.accepted and session is not None and session.precision == "int8"
    assert set(lenient.int8_ms) == {"all", "matmul"} and lenient.fp32_ms > 0
    assert all(0.0 <= a <= 1.0 for a in lenient.argmax_agreement.values())
    # the kept variant is the fastest of those that pass (every variant passes these bounds)
    passing = [v for v, a in lenient.argmax_agreement.items() if a == 1.0]
    if passing:
        assert lenient.variant == min(passing, key=lambda v: lenient.int8_ms[v])
    assert session(x).shape == (8, 23)
    strict, none = measure_int8(small_graph, x, threads=1, repeats=2, min_speedup=100.0)
    assert not strict.accepted and none is None and strict.reason.startswith("refused")


@pytest.mark.ultralytics
def test_pipeline_int8_on_and_measured(tiny) -> None:
    import pandas as pd

    from cytologia.data.io import read_test
    from cytologia.runtime.inference import Pipeline

    test = read_test(tiny.data / "test.csv")
    names = list(pd.unique(test["NAME"]))[:3]
    paths = [tiny.data / "images" / n for n in names]
    ens = tiny.ensemble()
    ens.members = ens.members[:1]  # one member of two fold models: quantising is the slow part
    pipe = Pipeline(ens, runtime="onnx", device="cpu", threads=1, int8="on")
    assert all(m["precision"] == "int8" for member in pipe.describe()["members"] for m in member["models"])
    result = pipe.predict(paths, counts=test.groupby("NAME").size())
    assert len(result.boxes) == int(test["NAME"].isin(names).sum())
    measured = Pipeline(ens, runtime="onnx", device="cpu", threads=1)
    decisions = measured.calibrate_int8(paths)
    assert len(decisions) == 2  # each fold model measured
    kept = [d for d in decisions if d["accepted"]]
    precisions = [m["precision"] for member in measured.describe()["members"] for m in member["models"]]
    assert precisions.count("int8") == len(kept)
    with pytest.raises(CytologiaInputError, match="ONNX Runtime"):
        Pipeline(tiny.ensemble(), runtime="torch", int8="on")


@pytest.mark.gpu
def test_cuda_fp16_session(small_graph: Path) -> None:
    x = np.random.default_rng(2).normal(size=(4, 3, 48, 48)).astype(np.float32)
    gpu = OrtModel(small_graph, device="cuda")
    assert gpu.on_gpu and gpu.precision.startswith("fp16")
    ref = OrtModel(small_graph, device="cpu")(x)
    assert np.abs(gpu(x) - ref).max() < 0.05 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.gpu
def test_cuda_pipeline_runs(tiny) -> None:
    import pandas as pd

    from cytologia.data.io import read_test
    from cytologia.runtime.inference import Pipeline

    test = read_test(tiny.data / "test.csv")
    names = list(pd.unique(test["NAME"]))[:4]
    counts = test.groupby("NAME").size()
    for runtime in ("onnx", "torch"):
        result = Pipeline(tiny.ensemble(), runtime=runtime, device="cuda").predict(
            [tiny.data / "images" / n for n in names], counts=counts
        )
        assert len(result.boxes) == int(counts.reindex(names).sum())
