"""``--executor ray`` against a real local Ray cluster: ``ray start --head`` with 2 CPUs, started by this module and
stopped after it (``pip install 'edgeprune[ray]'``).

The demo (of a user's model file, named by relative paths) and a small search built on Ray give the plans, MACs
and artifact bytes the local executor gives, and so does the sensitivity table; a Ray
worker SIGKILLed mid-build is retried and every candidate is recorded once; a cluster stopped mid-run is one clear
error naming its address, and ``--resume`` carries on once it is back; a cluster that is not there fails before
anything is recorded; a cancelled build stops on its worker. The commands run as a user runs them, each in its own
process (a Ray driver is process-wide); the sensitivity table and the cancel connect from this process.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import psutil
import pytest

from host.results.store import Store
from tests.test_demo import edgeprune

pytest.importorskip("ray", reason="Ray is an optional dependency: pip install 'edgeprune[ray]'")
pytestmark = [pytest.mark.ray]

RAY = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
BUILD_PROCESS = "ray::build_on_worker"       # a Ray worker's process title while it runs a build


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A one-node Ray cluster on this machine (the head: 2 CPUs), at ``address``."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.address = "127.0.0.1:%d" % self.port

    def start(self) -> None:
        r = subprocess.run([RAY, "start", "--head", "--port", str(self.port), "--num-cpus", "2",
                            "--disable-usage-stats", "--include-dashboard=false"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr

    def stop(self) -> None:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, text=True, timeout=120)

    def env(self) -> Dict[str, str]:
        return dict(os.environ, RAY_ADDRESS=self.address)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    c.start()
    try:
        yield c
    finally:
        c.stop()


def build_processes() -> List[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if BUILD_PROCESS in " ".join(p.info["cmdline"] or []):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def wait_for(what, fn, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        got = fn()
        if got:
            return got
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(poll_s)


def demo(tmp_path: Path, name: str, *extra: str, env=None, timeout=600) -> subprocess.CompletedProcess:
    return edgeprune("demo", "--quick", "--eval-per-class", "20", "--out", str(tmp_path / name), "--db",
                     str(tmp_path / "results.db"), *extra, env=env, cwd=tmp_path, timeout=timeout)


def artifacts(folder: Path) -> Dict[str, str]:
    """Every artifact and plan of a demo: file name -> sha256."""
    from edgeprune.models import sha256_file

    return {p.name: sha256_file(p) for p in sorted((folder / "artifacts").iterdir())
            if p.suffix in (".onnx", ".json") and not p.name.startswith(".")}


def _provenance(run: dict) -> dict:
    p = run["provenance"]
    return json.loads(p) if isinstance(p, str) else p


def summary(folder: Path) -> List[Dict[str, str]]:
    return list(csv.DictReader(io.StringIO((folder / "summary.csv").read_text())))


# ------------------------------------------------------------------------------------------ same results as local
SEARCH = ("--model", "resnet20", "--max-accuracy-drop", "60", "--quick", "--final-repeat", "1",
          "--allocation", "uniform", "--finetune-epochs", "0", "--eval-per-class", "20")   # builds on Ray: what counts


def _fleet(tmp_path: Path) -> Path:
    d = tmp_path / "fleet8"
    if not d.is_dir():
        d.mkdir()
        (d / "local8.yaml").write_text(f"id: local8\nclass: local\nround_to: 8\ncache_dir: {tmp_path / 'dc'}\n")
    return d


def search(tmp_path: Path, run_id: str, *extra: str, target: str = "latency_p50_ms=0.8x",
           env=None) -> subprocess.CompletedProcess:
    return edgeprune("search", *SEARCH, "--target", target, "--fleet", str(_fleet(tmp_path)), "--run-id", run_id, "--cache-dir",
                     str(tmp_path / "cache"), "--db", str(tmp_path / "results.db"), *extra, env=env, cwd=tmp_path)


def device_records(tmp_path: Path, run_id: str) -> List[dict]:
    lines = (tmp_path / "results" / "search" / run_id / "evaluations.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "device"]


@pytest.mark.slow
def test_search_on_ray_matches_local(tmp_path, cluster):
    local = search(tmp_path, "s-local", "--max-evals", "3")
    assert local.returncode == 0, local.stdout + local.stderr
    remote = search(tmp_path, "s-ray", "--max-evals", "3", "--executor", "ray", env=cluster.env())
    assert remote.returncode == 0, remote.stdout + remote.stderr

    def seen(run_id):
        return [(r["key"], r["artifact_sha256"], r["plan_sha256"], r["macs_counted"]) for r in
                device_records(tmp_path, run_id)]

    assert len(seen("s-local")) >= 2 and seen("s-local") == seen("s-ray")
    for r in device_records(tmp_path, "s-ray"):
        assert r["built_by"]["executor"] == "ray" and r["built_by"]["node_id"], r["built_by"]
    assert {r["built_by"]["executor"] for r in device_records(tmp_path, "s-local")} == {"local"}


# ------------------------------------------------------------------------------------------ faults
def fault(what: str, expected: str):
    return pytest.mark.reliability(kind="fault", what=what, expected=expected)


@fault("Ray worker SIGKILLed mid-build (--executor ray)",
       "Ray retries the task on a new worker; every candidate measured and recorded once; nothing half-installed")
def test_worker_killed_mid_build_is_retried_and_every_candidate_recorded_once(tmp_path, cluster):
    killed: List[int] = []

    def kill_one() -> None:
        pid = wait_for("a build on a Ray worker", build_processes, 120)[0]
        time.sleep(1.0)                                 # mid-build: loading the model, pruning, recalibrating
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    t = threading.Thread(target=kill_one, daemon=True)
    t.start()
    r = demo(tmp_path, "killed", "--ratios", "0.3,0.5", "--finetune-epochs", "1", "--finetune-per-class", "20",
             "--finetune-seconds", "120", "--executor", "ray", env=cluster.env())
    t.join(5)
    assert r.returncode == 0, r.stdout + r.stderr
    assert killed, "no build was seen running"
    rows = summary(tmp_path / "killed")
    assert [x["ratio"] for x in rows] == ["0.3", "0.5"] and all(x["status"] == "ok" for x in rows)
    doc = json.loads((tmp_path / "killed" / "demo.json").read_text())
    assert killed[0] not in {by["pid"] for by in doc["built_by"].values()}    # the retry's worker built it
    with Store(str(tmp_path / "results.db")) as store:
        (run,) = [x for x in store.list_runs() if x["kind"] == "demo"]
        assert sorted(m["key"] for m in store.measurements(run["run_id"])) == ["resnet20-r030", "resnet20-r050"]
    assert not list((tmp_path / "killed" / "artifacts").glob(".*partial*"))


@pytest.mark.slow
@fault("Ray cluster stopped (`ray stop`) mid-search",
       "one error naming the cluster's address within 30 s (not Ray's 60-s driver exit); `--resume` carries on, "
       "each candidate once")
def test_cluster_stopped_mid_search_is_one_clear_error_and_resume_carries_on(tmp_path, cluster):
    c = cluster            # `ray stop` stops every cluster on this machine: the module's, started again after
    try:
        stopped: List[float] = []

        def stop_when_building() -> None:      # after the first candidate is measured, while the next one builds
            records = tmp_path / "results" / "search" / "lost" / "evaluations.jsonl"
            wait_for("a completed evaluation", lambda: records.is_file() and records.read_text().strip(), 300)
            wait_for("the next build", build_processes, 300, 0.05)
            c.stop()
            stopped.append(time.monotonic())

        t = threading.Thread(target=stop_when_building, daemon=True)
        t.start()
        r = search(tmp_path, "lost", "--max-evals", "6", "--executor", "ray", target="latency_p50_ms=0.3x",
                   env=c.env())
        ended = time.monotonic()
        t.join(5)
        assert stopped, r.stdout + r.stderr
        assert r.returncode == 1, r.stdout + r.stderr
        msg = " ".join(r.stderr.split())
        assert f"lost the Ray cluster at {c.address}" in msg and "--resume" in msg, msg[-2000:]
        assert ended - stopped[0] < 30                 # found by the host (5 s), not by Ray's 60-s driver exit
        done = device_records(tmp_path, "lost")
        assert len(done) >= 1

        c.start()                                      # back: the search carries on from what was finished
        r2 = edgeprune("search", "--resume", "lost", "--executor", "ray", "--db", str(tmp_path / "results.db"),
                       env=c.env(), cwd=tmp_path)
        assert r2.returncode in (0, 1), r2.stdout + r2.stderr     # 1: the 0.3x target is not met
        after = device_records(tmp_path, "lost")
        keys = [x["key"] for x in after]
        assert len(keys) == len(set(keys)) and len(after) > len(done)     # each candidate once
        assert after[:len(done)] == done
    finally:
        c.stop()
        c.start()


@fault("Ray cluster address that nothing answers", "one error naming the address; nothing recorded")
def test_unreachable_cluster_is_one_error_naming_its_address_before_anything_is_recorded(tmp_path):
    address = "127.0.0.1:%d" % _free_port()
    r = demo(tmp_path, "nowhere", "--ratios", "0", "--executor", "ray", "--ray-address", address, timeout=180)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot connect to the Ray cluster at {address}" in " ".join(r.stderr.split()), r.stderr[-2000:]
    if (tmp_path / "results.db").exists():
        with Store(str(tmp_path / "results.db")) as store:
            assert store.list_runs() == []


def test_ray_address_without_the_ray_executor_is_a_usage_error(tmp_path):
    r = demo(tmp_path, "x", "--ray-address", "127.0.0.1:1")
    assert r.returncode == 2 and "--ray-address: only with --executor ray" in r.stderr, r.stderr


def test_sensitivity_table_on_ray_equals_the_local_one(tmp_path, cluster, resnet20):
    from host.executors import open_executor
    from host.search import options as so
    from host.search.space import sensitivity_table

    model, meta = resnet20

    def table(executor, cache):
        opts = so.SearchOptions(model="resnet20", sensitivity_per_class=5, cache_dir=str(tmp_path / cache))
        return sensitivity_table(model, "resnet20", meta, opts, lambda *a: None, executor=executor)

    here = table(None, "local")
    ex = open_executor("ray", address=cluster.address)
    try:
        assert ex.describe()["address"] == cluster.address
        remote = table(ex, "ray")
    finally:
        ex.close()
    assert len(here) == 9 and remote == here        # every group, the same drops, in the same order
    assert list(remote) == list(here)



@fault("a Ray build cancelled (Ctrl-C, a failed round)", "its worker is stopped, not left building for nobody")
def test_a_cancelled_build_stops_on_its_worker(tmp_path, cluster):
    """What Ctrl-C and a failed round do (RayExecutor.close cancels what is outstanding): the worker building it
    is stopped while this host stays connected, not left to build for nobody."""
    from host.commands.demo import DemoOptions
    from host.commands.demo_build import options_document
    from host.executors import BuildTask, open_executor

    opts = DemoOptions.quick_defaults(ratios=(0.5,), finetune_epochs=5, finetune_per_class=500,
                                      finetune_seconds=300.0, eval_per_class=20, out=tmp_path / "c")
    wait_for("earlier tests' builds to end", lambda: not build_processes(), 30)
    ex = open_executor("ray", address=cluster.address)
    try:
        h = ex.submit(BuildTask("r050", tmp_path / "c" / "artifacts", lambda dest: {}, "host.commands.demo:build_remote",
                                {"options": options_document(opts), "ratio": 0.5}, whole=False))
        (pid,) = wait_for("the build on a Ray worker", build_processes, 120)
        time.sleep(3.0)                                  # well into it (the fine-tune alone takes a minute)
        assert not h.done() and psutil.pid_exists(pid)
        h.cancel()
        wait_for("the cancelled build to stop", lambda: pid not in build_processes(), 15)
    finally:
        ex.close()


def test_a_user_model_from_relative_paths_is_rebuilt_on_the_worker_from_its_recipe(tmp_path, cluster):
    """The user's own model file, factory argument and data, named relative to the user's folder: the worker
    (whose working folder is another) rebuilds the model from that recipe and builds the same bytes."""
    import numpy as np

    (tmp_path / "models").mkdir()
    shutil.copy(Path(__file__).parent / "user_models" / "senet.py", tmp_path / "models" / "senet.py")
    np.savez(tmp_path / "unlabelled.npz",
             images=np.random.default_rng(0).integers(0, 256, size=(24, 64, 64, 3), dtype=np.uint8))
    args = ("--model", "models/senet.py:two_head_net", "--model-arg", "width=0.5", "--input-size", "64",
            "--data", "unlabelled.npz", "--ratios", "0,0.5", "--no-recovery")
    local = edgeprune("demo", "--quick", "--out", "local", "--db", "results.db", *args, cwd=tmp_path)
    assert local.returncode == 0, local.stdout + local.stderr
    remote = edgeprune("demo", "--quick", "--out", "ray", "--db", "results.db", *args, "--executor", "ray",
                       env=cluster.env(), cwd=tmp_path)
    assert remote.returncode == 0, remote.stdout + remote.stderr
    a, b = artifacts(tmp_path / "local"), artifacts(tmp_path / "ray")
    assert len(a) == 6 and a == b                      # 2 × (onnx, manifest, plan): the same bytes
    for x, y in zip(summary(tmp_path / "local"), summary(tmp_path / "ray")):
        assert (x["ratio"], x["macs"], x["params"]) == (y["ratio"], y["macs"], y["params"])
    doc = json.loads((tmp_path / "ray" / "demo.json").read_text())
    assert doc["executor"]["executor"] == "ray" and doc["executor"]["address"] == cluster.address
    (node,) = doc["executor"]["nodes"]
    for tag, by in doc["built_by"].items():            # provenance: which node built each candidate
        assert by["executor"] == "ray" and by["node_id"] == node["node_id"] and by["pid"] != os.getpid(), tag
    assert {by["executor"] for by in json.loads((tmp_path / "local" / "demo.json").read_text())["built_by"]
            .values()} == {"local"}
    with Store(str(tmp_path / "results.db")) as store:
        runs = [store.run(r["run_id"]) for r in store.list_runs() if r["kind"] == "demo"]
        assert {_provenance(r)["executor"]["executor"] for r in runs} == {"local", "ray"}
