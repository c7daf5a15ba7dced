"""Runtime backends: the registry of the runtimes a job names in ``runtime.name``, one module per runtime.

A backend is a :class:`~agent.runtimes.base.Runtime` subclass in its own module here, whose class attribute ``name``
is the name it is registered under, plus one line in ``_MEMBERS`` below::

    # agent/runtimes/myruntime.py
    class MyRuntime(Runtime):
        name = "myruntime"
        def version(self) -> str: ...
        def load(self, path, input_spec, threads, options) -> Session: ...

    # here, in _MEMBERS
    "myruntime": "agent.runtimes.myruntime:MyRuntime",

Contract: :func:`runtime_names` lists the registry and imports no backend module; :func:`get_runtime` imports the
named backend's module (importlib, on its first lookup) and returns a new instance; an unknown name is a
:class:`~agent.RuntimeBackendError` listing the known ones. Each backend imports its vendor runtime inside its own
methods, so the agent imports only the runtime a job asks for; a runtime that is not installed is a
:class:`~agent.RuntimeBackendError` that names it and says how to install it. Backend modules take their base
classes from :mod:`agent.runtimes.base` and never import this package's ``__init__``.

Backends: ``onnxruntime``, ``openvino``, ``tflite`` (LiteRT / tflite_runtime, optional Edge TPU delegate),
``tensorrt`` (engine built on the device from the ONNX artifact and cached) and ``torch`` (TorchScript).
"""
from __future__ import annotations

from typing import List, Type

from agent import RuntimeBackendError
from agent.registry import LazyRegistry
from agent.runtimes.base import Runtime, Session, check_input

__all__ = ["Runtime", "Session", "check_input", "get_runtime", "runtime_class", "runtime_names"]

# runtime.name -> "module:Class", one line per runtime
_MEMBERS = {
    "onnxruntime": "agent.runtimes.onnxruntime:OnnxRuntime",
    "openvino": "agent.runtimes.openvino:OpenVino",
    "tensorrt": "agent.runtimes.tensorrt:TensorRt",
    "tflite": "agent.runtimes.tflite:Tflite",
    "torch": "agent.runtimes.torch:TorchScript",
}

_RUNTIMES: "LazyRegistry[Runtime]" = LazyRegistry("runtime", RuntimeBackendError, _MEMBERS)


def runtime_names() -> List[str]:
    """The registered runtime names, sorted; imports no backend."""
    return _RUNTIMES.names()


def runtime_class(name: str) -> Type[Runtime]:
    """The backend class registered as ``name`` (its module imported now); RuntimeBackendError if unknown."""
    return _RUNTIMES.lookup(name)


def get_runtime(name: str) -> Runtime:
    return _RUNTIMES.lookup(name)()
