"""`edgeprune search` on the command line: arguments, exit codes, the final table, resume; the algorithms behind it
against the fake evaluator of test_search (fast), and once for real on the local device (slow)."""
from __future__ import annotations

import json

import pytest

from host import cli
from host import search as hs

from .test_search import FakeEvaluator, resnet_like_space

FAST_TIMING = "timing: {min_iters: 10, min_duration_s: 0.1, warmup_s: 0.0, warmup_iters: 1}\n"


@pytest.fixture
def fleet(tmp_path):
    d = tmp_path / "fleet"
    d.mkdir()
    for name, align in (("dev-a", 1), ("dev-b", 8)):
        (d / f"{name}.yaml").write_text(f"id: {name}\nclass: local\nround_to: {align}\n"
                                        f"cache_dir: {tmp_path / ('cache-' + name)}\n" + FAST_TIMING)
    return d


@pytest.fixture
def fake(monkeypatch):
    """Replace the model and the devices with the fake space and evaluator; count the evaluator's calls."""
    space = resnet_like_space()
    made = []
    real = hs._execute

    def execute(folder, run_id, opts, devices, targets, events, _space, _evaluator, recorder=None):
        ev = FakeEvaluator(space)
        made.append(ev)
        return real(folder, run_id, opts, devices, targets, events, space, ev, recorder)

    monkeypatch.setattr(hs, "_execute", execute)
    return made


def search(*args, capsys):
    code = cli.main(["search", *args])
    out, err = capsys.readouterr()
    return code, " ".join(out.split()), " ".join(err.split())


@pytest.mark.parametrize("args,match", [
    ([], "--model: required (or --resume RUN_ID)"),
    (["--model", "resnet20", "--target", "speed=3", "--max-accuracy-drop", "1"], "--target: unknown metric 'speed'"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x"], "--max-accuracy-drop: no maximum accuracy drop for "
                                                                 "device local"),
    (["--model", "resnet20", "--max-accuracy-drop", "1"], "--target: no latency, throughput, power, energy or memory "
                                                          "target for device local"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "-2"],
     "--max-accuracy-drop: accuracy_drop_pp: must be in [0, 100)"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "1", "--algo", "sa"],
     "--algo: unknown algorithm 'sa'; known: bisect, netadapt"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "1", "--max-evals", "0"],
     "--max-evals: must be >= 1"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "1", "--allocation", "x"],
     "--allocation: 'sensitivity' or 'uniform'"),
    (["--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "1", "--run-id", "a b"],
     "--run-id: 'a b' must match"),
    (["--resume", "r1", "--target", "latency_p50_ms=1"], "--resume: continues with the run's stored options; drop "
                                                         "--target"),
    (["--resume", "r1", "--model", "resnet20", "--quick"], "drop --model, --quick"),
])
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    code, out, err = search(*args, capsys=capsys)
    assert code == 2 and match in err, (code, out, err)
    assert not (tmp_path / "results").exists()


def test_resume_of_an_unknown_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = search("--resume", "nope", capsys=capsys)
    assert code == 2 and "--resume: results/search/nope/search.json not found" in err


def test_devices_and_scoped_targets_from_a_fleet(tmp_path, monkeypatch, capsys, fleet, fake):
    monkeypatch.chdir(tmp_path)
    code, out, err = search("--model", "resnet20", "--fleet", str(fleet), "--target", "dev-a:latency_p50_ms=0.5x",
                            "--target", "dev-b:latency_p50_ms=0.7x", "--max-accuracy-drop", "5", "--run-id", "r1",
                            capsys=capsys)
    assert code == 0, out + err
    assert "search run id: r1 (continue an interrupted run with: edgeprune search --resume r1)" in out
    assert "edgeprune search (bisect) — run r1" in out and out.count(" met ") >= 2
    run = tmp_path / "results" / "search" / "r1"
    assert {d["id"]: d["round_to"] for d in json.loads((run / "search.json").read_text())["devices"]} == \
        {"dev-a": 1, "dev-b": 8}
    assert (run / "dev-a" / "chosen" / "candidate.json").is_file()
    assert (run / "dev-b" / "chosen" / "candidate.json").is_file()
    n = len((run / hs.EVALUATIONS).read_text().splitlines())
    code, out, err = search("--resume", "r1", capsys=capsys)           # finished: served from the store
    assert code == 0 and fake[-1].calls == [] and "(from the store)" in out
    assert len((run / hs.EVALUATIONS).read_text().splitlines()) == n
    code, _, err = search("--model", "resnet20", "--fleet", str(fleet), "--devices", "zz", "--target",
                          "latency_p50_ms=1", "--max-accuracy-drop", "1", capsys=capsys)
    assert code == 2 and "--devices: zz not in the fleet" in err


def test_infeasible_exits_1_with_closest_in_the_table(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "o"
    code, out, err = search("--model", "resnet20", "--target", "latency_p50_ms=0.1x", "--max-accuracy-drop", "5",
                            "--out", str(out_dir), "--run-id", "inf", capsys=capsys)
    assert code == 1, out + err
    assert "infeasible (closest shown)" in out and f"{out_dir / 'local' / 'closest'}" in out
    assert "(continue an interrupted run with: edgeprune search --resume inf --out " in out
    assert json.loads((out_dir / "local" / "result.json").read_text())["verdict"] == "infeasible"


def test_interrupt_prints_how_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    space = resnet_like_space()
    real = hs._execute
    monkeypatch.setattr(hs, "_execute", lambda f, r, o, d, t, e, s, v, rec: real(
        f, r, o, d, t, e, space, FakeEvaluator(space, crash_after=1), rec))
    code, out, err = search("--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "5",
                            "--run-id", "ctrl-c", capsys=capsys)
    assert code == 130
    assert "search interrupted; completed evaluations are in results/search/ctrl-c/evaluations.jsonl; continue " \
           "with: edgeprune search --resume ctrl-c" in out
    assert len((tmp_path / "results" / "search" / "ctrl-c" / hs.EVALUATIONS).read_text().splitlines()) == 1
    # the results store (default results/edgeprune.db) has that one evaluation, and the run says interrupted
    from host.store import Store

    with Store("results/edgeprune.db", create=False) as s:
        assert s.run("ctrl-c")["status"] == "interrupted"
        assert [e["seq"] for e in s.evaluations("ctrl-c")] == [1] and len(s.measurements("ctrl-c")) == 1


@pytest.mark.slow
def test_search_cli_end_to_end_on_the_local_device(tmp_path, monkeypatch, capsys):
    """The real path through the console entry point: ResNet-20, quick timing, BN recalibration only."""
    monkeypatch.chdir(tmp_path)
    # 8-channel alignment: unaligned widths are erratic on x86 CPUs (bench/RESULTS.md), too noisy for a test
    (tmp_path / "fleet8").mkdir()
    (tmp_path / "fleet8" / "local8.yaml").write_text(f"id: local8\nclass: local\nround_to: 8\ncache_dir: "
                                                     f"{tmp_path / 'dc'}\n")
    code, out, err = search("--model", "resnet20", "--fleet", str(tmp_path / "fleet8"), "--target",
                            "latency_p50_ms=0.8x", "--max-accuracy-drop", "60", "--quick", "--allocation", "uniform",
                            "--finetune-epochs", "0", "--eval-per-class", "20", "--max-evals", "6", "--run-id", "real",
                            "--cache-dir", str(tmp_path / "cache"), capsys=capsys)
    assert code == 0, out + err
    assert "edgeprune search (bisect) — run real" in out and " met " in out
    chosen = tmp_path / "results" / "search" / "real" / "local8" / "chosen"
    assert (chosen / "report.json").is_file() and list(chosen.glob("*.onnx"))
