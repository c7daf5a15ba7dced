"""The distillation teacher's logits, computed once per (teacher, data, seed) and reused by every recovery.

A fine-tune's batches are a pure function of the split, the batch size and the seed: the epoch permutations come
from ``numpy.random.default_rng(seed)`` and the crops and flips from a ``torch.Generator`` seeded alike, neither
touched by the model. So the teacher's logits for step ``pos`` of epoch ``e`` are the same for every student
recovered with that seed, and a search that recovers ten candidates runs the dense teacher (the most expensive
forward of the step: up to 4× the student's MACs at 50 % pruning) once per batch instead of ten times.

:class:`TeacherCache` is keyed (:func:`cache_key`) by the teacher's weights, the split's content, the batch size,
the seed, how the teacher runs (precision, memory layout) and the augmentation; a cache for another key is never
read. It holds logits in memory and, with a ``folder``, persists them per epoch (``<folder>/<key>/epoch-<e>.pt``,
written atomically, read back with ``torch.load(weights_only=True)``), so a resumed search keeps them. What the
fine-tune uses is always what the cache stores (fp32 logits of the teacher run as keyed), whether just computed or
read back, so a run with a warm cache ends with the same weights as a run with a cold one. Past ``max_bytes``
(default 512 MiB) nothing more is kept: the teacher then runs for the batches not cached, as without a cache.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
import threading
from typing import Any, Dict, Mapping, Optional, Set, Tuple, Union

import torch

from .errors import DataError

__all__ = ["TeacherCache", "cache_key", "AUGMENTATION"]

AUGMENTATION = "crop4-flip/v2"   # edgeprune.augment's draws; bump when they change
DEFAULT_MAX_BYTES = 512 << 20


def cache_key(*, teacher_sha256: str, split_sha256: str, batch_size: int, seed: int, precision: str,
              channels_last: bool, context: Optional[Mapping[str, Any]] = None) -> str:
    """The content key of one teacher's logits over one split's augmented batches. ``context``: whatever else
    changes the logits (the split's normalisation, the device, the torch version, the CPU's bf16 units)."""
    spec = {"teacher": teacher_sha256, "split": split_sha256, "batch_size": int(batch_size), "seed": int(seed),
            "precision": precision, "channels_last": bool(channels_last), "augmentation": AUGMENTATION,
            "context": dict(context or {})}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


class TeacherCache:
    """Teacher logits by (epoch, position in the epoch), for one key; see the module docstring.

    Counters ``hits`` and ``misses`` say how many batches of the last bound run were served from it and how many
    ran the teacher."""

    def __init__(self, folder: Optional[Union[str, Path]] = None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder}: teacher cache folder is a file")
        self.max_bytes = int(max_bytes)
        self.key: Optional[str] = None
        self._logits: Dict[Tuple[int, int], torch.Tensor] = {}
        self._loaded: Set[int] = set()
        self._dirty: Set[int] = set()
        self._partial: Set[int] = set()   # epochs read back only in part (max_bytes): never rewritten
        self._bytes = 0
        self.hits = self.misses = 0

    def bind(self, key: str) -> "TeacherCache":
        """Serve ``key`` from now on (a different key drops what memory holds; files stay); the hit and miss
        counters start again."""
        self.hits = self.misses = 0
        if key != self.key:
            self.flush()
            self.key, self._logits, self._loaded, self._dirty, self._bytes = key, {}, set(), set(), 0
            self._partial = set()
        return self

    def _file(self, epoch: int) -> Optional[Path]:
        if self.folder is None or self.key is None:
            return None
        return self.folder / self.key / f"epoch-{epoch:04d}.pt"

    def _load(self, epoch: int) -> None:
        self._loaded.add(epoch)
        path = self._file(epoch)
        if path is None or not path.is_file():
            return
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            items = {int(k): v for k, v in saved["logits"].items()}
            if saved.get("key") != self.key or not all(isinstance(v, torch.Tensor) for v in items.values()):
                raise ValueError("key or content mismatch")
        except Exception:   # a torn or foreign file: recompute (and overwrite it) rather than fail
            path.unlink(missing_ok=True)
            return
        for pos, t in items.items():
            if (epoch, pos) in self._logits:
                continue
            if not self._room(t):
                self._partial.add(epoch)
                continue
            self._logits[(epoch, pos)] = t
            self._bytes += t.numel() * t.element_size()

    def _room(self, t: torch.Tensor) -> bool:
        return self._bytes + t.numel() * t.element_size() <= self.max_bytes

    def get(self, epoch: int, pos: int) -> Optional[torch.Tensor]:
        if self.key is None:
            return None
        if epoch not in self._loaded:
            self._load(epoch)
        t = self._logits.get((epoch, pos))
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        return t.clone()   # the caller may change its copy; the cache's stays as computed

    def put(self, epoch: int, pos: int, logits: torch.Tensor) -> torch.Tensor:
        """Keep ``logits`` (as fp32 on the CPU) and return what the fine-tune must use: those values (a tensor the
        caller may change)."""
        t = logits.detach().float().cpu().contiguous()
        if self.key is not None and (epoch, pos) not in self._logits and self._room(t):
            self._logits[(epoch, pos)] = t
            self._bytes += t.numel() * t.element_size()
            self._dirty.add(epoch)
            return t.clone()
        return t

    def flush(self) -> None:
        """Write the epochs that gained logits since the last flush (no-op without a folder)."""
        for epoch in sorted(self._dirty - self._partial):
            path = self._file(epoch)
            if path is None:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            items: Dict[str, Any] = {str(p): t for (e, p), t in self._logits.items() if e == epoch}
            tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                torch.save({"key": self.key, "logits": items}, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        self._dirty = set()

    def stats(self) -> Dict[str, Any]:
        return {"key": self.key, "hits": self.hits, "misses": self.misses, "batches": len(self._logits),
                "bytes": self._bytes, "folder": str(self.folder) if self.folder is not None else None}
