"""The executor interface without a cluster: the local executor, a remote build's files installed on the host
(sha256-checked, all or nothing), the registry, and how the search's evaluator overlaps builds with measurements
(a remote device measures each candidate as soon as it is built; this machine's devices wait until nothing builds
here). The Ray executor against a real cluster: tests/test_ray_executor.py."""
from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from edgeprune.errors import ExportError, UsageError
from host.executors import BuildTask, open_executor
from host.executors.base import collect, install
from host.executors.local import LocalExecutor


def _artifact_folder(job_inputs, d: Path) -> dict:
    onnx, man, _ = job_inputs
    d.mkdir(parents=True)
    shutil.copy(onnx, d / onnx.name)
    man.write(d / "r20.manifest.json")
    return {"manifest": "r20.manifest.json", "artifact": onnx.name, "artifact_sha256": man.sha256,
            "plan_sha256": "", "artifact_files": sorted(man.files)}


def test_local_executor_builds_in_this_process_and_hands_over_the_builds_error(tmp_path):
    ex = LocalExecutor()
    h = ex.submit(BuildTask("a", tmp_path / "a", lambda dest: {"dest": str(dest)}, "unused:fn"))
    b = h.result()
    assert h.done() and b["dest"] == str(tmp_path / "a") and b.built_by["executor"] == "local"

    def fails(dest):
        raise ExportError("export failed its check")

    with pytest.raises(ExportError, match="export failed its check"):
        ex.submit(BuildTask("b", tmp_path / "b", fails, "unused:fn")).result()
    assert ex.describe() == {"executor": "local"} and ex.builds_on_this_machine


def test_unknown_executor_is_a_usage_error():
    with pytest.raises(UsageError, match="--executor: unknown executor 'spark'; known: local, ray"):
        open_executor("spark")


def test_install_checks_every_file_against_the_manifest_and_installs_all_or_nothing(tmp_path, job_inputs):
    src = tmp_path / "built"
    info = _artifact_folder(job_inputs, src)
    files = collect(src)
    dest = tmp_path / "work" / "artifacts" / "k1"
    install(files, info, dest)
    assert collect(dest) == files

    bad = dict(files)
    bad["r20.onnx"] = files["r20.onnx"][:-1] + bytes([files["r20.onnx"][-1] ^ 1])
    with pytest.raises(ExportError):
        install(bad, info, dest)                       # replacing it: the old one stays as it was
    assert collect(dest) == files
    with pytest.raises(ExportError, match="outside its folder"):
        install({"../evil": b"x"}, {}, tmp_path / "work" / "artifacts" / "k2")
    assert not (tmp_path / "work" / "artifacts" / "k2").exists()
    assert [p.name for p in (tmp_path / "work" / "artifacts").iterdir()] == ["k1"]    # no partial folder left

    shared = tmp_path / "demo" / "artifacts"           # a demo's folder: every candidate's files side by side
    shared.mkdir(parents=True)
    (shared / "other.onnx").write_bytes(b"another candidate")
    install(files, info, shared, whole=False)
    assert sorted(p.name for p in shared.iterdir()) == ["other.onnx", "r20.manifest.json", "r20.onnx"]


class _TimedBuild:
    """A build that completes ``after_s`` from now, with a real artifact's record."""

    def __init__(self, info: dict, after_s: float) -> None:
        self.info, self.ready = info, time.monotonic() + after_s

    def done(self) -> bool:
        return time.monotonic() >= self.ready

    def cancel(self) -> None:
        pass

    def result(self) -> dict:
        time.sleep(max(0.0, self.ready - time.monotonic()))
        return self.info


def test_remote_devices_measure_each_candidate_once_built_and_local_devices_wait_for_all_builds(
        tmp_path, monkeypatch, job_inputs, resnet20):
    from host.fleet import runner
    from host.fleet.devices import DeviceConfig, SSHConfig, local_device
    from host.fleet.formats import profile_for
    from host.search import evaluator as sev
    from host.search import options as so
    from host.search.algos.base import Candidate
    from host.search.space import build_space

    model, meta = resnet20
    opts = so.SearchOptions(model="resnet20", eval_per_class=2, cache_dir=str(tmp_path / "cache"))

    class Elsewhere(LocalExecutor):
        builds_on_this_machine = True                    # a Ray node here: local devices must wait

    ev = sev.FleetEvaluator(tmp_path / "run", "ovl", opts, "resnet20", model, meta,
                            build_space("resnet20", model, meta), executor=Elsewhere())
    infos = {}
    for i, key in enumerate(("k0" * 8, "k1" * 8, "k2" * 8)):
        folder = ev.artifact_folder(key)
        infos[key] = dict(_artifact_folder(job_inputs, folder), artifact_dir=str(folder.relative_to(ev.out)))
    t0 = time.monotonic()
    delays = {"k0" * 8: 0.5, "k1" * 8: 1.0, "k2" * 8: 1.5}
    monkeypatch.setattr(ev, "submit_build", lambda profile, cand, key, rec=None, ms=None:
                        _TimedBuild(infos[key], delays[key] - (time.monotonic() - t0)))
    started = []
    lock = threading.Lock()

    def fake_run(dev, job, workdir, **kw):
        with lock:
            started.append((time.monotonic() - t0, dev.id, job.job_id))
        return runner.DeviceOutcome(device_id=dev.id, report=None, error="not measured in this test",
                                    error_type="DeviceError", attempts=1, seconds=0.0, lease_wait_s=0.0)

    monkeypatch.setattr(runner, "run_on_device", fake_run)
    remote = DeviceConfig(id="pi", transport="ssh", ssh=SSHConfig(host="10.20.30.40", user="pi"))
    here = local_device()
    reqs = [sev.Request(d, profile_for(d), Candidate(), key) for key in delays for d in (remote, here)]
    got = []
    ev.measure(reqs, lambda req, m, extra: got.append((req.device.id, req.key)))
    ev.close()
    assert sorted(got) == sorted((r.device.id, r.key) for r in reqs)          # every request answered once
    pi = [t for t, dev, _ in started if dev == "pi"]
    local = [t for t, dev, _ in started if dev == "local"]
    assert len(pi) == len(local) == 3
    assert pi[0] < 1.2                # measured while the other two were still building
    assert min(local) >= 1.45         # not before the last build was done


def test_an_interrupted_builds_checkpoint_is_kept_for_the_local_build_to_resume(tmp_path, monkeypatch, resnet20):
    """A folder without built.json holds an interrupted fine-tune's checkpoint: the next build resumes from it
    (edgeprune.recovery), so it must still be there; a folder whose built.json is stale is built afresh."""
    from host.fleet.devices import local_device
    from host.fleet.formats import profile_for
    from host.search import evaluator as sev
    from host.search import options as so
    from host.search.algos.base import Candidate
    from host.search.space import build_space

    model, meta = resnet20
    opts = so.SearchOptions(model="resnet20", eval_per_class=2, cache_dir=str(tmp_path / "cache"))
    ev = sev.FleetEvaluator(tmp_path / "run", "ckpt", opts, "resnet20", model, meta,
                            build_space("resnet20", model, meta))
    seen = []

    def build_into(profile, cand, key, rec, ms, folder):     # what the build finds in its folder
        seen.append(sorted(p.name for p in folder.iterdir()) if folder.exists() else [])
        folder.mkdir(parents=True, exist_ok=True)
        return {"key": key}

    monkeypatch.setattr(ev, "build_into", build_into)
    prof = profile_for(local_device())
    interrupted = ev.artifact_folder("a" * 64)
    interrupted.mkdir(parents=True)
    (interrupted / "finetune.ckpt").write_bytes(b"step 7")
    ev.build(prof, Candidate(), "a" * 64)
    stale = ev.artifact_folder("b" * 64)
    stale.mkdir(parents=True)
    (stale / "built.json").write_text('{"key": "another"}')
    (stale / "finetune.ckpt").write_bytes(b"of another build")
    ev.build(prof, Candidate(), "b" * 64)
    ev.close()
    assert seen == [["finetune.ckpt"], []]
