"""What an executor runs: a :class:`BuildTask` (one candidate's prune → recovery → export → verify → manifest),
and what comes back: a :class:`Built` (the build's own record, where it ran, how long it took).

A task carries two ways to run the same build:

* ``local(dest)``: a closure over the caller's already-open model and data, writing straight into ``dest``
  (:class:`host.executors.local.LocalExecutor`: what the host always did, as fast as before);
* ``remote`` + ``payload``: the name of a module-level function (``"package.module:function"``) and its JSON-able
  arguments, from which any machine with edgeprune installed and the same input paths rebuilds the model from its
  recipe (model source, arguments, weights: never a pickle) and builds into a folder of its own. Its files come back
  as bytes and :func:`install` puts them in ``dest`` on the host: sha256-verified against the manifest the build
  wrote, renamed into place as a whole, so a half-written artifact never exists there.

The function is called as ``function(payload, dest) -> dict`` (the build's record, JSON-able; ``"manifest"`` names
the manifest file in ``dest``).
"""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence

from edgeprune.errors import ExportError


@dataclass
class BuildTask:
    label: str                                   # for progress and errors: the candidate's tag
    dest: Path                                   # the folder the artifact ends up in, on the host
    local: Callable[[Path], Dict[str, Any]]      # builds into its argument with the caller's open model and data
    remote: str                                  # "module:function", importable on every worker
    payload: Dict[str, Any] = field(default_factory=dict)
    whole: bool = True                           # dest is the build's own folder (else shared: files merged in)
    cpus: float = 1.0                            # what one build needs (a Ray task's resources)
    gpus: float = 0.0


@dataclass
class Built:
    info: Dict[str, Any]                         # the build function's record
    built_by: Dict[str, Any]                     # executor, node, host name, seconds: provenance

    def __getitem__(self, key: str) -> Any:      # the record's fields, as the callers read them
        return self.info[key]


class Handle(Protocol):
    """A submitted build: ``result()`` waits for it (raising the build's error), ``done()`` says whether it has
    finished, ``cancel()`` gives it up."""

    def result(self) -> Built: ...

    def done(self) -> bool: ...

    def cancel(self) -> None: ...


class Executor(Protocol):
    name: str
    synchronous: bool      # submit() runs the build before it returns (nothing runs in parallel): take each at once

    def submit(self, task: BuildTask) -> Handle:
        """Start (or queue) the build."""

    def describe(self) -> Dict[str, Any]:
        """What the results record about the executor (name, cluster address, nodes)."""

    @property
    def builds_on_this_machine(self) -> bool:
        """Whether builds may run on the machine the host runs on (a local device is then not measured while
        builds are in flight)."""

    def close(self) -> None:
        """Cancel what is still outstanding; leave the cluster (not stop it)."""


PATH_FIELDS = ("model", "weights", "data", "calib_data", "finetune_data", "cache_dir", "out")
MODEL_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".yaml", ".yml", ".th", ".tar")


def absolute_paths(doc: Mapping[str, Any], fields: Sequence[str] = PATH_FIELDS) -> Dict[str, Any]:
    """``doc`` (a command's options) with its relative file paths made absolute, as a worker elsewhere must read
    them (its working folder is not the host's): a value that names an existing file or folder here, and the file
    of ``path.py:callable``. Names that are not paths (a built-in model, ``package.module:callable``) stay."""
    out = dict(doc)
    for name in fields:
        v = out.get(name)
        if not isinstance(v, str) or not v or os.path.isabs(v):
            continue
        head, sep, tail = v.partition(":")
        if sep and head.endswith(".py") and os.path.exists(head):
            out[name] = os.path.abspath(head) + ":" + tail
        elif name == "model" and "/" not in v and not v.endswith(MODEL_FILE_SUFFIXES):
            continue                  # a built-in name, even where a file of that name happens to exist
        elif os.path.exists(v) or name in ("cache_dir", "out"):
            out[name] = os.path.abspath(v)
    return out


_OPENED: Dict[str, Any] = {}                     # key -> (context, close)
_OPENED_LOCK = threading.Lock()


def worker_context(key: str, open_: Callable[[], Any], close: Callable[[Any], None] = lambda c: None) -> Any:
    """What a worker process opened for one run (the model and data its builds need): opened by ``open_`` on the
    run's first task in this process and reused by the later ones; another run's context is closed first (one run
    at a time per worker process)."""
    with _OPENED_LOCK:
        if key not in _OPENED:
            for context, closing in _OPENED.values():
                closing(context)
            _OPENED.clear()
            _OPENED[key] = (open_(), close)
        return _OPENED[key][0]


def here(executor: str, seconds: float, **more: Any) -> Dict[str, Any]:
    """The provenance of a build that ran in this process."""
    return dict(executor=executor, hostname=socket.gethostname(), pid=os.getpid(), seconds=round(seconds, 3), **more)


def run_local(task: BuildTask, executor: str = "local") -> Built:
    t0 = time.perf_counter()
    info = task.local(task.dest)
    return Built(info, here(executor, time.perf_counter() - t0))


def collect(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> bytes): what a remote build sends back."""
    out: Dict[str, bytes] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[p.relative_to(folder).as_posix()] = p.read_bytes()
    return out


def install(files: Mapping[str, bytes], info: Mapping[str, Any], dest: Path, *, whole: bool = True) -> None:
    """Put a remote build's ``files`` in ``dest``: written to a sibling temp folder and checked against the manifest
    the build wrote (``info["manifest"]``: every artifact file's sha256), then renamed into place: the folder as a
    whole (``whole``), or file by file into a folder other builds share (their names are the build's own). Nothing
    is installed when a file is missing or does not match (ExportError)."""
    from edgeprune import export

    if not files:
        return                            # a task that returns only its record (a sensitivity share)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(".%s.partial-%s" % (dest.name, secrets.token_hex(4)))
    try:
        for rel, data in files.items():
            if rel.startswith("/") or ".." in Path(rel).parts:
                raise ExportError("%s: the build sent back a file outside its folder: %r" % (dest, rel))
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        manifest = info.get("manifest")
        if manifest:
            export.Manifest.read(tmp / str(manifest)).check_files(tmp)
        if not whole:
            dest.mkdir(parents=True, exist_ok=True)
            for rel in files:
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / rel, dest / rel)
            return
        old: Optional[Path] = None
        if dest.exists():
            old = dest.with_name(".%s.old-%s" % (dest.name, secrets.token_hex(4)))
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
