"""The timing protocol and its statistics.

Protocol (the same on every device, recorded in the report's ``timing.protocol``):

1. input: ``numpy.random.default_rng(seed).standard_normal(shape)`` cast to the input dtype, with the batch
   dimension set to ``batch_size``; the same array is fed on every call;
2. warm-up: run until BOTH ``warmup_iters`` calls and ``warmup_s`` seconds are done;
3. cooldown: sleep ``cooldown_s`` if set (outside the measured window);
4. measure: time each call with ``time.perf_counter_ns`` until BOTH ``min_iters`` calls and ``min_duration_s``
   seconds are done, stopping early at ``max_iters`` calls or ``max_duration_s`` seconds (or the job deadline).

The loops return plain data; :func:`summarise` turns samples into statistics and warnings.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from agent import JobTimeout
from agent.schema import LatencyStats, TimingResult, TimingSpec

DRIFT_WARN = 0.10  # relative change of the median between the first and last third of the samples

RunFn = Callable[[np.ndarray], Any]
Clock = Callable[[], int]


@dataclass
class Measurement:
    samples_ns: List[int]
    duration_ns: int          # wall time of the measured window, first call start to last call end
    stop_reason: str          # "min_reached" | "max_iters" | "max_duration" | "deadline"


def make_input(input_shape: Sequence[int], batch_size: int, seed: int, dtype: str = "float32") -> np.ndarray:
    shape = [batch_size] + list(input_shape[1:])
    return np.random.default_rng(seed).standard_normal(shape).astype(np.dtype(dtype))


def warmup(run: RunFn, x: np.ndarray, spec: TimingSpec, stop_at_ns: Optional[int] = None,
           clock: Clock = time.perf_counter_ns) -> int:
    """Run until both ``warmup_iters`` and ``warmup_s`` are reached; raise JobTimeout past ``stop_at_ns``."""
    start = clock()
    min_ns = int(spec.warmup_s * 1e9)
    n = 0
    while n < spec.warmup_iters or clock() - start < min_ns:
        if stop_at_ns is not None and clock() >= stop_at_ns:
            raise JobTimeout("job timeout reached during warm-up after %d iterations" % n)
        run(x)
        n += 1
    return n


def measure(run: RunFn, x: np.ndarray, spec: TimingSpec, stop_at_ns: Optional[int] = None,
            clock: Clock = time.perf_counter_ns) -> Measurement:
    """Time each call until both minimums are reached, or a maximum (or ``stop_at_ns``) cuts the window."""
    min_ns = int(spec.min_duration_s * 1e9)
    start = clock()
    limit = start + int(spec.max_duration_s * 1e9)
    deadline_first = stop_at_ns is not None and stop_at_ns < limit
    if deadline_first:
        limit = stop_at_ns  # type: ignore[assignment]
    samples: List[int] = []
    end = start
    while True:
        t0 = clock()
        run(x)
        end = clock()
        samples.append(end - t0)
        n = len(samples)
        if n >= spec.min_iters and end - start >= min_ns:
            reason = "min_reached"
            break
        if n >= spec.max_iters:
            reason = "max_iters"
            break
        if end >= limit:
            reason = "deadline" if deadline_first else "max_duration"
            break
    return Measurement(samples, end - start, reason)


def latency_stats(samples_ms: Sequence[float]) -> LatencyStats:
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    mean = float(a.mean())
    std = float(a.std(ddof=1)) if a.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))  # linear interpolation (default)
    return LatencyStats(mean=mean, median=p50, p90=p90, p99=p99, min=float(a.min()), max=float(a.max()),
                        std=std, cv=std / mean if mean > 0 else 0.0)


def drift(samples_ms: Sequence[float]) -> Optional[Tuple[float, float]]:
    """Medians of the first and last third of the samples, or None with fewer than 3 samples."""
    n = len(samples_ms) // 3
    if n == 0:
        return None
    return float(np.median(samples_ms[:n])), float(np.median(samples_ms[-n:]))


def stability_warnings(samples_ms: Sequence[float], stats: LatencyStats, cv_warn: float) -> List[str]:
    warnings = []
    if stats.cv > cv_warn:
        warnings.append("latency CV %.2f exceeds %.2f: measurements unstable (background load, frequency "
                        "scaling or throttling?); pin CPUs, lengthen min_duration_s or add a cooldown"
                        % (stats.cv, cv_warn))
    d = drift(samples_ms)
    if d is not None and d[0] > 0 and abs(d[1] - d[0]) / d[0] > DRIFT_WARN:
        warnings.append("latency drifted %+.0f%% between the first and last third of the timed window "
                        "(median %.3f -> %.3f ms): thermal throttling or changing background load?"
                        % (100.0 * (d[1] - d[0]) / d[0], d[0], d[1]))
    return warnings


def stop_warnings(m: Measurement, spec: TimingSpec) -> List[str]:
    n, secs = len(m.samples_ns), m.duration_ns / 1e9
    if m.stop_reason == "max_iters" and secs < spec.min_duration_s:
        return ["timing stopped at max_iters=%d after %.2f s, short of min_duration_s=%g"
                % (spec.max_iters, secs, spec.min_duration_s)]
    if m.stop_reason in ("max_duration", "deadline") and n < spec.min_iters:
        cause = "max_duration_s=%g" % spec.max_duration_s if m.stop_reason == "max_duration" else "the job timeout"
        return ["timing stopped by %s after %d iterations, short of min_iters=%d" % (cause, n, spec.min_iters)]
    if m.stop_reason == "deadline" and secs < spec.min_duration_s:
        return ["timing stopped by the job timeout after %.2f s, short of min_duration_s=%g"
                % (secs, spec.min_duration_s)]
    return []


def subsample(samples: Sequence[float], keep: int) -> List[float]:
    """At most ``keep`` samples, evenly spaced over the run (all of them when there are few enough)."""
    n = len(samples)
    if n <= keep:
        return list(samples)
    return [samples[i * n // keep] for i in range(keep)]


def summarise(m: Measurement, spec: TimingSpec, protocol: Dict[str, Any], load_time_ms: float,
              first_inference_ms: float, warmup_iters_done: int) -> Tuple[TimingResult, List[str]]:
    """The report's timing section and its warnings (stability, drift, a window cut short)."""
    samples_ms = [s / 1e6 for s in m.samples_ns]
    stats = latency_stats(samples_ms)
    kept = subsample(samples_ms, spec.keep_samples)
    protocol = dict(protocol, stop_reason=m.stop_reason, samples_kept=len(kept),
                    samples_subsampled=len(kept) < len(samples_ms))
    duration_s = m.duration_ns / 1e9
    n = len(samples_ms)
    result = TimingResult(protocol=protocol, load_time_ms=load_time_ms, first_inference_ms=first_inference_ms,
                          warmup_iters_done=warmup_iters_done, iterations=n, duration_s=duration_s,
                          batch_size=spec.batch_size, latency_ms=stats,
                          throughput_ips=spec.batch_size * n / duration_s if duration_s > 0 else 0.0,
                          samples_ms=kept)
    return result, stop_warnings(m, spec) + stability_warnings(samples_ms, stats, spec.cv_warn)
