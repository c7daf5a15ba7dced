"""The release gate on real measurements: `edgeprune bench` on the local device recorded in the store, then
`edgeprune regress`. A/A (the same artifact measured again) must pass every time; A/B with a real slowdown (the
runtime given 1 thread instead of 2) must fail with exit 1 and a JUnit failure."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from edgeprune import data, export
from host.store import Store

from .test_demo import edgeprune


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, resnet20):
    d = tmp_path_factory.mktemp("gate")
    ev = data.eval_split(2)
    man = export.export_onnx(resnet20[0], d / "r20.onnx", check_inputs=data.to_tensor_batch(ev.images),
                             model_name="resnet20", source_checkpoint_sha256=resnet20[1]["sha256"],
                             pruning_plan_sha256="")
    return man.write(d / "r20.manifest.json")


def bench(tmp_path, db, manifest, run_id, threads):
    r = edgeprune("bench", "--model", str(manifest), "--quick", "--threads", str(threads), "--run-id", run_id,
                  "--db", db, "--out", str(tmp_path / run_id), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert f"run id: {run_id}" in r.stdout


def test_aa_passes_repeatedly_and_a_real_slowdown_fails(tmp_path, artifact):
    db = str(tmp_path / "gate.db")
    bench(tmp_path, db, artifact, "base", 1)
    for i in range(3):                               # A/A: no false alarm across repeated trials
        bench(tmp_path, db, artifact, f"again{i}", 1)
        r = edgeprune("regress", "--baseline", "base", "--candidate", f"again{i}", "--db", db)
        assert r.returncode == 0, r.stdout + r.stderr
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the A/B half needs 2 CPUs (2 runtime threads against 1)")
    bench(tmp_path, db, artifact, "two-threads", 2)
    bench(tmp_path, db, artifact, "one-thread", 1)
    with Store(db) as s:
        fast = s.measurements("two-threads")[0]["latency_p50_ms"]
        slow = s.measurements("one-thread")[0]["latency_p50_ms"]
    # the precondition of the A/B check, measured rather than assumed: 1 thread really is >= 10 % slower here
    assert slow / fast > 1.10, f"2 threads {fast:.3f} ms vs 1 thread {slow:.3f} ms: no real slowdown on this machine"
    junit = tmp_path / "gate.xml"
    r = edgeprune("regress", "--baseline", "two-threads", "--candidate", "one-thread", "--db", db,
                  "--junit", str(junit))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "threads 2 → 1" in r.stdout                # the change is listed, not refused
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [tc.get("name") for tc in suite.iter("testcase") if tc.find("failure") is not None]
    assert any("latency" in n for n in failed), failed
    assert int(suite.get("failures")) == len(failed) >= 1
    # and the other way round it is an improvement, which passes
    r = edgeprune("regress", "--baseline", "one-thread", "--candidate", "two-threads", "--db", db)
    assert r.returncode == 0, r.stdout + r.stderr
