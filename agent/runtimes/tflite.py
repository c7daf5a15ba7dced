"""Runtime ``tflite``: TensorFlow Lite models through LiteRT (``ai_edge_litert``) or the older ``tflite_runtime``,
with the optional Coral Edge TPU delegate (``runtime.options.delegate: "edgetpu"``: an option of this runtime, not a
runtime of its own).

Written against the LiteRT / tflite_runtime ``Interpreter`` API and Coral's ``load_delegate('libedgetpu.so.1')``;
the interpreter package is imported inside the backend's methods only. Verified on x86-64 Linux with LiteRT 2.3
(XNNPACK) on the CPU (demo, tests, benchmarks); the ``tflite_runtime`` import path is tested with a stand-in
package. The Edge TPU delegate is tested for its failure paths only: never run on an Edge TPU.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from agent import RuntimeBackendError
from agent.runtimes.base import Runtime, Session, _float32, _last_line, check_input
from agent.schema import ArtifactSpec


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

    name = "tflite"

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


def _dist_version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None
