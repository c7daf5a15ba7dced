"""Exported artifacts on the host: check that a file is the model its manifest says, run it, compare it with torch.

Contract: :func:`check_artifact` raises :class:`~edgeprune.errors.UsageError` unless a file is a readable model of
its manifest's ``format`` (cheap: nothing is run). :func:`run_artifact_outputs` runs an artifact (given by its
manifest or its file) with the runtime that checks its format here, after checking every file's sha256;
:func:`run_artifact` gives its first output, :func:`agreement` its top-1 agreement with reference logits.

:data:`RUNTIMES` maps a manifest ``format`` (the file format, not the export format) to the module that runs and
checks it, imported by name when such a file is met: each has ``run_on_host(path, x, threads, manifest)`` and
``check_file(path, manifest, where, head)``. A new export format whose files one of these modules already reads
(the usual case) needs nothing here; a new file format needs its line.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from ..errors import ExportError, UsageError
from .base import as_numpy
from .manifest import Manifest, find_manifest

RUNTIMES = {
    "onnx": "edgeprune.exporters.onnx",
    "openvino-ir": "edgeprune.exporters.openvino",
    "tflite": "edgeprune.exporters.tflite",
    "torchscript": "edgeprune.exporters.torchscript",
}


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
    module = RUNTIMES.get(fmt)
    if module is not None:
        importlib.import_module(module).check_file(path, manifest, where, head)


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
    x = as_numpy(inputs)
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
    module = RUNTIMES.get(fmt) if fmt is not None else None
    if module is not None:
        return importlib.import_module(module).run_on_host(art, x, threads, man)
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
    ref = as_numpy(reference_logits)
    ref = ref.reshape(ref.shape[0], -1)
    out = run_artifact(artifact, inputs, threads=threads)
    out = out.reshape(out.shape[0], -1)
    if out.shape != ref.shape:
        raise UsageError(f"reference_logits: shape {ref.shape} differs from the artifact's outputs {out.shape}")
    return float(np.mean(out.argmax(1) == ref.argmax(1)))

