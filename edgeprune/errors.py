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


class DeviceError(EdgepruneError):
    """A device could not run a job (transport failure, timeout, agent error).

    ``infrastructure`` is True when the failure is in reaching the device (connection refused or lost,
    timeout, no report), which a retry may cure; False when retrying cannot help (host key, authentication,
    a job the agent refused)."""

    infrastructure = False
