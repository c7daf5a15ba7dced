"""``edgeprune search``: prune until each device meets its targets, measured on the devices; ``--resume``.

Contract: parses the arguments into :class:`host.search.run.SearchOptions` and targets, opens and checks the model
and data before the results store records anything, runs :func:`host.search.run.start` (or ``resume``) with a
progress display and prints the verdict per device; exit 0 when every device met its targets, else 1.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeprune.errors import UsageError
from host.cli.common import (MODEL_HELP, data_source_args, db_argument, executor_args, model_source_args,
                             open_executor, open_recorder, per_class, select_devices, source_kwargs)
from host.fmt import EMULATED_FOOTNOTE, NA
from host.search.budget import BUDGET_DISTILL, DEFAULT_BUDGET_MINUTES


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``search`` to the ``edgeprune`` parser's subcommands."""
    sr = sub.add_parser("search", help="prune until each device meets its latency/power/energy/accuracy targets, "
                                       "measured on the devices")
    sr.add_argument("--model", default=None, help=MODEL_HELP)
    sr.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    sr.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
    sr.add_argument("--target", action="append", default=[], metavar="[DEVICE_OR_CLASS:]METRIC=VALUE",
                    help="a bound per device: latency_p50_ms, latency_p90_ms, throughput_ips (at least), power_w, "
                         "energy_mj, memory_mb; VALUE absolute or a multiple of dense on that device (0.5x); "
                         "repeatable; a DEVICE_OR_CLASS: prefix scopes it")
    sr.add_argument("--targets", type=Path, default=None, metavar="FILE",
                    help="targets file (YAML: default:, classes:, devices: -> {metric: value})")
    sr.add_argument("--max-accuracy-drop", type=float, default=None, metavar="PP",
                    help="maximum top-1 drop in percentage points against dense on the same device and runtime "
                         "(needs labelled eval data)")
    sr.add_argument("--min-agreement", type=float, default=None, metavar="F",
                    help="minimum top-1 agreement with the dense model's outputs, a fraction in (0, 1], measured on "
                         "the device (no labels needed)")
    sr.add_argument("--min-snr-db", type=float, default=None, metavar="DB",
                    help="minimum SNR of the outputs against the dense model's, in dB, measured on the device")
    sr.add_argument("--json", action="store_true", help="print one JSON document (per device: the chosen "
                    "candidate, its MACs, params, artifacts, metrics, targets met) on stdout; progress on stderr")
    sr.add_argument("--algo", default=None, help="bisect (default) or netadapt")
    sr.add_argument("--max-evals", type=int, default=None, help="device evaluations per device, dense included "
                                                                "(default 8)")
    sr.add_argument("--out", type=Path, default=None, help="run folder (default results/search/<run id>)")
    sr.add_argument("--run-id", default=None, help="record under this id (default: generated and printed)")
    sr.add_argument("--resume", default=None, metavar="RUN_ID",
                    help="continue this run with its stored options (give --out too if it was given)")
    db_argument(sr)
    executor_args(sr)
    sr.add_argument("--quick", action="store_true", default=None, help="short timing windows on the devices")
    sr.add_argument("--allocation", default=None, help="global ratio -> per-group ratios: sensitivity (default), "
                                                       "latency (bisect: latency measured per layer on the device, "
                                                       "per accuracy lost) or uniform")
    sr.add_argument("--importance", default=None, help="channel importance: l1 (default), l2, bn_scale, taylor")
    sr.add_argument("--prune-residual", action="store_true", default=None,
                    help="option-A ResNets: also prune each stage's residual stream")
    sr.add_argument("--max-ratio", type=float, default=None, help="no group loses more than this fraction (0.9)")
    sr.add_argument("--finetune-epochs", type=int, default=None, help="recovery fine-tune epochs per candidate "
                                                                      "(default 1; 0: BN recalibration only)")
    sr.add_argument("--finetune-per-class", type=per_class, default=argparse.SUPPRESS,
                    help="finetune-split images per class for recovery (default 500), or 'full'")
    sr.add_argument("--finetune-seconds", type=float, default=None,
                    help="wall-time cap per candidate's recovery (recalibration and fine-tune)")
    sr.add_argument("--distill", type=float, default=None, help="recovery: weight of distillation from the dense "
                                                                "model, 0..1 (default 0.5 under a budget, else 0)")
    sr.add_argument("--eval-per-class", type=per_class, default=argparse.SUPPRESS,
                    help="eval images per class the agent scores (default 100: the shipped 1,000)")
    sr.add_argument("--probe-recovery", default=None, help="bisect: recovery of the candidates it searches with: "
                                                           "short (default under a budget), none or full; then the "
                                                           "chosen one again with full recovery")
    sr.add_argument("--budget-minutes", type=float, default=None, metavar="MIN",
                    help=f"bisect: wall-time budget of the whole search: cheap probes for the first third, then the "
                         f"chosen candidate fully recovered in the time left (default {DEFAULT_BUDGET_MINUTES:g} "
                         f"unless --finetune-epochs/-per-class/-seconds or --probe-recovery full is given; 0: no "
                         f"budget)")
    sr.add_argument("--no-holdout", action="store_true", default=None,
                    help="do not re-check the chosen candidate on the test images it was not chosen on")
    sr.add_argument("--final-repeat", type=int, default=None, metavar="N",
                    help="time each device's chosen candidate in N runs in all (its evaluation and N-1 more, each a "
                         "fresh runtime session), recorded for `edgeprune regress` (default 5; 1: off)")
    sr.add_argument("--netadapt-max-proposals", type=int, default=None,
                    help="netadapt: proposals per iteration (default: one per group)")
    sr.add_argument("--cache-dir", type=Path, default=None, help="sensitivity and layer-latency tables "
                                                                 "(default results/search/cache)")
    sr.add_argument("--lease-wait", type=float, default=None, help="seconds to wait for a busy device's lease")
    sr.add_argument("--seed", type=int, default=None)
    model_source_args(sr)
    data_source_args(sr, eval_help="eval data the agent scores (the dense model's outputs ship with it; without "
                      "labels use --min-agreement / --min-snr-db)")
    sr.set_defaults(handler=main_search)


# options that define a search: given with --resume they would silently differ from the stored ones
_SEARCH_DEFINING = ("model", "fleet", "devices", "targets", "max_accuracy_drop", "algo", "max_evals", "run_id",
                    "quick", "allocation", "importance", "prune_residual", "max_ratio", "probe_recovery",
                    "finetune_epochs", "budget_minutes", "no_holdout", "final_repeat",
                    "finetune_seconds", "distill", "netadapt_max_proposals", "cache_dir", "lease_wait", "seed",
                    "min_agreement", "min_snr_db", "model_arg", "weights", "trust_pickle", "input_size",
                    "input_shape", "ignore_layers", "data", "calib_data", "finetune_data", "resize", "center_crop",
                    "mean", "std")


def _search_options(args: argparse.Namespace) -> "object":
    from host.search.run import SearchOptions
    from host.search.algos import AlgoOptions

    if not args.model:
        raise UsageError("--model: required (or --resume RUN_ID)")
    opts = SearchOptions(model=args.model, **source_kwargs(args))
    for arg, name in (("algo", "algo"), ("max_evals", "max_evals"), ("importance", "importance"),
                      ("prune_residual", "prune_residual"), ("quick", "quick"), ("seed", "seed"),
                      ("lease_wait", "lease_wait_s")):
        if getattr(args, arg) is not None:
            setattr(opts, name, getattr(args, arg))
    if args.cache_dir is not None:
        opts.cache_dir = str(args.cache_dir)
    if hasattr(args, "eval_per_class"):
        opts.eval_per_class = args.eval_per_class
    if args.finetune_epochs is not None:
        opts.recovery.finetune_epochs = args.finetune_epochs
    if hasattr(args, "finetune_per_class"):
        opts.recovery.finetune_per_class = args.finetune_per_class
    if args.finetune_seconds is not None:
        opts.recovery.finetune_seconds = args.finetune_seconds
    if args.distill is not None:
        opts.recovery.distill = args.distill
    algo = AlgoOptions()
    for arg, name in (("allocation", "allocation"), ("max_ratio", "max_ratio"), ("probe_recovery", "probe_recovery"),
                      ("netadapt_max_proposals", "netadapt_max_proposals")):
        if getattr(args, arg) is not None:
            setattr(algo, name, getattr(args, arg))
    budget = args.budget_minutes
    if budget is None and opts.algo == "bisect" and args.finetune_epochs is None and \
            args.finetune_seconds is None and not hasattr(args, "finetune_per_class") and \
            args.probe_recovery != "full":
        budget = DEFAULT_BUDGET_MINUTES   # the default: a search that ends within its budget
    if budget is not None and budget != 0:
        opts.budget_minutes = budget
        if args.probe_recovery is None:
            algo.probe_recovery = "short"
        if args.distill is None:   # the final's long recovery: distillation measured to recover more per minute
            opts.recovery.distill = BUDGET_DISTILL
    if args.no_holdout:
        opts.holdout = False
    if args.final_repeat is not None:
        opts.final_repeat = args.final_repeat
    opts.algo_options = algo
    return opts.validate()


def _search_table(result: "object") -> Table:
    from host.fleet.targets import METRICS

    table = Table(title=f"edgeprune search ({result.algo}) — run {result.run_id}")  # type: ignore[attr-defined]
    metrics = {r.accuracy_metric for r in result.devices}  # type: ignore[attr-defined]
    acc_col = "top-1 drop" if metrics <= {"top1"} else "accuracy"
    for col in ("device", "target", "achieved", acc_col, "evaluations", "verdict"):
        table.add_column(col, justify="right" if col in (acc_col, "evaluations") else "left")
    for r in result.devices:  # type: ignore[attr-defined]
        pick = r.chosen or r.closest or {}
        limits = (r.bounds or {}).get("limits", {})
        achieved = []
        for m in limits:
            v = pick.get(m)
            achieved.append(f"{METRICS[m].label} {v:.4g} {METRICS[m].unit}" if isinstance(v, (int, float))
                            else f"{METRICS[m].label}: {NA}")
        drop = pick.get("drop_pp")
        evals = f"{r.device_evals}" + (f" (+{r.host_evals} host, {r.lut_jobs} layer)" if r.host_evals or r.lut_jobs
                                       else "")
        colour = {"met": "green", "infeasible": "yellow"}.get(r.verdict, "red")
        verdict = f"[{colour}]{r.verdict}[/]" + ("" if r.verdict == "met" else " (closest shown)" if pick else "")
        acc = f"{drop:.2f} pp" if isinstance(drop, (int, float)) else NA
        if acc_col != "top-1 drop":   # label which metric each device was judged by
            agree, snr = pick.get("agreement"), pick.get("snr_db")
            parts = [f"top-1 drop {acc}"] if r.accuracy_metric == "top1" else []
            parts += [f"agreement {agree:.2%}"] if isinstance(agree, (int, float)) else []
            parts += [f"SNR {snr:.1f} dB"] if isinstance(snr, (int, float)) else []
            acc = "\n".join(parts) or NA
        table.add_row(r.device_id, r.targets, "\n".join(achieved) or NA, acc, evals, verdict)
    return table


def _candidates_table(r: "object") -> Table:
    """One device's candidates in evaluation order: the recovery each got, its wall time and images seen, and what
    the device measured (on the selection split)."""
    from host.fmt import fixed, pct

    split = getattr(r, "selection_split", "") or "the eval split"
    table = Table(title=f"{r.device_id}: candidates (measured on the device; chosen on {split})")  # type: ignore
    for col in ("#", "candidate", "recovery", "recovery time", "images seen", "p50 ms", "× dense", "top-1", "drop",
                ""):
        table.add_column(col, justify="left" if col in ("candidate", "recovery", "") else "right")
    pick = (r.chosen or r.closest or {}).get("key")  # type: ignore[attr-defined]
    first = (r.rows[0] if r.rows else {}).get("latency_p50_ms")  # type: ignore[attr-defined]
    for i, row in enumerate(r.rows, 1):  # type: ignore[attr-defined]
        beside = row.get("dense_p50_beside_ms") or first   # relative targets: dense measured right after it
        p50 = row.get("latency_p50_ms")
        speed = f"{p50 / beside:.3f}" if isinstance(p50, (int, float)) and beside else NA
        dense = not row.get("pruned_fraction") and row.get("recovery") == "none" and not row.get("ratio")
        what = "dense" if dense else f"ratio {fixed(row.get('ratio'))}"
        secs = row.get("recovery_s")
        seen = row.get("images_seen")
        drop = row.get("drop_pp")
        mark = ("chosen" if r.chosen else "closest") if row.get("key") == pick else ""  # type: ignore[attr-defined]
        prec = row.get("recovery_precision")
        rec = "—" if dense else str(row.get("recovery")) + (f", {prec}" if prec else "")
        table.add_row(str(i), what, rec,
                      (f"{secs:.0f} s" if secs < 90 else f"{secs / 60:.1f} min") if isinstance(secs, (int, float))
                      else NA,
                      f"{int(seen):,}" if isinstance(seen, (int, float)) else NA,
                      fixed(p50) + ("†" if row.get("emulated") else ""), speed, pct(row.get("top1")),
                      f"{drop:.2f} pp" if isinstance(drop, (int, float)) else NA, mark)
    return table


def _final_line(r: "object") -> str:
    """The pick's final measurement in repetitions (host.search.final), as one line."""
    fin = getattr(r, "final", None) or {}
    if not fin:
        return ""
    if fin.get("skipped"):
        return f"{r.device_id}: final measurement not repeated: {fin['skipped']}"  # type: ignore[attr-defined]
    line = (f"{r.device_id}: final measurement, {fin['repetitions']} run(s): p50 {fin['latency_p50_ms']:.4f} ms "  # type: ignore[attr-defined]
            f"(median of run medians; the runs within {fin['run_spread']:.1%} of it)")
    if fin.get("error"):
        line += f"; {fin['asked'] - fin['repetitions']} repetition(s) failed: {fin['error']}"
    return line


def _holdout_line(r: "object") -> str:
    """The pick's re-check on the hold-out split, as one line."""
    ho = getattr(r, "holdout", None) or {}
    dev = r.device_id  # type: ignore[attr-defined]
    if not ho:
        return ""
    if ho.get("error"):
        return f"{dev}: hold-out re-check ({ho.get('split')}) failed: {ho['error']}"
    if not ho.get("split"):
        return f"{dev}: {ho.get('reason', 'no hold-out')}"
    line = f"{dev}: re-checked on {ho['split']} (not chosen on)"
    if ho.get("top1") is not None:
        line += f": top-1 {ho['top1']:.2%}"
    if ho.get("drop_pp") is not None:
        line += f", drop {ho['drop_pp']:.2f} pp"
        if ho.get("meets_accuracy") is False and getattr(r, "verdict", "") == "met":
            line += " — OVER the accuracy bound here: the split it was chosen on flattered it"
    if ho.get("test_top1") is not None:
        line += (f"; whole test set ({ho['test_images']:,} images): top-1 {ho['test_top1']:.2%}, drop "
                 f"{ho['test_drop_pp']:.2f} pp")
    return line


def main_search(args: argparse.Namespace, console: Console) -> int:
    from host.search import run as search
    from host.results.store import check_run_id, new_run_id
    from host.fleet.targets import device_targets, parse_cli

    if args.json:  # stdout carries the JSON document alone: progress and the table go to stderr
        console = Console(stderr=True, width=console.width if console.is_terminal else 140)
    if args.resume is not None:
        given = [a for a in _SEARCH_DEFINING
                 if (v := getattr(args, a, None)) is not None and v is not False and v != []]
        given += [a for a in ("finetune_per_class", "eval_per_class") if hasattr(args, a)]
        given += ["target"] if args.target else []
        if given:
            raise UsageError(f"--resume: continues with the run's stored options; drop "
                             f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        run_id = check_run_id(args.resume)
    else:
        opts = _search_options(args)
        devices = select_devices(args.fleet, args.devices)
        targets = device_targets(devices, parse_cli(args.target, args.max_accuracy_drop, args.targets,
                                                    min_agreement=args.min_agreement, min_snr_db=args.min_snr_db))
        run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    folder = search.run_dir(run_id, args.out)
    from host.search import data as search_data

    # the model and data opened and checked (and the targets against them) before the store records anything
    if args.resume is not None:
        _, opts, _, stored_targets = search.read_run(folder)   # a run folder that is not there fails here
        workload = search.open_resumed_workload(folder, opts)
        search_data.check_workload(workload, stored_targets)
    else:
        workload = search_data.open_search_workload(opts)
        search_data.check_workload(workload, targets)
    resume_hint = f"edgeprune search --resume {run_id}" + (f" --out {args.out}" if args.out is not None else "")
    executor = open_executor(args)          # a Ray cluster that cannot be reached fails before anything is recorded
    try:
        return _run_search(args, console, search, run_id, folder, opts, workload, resume_hint, executor,
                           None if args.resume is not None else (devices, targets))
    finally:
        executor.close()                    # outstanding builds cancelled (Ctrl-C too); the cluster keeps running


def _run_search(args: argparse.Namespace, console: Console, search: "object", run_id: str, folder: "object",
                opts: "object", workload: "object", resume_hint: str, executor: "object",
                new: "object") -> int:
    recorder = open_recorder(args, run_id, "search", resume=args.resume is not None,
                             seeds={"seed": opts.seed} if args.resume is None else None,  # type: ignore[attr-defined]
                             executor=executor)
    console.print(f"search run id: [bold]{run_id}[/] (continue an interrupted run with: {resume_hint})")
    console.print(f"[dim]results store: {recorder.store.name}[/]", highlight=False)
    with recorder, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True) as progress:
        host_task = progress.add_task("host: loading the model", total=None)
        tasks: Dict[str, object] = {}

        def task(dev_id: str) -> object:
            if dev_id not in tasks:
                tasks[dev_id] = progress.add_task(f"{dev_id}: waiting", total=None)
            return tasks[dev_id]

        def events(kind: str, dev_id: str, msg: str) -> None:
            if kind == "info":
                progress.console.print(f"[dim]{msg}[/]", highlight=False)
            elif not dev_id:
                progress.update(host_task, description=f"host: {msg}")  # type: ignore[arg-type]
            elif kind in ("eval", "device", "stage"):
                progress.update(task(dev_id), description=f"{dev_id}: {msg}")  # type: ignore[arg-type]
            elif kind in ("result", "cached"):
                progress.console.print(f"{dev_id}: {msg}", highlight=False)
            elif kind == "verdict":
                progress.update(task(dev_id), description=f"{dev_id}: done ({msg})")  # type: ignore[arg-type]

        try:
            if new is None:
                result = search.resume(run_id, out=args.out, events=events,  # type: ignore[attr-defined]
                                       recorder=recorder, workload=workload, executor=executor)
            else:
                devices, targets = new  # type: ignore[misc]
                result = search.start(opts, devices, targets, out=args.out, run_id=run_id,  # type: ignore
                                      events=events, recorder=recorder, workload=workload, executor=executor)
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"search interrupted; completed evaluations are in {folder / search.EVALUATIONS}; "
                          f"continue with: {resume_hint}")
            raise
    for r in result.devices:
        if r.rows:
            console.print(_candidates_table(r))
    console.print(_search_table(result))
    if any(r.accuracy_metric != "top1" for r in result.devices):
        console.print("accuracy: top-1 agreement (and SNR) with the dense model's outputs, measured by the agent on "
                      "the device; the eval data has no labels, or the targets are label-free")
    for r in result.devices:
        line = f"{r.device_id}: {r.reason}"
        if r.folder:
            line += f" → {folder / r.folder}"
        console.print(line, highlight=False)
        if _holdout_line(r):
            console.print(_holdout_line(r), highlight=False)
        if _final_line(r):
            console.print(_final_line(r), highlight=False)
    if any(row.get("emulated") for r in result.devices for row in r.rows):
        console.print(EMULATED_FOOTNOTE)
    if any((r.chosen or r.closest or {}).get("power_source") == "model" for r in result.devices):
        console.print("* power and energy of some devices are MODELLED (no power sensor there), not measured.")
    console.print(f"wrote {folder / 'summary.csv'}, per-device pareto.csv/json and {folder / search.EVALUATIONS}")
    if args.json:
        import json

        print(json.dumps(search.result_document(result), indent=1, sort_keys=True, default=str))
    return 0 if result.all_met else 1
