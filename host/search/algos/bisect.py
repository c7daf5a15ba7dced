"""``bisect``: searches the global pruning ratio against monotone fits of the measured metrics.

Per resource target it fits a monotone (isotonic) model of the measured metric against the candidates' MACs,
and steps to where the fit crosses the bound: a secant between the measured points that bracket it, or an
extrapolation from the lowest measured point (slope from the two lowest, or a prior "fixed share +
MACs-proportional share" model after the dense measurement alone). The global ratio becomes per-group ratios by
sensitivity (:func:`host.search.algos.base.allocate`), or, with ``allocation="latency"``, by the latency each group
buys per accuracy lost (the device's layer-latency table, measured once after the dense model:
:func:`host.search.algos.latency.group_gains`). Stopping rules, step limits and cheap probes
(``probe_recovery``): see :mod:`host.search.algos`. Plain arithmetic over the shared types of
:mod:`host.search.algos.base`; no torch, no files, no devices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Generator, List, Mapping, Optional, Sequence, Tuple

from host.fleet.targets import METRICS, Bounds
from host.search.algos.base import Candidate, DeviceContext, DeviceEval, LayerLatency, SearchAlgorithm, Work
from host.search.algos.latency import LutEstimator, group_gains, lut_configs

# ------------------------------------------------------------------------------------------ fitting helpers

def isotonic(ys: Sequence[float]) -> List[float]:
    """Least-squares non-decreasing fit of ``ys`` (pool adjacent violators)."""
    blocks: List[List[float]] = []   # [sum, count]
    for y in ys:
        blocks.append([float(y), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out: List[float] = []
    for s, c in blocks:
        out += [s / c] * int(c)
    return out


def as_cost(metric: str, value: float) -> float:
    """A metric as a cost that grows with MACs: throughput becomes ms per image."""
    if METRICS[metric].at_most:
        return value
    return 1000.0 / value if value > 0 else math.inf


def required_macs(points: Sequence[Tuple[int, float]], limit: float, dense_macs: int, dense_cost: float,
                  prior_fixed: float) -> float:
    """The MACs at which a monotone (isotonic) fit of cost against MACs reaches ``limit``; ``inf`` when every
    measured point is within it. Secant between the bracketing points, else extrapolation below the lowest."""
    pts = sorted(points)
    xs = [float(x) for x, _ in pts]
    fit = isotonic([y for _, y in pts])
    if fit[-1] <= limit:
        return math.inf
    if fit[0] > limit:  # all over the bound: extrapolate below the lowest-MACs point
        x0, y0 = xs[0], fit[0]
        prior = dense_cost * (1.0 - prior_fixed) / max(1.0, float(dense_macs))
        slope = prior
        for x, y in zip(xs[1:], fit[1:]):
            if x > x0:
                slope = max((y - y0) / (x - x0), 0.25 * prior)
                break
        return x0 - (y0 - limit) / slope
    i = max(j for j, y in enumerate(fit) if y <= limit)
    x_lo, y_lo, x_hi, y_hi = xs[i], fit[i], xs[i + 1], fit[i + 1]
    return x_lo + (limit - y_lo) * (x_hi - x_lo) / (y_hi - y_lo)


def ratio_for_macs(macs_at: Callable[[float], int], target: float, r_max: float) -> float:
    """The smallest ratio in [0, r_max] whose MACs are at most ``target`` (r_max when none is)."""
    if macs_at(0.0) <= target:
        return 0.0
    if macs_at(r_max) > target:
        return r_max
    lo, hi = 0.0, r_max
    for _ in range(40):
        mid = (lo + hi) / 2
        if macs_at(mid) <= target:
            hi = mid
        else:
            lo = mid
    # on a 1e-6 grid, rounded up (still at most ``target``): bisection leaves 0.49999999994 for 0.5, which the
    # channel rounding of kept_channels would turn into a different candidate than the ratio it prints as
    up = math.ceil(hi * 1e6) / 1e6
    return up if up <= r_max and macs_at(up) <= target else hi


@dataclass
class Point:
    """One device evaluation as the algorithms see it."""

    candidate: Candidate
    macs: int
    metrics: Dict[str, float]
    resources_ok: bool

    @property
    def ratio(self) -> float:
        return self.candidate.ratio


class Bisect(SearchAlgorithm):
    name = "bisect"

    def run(self, ctx: DeviceContext) -> Generator[Work, Any, str]:
        o = ctx.options
        dense, bounds, stop = yield from self._dense(ctx)
        if stop or bounds is None or dense is None:
            return stop
        if o.allocation == "latency":   # the device's layer table: each group's latency saved per channel removed
            lut = yield LayerLatency(lut_configs(ctx.space, ctx.round_to, o.netadapt_levels, o.max_ratio))
            est = LutEstimator(ctx.space, lut, dense.metrics.get("latency_p50_ms", 1.0), ctx.round_to,
                               o.netadapt_levels, o.max_ratio)
            ctx.gain = group_gains(ctx.space, est, ctx.round_to, o.netadapt_levels, o.max_ratio)
        pts = [Point(ctx.dense(), ctx.space.dense_macs, dense.metrics, False)]
        # cheap probes leave one evaluation for the chosen one, fully recovered
        reserve = 0 if o.probe_recovery == "full" else 1
        reason = yield from self._search(ctx, bounds, pts, reserve)
        if o.probe_recovery == "full" or reason.startswith("device error"):
            return reason
        # probes were built with a cheaper recovery (latency does not depend on the weights): the most accurate
        # resource-feasible one (the lowest ratio) gets the full recovery and is measured once more
        feas = [p for p in pts if p.resources_ok]
        if not feas:
            return reason
        best = self._final(bounds, feas, o.final_margin)
        if ctx.evals >= ctx.max_evals:
            return f"{reason}; no evaluation left for the fully recovered candidate (--max-evals {ctx.max_evals})"
        final = replace(best.candidate, recovery="full", note="final, full recovery")
        m = yield DeviceEval(final)
        if not m.ok:
            return f"device error: {m.error}"
        return f"{reason}; ratio {best.ratio:.3f} measured again with full recovery"

    def _search(self, ctx: DeviceContext, bounds: Bounds, pts: List[Point],
                reserve: int = 0) -> Generator[Work, Any, str]:
        o = ctx.options
        seen = {ctx.dense()}
        r_max = o.max_ratio
        while True:
            if ctx.evals >= ctx.max_evals - reserve:
                return f"--max-evals {ctx.max_evals} reached" + (" (one kept for the final candidate)"
                                                                 if reserve else "")
            feas = [p for p in pts if p.resources_ok]
            best = min(feas, key=lambda p: p.ratio) if feas else None
            lo = max((p.ratio for p in pts if not p.resources_ok and (best is None or p.ratio < best.ratio)),
                     default=0.0)
            hi = best.ratio if best is not None else r_max
            if best is not None:
                slack = self._slack(bounds, best.metrics)
                if slack <= o.slack_tol:
                    return f"binding target within {slack:.1%} of its bound at ratio {best.ratio:.3f}"
                if hi - lo <= o.ratio_tol:
                    return f"bracketed: ratio in ({lo:.3f}, {hi:.3f}], narrower than {o.ratio_tol}"
            elif lo >= r_max - 1e-9:
                return f"resource targets not met even at the maximum ratio {r_max:g}"
            r = self._next_ratio(ctx, pts, bounds, lo, hi, best is not None)
            cand = ctx.candidate(r, o.probe_recovery)
            # a small step is not worth a device evaluation when the best candidate is already acceptable, or when
            # it names channels already measured; when the best fails the accuracy bound and the step is a new
            # channel configuration (alignment makes a small ratio step a whole block of channels), it is
            if best is not None and best.ratio - r < o.ratio_tol and (
                    cand in seen or bounds.assess(best.metrics).meets_accuracy):
                return (f"the next step (ratio {r:.3f}) would lower the ratio of the best candidate ({best.ratio:.3f}) "
                        f"by less than {o.ratio_tol}")
            if cand in seen:
                cand = self._untested(ctx, seen, lo, hi, r, bracketed=best is not None)
                if cand is None and best is None:
                    return (f"resource targets not met even at the maximum ratio {r_max:g} (ratio {lo:.3f} keeps "
                            f"the same channels with round_to={ctx.round_to})")
                if cand is None:
                    return (f"no untested candidate between ratios {lo:.3f} and {hi:.3f} (channel alignment "
                            f"round_to={ctx.round_to} makes them identical)")
            seen.add(cand)
            m = yield DeviceEval(cand)
            if m.skipped:
                return f"probe time spent ({m.error})"
            if not m.ok:
                return f"device error: {m.error}"
            pts.append(Point(cand, ctx.macs(cand), m.metrics, bounds.assess(m.metrics).meets_resources))

    @classmethod
    def _final(cls, bounds: Bounds, feas: List[Point], margin: float) -> Point:
        """The probe to recover fully: the lowest ratio (the most accurate) among the feasible ones at least
        ``margin`` inside the binding bound, else the feasible one furthest inside. Found in the issue-17 curve
        run at 1.4x: the lowest feasible probe was 1.4 % inside its bound, and measured again after its full
        recovery it was 0.2 % past it, while a probe 7.6 % inside had been measured too."""
        safe = [p for p in feas if cls._slack(bounds, p.metrics) >= margin]
        if safe:
            return min(safe, key=lambda p: p.ratio)
        return max(feas, key=lambda p: (cls._slack(bounds, p.metrics), -p.ratio))

    @staticmethod
    def _slack(bounds: Bounds, metrics: Mapping[str, float]) -> float:
        """How far inside its bound the binding metric is (relative); 0 at the bound."""
        slacks = []
        for m, limit in bounds.limits.items():
            v = metrics.get(m)
            if v is None:
                return 0.0
            slacks.append(1.0 - as_cost(m, v) / as_cost(m, limit))
        return min(slacks, default=0.0)

    @staticmethod
    def _next_ratio(ctx: DeviceContext, pts: List[Point], bounds: Bounds, lo: float, hi: float,
                    bracketed: bool) -> float:
        o = ctx.options
        dense = pts[0]
        target = math.inf
        for metric, limit in bounds.limits.items():
            data = [(p.macs, as_cost(metric, p.metrics[metric])) for p in pts if metric in p.metrics]
            if not data:
                continue
            target = min(target, required_macs(data, as_cost(metric, limit) * (1 - o.aim_margin), dense.macs,
                                               as_cost(metric, dense.metrics[metric]), o.prior_fixed_fraction))
        r = ratio_for_macs(lambda x: ctx.macs(ctx.candidate(x)), target, o.max_ratio)
        if bracketed:
            margin = min(o.ratio_tol / 2, (hi - lo) / 4)
            if r <= lo:
                r = (lo + hi) / 2        # the fit contradicts the bracket (noise): bisect it
            return min(max(r, lo + margin), hi - margin)
        if lo > 0:  # extrapolating from measured points: at least min_step, at most max_step past the last miss
            r = min(max(r, lo + o.min_step), lo + o.max_step)
        return min(o.max_ratio, r)

    @staticmethod
    def _untested(ctx: DeviceContext, seen: set, lo: float, hi: float, r: float,
                  bracketed: bool) -> Optional[Candidate]:
        """The untested candidate nearest to ratio ``r`` strictly between ``lo`` and ``hi`` (``hi`` included
        when not bracketed)."""
        steps = 200
        best: Optional[Tuple[float, Candidate]] = None
        for i in range(1, steps + 1):
            x = lo + (hi - lo) * i / steps
            if bracketed and i == steps:
                break
            c = ctx.candidate(x, ctx.options.probe_recovery)
            if c not in seen and (best is None or abs(x - r) < best[0]):
                best = (abs(x - r), c)
        return best[1] if best else None
