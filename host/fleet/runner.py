"""Run jobs on many devices at once: one transport and one exclusive lease per device, retries with backoff for
infrastructure failures only, and a result *or* an error per device, so one bad device never stops the others.

Leases live on the device (``python -m agent lease``, see :mod:`agent.lease`). A controller renews its lease in
the background while it works; if the controller dies, renewal stops and the lease expires after ``ttl_s``,
after which another controller takes it over. Leases are released on every normal and exceptional exit.
"""
from __future__ import annotations

import getpass
import json
import logging
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from agent import schema
from edgeprune.errors import DeviceBusy, DeviceError, InfrastructureError
from host.fleet.devices import DeviceConfig
from host.fleet.transport import LocalTransport

if TYPE_CHECKING:  # pragma: no cover
    from host.fleet.pool import TransportPool

log = logging.getLogger(__name__)

Events = Callable[[str, str, str], None]  # (device id, kind, message)


def transport_for(dev: DeviceConfig) -> Any:
    if dev.transport == "ssh":
        from host.fleet.ssh import SSHTransport  # paramiko is only needed for SSH devices

        return SSHTransport(dev, session=dev.agent_session)
    return LocalTransport(python=dev.python, cache_dir=Path(dev.cache_dir) if dev.cache_dir else None,
                          session=dev.agent_session)


def holder_identity(label: str = "") -> Dict[str, Any]:
    return {"host": socket.gethostname(), "user": getpass.getuser(), "pid": os.getpid(), "label": label}


def lease_request(transport: Any, device_id: str, action: str, **fields: Any) -> Dict[str, Any]:
    """``agent.lease``'s ``action`` (acquire, renew, release, show) on the device: through the agent session where
    the transport has one, else as ``python -m agent lease`` (one command)."""
    if getattr(transport, "use_session", False):
        reply = transport.agent_request("lease", 60.0, action=action, dir=transport.cache_dir(), **fields)
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}
    args = [action]
    for key, value in fields.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value) if key == "holder"
                 else str(value)]
    rc, out, err = transport.exec_agent(["lease", *args, "--dir", transport.cache_dir()], timeout=60)
    if rc != 0:
        raise InfrastructureError(f"{device_id}: lease {action} failed (exit {rc}): {err.strip()[-500:]}")
    try:
        return json.loads(out)
    except ValueError:
        raise InfrastructureError(f"{device_id}: lease {action}: agent printed no JSON") from None


class Lease:
    """The device's exclusive lease for the duration of a ``with`` block, renewed in the background."""

    def __init__(self, transport: Any, device_id: str, *, ttl_s: float = 120.0, wait_s: float = 300.0,
                 poll_s: float = 2.0, label: str = "") -> None:
        self.transport, self.device_id = transport, device_id
        self.ttl_s, self.wait_s, self.poll_s = ttl_s, wait_s, poll_s
        self.holder = holder_identity(label)
        # repeated by every acquire of this lease: when an acquire's reply is lost with its connection, the retry
        # gets the lease it took back (agent.lease.acquire) instead of waiting out its TTL
        self.request = secrets.token_hex(16)
        self.token: Optional[str] = None
        self.waited_s = 0.0
        self._stop = threading.Event()
        self._renewer: Optional[threading.Thread] = None

    def _agent(self, action: str, **fields: Any) -> Dict[str, Any]:
        return lease_request(self.transport, self.device_id, action, **fields)

    def __enter__(self) -> "Lease":
        t0 = time.monotonic()
        while True:
            got = self._agent("acquire", holder=self.holder, ttl=self.ttl_s, request=self.request)
            if got.get("acquired"):
                self.token = got["token"]
                break
            if time.monotonic() - t0 >= self.wait_s:
                other = (got.get("lease") or {}).get("holder", {})
                until = (got.get("lease") or {}).get("expires_at", 0) - got.get("now", 0)
                raise DeviceBusy(f"{self.device_id}: leased by {other.get('user')}@{other.get('host')} "
                                 f"pid {other.get('pid')} ({other.get('label') or 'no label'}) for another "
                                 f"{until:.0f} s; waited {self.wait_s:.0f} s")
            time.sleep(self.poll_s)
        self.waited_s = time.monotonic() - t0
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.device_id}", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self._agent("renew", token=str(self.token), ttl=self.ttl_s).get("renewed"):
                    log.warning("%s: lease lost (expired and taken over?)", self.device_id)
                    return
            except DeviceError as e:
                log.warning("%s: lease renewal failed: %s", self.device_id, e)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5)
        if self.token is not None:
            for attempt in range(3):
                try:
                    self._agent("release", token=self.token)
                    break
                except DeviceError as e:
                    # a connection lost at the end of a run: reconnect and release (a lease held for nothing would
                    # keep the next controller waiting ttl_s); an unreachable device (timed out) is left to the TTL
                    if attempt == 2 or not e.infrastructure or getattr(e, "timed_out", False):
                        log.warning("%s: lease release failed (it expires in %.0f s): %s", self.device_id,
                                    self.ttl_s, e)
                        break
                    time.sleep(attempt + 1)
            self.token = None


@dataclass
class DeviceOutcome:
    device_id: str
    report: Optional[schema.Report] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    attempts: int = 0
    seconds: float = 0.0
    lease_wait_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.report is not None and self.report.status == "ok"


def run_on_device(dev: DeviceConfig, job: schema.JobSpec, workdir: Path, *, retries: int = 2, backoff_s: float = 2.0,
                  lease_wait_s: float = 300.0, lease_ttl_s: float = 120.0, events: Optional[Events] = None,
                  transport_factory: Callable[[DeviceConfig], Any] = transport_for,
                  pool: Optional["TransportPool"] = None) -> DeviceOutcome:
    """Run ``job`` on ``dev`` under its lease; never raises for a device problem. With ``pool``, the device's
    transport (and its agent session) is the pool's, kept open for the next job; else one made for this job.

    Infrastructure failures (:attr:`DeviceError.infrastructure`: connection lost, timeout, no report) are
    retried after ``backoff_s * 2**n`` on a fresh connection, at most ``retries`` times in all, whether they
    happen while taking the lease (the device's first contact, which may upload the agent) or running the job."""
    emit = events or (lambda *a: None)
    out = DeviceOutcome(dev.id)
    t0 = time.monotonic()
    transport = None
    failures = 0

    def retry_or_raise(e: DeviceError) -> None:
        nonlocal failures
        if not e.infrastructure or failures == retries:
            raise e
        delay = backoff_s * 2 ** failures
        failures += 1
        emit(dev.id, "retry", f"{e}; retrying in {delay:.0f} s")
        if transport is not None:
            transport.close()  # reconnect on the next attempt
        time.sleep(delay)

    try:
        transport = pool.get(dev) if pool is not None else transport_factory(dev)
        emit(dev.id, "lease", "taking the device lease")
        lease = Lease(transport, dev.id, ttl_s=lease_ttl_s, wait_s=lease_wait_s, label=job.job_id)
        while True:
            try:
                lease.__enter__()
                break
            except DeviceError as e:
                retry_or_raise(e)
        try:
            out.lease_wait_s = lease.waited_s
            while True:
                out.attempts += 1
                emit(dev.id, "run", f"running {job.job_id} (attempt {out.attempts})")
                try:
                    out.report = transport.run_job(job, Path(workdir) / dev.id / job.job_id)
                    break
                except DeviceError as e:
                    retry_or_raise(e)
        finally:
            lease.__exit__(None, None, None)
    except DeviceError as e:
        out.error, out.error_type = str(e), type(e).__name__
    except Exception as e:  # one broken device must not stop the others; say what happened
        log.exception("%s: unexpected failure", dev.id)
        out.error, out.error_type = f"{type(e).__name__}: {e}", type(e).__name__
    finally:
        if transport is not None and pool is None:
            transport.close()
        out.seconds = time.monotonic() - t0
    if out.report is not None and out.report.status != "ok" and out.report.error is not None:
        out.error, out.error_type = out.report.error.message, out.report.error.type
    emit(dev.id, "done", "ok" if out.ok else f"{out.error_type}: {out.error}")
    return out


def run_on_devices(devices: List[DeviceConfig], job_for: Callable[[DeviceConfig], schema.JobSpec], workdir: Path,
                   *, max_workers: Optional[int] = None,
                   on_outcome: Optional[Callable[[DeviceConfig, Optional[schema.JobSpec], DeviceOutcome], None]] = None,
                   **kw: Any) -> List[DeviceOutcome]:
    """Run each device's job in parallel; outcomes in the order of ``devices``. ``on_outcome(device, job,
    outcome)`` is called as each device finishes (from its worker thread; the job is None when it could not be
    built), so a caller can record each result as it arrives rather than when the slowest device is done."""
    jobs = []
    outcomes: Dict[str, DeviceOutcome] = {}
    for dev in devices:
        try:
            jobs.append((dev, job_for(dev)))
        except DeviceError as e:
            outcomes[dev.id] = DeviceOutcome(dev.id, error=str(e), error_type=type(e).__name__)
            if on_outcome is not None:
                on_outcome(dev, None, outcomes[dev.id])

    def one(dev: DeviceConfig, job: schema.JobSpec) -> DeviceOutcome:
        outcome = run_on_device(dev, job, workdir, **kw)
        if on_outcome is not None:
            on_outcome(dev, job, outcome)
        return outcome

    with ThreadPoolExecutor(max_workers=max_workers or max(1, min(32, len(jobs)))) as pool:
        futures = {dev.id: pool.submit(one, dev, job) for dev, job in jobs}
        for dev_id, fut in futures.items():
            outcomes[dev_id] = fut.result()
    return [outcomes[d.id] for d in devices]
