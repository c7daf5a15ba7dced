"""Recovery after pruning, in one function: BatchNorm recalibration → fine-tune → (distillation from the dense
model, as part of the fine-tune's loss), each as a :class:`RecoveryPlan` configures it; resumable, interruptible.

Contract of :func:`recover`:

* It changes ``model`` in place (its weights and BatchNorm buffers only; a pruned model's shape and a 2:4
  pattern are kept) and leaves it in eval mode on the CPU. It returns a :class:`RecoveryResult` saying what ran.
* **Recalibration** (``plan.recalibrate`` and a ``calib`` split given): the BatchNorm running statistics are
  re-estimated on ``calib`` (labels unused), :func:`edgeprune.finetune.recalibrate_bn`.
* **Fine-tune** (``plan.epochs > 0`` and a ``train`` split given): :func:`edgeprune.finetune.finetune` with the
  plan's epochs, learning rate, batch size, weight decay and seed; with a ``teacher`` (a dense,
  separate model) the loss distils from it with weight ``plan.distill`` (0: plain cross-entropy, the teacher
  never run; ``plan.distill > 0`` without a teacher is a UsageError); ``masks`` (2:4 sparsity) are kept exactly.
  Without ``train`` there is no fine-tune, whatever ``plan.epochs`` says (recovery is then recalibration only).
* **Budget**: ``plan.max_seconds`` bounds the whole call's wall time (recalibration included): the fine-tune
  gets what the recalibration left (at least one step) and stops after the step that reaches it: it overshoots
  by at most one step (the first step of a compiled student includes the compilation, about a minute; a cut
  cosine schedule does not anneal, so size ``epochs`` to the budget).
* **Fast on a CPU** (the speed-ups of ``bench/recovery.py``): ``plan.precision`` "auto" trains under bf16 autocast
  where the CPU has AVX512-BF16 or AMX (:func:`edgeprune.cpu.bf16_support`; fp32 weights, gradients and optimizer;
  fp32 elsewhere and on CUDA), ``plan.channels_last`` the student's memory layout (off by default: measured no
  faster for training here; the teacher's inference always runs channels-last on a CPU, where it is),
  ``plan.threads`` (None: every core this process may use), ``plan.compile`` :func:`torch.compile` (None: when
  the fine-tune will see at least :data:`COMPILE_MIN_IMAGES` images on a CPU: compiling a shape costs about a
  minute on 2 cores and pays back within minutes; a search's short probes stay eager; only where
  :func:`edgeprune.cpu.compile_support` says it can run, and a compilation that fails falls back to eager
  before any step, said in the result). With
  ``teacher_cache`` (:class:`~edgeprune.teacher_cache.TeacherCache`) the teacher's logits are computed once per
  (teacher, data, seed) and reused by every later recovery with the same key (a search's candidates). The accuracy
  a caller measures afterwards is fp32: the model leaves in fp32, in the default layout.
* **Resumable**: with ``checkpoint`` (a file path) the fine-tune's full state is saved there as it runs, when a
  bound stops it, and when it is interrupted between two steps (Ctrl-C, an exception raised by ``events``); a
  later call with the same plan, data, teacher and masks, on the same model rebuilt the same way (the pruning
  plan replayed), resumes from it and ends, on the CPU, with bit-identical weights. A different configuration
  is refused (UsageError). Recalibration is not checkpointed: it is one pass, and a resumed fine-tune's
  checkpoint replaces every weight and buffer. The caller deletes the file once it no longer needs it.
* **Deterministic**: the same model, data, plan and seed give the same weights on the same host (bf16 is chosen
  by the CPU, so two hosts may round differently). The batches are those of :mod:`edgeprune.augment` (uint8
  crops padded with the mean pixel): not bit-identical to the float augmentation of earlier versions, whose
  checkpoints (version 1) are refused with a message to delete them.
* ``events(kind, message, done, total)``: ``("stage", "BatchNorm recalibration on <split> (<n> images)", None,
  None)``, ``("stage", "fine-tune on <split> (<n> images, <precision>)", 0, None)``, then ``("progress",
  "fine-tune", step, planned)`` after every fine-tune step. Callers prefix their own tag.

Every recovery in the project runs through :func:`recover`: it is the one place to make recovery faster (mixed
precision, a teacher whose outputs are cached) without the commands noticing. :mod:`edgeprune.finetune` keeps
the low-level training loop, its checkpoint format and the BatchNorm pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import cpu
from . import finetune as _ft
from .data import Split
from .errors import UsageError

if TYPE_CHECKING:
    from .teacher_cache import TeacherCache

__all__ = ["RecoveryPlan", "RecoveryResult", "RecoveryEvents", "recover", "COMPILE_MIN_IMAGES"]

COMPILE_MIN_IMAGES = 200_000   # ~8 eager minutes on 2 cores at batch 128 (bench/recovery.py)

RecoveryEvents = Callable[[str, str, Optional[int], Optional[int]], None]   # (kind, message, done, total)


@dataclass(frozen=True)
class RecoveryPlan:
    """What :func:`recover` does. The defaults are the fine-tune's own (SGD lr 0.01, batch 128, weight decay 5e-4,
    distillation temperature 4, checkpoint every 100 steps; BatchNorm pass in batches of 200)."""

    recalibrate: bool = True                 # BatchNorm recalibration on the calib split first
    epochs: int = 0                          # fine-tune epochs: the cosine schedule's length (0: no fine-tune)
    max_seconds: Optional[float] = None      # wall-time budget of the whole recovery (cuts the schedule short)
    lr: float = 0.01
    batch_size: int = 128
    weight_decay: float = 5e-4
    distill: float = 0.0                     # weight of distillation from the teacher (0: cross-entropy alone)
    temperature: float = 4.0                 # distillation temperature
    seed: int = 0
    device: Optional[str] = None             # None: CUDA when available, else the CPU
    recalibrate_batch_size: int = 200
    checkpoint_every: int = 100
    precision: str = "auto"                  # "auto" (bf16 where the CPU has it), "bf16", "fp32"
    channels_last: bool = False              # the student's layout (the teacher runs channels-last on a CPU)
    threads: Optional[int] = None            # None: every core this process may use (CPU)
    compile: Optional[bool] = None           # torch.compile the student; None: for long fine-tunes on a CPU

    def resolved(self) -> Tuple[str, str, bool, Optional[int], str]:
        """(device, precision, channels_last, threads, why that precision) for this host."""
        device = self.device or _ft.default_device()
        on_cpu = not device.startswith("cuda")
        if self.precision == "fp32":
            precision, why = "fp32", "asked for fp32"
        elif not on_cpu:
            precision, why = ("bf16", "asked for bf16") if self.precision == "bf16" else ("fp32", "CUDA: fp32")
        else:
            ok, why = cpu.bf16_support()
            if self.precision == "bf16" and not ok:
                raise UsageError(f"precision: bf16 was asked for, but {why}; use auto or fp32")
            precision = "bf16" if ok else "fp32"
        channels_last = bool(self.channels_last)
        threads = self.threads if self.threads is not None else (cpu.usable_cores() if on_cpu else None)
        return device, precision, channels_last, threads, why

    def validate(self) -> "RecoveryPlan":
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise UsageError(f"epochs: must be an integer >= 0, got {self.epochs!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"distill: must be in [0, 1], got {self.distill}")
        if self.precision not in ("auto",) + _ft.PRECISIONS:
            raise UsageError(f"precision: must be auto, {', '.join(_ft.PRECISIONS)}, got {self.precision!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise UsageError(f"max_seconds: must be > 0, got {self.max_seconds}")
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
    precision: Optional[str] = None          # what the fine-tune ran in, and why
    precision_reason: Optional[str] = None
    teacher_cache: Optional[dict] = None     # TeacherCache.stats() after the fine-tune
    compiled: bool = False                   # whether the student ran under torch.compile

    @property
    def finetuned(self) -> bool:
        return self.finetune is not None


def recover(model: nn.Module, plan: RecoveryPlan, *, calib: Optional[Split] = None, train: Optional[Split] = None,
            teacher: Optional[nn.Module] = None, masks: Optional[Mapping[str, torch.Tensor]] = None,
            checkpoint: Optional[Union[str, Path]] = None,
            events: Optional[RecoveryEvents] = None,
            teacher_cache: Optional["TeacherCache"] = None) -> RecoveryResult:
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
        device, precision, channels_last, threads, why = plan.resolved()
        out.precision, out.precision_reason = precision, why
        compile_ = plan.compile
        if compile_ is None:
            compile_ = (not device.startswith("cuda") and plan.epochs * len(train) >= COMPILE_MIN_IMAGES
                        and cpu.compile_support()[0])
        left = None
        if plan.max_seconds is not None:
            left = max(plan.max_seconds - (time.perf_counter() - t0), 1e-3)
        emit("stage", f"fine-tune on {train.name} ({len(train)} images, {precision})", 0, None)
        out.finetune = _ft.finetune(
            model, train, epochs=plan.epochs, max_seconds=left, lr=plan.lr, batch_size=plan.batch_size,
            weight_decay=plan.weight_decay, seed=plan.seed, device=device, precision=precision,
            channels_last=channels_last, threads=threads, compile=compile_, teacher_cache=teacher_cache,
            progress=lambda done, total: emit("progress", "fine-tune", done, total),
            teacher=teacher, distill_alpha=plan.distill if teacher is not None else None,
            distill_temperature=plan.temperature, masks=masks, checkpoint=checkpoint,
            checkpoint_every=plan.checkpoint_every)
        if teacher_cache is not None and teacher is not None and plan.distill > 0:
            out.teacher_cache = teacher_cache.stats()
        out.compiled = out.finetune.compiled
    out.seconds = time.perf_counter() - t0
    return out
