"""Recovery after pruning, in one function: BatchNorm recalibration → fine-tune → (distillation from the dense
model, as part of the fine-tune's loss), each as a :class:`RecoveryPlan` configures it; resumable, interruptible.

Contract of :func:`recover`:

* It changes ``model`` in place (its weights and BatchNorm buffers only; a pruned model's shape and a 2:4
  pattern are kept) and leaves it in eval mode on the CPU. It returns a :class:`RecoveryResult` saying what ran.
* **Recalibration** (``plan.recalibrate`` and a ``calib`` split given): the BatchNorm running statistics are
  re-estimated on ``calib`` (labels unused), :func:`edgeprune.finetune.recalibrate_bn`.
* **Fine-tune** (``plan.epochs > 0`` and a ``train`` split given): :func:`edgeprune.finetune.finetune` with the
  plan's epochs, wall-time bound, learning rate, batch size, weight decay and seed; with a ``teacher`` (a dense,
  separate model) the loss distils from it with weight ``plan.distill`` (0: plain cross-entropy, the teacher
  never run; ``plan.distill > 0`` without a teacher is a UsageError); ``masks`` (2:4 sparsity) are kept exactly.
  Without ``train`` there is no fine-tune, whatever ``plan.epochs`` says (recovery is then recalibration only).
* **Resumable**: with ``checkpoint`` (a file path) the fine-tune's full state is saved there as it runs, when a
  bound stops it, and when it is interrupted between two steps (Ctrl-C, an exception raised by ``events``); a
  later call with the same plan, data, teacher and masks, on the same model rebuilt the same way (the pruning
  plan replayed), resumes from it and ends, on the CPU, with bit-identical weights. A different configuration
  is refused (UsageError). Recalibration is not checkpointed: it is one pass, and a resumed fine-tune's
  checkpoint replaces every weight and buffer. The caller deletes the file once it no longer needs it.
* **Deterministic**: the same model, data, plan and seed give the same weights; these are the numbers every
  command published before this module existed (``edgeprune prune``, ``search``'s candidates and probes,
  ``demo``, the sensitivity analysis' probes, the benchmarks each ran these same calls themselves).
* ``events(kind, message, done, total)``: ``("stage", "BatchNorm recalibration on <split> (<n> images)", None,
  None)``, ``("stage", "fine-tune on <split> (<n> images)", 0, None)``, then ``("progress", "fine-tune", step,
  planned)`` after every fine-tune step. Callers prefix their own tag.

Every recovery in the project runs through :func:`recover`: it is the one place to make recovery faster (mixed
precision, a teacher whose outputs are cached) without the commands noticing. :mod:`edgeprune.finetune` keeps
the low-level training loop, its checkpoint format and the BatchNorm pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from . import finetune as _ft
from .data import Split
from .errors import UsageError

__all__ = ["RecoveryPlan", "RecoveryResult", "RecoveryEvents", "recover"]

RecoveryEvents = Callable[[str, str, Optional[int], Optional[int]], None]   # (kind, message, done, total)


@dataclass(frozen=True)
class RecoveryPlan:
    """What :func:`recover` does. The defaults are the fine-tune's own (SGD lr 0.01, batch 128, weight decay 5e-4,
    distillation temperature 4, checkpoint every 100 steps; BatchNorm pass in batches of 200)."""

    recalibrate: bool = True                 # BatchNorm recalibration on the calib split first
    epochs: int = 0                          # fine-tune epochs: the cosine schedule's length (0: no fine-tune)
    max_seconds: Optional[float] = None      # wall-time bound of the fine-tune (cuts the schedule short)
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    distill: float = 0.0                     # weight of distillation from the teacher (0: cross-entropy alone)
    temperature: float = 4.0                 # distillation temperature
    seed: int = 0
    device: Optional[str] = None             # None: CUDA when available, else the CPU
    recalibrate_batch_size: int = 200
    checkpoint_every: int = 100

    def validate(self) -> "RecoveryPlan":
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise UsageError(f"epochs: must be an integer >= 0, got {self.epochs!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"distill: must be in [0, 1], got {self.distill}")
        return self


@dataclass
class RecoveryResult:
    """What :func:`recover` did: whether it recalibrated (and on which split), the fine-tune's result (None: no
    fine-tune), and this call's wall time."""

    recalibrated: bool = False
    calib_split: Optional[str] = None
    calib_n: int = 0
    calib_source: Optional[str] = None
    finetune: Optional[_ft.FinetuneResult] = None
    seconds: float = 0.0

    @property
    def finetuned(self) -> bool:
        return self.finetune is not None


def recover(model: nn.Module, plan: RecoveryPlan, *, calib: Optional[Split] = None, train: Optional[Split] = None,
            teacher: Optional[nn.Module] = None, masks: Optional[Mapping[str, torch.Tensor]] = None,
            checkpoint: Optional[Union[str, Path]] = None,
            events: Optional[RecoveryEvents] = None) -> RecoveryResult:
    """Recover ``model`` in place: BatchNorm recalibration on ``calib``, then a fine-tune on ``train`` (distilled
    from ``teacher`` with weight ``plan.distill``, keeping ``masks``, resumable from ``checkpoint``); see the module
    docstring for the contract."""
    plan.validate()
    if plan.distill > 0 and teacher is None and plan.epochs > 0 and train is not None:
        raise UsageError("distill: distillation needs a teacher (the dense model)")
    emit = events or (lambda *a: None)
    t0 = time.perf_counter()
    out = RecoveryResult()
    if plan.recalibrate and calib is not None:
        emit("stage", f"BatchNorm recalibration on {calib.name} ({len(calib)} images)", None, None)
        _ft.recalibrate_bn(model, calib, batch_size=plan.recalibrate_batch_size, device=plan.device)
        out.recalibrated, out.calib_split, out.calib_n = True, calib.name, len(calib)
        out.calib_source = calib.source
    if plan.epochs > 0 and train is not None:
        emit("stage", f"fine-tune on {train.name} ({len(train)} images)", 0, None)
        out.finetune = _ft.finetune(
            model, train, epochs=plan.epochs, max_seconds=plan.max_seconds, lr=plan.lr, batch_size=plan.batch_size,
            weight_decay=plan.weight_decay, seed=plan.seed, device=plan.device,
            progress=lambda done, total: emit("progress", "fine-tune", done, total),
            teacher=teacher, distill_alpha=plan.distill if teacher is not None else None,
            distill_temperature=plan.temperature, masks=masks, checkpoint=checkpoint,
            checkpoint_every=plan.checkpoint_every)
    out.seconds = time.perf_counter() - t0
    return out
