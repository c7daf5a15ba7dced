"""Recovery after pruning: short fine-tuning (optionally distilled, sparsity-keeping, resumable), labels-free
BatchNorm recalibration, and a top-1 evaluation helper.

Fine-tuning follows the reference training recipe (SGD, momentum 0.9, weight decay 5e-4, random crop with
4-pixel padding and horizontal flip) with a cosine learning-rate schedule, bounded by epochs, wall time and
optionally a step count, seeded. It runs on CUDA when available (with ``cudnn.benchmark``), else on the CPU.

Options:

* **Distillation** from a dense ``teacher``: ``loss = (1 - α)·CE(student, y) + α·T²·KL(p_teacher ‖ p_student)``
  with both distributions softened by the temperature ``T`` (Hinton et al., 2015). The teacher runs in eval mode,
  without gradients, on the student's device and on the same augmented batch.
* **Sparsity**: ``masks`` (parameter name → bool, from :mod:`edgeprune.sparsity`) are kept exactly: the masked
  gradients are zeroed and the masks re-applied after every optimizer step.
* **Checkpoints**: with ``checkpoint=path`` the full training state (weights, optimizer, scheduler, step and
  epoch position, every RNG) is written atomically every ``checkpoint_every`` steps, when a bound stops the run,
  when it completes, and when it is interrupted between steps (an exception from ``progress``, Ctrl-C there).
  If the file exists at the start, training resumes from it; on the CPU a resumed run ends with bit-identical
  weights to an uninterrupted one. The checkpoint records the training configuration (hyper-parameters, the
  split's content hash, the teacher's and the masks' hashes); a different configuration is refused. The
  starting weights are not part of it: the caller must rebuild the same model (replay the pruning plan) first.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import TrainBatches, augment
from .data import Split, batches
from .errors import DataError, UsageError

if TYPE_CHECKING:
    from .teacher_cache import TeacherCache

__all__ = ["FinetuneResult", "Progress", "default_device", "augment", "finetune", "distillation_loss",
           "recalibrate_bn", "evaluate", "CHECKPOINT_FORMAT", "PRECISIONS"]

Progress = Callable[[int, int], None]  # (steps done, steps planned)

CHECKPOINT_FORMAT = "edgeprune-finetune-checkpoint"
CHECKPOINT_VERSION = 2   # 2: precision, layout, compile and the augmentation in the configuration
MOMENTUM = 0.9
PRECISIONS = ("fp32", "bf16")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did. Step and image counts are cumulative over resumed runs; ``seconds`` is this
    call's wall time. ``sparse_layers`` is the number of masked parameters, ``sparsity_kept`` whether every
    masked weight is exactly zero at the end (None without masks)."""

    epochs_planned: int
    steps_done: int
    steps_planned: int
    images_seen: int
    seconds: float
    stopped_by_time: bool
    final_loss: float
    device: str
    split: str
    stopped_by_steps: bool = False
    resumed: bool = False
    resumed_from_step: int = 0
    checkpoint: Optional[str] = None
    distill_alpha: Optional[float] = None
    distill_temperature: Optional[float] = None
    sparse_layers: int = 0
    sparsity_kept: Optional[bool] = None
    precision: str = "fp32"
    compiled: bool = False                  # the student ran under torch.compile
    compile_error: Optional[str] = None     # why torch.compile was given up for eager (None: it was not)

    @property
    def completed(self) -> bool:
        return self.steps_done >= self.steps_planned


def _first(out: Any) -> torch.Tensor:
    """The first output of a forward (the logits of a multi-head model, by convention): what is trained on."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        return _first(next(iter(out.values())))
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------- helpers

def _positive_int(value: Any, arg: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UsageError(f"{arg}: must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _state_sha256(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def _split_sha256(split: Split) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(split.images).tobytes())
    h.update(np.ascontiguousarray(split.labels).astype(np.int64).tobytes())
    return h.hexdigest()


def _atomic_save(obj: Dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path, model: nn.Module, config: Dict[str, Any]) -> Dict[str, Any]:
    """Read and validate a fine-tuning checkpoint; errors name the file."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise DataError(f"{path}: not a readable fine-tuning checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path}: not an edgeprune fine-tuning checkpoint (delete it or choose another path)")
    if ck.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: checkpoint version {ck.get('version')!r}, this edgeprune reads "
                        f"{CHECKPOINT_VERSION} (written by another edgeprune); delete it to fine-tune from the start")
    saved, own = ck["model"], model.state_dict()
    problems = [f"missing {k}" for k in own if k not in saved] + [f"unexpected {k}" for k in saved if k not in own]
    problems += [f"{k}: checkpoint {tuple(saved[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in own.items() if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"{path}: checkpoint does not fit the model ({'; '.join(problems[:5])}{more}); rebuild the "
                        "same pruned model (replay its plan) before resuming, or delete the checkpoint")
    if ck.get("config") != config:
        old = ck.get("config") or {}
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise UsageError(f"{path}: checkpoint was written by a fine-tuning run with a different configuration "
                         f"(differs in: {', '.join(diff)}); use the same settings to resume, or delete it")
    return ck


# ----------------------------------------------------------------------------------------------- finetune

def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      alpha: float, temperature: float) -> torch.Tensor:
    """``(1 - alpha)·CE(logits, targets) + alpha·T²·KL(softmax(teacher/T) ‖ softmax(logits/T))``, batch mean.

    The T² factor keeps the soft-target gradients on the same scale as the hard-target ones (Hinton et al.)."""
    ce = F.cross_entropy(logits, targets)
    kd = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature ** 2 * kd


def finetune(model: nn.Module, split: Split, *, epochs: int = 1, max_seconds: Optional[float] = None,
             lr: float = 0.01, batch_size: int = 128, weight_decay: float = 5e-4, seed: int = 0,
             device: Optional[str] = None, progress: Optional[Progress] = None,
             max_steps: Optional[int] = None,
             teacher: Optional[nn.Module] = None, distill_alpha: Optional[float] = None,
             distill_temperature: float = 4.0,
             masks: Optional[Mapping[str, torch.Tensor]] = None,
             checkpoint: Optional[Union[str, Path]] = None, checkpoint_every: int = 100,
             deterministic: bool = False, precision: str = "fp32", channels_last: bool = False,
             teacher_cache: Optional["TeacherCache"] = None, compile: bool = False,
             threads: Optional[int] = None) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``split``; stop after ``epochs``, ``max_seconds`` of wall time or
    ``max_steps`` (counted from the start of training, resumed steps included), whichever comes first.

    The learning-rate schedule is cosine over ``epochs``; the time and step bounds cut it short without
    changing it, so a run stopped by them can be resumed from its ``checkpoint`` to the same end.

    ``teacher``: a dense model to distil from, weighted by ``distill_alpha`` (default 0.5 with a teacher; 0 is
    plain cross-entropy, the teacher unused; given without a teacher it is an error) at temperature
    ``distill_temperature``. ``masks``: 2:4 (or any) sparsity masks
    to keep exactly, keyed by parameter name (``sparsity.apply_2to4(model).masks``); they are applied at the
    start, so masked weights are zero from the first step. ``checkpoint``: a file (its folder is created) to
    save to every ``checkpoint_every`` steps and resume from (see the module docstring). ``deterministic``:
    on CUDA, use deterministic cuDNN kernels instead of ``cudnn.benchmark``. ``progress(step, planned)`` is
    called after each step.

    Speed (the results do not depend on them except through rounding): ``precision`` "bf16" runs the forward
    passes (student and teacher) under bf16 autocast with fp32 weights, gradients and optimizer state ("fp32":
    none); ``channels_last`` trains in that memory layout (weights go back to the default layout at the end; on
    a CPU the teacher always runs channels-last, the faster layout for inference there);
    ``teacher_cache`` (:class:`~edgeprune.teacher_cache.TeacherCache`) serves the teacher's logits for batches
    another run with the same key already computed; ``compile`` wraps the student in :func:`torch.compile`;
    ``threads`` sets torch's intra-op threads for the run (restored after).

    Returns a :class:`FinetuneResult`; the model is left in eval mode on the CPU.
    """
    from .sparsity import MaskKeeper, masks_sha256
    from .cpu import BF16_FLAGS, cpu_flags
    from .teacher_cache import AUGMENTATION, cache_key

    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    checkpoint_every = _positive_int(checkpoint_every, "checkpoint_every")
    if max_steps is not None:
        max_steps = _positive_int(max_steps, "max_steps")
    if max_seconds is not None and not max_seconds > 0:
        raise UsageError(f"max_seconds: must be > 0, got {max_seconds}")
    if not lr > 0:
        raise UsageError(f"lr: must be > 0, got {lr}")
    if not weight_decay >= 0:
        raise UsageError(f"weight_decay: must be >= 0, got {weight_decay}")
    if len(split) == 0:
        raise UsageError(f"split: {split.name!r} has no images")
    if precision not in PRECISIONS:
        raise UsageError(f"precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if threads is not None:
        threads = _positive_int(threads, "threads")
    if teacher is None:
        if distill_alpha is not None:
            raise UsageError("distill_alpha: given without a teacher")
        alpha = 0.0
    else:
        if teacher is model:
            raise UsageError("teacher: must be a separate model (a dense copy), not the model being fine-tuned")
        alpha = 0.5 if distill_alpha is None else float(distill_alpha)
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"distill_alpha: must lie in [0, 1], got {distill_alpha}")
        if not distill_temperature > 0:
            raise UsageError(f"distill_temperature: must be > 0, got {distill_temperature}")
        if alpha == 0.0:
            teacher = None      # weight 0: plain cross-entropy, and the teacher is never run
    temperature = float(distill_temperature)
    device = device or default_device()
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    if ckpt_path is not None and ckpt_path.is_dir():
        raise UsageError(f"checkpoint: {ckpt_path} is a directory; give a file path")
    if masks is not None:
        MaskKeeper(model, masks)  # validate names and shapes before anything changes
    data = TrainBatches(split)    # decoded once; checks the split's mean/std against its channels

    t0 = time.perf_counter()
    n = len(split)
    steps_per_epoch = math.ceil(n / batch_size)
    planned = steps_per_epoch * epochs
    # Validate an existing checkpoint before the model is touched: a mismatch leaves everything as it was.
    config: Dict[str, Any] = {}
    ck: Optional[Dict[str, Any]] = None
    if ckpt_path is not None:
        config = {"epochs": epochs, "lr": float(lr), "batch_size": batch_size, "weight_decay": float(weight_decay),
                  "momentum": MOMENTUM, "nesterov": True, "schedule": "cosine", "seed": int(seed),
                  "split": split.name, "split_images": n, "split_sha256": _split_sha256(split),
                  "distill_alpha": alpha if teacher is not None else None,
                  "distill_temperature": temperature if teacher is not None else None,
                  "teacher_sha256": _state_sha256(teacher) if teacher is not None else None,
                  "masks_sha256": masks_sha256(masks) if masks is not None else None,
                  "precision": precision, "channels_last": bool(channels_last), "compile": bool(compile),
                  "augmentation": AUGMENTATION}
        if ckpt_path.is_file():
            ck = _load_checkpoint(ckpt_path, model, config)
        else:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)

    if teacher_cache is not None and teacher is not None:
        teacher_cache.bind(cache_key(teacher_sha256=config.get("teacher_sha256") or _state_sha256(teacher),
                                     split_sha256=config.get("split_sha256") or _split_sha256(split),
                                     batch_size=batch_size, seed=seed, precision=precision,
                                     channels_last=channels_last,
                                     context={"normalise": [list(split.mean), list(split.std), split.scale],
                                              "device": device, "torch": torch.__version__,
                                              "bf16_units": sorted(cpu_flags() & set(BF16_FLAGS))}))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    on_cpu = not device.startswith("cuda")
    autocast = (lambda: torch.autocast("cpu" if on_cpu else "cuda", dtype=torch.bfloat16,
                                       enabled=precision == "bf16"))

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    # everything below changes the process, the model or the teacher: the finally clause puts each back
    threads_before = torch.get_num_threads()
    cudnn_state = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    teacher_state = None
    if teacher is not None:
        p0 = next(teacher.parameters(), None)
        teacher_state = (teacher.training, p0.device if p0 is not None else None,
                         p0 is not None and p0.dim() == 4 and p0.is_contiguous(memory_format=torch.channels_last)
                         and not p0.is_contiguous())
    keeper = None
    started = False   # the loop has begun: only then is an interrupted state worth a checkpoint
    # Training position: `epoch` epochs begun, `pos` batches of the current one done, `order` its permutation.
    step, epoch, pos, order, seen, loss_v = 0, 0, 0, None, 0, float("nan")
    resumed_from: Optional[int] = None
    saved_step, by_time, by_steps = -1, False, False
    at_boundary = True  # the state is between two steps (safe to checkpoint)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.to(device).train()
        if channels_last:
            model.to(memory_format=layout)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay,
                              nesterov=True)
        # Masked gradients are zeroed by hooks and the weights re-masked after every opt.step().
        keeper = MaskKeeper(model, masks, optimizer=opt) if masks is not None else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, planned) / planned)))
        if ck is not None:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            step, epoch, pos, seen, loss_v = ck["step"], ck["epoch"], ck["pos"], ck["images_seen"], ck["final_loss"]
            order = ck["order"].numpy() if ck["order"] is not None else None
            torch.set_rng_state(ck["rng"]["torch"])
            if ck["rng"]["cuda"] is not None and torch.cuda.is_available() \
                    and len(ck["rng"]["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
            gen.set_state(ck["rng"]["generator"])
            rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
            resumed_from = step

        def save() -> None:
            assert ckpt_path is not None
            _atomic_save({
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": config,
                "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
                "model": {k: v.detach().to("cpu") for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "step": step, "epoch": epoch, "pos": pos, "images_seen": seen, "final_loss": loss_v,
                "order": torch.from_numpy(order) if order is not None else None,
                "rng": {"torch": torch.get_rng_state(), "generator": gen.get_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                        "numpy": json.dumps(rng.bit_generator.state)},
            }, ckpt_path)

        if teacher is not None:
            teacher.to(device).eval()
            if on_cpu:   # inference: oneDNN is fastest channels-last on a CPU (bench/recovery.py)
                teacher.to(memory_format=torch.channels_last)
        # a compiled student serves the full batches; an epoch's short last batch runs eager (same weights) rather
        # than trigger a second compilation for its shape
        student = torch.compile(model) if compile else model
        compiled_once, compile_error = False, None

        def teacher_logits(x: torch.Tensor, epoch: int, pos: int) -> torch.Tensor:
            assert teacher is not None
            if teacher_cache is not None:
                hit = teacher_cache.get(epoch, pos)
                if hit is not None:
                    return hit.to(device)
            if on_cpu:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast():
                out = _first(teacher(x))
            out = out.float().clone()   # what is used is what a cache would keep: fp32 logits
            return teacher_cache.put(epoch, pos, out).to(device) if teacher_cache is not None else out

        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = not deterministic
            torch.backends.cudnn.deterministic = deterministic
        if resumed_from is not None:
            saved_step = step
        if keeper is not None:
            keeper.__enter__()
        started = True
        while step < planned:
            if max_steps is not None and step >= max_steps:
                by_steps = True
                break
            at_boundary = False
            if order is None or pos == steps_per_epoch:
                order, pos, epoch = rng.permutation(n), 0, epoch + 1
            idx = order[pos * batch_size:min((pos + 1) * batch_size, n)]
            x = data.batch(idx, gen).to(device, non_blocking=True).contiguous(memory_format=layout)
            y = data.labels_of(idx).to(device, non_blocking=True)
            t_logits = teacher_logits(x, epoch, pos) if teacher is not None and alpha > 0 else None
            fwd = student if len(idx) == batch_size else model
            with autocast():
                try:
                    out = fwd(x)
                except Exception as e:   # torch.compile failed (no compiler, unsupported op): go on eager
                    if fwd is model or compiled_once:
                        raise
                    compile_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                    student = fwd = model
                    out = fwd(x)
                compiled_once = compiled_once or fwd is not model
                logits = _first(out)
            logits = logits.float()
            if t_logits is not None:
                if t_logits.shape != logits.shape:
                    raise UsageError(f"teacher: outputs {tuple(t_logits.shape)} for a batch where the model "
                                     f"outputs {tuple(logits.shape)}")
                loss = distillation_loss(logits, t_logits, y, alpha=alpha, temperature=temperature)
            else:
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step, pos, seen, loss_v = step + 1, pos + 1, seen + len(idx), float(loss.detach())
            at_boundary = True
            if ckpt_path is not None and step % checkpoint_every == 0:
                save()
                saved_step = step
                if teacher_cache is not None:
                    teacher_cache.flush()
            if progress is not None:
                progress(step, planned)
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds and step < planned:
                by_time = True
                break
        if ckpt_path is not None and step != saved_step:
            save()
    except BaseException:
        if ckpt_path is not None and started and at_boundary and step != saved_step:
            try:
                save()  # interrupted between steps: keep the progress made
            except Exception:  # best effort (the save itself may be what failed); the original error matters
                pass
        raise
    finally:
        if teacher_cache is not None:
            teacher_cache.flush()
        torch.set_num_threads(threads_before)
        if keeper is not None and started:
            keeper.__exit__(None, None, None)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn_state
        if teacher is not None and teacher_state is not None:
            teacher.train(teacher_state[0])
            if teacher_state[1] is not None:
                teacher.to(teacher_state[1])
            teacher.to(memory_format=torch.channels_last if teacher_state[2] else torch.contiguous_format)
        model.eval().to("cpu")
        if channels_last:
            model.to(memory_format=torch.contiguous_format)

    kept = keeper.violations() == 0 if keeper is not None else None
    return FinetuneResult(
        epochs, step, planned, seen, time.perf_counter() - t0, by_time, loss_v, device, split.name,
        stopped_by_steps=by_steps, resumed=resumed_from is not None, resumed_from_step=resumed_from or 0,
        checkpoint=str(ckpt_path) if ckpt_path is not None else None,
        distill_alpha=alpha if teacher is not None else None,
        distill_temperature=temperature if teacher is not None else None,
        sparse_layers=len(keeper) if keeper is not None else 0, sparsity_kept=kept, precision=precision,
        compiled=compile and compile_error is None, compile_error=compile_error)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batch_size: int = 200, device: Optional[str] = None) -> int:
    """Re-estimate BatchNorm running statistics on ``split`` (no labels, no gradient). Returns images used.

    Only the BatchNorm buffers change; weights (and so pruning and 2:4 sparsity patterns) are untouched. Each
    layer's ``momentum`` is put back afterwards (the pass itself averages cumulatively), so a fine-tune that
    follows tracks its statistics as training does, and a compiled student has no per-layer graph break.
    The model is left in eval mode on the CPU."""
    batch_size = _positive_int(batch_size, "batch_size")
    device = device or default_device()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the whole pass
    model.to(device).train()
    try:
        for sl in batches(len(split), batch_size):
            model(split.batch(sl).to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval().to("cpu")
    return len(split)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 500, device: Optional[str] = None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on ``split``, in eval mode, without gradients.

    The model's mode and device are restored afterwards."""
    batch_size = _positive_int(batch_size, "batch_size")
    if len(split) == 0:
        raise UsageError(f"split: {split.name!r} has no images")
    device = device or default_device()
    was_training = model.training
    p0 = next(model.parameters(), None)
    home = p0.device if p0 is not None else torch.device("cpu")
    model.to(device).eval()
    correct = 0
    try:
        for sl in batches(len(split), batch_size):
            pred = _first(model(split.batch(sl).to(device))).argmax(1).cpu().numpy()
            correct += int((pred == split.labels[sl]).sum())
    finally:
        model.train(was_training).to(home)
    return correct / len(split)
