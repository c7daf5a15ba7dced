"""``--executor ray``: candidate builds as tasks on a Ray cluster (``pip install 'edgeprune[ray]'``).

The cluster is the one Ray itself would connect to: ``--ray-address`` (or ``address=``), else ``RAY_ADDRESS``,
else a cluster started on this machine with ``ray start --head``, else a new local one (``ray.init()``'s rule).
Each build is one task that asks for its CPUs (and a GPU when the build can use one) and sets torch to the host's
thread count, so its artifact is byte-identical to a local build. A worker rebuilds the model from the payload's
recipe (model source, arguments, weights: edgeprune opens them as the host would; never a pickle of a model) and
reads the data from the same paths, so every node must see the model, weights and data files at those paths (a
shared or identical folder). Its files come back as bytes in the task's result and are installed on the host
sha256-verified (:func:`host.executors.base.install`).

Faults: a worker (or its node) lost mid-build is Ray's to retry (``max_retries``, system failures only: a build
that raised is not retried); a task's result arrives once, so nothing is recorded twice, and a build writes only
into its worker's temp folder, so nothing half-written reaches the host. A cluster that cannot be reached, or is
lost while builds are outstanding, is one :class:`~edgeprune.errors.ExecutorError` naming the address; a search
resumed later (``--resume``) carries on from its completed evaluations. :meth:`RayExecutor.close` (also on Ctrl-C)
cancels what is still outstanding and disconnects; it never stops the cluster.
"""
from __future__ import annotations

import importlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from edgeprune.errors import EdgepruneError, ExecutorError, UsageError
from host.executors.base import Built, BuildTask, collect, here, install

MAX_RETRIES = 3                  # a worker or node lost mid-build: the task runs again, elsewhere if need be
CONNECT_TIMEOUT_S = 10.0         # a cluster address that does not answer this long is not there
LOST_AFTER_S = 5.0               # the cluster's GCS unreachable this long while waiting: the cluster is lost
# Ray's own rule ends a driver whose GCS stays unreachable for 60 s (the whole process, search included); the host
# notices after LOST_AFTER_S, says so, and disconnects: Ray's rule must not fire first
os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", "3600")
# and a call after the host disconnected must not start (or wait for) a new connection on its own
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray: Ray is not installed here: pip install 'edgeprune[ray]' (it installs "
                         "ray[default]); or use --executor local") from None
    return ray


def build_on_worker(remote: str, payload: Dict[str, Any], torch_threads: int,
                    env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """A Ray task's body: ``remote(payload, folder)`` in a temp folder of this worker, with the host's
    ``EDGEPRUNE_*`` environment (``env``: where the bundled data lives, ...); the folder's files, the build's
    record and where it ran."""
    import ray
    import torch

    os.environ.update(env or {})
    torch.set_num_threads(torch_threads)
    module, fn = remote.split(":")
    func = getattr(importlib.import_module(module), fn)
    folder = tempfile.mkdtemp(prefix="edgeprune-build-")
    t0 = time.perf_counter()
    try:
        info = func(payload, Path(folder))
        files = collect(Path(folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    ctx = ray.get_runtime_context()
    by = here("ray", time.perf_counter() - t0, node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
              torch_threads=torch_threads)
    return {"info": info, "files": files, "built_by": by}


class _RayHandle:
    def __init__(self, executor: "RayExecutor", task: BuildTask, ref: Any) -> None:
        self.executor, self.task, self.ref = executor, task, ref
        self._built: Optional[Built] = None

    def done(self) -> bool:
        if self._built is not None:
            return True
        if self.executor._closed or self.ref is None:
            return True              # result() says why
        ready, _ = self.executor.ray.wait([self.ref], timeout=0)
        return bool(ready)

    def result(self) -> Built:
        if self._built is None:
            try:
                out = self.executor.get(self.ref, self.task.label)
                install(out["files"], out["info"], self.task.dest, whole=self.task.whole)
            finally:
                self.executor.forget(self.ref)
            self._built = Built(out["info"], dict(out["built_by"], files=len(out["files"])))
            self.ref = None          # the bytes are installed: the object store may free them
        return self._built

    def cancel(self) -> None:
        if self.ref is not None:
            self.executor.cancel(self.ref)


class RayExecutor:
    name = "ray"
    synchronous = False

    def __init__(self, address: Optional[str] = None, torch_threads: Optional[int] = None,
                 max_retries: int = MAX_RETRIES) -> None:
        import torch

        self.ray = ray = _ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.torch_threads = int(torch_threads or torch.get_num_threads())
        self.max_retries = max_retries
        self._outstanding: List[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        where = self.address or "the local Ray cluster (ray start --head, or a new one)"
        if self.address and not _answers(self.address, CONNECT_TIMEOUT_S):
            # checked here: Ray itself waits as long as a lost cluster may take to come back (above)
            raise ExecutorError(f"--executor ray: cannot connect to the Ray cluster at {where}: nothing answers "
                                f"there within {CONNECT_TIMEOUT_S:g} s. Start one with `ray start --head` (or check "
                                "RAY_ADDRESS / --ray-address)")
        try:
            ray.init(address=self.address, ignore_reinit_error=True, log_to_driver=False,
                     logging_level="ERROR", include_dashboard=False if self.address is None else None)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            hint = "Start one with `ray start --head` (or check RAY_ADDRESS / --ray-address)"
            token = Path(os.path.expanduser("~/.ray/auth_token"))
            if os.environ.get("RAY_AUTH_MODE") is None and (token.is_file() or os.environ.get("RAY_AUTH_TOKEN")):
                # `ray start` turns token authentication on when a token exists; a driver sends it only when asked
                hint = (f"If the cluster uses token authentication ({token} exists), set RAY_AUTH_MODE=token "
                        "(Ray reads the token from that file or RAY_AUTH_TOKEN)")
            raise ExecutorError(f"--executor ray: cannot connect to the Ray cluster at {where}: {_first_line(e)}. "
                                f"{hint}") from None
        self.gcs = ray.get_runtime_context().gcs_address
        self.where = self.address or self.gcs
        self._task = ray.remote(build_on_worker)

    # -- the interface
    @property
    def builds_on_this_machine(self) -> bool:
        """True when a node of the cluster is this machine (a local device is then not measured beside a build)."""
        try:
            mine = self.ray.util.get_node_ip_address()
            return any(n.get("Alive") and n.get("NodeManagerAddress") == mine for n in self.ray.nodes())
        except Exception:  # noqa: BLE001 - unknown: assume it does (the safe answer)
            return True

    def describe(self) -> Dict[str, Any]:
        try:
            nodes = [{"node_id": n["NodeID"], "ip": n.get("NodeManagerAddress"),
                      "cpus": n.get("Resources", {}).get("CPU"), "gpus": n.get("Resources", {}).get("GPU", 0)}
                     for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # noqa: BLE001 - provenance only
            nodes = []
        return {"executor": "ray", "address": self.where, "ray_version": self.ray.__version__,
                "torch_threads": self.torch_threads, "nodes": nodes}

    def submit(self, task: BuildTask) -> _RayHandle:
        if self._closed:
            raise ExecutorError(f"{task.label}: the Ray executor for {self.where} is closed (its cluster was lost)")
        # as many CPUs as torch threads (two builds never share a core), and a GPU for a fine-tune when the cluster
        # has any (Ray hides the GPUs from a task that did not ask for one: it then trains on its CPUs)
        cpus = max(task.cpus, self.torch_threads)
        biggest = self._largest_node_cpus()
        if biggest and cpus > biggest:   # smaller nodes than this host: one build per node, oversubscribed
            cpus = biggest               # (rather than a task no node can ever take)
        opts: Dict[str, Any] = {"num_cpus": cpus, "max_retries": self.max_retries, "retry_exceptions": False}
        if task.gpus and self._cluster_gpus() > 0:
            opts["num_gpus"] = task.gpus
        try:
            env = {k: v for k, v in os.environ.items() if k.startswith("EDGEPRUNE_")}
            ref = self._task.options(**opts).remote(task.remote, task.payload, self.torch_threads, env)
        except Exception as e:  # noqa: BLE001 - a cluster gone between builds
            raise self._lost(e, task.label) from None
        with self._lock:
            self._outstanding.append(ref)
        return _RayHandle(self, task, ref)

    def close(self) -> None:
        with self._lock:
            left, self._outstanding = list(self._outstanding), []
        for ref in left:
            self.cancel(ref)
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.ray.shutdown()      # leaves the cluster; never stops it
        except Exception:  # noqa: BLE001 - closing
            pass

    # -- helpers for the handles
    def get(self, ref: Any, label: str) -> Dict[str, Any]:
        """The task's result; waits while the cluster answers (ExecutorError once it has been gone LOST_AFTER_S)."""
        exc = self.ray.exceptions
        gone_since: Optional[float] = None
        if self._closed:
            raise ExecutorError(f"{label}: lost the Ray cluster at {self.where} before it was built")
        try:
            while True:
                ready, _ = self.ray.wait([ref], timeout=1.0)
                if ready:
                    return self.ray.get(ref)
                if self._gcs_answers():
                    gone_since = None
                    continue
                gone_since = gone_since if gone_since is not None else time.monotonic()
                if time.monotonic() - gone_since > LOST_AFTER_S:
                    raise ConnectionError(f"its GCS ({self.gcs}) has not answered for {LOST_AFTER_S:g} s")
        except exc.RayTaskError as e:            # the build raised: its own error, not the cluster's
            cause = getattr(e, "cause", None)
            if isinstance(cause, EdgepruneError):
                raise cause from None
            raise ExecutorError(f"{label}: the build failed on a Ray worker: {_first_line(e)}") from None
        except exc.TaskCancelledError:
            raise ExecutorError(f"{label}: the Ray task was cancelled") from None
        except (exc.WorkerCrashedError, exc.NodeDiedError, exc.ObjectLostError) as e:
            raise ExecutorError(f"{label}: the Ray worker building it was lost {self.max_retries + 1} times "
                                f"({type(e).__name__}); is the cluster at {self.where} healthy?") from None
        except (exc.RaySystemError, ConnectionError, exc.GetTimeoutError) as e:
            self.close()                 # disconnect now: nothing more can come from that cluster
            raise self._lost(e, label) from None

    def forget(self, ref: Any) -> None:
        with self._lock:
            if ref in self._outstanding:
                self._outstanding.remove(ref)

    def cancel(self, ref: Any) -> None:
        self.forget(ref)
        if self._closed:             # disconnected (the cluster was lost): nothing to cancel through
            return
        try:
            self.ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished, or the cluster is gone
            pass

    def _largest_node_cpus(self) -> float:
        try:
            return max((float(n.get("Resources", {}).get("CPU", 0)) for n in self.ray.nodes() if n.get("Alive")),
                       default=0.0)
        except Exception:  # noqa: BLE001 - unknown: ask for what the host has
            return 0.0

    def _cluster_gpus(self) -> float:
        try:
            return float(self.ray.cluster_resources().get("GPU", 0))
        except Exception:  # noqa: BLE001 - unknown: no GPU asked for (a task asking for one might never run)
            return 0.0

    def _gcs_answers(self) -> bool:
        return _answers(str(self.gcs), 1.0)

    def _lost(self, e: BaseException, label: str) -> ExecutorError:
        return ExecutorError(f"{label}: lost the Ray cluster at {self.where} ({type(e).__name__}: "
                             f"{_first_line(e)}); what finished is kept (a search continues with --resume once it is back)")


def _answers(address: str, within_s: float) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``within_s`` (True for an address that is not
    ``host:port``, such as ``ray://...``: Ray checks those)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return True
    deadline = time.monotonic() + within_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
