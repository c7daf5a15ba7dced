"""The ``edgeprune`` command line. The only place that prints or chooses an exit code.

Exit codes: 0 success; 1 the work ran but something failed (a device job, an export); 2 bad input
(the message names the argument, file or field); 130 interrupted.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import agent
from edgeprune.errors import EdgepruneError, UsageError

if TYPE_CHECKING:
    from host.fleet.devices import DeviceConfig

VERSION = agent.__version__  # the one version string (pyproject.toml reads it too)


def _ratios(text: str) -> List[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), got {text!r}") from None


def _per_class(text: str) -> Optional[int]:
    if text == "full":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'full', got {text!r}") from None


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="URL",
                   help="results store: sqlite:///FILE, a file path or postgresql://USER@HOST/DB "
                        "(default: $EDGEPRUNE_DB, else results/edgeprune.db)")


MODEL_HELP = ("the model: a built-in name (resnet20 … resnet56, tv_resnet18, tv_mobilenet_v2, …), MODULE:CALLABLE "
              "(mypkg.nets:build or models/net.py:build), a checkpoint file, or a model file (.yaml)")


def _model_source_args(p: argparse.ArgumentParser) -> None:
    """The model-source flags every command with --model takes (see edgeprune.sources)."""
    g = p.add_argument_group("model source")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for a MODULE:CALLABLE or built-in factory (value parsed as a YAML scalar); "
                        "repeatable")
    g.add_argument("--weights", default=None, metavar="FILE", help="state dict or checkpoint (torch zip/legacy, or "
                   "safetensors; detected from the content) loaded strictly; 'module.' prefixes are stripped")
    g.add_argument("--trust-pickle", action="store_true", help="allow a whole pickled model (torch.save(model)): "
                   "unpickling runs code from the file")
    g.add_argument("--input-size", default=None, metavar="H[xW]", help="model input size, 3 channels (default: the "
                   "model file's, 32 for the CIFAR ResNets, 224 otherwise)")
    g.add_argument("--input-shape", default=None, metavar="N,C,H,W", help="model input shape (alternative to "
                   "--input-size)")
    g.add_argument("--ignore-layers", default=None, metavar="GLOB,...", help="layers kept whole in addition to the "
                   "inferred ones (the first conv, every layer producing a model output), e.g. 'head.*,features.0'")


def _data_source_args(p: argparse.ArgumentParser, *, eval_help: str = "eval data") -> None:
    """The data flags every command with --data takes (see edgeprune.workload and edgeprune.datasets)."""
    g = p.add_argument_group("data (default: CIFAR-10 for the reference models, none otherwise)")
    g.add_argument("--data", default=None, metavar="PATH", help=f"{eval_help}: an image folder (one subfolder per "
                   "class), an .npz (images or inputs, labels optional) or MODULE:CALLABLE returning a torch Dataset")
    g.add_argument("--calib-data", default=None, metavar="PATH", help="BatchNorm recalibration and int8 calibration "
                   "data (default: the fine-tune data, else a seeded part of --data kept out of eval)")
    g.add_argument("--finetune-data", default=None, metavar="PATH", help="labelled recovery data (same classes as "
                   "--data)")
    g.add_argument("--resize", default=None, metavar="N", help="resize images' shorter side to N pixels on the host "
                   "(default: round(max(H, W) / 0.875), 256 for 224; 'none': no resize). An image that already has "
                   "the input size is neither resized nor cropped")
    g.add_argument("--center-crop", default=None, metavar="H[xW]", help="centre crop (default: the input size)")
    g.add_argument("--mean", default=None, metavar="M,M,M", help="per-channel mean after scaling pixels to 0..1 "
                   "(default: ImageNet 0.485,0.456,0.406)")
    g.add_argument("--std", default=None, metavar="S,S,S", help="per-channel std (default: ImageNet "
                   "0.229,0.224,0.225)")


def _source_kwargs(args: argparse.Namespace) -> Dict[str, object]:
    """Parsed model-source and data flags, as option-class keyword arguments (only those the command has)."""
    from edgeprune import sources

    kw: Dict[str, object] = {}
    if hasattr(args, "model_arg"):
        kw.update(model_args=sources.parse_model_args(args.model_arg), weights=args.weights,
                  trust_pickle=args.trust_pickle,
                  input_shape=sources.parse_input_shape(args.input_size, args.input_shape),
                  ignore_layers=tuple(x.strip() for x in (args.ignore_layers or "").split(",") if x.strip()))
    for name in ("data", "calib_data", "finetune_data", "resize", "center_crop", "mean", "std"):
        if hasattr(args, name):
            kw[name] = getattr(args, name)
    return kw


def _recorder(args: argparse.Namespace, run_id: str, kind: str, *, resume: bool = False,
              seeds: Optional[Dict[str, object]] = None) -> "object":
    """The results store's recorder for this command's run (opened before any work: a bad --db fails first)."""
    from host.results.provenance import host_provenance
    from host.results.store import RunRecorder, Store

    store = Store(args.db)
    return RunRecorder(store, run_id, kind, command=list(sys.argv), resume=resume,
                       provenance=host_provenance(seeds=seeds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeprune", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgeprune {VERSION}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="prune, export and measure a reference model on the local device")
    d.add_argument("--model", default="resnet20", help=MODEL_HELP + "; default resnet20 (bundled with CIFAR-10 "
                   "test images; resnet32/44/56 need EDGEPRUNE_DATA)")
    d.add_argument("--ratios", type=_ratios, default=None, help="channel pruning ratios, e.g. 0,0.3,0.5,0.7")
    d.add_argument("--out", type=Path, default=Path("results/demo"), help="output folder (default results/demo)")
    d.add_argument("--device", default=None, help="device config YAML (default: the built-in local device)")
    d.add_argument("--quick", action="store_true", help="small eval split, short recovery and timing (< 3 min)")
    d.add_argument("--no-recovery", action="store_true", help="skip BN recalibration and fine-tuning")
    d.add_argument("--finetune-epochs", type=int, default=None)
    d.add_argument("--finetune-seconds", type=float, default=None, help="wall-time bound per candidate")
    d.add_argument("--finetune-per-class", type=_per_class, default=argparse.SUPPRESS, help="images per class, or 'full'")
    d.add_argument("--eval-per-class", type=_per_class, default=argparse.SUPPRESS,
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
    _db_arg(d)
    _model_source_args(d)
    _data_source_args(d, eval_help="eval data the agent scores (the dense model's outputs ship with it)")
    b = sub.add_parser("bench", help="measure one artifact on the chosen devices in parallel, one row per device")
    b.add_argument("--model", required=True, help="reference model name (exported dense), a manifest or artifact "
                   "file, or a folder holding exactly one manifest (as `edgeprune prune --out` writes)")
    b.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    b.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
    b.add_argument("--threads", type=int, default=None, help="runtime threads (overrides each device's config)")
    b.add_argument("--run-id", default=None, help="record under this id (default: generated and printed)")
    b.add_argument("--out", type=Path, default=None, help="output folder (default results/runs/<run id>)")
    b.add_argument("--quick", action="store_true", help="short timing windows")
    b.add_argument("--lease-wait", type=float, default=300.0, help="seconds to wait for a busy device's lease")
    _db_arg(b)
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
    pr.add_argument("--finetune-per-class", type=_per_class, default=None,
                    help="finetune-split images per class, or 'full' (default: full)")
    pr.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the dense model, 0..1")
    pr.add_argument("--no-recalibrate", action="store_true", help="skip BatchNorm recalibration")
    pr.add_argument("--eval-per-class", type=_per_class, default=argparse.SUPPRESS,
                    help="torch top-1 check: 100 (the shipped 1,000 images, default) or 'full'")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--json", action="store_true", help="print one JSON document (MACs, params, artifacts, metrics) "
                    "on stdout instead of the table")
    _model_source_args(pr)
    _data_source_args(pr, eval_help="accuracy data (torch on the host; also the exports' check inputs)")

    se = sub.add_parser("sensitivity", help="accuracy drop per layer group when only it is pruned (CSV + PNG)")
    se.add_argument("--model", required=True, help=MODEL_HELP)
    se.add_argument("--ratios", type=_ratios, default=[0.25, 0.5, 0.75], help="ratios to try per group (default "
                    "0.25,0.5,0.75)")
    se.add_argument("--importance", default="l1", help="channel importance: l1, l2, bn_scale, taylor, random")
    se.add_argument("--align", type=int, default=1, help="keep a multiple of N channels per pruned layer")
    se.add_argument("--recalibrate", action="store_true", help="re-estimate BatchNorm statistics before each check")
    se.add_argument("--calib-per-class", type=int, default=100,
                    help="calib-split images per class (default 100: the shipped 1,000 images)")
    se.add_argument("--out", type=Path, required=True, help="output folder for sensitivity.csv and sensitivity.png")
    _model_source_args(se)
    _data_source_args(se, eval_help="data scored (a seeded part of it, at most 500 images, as calibration data)")

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
    _db_arg(sr)
    sr.add_argument("--quick", action="store_true", default=None, help="short timing windows on the devices")
    sr.add_argument("--allocation", default=None, help="global ratio -> per-group ratios: sensitivity (default) or "
                                                       "uniform")
    sr.add_argument("--importance", default=None, help="channel importance: l1 (default), l2, bn_scale, taylor")
    sr.add_argument("--prune-residual", action="store_true", default=None,
                    help="option-A ResNets: also prune each stage's residual stream")
    sr.add_argument("--max-ratio", type=float, default=None, help="no group loses more than this fraction (0.9)")
    sr.add_argument("--finetune-epochs", type=int, default=None, help="recovery fine-tune epochs per candidate "
                                                                      "(default 1; 0: BN recalibration only)")
    sr.add_argument("--finetune-per-class", type=_per_class, default=argparse.SUPPRESS,
                    help="finetune-split images per class for recovery (default 500), or 'full'")
    sr.add_argument("--finetune-seconds", type=float, default=None, help="wall-time cap per recovery fine-tune")
    sr.add_argument("--distill", type=float, default=None, help="recovery: weight of distillation from the dense "
                                                                "model, 0..1 (default 0)")
    sr.add_argument("--eval-per-class", type=_per_class, default=argparse.SUPPRESS,
                    help="eval images per class the agent scores (default 100: the shipped 1,000)")
    sr.add_argument("--probe-recovery", default=None, help="bisect: recovery of the candidates it searches with: "
                                                           "full (default), short or none; then the chosen one again "
                                                           "with full recovery")
    sr.add_argument("--netadapt-max-proposals", type=int, default=None,
                    help="netadapt: proposals per iteration (default: one per group)")
    sr.add_argument("--cache-dir", type=Path, default=None, help="sensitivity and layer-latency tables "
                                                                 "(default results/search/cache)")
    sr.add_argument("--lease-wait", type=float, default=None, help="seconds to wait for a busy device's lease")
    sr.add_argument("--seed", type=int, default=None)
    _model_source_args(sr)
    _data_source_args(sr, eval_help="eval data the agent scores (the dense model's outputs ship with it; without "
                      "labels use --min-agreement / --min-snr-db)")

    from host.results import regress

    from host.results import report

    from host.results import frames as results
    results.register(sub)
    report.register(sub)
    regress.register(sub)
    dv = sub.add_parser("devices", help="the fleet: list it, or check each device's health")
    dv.add_argument("action", choices=["list", "check"])
    dv.add_argument("--fleet", default=None, help="fleet YAML or folder of device files (default: the local device)")
    dv.add_argument("--devices", default=None, help="comma-separated device ids from the fleet")
    dv.add_argument("--json", action="store_true", help="print JSON")
    return p


def _select(fleet: Optional[str], ids: Optional[str], *, connect: bool = True) -> "List[DeviceConfig]":
    """The chosen devices. ``connect``: the command will reach them, so the local files their configs name (an
    SSH key, known_hosts) are checked now, before anything is recorded or built."""
    from host.fleet.devices import check_local_files, load_fleet, local_device

    devices = load_fleet(fleet) if fleet else [local_device()]
    if ids:
        wanted = [i.strip() for i in ids.split(",") if i.strip()]
        known = {d.id: d for d in devices}
        missing = [i for i in wanted if i not in known]
        if missing:
            raise UsageError(f"--devices: {', '.join(missing)} not in the fleet (has: {', '.join(known)})")
        devices = [known[i] for i in wanted]
    if connect:
        for d in devices:
            check_local_files(d)
    return devices


def _bench(args: argparse.Namespace, console: Console) -> int:
    from host.commands.benchmark import check_inputs, run_bench
    from host.results.store import check_run_id, new_run_id

    devices = _select(args.fleet, args.devices)
    if args.threads is not None and args.threads < 1:
        raise UsageError("--threads: must be >= 1")
    run_id = check_run_id(args.run_id) if args.run_id is not None else new_run_id()
    # the artifact (every file against its manifest, and that it is the model the manifest describes) and the eval
    # data, checked before the results store records a run: bad input leaves no trace there
    inputs = check_inputs(args.model, data_path=args.data, reference=args.reference, resize=args.resize,
                          center_crop=args.center_crop, mean=args.mean, std=args.std)
    if args.json:  # stdout carries the JSON document alone
        console = Console(stderr=True)
    recorder = _recorder(args, run_id, "bench")
    console.print(f"run id: [bold]{run_id}[/] (results store {recorder.store.name})")
    with recorder, Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                            transient=True) as progress:
        tasks = {d.id: progress.add_task(f"{d.id}: waiting") for d in devices}

        def events(dev_id: str, kind: str, msg: str) -> None:
            progress.update(tasks[dev_id], description=f"{dev_id}: {msg}")
            if kind in ("retry", "done"):
                progress.console.print(f"{dev_id}: {msg}", highlight=False)

        result = run_bench(args.model, devices, out=args.out, run_id=run_id, threads=args.threads, quick=args.quick,
                           events=events, lease_wait_s=args.lease_wait, recorder=recorder, inputs=inputs)
        recorder.summary = {"rows": result.rows}
    if args.json:
        import json

        print(json.dumps({"run_id": result.run_id, "model": args.model, "out": str(result.out),
                          "artifact": str(inputs.artifact[0]) if inputs.artifact else args.model,
                          "devices": result.rows}, indent=1, default=str))
        return 0 if all(o.ok for o in result.outcomes) else 1
    table = Table(title=f"edgeprune bench {args.model} — run {result.run_id}")
    for col in ("device", "runtime", "threads", "p50 ms", "p90 ms", "top-1", "agree", "power W", "mJ/inf", "status"):
        table.add_column(col, justify="left" if col in ("device", "runtime", "status") else "right")
    for r in result.rows:
        status = "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/] {r['error']}"
        table.add_row(str(r["device"]), str(r["runtime"]), str(r["threads"]), _fmt(r, "latency_p50_ms", ".3f"),
                      _fmt(r, "latency_p90_ms", ".3f"), _fmt(r, "accuracy_top1", ".2%"),
                      _fmt(r, "agreement", ".1%"), _fmt(r, "power_w", ".2f") + ("*" if r.get("power_source") == "model" else ""),
                      _fmt(r, "energy_mj", ".3f"), status)
    console.print(table)
    if any(r.get("power_source") == "model" for r in result.rows):
        console.print("* modelled power (no sensor on that device), not a measurement.")
    console.print(f"run {result.run_id}: wrote {result.out / 'summary.csv'}")
    return 0 if all(o.ok for o in result.outcomes) else 1


def _devices(args: argparse.Namespace, console: Console) -> int:
    import json

    from host.fleet import state
    from host.fleet.health import check_devices

    devices = _select(args.fleet, args.devices, connect=args.action == "check")
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
            addr = f"{d.ssh.user}@{d.ssh.host}:{d.ssh.port}" if d.ssh else "—"
            colour = {"good": "green", "bad": "red"}.get(r["health"], "yellow")
            table.add_row(d.id, d.device_class, d.transport, addr, d.runtime.name, f"[{colour}]{r['health']}[/]",
                          str(r.get("checked_at") or "never"), str(det.get("lease") or "free"),
                          str(det.get("error") or det.get("summary") or ""))
        console.print(table)
    return 0 if all(r["health"] == "good" for r in results.values()) or args.action == "list" else 1


def _fmt(row: Dict[str, object], key: str, fmt: str) -> str:
    v = row.get(key)
    return format(v, fmt) if isinstance(v, (int, float)) else "—"


def _demo_table(rows: List[Dict[str, object]], title: str) -> Table:
    table = Table(title=title)
    for col in ("ratio", "MMACs", "params", "p50 ms", "p90 ms", "speed-up", "top-1", "agree", "power W", "mJ/inf"):
        table.add_column(col, justify="right")
    table.add_column("recovery")
    table.add_column("status")
    dense = next((r.get("latency_p50_ms") for r in rows if r.get("ratio") == 0.0), None)
    for r in rows:
        p50 = r.get("latency_p50_ms")
        speedup = f"{dense / p50:.2f}×" if isinstance(dense, float) and isinstance(p50, float) and p50 > 0 else "—"
        table.add_row(_fmt(r, "ratio", ".0%"), f"{int(str(r['macs'])) / 1e6:.1f}", f"{int(str(r['params'])):,}",
                      _fmt(r, "latency_p50_ms", ".3f"), _fmt(r, "latency_p90_ms", ".3f"), speedup,
                      _fmt(r, "accuracy_top1", ".2%"), _fmt(r, "agreement", ".1%"),
                      _fmt(r, "power_w", ".2f") + ("*" if r.get("power_source") == "model" else ""),
                      _fmt(r, "energy_mj", ".3f"), str(r["recovery"]),
                      "[green]ok[/]" if r["status"] == "ok" else f"[red]{r['status']}[/]")
    return table


def _demo(args: argparse.Namespace, console: Console) -> int:
    from host.commands.demo import DemoOptions, run_demo
    from host.fleet.devices import resolve_device

    device = resolve_device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError("--threads: must be >= 1")
        device = device.model_copy(update={"runtime": device.runtime.model_copy(update={"threads": args.threads})})
    if args.round_to is not None:
        if args.round_to < 1:
            raise UsageError("--round-to: must be >= 1")
        device = device.model_copy(update={"round_to": args.round_to})
    kw = dict(model=args.model, out=args.out, recovery=not args.no_recovery, seed=args.seed, device=device,
              lease_wait_s=args.lease_wait, **_source_kwargs(args))
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
    recorder = _recorder(args, run_id, "demo", seeds={"seed": opts.seed})
    console.print(f"run id: [bold]{run_id}[/] (results store {recorder.store.name})")

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

        result = run_demo(opts, events, recorder=recorder, workload=workload)
        recorder.summary = {"rows": result.rows, "failures": result.failures}

    console.print(_demo_table(result.rows, f"edgeprune demo — {workload.model.name} on device '{device.id}' "
                                           f"(onnxruntime, {device.runtime.threads} thread(s))"))
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
    console.print(f"run {run_id} recorded in {recorder.store.name}: edgeprune report {run_id}")
    return 1 if result.failures else 0


def _stage_progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console, transient=True)


def _prune(args: argparse.Namespace, console: Console) -> int:
    from host.commands.pruning import PruneOptions, run_prune

    kw = dict(model=args.model, out=args.out, ratio=args.ratio, align=args.align, min_channels=args.min_channels,
              importance=args.importance, global_ranking=args.global_ranking, sparsity=args.sparsity,
              prune_residual=args.prune_residual,
              formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
              finetune_epochs=args.finetune_epochs, finetune_minutes=args.finetune_minutes,
              finetune_per_class=args.finetune_per_class, distill=args.distill,
              recalibrate=not args.no_recalibrate, seed=args.seed, **_source_kwargs(args))
    if hasattr(args, "eval_per_class"):
        kw["eval_per_class"] = args.eval_per_class
    opts = PruneOptions(**kw)
    if args.json:  # stdout carries the JSON document alone: progress goes to stderr
        console = Console(stderr=True)
    with _stage_progress(console) as progress:
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
                      f"{res.top1_pruned:.2%}" if res.top1_pruned is not None else "—")
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


def _sensitivity(args: argparse.Namespace, console: Console) -> int:
    from edgeprune import data, sensitivity

    if args.align < 1:
        raise UsageError("--align: must be >= 1")
    if args.calib_per_class < 1:
        raise UsageError("--calib-per-class: must be >= 1")
    from edgeprune.workload import DataOptions, open_workload
    from edgeprune.sources import ModelSpec

    kw = _source_kwargs(args)
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

    with _stage_progress(console) as progress:
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


# options that define a search: given with --resume they would silently differ from the stored ones
_SEARCH_DEFINING = ("model", "fleet", "devices", "targets", "max_accuracy_drop", "algo", "max_evals", "run_id",
                    "quick", "allocation", "importance", "prune_residual", "max_ratio", "probe_recovery",
                    "finetune_epochs",
                    "finetune_seconds", "distill", "netadapt_max_proposals", "cache_dir", "lease_wait", "seed",
                    "min_agreement", "min_snr_db", "model_arg", "weights", "trust_pickle", "input_size",
                    "input_shape", "ignore_layers", "data", "calib_data", "finetune_data", "resize", "center_crop",
                    "mean", "std")


def _search_options(args: argparse.Namespace) -> "object":
    from host.search.run import SearchOptions
    from host.search.algos import AlgoOptions

    if not args.model:
        raise UsageError("--model: required (or --resume RUN_ID)")
    opts = SearchOptions(model=args.model, **_source_kwargs(args))
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
                            else f"{METRICS[m].label}: —")
        drop = pick.get("drop_pp")
        evals = f"{r.device_evals}" + (f" (+{r.host_evals} host, {r.lut_jobs} layer)" if r.host_evals or r.lut_jobs
                                       else "")
        colour = {"met": "green", "infeasible": "yellow"}.get(r.verdict, "red")
        verdict = f"[{colour}]{r.verdict}[/]" + ("" if r.verdict == "met" else " (closest shown)" if pick else "")
        acc = f"{drop:.2f} pp" if isinstance(drop, (int, float)) else "—"
        if acc_col != "top-1 drop":   # label which metric each device was judged by
            agree, snr = pick.get("agreement"), pick.get("snr_db")
            parts = [f"top-1 drop {acc}"] if r.accuracy_metric == "top1" else []
            parts += [f"agreement {agree:.2%}"] if isinstance(agree, (int, float)) else []
            parts += [f"SNR {snr:.1f} dB"] if isinstance(snr, (int, float)) else []
            acc = "\n".join(parts) or "—"
        table.add_row(r.device_id, r.targets, "\n".join(achieved) or "—", acc, evals, verdict)
    return table


def _search(args: argparse.Namespace, console: Console) -> int:
    from host.search import run as search
    from host.results.store import check_run_id, new_run_id
    from host.fleet.targets import device_targets, parse_cli

    if args.json:  # stdout carries the JSON document alone: progress and the table go to stderr
        console = Console(stderr=True, width=console.width if console.is_terminal else 140)
    if args.resume is not None:
        given = [a for a in _SEARCH_DEFINING if getattr(args, a, None) not in (None, False, [])]
        given += [a for a in ("finetune_per_class", "eval_per_class") if hasattr(args, a)]
        given += ["target"] if args.target else []
        if given:
            raise UsageError(f"--resume: continues with the run's stored options; drop "
                             f"{', '.join('--' + g.replace('_', '-') for g in given)}")
        run_id = check_run_id(args.resume)
    else:
        opts = _search_options(args)
        devices = _select(args.fleet, args.devices)
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
    recorder = _recorder(args, run_id, "search", resume=args.resume is not None,
                         seeds={"seed": opts.seed} if args.resume is None else None)
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
            if args.resume is not None:
                result = search.resume(run_id, out=args.out, events=events, recorder=recorder, workload=workload)
            else:
                result = search.start(opts, devices, targets, out=args.out, run_id=run_id,  # type: ignore[arg-type]
                                      events=events, recorder=recorder, workload=workload)
        except KeyboardInterrupt:
            progress.stop()
            console.print(f"search interrupted; completed evaluations are in {folder / search.EVALUATIONS}; "
                          f"continue with: {resume_hint}")
            raise
    console.print(_search_table(result))
    if any(r.accuracy_metric != "top1" for r in result.devices):
        console.print("accuracy: top-1 agreement (and SNR) with the dense model's outputs, measured by the agent on "
                      "the device; the eval data has no labels, or the targets are label-free")
    for r in result.devices:
        line = f"{r.device_id}: {r.reason}"
        if r.folder:
            line += f" → {folder / r.folder}"
        console.print(line, highlight=False)
    if any((r.chosen or r.closest or {}).get("power_source") == "model" for r in result.devices):
        console.print("* power and energy of some devices are MODELLED (no power sensor there), not measured.")
    console.print(f"wrote {folder / 'summary.csv'}, per-device pareto.csv/json and {folder / search.EVALUATIONS}")
    if args.json:
        import json

        print(json.dumps(search.result_document(result), indent=1, sort_keys=True, default=str))
    return 0 if result.all_met else 1


def _one_line(e: BaseException) -> str:
    """An error message as printed: one line (a YAML snippet, a database's or a library's multi-line text folded),
    with rich markup escaped (a path or a value with ``[...]`` in it is printed as it is)."""
    from rich.markup import escape

    return escape(" ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # piped output (CI logs, files) gets a fixed, wide layout instead of rich's 80-column fallback
    console = Console(width=None if sys.stdout.isatty() else 140)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 140, soft_wrap=True)  # one error, one line
    try:
        if args.command == "demo":
            return _demo(args, console)
        if args.command == "bench":
            return _bench(args, console)
        if args.command == "devices":
            return _devices(args, console)
        if args.command == "prune":
            return _prune(args, console)
        if args.command == "sensitivity":
            return _sensitivity(args, console)
        if args.command == "search":
            return _search(args, console)
        if hasattr(args, "handler"):
            return args.handler(args, console)
        parser.error(f"unknown command {args.command}")  # pragma: no cover - argparse enforces choices
    except UsageError as e:
        err.print(f"[red]edgeprune: error:[/] {_one_line(e)}", highlight=False)
        return 2
    except EdgepruneError as e:
        err.print(f"[red]edgeprune: failed:[/] {_one_line(e)}", highlight=False)
        return 1
    except KeyboardInterrupt:
        err.print("edgeprune: interrupted; completed results are in the output folder")
        return 130
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
