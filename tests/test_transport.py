from __future__ import annotations

import stat
import subprocess
import sys
import time

import psutil
import pytest

from agent import schema
from edgeprune import data, models
from edgeprune.errors import DeviceError
from host.fleet.transport import LocalTransport


def _job(job_inputs, **kw):
    onnx_path, man, shard = job_inputs
    return schema.JobSpec(
        job_id="t1", artifact=schema.ArtifactSpec(path=str(onnx_path), sha256=man.sha256),
        preprocess=schema.PreprocessSpec(scale=data.SCALE, mean=list(data.MEAN), std=list(data.STD)),
        timing=schema.TimingSpec(min_iters=20, min_duration_s=0.2, warmup_s=0.05, warmup_iters=2),
        power=schema.PowerSpec(sensor="model", idle_w=5.0, max_w=15.0),
        eval=schema.EvalSpec(path=str(shard), sha256=models.sha256_file(shard), split="eval"), **kw).validate()


def test_local_transport_runs_the_agent_process(tmp_path, job_inputs):
    report = LocalTransport().run_job(_job(job_inputs), tmp_path / "w")
    assert report.status == "ok", report.error
    assert report.identity.artifact_sha256 == job_inputs[1].sha256
    assert report.timing.iterations >= 20 and report.timing.latency_ms.median > 0
    assert report.accuracy.n == 50 and report.accuracy.top1 >= 0.8
    assert report.power.source == "model" and report.power.modelled
    assert (tmp_path / "w" / "job.json").is_file() and (tmp_path / "w" / "report.json").is_file()


def test_relative_workdir(tmp_path, job_inputs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = LocalTransport().run_job(_job(job_inputs), __import__("pathlib").Path("rel") / "w")
    assert report.status == "ok", report.error
    assert (tmp_path / "rel" / "w" / "report.json").is_file()


def test_tampered_artifact_gives_error_report_not_execution(tmp_path, job_inputs):
    job = _job(job_inputs)
    job.artifact.sha256 = "f" * 64
    report = LocalTransport().run_job(job, tmp_path)
    assert report.status == "error" and "sha256" in report.error.message and report.timing is None


def _fake_python(tmp_path, body: str):
    script = tmp_path / "fake-python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_hung_agent_is_killed_on_timeout(tmp_path, job_inputs):
    pidfile = tmp_path / "pid"
    fake = _fake_python(tmp_path, f"echo $$ > {pidfile}; exec sleep 60")
    job = _job(job_inputs, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="did not finish within 1 s; killed"):
        LocalTransport(python=fake, grace_s=0.5, session=False).run_job(job, tmp_path / "w")
    assert time.monotonic() - t0 < 10
    pid = int(pidfile.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_agent_without_report_is_a_device_error(tmp_path, job_inputs):
    fake = _fake_python(tmp_path, "echo 'job.json: runtime.threads: must be an integer' >&2; exit 2")
    with pytest.raises(DeviceError, match="agent refused the job: job.json: runtime.threads"):
        LocalTransport(python=fake, session=False).run_job(_job(job_inputs), tmp_path / "w")


def test_invalid_report_is_refused(tmp_path, job_inputs):
    out = tmp_path / "w" / "report.json"
    fake = _fake_python(tmp_path, f"echo '{{\"schema_version\": 99}}' > {out}; exit 0")
    with pytest.raises(DeviceError, match="invalid report from the agent: schema_version"):
        LocalTransport(python=fake, session=False).run_job(_job(job_inputs), tmp_path / "w")


CONTROLLER = """
import sys
from pathlib import Path
from agent import schema
from host.fleet.transport import LocalTransport
job = schema.job_from_dict(__import__("json").loads(Path(sys.argv[1]).read_text()))
LocalTransport(session=sys.argv[3] == "session").run_job(job, Path(sys.argv[2]))
"""


@pytest.mark.reliability(kind="fault", what="controller SIGKILLed mid-measurement (local device)",
                         expected="its agent dies with it (per job: PR_SET_PDEATHSIG; a session: its stdin "
                                  "closes), instead of measuring for its remaining 29 s")
@pytest.mark.parametrize("mode", ["session", "per-job"])
def test_the_agent_dies_with_its_controller(tmp_path, job_inputs, mode):
    # the agent runs in its own session (a deadline kills its process group); before, a SIGKILLed controller left
    # it measuring for the rest of its 30 s -- beside the next controller's job once the dead one's lease expired
    job = _job(job_inputs)
    job.timing.min_duration_s, job.timeout_s = 30.0, 120.0
    (tmp_path / "job.json").write_text(schema.dumps(job))
    agents: list = []
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(tmp_path / "job.json"), str(tmp_path / "w"), mode],
                           cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    try:
        deadline = time.monotonic() + 60
        while not agents:
            assert time.monotonic() < deadline and ctl.poll() is None, "no agent started"
            agents = [p for p in psutil.Process(ctl.pid).children(recursive=True)
                      if "agent" in p.cmdline() and ("run" if mode == "per-job" else "serve") in p.cmdline()
                      and "-c" not in p.cmdline()]
            time.sleep(0.05)
        (agent,) = agents
        time.sleep(1.0)                                   # measuring
        ctl.kill()
        ctl.wait()
        gone, alive = psutil.wait_procs([agent], timeout=5)
        assert gone and not alive, "the agent outlived its controller"
    finally:
        ctl.kill()
        for p in agents:
            if p.is_running():
                p.kill()


def test_die_with_parent_is_a_program_sent_as_it_is():
    import ast
    from pathlib import Path

    from host.fleet import die_with_parent, transport

    text = Path(die_with_parent.__file__).read_text()
    assert transport.DIE_WITH_PARENT == text                  # what `python -S -c` gets is the file itself
    tree = ast.parse(text)
    assert ast.get_docstring(tree)
    *defs, guard = tree.body                                  # importing it runs nothing: main() only under __main__
    assert all(isinstance(n, (ast.Expr, ast.Import, ast.Assign, ast.FunctionDef)) for n in defs)
    assert ast.unparse(guard) == "if __name__ == '__main__':\n    main()"


def test_an_agent_that_cannot_start_is_an_infrastructure_error(tmp_path, job_inputs):
    from edgeprune.errors import InfrastructureError

    with pytest.raises(InfrastructureError, match="cannot start the agent with"):
        LocalTransport(python=str(tmp_path / "no-python")).run_job(_job(job_inputs), tmp_path / "w")
