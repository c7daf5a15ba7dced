"""One demo candidate's build: prune at a ratio → optional recovery → export in the device's format (verified
against torch), from the demo's open model and data (:class:`DemoBuilder`).

The demo builds in this process by default; with ``--executor ray`` each candidate is a Ray task, and
:func:`host.commands.demo.build_remote` reopens the model and data on the worker from :func:`options_document`
(model source, weights, data paths: never a pickle of a model), once per worker process.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from edgeprune import export, prune
from edgeprune.recovery import recover
from edgeprune.workload import Workload
from host.files import write_text_atomic
from host.fleet.formats import profile_for

def tag_of(name: str, ratio: float) -> str:
    return f"{name}-r{int(round(ratio * 100)):03d}"


class DemoBuilder:
    """The demo's model and data, opened once, and :meth:`build` for each ratio."""

    def __init__(self, opts: Any, wl: Workload, emit: Optional[Callable[..., None]] = None) -> None:
        self.opts, self.wl = opts, wl
        self.emit = emit or (lambda *a: None)
        loaded = wl.model
        self.name, self.base, self.meta = loaded.name, loaded.model, loaded.meta
        self.keep = loaded.ignored_modules()
        self.cal = self.ft_split = None
        if opts.recovery and any(r > 0 for r in opts.ratios):
            self.cal = wl.calib()
            self.ft_split = wl.finetune()
        self.example = wl.example
        self.check_inputs = wl.check_inputs()
        self.profile = profile_for(opts.device)    # the format the device's runtime loads: onnx, IR, tflite, ...
        self._calib_inputs: Optional[Any] = None

    def calib_inputs(self) -> Optional[Any]:
        if self._calib_inputs is None and self.profile.needs_calibration:
            self._calib_inputs = self.wl.calib_inputs(200)
        return self._calib_inputs

    def build(self, ratio: float, dest: Path) -> Dict[str, Any]:
        """Candidate ``ratio`` into ``dest`` (``<tag>.plan.json``, the artifact and its manifest): its record."""
        opts, emit = self.opts, self.emit
        tag = tag_of(self.name, ratio)
        torch.manual_seed(opts.seed)          # each build on its own: the same bytes in any order, on any worker
        emit("stage", f"{tag}: pruning {ratio:.0%} of channels", None, None)
        model = copy.deepcopy(self.base)
        pr = prune.prune(model, ratio, self.example, importance=opts.importance, round_to=opts.device.round_to,
                         extra_ignored=[dict(model.named_modules())[n] for n, m in self.base.named_modules()
                                        if m in self.keep])
        recovery = "none"
        if ratio > 0 and opts.recovery:
            rec = recover(model, opts.recovery_plan(), calib=self.cal, train=self.ft_split,
                          events=lambda k, m, d, t: emit(k, f"{tag}: {m}", d, t))
            if rec.recalibrated:
                recovery = "bn"
            if rec.finetune is not None:
                res = rec.finetune
                recovery = f"ft {res.steps_done}/{res.steps_planned} steps, {res.seconds:.0f}s"
        emit("stage", f"{tag}: export {self.profile.fmt} (verified against torch)", None, None)
        dest.mkdir(parents=True, exist_ok=True)
        write_text_atomic(dest / f"{tag}.plan.json", pr.plan.to_json())
        export.export(model, self.profile.fmt, dest, tag=tag, check_inputs=self.check_inputs,
                      calib_inputs=self.calib_inputs(), model_name=self.name,
                      source_checkpoint_sha256=str(self.meta["sha256"]), pruning_plan_sha256=pr.plan.sha256(),
                      input_shape=tuple(self.wl.input_shape), preprocess=self.wl.manifest_preprocess(),
                      **dict(self.profile.export_options))
        return {"tag": tag, "ratio": ratio, "macs": pr.macs_after, "params": pr.params_after,
                "plan_sha256": pr.plan.sha256(), "recovery": recovery,
                "manifest": export.manifest_path(dest, tag, self.profile.fmt).name}


def options_document(opts: Any) -> Dict[str, Any]:
    """The demo's options as JSON (what a worker rebuilds them from)."""
    doc: Dict[str, Any] = {}
    for f in dataclasses.fields(opts):
        v = getattr(opts, f.name)
        if f.name == "device":
            v = v.model_dump(mode="json", by_alias=True, exclude={"source"}, exclude_none=True)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, tuple):
            v = list(v)
        doc[f.name] = v
    return doc
