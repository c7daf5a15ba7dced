"""The results store: every run, device, artifact, measurement and search evaluation, through SQLAlchemy.

Where it lives (first that is set): ``--db URL``, the ``EDGEPRUNE_DB`` environment variable, then SQLite at
``results/edgeprune.db``. A URL is ``sqlite:///path``, a plain file path (SQLite), or ``postgresql://user@host/db``
(PostgreSQL through psycopg 3, for labs whose several host machines share one history).

Durability: each result is written in its own transaction as it arrives (a measurement with its artifact and
device rows, or a search evaluation), so a killed process leaves what completed and nothing half-written. A run
is ``running`` until its command finishes it (``complete`` or ``failed``); a ``running`` run whose process is
gone is listed as ``interrupted``. Results are keyed (run, key): recording the same key twice (a retried or resumed
job) stores it once; recording a different result under a used key is an error.

Two writers: SQLite runs in WAL mode with ``BEGIN IMMEDIATE`` transactions and a busy timeout, so two processes
writing at once queue rather than fail; on PostgreSQL a transaction that loses a race on a shared row (the same
artifact recorded by two hosts) is retried.

The tables, and how an agent report becomes a ``measurements`` row, are :mod:`host.results.tables`.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError

from edgeprune.errors import StoreError, UsageError
from host.results.tables import (MEASUREMENT_COLUMNS, SCHEMA_VERSION, artifacts, devices, evaluations,
                                 jsonable as _jsonable, measurement_row, measurements, meta_table, metadata, now,
                                 runs)

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

DEFAULT_PATH = Path("results") / "edgeprune.db"
ENV = "EDGEPRUNE_DB"
RUN_KINDS = ("demo", "bench", "search", "ab")
RUN_STATUSES = ("running", "complete", "failed", "interrupted")

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ where


def resolve_url(db: Optional[str] = None, *, where: str = "--db") -> URL:
    """The store's SQLAlchemy URL from ``db`` (``--db``), else ``EDGEPRUNE_DB``, else the default SQLite file."""
    if db is None or db == "":
        env = os.environ.get(ENV)
        if env:
            db, where = env, ENV
    if db is None or db == "":
        return URL.create("sqlite", database=str(DEFAULT_PATH))
    if "://" not in db:                       # a plain path: SQLite
        return URL.create("sqlite", database=str(Path(db).expanduser()))
    try:
        url = make_url(db)
    except ArgumentError as e:
        raise UsageError(f"{where}: {_safe(db)} is not a database URL ({e})") from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise UsageError(f"{where}: give SQLite a file (sqlite:///results/edgeprune.db); an in-memory "
                             "database would lose every result when the command exits")
        return url
    if backend in ("postgresql", "postgres"):
        if "+" not in url.drivername:      # psycopg 3 (the postgres extra), whatever SQLAlchemy's default is
            url = url.set(drivername="postgresql+psycopg")
        return url
    raise UsageError(f"{where}: {_safe(db)}: unsupported database {backend!r}; use sqlite:///FILE, a file path or "
                     "postgresql://USER@HOST/DB")


def _safe(db: str) -> str:
    """A URL as it may be printed: without its password."""
    try:
        return make_url(db).render_as_string(hide_password=True)
    except Exception:
        return "the given URL"


def display(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return str(url.database)
    return url.render_as_string(hide_password=True)


# ------------------------------------------------------------------------------------------ run ids
RUN_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def new_run_id() -> str:
    """A fresh run id: the local time and four random hex digits (``20261204-221503-9f2c``)."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def check_run_id(run_id: str) -> str:
    """``run_id`` itself when it is a valid run id (it names files and rows), else :class:`UsageError`."""
    if not RUN_ID_RE.match(run_id):
        raise UsageError(f"--run-id: {run_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    return run_id


# ------------------------------------------------------------------------------------------ the store


class Store:
    """One results database. Thread-safe: the fleet's worker threads record through one Store."""

    def __init__(self, db: Optional[str] = None, *, where: str = "--db", create: bool = True) -> None:
        self.url = resolve_url(db, where=where)
        self.where = where
        self.name = display(self.url)
        sqlite = self.url.get_backend_name() == "sqlite"
        if sqlite:
            path = Path(self.url.database or "")
            if not create and not path.exists():
                raise StoreError(f"{where}: {path}: no results database there (nothing has been recorded yet)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"{where}: {path}: cannot create its folder: {e}") from None
            self.engine: Engine = sa.create_engine(self.url, connect_args={"timeout": 60, "isolation_level": None})
            sa.event.listen(self.engine, "connect", _sqlite_on_connect)
            sa.event.listen(self.engine, "begin", _sqlite_begin_immediate)
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
        try:
            self._create()
        except DBAPIError as e:
            self.engine.dispose()
            raise StoreError(f"{where}: cannot open the results database {self.name}: "
                             f"{_first_line(e.orig or e)}") from None

    def _create(self) -> None:
        def go(conn: sa.Connection) -> None:
            metadata.create_all(conn, checkfirst=True)
            row = conn.execute(sa.select(meta_table.c.value).where(meta_table.c.name == "schema_version")).first()
            if row is None:
                conn.execute(meta_table.insert().values(name="schema_version", value=str(SCHEMA_VERSION)))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.where}: {self.name} has results schema v{row[0]}; this edgeprune reads up "
                                 f"to v{SCHEMA_VERSION}: upgrade edgeprune")
        try:
            self._tx(go)
        except IntegrityError:   # another process created the tables at the same moment
            self._tx(go)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------------------------- transactions

    def _tx(self, fn: Callable[[sa.Connection], T], attempts: int = 8) -> T:
        """Run ``fn`` in one transaction; retry when it lost a race with another writer."""
        delay = 0.05
        for i in range(attempts):
            try:
                with self.engine.begin() as conn:
                    return fn(conn)
            except (IntegrityError, OperationalError) as e:
                if i == attempts - 1 or not _retryable(e):
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # -------------------------------------------------------------------------------- writing

    def start_run(self, run_id: str, kind: str, *, command: Any, provenance: Mapping[str, Any],
                  resume: bool = False) -> None:
        """Record a new run as ``running``. A run id already in the store is an error unless ``resume`` (then the
        run must be of the same kind; it becomes ``running`` again and keeps what it recorded)."""
        if kind not in RUN_KINDS:
            raise ValueError(kind)

        def go(conn: sa.Connection) -> None:
            row = conn.execute(sa.select(runs.c.kind, runs.c.status).where(runs.c.run_id == run_id)).first()
            if row is not None and not resume:
                raise StoreError(f"--run-id: {run_id!r} is already in the results store {self.name} "
                                 f"({row.kind}, {row.status}); choose another id"
                                 + (" or resume it" if kind == "search" == row.kind else ""))
            if row is not None:
                if row.kind != kind:
                    raise StoreError(f"--resume: {run_id!r} is a {row.kind} run in {self.name}, not a {kind} run")
                conn.execute(runs.update().where(runs.c.run_id == run_id).values(
                    status="running", finished_at=None, error=None, host=socket.gethostname(), pid=os.getpid()))
                return
            conn.execute(runs.insert().values(
                run_id=run_id, kind=kind, status="running", started_at=now(), host=socket.gethostname(),
                pid=os.getpid(), command=_jsonable(command), provenance=_jsonable(provenance)))
        self._tx(go)

    def finish_run(self, run_id: str, status: str = "complete", *, summary: Any = None,
                   error: Optional[str] = None) -> None:
        if status not in RUN_STATUSES[1:]:
            raise ValueError(status)
        self._tx(lambda conn: conn.execute(runs.update().where(runs.c.run_id == run_id).values(
            status=status, finished_at=now(), summary=_jsonable(summary), error=error)))

    def add_device(self, run_id: str, device_id: str, *, device_class: Optional[str] = None,
                   config: Any = None, identity: Any = None) -> None:
        """Record a device of a run (its config as used; its identity once an agent has reported it)."""
        self._tx(lambda conn: _upsert_device(conn, run_id, device_id, device_class, config, identity))

    def record_measurement(self, run_id: str, key: str, *, device_id: str, report: Mapping[str, Any],
                           job: Optional[Mapping[str, Any]] = None, label: Optional[str] = None,
                           model: Optional[str] = None, manifest: Optional[Mapping[str, Any]] = None,
                           device_class: Optional[str] = None, extra: Optional[Mapping[str, Any]] = None) -> int:
        """Record one agent report (as a dict, :func:`agent.schema.dumps` form) in one transaction, with its
        artifact and the device's identity; its id. The same ``key`` recorded again with the same report is a
        no-op (returns the stored id); with a different report, an error."""
        row = measurement_row(run_id, key, device_id=device_id, report=report, job=job, label=label, model=model,
                              manifest=manifest, extra=extra)
        identity = report.get("identity") if isinstance(report, Mapping) else None

        def go(conn: sa.Connection) -> int:
            found = conn.execute(sa.select(measurements.c.id, measurements.c.report).where(
                (measurements.c.run_id == run_id) & (measurements.c.key == key))).first()
            if found is not None:
                if _canon(found.report) == _canon(row["report"]):
                    return int(found.id)
                raise StoreError(f"results store {self.name}: run {run_id!r} already has a different result "
                                 f"recorded under {key!r}")
            if manifest is not None and row["artifact_sha256"]:
                if conn.execute(sa.select(artifacts.c.sha256).where(
                        artifacts.c.sha256 == row["artifact_sha256"])).first() is None:
                    conn.execute(artifacts.insert().values(
                        sha256=row["artifact_sha256"], model=row["model"], format=row["format"],
                        manifest=_jsonable(manifest), first_seen=now()))
            _upsert_device(conn, run_id, device_id, device_class, None, identity)
            return int(conn.execute(measurements.insert().values(**row)).inserted_primary_key[0])
        return self._tx(go)

    def record_evaluation(self, run_id: str, device_id: str, key: str, record: Mapping[str, Any], *,
                          seq: Optional[int] = None, algo: Optional[str] = None, ratio: Optional[float] = None,
                          recovery: Optional[str] = None, ok: bool, meets: Optional[bool] = None,
                          artifact_sha256: Optional[str] = None, measurement_id: Optional[int] = None) -> None:
        """Record one search evaluation (idempotent on (run, device, key)); ``seq`` defaults to the device's
        next number."""
        def go(conn: sa.Connection) -> None:
            where = (evaluations.c.run_id == run_id) & (evaluations.c.device_id == device_id)
            if conn.execute(sa.select(evaluations.c.id).where(where & (evaluations.c.key == key))).first():
                return
            n = seq if seq is not None else 1 + int(conn.execute(
                sa.select(sa.func.count()).select_from(evaluations).where(where)).scalar_one())
            conn.execute(evaluations.insert().values(
                run_id=run_id, device_id=device_id, key=key, seq=int(n), algo=algo, ratio=ratio, recovery=recovery,
                ok=bool(ok), meets=meets, artifact_sha256=artifact_sha256, measurement_id=measurement_id,
                record=_jsonable(record), recorded_at=now()))
        self._tx(go)

    def set_verdicts(self, run_id: str, device_id: str, meets: Mapping[str, Optional[bool]]) -> None:
        """Set ``meets`` of a device's evaluations by key (known once the dense result resolves the targets)."""
        def go(conn: sa.Connection) -> None:
            for key, ok in meets.items():
                conn.execute(evaluations.update().where(
                    (evaluations.c.run_id == run_id) & (evaluations.c.device_id == device_id)
                    & (evaluations.c.key == key)).values(meets=ok))
        self._tx(go)

    # -------------------------------------------------------------------------------- reading

    def run(self, run_id: str, *, where: str = "RUN") -> Dict[str, Any]:
        """One run as a dict (``status`` says ``interrupted`` for a running run whose process is gone)."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(runs).where(runs.c.run_id == run_id)).mappings().first()
        if row is None:
            known = [r["run_id"] for r in self.list_runs()[-5:]]
            raise StoreError(f"{where}: no run {run_id!r} in the results store {self.name}"
                             + (f"; latest: {', '.join(known)}" if known else " (it holds no runs)"))
        return _run_dict(row)

    def list_runs(self) -> List[Dict[str, Any]]:
        """Every run, oldest first, with its device and measurement counts."""
        n_meas = sa.select(sa.func.count()).where(measurements.c.run_id == runs.c.run_id).scalar_subquery()
        n_dev = sa.select(sa.func.count()).where(devices.c.run_id == runs.c.run_id).scalar_subquery()
        q = sa.select(runs, n_meas.label("measurements"), n_dev.label("devices")).order_by(runs.c.started_at,
                                                                                           runs.c.run_id)
        with self.engine.connect() as conn:
            return [_run_dict(r) for r in conn.execute(q).mappings()]

    def devices(self, run_id: str) -> List[Dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(
                sa.select(devices).where(devices.c.run_id == run_id).order_by(devices.c.device_id)).mappings()]

    def measurements(self, run_id: Optional[str] = None) -> List[Dict[str, Any]]:
        q = sa.select(measurements).order_by(measurements.c.id)
        if run_id is not None:
            q = q.where(measurements.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def evaluations(self, run_id: str) -> List[Dict[str, Any]]:
        q = sa.select(evaluations).where(evaluations.c.run_id == run_id).order_by(evaluations.c.device_id,
                                                                                   evaluations.c.seq)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def artifact(self, sha256: str) -> Optional[Dict[str, Any]]:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(artifacts).where(artifacts.c.sha256 == sha256)).mappings().first()
        return dict(r) if r is not None else None

    # -------------------------------------------------------------------------------- DataFrames

    def runs_frame(self) -> "pd.DataFrame":
        import pandas as pd
        cols = ["run_id", "kind", "status", "started_at", "finished_at", "host", "devices", "measurements"]
        return pd.DataFrame([{c: r.get(c) for c in cols} for r in self.list_runs()], columns=cols)

    def measurements_frame(self, run_id: Optional[str] = None, *, with_blobs: bool = False) -> "pd.DataFrame":
        """One row per measurement; ``with_blobs`` keeps the samples, job and full report columns."""
        import pandas as pd
        drop = set() if with_blobs else {"samples_ms", "job", "report"}
        cols = [c for c in MEASUREMENT_COLUMNS if c not in drop]
        return pd.DataFrame([{c: r[c] for c in cols} for r in self.measurements(run_id)], columns=cols)

    def evaluations_frame(self, run_id: str) -> "pd.DataFrame":
        import pandas as pd
        cols = [c.name for c in evaluations.columns]
        return pd.DataFrame(self.evaluations(run_id), columns=cols)


# ------------------------------------------------------------------------------------------ one run


class RunRecorder:
    """Records one command's run: ``with RunRecorder(store, run_id, "bench", ...) as rec:`` starts it, each
    ``rec.measurement(...)``/``rec.evaluation(...)`` is one transaction, and leaving the block finishes it
    (``complete``; ``interrupted`` on Ctrl-C; ``failed`` with the error otherwise). A process killed inside
    the block leaves the run ``running`` (listed as ``interrupted``) with what it recorded."""

    def __init__(self, store: Store, run_id: str, kind: str, *, command: Any = None,
                 provenance: Optional[Mapping[str, Any]] = None, resume: bool = False) -> None:
        from host.results.provenance import host_provenance

        self.store, self.run_id, self.kind, self.resume = store, run_id, kind, resume
        self.command = command if command is not None else list(__import__("sys").argv)
        self.provenance = dict(provenance) if provenance is not None else host_provenance()
        self.summary: Any = None
        self.started = False

    def __enter__(self) -> "RunRecorder":
        self.store.start_run(self.run_id, self.kind, command=self.command, provenance=self.provenance,
                             resume=self.resume)
        self.started = True
        return self

    def __exit__(self, tp: Any, exc: Any, _tb: Any) -> None:
        if tp is None:
            self.store.finish_run(self.run_id, "complete", summary=self.summary)
        elif issubclass(tp, KeyboardInterrupt):
            self.store.finish_run(self.run_id, "interrupted", summary=self.summary, error="interrupted (Ctrl-C)")
        else:
            self.store.finish_run(self.run_id, "failed", summary=self.summary, error=f"{tp.__name__}: {exc}")

    def device(self, dev: Any) -> None:
        """Record a device of the run with its config (a :class:`host.fleet.devices.DeviceConfig` or a dict)."""
        config = dev.model_dump(mode="json", by_alias=True) if hasattr(dev, "model_dump") else dict(dev)
        self.store.add_device(self.run_id, str(config.get("id")), device_class=config.get("class")
                              or config.get("device_class"), config=_scrub(config))

    def measurement(self, key: str, *, device_id: str, report: Any, job: Any = None, label: Optional[str] = None,
                    model: Optional[str] = None, manifest: Any = None,
                    extra: Optional[Mapping[str, Any]] = None) -> int:
        return self.store.record_measurement(
            self.run_id, key, device_id=device_id, report=_as_dict(report), job=_as_dict(job), label=label,
            model=model, manifest=_as_dict(manifest), extra=extra)

    def evaluation(self, device_id: str, key: str, record: Mapping[str, Any], **kw: Any) -> None:
        self.store.record_evaluation(self.run_id, device_id, key, record, **kw)


def _as_dict(obj: Any) -> Any:
    if obj is None or isinstance(obj, Mapping):
        return obj
    from dataclasses import asdict, is_dataclass
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    raise TypeError(f"cannot record a {type(obj).__name__}")


SECRET_FIELDS = ("password", "passphrase", "secret", "token")


def _scrub(obj: Any) -> Any:
    """A config without secrets (any key naming one)."""
    if isinstance(obj, Mapping):
        return {k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_FIELDS) and v else _scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ helpers


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=60000")
    cur.close()


def _sqlite_begin_immediate(conn: sa.Connection) -> None:
    # take the write lock at BEGIN: two writers queue on the busy timeout instead of deadlocking on an upgrade
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _retryable(e: DBAPIError) -> bool:
    if isinstance(e, IntegrityError):
        return True
    text = str(e.orig or e).lower()
    return any(s in text for s in ("database is locked", "deadlock", "could not serialize", "busy"))


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def _upsert_device(conn: sa.Connection, run_id: str, device_id: str, device_class: Optional[str], config: Any,
                   identity: Any) -> None:
    row = conn.execute(sa.select(devices.c.device_class, devices.c.config, devices.c.identity).where(
        (devices.c.run_id == run_id) & (devices.c.device_id == device_id))).first()
    if row is None:
        conn.execute(devices.insert().values(run_id=run_id, device_id=device_id, device_class=device_class,
                                             config=_jsonable(config), identity=_jsonable(identity)))
        return
    values: Dict[str, Any] = {}
    if device_class is not None and row.device_class != device_class:
        values["device_class"] = device_class
    if config is not None:
        values["config"] = _jsonable(config)
    if identity is not None and row.identity != _jsonable(identity):
        values["identity"] = _jsonable(identity)
    if values:
        conn.execute(devices.update().where((devices.c.run_id == run_id) & (devices.c.device_id == device_id))
                     .values(**values))


def _run_dict(row: Mapping[str, Any]) -> Dict[str, Any]:
    d = dict(row)
    if d.get("status") == "running" and d.get("host") == socket.gethostname() and not _alive(d.get("pid")):
        d["status"] = "interrupted"
    return d


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    # a zombie (killed, not yet reaped by its parent) is gone too
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True

