"""Helpers of :mod:`edgeprune.prune` for models nobody here wrote: grouped convolutions, couplings Torch-Pruning
cannot see through, and the check that a pruned model still runs.

* Grouped convolutions (``groups > 1``, not depthwise). Torch-Pruning's dependency graph keeps a grouped conv's
  input and output channels in separate groups, and its conv pruner removes output channels correctly whenever
  every channel group loses the same number. Its input-channel pruner, though, assumes every group loses the same
  *offsets* (it keeps the first group's offsets for all). :func:`execute` replaces that step with
  :func:`prune_grouped_conv_in`, which keeps each group's own offsets, so a group touching a grouped conv with
  ``G`` channel groups can drop any channels as long as each of the ``G`` slices (consecutive blocks of
  ``channels / G``) loses the same number: :func:`channel_slices` says how many slices a group has (the least
  common multiple of its grouped convs' ``groups``), and :mod:`edgeprune.prune` picks the lowest-scoring channels
  of each slice.
* :func:`hidden_couplings`: graph nodes Torch-Pruning treats as element-wise (channel ``i`` in = channel ``i``
  out) whose input and output channel counts differ, e.g. ``F.pad`` of the channel dimension inside a lambda.
  Pruning through them would misalign channels, so every group containing one is left whole and reported.
* :func:`custom_parameters`: parameters of modules Torch-Pruning has no pruner for (a custom module using
  ``F.conv2d`` with its own weight, a layer-scale vector, ...). Torch-Pruning guesses their channel dimension;
  groups containing one are left whole and reported.
* :func:`output_shapes` / :func:`verify`: the pruned model must run on the example inputs and give outputs of the
  dense model's shapes, or pruning raises :class:`PruneError` naming the groups pruned.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import PruneError, UsageError

__all__ = ["PROTECTED", "REACHES_OUTPUT", "HIDDEN_OP", "structural_reasons", "group_name", "resolve_ignore_globs",
           "is_grouped_conv", "channel_slices", "prune_grouped_conv_in", "execute", "hidden_couplings",
           "custom_parameters", "output_shapes", "verify", "slice_drop", "OwnerHooks"]


def is_grouped_conv(m: nn.Module) -> bool:
    """A conv with ``groups > 1`` that is not depthwise (``groups == in_channels == out_channels``)."""
    return (isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1
            and not (m.groups == m.in_channels == m.out_channels))


def _plain(idxs) -> List[int]:
    return [int(getattr(i, "idx", i)) for i in idxs]


def channel_slices(graph: tp.DependencyGraph, group, names: Dict[nn.Module, str]) -> Union[int, str]:
    """How many equal slices of the root's channels must each lose the same number of channels (1: no grouped
    conv in ``group``, a full group), or why the group cannot be pruned consistently (a string)."""
    n = len(group[0].idxs)
    slices = 1
    for dep, idxs in group:
        m = dep.target.module
        if not is_grouped_conv(m) or getattr(m, "transposed", False):
            if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and getattr(m, "transposed", False):
                return f"transposed grouped conv {names.get(m, type(m).__name__)} (groups={m.groups})"
            continue
        name = names.get(m, type(m).__name__)
        if m.groups == m.out_channels != m.in_channels:  # Torch-Pruning prunes it as depthwise: in == out
            return (f"conv {name} has groups == out_channels ({m.groups}) != in_channels ({m.in_channels}), "
                    "which Torch-Pruning prunes as if it were depthwise")
        out_side = graph.is_out_channel_pruning_fn(dep.handler)
        width = m.out_channels if out_side else m.in_channels
        plain = _plain(idxs)
        roots = [getattr(i, "root_idx", i) for i in idxs]
        if width != n or plain != list(range(n)) or [int(r) for r in roots] != list(range(n)):
            return (f"grouped conv {name} (groups={m.groups}) is reached through a channel re-indexing "
                    "(concat/split/slice); group-consistent pruning is only done without one")
        if width == m.groups:
            return (f"grouped conv {name} (groups={m.groups}) has one {'output' if out_side else 'input'} channel "
                    "per group: removing any would empty a group")
        slices = slices * m.groups // math.gcd(slices, m.groups)
    return slices


def slice_drop(scores: torch.Tensor, n: int, keep: int, slices: int) -> List[int]:
    """The channels to drop: the lowest-scoring ``n - keep`` overall (``slices == 1``), or the lowest-scoring
    ``(n - keep) / slices`` of each of ``slices`` consecutive equal slices."""
    if slices == 1:
        order = torch.argsort(scores, stable=True)
        return sorted(int(i) for i in order[: n - keep])
    size, per = n // slices, (n - keep) // slices
    drop: List[int] = []
    for s in range(slices):
        order = torch.argsort(scores[s * size:(s + 1) * size], stable=True)
        drop += [s * size + int(i) for i in order[:per]]
    return sorted(drop)


def prune_grouped_conv_in(layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Remove input channels ``idxs`` of a grouped conv; each channel group must lose the same number (any
    offsets). Output channel ``o`` of group ``g`` keeps the weights of group ``g``'s remaining inputs."""
    g = layer.groups
    per_in, per_out = layer.in_channels // g, layer.out_channels // g
    drop = sorted({int(i) for i in idxs})
    by_group = [[i - k * per_in for i in drop if k * per_in <= i < (k + 1) * per_in] for k in range(g)]
    if len({len(d) for d in by_group}) != 1 or len(by_group[0]) >= per_in:
        raise PruneError(f"grouped conv (groups={g}, in_channels={layer.in_channels}): input channels {drop} do not "
                         "remove the same number from every channel group, or empty one")
    w = layer.weight
    parts = []
    for k in range(g):
        keep = [j for j in range(per_in) if j not in set(by_group[k])]
        parts.append(w[k * per_out:(k + 1) * per_out][:, keep])
    new = torch.cat(parts, 0).contiguous()
    layer.weight = nn.Parameter(new, requires_grad=w.requires_grad)
    if w.grad is not None:
        layer.weight.grad = torch.cat([w.grad[k * per_out:(k + 1) * per_out][:, [j for j in range(per_in)
                                       if j not in set(by_group[k])]] for k in range(g)], 0)
    layer.in_channels -= len(drop)
    return layer


def execute(graph: tp.DependencyGraph, group) -> None:
    """Prune ``group`` (a Torch-Pruning group with the indices to remove), with :func:`prune_grouped_conv_in`
    for grouped convs' input channels; groups without a grouped conv go through Torch-Pruning unchanged."""
    special = [i for i, (dep, _) in enumerate(group)
               if is_grouped_conv(dep.target.module) and graph.is_in_channel_pruning_fn(dep.handler)]
    if not special:
        group.prune()
        return
    if any(dep.target.type == tp.ops.OPTYPE.PARAMETER for dep, _ in group):
        raise PruneError("a group with a grouped conv and an unwrapped parameter cannot be pruned")
    for i, (dep, idxs) in enumerate(group):
        if i in special:
            prune_grouped_conv_in(dep.target.module, _plain(idxs))
        else:
            dep(idxs)


# --------------------------------------------------------------------------------------------------------------
# couplings Torch-Pruning cannot see through

PROTECTED = "protected (stem/output/ignore-layers)"
REACHES_OUTPUT = "its channels reach a model output"
HIDDEN_OP = "an op Torch-Pruning cannot trace couples it (e.g. a lambda or custom function)"


def structural_reasons(graph: tp.DependencyGraph, group, sinks, hidden, custom) -> List[str]:
    """Why ``group`` cannot be pruned safely, whatever is protected (empty: it can)."""
    reasons: List[str] = []
    if any(dep.target.type == tp.ops.OPTYPE.OUTPUT
           or (dep.target in sinks and graph.is_out_channel_pruning_fn(dep.handler)) for dep, _ in group):
        reasons.append(REACHES_OUTPUT)  # pruning them changes the shape of a model output
    ops = [hidden[dep.target] for dep, _ in group if dep.target in hidden]
    if ops:
        reasons.append(f"{HIDDEN_OP}: {', '.join(dict.fromkeys(ops))}")
    reasons += dict.fromkeys(custom[dep.target] for dep, _ in group if dep.target in custom)
    return reasons


def group_name(graph: tp.DependencyGraph, group, names: Dict[nn.Module, str], position) -> str:
    """The first conv/linear (else any named layer) whose output channels ``group`` holds, in definition order."""
    outs = [dep.target.module for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names]
    best = sorted(outs, key=lambda m: (not isinstance(m, (nn.Conv2d, nn.Linear)), position[m]))
    return names[best[0]] if best else names.get(group[0].dep.target.module, str(group[0].dep.target.module))



def resolve_ignore_globs(model: nn.Module, patterns: Sequence[str]) -> List[nn.Module]:
    """The modules of ``model`` whose qualified names match any of ``patterns`` (``fnmatch``: ``head.*``,
    ``features.0``, ``*.fc2``), with every submodule of a matched container, in definition order.

    Raises:
        UsageError: a pattern matches no module (the message names ``--ignore-layers``, the pattern and a few
            names that exist).
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    picked: Dict[nn.Module, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise UsageError(f"--ignore-layers: expected module name patterns, got {pattern!r}")
        hits = [m for n, m in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise UsageError(f"--ignore-layers: {pattern!r} matches no module of {type(model).__name__}; "
                             f"module names look like: {', '.join(n for n, _ in named[:8]) + (', …' if len(named) > 8 else '')}")
        for m in hits:
            for sub in m.modules():
                picked.setdefault(sub, None)
    position = {m: i for i, (_, m) in enumerate(named)}
    return sorted(picked, key=lambda m: position.get(m, len(position)))



def _shape(fn, nr: int) -> Optional[torch.Size]:
    try:
        meta = fn._input_metadata
        return torch.Size(meta[nr].shape) if nr < len(meta) else None
    except (AttributeError, RuntimeError, IndexError, TypeError):
        return None


def _changes_channels(node) -> bool:
    fn = node.grad_fn
    if fn is None or not hasattr(fn, "next_functions"):
        return False
    out = _shape(fn, 0)
    if out is None or len(out) < 2:
        return False
    for nxt, nr in fn.next_functions:
        if nxt is None or "accumulategrad" in nxt.name().lower():
            continue
        inp = _shape(nxt, nr)
        if inp is None or len(inp) < 2 or inp[1] == out[1]:
            continue
        if len(inp) == len(out) and inp[1] != 1:
            pad = tuple(getattr(fn, "_saved_pad", ()) or ())
            p = 2 * (len(out) - 2)  # F.pad's pair for dim 1
            if "constantpad" in fn.name().lower() and len(pad) > p and pad[p] == 0:
                continue  # zeros appended after the channels: channel i stays channel i (ShortcutA's gather path)
            return True   # same rank, another channel count: padding, channel reduction with keepdim, ...
        if len(inp) > len(out):
            return True   # the channel dimension was reduced away or moved
    return False


class OwnerHooks:
    """Forward hooks on every named submodule that record which module produced each autograd node (the
    innermost one), while Torch-Pruning traces the model: ``with OwnerHooks(model) as owners: build the graph``.
    ``owners.found`` maps grad_fn → qualified module name."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.found: Dict[object, str] = {}
        self._hooks: list = []

    def __enter__(self) -> "OwnerHooks":
        def hook(name):
            def fn(_m, _i, out):
                if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                    self.found.setdefault(out.grad_fn, name)
            return fn

        self._hooks = [m.register_forward_hook(hook(n)) for n, m in self.model.named_modules() if n]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def hidden_couplings(model: nn.Module, graph: tp.DependencyGraph, owners: Dict[object, str]) -> Dict[object, str]:
    """Element-wise nodes of ``graph`` whose output has another channel count than an input: node → a
    description naming the module that returned it (``owners``, from :class:`OwnerHooks`) and the autograd op."""
    bad = [node for node in graph.module2node.values()
           if node.type == tp.ops.OPTYPE.ELEMENTWISE and _changes_channels(node)]
    if not bad:
        return {}
    where = owners
    modules = dict(model.named_modules())
    out: Dict[object, str] = {}
    for node in bad:
        op = node.grad_fn.name()
        owner = where.get(node.grad_fn)
        out[node] = f"{owner} ({type(modules[owner]).__name__}: {op})" if owner in modules else op
    return out


def custom_parameters(graph: tp.DependencyGraph, model: nn.Module) -> Dict[object, str]:
    """Unwrapped-parameter nodes of ``graph`` (parameters of modules without a Torch-Pruning pruner): node →
    "custom module <Type> without a pruner (parameter <name>)"."""
    modules = dict(model.named_modules())
    out: Dict[object, str] = {}
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.PARAMETER:
            continue
        pname = graph._param_to_name.get(node.module, "?") if hasattr(graph, "_param_to_name") else "?"
        owner = modules.get(pname.rpartition(".")[0])
        kind = type(owner).__name__ if owner is not None else "?"
        out[node] = f"custom module {kind} without a pruner (parameter {pname})"
    return out


# --------------------------------------------------------------------------------------------------------------
# the pruned model must still run

def _flatten(out) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
    if isinstance(out, torch.Tensor):
        return [("", tuple(out.shape))]
    if isinstance(out, (tuple, list)):
        return [(f"[{i}]{k}", s) for i, o in enumerate(out) for k, s in _flatten(o)]
    if isinstance(out, dict):
        return [(f"[{key!r}]{k}", s) for key, o in out.items() for k, s in _flatten(o)]
    return [("", None)]


def output_shapes(model: nn.Module, example_inputs) -> List[Tuple[str, Optional[Tuple[int, ...]]]]:
    """The shapes of every tensor ``model`` returns on ``example_inputs`` (eval mode, no gradients)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _flatten(model(example_inputs))
    finally:
        model.train(was)


def verify(model: nn.Module, example_inputs, expected, pruned: Sequence[str]) -> None:
    """Raise :class:`PruneError` unless the pruned ``model`` runs on ``example_inputs`` and returns outputs of the
    ``expected`` shapes (:func:`output_shapes` of the dense model)."""
    what = f"groups pruned: {', '.join(pruned) or 'none'}"
    try:
        got = output_shapes(model, example_inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the pruned model is the error reported
        raise PruneError(f"the pruned {type(model).__name__} no longer runs on example_inputs "
                         f"({type(e).__name__}: {e}); {what}") from e
    if got != list(expected):
        raise PruneError(f"the pruned {type(model).__name__} returns outputs of shapes {got}, the dense model "
                         f"{list(expected)}; {what}")
