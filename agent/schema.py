"""The one contract between host and device: job specs and reports (JSON, versioned).

Pure Python (3.8+), no third-party imports: the host imports this module too, so both sides share one
definition. Every document carries ``schema_version``; the loaders accept only the versions listed in
``JOB_VERSIONS`` / ``REPORT_VERSIONS`` and refuse anything else, naming the field that is wrong.

Version history
---------------
Job spec:

1 (edgeprune 0.1): first version; an artifact is one file.
2: ``artifact.files``, the artifact's other files (OpenVINO IR's ``.bin`` beside its ``.xml``, a TensorRT int8
   calibration npz, an Edge TPU compiler log), each verified by sha256 before anything is loaded. Version 2 is
   what the host writes; version 1 jobs are still read (as jobs without extra files: a version 1 job may carry
   ``files`` only empty). The version was bumped rather than ``files`` emitted only when non-empty so that an
   older agent refuses every newer job by its ``schema_version`` (one clear line) instead of accepting the
   single-file ones and failing the others on an unknown field.

3: ``eval.shards``, a list of eval shards (``[{"path", "sha256"}, ...]``) processed one at a time, so that an
   eval set larger than the device's memory (10,000 images at 224x224 are 1.5 GB) is scored in bounded memory;
   shards may now hold ``reference_<k>`` arrays (the dense model's outputs) and may lack ``labels`` (see
   :mod:`agent.accuracy`). Version 3 is what the host writes, always with ``eval.shards``; the single-shard form
   ``eval.path`` + ``eval.sha256`` of versions 1 and 2 is still read (and still accepted in version 3), but a
   job gives one form or the other, never both. Bumped because an older agent would refuse ``shards`` as an
   unknown field and, worse, would misread a label-free shard as a broken one: refusing the version is one
   clear line instead.

Report:

1 (edgeprune 0.1): ``accuracy`` is ``{"split", "n", "top1", "top5", "eval_sha256"}``.
2: ``accuracy`` measures fidelity against the dense model's outputs shipped in the shards (label-free) beside
   top-1/top-5, and models with several outputs: ``top1``/``top5`` may be null (no labels), new ``agreement``,
   ``snr_db``, ``max_abs_err``, ``outputs`` (per model output), ``metric`` and ``shards``. Bumped because a
   version-1 reader (an older host) takes ``top1`` as always a number: it must refuse these reports by their
   ``schema_version`` (one clear line), not crash on a null. This host reads both versions (a version-1
   report's accuracy always has top1 and top5).

Job spec (host -> agent), version 3::

    {
      "schema_version": 3,
      "job_id": "demo-r0.50",                 # [A-Za-z0-9._-]+
      "device_id": "local",
      "artifact": {"path": "model.xml",       # relative to the job file's folder (no '..' out of it), or absolute
                   "sha256": "<64 hex>",      # verified before the artifact is loaded
                   "format": "openvino-ir",
                   "files": {"model.bin": "<64 hex>"},   # v2: the artifact's other files, by plain file name
                                              # (no '/', '\\', NUL, leading '.'), in the artifact's folder;
                                              # each verified before the artifact is loaded ({} or absent: none)
                   "input_name": "input", "input_shape": [1, 3, 32, 32],
                   "input_dtype": "float32", "layout": "NCHW"},
      "preprocess": {"scale": 0.00392156862745098,   # uint8 HWC RGB pixels * scale, then (x - mean) / std
                     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
      "runtime": {"name": "onnxruntime", "threads": 1, "options": {}},
      "timing": {"warmup_iters": 10, "warmup_s": 0.5, "min_iters": 100, "min_duration_s": 2.0,
                 "max_iters": 100000, "max_duration_s": 120.0, "batch_size": 1, "seed": 0,
                 "cv_warn": 0.1, "cpu_affinity": [0], "cooldown_s": 0.0, "keep_samples": 20000},
      "power": {"sensor": "model", "sample_hz": 20.0, "idle_w": 5.0, "max_w": 35.0, "options": {}},
      "eval": {"shards": [{"path": "eval-00000.npz", "sha256": "<64 hex>"},   # v3: processed in this order,
                          {"path": "eval-00001.npz", "sha256": "<64 hex>"}],  # one at a time; each verified
                                              # by sha256 before anything is run, paths like artifact.path
               "split": "eval", "batch_size": 100},   # or null: no accuracy
               # versions 1 and 2 (still read): {"path": "eval.npz", "sha256": "<64 hex>", "split", "batch_size"}
      "thermal": {"enabled": true,            # optional section (these are its defaults); null = no thermal
                  "wait_to_cool_c": null,     # °C: before the timed window, wait until the sensor is below this
                  "wait_to_cool_timeout_s": 120.0,   # ... for at most this long (and never past timeout_s)
                  "zone": null},              # sensor to report: a zone type ("cpu-thermal"), "thermal_zone0",
                                              # "apex_0" or "vcgencmd"; null = the CPU zone, else the first found
      "timeout_s": 900.0
    }

Report (agent -> host), version 2: see :class:`Report`. ``status`` is ``"ok"`` or ``"error"``; on error,
``error`` holds ``{"type", "message"}`` and the sections that were measured before the failure are kept.
Its ``accuracy`` (:class:`AccuracyResult`, null without ``eval``)::

    {
      "split": "eval", "n": 10000,            # samples scored, over all shards
      "metric": "top1",                       # what the headline is: "top1" (the shards have labels), else
                                              # "agreement" (references and a logit-like output), else "snr_db"
      "top1": 0.912, "top5": 0.993,           # fractions 0..1 on output 0; null when the shards have no labels
      "agreement": 0.998,                     # top-1 agreement with the references: min over the logit-like
                                              # outputs (shape (N, C), C >= 2); null without references or such outputs
      "snr_db": 41.7,                         # min over outputs of 10 log10(sum ref^2 / sum (out - ref)^2), sums
                                              # over every sample of every shard; 300.0 when the error is exactly
                                              # zero (capped to [-300, 300]); null without references
      "max_abs_err": 0.0123,                  # max over outputs and samples of |out - ref|; null without references
      "outputs": [{"index": 0, "shape": [1000],   # every model output, in the model's order; shape without batch
                   "agreement": 0.998, "snr_db": 41.7, "max_abs_err": 0.0123},   # each null as above
                  {"index": 1, "shape": [4], "agreement": null, "snr_db": 55.0, "max_abs_err": 0.001}],
      "eval_sha256": "<64 hex>",              # the shard's sha256; with several, sha256 of their hex digests
                                              # joined by "," in job order
      "shards": ["<64 hex>", ...]             # every shard's sha256, in job order
    }
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

JOB_VERSIONS = (1, 2, 3)
REPORT_VERSIONS = (1, 2)
JOB_SCHEMA_VERSION = JOB_VERSIONS[-1]
REPORT_SCHEMA_VERSION = REPORT_VERSIONS[-1]

ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FILE_NAME_MAX = 255


def file_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` is not a plain file name (one that stays in its folder), or None when it is one.

    Plain: a non-empty string of at most 255 characters, without '/', '\\' or NUL, not starting with '.' (so
    neither '.' nor '..', nor a hidden file)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty file name"
    if "/" in name or "\\" in name:
        return "must be a plain file name, without folders ('/' or '\\')"
    if "\0" in name:
        return "must not contain NUL"
    if name.startswith("."):
        return "must not start with '.' (no '.', '..' or hidden files)"
    if len(name) > FILE_NAME_MAX:
        return "is longer than %d characters" % FILE_NAME_MAX
    return None


def base_name(path: str) -> str:
    """The last component of a job path, '/' or '\\' separated (the host and the agent may differ in OS)."""
    return re.split(r"[\\/]", path)[-1]


class SchemaError(ValueError):
    """A job spec or report does not match the schema. The message names the field."""


# --------------------------------------------------------------------------------------------- job spec
@dataclass
class ArtifactSpec:
    path: str
    sha256: str
    format: str = "onnx"
    input_name: str = "input"
    input_shape: List[int] = field(default_factory=lambda: [1, 3, 32, 32])
    input_dtype: str = "float32"
    layout: str = "NCHW"
    files: Dict[str, str] = field(default_factory=dict)   # v2: other files of the artifact, name -> sha256


@dataclass
class PreprocessSpec:
    scale: float = 1.0 / 255.0
    mean: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    std: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])


@dataclass
class RuntimeSpec:
    name: str = "onnxruntime"
    threads: int = 1
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TimingSpec:
    warmup_iters: int = 10
    warmup_s: float = 0.5
    min_iters: int = 100
    min_duration_s: float = 2.0
    max_iters: int = 100000
    max_duration_s: float = 120.0
    batch_size: int = 1
    seed: int = 0
    cv_warn: float = 0.10
    cpu_affinity: Optional[List[int]] = None
    cooldown_s: float = 0.0
    keep_samples: int = 20000


@dataclass
class PowerSpec:
    sensor: str = "model"
    sample_hz: float = 20.0
    idle_w: Optional[float] = None
    max_w: Optional[float] = None
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardSpec:
    path: str
    sha256: str


@dataclass
class EvalSpec:
    path: Optional[str] = None        # v1/v2 (still read): one shard; v3 writes ``shards``
    sha256: Optional[str] = None
    split: str = "eval"
    batch_size: int = 100
    shards: Optional[List[ShardSpec]] = None   # v3: processed in order, one at a time

    def shard_list(self) -> List[ShardSpec]:
        """The shards to score, in order, whichever form the job used (``shards``, or ``path`` + ``sha256``)."""
        if self.shards is not None:
            return list(self.shards)
        return [ShardSpec(path=str(self.path), sha256=str(self.sha256))]

    def shard_fields(self) -> List[str]:
        """The job field naming each of :meth:`shard_list`'s paths (``eval.shards[1].path`` or ``eval.path``)."""
        if self.shards is not None:
            return ["eval.shards[%d].path" % i for i in range(len(self.shards))]
        return ["eval.path"]


@dataclass
class ThermalSpec:
    enabled: bool = True
    wait_to_cool_c: Optional[float] = None
    wait_to_cool_timeout_s: float = 120.0
    zone: Optional[str] = None


@dataclass
class JobSpec:
    job_id: str
    artifact: ArtifactSpec
    device_id: str = "local"
    preprocess: PreprocessSpec = field(default_factory=PreprocessSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    timing: TimingSpec = field(default_factory=TimingSpec)
    power: Optional[PowerSpec] = field(default_factory=PowerSpec)
    eval: Optional[EvalSpec] = None
    thermal: Optional[ThermalSpec] = field(default_factory=ThermalSpec)
    timeout_s: float = 900.0
    schema_version: int = JOB_SCHEMA_VERSION

    def validate(self) -> "JobSpec":
        _check(ID_RE.match(self.job_id) is not None, "job_id", "must match [A-Za-z0-9._-]{1,128}")
        _check(ID_RE.match(self.device_id) is not None, "device_id", "must match [A-Za-z0-9._-]{1,128}")
        _check(SHA256_RE.match(self.artifact.sha256) is not None, "artifact.sha256", "must be 64 lowercase hex digits")
        _check(isinstance(self.artifact.files, dict), "artifact.files", "must be an object")
        _check(self.schema_version >= 2 or not self.artifact.files, "artifact.files",
               "needs schema_version 2 (this job says %r)" % (self.schema_version,))
        primary = base_name(self.artifact.path)
        for name in sorted(self.artifact.files):
            problem = file_name_problem(name)
            _check(problem is None, "artifact.files", "%r %s" % (name, problem))
            _check(name != primary, "artifact.files.%s" % name,
                   "is the artifact itself (artifact.path); list only its other files")
            _check(SHA256_RE.match(str(self.artifact.files[name])) is not None, "artifact.files.%s" % name,
                   "must be 64 lowercase hex digits")
        _check(len(self.artifact.input_shape) >= 1 and all(d > 0 for d in self.artifact.input_shape),
               "artifact.input_shape", "must be a list of positive integers")
        _check(self.artifact.layout in ("NCHW", "NHWC"), "artifact.layout", "must be NCHW or NHWC")
        _check(len(self.preprocess.mean) == len(self.preprocess.std), "preprocess.std",
               "must have as many entries as preprocess.mean")
        _check(all(s > 0 for s in self.preprocess.std), "preprocess.std", "must be positive")
        _check(self.runtime.threads >= 0, "runtime.threads", "must be >= 0 (0 = runtime default)")
        t = self.timing
        for name in ("warmup_iters", "min_iters", "max_iters", "batch_size", "keep_samples"):
            _check(getattr(t, name) >= (0 if name in ("warmup_iters", "keep_samples") else 1),
                   "timing." + name, "is out of range")
        for name in ("warmup_s", "min_duration_s", "max_duration_s", "cooldown_s", "cv_warn"):
            _check(getattr(t, name) >= 0, "timing." + name, "must be >= 0")
        _check(t.max_iters >= t.min_iters, "timing.max_iters", "must be >= timing.min_iters")
        _check(t.max_duration_s >= t.min_duration_s, "timing.max_duration_s", "must be >= timing.min_duration_s")
        if t.cpu_affinity is not None:
            _check(len(t.cpu_affinity) > 0 and all(c >= 0 for c in t.cpu_affinity), "timing.cpu_affinity",
                   "must be null or a non-empty list of CPU numbers")
        if self.power is not None:
            _check(self.power.sample_hz > 0, "power.sample_hz", "must be > 0")
        if self.eval is not None:
            self._validate_eval(self.eval)
        if self.thermal is not None:
            _check(self.thermal.wait_to_cool_timeout_s >= 0, "thermal.wait_to_cool_timeout_s", "must be >= 0")
            _check(self.thermal.zone is None or self.thermal.zone != "", "thermal.zone",
                   "must be null or a sensor name")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        return self

    def _validate_eval(self, ev: "EvalSpec") -> None:
        single = ev.path is not None or ev.sha256 is not None
        if ev.shards is not None:
            _check(self.schema_version >= 3, "eval.shards",
                   "needs schema_version 3 (this job says %r)" % (self.schema_version,))
            _check(not single, "eval.path",
                   "give either eval.shards or eval.path and eval.sha256 (one shard), not both")
            _check(len(ev.shards) >= 1, "eval.shards", "must list at least one shard (or make eval null)")
            for i, shard in enumerate(ev.shards):
                _check(shard.path != "", "eval.shards[%d].path" % i, "must be a path")
                _check(SHA256_RE.match(shard.sha256) is not None, "eval.shards[%d].sha256" % i,
                       "must be 64 lowercase hex digits")
        else:
            _check(ev.path is not None and ev.path != "", "eval.path",
                   "is required (or eval.shards, job schema_version 3)")
            _check(ev.sha256 is not None, "eval.sha256", "is required")
            _check(SHA256_RE.match(str(ev.sha256)) is not None, "eval.sha256", "must be 64 lowercase hex digits")
        _check(ev.batch_size >= 1, "eval.batch_size", "must be >= 1")


# ----------------------------------------------------------------------------------------------- report
@dataclass
class Identity:
    device_id: str
    hostname: str
    os: str
    kernel: str
    machine: str
    cpu_model: str
    cpu_count: int
    python: str
    agent_version: str
    runtime: str
    runtime_version: str
    artifact_sha256: str
    serial: Optional[str] = None
    firmware: Dict[str, str] = field(default_factory=dict)  # e.g. {"l4t": "36.3.0", "jetpack": "6.0"}
    # board_model, l4t; emulation (agent.emulation.detect: emulated, by, evidence, cpu: timings under emulation are
    # the emulator's); setup (what `edgeprune devices setup` installed into this venv: requirements, versions)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LatencyStats:
    mean: float
    median: float
    p90: float
    p99: float
    min: float
    max: float
    std: float
    cv: float


@dataclass
class TimingResult:
    protocol: Dict[str, Any]          # the TimingSpec as applied (threads, affinity actually set, ...)
    load_time_ms: float
    first_inference_ms: float
    warmup_iters_done: int
    iterations: int
    duration_s: float
    batch_size: int
    latency_ms: LatencyStats
    throughput_ips: float             # inferences (images) per second
    samples_ms: List[float] = field(default_factory=list)


@dataclass
class PowerResult:
    source: str                       # sensor name, or "model" when estimated
    modelled: bool
    sample_hz: float
    samples: int
    mean_w: float
    energy_mj_per_inference: float
    overhead_pct: Optional[float] = None
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ThermalResult:
    source: str
    start_c: Optional[float] = None
    end_c: Optional[float] = None
    max_c: Optional[float] = None
    throttled: bool = False
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputFidelity:
    """One model output against its reference (report v2); the metrics are null without references."""

    index: int
    shape: List[int]                  # without the batch dimension
    agreement: Optional[float] = None  # logit-like outputs only: shape (N, C), C >= 2
    snr_db: Optional[float] = None
    max_abs_err: Optional[float] = None


@dataclass
class AccuracyResult:
    split: str
    n: int
    top1: Optional[float] = None      # null (v2) when the shards have no labels
    top5: Optional[float] = None
    eval_sha256: str = ""
    agreement: Optional[float] = None  # v2: see the module docstring
    snr_db: Optional[float] = None
    max_abs_err: Optional[float] = None
    outputs: List[OutputFidelity] = field(default_factory=list)
    metric: str = "top1"
    shards: List[str] = field(default_factory=list)


@dataclass
class ErrorInfo:
    type: str
    message: str


@dataclass
class Report:
    job_id: str
    status: str                       # "ok" | "error"
    identity: Optional[Identity] = None
    timing: Optional[TimingResult] = None
    peak_rss_mb: Optional[float] = None
    power: Optional[PowerResult] = None
    thermal: Optional[ThermalResult] = None
    accuracy: Optional[AccuracyResult] = None
    warnings: List[str] = field(default_factory=list)
    error: Optional[ErrorInfo] = None
    started_at: str = ""
    finished_at: str = ""
    schema_version: int = REPORT_SCHEMA_VERSION

    def validate(self) -> "Report":
        _check(self.status in ("ok", "error"), "status", "must be 'ok' or 'error'")
        _check(self.status == "ok" or self.error is not None, "error", "is required when status is 'error'")
        acc = self.accuracy
        if acc is not None:
            if self.schema_version < 2:
                _check(acc.top1 is not None, "accuracy.top1", "is required in a version 1 report")
                _check(acc.top5 is not None, "accuracy.top5", "is required in a version 1 report")
            _check(acc.metric in METRICS, "accuracy.metric", "must be one of %s" % ", ".join(METRICS))
            for name in ("top1", "top5", "agreement"):
                value = getattr(acc, name)
                _check(value is None or 0.0 <= value <= 1.0, "accuracy." + name, "must be a fraction in 0..1")
        return self


METRICS = ("top1", "agreement", "snr_db")


# ---------------------------------------------------------------------------------------------- loaders
def _check(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise SchemaError("%s: %s" % (where, what))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp) if sys.version_info >= (3, 8) else None
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if origin in (list, List):
        _check(isinstance(value, list), where, "must be a list")
        return [_convert(v, args[0], "%s[%d]" % (where, i)) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        _check(isinstance(value, dict), where, "must be an object")
        return {str(k): _convert(v, args[1], "%s.%s" % (where, k)) for k, v in value.items()}
    if tp is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), where, "must be a number")
        return float(value)
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), where, "must be an integer")
        return value
    if tp is bool:
        _check(isinstance(value, bool), where, "must be true or false")
        return value
    if tp is str:
        _check(isinstance(value, str), where, "must be a string")
        return value
    raise SchemaError("%s: unsupported type %s" % (where, _type_name(tp)))  # pragma: no cover


def _from_dict(cls: Any, data: Any, where: str = "") -> Any:
    prefix = where + "." if where else ""
    _check(isinstance(data, dict), where or "document", "must be a JSON object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    _check(not unknown, prefix + (unknown[0] if unknown else ""), "unknown field")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            _check(not required, prefix + name, "is required")
            continue
        kwargs[name] = _convert(data[name], hints[name], prefix + name)
    return cls(**kwargs)


def _check_version(data: Any, known: tuple, what: str) -> None:
    _check(isinstance(data, dict), what, "must be a JSON object")
    v = data.get("schema_version")
    _check(v is not None, "schema_version", "is missing (this %s predates the versioned schema?)" % what)
    _check(v in known, "schema_version",
           "%s version %r is not supported by this edgeprune (knows %s)" % (what, v, ", ".join(map(str, known))))


def job_from_dict(data: Any) -> JobSpec:
    _check_version(data, JOB_VERSIONS, "job spec")
    return _from_dict(JobSpec, data).validate()


def report_from_dict(data: Any) -> Report:
    _check_version(data, REPORT_VERSIONS, "report")
    return _from_dict(Report, data).validate()


def to_dict(obj: Any) -> Dict[str, Any]:
    return dataclasses.asdict(obj)


def dumps(obj: Any) -> str:
    return json.dumps(to_dict(obj), indent=1, sort_keys=True, allow_nan=False)


def _loads(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:
        raise SchemaError("%s is not valid JSON: %s" % (what, e)) from None


def loads_job(text: str) -> JobSpec:
    return job_from_dict(_loads(text, "job spec"))


def loads_report(text: str) -> Report:
    return report_from_dict(_loads(text, "report"))
