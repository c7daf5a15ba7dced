"""P1: does channel pruning pay on real edge models? MobileNetV2 and ResNet-18 at 224x224, dense vs pruned.

    taskset -c 1 python bench/user_models.py [--models edgeprune.zoo:mobilenet_v2,edgeprune.zoo:resnet18]
        [--ratio 0.5] [--round-to 8] [--reps 11] [--iters 30] [--runtimes ort,ov-f32,ov-bf16]
        [--profile-iters 30] [--quick] [--out FILE.json]

Each model is loaded the way a user's model is, through ``MODULE:CALLABLE`` (``edgeprune.sources.resolve``), with
seeded random weights (``torch.manual_seed(--seed)`` before the factory runs; latency does not depend on weight
values), pruned uniformly (``edgeprune.prune.prune``, L1, ``round_to``), and both variants exported with the
product's exporters: ONNX (``export_onnx``, opset 17, verified against torch) and OpenVINO IR fp32
(``export_openvino``). The artifacts are then timed *in this process*, batch 1, one runtime thread:

* ``ort``: onnxruntime CPUExecutionProvider, intra-op 1 thread, sequential, all graph optimisations;
* ``ov-f32``: OpenVINO CPU, ``INFERENCE_PRECISION_HINT=f32`` (otherwise OpenVINO runs bf16 on a CPU with
  AVX512-BF16/AMX), LATENCY hint, 1 stream, 1 thread, input reshaped to a static [1,3,H,W] (as the agent does);
* ``ov-bf16``: the same IR with ``INFERENCE_PRECISION_HINT=bf16`` (only where the CPU plugin accepts it).

The precision the plugin actually runs is read back after compiling and printed. Pin the process to one core
(``taskset -c 1``): the runtime's single thread then runs there.

Protocol: ``--reps`` rounds; each round times every (runtime, model) pair, dense and pruned back to back, in an
order that alternates between rounds (dense first, then pruned first) so that drift hits both alike. One timing =
1 warm-up inference then ``--iters`` timed inferences; its figure is their median. Per cell, latency = median of
the per-round figures; speed-up = median over rounds of the *paired* ratio dense/pruned within a round (min–max
in brackets); efficiency = speed-up / MACs reduction (MACs by ``edgeprune.prune.count``, Torch-Pruning's
counter). The last two columns repeat latency, speed-up and efficiency from each cell's *fastest* inference (of
all ``reps x iters``): on a CPU time-shared with other work, an inference longer than the scheduler's slice
(a dense model) is preempted more often than a short one (its pruned copy), which inflates the dense median more
than the pruned one and so *overstates* the speed-up; interleaving does not cancel that bias. The fastest
inference is the least-disturbed estimate; where the two disagree, load is biasing the medians.

``--profile-iters N`` (default on for the full run, off for ``--quick``) adds a per-layer-type breakdown of
MobileNetV2 from onnxruntime's profiler (``SessionOptions.enable_profiling``): fastest kernel time of depthwise 3x3,
pointwise 1x1 (expand / project), full convs and everything else, dense vs pruned, with each type's MACs, to show
which layers do not speed up in proportion to their MACs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune import export, prune  # noqa: E402
from edgeprune.sources import ModelSpec, resolve  # noqa: E402

DEFAULT_MODELS = "edgeprune.zoo:mobilenet_v2,edgeprune.zoo:resnet18"
RUNTIMES = ("ort", "ov-f32", "ov-bf16")


# ---------------------------------------------------------------------------------------------- artifacts
def build(source: str, size: int, ratio: float, round_to: int, seed: int, workdir: Path) -> Dict:
    torch.manual_seed(seed)
    loaded = resolve(ModelSpec(source, input_shape=(1, 3, size, size)))
    shape = tuple(loaded.input_shape)
    example = loaded.example
    g = torch.Generator().manual_seed(seed)
    check = torch.randn(2, *shape[1:], generator=g)
    dense = loaded.model.eval()
    pruned = copy.deepcopy(dense)
    res = prune.prune(pruned, ratio, example, round_to=round_to)
    macs_d, params_d = prune.count(dense, example)
    macs_p, params_p = prune.count(pruned, example)
    out = {"name": loaded.name, "source": source, "shape": list(shape), "weights_sha256": loaded.meta.get("sha256"),
           "macs": {"dense": macs_d, "pruned": macs_p}, "params": {"dense": params_d, "pruned": params_p},
           "plan_sha256": res.plan.sha256(), "unprunable": sorted(res.unprunable), "files": {}}
    for variant, model, plan in (("dense", dense, "0" * 64), ("pruned", pruned, res.plan.sha256())):
        kw = dict(check_inputs=check, model_name=loaded.name, source_checkpoint_sha256=str(loaded.meta["sha256"]),
                  pruning_plan_sha256=plan, input_shape=shape)
        onnx_path = workdir / f"{loaded.name}-{variant}.onnx"
        export.export_onnx(model, onnx_path, **kw)
        xml_path = workdir / f"{loaded.name}-{variant}.xml"
        export.export_openvino(model, xml_path, precision="fp32", **kw)
        out["files"][variant] = {"onnx": onnx_path, "xml": xml_path}
    return out


# ---------------------------------------------------------------------------------------------- runners
class OrtRunner:
    def __init__(self, path: Path, x: np.ndarray, profile: bool = False, prefix: str = ""):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if profile:
            so.enable_profiling = True
            so.profile_file_prefix = prefix
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.feed = {self.sess.get_inputs()[0].name: x}
        self.precision = "f32"

    def __call__(self) -> None:
        self.sess.run(None, self.feed)


class OvRunner:
    def __init__(self, path: Path, x: np.ndarray, precision: str):
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        model.reshape({model.input(0).get_any_name(): ov.PartialShape(list(x.shape))})
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": "1", "NUM_STREAMS": "1"}
        self.compiled = core.compile_model(model, "CPU", config)
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.precision = hint.to_string() if hasattr(hint, "to_string") else str(hint)
        self.req = self.compiled.create_infer_request()
        self.req.set_input_tensor(ov.Tensor(x))  # bound once, as benchmark_app does

    def __call__(self) -> None:
        self.req.infer()


def time_once(run, iters: int) -> Tuple[float, float]:
    """1 warm-up inference, then ``iters`` timed ones: their median and minimum, in ms."""
    run()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts), 1e3 * min(ts)


def steal_ticks() -> int:
    try:
        fields = open("/proc/stat").readline().split()
        return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else -1
    except OSError:
        return -1


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------- profiling
def _shape(entry) -> List[int]:
    return list(next(iter(entry.values()))) if isinstance(entry, dict) and entry else []


def conv_kind(op: str, in_shapes: List[List[int]], out_shapes: List[List[int]]) -> Tuple[str, int]:
    """(layer type, MACs) of one profiled node, from its input/output shapes."""
    if op in ("Conv", "FusedConv") and len(in_shapes) >= 2 and len(in_shapes[1]) == 4 and out_shapes:
        x, w, y = in_shapes[0], in_shapes[1], out_shapes[0]
        macs = int(np.prod(y[1:])) * int(np.prod(w[1:]))
        cin, cout, kh = x[1], w[0], w[2]
        if w[1] == 1 and cin == cout and cin > 1:
            return "depthwise 3x3", macs
        if kh == 1:
            return ("pointwise 1x1, expand" if cout > cin else "pointwise 1x1, project"), macs
        return "full conv (stem 3x3)", macs
    if op in ("Gemm", "MatMul") and in_shapes and out_shapes:  # prepacked weight: not listed among the inputs
        return "classifier (Gemm)", int(np.prod(out_shapes[0])) * in_shapes[0][-1]
    return "other (pooling, layout reorders, ...)", 0


def _parse_profile(prof: str, iters: int) -> Dict[str, Dict[str, float]]:
    events = json.load(open(prof))
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-iters:]
    per_run: List[Dict[str, float]] = [dict() for _ in runs]
    macs: Dict[str, int] = {}
    seen_nodes = set()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        idx = next((i for i, run in enumerate(runs) if run["ts"] <= e["ts"] <= run["ts"] + run["dur"]), None)
        if idx is None:  # a warm-up run
            continue
        a = e.get("args", {})
        kind, m = conv_kind(a.get("op_name", ""), [_shape(s) for s in a.get("input_type_shape", [])],
                            [_shape(s) for s in a.get("output_type_shape", [])])
        per_run[idx][kind] = per_run[idx].get(kind, 0.0) + e["dur"] / 1e3
        if e["name"] not in seen_nodes:
            seen_nodes.add(e["name"])
            macs[kind] = macs.get(kind, 0) + m
    kinds = sorted({k for d in per_run for k in d})
    # per type, its fastest run (least preempted: see the module docstring); total = the sum of those, since on a
    # shared CPU most runs are preempted *somewhere*; the median of whole runs is kept for reference
    out = {k: {"ms": min(d.get(k, 0.0) for d in per_run), "macs": macs.get(k, 0)} for k in kinds}
    out["_total"] = {"ms": sum(v["ms"] for v in out.values()),
                     "run_ms": statistics.median(run["dur"] / 1e3 for run in runs), "macs": sum(macs.values())}
    os.unlink(prof)
    return out


def profile_breakdown(paths: Dict[str, Path], x: np.ndarray, iters: int, workdir: Path) -> Dict[str, Dict]:
    """Per variant and layer type: fastest per-inference kernel time (ms) of ``iters`` profiled inferences (the
    variants' inferences alternating), and MACs."""
    runners = {v: OrtRunner(p, x, profile=True, prefix=str(workdir / f"prof-{p.stem}")) for v, p in paths.items()}
    for _ in range(5):  # warm-up, excluded below
        for r in runners.values():
            r()
    for _ in range(iters):
        for r in runners.values():
            r()
    return {v: _parse_profile(r.sess.end_profiling(), iters) for v, r in runners.items()}


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated MODULE:CALLABLE sources")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--iters", type=int, default=30, help="timed inferences per timing (median taken)")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES))
    ap.add_argument("--profile-iters", type=int, default=30,
                    help="profiled onnxruntime inferences per MobileNetV2 variant for the breakdown (0: skip)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rounds of 5 inferences, no profile")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps, args.iters, args.profile_iters = 3, 5, 0
    runtimes = [r for r in args.runtimes.split(",") if r]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad:
        ap.error(f"--runtimes: unknown {bad}; known {RUNTIMES}")
    torch.set_num_threads(1)
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if affinity is not None and len(affinity) > 1:
        print(f"warning: not pinned (CPUs {affinity}); run under `taskset -c 1`", file=sys.stderr)
    import onnxruntime as ort
    versions = {"onnxruntime": ort.__version__, "torch": torch.__version__}
    if any(r.startswith("ov") for r in runtimes):
        import openvino as ov
        versions["openvino"] = str(ov.__version__)

    t_start = time.time()
    load0 = loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = []
        for src in args.models.split(","):
            t = time.time()
            models.append(build(src, args.size, args.ratio, args.round_to, args.seed, work))
            print(f"built {src}: pruned + exported in {time.time() - t:.1f} s", file=sys.stderr, flush=True)
        x = np.random.default_rng(args.seed).standard_normal((1, 3, args.size, args.size)).astype(np.float32)
        runners: Dict[Tuple[str, str, str], object] = {}
        precisions: Dict[Tuple[str, str], str] = {}
        for m in models:
            for v in ("dense", "pruned"):
                for rt in list(runtimes):
                    f = m["files"][v]
                    try:
                        r = OrtRunner(f["onnx"], x) if rt == "ort" else OvRunner(f["xml"], x, rt.split("-")[1])
                    except Exception as e:  # bf16 refused by this CPU plugin: drop that runtime
                        print(f"{rt}: cannot compile ({type(e).__name__}: {e}); skipped", file=sys.stderr)
                        runtimes.remove(rt)
                        continue
                    runners[(m["name"], v, rt)] = r
                    precisions[(m["name"], rt)] = r.precision
        lat = {k: [] for k in runners}
        lat_min = {k: [] for k in runners}
        t0, steal0 = time.time(), steal_ticks()
        for rep in range(args.reps):
            order = ("dense", "pruned") if rep % 2 == 0 else ("pruned", "dense")
            for rt in runtimes:
                for m in models:
                    for v in order:
                        med, low = time_once(runners[(m["name"], v, rt)], args.iters)
                        lat[(m["name"], v, rt)].append(med)
                        lat_min[(m["name"], v, rt)].append(low)
            print(f"round {rep + 1}/{args.reps} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        timed_s, steal1 = time.time() - t0, steal_ticks()
        del runners

        breakdown = {}
        mnv2 = next((m for m in models if "mobilenet" in m["name"]), None)
        if args.profile_iters > 0 and mnv2 is not None:
            breakdown = profile_breakdown({v: mnv2["files"][v]["onnx"] for v in ("dense", "pruned")}, x,
                                          args.profile_iters, work)
            print("profile done", file=sys.stderr, flush=True)
    wall = time.time() - t_start
    steal_pct = (100.0 * (steal1 - steal0) / os.sysconf("SC_CLK_TCK") / timed_s / (os.cpu_count() or 1)
                 if steal0 >= 0 and steal1 >= 0 else None)

    rows = []
    for rt in runtimes:
        for m in models:
            d, p = lat[(m["name"], "dense", rt)], lat[(m["name"], "pruned", rt)]
            paired = [a / b for a, b in zip(d, p)]
            dm, pm = lat_min[(m["name"], "dense", rt)], lat_min[(m["name"], "pruned", rt)]
            sp_min = min(dm) / min(pm)  # fastest of all rounds x iters, each
            macs_red = m["macs"]["dense"] / m["macs"]["pruned"]
            sp = statistics.median(paired)
            rows.append({"model": m["name"], "source": m["source"], "runtime": rt,
                         "precision": precisions[(m["name"], rt)], "macs_dense": m["macs"]["dense"],
                         "macs_pruned": m["macs"]["pruned"], "params_dense": m["params"]["dense"],
                         "params_pruned": m["params"]["pruned"], "macs_reduction": macs_red,
                         "dense_ms": statistics.median(d), "pruned_ms": statistics.median(p),
                         "dense_ms_reps": d, "pruned_ms_reps": p, "speedup": sp, "speedup_min": min(paired),
                         "speedup_max": max(paired), "efficiency": sp / macs_red,
                         "dense_min_ms_reps": dm, "pruned_min_ms_reps": pm, "speedup_from_min": sp_min,
                         "efficiency_from_min": sp_min / macs_red})

    rtname = {"ort": f"onnxruntime {versions['onnxruntime']}",
              "ov-f32": f"OpenVINO {versions.get('openvino', '').split('-')[0]}",
              "ov-bf16": f"OpenVINO {versions.get('openvino', '').split('-')[0]}"}
    print(f"\n{len(models)} models, {args.size}x{args.size}, batch 1, 1 thread, ratio {args.ratio:.0%} uniform, "
          f"round_to {args.round_to}, seed {args.seed}; {args.reps} interleaved rounds x {args.iters} inferences "
          f"in {timed_s:.0f} s (whole run {wall:.0f} s); pinned to CPUs {affinity}; load average "
          f"{load0} -> {loadavg()}; hypervisor steal "
          f"{'n/a' if steal_pct is None else format(steal_pct, '.1f') + ' %'}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"torch {versions['torch']}\n")
    print("| model | runtime (precision run) | MMACs dense → pruned | MACs reduction | dense p50 ms | pruned p50 ms "
          "| speed-up (per-round min–max) | efficiency | fastest ms dense → pruned | speed-up, efficiency from fastest |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {rtname[r['runtime']]} ({r['precision']}) | {r['macs_dense'] / 1e6:.0f} → "
              f"{r['macs_pruned'] / 1e6:.0f} | {r['macs_reduction']:.2f}× | {r['dense_ms']:.2f} | "
              f"{r['pruned_ms']:.2f} | {r['speedup']:.2f}× ({r['speedup_min']:.2f}–{r['speedup_max']:.2f}) | "
              f"{r['efficiency']:.2f} | {min(r['dense_min_ms_reps']):.2f} → {min(r['pruned_min_ms_reps']):.2f} | "
              f"{r['speedup_from_min']:.2f}×, {r['efficiency_from_min']:.2f} |")
    if breakdown:
        d, p = breakdown["dense"], breakdown["pruned"]
        print(f"\n**MobileNetV2, onnxruntime 1 thread, per layer type** (kernel time per inference, fastest of "
              f"{args.profile_iters} profiled inferences, dense and pruned alternating; shares of the sum over "
              f"types: dense {d['_total']['ms']:.2f} ms, pruned {p['_total']['ms']:.2f} ms; median whole run "
              f"{d['_total']['run_ms']:.2f} → {p['_total']['run_ms']:.2f} ms)\n")
        print("| layer type | MMACs dense → pruned | MACs reduction | ms dense → pruned | share of time dense → pruned "
              "| speed-up | efficiency | µs per MMAC dense → pruned |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k in sorted(set(d) | set(p)):
            if k == "_total":
                continue
            a, b = d.get(k, {"ms": 0.0, "macs": 0}), p.get(k, {"ms": 0.0, "macs": 0})
            mr = a["macs"] / b["macs"] if b["macs"] else float("nan")
            sp = a["ms"] / b["ms"] if b["ms"] else float("nan")
            upm = (f"{1e3 * a['ms'] / (a['macs'] / 1e6):.2f} → {1e3 * b['ms'] / (b['macs'] / 1e6):.2f}"
                   if a["macs"] and b["macs"] else "—")
            print(f"| {k} | {a['macs'] / 1e6:.1f} → {b['macs'] / 1e6:.1f} | "
                  f"{'—' if mr != mr else format(mr, '.2f') + '×'} | {a['ms']:.2f} → {b['ms']:.2f} | "
                  f"{100 * a['ms'] / d['_total']['ms']:.0f} % → {100 * b['ms'] / p['_total']['ms']:.0f} % | "
                  f"{sp:.2f}× | {'—' if mr != mr else format(sp / mr, '.2f')} | {upm} |")
        print()
    if args.out:
        for m in models:
            m["files"] = {v: {k: str(p) for k, p in f.items()} for v, f in m["files"].items()}
        args.out.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"),
                                        "argv": sys.argv, "args": {k: str(v) for k, v in vars(args).items()},
                                        "versions": versions, "steal_pct": steal_pct, "timed_s": timed_s,
                                        "wall_s": wall, "models": models, "rows": rows,
                                        "breakdown": breakdown}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
