"""``edgeprune results list|export``, ``report`` and ``regress``: reading the results store back.

Contract: parses the arguments, calls :mod:`host.results` (the store, :func:`~host.results.frames.export_run`,
:func:`host.results.report.write`, :func:`host.results.regress.compare` and its outputs) and prints; ``regress``
exits with the comparison's code (0 pass, 1 regression, 2 incomparable or bad usage, 3 inconclusive).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from edgeprune.errors import UsageError
from host.cli.common import db_argument
from host.results import regress, report
from host.results.frames import EXPORT_FORMATS, export_run
from host.results.store import Store


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``results``, ``report`` and ``regress`` to the ``edgeprune`` parser's subcommands."""
    _add_results(sub)
    _add_report(sub)
    _add_regress(sub)


def _add_results(sub: "argparse._SubParsersAction") -> None:
    r = sub.add_parser("results", help="the results store: list runs, export a run's measurements")
    rs = r.add_subparsers(dest="results_command", required=True)
    ls = rs.add_parser("list", help="every run in the store, oldest first")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    db_argument(ls)
    ex = rs.add_parser("export", help="a run's measurements as Parquet or CSV")
    ex.add_argument("run", metavar="RUN", help="run id (see `edgeprune results list`)")
    ex.add_argument("--format", default="parquet", help="parquet (default) or csv")
    ex.add_argument("-o", "--output", type=Path, default=None, help="file to write (default results/<RUN>.<format>)")
    ex.add_argument("--samples", action="store_true",
                    help="include the latency samples, the job spec and the full agent report")
    db_argument(ex)
    r.set_defaults(handler=main_results)


def main_results(args: argparse.Namespace, console: Console) -> int:
    if args.results_command == "export":
        if args.format not in EXPORT_FORMATS:
            raise UsageError(f"--format: one of {', '.join(EXPORT_FORMATS)}, got {args.format!r}")
        with Store(args.db, create=False) as store:
            out = args.output or Path("results") / f"{args.run}.{args.format}"
            path = export_run(store, args.run, args.format, out, samples=args.samples)
            n = len(store.measurements(args.run))
        console.print(f"wrote {n} measurement(s) of run {args.run} to {path}", highlight=False)
        return 0
    with Store(args.db, create=False) as store:
        rows = store.list_runs()
        name = store.name
    if args.json:
        print(json.dumps([{k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
                           if k in ("run_id", "kind", "status", "started_at", "finished_at", "host", "devices",
                                    "measurements", "error")} for r in rows], indent=1))
        return 0
    table = Table(title=f"runs in {name}")
    for col in ("run id", "kind", "status", "started", "devices", "measurements", "host"):
        table.add_column(col, justify="right" if col in ("devices", "measurements") else "left")
    colour = {"complete": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for r in rows:
        started = r["started_at"].strftime("%Y-%m-%d %H:%M:%S") if r.get("started_at") else ""
        table.add_row(r["run_id"], r["kind"], f"[{colour.get(r['status'], 'white')}]{r['status']}[/]", started,
                      str(r["devices"]), str(r["measurements"]), str(r["host"]))
    console.print(table)
    if not rows:
        console.print("no runs recorded yet: `edgeprune demo`, `bench` and `search` record theirs")
    return 0


def _add_report(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report of one run in the results store",
                       description="Write one self-contained HTML file (figures embedded, no JavaScript, no external "
                                   "URL) for one run in the results store: the latency/accuracy trade-off per device, "
                                   "latency distributions, power and energy, accuracy, every warning and the "
                                   "provenance of the numbers.")
    p.add_argument("run", metavar="RUN", help="the run's id in the results store")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help=f"HTML file to write (default {report.DEFAULT_DIR}/RUN.html)")
    db_argument(p, metavar=None, help="results database URL or path (default: the EDGEPRUNE_DB environment "
                                      "variable, else results/edgeprune.db)")
    p.set_defaults(handler=main_report)


def main_report(args: argparse.Namespace, console: Console) -> int:
    out = args.output if args.output is not None else report.default_output(args.run)
    store = Store(args.db, create=False)
    try:
        path = report.write(store, args.run, out)
    finally:
        store.close()
    console.print(f"wrote {path}", markup=False, highlight=False)
    return 0


def _add_regress(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser(
        "regress", help="release gate: compare a candidate run with a baseline run (latency, energy, accuracy)",
        description="Compare the results of run CANDIDATE with run BASELINE in the results store, per device, "
                    "model and label. Latency/energy regress when a one-sided Mann-Whitney test is significant at "
                    "--alpha AND the median grew by more than the tolerance; accuracy when top-1 fell by more "
                    "than --accuracy-tol; label-free fidelity (unlabelled eval data) when the candidate's top-1 "
                    "agreement with the dense model or its SNR is below --min-agreement / --min-snr-db. Exit 0 "
                    "pass, 1 regression (or a missing/failed candidate result), 2 bad usage or incomparable "
                    "results.")
    p.add_argument("--baseline", required=True, metavar="RUN", help="run id of the reference results")
    p.add_argument("--candidate", required=True, metavar="RUN", help="run id of the results to judge")
    p.add_argument("--latency-tol", default="5%", metavar="PCT",
                   help="smallest median latency increase that fails the gate: 5%% or 5 (default 5%%)")
    p.add_argument("--energy-tol", default="5%", metavar="PCT",
                   help="smallest median energy-per-inference increase that fails the gate (default 5%%)")
    p.add_argument("--accuracy-tol", default="0.5pp", metavar="PP",
                   help="largest allowed top-1 drop in percentage points: 0.5pp or 0.5 (default 0.5pp)")
    p.add_argument("--min-agreement", default=None, metavar="F",
                   help="fail when the candidate's on-device top-1 agreement with the dense model's outputs (label-"
                        "free; a fraction, e.g. 0.99 or 99%%) is below F: an absolute bound, not relative to the "
                        "baseline; not measured (skipped) when its reports have no agreement")
    p.add_argument("--min-snr-db", default=None, metavar="DB",
                   help="fail when the candidate's output SNR against the dense model's outputs (dB, min over "
                        "outputs) is below DB; not measured (skipped) when its reports have no SNR")
    p.add_argument("--alpha", default="0.01",
                   help="significance level of the one-sided Mann-Whitney tests (default 0.01)")
    p.add_argument("--gate-modelled-energy", action="store_true",
                   help="also fail on energy computed from MODELLED power (no sensor); by default it is shown and "
                        "not gated: the model follows whole-machine CPU load, not the artifact")
    p.add_argument("--compare-anyway", action="store_true",
                   help="compare pairs whose artifact, runtime, format or batch size differ (listing the "
                        "differences) instead of refusing them")
    p.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML to FILE")
    db_argument(p, help="results database URL or path (default: EDGEPRUNE_DB, else results/edgeprune.db)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(handler=main_regress)


def main_regress(args: argparse.Namespace, console: Console) -> int:
    """Run the gate from parsed arguments; print the summary (or JSON); the exit code. UsageError propagates."""
    latency_tol = regress.parse_percent(args.latency_tol, "--latency-tol")
    energy_tol = regress.parse_percent(args.energy_tol, "--energy-tol")
    accuracy_tol = regress.parse_pp(args.accuracy_tol, "--accuracy-tol")
    alpha = regress.parse_alpha(args.alpha, "--alpha")
    min_agreement = (None if args.min_agreement is None
                     else regress.parse_fraction(args.min_agreement, "--min-agreement"))
    min_snr_db = None if args.min_snr_db is None else regress.parse_db(args.min_snr_db, "--min-snr-db")
    with Store(args.db, create=False) as store:
        comp = regress.compare(store, args.baseline, args.candidate, latency_tol=latency_tol, energy_tol=energy_tol,
                               accuracy_tol_pp=accuracy_tol, alpha=alpha, compare_anyway=args.compare_anyway,
                               gate_modelled_energy=args.gate_modelled_energy, min_agreement=min_agreement,
                               min_snr_db=min_snr_db)
    junit: Optional[Path] = None
    if args.junit:
        try:
            junit = regress.write_junit(comp, args.junit)
        except OSError as e:
            raise UsageError(f"--junit: {args.junit}: cannot write: {e}") from None
    if args.json:
        console.print_json(json.dumps(comp.to_dict()))
    else:
        regress.print_summary(comp, console)
        if junit is not None:
            console.print(f"wrote {junit}", highlight=False)
    return comp.exit_code
