"""A model's Torch-Pruning dependency graph and its prunable groups, named and checked the way
:mod:`edgeprune.prune` prunes them (what a group is, and why one is left whole: :mod:`edgeprune.prune`'s docstring).

Contract: :func:`dependency_graph` traces a model on example inputs (eval mode, with :class:`ShortcutAPruner` for
option-A shortcuts) or raises :class:`~edgeprune.errors.PruneError`; :func:`collect_groups` returns its prunable
groups (:class:`TracedGroup`, in definition order of their root layers) and the groups left whole with their
reasons; :func:`resolve_ignored` turns the ``ignored_layers`` / ``prune_residual`` / ``extra_ignored`` arguments
into the protected layers (:class:`~edgeprune.errors.UsageError` for a bad one). :func:`prunable_groups` and
:func:`unprunable_groups` are the public views (also importable from :mod:`edgeprune.prune`). Nothing here changes
the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from . import prune_groups as _pg
from .errors import PruneError, UsageError
from .models import ShortcutA, protected_layers
from .prune_groups import PROTECTED


@dataclass
class GroupInfo:
    """One prunable dependency group of a model (see :mod:`edgeprune.prune`'s docstring)."""

    name: str             # the root layer: the group's first output-channel layer in definition order
    channels: int         # the root's output channels: what the group's ratio applies to
    members: List[str]    # every named layer whose channels the group touches (outputs or inputs), in order
    producers: List[str]  # the conv/linear layers whose *output* channels the group removes (root first)
    channel_groups: int = 1  # >1: it touches grouped convs; each of this many equal channel slices loses as many


# ShortcutA: a Torch-Pruning pruner for the option-A shortcut's channel map

class ShortcutAPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for :class:`edgeprune.models.ShortcutA`.

    Its input and output channels are *not* coupled (``prune_in_channels`` is a different function from
    ``prune_out_channels``), so the residual streams on either side of a stage boundary are separate groups:

    * pruning output channels removes those entries of the map;
    * pruning input channels makes the outputs that copied them zero and renumbers the rest.
    """

    TARGET_MODULES = ShortcutA

    @staticmethod
    def _ready(layer: ShortcutA) -> int:
        if layer.in_channels is None:
            raise PruneError("ShortcutA without in_channels: run one forward pass (or pass in_channels) first")
        return layer.in_channels

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        n_in = self._ready(layer)
        drop = {int(i) for i in idxs}
        layer.set_map(n_in, [s for j, s in enumerate(layer.src) if j not in drop])
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        n_in = self._ready(layer)
        drop = {int(i) for i in idxs}
        renumber = {old: new for new, old in enumerate(i for i in range(n_in) if i not in drop)}
        layer.set_map(len(renumber), [renumber.get(s, -1) for s in layer.src])
        return layer

    def get_out_channels(self, layer: nn.Module) -> Optional[int]:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> Optional[int]:
        return layer.in_channels


_CUSTOMIZED_PRUNERS = {ShortcutA: ShortcutAPruner()}
_ROOT_TYPES = (nn.Conv2d, nn.Linear)


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model``, traced in eval mode on ``example_inputs``."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), _pg.OwnerHooks(model) as owners:
            # a tensor is traced as ``model(x)``: Torch-Pruning would first try ``model(*x)``, which for a batch
            # of one is an unbatched 3-D input that fully convolutional models accept (and trace differently)
            forward = (lambda m, x: m(x)) if isinstance(example_inputs, torch.Tensor) else None
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, forward_fn=forward,
                                                          customized_pruners=dict(_CUSTOMIZED_PRUNERS))
        graph.edgeprune_owners = owners.found  # grad_fn → the module that returned it: names hidden couplings
        return graph
    except (RuntimeError, TypeError, ValueError, AssertionError, IndexError) as e:
        raise PruneError(f"cannot trace {type(model).__name__} on example_inputs to build its dependency graph: "
                         f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)


@dataclass
class TracedGroup:
    """A prunable group of a traced graph: its :class:`GroupInfo` and what pruning it needs."""

    info: GroupInfo
    root: nn.Module
    handler: Callable
    order: int    # definition-order index of the root
    full: object  # the Torch-Pruning group over all of the root's channels (valid until the model is pruned)
    slices: int = 1  # channel_groups of the GroupInfo


def _signature(graph: tp.DependencyGraph, group) -> frozenset:
    return frozenset((id(dep.target.module), graph.is_out_channel_pruning_fn(dep.handler), tuple(sorted(idxs)))
                     for dep, idxs in group)


def _full_group(graph: tp.DependencyGraph, root: nn.Module):
    pruner = graph.get_pruner_of_module(root)
    return graph.get_pruning_group(root, pruner.prune_out_channels, list(range(graph.get_out_channels(root))))


def collect_groups(model: nn.Module, graph: tp.DependencyGraph,
             ignored: Sequence[nn.Module]) -> Tuple[List[TracedGroup], Dict[str, List[str]]]:
    """The prunable groups of ``graph``, each re-rooted at its first output layer in definition order, and the
    groups left whole with their reasons (by group name, in definition order)."""
    names = {m: n for n, m in model.named_modules()}
    position = {m: i for i, m in enumerate(names)}
    # nodes whose result is a model output (nothing consumes them); pruning their output channels, or any
    # channel of an element-wise op among them, changes the shape of the model's output
    sinks = {node for node in graph.module2node.values() if not node.outputs}
    hidden = _pg.hidden_couplings(model, graph, getattr(graph, "edgeprune_owners", {}))
    custom = _pg.custom_parameters(graph, model)
    groups: List[TracedGroup] = []
    whole: Dict[str, List[str]] = {}
    for group in graph.get_all_groups(ignored_layers=list(ignored), root_module_types=list(_ROOT_TYPES)):
        reasons = _pg.structural_reasons(graph, group, sinks, hidden, custom)
        if reasons:
            whole.setdefault(_pg.group_name(graph, group, names, position), reasons)
            continue
        root = group[0].dep.target.module
        producers = [dep.target.module for dep, _ in group
                     if isinstance(dep.target.module, _ROOT_TYPES) and graph.is_out_channel_pruning_fn(dep.handler)]
        producers = sorted(dict.fromkeys(producers), key=lambda m: position.get(m, len(position)))
        first = producers[0] if producers else root
        if first is not root and graph.get_out_channels(first) == graph.get_out_channels(root):
            regrouped = _full_group(graph, first)
            if _signature(graph, regrouped) == _signature(graph, group):
                root, group = first, regrouped
        if root not in names:
            continue
        slices = _pg.channel_slices(graph, group, names)
        if isinstance(slices, str):
            whole.setdefault(names[root], [slices])
            continue
        producers = [root] + [m for m in producers if m is not root]
        members = sorted({dep.target.module for dep, _ in group if dep.target.module in names},
                         key=lambda m: position[m])
        n = graph.get_out_channels(root)
        info = GroupInfo(name=names[root], channels=int(n), members=[names[m] for m in members],
                         producers=[names[m] for m in producers if m in names], channel_groups=slices)
        groups.append(TracedGroup(info, root, graph.get_pruner_of_module(root).prune_out_channels, position[root], group,
                             slices))
    groups.sort(key=lambda g: g.order)
    if ignored:  # the groups get_all_groups left out because a protected layer produces some of their channels
        protected = set(ignored)
        taken = {g.info.name for g in groups} | set(whole)
        for group in graph.get_all_groups(ignored_layers=[], root_module_types=list(_ROOT_TYPES)):
            prot = [dep.target.module for dep, _ in group if dep.target.module in protected
                    and dep.target.module in names and graph.is_out_channel_pruning_fn(dep.handler)]
            prot = [names[m] for m in ([m for m in prot if isinstance(m, _ROOT_TYPES)] or prot)]
            name = _pg.group_name(graph, group, names, position)
            if prot and name not in taken:
                whole[name] = ([f"{PROTECTED}: {', '.join(dict.fromkeys(prot))}"]
                               + _pg.structural_reasons(graph, group, sinks, hidden, custom))
    modules = dict(model.named_modules())
    order = {n: i for i, n in enumerate(modules)}
    return groups, {k: whole[k] for k in sorted(whole, key=lambda k: order.get(k, len(order)))}


def resolve_ignored(model: nn.Module, ignored_layers: Optional[Sequence[nn.Module]], prune_residual: bool,
             example_inputs: Optional[torch.Tensor] = None, extra: Sequence[nn.Module] = ()) -> List[nn.Module]:
    mods = set(model.modules())
    extra = list(extra or ())
    bad = [type(m).__name__ for m in extra if not isinstance(m, nn.Module) or m not in mods]
    if bad:
        raise UsageError(f"extra_ignored: {', '.join(bad)} not module(s) of this model")
    if ignored_layers is None:
        base = protected_layers(model, prune_residual=prune_residual, example_inputs=example_inputs)
        return base + [m for m in extra if m not in set(base)]
    if prune_residual:
        raise UsageError("prune_residual: it selects the default protected layers; with ignored_layers given, "
                         "list exactly the layers to keep there instead")
    ignored = list(ignored_layers)
    bad = [type(m).__name__ for m in ignored if not isinstance(m, nn.Module) or m not in mods]
    if bad:
        raise UsageError(f"ignored_layers: {', '.join(bad)} not module(s) of this model")
    return ignored + [m for m in extra if m not in set(ignored)]


def prunable_groups(model: nn.Module, example_inputs: torch.Tensor,
                    ignored_layers: Optional[Sequence[nn.Module]] = None, *,
                    prune_residual: bool = False, extra_ignored: Sequence[nn.Module] = ()) -> List[GroupInfo]:
    """The groups :func:`prune` would prune with the same ``ignored_layers`` / ``prune_residual`` /
    ``extra_ignored``, in definition order of their root layers. Their ``name`` is what ``layer_ratios`` and the
    plan's layers refer to. ``model`` is not changed."""
    ignored = resolve_ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)
    graph = dependency_graph(model, example_inputs)
    return [g.info for g in collect_groups(model, graph, ignored)[0]]


def unprunable_groups(model: nn.Module, example_inputs: torch.Tensor,
                      ignored_layers: Optional[Sequence[nn.Module]] = None, *,
                      prune_residual: bool = False, extra_ignored: Sequence[nn.Module] = ()) -> Dict[str, str]:
    """The groups :func:`prune` leaves whole whatever the ratio, ``{group name: reason(s)}`` in definition order.

    A group is named after its first conv/linear producer in definition order. Reasons (joined by ``"; "``):
    ``protected (stem/output/ignore-layers): <layers>``, ``its channels reach a model output``, ``an op
    Torch-Pruning cannot trace couples it (e.g. a lambda or custom function): <module (Type: op)>``, ``custom
    module <Type> without a pruner (parameter <name>)``, or a grouped conv that cannot be pruned consistently.
    ``model`` is not changed."""
    ignored = resolve_ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)
    graph = dependency_graph(model, example_inputs)
    return {k: "; ".join(v) for k, v in collect_groups(model, graph, ignored)[1].items()}

