"""``edgeprune regress``: the release gate. Compare a candidate run with a baseline run from the results store.

Pairing
-------
Results are paired by identity ``(device_id, model, label)``. Several measurements with the same identity in one
run (repeated trials) are pooled: their latency samples are concatenated, their accuracies averaged. A result only
in the baseline is a failure (``missing``); one only in the candidate is a note. A failed measurement (``status``
error) in the candidate is a failure (``failed``); when every baseline trial of a pair failed, the pair cannot be
judged (incomparable).

A pair is *comparable* when both sides ran the same thing: the same ``artifact_sha256``, runtime name, format and
batch size. If one of those differs the pair is incomparable (the message names the field, baseline → candidate)
and the gate exits 2, unless ``--compare-anyway``, which compares it and lists the differences. What a release
gate exists to catch is *not* a refusal: runtime version, threads, OS, kernel, firmware, agent version, CPU,
runtime options and timing protocol are listed per pair as ``changed: threads 2 → 1, firmware.l4t 36.2 → 36.3``.

Decision rule (latency and energy)
----------------------------------
A metric *regressed* iff both

1. a one-sided Mann–Whitney U test says the candidate is slower (costs more) at significance ``alpha``
   (p < alpha; normal approximation with tie and continuity correction, as ``scipy.stats.mannwhitneyu(...,
   method="asymptotic")``), **and**
2. the effect, candidate median / baseline median − 1 over all pooled samples, exceeds the tolerance
   (``--latency-tol`` / ``--energy-tol``, default 5 %).

It *improved* iff the mirror image holds (significantly lower, by more than the tolerance); otherwise it passes.
Why both: per-inference latency samples are numerous (thousands) and autocorrelated (frequency scaling, thermal
state and background load drift over seconds), so the test's independence assumption is false and with
thousands of samples it calls trivial shifts (a 1 % run-to-run wobble) "significant". The tolerance is the
minimum effect worth failing a release for; the test only keeps noise from failing one when the medians differ by
more than the tolerance by chance. To weaken the autocorrelation and the sample-size inflation, each side is
thinned to at most 1000 evenly spaced samples before the test. A bootstrap 95 % CI of the median ratio (2000
resamples of the thinned samples, fixed seed) is reported for reading, not used in the decision; being an i.i.d.
bootstrap of still somewhat correlated samples it is, if anything, too narrow. When a side has no stored samples
(fewer than 2), the decision uses the stored medians alone (no test; p shown as —).

Energy samples: each latency sample × that measurement's mean power (``power_w``) / batch size, in mJ per
inference. They carry the latency variation and each run's mean power, not within-run power noise (the agent
reports one mean power per window), and their median is the median latency's energy, not the agent's
mean-based ``energy_mj``. Energy from modelled power (no sensor) on either side is computed and shown, marked
``modelled``, but not gated (``not measured``: skipped in JUnit) unless ``--gate-modelled-energy``: the model is
idle/max watts × whole-machine CPU utilisation, so it follows whatever else the machine runs (A/A runs on a busy
2-core VM differed by up to 18 % in modelled energy with latency within 2 %).
No power on either side: the energy check is ``not measured`` (skipped, not a failure).

Accuracy: fails iff candidate top-1 < baseline top-1 − ``--accuracy-tol`` (percentage points; top-1 is a fraction
in the store); a different number of evaluated images is noted. Top-1 null on either side (report schema 2 on
unlabelled eval data) makes the check ``not measured``; its message says why, and which fidelity the agent
measured instead.

Label-free fidelity (report schema 2, ``accuracy.agreement`` and ``accuracy.snr_db`` of the stored report JSON,
see :mod:`agent.schema`): only with ``--min-agreement F`` (a fraction in (0, 1]: top-1 agreement with the dense
model's outputs) and/or ``--min-snr-db DB`` (min over the model's outputs of the SNR against the dense model's
outputs), each adding a check per pair (metrics ``agreement`` and ``snr``). These are *absolute* floors on the
candidate, not comparisons with the baseline: agreement is already relative to the dense model, and a baseline at
99.9 % does not make 99.5 % a regression nor 97 % a pass. The check fails (``regression``) iff the candidate's
worst trial is below the floor, and passes otherwise (never ``improved``); the baseline's value is shown for
reading only. A candidate whose reports carry no such value (no eval data, a version-1 report, shards without
reference outputs, no logit-like output for agreement) is ``not measured`` (skipped in JUnit, not a failure),
the reason given. A missing, failed or incomparable pair gives these checks that verdict too, as for the others.

Exit codes: 0 pass; 1 at least one regression or a missing/failed candidate result; 2 usage error, no pairs at all,
or an incomparable pair not overridden by ``--compare-anyway`` (2 wins over 1: the comparison itself is invalid).
"""
from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from edgeprune.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from host.results.store import Store

MAX_TEST_SAMPLES = 1000
N_BOOT = 2000
METRICS = ("latency", "energy", "accuracy", "agreement", "snr")
COMPARABLE = ("artifact_sha256", "runtime", "format", "batch_size")
FAILING = ("regression", "missing", "failed")
VERDICTS = ("pass", "improved", "regression", "not measured", "missing", "failed", "incomparable")
ARROW = "→"

Identity = Tuple[str, Optional[str], str]


# ------------------------------------------------------------------------------------------ statistics


def _clean(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def mann_whitney_greater(a: Any, b: Any) -> float:
    """One-sided p-value that ``b`` is stochastically greater than ``a`` (candidate ``b`` slower than baseline ``a``).

    Mann–Whitney U with the normal approximation, tie correction and continuity correction (the same number as
    ``scipy.stats.mannwhitneyu(b, a, alternative="greater", method="asymptotic")``). Non-finite values are dropped;
    all values equal gives 1.0 (no evidence)."""
    x, y = _clean(b), _clean(a)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_greater needs at least one finite value on each side")
    _, inverse, counts = np.unique(np.concatenate([x, y]), return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = avg_rank[np.asarray(inverse).ravel()]
    u = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    c = counts.astype(np.float64)
    ties = float((c ** 3 - c).sum())
    var = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def median_ratio_ci(a: Any, b: Any, seed: int = 0, n_boot: int = N_BOOT) -> Tuple[float, float]:
    """Bootstrap 95 % percentile CI of median(b) / median(a): ``n_boot`` i.i.d. resamples of each side, drawn
    vectorised and exactly through the order statistics (:func:`_boot_medians`), ``numpy.random.default_rng(seed)``."""
    x, y = _clean(a), _clean(b)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("median_ratio_ci needs at least one finite value on each side")
    rng = np.random.default_rng(seed)
    ma, mb = _boot_medians(x, n_boot, rng), _boot_medians(y, n_boot, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = mb / ma
    ratio = ratio[np.isfinite(ratio)]
    if len(ratio) == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(ratio, [2.5, 97.5])
    return (float(lo), float(hi))


def _boot_medians(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` draws of the median of an i.i.d. resample (with replacement, same size) of ``x``, without building
    the resamples: the resample's indices into sorted ``x`` are floor(n * U) for n uniform U, so its k-th smallest
    index is floor(n * U_(k)), U_(k) ~ Beta(k, n + 1 - k); the next order statistic is U_(k) + (1 - U_(k)) *
    Beta(1, n - k). Exactly the distribution of ``np.median(x[rng.integers(0, n, n)])``, in O(n log n + n_boot)."""
    xs = np.sort(x)
    n = len(xs)
    k = (n + 1) // 2 if n % 2 else n // 2
    u1 = rng.beta(k, n + 1 - k, size=n_boot)
    i1 = np.minimum((u1 * n).astype(np.int64), n - 1)
    if n % 2:
        return xs[i1]
    u2 = u1 + (1.0 - u1) * rng.beta(1, n - k, size=n_boot)
    i2 = np.minimum((u2 * n).astype(np.int64), n - 1)
    return (xs[i1] + xs[i2]) / 2.0


def thin(x: Any, max_n: int = MAX_TEST_SAMPLES) -> np.ndarray:
    """At most ``max_n`` evenly spaced samples of ``x`` (in order; all of them when there are fewer)."""
    a = np.asarray(x, dtype=np.float64).ravel()
    if len(a) <= max_n:
        return a
    return a[np.linspace(0, len(a) - 1, max_n).round().astype(np.int64)]


# ------------------------------------------------------------------------------------------ arguments


_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


def parse_percent(text: Any, arg: str) -> float:
    """``5%`` or ``5`` (a bare number is percent) -> 0.05. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(%)?", s)
    if m is None:
        raise UsageError(f"{arg}: expected a percentage such as 5% (or 5, meaning 5%), got {text!r}")
    v = float(m.group(1))
    if not math.isfinite(v):
        raise UsageError(f"{arg}: {text!r} is not a finite percentage")
    return v / 100.0


def parse_pp(text: Any, arg: str) -> float:
    """``0.5pp`` or ``0.5`` (a bare number is percentage points) -> 0.5. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    if s.endswith("%"):
        raise UsageError(f"{arg}: give percentage points, such as 0.5pp (or 0.5): {text!r} is ambiguous between "
                         "a relative and an absolute change of top-1")
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(pp)?", s, flags=re.IGNORECASE)
    if m is None:
        raise UsageError(f"{arg}: expected percentage points such as 0.5pp (or 0.5), got {text!r}")
    v = float(m.group(1))
    if not math.isfinite(v):
        raise UsageError(f"{arg}: {text!r} is not a finite number of percentage points")
    return v


def parse_alpha(text: Any, arg: str = "--alpha") -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise UsageError(f"{arg}: expected a significance level between 0 and 1 (such as 0.01), got {text!r}") \
            from None
    if not (0.0 < v < 1.0):
        raise UsageError(f"{arg}: must be between 0 and 1 exclusive (such as 0.01), got {text!r}")
    return v


def parse_fraction(text: Any, arg: str = "--min-agreement") -> float:
    """``0.99`` or ``99%`` -> 0.99: a fraction in (0, 1]. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(%)?", s)
    v = float(m.group(1)) / (100.0 if m.group(3) else 1.0) if m else math.nan
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise UsageError(f"{arg}: expected a fraction in (0, 1] such as 0.99 (or a percentage such as 99%), "
                         f"got {text!r}")
    return v


def parse_db(text: Any, arg: str = "--min-snr-db") -> float:
    """``30``, ``30dB`` or ``-3.5 dB`` -> decibels. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"([-+]?" + _NUMBER + r")\s*(db)?", s, flags=re.IGNORECASE)
    v = float(m.group(1)) if m else math.nan
    if not math.isfinite(v):
        raise UsageError(f"{arg}: expected a signal-to-noise ratio in decibels such as 30 (or 30dB), got {text!r}")
    return v


def _check_tolerance(v: float, arg: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise UsageError(f"{arg}: must be a non-negative number, got {v!r}")
    return float(v)


def _check_bound(v: Optional[float], arg: str, fraction: bool) -> Optional[float]:
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if fraction and not (ok and 0.0 < v <= 1.0):
        raise UsageError(f"{arg}: must be a fraction in (0, 1] such as 0.99, got {v!r}")
    if not ok:
        raise UsageError(f"{arg}: must be a finite number of decibels, got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------------------ results


@dataclass
class Check:
    """One metric of one pair, judged."""
    device_id: str
    model: Optional[str]
    label: str
    metric: str                                   # latency | energy | accuracy | agreement | snr | result
    verdict: str                                  # one of VERDICTS
    message: str
    unit: str = ""                                # ms | mJ | top-1 | agreement | dB | ""
    baseline: Optional[float] = None              # median latency / energy, top-1 or agreement (fraction), SNR (dB)
    candidate: Optional[float] = None
    change: Optional[float] = None                # latency/energy: candidate/baseline - 1; accuracy, agreement: pp
                                                  # difference; snr: dB difference (agreement/snr: for reading)
    ci: Optional[Tuple[float, float]] = None      # bootstrap 95 % CI of the median ratio (candidate/baseline)
    p: Optional[float] = None                     # one-sided p that the candidate is slower / costs more
    p_faster: Optional[float] = None              # one-sided p that it is faster / costs less
    tol: Optional[float] = None                   # fraction (latency/energy) or pp (accuracy)
    bound: Optional[float] = None                 # agreement (fraction) / snr (dB): the candidate's minimum
    n_baseline: int = 0                           # samples in the test (or trials, for accuracy)
    n_candidate: int = 0
    trials_baseline: int = 0
    trials_candidate: int = 0
    modelled: bool = False                        # energy from modelled power on either side
    notes: List[str] = field(default_factory=list)
    changes: List[str] = field(default_factory=list)       # environment changes of the pair
    differences: List[str] = field(default_factory=list)   # comparability differences (--compare-anyway)

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    @property
    def name(self) -> str:
        return f"{self.label} {self.metric}"

    @property
    def classname(self) -> str:
        return f"{self.device_id}.{self.model or '-'}"


@dataclass
class Incomparable:
    """A pair that cannot be compared as is; ``compared`` when --compare-anyway compared it nevertheless."""
    device_id: str
    model: Optional[str]
    label: str
    reasons: List[str]
    compared: bool = False

    @property
    def message(self) -> str:
        what = f"{self.device_id} {self.model or '-'}/{self.label}"
        if self.compared:
            return f"{what}: compared anyway although {'; '.join(self.reasons)}"
        return f"{what}: not comparable: {'; '.join(self.reasons)}"


@dataclass
class Comparison:
    baseline: str
    candidate: str
    latency_tol: float
    energy_tol: float
    accuracy_tol_pp: float
    alpha: float
    compare_anyway: bool
    gate_modelled_energy: bool = False
    min_agreement: Optional[float] = None         # --min-agreement (fraction), None: not gated
    min_snr_db: Optional[float] = None            # --min-snr-db, None: not gated
    checks: List[Check] = field(default_factory=list)
    incomparable: List[Incomparable] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    pairs: int = 0
    error: Optional[str] = None                   # why nothing could be compared

    @property
    def failures(self) -> List[Check]:
        return [c for c in self.checks if c.failed]

    @property
    def refused(self) -> List[Incomparable]:
        return [i for i in self.incomparable if not i.compared]

    @property
    def exit_code(self) -> int:
        if self.pairs == 0 or self.refused:
            return 2
        return 1 if self.failures else 0

    @property
    def verdict(self) -> str:
        return {0: "pass", 1: "fail", 2: "incomparable"}[self.exit_code]

    def counts(self) -> Dict[str, int]:
        out = {v: 0 for v in VERDICTS}
        for c in self.checks:
            out[c.verdict] = out.get(c.verdict, 0) + 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        for c, cd in zip(self.checks, d["checks"]):
            cd["name"], cd["classname"], cd["failed"] = c.name, c.classname, c.failed
            if cd["ci"] is not None:
                cd["ci"] = list(cd["ci"])
        for i, idd in zip(self.incomparable, d["incomparable"]):
            idd["message"] = i.message
        d.update(exit_code=self.exit_code, verdict=self.verdict, counts=self.counts())
        return _json_safe(d)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------ comparing


def compare(store: "Store", baseline: str, candidate: str, *, latency_tol: float = 0.05, energy_tol: float = 0.05,
            accuracy_tol_pp: float = 0.5, alpha: float = 0.01, compare_anyway: bool = False,
            gate_modelled_energy: bool = False, min_agreement: Optional[float] = None,
            min_snr_db: Optional[float] = None) -> Comparison:
    """Judge run ``candidate`` against run ``baseline`` (see the module docstring for the rule). ``min_agreement``
    (fraction) / ``min_snr_db`` add the label-free fidelity checks; None leaves them out."""
    latency_tol = _check_tolerance(latency_tol, "--latency-tol")
    energy_tol = _check_tolerance(energy_tol, "--energy-tol")
    accuracy_tol_pp = _check_tolerance(accuracy_tol_pp, "--accuracy-tol")
    min_agreement = _check_bound(min_agreement, "--min-agreement", fraction=True)
    min_snr_db = _check_bound(min_snr_db, "--min-snr-db", fraction=False)
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
        return "—"
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
    return [f"{k} {b.get(k, '—')} {ARROW} {c.get(k, '—')}" for k in keys if b.get(k) != c.get(k)]


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

    checks = [
        _sampled_check(base_check("latency", "pass", ""), _latency_samples(b_ok), _latency_samples(c_ok),
                       _median_of(b_ok, "latency_p50_ms"), _median_of(c_ok, "latency_p50_ms"),
                       comp.latency_tol, comp.alpha, "ms"),
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


def _samples(r: Mapping[str, Any]) -> np.ndarray:
    a = _clean(r.get("samples_ms") or [])
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


def _pct(x: float) -> str:
    return f"{x * 100:+.1f}%"


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
        c.message = f"{what} {_pct(change)} exceeds the {tol:.1%} tolerance ({sig}): {values}{ci}"
    elif change < -tol and faster:
        c.verdict = "improved"
        c.message = f"{what} {_pct(change)}: {values}{ci}"
    else:
        c.verdict = "pass"
        if change > tol:
            c.message = (f"{what} {_pct(change)} exceeds the tolerance but is not significant (p={c.p:.2g} >= "
                         f"alpha {alpha:g}): {values}{ci}")
        else:
            c.message = f"{what} {_pct(change)} within the {tol:.1%} tolerance: {values}{ci}"
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
    b_rows = [r for r in b_ok if _number(r.get("top1")) is not None]
    c_rows = [r for r in c_ok if _number(r.get("top1")) is not None]
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


_FIDELITY = {"agreement": ("agreement", "top-1 agreement with the dense model", "agreement"),
             "snr": ("snr_db", "SNR against the dense model's outputs", "dB")}


def _number(v: Any) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _accuracy(r: Mapping[str, Any]) -> Any:
    rep = r.get("report")
    return rep.get("accuracy") if isinstance(rep, Mapping) else None


def _fidelity(r: Mapping[str, Any], key: str) -> Optional[float]:
    """``report.accuracy.<key>`` (agreement, snr_db) of a measurement row, or None (not reported, null, not finite)."""
    acc = _accuracy(r)
    return _number(acc.get(key)) if isinstance(acc, Mapping) else None


def _fidelity_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """What label-free fidelity ``rows`` report (their worst trial), such as ``agreement 99.80%, SNR 41.7 dB``."""
    parts = []
    for key, fmt in (("agreement", "agreement {:.2%}"), ("snr_db", "SNR {:.1f} dB")):
        vals = [v for v in (_fidelity(r, key) for r in rows) if v is not None]
        if vals:
            parts.append(fmt.format(min(vals)))
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
    key, what, unit = _FIDELITY[c.metric]
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


# ------------------------------------------------------------------------------------------ JUnit


def write_junit(comparison: Comparison, path: Any) -> Path:
    """Write the comparison as JUnit XML (one testsuite ``edgeprune.regress``, one testcase per check) atomically."""
    import xml.etree.ElementTree as ET

    from host.files import write_text_atomic

    counts = comparison.counts()
    failures = sum(counts[v] for v in FAILING)
    errors = counts["incomparable"] + (1 if comparison.pairs == 0 else 0)
    tests = len(comparison.checks) + (1 if comparison.pairs == 0 else 0)
    stats = dict(tests=str(tests), failures=str(failures), errors=str(errors), skipped=str(counts["not measured"]))
    root = ET.Element("testsuites", name="edgeprune regress", time="0", **stats)
    suite = ET.SubElement(root, "testsuite", name="edgeprune.regress", time="0", **stats)
    props = ET.SubElement(suite, "properties")
    for k, v in (("baseline", comparison.baseline), ("candidate", comparison.candidate),
                 ("latency_tol", f"{comparison.latency_tol:g}"), ("energy_tol", f"{comparison.energy_tol:g}"),
                 ("accuracy_tol_pp", f"{comparison.accuracy_tol_pp:g}"), ("alpha", f"{comparison.alpha:g}"),
                 ("compare_anyway", str(comparison.compare_anyway).lower()),
                 ("min_agreement", _opt(comparison.min_agreement)), ("min_snr_db", _opt(comparison.min_snr_db))):
        if v is not None:
            ET.SubElement(props, "property", name=k, value=_xml_text(v))
    for c in comparison.checks:
        case = ET.SubElement(suite, "testcase", classname=_xml_text(c.classname), name=_xml_text(c.name), time="0")
        details = _xml_text(_details(c))
        if c.failed:
            el = ET.SubElement(case, "failure", message=_xml_text(c.message), type=c.verdict)
            el.text = details
        elif c.verdict == "incomparable":
            el = ET.SubElement(case, "error", message=_xml_text(c.message), type="incomparable")
            el.text = details
        elif c.verdict == "not measured":
            ET.SubElement(case, "skipped", message=_xml_text(c.message))
        else:
            ET.SubElement(case, "system-out").text = details
    if comparison.pairs == 0:
        case = ET.SubElement(suite, "testcase", classname="edgeprune.regress", name="pairs", time="0")
        ET.SubElement(case, "error", message=_xml_text(comparison.error or "no pairs"), type="no-pairs")
    if comparison.notes:
        ET.SubElement(suite, "system-out").text = _xml_text("\n".join(comparison.notes))
    ET.indent(root)
    # ASCII with character references (→ as &#8594;): the file is the same whatever the locale's encoding
    text = ET.tostring(root, encoding="us-ascii", xml_declaration=False).decode("ascii")
    return write_text_atomic(Path(path), '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n")


def _opt(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{v:g}"


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(s: Any) -> str:
    """Text XML 1.0 can hold (control characters from error messages replaced)."""
    return _XML_BAD.sub("?", str(s))


def _details(c: Check) -> str:
    lines = [f"{c.verdict}: {c.message}"]
    if c.p is not None:
        lines.append(f"p (candidate slower) = {c.p:.3g}, p (candidate faster) = {c.p_faster:.3g}, "
                     f"samples {c.n_baseline} / {c.n_candidate} after thinning")
    lines.extend(f"note: {n}" for n in c.notes)
    if c.changes:
        lines.append("changed: " + ", ".join(c.changes))
    if c.differences:
        lines.append("compared anyway although: " + "; ".join(c.differences))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def register(sub: "argparse._SubParsersAction") -> None:
    """Add ``edgeprune regress`` to the CLI's subparsers."""
    p = sub.add_parser(
        "regress", help="release gate: compare a candidate run with a baseline run (latency, energy, accuracy)",
        description="Compare the results of run CANDIDATE with run BASELINE in the results store, per device, "
                    "model and label. Latency/energy regress when a one-sided Mann-Whitney test is significant at "
                    "--alpha AND the median grew by more than the tolerance; accuracy when top-1 fell by more "
                    "than --accuracy-tol; label-free fidelity (unlabelled eval data) when the candidate's top-1 "
                    "agreement with the dense model or its SNR is below --min-agreement / --min-snr-db. Exit 0 "
                    "pass, 1 regression (or a missing/failed candidate result), 2 bad usage or incomparable "
                    "results.")
    p.add_argument("--baseline", required=True, metavar="RUN", help="run id of the reference results")
    p.add_argument("--candidate", required=True, metavar="RUN", help="run id of the results to judge")
    p.add_argument("--latency-tol", default="5%", metavar="PCT",
                   help="smallest median latency increase that fails the gate: 5%% or 5 (default 5%%)")
    p.add_argument("--energy-tol", default="5%", metavar="PCT",
                   help="smallest median energy-per-inference increase that fails the gate (default 5%%)")
    p.add_argument("--accuracy-tol", default="0.5pp", metavar="PP",
                   help="largest allowed top-1 drop in percentage points: 0.5pp or 0.5 (default 0.5pp)")
    p.add_argument("--min-agreement", default=None, metavar="F",
                   help="fail when the candidate's on-device top-1 agreement with the dense model's outputs (label-"
                        "free; a fraction, e.g. 0.99 or 99%%) is below F: an absolute bound, not relative to the "
                        "baseline; not measured (skipped) when its reports have no agreement")
    p.add_argument("--min-snr-db", default=None, metavar="DB",
                   help="fail when the candidate's output SNR against the dense model's outputs (dB, min over "
                        "outputs) is below DB; not measured (skipped) when its reports have no SNR")
    p.add_argument("--alpha", default="0.01",
                   help="significance level of the one-sided Mann-Whitney tests (default 0.01)")
    p.add_argument("--gate-modelled-energy", action="store_true",
                   help="also fail on energy computed from MODELLED power (no sensor); by default it is shown and "
                        "not gated: the model follows whole-machine CPU load, not the artifact")
    p.add_argument("--compare-anyway", action="store_true",
                   help="compare pairs whose artifact, runtime, format or batch size differ (listing the "
                        "differences) instead of refusing them")
    p.add_argument("--junit", metavar="FILE", help="also write the checks as JUnit XML to FILE")
    p.add_argument("--db", default=None, metavar="URL",
                   help="results database URL or path (default: EDGEPRUNE_DB, else results/edgeprune.db)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.set_defaults(handler=main_regress)


def main_regress(args: argparse.Namespace, console: "Console") -> int:
    """Run the gate from parsed arguments; print the summary (or JSON); the exit code. UsageError propagates."""
    from host.results.store import Store

    latency_tol = parse_percent(args.latency_tol, "--latency-tol")
    energy_tol = parse_percent(args.energy_tol, "--energy-tol")
    accuracy_tol = parse_pp(args.accuracy_tol, "--accuracy-tol")
    alpha = parse_alpha(args.alpha, "--alpha")
    min_agreement = None if args.min_agreement is None else parse_fraction(args.min_agreement, "--min-agreement")
    min_snr_db = None if args.min_snr_db is None else parse_db(args.min_snr_db, "--min-snr-db")
    with Store(args.db, create=False) as store:
        comp = compare(store, args.baseline, args.candidate, latency_tol=latency_tol, energy_tol=energy_tol,
                       accuracy_tol_pp=accuracy_tol, alpha=alpha, compare_anyway=args.compare_anyway,
                       gate_modelled_energy=args.gate_modelled_energy, min_agreement=min_agreement,
                       min_snr_db=min_snr_db)
    junit: Optional[Path] = None
    if args.junit:
        try:
            junit = write_junit(comp, args.junit)
        except OSError as e:
            raise UsageError(f"--junit: {args.junit}: cannot write: {e}") from None
    if args.json:
        console.print_json(json.dumps(comp.to_dict()))
    else:
        print_summary(comp, console)
        if junit is not None:
            console.print(f"wrote {junit}", highlight=False)
    return comp.exit_code


_COLOURS = {"pass": "green", "improved": "cyan", "regression": "red", "missing": "red", "failed": "red",
            "incomparable": "magenta", "not measured": "dim"}


def _value(c: Check, v: Optional[float]) -> str:
    if v is None:
        return "—"
    if c.metric in ("accuracy", "agreement"):
        return f"{v:.2%}"
    if c.metric == "snr":
        return f"{v:.1f} dB"
    return f"{v:.4g} {c.unit}" + ("*" if c.modelled else "")


def _p_text(p: Optional[float]) -> str:
    if p is None:
        return "—"
    return "<1e-300" if p < 1e-300 else f"{p:.2g}"


def _fidelity_rule(comp: Comparison) -> str:
    parts = []
    if comp.min_agreement is not None:
        parts.append(f"agreement when the candidate's top-1 agreement with the dense model is below "
                     f"{comp.min_agreement:.2%}")
    if comp.min_snr_db is not None:
        parts.append(f"snr when the candidate's SNR against the dense model's outputs is below {comp.min_snr_db:g} dB")
    if not parts:
        return "; label-free fidelity (agreement, SNR) not gated (--min-agreement, --min-snr-db)"
    return ("; " + "; ".join(parts) + " (absolute bounds on the candidate's worst trial; not measured when its "
            "reports lack them)")


def print_summary(comp: Comparison, console: "Console") -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"edgeprune regress: {escape(comp.baseline)} {ARROW} {escape(comp.candidate)}")
    for col in ("device", "model/label", "metric"):
        table.add_column(col)
    for col in ("baseline", "candidate", "change", "95% CI", "p"):
        table.add_column(col, justify="right")
    table.add_column("verdict")
    for c in comp.checks:
        if c.change is None:
            change = "—"
        elif c.metric in ("accuracy", "agreement"):
            change = f"{c.change:+.2f} pp"
        elif c.metric == "snr":
            change = f"{c.change:+.1f} dB"
        else:
            change = _pct(c.change)
        ci = f"{_pct(c.ci[0] - 1)}…{_pct(c.ci[1] - 1)}" if c.ci and all(map(math.isfinite, c.ci)) else "—"
        p = c.p if (c.change or 0) >= 0 else c.p_faster
        verdict = c.verdict + (" (modelled)" if c.modelled and c.verdict != "not measured" else "")
        table.add_row(escape(c.device_id), escape(f"{c.model or '-'}/{c.label}"), c.metric, _value(c, c.baseline),
                      _value(c, c.candidate), change, ci, _p_text(p),
                      f"[{_COLOURS.get(c.verdict, 'white')}]{verdict}[/]")
    if comp.checks:
        console.print(table)
    shown = set()
    for c in comp.checks:
        key = (c.device_id, c.model, c.label)
        if key in shown:
            continue
        shown.add(key)
        extra = []
        if c.changes:
            extra.append("changed: " + ", ".join(c.changes))
        pair = [cc for cc in comp.checks if (cc.device_id, cc.model, cc.label) == key]
        # what decided fidelity: the agreement/SNR checks' reading, and why top-1 was not measured
        extra.extend(f"{cc.metric}: {cc.message}" for cc in pair
                     if cc.message and cc.verdict in ("pass", "regression", "not measured")
                     and (cc.metric in _FIDELITY or (cc.metric == "accuracy" and cc.verdict == "not measured")))
        extra.extend(dict.fromkeys(n for cc in pair for n in cc.notes))
        for line in extra:
            console.print(f"{c.device_id} {c.model or '-'}/{c.label}: {line}", highlight=False, markup=False)
    for i in comp.incomparable:
        console.print(("[yellow]compared anyway[/] " if i.compared else "[magenta]incomparable[/] ")
                      + escape(i.message), highlight=False)
    for n in comp.notes:
        console.print(f"note: {n}", highlight=False, markup=False)
    if any(c.modelled for c in comp.checks):
        console.print("* energy from MODELLED power (no sensor) on at least one side: a model, not a measurement.",
                      highlight=False)
    console.print(f"rule: latency/energy regress when a one-sided Mann-Whitney test (<= {MAX_TEST_SAMPLES} "
                  f"thinned samples) gives p < {comp.alpha:g} AND the median grew by more than the tolerance "
                  f"(latency {comp.latency_tol:.1%}, energy {comp.energy_tol:.1%}); accuracy when top-1 fell by "
                  f"more than {comp.accuracy_tol_pp:g} pp (not measured without labels on both sides)"
                  + _fidelity_rule(comp) + ". p shown in the direction of the change.",
                  highlight=False, style="dim")
    counts = comp.counts()
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    if comp.pairs == 0:
        console.print(f"[magenta]NO PAIRS[/]: {escape(comp.error or '')}", highlight=False)
    elif comp.exit_code == 2:
        console.print(f"[magenta]INCOMPARABLE[/]: {len(comp.refused)} pair(s) cannot be compared "
                      f"({tally}); fix the runs or pass --compare-anyway", highlight=False)
    elif comp.exit_code == 1:
        console.print(f"[red]FAIL[/]: {len(comp.failures)} failing check(s) of {len(comp.checks)} ({tally})",
                      highlight=False)
    else:
        console.print(f"[green]PASS[/]: {len(comp.checks)} check(s) over {comp.pairs} pair(s) ({tally})",
                      highlight=False)
