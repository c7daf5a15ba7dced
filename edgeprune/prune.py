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

Modules: this one scores the groups, decides how many channels each keeps and prunes them (:func:`prune`);
:mod:`edgeprune.prune_graph` traces the dependency graph and collects its groups (:func:`prunable_groups`,
:func:`unprunable_groups`, :class:`GroupInfo`, :class:`ShortcutAPruner`); :mod:`edgeprune.prune_plan` holds the
plan, its JSON and its replay (:class:`PruningPlan`, :class:`LayerPlan`, :data:`PLAN_VERSION`, :func:`apply_plan`);
:mod:`edgeprune.prune_groups` the helpers for grouped convs, untraceable couplings and the output-shape check. The
names listed in ``__all__`` are importable from here.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from . import prune_groups as _pg
from .channels import kept_channels
from .errors import PruneError, UsageError
from .prune_graph import (GroupInfo, ShortcutAPruner, TracedGroup, collect_groups, dependency_graph,
                          prunable_groups, resolve_ignored, unprunable_groups)
from .prune_groups import HIDDEN_OP, PROTECTED, REACHES_OUTPUT, resolve_ignore_globs
from .prune_plan import PLAN_VERSION, RANKINGS, LayerPlan, PruningPlan, apply_plan

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



def count(model: nn.Module, example_inputs: torch.Tensor) -> "tuple[int, int]":
    """(MACs, parameters) of one forward pass on ``example_inputs``, by Torch-Pruning's counter (standard layers;
    custom parameter-free modules such as ShortcutA add nothing)."""
    try:
        macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    except RuntimeError as e:
        raise PruneError(f"cannot run {type(model).__name__} on example_inputs: {e}") from e
    return int(macs), int(params)


# --------------------------------------------------------------------------------------------------------------
# argument checks

def _listing(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _check_ratio(what: str, r: object) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= float(r) < 1.0:
        raise UsageError(f"{what}: must be a number in [0, 1), got {r!r}")
    return float(r)


def _resolve_layer_ratios(model: nn.Module, groups: List[TracedGroup],
                          layer_ratios: Mapping[str, float]) -> Dict[str, float]:
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


def _global_keep(groups: List[TracedGroup], scores: Dict[str, torch.Tensor], ratio: float, round_to: int,
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

    def push(i: int, g: TracedGroup) -> None:
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
    ignored = resolve_ignored(model, ignored_layers, prune_residual, example_inputs, extra_ignored)

    macs0, params0 = count(model, example_inputs)
    plan = PruningPlan(ratio=ratio, importance=importance, round_to=round_to, min_channels=min_channels,
                       ranking="global" if global_ranking else "uniform", prune_residual=bool(prune_residual))
    skipped: Dict[str, str] = {}
    unprunable: Dict[str, str] = {}
    if ratio > 0 or layer_ratios:
        dense_shapes = _pg.output_shapes(model, example_inputs)
        graph = dependency_graph(model, example_inputs)
        groups, whole = collect_groups(model, graph, ignored)
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


def _prune_groups(model: nn.Module, graph: tp.DependencyGraph, groups: List[TracedGroup], plan: PruningPlan,
                  skipped: Dict[str, str], scorer: Callable) -> None:
    # 1. score every group on the unpruned model
    scores: Dict[str, torch.Tensor] = {}
    candidates: List[TracedGroup] = []
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
