"""Host keys: who a device is, checked against ``ssh.known_hosts`` before anything is sent to it.

``ssh.known_hosts`` is loaded by every connection (:class:`host.fleet.ssh.connection.SSHConnection`); a key it
does not list is refused (policy ``reject``: :class:`RejectUnknown`) or recorded once, then pinned
(``accept-new``, OpenSSH's meaning: :class:`AcceptNew`). A key that differs from the recorded one is always
refused. fabric's auto-add is deliberately not copied.

Both refusals become :class:`~edgeprune.errors.HostKeyError` through :func:`host_key_error`: the message says what
to check and which command fixes it (the known_hosts line to remove, the ``ssh-keyscan`` to run), and the key
details stay available as its attributes (``host``, ``key_type``, ``fingerprint``, ``expected_fingerprint``,
``known_hosts``, ``lines``). Names in known_hosts are OpenSSH's: ``host`` on port 22, else ``[host]:port``; plain
and hashed (``|1|``) entries are both read.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import logging
import os
import re
import shlex
import threading
from pathlib import Path
from typing import List, Optional, Tuple

import paramiko

from edgeprune.errors import HostKeyError

log = logging.getLogger(__name__)

_KNOWN_HOSTS_LOCK = threading.Lock()


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
    """Raised by :class:`RejectUnknown` inside paramiko's connect; the host name (known_hosts form) and the
    offered key ride along for :func:`host_key_error`."""

    def __init__(self, message: str, name: str, key: paramiko.PKey) -> None:
        super().__init__(message)
        self.name = name
        self.key = key


class RejectUnknown(paramiko.MissingHostKeyPolicy):
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
               shlex.quote(host), shlex.quote(str(self.known_hosts))), hostname, key)


class AcceptNew(paramiko.MissingHostKeyPolicy):
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


def host_key_error(e: BaseException, where: str, host: str, port: int, known_hosts: Path) -> Optional[HostKeyError]:
    """The HostKeyError for a refused key (``e`` from :class:`RejectUnknown`, or paramiko's BadHostKeyException
    for a changed one) met connecting to ``host:port`` as ``where``; None when ``e`` is some other failure."""
    if isinstance(e, _UnknownHostKey):
        return HostKeyError("%s: %s" % (where, e), host=e.name, key_type=e.key.get_name(),
                            fingerprint=fingerprint(e.key), known_hosts=str(known_hosts),
                            lines=tuple(known_hosts_lines(known_hosts, e.name)))
    if isinstance(e, paramiko.BadHostKeyException):
        name = known_hosts_name(host, port)
        lines = known_hosts_lines(known_hosts, name)
        at = "%s:%s" % (known_hosts, ",".join(map(str, lines))) if lines else str(known_hosts)
        return HostKeyError(
            "%s: HOST KEY CHANGED for %s: the server offered %s %s but %s records %s. Someone may be "
            "intercepting this connection (man-in-the-middle), or the device was reinstalled. Refusing to "
            "connect. If the new key is right (check it on the device's console), remove the old entry with "
            "ssh-keygen -R %s -f %s and add the new one."
            % (where, name, e.key.get_name(), fingerprint(e.key), at, fingerprint(e.expected_key),
               shlex.quote(name), shlex.quote(str(known_hosts))),
            host=name, key_type=e.key.get_name(), fingerprint=fingerprint(e.key),
            expected_fingerprint=fingerprint(e.expected_key), known_hosts=str(known_hosts), lines=tuple(lines))
    return None


def _split_known_name(name: str) -> Tuple[str, int]:
    m = re.match(r"^\[(.+)\]:(\d+)$", name)
    return (m.group(1), int(m.group(2))) if m else (name, 22)
