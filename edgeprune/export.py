"""Export a model for a device runtime, verified against torch: the entry point and the export-format registry.

:func:`export` looks the format up in :data:`REGISTRY`, checks that format's toolchain first (one
:class:`~edgeprune.errors.ToolchainError` that says what to install), runs its exporter, and writes the artifact as
``<tag><suffix>`` (``r20.onnx``, as ``edgeprune demo`` names it; ``r20.fp16.xml`` + ``r20.fp16.bin``,
``r20.int8.tflite``, ``r20_edgetpu.tflite``, ...: distinct per format) and its manifest beside it as
``<tag>.<format>.manifest.json`` (``r20.onnx.manifest.json``): the formats of one tag share a folder.
:func:`find_manifest` finds an artifact's manifest (also ``edgeprune demo``'s ``<tag>.manifest.json``).

Every exporter writes one artifact (one file, or a set of files: OpenVINO IR is an ``.xml`` and its ``.bin``) and
returns a :class:`Manifest`. Before returning, it runs the artifact and torch on the same fixed batch
(``check_inputs``) and compares them: maximum absolute error, cosine similarity of the logits, and top-1 agreement.
An artifact outside tolerance is deleted, every file of it, and :class:`~edgeprune.errors.ExportError` raised: a
wrong artifact never reaches a device. The exporters can also be called directly (``export.export_onnx(model,
path, ...)``: ``export.export_<format>`` is that format module's exporter); they return the manifest without
writing it.

Formats (:data:`FORMATS`; ``Manifest.format`` is the file format the agent loads, ``Manifest.export_format`` the
name below). Each lives in its own module under :mod:`edgeprune.exporters`, whose docstring says which runtime
consumes it, the toolchain it needs, and what was verified here:

=================  ===============================================================  ===================================
name               artifact                                                         checked here with
=================  ===============================================================  ===================================
``onnx``           ONNX, opset 17, dynamic batch, NCHW                              onnxruntime, CPU
``torchscript``    ``torch.jit.trace``, any batch                                   ``torch.jit.load``, CPU
``openvino``       OpenVINO IR ``.xml`` + ``.bin``, FP32 weights                    OpenVINO CPU, precision hint f32
``openvino-fp16``  OpenVINO IR, weights compressed to FP16                          OpenVINO CPU, precision hint f32
``tflite``         TFLite fp32 (litert-torch), NHWC, fixed batch                    LiteRT interpreter
``tflite-fp16``    TFLite with fp16 weights, fp32 activations                       LiteRT interpreter
``tflite-int8``    TFLite full-integer int8 (PT2E), calibrated on ``calib_inputs``  LiteRT interpreter
``edgetpu``        ``tflite-int8`` compiled by ``edgetpu_compiler``                 the int8 model before compiling
``tensorrt``       the verified ONNX, targeted at TensorRT (engine built on device)  onnxruntime (the ONNX)
=================  ===============================================================  ===================================

Adding a format: a module under ``edgeprune/exporters/`` holding its exporter and a ``FORMATS`` dict of its
:class:`~edgeprune.exporters.base.ExportFormat` (one per format name it serves), and one line in
:data:`REGISTRY`. Format modules are imported by name (:func:`importlib.import_module`) when a format is first
used, so importing this module imports no format module and no toolchain; they import only the shared
:mod:`edgeprune.exporters.base` and :mod:`edgeprune.exporters.manifest` (and a format they build on), never this
module. A format that writes a file format the host cannot run yet also needs a line in
:data:`edgeprune.exporters.artifacts.RUNTIMES`.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from .errors import ExportError, UsageError
from .exporters.artifacts import agreement, check_artifact, run_artifact, run_artifact_outputs
from .exporters.base import Exporter, ExportFormat, Tolerance, delete_files
from .exporters.manifest import (MANIFEST_VERSION, Manifest, Verification, default_preprocess, find_manifest,
                                 manifest_path, sha256_text)

__all__ = ["export", "REGISTRY", "FORMATS", "get_format", "get_exporter", "ExportFormat", "Exporter", "Manifest",
           "Verification", "MANIFEST_VERSION", "Tolerance", "manifest_path", "find_manifest", "sha256_text",
           "check_artifact", "run_artifact", "run_artifact_outputs", "agreement"]

# The registry, one line per format: its name -> the module that holds it (``FORMATS[name]`` there is its
# ExportFormat; a format named like its module also has ``export_<name>`` there).
REGISTRY: Dict[str, str] = {
    "onnx": "edgeprune.exporters.onnx",
    "torchscript": "edgeprune.exporters.torchscript",
    "openvino": "edgeprune.exporters.openvino",
    "openvino-fp16": "edgeprune.exporters.openvino",
    "tflite": "edgeprune.exporters.tflite",
    "tflite-fp16": "edgeprune.exporters.tflite",
    "tflite-int8": "edgeprune.exporters.tflite",
    "edgetpu": "edgeprune.exporters.edgetpu",
    "tensorrt": "edgeprune.exporters.tensorrt",
}


def _load(fmt: Any) -> Optional[ExportFormat]:
    module = REGISTRY.get(fmt) if isinstance(fmt, str) else None
    return None if module is None else importlib.import_module(module).FORMATS[fmt]


class _Formats(Mapping[str, ExportFormat]):
    """:data:`FORMATS`: every registered format by name, in registry order; its module imported on first access."""

    def __getitem__(self, fmt: str) -> ExportFormat:
        spec = _load(fmt)
        if spec is None:
            raise KeyError(fmt)
        return spec

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)


FORMATS: Mapping[str, ExportFormat] = _Formats()


def __getattr__(name: str) -> Any:
    """``export.export_<format>`` (``export_onnx``, ``export_openvino``, ``export_tflite``, ...): the exporter
    function of that format's module, imported on first use."""
    fmt = name[len("export_"):] if name.startswith("export_") else None
    if fmt is not None and fmt in REGISTRY:
        return getattr(importlib.import_module(REGISTRY[fmt]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get_format(fmt: str) -> ExportFormat:
    spec = _load(fmt)
    if spec is None:
        raise UsageError(f"format: unknown export format {fmt!r}; known: {', '.join(sorted(REGISTRY))}")
    return spec


def get_exporter(fmt: str) -> Exporter:
    return get_format(fmt).export


# the arguments export() passes itself; not options
_EXPORT_ARGS = ("model", "path", "check_inputs", "calib_inputs", "model_name", "source_checkpoint_sha256",
                "pruning_plan_sha256")


def export(model: nn.Module, fmt: str, out_dir: Union[str, Path], *, check_inputs: torch.Tensor,
           calib_inputs: Optional[torch.Tensor] = None, model_name: str, source_checkpoint_sha256: str,
           pruning_plan_sha256: str, tag: Optional[str] = None, preprocess: Optional[Dict[str, Any]] = None,
           **opts: Any) -> Manifest:
    """Export ``model`` as ``fmt`` into ``out_dir``, verified, with its manifest beside it; return the manifest.

    Files: ``<out_dir>/<tag><suffix>`` with the format's suffixes (``r20.onnx``; ``r20.fp16.xml`` and
    ``r20.fp16.bin``; ``r20.int8.tflite``; ``r20_edgetpu.tflite``; see :data:`FORMATS`), so that every format of one
    tag can share a folder, and the manifest ``<out_dir>/<tag>.<fmt>.manifest.json`` (:func:`manifest_path`).
    ``tag`` defaults to ``model_name``. ``check_inputs``: the fixed NCHW batch the artifact is compared with torch on;
    ``calib_inputs``: the calibration batch for int8 formats (``tflite-int8``, ``edgetpu``, ``tensorrt`` with an int8
    precision), ignored by the others. ``opts`` go to the format's exporter (``input_shape``, ``tolerance``,
    ``opset``, ``dynamic_batch``, ``precision`` for tensorrt, ``compiler`` for edgetpu, ...); an option it does not
    take is a UsageError. ``preprocess``: what the agent does to uint8 images before feeding them (``scale``,
    ``mean``, ``std``) and how the host made those images (``resize``, ``center_crop``), recorded in the manifest
    (default: the reference CIFAR models' ImageNet normalisation). The arguments are checked first, then the
    toolchain (:class:`~edgeprune.errors.ToolchainError`), before anything is written.
    """
    spec = get_format(fmt)
    tag = model_name if tag is None else tag
    if not isinstance(tag, str) or not tag or Path(tag).name != tag or tag.startswith("."):
        raise UsageError(f"tag: {tag!r} must be a plain file name, without folders, not starting with '.'")
    if "precision" in opts and opts["precision"] not in spec.precisions:
        other = [f.name for f in FORMATS.values() if opts["precision"] in f.precisions and
                 f.manifest_format == spec.manifest_format]
        raise UsageError(f"precision: {spec.name} export produces {', '.join(spec.precisions)}, not "
                         f"{opts['precision']!r}" + (f"; use format {', '.join(other)}" if other else ""))
    params = inspect.signature(spec.export).parameters
    for key in opts:
        if key not in params or key in _EXPORT_ARGS:
            takes = [p for p in params if p not in _EXPORT_ARGS]
            raise UsageError(f"{key}: not an option of {spec.name} export (it takes: {', '.join(takes) or 'none'})")
    if spec.calibration and (calib_inputs is None or len(calib_inputs) == 0):
        raise UsageError(f"calib_inputs: {spec.name} export needs a calibration batch (NCHW, preprocessed)")
    spec.check(opts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{tag}{spec.suffixes[0]}"
    kwargs: Dict[str, Any] = dict(check_inputs=check_inputs, model_name=model_name,
                                  source_checkpoint_sha256=source_checkpoint_sha256,
                                  pruning_plan_sha256=pruning_plan_sha256)
    if "calib_inputs" in params:
        kwargs["calib_inputs"] = calib_inputs
    man = spec.export(model, path, **kwargs, **opts)
    if preprocess is not None:
        man.preprocess = {**default_preprocess(), **dict(preprocess)}
    target = manifest_path(out, tag, spec.name)
    try:
        man.write(target)
    except OSError as e:
        delete_files([out / name for name in man.files])
        raise ExportError(f"{target}: cannot write the manifest ({e}); artifact deleted") from e
    return man

