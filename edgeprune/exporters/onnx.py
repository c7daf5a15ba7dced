"""The ``onnx`` format: a single-file ONNX model, opset 17, dynamic batch, NCHW, verified with onnxruntime.

Consumed by: the agent's ``onnxruntime`` runtime (and its ``openvino`` and ``tensorrt`` runtimes, which read ONNX
too). Toolchain here: torch's TorchScript ONNX exporter, ``onnx`` and ``onnxruntime`` (``pip install onnx
onnxruntime``). Verified here: every artifact is run by onnxruntime (CPU) against torch before it may ship
(ResNet-20 tests; ResNet-56 pruned 50 %, align 8, on 2,000 images: a slow test).

ONNX uses torch's TorchScript exporter at opset 17 by default. torch 2.9+ deprecates it in favour of the
dynamo exporter, but that one cannot emit opsets below 18, and the runtimes on deployed edge devices cannot
read 18 (TensorRT 8.5 on JetPack 5 stops at 17). Its deprecation warnings are dropped for that call only; its other
warnings go into the manifest.

Contract: :func:`export_onnx` writes ``path`` and returns its :class:`~edgeprune.exporters.manifest.Manifest`
(not written), or deletes it and raises :class:`~edgeprune.errors.ExportError`. :func:`run_onnx`,
:func:`run_on_host` and :func:`check_file` are what :mod:`edgeprune.exporters.artifacts` uses to run and check an
``onnx`` file; :data:`NEEDS_ONNX` is what the formats built on the ONNX (openvino, tensorrt) require too.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, UsageError
from ..models import sha256_file
from .base import (ExportFormat, Tolerance, as_numpy, batched, dist_version, output_names, require_modules,
                   torch_outputs, verify_or_delete, warning_lines)
from .manifest import Manifest, default_preprocess

NEEDS_ONNX = (("onnx", "onnx", "pip install onnx"), ("onnxruntime", "onnxruntime", "pip install onnxruntime"))

_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def export_onnx(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                source_checkpoint_sha256: str, pruning_plan_sha256: str,
                input_shape: Sequence[int] = INPUT_SHAPE, opset: int = 17, dynamic_batch: bool = True,
                tolerance: Optional[Tolerance] = None) -> Manifest:
    """Export ``model`` to a single-file ONNX artifact at ``path`` and verify it with onnxruntime."""
    if not 13 <= opset <= 17:
        raise UsageError(f"opset: the TorchScript exporter used here supports 13..17, got {opset}")
    FORMATS["onnx"].check()
    import onnxruntime as ort

    tol = tolerance or Tolerance()
    path = Path(path)
    model = model.eval().cpu()
    dummy = torch.zeros(*input_shape)
    names = output_names(model, dummy)
    axes = {n: {0: "batch"} for n in ["input", *names]} if dynamic_batch else None
    tmp = path.with_name(path.name + ".tmp")
    try:
        # The TorchScript exporter warns that it is deprecated (see the module docstring) and about its own
        # internal passes; those warnings are recorded in the manifest rather than raised.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=names, dynamic_axes=axes, do_constant_folding=True)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: ONNX export failed: {type(e).__name__}: {e}") from e
    os.replace(tmp, path)
    export_warnings = warning_lines([w for w in caught if not issubclass(w.category, DeprecationWarning)])

    try:
        out, checked_with = run_onnx(path, as_numpy(check_inputs))
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: onnxruntime cannot run the ONNX just written: {type(e).__name__}: {e}") from e
    ver = verify_or_delete(path, torch_outputs(model, check_inputs), out, tol, "ONNX", checked_with=checked_with)
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="onnx", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=dynamic_batch, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, export_format="onnx",
        exporter={"name": "torch.onnx (TorchScript)", "torch": torch.__version__, "opset": opset,
                  "onnxruntime_check": ort.__version__, "edgeprune": dist_version("edgeprune"),
                  "warnings": export_warnings})


def run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> Tuple[List[np.ndarray], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    out = batched(lambda xb: list(sess.run(None, {inp.name: xb})), x, batch)
    return out, f"onnxruntime {ort.__version__} CPUExecutionProvider"


def run_on_host(path: Path, x: np.ndarray, threads: int = 1,
                manifest: Optional[Manifest] = None) -> List[np.ndarray]:
    """Every output of the ONNX at ``path`` on the NCHW batch ``x`` (onnxruntime, CPU)."""
    return run_onnx(path, x, threads)[0]


def check_file(path: Path, manifest: Manifest, where: str, head: bytes) -> None:
    """UsageError unless ``path`` parses as a valid ONNX with the manifest's input (name, shape, dtype)."""
    _check_onnx(path, manifest, where)


def _check_onnx(path: Path, manifest: "Manifest", where: str) -> None:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(str(path))       # by path: external data (a model > 2 GB) is found beside it
    except Exception as e:  # protobuf's DecodeError, onnx's ValidationError, ...: the file is not a usable ONNX
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise UsageError(f"{where}: format: not a valid ONNX model (truncated or another kind of file?): "
                         f"{reason}") from None
    if not model.graph.node:
        raise UsageError(f"{where}: format: not a valid ONNX model (its graph has no nodes; truncated or another "
                         "kind of file?)")
    inits = {i.name for i in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in inits}
    if manifest.input_name not in inputs:
        raise UsageError(f"{where}: input_name: the model has no input {manifest.input_name!r} (its inputs: "
                         f"{', '.join(inputs) or 'none'})")
    t = inputs[manifest.input_name].type.tensor_type
    dims: List[Union[int, str]] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                   for d in t.shape.dim]
    want = list(manifest.input_shape)
    fits = len(dims) == len(want) and all(not isinstance(d, int) or d == w or (i == 0 and manifest.dynamic_batch)
                                          for i, (d, w) in enumerate(zip(dims, want)))
    if not fits:
        raise UsageError(f"{where}: input_shape: the manifest says {want} but the model's input "
                         f"{manifest.input_name!r} is {dims}")
    dtype = _ONNX_DTYPES.get(t.elem_type)
    if dtype is not None and manifest.format == "onnx" and manifest.precision != "int8" \
            and dtype != manifest.input_dtype:
        raise UsageError(f"{where}: input_dtype: the manifest says {manifest.input_dtype} but the model's input "
                         f"{manifest.input_name!r} is {dtype}")


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", "ONNX (opset 17, TorchScript exporter), dynamic batch, NCHW", (".onnx",), ("fp32",),
                 "onnx", ("onnxruntime", "openvino", "tensorrt"), "onnxruntime CPU", export_onnx,
                 functools.partial(require_modules, "onnx", NEEDS_ONNX)),
)}
