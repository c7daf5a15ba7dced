"""``edgeprune ab``: two artifacts (or one artifact under two runtime configurations) measured on one device
alternately, and judged over their repetitions.

A is the reference, B the change. Rounds alternate the order, A B, B A, A B, ... (ABBA: a linear drift of the
device over the run costs both the same), all through one agent session on the device (one connection and one
agent process: :class:`host.fleet.pool.TransportPool`), each measurement a job of its own (a fresh runtime
session, its share of the device's timed window: :func:`host.fleet.jobs.repetition_job`), no eval data
(speed only). Because A and B see the same device state, within minutes of each other, the comparison needs no
history: the verdict is :func:`host.results.regress.runs.decide` of B's run medians against A's (the noise floor
from A's own runs), with the gate's rule for B's contended windows (:mod:`host.results.regress.contention`).
Each measurement is recorded in the results store (keys ``A#r1``, ``B#r1``, ...; labels ``A``, ``B``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np

from agent import schema
from edgeprune.errors import DeviceError, UsageError
from host.commands.benchmark import artifact_from
from host.files import write_text_atomic
from host.fleet.devices import DeviceConfig
from host.fleet.jobs import build_job, repetition_job
from host.fleet.pool import TransportPool
from host.fleet.runner import Events, run_on_devices, transport_for
from host.results.regress.contention import contended, discounted
from host.results.regress.runs import DEFAULT_ALPHA, RunDecision, decide

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import RunRecorder

DEFAULT_PAIRS = 5          # A/B rounds: 5 runs a side can reach alpha 0.01 over runs


@dataclass
class ABResult:
    run_id: str
    device_id: str
    a: Dict[str, Any]
    b: Dict[str, Any]
    decision: RunDecision
    verdict: str
    order: List[str] = field(default_factory=list)
    seconds: float = 0.0
    unstable: int = 0

    @property
    def exit_code(self) -> int:
        return {"regression": 1, "inconclusive": 3}.get(self.verdict, 0)

    def to_dict(self) -> Dict[str, Any]:
        d = self.decision
        return {"run_id": self.run_id, "device": self.device_id, "a": self.a, "b": self.b, "verdict": self.verdict,
                "effect": d.effect, "ci": list(d.ci) if d.ci else None, "p_slower": d.p_slower,
                "p_faster": d.p_faster, "noise_floor": d.noise_floor, "threshold": d.threshold, "rule": d.rule,
                "order": self.order, "unstable_windows": self.unstable, "seconds": round(self.seconds, 1),
                "exit_code": self.exit_code}


def run_ab(a_model: str, b_model: str, device: DeviceConfig, *, b_device: Optional[DeviceConfig] = None,
           pairs: int = DEFAULT_PAIRS, tol: float = 0.05, alpha: float = DEFAULT_ALPHA, quick: bool = False,
           threads: Optional[int] = None, run_id: str, out: Path, recorder: Optional["RunRecorder"] = None,
           events: Optional[Events] = None, **fleet_kw: Any) -> ABResult:
    """Measure A (``a_model`` on ``device``) and B (``b_model`` on ``b_device``, default the same device: a
    runtime configuration change is the same device id with other runtime options) alternately, ``pairs`` rounds;
    the verdict over runs (module docstring). UsageError for bad settings or artifacts."""
    if not isinstance(pairs, int) or pairs < 2:
        raise UsageError(f"--pairs: must be an integer >= 2, got {pairs!r}")
    b_device = b_device or device
    if b_device.id != device.id:
        raise UsageError(f"--b-runtime: B must run on the same device as A ({device.id}), got {b_device.id}")
    out = Path(out)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    arts = {"A": artifact_from(a_model, out / "A"), "B": artifact_from(b_model, out / "B")}
    devs = {"A": device, "B": b_device}
    if recorder is not None:
        recorder.device(device)
    reports: Dict[str, List[schema.Report]] = {"A": [], "B": []}
    order: List[str] = []
    t0 = time.monotonic()
    factory = fleet_kw.pop("transport_factory", transport_for)
    with TransportPool(factory) as pool:          # one agent session for every measurement
        for i in range(1, pairs + 1):
            for side in (("A", "B") if i % 2 else ("B", "A")):
                art, man = arts[side]
                dev = devs[side]
                job = repetition_job(build_job(dev, f"{run_id}-{side}-r{i}", art, man, None, quick=quick,
                                               threads=threads), i, pairs)
                outcome = run_on_devices([dev], lambda d, job=job: job, out / "jobs", events=events, pool=pool,
                                         **fleet_kw)[0]
                order.append(side)
                rep = outcome.report
                if rep is not None:
                    write_text_atomic(out / "reports" / f"{side}-r{i}.json", schema.dumps(rep))
                if recorder is not None:
                    report = rep or schema.Report(job_id=job.job_id, status="error",
                                                  error=schema.ErrorInfo(outcome.error_type or "DeviceError",
                                                                         outcome.error or "no report"))
                    recorder.measurement(f"{side}#r{i}", device_id=dev.id, report=schema.to_dict(report),
                                         job=schema.to_dict(job), label=side, model=man.model,
                                         manifest=asdict(man),
                                         extra={"ab": side, "round": i, "rounds": pairs})
                if rep is None or rep.status != "ok" or rep.timing is None:
                    why = outcome.error or (rep.error.message if rep is not None and rep.error else "no timing")
                    raise DeviceError(f"{side} on {dev.id}, round {i}: {why}")
                reports[side].append(rep)
    meds = {s: np.array([r.timing.latency_ms.median for r in reports[s]]) for s in ("A", "B")}
    # interleaved: no shift between benches to assume (prior 0); the floor is A's own run-to-run spread
    d = decide(meds["A"], meds["B"], tol, alpha, prior=0.0)

    unstable = sum(1 for r in reports["B"] if contended(r.warnings))
    verdict = d.verdict
    if verdict == "regression" and unstable:
        # contention slows a window down: in B's windows it can fake a regression, in A's it can only hide one;
        # the regression stands only if A against B's runs with their contention discounted shows it
        disc = [discounted(r.timing.latency_ms.median, r.timing.samples_ms, r.warnings,
                           (r.timing.protocol or {}).get("cv_warn")) for r in reports["B"]]
        clean_b = np.array([v for v in disc if v is not None])
        clean_d = decide(meds["A"], clean_b, tol, alpha, prior=0.0)
        verdict = "regression" if clean_d.verdict == "regression" else "inconclusive"
        d.rule += (f"; {unstable} of B's {pairs} windows reported unstable timings (contention): with their stalls "
                   f"removed ({pairs - len(clean_b)} left out), A's {pairs} runs against B's {len(clean_b)} give: "
                   f"{clean_d.verdict} ({clean_d.rule})")

    def side_doc(s: str) -> Dict[str, Any]:
        art, man = arts[s]
        return {"artifact": str(art), "sha256": man.sha256, "runtime": devs[s].runtime.name,
                "options": dict(devs[s].runtime.options or {}), "p50_ms": float(np.median(meds[s])),
                "run_medians_ms": [round(float(x), 5) for x in meds[s]]}
    return ABResult(run_id, device.id, side_doc("A"), side_doc("B"), d, verdict, order, time.monotonic() - t0,
                    unstable)
