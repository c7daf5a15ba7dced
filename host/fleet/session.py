"""The host's end of an agent session (:mod:`agent.session`: the protocol is documented there).

:class:`AgentSession` speaks JSON lines over any byte pipe — a local child process's stdin/stdout
(:class:`host.fleet.transport.LocalTransport`) or an SSH ``exec`` channel (:class:`host.fleet.ssh.SSHTransport`) —
and turns every failure into the transport's own error type through ``error(message, infrastructure,
timed_out)``:

* a reply with ``ok: false`` is the agent's answer (``infrastructure=False``: retrying cannot help), except a
  job's ``JobTimeout`` (``timed_out``: the agent stopped it and ended);
* a session that goes quiet — no line (replies and heartbeats alike) for ``dead_after_s`` — or whose pipe closes
  is **dead**: every waiting request fails with ``infrastructure=True`` and the pipe is killed; the transport opens
  a new session for the next request, and the runner re-runs the job (a report counts only once it has arrived);
* a request past its own deadline kills the session too (the agent may still run the job: nothing must run beside
  its retry).

A reply line longer than ``max_report_bytes`` + 64 KiB is refused unread (the pipe is killed).
"""
from __future__ import annotations

import itertools
import json
import logging
import re
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import agent
from agent.session import PROTOCOL

log = logging.getLogger(__name__)

ErrorFactory = Callable[..., Exception]     # (message, infrastructure=..., timed_out=...) -> the transport's error
HEARTBEAT_S = 2.0
DEAD_AFTER_HEARTBEATS = 5


def version_tuple(v: str) -> tuple:
    out = []
    for part in str(v).split("."):
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


class AgentSession:
    """One open agent session. ``readline(limit)`` returns the next line (b"" at EOF), ``write(bytes)`` sends,
    ``kill()`` ends the pipe's far end (the process, or the channel), ``log_tail()`` says what it printed."""

    def __init__(self, readline: Callable[[int], bytes], write: Callable[[bytes], None], kill: Callable[[], None],
                 *, where: str, error: ErrorFactory, heartbeat_s: float = HEARTBEAT_S,
                 dead_after_s: Optional[float] = None, max_report_bytes: int = 16 << 20,
                 log_tail: Callable[[], str] = lambda: "") -> None:
        self._readline, self._write, self._kill, self._log_tail = readline, write, kill, log_tail
        self.where, self.error = where, error
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s if dead_after_s is not None else heartbeat_s * DEAD_AFTER_HEARTBEATS
        self.max_line_bytes = max_report_bytes + (1 << 16)      # a run's reply: the report and its envelope
        self.info: Dict[str, Any] = {}
        self.dead: Optional[str] = None
        self.last_heard = time.monotonic()
        self.heartbeats = 0
        self._ids = itertools.count(1)
        self._pending: Dict[int, Dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._wlock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"session-{where}", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------------------------------ life
    def hello(self, host_version: str = agent.__version__) -> Dict[str, Any]:
        """The first request; the agent's versions and capabilities. Refused (``infrastructure=False``) when the
        agent speaks another protocol, or is older than this host's agent."""
        try:
            info = self.call("hello", timeout=max(30.0, self.dead_after_s), protocol=PROTOCOL,
                             host_version=host_version, heartbeat_s=self.heartbeat_s)
        except Exception as e:
            missing = re.search(r"No module named '(numpy|psutil)'", str(e))
            if missing:
                raise self.error(f"{self.where}: the device's Python has no {missing.group(1)} (the agent needs "
                                 "numpy and psutil): `edgeprune devices setup --fleet FLEET --devices ID` makes it a "
                                 "venv with them and the device's runtime", infrastructure=False) from None
            if "ProtocolMismatch" in str(e) or "unknown op" in str(e) or "invalid choice: 'serve'" in str(e):
                raise self.error(f"{self.where}: {e}. Upgrade the agent on the device to {host_version} (the "
                                 "host ships its own: remove a stale `python:` agent install, or update edgeprune "
                                 "on the device)", infrastructure=False) from None
            raise
        got = str(info.get("agent_version", "?"))
        if version_tuple(got) < version_tuple(host_version):
            self.close()
            raise self.error(f"{self.where}: the agent on the device is {got}, older than this host's "
                             f"{host_version}: upgrade it (pip install -U edgeprune there, or remove the old agent "
                             "from the device python's path so the host's bundle is used)", infrastructure=False)
        self.info = info
        return info

    def close(self) -> None:
        """Say bye (briefly) and end the pipe."""
        if self.dead is None:
            try:
                self.call("bye", timeout=5.0)
            except Exception:   # noqa: BLE001 - closing: whatever went wrong, the pipe is ended below
                pass
        self._die("closed")

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the reader to see the pipe's end (after :meth:`close`)."""
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)

    @property
    def alive(self) -> bool:
        return self.dead is None

    # ------------------------------------------------------------------------------------------ requests
    def call(self, op: str, timeout: float, **fields: Any) -> Dict[str, Any]:
        """Send one request and wait for its reply (heartbeats keep the wait alive up to ``timeout``)."""
        if self.dead is not None:
            raise self.error(f"{self.where}: agent session {self.dead}", infrastructure=True)
        rid = next(self._ids)
        slot: Dict[str, Any] = {"event": threading.Event(), "reply": None}
        with self._lock:
            self._pending[rid] = slot
        line = json.dumps(dict(fields, op=op, id=rid), sort_keys=True, separators=(",", ":")).encode() + b"\n"
        try:
            with self._wlock:
                self._write(line)
        except (OSError, EOFError, ValueError) as e:
            self._die(f"lost: cannot send ({e})")
        deadline = time.monotonic() + timeout
        try:
            while not slot["event"].wait(0.2):
                now = time.monotonic()
                if self.dead is None and now - self.last_heard > self.dead_after_s:
                    self._die(f"dead: nothing heard for {now - self.last_heard:.1f} s (heartbeat every "
                              f"{self.heartbeat_s:g} s)")
                if self.dead is not None:
                    tail = self._log_tail().strip()
                    raise self.error(f"{self.where}: agent session {self.dead} during {op}"
                                     + (f"; agent log: {tail[-2000:]}" if tail else ""), infrastructure=True)
                if now > deadline:
                    self._die(f"ended: {op} did not finish within {timeout:.0f} s")
                    raise self.error(f"{self.where}: {op} did not finish within {timeout:.0f} s; the agent session "
                                     "was ended", infrastructure=True, timed_out=True)
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        reply = slot["reply"]
        if reply is None:   # woken by the session's death
            tail = self._log_tail().strip()
            raise self.error(f"{self.where}: agent session {self.dead} during {op}"
                             + (f"; agent log: {tail[-2000:]}" if tail else ""), infrastructure=True)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            kind, msg = err.get("type", "Error"), err.get("message", "")
            if kind == "JobTimeout":
                self._die("ended: the agent stopped a job past its deadline")
                raise self.error(f"{self.where}: {msg}", infrastructure=True, timed_out=True)
            if kind == "Cancelled":
                self._die("ended: job cancelled")
                raise self.error(f"{self.where}: {msg}", infrastructure=True)
            raise self.error(f"{self.where}: agent {op}: {kind}: {msg}", infrastructure=False)
        return reply

    # ------------------------------------------------------------------------------------------ internals
    def _read(self) -> None:
        while True:
            try:
                line = self._readline(self.max_line_bytes + 1)
            except Exception as e:   # noqa: BLE001 - any failure of the pipe is the session's end
                self._die(f"lost: {type(e).__name__}: {e}")
                return
            if not line:
                self._die("lost: the agent's output closed (agent killed, link cut or device rebooted?)")
                return
            if len(line) > self.max_line_bytes or not line.endswith(b"\n"):
                self._die(f"refused: a reply over {self.max_line_bytes} bytes")
                return
            self.last_heard = time.monotonic()
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("%s: agent session: not JSON: %r", self.where, line[:200])
                continue
            if msg.get("op") == "heartbeat":
                self.heartbeats += 1
                continue
            with self._lock:
                slot = self._pending.get(msg.get("id"))
            if slot is not None:
                slot["reply"] = msg
                slot["event"].set()
            elif msg.get("ok") is False:
                log.warning("%s: agent session: %s", self.where, msg.get("error"))

    def _die(self, why: str) -> None:
        with self._lock:
            if self.dead is None:
                self.dead = why
            pending: List[Dict[str, Any]] = list(self._pending.values())
        try:
            self._kill()
        except Exception:   # noqa: BLE001 - best effort: the pipe may be gone already
            pass
        for slot in pending:
            slot["event"].set()
