"""Fleet health, persisted between runs: per device good / bad / unknown with the time of the last check.

A small JSON file (default ``results/fleet-state.json``), read-modify-written under ``flock`` and replaced
atomically, so concurrent controllers on one host do not lose each other's updates.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator

from host.files import write_text_atomic

DEFAULT_PATH = Path("results") / "fleet-state.json"
HEALTH = ("good", "bad", "unknown")


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def load(path: Path = DEFAULT_PATH) -> Dict[str, Dict[str, Any]]:
    with _locked(path):
        return _read(path)


def record(device_id: str, health: str, details: Dict[str, Any], path: Path = DEFAULT_PATH) -> Dict[str, Any]:
    if health not in HEALTH:
        raise ValueError(f"health must be one of {HEALTH}")
    entry = {"health": health, "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "details": details}
    with _locked(path):
        data = _read(path)
        data[device_id] = entry
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True, default=str))
    return entry
