"""``edgeprune devices list|check``: the fleet, and each device's health.

Contract: parses the arguments, reads the fleet (:mod:`host.fleet.devices`), checks the devices' health
(:func:`host.fleet.health.check_devices`) or reads the last known state, and prints a table or JSON; ``check``
exits 1 unless every device is good.
"""
from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from host.cli.common import select_devices
from host.fmt import NA


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``devices`` to the ``edgeprune`` parser's subcommands."""
    dv = sub.add_parser("devices", help="the fleet: list it, or check each device's health")
    dv.add_argument("action", choices=["list", "check"])
    dv.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    dv.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
    dv.add_argument("--json", action="store_true", help="print JSON")
    dv.set_defaults(handler=main_devices)


def main_devices(args: argparse.Namespace, console: Console) -> int:
    import json

    from host.fleet import state
    from host.fleet.health import check_devices

    devices = select_devices(args.fleet, args.devices, connect=args.action == "check")
    if args.action == "check":
        results = check_devices(devices)
    else:
        known = state.load()
        results = {d.id: {"health": known.get(d.id, {}).get("health", "unknown"),
                          "checked_at": known.get(d.id, {}).get("checked_at"),
                          "details": known.get(d.id, {}).get("details", {})} for d in devices}
    if args.json:
        console.print_json(json.dumps(results, default=str))
    else:
        table = Table(title=f"fleet: {args.fleet or 'local device'}")
        for col in ("device", "class", "transport", "address", "runtime", "health", "checked", "lease", "notes"):
            table.add_column(col)
        for d in devices:
            r = results[d.id]
            det = r.get("details") or {}
            addr = f"{d.ssh.user}@{d.ssh.host}:{d.ssh.port}" if d.ssh else NA
            colour = {"good": "green", "bad": "red"}.get(r["health"], "yellow")
            table.add_row(d.id, d.device_class, d.transport, addr, d.runtime.name, f"[{colour}]{r['health']}[/]",
                          str(r.get("checked_at") or "never"), str(det.get("lease") or "free"),
                          str(det.get("error") or det.get("summary") or ""))
        console.print(table)
    return 0 if all(r["health"] == "good" for r in results.values()) or args.action == "list" else 1
