"""Fault injection on a fleet of real sshd devices in network namespaces (harness: tests/faults).

Each test puts one fault on one or more namespaced devices while the fleet code (host.fleet.runner: leases, retries;
host.fleet.ssh: the device cache and helper) runs a ResNet-20 job on them and records each device's result in the
results store, then asserts the behaviour the fault should get (retried, resumed, stopped, refused with a clear
error) and, through :meth:`tests.faults.lab.Lab.check`, the invariants every fault shares: no completed result
lost, no partial result recorded as complete, no artifact executed without a verified hash, nothing (process,
job folder, partial upload, lease) left behind on the device. The lab's teardown then checks that nothing of it
is left on this machine either (namespaces, veths, mounts, processes).

Timeouts are short so that each fault takes seconds: connect 3 s, commands 8 s, keepalives every 2 s (a link
that acknowledges nothing for 3 keepalives, 6 s, is dead: host.fleet.ssh.dead_after_s), leases of 15 s.
Run: ``python -m pytest -m faults`` (root; ``apt-get install iproute2 nftables openssh-server``).
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List

import psutil
import pytest

from edgeprune import models
from host.fleet.health import check_devices
from host.fleet.ssh import agent_bundle
from host.results.store import Store
from tests import sshd
from tests.faults import netns
from tests.faults.lab import AgentWatch, Artifact, Lab, wait_for
from tests.test_demo import edgeprune

_WHY_NOT = netns.missing_requirements() if sshd.have_sshd() else None
pytestmark = [pytest.mark.faults, *sshd.needs_sshd(),
              pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")]

# 30 % loss each way fails half of all round trips, and TCP's retransmission timeouts double each time: stalls of
# 10-25 s happen, uploads of the 1.45 MB of a cold cache take 5-100 s. So: longer SSH timeouts (a connection is
# dead after 30 s unacknowledged), leases renewed less often, more retries; and the artifact cached beforehand.
LOSSY = dict(connect_timeout_s=10.0, command_timeout_s=30.0, keepalive_s=10.0)
LOSSY_RUN = dict(ssh=LOSSY, retries=4, backoff_s=1.0, lease_ttl_s=60.0)


def fault(what: str, expected: str):
    return pytest.mark.reliability(kind="fault", what=what, expected=expected)


# The catalogue runs over agent sessions (one `python -m agent serve` per device: the default). The faults whose
# device side differs between the paths, and the slow links, also run with one `python -m agent run` command per
# job (`agent_session: false`): the lab's fixture reads `mode` and sets lab.sessions.
BOTH_PATHS = pytest.mark.parametrize("mode", ["per-job", "session"])


@pytest.fixture(scope="module")
def artifact(job_inputs, tmp_path_factory) -> Artifact:
    """The ResNet-20 ONNX artifact (1.1 MB) with its manifest in a folder of its own (what `bench --model`
    takes), and the 50-image eval shard."""
    onnx_path, man, shard = job_inputs
    d = tmp_path_factory.mktemp("fault-artifact")
    (d / onnx_path.name).write_bytes(onnx_path.read_bytes())
    man.write(d / "r20.manifest.json")
    return Artifact(d / onnx_path.name, man, shard, models.sha256_file(shard))


@pytest.fixture(scope="module", autouse=True)
def nothing_left_on_this_machine():
    netns.sweep_stale()                          # what an earlier, killed run left (its pid is in the names)
    yield
    ours = [n for n in netns.namespaces() + netns.links() if netns.ours(n)]
    assert ours == [], "namespaces or veths left behind: %s" % ours


@pytest.fixture
def lab(request, tmp_path, artifact) -> Iterator[Lab]:
    lab = Lab(tmp_path / "lab", artifact)
    mode = getattr(request.node, "callspec", None) and request.node.callspec.params.get("mode")
    if mode is not None:
        lab.sessions = mode == "session"
    try:
        yield lab
    finally:
        problems = lab.close()
        left = lab.leftovers()
    assert problems == [] and left == [], (problems, left)


@contextmanager
def background(fn: Callable[[], None]) -> Iterator[None]:
    """Run ``fn`` (the fault) in a thread while the block runs; its exception is raised at the end."""
    errors: List[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=run, name="fault", daemon=True)
    t.start()
    yield
    t.join(60)
    assert not t.is_alive(), "the fault thread did not finish"
    if errors:
        raise errors[0]


def link_gone_once(dev, what: str, ready: Callable[[], object],
                   poll_s: float) -> "tuple[Callable[[], None], List[float]]":
    """A fault for :func:`background`: once ``ready()`` (waited for as ``what``), ``dev``'s link goes down for good;
    the returned list then holds the time of the cut (monotonic seconds)."""
    at: List[float] = []

    def cut() -> None:
        wait_for(what, ready, 60, poll_s)
        dev.net.link(False)
        at.append(time.monotonic())

    return cut, at


class Events:
    """The fleet's progress events (device, kind, message), kept."""

    def __init__(self) -> None:
        self.seen: List[tuple] = []

    def __call__(self, dev: str, kind: str, msg: str) -> None:
        self.seen.append((time.monotonic(), dev, kind, msg))

    def of(self, kind: str) -> List[str]:
        return [m for _, _, k, m in self.seen if k == kind]


# ------------------------------------------------------------------------------------------------ link
@fault("link down 3 s mid-upload (artifact)", "upload resumes (TCP rides it out); ok first attempt; recorded once")
def test_link_down_mid_upload_then_back(lab):
    dev = lab.device()
    dev.net.rate("4mbit")               # the 1.1 MB upload takes ~2 s: long enough to cut it in the middle
    sha = lab.artifact.manifest.sha256

    def cut() -> None:
        wait_for("the artifact upload", lambda: dev.uploading(sha, 100_000), 60, 0.005)
        dev.net.link(False)
        time.sleep(3)
        dev.net.link(True)

    with background(cut):
        (o,) = lab.run([dev], "upload-blip")
    assert o.ok and o.attempts == 1, o.error
    (t,) = lab.transports[dev.id]
    assert t.counters.files_uploaded == 3 and t.counters.connects == 1      # one upload each, one connection
    lab.check("upload-blip", [o], [dev])


@fault("link down 5 s mid-upload (agent bundle, while taking the lease; dead-link limit 3 s)",
       "connection dropped, lease and upload retried; partial upload removed; ok; recorded once")
def test_link_down_mid_bundle_upload_past_the_dead_link_limit(lab):
    dev = lab.device()
    dev.net.rate("1mbit")               # the 0.2 MB bundle takes ~2 s
    bundle = agent_bundle()[1]
    partial: List[str] = []

    def cut() -> None:
        partial.extend(p.name for p in wait_for("the bundle upload", lambda: dev.uploading(bundle, 40_000), 60, 0.005))
        dev.net.link(False)
        time.sleep(5)
        dev.net.clear_rate()
        dev.net.link(True)

    events = Events()
    with background(cut):
        (o,) = lab.run([dev], "bundle-cut", ssh=dict(keepalive_s=1.0), backoff_s=1.0, retries=3, events=events)
    # before, a failure while taking the lease was not retried at all: the device failed on first contact
    assert o.ok and o.attempts == 1, o.error
    assert events.of("retry") and "connection lost" in events.of("retry")[0]
    assert not (dev.cache / partial[0]).exists()          # the retry's first helper call removed it
    lab.check("bundle-cut", [o], [dev])


@fault("link down for good mid-upload (artifact)",
       "dead link found in 6 s, retried, clear 'cannot connect' error, marked unhealthy; lease expires; "
       "partial upload never used")
def test_link_down_mid_upload_for_good(lab):
    dev = lab.device()
    dev.net.rate("4mbit")
    sha = lab.artifact.manifest.sha256
    cut, at = link_gone_once(dev, "the artifact upload", lambda: dev.uploading(sha, 100_000), 0.005)
    events = Events()
    with background(cut):
        (o,) = lab.run([dev], "upload-gone", lease_ttl_s=8, events=events)
    gave_up_after = time.monotonic() - at[0]
    # before TCP_USER_TIMEOUT (host.fleet.ssh.dead_after_s) the controller hung here until the kernel gave up (15+ min)
    assert gave_up_after < 30, gave_up_after
    assert not o.ok and o.attempts == 3 and o.error_type == "SSHError"
    assert "connection lost" in events.of("retry")[0]
    assert "cannot connect" in o.error or "no connection within 3 s" in o.error, o.error
    state = lab.root / "fleet-state.json"                 # `edgeprune devices check` marks it unhealthy ...
    (health,) = check_devices([dev.config()], state).values()
    assert health["health"] == "bad" and "SSHError" in health["details"]["error"], health
    dev.net.link(True)
    # ... and healthy again once it answers (the next checks, a second apart, as a lab's monitoring would run them)
    wait_for("the device to be healthy again",
             lambda: next(iter(check_devices([dev.config()], state).values()))["health"] == "good", 20, 1.0)
    lease = dev.lease()                                   # the controller could not release it: it expires
    assert lease is not None and lease["expires_at"] <= time.time() + 8
    partial = dev.partial_uploads()
    assert len(partial) == 1 and not dev.cached(sha).exists()      # never renamed into place, never used
    lab.check("upload-gone", [o], [dev], lease_may_remain=True, partial_may_remain=True)
    wait_for("the stale lease to expire", lambda: not dev.lease_held(), 12)

    # an hour later the next controller sweeps the dead upload and measures as usual
    old = time.time() - 7200
    os.utime(dev.cache / partial[0], (old, old))
    dev.net.clear_rate()
    (o2,) = lab.run([dev], "upload-gone-2")
    assert o2.ok, o2.error
    lab.check("upload-gone-2", [o2], [dev])


@fault("link down 3 s mid-run", "TCP rides it out: ok first attempt; recorded once")
@BOTH_PATHS
def test_link_down_mid_run_then_back(lab, mode):
    dev = lab.device()

    def cut() -> None:
        wait_for("the agent", dev.agent_pids, 60, 0.01)
        dev.net.link(False)
        time.sleep(3)
        dev.net.link(True)

    with AgentWatch([dev]) as watch, background(cut):
        (o,) = lab.run([dev], "run-blip", timing=dict(min_duration_s=1.0))
    assert o.ok and o.attempts == 1, o.error
    assert watch.max_at_once[dev.id] == 1
    lab.check("run-blip", [o], [dev])


@fault("link down 5 s mid-run (dead-link limit 3 s; the job's process group frozen meanwhile)",
       "connection dropped, retried when the link returns; abandoned job stopped by the retry first; recorded once")
@BOTH_PATHS
def test_link_down_mid_run_past_the_dead_link_limit(lab, mode):
    dev = lab.device(client_alive=False)     # sshd's default: its session (and the agent) outlive the connection
    frozen: List[int] = []

    def cut() -> None:
        (pid,) = wait_for("the agent", dev.agent_pids, 60, 0.01)
        pgid = os.getpgid(pid)
        dev.net.link(False)
        # the abandoned job must still be there when the retry reaches the device, however long the retry takes to
        # get back in. Frozen -- the device helper too -- it can neither finish on its own nor stop itself when
        # sshd closes its session (the host's FIN, retransmitted, lands once the link is back: the helper sees
        # POLLERR and kills its agent, test_sshd_killed_mid_run). Both raced the retry on slow CI machines and
        # left the retry nothing to stop. Only the retry's eviction (DEVICE_HELPER evict) can end it now.
        os.killpg(pgid, signal.SIGSTOP)
        frozen.extend(p for p in dev.net.pids() if _pgid(p) == pgid)
        time.sleep(5)
        dev.net.link(True)

    # keepalives every second: 3 s without an acknowledgement is a dead connection
    with AgentWatch([dev]) as watch, background(cut):
        (o,) = lab.run([dev], "run-cut", ssh=dict(keepalive_s=1.0), backoff_s=1.0, retries=4,
                       timing=dict(min_duration_s=2.0))
    assert o.ok and o.attempts >= 2, o.error
    # per job: helper and agent stopped (SIGKILL); a session: the agent's one process
    assert len(frozen) >= (1 if mode == "session" else 2) and not any(_running(p) for p in frozen)
    first, second = sorted(watch.first_seen, key=watch.first_seen.get)[:2]
    # the first attempt's agent was still measuring when the retry reached the device: the retry stopped it
    # (DEVICE_HELPER evict) instead of measuring beside it
    assert watch.max_at_once[dev.id] == 1
    assert watch.last_seen[first] <= watch.first_seen[second]
    assert sum(t.counters.orphans_stopped for t in lab.transports[dev.id]) == 1
    lab.check("run-cut", [o], [dev])


@fault("device link down for good mid-run behind a live ProxyJump host",
       "dead link found through the jump in 3 keepalives (not at the job's deadline), retried, clear error naming "
       "the jump host; the orphaned agent stops once the link is back; lease expires")
def test_link_down_for_good_behind_a_live_jump_host(lab):
    dev = lab.device()
    jump = lab.jump_host()       # on loopback: the host's link to it stays up; the jump host's link to dev0 dies
    cut, at = link_gone_once(dev, "the agent", dev.agent_pids, 0.01)
    events = Events()
    with background(cut):
        (o,) = lab.run([dev], "jump-gone", ssh=dict(proxy_jump=jump, keepalive_s=1.0), lease_ttl_s=8,
                       events=events, timeout_s=60, timing=dict(min_duration_s=30.0))
    (lost,) = [t for t, _, kind, _ in events.seen if kind == "retry"][:1]
    # before, nothing noticed: TCP_USER_TIMEOUT guards only the link to the jump host, which stayed up, and the
    # command waited for its deadline (the job's 60 s + grace + command timeout: 70 s)
    assert lost - at[0] < 10, lost - at[0]
    # per job the command's channel, over a session the session's channel: each reports its connection gone
    assert re.search("connection lost|agent session lost: the agent's output closed", events.of("retry")[0]), \
        events.of("retry")
    assert sum(t.counters.dead_links for t in lab.transports[dev.id]) == 1
    assert not o.ok and o.attempts == 3 and "jump host %s could not open a connection" % jump in o.error, o.error
    dev.net.link(True)
    # the jump host's connection to the device closes once it can: the device's helper sees its session gone
    # and stops the agent (which would otherwise measure for 30 s)
    wait_for("the orphaned agent to stop", lambda: not dev.agent_pids(), 20)
    lab.check("jump-gone", [o], [dev], lease_may_remain=True)
    wait_for("the stale lease to expire", lambda: not dev.lease_held(), 12)


# ------------------------------------------------------------------------------------------------ sshd
@fault("sshd killed mid-run (listener and sessions), back 1 s later",
       "retried once sshd is back; orphaned agent stops at once; recorded once")
@BOTH_PATHS
def test_sshd_killed_mid_run(lab, mode):
    dev = lab.device()
    killed: List[float] = []

    def kill() -> None:
        wait_for("the agent", dev.agent_pids, 60, 0.01)
        time.sleep(0.5)
        assert len(dev.kill_sshd()) >= 2
        killed.append(time.monotonic())
        time.sleep(1)
        dev.start_sshd()

    with AgentWatch([dev]) as watch, background(kill):
        (o,) = lab.run([dev], "sshd-kill", backoff_s=1.0, timing=dict(min_duration_s=4.0))
    assert o.ok and o.attempts >= 2, o.error
    orphan = min(watch.first_seen, key=watch.first_seen.get)
    # its helper sees sshd gone (POLLERR on its stdout) and stops it; before, it measured 4 s more, beside the retry
    assert watch.last_seen[orphan] - killed[0] < 1.5, watch.last_seen[orphan] - killed[0]
    assert watch.max_at_once[dev.id] == 1
    lab.check("sshd-kill", [o], [dev])


@fault("connection lost while releasing the lease (sshd's session killed)",
       "release retried on a new connection: nothing held afterwards; recorded once")
@BOTH_PATHS
def test_connection_lost_while_releasing_the_lease(lab, mode):
    dev = lab.device()
    flag = dev.root / "released-once"
    dev.set_python(cut_release_once=flag)
    events = Events()
    (o,) = lab.run([dev], "release-cut", events=events)
    assert o.ok and o.attempts == 1, o.error
    assert flag.exists()
    # before, one try: the lease stayed held for its TTL, and the next controller waited that long
    assert not dev.lease_held(), dev.lease()
    lab.check("release-cut", [o], [dev])


# ------------------------------------------------------------------------------------------------ network quality
@fault("30 % packet loss each way (nftables; artifact cached)", "completes (retries allowed); recorded once")
@BOTH_PATHS
def test_packet_loss(lab, mode):
    dev = lab.device()
    (o,) = lab.run([dev], "loss-warm")               # the artifact's upload is not part of this one (see below)
    assert o.ok, o.error
    dev.net.loss(30)
    assert "edgeprune_fault" in dev.net.nft_tables()
    (o,) = lab.run([dev], "loss", **LOSSY_RUN)
    assert o.ok, o.error
    lab.check("loss", [o], [dev])
    dev.net.clear_loss()
    assert "edgeprune_fault" not in dev.net.nft_tables()


@fault("1 Mbit/s both ways (tc tbf)", "slow upload within the timeouts; ok first attempt; recorded once")
@BOTH_PATHS
def test_one_megabit(lab, mode):
    dev = lab.device()
    dev.net.rate("1mbit")
    assert "tbf" in dev.net.qdiscs()
    t0 = time.monotonic()
    (o,) = lab.run([dev], "1mbit")
    took = time.monotonic() - t0
    assert o.ok and o.attempts == 1, o.error
    (t,) = lab.transports[dev.id]
    assert took > t.counters.bytes_uploaded * 8 / 1e6 * 0.9      # the limit held: ~1.45 MB at 1 Mbit/s
    lab.check("1mbit", [o], [dev])


@fault("1 Mbit/s both ways, through a ProxyJump host",
       "slow is not dead: the jump host's dead-link watch keeps the connection; ok first attempt; recorded once")
def test_one_megabit_through_a_jump_host(lab):
    dev = lab.device()
    jump = lab.jump_host()
    dev.net.rate("1mbit")
    t0 = time.monotonic()
    (o,) = lab.run([dev], "1mbit-jump", ssh=dict(proxy_jump=jump, keepalive_s=1.0))   # dead after 3 s silent
    took = time.monotonic() - t0
    assert o.ok and o.attempts == 1, o.error
    (t,) = lab.transports[dev.id]
    assert took > t.counters.bytes_uploaded * 8 / 1e6 * 0.9 > 3 * 3     # the upload outlasted the limit thrice
    assert t.counters.dead_links == 0 and t.counters.connects == 1
    lab.check("1mbit-jump", [o], [dev])


@fault("300 ms added latency each way (delaying TCP proxy)", "ok first attempt; recorded once")
def test_added_latency(lab):
    dev = lab.device()
    proxy = dev.add_delay(0.3)
    t0 = time.monotonic()
    (o,) = lab.run([dev], "latency", ssh=LOSSY)
    took = time.monotonic() - t0
    assert o.ok and o.attempts == 1, o.error
    assert proxy.connections >= 1 and took > 6          # handshake, lease, uploads, job, release: many round trips
    lab.check("latency", [o], [dev])


# ------------------------------------------------------------------------------------------------ the agent
@fault("agent SIGKILLed mid-measurement", "error names SIGKILL; retried; recorded once")
@BOTH_PATHS
def test_agent_killed_mid_measurement(lab, mode):
    dev = lab.device()

    def kill() -> None:
        (pid,) = wait_for("the agent", dev.agent_pids, 60, 0.01)
        wait_for("onnxruntime to be loaded", lambda: "onnxruntime" in Path("/proc/%d/maps" % pid).read_text(),
                 30, 0.01)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)

    events = Events()
    with AgentWatch([dev]) as watch, background(kill):
        (o,) = lab.run([dev], "agent-kill", events=events, backoff_s=0.2, timing=dict(min_duration_s=2.0))
    assert o.ok and o.attempts == 2, o.error
    (retry,) = events.of("retry")
    if mode == "session":       # the session's pipe closed mid-job: the runner retries it on a new session
        assert "agent session lost: the agent's output closed" in retry and "during run" in retry, retry
    else:
        assert "agent was killed by SIGKILL" in retry and "without a report" in retry, retry
    assert watch.max_at_once[dev.id] == 1
    lab.check("agent-kill", [o], [dev])


@fault("agent out of memory (prlimit --as 512 MB, batch 2048)",
       "'out of memory on the device' error report, not retried; recorded as error")
@BOTH_PATHS
def test_agent_out_of_memory(lab, mode):
    dev = lab.device()
    dev.set_python(limit_as=512 << 20)
    (o,) = lab.run([dev], "oom", timing=dict(batch_size=2048))
    assert not o.ok and o.attempts == 1
    assert o.report is not None and o.report.status == "error" and o.report.timing is None
    assert "out of memory on the device" in o.error, o.error
    (row,) = lab.check("oom", [o], [dev])
    assert "out of memory on the device" in row["error"]
    if mode == "session":           # the job failed, not the session: it reported, then said bye
        (t,) = lab.transports[dev.id]
        assert t.sessions_opened == 1


@fault("device hangs (job's process group SIGSTOPped)",
       "host deadline kills the process group; retried; recorded once")
@BOTH_PATHS
def test_device_hangs(lab, mode):
    dev = lab.device()
    stopped: List[int] = []

    def freeze() -> None:
        (pid,) = wait_for("the agent", dev.agent_pids, 60, 0.01)
        pgid = os.getpgid(pid)
        os.killpg(pgid, signal.SIGSTOP)               # the helper too: nothing on the device will time it out
        stopped.extend(p for p in dev.net.pids() if _pgid(p) == pgid)

    events = Events()
    with AgentWatch([dev]) as watch, background(freeze):
        (o,) = lab.run([dev], "hang", events=events, timeout_s=4, grace_s=1, ssh=dict(command_timeout_s=4.0),
                       backoff_s=0.2)
    assert o.ok and o.attempts == 2, o.error
    (retry,) = events.of("retry")
    if mode == "session":       # frozen: no heartbeat, and the run request past its deadline ends the session
        assert re.search(r"agent session dead: nothing heard|run did not finish within 9 s", retry), retry
    else:
        assert "did not finish within 5 s; killed" in retry, retry
    assert len(stopped) >= (1 if mode == "session" else 2) and not any(_running(p) for p in stopped)
    assert watch.max_at_once[dev.id] == 1
    lab.check("hang", [o], [dev])


# ------------------------------------------------------------------------------------------------ the device's disk
@fault("cached artifact corrupted (byte flipped), before and after the cache check",
       "mismatch found and re-uploaded; agent refuses the unverified file; never executed")
@BOTH_PATHS
def test_corrupted_cache(lab, mode):
    dev = lab.device()
    sha = lab.artifact.manifest.sha256
    (o,) = lab.run([dev], "corrupt-0")
    assert o.ok, o.error
    cached = dev.cached(sha)

    flip(cached)                                      # between jobs: the helper's check finds it
    (o,) = lab.run([dev], "corrupt-1")
    assert o.ok, o.error
    t = lab.transports[dev.id][-1]
    assert t.counters.cache_replaced == 1 and t.counters.files_uploaded == 1
    assert models.sha256_file(cached) == sha
    lab.check("corrupt-1", [o], [dev])

    # after the helper's check, before the agent loads it (a disk flipping bits under the job): the agent's own
    # check refuses it, and nothing ran it
    flag = dev.root / "flipped-once"
    dev.set_python(flip_artifact_once=flag)
    (o,) = lab.run([dev], "corrupt-2")
    assert not o.ok and o.attempts == 1 and o.report is not None and o.report.timing is None
    assert o.report.error.type == "ArtifactError" and "sha256 mismatch" in o.report.error.message
    assert models.sha256_file(cached) != sha
    (row,) = lab.check("corrupt-2", [o], [dev])
    assert row["status"] == "error" and "sha256 mismatch" in row["error"]

    (o,) = lab.run([dev], "corrupt-3")               # the next job replaces it again
    assert o.ok, o.error
    assert lab.transports[dev.id][-1].counters.cache_replaced == 1
    lab.check("corrupt-3", [o], [dev])
    assert flag.exists()
    assert len(dev.audited()) == 3                    # three models loaded, each the verified artifact


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed process stays one until its parent, here maybe PID 1, reaps it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pgid(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return -1


def flip(path: Path, at: int = 4096) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@fault("full disk (cache on a 1 MB tmpfs; a 3 MB one filled mid-upload)",
       "clear 'no space left on the device' error, not retried; nothing partial left or cached")
def test_full_disk(lab):
    small = lab.device(tmpfs="1m")                    # the agent fits, the 1.1 MB artifact does not
    filling = lab.device(tmpfs="3m")                  # everything fits, until something else fills the disk
    filling.net.rate("8mbit")                         # ~1 s upload: time to fill the disk under it
    sha = lab.artifact.manifest.sha256
    ballast: List[Path] = []

    def fill() -> None:
        wait_for("the artifact upload", lambda: filling.uploading(sha, 64_000), 60, 0.005)
        ballast.append(filling.fill_disk())

    with background(fill):
        outs = lab.run([small, filling], "disk")
    for o in outs:
        assert not o.ok and o.attempts == 1 and "no space left on the device" in o.error, o.error
    assert "has 0." in outs[0].error and "r20.onnx 1.09 MB" in outs[0].error    # refused before uploading
    for d in (small, filling):
        assert not d.cached(sha).exists()
    ballast[0].unlink()
    lab.check("disk", outs, [small, filling])
    (o,) = lab.run([filling], "disk-2")               # space again: it measures
    assert o.ok, o.error
    lab.check("disk-2", [o], [filling])


# ------------------------------------------------------------------------------------------------ leases
@fault("stale lease of a dead (SIGKILLed) controller",
       "respected until its TTL, then taken over by `edgeprune bench`; job runs; recorded once")
def test_stale_lease_taken_over_by_bench(lab, tmp_path):
    dev = lab.device()
    dead = lab.dead_controller(dev, ttl_s=6)
    assert not psutil.pid_exists(dead) and dev.lease_held()
    left = dev.lease()["expires_at"] - time.time()
    fleet = lab.fleet_file([dev], tmp_path / "fleet.yaml")
    t0 = time.monotonic()
    r = edgeprune("bench", "--model", str(lab.artifact.path.parent), "--fleet", str(fleet), "--db", str(lab.db),
                  "--run-id", "stale", "--quick", "--repeat", "1", "--lease-wait", "60", "--out", str(tmp_path / "out"),
                  cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 >= left - 0.5            # not taken before it expired
    (row,) = lab.check("stale", [], [dev], eval_n=1000)
    assert row["status"] == "ok" and row["device_id"] == dev.id
    with Store(str(lab.db)) as store:
        assert store.run("stale")["status"] == "complete"


# ------------------------------------------------------------------------------------------------ acceptance
@pytest.mark.slow
@fault("30 % packet loss on 3 devices, 20 jobs (7 + 7 + 6)", "all complete; every result recorded exactly once")
def test_long_run_over_lossy_links(lab):
    devs = [lab.device() for _ in range(3)]
    warm = lab.run(devs, "lossy-warm")               # each device caches the artifact on a clean link
    assert all(o.ok for o in warm), [o.error for o in warm]
    for d in devs:
        d.net.loss(30)
    jobs = {devs[0].id: 7, devs[1].id: 7, devs[2].id: 6}
    done: dict = {}

    def device_runs(d) -> None:                       # the devices in parallel, each device's jobs one by one
        done[d.id] = [lab.run([d], "lossy-%s-%d" % (d.id, j), **LOSSY_RUN)[0] for j in range(jobs[d.id])]

    threads = [threading.Thread(target=device_runs, args=(d,)) for d in devs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert sorted(done) == sorted(jobs)
    with Store(str(lab.db)) as store:
        rows = [r for r in store.measurements() if r["run_id"].startswith("lossy-dev")]
    assert len(rows) == 20 and len({(r["run_id"], r["key"]) for r in rows}) == 20
    for d in devs:
        assert len(done[d.id]) == jobs[d.id]
        for j, o in enumerate(done[d.id]):
            assert o.ok, (d.id, j, o.error)
            lab.check("lossy-%s-%d" % (d.id, j), [o], [d])
