"""What every runtime backend shares: :class:`Session` (a loaded model), :class:`Runtime` (a backend:
``version`` and ``load``), :func:`check_input` (the model's input against the job's artifact spec) and two small
helpers.

Contract: imports numpy and the agent's errors and schema only (no vendor runtime, and never :mod:`agent.runtimes`
itself, which imports this module); every backend module takes its base classes from here.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from agent import RuntimeBackendError
from agent.schema import ArtifactSpec


class Session(abc.ABC):
    """A loaded model. ``input_shape`` is the model's own input shape, ``None`` where a dimension is dynamic.

    ``run`` returns the model's output 0 (what the timed window runs: the whole model still computes every
    output); ``run_all`` returns every output as float32 numpy arrays, in the model's output order (the ONNX
    graph's output order, which the ONNX exporter takes from the torch forward: a tuple or list in order, a dict
    in insertion order). The eval phase scores ``run_all``. The default ``run_all`` is ``[run(x)]``, right for a
    backend whose models have one output only."""

    input_name: str
    input_shape: List[Optional[int]]
    info: Dict[str, Any]  # what the backend actually applied (providers, ...), recorded in the report

    @abc.abstractmethod
    def run(self, inputs: np.ndarray) -> np.ndarray:
        ...

    def run_all(self, inputs: np.ndarray) -> List[np.ndarray]:
        return [np.asarray(self.run(inputs), dtype=np.float32)]


def _float32(outputs: Sequence[Any]) -> List[np.ndarray]:
    return [np.asarray(o, dtype=np.float32) for o in outputs]


class Runtime(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def version(self) -> str:
        ...

    @abc.abstractmethod
    def load(self, path: Path, input_spec: ArtifactSpec, threads: int, options: Dict[str, Any]) -> Session:
        ...


def check_input(actual_name: str, actual_shape: List[Optional[int]], spec: ArtifactSpec) -> None:
    """Refuse a model whose input does not match the job's artifact spec (dynamic dimensions match anything)."""
    if actual_name != spec.input_name:
        raise RuntimeBackendError("model input is named %r but artifact.input_name is %r"
                                  % (actual_name, spec.input_name))
    expected = list(spec.input_shape)
    same = len(actual_shape) == len(expected) and all(a is None or a == e for a, e in zip(actual_shape, expected))
    if not same:
        shown = ["?" if a is None else a for a in actual_shape]
        raise RuntimeBackendError("model input %r has shape [%s] but artifact.input_shape is %s"
                                  % (actual_name, ", ".join(map(str, shown)), expected))


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else repr(e)
