"""The driver of a search: :class:`Search` runs one algorithm generator per device side by side, serves each
work item from the evaluation log when it was done before (``--resume``), else has the evaluator do it (device
evaluations of one round on all devices in parallel, host work first), persists every result as it completes
(``evaluations.jsonl``, and the results store when a recorder is given), then concludes a verdict per device and
writes the run folder's outputs (``<device>/chosen|closest/``, ``pareto.json|csv``, ``result.json``,
``summary.json|csv``).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

from edgeprune.errors import UsageError
from host.files import write_text_atomic
from host.fleet.devices import DeviceConfig
from host.fleet.targets import ACCURACY_METRICS, Bounds, TargetSet, describe, impossible_reason
from host.search.algos import get_algorithm
from host.search.algos.base import DeviceContext, DeviceEval, DeviceMeasurement, HostEval, LayerLatency, ModelSpace
from host.search.budget import PROBE_SHARE, SearchBudget, probe_rates
from host.search import final, holdout
from host.search.evaluator import Evaluator, Request
from host.search.options import (EVALUATIONS, RECORD_VERSION, ROW_METRICS, RUN_FILE, Events, Profile, SearchOptions,
                                 candidate_key, profile_for)
from host.search.outcome import (PARETO_COLUMNS, SUMMARY_COLUMNS, DeviceResult, SearchResult, cand_dict, cand_text,
                                 finite, mark_fronts, measurement_of, metrics_text, quality, result_dict,
                                 summary_row, to_csv)
from host.search.state import EvaluationLog, now

PAIRED = "paired"   # evaluations.jsonl records: the dense model measured right after a candidate (its key)


def paired_metrics(targets: TargetSet) -> List[str]:
    """The resource metrics bounded relative to dense: measured again beside every candidate."""
    return [t.metric for t in targets.targets.values() if t.relative and t.metric not in ACCURACY_METRICS]


def corrected(metrics: Mapping[str, float], first: Mapping[str, float], beside: Mapping[str, float],
              names: List[str]) -> Dict[str, float]:
    """``metrics`` with each of ``names`` scaled by ``first / beside`` (the dense model's first measurement over the
    one taken beside the candidate)."""
    out = dict(metrics)
    for k in names:
        if k in out and first.get(k) and beside.get(k):
            out[k] = out[k] * float(first[k]) / float(beside[k])
    return out

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import RunRecorder

@dataclass
class _Dev:
    dev: DeviceConfig
    profile: Profile
    targets: TargetSet
    ctx: DeviceContext
    gen: Any = None
    pending: Any = None
    reason: str = ""
    done: bool = False
    records: List[Dict[str, Any]] = field(default_factory=list)
    new_evals: int = 0
    host_evals: int = 0
    lut_jobs: int = 0
    failed: bool = False              # a device evaluation or its layer table failed


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


class Search:
    """One search run: its folder, evaluation log, devices and algorithm; :meth:`run` drives it to the end."""

    def __init__(self, out: Path, run_id: str, opts: SearchOptions, devices: List[DeviceConfig],
                 targets: Mapping[str, TargetSet], space: ModelSpace, evaluator: Evaluator,
                 events: Optional[Events] = None, recorder: Optional["RunRecorder"] = None,
                 clock: Optional[Callable[[], float]] = None, started: Optional[float] = None) -> None:
        self.out, self.run_id, self.opts = Path(out), run_id, opts
        self.recorder = recorder
        self.devices, self.targets, self.space, self.evaluator = devices, dict(targets), space, evaluator
        self.emit = events or (lambda *a: None)
        self.log = EvaluationLog(self.out / EVALUATIONS)
        self._lut_lock = threading.Lock()
        self.budget: Optional[SearchBudget] = None
        if opts.budget_minutes is not None:
            self.budget = SearchBudget(self.out, opts.budget_minutes, clock=clock or time.monotonic, t0=started,
                                       later_jobs=(2 if opts.holdout and getattr(evaluator, "holdout_name", None)
                                                   else 0) + max(0, opts.final_repeat - 1))

    # -- the results store (the run folder's evaluations.jsonl stays the search's own record for --resume)
    def _record(self, rec: Mapping[str, Any], rep: int = 1) -> None:
        """A device evaluation into the results store (measurement and evaluation); ``rep`` > 1: a repetition of
        the final measurement (:mod:`host.search.final`), a measurement keyed ``DEV/KEY#rN`` only."""
        if self.recorder is None or rec.get("kind") != "device":
            return
        cand = rec.get("candidate") or {}
        manifest = None
        if rec.get("artifact_dir") and rec.get("manifest"):
            try:
                manifest = json.loads((self.out / rec["artifact_dir"] / rec["manifest"]).read_text())
            except (OSError, ValueError):
                manifest = None
        label = "dense" if not cand.get("kept") else f"ratio {float(cand.get('ratio') or 0):.3f}"
        if cand.get("kept") and cand.get("recovery"):
            label += f" ({cand['recovery']} recovery)"
        mid = None
        if rec.get("report") is not None:
            mid = self.recorder.measurement(
                f"{rec['device']}/{rec['key']}" + (f"#r{rep}" if rep > 1 else ""), device_id=rec["device"],
                report=rec["report"], job=rec.get("job"),
                label=label, model=self.space.model, manifest=manifest,
                extra={"ratio": cand.get("ratio"), "recovery": cand.get("recovery"), "note": cand.get("note"),
                       "macs": rec.get("macs"), "params": rec.get("params"), "plan_sha256": rec.get("plan_sha256"),
                       "candidate_key": rec["key"], **({"repetition": rep} if rep > 1 else {})})
        if rep > 1:
            return
        slim = {k: v for k, v in rec.items() if k not in ("report", "job", "plan")}
        self.recorder.evaluation(rec["device"], rec["key"], slim, algo=self.opts.algo, ratio=cand.get("ratio"),
                                 recovery=cand.get("recovery"), ok=True, artifact_sha256=rec.get("artifact_sha256"),
                                 measurement_id=mid)

    # -- driving
    def run(self) -> SearchResult:
        t0 = time.monotonic()
        if self.recorder is not None:
            for dev in self.devices:
                self.recorder.device(dev)
            for rec in self.log.records:   # a resumed run: what the killed process may not have recorded
                self._record(rec)
        algo = get_algorithm(self.opts.algo)
        if self.budget is not None:
            self.emit("info", "", self.budget.plan(self.opts.max_evals, self.opts.algo_options.probe_recovery,
                                                   self.opts.recovery))
        devs: List[_Dev] = []
        for dev in self.devices:
            prof = profile_for(dev)
            ctx = DeviceContext(dev.id, self.space, prof.round_to, self.targets[dev.id], self.opts.max_evals,
                                self.opts.algo_options, lambda b, d=dev: impossible_reason(d, b))
            devs.append(_Dev(dev, prof, self.targets[dev.id], ctx))
        for d in devs:
            d.gen = algo.run(d.ctx)
            self._advance(d, None, first=True)
        if self.budget is not None:
            self.budget.start_saving()
        try:
            self._loop(devs)
        finally:
            if self.budget is not None:
                self.budget.stop_saving()
        results = [self._conclude(d) for d in devs]
        holdout.recheck(self, devs, results)
        final.measure(self, devs, results)
        res = SearchResult(self.run_id, self.out, self.opts.algo, results, time.monotonic() - t0)
        self._write_outputs(res)
        return res

    def _loop(self, devs: List[_Dev]) -> None:
        while True:
            active = [d for d in devs if not d.done]
            if not active:
                break
            for d in active:
                if isinstance(d.pending, HostEval):
                    self._host(d)
            luts = [d for d in active if not d.done and isinstance(d.pending, LayerLatency)]
            if luts:
                self._luts(luts)
            evs = [d for d in active if not d.done and isinstance(d.pending, DeviceEval)]
            if evs:
                self._device_evals(evs)
            for d in active:
                if not d.done and not isinstance(d.pending, (HostEval, LayerLatency, DeviceEval)):
                    raise TypeError(f"{self.opts.algo} yielded {d.pending!r}: not a work item")

    def _advance(self, d: _Dev, value: Any, first: bool = False) -> None:
        try:
            d.pending = next(d.gen) if first else d.gen.send(value)
        except StopIteration as e:
            d.done, d.reason, d.pending = True, str(e.value or ""), None
            self.emit("verdict", d.dev.id, d.reason)

    def _stop(self, d: _Dev, reason: str) -> None:
        d.gen.close()
        d.done, d.reason, d.pending = True, reason, None
        self.emit("verdict", d.dev.id, reason)

    # -- host evaluations (netadapt proposals)
    def _host(self, d: _Dev) -> None:
        accs: List[float] = []
        work: HostEval = d.pending
        for i, cand in enumerate(work.candidates, 1):
            key = candidate_key(self.space, self.opts, d.profile, cand, kind="host")
            rec = self.log.get("host", "", key)
            if rec is None:
                metric = getattr(self.evaluator, "host_metric", "top1")
                self.emit("stage", d.dev.id, f"proposal {i}/{len(work.candidates)}: {cand.note or 'candidate'} "
                                             f"(short fine-tune, {metric} on the host)")
                top1 = float(self.evaluator.host_top1(d.profile, cand))
                rec = {"v": RECORD_VERSION, "kind": "host", "device": "", "key": key, "at": now(),
                       "t": round(time.time(), 3), "metric": metric,   # "top1": the score, whichever metric it is
                       "candidate": cand_dict(cand), "macs": self.space.macs(cand.kept_map()), "top1": top1}
                self.log.put(rec)
                d.host_evals += 1
            accs.append(float(rec["top1"]))
        self._advance(d, accs)

    # -- layer-latency tables (netadapt)
    def _lut_path(self, d: _Dev) -> Path:
        dev = d.dev
        doc = {"device": dev.id, "runtime": dev.runtime.name, "threads": dev.runtime.threads,
               "options": dev.runtime.options, "format": d.profile.fmt, "export": dict(d.profile.export_options),
               "timing_s": self.opts.lut_seconds, "v": 1}
        h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.opts.cache() / f"lut-{dev.id}-{h}.json"

    def _load_lut(self, d: _Dev) -> Dict[str, Any]:
        path = self._lut_path(d)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return {"identity": None, "ms": {}}
        ident = self._dense_identity(d)
        if doc.get("identity") and ident and doc["identity"] != ident:
            self.emit("info", d.dev.id, f"layer-latency table {path} was measured on {doc['identity']}, not "
                                        f"{ident}: measuring again")
            return {"identity": None, "ms": {}}
        return doc

    def _dense_identity(self, d: _Dev) -> Optional[Dict[str, str]]:
        dense = next((r for r in d.records if not r["candidate"]["kept"]), None)
        ident = ((dense or {}).get("report") or {}).get("identity") or {}
        keys = ("hostname", "cpu_model", "runtime", "runtime_version")
        return {k: str(ident.get(k)) for k in keys} if ident else None

    def _luts(self, devs: List[_Dev]) -> None:
        tables = {d.dev.id: self._load_lut(d) for d in devs}
        reqs = []
        for d in devs:
            missing = [c for c in d.pending.configs if c.key() not in tables[d.dev.id]["ms"]]
            if missing:
                self.emit("stage", d.dev.id, f"layer-latency table: timing {len(missing)} layer configurations "
                                             f"on the device ({len(d.pending.configs) - len(missing)} cached)")
                reqs.append((d.dev, d.profile, missing))
        by_id = {d.dev.id: d for d in devs}

        def done(dev_id: str, key: str, ms: float, identity: Dict[str, Any]) -> None:
            d = by_id[dev_id]
            with self._lut_lock:
                table = tables[dev_id]
                table["ms"][key] = float(ms)
                if identity and not table.get("identity"):
                    table["identity"] = {k: str(identity.get(k)) for k in ("hostname", "cpu_model", "runtime",
                                                                            "runtime_version")}
                path = self._lut_path(d)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(path, json.dumps(table, indent=1, sort_keys=True))
                d.lut_jobs += 1

        errors = self.evaluator.layer_latency(reqs, done) if reqs else {}
        for d in devs:
            table = tables[d.dev.id]["ms"]
            if errors.get(d.dev.id) or any(c.key() not in table for c in d.pending.configs):
                d.failed = True
                self._stop(d, f"layer-latency table failed: {errors.get(d.dev.id) or 'configurations missing'}")
                continue
            self._advance(d, {c.key(): table[c.key()] for c in d.pending.configs})

    # -- device evaluations
    def _finetune_size(self) -> int:
        """The full fine-tune split's size, as the evaluator knows it (an evaluator without data: 50,000)."""
        size = getattr(self.evaluator, "finetune_size", None)
        return int(size(None)) if callable(size) else 50_000

    def _device_evals(self, devs: List[_Dev]) -> None:
        results: Dict[str, DeviceMeasurement] = {}
        lock = threading.Lock()
        requests: List[Request] = []
        for d in list(devs):
            if d.ctx.evals >= self.opts.max_evals:
                self._stop(d, f"--max-evals {self.opts.max_evals} reached")
                devs.remove(d)
                continue
            cand = d.pending.candidate
            recovery = None
            size = self._finetune_size() if self.budget is not None and cand.kept and cand.recovery == "full" else 0
            if size > 0:   # the final candidate under a budget: its recovery gets the time left
                waiting = sum(1 for o in devs if o.dev.id not in self.budget.finals) or 1
                recovery, how = self.budget.final_recovery(
                    d.dev.id, self.opts.recovery, size, probe_rates(d.records), share=waiting)
                self.emit("info", d.dev.id, f"final recovery: {recovery.finetune_epochs} epoch(s) over "
                          f"{how['images']} images in at most {how['seconds'] / 60:.1f} min (estimated "
                          f"{how['images_per_s']:.0f} images/s, {how['rate_source']})")
            key = candidate_key(self.space, self.opts, d.profile, cand, recovery=recovery)
            rec = self.log.get("device", d.dev.id, key)
            if rec is not None:
                results[d.dev.id] = measurement_of(rec, cached=True)
                if all(r["key"] != key for r in d.records):
                    d.records.append(rec)
                self.emit("cached", d.dev.id, f"evaluation {d.ctx.evals + 1}: {cand_text(cand)} (from the store)")
            elif self.budget is not None and cand.kept and cand.recovery != "full" and (
                    key in self.budget.skipped or not self.budget.probes_open()):
                self.budget.skip(key)
                results[d.dev.id] = DeviceMeasurement(
                    False, error=f"probes may start until minute {PROBE_SHARE * self.budget.total_s / 60:.0f} of "
                                 f"the {self.budget.minutes:g}-minute budget", skipped=True)
                self.emit("info", d.dev.id, f"{cand_text(cand)}: not built, {results[d.dev.id].error}")
            else:
                self.emit("eval", d.dev.id, f"evaluation {d.ctx.evals + 1}: {cand_text(cand)}")
                requests.append(Request(d.dev, d.profile, cand, key, recovery,
                                        self.budget.hard_stop(recovery) if recovery is not None and
                                        self.budget is not None else None))
                if cand.kept and paired_metrics(d.targets):   # dense again, right after it on the same device
                    dense = d.ctx.dense()
                    requests.append(Request(d.dev, d.profile, dense, candidate_key(self.space, self.opts, d.profile,
                                                                                   dense), pairs=key))
        by_id = {d.dev.id: d for d in devs}

        def done(req: Request, m: DeviceMeasurement, extra: Dict[str, Any]) -> None:
            d = by_id[req.device.id]
            if req.pairs:   # the dense model re-measured beside a candidate: kept for that candidate's verdict
                if m.ok:
                    self.log.put({"v": RECORD_VERSION, "kind": PAIRED, "device": req.device.id, "key": req.pairs,
                                  "at": now(), "t": round(time.time(), 3), "metrics": m.metrics})
                return
            m.key = req.key
            if m.ok:
                rec = {"v": RECORD_VERSION, "kind": "device", "device": req.device.id, "key": req.key, "at": now(),
                       "t": round(time.time(), 3),
                       "candidate": cand_dict(req.candidate), "macs": self.space.macs(req.candidate.kept_map()),
                       "plan_sha256": m.plan_sha256, "artifact_sha256": m.artifact_sha256, "metrics": m.metrics,
                       **_jsonable(extra)}
                self.log.put(rec)
                self._record(rec)
                with lock:
                    d.records.append(rec)
            with lock:
                results[req.device.id] = m
                d.new_evals += 1
            self.emit("result", req.device.id, f"{cand_text(req.candidate)}: " +
                      (metrics_text(m.metrics) if m.ok else f"failed: {m.error}"))

        if requests:
            t0 = self.budget.clock() if self.budget is not None else 0.0
            self.evaluator.measure(requests, done)
            if self.budget is not None:
                new = [r for d in devs for r in d.records if r.get("key") in {q.key for q in requests}]
                self.budget.note_round(self.budget.clock() - t0, sum(
                    (r.get("recovery_result") or {}).get("seconds") or 0.0 for r in new))
        for d in devs:
            m = results.get(d.dev.id) or DeviceMeasurement(False, error="no result")
            m = self._drift_corrected(d, m)
            if m.skipped:
                self._advance(d, m)
                continue
            d.ctx.evals += 1
            d.failed = d.failed or not m.ok
            self._advance(d, m)

    # -- drift: relative targets judged against the dense model measured beside each candidate
    def _dense_record(self, d: _Dev) -> Optional[Dict[str, Any]]:
        return next((r for r in d.records if not r["candidate"]["kept"]), None)

    def _drift_corrected(self, d: _Dev, m: DeviceMeasurement) -> DeviceMeasurement:
        """What the algorithm sees: a candidate's relatively-bounded metrics in units of the *first* dense
        measurement (× first dense / dense measured beside it), so a machine that slowed down or sped up between
        them does not move the search (the log keeps the raw measurements)."""
        first = self._dense_record(d)
        paired = self.log.get(PAIRED, d.dev.id, m.key) if m.ok and m.key else None
        if first is None or paired is None:
            return m
        return replace(m, metrics=corrected(m.metrics, first["metrics"], paired["metrics"], paired_metrics(d.targets)))

    # -- verdicts and output
    def _conclude(self, d: _Dev) -> DeviceResult:
        dense = next((r for r in d.records if not r["candidate"]["kept"]), None)
        bounds: Optional[Bounds] = None
        if dense is not None:
            try:
                bounds = d.targets.resolve(dense["metrics"])
            except UsageError:
                d.failed = True   # the reason says which metric the report lacks
        metric = d.targets.accuracy_metric
        rows = [self._row(r, self._bounds_beside(d, r, bounds), self.log.get(PAIRED, d.dev.id, r["key"]))
                for r in d.records]
        mark_fronts(rows, metric)
        chosen = closest = None
        meeting = [r for r in rows if r["meets"]]
        if meeting:
            chosen = max(meeting, key=lambda r: (quality(r, metric), -(r.get("latency_p50_ms") or math.inf)))
            verdict = "met"
        else:
            verdict = "error" if dense is None or d.failed else "infeasible"
            if rows:   # resource targets first (they are the device's), then accuracy
                closest = min(rows, key=lambda r: (r["resource_violation"], r["violation"], -quality(r, metric)))
        return DeviceResult(d.dev.id, verdict, d.reason, describe(d.targets, bounds),
                            bounds.to_dict() if bounds else None, chosen, closest, len(d.records), d.new_evals,
                            d.host_evals, d.lut_jobs, rows, round_to=d.profile.round_to, accuracy_metric=metric,
                            selection_split=str(getattr(self.evaluator, "selection_split", "") or ""))

    def _bounds_beside(self, d: _Dev, rec: Dict[str, Any], bounds: Optional[Bounds]) -> Optional[Bounds]:
        """The candidate's bounds: relative ones resolved against the dense model measured beside it, when it was."""
        paired = self.log.get(PAIRED, d.dev.id, rec["key"]) if bounds is not None else None
        if paired is None:
            return bounds
        try:
            return d.targets.resolve(paired["metrics"])
        except UsageError:
            return bounds

    def _row(self, rec: Dict[str, Any], bounds: Optional[Bounds],
             paired: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        cand = rec["candidate"]
        m = rec["metrics"]
        row: Dict[str, Any] = {"key": rec["key"], "ratio": round(float(cand["ratio"]), 4),
                               "pruned_fraction": round(self.space.pruned_fraction(cand["kept"]), 4),
                               "recovery": cand["recovery"], "macs": rec["macs"], "note": cand.get("note", ""),
                               "artifact_sha256": rec.get("artifact_sha256", "")}
        rr = rec.get("recovery_result") or {}
        row.update(recovery_s=rr.get("seconds"), images_seen=rr.get("images_seen"),
                   recovery_precision=rr.get("precision"))
        row.update({k: m.get(k) for k in ROW_METRICS})
        row["dense_p50_beside_ms"] = ((paired or {}).get("metrics") or {}).get("latency_p50_ms")
        report = rec.get("report") or {}
        power = report.get("power") or {}
        row["power_source"] = power.get("source") if isinstance(power, dict) else None
        # measured under user-mode emulation (agent.emulation): its timings and power are the emulator's
        row["emulated"] = final.emulated(rec)
        if bounds is not None:
            a = bounds.assess(m)
            res_v = max((v for k, v in a.violations.items() if k not in ACCURACY_METRICS), default=0.0)
            row.update(drop_pp=None if a.drop_pp is None else round(a.drop_pp, 3), meets=a.meets,
                       meets_resources=a.meets_resources, violation=finite(a.score), resource_violation=finite(res_v))
        else:
            row.update(drop_pp=None, meets=False, meets_resources=False, violation=1e9, resource_violation=1e9)
        return row

    def _write_outputs(self, res: SearchResult) -> None:
        for r in res.devices:
            ddir = self.out / r.device_id
            ddir.mkdir(parents=True, exist_ok=True)
            for sub in ("chosen", "closest"):
                shutil.rmtree(ddir / sub, ignore_errors=True)
            pick, sub = (r.chosen, "chosen") if r.chosen is not None else (r.closest, "closest")
            if pick is not None:
                rec = self.log.get("device", r.device_id, pick["key"])
                if rec is not None:
                    self._export_candidate(rec, ddir / sub, r)
                    r.folder = f"{r.device_id}/{sub}"
            write_text_atomic(ddir / "pareto.json", json.dumps({
                "device": r.device_id, "bounds": r.bounds, "accuracy_metric": r.accuracy_metric,
                "latency_vs_accuracy": [x["key"] for x in sorted(r.rows, key=lambda x: x.get("latency_p50_ms") or 0)
                                        if x["front_latency"]],
                "energy_vs_accuracy": [x["key"] for x in sorted(r.rows, key=lambda x: x.get("energy_mj") or 0)
                                       if x["front_energy"]],
                "points": r.rows}, indent=1, sort_keys=True))
            write_text_atomic(ddir / "pareto.csv", to_csv(r.rows, PARETO_COLUMNS))
            write_text_atomic(ddir / "result.json", json.dumps(result_dict(r), indent=1, sort_keys=True))
        rows = [summary_row(r) for r in res.devices]
        if self.recorder is not None:
            for r in res.devices:
                self.recorder.store.set_verdicts(self.run_id, r.device_id, {
                    f"{x['key']}": x.get("meets") for x in r.rows if x.get("key")})
            self.recorder.summary = {"algo": res.algo, "devices": [result_dict(r) for r in res.devices]}
        write_text_atomic(self.out / "summary.csv", to_csv(rows, SUMMARY_COLUMNS))
        write_text_atomic(self.out / "summary.json", json.dumps({
            "run_id": res.run_id, "algo": res.algo, "finished_at": now(), "seconds_this_process": res.seconds,
            "devices": [result_dict(r) for r in res.devices]}, indent=1, sort_keys=True))
        run = json.loads((self.out / RUN_FILE).read_text())
        run.update(status="finished", finished_at=now())
        write_text_atomic(self.out / RUN_FILE, json.dumps(run, indent=1, sort_keys=True))

    def _export_candidate(self, rec: Dict[str, Any], dest: Path, r: DeviceResult) -> None:
        dest.mkdir(parents=True)
        src = rec.get("artifact_dir")
        if src:
            folder = self.out / src
            for name in list(rec.get("artifact_files", [])) + [rec.get("manifest"), "plan.json"]:
                if name and (folder / name).is_file():
                    shutil.copy2(folder / name, dest / name)
        if rec.get("report") is not None:
            write_text_atomic(dest / "report.json", json.dumps(rec["report"], indent=1, sort_keys=True))
        write_text_atomic(dest / "candidate.json", json.dumps({
            "device": r.device_id, "verdict": r.verdict, "key": rec["key"], "candidate": rec["candidate"],
            "macs": rec["macs"], "metrics": rec["metrics"], "plan_sha256": rec.get("plan_sha256"),
            "artifact_sha256": rec.get("artifact_sha256"), "targets": r.targets, "bounds": r.bounds,
            "round_to": r.round_to, "layer_ratios": self.space.layer_ratios(rec["candidate"]["kept"], r.round_to),
            "accuracy_metric": r.accuracy_metric, "selection_split": r.selection_split, "holdout": r.holdout,
            "final": r.final,
        }, indent=1, sort_keys=True))
