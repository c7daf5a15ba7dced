"""The regression gate's statistics: a one-sided Mann–Whitney U test, a bootstrap CI of a median ratio, thinning.

Contract: pure functions of two samples (baseline ``a``, candidate ``b``; numpy, the test from scipy.stats);
non-finite values are dropped.
The decision rule that uses them is in :mod:`host.results.regress` (docstring) and :mod:`.checks`.
"""
from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np


MAX_TEST_SAMPLES = 1000


N_BOOT = 2000


def clean(x: Any) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def mann_whitney_greater(a: Any, b: Any) -> float:
    """One-sided p-value that ``b`` is stochastically greater than ``a`` (candidate ``b`` slower than baseline ``a``):
    ``scipy.stats.mannwhitneyu(b, a, alternative="greater", method="asymptotic")`` (normal approximation, tie and
    continuity correction). Non-finite values are dropped; all values equal gives 1.0 (no evidence)."""
    from scipy import stats

    x, y = clean(b), clean(a)
    if len(x) == 0 or len(y) == 0:
        raise ValueError("mann_whitney_greater needs at least one finite value on each side")
    p = float(stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic").pvalue)
    return 1.0 if math.isnan(p) else p


def median_ratio_ci(a: Any, b: Any, seed: int = 0, n_boot: int = N_BOOT) -> Tuple[float, float]:
    """Bootstrap 95 % percentile CI of median(b) / median(a): ``n_boot`` i.i.d. resamples of each side, drawn
    vectorised and exactly through the order statistics (:func:`_boot_medians`), ``numpy.random.default_rng(seed)``."""
    x, y = clean(a), clean(b)
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
