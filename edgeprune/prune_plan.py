"""The pruning plan: what :func:`edgeprune.prune.prune` removed, as plain JSON data, and its replay.

Contract: a :class:`PruningPlan` names, per group root layer, the output channel indices *kept*
(:class:`LayerPlan`). :meth:`PruningPlan.to_json` is canonical (sorted keys, no spaces), so
:meth:`PruningPlan.sha256` identifies a plan; :meth:`PruningPlan.from_json` reads versions
:data:`READABLE_VERSIONS` (a version-1 plan serialises back to its original JSON) and raises
:class:`~edgeprune.errors.PruneError` for anything else. :func:`apply_plan` replays a plan on a fresh copy of the
model it was made from, so artifacts ship the plan and the source checkpoint, never pickled modules; it raises
:class:`~edgeprune.errors.PruneError` when the plan does not fit the model or the replayed model no longer runs with
the dense model's output shapes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, List

import torch
import torch.nn as nn

from . import prune_groups as _pg
from .errors import PruneError
from .prune_graph import dependency_graph

PLAN_VERSION = 2
READABLE_VERSIONS = (1, 2)
RANKINGS = ("uniform", "global")


@dataclass
class LayerPlan:
    name: str          # qualified module name of the group's root layer
    channels: int      # output channels before pruning
    keep: List[int]    # output channel indices kept, ascending


_V1_FIELDS = ("ratio", "importance", "round_to", "min_channels", "layers", "version")


@dataclass
class PruningPlan:
    """What :func:`prune` did, as plain data: enough to replay it with :func:`apply_plan`.

    Version 2 (written now) adds ``ranking``, ``layer_ratios`` and ``prune_residual`` to version 1's fields;
    version-1 plans still load, replay, and serialise back to their original JSON (so their sha256 is unchanged).
    """

    ratio: float
    importance: str
    round_to: int
    min_channels: int
    layers: List[LayerPlan] = field(default_factory=list)
    version: int = PLAN_VERSION
    ranking: str = "uniform"                                      # "uniform" or "global"
    layer_ratios: Dict[str, float] = field(default_factory=dict)  # per-group ratio overrides (group root names)
    prune_residual: bool = False                                  # option-A ResNets: residual streams were prunable

    def to_json(self) -> str:
        d = asdict(self)
        if self.version == 1:
            if self.ranking != "uniform" or self.layer_ratios or self.prune_residual:
                raise PruneError("pruning plan: version 1 cannot record ranking, layer_ratios or prune_residual")
            d = {k: d[k] for k in _V1_FIELDS}
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            d = json.loads(text)
            if not isinstance(d, dict):
                raise TypeError("expected a JSON object")
            version = d.get("version")
            if version not in READABLE_VERSIONS:
                raise PruneError(f"pruning plan version {version!r} is not supported "
                                 f"(knows {', '.join(map(str, READABLE_VERSIONS))})")
            allowed = set(_V1_FIELDS) if version == 1 else {f.name for f in fields(cls)}
            extra = sorted(set(d) - allowed)
            if extra:
                raise TypeError(f"unexpected field(s) for version {version}: {', '.join(extra)}")
            d["layers"] = [LayerPlan(**l) for l in d["layers"]]
            plan = cls(**d)
            if plan.ranking not in RANKINGS:
                raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {plan.ranking!r}")
            return plan
        except (ValueError, TypeError, KeyError) as e:
            raise PruneError(f"malformed pruning plan: {e}") from None



def apply_plan(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor) -> nn.Module:
    """Replay ``plan`` on ``model`` (a fresh copy of the model the plan was made from), in place.

    Reads version-1 and version-2 plans. Raises :class:`PruneError` when the plan does not fit the model, or
    when the replayed model does not run on ``example_inputs`` with the unpruned model's output shapes.
    """
    if plan.version not in READABLE_VERSIONS:
        raise PruneError(f"pruning plan version {plan.version!r} is not supported")
    if not plan.layers:
        return model
    dense_shapes = _pg.output_shapes(model, example_inputs)
    graph = dependency_graph(model, example_inputs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer in plan.layers:
            root = modules.get(layer.name)
            if root is None or root not in graph.module2node:
                raise PruneError(f"pruning plan names layer {layer.name!r}, which this model does not have")
            n = graph.get_out_channels(root)
            if n != layer.channels:
                raise PruneError(f"pruning plan: {layer.name} has {n} output channels, the plan expects {layer.channels}")
            if (not layer.keep or any(not isinstance(k, int) or not 0 <= k < n for k in layer.keep)
                    or len(set(layer.keep)) != len(layer.keep)):
                raise PruneError(f"pruning plan: {layer.name}.keep must hold distinct indices in 0..{n - 1}")
            drop = sorted(set(range(n)) - set(layer.keep))
            if drop:
                handler = graph.get_pruner_of_module(root).prune_out_channels
                _pg.execute(graph, graph.get_pruning_group(root, handler, idxs=drop))
    _pg.verify(model, example_inputs, dense_shapes, [l.name for l in plan.layers])
    return model
