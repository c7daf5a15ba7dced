"""Recovery throughput on this CPU: the product's recovery against the same distillation written plainly.

    python bench/recovery.py [--model resnet56] [--ratio 0.5] [--batch-size 128] [--steps 12] [--rounds 3]
                             [--budgets 10,20,40] [--out FILE.json]

Part 1, throughput (images/s), side by side in one run on the same pruned model (``--ratio`` L1 channel pruning,
channels aligned to 8), the same batch size, the same data and the same seed. Every variant trains for ``--steps``
steps (the first two are warm-up and not timed); the variants are interleaved over ``--rounds`` rounds and the
median is reported:

* ``plain``: the distillation as one writes it first, in this file: fp32 eager PyTorch, NCHW, the split's float
  batch augmented in float, a teacher forward (``torch.no_grad``) every step, SGD.
* ``fp32``: the product's loop (:func:`edgeprune.finetune.finetune`) with every speed-up off (its uint8 data
  pipeline is the only difference from ``plain``).
* ``bf16``: bf16 autocast (student and teacher forward; fp32 weights and optimizer); the teacher's inference
  runs channels-last on a CPU in every product variant.
* ``bf16 channels_last``: and the student trained channels-last.
* ``bf16 compile``: bf16 and :func:`torch.compile` on the student. The compile time is reported apart: it is
  paid once per model shape, measured with an empty inductor cache (a fresh ``TORCHINDUCTOR_CACHE_DIR``).
* ``bf16 compile cached-teacher``: and the teacher's logits served from a
  :class:`~edgeprune.teacher_cache.TeacherCache` that an earlier recovery with the same seed filled: what a
  search's second and later candidates get (the first one runs ``bf16 compile``).

Part 2, accuracy after a fixed wall-time budget (``--budgets`` minutes, each from the same pruned model, with a
cold teacher cache): :func:`edgeprune.recovery.recover` with the product's defaults (BN recalibration, distillation
0.5 from the dense model), its epochs sized so the cosine schedule ends at the budget at the throughput part 1
measured (``--budget-epochs`` overrides), top-1 on the full 10,000-image CIFAR-10 test set (fp32). ``--budgets ''``
skips it. Needs the full CIFAR-10 files (EDGEPRUNE_DATA or ../shared/data).
"""
from __future__ import annotations

import os
import tempfile

if __name__ == "__main__":   # compile time measured from scratch: an inductor cache of this run's own
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench-recovery-inductor-")

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch


from edgeprune import cpu, data, finetune, models, prune, recovery
from edgeprune.augment import augment
from edgeprune.teacher_cache import TeacherCache

WARMUP = 2
PRODUCT = {   # variant -> finetune() keywords ("cache": the warm TeacherCache)
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    "bf16 channels_last": dict(precision="bf16", channels_last=True),
    "bf16 compile": dict(precision="bf16", compile=True),
    "bf16 compile cached-teacher": dict(precision="bf16", compile=True, cache=True),
}


def plain_distillation(student, teacher, split, steps: int, batch_size: int, seed: int,
                       on_step: Callable[[int], None]) -> None:
    """The reference: fp32, NCHW, float augmentation, a teacher forward every step (written plainly)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(split))
    labels = torch.from_numpy(split.labels)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    student.train()
    teacher.eval()
    for step in range(steps):
        idx = order[(step * batch_size) % len(split):][:batch_size]
        x = augment(split.batch(idx), gen)
        y = labels[idx]
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = finetune.distillation_loss(s, t, y, alpha=0.5, temperature=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        on_step(step + 1)


def timed(run: Callable[[Callable[[int], None]], None], batch_size: int) -> float:
    """images/s over the steps after the warm-up, from per-step timestamps."""
    stamps: Dict[int, float] = {}
    run(lambda step: stamps.__setitem__(step, time.perf_counter()))
    last = max(stamps)
    return (last - WARMUP) * batch_size / (stamps[last] - stamps[WARMUP])


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="steps per timed run (the first 2 are warm-up)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(["plain"] + list(PRODUCT)))
    ap.add_argument("--budgets", default="10,20,40", help="minutes, comma-separated ('' skips part 2)")
    ap.add_argument("--budget-epochs", default=None, help="epochs per budget, comma-separated (default: sized)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if data.data_dir() is None:
        ap.error("needs the full CIFAR-10 files: set EDGEPRUNE_DATA (or put ../shared/data beside the repo)")
    if args.steps <= WARMUP + 1:
        ap.error(f"--steps: at least {WARMUP + 2}")
    bs = args.batch_size
    base, _ = models.pretrained(args.model)
    base.eval()
    pruned = copy.deepcopy(base)
    prune.prune(pruned, args.ratio, torch.zeros(1, 3, 32, 32), round_to=8)
    macs0, _ = prune.count(base, torch.zeros(1, 3, 32, 32))
    macs1, _ = prune.count(pruned, torch.zeros(1, 3, 32, 32))
    train = data.finetune_split(None)
    bf16_ok, bf16_why = cpu.bf16_support()
    threads = cpu.usable_cores()
    torch.set_num_threads(threads)
    hw = f"{platform.processor() or platform.machine()}, {threads} cores; bf16: {bf16_ok} ({bf16_why})"
    print(f"{args.model} {args.ratio:.0%} pruned: {macs1 / 1e6:.1f} of {macs0 / 1e6:.1f} MMACs; batch {bs}; "
          f"{hw}; torch {torch.__version__}", file=sys.stderr, flush=True)

    warm_cache = TeacherCache()
    product = {v: {k: (warm_cache if k == "cache" else x) for k, x in kw.items()} for v, kw in PRODUCT.items()}
    for kw in product.values():
        if "cache" in kw:
            kw["teacher_cache"] = kw.pop("cache")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v != "plain" and v not in product:
            ap.error(f"--variants: unknown {v!r} (plain, {', '.join(product)})")
        if v.startswith("bf16") and not bf16_ok:
            ap.error(f"--variants: {v} needs bf16, which this CPU lacks ({bf16_why})")

    def run_product(kw: Dict[str, Any]) -> Callable[[Callable[[int], None]], None]:
        def run(on_step: Callable[[int], None]) -> None:
            finetune.finetune(copy.deepcopy(pruned), train, epochs=1, max_steps=args.steps, batch_size=bs,
                              seed=args.seed, device="cpu", teacher=base, distill_alpha=0.5, threads=threads,
                              progress=lambda step, _planned: on_step(step), **kw)
        return run

    compile_s = None
    if any("compile" in v for v in variants):   # compile once (every later run of this shape reuses it)
        t0 = time.perf_counter()
        run_product(product["bf16 compile"])(lambda step: None)
        compile_s = time.perf_counter() - t0
        print(f"compile (first run of {args.steps} steps, empty inductor cache): {compile_s:.1f} s",
              file=sys.stderr, flush=True)
    if "bf16 compile cached-teacher" in variants:   # fill the cache: the first candidate's run
        t0 = time.perf_counter()
        run_product(product["bf16 compile cached-teacher"])(lambda step: None)
        print(f"cache filled in {time.perf_counter() - t0:.1f} s: {warm_cache.stats()}", file=sys.stderr)

    ips: Dict[str, List[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            if v == "plain":
                def run(on_step: Callable[[int], None]) -> None:
                    plain_distillation(copy.deepcopy(pruned), base, train, args.steps, bs, args.seed, on_step)
            else:
                run = run_product(product[v])
            ips[v].append(timed(run, bs))
            print(f"round {r + 1} {v:28s} {ips[v][-1]:7.1f} images/s", file=sys.stderr, flush=True)
    med = {v: statistics.median(x) for v, x in ips.items()}
    ref = med.get("plain")
    print(f"\n| variant | images/s (median of {args.rounds}) | × plain |\n| --- | --- | --- |")
    for v in variants:
        print(f"| {v} | {med[v]:.1f} | {med[v] / ref:.2f}× |" if ref else f"| {v} | {med[v]:.1f} | |")

    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    fixed = [int(e) for e in args.budget_epochs.split(",")] if args.budget_epochs else None
    rows = []
    if budgets:
        test = data.eval_split(None)
        calib = data.calib_split()
        fast = med.get("bf16 compile") or max(med.values(), default=200.0)
        for i, minutes in enumerate(budgets):
            epochs = fixed[i] if fixed else max(1, math.floor(minutes * 60 * fast * 0.85 / len(train)))
            model = copy.deepcopy(pruned)
            plan = recovery.RecoveryPlan(epochs=epochs, max_seconds=minutes * 60, distill=0.5, seed=args.seed,
                                         batch_size=bs)
            res = recovery.recover(model, plan, calib=calib, train=train, teacher=base, teacher_cache=TeacherCache())
            top1 = finetune.evaluate(model, test)
            ft = res.finetune
            assert ft is not None
            rows.append({"budget_min": minutes, "epochs": epochs, "seconds": res.seconds, "steps": ft.steps_done,
                         "steps_planned": ft.steps_planned, "images_seen": ft.images_seen,
                         "stopped_by_time": ft.stopped_by_time, "precision": res.precision, "top1": top1})
            print(f"budget {minutes:g} min: {epochs} epochs planned, {ft.steps_done}/{ft.steps_planned} steps, "
                  f"{ft.images_seen} images in {res.seconds / 60:.1f} min ({res.precision}): top-1 {top1:.2%}",
                  file=sys.stderr, flush=True)
        dense = finetune.evaluate(base, test)
        print(f"\ndense top-1 {dense:.2%}\n\n| budget | epochs | images seen | wall | top-1 | Δ vs dense |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for row in rows:
            print(f"| {row['budget_min']:g} min | {row['steps']}/{row['steps_planned']} steps of {row['epochs']} "
                  f"| {row['images_seen']} | {row['seconds'] / 60:.1f} min | {row['top1']:.2%} | "
                  f"{(row['top1'] - dense) * 100:+.2f} pp |")
    if args.out:
        args.out.write_text(json.dumps({"hardware": hw, "macs": [macs0, macs1], "images_per_s": ips,
                                        "median": med, "compile_s": compile_s, "budgets": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
