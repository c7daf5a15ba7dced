"""Top-1/top-5 accuracy on an eval shard, measured with the device's runtime.

Shard format: an ``.npz`` holding ``labels`` (integer, N) and either

- ``images`` (uint8, N x H x W x C, RGB, HWC), preprocessed here with the job's spec one batch at a time:
  ``x * scale``, then ``(x - mean) / std`` per channel, then NCHW if the artifact layout is NCHW; or
- ``inputs`` (float32, N x ..., already preprocessed and in the artifact's layout, e.g. N x 32 x 32 x 3 for an
  NHWC TFLite model), fed as they are. Their shape must be the artifact's input shape with any batch size.

A model with a fixed batch dimension is fed that many samples at a time (the last batch padded and the padding's
outputs dropped); a model with a dynamic batch dimension gets ``eval.batch_size``. :func:`load_shard` returns
whichever of the two arrays the shard holds; :func:`check_image_size` and :func:`preprocess` tell them apart by
dtype (uint8 images, float32 inputs).
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
    """``(images, labels)`` or ``(inputs, labels)``, whichever the shard holds (see the module docstring)."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            present = [k for k in ("images", "inputs") if k in z.files]
            if len(present) != 1 or "labels" not in z.files:
                if len(present) == 2:
                    raise EvalDataError("eval shard %s has both 'images' and 'inputs'; keep one" % path.name)
                missing = "labels" if present else "images"
                alternative = "" if present else " (or 'inputs')"
                raise EvalDataError("eval shard %s has no array %r%s (has: %s)"
                                    % (path.name, missing, alternative, ", ".join(z.files)))
            data, labels = z[present[0]], z["labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError("eval shard %s cannot be read as npz without pickle: %s" % (path.name, e)) from None
    if present[0] == "images" and (data.dtype != np.uint8 or data.ndim != 4):
        raise EvalDataError("eval shard images must be uint8 with shape (N, H, W, C); got %s %s"
                            % (data.dtype, data.shape))
    if present[0] == "inputs" and (data.dtype != np.float32 or data.ndim < 2):
        raise EvalDataError("eval shard inputs must be float32, preprocessed, with shape (N, ...) in the artifact's "
                            "layout; got %s %s" % (data.dtype, data.shape))
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise EvalDataError("eval shard labels must be integers with shape (N,); got %s %s"
                            % (labels.dtype, labels.shape))
    if len(labels) != len(data) or len(data) == 0:
        raise EvalDataError("eval shard has %d %s and %d labels; need the same number, at least 1"
                            % (len(data), present[0], len(labels)))
    if labels.min() < 0:
        raise EvalDataError("eval shard labels must be >= 0 (found %d)" % labels.min())
    return data, labels.astype(np.int64)


def is_inputs(data: np.ndarray) -> bool:
    """True for a shard's preprocessed ``inputs`` (float), False for its uint8 ``images``."""
    return data.dtype.kind == "f"


def load_inputs(path: Path, input_shape: Sequence[int], what: str) -> np.ndarray:
    """The float32 ``inputs`` array of an npz (calibration data), checked against the artifact's input shape."""
    try:
        with np.load(str(path), allow_pickle=False) as z:
            if "inputs" not in z.files:
                raise EvalDataError("%s: %s has no array 'inputs' (has: %s)" % (what, path.name, ", ".join(z.files)))
            data = z["inputs"]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError("%s: %s cannot be read as npz without pickle: %s" % (what, path.name, e)) from None
    if data.dtype != np.float32:
        raise EvalDataError("%s: %s inputs must be float32; got %s" % (what, path.name, data.dtype))
    check_inputs_shape(data, input_shape, "%s %s inputs" % (what, path.name))
    return data


def check_inputs_shape(data: np.ndarray, input_shape: Sequence[int], what: str = "eval shard inputs") -> None:
    want = tuple(int(d) for d in input_shape[1:])
    if tuple(data.shape[1:]) != want:
        raise EvalDataError("%s have shape %s but the model input %s wants (N, %s)"
                            % (what, tuple(data.shape), list(input_shape), ", ".join(map(str, want))))


def preprocess(images: np.ndarray, spec: PreprocessSpec, layout: str) -> np.ndarray:
    """uint8 images -> float32 model inputs in ``layout``; preprocessed ``inputs`` are returned as they are."""
    if is_inputs(images):
        return np.ascontiguousarray(images, dtype=np.float32)
    if images.shape[-1] != len(spec.mean):
        raise EvalDataError("eval images have %d channels but preprocess.mean has %d entries"
                            % (images.shape[-1], len(spec.mean)))
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (images.astype(np.float32) * np.float32(spec.scale) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)


def check_image_size(images: np.ndarray, input_shape: Sequence[int], layout: str) -> None:
    """uint8 images: their H x W must be the model's. Preprocessed inputs: their whole shape but the batch."""
    if is_inputs(images):
        check_inputs_shape(images, input_shape)
        return
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
