"""Judging a candidate run against a baseline run: pairing results, refusing incomparable pairs, and the latency,
energy, accuracy and label-free fidelity checks (the rule is the docstring of :mod:`host.results.regress`).

Contract: :func:`compare` reads the two runs from the store and returns a :class:`~.model.Comparison`; it prints
nothing, and raises :class:`~edgeprune.errors.UsageError` for bad settings or runs the store does not hold.
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from edgeprune.errors import UsageError
from host import fmt
from host.results.regress.contention import contended, discounted, row_cv_warn
from host.results.regress.model import ARROW, COMPARABLE, Check, Comparison, Identity, Incomparable
from host.results.regress.options import check_bound, check_tolerance
from host.results.regress.runs import decide as decide_runs
from host.results.regress.stats import clean, mann_whitney_greater, median_ratio_ci, thin

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import Store


def compare(store: "Store", baseline: str, candidate: str, *, latency_tol: float = 0.05, energy_tol: float = 0.05,
            accuracy_tol_pp: float = 0.5, alpha: float = 0.01, compare_anyway: bool = False,
            gate_modelled_energy: bool = False, min_agreement: Optional[float] = None,
            min_snr_db: Optional[float] = None) -> Comparison:
    """Judge run ``candidate`` against run ``baseline`` (the rule: :mod:`host.results.regress`). ``min_agreement``
    (fraction) / ``min_snr_db`` add the label-free fidelity checks; None leaves them out."""
    latency_tol = check_tolerance(latency_tol, "--latency-tol")
    energy_tol = check_tolerance(energy_tol, "--energy-tol")
    accuracy_tol_pp = check_tolerance(accuracy_tol_pp, "--accuracy-tol")
    min_agreement = check_bound(min_agreement, "--min-agreement", fraction=True)
    min_snr_db = check_bound(min_snr_db, "--min-snr-db", fraction=False)
    if not isinstance(alpha, (int, float)) or not (0.0 < float(alpha) < 1.0):
        raise UsageError(f"--alpha: must be between 0 and 1 exclusive, got {alpha!r}")
    if baseline == candidate:
        raise UsageError(f"--candidate: {candidate!r} is the same run as --baseline; compare two different runs")
    store.run(baseline, where="--baseline")
    store.run(candidate, where="--candidate")
    comp = Comparison(baseline, candidate, latency_tol, energy_tol, accuracy_tol_pp, float(alpha),
                      bool(compare_anyway), bool(gate_modelled_energy), min_agreement, min_snr_db)
    base = _group(store.measurements(baseline))
    cand = _group(store.measurements(candidate))
    comp.history = _history_source(store, baseline, candidate, base, cand)

    for ident, b_rows in base.items():
        c_rows = cand.get(ident)
        if c_rows is None:
            comp.checks.extend(_missing(ident, b_rows, _gated(comp)))
            continue
        comp.pairs += 1
        _judge_pair(comp, ident, b_rows, c_rows)
    for ident in cand:
        if ident not in base:
            comp.notes.append(f"{_ident_text(ident)}: new in the candidate (no baseline to compare with)")
    if comp.pairs == 0:
        if not base:
            comp.error = f"baseline run {baseline!r} has no measurements"
        elif not cand:
            comp.error = f"candidate run {candidate!r} has no measurements"
        else:
            comp.error = (f"runs {baseline!r} and {candidate!r} have no result in common (paired by device, model "
                          "and label)")
    return comp


def _group(rows: Iterable[Mapping[str, Any]]) -> Dict[Identity, List[Mapping[str, Any]]]:
    out: Dict[Identity, List[Mapping[str, Any]]] = {}
    for r in rows:
        out.setdefault((str(r["device_id"]), r.get("model"), str(r["label"])), []).append(r)
    return out


def _ident_text(ident: Identity) -> str:
    return f"{ident[0]} {ident[1] or '-'}/{ident[2]}"


def _ok(rows: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
    return [r for r in rows if r.get("status") == "ok"]


def _gated(comp: Comparison) -> List[str]:
    """The fidelity metrics asked for (--min-agreement, --min-snr-db): checked on every pair, measured or not."""
    return [m for m, bound in (("agreement", comp.min_agreement), ("snr", comp.min_snr_db)) if bound is not None]


def _metrics_measured(rows: Sequence[Mapping[str, Any]], gated: Sequence[str] = ()) -> List[str]:
    out = ["latency"]
    if any(r.get("power_w") is not None for r in rows):
        out.append("energy")
    if any(r.get("top1") is not None for r in rows):
        out.append("accuracy")
    return out + list(gated)


def _errors(rows: Sequence[Mapping[str, Any]]) -> str:
    errs = sorted({str(r.get("error") or "no error message") for r in rows if r.get("status") != "ok"})
    return "; ".join(errs)


def _missing(ident: Identity, b_rows: Sequence[Mapping[str, Any]], gated: Sequence[str] = ()) -> List[Check]:
    return [Check(ident[0], ident[1], ident[2], m, "missing", "missing in the candidate run",
                  trials_baseline=len(b_rows)) for m in _metrics_measured(_ok(b_rows), gated)]


def _short(field_name: str, v: Any) -> str:
    if v is None:
        return fmt.NA
    s = str(v)
    return s[:12] if field_name == "artifact_sha256" and len(s) > 12 else s


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> List[Any]:
    seen: List[Any] = []
    for r in rows:
        v = r.get(key)
        if v not in seen:
            seen.append(v)
    return seen


def _comparability(b_rows: Sequence[Mapping[str, Any]], c_rows: Sequence[Mapping[str, Any]]) -> List[str]:
    reasons: List[str] = []
    for f in COMPARABLE:
        bv, cv = _values(b_rows, f), _values(c_rows, f)
        for side, vals in (("baseline", bv), ("candidate", cv)):
            if len(vals) > 1:
                reasons.append(f"{side} trials differ in {f} ({', '.join(_short(f, v) for v in vals)})")
        if sorted(map(str, bv)) != sorted(map(str, cv)):
            reasons.append(f"{f} {', '.join(_short(f, v) for v in bv)} {ARROW} "
                           f"{', '.join(_short(f, v) for v in cv)}")
    return reasons


def _environment(r: Mapping[str, Any]) -> Dict[str, str]:
    env: Dict[str, Any] = {}
    ident = (r.get("report") or {}).get("identity") or {}
    env["runtime_version"] = r.get("runtime_version") or ident.get("runtime_version")
    env["threads"] = r.get("threads")
    for k in ("os", "kernel"):
        env[k] = ident.get(k)
    for k, v in sorted((ident.get("firmware") or {}).items()):
        env[f"firmware.{k}"] = v
    for k in ("agent_version", "cpu_model", "serial"):
        env[k] = ident.get(k)
    job = r.get("job") or {}
    for k, v in sorted(((job.get("runtime") or {}).get("options") or {}).items()):
        env[f"runtime.options.{k}"] = v
    for k, v in sorted((job.get("timing") or {}).items()):
        if k != "batch_size":
            env[f"timing.{k}"] = v
    return {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v))
            for k, v in env.items() if v is not None}


def _changes(b_rows: Sequence[Mapping[str, Any]], c_rows: Sequence[Mapping[str, Any]]) -> List[str]:
    def side(rows: Sequence[Mapping[str, Any]]) -> Dict[str, str]:
        vals: Dict[str, List[str]] = {}
        for r in rows:
            for k, v in _environment(r).items():
                if v not in vals.setdefault(k, []):
                    vals[k].append(v)
        return {k: "/".join(v) for k, v in vals.items()}
    b, c = side(b_rows), side(c_rows)
    keys = list(b) + [k for k in c if k not in b]
    return [f"{k} {b.get(k, fmt.NA)} {ARROW} {c.get(k, fmt.NA)}" for k in keys if b.get(k) != c.get(k)]


def _judge_pair(comp: Comparison, ident: Identity, b_rows: List[Mapping[str, Any]],
                c_rows: List[Mapping[str, Any]]) -> None:
    dev, model, label = ident
    b_ok, c_ok = _ok(b_rows), _ok(c_rows)
    c_failed = len(c_rows) - len(c_ok)
    gated = _gated(comp)
    metrics = _metrics_measured(b_ok + c_ok, gated)

    def base_check(metric: str, verdict: str, message: str) -> Check:
        return Check(dev, model, label, metric, verdict, message, trials_baseline=len(b_rows),
                     trials_candidate=len(c_rows))

    if not c_ok:
        msg = f"candidate failed ({c_failed} of {len(c_rows)} trials): {_errors(c_rows)}"
        comp.checks.extend(base_check(m, "failed", msg) for m in _metrics_measured(b_ok, gated))
        return
    if not b_ok:
        reasons = [f"every baseline trial failed ({_errors(b_rows)}): nothing to compare with"]
        comp.incomparable.append(Incomparable(dev, model, label, reasons, compared=False))
        comp.checks.extend(base_check(m, "incomparable", reasons[0]) for m in metrics)
        return
    reasons = _comparability(b_ok, c_ok)
    if reasons and not comp.compare_anyway:
        comp.incomparable.append(Incomparable(dev, model, label, reasons, compared=False))
        msg = "not comparable: " + "; ".join(reasons) + " (--compare-anyway compares it nevertheless)"
        comp.checks.extend(base_check(m, "incomparable", msg) for m in metrics)
        return
    if reasons:
        comp.incomparable.append(Incomparable(dev, model, label, reasons, compared=True))
    changes = _changes(b_ok, c_ok)
    notes: List[str] = []
    if len(b_ok) < len(b_rows):
        notes.append(f"{len(b_rows) - len(b_ok)} of {len(b_rows)} baseline trials failed and were left out")

    if len(_run_medians(b_ok)) >= 2 and len(_run_medians(c_ok)) >= 2:      # repetitions on both sides
        latency = _runs_check(base_check("latency", "pass", ""), _run_medians(b_ok), _run_medians(c_ok), b_ok, c_ok,
                              comp.latency_tol, comp.alpha, comp.history(ident, b_ok) if comp.history else [])
    else:
        latency = _sampled_check(base_check("latency", "pass", ""), _latency_samples(b_ok), _latency_samples(c_ok),
                                 _median_of(b_ok, "latency_p50_ms"), _median_of(c_ok, "latency_p50_ms"),
                                 comp.latency_tol, comp.alpha, "ms")
        latency.notes.append("one timed window on a side: decided on its samples, which are not independent "
                             "(`bench --repeat N` measures repetitions, decided over runs)")
    checks = [
        latency,
        _energy_check(base_check("energy", "pass", ""), b_ok, c_ok, comp.energy_tol, comp.alpha,
                      comp.gate_modelled_energy),
        _accuracy_check(base_check("accuracy", "pass", ""), b_ok, c_ok, comp.accuracy_tol_pp, gated),
    ]
    if comp.min_agreement is not None:
        checks.append(_fidelity_check(base_check("agreement", "pass", ""), b_ok, c_ok, comp.min_agreement))
    if comp.min_snr_db is not None:
        checks.append(_fidelity_check(base_check("snr", "pass", ""), b_ok, c_ok, comp.min_snr_db))
    if c_failed:
        checks.append(base_check("result", "failed", f"{c_failed} of {len(c_rows)} candidate trials failed: "
                                                    f"{_errors(c_rows)}"))
    for c in checks:
        c.notes = notes + c.notes
        c.changes = list(changes)
        c.differences = list(reasons)
    comp.checks.extend(checks)


def _run_medians(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """One latency per repetition: each measurement's median over its own window."""
    return clean([r.get("latency_p50_ms") for r in rows if isinstance(r.get("latency_p50_ms"), (int, float))])


def _values_of(rows: Sequence[Mapping[str, Any]], metric: str) -> np.ndarray:
    """One value per run: its median latency, or (energy) that × its mean power / batch."""
    if metric == "latency":
        return _run_medians(rows)
    return clean([float(r["latency_p50_ms"]) * float(r["power_w"]) / _batch(r) for r in rows
                  if isinstance(r.get("latency_p50_ms"), (int, float)) and r.get("power_w") is not None])


def _discounted_values(rows: Sequence[Mapping[str, Any]], metric: str) -> np.ndarray:
    """:func:`_values_of` with each window's contention discounted (:func:`.contention.discounted`); the windows
    it leaves out are not in the result. For energy a contended window is left out whole: its power reading
    carries the contention too (modelled power follows the whole machine's CPU load; so does a package sensor)."""
    if metric != "latency":
        return _values_of([r for r in rows if not contended(r.get("warnings"))], metric)
    values = (discounted(float(r["latency_p50_ms"]), r.get("samples_ms"), r.get("warnings"), row_cv_warn(r))
              for r in rows if isinstance(r.get("latency_p50_ms"), (int, float)))
    return clean([v for v in values if v is not None])


def _runs_check(c: Check, b: np.ndarray, a: np.ndarray, b_ok: Sequence[Mapping[str, Any]],
                c_ok: Sequence[Mapping[str, Any]], tol: float, alpha: float, history: Sequence[float],
                unit: str = "ms") -> Check:
    """Latency (or energy) judged over repetitions (:mod:`.runs`): one value per run (``b``, ``a``), the noise
    floor, the exact test over runs; a regression stands only if the candidate's runs with their contention
    discounted (:mod:`.contention`) still show it, and is inconclusive otherwise."""
    what = "latency" if c.metric == "latency" else "energy per inference"
    d = decide_runs(b, a, tol, alpha, history)
    c.unit, c.tol, c.rule, c.noise_floor = unit, tol, d.rule, d.noise_floor
    c.n_baseline, c.n_candidate = len(b), len(a)
    c.baseline, c.candidate = float(np.median(b)), float(np.median(a))
    c.change, c.ci, c.p, c.p_faster = d.effect, d.ci, d.p_slower, d.p_faster
    values = f"{c.baseline:.4g} {unit} {ARROW} {c.candidate:.4g} {unit} (medians of {len(b)} and {len(a)} runs)"
    c.verdict = d.verdict
    unstable = sum(1 for r in c_ok if contended(r.get("warnings")))
    if d.verdict == "regression" and unstable:
        # contention slows a window down: in the candidate's windows it can fake a regression, in the baseline's it
        # can only hide one. So the regression stands only if the baseline's runs against the candidate's runs with
        # their contention discounted (stalls removed, or the window left out) show it
        disc = _discounted_values(c_ok, c.metric)
        clean_d = decide_runs(b, disc, tol, alpha, history)
        c.verdict = "regression" if clean_d.verdict == "regression" else "inconclusive"
        c.rule += (f"; {unstable} of the candidate's {len(c_ok)} windows reported unstable timings (contention): "
                   f"with their stalls removed ({len(a) - len(disc)} left out), the {len(b)} baseline and "
                   f"{len(disc)} candidate runs give: {clean_d.verdict} ({clean_d.rule})")
    change = fmt.change(d.effect) if d.effect is not None else fmt.NA
    c.message = {"regression": f"{what} {change} beyond max(tolerance, noise floor {d.noise_floor:.1%}) over runs: "
                               f"{values}",
                 "improved": f"{what} {change} over runs: {values}",
                 "pass": f"{what} {change} within max(tolerance {tol:.1%}, noise floor {d.noise_floor:.1%}): "
                         f"{values}"}.get(c.verdict, f"{what} {change}, inconclusive: {c.rule}: {values}")
    return c


def _history_source(store: "Store", baseline: str, candidate: str, base: Mapping[Identity, Any],
                    cand: Mapping[Identity, Any]) -> Any:
    """A function (identity, baseline rows) -> earlier A/A effects: for the at most ten most recent runs recorded
    before the candidate (the baseline aside) that measured the same identity in the same environment as the baseline (artifact, runtime and its
    version and options, threads, timing protocol, OS, firmware, agent: everything :func:`_environment` and
    COMPARABLE record), each run's median latency over the baseline's, minus 1. None when no pair has
    repetitions on both sides (nothing reads it)."""
    if not any(len(_run_medians(_ok(b))) >= 2 and len(_run_medians(_ok(cand.get(i, [])))) >= 2
               for i, b in base.items()):
        return None
    others: Dict[Identity, Dict[str, List[Mapping[str, Any]]]] = {}
    first = min((r["id"] for rows in cand.values() for r in rows), default=0)
    for r in store.measurements():
        if r["id"] >= first:          # earlier history only: what was recorded before the candidate
            break
        if r["run_id"] == baseline or r.get("status") != "ok":
            continue
        ident = (r["device_id"], r.get("model"), r["label"])
        if ident in base:
            others.setdefault(ident, {}).setdefault(r["run_id"], []).append(r)

    def signature(r: Mapping[str, Any]) -> Any:
        env = {k: v for k, v in _environment(r).items() if k != "timing.seed"}
        return (tuple(str(r.get(k)) for k in COMPARABLE), tuple(sorted(env.items())))

    def history(ident: Identity, b_ok: Sequence[Mapping[str, Any]]) -> List[float]:
        ref = float(np.median(_run_medians(b_ok)))
        sig = signature(b_ok[0])
        out = []
        for rows in list((others.get(ident) or {}).values())[-10:]:
            meds = _run_medians(rows)
            if len(meds) and all(signature(r) == sig for r in rows) and ref > 0:
                out.append(float(np.median(meds)) / ref - 1.0)
        return out
    return history


def _samples(r: Mapping[str, Any]) -> np.ndarray:
    a = clean(r.get("samples_ms") or [])
    return a[a > 0]


def _latency_samples(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    parts = [_samples(r) for r in rows]
    return np.concatenate(parts) if parts else np.zeros(0)


def _batch(r: Mapping[str, Any]) -> int:
    b = r.get("batch_size")
    return int(b) if isinstance(b, int) and b > 0 else 1


def _energy_samples(rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
    parts = [_samples(r) * float(r["power_w"]) / _batch(r) for r in rows if r.get("power_w") is not None]
    return np.concatenate(parts) if parts else np.zeros(0)


def _median_of(rows: Sequence[Mapping[str, Any]], key: str) -> Optional[float]:
    vals = [float(r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return float(np.median(vals)) if vals else None


def _sampled_check(c: Check, b: np.ndarray, a: np.ndarray, b_point: Optional[float], a_point: Optional[float],
                   tol: float, alpha: float, unit: str) -> Check:
    """Judge candidate samples ``a`` against baseline samples ``b`` (latency or energy) into ``c``."""
    c.unit, c.tol = unit, tol
    what = "latency" if c.metric == "latency" else "energy per inference"
    have_samples = len(b) >= 2 and len(a) >= 2
    if have_samples:
        c.baseline, c.candidate = float(np.median(b)), float(np.median(a))
    else:
        c.baseline, c.candidate = b_point, a_point
        missing = [s for s, x in (("baseline", b), ("candidate", a)) if len(x) < 2]
        c.notes.append(f"no {c.metric} samples stored for the {' and '.join(missing)}: decided on the medians "
                       "alone (no significance test)")
    if c.baseline is None or c.candidate is None or c.baseline <= 0:
        c.verdict, c.message = "not measured", f"{what} not measured on both sides"
        return c
    change = c.candidate / c.baseline - 1.0
    c.change = change
    slower = faster = True
    if have_samples:
        tb, ta = thin(b), thin(a)
        c.n_baseline, c.n_candidate = len(tb), len(ta)
        c.p = mann_whitney_greater(tb, ta)
        c.p_faster = mann_whitney_greater(ta, tb)
        c.ci = median_ratio_ci(tb, ta, seed=0)
        slower, faster = c.p < alpha, c.p_faster < alpha
    values = f"{c.baseline:.4g} {unit} {ARROW} {c.candidate:.4g} {unit}"
    ci = f", 95% CI of the ratio {c.ci[0]:.3f}–{c.ci[1]:.3f}" if c.ci else ""
    if change > tol and slower:
        c.verdict = "regression"
        sig = f"p={c.p:.2g} < alpha {alpha:g}" if c.p is not None else "no samples to test"
        c.message = f"{what} {fmt.change(change)} exceeds the {tol:.1%} tolerance ({sig}): {values}{ci}"
    elif change < -tol and faster:
        c.verdict = "improved"
        c.message = f"{what} {fmt.change(change)}: {values}{ci}"
    else:
        c.verdict = "pass"
        if change > tol:
            c.message = (f"{what} {fmt.change(change)} exceeds the tolerance but is not significant (p={c.p:.2g} >= "
                         f"alpha {alpha:g}): {values}{ci}")
        else:
            c.message = f"{what} {fmt.change(change)} within the {tol:.1%} tolerance: {values}{ci}"
    return c


def _energy_check(c: Check, b_ok: Sequence[Mapping[str, Any]], c_ok: Sequence[Mapping[str, Any]], tol: float,
                  alpha: float, gate_modelled: bool = False) -> Check:
    b_pw = [r for r in b_ok if r.get("power_w") is not None]
    c_pw = [r for r in c_ok if r.get("power_w") is not None]
    c.unit, c.tol = "mJ", tol
    if not b_pw or not c_pw:
        side = " and ".join(s for s, rows in (("baseline", b_pw), ("candidate", c_pw)) if not rows)
        c.verdict, c.message = "not measured", f"energy not measured (no power on the {side})"
        return c
    c.modelled = any(bool(r.get("power_modelled")) for r in b_pw + c_pw)

    def point(rows: Sequence[Mapping[str, Any]]) -> Optional[float]:
        vals = [float(r["latency_p50_ms"]) * float(r["power_w"]) / _batch(r) for r in rows
                if isinstance(r.get("latency_p50_ms"), (int, float))]
        return float(np.median(vals)) if vals else None
    b_runs, c_runs = _values_of(b_pw, "energy"), _values_of(c_pw, "energy")
    if len(b_runs) >= 2 and len(c_runs) >= 2:     # repetitions: decided over runs, as latency
        _runs_check(c, b_runs, c_runs, b_pw, c_pw, tol, alpha, [], "mJ")
    else:
        _sampled_check(c, _energy_samples(b_pw), _energy_samples(c_pw), point(b_pw), point(c_pw), tol, alpha, "mJ")
    if c.modelled:
        c.notes.append("power is modelled (no sensor) on "
                       + " and ".join(s for s, rows in (("the baseline", b_pw), ("the candidate", c_pw))
                                      if any(r.get("power_modelled") for r in rows)))
        if not gate_modelled and c.verdict in ("regression", "improved", "pass"):
            # a model of power (idle/max watts × whole-machine CPU load) moves with whatever else the machine runs:
            # shown, not gated, unless asked
            c.message = f"not gated (modelled power; --gate-modelled-energy gates it): {c.message}"
            c.verdict = "not measured"
    return c


def _accuracy_check(c: Check, b_ok: Sequence[Mapping[str, Any]], c_ok: Sequence[Mapping[str, Any]],
                    tol_pp: float, gated: Sequence[str] = ()) -> Check:
    c.unit, c.tol = "top-1", tol_pp
    b_rows = [r for r in b_ok if fmt.number(r.get("top1"), parse=False) is not None]
    c_rows = [r for r in c_ok if fmt.number(r.get("top1"), parse=False) is not None]
    if not b_rows or not c_rows:
        side = " and ".join(s for s, rows in (("baseline", b_rows), ("candidate", c_rows)) if not rows)
        c.verdict, c.message = "not measured", f"accuracy (top-1) not measured on the {side}"
        which = "candidate" if not c_rows else "baseline"
        unlabelled = [r for r in (c_ok if not c_rows else b_ok) if isinstance(_accuracy(r), Mapping)]
        if unlabelled:
            found = _fidelity_text(unlabelled)
            c.message += " (unlabelled eval data" + (f"; label-free fidelity on the {which}: {found}" if found
                                                     else "") + ")"
            if gated:
                c.message += ": decided by the " + " and ".join(gated) + " check" + ("s" if len(gated) > 1 else "")
            elif found:
                c.message += ": gate it with --min-agreement / --min-snr-db"
        return c
    bt = float(np.mean([r["top1"] for r in b_rows]))
    ct = float(np.mean([r["top1"] for r in c_rows]))
    c.baseline, c.candidate, c.n_baseline, c.n_candidate = bt, ct, len(b_rows), len(c_rows)
    delta = (ct - bt) * 100.0
    c.change = delta
    bn, cn = _values(b_rows, "eval_n"), _values(c_rows, "eval_n")
    if sorted(map(str, bn)) != sorted(map(str, cn)):
        c.notes.append(f"eval_n {', '.join(map(str, bn))} {ARROW} {', '.join(map(str, cn))}: accuracy measured "
                       "on a different number of images")
    values = f"{bt:.2%} {ARROW} {ct:.2%}"
    if delta < -tol_pp - 1e-9:
        c.verdict = "regression"
        c.message = f"top-1 {delta:+.2f} pp, below the {tol_pp:g} pp tolerance: {values}"
    elif delta > tol_pp + 1e-9:
        c.verdict, c.message = "improved", f"top-1 {delta:+.2f} pp: {values}"
    else:
        c.verdict, c.message = "pass", f"top-1 {delta:+.2f} pp within the {tol_pp:g} pp tolerance: {values}"
    return c


FIDELITY = {"agreement": ("agreement", "top-1 agreement with the dense model", "agreement"),
             "snr": ("snr_db", "SNR against the dense model's outputs", "dB")}


def _accuracy(r: Mapping[str, Any]) -> Any:
    rep = r.get("report")
    return rep.get("accuracy") if isinstance(rep, Mapping) else None


def _fidelity(r: Mapping[str, Any], key: str) -> Optional[float]:
    """``report.accuracy.<key>`` (agreement, snr_db) of a measurement row, or None (not reported, null, not finite)."""
    acc = _accuracy(r)
    return fmt.number(acc.get(key), parse=False) if isinstance(acc, Mapping) else None


def _fidelity_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """What label-free fidelity ``rows`` report (their worst trial), such as ``agreement 99.80%, SNR 41.7 dB``."""
    parts = []
    for key, spec in (("agreement", "agreement {:.2%}"), ("snr_db", "SNR {:.1f} dB")):
        vals = [v for v in (_fidelity(r, key) for r in rows) if v is not None]
        if vals:
            parts.append(spec.format(min(vals)))
    return ", ".join(parts)


def _why_unmeasured(r: Mapping[str, Any], key: str) -> str:
    """Why a measurement row has no ``accuracy.<key>``, from its report."""
    acc = _accuracy(r)
    if not isinstance(acc, Mapping):
        return "its reports have no accuracy section (the job had no eval data)"
    if "agreement" not in acc and "snr_db" not in acc:
        version = (r.get("report") or {}).get("schema_version")
        return (f"its reports (schema version {version}) predate label-free fidelity: an agent that writes "
                "version 2 reports measures it")
    if key == "agreement" and _fidelity(r, "snr_db") is not None:
        return "the model has no logit-like output (shape (N, C), C >= 2) to compare top-1 on"
    return "its eval shards carry no reference outputs of the dense model"


def _fidelity_check(c: Check, b_ok: Sequence[Mapping[str, Any]], c_ok: Sequence[Mapping[str, Any]],
                    bound: float) -> Check:
    """An absolute floor on the candidate's label-free fidelity (``c.metric`` agreement or snr): it fails iff its worst
    trial is below ``bound``; the baseline's value is shown for reading, not used."""
    key, what, unit = FIDELITY[c.metric]
    c.unit, c.bound = unit, bound
    agreement = c.metric == "agreement"

    def show(v: float) -> str:
        return f"{v:.2%}" if agreement else f"{v:.1f} dB"
    b_vals = [v for v in (_fidelity(r, key) for r in b_ok) if v is not None]
    c_vals = [v for v in (_fidelity(r, key) for r in c_ok) if v is not None]
    c.n_baseline, c.n_candidate = len(b_vals), len(c_vals)
    if b_vals:
        c.baseline = min(b_vals)
    floor = f"the minimum {show(bound)} (--min-{'agreement' if agreement else 'snr-db'})"
    if not c_vals:
        reasons = list(dict.fromkeys(_why_unmeasured(r, key) for r in c_ok))
        c.verdict = "not measured"
        c.message = f"{what} not measured on the candidate: {'; '.join(reasons)}; not gated against {floor}"
        return c
    ct = c.candidate = min(c_vals)
    if c.baseline is not None:
        c.change = (ct - c.baseline) * (100.0 if agreement else 1.0)
    if len(c_vals) < len(c_ok):
        c.notes.append(f"{c.metric} measured in {len(c_vals)} of {len(c_ok)} candidate trials")
    worst = f" (worst of {len(c_vals)} trials)" if len(c_vals) > 1 else ""
    base = f"; baseline {show(c.baseline)}" if c.baseline is not None else ""
    b_eval = list(dict.fromkeys(_accuracy(r).get("eval_sha256") for r in b_ok if _fidelity(r, key) is not None))
    c_eval = list(dict.fromkeys(_accuracy(r).get("eval_sha256") for r in c_ok if _fidelity(r, key) is not None))
    if c.baseline is not None and None not in b_eval + c_eval and sorted(b_eval) != sorted(c_eval):
        c.notes.append(f"eval data {', '.join(_short('artifact_sha256', v) for v in b_eval)} {ARROW} "
                       f"{', '.join(_short('artifact_sha256', v) for v in c_eval)}: {c.metric} measured on "
                       "different eval shards")
    if ct < bound:
        c.verdict = "regression"
        c.message = f"{what} {show(ct)}{worst} is below {floor}{base}"
    else:
        c.verdict = "pass"
        c.message = f"{what} {show(ct)}{worst} meets {floor}{base}"
    return c
