"""Agent sessions (``python -m agent serve``, :mod:`host.fleet.session`) on real agent processes: many jobs in one
session, a session killed between and during jobs, a frozen agent (no heartbeat), a cancelled and a timed-out job,
a protocol mismatch and an agent older than the host. The SSH cases (one session per device over a real sshd,
exec requests counted in its log) are in tests/test_agent_session_ssh.py."""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time

import psutil
import pytest

import agent
from edgeprune import models
from edgeprune.errors import DeviceError, InfrastructureError
from host.fleet import runner as fleet
from host.fleet import session as host_session
from host.fleet.devices import local_device
from host.fleet.jobs import build_job
from host.fleet.pool import TransportPool
from host.fleet.transport import LocalTransport


@pytest.fixture(scope="module")
def artifact(job_inputs):
    """conftest's ResNet-20 artifact and 50-image shard, with the shard's sha256."""
    art, man, shard = job_inputs
    return art, man, shard, models.sha256_file(shard)


def _dev(tmp_path, name="s", seconds=0.05, **kw):
    base = local_device()
    t = base.timing.model_copy(update={"min_iters": 5, "min_duration_s": seconds, "warmup_s": 0.0,
                                       "warmup_iters": 1, "max_duration_s": max(1.0, seconds * 2)})
    return base.model_copy(update={"id": name, "cache_dir": str(tmp_path / f"cache-{name}"), "timing": t, **kw})


def _job(dev, artifact, job_id="j", timeout_s=120.0):
    art, man, shard, sha = artifact
    job = build_job(dev, job_id, art, man, shard, sha)
    job.timeout_s = timeout_s
    return job


def _agent_pid(t: LocalTransport) -> int:
    return int(t.session().info["pid"])


def _local(tmp_path, **kw) -> LocalTransport:
    return LocalTransport(cache_dir=tmp_path / "c", **kw)


def _agent_running(tmp_path, name: str, program: str):
    """A device "python" whose ``python -m agent serve --log LOG`` runs ``program`` (saved as ``name``) instead."""
    (tmp_path / name).write_text(program)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\ncd {os.getcwd()} && exec {os.sys.executable} {tmp_path / name} \"$@\"\n")
    python.chmod(0o755)
    return python


def _gone(pid: int, within_s: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if not psutil.pid_exists(pid):
            return True
        try:    # a multi-threaded process's leader shows as a zombie while its other threads still exit
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return True
        except (OSError, psutil.Error):
            return True
        time.sleep(0.05)
    return False


def test_fifty_jobs_through_one_session(tmp_path, artifact):
    dev = _dev(tmp_path)
    with _local(tmp_path) as t:
        pid = _agent_pid(t)
        for i in range(50):
            rep = t.run_job(_job(dev, artifact, f"j{i}"), tmp_path / "w" / str(i))
            assert rep.status == "ok" and rep.job_id == f"j{i}" and rep.accuracy.n == 50, rep.error
        assert t.sessions_opened == 1 and _agent_pid(t) == pid     # one agent process served all of them
        assert t.session().heartbeats >= 1
    assert _gone(pid)                                                 # bye ended it


def test_session_killed_between_jobs_is_reopened(tmp_path, artifact):
    dev = _dev(tmp_path)
    with _local(tmp_path) as t:
        assert t.run_job(_job(dev, artifact, "a"), tmp_path / "a").status == "ok"
        pid = _agent_pid(t)
        os.kill(pid, signal.SIGKILL)                                  # the agent dies while idle (OOM, reboot)
        assert _gone(pid)
        rep = t.run_job(_job(dev, artifact, "b"), tmp_path / "b")     # detected at once: a new session runs it
        assert rep.status == "ok" and t.sessions_opened == 2 and _agent_pid(t) != pid


def test_session_killed_during_a_job_is_retried_once_and_counted_once(tmp_path, artifact):
    dev = _dev(tmp_path, seconds=3.0)
    pool = TransportPool(lambda d: _local(tmp_path))
    t = pool.get(dev)
    pid = _agent_pid(t)
    killer = threading.Timer(1.5, os.kill, args=(pid, signal.SIGKILL))
    killer.start()
    try:
        out = fleet.run_on_device(dev, _job(dev, artifact, "mid"), tmp_path / "w", retries=2, backoff_s=0.01,
                                  pool=pool)
    finally:
        killer.cancel()
        pool.close()
    assert out.ok and out.attempts == 2, out.error            # lost with its session, run again on a new one
    assert t.sessions_opened == 2 and _gone(pid)
    assert out.report.timing.duration_s >= 3.0                 # the report is the second run's, whole


def test_a_frozen_agent_is_found_dead_by_its_missing_heartbeat(tmp_path, artifact):
    dev = _dev(tmp_path, seconds=5.0)
    with _local(tmp_path, heartbeat_s=0.2) as t:                 # dead after 5 heartbeats unheard: 1 s
        pid = _agent_pid(t)
        threading.Timer(1.0, os.kill, args=(pid, signal.SIGSTOP)).start()
        t0 = time.monotonic()
        with pytest.raises(InfrastructureError, match=r"agent session dead: nothing heard for 1\.\d s"):
            t.run_job(_job(dev, artifact, "frozen"), tmp_path / "w")
        assert time.monotonic() - t0 < 4.0                       # well before the 5-s job would have ended
        assert _gone(pid)                                         # killed, not left frozen
        assert t.run_job(_job(_dev(tmp_path), artifact, "next"), tmp_path / "n").status == "ok"


def test_cancel_stops_the_running_job_and_ends_the_session(tmp_path, artifact):
    dev = _dev(tmp_path, seconds=30.0)
    with _local(tmp_path) as t:
        sess = t.session()
        pid = int(sess.info["pid"])
        threading.Timer(1.0, lambda: sess.call("cancel", 10.0, job="long")).start()
        t0 = time.monotonic()
        with pytest.raises(InfrastructureError, match="job long cancelled by the host"):
            t.run_job(_job(dev, artifact, "long"), tmp_path / "w")
        assert time.monotonic() - t0 < 10.0 and _gone(pid)


HANGING_RUNTIME = """
import sys, time
from agent import runner, session
runner.run_job = lambda job, base_dir: time.sleep(600)     # a runtime stuck in a native call
sys.exit(session.main(sys.argv[-1]))
"""


def test_a_job_past_its_deadline_is_stopped_by_the_agent(tmp_path, artifact):
    """The runner bounds its own phases by the job's timeout; a runtime stuck inside one call is stopped by the
    session's watchdog, which answers JobTimeout and ends the agent (nothing keeps running)."""
    python = _agent_running(tmp_path, "hang.py", HANGING_RUNTIME)
    dev = _dev(tmp_path)
    with _local(tmp_path, python=str(python), grace_s=0.5) as t:
        pid = _agent_pid(t)
        t0 = time.monotonic()
        with pytest.raises(InfrastructureError, match=r"job late did not finish within 2 s; the agent session stopped"):
            t.run_job(_job(dev, artifact, "late", timeout_s=1.0), tmp_path / "w")
        assert time.monotonic() - t0 < 6.0 and _gone(pid)


BAD_REPORT = """
import sys
from agent import session
session.to_dict = lambda report: {"schema_version": 99}    # an agent whose report breaks the contract
sys.exit(session.main(sys.argv[-1]))
"""


def test_a_refused_job_and_an_invalid_report_are_that_jobs_device_error(tmp_path, artifact):
    dev = _dev(tmp_path)
    with _local(tmp_path) as t:
        job = _job(dev, artifact, "odd")
        job.runtime.name = "no-such-runtime"                      # valid to the host, unknown to this agent
        with pytest.raises(DeviceError, match="agent run: SchemaError: runtime.name: unknown runtime") as e:
            t.run_job(job, tmp_path / "odd")
        assert not e.value.infrastructure
        assert t.run_job(_job(dev, artifact, "next"), tmp_path / "n").status == "ok" and t.sessions_opened == 1
    python = _agent_running(tmp_path, "bad.py", BAD_REPORT)
    with _local(tmp_path, python=str(python)) as t:
        with pytest.raises(DeviceError, match="invalid report from the agent: schema_version") as e:
            t.run_job(_job(dev, artifact, "bad"), tmp_path / "bad")
        assert not e.value.infrastructure


def test_protocol_mismatch_names_both_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(host_session, "PROTOCOL", 99)
    with _local(tmp_path) as t, pytest.raises(DeviceError) as e:
        t.session()
    msg = str(e.value)
    assert "the host speaks agent session protocol 99, this agent (%s) speaks 1" % agent.__version__ in msg
    assert "Upgrade the agent on the device" in msg and not e.value.infrastructure


def test_an_agent_older_than_the_host_is_refused_with_an_upgrade_hint(tmp_path):
    old = tmp_path / "old"
    shutil.copytree(os.path.dirname(agent.__file__), old / "agent")
    init = old / "agent" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{agent.__version__}"', '__version__ = "0.0.1"'))
    assert '"0.0.1"' in init.read_text()
    python = tmp_path / "python"             # the device's python, with the old agent first on its path
    python.write_text(f"#!/bin/sh\ncd {tmp_path} && PYTHONPATH={old}:$PYTHONPATH exec {os.sys.executable} \"$@\"\n")
    python.chmod(0o755)
    with _local(tmp_path, python=str(python)) as t, pytest.raises(DeviceError) as e:
        t.session()
    assert f"the agent on the device is 0.0.1, older than this host's {agent.__version__}: upgrade it" in str(e.value)
    assert not e.value.infrastructure


def test_leases_and_probes_go_through_the_session(tmp_path, artifact):
    dev = _dev(tmp_path)
    with _local(tmp_path) as t:
        with fleet.Lease(t, dev.id, label="session test") as lease:
            shown = t.agent_request("lease", action="show", dir=t.cache_dir())
            assert shown["held"] and shown["lease"]["holder"]["label"] == "session test" and lease.token
        assert not t.agent_request("lease", action="show", dir=t.cache_dir())["held"]
        probe = t.agent_request("probe")["probe"]
        assert probe["python"] and t.sessions_opened == 1
