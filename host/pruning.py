"""``edgeprune prune``: one model → pruned (channels and/or 2:4) → recovered → verified artifacts under ``--out``.

Writes, under the output folder::

    plan.json                       the replayable pruning plan (kept channel indices per layer)
    <tag>.<ext> + <tag>.*.manifest.json   one verified artifact per requested format, with its manifest
    prune.json                      what was done: MACs/params before and after, torch top-1 before/after on
                                    the eval split, recovery (steps, time, device), sparsity, artifacts
    finetune.ckpt                   the fine-tune checkpoint while recovery runs (a re-run with the same
                                    options resumes from it); removed once the artifacts are written

``--ratio 0`` (and no ``--sparsity``) exports the dense model unchanged: no pruning, no recovery.
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

from edgeprune import data, export, finetune, models, prune
from edgeprune.errors import UsageError
from host.transport import write_text_atomic

Events = Callable[[str, str, Optional[int], Optional[int]], None]

SPARSITY = ("2:4",)


@dataclass
class PruneOptions:
    model: str                                   # reference model name, or a checkpoint file
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


@dataclass
class PruneOutcome:
    out: Path
    tag: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    top1_dense: float
    top1_pruned: float
    eval_split: str
    eval_n: int
    plan_sha256: str
    skipped: Dict[str, str] = field(default_factory=dict)
    artifacts: List[Dict[str, Any]] = field(default_factory=list)
    recovery: Dict[str, Any] = field(default_factory=dict)
    sparsity: Optional[Dict[str, Any]] = None
    seconds: float = 0.0

    @property
    def macs_reduction(self) -> float:
        return self.macs_before / max(1, self.macs_after)


def load_model(spec: str) -> Tuple[str, nn.Module, Dict[str, Any]]:
    """``spec`` is a reference model name (``resnet20`` …) or a checkpoint file of one of them
    (:func:`edgeprune.models.model_from_checkpoint`). Returns the model name, the model in eval mode and the
    checkpoint metadata (its sha256 among it)."""
    if spec in models.MODELS:
        model, meta = models.pretrained(spec)
        return spec, model, dict(meta)
    if not Path(spec).exists():
        raise UsageError(f"--model: {spec!r} is neither a known model ({', '.join(sorted(models.MODELS))}) "
                         "nor an existing checkpoint file")
    name, model, meta = models.model_from_checkpoint(Path(spec))
    return name, model, dict(meta)


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
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(opts.seed)
    name, base, meta = load_model(opts.model)
    tag = _tag(name, opts)
    example = torch.zeros(1, 3, 32, 32)

    ev = data.eval_split(opts.eval_per_class)
    emit("info", f"{name}: checkpoint {meta.get('path')} (sha256 {str(meta['sha256'])[:12]}…); "
                 f"eval split {ev.name}, {len(ev)} images", None, None)
    top1_dense = finetune.evaluate(base, ev)
    model = copy.deepcopy(base)
    calib_cache: List[data.Split] = []

    def calib_split() -> data.Split:  # read once (from the full training set when present), only if needed
        if not calib_cache:
            calib_cache.append(data.calib_split())
        return calib_cache[0]

    calib = None
    if opts.importance in prune.NEEDS_CALIB and opts.ratio > 0:
        calib = calib_split().tensors(256)
    emit("stage", f"{tag}: pruning {opts.ratio:.0%} of channels ({opts.importance}, "
                  f"{'global' if opts.global_ranking else 'uniform'} ranking, align {opts.align})", None, None)
    pr = prune.prune(model, opts.ratio, example, importance=opts.importance, round_to=opts.align,
                     min_channels=opts.min_channels, global_ranking=opts.global_ranking, calib=calib,
                     prune_residual=opts.prune_residual)
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
        cal = calib_split()
        if opts.recalibrate:
            emit("stage", f"{tag}: BatchNorm recalibration on {cal.name} ({len(cal)} images)", None, None)
            finetune.recalibrate_bn(model, cal)
            recovery = {"kind": "bn-recalibration", "split": cal.name, "n": len(cal)}
        if opts.finetunes:
            ft = data.finetune_split(opts.finetune_per_class)
            epochs = opts.finetune_epochs or 1000  # bounded by wall time alone when only minutes are given
            seconds = opts.finetune_minutes * 60 if opts.finetune_minutes is not None else None
            emit("stage", f"{tag}: fine-tune on {ft.name} ({len(ft)} images)", 0, None)
            res = finetune.finetune(
                model, ft, epochs=epochs, max_seconds=seconds, lr=opts.lr, batch_size=opts.batch_size,
                seed=opts.seed, teacher=base, distill_alpha=opts.distill,
                masks=masks, checkpoint=out / "finetune.ckpt",
                progress=lambda d, t: emit("progress", f"{tag}: fine-tune", d, t))
            recovery = {"kind": "finetune", "bn_recalibration": opts.recalibrate, **asdict(res)}
    top1 = finetune.evaluate(model, ev) if opts.changes_model else top1_dense

    check_inputs = data.to_tensor_batch(ev.images[:: max(1, len(ev) // 32)][:32])
    calib_inputs = None
    if any(export.get_format(f).calibration for f in opts.formats):
        calib_inputs = data.to_tensor_batch(calib_split().images[:200])
    artifacts: List[Dict[str, Any]] = []
    for fmt in opts.formats:
        emit("stage", f"{tag}: export {fmt} (verified against torch)", None, None)
        man = export.export(model, fmt, out, tag=tag, check_inputs=check_inputs, calib_inputs=calib_inputs,
                            model_name=name, source_checkpoint_sha256=str(meta["sha256"]),
                            pruning_plan_sha256=pr.plan.sha256())
        artifacts.append({"format": fmt, "file": man.file, "files": dict(man.files), "precision": man.precision,
                          "manifest": export.manifest_path(out, tag, fmt).name,
                          "verification": asdict(man.verification)})
        emit("built", f"{fmt}: {man.file}", len(artifacts), len(opts.formats))
    (out / "finetune.ckpt").unlink(missing_ok=True)

    outcome = PruneOutcome(out=out, tag=tag, macs_before=pr.macs_before, macs_after=pr.macs_after,
                           params_before=pr.params_before, params_after=pr.params_after, top1_dense=top1_dense,
                           top1_pruned=top1, eval_split=ev.name, eval_n=len(ev), plan_sha256=pr.plan.sha256(),
                           skipped=dict(pr.skipped), artifacts=artifacts, recovery=recovery, sparsity=sparsity_info,
                           seconds=time.perf_counter() - t0)
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(outcome).items()}
    record.update(model=name, checkpoint=meta, options={k: (str(v) if isinstance(v, Path) else v)
                                                        for k, v in asdict(opts).items()},
                  macs_reduction=outcome.macs_reduction, torch=torch.__version__,
                  finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    write_text_atomic(out / "prune.json", json.dumps(record, indent=1, default=str))
    return outcome
