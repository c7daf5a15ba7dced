"""The edgeprune controller: runs on the workstation, builds candidates with :mod:`edgeprune`, measures them on
devices through their agents, and keeps what they measured.

Rooms (imports only go down this list; ``tests/test_layout.py`` checks it)::

    host/cli/        the ``edgeprune`` command: parse arguments, call a command, map errors to exit codes
    host/commands/   what demo, bench and prune do, as library functions returning plain data
    host/search/     searching pruning ratios against each device's targets; one module per algorithm
    host/results/    the results store (SQLite / PostgreSQL), tables, HTML report, regression gate, provenance
    host/fleet/      devices and their targets, transports (local, SSH), leases, health, the parallel runner
    host/files.py, host/fmt.py   atomic file writes and number formatting, used by every room

The one contract with the device is :mod:`agent.schema` (job in, report out, versioned JSON).
"""
