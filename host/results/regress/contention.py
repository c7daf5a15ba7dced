"""Contention in one timed window, as the release gate sees it.

The gate compares windows by their median latency. Contention only ever slows a window, so in a baseline window it
can only hide a regression; in a candidate's it can fake one, and before a regression stands the candidate's
windows that report contention (the agent's CV or drift warning, :func:`agent.timing.stability_warnings`) are
discounted:

- a window whose median drifted between the first and last third saw its level change: left out;
- otherwise the CV warning's usual cause is the CPU being shared: the agent's process waits out another's time
  slice, and the samples that include the wait are stalls, several times the others (measured on this 2-core VM
  with a busy process on the agent's CPU: 8 % of a ResNet-20 window's samples at the median, up to 27 %). The
  median resists them, but not entirely (up to +7 % in that run), so a contended window counts with the median of
  its samples within ``STALL`` x its 10th percentile: stalls removed, never more than the window's own median;
- if what remains still varies by more than the job's ``cv_warn`` (the steadiness the agent asks of every
  window), the contention was not only stalls (a slower neighbour, a frequency change): left out, as is a window
  with fewer than ``MIN_SAMPLES`` samples before or after the stalls are removed.

What counts is then as steady as a window without a warning, and no higher than its own median. It is not proof
that nothing slowed it: contention that slows every sample alike leaves no trace in a window, with or without a
warning. For energy the checks leave contended windows out whole (the power reading carries the contention).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from agent.schema import TimingSpec
from agent.timing import latency_stats

UNSTABLE = ("latency CV", "latency drifted")     # agent.timing.stability_warnings: the window saw contention
DRIFT = "latency drifted"
STALL = 1.5          # a sample slower than 1.5 x the window's 10th percentile waited for the CPU (quiet: < 2.5 %)
MIN_SAMPLES = 20     # fewer kept samples than this: no distribution to read stalls from


def contended(warnings: Optional[Sequence[Any]]) -> bool:
    """Whether the agent warned that this window's timings were unstable (contention)."""
    return any(str(w).startswith(UNSTABLE) for w in (warnings or []))


def discounted(median: float, samples: Optional[Sequence[float]], warnings: Optional[Sequence[Any]],
               cv_warn: Optional[float] = None) -> Optional[float]:
    """The window's median latency with contention discounted: the median itself for a window without a
    contention warning; the median of its samples within ``STALL`` x their 10th percentile for one whose
    instability was stalls; None (leave it out) for a drifted window, one without samples, or one that still
    varies by more than ``cv_warn`` without its stalls."""
    if not contended(warnings):
        return float(median)
    if any(str(w).startswith(DRIFT) for w in (warnings or [])):
        return None
    a = np.asarray([float(s) for s in (() if samples is None else samples) if s is not None], dtype=np.float64)
    a = a[np.isfinite(a) & (a > 0)]
    if a.size < MIN_SAMPLES:
        return None
    kept = a[a <= STALL * np.percentile(a, 10)]
    if kept.size < MIN_SAMPLES:
        return None
    if latency_stats(kept).cv > (TimingSpec.cv_warn if cv_warn is None else float(cv_warn)):     # the agent's CV
        return None
    return min(float(median), float(np.median(kept)))


def row_cv_warn(row: Mapping[str, Any]) -> Optional[float]:
    """The cv_warn a stored measurement's job timed it with (None when not recorded)."""
    v = ((row.get("job") or {}).get("timing") or {}).get("cv_warn")
    return float(v) if isinstance(v, (int, float)) else None
