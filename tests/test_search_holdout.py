"""host.search.holdout and the search's defaults (issue 17): the pick re-checked on test images it was not chosen
on (fake evaluator: eval and hold-out give different top-1, so the figures can only come from the right jobs), kept
across --resume, written to the outputs; the hold-out split itself (disjoint from eval, the rest of the test set);
the CLI's default budget and probe, and its per-candidate table and re-check line."""
from __future__ import annotations

import csv
import json

import pytest

from edgeprune import data
from host.cli import search as cli_search
from host.cli import build_parser
from host.search import holdout as sho
from host.search.budget import DEFAULT_BUDGET_MINUTES
from host.search.outcome import DeviceResult
from tests.test_search import FakeEvaluator, device, resnet_like_space, run, targets_for

HOLDOUT_SHIFT = 0.02   # the hold-out's top-1 is this much below eval's for pruned candidates, 0.01 for dense


class HoldoutEvaluator(FakeEvaluator):
    selection_split = "eval, 1000 images"
    holdout_name = "holdout, 9000 images"

    def __init__(self, space, **kw):
        super().__init__(space, **kw)
        self.splits = []

    def measure(self, requests, done):
        for req in requests:
            self.splits.append((req.split, req.candidate.dense, req.key))
            m = self.metrics(req.device.id, req.candidate, req.key)
            n = 1000
            if req.split == "holdout":
                m["top1"] = round(m["top1"] - (0.01 if req.candidate.dense else HOLDOUT_SHIFT), 4)
                n = 9000
            from host.search.algos.base import DeviceMeasurement

            done(req, DeviceMeasurement(True, m, key=req.key, artifact_sha256="a" * 64, plan_sha256="b" * 64),
                 {"report": {"accuracy": {"split": req.split, "n": n, "top1": m["top1"]}}})


def _search(tmp_path, ev, **kw):
    space = ev.space
    devs = [device()]
    return run(tmp_path, devs, targets_for(devs, "latency_p50_ms=0.6x", drop=5.0), ev, space, **kw)


def test_the_pick_and_dense_are_re_checked_on_the_holdout_and_the_figures_are_theirs(tmp_path):
    ev = HoldoutEvaluator(resnet_like_space())
    res = _search(tmp_path, ev)
    r = res.devices[0]
    assert r.verdict == "met" and r.selection_split == "eval, 1000 images"
    held = [s for s in ev.splits if s[0] == "holdout"]
    assert len(held) == 2 and {dense for _, dense, _ in held} == {True, False}
    assert held[-1][2] == r.chosen["key"]          # the chosen candidate's own artifact, not another
    ho = r.holdout
    dense_eval = next(x for x in r.rows if x["recovery"] == "none" and not x["pruned_fraction"])["top1"]
    pick_eval = r.chosen["top1"]
    assert ho["split"] == "holdout, 9000 images" and ho["images"] == 9000
    assert ho["top1"] == pytest.approx(pick_eval - HOLDOUT_SHIFT, abs=1e-4)
    assert ho["drop_pp"] == pytest.approx(100 * ((dense_eval - 0.01) - (pick_eval - HOLDOUT_SHIFT)), abs=1e-2)
    assert ho["test_images"] == 10_000
    assert ho["test_top1"] == pytest.approx((pick_eval * 1000 + (pick_eval - HOLDOUT_SHIFT) * 9000) / 10_000,
                                            abs=1e-5)
    assert ho["meets_accuracy"] is (ho["drop_pp"] <= 5.0)
    # in the outputs: summary.csv, candidate.json, the JSON document
    row = next(csv.DictReader((tmp_path / "run" / "summary.csv").read_text().splitlines()))
    assert row["selection_split"] == "eval, 1000 images" and float(row["holdout_drop_pp"]) == ho["drop_pp"]
    cand = json.loads((tmp_path / "run" / "local" / "chosen" / "candidate.json").read_text())
    assert cand["holdout"]["test_top1"] == ho["test_top1"]


def test_a_resumed_search_serves_the_holdout_from_the_log(tmp_path):
    ev = HoldoutEvaluator(resnet_like_space())
    first = _search(tmp_path, ev).devices[0].holdout
    ev2 = HoldoutEvaluator(ev.space)
    again = run(tmp_path, [device()], None, ev2, ev.space, resume=True).devices[0].holdout
    assert ev2.splits == [] and again == first


def test_no_holdout_data_is_said_and_no_holdout_option_skips_it(tmp_path):
    r = _search(tmp_path, FakeEvaluator(resnet_like_space())).devices[0]
    assert r.holdout["split"] is None and "no hold-out" in r.holdout["reason"]
    ev = HoldoutEvaluator(resnet_like_space())
    r = _search(tmp_path, ev, name="off", holdout=False).devices[0]
    assert r.holdout is None and all(s[0] == "eval" for s in ev.splits)


def test_summarise_flags_a_pick_that_fails_the_bound_on_the_holdout():
    recs = [{"metrics": {"top1": 0.93}, "report": {"accuracy": {"n": 1000}}},
            {"metrics": {"top1": 0.925}, "report": {"accuracy": {"n": 1000}}}]
    got = [{"metrics": {"top1": 0.93}, "accuracy": {"n": 9000}}, {"metrics": {"top1": 0.915}, "accuracy": {"n": 9000}}]
    out = sho.summarise("holdout, 9000 images", recs, got, {"max_drop_pp": 1.0})
    assert out["drop_pp"] == pytest.approx(1.5) and out["meets_accuracy"] is False
    assert out["test_drop_pp"] == pytest.approx(100 * (0.93 - (0.925 * 0.1 + 0.915 * 0.9)), abs=1e-3)
    r = DeviceResult("local", "met", "", "", {"max_drop_pp": 1.0}, {"key": "k"}, None, 2, 2, 0, 0, [],
                     holdout=out)
    assert "OVER the accuracy bound here" in cli_search._holdout_line(r)
    r.verdict = "infeasible"
    assert "OVER" not in cli_search._holdout_line(r) and "drop 1.50 pp" in cli_search._holdout_line(r)


def test_the_holdout_split_is_the_rest_of_the_test_set():
    if data._full(data.TEST_FILE) is None:
        pytest.skip("the full CIFAR-10 test set is not in the data folder")
    ev, ho = data.eval_split(100), data.holdout_split(100)
    assert ho is not None and len(ev) == 1000 and len(ho) == 9000
    full = data.eval_split(None)
    key = lambda imgs: {bytes(x) for x in imgs.reshape(len(imgs), -1)}   # noqa: E731
    assert not key(ev.images) & key(ho.images) and len(key(ev.images) | key(ho.images)) == len(key(full.images))
    assert (sorted(ev.labels.tolist() + ho.labels.tolist()) == sorted(full.labels.tolist()))
    assert data.holdout_split(None) is None


@pytest.mark.parametrize("argv,budget,probe,holdout,distill", [
    ([], DEFAULT_BUDGET_MINUTES, "short", True, 0.5),
    (["--budget-minutes", "0"], None, "full", True, 0.0),
    (["--budget-minutes", "12", "--distill", "0"], 12.0, "short", True, 0.0),
    (["--finetune-epochs", "3"], None, "full", True, 0.0),
    (["--finetune-per-class", "full"], None, "full", True, 0.0),
    (["--probe-recovery", "full"], None, "full", True, 0.0),
    (["--probe-recovery", "none"], DEFAULT_BUDGET_MINUTES, "none", True, 0.5),
    (["--algo", "netadapt"], None, "full", True, 0.0),
    (["--no-holdout"], DEFAULT_BUDGET_MINUTES, "short", False, 0.5),
])
def test_the_cli_defaults_to_a_budgeted_search_with_short_probes(argv, budget, probe, holdout, distill):
    args = build_parser().parse_args(["search", "--model", "resnet20", *argv])
    opts = cli_search._search_options(args)
    assert opts.budget_minutes == budget and opts.algo_options.probe_recovery == probe and opts.holdout is holdout
    assert opts.recovery.distill == distill and opts.short_recovery.distill == 0.0


def test_the_candidates_table_says_each_recovery_its_time_and_images(tmp_path):
    from rich.console import Console

    ev = HoldoutEvaluator(resnet_like_space())
    r = _search(tmp_path, ev).devices[0]
    for row in r.rows:
        if row["pruned_fraction"]:
            row.update(recovery_s=42.0, images_seen=12_345, recovery_precision="bf16")
    con = Console(width=200, record=True)
    con.print(cli_search._candidates_table(r))
    text = con.export_text()
    assert "chosen on eval, 1000 images" in text and "12,345" in text and "42 s" in text and "chosen" in text
    assert "full, bf16" in text
