"""Eval shards for the device agent: written on the host, scored on the device (see ``agent/accuracy.py``).

A shard is an ``.npz`` (no pickle) holding ``images`` (uint8, N x H x W x C) or ``inputs`` (float32, preprocessed,
in the artifact's layout), and ``labels`` (integer, N) and/or ``reference_0``, ``reference_1``, ... (float32,
N x ...): the dense model's outputs on exactly these samples, one per model output, in the order of the ONNX
export's outputs (:func:`reference_outputs`). The agent scores top-1/top-5 on the labels and label-free fidelity
(top-1 agreement, SNR, max abs error) against the references, shard after shard, one in memory at a time: a large
eval set is cut into shards of at most ``max_bytes`` by :func:`write_shards`, and the job lists them all
(``eval.shards``, job spec v3; ``host.fleet.jobs.build_job`` takes the :class:`ShardInfo` list).

numpy is imported at module level, torch only inside :func:`reference_outputs`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from edgeprune.errors import UsageError

Batch = Tuple[np.ndarray, Optional[np.ndarray], Optional[Sequence[np.ndarray]]]
DEFAULT_MAX_BYTES = 256 << 20


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: where it is, its sha256 (what the job carries) and how many samples it holds."""

    path: Path
    sha256: str
    n: int


def _check_batch(i: int, data: Any, labels: Any, refs: Any) -> Tuple[np.ndarray, Optional[np.ndarray],
                                                                          List[np.ndarray]]:
    data = np.asarray(data)
    if data.dtype == np.uint8:
        if data.ndim != 4:
            raise UsageError(f"batch {i}: images must be uint8 (N, H, W, C); got shape {data.shape}")
    elif data.dtype == np.float32:
        if data.ndim < 2:
            raise UsageError(f"batch {i}: inputs must be float32 (N, ...); got shape {data.shape}")
    else:
        raise UsageError(f"batch {i}: data must be uint8 images or float32 preprocessed inputs; got {data.dtype}")
    n = len(data)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
            raise UsageError(f"batch {i}: labels must be integers of shape ({n},); got {labels.dtype} {labels.shape}")
        if n and labels.min() < 0:
            raise UsageError(f"batch {i}: labels must be >= 0")
        labels = labels.astype(np.int64)
    out_refs: List[np.ndarray] = []
    for k, r in enumerate(refs or []):
        r = np.asarray(r)
        if r.dtype.kind != "f" or r.ndim < 1 or len(r) != n:
            raise UsageError(f"batch {i}: reference {k} must be float with {n} rows; got {r.dtype} {r.shape}")
        out_refs.append(np.ascontiguousarray(r, dtype=np.float32))
    if labels is None and not out_refs:
        raise UsageError(f"batch {i}: has neither labels nor references; the agent needs one or both to score it")
    return data, labels, out_refs


class _Writer:
    """Accumulates batches for one shard and writes it atomically (temp file + os.replace)."""

    def __init__(self, out_dir: Path, prefix: str) -> None:
        self.out_dir = out_dir
        self.prefix = prefix
        self.parts: List[Tuple[np.ndarray, Optional[np.ndarray], List[np.ndarray]]] = []
        self.nbytes = 0
        self.written: List[ShardInfo] = []

    def add(self, part: Tuple[np.ndarray, Optional[np.ndarray], List[np.ndarray]], nbytes: int) -> None:
        self.parts.append(part)
        self.nbytes += nbytes

    def flush(self) -> None:
        if not self.parts:
            return
        arrays = {("images" if self.parts[0][0].dtype == np.uint8 else "inputs"):
                  np.concatenate([p[0] for p in self.parts])}
        if self.parts[0][1] is not None:
            arrays["labels"] = np.concatenate([p[1] for p in self.parts])   # type: ignore[misc]
        for k in range(len(self.parts[0][2])):
            arrays[f"reference_{k}"] = np.concatenate([p[2][k] for p in self.parts])
        self.parts, self.nbytes = [], 0
        path = self.out_dir / f"{self.prefix}-{len(self.written):05d}.npz"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        n = len(next(iter(arrays.values())))
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            del arrays
            digest = _sha256_file(tmp)   # read back: the digest of the bytes on disk
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.written.append(ShardInfo(path=path, sha256=digest, n=n))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shards(batches: Iterable[Batch], out_dir: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 prefix: str = "eval") -> List[ShardInfo]:
    """Write ``batches`` of ``(data, labels or None, [reference_0, ...] or None)`` as npz shards
    ``<out_dir>/<prefix>-00000.npz``, ``-00001.npz``, ... and return them in order with their sha256.

    A new shard starts when adding a batch would take the current one over ``max_bytes`` (the arrays' bytes; a
    single batch larger than that makes a shard of its own), so at most one shard is held in memory. Every batch
    must have the same kind of data (uint8 images or float32 inputs) and sample shape, labels in all or none,
    and the same number and shapes of references. Each shard is written to a temp name, fsynced and renamed.
    UsageError for inconsistent batches or a batch with neither labels nor references; nothing is left for an
    empty ``batches``."""
    if max_bytes <= 0:
        raise UsageError(f"max_bytes: must be > 0, got {max_bytes}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out_dir, prefix)
    first: Optional[Tuple[Any, ...]] = None
    for i, (data, labels, refs) in enumerate(batches):
        data, labels, out_refs = _check_batch(i, data, labels, refs)
        if len(data) == 0:
            continue
        kind = (data.dtype, data.shape[1:], labels is not None, tuple(r.shape[1:] for r in out_refs))
        if first is None:
            first = kind
        elif kind != first:
            raise UsageError(f"batch {i}: (dtype, sample shape, labels, reference shapes) = {kind}, but the first "
                             f"batch has {first}; every batch must hold the same arrays")
        nbytes = data.nbytes + (labels.nbytes if labels is not None else 0) + sum(r.nbytes for r in out_refs)
        if writer.parts and writer.nbytes + nbytes > max_bytes:
            writer.flush()
        writer.add((data, labels, out_refs), nbytes)
    writer.flush()
    return writer.written


def reference_outputs(model: Any, x: Any) -> List[np.ndarray]:
    """The dense model's outputs on ``x`` (a float NCHW tensor or array) as float32 numpy arrays, flattened in the
    order the ONNX export gives its outputs: a tensor -> [it]; a tuple or list -> its elements in order (nested
    ones flattened depth first); a dict -> its values in insertion order. Runs in eval mode under
    ``torch.no_grad`` (the model's training flag is restored afterwards)."""
    import torch

    if not isinstance(x, torch.Tensor):
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    was_training = bool(getattr(model, "training", False))
    model.eval()
    try:
        with torch.no_grad():
            y = model(x.float())
    finally:
        if was_training:
            model.train()
    return [t.detach().float().cpu().numpy() for t in _flatten(torch, y)]


def _flatten(torch: Any, y: Any) -> List[Any]:
    if isinstance(y, torch.Tensor):
        return [y]
    if isinstance(y, dict):
        return [t for v in y.values() for t in _flatten(torch, v)]
    if isinstance(y, (tuple, list)):
        return [t for v in y for t in _flatten(torch, v)]
    raise UsageError(f"the model returned {type(y).__name__}; reference outputs need tensors, or tuples, lists or "
                     "dicts of them")
