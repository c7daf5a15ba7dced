"""Runtime ``onnxruntime``: ONNX models through onnxruntime (``onnxruntime``, or ``onnxruntime-gpu`` for the CUDA
and TensorRT execution providers).

Written against onnxruntime's Python API (``InferenceSession``, ``SessionOptions``, execution providers); the
package is imported inside the backend's methods only. Verified on x86-64 Linux with onnxruntime 1.32 on the CPU
(demo, tests, benchmarks). The CUDA and TensorRT execution providers were never run (no GPU was available to this
work): a provider missing from this build, and one that onnxruntime drops at session creation (a stand-in
session), are tested.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from agent import RuntimeBackendError
from agent.runtimes.base import Runtime, Session, _float32, check_input
from agent.schema import ArtifactSpec


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

    name = "onnxruntime"

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
