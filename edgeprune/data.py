"""CIFAR-10 data: npz loaders, the data directory, and deterministic class-stratified splits.

Splits (all class-stratified, deterministic for a given seed):

* ``eval``     — from the test set: ``per_class`` images of each class (default 100, i.e. 1,000 images),
                 or the whole 10,000-image test set with ``per_class=None``.
* ``calib``    — from the training set: the first ``per_class`` (default 100) of a seeded per-class
                 permutation; used for int8 calibration and BatchNorm recalibration.
* ``finetune`` — from the training set: the rest of that permutation (disjoint from ``calib``).

Where the data comes from: ``EDGEPRUNE_DATA`` if set, else ``../shared/data`` (beside the source checkout,
or beside the current directory) when it exists. Without it, the package's bundled subsets are used:
``eval`` (1,000 test images, 100 per class, the same images the full set gives for ``eval``) and
``calib`` (1,000 training images); ``finetune`` then falls back to the bundled calib images and says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError

ASSETS = Path(__file__).resolve().parent / "_assets"
TEST_FILE = "cifar10_test.npz"
TRAIN_FILE = "cifar10_train.npz"
BUNDLED_EVAL = "cifar10_eval1000.npz"
BUNDLED_CALIB = "cifar10_calib1000.npz"

# Preprocessing the reference checkpoints were trained with (akamaster trainer.py): ImageNet statistics.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = 1.0 / 255.0

EVAL_SEED = 0
TRAIN_SEED = 1
DEFAULT_EVAL_PER_CLASS = 100
DEFAULT_CALIB_PER_CLASS = 100
NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 32, 32)   # the reference CIFAR-10 models' input (N, C, H, W); user models bring their own


@dataclass
class Split:
    """A named set of images and labels (int64, N), held in memory: uint8 N×H×W×C RGB images (the CIFAR-10
    splits are 32×32; a user's data any size), normalised by ``scale``/``mean``/``std`` on the way to the model,
    or float32 N×C×H×W ``images`` already preprocessed (a user's torch Dataset), passed through as they are."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    source: str  # the file it came from, for provenance
    mean: Tuple[float, ...] = MEAN
    std: Tuple[float, ...] = STD
    scale: float = SCALE

    def batch(self, index: Any):  # -> torch.Tensor
        """Images ``index`` (a slice or index array) as the model's float NCHW input."""
        return to_tensor_batch(self.images[index], self.mean, self.std, self.scale)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self, n: Optional[int] = None):  # -> (torch.Tensor, torch.Tensor); torch imported lazily
        """The first ``n`` images (all when None) as a preprocessed NCHW float batch, and their labels (int64):
        e.g. the labelled calibration batch that Taylor importance needs."""
        import torch

        sl = slice(None) if n is None else slice(0, n)
        return self.batch(sl), torch.from_numpy(self.labels[sl]).long()

    def save(self, path: Path) -> Path:
        """Write the split as an npz eval shard (``images``, ``labels``) that the agent can read."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        key = "inputs" if self.images.dtype.kind == "f" else "images"
        np.savez(tmp, **{key: self.images}, labels=self.labels)
        os.replace(tmp, path)
        return path


def data_dir() -> Optional[Path]:
    """The directory holding the full CIFAR-10 npz files and checkpoints, or None when there is none."""
    env = os.environ.get("EDGEPRUNE_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise DataError(f"EDGEPRUNE_DATA={env}: not a directory")
        return p
    for base in (Path(__file__).resolve().parents[1], Path.cwd()):
        p = base.parent / "shared" / "data"
        if p.is_dir():
            return p
    return None


def load_npz(path: Path) -> Tuple[np.ndarray, np.ndarray]:
    """Load ``images`` and ``labels`` from a CIFAR-format npz, checking shapes and dtypes."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z or "labels" not in z:
                raise DataError(f"{path}: needs arrays 'images' and 'labels' (has {', '.join(z.files)})")
            images, labels = z["images"], z["labels"]
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable npz file ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: images must be uint8 N×32×32×3, got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be an integer vector of length {images.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")
    return images, labels.astype(np.int64)


def stratified_indices(labels: np.ndarray, per_class: Optional[int], seed: int, offset: int = 0) -> np.ndarray:
    """Indices of ``per_class`` images of each class (None: all after ``offset``), from a seeded permutation
    of each class. The result is sorted, so a split keeps the file's order."""
    rng = np.random.default_rng(seed)
    out: List[np.ndarray] = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        perm = idx[rng.permutation(idx.size)]
        stop = None if per_class is None else offset + per_class
        if per_class is not None and stop > idx.size:  # type: ignore[operator]
            raise DataError(f"class {c} has {idx.size} images; cannot take {per_class} after {offset}")
        out.append(perm[offset:stop])
    return np.sort(np.concatenate(out))


def _full(name: str) -> Optional[Path]:
    d = data_dir()
    if d is not None and (d / name).is_file():
        return d / name
    return None


def eval_split(per_class: Optional[int] = DEFAULT_EVAL_PER_CLASS) -> Split:
    """The ``eval`` split from the CIFAR-10 test set (``per_class=None``: all 10,000 images)."""
    full = _full(TEST_FILE)
    if full is not None:
        images, labels = load_npz(full)
        idx = stratified_indices(labels, per_class, EVAL_SEED)
        return Split("eval" if per_class else "eval-full", images[idx], labels[idx], str(full))
    bundled = ASSETS / BUNDLED_EVAL
    if per_class is None or per_class > DEFAULT_EVAL_PER_CLASS:
        raise DataError(
            f"the full CIFAR-10 test set ({TEST_FILE}) is needed for {per_class or 'all'} images per class; "
            f"set EDGEPRUNE_DATA to the folder holding it (the bundled subset has {DEFAULT_EVAL_PER_CLASS} per class)")
    images, labels = load_npz(bundled)
    idx = stratified_indices(labels, per_class, EVAL_SEED) if per_class < DEFAULT_EVAL_PER_CLASS else slice(None)
    return Split("eval", images[idx], labels[idx], str(bundled))


def holdout_split(eval_per_class: Optional[int] = DEFAULT_EVAL_PER_CLASS) -> Optional[Split]:
    """The CIFAR-10 test images that :func:`eval_split` at ``eval_per_class`` leaves out (the other 9,000 at the
    default): a search chooses on ``eval`` and re-checks its choice here. None when the eval split is the whole
    test set or only the bundled subset is there."""
    full = _full(TEST_FILE)
    if full is None or eval_per_class is None:
        return None
    images, labels = load_npz(full)
    idx = stratified_indices(labels, None, EVAL_SEED, offset=eval_per_class)
    if idx.size == 0:
        return None
    return Split("holdout", images[idx], labels[idx], str(full))


def calib_split(per_class: int = DEFAULT_CALIB_PER_CLASS) -> Split:
    """The ``calib`` split from the CIFAR-10 training set."""
    full = _full(TRAIN_FILE)
    if full is not None:
        images, labels = load_npz(full)
        idx = stratified_indices(labels, per_class, TRAIN_SEED)
        return Split("calib", images[idx], labels[idx], str(full))
    if per_class > DEFAULT_CALIB_PER_CLASS:
        raise DataError(f"the full training set ({TRAIN_FILE}) is needed for {per_class} calib images per class; "
                        "set EDGEPRUNE_DATA to the folder holding it")
    bundled = ASSETS / BUNDLED_CALIB
    images, labels = load_npz(bundled)
    idx = stratified_indices(labels, per_class, TRAIN_SEED) if per_class < DEFAULT_CALIB_PER_CLASS else slice(None)
    return Split("calib", images[idx], labels[idx], str(bundled))


def finetune_split(per_class: Optional[int] = None) -> Split:
    """The ``finetune`` split: training images not in ``calib`` (``per_class=None``: all 4,900 per class).

    Without the full training set this is the bundled 1,000-image calib subset, named ``finetune-bundled``
    so that reports say which data the recovery saw.
    """
    full = _full(TRAIN_FILE)
    if full is None:
        s = calib_split()
        return Split("finetune-bundled", s.images, s.labels, s.source)
    images, labels = load_npz(full)
    idx = stratified_indices(labels, per_class, TRAIN_SEED, offset=DEFAULT_CALIB_PER_CLASS)
    return Split("finetune", images[idx], labels[idx], str(full))


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def to_tensor_batch(images: np.ndarray, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                    scale: float = SCALE):  # -> torch.Tensor; torch imported lazily for the light paths
    """uint8 N×H×W×C → float32 N×C×H×W: ``x * scale``, then ``(x - mean) / std`` per channel (by default exactly as
    the reference CIFAR training did). Float images are already preprocessed (N×C×H×W) and come back as they are."""
    import torch

    arr = np.ascontiguousarray(images)
    if arr.dtype.kind == "f":
        return torch.from_numpy(arr.astype(np.float32, copy=False))
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().mul_(scale)
    c = x.shape[1]
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    if m.shape[1] != c or s.shape[1] != c:
        from .errors import UsageError

        raise UsageError(f"preprocess: mean/std have {m.shape[1]}/{s.shape[1]} entries for {c}-channel images")
    return (x - m) / s
