"""The ``torchscript`` format: ``torch.jit.trace`` of the model, any batch, NCHW, verified by loading it back.

Consumed by: the agent's ``torch`` runtime (``torch.jit.load``, CPU or CUDA). Toolchain here: torch alone.
Verified here: every artifact is loaded back with ``torch.jit.load`` on the CPU and run against torch before it
may ship (ResNet-20 tests). torch 2.9+ deprecates TorchScript (``torch.jit.trace/save/load`` warn); it is still
what torch on the devices loads, so those warnings go into the manifest rather than being raised.

Contract: :func:`export_torchscript` writes ``path`` and returns its manifest (not written), or deletes it and raises
:class:`~edgeprune.errors.ExportError`. :func:`run_on_host` and :func:`check_file` are what
:mod:`edgeprune.exporters.artifacts` uses to run and check a ``torchscript`` file.
"""
from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, UsageError
from ..models import sha256_file
from ..sources import flatten_outputs
from .base import ExportFormat, Tolerance, batched, dist_version, require_modules, torch_outputs, verify_or_delete, \
    warning_lines
from .manifest import Manifest, default_preprocess


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
    ver = verify_or_delete(path, torch_outputs(model, check_inputs), out, tol, "TorchScript",
                           checked_with=f"torch {torch.__version__} torch.jit.load, CPU")
    return Manifest(
        file=path.name, sha256=sha256_file(path), format="torchscript", precision="fp32", input_name="input",
        input_shape=list(input_shape), input_dtype="float32", layout="NCHW", output_name="logits",
        dynamic_batch=True, preprocess=default_preprocess(), model=model_name,
        source_checkpoint_sha256=source_checkpoint_sha256, pruning_plan_sha256=pruning_plan_sha256,
        verification=ver, export_format="torchscript",
        exporter={"name": "torch.jit.trace", "torch": torch.__version__, "check": "torch.jit.load, CPU",
                  "edgeprune": dist_version("edgeprune"), "warnings": warning_lines(caught)})


def run_torchscript(path: Path, x: np.ndarray) -> Tuple[List[np.ndarray], str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.9+ deprecates torch.jit.load; see export_torchscript
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        out = batched(lambda xb: [t.numpy() for t in flatten_outputs(loaded(torch.from_numpy(xb)))], x, None)
    return out, f"torch {torch.__version__} torch.jit.load, CPU"


def run_on_host(path: Path, x: np.ndarray, threads: int = 1,
                manifest: Optional[Manifest] = None) -> List[np.ndarray]:
    """Every output of the TorchScript archive at ``path`` on the NCHW batch ``x`` (``threads`` is unused)."""
    return run_torchscript(path, x)[0]


def check_file(path: Path, manifest: Manifest, where: str, head: bytes) -> None:
    """UsageError unless ``path`` is a zip archive, as every TorchScript file is (nothing is loaded)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        raise UsageError(f"{where}: format: not a TorchScript archive (not a zip file; truncated?)")


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("torchscript", "TorchScript (torch.jit.trace), any batch, NCHW", (".pt",), ("fp32",),
                 "torchscript", ("torch",), "torch.jit.load CPU", export_torchscript,
                 functools.partial(require_modules, "torchscript", ())),
)}
