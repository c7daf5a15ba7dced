"""``edgeprune demo``: the whole loop on one device — the local machine with no configuration, or any device file.

reference model → channel pruning at several ratios (Torch-Pruning) → optional bounded recovery
(:func:`edgeprune.recovery.recover`: BatchNorm recalibration + short fine-tune) → export in the format the
device's runtime loads (:func:`host.fleet.formats.profile_for`: ONNX for onnxruntime, OpenVINO IR, TFLite, ...;
verified against torch) → the agent on the device (a separate process here, or over SSH) → latency percentiles,
power (modelled where there is no sensor, and labelled so) and accuracy measured by the agent → ``summary.csv``
and one JSON report per candidate under ``--out``.

The model and data are any :mod:`edgeprune.sources` / :mod:`edgeprune.workload` accept (default: the bundled
CIFAR-10 ResNet-20 and its test images). The eval shards carry the dense model's outputs, so every candidate's
label-free fidelity (top-1 agreement, SNR) is measured by the agent next to top-1 when there are labels.

This module returns plain data and reports progress through a callback; the CLI does the printing.
"""
from __future__ import annotations

import csv
from contextlib import closing
import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from agent import schema
from edgeprune import data, export, shards
from edgeprune.errors import DeviceError, UsageError
from edgeprune.recovery import RecoveryPlan
from edgeprune.workload import DataOptions, Workload, open_workload, shard_batches
from edgeprune.sources import ModelSpec
from host.commands.demo_build import DemoBuilder, options_document, tag_of
from host.executors import BuildTask
from host.executors.base import absolute_paths, worker_context
from host.executors.local import LocalExecutor
from host.fleet.devices import DeviceConfig, local_device
from host.fleet.formats import profile_for
from host.fleet.jobs import build_job
from host.fleet.runner import Lease, transport_for
from host.files import write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from host.executors import Executor
    from host.results.store import RunRecorder

SUMMARY_COLUMNS = [
    "model", "ratio", "macs", "params", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms", "latency_cv",
    "accuracy_top1", "accuracy_top5", "agreement", "snr_db", "eval_n", "power_w", "power_source", "energy_mj", "recovery", "status",
    "warnings", "report",
]

# event name, message, (done, total) — the CLI turns these into progress bars
Events = Callable[[str, str, Optional[int], Optional[int]], None]


@dataclass
class DemoOptions:
    model: str = "resnet20"
    ratios: Sequence[float] = (0.0, 0.3, 0.5, 0.7)
    out: Path = Path("results/demo")
    quick: bool = False
    recovery: bool = True
    finetune_epochs: int = 2
    finetune_per_class: Optional[int] = 1000     # images per class from the finetune split (None: all 4,900)
    finetune_seconds: float = 90.0               # wall-time bound per candidate
    eval_per_class: Optional[int] = data.DEFAULT_EVAL_PER_CLASS  # 100: the shipped 1,000-image subset; None: all 10,000
    importance: str = "l1"
    seed: int = 0
    device: DeviceConfig = field(default_factory=local_device)
    lease_wait_s: float = 300.0                  # how long to wait for the device's lease (another controller's)
    model_args: Dict[str, object] = field(default_factory=dict)   # model source (edgeprune.sources)
    weights: Optional[str] = None
    trust_pickle: bool = False
    input_shape: Optional[tuple] = None
    ignore_layers: Sequence[str] = ()
    data: Optional[str] = None                   # data (edgeprune.workload); None: CIFAR-10 for the reference models
    calib_data: Optional[str] = None
    finetune_data: Optional[str] = None
    resize: Optional[str] = None
    center_crop: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None

    def data_options(self) -> DataOptions:
        return DataOptions.of(self)

    @classmethod
    def quick_defaults(cls, **overrides) -> "DemoOptions":
        base = dict(quick=True, finetune_epochs=1, finetune_per_class=200, finetune_seconds=20.0)
        base.update(overrides)
        return cls(**base)

    def recovery_plan(self) -> RecoveryPlan:
        """Each pruned candidate's recovery (:func:`edgeprune.recovery.recover`, when ``recovery``): BatchNorm
        recalibration, then ``finetune_epochs`` epochs bounded by ``finetune_seconds``, no distillation."""
        return RecoveryPlan(recalibrate=True, epochs=self.finetune_epochs, max_seconds=self.finetune_seconds,
                            seed=self.seed)

    def validate(self) -> "DemoOptions":
        if not self.ratios:
            raise UsageError("--ratios: give at least one ratio")
        for r in self.ratios:
            if not 0.0 <= r < 1.0:
                raise UsageError(f"--ratios: {r} is not in [0, 1)")
        if len(set(self.ratios)) != len(self.ratios):
            raise UsageError("--ratios: a ratio is listed twice")
        if self.finetune_epochs < 1:
            raise UsageError("--finetune-epochs: must be >= 1")
        if self.finetune_seconds <= 0:
            raise UsageError("--finetune-seconds: must be > 0")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise UsageError("--eval-per-class: must be >= 1")
        if not self.lease_wait_s >= 0:
            raise UsageError(f"--lease-wait: must be >= 0, got {self.lease_wait_s}")
        profile_for(self.device)   # a runtime and precision the demo can export for (UsageError naming the file)
        return self


@dataclass
class DemoResult:
    rows: List[Dict[str, object]]
    out: Path
    summary_csv: Path
    eval_split: str
    eval_n: int
    finetune_split: Optional[str]
    failures: int
    format: str = "onnx"                       # the export format the device's runtime loaded


def _write_summary(path: Path, rows: List[Dict[str, object]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _row(model: str, ratio: float, macs: int, params: int, recovery: str, report: schema.Report,
         report_path: Path) -> Dict[str, object]:
    row: Dict[str, object] = {"model": model, "ratio": ratio, "macs": macs, "params": params, "recovery": recovery,
                              "status": report.status, "warnings": " | ".join(report.warnings),
                              "report": f"reports/{report_path.name}"}
    if report.timing is not None:
        lat = report.timing.latency_ms
        row.update(latency_p50_ms=round(lat.median, 4), latency_p90_ms=round(lat.p90, 4),
                   latency_p99_ms=round(lat.p99, 4), latency_cv=round(lat.cv, 4))
    if report.accuracy is not None:
        acc = report.accuracy
        row.update(eval_n=acc.n, **{k: round(v, 4) for k, v in (("accuracy_top1", acc.top1),
                                                                   ("accuracy_top5", acc.top5),
                                                                   ("agreement", acc.agreement),
                                                                   ("snr_db", acc.snr_db)) if v is not None})
    if report.power is not None:
        row.update(power_w=round(report.power.mean_w, 3), power_source=report.power.source,
                   energy_mj=round(report.power.energy_mj_per_inference, 4))
    if report.error is not None:
        row["warnings"] = f"{report.error.type}: {report.error.message}"
    return row


def open_demo_workload(opts: DemoOptions) -> Workload:
    """The demo's model and data, opened (and so checked) before anything is recorded or built."""

    return open_workload(ModelSpec.of(opts), opts.data_options())


def run_demo(opts: DemoOptions, events: Optional[Events] = None,
             recorder: Optional["RunRecorder"] = None, workload: Optional[Workload] = None,
             executor: Optional["Executor"] = None) -> DemoResult:
    """Run the demo loop: build every candidate, then measure them back to back; each measured candidate is in
    ``summary.csv`` (and, with ``recorder``, in the results store) before the next one is measured. ``workload``:
    :func:`open_demo_workload` of the same options, when the caller opened it already; ``executor``: where the
    candidates are built (:mod:`host.executors`; default in this process; the caller closes it)."""
    opts.validate()
    emit = events or (lambda *a: None)
    executor = executor if executor is not None else LocalExecutor()
    out = Path(opts.out)
    for sub in ("artifacts", "reports", "jobs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)

    wl = workload if workload is not None else open_demo_workload(opts)
    loaded = wl.model
    name, base, meta = loaded.name, loaded.model, loaded.meta
    for note in wl.notes:
        emit("info", note, None, None)
    ev = wl.eval
    shard_list: List[shards.ShardInfo] = []
    if ev is not None:
        # the dense model's outputs ride along: the agent measures each candidate's agreement with it on the device
        shard_list = shards.write_shards(shard_batches(wl, base), out / "eval", prefix=f"{ev.name}-{ev.n}")
    eval_sha = shard_list[0].sha256 if len(shard_list) == 1 else export.sha256_text(
        ",".join(s.sha256 for s in shard_list))

    builder = DemoBuilder(opts, wl, emit)
    ft_split, cal = builder.ft_split, builder.cal
    if opts.recovery and any(r > 0 for r in opts.ratios):
        emit("info", f"recovery data: {ft_split.name if ft_split else 'none (no --finetune-data)'}"
                     f"{f', {len(ft_split)} images' if ft_split else ''}; calib {len(cal) if cal else 0} images",
             None, None)
    dev = opts.device
    profile = builder.profile
    transport = transport_for(dev)
    # Phase 1: every candidate's artifact (pruning, recovery, export), in this process or as tasks on a cluster
    # (all at once). Phase 2: all of them measured back to back, so that their latencies are compared under the
    # same machine conditions, not minutes and a fine-tune apart, and nothing builds beside a measurement.
    doc = absolute_paths(options_document(opts))       # a worker's working folder is not ours
    built: list = []

    def arrived(h: Any) -> None:
        b = h.result()
        man = export.Manifest.read(out / "artifacts" / b["manifest"])
        job = build_job(dev, b["tag"], out / "artifacts" / man.file, man, shard_list or None,
                        eval_split=ev.name if ev else "eval", quick=opts.quick, seed=opts.seed)
        built.append((b["tag"], b["ratio"], b, job, man))
        emit("built", b["tag"], len(built), len(opts.ratios))

    handles = []
    try:
        for ratio in opts.ratios:
            h = executor.submit(BuildTask(tag_of(name, ratio), out / "artifacts",
                                          lambda dest, ratio=ratio: builder.build(ratio, dest),
                                          "host.commands.demo:build_remote", {"options": doc, "ratio": ratio},
                                          whole=False))
            if executor.synchronous:
                arrived(h)            # built already: reported (and a failure raised) before the next one starts
            else:
                handles.append(h)     # on a cluster: all submitted, then taken in order
        for h in handles:
            arrived(h)
    except BaseException:
        for h in handles:
            h.cancel()
        raise

    rows: List[Dict[str, object]] = []
    failures = 0
    summary = out / "summary.csv"
    if recorder is not None:
        recorder.device(dev)
    # measured under the device's lease, like `bench` and `search`: two controllers never time the same device
    # at once (a bench started beside a demo waits for it, and the other way round)
    emit("stage", f"taking the lease of device '{dev.id}'", None, None)
    with closing(transport), Lease(transport, dev.id, wait_s=opts.lease_wait_s, label="edgeprune demo"):
        for tag, ratio, b, job, man in built:
            emit("stage", f"{tag}: measuring on device '{dev.id}' (agent process)", None, None)
            report_path = out / "reports" / f"{tag}.json"
            try:
                report = transport.run_job(job, out / "jobs" / tag)
            except DeviceError as e:
                report = schema.Report(job_id=tag, status="error", error=schema.ErrorInfo("DeviceError", str(e)))
            write_text_atomic(report_path, schema.dumps(report))
            if recorder is not None:
                recorder.measurement(tag, device_id=dev.id, report=schema.to_dict(report), job=schema.to_dict(job),
                                     label=f"ratio {ratio:g}", model=name, manifest=asdict(man),
                                     extra={"ratio": ratio, "macs": b["macs"], "params": b["params"],
                                            "recovery": b["recovery"], "plan_sha256": b["plan_sha256"],
                                            "built_by": b.built_by,
                                            "eval_sha256": eval_sha, "eval_split": ev.name if ev else None,
                                            "seed": opts.seed, "recipe": loaded.recipe})
            failures += report.status != "ok"
            rows.append(_row(name, ratio, b["macs"], b["params"], b["recovery"], report, report_path))
            _write_summary(summary, rows)
            emit("row", f"{tag}: {report.status}", len(rows), len(opts.ratios))
    write_text_atomic(out / "demo.json", json.dumps({
        "model": name, "checkpoint": meta, "recipe": loaded.recipe, "notes": wl.notes,
        "eval": None if ev is None else {"split": ev.name, "n": ev.n, "sha256": eval_sha, "source": ev.description,
                                         "shards": [{"file": s.path.name, "sha256": s.sha256, "n": s.n}
                                                    for s in shard_list]},
        "finetune_split": ft_split.name if ft_split is not None else None, "device": dev.model_dump(by_alias=True),
        "ratios": list(opts.ratios), "quick": opts.quick, "executor": executor.describe(),
        "built_by": {tag: b.built_by for tag, _, b, _, _ in built}, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=1, default=str))
    return DemoResult(rows, out, summary, ev.name if ev else "", ev.n if ev else 0,
                      ft_split.name if ft_split else None, failures, profile.fmt)


def options_from_document(doc: Mapping[str, Any]) -> DemoOptions:
    """:class:`DemoOptions` from :func:`host.commands.demo_build.options_document`."""
    kw = dict(doc)
    kw["device"] = DeviceConfig.model_validate(kw["device"])
    kw["out"] = Path(kw["out"])
    for name in ("ratios", "ignore_layers", "input_shape"):
        if kw.get(name) is not None:
            kw[name] = tuple(kw[name])
    return DemoOptions(**kw)


def build_remote(payload: Mapping[str, Any], dest: Path) -> Dict[str, Any]:
    """A Ray task's build: the demo's candidate ``payload["ratio"]`` into ``dest`` (its model and data opened on
    the first build in this process)."""
    doc = payload["options"]

    def open_() -> DemoBuilder:
        opts = options_from_document(doc)
        return DemoBuilder(opts, open_demo_workload(opts))

    builder = worker_context("demo:" + json.dumps(doc, sort_keys=True), open_)
    return builder.build(float(payload["ratio"]), Path(dest))
