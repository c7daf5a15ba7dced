"""Structured channel pruning over Torch-Pruning's dependency graph, with a replayable plan.

``prune(model, ratio, example_inputs)`` removes output channels of every *prunable group* of ``model`` and returns
the pruned model together with a :class:`PruningPlan`: plain JSON data naming, per group root layer, the channel
indices that were *kept*. :func:`apply_plan` replays a plan on a fresh copy of the original model, so artifacts
ship the plan and the source checkpoint, never pickled modules.

Groups. Torch-Pruning's dependency graph couples every layer whose channels must be removed together (a conv, its
BatchNorm, the next conv's input channels, every conv feeding the same residual add, the right slice of a
``torch.cat`` consumer, the input and output of a depthwise conv, a squeeze-excitation's expand layer with the
features it scales, ...). A group is named after its *root*: the first layer in definition order
(``model.named_modules()``) whose output channels belong to it, and its channel indices are that layer's output
channels. :func:`prunable_groups` lists the groups pruned, :func:`unprunable_groups` the ones left whole, with why.

Pruned: conv/linear chains with BatchNorm, residual adds, concatenations, depthwise convs, squeeze-excitation
blocks (the expand conv/linear follows the block's channels; the reduce layer's hidden width is a group of its
own), hard-swish / hard-sigmoid and other element-wise activations, and grouped convs (``groups > 1``, not
depthwise) *group-consistently*: a group touching grouped convs is cut into ``G`` equal slices (``G`` the least
common multiple of their ``groups``, :attr:`GroupInfo.channel_groups`), keeps a multiple of ``G`` channels and
drops the lowest-scoring channels of each slice, the same number per slice, so every grouped conv keeps its
``groups`` (see :mod:`edgeprune.prune_groups`).

Left whole and reported (:func:`unprunable_groups`, :attr:`PruneResult.unprunable`; those held back for another
reason than protection or the output shape also in :attr:`PruneResult.skipped`), a group

* containing a protected output-channel layer: ``ignored_layers``, by default
  :func:`edgeprune.models.protected_layers` (the stem conv that runs first and every layer producing a model
  output: each head of a multi-output model), plus ``extra_ignored`` (``--ignore-layers`` globs, see
  :func:`resolve_ignore_globs`);
* whose channels reach a model output;
* coupled through an op Torch-Pruning cannot trace: it treats unknown ops as element-wise (channel ``i`` in is
  channel ``i`` out), which is wrong when the op changes the channel count, e.g. a lambda zero-padding the channels
  (the akamaster option-A shortcut written as a ``LambdaLayer``); such a group is named with the module and op;
* containing a parameter of a custom module without a pruner (Torch-Pruning would guess its channel dimension);
* with a grouped conv it cannot cut consistently (one channel per group, reached through a concat/split
  re-indexing, transposed).

After pruning, the model must run on ``example_inputs`` and return outputs of the dense model's shapes, or
:class:`PruneError` names the groups pruned (:func:`apply_plan` checks the same).

Option-A CIFAR ResNets: :class:`edgeprune.models.ShortcutA` (the parameter-free subsample + zero-pad shortcut) gets a
Torch-Pruning pruner here that re-indexes its channel map, which decouples the stages' residual streams; with
``prune_residual=True`` each stage's stream (its blocks' second convs) is one prunable group.

How many channels each group keeps:

* ``global_ranking=False`` (uniform): every group loses ``ratio`` of its channels (``layer_ratios`` overrides the
  ratio per group), rounded as in :func:`kept_channels`.
* ``global_ranking=True``: the groups not named in ``layer_ratios`` are ranked together. Each group's channel scores
  are divided by the group's mean score (Torch-Pruning's global pruning does the same), and the highest-scoring
  channels overall are kept until ``1 - ratio`` of those groups' channels are, in steps of ``round_to`` channels
  per group and never below ``min_channels`` (see :func:`prune`).

Which channels: the lowest-importance ones of each group, by the criterion chosen from :data:`IMPORTANCE`.
Dividing by the group mean makes global ranking invariant to a group's overall score scale (a group whose scores
are all 10x larger is not favoured); what moves channels between groups is how unevenly each group's scores are
spread around its mean.

A ratio of 0 (and no ``layer_ratios``) prunes nothing and the model is returned unchanged (an exact identity).

Limitations: group roots are ``nn.Conv2d`` and ``nn.Linear`` layers (other layers are pruned only as members of
such groups); a grouped conv's input-channel scores are Torch-Pruning's (summed over all its groups' filters);
the output-shape check cannot tell a mis-indexed channel of an untraced op that keeps the channel count (a
channel shuffle written as a lambda) from a correct one; ``taylor`` scores come from a single ``calib`` batch in
eval mode and need a model returning one logits tensor; scores are computed once on the unpruned model (one-shot,
not iterative pruning).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import prune_groups as _pg
from .prune_groups import HIDDEN_OP, PROTECTED, REACHES_OUTPUT, resolve_ignore_globs
from .errors import PruneError, UsageError
from .models import ShortcutA, protected_layers

__all__ = [
    "IMPORTANCE",
    "NEEDS_CALIB",
    "RANKINGS",
    "PLAN_VERSION",
    "LayerPlan",
    "PruningPlan",
    "PruneResult",
    "GroupInfo",
    "ShortcutAPruner",
    "count",
    "kept_channels",
    "prunable_groups",
    "unprunable_groups",
    "resolve_ignore_globs",
    "PROTECTED",
    "REACHES_OUTPUT",
    "HIDDEN_OP",
    "prune",
    "apply_plan",
]

PLAN_VERSION = 2
_READABLE_VERSIONS = (1, 2)
RANKINGS = ("uniform", "global")

# Importance criteria: a name → a factory of Torch-Pruning group importance callables. Scores are raw (no
# per-group normaliser): ranking inside a group does not need one, and global ranking normalises them itself.
IMPORTANCE: Dict[str, Callable[[], tp.importance.Importance]] = {
    # Per channel, the sum of |w| (l1) or w² (l2) over the weights the group touches (conv/linear output rows and
    # input columns, BatchNorm scales), averaged over the group's layers (Torch-Pruning's group magnitude).
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, normalizer=None),
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, normalizer=None),
    # |gamma| of the group's BatchNorm layers (network slimming, Liu et al. 2017); groups without a BatchNorm
    # cannot be scored and are left unpruned (reported in PruneResult.skipped).
    "bn_scale": lambda: tp.importance.BNScaleImportance(normalizer=None),
    # First-order Taylor expansion of the loss, |w * dL/dw| summed per channel (Molchanov et al. 2019).
    # Needs gradients: prune() takes them from one cross-entropy backward pass on ``calib``.
    "taylor": lambda: tp.importance.GroupTaylorImportance(normalizer=None),
    # Uniformly random scores (torch's global RNG): the baseline every criterion should beat.
    "random": lambda: tp.importance.RandomImportance(),
}
NEEDS_CALIB = frozenset({"taylor"})


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
            if version not in _READABLE_VERSIONS:
                raise PruneError(f"pruning plan version {version!r} is not supported "
                                 f"(knows {', '.join(map(str, _READABLE_VERSIONS))})")
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


@dataclass
class PruneResult:
    model: nn.Module
    plan: PruningPlan
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    # groups that were meant to lose channels but were left whole, with the reason: the criterion cannot score
    # them (bn_scale without a BatchNorm), or they cannot be pruned safely (coupled through an op Torch-Pruning
    # cannot trace, a custom module without a pruner, ...). Groups left whole only because they are protected
    # or reach a model output are not listed here (see ``unprunable``).
    skipped: Dict[str, str] = field(default_factory=dict)
    # every group left whole by its structure, protected ones included, with the reasons (unprunable_groups())
    unprunable: Dict[str, str] = field(default_factory=dict)


@dataclass
class GroupInfo:
    """One prunable dependency group of a model (see the module docstring)."""

    name: str             # the root layer: the group's first output-channel layer in definition order
    channels: int         # the root's output channels: what the group's ratio applies to
    members: List[str]    # every named layer whose channels the group touches (outputs or inputs), in order
    producers: List[str]  # the conv/linear layers whose *output* channels the group removes (root first)
    channel_groups: int = 1  # >1: it touches grouped convs; each of this many equal channel slices loses as many


def count(model: nn.Module, example_inputs: torch.Tensor) -> "tuple[int, int]":
    """(MACs, parameters) of one forward pass on ``example_inputs``, by Torch-Pruning's counter (standard layers;
    custom parameter-free modules such as ShortcutA add nothing)."""
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    except RuntimeError as e:
        raise PruneError(f"cannot run {type(model).__name__} on example_inputs: {e}") from e
    return int(macs), int(params)


def kept_channels(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``n`` channels survive pruning ``ratio`` of them, rounded *up* to a multiple of
    ``round_to`` (hardware alignment) and never fewer than ``min_channels`` nor more than ``n``."""
    keep = max(min_channels, n - int(math.floor(n * ratio + 1e-9)))
    if round_to > 1:
        keep = int(math.ceil(keep / round_to) * round_to)
    return max(1, min(n, keep))


# --------------------------------------------------------------------------------------------------------------
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


def _graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
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
class _Group:
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


def _collect(model: nn.Module, graph: tp.DependencyGraph,
             ignored: Sequence[nn.Module]) -> Tuple[List[_Group], Dict[str, List[str]]]:
    """The prunable groups of ``graph``, each re-rooted at its first output layer in definition order, and the
    groups left whole with their reasons (by group name, in definition order)."""
    names = {m: n for n, m in model.named_modules()}
    position = {m: i for i, m in enumerate(names)}
    # nodes whose result is a model output (nothing consumes them); pruning their output channels, or any
    # channel of an element-wise op among them, changes the shape of the model's output
    sinks = {node for node in graph.module2node.values() if not node.outputs}
    hidden = _pg.hidden_couplings(model, graph, getattr(graph, "edgeprune_owners", {}))
    custom = _pg.custom_parameters(graph, model)
    groups: List[_Group] = []
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
        groups.append(_Group(info, root, graph.get_pruner_of_module(root).prune_out_channels, position[root], group,
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


def _ignored(model: nn.Module, ignored_layers: Optional[Sequence[nn.Module]], prune_residual: bool,
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
    ignored = _ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)
    graph = _graph(model, example_inputs)
    return [g.info for g in _collect(model, graph, ignored)[0]]


def unprunable_groups(model: nn.Module, example_inputs: torch.Tensor,
                      ignored_layers: Optional[Sequence[nn.Module]] = None, *,
                      prune_residual: bool = False, extra_ignored: Sequence[nn.Module] = ()) -> Dict[str, str]:
    """The groups :func:`prune` leaves whole whatever the ratio, ``{group name: reason(s)}`` in definition order.

    A group is named after its first conv/linear producer in definition order. Reasons (joined by ``"; "``):
    ``protected (stem/output/ignore-layers): <layers>``, ``its channels reach a model output``, ``an op
    Torch-Pruning cannot trace couples it (e.g. a lambda or custom function): <module (Type: op)>``, ``custom
    module <Type> without a pruner (parameter <name>)``, or a grouped conv that cannot be pruned consistently.
    ``model`` is not changed."""
    ignored = _ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)
    graph = _graph(model, example_inputs)
    return {k: "; ".join(v) for k, v in _collect(model, graph, ignored)[1].items()}


# --------------------------------------------------------------------------------------------------------------
# argument checks

def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _check_ratio(what: str, r: object) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
        raise UsageError(f"{what}: must be a number in [0, 1), got {r!r}")
    return float(r)


def _resolve_layer_ratios(model: nn.Module, groups: List[_Group], layer_ratios: Mapping[str, float]) -> Dict[str, float]:
    """``layer_ratios`` keyed by group root name. A producer layer of a group is accepted for its group."""
    by_name = {g.info.name: g for g in groups}
    by_producer = {p: g for g in groups for p in g.info.producers}
    modules = dict(model.named_modules())
    resolved: Dict[str, float] = {}
    for name, r in layer_ratios.items():
        r = _check_ratio(f"layer_ratios[{name!r}]", r)
        g = by_name.get(name) or by_producer.get(name)
        if g is None:
            why = ("no layer of this model has that name" if name not in modules else
                   "it is not a layer whose output channels a prunable group removes (it is protected, coupled "
                   "to a protected layer or to the model output, or not a conv/linear)")
            raise UsageError(f"layer_ratios: {name!r}: {why}; prunable groups: {_listing(by_name)}")
        if g.info.name in resolved and resolved[g.info.name] != r:
            raise UsageError(f"layer_ratios: {name!r} is in group {g.info.name!r}, which is given another ratio")
        resolved[g.info.name] = r
    return resolved


def _check_calib(calib: object) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(calib, (tuple, list)) or len(calib) != 2:
        raise UsageError("calib: expected an (inputs, labels) pair of tensors")
    x, y = calib
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UsageError("calib: expected an (inputs, labels) pair of tensors")
    if y.dim() != 1 or y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise UsageError(f"calib: labels must be a 1-D integer tensor of class indices, got {tuple(y.shape)} {y.dtype}")
    if len(y) == 0 or len(x) != len(y):
        raise UsageError(f"calib: inputs and labels must hold the same, non-zero number of samples "
                         f"({len(x)} vs {len(y)})")
    return x, y.long()


def _taylor_backward(model: nn.Module, calib: Tuple[torch.Tensor, torch.Tensor]) -> None:
    """One cross-entropy forward/backward pass on ``calib`` in eval mode (BatchNorm statistics are not touched)."""
    x, y = calib
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(y):
            raise UsageError(f"calib: the model must return (batch, classes) logits for taylor importance, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        if int(y.min()) < 0 or int(y.max()) >= out.shape[1]:
            raise UsageError(f"calib: labels must be class indices in 0..{out.shape[1] - 1}")
        F.cross_entropy(out, y).backward()
    for p in model.parameters():
        if p.grad is None:  # a parameter the loss does not depend on: its channels have no effect on it
            p.grad = torch.zeros_like(p)


# --------------------------------------------------------------------------------------------------------------
# how many channels each group keeps

def _normalised(imp: torch.Tensor) -> torch.Tensor:
    mean = float(imp.mean())
    return imp / mean if mean > 0 else torch.zeros_like(imp)


def _step(round_to: int, slices: int) -> int:
    """Channels a group keeps a multiple of: ``round_to`` and, with grouped convs, the number of slices."""
    return round_to * slices // math.gcd(round_to, slices)


def _global_keep(groups: List[_Group], scores: Dict[str, torch.Tensor], ratio: float, round_to: int,
                 min_channels: int) -> Dict[str, int]:
    """Keep counts from one ranking of all ``groups``' channels (scores normalised per group by their mean).

    Each group starts at its minimum (``min_channels`` rounded up to ``round_to``, at most its size) and then
    grows in blocks of ``round_to`` channels (a multiple of its ``slices`` too, see :func:`_step`; the last block of a group whose size is not a multiple of
    ``round_to`` is the remainder), best block first by its mean normalised score, until ``1 - ratio`` of all
    the groups' channels are kept. So the total kept overshoots the target by less than one block, and by more
    only when the minimums alone exceed it.
    """
    total_n = sum(g.info.channels for g in groups)
    target = total_n - int(math.floor(total_n * ratio + 1e-9))
    keep: Dict[str, int] = {}
    ranked: Dict[str, torch.Tensor] = {}
    heap: List[Tuple[float, int, str]] = []

    step = {g.info.name: _step(round_to, g.slices) for g in groups}

    def push(i: int, g: _Group) -> None:
        k, n, r = keep[g.info.name], g.info.channels, step[g.info.name]
        if k < n:
            nxt = min(n, (k // r + 1) * r)
            heapq.heappush(heap, (-float(ranked[g.info.name][k:nxt].mean()), i, g.info.name))

    for i, g in enumerate(groups):
        n, r = g.info.channels, step[g.info.name]
        ranked[g.info.name] = torch.sort(_normalised(scores[g.info.name]), descending=True, stable=True).values
        keep[g.info.name] = min(n, int(math.ceil(max(1, min_channels) / r) * r))
        push(i, g)
    total = sum(keep.values())
    index = {g.info.name: (i, g) for i, g in enumerate(groups)}
    while total < target and heap:
        _, i, name = heapq.heappop(heap)
        k, n, r = keep[name], index[name][1].info.channels, step[name]
        nxt = min(n, (k // r + 1) * r)
        keep[name] = nxt
        total += nxt - k
        push(i, index[name][1])
    return keep


# --------------------------------------------------------------------------------------------------------------

def prune(model: nn.Module, ratio: float, example_inputs: torch.Tensor, *, importance: str = "l1",
          round_to: int = 1, min_channels: int = 1,
          ignored_layers: Optional[Sequence[nn.Module]] = None,
          global_ranking: bool = False,
          layer_ratios: Optional[Mapping[str, float]] = None,
          calib: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
          prune_residual: bool = False,
          extra_ignored: Sequence[nn.Module] = ()) -> PruneResult:
    """Prune output channels of ``model``'s prunable groups in place; returns the model, the plan and the counts.

    Args:
        ratio: fraction of channels to remove, 0 ≤ ratio < 1: per group (uniform ranking), or of all the
            groups' channels together (``global_ranking``). Groups named in ``layer_ratios`` use their own.
        example_inputs: a batch the model accepts; traced to build the dependency graph and count MACs.
        importance: a criterion of :data:`IMPORTANCE` (``l1``, ``l2``, ``bn_scale``, ``taylor``, ``random``).
        round_to: each pruned group keeps a multiple of this many channels (rounded up; a group whose size
            is not a multiple may also stay whole).
        min_channels: each group keeps at least this many channels.
        ignored_layers: layers whose output channels are kept; a group containing one is not pruned at all.
            Default: :func:`edgeprune.models.protected_layers` on ``example_inputs`` (the stem conv that runs
            first and every layer producing a model output). Given, it replaces that default entirely (so it
            cannot be combined with ``prune_residual=True``).
        global_ranking: rank the groups' channels together instead of pruning each group by ``ratio``.
        layer_ratios: ``{group root name: ratio}`` overrides (a group's other output conv/linear layers are
            accepted as aliases), see :func:`prunable_groups`. With ``ratio=0`` only the named groups are pruned.
        calib: ``(inputs, labels)`` for ``taylor`` (required whenever something is to be pruned): one
            cross-entropy backward pass in eval mode (BatchNorm statistics untouched) provides the gradients,
            with every parameter temporarily set to ``requires_grad=True``; afterwards the gradients are
            cleared and the ``requires_grad`` flags restored. Other criteria ignore it.
        prune_residual: option-A CIFAR ResNets only: also prune each stage's residual stream (the blocks'
            second convs, coupled through ShortcutA); see :func:`edgeprune.models.protected_layers`. Other
            models' residual streams are ordinary groups already.
        extra_ignored: more layers to keep, *added* to the protected ones (default or ``ignored_layers``);
            :func:`resolve_ignore_globs` turns ``--ignore-layers`` patterns into these.

    Raises:
        UsageError: a bad argument (the message names it).
        PruneError: a criterion produced unusable scores, or the pruned model no longer runs on
            ``example_inputs`` or returns outputs of other shapes than the dense model (the message names the
            groups pruned; the model, pruned in place, is then unusable).

    ``random`` draws from torch's global RNG: seed it for a reproducible plan. The plan is always reproducible
    by replaying it (:func:`apply_plan`).
    """
    ratio = _check_ratio("ratio", ratio)
    if importance not in IMPORTANCE:
        raise UsageError(f"importance: unknown criterion {importance!r}; known: {', '.join(sorted(IMPORTANCE))}")
    for what, v in (("round_to", round_to), ("min_channels", min_channels)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UsageError(f"{what}: must be an integer >= 1, got {v!r}")
    if layer_ratios is not None and not isinstance(layer_ratios, Mapping):
        raise UsageError("layer_ratios: expected a mapping of group root layer names to ratios")
    layer_ratios = dict(layer_ratios or {})
    wants_pruning = ratio > 0 or any(isinstance(r, (int, float)) and r > 0 for r in layer_ratios.values())
    if importance in NEEDS_CALIB and wants_pruning:
        if calib is None:
            raise UsageError(f"calib: importance {importance!r} needs gradients; pass calib=(inputs, labels), "
                             "a labelled batch from the training or calibration split")
        calib = _check_calib(calib)
    ignored = _ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)

    macs0, params0 = count(model, example_inputs)
    plan = PruningPlan(ratio=ratio, importance=importance, round_to=round_to, min_channels=min_channels,
                       ranking="global" if global_ranking else "uniform", prune_residual=bool(prune_residual))
    skipped: Dict[str, str] = {}
    unprunable: Dict[str, str] = {}
    if ratio > 0 or layer_ratios:
        dense_shapes = _pg.output_shapes(model, example_inputs)
        graph = _graph(model, example_inputs)
        groups, whole = _collect(model, graph, ignored)
        unprunable = {k: "; ".join(v) for k, v in whole.items()}
        if ratio > 0:  # left whole for a reason other than protection or the output shape: worth reporting
            skipped.update({k: "; ".join(v) for k, v in whole.items()
                            if any(not (r.startswith(PROTECTED) or r == REACHES_OUTPUT) for r in v)})
        plan.layer_ratios = _resolve_layer_ratios(model, groups, layer_ratios)
        grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
        was_training = model.training
        try:
            if importance in NEEDS_CALIB and wants_pruning:
                model.eval()
                _taylor_backward(model, calib)
            _prune_groups(model, graph, groups, plan, skipped, IMPORTANCE[importance]())
        finally:
            model.train(was_training)
            if importance in NEEDS_CALIB and wants_pruning:
                for n, p in model.named_parameters():
                    p.grad = None
                    p.requires_grad_(grad_flags.get(n, True))
        if plan.layers:
            _pg.verify(model, example_inputs, dense_shapes, [l.name for l in plan.layers])
    macs1, params1 = count(model, example_inputs)
    return PruneResult(model, plan, macs0, macs1, params0, params1, skipped, unprunable)


def _prune_groups(model: nn.Module, graph: tp.DependencyGraph, groups: List[_Group], plan: PruningPlan,
                  skipped: Dict[str, str], scorer: Callable) -> None:
    # 1. score every group on the unpruned model
    scores: Dict[str, torch.Tensor] = {}
    candidates: List[_Group] = []
    for g in groups:
        name, n = g.info.name, g.info.channels
        if plan.layer_ratios.get(name, plan.ratio) <= 0:
            continue
        with torch.no_grad():
            imp = scorer(g.full)
        if imp is None:
            skipped[name] = (f"importance {plan.importance!r} cannot score this group: it has none of the layers "
                             "the criterion reads (bn_scale: a BatchNorm)")
            continue
        imp = imp.detach().to("cpu", torch.float64).flatten()
        if imp.numel() != n:
            raise PruneError(f"importance {plan.importance!r} gave {imp.numel()} scores for group {name} "
                             f"of {n} channels")
        if not torch.isfinite(imp).all():
            raise PruneError(f"importance {plan.importance!r} is not finite for group {name} "
                             "(NaN or infinite weights or gradients?)")
        scores[name] = imp
        candidates.append(g)
    # 2. how many channels each keeps
    keep_n: Dict[str, int] = {}
    ranked_globally = [g for g in candidates if plan.ranking == "global" and g.info.name not in plan.layer_ratios]
    for g in candidates:
        if g not in ranked_globally:
            keep_n[g.info.name] = kept_channels(g.info.channels, plan.layer_ratios.get(g.info.name, plan.ratio),
                                                _step(plan.round_to, g.slices), plan.min_channels)
    if ranked_globally:
        keep_n.update(_global_keep(ranked_globally, scores, plan.ratio, plan.round_to, plan.min_channels))
    # 3. prune the lowest-scoring channels of each group
    for g in candidates:
        name, n, k = g.info.name, g.info.channels, keep_n[g.info.name]
        if k >= n:
            if g.slices > 1 and g not in ranked_globally and kept_channels(
                    n, plan.layer_ratios.get(name, plan.ratio), plan.round_to, plan.min_channels) < n:
                skipped[name] = (f"grouped conv: each of its {g.slices} channel groups must lose the same number "
                                 f"of channels, and {n // g.slices} per group cannot lose that ratio")
            continue
        drop = _pg.slice_drop(scores[name], n, k, g.slices)
        group = graph.get_pruning_group(g.root, g.handler, idxs=drop)
        if not graph.check_pruning_group(group):
            skipped[name] = "Torch-Pruning refused the group (a member would lose all its channels)"
            continue
        with torch.no_grad():
            _pg.execute(graph, group)
        plan.layers.append(LayerPlan(name=name, channels=n, keep=sorted(set(range(n)) - set(drop))))


def apply_plan(model: nn.Module, plan: PruningPlan, example_inputs: torch.Tensor) -> nn.Module:
    """Replay ``plan`` on ``model`` (a fresh copy of the model the plan was made from), in place.

    Reads version-1 and version-2 plans. Raises :class:`PruneError` when the plan does not fit the model, or
    when the replayed model does not run on ``example_inputs`` with the unpruned model's output shapes.
    """
    if plan.version not in _READABLE_VERSIONS:
        raise PruneError(f"pruning plan version {plan.version!r} is not supported")
    if not plan.layers:
        return model
    dense_shapes = _pg.output_shapes(model, example_inputs)
    graph = _graph(model, example_inputs)
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
