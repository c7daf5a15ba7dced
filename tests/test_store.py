"""The results store on SQLite and on a real PostgreSQL server: writes, idempotence, two writers, a killed
writer, bad --db values, the `results` command and the run ids of demo/bench/search."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from edgeprune.errors import UsageError
from host.results import frames as results
from host.results.store import Store, StoreError, resolve_url

from .test_demo import edgeprune

PG_ENV = "EDGEPRUNE_TEST_PG"
PG_DEFAULT = "postgresql:///postgres?host=/var/run/postgresql"


def _pg_admin_url():
    """The PostgreSQL server the tests use: EDGEPRUNE_TEST_PG (.ci/run sets it; then it must work), else the
    local server's socket if one is running, else None."""
    from sqlalchemy import create_engine, text

    url = os.environ.get(PG_ENV) or PG_DEFAULT
    try:
        eng = create_engine(resolve_url(url), isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return url
    except Exception as e:  # noqa: BLE001 - any failure to reach it
        if os.environ.get(PG_ENV):
            pytest.fail(f"{PG_ENV}={url} is set but PostgreSQL is not reachable: {e}")
        return None


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    """A fresh, empty results database URL on each backend (PostgreSQL: a new database, dropped afterwards)."""
    if request.param == "sqlite":
        yield str(tmp_path / "results.db")
        return
    admin = _pg_admin_url()
    if admin is None:
        pytest.skip(f"no PostgreSQL server (set {PG_ENV}; .ci/run starts one)")
    from sqlalchemy import create_engine, text

    name = "ep_test_" + uuid.uuid4().hex[:12]
    eng = create_engine(resolve_url(admin), isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    url = resolve_url(admin).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with eng.connect() as c:
            c.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        eng.dispose()


def report(job_id="j", p50=1.0, samples=(1.0, 1.1, 0.9), status="ok", top1=0.9):
    r = {"job_id": job_id, "status": status, "warnings": ["power is modelled"],
         "identity": {"device_id": "d", "hostname": "h", "os": "Linux", "kernel": "6.1", "machine": "x86_64",
                      "cpu_model": "cpu", "cpu_count": 2, "python": "3.11", "agent_version": "1",
                      "runtime": "onnxruntime", "runtime_version": "1.32.0", "firmware": {"l4t": "36.3.0"}},
         "timing": {"latency_ms": {"median": p50, "p90": p50 * 1.1, "p99": p50 * 1.2, "mean": p50, "std": 0.1,
                                   "cv": 0.1, "min": 0.8, "max": 1.3},
                    "samples_ms": list(samples), "batch_size": 1, "iterations": len(samples),
                    "throughput_ips": 1000 / p50, "protocol": {"threads": 1}},
         "power": {"source": "model", "modelled": True, "mean_w": 10.0, "energy_mj_per_inference": 10 * p50,
                   "sample_hz": 20, "samples": 10},
         "accuracy": {"split": "eval", "n": 1000, "top1": top1, "top5": 0.99}}
    if status != "ok":
        r.update(timing=None, power=None, accuracy=None, error={"type": "RuntimeError", "message": "boom"})
    return r


MANIFEST = {"sha256": "a" * 64, "format": "onnx", "model": "resnet20", "file": "r20.onnx"}


def test_round_trip_idempotent_keys_and_frames(db):
    with Store(db) as s:
        s.start_run("r1", "bench", command=["edgeprune", "bench"], provenance={"git": {"sha": "abc"}})
        s.add_device("r1", "d1", device_class="jetson", config={"id": "d1", "ssh": {"password": "hunter2"}})
        i = s.record_measurement("r1", "d1", device_id="d1", report=report(), manifest=MANIFEST, model="resnet20",
                                 label="onnx", job={"runtime": {"name": "onnxruntime", "threads": 2}})
        assert s.record_measurement("r1", "d1", device_id="d1", report=report(), manifest=MANIFEST) == i
        with pytest.raises(StoreError, match="different result"):
            s.record_measurement("r1", "d1", device_id="d1", report=report(p50=2.0), manifest=MANIFEST)
        s.record_measurement("r1", "d2", device_id="d2", report=report(status="error"), manifest=MANIFEST)
        s.finish_run("r1", summary={"rows": 2})
        run = s.run("r1")
        assert run["status"] == "complete" and run["provenance"]["git"]["sha"] == "abc"
        [listed] = s.list_runs()
        assert (listed["measurements"], listed["devices"]) == (2, 2)
        df = s.measurements_frame("r1")
        assert list(df["device_id"]) == ["d1", "d2"] and list(df["status"]) == ["ok", "error"]
        row = df.iloc[0]
        assert (row.latency_p50_ms, row.threads, row.runtime_version, row.top1, row.energy_mj) == \
            (1.0, 2, "1.32.0", 0.9, 10.0)
        assert bool(row.power_modelled) and row.model == "resnet20" and row.label == "onnx"
        assert "boom" in df.iloc[1].error
        full = s.measurements("r1")[0]
        assert full["samples_ms"] == [1.0, 1.1, 0.9] and full["report"]["identity"]["firmware"] == {"l4t": "36.3.0"}
        assert s.artifact("a" * 64)["manifest"]["file"] == "r20.onnx"
        devs = {d["device_id"]: d for d in s.devices("r1")}
        assert devs["d1"]["identity"]["kernel"] == "6.1" and devs["d1"]["device_class"] == "jetson"
        with pytest.raises(StoreError, match="--run-id: 'r1' is already"):
            s.start_run("r1", "demo", command=[], provenance={})
        with pytest.raises(StoreError, match="RUN: no run 'nope'"):
            s.run("nope")


def test_recorder_finishes_failed_and_interrupted_runs_and_scrubs_secrets(db):
    from host.results.store import RunRecorder

    s = Store(db)
    with pytest.raises(RuntimeError):
        with RunRecorder(s, "f1", "bench", command=[], provenance={}) as rec:
            rec.device({"id": "d1", "class": "pi", "ssh": {"key_passphrase": "x", "host": "pi.lan"}})
            raise RuntimeError("the fleet file vanished")
    with pytest.raises(KeyboardInterrupt):
        with RunRecorder(s, "i1", "demo", command=[], provenance={}):
            raise KeyboardInterrupt
    assert s.run("f1")["status"] == "failed" and "vanished" in s.run("f1")["error"]
    assert s.run("i1")["status"] == "interrupted"
    [dev] = s.devices("f1")
    assert dev["config"]["ssh"] == {"key_passphrase": "<redacted>", "host": "pi.lan"}
    s.close()


WRITER = textwrap.dedent("""
    import sys
    from host.results.store import Store
    from tests.test_store import report, MANIFEST
    db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = Store(db)
    try:
        s.start_run("shared", "bench", command=[], provenance={})
    except Exception:
        pass                                  # the other writer created it
    for i in range(n):
        s.record_measurement("shared", f"{who}-{i}", device_id=who, report=report(job_id=f"{who}-{i}", p50=1 + i),
                             manifest=MANIFEST)
        s.record_evaluation("shared", who, f"k{i}", {"i": i}, ok=True)
        print(i, flush=True)
""")


def test_two_processes_writing_at_once_lose_nothing(db, tmp_path):
    Store(db).close()   # schema created once; the writers race on the rows, not the DDL
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    n = 40
    procs = [subprocess.Popen([sys.executable, str(script), db, who, str(n)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd()) for who in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    with Store(db) as s:
        keys = sorted(m["key"] for m in s.measurements("shared"))
        assert keys == sorted(f"{w}-{i}" for w in "ab" for i in range(n))
        evals = s.evaluations("shared")
        assert len(evals) == 2 * n
        for w in "ab":   # each writer's evaluation numbers are 1..n with none lost or doubled
            assert sorted(e["seq"] for e in evals if e["device_id"] == w) == list(range(1, n + 1))


KILLED = textwrap.dedent("""
    import sys
    from host.results.store import RunRecorder, Store
    from tests.test_store import report, MANIFEST
    s = Store(sys.argv[1])
    with RunRecorder(s, "killed", "bench", command=[], provenance={}) as rec:
        i = 0
        while True:
            rec.measurement(f"m{i}", device_id="d", report=report(job_id=f"m{i}", samples=[1.0] * 5000),
                            manifest=MANIFEST)
            print(i, flush=True)
            i += 1
""")


def test_a_killed_writer_leaves_what_completed_and_nothing_half_written(db, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    p = subprocess.Popen([sys.executable, str(script), db], stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()), cwd=os.getcwd())
    seen = []
    for line in p.stdout:
        seen.append(int(line))
        if len(seen) >= 5:
            break
    p.send_signal(signal.SIGKILL)        # very likely inside the next transaction
    p.wait(timeout=30)
    p.stdout.close()
    with Store(db) as s:
        rows = s.measurements("killed")
        assert len(rows) >= len(seen)    # everything it said was recorded is there
        assert [r["key"] for r in rows] == [f"m{i}" for i in range(len(rows))]
        assert all(r["status"] == "ok" and len(r["samples_ms"]) == 5000 and r["report"]["timing"] for r in rows)
        assert s.run("killed")["status"] == "interrupted"   # running, and its process is gone
        assert s.list_runs()[0]["status"] == "interrupted"


def test_db_urls_and_their_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEPRUNE_DB", raising=False)
    assert resolve_url(None).database == "results/edgeprune.db"
    assert resolve_url(str(tmp_path / "x.db")).get_backend_name() == "sqlite"
    assert resolve_url("postgresql://u:secret@h/db").drivername == "postgresql+psycopg"
    monkeypatch.setenv("EDGEPRUNE_DB", str(tmp_path / "env.db"))
    assert resolve_url(None).database == str(tmp_path / "env.db")
    with pytest.raises(UsageError, match="--db: .*unsupported database 'mysql'"):
        resolve_url("mysql://u@h/db")
    with pytest.raises(UsageError, match="in-memory"):
        resolve_url("sqlite://")
    monkeypatch.setenv("EDGEPRUNE_DB", "oracle://x/y")
    with pytest.raises(UsageError, match="EDGEPRUNE_DB: .*unsupported"):
        resolve_url(None)
    with pytest.raises(StoreError, match="--db: cannot open the results database") as e:
        Store("postgresql://nobody:pw@127.0.0.1:9/none")
    assert "pw" not in str(e.value)
    with pytest.raises(StoreError, match="no results database there"):
        Store(str(tmp_path / "absent.db"), create=False)


def test_results_command_list_and_export(tmp_path):
    db = str(tmp_path / "r.db")
    with Store(db) as s:
        s.start_run("r1", "bench", command=[], provenance={})
        s.record_measurement("r1", "d1", device_id="d1", report=report(), manifest=MANIFEST)
        s.record_measurement("r1", "d2", device_id="d2", report=report(p50=2.0), manifest=MANIFEST)
        s.finish_run("r1")
    r = edgeprune("results", "list", "--json", "--db", db)
    assert r.returncode == 0, r.stderr
    [run] = json.loads(r.stdout)
    assert (run["run_id"], run["status"], run["measurements"]) == ("r1", "complete", 2)
    r = edgeprune("results", "export", "r1", "--format", "csv", "-o", str(tmp_path / "r1.csv"), "--db", db)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    df = pd.read_csv(tmp_path / "r1.csv")
    assert list(df["latency_p50_ms"]) == [1.0, 2.0] and "samples_ms" not in df
    r = edgeprune("results", "export", "r1", "--samples", "-o", str(tmp_path / "r1.parquet"), "--db", db)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(tmp_path / "r1.parquet")
    assert list(df["samples_ms"][0]) == [1.0, 1.1, 0.9] and json.loads(df["report"][1])["status"] == "ok"
    assert results.measurements("r1", db)["device_id"].tolist() == ["d1", "d2"]
    assert results.runs(db)["run_id"].tolist() == ["r1"]
    for args, match in [(("results", "export", "nope", "--db", db), "RUN: no run 'nope'"),
                        (("results", "export", "r1", "--format", "xlsx", "--db", db), "--format"),
                        (("results", "list", "--db", str(tmp_path / "none.db")), "--db: .*no results database")]:
        r = edgeprune(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert __import__("re").search(match, r.stderr), r.stderr


@pytest.mark.slow
def test_killed_demo_keeps_completed_measurements(tmp_path):
    """The real command: `edgeprune demo` SIGKILLed after its second measurement reached the store."""
    db = str(tmp_path / "r.db")
    cmd = [sys.executable, "-m", "host.cli", "demo", "--quick", "--no-recovery", "--run-id", "d1", "--db", db,
           "--out", str(tmp_path / "demo")]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 300
    n = 0
    while time.monotonic() < deadline and p.poll() is None:
        try:
            with Store(db, create=False) as s:
                n = len(s.measurements("d1"))
        except StoreError:
            n = 0
        if n >= 2:
            p.kill()
            break
        time.sleep(0.05)
    p.wait(timeout=60)
    err = p.stderr.read()
    p.stderr.close()
    assert n >= 2, f"demo ended before its second measurement: {err[-2000:]}"
    with Store(db) as s:
        rows = s.measurements("d1")
        assert 2 <= len(rows) < 4
        assert [r["label"] for r in rows] == ["ratio 0", "ratio 0.3", "ratio 0.5"][: len(rows)]
        assert all(r["status"] == "ok" and r["samples_ms"] and r["report"]["accuracy"] for r in rows)
        assert s.run("d1")["status"] == "interrupted"
    r = edgeprune("demo", "--quick", "--no-recovery", "--run-id", "d1", "--db", db, cwd=tmp_path)
    assert r.returncode == 2 and "--run-id: 'd1' is already" in r.stderr
