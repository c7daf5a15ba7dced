"""Results as pandas DataFrames, and ``edgeprune results list|export``.

    from host.results import frames as results
    results.runs()                          # one row per run (status, kind, devices, measurements)
    results.measurements("20261127-1200-ab12")   # one row per measurement: metrics, device, artifact, runtime
    results.evaluations(run_id)             # a search run's evaluations

Each function takes ``db`` (a URL or path; default ``EDGEPRUNE_DB``, else ``results/edgeprune.db``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from edgeprune.errors import UsageError
from host.results.store import Store

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from rich.console import Console

EXPORT_FORMATS = ("parquet", "csv")


def runs(db: Optional[str] = None) -> "pd.DataFrame":
    with Store(db, create=False) as s:
        return s.runs_frame()


def measurements(run_id: Optional[str] = None, db: Optional[str] = None, *,
                 with_blobs: bool = False) -> "pd.DataFrame":
    with Store(db, create=False) as s:
        if run_id is not None:
            s.run(run_id)
        return s.measurements_frame(run_id, with_blobs=with_blobs)


def evaluations(run_id: str, db: Optional[str] = None) -> "pd.DataFrame":
    with Store(db, create=False) as s:
        s.run(run_id)
        return s.evaluations_frame(run_id)


def export_run(store: Store, run_id: str, fmt: str, path: Path, *, samples: bool = False) -> Path:
    """Write a run's measurements to ``path`` (parquet or csv), one row per measurement. JSON-valued columns
    (warnings, extra; with ``samples`` also samples_ms, job and report) become JSON text in CSV, and stay
    nested in Parquet except the free-form ones (extra, job, report: JSON text)."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format: one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    store.run(run_id, where="RUN")
    df = store.measurements_frame(run_id, with_blobs=samples)
    for col in ("extra", "job", "report"):
        if col in df.columns:
            df[col] = [json.dumps(v, sort_keys=True) if v is not None else None for v in df[col]]
    if fmt == "csv":
        for col in ("warnings", "samples_ms"):
            if col in df.columns:
                df[col] = [json.dumps(v) for v in df[col]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "csv":
            df.to_csv(tmp, index=False)
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise UsageError("--format parquet: needs pyarrow (pip install pyarrow)") from None
            df.to_parquet(tmp, index=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------ the command


def register(sub: "argparse._SubParsersAction") -> None:
    from host.cli import _db_arg

    r = sub.add_parser("results", help="the results store: list runs, export a run's measurements")
    rs = r.add_subparsers(dest="results_command", required=True)
    ls = rs.add_parser("list", help="every run in the store, oldest first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    _db_arg(ls)
    ex = rs.add_parser("export", help="a run's measurements as Parquet or CSV")
    ex.add_argument("run", metavar="RUN", help="run id (see `edgeprune results list`)")
    ex.add_argument("--format", default="parquet", help="parquet (default) or csv")
    ex.add_argument("-o", "--output", type=Path, default=None, help="file to write (default results/<RUN>.<format>)")
    ex.add_argument("--samples", action="store_true",
                    help="include the latency samples, the job spec and the full agent report")
    _db_arg(ex)
    r.set_defaults(handler=main_results)


def main_results(args: argparse.Namespace, console: "Console") -> int:
    from rich.table import Table

    if args.results_command == "export":
        if args.format not in EXPORT_FORMATS:
            raise UsageError(f"--format: one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
        with Store(args.db, create=False) as store:
            out = args.output or Path("results") / f"{args.run}.{args.format}"
            path = export_run(store, args.run, args.format, out, samples=args.samples)
            n = len(store.measurements(args.run))
        console.print(f"wrote {n} measurement(s) of run {args.run} to {path}", highlight=False)
        return 0
    with Store(args.db, create=False) as store:
        rows = store.list_runs()
        name = store.name
    if args.json:
        print(json.dumps([{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                           if k in ("run_id", "kind", "status", "started_at", "finished_at", "host", "devices",
                                    "measurements", "error")} for r in rows], indent=1))
        return 0
    table = Table(title=f"runs in {name}")
    for col in ("run id", "kind", "status", "started", "devices", "measurements", "host"):
        table.add_column(col, justify="right" if col in ("devices", "measurements") else "left")
    colour = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for r in rows:
        started = r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r.get("started_at") else ""
        table.add_row(r["run_id"], r["kind"], f"[{colour.get(r['status'], 'white')}]{r['status']}[/]", started,
                      str(r["devices"]), str(r["measurements"]), str(r["host"]))
    console.print(table)
    if not rows:
        console.print("no runs recorded yet: `edgeprune demo`, `bench` and `search` record theirs")
    return 0

