"""The ``tflite``, ``tflite-fp16`` and ``tflite-int8`` formats: TFLite FlatBuffers from litert-torch, NHWC input,
fixed batch, verified with LiteRT's interpreter.

Consumed by: the agent's ``tflite`` runtime (``ai_edge_litert`` or ``tflite_runtime``, XNNPACK; int8 inputs
quantized with the model's own scale and zero point). Toolchain here: ``litert-torch`` and ``ai-edge-litert``;
``tflite-fp16`` also ``ai-edge-quantizer``, ``tflite-int8`` also ``torchao`` (all in edgeprune's default
install on Linux and arm64 macOS). Verified here: every artifact is run by the LiteRT interpreter (XNNPACK, CPU) against
torch before it may ship (ResNet-20 tests; ResNet-56 pruned 50 %, align 8, on 2,000 images: a slow test); GPU
delegates are not run here.

``tflite``: fp32. ``tflite-int8``: full-integer post-training quantization through PT2E, calibrated on
``calib_inputs``, int8 input and output (see :func:`export_tflite`).
``tflite-fp16``: litert-torch 0.10 has no float16 option of its own (its ``quant_config`` takes a PT2E int8
quantizer or a generative-API recipe, and ``_litert_converter_flags`` reach only the experimental V2 converter);
TensorFlow's ``target_spec.supported_types = [tf.float16]`` would need TensorFlow. The fp32 model is therefore
converted by litert-torch and then rewritten by ai-edge-quantizer (installed with litert-torch) with its
``float_casting`` weight-only recipe: the weights of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED (and transposed
convolutions, embedding lookups) are stored as float16 behind DEQUANTIZE ops, activations and arithmetic stay
float32 (the same layout TensorFlow's float16 post-training quantization produces; GPU delegates may run it in fp16).

Contract: :func:`export_tflite` writes ``path`` and returns its manifest (not written), or deletes it and raises
:class:`~edgeprune.errors.ExportError`. :class:`TfliteRunner`, :func:`run_on_host` and :func:`check_file` are what
:mod:`edgeprune.exporters.artifacts` uses to run and check a ``tflite`` file; :data:`NEEDS_TFLITE_INT8` is what
the ``edgetpu`` format, built on the int8 model, requires too.
"""
from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, UsageError
from ..models import sha256_file
from .base import (FP16_TOLERANCE, ExportFormat, Tolerance, as_numpy, batched, dist_version, require_modules,
                   torch_outputs, verify_or_delete, warning_lines)
from .manifest import Manifest, default_preprocess

PIP_TFLITE = ("pip install litert-torch==0.10.0 ai-edge-litert==2.3.0 ai-edge-quantizer==0.10.0 (part of "
              "edgeprune's default install on Linux and arm64 macOS)")
NEEDS_TFLITE = (("litert_torch", "litert-torch", PIP_TFLITE),
                ("ai_edge_litert.interpreter", "ai-edge-litert", PIP_TFLITE))
NEEDS_TFLITE_FP16 = NEEDS_TFLITE + (("ai_edge_quantizer", "ai-edge-quantizer", PIP_TFLITE),)
NEEDS_TFLITE_INT8 = NEEDS_TFLITE + (("torchao.quantization.pt2e", "torchao", PIP_TFLITE),)

# int8: outputs differ from torch by quantization steps, so max abs err is no criterion; top-1 and cosine are.
TFLITE_INT8_TOLERANCE = Tolerance(max_abs_err=float("inf"), min_cosine=0.98, min_top1_agreement=0.9)

TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
_TFLITE_FORMATS = {"fp32": "tflite", "fp16": "tflite-fp16", "int8": "tflite-int8"}


class TfliteRunner:
    """One LiteRT interpreter; float inputs to an int8 model are quantized with its own scale and zero point (round
    half away from zero, as the agent does), int8 outputs dequantized."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.interp = Interpreter(model_path=str(path), num_threads=threads)
        self.interp.allocate_tensors()
        self.inp = self.interp.get_input_details()[0]
        self.outs = tflite_output_order(self.interp.get_output_details())
        self.outp = self.outs[0]
        self.shape = [int(d) for d in self.inp["shape"]]
        self.in_q, self.out_q = _tflite_qparams(self.inp), _tflite_qparams(self.outp)
        self.out_qs = [_tflite_qparams(d) for d in self.outs]
        self.checked_with = f"ai_edge_litert {dist_version('ai-edge-litert')} interpreter (XNNPACK)"

    def layout_for(self, nchw: Sequence[int]) -> Optional[str]:
        """NHWC or NCHW: which the model's input is, for NCHW inputs of shape ``nchw`` (batch ignored)."""
        n, c, h, w = (int(d) for d in nchw)
        if self.shape[1:] == [h, w, c]:
            return "NHWC"
        if self.shape[1:] == [c, h, w]:
            return "NCHW"
        return None

    def run(self, x: np.ndarray) -> List[np.ndarray]:
        return batched(self._one, x, self.shape[0])

    def _one(self, xb: np.ndarray) -> List[np.ndarray]:
        inp = self.inp
        if self.in_q is not None:
            info = np.iinfo(inp["dtype"])
            v = xb / np.float32(self.in_q[0])
            xb = np.clip(np.trunc(v + np.copysign(np.float32(0.5), v)) + self.in_q[1], info.min, info.max)
        self.interp.set_tensor(inp["index"], xb.astype(inp["dtype"]))
        self.interp.invoke()
        got = []
        for detail, q in zip(self.outs, self.out_qs):
            o = self.interp.get_tensor(detail["index"])
            got.append((o.astype(np.float32) - q[1]) * np.float32(q[0]) if q is not None
                       else np.asarray(o, dtype=np.float32))
        return got


def tflite_output_order(details: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """LiteRT output details in the torch model's output order: litert-torch names them ``..._output_<i>_...``
    (``serving_default_output_1_output``); when every name carries such an index, by it, else as listed."""
    idx = [re.search(r"output_(\d+)", str(d.get("name", ""))) for d in details]
    if details and all(idx) and len({int(m.group(1)) for m in idx if m}) == len(details):
        return [d for _, d in sorted(zip([int(m.group(1)) for m in idx if m], details), key=lambda t: t[0])]
    return list(details)



def export_tflite(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                  source_checkpoint_sha256: str, pruning_plan_sha256: str, precision: str = "fp32",
                  calib_inputs: Optional[torch.Tensor] = None, input_shape: Sequence[int] = INPUT_SHAPE,
                  tolerance: Optional[Tolerance] = None) -> Manifest:
    """Convert ``model`` to a TFLite artifact with litert-torch and verify it with LiteRT's interpreter.

    The model is wrapped with ``litert_torch.to_channel_last_io`` so the artifact takes NHWC input (TFLite's own
    layout: no transpose in front of the first convolution); the manifest records the layout read back from the
    artifact. ``input_shape`` is NCHW as for the other exporters; its batch is fixed in the artifact (litert-torch
    cannot lower a dynamic batch through ``adaptive_avg_pool2d``). ``check_inputs`` and ``calib_inputs`` are NCHW
    batches, preprocessed like the training data.

    ``precision="fp16"``: the fp32 conversion rewritten by ai-edge-quantizer's ``float_casting`` weight-only recipe
    (fp16 weights behind DEQUANTIZE ops, fp32 activations; see the module docstring), checked against
    :data:`FP16_TOLERANCE`.

    ``precision="int8"``: full-integer post-training quantization through PT2E (``torch.export`` ->
    ``prepare_pt2e`` with litert-torch's ``PT2EQuantizer``, symmetric, per-channel weights -> calibration on
    ``calib_inputs`` -> ``convert_pt2e`` -> ``litert_torch.convert`` with that quantizer). The artifact's input
    and output are int8; the manifest's ``quantization`` holds their scale and zero point, and its
    ``input_dtype`` stays "float32": the agent feeds float inputs and quantizes them with the model's own
    parameters. Tolerance for int8 defaults to :data:`TFLITE_INT8_TOLERANCE` (top-1 agreement >= 0.9 and cosine
    >= 0.98 with torch on the fixed batch).
    """
    if precision not in TFLITE_PRECISIONS:
        raise UsageError(f"precision: tflite export supports fp32, fp16 and int8, got {precision!r}")
    if precision == "int8" and (calib_inputs is None or len(calib_inputs) == 0):
        raise UsageError("calib_inputs: int8 tflite export needs a calibration batch (NCHW, preprocessed)")
    fmt = _TFLITE_FORMATS[precision]
    FORMATS[fmt].check()
    import litert_torch

    tol = tolerance or {"int8": TFLITE_INT8_TOLERANCE, "fp16": FP16_TOLERANCE}.get(precision, Tolerance())
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
            if precision == "int8":
                assert calib_inputs is not None
                edge, n_calib = _tflite_int8(litert_torch, wrapped, sample, calib_inputs.permute(0, 2, 3, 1), batch)
                quant = {"scheme": "PT2E static int8: litert_torch PT2EQuantizer, symmetric, per-channel weights, "
                                   "per-tensor activations", "calibration_n": n_calib}
            else:
                edge = litert_torch.convert(wrapped, (sample,))
            edge.export(str(tmp))
            if precision == "fp16":
                tmp.write_bytes(_tflite_fp16(tmp.read_bytes()))
                quant = {"scheme": "fp16 weights: ai-edge-quantizer float_casting, weight-only (CONV_2D, "
                                   "DEPTHWISE_CONV_2D, FULLY_CONNECTED, ...), DEQUANTIZE to fp32 at load; fp32 "
                                   "activations", "weights": "float16", "activations": "float32",
                         "ai_edge_quantizer": dist_version("ai-edge-quantizer")}
    except UsageError:
        tmp.unlink(missing_ok=True)
        raise
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"{path}: TFLite {precision} export failed: {type(e).__name__}: {e}") from e
    finally:
        if shown is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = shown
    os.replace(tmp, path)

    try:
        rt = TfliteRunner(path)
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: LiteRT cannot load the TFLite model just written: {type(e).__name__}: {e}") \
            from e
    inp, outp = rt.inp, rt.outp
    shape = rt.shape
    layout = "NHWC" if shape == nhwc else "NCHW" if shape == [batch] + [int(d) for d in input_shape[1:]] else None
    if layout is None:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: TFLite input shape {shape} is neither NHWC {nhwc} nor NCHW {list(input_shape)}")
    x = as_numpy(check_inputs.permute(0, 2, 3, 1) if layout == "NHWC" else check_inputs)
    out = rt.run(x)
    ver = verify_or_delete(path, torch_outputs(model, check_inputs), out, tol, f"TFLite {precision}",
                           checked_with=rt.checked_with)
    if precision == "int8":
        assert quant is not None
        in_q, out_q = rt.in_q, rt.out_q
        quant["input"] = {"dtype": np.dtype(inp["dtype"]).name, "scale": in_q[0] if in_q else None,
                          "zero_point": in_q[1] if in_q else None}
        quant["output"] = {"dtype": np.dtype(outp["dtype"]).name, "scale": out_q[0] if out_q else None,
                           "zero_point": out_q[1] if out_q else None}
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="tflite", export_format=fmt, precision=precision,
        input_name=str(inp["name"]), input_shape=shape, input_dtype="float32", layout=layout,
        output_name=str(outp["name"]), dynamic_batch=False, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, quantization=quant,
        exporter={"name": "litert_torch.convert", "litert_torch": dist_version("litert-torch"),
                  "torch": torch.__version__, "check": f"ai_edge_litert {dist_version('ai-edge-litert')}",
                  "edgeprune": dist_version("edgeprune"),
                  "warnings": warning_lines([w for w in caught if not issubclass(w.category, DeprecationWarning)])})


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


def _tflite_fp16(fp32_model: bytes) -> bytes:
    """The fp32 TFLite model with fp16 weights: ai-edge-quantizer's float_casting weight-only recipe."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    q = quantizer.Quantizer(bytearray(fp32_model))
    q.add_weight_only_config(regex=".*", operation_name=qtyping.TFLOperationName.ALL_SUPPORTED, num_bits=16,
                             algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING)
    result = q.quantize(enable_progress_report=False)
    if result.quantized_model is None:
        raise ExportError("ai-edge-quantizer returned no model for the fp16 recipe")
    return bytes(result.quantized_model)


def _tflite_qparams(detail: Dict[str, Any]) -> "Optional[tuple[float, int]]":
    if np.dtype(detail["dtype"]).kind not in "iu":
        return None
    scale, zero = detail["quantization"]
    return (float(scale), int(zero)) if scale else None


def run_on_host(path: Path, x: np.ndarray, threads: int = 1,
                manifest: Optional[Manifest] = None) -> List[np.ndarray]:
    """Every output of the TFLite model at ``path`` on the NCHW batch ``x``: transposed to NHWC when the model's
    input is (the manifest's ``layout``, else read from the model), quantized for an int8 model."""
    rt = TfliteRunner(path, threads)
    layout = manifest.layout if manifest is not None else rt.layout_for(x.shape)
    if layout is None:
        raise UsageError(f"inputs: shape {tuple(x.shape)} fits neither NHWC nor NCHW for the model input "
                         f"{rt.shape} of {path.name}")
    return rt.run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x)


def check_file(path: Path, manifest: Manifest, where: str, head: bytes) -> None:
    """UsageError unless ``head`` (the file's first bytes) carries the TFL3 FlatBuffer identifier."""
    if len(head) < 8 or head[4:8] != b"TFL3":
        raise UsageError(f"{where}: format: not a TFLite model (no TFL3 FlatBuffer identifier; truncated or "
                         "another kind of file?)")


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("tflite", "TFLite fp32 (litert-torch), NHWC, fixed batch", (".tflite",), ("fp32",), "tflite",
                 ("tflite",), "LiteRT interpreter (ai_edge_litert)", export_tflite,
                 functools.partial(require_modules, "tflite", NEEDS_TFLITE)),
    ExportFormat("tflite-fp16", "TFLite with fp16 weights (ai-edge-quantizer float_casting), fp32 activations",
                 (".fp16.tflite",), ("fp16",), "tflite", ("tflite",), "LiteRT interpreter (ai_edge_litert)",
                 functools.partial(export_tflite, precision="fp16"),
                 functools.partial(require_modules, "tflite-fp16", NEEDS_TFLITE_FP16)),
    ExportFormat("tflite-int8", "TFLite full-integer int8 (PT2E), calibrated on calib_inputs, int8 I/O",
                 (".int8.tflite",), ("int8",), "tflite", ("tflite",), "LiteRT interpreter (ai_edge_litert)",
                 functools.partial(export_tflite, precision="int8"),
                 functools.partial(require_modules, "tflite-int8", NEEDS_TFLITE_INT8), calibration=True),
)}
