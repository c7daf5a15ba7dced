"""Exporters, each checked against torch before its artifact may ship, and the artifact manifest.

An exporter writes one artifact file and returns a :class:`Manifest`. Before returning, it runs the artifact
(here: through onnxruntime) and torch on the same fixed batch and compares them: maximum absolute error,
cosine similarity of the logits, and top-1 agreement. An artifact outside tolerance is deleted and
:class:`~edgeprune.errors.ExportError` raised: a wrong artifact never reaches a device.

ONNX uses torch's TorchScript exporter at opset 17 by default. torch 2.9+ deprecates it in favour of the
dynamo exporter, but that one cannot emit opsets below 18, and the runtimes on deployed edge devices cannot
read 18 (TensorRT 8.5 on JetPack 5 stops at 17). Its deprecation warnings are dropped for that call only; its other warnings go into the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .data import MEAN, SCALE, STD
from .errors import ExportError, UsageError
from .models import sha256_file

MANIFEST_VERSION = 1


@dataclass
class Tolerance:
    max_abs_err: float = 1e-3
    min_cosine: float = 0.9999
    min_top1_agreement: float = 1.0


@dataclass
class Verification:
    n: int
    max_abs_err: float
    cosine: float
    top1_agreement: float
    passed: bool


@dataclass
class Manifest:
    """What a device needs to run an artifact, and where it came from."""

    file: str
    sha256: str
    format: str
    precision: str
    input_name: str
    input_shape: List[int]          # the shape timed on the device; batch dim is dynamic when dynamic_batch
    input_dtype: str
    layout: str
    output_name: str
    dynamic_batch: bool
    preprocess: Dict[str, Any]
    model: str
    source_checkpoint_sha256: str
    pruning_plan_sha256: str
    verification: Verification
    exporter: Dict[str, Any] = field(default_factory=dict)
    quantization: Optional[Dict[str, Any]] = None
    version: int = MANIFEST_VERSION

    def write(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path


def default_preprocess() -> Dict[str, Any]:
    return {"scale": SCALE, "mean": list(MEAN), "std": list(STD), "input": "uint8 HWC RGB"}


def compare(reference: np.ndarray, candidate: np.ndarray, tol: Tolerance) -> Verification:
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    cand = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    if ref.shape != cand.shape:
        raise ExportError(f"artifact output shape {candidate.shape} differs from torch's {reference.shape}")
    err = float(np.max(np.abs(ref - cand))) if ref.size else 0.0
    cos = np.sum(ref * cand, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
    cosine = float(np.min(cos))
    agree = float(np.mean(ref.argmax(1) == cand.argmax(1)))
    ok = err <= tol.max_abs_err and cosine >= tol.min_cosine and agree >= tol.min_top1_agreement
    return Verification(n=int(ref.shape[0]), max_abs_err=err, cosine=cosine, top1_agreement=agree, passed=ok)


def export_onnx(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                source_checkpoint_sha256: str, pruning_plan_sha256: str,
                input_shape: Sequence[int] = (1, 3, 32, 32), opset: int = 17, dynamic_batch: bool = True,
                tolerance: Optional[Tolerance] = None) -> Manifest:
    """Export ``model`` to a single-file ONNX artifact at ``path`` and verify it with onnxruntime."""
    import onnxruntime as ort

    if not 13 <= opset <= 17:
        raise UsageError(f"opset: the TorchScript exporter used here supports 13..17, got {opset}")
    tol = tolerance or Tolerance()
    path = Path(path)
    model = model.eval().cpu()
    dummy = torch.zeros(*input_shape)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    tmp = path.with_name(path.name + ".tmp")
    try:
        # The TorchScript exporter warns that it is deprecated (see the module docstring) and about its own
        # internal passes; those warnings are recorded in the manifest rather than raised.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["logits"], dynamic_axes=axes, do_constant_folding=True)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: ONNX export failed: {type(e).__name__}: {e}") from e
    os.replace(tmp, path)
    export_warnings = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught
                              if not issubclass(w.category, DeprecationWarning)})

    with torch.no_grad():
        ref = model(check_inputs).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = check_inputs.numpy().astype(np.float32)
    out = (sess.run(None, {"input": x})[0] if dynamic_batch
           else np.concatenate([sess.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))]))
    ver = compare(ref, out, tol)
    if not ver.passed:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: ONNX artifact disagrees with torch (max abs err {ver.max_abs_err:.3g}, "
                          f"cosine {ver.cosine:.6f}, top-1 agreement {ver.top1_agreement:.3f}); not shipped")
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="onnx", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=dynamic_batch, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, exporter={"name": "torch.onnx (TorchScript)", "torch": torch.__version__,
                                    "opset": opset, "onnxruntime_check": ort.__version__,
                                    "warnings": export_warnings})


Exporter = Callable[..., Manifest]
EXPORTERS: Dict[str, Exporter] = {"onnx": export_onnx}


def get_exporter(fmt: str) -> Exporter:
    try:
        return EXPORTERS[fmt]
    except KeyError:
        raise UsageError(f"format: unknown export format {fmt!r}; known: {', '.join(sorted(EXPORTERS))}") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
