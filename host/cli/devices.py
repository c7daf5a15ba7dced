"""``edgeprune devices list|check|setup|emulate``: the fleet, each device's health, provisioning, emulated boards.

Contract: parses the arguments, reads the fleet (:mod:`host.fleet.devices`), then: checks the devices' health
(:func:`host.fleet.health.check_devices`) or reads the last known state; provisions each device's agent venv
(:mod:`host.fleet.setup`); or makes, stops and lists emulated devices (:mod:`host.emulate`). Prints a table or
JSON; ``check`` and ``setup`` exit 1 unless every device is good.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from host.cli.common import select_devices
from host.fmt import NA


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``devices`` to the ``edgeprune`` parser's subcommands."""
    dv = sub.add_parser("devices", help="the fleet: list it, check each device's health, set devices up, emulate one")
    actions = dv.add_subparsers(dest="action", metavar="ACTION", required=True)

    def fleet_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
        p.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
        p.add_argument("--json", action="store_true", help="print JSON")

    fleet_args(actions.add_parser("list", help="the fleet and each device's last known health"))
    fleet_args(actions.add_parser("check", help="reach each device: its agent's probe, its lease, its runtime"))
    su = actions.add_parser("setup", help="provision each device for the agent: a venv with numpy, psutil and its "
                            "runtime, at versions known to work for its class; points its python: at the venv")
    fleet_args(su)
    su.add_argument("--runtime", action="append", default=[], metavar="NAME",
                    help="also install this runtime (repeatable; the device's own runtime always is)")
    su.add_argument("--wheels-from-host", action="store_true",
                    help="for devices without internet: this machine downloads the wheels for the device's platform "
                    "and pushes them over SFTP (default: the device installs from its own package index)")
    su.add_argument("--timeout", type=float, default=1800.0, help="seconds for one device's install (default 1800)")
    em = actions.add_parser("emulate", help="an emulated board (arm64 Debian under qemu-user) with its own sshd on "
                            "127.0.0.1, and its device file in --dir (needs root)")
    em.add_argument("device_class", nargs="?", metavar="CLASS", help="device class to emulate (rpi4, rpi5)")
    em.add_argument("--dir", type=Path, default=None, help="folder for the device file and the device's own files "
                    "(required, except with --build-only)")
    em.add_argument("--id", default=None, help="device id (default CLASS-emu)")
    em.add_argument("--mirror", default="", help="Debian mirror for the root (default $EDGEPRUNE_DEBIAN_MIRROR or "
                    "http://deb.debian.org/debian)")
    mode = em.add_mutually_exclusive_group()
    mode.add_argument("--stop", action="store_true", help="stop the emulated devices in --dir (or --id)")
    mode.add_argument("--status", action="store_true", help="list the emulated devices in --dir and whether they run")
    mode.add_argument("--build-only", action="store_true", help="build (or find) CLASS's cached root and exit: "
                      "nothing is started (CI warms the cache with it)")
    em.add_argument("--json", action="store_true", help="print JSON")
    dv.set_defaults(handler=main_devices)


def main_devices(args: argparse.Namespace, console: Console) -> int:
    if args.action == "emulate":
        return _emulate(args, console)
    if args.action == "setup":
        return _setup(args, console)
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


def _setup(args: argparse.Namespace, console: Console) -> int:
    from host.fleet.setup import setup_devices

    devices = select_devices(args.fleet, args.devices, connect=True)
    err = Console(stderr=True) if args.json else console
    results = setup_devices(devices, extra_runtimes=args.runtime, wheels_from_host=args.wheels_from_host,
                            timeout_s=args.timeout, events=lambda dev, msg: err.print(f"{dev}: {msg}", highlight=False))
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    else:
        table = Table(title="devices setup")
        for col in ("device", "python", "machine", "emulated", "installed", "status"):
            table.add_column(col)
        for dev_id, r in results.items():
            versions = ", ".join(f"{k} {v}" for k, v in sorted((r.get("versions") or {}).items()))
            status = "[green]" + r["status"] + "[/]" if r["status"] in ("installed", "up to date", "nothing to do") \
                else f"[red]{r['status']}[/] {r.get('error', '')}"
            table.add_row(dev_id, str(r.get("python") or NA), str(r.get("machine") or NA),
                          {True: "yes", False: "no"}.get(r.get("emulated"), NA), versions or NA, status)
        console.print(table)
    return 0 if all(r["status"] != "failed" for r in results.values()) else 1


def _emulate(args: argparse.Namespace, console: Console) -> int:
    from edgeprune.errors import UsageError
    from host import emulate

    err = Console(stderr=True) if args.json else console
    if args.build_only:
        if not args.device_class:
            raise UsageError("devices emulate --build-only: give the CLASS whose root to build (e.g. rpi4)")
        root = emulate.build_root(args.device_class, mirror=args.mirror,
                                  events=lambda msg: err.print(msg, highlight=False))
        print(json.dumps({"class": args.device_class, "root": str(root)}) if args.json else f"root: {root}")
        return 0
    if args.dir is None:
        raise UsageError("devices emulate: --dir is required (the folder for the device file and its own files)")
    if args.stop:
        rows = emulate.stop(args.dir, args.id)
    elif args.status:
        rows = emulate.status(args.dir, args.id)
    else:
        if not args.device_class:
            raise UsageError("devices emulate: give the CLASS to emulate (e.g. rpi4), or --stop / --status")
        rows = [emulate.emulate(args.device_class, args.dir, args.id, mirror=args.mirror,
                                events=lambda msg: err.print(msg, highlight=False))]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"emulated devices in {args.dir}")
    for col in ("device", "class", "state", "address", "device file"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["id"], str(r["class"]), "[green]running[/]" if r["running"] else "stopped",
                      f"127.0.0.1:{r['port']}" if r["running"] else NA, r["device_file"])
    console.print(table)
    if not rows:
        console.print(f"no emulated devices in {args.dir}")
    return 0
