"""The ``edgetpu`` format: the verified ``tflite-int8`` model compiled for the Coral Edge TPU by ``edgetpu_compiler``.

Consumed by: the agent's ``tflite`` runtime with ``delegate: edgetpu`` (``libedgetpu.so.1``) on a Coral device.
Toolchain here: the ``tflite-int8`` format's (litert-torch, ai-edge-litert, torchao) plus Coral's Edge TPU Compiler.
Verified here: only the int8 model before compiling (LiteRT, against torch). ``edgetpu_compiler`` is not installed
where this was written: the compiler step is tested with a stand-in script reproducing the compiler's console
output and log format (v15/v16, as documented at https://coral.ai/docs/edgetpu/compiler/); nothing has been
compiled by the real compiler for, or run on, an Edge TPU.
``edgetpu``: the ``tflite-int8`` model, verified, then compiled by Coral's ``edgetpu_compiler`` (x86-64
Debian/Ubuntu only, from Coral's apt repository; found on PATH, or ``EDGETPU_COMPILER``, or ``compiler=``). Its
operation log gives how many operations map to the Edge TPU; that goes into ``Manifest.edgetpu``, and a model with
none mapped is refused. The compiled model's Edge TPU custom op runs only on an Edge TPU, so the check here is that
of the int8 model it was compiled from; the manifest says so in ``warnings``.

Contract: :func:`export_edgetpu` writes ``path`` (``.tflite``) and the compiler's ``.log`` and returns their
manifest (not written), or leaves nothing and raises :class:`~edgeprune.errors.ExportError`;
:func:`find_edgetpu_compiler` raises :class:`~edgeprune.errors.ToolchainError` saying how to install the compiler.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..data import INPUT_SHAPE
from ..errors import ExportError, ToolchainError, UsageError
from ..models import sha256_file
from .base import ExportFormat, Tolerance, file_digests, require_modules
from .manifest import Manifest
from .tflite import NEEDS_TFLITE_INT8, export_tflite

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
    require_modules("edgetpu", NEEDS_TFLITE_INT8)
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
        int8, file=path.name, sha256=sha256_file(path), files=file_digests(path), export_format="edgetpu",
        target_runtime="tflite", runtime_options={"delegate": "edgetpu"}, edgetpu=stats, warnings=notes,
        exporter=exporter)


def _tail(text: str, n: int = 1500) -> str:
    text = text.strip()
    return text if len(text) <= n else "..." + text[-n:]


def requires(opts: Optional[Dict[str, Any]] = None) -> None:
    require_modules("edgetpu", NEEDS_TFLITE_INT8)
    find_edgetpu_compiler((opts or {}).get("compiler"))


FORMATS: Dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("edgetpu", "tflite-int8 compiled for the Coral Edge TPU by edgetpu_compiler (+ its .log)",
                 ("_edgetpu.tflite", "_edgetpu.log"), ("int8",), "tflite", ("tflite",),
                 "the int8 model before compiling (LiteRT); the compiled model needs an Edge TPU", export_edgetpu,
                 requires, calibration=True),
)}
