"""The search's state on disk: ``search.json`` (the run's options, devices and targets) and ``evaluations.jsonl``
(:class:`EvaluationLog`: every completed evaluation, appended and fsync'ed as it completes).

These two files are all ``--resume`` needs: :func:`read_run` gives back what :func:`write_run` wrote, and the
log serves every evaluation already done. A torn last line (the process died inside a write) is cut off when the
log is opened; any other unreadable line is a UsageError naming the file and line.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from edgeprune.errors import UsageError
from host.files import write_text_atomic
from host.fleet.devices import DeviceConfig
from host.fleet.targets import TargetSet
from host.search.options import EVALUATIONS, RUN_FILE, RUN_VERSION, SearchOptions

def now() -> str:
    """The local time, as the run files record it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class EvaluationLog:
    """``evaluations.jsonl``: append-only, one JSON object per line, each line written whole and fsync'ed.

    A torn last line (the process died inside a write) is cut off when the log is opened."""

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


def write_run(out: Path, run_id: str, opts: SearchOptions, devices: Sequence[DeviceConfig],
               targets: Mapping[str, TargetSet], workload: Optional[Dict[str, Any]] = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / RUN_FILE, json.dumps({
        "version": RUN_VERSION, "run_id": run_id, "created_at": now(), "status": "running",
        "options": opts.to_dict(), "workload": workload,
        "devices": [dict(d.model_dump(by_alias=True, mode="json"), source=d.source) for d in devices],
        "targets": {k: v.to_dict() for k, v in targets.items()}}, indent=1, sort_keys=True, default=str))


def stored_workload(out: Path) -> Optional[Dict[str, Any]]:
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


def iter_records(out: Path) -> Iterator[Dict[str, Any]]:
    """The evaluation records of a run folder, in the order they completed."""
    yield from EvaluationLog(Path(out) / EVALUATIONS).records
