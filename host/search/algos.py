"""Search algorithms: which pruned candidate to measure next on a device, from what was measured so far.

Everything here is plain data and arithmetic over a :class:`ModelSpace` (the model's prunable groups and the
shapes of its conv/linear layers, read once from torch by :mod:`host.search.run`); no torch, no files, no devices.
An algorithm is a generator per device (:meth:`SearchAlgorithm.run`) that *yields* work and is sent its result:

* :class:`DeviceEval` (one candidate, built and measured on the device by the agent) → :class:`Measurement`;
* :class:`HostEval` (candidates fine-tuned on the host, top-1 on the calib split in torch) → list of top-1;
* :class:`LayerLatency` (layer configurations, each timed alone on the device) → ``{config key: ms}``.

The driver (:func:`host.search.run.run_search`) runs the generators of all devices side by side, device work in
parallel, persists every result and serves completed results from its store on ``--resume``. Generators are
deterministic functions of the results they are sent, so a resumed search replays to the same point.

A *candidate* is the number of channels each pruned group keeps plus a recovery level; the driver turns it
into a pruning plan (``layer_ratios`` that reproduce those counts exactly), recovers, exports and measures it.

Algorithms
----------
``bisect``
    Searches the global ratio. Per resource target it fits a monotone (isotonic) model of the measured metric
    against the candidates' MACs, and steps to where the fit crosses the bound: a secant between the measured
    points that bracket it, or an extrapolation from the lowest measured point (slope from the two lowest, or a
    prior "fixed share + MACs-proportional share" model after the dense measurement alone). The global ratio
    becomes per-group ratios by sensitivity (:func:`allocate`: less sensitive groups lose more, the
    channel-weighted mean stays the requested ratio). It stops when a resource-feasible candidate is within
    ``slack_tol`` of the binding bound, when the bracket is narrower than ``ratio_tol``, when no untested
    candidate lies between the bracket ends (channel alignment makes neighbouring ratios identical), when the
    next step would lower the best ratio by less than ``ratio_tol``, at the maximum ratio, or at ``max_evals``.
    Extrapolations from measured slopes move at most ``max_step`` past the last miss (a noisy slope must not
    fling the ratio to the maximum). With ``probe_recovery`` "short" or "none" the search runs on cheaply
    recovered candidates (latency does not depend on the weights) and the chosen one is measured once more
    with the full recovery.
``netadapt``
    NetAdapt (Yang et al., ECCV 2018): a per-device lookup table of layer latencies (each layer configuration
    timed alone on the device, once, cached by the host), then iterations that lower the estimated latency by a
    decaying step (never larger than what one group alone can still give): one proposal per group, the fewest
    channels cut from that group alone to meet the step, each briefly fine-tuned and scored on the host (top-1
    on the calib split); the most accurate is kept. Candidates are pruned from the dense checkpoint by their
    cumulative plan (not from the previous iteration's fine-tuned weights, so every artifact replays from the
    source checkpoint). When the estimate meets the target the
    candidate gets the full recovery and is measured on the device; a miss recalibrates the table against the
    measurement and the iterations go on.
"""
from __future__ import annotations

import bisect as _bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Dict, Generator, List, Mapping, Optional, Sequence, Tuple, Type

from edgeprune.errors import UsageError
from edgeprune.prune import kept_channels
from host.fleet.targets import METRICS, Bounds, TargetSet

# ------------------------------------------------------------------------------------------ the model space


@dataclass(frozen=True)
class Group:
    name: str
    channels: int
    sensitivity_pp: Optional[float] = None   # top-1 drop (pp) with only this group pruned (see allocate())
    channel_groups: int = 1                  # >1: it touches grouped convs and keeps a multiple of this many

    def step(self, round_to: int) -> int:
        """Channels it keeps a multiple of: ``round_to`` and its grouped convs' slices (as edgeprune.prune)."""
        g = max(1, self.channel_groups)
        return round_to * g // math.gcd(round_to, g)


@dataclass(frozen=True)
class LayerConfig:
    """One conv/linear layer's shape: what a layer-latency table is keyed by."""

    kind: str                       # "conv" | "linear"
    in_channels: int
    out_channels: int
    kernel: Tuple[int, int] = (1, 1)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    in_hw: Tuple[int, int] = (1, 1)

    def key(self) -> str:
        if self.kind == "linear":
            return f"linear-i{self.in_channels}-o{self.out_channels}-b{int(self.bias)}"
        k, s, p, d = self.kernel, self.stride, self.padding, self.dilation
        return (f"conv-i{self.in_channels}-o{self.out_channels}-k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p[0]}x{p[1]}"
                f"-d{d[0]}x{d[1]}-g{self.groups}-b{int(self.bias)}-h{self.in_hw[0]}x{self.in_hw[1]}")


@dataclass(frozen=True)
class Layer:
    """A conv/linear layer of the dense model and the prunable groups that set its channel counts."""

    name: str
    config: LayerConfig
    out_hw: Tuple[int, int] = (1, 1)
    in_group: Optional[str] = None    # the group whose kept count is this layer's input channels
    out_group: Optional[str] = None   # ... its output channels

    @property
    def depthwise(self) -> bool:
        c = self.config
        return c.kind == "conv" and c.groups > 1 and c.groups == c.in_channels == c.out_channels

    def shaped(self, kept: Mapping[str, int]) -> LayerConfig:
        c = self.config
        cin = kept.get(self.in_group, c.in_channels) if self.in_group else c.in_channels
        cout = kept.get(self.out_group, c.out_channels) if self.out_group else c.out_channels
        groups = c.groups
        if self.depthwise:
            cin = cout = groups = kept.get(self.out_group or self.in_group or "", c.out_channels)
        return replace(c, in_channels=cin, out_channels=cout, groups=groups)

    def macs(self, kept: Mapping[str, int]) -> int:
        c = self.shaped(kept)
        if c.kind == "linear":
            return c.in_channels * c.out_channels
        per_pixel = c.out_channels * (c.in_channels // c.groups) * c.kernel[0] * c.kernel[1]
        return per_pixel * self.out_hw[0] * self.out_hw[1]


@dataclass
class ModelSpace:
    """What the search needs to know about a model: its prunable groups and its layers' shapes."""

    model: str
    checkpoint_sha256: str
    groups: List[Group]
    layers: List[Layer]
    min_channels: int = 1

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}
        self.dense_macs = self.macs({})

    def group(self, name: str) -> Group:
        return self._by_name[name]

    @property
    def total_channels(self) -> int:
        return sum(g.channels for g in self.groups)

    def macs(self, kept: Mapping[str, int]) -> int:
        """Conv and linear multiply-accumulates of one image with ``kept`` channels per group."""
        return sum(layer.macs(kept) for layer in self.layers)

    def kept_for(self, layer_ratios: Mapping[str, float], round_to: int) -> Dict[str, int]:
        """Kept channels per group (pruned groups only) for per-group ratios, as :func:`edgeprune.prune.prune`
        keeps them (:func:`edgeprune.prune.kept_channels`)."""
        out: Dict[str, int] = {}
        for g in self.groups:
            r = layer_ratios.get(g.name, 0.0)
            if r > 0:
                k = kept_channels(g.channels, r, g.step(round_to), self.min_channels)
                if k < g.channels:
                    out[g.name] = k
        return out

    def layer_ratios(self, kept: Mapping[str, int], round_to: int) -> Dict[str, float]:
        """Per-group ratios that make :func:`edgeprune.prune.prune` keep exactly ``kept`` channels."""
        out: Dict[str, float] = {}
        for name, k in kept.items():
            n = self.group(name).channels
            r = (n - k) / n
            if kept_channels(n, r, self.group(name).step(round_to), self.min_channels) != k:
                raise UsageError(f"group {name}: {k} of {n} channels is not reachable with round_to={round_to} "
                                 f"and min_channels={self.min_channels}")
            out[name] = r
        return out

    def valid_kept(self, name: str, round_to: int, max_ratio: float) -> List[int]:
        """The kept counts group ``name`` can have, largest first (the dense count first), pruning at most
        ``max_ratio`` of it."""
        n = self.group(name).channels
        step = self.group(name).step(round_to)
        floor = kept_channels(n, max_ratio, step, self.min_channels)
        counts = {n}
        k = n
        while k > floor:
            k -= 1
            counts.add(kept_channels(n, (n - k) / n, step, self.min_channels))
        return sorted((c for c in counts if c >= floor), reverse=True)

    def pruned_fraction(self, kept: Mapping[str, int]) -> float:
        total = self.total_channels
        return 0.0 if total == 0 else sum(self.group(n).channels - k for n, k in kept.items()) / total

    def affected_layers(self) -> List[Layer]:
        return [layer for layer in self.layers if layer.in_group or layer.out_group]


def allocate(space: ModelSpace, ratio: float, *, cap: float = 0.9, sensitivity: bool = True,
             alpha: float = 0.5, floor_pp: float = 0.5) -> Dict[str, float]:
    """Per-group ratios for a global ``ratio``: their channel-weighted mean is ``ratio`` (before rounding to the
    device's alignment), each at most ``cap``.

    With ``sensitivity`` and every group's ``sensitivity_pp`` known, group *g* gets ``c * w_g`` (capped) with
    ``w_g = ((median + floor) / (s_g + floor)) ** alpha``: a group whose accuracy drops less when pruned alone
    loses more channels; ``floor`` (pp) keeps groups whose measured drop is ~0 (within noise) from taking
    everything. Otherwise every group gets ``ratio`` (uniform)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio: must be in [0, 1), got {ratio}")
    ratio = min(ratio, cap)
    groups = space.groups
    sens = [g.sensitivity_pp for g in groups]
    if ratio <= 0 or not groups:
        return {g.name: 0.0 for g in groups}
    if not sensitivity or any(s is None for s in sens):
        return {g.name: ratio for g in groups}
    s = [max(0.0, float(x)) for x in sens]  # type: ignore[arg-type]
    med = sorted(s)[len(s) // 2]
    w = [((med + floor_pp) / (x + floor_pp)) ** alpha for x in s]
    n = [g.channels for g in groups]
    total = float(sum(n))

    def mean(c: float) -> float:
        return sum(ni * min(cap, c * wi) for ni, wi in zip(n, w)) / total

    lo, hi = 0.0, cap / min(w)
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return {g.name: min(cap, hi * wi) for g, wi in zip(groups, w)}


# ------------------------------------------------------------------------------------------ candidates, work

RECOVERY_LEVELS = ("none", "short", "full")


@dataclass(frozen=True)
class Candidate:
    """Kept channels per pruned group (group order) and a recovery level; ``ratio`` and ``note`` say where it
    came from and are not part of its identity."""

    kept: Tuple[Tuple[str, int], ...] = ()
    recovery: str = "full"
    ratio: float = field(default=0.0, compare=False)
    note: str = field(default="", compare=False)

    @property
    def dense(self) -> bool:
        return not self.kept

    def kept_map(self) -> Dict[str, int]:
        return dict(self.kept)

    @staticmethod
    def of(space: ModelSpace, kept: Mapping[str, int], recovery: str = "full", ratio: Optional[float] = None,
           note: str = "") -> "Candidate":
        order = [g.name for g in space.groups]
        items = tuple((name, int(kept[name])) for name in order
                      if name in kept and kept[name] < space.group(name).channels)
        r = space.pruned_fraction(dict(items)) if ratio is None else ratio
        return Candidate(items, recovery if items else "none", r, note)


@dataclass
class DeviceEval:
    candidate: Candidate


@dataclass
class HostEval:
    candidates: List[Candidate]


@dataclass
class LayerLatency:
    configs: List[LayerConfig]


Work = Any  # DeviceEval | HostEval | LayerLatency


@dataclass
class Measurement:
    """A device evaluation's result: the report's target metrics (and ``top1``), or an error."""

    ok: bool
    metrics: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    key: str = ""
    artifact_sha256: str = ""
    plan_sha256: str = ""
    cached: bool = False


@dataclass
class AlgoOptions:
    max_ratio: float = 0.9              # no group loses more than this fraction of its channels
    allocation: str = "sensitivity"     # "sensitivity" | "uniform"
    alpha: float = 0.5                  # strength of the sensitivity weighting
    aim_margin: float = 0.03            # aim this far inside a bound (measurements are noisy)
    slack_tol: float = 0.05             # stop when the binding metric is within this of its bound
    ratio_tol: float = 0.02             # stop when the bracket is narrower than this (global ratio)
    min_step: float = 0.05              # the least a ratio moves past the largest infeasible one
    max_step: float = 0.25              # ... and the most (a noisy slope must not fling it to the maximum)
    prior_fixed_fraction: float = 0.15  # bisect's first step: share of latency that pruning does not reduce
    probe_recovery: str = "full"        # bisect: recovery of the candidates it searches with ("short"/"none":
                                        # cheaper probes, then the chosen one again with "full")
    netadapt_iterations: int = 4        # planned iterations (sets the first step; more run if needed)
    netadapt_decay: float = 0.7         # step k = step0 * decay**k
    netadapt_levels: Tuple[float, ...] = (0.75, 0.5, 0.25)   # widths timed per layer for the lookup table
    netadapt_max_proposals: Optional[int] = None  # proposals per iteration (None: one per group)
    netadapt_max_iterations: int = 60

    def validate(self) -> "AlgoOptions":
        if not 0.0 < self.max_ratio < 1.0:
            raise UsageError(f"--max-ratio: must be in (0, 1), got {self.max_ratio}")
        if self.probe_recovery not in RECOVERY_LEVELS:
            raise UsageError(f"--probe-recovery: one of {', '.join(RECOVERY_LEVELS)}, got {self.probe_recovery!r}")
        if self.allocation not in ("sensitivity", "uniform"):
            raise UsageError(f"--allocation: 'sensitivity' or 'uniform', got {self.allocation!r}")
        if not 0.0 < self.netadapt_decay < 1.0:
            raise UsageError(f"--netadapt-decay: must be in (0, 1), got {self.netadapt_decay}")
        if self.netadapt_iterations < 1:
            raise UsageError(f"--netadapt-iterations: must be >= 1, got {self.netadapt_iterations}")
        if not self.netadapt_levels or any(not 0.0 < f < 1.0 for f in self.netadapt_levels):
            raise UsageError(f"--netadapt-levels: widths in (0, 1), got {self.netadapt_levels}")
        if self.netadapt_max_proposals is not None and self.netadapt_max_proposals < 1:
            raise UsageError("--netadapt-max-proposals: must be >= 1")
        for name in ("aim_margin", "slack_tol", "ratio_tol"):
            if not 0.0 <= getattr(self, name) < 0.5:
                raise UsageError(f"{name}: must be in [0, 0.5), got {getattr(self, name)}")
        return self


@dataclass
class DeviceContext:
    """What an algorithm knows about the device it searches for. ``evals`` is kept current by the driver."""

    device_id: str
    space: ModelSpace
    round_to: int
    targets: TargetSet
    max_evals: int
    options: AlgoOptions = field(default_factory=AlgoOptions)
    impossible: Callable[[Bounds], Optional[str]] = lambda bounds: None
    evals: int = 0

    def dense(self) -> Candidate:
        return Candidate((), "none", 0.0, "dense")

    def layer_ratios(self, ratio: float) -> Dict[str, float]:
        o = self.options
        return allocate(self.space, ratio, cap=o.max_ratio, sensitivity=o.allocation == "sensitivity", alpha=o.alpha)

    def candidate(self, ratio: float, recovery: str = "full") -> Candidate:
        kept = self.space.kept_for(self.layer_ratios(ratio), self.round_to)
        return Candidate.of(self.space, kept, recovery, ratio=ratio)

    def macs(self, c: Candidate) -> int:
        return self.space.macs(c.kept_map())


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


# ------------------------------------------------------------------------------------------ the interface

class SearchAlgorithm(ABC):
    """One algorithm; :meth:`run` is called once per device and drives that device's search."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, ctx: DeviceContext) -> Generator[Work, Any, str]:
        """Yield work, receive results; return why the search stopped."""

    @staticmethod
    def _dense(ctx: DeviceContext) -> Generator[Work, Any, Tuple[Optional[Measurement], Optional[Bounds], str]]:
        m = yield DeviceEval(ctx.dense())
        if not m.ok:
            return m, None, f"the dense model failed on the device: {m.error}"
        try:
            bounds = ctx.targets.resolve(m.metrics)
        except UsageError as e:   # a relative target whose metric the device's report lacks
            return m, None, f"targets cannot be resolved: {e}"
        why = ctx.impossible(bounds)
        if why:
            return m, bounds, f"impossible: {why}"
        if bounds.assess(m.metrics).meets_resources:
            return m, bounds, "the dense model already meets the resource targets"
        return m, bounds, ""


class Bisect(SearchAlgorithm):
    name = "bisect"

    def run(self, ctx: DeviceContext) -> Generator[Work, Any, str]:
        o = ctx.options
        dense, bounds, stop = yield from self._dense(ctx)
        if stop or bounds is None or dense is None:
            return stop
        pts = [Point(ctx.dense(), ctx.space.dense_macs, dense.metrics, False)]
        reason = yield from self._search(ctx, bounds, pts)
        if o.probe_recovery == "full" or reason.startswith("device error"):
            return reason
        # probes were built with a cheaper recovery (latency does not depend on the weights): the most accurate
        # resource-feasible one (the lowest ratio) gets the full recovery and is measured once more
        feas = [p for p in pts if p.resources_ok]
        if not feas:
            return reason
        best = min(feas, key=lambda p: p.ratio)
        if ctx.evals >= ctx.max_evals:
            return f"{reason}; no evaluation left for the fully recovered candidate (--max-evals {ctx.max_evals})"
        final = replace(best.candidate, recovery="full", note="final, full recovery")
        m = yield DeviceEval(final)
        if not m.ok:
            return f"device error: {m.error}"
        return f"{reason}; ratio {best.ratio:.3f} measured again with full recovery"

    def _search(self, ctx: DeviceContext, bounds: Bounds, pts: List[Point]) -> Generator[Work, Any, str]:
        o = ctx.options
        seen = {ctx.dense()}
        r_max = o.max_ratio
        while True:
            if ctx.evals >= ctx.max_evals:
                return f"--max-evals {ctx.max_evals} reached"
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
            if not m.ok:
                return f"device error: {m.error}"
            pts.append(Point(cand, ctx.macs(cand), m.metrics, bounds.assess(m.metrics).meets_resources))

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


ALGORITHMS: Dict[str, Type[SearchAlgorithm]] = {a.name: a for a in (Bisect, NetAdapt)}


def get_algorithm(name: str) -> SearchAlgorithm:
    try:
        return ALGORITHMS[name]()
    except KeyError:
        raise UsageError(f"--algo: unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None
