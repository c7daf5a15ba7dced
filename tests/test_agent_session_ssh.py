"""Agent sessions over a real loopback sshd (tests/sshd.py, ``LogLevel DEBUG1``: every ``exec`` request is in its
log): 50 jobs through one session and one ``exec``; a demo of 4 candidates on an SSH device in at most 2 ``exec``
requests; the agent killed between and during jobs; a frozen agent found by its missing heartbeat."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import psutil
import pytest

paramiko = pytest.importorskip("paramiko")

from agent import schema  # noqa: E402
from edgeprune import data, models  # noqa: E402
from edgeprune.errors import SSHError  # noqa: E402
from host.fleet import runner as fleet_runner  # noqa: E402
from host.fleet.pool import TransportPool  # noqa: E402
from host.fleet.ssh import SSHTransport  # noqa: E402
from tests import sshd  # noqa: E402
from tests.test_demo import edgeprune  # noqa: E402

pytestmark = sshd.needs_sshd()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = sshd.start_fleet(tmp_path_factory.mktemp("sshd"), 2, log_level="DEBUG1")
    yield f
    f.stop()


def _execs(server: sshd.Sshd) -> int:
    return server.log_text().count("request exec")


def _job(job_inputs, job_id="s1", seconds=0.05, timeout_s=120.0):
    onnx_path, man, shard = job_inputs
    return schema.JobSpec(
        job_id=job_id, timeout_s=timeout_s, artifact=schema.ArtifactSpec(path=str(onnx_path), sha256=man.sha256),
        preprocess=schema.PreprocessSpec(scale=data.SCALE, mean=list(data.MEAN), std=list(data.STD)),
        timing=schema.TimingSpec(min_iters=5, min_duration_s=seconds, warmup_s=0.0, warmup_iters=1,
                                 max_duration_s=max(1.0, 2 * seconds)),
        power=None, thermal=None,
        eval=schema.EvalSpec(path=str(shard), sha256=models.sha256_file(shard), split="eval")).validate()


def _gone(pid: int, within_s: float = 10.0) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def test_fifty_jobs_through_one_ssh_session_and_one_exec(fleet, tmp_path, job_inputs):
    server = fleet.servers[0]
    before = _execs(server)
    with SSHTransport(fleet.device(0, cache_dir=str(tmp_path / "cache"))) as t:
        for i in range(50):
            rep = t.run_job(_job(job_inputs, f"j{i}"), tmp_path / "w" / str(i))
            assert rep.status == "ok" and rep.job_id == f"j{i}", rep.error
        assert t.sessions_opened == 1 and t.counters.connects == 1
        assert t.counters.files_uploaded == 3                 # the bundle, the artifact and the shard, once
    # cold cache: one exec for the helper that unpacked the uploaded agent bundle, one for the session
    assert _execs(server) - before == 2, server.log_text()[-3000:]
    before = _execs(server)
    with SSHTransport(fleet.device(0, cache_dir=str(tmp_path / "cache"))) as t:   # warm: the session's exec only
        assert t.run_job(_job(job_inputs, "warm"), tmp_path / "warm").status == "ok"
    assert _execs(server) - before == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "jobs").iterdir()) == []        # every job folder removed
    assert list((tmp_path / "cache" / "sessions").iterdir()) == []                      # clean byes: no logs left


def test_demo_of_four_candidates_on_an_ssh_device_opens_one_session(fleet, tmp_path):
    server = fleet.servers[1]
    dev = fleet.device(1, cache_dir=str(tmp_path / "cache"), device_id="pi-like")
    (tmp_path / "dev.yaml").write_text(
        f"id: pi-like\ntransport: ssh\npython: {sys.executable}\n"
        f"timing: {{min_iters: 10, min_duration_s: 0.1, warmup_s: 0.0}}\n"
        f"ssh: {{host: {dev.ssh.host}, port: {dev.ssh.port}, user: {dev.ssh.user}, key: {dev.ssh.key}, "
        f"known_hosts: {dev.ssh.known_hosts}, cache_dir: {dev.ssh.cache_dir}}}\n")
    before = _execs(server)
    r = edgeprune("demo", "--quick", "--ratios", "0,0.3,0.5,0.7", "--no-recovery", "--eval-per-class", "10",
                  "--device", str(tmp_path / "dev.yaml"), "--out", str(tmp_path / "d"), "--db",
                  str(tmp_path / "s.db"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on device 'pi-like' (onnxruntime, onnx, 1 thread(s))" in " ".join(r.stdout.split())
    execs = _execs(server) - before
    assert execs <= 2, f"{execs} exec requests:\n" + server.log_text()[-4000:]


def test_ssh_session_killed_between_and_during_jobs(fleet, tmp_path, job_inputs):
    dev = fleet.device(0, cache_dir=str(tmp_path / "cache"))
    pool = TransportPool(SSHTransport)
    t = pool.get(dev)
    try:
        assert t.run_job(_job(job_inputs, "a"), tmp_path / "a").status == "ok"
        pid = int(t.session().info["pid"])
        os.kill(pid, signal.SIGKILL)                         # between jobs: found at once, a new session
        assert _gone(pid)
        assert t.run_job(_job(job_inputs, "b"), tmp_path / "b").status == "ok" and t.sessions_opened == 2
        pid = int(t.session().info["pid"])
        killer = threading.Timer(1.5, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        out = fleet_runner.run_on_device(dev, _job(job_inputs, "mid", seconds=3.0), tmp_path / "w", retries=2,
                                         backoff_s=0.01, pool=pool)
        killer.cancel()
        assert out.ok and out.attempts == 2 and out.report.timing.duration_s >= 3.0, out.error
        assert t.sessions_opened >= 3 and _gone(pid)
    finally:
        pool.close()


def test_ssh_frozen_agent_is_found_by_its_missing_heartbeat(fleet, tmp_path, job_inputs):
    with SSHTransport(fleet.device(0, cache_dir=str(tmp_path / "cache")), heartbeat_s=0.2) as t:
        pid = int(t.session().info["pid"])
        threading.Timer(1.0, os.kill, args=(pid, signal.SIGSTOP)).start()
        t0 = time.monotonic()
        with pytest.raises(SSHError, match=r"agent session dead: nothing heard for 1\.\d s") as e:
            t.run_job(_job(job_inputs, "frozen", seconds=5.0), tmp_path / "w")
        assert e.value.infrastructure and time.monotonic() - t0 < 4.0
        os.kill(pid, signal.SIGKILL)
        assert t.run_job(_job(job_inputs, "next"), tmp_path / "n").status == "ok"
