"""User data sources for any input size: image folders, npz files and ``MODULE:CALLABLE`` datasets.

:func:`open_source` opens a ``--data``-style spec as a :class:`DataSource`:

* an **image folder** in the class-subfolder layout ``root/<class>/<image>`` (as torchvision's ``ImageFolder``):
  classes are the sorted subfolder names, a label is a class's index; images may sit in nested folders of a
  class. ``.jpg .jpeg .png .webp`` (any case), decoded with Pillow as RGB, one batch at a time. Names starting
  with ``.`` are skipped; any other file is an error naming it (a ``notes.txt`` in ``cat/`` would otherwise be
  silently dropped or fed as an image); files directly in ``root`` are ignored, as ``ImageFolder`` does. The file
  list is read once, sorted, so labels (:meth:`DataSource.labels`) need no decoding.
* an **npz file** (read with ``allow_pickle=False``) holding ``images`` (uint8 N x H x W x C) or preprocessed
  ``inputs`` (float32 N x C x H x W, which must be the model input's shape exactly), optional ``labels`` (integer,
  N) and optional ``classes`` (strings). Arrays stored uncompressed (``np.savez``) are memory-mapped and read by
  index; a ``np.savez_compressed`` array is read whole once.
* ``MODULE:CALLABLE`` (an importable module, or a ``.py`` path: ``data/ds.py:build``): called with no arguments,
  it returns a torch ``Dataset`` whose items are ``(tensor C x H x W float, int label)`` or ``(tensor, None)``,
  already preprocessed by the user's transforms. Its labels are its ``targets`` attribute when it has one, else
  one pass over the items.

Images (folders and npz ``images``) are brought to the model input size H x W on the host with
:class:`~edgeprune.preprocess.Preprocess` (:mod:`edgeprune.preprocess`; it and ``parse_preprocess`` are importable
from here too), as torchvision's ``Resize(resize)`` (shorter side, aspect kept, bilinear) then
``CenterCrop(center_crop)``; an image that already is H x W is neither resized nor cropped (bit-identical). The
batches stay uint8 N x H x W x C, the agent's shard format (``agent.accuracy``): it does only scale, mean/std and
layout, which :meth:`DataSource.to_tensor` does here for torch.

Splits (:func:`split_indices`) are deterministic and class-stratified when there are labels: each class has its
own seeded permutation, so a larger split extends a smaller one, and ``exclude`` keeps parts disjoint.
Errors are :class:`~edgeprune.errors.DataError` / :class:`~edgeprune.errors.UsageError`, one line each, naming the
argument and the file.
"""
from __future__ import annotations

import abc
import hashlib
import importlib
import importlib.util
import os
import struct
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import DataError, UsageError
from .preprocess import HW, Preprocess, one_line, parse_preprocess

__all__ = ["Preprocess", "parse_preprocess", "IMAGE_EXTENSIONS", "DataSource", "FolderSource", "NpzSource",
           "CallableSource", "open_source", "split_indices", "check_same_classes"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


# --------------------------------------------------------------------------------------------------- sources
class DataSource(abc.ABC):
    """Base of the three sources; see the module docstring. ``batches`` yields uint8 N x H x W x C images (at the
    input size) or float32 N x C x H x W preprocessed inputs, with int64 labels or None."""

    kind = ""
    is_preprocessed = False

    def __init__(self, name: str, input_hw: HW, preprocess: Preprocess, arg: str = "--data"):
        self.name, self.input_hw, self.preprocess, self.arg = name, input_hw, preprocess, arg
        self.classes: Optional[List[str]] = None

    def __repr__(self) -> str:
        return "<%s %s %s, %d items>" % (type(self).__name__, self.kind, self.name, len(self))

    @abc.abstractmethod
    def __len__(self) -> int:
        """Each source implements it (folder, npz, callable)."""

    @abc.abstractmethod
    def labels(self) -> Optional[np.ndarray]:
        """Each source implements it (folder, npz, callable)."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Each source implements it (folder, npz, callable)."""

    @abc.abstractmethod
    def _batch(self, idx: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Each source implements it (folder, npz, callable)."""

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(data, labels) for ``indices`` in order, ``batch_size`` at a time; one batch is decoded at a time."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if batch_size < 1:
            raise UsageError("batch size must be >= 1, got %d" % batch_size)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise DataError("%s: %s: index %d out of range for %d items"
                            % (self.arg, self.name, idx.max() if idx.max() >= len(self) else idx.min(), len(self)))
        for s in range(0, idx.size, batch_size):
            yield self._batch(idx[s:s + batch_size])

    def to_tensor(self, data: np.ndarray):  # -> torch.Tensor (torch imported lazily)
        """uint8 N x H x W x C -> float32 N x C x H x W with scale, mean and std; float inputs pass through."""
        import torch

        if data.dtype != np.uint8:
            return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        p = self.preprocess
        x = torch.from_numpy(np.ascontiguousarray(data)).permute(0, 3, 1, 2).float().mul_(p.scale)
        c = x.shape[1]
        return (x - torch.tensor(p.mean).view(1, c, 1, 1)) / torch.tensor(p.std).view(1, c, 1, 1)


class FolderSource(DataSource):
    """``root/<class>/<image>``; see the module docstring for the rules."""

    def __init__(self, root: Path, input_hw: HW, preprocess: Preprocess, arg: str = "--data"):
        super().__init__(str(root), input_hw, preprocess, arg)
        self.kind, self.root = "folder", Path(root)
        if not self.root.is_dir():
            raise DataError("%s: %s: no such folder" % (arg, root))
        if len(preprocess.mean) != 3:
            raise UsageError("%s: %s: folder images are decoded as RGB (3 channels) but --mean has %d entries"
                             % (arg, root, len(preprocess.mean)))
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        if not self.classes:
            nfiles = sum(1 for e in os.scandir(root) if e.is_file())
            what = "%d files lie directly in it" % nfiles if nfiles else "it is empty"
            raise DataError("%s: %s: no class subfolders (expected %s/<class>/<image>; %s)" % (arg, root, root, what))
        self.files: List[str] = []  # relative to root, e.g. "cat/001.png"
        labels: List[int] = []
        for ci, cls in enumerate(self.classes):
            found = []
            for dirpath, _, fnames in sorted(os.walk(self.root / cls, followlinks=True)):
                rel = os.path.relpath(dirpath, self.root)
                if any(part.startswith(".") for part in Path(rel).parts):
                    continue
                for f in sorted(fnames):
                    if f.startswith("."):
                        continue
                    if os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                        raise DataError("%s: %s: not an image, in class folder '%s' (images end in %s); remove it "
                                        "or move it out of %s" % (arg, os.path.join(dirpath, f), cls,
                                                                  ", ".join(IMAGE_EXTENSIONS), root))
                    found.append(os.path.join(rel, f))
            if not found:
                raise DataError("%s: %s: class folder '%s' has no images (%s)"
                                % (arg, self.root / cls, cls, ", ".join(IMAGE_EXTENSIONS)))
            self.files += found
            labels += [ci] * len(found)
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> np.ndarray:
        return self._labels

    def decode(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 H x W x 3 at the input size."""
        from PIL import Image

        path = self.root / self.files[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise DataError("%s: %s: cannot decode image (%s)" % (self.arg, path, one_line(e))) from None
        return self.preprocess.apply(img, self.input_hw, "%s: %s" % (self.arg, path))

    def _batch(self, idx):
        h, w = self.input_hw
        out = np.empty((len(idx), h, w, 3), dtype=np.uint8)
        for k, i in enumerate(idx):
            out[k] = self.decode(int(i))
        return out, self._labels[idx]

    def fingerprint(self) -> str:
        sha = hashlib.sha256()
        for rel in sorted(self.files):
            st = os.stat(self.root / rel)
            sha.update(("%s\0%d\0%d\n" % (Path(rel).as_posix(), st.st_size, st.st_mtime_ns)).encode())
        return sha.hexdigest()


def _npz_array(path: Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Array ``name`` of an npz: memory-mapped when stored uncompressed with a plain dtype, else read whole."""
    info = zf.getinfo(name + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                header_len = f.tell()
                if not fortran and not dtype.hasobject and int(np.prod(shape)) > 0:
                    with open(path, "rb") as raw:
                        raw.seek(info.header_offset)
                        local = raw.read(30)
                    n, m = struct.unpack("<HH", local[26:30])
                    offset = info.header_offset + 30 + n + m + header_len
                    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class NpzSource(DataSource):
    """``images`` (uint8 N x H x W x C) or ``inputs`` (float32 N x C x H x W), optional ``labels``, ``classes``."""

    def __init__(self, path: Path, input_hw: HW, preprocess: Preprocess, arg: str = "--data"):
        super().__init__(str(path), input_hw, preprocess, arg)
        self.kind, self.path = "npz", Path(path)
        where = "%s: %s" % (arg, path)
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                present = [k for k in ("images", "inputs") if k in names]
                if len(present) != 1:
                    raise DataError("%s: needs one array 'images' (uint8 N x H x W x C) or 'inputs' (float32 "
                                    "N x C x H x W), has %s" % (where, ", ".join(names) or "no arrays"))
                self.data = _npz_array(self.path, zf, present[0])
                self._labels = np.asarray(_npz_array(self.path, zf, "labels")) if "labels" in names else None
                cls = _npz_array(self.path, zf, "classes") if "classes" in names else None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
            raise DataError("%s: not a readable npz file without pickle (%s)" % (where, one_line(e))) from None
        h, w = input_hw
        c = len(preprocess.mean)
        n = self.data.shape[0] if self.data.ndim else 0
        if present[0] == "inputs":
            self.is_preprocessed = True
            if self.data.dtype != np.float32 or tuple(self.data.shape[1:]) != (c, h, w):
                raise DataError("%s: inputs are %s %s but the model input wants float32 (N, %d, %d, %d)"
                                % (where, self.data.dtype, tuple(self.data.shape), c, h, w))
        elif self.data.dtype != np.uint8 or self.data.ndim != 4 or self.data.shape[3] != c or c not in (1, 3):
            raise DataError("%s: images must be uint8 N x H x W x %d, got %s %s"
                            % (where, c, self.data.dtype, tuple(self.data.shape)))
        if n == 0:
            raise DataError("%s: holds no %s" % (where, present[0]))
        if self._labels is not None:
            if self._labels.shape != (n,) or self._labels.dtype.kind not in "iu" or self._labels.min() < 0:
                raise DataError("%s: labels must be %d integers >= 0, got %s %s"
                                % (where, n, self._labels.dtype, self._labels.shape))
            self._labels = self._labels.astype(np.int64)
        if cls is not None:
            if cls.dtype.kind not in "US" or cls.ndim != 1:
                raise DataError("%s: classes must be a vector of strings, got %s %s" % (where, cls.dtype, cls.shape))
            self.classes = [v.decode() if isinstance(v, bytes) else str(v) for v in cls.tolist()]
        self._where = where

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def labels(self) -> Optional[np.ndarray]:
        return self._labels

    def _batch(self, idx):
        chunk = np.asarray(self.data[idx])
        lab = None if self._labels is None else self._labels[idx]
        if self.is_preprocessed or tuple(chunk.shape[1:3]) == tuple(self.input_hw):
            return np.ascontiguousarray(chunk), lab
        from PIL import Image

        h, w = self.input_hw
        out = np.empty((len(idx), h, w, chunk.shape[3]), dtype=np.uint8)
        for k, i in enumerate(idx):
            img = Image.fromarray(chunk[k, :, :, 0] if chunk.shape[3] == 1 else chunk[k])
            out[k] = self.preprocess.apply(img, self.input_hw, "%s image %d" % (self._where, i))
        return out, lab

    def fingerprint(self) -> str:
        sha = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        return sha.hexdigest()


class CallableSource(DataSource):
    """A torch ``Dataset`` from ``MODULE:CALLABLE``; items ``(tensor C x H x W, int label or None)``."""

    def __init__(self, spec: str, dataset: Any, input_hw: HW, preprocess: Preprocess, arg: str = "--data"):
        super().__init__(spec, input_hw, preprocess, arg)
        self.kind, self.spec, self.dataset = "callable", spec, dataset
        self.is_preprocessed = True
        self._labels: Optional[np.ndarray] = None
        cls = getattr(dataset, "classes", None)
        if isinstance(cls, (list, tuple)) and all(isinstance(c, str) for c in cls):
            self.classes = list(cls)
        self._n = len(dataset)
        if self._n == 0:
            raise DataError("%s: %s returned an empty dataset" % (arg, spec))
        self._has_labels = self._item(0)[1] is not None

    def __len__(self) -> int:
        return self._n

    def _item(self, i: int) -> Tuple[np.ndarray, Optional[int]]:
        import torch

        where = "%s: %s item %d" % (self.arg, self.spec, i)
        try:
            item = self.dataset[i]
        except Exception as e:
            raise DataError("%s raised %s" % (where, one_line(e))) from None
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise DataError("%s is %s; expected (tensor C x H x W, int label or None)" % (where, type(item).__name__))
        x, y = item
        want = (len(self.preprocess.mean),) + tuple(self.input_hw)
        if not (torch.is_tensor(x) or isinstance(x, np.ndarray)) or tuple(x.shape) != want or \
                not (x.dtype.is_floating_point if torch.is_tensor(x) else x.dtype.kind == "f"):
            raise DataError("%s is %s %s; expected a float tensor of shape %s (already preprocessed)"
                            % (where, type(x).__name__, tuple(getattr(x, "shape", ())), want))
        x = x.detach().cpu().numpy() if torch.is_tensor(x) else x
        if y is not None:
            try:
                y = int(y)
            except (TypeError, ValueError):
                raise DataError("%s has label %r; expected an int or None" % (where, y)) from None
        return np.asarray(x, dtype=np.float32), y

    def labels(self) -> Optional[np.ndarray]:
        """``targets`` when the dataset has it, else one pass over the items (cached); None when unlabelled."""
        if not self._has_labels:
            return None
        if self._labels is None:
            t = getattr(self.dataset, "targets", None)
            if t is not None and len(t) == self._n:
                self._labels = np.asarray([int(v) for v in t], dtype=np.int64)
            else:
                self._labels = np.asarray([self._label(i) for i in range(self._n)], dtype=np.int64)
        return self._labels

    def _label(self, i: int) -> int:
        y = self._item(i)[1]
        if y is None:
            raise DataError("%s: %s item %d has no label but item 0 has one" % (self.arg, self.spec, i))
        return y

    def _batch(self, idx):
        items = [self._item(int(i)) for i in idx]
        ys = [y for _, y in items]
        if any((y is None) == self._has_labels for y in ys):
            raise DataError("%s: %s: some items have labels and some have None" % (self.arg, self.spec))
        x = np.stack([x for x, _ in items])
        return x, (np.asarray(ys, dtype=np.int64) if self._has_labels else None)

    def fingerprint(self) -> str:
        return "callable:" + self.spec


def _load_callable(spec: str, arg: str):
    mod_name, _, attr = spec.rpartition(":")
    is_path = mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name
    extra_path = str(Path(mod_name).resolve().parent) if is_path else os.getcwd()
    added = extra_path not in sys.path
    if added:  # the file's folder (or the current one) is importable for the import and the call only
        sys.path.insert(0, extra_path)
    try:
        try:
            if is_path:
                path = Path(mod_name)
                if not path.is_file():
                    raise DataError("%s: %s: no such file (in %s)" % (arg, mod_name, spec))
                unique = "_edgeprune_user_%s" % hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
                loader_spec = importlib.util.spec_from_file_location(unique, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[unique] = module  # dataclasses and pickling look the module up by name
                try:
                    loader_spec.loader.exec_module(module)
                except BaseException:
                    sys.modules.pop(unique, None)
                    raise
            else:
                module = importlib.import_module(mod_name)
        except DataError:
            raise
        except ModuleNotFoundError as e:
            if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
                raise DataError("%s: cannot import module '%s' (%s)" % (arg, mod_name, one_line(e))) from None
            raise DataError("%s: importing module '%s' raised %s" % (arg, mod_name, one_line(e))) from None
        except Exception as e:
            raise DataError("%s: importing module '%s' raised %s" % (arg, mod_name, one_line(e))) from None
        if not hasattr(module, attr):
            raise DataError("%s: module '%s' has no attribute '%s'" % (arg, mod_name, attr))
        fn = getattr(module, attr)
        if not callable(fn):
            raise DataError("%s: %s is %s, not a callable" % (arg, spec, type(fn).__name__))
        try:
            return fn()
        except Exception as e:
            raise DataError("%s: %s raised %s" % (arg, spec, one_line(e))) from None
    finally:
        if added and extra_path in sys.path:
            sys.path.remove(extra_path)


def _is_dataset(obj: Any) -> bool:
    from torch.utils.data import Dataset

    if isinstance(obj, Dataset):
        return hasattr(obj, "__len__") and hasattr(obj, "__getitem__")
    builtin = (list, tuple, dict, str, bytes, np.ndarray)
    return not isinstance(obj, builtin) and hasattr(obj, "__len__") and hasattr(obj, "__getitem__")


def open_source(spec: str, *, input_hw: Sequence[int], preprocess: Preprocess, arg: str = "--data") -> DataSource:
    """Open ``spec`` (a folder, an ``.npz`` file, or ``MODULE:CALLABLE``) as a :class:`DataSource`."""
    hw = (int(input_hw[0]), int(input_hw[1]))
    path = Path(spec).expanduser()
    if path.is_dir():
        return FolderSource(path, hw, preprocess, arg)
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError("%s: %s: not a folder of images, an .npz file or MODULE:CALLABLE" % (arg, spec))
        return NpzSource(path, hw, preprocess, arg)
    mod_name, _, attr = spec.rpartition(":")
    if not (mod_name and attr.isidentifier()):
        raise DataError("%s: %s: no such folder or file (and not MODULE:CALLABLE)" % (arg, spec))
    ds = _load_callable(spec, arg)
    if not _is_dataset(ds):
        raise DataError("%s: %s returned %s, not a torch Dataset (needs __len__ and __getitem__)"
                        % (arg, spec, type(ds).__name__))
    return CallableSource(spec, ds, hw, preprocess, arg)


# ----------------------------------------------------------------------------------------------------- splits
def split_indices(labels: Optional[np.ndarray], n: int, *, fraction: Optional[float] = None,
                  per_class: Optional[int] = None, seed: int = 0, exclude: Optional[np.ndarray] = None) -> np.ndarray:
    """Sorted indices of a deterministic part of ``n`` items, class-stratified when ``labels`` are given.

    Each class (or, without labels, the whole set) gets its own seeded permutation; ``exclude``d indices are
    dropped from it and the first ``round(fraction * remaining)`` or ``per_class`` are taken (neither: all that
    remain). Hence the same seed with a larger count extends a smaller split, and parts are disjoint via
    ``exclude``."""
    if fraction is not None and per_class is not None:
        raise UsageError("give a fraction or a per-class count, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise UsageError("split fraction must be in (0, 1], got %r" % fraction)
    if per_class is not None and per_class < 1:
        raise UsageError("per-class count must be >= 1, got %r" % per_class)
    if per_class is not None and labels is None:
        raise DataError("a per-class count needs labelled data")
    excluded = np.zeros(n, dtype=bool)
    if exclude is not None and len(exclude):
        excluded[np.asarray(exclude, dtype=np.int64)] = True
    if labels is None:
        groups = [(None, np.arange(n))]
    else:
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise DataError("labels have shape %s, expected (%d,)" % (labels.shape, n))
        groups = [(int(c), np.flatnonzero(labels == c)) for c in np.unique(labels)]
    out: List[np.ndarray] = []
    for c, idx in groups:
        rng = np.random.default_rng([seed, 0 if c is None else c + 1])
        perm = idx[rng.permutation(idx.size)]
        perm = perm[~excluded[perm]]
        take = perm.size if fraction is None and per_class is None else \
            per_class if per_class is not None else int(round(fraction * perm.size))
        if take > perm.size:
            raise DataError("class %d has %d items%s; cannot take %d per class"
                            % (c, perm.size, " left after excluding those already used" if excluded.any() else "",
                               take))
        out.append(perm[:take])
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def check_same_classes(a: DataSource, b: DataSource, arg_a: str, arg_b: str) -> None:
    """DataError when both sources name their classes and the lists differ (order matters: it is the label)."""
    if a.classes is None or b.classes is None or a.classes == b.classes:
        return
    for i, (x, y) in enumerate(zip(a.classes, b.classes)):
        if x != y:
            raise DataError("%s and %s have different classes: class %d is '%s' in %s (%s) but '%s' in %s (%s)"
                            % (arg_a, arg_b, i, x, arg_a, a.name, y, arg_b, b.name))
    longer, shorter = (a, b) if len(a.classes) > len(b.classes) else (b, a)
    names = {id(a): arg_a, id(b): arg_b}
    raise DataError("%s and %s have different classes: %s (%s) has %d, %s (%s) has %d; first extra class '%s'"
                    % (arg_a, arg_b, names[id(longer)], longer.name, len(longer.classes), names[id(shorter)],
                       shorter.name, len(shorter.classes), longer.classes[len(shorter.classes)]))
