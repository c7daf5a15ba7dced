"""A small MobileNetV3-style network for 64x64 inputs, written as a user would, with two heads.

Stem conv (stride 2, hard-swish); inverted residual blocks (1x1 expansion, depthwise conv, squeeze-excitation
with a hard-sigmoid gate, 1x1 projection); one block's squeeze-excitation uses ``nn.Linear`` layers instead of
1x1 convs; one ResNeXt-style block whose 3x3 conv is grouped (``groups=4``); a 1x1 conv to 240 features, global
pooling, and two heads: ``forward`` returns ``(class_logits [N, num_classes], aux [N, 4])``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

__all__ = ["TwoHeadNet", "build", "two_head_net", "INPUT_SIZE"]

INPUT_SIZE = 64


def _div8(v: float) -> int:
    return max(8, int(v + 4) // 8 * 8)


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision-style SE: average pool, 1x1 reduce conv, ReLU, 1x1 expand conv, hard-sigmoid, scale."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.activation = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class LinearSE(nn.Module):
    """SE with linear layers on the pooled vector (the "classic" Hu et al. formulation)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Linear(channels, squeeze)
        self.expand = nn.Linear(squeeze, channels)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        s = self.gate(self.expand(torch.relu(self.reduce(x.mean((2, 3))))))
        return x * s.view(n, c, 1, 1)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expanded: int, cout: int, k: int, stride: int, se: str = "", act=nn.ReLU):
        super().__init__()
        layers = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=act))
        if se == "conv":
            layers.append(SqueezeExcitation(expanded, _div8(expanded // 4)))
        elif se == "linear":
            layers.append(LinearSE(expanded, _div8(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_res else out


class GroupedBlock(nn.Module):
    """ResNeXt-style bottleneck: 1x1, grouped 3x3 (``groups``), 1x1, with an identity shortcut."""

    def __init__(self, channels: int, width: int, groups: int = 4):
        super().__init__()
        self.reduce = ConvBNAct(channels, width, 1, act=nn.ReLU)
        self.grouped = ConvBNAct(width, width, 3, groups=groups, act=nn.ReLU)
        self.expand = ConvBNAct(width, channels, 1, act=None)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.expand(self.grouped(self.reduce(x))))


class TwoHeadNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0, aux_outputs: int = 4):
        super().__init__()
        c = lambda v: _div8(v * width)  # noqa: E731
        self.stem = ConvBNAct(3, c(16), 3, 2)                                              # 32x32
        self.features = nn.Sequential(
            InvertedResidual(c(16), c(16), c(16), 3, 1, se="conv"),
            InvertedResidual(c(16), c(64), c(24), 3, 2),                                   # 16x16
            InvertedResidual(c(24), c(72), c(24), 3, 1),
            InvertedResidual(c(24), c(96), c(40), 5, 2, se="conv", act=nn.Hardswish),     # 8x8
            InvertedResidual(c(40), c(120), c(40), 5, 1, se="linear", act=nn.Hardswish),
            GroupedBlock(c(40), c(64), groups=4),
            ConvBNAct(c(40), c(240), 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c(240), 128), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(128, num_classes))
        self.aux = nn.Linear(c(240), aux_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)  # not all ones: gives the criteria something to rank
                nn.init.normal_(m.bias, 0, 0.1)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.05)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.features(self.stem(x))
        x = torch.flatten(self.pool(x), 1)
        return self.classifier(x), self.aux(x)


def build(num_classes: int = 10, width: float = 1.0) -> TwoHeadNet:
    return TwoHeadNet(num_classes, width)


def two_head_net(num_classes: int = 10, width: float = 1.0, seed: int = 0) -> TwoHeadNet:
    """:func:`build` from a fixed seed (torch's global RNG is left as it was), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build(num_classes, width).eval()
