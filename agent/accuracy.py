"""Top-1/top-5 accuracy on an eval shard, measured with the device's runtime.

Shard format: an ``.npz`` holding ``images`` (uint8, N x H x W x C, RGB, HWC) and ``labels`` (integer, N).
Preprocessing is the job's, one batch at a time: ``x * scale``, then ``(x - mean) / std`` per channel, then NCHW
if the artifact layout is NCHW. A model with a fixed batch dimension is fed that many images at a time (the last
batch padded and the padding's outputs dropped); a model with a dynamic batch dimension gets ``eval.batch_size``.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np

from agent import EvalDataError
from agent.schema import PreprocessSpec

RunFn = Callable[[np.ndarray], np.ndarray]


def load_shard(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(str(path), allow_pickle=False) as z:
            missing = [k for k in ("images", "labels") if k not in z.files]
            if missing:
                raise EvalDataError("eval shard %s has no array %r (has: %s)"
                                    % (path.name, missing[0], ", ".join(z.files)))
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError("eval shard %s cannot be read as npz without pickle: %s" % (path.name, e)) from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise EvalDataError("eval shard images must be uint8 with shape (N, H, W, C); got %s %s"
                            % (images.dtype, images.shape))
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise EvalDataError("eval shard labels must be integers with shape (N,); got %s %s"
                            % (labels.dtype, labels.shape))
    if len(labels) != len(images) or len(images) == 0:
        raise EvalDataError("eval shard has %d images and %d labels; need the same number, at least 1"
                            % (len(images), len(labels)))
    if labels.min() < 0:
        raise EvalDataError("eval shard labels must be >= 0 (found %d)" % labels.min())
    return images, labels.astype(np.int64)


def preprocess(images: np.ndarray, spec: PreprocessSpec, layout: str) -> np.ndarray:
    if images.shape[-1] != len(spec.mean):
        raise EvalDataError("eval images have %d channels but preprocess.mean has %d entries"
                            % (images.shape[-1], len(spec.mean)))
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (images.astype(np.float32) * np.float32(spec.scale) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)


def check_image_size(images: np.ndarray, input_shape: Sequence[int], layout: str) -> None:
    want = tuple(input_shape[2:4] if layout == "NCHW" else input_shape[1:3])
    if tuple(images.shape[1:3]) != want:
        raise EvalDataError("eval images are %dx%d but the model input (%s %s) wants %dx%d"
                            % (images.shape[1], images.shape[2], layout, list(input_shape), want[0], want[1]))


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> int:
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int((top == labels[:, None]).any(axis=1).sum())


def evaluate(run: RunFn, images: np.ndarray, labels: np.ndarray, prep: Callable[[np.ndarray], np.ndarray],
             batch_size: int, fixed_batch: Optional[int],
             between: Optional[Callable[[], Any]] = None) -> Tuple[int, float, float]:
    """(n, top1, top5); images are preprocessed batch by batch; ``between`` is called after every batch."""
    b = fixed_batch if fixed_batch is not None else batch_size
    n = len(images)
    c1 = c5 = 0
    for i in range(0, n, b):
        real = min(b, n - i)
        chunk = prep(images[i:i + real])
        if real < b and fixed_batch is not None:
            chunk = np.concatenate([chunk, np.zeros((b - real,) + chunk.shape[1:], dtype=chunk.dtype)])
        out = np.asarray(run(chunk))
        if out.ndim != 2 or out.shape[0] != len(chunk):
            raise EvalDataError("model output has shape %s; scoring needs (batch, classes) logits" % (out.shape,))
        out, y = out[:real], labels[i:i + real]
        if y.max() >= out.shape[1]:
            raise EvalDataError("eval label %d is out of range for a model with %d outputs"
                                % (y.max(), out.shape[1]))
        c1 += topk_correct(out, y, 1)
        c5 += topk_correct(out, y, 5)
        if between is not None:
            between()
    return n, c1 / n, c5 / n
