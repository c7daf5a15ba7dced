"""The model space of a search, read from torch: :func:`build_space` (the prunable groups and every conv/linear
layer's shape, as :mod:`host.search.algos` needs them) and :func:`sensitivity_table` (each group's accuracy drop when
pruned alone, cached per model, settings and data under the search's cache folder).

torch is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

from edgeprune.errors import PruneError, UsageError
from host.files import write_text_atomic
from host.search.algos.base import Group, Layer, LayerConfig, ModelSpace
from host.search.options import Events, SearchOptions

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.workload import Workload

def layer_shapes(model: Any, example: Any) -> Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]]:
    """Input and output spatial size of every conv and linear layer, from one forward pass."""
    import torch
    import torch.nn as nn

    shapes: Dict[str, Tuple[Tuple[int, int], Tuple[int, int]]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(m: Any, inp: Any, out: Any, name: str = name) -> None:
                i, o = inp[0].shape, out.shape
                shapes[name] = ((int(i[2]), int(i[3])), (int(o[2]), int(o[3]))) if len(i) == 4 else ((1, 1), (1, 1))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def build_space(name: str, model: Any, meta: Mapping[str, Any], *, prune_residual: bool = False,
                min_channels: int = 1, sensitivities: Optional[Mapping[str, float]] = None,
                example: Any = None, extra_ignored: Sequence[Any] = ()) -> ModelSpace:
    """The :class:`ModelSpace` of a torch model: its prunable groups (as :func:`edgeprune.prune.prune` prunes
    them, ``extra_ignored`` modules kept whole) and every conv/linear layer with the groups that set its input and
    output channels. ``example``: an input of the model's shape (default: the CIFAR reference models')."""
    import torch
    import torch.nn as nn

    from edgeprune import prune

    if example is None:
        from edgeprune.data import INPUT_SHAPE

        example = torch.zeros(*INPUT_SHAPE)
    infos = prune.prunable_groups(model, example, prune_residual=prune_residual, extra_ignored=extra_ignored)
    shapes = layer_shapes(model, example)
    modules = dict(model.named_modules())
    side: Dict[str, Dict[str, str]] = {}
    for g in infos:
        for member in g.members:
            mod = modules.get(member)
            if not isinstance(mod, (nn.Conv2d, nn.Linear)):
                continue
            s = side.setdefault(member, {})
            dw = isinstance(mod, nn.Conv2d) and 1 < mod.groups == mod.in_channels == mod.out_channels
            for which in (("in", "out") if dw else ("out",) if member in g.producers else ("in",)):
                if s.get(which, g.name) != g.name:
                    raise PruneError(f"{member}: its {which}put channels belong to two groups ({s[which]}, {g.name})")
                s[which] = g.name
    layers: List[Layer] = []
    for lname, mod in modules.items():
        if isinstance(mod, nn.Conv2d):
            pair = lambda v: (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))  # noqa: E731
            cfg = LayerConfig("conv", mod.in_channels, mod.out_channels, pair(mod.kernel_size), pair(mod.stride),
                              pair(mod.padding) if not isinstance(mod.padding, str) else (0, 0), pair(mod.dilation),
                              mod.groups, mod.bias is not None, shapes[lname][0])
        elif isinstance(mod, nn.Linear):
            cfg = LayerConfig("linear", mod.in_features, mod.out_features, bias=mod.bias is not None)
        else:
            continue
        if lname not in shapes:
            continue  # not on the forward path
        s = side.get(lname, {})
        layers.append(Layer(lname, cfg, shapes[lname][1], s.get("in"), s.get("out")))
    sens = dict(sensitivities or {})
    groups = [Group(g.name, g.channels, sens.get(g.name), getattr(g, "channel_groups", 1)) for g in infos]
    return ModelSpace(name, str(meta.get("sha256", "")), groups, layers, min_channels)


def sensitivity_split(opts: SearchOptions, workload: Optional["Workload"]) -> Tuple[Any, Any, str]:
    """The sensitivity table's images, an example input and its metric (``top1`` on labelled data, else
    ``agreement``)."""
    import torch

    from edgeprune import data
    from host.search import data as search_data

    if workload is None or workload.reference_path:
        cal = data.calib_split(opts.sensitivity_per_class)
        example = torch.zeros(*data.INPUT_SHAPE) if workload is None else workload.example
    else:
        cal = workload.calib()
        example = workload.example
        if cal is None or len(cal) == 0:
            raise UsageError("--allocation sensitivity: needs calibration images (--data or --calib-data); or use "
                             "--allocation uniform")
    return cal, example, "top1" if search_data.is_labelled(cal) else "agreement"


def sensitivity_rows(model: Any, opts: SearchOptions, cal: Any, example: Any, metric: str,
                     groups: Optional[Sequence[str]] = None, extra_ignored: Sequence[Any] = (),
                     progress: Optional[Any] = None) -> Dict[str, float]:
    """Drop (pp) of each group (all, or ``groups``) pruned alone at ``opts.sensitivity_ratio``, recalibrated."""
    from edgeprune import sensitivity

    df = sensitivity.analyse(model, cal, example, ratios=(opts.sensitivity_ratio,), importance=opts.importance,
                             min_channels=opts.min_channels, recalibrate=True, prune_residual=opts.prune_residual,
                             metric=metric, extra_ignored=extra_ignored, groups=groups, progress=progress)
    return {str(r.group): float(r.drop_pp) for r in df.itertuples()}


def sensitivity_table(model: Any, name: str, meta: Mapping[str, Any], opts: SearchOptions,
                      emit: Events, *, workload: Optional["Workload"] = None,
                      extra_ignored: Sequence[Any] = (), executor: Any = None) -> Dict[str, float]:
    """Per-group top-1 drop (pp) with only that group pruned at ``opts.sensitivity_ratio``, BatchNorm
    recalibrated, on the calib split (:func:`edgeprune.sensitivity.analyse`); on unlabelled calibration data the
    drop of top-1 agreement with the dense model instead. Cached per model, settings, data (a fingerprint of the
    images scored) and input shape. With a cluster ``executor`` (not the local one) the groups are scored in
    chunks, one task each, from the run's options (:func:`host.search.remote.sensitivity_chunk`): the same
    numbers."""
    from host.search import data as search_data

    cal, example, metric = sensitivity_split(opts, workload)
    doc = {"model": name, "checkpoint": str(meta.get("sha256", "")), "importance": opts.importance,
           "ratio": opts.sensitivity_ratio, "per_class": opts.sensitivity_per_class,
           "prune_residual": opts.prune_residual, "min_channels": opts.min_channels, "v": 2,
           "input_shape": list(example.shape), "data": search_data.split_fingerprint(cal), "metric": metric,
           "ignore_layers": list(opts.ignore_layers), "model_args": opts.model_args}
    h = hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = opts.cache() / f"sensitivity-{name}-{h}.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("key") == json.loads(json.dumps(doc, default=str)):
            return {str(k): float(v) for k, v in cached["drop_pp"].items()}
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    emit("stage", "", f"sensitivity of {name}'s groups on {cal.name} ({len(cal)} images, {metric}), once per model")
    if executor is None or executor.synchronous:     # one call: the dense model scored once
        table = sensitivity_rows(model, opts, cal, example, metric, extra_ignored=extra_ignored,
                                 progress=lambda d, t, what: emit("progress", "", f"sensitivity {d}/{t}: {what}"))
    else:
        table = _sensitivity_on(executor, model, opts, cal, example, metric, extra_ignored)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"key": doc, "drop_pp": table}, indent=1, sort_keys=True, default=str))
    return table


SENSITIVITY_CHUNKS = 8


def _sensitivity_on(executor: Any, model: Any, opts: SearchOptions, cal: Any, example: Any, metric: str,
                    extra_ignored: Sequence[Any]) -> Dict[str, float]:
    """The sensitivity table as up to SENSITIVITY_CHUNKS tasks of the executor, in group order."""
    import tempfile
    from pathlib import Path

    from edgeprune import prune
    from host.executors import BuildTask
    from host.executors.base import absolute_paths

    names = [g.name for g in prune.prunable_groups(model, example, prune_residual=opts.prune_residual,
                                                   extra_ignored=extra_ignored)]
    k = max(1, -(-len(names) // SENSITIVITY_CHUNKS))
    chunks = [names[i:i + k] for i in range(0, len(names), k)]
    options = absolute_paths(opts.to_dict())
    with tempfile.TemporaryDirectory(prefix="edgeprune-sensitivity-") as tmp:
        def here(dest: Any, c: List[str]) -> Dict[str, Any]:
            return {"drop_pp": sensitivity_rows(model, opts, cal, example, metric, c, extra_ignored)}

        handles = [executor.submit(BuildTask(f"sensitivity {c[0]}..{c[-1]}", Path(tmp) / str(i),
                                             lambda dest, c=c: here(dest, c), "host.search.remote:sensitivity_chunk",
                                             {"options": options, "groups": c}))
                   for i, c in enumerate(chunks)]
        table: Dict[str, float] = {}
        try:
            for h in handles:
                table.update({str(g): float(v) for g, v in h.result()["drop_pp"].items()})
        except BaseException:
            for h in handles:
                h.cancel()
            raise
    return {n: table[n] for n in names if n in table}

