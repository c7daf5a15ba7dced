"""Exclusive device leases, taken on the device itself so that two host controllers (on one machine or on
several) never benchmark the same device at once.

A lease is ``<dir>/lease.json``: holder (host, user, pid, free-form label), a random token, and an expiry time.
Every read-modify-write happens under ``fcntl.flock`` on ``<dir>/lease.lock``, so two controllers racing for
a free or expired lease cannot both win. An expired lease is taken over; a lease is released only with its
token; the holder renews it while a job runs (``renew``). Times are the device's own clock (UNIX seconds), so
hosts with skewed clocks still agree.

An acquire may carry a ``request`` id, a random string the controller makes once and repeats when it retries:
when the reply to an acquire that succeeded is lost with its connection, the retry finds the live lease taken
with its own request id and gets that lease (and token) back, instead of waiting out the TTL of a lease it holds
itself. Like the token, the request id is never shown to anyone else.
"""
from __future__ import annotations

import fcntl
import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

LEASE_FILE = "lease.json"
LOCK_FILE = "lease.lock"


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(str(directory / LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(directory: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads((directory / LEASE_FILE).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None  # no lease, or a torn/corrupt file: treated as free (we hold the lock, so not torn by us)


def _write(directory: Path, lease: Dict[str, Any]) -> None:
    tmp = directory / (LEASE_FILE + ".tmp")
    tmp.write_text(json.dumps(lease, sort_keys=True))
    os.replace(str(tmp), str(directory / LEASE_FILE))


def _live(lease: Optional[Dict[str, Any]], now: float) -> bool:
    return lease is not None and float(lease.get("expires_at", 0)) > now


SECRET = ("token", "request")    # what only the holder knows: never in what other controllers see


def _public(lease: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {k: v for k, v in (lease or {}).items() if k not in SECRET}


def show(directory: Path, now: Optional[float] = None) -> Dict[str, Any]:
    now = time.time() if now is None else now
    with _locked(directory):
        lease = _read(directory)
    return {"held": _live(lease, now), "lease": _public(lease) or None, "now": now}


def acquire(directory: Path, holder: Dict[str, Any], ttl_s: float, now: Optional[float] = None,
            request: Optional[str] = None) -> Dict[str, Any]:
    """Take the lease if it is free or expired. Returns ``{"acquired": bool, "lease": ..., "token"?: str}``.

    ``request``: the caller's id for this acquire, repeated on a retry; a live lease taken with the same id is
    the caller's own (its reply was lost): it is renewed and returned, with ``"again": true``."""
    if ttl_s <= 0:
        raise ValueError("ttl_s must be > 0")
    now = time.time() if now is None else now
    with _locked(directory):
        current = _read(directory)
        if _live(current, now):
            assert current is not None
            if request and current.get("request") == request:
                current["expires_at"] = now + ttl_s
                _write(directory, current)
                return {"acquired": True, "again": True, "lease": _public(current), "token": current["token"],
                        "now": now}
            return {"acquired": False, "lease": _public(current), "now": now}
        lease = {"holder": holder, "token": secrets.token_hex(16), "acquired_at": now, "expires_at": now + ttl_s,
                 "took_over": _public(current) if current else None}
        if request:
            lease["request"] = request
        _write(directory, lease)
    return {"acquired": True, "lease": _public(lease), "token": lease["token"], "now": now}


def renew(directory: Path, token: str, ttl_s: float, now: Optional[float] = None) -> Dict[str, Any]:
    now = time.time() if now is None else now
    with _locked(directory):
        current = _read(directory)
        if current is None or current.get("token") != token:
            return {"renewed": False, "reason": "not the holder (lease expired and was taken over, or released)"}
        current["expires_at"] = now + ttl_s
        _write(directory, current)
    return {"renewed": True, "expires_at": now + ttl_s}


def release(directory: Path, token: str) -> Dict[str, Any]:
    with _locked(directory):
        current = _read(directory)
        if current is None or current.get("token") != token:
            return {"released": False, "reason": "not the holder"}
        (directory / LEASE_FILE).unlink()
    return {"released": True}
