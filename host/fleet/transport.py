"""Transports: how a job spec reaches a device's agent and its report comes back.

``LocalTransport`` runs the agent as a separate process on this machine — the same entry point
(``python -m agent run JOB.json --out REPORT.json``) that SSH devices run — so the local path exercises the
real contract: a JSON job in, a versioned JSON report out, nothing shared in memory.

The agent sees the same job folder from every transport: ``job.json`` and ``artifact/``, which holds the
artifact's files under their own names (:func:`artifact_files`: the primary file and ``artifact.files``, e.g.
``r20.xml`` and ``r20.bin``, ``r20.trt.onnx`` and ``r20.trt.calib.npz``) as links (copies where the file system has
no links) to the real files, and ``artifact.path`` names the primary one there. Runtimes find a file's companions
beside it (OpenVINO's ``.bin``, relative paths in ``runtime.options``); the agent verifies every file's sha256
before it loads anything. ``LocalTransport`` links to the files where they are; ``SSHTransport`` to the device's
content-addressed cache (``host.fleet.ssh.cache``). The folder is created fresh for each job and removed when it
ends; the ``workdir`` keeps ``job.json`` as given and ``report.json``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from agent import schema
from edgeprune.errors import DeviceError, InfrastructureError
from host.files import write_text_atomic
from host.fleet.die_with_parent import LAUNCH_FAILED
from host.fleet.session import AgentSession

AGENT_ROOT = Path(__import__("agent").__file__).resolve().parent.parent  # folder holding the agent package
STDERR_TAIL = 4000
MAX_REPORT_BYTES = 16 << 20     # a larger report.json is refused unread (host.fleet.ssh keeps the same limit)


ARTIFACT_DIR = "artifact"   # in the agent's job folder: the artifact's files, linked under their own names


def artifact_files(job: schema.JobSpec, workdir: Path) -> List[Tuple[str, Path, str]]:
    """``(name, local path, sha256)`` of every file of ``job``'s artifact, the primary (``artifact.path``, relative
    to ``workdir`` or absolute) first, then ``artifact.files`` from the primary's folder. DeviceError (retrying
    cannot help) for a name that is not a plain file name, two files of one name, or a file that is not there."""
    primary = Path(os.path.abspath(Path(workdir) / job.artifact.path))
    out = [(primary.name, primary, job.artifact.sha256)]
    for name, digest in sorted(job.artifact.files.items()):
        problem = schema.file_name_problem(name)
        if problem is not None:
            raise DeviceError(f"job {job.job_id}: artifact.files: {name!r} {problem}")
        if name == primary.name:
            raise DeviceError(f"job {job.job_id}: artifact.files.{name}: is the artifact itself (artifact.path)")
        out.append((name, primary.parent / name, digest))
    problem = schema.file_name_problem(primary.name)
    if problem is not None:
        raise DeviceError(f"job {job.job_id}: artifact.path: {primary.name!r} {problem}")
    for name, path, _ in out:
        if not path.is_file():
            where = "artifact.path" if path == primary else f"artifact.files.{name} (expected beside {primary.name})"
            raise DeviceError(f"job {job.job_id}: {path} does not exist ({where})")
    return out


def link_file(src: Union[str, Path], dst: Union[str, Path]) -> str:
    """``dst`` made to show ``src``: a symbolic link, else a hard link, else a copy. Returns which it made."""
    try:
        os.symlink(src, dst)
        return "symlink"
    except (OSError, NotImplementedError):
        pass
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


# run by this interpreter as ``-S -c DIE_WITH_PARENT PID AGENT_ARGV``: it becomes the agent, which dies with this
# process (see host/fleet/die_with_parent.py)
DIE_WITH_PARENT = Path(__file__).with_name("die_with_parent.py").read_text()


def _local_error(message: str, infrastructure: bool = True, timed_out: bool = False) -> DeviceError:
    return InfrastructureError(message) if infrastructure else DeviceError(message)


class LocalTransport:
    """Run jobs through the agent on this machine: in one agent session (``python -m agent serve``, a child
    process reused for every job, lease and probe until :meth:`close`), or, with ``session=False``, in a child
    process per job (``python -m agent run``), with a hard timeout either way."""

    name = "local"

    def __init__(self, python: Optional[str] = None, grace_s: float = 30.0,
                 cache_dir: Optional[Path] = None, max_report_bytes: int = MAX_REPORT_BYTES,
                 session: bool = True, heartbeat_s: float = 2.0) -> None:
        self.python = python or sys.executable
        self.grace_s = grace_s
        self.max_report_bytes = max_report_bytes
        self._cache_dir = str(Path(cache_dir or Path.home() / ".cache" / "edgeprune").expanduser())
        self.use_session = session
        self.heartbeat_s = heartbeat_s
        self.sessions_opened = 0
        self._session: Optional[AgentSession] = None
        self._proc: Optional[subprocess.Popen] = None
        self._slock = threading.RLock()   # close() may be called from inside session() (a connection lost)

    @property
    def where(self) -> str:
        return "local agent"

    def session(self) -> AgentSession:
        """The open agent session, opened (``python -m agent serve``, hello) when there is none or it died."""
        with self._slock:
            # an agent that exited while idle (killed, OOM) is found here even before the session's reader saw its
            # pipe close: a new session runs the request instead of it going into a dead pipe. poll() first: it
            # says None while the reader's kill() waits for the process -- and that reader has marked it dead
            if self._session is not None and self._proc is not None and self._proc.poll() is None \
                    and self._session.alive:
                return self._session
            self._end_session()
            fd, log_path = tempfile.mkstemp(prefix="edgeprune-agent-session.", suffix=".log")
            os.close(fd)
            stderr = tempfile.TemporaryFile()
            try:
                # no die-with-parent launcher: the session's stdin is this process's pipe, and the agent exits
                # (taking what it started) when that closes -- when this process ends, however it ends
                proc = subprocess.Popen([self.python, "-m", "agent", "serve", "--log", log_path], env=self._env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                        start_new_session=True)
            except OSError as e:
                stderr.close()
                os.unlink(log_path)
                raise InfrastructureError(f"cannot start the agent with {self.python}: {e}") from None
            assert proc.stdin is not None and proc.stdout is not None

            def write(data: bytes) -> None:
                proc.stdin.write(data)
                proc.stdin.flush()

            def kill() -> None:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except OSError:
                        pass
                proc.wait()

            def log_tail() -> str:
                text = _tail(stderr, STDERR_TAIL)
                try:
                    with open(log_path, "rb") as f:
                        text += _tail(f, STDERR_TAIL)
                except OSError:
                    pass
                return text

            self._proc, self._log_path, self._stderr = proc, log_path, stderr
            self._session = sess = AgentSession(proc.stdout.readline, write, kill, where=self.where, error=_local_error,
                                                log_tail=log_tail, heartbeat_s=self.heartbeat_s,
                                                max_report_bytes=self.max_report_bytes)
            self.sessions_opened += 1
        sess.hello()
        return sess

    def _end_session(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session.join()
            self._session = None
        if self._proc is not None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    try:
                        pipe.close()
                    except OSError:
                        pass
            self._proc = None
            self._stderr.close()
            try:
                os.unlink(self._log_path)
            except OSError:
                pass

    def agent_request(self, op: str, timeout: float = 60.0, **fields: Any) -> Dict[str, Any]:
        """One request to the agent session (``lease``, ``probe``, ``ping``): its reply."""
        return self.session().call(op, timeout, **fields)

    def cache_dir(self) -> str:
        """The device-side folder for the cache and the lease (here: on this machine)."""
        return self._cache_dir

    def _env(self) -> dict:
        return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(AGENT_ROOT), os.environ.get("PYTHONPATH")])))

    def exec_agent(self, args: List[str], timeout: float = 60.0) -> Tuple[int, str, str]:
        """Run ``python -m agent ARGS`` (probe, lease) and return (exit code, stdout, stderr)."""
        try:
            r = subprocess.run([self.python, "-m", "agent", *args], env=self._env(), capture_output=True, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InfrastructureError(f"agent {' '.join(args[:2])}: no answer within {timeout:.0f} s") from None
        except OSError as e:
            raise InfrastructureError(f"cannot start the agent with {self.python}: {e}") from None
        return r.returncode, r.stdout, r.stderr

    def __enter__(self) -> "LocalTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """End the agent session, if one is open (the next job opens a new one)."""
        with self._slock:
            self._end_session()

    def run_job(self, job: schema.JobSpec, workdir: Path) -> schema.Report:
        """Write ``job`` into ``workdir``, run the agent on it, and return its validated report.

        The agent runs in a fresh job folder inside ``workdir`` (removed afterwards) whose ``artifact/`` links the
        artifact's files under their own names (see the module docstring); ``workdir`` keeps ``job.json`` (as
        given) and ``report.json``. A report with ``status: "error"`` is returned, not raised: the device ran and
        said what failed. DeviceError is raised when the job's files are not there to link, and when no valid
        report came back (crash, timeout, bad output).
        """
        try:
            job.validate()
        except schema.SchemaError as e:
            raise DeviceError(f"job {job.job_id}: {e}") from None
        workdir = Path(workdir).resolve()  # every path handed to the agent is absolute
        workdir.mkdir(parents=True, exist_ok=True)
        files = artifact_files(job, workdir)
        write_text_atomic(workdir / "job.json", schema.dumps(job))
        report_path = workdir / "report.json"
        report_path.unlink(missing_ok=True)
        jobdir = Path(tempfile.mkdtemp(prefix=f".job-{job.job_id}.", dir=workdir))
        try:
            agent_job = copy.deepcopy(job)
            links = jobdir / ARTIFACT_DIR
            links.mkdir()
            for name, path, _ in files:
                link_file(path, links / name)
            agent_job.artifact.path = str(links / files[0][0])
            if agent_job.eval is not None:   # every eval shard where it is, by absolute path
                if agent_job.eval.shards is not None:
                    for shard in agent_job.eval.shards:
                        shard.path = os.path.abspath(workdir / shard.path)
                else:
                    agent_job.eval.path = os.path.abspath(workdir / str(agent_job.eval.path))
            job_path = write_text_atomic(jobdir / "job.json", schema.dumps(agent_job))
            if self.use_session:
                return self._run_in_session(job, agent_job, files, jobdir, report_path)
            return self._run(job, job_path, report_path)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)   # links and copies only: never what they point to

    def _run_in_session(self, job: schema.JobSpec, agent_job: schema.JobSpec, files: List[Tuple[str, Path, str]],
                        jobdir: Path, report_path: Path) -> schema.Report:
        # the agent makes its own job folder (beside the one prepared here, which keeps job.json for the record)
        limit = job.timeout_s + self.grace_s
        agent_job = copy.deepcopy(agent_job)
        agent_job.artifact.path = ARTIFACT_DIR + "/" + files[0][0]
        reply = self.session().call(
            "run", limit + 10.0, dir=str(jobdir / "run"), job=schema.to_dict(agent_job), timeout_s=limit,
            links=[[name, str(path)] for name, path, _ in files], max_report=self.max_report_bytes)
        text = json.dumps(reply["report"])
        write_text_atomic(report_path, text)
        try:
            return schema.loads_report(text)
        except schema.SchemaError as e:
            raise DeviceError(f"{report_path}: invalid report from the agent: {e}") from None

    def _run(self, job: schema.JobSpec, job_path: Path, report_path: Path) -> schema.Report:
        # what the agent prints is never held whole: stdout is not used (the report is the contract) and only
        # stderr's tail is kept, from a file; a report over the limit is refused by its size, unread -- the same
        # bounds host.fleet.ssh keeps on an SSH device's output
        env = self._env()
        # this interpreter runs the launcher, which becomes ``python -m agent run ...`` (the device's python)
        cmd = [sys.executable, "-S", "-c", DIE_WITH_PARENT, str(os.getpid()),
               self.python, "-m", "agent", "run", str(job_path), "--out", str(report_path)]
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(cmd, cwd=job_path.parent, env=env, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            except OSError as e:
                raise InfrastructureError(f"job {job.job_id}: cannot start the agent with {self.python}: {e}") from None
            try:
                proc.wait(timeout=job.timeout_s + self.grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise InfrastructureError(
                    f"job {job.job_id}: agent did not finish within {job.timeout_s + self.grace_s:.0f} s; killed")
            err = _tail(stderr, STDERR_TAIL)
        if proc.returncode == LAUNCH_FAILED and err.startswith("cannot start the agent with"):
            raise InfrastructureError(f"job {job.job_id}: {err}")
        if proc.returncode == 2:  # the agent refused the job spec: retrying cannot help
            raise DeviceError(f"job {job.job_id}: agent refused the job: {err}")
        try:
            size = report_path.stat().st_size
        except FileNotFoundError:
            raise InfrastructureError(f"job {job.job_id}: agent exited {proc.returncode} without a report: {err}") from None
        if size > self.max_report_bytes:
            raise DeviceError(f"{report_path}: report.json is {size} bytes, over the {self.max_report_bytes}-byte "
                              f"limit; not read")
        try:
            return schema.loads_report(report_path.read_text())
        except schema.SchemaError as e:
            raise DeviceError(f"{report_path}: invalid report from the agent: {e}") from None
        except (OSError, json.JSONDecodeError) as e:  # pragma: no cover - loads_report maps JSON errors
            raise DeviceError(f"{report_path}: unreadable report: {e}") from None


def _tail(f, n: int) -> str:
    """The last ``n`` bytes of the open binary file ``f``, decoded and stripped."""
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - n))
    return f.read().decode("utf-8", "replace").strip()
