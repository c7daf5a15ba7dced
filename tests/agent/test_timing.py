"""Timing protocol and statistics, on known samples and with a fake clock."""
from __future__ import annotations

import time
from typing import Any, Callable, Optional, Tuple

import numpy as np
import pytest

from agent import JobTimeout
from agent.schema import TimingSpec
from agent.timing import (Measurement, drift, latency_stats, make_input, measure, stability_warnings, subsample,
                          summarise, warmup)


class FakeClock:
    """perf_counter_ns stand-in; each fake inference advances it by ``step_ns``."""

    def __init__(self, step_ns: int) -> None:
        self.now = 1_000_000_000
        self.step_ns = step_ns
        self.calls = 0

    def __call__(self) -> int:
        return self.now

    def run(self, x: Any) -> None:
        self.calls += 1
        self.now += self.step_ns


def fake(step_ms: float = 1.0) -> Tuple[FakeClock, Callable[[Any], None]]:
    c = FakeClock(int(step_ms * 1e6))
    return c, c.run


def spec(**kw: Any) -> TimingSpec:
    base = dict(warmup_iters=0, warmup_s=0.0, min_iters=1, min_duration_s=0.0, max_iters=100000,
                max_duration_s=100.0)
    base.update(kw)
    return TimingSpec(**base)  # type: ignore[arg-type]


def test_latency_stats_on_known_samples() -> None:
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 5.0])
    assert (s.mean, s.median, s.min, s.max) == (3.0, 3.0, 1.0, 5.0)
    assert s.p90 == pytest.approx(4.6) and s.p99 == pytest.approx(4.96)  # linear interpolation
    assert s.std == pytest.approx(np.sqrt(2.5))  # ddof=1
    assert s.cv == pytest.approx(np.sqrt(2.5) / 3.0)


def test_latency_stats_single_sample_has_zero_spread() -> None:
    s = latency_stats([2.5])
    assert (s.mean, s.p99, s.std, s.cv) == (2.5, 2.5, 0.0, 0.0)
    with pytest.raises(ValueError):
        latency_stats([])


def test_cv_warning_names_both_numbers() -> None:
    samples = [1.0, 2.0, 3.0, 4.0, 5.0]
    w = stability_warnings(samples, latency_stats(samples), 0.10)
    assert any(m.startswith("latency CV 0.53 exceeds 0.10: measurements unstable") for m in w)
    steady = [1.0, 1.01, 0.99] * 10
    assert stability_warnings(steady, latency_stats(steady), 0.10) == []


def test_drift_between_first_and_last_third_is_warned() -> None:
    samples = [1.0] * 10 + [1.1] * 10 + [1.3] * 10
    assert drift(samples) == (1.0, 1.3)
    w = stability_warnings(samples, latency_stats(samples), cv_warn=1.0)
    assert len(w) == 1 and "drifted +30%" in w[0]
    assert drift([1.0, 2.0]) is None


def test_subsample_is_even_and_bounded() -> None:
    assert subsample(list(range(10)), 20) == list(range(10))
    assert subsample(list(range(10)), 5) == [0, 2, 4, 6, 8]
    kept = subsample(list(range(1000)), 7)
    assert len(kept) == 7 and len(set(kept)) == 7 and kept[0] == 0
    assert subsample([1.0, 2.0], 0) == []


def test_make_input_is_seeded_and_batched() -> None:
    a = make_input([1, 3, 8, 8], 4, seed=3)
    assert a.shape == (4, 3, 8, 8) and a.dtype == np.float32
    assert np.array_equal(a, make_input([1, 3, 8, 8], 4, seed=3))
    assert not np.array_equal(a, make_input([1, 3, 8, 8], 4, seed=4))
    assert abs(float(a.mean())) < 0.2 and 0.8 < float(a.std()) < 1.2  # standard normal


def test_warmup_needs_both_iterations_and_seconds() -> None:
    clock, run = fake(1.0)
    assert warmup(run, None, spec(warmup_iters=3, warmup_s=0.010), clock=clock) == 10
    clock, run = fake(1.0)
    assert warmup(run, None, spec(warmup_iters=20, warmup_s=0.005), clock=clock) == 20


def test_warmup_past_the_deadline_times_out() -> None:
    clock, run = fake(1.0)
    with pytest.raises(JobTimeout, match="warm-up"):
        warmup(run, None, spec(warmup_iters=1000), stop_at_ns=clock.now + 5_000_000, clock=clock)
    assert clock.calls == 5


@pytest.mark.parametrize("min_iters, min_s, expected", [(10, 0.050, 50), (100, 0.010, 100), (1, 0.0, 1)])
def test_measure_runs_until_both_minimums(min_iters: int, min_s: float, expected: int) -> None:
    clock, run = fake(1.0)
    m = measure(run, None, spec(min_iters=min_iters, min_duration_s=min_s), clock=clock)
    assert len(m.samples_ns) == expected and m.stop_reason == "min_reached"
    assert all(s == 1_000_000 for s in m.samples_ns) and m.duration_ns == expected * 1_000_000


def test_measure_stops_at_max_iters_and_max_duration() -> None:
    clock, run = fake(1.0)
    m = measure(run, None, spec(min_iters=5, max_iters=20, min_duration_s=1.0, max_duration_s=1.0), clock=clock)
    assert (len(m.samples_ns), m.stop_reason) == (20, "max_iters")
    clock, run = fake(1.0)
    m = measure(run, None, spec(min_iters=1000, max_iters=5000, max_duration_s=0.030), clock=clock)
    assert (len(m.samples_ns), m.stop_reason) == (30, "max_duration")
    clock, run = fake(1.0)
    m = measure(run, None, spec(min_iters=1000, max_iters=5000), stop_at_ns=clock.now + 7_000_000, clock=clock)
    assert (len(m.samples_ns), m.stop_reason) == (7, "deadline")


def test_measure_with_the_real_clock_obeys_the_minimums() -> None:
    calls = []

    def run(x: Any) -> None:
        calls.append(1)
        time.sleep(0.0005)

    m = measure(run, None, spec(min_iters=20, min_duration_s=0.05))
    assert len(m.samples_ns) >= 20 and m.duration_ns >= 50_000_000 and len(calls) == len(m.samples_ns)
    assert min(m.samples_ns) >= 500_000


def summary(m: Measurement, s: TimingSpec, protocol: Optional[dict] = None) -> Any:
    return summarise(m, s, protocol or {}, load_time_ms=5.0, first_inference_ms=3.0, warmup_iters_done=2)


def test_summarise_throughput_and_kept_samples() -> None:
    m = Measurement(samples_ns=[2_000_000] * 100, duration_ns=250_000_000, stop_reason="min_reached")
    result, warnings = summary(m, spec(batch_size=4, keep_samples=10, min_iters=100))
    assert result.iterations == 100 and result.duration_s == 0.25
    assert result.throughput_ips == pytest.approx(4 * 100 / 0.25)
    assert result.latency_ms.mean == 2.0 and len(result.samples_ms) == 10
    assert result.protocol["samples_subsampled"] is True and result.protocol["samples_kept"] == 10
    assert (result.load_time_ms, result.first_inference_ms, result.warmup_iters_done) == (5.0, 3.0, 2)
    assert warnings == []


def test_summarise_warns_when_a_maximum_cut_the_window_short() -> None:
    m = Measurement(samples_ns=[1_000_000] * 30, duration_ns=30_000_000, stop_reason="max_duration")
    _, warnings = summary(m, spec(min_iters=1000, max_duration_s=0.03, min_duration_s=0.01))
    assert warnings == ["timing stopped by max_duration_s=0.03 after 30 iterations, short of min_iters=1000"]
