"""``edgeprune prune``: one model → pruned (channels and/or 2:4) → recovered → verified artifacts under ``--out``.

Writes, under the output folder::

    plan.json                       the replayable pruning plan (kept channel indices per layer)
    <tag>.<ext> + <tag>.*.manifest.json   one verified artifact per requested format, with its manifest
    prune.json                      what was done: MACs/params before and after, torch top-1 before/after on
                                    the eval split, recovery (steps, time, device), sparsity, artifacts
    finetune.ckpt                   the fine-tune checkpoint while recovery runs (a re-run with the same
                                    options resumes from it); removed once the artifacts are written

``--ratio 0`` (and no ``--sparsity``) exports the dense model unchanged: no pruning, no recovery.

The model comes from any source :mod:`edgeprune.sources` reads (a built-in name, ``MODULE:CALLABLE``, a checkpoint,
a model file) at any input size; the data from :mod:`edgeprune.workload` (the CIFAR-10 splits for the reference
models, else the user's ``--data``/``--calib-data``/``--finetune-data``; none at all: exports verified on seeded
random inputs and accuracy skipped, which ``prune.json``'s ``notes`` say).
This module returns plain data and reports progress through a callback; the CLI does the printing.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from edgeprune import data, export, prune, sources
from edgeprune.errors import UsageError
from edgeprune.recovery import RecoveryPlan, recover
from edgeprune.workload import DataOptions, describe_sources, open_workload
from host.files import write_text_atomic

Events = Callable[[str, str, Optional[int], Optional[int]], None]

SPARSITY = ("2:4",)


@dataclass
class PruneOptions:
    model: str                                   # any model source (edgeprune.sources): name, MODULE:CALLABLE, file
    out: Path
    ratio: float = 0.5
    align: int = 1
    min_channels: int = 1
    importance: str = "l1"
    global_ranking: bool = False
    prune_residual: bool = False                 # option-A ResNets: also prune each stage's residual stream
    sparsity: Optional[str] = None               # "2:4"
    formats: Sequence[str] = ("onnx",)
    finetune_epochs: Optional[int] = None
    finetune_minutes: Optional[float] = None
    finetune_per_class: Optional[int] = None     # images per class of the finetune split (None: all)
    distill: float = 0.0                         # weight of the distillation term (0: plain cross-entropy)
    recalibrate: bool = True
    lr: float = 0.01
    batch_size: int = 128
    eval_per_class: Optional[int] = data.DEFAULT_EVAL_PER_CLASS
    seed: int = 0
    model_args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    trust_pickle: bool = False
    input_shape: Optional[Tuple[int, int, int, int]] = None
    ignore_layers: Sequence[str] = ()
    data: Optional[str] = None
    calib_data: Optional[str] = None
    finetune_data: Optional[str] = None
    resize: Optional[str] = None
    center_crop: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None

    def model_spec(self) -> sources.ModelSpec:
        return sources.ModelSpec.of(self)

    def data_options(self) -> DataOptions:
        return DataOptions.of(self)

    def validate(self) -> "PruneOptions":
        if not 0.0 <= self.ratio < 1.0:
            raise UsageError(f"--ratio: must be in [0, 1), got {self.ratio}")
        if self.align < 1:
            raise UsageError(f"--align: must be >= 1, got {self.align}")
        if self.min_channels < 1:
            raise UsageError(f"--min-channels: must be >= 1, got {self.min_channels}")
        if self.importance not in prune.IMPORTANCE:
            raise UsageError(f"--importance: unknown criterion {self.importance!r}; "
                             f"known: {', '.join(sorted(prune.IMPORTANCE))}")
        if self.sparsity is not None and self.sparsity not in SPARSITY:
            raise UsageError(f"--sparsity: only {', '.join(SPARSITY)} is supported, got {self.sparsity!r}")
        if self.sparsity is not None and self.ratio > 0 and self.align % 4:
            raise UsageError(f"--align: 2:4 sparsity groups input channels by 4, so channel pruning with --sparsity "
                             f"needs --align a multiple of 4 (got {self.align}); otherwise pruned layers stay dense")
        if not self.formats:
            raise UsageError("--formats: give at least one format")
        for f in self.formats:
            export.get_exporter(f)  # raises UsageError naming the known formats
        if len(set(self.formats)) != len(self.formats):
            raise UsageError("--formats: a format is listed twice")
        if self.finetune_epochs is not None and self.finetune_epochs < 1:
            raise UsageError(f"--finetune-epochs: must be >= 1, got {self.finetune_epochs}")
        if self.finetune_minutes is not None and self.finetune_minutes <= 0:
            raise UsageError(f"--finetune-minutes: must be > 0, got {self.finetune_minutes}")
        if not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"--distill: must be in [0, 1], got {self.distill}")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise UsageError("--eval-per-class: must be >= 1")
        return self

    @property
    def changes_model(self) -> bool:
        return self.ratio > 0 or self.sparsity is not None

    @property
    def finetunes(self) -> bool:
        return self.changes_model and (self.finetune_epochs is not None or self.finetune_minutes is not None)

    def recovery_plan(self) -> RecoveryPlan:
        """The recovery these options ask for (:func:`edgeprune.recovery.recover`): BatchNorm recalibration (when
        ``recalibrate``), a fine-tune when ``--finetune-epochs`` or ``--finetune-minutes`` is given (minutes
        alone: 1000 epochs planned, bounded by the wall time), distilled from the dense model with ``--distill``."""
        return RecoveryPlan(
            recalibrate=self.recalibrate,
            epochs=(self.finetune_epochs or 1000) if self.finetunes else 0,
            max_seconds=self.finetune_minutes * 60 if self.finetune_minutes is not None else None,
            lr=self.lr, batch_size=self.batch_size, distill=self.distill, seed=self.seed)


@dataclass
class PruneOutcome:
    out: Path
    tag: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    top1_dense: Optional[float]                  # None: no labelled eval data
    top1_pruned: Optional[float]
    eval_split: str
    eval_n: int
    plan_sha256: str
    skipped: Dict[str, str] = field(default_factory=dict)
    artifacts: List[Dict[str, Any]] = field(default_factory=list)
    recovery: Dict[str, Any] = field(default_factory=dict)
    sparsity: Optional[Dict[str, Any]] = None
    seconds: float = 0.0
    metrics_dense: Dict[str, Any] = field(default_factory=dict)    # torch on the host: top1/top5, n, split
    metrics_pruned: Dict[str, Any] = field(default_factory=dict)   # ... and agreement/snr_db against the dense
    notes: List[str] = field(default_factory=list)                 # which data did what
    input_shape: List[int] = field(default_factory=list)

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(1, self.macs_after)


def load_model(spec: str) -> Tuple[str, nn.Module, Dict[str, Any]]:
    """A model from any source :mod:`edgeprune.sources` reads (a built-in name, a checkpoint file, ``MODULE:CALLABLE``,
    a model file). Returns its name, the model in eval mode and its metadata (the weights' sha256 among it)."""
    loaded = sources.resolve(sources.ModelSpec(source=spec))
    return loaded.name, loaded.model, dict(loaded.meta)


def _tag(name: str, opts: PruneOptions) -> str:
    tag = f"{name}-r{int(round(opts.ratio * 100)):03d}"
    if opts.align > 1 and opts.ratio > 0:
        tag += f"-a{opts.align}"
    if opts.sparsity:
        tag += "-s24"
    return tag


def run_prune(opts: PruneOptions, events: Optional[Events] = None) -> PruneOutcome:
    opts.validate()
    emit = events or (lambda *a: None)
    t0 = time.perf_counter()
    out = Path(opts.out)
    torch.manual_seed(opts.seed)
    wl = open_workload(opts.model_spec(), opts.data_options())   # every bad input fails here, before any file
    if opts.finetunes and not wl.has_finetune_data:
        raise UsageError("--finetune-epochs/--finetune-minutes: recovery needs labelled training images: give "
                         "--finetune-data (a folder, npz or MODULE:CALLABLE)")
    if opts.importance in prune.NEEDS_CALIB and opts.ratio > 0 and wl.calib() is None:
        raise UsageError(f"--importance {opts.importance}: needs labelled calibration images (--calib-data, "
                         "--finetune-data or --data)")
    out.mkdir(parents=True, exist_ok=True)
    loaded = wl.model
    name, base, meta = loaded.name, loaded.model, loaded.meta
    tag = _tag(name, opts)
    example = wl.example
    emit("info", f"{name}: {sources.describe(loaded)}", None, None)
    for note in wl.notes:
        emit("info", note, None, None)
    dense_metrics = wl.torch_metrics(base)
    top1_dense = dense_metrics.get("top1")
    model = copy.deepcopy(base)

    calib = None
    if opts.importance in prune.NEEDS_CALIB and opts.ratio > 0:
        cal = wl.calib()
        assert cal is not None
        if (cal.labels < 0).any():
            raise UsageError(f"--importance {opts.importance}: the calibration images have no labels")
        calib = cal.tensors(256)
    emit("stage", f"{tag}: pruning {opts.ratio:.0%} of channels ({opts.importance}, "
                  f"{'global' if opts.global_ranking else 'uniform'} ranking, align {opts.align})", None, None)
    pr = prune.prune(model, opts.ratio, example, importance=opts.importance, round_to=opts.align,
                     min_channels=opts.min_channels, global_ranking=opts.global_ranking, calib=calib,
                     prune_residual=opts.prune_residual, extra_ignored=loaded.ignored_modules())
    write_text_atomic(out / "plan.json", pr.plan.to_json())

    masks = None
    sparsity_info = None
    if opts.sparsity == "2:4":
        from edgeprune import sparsity

        emit("stage", f"{tag}: 2:4 magnitude masks", None, None)
        sres = sparsity.apply_2to4(model)
        masks = sres.masks
        sparsity_info = sres.to_dict()

    recovery: Dict[str, Any] = {"kind": "none"}
    if opts.changes_model and (opts.recalibrate or opts.finetunes):
        cal = wl.calib()
        ft = wl.finetune() if opts.finetunes else None
        assert ft is not None or not opts.finetunes
        rec = recover(model, opts.recovery_plan(), calib=cal, train=ft, teacher=base, masks=masks,
                      checkpoint=out / "finetune.ckpt", events=lambda k, m, d, t: emit(k, f"{tag}: {m}", d, t))
        if rec.recalibrated:
            recovery = {"kind": "bn-recalibration", "split": rec.calib_split, "n": rec.calib_n,
                        "source": rec.calib_source}
        elif opts.recalibrate:
            recovery = {"kind": "none", "note": "no calibration data: BatchNorm statistics kept from the dense model"}
        if rec.finetune is not None:
            recovery = {"kind": "finetune", "bn_recalibration": rec.recalibrated, **asdict(rec.finetune)}
    pruned_metrics = wl.torch_metrics(model, reference=base) if opts.changes_model else \
        {**dense_metrics, **({"agreement": 1.0, "snr_db": 300.0} if dense_metrics else {})}
    top1 = pruned_metrics.get("top1")

    check_inputs = wl.check_inputs()
    calib_inputs = None
    if any(export.get_format(f).calibration for f in opts.formats):
        calib_inputs = wl.calib_inputs(200)
        if calib_inputs is None:
            raise UsageError(f"--formats: {', '.join(f for f in opts.formats if export.get_format(f).calibration)} "
                             "needs calibration images: give --data, --calib-data or --finetune-data")
    artifacts: List[Dict[str, Any]] = []
    for fmt in opts.formats:
        emit("stage", f"{tag}: export {fmt} (verified against torch)", None, None)
        man = export.export(model, fmt, out, tag=tag, check_inputs=check_inputs, calib_inputs=calib_inputs,
                            model_name=name, source_checkpoint_sha256=str(meta["sha256"]),
                            pruning_plan_sha256=pr.plan.sha256(), input_shape=tuple(wl.input_shape),
                            preprocess=wl.manifest_preprocess())
        artifacts.append({"format": fmt, "file": man.file, "path": str(out / man.file), "files": dict(man.files),
                          "precision": man.precision, "manifest": export.manifest_path(out, tag, fmt).name,
                          "verification": asdict(man.verification)})
        emit("built", f"{fmt}: {man.file}", len(artifacts), len(opts.formats))
    (out / "finetune.ckpt").unlink(missing_ok=True)

    ev = wl.eval
    outcome = PruneOutcome(out=out, tag=tag, macs_before=pr.macs_before, macs_after=pr.macs_after,
                           params_before=pr.params_before, params_after=pr.params_after, top1_dense=top1_dense,
                           top1_pruned=top1, eval_split=ev.name if ev else "", eval_n=ev.n if ev else 0,
                           plan_sha256=pr.plan.sha256(), skipped=dict(pr.skipped), artifacts=artifacts,
                           recovery=recovery, sparsity=sparsity_info, seconds=time.perf_counter() - t0,
                           metrics_dense=dense_metrics, metrics_pruned=pruned_metrics, notes=list(wl.notes),
                           input_shape=list(wl.input_shape))
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(outcome).items()}
    record.update(model=name, checkpoint=meta, recipe=loaded.recipe, workload=describe_sources(wl),
                  options={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
                  macs_reduction=outcome.macs_reduction, torch=torch.__version__,
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomic(out / "prune.json", json.dumps(record, indent=1, default=str))
    return outcome


def outcome_json(res: PruneOutcome) -> str:
    """``edgeprune prune --json``: one document with MACs, params, artifacts (paths, verification) and metrics."""
    doc = {"tag": res.tag, "out": str(res.out), "input_shape": res.input_shape,
           "macs": {"before": res.macs_before, "after": res.macs_after, "reduction": res.macs_reduction},
           "params": {"before": res.params_before, "after": res.params_after},
           "metrics": {"dense": res.metrics_dense, "pruned": res.metrics_pruned, "measured_by": "torch on the host"},
           "plan": str(res.out / "plan.json"), "plan_sha256": res.plan_sha256, "skipped": res.skipped,
           "recovery": res.recovery, "artifacts": res.artifacts, "notes": res.notes, "seconds": res.seconds}
    return json.dumps(doc, indent=1, default=str)
