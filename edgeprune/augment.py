"""Training batches for recovery: the reference augmentation (random crop with 4-pixel padding, horizontal flip),
done on whole batches of tensors, never per image in Python.

:class:`TrainBatches` decodes a split once: a uint8 split (N×H×W×C, as images are stored) stays uint8 in one torch
tensor, and each batch is cropped and flipped *as uint8* (a quarter of the bytes of float) and only then
converted and normalised. The result is N×C×H×W with channels-last strides (the NHWC data permuted, no copy), the
layout oneDNN's convolutions prefer on a CPU; ``.contiguous()`` gives classic NCHW. The padding is the pixel
value nearest each channel's mean, so padded pixels normalise to ~0, as zero padding of the normalised image
does. A float split (a user's preprocessed N×C×H×W tensors) is augmented in float with zero padding
(:func:`augment`). The random draws (rows, then columns, then flips, from ``gen``) are the same for both, so a
seed gives the same crops and flips either way.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Split

__all__ = ["augment", "TrainBatches", "PAD"]

PAD = 4   # pixels of padding before the random crop


def _draws(n: int, gen: torch.Generator):
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return dy, dx, flip


def _crop_nhwc(padded: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image h×w windows at (dy, dx) of an N×H'×W'×C batch, by one advanced-indexing gather."""
    n = padded.shape[0]
    iy = dy.view(n, 1) + torch.arange(h).view(1, h)
    ix = dx.view(n, 1) + torch.arange(w).view(1, w)
    b = torch.arange(n).view(n, 1, 1)
    return padded[b, iy.view(n, h, 1), ix.view(n, 1, w)]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and horizontal flip, per image, on a normalised float N×C×H×W batch."""
    n, _, h, w = x.shape
    dy, dx, flip = _draws(n, gen)
    padded = F.pad(x, (PAD, PAD, PAD, PAD)).permute(0, 2, 3, 1)
    out = _crop_nhwc(padded, dy, dx, h, w).permute(0, 3, 1, 2).contiguous()
    out[flip] = out[flip].flip(3)
    return out


class TrainBatches:
    """A split decoded once, served as augmented, normalised training batches (see the module docstring)."""

    def __init__(self, split: Split) -> None:
        self.split = split
        self.uint8 = split.images.dtype == np.uint8 and split.images.ndim == 4
        if self.uint8:
            self.images = torch.from_numpy(np.ascontiguousarray(split.images))          # N×H×W×C uint8
            c = self.images.shape[3]
            mean = torch.tensor(list(split.mean), dtype=torch.float32)
            std = torch.tensor(list(split.std), dtype=torch.float32)
            if mean.numel() != c or std.numel() != c:
                split.batch(slice(0, 1))   # raises the preprocessing error that names mean/std
            # x·scale then (x - mean)/std, folded into one multiply-add per channel
            self._mul = (split.scale / std).view(1, 1, 1, c)
            self._add = (-mean / std).view(1, 1, 1, c)
            pad = torch.round(mean / split.scale).clamp(0, 255).to(torch.uint8)
            self._pad = pad
        self.labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, idx: Sequence[int] | np.ndarray, gen: torch.Generator) -> torch.Tensor:
        """Images ``idx``, augmented with draws from ``gen``: float N×C×H×W (channels-last strides if uint8)."""
        if not self.uint8:
            return augment(self.split.batch(idx), gen)
        imgs = self.images[torch.as_tensor(np.asarray(idx, dtype=np.int64))]
        n, h, w, c = imgs.shape
        dy, dx, flip = _draws(n, gen)
        padded = self._pad.view(1, 1, 1, c).expand(n, h + 2 * PAD, w + 2 * PAD, c).clone()
        padded[:, PAD:PAD + h, PAD:PAD + w] = imgs
        out = _crop_nhwc(padded, dy, dx, h, w)
        out[flip] = out[flip].flip(2)
        x = out.float().mul_(self._mul).add_(self._add)
        return x.permute(0, 3, 1, 2)

    def labels_of(self, idx: Any) -> torch.Tensor:
        return self.labels[torch.as_tensor(np.asarray(idx, dtype=np.int64))]
