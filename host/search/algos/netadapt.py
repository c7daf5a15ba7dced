"""``netadapt``: NetAdapt (Yang et al., ECCV 2018) with a per-device layer-latency lookup table.

The table times each layer configuration alone on the device (once, cached by the host); iterations lower the
table's latency estimate by a decaying step, one proposal per group scored on the host, the most accurate kept;
when the estimate meets the target the candidate is fully recovered and measured on the device (details:
:mod:`host.search.algos`). Plain arithmetic over the shared types of :mod:`host.search.algos.base`; no torch, no
files, no devices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Generator, List, Optional

from host.search.algos.base import Candidate, DeviceContext, DeviceEval, HostEval, LayerLatency, SearchAlgorithm, Work
from host.search.algos.latency import LutEstimator, latency_limit, lut_configs

__all__ = ["NetAdapt", "LutEstimator", "latency_limit", "lut_configs"]


@dataclass
class Proposal:
    group: str
    kept: Dict[str, int]
    estimate_ms: float
    reached: bool


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
