"""Runtime backends: a small registry of classes that load an artifact and run it on numpy arrays.

A backend is a :class:`Runtime` subclass registered under the name a job uses in ``runtime.name``::

    @register_runtime("myruntime")
    class MyRuntime(Runtime):
        def version(self) -> str: ...
        def load(self, path, input_spec, threads, options) -> Session: ...

Each backend imports its runtime inside its own methods, so the agent imports only the runtime a job asks for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

import numpy as np

from agent import RuntimeBackendError
from agent.schema import ArtifactSpec

_RUNTIMES: Dict[str, Type["Runtime"]] = {}


class Session:
    """A loaded model. ``input_shape`` is the model's own input shape, ``None`` where a dimension is dynamic."""

    input_name: str
    input_shape: List[Optional[int]]
    info: Dict[str, Any]  # what the backend actually applied (providers, ...), recorded in the report

    def run(self, inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Runtime:
    name: str = ""

    def version(self) -> str:
        raise NotImplementedError

    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        raise NotImplementedError


def register_runtime(name: str) -> Callable[[Type[Runtime]], Type[Runtime]]:
    def deco(cls: Type[Runtime]) -> Type[Runtime]:
        if name in _RUNTIMES:
            raise ValueError("runtime %r is already registered" % name)
        cls.name = name
        _RUNTIMES[name] = cls
        return cls
    return deco


def runtime_names() -> List[str]:
    return sorted(_RUNTIMES)


def get_runtime(name: str) -> Runtime:
    try:
        return _RUNTIMES[name]()
    except KeyError:
        raise RuntimeBackendError("unknown runtime %r (this agent knows: %s)"
                                  % (name, ", ".join(runtime_names()))) from None


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
_ORT_OPTIONS = ("providers",)


class OrtSession(Session):
    def __init__(self, sess: Any, input_name: str, input_shape: List[Optional[int]], output_name: str) -> None:
        self._sess = sess
        self._output = output_name
        self.input_name = input_name
        self.input_shape = input_shape
        self.info = {"providers": list(sess.get_providers())}

    def run(self, inputs: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._sess.run([self._output], {self.input_name: inputs})[0]
        return out


@register_runtime("onnxruntime")
class OnnxRuntime(Runtime):
    """onnxruntime with a fixed, explicit configuration: sequential execution, all graph optimisations."""

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
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)

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
        return OrtSession(sess, inputs[0].name, shape, outputs[0].name)


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise RuntimeBackendError("runtime 'onnxruntime' is not installed on this device (%s)" % e) from None
    return onnxruntime
