"""The fleet: the devices a job can run on, and how a job reaches one and its report comes back.

``devices`` (device configs and fleet files) and ``targets`` (the target vocabulary beside them); ``jobs`` builds
the job spec a device runs; ``transport`` runs it on this machine (``LocalTransport``) and ``ssh`` on an SSH device
(``SSHTransport``, a package: connection, host keys, commands, the device cache and its helper); ``runner`` runs
jobs on many devices at once under each device's lease, with retries for infrastructure failures; ``health`` and
``state`` check devices and remember the result. ``die_with_parent`` and ``ssh/device_helper`` are programs sent
as text (``python -c``), not imported for their work.

This room imports nothing from ``host.search``, ``host.results``, ``host.commands`` or ``host.cli``.
"""
