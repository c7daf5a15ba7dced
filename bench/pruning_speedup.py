"""Does channel pruning buy the latency its MACs promise? MACs ratio vs measured latency ratio.

    python bench/pruning_speedup.py [--model resnet56] [--ratios 0,0.3,0.5,0.7] [--reps 5] [--round-to N]
                                    [--threads 1|all|both] [--out FILE.json]

For each pruning ratio the model is pruned (Torch-Pruning, L1, no recovery: weights do not change latency),
exported to ONNX, and timed by the agent — the same separate process and timing protocol a device runs — on
each runtime configuration: onnxruntime on 1 thread and on all threads, and OpenVINO CPU with an explicit f32
precision hint (1 thread and all threads) when openvino is installed. Repetitions are interleaved (every
configuration and ratio once per round) so that drift in machine load hits all of them alike; the figure per
cell is the median over repetitions of each run's median latency.

Printed: a Markdown table per configuration with MACs reduction (dense MACs / pruned MACs), measured speed-up
(dense p50 / pruned p50), and efficiency = speed-up / MACs reduction. The goal for this benchmark is
efficiency >= 0.95 at 50 % on 1 thread with onnxruntime.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from agent import schema
from edgeprune import data, export, models, prune
from edgeprune.errors import DataError
from host.fleet.devices import auto_affinity
from host.fleet.transport import LocalTransport


def configs(threads_filter: str):
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = [1, n] if threads_filter == "both" else ([1] if threads_filter == "1" else [n])
    out = [("onnxruntime", t, {}) for t in counts]
    if importlib.util.find_spec("openvino") is not None:
        out += [("openvino", t, {"device": "CPU", "precision": "f32"}) for t in counts]
    return out


def build_artifacts(model_name: str, ratios, workdir: Path, round_tos):
    try:
        base, meta = models.pretrained(model_name)
        weights = f"pretrained {Path(str(meta['path'])).name}"
    except DataError:
        base, meta = models.build_model(model_name).eval(), {"sha256": "0" * 64}
        weights = "random init (checkpoint not found; latency does not depend on weight values)"
    example = torch.zeros(1, 3, 32, 32)
    check = data.to_tensor_batch(data.eval_split(2).images)
    arts = []
    for align in round_tos:
        for r in ratios:
            m = copy.deepcopy(base)
            res = prune.prune(m, r, example, round_to=align)
            path = workdir / f"{model_name}-r{int(round(r * 100)):03d}-a{align}.onnx"
            man = export.export_onnx(m, path, check_inputs=check, model_name=model_name,
                                     source_checkpoint_sha256=str(meta["sha256"]),
                                     pruning_plan_sha256=res.plan.sha256())
            # inner width of each stage's residual blocks (the channels pruning acts on in these ResNets)
            channels = sorted({mod.out_channels for name, mod in m.named_modules() if name.endswith(".conv1")})
            arts.append({"ratio": r, "round_to": align, "macs": res.macs_after, "params": res.params_after,
                         "path": path, "sha256": man.sha256, "channels": channels})
    return arts, weights


def steal_ticks() -> int:
    """CPU time stolen from this VM by its hypervisor (clock ticks), or -1 where /proc/stat has no such field."""
    try:
        fields = open("/proc/stat").readline().split()
        return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else -1
    except OSError:
        return -1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratios", default="0,0.3,0.5,0.7")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--min-duration", type=float, default=2.0, help="seconds per timed window")
    ap.add_argument("--round-to", default="1", help="channel alignments to compare side by side, e.g. 1,8: "
                    "channels kept are rounded up to a multiple of N")
    ap.add_argument("--threads", choices=["1", "all", "both"], default="both", help="runtime thread counts to run")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    args = ap.parse_args(argv)
    ratios = [float(x) for x in args.ratios.split(",")]
    if ratios[0] != 0.0:
        ap.error("--ratios must start with 0 (the dense baseline)")
    torch.set_num_threads(1)
    transport = LocalTransport()
    cfgs = configs(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        aligns = [int(x) for x in args.round_to.split(",")]
        arts, weights = build_artifacts(args.model, ratios, work, aligns)
        unique = list({a["sha256"]: a for a in arts}.values())  # identical artifacts are timed once per round
        lat = {(c[0], c[1], a["sha256"]): [] for c in cfgs for a in unique}
        versions = {}
        t0, steal0 = time.time(), steal_ticks()
        for rep in range(args.reps):
            for rt, threads, opts in cfgs:
                for a in unique:
                    job = schema.JobSpec(
                        job_id=f"bench-{rt}-{threads}t-{a['path'].stem}-{rep}",
                        artifact=schema.ArtifactSpec(path=str(a["path"]), sha256=a["sha256"]),
                        runtime=schema.RuntimeSpec(name=rt, threads=threads, options=dict(opts)),
                        timing=schema.TimingSpec(warmup_iters=20, warmup_s=0.3, min_iters=200,
                                                 min_duration_s=args.min_duration, seed=rep, keep_samples=0,
                                                 cpu_affinity=auto_affinity(threads)),
                        power=None).validate()
                    rep_ = transport.run_job(job, work / job.job_id)
                    if rep_.status != "ok":
                        print(f"{job.job_id}: {rep_.error.type}: {rep_.error.message}", file=sys.stderr)
                        return 1
                    lat[(rt, threads, a["sha256"])].append(rep_.timing.latency_ms.median)
                    versions[rt] = rep_.identity.runtime_version
            print(f"round {rep + 1}/{args.reps} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    wall = time.time() - t0
    steal1 = steal_ticks()
    steal_pct = (100.0 * (steal1 - steal0) / os.sysconf("SC_CLK_TCK") / wall / (os.cpu_count() or 1)
                 if steal0 >= 0 and steal1 >= 0 else None)
    dense_macs = arts[0]["macs"]
    rows = []
    for rt, threads, _ in cfgs:
        d = statistics.median(lat[(rt, threads, arts[0]["sha256"])])
        for a in arts:
            samples = lat[(rt, threads, a["sha256"])]
            med = statistics.median(samples)
            macs_red = dense_macs / a["macs"]
            rows.append({"runtime": rt, "version": versions[rt], "threads": threads, "ratio": a["ratio"],
                         "round_to": a["round_to"], "channels": a["channels"],
                         "macs": a["macs"], "params": a["params"], "p50_ms_median": med,
                         "p50_ms_reps": samples, "macs_reduction": macs_red, "speedup": d / med,
                         "efficiency": (d / med) / macs_red})
    print(f"\n{args.model} ({weights}); "
          f"{args.reps} interleaved rounds in {wall:.0f} s; CPU steal by the hypervisor "
          f"{'n/a' if steal_pct is None else format(steal_pct, '.1f') + ' %'}; {args.reps} interleaved repetitions, median of per-run p50; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    for rt, threads, _ in cfgs:
        print(f"**{rt} {versions[rt]}, {threads} thread(s)**\n")
        print("| ratio | align | channels kept | MMACs | p50 ms (median) | p50 spread (min–max) | MACs reduction "
              "| speed-up | efficiency |")
        print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["runtime"] == rt and r["threads"] == threads:
                chans = "/".join(map(str, r["channels"]))
                print(f"| {r['ratio']:.0%} | {r['round_to']} | {chans} | {r['macs'] / 1e6:.1f} | {r['p50_ms_median']:.3f} | "
                      f"{min(r['p50_ms_reps']):.3f}–{max(r['p50_ms_reps']):.3f} | {r['macs_reduction']:.2f}× | "
                      f"{r['speedup']:.2f}× | {r['efficiency']:.2f} |")
        print()
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "weights": weights, "reps": args.reps,
                                        "steal_pct": steal_pct, "wall_s": wall, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
