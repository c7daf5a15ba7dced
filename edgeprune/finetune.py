"""Recovery after pruning: short fine-tuning and labels-free BatchNorm recalibration.

Fine-tuning follows the reference training recipe (SGD, momentum 0.9, weight decay 5e-4, random crop with
4-pixel padding and horizontal flip) with a cosine learning-rate schedule, bounded by epochs *and* wall time,
seeded. It runs on CUDA when available, else on the CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import Split, batches, to_tensor_batch
from .errors import UsageError

Progress = Callable[[int, int], None]  # (steps done, steps planned)


@dataclass
class FinetuneResult:
    epochs_planned: int
    steps_done: int
    steps_planned: int
    images_seen: int
    seconds: float
    stopped_by_time: bool
    final_loss: float
    device: str
    split: str


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and horizontal flip, per image, on a normalised NCHW batch."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    out = _crop(padded, dy, dx, h, w)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def _crop(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    n = padded.shape[0]
    iy = (dy.view(n, 1) + torch.arange(h).view(1, h))          # n×h
    ix = (dx.view(n, 1) + torch.arange(w).view(1, w))          # n×w
    b = torch.arange(n).view(n, 1, 1)
    # advanced indexing: result n×h×w×C, then back to n×C×h×w
    return padded.permute(0, 2, 3, 1)[b, iy.view(n, h, 1), ix.view(n, 1, w)].permute(0, 3, 1, 2).contiguous()


def finetune(model: nn.Module, split: Split, *, epochs: int = 1, max_seconds: Optional[float] = None,
             lr: float = 0.01, batch_size: int = 128, weight_decay: float = 5e-4, seed: int = 0,
             device: Optional[str] = None, progress: Optional[Progress] = None) -> FinetuneResult:
    """Fine-tune ``model`` in place on ``split``; stop after ``epochs`` or ``max_seconds``, whichever is first."""
    if epochs < 1:
        raise UsageError(f"epochs: must be >= 1, got {epochs}")
    if max_seconds is not None and max_seconds <= 0:
        raise UsageError(f"max_seconds: must be > 0, got {max_seconds}")
    device = device or default_device()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    n = len(split)
    steps_per_epoch = math.ceil(n / batch_size)
    planned = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, planned) / planned)))
    labels = torch.from_numpy(split.labels)
    t0 = time.perf_counter()
    step, seen, loss_v, by_time = 0, 0, float("nan"), False
    for _ in range(epochs):
        order = rng.permutation(n)
        for sl in batches(n, batch_size):
            idx = order[sl]
            x = augment(to_tensor_batch(split.images[idx]), gen).to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seen += len(idx)
            loss_v = float(loss.detach())
            if progress is not None:
                progress(step, planned)
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                by_time = True
                break
        if by_time:
            break
    model.eval().to("cpu")
    return FinetuneResult(epochs, step, planned, seen, time.perf_counter() - t0, by_time, loss_v, device, split.name)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, split: Split, batch_size: int = 200, device: Optional[str] = None) -> int:
    """Re-estimate BatchNorm running statistics on ``split`` (no labels, no gradient). Returns images used."""
    device = device or default_device()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the whole pass
    model.to(device).train()
    for sl in batches(len(split), batch_size):
        model(to_tensor_batch(split.images[sl]).to(device))
    model.eval().to("cpu")
    return len(split)
