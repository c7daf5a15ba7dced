"""A/B interleaving vs two separate benches: false alarms, detection of a real ~9 % slowdown, and device time.

    python bench/gate_ab.py [--trials 8] [--pairs 5] [--work DIR] [--out FILE.json]

Real effects, real noise. A is ResNet-20 (ONNX, onnxruntime, 1 thread, the local device); B is the same network
doing real extra work that changes none of its outputs (``tests.test_regress_bench.ExtraWork``: two 3x3
convolutions of 16 channels on the input, +9 % measured side by side). Trials alternate quiet and loaded (a
background job switching on and off, 0.3 s busy, 0.2 s idle, on the CPU the agent is pinned to). Each trial runs,
with the CLI a user would run:

- ``edgeprune ab --a A --quick`` (A against itself: any regression is a false alarm),
- ``edgeprune ab --a A --b B --quick`` (must be a regression),
- ``edgeprune bench --quick`` of A, then of B (default repetitions), and ``edgeprune regress --compare-anyway``
  of B against A (another artifact: a model change), in one results store, so later trials have the earlier benches of A as A/A history, as a lab's store would.

Device time is each command's wall-clock time (process start, artifact load, timed windows: the device is held for
all of it); a bench also runs its eval images for accuracy, which ``ab`` (speed only) does not.
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
from typing import Any, Dict, List, Tuple

import numpy as np

from gate import LOAD           # bench/gate.py's background job (this script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent.parent


def edgeprune(*args: str) -> Tuple[int, str, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "host.cli", *args], capture_output=True, text=True, cwd=ROOT)
    dt = time.monotonic() - t0
    if r.returncode not in (0, 1, 3):
        raise SystemExit(f"edgeprune {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                         f"{r.stderr[-2000:]}")
    return r.returncode, r.stdout, dt


def artifacts(work: Path) -> Tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from edgeprune import models
    from tests.test_regress_bench import extra_work_artifact

    edgeprune("prune", "--model", "resnet20", "--ratio", "0", "--formats", "onnx", "--out", str(work / "r20"))
    a = work / "r20" / "resnet20-r000.onnx.manifest.json"
    (work / "r20x").mkdir(exist_ok=True)
    b = Path(extra_work_artifact(work / "r20x", models.pretrained("resnet20")))
    return a, b


def trial(work: Path, i: int, a: Path, b: Path, pairs: int) -> Dict[str, Any]:
    abdb, bdb = str(work / "ab.db"), str(work / "bench.db")
    out: Dict[str, Any] = {}
    for name, extra in (("ab_aa", []), ("ab_ab", ["--b", str(b)])):
        code, stdout, dt = edgeprune("ab", "--a", str(a), *extra, "--quick", "--pairs", str(pairs), "--json",
                                     "--db", abdb, "--out", str(work / f"{name}{i}"))
        doc = json.loads(stdout)
        out[name] = {"verdict": doc["verdict"], "effect": doc["effect"], "unstable": doc["unstable_windows"],
                     "seconds": dt}
    secs = 0.0
    for run_id, art in ((f"a{i}", a), (f"b{i}", b)):
        _, _, dt = edgeprune("bench", "--model", str(art), "--quick", "--run-id", run_id, "--db", bdb,
                             "--out", str(work / run_id))
        secs += dt
    code, stdout, _ = edgeprune("regress", "--baseline", f"a{i}", "--candidate", f"b{i}", "--db", bdb, "--json",
                                  "--compare-anyway")      # B is another artifact: a model change
    doc = json.loads(stdout)
    lat = [c for c in doc.get("checks", []) if c.get("metric") == "latency"]
    out["benches"] = {"verdict": {0: "pass", 1: "regression", 3: "inconclusive"}[code], "seconds": secs,
                      "effect": lat[0].get("change") if lat else None,
                      "noise_floor": lat[0].get("noise_floor") if lat else None}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=8, help="trials, alternately quiet and loaded")
    ap.add_argument("--pairs", type=int, default=5, help="ab rounds (A and B once each per round)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from host.fleet.devices import auto_affinity

    t0 = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="gate-ab-"))
    work.mkdir(parents=True, exist_ok=True)
    a, b = artifacts(work)
    cpu = auto_affinity(1)[0]
    trials: List[Dict[str, Any]] = []
    for i in range(args.trials):
        cond = "loaded" if i % 2 else "quiet"
        load = subprocess.Popen([sys.executable, "-c", LOAD, str(cpu)]) if cond == "loaded" else None
        try:
            t = trial(work, i, a, b, args.pairs)
        finally:
            if load is not None:
                load.kill()
                load.wait()
        t["condition"] = cond
        trials.append(t)
        print(f"trial {i} ({cond}): " + ", ".join(f"{k} {v['verdict']} ({v['seconds']:.1f} s)"
                                                  for k, v in t.items() if isinstance(v, dict)), flush=True)
    doc = {"trials": trials, "pairs": args.pairs, "seconds": round(time.monotonic() - t0, 1),
           "python": platform.python_version(), "cpus": len(os.sched_getaffinity(0))}
    print(f"\n{args.trials} trials (half quiet, half loaded), ab --pairs {args.pairs} --quick vs two "
          f"bench --quick + regress; {doc['seconds']:.0f} s\n")
    print("| condition | comparison | regression | inconclusive | pass | median effect | median device time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    names = {"ab_aa": "ab, A vs A", "ab_ab": "ab, A vs A+9 %", "benches": "two benches + regress, A vs A+9 %"}
    for cond in ("quiet", "loaded"):
        ts = [t for t in trials if t["condition"] == cond]
        for key, label in names.items():
            v = [t[key]["verdict"] for t in ts]
            eff = [t[key]["effect"] for t in ts if t[key].get("effect") is not None]
            print(f"| {cond} | {label} | {v.count('regression')}/{len(v)} | {v.count('inconclusive')}/{len(v)} | "
                  f"{v.count('pass') + v.count('improved')}/{len(v)} | "
                  f"{(f'{np.median(eff):+.1%}' if eff else '-')} | "
                  f"{np.median([t[key]['seconds'] for t in ts]):.1f} s |")
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
