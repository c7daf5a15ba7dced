"""The tensorrt backend, as far as it can be tested without TensorRT or a GPU (this machine has neither).

Tested for real here: the clear error when TensorRT (or cuda-python) is missing, option checking (done before
TensorRT is imported, so a bad job fails the same everywhere), relative paths, the precision -> builder-flag
mapping, the engine cache key and file name, and the calibration batches. Building and running an engine is
written against TensorRT's documented 8.5+/10 Python API and is not exercised here: no test pretends it ran.
Also here: TensorRT and CUDA through onnxruntime's execution providers (what this CPU build can show: a provider
that is not available, and one that onnxruntime drops at session creation), and, for every backend, the error
when its runtime is not installed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Dict

import numpy as np
import pytest

from agent import EvalDataError, RuntimeBackendError, accuracy, runtimes
from agent.runner import run_job
from agent.runtimes import tensorrt as trt_backend
from agent.runtimes.tensorrt import (TRT_MISSING, CalibrationBatches, TrtOptions, trt_builder_flags, trt_cache_key,
                                     trt_engine_path, trt_options)
from agent.schema import ArtifactSpec, loads_job

MakeJob = Callable[..., Path]
no_tensorrt = pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                                 reason="TensorRT is installed here")
SHA = "ab" * 32


def spec() -> ArtifactSpec:
    return ArtifactSpec(path="model.onnx", sha256=SHA)


# ------------------------------------------------------------------------------------- missing runtime
@no_tensorrt
def test_missing_tensorrt_says_where_to_get_it() -> None:
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime("tensorrt").version()
    assert str(e.value).startswith("runtime 'tensorrt' needs NVIDIA TensorRT's Python bindings (JetPack ships "
                                   "them; on x86: pip install tensorrt) (")
    assert TRT_MISSING == ("runtime 'tensorrt' needs NVIDIA TensorRT's Python bindings (JetPack ships them; "
                           "on x86: pip install tensorrt)")


def test_missing_tensorrt_even_where_it_is_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeBackendError, match=r"^runtime 'tensorrt' needs NVIDIA TensorRT's Python bindings"):
        runtimes.get_runtime("tensorrt").load(tmp_path / "model.onnx", spec(), 1, {})


@no_tensorrt
def test_job_on_a_device_without_tensorrt_reports_the_error(job_dir: MakeJob) -> None:
    job = job_dir(lambda d: d.update(runtime={"name": "tensorrt", "threads": 1, "options": {"precision": "fp16"}}))
    r = run_job(loads_job(job.read_text()), job.parent)
    assert r.status == "error" and r.error is not None and r.error.type == "RuntimeBackendError"
    assert r.error.message.startswith(TRT_MISSING) and r.timing is None


def test_missing_cuda_python_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeBackendError, match="runtime 'tensorrt' needs cuda-python for device memory .*"
                                                  "pip install cuda-python"):
        trt_backend._import_cudart()


# ------------------------------------------------------------------------------------------- options
def test_defaults(tmp_path: Path) -> None:
    opts = trt_options({}, tmp_path)
    assert opts == TrtOptions(precision="fp32", sparsity=False, cache_dir=Path("~/.cache/edgeprune/trt").expanduser(),
                              calibration_data=None, calibration_cache=None, workspace_mb=1024, max_batch=None,
                              device=0)


def test_relative_paths_are_relative_to_the_artifact_folder(tmp_path: Path) -> None:
    np.savez(str(tmp_path / "calib.npz"), inputs=np.zeros((4, 3, 32, 32), np.float32))
    opts = trt_options({"precision": "int8", "calibration_data": "calib.npz", "calibration_cache": "cal.cache",
                        "cache_dir": "engines", "max_batch": 64, "workspace_mb": 256, "device": 1,
                        "sparsity": True}, tmp_path)
    assert opts.calibration_data == tmp_path / "calib.npz" and opts.calibration_cache == tmp_path / "cal.cache"
    assert opts.cache_dir == tmp_path / "engines" and (opts.max_batch, opts.workspace_mb, opts.device) == (64, 256, 1)
    assert trt_options({"cache_dir": "/var/cache/trt"}, tmp_path).cache_dir == Path("/var/cache/trt")


@pytest.mark.parametrize("options, message", [
    ({"providers": ["CUDAExecutionProvider"]}, "runtime.options.providers: unknown option for tensorrt (knows: "
                                               "precision, sparsity, cache_dir, calibration_data, calibration_cache, "
                                               "workspace_mb, max_batch, device)"),
    ({"precision": "FP16"}, "runtime.options.precision: 'FP16' is not one of fp32, fp16, int8, int8+fp16"),
    ({"precision": "best"}, "runtime.options.precision: 'best' is not one of"),
    ({"sparsity": "2:4"}, "runtime.options.sparsity: must be true or false"),
    ({"workspace_mb": 0}, "runtime.options.workspace_mb: must be an integer >= 1"),
    ({"max_batch": 2.5}, "runtime.options.max_batch: must be an integer >= 1"),
    ({"device": -1}, "runtime.options.device: must be an integer >= 0"),
    ({"device": True}, "runtime.options.device: must be an integer >= 0"),
    ({"cache_dir": ""}, "runtime.options.cache_dir: must be a path"),
    ({"precision": "int8"}, "runtime.options.precision: int8 needs runtime.options.calibration_data (an npz with "
                            "float32 'inputs' in the artifact's layout) or an existing "
                            "runtime.options.calibration_cache"),
    ({"precision": "int8+fp16", "calibration_cache": "missing.cache"}, "int8+fp16 needs runtime.options."
                                                                       "calibration_data"),
    ({"precision": "int8", "calibration_data": "missing.npz"}, "runtime.options.calibration_data: "),
    ({"precision": "fp16", "calibration_cache": "c.cache"}, "runtime.options.calibration_data: calibration is for "
                                                            "int8 precisions only; leave it unset for fp16"),
])
def test_bad_options_are_refused_clearly(tmp_path: Path, options: Dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeBackendError) as e:
        trt_options(options, tmp_path)
    assert message in str(e.value)


def test_options_are_checked_before_tensorrt_is_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(RuntimeBackendError, match="runtime.options.precision: 'int4' is not one of"):
        runtimes.get_runtime("tensorrt").load(tmp_path / "model.onnx", spec(), 1, {"precision": "int4"})


def test_existing_calibration_cache_is_enough_for_int8(tmp_path: Path) -> None:
    (tmp_path / "cal.cache").write_bytes(b"TRT-8601-EntropyCalibration2\n")
    opts = trt_options({"precision": "int8", "calibration_cache": "cal.cache"}, tmp_path)
    assert opts.calibration_data is None and opts.calibration_cache == tmp_path / "cal.cache"


# ------------------------------------------------------------------------------------------- flags
@pytest.mark.parametrize("precision, sparsity, flags", [
    ("fp32", False, ([], ["TF32"])),
    ("fp32", True, (["SPARSE_WEIGHTS"], ["TF32"])),
    ("fp16", False, (["FP16"], [])),
    ("int8", False, (["INT8"], [])),
    ("int8+fp16", True, (["INT8", "FP16", "SPARSE_WEIGHTS"], [])),
])
def test_precision_and_sparsity_map_to_builder_flags(precision: str, sparsity: bool, flags: Any) -> None:
    assert trt_builder_flags(precision, sparsity) == flags


# ---------------------------------------------------------------------------------------- engine cache
BASE = dict(artifact_sha256=SHA, tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
            flags=(["FP16"], []), profile=[[1, 3, 32, 32], [1, 3, 32, 32], [32, 3, 32, 32]], workspace_mb=1024,
            calibration_sha256=None)


def test_cache_key_is_stable_and_a_sha256() -> None:
    key = trt_cache_key(**BASE)  # type: ignore[arg-type]
    assert key == trt_cache_key(**dict(BASE))  # type: ignore[arg-type]
    assert len(key) == 64 and all(c in "0123456789abcdef" for c in key)
    reordered = dict(BASE, flags=(["SPARSE_WEIGHTS", "FP16"], []))
    assert trt_cache_key(**reordered) == trt_cache_key(**dict(BASE, flags=(["FP16", "SPARSE_WEIGHTS"], [])))  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [
    {"artifact_sha256": "cd" * 32}, {"tensorrt_version": "8.5.2.2"}, {"gpu_name": "NVIDIA GeForce RTX 4090"},
    {"compute_capability": "8.9"}, {"flags": (["INT8"], [])}, {"flags": (["FP16", "SPARSE_WEIGHTS"], [])},
    {"flags": (["FP16"], ["TF32"])}, {"profile": [[1, 3, 32, 32]] * 3}, {"workspace_mb": 2048},
    {"calibration_sha256": "ef" * 32},
])
def test_cache_key_changes_with_everything_that_changes_the_engine(change: Dict[str, Any]) -> None:
    assert trt_cache_key(**dict(BASE, **change)) != trt_cache_key(**BASE)  # type: ignore[arg-type]


def test_engine_path_names_the_artifact_and_the_key(tmp_path: Path) -> None:
    key = trt_cache_key(**BASE)  # type: ignore[arg-type]
    assert trt_engine_path(tmp_path, SHA, key) == tmp_path / ("%s-%s.engine" % (SHA[:16], key[:24]))


# ------------------------------------------------------------------------------------------ calibration
def test_calibration_batches_in_order_without_the_partial_one() -> None:
    data = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    batches = CalibrationBatches(data, 3)
    assert batches.count == 2
    got = list(batches)
    assert [b.tolist() for b in got] == [data[0:3].tolist(), data[3:6].tolist()]
    assert all(b.flags["C_CONTIGUOUS"] and b.dtype == np.float32 for b in got)
    assert batches.next() is None  # exhausted: the calibrator returns None to TensorRT


def test_too_little_calibration_data_is_refused() -> None:
    with pytest.raises(RuntimeBackendError, match="calibration data has 2 samples; needs at least one batch of 4"):
        CalibrationBatches(np.zeros((2, 3), np.float32), 4)


def test_calibration_data_must_fit_the_artifact(tmp_path: Path) -> None:
    np.savez(str(tmp_path / "c.npz"), inputs=np.zeros((4, 32, 32, 3), np.float32))
    with pytest.raises(EvalDataError) as e:
        accuracy.load_inputs(tmp_path / "c.npz", [1, 3, 32, 32], "runtime.options.calibration_data")
    assert str(e.value) == ("runtime.options.calibration_data c.npz inputs have shape (4, 32, 32, 3) but the model "
                            "input [1, 3, 32, 32] wants (N, 3, 32, 32)")
    np.savez(str(tmp_path / "c.npz"), images=np.zeros((4, 32, 32, 3), np.uint8))
    with pytest.raises(EvalDataError, match="c.npz has no array 'inputs' \\(has: images\\)"):
        accuracy.load_inputs(tmp_path / "c.npz", [1, 3, 32, 32], "runtime.options.calibration_data")
    np.savez(str(tmp_path / "c.npz"), inputs=np.zeros((4, 3, 32, 32), np.float64))
    with pytest.raises(EvalDataError, match="inputs must be float32; got float64"):
        accuracy.load_inputs(tmp_path / "c.npz", [1, 3, 32, 32], "runtime.options.calibration_data")
    np.savez(str(tmp_path / "c.npz"), inputs=np.ones((5, 3, 32, 32), np.float32))
    assert accuracy.load_inputs(tmp_path / "c.npz", [1, 3, 32, 32], "x").shape == (5, 3, 32, 32)


# ------------------------------------------------------ TensorRT and CUDA through onnxruntime's providers
def test_onnxruntime_tensorrt_provider_missing_lists_the_available_ones(tmp_path: Path) -> None:
    import onnxruntime

    from .conftest import build_model

    build_model(tmp_path / "model.onnx")
    available = onnxruntime.get_available_providers()
    if "TensorrtExecutionProvider" in available:
        pytest.skip("this onnxruntime has the TensorRT provider")
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime("onnxruntime").load(tmp_path / "model.onnx", spec(), 1, {"providers": [
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert str(e.value).startswith("runtime.options.providers: TensorrtExecutionProvider")
    assert str(e.value).endswith("not available in this onnxruntime (available: %s)" % ", ".join(available))


def test_onnxruntime_provider_that_fails_to_start_is_an_error(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu without its CUDA libraries lists the CUDA provider, then runs on the CPU: a stand-in session
    that drops the requested providers as it does must make the load fail, not measure the CPU."""
    import onnxruntime

    from .conftest import build_model

    real = onnxruntime.InferenceSession

    class DroppingSession(real):  # type: ignore[misc,valid-type]
        def __init__(self, path: str, sess_options: Any = None, providers: Any = None, **kw: Any) -> None:
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    build_model(tmp_path / "model.onnx")
    monkeypatch.setattr(onnxruntime, "InferenceSession", DroppingSession)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime("onnxruntime").load(tmp_path / "model.onnx", spec(), 1, {"providers": [
            "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert str(e.value) == ("runtime.options.providers: onnxruntime %s could not start TensorrtExecutionProvider, "
                            "CUDAExecutionProvider and would run on CPUExecutionProvider instead (check that the "
                            "CUDA, cuDNN and TensorRT libraries this onnxruntime was built for are installed)"
                            % onnxruntime.__version__)


# --------------------------------------------------------------- every backend, its runtime missing
@pytest.mark.parametrize("backend, modules, install", [
    ("onnxruntime", ["onnxruntime"], "pip install onnxruntime"),
    ("openvino", ["openvino"], "pip install openvino"),
    ("tflite", ["ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"],
     "pip install ai-edge-litert"),
    ("tensorrt", ["tensorrt"], "pip install tensorrt"),
    ("torch", ["torch"], "pip install torch"),
])
def test_a_missing_runtime_names_itself_and_how_to_install_it(monkeypatch: pytest.MonkeyPatch, backend: str,
                                                             modules: Any, install: str) -> None:
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime(backend).version()
    assert ("runtime '%s'" % backend) in str(e.value) and install in str(e.value)
