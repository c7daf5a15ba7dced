"""The ``edgeprune`` command line. The only place that prints or chooses an exit code.

Exit codes: 0 success; 1 the work ran but something failed (a device job, an export); 2 bad input
(the message names the argument, file or field); 130 interrupted.

One module per command group, each with ``register(sub)`` adding its commands (and their handlers) to the parser:
:mod:`.demo`; :mod:`.bench` (bench, prune, sensitivity); :mod:`.search`; :mod:`.results` (results, report,
regress); :mod:`.devices`. :mod:`.common` holds the shared argument helpers (``--db``, the model and data source
flags) and the mapping of exceptions to exit codes. Commands parse arguments, call the library (:mod:`host.commands`,
:mod:`host.search`, :mod:`host.results`, :mod:`host.fleet`) and print; no library module imports them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from rich.console import Console

import agent
from host.cli import bench, demo, devices, results, search
from host.cli.common import run_command

VERSION = agent.__version__  # the one version string (pyproject.toml reads it too)

# in the order `edgeprune --help` lists them
GROUPS = (demo, bench, search, results, devices)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprune", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeprune {VERSION}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # piped output (CI logs, files) gets a fixed, wide layout instead of rich's 80-column fallback
    console = Console(width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 140, soft_wrap=True)  # one error, one line
    if not hasattr(args, "handler"):  # pragma: no cover - argparse enforces choices
        parser.error(f"unknown command {args.command}")
    return run_command(args.handler, args, console, err)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
