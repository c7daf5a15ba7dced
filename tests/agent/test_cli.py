"""The command line: exit codes 0/1/2, one-line errors naming file and field, atomic reports, import hygiene."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, List

import pytest

from agent import __version__, cli
from agent.schema import loads_report

from .conftest import imports_of_job

REPO = Path(__file__).resolve().parents[2]
MakeJob = Callable[..., Path]


def test_run_ok_writes_the_report_atomically(job_dir: MakeJob, capsys: pytest.CaptureFixture) -> None:
    job = job_dir()
    out = job.parent / "report.json"
    out.write_text("old")
    assert cli.main(["run", str(job), "--out", str(out)]) == 0
    report = loads_report(out.read_text())
    assert report.status == "ok" and report.accuracy is not None and report.accuracy.top1 == 0.5
    assert [p.name for p in job.parent.iterdir() if p.name.startswith(".")] == []  # no temp file left
    assert capsys.readouterr().err == ""


def test_run_without_out_prints_the_report(job_dir: MakeJob, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["run", str(job_dir(lambda d: d.update(eval=None)))]) == 0
    assert loads_report(capsys.readouterr().out).status == "ok"


def test_failed_job_exits_1_with_an_error_report(job_dir: MakeJob, capsys: pytest.CaptureFixture) -> None:
    job = job_dir(lambda d: d["artifact"].update(sha256="0" * 64))
    out = job.parent / "report.json"
    assert cli.main(["run", str(job), "--out", str(out)]) == 1
    report = loads_report(out.read_text())
    assert report.status == "error" and report.error is not None and report.error.type == "ArtifactError"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "artifact sha256 mismatch" in err and str(job) in err


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["runtime"].update(threads="4"), "runtime.threads: must be an integer"),
    (lambda d: d["timing"].update(warmup=3), "timing.warmup: unknown field"),
    (lambda d: d.update(schema_version=7), "schema_version: job spec version 7 is not supported"),
    (lambda d: d["runtime"].update(name="coreml"), "runtime.name: unknown runtime 'coreml'"),
    (lambda d: d["power"].update(max_w=None), "power.idle_w: power.idle_w and power.max_w are required"),
])
def test_bad_job_spec_exits_2_naming_file_and_field(job_dir: MakeJob, capsys: pytest.CaptureFixture,
                                                    edit: Callable[[Any], None], message: str) -> None:
    job = job_dir(edit)
    out = job.parent / "report.json"
    assert cli.main(["run", str(job), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("%s: %s" % (job, message)) and err.count("\n") == 1
    assert not out.exists()


def test_unreadable_job_and_missing_out_folder_exit_2(job_dir: MakeJob, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["run", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: cannot read job spec" in capsys.readouterr().err
    assert cli.main(["run", str(job_dir()), "--out", str(tmp_path / "no" / "r.json")]) == 2
    assert "--out: folder" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture) -> None:
    for argv in ([], ["frobnicate"], ["run"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    capsys.readouterr()


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == "agent " + __version__


def test_probe_json(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["probe", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["agent_version"] == __version__ and "onnxruntime" in info["runtimes"]
    assert cli.main(["probe"]) == 0
    assert "agent_version:" in capsys.readouterr().out


def test_failed_write_leaves_the_old_report_and_no_temp_file(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "report.json"
    out.write_text("old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(cli.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cli.write_atomic(out, "new")
    assert out.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["report.json"]


def run_py(args: List[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable] + args, capture_output=True, text=True, cwd=str(cwd), timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_python_dash_m_agent_exit_codes(job_dir: MakeJob) -> None:
    job = job_dir()
    r = run_py(["-m", "agent", "run", str(job), "--out", str(job.parent / "r.json")], job.parent)
    assert r.returncode == 0, r.stderr
    assert loads_report((job.parent / "r.json").read_text()).status == "ok"
    job.write_text(job.read_text().replace('"threads": 1', '"threads": "one"'))
    r = run_py(["-m", "agent", "run", str(job)], job.parent)
    assert r.returncode == 2 and r.stderr.strip() == "%s: runtime.threads: must be an integer" % job


def test_running_a_job_imports_no_host_side_packages(job_dir: MakeJob) -> None:
    assert imports_of_job(job_dir(), "onnxruntime") == {"rc": 0, "bad": [], "runtime_loaded": True}
