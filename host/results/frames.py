"""Results as pandas DataFrames, and a run's measurements exported as Parquet or CSV (``edgeprune results export``).

    from host.results import frames as results
    results.runs()                          # one row per run (status, kind, devices, measurements)
    results.measurements("20261127-1200-ab12")   # one row per measurement: metrics, device, artifact, runtime
    results.evaluations(run_id)             # a search run's evaluations

Each function takes ``db`` (a URL or path; default ``EDGEPRUNE_DB``, else ``results/edgeprune.db``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from edgeprune.errors import UsageError
from host.results.store import Store

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

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
