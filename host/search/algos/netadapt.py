"""``netadapt``: NetAdapt (Yang et al., ECCV 2018) with a per-device layer-latency lookup table.

The table times each layer configuration alone on the device (once, cached by the host); iterations lower the
table's latency estimate by a decaying step, one proposal per group scored on the host, the most accurate kept;
when the estimate meets the target the candidate is fully recovered and measured on the device (details:
:mod:`host.search.algos`). Plain arithmetic over the shared types of :mod:`host.search.algos.base`; no torch, no
files, no devices.
"""
from __future__ import annotations

import bisect as _bisect
from dataclasses import dataclass
from typing import Any, Dict, Generator, List, Mapping, Optional, Sequence, Tuple

from edgeprune.prune import kept_channels
from host.fleet.targets import Bounds
from host.search.algos.base import (Candidate, DeviceContext, DeviceEval, HostEval, Layer, LayerConfig,
                                    LayerLatency, ModelSpace, SearchAlgorithm, Work)

# ------------------------------------------------------------------------------------------ NetAdapt


def lut_configs(space: ModelSpace, round_to: int, levels: Sequence[float], max_ratio: float) -> List[LayerConfig]:
    """Every layer configuration a NetAdapt lookup table needs: each affected layer dense, and with each of its
    groups alone at each width level (rounded as the device aligns channels)."""
    out: Dict[str, LayerConfig] = {}
    for layer in space.affected_layers():
        out.setdefault(layer.config.key(), layer.config)
        for g in {x for x in (layer.in_group, layer.out_group) if x}:
            for k in level_counts(space, g, round_to, levels, max_ratio):
                cfg = layer.shaped({g: k})
                out.setdefault(cfg.key(), cfg)
    return list(out.values())


def level_counts(space: ModelSpace, group: str, round_to: int, levels: Sequence[float], max_ratio: float) -> List[int]:
    n = space.group(group).channels
    ks = {kept_channels(n, min(1.0 - f, max_ratio), space.group(group).step(round_to), space.min_channels)
          for f in levels}
    return sorted((k for k in ks if k < n), reverse=True)


def _interp(points: Sequence[Tuple[int, float]], k: int) -> float:
    """Piecewise-linear in the kept count; linear extrapolation below the smallest, floored at 0."""
    pts = sorted(points)
    xs = [p[0] for p in pts]
    if len(pts) == 1:
        return pts[0][1]
    i = _bisect.bisect_left(xs, k)
    if i < len(xs) and xs[i] == k:
        return pts[i][1]
    if i == 0:
        (x0, y0), (x1, y1) = pts[0], pts[1]
    elif i == len(xs):
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
    else:
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
    return max(0.0, y0 + (k - x0) * (y1 - y0) / (x1 - x0))


class LutEstimator:
    """A candidate's latency from a layer-latency table: the dense model's measured latency minus, per layer,
    what its table latency drops by at the candidate's widths; ``scale`` is calibrated against measurements."""

    def __init__(self, space: ModelSpace, lut: Mapping[str, float], dense_ms: float, round_to: int,
                 levels: Sequence[float], max_ratio: float) -> None:
        self.space, self.dense_ms, self.scale = space, dense_ms, 1.0
        self._tables: List[Tuple[Layer, float, Dict[str, List[Tuple[int, float]]]]] = []
        for layer in space.affected_layers():
            base = lut[layer.config.key()]
            per_group: Dict[str, List[Tuple[int, float]]] = {}
            for g in {x for x in (layer.in_group, layer.out_group) if x}:
                pts = [(space.group(g).channels, base)]
                pts += [(k, lut[layer.shaped({g: k}).key()])
                        for k in level_counts(space, g, round_to, levels, max_ratio)]
                per_group[g] = pts
            self._tables.append((layer, base, per_group))

    def layer_ms(self, layer: Layer, base: float, per_group: Mapping[str, List[Tuple[int, float]]],
                 kept: Mapping[str, int]) -> float:
        ms = base
        for g, pts in per_group.items():
            if g in kept:
                ms *= _interp(pts, kept[g]) / base if base > 0 else 1.0
        return ms

    def estimate(self, kept: Mapping[str, int]) -> float:
        saved = sum(base - self.layer_ms(layer, base, pg, kept) for layer, base, pg in self._tables)
        return max(1e-6, (self.dense_ms - saved) * self.scale)


@dataclass
class Proposal:
    group: str
    kept: Dict[str, int]
    estimate_ms: float
    reached: bool


def latency_limit(bounds: Bounds, dense: Mapping[str, float]) -> Optional[float]:
    """The resource bounds as one p50-latency bound (ms), from the dense model's ratios between the metrics
    (energy scales with latency at constant power); None when no bound is latency-like."""
    p50 = dense.get("latency_p50_ms")
    if p50 is None:
        return None
    out = []
    for m, limit in bounds.limits.items():
        v = dense.get(m)
        if m == "latency_p50_ms":
            out.append(limit)
        elif m in ("latency_p90_ms", "energy_mj") and v:
            out.append(limit / v * p50)
        elif m == "throughput_ips" and v:
            out.append(v / limit * p50)
    return min(out) if out else None


class NetAdapt(SearchAlgorithm):
    name = "netadapt"

    def run(self, ctx: DeviceContext) -> Generator[Work, Any, str]:
        o = ctx.options
        space = ctx.space
        dense, bounds, stop = yield from self._dense(ctx)
        if stop or bounds is None or dense is None:
            return stop
        limit = latency_limit(bounds, dense.metrics)
        if limit is None:
            return ("netadapt lowers latency; these targets (power, memory) have no latency equivalent: use "
                    "--algo bisect")
        lut = yield LayerLatency(lut_configs(space, ctx.round_to, o.netadapt_levels, o.max_ratio))
        est = LutEstimator(space, lut, dense.metrics["latency_p50_ms"], ctx.round_to, o.netadapt_levels, o.max_ratio)
        aim = limit * (1 - o.aim_margin)
        cur: Dict[str, int] = {}
        cur_ms = est.estimate(cur)
        d, n = o.netadapt_decay, o.netadapt_iterations
        step0 = (cur_ms - aim) * (1 - d) / (1 - d ** n)
        floor_step = 0.01 * cur_ms
        for k in range(o.netadapt_max_iterations):
            # the scheduled step, but no larger than what one group alone can still give (NetAdapt cuts one group
            # per iteration; a step no group can meet would stall it)
            most = cur_ms - min((est.estimate({**cur, g.name: ks[-1]}) for g in space.groups
                                 for ks in [space.valid_kept(g.name, ctx.round_to, o.max_ratio)]
                                 if ks[-1] < cur.get(g.name, g.channels)), default=cur_ms)
            if most <= 0:
                return f"no group can lose more channels (max ratio {o.max_ratio:g}) after {k} iterations"
            goal = max(aim, cur_ms - min(max(step0 * d ** k, floor_step), 0.9 * most))
            props = self._proposals(ctx, est, cur, goal)
            accs = yield HostEval([Candidate.of(space, p.kept, "short", note=f"netadapt {k + 1}: {p.group}")
                                   for p in props])
            best = max(zip(props, accs), key=lambda pa: (pa[0].reached, pa[1], -pa[0].estimate_ms))[0]
            cur, cur_ms = best.kept, best.estimate_ms
            if cur_ms > aim:
                continue
            if ctx.evals >= ctx.max_evals:
                return f"--max-evals {ctx.max_evals} reached"
            m = yield DeviceEval(Candidate.of(space, cur, "full", note=f"netadapt {k + 1} (full recovery)"))
            if not m.ok:
                return f"device error: {m.error}"
            measured = m.metrics.get("latency_p50_ms", cur_ms)
            if bounds.assess(m.metrics).meets_resources:
                return (f"met after {k + 1} iterations: table estimate {cur_ms:.3f} ms, measured {measured:.3f} ms "
                        f"p50")
            est.scale *= measured / cur_ms   # the table under- or over-estimates on this device: recalibrate
            cur_ms = est.estimate(cur)
        return f"{o.netadapt_max_iterations} iterations without meeting the targets"

    @staticmethod
    def _proposals(ctx: DeviceContext, est: LutEstimator, cur: Dict[str, int], goal: float) -> List[Proposal]:
        o, space = ctx.options, ctx.space
        props: List[Proposal] = []
        for g in space.groups:
            now = cur.get(g.name, g.channels)
            options = [k for k in space.valid_kept(g.name, ctx.round_to, o.max_ratio) if k < now]
            if not options:
                continue
            chosen: Optional[Proposal] = None
            for k in options:  # fewest channels removed first
                kept = {**cur, g.name: k}
                e = est.estimate(kept)
                if e <= goal:
                    chosen = Proposal(g.name, kept, e, True)
                    break
            if chosen is None:
                kept = {**cur, g.name: options[-1]}
                chosen = Proposal(g.name, kept, est.estimate(kept), False)
            props.append(chosen)
        if any(p.reached for p in props):
            props = [p for p in props if p.reached]
        if o.netadapt_max_proposals is not None and len(props) > o.netadapt_max_proposals:
            base = est.estimate(cur)

            def merit(p: Proposal) -> float:
                s = space.group(p.group).sensitivity_pp
                return (base - p.estimate_ms) / ((max(0.0, s) if s is not None else 0.0) + 0.5)

            keep = {p.group for p in sorted(props, key=merit, reverse=True)[:o.netadapt_max_proposals]}
            props = [p for p in props if p.group in keep]
        return props
