"""`edgeprune bench` and `edgeprune devices` through the console command, on a fleet of local devices."""
from __future__ import annotations

import csv
import io
import json

import pytest

from .test_demo import edgeprune

FAST_TIMING = "timing: {min_iters: 10, min_duration_s: 0.1, warmup_s: 0.0, warmup_iters: 1}\n"


@pytest.fixture
def fleet_dir(tmp_path):
    d = tmp_path / "fleet"
    d.mkdir()
    for name in ("bench-a", "bench-b"):
        (d / f"{name}.yaml").write_text(f"id: {name}\nclass: local\ncache_dir: {tmp_path / ('cache-' + name)}\n" + FAST_TIMING)
    return d


def test_bench_on_two_devices_records_a_run(tmp_path, fleet_dir):
    r = edgeprune("bench", "--model", "resnet20", "--fleet", str(fleet_dir), "--run-id", "run-1", "--threads", "1",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "run id: run-1" in r.stdout
    out = tmp_path / "results" / "runs" / "run-1"
    rows = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [x["device"] for x in rows] == ["bench-a", "bench-b"]
    assert all(x["status"] == "ok" and float(x["accuracy_top1"]) == pytest.approx(0.923) for x in rows)
    assert json.loads((out / "run.json").read_text())["devices"] == ["bench-a", "bench-b"]
    state = json.loads((tmp_path / "results" / "fleet-state.json").read_text())
    assert state["bench-a"]["health"] == "good"


def test_bench_device_filter_and_artifact_folder(tmp_path, fleet_dir):
    r = edgeprune("bench", "--model", "resnet20", "--fleet", str(fleet_dir), "--devices", "bench-b", "--run-id", "r0",
                  cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    art = tmp_path / "results" / "runs" / "r0"   # holds resnet20.onnx + resnet20.manifest.json: benchmark it again
    art_dir = tmp_path / "art"
    art_dir.mkdir()
    for f in ("resnet20.onnx", "resnet20.manifest.json"):
        (art_dir / f).write_bytes((art / f).read_bytes())
    r = edgeprune("bench", "--model", str(art_dir), "--fleet", str(fleet_dir), "--devices", "bench-a",
                  "--run-id", "r1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (art_dir / "resnet20.onnx").write_bytes(b"tampered")
    r = edgeprune("bench", "--model", str(art_dir), "--fleet", str(fleet_dir), cwd=tmp_path)
    assert r.returncode == 2 and "sha256 does not match its manifest" in " ".join(r.stderr.split())


def test_bench_folder_with_several_manifests_needs_one_named(tmp_path, fleet_dir):
    art = tmp_path / "art"      # export() writes one manifest per format of a tag into one folder
    art.mkdir()
    for name in ("r20.onnx.manifest.json", "r20.openvino.manifest.json"):
        (art / name).write_text("{}")
    r = edgeprune("bench", "--model", str(art), "--fleet", str(fleet_dir), cwd=tmp_path)
    err = " ".join(r.stderr.split())
    assert r.returncode == 2 and "holds 2 manifests (r20.onnx.manifest.json, r20.openvino.manifest.json); " \
        f"name one: --model {art / 'r20.onnx.manifest.json'}" in err, r.stdout + r.stderr


@pytest.mark.parametrize("args,match", [
    (["--devices", "nope"], "--devices: nope not in the fleet (has: bench-a, bench-b)"),
    (["--run-id", "a b;c"], "--run-id: 'a b;c' must match"),
    (["--threads", "0"], "--threads: must be >= 1"),
])
def test_bench_bad_arguments(tmp_path, fleet_dir, args, match):
    r = edgeprune("bench", "--model", "resnet20", "--fleet", str(fleet_dir), *args, cwd=tmp_path)
    assert r.returncode == 2 and match in " ".join(r.stderr.split()), r.stdout + r.stderr


def test_devices_check_and_list(tmp_path, fleet_dir):
    (fleet_dir / "zz-gone.yaml").write_text("id: zz-gone\npython: /nonexistent/python3\n")
    r = edgeprune("devices", "check", "--fleet", str(fleet_dir), "--json", cwd=tmp_path)
    assert r.returncode == 1
    got = json.loads(r.stdout)
    assert got["bench-a"]["health"] == "good" and got["zz-gone"]["health"] == "bad"
    r = edgeprune("devices", "list", "--fleet", str(fleet_dir), cwd=tmp_path)
    assert r.returncode == 0 and "zz-gone" in r.stdout and "bad" in r.stdout
