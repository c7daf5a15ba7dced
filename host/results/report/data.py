"""The report's data: one run read from the results store into rows the sections and figures draw.

Contract: :func:`load` reads only the store (run, devices, measurements, search evaluations, artifacts) and
returns a :class:`ReportData`: one :class:`ReportRow` per measurement (and per search evaluation stored without
one), each device's Pareto fronts and a search's chosen candidate marked, and the run's warnings collected by
:func:`warnings_of`. No HTML and no matplotlib here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from host.fmt import number
from host.results.tables import dig

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import Store


MODELLED_NOTE = "modelled, not measured"
EMULATED_NOTE = "emulated \u2014 not a device measurement"
EMU_MARK = '<span class="mod" title="emulated \u2014 not a device measurement">\u2020</span>'   # a dagger


# device colours (matplotlib's tab10, in order), reused in the HTML tables
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


@dataclass
class ReportRow:
    """One thing measured on one device: a measurement, or a search evaluation stored without one."""

    device: str
    label: str                      # as recorded ("ratio 0.5", "dense", ...)
    short: str                      # for the figures ("r=0.50", "dense", ...)
    ok: bool
    error: Optional[str] = None
    model: Optional[str] = None
    p50: Optional[float] = None
    p90: Optional[float] = None
    p99: Optional[float] = None
    cv: Optional[float] = None
    cv_warn: Optional[float] = None
    throughput: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    power: Optional[float] = None
    power_source: Optional[str] = None
    modelled: Optional[bool] = None
    emulated: bool = False          # the device ran under user-mode emulation: its timings are not a device's
    energy: Optional[float] = None
    memory: Optional[float] = None
    throttled: Optional[bool] = None
    samples: List[float] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    report: Dict[str, Any] = field(default_factory=dict)
    meas: Optional[Dict[str, Any]] = None
    ev: Optional[Dict[str, Any]] = None
    ratio: Optional[float] = None
    sha: Optional[str] = None
    meets: Optional[bool] = None
    chosen: bool = False
    closest: bool = False           # a search that met no target: the candidate closest to them
    front: bool = False
    front_energy: bool = False


@dataclass
class ReportData:
    """One run as the report draws it: the run row, its devices (sorted, one colour each) and its rows."""

    run: Dict[str, Any]
    devices: Dict[str, Dict[str, Any]]           # device id -> devices row (may be empty)
    order: List[str]                             # device ids, sorted
    colour: Dict[str, str]
    rows: List[ReportRow]
    evaluations: List[Dict[str, Any]]
    artifacts: Dict[str, Optional[Dict[str, Any]]]
    chosen_how: str = ""


def load(store: "Store", run_id: str) -> ReportData:
    run = store.run(run_id)
    dev_rows = {d["device_id"]: d for d in store.devices(run_id)}
    meas = store.measurements(run_id)
    evals = store.evaluations(run_id)
    by_meas = {e["measurement_id"]: e for e in evals if e.get("measurement_id") is not None}
    rows = [_row_from_measurement(m, by_meas.get(m["id"])) for m in meas]
    ids = {m["id"] for m in meas}
    rows += [_row_from_evaluation(e) for e in evals if e.get("measurement_id") not in ids]
    order = sorted({*dev_rows, *(r.device for r in rows)})
    colour = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(order)}
    shas = sorted({r.sha for r in rows if r.sha})
    artifacts = {s: store.artifact(s) for s in shas}
    ctx = ReportData(run, dev_rows, order, colour, rows, evals, artifacts)
    for d in order:
        _mark_front([r for r in rows if r.device == d], "p50", "front")
        _mark_front([r for r in rows if r.device == d], "energy", "front_energy")
    if run.get("kind") == "search":
        ctx.chosen_how = _mark_chosen(ctx)
    return ctx


def _short(label: str, ratio: Optional[float]) -> str:
    if ratio is not None:
        return "dense" if ratio == 0 else f"r={ratio:.2f}"
    return label if len(label) <= 18 else label[:17] + "\u2026"


def emulated(report: Mapping[str, Any]) -> bool:
    """Whether the agent that wrote ``report`` said it ran under emulation (identity.extra.emulation)."""
    return bool(dig(report, "identity", "extra", "emulation", "emulated"))


def _row_from_measurement(m: Dict[str, Any], ev: Optional[Dict[str, Any]]) -> ReportRow:
    extra = m.get("extra") or {}
    ratio = number(extra.get("ratio")) if isinstance(extra, Mapping) else None
    if ratio is None and ev is not None:
        ratio = number(ev.get("ratio"))
    report = m.get("report") if isinstance(m.get("report"), dict) else {}
    label = str(m.get("label") or m.get("key") or "?")
    return ReportRow(
        device=str(m["device_id"]), label=label, short=_short(label, ratio), ok=m.get("status") == "ok",
        error=m.get("error"), model=m.get("model"),
        p50=number(m.get("latency_p50_ms")), p90=number(m.get("latency_p90_ms")), p99=number(m.get("latency_p99_ms")),
        cv=number(m.get("latency_cv")), cv_warn=number(dig(report, "timing", "protocol", "cv_warn")),
        throughput=number(m.get("throughput_ips")), top1=number(m.get("top1")), top5=number(m.get("top5")),
        power=number(m.get("power_w")), power_source=m.get("power_source"), modelled=m.get("power_modelled"),
        energy=number(m.get("energy_mj")), memory=number(m.get("memory_mb")), throttled=m.get("throttled"),
        samples=[float(s) for s in (m.get("samples_ms") or []) if number(s) is not None],
        warnings=[str(w) for w in (m.get("warnings") or [])], report=report or {}, meas=m, ev=ev, ratio=ratio,
        sha=m.get("artifact_sha256") or (ev or {}).get("artifact_sha256"),
        meets=(ev or {}).get("meets"), emulated=emulated(report))


def _row_from_evaluation(e: Dict[str, Any]) -> ReportRow:
    """A search evaluation whose measurement is not in the store (served from a search's own cache)."""
    rec = e.get("record") if isinstance(e.get("record"), dict) else {}
    met = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    report = rec.get("report") if isinstance(rec.get("report"), dict) else {}
    ratio = number(e.get("ratio"))
    if ratio is None:
        ratio = number(dig(rec, "candidate", "ratio"))
    label = f"evaluation {e.get('seq')}"
    power = report.get("power") if isinstance(report.get("power"), dict) else {}
    err = rec.get("error")
    return ReportRow(
        device=str(e["device_id"]), label=label, short=_short(label, ratio), ok=bool(e.get("ok")),
        error=None if e.get("ok") else str(err or "the device did not measure it"),
        p50=number(met.get("latency_p50_ms")), p90=number(met.get("latency_p90_ms")),
        p99=number(dig(report, "timing", "latency_ms", "p99")), cv=number(dig(report, "timing", "latency_ms", "cv")),
        throughput=number(met.get("throughput_ips")), top1=number(met.get("top1")),
        power=number(met.get("power_w")), power_source=power.get("source"), modelled=power.get("modelled"),
        energy=number(met.get("energy_mj")), memory=number(met.get("memory_mb")),
        samples=[float(s) for s in (dig(report, "timing", "samples_ms") or []) if number(s) is not None],
        warnings=[str(w) for w in (report.get("warnings") or [])], report=report, ev=e, ratio=ratio,
        sha=e.get("artifact_sha256") or rec.get("artifact_sha256"), meets=e.get("meets"), emulated=emulated(report))


def _mark_front(rows: Sequence[ReportRow], metric: str, flag: str) -> None:
    """Non-dominated rows: lower ``metric`` and higher top-1."""
    pts = [r for r in rows if r.ok and getattr(r, metric) is not None and r.top1 is not None]
    best = -math.inf
    for r in sorted(pts, key=lambda r: (getattr(r, metric), -(r.top1 or 0.0))):
        if (r.top1 or 0.0) > best:
            setattr(r, flag, True)
            best = r.top1 or 0.0


def _mark_chosen(ctx: ReportData) -> str:
    """Mark each device's chosen candidate of a search run (and, where none met the targets, the closest one);
    how the chosen ones were found (for the figure's note)."""
    picks: Dict[str, Dict[str, Any]] = {}
    closest: Dict[str, Dict[str, Any]] = {}
    for it in summary_devices(ctx.run):
        dev = str(it.get("device_id") or it.get("device"))
        if isinstance(it.get("chosen"), Mapping):
            picks[dev] = dict(it["chosen"])
        elif isinstance(it.get("closest"), Mapping):
            closest[dev] = dict(it["closest"])
    how = ""
    for d in ctx.order:
        rows = [r for r in ctx.rows if r.device == d and r.ok]
        near = _find(rows, closest.get(d))
        if near is not None:
            near.closest = True
        hit: Optional[ReportRow] = None
        pick = picks.get(d)
        if pick:
            hit = _find(rows, pick)
            how = how or "the run's summary"
        if hit is None:
            flagged = [r for r in rows if dig(r.ev, "record", "chosen") is True]
            if flagged:
                hit = flagged[0]
                how = how or "the search's record"
        if hit is None:
            meeting = [r for r in rows if r.meets]
            if meeting:
                hit = max(meeting, key=lambda r: (r.top1 or 0.0, -(r.p50 if r.p50 is not None else math.inf)))
                how = how or "meets every target, then highest top-1, then lowest p50"
        if hit is not None:
            hit.chosen = True
    return how


def _ev_key(r: ReportRow) -> Optional[str]:
    if r.ev is None:
        return None
    return r.ev.get("key") or dig(r.ev, "record", "key") or None


def _find(rows: Sequence[ReportRow], pick: Optional[Mapping[str, Any]]) -> Optional[ReportRow]:
    """The row a summary's pick (a search result row: its candidate ``key``, its ``artifact_sha256``) names."""
    if not pick:
        return None
    for r in rows:
        if pick.get("key") and _ev_key(r) == pick.get("key"):
            return r
    for r in rows:
        if pick.get("artifact_sha256") and r.sha == pick.get("artifact_sha256"):
            return r
    return None


def summary_devices(run: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The per-device results in a run's summary (a search's: ``{"devices": [{"device_id", "verdict", "chosen",
    "closest", ...}]}``), or []."""
    summary = run.get("summary")
    items = summary.get("devices") if isinstance(summary, Mapping) else summary
    return [it for it in items if isinstance(it, Mapping)] if isinstance(items, list) else []


def device_verdicts(ctx: ReportData) -> Dict[str, str]:
    return {str(it.get("device_id") or it.get("device")): str(it["verdict"]) for it in summary_devices(ctx.run)
            if it.get("verdict")}


def device_identity(ctx: ReportData, d: str) -> Dict[str, Any]:
    ident = (ctx.devices.get(d) or {}).get("identity")
    if isinstance(ident, dict) and ident:
        return ident
    for r in ctx.rows:
        if r.device == d and isinstance(r.report.get("identity"), dict):
            return r.report["identity"]
    return {}


def _kind(text: str) -> str:
    t = text.lower()
    # the stability warnings name throttling as a possible cause: classify them first
    if "latency cv" in t or "unstable" in t:
        return "unstable"
    if "drift" in t:
        return "drift"
    if "throttl" in t or "under-voltage" in t:
        return "throttling"
    if t.startswith("emulated"):
        return "emulated"
    if "modelled" in t:
        return "modelled-power"
    if "power" in t:
        return "power"
    if "thermal" in t:
        return "thermal"
    return "other"


def warnings_of(ctx: ReportData) -> List[Tuple[str, str, str, str]]:
    """(device, what, kind, message) for every warning, failure and caveat of the run."""
    out: List[Tuple[str, str, str, str]] = []
    run = ctx.run
    if run.get("status") in ("failed", "interrupted"):
        out.append(("", "run", "run", ("the run failed" if run.get("status") == "failed" else
                                        "the run was interrupted (its process ended before it finished)")
                    + (f": {run.get('error')}" if run.get("error") else "")))
    for r in ctx.rows:
        if not r.ok:
            out.append((r.device, r.label, "failed", f"measurement failed: {r.error or 'no error recorded'}"))
        for w in r.warnings:
            out.append((r.device, r.label, _kind(w), w))
        if r.modelled:
            out.append((r.device, r.label, "modelled-power",
                        f"power is modelled (source {r.power_source or 'model'!r}): {MODELLED_NOTE}; energy per "
                        "inference is computed from it"))
        if r.throttled and not any(_kind(w) == "throttling" for w in r.warnings):
            out.append((r.device, r.label, "throttling", "the agent saw thermal throttling during the job"))
    for sha, art in ctx.artifacts.items():
        man = (art or {}).get("manifest") if isinstance((art or {}).get("manifest"), dict) else {}
        for w in man.get("warnings") or []:
            out.append(("", f"artifact {sha[:12]}", "artifact", str(w)))
    return out
