"""Run one job, phase by phase, and return a :class:`~agent.schema.Report` (never raise for a failed job).

Phases: identity -> verify artifact sha256, then each of its other files (``artifact.files``, found beside it
in the same folder), and every eval shard's -> pin CPUs -> discover power sensor and thermal
sources -> load (``load_time_ms``) -> start temperature -> first inference (``first_inference_ms``) -> warm-up ->
cooldown -> wait to cool (``thermal.wait_to_cool_c``) -> timed window (power sampled in the background during
it only; temperature at its start, every second during it and at its end) -> accuracy and fidelity on the eval
shards, one shard in memory at a time (:mod:`agent.accuracy`). A
device without thermal sources gets ``thermal: null`` and no warning (one log line). An exception in any phase makes the
report ``status="error"`` with ``error={"type", "message"}``; the sections measured before it are kept.
``job.timeout_s`` is checked between phases and bounds the warm-up, the timed window and the eval loop.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil

from agent import ArtifactError, JobTimeout, SensorError, accuracy, power, probe, runtimes, thermal, timing
from agent.schema import AccuracyResult, ErrorInfo, EvalSpec, JobSpec, Report, SchemaError, file_name_problem


class Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at_ns = time.perf_counter_ns() + int(timeout_s * 1e9)

    def remaining_s(self) -> float:
        return (self.at_ns - time.perf_counter_ns()) / 1e9

    def check(self, phase: str) -> None:
        if self.remaining_s() <= 0:
            raise JobTimeout("job timeout_s=%g reached before %s" % (self.timeout_s, phase))


class PeakRss:
    """Peak resident memory: the max of samples taken between phases and, where available, ru_maxrss."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self.peak = 0

    def sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def peak_mb(self) -> float:
        self.sample()
        peak = self.peak
        try:
            import resource
            maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peak = max(peak, maxrss if psutil.MACOS else maxrss * 1024)  # bytes on macOS, KiB elsewhere
        except ImportError:  # Windows has no resource module
            pass
        return peak / 2 ** 20


def check_paths(job: JobSpec, base_dir: Path) -> None:
    """SchemaError (exit 2, nothing read) for a relative ``artifact.path``, ``eval.path`` or
    ``eval.shards[i].path`` that leads out of the job folder (``../../etc/passwd``): a bad job spec, refused before
    the runner opens anything. Absolute paths are the host's to give (it links the artifact's files into the job
    folder)."""
    base = base_dir.resolve()
    checks = [("artifact.path", job.artifact.path)]
    if job.eval is not None:
        checks += [(f, s.path) for f, s in zip(job.eval.shard_fields(), job.eval.shard_list())]
    for field, rel in checks:
        if rel is None or os.path.isabs(rel):
            continue
        p = Path(os.path.normpath(str(base / rel)))
        if p != base and base not in p.parents:
            raise SchemaError("%s: %r escapes the job folder %s" % (field, rel, base))


def check_job(job: JobSpec) -> None:
    """Checks that need this agent's registries; raises SchemaError naming the field (CLI exit code 2)."""
    if job.runtime.name not in runtimes.runtime_names():
        raise SchemaError("runtime.name: unknown runtime %r (this agent knows: %s)"
                          % (job.runtime.name, ", ".join(runtimes.runtime_names())))
    if job.power is not None:
        if job.power.sensor not in power.sensor_names():
            raise SchemaError("power.sensor: unknown sensor %r (this agent knows: %s)"
                              % (job.power.sensor, ", ".join(power.sensor_names())))
        if job.power.sensor == "model" and (job.power.idle_w is None or job.power.max_w is None):
            raise SchemaError("power.idle_w: power.idle_w and power.max_w are required for the model sensor")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve(base_dir: Path, rel: str, field: str) -> Path:
    """An absolute path as given, or a path inside base_dir; it must be an existing file.

    A relative path is normalised by name ('..' may not lead out of base_dir) but symbolic links are not followed:
    the file keeps the name it has in the job folder (a transport links an artifact's files there under their
    own names, e.g. ``model.xml`` next to ``model.bin``, pointing into its content-addressed cache)."""
    p = Path(rel)
    if not p.is_absolute():
        base = base_dir.resolve()
        p = Path(os.path.normpath(str(base / p)))
        if base != p and base not in p.parents:
            raise ArtifactError("%s: %r escapes the job folder %s" % (field, rel, base))
    if not p.is_file():
        raise ArtifactError("%s: %s does not exist or is not a file" % (field, p))
    return p


def verify(path: Path, expected: str, what: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise ArtifactError("%s sha256 mismatch: expected %s got %s" % (what, expected, got))


def verify_artifact_files(model_path: Path, files: Dict[str, str]) -> None:
    """Every one of the artifact's other files (``artifact.files``: plain name -> sha256) must be in the
    artifact's folder with its sha256; ArtifactError naming the first that is missing or differs."""
    folder = model_path.parent
    for name in sorted(files):
        problem = file_name_problem(name)
        if problem is not None:  # validate() refuses these already; never open a path built from one
            raise ArtifactError("artifact.files: %r %s" % (name, problem))
        p = folder / name
        if not p.is_file():
            raise ArtifactError("artifact.files.%s: %s is missing: it must be beside the artifact %s"
                                % (name, p, model_path.name))
        verify(p, files[name], "artifact.files.%s: %s" % (name, name))


def verify_shards(base_dir: Path, ev: EvalSpec) -> List[Path]:
    """Every eval shard's path (confined to the job folder like ``artifact.path``), each verified by sha256."""
    paths = []
    for i, (shard, field) in enumerate(zip(ev.shard_list(), ev.shard_fields())):
        p = resolve(base_dir, shard.path, field)
        verify(p, shard.sha256, "eval shard" if ev.shards is None else "eval.shards[%d] %s" % (i, p.name))
        paths.append(p)
    return paths


def pin_cpus(requested: Optional[List[int]]) -> Dict[str, Any]:
    """Apply timing.cpu_affinity where the OS supports it; say what was actually applied."""
    proc = psutil.Process()
    if not hasattr(proc, "cpu_affinity"):
        warning = None
        if requested is not None:
            warning = "CPU affinity is not supported on this OS; timing.cpu_affinity %s was not applied" % requested
        return {"cpu_affinity_applied": None, "cpu_allowed": None, "warning": warning}
    if requested is not None:
        try:
            proc.cpu_affinity(list(requested))
        except (ValueError, OSError) as e:
            raise SchemaError("timing.cpu_affinity: cannot pin to %s: %s" % (requested, e)) from None
    allowed = sorted(proc.cpu_affinity())
    return {"cpu_affinity_applied": allowed if requested is not None else None, "cpu_allowed": allowed,
            "warning": None}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def run_job(job: JobSpec, base_dir: Path, root: str = "/") -> Report:
    """Run ``job`` (paths relative to ``base_dir``); ``root`` is where device files are read (tests)."""
    report = Report(job_id=job.job_id, status="ok", started_at=_now())
    rss = PeakRss()
    proc = psutil.Process()
    saved_affinity = proc.cpu_affinity() if hasattr(proc, "cpu_affinity") else None
    try:
        _run(job, Path(base_dir), root, report, rss)
    except Exception as e:  # every failure becomes the report's error; what was measured is kept
        report.status = "error"
        report.error = ErrorInfo(type=type(e).__name__, message=error_message(e, rss))
    finally:
        if saved_affinity is not None:
            proc.cpu_affinity(saved_affinity)
    report.peak_rss_mb = rss.peak_mb()
    report.finished_at = _now()
    return report


# how runtimes say an allocation failed (onnxruntime: std::bad_alloc, its arena's "Failed to allocate memory")
_OUT_OF_MEMORY = re.compile(r"bad_alloc|failed to allocate memory|out of memory|cannot allocate memory", re.I)


def error_message(e: BaseException, rss: PeakRss) -> str:
    """The report's error message for ``e``; an allocation failure (a bare ``MemoryError()``, a runtime's
    ``std::bad_alloc``) is said to be one, with the peak RSS reached, rather than left to be guessed."""
    message = str(e) or repr(e)
    if isinstance(e, MemoryError) or _OUT_OF_MEMORY.search(message):
        message = "out of memory on the device (peak RSS %.0f MB): %s" % (rss.peak_mb(), message)
    if "is not installed on this device" in message:
        message += "; or, from the host: " + SETUP_HINT
    return message


# what a device lacking the agent's packages or its runtime is told to do (host.fleet.setup)
SETUP_HINT = ("`edgeprune devices setup --fleet FLEET --devices ID` installs the agent's packages and the device's "
              "runtime, at versions known to work for its class, into a venv on the device")


# every report of an emulated device carries it (host tables and reports mark those figures too)
EMULATED_WARNING = ("emulated: this %s device runs under %s; its latency, throughput and power are the emulator's, "
                    "not a device measurement (outputs and accuracy are real)")


def _run(job: JobSpec, base_dir: Path, root: str, report: Report, rss: PeakRss) -> None:
    deadline = Deadline(job.timeout_s)
    check_job(job)
    rt = runtimes.get_runtime(job.runtime.name)
    report.identity = probe.identity(job.device_id, rt.name, rt.version(), job.artifact.sha256, root)
    emulated = report.identity.extra.get("emulation") or {}
    if emulated.get("emulated"):
        report.warnings.append(EMULATED_WARNING % (report.identity.machine, emulated.get("by") or "an emulator"))

    model_path = resolve(base_dir, job.artifact.path, "artifact.path")
    verify(model_path, job.artifact.sha256, "artifact")
    verify_artifact_files(model_path, job.artifact.files)
    eval_paths: List[Path] = []
    if job.eval is not None:
        eval_paths = verify_shards(base_dir, job.eval)

    pinned = pin_cpus(job.timing.cpu_affinity)
    if pinned["warning"]:
        report.warnings.append(pinned["warning"])
    allowed = pinned["cpu_allowed"]
    if allowed is not None and job.runtime.threads > len(allowed):
        report.warnings.append("runtime.threads=%d exceeds the %d CPUs this process may use"
                               % (job.runtime.threads, len(allowed)))
    sensor = None
    if job.power is not None:
        sensor = power.discover(job.power, os.path.join(root, "sys"))
        if sensor is None:
            report.warnings.append("power sensor %r not found on this device (%s); power not reported"
                                   % (job.power.sensor, power.sensor_class(job.power.sensor).where))
    monitor = None
    if job.thermal is not None and job.thermal.enabled:
        monitor = thermal.discover(root, job.thermal)
        if monitor is None and job.thermal.wait_to_cool_c is not None:
            report.warnings.append("thermal.wait_to_cool_c=%g but this device has no thermal source; not waiting"
                                   % job.thermal.wait_to_cool_c)

    deadline.check("loading the model")
    t0 = time.perf_counter_ns()
    session = rt.load(model_path, job.artifact, job.runtime.threads, job.runtime.options)
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    rss.sample()
    report.identity.extra["runtime"] = dict(session.info)
    batch = session.input_shape[0]
    if batch is not None and batch != job.timing.batch_size:
        raise SchemaError("timing.batch_size: %d but the model's batch dimension is fixed at %d"
                          % (job.timing.batch_size, batch))
    protocol = dict(dataclasses.asdict(job.timing), threads=job.runtime.threads, runtime=rt.name,
                    input="default_rng(seed).standard_normal, %s" % job.artifact.input_dtype,
                    clock="time.perf_counter_ns", cpu_affinity_applied=pinned["cpu_affinity_applied"],
                    cpu_allowed=allowed, **session.info)
    _time(job, session, sensor, monitor, protocol, load_ms, deadline, report)
    rss.sample()

    if job.eval is not None and eval_paths:
        deadline.check("accuracy")
        report.accuracy = _accuracy(job, job.eval, eval_paths, session, batch, deadline, rss)


def _time(job: JobSpec, session: runtimes.Session, sensor: Optional[power.PowerSensor],
          monitor: Optional[thermal.ThermalMonitor], protocol: Dict[str, Any], load_ms: float, deadline: Deadline,
          report: Report) -> None:
    """First inference, warm-up, cooldown, wait to cool, then the timed window with power sampled during it only
    and temperatures at its start, during it and at its end."""
    spec = job.timing
    x = timing.make_input(job.artifact.input_shape, spec.batch_size, spec.seed, job.artifact.input_dtype)
    if monitor is not None:
        monitor.sample("start")
    deadline.check("the first inference")
    t0 = time.perf_counter_ns()
    session.run(x)
    first_ms = (time.perf_counter_ns() - t0) / 1e6

    deadline.check("warm-up")
    warm = timing.warmup(session.run, x, spec, deadline.at_ns)
    if spec.cooldown_s > 0:
        time.sleep(min(spec.cooldown_s, max(0.0, deadline.remaining_s())))
    if monitor is not None and job.thermal is not None and job.thermal.wait_to_cool_c is not None:
        _wait_to_cool(monitor, job.thermal.wait_to_cool_c, job.thermal.wait_to_cool_timeout_s, deadline, report)
    deadline.check("the timed window")
    if monitor is not None:
        monitor.sample("window_start")
        monitor.start_background(thermal.SAMPLE_INTERVAL_S)
    if sensor is not None:
        sensor.start()
    try:
        m = timing.measure(session.run, x, spec, deadline.at_ns)
    finally:
        window = _stop(sensor, report)
        if monitor is not None:
            monitor.stop_background()
            monitor.sample("end")
            report.thermal, _ = monitor.result()  # kept if the window failed; replaced below with drift
    report.timing, warnings = timing.summarise(m, spec, protocol, load_ms, first_ms, warm)
    report.warnings.extend(warnings)
    if window is not None:
        report.power = power.to_result(window, report.timing.duration_s, len(m.samples_ns), spec.batch_size)
    if monitor is not None:
        report.thermal, warnings = monitor.result(timing.drift([s / 1e6 for s in m.samples_ns]))
        report.warnings.extend(warnings)


def _wait_to_cool(monitor: thermal.ThermalMonitor, target_c: float, timeout_s: float, deadline: Deadline,
                  report: Report) -> None:
    """Wait (bounded by ``timeout_s`` and the job deadline) until the primary sensor is below ``target_c``."""
    bound = min(timeout_s, max(0.0, deadline.remaining_s()))
    waited = monitor.wait_to_cool(target_c, bound, thermal.POLL_S)
    if not waited["reached"]:
        now = waited["end_c"]
        report.warnings.append("thermal.wait_to_cool_c=%g not reached after %.1f s (%s at %s); measuring anyway"
                               % (target_c, waited["waited_s"], monitor.source,
                                  "unreadable" if now is None else "%.1f °C" % now))


def _accuracy(job: JobSpec, ev: EvalSpec, eval_paths: List[Path], session: runtimes.Session,
              fixed_batch: Optional[int], deadline: Deadline, rss: PeakRss) -> AccuracyResult:
    """Score the shards one after the other, each loaded, scored and dropped before the next is read."""

    def prep(batch_images: Any) -> Any:
        return accuracy.preprocess(batch_images, job.preprocess, job.artifact.layout)

    def between() -> None:
        rss.sample()
        deadline.check("the end of the accuracy run")

    scorer = accuracy.Scorer()
    for path in eval_paths:
        shard = accuracy.load_shard(path)
        rss.sample()
        shard.data = accuracy.inputs_in_layout(shard.data, job.artifact.input_shape, job.artifact.layout)
        accuracy.check_image_size(shard.data, job.artifact.input_shape, job.artifact.layout)
        accuracy.score_shard(session.run_all, shard, prep, ev.batch_size, fixed_batch, scorer, between)
        del shard
    shas = [s.sha256 for s in ev.shard_list()]
    return scorer.result(ev.split, accuracy.eval_digest(shas), shas)


def _stop(sensor: Optional[power.PowerSensor], report: Report) -> Optional[power.PowerWindow]:
    if sensor is None:
        return None
    try:
        return sensor.stop()
    except (SensorError, OSError, ValueError) as e:
        report.warnings.append("power not reported: %s" % e)
        return None
