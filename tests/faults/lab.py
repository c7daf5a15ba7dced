"""The fault lab: SSH devices that are real sshd processes in their own network namespaces, the fleet code
driving them, the results store recording what they return, and the checks that nothing went wrong.

A :class:`Lab` owns a folder, a client key and a known_hosts file. Each :meth:`Lab.device` gets:

* a namespace and veth pair (:class:`tests.faults.netns.VethNamespace`), its own address ``10.231.x.2``;
* ``/usr/sbin/sshd -D -e -f CFG`` started inside it with ``ip netns exec`` (tests/sshd.py's config, host key
  and authorized_keys; paramiko's known_hosts check is on: the host key is recorded, unknown keys rejected);
* its own cache folder (the device cache and its lease), optionally a small tmpfs mounted there *before* sshd
  starts (``ip netns exec`` gives sshd its own mount namespace, so later host mounts may not reach it);
* its own "python": a wrapper around this interpreter that puts ``tests/faults/audit`` on the path, so that
  every model onnxruntime loads on the device is logged with its sha256 (:meth:`Device.audited`), and that can
  limit the agent's address space (``prlimit --as``) or arm a one-shot fault (a flipped artifact byte, a cut lease
  release).

:meth:`Lab.run` runs one job per device through :func:`host.fleet.runner.run_on_devices` (leases, retries and all)
and records each outcome in the results store (``host.results.store``) as it arrives, exactly as ``edgeprune bench``
does. :meth:`Lab.check` asserts the invariants every fault test shares, and :meth:`Lab.close` tears everything
down (processes, namespaces, veths, tmpfs mounts, nft tables, proxies) and reports anything that survived.
"""
from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import psutil

from agent import schema
from host.fleet.devices import DeviceConfig, SSHConfig, TimingConfig
from host.fleet.runner import DeviceOutcome, run_on_devices
from host.fleet.jobs import build_job
from host.fleet.ssh import SSHTransport
from host.results.store import RunRecorder, Store
from tests import sshd
from tests.faults import netns
from tests.faults.proxy import DelayProxy

AUDIT_DIR = Path(__file__).resolve().parent / "audit"
# A device on a flaky link should notice a controller that vanished: every 3 s sshd probes the client, and a probe
# to a host that dropped the connection meets a TCP reset, which ends the session (10 unanswered probes too).
SSHD_CLIENT_ALIVE = "ClientAliveInterval 3\nClientAliveCountMax 10\n"
FAST_TIMING = dict(min_iters=10, min_duration_s=0.2, warmup_s=0.0, warmup_iters=1)


def wait_for(what: str, fn: Callable[[], Any], timeout_s: float, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout_s, what))
        time.sleep(poll_s)


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


@dataclass
class Artifact:
    """The artifact every device runs: a verified ONNX file, its manifest and a 50-image eval shard."""

    path: Path
    manifest: Any
    shard: Path
    shard_sha256: str


@dataclass
class Device:
    """One namespaced sshd device: its network (``net``), folder, cache, host key, python wrapper and audit log."""

    lab: "Lab"
    id: str
    net: netns.VethNamespace
    root: Path
    cache: Path
    host_key: Path
    host_key_line: str
    python: Path
    audit: Path
    tmpfs: Optional[str] = None
    client_alive: bool = True
    proxy: Optional[DelayProxy] = None
    sshd: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------------ sshd
    def start_sshd(self) -> None:
        cfg = self.root / "sshd_config"
        cfg.write_text(sshd.SSHD_CONFIG.format(port=22, host=self.net.dev_ip, host_key=self.host_key,
                                               pid=self.root / "sshd.pid", authorized_keys=self.lab.authorized_keys,
                                               log_level="INFO") + (SSHD_CLIENT_ALIVE if self.client_alive else ""))
        with open(self.root / "sshd.log", "ab") as log:
            self.sshd = subprocess.Popen([netns.IP, "netns", "exec", self.net.name, sshd.SSHD, "-D", "-e", "-f",
                                          str(cfg)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        wait_for("sshd in %s to answer on %s:22" % (self.net.name, self.net.dev_ip), self._banner, 10)

    def _banner(self) -> bool:
        if self.sshd is not None and self.sshd.poll() is not None:
            raise AssertionError("sshd in %s exited: %s" % (self.net.name, self.sshd_log()[-2000:]))
        try:
            with socket.create_connection((self.net.dev_ip, 22), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def kill_sshd(self) -> List[int]:
        """SIGKILL every sshd process in the namespace: the listener and each connection's session."""
        killed = [p for p in self.net.pids() if _comm(p) == "sshd"]
        for pid in killed:
            _kill(pid)
        if self.sshd is not None:
            self.sshd.wait(timeout=5)
        return killed

    def sshd_log(self) -> str:
        p = self.root / "sshd.log"
        return p.read_text(errors="replace") if p.is_file() else ""

    # ------------------------------------------------------------------ the device's python
    def set_python(self, *, limit_as: Optional[int] = None, flip_artifact_once: Optional[Path] = None,
                   cut_release_once: Optional[Path] = None) -> None:
        """(Re)write the device's python wrapper: the audit hook always; an address-space limit for the agent
        (``-m agent run`` or ``serve``); the audit hook's one-shot faults (tests/faults/audit), each armed with a
        flag file: a byte of the artifact flipped as the agent opens it, a lease release that cuts sshd's session."""
        run = shlex.quote(sys.executable)
        if limit_as is not None:
            run = "%s --as=%d -- %s" % (shutil.which("prlimit") or "/usr/bin/prlimit", limit_as, run)
        arm = "".join("export %s=%s\n" % (var, shlex.quote(str(flag))) for var, flag in
                      (("EDGEPRUNE_FAULT_FLIP_ONCE", flip_artifact_once),
                       ("EDGEPRUNE_FAULT_CUT_RELEASE", cut_release_once)) if flag is not None)
        text = ("#!/bin/sh\n# device %s's python (tests/faults): this interpreter with the audit hook\n"
                "export EDGEPRUNE_FAULT_AUDIT=%s\n%s"
                "export PYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH}\n"
                'case "$1 $2 $3" in "-m agent run"|"-m agent serve") exec %s "$@";; esac\n'
                'exec %s "$@"\n' % (self.id, shlex.quote(str(self.audit)), arm, shlex.quote(str(AUDIT_DIR)),
                                    run, shlex.quote(sys.executable)))
        tmp = self.python.with_name(self.python.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, self.python)

    def audited(self) -> List[Dict[str, Any]]:
        """Every model the device's onnxruntime loaded: ``{"pid", "path", "sha256"}``."""
        if not self.audit.is_file():
            return []
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ processes on the device
    def processes(self) -> Dict[int, str]:
        """Every process in the namespace but the sshd listener: pid -> command line."""
        listener = self.sshd.pid if self.sshd is not None and self.sshd.poll() is None else None
        return {p: cmdline(p) or "<%s>" % _comm(p) for p in self.net.pids() if p != listener}

    def agent_pids(self) -> List[int]:
        """The agents running a job: every ``agent run``, and each ``agent serve`` (a session) whose process group
        holds a job folder (its ``.pgid``); an idle session measures nothing."""
        procs = self.processes()
        running = [p for p, c in procs.items() if " -m agent run " in c + " "]
        serving = [p for p, c in procs.items() if " -m agent serve " in c + " "]
        if serving:
            groups = set()
            for name in self.job_dirs():
                try:
                    groups.add(int((self.cache / "jobs" / name / ".pgid").read_text()))
                except (OSError, ValueError):
                    pass
            for p in serving:
                try:
                    if os.getpgid(p) in groups:
                        running.append(p)
                except OSError:
                    pass
        return running

    def helper_pids(self) -> List[int]:
        return [p for p, c in self.processes().items() if "EDGEPRUNE_HELPER" in c]

    # ------------------------------------------------------------------ the device's cache
    def lease(self) -> Optional[Dict[str, Any]]:
        p = self.cache / "lease.json"
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None

    def lease_held(self) -> bool:
        lease = self.lease()
        return lease is not None and float(lease.get("expires_at", 0)) > time.time()

    def job_dirs(self) -> List[str]:
        jobs = self.cache / "jobs"
        return sorted(p.name for p in jobs.iterdir()) if jobs.is_dir() else []

    def partial_uploads(self) -> List[str]:
        return sorted(p.name for p in self.cache.glob("*.tmp.*")) if self.cache.is_dir() else []

    def cached(self, sha256: str) -> Path:
        return self.cache / sha256

    def uploading(self, sha256: str, at_least: int = 1) -> List[Path]:
        """The temp files an upload of ``sha256`` is writing now (once they hold ``at_least`` bytes)."""
        found = []
        for p in self.cache.glob(sha256 + ".tmp.*"):
            try:
                if p.stat().st_size >= at_least:
                    found.append(p)
            except OSError:
                pass
        return found

    def fill_disk(self, name: str = "ballast") -> Path:
        """Fill the device's cache file system (its tmpfs) to the last byte with one file."""
        p = self.cache / name
        with open(p, "wb", buffering=0) as f:
            for chunk in (1 << 16, 1 << 12, 1):
                try:
                    while f.write(b"\0" * chunk):
                        pass
                except OSError:
                    pass
        return p

    # ------------------------------------------------------------------ config
    def config(self, **ssh: Any) -> DeviceConfig:
        settings: Dict[str, Any] = dict(host=self.net.dev_ip, port=22, user=self.lab.user, key=str(self.lab.client_key),
                                        known_hosts=str(self.lab.known_hosts), connect_timeout_s=3.0,
                                        command_timeout_s=8.0, keepalive_s=2.0, cache_dir=str(self.cache))
        if self.proxy is not None:
            settings.update(host="127.0.0.1", port=self.proxy.port)
        settings.update(ssh)
        return DeviceConfig(id=self.id, transport="ssh", ssh=SSHConfig(**settings), python=str(self.python),
                            timing=TimingConfig(**FAST_TIMING), description="namespaced sshd (tests/faults)",
                            agent_session=self.lab.sessions)

    def add_delay(self, delay_s: float) -> DelayProxy:
        """Put a :class:`DelayProxy` in front of this device's sshd; its config then points at the proxy."""
        self.proxy = DelayProxy((self.net.dev_ip, 22), delay_s)
        self.lab.trust("[127.0.0.1]:%d" % self.proxy.port, self.host_key_line)
        return self.proxy


class AgentWatch:
    """Samples the agents running on each device every few milliseconds while a test injects its fault:
    ``max_at_once[dev]`` (the lease's promise is 1: never two measurements at once on a device) and
    ``last_seen[pid]`` (when each agent was last seen running, monotonic seconds)."""

    def __init__(self, devices: Iterable["Device"], every_s: float = 0.02) -> None:
        self.devices = list(devices)
        self.every_s = every_s
        self.max_at_once: Dict[str, int] = {d.id: 0 for d in self.devices}
        self.first_seen: Dict[int, float] = {}
        self.last_seen: Dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agent-watch", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            now = time.monotonic()
            for d in self.devices:
                pids = d.agent_pids()
                self.max_at_once[d.id] = max(self.max_at_once[d.id], len(pids))
                for p in pids:
                    self.first_seen.setdefault(p, now)
                    self.last_seen[p] = now

    def __enter__(self) -> "AgentWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _comm(pid: int) -> str:
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return ""


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class Lab:
    def __init__(self, root: Path, artifact: Artifact) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifact = artifact
        self.user = getpass.getuser()
        self.client_key = self.root / "client_ed25519"
        self.authorized_keys = self.root / "authorized_keys"
        self.authorized_keys.write_text(sshd.keygen(self.client_key, comment="edgeprune-faults-client") + "\n")
        self.known_hosts = self.root / "known_hosts"
        self.known_hosts.write_text("")
        self.db = self.root / "results.db"
        self.devices: List[Device] = []
        self.transports: Dict[str, List[SSHTransport]] = {}
        # agent sessions (the default), or one `python -m agent run` command per job: a test may set it
        self.sessions = os.environ.get("EDGEPRUNE_FAULT_SESSION", "1") == "1"
        self.mounts: List[Path] = []
        self.jumps: List[sshd.Sshd] = []
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    # ------------------------------------------------------------------ devices
    def device(self, *, tmpfs: Optional[str] = None, client_alive: bool = True) -> Device:
        """A new device; ``tmpfs``: its cache on a tmpfs of that size; ``client_alive``: False for sshd's
        default (no probes: a session whose client vanished stays until TCP gives up)."""
        i = len(self.devices)
        root = self.root / ("dev%d" % i)
        root.mkdir()
        net = netns.VethNamespace.create(i)
        host_key = root / "ssh_host_ed25519_key"
        dev = Device(self, "dev%d" % i, net, root, root / "cache", host_key, "", root / "python", root / "audit.jsonl",
                     tmpfs=tmpfs, client_alive=client_alive)
        self.devices.append(dev)
        dev.host_key_line = sshd.keygen(host_key, comment="edgeprune-faults-host")
        dev.cache.mkdir(mode=0o700)
        if tmpfs:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % tmpfs, "edgeprune-faults",
                            str(dev.cache)], check=True, capture_output=True)
            self.mounts.append(dev.cache)
        dev.set_python()
        self.trust(net.dev_ip, dev.host_key_line)
        dev.start_sshd()
        return dev

    def jump_host(self) -> str:
        """A ProxyJump host: an sshd in this machine's own namespace, on loopback (so its link to the host never
        fails), that reaches the devices over their veths. Returns its ``user@127.0.0.1:port``."""
        j = sshd.start_sshd(self.root / ("jump%d" % len(self.jumps)), self.authorized_keys)
        self.jumps.append(j)
        self.trust(sshd.known_hosts_name(j.port), j.host_key_line)
        return "%s@127.0.0.1:%d" % (self.user, j.port)

    def trust(self, name: str, key_line: str) -> None:
        with open(self.known_hosts, "a") as f:
            f.write("%s %s\n" % (name, " ".join(key_line.split()[:2])))

    # ------------------------------------------------------------------ running jobs
    def transport(self, dev: DeviceConfig, grace_s: float = 2.0) -> SSHTransport:
        # The catalogue runs over agent sessions (the default path) unless lab.sessions is False: the faults whose
        # device side differs between the paths (a running job hit, OOM, a corrupted cache, a cut release) and
        # the slow links run over both (test_faults.BOTH_PATHS). EDGEPRUNE_FAULT_SESSION=0 runs everything per job.
        t = SSHTransport(dev, grace_s=grace_s, session=self.sessions)
        self.transports.setdefault(dev.id, []).append(t)
        return t

    def job(self, dev: DeviceConfig, job_id: str, *, timeout_s: float = 60.0, **timing: Any) -> schema.JobSpec:
        a = self.artifact
        job = build_job(dev, job_id, a.path, a.manifest, a.shard, a.shard_sha256, quick=True)
        job.timeout_s = timeout_s
        for k, v in timing.items():
            setattr(job.timing, k, v)
        return job.validate()

    def run(self, devices: Iterable[Device], run_id: str, *, timeout_s: float = 60.0, grace_s: float = 2.0,
            retries: int = 2, backoff_s: float = 0.5, lease_ttl_s: float = 15.0, lease_wait_s: float = 30.0,
            ssh: Optional[Dict[str, Any]] = None, timing: Optional[Dict[str, Any]] = None,
            events: Optional[Callable[[str, str, str], None]] = None) -> List[DeviceOutcome]:
        """One job per device in parallel under ``run_id``, each outcome recorded in the store as it arrives
        (what ``edgeprune bench`` does: host.commands.benchmark.run_bench's ``record``)."""
        configs = [d.config(**(ssh or {})) for d in devices]
        man = self.artifact.manifest
        with RunRecorder(Store(str(self.db)), run_id, "bench", command=["tests/faults", run_id],
                         provenance={"test": "faults"}) as rec:
            for c in configs:
                rec.device(c)

            def record(dev: DeviceConfig, job: Optional[schema.JobSpec], o: DeviceOutcome) -> None:
                report = o.report or schema.Report(job_id=job.job_id if job else "%s-%s" % (run_id, dev.id),
                                                   status="error", error=schema.ErrorInfo(
                                                       o.error_type or "DeviceError", o.error or "no report"))
                rec.measurement(dev.id, device_id=dev.id, report=schema.to_dict(report),
                                job=schema.to_dict(job) if job is not None else None, label="onnx",
                                model=man.model, manifest=asdict(man),
                                extra={"attempts": o.attempts, "seconds": round(o.seconds, 3)})

            return run_on_devices(configs, lambda d: self.job(d, "%s-%s" % (run_id, d.id), timeout_s=timeout_s,
                                                              **(timing or {})),
                                  self.root / "work" / run_id, on_outcome=record, retries=retries,
                                  backoff_s=backoff_s, lease_ttl_s=lease_ttl_s, lease_wait_s=lease_wait_s,
                                  events=events, transport_factory=lambda d: self.transport(d, grace_s))

    def dead_controller(self, dev: Device, ttl_s: float) -> int:
        """Another controller takes ``dev``'s lease over SSH, then dies (SIGKILL): its lease names a dead pid and
        is renewed no more. Returns that controller's pid."""
        script = ("import os, sys\n"
                  "from host.fleet.devices import DeviceConfig\n"
                  "from host.fleet.runner import Lease, transport_for\n"
                  "dev = DeviceConfig.model_validate_json(sys.argv[1])\n"
                  "Lease(transport_for(dev), dev.id, ttl_s=float(sys.argv[2]), label='a controller that died')"
                  ".__enter__()\n"
                  "os.kill(os.getpid(), 9)\n")
        proc = subprocess.run([sys.executable, "-c", script, dev.config().model_dump_json(by_alias=True),
                               str(ttl_s)], cwd=str(Path(__file__).resolve().parents[2]), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        lease = dev.lease()
        assert lease is not None and lease["holder"]["label"] == "a controller that died", lease
        return int(lease["holder"]["pid"])

    def fleet_file(self, devices: Iterable[Device], path: Path) -> Path:
        import yaml

        devs = [d.config().model_dump(mode="json", by_alias=True, exclude={"source"}, exclude_none=True)
                for d in devices]
        path.write_text(yaml.safe_dump({"devices": devs}))
        return path

    def measurements(self, run_id: str) -> List[Dict[str, Any]]:
        with Store(str(self.db)) as store:
            return store.measurements(run_id)

    # ------------------------------------------------------------------ invariants
    def quiesce(self, devices: Iterable[Device], timeout_s: float = 20.0) -> None:
        """Wait until nothing but sshd's listener runs on each device; AssertionError naming what is left."""
        devices = list(devices)
        deadline = time.monotonic() + timeout_s
        while True:
            left = {d.id: d.processes() for d in devices}
            left = {k: v for k, v in left.items() if v}
            if not left:
                return
            if time.monotonic() > deadline:
                raise AssertionError("processes left behind on the devices after %.0f s: %s"
                                     % (timeout_s, {k: {p: c[:160] for p, c in v.items()} for k, v in left.items()}))
            time.sleep(0.1)

    def check(self, run_id: str, outcomes: List[DeviceOutcome], devices: List[Device], *, eval_n: int = 50,
              lease_may_remain: bool = False, partial_may_remain: bool = False) -> List[Dict[str, Any]]:
        """The invariants every fault test asserts; returns the run's stored rows.

        * no completed result lost: every device that returned a report has it in the store, and every ok
          report is stored as ok with its numbers;
        * no partial result recorded as complete: every stored ``ok`` row is a full measurement (latency,
          iterations past the minimum, accuracy on all 50 images, power) of the right artifact, and a device
          that returned no report is stored as ``error`` with nothing measured;
        * exactly one row per device (keys unique: a retried job is recorded once);
        * no artifact executed without a verified hash: every model onnxruntime loaded on a device hashes to
          the artifact's sha256;
        * no process or lease left behind: nothing but sshd's listener runs on the devices, no job folder, no
          partial upload, no lease held (unless ``lease_may_remain``/``partial_may_remain``: a device that was
          unreachable when the controller gave up keeps them until its lease expires / the next run sweeps it).
        """
        sha = self.artifact.manifest.sha256
        rows = self.measurements(run_id)
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)), "a result recorded twice: %s" % keys
        assert sorted(keys) == sorted(d.id for d in devices), (keys, [d.id for d in devices])
        by_key = {r["key"]: r for r in rows}
        for o in outcomes:
            row = by_key[o.device_id]
            if o.ok:
                assert row["status"] == "ok", (o.device_id, row["status"], row["error"])
            else:
                assert row["status"] == "error", (o.device_id, row["status"])
            if o.report is not None:                    # what the device said is what was stored
                assert row["report"]["job_id"] == o.report.job_id and row["report"]["status"] == o.report.status
        for r in rows:
            if r["status"] == "ok":
                rep = r["report"]
                assert rep["identity"]["artifact_sha256"] == sha == r["artifact_sha256"]
                assert r["latency_p50_ms"] and r["latency_p50_ms"] > 0 and r["iterations"] >= FAST_TIMING["min_iters"]
                assert r["eval_n"] == eval_n and r["top1"] is not None and r["top1"] >= 0.8
                assert rep["timing"]["latency_ms"]["median"] == r["latency_p50_ms"] and r["samples_ms"]
            else:
                assert r["error"], r
                assert r["latency_p50_ms"] is None and r["top1"] is None and r["iterations"] is None, r
        for d in devices:
            loaded = d.audited()
            assert all(x["sha256"] == sha for x in loaded), "%s ran an unverified artifact: %s" % (d.id, loaded)
            assert len(loaded) >= sum(1 for o in outcomes if o.device_id == d.id and o.ok)
        self.quiesce(devices)
        for d in devices:
            assert d.job_dirs() == [], "%s: job folders left on the device: %s" % (d.id, d.job_dirs())
            if not partial_may_remain:
                assert d.partial_uploads() == [], "%s: partial uploads left: %s" % (d.id, d.partial_uploads())
            if not lease_may_remain:
                assert not d.lease_held(), "%s: lease still held: %s" % (d.id, d.lease())
        return rows

    # ------------------------------------------------------------------ teardown
    def close(self) -> List[str]:
        """Tear everything down, even after a failure; return what had to be forced or could not be removed."""
        problems: List[str] = []
        for ts in self.transports.values():
            for t in ts:
                t.close()
        for d in self.devices:
            if d.proxy is not None:
                d.proxy.close()
                if d.proxy.alive_threads():
                    problems.append("%s: proxy threads still alive" % d.id)
            d.net.destroy()
            if d.sshd is not None:
                try:
                    d.sshd.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    d.sshd.kill()
                    problems.append("%s: sshd survived its namespace" % d.id)
        for j in self.jumps:
            j.stop()
        for m in self.mounts:
            r = subprocess.run(["umount", str(m)], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(m)], capture_output=True)
                problems.append("umount %s: %s" % (m, r.stderr.strip()))
        return problems

    def leftovers(self) -> List[str]:
        """Anything of this lab still on the machine: namespaces, veths, mounts, processes naming its folder."""
        found = ["netns %s" % n for n in netns.namespaces() if netns.ours(n)]
        found += ["link %s" % n for n in netns.links() if netns.ours(n)]
        with open("/proc/self/mounts") as f:
            found += ["mount %s" % line.split()[1] for line in f if line.split()[1].startswith(str(self.root))]
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.info["pid"] != me and str(self.root) in " ".join(p.info["cmdline"] or []):
                found.append("process %d: %s" % (p.info["pid"], " ".join(p.info["cmdline"])[:160]))
        return found
