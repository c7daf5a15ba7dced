"""The results store's tables and rows: the SQLAlchemy schema (runs, devices, artifacts, measurements, search
evaluations) and the flattening of one agent report into a ``measurements`` row.

Contract: pure definitions and pure functions (no engine, no connection, no file): :mod:`host.results.store` reads
and writes these tables; bump :data:`SCHEMA_VERSION` when a change needs a migration. Reports arrive as plain dicts
(:func:`agent.schema.dumps` form); :func:`dig` reads nested fields of them and of job specs without raising.
"""
from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Dict, Mapping, Optional

import sqlalchemy as sa

SCHEMA_VERSION = 1

metadata = sa.MetaData()

meta_table = sa.Table(
    "edgeprune_meta", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(255), nullable=False),
)

runs = sa.Table(
    "runs", metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("command", sa.JSON, nullable=False),           # argv, or the options the API was called with
    sa.Column("provenance", sa.JSON, nullable=False),        # host side: versions, git sha, seeds, ...
    sa.Column("summary", sa.JSON),                           # what the command reported at the end
    sa.Column("error", sa.Text),
)

devices = sa.Table(
    "devices", metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True),
    sa.Column("device_id", sa.String(128), primary_key=True),
    sa.Column("device_class", sa.String(64)),
    sa.Column("config", sa.JSON),                            # the device config as used (secrets never stored)
    sa.Column("identity", sa.JSON),                          # the agent's identity block: OS, kernel, firmware, ...
)

artifacts = sa.Table(
    "artifacts", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("model", sa.String(128)),
    sa.Column("format", sa.String(32)),
    sa.Column("manifest", sa.JSON),
    sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
)

measurements = sa.Table(
    "measurements", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),        # unique in the run: what was measured
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("label", sa.String(255), nullable=False),      # e.g. "ratio 0.5", "dense", "eval 3"
    sa.Column("model", sa.String(128)),
    sa.Column("artifact_sha256", sa.String(64), sa.ForeignKey("artifacts.sha256")),
    sa.Column("format", sa.String(32)),
    sa.Column("runtime", sa.String(64)),
    sa.Column("runtime_version", sa.String(64)),
    sa.Column("threads", sa.Integer),
    sa.Column("batch_size", sa.Integer),
    sa.Column("status", sa.String(16), nullable=False),      # ok | error
    sa.Column("error", sa.Text),
    sa.Column("latency_p50_ms", sa.Float),
    sa.Column("latency_p90_ms", sa.Float),
    sa.Column("latency_p99_ms", sa.Float),
    sa.Column("latency_mean_ms", sa.Float),
    sa.Column("latency_cv", sa.Float),
    sa.Column("iterations", sa.Integer),
    sa.Column("throughput_ips", sa.Float),
    sa.Column("power_w", sa.Float),
    sa.Column("power_source", sa.String(64)),
    sa.Column("power_modelled", sa.Boolean),
    sa.Column("energy_mj", sa.Float),
    sa.Column("memory_mb", sa.Float),
    sa.Column("top1", sa.Float),
    sa.Column("top5", sa.Float),
    sa.Column("eval_n", sa.Integer),
    sa.Column("throttled", sa.Boolean),
    sa.Column("macs", sa.BigInteger),
    sa.Column("params", sa.BigInteger),
    sa.Column("warnings", sa.JSON, nullable=False),
    sa.Column("samples_ms", sa.JSON, nullable=False),        # the latency samples the agent kept
    sa.Column("extra", sa.JSON, nullable=False),             # caller's context: ratio, plan sha, recovery, ...
    sa.Column("job", sa.JSON),                               # the job spec sent (timing protocol, runtime options)
    sa.Column("report", sa.JSON),                            # the agent's full report
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("run_id", "key", name="uq_measurement_key"),
)

evaluations = sa.Table(
    "evaluations", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.run_id", ondelete="CASCADE"), nullable=False),
    sa.Column("device_id", sa.String(128), nullable=False),
    sa.Column("key", sa.String(255), nullable=False),        # the candidate's key in the search
    sa.Column("seq", sa.Integer, nullable=False),            # the device's evaluation number in the search
    sa.Column("algo", sa.String(32)),
    sa.Column("ratio", sa.Float),
    sa.Column("recovery", sa.String(16)),
    sa.Column("ok", sa.Boolean, nullable=False),             # the device measured it
    sa.Column("meets", sa.Boolean),                          # it meets every target
    sa.Column("artifact_sha256", sa.String(64)),
    sa.Column("measurement_id", sa.Integer, sa.ForeignKey("measurements.id")),
    sa.Column("record", sa.JSON, nullable=False),            # the search's own record (plan, metrics, verdict)
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("run_id", "device_id", "key", name="uq_evaluation_key"),
)

MEASUREMENT_COLUMNS = [c.name for c in measurements.columns]


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)



def jsonable(obj: Any) -> Any:
    if obj is None:
        return None
    return json.loads(json.dumps(obj, default=str))


def dig(d: Any, *path: str) -> Any:
    """``d[path[0]][path[1]]...``, or None where a level is missing or not a mapping (agent reports, job specs)."""
    for p in path:
        if not isinstance(d, Mapping):
            return None
        d = d.get(p)
    return d


def measurement_row(run_id: str, key: str, *, device_id: str, report: Mapping[str, Any],
                    job: Optional[Mapping[str, Any]] = None, label: Optional[str] = None,
                    model: Optional[str] = None, manifest: Optional[Mapping[str, Any]] = None,
                    extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """The ``measurements`` row for one agent report (flattened metrics, plus the full report)."""
    report = jsonable(report) or {}
    job = jsonable(job)
    lat = dig(report, "timing", "latency_ms") or {}
    err = dig(report, "error")
    status = str(report.get("status") or "error")
    sha = (manifest or {}).get("sha256") or dig(job, "artifact", "sha256")
    fmt = (manifest or {}).get("format") or dig(job, "artifact", "format")
    extra = dict(extra or {})
    return dict(
        run_id=run_id, key=key, device_id=device_id, label=label or key,
        model=model or (manifest or {}).get("model"), artifact_sha256=sha or None, format=fmt,
        runtime=dig(report, "identity", "runtime") or dig(job, "runtime", "name"),
        runtime_version=dig(report, "identity", "runtime_version"),
        threads=dig(job, "runtime", "threads"),
        batch_size=dig(report, "timing", "batch_size") or dig(job, "timing", "batch_size"),
        status=status, error=(f"{err.get('type')}: {err.get('message')}" if isinstance(err, Mapping) else
                              (str(err) if err else None)),
        latency_p50_ms=lat.get("median"), latency_p90_ms=lat.get("p90"), latency_p99_ms=lat.get("p99"),
        latency_mean_ms=lat.get("mean"), latency_cv=lat.get("cv"),
        iterations=dig(report, "timing", "iterations"),
        throughput_ips=dig(report, "timing", "throughput_ips"),
        power_w=dig(report, "power", "mean_w"), power_source=dig(report, "power", "source"),
        power_modelled=dig(report, "power", "modelled"),
        energy_mj=dig(report, "power", "energy_mj_per_inference"),
        memory_mb=report.get("peak_rss_mb"),
        top1=dig(report, "accuracy", "top1"), top5=dig(report, "accuracy", "top5"),
        eval_n=dig(report, "accuracy", "n"),
        throttled=dig(report, "thermal", "throttled"),
        macs=extra.get("macs"), params=extra.get("params"),
        warnings=list(report.get("warnings") or []),
        samples_ms=list(dig(report, "timing", "samples_ms") or []),
        extra=extra, job=job, report=report, recorded_at=now())
