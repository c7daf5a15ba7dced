"""What every exporter shares: the tolerance an artifact is held to, the comparison with torch, the
delete-on-failure rule, and :class:`ExportFormat`, the description of one format in the registry.

Contract: an exporter calls :func:`verify_or_delete` with torch's outputs (:func:`torch_outputs`) and the
artifact's on the same fixed batch; outside its :class:`Tolerance` every file of the artifact is deleted and
:class:`~edgeprune.errors.ExportError` raised, so a wrong artifact never reaches a device. A format's
``requires`` (usually :func:`require_modules`) raises :class:`~edgeprune.errors.ToolchainError` naming what to
install. The helpers here (:func:`as_numpy`, :func:`batched`, :func:`file_digests`, :func:`warning_lines`,
:func:`dist_version`, :func:`delete_files`) are the exporters' common plumbing. Nothing here imports a toolchain
(onnx, openvino, litert): each format module imports its own, inside the functions that need it.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from ..errors import ExportError, ToolchainError
from ..models import sha256_file
from ..sources import flatten_outputs
from .manifest import Manifest, Verification

@dataclass
class Tolerance:
    max_abs_err: float = 1e-3
    min_cosine: float = 0.9999
    min_top1_agreement: float = 1.0

    def to_dict(self) -> Dict[str, Optional[float]]:
        """JSON-safe: an unbounded limit (inf) is null."""
        return {k: (None if np.isinf(v) else float(v)) for k, v in asdict(self).items()}


# FP16 weights (openvino-fp16, tflite-fp16), checked with f32 arithmetic: the only error is each weight rounded to
# the nearest float16 (relative error <= 2^-11 ~ 4.9e-4), which adds up through the layers. Measured on the check
# batch: ResNet-20 max abs err 1.2e-2 (OpenVINO and LiteRT alike) on logits up to ~31, 1 - cosine 1.9e-6;
# ResNet-56 1.9e-2 and 1.8e-6. The bounds leave ~5x (abs) and ~50x (1 - cosine) headroom over ResNet-56 for deeper,
# pruned or fine-tuned networks, and still catch a real defect (a wrong layout, a lost bias, an fp16 overflow: errors
# of order 1 and a cosine far below 0.9999). Top-1 agreement on the check batch stays required, as for fp32.
FP16_TOLERANCE = Tolerance(max_abs_err=0.1, min_cosine=0.9999, min_top1_agreement=1.0)


Outputs = Union[np.ndarray, Sequence[np.ndarray]]


def _as_list(x: Outputs) -> List[np.ndarray]:
    return [x] if isinstance(x, np.ndarray) else list(x)


def compare(reference: Outputs, candidate: Outputs, tol: Tolerance) -> Verification:
    """Every output of the artifact against torch's (one array, or a list in the model's output order): the
    largest absolute error and the lowest per-sample cosine over all outputs; top-1 agreement over the first
    output and every other logit-like (N x classes) output, the lowest of them."""
    refs, cands = _as_list(reference), _as_list(candidate)
    if len(refs) != len(cands):
        raise ExportError(f"artifact has {len(cands)} outputs, torch's model {len(refs)}")
    err, cosine, agree = 0.0, 1.0, 1.0
    for i, (r, c) in enumerate(zip(refs, cands)):
        ref = r.reshape(r.shape[0], -1).astype(np.float64)
        cand = c.reshape(c.shape[0], -1).astype(np.float64)
        if ref.shape != cand.shape:
            which = f" {i}" if len(refs) > 1 else ""
            raise ExportError(f"artifact output{which} shape {c.shape} differs from torch's {r.shape}")
        err = max(err, float(np.max(np.abs(ref - cand))) if ref.size else 0.0)
        cos = np.sum(ref * cand, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-30)
        cosine = min(cosine, float(np.min(cos)) if cos.size else 1.0)
        if i == 0 or (r.ndim == 2 and r.shape[1] >= 2):
            agree = min(agree, float(np.mean(ref.argmax(1) == cand.argmax(1))) if ref.size else 1.0)
    ref = refs[0].reshape(refs[0].shape[0], -1)
    ok = err <= tol.max_abs_err and cosine >= tol.min_cosine and agree >= tol.min_top1_agreement
    return Verification(n=int(ref.shape[0]), max_abs_err=err, cosine=cosine, top1_agreement=agree, passed=ok,
                        tolerance=tol.to_dict())


def verify_or_delete(path: Union[Path, Sequence[Path]], reference: Outputs, candidate: Outputs,
                     tol: Tolerance, what: str, *, checked_with: str = "") -> Verification:
    """Compare an artifact's outputs with torch's; outside tolerance every file of the artifact (``path``: one file
    or all of them, the primary first) is deleted, never shipped, and ExportError raised."""
    paths = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    try:
        ver = compare(reference, candidate, tol)
    except ExportError as e:
        delete_files(paths)
        raise ExportError(f"{paths[0]}: {what} {e}; not shipped: deleted") from None
    ver.checked_with = checked_with
    if not ver.passed:
        delete_files(paths)
        extra = f" (and {', '.join(p.name for p in paths[1:])})" if len(paths) > 1 else ""
        raise ExportError(f"{paths[0]}: {what} artifact disagrees with torch (max abs err {ver.max_abs_err:.3g}, "
                          f"cosine {ver.cosine:.6f}, top-1 agreement {ver.top1_agreement:.3f}; tolerance "
                          f"{_tol_text(tol)}); not shipped: deleted{extra}")
    return ver


def _tol_text(tol: Tolerance) -> str:
    return (f"max abs err <= {tol.max_abs_err:g}, cosine >= {tol.min_cosine:g}, "
            f"top-1 agreement >= {tol.min_top1_agreement:g}")


def delete_files(paths: Sequence[Path]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def file_digests(*paths: Path) -> Dict[str, str]:
    return {p.name: sha256_file(p) for p in paths}


def warning_lines(caught: Sequence[warnings.WarningMessage]) -> List[str]:
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})


def dist_version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def batched(run: Callable[[np.ndarray], Any], x: np.ndarray, batch: Optional[int],
             chunk: int = 256) -> Any:
    """``x`` through ``run``: in the artifact's fixed batch (the last one zero-padded, its padding dropped), or in
    chunks of ``chunk`` when the batch is dynamic. ``run`` returns one array, or a list (every output): the result
    is the same kind."""
    step = batch or chunk
    outs: List[List[np.ndarray]] = []
    single = True
    for i in range(0, len(x), step):
        xb = x[i:i + step]
        n = len(xb)
        if batch and n < batch:
            xb = np.concatenate([xb, np.zeros((batch - n,) + xb.shape[1:], xb.dtype)])
        got = run(np.ascontiguousarray(xb))
        single = not isinstance(got, (list, tuple))
        outs.append([np.asarray(o)[:n] for o in ([got] if single else got)])
    joined = [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]
    return joined[0] if single else joined


def torch_outputs(model: nn.Module, x: torch.Tensor) -> List[np.ndarray]:
    """torch's outputs on ``x``, every one, in the order the ONNX exporter emits them."""
    with torch.no_grad():
        return [t.detach().cpu().numpy() for t in flatten_outputs(model(x))]


def output_names(model: nn.Module, dummy: torch.Tensor) -> List[str]:
    """ONNX output names: ``logits`` for the first output (every single-output model), ``output_<i>`` after it."""
    with torch.no_grad():
        n = len(flatten_outputs(model(dummy)))
    if n == 0:
        raise ExportError(f"{type(model).__name__}: forward returned no tensor")
    return ["logits"] + [f"output_{i}" for i in range(1, n)]


Exporter = Callable[..., Manifest]


def require_modules(fmt: str, needs: Sequence[Tuple[str, str, str]], opts: Optional[Dict[str, Any]] = None) -> None:
    """ToolchainError for the first of ``needs`` (module, distribution, install hint) that cannot be imported.
    ``opts`` (the export options) is unused: every ``requires`` takes it."""
    for module, dist, install in needs:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as e:  # not installed, or a shared library of it missing
            raise ToolchainError(f"{fmt} export needs {dist}: {install} "
                                 f"(import {module}: {type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class ExportFormat:
    """One export format: what it writes, what checks it here, and what it needs.

    ``suffixes``: the endings of the files it writes, the primary first, the others when written (:func:`export`
    names them ``<tag><suffix>``: distinct per format, so that all formats of one tag can share a folder).
    ``precisions``: what it can produce, the default first (a ``precision`` option must be one of them).
    ``manifest_format``: ``Manifest.format``, the file format the agent loads. ``runtimes``: the agent runtimes that
    run it (with the manifest's ``runtime_options``). ``checked_with``: what runs it here before it may ship.
    ``requires(opts)``: raises :class:`ToolchainError` naming what to install when the toolchain is missing (``opts``:
    the export options; edgetpu's ``compiler``). ``calibration``: needs ``calib_inputs``.
    """

    name: str
    description: str
    suffixes: Tuple[str, ...]
    precisions: Tuple[str, ...]
    manifest_format: str
    runtimes: Tuple[str, ...]
    checked_with: str
    export: Exporter
    requires: Callable[[Dict[str, Any]], None]
    calibration: bool = False

    def check(self, opts: Optional[Dict[str, Any]] = None) -> None:
        """ToolchainError unless this format's toolchain is here (``opts``: the export options)."""
        self.requires(opts or {})

    def available(self) -> Optional[str]:
        """None when this format can be exported here, else why not."""
        try:
            self.check()
        except ToolchainError as e:
            return str(e)
        return None
