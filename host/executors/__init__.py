"""Where candidate builds run: executors (:mod:`host.executors.base`: the task, the result, the interface).

A new executor is a new module here plus one line in :data:`EXECUTORS`.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict

from edgeprune.errors import ExecutorError, UsageError
from host.executors.base import BuildTask, Built, Executor

EXECUTORS: Dict[str, str] = {
    "local": "host.executors.local:LocalExecutor",       # this process, one build after the other (the default)
    "ray": "host.executors.ray_cluster:RayExecutor",     # tasks on a Ray cluster (pip install 'edgeprune[ray]')
}

__all__ = ["EXECUTORS", "BuildTask", "Built", "Executor", "ExecutorError", "open_executor"]


def open_executor(name: str = "local", **options: Any) -> Executor:
    """The executor ``name`` (``--executor``), opened with its options (``ray``: ``address``, ``torch_threads``)."""
    if name not in EXECUTORS:
        raise UsageError(f"--executor: unknown executor {name!r}; known: {', '.join(sorted(EXECUTORS))}")
    module, cls = EXECUTORS[name].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
