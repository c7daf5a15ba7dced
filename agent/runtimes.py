"""Runtime backends: a small registry of classes that load an artifact and run it on numpy arrays.

A backend is a :class:`Runtime` subclass registered under the name a job uses in ``runtime.name``::

    @register_runtime("myruntime")
    class MyRuntime(Runtime):
        def version(self) -> str: ...
        def load(self, path, input_spec, threads, options) -> Session: ...

Each backend imports its runtime inside its own methods, so the agent imports only the runtime a job asks for;
a runtime that is not installed is a :class:`~agent.RuntimeBackendError` that names it and says how to install it.

Backends: ``onnxruntime``, ``openvino``, ``tflite`` (LiteRT / tflite_runtime, optional Edge TPU delegate),
``tensorrt`` (engine built on the device from the ONNX artifact and cached) and ``torch`` (TorchScript).
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import platform
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from agent import ArtifactError, RuntimeBackendError
from agent.accuracy import load_inputs
from agent.registry import Registry
from agent.schema import ArtifactSpec

_RUNTIMES: "Registry[Runtime]" = Registry("runtime", RuntimeBackendError)


class Session(abc.ABC):
    """A loaded model. ``input_shape`` is the model's own input shape, ``None`` where a dimension is dynamic.

    ``run`` returns the model's output 0 (what the timed window runs: the whole model still computes every
    output); ``run_all`` returns every output as float32 numpy arrays, in the model's output order (the ONNX
    graph's output order, which the ONNX exporter takes from the torch forward: a tuple or list in order, a dict
    in insertion order). The eval phase scores ``run_all``. The default ``run_all`` is ``[run(x)]``, right for a
    backend whose models have one output only."""

    input_name: str
    input_shape: List[Optional[int]]
    info: Dict[str, Any]  # what the backend actually applied (providers, ...), recorded in the report

    @abc.abstractmethod
    def run(self, inputs: np.ndarray) -> np.ndarray:
        ...

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        return [np.asarray(self.run(inputs), dtype=np.float32)]


def _float32(outputs: Sequence[Any]) -> List[np.ndarray]:
    return [np.asarray(o, dtype=np.float32) for o in outputs]


class Runtime(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def version(self) -> str:
        ...

    @abc.abstractmethod
    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        ...


register_runtime = _RUNTIMES.register
runtime_names = _RUNTIMES.names


def get_runtime(name: str) -> "Runtime":
    return _RUNTIMES.lookup(name)()


def check_input(actual_name: str, actual_shape: List[Optional[int]], spec: ArtifactSpec) -> None:
    """Refuse a model whose input does not match the job's artifact spec (dynamic dimensions match anything)."""
    if actual_name != spec.input_name:
        raise RuntimeBackendError("model input is named %r but artifact.input_name is %r"
                                  % (actual_name, spec.input_name))
    expected = list(spec.input_shape)
    same = len(actual_shape) == len(expected) and all(a is None or a == e for a, e in zip(actual_shape, expected))
    if not same:
        shown = ["?" if a is None else a for a in actual_shape]
        raise RuntimeBackendError("model input %r has shape [%s] but artifact.input_shape is %s"
                                  % (actual_name, ", ".join(map(str, shown)), expected))


# ------------------------------------------------------------------------------------------- onnxruntime
_ORT_DTYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "uint8": "tensor(uint8)",
               "int8": "tensor(int8)"}
_ORT_OPTIONS = ("providers", "graph_optimization_level")
_ORT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC",
               "disable": "ORT_DISABLE_ALL"}


class OrtSession(Session):
    """``run`` fetches every output and returns output 0, so the timed work is the whole model's, outputs handed
    back included, whatever a provider would do with unfetched outputs (onnxruntime 1.23 on the CPU runs the
    whole graph either way: measured, a second head of two 2048x2048 MatMuls costs the same fetched or not). The
    output names are listed once at load (``sess.run(None, ...)`` looks them up on every call: +0.5 us per call
    on an 11 us model, measured; with the list, a single-output model times as it did fetching its one name)."""

    def __init__(self, sess: Any, input_name: str, input_shape: List[Optional[int]]) -> None:
        self._sess = sess
        self._outputs = [o.name for o in sess.get_outputs()]
        self.input_name = input_name
        self.input_shape = input_shape
        self.info = {"providers": list(sess.get_providers()), "outputs": list(self._outputs)}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._sess.run(self._outputs, {self.input_name: inputs})[0]
        return out

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        return _float32(self._sess.run(self._outputs, {self.input_name: inputs}))


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """onnxruntime with a fixed, explicit configuration: sequential execution, all graph optimisations.

    Option: ``providers`` (default ``["CPUExecutionProvider"]``), in order of preference, e.g.
    ``["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]`` with onnxruntime-gpu. Each
    must be in ``get_available_providers()`` and must actually start: a provider onnxruntime drops at session
    creation (a missing CUDA library) is an error, not a silent fall-back to the CPU.
    ``graph_optimization_level``: ``all`` (default), ``extended``, ``basic`` or ``disable`` — onnxruntime's graph
    optimisation levels, for checking what the optimiser is worth on a device (on x86 CPUs ``all`` adds the NCHWc
    layout transforms: ResNet-20 runs about 1.8x faster than with ``basic``).
    """

    def version(self) -> str:
        return str(_import_ort().__version__)

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        ort = _import_ort()
        unknown = sorted(set(options) - set(_ORT_OPTIONS))
        if unknown:
            raise RuntimeBackendError("runtime.options.%s: unknown option for onnxruntime (knows: %s)"
                                      % (unknown[0], ", ".join(_ORT_OPTIONS)))
        providers = options.get("providers", ["CPUExecutionProvider"])
        if not (isinstance(providers, list) and providers and all(isinstance(p, str) for p in providers)):
            raise RuntimeBackendError("runtime.options.providers: must be a non-empty list of provider names")
        available = ort.get_available_providers()
        missing = [p for p in providers if p not in available]
        if missing:
            raise RuntimeBackendError("runtime.options.providers: %s not available in this onnxruntime "
                                      "(available: %s)" % (", ".join(missing), ", ".join(available)))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        level = options.get("graph_optimization_level", "all")
        if level not in _ORT_LEVELS:
            raise RuntimeBackendError("runtime.options.graph_optimization_level: %r is not one of %s"
                                      % (level, ", ".join(_ORT_LEVELS)))
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[level])
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        applied = list(sess.get_providers())
        dropped = [p for p in providers if p not in applied]
        if dropped:  # onnxruntime logs a failed CUDA/TensorRT provider and silently runs on the rest
            raise RuntimeBackendError("runtime.options.providers: onnxruntime %s could not start %s and would run "
                                      "on %s instead (check that the CUDA, cuDNN and TensorRT libraries this "
                                      "onnxruntime was built for are installed)"
                                      % (ort.__version__, ", ".join(dropped), ", ".join(applied)))

        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise RuntimeBackendError("model must have exactly one input and at least one output "
                                      "(has %d inputs, %d outputs)" % (len(inputs), len(outputs)))
        shape = [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]
        check_input(inputs[0].name, shape, input_spec)
        want = _ORT_DTYPES.get(input_spec.input_dtype)
        if want != inputs[0].type:
            raise RuntimeBackendError("model input %r has type %s but artifact.input_dtype is %r"
                                      % (inputs[0].name, inputs[0].type, input_spec.input_dtype))
        return OrtSession(sess, inputs[0].name, shape)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeBackendError("runtime 'onnxruntime' is not installed on this device (%s); install it with "
                                  "pip install onnxruntime (onnxruntime-gpu for the CUDA and TensorRT execution "
                                  "providers; on Jetson, the onnxruntime-gpu wheel built for your JetPack)"
                                  % e) from None
    return onnxruntime


# ---------------------------------------------------------------------------------------------- openvino
_OV_DTYPES = {"float32": "f32", "float16": "f16", "uint8": "u8", "int8": "i8"}
_OV_OPTIONS = ("device", "precision", "performance_hint")
_OV_PRECISIONS = ("f32", "f16", "bf16")
_OV_HINTS = ("LATENCY", "THROUGHPUT")
_OV_MAX_COMPILED = 4  # static compilations kept per session (timing batch, eval batch, last eval batch, ...)


class OvSession(Session):
    """An OpenVINO model compiled with static shapes.

    A model with a dynamic batch dimension keeps ``input_shape[0] = None`` (the runner then times
    ``timing.batch_size`` and evaluates ``eval.batch_size``), but it never runs with dynamic shapes: it is
    reshaped and compiled once per batch size it is fed (static shapes are faster on CPU and the only kind
    MYRIAD runs). The artifact's own batch (``artifact.input_shape[0]``) is compiled by :meth:`OpenVino.load`;
    any other batch size is compiled on its first call.
    """

    def __init__(self, core: Any, ov: "_Ov", model: Any, device: str, config: Dict[str, str],
                 input_name: str, input_shape: List[Optional[int]], spec_shape: List[int]) -> None:
        self._core = core
        self._ov = ov
        self._model = model
        self._device = device
        self._config = config
        self._spec_shape = list(spec_shape)
        self._compiled: Dict[int, Tuple[Any, Any]] = {}  # batch -> (compiled model, its infer request)
        self.input_name = input_name
        self.input_shape = input_shape
        self.info: Dict[str, Any] = {}

    def compile(self, batch: int) -> Any:
        """Reshape the model to the artifact's input shape with this batch size and compile it (cached)."""
        hit = self._compiled.get(batch)
        if hit is not None:
            return hit[0]
        if self.input_shape[0] is not None and batch != self.input_shape[0]:
            raise RuntimeBackendError("model input %r has a fixed batch of %d; cannot run a batch of %d"
                                      % (self.input_name, self.input_shape[0], batch))
        shape = [batch] + self._spec_shape[1:]
        try:
            self._model.reshape({self.input_name: self._ov.PartialShape(shape)})
            compiled = self._core.compile_model(self._model, self._device, self._config)
        except RuntimeError as e:
            raise RuntimeBackendError("openvino cannot compile the model for %s with input shape %s: %s"
                                      % (self._device, shape, _ov_message(e))) from None
        if len(self._compiled) >= _OV_MAX_COMPILED:
            del self._compiled[next(iter(self._compiled))]
        self._compiled[batch] = (compiled, compiled.create_infer_request())
        return compiled

    def _infer(self, inputs: np.ndarray) -> Tuple[Any, Any]:
        # set_input_tensor on a zero-copy Tensor + infer(): the same API in 2022.3 and 2026, and ~0.1 ms less per
        # call than request.infer({name: x}) (which wraps inputs and outputs). infer() computes every output.
        hit = self._compiled.get(inputs.shape[0])
        if hit is None:
            self.compile(inputs.shape[0])
            hit = self._compiled[inputs.shape[0]]
        compiled, request = hit
        request.set_input_tensor(self._ov.Tensor(np.ascontiguousarray(inputs), shared_memory=True))
        request.infer()
        return compiled, request

    def run(self, inputs: np.ndarray) -> np.ndarray:
        _, request = self._infer(inputs)
        out: np.ndarray = request.get_output_tensor(0).data.copy()
        return out

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        """Every output tensor by index: the model's (ONNX graph's, or IR's Result) output order."""
        compiled, request = self._infer(inputs)
        return [np.array(request.get_output_tensor(i).data, dtype=np.float32)
                for i in range(len(compiled.outputs))]


@register_runtime("openvino")
class OpenVino(Runtime):
    """OpenVINO with a fixed, explicit configuration: one stream, the precision hint always set where the
    device takes it, static shapes. Reads ONNX directly, or OpenVINO IR when the artifact path ends in .xml
    (its .bin beside it; only the .xml is covered by ``artifact.sha256``).

    Options: ``device`` (default "CPU", one of ``Core().available_devices``), ``precision`` (inference
    precision hint: "f32" default, "f16", "bf16"), ``performance_hint`` ("LATENCY" default, "THROUGHPUT").
    Works with the 2023.1+ API (``openvino.Core``) and with 2022.3 LTS (``openvino.runtime.Core``, the last
    release with the MYRIAD plugin for the Intel NCS2).
    """

    def version(self) -> str:
        return _import_ov().version

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        ov = _import_ov()
        version = ov.version
        unknown = sorted(set(options) - set(_OV_OPTIONS))
        if unknown:
            raise RuntimeBackendError("runtime.options.%s: unknown option for openvino (knows: %s)"
                                      % (unknown[0], ", ".join(_OV_OPTIONS)))
        device = options.get("device", "CPU")
        precision = options.get("precision", "f32")
        hint = options.get("performance_hint", "LATENCY")
        if not (isinstance(device, str) and device):
            raise RuntimeBackendError("runtime.options.device: must be a device name such as \"CPU\"")
        if precision not in _OV_PRECISIONS:
            raise RuntimeBackendError("runtime.options.precision: %r is not one of %s"
                                      % (precision, ", ".join(_OV_PRECISIONS)))
        if hint not in _OV_HINTS:
            raise RuntimeBackendError("runtime.options.performance_hint: %r is not one of %s"
                                      % (hint, ", ".join(_OV_HINTS)))
        core = ov.Core()
        available = list(core.available_devices)
        if device not in available and not any(a.startswith(device + ".") for a in available):
            raise RuntimeBackendError("runtime.options.device: %s not available in this openvino %s "
                                      "(available: %s)" % (device, version, ", ".join(available) or "none"))
        supported = _ov_supported(lambda key: core.get_property(device, key))
        cpu = device.split(".")[0] == "CPU"

        config: Dict[str, str] = {}
        for key, value, name in (("INFERENCE_PRECISION_HINT", precision, "precision"),
                                 ("PERFORMANCE_HINT", hint, "performance_hint")):
            if key in supported:
                config[key] = value
            elif name in options:
                raise RuntimeBackendError("runtime.options.%s: device %s does not take %s; leave it unset"
                                          % (name, device, key))
        if cpu and threads > 0 and "INFERENCE_NUM_THREADS" in supported:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        if cpu and "NUM_STREAMS" in supported:
            config["NUM_STREAMS"] = "1"  # the runner times one synchronous request: one stream has all threads

        model = _ov_read(core, path)
        inputs, outputs = list(model.inputs), list(model.outputs)
        if len(inputs) != 1 or len(outputs) < 1:
            raise RuntimeBackendError("model must have exactly one input and at least one output "
                                      "(has %d inputs, %d outputs)" % (len(inputs), len(outputs)))
        port = inputs[0]
        names = set(port.get_names())
        name = input_spec.input_name if input_spec.input_name in names else port.get_any_name()
        pshape = port.get_partial_shape()
        if pshape.rank.is_dynamic:
            raise RuntimeBackendError("model input %r has a dynamic rank; the agent needs a fixed rank" % name)
        shape = [d.get_length() if d.is_static else None for d in pshape]
        check_input(name, shape, input_spec)
        have = port.get_element_type().get_type_name()
        if _OV_DTYPES.get(input_spec.input_dtype) != have:
            raise RuntimeBackendError("model input %r has type %s but artifact.input_dtype is %r"
                                      % (name, have, input_spec.input_dtype))

        session = OvSession(core, ov, model, device, config, name, shape, input_spec.input_shape)
        batch = shape[0] if shape[0] is not None else input_spec.input_shape[0]
        compiled = session.compile(batch)
        readback = _ov_supported(compiled.get_property)
        session.info = {
            "device": device,
            "device_name": _ov_property(lambda key: core.get_property(device, key), "FULL_DEVICE_NAME", supported),
            "openvino_version": version,
            "model_format": "ir" if path.suffix.lower() == ".xml" else "onnx",
            "compile_config": dict(config),
            # asked for, then as the compiled model reads it back (a CPU without bf16/f16 falls back to f32)
            "precision_hint": config.get("INFERENCE_PRECISION_HINT"),
            "inference_precision": _ov_property(compiled.get_property, "INFERENCE_PRECISION_HINT", readback),
            "performance_hint": _ov_property(compiled.get_property, "PERFORMANCE_HINT", readback),
            "inference_num_threads": _ov_property(compiled.get_property, "INFERENCE_NUM_THREADS", readback),
            "num_streams": _ov_property(compiled.get_property, "NUM_STREAMS", readback),
            "batch_mode": ("fixed %d" % shape[0] if shape[0] is not None else
                           "dynamic in the model; compiled static per batch size fed (batch %d at load)" % batch),
        }
        return session


class _Ov:
    """The few OpenVINO names the backend uses, from whichever module the installed release has them in."""

    def __init__(self, core: Any, partial_shape: Any, tensor: Any, version: str) -> None:
        self.Core = core
        self.PartialShape = partial_shape
        self.Tensor = tensor
        self.version = version


def _import_ov() -> _Ov:
    """``openvino`` (2023.1+: ``openvino.Core``) or ``openvino.runtime`` (2022.3 LTS, Python 3.8, MYRIAD)."""
    try:
        import openvino
    except ImportError as e:
        raise RuntimeBackendError("runtime 'openvino' is not installed on this device (%s); install it with "
                                  "pip install openvino (for the Intel NCS2 / MYRIAD: pip install "
                                  "openvino==2022.3.2, the last release with that plugin)" % e) from None
    if hasattr(openvino, "Core"):
        version = getattr(openvino, "__version__", None) or openvino.get_version()
        return _Ov(openvino.Core, openvino.PartialShape, openvino.Tensor, str(version))
    try:
        from openvino.runtime import Core, PartialShape, Tensor, get_version
    except ImportError as e:
        raise RuntimeBackendError("runtime 'openvino' is installed but has neither openvino.Core nor "
                                  "openvino.runtime.Core (%s)" % e) from None
    return _Ov(Core, PartialShape, Tensor, str(get_version()))


def _ov_read(core: Any, path: Path) -> Any:
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise ArtifactError("artifact.path: OpenVINO IR %s needs its weights %s beside it"
                                % (path.name, weights.name))
        args = [str(path), str(weights)]
    else:
        args = [str(path)]
    try:
        return core.read_model(*args)
    except RuntimeError as e:
        raise RuntimeBackendError("openvino cannot read the model %s: %s" % (path.name, _ov_message(e))) from None


def _ov_supported(get_property: Callable[[str], Any]) -> List[str]:
    """The property names a device (or compiled model) lists in SUPPORTED_PROPERTIES; [] if it lists none."""
    try:
        return [str(k) for k in get_property("SUPPORTED_PROPERTIES")]
    except RuntimeError:
        return []


def _ov_property(get_property: Callable[[str], Any], key: str, supported: List[str]) -> Any:
    """A property as plain JSON (precisions as "f32", enums by name), or None where it is not supported."""
    if key not in supported:
        return None
    try:
        value = get_property(key)
    except RuntimeError:
        return None
    if hasattr(value, "get_type_name"):
        return str(value.get_type_name())
    if isinstance(value, (bool, int, float, str)):
        return value
    name = getattr(value, "name", None)
    return name if isinstance(name, str) else str(value)


def _ov_message(e: BaseException) -> str:
    """OpenVINO errors carry a C++ trail of 'Exception from src/...' lines; keep the last line that says what."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Exception from ", "Check '"))]
    return (said or lines or [repr(e)])[-1]


# ------------------------------------------------------------------------------------------------ tflite
_TFL_DTYPES = {"float32": "float32", "float16": "float16", "uint8": "uint8", "int8": "int8"}
_TFL_OPTIONS = ("xnnpack", "delegate", "delegate_options")
# the Edge TPU runtime's library name per OS, as Coral's docs give it for load_delegate
_EDGETPU_LIBRARY = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
_TFL_DELEGATES = ("edgetpu",)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """Float -> int8/uint8 as TFLite's QUANTIZE kernel does it: round half away from zero, add the zero point,
    saturate to the integer type's range."""
    info = np.iinfo(dtype)
    q = np.trunc(x.astype(np.float32) / np.float32(scale) + np.copysign(np.float32(0.5), x)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.int32) - zero_point).astype(np.float32) * np.float32(scale)).astype(np.float32)


def _tfl_quantization(detail: Dict[str, Any], what: str) -> Optional[Tuple[float, int]]:
    """(scale, zero_point) of a per-tensor quantized int8/uint8 tensor; None for a tensor that is not quantized."""
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float64).ravel()
    zeros = np.asarray(params.get("zero_points", []), dtype=np.int64).ravel()
    if scales.size == 0:
        scale, zero = detail.get("quantization", (0.0, 0))
        if not scale:
            return None
        return float(scale), int(zero)
    if scales.size != 1 or zeros.size != 1:
        raise RuntimeBackendError("model %s %r is quantized per channel (%d scales); the agent feeds and reads "
                                  "per-tensor quantized inputs and outputs only" % (what, detail["name"], scales.size))
    return float(scales[0]), int(zeros[0])


class TfliteSession(Session):
    """One TFLite interpreter. Float inputs to an int8/uint8 model are quantized here with the model's own
    input scale and zero point (integer inputs are fed as they are); int8/uint8 outputs are dequantized with the
    output's. A model whose input batch is dynamic (-1 in ``shape_signature``) is resized to the batch it is fed;
    a fixed batch stays fixed. ``outputs`` are the output tensors in the model's order (:func:`tfl_output_order`),
    each with its quantization (or None)."""

    def __init__(self, interp: Any, input_detail: Dict[str, Any],
                 outputs: List[Tuple[Dict[str, Any], Optional[Tuple[float, int]]]], input_name: str,
                 input_shape: List[Optional[int]], in_q: Optional[Tuple[float, int]]) -> None:
        self._interp = interp
        self._in_index = int(input_detail["index"])
        self._in_dtype = np.dtype(input_detail["dtype"])
        self._outputs = [(int(d["index"]), q) for d, q in outputs]
        self._out_index, self._out_q = self._outputs[0]
        self._in_q = in_q
        self._shape = [int(d) for d in input_detail["shape"]]
        self.input_name = input_name
        self.input_shape = input_shape
        self.info: Dict[str, Any] = {}

    def _invoke(self, inputs: np.ndarray) -> None:
        if inputs.shape[0] != self._shape[0]:
            if self.input_shape[0] is not None:
                raise RuntimeBackendError("model input %r has a fixed batch of %d; cannot run a batch of %d"
                                          % (self.input_name, self.input_shape[0], inputs.shape[0]))
            shape = [int(inputs.shape[0])] + self._shape[1:]
            self._interp.resize_tensor_input(self._in_index, shape, strict=True)
            self._interp.allocate_tensors()
            self._shape = shape
        if self._in_q is not None and inputs.dtype.kind == "f":
            x = quantize(inputs, self._in_q[0], self._in_q[1], self._in_dtype)
        else:
            x = np.ascontiguousarray(inputs, dtype=self._in_dtype)
        self._interp.set_tensor(self._in_index, x)
        self._interp.invoke()

    def _get(self, index: int, q: Optional[Tuple[float, int]]) -> np.ndarray:
        out: np.ndarray = self._interp.get_tensor(index)  # a copy
        if q is not None:
            out = dequantize(out, q[0], q[1])
        return out

    def run(self, inputs: np.ndarray) -> np.ndarray:
        self._invoke(inputs)
        return self._get(self._out_index, self._out_q)

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        self._invoke(inputs)
        return _float32([self._get(index, q) for index, q in self._outputs])


@register_runtime("tflite")
class Tflite(Runtime):
    """TensorFlow Lite models through LiteRT (``ai_edge_litert``, preferred) or the older ``tflite_runtime``.

    Threads: ``runtime.threads`` is the interpreter's ``num_threads`` (0 = the runtime's default). Options:
    ``xnnpack`` (default true: the runtime's default XNNPACK delegate; false builds the interpreter with
    ``BUILTIN_WITHOUT_DEFAULT_DELEGATES``), ``delegate`` ("edgetpu": the Coral Edge TPU through
    ``load_delegate('libedgetpu.so.1')``; default none), ``delegate_options`` (strings for the delegate, e.g.
    ``{"device": "usb:0"}`` or ``{"device": ":0"}``). TFLite models are usually NHWC: ``artifact.layout`` says
    which, and the runner feeds that layout. ``artifact.input_dtype`` is "float32" for a float model and also for
    an int8/uint8 model (float inputs are then quantized with the model's own scale and zero point), or the
    model's own integer type to time with integer inputs fed as they are (the eval shard is still fed as
    floats and quantized). Outputs come back as float32 (int8/uint8 outputs dequantized).
    """

    def version(self) -> str:
        return _import_tflite().version

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        lite = _import_tflite()
        unknown = sorted(set(options) - set(_TFL_OPTIONS))
        if unknown:
            raise RuntimeBackendError("runtime.options.%s: unknown option for tflite (knows: %s)"
                                      % (unknown[0], ", ".join(_TFL_OPTIONS)))
        xnnpack = options.get("xnnpack", True)
        delegate = options.get("delegate")
        delegate_options = options.get("delegate_options", {})
        if not isinstance(xnnpack, bool):
            raise RuntimeBackendError("runtime.options.xnnpack: must be true or false")
        if delegate is not None and delegate not in _TFL_DELEGATES:
            raise RuntimeBackendError("runtime.options.delegate: %r is not one of %s (or null for none)"
                                      % (delegate, ", ".join(_TFL_DELEGATES)))
        if not (isinstance(delegate_options, dict) and
                all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in delegate_options.values())):
            raise RuntimeBackendError("runtime.options.delegate_options: must be an object of strings or numbers")
        if delegate_options and delegate is None:
            raise RuntimeBackendError("runtime.options.delegate_options: given without runtime.options.delegate")

        kwargs: Dict[str, Any] = {"model_path": str(path), "num_threads": threads if threads > 0 else None}
        resolver = "AUTO (default delegates)"
        if not xnnpack:
            if lite.op_resolver_type is None:
                raise RuntimeBackendError("runtime.options.xnnpack: %s cannot turn the default delegate off "
                                          "(no OpResolverType); leave it unset" % lite.version)
            kwargs["experimental_op_resolver_type"] = lite.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            resolver = "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
        library = None
        if delegate == "edgetpu":
            library = _EDGETPU_LIBRARY.get(platform.system(), "libedgetpu.so.1")
            kwargs["experimental_delegates"] = [_load_edgetpu(lite, library, delegate_options)]
        try:
            interp = lite.Interpreter(**kwargs)
            interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise RuntimeBackendError("%s cannot load the model %s: %s" % (lite.version, path.name, _last_line(e))) \
                from None

        inputs, outputs = interp.get_input_details(), interp.get_output_details()
        if len(inputs) != 1 or len(outputs) < 1:
            raise RuntimeBackendError("model must have exactly one input and at least one output "
                                      "(has %d inputs, %d outputs)" % (len(inputs), len(outputs)))
        inp = inputs[0]
        ordered, order_source = tfl_output_order(interp, outputs)
        out = ordered[0]
        names = _tfl_input_names(interp, int(inp["index"]))
        name = input_spec.input_name if input_spec.input_name in names else str(inp["name"])
        signature = inp.get("shape_signature")
        dims = list(signature) if signature is not None and len(signature) else list(inp["shape"])
        shape = [int(d) if d > 0 else None for d in dims]
        check_input(name, shape, input_spec)

        have = np.dtype(inp["dtype"]).name
        in_q = _tfl_quantization(inp, "input") if have in ("int8", "uint8") else None
        out_qs = [_tfl_quantization(d, "output") if np.dtype(d["dtype"]).name in ("int8", "uint8") else None
                  for d in ordered]
        out_q = out_qs[0]
        want = _TFL_DTYPES.get(input_spec.input_dtype)
        quantized_feed = want == "float32" and in_q is not None
        if want != have and not quantized_feed:
            hint = " (an int8/uint8 model without quantization parameters takes only its own type)" \
                if have in ("int8", "uint8") and want == "float32" else ""
            raise RuntimeBackendError("model input %r has type %s but artifact.input_dtype is %r%s"
                                      % (name, have, input_spec.input_dtype, hint))

        session = TfliteSession(interp, inp, list(zip(ordered, out_qs)), name, shape, in_q)
        session.info = {
            "module": lite.module,
            "version": lite.version,
            "delegate": delegate,
            "delegate_library": library,
            "delegate_options": {str(k): str(v) for k, v in delegate_options.items()} if delegate else None,
            "xnnpack": xnnpack,
            "op_resolver": resolver,
            "num_threads": threads if threads > 0 else None,
            "input_tensor": str(inp["name"]),
            "input_dtype": have,
            "input_quantization": _q_info(in_q),
            "quantized_in_agent": in_q is not None,  # float inputs quantized here (the runner feeds floats)
            "output_dtype": np.dtype(out["dtype"]).name,
            "output_quantization": _q_info(out_q),
            "outputs": [str(d["name"]) for d in ordered],
            "output_order": order_source,
            "batch_mode": ("fixed %d" % shape[0] if shape[0] is not None else
                           "dynamic in the model; resized to the batch fed"),
        }
        return session


def _q_info(q: Optional[Tuple[float, int]]) -> Optional[Dict[str, Any]]:
    return None if q is None else {"scale": q[0], "zero_point": q[1]}


_TFL_SIGNATURE_OUTPUT = re.compile(r"^output_(\d+)$")              # litert_torch: output_0, output_1, ...
_TFL_TF_OUTPUT = re.compile(r"^(?:.*/)?StatefulPartitionedCall(?:_\d+)?:(\d+)$")   # TF converter tensor names


def tfl_output_order(interp: Any, outputs: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    """The output details in the model's output order (the torch forward's, for litert_torch models) and how
    that order was found.

    The signature runner lists its outputs sorted by name (``output_0, output_1, output_10, output_2``; a dict
    model's keys alphabetically), so it cannot be taken as it comes. In order of preference:
    ``signature output_N``: every signature output is named ``output_<N>`` (litert_torch's names for a tuple's
    elements), ordered by N; ``tensor StatefulPartitionedCall:N``: every output tensor is named so (the TF
    converter), ordered by N; else ``subgraph``: the interpreter's own output order (litert_torch keeps a dict's
    insertion order there)."""
    by_index = {int(d["index"]): d for d in outputs}
    try:
        signatures = interp.get_signature_list()
        if len(signatures) == 1:
            runner = interp.get_signature_runner(next(iter(signatures)))
            named = [(str(k), int(d["index"])) for k, d in runner.get_output_details().items()]
            keys = [_TFL_SIGNATURE_OUTPUT.match(k) for k, _ in named]
            if (len(named) == len(outputs) and all(keys) and all(i in by_index for _, i in named)
                    and len({int(m.group(1)) for m in keys if m}) == len(named)):
                ranked = sorted(zip(keys, named), key=lambda t: int(t[0].group(1)) if t[0] else 0)
                return [by_index[i] for _, (_, i) in ranked], "signature output_N"
    except (ValueError, RuntimeError, AttributeError, KeyError):  # no signatures, or a tflite_runtime without runners
        pass
    tf = [_TFL_TF_OUTPUT.match(str(d["name"])) for d in outputs]
    if len(outputs) > 1 and all(tf) and len({int(m.group(1)) for m in tf if m}) == len(outputs):
        ranked = sorted(zip(tf, outputs), key=lambda t: int(t[0].group(1)) if t[0] else 0)
        return [d for _, d in ranked], "tensor StatefulPartitionedCall:N"
    return list(outputs), "subgraph"


def _tfl_input_names(interp: Any, index: int) -> List[str]:
    """The input tensor's name and the names its signatures give it (``args_0`` for ``serving_default_args_0``)."""
    names = [str(d["name"]) for d in interp.get_input_details() if int(d["index"]) == index]
    try:
        signatures = interp.get_signature_list()
        for key in signatures:
            runner = interp.get_signature_runner(key)
            names += [str(n) for n, d in runner.get_input_details().items() if int(d["index"]) == index]
    except (ValueError, RuntimeError, AttributeError):  # no signatures, or a tflite_runtime without runners
        pass
    return names


class _Lite:
    """The interpreter names the backend uses, from whichever package the device has."""

    def __init__(self, module: str, version: str, interpreter: Any, load_delegate: Any, op_resolver_type: Any):
        self.module = module
        self.version = version
        self.Interpreter = interpreter
        self.load_delegate = load_delegate
        self.op_resolver_type = op_resolver_type


def _import_tflite() -> _Lite:
    """``ai_edge_litert.interpreter`` (LiteRT, the successor) or else ``tflite_runtime.interpreter``."""
    errors = []
    for package, dist in (("ai_edge_litert", "ai-edge-litert"), ("tflite_runtime", "tflite-runtime")):
        try:
            module = __import__(package + ".interpreter", fromlist=["Interpreter"])
        except ImportError as e:
            errors.append("%s: %s" % (package, e))
            continue
        top = __import__(package)
        version = getattr(top, "__version__", None) or _dist_version(dist) or "unknown"
        return _Lite(package, "%s %s" % (dist, version), module.Interpreter, module.load_delegate,
                     getattr(module, "OpResolverType", None))
    raise RuntimeBackendError("runtime 'tflite' is not installed on this device (%s); install it with pip install "
                              "ai-edge-litert (LiteRT; or tflite-runtime on Python < 3.9 devices)" % "; ".join(errors))


def _load_edgetpu(lite: _Lite, library: str, options: Dict[str, Any]) -> Any:
    import ctypes

    try:
        # dlopen first: a Delegate whose library fails to load raises again from its __del__ (LiteRT 2.3)
        ctypes.CDLL(library)
        return lite.load_delegate(library, {str(k): str(v) for k, v in options.items()})
    except (ValueError, OSError, RuntimeError) as e:
        raise RuntimeBackendError(
            "runtime.options.delegate: 'edgetpu' needs the Edge TPU runtime library %s, which cannot be loaded "
            "(%s); install it from Coral's package repository (sudo apt-get install libedgetpu1-std, see "
            "https://coral.ai/docs/accelerator/get-started/), plug in the Edge TPU, and check "
            "runtime.options.delegate_options" % (library, _last_line(e))) from None


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(e)


def _dist_version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- tensorrt
_TRT_OPTIONS = ("precision", "sparsity", "cache_dir", "calibration_data", "calibration_cache", "workspace_mb",
                "max_batch", "device")
# precision -> (BuilderFlag names set, BuilderFlag names cleared). "fp32" clears TF32 (on by default on Ampere
# and later, Jetson Orin included) so that fp32 means fp32; "int8" alone lets layers TensorRT cannot run in int8
# fall back to fp32, "int8+fp16" to fp16.
TRT_PRECISIONS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "fp32": ((), ("TF32",)),
    "fp16": (("FP16",), ()),
    "int8": (("INT8",), ()),
    "int8+fp16": (("INT8", "FP16"), ()),
}
TRT_DEFAULT_CACHE = "~/.cache/edgeprune/trt"
TRT_MISSING = ("runtime 'tensorrt' needs NVIDIA TensorRT's Python bindings (JetPack ships them; "
               "on x86: pip install tensorrt)")


@dataclass
class TrtOptions:
    """``runtime.options`` for tensorrt, checked and with relative paths resolved against the artifact's folder."""

    precision: str = "fp32"
    sparsity: bool = False
    cache_dir: Path = Path(TRT_DEFAULT_CACHE).expanduser()
    calibration_data: Optional[Path] = None
    calibration_cache: Optional[Path] = None
    workspace_mb: int = 1024
    max_batch: Optional[int] = None
    device: int = 0


def trt_options(options: Dict[str, Any], artifact_dir: Path) -> TrtOptions:
    """Check tensorrt's ``runtime.options`` without importing TensorRT (so a bad job fails the same everywhere)."""
    unknown = sorted(set(options) - set(_TRT_OPTIONS))
    if unknown:
        raise RuntimeBackendError("runtime.options.%s: unknown option for tensorrt (knows: %s)"
                                  % (unknown[0], ", ".join(_TRT_OPTIONS)))
    precision = options.get("precision", "fp32")
    if precision not in TRT_PRECISIONS:
        raise RuntimeBackendError("runtime.options.precision: %r is not one of %s"
                                  % (precision, ", ".join(TRT_PRECISIONS)))
    sparsity = options.get("sparsity", False)
    if not isinstance(sparsity, bool):
        raise RuntimeBackendError("runtime.options.sparsity: must be true or false")
    for key in ("workspace_mb", "max_batch", "device"):
        value = options.get(key)
        least = 0 if key == "device" else 1
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise RuntimeBackendError("runtime.options.%s: must be an integer >= %d" % (key, least))
    paths: Dict[str, Optional[Path]] = {}
    for key in ("cache_dir", "calibration_data", "calibration_cache"):
        value = options.get(key)
        if value is not None and not (isinstance(value, str) and value):
            raise RuntimeBackendError("runtime.options.%s: must be a path" % key)
        p = Path(value).expanduser() if value else None
        paths[key] = p if p is None or p.is_absolute() else artifact_dir / p
    if paths["calibration_data"] is not None and not paths["calibration_data"].is_file():
        raise RuntimeBackendError("runtime.options.calibration_data: %s does not exist" % paths["calibration_data"])
    if "INT8" in TRT_PRECISIONS[precision][0]:
        cache = paths["calibration_cache"]
        if paths["calibration_data"] is None and (cache is None or not cache.is_file()):
            raise RuntimeBackendError("runtime.options.precision: %s needs runtime.options.calibration_data (an npz "
                                      "with float32 'inputs' in the artifact's layout) or an existing "
                                      "runtime.options.calibration_cache" % precision)
    elif paths["calibration_data"] is not None or paths["calibration_cache"] is not None:
        raise RuntimeBackendError("runtime.options.calibration_data: calibration is for int8 precisions only; "
                                  "leave it unset for %s" % precision)
    return TrtOptions(precision=precision, sparsity=sparsity,
                      cache_dir=paths["cache_dir"] or Path(TRT_DEFAULT_CACHE).expanduser(),
                      calibration_data=paths["calibration_data"], calibration_cache=paths["calibration_cache"],
                      workspace_mb=options.get("workspace_mb", 1024), max_batch=options.get("max_batch"),
                      device=options.get("device", 0))


def trt_builder_flags(precision: str, sparsity: bool) -> Tuple[List[str], List[str]]:
    """(``trt.BuilderFlag`` names to set, names to clear) for a precision and the 2:4 sparsity switch."""
    on, off = TRT_PRECISIONS[precision]
    return list(on) + (["SPARSE_WEIGHTS"] if sparsity else []), list(off)


def trt_cache_key(artifact_sha256: str, tensorrt_version: str, gpu_name: str, compute_capability: str,
                  flags: Tuple[List[str], List[str]], profile: Sequence[Sequence[int]], workspace_mb: int,
                  calibration_sha256: Optional[str]) -> str:
    """The engine cache key: a sha256 over everything that changes the engine TensorRT builds."""
    doc = {"artifact_sha256": artifact_sha256, "tensorrt": tensorrt_version, "gpu": gpu_name,
           "compute_capability": compute_capability, "flags_set": sorted(flags[0]), "flags_cleared": sorted(flags[1]),
           "profile": [list(map(int, s)) for s in profile], "workspace_mb": workspace_mb,
           "calibration_sha256": calibration_sha256}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def trt_engine_path(cache_dir: Path, artifact_sha256: str, key: str) -> Path:
    return cache_dir / ("%s-%s.engine" % (artifact_sha256[:16], key[:24]))


class CalibrationBatches:
    """Fixed-size batches over a float32 array for TensorRT's int8 calibrator: ``len(array) // batch`` full
    batches in order (a last partial batch is left out, since the calibration profile has a fixed shape)."""

    def __init__(self, array: np.ndarray, batch: int) -> None:
        if array.ndim < 2 or len(array) < batch:
            raise RuntimeBackendError("calibration data has %d samples; needs at least one batch of %d"
                                      % (len(array), batch))
        self.array = np.ascontiguousarray(array, dtype=np.float32)
        self.batch = batch
        self.count = len(array) // batch
        self.served = 0

    def next(self) -> Optional[np.ndarray]:
        if self.served >= self.count:
            return None
        i = self.served * self.batch
        self.served += 1
        return self.array[i:i + self.batch]

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            b = self.next()
            if b is None:
                return
            yield b


class _Cuda:
    """cudart from cuda-python: error-checked calls (each returns ``(err, *values)``)."""

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart

    def call(self, what: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(err)
            raise RuntimeBackendError("CUDA %s failed: %s" % (what, name[1].decode() if isinstance(name, tuple)
                                                                 and isinstance(name[1], bytes) else err))
        values = result[1:] if isinstance(result, tuple) else ()
        return values[0] if len(values) == 1 else values

    def malloc(self, nbytes: int) -> int:
        return int(self.call("cudaMalloc", self.rt.cudaMalloc(max(1, nbytes))))

    def to_device(self, ptr: int, host: np.ndarray, stream: Any) -> None:
        self.call("cudaMemcpyAsync (host to device)", self.rt.cudaMemcpyAsync(
            ptr, host.ctypes.data, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def to_host(self, host: np.ndarray, ptr: int, stream: Any) -> None:
        self.call("cudaMemcpyAsync (device to host)", self.rt.cudaMemcpyAsync(
            host.ctypes.data, ptr, host.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


class TrtSession(Session):
    """A deserialized engine with one execution context, one CUDA stream and device buffers for every I/O tensor
    at the profile's max batch (freed when the agent process exits: one job per process). ``run`` copies the
    input to the device, runs ``execute_async_v3`` (which computes every output) and copies output 0 back, then
    synchronizes the stream: the time the runner measures is host to host. ``run_all`` copies every output
    back, in the engine's I/O tensor order (``get_tensor_name(i)``, which follows the ONNX network's outputs). A
    dynamic-batch engine takes any batch; batches above its max are run in chunks."""

    def __init__(self, trt: Any, cuda: _Cuda, runtime: Any, engine: Any, input_name: str,
                 input_shape: List[Optional[int]], spec_shape: List[int], max_batch: int) -> None:
        self._trt = trt
        self._cuda = cuda
        self._runtime = runtime  # the runtime must outlive its engine
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = cuda.call("cudaStreamCreate", cuda.rt.cudaStreamCreate())
        self._max_batch = max_batch
        self._rest = list(spec_shape[1:])
        self._batch = -1
        self._buffers: Dict[str, int] = {}
        self._outputs: List[str] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:
                shape = [max_batch] + self._rest
            else:
                shape = [max_batch if d < 0 else d for d in engine.get_tensor_shape(name)]
                self._outputs.append(name)
            nbytes = int(np.prod(shape)) * np.dtype(trt.nptype(engine.get_tensor_dtype(name))).itemsize
            self._buffers[name] = cuda.malloc(nbytes)
            self._context.set_tensor_address(name, self._buffers[name])
        self._in_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(input_name)))
        self._output = self._outputs[0]
        self._out_dtypes = {name: np.dtype(trt.nptype(engine.get_tensor_dtype(name))) for name in self._outputs}
        self.input_name = input_name
        self.input_shape = input_shape
        self.info: Dict[str, Any] = {}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        return self._run(inputs, self._outputs[:1])[0]

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        return self._run(inputs, self._outputs)

    def _run(self, inputs: np.ndarray, names: List[str]) -> List[np.ndarray]:
        n = inputs.shape[0]
        if self.input_shape[0] is not None and n != self.input_shape[0]:
            raise RuntimeBackendError("model input %r has a fixed batch of %d; cannot run a batch of %d"
                                      % (self.input_name, self.input_shape[0], n))
        if n > self._max_batch:
            parts = [self._run(inputs[i:i + self._max_batch], names) for i in range(0, n, self._max_batch)]
            return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
        x = np.ascontiguousarray(inputs, dtype=self._in_dtype)
        if n != self._batch:
            if not self._context.set_input_shape(self.input_name, [n] + self._rest):
                raise RuntimeBackendError("tensorrt refused input shape %s" % ([n] + self._rest))
            self._batch = n
        outs = [np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._out_dtypes[name]) for name in names]
        self._cuda.to_device(self._buffers[self.input_name], x, self._stream)
        if not self._context.execute_async_v3(int(self._stream)):
            raise RuntimeBackendError("tensorrt execute_async_v3 failed")
        for name, out in zip(names, outs):
            self._cuda.to_host(out, self._buffers[name], self._stream)
        self._cuda.call("cudaStreamSynchronize", self._cuda.rt.cudaStreamSynchronize(self._stream))
        return [out.astype(np.float32, copy=False) for out in outs]


@register_runtime("tensorrt")
class TensorRt(Runtime):
    """NVIDIA TensorRT (8.5+ and 10): builds an engine on the device from the ONNX artifact and caches it.

    Options: ``precision`` ("fp32" default, "fp16", "int8", "int8+fp16"; see :data:`TRT_PRECISIONS`),
    ``sparsity`` (true: ``SPARSE_WEIGHTS``, 2:4 sparse kernels where the weights allow), ``cache_dir`` (default
    ``~/.cache/edgeprune/trt``), ``calibration_data`` (int8: an npz with float32 ``inputs`` in the artifact's
    layout, fed to an entropy calibrator), ``calibration_cache`` (int8: read when it exists, else written after
    calibrating), ``workspace_mb`` (builder workspace, default 1024), ``max_batch`` (dynamic-batch models: the
    profile's max, default max(artifact batch, 32)), ``device`` (CUDA device index, default 0). Relative paths are
    relative to the artifact's folder. The engine is cached under :func:`trt_cache_key` (artifact sha256,
    TensorRT version, GPU name and compute capability, flags, shape profile, workspace, calibration data).
    Device memory goes through cuda-python's ``cudart`` (no torch, no pycuda).
    """

    def version(self) -> str:
        return str(_import_trt().__version__)

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        opts = trt_options(options, path.parent)
        trt = _import_trt()
        cuda = _Cuda(_import_cudart())
        if path.suffix.lower() != ".onnx":
            raise RuntimeBackendError("artifact.path: tensorrt builds its engine from an ONNX artifact; got %s"
                                      % path.name)
        cuda.call("cudaSetDevice", cuda.rt.cudaSetDevice(opts.device))
        props = cuda.call("cudaGetDeviceProperties", cuda.rt.cudaGetDeviceProperties(opts.device))
        raw = props.name
        gpu = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\x00")[0].strip()
        capability = "%d.%d" % (props.major, props.minor)
        log = _trt_logger(trt)
        builder = trt.Builder(log)
        major = int(str(trt.__version__).split(".")[0])
        network = builder.create_network(0 if major >= 10 else
                                         1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
        parser = trt.OnnxParser(network, log)
        if not parser.parse(path.read_bytes()):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeBackendError("tensorrt cannot parse %s: %s" % (path.name, "; ".join(errors) or log.last()))
        if network.num_inputs != 1 or network.num_outputs < 1:
            raise RuntimeBackendError("model must have exactly one input and at least one output "
                                      "(has %d inputs, %d outputs)" % (network.num_inputs, network.num_outputs))
        tensor = network.get_input(0)
        shape = [int(d) if d > 0 else None for d in tensor.shape]
        check_input(tensor.name, shape, input_spec)
        have = np.dtype(trt.nptype(tensor.dtype)).name
        if have != input_spec.input_dtype:
            raise RuntimeBackendError("model input %r has type %s but artifact.input_dtype is %r"
                                      % (tensor.name, have, input_spec.input_dtype))
        spec_shape = list(input_spec.input_shape)
        if shape[0] is None:
            max_batch = opts.max_batch or max(spec_shape[0], 32)
            if max_batch < spec_shape[0]:
                raise RuntimeBackendError("runtime.options.max_batch: %d is below the artifact's batch %d"
                                          % (max_batch, spec_shape[0]))
            profile_shapes = [[1] + spec_shape[1:], spec_shape, [max_batch] + spec_shape[1:]]
        else:
            max_batch = shape[0]
            profile_shapes = [spec_shape, spec_shape, spec_shape]
        flags = trt_builder_flags(opts.precision, opts.sparsity)
        calib_sha = None
        if opts.calibration_data is not None:
            calib_sha = hashlib.sha256(opts.calibration_data.read_bytes()).hexdigest()
        elif opts.calibration_cache is not None and "INT8" in flags[0]:
            calib_sha = hashlib.sha256(opts.calibration_cache.read_bytes()).hexdigest()
        key = trt_cache_key(input_spec.sha256, str(trt.__version__), gpu, capability, flags, profile_shapes,
                            opts.workspace_mb, calib_sha)
        engine_path = trt_engine_path(opts.cache_dir, input_spec.sha256, key)
        runtime = trt.Runtime(log)
        engine = None
        cache_hit = False
        build_s = None
        if engine_path.is_file():
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
            cache_hit = engine is not None  # an unreadable cached engine is rebuilt and replaced
        calibration: Dict[str, Any] = {"source": None}
        if engine is None:
            t0 = time.perf_counter()
            blob, calibration = _trt_build(trt, cuda, builder, network, log, opts, flags, tensor.name,
                                           profile_shapes, spec_shape)
            build_s = time.perf_counter() - t0
            opts.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = engine_path.with_name(engine_path.name + ".%d.tmp" % os.getpid())
            tmp.write_bytes(blob)
            os.replace(tmp, engine_path)
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise RuntimeBackendError("tensorrt built an engine it cannot deserialize: %s" % log.last())
        session = TrtSession(trt, cuda, runtime, engine, tensor.name, shape, spec_shape, max_batch)
        session.info = {
            "tensorrt_version": str(trt.__version__),
            "gpu_name": gpu,
            "compute_capability": capability,
            "device": opts.device,
            "precision": opts.precision,
            "builder_flags_set": flags[0],
            "builder_flags_cleared": flags[1],
            "sparsity": opts.sparsity,
            "workspace_mb": opts.workspace_mb,
            "profile": profile_shapes,
            "engine_cache": str(engine_path),
            "engine_cache_key": key,
            "cache_hit": cache_hit,
            "engine_build_s": build_s,
            "calibration": calibration,
            "batch_mode": ("fixed %d" % shape[0] if shape[0] is not None else
                           "dynamic: profile 1..%d, optimised for %d" % (max_batch, spec_shape[0])),
            "timed": "host to device copy, execute_async_v3, device to host copy, stream synchronize",
        }
        return session


def _trt_build(trt: Any, cuda: _Cuda, builder: Any, network: Any, log: Any, opts: TrtOptions,
               flags: Tuple[List[str], List[str]], input_name: str, profile_shapes: List[List[int]],
               spec_shape: List[int]) -> Tuple[bytes, Dict[str, Any]]:
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mb << 20)
    for name in flags[0] + flags[1]:
        if not hasattr(trt.BuilderFlag, name):
            raise RuntimeBackendError("runtime.options.precision: TensorRT %s has no BuilderFlag.%s (%s with "
                                      "sparsity=%s needs it)" % (trt.__version__, name, opts.precision, opts.sparsity))
    for name in flags[0]:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in flags[1]:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *profile_shapes)
    config.add_optimization_profile(profile)
    calibration: Dict[str, Any] = {"source": None}
    if "INT8" in flags[0]:
        if not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise RuntimeBackendError("runtime.options.precision: TensorRT %s has no int8 calibrator (implicit "
                                      "quantization, which this backend uses for int8); use fp16 or fp32"
                                      % trt.__version__)
        batches = None
        if opts.calibration_data is not None:
            data = load_inputs(opts.calibration_data, spec_shape, "runtime.options.calibration_data")
            batches = CalibrationBatches(data, spec_shape[0])
            cal_profile = builder.create_optimization_profile()
            cal_profile.set_shape(input_name, spec_shape, spec_shape, spec_shape)
            config.set_calibration_profile(cal_profile)
        config.int8_calibrator = _trt_calibrator(trt, cuda, batches, opts.calibration_cache)
        calibration = {"source": "data" if batches is not None else "cache",
                       "data": str(opts.calibration_data) if batches is not None else None,
                       "batches": batches.count if batches is not None else None,
                       "batch": spec_shape[0] if batches is not None else None,
                       "cache": str(opts.calibration_cache) if opts.calibration_cache is not None else None}
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeBackendError("tensorrt could not build an engine: %s" % log.last())
    return bytes(blob), calibration


def _trt_calibrator(trt: Any, cuda: _Cuda, batches: Optional[CalibrationBatches], cache: Optional[Path]) -> Any:
    """An ``IInt8EntropyCalibrator2`` over :class:`CalibrationBatches` (defined here: it subclasses a TensorRT
    class, and TensorRT is imported only when a job asks for it)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.device_ptr = cuda.malloc(batches.array[:batches.batch].nbytes) if batches is not None else 0

        def get_batch_size(self) -> int:
            return batches.batch if batches is not None else 1

        def get_batch(self, names: List[str]) -> Optional[List[int]]:
            batch = batches.next() if batches is not None else None
            if batch is None:
                return None
            cuda.call("cudaMemcpy (calibration batch)", cuda.rt.cudaMemcpy(
                self.device_ptr, batch.ctypes.data, batch.nbytes, cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice))
            return [self.device_ptr]

        def read_calibration_cache(self) -> Optional[bytes]:
            if cache is not None and cache.is_file():
                return cache.read_bytes()
            return None

        def write_calibration_cache(self, data: Any) -> None:
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_bytes(bytes(data))

    return Calibrator()


def _trt_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps its warnings and errors, so a failed build says why."""

    class Logger(trt.ILogger):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: List[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.WARNING):  # INTERNAL_ERROR, ERROR, WARNING
                self.messages = (self.messages + [str(msg)])[-20:]

        def last(self) -> str:
            return self.messages[-1] if self.messages else "no message from TensorRT"

    return Logger()


def _import_trt() -> Any:
    try:
        import tensorrt
    except ImportError as e:
        raise RuntimeBackendError("%s (%s)" % (TRT_MISSING, e)) from None
    return tensorrt


def _import_cudart() -> Any:
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (12.6+ and 13) or ``cuda.cudart`` (11.x, 12.x)."""
    try:
        from cuda.bindings import runtime
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart
    except ImportError as e:
        raise RuntimeBackendError("runtime 'tensorrt' needs cuda-python for device memory (%s); install it with "
                                  "pip install cuda-python (the release matching the device's CUDA)" % e) from None
    return cudart


# ------------------------------------------------------------------------------------------------- torch
_TORCH_OPTIONS = ("device", "precision", "cudnn_benchmark")
_TORCH_PRECISIONS = ("fp32", "fp16")


class TorchSession(Session):
    """A TorchScript module on one device. On CUDA every run is bracketed by ``torch.cuda.synchronize`` so the
    runner times the work itself and not a queue of launches; outputs come back as float32 numpy arrays (a tuple,
    list or dict output flattened in order: ``run`` returns the first, ``run_all`` all)."""

    def __init__(self, torch: Any, module: Any, device: Any, half: bool, input_shape: List[Optional[int]],
                 input_name: str) -> None:
        self._torch = torch
        self._module = module
        self._device = device
        self._half = half
        self._cuda = device.type == "cuda"
        self.input_name = input_name
        self.input_shape = input_shape
        self.info: Dict[str, Any] = {}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            if self._cuda:
                torch.cuda.synchronize(self._device)
            x = np.ascontiguousarray(inputs)
            x = torch.from_numpy(x if x.flags.writeable else x.copy()).to(self._device)
            if self._half:
                x = x.half()
            y = self._module(x)
            if self._cuda:
                torch.cuda.synchronize(self._device)
            first = _torch_outputs(torch, y)[0]
            out: np.ndarray = first.float().cpu().numpy()
        return out

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        torch = self._torch
        with torch.no_grad():
            x = np.ascontiguousarray(inputs)
            x = torch.from_numpy(x if x.flags.writeable else x.copy()).to(self._device)
            if self._half:
                x = x.half()
            y = self._module(x)
            return [t.float().cpu().numpy() for t in _torch_outputs(torch, y)]


def _torch_outputs(torch: Any, y: Any) -> List[Any]:
    """A module's output as a flat list of tensors: a tensor, a tuple/list (nested ones flattened in order) or a
    dict (insertion order, as the ONNX exporter and ``edgeprune.shards.reference_outputs`` flatten it)."""
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        y = list(y.values())
    if isinstance(y, (tuple, list)):
        return [t for item in y for t in _torch_outputs(torch, item)]
    raise RuntimeBackendError("torch module returned %s; the agent takes tensors, or tuples, lists or dicts of "
                              "them" % type(y).__name__)


@register_runtime("torch")
class TorchScript(Runtime):
    """PyTorch, running a TorchScript artifact (``torch.jit.load``): the reference the other runtimes are held to,
    and the runtime of devices with a CUDA-enabled torch (Jetson wheels from NVIDIA).

    Options: ``device`` ("cpu" default, "cuda", "cuda:N"), ``precision`` ("fp32" default; "fp16" on CUDA only: the
    module and its input in half precision, outputs back in float32), ``cudnn_benchmark`` (CUDA only: cuDNN
    picks its fastest kernels during warm-up; default false). ``runtime.threads`` > 0 sets
    ``torch.set_num_threads``. TorchScript does not declare input shapes: the module takes the artifact's shape
    with any batch size (``input_shape[0]`` is dynamic) and a shape it cannot take fails on the first inference.
    """

    def version(self) -> str:
        return str(_import_torch().__version__)

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        torch = _import_torch()
        unknown = sorted(set(options) - set(_TORCH_OPTIONS))
        if unknown:
            raise RuntimeBackendError("runtime.options.%s: unknown option for torch (knows: %s)"
                                      % (unknown[0], ", ".join(_TORCH_OPTIONS)))
        name = options.get("device", "cpu")
        precision = options.get("precision", "fp32")
        benchmark = options.get("cudnn_benchmark")
        if not (isinstance(name, str) and (name in ("cpu", "cuda") or
                                           (name.startswith("cuda:") and name[5:].isdigit()))):
            raise RuntimeBackendError("runtime.options.device: %r is not \"cpu\", \"cuda\" or \"cuda:N\"" % (name,))
        if precision not in _TORCH_PRECISIONS:
            raise RuntimeBackendError("runtime.options.precision: %r is not one of %s"
                                      % (precision, ", ".join(_TORCH_PRECISIONS)))
        if benchmark is not None and not isinstance(benchmark, bool):
            raise RuntimeBackendError("runtime.options.cudnn_benchmark: must be true or false")
        cuda = name.startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise RuntimeBackendError("runtime.options.device: %s but this torch %s has no usable CUDA device "
                                          "(built for CUDA %s)" % (name, torch.__version__, torch.version.cuda))
            index = int(name[5:]) if ":" in name else torch.cuda.current_device()
            if index >= torch.cuda.device_count():
                raise RuntimeBackendError("runtime.options.device: %s not available (this device has %d CUDA "
                                          "device(s))" % (name, torch.cuda.device_count()))
            device = torch.device("cuda", index)
        else:
            device = torch.device("cpu")
            if precision == "fp16":
                raise RuntimeBackendError("runtime.options.precision: fp16 needs a CUDA device; use fp32 on the CPU")
            if benchmark is not None:
                raise RuntimeBackendError("runtime.options.cudnn_benchmark: applies to CUDA devices only; leave it "
                                          "unset on the CPU")
        if input_spec.input_dtype != "float32":
            raise RuntimeBackendError("artifact.input_dtype: %r; the torch backend feeds float32 (fp16 through "
                                      "runtime.options.precision)" % input_spec.input_dtype)
        if threads > 0:
            torch.set_num_threads(threads)
        if cuda:
            torch.backends.cudnn.benchmark = bool(benchmark)
        try:
            # torch 2.9+ marks TorchScript deprecated (DeprecationWarning on every jit.load); it is still what
            # torch on the devices loads, so the warnings are recorded in the session info, not raised
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                module = torch.jit.load(str(path), map_location=device)
        except (RuntimeError, ValueError) as e:
            raise RuntimeBackendError("torch cannot load %s as TorchScript: %s" % (path.name, _last_line(e))) \
                from None
        module.eval()
        if precision == "fp16":
            module = module.half()
        shape: List[Optional[int]] = [None] + list(input_spec.input_shape[1:])
        session = TorchSession(torch, module, device, precision == "fp16", shape, input_spec.input_name)
        session.info = {
            "torch_version": str(torch.__version__),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
            "cuda_version": torch.version.cuda,
            "cudnn_version": torch.backends.cudnn.version() if cuda else None,
            "cudnn_benchmark": bool(benchmark) if cuda else None,
            "precision": precision,
            "num_threads": torch.get_num_threads(),
            "batch_mode": "any batch (TorchScript declares no input shape)",
            "load_warnings": sorted({"%s: %s" % (w.category.__name__, str(w.message).splitlines()[0][:200])
                                     for w in caught}),
        }
        return session


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise RuntimeBackendError("runtime 'torch' is not installed on this device (%s); install it with pip install "
                                  "torch (on Jetson: NVIDIA's torch wheel for your JetPack release)" % e) from None
    return torch
