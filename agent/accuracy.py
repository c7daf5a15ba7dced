"""Accuracy and label-free fidelity on eval shards, measured with the device's runtime.

Shard format: an ``.npz`` (read without pickle) holding either

- ``images`` (uint8, N x H x W x C, RGB, HWC), preprocessed here with the job's spec one batch at a time:
  ``x * scale``, then ``(x - mean) / std`` per channel, then NCHW if the artifact layout is NCHW; or
- ``inputs`` (float32, N x ..., already preprocessed and in the artifact's layout, e.g. N x 32 x 32 x 3 for an
  NHWC TFLite model), fed as they are; NCHW inputs for an NHWC artifact are transposed (:func:`inputs_in_layout`). Their shape must be the artifact's input shape with any batch size;

and at least one of

- ``labels`` (integer >= 0, N): scored as top-1/top-5 on the model's output 0, which must be (N, classes);
- ``reference_0``, ``reference_1``, ... (float32, N x ...): the dense model's outputs 0, 1, ... computed on the
  host on exactly these samples (``edgeprune.shards.reference_outputs``). There must be one per model output,
  numbered from 0 without gaps, each with the shape of that output. A shard without labels is scored by fidelity
  alone.

A job's shards (``eval.shards``) are scored one after the other, one in memory at a time, and must all hold the
same kinds of arrays (labels in all or none, the same number of references). Every sum is accumulated over all
batches of all shards, so two shards give the metrics of one shard holding both.

Metrics (``AccuracyResult`` in :mod:`agent.schema`): ``top1``/``top5`` (labels); per output ``snr_db`` =
``10 log10(sum ref^2 / sum (out - ref)^2)`` from the summed signal and error energies (not an average of
per-batch values), :data:`SNR_CAP_DB` when the error is exactly zero (and clipped to +-:data:`SNR_CAP_DB`),
``max_abs_err`` and, for logit-like outputs (shape (N, C) with C >= 2), ``agreement``: the fraction of samples
whose argmax equals the reference's. The headline values are the worst over outputs (min SNR, min agreement,
max error).

A model with a fixed batch dimension is fed that many samples at a time (the last batch padded and the padding's
outputs dropped); a model with a dynamic batch dimension gets ``eval.batch_size``. :func:`load_shard` returns
whichever of ``images``/``inputs`` the shard holds; :func:`check_image_size` and :func:`preprocess` tell them
apart by dtype (uint8 images, float32 inputs).
"""
from __future__ import annotations

import hashlib
import math
import re
import zipfile
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from agent import EvalDataError
from agent.schema import AccuracyResult, OutputFidelity, PreprocessSpec

RunFn = Callable[[np.ndarray], np.ndarray]
RunAllFn = Callable[[np.ndarray], List[np.ndarray]]

SNR_CAP_DB = 300.0   # snr_db when out == ref exactly (and the bound of any value): JSON has no infinity
_REFERENCE_RE = re.compile(r"^reference_(\d+)$")


class Shard(object):
    """One eval shard in memory: ``data`` (uint8 images or float32 inputs), ``labels`` (int64, or None) and
    ``references`` (float32 arrays, one per model output; empty when the shard has none)."""

    def __init__(self, name: str, data: np.ndarray, labels: Optional[np.ndarray],
                 references: List[np.ndarray]) -> None:
        self.name = name
        self.data = data
        self.labels = labels
        self.references = references

    def __len__(self) -> int:
        return len(self.data)


def load_shard(path: Path) -> Shard:
    """The shard at ``path``, checked (see the module docstring); EvalDataError saying what is wrong."""
    name = path.name
    try:
        with np.load(str(path), allow_pickle=False) as z:
            files = list(z.files)
            present = [k for k in ("images", "inputs") if k in files]
            if len(present) == 2:
                raise EvalDataError("eval shard %s has both 'images' and 'inputs'; keep one" % name)
            if not present:
                raise EvalDataError("eval shard %s has no array 'images' (or 'inputs') (has: %s)"
                                    % (name, ", ".join(files)))
            numbered = {}
            for key in files:
                m = _REFERENCE_RE.match(key)
                if m:
                    numbered[int(m.group(1))] = key
            if "labels" not in files and not numbered:
                raise EvalDataError("eval shard %s has no array 'labels' and no 'reference_0': a shard needs labels, "
                                    "the dense model's outputs (reference_0, reference_1, ...) or both (has: %s)"
                                    % (name, ", ".join(files)))
            missing = [k for k in range(len(numbered)) if k not in numbered]
            if missing:
                raise EvalDataError("eval shard %s has %s but no 'reference_%d': references are numbered from 0 "
                                    "without gaps, one per model output"
                                    % (name, ", ".join(numbered[k] for k in sorted(numbered)), missing[0]))
            data = z[present[0]]
            labels = z["labels"] if "labels" in files else None
            references = [z[numbered[k]] for k in range(len(numbered))]
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise EvalDataError("eval shard %s cannot be read as npz without pickle: %s" % (name, e)) from None
    if present[0] == "images" and (data.dtype != np.uint8 or data.ndim != 4):
        raise EvalDataError("eval shard images must be uint8 with shape (N, H, W, C); got %s %s"
                            % (data.dtype, data.shape))
    if present[0] == "inputs" and (data.dtype != np.float32 or data.ndim < 2):
        raise EvalDataError("eval shard inputs must be float32, preprocessed, with shape (N, ...) in the artifact's "
                            "layout; got %s %s" % (data.dtype, data.shape))
    if len(data) == 0:
        raise EvalDataError("eval shard %s has no samples (0 %s)" % (name, present[0]))
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise EvalDataError("eval shard labels must be integers with shape (N,); got %s %s"
                                % (labels.dtype, labels.shape))
        if len(labels) != len(data):
            raise EvalDataError("eval shard has %d %s and %d labels; need the same number, at least 1"
                                % (len(data), present[0], len(labels)))
        if labels.min() < 0:
            raise EvalDataError("eval shard labels must be >= 0 (found %d)" % labels.min())
        labels = labels.astype(np.int64)
    for k, ref in enumerate(references):
        if ref.dtype != np.float32 or ref.ndim < 1:
            raise EvalDataError("eval shard %s reference_%d must be float32 with shape (N, ...); got %s %s"
                                % (name, k, ref.dtype, ref.shape))
        if len(ref) != len(data):
            raise EvalDataError("eval shard %s has %d %s and %d rows in reference_%d; need the same number"
                                % (name, len(data), present[0], len(ref), k))
        if not np.isfinite(ref).all():
            raise EvalDataError("eval shard %s reference_%d has non-finite values (NaN or inf)" % (name, k))
    return Shard(name, data, labels, references)


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


def inputs_in_layout(data: np.ndarray, input_shape: Sequence[int], layout: str) -> np.ndarray:
    """Preprocessed ``inputs`` for an NHWC artifact: already NHWC, they pass; NCHW (torch's layout, in which the host
    writes a user's ``MODULE:CALLABLE`` dataset) they are transposed once here. Anything else passes unchanged and
    :func:`check_image_size` names the mismatch. uint8 images are laid out by :func:`preprocess`."""
    if not is_inputs(data) or layout != "NHWC" or data.ndim != 4 or len(input_shape) != 4:
        return data
    h, w, c = (int(d) for d in input_shape[1:])
    if tuple(data.shape[1:]) == (h, w, c):
        return data
    if tuple(data.shape[1:]) == (c, h, w):
        return np.ascontiguousarray(data.transpose(0, 2, 3, 1))
    return data


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


def is_logit_like(shape: Sequence[int]) -> bool:
    """An output of shape (N, C) with C >= 2 (given without the batch: (C,)): scored by top-1 agreement."""
    return len(shape) == 1 and shape[0] >= 2


def snr_db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)`` from summed energies, clipped to +-SNR_CAP_DB (SNR_CAP_DB when noise is 0)."""
    if noise <= 0.0:
        return SNR_CAP_DB
    if signal <= 0.0:
        return -SNR_CAP_DB
    return max(-SNR_CAP_DB, min(SNR_CAP_DB, 10.0 * math.log10(signal / noise)))


class Scorer(object):
    """Running sums over every batch of every shard: label hits on output 0 and, per output, the reference's
    signal energy, the error energy, the largest absolute error and the argmax agreements."""

    def __init__(self) -> None:
        self.n = 0
        self.top1_hits = 0
        self.top5_hits = 0
        self.labelled: Optional[bool] = None     # set by the first shard; every other must agree
        self.n_references: Optional[int] = None
        self.first_shard = ""
        self.shapes: Optional[List[Tuple[int, ...]]] = None   # per output, without the batch
        self.signal: List[float] = []
        self.noise: List[float] = []
        self.max_err: List[float] = []
        self.agree: List[int] = []

    def start_shard(self, shard: Shard) -> None:
        """Check that ``shard`` holds the same kinds of arrays as the first one."""
        labelled, refs = shard.labels is not None, len(shard.references)
        if self.labelled is None:
            self.labelled, self.n_references, self.first_shard = labelled, refs, shard.name
            return
        if labelled != self.labelled:
            raise EvalDataError("eval shard %s %s labels but the first shard %s %s: every shard must hold the same "
                                "arrays" % (shard.name, "has" if labelled else "has no", self.first_shard,
                                            "has" if self.labelled else "has none"))
        if refs != self.n_references:
            raise EvalDataError("eval shard %s has %d references but the first shard %s has %d: every shard must "
                                "hold the same arrays" % (shard.name, refs, self.first_shard, self.n_references))

    def add(self, outputs: List[np.ndarray], labels: Optional[np.ndarray], references: List[np.ndarray],
            where: str = "") -> None:
        """Score one batch: the model's ``outputs`` (batch first, padding already dropped) against ``labels``
        (scored on output 0) and ``references`` (one per output, or none)."""
        shapes = [tuple(int(d) for d in o.shape[1:]) for o in outputs]
        if self.shapes is None:
            self.shapes = shapes
            k = len(outputs)
            self.signal, self.noise, self.max_err, self.agree = [0.0] * k, [0.0] * k, [0.0] * k, [0] * k
        elif shapes != self.shapes:
            raise EvalDataError("model outputs changed shape between batches: %s then %s" % (self.shapes, shapes))
        n = len(outputs[0])
        if labels is not None:
            out = outputs[0]
            if out.ndim != 2:
                raise EvalDataError("model output has shape %s; scoring labels needs (batch, classes) logits"
                                    % (out.shape,))
            if labels.max() >= out.shape[1]:
                raise EvalDataError("eval label %d is out of range for a model with %d outputs"
                                    % (labels.max(), out.shape[1]))
            self.top1_hits += topk_correct(out, labels, 1)
            self.top5_hits += topk_correct(out, labels, 5)
        if references:
            if len(references) != len(outputs):
                raise EvalDataError("eval shard%s has %d references (reference_0..reference_%d) but the model has %d "
                                    "outputs: give one per output, in the model's order"
                                    % (where, len(references), len(references) - 1, len(outputs)))
            for k, (out, ref) in enumerate(zip(outputs, references)):
                if out.shape != ref.shape:
                    raise EvalDataError("eval shard%s reference_%d has shape (N, %s) but the model's output %d is "
                                        "(N, %s)" % (where, k, ", ".join(map(str, ref.shape[1:])), k,
                                                     ", ".join(map(str, out.shape[1:]))))
                if not np.isfinite(out).all():
                    raise EvalDataError("model output %d has non-finite values (NaN or inf) on eval shard%s; its "
                                        "fidelity cannot be scored" % (k, where))
                r = ref.astype(np.float64)
                err = out.astype(np.float64) - r
                self.signal[k] += float(np.sum(r * r))
                self.noise[k] += float(np.sum(err * err))
                if err.size:
                    self.max_err[k] = max(self.max_err[k], float(np.max(np.abs(err))))
                if is_logit_like(shapes[k]):
                    self.agree[k] += int(np.sum(np.argmax(out, axis=1) == np.argmax(ref, axis=1)))
        self.n += n

    def result(self, split: str, eval_sha256: str, shards: List[str]) -> AccuracyResult:
        n = self.n
        labelled = bool(self.labelled)
        referenced = bool(self.n_references)
        outputs = []
        for k, shape in enumerate(self.shapes or []):
            logit = is_logit_like(shape)
            outputs.append(OutputFidelity(
                index=k, shape=list(shape),
                agreement=self.agree[k] / n if referenced and logit and n else None,
                snr_db=snr_db(self.signal[k], self.noise[k]) if referenced else None,
                max_abs_err=self.max_err[k] if referenced else None))
        agreements = [o.agreement for o in outputs if o.agreement is not None]
        snrs = [o.snr_db for o in outputs if o.snr_db is not None]
        errs = [o.max_abs_err for o in outputs if o.max_abs_err is not None]
        agreement = min(agreements) if agreements else None
        metric = "top1" if labelled else ("agreement" if agreement is not None else "snr_db")
        return AccuracyResult(
            split=split, n=n, top1=self.top1_hits / n if labelled and n else None,
            top5=self.top5_hits / n if labelled and n else None, eval_sha256=eval_sha256,
            agreement=agreement, snr_db=min(snrs) if snrs else None, max_abs_err=max(errs) if errs else None,
            outputs=outputs, metric=metric, shards=list(shards))


def score_shard(run_all: RunAllFn, shard: Shard, prep: Callable[[np.ndarray], np.ndarray], batch_size: int,
                fixed_batch: Optional[int], scorer: Scorer, between: Optional[Callable[[], Any]] = None) -> None:
    """Run ``shard`` through the model batch by batch (preprocessed batch by batch) and add it to ``scorer``;
    ``between`` is called after every batch."""
    scorer.start_shard(shard)
    b = fixed_batch if fixed_batch is not None else batch_size
    n = len(shard)
    where = " " + shard.name if shard.name else ""
    for i in range(0, n, b):
        real = min(b, n - i)
        chunk = prep(shard.data[i:i + real])
        if real < b and fixed_batch is not None:
            chunk = np.concatenate([chunk, np.zeros((b - real,) + chunk.shape[1:], dtype=chunk.dtype)])
        outs = [np.asarray(o) for o in run_all(chunk)]
        if not outs:
            raise EvalDataError("the model returned no outputs")
        for k, out in enumerate(outs):
            if out.ndim < 1 or out.shape[0] != len(chunk):
                if k == 0 and shard.labels is not None:
                    raise EvalDataError("model output has shape %s; scoring needs (batch, classes) logits"
                                        % (out.shape,))
                raise EvalDataError("model output %d has shape %s for a batch of %d: the agent needs the batch on "
                                    "the first axis of every output" % (k, out.shape, len(chunk)))
        outs = [o[:real] for o in outs]
        labels = shard.labels[i:i + real] if shard.labels is not None else None
        refs = [r[i:i + real] for r in shard.references]
        scorer.add(outs, labels, refs, where)
        if between is not None:
            between()


def evaluate(run: RunFn, images: np.ndarray, labels: np.ndarray, prep: Callable[[np.ndarray], np.ndarray],
             batch_size: int, fixed_batch: Optional[int],
             between: Optional[Callable[[], Any]] = None) -> Tuple[int, float, float]:
    """(n, top1, top5) of a single-output ``run`` on labelled ``images``: :func:`score_shard` for one array."""
    scorer = Scorer()
    score_shard(lambda x: [run(x)], Shard("", images, np.asarray(labels, dtype=np.int64), []), prep, batch_size,
                fixed_batch, scorer, between)
    return scorer.n, scorer.top1_hits / scorer.n, scorer.top5_hits / scorer.n


def eval_digest(shas: List[str]) -> str:
    """``eval_sha256`` of a report: the shard's sha256, or for several the sha256 of theirs joined by ","."""
    if len(shas) == 1:
        return shas[0]
    return hashlib.sha256(",".join(shas).encode("ascii")).hexdigest()

