"""Channel counting shared by the pruner and the host's search (which plans candidates without importing torch)."""
from __future__ import annotations

import math


def kept_channels(n: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``n`` channels survive pruning ``ratio`` of them, rounded *up* to a multiple of
    ``round_to`` (hardware alignment) and never fewer than ``min_channels`` nor more than ``n``."""
    keep = max(min_channels, n - int(math.floor(n * ratio + 1e-9)))
    if round_to > 1:
        keep = int(math.ceil(keep / round_to) * round_to)
    return max(1, min(n, keep))
