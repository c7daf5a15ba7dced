"""The manifest: what a device needs to run an exported artifact, and where the artifact came from.

Contract: :class:`Manifest` is the JSON document written beside every artifact (``<tag>.<format>.manifest.json``,
:func:`manifest_path`); :meth:`Manifest.read` / :meth:`Manifest.from_dict` accept versions
:data:`MANIFEST_VERSIONS` and return the current :data:`MANIFEST_VERSION`, raising
:class:`~edgeprune.errors.UsageError` naming the file and the field for anything else; :meth:`Manifest.check_files`
raises :class:`~edgeprune.errors.ExportError` unless every file it lists is present with its sha256.
:func:`find_manifest` finds an artifact's manifest in its folder. Nothing here runs or converts a model; it imports
no toolchain.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..data import MEAN, SCALE, STD
from ..errors import ExportError, UsageError
from ..models import sha256_file

MANIFEST_VERSION = 2
MANIFEST_VERSIONS = (1, 2)  # what Manifest.read accepts; version 1 manifests are filled in as described there


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


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
