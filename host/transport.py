"""Transports: how a job spec reaches a device's agent and its report comes back.

``LocalTransport`` runs the agent as a separate process on this machine — the same entry point
(``python -m agent run JOB.json --out REPORT.json``) that SSH devices run — so the local path exercises the
real contract: a JSON job in, a versioned JSON report out, nothing shared in memory.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from agent import schema
from edgeprune.errors import DeviceError


class InfrastructureError(DeviceError):
    """The device could not be reached or did not answer (connection lost, timeout, no report): worth a retry,
    unlike a model or runtime error, which a report with status "error" carries."""

    infrastructure = True

AGENT_ROOT = Path(__import__("agent").__file__).resolve().parent.parent  # folder holding the agent package
STDERR_TAIL = 4000


def write_text_atomic(path: Path, text: str) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


class LocalTransport:
    """Run jobs through the agent in a child process, with a hard timeout."""

    name = "local"

    def __init__(self, python: Optional[str] = None, grace_s: float = 30.0,
                 cache_dir: Optional[Path] = None) -> None:
        self.python = python or sys.executable
        self.grace_s = grace_s
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

        A report with ``status: "error"`` is returned, not raised: the device ran and said what failed.
        DeviceError is raised only when no valid report came back (crash, timeout, bad output).
        """
        workdir = Path(workdir).resolve()  # the agent runs with cwd=workdir: every path handed to it is absolute
        workdir.mkdir(parents=True, exist_ok=True)
        job_path = write_text_atomic(workdir / "job.json", schema.dumps(job))
        report_path = workdir / "report.json"
        report_path.unlink(missing_ok=True)
        env = self._env()
        cmd = [self.python, "-m", "agent", "run", str(job_path), "--out", str(report_path)]
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=job.timeout_s + self.grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise InfrastructureError(
                f"job {job.job_id}: agent did not finish within {job.timeout_s + self.grace_s:.0f} s; killed")
        if proc.returncode == 2:  # the agent refused the job spec: retrying cannot help
            raise DeviceError(f"job {job.job_id}: agent refused the job: {err[-STDERR_TAIL:].strip()}")
        if not report_path.is_file():
            raise InfrastructureError(
                f"job {job.job_id}: agent exited {proc.returncode} without a report: {err[-STDERR_TAIL:].strip()}")
        try:
            return schema.loads_report(report_path.read_text())
        except schema.SchemaError as e:
            raise DeviceError(f"{report_path}: invalid report from the agent: {e}") from None
        except (OSError, json.JSONDecodeError) as e:  # pragma: no cover - loads_report maps JSON errors
            raise DeviceError(f"{report_path}: unreadable report: {e}") from None
