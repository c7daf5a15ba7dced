"""Artifacts of several files (OpenVINO IR: ``.xml`` + ``.bin``) from export to report: the job lists the other
files (``artifact.files``), the transports ship every one and link them by name into the agent's job folder, the
agent verifies each before loading; manifests' ``target_runtime`` and ``runtime_options`` reach the job.

openvino is imported while pytest collects this module (see tests/test_export_openvino.py: ``import openvino``
forks a telemetry process, which JAX, once loaded by another test module, would warn about).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

ov = pytest.importorskip("openvino")

from agent import schema  # noqa: E402
from edgeprune import data, export, models  # noqa: E402
from edgeprune.errors import DeviceError, UsageError  # noqa: E402
from host.commands import benchmark  # noqa: E402
from host.fleet.devices import DeviceConfig, PowerConfig, RuntimeConfig, TimingConfig  # noqa: E402
from host.fleet.jobs import build_job  # noqa: E402
from host.fleet.transport import LocalTransport, artifact_files  # noqa: E402
from tests import sshd  # noqa: E402

FAST = TimingConfig(min_iters=10, min_duration_s=0.1, warmup_s=0.0, warmup_iters=1, cpu_affinity=None)
POWER = PowerConfig(sensor="model", idle_w=5.0, max_w=15.0)


@pytest.fixture(scope="module")
def ir(tmp_path_factory: pytest.TempPathFactory, resnet20: Any) -> Dict[str, Any]:
    """ResNet-20 exported as OpenVINO IR (r20.xml + r20.bin + r20.openvino.manifest.json) and a 50-image shard."""
    d = tmp_path_factory.mktemp("ir")
    ev = data.eval_split(5)
    man = export.export(resnet20[0], "openvino", d, check_inputs=data.to_tensor_batch(ev.images[:8]),
                        model_name="resnet20", source_checkpoint_sha256=resnet20[1]["sha256"],
                        pruning_plan_sha256="0" * 64, tag="r20")
    shard = ev.save(d / "eval.npz")
    return {"dir": d, "man": man, "xml": d / "r20.xml", "bin": d / "r20.bin",
            "manifest": export.manifest_path(d, "r20", "openvino"), "shard": shard,
            "shard_sha": models.sha256_file(shard)}


def _copy_ir(ir: Dict[str, Any], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in (ir["xml"], ir["bin"], ir["manifest"]):
        shutil.copyfile(p, dest / p.name)
    return dest


def local_ov(tmp_path: Path, **kw: Any) -> DeviceConfig:
    return DeviceConfig(id="ov-local", runtime=RuntimeConfig(name="openvino", threads=1), timing=FAST, power=POWER,
                        cache_dir=str(tmp_path / "dev-cache"), **kw)


def _job(dev: DeviceConfig, ir: Dict[str, Any], job_id: str = "ir1", xml: Any = None) -> schema.JobSpec:
    return build_job(dev, job_id, xml or ir["xml"], ir["man"], ir["shard"], ir["shard_sha"], quick=True)


def _ok(report: schema.Report) -> None:
    assert report.status == "ok", report.error
    assert report.identity is not None and report.identity.extra["runtime"]["model_format"] == "ir"
    assert report.timing is not None and report.timing.iterations >= 10
    assert report.accuracy is not None and report.accuracy.n == 50 and report.accuracy.top1 >= 0.8


# ----------------------------------------------------------------------------------------------- build_job
def test_job_lists_the_bin_beside_the_xml(ir: Dict[str, Any], tmp_path: Path) -> None:
    job = _job(local_ov(tmp_path), ir)
    man = ir["man"]
    assert job.schema_version == schema.JOB_SCHEMA_VERSION and job.artifact.format == "openvino-ir"
    assert job.artifact.path == str(ir["xml"]) and job.artifact.sha256 == man.sha256
    assert job.artifact.files == {"r20.bin": man.files["r20.bin"]}
    assert schema.loads_job(schema.dumps(job)) == job


def _trt(man: export.Manifest, **kw: Any) -> export.Manifest:
    return dataclasses.replace(man, file="r20.trt.onnx", sha256="a" * 64, format="onnx", export_format="tensorrt",
                               files={"r20.trt.onnx": "a" * 64, "r20.trt.calib.npz": "c" * 64},
                               target_runtime="tensorrt", **kw)


def test_target_runtime_must_be_the_devices(ir: Dict[str, Any], tmp_path: Path) -> None:
    man = _trt(ir["man"], runtime_options={"precision": "fp16"})
    dev = DeviceConfig(id="cpu-box", runtime=RuntimeConfig(name="onnxruntime"), timing=FAST, power=POWER)
    with pytest.raises(DeviceError, match="cpu-box: this artifact \\(r20.trt.onnx, tensorrt\\) was exported for "
                                          "runtime tensorrt, but the device runs onnxruntime"):
        build_job(dev, "j", tmp_path / "r20.trt.onnx", man, None)
    tpu = dataclasses.replace(ir["man"], target_runtime="tflite", runtime_options={"delegate": "edgetpu"})
    with pytest.raises(DeviceError, match="exported for runtime tflite, but the device runs openvino"):
        build_job(local_ov(tmp_path), "j", ir["xml"], tpu, None)


def test_runtime_options_are_merged_and_conflicts_refused(ir: Dict[str, Any], tmp_path: Path) -> None:
    man = _trt(ir["man"], runtime_options={"precision": "int8", "calibration_data": "r20.trt.calib.npz"})
    jetson = DeviceConfig(id="orin", runtime=RuntimeConfig(name="tensorrt", options={"workspace_mb": 512}),
                          timing=FAST, power=POWER)
    job = build_job(jetson, "j", tmp_path / "r20.trt.onnx", man, None)
    assert job.runtime.options == {"workspace_mb": 512, "precision": "int8", "calibration_data": "r20.trt.calib.npz"}
    assert job.artifact.files == {"r20.trt.calib.npz": "c" * 64} and job.artifact.path.endswith("/r20.trt.onnx")
    same = jetson.model_copy(update={"runtime": RuntimeConfig(name="tensorrt", options={"precision": "int8"})})
    assert build_job(same, "j", tmp_path / "r20.trt.onnx", man, None).runtime.options["precision"] == "int8"
    fp16 = jetson.model_copy(update={"runtime": RuntimeConfig(name="tensorrt", options={"precision": "fp16"})})
    with pytest.raises(DeviceError, match="orin: runtime.options.precision is 'fp16' in the device config but this "
                                          "artifact \\(r20.trt.onnx, tensorrt\\) must run with 'int8'"):
        build_job(fp16, "j", tmp_path / "r20.trt.onnx", man, None)
    assert jetson.runtime.options == {"workspace_mb": 512}          # the device config is left as it was


def test_manifest_file_name_the_agent_refuses_is_a_device_error(ir: Dict[str, Any], tmp_path: Path) -> None:
    man = dataclasses.replace(ir["man"], files={"r20.xml": ir["man"].sha256, ".r20.bin": "b" * 64})
    with pytest.raises(DeviceError, match="ov-local: cannot build job j .*artifact.files: '.r20.bin' must not "
                                          "start with '.'"):
        build_job(local_ov(tmp_path), "j", ir["xml"], man, None)


# ----------------------------------------------------------------------------------------- LocalTransport
def test_ir_through_local_transport(ir: Dict[str, Any], tmp_path: Path) -> None:
    w = tmp_path / "w"
    _ok(LocalTransport().run_job(_job(local_ov(tmp_path), ir), w))
    assert sorted(p.name for p in w.iterdir()) == ["job.json", "report.json"]   # the job folder is gone
    assert schema.loads_job((w / "job.json").read_text()).artifact.path == str(ir["xml"])   # as given
    assert ir["bin"].is_file() and ir["xml"].is_file()                          # links removed, not their targets


def test_tampered_bin_is_refused_by_the_agent_locally(ir: Dict[str, Any], tmp_path: Path) -> None:
    d = _copy_ir(ir, tmp_path / "art")
    job = _job(local_ov(tmp_path), ir, xml=d / "r20.xml")
    with open(d / "r20.bin", "r+b") as f:            # one weight changed after export
        f.seek(1000)
        f.write(b"\x7f")
    r = LocalTransport().run_job(job, tmp_path / "w")
    assert r.status == "error" and r.error is not None and r.error.type == "ArtifactError" and r.timing is None
    assert r.error.message.startswith("artifact.files.r20.bin: r20.bin sha256 mismatch: expected %s"
                                      % ir["man"].files["r20.bin"])


def test_missing_bin_or_bad_name_is_refused_before_the_agent_runs(ir: Dict[str, Any], tmp_path: Path) -> None:
    d = _copy_ir(ir, tmp_path / "art")
    job = _job(local_ov(tmp_path), ir, xml=d / "r20.xml")
    (d / "r20.bin").unlink()
    with pytest.raises(DeviceError, match=r"r20\.bin does not exist \(artifact\.files\.r20\.bin \(expected beside "
                                          r"r20\.xml\)\)"):
        LocalTransport(python="/nonexistent/python").run_job(job, tmp_path / "w")
    bad = _job(local_ov(tmp_path), ir)
    bad.artifact.files = {"../x": "b" * 64}
    with pytest.raises(DeviceError, match=r"job ir1: artifact\.files: '\.\./x' must be a plain file name"):
        LocalTransport(python="/nonexistent/python").run_job(bad, tmp_path / "w")
    with pytest.raises(DeviceError, match=r"artifact\.files: '\.\./x' must be a plain file name"):
        artifact_files(bad, tmp_path)                # also without the schema's validate() in front of it


# ------------------------------------------------------------------------------------------------ bench
def test_artifact_from_verifies_every_file_and_wants_one_manifest(ir: Dict[str, Any], tmp_path: Path) -> None:
    d = _copy_ir(ir, tmp_path / "art")
    for given in (d, d / "r20.openvino.manifest.json", d / "r20.xml"):
        art, man = benchmark.artifact_from(str(given), tmp_path)
        assert art == d / "r20.xml" and man == ir["man"]
    shutil.copyfile(d / "r20.openvino.manifest.json", d / "r20.other.manifest.json")
    with pytest.raises(UsageError, match=r"holds 2 manifests \(r20\.openvino\.manifest\.json, "
                                         r"r20\.other\.manifest\.json\); name one: --model "):
        benchmark.artifact_from(str(d), tmp_path)
    assert benchmark.artifact_from(str(d / "r20.openvino.manifest.json"), tmp_path)[0] == d / "r20.xml"
    (d / "r20.bin").write_bytes((d / "r20.bin").read_bytes()[:-4])
    with pytest.raises(UsageError, match=r"r20\.bin: sha256 does not match its manifest"):
        benchmark.artifact_from(str(d / "r20.openvino.manifest.json"), tmp_path)
    (d / "r20.bin").unlink()
    with pytest.raises(UsageError, match=r"r20\.bin: missing \(listed in the manifest of r20\.xml\)"):
        benchmark.artifact_from(str(d / "r20.xml"), tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="holds no \\*.manifest.json"):
        benchmark.artifact_from(str(empty), tmp_path)


def test_bench_runs_an_ir_on_an_openvino_device(ir: Dict[str, Any], tmp_path: Path) -> None:
    res = benchmark.run_bench(str(ir["manifest"]), [local_ov(tmp_path)], out=tmp_path / "run", run_id="ir",
                              quick=True, eval_per_class=5, state_path=tmp_path / "state.json", lease_wait_s=5)
    assert [row["status"] for row in res.rows] == ["ok"], res.rows
    assert res.rows[0]["accuracy_top1"] >= 0.8 and res.outcomes[0].report is not None
    assert res.outcomes[0].report.identity.extra["runtime"]["model_format"] == "ir"


# ------------------------------------------------------------------------------------------------- SSH
@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory):
    if not sshd.have_sshd():
        pytest.skip("OpenSSH server not installed (/usr/sbin/sshd)")
    f = sshd.start_fleet(tmp_path_factory.mktemp("sshd-ir"), 1)
    yield f
    f.stop()


def ssh_ov(fleet: Any, tmp_path: Path, **kw: Any) -> DeviceConfig:
    return fleet.device(0, cache_dir=str(tmp_path / "cache"), **kw).model_copy(
        update={"runtime": RuntimeConfig(name="openvino", threads=1), "timing": FAST, "power": POWER})


def _fake_python(tmp_path: Path, body: str) -> str:
    """A device "python" that runs the transport's helper (``-c``) with the real one and ``body`` for the agent."""
    script = tmp_path / "fake-python"
    script.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exec %s "$@"; fi\n%s\n' % (sys.executable, body))
    script.chmod(0o755)
    return str(script)


@pytest.mark.ssh
def test_ir_over_ssh_then_cache_hits_send_nothing(fleet: Any, ir: Dict[str, Any], tmp_path: Path) -> None:
    from host.fleet.ssh import SSHTransport

    cache = tmp_path / "cache"
    with SSHTransport(ssh_ov(fleet, tmp_path)) as t:
        _ok(t.run_job(_job(ssh_ov(fleet, tmp_path), ir), tmp_path / "w"))
        first = t.counters.as_dict()
        assert first["files_uploaded"] == 4 and first["cache_hits"] == 0    # xml, bin, eval shard, agent bundle
        sizes = ir["xml"].stat().st_size + ir["bin"].stat().st_size + ir["shard"].stat().st_size
        assert first["bytes_uploaded"] > sizes
        for name, digest in ir["man"].files.items():                        # each by its sha256, not its name
            assert (cache / digest).read_bytes() == (ir["dir"] / name).read_bytes()

        _ok(t.run_job(_job(ssh_ov(fleet, tmp_path), ir, job_id="ir2"), tmp_path / "w2"))
        c = t.counters.as_dict()
        assert c["bytes_uploaded"] == first["bytes_uploaded"] and c["files_uploaded"] == 4   # 0 bytes this time
        # the agent bundle is checked once per session, and the second job runs in the open one: no exec
        assert c["cache_hits"] == 3 and c["commands_run"] == first["commands_run"]
    assert list((cache / "jobs").iterdir()) == [] and not list(cache.glob("*.tmp.*"))


@pytest.mark.ssh
def test_bin_tampered_on_the_device_is_refused_then_replaced(fleet: Any, ir: Dict[str, Any], tmp_path: Path) -> None:
    """The device's copy of r20.bin changes after the cache check (the agent's python appends to it through the
    job folder's link just before it starts, so one agent process per job here): the agent refuses it; the next
    job finds the entry bad, uploads it again and runs."""
    from host.fleet.ssh import SSHTransport

    fake = _fake_python(tmp_path, 'printf x >> artifact/r20.bin; exec %s "$@"' % sys.executable)
    bin_sha = ir["man"].files["r20.bin"]
    with SSHTransport(ssh_ov(fleet, tmp_path, python=fake), session=False) as t:
        r = t.run_job(_job(ssh_ov(fleet, tmp_path), ir), tmp_path / "w")
    assert r.status == "error" and r.error is not None and r.error.type == "ArtifactError" and r.timing is None
    assert r.error.message.startswith("artifact.files.r20.bin: r20.bin sha256 mismatch: expected %s" % bin_sha)
    assert (tmp_path / "cache" / bin_sha).stat().st_size == ir["bin"].stat().st_size + 1
    with SSHTransport(ssh_ov(fleet, tmp_path)) as t:
        _ok(t.run_job(_job(ssh_ov(fleet, tmp_path), ir, job_id="ir2"), tmp_path / "w2"))
        assert (t.counters.cache_replaced, t.counters.files_uploaded) == (1, 1)
        assert t.counters.bytes_uploaded == ir["bin"].stat().st_size


@pytest.mark.ssh
def test_bad_names_never_reach_the_device(fleet: Any, ir: Dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeprune.errors import SSHError
    from host.fleet.ssh import transport as host_ssh  # SSHTransport looks artifact_files up here

    bad = _job(ssh_ov(fleet, tmp_path), ir)
    bad.artifact.files = {"../x": "b" * 64}
    with host_ssh.SSHTransport(ssh_ov(fleet, tmp_path)) as t:
        with pytest.raises(SSHError, match=r"job ir1: artifact\.files: '\.\./x' must be a plain file name") \
                as e:
            t.run_job(bad, tmp_path / "w")
        assert not e.value.infrastructure and t.counters.commands_run == 0
    # past the host's checks (patched away here), the device helper refuses the name itself and runs nothing
    real = host_ssh.artifact_files

    def sneaky(job: schema.JobSpec, workdir: Path) -> Any:
        files = real(job, workdir)
        return files + [("../../escaped", files[1][1], files[1][2])]

    monkeypatch.setattr(host_ssh, "artifact_files", sneaky)
    with host_ssh.SSHTransport(ssh_ov(fleet, tmp_path)) as t:
        with pytest.raises(SSHError, match=r"refused to link '\.\./\.\./escaped'") as e:
            t.run_job(_job(ssh_ov(fleet, tmp_path), ir, job_id="ir3"), tmp_path / "w3")
        assert not e.value.infrastructure
    cache = tmp_path / "cache"
    assert not (cache / "escaped").exists() and not (cache / "jobs" / "escaped").exists()
    assert list((cache / "jobs").iterdir()) == []
