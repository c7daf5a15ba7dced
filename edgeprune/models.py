"""Reference models: the CIFAR-10 ResNet family of He et al. (2016) with option-A shortcuts.

The architecture matches ``akamaster/pytorch_resnet_cifar10`` (BSD-2-Clause, (c) 2018 Yerlan Idelbayev),
whose published checkpoints load with ``strict=True`` after the ``module.`` prefix is stripped.

The option-A shortcut has no parameters: it subsamples ``x[:, :, ::2, ::2]`` and zero-pads the channel
dimension. It is an ``nn.Module`` (not a lambda) holding its channel map explicitly (:class:`ShortcutA`), so that
a model whose residual stream lost channels to pruning is still plain, exportable modules, rebuilt by replaying
the pruning plan.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DataError

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ShortcutA",
    "MODELS",
    "build_model",
    "load_checkpoint",
    "sha256_file",
    "protected_layers",
    "pretrained",
    "checkpoint_path",
    "CHECKPOINTS",
    "PUBLISHED_TOP1",
]


class ShortcutA(nn.Module):
    """Option-A shortcut: spatial subsample by ``stride``, then a parameter-free channel map.

    Output channel ``j`` is input channel ``src[j]`` of the subsampled input, or zero where ``src[j] == -1``.
    A freshly built block uses the original map "zero-pad ``pad_before`` channels, the input, ``pad_after``
    channels"; structured pruning of the residual stream (``edgeprune.prune`` with ``prune_residual=True``)
    turns it into a general map by removing entries (output channels pruned) or zeroing them (the input channel
    they copied was pruned).

    Whenever the map is such a contiguous zero-padding, the forward pass is the original
    ``x[:, :, ::s, ::s]`` + ``F.pad`` (so a dense model traces and exports exactly as before); any other map is
    computed as ``index_select(F.pad(x, one zero channel appended), 1, index)``, i.e. ONNX ``Pad`` + ``Gather``
    with a constant index, which every runtime supports.

    The map lives in plain attributes (``in_channels``, ``src``) and a non-persistent buffer, so the state dict
    is unchanged (published checkpoints still load with ``strict=True``).
    """

    def __init__(self, stride: int, pad_before: int, pad_after: int, in_channels: Optional[int] = None) -> None:
        super().__init__()
        if stride < 1 or pad_before < 0 or pad_after < 0:
            raise ValueError(f"ShortcutA: stride must be >= 1 and padding >= 0, got {stride}, {pad_before}, {pad_after}")
        self.stride = stride
        self.in_channels: Optional[int] = in_channels
        self._pad: Optional[Tuple[int, int]] = (pad_before, pad_after)
        self.src: List[int] = []
        self.register_buffer("index", torch.zeros(0, dtype=torch.long), persistent=False)
        if in_channels is not None:
            self.set_map(in_channels, [-1] * pad_before + list(range(in_channels)) + [-1] * pad_after)

    @classmethod
    def from_map(cls, stride: int, in_channels: int, src: Sequence[int]) -> "ShortcutA":
        """A shortcut with an explicit channel map (``src[j]`` in ``-1 .. in_channels - 1``)."""
        m = cls(stride, 0, 0)
        m.set_map(in_channels, src)
        return m

    def set_map(self, in_channels: int, src: Sequence[int]) -> None:
        """Replace the channel map; output channel ``j`` copies input channel ``src[j]`` (``-1``: zeros)."""
        src = [int(s) for s in src]
        if in_channels < 0 or any(not -1 <= s < in_channels for s in src):
            raise ValueError(f"ShortcutA: every src entry must be in -1..{in_channels - 1}, got {src}")
        self.in_channels = in_channels
        self.src = src
        self._pad = self.contiguous_padding(in_channels, src)
        index = [s if s >= 0 else in_channels for s in src]  # in_channels: the appended zero channel
        self.index = torch.tensor(index, dtype=torch.long, device=self.index.device)

    @staticmethod
    def contiguous_padding(in_channels: int, src: Sequence[int]) -> Optional[Tuple[int, int]]:
        """``(before, after)`` when ``src`` is "zeros, every input channel in order, zeros", else None."""
        src = list(src)
        before = 0
        while before < len(src) and src[before] == -1:
            before += 1
        if src[before:before + in_channels] != list(range(in_channels)):
            return None
        rest = src[before + in_channels:]
        return (before, len(rest)) if all(s == -1 for s in rest) else None

    @property
    def out_channels(self) -> Optional[int]:
        return len(self.src) if self.in_channels is not None else None

    @property
    def pad_before(self) -> Optional[int]:
        return self._pad[0] if self._pad is not None else None

    @property
    def pad_after(self) -> Optional[int]:
        return self._pad[1] if self._pad is not None else None

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x

    def _pad_forward(self, x: torch.Tensor, before: int, after: int) -> torch.Tensor:
        return F.pad(self._subsample(x), (0, 0, 0, 0, before, after))

    def _gather_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self._subsample(x), (0, 0, 0, 0, 0, 1))
        return torch.index_select(x, 1, self.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels is None:  # built without in_channels: learn it from the first input
            n = int(x.shape[1])
            self.set_map(n, [-1] * self._pad[0] + list(range(n)) + [-1] * self._pad[1])
        if self._pad is not None:
            return self._pad_forward(x, *self._pad)
        return self._gather_forward(x)

    def extra_repr(self) -> str:
        if self._pad is not None:
            return f"stride={self.stride}, pad=({self._pad[0]}, {self._pad[1]})"
        kept = sum(s >= 0 for s in self.src)
        return f"stride={self.stride}, in={self.in_channels}, out={len(self.src)} ({kept} copied, rest zero)"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(stride, planes // 4, planes // 4, in_channels=in_planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        layers: List[nn.Sequential] = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(num_blocks):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


MODELS: Dict[str, Callable[[], nn.Module]] = {
    f"resnet{6 * n + 2}": (lambda n=n: CifarResNet(n)) for n in (3, 5, 7, 9)
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A fresh, randomly initialised reference model by name (``resnet20`` … ``resnet56``)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise DataError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None
    return factory()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_checkpoint(path: Path) -> "tuple[Dict[str, torch.Tensor], Dict[str, object]]":
    """The state dict (``module.`` prefixes removed) and metadata (``best_prec1`` when present, the file's sha256)
    of an akamaster-format checkpoint (``{'state_dict', 'best_prec1'}``) or a bare state dict."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise DataError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state = ck.get("state_dict", ck) if isinstance(ck, dict) else None
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a dict with 'state_dict'")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    meta: Dict[str, object] = {"sha256": sha256_file(path)}
    if isinstance(ck, dict) and "best_prec1" in ck:
        meta["best_prec1"] = float(ck["best_prec1"])
    return state, meta


def _load_state(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not fit {type(model).__name__}: {e}") from None


def load_checkpoint(model: nn.Module, path: Path) -> Dict[str, object]:
    """Load an akamaster-format checkpoint (``{'state_dict', 'best_prec1'}``, ``module.`` prefixes) strictly.

    Returns the checkpoint's metadata (``best_prec1`` and the file's sha256).
    """
    state, meta = read_checkpoint(path)
    _load_state(model, state, Path(path))
    return meta


_BLOCK_KEY = re.compile(r"^layer1\.(\d+)\.conv1\.weight$")


def model_from_checkpoint(path: Path) -> "tuple[str, nn.Module, Dict[str, object]]":
    """A reference CIFAR ResNet built and loaded from a checkpoint file, its architecture recognised from the
    keys (blocks per stage → depth 6n+2). Returns the model name, the model in eval mode and the metadata."""
    path = Path(path)
    state, meta = read_checkpoint(path)
    blocks = {int(m.group(1)) for k in state for m in [_BLOCK_KEY.match(str(k))] if m}
    name = f"resnet{6 * len(blocks) + 2}" if blocks else ""
    if name not in MODELS:
        raise DataError(f"{path}: not a checkpoint of a known CIFAR ResNet ({', '.join(sorted(MODELS))}): "
                        "no layer1.N.conv1 weights found")
    model = build_model(name)
    _load_state(model, state, path)
    meta["path"] = str(path)
    return name, model.eval(), meta


def protected_layers(model: nn.Module, prune_residual: bool = False,
                     example_inputs: Optional[object] = None) -> List[nn.Module]:
    """Layers whose output channels channel pruning keeps by default, for any model.

    Every model: the stem and every output layer. The stem's outputs feed everything downstream at full resolution
    and cost few MACs; an output layer's channels are what the model returns.

    * With ``example_inputs`` (what :func:`edgeprune.prune.prune` passes), both are found by running the model
      once with forward hooks: the stem is the first conv that *runs* (not the first defined), and the output
      layers are, for every tensor the model returns (each head of a multi-output model), the last conv/linear
      layers on the autograd path to it.
    * Without, or when that forward pass fails: the first ``nn.Conv2d`` in definition order and the last
      ``nn.Linear``.

    (:func:`edgeprune.prune.prune` additionally never prunes a group whose channels reach a model output, whatever
    is protected.) Protecting a layer protects its whole dependency group: in a torchvision ResNet-18 the stem is
    coupled to ``layer1``'s identity shortcuts, so ``layer1``'s residual stream stays whole too.

    Option-A CIFAR ResNets (:class:`CifarResNet`; ``example_inputs`` does not change anything for them). Each
    stage's residual stream (the outputs of its blocks' second convs, and for stage 1 the stem's) meets the next
    stage through the parameter-free :class:`ShortcutA` (subsample + zero-pad). ``edgeprune.prune`` registers a
    Torch-Pruning pruner for ``ShortcutA`` that re-indexes its channel map instead of treating the pad as a
    channel-preserving op, so the streams on either side of a stage boundary are separate groups and can be
    pruned:

    * ``prune_residual=False`` (default): every block's second conv is protected as well, and these models are
      pruned inside each block only (conv1 → bn1 → conv2 input), as in Li et al., "Pruning Filters for
      Efficient ConvNets" (ICLR 2017). This was the only option before the ShortcutA pruner existed; it stays
      the default so that published results and existing plans reproduce.
    * ``prune_residual=True``: only the stem and the classifier are protected; the second convs of stages 2
      and 3 form one group per stage (with the input side of the ShortcutA leaving the stage and the output side
      of the one entering it). Stage 1's stream contains the protected stem and stays whole unless the stem is
      unprotected too (``ignored_layers=[model.linear]``). A pruned stream leaves a ShortcutA with a general
      channel map, which runs (and exports) as ``Pad`` + ``Gather`` instead of a single ``Pad``.
    """
    def trace_order(model: nn.Module, example_inputs: object) -> "tuple[List[nn.Module], List[nn.Module]]":
        """From one forward pass on ``example_inputs`` (eval mode, hooks only): the convs in the order they ran, and
        for each tensor the model returns the last conv/linear layers on the path to it (in output order)."""
        kinds = (nn.modules.conv._ConvNd, nn.Linear)
        ran: List[nn.Module] = []
        produced: Dict[object, nn.Module] = {}

        def hook(m: nn.Module, _inputs: object, out: object) -> None:
            ran.append(m)
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                produced[out.grad_fn] = m

        hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
        was_training = model.training
        model.eval()
        try:
            with torch.enable_grad():
                args = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
                args = tuple(a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
                             else a for a in args)
                out = model(*args)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        tensors: List[torch.Tensor] = []
        stack = [out]
        while stack:  # outputs in order: tensors, nested tuples/lists/dicts of them
            o = stack.pop(0)
            if isinstance(o, torch.Tensor):
                tensors.append(o)
            elif isinstance(o, (tuple, list)):
                stack[0:0] = list(o)
            elif isinstance(o, dict):
                stack[0:0] = list(o.values())
        heads: List[nn.Module] = []
        for t in tensors:
            seen, todo = set(), [t.grad_fn] if t.grad_fn is not None else []
            while todo:  # walk the autograd graph back from the output, stopping at conv/linear outputs
                fn = todo.pop(0)
                if fn in seen:
                    continue
                seen.add(fn)
                if fn in produced:
                    heads.append(produced[fn])
                    continue
                todo += [f for f, _ in getattr(fn, "next_functions", ()) if f is not None]
        convs = [m for m in ran if isinstance(m, nn.modules.conv._ConvNd)]
        return list(dict.fromkeys(convs)), list(dict.fromkeys(heads))

    if isinstance(model, CifarResNet):
        keep: List[nn.Module] = [model.conv1, model.linear]
        if not prune_residual:
            for layer in (model.layer1, model.layer2, model.layer3):
                keep += [block.conv2 for block in layer]
        return keep
    if example_inputs is not None:
        try:
            ran, heads = trace_order(model, example_inputs)
        except Exception:  # noqa: BLE001 - a model that does not run here fails later, with a better message
            ran, heads = [], []
        if ran or heads:
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            heads = heads or linears[-1:]
            return list(dict.fromkeys(ran[:1] + heads))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return ([convs[0]] if convs else []) + ([linears[-1]] if linears else [])


CHECKPOINTS: Dict[str, str] = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}
# Top-1 on the full 10,000-image CIFAR-10 test set published with these checkpoints (test error 8.27 %, …).
PUBLISHED_TOP1: Dict[str, float] = {"resnet20": 0.9173, "resnet32": 0.9263, "resnet44": 0.9310, "resnet56": 0.9339}


def checkpoint_path(name: str) -> Path:
    """Where the pretrained checkpoint for ``name`` is: the data directory first, then the bundled copy."""
    from .data import ASSETS, data_dir

    if name not in CHECKPOINTS:
        raise DataError(f"no pretrained checkpoint for model {name!r}; known: {', '.join(sorted(CHECKPOINTS))}")
    fname = CHECKPOINTS[name]
    d = data_dir()
    for candidate in ([d / fname] if d is not None else []) + [ASSETS / fname]:
        if candidate.is_file():
            return candidate
    raise DataError(f"{fname}: checkpoint for {name} not found; only resnet20 is bundled — set EDGEPRUNE_DATA "
                    "to the folder holding the other checkpoints")


def pretrained(name: str) -> "tuple[nn.Module, Dict[str, object]]":
    """The reference model ``name`` with its published weights, in eval mode, and the checkpoint metadata."""
    model = build_model(name)
    path = checkpoint_path(name)
    meta = load_checkpoint(model, path)
    meta["path"] = str(path)
    return model.eval(), meta
