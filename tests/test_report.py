"""host.results.report: the self-contained HTML report of one run in the results store.

The runs are recorded through the real store API with schema-valid agent reports (built from agent.schema's
dataclasses, so they are what an agent writes), then rendered; the report is checked as text (sections, escaping,
no script or external URL, every image a valid embedded PNG) and in headless Chromium (it renders, every image
decodes). Chromium is installed by .ci/run; where it is absent here the browser test says so and skips.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from agent import schema
from edgeprune.errors import UsageError
from host.cli import results as results_cli
from host.results import report
from host.results.store import Store

EVIL = "<b>&x"          # a device id that must come out escaped


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def agent_report(job_id: str, device_id: str, *, p50: Optional[float], top1: Optional[float] = None,
                 power_w: Optional[float] = None, modelled: bool = True, warnings: List[str] = (),
                 error: Optional[str] = None, throttled: bool = False, seed: int = 0, n: int = 240,
                 hostname: str = "edge-1", runtime: str = "onnxruntime", runtime_version: str = "1.22.0",
                 firmware: Optional[Dict[str, str]] = None, sha: str = "0" * 64) -> Dict[str, Any]:
    """A schema-valid agent report (as the agent writes it: ``schema.dumps`` form)."""
    ident = schema.Identity(device_id=device_id, hostname=hostname, os="Ubuntu 22.04.4 LTS",
                            kernel="5.15.136-tegra", machine="aarch64", cpu_model="ARMv8 Processor rev 1 (v8l)",
                            cpu_count=6, python="3.10.12", agent_version="0.1.0", runtime=runtime,
                            runtime_version=runtime_version, artifact_sha256=sha, firmware=dict(firmware or {}))
    rep = schema.Report(job_id=job_id, status="ok" if error is None else "error", identity=ident,
                        warnings=list(warnings), started_at="2025-03-01T10:00:00Z",
                        finished_at="2025-03-01T10:00:09Z")
    if error is not None:
        rep.error = schema.ErrorInfo(type="RuntimeError", message=error)
        return json.loads(schema.dumps(rep))
    if p50 is not None:
        rng = np.random.default_rng(seed)
        samples = (p50 * rng.lognormal(0.0, 0.06, n)).tolist()
        a = np.asarray(samples)
        q50, q90, q99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
        stats = schema.LatencyStats(mean=float(a.mean()), median=q50, p90=q90, p99=q99, min=float(a.min()),
                                    max=float(a.max()), std=float(a.std(ddof=1)),
                                    cv=float(a.std(ddof=1) / a.mean()))
        protocol = dict(dataclasses.asdict(schema.TimingSpec(min_duration_s=3.0, min_iters=200)), threads=1,
                        runtime=runtime, clock="time.perf_counter_ns", cpu_affinity_applied=[0], cpu_allowed=[0, 1],
                        stop_reason="min_iters and min_duration_s reached", samples_kept=n, samples_subsampled=False)
        dur = float(a.sum()) / 1000.0
        rep.timing = schema.TimingResult(protocol=protocol, load_time_ms=41.5, first_inference_ms=3.2 * p50,
                                         warmup_iters_done=10, iterations=n, duration_s=dur, batch_size=1,
                                         latency_ms=stats, throughput_ips=n / dur, samples_ms=samples)
        rep.peak_rss_mb = 182.4
        rep.thermal = schema.ThermalResult(source="thermal_zone0", start_c=48.0, end_c=61.5, max_c=63.0,
                                           throttled=throttled)
        if power_w is not None:
            rep.power = schema.PowerResult(source="model" if modelled else "tegrastats:VDD_IN", modelled=modelled,
                                           sample_hz=20.0, samples=60, mean_w=power_w,
                                           energy_mj_per_inference=power_w * q50)
    if top1 is not None:
        rep.accuracy = schema.AccuracyResult(split="eval", n=1000, top1=top1, top5=min(1.0, top1 + 0.07),
                                             eval_sha256=_sha("eval"))
    return json.loads(schema.dumps(rep.validate()))


def manifest(tag: str, ratio: float) -> Dict[str, Any]:
    sha = _sha(tag)
    return {"file": f"{tag}.onnx", "sha256": sha, "format": "onnx", "precision": "fp32", "export_format": "onnx",
            "input_name": "input", "input_shape": [1, 3, 32, 32], "input_dtype": "float32", "layout": "NCHW",
            "output_name": "logits", "dynamic_batch": True, "model": "resnet20",
            "source_checkpoint_sha256": _sha("ckpt"), "pruning_plan_sha256": _sha(f"plan{ratio}"),
            "verification": {"n": 8, "max_abs_err": 2.1e-6, "cosine": 0.9999999, "top1_agreement": 1.0,
                             "passed": True, "checked_with": "onnxruntime"},
            "files": {f"{tag}.onnx": sha}, "warnings": [] if ratio < 0.7 else ["odd channel widths: 11/23/45"]}


def job(m: Dict[str, Any]) -> Dict[str, Any]:
    return {"artifact": {"sha256": m["sha256"], "format": m["format"]}, "runtime": {"name": "onnxruntime",
                                                                                   "threads": 1}}


def record_candidate(st: Store, run: str, dev: str, key: str, r: float, p50: float, top1: float, *, meets: bool,
                     report: Dict[str, Any], manifest: Dict[str, Any]) -> None:
    """What ``edgeprune search`` records per evaluated candidate: the measurement, then the evaluation."""
    label = "dense" if r == 0 else f"ratio {r:.3f} (ft recovery)"
    mid = st.record_measurement(run, f"{dev}/{key}", device_id=dev, label=label, model="resnet20", report=report,
                                manifest=manifest, job=job(manifest), extra={"ratio": r, "candidate_key": key})
    st.record_evaluation(run, dev, key, {"key": key, "device": dev, "candidate": {"ratio": r, "recovery": "ft"},
                                         "metrics": {"latency_p50_ms": p50, "top1": top1}},
                         algo="bisect", ratio=r, recovery="ft", ok=True, meets=meets,
                         artifact_sha256=manifest["sha256"], measurement_id=mid)


PROV = {"edgeprune_version": "0.1.0", "git": {"sha": "6f652f4" + "a" * 33, "dirty": True},
        "host": {"hostname": "ws-1", "platform": "Linux-6.1-x86_64", "python": "3.11.2"},
        "packages": {"torch": "2.13.0", "onnxruntime": "1.22.0", "numpy": "2.2.0"},
        "argv": ["edgeprune", "search", "--db", "postgresql://lab:s3cret@db.lab/results"], "seeds": {"finetune": 0}}

CV_WARNING = ("latency CV 0.26 exceeds 0.10: measurements unstable (background load, frequency scaling or "
              "throttling?); pin CPUs, lengthen min_duration_s or add a cooldown")
DRIFT_WARNING = ("latency drifted +37% between the first and last third of the timed window (median 1.175 -> "
                 "1.611 ms): thermal throttling or changing background load?")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store(str(tmp_path_factory.mktemp("report") / "r.db"))
    # demo: one device with modelled power, four ratios, one failed; a second device with an id to escape
    st.start_run("demo-1", "demo", command={"ratios": [0, 0.3, 0.5, 0.7]}, provenance=PROV)
    st.add_device("demo-1", "local", device_class="local", config={"runtime": "onnxruntime"})
    for i, (r, p50, top1) in enumerate([(0.0, 1.40, 0.923), (0.3, 1.21, 0.841), (0.5, 0.72, 0.698),
                                        (0.7, 0.76, 0.425)]):
        m = manifest(f"r{r}", r)
        ws = [CV_WARNING, DRIFT_WARNING] if r == 0.3 else []
        st.record_measurement("demo-1", f"local-r{r}", device_id="local", label=f"ratio {r}", model="resnet20",
                              manifest=m, job=job(m), extra={"ratio": r},
                              report=agent_report(f"demo-r{r}", "local", p50=p50, top1=top1, power_w=10.0,
                                                  warnings=ws, seed=i, hostname="vm-1", sha=m["sha256"]))
    st.record_measurement("demo-1", "local-r0.9", device_id="local", label="ratio 0.9", extra={"ratio": 0.9},
                          report=agent_report("demo-r0.9", "local", p50=None, hostname="vm-1",
                                              error="onnxruntime: [ONNXRuntimeError] INVALID_GRAPH <node 7>"))
    m = manifest("r0.0", 0.0)
    st.record_measurement("demo-1", "evil-r0", device_id=EVIL, label="ratio 0 <i>", extra={"ratio": 0.0},
                          manifest=m, job=job(m),
                          report=agent_report("demo-evil", EVIL, p50=2.9, top1=0.923, seed=9, hostname="pi<5>"))
    st.finish_run("demo-1", "complete")

    # search: two devices with a real power sensor (energy); the search's summary names jetson's chosen candidate
    # and, rpi5 meeting no target, its closest one
    st.start_run("search-1", "search", command={"targets": "latency_p50_ms<=0.7x"}, provenance=PROV)
    pts = {"jetson-orin": [(0.0, 2.10, 0.923, 7.1), (0.25, 1.62, 0.897, 6.8), (0.4, 1.31, 0.874, 6.5),
                           (0.55, 1.05, 0.812, 6.2), (0.7, 1.01, 0.66, 6.1)],
           "rpi5": [(0.0, 6.3, 0.921, 5.9), (0.3, 4.9, 0.874, 5.7), (0.5, 4.5, 0.79, 5.6), (0.6, 4.6, 0.71, 5.6)]}
    keys = {}
    for dev, rows in pts.items():
        for seq, (r, p50, top1, w) in enumerate(rows, 1):
            key = keys[dev, seq] = _sha(f"{dev}{r}")[:16]
            record_candidate(st, "search-1", dev, key, r, p50, top1, meets=dev == "jetson-orin" and seq > 2,
                             report=agent_report(f"{dev}-{seq}", dev, p50=p50, top1=top1, power_w=w, modelled=False,
                                                 seed=seq, hostname=dev, throttled=(dev == "rpi5" and seq == 4),
                                                 runtime="tensorrt" if dev == "jetson-orin" else "onnxruntime",
                                                 firmware={"l4t": "36.3.0", "jetpack": "6.0"}
                                                 if dev == "jetson-orin" else {}, sha=_sha(f"{dev}-r{r}")),
                             manifest=manifest(f"{dev}-r{r}", r))
    # an evaluation the store holds without its measurement (failed on the device)
    st.record_evaluation("search-1", "rpi5", "k-lost", {"key": "k-lost", "candidate": {"ratio": 0.8},
                                                        "error": "device lost"}, ratio=0.8, ok=False)
    st.finish_run("search-1", "complete", summary={"algo": "bisect", "devices": [
        {"device_id": "jetson-orin", "verdict": "met", "closest": None,
         "chosen": {"key": keys["jetson-orin", 3], "ratio": 0.4, "artifact_sha256": _sha("jetson-orin-r0.4")}},
        {"device_id": "rpi5", "verdict": "infeasible", "chosen": None,
         "closest": {"key": keys["rpi5", 3], "ratio": 0.5}}]})

    # a search without a summary (still running): the chosen candidate by the search's own rule
    st.start_run("search-2", "search", command={}, provenance=PROV)
    for seq, (r, p50, top1, meets) in enumerate([(0.0, 2.0, 0.92, False), (0.3, 1.3, 0.88, True),
                                                 (0.5, 1.0, 0.80, True)], 1):
        record_candidate(st, "search-2", "nano", f"key{seq}", r, p50, top1, meets=meets,
                         report=agent_report(f"n{seq}", "nano", p50=p50, top1=top1, seed=seq),
                         manifest=manifest(f"nano-{r}", r))

    st.start_run("empty-1", "bench", command={}, provenance={})
    st.finish_run("empty-1", "failed", error="no device answered")

    # latency only: no accuracy, no power
    st.start_run("bare-1", "bench", command={}, provenance=PROV)
    st.record_measurement("bare-1", "a", device_id="local", label="dense",
                          report=agent_report("bare", "local", p50=1.3, seed=3))
    st.finish_run("bare-1", "complete")
    yield st
    st.close()


@pytest.fixture(scope="module")
def rendered(store):
    return {r: report.render(store, r) for r in ("demo-1", "search-1", "search-2", "empty-1", "bare-1")}


IMG_RE = re.compile(r"<img\b[^>]*>")
SECTIONS = ("run", "tradeoff", "summary", "latency", "power", "accuracy", "warnings", "provenance")


def _images(text: str) -> List[bytes]:
    out = []
    for tag in IMG_RE.findall(text):
        m = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', tag)
        assert m, f"an <img> without an embedded PNG: {tag[:120]}"
        out.append(base64.b64decode(m.group(1), validate=True))
    return out


def test_self_contained_with_every_section(rendered):
    for run_id, text in rendered.items():
        assert text.startswith("<!DOCTYPE html>")
        for s in SECTIONS:
            assert f'<section id="{s}">' in text, (run_id, s)
        low = text.lower()
        assert "http://" not in low and "https://" not in low, run_id
        assert "<script" not in low and "<link" not in low and "javascript:" not in low, run_id
        assert text.isascii()
        for png in _images(text):
            img = Image.open(io.BytesIO(png))
            assert img.format == "PNG"
            img.load()                      # decodes the whole image
            assert img.width > 200 and img.height > 100
    # trade-off, latency, power & energy, accuracy
    assert len(_images(rendered["demo-1"])) == 4
    assert len(_images(rendered["search-1"])) == 4
    assert "postgresql://lab:***@db.lab/results" in rendered["search-1"]   # a password in argv is not shown
    assert "s3cret" not in rendered["search-1"]


def test_summary_and_provenance_content(rendered):
    text = rendered["demo-1"]
    assert "run <code>demo-1</code>" in text and ">demo<" in text and "b-complete" in text
    for head in ("p50 ms", "p90 ms", "p99 ms", "CV", "throughput /s", "top-1", "power W", "energy mJ/inf",
                 "memory MB"):
        assert f">{head}</th>" in text, head
    assert "92.30%" in text and "69.80%" in text
    assert "10.00<span class=\"mod\" title=\"modelled\">*</span>" in text
    assert "modelled, not measured" in text
    # provenance: host, device identity, artifact, protocol
    assert "6f652f4" in text and "dirty" in text and "torch 2.13.0" in text and "finetune=0" in text
    assert "5.15.136-tegra" in text and "Ubuntu 22.04.4 LTS" in text and "onnxruntime 1.22.0" in text
    assert _sha("r0.5") in text and "passed: max |err|" in text
    assert "min_duration_s" in text and "cpu_affinity_applied" in text and "perf_counter_ns" in text
    search = rendered["search-1"]
    assert "jetpack 6.0, l4t 36.3.0" in search and "tensorrt 1.22.0" in search


def test_escaping(rendered):
    text = rendered["demo-1"]
    assert EVIL not in text and "ratio 0 <i>" not in text and "pi<5>" not in text
    assert "&lt;b&gt;&amp;x" in text and "ratio 0 &lt;i&gt;" in text and "pi&lt;5&gt;" in text


def test_warnings_failures_and_modelled_power(rendered):
    text = rendered["demo-1"]
    warn = text[text.index('<section id="warnings">'):text.index('<section id="provenance">')]
    assert "measurement failed: RuntimeError: onnxruntime: [ONNXRuntimeError] INVALID_GRAPH &lt;node 7&gt;" in warn
    assert "latency CV 0.26 exceeds 0.10" in warn and "latency drifted +37%" in warn
    assert "k-unstable" in warn and "k-drift" in warn and "k-failed" in warn
    assert warn.count("power is modelled") == 4                # every measurement with modelled power
    assert "odd channel widths" in warn                          # the artifact's own caveat
    assert 'class="failed"' in text                              # the failed row in the summary
    search = rendered["search-1"]
    assert "the agent saw thermal throttling" in search and "device lost" in search
    assert "power is modelled" not in search


def test_search_chosen_closest_and_energy_panel(rendered):
    text = rendered["search-1"]
    assert 'alt="latency p50 vs top-1 per device, and energy per inference vs top-1"' in text
    # jetson: the chosen candidate, named by key in the run's summary; rpi5 met nothing: its closest candidate
    assert [c.strip() for c in re.findall(r'<tr class="chosen"><td>([^<]*)', text)] == ["ratio 0.400 (ft recovery)"]
    assert 'ratio 0.500 (ft recovery) <span class="badge b-infeasible">closest</span>' in text
    assert "from the run&#x27;s summary" in text and "A hollow star" in text
    assert 'badge b-met">met<' in text and 'badge b-infeasible">infeasible<' in text
    # no summary: the search's rule (meets every target, then the highest top-1)
    other = rendered["search-2"]
    assert [c.strip() for c in re.findall(r'<tr class="chosen"><td>([^<]*)', other)] == ["ratio 0.300 (ft recovery)"]
    assert "meets every target, then highest top-1" in other


def test_no_data_runs(rendered):
    empty = rendered["empty-1"]
    assert _images(empty) == []
    assert empty.count('class="nodata"') >= 5 and "this run recorded no measurements" in empty
    assert "b-failed" in empty and "no device answered" in empty
    bare = rendered["bare-1"]
    assert len(_images(bare)) == 1                                # the latency distribution only
    assert "no data: no accuracy was measured" in bare and "no data: no power was reported" in bare
    assert "lack latency or accuracy" not in bare or "no successful measurement has both" in bare


def test_cli_writes_the_report(store, tmp_path):
    p = argparse.ArgumentParser()
    results_cli.register(p.add_subparsers(dest="command"))
    db = str(store.url.database)
    out = tmp_path / "sub" / "rep.html"
    args = p.parse_args(["report", "demo-1", "-o", str(out), "--db", db])
    assert args.handler is results_cli.main_report
    buf = io.StringIO()
    assert args.handler(args, Console(file=buf, width=200)) == 0
    assert str(out) in buf.getvalue()
    assert out.read_text() == report.render(store, "demo-1")
    assert p.parse_args(["report", "x"]).output is None
    assert report.default_output("a/b c") == Path("results/reports/a_b_c.html")
    with pytest.raises(UsageError, match=r"^RUN: no run 'nope'"):
        args.handler(p.parse_args(["report", "nope", "-o", str(out), "--db", db]), Console(file=io.StringIO()))
    with pytest.raises(UsageError, match=r"^--db: .*no results database"):
        args.handler(p.parse_args(["report", "x", "--db", str(tmp_path / "none.db")]), Console(file=io.StringIO()))


def _chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHECK_SCRIPT = ("<script>window.addEventListener('load',function(){var n=0,a=document.images;"
                "for(var i=0;i<a.length;i++){if(a[i].complete&&a[i].naturalWidth>0)n++;}"
                "var d=document.createElement('pre');d.id='imgcheck';"
                "d.textContent='IMAGES-DECODED '+n+' OF '+a.length;document.body.appendChild(d);});</script>")


@pytest.mark.skipif(_chromium() is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                                 "(.ci/run installs it: apt-get install -y chromium)")
def test_renders_in_headless_chromium(store, tmp_path):
    browser = _chromium()
    page = report.write(store, "search-1", tmp_path / "report.html")
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-extensions",
            f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--hide-scrollbars", "--window-size=1280,3000", f"--screenshot={shot}",
                           page.resolve().as_uri()], capture_output=True, timeout=60)
    assert shot.is_file(), "chromium wrote no screenshot"
    with Image.open(shot) as raw:
        img = raw.convert("RGB")
    assert img.size == (1280, 3000)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "the screenshot is (nearly) blank"

    # every <img> decoded: a copy of the report with a tiny checker script (never the product itself)
    text = page.read_text()
    n_img = len(IMG_RE.findall(text))
    assert n_img > 0
    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", CHECK_SCRIPT + "</body>"))
    p = subprocess.run(base + ["--virtual-time-budget=5000", "--dump-dom", probe.resolve().as_uri()],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"IMAGES-DECODED (\d+) OF (\d+)", p.stdout)
    assert m, f"no result from the checker script; chromium stderr: {p.stderr[-2000:]}"
    assert (int(m.group(1)), int(m.group(2))) == (n_img, n_img)
