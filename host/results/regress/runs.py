"""Run-level decisions: judge repetitions, not samples.

Per-inference latency samples from one timed window are thousands of autocorrelated draws of one machine state;
a test that treats them as independent calls a background-load wobble "significant" (issue 21: an A/A pair of
benches gave p = 1.4e-68 for +5.6 %). What is independent is the repetition: a fresh runtime session, timed in
its own window. So, as pyperf compares run means and Google Benchmark's compare tool runs its U-test over
repetitions, this module decides on **run medians** (one per repetition):

* effect: median of the candidate's run medians / median of the baseline's run medians − 1;
* confidence: a one-sided Mann–Whitney U test over the run medians (``scipy.stats.mannwhitneyu``, exact for
  small samples), and a percentile bootstrap CI of the effect over runs (``scipy.stats.bootstrap``, for reading);
* noise floor: how far run medians of the *same* artifact wander on this device, from the baseline's own
  repetitions (the largest relative distance of a run median from their median) and from earlier A/A runs in
  the store (``history``: their |effect|); while there are fewer than two of those, a prior (:data:`PRIOR_FLOOR`,
  15 %: benches of one artifact on a quiet VM here differed by up to 11 %, more than any bench's own runs); a
  change must exceed both the tolerance and this floor.

Verdicts: ``regression`` (effect > max(tolerance, floor) and p < alpha), ``improved`` (the mirror image), ``pass``
(|effect| within max(tolerance, floor)), or ``inconclusive`` when the data cannot decide: too few repetitions for
the test to ever reach alpha (3 against 3 cannot: the smallest exact p is 1/20), or an effect beyond the threshold
without confidence. Inconclusive is neither pass nor fail; :attr:`RunDecision.rule` says what decided.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from host.results.regress.stats import clean

DEFAULT_ALPHA = 0.01
# The between-bench noise assumed while the store holds fewer than MIN_HISTORY earlier A/A runs of a device and
# model: two benches of the same artifact on this quiet 2-core VM differed by up to 11 % (bench/gate.py, 2026-12-06),
# more than any bench's own runs spread, so a fresh store must not call a 10 % shift a regression. A/B runs
# (`edgeprune ab`, interleaved: no bench-to-bench shift) use no prior.
PRIOR_FLOOR = 0.15
MIN_HISTORY = 2


@dataclass
class RunDecision:
    verdict: str                       # regression | improved | pass | inconclusive
    effect: Optional[float]            # candidate / baseline − 1 (medians of run medians)
    threshold: float                   # max(tolerance, noise floor)
    noise_floor: float
    p_slower: Optional[float] = None
    p_faster: Optional[float] = None
    ci: Optional[Tuple[float, float]] = None     # of the ratio, bootstrap over runs
    n_baseline: int = 0
    n_candidate: int = 0
    rule: str = ""
    notes: List[str] = field(default_factory=list)


def min_exact_p(n1: int, n2: int) -> float:
    """The smallest one-sided p an exact Mann–Whitney test of ``n1`` against ``n2`` values can give: 1 / C(n1+n2, n1)."""
    return 1.0 / math.comb(n1 + n2, n1) if n1 > 0 and n2 > 0 else 1.0


def min_runs(alpha: float = DEFAULT_ALPHA) -> int:
    """Repetitions per side needed for the exact test to be able to reach ``alpha`` (5 for 0.01, 4 for 0.05)."""
    n = 1
    while min_exact_p(n, n) >= alpha:
        n += 1
    return n


def noise_floor(baseline_runs: Any, history: Sequence[float] = (), prior: float = 0.0) -> float:
    """Relative noise of one artifact on one device: the largest |run median / median − 1| among the baseline's
    repetitions, the largest |effect| of earlier A/A comparisons (``history``), and ``prior`` while there are fewer
    than :data:`MIN_HISTORY` of those."""
    b = clean(baseline_runs)
    spread = float(np.max(np.abs(b / np.median(b) - 1.0))) if len(b) >= 2 and np.median(b) > 0 else 0.0
    past = [abs(float(h)) for h in history if h is not None and math.isfinite(float(h))]
    return max([spread] + past + ([prior] if len(past) < MIN_HISTORY else []))


def _p(x: np.ndarray, y: np.ndarray) -> float:
    """One-sided p that ``x`` is stochastically greater than ``y`` (exact when there are no ties)."""
    from scipy import stats

    p = float(stats.mannwhitneyu(x, y, alternative="greater", method="auto").pvalue)
    return 1.0 if math.isnan(p) else p


def ratio_ci(baseline_runs: Any, candidate_runs: Any, seed: int = 0) -> Optional[Tuple[float, float]]:
    """95 % percentile bootstrap CI (over runs) of median(candidate) / median(baseline); None with < 2 runs a side."""
    from scipy import stats

    b, c = clean(baseline_runs), clean(candidate_runs)
    if len(b) < 2 or len(c) < 2:
        return None
    res = stats.bootstrap((b, c), lambda x, y, axis=-1: np.median(y, axis=axis) / np.median(x, axis=axis),
                          n_resamples=2000, method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    return (float(lo), float(hi))


def decide(baseline_runs: Any, candidate_runs: Any, tol: float, alpha: float = DEFAULT_ALPHA,
           history: Sequence[float] = (), prior: float = PRIOR_FLOOR) -> RunDecision:
    """The run-level verdict (module docstring) of candidate run medians against baseline run medians;
    ``prior``: the between-bench noise assumed without enough A/A ``history`` (0 for interleaved A/B runs)."""
    b, c = clean(baseline_runs), clean(candidate_runs)
    floor = noise_floor(b, history, prior)
    d = RunDecision("inconclusive", None, max(tol, floor), floor, n_baseline=len(b), n_candidate=len(c))
    if len(b) == 0 or len(c) == 0 or np.median(b) <= 0:
        d.rule = "no repetitions on one side"
        return d
    d.effect = float(np.median(c) / np.median(b) - 1.0)
    d.ci = ratio_ci(b, c)
    floor_text = f"noise floor {floor:.1%} ({len(b)} baseline runs" + (f", {len(history)} A/A pairs" if history
                                                                          else "")
    if len(history) < MIN_HISTORY and prior > 0:
        floor_text += f", prior {prior:.0%} until {MIN_HISTORY} earlier A/A runs are in the store"
    floor_text += ")"
    if min_exact_p(len(b), len(c)) >= alpha:
        need = min_runs(alpha)
        d.rule = (f"{len(b)} baseline and {len(c)} candidate runs: a test over runs cannot reach alpha {alpha:g} "
                  f"(needs {need} a side)")
        return d
    d.p_slower, d.p_faster = _p(c, b), _p(b, c)
    if abs(d.effect) <= d.threshold:
        d.verdict = "pass"
        d.rule = f"|{d.effect:+.1%}| within max(tolerance {tol:.1%}, {floor_text})"
    elif d.effect > 0 and d.p_slower < alpha:
        d.verdict = "regression"
        d.rule = f"{d.effect:+.1%} beyond max(tolerance {tol:.1%}, {floor_text}), p={d.p_slower:.2g} < {alpha:g}"
    elif d.effect < 0 and d.p_faster < alpha:
        d.verdict = "improved"
        d.rule = f"{d.effect:+.1%} beyond max(tolerance {tol:.1%}, {floor_text}), p={d.p_faster:.2g} < {alpha:g}"
    else:
        p = d.p_slower if d.effect > 0 else d.p_faster
        d.rule = (f"{d.effect:+.1%} beyond max(tolerance {tol:.1%}, {floor_text}) but not with confidence "
                  f"(p={p:.2g} >= {alpha:g} over runs)")
    return d
