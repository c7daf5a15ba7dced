"""The shared types of the search algorithms: the model space, candidates, the work items an algorithm yields and
their results, the algorithm options, the per-device context, and the :class:`SearchAlgorithm` interface.

Plain data and arithmetic; no torch, no files, no devices. Every algorithm module imports what it needs from
here (never from the package ``__init__``, which names the algorithms); :mod:`host.search` builds a
:class:`ModelSpace` from torch (:mod:`host.search.space`) and drives the algorithms (:mod:`host.search.driver`).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Dict, Generator, List, Mapping, Optional, Tuple

from edgeprune.errors import UsageError
from edgeprune.channels import kept_channels
from host.fleet.targets import Bounds, TargetSet

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
        keeps them (:func:`edgeprune.channels.kept_channels`)."""
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
             alpha: float = 0.5, floor_pp: float = 0.5, gain: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """Per-group ratios for a global ``ratio``: their channel-weighted mean is ``ratio`` (before rounding to the
    device's alignment), each at most ``cap``.

    With ``sensitivity`` and every group's ``sensitivity_pp`` known, group *g* gets ``c * w_g`` (capped) with
    ``w_g = ((median + floor) / (s_g + floor)) ** alpha``: a group whose accuracy drops less when pruned alone
    loses more channels; ``floor`` (pp) keeps groups whose measured drop is ~0 (within noise) from taking
    everything. With ``gain`` (per group, the device's measured latency saved per channel removed:
    :func:`host.search.algos.latency.group_gains`) the weight is ``((gain_g / (s_g + floor)) / median) ** alpha``:
    latency bought per accuracy lost, the ratio a Lagrangian allocation of a quadratic accuracy cost against a
    linear latency gain gives (``alpha`` < 1 damps noisy estimates); without sensitivities, the gain alone.
    Otherwise every group gets ``ratio`` (uniform)."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio: must be in [0, 1), got {ratio}")
    ratio = min(ratio, cap)
    groups = space.groups
    sens = [g.sensitivity_pp for g in groups]
    if ratio <= 0 or not groups:
        return {g.name: 0.0 for g in groups}
    known = sensitivity and not any(s is None for s in sens)
    if gain is not None and all(g.name in gain for g in groups):
        merit = [float(gain[g.name]) / ((max(0.0, float(x)) if known else 0.0) + floor_pp)  # type: ignore[arg-type]
                 for g, x in zip(groups, sens)]
        mid = sorted(merit)[len(merit) // 2]
        w = [(m / mid) ** alpha if mid > 0 else 1.0 for m in merit]
        return _scaled(groups, w, ratio, cap)
    if not known:
        return {g.name: ratio for g in groups}
    s = [max(0.0, float(x)) for x in sens]  # type: ignore[arg-type]
    med = sorted(s)[len(s) // 2]
    w = [((med + floor_pp) / (x + floor_pp)) ** alpha for x in s]
    return _scaled(groups, w, ratio, cap)


def _scaled(groups: List[Group], w: List[float], ratio: float, cap: float) -> Dict[str, float]:
    """``min(cap, c * w_g)`` per group, ``c`` such that the channel-weighted mean is ``ratio``."""
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
ALLOCATIONS = ("sensitivity", "latency", "uniform")


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
class DeviceMeasurement:
    """A device evaluation's result: the report's target metrics (and ``top1``), or an error."""

    ok: bool
    metrics: Dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    key: str = ""
    artifact_sha256: str = ""
    plan_sha256: str = ""
    cached: bool = False
    skipped: bool = False     # not run: the search's probe time is spent (host.search.budget)


@dataclass
class AlgoOptions:
    max_ratio: float = 0.9              # no group loses more than this fraction of its channels
    allocation: str = "sensitivity"     # "sensitivity" | "latency" (bisect) | "uniform"
    alpha: float = 0.5                  # strength of the sensitivity weighting
    aim_margin: float = 0.03            # aim this far inside a bound (measurements are noisy)
    slack_tol: float = 0.05             # stop when the binding metric is within this of its bound
    ratio_tol: float = 0.02             # stop when the bracket is narrower than this (global ratio)
    final_margin: float = 0.02          # bisect with cheap probes: the fully recovered final is the lowest-ratio
                                        # feasible probe at least this far inside its bound (measured again, a
                                        # probe at its bound's edge may land past it); the one furthest inside
                                        # when none is
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
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation: one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if not 0.0 < self.netadapt_decay < 1.0:
            raise UsageError(f"--netadapt-decay: must be in (0, 1), got {self.netadapt_decay}")
        if self.netadapt_iterations < 1:
            raise UsageError(f"--netadapt-iterations: must be >= 1, got {self.netadapt_iterations}")
        if not self.netadapt_levels or any(not 0.0 < f < 1.0 for f in self.netadapt_levels):
            raise UsageError(f"--netadapt-levels: widths in (0, 1), got {self.netadapt_levels}")
        if self.netadapt_max_proposals is not None and self.netadapt_max_proposals < 1:
            raise UsageError("--netadapt-max-proposals: must be >= 1")
        for name in ("aim_margin", "slack_tol", "ratio_tol", "final_margin"):
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
    gain: Optional[Dict[str, float]] = None   # ms saved per channel per group, from the device's layer table

    def dense(self) -> Candidate:
        return Candidate((), "none", 0.0, "dense")

    def layer_ratios(self, ratio: float) -> Dict[str, float]:
        o = self.options
        return allocate(self.space, ratio, cap=o.max_ratio, sensitivity=o.allocation != "uniform", alpha=o.alpha,
                        gain=self.gain if o.allocation == "latency" else None)

    def candidate(self, ratio: float, recovery: str = "full") -> Candidate:
        kept = self.space.kept_for(self.layer_ratios(ratio), self.round_to)
        return Candidate.of(self.space, kept, recovery, ratio=ratio)

    def macs(self, c: Candidate) -> int:
        return self.space.macs(c.kept_map())


# ------------------------------------------------------------------------------------------ the interface

class SearchAlgorithm(ABC):
    """One algorithm; :meth:`run` is called once per device and drives that device's search."""

    name: ClassVar[str]

    @abstractmethod
    def run(self, ctx: DeviceContext) -> Generator[Work, Any, str]:
        """Yield work, receive results; return why the search stopped."""

    @staticmethod
    def _dense(ctx: DeviceContext) -> Generator[Work, Any, Tuple[Optional[DeviceMeasurement], Optional[Bounds],
                                                                 str]]:
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
        if not bounds.limits:
            return m, bounds, ("accuracy only (no resource target on this device): the dense model, its accuracy "
                               "measured on the device")
        if bounds.assess(m.metrics).meets_resources:
            return m, bounds, "the dense model already meets the resource targets"
        return m, bounds, ""
