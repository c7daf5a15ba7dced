"""Release gate: false alarms (A/A) and detection of slowdowns, old rule (samples) vs new rule (runs), quiet and
loaded, side by side.

    python bench/gate.py [--runs 8] [--repeat 5] [--slowdowns 0.03,0.05,0.10,0.20] [--out FILE.json]

Real noise, injected effects. ResNet-20 (ONNX, onnxruntime, the local device) is benchmarked ``--runs`` times on a
quiet machine and ``--runs`` times under a background job that switches on and off (0.3 s busy, 0.2 s idle) on
the CPU the agent is pinned to, alternating quiet and loaded, each run ``bench --quick --repeat N`` into one
results store. Then every ordered pair (baseline: a quiet run; candidate: another quiet run, or a loaded run) is
judged by both rules with the gate's own code (:mod:`host.results.regress.checks`), once as measured (A/A: any
regression is a false alarm) and once per slowdown x, the candidate's samples and run medians multiplied by
1 + x (what a real x slowdown of the same noise would look like; the noise is this machine's, the effect is not
measured). Old rule: one-sided Mann–Whitney on <= 1000 thinned pooled samples at alpha and median > tolerance
(what the gate did with one window a side). New rule: over run medians, with the noise floor from the baseline's
runs and the A/A history the store would hold (the quiet runs measured before the candidate; the 15 % prior while
there are fewer than two), the candidate's contended windows discounted (:mod:`host.results.regress.contention`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

LOAD = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
while True:
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        pass
    time.sleep(0.2)
"""


def edgeprune(*args: str) -> None:
    r = subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"edgeprune {' '.join(args)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def collect(work: Path, runs: int, repeat: int) -> Dict[str, List[str]]:
    from host.fleet.devices import auto_affinity

    edgeprune("prune", "--model", "resnet20", "--ratio", "0", "--formats", "onnx", "--out", str(work / "r20"))
    manifest = work / "r20" / "resnet20-r000.onnx.manifest.json"
    cpu = auto_affinity(1)[0]
    ids: Dict[str, List[str]] = {"quiet": [], "loaded": []}
    for i in range(2 * runs):
        cond = "loaded" if i % 2 else "quiet"
        run_id = f"{cond}{i // 2}"
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(cpu)]) if cond == "loaded" else None
        try:
            edgeprune("bench", "--model", str(manifest), "--quick", "--repeat", str(repeat), "--run-id", run_id,
                      "--db", str(work / "gate.db"), "--out", str(work / run_id))
        finally:
            if load is not None:
                load.kill()
                load.wait()
        ids[cond].append(run_id)
        print(f"{run_id} done", flush=True)
    return ids


def judge(b_rows: List[Dict[str, Any]], c_rows: List[Dict[str, Any]], x: float, tol: float, alpha: float,
          history: List[float]) -> Dict:
    from host.results.regress import checks
    from host.results.regress.model import Check

    scaled = []
    for r in c_rows:
        r = dict(r)
        r["samples_ms"] = [s * (1 + x) for s in (r.get("samples_ms") or [])]
        r["latency_p50_ms"] = r["latency_p50_ms"] * (1 + x)
        scaled.append(r)
    old = checks._sampled_check(Check("d", "m", "l", "latency", "pass", ""), checks._latency_samples(b_rows),
                                checks._latency_samples(scaled), None, None, tol, alpha, "ms")
    new = checks._runs_check(Check("d", "m", "l", "latency", "pass", ""), checks._run_medians(b_rows),
                             checks._run_medians(scaled), b_rows, scaled, tol, alpha, history)
    return {"old": old.verdict, "new": new.verdict}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=8, help="benches per condition (quiet, loaded)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--slowdowns", default="0.03,0.05,0.10,0.20")
    ap.add_argument("--tol", type=float, default=0.05)
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from host.results.store import Store

    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="gate-"))
    if (work / "ids.json").is_file():          # --work of an earlier collection: judge it again
        ids = json.loads((work / "ids.json").read_text())
    else:
        ids = collect(work, args.runs, args.repeat)
        (work / "ids.json").write_text(json.dumps(ids))
    order = [rid for pair in zip(ids["quiet"], ids["loaded"]) for rid in pair]      # the order they were measured
    with Store(str(work / "gate.db")) as st:
        rows = {rid: [r for r in st.measurements(rid) if r["status"] == "ok"] for c in ids.values() for rid in c}
    effects = [0.0] + [float(x) for x in args.slowdowns.split(",")]
    table: Dict[str, Dict[str, Dict[str, Dict[str, int]]]] = {}
    for cond in ("quiet", "loaded"):
        for x in effects:
            tally = {"old": {}, "new": {}}
            for b in ids["quiet"]:
                for c in ids[cond]:
                    if c == b:
                        continue
                    # A/A history as the store would give it: the quiet runs recorded before the candidate
                    earlier = [q for q in order[:order.index(c)] if q.startswith("quiet") and q not in (b, c)][-10:]
                    ref = float(np.median([r["latency_p50_ms"] for r in rows[b]]))
                    history = [float(np.median([r["latency_p50_ms"] for r in rows[q]])) / ref - 1 for q in earlier]
                    for rule, verdict in judge(rows[b], rows[c], x, args.tol, args.alpha, history).items():
                        tally[rule][verdict] = tally[rule].get(verdict, 0) + 1
            table.setdefault(cond, {})[f"{x:.2f}"] = tally
    spreads = {rid: float(np.max(np.abs(np.array([r["latency_p50_ms"] for r in rs]) /
                                        np.median([r["latency_p50_ms"] for r in rs]) - 1))) for rid, rs in rows.items()}
    doc = {"runs": ids, "repeat": args.repeat, "tol": args.tol, "alpha": args.alpha, "table": table,
           "run_spread": spreads, "seconds": round(time.monotonic() - t0, 1), "python": platform.python_version(),
           "cpus": len(os.sched_getaffinity(0))}
    print(f"\n{args.runs} quiet and {args.runs} loaded benches (--quick --repeat {args.repeat}), tolerance "
          f"{args.tol:.0%}, alpha {args.alpha:g}; pairs: baseline quiet x candidate (quiet or loaded); "
          f"{doc['seconds']:.0f} s\n")
    print("| candidate | slowdown | pairs | old rule: regression | new rule: regression | new rule: inconclusive |")
    print("|---|---:|---:|---:|---:|---:|")
    for cond, by_x in table.items():
        for x, t in by_x.items():
            n = sum(t["new"].values())
            print(f"| {cond} | {float(x):.0%} | {n} | {t['old'].get('regression', 0)} "
                  f"({t['old'].get('regression', 0) / n:.0%}) | {t['new'].get('regression', 0)} "
                  f"({t['new'].get('regression', 0) / n:.0%}) | {t['new'].get('inconclusive', 0)} "
                  f"({t['new'].get('inconclusive', 0) / n:.0%}) |")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
