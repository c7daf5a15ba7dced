"""``edgeprune demo``: the whole loop on one device (prune, export, measure, record), as a table.

Contract: parses the arguments, checks the model and data before the results store records a run, calls
:func:`host.commands.demo.run_demo` with a progress display and prints its rows; exit 1 when a candidate failed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeprune.errors import UsageError
from host.cli.common import (MODEL_HELP, data_source_args, db_argument, executor_args, model_source_args,
                             open_executor, open_recorder,
                             per_class, ratio_list, source_kwargs)
from host.fmt import NA, field


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``demo`` to the ``edgeprune`` parser's subcommands."""
    d = sub.add_parser("demo", help="prune, export and measure a model on the local device (or --device FILE)")
    d.add_argument("--model", default="resnet20", help=MODEL_HELP + "; default resnet20 (bundled with CIFAR-10 "
                   "test images; resnet32/44/56 need EDGEPRUNE_DATA)")
    d.add_argument("--ratios", type=ratio_list, default=None, help="channel pruning ratios, e.g. 0,0.3,0.5,0.7")
    d.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder (default results/demo)")
    d.add_argument("--device", default=None, help="device config YAML, or a fleet file of one device: any transport (local, ssh) and runtime; the artifacts are exported in the format its runtime loads (default: the built-in local device, onnxruntime)")
    d.add_argument("--quick", action="store_true", help="small eval split, short recovery and timing (< 3 min)")
    d.add_argument("--no-recovery", action="store_true", help="skip BN recalibration and fine-tuning")
    d.add_argument("--finetune-epochs", type=int, default=None)
    d.add_argument("--finetune-seconds", type=float, default=None, help="wall-time bound per candidate")
    d.add_argument("--finetune-per-class", type=per_class, default=argparse.SUPPRESS, help="images per class, or 'full'")
    d.add_argument("--eval-per-class", type=per_class, default=argparse.SUPPRESS,
                   help="eval images per class: 100 (default) is the shipped 1,000-image subset; 'full' is all 10,000 "
                        "test images (needs EDGEPRUNE_DATA)")
    d.add_argument("--threads", type=int, default=None, help="runtime threads on the device (overrides config)")
    d.add_argument("--round-to", type=int, default=None,
                   help="keep a multiple of N channels per pruned layer (overrides the device's round_to; "
                        "8 suits AVX2 CPUs, see bench/RESULTS.md)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--lease-wait", type=float, default=300.0, help="seconds to wait for the device's lease when "
                   "another controller (a bench, a search, another demo) is measuring on it")
    d.add_argument("--run-id", default=None, help="record under this id (default: generated and printed)")
    db_argument(d)
    executor_args(d)
    model_source_args(d)
    data_source_args(d, eval_help="eval data the agent scores (the dense model's outputs ship with it)")
    d.set_defaults(handler=main_demo)


def _demo_table(rows: List[Dict[str, object]], title: str) -> Table:
    table = Table(title=title)
    for col in ("ratio", "MMACs", "params", "p50 ms", "p90 ms", "speed-up", "top-1", "agree", "power W", "mJ/inf"):
        table.add_column(col, justify="right")
    table.add_column("recovery")
    table.add_column("status")
    dense = next((r.get("latency_p50_ms") for r in rows if r.get("ratio") == 0.0), None)
    for r in rows:
        p50 = r.get("latency_p50_ms")
        speedup = f"{dense / p50:.2f}×" if isinstance(dense, float) and isinstance(p50, float) and p50 > 0 else NA
        table.add_row(field(r, "ratio", ".0%"), f"{int(str(r['macs'])) / 1e6:.1f}", f"{int(str(r['params'])):,}",
                      field(r, "latency_p50_ms", ".3f"), field(r, "latency_p90_ms", ".3f"), speedup,
                      field(r, "accuracy_top1", ".2%"), field(r, "agreement", ".1%"),
                      field(r, "power_w", ".2f") + ("*" if r.get("power_source") == "model" else ""),
                      field(r, "energy_mj", ".3f"), str(r["recovery"]),
                      "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]")
    return table


def main_demo(args: argparse.Namespace, console: Console) -> int:
    from host.commands.demo import DemoOptions
    from host.fleet.devices import check_local_files, resolve_device

    device = resolve_device(args.device)
    check_local_files(device)     # an SSH device's key and known_hosts, before anything is built
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads: must be >= 1")
        device = device.model_copy(update={"runtime": device.runtime.model_copy(update={"threads": args.threads})})
    if args.round_to is not None:
        if args.round_to < 1:
            raise UsageError("--round-to: must be >= 1")
        device = device.model_copy(update={"round_to": args.round_to})
    kw = dict(model=args.model, out=args.out, recovery=not args.no_recovery, seed=args.seed, device=device,
              lease_wait_s=args.lease_wait, **source_kwargs(args))
    if args.ratios is not None:
        kw["ratios"] = tuple(args.ratios)
    for name in ("finetune_epochs", "finetune_seconds"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    for name in ("finetune_per_class", "eval_per_class"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    opts = DemoOptions.quick_defaults(**kw) if args.quick else DemoOptions(**kw)
    opts.validate()
    from host.results.store import check_run_id, new_run_id
    from host.commands.demo import open_demo_workload

    run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    workload = open_demo_workload(opts)   # the model and eval data checked before the store records a run
    executor = open_executor(args)   # a Ray cluster that cannot be reached fails before the store records a run
    try:
        recorder = open_recorder(args, run_id, "demo", seeds={"seed": opts.seed}, executor=executor)
        console.print(f"run id: [bold]{run_id}[/] (results store {recorder.store.name})")
        result = _run(opts, recorder, workload, executor, console)
    finally:
        executor.close()
    return _report(result, workload, device, console, run_id, recorder.store.name)  # type: ignore[attr-defined]


def _run(opts: "object", recorder: "object", workload: "object", executor: "object", console: Console) -> "object":
    from host.commands.demo import run_demo

    with recorder, Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        overall = progress.add_task("candidates built", total=len(opts.ratios))
        step = progress.add_task("", total=None, visible=False)

        def events(kind: str, msg: str, done: Optional[int], total: Optional[int]) -> None:
            if kind == "info":
                progress.console.print(f"[dim]{msg}[/]")
            elif kind == "stage":
                progress.update(step, description=msg, completed=0, total=None, visible=True)
            elif kind == "progress":
                progress.update(step, description=msg, completed=done, total=total, visible=True)
            elif kind == "built":
                progress.update(overall, completed=done)
                progress.console.print(f"[dim]built[/] {msg}")
            elif kind == "row":
                progress.update(overall, description="candidates measured", completed=done)
                progress.console.print(("[green]" if msg.endswith(": ok") else "[red]") + f"done[/] {msg}")

        result = run_demo(opts, events, recorder=recorder, workload=workload,  # type: ignore[arg-type]
                          executor=executor)  # type: ignore[arg-type]
        recorder.summary = {"rows": result.rows, "failures": result.failures}  # type: ignore[attr-defined]
    return result


def _report(result: "object", workload: "object", device: "object", console: Console, run_id: str,
            store: str) -> int:
    console.print(_demo_table(result.rows, f"edgeprune demo — {workload.model.name} on device '{device.id}' "
                                           f"({device.runtime.name}, {result.format}, "
                                           f"{device.runtime.threads} thread(s))"))
    modelled = any(r.get("power_source") == "model" for r in result.rows)
    if result.eval_n:
        console.print(f"accuracy on split '{result.eval_split}' ({result.eval_n} images), measured by the agent; "
                      "agreement: top-1 agreement with the dense model's outputs, on the device.")
    else:
        console.print("no eval data (--data): accuracy not measured.")
    if modelled:
        console.print("* power is MODELLED (no power sensor on this device): idle/max watts from the device "
                      "config × CPU utilisation. Not a measurement.")
    for r in result.rows:
        if r.get("warnings"):
            console.print(f"[yellow]warning[/] r={r['ratio']}: {r['warnings']}")
    console.print(f"wrote {result.summary_csv} and {len(result.rows)} reports in {result.out / 'reports'}")
    console.print(f"run {run_id} recorded in {store}: edgeprune report {run_id}")
    return 1 if result.failures else 0
