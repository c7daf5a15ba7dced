"""Jobs on SSH devices: :class:`SSHTransport` ships the artifact, the eval shards and the agent to a device's
content-addressed cache over one reused paramiko connection and runs the job there, with
:class:`host.fleet.transport.LocalTransport`'s contract (a JSON job in, a validated report out).

The transport is built in layers, each a module with its own contract, each class the base of the next:

``connection``     :class:`~.connection.SSHConnection`: the lazy, reused connection (timeouts, keepalives,
                   ProxyJump, dead-link detection), SFTP over it, connection errors mapped to SSHError
``hostkeys``       known_hosts, the ``reject`` / ``accept-new`` policies, :class:`~edgeprune.errors.HostKeyError`
``commands``       :class:`~.commands.SSHCommands`: one quoted command line under a deadline (process group
                   killed past it), output capped
``cache``          :class:`~.cache.DeviceCache`: the device cache (SFTP uploads verified by sha256, the agent
                   bundle, lost jobs and uploads cleaned up), through the device helper
``device_helper``  the stdlib-only program the cache runs on the device with ``python -c`` (never imported there)
``transport``      :class:`SSHTransport`: ``run_job`` and ``exec_agent`` on top of the cache

Errors are :class:`~edgeprune.errors.SSHError` (``infrastructure`` says whether a retry may help) and its
:class:`~edgeprune.errors.HostKeyError`; mistakes found before connecting are
:class:`~edgeprune.errors.ConfigError`. Importing this package needs paramiko (LocalTransport does not).
"""
from host.fleet.ssh.cache import DEVICE_HELPER, agent_bundle
from host.fleet.ssh.commands import quote_argv
from host.fleet.ssh.connection import Counters, dead_after_s, parse_jump
from host.fleet.ssh.hostkeys import fingerprint, known_hosts_lines, known_hosts_name
from host.fleet.ssh.transport import SSHTransport

__all__ = ["DEVICE_HELPER", "Counters", "SSHTransport", "agent_bundle", "dead_after_s", "fingerprint",
           "known_hosts_lines", "known_hosts_name", "parse_jump", "quote_argv"]
