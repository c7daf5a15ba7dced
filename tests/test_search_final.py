"""host.search.final: each device's pick timed again in repetitions after the verdicts (fake evaluator whose
repetitions run slower by a known step, so the figures can only come from the right jobs): round by round across
devices, speed only, served from the log on --resume, written to the outputs and the results store. The real
evaluator's repetitions (fresh agent jobs, no eval data) are tested end to end in tests/test_search_cli.py."""
from __future__ import annotations

import csv
import json

import pytest

from edgeprune.errors import UsageError
from host.search.algos.base import DeviceMeasurement
from host.search.outcome import result_document
from tests.test_search import FakeEvaluator, device, options, resnet_like_space, run, targets_for

STEP = 0.01       # repetition r runs (1 + STEP * r) slower than the evaluation


class RepEvaluator(FakeEvaluator):
    def __init__(self, space, fail_rep=None, **kw):
        super().__init__(space, **kw)
        self.timing = []
        self.fail_rep = fail_rep

    def measure(self, requests, done):
        rest = []
        for req in requests:
            if req.split != "timing":
                rest.append(req)
                continue
            self.timing.append((req.device.id, req.key, req.rep, req.reps))
            if req.rep == self.fail_rep:
                done(req, DeviceMeasurement(False, error="DeviceError: lease lost"), {})
                continue
            m = self.metrics(req.device.id, req.candidate, req.key)
            m["latency_p50_ms"] *= 1 + STEP * req.rep
            done(req, DeviceMeasurement(True, m, key=req.key, artifact_sha256="a" * 64, plan_sha256="b" * 64),
                 {"report": {"fake": True, "rep": req.rep}, "job": {"rep": req.rep}})
        if rest:
            super().measure(rest, done)


def _search(tmp_path, ev, devs=None, **kw):
    devs = devs or [device()]
    return run(tmp_path, devs, targets_for(devs, "latency_p50_ms=0.6x", drop=5.0), ev, ev.space, **kw)


def test_the_pick_is_timed_in_repetitions_and_the_figures_are_theirs(tmp_path):
    ev = RepEvaluator(resnet_like_space())
    res = _search(tmp_path, ev, final_repeat=5)
    r = res.devices[0]
    assert r.verdict == "met"
    assert [(k, rep, n) for _, k, rep, n in ev.timing] == [(r.chosen["key"], rep, 5) for rep in range(2, 6)]
    first = r.chosen["latency_p50_ms"]
    fin = r.final
    assert fin["repetitions"] == 5 and fin["asked"] == 5 and "error" not in fin
    assert fin["run_medians_ms"][0] == pytest.approx(first, rel=1e-6)
    assert fin["run_medians_ms"][1:] == pytest.approx([first * (1 + STEP * k) for k in range(2, 6)], rel=1e-6)
    assert fin["latency_p50_ms"] == pytest.approx(first * (1 + STEP * 3), rel=1e-6)        # the median run
    assert fin["run_spread"] == pytest.approx(STEP * 3 / (1 + STEP * 3), rel=1e-4)
    assert r.chosen["latency_p50_ms"] == first              # the verdict stays the one made on the evaluation
    row = next(csv.DictReader((tmp_path / "run" / "summary.csv").read_text().splitlines()))
    assert float(row["final_p50_ms"]) == pytest.approx(fin["latency_p50_ms"]) and row["final_runs"] == "5"
    cand = json.loads((tmp_path / "run" / "local" / "chosen" / "candidate.json").read_text())
    assert cand["final"]["run_medians_ms"] == fin["run_medians_ms"]
    assert result_document(res)["devices"][0]["final"]["repetitions"] == 5


def test_repetitions_go_round_by_round_across_devices_and_resume_serves_them(tmp_path):
    ev = RepEvaluator(resnet_like_space(), dense_ms={"a": 4.0, "b": 6.0})
    res = _search(tmp_path, ev, devs=[device("a"), device("b")], final_repeat=3)
    assert [(d, rep) for d, _, rep, _ in ev.timing] == [("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    before = [r.final for r in res.devices]
    ev2 = RepEvaluator(ev.space, dense_ms=ev.dense_ms)
    again = run(tmp_path, [device("a"), device("b")], None, ev2, ev.space, resume=True)
    assert ev2.timing == [] and [r.final for r in again.devices] == before


def test_a_failed_repetition_is_reported_and_the_others_kept(tmp_path):
    ev = RepEvaluator(resnet_like_space(), fail_rep=3)
    fin = _search(tmp_path, ev, final_repeat=4).devices[0].final
    assert fin["repetitions"] == 3 and fin["asked"] == 4 and fin["error"] == "DeviceError: lease lost"


def test_final_repeat_one_is_off_and_a_bad_value_is_refused(tmp_path):
    ev = RepEvaluator(resnet_like_space())
    assert _search(tmp_path, ev, final_repeat=1).devices[0].final is None and ev.timing == []
    for bad in (0, -2, 2.5, True):
        with pytest.raises(UsageError, match="--final-repeat: must be an integer >= 1"):
            options(tmp_path, final_repeat=bad).validate()


def test_repetitions_are_recorded_in_the_store_beside_the_evaluation(tmp_path):
    from host.results.store import RunRecorder, Store
    from host.search import run as hs

    ev = RepEvaluator(resnet_like_space())
    devs = [device()]
    db = str(tmp_path / "s.db")
    with RunRecorder(Store(db), "srch", "search", command=["test"]) as rec:
        res = hs.start(options(tmp_path, final_repeat=3), devs, targets_for(devs, "latency_p50_ms=0.6x", drop=5.0),
                       out=tmp_path / "run", run_id="srch", space=ev.space, evaluator=ev, recorder=rec)
    key = res.devices[0].chosen["key"]
    with Store(db) as s:
        rows = {r["key"]: r for r in s.measurements("srch")}
    mine = [rows.get(f"local/{key}"), rows.get(f"local/{key}#r2"), rows.get(f"local/{key}#r3")]
    assert all(m is not None for m in mine), sorted(rows)
    assert len({m["label"] for m in mine}) == 1                  # one identity: regress judges their run medians


def test_a_pick_measured_under_emulation_is_not_repeated(tmp_path):
    class Emulated(RepEvaluator):
        def measure(self, requests, done):
            def wrap(req, m, extra):
                extra = {**extra, "report": {"identity": {"extra": {"emulation": {"emulated": True}}}}}
                done(req, m, extra)
            super().measure(requests, wrap)

    ev = Emulated(resnet_like_space())
    fin = _search(tmp_path, ev, final_repeat=5).devices[0].final
    assert ev.timing == [] and fin["repetitions"] == 1 and "emulation" in fin["skipped"]
