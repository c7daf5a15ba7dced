"""The ``openvino`` and ``openvino-fp16`` formats: OpenVINO IR (``.xml`` + ``.bin``) from the verified ONNX.

Consumed by: the agent's ``openvino`` runtime (it loads the ``.xml`` with its ``.bin`` beside it). Toolchain
here: the ``onnx`` format's (torch, onnx, onnxruntime) plus ``openvino`` (in edgeprune's default install).
Verified here: every IR is compiled on OpenVINO's CPU plugin with the f32 precision hint and run against torch
before it may ship (ResNet-20 tests; ResNet-56 pruned 50 %, align 8, on 2,000 images: a slow test); no other
OpenVINO device plugin is run here.

OpenVINO IR is converted from the verified ONNX (``openvino.Core().read_model`` of the ``.onnx``: OpenVINO's ONNX
frontend, the same conversion ``openvino.convert_model`` does for an ONNX file) and written with
``openvino.save_model(..., compress_to_fp16=...)``. The ONNX route rather than ``convert_model(torch_module)``: the
IR then holds the graph onnxruntime and TensorRT run, already checked once, with the input and output names
(``input``, ``logits``) and the dynamic batch of the ONNX artifact; the torch frontend traces the model again, one
more conversion to trust. ``convert_model`` is also avoided because it starts OpenVINO's usage telemetry. Note that
``import openvino`` itself sends a telemetry event from a forked process (unless opted out with
``opt_in_out --opt_out``); in a process where JAX (litert-torch) has already started its threads, JAX warns about
that fork. Import openvino before the first TFLite export, or export TFLite in a process of its own.

Contract: :func:`export_openvino` writes ``path`` (``.xml``) and its ``.bin`` and returns their manifest (not
written), or deletes both and raises :class:`~edgeprune.errors.ExportError`. :func:`run_openvino`,
:func:`run_on_host` and :func:`check_file` are what :mod:`edgeprune.exporters.artifacts` uses to run and check an
``openvino-ir`` file.
"""
from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, UsageError
from .base import (FP16_TOLERANCE, ExportFormat, Tolerance, as_numpy, batched, delete_files, dist_version,
                   file_digests, require_modules, torch_outputs, verify_or_delete, warning_lines)
from .manifest import Manifest, default_preprocess
from .onnx import NEEDS_ONNX, export_onnx

PIP_OPENVINO = "pip install 'openvino>=2023.1' (part of edgeprune's default install)"
NEEDS_OPENVINO = NEEDS_ONNX + (("openvino", "openvino", PIP_OPENVINO),)


def import_openvino() -> Any:
    import openvino

    return openvino


# OpenVINO on a CPU with bf16 or f16 units runs in that precision by default: the check pins f32.
OPENVINO_CHECK_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def run_openvino(path: Path, x: np.ndarray, threads: int = 1) -> Tuple[List[np.ndarray], str]:
    ov = import_openvino()
    core = ov.Core()
    config = dict(OPENVINO_CHECK_CONFIG, INFERENCE_NUM_THREADS=str(threads))
    compiled = core.compile_model(str(path), "CPU", config)
    dim = compiled.input(0).get_partial_shape()[0]
    batch = dim.get_length() if dim.is_static else None
    request = compiled.create_infer_request()

    n_out = len(compiled.outputs)

    def run(xb: np.ndarray) -> List[np.ndarray]:
        request.infer({0: xb})
        return [np.asarray(request.get_output_tensor(i).data).copy() for i in range(n_out)]

    out = batched(run, x, batch)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # read back: what the plugin actually runs
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return out, f"openvino {ov.__version__} CPU, inference precision {precision}"


def export_openvino(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                    source_checkpoint_sha256: str, pruning_plan_sha256: str, precision: str = "fp32",
                    input_shape: Sequence[int] = INPUT_SHAPE, opset: int = 17, dynamic_batch: bool = True,
                    tolerance: Optional[Tolerance] = None) -> Manifest:
    """Export ``model`` to OpenVINO IR: ``path`` (``.xml``) and its weights beside it (``.bin``, same stem).

    Converted from the ONNX export (verified with onnxruntime first; see the module docstring for why ONNX), then
    saved with ``openvino.save_model(compress_to_fp16=precision == "fp16")``, then compiled on OpenVINO's CPU
    plugin with the f32 precision hint and compared with torch: :class:`Tolerance` defaults for ``fp32``,
    :data:`FP16_TOLERANCE` for ``fp16``. Outside tolerance both files are deleted. Input ``input`` (NCHW, dynamic
    batch unless ``dynamic_batch=False``), output ``logits``.
    """
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"precision: openvino export supports fp32 and fp16 (weights compressed to FP16), "
                         f"got {precision!r}")
    fmt = "openvino" if precision == "fp32" else "openvino-fp16"
    FORMATS[fmt].check()
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise UsageError(f"path: an OpenVINO IR artifact is an .xml file (its weights go beside it as .bin); "
                         f"got {path.name}")
    tol = tolerance or (FP16_TOLERANCE if precision == "fp16" else Tolerance())
    weights = path.with_suffix(".bin")
    ov = import_openvino()
    model = model.eval().cpu()
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as td:
        onnx_path = Path(td) / "model.onnx"
        try:
            onnx_man = export_onnx(model, onnx_path, check_inputs=check_inputs, model_name=model_name,
                                   source_checkpoint_sha256=source_checkpoint_sha256,
                                   pruning_plan_sha256=pruning_plan_sha256, input_shape=input_shape, opset=opset,
                                   dynamic_batch=dynamic_batch)
        except ExportError as e:
            raise ExportError(f"{path}: the ONNX the IR is converted from failed its own check: {e}") from e
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ir = ov.Core().read_model(str(onnx_path))
                ov.save_model(ir, str(Path(td) / "model.xml"), compress_to_fp16=precision == "fp16")
        except Exception as e:
            raise ExportError(f"{path}: OpenVINO IR conversion failed: {type(e).__name__}: {e}") from e
        os.replace(Path(td) / "model.bin", weights)
        os.replace(Path(td) / "model.xml", path)
    files = [path, weights]
    try:
        out, checked_with = run_openvino(path, as_numpy(check_inputs))
        ir = ov.Core().read_model(str(path))
        input_name, output_name = ir.input(0).get_any_name(), ir.output(0).get_any_name()
    except Exception as e:
        delete_files(files)
        raise ExportError(f"{path}: OpenVINO cannot run the IR just written: {type(e).__name__}: {e}") from e
    ver = verify_or_delete(files, torch_outputs(model, check_inputs), out, tol, f"OpenVINO IR {precision}",
                           checked_with=checked_with)
    digests = file_digests(path, weights)
    return Manifest(
        file=path.name, sha256=digests[path.name], files=digests, format="openvino-ir", export_format=fmt,
        precision=precision, input_name=input_name, input_shape=list(input_shape), input_dtype="float32",
        layout="NCHW", output_name=output_name, dynamic_batch=dynamic_batch, preprocess=default_preprocess(),
        model=model_name, source_checkpoint_sha256=source_checkpoint_sha256,
        pruning_plan_sha256=pruning_plan_sha256, verification=ver,
        quantization=({"scheme": "weights compressed to FP16 (openvino.save_model compress_to_fp16); "
                                 "decompressed to f32 at compile time unless the device runs f16",
                       "weights": "float16", "activations": "float32"} if precision == "fp16" else None),
        exporter={"name": "openvino.save_model, from the verified ONNX (Core.read_model)",
                  "openvino": str(ov.__version__), "torch": torch.__version__, "opset": opset,
                  "compress_to_fp16": precision == "fp16", "onnx_sha256": onnx_man.sha256,
                  "onnx_verification": asdict(onnx_man.verification), "check": checked_with,
                  "edgeprune": dist_version("edgeprune"),
                  "warnings": sorted(set(onnx_man.exporter.get("warnings", [])) | set(warning_lines(caught)))})

def run_on_host(path: Path, x: np.ndarray, threads: int = 1,
                manifest: Optional[Manifest] = None) -> List[np.ndarray]:
    """Every output of the IR at ``path`` (its ``.bin`` beside it) on the NCHW batch ``x`` (OpenVINO CPU, f32)."""
    return run_openvino(path, x, threads)[0]


def check_file(path: Path, manifest: Manifest, where: str, head: bytes) -> None:
    """UsageError unless ``path`` parses as XML with a ``<net>`` root, as an OpenVINO IR does (nothing is
    compiled)."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UsageError(f"{where}: format: not an OpenVINO IR (.xml does not parse: {e})") from None
    if root.tag != "net":
        raise UsageError(f"{where}: format: not an OpenVINO IR (root element <{root.tag}>, not <net>)")


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("openvino", "OpenVINO IR (.xml + .bin) from the verified ONNX, FP32 weights", (".xml", ".bin"),
                 ("fp32",), "openvino-ir", ("openvino",), "OpenVINO CPU, INFERENCE_PRECISION_HINT f32",
                 export_openvino, functools.partial(require_modules, "openvino", NEEDS_OPENVINO)),
    ExportFormat("openvino-fp16", "OpenVINO IR (.xml + .bin), weights compressed to FP16", (".fp16.xml", ".fp16.bin"),
                 ("fp16",), "openvino-ir", ("openvino",), "OpenVINO CPU, INFERENCE_PRECISION_HINT f32",
                 functools.partial(export_openvino, precision="fp16"),
                 functools.partial(require_modules, "openvino-fp16", NEEDS_OPENVINO)),
)}
