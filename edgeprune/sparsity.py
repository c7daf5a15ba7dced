"""2:4 semi-structured sparsity: magnitude masks, keeping them through fine-tuning, and checking exported ONNX.

The pattern
    In every group of four consecutive weights along a layer's *reduction* dimension (the one summed over in
    the dot products), at most two are non-zero. NVIDIA sparse tensor cores (Ampere and later, through
    cuSPARSELt and TensorRT) skip the zeros and run such a GEMM/convolution up to twice as fast.

The layout, per layer type
    * ``nn.Linear`` — weight ``[out, in]``: groups of 4 consecutive input features in each output row.
    * ``nn.Conv1d/2d/3d`` — weight ``[out, in, *kernel]``: the reduction is ``in × kh × kw``, but the groups are
      taken along the **input-channel** dimension: 4 consecutive input channels at each (output channel,
      kernel position). This is the layout TensorRT and cuSPARSELt use for convolutions (the implicit GEMM
      runs over NHWC activations, so the input channel is the innermost reduction index; TensorRT's rule is
      "for each output channel and each kernel position, every 4 input channels hold at least 2 zeros").
      Groups along the flattened ``in·kh·kw`` axis of the NCHW weight would *not* be accelerated.

Which layers are sparsified (``masks_2to4`` / ``apply_2to4``)
    Every ``Linear`` and (non-transposed) ``Conv`` layer, except:

    * layers whose group axis (``in_features`` or ``in_channels``) is not a multiple of 4, e.g. the RGB stem
      conv with 3 input channels — there is nothing to group; a network's first conv is skipped this way
      without naming it;
    * grouped and depthwise convolutions (``groups > 1``), which sparse kernels do not accelerate;
    * layers whose reduction size (``in_features``, or ``in_channels × kernel area``) is below
      ``min_reduction`` (default 16): too small for sparse kernels to pay off, while each pruned weight costs
      relatively more accuracy;
    * layers named in ``skip``.

    After channel pruning, pass ``round_to`` a multiple of 4 to ``prune.prune`` so that the pruned layers keep
    input-channel counts 2:4 can group (ResNet-20 pruned by 30 % with ``round_to=1`` leaves 23 and 45 channels,
    and those convs stay dense).

    The classifier is sparsified by default (2:4 does not change any shape, and its few weights recover in
    fine-tuning); pass ``skip=["linear"]`` (or the classifier's name) to keep it dense. Every skipped layer is
    reported with its reason.

Masks are boolean tensors keyed by **parameter** name (``"layer1.0.conv1.weight"``), True where a weight may be
non-zero. :class:`MaskKeeper` (used by ``finetune(..., masks=...)``) keeps the zeros exact through training.

Checking an export (``check_onnx_2to4``)
    ONNX ``Conv`` weights are ``[out, in/group, *kernel]`` like torch's (groups along axis 1); ``Gemm`` with
    ``transB=1`` holds ``[out, in]`` (axis 1) and with ``transB=0`` ``[in, out]`` (axis 0); a ``MatMul`` with a
    constant right operand ``[..., in, out]`` groups along axis -2 (a constant left operand along axis -1).
    The TorchScript exporter in eval mode (``torch.onnx.export(..., dynamo=False)``) folds each BatchNorm into
    the preceding Conv, scaling every output channel's weights by ``gamma / sqrt(var + eps)``: zeros stay zero,
    so the pattern survives folding (it can only gain zeros). Weights reached through ``Identity`` nodes are
    followed; quantized (``DequantizeLinear``/``QLinearConv``) graphs are not inspected.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from .errors import DataError, ExportError, UsageError

__all__ = [
    "DEFAULT_MIN_REDUCTION",
    "SparsityResult",
    "TensorCheck",
    "LayerCheck",
    "OnnxSparsityReport",
    "MaskKeeper",
    "masks_2to4",
    "apply_2to4",
    "mask_2to4_tensor",
    "check_2to4_tensor",
    "check_onnx_2to4",
    "masks_sha256",
]

GROUP = 4   # M in N:M
KEEP = 2    # N in N:M
DEFAULT_MIN_REDUCTION = 16

LayerRef = Union[str, nn.Module]
ArrayLike = Union[torch.Tensor, np.ndarray]


# ----------------------------------------------------------------------------------------------- tensors

def _grouped(a: torch.Tensor, axis: int) -> torch.Tensor:
    """View ``a`` as rows of 4: the 4-groups along ``axis``, one per row (copies when needed)."""
    return a.movedim(axis, -1).reshape(-1, GROUP)


def _check_axis(shape: Tuple[int, ...], axis: int, what: str) -> int:
    if not shape:
        raise UsageError(f"{what}: a scalar has no reduction axis")
    if not -len(shape) <= axis < len(shape):
        raise UsageError(f"axis: {axis} is out of range for {what} of shape {tuple(shape)}")
    axis %= len(shape)
    if shape[axis] % GROUP:
        raise UsageError(f"axis: {what} has {shape[axis]} elements along axis {axis}, not a multiple of {GROUP}")
    return axis


def mask_2to4_tensor(w: torch.Tensor, *, axis: int = 1) -> torch.Tensor:
    """The 2:4 magnitude mask of ``w`` with the groups of 4 along ``axis``: True at the 2 largest-magnitude
    entries of each group. Ties keep the earlier index (a stable sort), so the mask is deterministic."""
    axis = _check_axis(tuple(w.shape), axis, "weight")
    a = w.detach().abs()
    g = _grouped(a, axis)
    top = torch.argsort(g, dim=1, descending=True, stable=True)[:, :KEEP]
    m = torch.zeros(g.shape, dtype=torch.bool, device=w.device).scatter_(1, top, True)
    moved = a.movedim(axis, -1).shape
    return m.reshape(moved).movedim(-1, axis).contiguous()


@dataclass(frozen=True)
class TensorCheck:
    """How well one tensor follows the 2:4 pattern: ``groups`` of 4 checked, ``violations`` with > 2 non-zeros.

    Truthy when there is no violation."""

    groups: int
    violations: int

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def __bool__(self) -> bool:
        return self.ok


def check_2to4_tensor(w: ArrayLike, *, axis: int = 1) -> TensorCheck:
    """Check that every group of 4 consecutive entries of ``w`` along ``axis`` holds at most 2 non-zeros.

    ``axis`` is the group axis: 1 for torch ``Linear`` ``[out, in]`` and ``Conv`` ``[out, in, kh, kw]`` weights
    (see the module docstring for ONNX layouts). Accepts a torch tensor or a numpy array."""
    if isinstance(w, torch.Tensor):
        a = w.detach().cpu().numpy() if w.dtype != torch.bfloat16 else w.detach().float().cpu().numpy()
    elif isinstance(w, np.ndarray):
        a = w  # read-only arrays (numpy_helper.to_array) are fine: nothing is written
    else:
        raise UsageError(f"w: expected a torch tensor or numpy array, got {type(w).__name__}")
    axis = _check_axis(tuple(a.shape), axis, "tensor")
    nonzero = np.count_nonzero(np.moveaxis(a, axis, -1).reshape(-1, GROUP), axis=1)
    return TensorCheck(groups=int(nonzero.size), violations=int((nonzero > KEEP).sum()))


def masks_sha256(masks: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a mask dict (names, shapes, values), for provenance and checkpoint configs."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(f"{name}:{tuple(m.shape)};".encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- models

def _supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.modules.conv._ConvNd) and not m.transposed


def _resolve(model: nn.Module, refs: Optional[Iterable[LayerRef]], arg: str) -> Optional[List[str]]:
    """Turn names or module objects into qualified module names of ``model``; unknown ones are a UsageError."""
    if refs is None:
        return None
    if isinstance(refs, (str, nn.Module)):
        refs = [refs]
    by_name = dict(model.named_modules())
    by_id = {id(m): n for n, m in by_name.items()}
    out: List[str] = []
    for r in refs:
        if isinstance(r, nn.Module):
            if id(r) not in by_id:
                raise UsageError(f"{arg}: a {type(r).__name__} that is not part of the model")
            name = by_id[id(r)]
        elif isinstance(r, str):
            if r not in by_name:
                raise UsageError(f"{arg}: no module named {r!r} in the model")
            name = r
        else:
            raise UsageError(f"{arg}: expected module names or modules, got {type(r).__name__}")
        if not _supported(by_name[name]):
            raise UsageError(f"{arg}: {name!r} is a {type(by_name[name]).__name__}; 2:4 sparsity applies to "
                             "Linear and Conv layers")
        out.append(name)
    return out


def _reduction(m: nn.Module) -> Tuple[int, int]:
    """(group-axis size, full reduction size) of a supported layer's weight."""
    w = m.weight
    if isinstance(m, nn.Linear):
        return w.shape[1], w.shape[1]
    return w.shape[1], int(np.prod(w.shape[1:]))


def _plan(model: nn.Module, layers: Optional[Iterable[LayerRef]], min_reduction: int,
          skip: Optional[Iterable[LayerRef]]) -> Tuple[List[Tuple[str, nn.Module]], Dict[str, str]]:
    if isinstance(min_reduction, bool) or not isinstance(min_reduction, int) or min_reduction < 0:
        raise UsageError(f"min_reduction: must be an integer >= 0, got {min_reduction!r}")
    chosen = _resolve(model, layers, "layers")
    skipped_names = set(_resolve(model, skip, "skip") or ())
    wanted = set(chosen) if chosen is not None else None
    eligible: List[Tuple[str, nn.Module]] = []
    skipped: Dict[str, str] = {}
    for name, m in model.named_modules():
        if not _supported(m) or (wanted is not None and name not in wanted):
            continue
        axis_size, red = _reduction(m)
        groups = getattr(m, "groups", 1)
        if name in skipped_names:
            skipped[name] = "skipped by name"
        elif groups > 1:
            kind = "depthwise" if groups == getattr(m, "in_channels", -1) else "grouped"
            skipped[name] = f"{kind} conv (groups={groups}): not accelerated by sparse kernels"
        elif axis_size % GROUP:
            what = "in_features" if isinstance(m, nn.Linear) else "in_channels"
            skipped[name] = f"{what}={axis_size} is not a multiple of {GROUP}"
        elif red < min_reduction:
            skipped[name] = f"reduction size {red} < min_reduction={min_reduction}"
        else:
            eligible.append((name, m))
    return eligible, skipped


def masks_2to4(model: nn.Module, *, layers: Optional[Iterable[LayerRef]] = None,
               min_reduction: int = DEFAULT_MIN_REDUCTION,
               skip: Optional[Iterable[LayerRef]] = None) -> Dict[str, torch.Tensor]:
    """Magnitude 2:4 masks for ``model``'s eligible layers, keyed by parameter name (``"<module>.weight"``).

    ``layers``: module names (or modules) to consider; None means every Linear and Conv layer. ``skip``: names
    (or modules) to leave dense. Which layers are eligible and the group layout are described in the module
    docstring; :func:`apply_2to4` also reports the skipped layers and why. The model is not modified."""
    eligible, _ = _plan(model, layers, min_reduction, skip)
    return {f"{name}.weight": mask_2to4_tensor(m.weight, axis=1) for name, m in eligible}


@dataclass
class SparsityResult:
    """What :func:`apply_2to4` did.

    ``sparsified``: module names now 2:4 sparse; ``skipped``: module name → reason, for the Linear/Conv layers
    left dense; ``masks``: parameter name → bool mask (pass to ``finetune(..., masks=...)``);
    ``sparse_weights``/``zeros``: weights in the sparsified layers and how many of them are zero;
    ``total_params``/``total_zeros``: the same over every parameter of the model."""

    sparsified: List[str]
    skipped: Dict[str, str]
    masks: Dict[str, torch.Tensor] = field(repr=False)
    sparse_weights: int
    zeros: int
    total_params: int
    total_zeros: int

    @property
    def zero_fraction(self) -> float:
        """Fraction of zeros in the sparsified layers' weights (>= 0.5)."""
        return self.zeros / self.sparse_weights if self.sparse_weights else 0.0

    @property
    def model_zero_fraction(self) -> float:
        """Fraction of zeros over all of the model's parameters."""
        return self.total_zeros / self.total_params if self.total_params else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready summary (without the masks themselves, but with their hash)."""
        return {"pattern": "2:4", "sparsified": list(self.sparsified), "skipped": dict(self.skipped),
                "sparse_weights": self.sparse_weights, "zeros": self.zeros,
                "zero_fraction": self.zero_fraction, "model_zero_fraction": self.model_zero_fraction,
                "masks_sha256": masks_sha256(self.masks)}


@torch.no_grad()
def apply_2to4(model: nn.Module, *, layers: Optional[Iterable[LayerRef]] = None,
               min_reduction: int = DEFAULT_MIN_REDUCTION,
               skip: Optional[Iterable[LayerRef]] = None) -> SparsityResult:
    """Zero the 2 smallest-magnitude weights of every group of 4 in ``model``'s eligible layers, in place.

    Arguments as for :func:`masks_2to4`. Returns the layers sparsified and skipped (with reasons), the masks,
    and zero counts. Fine-tune afterwards with ``finetune(model, split, masks=result.masks)`` to recover
    accuracy while keeping the pattern."""
    eligible, skipped = _plan(model, layers, min_reduction, skip)
    masks: Dict[str, torch.Tensor] = {}
    sparse_weights = zeros = 0
    for name, m in eligible:
        mask = mask_2to4_tensor(m.weight, axis=1)
        m.weight.masked_fill_(~mask, 0)
        masks[f"{name}.weight"] = mask
        sparse_weights += m.weight.numel()
        zeros += int((m.weight == 0).sum())
    total = sum(p.numel() for p in model.parameters())
    total_zeros = sum(int((p == 0).sum()) for p in model.parameters())
    return SparsityResult([n for n, _ in eligible], skipped, masks, sparse_weights, zeros, total, total_zeros)


class MaskKeeper:
    """Keep ``masks`` (parameter name → bool tensor, True = may be non-zero) exact while a model trains.

    As a context manager it zeroes the masked weights on entry, registers gradient hooks that zero the masked
    gradients (so momentum and weight decay see no signal there), and — when ``optimizer`` is given — a
    post-step hook that re-applies the masks after every ``optimizer.step()``, so the zeros are exact whatever
    the optimizer does. Hooks are removed on exit. Without the context manager, call :meth:`zero_grads` after
    ``backward()`` and :meth:`apply` after ``step()`` yourself. Masks follow their parameter's device.

        with MaskKeeper(model, result.masks, optimizer=opt):
            ...  # ordinary training loop
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], *,
                 optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        if not isinstance(masks, Mapping):
            raise UsageError(f"masks: expected a mapping of parameter name to mask, got {type(masks).__name__}")
        params = dict(model.named_parameters())
        self._items: List[Tuple[str, nn.Parameter, torch.Tensor]] = []
        for name, mask in masks.items():
            if name not in params:
                hint = f" (did you mean {name + '.weight'!r}?)" if f"{name}.weight" in params else ""
                raise UsageError(f"masks: no parameter named {name!r} in the model{hint}")
            if not isinstance(mask, torch.Tensor):
                raise UsageError(f"masks: {name!r} is a {type(mask).__name__}, not a tensor")
            p = params[name]
            if tuple(mask.shape) != tuple(p.shape):
                raise UsageError(f"masks: {name!r} has shape {tuple(mask.shape)} but the parameter has "
                                 f"{tuple(p.shape)} (masks computed before the model was pruned?)")
            self._items.append((name, p, (mask != 0).to(p.device)))
        self._optimizer = optimizer
        self._handles: List[Any] = []

    def __len__(self) -> int:
        return len(self._items)

    @property
    def names(self) -> List[str]:
        return [n for n, _, _ in self._items]

    def _mask(self, i: int) -> torch.Tensor:
        name, p, m = self._items[i]
        if m.device != p.device:
            m = m.to(p.device)
            self._items[i] = (name, p, m)
        return m

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight (in place)."""
        for i, (_, p, _) in enumerate(self._items):
            p.masked_fill_(~self._mask(i), 0)

    @torch.no_grad()
    def zero_grads(self) -> None:
        """Zero the gradients of the masked weights (in place), where gradients exist."""
        for i, (_, p, _) in enumerate(self._items):
            if p.grad is not None:
                p.grad.masked_fill_(~self._mask(i), 0)

    @torch.no_grad()
    def violations(self) -> int:
        """How many masked weights are non-zero now (0 when the pattern is kept)."""
        return sum(int(p.masked_select(~self._mask(i)).count_nonzero()) for i, (_, p, _) in enumerate(self._items))

    def __enter__(self) -> "MaskKeeper":
        self.apply()
        for i, (_, p, _) in enumerate(self._items):
            self._handles.append(p.register_hook(lambda g, i=i: g.masked_fill(~self._mask(i), 0)))
        if self._optimizer is not None:
            self._handles.append(self._optimizer.register_step_post_hook(lambda *_: self.apply()))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ----------------------------------------------------------------------------------------------- ONNX

@dataclass
class LayerCheck:
    """One ONNX Conv/Gemm/MatMul with a constant weight, checked for 2:4 along its reduction axis.

    ``module`` is the torch module name recovered from the node's scope (``/layer1/layer1.0/conv1/Conv`` →
    ``layer1.0.conv1``), empty when the node has none. ``eligible`` is False (with ``reason``) for weights that
    cannot carry the pattern (grouped conv, reduction not a multiple of 4)."""

    node: str
    op: str
    initializer: str
    module: str
    shape: List[int]
    axis: int
    eligible: bool
    groups: int = 0
    violations: int = 0
    reason: str = ""

    @property
    def sparse(self) -> bool:
        return self.eligible and self.groups > 0 and self.violations == 0


@dataclass
class OnnxSparsityReport:
    """The per-layer result of :func:`check_onnx_2to4`; ``ok`` when ``failures`` is empty."""

    path: str
    layers: List[LayerCheck]
    min_layers: int
    failures: List[str]

    @property
    def ok(self) -> bool:
        return not self.failures

    def __bool__(self) -> bool:
        return self.ok

    @property
    def sparse_layers(self) -> List[LayerCheck]:
        return [layer for layer in self.layers if layer.sparse]

    def require(self) -> "OnnxSparsityReport":
        """Raise :class:`~edgeprune.errors.ExportError` naming the file and the failures unless ``ok``."""
        if self.failures:
            raise ExportError(f"{self.path}: not 2:4 sparse as expected: " + "; ".join(self.failures))
        return self

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "min_layers": self.min_layers, "failures": list(self.failures),
                "sparse_layers": len(self.sparse_layers),
                "layers": [{"node": c.node, "op": c.op, "initializer": c.initializer, "module": c.module,
                            "shape": c.shape, "axis": c.axis, "eligible": c.eligible, "sparse": c.sparse,
                            "groups": c.groups, "violations": c.violations, "reason": c.reason}
                           for c in self.layers]}


def _module_from_scope(node_name: str) -> str:
    """``/layer1/layer1.0/conv1/Conv`` → ``layer1.0.conv1`` (TorchScript exporter scope names)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    q = ""
    for p in parts:
        q = p if (not q or p.startswith(q + ".")) else f"{q}.{p}"
    return q


def check_onnx_2to4(onnx_path: Union[str, Path], *, min_layers: int = 1,
                    expected: Optional[Iterable[str]] = None) -> OnnxSparsityReport:
    """Check the 2:4 pattern of every Conv / Gemm / MatMul constant weight of an ONNX model.

    ``expected``: layers that must be 2:4 sparse, each matched against the torch module name recovered from the
    node scope (e.g. ``SparsityResult.sparsified``), the node name or the initializer name. The report fails
    (``ok`` False, ``failures`` saying why) when fewer than ``min_layers`` layers are 2:4 sparse, or an expected
    layer is missing or violates the pattern. Call ``.require()`` on the report to raise instead. A missing or
    unreadable file is a :class:`~edgeprune.errors.DataError` naming it."""
    import onnx
    from onnx import numpy_helper

    path = Path(onnx_path)
    if isinstance(min_layers, bool) or not isinstance(min_layers, int) or min_layers < 0:
        raise UsageError(f"min_layers: must be an integer >= 0, got {min_layers!r}")
    if not path.is_file():
        raise DataError(f"{path}: ONNX file not found")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises assorted types for a corrupt file
        raise DataError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    for n in graph.node:  # constants as Constant nodes count as initializers too
        if n.op_type == "Constant" and n.output and n.attribute and n.attribute[0].name == "value":
            inits.setdefault(n.output[0], n.attribute[0].t)
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input and n.output}

    def const(name: str) -> Optional[str]:
        seen = set()
        while name in alias and name not in inits and name not in seen:
            seen.add(name)
            name = alias[name]
        return name if name in inits else None

    layers: List[LayerCheck] = []
    for i, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axis, init, reason = 0, None, ""
        if node.op_type == "Conv":
            init, axis = const(node.input[1]), 1
            if attrs.get("group", 1) != 1:
                reason = f"grouped conv (group={attrs['group']})"
        elif node.op_type == "Gemm":
            init = const(node.input[1])
            axis = 1 if attrs.get("transB", 0) else 0
        else:  # MatMul: constant right operand [..., K, N] (axis -2), or constant left operand [..., M, K] (-1)
            init, axis = const(node.input[1]), -2
            if init is None:
                init, axis = const(node.input[0]), -1
        if init is None:
            continue
        w = numpy_helper.to_array(inits[init])
        name = node.name or f"{node.op_type}_{i}"
        if w.ndim < 2:
            continue
        axis %= w.ndim
        if not reason and w.shape[axis] % GROUP:
            reason = f"reduction axis {axis} has {w.shape[axis]} elements, not a multiple of {GROUP}"
        check = LayerCheck(node=name, op=node.op_type, initializer=init, module=_module_from_scope(name),
                           shape=[int(s) for s in w.shape], axis=axis, eligible=not reason, reason=reason)
        if check.eligible:
            tc = check_2to4_tensor(w, axis=axis)
            check.groups, check.violations = tc.groups, tc.violations
        layers.append(check)

    failures: List[str] = []
    n_sparse = sum(c.sparse for c in layers)
    if n_sparse < min_layers:
        failures.append(f"{n_sparse} of {len(layers)} weight layers are 2:4 sparse, expected at least {min_layers}")
    for want in ([expected] if isinstance(expected, str) else list(expected or ())):
        hits = [c for c in layers if want in (c.module, c.node, c.initializer)]
        if not hits:
            failures.append(f"expected layer {want!r} not found")
        for c in hits:
            if not c.eligible:
                failures.append(f"expected layer {want!r} ({c.node}) cannot be 2:4: {c.reason}")
            elif c.violations:
                failures.append(f"layer {want!r} ({c.node}, {c.initializer}) violates 2:4 in {c.violations} of "
                                f"{c.groups} groups")
    return OnnxSparsityReport(str(path), layers, min_layers, failures)
