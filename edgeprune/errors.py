"""One exception hierarchy for edgeprune and its host controller.

Library code raises these; only the CLI (``host.cli``) turns them into messages and exit codes:
``UsageError`` and its subclasses exit 2 (bad input: the message names the file and field or argument),
every other ``EdgepruneError`` exits 1 (the work itself failed).
"""
from __future__ import annotations


class EdgepruneError(Exception):
    """Base class of every error edgeprune raises on purpose."""


class UsageError(EdgepruneError):
    """Bad input from the user: an argument, a file or a field. Exit code 2."""


class ConfigError(UsageError):
    """A device config or fleet file is invalid. The message names the file and the field."""


class DataError(UsageError):
    """A dataset or checkpoint is missing or malformed. The message names the file."""


class PruneError(EdgepruneError):
    """A pruning plan cannot be computed or replayed."""


class ExportError(EdgepruneError):
    """An exported artifact failed its equivalence check or could not be written."""


class ToolchainError(ExportError):
    """The toolchain an export format needs (a Python package, a program) is missing; the message says how to get it."""


class DeviceError(EdgepruneError):
    """A device could not run a job (transport failure, timeout, agent error).

    ``infrastructure`` is True when the failure is in reaching the device (connection refused or lost,
    timeout, no report), which a retry may cure; False when retrying cannot help (host key, authentication,
    a job the agent refused)."""

    infrastructure = False


class InfrastructureError(DeviceError):
    """The device could not be reached or did not answer (connection lost, timeout, no report): worth a retry,
    unlike a model or runtime error, which a report with status "error" carries."""

    infrastructure = True


class DeviceBusy(DeviceError):
    """Another controller holds the device's lease and did not release it in time."""


class SSHError(DeviceError):
    """A device could not be reached or could not run a command over SSH.

    ``infrastructure`` is True when the failure is in the transport (connection refused or lost, timeout,
    killed): retrying later or on another device may succeed. It is False when retrying cannot help.
    """

    def __init__(self, message: str, *, infrastructure: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.infrastructure = infrastructure
        self.timed_out = timed_out


class HostKeyError(SSHError):
    """The device's host key is unknown (policy ``reject``) or differs from the recorded one.

    Besides the message, the key details stay available to a caller as attributes (None where not known):
    ``host`` (the known_hosts name, ``[host]:port`` off port 22), ``key_type`` and ``fingerprint`` (SHA256) of the
    key the server offered, ``expected_fingerprint`` (the recorded key's, when it changed), ``known_hosts`` (the
    file) and ``lines`` (its line numbers holding the host).
    """

    def __init__(self, message: str, *, host: "str | None" = None, key_type: "str | None" = None,
                 fingerprint: "str | None" = None, expected_fingerprint: "str | None" = None,
                 known_hosts: "str | None" = None, lines: "tuple[int, ...]" = ()) -> None:
        super().__init__(message, infrastructure=False)
        self.host = host
        self.key_type = key_type
        self.fingerprint = fingerprint
        self.expected_fingerprint = expected_fingerprint
        self.known_hosts = known_hosts
        self.lines = tuple(lines)

    @property
    def changed(self) -> bool:
        """True when a recorded key differs from the offered one (rather than no key being recorded)."""
        return self.expected_fingerprint is not None


class ExecutorError(EdgepruneError):
    """Where candidates are built failed, not the build itself: a Ray cluster that cannot be reached, or was lost
    mid-run (the message names its address). A search stopped by it continues with ``--resume``."""


class StoreError(UsageError):
    """The results store cannot be opened or written (exit 2)."""


class EmulationError(EdgepruneError):
    """An emulated device could not be built, started or stopped (not root, no qemu-user or binfmt_misc, no Debian
    mirror). The message says which step failed and how to fix it."""
