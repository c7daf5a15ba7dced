"""`edgeprune demo` end to end, through the installed console command, as a user runs it."""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from agent import schema
from edgeprune import data
from host.commands.demo import SUMMARY_COLUMNS

REQUIRED = ["model", "ratio", "macs", "params", "latency_p50_ms", "latency_p90_ms", "accuracy_top1", "power_w",
            "power_source", "energy_mj"]


def edgeprune(*args, env=None, cwd=None, timeout=600):
    exe = shutil.which("edgeprune")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "host.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, resnet20, eval_split):
    # as a user runs it: from some folder, default (relative) output folder results/demo
    r = edgeprune("demo", "--quick", cwd=tmp_path)
    out = tmp_path / "results" / "demo"
    assert r.returncode == 0, r.stderr + r.stdout
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert set(REQUIRED) <= set(SUMMARY_COLUMNS) and set(REQUIRED) <= set(rows[0])
    assert [float(x["ratio"]) for x in rows] == [0.0, 0.3, 0.5, 0.7]
    assert all(x["status"] == "ok" and x["power_source"] == "model" for x in rows)
    macs = [int(x["macs"]) for x in rows]
    assert macs == sorted(macs, reverse=True) and macs[-1] < 0.4 * macs[0]
    dense = float(rows[0]["accuracy_top1"])
    with torch.no_grad():  # the dense row is exactly what the checkpoint scores on the shipped subset in torch
        torch_top1 = float((resnet20[0](data.to_tensor_batch(eval_split.images)).argmax(1).numpy()
                            == eval_split.labels).mean())
    assert dense == pytest.approx(torch_top1, abs=1e-9) and int(rows[0]["eval_n"]) == 1000
    assert 0.90 <= dense <= 0.95  # 92.3 % on these 1,000 images (91.73 % on all 10,000)
    assert all(float(x["accuracy_top1"]) < dense + 0.01 for x in rows[1:])
    # half the block-internal channels is ~2x fewer MACs: the measured median must at least go down (the size of
    # the speed-up is a benchmark's business, bench/pruning_speedup.py, not a timed test's)
    assert float(rows[2]["latency_p50_ms"]) < float(rows[0]["latency_p50_ms"])
    assert float(rows[2]["accuracy_top1"]) > 0.5  # 50 % pruned + short recovery (no recovery: 26 %)
    for x in rows:
        rep = schema.loads_report((out / x["report"]).read_text())  # relative to the output folder
        assert rep.accuracy.n == 1000 and rep.power.modelled
        assert rep.timing.iterations >= 100 and rep.timing.duration_s >= 1.0
        assert float(x["latency_p50_ms"]) == pytest.approx(rep.timing.latency_ms.median, abs=1e-3)
    assert "MODELLED" in r.stdout and "edgeprune demo" in r.stdout
    meta = json.loads((out / "demo.json").read_text())
    assert meta["checkpoint"]["sha256"].startswith("12fca82f")


def test_demo_without_recovery_on_fresh_machine_data(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(__import__("os").environ, EDGEPRUNE_DATA=str(empty))
    out = tmp_path / "d"
    r = edgeprune("demo", "--quick", "--ratios", "0,0.3", "--no-recovery", "--eval-per-class", "20",
                  "--round-to", "8", "--out", str(out), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert len(rows) == 2 and rows[1]["recovery"] == "none" and int(rows[0]["eval_n"]) == 200
    plan = json.loads((out / "artifacts" / "resnet20-r030.plan.json").read_text())
    assert plan["round_to"] == 8 and all(len(layer["keep"]) % 8 == 0 for layer in plan["layers"])
    assert "_assets" in json.loads((out / "demo.json").read_text())["eval"]["source"]


def test_demo_measures_under_the_device_lease(tmp_path):
    from agent import lease

    cache = tmp_path / "cache"
    device = tmp_path / "local.yaml"
    device.write_text(f"id: local\nclass: local\ncache_dir: {cache}\n")
    held = lease.acquire(cache, {"host": "lab-pc", "user": "ci", "pid": 1, "label": "a bench campaign"}, ttl_s=300)
    args = ["demo", "--quick", "--ratios", "0", "--no-recovery", "--eval-per-class", "10", "--device", str(device),
            "--lease-wait", "1", "--db", str(tmp_path / "s.db")]
    r = edgeprune(*args, "--out", str(tmp_path / "busy"), cwd=tmp_path)
    # before, the demo measured beside whatever held the device
    assert r.returncode == 1, r.stdout + r.stderr
    assert "local: leased by ci@lab-pc pid 1 (a bench campaign)" in r.stderr and "waited 1 s" in r.stderr, r.stderr
    assert not (tmp_path / "busy" / "reports" / "resnet20-r000.json").exists()
    lease.release(cache, held["token"])
    r = edgeprune(*args, "--out", str(tmp_path / "free"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "free" / "reports" / "resnet20-r000.json").is_file()
    got = lease.show(cache)
    assert not got["held"] and got["lease"] is None        # taken for the measurements, then released


@pytest.mark.parametrize("args,match", [
    (["--ratios", "0,1.5"], "--ratios: 1.5 is not in [0, 1)"),
    (["--ratios", "a,b"], "argument --ratios: expected comma-separated numbers"),
    (["--model", "vgg16"], "--model: 'vgg16' is neither a built-in model"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--round-to", "0"], "--round-to: must be >= 1"),
    (["--device", "/nonexistent/dev.yaml"], "/nonexistent/dev.yaml: cannot read"),
])
def test_demo_bad_arguments_exit_2_with_one_clear_message(tmp_path, args, match):
    r = edgeprune("demo", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert match in " ".join(r.stderr.split())
    assert not (tmp_path / "o" / "summary.csv").exists()


@pytest.mark.parametrize("runtime,fmt,suffix", [("openvino", "openvino", ".xml"), ("tflite", "tflite", ".tflite")])
def test_demo_on_a_device_file_with_another_runtime_exports_what_it_loads(tmp_path, runtime, fmt, suffix):
    """`class: local` with another runtime: the class's onnxruntime options are not inherited, the candidates are
    exported in the format that runtime loads and measured by it; the title names the device and runtime."""
    pytest.importorskip({"openvino": "openvino", "tflite": "litert_torch"}[runtime])
    device = tmp_path / "ov.yaml"
    device.write_text(f"id: cpu-{runtime}\nclass: local\nruntime: {{name: {runtime}}}\ncache_dir: {tmp_path / 'c'}\n")
    out = tmp_path / "d"
    r = edgeprune("demo", "--quick", "--ratios", "0,0.5", "--no-recovery", "--eval-per-class", "10", "--device",
                  str(device), "--out", str(out), "--db", str(tmp_path / "s.db"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    title = " ".join(r.stdout.split())
    assert f"on device 'cpu-{runtime}' ({runtime}, {fmt}, 1 thread(s))" in title, r.stdout
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [x["status"] for x in rows] == ["ok", "ok"] and int(rows[0]["eval_n"]) == 100
    assert float(rows[0]["agreement"]) == 1.0          # the dense artifact agrees with torch's dense outputs
    for tag in ("resnet20-r000", "resnet20-r050"):
        assert (out / "artifacts" / f"{tag}{suffix}").is_file()
        man = json.loads((out / "artifacts" / f"{tag}.{fmt}.manifest.json").read_text())
        assert man["export_format"] == fmt
        rep = schema.loads_report((out / "reports" / f"{tag}.json").read_text())
        assert rep.identity.runtime == runtime


def test_demo_refuses_a_runtime_precision_it_cannot_export_naming_the_file(tmp_path):
    device = tmp_path / "odd.yaml"
    device.write_text("id: odd\nclass: local\nprecisions: [int8]\n")
    r = edgeprune("demo", "--device", str(device), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{device}: runtime onnxruntime with precision int8: no export format for it" in " ".join(r.stderr.split())
