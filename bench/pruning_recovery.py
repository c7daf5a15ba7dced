"""Pruning with recovery: accuracy on the full CIFAR-10 test set and measured latency, next to DepGraph's table.

    python bench/pruning_recovery.py [--model resnet56] [--ratio 0.5] [--align 8] [--epochs 3]
                                     [--per-class N] [--minutes 60] [--distill 0.5] [--variants channel,2:4]
                                     [--reps 5] [--workdir DIR] [--out FILE.json]

Variants (each from the pretrained checkpoint, each given the same recovery budget):

* ``channel``: L1 channel pruning at ``--ratio`` with channels aligned to ``--align`` (Torch-Pruning dependency
  graph; MACs counted before/after), BatchNorm recalibration on the calib split, then fine-tuning on the
  finetune split (the training set minus calib; SGD, cosine schedule, crop+flip, optional distillation from
  the dense model) for ``--epochs`` over ``--per-class`` images per class (size them to the hardware: the cosine
  schedule only anneals if it runs to its end), with ``--minutes`` as a wall-time safety stop.
* ``2:4``: magnitude 2:4 masks on every conv/linear whose reduction dimension allows it, the same recovery with
  the masks kept exactly, and the exported ONNX checked to carry the pattern.

Recovery runs on CUDA when torch sees a GPU, else on the CPU (stated in the output). Top-1 is measured by torch
on the full 10,000-image test set (needs the data folder: EDGEPRUNE_DATA or ../shared/data). Latency is the
agent's p50 (separate process, onnxruntime, 1 thread pinned), dense and variants interleaved over ``--reps``
rounds, median of the per-run p50s. Reference: DepGraph (Fang et al., CVPR 2023, Table 1), ResNet-56 on
CIFAR-10, 93.53 → 93.46 at 2.11× speed-up (their "speed-up" is the MACs ratio), after 100+ epochs of
fine-tuning on a GPU. 2:4 does not make CPU inference faster (no sparse kernels in onnxruntime's CPU provider);
its latency ratio is printed to show exactly that.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from agent import schema
from edgeprune import data, export, finetune, models, prune, recovery, sparsity
from host.fleet.devices import auto_affinity
from host.fleet.transport import LocalTransport

DEPGRAPH = {"source": "Fang et al., DepGraph, CVPR 2023, Table 1 (ResNet-56, CIFAR-10)",
            "base_top1": 93.53, "pruned_top1": 93.46, "macs_reduction": 2.11}


def recover(model, teacher, args, work: Path, tag: str, cal, ft, masks=None):
    """BatchNorm recalibration on ``cal``, then the fine-tune on ``ft`` distilled from ``teacher``
    (:func:`edgeprune.recovery.recover`), resumable from ``work/<tag>.ckpt``; progress on stderr once a minute."""
    t0 = time.time()
    last = [0.0]

    def events(kind, msg, done, total):
        if kind == "progress" and time.time() - last[0] > 60:
            last[0] = time.time()
            print(f"  {tag}: step {done}/{total} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    plan = recovery.RecoveryPlan(recalibrate=True, epochs=args.epochs, max_seconds=args.minutes * 60, lr=args.lr,
                                 batch_size=args.batch_size, distill=args.distill, seed=args.seed)
    res = recovery.recover(model, plan, calib=cal, train=ft, teacher=teacher, masks=masks,
                           checkpoint=work / f"{tag}.ckpt", events=events).finetune
    out = asdict(res)
    out["epochs_done"] = res.images_seen / len(ft)
    return out


def time_artifacts(arts, reps: int, min_duration: float, work: Path):
    transport = LocalTransport()
    lat = {a["tag"]: [] for a in arts}
    version = None
    for rep in range(reps):
        for a in arts:
            job = schema.JobSpec(
                job_id=f"recovery-{a['tag']}-{rep}",
                artifact=schema.ArtifactSpec(path=str(a["path"]), sha256=a["sha256"]),
                runtime=schema.RuntimeSpec(name="onnxruntime", threads=1),
                timing=schema.TimingSpec(warmup_iters=20, warmup_s=0.3, min_iters=200, min_duration_s=min_duration,
                                         seed=rep, keep_samples=0, cpu_affinity=auto_affinity(1)),
                power=None).validate()
            rep_ = transport.run_job(job, work / job.job_id)
            if rep_.status != "ok":
                raise SystemExit(f"{job.job_id}: {rep_.error.type}: {rep_.error.message}")
            lat[a["tag"]].append(rep_.timing.latency_ms.median)
            version = rep_.identity.runtime_version
    return lat, version


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--variants", default="channel,2:4")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per variant: the cosine schedule's length")
    ap.add_argument("--per-class", type=int, default=None,
                    help="finetune-split images per class (default: all 4,900); size an epoch to the budget")
    ap.add_argument("--minutes", type=float, default=60.0,
                    help="wall-time bound per variant (a safety stop: a cut schedule never anneals)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--distill", type=float, default=0.5, help="distillation weight (0 = plain cross-entropy)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--min-duration", type=float, default=2.0, help="seconds per timed window")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints/artifacts here (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in ("channel", "2:4"):
            ap.error(f"--variants: unknown variant {v!r} (channel, 2:4)")
    if data.data_dir() is None:
        ap.error("needs the full CIFAR-10 files: set EDGEPRUNE_DATA (or put ../shared/data beside the repo)")

    device = finetune.default_device()
    hw = (torch.cuda.get_device_name(0) if device == "cuda"
          else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads")
    test = data.eval_split(None)
    base, meta = models.pretrained(args.model)
    example = torch.zeros(1, 3, 32, 32)
    check = data.to_tensor_batch(test.images[::313][:32])
    t_all = time.time()
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    else:
        work = args.workdir
        work.mkdir(parents=True, exist_ok=True)

    def ship(model, tag, plan_sha):
        man = export.export_onnx(model, work / f"{tag}.onnx", check_inputs=check, model_name=args.model,
                                 source_checkpoint_sha256=str(meta["sha256"]), pruning_plan_sha256=plan_sha)
        return {"tag": tag, "path": work / f"{tag}.onnx", "sha256": man.sha256}

    cal, ft = data.calib_split(), data.finetune_split(args.per_class)  # read once, shared by the variants
    dense_top1 = finetune.evaluate(base, test)
    macs0, params0 = prune.count(base, example)
    rows = [{"variant": "dense", "top1": dense_top1, "macs": macs0, "params": params0, "recovery": None}]
    arts = [ship(base, "dense", "0" * 64)]
    print(f"dense {args.model}: top-1 {dense_top1:.2%} on {len(test)} test images; {macs0 / 1e6:.1f} MMACs",
          file=sys.stderr, flush=True)

    for v in variants:
        model = copy.deepcopy(base)
        if v == "channel":
            pr = prune.prune(model, args.ratio, example, importance="l1", round_to=args.align)
            tag, plan_sha, masks, extra = "channel", pr.plan.sha256(), None, {
                "ratio": args.ratio, "align": args.align,
                "conv_out_channels": sorted({m.out_channels for m in model.modules()
                                             if isinstance(m, torch.nn.Conv2d)})}
        else:
            sres = sparsity.apply_2to4(model)
            tag, plan_sha, masks, extra = "2to4", "0" * 64, sres.masks, {"sparsity": sres.to_dict()}
        before = finetune.evaluate(model, test)
        print(f"{tag}: top-1 before recovery {before:.2%}; recovering on {device} for at most "
              f"{args.minutes:g} min / {args.epochs} epochs", file=sys.stderr, flush=True)
        rec = recover(model, base, args, work, tag, cal, ft, masks=masks)
        top1 = finetune.evaluate(model, test)
        macs, params = prune.count(model, example)
        art = ship(model, tag, plan_sha)
        if v == "2:4":
            rep = sparsity.check_onnx_2to4(art["path"])
            rep.require()
            extra["onnx_2to4_check"] = {"ok": rep.ok, "sparse_layers": len(rep.sparse_layers),
                                        "layers": len(rep.layers)}
        arts.append(art)
        rows.append({"variant": v, "top1_before_recovery": before, "top1": top1, "macs": macs, "params": params,
                     "recovery": rec, **extra})
        print(f"{tag}: top-1 {top1:.2%} after {rec['epochs_done']:.2f} epochs "
              f"({rec['seconds']:.0f} s)", file=sys.stderr, flush=True)

    lat, ort_version = time_artifacts(arts, args.reps, args.min_duration, work)
    dense_p50 = statistics.median(lat["dense"])
    for row, a in zip(rows, arts):
        row["p50_ms_reps"] = lat[a["tag"]]
        row["p50_ms"] = statistics.median(lat[a["tag"]])
        row["latency_ratio"] = dense_p50 / row["p50_ms"]
        row["macs_reduction"] = macs0 / row["macs"]
    wall = time.time() - t_all

    print(f"\n{args.model}, full CIFAR-10 test set ({len(test)} images); recovery on {hw}; "
          f"latency: agent, onnxruntime {ort_version}, 1 thread, median of {args.reps} interleaved runs; "
          f"total {wall / 60:.0f} min\n")
    print("| variant | top-1 before recovery | top-1 after | Δ vs dense (pp) | MACs reduction | epochs (time) "
          "| p50 ms | latency ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rec = r.get("recovery")
        ep = (f"{rec['epochs_done']:.2f} ({rec['seconds'] / 60:.0f} min)"
              if rec else "—")
        before = f"{100 * r['top1_before_recovery']:.2f}" if "top1_before_recovery" in r else "—"
        print(f"| {r['variant']} | {before} | {100 * r['top1']:.2f} | {100 * (r['top1'] - dense_top1):+.2f} | "
              f"{r['macs_reduction']:.2f}× | {ep} | {r['p50_ms']:.3f} | {r['latency_ratio']:.2f}× |")
    print(f"| DepGraph (published) | — | {DEPGRAPH['pruned_top1']:.2f} | "
          f"{DEPGRAPH['pruned_top1'] - DEPGRAPH['base_top1']:+.2f} | {DEPGRAPH['macs_reduction']:.2f}× | 100+ (GPU) "
          f"| — | — |\n")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "hardware": hw, "device": device, "wall_s": wall,
                                        "args": {k: str(v) for k, v in vars(args).items()},
                                        "onnxruntime": ort_version, "rows": rows, "depgraph": DEPGRAPH},
                                       indent=1, default=str))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
