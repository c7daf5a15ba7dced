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


class Heads(torch.nn.Module):
    """Conv -> ReLU -> global average pool -> one Linear head per entry of ``sizes``, returned in that order (a
    tuple, or a dict with ``keys`` in that insertion order). Sizes that are not sorted and keys that are not
    alphabetical catch any backend that orders outputs by size or by name instead of the model's order."""

    def __init__(self, sizes: Any = (12, 7, 3), keys: Any = None, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.heads = torch.nn.ModuleList([torch.nn.Linear(8, n) for n in sizes])
        self.keys = list(keys) if keys is not None else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: Any) -> Any:
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        outs = [h(f) for h in self.heads]
        if self.keys is not None:
            return dict(zip(self.keys, outs))
        return tuple(outs)


def export_onnx(model: Any, path: Any, size: int = 32, output_names: Any = None, batch: Any = None) -> None:
    """``torch.onnx.export(dynamo=False)``: a dynamic batch unless ``batch`` is given."""
    import warnings

    names = list(output_names) if output_names is not None else None
    dynamic = None
    if batch is None:
        dynamic = {"input": {0: "N"}}
        dynamic.update({n: {0: "N"} for n in names or []})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model.eval(), (torch.zeros(batch or 1, 3, size, size),), str(path), dynamo=False,
                          input_names=["input"], output_names=names, dynamic_axes=dynamic, opset_version=17)
