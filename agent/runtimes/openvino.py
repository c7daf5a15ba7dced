"""Runtime ``openvino``: ONNX or OpenVINO IR models through OpenVINO, compiled with static shapes per batch size.

Written against the OpenVINO Python API of 2023.1+ (``openvino.Core``) and of 2022.3 LTS (``openvino.runtime.Core``,
the last release with the MYRIAD plugin for the Intel NCS2); the package is imported inside the backend's methods
only. Verified on x86-64 Linux with OpenVINO 2026.4 on the CPU, f32 (demo, tests, benchmarks). The 2022.3 import
path is tested with stand-in modules, and MYRIAD (NCS2) device selection with a stand-in ``Core``: not run on the
hardware.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from agent import ArtifactError, RuntimeBackendError
from agent.runtimes.base import Runtime, Session, check_input
from agent.schema import ArtifactSpec


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


class OpenVino(Runtime):
    """OpenVINO with a fixed, explicit configuration: one stream, the precision hint always set where the
    device takes it, static shapes. Reads ONNX directly, or OpenVINO IR when the artifact path ends in .xml
    (its .bin beside it; only the .xml is covered by ``artifact.sha256``).

    Options: ``device`` (default "CPU", one of ``Core().available_devices``), ``precision`` (inference
    precision hint: "f32" default, "f16", "bf16"), ``performance_hint`` ("LATENCY" default, "THROUGHPUT").
    Works with the 2023.1+ API (``openvino.Core``) and with 2022.3 LTS (``openvino.runtime.Core``, the last
    release with the MYRIAD plugin for the Intel NCS2).
    """

    name = "openvino"

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
