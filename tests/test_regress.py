"""edgeprune regress: the release gate (host.results.regress), on synthetic runs in a temporary SQLite store."""
from __future__ import annotations

import argparse
import io
import json
import math
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import pytest
from rich.console import Console

from edgeprune.errors import UsageError
from host.cli import results as results_cli
from host.cli.results import register
from host.results import regress
from host.results.regress import compare, mann_whitney_greater, median_ratio_ci, write_junit
from host.results.regress.stats import _boot_medians
from host.results.store import Store

SHA_A = "a" * 64
SHA_B = "b" * 64


# ------------------------------------------------------------------------------------------ synthetic data


def ar1_lognormal(rng: np.random.Generator, n: int, median_ms: float, sigma: float = 0.08,
                  phi: float = 0.9) -> np.ndarray:
    """Latencies with a lognormal marginal (median ``median_ms``) and AR(1)-correlated log noise."""
    z = rng.standard_normal(n)
    e = np.empty(n)
    e[0] = z[0]
    k = math.sqrt(1.0 - phi * phi)
    for i in range(1, n):
        e[i] = phi * e[i - 1] + k * z[i]
    return median_ms * np.exp(sigma * e)


def make_report(samples: Optional[Sequence[float]], *, status: str = "ok", power_w: Optional[float] = 5.0,
                modelled: bool = False, top1: Optional[float] = 0.9, n: int = 1000, runtime: str = "onnxruntime",
                runtime_version: str = "1.17.0", kernel: str = "6.1.0", firmware: Optional[Dict[str, str]] = None,
                batch: int = 1, error: str = "boom", fidelity: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """An agent report; ``fidelity`` (``agreement``, ``snr_db``, ...) makes it a schema-2 report whose accuracy has
    label-free fidelity (``top1`` then may be None: unlabelled eval data)."""
    s = [float(x) for x in (samples if samples is not None else [])]
    rep: Dict[str, Any] = {
        "schema_version": 1 if fidelity is None else 2, "job_id": "j", "status": status, "warnings": [],
        "identity": {"device_id": "jetson", "hostname": "h", "os": "Linux", "kernel": kernel, "machine": "aarch64",
                     "cpu_model": "cortex-a78", "cpu_count": 6, "python": "3.10", "agent_version": "0.1.0",
                     "runtime": runtime, "runtime_version": runtime_version, "artifact_sha256": SHA_A,
                     "firmware": firmware if firmware is not None else {"l4t": "36.2"}},
    }
    if status != "ok":
        rep["error"] = {"type": "RuntimeError", "message": error}
        return rep
    if s:
        rep["timing"] = {"batch_size": batch, "samples_ms": s, "iterations": len(s),
                         "latency_ms": {"median": float(np.median(s)), "p90": float(np.percentile(s, 90)),
                                        "p99": float(np.percentile(s, 99)), "mean": float(np.mean(s)),
                                        "cv": float(np.std(s) / np.mean(s))}}
    if power_w is not None:
        rep["power"] = {"mean_w": power_w, "modelled": modelled, "source": "model" if modelled else "ina3221",
                        "energy_mj_per_inference": power_w * (float(np.mean(s)) if s else 1.0) / batch}
    if fidelity is not None:
        acc = {"split": "eval", "n": n, "top1": top1, "top5": None if top1 is None else 0.99, "agreement": None,
               "snr_db": None, "max_abs_err": None, "outputs": [], "eval_sha256": "e" * 64, "shards": ["e" * 64]}
        acc.update(fidelity)
        acc.setdefault("metric", "top1" if top1 is not None else "agreement" if acc["agreement"] is not None
                       else "snr_db")
        rep["accuracy"] = acc
    elif top1 is not None:
        rep["accuracy"] = {"split": "eval", "n": n, "top1": top1, "top5": 0.99}
    return rep


def record(store: Store, run_id: str, key: str, samples: Optional[Sequence[float]], *, device: str = "jetson",
           model: str = "resnet20", label: str = "dense", sha: str = SHA_A, fmt: str = "onnx", threads: int = 1,
           options: Optional[Dict[str, Any]] = None, **kw: Any) -> None:
    job = {"runtime": {"name": kw.get("runtime", "onnxruntime"), "threads": threads, "options": options or {}},
           "timing": {"batch_size": kw.get("batch", 1), "min_duration_s": 2.0}}
    store.record_measurement(run_id, key, device_id=device, report=make_report(samples, **kw), job=job, label=label,
                             model=model, manifest={"sha256": sha, "format": fmt, "model_name": model})


def make_run(store: Store, run_id: str, entries: List[Dict[str, Any]]) -> str:
    store.start_run(run_id, "bench", command=[], provenance={})
    for i, e in enumerate(entries):
        e = dict(e)
        record(store, run_id, e.pop("key", f"m{i}"), e.pop("samples"), **e)
    store.finish_run(run_id)
    return run_id


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "r.db"))
    yield s
    s.close()


def lat(seed: int, median_ms: float = 2.0, n: int = 2000) -> np.ndarray:
    return ar1_lognormal(np.random.default_rng(seed), n, median_ms)


def by(comp: regress.Comparison, metric: str, label: str = "dense") -> regress.Check:
    found = [c for c in comp.checks if c.metric == metric and c.label == label]
    assert len(found) == 1, comp.checks
    return found[0]


# ------------------------------------------------------------------------------------------ statistics


def test_mann_whitney_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    cases = [
        (rng.normal(0, 1, 7), rng.normal(0.5, 1, 9)),
        (rng.normal(0, 1, 30), rng.normal(-0.2, 1, 25)),
        (np.round(rng.normal(0, 1, 20), 1), np.round(rng.normal(0.3, 1, 15), 1)),   # many ties
        (np.array([1.0, 2, 2, 3, 3, 3]), np.array([2.0, 3, 3, 4, 4])),
        (rng.lognormal(0, 0.1, 300), rng.lognormal(0.01, 0.1, 400)),
    ]
    for a, b in cases:
        want = stats.mannwhitneyu(b, a, alternative="greater", method="asymptotic").pvalue
        assert mann_whitney_greater(a, b) == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert mann_whitney_greater([1.0, 1.0], [1.0, 1.0, 1.0]) == 1.0      # all tied: no evidence
    with pytest.raises(ValueError):
        mann_whitney_greater([], [1.0])


def test_mann_whitney_direction_and_ci():
    rng = np.random.default_rng(0)
    a = rng.lognormal(0, 0.1, 800)
    b = rng.lognormal(math.log(1.1), 0.1, 800)
    assert mann_whitney_greater(a, b) < 1e-10          # b (candidate) slower
    assert mann_whitney_greater(b, a) > 0.99
    lo, hi = median_ratio_ci(a, b, seed=0)
    assert lo < float(np.median(b) / np.median(a)) < hi
    assert 1.05 < lo < hi < 1.15
    assert median_ratio_ci(a, b, seed=0) == (lo, hi)   # fixed seed: reproducible


def test_bootstrap_medians_match_brute_force():
    rng = np.random.default_rng(5)
    for n in (7, 10):
        x = rng.lognormal(0, 0.3, n)
        fast = _boot_medians(x, 100_000, np.random.default_rng(1))
        slow = np.median(x[np.random.default_rng(2).integers(0, n, (100_000, n))], axis=1)
        assert fast.mean() == pytest.approx(slow.mean(), rel=2e-3)
        assert np.percentile(fast, 50) == pytest.approx(np.percentile(slow, 50), rel=1e-2)


def test_thin_keeps_evenly_spaced_samples():
    x = np.arange(5000.0)
    t = regress.thin(x)
    assert len(t) == regress.MAX_TEST_SAMPLES and t[0] == 0 and t[-1] == 4999
    assert np.all(np.diff(t) > 0)
    assert len(regress.thin(x[:10])) == 10


# ------------------------------------------------------------------------------------------ the gate


def test_aa_false_alarm_rate(store):
    """Same latency distribution (AR(1) noise) plus a small run-to-run median shift: the gate passes >= 49/50,
    although the Mann-Whitney test alone, on thousands of correlated samples, calls many of these shifts
    significant. These 50 seeds give 49 passes: the one false alarm is energy +5.9% (latency +4.8% times the
    +-1% mean-power draw). Over 600 seeds of this model the rate was 0/600 for latency and 2/600 for energy."""
    passes = significant = 0
    for i in range(50):
        rng = np.random.default_rng(1000 + i)
        shift = rng.uniform(-0.02, 0.02)
        base = ar1_lognormal(rng, 3000, 2.0)
        cand = ar1_lognormal(rng, 3000, 2.0 * (1 + shift))
        make_run(store, f"aa-b{i}", [dict(samples=base, power_w=5.0 * (1 + rng.uniform(-0.01, 0.01)))])
        make_run(store, f"aa-c{i}", [dict(samples=cand, power_w=5.0 * (1 + rng.uniform(-0.01, 0.01)))])
        comp = compare(store, f"aa-b{i}", f"aa-c{i}")
        passes += comp.exit_code == 0
        latency = by(comp, "latency")
        significant += min(latency.p, latency.p_faster) < 0.01
    assert passes >= 49
    assert significant >= 10     # what the effect-size gate protects against


def test_ab_ten_percent_slowdown_fails(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(2, 2.2))])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 1
    latency = by(comp, "latency")
    assert latency.verdict == "regression" and latency.failed
    assert latency.change == pytest.approx(0.10, abs=0.03)
    assert latency.p < 1e-6 and latency.ci[0] > 1.0
    assert "latency" in latency.message and "tolerance" in latency.message
    assert by(comp, "energy").verdict == "regression"          # same power: energy follows latency
    assert by(comp, "accuracy").verdict == "pass"
    path = write_junit(comp, tmp_path / "junit.xml")
    suite = ET.parse(path).getroot().find("testsuite")
    failures = suite.findall("testcase/failure")
    assert [f.get("type") for f in failures] == ["regression", "regression"]
    case = suite.find("testcase[@name='dense latency']")
    assert case.get("classname") == "jetson.resnet20" and case.find("failure") is not None


def test_small_slowdown_within_tolerance_passes(store):
    make_run(store, "base", [dict(samples=lat(1, n=4000))])
    make_run(store, "cand", [dict(samples=lat(2, 2.06, n=4000))])
    comp = compare(store, "base", "cand", latency_tol=0.05)
    latency = by(comp, "latency")
    assert latency.change == pytest.approx(0.03, abs=0.02)
    assert latency.verdict == "pass" and comp.exit_code == 0
    # a tighter tolerance fails the same data
    assert compare(store, "base", "cand", latency_tol=0.01, energy_tol=0.5).exit_code == 1


def test_improvement_is_not_a_failure(store):
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(2, 1.6))])
    comp = compare(store, "base", "cand")
    assert by(comp, "latency").verdict == "improved"
    assert by(comp, "latency").p_faster < 1e-6
    assert comp.exit_code == 0


def test_incomparable_artifact(store):
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(2), sha=SHA_B)])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 2
    assert len(comp.incomparable) == 1 and not comp.incomparable[0].compared
    msg = comp.incomparable[0].message
    assert "artifact_sha256" in msg and f"{SHA_A[:12]} → {SHA_B[:12]}" in msg
    assert {c.verdict for c in comp.checks} == {"incomparable"}

    anyway = compare(store, "base", "cand", compare_anyway=True)
    assert anyway.exit_code == 0
    assert by(anyway, "latency").verdict == "pass"
    assert any("artifact_sha256" in d for d in by(anyway, "latency").differences)
    assert anyway.incomparable[0].compared


def test_incomparable_runtime_and_batch(store):
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(1), runtime="tflite", batch=4)])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 2
    reasons = comp.incomparable[0].reasons
    assert "runtime onnxruntime → tflite" in reasons and "batch_size 1 → 4" in reasons
    assert not any("artifact_sha256" in r for r in reasons)


def test_environment_changes_are_listed_not_refused(store):
    make_run(store, "base", [dict(samples=lat(1), threads=2, firmware={"l4t": "36.2"})])
    make_run(store, "cand", [dict(samples=lat(2), threads=1, firmware={"l4t": "36.3"}, runtime_version="1.18.0",
                                  options={"graph_optimization_level": "all"})])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 0 and comp.incomparable == []
    changes = by(comp, "latency").changes
    assert "threads 2 → 1" in changes
    assert "firmware.l4t 36.2 → 36.3" in changes
    assert "runtime_version 1.17.0 → 1.18.0" in changes
    assert "runtime.options.graph_optimization_level — → all" in changes
    assert not any(c.startswith("kernel") for c in changes)


def test_accuracy_drop(store):
    make_run(store, "base", [dict(samples=lat(1), top1=0.920)])
    make_run(store, "cand", [dict(samples=lat(1), top1=0.910, n=500)])
    comp = compare(store, "base", "cand", accuracy_tol_pp=0.5)
    acc = by(comp, "accuracy")
    assert acc.verdict == "regression" and comp.exit_code == 1
    assert acc.change == pytest.approx(-1.0)
    assert any("eval_n 1000 → 500" in n for n in acc.notes)
    assert compare(store, "base", "cand", accuracy_tol_pp=1.5).exit_code == 0


def test_candidate_failed_missing_and_new(store):
    make_run(store, "base", [dict(samples=lat(1), label="dense"), dict(samples=lat(2), label="r50")])
    make_run(store, "cand", [dict(samples=None, label="dense", status="error", error="CUDA out of memory"),
                             dict(samples=lat(3), label="r70")])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 1
    failed = [c for c in comp.checks if c.label == "dense"]
    assert failed and {c.verdict for c in failed} == {"failed"}
    assert "CUDA out of memory" in failed[0].message
    missing = [c for c in comp.checks if c.label == "r50"]
    assert missing and {c.verdict for c in missing} == {"missing"}
    assert any("r70" in n and "new in the candidate" in n for n in comp.notes)


def test_candidate_partly_failed_trials(store):
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(2)), dict(samples=None, status="error")])
    comp = compare(store, "base", "cand")
    assert by(comp, "latency").verdict == "pass"
    assert by(comp, "result").verdict == "failed"
    assert comp.exit_code == 1


def test_baseline_failed_cannot_be_judged(store):
    make_run(store, "base", [dict(samples=None, status="error")])
    make_run(store, "cand", [dict(samples=lat(2))])
    comp = compare(store, "base", "cand", compare_anyway=True)
    assert comp.exit_code == 2
    assert "every baseline trial failed" in comp.incomparable[0].message


def test_repeated_trials_are_decided_over_runs_and_modelled_power_marked(store):
    make_run(store, "base", [dict(key="t1", samples=lat(1, n=600), modelled=True),
                             dict(key="t2", samples=lat(2, n=600), modelled=True)])
    make_run(store, "cand", [dict(key="t1", samples=lat(3, n=600), modelled=True),
                             dict(key="t2", samples=lat(4, n=600), modelled=True, power_w=None)])
    comp = compare(store, "base", "cand")
    latency = by(comp, "latency")
    assert latency.trials_baseline == 2 and latency.trials_candidate == 2
    # repetitions on both sides: latency is decided over runs, and two against two cannot reach alpha 0.01
    assert latency.n_baseline == 2 and latency.n_candidate == 2 and latency.verdict == "inconclusive"
    assert "cannot reach alpha 0.01 (needs 5 a side)" in latency.rule
    energy = by(comp, "energy")                                            # energy pools the trials' samples
    assert energy.modelled and energy.n_candidate == 600                  # only the trial with power
    assert comp.exit_code == 3 and comp.verdict == "inconclusive"


def test_modelled_energy_is_shown_not_gated_unless_asked(store):
    # same latency distribution, modelled power 20 % higher (the machine was busier): not the artifact's doing
    make_run(store, "base", [dict(samples=lat(1), modelled=True, power_w=5.0)])
    make_run(store, "cand", [dict(samples=lat(2), modelled=True, power_w=6.0)])
    comp = compare(store, "base", "cand")
    energy = by(comp, "energy")
    assert energy.verdict == "not measured" and "not gated (modelled power" in energy.message
    assert energy.change == pytest.approx(0.2, abs=0.05) and comp.exit_code == 0
    gated = compare(store, "base", "cand", gate_modelled_energy=True)
    assert by(gated, "energy").verdict == "regression" and gated.exit_code == 1
    # a real sensor is gated by default
    make_run(store, "base2", [dict(samples=lat(1), power_w=5.0)])
    make_run(store, "cand2", [dict(samples=lat(2), power_w=6.0)])
    assert by(compare(store, "base2", "cand2"), "energy").verdict == "regression"


def test_energy_not_measured_is_skipped(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1), power_w=None, top1=None)])
    make_run(store, "cand", [dict(samples=lat(2), top1=None)])
    comp = compare(store, "base", "cand")
    assert by(comp, "energy").verdict == "not measured"
    assert by(comp, "accuracy").verdict == "not measured"
    assert comp.exit_code == 0
    root = ET.parse(write_junit(comp, tmp_path / "j.xml")).getroot()
    suite = root.find("testsuite")
    assert suite.get("skipped") == "2" and len(suite.findall("testcase/skipped")) == 2


def test_samples_missing_decides_on_medians(store):
    make_run(store, "base", [dict(samples=[2.0])])
    make_run(store, "cand", [dict(samples=[2.4])])
    comp = compare(store, "base", "cand")
    latency = by(comp, "latency")
    assert latency.verdict == "regression" and latency.p is None
    assert any("no latency samples" in n for n in latency.notes)


def test_no_pairs_and_usage_errors(store):
    make_run(store, "base", [dict(samples=lat(1), device="a")])
    make_run(store, "cand", [dict(samples=lat(1), device="b")])
    comp = compare(store, "base", "cand")
    assert comp.pairs == 0 and comp.exit_code == 2 and "no result in common" in comp.error
    with pytest.raises(UsageError, match="--candidate"):
        compare(store, "base", "base")
    with pytest.raises(UsageError, match="--candidate: no run 'nope'"):
        compare(store, "base", "nope")
    with pytest.raises(UsageError, match="--baseline: no run 'nope'"):
        compare(store, "nope", "cand")
    with pytest.raises(UsageError, match="--latency-tol"):
        compare(store, "base", "cand", latency_tol=-1)
    with pytest.raises(UsageError, match="--alpha"):
        compare(store, "base", "cand", alpha=1.5)


def test_tolerance_parsing():
    assert regress.parse_percent("5%", "--latency-tol") == pytest.approx(0.05)
    assert regress.parse_percent("5", "--latency-tol") == pytest.approx(0.05)
    assert regress.parse_percent(" 2.5 % ", "--latency-tol") == pytest.approx(0.025)
    assert regress.parse_pp("0.5pp", "--accuracy-tol") == pytest.approx(0.5)
    assert regress.parse_pp("1", "--accuracy-tol") == pytest.approx(1.0)
    for bad in ("", "abc", "-5%", "5pp", "nan", "inf", "5%%"):
        with pytest.raises(UsageError, match="^--energy-tol: "):
            regress.parse_percent(bad, "--energy-tol")
    for bad in ("0.5%", "x", "-1", "1e999"):
        with pytest.raises(UsageError, match="^--accuracy-tol: "):
            regress.parse_pp(bad, "--accuracy-tol")
    for bad in ("0", "1", "x", "-0.1"):
        with pytest.raises(UsageError, match="^--alpha: "):
            regress.parse_alpha(bad)


# ------------------------------------------------------------------------------------------ JUnit and CLI


def test_junit_counts(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1), label="dense"), dict(samples=lat(2), label="r50", sha=SHA_B),
                             dict(samples=lat(3), label="r70", top1=0.95, power_w=None)])
    make_run(store, "cand", [dict(samples=lat(4, 2.4), label="dense"), dict(samples=lat(5), label="r50"),
                             dict(samples=lat(6), label="r70", top1=0.90, power_w=None)])
    comp = compare(store, "base", "cand")
    assert comp.exit_code == 2
    path = write_junit(comp, tmp_path / "j.xml")
    assert not (tmp_path / "j.xml.tmp").exists()
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite.get("name") == "edgeprune.regress"
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(len(cases)) == str(len(comp.checks)) == "9"
    assert suite.get("failures") == str(len(suite.findall("testcase/failure"))) == "3"   # dense x2, r70 accuracy
    assert suite.get("errors") == str(len(suite.findall("testcase/error"))) == "3"       # r50 incomparable
    assert suite.get("skipped") == str(len(suite.findall("testcase/skipped"))) == "1"    # r70 energy
    names = {(c.get("classname"), c.get("name")) for c in cases}
    assert ("jetson.resnet20", "r70 accuracy") in names and ("jetson.resnet20", "dense energy") in names
    assert path.read_bytes().isascii()                                 # locale-proof: → as a character reference
    err = suite.find("testcase[@name='r50 latency']/error")
    assert err.get("type") == "incomparable" and f"artifact_sha256 {SHA_B[:12]} → {SHA_A[:12]}" in err.get("message")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["baseline"] == "base" and props["candidate"] == "cand"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    register(sub)
    return p


def _console() -> Console:
    return Console(file=io.StringIO(), width=200, color_system=None)


def test_main_regress_table_json_and_junit(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1), threads=2)])
    make_run(store, "cand", [dict(samples=lat(2, 2.3), threads=1)])
    db = str(tmp_path / "r.db")
    args = _parser().parse_args(["regress", "--baseline", "base", "--candidate", "cand", "--db", db,
                                 "--junit", str(tmp_path / "gate.xml")])
    assert args.handler is results_cli.main_regress
    console = _console()
    assert args.handler(args, console) == 1
    out = console.file.getvalue()
    assert "regression" in out and "FAIL" in out and "threads 2 → 1" in out and "dense" in out
    assert ET.parse(tmp_path / "gate.xml").getroot().find("testsuite").get("failures") == "2"

    args = _parser().parse_args(["regress", "--baseline", "base", "--candidate", "cand", "--db", db, "--json",
                                 "--latency-tol", "20", "--energy-tol", "20%", "--alpha", "0.05"])
    console = _console()
    assert args.handler(args, console) == 0
    data = json.loads(console.file.getvalue())
    assert data["exit_code"] == 0 and data["latency_tol"] == pytest.approx(0.2) and data["alpha"] == 0.05
    lat_check = next(c for c in data["checks"] if c["metric"] == "latency")
    assert lat_check["verdict"] == "pass" and lat_check["name"] == "dense latency" and len(lat_check["ci"]) == 2


def test_main_regress_usage_errors(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1))])
    db = str(tmp_path / "r.db")
    p = _parser()
    args = p.parse_args(["regress", "--baseline", "base", "--candidate", "base", "--db", db,
                         "--energy-tol", "five"])
    with pytest.raises(UsageError, match="^--energy-tol: "):
        results_cli.main_regress(args, _console())
    args = p.parse_args(["regress", "--baseline", "base", "--candidate", "base", "--db", db])
    with pytest.raises(UsageError, match="^--candidate: "):
        results_cli.main_regress(args, _console())
    args = p.parse_args(["regress", "--baseline", "base", "--candidate", "x", "--db", str(tmp_path / "none.db")])
    with pytest.raises(UsageError, match="^--db: "):
        results_cli.main_regress(args, _console())
    assert not (tmp_path / "none.db").exists()


# ------------------------------------------------------------------------------------------ label-free fidelity


def _fid(agreement: Optional[float] = None, snr_db: Optional[float] = None, **kw: Any) -> Dict[str, Any]:
    return dict(fidelity=dict(agreement=agreement, snr_db=snr_db, **kw), top1=kw.pop("top1", None))


def test_agreement_floor_pass_and_regression(store):
    make_run(store, "base", [dict(samples=lat(1), **_fid(0.999, 45.0))])
    make_run(store, "good", [dict(samples=lat(2), **_fid(0.995, 38.0))])
    make_run(store, "bad", [dict(key="t1", samples=lat(3), **_fid(0.995, 38.0)),
                            dict(key="t2", samples=lat(4), **_fid(0.985, 31.0))])
    comp = compare(store, "base", "good", min_agreement=0.99)
    agr = by(comp, "agreement")
    assert agr.verdict == "pass" and comp.exit_code == 0
    assert agr.candidate == pytest.approx(0.995) and agr.baseline == pytest.approx(0.999) and agr.bound == 0.99
    assert agr.change == pytest.approx(-0.4)                 # pp, for reading: the floor is absolute
    assert "99.50% meets the minimum 99.00% (--min-agreement)" in agr.message
    assert [c.metric for c in comp.checks] == ["latency", "energy", "accuracy", "agreement"]   # no snr unless asked
    acc = by(comp, "accuracy")                                # top-1 null on both sides: not measured, no crash
    assert acc.verdict == "not measured" and "unlabelled eval data" in acc.message
    assert "decided by the agreement check" in acc.message

    comp = compare(store, "base", "bad", min_agreement=0.99, min_snr_db=30)
    agr, snr = by(comp, "agreement"), by(comp, "snr")
    assert comp.exit_code == 1 and agr.verdict == "regression" and agr.failed
    assert agr.candidate == pytest.approx(0.985) and "(worst of 2 trials) is below the minimum 99.00%" in agr.message
    assert snr.verdict == "pass" and snr.candidate == pytest.approx(31.0) and snr.unit == "dB"
    assert snr.change == pytest.approx(-14.0)
    assert by(compare(store, "base", "bad", min_snr_db=32), "snr").verdict == "regression"
    # a baseline below the floor does not make the candidate pass, nor a baseline far above it fail it
    assert compare(store, "bad", "good", min_agreement=0.99).exit_code == 0
    assert compare(store, "good", "bad", min_agreement=0.98).exit_code == 0


def test_fidelity_in_cli_table_json_and_junit(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1), **_fid(0.999, 45.0))])
    make_run(store, "cand", [dict(samples=lat(2), **_fid(0.97, 25.0))])
    db = str(tmp_path / "r.db")
    argv = ["regress", "--baseline", "base", "--candidate", "cand", "--db", db]
    console = _console()
    args = _parser().parse_args(argv + ["--min-agreement", "99%", "--min-snr-db", "20dB",
                                        "--junit", str(tmp_path / "gate.xml")])
    assert args.handler(args, console) == 1
    out = " ".join(console.file.getvalue().split())          # the legend wraps
    assert "FAIL" in out and "agreement" in out and "97.00%" in out and "25.0 dB" in out
    assert "agreement: top-1 agreement with the dense model 97.00% is below the minimum 99.00%" in out
    assert "accuracy: accuracy (top-1) not measured on the baseline and candidate" in out
    assert "agreement when the candidate's top-1 agreement with the dense model is below 99.00%" in out   # legend
    suite = ET.parse(tmp_path / "gate.xml").getroot().find("testsuite")
    fail = suite.find("testcase[@name='dense agreement']/failure")
    assert fail is not None and fail.get("type") == "regression" and "97.00%" in fail.get("message")
    assert suite.find("testcase[@name='dense snr']/system-out") is not None          # passed
    assert suite.find("testcase[@name='dense accuracy']/skipped") is not None
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["min_agreement"] == "0.99" and props["min_snr_db"] == "20"

    console = _console()
    args = _parser().parse_args(argv + ["--json", "--min-agreement", "0.95"])
    assert args.handler(args, console) == 0
    data = json.loads(console.file.getvalue())
    assert data["min_agreement"] == 0.95 and data["min_snr_db"] is None
    agr = next(c for c in data["checks"] if c["metric"] == "agreement")
    assert agr["verdict"] == "pass" and agr["bound"] == 0.95 and agr["candidate"] == pytest.approx(0.97)
    assert agr["name"] == "dense agreement" and not any(c["metric"] == "snr" for c in data["checks"])

    console = _console()                                   # not asked: not gated, and the legend says so
    args = _parser().parse_args(argv)
    assert args.handler(args, console) == 0
    out = " ".join(console.file.getvalue().split())
    assert "label-free fidelity (agreement, SNR) not gated" in out and "gate it with --min-agreement" in out


def test_missing_fidelity_is_not_measured_with_the_reason(store, tmp_path):
    make_run(store, "base", [dict(samples=lat(1), label=lb, **_fid(0.999, 45.0)) for lb in ("v1", "noeval",
                                                                                             "snr", "noref")])
    make_run(store, "cand", [dict(samples=lat(2), label="v1", top1=0.9),                  # a version-1 report
                             dict(samples=lat(2), label="noeval", top1=None),              # no eval data
                             dict(samples=lat(2), label="snr", **_fid(None, 40.0)),        # no logit-like output
                             dict(samples=lat(2), label="noref", **_fid(None, None, top1=0.9))])  # no references
    comp = compare(store, "base", "cand", min_agreement=0.99, min_snr_db=30)
    assert comp.exit_code == 0
    reasons = {lb: by(comp, "agreement", lb) for lb in ("v1", "noeval", "snr", "noref")}
    assert {c.verdict for c in reasons.values()} == {"not measured"}
    assert "schema version 1" in reasons["v1"].message
    assert "no eval data" in reasons["noeval"].message
    assert "no logit-like output" in reasons["snr"].message
    assert "no reference outputs" in reasons["noref"].message
    assert all("not measured on the candidate" in c.message for c in reasons.values())
    assert reasons["v1"].baseline == pytest.approx(0.999)              # the baseline's still shown
    assert by(comp, "snr", "snr").verdict == "pass"
    assert by(comp, "snr", "noref").verdict == "not measured"
    assert by(comp, "accuracy", "noref").verdict == "not measured"    # top-1 null on the baseline side
    suite = ET.parse(write_junit(comp, tmp_path / "j.xml")).getroot().find("testsuite")
    assert suite.find("testcase[@name='v1 agreement']/skipped") is not None
    assert suite.get("failures") == "0"
    # a pair missing in the candidate fails its asked-for fidelity checks too
    make_run(store, "partial", [dict(samples=lat(2), label="v1", **_fid(0.995))])
    missing = compare(store, "base", "partial", min_agreement=0.99)
    assert by(missing, "agreement", "v1").verdict == "pass"
    assert by(missing, "agreement", "snr").verdict == "missing" and missing.exit_code == 1


def test_null_top1_on_one_side_does_not_crash(store):
    make_run(store, "base", [dict(samples=lat(1), top1=0.91)])                     # labelled, version 1
    make_run(store, "cand", [dict(samples=lat(2), **_fid(0.998, 50.0))])          # unlabelled, version 2
    comp = compare(store, "base", "cand")
    acc = by(comp, "accuracy")
    assert acc.verdict == "not measured" and comp.exit_code == 0
    assert "not measured on the candidate (unlabelled eval data; label-free fidelity on the candidate: " \
           "agreement 99.80%, SNR 50.0 dB)" in acc.message
    console = _console()
    regress.print_summary(comp, console)
    assert "PASS" in console.file.getvalue()
    assert json.loads(json.dumps(comp.to_dict()))["exit_code"] == 0
    make_run(store, "cand2", [dict(samples=lat(2), **_fid(0.998, 50.0, top1=0.905))])   # labelled version 2
    assert by(compare(store, "base", "cand2"), "accuracy").verdict == "pass"


@pytest.mark.parametrize("flag,value", [("--min-agreement", "1.5"), ("--min-agreement", "0"),
                                        ("--min-agreement", "abc"), ("--min-agreement", "nan"),
                                        ("--min-agreement", "150%"), ("--min-snr-db", "abc"),
                                        ("--min-snr-db", "inf"), ("--min-snr-db", "30 dBm")])
def test_bad_fidelity_flags_are_one_usage_error(store, tmp_path, capsys, flag, value):
    from host import cli
    make_run(store, "base", [dict(samples=lat(1))])
    make_run(store, "cand", [dict(samples=lat(2))])
    capsys.readouterr()
    code = cli.main(["regress", "--baseline", "base", "--candidate", "cand", "--db", str(tmp_path / "r.db"),
                     flag, value])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"edgeprune: error: {flag}: ") and repr(value) in lines[0]


def test_fidelity_bound_parsing():
    assert regress.parse_fraction("0.99") == pytest.approx(0.99)
    assert regress.parse_fraction(" 99.5 % ") == pytest.approx(0.995)
    assert regress.parse_fraction("1") == 1.0
    assert regress.parse_db("30") == 30.0 and regress.parse_db("-3.5 dB") == -3.5 and regress.parse_db("20db") == 20
    with pytest.raises(UsageError, match="^--min-agreement: "):
        compare(None, "a", "b", min_agreement=1.5)                  # checked before the store is touched
    with pytest.raises(UsageError, match="^--min-snr-db: "):
        compare(None, "a", "b", min_snr_db=math.nan)
