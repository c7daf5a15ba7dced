"""run_job end to end with onnxruntime on a tiny model; accuracy on the crafted shard; runtime registry."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import psutil
import pytest

from agent import EvalDataError, RuntimeBackendError, accuracy, runtimes
from agent.runner import run_job
from agent.runtimes.onnxruntime import OnnxRuntime
from agent.schema import ArtifactSpec, PreprocessSpec, Report, loads_job

SHARD_TOP1, SHARD_TOP5 = 0.5, 0.8  # see conftest.py


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

MakeJob = Callable[..., Path]


def run(job_path: Path, root: str = "/") -> Report:
    return run_job(loads_job(job_path.read_text()), job_path.parent, root=root)


def test_ok_job_measures_everything(job_dir: MakeJob) -> None:
    r = run(job_dir())
    assert r.status == "ok", r.error
    assert r.error is None and r.started_at <= r.finished_at
    t = r.timing
    assert t is not None
    assert t.iterations >= 20 and t.duration_s >= 0.05 and t.warmup_iters_done >= 3
    assert t.load_time_ms > 0 and t.first_inference_ms > 0
    assert t.latency_ms.min <= t.latency_ms.median <= t.latency_ms.p99 <= t.latency_ms.max
    assert t.throughput_ips == pytest.approx(t.iterations / t.duration_s)
    assert t.protocol["threads"] == 1 and t.protocol["providers"] == ["CPUExecutionProvider"]
    assert t.protocol["stop_reason"] == "min_reached"
    p = r.power
    assert p is not None and p.source == "model" and p.modelled is True
    assert 2.0 <= p.mean_w <= 10.0
    assert p.energy_mj_per_inference == pytest.approx(p.mean_w * t.duration_s * 1000 / t.iterations)
    a = r.accuracy
    assert a is not None and (a.split, a.n, a.top1, a.top5) == ("crafted", 10, SHARD_TOP1, SHARD_TOP5)
    ident = r.identity
    assert ident is not None and ident.runtime == "onnxruntime" and ident.runtime_version
    assert ident.extra["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert r.peak_rss_mb is not None and r.peak_rss_mb > 1.0


def test_fixed_batch_model_gives_the_same_accuracy(job_dir: MakeJob) -> None:
    r = run(job_dir(batch=1))
    assert r.status == "ok", r.error
    assert r.accuracy is not None and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)


def test_artifact_sha256_mismatch_is_refused_before_loading(job_dir: MakeJob,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: List[Any] = []
    monkeypatch.setattr(OnnxRuntime, "load", lambda *a: loaded.append(a))
    path = job_dir(lambda d: d["artifact"].update(sha256="0" * 64))
    r = run(path)
    assert r.status == "error" and r.error is not None and r.error.type == "ArtifactError"
    assert r.error.message.startswith("artifact sha256 mismatch: expected %s got " % ("0" * 64))
    assert loaded == [] and r.timing is None and r.identity is not None


def test_eval_shard_sha256_mismatch_is_refused_before_loading(job_dir: MakeJob,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: List[Any] = []
    monkeypatch.setattr(OnnxRuntime, "load", lambda *a: loaded.append(a))
    r = run(job_dir(lambda d: d["eval"].update(sha256="1" * 64)))
    assert r.error is not None and r.error.message.startswith("eval shard sha256 mismatch: expected 111")
    assert loaded == []


@pytest.mark.parametrize("path, message", [("../model.onnx", "escapes the job folder"),
                                           ("missing.onnx", "does not exist")])
def test_bad_artifact_paths(job_dir: MakeJob, path: str, message: str) -> None:
    r = run(job_dir(lambda d: d["artifact"].update(path=path)))
    assert r.status == "error" and r.error is not None
    assert r.error.type == "ArtifactError" and message in r.error.message and "artifact.path" in r.error.message


def test_absolute_artifact_path_is_accepted(job_dir: MakeJob, tmp_path: Path) -> None:
    r = run(job_dir(lambda d: d["artifact"].update(path=str(tmp_path / "model.onnx"))))
    assert r.status == "ok", r.error


# ------------------------------------------------------------------------- artifact.files (job schema 2)
def _with_files(tmp_path: Path, files: Dict[str, bytes], listed: Dict[str, str]) -> Callable[[Dict[str, Any]], None]:
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    def edit(d: Dict[str, Any]) -> None:
        d["schema_version"] = 2
        d["artifact"]["files"] = listed

    return edit


def test_artifact_files_are_verified_then_loaded(job_dir: MakeJob, tmp_path: Path) -> None:
    content = {"model.calib.npz": b"calibration", "model.log": b"log"}
    r = run(job_dir(_with_files(tmp_path, content, {k: sha256(v) for k, v in content.items()})))
    assert r.status == "ok", r.error


@pytest.mark.parametrize("case", ["tampered", "missing"])
def test_bad_artifact_file_is_refused_before_loading(job_dir: MakeJob, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    loaded: List[Any] = []
    monkeypatch.setattr(OnnxRuntime, "load", lambda *a: loaded.append(a))
    content = {"model.bin": b"weights"}
    listed = {"model.bin": sha256(b"weights"), "model.log": sha256(b"log")}
    if case == "tampered":
        content["model.log"] = b"log, changed"
    r = run(job_dir(_with_files(tmp_path, content, listed)))
    assert r.status == "error" and r.error is not None and r.error.type == "ArtifactError"
    assert r.error.message.startswith("artifact.files.model.log: ")
    if case == "tampered":
        assert "model.log sha256 mismatch: expected %s got %s" % (listed["model.log"], sha256(b"log, changed")) \
            in r.error.message
    else:
        assert "%s is missing: it must be beside the artifact model.onnx" % (tmp_path / "model.log") \
            in r.error.message
    assert loaded == [] and r.timing is None


def test_linked_artifact_keeps_its_name_in_the_job_folder(job_dir: MakeJob, tmp_path: Path) -> None:
    """A transport links an artifact's files into the job folder; the runner must not follow the links (the
    cache names files by sha256) but load and check them by their names there."""
    store = tmp_path / "store"
    store.mkdir()
    job = job_dir()
    (tmp_path / "model.onnx").rename(store / sha256((tmp_path / "model.onnx").read_bytes()))
    (store / "calib").write_bytes(b"calibration")
    links = tmp_path / "artifact"
    links.mkdir()
    (links / "model.onnx").symlink_to(next(p for p in store.iterdir() if p.name != "calib"))
    (links / "model.calib.npz").symlink_to(store / "calib")
    d = json.loads(job.read_text())
    d["schema_version"] = 2
    d["artifact"].update(path="artifact/model.onnx", files={"model.calib.npz": sha256(b"calibration")})
    job.write_text(json.dumps(d))
    r = run(job)
    assert r.status == "ok", r.error


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["artifact"].update(input_shape=[1, 3, 64, 64]),
     "model input 'input' has shape [?, 3, 32, 32] but artifact.input_shape is [1, 3, 64, 64]"),
    (lambda d: d["artifact"].update(input_name="images"),
     "model input is named 'input' but artifact.input_name is 'images'"),
    (lambda d: d["runtime"].update(options={"providers": ["NoSuchExecutionProvider"]}),
     "runtime.options.providers: NoSuchExecutionProvider not available in this onnxruntime (available: "),
    (lambda d: d["runtime"].update(options={"provider": ["CPUExecutionProvider"]}),
     "runtime.options.provider: unknown option for onnxruntime (knows: providers, graph_optimization_level)"),
    (lambda d: d["runtime"].update(options={"graph_optimization_level": "max"}),
     "runtime.options.graph_optimization_level: 'max' is not one of all, extended, basic, disable"),
])
def test_model_and_runtime_mismatches_are_clear(job_dir: MakeJob, edit: Callable[[Dict[str, Any]], None],
                                                message: str) -> None:
    r = run(job_dir(edit))
    assert r.status == "error" and r.error is not None
    assert r.error.type == "RuntimeBackendError" and message in r.error.message


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_onnxruntime_graph_optimization_levels_run(job_dir: MakeJob, level: str) -> None:
    r = run(job_dir(lambda d: d["runtime"].update(options={"graph_optimization_level": level})))
    assert r.status == "ok" and r.timing is not None and r.accuracy is not None


def test_batch_size_against_a_fixed_batch_model(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: d["timing"].update(batch_size=4), batch=1))
    assert r.error is not None and "timing.batch_size: 4 but the model's batch dimension is fixed at 1" \
        in r.error.message


def test_batched_timing_on_a_dynamic_model(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: d["timing"].update(batch_size=4)))
    assert r.status == "ok" and r.timing is not None and r.power is not None
    assert r.timing.throughput_ips == pytest.approx(4 * r.timing.iterations / r.timing.duration_s)
    expected = r.power.mean_w * r.timing.duration_s * 1000 / (4 * r.timing.iterations)
    assert r.power.energy_mj_per_inference == pytest.approx(expected)


def test_timeout_keeps_what_was_measured(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: (d["timing"].update(min_duration_s=30.0, max_duration_s=60.0, max_iters=10**9),
                               d.update(timeout_s=1.0))))
    assert r.status == "error" and r.error is not None and r.error.type == "JobTimeout"
    assert "before accuracy" in r.error.message
    assert r.timing is not None and r.timing.protocol["stop_reason"] == "deadline"
    assert r.timing.duration_s < 2.0 and r.power is not None and r.accuracy is None
    assert any("stopped by the job timeout" in w for w in r.warnings)


def test_cpu_affinity_is_applied_recorded_and_restored(job_dir: MakeJob) -> None:
    before = psutil.Process().cpu_affinity()
    r = run(job_dir(lambda d: d["timing"].update(cpu_affinity=[0])))
    assert r.status == "ok" and r.timing is not None
    assert r.timing.protocol["cpu_affinity_applied"] == [0] and r.timing.protocol["cpu_allowed"] == [0]
    assert r.power is not None and r.power.details["device_cpus"] == psutil.cpu_count(logical=True)
    assert psutil.Process().cpu_affinity() == before


def test_invalid_cpu_affinity_is_an_error(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: d["timing"].update(cpu_affinity=[4096])))
    assert r.status == "error" and r.error is not None and "timing.cpu_affinity" in r.error.message


def test_missing_power_sensor_is_a_warning_not_a_failure(job_dir: MakeJob, tmp_path: Path) -> None:
    r = run(job_dir(lambda d: d["power"].update(sensor="rapl")), root=str(tmp_path / "empty-root"))
    assert r.status == "ok" and r.power is None
    assert any("power sensor 'rapl' not found on this device" in w for w in r.warnings)


def test_no_power_section_when_disabled(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: d.update(power=None, eval=None)))
    assert r.status == "ok" and r.power is None and r.accuracy is None
    assert not [w for w in r.warnings if "power" in w]  # disabled is not missing: nothing to warn about


def test_rapl_through_the_runner_on_a_fake_sysfs(job_dir: MakeJob, tmp_path: Path) -> None:
    d = tmp_path / "root" / "sys" / "class" / "powercap" / "intel-rapl:0"
    d.mkdir(parents=True)
    (d / "name").write_text("package-0\n")
    (d / "energy_uj").write_text("1000\n")
    (d / "max_energy_range_uj").write_text("262143328850\n")
    r = run(job_dir(lambda j: j["power"].update(sensor="rapl")), root=str(tmp_path / "root"))
    assert r.status == "ok" and r.power is not None
    assert (r.power.source, r.power.modelled, r.power.mean_w) == ("rapl", False, 0.0)  # the counter never moved


# ------------------------------------------------------------------------------------------------- accuracy
def test_accuracy_batches_fixed_and_dynamic() -> None:
    images = np.zeros((10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    seen: List[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return np.tile(np.eye(3, dtype=np.float32)[0], (len(x), 1))  # always predicts class 0

    def prep(x: np.ndarray) -> np.ndarray:
        return accuracy.preprocess(x, PreprocessSpec(), "NCHW")

    assert accuracy.evaluate(model, images, labels, prep, 4, None) == (10, 0.4, 1.0)
    assert seen == [4, 4, 2]
    seen.clear()
    assert accuracy.evaluate(model, images, labels, prep, 4, 1) == (10, 0.4, 1.0)
    assert seen == [1] * 10
    seen.clear()
    assert accuracy.evaluate(model, images, labels, prep, 4, 3)[1] == 0.4  # last batch padded, padding dropped
    assert seen == [3, 3, 3, 3]


def test_preprocess_scale_mean_std_and_layout() -> None:
    images = np.full((1, 2, 2, 3), 255, dtype=np.uint8)
    images[..., 1] = 0
    spec = PreprocessSpec(scale=1 / 255, mean=[0.5, 0.5, 0.5], std=[0.5, 0.25, 1.0])
    x = accuracy.preprocess(images, spec, "NCHW")
    assert x.shape == (1, 3, 2, 2) and x.dtype == np.float32
    assert np.allclose(x[0, :, 0, 0], [1.0, -2.0, 0.5])
    assert accuracy.preprocess(images, spec, "NHWC").shape == (1, 2, 2, 3)


def save_shard(path: Path, **arrays: Any) -> Path:
    np.savez(str(path), **arrays)
    return path


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4, 3), np.float32), "labels": np.zeros(2, np.int64)}, "images must be uint8"),
    ({"images": np.zeros((2, 4, 4), np.uint8), "labels": np.zeros(2, np.int64)}, "shape (N, H, W, C)"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2, np.float32)}, "labels must be integers"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "2 images and 3 labels"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8)}, "no array 'labels'"),
    ({"images": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.array([0, -1])}, "labels must be >= 0"),
])
def test_bad_shards_are_refused_clearly(tmp_path: Path, arrays: Dict[str, Any], message: str) -> None:
    with pytest.raises(EvalDataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        accuracy.load_shard(save_shard(tmp_path / "bad.npz", **arrays))


def test_pickled_shard_is_refused(tmp_path: Path) -> None:
    path = save_shard(tmp_path / "p.npz", images=np.array([{"x": 1}], dtype=object), labels=np.zeros(1))
    with pytest.raises(EvalDataError, match="without pickle"):
        accuracy.load_shard(path)


def test_image_size_must_match_the_model() -> None:
    with pytest.raises(EvalDataError, match="eval images are 28x28 but the model input"):
        accuracy.check_image_size(np.zeros((1, 28, 28, 3), np.uint8), [1, 3, 32, 32], "NCHW")
    accuracy.check_image_size(np.zeros((1, 32, 32, 3), np.uint8), [1, 32, 32, 3], "NHWC")


# ------------------------------------------------------------------------------------------ runtime registry
def test_runtime_registry() -> None:
    assert runtimes.runtime_names() == ["onnxruntime", "openvino", "tensorrt", "tflite", "torch"]
    assert isinstance(runtimes.get_runtime("onnxruntime"), OnnxRuntime)
    with pytest.raises(RuntimeBackendError, match=r"unknown runtime 'coreml' \(this agent knows: onnxruntime, openvino, "
                                                  r"tensorrt, tflite, torch\)"):
        runtimes.get_runtime("coreml")
    assert [runtimes.runtime_class(n).name for n in runtimes.runtime_names()] == runtimes.runtime_names()


def test_listing_runtimes_and_sensors_imports_no_member_module() -> None:
    """In a fresh interpreter: the registries list their names without importing a backend or sensor module."""
    code = ("import json, sys; from agent import power, runtimes; "
            "names = (runtimes.runtime_names(), power.sensor_names()); "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('agent.runtimes.', 'agent.power.')))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[2]))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["agent.power.base", "agent.runtimes.base"]


def test_check_input_accepts_dynamic_dims_only() -> None:
    spec = ArtifactSpec(path="m.onnx", sha256="a" * 64, input_shape=[1, 3, 32, 32])
    runtimes.check_input("input", [None, 3, 32, 32], spec)
    with pytest.raises(RuntimeBackendError,
                       match=r"shape \[\?, 3, 32\] but artifact.input_shape is \[1, 3, 32, 32\]"):
        runtimes.check_input("input", [None, 3, 32], spec)
    with pytest.raises(RuntimeBackendError, match=r"shape \[2, 3, 32, 32\]"):
        runtimes.check_input("input", [2, 3, 32, 32], spec)
