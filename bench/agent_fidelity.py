"""Does the agent measure what the vendors' own tools measure? Agent median latency vs OpenVINO `benchmark_app`.

    python bench/agent_fidelity.py [--model resnet56] [--reps 5] [--seconds 5]

One ONNX artifact, batch 1, 1 thread, pinned to the same CPU, timed in interleaved rounds by:
  * the agent with OpenVINO (CPU, f32 hint) — the product's own measurement path (separate process, job spec);
  * OpenVINO's benchmark_app (`-hint none -api sync -nthreads 1 -nstreams 1 -infer_precision f32`, under taskset);
  * the agent with onnxruntime (1 thread), for reference: onnxruntime's own perf tool (onnxruntime_perf_test) is
    not shipped in its pip wheel, so there is no vendor figure to compare it with here.
and the agent's OpenVINO run again with the modelled power sensor sampling at 20 Hz, to measure the sampler's
cost (its own reported overhead_pct, and the median latency with vs without it).

Then, in one process and interleaved (so machine drift cancels): the agent's OpenVINO session ``run()`` against a
bare ``InferRequest.infer()`` compiled with benchmark_app's settings — the agent's own per-call cost.

Goal: agent median within ±3 % of benchmark_app's. Printed: medians over rounds, the ratio, and the run-to-run
CV of each method's per-round medians.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from agent import schema
from edgeprune import data, export, models
from host.fleet.devices import auto_affinity
from host.fleet.transport import LocalTransport

MEDIAN_RE = re.compile(r"Median:\s+([0-9.]+)\s*ms")


def agent_median(transport, art, sha, runtime, options, seconds, power, work, tag):
    job = schema.JobSpec(
        job_id=tag, artifact=schema.ArtifactSpec(path=str(art), sha256=sha),
        runtime=schema.RuntimeSpec(name=runtime, threads=1, options=dict(options)),
        timing=schema.TimingSpec(warmup_iters=20, warmup_s=0.5, min_iters=200, min_duration_s=seconds,
                                 keep_samples=0, cpu_affinity=auto_affinity(1)),
        power=schema.PowerSpec(sensor="model", sample_hz=20.0, idle_w=5.0, max_w=15.0) if power else None).validate()
    rep = transport.run_job(job, work / tag)
    if rep.status != "ok":
        raise SystemExit(f"{tag}: {rep.error.type}: {rep.error.message}")
    return rep.timing.latency_ms.median, (rep.power.overhead_pct if rep.power else None)


def benchmark_app_median(art, seconds, cpu):
    exe = shutil.which("benchmark_app")
    if exe is None:
        raise SystemExit("benchmark_app not found (it ships with the openvino pip package)")
    cmd = ["taskset", "-c", str(cpu), exe, "-m", str(art), "-d", "CPU", "-hint", "none", "-api", "sync",
           "-nthreads", "1", "-nstreams", "1", "-b", "1", "-t", str(int(seconds)), "-infer_precision", "f32",
           "-shape", "[1,3,32,32]"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds * 10 + 60)
    m = MEDIAN_RE.search(out.stdout)
    if out.returncode != 0 or m is None:
        raise SystemExit(f"benchmark_app failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return float(m.group(1))


def inprocess_overhead(art, rounds, seconds=1.5):
    """Median latency of the agent's OpenVINO session vs a bare infer() on the same compiled settings."""
    import hashlib

    import numpy as np
    import openvino as ov

    from agent import runtimes

    spec = schema.ArtifactSpec(path=str(art), sha256=hashlib.sha256(art.read_bytes()).hexdigest())
    sess = runtimes.get_runtime("openvino").load(art, spec, 1, {"device": "CPU", "precision": "f32"})
    core = ov.Core()
    model = core.read_model(str(art))
    model.reshape([1, 3, 32, 32])
    bare = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1",
                                             "INFERENCE_PRECISION_HINT": "f32"})
    req = bare.create_infer_request()
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    req.set_input_tensor(ov.Tensor(x))
    fns = {"agent session run()": lambda: sess.run(x), "bare InferRequest.infer()": req.infer}
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            for _ in range(30):
                f()
            ts = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t0 = time.perf_counter_ns()
                f()
                ts.append(time.perf_counter_ns() - t0)
            out[name].append(statistics.median(ts) / 1e6)
    return out


def cv(xs):
    return statistics.stdev(xs) / statistics.mean(xs) if len(xs) > 1 else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0, help="timed window per measurement")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cpu = auto_affinity(1)[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, meta = models.pretrained(args.model)
        art = work / f"{args.model}.onnx"
        man = export.export_onnx(model, art, check_inputs=data.to_tensor_batch(data.eval_split(2).images),
                                 model_name=args.model, source_checkpoint_sha256=str(meta["sha256"]),
                                 pruning_plan_sha256="")
        transport = LocalTransport()
        res = {k: [] for k in ("agent_ov", "benchmark_app", "agent_ort", "agent_ov_power")}
        overhead = []
        t0 = time.time()
        ov = {"device": "CPU", "precision": "f32"}
        for rep in range(args.reps):
            res["agent_ov"].append(agent_median(transport, art, man.sha256, "openvino", ov, args.seconds, False, work, f"ov-{rep}")[0])
            res["benchmark_app"].append(benchmark_app_median(art, args.seconds, cpu))
            res["agent_ort"].append(agent_median(transport, art, man.sha256, "onnxruntime", {}, args.seconds, False, work, f"ort-{rep}")[0])
            med, ovh = agent_median(transport, art, man.sha256, "openvino", ov, args.seconds, True, work, f"ovp-{rep}")
            res["agent_ov_power"].append(med)
            overhead.append(ovh)
            print(f"round {rep + 1}/{args.reps} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        os.sched_setaffinity(0, {cpu})  # the same CPU the agent and benchmark_app ran on
        inproc = inprocess_overhead(art, args.reps + 1)
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f"\n{args.model}, batch 1, 1 thread pinned to CPU {cpu}, {args.seconds:.0f} s windows, {args.reps} interleaved "
          f"rounds ({time.time() - t0:.0f} s)\n")
    print("| method | median of per-round medians (ms) | per-round medians | run-to-run CV |")
    print("|---|---:|---|---:|")
    names = {"agent_ov": "agent, OpenVINO CPU f32", "benchmark_app": "OpenVINO benchmark_app (sync, 1 thread)",
             "agent_ort": "agent, onnxruntime", "agent_ov_power": "agent, OpenVINO + model power sensor 20 Hz"}
    for k, label in names.items():
        print(f"| {label} | {med[k]:.3f} | {' '.join(f'{x:.3f}' for x in res[k])} | {cv(res[k]):.3f} |")
    print(f"\nagent / benchmark_app = {med['agent_ov'] / med['benchmark_app']:.3f} "
          f"({100 * (med['agent_ov'] / med['benchmark_app'] - 1):+.1f} %; goal within ±3 %)")
    print("\nIn one process, pinned, interleaved (%d rounds of 1.5 s each):\n" % len(inproc["bare InferRequest.infer()"]))
    print("| call | median of per-round medians (ms) | per-round medians |")
    print("|---|---:|---|")
    for k, v in inproc.items():
        print(f"| {k} | {statistics.median(v):.3f} | {' '.join(f'{x:.3f}' for x in v)} |")
    a, b = statistics.median(inproc["agent session run()"]), statistics.median(inproc["bare InferRequest.infer()"])
    print(f"\nagent session per-call cost: {a - b:+.3f} ms ({100 * (a / b - 1):+.1f} %)")
    print(f"power sampler: reported overhead {statistics.median(overhead):.3f} % of the window; median latency with "
          f"it / without it = {med['agent_ov_power'] / med['agent_ov']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
