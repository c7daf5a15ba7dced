"""A workload: the model a command works on and the data it is judged, calibrated and recovered with.

Every command that prunes or measures (prune, demo, search, sensitivity, bench) opens one with :func:`open_workload`
from a :class:`~edgeprune.sources.ModelSpec` and :class:`DataOptions`. Two paths, one interface:

* **reference path** (a built-in CIFAR ResNet or a CIFAR checkpoint, no ``--data``): the CIFAR-10 splits of
  :mod:`edgeprune.data` exactly as before (eval from the test set, calib and finetune from the training set,
  bundled subsets without ``../shared/data``), so published figures and plans reproduce;
* **user path** (anything else, or ``--data`` given): the user's data through :mod:`edgeprune.datasets`
  (image folders, npz, ``MODULE:CALLABLE`` datasets) at the model's input size, preprocessed as ``--resize``,
  ``--center-crop``, ``--mean``, ``--std`` (or the model file's ``preprocess``) say.

Which data does what (and :attr:`Workload.notes` says so, for the output and the records):

* **eval** (accuracy): all of ``--data`` — less the calibration part when calibration has to come from it;
* **calibration** (BatchNorm recalibration, int8 calibration, Taylor importance): ``--calib-data``, else the
  fine-tune data, else a seeded, class-stratified part of ``--data`` (at most ``calib_images`` images and at most
  a tenth of it), kept out of eval;
* **fine-tune** (recovery): ``--finetune-data`` only (never the eval data); its classes must be eval's;
* **no data at all**: exports are verified on seeded random inputs, accuracy is skipped, and the notes say so.

Eval data is streamed in batches (never held whole); calibration and fine-tune data are held in memory as a
:class:`~edgeprune.data.Split` (the fine-tune set is what recovery iterates over for epochs).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from . import data, datasets
from .errors import UsageError
from .sources import LoadedModel, ModelSpec, flatten_outputs, resolve

__all__ = ["DataOptions", "EvalData", "Workload", "open_workload", "CHECK_SAMPLES"]

_DEFAULT_EVAL_PER_CLASS = data.DEFAULT_EVAL_PER_CLASS
CHECK_SAMPLES = 32          # the fixed batch each export is verified on
CALIB_IMAGES = 500          # at most this many images for calibration
_BATCH = 64


@dataclass
class DataOptions:
    data: Optional[str] = None
    calib_data: Optional[str] = None
    finetune_data: Optional[str] = None
    resize: Optional[str] = None
    center_crop: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None
    eval_per_class: Optional[int] = _DEFAULT_EVAL_PER_CLASS   # reference path: CIFAR-10 eval images per class
    finetune_per_class: Optional[int] = None                       # fine-tune images per class (None: all)
    calib_images: int = CALIB_IMAGES
    seed: int = 0

    @classmethod
    def of(cls, opts: Any, **overrides: Any) -> "DataOptions":
        """The data options of a command's options object (prune, demo and search share these field names)."""
        kw = {f.name: getattr(opts, f.name) for f in fields(cls) if hasattr(opts, f.name)}
        kw.update(overrides)
        return cls(**kw)

    @property
    def any_data(self) -> bool:
        return any(v is not None for v in (self.data, self.calib_data, self.finetune_data))


@dataclass
class EvalData:
    """The images accuracy is measured on: streamed from a source (user path) or held (reference split)."""

    name: str                                   # split name for reports: eval, data, ...
    n: int
    description: str                            # where from, for the output and provenance
    labelled: bool
    fingerprint: str
    _source: Optional[datasets.DataSource] = None
    _indices: Optional[np.ndarray] = None
    _split: Optional[data.Split] = None

    def batches(self, batch_size: int = _BATCH) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray]]]:
        """(uint8 N x H x W x C images or float32 N x C x H x W inputs, labels or None), one batch at a time."""
        if self._split is not None:
            for sl in data.batches(len(self._split), batch_size):
                yield self._split.images[sl], self._split.labels[sl]
        else:
            assert self._source is not None and self._indices is not None
            yield from self._source.batches(self._indices, batch_size)

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        if self._split is not None:
            return data.to_tensor_batch(batch, self._split.mean, self._split.std, self._split.scale)
        assert self._source is not None
        return self._source.to_tensor(batch)

    def as_split(self) -> Optional[data.Split]:
        """The reference path's Split (the agent's single npz shard today), else None."""
        return self._split


@dataclass
class Workload:
    model: LoadedModel
    preprocess: datasets.Preprocess
    eval: Optional[EvalData]
    options: DataOptions
    notes: List[str] = field(default_factory=list)
    reference_path: bool = False
    holdout: Optional[EvalData] = None          # test images the eval split leaves out (reference path), else None
    _calib: Optional[data.Split] = None
    _calib_from: Optional[Tuple[Any, ...]] = None
    _finetune: Optional[data.Split] = None
    _finetune_from: Optional[Tuple[Any, ...]] = None

    # -------------------------------------------------------------------------------------------- model side
    @property
    def input_shape(self) -> Tuple[int, int, int, int]:
        return self.model.input_shape

    @property
    def example(self) -> torch.Tensor:
        return self.model.example

    def manifest_preprocess(self) -> Dict[str, Any]:
        """What the agent does to uint8 images (scale, mean, std) and how the host made them (resize, crop)."""
        return {**self.preprocess.to_dict(), "input": "uint8 HWC RGB"}

    # --------------------------------------------------------------------------------------------- data side
    def calib(self) -> Optional[data.Split]:
        """Calibration images (BN recalibration, int8 calibration, Taylor importance), read once; None without data."""
        if self._calib is None:
            self._calib = self._read(self._calib_from)
        return self._calib

    def finetune(self) -> Optional[data.Split]:
        """Fine-tune images with labels, read once; None when no fine-tune data was given."""
        if self._finetune is None:
            self._finetune = self._read(self._finetune_from)
        return self._finetune

    def _read(self, where: Optional[Tuple[Any, ...]]) -> Optional[data.Split]:
        """A part's Split from ``("split", factory)`` (reference path) or ``("source", src, indices, name)``."""
        if where is None:
            return None
        if where[0] == "split":
            return where[1]()
        _, src, idx, name = where
        return _materialise(src, idx, name, self.preprocess)

    @property
    def has_finetune_data(self) -> bool:
        return self._finetune_from is not None

    def check_inputs(self) -> torch.Tensor:
        """The fixed batch exports are verified on: up to 32 eval images spread over the set, else seeded random
        inputs of the input shape (said in the notes)."""
        if self.eval is not None and self.eval.n:
            split = self.eval.as_split()
            if split is not None:
                return split.batch(slice(None, None, max(1, len(split) // CHECK_SAMPLES)))[:CHECK_SAMPLES]
            step = max(1, self.eval.n // CHECK_SAMPLES)
            assert self.eval._source is not None and self.eval._indices is not None
            idx = self.eval._indices[::step][:CHECK_SAMPLES]
            batch, _ = next(self.eval._source.batches(idx, len(idx)))
            return self.eval.to_tensor(batch)
        gen = torch.Generator().manual_seed(self.options.seed)
        return torch.randn((CHECK_SAMPLES,) + tuple(self.input_shape[1:]), generator=gen)

    def calib_inputs(self, n: int = 200) -> Optional[torch.Tensor]:
        cal = self.calib()
        if cal is None:
            return None
        return cal.batch(slice(0, n))

    # ------------------------------------------------------------------------------------------ torch metrics
    def torch_metrics(self, model: nn.Module, reference: Optional[nn.Module] = None) -> Dict[str, Any]:
        """top1/top5 (labelled eval data) and, with ``reference``, top-1 agreement and SNR of ``model``'s first
        output against it, measured with torch on the host. Empty without eval data."""
        if self.eval is None:
            return {}
        model.eval()
        if reference is not None:
            reference.eval()
        n = c1 = c5 = agree = 0
        sig = err = 0.0
        scored = logits = False
        with torch.no_grad():
            for batch, labels in self.eval.batches():
                x = self.eval.to_tensor(batch)
                out = flatten_outputs(model(x))[0]
                if labels is not None and out.ndim == 2:
                    scored = True
                    y = torch.from_numpy(np.asarray(labels)).long()
                    top = out.topk(min(5, out.shape[1]), 1).indices
                    c1 += int((top[:, 0] == y).sum())
                    c5 += int((top == y[:, None]).any(1).sum())
                if reference is not None:
                    ref = flatten_outputs(reference(x))[0]
                    if ref.ndim == 2 and ref.shape[1] >= 2:
                        logits = True
                        agree += int((ref.argmax(1) == out.argmax(1)).sum())
                    sig += float((ref.double() ** 2).sum())
                    err += float(((out.double() - ref.double()) ** 2).sum())
                n += len(batch)
        res: Dict[str, Any] = {"n": n, "split": self.eval.name}
        if self.eval.labelled and scored:   # top-1 needs labels and (batch, classes) scores
            res.update(top1=c1 / max(1, n), top5=c5 / max(1, n))
        if reference is not None:
            res.update(snr_db=_snr_db(sig, err))
            if logits:
                res.update(agreement=agree / max(1, n))
        return res


def _snr_db(signal: float, error: float) -> float:
    import math

    if error <= 0.0:
        return 300.0
    return max(-300.0, min(300.0, 10.0 * math.log10(max(signal, 1e-300) / error)))


def _materialise(src: datasets.DataSource, idx: np.ndarray, name: str, prep: datasets.Preprocess) -> data.Split:
    parts, labels = [], []
    for batch, lab in src.batches(idx, _BATCH):
        parts.append(batch)
        labels.append(np.asarray(lab, dtype=np.int64) if lab is not None else np.full(len(batch), -1, np.int64))
    images = np.concatenate(parts) if parts else np.zeros((0,) + tuple(src.input_hw) + (3,), np.uint8)
    return data.Split(name, images, np.concatenate(labels) if labels else np.zeros(0, np.int64),
                      f"{src.kind} {src.name}", tuple(prep.mean), tuple(prep.std), float(prep.scale))


def _preprocess(opts: DataOptions, loaded: LoadedModel) -> datasets.Preprocess:
    """Flags over the model file's ``preprocess`` over the defaults for the input size (one parser for both)."""
    c, h, w = loaded.input_shape[1:]
    rec = dict(loaded.preprocess or {})
    unknown = sorted(set(rec) - {"resize", "center_crop", "mean", "std"})
    if unknown:
        raise UsageError(f"{loaded.meta.get('model_file', '--model')}: preprocess.{unknown[0]}: unknown field "
                         "(known: resize, center_crop, mean, std)")

    def text(v: Any) -> Optional[str]:
        if v is None:
            return None
        if isinstance(v, (list, tuple)):
            return ("x" if len(v) == 2 and all(isinstance(x, int) for x in v) and v is rec.get("center_crop")
                    else ",").join(str(x) for x in v)
        return str(v)

    where = loaded.meta.get("model_file")
    values = {k: getattr(opts, k) if getattr(opts, k) is not None else text(rec.get(k))
              for k in ("resize", "center_crop", "mean", "std")}
    try:
        return datasets.parse_preprocess(values["resize"], values["center_crop"], values["mean"], values["std"],
                                         (h, w), channels=c)
    except UsageError as e:
        if where and any(getattr(opts, k) is None and rec.get(k) is not None for k in values):
            raise UsageError(f"{where}: preprocess: {e}") from None
        raise


def open_workload(spec: ModelSpec, opts: DataOptions) -> Workload:
    """Load the model and open its data (nothing is decoded yet); every bad input is one clear error."""
    loaded = resolve(spec)
    h, w = loaded.input_shape[2:]
    if loaded.ignore_layers:   # a pattern matching nothing fails here, before anything is written or recorded
        from .prune import resolve_ignore_globs

        resolve_ignore_globs(loaded.model, loaded.ignore_layers)
    if loaded.builtin and not opts.any_data and tuple(loaded.input_shape) == tuple(data.INPUT_SHAPE):
        return _reference_workload(loaded, opts)
    prep = _preprocess(opts, loaded)
    notes: List[str] = []
    ev = calib_from = ft_from = None
    src = None
    if opts.data is not None:
        src = datasets.open_source(opts.data, input_hw=(h, w), preprocess=prep, arg="--data")
        if len(src) == 0:
            raise UsageError(f"--data: {opts.data}: holds no samples")
    ft_src = None
    if opts.finetune_data is not None:
        ft_src = datasets.open_source(opts.finetune_data, input_hw=(h, w), preprocess=prep, arg="--finetune-data")
        if src is not None:
            datasets.check_same_classes(src, ft_src, "--data", "--finetune-data")
        if ft_src.labels() is None:
            raise UsageError(f"--finetune-data: {opts.finetune_data}: has no labels; fine-tuning needs them")
        idx = (datasets.split_indices(ft_src.labels(), len(ft_src), per_class=opts.finetune_per_class,
                                      seed=opts.seed) if opts.finetune_per_class else np.arange(len(ft_src)))
        ft_from = ("source", ft_src, idx, "finetune")
        notes.append(f"fine-tune data: {ft_src.kind} {ft_src.name}, {len(idx)} images")
    eval_exclude = None
    if opts.calib_data is not None:
        csrc = datasets.open_source(opts.calib_data, input_hw=(h, w), preprocess=prep, arg="--calib-data")
        cidx = datasets.split_indices(csrc.labels(), len(csrc), fraction=min(1.0, opts.calib_images / len(csrc)),
                                      seed=opts.seed) if len(csrc) > opts.calib_images else np.arange(len(csrc))
        calib_from = ("source", csrc, cidx, "calib")
        notes.append(f"calibration data: --calib-data {csrc.name}, {len(cidx)} images")
    elif ft_src is not None:
        cidx = datasets.split_indices(ft_src.labels(), len(ft_src),
                                      fraction=min(1.0, opts.calib_images / len(ft_src)), seed=opts.seed + 1)
        calib_from = ("source", ft_src, cidx, "calib")
        notes.append(f"calibration data: {len(cidx)} images of the fine-tune data (seed {opts.seed + 1})")
    elif src is not None and len(src) >= 2:
        take = max(1, min(opts.calib_images, len(src) // 10))
        cidx = datasets.split_indices(src.labels(), len(src), fraction=take / len(src), seed=opts.seed + 1)
        if len(cidx) == 0 or len(cidx) >= len(src):
            cidx = datasets.split_indices(None, len(src), fraction=take / len(src), seed=opts.seed + 1)
        calib_from = ("source", src, cidx, "calib")
        eval_exclude = cidx
        notes.append(f"calibration data: {len(cidx)} images of --data (class-stratified, seed {opts.seed + 1}), "
                     "kept out of the eval images")
    if src is not None:
        eidx = np.setdiff1d(np.arange(len(src)), eval_exclude) if eval_exclude is not None else np.arange(len(src))
        labelled = src.labels() is not None
        ev = EvalData(name="data", n=int(len(eidx)), description=f"{src.kind} {src.name}", labelled=labelled,
                      fingerprint=src.fingerprint(), _source=src, _indices=eidx)
        notes.insert(0, f"eval data: {src.kind} {src.name}, {len(eidx)} images"
                        + ("" if labelled else " (no labels: label-free fidelity against the dense model only)"))
    else:
        notes.insert(0, "no --data: exports verified on seeded random inputs; accuracy not measured")
    if loaded.classes and src is not None and src.classes and list(loaded.classes) != list(src.classes):
        raise UsageError(f"--data: {src.name}: its classes ({', '.join(src.classes[:5])}, …) differ from the "
                         f"model file's classes ({', '.join(loaded.classes[:5])}, …)")
    outs = loaded.meta.get("outputs") or []
    width = outs[0][0] if outs and len(outs[0]) == 1 else None
    if src is not None and src.classes and width is not None and len(src.classes) != width:
        if len(src.classes) > width:
            raise UsageError(f"--data: {src.name} has {len(src.classes)} classes but the model's first output has "
                             f"{width} scores: labels would be out of range")
        notes.append(f"warning: --data has {len(src.classes)} class folders, the model {width} outputs: labels are "
                     "the folders' sorted positions (0..), so top-1 means something only if they follow the model's "
                     "class order; agreement with the dense model does not depend on it")
    wl = Workload(model=loaded, preprocess=prep, eval=ev, options=opts, notes=notes)
    wl._calib_from, wl._finetune_from = calib_from, ft_from
    return wl


def _reference_workload(loaded: LoadedModel, opts: DataOptions) -> Workload:
    ev = data.eval_split(opts.eval_per_class)
    prep = datasets.Preprocess(resize=None, center_crop=None, mean=tuple(data.MEAN), std=tuple(data.STD),
                               scale=data.SCALE)
    eval_data = EvalData(name=ev.name, n=len(ev), description=ev.source, labelled=True,
                         fingerprint=f"cifar10:{ev.name}:{len(ev)}", _split=ev)
    wl = Workload(model=loaded, preprocess=prep, eval=eval_data, options=opts, reference_path=True,
                  notes=[f"eval split {ev.name}, {len(ev)} images from {ev.source}"])
    wl._calib_from = ("split", data.calib_split)
    wl._finetune_from = ("split", lambda: data.finetune_split(opts.finetune_per_class))
    ho = data.holdout_split(opts.eval_per_class)
    if ho is not None:
        wl.holdout = EvalData(name=ho.name, n=len(ho), description=ho.source, labelled=True,
                              fingerprint=f"cifar10:{ho.name}:{len(ho)}", _split=ho)
    return wl


def shard_batches(wl: Workload, reference: Optional[nn.Module], batch_size: int = _BATCH,
                  part: Optional[EvalData] = None
                  ) -> Iterator[Tuple[np.ndarray, Optional[np.ndarray], Optional[List[np.ndarray]]]]:
    """(data, labels, reference outputs) batches of the eval data (or of ``part``: the hold-out) for the agent's
    shards: ``reference`` (the dense model) run here on exactly the samples shipped, every output in the ONNX
    export's order."""
    ev = part if part is not None else wl.eval
    assert ev is not None
    if reference is not None:
        reference.eval()
    for batch, labels in ev.batches(batch_size):
        refs = None
        if reference is not None:
            with torch.no_grad():
                refs = [t.detach().cpu().float().numpy() for t in flatten_outputs(reference(ev.to_tensor(batch)))]
        yield batch, labels, refs


def describe_sources(wl: Workload) -> Dict[str, Any]:
    """Provenance of the workload: the model's recipe and each data part's origin."""
    return {"model": dict(wl.model.recipe), "preprocess": wl.manifest_preprocess(),
            "eval": None if wl.eval is None else {"name": wl.eval.name, "n": wl.eval.n,
                                                  "source": wl.eval.description, "fingerprint": wl.eval.fingerprint,
                                                  "labelled": wl.eval.labelled},
            "notes": list(wl.notes)}

