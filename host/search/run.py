"""``edgeprune search``: prune until every device of a fleet meets its own targets, measured on the devices.

One search runs one algorithm (:mod:`host.search.algos`: ``bisect`` or ``netadapt``) per device, side by side:
each device gets its own candidates, pruned with its own channel alignment (``round_to``) and exported in its
runtime's format and precision (:func:`profile_for`); devices with the same alignment and format share the built
artifacts. Device evaluations of one round run on all devices in parallel (:func:`host.fleet.runner.run_on_device`, under
each device's lease); host work (pruning, recovery, export) runs before them, so it never competes with a
measurement on this machine.

Run folder (``--out DIR``, default ``results/search/<run id>``)::

    search.json               run id, options, devices, targets: what --resume continues with
    evaluations.jsonl         one line per completed evaluation, appended and fsync'ed as each completes:
                              device evaluations (candidate, key, plan and artifact sha256, the agent's report)
                              and host evaluations (netadapt proposals: top-1 on the calib split)
    summary.json, summary.csv one row per device: verdict, targets, achieved, accuracy drop, evaluations
    <device>/chosen/          the chosen artifact (all its files), its manifest, report.json, candidate.json
    <device>/closest/         instead of chosen/ when the targets cannot be met: the closest candidate
    <device>/pareto.json|csv  every candidate evaluated on the device, with the latency-vs-accuracy and
                              energy-vs-accuracy Pareto fronts marked
    <device>/result.json      the verdict, why the search stopped, the bounds, the counts
    work/                     built artifacts (work/artifacts/<key>), agent job folders, the eval shards
                              (work/eval/, with the dense model's outputs: see host.search.data)

The model and data are any :mod:`edgeprune.sources` / :mod:`edgeprune.workload` accept (the options' model-source
and data fields, stored with the run); :mod:`host.search.data` opens them once per run. On unlabelled eval data the
accuracy targets are label-free (``agreement``, ``snr_db`` against the dense model, measured by the agent), and
candidates are ranked, and host-side proposals and sensitivities scored, by agreement instead of top-1.

The cache folder (``results/search/cache`` unless given) holds what outlives a run: the per-model sensitivity
table and each device's layer-latency table (netadapt).

A candidate's *key* is the sha256 of everything that determines its artifact: the model and checkpoint, the
channels kept per group (which, with the importance criterion, alignment and ``min_channels``, fix the pruning plan
exactly), the recovery options and the export format. ``--resume RUN_ID`` re-reads ``search.json``, replays the
deterministic algorithms and serves every evaluation already in ``evaluations.jsonl`` from there: nothing completed
is built or measured again (an artifact built but not measured is reused when its files still match its manifest,
and an interrupted fine-tune resumes from its checkpoint).

This module returns plain data and reports progress through a callback; the CLI does the printing.
"""
from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import math
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple

from agent import schema
from edgeprune.errors import DeviceError, EdgepruneError, ExportError, PruneError, UsageError
from host.fleet.devices import DeviceConfig
from host.search.algos import (AlgoOptions, Candidate, DeviceContext, DeviceEval, Group, HostEval, Layer,
                               LayerConfig, LayerLatency, Measurement, ModelSpace, get_algorithm)
from host.fleet.targets import ACCURACY_METRICS, Bounds, TargetSet, describe, impossible_reason, metrics_from_report
from host.files import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.workload import Workload
    from host.results.store import RunRecorder

Events = Callable[[str, str, str], None]    # (kind, device id or "", message)

RUN_FILE = "search.json"
EVALUATIONS = "evaluations.jsonl"
RUN_VERSION = 1
RECORD_VERSION = 1
WORK = "work"
RESERVED_IDS = {WORK, ".", ".."}
DEFAULT_ROOT = Path("results") / "search"
ROW_METRICS = ["latency_p50_ms", "latency_p90_ms", "throughput_ips", "power_w", "energy_mj", "memory_mb", "top1",
               "top5", "agreement", "snr_db"]


# ------------------------------------------------------------------------------------------ options

@dataclass
class RecoveryOptions:
    """BatchNorm recalibration on the calib split, then a bounded fine-tune on the finetune split."""

    recalibrate: bool = True
    finetune_epochs: int = 1                    # 0: no fine-tune
    finetune_per_class: Optional[int] = 500     # finetune-split images per class (None: all)
    finetune_seconds: Optional[float] = None    # wall-time cap (makes the result depend on the machine's speed)
    lr: float = 0.01
    batch_size: int = 128
    distill: float = 0.0                        # weight of distillation from the dense model

    def validate(self, what: str) -> "RecoveryOptions":
        if self.finetune_epochs < 0:
            raise UsageError(f"--{what}-epochs: must be >= 0, got {self.finetune_epochs}")
        if self.finetune_per_class is not None and self.finetune_per_class < 1:
            raise UsageError(f"--{what}-per-class: must be >= 1, got {self.finetune_per_class}")
        if self.finetune_seconds is not None and not self.finetune_seconds > 0:
            raise UsageError(f"--{what}-seconds: must be > 0, got {self.finetune_seconds}")
        if not self.lr > 0 or self.batch_size < 1 or not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"{what}: lr must be > 0, batch_size >= 1, distill in [0, 1]")
        return self


@dataclass
class SearchOptions:
    model: str
    algo: str = "bisect"
    max_evals: int = 8                          # device evaluations per device, the dense one included
    importance: str = "l1"
    min_channels: int = 1
    prune_residual: bool = False
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)   # every measured candidate
    short_recovery: RecoveryOptions = field(default_factory=lambda: RecoveryOptions(finetune_per_class=100))
    eval_per_class: Optional[int] = 100         # eval split the agent scores (100: the shipped 1,000 images)
    sensitivity_ratio: float = 0.5              # sensitivity measured with each group alone at this ratio
    sensitivity_per_class: int = 100            # calib images per class for it
    quick: bool = False                         # short timing windows on the device
    lut_seconds: float = 0.5                    # timing window per layer configuration (netadapt's table)
    seed: int = 0
    lease_wait_s: float = 300.0
    cache_dir: Optional[str] = None             # default results/search/cache
    algo_options: AlgoOptions = field(default_factory=AlgoOptions)
    # model source (edgeprune.sources) and data (edgeprune.workload): see host.search.data
    model_args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    trust_pickle: bool = False
    input_shape: Optional[Tuple[int, ...]] = None
    ignore_layers: Tuple[str, ...] = ()
    data: Optional[str] = None                  # None: CIFAR-10 for the reference models
    calib_data: Optional[str] = None
    finetune_data: Optional[str] = None
    resize: Optional[str] = None
    center_crop: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None

    def validate(self) -> "SearchOptions":
        from edgeprune import prune

        get_algorithm(self.algo)
        if self.max_evals < 1:
            raise UsageError(f"--max-evals: must be >= 1, got {self.max_evals}")
        if self.importance not in prune.IMPORTANCE:
            raise UsageError(f"--importance: unknown criterion {self.importance!r}; known: "
                             f"{', '.join(sorted(prune.IMPORTANCE))}")
        if self.importance == "random":
            raise UsageError("--importance: 'random' makes a candidate's plan differ from one build to the next; "
                             "a search needs a deterministic criterion")
        if self.min_channels < 1:
            raise UsageError(f"--min-channels: must be >= 1, got {self.min_channels}")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise UsageError("--eval-per-class: must be >= 1")
        if not 0.0 < self.sensitivity_ratio < 1.0 or self.sensitivity_per_class < 1:
            raise UsageError("--sensitivity-ratio: must be in (0, 1), and its calib images per class >= 1")
        if not self.lut_seconds > 0:
            raise UsageError("--lut-seconds: must be > 0")
        self.recovery.validate("finetune")
        self.short_recovery.validate("short-finetune")
        self.algo_options.validate()
        return self

    def recovery_for(self, level: str) -> Optional[RecoveryOptions]:
        return {"none": None, "short": self.short_recovery, "full": self.recovery}[level]

    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else DEFAULT_ROOT / "cache"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "SearchOptions":
        def build(kind: Any, raw: Any, path: str) -> Any:
            if not isinstance(raw, Mapping):
                raise UsageError(f"{where}: {path}: expected an object")
            known = {f.name: f for f in fields(kind)}
            unknown = sorted(set(raw) - set(known))
            if unknown:
                raise UsageError(f"{where}: {path}.{unknown[0]}: unknown option (written by another edgeprune?)")
            kw = dict(raw)
            if kind is SearchOptions:
                kw["recovery"] = build(RecoveryOptions, raw.get("recovery", {}), f"{path}.recovery")
                kw["short_recovery"] = build(RecoveryOptions, raw.get("short_recovery", {}), f"{path}.short_recovery")
                kw["algo_options"] = build(AlgoOptions, raw.get("algo_options", {}), f"{path}.algo_options")
            if kind is AlgoOptions and "netadapt_levels" in kw:
                kw["netadapt_levels"] = tuple(kw["netadapt_levels"])
            if kind is SearchOptions:
                for name in ("input_shape", "ignore_layers"):
                    if kw.get(name) is not None:
                        kw[name] = tuple(kw[name])
            return kind(**kw)

        return build(cls, d, "options")


# ------------------------------------------------------------------------------------------ device profiles

@dataclass(frozen=True)
class Profile:
    """What a device's artifacts depend on: channel alignment and export format (and its options)."""

    round_to: int
    fmt: str
    export_options: Tuple[Tuple[str, Any], ...] = ()


def profile_for(dev: DeviceConfig) -> Profile:
    """The export format and precision a device's runtime runs: its config's first precision, or the precision
    its runtime options fix (tensorrt), or the Edge TPU delegate."""
    rt = dev.runtime.name
    opts = dev.runtime.options
    prec = str(opts.get("precision") or (dev.precisions[0] if dev.precisions else "fp32"))
    table: Dict[str, Dict[str, str]] = {
        "onnxruntime": {"fp32": "onnx"}, "torch": {"fp32": "torchscript"},
        "openvino": {"fp32": "openvino", "fp16": "openvino-fp16"},
        "tflite": {"fp32": "tflite", "fp16": "tflite-fp16", "int8": "tflite-int8"},
    }
    if rt == "tflite" and opts.get("delegate") == "edgetpu":
        return Profile(dev.round_to, "edgetpu")
    if rt == "tensorrt":
        return Profile(dev.round_to, "tensorrt", (("precision", prec),))
    fmt = table.get(rt, {}).get(prec)
    if fmt is None:
        raise UsageError(f"{dev.source or dev.id}: runtime {rt} with precision {prec}: no export format for it "
                         f"(known runtimes: {', '.join(sorted(table))}, tensorrt)")
    return Profile(dev.round_to, fmt)


def candidate_key(space: ModelSpace, opts: SearchOptions, profile: Profile, cand: Candidate,
                  kind: str = "device") -> str:
    """sha256 of what determines the candidate's artifact (device evaluations) or its host top-1 (``host``)."""
    rec = opts.recovery_for(cand.recovery)
    doc: Dict[str, Any] = {
        "v": 1, "kind": kind, "model": space.model, "checkpoint": space.checkpoint_sha256,
        "importance": opts.importance, "min_channels": opts.min_channels, "prune_residual": opts.prune_residual,
        "round_to": profile.round_to if cand.kept else None, "kept": dict(cand.kept),
        "recovery": asdict(rec) if rec is not None and cand.kept else None, "seed": opts.seed,
    }
    from host.search.data import source_key

    src = source_key(opts)
    if src:   # the user's model source and data (absent for the reference models: their keys are unchanged)
        doc["source"] = src
    if kind == "device":
        doc.update(format=profile.fmt, export_options=dict(profile.export_options))
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------------ the store

class Store:
    """``evaluations.jsonl``: append-only, one JSON object per line, each line written whole and fsync'ed.

    A torn last line (the process died inside a write) is cut off when the store is opened."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._index: Dict[Tuple[str, str, str], Dict[str, Any]] = {}
        self.records: List[Dict[str, Any]] = []
        if self.path.exists():
            raw = self.path.read_bytes()
            good = raw[: raw.rfind(b"\n") + 1]
            if len(good) != len(raw):
                with open(self.path, "r+b") as f:
                    f.truncate(len(good))
            for n, line in enumerate(good.decode().splitlines(), 1):
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise UsageError(f"{self.path}:{n}: not a JSON line (edited by hand?)") from None
                self._add(rec)

    @staticmethod
    def _ident(rec: Mapping[str, Any]) -> Tuple[str, str, str]:
        return str(rec.get("kind")), str(rec.get("device", "")), str(rec.get("key"))

    def _add(self, rec: Dict[str, Any]) -> None:
        self._index[self._ident(rec)] = rec
        self.records.append(rec)

    def get(self, kind: str, device: str, key: str) -> Optional[Dict[str, Any]]:
        with self._lock:
            return self._index.get((kind, device, key))

    def put(self, rec: Dict[str, Any]) -> None:
        line = (json.dumps(rec, sort_keys=True, allow_nan=False) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._add(rec)

    def count(self, kind: str, device: Optional[str] = None) -> int:
        with self._lock:
            return sum(1 for k in self._index if k[0] == kind and (device is None or k[1] == device))


# ------------------------------------------------------------------------------------------ evaluators

@dataclass
class Request:
    device: DeviceConfig
    profile: Profile
    candidate: Candidate
    key: str


DeviceDone = Callable[[Request, Measurement, Dict[str, Any]], None]
LayerDone = Callable[[str, str, float, Dict[str, Any]], None]   # device id, config key, ms, identity


class Evaluator(Protocol):
    """Does the work the algorithms ask for; the driver (:class:`Search`) persists and caches the results."""

    def measure(self, requests: Sequence[Request], done: DeviceDone) -> None:
        """Build and measure every request, on its devices in parallel; ``done`` (thread-safe) is called as
        each completes, with extra fields for its record (the report, the artifact's files)."""

    def host_top1(self, profile: Profile, candidate: Candidate) -> float:
        """Top-1 of the candidate with its recovery, in torch on the host, on the calib split."""

    def layer_latency(self, requests: Sequence[Tuple[DeviceConfig, Profile, List[LayerConfig]]],
                      done: LayerDone) -> Dict[str, Optional[str]]:
        """Time each layer configuration alone on its device; ``done`` per configuration. Returns an error
        message (or None) per device id."""


# ------------------------------------------------------------------------------------------ results

@dataclass
class DeviceResult:
    device_id: str
    verdict: str                      # "met" | "infeasible" | "error"
    reason: str
    targets: str
    bounds: Optional[Dict[str, Any]]
    chosen: Optional[Dict[str, Any]]  # the chosen row (met), or None
    closest: Optional[Dict[str, Any]]  # infeasible: the closest candidate's row
    device_evals: int
    new_device_evals: int             # measured in this process (not served from the store)
    host_evals: int
    lut_jobs: int
    rows: List[Dict[str, Any]]
    folder: Optional[str] = None      # chosen/ or closest/, relative to the run folder
    round_to: int = 1
    accuracy_metric: str = "top1"     # what candidates were ranked by: top1, agreement (unlabelled data) or snr_db


@dataclass
class SearchResult:
    run_id: str
    out: Path
    algo: str
    devices: List[DeviceResult]
    seconds: float

    @property
    def all_met(self) -> bool:
        return all(d.verdict == "met" for d in self.devices)


# ------------------------------------------------------------------------------------------ the driver

@dataclass
class _Dev:
    dev: DeviceConfig
    profile: Profile
    targets: TargetSet
    ctx: DeviceContext
    gen: Any = None
    pending: Any = None
    reason: str = ""
    done: bool = False
    records: List[Dict[str, Any]] = field(default_factory=list)
    new_evals: int = 0
    host_evals: int = 0
    lut_jobs: int = 0
    failed: bool = False              # a device evaluation or its layer table failed


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class Search:
    """One search run: its folder, store, devices and algorithm; :meth:`run` drives it to the end."""

    def __init__(self, out: Path, run_id: str, opts: SearchOptions, devices: List[DeviceConfig],
                 targets: Mapping[str, TargetSet], space: ModelSpace, evaluator: Evaluator,
                 events: Optional[Events] = None, recorder: Optional["RunRecorder"] = None) -> None:
        self.out, self.run_id, self.opts = Path(out), run_id, opts
        self.recorder = recorder
        self.devices, self.targets, self.space, self.evaluator = devices, dict(targets), space, evaluator
        self.emit = events or (lambda *a: None)
        self.store = Store(self.out / EVALUATIONS)
        self._lut_lock = threading.Lock()

    # -- the results store (the run folder's evaluations.jsonl stays the search's own record for --resume)
    def _record(self, rec: Mapping[str, Any]) -> None:
        if self.recorder is None or rec.get("kind") != "device":
            return
        cand = rec.get("candidate") or {}
        manifest = None
        if rec.get("artifact_dir") and rec.get("manifest"):
            try:
                manifest = json.loads((self.out / rec["artifact_dir"] / rec["manifest"]).read_text())
            except (OSError, ValueError):
                manifest = None
        label = "dense" if not cand.get("kept") else f"ratio {float(cand.get('ratio') or 0):.3f}"
        if cand.get("kept") and cand.get("recovery"):
            label += f" ({cand['recovery']} recovery)"
        mid = None
        if rec.get("report") is not None:
            mid = self.recorder.measurement(
                f"{rec['device']}/{rec['key']}", device_id=rec["device"], report=rec["report"], job=rec.get("job"),
                label=label, model=self.space.model, manifest=manifest,
                extra={"ratio": cand.get("ratio"), "recovery": cand.get("recovery"), "note": cand.get("note"),
                       "macs": rec.get("macs"), "params": rec.get("params"), "plan_sha256": rec.get("plan_sha256"),
                       "candidate_key": rec["key"]})
        slim = {k: v for k, v in rec.items() if k not in ("report", "job", "plan")}
        self.recorder.evaluation(rec["device"], rec["key"], slim, algo=self.opts.algo, ratio=cand.get("ratio"),
                                 recovery=cand.get("recovery"), ok=True, artifact_sha256=rec.get("artifact_sha256"),
                                 measurement_id=mid)

    # -- driving
    def run(self) -> SearchResult:
        t0 = time.monotonic()
        if self.recorder is not None:
            for dev in self.devices:
                self.recorder.device(dev)
            for rec in self.store.records:   # a resumed run: what the killed process may not have recorded
                self._record(rec)
        algo = get_algorithm(self.opts.algo)
        devs: List[_Dev] = []
        for dev in self.devices:
            prof = profile_for(dev)
            ctx = DeviceContext(dev.id, self.space, prof.round_to, self.targets[dev.id], self.opts.max_evals,
                                self.opts.algo_options, lambda b, d=dev: impossible_reason(d, b))
            devs.append(_Dev(dev, prof, self.targets[dev.id], ctx))
        for d in devs:
            d.gen = algo.run(d.ctx)
            self._advance(d, None, first=True)
        while True:
            active = [d for d in devs if not d.done]
            if not active:
                break
            for d in active:
                if isinstance(d.pending, HostEval):
                    self._host(d)
            luts = [d for d in active if not d.done and isinstance(d.pending, LayerLatency)]
            if luts:
                self._luts(luts)
            evs = [d for d in active if not d.done and isinstance(d.pending, DeviceEval)]
            if evs:
                self._device_evals(evs)
            for d in active:
                if not d.done and not isinstance(d.pending, (HostEval, LayerLatency, DeviceEval)):
                    raise TypeError(f"{self.opts.algo} yielded {d.pending!r}: not a work item")
        results = [self._conclude(d) for d in devs]
        res = SearchResult(self.run_id, self.out, self.opts.algo, results, time.monotonic() - t0)
        self._write_outputs(res)
        return res

    def _advance(self, d: _Dev, value: Any, first: bool = False) -> None:
        try:
            d.pending = next(d.gen) if first else d.gen.send(value)
        except StopIteration as e:
            d.done, d.reason, d.pending = True, str(e.value or ""), None
            self.emit("verdict", d.dev.id, d.reason)

    def _stop(self, d: _Dev, reason: str) -> None:
        d.gen.close()
        d.done, d.reason, d.pending = True, reason, None
        self.emit("verdict", d.dev.id, reason)

    # -- host evaluations (netadapt proposals)
    def _host(self, d: _Dev) -> None:
        accs: List[float] = []
        work: HostEval = d.pending
        for i, cand in enumerate(work.candidates, 1):
            key = candidate_key(self.space, self.opts, d.profile, cand, kind="host")
            rec = self.store.get("host", "", key)
            if rec is None:
                metric = getattr(self.evaluator, "host_metric", "top1")
                self.emit("stage", d.dev.id, f"proposal {i}/{len(work.candidates)}: {cand.note or 'candidate'} "
                                             f"(short fine-tune, {metric} on the host)")
                top1 = float(self.evaluator.host_top1(d.profile, cand))
                rec = {"v": RECORD_VERSION, "kind": "host", "device": "", "key": key, "at": _now(),
                       "t": round(time.time(), 3), "metric": metric,   # "top1": the score, whichever metric it is
                       "candidate": _cand_dict(cand), "macs": self.space.macs(cand.kept_map()), "top1": top1}
                self.store.put(rec)
                d.host_evals += 1
            accs.append(float(rec["top1"]))
        self._advance(d, accs)

    # -- layer-latency tables (netadapt)
    def _lut_path(self, d: _Dev) -> Path:
        dev = d.dev
        doc = {"device": dev.id, "runtime": dev.runtime.name, "threads": dev.runtime.threads,
               "options": dev.runtime.options, "format": d.profile.fmt, "export": dict(d.profile.export_options),
               "timing_s": self.opts.lut_seconds, "v": 1}
        h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.opts.cache() / f"lut-{dev.id}-{h}.json"

    def _load_lut(self, d: _Dev) -> Dict[str, Any]:
        path = self._lut_path(d)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"identity": None, "ms": {}}
        ident = self._dense_identity(d)
        if doc.get("identity") and ident and doc["identity"] != ident:
            self.emit("info", d.dev.id, f"layer-latency table {path} was measured on {doc['identity']}, not "
                                        f"{ident}: measuring again")
            return {"identity": None, "ms": {}}
        return doc

    def _dense_identity(self, d: _Dev) -> Optional[Dict[str, str]]:
        dense = next((r for r in d.records if not r["candidate"]["kept"]), None)
        ident = ((dense or {}).get("report") or {}).get("identity") or {}
        keys = ("hostname", "cpu_model", "runtime", "runtime_version")
        return {k: str(ident.get(k)) for k in keys} if ident else None

    def _luts(self, devs: List[_Dev]) -> None:
        tables = {d.dev.id: self._load_lut(d) for d in devs}
        reqs = []
        for d in devs:
            missing = [c for c in d.pending.configs if c.key() not in tables[d.dev.id]["ms"]]
            if missing:
                self.emit("stage", d.dev.id, f"layer-latency table: timing {len(missing)} layer configurations "
                                             f"on the device ({len(d.pending.configs) - len(missing)} cached)")
                reqs.append((d.dev, d.profile, missing))
        by_id = {d.dev.id: d for d in devs}

        def done(dev_id: str, key: str, ms: float, identity: Dict[str, Any]) -> None:
            d = by_id[dev_id]
            with self._lut_lock:
                table = tables[dev_id]
                table["ms"][key] = float(ms)
                if identity and not table.get("identity"):
                    table["identity"] = {k: str(identity.get(k)) for k in ("hostname", "cpu_model", "runtime",
                                                                            "runtime_version")}
                path = self._lut_path(d)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True))
                d.lut_jobs += 1

        errors = self.evaluator.layer_latency(reqs, done) if reqs else {}
        for d in devs:
            table = tables[d.dev.id]["ms"]
            if errors.get(d.dev.id) or any(c.key() not in table for c in d.pending.configs):
                d.failed = True
                self._stop(d, f"layer-latency table failed: {errors.get(d.dev.id) or 'configurations missing'}")
                continue
            self._advance(d, {c.key(): table[c.key()] for c in d.pending.configs})

    # -- device evaluations
    def _device_evals(self, devs: List[_Dev]) -> None:
        results: Dict[str, Measurement] = {}
        lock = threading.Lock()
        requests: List[Request] = []
        for d in list(devs):
            if d.ctx.evals >= self.opts.max_evals:
                self._stop(d, f"--max-evals {self.opts.max_evals} reached")
                devs.remove(d)
                continue
            cand = d.pending.candidate
            key = candidate_key(self.space, self.opts, d.profile, cand)
            rec = self.store.get("device", d.dev.id, key)
            if rec is not None:
                results[d.dev.id] = _measurement(rec, cached=True)
                if all(r["key"] != key for r in d.records):
                    d.records.append(rec)
                self.emit("cached", d.dev.id, f"evaluation {d.ctx.evals + 1}: {_cand_text(cand)} (from the store)")
            else:
                self.emit("eval", d.dev.id, f"evaluation {d.ctx.evals + 1}: {_cand_text(cand)}")
                requests.append(Request(d.dev, d.profile, cand, key))
        by_id = {d.dev.id: d for d in devs}

        def done(req: Request, m: Measurement, extra: Dict[str, Any]) -> None:
            d = by_id[req.device.id]
            m.key = req.key
            if m.ok:
                rec = {"v": RECORD_VERSION, "kind": "device", "device": req.device.id, "key": req.key, "at": _now(),
                       "t": round(time.time(), 3),
                       "candidate": _cand_dict(req.candidate), "macs": self.space.macs(req.candidate.kept_map()),
                       "plan_sha256": m.plan_sha256, "artifact_sha256": m.artifact_sha256, "metrics": m.metrics,
                       **_jsonable(extra)}
                self.store.put(rec)
                self._record(rec)
                with lock:
                    d.records.append(rec)
            with lock:
                results[req.device.id] = m
                d.new_evals += 1
            self.emit("result", req.device.id, f"{_cand_text(req.candidate)}: " +
                      (_metrics_text(m.metrics) if m.ok else f"failed: {m.error}"))

        if requests:
            self.evaluator.measure(requests, done)
        for d in devs:
            m = results.get(d.dev.id) or Measurement(False, error="no result")
            d.ctx.evals += 1
            d.failed = d.failed or not m.ok
            self._advance(d, m)

    # -- verdicts and output
    def _conclude(self, d: _Dev) -> DeviceResult:
        dense = next((r for r in d.records if not r["candidate"]["kept"]), None)
        bounds: Optional[Bounds] = None
        if dense is not None:
            try:
                bounds = d.targets.resolve(dense["metrics"])
            except UsageError:
                d.failed = True   # the reason says which metric the report lacks
        metric = d.targets.accuracy_metric
        rows = [self._row(r, bounds) for r in d.records]
        _mark_fronts(rows, metric)
        chosen = closest = None
        meeting = [r for r in rows if r["meets"]]
        if meeting:
            chosen = max(meeting, key=lambda r: (_quality(r, metric), -(r.get("latency_p50_ms") or math.inf)))
            verdict = "met"
        else:
            verdict = "error" if dense is None or d.failed else "infeasible"
            if rows:   # resource targets first (they are the device's), then accuracy
                closest = min(rows, key=lambda r: (r["resource_violation"], r["violation"], -_quality(r, metric)))
        return DeviceResult(d.dev.id, verdict, d.reason, describe(d.targets, bounds),
                            bounds.to_dict() if bounds else None, chosen, closest, len(d.records), d.new_evals,
                            d.host_evals, d.lut_jobs, rows, round_to=d.profile.round_to, accuracy_metric=metric)

    def _row(self, rec: Dict[str, Any], bounds: Optional[Bounds]) -> Dict[str, Any]:
        cand = rec["candidate"]
        m = rec["metrics"]
        row: Dict[str, Any] = {"key": rec["key"], "ratio": round(float(cand["ratio"]), 4),
                               "pruned_fraction": round(self.space.pruned_fraction(cand["kept"]), 4),
                               "recovery": cand["recovery"], "macs": rec["macs"], "note": cand.get("note", ""),
                               "artifact_sha256": rec.get("artifact_sha256", "")}
        row.update({k: m.get(k) for k in ROW_METRICS})
        power = (rec.get("report") or {}).get("power") or {}
        row["power_source"] = power.get("source") if isinstance(power, dict) else None
        if bounds is not None:
            a = bounds.assess(m)
            res_v = max((v for k, v in a.violations.items() if k not in ACCURACY_METRICS), default=0.0)
            row.update(drop_pp=None if a.drop_pp is None else round(a.drop_pp, 3), meets=a.meets,
                       meets_resources=a.meets_resources, violation=_finite(a.score), resource_violation=_finite(res_v))
        else:
            row.update(drop_pp=None, meets=False, meets_resources=False, violation=1e9, resource_violation=1e9)
        return row

    def _write_outputs(self, res: SearchResult) -> None:
        for r in res.devices:
            ddir = self.out / r.device_id
            ddir.mkdir(parents=True, exist_ok=True)
            for sub in ("chosen", "closest"):
                shutil.rmtree(ddir / sub, ignore_errors=True)
            pick, sub = (r.chosen, "chosen") if r.chosen is not None else (r.closest, "closest")
            if pick is not None:
                rec = self.store.get("device", r.device_id, pick["key"])
                if rec is not None:
                    self._export_candidate(rec, ddir / sub, r)
                    r.folder = f"{r.device_id}/{sub}"
            write_text_atomic(ddir / "pareto.json", json.dumps({
                "device": r.device_id, "bounds": r.bounds, "accuracy_metric": r.accuracy_metric,
                "latency_vs_accuracy": [x["key"] for x in sorted(r.rows, key=lambda x: x.get("latency_p50_ms") or 0)
                                        if x["front_latency"]],
                "energy_vs_accuracy": [x["key"] for x in sorted(r.rows, key=lambda x: x.get("energy_mj") or 0)
                                       if x["front_energy"]],
                "points": r.rows}, indent=1, sort_keys=True))
            write_text_atomic(ddir / "pareto.csv", _csv(r.rows, PARETO_COLUMNS))
            write_text_atomic(ddir / "result.json", json.dumps(_result_dict(r), indent=1, sort_keys=True))
        rows = [_summary_row(r) for r in res.devices]
        if self.recorder is not None:
            for r in res.devices:
                self.recorder.store.set_verdicts(self.run_id, r.device_id, {
                    f"{x['key']}": x.get("meets") for x in r.rows if x.get("key")})
            self.recorder.summary = {"algo": res.algo, "devices": [_result_dict(r) for r in res.devices]}
        write_text_atomic(self.out / "summary.csv", _csv(rows, SUMMARY_COLUMNS))
        write_text_atomic(self.out / "summary.json", json.dumps({
            "run_id": res.run_id, "algo": res.algo, "finished_at": _now(), "seconds_this_process": res.seconds,
            "devices": [_result_dict(r) for r in res.devices]}, indent=1, sort_keys=True))
        run = json.loads((self.out / RUN_FILE).read_text())
        run.update(status="finished", finished_at=_now())
        write_text_atomic(self.out / RUN_FILE, json.dumps(run, indent=1, sort_keys=True))

    def _export_candidate(self, rec: Dict[str, Any], dest: Path, r: DeviceResult) -> None:
        dest.mkdir(parents=True)
        src = rec.get("artifact_dir")
        if src:
            folder = self.out / src
            for name in list(rec.get("artifact_files", [])) + [rec.get("manifest"), "plan.json"]:
                if name and (folder / name).is_file():
                    shutil.copy2(folder / name, dest / name)
        if rec.get("report") is not None:
            write_text_atomic(dest / "report.json", json.dumps(rec["report"], indent=1, sort_keys=True))
        write_text_atomic(dest / "candidate.json", json.dumps({
            "device": r.device_id, "verdict": r.verdict, "key": rec["key"], "candidate": rec["candidate"],
            "macs": rec["macs"], "metrics": rec["metrics"], "plan_sha256": rec.get("plan_sha256"),
            "artifact_sha256": rec.get("artifact_sha256"), "targets": r.targets, "bounds": r.bounds,
            "round_to": r.round_to, "layer_ratios": self.space.layer_ratios(rec["candidate"]["kept"], r.round_to),
            "accuracy_metric": r.accuracy_metric,
        }, indent=1, sort_keys=True))


PARETO_COLUMNS = ["key", "ratio", "pruned_fraction", "recovery", "macs", *ROW_METRICS, "power_source", "drop_pp",
                  "meets", "meets_resources", "violation", "resource_violation", "front_latency", "front_energy",
                  "note", "artifact_sha256"]
SUMMARY_COLUMNS = ["device", "verdict", "targets", "latency_p50_ms", "latency_p90_ms", "energy_mj", "power_w",
                   "top1", "agreement", "snr_db", "drop_pp", "accuracy_metric", "device_evals", "host_evals",
                   "lut_jobs", "folder", "reason"]


def _finite(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else 1e9


def _quality(row: Mapping[str, Any], metric: str) -> float:
    v = row.get(metric)
    return float(v) if isinstance(v, (int, float)) else -math.inf


def _mark_fronts(rows: List[Dict[str, Any]], acc: str = "top1") -> None:
    """Mark the non-dominated rows: lower cost and higher accuracy (``acc``: top1, or agreement/snr_db on unlabelled
    data), for latency p50 and for energy per inference."""
    for metric, flag in (("latency_p50_ms", "front_latency"), ("energy_mj", "front_energy")):
        for r in rows:
            r[flag] = False
        pts = [r for r in rows if r.get(metric) is not None and r.get(acc) is not None]
        best = -math.inf
        for r in sorted(pts, key=lambda r: (r[metric], -r[acc])):
            if r[acc] > best:
                r[flag], best = True, r[acc]


def _csv(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _result_dict(r: DeviceResult) -> Dict[str, Any]:
    d = asdict(r)
    d.pop("rows")
    return d


def _summary_row(r: DeviceResult) -> Dict[str, Any]:
    pick = r.chosen or r.closest or {}
    return {"device": r.device_id, "verdict": r.verdict, "targets": r.targets,
            **{k: pick.get(k) for k in ("latency_p50_ms", "latency_p90_ms", "energy_mj", "power_w", "top1",
                                        "agreement", "snr_db", "drop_pp")},
            "accuracy_metric": r.accuracy_metric,
            "device_evals": r.device_evals, "host_evals": r.host_evals, "lut_jobs": r.lut_jobs,
            "folder": r.folder or "", "reason": r.reason}


def _cand_dict(c: Candidate) -> Dict[str, Any]:
    return {"kept": dict(c.kept), "recovery": c.recovery, "ratio": c.ratio, "note": c.note}


def _cand_text(c: Candidate) -> str:
    if c.dense:
        return "dense"
    return f"ratio {c.ratio:.3f}" + (f" ({c.note})" if c.note else "") + f", recovery {c.recovery}"


def _metrics_text(m: Mapping[str, float]) -> str:
    parts = []
    if "latency_p50_ms" in m:
        parts.append(f"p50 {m['latency_p50_ms']:.3f} ms")
    if "energy_mj" in m:
        parts.append(f"{m['energy_mj']:.3f} mJ")
    if "top1" in m:
        parts.append(f"top-1 {m['top1']:.2%}")
    if "agreement" in m:
        parts.append(f"agreement {m['agreement']:.2%}")
    if "snr_db" in m and "top1" not in m:
        parts.append(f"SNR {m['snr_db']:.1f} dB")
    return ", ".join(parts)


def _measurement(rec: Mapping[str, Any], cached: bool = False) -> Measurement:
    return Measurement(True, dict(rec["metrics"]), None, str(rec["key"]), str(rec.get("artifact_sha256", "")),
                       str(rec.get("plan_sha256", "")), cached)


# ------------------------------------------------------------------------------------------ the real evaluator

def layer_shapes(model: Any, example: Any) -> Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Input and output spatial size of every conv and linear layer, from one forward pass."""
    import torch
    import torch.nn as nn

    shapes: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(m: Any, inp: Any, out: Any, name: str = name) -> None:
                i, o = inp[0].shape, out.shape
                shapes[name] = ((int(i[2]), int(i[3])), (int(o[2]), int(o[3]))) if len(i) == 4 else ((1, 1), (1, 1))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def build_space(name: str, model: Any, meta: Mapping[str, Any], *, prune_residual: bool = False,
                min_channels: int = 1, sensitivities: Optional[Mapping[str, float]] = None,
                example: Any = None, extra_ignored: Sequence[Any] = ()) -> ModelSpace:
    """The :class:`ModelSpace` of a torch model: its prunable groups (as :func:`edgeprune.prune.prune` prunes
    them, ``extra_ignored`` modules kept whole) and every conv/linear layer with the groups that set its input and
    output channels. ``example``: an input of the model's shape (default: the CIFAR reference models')."""
    import torch
    import torch.nn as nn

    from edgeprune import prune

    if example is None:
        from edgeprune.data import INPUT_SHAPE

        example = torch.zeros(*INPUT_SHAPE)
    infos = prune.prunable_groups(model, example, prune_residual=prune_residual, extra_ignored=extra_ignored)
    shapes = layer_shapes(model, example)
    modules = dict(model.named_modules())
    side: Dict[str, Dict[str, str]] = {}
    for g in infos:
        for member in g.members:
            mod = modules.get(member)
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            s = side.setdefault(member, {})
            dw = isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels == mod.out_channels
            for which in (("in", "out") if dw else ("out",) if member in g.producers else ("in",)):
                if s.get(which, g.name) != g.name:
                    raise PruneError(f"{member}: its {which}put channels belong to two groups ({s[which]}, {g.name})")
                s[which] = g.name
    layers: List[Layer] = []
    for lname, mod in modules.items():
        if isinstance(mod, nn.Conv2d):
            pair = lambda v: (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
            cfg = LayerConfig("conv", mod.in_channels, mod.out_channels, pair(mod.kernel_size), pair(mod.stride),
                              pair(mod.padding) if not isinstance(mod.padding, str) else (0, 0), pair(mod.dilation),
                              mod.groups, mod.bias is not None, shapes[lname][0])
        elif isinstance(mod, nn.Linear):
            cfg = LayerConfig("linear", mod.in_features, mod.out_features, bias=mod.bias is not None)
        else:
            continue
        if lname not in shapes:
            continue  # not on the forward path
        s = side.get(lname, {})
        layers.append(Layer(lname, cfg, shapes[lname][1], s.get("in"), s.get("out")))
    sens = dict(sensitivities or {})
    groups = [Group(g.name, g.channels, sens.get(g.name), getattr(g, "channel_groups", 1)) for g in infos]
    return ModelSpace(name, str(meta.get("sha256", "")), groups, layers, min_channels)


def sensitivity_table(model: Any, name: str, meta: Mapping[str, Any], opts: SearchOptions,
                      emit: Events, *, workload: Optional["Workload"] = None,
                      extra_ignored: Sequence[Any] = ()) -> Dict[str, float]:
    """Per-group top-1 drop (pp) with only that group pruned at ``opts.sensitivity_ratio``, BatchNorm
    recalibrated, on the calib split (:func:`edgeprune.sensitivity.analyse`); on unlabelled calibration data the
    drop of top-1 agreement with the dense model instead. Cached per model, settings, data (a fingerprint of the
    images scored) and input shape."""
    import torch

    from edgeprune import data, sensitivity
    from host.search import data as search_data

    if workload is None or workload.reference_path:
        cal = data.calib_split(opts.sensitivity_per_class)
        example = torch.zeros(*data.INPUT_SHAPE) if workload is None else workload.example
    else:
        cal = workload.calib()
        example = workload.example
        if cal is None or len(cal) == 0:
            raise UsageError("--allocation sensitivity: needs calibration images (--data or --calib-data); or use "
                             "--allocation uniform")
    metric = "top1" if search_data.is_labelled(cal) else "agreement"
    doc = {"model": name, "checkpoint": str(meta.get("sha256", "")), "importance": opts.importance,
           "ratio": opts.sensitivity_ratio, "per_class": opts.sensitivity_per_class,
           "prune_residual": opts.prune_residual, "min_channels": opts.min_channels, "v": 2,
           "input_shape": list(example.shape), "data": search_data.split_fingerprint(cal), "metric": metric,
           "ignore_layers": list(opts.ignore_layers), "model_args": opts.model_args}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = opts.cache() / f"sensitivity-{name}-{h}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == json.loads(json.dumps(doc, default=str)):
            return {str(k): float(v) for k, v in cached["drop_pp"].items()}
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    emit("stage", "", f"sensitivity of {name}'s groups on {cal.name} ({len(cal)} images, {metric}), once per model")
    df = sensitivity.analyse(model, cal, example, ratios=(opts.sensitivity_ratio,),
                             importance=opts.importance, min_channels=opts.min_channels, recalibrate=True,
                             prune_residual=opts.prune_residual, metric=metric, extra_ignored=extra_ignored,
                             progress=lambda d, t, what: emit("progress", "", f"sensitivity {d}/{t}: {what}"))
    table = {str(r.group): float(r.drop_pp) for r in df.itertuples()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": doc, "drop_pp": table}, indent=1, sort_keys=True, default=str))
    return table


def machine_of(dev: DeviceConfig) -> str:
    """Which machine a device runs on, as far as its config says: devices on one machine are measured one after
    the other."""
    if dev.transport == "ssh" and dev.ssh is not None:
        host = dev.ssh.host.lower()
        return "local" if host in ("localhost", "127.0.0.1", "::1") and dev.ssh.proxy_jump is None \
            else f"ssh:{dev.ssh.proxy_jump or ''}/{host}"
    return "local"


class FleetEvaluator:
    """Builds candidates on the host (prune → recover → export, verified) and measures them through the agents."""

    def __init__(self, out: Path, run_id: str, opts: SearchOptions, name: str, model: Any, meta: Mapping[str, Any],
                 space: ModelSpace, events: Optional[Events] = None, *,
                 workload: Optional["Workload"] = None) -> None:
        from host.search import data as search_data

        self.out, self.run_id, self.opts, self.name = Path(out), run_id, opts, name
        self.base, self.meta, self.space = model, dict(meta), space
        self.emit = events or (lambda *a: None)
        self.work = self.out / WORK
        (self.work / "artifacts").mkdir(parents=True, exist_ok=True)
        wl = workload if workload is not None else search_data.open_search_workload(opts)
        self.workload = wl
        self.example = wl.example
        # --ignore-layers / the model file's ignore_layers, as modules of self.base (wl.model.model may be another
        # instance of the same model when the caller loaded its own)
        names = {id(m): n for n, m in wl.model.model.named_modules()}
        mods = dict(self.base.named_modules())
        self.keep_names = [names[id(m)] for m in wl.model.ignored_modules() if names.get(id(m)) in mods]
        self.data = search_data.SearchData(wl, self.work, self.base, self.emit)
        self.eval_name = self.data.eval_name
        self.shards = self.data.shards
        self.shard_sha = self.data.eval_sha
        self.check_inputs = wl.check_inputs()
        self.host_metric = self.data.metric

    @property
    def calib(self) -> Any:
        return self.data.calib()

    # -- building
    def _model(self, profile: Profile, cand: Candidate, checkpoint: Optional[Path],
               tag: str) -> Tuple[Any, Dict[str, Any]]:
        from edgeprune import finetune, prune
        from host.search.data import is_labelled

        model = copy.deepcopy(self.base).eval()
        info: Dict[str, Any] = {"plan": None, "plan_sha256": "", "recovery": None}
        if not cand.kept:
            return model, info
        calib = None
        if self.opts.importance in prune.NEEDS_CALIB:
            if self.calib is None or not is_labelled(self.calib):
                raise PruneError(f"--importance {self.opts.importance}: needs labelled calibration images "
                                 "(--calib-data or --finetune-data with labels); or use l1, l2 or bn_scale")
            calib = self.calib.tensors(256)
        self.emit("stage", "", f"{tag}: pruning ({len(cand.kept)} groups, align {profile.round_to})")
        mods = dict(model.named_modules())
        pr = prune.prune(model, 0.0, self.example, importance=self.opts.importance, round_to=profile.round_to,
                         min_channels=self.opts.min_channels, prune_residual=self.opts.prune_residual,
                         layer_ratios=self.space.layer_ratios(cand.kept_map(), profile.round_to), calib=calib,
                         extra_ignored=[mods[n] for n in self.keep_names])
        got = {layer.name: len(layer.keep) for layer in pr.plan.layers}
        if got != cand.kept_map():
            raise PruneError(f"{tag}: the plan keeps {got}, the candidate asked for {cand.kept_map()} "
                             f"(skipped: {pr.skipped})")
        info.update(plan=pr.plan, plan_sha256=pr.plan.sha256(), macs_counted=pr.macs_after, params=pr.params_after)
        rec = self.opts.recovery_for(cand.recovery)
        if rec is not None:
            if rec.recalibrate and self.calib is not None:
                finetune.recalibrate_bn(model, self.calib)
            ft = self.data.finetune(rec.finetune_per_class, self.opts.seed) if rec.finetune_epochs > 0 else None
            if ft is not None:
                self.emit("stage", "", f"{tag}: fine-tune ({cand.recovery}: {rec.finetune_epochs} epoch(s) on "
                                       f"{len(ft)} images)")
                res = finetune.finetune(
                    model, ft, epochs=rec.finetune_epochs, max_seconds=rec.finetune_seconds, lr=rec.lr,
                    batch_size=rec.batch_size, seed=self.opts.seed, teacher=self.base, distill_alpha=rec.distill,
                    checkpoint=checkpoint,
                    progress=lambda dn, t: self.emit("progress", "", f"{tag}: fine-tune step {dn}/{t}"))
                info["recovery"] = {"steps": res.steps_done, "planned": res.steps_planned,
                                    "seconds": round(res.seconds, 2), "stopped_by_time": res.stopped_by_time}
        return model, info

    def build(self, profile: Profile, cand: Candidate, key: str) -> Dict[str, Any]:
        """The candidate's artifact under ``work/artifacts/<key>``: reused when its files match its manifest."""
        from edgeprune import export

        folder = self.work / "artifacts" / key[:16]
        built = folder / "built.json"
        if built.is_file():
            try:
                info = json.loads(built.read_text())
                export.Manifest.read(folder / info["manifest"]).check_files(folder)
                if info.get("key") == key:
                    return info
            except (OSError, ValueError, KeyError, EdgepruneError):
                pass
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        tag = f"{self.name}-{key[:12]}"
        model, info = self._model(profile, cand, folder / "finetune.ckpt", tag)
        if info.get("params") is None:   # the dense model: counted here (a pruned one was counted by prune())
            from edgeprune import prune

            info["macs_counted"], info["params"] = prune.count(model, self.example)
        calib_inputs = None
        if export.get_format(profile.fmt).calibration or "int8" in dict(profile.export_options).get("precision", ""):
            calib_inputs = self.workload.calib_inputs(200)
        self.emit("stage", "", f"{tag}: export {profile.fmt} (verified against torch)")
        man = export.export(model, profile.fmt, folder, tag=tag, check_inputs=self.check_inputs,
                            calib_inputs=calib_inputs, model_name=self.name,
                            source_checkpoint_sha256=str(self.meta.get("sha256", "")),
                            pruning_plan_sha256=info["plan_sha256"], input_shape=tuple(self.workload.input_shape),
                            preprocess=None if self.workload.reference_path else self.workload.manifest_preprocess(),
                            **dict(profile.export_options))
        if info["plan"] is not None:
            write_text_atomic(folder / "plan.json", info["plan"].to_json())
        out = {"key": key, "tag": tag, "manifest": export.manifest_path(folder, tag, profile.fmt).name,
               "artifact": man.file, "artifact_files": sorted(man.files), "artifact_sha256": man.sha256,
               "plan_sha256": info["plan_sha256"], "recovery_result": info["recovery"],
               "macs_counted": info.get("macs_counted"), "params": info.get("params"),
               "artifact_dir": os.path.relpath(folder, self.out)}
        write_text_atomic(built, json.dumps(out, indent=1, sort_keys=True))
        (folder / "finetune.ckpt").unlink(missing_ok=True)
        return out

    def host_top1(self, profile: Profile, candidate: Candidate) -> float:
        """The candidate's score on the calib split: top-1 (labelled), else agreement with the dense model."""
        model, _ = self._model(profile, candidate, None, f"{self.name}-proposal")
        if self.calib is None:
            raise PruneError("netadapt scores proposals on calibration images: give --data or --calib-data")
        return self.data.score(model, self.calib)

    # -- measuring
    def measure(self, requests: Sequence[Request], done: DeviceDone) -> None:
        from edgeprune import export
        from host.fleet.runner import run_on_device
        from host.fleet.jobs import build_job

        built: Dict[str, Dict[str, Any]] = {}
        runnable = []
        for req in requests:
            try:
                if req.key not in built:
                    built[req.key] = self.build(req.profile, req.candidate, req.key)
                info = built[req.key]
                folder = self.out / info["artifact_dir"]
                man = export.Manifest.read(folder / info["manifest"])
                job = build_job(req.device, f"{self.run_id}-{req.key[:12]}", folder / info["artifact"], man,
                                self.shards or None, "", self.eval_name, quick=self.opts.quick,
                                seed=self.opts.seed)
                runnable.append((req, info, job))
            except (PruneError, ExportError, DeviceError) as e:
                done(req, Measurement(False, error=f"{type(e).__name__}: {e}"), {})

        def one(req: Request, info: Dict[str, Any], job: schema.JobSpec) -> None:
            o = run_on_device(req.device, job, self.work / "jobs", lease_wait_s=self.opts.lease_wait_s,
                              events=lambda dev, kind, msg: self.emit("device", dev, msg))
            if not o.ok or o.report is None:
                done(req, Measurement(False, error=f"{o.error_type}: {o.error}"), {})
                return
            m = Measurement(True, metrics_from_report(o.report), None, req.key, info["artifact_sha256"],
                            info["plan_sha256"])
            extra = {k: info[k] for k in ("artifact_dir", "artifact", "artifact_files", "manifest", "recovery_result",
                                          "macs_counted", "params")}
            plan = self.out / info["artifact_dir"] / "plan.json"
            extra["plan"] = json.loads(plan.read_text()) if plan.is_file() else None
            extra["report"] = schema.to_dict(o.report)
            extra["job"] = schema.to_dict(job)
            extra["attempts"] = o.attempts
            done(req, m, extra)

        # in parallel across machines; one after the other on one machine (local devices, SSH devices at one
        # address), whose measurements would otherwise share its CPUs
        by_machine: Dict[str, List[Any]] = {}
        for r in runnable:
            by_machine.setdefault(machine_of(r[0].device), []).append(r)
        if not by_machine:
            return
        with ThreadPoolExecutor(max_workers=len(by_machine)) as pool:
            futures = [pool.submit(lambda rs: [one(*r) for r in rs], rs) for rs in by_machine.values()]
            for f in as_completed(futures):
                f.result()

    # -- layer latency (netadapt)
    def _micro(self, cfg: LayerConfig, profile: Profile) -> Tuple[Path, Any]:
        """A one-layer model of ``cfg``, exported (cached by configuration and format)."""
        import torch
        import torch.nn as nn

        from edgeprune import export

        folder = self.opts.cache() / "lut-artifacts" / f"{profile.fmt}-" \
            f"{hashlib.sha256(repr(profile.export_options).encode()).hexdigest()[:8]}"
        tag = cfg.key()
        mpath = export.manifest_path(folder, tag, profile.fmt)
        if mpath.is_file():
            try:
                man = export.Manifest.read(mpath)
                man.check_files(folder)
                return folder / man.file, man
            except EdgepruneError:
                pass
        gen = torch.Generator().manual_seed(0)
        if cfg.kind == "linear":
            layer: nn.Module = nn.Linear(cfg.in_channels, cfg.out_channels, bias=cfg.bias)
            shape = [1, cfg.in_channels]
        else:
            layer = nn.Conv2d(cfg.in_channels, cfg.out_channels, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation,
                              cfg.groups, bias=cfg.bias)
            shape = [1, cfg.in_channels, cfg.in_hw[0], cfg.in_hw[1]]
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        check = torch.randn([4] + shape[1:], generator=gen)
        spec = export.get_format(profile.fmt)
        calib = torch.randn([16] + shape[1:], generator=gen) if spec.calibration else None
        man = export.export(layer.eval(), profile.fmt, folder, tag=tag, check_inputs=check, calib_inputs=calib,
                            model_name=f"layer {tag}", source_checkpoint_sha256="", pruning_plan_sha256="",
                            input_shape=shape, **dict(profile.export_options))
        return folder / man.file, man

    def layer_latency(self, requests: Sequence[Tuple[DeviceConfig, Profile, List[LayerConfig]]],
                      done: LayerDone) -> Dict[str, Optional[str]]:
        from host.fleet.runner import Lease, transport_for
        from host.fleet.jobs import build_job

        errors: Dict[str, Optional[str]] = {}
        jobs: Dict[str, List[Tuple[str, schema.JobSpec]]] = {}
        for dev, profile, configs in requests:   # export on the host first, then time on the devices in parallel
            try:
                items = []
                for cfg in configs:
                    path, man = self._micro(cfg, profile)
                    job = build_job(dev, f"lut-{hashlib.sha256(cfg.key().encode()).hexdigest()[:16]}", path, man,
                                    None, quick=True, seed=self.opts.seed)
                    job.power = None
                    job.timing.min_iters = min(job.timing.min_iters, 50)
                    job.timing.min_duration_s = self.opts.lut_seconds
                    job.timing.warmup_s = min(job.timing.warmup_s, 0.1)
                    items.append((cfg.key(), job))
                jobs[dev.id] = items
            except (ExportError, DeviceError) as e:
                errors[dev.id] = f"{type(e).__name__}: {e}"

        def per_device(dev: DeviceConfig) -> None:
            transport = None
            try:
                transport = transport_for(dev)
                with Lease(transport, dev.id, wait_s=self.opts.lease_wait_s, label=f"{self.run_id} layer table"):
                    for key, job in jobs[dev.id]:
                        report = transport.run_job(job, self.work / "jobs" / dev.id / "lut" / job.job_id)
                        if report.status != "ok" or report.timing is None:
                            msg = report.error.message if report.error else "no timing"
                            raise DeviceError(f"{key}: {msg}")
                        ident = schema.to_dict(report.identity) if report.identity is not None else {}
                        done(dev.id, key, float(report.timing.latency_ms.median), ident)
                errors[dev.id] = None
            except DeviceError as e:
                errors[dev.id] = f"{type(e).__name__}: {e}"
            finally:
                if transport is not None:
                    transport.close()

        by_machine: Dict[str, List[DeviceConfig]] = {}
        for dev, _, _ in requests:
            if dev.id in jobs:
                by_machine.setdefault(machine_of(dev), []).append(dev)
        if by_machine:
            with ThreadPoolExecutor(max_workers=len(by_machine)) as pool:
                futures = [pool.submit(lambda ds: [per_device(d) for d in ds], ds) for ds in by_machine.values()]
                for f in as_completed(futures):
                    f.result()
        return errors


# ------------------------------------------------------------------------------------------ entry points

def check_devices(devices: Sequence[DeviceConfig]) -> None:
    if not devices:
        raise UsageError("--devices: no devices selected")
    for dev in devices:
        if dev.id in RESERVED_IDS or dev.id.startswith("."):
            raise UsageError(f"{dev.source or dev.id}: id {dev.id!r} cannot be a folder of the search output "
                             f"(reserved: {', '.join(sorted(RESERVED_IDS))}, or a leading '.')")
        profile_for(dev)


def run_dir(run_id: str, out: Optional[Path]) -> Path:
    return Path(out) if out is not None else DEFAULT_ROOT / run_id


def _write_run(out: Path, run_id: str, opts: SearchOptions, devices: Sequence[DeviceConfig],
               targets: Mapping[str, TargetSet], workload: Optional[Dict[str, Any]] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RUN_FILE, json.dumps({
        "version": RUN_VERSION, "run_id": run_id, "created_at": _now(), "status": "running",
        "options": opts.to_dict(), "workload": workload,
        "devices": [dict(d.model_dump(by_alias=True, mode="json"), source=d.source) for d in devices],
        "targets": {k: v.to_dict() for k, v in targets.items()}}, indent=1, sort_keys=True, default=str))


def _stored_workload(out: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads((Path(out) / RUN_FILE).read_text()).get("workload")
    except (OSError, ValueError):
        return None


def read_run(out: Path) -> Tuple[str, SearchOptions, List[DeviceConfig], Dict[str, TargetSet]]:
    path = Path(out) / RUN_FILE
    try:
        doc = json.loads(path.read_text())
    except OSError:
        raise UsageError(f"--resume: {path} not found (no search run there)") from None
    except ValueError as e:
        raise UsageError(f"{path}: not valid JSON ({e})") from None
    if doc.get("version") != RUN_VERSION:
        raise UsageError(f"{path}: version {doc.get('version')!r} is not a search run version this edgeprune reads "
                         f"({RUN_VERSION})")
    opts = SearchOptions.from_dict(doc["options"], str(path))
    devices = []
    for raw in doc["devices"]:
        raw = dict(raw)
        source = raw.pop("source", None)
        devices.append(DeviceConfig.model_validate(raw).model_copy(update={"source": source}))
    targets = {k: TargetSet.from_dict(v) for k, v in doc["targets"].items()}
    return str(doc["run_id"]), opts, devices, targets


def start(opts: SearchOptions, devices: Sequence[DeviceConfig], targets: Mapping[str, TargetSet], *,
          out: Optional[Path] = None, run_id: Optional[str] = None, events: Optional[Events] = None,
          space: Optional[ModelSpace] = None, evaluator: Optional[Evaluator] = None,
          recorder: Optional["RunRecorder"] = None, workload: Optional["Workload"] = None) -> SearchResult:
    """A new search. ``space``/``evaluator`` replace the real ones (tests); ``workload``: the run's model and data
    when the caller opened them already (:func:`host.search.data.open_search_workload` of ``opts``). UsageError
    before anything runs for bad options, devices, model or data, targets the data cannot judge, or a run folder
    that already holds a search."""
    from host.search import data as search_data
    from host.results.store import check_run_id, new_run_id

    opts.validate()
    check_devices(devices)
    missing = [d.id for d in devices if d.id not in targets]
    if missing:
        raise UsageError(f"--target: no targets for {', '.join(missing)}")
    run_id = check_run_id(run_id) if run_id else new_run_id()
    folder = run_dir(run_id, out)
    if (folder / RUN_FILE).exists():
        prev = json.loads((folder / RUN_FILE).read_text()).get("run_id", "?")
        raise UsageError(f"--out: {folder} already holds search run {prev}; continue it with --resume {prev}"
                         f"{f' --out {folder}' if out is not None else ''}, or choose another folder")
    if space is None or evaluator is None:
        workload = workload if workload is not None else search_data.open_search_workload(opts)
        search_data.check_workload(workload, targets)
    _write_run(folder, run_id, opts, devices, targets,
               search_data.fingerprint(workload) if workload is not None else None)
    return _execute(folder, run_id, opts, list(devices), dict(targets), events, space, evaluator, recorder,
                    workload)


def resume(run_id: str, *, out: Optional[Path] = None, events: Optional[Events] = None,
           space: Optional[ModelSpace] = None, evaluator: Optional[Evaluator] = None,
           recorder: Optional["RunRecorder"] = None, workload: Optional["Workload"] = None) -> SearchResult:
    """Continue a search after a crash or Ctrl-C, with its stored options; completed evaluations are not repeated."""
    from host.results.store import check_run_id

    check_run_id(run_id)
    folder = run_dir(run_id, out)
    stored_id, opts, devices, targets = read_run(folder)
    if stored_id != run_id:
        raise UsageError(f"--resume: {folder} holds run {stored_id}, not {run_id}")
    opts.validate()
    if workload is None and (space is None or evaluator is None):
        workload = open_resumed_workload(folder, opts)
    return _execute(folder, run_id, opts, devices, targets, events, space, evaluator, recorder, workload)


def open_resumed_workload(folder: Path, opts: SearchOptions) -> "Workload":
    """The stored run's model and data, reopened from its options; UsageError when the data is not what the run
    started with (another --data under the same path, another input shape)."""
    from host.search import data as search_data

    wl = search_data.open_search_workload(opts)
    stored = _stored_workload(folder)
    now = search_data.fingerprint(wl)
    if stored is not None:
        for part in ("input_shape", "eval"):
            if json.loads(json.dumps(stored.get(part))) != json.loads(json.dumps(now.get(part))):
                raise UsageError(f"--resume: the run's {'eval data' if part == 'eval' else part.replace('_', ' ')} "
                                 f"changed since it started ({stored.get(part)} then, {now.get(part)} now); start a "
                                 "new search instead")
    return wl


def _execute(folder: Path, run_id: str, opts: SearchOptions, devices: List[DeviceConfig],
             targets: Dict[str, TargetSet], events: Optional[Events], space: Optional[ModelSpace],
             evaluator: Optional[Evaluator], recorder: Optional["RunRecorder"] = None,
             workload: Optional["Workload"] = None) -> SearchResult:
    emit = events or (lambda *a: None)
    if space is None or evaluator is None:
        import torch

        from host.search import data as search_data

        torch.manual_seed(opts.seed)
        wl = workload if workload is not None else search_data.open_search_workload(opts)
        search_data.check_workload(wl, targets)
        for note in wl.notes:
            emit("info", "", note)
        if not wl.has_finetune_data and any(r.finetune_epochs > 0 for r in (opts.recovery, opts.short_recovery)):
            emit("info", "", "recovery: BatchNorm recalibration only (no --finetune-data: fine-tuning needs labelled "
                             "training images)")
        if not search_data.eval_labelled(wl):
            emit("info", "", "eval data has no labels: candidates are judged and ranked by top-1 agreement / SNR "
                             "against the dense model's outputs, measured on the device")
        loaded = wl.model
        name, model, meta = loaded.name, loaded.model, dict(loaded.meta)
        keep = loaded.ignored_modules()
        sens = None
        ao = opts.algo_options
        if (opts.algo == "bisect" and ao.allocation == "sensitivity") or \
                (opts.algo == "netadapt" and ao.netadapt_max_proposals is not None):
            sens = sensitivity_table(model, name, meta, opts, emit, workload=wl, extra_ignored=keep)
        if space is None:
            space = build_space(name, model, meta, prune_residual=opts.prune_residual,
                                min_channels=opts.min_channels, sensitivities=sens, example=wl.example,
                                extra_ignored=keep)
        if evaluator is None:
            evaluator = FleetEvaluator(folder, run_id, opts, name, model, meta, space, emit, workload=wl)
    emit("info", "", f"search run {run_id} ({opts.algo}) in {folder}: {len(devices)} device(s), "
                     f"{len(space.groups)} prunable groups, {space.dense_macs / 1e6:.1f} MMACs dense")
    return Search(folder, run_id, opts, devices, targets, space, evaluator, emit, recorder).run()


def iter_records(out: Path) -> Iterator[Dict[str, Any]]:
    """The evaluation records of a run folder, in the order they completed."""
    yield from Store(Path(out) / EVALUATIONS).records


JSON_METRICS = ("top1", "top5", "agreement", "snr_db", "latency_p50_ms", "latency_p90_ms", "throughput_ips",
                "power_w", "energy_mj", "memory_mb")


def result_document(res: SearchResult) -> Dict[str, Any]:
    """The search's outcome as one JSON-able document (``edgeprune search --json``): per device the chosen candidate
    (or, when the targets were not met, the closest), its MACs, parameters, artifact files (paths under the run
    folder's ``<device>/chosen|closest/``), the metrics measured on the device and whether the targets are met."""
    store = Store(Path(res.out) / EVALUATIONS)
    devices = []
    for r in res.devices:
        pick = r.chosen or r.closest
        cand: Optional[Dict[str, Any]] = None
        if pick is not None:
            rec = store.get("device", r.device_id, pick["key"]) or {}
            folder = Path(res.out) / r.folder if r.folder else None
            files = [str(folder / f) for f in rec.get("artifact_files", [])] if folder is not None else []
            cand = {"key": pick["key"], "ratio": pick.get("ratio"), "pruned_fraction": pick.get("pruned_fraction"),
                    "recovery": pick.get("recovery"), "macs": rec.get("macs", pick.get("macs")),
                    "macs_counted": rec.get("macs_counted"), "params": rec.get("params"),
                    "folder": str(folder) if folder is not None else None,
                    "artifact": str(folder / rec["artifact"]) if folder is not None and rec.get("artifact") else None,
                    "artifact_files": files,
                    "manifest": str(folder / rec["manifest"]) if folder is not None and rec.get("manifest") else None,
                    "artifact_sha256": rec.get("artifact_sha256"), "plan_sha256": rec.get("plan_sha256"),
                    "metrics": {k: pick.get(k) for k in JSON_METRICS}, "drop_pp": pick.get("drop_pp"),
                    "meets": bool(pick.get("meets")), "meets_resources": bool(pick.get("meets_resources"))}
        devices.append({"device": r.device_id, "verdict": r.verdict, "targets_met": r.verdict == "met",
                        "targets": r.targets, "bounds": r.bounds, "accuracy_metric": r.accuracy_metric,
                        "reason": r.reason, "device_evals": r.device_evals, "host_evals": r.host_evals,
                        "candidate_kind": "chosen" if r.chosen else "closest" if r.closest else None,
                        "candidate": cand})
    return {"run_id": res.run_id, "algo": res.algo, "out": str(res.out), "all_met": res.all_met,
            "summary_csv": str(Path(res.out) / "summary.csv"), "evaluations": str(Path(res.out) / EVALUATIONS),
            "devices": devices}
