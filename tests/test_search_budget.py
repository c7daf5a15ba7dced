"""host.search.budget: a search's wall-time budget against the fake evaluator and a fake clock (no sleeping): the
plan shown first, probes stopped at their deadline, the final recovery sized to the time left and kept on resume,
the total within the budget, and bad combinations refused."""
from __future__ import annotations

import json

import pytest

from edgeprune.errors import UsageError
from host.search import budget as sb
from host.search import options as so
from tests.test_search import FakeEvaluator, device, options, resnet_like_space, run, targets_for

EVAL_S = 90.0   # each device evaluation "takes" this long on the fake clock


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class TimedEvaluator(FakeEvaluator):
    """Each measurement advances the fake clock: export + measurement 45 s, a probe's recovery 45 s, a final's
    recovery all of its hard stop."""

    def __init__(self, space, clock, **kw):
        super().__init__(space, **kw)
        self.clock, self.requests = clock, []

    def measure(self, requests, done):
        def timed(req, m, extra):
            if req.pairs:   # the dense model measured beside a candidate: seconds, not part of the sequence
                done(req, m, extra)
                return
            recovery_s = (req.max_seconds if req.max_seconds is not None else EVAL_S / 2) if req.candidate.kept else 0
            self.clock.t += EVAL_S / 2 + recovery_s
            self.requests.append(req)
            done(req, m, {**extra, "recovery_result": {"seconds": recovery_s, "images_seen": 200 * recovery_s}
                          if req.candidate.kept else None})
        super().measure(requests, timed)

    def finetune_size(self, per_class=None):
        return 49_000


def _budget_run(tmp_path, clock, ev, minutes=10.0, events=None, **kw):
    from host.search import run as hs

    space = ev.space
    dev = device(round_to=4)
    # slack and ratio tolerances at 0: bisect always wants another probe, so the budget is what stops it
    opts = options(tmp_path, budget_minutes=minutes, max_evals=kw.pop("max_evals_override", 8), algo_options={
        "probe_recovery": "short", "slack_tol": 0.0, "ratio_tol": 0.0}, **kw)
    return hs.start(opts, [dev], targets_for([dev], "latency_p50_ms=0.5x", drop=5.0), out=tmp_path / "run",
                    run_id="run", space=space, evaluator=ev, clock=clock,
                    events=(lambda *e: events.append(e)) if events is not None else None)


def test_probes_stop_at_their_deadline_and_the_final_gets_the_rest(tmp_path):
    clock, events = Clock(), []
    space = resnet_like_space()
    ev = TimedEvaluator(space, clock)
    t0 = clock.t
    res = _budget_run(tmp_path, clock, ev, events=events)
    r = res.devices[0]
    # the plan comes before the first evaluation
    first_eval = next(i for i, e in enumerate(events) if e[0] == "eval")
    plan = [i for i, e in enumerate(events) if e[0] == "info" and e[2].startswith("budget 10 min:")]
    assert plan and plan[0] < first_eval
    # dense (0-45 s: no recovery), probes at 45 and 135 s (< 35 % of 600 s = 210 s), the one due at 225 s is not
    # built
    recoveries = [q.candidate.recovery for q in ev.requests]
    assert recoveries == ["none", "short", "short", "full"], recoveries
    assert "probe time spent" in r.reason and "measured again with full recovery" in r.reason
    skipped = [e for e in events if e[0] == "info" and "not built" in e[2]]
    assert len(skipped) == 1 and r.device_evals == 4
    # the final: all fine-tune images, sized to 600 s - 225 s spent - the reserve (1.5 x the slowest round's
    # export + measurement, 45 s, but at least 120 s) - a 30 s margin; the rate is the probes' 200 images/s, x 0.9
    doc = json.loads((tmp_path / "run" / sb.BUDGET_FILE).read_text())
    final = doc["finals"]["local"]
    assert final["finetune_per_class"] is None and final["finetune_seconds"] == pytest.approx(600 - 225 - 120 - 30)
    assert final["sizing"]["images_per_s"] == pytest.approx(180.0) and not final["sizing"]["compiled_expected"]
    assert final["finetune_epochs"] == max(1, int((225 - 15) * 180.0 // 49_000))
    final_req = ev.requests[-1]
    assert final_req.recovery == so.RecoveryOptions(**{k: v for k, v in final.items() if k != "sizing"})
    assert final_req.key == so.candidate_key(space, _opts(tmp_path), so.profile_for(device(round_to=4)),
                                             final_req.candidate, recovery=final_req.recovery)
    assert final_req.max_seconds == pytest.approx(225)
    assert clock.t - t0 <= 1.1 * 600 and final["sizing"]["shared_by"] == 1


def test_the_clock_starts_with_the_search_and_skips_do_not_use_evaluations(tmp_path):
    """Loading and the sensitivity table count (100 s here, before the dense measurement): one probe fits before
    minute 3.5, the next is skipped, and the skip is not an evaluation."""
    from host.search import run as hs

    clock = Clock()
    space = resnet_like_space()
    ev = TimedEvaluator(space, clock)
    real = hs._execute

    def slow_start(*a, **kw):
        clock.t += 100.0     # loading model and data, sensitivities: before the first evaluation
        return real(*a, **kw)

    hs_execute, hs._execute = hs._execute, slow_start
    try:
        res = _budget_run(tmp_path, clock, ev, max_evals_override=4)
    finally:
        hs._execute = hs_execute
    recoveries = [q.candidate.recovery for q in ev.requests]
    # dense at 100-145 s, probe at 145-235 s, the next is due at 235 s > 210 s: skipped; then the final
    assert recoveries == ["none", "short", "full"] and res.devices[0].device_evals == 3
    assert "probe time spent" in res.devices[0].reason


def test_finals_of_several_devices_share_the_time_left(tmp_path):
    from host.search import run as hs

    clock = Clock()
    space = resnet_like_space()
    ev = TimedEvaluator(space, clock)
    devs = [device("a", round_to=4), device("b", round_to=8)]
    opts = options(tmp_path, budget_minutes=10.0, max_evals=8, algo_options={
        "probe_recovery": "short", "slack_tol": 0.0, "ratio_tol": 0.0})
    hs.start(opts, devs, targets_for(devs, "latency_p50_ms=0.5x", drop=5.0), out=tmp_path / "run", run_id="run",
             space=space, evaluator=ev, clock=clock)
    finals = json.loads((tmp_path / "run" / sb.BUDGET_FILE).read_text())["finals"]
    assert set(finals) == {"a", "b"} and {f["sizing"]["shared_by"] for f in finals.values()} == {2, 1}
    first = min(finals.values(), key=lambda f: f["sizing"]["at_elapsed_s"])
    assert first["sizing"]["shared_by"] == 2


def _opts(tmp_path):
    from host.search.state import read_run

    return read_run(tmp_path / "run")[1]


def test_a_long_budget_lets_bisect_finish_and_sizes_a_compiled_final(tmp_path):
    clock = Clock()
    ev = TimedEvaluator(resnet_like_space(), clock)
    res = _budget_run(tmp_path, clock, ev, minutes=60.0)
    assert "probe time spent" not in res.devices[0].reason
    from edgeprune import cpu

    final = json.loads((tmp_path / "run" / sb.BUDGET_FILE).read_text())["finals"]["local"]
    how = final["sizing"]
    at = how["at_elapsed_s"]      # dense (45 s) and the probes bisect wanted (90 s each), long before minute 21
    assert (at - 45) % 90 == 0 and at < 0.35 * 3600 and how["seconds"] == pytest.approx(3600 - at - 120 - 180)
    compiled = cpu.compile_support()[0]
    assert how["compiled_expected"] == compiled
    rate = 180.0 * (sb.COMPILE_GAIN if compiled else 1.0)
    train_s = how["seconds"] - 15 - (sb.COMPILE_S if compiled else 0)
    assert how["images_per_s"] == pytest.approx(rate) and final["finetune_epochs"] == int(train_s * rate // 49_000)
    assert final["finetune_epochs"] > 1


def test_a_crash_in_the_final_resumes_with_the_same_sized_recovery(tmp_path):
    from host.search import run as hs

    clock = Clock()
    space = resnet_like_space()
    ev = TimedEvaluator(space, clock, crash_after=3)   # dense + 2 probes, then the final crashes
    with pytest.raises(KeyboardInterrupt):
        _budget_run(tmp_path, clock, ev)
    doc = json.loads((tmp_path / "run" / sb.BUDGET_FILE).read_text())
    assert "local" in doc["finals"] and len(doc["skipped"]) == 1 and doc["spent_s"] >= 225
    sized = doc["finals"]["local"]
    clock.t += 3600     # a later process: its clock starts anywhere; the budget continues from spent_s
    again = TimedEvaluator(space, clock)
    res = hs.resume("run", out=tmp_path / "run", space=space, evaluator=again, clock=clock)
    assert [q.candidate.recovery for q in again.requests] == ["full"]          # nothing else repeated
    assert again.requests[0].recovery == so.RecoveryOptions(**{k: v for k, v in sized.items() if k != "sizing"})
    assert res.devices[0].verdict == "met" and "probe time spent" in res.devices[0].reason


def test_bisect_keeps_one_evaluation_for_the_final_candidate(tmp_path):
    space = resnet_like_space()
    ev = FakeEvaluator(space)
    dev = device(round_to=4)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.6x", drop=5.0), ev, space, max_evals=3,
              algo_options={"probe_recovery": "short"})
    r = res.devices[0]
    assert [x["recovery"] for x in r.rows] == ["none", "short", "full"]
    assert "one kept for the final candidate" in r.reason


@pytest.mark.parametrize("kw, match", [
    (dict(budget_minutes=0.0), r"--budget-minutes: must be > 0"),
    (dict(budget_minutes=10.0, algo="netadapt"), r"--budget-minutes: only with --algo bisect"),
    (dict(budget_minutes=10.0), r"--budget-minutes: needs --probe-recovery short or none"),
])
def test_bad_budgets_are_refused(tmp_path, kw, match):
    with pytest.raises(UsageError, match=match):
        options(tmp_path, **kw).validate()


def test_a_torn_budget_file_is_one_clear_error(tmp_path):
    (tmp_path / sb.BUDGET_FILE).write_text("{not json")
    with pytest.raises(UsageError, match=r"budget\.json: not a readable budget file"):
        sb.SearchBudget(tmp_path, 10.0)


def test_the_cli_sets_cheap_probes_with_a_budget_and_resume_refuses_one(tmp_path):
    from host.cli import build_parser
    from host.cli.search import _search_options

    args = build_parser().parse_args(["search", "--model", "resnet20", "--budget-minutes", "30"])
    opts = _search_options(args)
    assert opts.budget_minutes == 30.0 and opts.algo_options.probe_recovery == "short"
    args = build_parser().parse_args(["search", "--model", "resnet20", "--budget-minutes", "30",
                                      "--probe-recovery", "none"])
    assert _search_options(args).algo_options.probe_recovery == "none"
    from host import cli

    for value in ("5", "0"):
        assert cli.main(["search", "--resume", "r", "--budget-minutes", value]) == 2
