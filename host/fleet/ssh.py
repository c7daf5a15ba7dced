"""SSH transport: run jobs on a device's agent over one reused paramiko connection.

``SSHTransport(device).run_job(job, workdir)`` has :class:`host.fleet.transport.LocalTransport`'s semantics — a JSON
job in, a validated report out, a report with ``status: "error"`` returned rather than raised, local copies of
``job.json`` / ``report.json`` kept in ``workdir`` — with the artifact, the eval shards and the agent itself
shipped to the device through a content-addressed cache.

Connection
    Lazy, like fabric's ``Connection``: nothing happens until the first command; ``close()`` closes SFTP, the
    client and a ProxyJump client together (also a context manager). One connection per device is reused for
    every command (an ``exec`` on a fresh connection costs a full handshake). TCP_NODELAY is set: without it
    every command waits on delayed ACKs. Timeouts: TCP connect, banner and auth use ``ssh.connect_timeout_s``;
    keepalives every ``ssh.keepalive_s``; every command has a deadline, opening its channel included (a channel
    that does not open in time fails that command only: on a slow link the request may wait behind an upload that
    shares the connection, which must not be cut for it).
    A dead link is detected: paramiko's keepalives expect no answer and its writer retries a full socket
    forever, so a link that went down under an upload hung the controller until the kernel gave up (15 min and
    more). Where the OS has it (Linux), ``TCP_USER_TIMEOUT`` (:func:`dead_after_s`: three keepalive intervals,
    like OpenSSH's ServerAliveCountMax, else ``command_timeout_s``) makes the kernel drop a connection whose data
    stays unacknowledged that long; the keepalives make sure there is data in flight while a command waits.
    Through a ProxyJump host that guards only the first hop, so :class:`_JumpWatch` asks the device itself for
    an answer every keepalive interval and drops the connection when nothing has come from it for as long.

Host keys
    ``ssh.known_hosts`` is loaded; an unknown key is refused (``reject``) or recorded once then pinned
    (``accept-new``, OpenSSH's meaning). A key that differs from the recorded one is always refused
    (:class:`HostKeyError`, naming the known_hosts line to fix). fabric's auto-add is deliberately not copied.

Remote commands
    Built only from argv lists, every element passed through ``shlex.quote``; the surrounding shell text is fixed
    in this module. Each command first prints its process id (the process-group leader: sshd starts every
    command in a new session) so that a command past its deadline is killed with its whole process group.
    The login shell on the device must be POSIX (sh, bash, dash, ash, zsh).

Device cache (``ssh.cache_dir``, default ``~/.cache/edgeprune``, ``~`` meaning the device user's home)
    ``<cache>/<sha256>``                  artifacts, eval shards and agent bundles, named by their sha256
    ``<cache>/agent-<sha256>/agent/``     an agent bundle unpacked (to a temp dir, then renamed: atomic)
    ``<cache>/jobs/<job_id>.<random>/``   one job's folder (``job.json``, ``agent.log``, ``report.json``, and
                                          ``artifact/``: the artifact's files linked under their own names,
                                          ``.pgid`` and ``.lock``: see below), created fresh for each job and
                                          removed when it ends
    Uploads go to ``<cache>/<sha256>.tmp.<random>`` over SFTP and are renamed into place only after the device's
    own python has verified their sha256. An entry counts as cached only if it exists *and* its sha256 verifies
    on the device; a tampered entry is deleted and uploaded again. Files that do not fit in the cache's free space
    (the helper reports it) are refused before any byte is sent, and an upload that ran out of space says so:
    "no space left on the device", what is free and what was needed (retrying cannot help). A temp file left by
    a lost connection is removed by the transport's next helper call, or by any helper once it is
    :data:`STALE_UPLOAD_S` old; it is never taken for a cached entry.

Artifacts of several files (OpenVINO IR's ``.xml`` + ``.bin``, a TensorRT ONNX and its int8 calibration npz:
``artifact.files`` in the job) travel file by file through the cache, each under its sha256; in the job folder
``artifact/<name>`` links (symbolic, else hard, else a copy) give each its own name again, so that a runtime finds
``r20.bin`` beside ``r20.xml``, and the job the device runs has ``artifact.path: artifact/<primary name>``. Names
are plain file names (:func:`agent.schema.file_name_problem`), checked on the host and again by the helper.

Per job (cache warm) this is one remote command: a small helper (:data:`DEVICE_HELPER`, run by the device's
python with ``-c``) verifies the cached inputs, creates the job folder and its artifact links, runs
``python -m agent run job.json --out report.json`` in it (``PYTHONPATH`` = the unpacked bundle), prints a marker
line, a one-line JSON header and the report's bytes, then removes the folder. The agent is killed at
``timeout_s + grace_s`` by the helper itself, and at once when sshd, the host's end of the helper's stdout, is
gone (POLLERR on it), so a host that vanished leaves nothing running; the host's own deadline, a little later,
kills the whole process group. A job the host lost track of while sshd lives on (its connection died on a link
that was down, or its deadline passed with no connection to kill it over) is stopped by the transport's next
helper call, before anything else runs: the job folder records the helper's process group (``.pgid``) and the
helper holds a lock (``.lock``) for as long as it lives, so the next helper knows whether that group is still
the job's before it kills it. A retry never measures beside its abandoned first attempt (the lease's promise).
A cold cache adds one SFTP upload per missing file and one more command.

Errors: :class:`SSHError` (a :class:`~edgeprune.errors.DeviceError`) with ``infrastructure=True`` when the
connection, the transport or a timeout failed (a runner may retry those, on this device or another) and
``infrastructure=False`` when retrying cannot help (host key, authentication, bad job, invalid report).
Configuration mistakes found before connecting (a missing key file) are :class:`~edgeprune.errors.ConfigError`.
"""
from __future__ import annotations

import base64
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import socket
import threading
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

from agent import schema
from edgeprune.errors import ConfigError, DeviceError, HostKeyError, SSHError
from host.fleet.devices import DeviceConfig, SSHConfig, local_path
from host.files import write_text_atomic
from host.fleet.transport import ARTIFACT_DIR, MAX_REPORT_BYTES, artifact_files

log = logging.getLogger(__name__)

AGENT_PACKAGE = Path(__import__("agent").__file__).resolve().parent
MAX_OUTPUT_BYTES = 16 << 20          # stdout and stderr of one command, each
LOG_TAIL_CHARS = 4000
STALE_UPLOAD_S = 3600.0              # a temp upload untouched this long on the device is a dead one: removed
SFTP_REQUEST_BYTES = 128 << 10       # per SFTP write, within the server's limits@openssh.com (bench/transport.py)
UPLOAD_READ_BYTES = 1 << 20
_PID_MARK = b"EDGEPRUNE_PID "
_HELPER_MARK = b"EDGEPRUNE_HELPER\n"
_PID_PREFIX = "printf 'EDGEPRUNE_PID %s\\n' \"$$\" >&2; "   # fixed text: $$ is the shell, sshd's session leader
_KNOWN_HOSTS_LOCK = threading.Lock()


@dataclass
class Counters:
    """What one transport has done, for tests and benchmarks (cumulative over reconnects)."""

    connects: int = 0
    commands_run: int = 0
    files_uploaded: int = 0
    bytes_uploaded: int = 0
    cache_hits: int = 0          # cached entries found and verified on the device (agent bundle included)
    cache_replaced: int = 0      # cached entries whose sha256 did not verify: deleted, then uploaded again
    orphans_stopped: int = 0     # jobs left running on the device by a lost connection, stopped by the next command
    dead_links: int = 0          # connections through a ProxyJump host dropped because the device stopped answering

    def as_dict(self) -> Dict[str, int]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ agent bundle
def agent_bundle(package: Path = AGENT_PACKAGE) -> Tuple[bytes, str]:
    """A deterministic zip of the agent package's ``.py`` files and its sha256.

    Entries sorted by name, stored (no compression: identical bytes whatever the zlib), fixed timestamps and
    permissions, so the same sources always give the same sha256 and the device cache is hit across hosts.
    """
    package = Path(package)
    files = sorted((p.relative_to(package.parent).as_posix(), p) for p in package.rglob("*.py")
                   if "__pycache__" not in p.parts)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------- device helper
# Run on the device as ``<python> -c DEVICE_HELPER SPEC_JSON`` (job.json on stdin when SPEC has "run").
# Python 3.8+, standard library only. It prints one JSON header line, then the report's bytes (if any).
DEVICE_HELPER = r'''
import fcntl, hashlib, json, os, re, select, shutil, signal, subprocess, sys, tempfile, time, zipfile
UPLOAD_RE = re.compile(r"^[0-9a-f]{64}\.tmp\.[0-9a-f]{16}$")   # what _upload names a file while it travels
def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()
def cached(cache, sha, out):
    p = os.path.join(cache, sha)
    if not os.path.isfile(p):
        return False
    if sha256(p) == sha:
        return True
    os.unlink(p)
    out["replaced"].append(sha)
    return False
def unpack(cache, sha, dest):
    tmp = tempfile.mkdtemp(prefix=".agent-", dir=cache)
    try:
        with zipfile.ZipFile(os.path.join(cache, sha)) as z:
            for n in z.namelist():
                if n.startswith("/") or ".." in n.split("/") or not n.startswith("agent/"):
                    raise ValueError("unexpected name in agent bundle: %r" % n)
            z.extractall(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not os.path.isdir(dest):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
def link_all(cache, links, pairs):
    os.mkdir(links, 0o700)
    for name, sha in pairs:
        if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name or "\\" in name
                or "\0" in name or len(name) > 255 or len(sha) != 64 or not all(c in "0123456789abcdef" for c in sha)):
            return "refused to link %r to %r: not a plain file name and a sha256" % (name, sha)
        src, dst = os.path.join(cache, sha), os.path.join(links, name)
        try:
            os.symlink(src, dst)
        except (OSError, NotImplementedError):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return None
def claim(jobdir):
    # this helper's process group, then a lock held for its lifetime: evict() sees whether it still runs
    with open(os.path.join(jobdir, ".pgid"), "w") as f:
        f.write(str(os.getpgid(0)))
    fd = os.open(os.path.join(jobdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
def evict(jobs, name, out):
    # a job of this host's that it lost track of (connection lost, deadline passed): stop it if it still runs
    d = os.path.join(jobs, name)
    if "/" in name or name.startswith(".") or not os.path.isdir(d):
        return
    try:
        fd = os.open(os.path.join(d, ".lock"), os.O_RDWR)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                 # held: its helper still runs
            try:
                with open(os.path.join(d, ".pgid")) as f:
                    os.killpg(int(f.read()), signal.SIGKILL)
                out["evicted"].append(name)
            except (OSError, ValueError):
                pass
            for _ in range(200):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    time.sleep(0.05)
        finally:
            os.close(fd)
    shutil.rmtree(d, ignore_errors=True)
def run_agent(run, jobdir, bundle_dir, out):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (bundle_dir, env.get("PYTHONPATH")) if p])
    logpath = os.path.join(jobdir, "agent.log")
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)   # a Python handler: the agent's exit writes to wake_w
    signal.set_wakeup_fd(wake_w)
    watch = select.poll()
    watch.register(wake_r, select.POLLIN)
    watch.register(1, 0)        # stdout: POLLERR/POLLHUP once sshd, the host's end of it, is gone
    deadline = time.monotonic() + run["timeout_s"]
    with open(logpath, "wb") as logf:
        proc = subprocess.Popen([run["python"], "-m", "agent"] + run["argv"], cwd=jobdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                out["timed_out"] = True
                break
            ready = dict(watch.poll(min(left, 60.0) * 1000))
            try:
                os.read(wake_r, 4096)
            except OSError:
                pass
            if ready.get(1, 0) & (select.POLLERR | select.POLLHUP):
                out["host_gone"] = True
                break
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        else:
            out["rc"] = proc.returncode
    out["log_tail"] = tail(logpath, run["log_tail"])
    rp = os.path.join(jobdir, "report.json")
    if not os.path.isfile(rp):
        return b""
    size = os.path.getsize(rp)
    if size > run["max_report"]:
        out["report_error"] = "report.json is %d bytes, over the %d-byte limit" % (size, run["max_report"])
        return b""
    with open(rp, "rb") as f:
        report = f.read()
    out["report_size"] = len(report)
    return report
def tail(path, n):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode("utf-8", "replace")
def main():
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    spec = json.loads(sys.argv[1])
    cache = spec["cache"]
    out = {"hits": [], "missing": [], "replaced": [], "committed": [], "bad_upload": [], "rc": None,
           "timed_out": False, "report_size": None, "report_error": None, "log_tail": "", "link_error": None,
           "bad_upload_sizes": {}, "evicted": [], "discarded": [], "host_gone": False, "free": None}
    jobs = os.path.join(cache, "jobs")
    for name in spec.get("evict", []):
        evict(jobs, name, out)
    now = time.time()
    for name in os.listdir(cache):
        if UPLOAD_RE.match(name):       # an upload whose connection was lost: the host's, or stale
            p = os.path.join(cache, name)
            try:
                if name in spec.get("discard", []) or now - os.stat(p).st_mtime > spec.get("stale_upload_s", 3600):
                    os.unlink(p)
                    out["discarded"].append(name)
            except OSError:
                pass
    for sha, tmp in spec.get("commit", []):
        t = os.path.join(cache, tmp)
        if sha256(t) == sha:
            os.replace(t, os.path.join(cache, sha))
            out["committed"].append(sha)
        else:
            out["bad_upload_sizes"][sha] = os.path.getsize(t)
            os.unlink(t)
            out["bad_upload"].append(sha)
    for sha in spec.get("want", []):
        if sha in out["committed"]:
            continue
        out["hits" if cached(cache, sha, out) else "missing"].append(sha)
    b = spec.get("bundle")
    if b:
        d = os.path.join(cache, "agent-" + b)
        if os.path.isdir(d):
            out["hits"].append(b)
        elif b in out["committed"] or cached(cache, b, out):
            unpack(cache, b, d)
        else:
            out["missing"].append(b)
    st = os.statvfs(cache)
    out["free"] = st.f_bavail * st.f_frsize
    run = spec.get("run")
    report = b""
    if run and not out["missing"] and not out["bad_upload"]:
        if not os.path.isdir(jobs):
            os.makedirs(jobs, 0o700)
        jobdir = os.path.join(jobs, run["jobdir"])
        os.mkdir(jobdir, 0o700)
        try:
            claim(jobdir)
            with open(os.path.join(jobdir, "job.json"), "wb") as f:
                f.write(sys.stdin.buffer.read())
            out["link_error"] = link_all(cache, os.path.join(jobdir, "artifact"), run.get("links", []))
            if out["link_error"] is None:
                report = run_agent(run, jobdir, d, out)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)
    if out["host_gone"]:
        os.killpg(0, signal.SIGKILL)  # nobody to report to: the agent is stopped, and so is everything it started
    sys.stdout.buffer.write(b"EDGEPRUNE_HELPER\n" + json.dumps(out).encode() + b"\n" + report)
    sys.stdout.buffer.flush()
    if out["timed_out"]:
        os.killpg(0, signal.SIGKILL)  # whatever the killed agent started in this process group goes too
main()
'''


# ------------------------------------------------------------------------------------------- host keys
def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a public key."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def known_hosts_name(host: str, port: int) -> str:
    """The name OpenSSH and paramiko use in known_hosts: ``host`` on port 22, else ``[host]:port``."""
    return host if port == 22 else "[%s]:%d" % (host, port)


def known_hosts_lines(path: Path, name: str) -> List[int]:
    """1-based numbers of the lines in ``path`` that name host ``name`` (plain or hashed entries)."""
    found = []
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []
    for i, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        hosts = fields[1] if fields[0].startswith("@") and len(fields) > 1 else fields[0]
        for h in hosts.split(","):
            if h.startswith("|1|"):
                try:
                    salt = h.split("|")[2]
                    if paramiko.HostKeys.hash_host(name, salt) == h:
                        found.append(i)
                except (IndexError, ValueError, TypeError):
                    continue
            elif h == name:
                found.append(i)
    return found


class _UnknownHostKey(paramiko.SSHException):
    pass


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    """``reject``: refuse a key that known_hosts does not list, saying how to add it."""

    def __init__(self, known_hosts: Path, where: str) -> None:
        self.known_hosts = known_hosts
        self.where = where

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        host, port = _split_known_name(hostname)
        keytype = key.get_name().replace("ssh-", "")
        raise _UnknownHostKey(
            "unknown host key for %s (%s %s): it is not in %s and %s is 'reject'. Check the fingerprint on the "
            "device (ssh-keygen -lf /etc/ssh/ssh_host_%s_key.pub), then add it: ssh-keyscan -p %d -t %s %s >> %s "
            "(or set ssh.host_key_policy: accept-new to record it on first connect)"
            % (hostname, key.get_name(), fingerprint(key), self.known_hosts, self.where, keytype, port, keytype,
               shlex.quote(host), shlex.quote(str(self.known_hosts))))


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """``accept-new``: append a first-seen key to known_hosts (then it is pinned like any other)."""

    def __init__(self, known_hosts: Path, hash_hosts: bool) -> None:
        self.known_hosts = known_hosts
        self.hash_hosts = hash_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        path = self.known_hosts
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _KNOWN_HOSTS_LOCK, open(path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)          # another process may be recording the same host right now
            current = paramiko.HostKeys()
            current.load(str(path))
            recorded = current.lookup(hostname)
            if recorded is not None:
                same = recorded.get(key.get_name())
                if same == key:
                    client.get_host_keys().add(hostname, key.get_name(), key)
                    return
                raise paramiko.BadHostKeyException(hostname, key, same or next(iter(recorded.values())))
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(f.tell() - 1)
                last = f.read(1)
                f.seek(0, os.SEEK_END)
                if last != "\n":
                    f.write("\n")
            name = paramiko.HostKeys.hash_host(hostname) if self.hash_hosts else hostname
            f.write("%s %s %s\n" % (name, key.get_name(), key.get_base64()))
            f.flush()
            os.fsync(f.fileno())
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.info("recorded new host key for %s (%s %s) in %s", hostname, key.get_name(), fingerprint(key), path)


def _split_known_name(name: str) -> Tuple[str, int]:
    m = re.match(r"^\[(.+)\]:(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, 22)


_JUMP_RE = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?P<host>\[[^\]\s]+\]|[^:@\s\[\]]+)(?::(?P<port>\d{1,5}))?$")


def parse_jump(spec: str, default_user: str) -> Tuple[str, str, int]:
    """``user@host[:port]`` (OpenSSH's ProxyJump, one hop) -> (user, host, port)."""
    m = _JUMP_RE.match(spec.strip())
    if not m or not (1 <= int(m.group("port") or 22) <= 65535):
        raise ValueError("expected user@host[:port], got %r" % spec)
    return m.group("user") or default_user, m.group("host").strip("[]"), int(m.group("port") or 22)


def dead_after_s(ssh: SSHConfig) -> float:
    """Seconds after which a connection whose sent data is still unacknowledged counts as dead (the socket's
    ``TCP_USER_TIMEOUT``): three keepalive intervals (OpenSSH's ServerAliveInterval x ServerAliveCountMax 3),
    or ``command_timeout_s`` without keepalives; never under ``connect_timeout_s``."""
    base = 3 * ssh.keepalive_s if ssh.keepalive_s > 0 else ssh.command_timeout_s
    return max(base, ssh.connect_timeout_s)


def quote_argv(argv: Sequence[Union[str, os.PathLike]]) -> str:
    """One shell command line from an argv list: every element quoted, nothing interpolated."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(os.fspath(a)) for a in argv)



class _JumpChannel:
    """The jump host's ``direct-tcpip`` channel as the device connection's socket, noting when anything last
    came from the device (see :class:`_JumpWatch`); everything else is the channel's."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self._chan = chan
        self.last_inbound = time.monotonic()

    def recv(self, n: int) -> bytes:
        data = self._chan.recv(n)
        if data:
            self.last_inbound = time.monotonic()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)


class _JumpWatch:
    """Dead-link detection for a device reached through a ProxyJump host.

    ``TCP_USER_TIMEOUT`` guards only the link to the jump host, and paramiko's keepalives expect no answer: when
    the link *behind* a live jump host died, the jump host kept accepting our bytes and a command waited until
    its own deadline (a job's timeout: minutes). This asks the device for an answer every keepalive interval (a
    global request with want-reply: OpenSSH answers it, as it does ServerAliveInterval's) and closes the device
    connection once nothing at all -- answer, output, SFTP acknowledgement -- has come from the device for
    :func:`dead_after_s`; in-flight commands then fail as a lost connection and are retried. A slow link is not
    dead: anything arriving (an upload's acknowledgements included) counts."""

    def __init__(self, transport: "SSHTransport", t: paramiko.Transport, sock: _JumpChannel) -> None:
        self.owner, self.t, self.sock = transport, t, sock
        self.interval = transport.ssh.keepalive_s
        self.limit = dead_after_s(transport.ssh)
        for target, name in ((self._ask, "ask"), (self._judge, "judge")):
            threading.Thread(target=target, name="jump-%s-%s" % (name, transport.device.id), daemon=True).start()

    def _ask(self) -> None:
        while self.t.is_active():
            try:
                # blocks until the device answers or the connection closes (paramiko has no timeout here)
                self.t.global_request("keepalive@openssh.com", wait=True)
            except Exception:   # pragma: no cover - a connection closing under the request
                return
            time.sleep(self.interval)

    def _judge(self) -> None:
        while self.t.is_active():
            time.sleep(min(self.interval, 1.0))
            silent = time.monotonic() - self.sock.last_inbound
            if silent > self.limit and self.t.is_active():
                log.warning("%s: nothing from the device through jump host %s for %.0f s: link dead, dropping "
                            "the connection", self.owner.where, self.owner.ssh.proxy_jump, silent)
                self.owner.counters.dead_links += 1
                try:
                    self.t.close()
                except Exception as e:   # closing sends a disconnect over the dead link: paramiko may raise EOFError
                    log.debug("%s: closing the dead connection: %s: %s", self.owner.where, type(e).__name__, e)
                return


# ----------------------------------------------------------------------------------------- transport
class SSHTransport:
    """Jobs, files and commands on one SSH device, over one lazily opened, reused connection."""

    name = "ssh"

    def __init__(self, device: DeviceConfig, *, grace_s: float = 30.0, hash_known_hosts: bool = False,
                 max_output_bytes: int = MAX_OUTPUT_BYTES, max_report_bytes: int = MAX_REPORT_BYTES,
                 sftp_request_bytes: int = SFTP_REQUEST_BYTES) -> None:
        if device.transport != "ssh" or device.ssh is None:
            raise ConfigError("%s: transport: SSHTransport needs transport: ssh and an ssh section"
                              % (device.source or "device " + device.id))
        self.device = device
        self.ssh: SSHConfig = device.ssh
        self.python = device.python or "python3"
        self.grace_s = grace_s
        self.hash_known_hosts = hash_known_hosts
        self.max_output_bytes = max_output_bytes
        self.max_report_bytes = max_report_bytes
        self.sftp_request_bytes = sftp_request_bytes
        self.counters = Counters()
        self.known_hosts = local_path(self.device, self.ssh.known_hosts)
        self.where = "device %s (%s@%s:%d)" % (device.id, self.ssh.user, self.ssh.host, self.ssh.port)
        self._lock = threading.RLock()
        self._client: Optional[paramiko.SSHClient] = None
        self._jump: Optional[paramiko.SSHClient] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._sftp_write = 32768
        self._cache: Optional[str] = None
        self._pkey: Optional[paramiko.PKey] = None
        self._bundle: Optional[Tuple[bytes, str]] = None
        # left on the device when a connection was lost: jobs that may still run there (their folder names) and
        # partial uploads (their temp names); the next helper call stops and removes them
        self._abandoned: List[str] = []
        self._discard: List[str] = []

    # -- lifecycle
    def __enter__(self) -> "SSHTransport":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close SFTP, the client and the jump host's client (if any). The next call reconnects."""
        with self._lock:
            for closable in (self._sftp, self._client, self._jump):
                if closable is not None:
                    try:
                        closable.close()
                    except Exception:  # pragma: no cover - closing a broken connection
                        pass
            self._sftp = self._client = self._jump = None
            self._cache = None

    @property
    def connected(self) -> bool:
        t = self._client.get_transport() if self._client is not None else None
        return t is not None and t.is_active()

    # -- configuration
    def _field(self, name: str) -> str:
        return "%s: ssh.%s" % (self.device.source or "device %s" % self.device.id, name)

    def _private_key(self) -> Optional[paramiko.PKey]:
        if self.ssh.key is None:
            return None
        if self._pkey is None:
            path = local_path(self.device, self.ssh.key)
            if not path.is_file():
                raise ConfigError("%s: private key file %s does not exist" % (self._field("key"), path))
            try:
                self._pkey = paramiko.PKey.from_path(str(path))
            except paramiko.PasswordRequiredException:
                raise ConfigError("%s: %s is encrypted with a passphrase: load it into ssh-agent and set "
                                  "ssh.key: null" % (self._field("key"), path)) from None
            except (paramiko.SSHException, ValueError, OSError) as e:
                raise ConfigError("%s: %s is not a usable private key (%s)" % (self._field("key"), path, e)) from None
        return self._pkey

    # -- connection
    def _transport(self) -> paramiko.Transport:
        with self._lock:
            if self._client is not None and not self.connected:
                log.info("%s: connection lost; reconnecting", self.where)
                self.close()
            if self._client is None:
                self._connect()
            assert self._client is not None
            t = self._client.get_transport()
            assert t is not None
            return t

    def _connect(self) -> None:
        ssh = self.ssh
        pkey = self._private_key()
        sock: Any = None
        try:
            if ssh.proxy_jump:
                try:
                    juser, jhost, jport = parse_jump(ssh.proxy_jump, ssh.user)
                except ValueError as e:
                    raise ConfigError("%s: %s" % (self._field("proxy_jump"), e)) from None
                self._jump = self._open_client(jhost, jport, juser, pkey, None, "jump host")
                jt = self._jump.get_transport()
                assert jt is not None
                try:
                    sock = _JumpChannel(jt.open_channel("direct-tcpip", (ssh.host, ssh.port), ("127.0.0.1", 0),
                                                        timeout=ssh.connect_timeout_s))
                except (paramiko.SSHException, OSError, EOFError) as e:
                    raise SSHError("%s: jump host %s could not open a connection to %s:%d: %s"
                                   % (self.where, ssh.proxy_jump, ssh.host, ssh.port, str(e) or type(e).__name__),
                                   infrastructure=True) from None
            self._client = self._open_client(ssh.host, ssh.port, ssh.user, pkey, sock, "device")
            if isinstance(sock, _JumpChannel) and ssh.keepalive_s > 0:
                t = self._client.get_transport()
                if t is not None:
                    _JumpWatch(self, t, sock)
        except BaseException:
            self.close()
            raise
        self.counters.connects += 1

    def _open_client(self, host: str, port: int, user: str, pkey: Optional[paramiko.PKey], sock: Any,
                     role: str) -> paramiko.SSHClient:
        ssh = self.ssh
        where = "%s: %s %s@%s:%d" % (self.where, role, user, host, port) if role != "device" else self.where
        client = paramiko.SSHClient()
        try:
            client.load_host_keys(str(self.known_hosts))
        except FileNotFoundError:
            pass  # no file yet: every key is unknown (rejected, or recorded under accept-new)
        except (OSError, paramiko.SSHException) as e:
            raise ConfigError("%s: cannot read %s: %s" % (self._field("known_hosts"), self.known_hosts, e)) from None
        if ssh.host_key_policy == "accept-new":
            client.set_missing_host_key_policy(_AcceptNew(self.known_hosts, self.hash_known_hosts))
        else:
            client.set_missing_host_key_policy(_RejectUnknown(self.known_hosts, self._field("host_key_policy")))
        timeout = ssh.connect_timeout_s
        t0 = time.monotonic()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if hasattr(socket, "TCP_USER_TIMEOUT"):     # Linux: see dead_after_s
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after_s(ssh) * 1000))
            client.connect(host, port, username=user, pkey=pkey, allow_agent=pkey is None,
                           look_for_keys=pkey is None, timeout=timeout, banner_timeout=timeout,
                           auth_timeout=timeout, channel_timeout=timeout, sock=sock)
        except BaseException as e:
            client.close()
            if sock is not None:
                sock.close()
            raise self._connect_error(e, where, host, port, time.monotonic() - t0) from None
        t = client.get_transport()
        if t is not None and ssh.keepalive_s > 0:
            t.set_keepalive(max(1, int(round(ssh.keepalive_s))))
        return client

    def _connect_error(self, e: BaseException, where: str, host: str, port: int, elapsed: float) -> BaseException:
        timeout = self.ssh.connect_timeout_s
        timed_out = elapsed >= 0.9 * timeout
        if isinstance(e, (ConfigError, SSHError)):
            return e
        if isinstance(e, _UnknownHostKey):
            return HostKeyError("%s: %s" % (where, e))
        if isinstance(e, paramiko.BadHostKeyException):
            name = known_hosts_name(host, port)
            lines = known_hosts_lines(self.known_hosts, name)
            at = "%s:%s" % (self.known_hosts, ",".join(map(str, lines))) if lines else str(self.known_hosts)
            return HostKeyError(
                "%s: HOST KEY CHANGED for %s: the server offered %s %s but %s records %s. Someone may be "
                "intercepting this connection (man-in-the-middle), or the device was reinstalled. Refusing to "
                "connect. If the new key is right (check it on the device's console), remove the old entry with "
                "ssh-keygen -R %s -f %s and add the new one."
                % (where, name, e.key.get_name(), fingerprint(e.key), at, fingerprint(e.expected_key),
                   shlex.quote(name), shlex.quote(str(self.known_hosts))))
        if isinstance(e, paramiko.AuthenticationException) and "timeout" in str(e).lower():
            # paramiko's "Authentication timeout.": no answer within auth_timeout, which says nothing of the key
            return SSHError("%s: no answer to authentication within %g s (timed out)" % (where, timeout),
                            infrastructure=True, timed_out=True)
        if isinstance(e, paramiko.AuthenticationException) or (
                isinstance(e, paramiko.SSHException) and "No authentication methods available" in str(e)):
            how = ("the key %s" % local_path(self.device, self.ssh.key) if self.ssh.key
                   else "ssh-agent and the default keys in ~/.ssh (ssh.key is null)")
            return SSHError("%s: authentication failed with %s (%s). Check %s and the device's authorized_keys for "
                            "user %s" % (where, how, e, self._field("key"), self.ssh.user), infrastructure=False)
        if isinstance(e, (socket.timeout, TimeoutError)):
            return SSHError("%s: no connection within %g s (timed out)" % (where, timeout), infrastructure=True,
                            timed_out=True)
        if isinstance(e, socket.gaierror):
            return SSHError("%s: cannot resolve %s: %s" % (where, host, e.strerror), infrastructure=True)
        if isinstance(e, paramiko.SSHException) and "banner" in str(e).lower():
            what = "no SSH banner within %g s" % timeout if timed_out else "no valid SSH banner"
            return SSHError("%s: %s (%s)" % (where, what, e), infrastructure=True, timed_out=timed_out)
        if isinstance(e, paramiko.SSHException) and str(e) == "No existing session":
            # paramiko's start_client returns silently at its timeout; the next step then finds no session
            return SSHError("%s: no SSH handshake within %g s (timed out)" % (where, timeout), infrastructure=True,
                            timed_out=True)
        if isinstance(e, (paramiko.SSHException, OSError, EOFError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
            return SSHError("%s: cannot connect: %s" % (where, reason), infrastructure=True)
        return e

    @contextmanager
    def _wire(self, what: str) -> Iterator[None]:
        """Map failures of an open connection to SSHError(infrastructure=True) and drop the connection."""
        try:
            yield
        except (SSHError, ConfigError):
            raise
        except (paramiko.SSHException, EOFError, OSError) as e:
            self.close()
            raise SSHError("%s: %s: connection lost (%s)" % (self.where, what, str(e) or type(e).__name__),
                           infrastructure=True) from None

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            t = self._transport()
            if self._sftp is None:
                with self._wire("opening SFTP"):
                    self._sftp = paramiko.SFTPClient.from_transport(t)
                    assert self._sftp is not None
                    self._sftp.get_channel().settimeout(self.ssh.command_timeout_s)
                    self._sftp_write = self._sftp_write_limit(self._sftp)
            return self._sftp

    def _sftp_write_limit(self, sftp: paramiko.SFTPClient) -> int:
        """Bytes per SFTP write request: ``sftp_request_bytes`` when the server's ``limits@openssh.com``
        extension (OpenSSH >= 8.6) allows it, else its advertised limit, else the protocol's safe 32 KiB."""
        try:
            kind, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
            if kind == CMD_EXTENDED_REPLY:
                msg.get_int64()                  # max packet length
                msg.get_int64()                  # max read length
                max_write = msg.get_int64()
                if max_write > 0:
                    return max(4096, min(self.sftp_request_bytes, max_write))
        except (OSError, paramiko.SSHException, EOFError) as e:
            if not self.connected:
                raise
            log.debug("%s: SFTP server has no limits@openssh.com (%s): 32 KiB writes", self.where, e)
        return 32768

    # -- commands
    def run(self, argv: Sequence[Union[str, os.PathLike]], timeout: Optional[float] = None,
            stdin: Optional[bytes] = None) -> Tuple[int, str, str]:
        """Run ``argv`` on the device (each element quoted) -> ``(exit status, stdout, stderr)``.

        ``timeout`` defaults to ``ssh.command_timeout_s``; past it the command's process group is killed and
        SSHError(timed_out=True) raised. Output beyond ``max_output_bytes`` is refused (SSHError).
        The exit status is -1 when the command died from a signal.
        """
        rc, out, err = self._exec("exec " + quote_argv(argv), timeout or self.ssh.command_timeout_s, stdin,
                                  what=quote_argv(argv)[:200])
        return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def _exec(self, script: str, timeout: float, stdin: Optional[bytes], what: str) -> Tuple[int, bytes, bytes]:
        """Run a shell command line built by this module (all variable parts quoted) under a deadline."""
        deadline = time.monotonic() + timeout
        t = self._transport()
        with self._wire(what):
            try:
                chan = t.open_session(timeout=max(1.0, deadline - time.monotonic()))
            except paramiko.SSHException as e:
                if not (t.is_active() and "Timeout opening channel" in str(e)):
                    raise
                # the connection is alive but busy (a slow link queued megabytes of an upload ahead of the
                # request): this command fails; the upload or job sharing the connection must not fail with it
                raise SSHError("%s: `%s`: no channel opened within %g s (link or device busy)"
                               % (self.where, what, timeout), infrastructure=True, timed_out=True) from None
        self.counters.commands_run += 1
        out, err = bytearray(), bytearray()
        pid: List[Optional[int]] = [None]
        try:
            with self._wire(what):
                chan.exec_command(_PID_PREFIX + script)
                if stdin:
                    chan.settimeout(max(0.1, deadline - time.monotonic()))
                    try:
                        chan.sendall(stdin)
                    except OSError:
                        if not t.is_active():
                            raise
                        # the command exited (or stopped reading) before taking its input: its output says why
                chan.shutdown_write()
                chan.settimeout(0.0)
                fd = chan.fileno()
                while True:
                    self._drain(chan, out, err, pid)
                    if chan.eof_received or chan.closed:
                        self._drain(chan, out, err, pid)
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise _Deadline()
                    select.select([fd], [], [], min(remaining, 1.0))
                if not chan.status_event.wait(max(0.0, deadline - time.monotonic())):
                    raise _Deadline()
                rc = chan.recv_exit_status()           # -1: no exit status (killed by a signal, or connection lost)
                if rc == -1 and not t.is_active():
                    raise EOFError("the connection closed")
        except _Deadline:
            self._kill(chan, pid[0])
            raise SSHError("%s: `%s` did not finish within %g s; killed" % (self.where, what, timeout),
                           infrastructure=True, timed_out=True) from None
        except _TooMuch as e:
            self._kill(chan, pid[0])
            raise SSHError("%s: `%s`: %s; refused" % (self.where, what, e), infrastructure=False) from None
        finally:
            chan.close()
        return rc, bytes(out), bytes(err)

    def _drain(self, chan: paramiko.Channel, out: bytearray, err: bytearray, pid: List[Optional[int]]) -> None:
        while chan.recv_ready():
            data = chan.recv(1 << 20)
            if not data:
                break
            out += data
            if len(out) > self.max_output_bytes:
                raise _TooMuch("stdout exceeds %d bytes" % self.max_output_bytes)
        while chan.recv_stderr_ready():
            data = chan.recv_stderr(1 << 20)
            if not data:
                break
            err += data
            if pid[0] is None:
                pid[0] = _take_pid(err)
            if len(err) > self.max_output_bytes:
                raise _TooMuch("stderr exceeds %d bytes" % self.max_output_bytes)

    def _kill(self, chan: paramiko.Channel, pid: Optional[int]) -> None:
        """Close the channel and kill the command's process group (sshd does not on a closed channel)."""
        chan.close()
        if pid is None or not self.connected:
            log.warning("%s: cannot kill a timed-out command (pid unknown or connection lost)", self.where)
            return
        pid = int(pid)
        try:
            self._exec("kill -KILL -- -%d 2>/dev/null || kill -KILL %d 2>/dev/null; true" % (pid, pid),
                       self.ssh.connect_timeout_s, None, what="kill %d" % pid)
        except SSHError as e:
            log.warning("%s: could not kill process group %d: %s", self.where, pid, e)

    # -- cache
    def cache_dir(self) -> str:
        """The device cache's absolute path (created on first use, mode 0700)."""
        with self._lock:
            if self._cache is None:
                self._transport()
                raw = self.ssh.cache_dir
                if raw == "~" or raw.startswith("~/"):
                    rel = raw[2:] or "."       # sshd starts every command in the user's home
                elif raw.startswith("~"):
                    raise ConfigError("%s: only ~ and ~/... are supported (not ~user)" % self._field("cache_dir"))
                else:
                    rel = raw
                script = "umask 077 && mkdir -p -- \"$1\" && cd -- \"$1\" && pwd -P"
                rc, out, err = self.run(["sh", "-c", script, "sh", rel])
                path = out.rstrip("\n")
                if rc != 0 or not path.startswith("/"):
                    raise SSHError("%s: cannot create the cache folder %r (exit %d): %s"
                                   % (self.where, raw, rc, err.strip()[-LOG_TAIL_CHARS:]), infrastructure=False)
                self._cache = path
            return self._cache

    def cache_path(self, sha256: str) -> str:
        return self.cache_dir() + "/" + _check_sha(sha256)

    def ensure_file(self, local_path: Union[str, Path], sha256: str) -> str:
        """Make ``<cache>/<sha256>`` hold ``local_path`` (verified on the device) and return that remote path.

        A cache hit sends nothing. A missing or tampered entry is uploaded to a temp name, verified by the
        device's python, then renamed into place.
        """
        sha256 = _check_sha(sha256)
        self._helper({"want": [sha256]}, {sha256: Path(local_path)}, None, self.ssh.command_timeout_s)
        return self.cache_path(sha256)

    def ensure_bundle(self) -> str:
        """Upload and unpack the agent bundle if the device lacks it; return its folder (a PYTHONPATH entry)."""
        data, sha = self.bundle()
        self._helper({"bundle": sha}, {sha: data}, None, self.ssh.command_timeout_s)
        return self.cache_dir() + "/agent-" + sha

    def bundle(self) -> Tuple[bytes, str]:
        if self._bundle is None:
            self._bundle = agent_bundle()
        return self._bundle

    def _helper(self, spec: Dict[str, Any], sources: Dict[str, Union[Path, bytes]], stdin: Optional[bytes],
                timeout: float) -> Tuple[Dict[str, Any], bytes]:
        """Run DEVICE_HELPER; upload what it reports missing and run it again with those commits."""
        cache = self.cache_dir()
        with self._lock:
            spec = dict(spec, cache=cache, commit=[], evict=list(self._abandoned), discard=list(self._discard),
                        stale_upload_s=STALE_UPLOAD_S)
        for attempt in (1, 2):
            script = "exec " + quote_argv([self.python, "-c", DEVICE_HELPER, json.dumps(spec, sort_keys=True)])
            rc, out, err = self._exec(script, timeout, stdin, what="%s -c <edgeprune device helper>" % self.python)
            header, body = _parse_helper_output(out)
            if not isinstance(header, dict):
                text = err.decode("utf-8", "replace").strip()
                if "Traceback (most recent call last)" in text:   # it ran, and failed: its last line says why
                    raise SSHError("%s: the device helper failed (exit %d): %s"
                                   % (self.where, rc, text.splitlines()[-1]), infrastructure=rc < 0 or rc > 128)
                raise SSHError("%s: the device helper failed (exit %d; is %r a Python >= 3.8? set `python` in %s): %s"
                               % (self.where, rc, self.python, self.device.source or "the device config",
                                  text[-LOG_TAIL_CHARS:] or "no output"),
                               infrastructure=rc < 0 or rc > 128)   # killed (OOM, signal): may pass next time
            with self._lock:               # the lease's renewal thread shares this transport
                self._abandoned = [n for n in self._abandoned if n not in spec["evict"]]
                self._discard = [n for n in self._discard if n not in spec["discard"]]
            self.counters.orphans_stopped += len(header["evicted"])
            if header["evicted"]:
                log.warning("%s: stopped job(s) %s left running on the device when the connection was lost",
                            self.where, ", ".join(header["evicted"]))
            if attempt == 1:
                self.counters.cache_hits += len(header["hits"])
            self.counters.cache_replaced += len(header["replaced"])
            if header["bad_upload"]:
                self._check_space(header, sources, {sha: header["bad_upload_sizes"].get(sha, 0)
                                                    for sha in header["bad_upload"]})
                raise SSHError("%s: %s hashed right here but not on the device after the upload (a disk or "
                               "transfer fault there)" % (self.where, ", ".join(header["bad_upload"])),
                               infrastructure=True)
            if not header["missing"]:
                return header, body
            if attempt == 2:  # pragma: no cover - the helper commits before it checks
                raise SSHError("%s: %s still missing after upload" % (self.where, header["missing"]),
                               infrastructure=True)
            self._check_space(header, sources, {sha: 0 for sha in header["missing"]},
                              unpack=spec.get("bundle") in header["missing"])
            for sha in header["missing"]:
                spec["commit"].append([sha, self._upload(sources[sha], sha)])
            if header["replaced"]:
                log.warning("%s: cache entries %s did not match their sha256: replaced", self.where,
                            ", ".join(header["replaced"]))
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_space(self, header: Dict[str, Any], sources: Dict[str, Union[Path, bytes]], have: Dict[str, int],
                     unpack: bool = False) -> None:
        """SSHError (retrying cannot help) when the device's cache has less free space than the files in ``have``
        still need (their sizes less the bytes already there); an agent bundle to ``unpack`` needs its size twice."""
        free = header.get("free")
        if free is None:
            return
        need = {sha: max(0, _size(sources[sha]) - got) for sha, got in have.items()}
        total = sum(need.values()) + (_size(sources[self.bundle()[1]]) if unpack else 0)
        if total <= free:
            return
        what = ", ".join("%s %s" % (sources[sha].name if isinstance(sources[sha], Path) else "the agent bundle",
                                    _mb(_size(sources[sha]))) for sha in have)
        raise SSHError("%s: no space left on the device for the upload: its cache %s has %s free, %s needed (%s)"
                       % (self.where, self.cache_dir(), _mb(free), _mb(total), what), infrastructure=False)

    def _free_space(self) -> Optional[int]:
        """Free bytes in the device's cache (None when that cannot be found out)."""
        try:
            rc, out, _ = self.run([self.python, "-c", "import os, sys; s = os.statvfs(sys.argv[1]); "
                                   "print(s.f_bavail * s.f_frsize)", self.cache_dir()],
                                  timeout=self.ssh.connect_timeout_s)
            return int(out) if rc == 0 else None
        except (SSHError, ValueError):
            return None

    @contextmanager
    def _discarded_if_lost(self, tmp: str) -> Iterator[None]:
        """An upload whose connection is lost leaves ``<cache>/tmp`` behind: the next helper call removes it."""
        try:
            yield
        except SSHError as e:
            if e.infrastructure:
                with self._lock:
                    self._discard.append(tmp)
            raise

    def _upload(self, source: Union[Path, bytes], sha256: str) -> str:
        """SFTP ``source`` to ``<cache>/<sha256>.tmp.<random>``; return that name (relative to the cache)."""
        tmp = "%s.tmp.%s" % (sha256, secrets.token_hex(8))
        remote = self.cache_dir() + "/" + tmp
        local_hash = hashlib.sha256()
        size = 0
        sftp = self._sftp_client()
        try:
            src: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        except OSError as e:
            raise SSHError("%s: cannot read %s to upload it: %s" % (self.where, source, e.strerror),
                           infrastructure=False) from None
        t0 = time.perf_counter()
        with src, self._discarded_if_lost(tmp), self._wire("uploading to %s" % remote):
            try:
                with sftp.open(remote, "wb") as f:
                    f.set_pipelined(True)
                    f.MAX_REQUEST_SIZE = self._sftp_write  # paramiko's fixed 32 KiB costs ~1/3 of the throughput
                    while True:
                        block = src.read(UPLOAD_READ_BYTES)
                        if not block:
                            break
                        local_hash.update(block)
                        f.write(block)
                        size += len(block)
            except socket.timeout:                # no answer within command_timeout_s: the link, not the file
                self.close()
                raise SSHError("%s: uploading to %s: no progress within %g s; connection dropped"
                               % (self.where, remote, self.ssh.command_timeout_s), infrastructure=True,
                               timed_out=True) from None
            except OSError as e:                  # paramiko's SFTP status errors (no space, permission) are OSErrors
                if not self.connected or sftp.get_channel().closed:
                    raise                             # ... and so is a dead socket: _wire says "connection lost"
                free = self._free_space()         # before the partial file goes: is it what filled the disk?
                try:
                    sftp.remove(remote)
                except (OSError, paramiko.SSHException, EOFError):
                    pass
                full = "no space left on the device: " if free is not None and free < _size(source) else ""
                raise SSHError("%s: %scannot write %s there: %s (%s; %s free)"
                               % (self.where, full, remote, e, _mb(_size(source)),
                                  "unknown" if free is None else _mb(free)), infrastructure=False) from None
        if local_hash.hexdigest() != sha256:
            with self._wire("removing %s" % remote):
                sftp.remove(remote)
            raise SSHError("%s: %s does not match its sha256 %s (it hashes to %s)"
                           % (self.where, source if isinstance(source, Path) else "upload", sha256,
                              local_hash.hexdigest()), infrastructure=False)
        self.counters.files_uploaded += 1
        self.counters.bytes_uploaded += size
        log.debug("%s: uploaded %d bytes to %s in %.3f s", self.where, size, remote, time.perf_counter() - t0)
        return tmp

    # -- jobs
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
            sources.setdefault(_check_sha(digest), path)        # same bytes under two names: one upload
        if job.eval is not None:   # every eval shard, each by its sha256 (one upload for two of the same bytes)
            for shard in job.eval.shard_list():
                sources.setdefault(_check_sha(shard.sha256), workdir / shard.path)
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
        write_text_atomic(report_path, text)
        try:
            report = schema.loads_report(text)
        except schema.SchemaError as e:
            raise SSHError("%s: invalid report from the agent: %s" % (report_path, e), infrastructure=False) from None
        if report.job_id != job.job_id:
            raise SSHError("%s: report is for job %r, not %r" % (report_path, report.job_id, job.job_id),
                           infrastructure=False)
        return report

    def _remove_jobdir(self, name: str) -> None:
        try:
            if self.connected:
                self.run(["rm", "-rf", "--", self.cache_dir() + "/jobs/" + name], timeout=self.ssh.connect_timeout_s)
        except SSHError as e:
            log.warning("%s: could not remove job folder %s: %s", self.where, name, e)


class _Deadline(Exception):
    pass


class _TooMuch(Exception):
    pass


def _parse_helper_output(out: bytes) -> Tuple[Optional[Dict[str, Any]], bytes]:
    """DEVICE_HELPER's stdout -> (header, report bytes); (None, b"") when it did not get to print its header."""
    start = out.find(_HELPER_MARK)      # a chatty login shell may have printed something before it
    if start < 0:
        return None, b""
    line, nl, body = out[start + len(_HELPER_MARK):].partition(b"\n")
    try:
        header = json.loads(line) if nl else None
    except ValueError:
        return None, b""
    return (header, body) if isinstance(header, dict) else (None, b"")


def _take_pid(err: bytearray) -> Optional[int]:
    """Find and cut the ``EDGEPRUNE_PID n`` line from stderr (a login shell may have printed before it)."""
    at = 0 if err.startswith(_PID_MARK) else err.find(b"\n" + _PID_MARK) + 1
    end = err.find(b"\n", at) if at > 0 or err.startswith(_PID_MARK) else -1
    if end < 0:
        return None
    pid = int(err[at + len(_PID_MARK):end])
    del err[at:end + 1]
    return pid


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


def _size(source: Union[Path, bytes]) -> int:
    return len(source) if isinstance(source, bytes) else Path(source).stat().st_size


def _mb(n: int) -> str:
    return "%.2f MB" % (n / 1e6)


def _check_sha(sha256: str) -> str:
    if not schema.SHA256_RE.match(sha256 or ""):
        raise ValueError("sha256 must be 64 lowercase hex digits, got %r" % (sha256,))
    return sha256
