"""The ``tensorrt`` format: the verified ONNX, described for TensorRT; the engine is built on the device.

Consumed by: the agent's ``tensorrt`` runtime, which builds the engine from the ONNX on the device and caches it.
Toolchain here: the ``onnx`` format's (torch, onnx, onnxruntime); TensorRT itself is needed only on the device.
Verified here: the ONNX, with onnxruntime against torch, as for ``onnx``. No TensorRT engine is built or run here:
the agent's tensorrt runtime is written against the TensorRT 8.5+/10 documentation and has never run on a GPU in
this work; the engine is checked only by the accuracy the agent measures with it.

``tensorrt``: nothing is built on the host. The artifact is the verified ONNX; the manifest has ``format: "onnx"``
(the file), ``export_format: "tensorrt"``, ``target_runtime: "tensorrt"``, ``precision`` the engine's, and
``runtime_options`` the agent's tensorrt options for it (``precision``, ``sparsity``, int8: ``calibration_data``, an
npz of float32 ``inputs`` written beside the ONNX and listed in ``files``). The agent builds the engine on the device
from the ONNX and caches it under a key of the artifact's sha256, the TensorRT version, the GPU and the build flags.

Contract: :func:`export_tensorrt` writes the ONNX at ``path`` (and, for int8, its calibration npz) and returns the
manifest (not written), or deletes them and raises :class:`~edgeprune.errors.ExportError`.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, UsageError
from ..models import sha256_file
from .base import ExportFormat, Tolerance, as_numpy, delete_files, require_modules
from .manifest import Manifest
from .onnx import NEEDS_ONNX, export_onnx

# The agent's tensorrt runtime.options.precision values (agent.runtimes.tensorrt.TRT_PRECISIONS); fp16 first: the default.
TENSORRT_PRECISIONS = ("fp16", "fp32", "int8", "int8+fp16")


def export_tensorrt(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                    source_checkpoint_sha256: str, pruning_plan_sha256: str, precision: str = "fp16",
                    calib_inputs: Optional[torch.Tensor] = None, sparsity: bool = False,
                    input_shape: Sequence[int] = INPUT_SHAPE, opset: int = 17, dynamic_batch: bool = True,
                    tolerance: Optional[Tolerance] = None) -> Manifest:
    """The verified ONNX (:func:`export_onnx`), described for TensorRT; no engine is built here.

    The agent's tensorrt runtime builds the engine on the device from this ONNX, with the manifest's
    ``runtime_options`` (``precision``; ``sparsity``: 2:4 sparse kernels where the weights allow; int8:
    ``calibration_data``, the npz ``<stem>.calib.npz`` of float32 NCHW ``inputs`` written here from
    ``calib_inputs``), and caches it under a key of the artifact's sha256, the TensorRT version, the GPU and compute
    capability, the builder flags, the shape profile and the calibration data. ``verification`` is the ONNX's
    (onnxruntime, fp32); the engine is checked only by the accuracy the agent measures with it.
    """
    if precision not in TENSORRT_PRECISIONS:
        raise UsageError(f"precision: tensorrt export supports {', '.join(TENSORRT_PRECISIONS)}, got {precision!r}")
    int8 = precision.startswith("int8")
    if int8 and (calib_inputs is None or len(calib_inputs) == 0):
        raise UsageError(f"calib_inputs: tensorrt {precision} needs a calibration batch (NCHW, preprocessed): the "
                         "agent calibrates the int8 engine on it on the device")
    FORMATS["tensorrt"].check()
    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise UsageError(f"path: the tensorrt artifact is the ONNX the engine is built from (.onnx), got {path.name}")
    man = export_onnx(model, path, check_inputs=check_inputs, model_name=model_name,
                      source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
                      input_shape=input_shape, opset=opset, dynamic_batch=dynamic_batch, tolerance=tolerance)
    options: Dict[str, Any] = {"precision": precision}
    if sparsity:
        options["sparsity"] = True
    files = dict(man.files)
    quant = None
    if int8:
        assert calib_inputs is not None
        calib = path.with_name(path.stem + ".calib.npz")
        tmp = calib.with_name(calib.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, inputs=as_numpy(calib_inputs))
            os.replace(tmp, calib)
        except OSError as e:
            delete_files([tmp, path])
            raise ExportError(f"{calib}: cannot write the int8 calibration data: {e}") from e
        files[calib.name] = sha256_file(calib)
        options["calibration_data"] = calib.name
        quant = {"scheme": "TensorRT int8, entropy calibration (IInt8EntropyCalibrator2) on the device",
                 "calibration_n": int(len(calib_inputs)), "calibration_data": calib.name}
    man.export_format = "tensorrt"
    man.precision = precision
    man.target_runtime = "tensorrt"
    man.runtime_options = options
    man.files = files
    man.quantization = quant
    man.exporter["tensorrt"] = ("engine built by the agent on the device from this ONNX with runtime_options, cached "
                                "by artifact sha256, TensorRT version, GPU, builder flags, shape profile and "
                                "calibration data")
    man.warnings.append("no TensorRT engine is built on the host: verification is that of the fp32 ONNX with "
                        f"onnxruntime; the {precision} engine is checked only by the accuracy the agent measures")
    return man


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("tensorrt", "the verified ONNX for TensorRT; the engine is built and cached on the device",
                 (".trt.onnx", ".trt.calib.npz"), TENSORRT_PRECISIONS, "onnx", ("tensorrt",),
                 "onnxruntime CPU (the ONNX); the engine by the agent's accuracy on the device", export_tensorrt,
                 functools.partial(require_modules, "tensorrt", NEEDS_ONNX)),
)}
