"""``edgeprune bench``, ``prune`` and ``sensitivity``: one artifact measured on many devices, one model pruned into
verified artifacts, and the per-group pruning sensitivity of a model.

Contract: parses the arguments, calls :mod:`host.commands.benchmark`, :mod:`host.commands.pruning` or
:mod:`edgeprune.sensitivity` with a progress display, and prints a table (or the ``--json`` document on stdout).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgeprune.errors import UsageError
from host.cli.common import (MODEL_HELP, data_source_args, db_argument, model_source_args, open_recorder,
                             per_class, ratio_list, select_devices, source_kwargs, stage_progress)
from host.fmt import EMULATED_FOOTNOTE, NA, field


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``bench``, ``ab``, ``prune`` and ``sensitivity`` to the ``edgeprune`` parser's subcommands."""
    b = sub.add_parser("bench", help="measure one artifact on the chosen devices in parallel, one row per device")
    b.add_argument("--model", required=True, help="reference model name (exported dense), a manifest or artifact "
                   "file, or a folder holding exactly one manifest (as `edgeprune prune --out` writes)")
    b.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    b.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
    b.add_argument("--threads", type=int, default=None, help="runtime threads (overrides each device's config)")
    b.add_argument("--run-id", default=None, help="record under this id (default: generated and printed)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default results/runs/<run id>)")
    b.add_argument("--quick", action="store_true", help="short timing windows")
    b.add_argument("--repeat", type=int, default=None, metavar="N",
                   help="repetitions per device, each a fresh runtime session with its own share of the timed window "
                   "(default 5: what `edgeprune regress` needs to decide over runs)")
    b.add_argument("--lease-wait", type=float, default=300.0, help="seconds to wait for a busy device's lease")
    db_argument(b)
    b.add_argument("--json", action="store_true", help="print one JSON document (per device: latency, metrics) on "
                   "stdout instead of the table")
    g = b.add_argument_group("data (default: the CIFAR-10 eval split)")
    g.add_argument("--data", default=None, metavar="PATH", help="score every sample of an image folder (one subfolder "
                   "per class), an .npz or MODULE:CALLABLE on the device, at the artifact's input size")
    g.add_argument("--reference", default=None, metavar="ARTIFACT", help="a dense model's artifact or manifest, run "
                   "here on the same data: its outputs ship with it and the device reports top-1 agreement, SNR and "
                   "max abs error against them (label-free fidelity)")
    g.add_argument("--resize", default=None, metavar="N", help="override the manifest's recorded resize")
    g.add_argument("--center-crop", default=None, metavar="H[xW]", help="override the manifest's recorded crop")
    g.add_argument("--mean", default=None, metavar="M,M,M", help="override the manifest's mean")
    g.add_argument("--std", default=None, metavar="S,S,S", help="override the manifest's std")

    b.set_defaults(handler=main_bench)

    ab = sub.add_parser("ab", help="A/B: two artifacts (or two runtime configurations) on one device, measured "
                        "alternately and judged over their repetitions")
    ab.add_argument("--a", required=True, metavar="ARTIFACT", help="A, the reference: a model name, manifest, "
                    "artifact or folder (as bench --model)")
    ab.add_argument("--b", default=None, metavar="ARTIFACT", help="B, the change (default: A again, with --b-option)")
    ab.add_argument("--b-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a runtime option for B only (repeatable), e.g. graph_optimization_level=basic")
    ab.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    ab.add_argument("--device", default=None, help="the device id from the fleet")
    ab.add_argument("--pairs", type=int, default=5, help="A/B rounds, order alternating AB, BA, ... (default 5)")
    ab.add_argument("--tolerance", default="5%", help="smallest slowdown of B worth failing for (default 5%%)")
    ab.add_argument("--alpha", default="0.01", help="significance over runs (default 0.01)")
    ab.add_argument("--threads", type=int, default=None, help="runtime threads (overrides the device's config)")
    ab.add_argument("--quick", action="store_true", help="short timing windows")
    ab.add_argument("--run-id", default=None, help="record under this id (default: generated and printed)")
    ab.add_argument("--out", type=Path, default=None, help="output folder (default results/runs/<run id>)")
    ab.add_argument("--lease-wait", type=float, default=300.0, help="seconds to wait for a busy device's lease")
    db_argument(ab)
    ab.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    ab.set_defaults(handler=main_ab)

    pr = sub.add_parser("prune", help="prune one model (channels and/or 2:4), recover it, export verified artifacts")
    pr.add_argument("--model", required=True, help=MODEL_HELP)
    pr.add_argument("--ratio", type=float, required=True, help="fraction of channels to remove, in [0, 1); 0 exports "
                    "the dense model unchanged")
    pr.add_argument("--out", type=Path, required=True, help="output folder for the plan, artifacts and manifests")
    pr.add_argument("--align", type=int, default=1, help="keep a multiple of N channels per pruned layer (e.g. 8)")
    pr.add_argument("--min-channels", type=int, default=1, help="never keep fewer channels than this per layer")
    pr.add_argument("--importance", default="l1", help="channel importance: l1, l2, bn_scale, taylor, random")
    pr.add_argument("--global", dest="global_ranking", action="store_true",
                    help="rank channels across all layers (non-uniform widths) instead of the same ratio per layer")
    pr.add_argument("--prune-residual", action="store_true",
                    help="option-A ResNets: also prune each stage's residual stream (default: inside blocks only)")
    pr.add_argument("--sparsity", default=None, help="also apply semi-structured sparsity: 2:4")
    pr.add_argument("--formats", default="onnx", help="comma-separated: onnx, openvino, openvino-fp16, tflite, "
                    "tflite-fp16, tflite-int8, edgetpu, tensorrt, torchscript")
    ft = pr.add_mutually_exclusive_group()
    ft.add_argument("--finetune-epochs", type=int, default=None, help="recovery fine-tune epochs on the finetune split")
    ft.add_argument("--finetune-minutes", type=float, default=None, help="recovery fine-tune wall-time bound")
    pr.add_argument("--finetune-per-class", type=per_class, default=None,
                    help="finetune-split images per class, or 'full' (default: full)")
    pr.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense model, 0..1")
    pr.add_argument("--no-recalibrate", action="store_true", help="skip BatchNorm recalibration")
    pr.add_argument("--eval-per-class", type=per_class, default=argparse.SUPPRESS,
                    help="torch top-1 check: 100 (the shipped 1,000 images, default) or 'full'")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--json", action="store_true", help="print one JSON document (MACs, params, artifacts, metrics) "
                    "on stdout instead of the table")
    model_source_args(pr)
    data_source_args(pr, eval_help="accuracy data (torch on the host; also the exports' check inputs)")
    pr.set_defaults(handler=main_prune)

    se = sub.add_parser("sensitivity", help="accuracy drop per layer group when only it is pruned (CSV + PNG)")
    se.add_argument("--model", required=True, help=MODEL_HELP)
    se.add_argument("--ratios", type=ratio_list, default=[0.25, 0.5, 0.75], help="ratios to try per group (default "
                    "0.25,0.5,0.75)")
    se.add_argument("--importance", default="l1", help="channel importance: l1, l2, bn_scale, taylor, random")
    se.add_argument("--align", type=int, default=1, help="keep a multiple of N channels per pruned layer")
    se.add_argument("--recalibrate", action="store_true", help="re-estimate BatchNorm statistics before each check")
    se.add_argument("--calib-per-class", type=int, default=100,
                    help="calib-split images per class (default 100: the shipped 1,000 images)")
    se.add_argument("--out", type=Path, required=True, help="output folder for sensitivity.csv and sensitivity.png")
    model_source_args(se)
    data_source_args(se, eval_help="data scored (a seeded part of it, at most 500 images, as calibration data)")
    se.set_defaults(handler=main_sensitivity)


def main_bench(args: argparse.Namespace, console: Console) -> int:
    from host.commands.benchmark import DEFAULT_REPEAT, check_inputs, run_bench
    from host.results.store import check_run_id, new_run_id

    devices = select_devices(args.fleet, args.devices)
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads: must be >= 1")
    run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    # the artifact (every file against its manifest, and that it is the model the manifest describes) and the eval
    # data, checked before the results store records a run: bad input leaves no trace there
    inputs = check_inputs(args.model, data_path=args.data, reference=args.reference, resize=args.resize,
                          center_crop=args.center_crop, mean=args.mean, std=args.std)
    if args.json:  # stdout carries the JSON document alone
        console = Console(stderr=True)
    recorder = open_recorder(args, run_id, "bench")
    console.print(f"run id: [bold]{run_id}[/] (results store {recorder.store.name})")
    with recorder, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                            transient=True) as progress:
        tasks = {d.id: progress.add_task(f"{d.id}: waiting") for d in devices}

        def events(dev_id: str, kind: str, msg: str) -> None:
            progress.update(tasks[dev_id], description=f"{dev_id}: {msg}")
            if kind in ("retry", "done"):
                progress.console.print(f"{dev_id}: {msg}", highlight=False)

        result = run_bench(args.model, devices, out=args.out, run_id=run_id, threads=args.threads, quick=args.quick,
                           repeat=DEFAULT_REPEAT if args.repeat is None else args.repeat,
                           events=events, lease_wait_s=args.lease_wait, recorder=recorder, inputs=inputs)
        recorder.summary = {"rows": result.rows}
    if args.json:
        import json

        print(json.dumps({"run_id": result.run_id, "model": args.model, "out": str(result.out),
                          "artifact": str(inputs.artifact[0]) if inputs.artifact else args.model,
                          "devices": result.rows}, indent=1, default=str))
        return 0 if all(o.ok for o in result.outcomes) else 1
    print_rows(result.rows, console, title=f"edgeprune bench {args.model} — run {result.run_id}")
    console.print(f"run {result.run_id}: wrote {result.out / 'summary.csv'}")
    return 0 if all(o.ok for o in result.outcomes) else 1


def print_rows(rows: List[Dict[str, Any]], console: Console, title: str = "edgeprune bench") -> None:
    """The bench table of ``rows`` (:data:`host.commands.benchmark.COLUMNS`), with its notes: modelled power
    (``*``) and an emulated device's timings and power (``†``) are marked."""
    table = Table(title=title)
    for col in ("device", "runtime", "threads", "p50 ms", "p90 ms", "top-1", "agree", "power W", "mJ/inf", "status"):
        table.add_column(col, justify="left" if col in ("device", "runtime", "status") else "right")
    for r in rows:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/] {r['error']}"
        emu = "†" if r.get("emulated") else ""
        table.add_row(str(r["device"]), str(r["runtime"]), str(r["threads"]), field(r, "latency_p50_ms", ".3f") + emu,
                      field(r, "latency_p90_ms", ".3f") + emu, field(r, "accuracy_top1", ".2%"),
                      field(r, "agreement", ".1%"),
                      field(r, "power_w", ".2f") + ("*" if r.get("power_source") == "model" else "") + emu,
                      field(r, "energy_mj", ".3f") + emu, status)
    console.print(table)
    if any(r.get("emulated") for r in rows):
        console.print(EMULATED_FOOTNOTE)
    if any(r.get("power_source") == "model" for r in rows):
        console.print("* modelled power (no sensor on that device), not a measurement.")


def main_ab(args: argparse.Namespace, console: Console) -> int:
    from host.commands.ab import run_ab
    from host.results.regress import parse_alpha, parse_percent
    from host.results.store import check_run_id, new_run_id

    devices = select_devices(args.fleet, args.device)
    if len(devices) != 1:
        raise UsageError(f"--device: A/B runs on one device; the fleet has {len(devices)} (name one with --device)")
    dev = devices[0]
    b_dev = dev
    if args.b_option:
        opts = dict(dev.runtime.options or {})
        for item in args.b_option:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--b-option: expected KEY=VALUE, got {item!r}")
            opts[key] = _scalar(value)
        b_dev = dev.model_copy(update={"runtime": dev.runtime.model_copy(update={"options": opts})})
    tol = parse_percent(args.tolerance, "--tolerance")
    alpha = parse_alpha(args.alpha)
    run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    out = args.out if args.out is not None else Path("results") / "runs" / run_id
    err = Console(stderr=True) if args.json else console
    recorder = open_recorder(args, run_id, "ab")
    err.print(f"run id: [bold]{run_id}[/] (results store {recorder.store.name})")
    with recorder:
        res = run_ab(args.a, args.b or args.a, dev, b_device=b_dev, pairs=args.pairs, tol=tol, alpha=alpha,
                     quick=args.quick, threads=args.threads, run_id=run_id, out=out, recorder=recorder,
                     lease_wait_s=args.lease_wait)
        recorder.summary = res.to_dict()
    doc = res.to_dict()
    if args.json:
        import json

        print(json.dumps(doc, indent=1, default=str))
        return res.exit_code
    table = Table(title=f"edgeprune ab on {res.device_id} — run {run_id} ({' '.join(res.order)})")
    for col in ("side", "artifact", "runtime options", "p50 ms (median of runs)", "run medians ms"):
        table.add_column(col, justify="right" if "ms" in col else "left")
    for side, d in (("A", res.a), ("B", res.b)):
        table.add_row(side, Path(d["artifact"]).name, ", ".join(f"{k}={v}" for k, v in d["options"].items()) or NA,
                      f"{d['p50_ms']:.4f}", " ".join(f"{x:.4f}" for x in d["run_medians_ms"]))
    console.print(table)
    colour = {"regression": "red", "inconclusive": "yellow", "improved": "cyan"}.get(res.verdict, "green")
    eff = doc["effect"]
    ci = doc["ci"]
    console.print(f"B vs A: {eff:+.1%}" + (f" (95% CI over runs {ci[0] - 1:+.1%}…{ci[1] - 1:+.1%})" if ci else "")
                  + f"; [{colour}]{res.verdict.upper()}[/]: {res.decision.rule}", highlight=False)
    return res.exit_code


def _scalar(text: str) -> object:
    """A --b-option value: an int, a float, true/false, or the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main_prune(args: argparse.Namespace, console: Console) -> int:
    from host.commands.pruning import PruneOptions, run_prune

    kw = dict(model=args.model, out=args.out, ratio=args.ratio, align=args.align, min_channels=args.min_channels,
              importance=args.importance, global_ranking=args.global_ranking, sparsity=args.sparsity,
              prune_residual=args.prune_residual,
              formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
              finetune_epochs=args.finetune_epochs, finetune_minutes=args.finetune_minutes,
              finetune_per_class=args.finetune_per_class, distill=args.distill,
              recalibrate=not args.no_recalibrate, seed=args.seed, **source_kwargs(args))
    if hasattr(args, "eval_per_class"):
        kw["eval_per_class"] = args.eval_per_class
    opts = PruneOptions(**kw)
    if args.json:  # stdout carries the JSON document alone: progress goes to stderr
        console = Console(stderr=True)
    with stage_progress(console) as progress:
        step = progress.add_task("", total=None)

        def events(kind: str, msg: str, done: Optional[int], total: Optional[int]) -> None:
            if kind == "info":
                progress.console.print(f"[dim]{msg}[/]")
            elif kind in ("stage", "progress"):
                progress.update(step, description=msg, completed=done or 0, total=total)
            elif kind == "built":
                progress.console.print(f"[green]verified[/] {msg}")

        res = run_prune(opts, events)
    if args.json:
        from host.commands.pruning import outcome_json

        print(outcome_json(res))
        return 0
    table = Table(title=f"edgeprune prune {res.tag}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("MMACs", f"{res.macs_before / 1e6:.2f}", f"{res.macs_after / 1e6:.2f} ({res.macs_reduction:.2f}× fewer)")
    table.add_row("params", f"{res.params_before:,}", f"{res.params_after:,}")
    if res.top1_dense is not None:
        table.add_row(f"torch top-1 ({res.eval_split}, n={res.eval_n})", f"{res.top1_dense:.2%}",
                      f"{res.top1_pruned:.2%}" if res.top1_pruned is not None else NA)
    agreement = res.metrics_pruned.get("agreement")
    if agreement is not None and res.macs_after != res.macs_before:
        table.add_row(f"torch agreement with dense (n={res.eval_n})", "100.00%", f"{agreement:.2%}")
        table.add_row("torch SNR vs dense", "", f"{res.metrics_pruned['snr_db']:.1f} dB")
    console.print(table)
    for note in res.notes:
        if note.startswith("no --data"):
            console.print(f"[yellow]{note}[/]")
    if res.sparsity:
        console.print(f"2:4 sparsity: {res.sparsity}")
    if res.skipped:
        console.print(f"left whole ({len(res.skipped)} group(s); reasons in prune.json 'skipped'):")
        for layer, why in list(res.skipped.items())[:8]:
            console.print(f"  {layer}: {why}", highlight=False)
        if len(res.skipped) > 8:
            console.print(f"  … and {len(res.skipped) - 8} more")
    console.print(f"recovery: {res.recovery.get('kind')}")
    for a in res.artifacts:
        v = a["verification"]
        console.print(f"{a['format']:>13}: {res.out / a['file']}  (max abs err {v['max_abs_err']:.2g}, "
                      f"top-1 agreement {v['top1_agreement']:.1%} on {v['n']} images)")
    console.print(f"wrote {res.out / 'plan.json'} and {res.out / 'prune.json'} in {res.seconds:.0f} s")
    return 0


def main_sensitivity(args: argparse.Namespace, console: Console) -> int:
    from edgeprune import data, sensitivity

    if args.align < 1:
        raise UsageError("--align: must be >= 1")
    if args.calib_per_class < 1:
        raise UsageError("--calib-per-class: must be >= 1")
    from edgeprune.workload import DataOptions, open_workload
    from edgeprune.sources import ModelSpec

    kw = source_kwargs(args)
    spec_kw = {k: kw.pop(k) for k in ("model_args", "weights", "trust_pickle", "input_shape", "ignore_layers")}
    wl = open_workload(ModelSpec.of(argparse.Namespace(model=args.model, **spec_kw)), DataOptions(**kw))
    name, model = wl.model.name, wl.model.model
    metric = "top1"
    if wl.reference_path:
        cal = data.calib_split(args.calib_per_class)
    else:
        cal = wl.calib()
        if cal is None:
            raise UsageError("sensitivity: needs data to score on: give --data (or --calib-data)")
        if (cal.labels < 0).any():   # unlabelled: the drop in top-1 agreement with the dense model's own outputs
            metric = "agreement"

    with stage_progress(console) as progress:
        task = progress.add_task("sensitivity", total=None)
        df = sensitivity.analyse(model, cal, wl.example, ratios=args.ratios, metric=metric,
                                 extra_ignored=wl.model.ignored_modules(),
                                 importance=args.importance, round_to=args.align, recalibrate=args.recalibrate,
                                 progress=lambda d, t, what: progress.update(task, description=what, completed=d,
                                                                             total=t))
    args.out.mkdir(parents=True, exist_ok=True)
    from host.files import write_text_atomic

    csv_path = args.out / "sensitivity.csv"
    write_text_atomic(csv_path, df.to_csv(index=False, float_format="%.6g"))
    png = sensitivity.plot(df, args.out / "sensitivity.png", title=f"{name}: pruning sensitivity ({args.importance})")
    worst = df.sort_values("drop_pp", ascending=False).head(5)
    what = "top-1" if metric == "top1" else "agreement with dense (unlabelled data)"
    table = Table(title=f"{name}: most sensitive groups (dense {what} {df.attrs['dense_top1']:.2%} on "
                        f"{df.attrs['split']}, n={df.attrs['n']})")
    for col in ("group", "channels", "ratio", "kept", "top-1", "drop pp"):
        table.add_column(col, justify="left" if col == "group" else "right")
    for r in worst.itertuples():
        table.add_row(r.group, str(r.channels), f"{r.ratio:g}", str(r.kept), f"{r.top1:.2%}", f"{r.drop_pp:.2f}")
    console.print(table)
    console.print(f"wrote {csv_path} and {png}")
    return 0
