"""Channel allocation at equal latency: ``uniform`` vs ``sensitivity`` vs ``latency`` (issue 17), side by side.

    python bench/allocation.py [--model resnet56] [--ratios 0.2,0.35,0.5] [--per-class 500] [--out FILE.json]

For one model on the local device (the agent as a separate process, onnxruntime, the device's threads and
alignment): the dense model is measured, the device's layer-latency table is timed (the one ``netadapt`` and
``--allocation latency`` use), then for each allocation and each global ratio the search's own candidate is built
exactly as a search builds it (prune by the allocation's per-group counts → the same short recovery for all:
BatchNorm recalibration and one epoch over ``--per-class`` fine-tune images per class → ONNX) and measured by the
agent: p50 latency and top-1 on the 1,000-image eval split. Reported per point: pruned fraction of the channels,
MMACs, the table's latency estimate, measured p50 (× dense), top-1; and per allocation the top-1 interpolated at
1.3× and 1.5× dense speed. The short recovery ranks allocations; it is not what a fully recovered candidate
reaches. One process, one machine: the allocations compare with each other, not with another run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional


def interpolate(points: List[Dict[str, Any]], p50: float) -> Optional[float]:
    """top-1 at ``p50`` on the line between the measured points that bracket it (None outside them)."""
    pts = sorted((p["p50_ms"], p["top1"]) for p in points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= p50 <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (p50 - x0) / (x1 - x0)
    return None


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratios", default="0.2,0.35,0.5")
    ap.add_argument("--allocations", default="uniform,sensitivity,latency")
    ap.add_argument("--per-class", type=int, default=500, help="fine-tune images per class of the short recovery")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from host.fleet.devices import local_device
    from host.fleet.targets import TargetSet
    from host.search import data as search_data
    from host.search.algos import AlgoOptions, Candidate, DeviceContext
    from host.search.algos.latency import LutEstimator, group_gains, lut_configs
    from host.search.evaluator import FleetEvaluator, Request
    from host.search.options import RecoveryOptions, SearchOptions, candidate_key, profile_for
    from host.search.space import build_space, sensitivity_table

    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    allocs = [a.strip() for a in args.allocations.split(",") if a.strip()]
    emit = lambda kind, dev, msg: print(f"[{kind}] {dev} {msg}", file=sys.stderr, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        opts = SearchOptions(model=args.model, cache_dir=str(Path(tmp) / "cache"),
                             short_recovery=RecoveryOptions(finetune_per_class=args.per_class))
        wl = search_data.open_search_workload(opts)
        loaded = wl.model
        t0 = time.monotonic()
        sens = sensitivity_table(loaded.model, loaded.name, loaded.meta, opts, emit, workload=wl)
        sens_s = time.monotonic() - t0
        space = build_space(loaded.name, loaded.model, loaded.meta, sensitivities=sens, example=wl.example)
        ev = FleetEvaluator(Path(tmp) / "run", "bench-alloc", opts, loaded.name, loaded.model, loaded.meta, space,
                            emit, workload=wl)
        dev = local_device()
        prof = profile_for(dev)
        got: Dict[str, Any] = {}

        def done(req: Any, m: Any, extra: Dict[str, Any]) -> None:
            if not m.ok:
                raise SystemExit(f"{req.candidate.note}: {m.error}")
            got[req.key] = (m.metrics, (extra.get("recovery_result") or {}))

        dense = Candidate((), "none", 0.0, "dense")
        dkey = candidate_key(space, opts, prof, dense)
        ev.measure([Request(dev, prof, dense, dkey)], done)
        dense_p50, dense_top1 = got[dkey][0]["latency_p50_ms"], got[dkey][0]["top1"]
        lut: Dict[str, float] = {}
        t0 = time.monotonic()
        levels = AlgoOptions().netadapt_levels
        errors = ev.layer_latency([(dev, prof, lut_configs(space, prof.round_to, levels, 0.9))],
                                  lambda d, key, ms, ident: lut.__setitem__(key, ms))
        if errors.get(dev.id):
            raise SystemExit(f"layer table: {errors[dev.id]}")
        lut_s = time.monotonic() - t0
        est = LutEstimator(space, lut, dense_p50, prof.round_to, levels, 0.9)
        gains = group_gains(space, est, prof.round_to, levels, 0.9)
        rows: List[Dict[str, Any]] = []
        for alloc in allocs:
            ctx = DeviceContext(dev.id, space, prof.round_to, TargetSet(), 8, AlgoOptions(allocation=alloc))
            ctx.gain = gains
            for r in ratios:
                cand = ctx.candidate(r, "short")
                cand = Candidate(cand.kept, cand.recovery, cand.ratio, f"{alloc} {r:g}")
                key = candidate_key(space, opts, prof, cand)
                if key not in got:
                    ev.measure([Request(dev, prof, cand, key)], done)
                m, rr = got[key]
                rows.append({"allocation": alloc, "ratio": r, "pruned_fraction": space.pruned_fraction(cand.kept_map()),
                             "mmacs": space.macs(cand.kept_map()) / 1e6, "estimate_ms": est.estimate(cand.kept_map()),
                             "p50_ms": m["latency_p50_ms"], "top1": m["top1"], "recovery_s": rr.get("seconds")})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"dense: p50 {dense_p50:.3f} ms, top-1 {dense_top1:.2%}, {space.dense_macs / 1e6:.1f} MMACs; sensitivity "
          f"table {sens_s:.0f} s, layer table {len(lut)} configurations in {lut_s:.0f} s")
    print("\n| allocation | ratio | channels pruned | MMACs | table estimate ms | p50 ms (× dense) | top-1 (short recovery) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for x in rows:
        print(f"| {x['allocation']} | {x['ratio']:g} | {x['pruned_fraction']:.1%} | {x['mmacs']:.1f} | "
              f"{x['estimate_ms']:.3f} | {x['p50_ms']:.3f} ({x['p50_ms'] / dense_p50:.2f}×) | {x['top1']:.2%} |")
    print("\n| allocation | top-1 at 1.3× speed | top-1 at 1.5× speed |")
    print("| --- | ---: | ---: |")
    summary = {}
    for alloc in allocs:
        pts = [x for x in rows if x["allocation"] == alloc] + [{"p50_ms": dense_p50, "top1": dense_top1}]
        at = {s: interpolate(pts, dense_p50 / s) for s in (1.3, 1.5)}
        summary[alloc] = at
        print(f"| {alloc} | " + " | ".join("outside the points" if v is None else f"{v:.2%}" for v in at.values())
              + " |")
    if args.out:
        args.out.write_text(json.dumps({"dense_p50_ms": dense_p50, "dense_top1": dense_top1, "rows": rows,
                                        "at_speed": summary, "layer_configs": len(lut), "layer_table_s": lut_s},
                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
