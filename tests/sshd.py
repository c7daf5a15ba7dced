"""Real OpenSSH servers on loopback for the SSH transport's tests and benchmarks.

Each :class:`Sshd` is one ``/usr/sbin/sshd -D -e -f CONFIG`` process listening on 127.0.0.1 and a free port, with
its own ed25519 host key, its own PidFile, an ``AuthorizedKeysFile`` in a temp folder and its log in a file.
It accepts public-key logins as the current user (root here: ``PermitRootLogin prohibit-password``) and nothing
else. Nothing here listens on any address other than 127.0.0.1.

Used by ``tests/test_ssh.py`` (session fixtures) and ``bench/transport.py``; neither needs network access.
"""
from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
LOOPBACK = "127.0.0.1"


def have_sshd() -> bool:
    return os.access(SSHD, os.X_OK) and os.access(SSH_KEYGEN, os.X_OK)


def keygen(path: Path, comment: str = "edgeprune-test") -> str:
    """Write an ed25519 key pair (``path``, ``path.pub``, no passphrase); return the public key line."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return path.with_name(path.name + ".pub").read_text().strip()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def known_hosts_name(port: int, host: str = LOOPBACK) -> str:
    return host if port == 22 else "[%s]:%d" % (host, port)


@dataclass
class Sshd:
    """One running sshd. ``host_key_line`` is ``"ssh-ed25519 AAAA..."`` (no host name)."""

    root: Path
    port: int
    host_key: Path
    host_key_line: str
    log: Path
    proc: Optional[subprocess.Popen] = field(default=None, repr=False)

    @property
    def known_hosts_line(self) -> str:
        return "%s %s" % (known_hosts_name(self.port), " ".join(self.host_key_line.split()[:2]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - sshd exits on SIGTERM
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


SSHD_CONFIG = """\
Port {port}
ListenAddress {host}
HostKey {host_key}
PidFile {pid}
AuthorizedKeysFile {authorized_keys}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowTcpForwarding yes
MaxStartups 200
MaxSessions 32
LogLevel {log_level}
Subsystem sftp internal-sftp
"""


def start_sshd(root: Path, authorized_keys: Path, *, host_key: Optional[Path] = None, port: Optional[int] = None,
               log_level: str = "INFO", tries: int = 5) -> Sshd:
    """Start one sshd under ``root`` (its config, host key, pid file and log live there) and wait until it
    answers with an SSH banner. ``host_key``: reuse a key file (else a new one); ``port``: a fixed port (else a
    free one, retried when another process takes it first)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege-separation directory for a root sshd
    if host_key is None:
        host_key = root / "ssh_host_ed25519_key"
        keygen(host_key, comment="edgeprune-test-host")
    key_line = Path(str(host_key) + ".pub").read_text().strip()
    last_log = ""
    for _ in range(tries if port is None else 1):
        p = port or free_port()
        config = root / "sshd_config"
        log = root / "sshd.log"
        config.write_text(SSHD_CONFIG.format(port=p, host=LOOPBACK, host_key=host_key, pid=root / "sshd.pid",
                                             authorized_keys=authorized_keys, log_level=log_level))
        with open(log, "ab") as logf:
            proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=logf, start_new_session=True)
        server = Sshd(root=root, port=p, host_key=host_key, host_key_line=key_line, log=log, proc=proc)
        if _wait_banner(server, timeout_s=10.0):
            return server
        server.stop()
        last_log = server.log_text()[-2000:]
    raise RuntimeError("sshd did not start under %s: %s" % (root, last_log))


def _wait_banner(server: Sshd, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, server.port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


@dataclass
class SshdFleet:
    """N sshd processes sharing one client key and one known_hosts file (holding all their host keys)."""

    root: Path
    client_key: Path
    authorized_keys: Path
    known_hosts: Path
    servers: List[Sshd]
    user: str = field(default_factory=getpass.getuser)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def device(self, i: int = 0, *, device_id: Optional[str] = None, cache_dir: Optional[str] = None,
               python: Optional[str] = None, **ssh: Any):
        """A ``DeviceConfig`` for server ``i`` with its own cache folder under the fleet root (devices never share
        a cache), the device's python = this interpreter (it has numpy and onnxruntime), and ``ssh`` overrides."""
        from host.fleet.devices import DeviceConfig, SSHConfig

        server = self.servers[i]
        settings: Dict[str, Any] = dict(host=LOOPBACK, port=server.port, user=self.user, key=str(self.client_key),
                                        known_hosts=str(self.known_hosts), connect_timeout_s=5.0,
                                        command_timeout_s=30.0, keepalive_s=15.0,
                                        cache_dir=cache_dir or str(self.root / ("cache%d" % i)))
        settings.update(ssh)
        return DeviceConfig(id=device_id or "sshd%d" % i, transport="ssh", ssh=SSHConfig(**settings),
                            python=python or sys.executable, description="loopback sshd for tests")


def start_fleet(root: Path, n: int, log_level: str = "INFO") -> SshdFleet:
    """Start ``n`` sshd processes under ``root`` with a shared client key and known_hosts file."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    client_key = root / "client_ed25519"
    pub = keygen(client_key, comment="edgeprune-test-client")
    authorized_keys = root / "authorized_keys"
    authorized_keys.write_text(pub + "\n")
    servers: List[Sshd] = []
    try:
        for i in range(n):
            servers.append(start_sshd(root / ("sshd%d" % i), authorized_keys, log_level=log_level))
    except BaseException:
        for s in servers:
            s.stop()
        raise
    known_hosts = root / "known_hosts"
    known_hosts.write_text("".join(s.known_hosts_line + "\n" for s in servers))
    return SshdFleet(root=root, client_key=client_key, authorized_keys=authorized_keys, known_hosts=known_hosts,
                     servers=servers)


def write_known_hosts(path: Path, lines: Sequence[str]) -> Path:
    Path(path).write_text("".join(line + "\n" for line in lines))
    return Path(path)


def needs_sshd() -> list:
    """The marks for a test module that drives real sshd processes: `ssh`, and a skip where there is none."""
    import pytest

    return [pytest.mark.ssh, pytest.mark.skipif(not have_sshd(), reason="OpenSSH server not installed (/usr/sbin/sshd)")]
