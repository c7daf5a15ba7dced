"""Audit hook for the fault-injection devices (on their python's PYTHONPATH; see tests/faults/lab.py).

When ``EDGEPRUNE_FAULT_AUDIT`` names a file, every ``onnxruntime.InferenceSession`` created in this process
appends one JSON line to it: the model path and the sha256 of the bytes it is about to load. The fault tests
check every line against the artifact's known sha256: nothing is ever executed that the agent did not verify.
Standard library only; patches nothing unless onnxruntime is imported.

Two one-shot faults, the same for an agent per job (``python -m agent run``, ``agent lease release``) and an agent
session (``python -m agent serve``), each armed by an environment variable naming a flag file (it fires when the
flag does not exist, and creates it):

* ``EDGEPRUNE_FAULT_FLIP_ONCE``: when the agent opens a job's ``artifact/<name>`` to read it (its sha256 check:
  after the device helper's cache check, before any runtime loads it), one byte of the cached file behind the link
  is flipped first -- a disk flipping bits under the job;
* ``EDGEPRUNE_FAULT_CUT_RELEASE``: a lease release SIGKILLs sshd's session process (this agent's parent) instead of
  releasing, and the agent exits -- the connection lost while releasing.
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


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` right after the module ``name`` is imported (it is imported as usual first)."""

    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, name, path=None, target=None):
        if name != self.name:
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
            self.patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


_FLIP = os.environ.get("EDGEPRUNE_FAULT_FLIP_ONCE")
_CUT = os.environ.get("EDGEPRUNE_FAULT_CUT_RELEASE")


def _first_time(flag):
    try:
        os.close(os.open(flag, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return True
    except FileExistsError:
        return False


def _flip_hook(event, args):
    if event != "open" or not isinstance(args[0], (str, os.PathLike)) or "r" not in str(args[1] or "r"):
        return
    path = os.fspath(args[0])
    if isinstance(path, bytes) or os.path.basename(os.path.dirname(path)) != "artifact":
        return
    if "/jobs/" not in os.path.abspath(path) or not _first_time(_FLIP):
        return
    real = os.path.realpath(path)
    fd = os.open(real, os.O_RDWR)             # its own open event returns early: the flag exists now
    try:
        b = os.pread(fd, 1, 4096)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), 4096)
    finally:
        os.close(fd)


def _patch_release(module):
    """``agent.lease.release``, cut once: sshd's session (this agent's parent) SIGKILLed, the agent gone."""
    release = module.release

    def cut_release(*args, **kwargs):
        if _first_time(_CUT):
            os.kill(os.getppid(), 9)
            os._exit(1)
        return release(*args, **kwargs)

    module.release = cut_release


if _LOG:
    sys.meta_path.insert(0, _PatchOnImport("onnxruntime", _patch))
if _FLIP:
    sys.addaudithook(_flip_hook)
if _CUT:
    sys.meta_path.insert(0, _PatchOnImport("agent.lease", _patch_release))
