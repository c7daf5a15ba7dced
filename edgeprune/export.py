"""Exporters, each checked against torch before its artifact may ship; the export-format registry; the manifest.

An exporter writes one artifact (one file, or a set of files: OpenVINO IR is an ``.xml`` and its ``.bin``) and
returns a :class:`Manifest`. Before returning, it runs the artifact and torch on the same fixed batch
(``check_inputs``) and compares them (:func:`compare`): maximum absolute error, cosine similarity of the logits, and
top-1 agreement. An artifact outside tolerance is deleted, every file of it, and
:class:`~edgeprune.errors.ExportError` raised: a wrong artifact never reaches a device.

:func:`export` is the entry point: it looks the format up in :data:`FORMATS`, checks that format's toolchain first
(one :class:`ToolchainError` that says what to install), runs the exporter, and writes the artifact as
``<tag><suffix>`` (``r20.onnx``, as ``edgeprune demo`` names it; ``r20.fp16.xml`` + ``r20.fp16.bin``,
``r20.int8.tflite``, ``r20_edgetpu.tflite``, ...: distinct per format) and its manifest beside it as
``<tag>.<format>.manifest.json`` (``r20.onnx.manifest.json``): the formats of one tag share a folder.
:func:`find_manifest` finds an artifact's manifest (also ``edgeprune demo``'s ``<tag>.manifest.json``). The
exporters can also be called directly (``export_onnx(model, path, ...)``); they return the manifest without
writing it.

Formats (:data:`FORMATS`; ``Manifest.format`` is the file format the agent loads, ``Manifest.export_format`` the
name below):

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

ONNX uses torch's TorchScript exporter at opset 17 by default. torch 2.9+ deprecates it in favour of the
dynamo exporter, but that one cannot emit opsets below 18, and the runtimes on deployed edge devices cannot
read 18 (TensorRT 8.5 on JetPack 5 stops at 17). Its deprecation warnings are dropped for that call only; its other
warnings go into the manifest.

OpenVINO IR is converted from the verified ONNX (``openvino.Core().read_model`` of the ``.onnx``: OpenVINO's ONNX
frontend, the same conversion ``openvino.convert_model`` does for an ONNX file) and written with
``openvino.save_model(..., compress_to_fp16=...)``. The ONNX route rather than ``convert_model(torch_module)``: the
IR then holds the graph onnxruntime and TensorRT run, already checked once, with the input and output names
(``input``, ``logits``) and the dynamic batch of the ONNX artifact; the torch frontend traces the model again, one
more conversion to trust. ``convert_model`` is also avoided because it starts OpenVINO's usage telemetry. Note that
``import openvino`` itself sends a telemetry event from a forked process (unless opted out with
``opt_in_out --opt_out``); in a process where JAX (litert-torch) has already started its threads, JAX warns about
that fork. Import openvino before the first TFLite export, or export TFLite in a process of its own.

``tflite-fp16``: litert-torch 0.10 has no float16 option of its own (its ``quant_config`` takes a PT2E int8
quantizer or a generative-API recipe, and ``_litert_converter_flags`` reach only the experimental V2 converter);
TensorFlow's ``target_spec.supported_types = [tf.float16]`` would need TensorFlow. The fp32 model is therefore
converted by litert-torch and then rewritten by ai-edge-quantizer (installed with litert-torch) with its
``float_casting`` weight-only recipe: the weights of CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED (and transposed
convolutions, embedding lookups) are stored as float16 behind DEQUANTIZE ops, activations and arithmetic stay
float32 (the same layout TensorFlow's float16 post-training quantization produces; GPU delegates may run it in fp16).

``edgetpu``: the ``tflite-int8`` model, verified, then compiled by Coral's ``edgetpu_compiler`` (x86-64
Debian/Ubuntu only, from Coral's apt repository; found on PATH, or ``EDGETPU_COMPILER``, or ``compiler=``). Its
operation log gives how many operations map to the Edge TPU; that goes into ``Manifest.edgetpu``, and a model with
none mapped is refused. The compiled model's Edge TPU custom op runs only on an Edge TPU, so the check here is that
of the int8 model it was compiled from; the manifest says so in ``warnings``.

``tensorrt``: nothing is built on the host. The artifact is the verified ONNX; the manifest has ``format: "onnx"``
(the file), ``export_format: "tensorrt"``, ``target_runtime: "tensorrt"``, ``precision`` the engine's, and
``runtime_options`` the agent's tensorrt options for it (``precision``, ``sparsity``, int8: ``calibration_data``, an
npz of float32 ``inputs`` written beside the ONNX and listed in ``files``). The agent builds the engine on the device
from the ONNX and caches it under a key of the artifact's sha256, the TensorRT version, the GPU and the build flags.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .data import INPUT_SHAPE, MEAN, SCALE, STD
from .errors import ExportError, ToolchainError, UsageError
from .models import sha256_file
from .sources import flatten_outputs

MANIFEST_VERSION = 2
MANIFEST_VERSIONS = (1, 2)  # what Manifest.read accepts; version 1 manifests are filled in as described there


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
# int8: outputs differ from torch by quantization steps, so max abs err is no criterion; top-1 and cosine are.
TFLITE_INT8_TOLERANCE = Tolerance(max_abs_err=float("inf"), min_cosine=0.98, min_top1_agreement=0.9)


@dataclass
class Verification:
    n: int
    max_abs_err: float
    cosine: float
    top1_agreement: float
    passed: bool
    checked_with: str = ""                                   # the runtime that ran the artifact here
    tolerance: Optional[Dict[str, Optional[float]]] = None   # the bounds it was held to (null: unbounded)


@dataclass
class Manifest:
    """What a device needs to run an artifact, and where it came from.

    ``file``/``sha256``: the primary file (the one a runtime opens: ``.onnx``, ``.xml``, ``.tflite``, ``.pt``);
    ``files``: every file of the artifact that must travel with it, name -> sha256, the primary included (OpenVINO
    IR: the ``.xml`` and its ``.bin``; tensorrt int8: the ONNX and its calibration npz). ``format``: the file format
    the agent's runtimes load (``onnx``, ``openvino-ir``, ``tflite``, ``torchscript``); ``export_format``: the
    registry name it was exported as (``openvino-fp16``, ``tflite-int8``, ``edgetpu``, ``tensorrt``, ...).
    ``precision``: the numeric precision it runs at on its target (``fp32``, ``fp16``: fp16 weights, ``int8``; for
    ``tensorrt`` the engine's). ``target_runtime`` and ``runtime_options``: set when the file format alone does not
    say how to run it: the agent runtime and the ``runtime.options`` a job must use (``tensorrt`` with
    ``{"precision": "fp16"}``; an Edge TPU model: ``tflite`` with ``{"delegate": "edgetpu"}``; relative paths in
    them are relative to the artifact's folder). ``quantization``: int8: scheme, calibration size, and scale and
    zero point of the input and output; fp16: which tensors are fp16. ``edgetpu``: the Edge TPU compiler's
    results (operations mapped, on-chip memory). ``exporter``: tool versions and the tools' own warnings;
    ``warnings``: edgeprune's caveats about this artifact (what could not be checked here, operations left on the
    CPU). ``input_dtype`` is what the agent feeds: float32 also for an int8 model, which it quantizes with the
    model's own scale and zero point.
    """

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
    export_format: str = ""
    files: Dict[str, str] = field(default_factory=dict)
    target_runtime: Optional[str] = None
    runtime_options: Dict[str, Any] = field(default_factory=dict)
    edgetpu: Optional[Dict[str, Any]] = None
    warnings: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.files:
            self.files = {self.file: self.sha256}
        if not self.export_format:
            self.export_format = _legacy_export_format(self.format, self.precision)

    def write(self, path: Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest") -> "Manifest":
        """A manifest from its JSON object; UsageError naming ``source`` and the field when it is not one.

        Version 1 (before ``files``, ``export_format``, ``target_runtime``, ``runtime_options``, ``edgetpu``,
        ``warnings``) is read with ``files = {file: sha256}`` and ``export_format`` from format and precision, and
        comes back as the current version."""
        if not isinstance(raw, dict):
            raise UsageError(f"{source}: not an edgeprune manifest (not a JSON object)")
        version = raw.get("version", 1)
        if version not in MANIFEST_VERSIONS:
            raise UsageError(f"{source}: version: {version!r} is not a manifest version this edgeprune reads "
                             f"({', '.join(map(str, MANIFEST_VERSIONS))})")
        doc = dict(raw)
        for name, known in ((None, {f.name for f in fields(cls)}),
                            ("verification", {f.name for f in fields(Verification)})):
            obj = doc if name is None else doc.get(name)
            if not isinstance(obj, dict):
                raise UsageError(f"{source}: {name}: missing or not an object")
            unknown = sorted(set(obj) - known)
            if unknown:
                raise UsageError(f"{source}: {(name + '.') if name else ''}{unknown[0]}: not a manifest field")
        try:
            doc["verification"] = Verification(**doc["verification"])
            man = cls(**doc)
        except TypeError as e:
            raise UsageError(f"{source}: not an edgeprune manifest ({e})") from None
        if not isinstance(man.files, dict):
            raise UsageError(f"{source}: files: must map plain file names (no folders) to sha256")
        for name in man.files:
            problem = plain_name_problem(name)
            if problem is not None:
                raise UsageError(f"{source}: files: must map plain file names (no folders) to sha256: {name!r} "
                                 f"{problem}")
        problem = plain_name_problem(man.file)
        if problem is not None:
            raise UsageError(f"{source}: file: {man.file!r} {problem}")
        if man.files.get(man.file) != man.sha256:
            raise UsageError(f"{source}: file: {man.file!r} must be listed in files with its sha256")
        man.version = MANIFEST_VERSION
        return man

    @classmethod
    def read(cls, path: Union[str, Path]) -> "Manifest":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: cannot read the manifest: {e}") from None
        return cls.from_dict(raw, str(path))

    def check_files(self, folder: Union[str, Path]) -> None:
        """ExportError unless every file of the artifact is in ``folder`` with its recorded sha256."""
        for name, digest in self.files.items():
            p = Path(folder) / name
            if not p.is_file():
                raise ExportError(f"{p}: missing (listed in the manifest of {self.file})")
            if sha256_file(p) != digest:
                raise ExportError(f"{p}: sha256 does not match its manifest (changed after export?)")


def plain_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` is not a plain file name that stays in its folder, or None: the agent's job-schema rule
    itself (``agent.schema.file_name_problem``), so that a manifest the host accepts names files the agent
    accepts."""
    from agent.schema import file_name_problem

    return file_name_problem(name)


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 10: "float16", 11: "float64"}


def check_artifact(path: Union[str, Path], manifest: "Manifest", source: str = "manifest") -> None:
    """UsageError unless ``path`` is the kind of model ``manifest`` says (``source`` names the manifest): a file of
    its ``format`` that the host can read (ONNX: parsed and checked, with an input ``input_name`` of the manifest's
    ``input_shape`` and ``input_dtype``; OpenVINO IR: an XML ``<net>``; TFLite: a FlatBuffer with the ``TFL3``
    identifier; TorchScript: a zip archive). Checks the sha256 cannot make: a file whose manifest was written for
    it (or rewritten to match) but which is not a model, or not that model. Cheap: nothing is run."""
    path = Path(path)
    where = f"{path} (manifest {source})"
    fmt = manifest.format
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise UsageError(f"{where}: cannot read the artifact: {e.strerror}") from None
    if fmt == "onnx":
        _check_onnx(path, manifest, where)
    elif fmt == "openvino-ir":
        import xml.etree.ElementTree as ET

        try:
            root = ET.parse(path).getroot()
        except (ET.ParseError, OSError) as e:
            raise UsageError(f"{where}: format: not an OpenVINO IR (.xml does not parse: {e})") from None
        if root.tag != "net":
            raise UsageError(f"{where}: format: not an OpenVINO IR (root element <{root.tag}>, not <net>)")
    elif fmt == "tflite":
        if len(head) < 8 or head[4:8] != b"TFL3":
            raise UsageError(f"{where}: format: not a TFLite model (no TFL3 FlatBuffer identifier; truncated or "
                             "another kind of file?)")
    elif fmt == "torchscript":
        import zipfile

        if not zipfile.is_zipfile(path):
            raise UsageError(f"{where}: format: not a TorchScript archive (not a zip file; truncated?)")


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


def _legacy_export_format(fmt: str, precision: str) -> str:
    if fmt == "tflite" and precision in ("fp16", "int8"):
        return f"tflite-{precision}"
    if fmt == "openvino-ir":
        return "openvino-fp16" if precision == "fp16" else "openvino"
    return fmt


def manifest_path(out_dir: Union[str, Path], tag: str, fmt: str) -> Path:
    """Where :func:`export` writes a manifest: ``<out_dir>/<tag>.<fmt>.manifest.json`` (``r20.onnx.manifest.json``,
    ``r20.openvino-fp16.manifest.json``): one per format, so that the formats of one tag share a folder."""
    return Path(out_dir) / f"{tag}.{fmt}.manifest.json"


def find_manifest(artifact: Union[str, Path]) -> Optional[Path]:
    """The manifest beside an artifact file: the one whose ``file`` names it (``<tag>.<fmt>.manifest.json`` as
    :func:`export` writes them, or ``<stem>.manifest.json`` as ``edgeprune demo`` does); None when there is none."""
    artifact = Path(artifact)
    demo = artifact.with_name(artifact.stem + ".manifest.json")
    for candidate in [demo] + sorted(artifact.parent.glob("*.manifest.json")):
        if candidate.is_file():
            try:
                if json.loads(candidate.read_text()).get("file") == artifact.name:
                    return candidate
            except (OSError, ValueError, AttributeError):
                continue
    return None


def default_preprocess() -> Dict[str, Any]:
    return {"scale": SCALE, "mean": list(MEAN), "std": list(STD), "input": "uint8 HWC RGB"}


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
        _delete(paths)
        raise ExportError(f"{paths[0]}: {what} {e}; not shipped: deleted") from None
    ver.checked_with = checked_with
    if not ver.passed:
        _delete(paths)
        extra = f" (and {', '.join(p.name for p in paths[1:])})" if len(paths) > 1 else ""
        raise ExportError(f"{paths[0]}: {what} artifact disagrees with torch (max abs err {ver.max_abs_err:.3g}, "
                          f"cosine {ver.cosine:.6f}, top-1 agreement {ver.top1_agreement:.3f}; tolerance "
                          f"{_tol_text(tol)}); not shipped: deleted{extra}")
    return ver


def _tol_text(tol: Tolerance) -> str:
    return (f"max abs err <= {tol.max_abs_err:g}, cosine >= {tol.min_cosine:g}, "
            f"top-1 agreement >= {tol.min_top1_agreement:g}")


def _delete(paths: Sequence[Path]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)


def _files(*paths: Path) -> Dict[str, str]:
    return {p.name: sha256_file(p) for p in paths}


def _warning_lines(caught: Sequence[warnings.WarningMessage]) -> List[str]:
    return sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}" for w in caught})


def _dist_version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------- running artifacts
def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=np.float32)


def _batched(run: Callable[[np.ndarray], Any], x: np.ndarray, batch: Optional[int],
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


def _run_onnx(path: Path, x: np.ndarray, threads: int = 1) -> Tuple[List[np.ndarray], str]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    out = _batched(lambda xb: list(sess.run(None, {inp.name: xb})), x, batch)
    return out, f"onnxruntime {ort.__version__} CPUExecutionProvider"


def _import_openvino() -> Any:
    import openvino

    return openvino


# OpenVINO on a CPU with bf16 or f16 units runs in that precision by default: the check pins f32.
OPENVINO_CHECK_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}


def _run_openvino(path: Path, x: np.ndarray, threads: int = 1) -> Tuple[List[np.ndarray], str]:
    ov = _import_openvino()
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

    out = _batched(run, x, batch)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # read back: what the plugin actually runs
    precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
    return out, f"openvino {ov.__version__} CPU, inference precision {precision}"


class _Tflite:
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
        self.checked_with = f"ai_edge_litert {_dist_version('ai-edge-litert')} interpreter (XNNPACK)"

    def layout_for(self, nchw: Sequence[int]) -> Optional[str]:
        """NHWC or NCHW: which the model's input is, for NCHW inputs of shape ``nchw`` (batch ignored)."""
        n, c, h, w = (int(d) for d in nchw)
        if self.shape[1:] == [h, w, c]:
            return "NHWC"
        if self.shape[1:] == [c, h, w]:
            return "NCHW"
        return None

    def run(self, x: np.ndarray) -> List[np.ndarray]:
        return _batched(self._one, x, self.shape[0])

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


def _run_torchscript(path: Path, x: np.ndarray) -> Tuple[List[np.ndarray], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.9+ deprecates torch.jit.load; see export_torchscript
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = _batched(lambda xb: [t.numpy() for t in flatten_outputs(loaded(torch.from_numpy(xb)))], x, None)
    return out, f"torch {torch.__version__} torch.jit.load, CPU"


_SUFFIX_FORMATS = {".onnx": "onnx", ".xml": "openvino-ir", ".tflite": "tflite", ".pt": "torchscript",
                   ".ts": "torchscript"}


def _resolve_artifact(artifact: Path) -> Tuple[Optional[Manifest], Path]:
    if artifact.name.endswith(".manifest.json"):
        man = Manifest.read(artifact)
        return man, artifact.parent / man.file
    found = find_manifest(artifact)
    return (Manifest.read(found) if found is not None else None), artifact


def run_artifact(artifact: Union[str, Path], inputs: Any, *, threads: int = 1) -> np.ndarray:
    """Logits (the first output) of an exported artifact on ``inputs``; see :func:`run_artifact_outputs`."""
    return run_artifact_outputs(artifact, inputs, threads=threads)[0]


def run_artifact_outputs(artifact: Union[str, Path], inputs: Any, *, threads: int = 1) -> List[np.ndarray]:
    """Every output of an exported artifact on ``inputs``, in the model's output order, run by the runtime that
    checks its format here.

    ``artifact``: a manifest (``*.manifest.json``) or an artifact file; the manifest, given or found beside the
    file (:func:`find_manifest`), has every file's sha256 checked first and says the layout. ``inputs``: an NCHW
    float batch (torch tensor or array) preprocessed like ``check_inputs``; it is transposed to NHWC for an NHWC
    model, quantized for an int8 one. Any number of inputs, whatever the artifact's batch. An Edge TPU model cannot
    run here (ExportError).
    """
    man, art = _resolve_artifact(Path(artifact))
    x = _as_numpy(inputs)
    if x.ndim != 4 or len(x) == 0:
        raise UsageError(f"inputs: must be a non-empty NCHW batch, got shape {tuple(x.shape)}")
    if man is not None:
        man.check_files(art.parent)
    elif not art.is_file():
        raise UsageError(f"{art}: no such artifact")
    fmt = man.format if man is not None else _SUFFIX_FORMATS.get(art.suffix.lower())
    if man is not None and (man.export_format == "edgetpu" or man.runtime_options.get("delegate") == "edgetpu"):
        raise ExportError(f"{art}: an Edge TPU model runs only on an Edge TPU (the agent's tflite runtime with "
                          "delegate edgetpu); run the tflite-int8 model it was compiled from here instead")
    if fmt == "onnx":
        return _run_onnx(art, x, threads)[0]
    if fmt == "openvino-ir":
        return _run_openvino(art, x, threads)[0]
    if fmt == "torchscript":
        return _run_torchscript(art, x)[0]
    if fmt == "tflite":
        rt = _Tflite(art, threads)
        layout = man.layout if man is not None else rt.layout_for(x.shape)
        if layout is None:
            raise UsageError(f"inputs: shape {tuple(x.shape)} fits neither NHWC nor NCHW for the model input "
                             f"{rt.shape} of {art.name}")
        return rt.run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x)
    raise UsageError(f"{art}: cannot tell which runtime runs it (format {fmt!r}; known: "
                     f"{', '.join(sorted(set(_SUFFIX_FORMATS.values())))})")


def agreement(artifact: Union[str, Path], inputs: Any, reference_logits: Any, *, threads: int = 1) -> float:
    """Top-1 agreement (0..1) of an artifact with reference logits (torch's, on the same ``inputs``): the fraction
    of inputs whose arg-max class is the same. ``artifact`` and ``inputs`` as for :func:`run_artifact`.

    For example, ONNX / OpenVINO / TFLite fp32 against torch on a 2,000-image eval shard::

        x = data.to_tensor_batch(data.eval_split(200).images)
        with torch.no_grad():
            ref = torch.cat([model.eval()(x[s]) for s in data.batches(len(x), 250)])
        for fmt in ("onnx", "openvino", "tflite"):
            assert export.agreement(out / f"r56.{fmt}.manifest.json", x, ref) >= 0.999
    """
    ref = _as_numpy(reference_logits)
    ref = ref.reshape(ref.shape[0], -1)
    out = run_artifact(artifact, inputs, threads=threads)
    out = out.reshape(out.shape[0], -1)
    if out.shape != ref.shape:
        raise UsageError(f"reference_logits: shape {ref.shape} differs from the artifact's outputs {out.shape}")
    return float(np.mean(out.argmax(1) == ref.argmax(1)))


def _reference(model: nn.Module, x: torch.Tensor) -> List[np.ndarray]:
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


# ------------------------------------------------------------------------------------------------- exporters
def export_onnx(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                source_checkpoint_sha256: str, pruning_plan_sha256: str,
                input_shape: Sequence[int] = INPUT_SHAPE, opset: int = 17, dynamic_batch: bool = True,
                tolerance: Optional[Tolerance] = None) -> Manifest:
    """Export ``model`` to a single-file ONNX artifact at ``path`` and verify it with onnxruntime."""
    if not 13 <= opset <= 17:
        raise UsageError(f"opset: the TorchScript exporter used here supports 13..17, got {opset}")
    get_format("onnx").check()
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
    export_warnings = _warning_lines([w for w in caught if not issubclass(w.category, DeprecationWarning)])

    try:
        out, checked_with = _run_onnx(path, _as_numpy(check_inputs))
    except Exception as e:
        path.unlink(missing_ok=True)
        raise ExportError(f"{path}: onnxruntime cannot run the ONNX just written: {type(e).__name__}: {e}") from e
    ver = verify_or_delete(path, _reference(model, check_inputs), out, tol, "ONNX", checked_with=checked_with)
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="onnx", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=dynamic_batch, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, export_format="onnx",
        exporter={"name": "torch.onnx (TorchScript)", "torch": torch.__version__, "opset": opset,
                  "onnxruntime_check": ort.__version__, "edgeprune": _dist_version("edgeprune"),
                  "warnings": export_warnings})


def export_torchscript(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                       source_checkpoint_sha256: str, pruning_plan_sha256: str,
                       input_shape: Sequence[int] = INPUT_SHAPE,
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
    ver = verify_or_delete(path, _reference(model, check_inputs), out, tol, "TorchScript",
                           checked_with=f"torch {torch.__version__} torch.jit.load, CPU")
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="torchscript", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=True, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, export_format="torchscript",
        exporter={"name": "torch.jit.trace", "torch": torch.__version__, "check": "torch.jit.load, CPU",
                  "edgeprune": _dist_version("edgeprune"), "warnings": _warning_lines(caught)})


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
    get_format(fmt).check()
    path = Path(path)
    if path.suffix.lower() != ".xml":
        raise UsageError(f"path: an OpenVINO IR artifact is an .xml file (its weights go beside it as .bin); "
                         f"got {path.name}")
    tol = tolerance or (FP16_TOLERANCE if precision == "fp16" else Tolerance())
    weights = path.with_suffix(".bin")
    ov = _import_openvino()
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
        out, checked_with = _run_openvino(path, _as_numpy(check_inputs))
        ir = ov.Core().read_model(str(path))
        input_name, output_name = ir.input(0).get_any_name(), ir.output(0).get_any_name()
    except Exception as e:
        _delete(files)
        raise ExportError(f"{path}: OpenVINO cannot run the IR just written: {type(e).__name__}: {e}") from e
    ver = verify_or_delete(files, _reference(model, check_inputs), out, tol, f"OpenVINO IR {precision}",
                           checked_with=checked_with)
    digests = _files(path, weights)
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
                  "edgeprune": _dist_version("edgeprune"),
                  "warnings": sorted(set(onnx_man.exporter.get("warnings", [])) | set(_warning_lines(caught)))})


TFLITE_PRECISIONS = ("fp32", "fp16", "int8")
_TFLITE_FORMATS = {"fp32": "tflite", "fp16": "tflite-fp16", "int8": "tflite-int8"}


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
    get_format(fmt).check()
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
                         "ai_edge_quantizer": _dist_version("ai-edge-quantizer")}
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
        rt = _Tflite(path)
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
    x = _as_numpy(check_inputs.permute(0, 2, 3, 1) if layout == "NHWC" else check_inputs)
    out = rt.run(x)
    ver = verify_or_delete(path, _reference(model, check_inputs), out, tol, f"TFLite {precision}",
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
        exporter={"name": "litert_torch.convert", "litert_torch": _dist_version("litert-torch"),
                  "torch": torch.__version__, "check": f"ai_edge_litert {_dist_version('ai-edge-litert')}",
                  "edgeprune": _dist_version("edgeprune"),
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


# --------------------------------------------------------------------------------------------------- Edge TPU
EDGETPU_COMPILER_ENV = "EDGETPU_COMPILER"
EDGETPU_INSTALL = (
    "it is packaged for x86-64 Debian/Ubuntu only, in Coral's apt repository: "
    "curl https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && "
    "echo 'deb https://packages.cloud.google.com/apt coral-edgetpu-stable main' | "
    "sudo tee /etc/apt/sources.list.d/coral-edgetpu.list && sudo apt-get update && "
    "sudo apt-get install edgetpu-compiler; or set EDGETPU_COMPILER to the compiler's path")
_EDGETPU_MAPPED = "Mapped to Edge TPU"
_EDGETPU_HEADER = re.compile(r"^\s*Operator\s+Count\s+Status\s*$")
_EDGETPU_ROW = re.compile(r"^\s*(\S+)\s+(\d+)\s+(\S.*?)\s*$")
_EDGETPU_SUMMARY = {
    "compiler_version": re.compile(r"Edge TPU Compiler version (\S+)"),
    "subgraphs": re.compile(r"Number of Edge TPU subgraphs:\s*(\d+)"),
    "reported_total": re.compile(r"Total number of operations:\s*(\d+)"),
    "reported_on_edgetpu": re.compile(r"Number of operations that will run on Edge TPU:\s*(\d+)"),
    "reported_on_cpu": re.compile(r"Number of operations that will run on CPU:\s*(\d+)"),
    "on_chip_memory_used": re.compile(r"On-chip memory used for caching model parameters:\s*(\S+)"),
    "on_chip_memory_remaining": re.compile(r"On-chip memory remaining for caching model parameters:\s*(\S+)"),
    "off_chip_memory_used": re.compile(r"Off-chip memory used for streaming uncached model parameters:\s*(\S+)"),
}


def find_edgetpu_compiler(compiler: Optional[Union[str, Path]] = None) -> str:
    """The Edge TPU compiler to run: ``compiler``, else ``$EDGETPU_COMPILER``, else ``edgetpu_compiler`` on PATH;
    ToolchainError saying how to install it when there is none."""
    given = str(compiler) if compiler else os.environ.get(EDGETPU_COMPILER_ENV)
    if given:
        found = shutil.which(given)
        if found is None:
            where = "compiler" if compiler else EDGETPU_COMPILER_ENV
            raise ToolchainError(f"edgetpu export: {where}: {given!r} is not an executable program")
        return found
    found = shutil.which("edgetpu_compiler")
    if found is not None:
        return found
    machine = platform.machine().lower()
    arch = ("" if machine in ("x86_64", "amd64") else
            f" This machine is {machine or 'not x86-64'}: there is no build of the compiler for it (none for ARM64 "
            "since compiler 2.1); compile on an x86-64 Linux host.")
    raise ToolchainError(f"edgetpu export needs the Edge TPU Compiler (edgetpu_compiler), which is not on PATH; "
                         f"{EDGETPU_INSTALL}.{arch}")


def parse_edgetpu_output(log_text: str, stdout: str = "") -> Dict[str, Any]:
    """How ``edgetpu_compiler`` mapped a model, from its operation log (``<model>_edgetpu.log``: a header, then
    ``Operator  Count  Status`` and one row per operator and status) and its console output (the summary:
    version, subgraphs, total operations, on-chip memory; with ``-s`` the same table, possibly cut short).

    Returns ``ops_total``, ``ops_on_edgetpu`` (rows with status "Mapped to Edge TPU"), ``ops_on_cpu``,
    ``mapped_fraction``, ``operators`` (the rows), ``subgraphs``, ``compiler_version``, the memory lines and
    ``warnings`` (the log and the summary disagreeing). ExportError when neither holds an operator table.
    """
    def table(text: str) -> List[Dict[str, Any]]:
        rows: List[Dict[str, Any]] = []
        inside = False
        for line in text.splitlines():
            if _EDGETPU_HEADER.match(line):
                inside, rows = True, []
                continue
            if not inside or not line.strip():
                continue
            m = _EDGETPU_ROW.match(line)
            if m is None:  # "... All other operators were mapped successfully", "Compilation succeeded!"
                break
            rows.append({"op": m.group(1), "count": int(m.group(2)), "status": m.group(3)})
        return rows

    text = log_text + "\n" + stdout
    summary: Dict[str, Any] = {}
    for key, rx in _EDGETPU_SUMMARY.items():
        m = rx.search(text)
        if m is not None:
            summary[key] = int(m.group(1)) if m.group(1).isdigit() else m.group(1)
    rows = table(log_text)
    source = "log"
    if not rows:
        rows, source = table(stdout), "stdout"
    if not rows:
        raise ExportError("edgetpu_compiler: no operator table (\"Operator  Count  Status\") in its operation log "
                          "or output; cannot tell how much of the model maps to the Edge TPU")
    on_cpu = sum(r["count"] for r in rows if r["status"] != _EDGETPU_MAPPED)
    total = sum(r["count"] for r in rows)
    notes: List[str] = []
    reported = summary.get("reported_total")
    if reported is not None and reported != total:
        if source == "stdout":  # the console table lists the operators not mapped and may cut the rest short
            total = int(reported)
        else:
            notes.append(f"the operation log counts {total} operations, the compiler's summary {reported}")
    on_tpu = total - on_cpu
    return {"compiler_version": summary.get("compiler_version"), "ops_total": total, "ops_on_edgetpu": on_tpu,
            "ops_on_cpu": on_cpu, "mapped_fraction": round(on_tpu / total, 4) if total else 0.0,
            "subgraphs": summary.get("subgraphs"), "operators": rows, "table_from": source,
            "on_chip_memory_used": summary.get("on_chip_memory_used"),
            "on_chip_memory_remaining": summary.get("on_chip_memory_remaining"),
            "off_chip_memory_used": summary.get("off_chip_memory_used"), "warnings": notes}


def compile_edgetpu(tflite: Union[str, Path], path: Union[str, Path], *,
                    compiler: Optional[Union[str, Path]] = None, min_runtime_version: Optional[int] = None,
                    timeout_s: float = 600.0) -> Dict[str, Any]:
    """Compile a full-integer int8 TFLite model for the Edge TPU: ``edgetpu_compiler -s -o <tmp> [-m N]
    <model>.tflite``; its ``<model>_edgetpu.tflite`` becomes ``path`` and its ``<model>_edgetpu.log`` ``path`` with
    ``.log``. Returns :func:`parse_edgetpu_output`'s results plus ``log`` (the log's file name). ExportError, with
    nothing left at ``path``, when the compiler fails or maps no operation to the Edge TPU."""
    compiler_path = find_edgetpu_compiler(compiler)
    tflite, path = Path(tflite), Path(path)
    log_path = path.with_suffix(".log")
    base = path.stem[:-len("_edgetpu")] if path.stem.endswith("_edgetpu") and len(path.stem) > 8 else path.stem
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as td:
        src = Path(td) / f"{base}.tflite"
        shutil.copyfile(tflite, src)
        out_dir = Path(td) / "out"
        out_dir.mkdir()
        argv = [compiler_path, "-s", "-o", str(out_dir)]
        if min_runtime_version is not None:
            argv += ["-m", str(int(min_runtime_version))]
        argv.append(str(src))
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=td)
        except subprocess.TimeoutExpired:
            raise ExportError(f"{path}: edgetpu_compiler did not finish within {timeout_s:.0f} s") from None
        except OSError as e:
            raise ToolchainError(f"edgetpu export: cannot run {compiler_path}: {e}") from None
        output = (r.stdout or "") + (("\n" + r.stderr) if r.stderr else "")
        if r.returncode != 0:
            raise ExportError(f"{path}: edgetpu_compiler failed (exit {r.returncode}): {_tail(output)}")
        compiled, log = out_dir / f"{base}_edgetpu.tflite", out_dir / f"{base}_edgetpu.log"
        if not compiled.is_file():
            raise ExportError(f"{path}: edgetpu_compiler exited 0 but wrote no {compiled.name}: {_tail(output)}")
        log_text = log.read_text(errors="replace") if log.is_file() else ""
        try:
            stats = parse_edgetpu_output(log_text, r.stdout or "")
        except ExportError as e:
            raise ExportError(f"{path}: {e}") from None
        if stats["ops_on_edgetpu"] == 0:
            raise ExportError(f"{path}: edgetpu_compiler mapped none of the model's {stats['ops_total']} operations "
                              f"to the Edge TPU (it would run on the CPU alone); not shipped")
        os.replace(compiled, path)
        if log.is_file():
            os.replace(log, log_path)
        else:
            log_path.unlink(missing_ok=True)
    stats["log"] = log_path.name if log_path.is_file() else None
    return stats


def export_edgetpu(model: nn.Module, path: Path, *, check_inputs: torch.Tensor, model_name: str,
                   source_checkpoint_sha256: str, pruning_plan_sha256: str,
                   calib_inputs: Optional[torch.Tensor] = None, input_shape: Sequence[int] = INPUT_SHAPE,
                   tolerance: Optional[Tolerance] = None, compiler: Optional[Union[str, Path]] = None,
                   min_runtime_version: Optional[int] = None, timeout_s: float = 600.0) -> Manifest:
    """The full-integer int8 TFLite model (as :func:`export_tflite` with ``precision="int8"``, verified), compiled
    for the Coral Edge TPU by :func:`compile_edgetpu`.

    ``path`` (``.tflite``) receives the compiled model, ``path`` with ``.log`` the compiler's operation log. The
    manifest: ``format`` tflite, ``export_format`` edgetpu, ``target_runtime`` tflite with ``runtime_options``
    ``{"delegate": "edgetpu"}``, ``edgetpu`` the compiler's results (:func:`parse_edgetpu_output`) plus the int8
    model's sha256 and the log's name, ``verification`` the int8 model's (the compiled one runs only on an Edge
    TPU). A model with no operation mapped to the Edge TPU is refused (ExportError, files deleted); operations left
    on the CPU are listed in ``warnings``. The compiler is looked up first (:func:`find_edgetpu_compiler`), before
    the int8 conversion.
    """
    find_edgetpu_compiler(compiler)
    _require_modules("edgetpu", _NEEDS_TFLITE_INT8)
    if calib_inputs is None or len(calib_inputs) == 0:
        raise UsageError("calib_inputs: edgetpu export needs a calibration batch (NCHW, preprocessed) for its "
                         "int8 model")
    path = Path(path)
    if path.suffix.lower() != ".tflite":
        raise UsageError(f"path: an Edge TPU artifact is a .tflite file, got {path.name}")
    with tempfile.TemporaryDirectory(prefix=f".{path.stem}.", dir=path.parent) as td:
        src = Path(td) / "int8.tflite"
        int8 = export_tflite(model, src, check_inputs=check_inputs, model_name=model_name,
                             source_checkpoint_sha256=source_checkpoint_sha256,
                             pruning_plan_sha256=pruning_plan_sha256, precision="int8", calib_inputs=calib_inputs,
                             input_shape=input_shape, tolerance=tolerance)
        stats = compile_edgetpu(src, path, compiler=compiler, min_runtime_version=min_runtime_version,
                                timeout_s=timeout_s)
    notes = [f"the compiled model was not run here: its Edge TPU custom op runs only on an Edge TPU; verification is "
             f"that of the tflite-int8 model it was compiled from (sha256 {int8.sha256})"]
    if stats["ops_on_cpu"]:
        left = ", ".join(f"{r['op']} x{r['count']} ({r['status']})" for r in stats["operators"]
                         if r["status"] != _EDGETPU_MAPPED)
        notes.append(f"{stats['ops_on_cpu']} of {stats['ops_total']} operations run on the CPU, not the Edge "
                     f"TPU: {left}")
    notes += stats.pop("warnings")
    stats.update(source_tflite_sha256=int8.sha256, min_runtime_version=min_runtime_version)
    exporter = dict(int8.exporter, name="litert_torch.convert (int8) + edgetpu_compiler",
                    edgetpu_compiler=stats["compiler_version"])
    return dataclasses.replace(
        int8, file=path.name, sha256=sha256_file(path), files=_files(path), export_format="edgetpu",
        target_runtime="tflite", runtime_options={"delegate": "edgetpu"}, edgetpu=stats, warnings=notes,
        exporter=exporter)


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


# --------------------------------------------------------------------------------------------------- TensorRT
# The agent's tensorrt runtime.options.precision values (agent.runtimes.TRT_PRECISIONS); fp16 first: the default.
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
    get_format("tensorrt").check()
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
                np.savez(f, inputs=_as_numpy(calib_inputs))
            os.replace(tmp, calib)
        except OSError as e:
            _delete([tmp, path])
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


# ---------------------------------------------------------------------------------------------------- registry
Exporter = Callable[..., Manifest]

_PIP_OPENVINO = "pip install 'edgeprune[openvino]'"
_PIP_TFLITE = "pip install 'edgeprune[tflite]'"
_NEEDS_ONNX = (("onnx", "onnx", "pip install onnx"), ("onnxruntime", "onnxruntime", "pip install onnxruntime"))
_NEEDS_OPENVINO = _NEEDS_ONNX + (("openvino", "openvino", _PIP_OPENVINO),)
_NEEDS_TFLITE = (("litert_torch", "litert-torch", _PIP_TFLITE),
                 ("ai_edge_litert.interpreter", "ai-edge-litert", _PIP_TFLITE))
_NEEDS_TFLITE_FP16 = _NEEDS_TFLITE + (("ai_edge_quantizer", "ai-edge-quantizer", _PIP_TFLITE),)
_NEEDS_TFLITE_INT8 = _NEEDS_TFLITE + (("torchao.quantization.pt2e", "torchao", _PIP_TFLITE),)


def _require_modules(fmt: str, needs: Sequence[Tuple[str, str, str]], opts: Optional[Dict[str, Any]] = None) -> None:
    """ToolchainError for the first of ``needs`` (module, distribution, install hint) that cannot be imported.
    ``opts`` (the export options) is unused: every ``requires`` takes it."""
    for module, dist, install in needs:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as e:  # not installed, or a shared library of it missing
            raise ToolchainError(f"{fmt} export needs {dist}: {install} "
                                 f"(import {module}: {type(e).__name__}: {e})") from None


def _require_edgetpu(opts: Optional[Dict[str, Any]] = None) -> None:
    _require_modules("edgetpu", _NEEDS_TFLITE_INT8)
    find_edgetpu_compiler((opts or {}).get("compiler"))


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


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("onnx", "ONNX (opset 17, TorchScript exporter), dynamic batch, NCHW", (".onnx",), ("fp32",),
                 "onnx", ("onnxruntime", "openvino", "tensorrt"), "onnxruntime CPU", export_onnx,
                 functools.partial(_require_modules, "onnx", _NEEDS_ONNX)),
    ExportFormat("torchscript", "TorchScript (torch.jit.trace), any batch, NCHW", (".pt",), ("fp32",),
                 "torchscript", ("torch",), "torch.jit.load CPU", export_torchscript,
                 functools.partial(_require_modules, "torchscript", ())),
    ExportFormat("openvino", "OpenVINO IR (.xml + .bin) from the verified ONNX, FP32 weights", (".xml", ".bin"),
                 ("fp32",), "openvino-ir", ("openvino",), "OpenVINO CPU, INFERENCE_PRECISION_HINT f32",
                 export_openvino, functools.partial(_require_modules, "openvino", _NEEDS_OPENVINO)),
    ExportFormat("openvino-fp16", "OpenVINO IR (.xml + .bin), weights compressed to FP16", (".fp16.xml", ".fp16.bin"),
                 ("fp16",), "openvino-ir", ("openvino",), "OpenVINO CPU, INFERENCE_PRECISION_HINT f32",
                 functools.partial(export_openvino, precision="fp16"),
                 functools.partial(_require_modules, "openvino-fp16", _NEEDS_OPENVINO)),
    ExportFormat("tflite", "TFLite fp32 (litert-torch), NHWC, fixed batch", (".tflite",), ("fp32",), "tflite",
                 ("tflite",), "LiteRT interpreter (ai_edge_litert)", export_tflite,
                 functools.partial(_require_modules, "tflite", _NEEDS_TFLITE)),
    ExportFormat("tflite-fp16", "TFLite with fp16 weights (ai-edge-quantizer float_casting), fp32 activations",
                 (".fp16.tflite",), ("fp16",), "tflite", ("tflite",), "LiteRT interpreter (ai_edge_litert)",
                 functools.partial(export_tflite, precision="fp16"),
                 functools.partial(_require_modules, "tflite-fp16", _NEEDS_TFLITE_FP16)),
    ExportFormat("tflite-int8", "TFLite full-integer int8 (PT2E), calibrated on calib_inputs, int8 I/O",
                 (".int8.tflite",), ("int8",), "tflite", ("tflite",), "LiteRT interpreter (ai_edge_litert)",
                 functools.partial(export_tflite, precision="int8"),
                 functools.partial(_require_modules, "tflite-int8", _NEEDS_TFLITE_INT8), calibration=True),
    ExportFormat("edgetpu", "tflite-int8 compiled for the Coral Edge TPU by edgetpu_compiler (+ its .log)",
                 ("_edgetpu.tflite", "_edgetpu.log"), ("int8",), "tflite", ("tflite",),
                 "the int8 model before compiling (LiteRT); the compiled model needs an Edge TPU", export_edgetpu,
                 _require_edgetpu, calibration=True),
    ExportFormat("tensorrt", "the verified ONNX for TensorRT; the engine is built and cached on the device",
                 (".trt.onnx", ".trt.calib.npz"), TENSORRT_PRECISIONS, "onnx", ("tensorrt",),
                 "onnxruntime CPU (the ONNX); the engine by the agent's accuracy on the device", export_tensorrt,
                 functools.partial(_require_modules, "tensorrt", _NEEDS_ONNX)),
)}
EXPORTERS: Dict[str, Exporter] = {name: f.export for name, f in FORMATS.items()}


def get_format(fmt: str) -> ExportFormat:
    try:
        return FORMATS[fmt]
    except (KeyError, TypeError):
        raise UsageError(f"format: unknown export format {fmt!r}; known: {', '.join(sorted(FORMATS))}") from None


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
    (default: the reference CIFAR models' ImageNet normalisation). The arguments are checked first, then the toolchain (:class:`ToolchainError`), before
    anything is written.
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
        _delete([out / name for name in man.files])
        raise ExportError(f"{target}: cannot write the manifest ({e}); artifact deleted") from e
    return man


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
