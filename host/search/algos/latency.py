"""Layer-latency tables measured on a device: what NetAdapt's lookup table and bisect's latency-aware allocation
read.

:func:`lut_configs` lists the layer configurations a table needs (each affected layer dense, and with each of its
groups alone at each width level); the driver has each timed alone on the device, once, and caches the table per
device. :class:`LutEstimator` turns a table into a candidate's latency estimate; :func:`group_gains` into each
group's measured latency saved per channel removed, which :func:`host.search.algos.base.allocate` weighs against
the group's accuracy sensitivity (``--allocation latency``). Plain arithmetic; no torch, no files, no devices.
"""
from __future__ import annotations

import bisect as _bisect
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from edgeprune.channels import kept_channels
from host.fleet.targets import Bounds
from host.search.algos.base import Layer, LayerConfig, ModelSpace

GAIN_FLOOR = 0.05   # a group's gain is at least this share of the median (a zero would make its weight 0)


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


def group_gains(space: ModelSpace, est: LutEstimator, round_to: int, levels: Sequence[float],
                max_ratio: float) -> Dict[str, float]:
    """Per group, the table's latency saved per channel removed (ms), with the group pruned alone: the mean of the
    slopes to each width level, at least :data:`GAIN_FLOOR` of the median gain."""
    base = est.estimate({})
    raw: Dict[str, float] = {}
    for g in space.groups:
        slopes = [(base - est.estimate({g.name: k})) / (g.channels - k)
                  for k in level_counts(space, g.name, round_to, levels, max_ratio)]
        raw[g.name] = max(0.0, sum(slopes) / len(slopes)) if slopes else 0.0
    positive = sorted(v for v in raw.values() if v > 0)
    med = positive[len(positive) // 2] if positive else 1.0
    return {name: max(v, GAIN_FLOOR * med) for name, v in raw.items()}
