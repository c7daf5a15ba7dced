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
from pathlib import Path
from typing import List, Optional, Tuple, Union

from agent import schema
from edgeprune.errors import DeviceError, InfrastructureError
from host.files import write_text_atomic
from host.fleet.die_with_parent import LAUNCH_FAILED

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


class LocalTransport:
    """Run jobs through the agent in a child process, with a hard timeout."""

    name = "local"

    def __init__(self, python: Optional[str] = None, grace_s: float = 30.0,
                 cache_dir: Optional[Path] = None, max_report_bytes: int = MAX_REPORT_BYTES) -> None:
        self.python = python or sys.executable
        self.grace_s = grace_s
        self.max_report_bytes = max_report_bytes
        self._cache_dir = str(Path(cache_dir or Path.home() / ".cache" / "edgeprune").expanduser())

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

    def close(self) -> None:
        """Nothing to release for a local device (transports share this interface)."""

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
            return self._run(job, job_path, report_path)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)   # links and copies only: never what they point to

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
