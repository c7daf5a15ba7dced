"""Architectures beyond the CIFAR ResNets, to exercise pruning on the structures edge models use.

* ``tv_resnet18``, ``tv_resnet50``, ``tv_mobilenet_v2``: re-implementations of torchvision's ResNet-18,
  ResNet-50 (Bottleneck with the stride on the 3x3 conv, "ResNet v1.5") and MobileNetV2 (inverted residuals,
  depthwise convs, ReLU6, ``width_mult=1.0``, channels rounded to multiples of 8). Module names, and so
  ``state_dict`` keys and shapes, are torchvision's, so torchvision's published weights would load with
  ``strict=True``; the weight initialisation follows torchvision's too. torchvision itself cannot be installed
  beside the CPU-only torch build this project pins (PyPI's torchvision wheel fails to import with it), hence the
  copies. They follow ``torchvision/models/resnet.py`` and ``torchvision/models/mobilenetv2.py``
  (torchvision is BSD-3-Clause, (c) Soumith Chintala 2016 and the torchvision contributors).
* ``concat_net``: a small CIFAR-size (32x32) network whose channels meet in ``torch.cat``: two Inception-style
  blocks (1x1 / 1x1→3x3 / maxpool→1x1 branches concatenated) around a DenseNet-style block (each layer's output
  concatenated onto its input), so pruning must re-index concatenated inputs, nested concatenations included.

Every model is built with random weights from a seed (:func:`build`); nothing is downloaded.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type, Union

import torch
import torch.nn as nn

__all__ = ["ARCHS", "INPUT_SIZE", "build", "ResNet", "BasicBlock", "Bottleneck", "MobileNetV2",
           "InvertedResidual", "Conv2dNormActivation", "ConcatNet", "resnet18", "resnet50", "mobilenet_v2",
           "concat_net"]


# ------------------------------------------------------------------------------------------------- ResNet

def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: the stride is on the 3x3 conv (conv2), as in "ResNet v1.5"."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        width = planes  # groups=1, base_width=64
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """torchvision's ResNet (groups=1, width_per_group=64, no dilation, BatchNorm, zero_init_residual=False)."""

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], num_classes: int = 1000) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: Type[Union[BasicBlock, Bottleneck]], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


# ---------------------------------------------------------------------------------------------- MobileNetV2

def _make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, not below ``min_value`` nor below 90 % of ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation with BatchNorm: conv (no bias), BatchNorm2d, activation."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 activation_layer: Callable[..., nn.Module] = nn.ReLU6) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
                         nn.BatchNorm2d(out_channels), activation_layer(inplace=True))
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1))  # pointwise expansion
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),  # depthwise
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),  # pointwise-linear projection
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup
        self._is_cn = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 (width_mult=1.0, round_nearest=8, dropout 0.2)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, round_nearest: int = 8,
                 dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = 32
        last_channel = 1280
        inverted_residual_setting = [
            # t, c, n, s
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = nn.functional.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes)


# ------------------------------------------------------------------------------------------------ ConcatNet

class ConvBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InceptionBlock(nn.Module):
    """Three branches on the same input, concatenated: 1x1; 1x1 → 3x3; 3x3 max-pool → 1x1."""

    def __init__(self, in_channels: int, b1: int, b3_reduce: int, b3: int, pool_proj: int) -> None:
        super().__init__()
        self.branch1 = ConvBNReLU(in_channels, b1, 1)
        self.branch3 = nn.Sequential(ConvBNReLU(in_channels, b3_reduce, 1), ConvBNReLU(b3_reduce, b3, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), ConvBNReLU(in_channels, pool_proj, 1))
        self.out_channels = b1 + b3 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch_pool(x)], 1)


class DenseBlock(nn.Module):
    """DenseNet-style: each layer's output is concatenated onto its input (``x = cat([x, layer(x)])``)."""

    def __init__(self, in_channels: int, growth: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConvBNReLU(in_channels + i * growth, growth, 3) for i in range(n_layers))
        self.out_channels = in_channels + n_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class ConcatNet(nn.Module):
    """A small CIFAR-size network built around channel concatenation (88 k parameters, 23 M MACs at 32x32)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ConvBNReLU(3, 32, 3)
        self.block1 = InceptionBlock(32, 16, 16, 32, 16)                  # 64 channels, 32x32
        self.pool1 = nn.MaxPool2d(2)
        self.dense = DenseBlock(self.block1.out_channels, 32, 2)         # 128 channels, 16x16
        self.transition = ConvBNReLU(self.dense.out_channels, 64, 1)
        self.pool2 = nn.AvgPool2d(2)
        self.block2 = InceptionBlock(64, 32, 32, 64, 32)                  # 128 channels, 8x8
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(self.stem(x)))
        x = self.pool2(self.transition(self.dense(x)))
        x = self.block2(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def concat_net(num_classes: int = 10) -> ConcatNet:
    return ConcatNet(num_classes)


# ------------------------------------------------------------------------------------------------- registry

ARCHS: Dict[str, Callable[..., nn.Module]] = {
    "tv_resnet18": resnet18,
    "tv_resnet50": resnet50,
    "tv_mobilenet_v2": mobilenet_v2,
    "concat_net": concat_net,
}
# The input size each was designed for (square RGB). The torchvision models are fully convolutional up to an
# adaptive pooling, so they also run (and prune) on smaller inputs, e.g. 64x64 in the tests.
INPUT_SIZE: Dict[str, int] = {"tv_resnet18": 224, "tv_resnet50": 224, "tv_mobilenet_v2": 224, "concat_net": 32}


def build(name: str, num_classes: Optional[int] = None, seed: int = 0) -> nn.Module:
    """A fresh model from :data:`ARCHS` in eval mode, initialised from ``seed`` (torch's global RNG is left as
    it was). ``num_classes`` defaults to the architecture's own default (1000 for the torchvision models, 10
    for ``concat_net``)."""
    from .errors import UsageError

    if name not in ARCHS:
        raise UsageError(f"arch: unknown architecture {name!r}; known: {', '.join(sorted(ARCHS))}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise UsageError(f"num_classes: must be an integer >= 1, got {num_classes!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHS[name]() if num_classes is None else ARCHS[name](num_classes=num_classes)
    return model.eval()
