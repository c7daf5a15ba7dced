"""Candidate builds: ``--executor local`` vs ``--executor ray`` on this machine, and a simulated scale-out.

    python bench/executors.py [--candidates 4] [--ratios 0.2,0.35,0.5] [--scale 60] [--nodes 1,4,16]
                              [--devices 32] [--per-device 100] [--proposals 10] [--out FILE.json]

1. **This machine, side by side.** The same ResNet-20 search candidates (dense + ``--ratios``, uniform, 8-channel
   alignment, BatchNorm recalibration; and one with a 1-epoch fine-tune on 50 images per class) built through
   :meth:`host.search.evaluator.FleetEvaluator.submit_build` with the local executor and then with a Ray cluster
   started here (``ray start --head --num-cpus 2``; or ``$RAY_ADDRESS``), every build submitted at once: wall time,
   per-build seconds, and whether the artifacts are byte-identical. One Ray task takes as many CPUs as torch has
   threads, so on 2 cores Ray runs one build at a time: this part measures Ray's overhead, not a speed-up.
2. **Scale-out, simulated.** The task graph of a NetAdapt search over ``--devices`` devices with ``--per-device``
   candidates each (``--per-device / --proposals`` rounds of ``--proposals`` proposals: a round's proposals build
   in parallel, each is measured on its device as soon as it is built, the next round starts when the round is
   measured), run by Ray's own scheduler on a local Ray instance whose fake resources stand for N nodes (a build
   task takes one ``build_node``; N of them: N builds at once). Every duration is a measured one from part 1 or
   from the agent, divided by ``--scale`` (60: 1 s stands for 1 min): a build (the fine-tuned one), a device's
   measurement of one candidate (a quick job through an agent session on this machine), and the host's own serial
   work per candidate (installing the artifact's bytes, sha256-checked, and recording the result) under one lock,
   as the fleet runner's process does it. Reported: the simulated wall time for each N, the speed-up over N = 1,
   and the bound that the wall time approaches (builds / N, the busiest device's measurements, or the host's
   serial work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _evaluator(out: Path, opts: Any, executor: Any) -> Any:
    from host.search import data as search_data
    from host.search.evaluator import FleetEvaluator
    from host.search.space import build_space

    wl = search_data.open_search_workload(opts)
    loaded = wl.model
    space = build_space(loaded.name, loaded.model, dict(loaded.meta), example=wl.example)
    return FleetEvaluator(out, "bench", opts, loaded.name, loaded.model, dict(loaded.meta), space, workload=wl,
                          executor=executor), space


def _candidates(space: Any, ratios: List[float], fine_tune: bool) -> List[Any]:
    from host.search.algos.base import Candidate

    out = [Candidate.of(space, {})]
    for r in ratios:
        kept = space.kept_for({g.name: r for g in space.groups}, 8)
        out.append(Candidate.of(space, kept, "full", ratio=r))
    if fine_tune:
        out = out[-1:]
    return out


def build_all(executor: Any, out: Path, ratios: List[float], fine_tune: bool) -> Dict[str, Any]:
    from host.fleet.devices import local_device
    from host.fleet.formats import profile_for
    from host.search.options import RecoveryOptions, SearchOptions, candidate_key

    rec = RecoveryOptions(finetune_epochs=1 if fine_tune else 0, finetune_per_class=50)
    opts = SearchOptions(model="resnet20", eval_per_class=20, recovery=rec, cache_dir=str(out / "cache"))
    ev, space = _evaluator(out, opts, executor)
    dev = local_device().model_copy(update={"round_to": 8})
    profile = profile_for(dev)
    cands = _candidates(space, ratios, fine_tune)
    t0 = time.perf_counter()
    handles = [ev.submit_build(profile, c, candidate_key(space, opts, profile, c)) for c in cands]
    infos = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    ev.close()
    return {"wall_s": wall, "builds": len(infos), "per_build_s": [i["built_by"]["seconds"] for i in infos],
            "sha256": [i["artifact_sha256"] for i in infos]}


def measured_job_s(out: Path) -> float:
    """A quick job's wall time through an agent session on this machine (median of 5): one candidate's measurement."""
    import statistics

    from edgeprune import export
    from host.fleet.devices import local_device
    from host.fleet.jobs import build_job
    from host.fleet.runner import transport_for

    art = next((out / "local" / "work" / "artifacts").rglob("*.onnx"))
    man = export.Manifest.read(next(art.parent.glob("*.manifest.json")))
    dev = local_device()
    t = transport_for(dev)
    times = []
    try:
        for i in range(5):
            job = build_job(dev, f"bench-{i}", art, man, None, quick=True)
            t0 = time.perf_counter()
            t.run_job(job, out / "jobs" / str(i))
            times.append(time.perf_counter() - t0)
    finally:
        t.close()
    return statistics.median(times)


def host_work_s(out: Path) -> float:
    """The host's serial work per candidate: install a built artifact's bytes (sha256-checked) and append its record."""
    import statistics

    from host.executors.base import collect, install

    folder = next((out / "local" / "work" / "artifacts").iterdir())
    files = collect(folder)
    info = json.loads((folder / "built.json").read_text())
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        install(files, info, out / "installed" / str(i))
        with open(out / "records.jsonl", "a") as f:
            f.write(json.dumps(info) + "\n")
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def simulate(nodes: int, devices: int, per_device: int, proposals: int, build_s: float, meas_s: float,
             host_s: float, ray_bin: str) -> Dict[str, Any]:
    import ray

    # one head whose fake resources stand for N nodes that build one candidate at a time each
    subprocess.run([ray_bin, "start", "--head", "--port", "6398", "--num-cpus", str(max(8, nodes)),
                    "--resources", json.dumps({"build_node": nodes}), "--disable-usage-stats",
                    "--include-dashboard=false"], check=True, capture_output=True)
    try:
        ray.init(address="127.0.0.1:6398", log_to_driver=False, logging_level="ERROR")

        @ray.remote(num_cpus=0, resources={"build_node": 1})
        def build(seconds: float) -> float:
            time.sleep(seconds)
            return seconds

        ray.get([build.remote(0.0) for _ in range(nodes)])       # the workers started before the clock
        host_lock = threading.Lock()
        rounds = per_device // proposals

        def device() -> None:
            for _ in range(rounds):
                left = [build.remote(build_s) for _ in range(proposals)]
                while left:
                    ready, left = ray.wait(left, num_returns=1)
                    ray.get(ready)
                    with host_lock:          # the host's serial part: install, record
                        time.sleep(host_s)
                    time.sleep(meas_s)       # the device measures it (devices in parallel, each one job at a time)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=device) for _ in range(devices)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        ray.shutdown()
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
    n = devices * per_device
    bounds = {"builds / N": n * build_s / nodes, "one device's chain": rounds * (build_s + proposals * meas_s),
              "host serial work": n * host_s}
    return {"nodes": nodes, "wall_s": wall, "bounds_s": bounds, "bound": max(bounds, key=bounds.get)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratios", default="0.2,0.35,0.5")
    ap.add_argument("--scale", type=float, default=60.0)
    ap.add_argument("--nodes", default="1,4,16")
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--per-device", type=int, default=100)
    ap.add_argument("--proposals", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ratios = [float(x) for x in args.ratios.split(",")]
    import torch

    torch.set_num_threads(2)
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-exec-"))
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    started = False
    if not os.environ.get("RAY_ADDRESS"):
        subprocess.run([ray_bin, "start", "--head", "--port", "6399", "--num-cpus", "2", "--disable-usage-stats",
                        "--include-dashboard=false"], check=True, capture_output=True)
        os.environ["RAY_ADDRESS"] = "127.0.0.1:6399"
        started = True
    result: Dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    try:
        from host.executors import open_executor

        for fine_tune in (False, True):
            label = "fine-tune" if fine_tune else "bn"
            for name in ("local", "ray"):
                ex = open_executor(name)
                try:
                    result[f"{label}-{name}"] = build_all(ex, work / f"{label}-{name}" if fine_tune or name == "ray"
                                                          else work / "local", ratios, fine_tune)
                finally:
                    ex.close()
    finally:
        if started:
            subprocess.run([ray_bin, "stop", "--force"], capture_output=True)
            del os.environ["RAY_ADDRESS"]
    for label in ("bn", "fine-tune"):
        a, b = result[f"{label}-local"], result[f"{label}-ray"]
        print(f"{label}: {a['builds']} builds  local {a['wall_s']:.1f} s  ray {b['wall_s']:.1f} s  "
              f"ratio {b['wall_s'] / a['wall_s']:.2f}  identical {a['sha256'] == b['sha256']}")

    build_s = max(result["fine-tune-local"]["per_build_s"])
    meas_s = measured_job_s(work)
    host_s = host_work_s(work)
    result["measured"] = {"build_s": build_s, "job_s": meas_s, "host_s": host_s}
    print(f"measured: fine-tuned build {build_s:.1f} s, one quick job {meas_s:.2f} s, host serial work "
          f"{host_s * 1000:.1f} ms per candidate; simulated at 1/{args.scale:g}")
    print(f"the host's serial work would bound the search beyond N = build / host = {build_s / host_s:.0f} nodes; "
          f"each device's own chain of measurements beyond N = {args.devices * args.per_device * build_s:.0f} / "
          f"{args.per_device // args.proposals * (build_s + args.proposals * meas_s):.0f} = "
          f"{args.devices * args.per_device * build_s / (args.per_device // args.proposals * (build_s + args.proposals * meas_s)):.0f}"
          " nodes (computed from the measured times)")
    sims = []
    for n in [int(x) for x in args.nodes.split(",")]:
        sims.append(simulate(n, args.devices, args.per_device, args.proposals, build_s / args.scale,
                             meas_s / args.scale, host_s / args.scale, ray_bin))
    base = sims[0]["wall_s"]
    print("| nodes | simulated wall (s) | stands for (min) | speed-up | bound it approaches |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for s in sims:
        s["speedup"] = base / s["wall_s"]
        print(f"| {s['nodes']} | {s['wall_s']:.1f} | {s['wall_s'] * args.scale / 60:.0f} | {s['speedup']:.2f}x | "
              f"{s['bound']} ({s['bounds_s'][s['bound']]:.1f} s) |")
    result["simulation"] = sims
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
