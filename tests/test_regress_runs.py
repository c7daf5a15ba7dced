"""Run-level decisions of the release gate (host.results.regress.runs): verdicts over repetitions, not samples."""
from __future__ import annotations

import numpy as np
import pytest

from host.results.regress import runs
from host.results.regress.stats import mann_whitney_greater


def test_repetitions_needed_for_alpha():
    assert runs.min_exact_p(3, 3) == pytest.approx(1 / 20) and runs.min_exact_p(5, 5) == pytest.approx(1 / 252)
    assert runs.min_runs(0.01) == 5 and runs.min_runs(0.05) == 4


def test_noise_floor_from_the_baseline_runs_and_a_a_history():
    assert runs.noise_floor([1.00, 1.02, 0.99, 1.01, 1.00]) == pytest.approx(0.02)
    assert runs.noise_floor([1.0, 1.0, 1.0], history=[0.031, -0.045]) == pytest.approx(0.045)
    assert runs.noise_floor([1.0]) == 0.0


def test_a_a_within_noise_passes_and_a_real_slowdown_regresses():
    rng = np.random.default_rng(1)
    base = 1.0 + rng.normal(0, 0.01, 5)
    same = 1.0 + rng.normal(0, 0.01, 5)
    d = runs.decide(base, same, tol=0.05)
    assert d.verdict == "pass" and "within max(tolerance 5.0%" in d.rule
    slow = 1.10 * (1.0 + rng.normal(0, 0.01, 5))
    d = runs.decide(base, slow, tol=0.05)
    assert d.verdict == "regression" and d.p_slower < 0.01 and 1.05 < d.ci[0] < d.ci[1] < 1.16, d
    fast = 0.85 * base
    assert runs.decide(base, fast, tol=0.05).verdict == "improved"


def test_a_shift_inside_the_noise_floor_is_not_a_regression():
    # a baseline whose own runs wander by 9 %: +8 % is noise on this device, whatever the tolerance
    base = [1.00, 1.09, 0.97, 1.02, 1.00]
    d = runs.decide(base, [1.08] * 5, tol=0.05)
    assert d.noise_floor == pytest.approx(0.09) and d.threshold == pytest.approx(0.09) and d.verdict == "pass"


def test_too_few_repetitions_or_no_confidence_is_inconclusive():
    d = runs.decide([1.0, 1.01, 0.99], [1.2, 1.21, 1.19], tol=0.05)
    assert d.verdict == "inconclusive" and "cannot reach alpha 0.01 (needs 5 a side)" in d.rule
    # beyond the threshold on the medians, but the runs overlap: no confidence
    d = runs.decide([1.0, 1.0, 1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.3, 1.3, 1.3, 0.99], tol=0.05, history=[0.02])
    assert d.verdict == "inconclusive" and "not with confidence" in d.rule, d


def test_sample_level_test_is_scipy_s():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a, b = rng.lognormal(0, 0.1, 300), rng.lognormal(0.01, 0.1, 400)
    assert mann_whitney_greater(a, b) == stats.mannwhitneyu(b, a, alternative="greater", method="asymptotic").pvalue
