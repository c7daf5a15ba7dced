"""Reference models: the CIFAR-10 ResNet family of He et al. (2016) with option-A shortcuts.

The architecture matches ``akamaster/pytorch_resnet_cifar10`` (BSD-2-Clause, (c) 2018 Yerlan Idelbayev),
whose published checkpoints load with ``strict=True`` after the ``module.`` prefix is stripped.

The option-A shortcut has no parameters: it subsamples ``x[:, :, ::2, ::2]`` and zero-pads the channel
dimension. It is an ``nn.Module`` (not a lambda) holding its padding explicitly, so that a pruned model whose
residual stream lost channels can still be described, saved and rebuilt from plain data.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Dict, List

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
    """Option-A shortcut: spatial subsample by ``stride`` and zero channels padded before/after."""

    def __init__(self, stride: int, pad_before: int, pad_after: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = pad_before
        self.pad_after = pad_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = ShortcutA(stride, planes // 4, planes // 4)

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


def load_checkpoint(model: nn.Module, path: Path) -> Dict[str, object]:
    """Load an akamaster-format checkpoint (``{'state_dict', 'best_prec1'}``, ``module.`` prefixes) strictly.

    Returns the checkpoint's metadata (``best_prec1`` and the file's sha256).
    """
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
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DataError(f"{path}: weights do not fit {type(model).__name__}: {e}") from None
    meta: Dict[str, object] = {"sha256": sha256_file(path)}
    if isinstance(ck, dict) and "best_prec1" in ck:
        meta["best_prec1"] = float(ck["best_prec1"])
    return meta


def protected_layers(model: nn.Module) -> List[nn.Module]:
    """Layers whose output channels channel pruning must keep, for this model family.

    For the option-A CIFAR ResNets the residual stream (stem conv and every block's second conv) is coupled
    through the parameter-free zero-padding shortcut, which no pruner can shrink consistently without
    re-indexing the padding; these models are pruned inside each block (conv1 → bn1 → conv2 input),
    as in Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017). The classifier is always kept.
    """
    keep: List[nn.Module] = []
    if isinstance(model, CifarResNet):
        keep += [model.conv1, model.linear]
        for layer in (model.layer1, model.layer2, model.layer3):
            keep += [block.conv2 for block in layer]
    return keep


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
