"""Audit hook for the fault-injection devices (on their python's PYTHONPATH; see tests/faults/lab.py).

When ``EDGEPRUNE_FAULT_AUDIT`` names a file, every ``onnxruntime.InferenceSession`` created in this process
appends one JSON line to it: the model path and the sha256 of the bytes it is about to load. The fault tests
check every line against the artifact's known sha256: nothing is ever executed that the agent did not verify.
Standard library only; patches nothing unless onnxruntime is imported.
"""
import hashlib
import importlib.abc
import importlib.util
import json
import os
import sys

_LOG = os.environ.get("EDGEPRUNE_FAULT_AUDIT")


def _record(model):
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        path = os.fspath(model)
    else:
        digest, path = hashlib.sha256(bytes(model)).hexdigest(), "<bytes>"
    line = json.dumps({"pid": os.getpid(), "path": path, "sha256": digest}) + "\n"
    fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _patch(module):
    cls = module.InferenceSession
    original = cls.__init__

    def __init__(self, path_or_bytes, *args, **kwargs):
        _record(path_or_bytes)
        original(self, path_or_bytes, *args, **kwargs)

    cls.__init__ = __init__


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _LOG:
    sys.meta_path.insert(0, _Finder())
