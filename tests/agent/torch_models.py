"""Torch twins of the conftest ONNX graphs, for the tests that need torch (the agent's conftest stays torch-free)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Tiny(torch.nn.Module):
    """The conftest ONNX graph in torch: Conv 1x1 (no bias) -> mean over H, W -> Linear."""

    def __init__(self, conv_w: np.ndarray, w: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1, bias=False)
        self.fc = torch.nn.Linear(3, 10)
        with torch.no_grad():
            self.conv.weight.copy_(torch.from_numpy(np.array(conv_w)))
            self.fc.weight.copy_(torch.from_numpy(np.array(w)))
            self.fc.bias.copy_(torch.from_numpy(np.array(b)))

    def forward(self, x: Any) -> Any:
        return self.fc(self.conv(x).mean(dim=(2, 3)))
