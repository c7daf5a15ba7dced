"""Device evaluation: the :class:`Evaluator` interface the driver asks for work through, and
:class:`FleetEvaluator`, the real one.

:class:`FleetEvaluator` builds a candidate through its executor (:mod:`host.executors`: in this process by
default, or as a Ray task on a cluster): prune by its exact per-group channel counts → recover with
:func:`edgeprune.recovery.recover` at the candidate's recovery level → export in the device's format, verified
against torch, under ``work/artifacts/<key>`` (reused while its files match its manifest, an interrupted
fine-tune resumed from its checkpoint). It measures it through the device's agent
(:func:`host.fleet.runner.run_on_device`, under the device's lease): devices on different machines in parallel,
devices on one machine one after the other; with builds elsewhere, a remote device measures its candidates in
order, each as soon as its build is done, while the next ones build, and this machine's devices wait until
nothing builds here. It also scores
netadapt's proposals on the host and times the layer configurations of netadapt's lookup tables on the devices.
Results go back through callbacks; the driver persists them.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

from agent import schema
from edgeprune.errors import DeviceError, EdgepruneError, ExportError, PruneError
from host.files import write_text_atomic
from host.fleet.devices import DeviceConfig
from host.fleet.targets import metrics_from_report
from host.search.algos.base import Candidate, DeviceMeasurement, LayerConfig, ModelSpace
from host.search.options import WORK, Events, Profile, RecoveryOptions, SearchOptions

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.workload import Workload
    from host.executors import Executor

@dataclass
class Request:
    device: DeviceConfig
    profile: Profile
    candidate: Candidate
    key: str
    recovery: Optional[RecoveryOptions] = None   # replaces the candidate level's (a budget's final recovery)
    max_seconds: Optional[float] = None          # the recovery's hard stop now (a budget's time left; not keyed)
    split: str = "eval"                          # "holdout": scored on the test images the search did not choose on;
                                                 # "timing": speed only, repetition ``rep`` of ``reps`` (host.search.final)
    pairs: str = ""                              # the dense model measured right after the candidate of this key
    rep: int = 1
    reps: int = 1


DeviceDone = Callable[[Request, DeviceMeasurement, Dict[str, Any]], None]
LayerDone = Callable[[str, str, float, Dict[str, Any]], None]   # device id, config key, ms, identity


class Evaluator(Protocol):
    """Does the work the algorithms ask for; the driver (:class:`Search`) persists and caches the results."""

    def measure(self, requests: Sequence[Request], done: DeviceDone) -> None:
        """Build and measure every request, on its devices in parallel; ``done`` (thread-safe) is called as
        each completes, with extra fields for its record (the report, the artifact's files)."""

    def host_top1(self, profile: Profile, candidate: Candidate) -> float:
        """Top-1 of the candidate with its recovery, in torch on the host, on the calib split."""

    def layer_latency(self, requests: Sequence[Tuple[DeviceConfig, Profile, List[LayerConfig]]],
                      done: LayerDone) -> Dict[str, Optional[str]]:
        """Time each layer configuration alone on its device; ``done`` per configuration. Returns an error
        message (or None) per device id."""


class _Build:
    """A candidate's build in progress (or an artifact reused): ``result()`` is its record, with ``artifact_dir``
    (relative to the run folder) and ``built_by``, written to ``built.json`` beside it once it is in place."""

    def __init__(self, ev: "FleetEvaluator", folder: Path, handle: Any, info: Optional[Dict[str, Any]]) -> None:
        self.ev, self.folder, self.handle, self.info = ev, folder, handle, info
        self._lock = threading.Lock()     # devices sharing the artifact wait for it from their own threads

    def cancel(self) -> None:
        if self.info is None:
            self.handle.cancel()

    def result(self) -> Dict[str, Any]:
        with self._lock:
            if self.info is None:
                built = self.handle.result()
                info = dict(built.info, artifact_dir=os.path.relpath(self.folder, self.ev.out),
                            built_by=built.built_by)
                write_text_atomic(self.folder / "built.json", json.dumps(info, indent=1, sort_keys=True))
                self.info = info
            return self.info


class _Failed(Exception):
    """A request whose build failed before it was submitted (the message is already the measurement's error)."""


def machine_of(dev: DeviceConfig) -> str:
    """Which machine a device runs on, as far as its config says: devices on one machine are measured one after
    the other."""
    if dev.transport == "ssh" and dev.ssh is not None:
        host = dev.ssh.host.lower()
        return "local" if host in ("localhost", "127.0.0.1", "::1") and dev.ssh.proxy_jump is None \
            else f"ssh:{dev.ssh.proxy_jump or ''}/{host}"
    return "local"


class FleetEvaluator:
    """Builds candidates on the host (prune → recover → export, verified) and measures them through the agents."""

    def __init__(self, out: Path, run_id: str, opts: SearchOptions, name: str, model: Any, meta: Mapping[str, Any],
                 space: ModelSpace, events: Optional[Events] = None, *,
                 workload: Optional["Workload"] = None, executor: Optional["Executor"] = None) -> None:
        from host.executors.local import LocalExecutor
        from host.search import data as search_data

        self.out, self.run_id, self.opts, self.name = Path(out), run_id, opts, name
        self.base, self.meta, self.space = model, dict(meta), space
        self.emit = events or (lambda *a: None)
        self.executor: "Executor" = executor if executor is not None else LocalExecutor()   # where builds run
        self.work = self.out / WORK
        (self.work / "artifacts").mkdir(parents=True, exist_ok=True)
        wl = workload if workload is not None else search_data.open_search_workload(opts)
        self.workload = wl
        self.example = wl.example
        # --ignore-layers / the model file's ignore_layers, as modules of self.base (wl.model.model may be another
        # instance of the same model when the caller loaded its own)
        names = {id(m): n for n, m in wl.model.model.named_modules()}
        mods = dict(self.base.named_modules())
        self.keep_names = [names[id(m)] for m in wl.model.ignored_modules() if names.get(id(m)) in mods]
        self.data = search_data.SearchData(wl, self.work, self.base, self.emit)
        self.eval_name = self.data.eval_name
        self.shards = self.data.shards
        self.shard_sha = self.data.eval_sha
        self.check_inputs = wl.check_inputs()
        self.host_metric = self.data.metric
        # the dense teacher's logits, computed once per (data, seed) for every candidate's distillation
        from edgeprune.teacher_cache import TeacherCache

        self.teacher_cache = TeacherCache(self.work / "teacher-cache")
        from host.fleet.pool import TransportPool
        from host.fleet.runner import transport_for

        # one transport, and so one agent session, per device for the whole search
        self.pool = TransportPool(transport_for)

    def close(self) -> None:
        """End the devices' agent sessions."""
        self.pool.close()

    @property
    def calib(self) -> Any:
        return self.data.calib()

    # -- building
    @property
    def selection_split(self) -> str:
        """The split candidates are compared and chosen on (``eval, 1000 images``)."""
        ev = self.workload.eval
        return "" if ev is None else f"{ev.name}, {ev.n} images"

    @property
    def holdout_name(self) -> Optional[str]:
        """The hold-out split as reports name it (``holdout, 9000 images``); None without one."""
        return self.data.holdout_name

    def finetune_size(self, per_class: Optional[int] = None) -> int:
        """Images in the fine-tune split at ``per_class`` (None: all); 0 without fine-tune data."""
        if not self.workload.has_finetune_data:
            return 0
        return len(self.data.finetune(per_class, self.opts.seed))

    def _model(self, profile: Profile, cand: Candidate, checkpoint: Optional[Path], tag: str,
               recovery: Optional[RecoveryOptions] = None,
               max_seconds: Optional[float] = None) -> Tuple[Any, Dict[str, Any]]:
        from edgeprune import prune
        from edgeprune.recovery import recover
        from host.search.data import is_labelled

        model = copy.deepcopy(self.base).eval()
        info: Dict[str, Any] = {"plan": None, "plan_sha256": "", "recovery": None}
        if not cand.kept:
            return model, info
        calib = None
        if self.opts.importance in prune.NEEDS_CALIB:
            if self.calib is None or not is_labelled(self.calib):
                raise PruneError(f"--importance {self.opts.importance}: needs labelled calibration images "
                                 "(--calib-data or --finetune-data with labels); or use l1, l2 or bn_scale")
            calib = self.calib.tensors(256)
        self.emit("stage", "", f"{tag}: pruning ({len(cand.kept)} groups, align {profile.round_to})")
        mods = dict(model.named_modules())
        pr = prune.prune(model, 0.0, self.example, importance=self.opts.importance, round_to=profile.round_to,
                         min_channels=self.opts.min_channels, prune_residual=self.opts.prune_residual,
                         layer_ratios=self.space.layer_ratios(cand.kept_map(), profile.round_to), calib=calib,
                         extra_ignored=[mods[n] for n in self.keep_names])
        got = {layer.name: len(layer.keep) for layer in pr.plan.layers}
        if got != cand.kept_map():
            raise PruneError(f"{tag}: the plan keeps {got}, the candidate asked for {cand.kept_map()} "
                             f"(skipped: {pr.skipped})")
        info.update(plan=pr.plan, plan_sha256=pr.plan.sha256(), macs_counted=pr.macs_after, params=pr.params_after)
        rec = recovery if recovery is not None else self.opts.recovery_for(cand.recovery)
        if rec is not None:
            ft = self.data.finetune(rec.finetune_per_class, self.opts.seed) if rec.finetune_epochs > 0 else None

            def events(kind: str, msg: str, done: Optional[int], total: Optional[int]) -> None:
                if kind == "progress":
                    self.emit("progress", "", f"{tag}: {msg} step {done}/{total}")
                else:
                    self.emit(kind, "", f"{tag}: {msg} ({cand.recovery} recovery)")

            plan = rec.plan(self.opts.seed)
            if max_seconds is not None:   # a resumed final must not get its whole time again
                plan = dataclasses.replace(plan, max_seconds=min(plan.max_seconds or max_seconds, max_seconds))
            out = recover(model, plan, calib=self.calib if rec.recalibrate else None, train=ft,
                          teacher=self.base, checkpoint=checkpoint, events=events,
                          teacher_cache=self.teacher_cache if rec.distill > 0 else None)
            res = out.finetune
            if res is not None:
                info["recovery"] = {"steps": res.steps_done, "planned": res.steps_planned,
                                    "seconds": round(res.seconds, 2), "stopped_by_time": res.stopped_by_time,
                                    "images_seen": res.images_seen, "precision": out.precision,
                                    "teacher_cache_hits": (out.teacher_cache or {}).get("hits")}
        return model, info

    def build(self, profile: Profile, cand: Candidate, key: str, recovery: Optional[RecoveryOptions] = None,
              max_seconds: Optional[float] = None) -> Dict[str, Any]:
        """The candidate's artifact under ``work/artifacts/<key>``: reused when its files match its manifest."""
        return self.submit_build(profile, cand, key, recovery, max_seconds).result()

    def reusable(self, key: str) -> Optional[Dict[str, Any]]:
        """The record of the artifact already built for ``key`` when its files still match its manifest."""
        from edgeprune import export

        folder = self.artifact_folder(key)
        built = folder / "built.json"
        if built.is_file():
            try:
                info = json.loads(built.read_text())
                export.Manifest.read(folder / info["manifest"]).check_files(folder)
                if info.get("key") == key:
                    return info
            except (OSError, ValueError, KeyError, EdgepruneError):
                pass
        return None

    def artifact_folder(self, key: str) -> Path:
        return self.work / "artifacts" / key[:16]

    def submit_build(self, profile: Profile, cand: Candidate, key: str, recovery: Optional[RecoveryOptions] = None,
                     max_seconds: Optional[float] = None) -> "_Build":
        """Start building the candidate on the executor (a reusable artifact: nothing to build); ``result()`` of
        the returned handle is its record, with ``built_by`` (where it was built) once it is in place here."""
        from host.executors import BuildTask
        from host.executors.base import absolute_paths

        folder = self.artifact_folder(key)
        info = self.reusable(key)
        if info is not None:
            return _Build(self, folder, None, info)
        if (folder / "built.json").exists():   # a stale or broken build: gone. A folder without one holds an
            shutil.rmtree(folder, ignore_errors=True)   # interrupted fine-tune's checkpoint: resumed (locally)
        payload = {"run_id": self.run_id, "name": self.name, "options": absolute_paths(self.opts.to_dict()),
                   "profile": dataclasses.asdict(profile), "candidate": dataclasses.asdict(cand), "key": key,
                   "recovery": dataclasses.asdict(recovery) if recovery is not None else None,
                   "max_seconds": max_seconds}
        task = BuildTask(f"{self.name}-{key[:12]}", folder,
                         lambda dest: self.build_into(profile, cand, key, recovery, max_seconds, dest),
                         "host.search.remote:build_candidate", payload)
        return _Build(self, folder, self.executor.submit(task), None)

    def build_into(self, profile: Profile, cand: Candidate, key: str, recovery: Optional[RecoveryOptions],
                   max_seconds: Optional[float], folder: Path) -> Dict[str, Any]:
        """Prune, recover and export the candidate into ``folder`` (verified against torch): its record."""
        from edgeprune import export

        folder.mkdir(parents=True, exist_ok=True)
        tag = f"{self.name}-{key[:12]}"
        model, info = self._model(profile, cand, folder / "finetune.ckpt", tag, recovery, max_seconds)
        if info.get("params") is None:   # the dense model: counted here (a pruned one was counted by prune())
            from edgeprune import prune

            info["macs_counted"], info["params"] = prune.count(model, self.example)
        calib_inputs = self.workload.calib_inputs(200) if profile.needs_calibration else None
        self.emit("stage", "", f"{tag}: export {profile.fmt} (verified against torch)")
        man = export.export(model, profile.fmt, folder, tag=tag, check_inputs=self.check_inputs,
                            calib_inputs=calib_inputs, model_name=self.name,
                            source_checkpoint_sha256=str(self.meta.get("sha256", "")),
                            pruning_plan_sha256=info["plan_sha256"], input_shape=tuple(self.workload.input_shape),
                            preprocess=None if self.workload.reference_path else self.workload.manifest_preprocess(),
                            **dict(profile.export_options))
        if info["plan"] is not None:
            write_text_atomic(folder / "plan.json", info["plan"].to_json())
        (folder / "finetune.ckpt").unlink(missing_ok=True)
        return {"key": key, "tag": tag, "manifest": export.manifest_path(folder, tag, profile.fmt).name,
                "artifact": man.file, "artifact_files": sorted(man.files), "artifact_sha256": man.sha256,
                "plan_sha256": info["plan_sha256"], "recovery_result": info["recovery"],
                "macs_counted": info.get("macs_counted"), "params": info.get("params")}

    def host_top1(self, profile: Profile, candidate: Candidate) -> float:
        """The candidate's score on the calib split: top-1 (labelled), else agreement with the dense model."""
        model, _ = self._model(profile, candidate, None, f"{self.name}-proposal")
        if self.calib is None:
            raise PruneError("netadapt scores proposals on calibration images: give --data or --calib-data")
        return self.data.score(model, self.calib)

    # -- measuring
    def measure(self, requests: Sequence[Request], done: DeviceDone) -> None:
        from host.fleet.runner import run_on_device

        builds: Dict[str, _Build] = {}
        failed: Dict[str, str] = {}
        try:
            for req in requests:          # every build submitted first: on a cluster they all run at once
                if req.key in builds or req.key in failed:
                    continue
                try:
                    builds[req.key] = self.submit_build(req.profile, req.candidate, req.key, req.recovery,
                                                        req.max_seconds)
                except (PruneError, ExportError, DeviceError) as e:
                    failed[req.key] = f"{type(e).__name__}: {e}"
        except BaseException:         # the executor failed (a lost cluster) or Ctrl-C: nothing left building
            for b in builds.values():
                b.cancel()
            raise

        def prepared(req: Request) -> Optional[Tuple[Dict[str, Any], schema.JobSpec]]:
            """The request's artifact (waiting for its build) and job; None (reported) when it cannot run."""
            from edgeprune import export
            from host.fleet.jobs import build_job, repetition_job

            try:
                if req.key in failed:
                    raise _Failed(failed[req.key])
                try:
                    info = builds[req.key].result()
                except (PruneError, ExportError, DeviceError) as e:    # the build's: every request of the key
                    failed.setdefault(req.key, f"{type(e).__name__}: {e}")
                    raise
                folder = self.out / info["artifact_dir"]
                man = export.Manifest.read(folder / info["manifest"])
                shards, split_name, tag = self.shards, self.eval_name, req.key[:12]
                if req.split == "holdout":
                    held = self.data.holdout_shards()
                    if held is None:
                        raise DeviceError("no hold-out data: the eval split is all the test data there is")
                    shards, split_name, tag = held[0], "holdout", f"{tag}-holdout"
                if req.split == "timing":     # a repetition of the final measurement: no eval data
                    shards, split_name, tag = None, "", f"{tag}-r{req.rep}"
                job = build_job(req.device, f"{self.run_id}-{tag}", folder / info["artifact"], man,
                                shards or None, "", split_name, quick=self.opts.quick, seed=self.opts.seed)
                if req.split == "timing":
                    job = repetition_job(job, req.rep, req.reps)
                return info, job
            except _Failed as e:
                done(req, DeviceMeasurement(False, error=str(e)), {})
            except (PruneError, ExportError, DeviceError) as e:     # the build's, or this request's job
                done(req, DeviceMeasurement(False, error=f"{type(e).__name__}: {e}"), {})
            return None

        def one(req: Request) -> None:
            ready = prepared(req)
            if ready is None:
                return
            info, job = ready
            o = run_on_device(req.device, job, self.work / "jobs", lease_wait_s=self.opts.lease_wait_s,
                              events=lambda dev, kind, msg: self.emit("device", dev, msg), pool=self.pool)
            if not o.ok or o.report is None:
                done(req, DeviceMeasurement(False, error=f"{o.error_type}: {o.error}"), {})
                return
            m = DeviceMeasurement(True, metrics_from_report(o.report), None, req.key, info["artifact_sha256"],
                                  info["plan_sha256"])
            extra = {k: info.get(k) for k in ("artifact_dir", "artifact", "artifact_files", "manifest",
                                              "recovery_result", "macs_counted", "params", "built_by")}
            plan = self.out / info["artifact_dir"] / "plan.json"
            extra["plan"] = json.loads(plan.read_text()) if plan.is_file() else None
            extra["report"] = schema.to_dict(o.report)
            extra["job"] = schema.to_dict(job)
            extra["attempts"] = o.attempts
            done(req, m, extra)

        def all_built() -> None:
            for b in builds.values():
                try:
                    b.result()
                except (PruneError, ExportError, DeviceError):
                    pass          # reported with its requests

        # in parallel across machines; one after the other on one machine (local devices, SSH devices at one
        # address), whose measurements would otherwise share its CPUs. A remote device measures its candidates in
        # order, each once built (the next ones build meanwhile); this machine's devices once nothing builds here.
        by_machine: Dict[str, List[Request]] = {}
        for req in requests:
            by_machine.setdefault(machine_of(req.device), []).append(req)

        def machine(name: str, reqs: List[Request]) -> None:
            if name == "local" and self.executor.builds_on_this_machine:
                all_built()
            for req in reqs:
                one(req)

        if not by_machine:
            return
        with ThreadPoolExecutor(max_workers=len(by_machine)) as pool:
            futures = [pool.submit(machine, name, rs) for name, rs in by_machine.items()]
            try:
                for f in as_completed(futures):
                    f.result()
            except BaseException:
                for b in builds.values():
                    b.cancel()
                raise

    # -- layer latency (netadapt)
    def _micro(self, cfg: LayerConfig, profile: Profile) -> Tuple[Path, Any]:
        """A one-layer model of ``cfg``, exported (cached by configuration and format)."""
        import torch
        import torch.nn as nn

        from edgeprune import export

        folder = self.opts.cache() / "lut-artifacts" / f"{profile.fmt}-" \
            f"{hashlib.sha256(repr(profile.export_options).encode()).hexdigest()[:8]}"
        tag = cfg.key()
        mpath = export.manifest_path(folder, tag, profile.fmt)
        if mpath.is_file():
            try:
                man = export.Manifest.read(mpath)
                man.check_files(folder)
                return folder / man.file, man
            except EdgepruneError:
                pass
        gen = torch.Generator().manual_seed(0)
        if cfg.kind == "linear":
            layer: nn.Module = nn.Linear(cfg.in_channels, cfg.out_channels, bias=cfg.bias)
            shape = [1, cfg.in_channels]
        else:
            layer = nn.Conv2d(cfg.in_channels, cfg.out_channels, cfg.kernel, cfg.stride, cfg.padding, cfg.dilation,
                              cfg.groups, bias=cfg.bias)
            shape = [1, cfg.in_channels, cfg.in_hw[0], cfg.in_hw[1]]
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        check = torch.randn([4] + shape[1:], generator=gen)
        spec = export.get_format(profile.fmt)
        calib = torch.randn([16] + shape[1:], generator=gen) if spec.calibration else None
        man = export.export(layer.eval(), profile.fmt, folder, tag=tag, check_inputs=check, calib_inputs=calib,
                            model_name=f"layer {tag}", source_checkpoint_sha256="", pruning_plan_sha256="",
                            input_shape=shape, **dict(profile.export_options))
        return folder / man.file, man

    def layer_latency(self, requests: Sequence[Tuple[DeviceConfig, Profile, List[LayerConfig]]],
                      done: LayerDone) -> Dict[str, Optional[str]]:
        from host.fleet.runner import Lease
        from host.fleet.jobs import build_job

        errors: Dict[str, Optional[str]] = {}
        jobs: Dict[str, List[Tuple[str, schema.JobSpec]]] = {}
        for dev, profile, configs in requests:   # export on the host first, then time on the devices in parallel
            try:
                items = []
                for cfg in configs:
                    path, man = self._micro(cfg, profile)
                    job = build_job(dev, f"lut-{hashlib.sha256(cfg.key().encode()).hexdigest()[:16]}", path, man,
                                    None, quick=True, seed=self.opts.seed)
                    job.power = None
                    job.timing.min_iters = min(job.timing.min_iters, 50)
                    job.timing.min_duration_s = self.opts.lut_seconds
                    job.timing.warmup_s = min(job.timing.warmup_s, 0.1)
                    items.append((cfg.key(), job))
                jobs[dev.id] = items
            except (ExportError, DeviceError) as e:
                errors[dev.id] = f"{type(e).__name__}: {e}"

        def per_device(dev: DeviceConfig) -> None:
            transport = None
            try:
                transport = self.pool.get(dev)
                with Lease(transport, dev.id, wait_s=self.opts.lease_wait_s, label=f"{self.run_id} layer table"):
                    for key, job in jobs[dev.id]:
                        report = transport.run_job(job, self.work / "jobs" / dev.id / "lut" / job.job_id)
                        if report.status != "ok" or report.timing is None:
                            msg = report.error.message if report.error else "no timing"
                            raise DeviceError(f"{key}: {msg}")
                        ident = schema.to_dict(report.identity) if report.identity is not None else {}
                        done(dev.id, key, float(report.timing.latency_ms.median), ident)
                errors[dev.id] = None
            except DeviceError as e:
                errors[dev.id] = f"{type(e).__name__}: {e}"
                if transport is not None and e.infrastructure:
                    transport.close()      # its next request opens a new connection and session

        by_machine: Dict[str, List[DeviceConfig]] = {}
        for dev, _, _ in requests:
            if dev.id in jobs:
                by_machine.setdefault(machine_of(dev), []).append(dev)
        if by_machine:
            with ThreadPoolExecutor(max_workers=len(by_machine)) as pool:
                futures = [pool.submit(lambda ds: [per_device(d) for d in ds], ds) for ds in by_machine.values()]
                for f in as_completed(futures):
                    f.result()
        return errors
