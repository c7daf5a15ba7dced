"""Runtime ``torch``: TorchScript artifacts (``torch.jit.load``) through PyTorch, on the CPU or a CUDA device.

Written against PyTorch's TorchScript and ``torch.cuda`` APIs; torch is imported inside the backend's methods only.
Verified on x86-64 Linux with TorchScript on the CPU (tests, against the same model through onnxruntime). Torch on
CUDA (``device: "cuda"``, fp16, cuDNN benchmark) was never run: no GPU was available to this work.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from agent import RuntimeBackendError
from agent.runtimes.base import Runtime, Session, _last_line
from agent.schema import ArtifactSpec


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


class TorchScript(Runtime):
    """PyTorch, running a TorchScript artifact (``torch.jit.load``): the reference the other runtimes are held to,
    and the runtime of devices with a CUDA-enabled torch (Jetson wheels from NVIDIA).

    Options: ``device`` ("cpu" default, "cuda", "cuda:N"), ``precision`` ("fp32" default; "fp16" on CUDA only: the
    module and its input in half precision, outputs back in float32), ``cudnn_benchmark`` (CUDA only: cuDNN
    picks its fastest kernels during warm-up; default false). ``runtime.threads`` > 0 sets
    ``torch.set_num_threads``. TorchScript does not declare input shapes: the module takes the artifact's shape
    with any batch size (``input_shape[0]`` is dynamic) and a shape it cannot take fails on the first inference.
    """

    name = "torch"

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
