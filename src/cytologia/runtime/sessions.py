"""ONNX Runtime sessions: execution providers, fp16 on GPU, measured int8 on CPU.

Providers (:func:`choose_providers`): ``auto`` takes TensorRT when this onnxruntime build has it *and* TensorRT's
libraries are installed (:func:`tensorrt_installed`), then CUDA, then the CPU (ONNX Runtime assigns each node to the
first provider that runs it; a provider that fails at session creation is dropped by ONNX Runtime's fallback, and
:attr:`OrtModel.providers` reports what really runs). ``cpu``, ``cuda`` and ``tensorrt`` ask for one explicitly;
asking for a provider the build lacks is an error.

Precision:

- fp16 on a GPU (``fp16="auto"``): a graph exported in fp16 runs as it is; an fp32 graph is converted in memory with
  ONNX Runtime's own converter (``onnxruntime.transformers.float16``, shipped with the wheel: nothing downloaded),
  inputs and outputs kept float32 so callers never see the difference. Under TensorRT the graph stays fp32 and
  TensorRT's own fp16 mode is switched on instead (its engine cache goes to ``trt_cache``).
- int8 on the CPU is never applied blindly: :func:`measure_int8` quantises one model (dynamic, weights int8), times
  it against fp32 on a real input batch and compares the softmax; it is kept only when it is faster by
  :data:`MIN_INT8_SPEEDUP` and changes no class and no probability by more than :data:`MAX_INT8_PROB_CHANGE`. (On 2
  CPU cores ViT-B/14 ran 1.4x faster with a softmax change <= 0.002, while EfficientNetV2-M ran slower and less
  accurate with every layer quantised: it has to be per model.) Conv-heavy networks are tried with MatMul/Gemm-only
  quantisation too (:data:`INT8_VARIANTS`), the variant ViTs profit from.

Models are given as a path, bytes or an ``onnx.ModelProto``; converted or quantised graphs stay in memory.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cytologia.errors import CytologiaInputError

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda", "tensorrt")
MIN_INT8_SPEEDUP = 1.10  # int8 must save at least 10 % of the model's time to be worth its accuracy risk
MAX_INT8_PROB_CHANGE = 0.01  # largest |softmax(int8) - softmax(fp32)| accepted on the measured batch
# op types quantised per variant: None = every op type dynamic quantisation supports (Conv, MatMul, Gemm, ...)
INT8_VARIANTS: dict[str, tuple[str, ...] | None] = {"all": None, "matmul": ("MatMul", "Gemm")}

ModelSource = str | Path | bytes | Any  # Any: an onnx.ModelProto


def available_providers() -> list[str]:
    """The execution providers of the installed onnxruntime build."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def tensorrt_installed() -> bool:
    """Whether TensorRT's runtime library can be found (system ``libnvinfer``, or the ``tensorrt`` wheels)."""
    import ctypes.util
    import importlib.util

    if ctypes.util.find_library("nvinfer") is not None:
        return True
    return any(importlib.util.find_spec(m) is not None for m in ("tensorrt_libs", "tensorrt"))


def choose_providers(
    device: str = "auto", available: list[str] | None = None, tensorrt: bool | None = None
) -> list[str]:
    """Providers for ``device`` (see the module docstring), most preferred first; the CPU is always last.
    ``available`` / ``tensorrt`` default to the installed build and :func:`tensorrt_installed`."""
    if device not in DEVICES:
        raise CytologiaInputError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    have = set(available_providers() if available is None else available)
    if device == "cpu":
        return [CPU]
    if device == "tensorrt" and TENSORRT not in have:
        raise CytologiaInputError(f"device tensorrt: this onnxruntime build has no {TENSORRT} (it has {sorted(have)})")
    if device in ("cuda", "tensorrt") and CUDA not in have:
        raise CytologiaInputError(
            f"device {device}: this onnxruntime build has no {CUDA} (it has {sorted(have)}); install onnxruntime-gpu "
            "instead of onnxruntime (see Dockerfile.cuda)"
        )
    use_trt = TENSORRT in have and (
        device == "tensorrt" or (device == "auto" and (tensorrt_installed() if tensorrt is None else tensorrt))
    )
    chosen = ([TENSORRT] if use_trt else []) + ([CUDA] if CUDA in have else [])
    return [*chosen, CPU]


def on_gpu(providers: list[str]) -> bool:
    return bool({TENSORRT, CUDA} & set(providers))


def load_proto(model: ModelSource) -> Any:
    """An ``onnx.ModelProto`` from a path, bytes or a proto (returned as is)."""
    import onnx

    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise CytologiaInputError(f"{path}: ONNX file not found")
        try:
            return onnx.load(str(path))
        except Exception as err:  # protobuf decode errors of several kinds
            raise CytologiaInputError(f"{path}: not a readable ONNX file ({err})") from None
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return model


def input_is_fp16(proto: Any) -> bool:
    """Whether the graph's first input is float16 (a graph exported in half precision)."""
    import onnx

    return proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def to_fp16(proto: Any) -> Any:
    """The graph with float16 weights and compute, float32 inputs and outputs (ONNX Runtime's converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True)


def quantize_int8(proto: Any, op_types: tuple[str, ...] | None = None) -> bytes:
    """Dynamic int8 quantisation (int8 weights, activations quantised on the fly) of ``op_types`` (None: all);
    returns the quantised graph's bytes (the quantiser writes files: temporary ones).

    The graph is first run through ONNX Runtime's quantisation pre-processing (shape inference and graph
    optimisation): exported graphs can feed a Conv its weights through a node rather than an initializer, which the
    quantiser refuses ("Expected ... to be an initializer"; seen on timm's resnet18); when pre-processing itself
    fails the graph is quantised as it is."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="cytologia-int8-") as tmp:
        source = Path(tmp) / "fp32.onnx"  # the tools are given files: a proto argument trips their external-data path
        onnx.save(proto, str(source))
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            source = prepared
        except Exception as err:  # the pre-processor's failures are of many kinds; the raw graph is still usable
            log.info("int8 pre-processing failed (%s); quantising the graph as exported", err)
        out = Path(tmp) / "int8.onnx"
        quantize_dynamic(
            source, out, op_types_to_quantize=list(op_types) if op_types else None, weight_type=QuantType.QInt8
        )
        return out.read_bytes()


def session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: fp16 graphs log a warning per Cast node otherwise
    # No busy-waiting between runs: idle ORT threads spinning on 2 cores starve the torch NMS, the crops and the
    # other sessions of the pipeline (measured: a torch pipeline in the same process ran 10x slower with spinning on).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OrtModel:
    """One ONNX graph in an ONNX Runtime session: float32 numpy batch in, float32 numpy output out.

    ``precision``: ``"fp32"``, ``"fp16"`` (see the module docstring; ``fp16="auto"`` means fp16 on a GPU) or
    ``"int8"`` (only through ``int8=True``, after :func:`measure_int8` said so).
    """

    def __init__(
        self,
        model: ModelSource,
        *,
        device: str = "auto",
        threads: int | None = None,
        fp16: bool | str = "auto",
        int8: bool | bytes = False,
        trt_cache: str | Path | None = None,
        name: str | None = None,
    ) -> None:
        self.name = name or (str(model) if isinstance(model, (str, Path)) else "<onnx>")
        providers = choose_providers(device)
        gpu = on_gpu(providers)
        proto = load_proto(model)
        want_fp16 = gpu if fp16 == "auto" else bool(fp16)
        self.precision = "fp16" if input_is_fp16(proto) else "fp32"
        provider_options: list[dict[str, Any]] = [{} for _ in providers]
        payload: bytes
        if int8 is not False:
            if gpu:
                raise CytologiaInputError(f"{self.name}: int8 dynamic quantisation is a CPU option (device {device})")
            payload = int8 if isinstance(int8, bytes) else quantize_int8(proto)
            self.precision = "int8"
        elif want_fp16 and self.precision == "fp32" and TENSORRT in providers:
            cache = Path(trt_cache) if trt_cache is not None else Path(tempfile.gettempdir()) / "cytologia-trt"
            cache.mkdir(parents=True, exist_ok=True)
            provider_options[providers.index(TENSORRT)] = {
                "trt_fp16_enable": True,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
            }
            payload = proto.SerializeToString()
            self.precision = "fp16 (TensorRT)"
        elif want_fp16 and self.precision == "fp32":
            if not gpu:
                log.info("%s: fp16 asked for on the CPU; ONNX Runtime's CPU kernels are fp32: kept fp32", self.name)
                payload = proto.SerializeToString()
            else:
                payload = to_fp16(proto).SerializeToString()
                self.precision = "fp16"
        else:
            payload = proto.SerializeToString()
        self.session = self._session(payload, threads, providers, provider_options)
        if self.precision == "fp16 (TensorRT)" and TENSORRT not in self.session.get_providers():
            # TensorRT failed and ONNX Runtime fell back to CUDA with the fp32 graph: convert instead
            log.warning("%s: TensorRT did not start; converting the graph to fp16 for CUDA", self.name)
            providers = [p for p in providers if p != TENSORRT]
            payload = to_fp16(proto).SerializeToString()
            self.session = self._session(payload, threads, providers, [{} for _ in providers])
            self.precision = "fp16"
        self.providers = list(self.session.get_providers())
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.input_shape = list(inp.shape)
        self.input_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        self.threads = threads

    def _session(self, payload: bytes, threads: int | None, providers: list[str], options: list[dict]) -> Any:
        import onnxruntime as ort

        try:
            opts = session_options(threads)
            return ort.InferenceSession(payload, opts, providers=providers, provider_options=options)
        except Exception as err:  # onnxruntime's own exception types
            raise CytologiaInputError(f"{self.name}: ONNX Runtime could not load the graph ({err})") from None

    @property
    def on_gpu(self) -> bool:
        return on_gpu(self.providers)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=self.input_dtype)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "providers": self.providers, "precision": self.precision, "threads": self.threads}


@dataclass
class Int8Decision:
    """What measuring int8 against fp32 on one model found (times: best of the repeats, ms per batch)."""

    model: str
    variant: str | None  # the INT8_VARIANTS key kept, None when refused
    fp32_ms: float
    int8_ms: dict[str, float]
    max_prob_change: dict[str, float]
    argmax_agreement: dict[str, float]
    accepted: bool
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _interleaved_best(models: dict[str, OrtModel], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Best-of-``repeats`` ms per batch of each model, the models timed in turn within every repeat, so that load
    from other processes hits them alike (one warm-up run each first)."""
    for model in models.values():
        model(x)
    best = dict.fromkeys(models, float("inf"))
    for _ in range(repeats):
        for key, model in models.items():
            start = time.perf_counter()
            model(x)
            best[key] = min(best[key], 1000.0 * (time.perf_counter() - start))
    return best


def measure_int8(
    model: ModelSource,
    sample: np.ndarray,
    *,
    threads: int | None = None,
    repeats: int = 7,
    min_speedup: float = MIN_INT8_SPEEDUP,
    max_prob_change: float = MAX_INT8_PROB_CHANGE,
    name: str | None = None,
) -> tuple[Int8Decision, OrtModel | None]:
    """Try every :data:`INT8_VARIANTS` of ``model`` on the CPU against fp32 on ``sample`` (a real input batch);
    returns the decision and the fastest accepted int8 session (None when every variant is refused). Times are the
    best of ``repeats`` interleaved runs."""
    from cytologia.ensemble import softmax

    label = name or (str(model) if isinstance(model, (str, Path)) else "<onnx>")
    proto = load_proto(model)
    fp32 = OrtModel(proto, device="cpu", threads=threads, fp16=False, name=label)
    p_ref = softmax(fp32(sample))
    changes, agree, sessions = {}, {}, {}
    for variant, ops in INT8_VARIANTS.items():
        try:
            q = OrtModel(
                proto, device="cpu", threads=threads, int8=quantize_int8(proto, ops), name=f"{label}:{variant}"
            )
        except Exception as err:  # a graph the quantiser cannot handle: that variant is refused, with the reason
            log.warning("%s: int8 variant %s failed: %s", label, variant, err)
            continue
        p = softmax(q(sample))
        changes[variant] = float(np.abs(p - p_ref).max())
        agree[variant] = float((p.argmax(axis=1) == p_ref.argmax(axis=1)).mean())
        sessions[variant] = q
    timed = _interleaved_best({"fp32": fp32, **sessions}, sample, repeats)
    fp32_ms = timed.pop("fp32")
    times = timed
    ok = [v for v in times if fp32_ms / times[v] >= min_speedup and changes[v] <= max_prob_change and agree[v] == 1.0]
    if ok:
        best = min(ok, key=lambda v: times[v])
        reason = (
            f"{fp32_ms / times[best]:.2f}x faster, softmax change {changes[best]:.4f} <= {max_prob_change}, "
            "same classes"
        )
        decision = Int8Decision(label, best, fp32_ms, times, changes, agree, True, reason)
        return decision, sessions[best]
    parts = [
        f"{v}: {fp32_ms / times[v]:.2f}x, softmax change {changes[v]:.4f}, class agreement {agree[v]:.3f}"
        for v in times
    ]
    reason = (
        f"refused (needs >= {min_speedup}x, change <= {max_prob_change}, same classes): " + "; ".join(parts)
        if parts
        else "no variant could be quantised"
    )
    return Int8Decision(label, None, fp32_ms, times, changes, agree, False, reason), None
