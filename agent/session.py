"""``python -m agent serve``: one agent process per device per host run, reused for every job, like TVM's RPC server.

A job through ``python -m agent run`` is a new interpreter that imports numpy and its runtime again (and, over
SSH, a new ``exec`` channel); a search makes hundreds of them per device. A session pays that once. The host
starts ``python -m agent serve`` (over an SSH ``exec`` channel, or as a child process for the local device) and
speaks **JSON lines** on its stdin/stdout: one JSON object per line, UTF-8, ``\\n``-terminated. Everything the
agent or a runtime prints goes to a log file (fd 1 and 2 are redirected there at start), never into the protocol.

Protocol version :data:`PROTOCOL` (host → agent requests; every request has an integer ``id`` that its reply
repeats; a reply is ``{"id", "ok": true, ...}`` or ``{"id", "ok": false, "error": {"type", "message"}}``):

``hello``      ``{"op": "hello", "protocol": 1, "host_version": "0.9.0", "heartbeat_s": 5, "log": PATH?}``
               → ``{"protocol", "agent_version", "python", "pid", "capabilities": [...], "log"}``. Must come
               first. A host speaking another protocol gets ``ok: false``, type ``ProtocolMismatch``, naming both
               versions, and the agent exits (code 3).
``run``        ``{"op": "run", "dir": ABS, "job": {...job spec...}, "links": [[name, source], ...],
               "timeout_s": T, "cache": ABS?, "max_report": BYTES?}``: the agent creates the job folder ``dir``
               (which must not exist), links each artifact file into ``dir/artifact/<name>`` from ``source`` (a
               sha256 in ``cache``, or an absolute path), writes ``job.json``, runs the job on its main thread
               (CPU pinning applies to it) and replies ``{"report": {...}}``; the folder is removed afterwards.
               Past ``timeout_s`` the agent replies ``JobTimeout`` and exits (code 4): nothing keeps running.
``cancel``     ``{"op": "cancel", "job": ID}``: the running job is abandoned: its ``run`` gets ``ok: false``
               (``Cancelled``), this request ``ok: true``, and the agent exits (code 5). Not running: ``ok: true``,
               ``"running": null``.
``cache``      ``{"op": "cache", "spec": {...}}``: the device helper's cache work (:func:`agent.device_helper.
               cache_ops`: evict abandoned job folders, discard dead uploads, commit verified uploads, check
               wanted sha256s) → ``{"out": {...}}``.
``lease``      ``{"op": "lease", "action": "acquire|renew|release|show", "dir", "holder", "ttl", "token",
               "request"}`` → :mod:`agent.lease`'s result. Answered at once, also while a job runs.
``probe``      ``{"op": "probe", "devices": false, "disk": "~"}`` → ``{"probe": {...}}`` (:func:`agent.probe.probe`).
``ping``       → ``{"ok": true, "running": JOB_ID|null}`` at once, also while a job runs.
``bye``        → ``ok: true``; the agent exits (code 0).

Unsolicited, every ``heartbeat_s`` (from its own thread, also while a job runs): ``{"op": "heartbeat", "t":
unix time, "running": JOB_ID|null}``. A host that hears nothing for a few heartbeats declares the session dead
(link cut, agent killed, OOM, device rebooted), kills what it can, and re-runs or fails the job it was running;
a report counts only once it has arrived, so a job is never lost and never counted twice.

The agent exits at once (killing every process it started) when its stdin closes: the host, or its SSH channel, is
gone. The job folder holds ``.pgid`` and ``.lock`` like the device helper's, so a later helper or session
``evict`` stops a job whose host lost track of it. Standard library, numpy, psutil and a runtime only; Python ≥ 3.8.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Dict, Optional

import psutil

import agent
from agent import device_helper, lease, probe, runner
from agent.schema import SchemaError, dumps, job_from_dict, to_dict

PROTOCOL = 1
CAPABILITIES = ["run", "cancel", "cache", "lease", "probe", "ping", "heartbeat", "bye"]
EXIT_BYE, EXIT_PROTOCOL, EXIT_TIMEOUT, EXIT_CANCELLED, EXIT_HOST_GONE = 0, 3, 4, 5, 6
MAX_REQUEST_BYTES = 4 << 20


class Server:
    """One session: a reader thread (requests; ping, cancel, lease and bye answered at once), a heartbeat thread
    (also the job deadline's watchdog) and the main thread, which runs jobs, probes and cache work in order."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, log_path: str) -> None:
        self.rfile, self.wfile, self.log_path = rfile, wfile, log_path
        self._wlock = threading.Lock()
        self._work: "queue.Queue[Dict[str, Any]]" = queue.Queue()
        self._running: Optional[Dict[str, Any]] = None     # {"id", "job", "deadline"} of the job in progress
        self._rlock = threading.Lock()
        self.heartbeat_s = 5.0
        self._hello = threading.Event()

    # ------------------------------------------------------------------------------------------ plumbing
    def send(self, msg: Dict[str, Any]) -> None:
        line = json.dumps(msg, sort_keys=True, separators=(",", ":")).encode("utf-8") + b"\n"
        with self._wlock:
            try:
                self.wfile.write(line)
                self.wfile.flush()
            except (OSError, ValueError):
                self.exit(EXIT_HOST_GONE)

    def reply(self, req: Dict[str, Any], **fields: Any) -> None:
        self.send(dict(fields, id=req.get("id"), ok=True))

    def fail(self, req: Dict[str, Any], kind: str, message: str) -> None:
        self.send({"id": req.get("id"), "ok": False, "error": {"type": kind, "message": message}})

    def exit(self, code: int) -> None:
        """Leave now, with whatever runs (the job's runtime threads, helpers it started) killed with us."""
        try:
            sys.stderr.flush()
            for child in psutil.Process().children(recursive=True):
                child.kill()
            with self._rlock:
                running = self._running
            if running is not None:            # the job dies with us: its folder goes too, as the helper's does
                shutil.rmtree(running["dir"], ignore_errors=True)
            if code == EXIT_BYE:
                self._unlink_log()              # a clean end: the log of a failed session is kept
        except (OSError, psutil.Error):
            pass
        finally:
            os._exit(code)

    def _unlink_log(self) -> None:
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------ threads
    def read_requests(self) -> None:
        while True:
            line = self.rfile.readline(MAX_REQUEST_BYTES + 1)
            if not line:
                self.exit(EXIT_HOST_GONE)           # the host (or its SSH channel) is gone: nobody to report to
            try:
                req = json.loads(line.decode("utf-8"))
                if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                    raise ValueError("not a request object")
            except ValueError as e:
                self.fail({}, "ProtocolError", "unreadable request line (%s): %r" % (e, line[:200]))
                continue
            op = req["op"]
            if not self._hello.is_set() and op != "hello":
                self.fail(req, "ProtocolError", "the first request must be hello, not %r" % op)
                continue
            try:
                if op == "hello":
                    self.hello(req)
                elif op == "ping":
                    with self._rlock:
                        running = self._running["job"] if self._running else None
                    self.reply(req, running=running)
                elif op == "cancel":
                    self.cancel(req)
                elif op == "lease":
                    self.reply(req, **self.lease(req))
                elif op == "bye":
                    self._unlink_log()         # before the reply: the host may end the pipe as soon as it has it
                    self.reply(req)
                    self.exit(EXIT_BYE)
                elif op in ("run", "probe", "cache"):
                    self._work.put(req)
                else:
                    self.fail(req, "ProtocolError", "unknown op %r (this agent knows: %s)" % (op, ", ".join(CAPABILITIES)))
            except (SchemaError, ValueError, KeyError, TypeError, OSError) as e:
                self.fail(req, type(e).__name__, str(e))

    def heartbeat(self) -> None:
        while True:
            time.sleep(min(self.heartbeat_s, 1.0) if self._running else self.heartbeat_s)
            with self._rlock:
                running = self._running
            if running is not None and time.monotonic() > running["deadline"]:
                self.fail(running["req"], "JobTimeout", "job %s did not finish within %.0f s; the agent session "
                          "stopped it (and ended)" % (running["job"], running["timeout_s"]))
                self.exit(EXIT_TIMEOUT)
            self.send({"op": "heartbeat", "t": round(time.time(), 3), "running": running["job"] if running else None})

    def serve(self) -> None:
        threading.Thread(target=self.read_requests, name="session-reader", daemon=True).start()
        self._hello.wait()
        threading.Thread(target=self.heartbeat, name="session-heartbeat", daemon=True).start()
        while True:
            req = self._work.get()
            try:
                if req["op"] == "run":
                    self.run(req)
                elif req["op"] == "probe":
                    self.reply(req, probe=probe.probe(devices=bool(req.get("devices")), disk_path=str(req.get("disk", "~"))))
                else:
                    out = device_helper.new_out()
                    spec = dict(req["spec"])
                    device_helper.cache_ops(spec, out)
                    self.reply(req, out=out)
            except (SchemaError, ValueError, KeyError, TypeError, OSError) as e:
                self.fail(req, type(e).__name__, str(e))

    # ------------------------------------------------------------------------------------------ requests
    def hello(self, req: Dict[str, Any]) -> None:
        if req.get("protocol") != PROTOCOL:
            self.fail(req, "ProtocolMismatch", "the host speaks agent session protocol %r, this agent (%s) speaks %d"
                      % (req.get("protocol"), agent.__version__, PROTOCOL))
            self.exit(EXIT_PROTOCOL)
        self.heartbeat_s = max(0.2, float(req.get("heartbeat_s", 5.0)))
        self.reply(req, protocol=PROTOCOL, agent_version=agent.__version__, python=sys.version.split()[0],
                   pid=os.getpid(), capabilities=CAPABILITIES, log=self.log_path)
        self._hello.set()

    def cancel(self, req: Dict[str, Any]) -> None:
        with self._rlock:
            running = self._running
        if running is None or req.get("job") not in (None, running["job"]):
            self.reply(req, running=running["job"] if running else None)
            return
        self.reply(req, running=running["job"])     # first: the host reads the run's failure as the session's end
        self.fail(running["req"], "Cancelled", "job %s cancelled by the host" % running["job"])
        self.exit(EXIT_CANCELLED)

    def lease(self, req: Dict[str, Any]) -> Dict[str, Any]:
        action, directory = req["action"], Path(str(req["dir"]))
        ttl = float(req.get("ttl", 600.0))
        if action == "acquire":
            holder = dict(req.get("holder") or {})
            holder.setdefault("pid", os.getpid())
            return lease.acquire(directory, holder, ttl, request=req.get("request") or None)
        if action == "renew":
            return lease.renew(directory, str(req["token"]), ttl)
        if action == "release":
            return lease.release(directory, str(req["token"]))
        if action == "show":
            return lease.show(directory)
        raise ValueError("lease action %r (expected acquire, renew, release or show)" % action)

    def run(self, req: Dict[str, Any]) -> None:
        job = job_from_dict(req["job"])
        runner.check_job(job)
        jobdir = Path(str(req["dir"]))
        if not jobdir.is_absolute():
            raise ValueError("dir: %r is not an absolute path" % str(jobdir))
        jobdir.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        jobdir.mkdir(mode=0o700)
        fd = None
        try:
            fd = device_helper.claim(str(jobdir))
            problem = device_helper.link_all(str(req.get("cache") or "/"), str(jobdir / "artifact"),
                                             req.get("links", []))
            if problem is not None:
                raise ValueError("links: " + problem)
            (jobdir / "job.json").write_text(dumps(job), encoding="utf-8")
            runner.check_paths(job, jobdir)
            timeout_s = float(req.get("timeout_s") or job.timeout_s)
            with self._rlock:
                self._running = {"id": req.get("id"), "req": req, "job": job.job_id, "timeout_s": timeout_s,
                                 "deadline": time.monotonic() + timeout_s, "dir": str(jobdir)}
            try:
                report = runner.run_job(job, jobdir)
            finally:
                with self._rlock:
                    self._running = None
        finally:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(str(jobdir), ignore_errors=True)     # gone before the reply: the host sees a clean cache
        doc = to_dict(report.validate())
        size = len(json.dumps(doc))
        limit = int(req.get("max_report") or (16 << 20))
        if size > limit:
            self.fail(req, "ReportTooLarge", "report of job %s is %d bytes, over the %d-byte limit"
                      % (job.job_id, size, limit))
            return
        self.reply(req, report=doc)


def main(log: Optional[str] = None) -> int:
    """Serve on this process's stdin/stdout until the host says bye or goes away."""
    if log:
        log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log_path = log
    else:
        log_fd, log_path = tempfile.mkstemp(prefix="edgeprune-agent-session.", suffix=".log")
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)      # what a runtime prints goes to the log, never into the protocol
    os.dup2(log_fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    Server(proto_in, proto_out, log_path).serve()
    return 0
