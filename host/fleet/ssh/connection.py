"""The connection to one SSH device: paramiko client, host keys, ProxyJump, keepalives, dead-link detection.

:class:`SSHConnection` is the base of :class:`host.fleet.ssh.SSHTransport` (commands, the device cache and jobs
are layered on it: :mod:`.commands`, :mod:`.cache`, :mod:`.transport`). Its contract:

Lazy, like fabric's ``Connection``
    Nothing happens until the first command asks for :meth:`SSHConnection._transport`; ``close()`` closes SFTP,
    the client and a ProxyJump client together (also a context manager), and the next call reconnects. One
    connection per device is reused for every command (an ``exec`` on a fresh connection costs a full handshake).
    TCP_NODELAY is set: without it every command waits on delayed ACKs. TCP connect, banner and auth use
    ``ssh.connect_timeout_s``; keepalives go every ``ssh.keepalive_s``.

A dead link is detected
    paramiko's keepalives expect no answer and its writer retries a full socket forever, so a link that went down
    under an upload hung the controller until the kernel gave up (15 min and more). Where the OS has it (Linux),
    ``TCP_USER_TIMEOUT`` (:func:`dead_after_s`: three keepalive intervals, like OpenSSH's ServerAliveCountMax,
    else ``command_timeout_s``) makes the kernel drop a connection whose data stays unacknowledged that long; the
    keepalives make sure there is data in flight while a command waits. Through a ProxyJump host that guards only
    the first hop, so :class:`_JumpWatch` asks the device itself for an answer every keepalive interval and drops
    the connection when nothing has come from it for as long.

Host keys are checked by :mod:`.hostkeys` (``reject`` or ``accept-new``; a changed key is always refused).

Errors: a failure to connect is :class:`~edgeprune.errors.SSHError` with ``infrastructure=True`` when a retry may
help (refused, timed out, lost) and False when not (authentication; :class:`~edgeprune.errors.HostKeyError`);
a failure on an open connection, inside :meth:`SSHConnection._wire`, drops it and is an SSHError "connection
lost" (``infrastructure=True``). Configuration mistakes found before connecting (a missing key file, an
unreadable known_hosts, a bad ``proxy_jump``) are :class:`~edgeprune.errors.ConfigError`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple, TypeVar

import paramiko
from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

from edgeprune.errors import ConfigError, SSHError
from host.fleet.devices import DeviceConfig, SSHConfig, local_path
from host.fleet.ssh.hostkeys import AcceptNew, RejectUnknown, host_key_error

log = logging.getLogger(__name__)

SFTP_REQUEST_BYTES = 128 << 10       # per SFTP write, within the server's limits@openssh.com (bench/transport.py)

_Self = TypeVar("_Self", bound="SSHConnection")


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


# -------------------------------------------------------------------------------- ProxyJump and dead links
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

    def __init__(self, transport: "SSHConnection", t: paramiko.Transport, sock: _JumpChannel) -> None:
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


# ---------------------------------------------------------------------------------------------- connection
class SSHConnection:
    """One lazily opened, reused SSH connection to a device (and SFTP over it), with its host-key policy."""

    def __init__(self, device: DeviceConfig, *, hash_known_hosts: bool = False,
                 sftp_request_bytes: int = SFTP_REQUEST_BYTES) -> None:
        if device.transport != "ssh" or device.ssh is None:
            raise ConfigError("%s: transport: SSHTransport needs transport: ssh and an ssh section"
                              % (device.source or "device " + device.id))
        self.device = device
        self.ssh: SSHConfig = device.ssh
        self.hash_known_hosts = hash_known_hosts
        self.sftp_request_bytes = sftp_request_bytes
        self.counters = Counters()
        self.known_hosts = local_path(self.device, self.ssh.known_hosts)
        self.where = "device %s (%s@%s:%d)" % (device.id, self.ssh.user, self.ssh.host, self.ssh.port)
        self._lock = threading.RLock()
        self._client: Optional[paramiko.SSHClient] = None
        self._jump: Optional[paramiko.SSHClient] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._sftp_write = 32768
        self._pkey: Optional[paramiko.PKey] = None

    # -- lifecycle
    def __enter__(self: _Self) -> _Self:
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
            client.set_missing_host_key_policy(AcceptNew(self.known_hosts, self.hash_known_hosts))
        else:
            client.set_missing_host_key_policy(RejectUnknown(self.known_hosts, self._field("host_key_policy")))
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
        refused = host_key_error(e, where, host, port, self.known_hosts)
        if refused is not None:
            return refused
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
