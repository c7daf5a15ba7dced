"""The fleet runner on real local agent processes: parallel devices, leases, retries, isolation."""
from __future__ import annotations

import json
import threading
import time

import pytest

from agent import lease as agent_lease
from agent import schema
from edgeprune import data, export, models
from edgeprune.errors import InfrastructureError
from host.fleet import runner as fleet
from host.fleet import state
from host.fleet.devices import DeviceConfig, local_device
from host.fleet.health import check_devices
from host.fleet.jobs import build_job
from host.fleet.transport import LocalTransport


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, resnet20):
    d = tmp_path_factory.mktemp("art")
    ev = data.eval_split(2)
    man = export.export_onnx(resnet20[0], d / "r20.onnx", check_inputs=data.to_tensor_batch(ev.images),
                             model_name="resnet20", source_checkpoint_sha256="0" * 64, pruning_plan_sha256="")
    shard = ev.save(d / "eval.npz")
    return d / "r20.onnx", man, shard, models.sha256_file(shard)


def _dev(tmp_path, name: str, **kw) -> DeviceConfig:
    base = local_device()
    t = base.timing.model_copy(update={"min_iters": 10, "min_duration_s": 0.1, "warmup_s": 0.0, "warmup_iters": 1})
    return base.model_copy(update={"id": name, "cache_dir": str(tmp_path / f"cache-{name}"), "timing": t, **kw})


def _job_for(artifact):
    art, man, shard, sha = artifact
    return lambda d: build_job(d, f"t-{d.id}", art, man, shard, sha)


def test_parallel_devices_all_ok_and_leases_released(tmp_path, artifact):
    devs = [_dev(tmp_path, f"d{i}") for i in range(3)]
    outs = fleet.run_on_devices(devs, _job_for(artifact), tmp_path / "work")
    assert [o.device_id for o in outs] == ["d0", "d1", "d2"]
    assert all(o.ok and o.attempts == 1 and o.report.accuracy.n == 20 for o in outs), [o.error for o in outs]
    for d in devs:
        assert not agent_lease.show(tmp_path / f"cache-{d.id}")["held"]


def test_one_bad_device_does_not_stop_the_others(tmp_path, artifact):
    devs = [_dev(tmp_path, "good"), _dev(tmp_path, "broken", python=str(tmp_path / "no-python"))]
    outs = fleet.run_on_devices(devs, _job_for(artifact), tmp_path / "work", retries=1, backoff_s=0.01)
    assert outs[0].ok
    assert not outs[1].ok and outs[1].error_type == "InfrastructureError" and "cannot start the agent" in outs[1].error


def test_runtime_that_cannot_load_the_format_is_a_per_device_error(tmp_path, artifact):
    bad = _dev(tmp_path, "tfl")
    bad = bad.model_copy(update={"runtime": bad.runtime.model_copy(update={"name": "tflite", "options": {}})})
    outs = fleet.run_on_devices([bad, _dev(tmp_path, "ok")], _job_for(artifact), tmp_path / "work")
    assert "runtime tflite loads tflite; this artifact is onnx" in outs[0].error and outs[1].ok


def test_busy_device_fails_clearly_then_waiting_controller_gets_it(tmp_path, artifact):
    dev = _dev(tmp_path, "shared")
    other = LocalTransport(cache_dir=tmp_path / "cache-shared")
    holder = fleet.Lease(other, "shared", ttl_s=30, label="controller-1").__enter__()
    try:
        out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", lease_wait_s=0.5)
        assert not out.ok and out.error_type == "DeviceBusy" and "controller-1" in out.error and out.report is None
        # a second controller that is willing to wait runs as soon as the first releases
        threading.Timer(1.5, holder.__exit__, args=(None, None, None)).start()
        t0 = time.monotonic()
        out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", lease_wait_s=30)
        assert out.ok and out.lease_wait_s >= 1.0 and time.monotonic() - t0 < 30
    finally:
        holder.__exit__(None, None, None)


def test_no_two_controllers_run_on_one_device_at_once(tmp_path, artifact):
    dev = _dev(tmp_path, "contended")
    spans = []

    class Recording(LocalTransport):
        def run_job(self, job, workdir):
            start = time.monotonic()
            report = super().run_job(job, workdir)
            spans.append((start, time.monotonic()))
            return report

    factory = lambda d: Recording(cache_dir=tmp_path / "cache-contended")  # noqa: E731
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(fleet.run_on_device(
        dev, _job_for(artifact)(dev), tmp_path / "w", lease_wait_s=60, transport_factory=factory))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o.ok for o in outs) and len(spans) == 2
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # the second run started only after the first ended


class Flaky:
    """A transport whose first run_job calls fail like a dropped connection."""

    def __init__(self, real: LocalTransport, failures: int, report_status: str = "ok") -> None:
        self.real, self.failures, self.calls, self.closed = real, failures, 0, 0
        self.cache_dir, self.report_status = real.cache_dir, report_status  # a method, passed through

    def exec_agent(self, args, timeout=60.0):
        return self.real.exec_agent(args, timeout)

    def run_job(self, job, workdir):
        self.calls += 1
        if self.calls <= self.failures:
            raise InfrastructureError("connection lost")
        if self.report_status == "error":
            return schema.Report(job_id=job.job_id, status="error", error=schema.ErrorInfo("RuntimeBackendError", "bad model"))
        return self.real.run_job(job, workdir)

    def close(self):
        self.closed += 1


def test_infrastructure_errors_are_retried_with_reconnect(tmp_path, artifact):
    dev = _dev(tmp_path, "flaky")
    flaky = Flaky(LocalTransport(cache_dir=tmp_path / "cache-flaky"), failures=2)
    out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", retries=2, backoff_s=0.01,
                              transport_factory=lambda d: flaky)
    assert out.ok and out.attempts == 3 and flaky.closed >= 3


class LostAcquireReply(Flaky):
    """The first ``lease acquire`` runs on the device, and its reply is lost with the connection."""

    def __init__(self, real: LocalTransport) -> None:
        super().__init__(real, failures=0)
        self.lost = 0

    def exec_agent(self, args, timeout=60.0):
        got = self.real.exec_agent(args, timeout)
        if args[:2] == ["lease", "acquire"] and not self.lost:
            self.lost += 1
            raise InfrastructureError("connection lost (after the device took the lease)")
        return got


@pytest.mark.reliability(kind="fault", what="reply to a successful lease acquire lost with its connection",
                         expected="the retry gets its own lease back at once (same request id), instead of "
                                  "waiting out its TTL and failing as busy")
def test_a_lost_acquire_reply_gets_the_same_lease_back_without_waiting(tmp_path, artifact):
    dev = _dev(tmp_path, "lostreply")
    t = LostAcquireReply(LocalTransport(cache_dir=tmp_path / "cache-lostreply"))
    t0 = time.monotonic()
    out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", retries=2, backoff_s=0.01,
                              lease_ttl_s=60, lease_wait_s=30, transport_factory=lambda d: t)
    # before, the retry found the device leased -- by itself -- and waited 30 s, then gave up (DeviceBusy)
    assert out.ok and t.lost == 1 and out.lease_wait_s < 5 and time.monotonic() - t0 < 20, out.error
    assert not agent_lease.show(tmp_path / "cache-lostreply")["held"]


def test_model_errors_are_not_retried_and_lease_is_released(tmp_path, artifact):
    dev = _dev(tmp_path, "modelerr")
    flaky = Flaky(LocalTransport(cache_dir=tmp_path / "cache-modelerr"), failures=0, report_status="error")
    out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", retries=3, backoff_s=0.01,
                              transport_factory=lambda d: flaky)
    assert not out.ok and out.attempts == 1 and flaky.calls == 1 and out.error == "bad model"
    assert not agent_lease.show(tmp_path / "cache-modelerr")["held"]
    exhausted = Flaky(LocalTransport(cache_dir=tmp_path / "cache-modelerr"), failures=99)
    out = fleet.run_on_device(dev, _job_for(artifact)(dev), tmp_path / "w", retries=1, backoff_s=0.01,
                              transport_factory=lambda d: exhausted)
    assert out.attempts == 2 and out.error == "connection lost"
    assert not agent_lease.show(tmp_path / "cache-modelerr")["held"]


def test_health_check_persists_good_and_bad(tmp_path):
    path = tmp_path / "state.json"
    devs = [_dev(tmp_path, "fine"), _dev(tmp_path, "gone", python=str(tmp_path / "no-python"))]
    res = check_devices(devs, state_path=path)
    assert res["fine"]["health"] == "good" and "onnxruntime" in res["fine"]["details"]["summary"]
    assert res["gone"]["health"] == "bad" and "cannot start the agent" in res["gone"]["details"]["error"]
    saved = state.load(path)
    assert saved["fine"]["health"] == "good" and saved["gone"]["checked_at"]
    assert json.loads(path.read_text())["gone"]["health"] == "bad"
