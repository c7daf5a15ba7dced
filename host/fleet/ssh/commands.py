"""Commands on the device: one shell command line per channel, under a deadline, with bounded output.

:class:`SSHCommands` adds :meth:`SSHCommands.run` (an argv list) and ``_exec`` (a shell line built by this package)
to :class:`~host.fleet.ssh.connection.SSHConnection`. Its contract:

* Command lines are built only from argv lists (:func:`quote_argv`: every element through ``shlex.quote``); the
  surrounding shell text is fixed in this package. The login shell on the device must be POSIX (sh, bash, dash,
  ash, zsh).
* Every command first prints its process id on stderr (``EDGEPRUNE_PID n``: the shell, the process-group leader,
  since sshd starts every command in a new session); the line is cut from the stderr returned.
* Every command has a deadline, opening its channel included. A channel that does not open in time fails that
  command only (SSHError, ``timed_out``): on a slow link the request may wait behind an upload that shares the
  connection, which must not be cut for it. Past the deadline the channel is closed and the command's whole
  process group killed (sshd does not kill it on a closed channel): SSHError(``infrastructure``, ``timed_out``).
* stdout and stderr are each capped at ``max_output_bytes``: past it the command is killed and refused
  (SSHError, ``infrastructure=False``). The exit status is -1 when the command died from a signal.
"""
from __future__ import annotations

import logging
import os
import select
import shlex
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

import paramiko

from edgeprune.errors import SSHError
from host.fleet.devices import DeviceConfig
from host.fleet.ssh.connection import SSHConnection

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 16 << 20          # stdout and stderr of one command, each
_PID_MARK = b"EDGEPRUNE_PID "
_PID_PREFIX = "printf 'EDGEPRUNE_PID %s\\n' \"$$\" >&2; "   # fixed text: $$ is the shell, sshd's session leader


def quote_argv(argv: Sequence[Union[str, os.PathLike]]) -> str:
    """One shell command line from an argv list: every element quoted, nothing interpolated."""
    if not argv:
        raise ValueError("empty command")
    return " ".join(shlex.quote(os.fspath(a)) for a in argv)


class SSHCommands(SSHConnection):
    """Shell commands on the device over the connection, each under a deadline, its output capped."""

    def __init__(self, device: DeviceConfig, *, max_output_bytes: int = MAX_OUTPUT_BYTES, **connection: Any) -> None:
        super().__init__(device, **connection)
        self.max_output_bytes = max_output_bytes

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


class _Deadline(Exception):
    pass


class _TooMuch(Exception):
    pass


def _take_pid(err: bytearray) -> Optional[int]:
    """Find and cut the ``EDGEPRUNE_PID n`` line from stderr (a login shell may have printed before it)."""
    at = 0 if err.startswith(_PID_MARK) else err.find(b"\n" + _PID_MARK) + 1
    end = err.find(b"\n", at) if at > 0 or err.startswith(_PID_MARK) else -1
    if end < 0:
        return None
    pid = int(err[at + len(_PID_MARK):end])
    del err[at:end + 1]
    return pid

