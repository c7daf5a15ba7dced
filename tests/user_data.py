"""Importable ``MODULE:CALLABLE`` factories for tests/test_datasets.py (``tests.user_data:build``, ...)."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

HW = (16, 12)


class Tiny(Dataset):
    """Already-preprocessed items: item i is a 3 x 16 x 12 tensor filled with i, label i % 3."""

    classes = ["a", "b", "c"]

    def __init__(self, n: int = 10, labelled: bool = True):
        self.n, self.labelled = n, labelled
        self.calls = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.calls += 1
        return torch.full((3,) + HW, float(i)), (i % 3 if self.labelled else None)


class WithTargets(Tiny):
    @property
    def targets(self):
        return [i % 3 for i in range(self.n)]


def build():
    return Tiny()


def build_unlabelled():
    return Tiny(labelled=False)


def build_with_targets():
    return WithTargets()


def build_list():
    return [(torch.zeros(3, *HW), 0)]


def build_raises():
    raise ValueError("no such split 'val'")


def build_wrong_shape():
    class Wrong(Tiny):
        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), 0

    return Wrong()


NOT_CALLABLE = 42
