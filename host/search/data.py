"""The model and data of ``edgeprune search``: one :class:`~edgeprune.workload.Workload`, opened once per run.

:func:`open_search_workload` opens it from the run's options (the model-source and data fields of
:class:`host.search.options.SearchOptions`, stored with the run so ``--resume`` reopens the same);
:func:`check_workload` refuses, before anything is recorded, targets the data cannot judge (a top-1 drop bound on
unlabelled data, a search with no eval data at all). :class:`SearchData` is what the evaluator builds and measures with:

* the eval shards the agent scores, written once per run folder (``work/eval/``, reused on ``--resume`` while
  their files and the data are unchanged) with the dense model's outputs as references, so every candidate's
  label-free agreement and SNR are measured on the device next to top-1 (when there are labels);
* the calibration split (BatchNorm recalibration, int8 calibration, Taylor importance);
* the fine-tune split for recovery: on the reference path the CIFAR-10 training images per class as before; on
  the user path ``--finetune-data`` only, taken per class; without it recovery is BatchNorm recalibration only;
* the host-side score (netadapt's proposals, the sensitivity table): top-1 on labelled data, else top-1 agreement
  with the dense model (:func:`edgeprune.sensitivity.agreement`).

For the reference CIFAR models without ``--data`` every split is the one the search used before the workload
existed, so published figures and the reference path's candidate keys are unchanged.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple

from edgeprune.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.data import Split
    from edgeprune.shards import ShardInfo
    from edgeprune.workload import DataOptions, Workload
    from host.fleet.targets import TargetSet

SOURCE_FIELDS = ("model_args", "weights", "trust_pickle", "input_shape", "ignore_layers")
DATA_FIELDS = ("data", "calib_data", "finetune_data", "resize", "center_crop", "mean", "std")
SHARDS_FILE = "shards.json"


def data_options(opts: Any) -> "DataOptions":
    from edgeprune.workload import DataOptions

    return DataOptions.of(opts, finetune_per_class=None)


def open_search_workload(opts: Any) -> "Workload":
    """The run's model and data (every bad input one clear error, before anything is built)."""
    from edgeprune.workload import open_workload
    from edgeprune.sources import ModelSpec

    return open_workload(ModelSpec.of(opts), data_options(opts))


def source_key(opts: Any) -> Dict[str, Any]:
    """The model-source and data options given (not at their defaults): part of a candidate's key, so a resumed or
    shared run never serves an artifact built from other data. Empty for the reference models without flags."""
    out: Dict[str, Any] = {}
    for name in SOURCE_FIELDS + DATA_FIELDS:
        v = getattr(opts, name, None)
        if v in (None, False, (), [], {}):
            continue
        out[name] = list(v) if isinstance(v, tuple) else v
    return out


def eval_labelled(wl: "Workload") -> bool:
    return wl.eval is not None and wl.eval.labelled


def check_workload(wl: "Workload", targets: Mapping[str, "TargetSet"]) -> None:
    """UsageError when the search could not judge a candidate: no eval data, or a top-1 drop bound on unlabelled
    eval data."""
    from host.fleet.targets import check_labelled

    if wl.eval is None or wl.eval.n == 0:
        raise UsageError("--data: a search judges every candidate's accuracy on the device and needs eval data: give "
                         "--data (an image folder, an npz, or MODULE:CALLABLE; labels optional with "
                         "--min-agreement)")
    check_labelled(targets, wl.eval.labelled, f"--data {wl.eval.description}")


def fingerprint(wl: "Workload") -> Dict[str, Any]:
    """What the run's data is: stored with the run, compared on ``--resume`` (a changed --data is refused)."""
    ev = wl.eval
    return {"input_shape": list(wl.input_shape),
            "eval": None if ev is None else {"name": ev.name, "n": ev.n, "fingerprint": ev.fingerprint,
                                             "labelled": ev.labelled, "source": ev.description},
            "preprocess": wl.manifest_preprocess()}


def split_fingerprint(split: "Split") -> str:
    """sha256 of a held split's images and labels (a cache key: the data, not its path)."""
    h = hashlib.sha256()
    h.update(str(split.images.shape).encode())
    h.update(split.images.tobytes())
    h.update(split.labels.tobytes())
    return h.hexdigest()


def is_labelled(split: "Split") -> bool:
    return len(split) > 0 and bool((split.labels >= 0).all())


class SearchData:
    """The workload as the evaluator uses it: eval shards, calib and fine-tune splits, the host-side score."""

    def __init__(self, wl: "Workload", work: Path, dense: Any, emit: Optional[Callable[..., None]] = None) -> None:
        self.wl = wl
        self.work = Path(work)
        self.dense = dense
        self.emit = emit or (lambda *a: None)
        self._calib: Optional["Split"] = None
        self._calib_done = False
        self._ft: Dict[Optional[int], Optional["Split"]] = {}
        self._ref: Dict[int, List[Any]] = {}
        self.shards, self.eval_sha = self._write_shards(wl.eval, "eval")
        self._holdout: Optional[Tuple[List["ShardInfo"], str]] = None

    # -- eval shards
    @property
    def eval_name(self) -> str:
        return self.wl.eval.name if self.wl.eval is not None else "eval"

    @property
    def labelled(self) -> bool:
        return eval_labelled(self.wl)

    @property
    def metric(self) -> str:
        """What the host-side score is: ``top1`` (labelled eval data) or ``agreement`` with the dense model."""
        return "top1" if self.labelled else "agreement"

    @property
    def holdout_name(self) -> Optional[str]:
        """The hold-out split's name and size for reports (``holdout, 9000 images``), None without one."""
        ho = self.wl.holdout
        return None if ho is None else f"{ho.name}, {ho.n} images"

    def holdout_shards(self) -> Optional[Tuple[List["ShardInfo"], str]]:
        """The hold-out's shards (test images the eval split leaves out; written on first use, under
        ``work/holdout/``) and their sha256; None when the workload has no hold-out."""
        if self.wl.holdout is None:
            return None
        if self._holdout is None:
            self._holdout = self._write_shards(self.wl.holdout, "holdout")
        return self._holdout

    def _write_shards(self, ev: Any, where: str) -> Tuple[List["ShardInfo"], str]:
        from edgeprune import export, models, shards
        from edgeprune.workload import shard_batches

        if ev is None:
            return [], ""
        folder = self.work / where
        index = folder / SHARDS_FILE
        want = {"fingerprint": ev.fingerprint, "n": ev.n, "input_shape": list(self.wl.input_shape),
                "references": True, "v": 1}
        try:
            doc = json.loads(index.read_text())
            if doc.get("key") == want:
                got = [shards.ShardInfo(folder / s["file"], s["sha256"], int(s["n"])) for s in doc["shards"]]
                if got and all(s.path.is_file() and models.sha256_file(s.path) == s.sha256 for s in got):
                    return got, str(doc["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.emit("stage", "", f"writing the {where} shards ({ev.n} images, with the dense model's outputs)")
        for old in folder.glob("*.npz"):
            old.unlink()
        written = shards.write_shards(shard_batches(self.wl, self.dense, part=ev), folder,
                                      prefix=f"{ev.name}-{ev.n}")
        sha = written[0].sha256 if len(written) == 1 else export.sha256_text(",".join(s.sha256 for s in written))
        from host.files import write_text_atomic

        write_text_atomic(index, json.dumps({"key": want, "sha256": sha, "shards": [
            {"file": s.path.name, "sha256": s.sha256, "n": s.n} for s in written]}, indent=1, sort_keys=True))
        return written, sha

    # -- calibration and fine-tune data
    def calib(self) -> Optional["Split"]:
        """BatchNorm recalibration / int8 calibration / Taylor importance images; None without any data."""
        if not self._calib_done:
            self._calib, self._calib_done = self.wl.calib(), True
        return self._calib

    def finetune(self, per_class: Optional[int], seed: int) -> Optional["Split"]:
        """The recovery fine-tune split, ``per_class`` images per class (None: all); None without fine-tune data
        (the user path without ``--finetune-data``: recovery is then BatchNorm recalibration only)."""
        if per_class in self._ft:
            return self._ft[per_class]
        if self.wl.reference_path:
            from edgeprune import data

            split: Optional["Split"] = data.finetune_split(per_class)
        else:
            full = self.wl.finetune()
            split = full
            if full is not None and per_class is not None:
                from edgeprune import data, datasets

                idx = datasets.split_indices(full.labels, len(full), per_class=per_class, seed=seed)
                if len(idx) < len(full):
                    split = data.Split(full.name, full.images[idx], full.labels[idx], full.source, full.mean,
                                       full.std, full.scale)
        self._ft[per_class] = split
        return split

    # -- the host-side score
    def score(self, model: Any, split: "Split") -> float:
        """top-1 on ``split`` when it is labelled, else top-1 agreement with the dense model on it."""
        from edgeprune import finetune, sensitivity

        if is_labelled(split):
            return float(finetune.evaluate(model, split))
        ref = self._ref.get(id(split))
        if ref is None:
            ref = self._ref[id(split)] = sensitivity.reference_argmax(self.dense, split)
        return float(sensitivity.agreement(model, split, ref))
