"""NetAdapt vs uniform pruning at equal measured latency: MobileNetV2 loaded as a user loads it (issue 15).

    python bench/netadapt_vs_uniform.py [--size 96] [--target 0.6x] [--eval-n 500] [--calib-n 200]
        [--max-evals 3] [--netadapt-max-proposals 6] [--ratios 0.4,0.5,0.6,0.7] [--refine 2]
        [--reps 2] [--tol 0.03] [--quick] [--work DIR] [--out FILE.json] [--append-results]

Everything goes through the ``edgeprune`` command line (``python -m host.cli``), on the local device (the agent
as a separate process, onnxruntime, 1 thread, channel alignment 8 via a one-device fleet ``round_to: 8`` with its
own cache and lease folder):

0. **Data and weights.** Eval images: the bundled CIFAR-10 eval images (``edgeprune.data.eval_split``), the first
   ``--eval-n`` of them, upscaled with Pillow (bicubic) to ``--size`` and stored as an npz *without labels* (the
   weights are random: labels mean nothing, so accuracy is judged by top-1 agreement with the dense model and SNR).
   Calibration images: ``--calib-n`` images of the bundled CIFAR-10 *calib* split (other images than eval),
   resized the same way, also unlabelled (``--calib-data``: BatchNorm recalibration of every pruned candidate,
   netadapt's host-side scoring of its proposals). Weights: ``edgeprune.zoo:mobilenet_v2`` (torchvision's
   MobileNetV2) with ``num_classes=10``, seeded random (``torch.manual_seed(--seed)``), its BatchNorm statistics
   estimated on the calibration images (``edgeprune.finetune.recalibrate_bn``) as a trained model's would be,
   and its random classifier's 10 logits standardised on the calibration images (each row of the Linear layer
   divided by that logit's std, its bias shifted by the mean; ``--raw-head`` skips this): a random head sends
   most images to two or three classes, and agreement by chance would then be ~50 %; standardised, the dense
   top-1 spreads over all ten (chance ~10 %). Saved with ``torch.save(state_dict)`` and passed as ``--weights``.
   Without the BN estimate, the statistics of an untrained model make any pruning destroy agreement.
1. **Dense** artifact: ``edgeprune prune --ratio 0`` (the ``--reference`` of every bench below).
2. **NetAdapt**: ``edgeprune search --algo netadapt --target latency_p50_ms=<--target> --min-agreement 0.01``
   (the agreement bound is only there because a search needs an accuracy bound; NetAdapt's proposals are ranked
   by agreement on the calibration images, so it still maximises agreement). No ``--finetune-data``: recovery is
   BatchNorm recalibration only, for NetAdapt's proposals and its measured candidate alike.
3. **Uniform**: ``edgeprune prune --ratio r --align 8`` (L1, the same ratio in every group, the same protected
   layers, BatchNorm recalibration on the same calibration images, no fine-tune) for ``--ratios``, then up to
   ``--refine`` more ratios interpolated (in measured p50) towards NetAdapt's measured p50 until one is within
   ``--tol``.
4. **Measure side by side**: every artifact with ``edgeprune bench --data eval.npz --reference dense.onnx --json``
   (agreement, SNR and latency from the agent), then ``--reps`` interleaved rounds (order alternating) timing dense,
   the NetAdapt artifact and the uniform artifacts nearest to it; p50 = median over all rounds of the agent's p50.

The table compares NetAdapt's chosen artifact with the uniform artifact nearest to it in p50 and with the
uniform figures linearly interpolated (in p50, between the two uniform artifacts that bracket it) to exactly
NetAdapt's p50.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = ["--model", "edgeprune.zoo:mobilenet_v2", "--model-arg", "num_classes=10"]
LOG: List[str] = []          # every command run, as a user would type it


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def edgeprune(args: List[str], work: Path, name: str) -> Tuple[int, Any, float]:
    """Run ``edgeprune ARGS`` (``python -m host.cli``) in ``work``; its --json document, exit code, seconds."""
    cmd = [sys.executable, "-m", "host.cli", *args]
    LOG.append("edgeprune " + " ".join(shlex.quote(a) for a in args))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.time()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    dt = time.time() - t
    (work / "logs").mkdir(exist_ok=True)
    (work / "logs" / f"{name}.stderr").write_text(p.stderr)
    (work / "logs" / f"{name}.stdout").write_text(p.stdout)
    try:
        doc = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        doc = None
    if doc is None:
        raise SystemExit(f"{name}: `{LOG[-1]}` exited {p.returncode} without a JSON document:\n{p.stderr[-3000:]}")
    log(f"  {name}: exit {p.returncode}, {dt:.0f} s")
    return p.returncode, doc, dt


# ---------------------------------------------------------------------------------------------- data, weights
def make_data(work: Path, size: int, eval_n: int, calib_n: int, seed: int, standardise: bool = True
              ) -> Dict[str, Any]:
    import torch
    from PIL import Image

    from edgeprune import data, finetune, zoo

    def resized(images: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])

    ev, cal = data.eval_split(), data.calib_split()
    if eval_n > len(ev) or calib_n > len(cal):
        raise SystemExit(f"--eval-n at most {len(ev)}, --calib-n at most {len(cal)} (bundled images)")
    eval_imgs, calib_imgs = resized(ev.images[:eval_n]), resized(cal.images[:calib_n])
    np.savez(work / "eval.npz", images=eval_imgs)       # no labels: random weights, labels would mean nothing
    np.savez(work / "calib.npz", images=calib_imgs)
    np.savez(work / "timing.npz", images=eval_imgs[:8], labels=np.zeros(8, dtype=np.int64))
    torch.manual_seed(seed)
    model = zoo.mobilenet_v2(num_classes=10)
    cal_split = data.Split("calib", calib_imgs, np.full(len(calib_imgs), -1), "calib.npz")
    finetune.recalibrate_bn(model, cal_split)

    def logits(images: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.eval()(data.to_tensor_batch(images[i:i + 100], data.MEAN, data.STD, data.SCALE))
                              for i in range(0, len(images), 100)])

    def histogram() -> List[int]:
        return np.bincount(logits(eval_imgs).argmax(1).numpy(), minlength=10).tolist()

    raw = histogram()
    if standardise:   # a random head favours a few classes; standardise each logit on the calib images (exact:
        z = logits(calib_imgs)          # the Linear layer's rows rescaled and its bias shifted)
        mu, sd = z.mean(0), z.std(0)
        fc = model.classifier[-1]
        with torch.no_grad():
            fc.weight.div_(sd[:, None])
            fc.bias.sub_(mu).div_(sd)
    torch.save(model.state_dict(), work / "weights.pt")
    counts = np.array(histogram())
    return {"eval": f"the first {eval_n} images of the CIFAR-10 eval split ({ev.source}), bicubic {size}x{size}, unlabelled",
            "calib": f"the first {calib_n} images of the CIFAR-10 calib split ({cal.source}), bicubic {size}x{size}, unlabelled",
            "standardised_head": standardise, "dense_top1_histogram_raw_head": raw,
            "dense_top1_histogram": counts.tolist(), "dense_top1_max_share": float(counts.max() / counts.sum())}


# ---------------------------------------------------------------------------------------------- steps
def common(work: Path, size: int) -> List[str]:
    return [*MODEL, "--weights", str(work / "weights.pt"), "--input-size", str(size),
            "--data", str(work / "eval.npz"), "--calib-data", str(work / "calib.npz")]


def prune_uniform(work: Path, size: int, ratio: float, align: int) -> Dict[str, Any]:
    out = work / f"uniform-{ratio:.3f}"
    args = ["prune", *common(work, size), "--ratio", f"{ratio:g}", "--out", str(out), "--json"]
    if ratio > 0:
        args += ["--align", str(align)]
    _, doc, _ = edgeprune(args, work, f"prune-{ratio:.3f}")
    art = next(a for a in doc["artifacts"] if a["format"] == "onnx")
    return {"ratio": ratio, "macs": doc["macs"]["after"], "params": doc["params"]["after"],
            "macs_dense": doc["macs"]["before"], "params_dense": doc["params"]["before"],
            "onnx": str(Path(doc["out"]) / art["file"]), "plan_sha256": doc.get("plan_sha256"),
            "torch_agreement": (doc["metrics"].get("pruned") or {}).get("agreement"),
            "recovery": doc.get("recovery")}


def bench(work: Path, onnx: str, dense: str, name: str, quick: bool, with_data: bool) -> Dict[str, Any]:
    args = ["bench", "--model", onnx, "--fleet", str(work / "fleet"), "--db", str(work / "edgeprune.db"),
            "--out", str(work / "bench" / f"{name}-{time.time_ns()}"), "--json"]
    if with_data:
        args += ["--data", str(work / "eval.npz"), "--reference", dense]
    else:   # latency only: 8 images labelled 0, so bench needs no --reference; the accuracy of these rounds is not read
            # (bench without --data would ship the 32x32 CIFAR-10 split, which this 96x96 model cannot take)
        args += ["--data", str(work / "timing.npz")]
    if quick:
        args.append("--quick")
    rc, doc, _ = edgeprune(args, work, f"bench-{name}")
    row = doc["devices"][0]
    if rc != 0 or row.get("status") != "ok":
        raise SystemExit(f"bench {name}: {row.get('status')} {row.get('error')}")
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="input size (224: the ImageNet size, slower)")
    ap.add_argument("--target", default="0.6x", help="NetAdapt's latency_p50_ms target (default 0.6x dense)")
    ap.add_argument("--eval-n", type=int, default=500)
    ap.add_argument("--calib-n", type=int, default=200)
    ap.add_argument("--align", type=int, default=8)
    ap.add_argument("--max-evals", type=int, default=3, help="search: device evaluations, dense included")
    ap.add_argument("--netadapt-max-proposals", type=int, default=6)
    ap.add_argument("--ratios", default="0.4,0.5,0.6,0.7", help="uniform ratios tried first")
    ap.add_argument("--refine", type=int, default=2, help="more uniform ratios, aimed at NetAdapt's p50")
    ap.add_argument("--tol", type=float, default=0.03, help="'equal latency': within this fraction of p50")
    ap.add_argument("--reps", type=int, default=2, help="interleaved latency-only rounds at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--raw-head", action="store_true", help="keep the random classifier as initialised (its top-1 "
                    "then falls on a few classes, which inflates agreement by chance)")
    ap.add_argument("--quick", action="store_true", help="short timing windows (search and bench)")
    ap.add_argument("--work", type=Path, default=None, help="keep everything here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="write all figures as JSON here")
    ap.add_argument("--append-results", action="store_true", help="append the section to bench/RESULTS.md")
    args = ap.parse_args(argv)

    t_start = time.time()
    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="nvu-")
        work = Path(tmp.name)
    else:
        work = args.work.resolve()
        work.mkdir(parents=True, exist_ok=True)
    (work / "fleet").mkdir(exist_ok=True)
    (work / "fleet" / "local8.yaml").write_text(f"id: local8\nclass: local\nround_to: {args.align}\n"
                                                f"cache_dir: {work / 'device-cache'}\n")
    log(f"work folder {work}")
    info = make_data(work, args.size, args.eval_n, args.calib_n, args.seed, not args.raw_head)
    log(f"data + weights ready; dense top-1 spread over the 10 outputs: {info['dense_top1_histogram']}")

    # 1. dense
    dense = prune_uniform(work, args.size, 0.0, args.align)
    # 2. netadapt
    s_args = ["search", *common(work, args.size), "--fleet", str(work / "fleet"), "--algo", "netadapt",
              "--target", f"latency_p50_ms={args.target}", "--min-agreement", "0.01",
              "--max-evals", str(args.max_evals), "--netadapt-max-proposals", str(args.netadapt_max_proposals),
              "--out", str(work / "search"), "--cache-dir", str(work / "cache"), "--db", str(work / "edgeprune.db"),
              "--json"] + (["--quick"] if args.quick else [])
    rc, sdoc, search_s = edgeprune(s_args, work, "search-netadapt")
    dev = sdoc["devices"][0]
    cand = dev["candidate"]
    if not cand or not cand.get("artifact"):
        raise SystemExit(f"search: no candidate ({dev['verdict']}: {dev['reason']})")
    search_dense = None       # the search measures dense first
    for line in Path(sdoc["evaluations"]).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "device":
            search_dense = rec.get("metrics", {}).get("latency_p50_ms")
            break
    na = {"method": "netadapt", "onnx": cand["artifact"], "macs": cand.get("macs_counted") or cand["macs"],
          "params": cand["params"], "search_p50_ms": cand["metrics"]["latency_p50_ms"],
          "search_agreement": cand["metrics"]["agreement"], "search_snr_db": cand["metrics"]["snr_db"],
          "verdict": dev["verdict"], "reason": dev["reason"], "device_evals": dev["device_evals"],
          "host_evals": dev["host_evals"], "search_dense_p50_ms": search_dense, "search_s": search_s}
    log(f"netadapt: {dev['verdict']} ({dev['reason']}); p50 {na['search_p50_ms']} ms, agreement "
        f"{na['search_agreement']}")

    # 3. uniform sweep, benched with data (agreement, SNR, p50); dense and netadapt the same way
    rows: Dict[str, Dict[str, Any]] = {}
    rows["dense"] = {"method": "dense", **dense, **{"bench": [bench(work, dense["onnx"], dense["onnx"], "dense",
                                                                     args.quick, True)]}}
    rows["netadapt"] = {**na, "bench": [bench(work, na["onnx"], dense["onnx"], "netadapt", args.quick, True)]}
    uniform: List[Dict[str, Any]] = []
    seen_plans = set()

    def add_uniform(r: float) -> Optional[Dict[str, Any]]:
        u = prune_uniform(work, args.size, r, args.align)
        if u["plan_sha256"] in seen_plans:   # alignment: a neighbouring ratio gave the same widths
            log(f"  uniform {r:.3f}: same plan as an earlier ratio, skipped")
            return None
        seen_plans.add(u["plan_sha256"])
        u["method"] = f"uniform {r:.3f}"
        u["bench"] = [bench(work, u["onnx"], dense["onnx"], f"uniform-{r:.3f}", args.quick, True)]
        uniform.append(u)
        log(f"  uniform {r:.3f}: {u['macs'] / 1e6:.1f} MMACs, p50 {u['bench'][0]['latency_p50_ms']:.3f} ms, "
            f"agreement {u['bench'][0].get('agreement')}")
        return u

    for r in [float(x) for x in args.ratios.split(",") if x.strip()]:
        add_uniform(r)
    na_p50 = rows["netadapt"]["bench"][0]["latency_p50_ms"]
    for _ in range(args.refine):
        pts = sorted((u["bench"][0]["latency_p50_ms"], u["ratio"]) for u in uniform)
        if any(abs(p - na_p50) <= args.tol * na_p50 for p, _ in pts):
            break
        lo = [(p, r) for p, r in pts if p < na_p50]      # faster than netadapt: larger ratios
        hi = [(p, r) for p, r in pts if p > na_p50]
        if lo and hi:
            (p0, r0), (p1, r1) = max(lo), min(hi)
            r = r1 + (na_p50 - p1) * (r0 - r1) / (p0 - p1)
        elif hi:      # every uniform one slower: prune more
            r = min(0.9, max(r for _, r in pts) + 0.1)
        else:
            r = max(0.05, min(r for _, r in pts) - 0.1)
        r = round(r, 3)
        if any(abs(r - u["ratio"]) < 1e-3 for u in uniform):
            break
        add_uniform(r)

    # 4. interleaved latency-only rounds: dense, netadapt and the uniform artifacts nearest netadapt's p50
    near = sorted(uniform, key=lambda u: abs(u["bench"][0]["latency_p50_ms"] - na_p50))[:3]
    timed = [rows["dense"], rows["netadapt"], *near]
    for rep in range(args.reps):
        order = timed if rep % 2 == 0 else list(reversed(timed))
        for x in order:
            x["bench"].append(bench(work, x["onnx"], dense["onnx"], x["method"].replace(" ", "-") + f"-t{rep}",
                                    args.quick, False))
        log(f"latency round {rep + 1}/{args.reps} done")
    for x in [rows["dense"], rows["netadapt"], *uniform]:
        p50s = [b["latency_p50_ms"] for b in x["bench"]]
        x["p50_ms"], x["p50_min"], x["p50_max"], x["p50_n"] = statistics.median(p50s), min(p50s), max(p50s), len(p50s)
        x["agreement"] = x["bench"][0].get("agreement")
        x["snr_db"] = x["bench"][0].get("snr_db")
        x["eval_n"] = x["bench"][0].get("eval_n")

    # equal latency: nearest uniform, and uniform interpolated to netadapt's p50 (only between re-timed artifacts)
    na_row = rows["netadapt"]
    p = na_row["p50_ms"]
    closest = min([u for u in uniform if u["p50_n"] > 1] or uniform, key=lambda u: abs(u["p50_ms"] - p))
    retimed = sorted((u for u in uniform if u["p50_n"] > 1), key=lambda u: u["p50_ms"])
    interp = None
    below = [u for u in retimed if u["p50_ms"] <= p]
    above = [u for u in retimed if u["p50_ms"] > p]
    if below and above:
        a, b = below[-1], above[0]
        w = (p - a["p50_ms"]) / (b["p50_ms"] - a["p50_ms"])
        lerp = lambda k: a[k] + w * (b[k] - a[k])  # noqa: E731
        interp = {"method": f"uniform, interpolated ({a['ratio']:.3f}–{b['ratio']:.3f})",
                  "ratio": lerp("ratio"), "macs": lerp("macs"), "params": lerp("params"), "p50_ms": p,
                  "agreement": lerp("agreement"), "snr_db": lerp("snr_db"), "interpolated": True}
    wall = time.time() - t_start

    # ------------------------------------------------------------------------------------------ report
    import onnxruntime
    import torch

    d = rows["dense"]
    dense_macs, dense_params = d["macs_dense"], d["params_dense"]
    settings = (f"MobileNetV2 (`edgeprune.zoo:mobilenet_v2`, num_classes=10) at {args.size}x{args.size}, seeded "
                f"random weights (seed {args.seed}) with BatchNorm statistics estimated on the calibration images"
                f"{' and the classifier logits standardised on them' if info['standardised_head'] else ''}; "
                f"eval: {info['eval']}; calibration: {info['calib']}; local device, onnxruntime "
                f"{onnxruntime.__version__}, 1 thread, align {args.align}; netadapt target latency_p50_ms="
                f"{args.target}, --min-agreement 0.01, --max-evals {args.max_evals}, --netadapt-max-proposals "
                f"{args.netadapt_max_proposals}{', --quick' if args.quick else ''}; recovery for every pruned model: "
                f"BatchNorm recalibration on the calibration images only (no --finetune-data, no fine-tune); "
                f"{'quick' if args.quick else 'default'} timing windows; p50 = median over {args.reps + 1} "
                f"agent runs (1 with data + {args.reps} interleaved latency-only rounds); torch "
                f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; whole run {wall / 60:.1f} min "
                f"(search {search_s / 60:.1f} min)")

    def line(x: Dict[str, Any], bold: bool = False) -> str:
        b = "**" if bold else ""
        spread = (f" ({x['p50_min']:.3f}–{x['p50_max']:.3f})" if x.get("p50_n", 1) > 1 else "")
        agree = f"{b}{100 * x['agreement']:.1f} %{b}" if x.get("agreement") is not None else "—"
        snr = f"{x['snr_db']:.1f}" if x.get("snr_db") is not None else "—"
        rel = x["p50_ms"] / d["p50_ms"]
        return (f"| {x['method']} | {x['macs'] / 1e6:.1f} ({dense_macs / x['macs']:.2f}× fewer) | "
                f"{int(round(x['params'])):,} | {x['p50_ms']:.3f}{spread} ({rel:.2f}×) | {agree} | {snr} |")

    table = ["| method | MMACs | params | on-device p50 ms (× dense) | agreement with dense | SNR dB |",
             "|---|---:|---:|---:|---:|---:|", line(d), line(na_row, True), line(closest)]
    if interp is not None:
        table.append(line(interp))
    table.append("")
    table.append("All uniform points (first with-data run; re-timed ones: median over rounds):")
    table.append("")
    table.append("| uniform ratio | MMACs | params | p50 ms | agreement | SNR dB |")
    table.append("|---:|---:|---:|---:|---:|---:|")
    for u in sorted(uniform, key=lambda u: u["ratio"]):
        table.append(f"| {u['ratio']:.3f} | {u['macs'] / 1e6:.1f} | {u['params']:,} | {u['p50_ms']:.3f}"
                     f"{' (n=' + str(u['p50_n']) + ')' if u['p50_n'] > 1 else ''} | {100 * u['agreement']:.1f} % | "
                     f"{u['snr_db']:.1f} |")
    extra = [f"NetAdapt search: verdict {na['verdict']} ({na['reason']}); {na['device_evals']} device evaluations, "
             f"{na['host_evals']} host evaluations; the search's own measurement of its candidate: p50 "
             f"{na['search_p50_ms']:.3f} ms (dense {na['search_dense_p50_ms'] or float('nan'):.3f} ms in the search), "
             f"agreement {100 * na['search_agreement']:.1f} %.",
             f"Dense top-1 over the 10 outputs on the eval images: {info['dense_top1_histogram']} (largest share "
             f"{100 * info['dense_top1_max_share']:.0f} %: agreement by chance is about the sum of squared shares, "
             f"{100 * sum((c / sum(info['dense_top1_histogram'])) ** 2 for c in info['dense_top1_histogram']):.0f} %)."]
    cmd = "python bench/netadapt_vs_uniform.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(f"\n{settings}\n")
    print("\n".join(table))
    print()
    print("\n".join(extra))
    print("\nCommands run:\n" + "\n".join(LOG))
    doc = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "command": cmd,
           "settings": settings, "info": info, "rows": rows, "uniform": uniform, "closest": closest["method"],
           "interpolated": interp, "commands": LOG, "wall_s": wall, "table": table, "extra": extra}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1, default=str))
    if args.append_results:
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = [
            "", "## NetAdapt vs uniform at equal latency (MobileNetV2, issue 15) — `bench/netadapt_vs_uniform.py`",
            "", f"### Run ({date})", "", "```", cmd + f"   # {wall / 60:.1f} min", "```", "", settings + ".", "",
            *table, "", *extra, "", "Commands the script ran (paths under its work folder):", "", "```",
            *LOG[:3], "...", "```", ""]
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n".join(section))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
