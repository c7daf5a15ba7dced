"""Search cost to target: device evaluations and wall time for ``bisect`` vs ``netadapt``, side by side.

    python bench/search.py [--model resnet20] [--target latency_p50_ms=0.7x] [--max-drop 3] [--align 8]
                           [--algos bisect,netadapt] [--max-evals 8] [--finetune-per-class 200]
                           [--finetune-epochs 1] [--netadapt-max-proposals 4] [--quick] [--out FILE.json]

Both algorithms search the same model for the same target on the local device (the agent as a separate process,
onnxruntime, the device's threads and alignment), each from an empty run folder and an empty cache (so netadapt
pays for its layer-latency table and bisect for its sensitivity table). Reported per algorithm: verdict, device
evaluations (dense included), host evaluations (netadapt's proposals scored with torch on the calib split),
layer-table jobs, wall time, the chosen candidate's measured p50 against dense, and its top-1 drop measured by
the agent on the eval split. Same machine, one run, one after the other: the wall times compare the algorithms,
not this VM with another.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from host.search import algos as sa
from host.search import options as so
from host.search import run as hs
from host.fleet import targets as tg
from host.fleet.devices import local_device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--target", action="append", default=None, help="METRIC=VALUE (default latency_p50_ms=0.7x)")
    ap.add_argument("--max-drop", type=float, default=3.0, help="maximum top-1 drop, pp")
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--algos", default="bisect,netadapt")
    ap.add_argument("--max-evals", type=int, default=8)
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-per-class", type=int, default=200)
    ap.add_argument("--eval-per-class", type=int, default=100)
    ap.add_argument("--netadapt-max-proposals", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="short timing windows on the device")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    targets = args.target or ["latency_p50_ms=0.7x"]
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in algos:
            work = Path(tmp) / algo
            dev = local_device()
            dev = dev.model_copy(update={"round_to": args.align, "cache_dir": str(work / "dev-cache"),
                                         "runtime": dev.runtime.model_copy(update={"threads": args.threads})})
            tset = tg.device_targets([dev], tg.parse_cli(targets, args.max_drop, None))
            opts = so.SearchOptions(
                model=args.model, algo=algo, max_evals=args.max_evals, quick=args.quick,
                eval_per_class=args.eval_per_class, cache_dir=str(work / "cache"),
                recovery=so.RecoveryOptions(finetune_epochs=args.finetune_epochs,
                                            finetune_per_class=args.finetune_per_class),
                algo_options=sa.AlgoOptions(netadapt_max_proposals=args.netadapt_max_proposals))
            t0 = time.time()
            res = hs.start(opts, [dev], tset, out=work / "run", run_id=f"bench-{algo}")
            wall = time.time() - t0
            d = res.devices[0]
            dense = next((r for r in d.rows if r.get("ratio") == 0.0 or r.get("note") == "dense"), None)
            pick = d.chosen or d.closest or {}
            row = {"algo": algo, "verdict": d.verdict, "reason": d.reason, "device_evals": d.device_evals,
                   "host_evals": d.host_evals, "lut_jobs": d.lut_jobs, "wall_s": wall,
                   "dense_p50_ms": dense.get("latency_p50_ms") if dense else None,
                   "p50_ms": pick.get("latency_p50_ms"), "drop_pp": pick.get("drop_pp"),
                   "top1": pick.get("top1"), "ratio": pick.get("ratio"),
                   "pruned_fraction": pick.get("pruned_fraction")}
            row["latency_ratio"] = (row["p50_ms"] / row["dense_p50_ms"]
                                    if row["p50_ms"] and row["dense_p50_ms"] else None)
            rows.append(row)
            print(f"{algo}: {d.verdict} after {d.device_evals} device evaluations, {wall:.0f} s ({d.reason})",
                  file=sys.stderr, flush=True)

    print(f"\n{args.model}, target {', '.join(targets)}, max drop {args.max_drop} pp, local device "
          f"(onnxruntime, {args.threads} thread(s), align {args.align}); recovery per candidate: BN recalibration + "
          f"{args.finetune_epochs} epoch(s) × {args.finetune_per_class * 10} images; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| algorithm | verdict | device evals | host evals | layer-table jobs | wall time | p50 / dense "
          "| top-1 drop (pp) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['latency_ratio']:.2f}" if r["latency_ratio"] else "—"
        drop = f"{r['drop_pp']:.2f}" if isinstance(r["drop_pp"], (int, float)) else "—"
        print(f"| {r['algo']} | {r['verdict']} | {r['device_evals']} | {r['host_evals']} | {r['lut_jobs']} | "
              f"{r['wall_s'] / 60:.1f} min | {ratio} | {drop} |")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows},
                                       indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
