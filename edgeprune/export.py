"""Exporters, each checked against torch before its artifact may ship, and the artifact manifest.

An exporter writes one artifact file and returns a :class:`Manifest`. Before returning, it runs the artifact
(here: through onnxruntime) and torch on the same fixed batch and compares them: maximum absolute error,
cosine similarity of the logits, and top-1 agreement. An artifact outside tolerance is deleted and
:class:`~edgeprune.errors.ExportError` raised: a wrong artifact never reaches a device.

Formats (:data:`EXPORTERS`): ``onnx`` (checked with onnxruntime), ``torchscript`` (checked by loading it back
into torch), ``tflite`` (through litert-torch, NHWC input, fp32 or full-integer int8; checked with LiteRT's
interpreter ``ai_edge_litert``).

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
    ver = verify_or_delete(path, ref, out, tol, "ONNX")
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="onnx", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=dynamic_batch, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, exporter={"name": "torch.onnx (TorchScript)", "torch": torch.__version__,
                                    "opset": opset, "onnxruntime_check": ort.__version__,
                                    "warnings": export_warnings})


def _warning_lines(caught: Sequence[warnings.WarningMessage]) -> List[str]:
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})


def export_torchscript(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                       source_checkpoint_sha256: str, pruning_plan_sha256: str,
                       input_shape: Sequence[int] = (1, 3, 32, 32),
                       tolerance: Optional[Tolerance] = None) -> Manifest:
    """Trace ``model`` to a TorchScript artifact (the ``torch`` runtime's format) and verify it by loading it
    back and running the fixed batch. The trace records ``x.size(0)``, so the artifact takes any batch size.

    torch 2.9+ deprecates TorchScript (``torch.jit.trace/save/load`` warn); it is still what torch on the devices
    loads, so those warnings go into the manifest rather than being raised.
    """
    tol = tolerance or Tolerance()
    path = Path(path)
    model = model.eval().cpu()
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                traced = torch.jit.trace(model, torch.zeros(*input_shape))
            torch.jit.save(traced, str(tmp))
            loaded = torch.jit.load(str(tmp), map_location="cpu")
            with torch.no_grad():
                out = loaded(check_inputs).numpy()
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: TorchScript export failed: {type(e).__name__}: {e}") from e
    os.replace(tmp, path)
    with torch.no_grad():
        ref = model(check_inputs).numpy()
    ver = verify_or_delete(path, ref, out, tol, "TorchScript")
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="torchscript", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=True, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, exporter={"name": "torch.jit.trace", "torch": torch.__version__,
                                    "check": "torch.jit.load, CPU", "warnings": _warning_lines(caught)})


TFLITE_INT8_TOLERANCE = Tolerance(max_abs_err=float("inf"), min_cosine=0.98, min_top1_agreement=0.9)


def export_tflite(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                  source_checkpoint_sha256: str, pruning_plan_sha256: str, precision: str = "fp32",
                  calib_inputs: Optional[torch.Tensor] = None, input_shape: Sequence[int] = (1, 3, 32, 32),
                  tolerance: Optional[Tolerance] = None) -> Manifest:
    """Convert ``model`` to a TFLite artifact with litert-torch and verify it with LiteRT's interpreter.

    The model is wrapped with ``litert_torch.to_channel_last_io`` so the artifact takes NHWC input (TFLite's own
    layout: no transpose in front of the first convolution); the manifest records the layout read back from the
    artifact. ``input_shape`` is NCHW as for the other exporters; its batch is fixed in the artifact (litert-torch
    cannot lower a dynamic batch through ``adaptive_avg_pool2d``). ``check_inputs`` and ``calib_inputs`` are NCHW
    batches, preprocessed like the training data.

    ``precision="int8"``: full-integer post-training quantization through PT2E (``torch.export`` ->
    ``prepare_pt2e`` with litert-torch's ``PT2EQuantizer``, symmetric, per-channel weights -> calibration on
    ``calib_inputs`` -> ``convert_pt2e`` -> ``litert_torch.convert`` with that quantizer). The artifact's input
    and output are int8; the manifest's ``quantization`` holds their scale and zero point, and its
    ``input_dtype`` stays "float32": the agent feeds float inputs and quantizes them with the model's own
    parameters. Tolerance for int8 defaults to :data:`TFLITE_INT8_TOLERANCE` (top-1 agreement >= 0.9 and cosine
    >= 0.98 with torch on the fixed batch).
    """
    import litert_torch
    from ai_edge_litert.interpreter import Interpreter

    if precision not in ("fp32", "int8"):
        raise UsageError(f"precision: tflite export supports fp32 and int8, got {precision!r}")
    if precision == "int8" and (calib_inputs is None or len(calib_inputs) == 0):
        raise UsageError("calib_inputs: int8 tflite export needs a calibration batch (NCHW, preprocessed)")
    tol = tolerance or (TFLITE_INT8_TOLERANCE if precision == "int8" else Tolerance())
    path = Path(path)
    model = model.eval().cpu()
    batch = int(input_shape[0])
    nhwc = [batch, int(input_shape[2]), int(input_shape[3]), int(input_shape[1])]
    sample = torch.zeros(*nhwc)
    wrapped = litert_torch.to_channel_last_io(model, args=[0]).eval()
    tmp = path.with_name(path.name + ".tmp")
    quant: Optional[Dict[str, Any]] = None
    shown = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"  # litert-torch prints a progress tree to stdout otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if precision == "fp32":
                edge = litert_torch.convert(wrapped, (sample,))
            else:
                assert calib_inputs is not None
                edge, n_calib = _tflite_int8(litert_torch, wrapped, sample, calib_inputs.permute(0, 2, 3, 1), batch)
                quant = {"scheme": "PT2E static int8: litert_torch PT2EQuantizer, symmetric, per-channel weights, "
                                   "per-tensor activations", "calibration_n": n_calib}
            edge.export(str(tmp))
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: TFLite export failed: {type(e).__name__}: {e}") from e
    finally:
        if shown is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = shown
    os.replace(tmp, path)

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0], interp.get_output_details()[0]
    shape = [int(d) for d in inp["shape"]]
    layout = "NHWC" if shape == nhwc else "NCHW" if shape == [batch] + [int(d) for d in input_shape[1:]] else None
    if layout is None:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: TFLite input shape {shape} is neither NHWC {nhwc} nor NCHW {list(input_shape)}")
    x = (check_inputs.permute(0, 2, 3, 1) if layout == "NHWC" else check_inputs).numpy().astype(np.float32)
    in_q, out_q = _tflite_qparams(inp), _tflite_qparams(outp)
    outs = []
    for i in range(0, len(x) - len(x) % batch, batch):
        xb = x[i:i + batch]
        if in_q is not None:
            info = np.iinfo(inp["dtype"])
            v = xb / np.float32(in_q[0])
            xb = np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)) + in_q[1], info.min, info.max)
        interp.set_tensor(inp["index"], xb.astype(inp["dtype"]))
        interp.invoke()
        o = interp.get_tensor(outp["index"])
        outs.append((o.astype(np.float32) - out_q[1]) * np.float32(out_q[0]) if out_q is not None else o)
    if not outs:
        path.unlink(missing_ok=True)
        raise UsageError(f"check_inputs: needs at least one batch of {batch} for the fixed-batch TFLite artifact")
    with torch.no_grad():
        ref = model(check_inputs[:len(outs) * batch]).numpy()
    ver = verify_or_delete(path, ref, np.concatenate(outs), tol, f"TFLite {precision}")
    if quant is not None:
        quant["input"] = {"dtype": np.dtype(inp["dtype"]).name, "scale": in_q[0] if in_q else None,
                          "zero_point": in_q[1] if in_q else None}
        quant["output"] = {"dtype": np.dtype(outp["dtype"]).name, "scale": out_q[0] if out_q else None,
                           "zero_point": out_q[1] if out_q else None}
    from importlib import metadata
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="tflite", precision=precision,
        input_name=str(inp["name"]), input_shape=shape, input_dtype="float32", layout=layout,
        output_name=str(outp["name"]), dynamic_batch=False, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, quantization=quant,
        exporter={"name": "litert_torch.convert", "litert_torch": metadata.version("litert-torch"),
                  "torch": torch.__version__, "check": f"ai_edge_litert {metadata.version('ai-edge-litert')}",
                  "warnings": _warning_lines([w for w in caught if not issubclass(w.category, DeprecationWarning)])})


def _tflite_int8(litert_torch: Any, wrapped: nn.Module, sample: torch.Tensor, calib_nhwc: torch.Tensor,
                 batch: int) -> "tuple[Any, int]":
    """PT2E static int8: export, observe the calibration batches (in chunks of the fixed batch), convert."""
    from litert_torch.quantize import pt2e_quantizer, quant_config
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(wrapped, (sample,)).module()
    prepared = move_exported_model_to_eval(quantize_pt2e.prepare_pt2e(graph, quantizer))
    n = len(calib_nhwc) - len(calib_nhwc) % batch
    if n == 0:
        raise UsageError(f"calib_inputs: needs at least one batch of {batch}")
    with torch.no_grad():
        for i in range(0, n, batch):
            prepared(calib_nhwc[i:i + batch].contiguous())
    converted = quantize_pt2e.convert_pt2e(prepared, fold_quantize=False)
    for module in converted.modules():
        # the graph was exported from an eval model (batch norm captured with training=False); exported modules
        # refuse .eval(), so set the flag .eval() would set, which litert-torch checks before converting
        module.training = False
    cfg = quant_config.QuantConfig(pt2e_quantizer=quantizer)
    return litert_torch.convert(converted, (sample,), quant_config=cfg), n


def _tflite_qparams(detail: Dict[str, Any]) -> "Optional[tuple[float, int]]":
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    scale, zero = detail["quantization"]
    return (float(scale), int(zero)) if scale else None


def verify_or_delete(path: Path, reference: np.ndarray, candidate: np.ndarray, tol: Tolerance,
                     what: str) -> Verification:
    """Compare an artifact's outputs with torch's; outside tolerance the artifact is deleted, never shipped."""
    ver = compare(reference, candidate, tol)
    if not ver.passed:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: {what} artifact disagrees with torch (max abs err {ver.max_abs_err:.3g}, "
                          f"cosine {ver.cosine:.6f}, top-1 agreement {ver.top1_agreement:.3f}); not shipped")
    return ver


Exporter = Callable[..., Manifest]
EXPORTERS: Dict[str, Exporter] = {"onnx": export_onnx, "torchscript": export_torchscript, "tflite": export_tflite}


def get_exporter(fmt: str) -> Exporter:
    try:
        return EXPORTERS[fmt]
    except KeyError:
        raise UsageError(f"format: unknown export format {fmt!r}; known: {', '.join(sorted(EXPORTERS))}") from None


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
