"""Structured channel pruning over Torch-Pruning's dependency graph, with a replayable plan.

``prune(model, ratio)`` removes ``ratio`` of the output channels of every prunable dependency group
(uniformly, lowest importance first) and returns the pruned model together with a :class:`PruningPlan`:
plain JSON data naming, per root layer, the channel indices that were *kept*. ``apply_plan`` replays a plan on
a fresh copy of the original model, so artifacts ship the plan and the source checkpoint, never pickled modules.

A ratio of 0 prunes nothing and the model is returned unchanged (an exact identity).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import PruneError, UsageError
from .models import protected_layers

PLAN_VERSION = 1

# Importance criteria: a name → a factory of Torch-Pruning group importance callables.
IMPORTANCE: Dict[str, Callable[[], Callable]] = {
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "random": lambda: tp.importance.RandomImportance(),
}


@dataclass
class LayerPlan:
    name: str          # qualified module name of the group's root layer
    channels: int      # output channels before pruning
    keep: List[int]    # output channel indices kept, ascending


@dataclass
class PruningPlan:
    ratio: float
    importance: str
    round_to: int
    min_channels: int
    layers: List[LayerPlan] = field(default_factory=list)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> "PruningPlan":
        try:
            d = json.loads(text)
            if d.get("version") != PLAN_VERSION:
                raise PruneError(f"pruning plan version {d.get('version')!r} is not supported (knows {PLAN_VERSION})")
            d["layers"] = [LayerPlan(**l) for l in d["layers"]]
            return cls(**d)
        except (ValueError, TypeError, KeyError) as e:
            raise PruneError(f"malformed pruning plan: {e}") from None


@dataclass
class PruneResult:
    model: nn.Module
    plan: PruningPlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


def count(model: nn.Module, example_inputs: torch.Tensor) -> "tuple[int, int]":
    """(MACs, parameters) of one forward pass on ``example_inputs``."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def kept_channels(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``n`` channels survive pruning ``ratio`` of them, rounded *up* to a multiple of
    ``round_to`` (hardware alignment) and never fewer than ``min_channels`` nor more than ``n``."""
    keep = max(min_channels, n - int(math.floor(n * ratio + 1e-9)))
    if round_to > 1:
        keep = int(math.ceil(keep / round_to) * round_to)
    return max(1, min(n, keep))


def _graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    finally:
        model.train(was_training)


def _names(model: nn.Module) -> Dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


def prune(model: nn.Module, ratio: float, example_inputs: torch.Tensor, *, importance: str = "l1",
          round_to: int = 1, min_channels: int = 1,
          ignored_layers: Optional[Sequence[nn.Module]] = None) -> PruneResult:
    """Prune ``ratio`` (0 ≤ ratio < 1) of the output channels of every prunable group of ``model`` in place."""
    if not 0.0 <= ratio < 1.0:
        raise UsageError(f"ratio: must be in [0, 1), got {ratio}")
    if importance not in IMPORTANCE:
        raise UsageError(f"importance: unknown criterion {importance!r}; known: {', '.join(sorted(IMPORTANCE))}")
    if round_to < 1 or min_channels < 1:
        raise UsageError("round_to and min_channels must be >= 1")
    macs0, params0 = count(model, example_inputs)
    plan = PruningPlan(ratio=ratio, importance=importance, round_to=round_to, min_channels=min_channels)
    if ratio > 0:
        ignored = list(ignored_layers) if ignored_layers is not None else protected_layers(model)
        graph = _graph(model, example_inputs)
        names = _names(model)
        score = IMPORTANCE[importance]()
        with torch.no_grad():
            for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]):
                root = group[0].dep.target.module
                handler = group[0].dep.handler
                n = graph.get_out_channels(root)
                keep_n = kept_channels(n, ratio, round_to, min_channels)
                if keep_n >= n:
                    continue
                imp = score(group)
                if imp is None:  # Torch-Pruning returns None for groups it cannot score
                    continue
                order = torch.argsort(imp.detach().cpu(), stable=True)
                drop = sorted(int(i) for i in order[: n - keep_n])
                keep = sorted(set(range(n)) - set(drop))
                pruning_group = graph.get_pruning_group(root, handler, idxs=drop)
                if not graph.check_pruning_group(pruning_group):
                    continue
                pruning_group.prune()
                plan.layers.append(LayerPlan(name=names[root], channels=n, keep=keep))
    macs1, params1 = count(model, example_inputs)
    return PruneResult(model, plan, macs0, macs1, params0, params1)


def apply_plan(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor) -> nn.Module:
    """Replay ``plan`` on ``model`` (a fresh copy of the model the plan was made from), in place."""
    if not plan.layers:
        return model
    graph = _graph(model, example_inputs)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for layer in plan.layers:
            root = modules.get(layer.name)
            if root is None:
                raise PruneError(f"pruning plan names layer {layer.name!r}, which this model does not have")
            n = graph.get_out_channels(root)
            if n != layer.channels:
                raise PruneError(f"pruning plan: {layer.name} has {n} output channels, the plan expects {layer.channels}")
            if not layer.keep or any(not 0 <= k < n for k in layer.keep):
                raise PruneError(f"pruning plan: {layer.name}.keep must hold indices in 0..{n - 1}")
            drop = sorted(set(range(n)) - set(layer.keep))
            if drop:
                handler = graph.get_pruner_of_module(root).prune_out_channels
                graph.get_pruning_group(root, handler, idxs=drop).prune()
    return model
