"""`edgeprune search` on the command line: arguments, exit codes, the final table, resume; the algorithms behind it
against the fake evaluator of test_search (fast), and once for real on the local device (slow)."""
from __future__ import annotations

import json

import pytest

from edgeprune.errors import UsageError
from host import cli
from host.search import options as so
from host.search import run as hs
from host.search import state as sst

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

    def execute(folder, run_id, opts, devices, targets, events, _space, _evaluator, recorder=None, workload=None,
                clock=None, started=None, executor=None):
        ev = FakeEvaluator(space)
        made.append(ev)
        return real(folder, run_id, opts, devices, targets, events, space, ev, recorder, None, clock, started)

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
     "--allocation: one of sensitivity, latency, uniform"),
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
    n = len((run / so.EVALUATIONS).read_text().splitlines())
    code, out, err = search("--resume", "r1", capsys=capsys)           # finished: served from the store
    assert code == 0 and fake[-1].calls == [] and "(from the store)" in out
    assert len((run / so.EVALUATIONS).read_text().splitlines()) == n
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
    monkeypatch.setattr(hs, "_execute", lambda f, r, o, d, t, e, s, v, rec, wl=None, clock=None, started=None, ex=None: real(
        f, r, o, d, t, e, space, FakeEvaluator(space, crash_after=1), rec))
    code, out, err = search("--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "5",
                            "--run-id", "ctrl-c", capsys=capsys)
    assert code == 130
    assert "search interrupted; completed evaluations are in results/search/ctrl-c/evaluations.jsonl; continue " \
           "with: edgeprune search --resume ctrl-c" in out
    assert len((tmp_path / "results" / "search" / "ctrl-c" / so.EVALUATIONS).read_text().splitlines()) == 1
    # the results store (default results/edgeprune.db) has that one evaluation, and the run says interrupted
    from host.results.store import Store

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
    # the final measurement (default 5 runs): 4 speed-only repetitions of the chosen artifact, fresh agent jobs
    assert "local8: final measurement, 5 run(s): p50" in out, out
    cand = __import__("json").loads((chosen / "candidate.json").read_text())
    fin = cand["final"]
    assert fin["repetitions"] == 5 and len(set(fin["run_medians_ms"])) == 5 and "error" not in fin
    evals = [__import__("json").loads(line) for line in
             (tmp_path / "results" / "search" / "real" / "evaluations.jsonl").read_text().splitlines()]
    reps = [e for e in evals if e.get("kind") == "final"]
    assert [e["rep"] for e in reps] == [2, 3, 4, 5] and {e["of"] for e in reps} == {cand["key"]}
    assert all(e["metrics"].get("top1") is None for e in reps)            # speed only: no eval data shipped


# ------------------------------------------------------------------------------------------ user model, user data

SENET = str(__import__("pathlib").Path(__file__).parent / "user_models" / "senet.py") + ":two_head_net"


def _unlabelled_npz(path, n=40, hw=64, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, images=(rng.random((n, hw, hw, 3)) * 255).astype(np.uint8))
    return path


def _calibrated_weights(npz, path):
    """two_head_net with its BatchNorm statistics estimated on the images (as a trained model has them): the search's
    BN recalibration then changes a pruned model, not the dense one's untrained statistics."""
    import numpy as np
    import torch

    from .user_models import senet

    x = torch.from_numpy(np.load(npz)["images"]).permute(0, 3, 1, 2).float() / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    m = senet.two_head_net()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    with torch.no_grad():
        m.train()(x)
    torch.save(m.eval().state_dict(), path)
    return path


def _image_folder(root, per_class=3, hw=40):
    from PIL import Image

    for c, colour in enumerate(((200, 30, 30), (30, 200, 30))):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (hw, hw), tuple(min(255, v + 10 * i) for v in colour)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_unlabelled_data_with_max_accuracy_drop_is_one_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    npz = _unlabelled_npz(tmp_path / "unl.npz", n=8)
    code, out, err = search("--model", SENET, "--input-size", "64", "--data", str(npz), "--target",
                            "latency_p50_ms=0.9x", "--max-accuracy-drop", "1", capsys=capsys)
    assert code == 2 and "--max-accuracy-drop needs labelled eval data; use --min-agreement" in err, (out, err)
    assert not (tmp_path / "results").exists()
    # a user model without any eval data cannot be judged at all
    code, out, err = search("--model", SENET, "--input-size", "64", "--target", "latency_p50_ms=0.9x",
                            "--min-agreement", "0.9", capsys=capsys)
    assert code == 2 and "--data: a search judges every candidate's accuracy on the device and needs eval data" in err
    # label-free bounds are absolute fractions / dB
    code, _, err = search("--model", SENET, "--input-size", "64", "--data", str(npz), "--target",
                          "latency_p50_ms=0.9x", "--min-agreement", "1.5", capsys=capsys)
    assert code == 2 and "--min-agreement: agreement: a fraction in (0, 1]" in err
    assert not (tmp_path / "results").exists()


def test_labelled_folder_passes_the_data_check_and_agreement_works_on_labelled_data_too(tmp_path):
    from host.search import data as search_data
    from host.fleet import targets as tg

    from .test_search import device

    folder = _image_folder(tmp_path / "imgs")
    opts = so.SearchOptions(model=SENET, input_shape=(1, 3, 32, 32), data=str(folder))
    wl = search_data.open_search_workload(opts)
    assert wl.eval.labelled and not wl.reference_path and tuple(wl.input_shape) == (1, 3, 32, 32)
    ts = tg.device_targets([device()], tg.parse_cli(["latency_p50_ms=0.9x"], 1.0, min_agreement=0.9))
    search_data.check_workload(wl, ts)     # labelled: a top-1 drop bound is fine, next to agreement
    assert ts["local"].accuracy_metric == "top1" and ts["local"].min_agreement == 0.9
    assert search_data.source_key(opts) == {"input_shape": [1, 3, 32, 32], "data": str(folder)}


def test_resume_refuses_data_flags_and_json_output_with_the_fake_evaluator(tmp_path, monkeypatch, capsys, fake):
    monkeypatch.chdir(tmp_path)
    code, out, err = search("--model", "resnet20", "--target", "latency_p50_ms=0.5x", "--max-accuracy-drop", "5",
                            "--run-id", "j1", "--json", capsys=capsys)
    assert code == 0, err
    assert out.startswith("{") and out.endswith("}")   # stdout holds the JSON document alone
    doc = json.loads(out)
    assert doc["run_id"] == "j1" and doc["all_met"] is True
    dev = doc["devices"][0]
    assert dev["device"] == "local" and dev["targets_met"] and dev["accuracy_metric"] == "top1"
    assert dev["candidate_kind"] == "chosen" and dev["candidate"]["macs"] > 0
    assert set(dev["candidate"]["metrics"]) >= {"top1", "agreement", "snr_db", "latency_p50_ms", "latency_p90_ms"}
    assert "edgeprune search (bisect)" in err     # the table and progress went to stderr
    code, _, err = search("--resume", "j1", "--data", "x.npz", "--min-agreement", "0.5", capsys=capsys)
    assert code == 2 and "drop --min-agreement, --data" in err


@pytest.mark.slow
def test_user_model_unlabelled_data_min_agreement_on_the_local_device_json_and_resume(tmp_path, monkeypatch, capsys):
    """A MODULE:CALLABLE model (two heads, squeeze-excitation, a grouped conv) at 64x64 with its own weights, an
    unlabelled npz, label-free targets: measured on the local device, reported with agreement; --json names the
    artifacts; --resume restores the model-source and data options and measures nothing again."""
    monkeypatch.chdir(tmp_path)
    npz = _unlabelled_npz(tmp_path / "unl.npz")
    weights = _calibrated_weights(npz, tmp_path / "w.pt")
    (tmp_path / "fleet8").mkdir()
    (tmp_path / "fleet8" / "local8.yaml").write_text(f"id: local8\nclass: local\nround_to: 8\ncache_dir: "
                                                     f"{tmp_path / 'dc'}\n")
    code, out, err = search("--model", SENET, "--weights", str(weights), "--input-size", "64", "--data", str(npz),
                            "--fleet", str(tmp_path / "fleet8"), "--min-agreement", "0.5", "--target",
                            "latency_p50_ms=0.9x", "--quick", "--max-evals", "3", "--run-id", "u1",
                            "--cache-dir", str(tmp_path / "cache"), "--json", capsys=capsys)
    assert code in (0, 1), err
    doc = json.loads(out)
    dev = doc["devices"][0]
    assert dev["accuracy_metric"] == "agreement" and dev["verdict"] in ("met", "infeasible"), dev
    assert dev["bounds"]["min_agreement"] == 0.5 and dev["bounds"]["max_drop_pp"] is None
    cand = dev["candidate"]
    assert cand["metrics"]["top1"] is None and 0.0 <= cand["metrics"]["agreement"] <= 1.0
    assert cand["metrics"]["snr_db"] is not None and cand["metrics"]["latency_p50_ms"] > 0
    assert cand["macs"] > 0 and cand["params"] > 0
    from pathlib import Path

    assert Path(cand["artifact"]).is_file() and Path(cand["manifest"]).is_file()
    assert all(Path(f).is_file() for f in cand["artifact_files"])
    man = json.loads(Path(cand["manifest"]).read_text())
    assert man["input_shape"][1:] == [3, 64, 64]
    run = tmp_path / "results" / "search" / "u1"
    records = [json.loads(x) for x in (run / so.EVALUATIONS).read_text().splitlines()]
    lines = [x for x in records if x["kind"] == "device"]    # besides: dense paired with each candidate
    assert 2 <= len(lines) <= 3
    assert [x["kind"] for x in records].count("paired") == len(lines) - 1
    assert all(x["report"]["accuracy"]["agreement"] is not None and x["report"]["accuracy"]["top1"] is None
               for x in lines)
    assert lines[0]["metrics"]["agreement"] == 1.0    # dense against its own outputs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["devices"][0]["accuracy_metric"] == "agreement"
    assert "agreement" in err   # the table labels the metric
    stored = json.loads((run / "search.json").read_text())
    assert stored["options"]["data"] == str(npz) and stored["options"]["weights"] == str(weights)
    assert stored["options"]["input_shape"] == [1, 3, 64, 64] and stored["workload"]["eval"]["labelled"] is False
    # --resume: the stored model source and data are reopened; everything is served from the store
    code2, out2, err2 = search("--resume", "u1", "--json", capsys=capsys)
    assert code2 in (0, 1) and "(from the store)" in err2, err2
    assert len((run / so.EVALUATIONS).read_text().splitlines()) == len(records)
    doc2 = json.loads(out2)
    assert doc2["devices"][0]["candidate"]["key"] == cand["key"]
    _, opts, _, _ = sst.read_run(run)
    assert opts.data == str(npz) and opts.input_shape == (1, 3, 64, 64) and opts.weights == str(weights)


def test_resume_reopens_the_stored_data_and_refuses_changed_data(tmp_path):
    from host.search import data as search_data
    from host.fleet import targets as tg

    from .test_search import device

    npz = _unlabelled_npz(tmp_path / "unl.npz", n=8)
    opts = so.SearchOptions(model=SENET, input_shape=(1, 3, 64, 64), data=str(npz))
    wl = search_data.open_search_workload(opts)
    tset = tg.device_targets([device()], tg.parse_cli(["latency_p50_ms=1"], None, min_agreement=0.5))
    sst.write_run(tmp_path / "r", "r", opts, [device()], tset, search_data.fingerprint(wl))
    again = hs.open_resumed_workload(tmp_path / "r", sst.read_run(tmp_path / "r")[1])
    assert again.eval.fingerprint == wl.eval.fingerprint and not again.eval.labelled
    _unlabelled_npz(npz, n=8, seed=1)                       # other images under the same path
    with pytest.raises(UsageError, match="--resume: the run's eval data changed since it started"):
        hs.open_resumed_workload(tmp_path / "r", sst.read_run(tmp_path / "r")[1])
