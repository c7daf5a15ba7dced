"""Per-layer pruning sensitivity: how much accuracy each prunable dependency group costs when only it is pruned.

For every prunable group (the same groups :func:`edgeprune.prune.prune` would prune; protected layers
excluded) and every ratio, a fresh copy of the model is pruned at that ratio *in that group only*
(``layer_ratios={group: ratio}``, every other group at 0) and its top-1 is measured on the ``calib`` split
(never the eval split: sensitivity steers the search, and steering on the numbers you report overfits them).
Optionally BatchNorm statistics are re-estimated first (labels-free, on the same split, through
:func:`edgeprune.recovery.recover`), which is how a search would use the candidate, so the drop is not dominated
by stale statistics.

The result is a :class:`pandas.DataFrame`, one row per (group, ratio), and :func:`plot` draws it as one
curve per group (accuracy drop against ratio) — the layers whose curves stay flat are where to prune.
``edgeprune sensitivity`` writes both (CSV + PNG) under ``--out``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from . import prune
from .data import Split, batches
from .errors import UsageError
from .finetune import evaluate
from .recovery import RecoveryPlan, recover

if TYPE_CHECKING:  # pandas is imported lazily: the rest of edgeprune does not need it
    import pandas as pd

COLUMNS = ["group", "channels", "ratio", "kept", "top1", "drop_pp", "macs", "macs_ratio"]

Progress = Callable[[int, int, str], None]  # (done, total, what)

# a probe's recovery: BatchNorm recalibration on the scored split, on the CPU, no fine-tune
BN_ONLY = RecoveryPlan(recalibrate=True, epochs=0, device="cpu")


@dataclass
class Baseline:
    top1: float
    macs: int


def _module_names(model: nn.Module, layers: Optional[Sequence[nn.Module]]) -> Optional[List[str]]:
    if layers is None:
        return None
    where = {id(m): n for n, m in model.named_modules()}
    bad = [type(m).__name__ for m in layers if id(m) not in where]
    if bad:
        raise UsageError(f"ignored_layers: {', '.join(bad)} not module(s) of this model")
    return [where[id(m)] for m in layers]


def _modules(model: nn.Module, names: Optional[Sequence[str]]) -> Optional[List[nn.Module]]:
    return None if names is None else [model.get_submodule(n) for n in names]


def reference_argmax(model: nn.Module, split: Split, batch_size: int = 500) -> List[np.ndarray]:
    """The argmax of each logit-like output (N x C, C >= 2) of ``model`` on ``split``, in the order of its outputs:
    what :func:`agreement` compares a pruned model against (the agent's ``agreement``, on the host)."""
    from .sources import flatten_outputs

    if len(split) == 0:
        raise UsageError(f"split: {split.name!r} has no images")
    was_training = model.training
    model.eval()
    parts: List[List[np.ndarray]] = []
    try:
        with torch.no_grad():
            for sl in batches(len(split), batch_size):
                outs = flatten_outputs(model(split.batch(sl)))
                parts.append([o.argmax(1).numpy() if o.ndim == 2 and o.shape[1] >= 2 else None for o in outs])
    finally:
        model.train(was_training)
    out = [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0])) if parts[0][k] is not None]
    if not out:
        raise UsageError("agreement: the model has no logit-like output (N x C with C >= 2) to compare top-1 classes "
                         "of; score it on labelled data, or use uniform allocation")
    return out


def agreement(model: nn.Module, split: Split, reference: Sequence[np.ndarray], batch_size: int = 500) -> float:
    """Top-1 agreement of ``model`` with :func:`reference_argmax` of the dense model on the same ``split``: the
    fraction of samples whose argmax equals the reference's, the worst over the logit-like outputs (as the agent
    reports it)."""
    from .sources import flatten_outputs

    was_training = model.training
    model.eval()
    same = [0] * len(reference)
    try:
        with torch.no_grad():
            for sl in batches(len(split), batch_size):
                outs = [o for o in flatten_outputs(model(split.batch(sl))) if o.ndim == 2 and o.shape[1] >= 2]
                for k, ref in enumerate(reference):
                    same[k] += int((outs[k].argmax(1).numpy() == ref[sl]).sum())
    finally:
        model.train(was_training)
    return min(same) / len(split)


def analyse(model: nn.Module, split: Split, example_inputs: torch.Tensor, *,
            ratios: Sequence[float] = (0.25, 0.5, 0.75), importance: str = "l1", round_to: int = 1,
            min_channels: int = 1, recalibrate: bool = False, groups: Optional[Sequence[str]] = None,
            ignored_layers: Optional[Sequence[nn.Module]] = None, prune_residual: bool = False,
            batch_size: int = 500, progress: Optional[Progress] = None, metric: str = "top1",
            extra_ignored: Sequence[nn.Module] = ()) -> "pd.DataFrame":
    """Accuracy drop per prunable group and ratio on ``split``. ``model`` itself is left untouched.

    ``metric`` ``"top1"`` scores top-1 on the split's labels; ``"agreement"`` scores top-1 agreement with the dense
    model's own outputs (:func:`agreement`; unlabelled data): the ``top1`` column then holds the agreement (the
    dense model's is 1.0) and ``drop_pp`` the agreement lost, in percentage points; ``df.attrs["metric"]`` says
    which. ``extra_ignored`` (modules of ``model``) are kept whole beside the default protected layers (as
    :func:`edgeprune.prune.prune`'s ``extra_ignored``).

    ``groups`` restricts the analysis to the named group root layers (as listed by
    :func:`edgeprune.prune.prunable_groups`). ``ignored_layers`` are modules of ``model`` (they are mapped onto
    the copies analysed); ``prune_residual`` is :func:`edgeprune.prune.prune`'s option-A residual coupling
    (with the default protected layers). ``drop_pp`` is the dense top-1 minus the pruned top-1, in
    percentage points (positive = worse). Rows are in group order, then ratio order.
    """
    import pandas as pd

    if metric not in ("top1", "agreement"):
        raise UsageError(f"metric: 'top1' or 'agreement', got {metric!r}")
    if not ratios:
        raise UsageError("ratios: give at least one ratio")
    bad = [r for r in ratios if not 0.0 < r < 1.0]
    if bad:
        raise UsageError(f"ratios: each must be in (0, 1), got {bad}")
    base_model = copy.deepcopy(model).eval()
    names = _module_names(model, ignored_layers)
    extra = _module_names(model, list(extra_ignored)) or []
    all_groups = prune.prunable_groups(base_model, example_inputs, ignored_layers=_modules(base_model, names),
                                       prune_residual=prune_residual, extra_ignored=_modules(base_model, extra) or ())
    if groups is not None:
        known = {g.name for g in all_groups}
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise UsageError(f"groups: {', '.join(unknown)} not prunable groups of this model; "
                             f"known: {', '.join(sorted(known)[:12])}{' …' if len(known) > 12 else ''}")
        all_groups = [g for g in all_groups if g.name in set(groups)]
    if not all_groups:
        raise UsageError("this model has no prunable groups outside its protected layers")

    dense_macs, _ = prune.count(base_model, example_inputs)
    if metric == "agreement":
        ref = reference_argmax(base_model, split, batch_size)
        score = lambda m: agreement(m, split, ref, batch_size)  # noqa: E731
    else:
        score = lambda m: evaluate(m, split, batch_size=batch_size, device="cpu")  # noqa: E731
    dense = score(base_model)
    total = len(all_groups) * len(ratios)
    rows = []
    for g in all_groups:
        for r in ratios:
            candidate = copy.deepcopy(base_model)
            res = prune.prune(candidate, 0.0, example_inputs, importance=importance, round_to=round_to,
                              min_channels=min_channels, ignored_layers=_modules(candidate, names),
                              prune_residual=prune_residual, layer_ratios={g.name: r},
                              extra_ignored=_modules(candidate, extra) or ())
            kept = next((l for l in res.plan.layers if l.name == g.name), None)
            kept_n = len(kept.keep) if kept is not None else g.channels
            if recalibrate and kept_n < g.channels:
                recover(candidate, BN_ONLY, calib=split)
            top1 = score(candidate) if kept_n < g.channels else dense
            rows.append({"group": g.name, "channels": g.channels, "ratio": float(r), "kept": kept_n,
                         "top1": top1, "drop_pp": 100.0 * (dense - top1), "macs": res.macs_after,
                         "macs_ratio": dense_macs / res.macs_after})
            if progress is not None:
                progress(len(rows), total, f"{g.name} @ {r:g}")
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.attrs.update({"dense_top1": dense, "dense_macs": dense_macs, "split": split.name, "n": len(split),
                     "importance": importance, "round_to": round_to, "recalibrated": recalibrate,
                     "metric": metric})
    return df


def plot(df: "pd.DataFrame", path: Path, *, title: Optional[str] = None) -> Path:
    """Draw ``df`` (from :func:`analyse`) to a PNG: accuracy drop against ratio, one line per group."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if df.empty:
        raise UsageError("nothing to plot: the sensitivity table is empty")
    groups: List[str] = list(dict.fromkeys(df["group"]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    cmap = plt.get_cmap("viridis", max(2, len(groups)))
    for i, g in enumerate(groups):
        d = df[df["group"] == g].sort_values("ratio")
        ax.plot(d["ratio"], d["drop_pp"], marker="o", ms=3, lw=1.2, color=cmap(i), label=g)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.set_xlabel("fraction of the group's channels removed")
    ax.set_ylabel("top-1 drop (pp), lower is better")
    attrs = df.attrs
    sub = (f"{attrs.get('split', '?')} split, n={attrs.get('n', '?')}, dense top-1 "
           f"{100 * attrs['dense_top1']:.2f}%" if "dense_top1" in attrs else "")
    ax.set_title((title or "Pruning sensitivity per layer group") + (f"\n{sub}" if sub else ""), fontsize=10)
    if len(groups) <= 30:
        ax.legend(fontsize=6, ncol=2 if len(groups) > 12 else 1, loc="upper left", frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
