"""The final measurement in repetitions: each device's pick timed again in independent runs, as ``bench`` does.

A search compares candidates on one timed window each, which is enough to rank them (a candidate's dense model
is measured beside it where it matters: :mod:`host.search.driver`). The figures a release gate reads back are
another matter: one window's median on a shared machine moves by several per cent from window to window, and the
gate decides over repetitions (:mod:`host.results.regress.runs`). So after the verdicts, each device's chosen (or
closest) candidate is measured ``--final-repeat N`` times in all — its evaluation is the first run, then ``N - 1``
repetitions, each a job of its own (a fresh agent process and runtime session, its share of the device's window,
no eval data: :func:`host.fleet.jobs.repetition_job`), round by round across the devices. Each is recorded in the
results store beside the evaluation (keys ``DEV/KEY#r2``, ..., the evaluation's label), so ``edgeprune regress``
of two searches' picks judges run medians, and in ``evaluations.jsonl`` (records of kind ``final``), so
``--resume`` does not measure them again. The result gives the median of the run medians and their spread; the
search's verdict stays the one it made on the evaluation. A pick measured under user-mode emulation is not
repeated (its timings are the emulator's).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional, Sequence

from host.search.algos.base import DeviceMeasurement
from host.search.evaluator import Request
from host.search.holdout import _candidate, _final_recovery
from host.search.options import RECORD_VERSION
from host.search.outcome import DeviceResult
from host.search.state import now

KIND = "final"


def emulated(rec: Dict[str, Any]) -> bool:
    """Whether the agent measured ``rec`` under user-mode emulation (agent.emulation)."""
    report = rec.get("report") or {}
    return bool((((report.get("identity") or {}).get("extra") or {}).get("emulation") or {}).get("emulated"))


def rep_key(key: str, rep: int) -> str:
    return f"{key}#r{rep}"


def measure(search: Any, devs: Sequence[Any], results: Sequence[DeviceResult]) -> None:
    """Time each device's pick ``search.opts.final_repeat`` times in all (or serve the repetitions from the log)
    and put the figures into ``results[i].final``; ``search`` is the :class:`host.search.driver.Search`, ``devs``
    its per-device states."""
    n = int(search.opts.final_repeat)
    if n <= 1:
        return
    picks: Dict[str, Dict[str, Any]] = {}
    for d, r in zip(devs, results):
        pick = r.chosen or r.closest
        rec = next((x for x in d.records if pick is not None and x["key"] == pick["key"]), None)
        if rec is None or (rec.get("metrics") or {}).get("latency_p50_ms") is None:
            continue
        if emulated(rec):
            r.final = {"repetitions": 1, "asked": n, "skipped": "measured under user-mode emulation: its timings "
                                                                 "are the emulator's, repeating them says nothing"}
            continue
        picks[d.dev.id] = rec
    requests: List[Request] = []
    for rep in range(2, n + 1):                      # round by round: a drift of the devices costs every pick alike
        for d in devs:
            rec = picks.get(d.dev.id)
            if rec is None or search.log.get(KIND, d.dev.id, rep_key(rec["key"], rep)) is not None:
                continue
            if rep == 2:
                search.emit("eval", d.dev.id, f"final measurement: {n - 1} more repetition(s) of the "
                                              f"{'chosen' if results[devs.index(d)].chosen else 'closest'} candidate")
            requests.append(Request(d.dev, d.profile, _candidate(rec), rec["key"],
                                    _final_recovery(search, d.dev.id, rec), split="timing", rep=rep, reps=n))
    errors: Dict[str, str] = {}

    def done(req: Request, m: DeviceMeasurement, extra: Dict[str, Any]) -> None:
        if not m.ok:
            errors[req.device.id] = str(m.error)
            return
        rec = {"v": RECORD_VERSION, "kind": KIND, "device": req.device.id, "key": rep_key(req.key, req.rep),
               "of": req.key, "rep": req.rep, "at": now(), "t": round(time.time(), 3), "metrics": m.metrics}
        search.log.put(rec)
        search._record({**picks[req.device.id], **{k: v for k, v in extra.items() if k in ("report", "job")}},
                       rep=req.rep)

    if requests:
        search.evaluator.measure(requests, done)
    for d, r in zip(devs, results):
        rec = picks.get(d.dev.id)
        if rec is None:
            continue
        got = [search.log.get(KIND, d.dev.id, rep_key(rec["key"], rep)) for rep in range(2, n + 1)]
        r.final = summarise(rec, [g for g in got if g is not None], n)
        if any(g is None for g in got):
            r.final["error"] = errors.get(d.dev.id, "not measured")


def summarise(rec: Dict[str, Any], reps: Sequence[Dict[str, Any]], n: int) -> Dict[str, Any]:
    """The pick's run medians (its evaluation first), their median and their spread (the largest distance of a run
    median from it)."""
    meds = [float(rec["metrics"]["latency_p50_ms"])] + [float(g["metrics"]["latency_p50_ms"]) for g in reps
                                                         if (g.get("metrics") or {}).get("latency_p50_ms") is not None]
    med = statistics.median(meds)
    spread: Optional[float] = max(abs(x / med - 1.0) for x in meds) if med > 0 else None
    return {"repetitions": len(meds), "asked": n, "latency_p50_ms": round(med, 6),
            "run_medians_ms": [round(x, 6) for x in meds],
            "run_spread": round(spread, 6) if spread is not None else None}
