"""The SSH transport: jobs on a device's agent, over the connection, the commands and the device cache below it.

``SSHTransport(device).run_job(job, workdir)`` has :class:`host.fleet.transport.LocalTransport`'s semantics -- a
JSON job in, a validated report out, a report with ``status: "error"`` returned rather than raised, local copies of
``job.json`` / ``report.json`` kept in ``workdir`` -- with the artifact, the eval shards and the agent itself
shipped to the device through its content-addressed cache (:mod:`host.fleet.ssh.cache`).

Artifacts of several files (OpenVINO IR's ``.xml`` + ``.bin``, a TensorRT ONNX and its int8 calibration npz:
``artifact.files`` in the job) travel file by file through the cache, each under its sha256; in the job folder
``artifact/<name>`` links (symbolic, else hard, else a copy) give each its own name again, so that a runtime finds
``r20.bin`` beside ``r20.xml``, and the job the device runs has ``artifact.path: artifact/<primary name>``. Names
are plain file names (:func:`agent.schema.file_name_problem`), checked on the host and again by the helper.

Per job (cache warm) this is one remote command: the device helper (:mod:`agent.device_helper`) verifies
the cached inputs, creates the job folder and its artifact links, runs ``python -m agent run job.json --out
report.json`` in it (``PYTHONPATH`` = the unpacked bundle), prints a marker line, a one-line JSON header and the
report's bytes, then removes the folder. The agent is killed at ``timeout_s + grace_s`` by the helper itself, and
at once when sshd, the host's end of the helper's stdout, is gone, so a host that vanished leaves nothing running;
the host's own deadline, a little later, kills the whole process group. A job the host lost track of while sshd
lives on (its connection died on a link that was down, or its deadline passed with no connection to kill it over)
is stopped by the transport's next helper call, before anything else runs. A retry never measures beside its
abandoned first attempt (the lease's promise).

Errors: :class:`~edgeprune.errors.SSHError` (a :class:`~edgeprune.errors.DeviceError`) with ``infrastructure=True``
when the connection, the transport or a timeout failed (a runner may retry those, on this device or another) and
``infrastructure=False`` when retrying cannot help (host key, authentication, bad job, invalid report).
"""
from __future__ import annotations

import json
import logging
import secrets
import shlex
import signal
import threading
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from agent import schema
from edgeprune.errors import DeviceError, SSHError
from host.files import write_text_atomic
from host.fleet.devices import DeviceConfig
from host.fleet.ssh.cache import LOG_TAIL_CHARS, DeviceCache, check_sha256
from host.fleet.ssh.commands import MAX_OUTPUT_BYTES, quote_argv
from host.fleet.ssh.connection import SFTP_REQUEST_BYTES
from host.fleet.session import AgentSession
from host.fleet.transport import ARTIFACT_DIR, MAX_REPORT_BYTES, artifact_files

log = logging.getLogger(__name__)


class SSHTransport(DeviceCache):
    """Jobs, files and commands on one SSH device, over one lazily opened, reused connection."""

    name = "ssh"

    def __init__(self, device: DeviceConfig, *, grace_s: float = 30.0, hash_known_hosts: bool = False,
                 max_output_bytes: int = MAX_OUTPUT_BYTES, max_report_bytes: int = MAX_REPORT_BYTES,
                 sftp_request_bytes: int = SFTP_REQUEST_BYTES, session: bool = True,
                 heartbeat_s: float = 2.0) -> None:
        super().__init__(device, hash_known_hosts=hash_known_hosts, max_output_bytes=max_output_bytes,
                         sftp_request_bytes=sftp_request_bytes)
        self.grace_s = grace_s
        self.max_report_bytes = max_report_bytes
        self.use_session = session
        self.heartbeat_s = heartbeat_s
        self.sessions_opened = 0
        self._session: Optional[AgentSession] = None
        self._slock = threading.RLock()   # close() may be called from inside session() (a connection lost)

    # ------------------------------------------------------------------------------------------ agent session
    def session(self) -> AgentSession:
        """The open agent session (``python -m agent serve`` on an ``exec`` channel), opened when there is none
        or it died: on a device whose cache has this host's agent bundle that is one ``exec``; a missing bundle
        adds one (the helper unpacks the upload)."""
        with self._slock:
            if self._session is not None and self._session.alive:
                return self._session
            self._session = None
            bundle = self.ensure_bundle()
            # kept after a session that did not end with bye (removed after a clean one)
            log_path = "%s/sessions/%s.log" % (self.cache_dir(), secrets.token_hex(6))
            script = ("mkdir -p %s && export PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}; exec %s"
                      % (shlex.quote(self.cache_dir() + "/sessions"), shlex.quote(bundle),
                         quote_argv([self.python, "-m", "agent", "serve", "--log", log_path])))
            t = self._transport()
            with self._wire("starting the agent session"):
                chan = t.open_session(timeout=self.ssh.connect_timeout_s)
                chan.exec_command(script)
            self.counters.commands_run += 1
            rfile = chan.makefile("rb")

            def write(data: bytes) -> None:
                chan.sendall(data)

            def kill() -> None:
                chan.close()

            def log_tail() -> str:
                err = b""
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                return err.decode("utf-8", "replace")

            def error(message: str, infrastructure: bool = True, timed_out: bool = False) -> SSHError:
                return SSHError(message, infrastructure=infrastructure, timed_out=timed_out)

            self._session = sess = AgentSession(rfile.readline, write, kill, where=self.where, error=error,
                                                log_tail=log_tail, heartbeat_s=self.heartbeat_s,
                                                max_report_bytes=self.max_report_bytes)
            self.sessions_opened += 1
        sess.hello()
        return sess

    def agent_request(self, op: str, timeout: float = 60.0, **fields: Any) -> Dict[str, Any]:
        """One request to the agent session (``lease``, ``probe``, ``ping``, ``cache``): its reply."""
        return self.session().call(op, timeout, **fields)

    def _helper_in_session(self, spec: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        if not self.use_session or self._session is None or not self._session.alive:
            return None
        return self._session.call("cache", timeout, spec=spec)["out"]

    def close(self) -> None:
        """End the agent session (bye), then the connection."""
        with self._slock:
            if self._session is not None:
                self._session.close()
                self._session = None
        super().close()

    def exec_agent(self, args: Sequence[str], timeout: Optional[float] = None) -> Tuple[int, str, str]:
        """``python -m agent ARGS`` on the device with the cached bundle -> ``(exit status, stdout, stderr)``."""
        bundle = self.ensure_bundle()
        script = ("export PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}; exec %s"
                  % (shlex.quote(bundle), quote_argv([self.python, "-m", "agent", *args])))
        rc, out, err = self._exec(script, timeout or self.ssh.command_timeout_s, None,
                                  what="%s -m agent %s" % (self.python, quote_argv(args) if args else ""))
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def run_job(self, job: schema.JobSpec, workdir: Path) -> schema.Report:
        """Ship ``job``'s artifact (every file of it), eval shards (``eval.shards``, or v1/v2's ``eval.path``) and
        the agent (cached by sha256), run it, return its report.

        Paths in ``job`` are local (absolute, or relative to ``workdir``); ``artifact.files`` are beside
        ``artifact.path``. On the device the artifact's files are linked into the job folder's ``artifact/`` under
        their own names, and the job it runs names the primary one there. ``workdir`` receives ``job.json`` (as
        given) and ``report.json``. A report with ``status: "error"`` is returned, not raised; SSHError is raised
        when no valid report came back (``infrastructure`` says whether a retry may help).
        """
        try:
            job.validate()
        except schema.SchemaError as e:
            raise SSHError("job %s: %s" % (job.job_id, e), infrastructure=False) from None
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(workdir / "job.json", schema.dumps(job))
        report_path = workdir / "report.json"
        report_path.unlink(missing_ok=True)

        try:
            files = artifact_files(job, workdir)               # (name, local path, sha256), the primary first
        except DeviceError as e:
            raise SSHError(str(e), infrastructure=False) from None
        sources: Dict[str, Union[Path, bytes]] = {}
        for _, path, digest in files:
            sources.setdefault(check_sha256(digest), path)        # same bytes under two names: one upload
        if job.eval is not None:   # every eval shard, each by its sha256 (one upload for two of the same bytes)
            for shard in job.eval.shard_list():
                sources.setdefault(check_sha256(shard.sha256), workdir / shard.path)
        for path in sources.values():
            if isinstance(path, Path) and not path.is_file():
                raise SSHError("job %s: %s does not exist" % (job.job_id, path), infrastructure=False)
        remote = schema.job_from_dict(schema.to_dict(job))      # the job as the device sees it
        remote.artifact.path = ARTIFACT_DIR + "/" + files[0][0]    # linked in the job folder, by the helper
        if remote.eval is not None:   # the device reads each shard from its cache entry
            if remote.eval.shards is not None:
                for shard in remote.eval.shards:
                    shard.path = self.cache_path(shard.sha256)
            else:
                remote.eval.path = self.cache_path(str(remote.eval.sha256))
        if self.use_session:
            return self._run_in_session(job, remote, files, sources, report_path)
        data, bundle_sha = self.bundle()
        sources[bundle_sha] = data
        limit = job.timeout_s + self.grace_s
        spec = {"want": [s for s in sources if s != bundle_sha], "bundle": bundle_sha,
                "run": {"jobdir": "%s.%s" % (job.job_id, secrets.token_hex(6)), "python": self.python,
                        "argv": ["run", "job.json", "--out", "report.json"], "timeout_s": limit,
                        "links": [[name, digest] for name, _, digest in files],
                        "max_report": self.max_report_bytes, "log_tail": LOG_TAIL_CHARS}}
        try:
            header, body = self._helper(spec, sources, schema.dumps(remote).encode(),
                                        limit + self.ssh.command_timeout_s)
        except SSHError as e:
            if e.infrastructure:   # the job may still run there: the next helper call stops it (DEVICE_HELPER evict)
                with self._lock:
                    self._abandoned.append(spec["run"]["jobdir"])
            if e.timed_out:
                self._remove_jobdir(spec["run"]["jobdir"])
                raise SSHError("job %s: agent did not finish within %.0f s; killed (%s)" % (job.job_id, limit, e),
                               infrastructure=True, timed_out=True) from None
            raise
        if header.get("link_error"):
            raise SSHError("job %s: the device helper %s" % (job.job_id, header["link_error"]), infrastructure=False)
        if header["timed_out"]:
            raise SSHError("job %s: agent did not finish within %.0f s; killed. Agent log: %s"
                           % (job.job_id, limit, header["log_tail"].strip()[-LOG_TAIL_CHARS:]),
                           infrastructure=True, timed_out=True)
        rc = header["rc"]
        if header["report_error"]:
            raise SSHError("job %s: %s" % (job.job_id, header["report_error"]), infrastructure=False)
        if header["report_size"] is None:
            # 2: bad job spec/usage; other codes without a report: a crash; < 0 or > 128: killed by a signal
            raise SSHError("job %s: agent %s without a report: %s"
                           % (job.job_id, _how_it_ended(rc), header["log_tail"].strip()[-LOG_TAIL_CHARS:]),
                           infrastructure=rc is None or rc < 0 or rc > 128)
        text = body.decode("utf-8", "replace")
        return _load_report(text, job, report_path)

    def _run_in_session(self, job: schema.JobSpec, remote: schema.JobSpec, files: list,
                        sources: Dict[str, Union[Path, bytes]], report_path: Path) -> schema.Report:
        """The job through the agent session: its inputs into the cache (the session's ``cache`` request, SFTP
        uploads of what is missing), then ``run``; the report comes back in the reply."""
        sess = self.session()
        try:
            self._helper({"want": list(sources)}, sources, None, self.ssh.command_timeout_s)
        except SSHError as e:
            if not e.infrastructure or sess.alive or not self.connected:
                raise       # a lost connection (the session died with it) is the runner's to retry, with backoff
            # the session died before this job was sent (an agent killed between jobs, whose channel closed
            # only now) on a connection that is still up: nothing of the job ran, so a new session takes it
            sess = self.session()
            self._helper({"want": list(sources)}, sources, None, self.ssh.command_timeout_s)
        limit = job.timeout_s + self.grace_s
        jobdir = "%s.%s" % (job.job_id, secrets.token_hex(6))
        try:
            reply = sess.call("run", limit + self.ssh.command_timeout_s, dir=self.cache_dir() + "/jobs/" + jobdir,
                              cache=self.cache_dir(), job=schema.to_dict(remote), timeout_s=limit,
                              links=[[name, digest] for name, _, digest in files], max_report=self.max_report_bytes)
        except SSHError as e:
            if e.infrastructure:   # the job may still run there: the next session's cache request stops it
                with self._lock:
                    self._abandoned.append(jobdir)
            raise
        text = json.dumps(reply["report"])
        return _load_report(text, job, report_path)

    def _remove_jobdir(self, name: str) -> None:
        try:
            if self.connected:
                self.run(["rm", "-rf", "--", self.cache_dir() + "/jobs/" + name], timeout=self.ssh.connect_timeout_s)
        except SSHError as e:
            log.warning("%s: could not remove job folder %s: %s", self.where, name, e)


def _how_it_ended(rc: Optional[int]) -> str:
    """``exited 1``, or for a process killed by a signal (``rc`` < 0, as subprocess reports it) which one."""
    if rc is None or rc >= 0:
        return "exited %s" % rc
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = "signal %d" % -rc
    hint = " (the kernel's OOM killer does this when the device runs out of memory)" if name == "SIGKILL" else ""
    return "was killed by %s%s" % (name, hint)


def _load_report(text: str, job: schema.JobSpec, report_path: Path) -> schema.Report:
    """Keep the agent's report at ``report_path`` and return it validated, refused when invalid or another job's."""
    write_text_atomic(report_path, text)
    try:
        report = schema.loads_report(text)
    except schema.SchemaError as e:
        raise SSHError("%s: invalid report from the agent: %s" % (report_path, e), infrastructure=False) from None
    if report.job_id != job.job_id:
        raise SSHError("%s: report is for job %r, not %r" % (report_path, report.job_id, job.job_id),
                       infrastructure=False)
    return report
