"""Search algorithms: which pruned candidate to measure next on a device, from what was measured so far.

Everything here is plain data and arithmetic over a :class:`ModelSpace` (the model's prunable groups and the
shapes of its conv/linear layers, read once from torch by :mod:`host.search.space`); no torch, no files, no
devices.
An algorithm is a generator per device (:meth:`SearchAlgorithm.run`) that *yields* work and is sent its result:

* :class:`DeviceEval` (one candidate, built and measured on the device by the agent) → :class:`DeviceMeasurement`;
* :class:`HostEval` (candidates fine-tuned on the host, top-1 on the calib split in torch) → list of top-1;
* :class:`LayerLatency` (layer configurations, each timed alone on the device) → ``{config key: ms}``.

The driver (:class:`host.search.driver.Search`) runs the generators of all devices side by side, device work in
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
    channel-weighted mean stays the requested ratio), or with ``allocation="latency"`` by measured latency bought
    per accuracy lost: the device's layer-latency table (as netadapt's, :mod:`host.search.algos.latency`) gives
    each group's latency saved per channel removed, divided by its sensitivity. It stops when a resource-feasible candidate is within
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
Layout
------
The shared types (:class:`ModelSpace`, :class:`Candidate`, the work items, :class:`AlgoOptions`,
:class:`DeviceContext`, :class:`SearchAlgorithm`) live in :mod:`host.search.algos.base` and are re-exported here;
each algorithm is one module beside it, named in :data:`ALGORITHMS` and imported only when asked for
(:func:`get_algorithm`); the layer-latency tables both use are in :mod:`host.search.algos.latency`. Adding an
algorithm: a module with a :class:`SearchAlgorithm` subclass (importing from
``base``, never from this package) and one line in :data:`ALGORITHMS`.
"""
from __future__ import annotations

import importlib
from typing import Dict

from edgeprune.errors import UsageError
from host.search.algos.base import (RECOVERY_LEVELS, AlgoOptions, Candidate, DeviceContext, DeviceEval,
                                    DeviceMeasurement, Group, HostEval, Layer, LayerConfig, LayerLatency, ModelSpace,
                                    SearchAlgorithm, Work, allocate)

__all__ = ["ALGORITHMS", "get_algorithm", "RECOVERY_LEVELS", "AlgoOptions", "Candidate", "DeviceContext",
           "DeviceEval", "DeviceMeasurement", "Group", "HostEval", "Layer", "LayerConfig", "LayerLatency",
           "ModelSpace", "SearchAlgorithm", "Work", "allocate"]

# the registry: one line per algorithm, its name (--algo) → "module:class", imported when first asked for
ALGORITHMS: Dict[str, str] = {
    "bisect": "host.search.algos.bisect:Bisect",
    "netadapt": "host.search.algos.netadapt:NetAdapt",
}


def get_algorithm(name: str) -> SearchAlgorithm:
    """A new instance of the algorithm registered as ``name``; UsageError naming the known ones otherwise."""
    where = ALGORITHMS.get(name)
    if where is None:
        raise UsageError(f"--algo: unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    module, _, cls = where.partition(":")
    algo = getattr(importlib.import_module(module), cls)()
    if algo.name != name:
        raise TypeError(f"{where}: registered as {name!r} but its name is {algo.name!r}")
    return algo
