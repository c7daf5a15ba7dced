"""The OpenVINO backend, with the real runtime on this machine's CPU: outputs against onnxruntime, the precision
hint (always set, read back), option and device checks, IR artifacts, full jobs through ``run_job``, and the
2022.3 (``openvino.runtime``) and MYRIAD code paths with stand-ins for what this machine does not have."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from agent import ArtifactError, RuntimeBackendError, runtimes
from agent.runner import run_job
from agent.runtimes import openvino as ov_backend
from agent.schema import ArtifactSpec, Report, dumps, loads_job, loads_report

from .conftest import SHARD_TOP1, SHARD_TOP5, build_model, random_model, imports_of_job, sha256

ov = pytest.importorskip("openvino")

REPO = Path(__file__).resolve().parents[2]
MakeJob = Callable[..., Path]
INFO_KEYS = {"device", "device_name", "openvino_version", "model_format", "compile_config", "precision_hint",
             "inference_precision", "performance_hint", "inference_num_threads", "num_streams", "batch_mode"}


def spec(**kw: Any) -> ArtifactSpec:
    return ArtifactSpec(path="model.onnx", sha256="a" * 64, **kw)


def load(path: Path, options: Optional[Dict[str, Any]] = None, threads: int = 1,
         **spec_kw: Any) -> runtimes.Session:
    return runtimes.get_runtime("openvino").load(path, spec(**spec_kw), threads, options or {})


def load_ort(path: Path) -> runtimes.Session:
    return runtimes.get_runtime("onnxruntime").load(path, spec(), 1, {})


def run(job_path: Path) -> Report:
    return run_job(loads_job(job_path.read_text()), job_path.parent)


def use_openvino(d: Dict[str, Any], options: Optional[Dict[str, Any]] = None) -> None:
    d["runtime"] = {"name": "openvino", "threads": 1, "options": options or {}}


def save_ir(onnx_path: Path) -> Path:
    xml = onnx_path.with_suffix(".xml")
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return xml


# ------------------------------------------------------------------------------------- outputs and session
def test_outputs_equal_onnxruntime_at_f32(tmp_path: Path) -> None:
    path = random_model(tmp_path / "model.onnx")
    sess, ref = load(path, {"precision": "f32"}), load_ort(path)
    assert sess.input_name == "input" and sess.input_shape == [None, 3, 32, 32]
    rng = np.random.default_rng(1)
    for b in (1, 4, 7, 1):
        x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
        got, want = sess.run(x), ref.run(x)
        assert got.shape == want.shape == (b, 10) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(want).max() > 0.1  # a real comparison, not of zeros


def test_outputs_do_not_alias_the_request_buffers(tmp_path: Path) -> None:
    sess = load(random_model(tmp_path / "model.onnx"))
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    first = sess.run(x)
    kept = first.copy()
    sess.run(-x)
    assert np.array_equal(first, kept)


def test_dynamic_batch_is_compiled_static_per_batch_size(tmp_path: Path) -> None:
    path = random_model(tmp_path / "model.onnx")
    sess, ref = load(path), load_ort(path)
    assert isinstance(sess, ov_backend.OvSession)
    assert sess.info["batch_mode"] == "dynamic in the model; compiled static per batch size fed (batch 1 at load)"
    rng = np.random.default_rng(3)
    for b in (1, 2, 3, 4, 5, 6, 2):  # more sizes than the cache keeps: evicted ones are compiled again
        x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
        assert np.abs(sess.run(x) - ref.run(x)).max() <= 1e-4
        compiled = sess.compile(b)
        assert [d.get_length() for d in compiled.input(0).get_partial_shape()] == [b, 3, 32, 32]
    assert len(sess._compiled) <= ov_backend._OV_MAX_COMPILED


def test_fixed_batch_model_keeps_its_batch(tmp_path: Path) -> None:
    build_model(tmp_path / "fixed.onnx", batch=1)
    fixed = load(tmp_path / "fixed.onnx")
    assert fixed.input_shape == [1, 3, 32, 32] and fixed.info["batch_mode"] == "fixed 1"
    assert fixed.run(np.zeros((1, 3, 32, 32), np.float32)).shape == (1, 10)
    with pytest.raises(RuntimeBackendError, match="has a fixed batch of 1; cannot run a batch of 2"):
        fixed.run(np.zeros((2, 3, 32, 32), np.float32))


# ------------------------------------------------------------------------------------ precision and info
def test_precision_defaults_to_an_explicit_f32(tmp_path: Path) -> None:
    sess = load(random_model(tmp_path / "model.onnx"))  # no options at all
    info = sess.info
    assert set(info) == INFO_KEYS
    assert info["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"  # passed, not left to the CPU's default
    assert info["precision_hint"] == "f32" and info["inference_precision"] == "f32"  # read back: not bf16
    assert info["device"] == "CPU" and info["device_name"] == ov.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert info["performance_hint"] == "LATENCY" and info["num_streams"] == 1
    assert info["inference_num_threads"] == 1 and info["compile_config"]["INFERENCE_NUM_THREADS"] == "1"
    assert info["openvino_version"] == ov.__version__ == runtimes.get_runtime("openvino").version()
    assert info["model_format"] == "onnx"
    json.dumps(info)  # goes into the report as is


def test_asked_f32_reads_back_f32(tmp_path: Path) -> None:
    info = load(random_model(tmp_path / "model.onnx"), {"precision": "f32"}).info
    assert (info["precision_hint"], info["inference_precision"]) == ("f32", "f32")


@pytest.mark.parametrize("precision", ["f16", "bf16"])
def test_lower_precisions_are_passed_and_what_the_device_did_is_recorded(tmp_path: Path, precision: str) -> None:
    path = random_model(tmp_path / "model.onnx")
    sess = load(path, {"precision": precision})
    assert sess.info["precision_hint"] == precision == sess.info["compile_config"]["INFERENCE_PRECISION_HINT"]
    # what the CPU really did, read back: a CPU without native bf16/f16 (AVX2 only) runs f32; one with AVX512-BF16
    # and AMX but no native f16 (a Sapphire Rapids class Xeon) runs an f16 hint as bf16
    assert sess.info["inference_precision"] in (precision, "f32", "bf16")
    x = np.random.default_rng(4).standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.abs(sess.run(x) - load_ort(path).run(x)).max() <= 0.5


def test_threads_zero_leaves_the_thread_count_to_openvino(tmp_path: Path) -> None:
    info = load(random_model(tmp_path / "model.onnx"), threads=0).info
    assert "INFERENCE_NUM_THREADS" not in info["compile_config"]
    assert isinstance(info["inference_num_threads"], int)  # what OpenVINO chose, read back
    assert info["compile_config"]["NUM_STREAMS"] == "1" and info["num_streams"] == 1


def test_throughput_hint_still_runs_one_stream(tmp_path: Path) -> None:
    info = load(random_model(tmp_path / "model.onnx"), {"performance_hint": "THROUGHPUT"}).info
    assert info["performance_hint"] == "THROUGHPUT" and info["num_streams"] == 1


# ----------------------------------------------------------------------------------------- refused options
@pytest.mark.parametrize("options, message", [
    ({"num_threads": 2}, "runtime.options.num_threads: unknown option for openvino "
                         "(knows: device, precision, performance_hint)"),
    ({"providers": ["CPUExecutionProvider"]}, "runtime.options.providers: unknown option for openvino"),
    ({"precision": "fp16"}, "runtime.options.precision: 'fp16' is not one of f32, f16, bf16"),
    ({"precision": "FP32"}, "runtime.options.precision: 'FP32' is not one of f32, f16, bf16"),
    ({"performance_hint": "latency"}, "runtime.options.performance_hint: 'latency' is not one of LATENCY, THROUGHPUT"),
    ({"device": ""}, "runtime.options.device: must be a device name"),
    ({"device": ["CPU"]}, "runtime.options.device: must be a device name"),
])
def test_bad_options_are_refused_clearly(tmp_path: Path, options: Dict[str, Any], message: str) -> None:
    build_model(tmp_path / "model.onnx")
    with pytest.raises(RuntimeBackendError) as e:
        load(tmp_path / "model.onnx", options)
    assert message in str(e.value)


@pytest.mark.parametrize("device", ["MYRIAD", "GPU", "NPU", "cpu"])
def test_unknown_device_is_refused_with_the_available_ones(tmp_path: Path, device: str) -> None:
    build_model(tmp_path / "model.onnx")
    available = ov.Core().available_devices
    if device in available:
        pytest.skip("%s exists on this machine" % device)
    with pytest.raises(RuntimeBackendError) as e:
        load(tmp_path / "model.onnx", {"device": device})
    assert str(e.value) == ("runtime.options.device: %s not available in this openvino %s (available: %s)"
                            % (device, ov.__version__, ", ".join(available)))


@pytest.mark.parametrize("kw, message", [
    ({"input_shape": [1, 3, 64, 64]},
     "model input 'input' has shape [?, 3, 32, 32] but artifact.input_shape is [1, 3, 64, 64]"),
    ({"input_name": "images"}, "model input is named 'input' but artifact.input_name is 'images'"),
    ({"input_dtype": "uint8"}, "model input 'input' has type f32 but artifact.input_dtype is 'uint8'"),
])
def test_model_must_match_the_artifact_spec(tmp_path: Path, kw: Dict[str, Any], message: str) -> None:
    build_model(tmp_path / "model.onnx")
    with pytest.raises(RuntimeBackendError) as e:
        load(tmp_path / "model.onnx", **kw)
    assert message in str(e.value)


def test_unreadable_model_is_a_backend_error(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(RuntimeBackendError, match="openvino cannot read the model model.onnx: "):
        load(tmp_path / "model.onnx")


# ----------------------------------------------------------------------------------------------- IR files
def test_ir_artifact_gives_the_same_outputs(tmp_path: Path) -> None:
    path = random_model(tmp_path / "model.onnx")
    xml = save_ir(path)
    sess, ref = load(xml), load_ort(path)
    assert sess.info["model_format"] == "ir" and sess.input_shape == [None, 3, 32, 32]
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert np.abs(sess.run(x) - ref.run(x)).max() <= 1e-4


def test_ir_without_its_weights_is_an_artifact_error(tmp_path: Path) -> None:
    build_model(tmp_path / "model.onnx")
    xml = save_ir(tmp_path / "model.onnx")
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ArtifactError, match="OpenVINO IR model.xml needs its weights model.bin beside it"):
        load(xml)


# --------------------------------------------------------------------------------------- full jobs, runner
def test_registry_knows_openvino() -> None:
    assert "openvino" in runtimes.runtime_names()
    assert isinstance(runtimes.get_runtime("openvino"), ov_backend.OpenVino)


def test_job_with_openvino_matches_the_onnxruntime_job(job_dir: MakeJob) -> None:
    ref = run(job_dir())
    r = run(job_dir(use_openvino))
    assert ref.status == "ok" and r.status == "ok", r.error
    assert r.accuracy is not None and ref.accuracy is not None
    assert r.accuracy == ref.accuracy and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    t, tr = r.timing, ref.timing
    assert t is not None and tr is not None
    for key in ("batch_size", "warmup_iters", "min_iters", "min_duration_s", "seed", "threads", "input", "clock"):
        assert t.protocol[key] == tr.protocol[key]
    assert t.batch_size == tr.batch_size == 1 and t.protocol["stop_reason"] == "min_reached"
    assert t.iterations >= 20 and t.duration_s >= 0.05 and t.warmup_iters_done >= 3
    assert t.load_time_ms > 0 and t.first_inference_ms > 0
    assert t.latency_ms.min <= t.latency_ms.median <= t.latency_ms.p99 <= t.latency_ms.max
    assert t.throughput_ips == pytest.approx(t.iterations / t.duration_s)
    assert t.protocol["runtime"] == "openvino" and t.protocol["inference_precision"] == "f32"
    assert INFO_KEYS <= set(t.protocol)
    ident = r.identity
    assert ident is not None and ident.runtime == "openvino" and ident.runtime_version == ov.__version__
    assert ident.extra["runtime"]["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert r.power is not None and r.power.source == "model"
    assert loads_report(dumps(r)).status == "ok"  # the report, runtime info included, serialises


def test_batched_timing_and_fixed_batch_accuracy_through_the_runner(job_dir: MakeJob) -> None:
    r = run(job_dir(lambda d: (use_openvino(d), d["timing"].update(batch_size=4))))
    assert r.status == "ok", r.error
    assert r.timing is not None and r.timing.batch_size == 4
    assert r.timing.throughput_ips == pytest.approx(4 * r.timing.iterations / r.timing.duration_s)
    assert r.accuracy is not None and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)

    r = run(job_dir(use_openvino, batch=1))
    assert r.status == "ok", r.error
    assert r.accuracy is not None and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    assert r.identity is not None and r.identity.extra["runtime"]["batch_mode"] == "fixed 1"

    r = run(job_dir(lambda d: (use_openvino(d), d["timing"].update(batch_size=4)), batch=1))
    assert r.error is not None and "timing.batch_size: 4 but the model's batch dimension is fixed at 1" \
        in r.error.message


def test_ir_job_through_the_runner(job_dir: MakeJob, tmp_path: Path) -> None:
    def to_ir(d: Dict[str, Any]) -> None:
        use_openvino(d)
        xml = save_ir(tmp_path / "model.onnx")
        d["artifact"].update(path=xml.name, sha256=sha256(xml), format="openvino-ir")

    r = run(job_dir(to_ir))
    assert r.status == "ok", r.error
    assert r.accuracy is not None and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    assert r.identity is not None and r.identity.extra["runtime"]["model_format"] == "ir"


@pytest.mark.parametrize("options, error_type, message", [
    ({"device": "MYRIAD"}, "RuntimeBackendError", "runtime.options.device: MYRIAD not available"),
    ({"threads": 1}, "RuntimeBackendError", "runtime.options.threads: unknown option for openvino"),
])
def test_job_errors_are_reported(job_dir: MakeJob, options: Dict[str, Any], error_type: str, message: str) -> None:
    r = run(job_dir(lambda d: use_openvino(d, options)))
    assert r.status == "error" and r.error is not None
    assert r.error.type == error_type and message in r.error.message
    assert r.identity is not None and r.identity.runtime == "openvino" and r.timing is None


def test_openvino_job_imports_no_host_side_packages(job_dir: MakeJob) -> None:
    """In a fresh interpreter (the test process has torch loaded): the agent with OpenVINO, and nothing else."""
    job = job_dir(use_openvino)
    assert imports_of_job(job, "openvino") == {"rc": 0, "bad": [], "runtime_loaded": True}
    report = loads_report((job.parent / "r.json").read_text())
    assert report.status == "ok" and report.identity is not None and report.identity.runtime == "openvino"


# ------------------------------------------------------- 2022.3 and MYRIAD paths, with stand-ins for them
def test_not_installed_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(RuntimeBackendError, match="runtime 'openvino' is not installed on this device"):
        runtimes.get_runtime("openvino").version()


def test_2022_3_layout_is_used_when_openvino_has_no_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """2022.3 LTS has no ``openvino.Core``: everything comes from ``openvino.runtime``."""
    old = types.ModuleType("openvino")
    old.__path__ = []  # type: ignore[attr-defined]  # a package, so openvino.runtime can be imported
    rt = types.ModuleType("openvino.runtime")
    rt.Core, rt.PartialShape, rt.Tensor = ov.Core, ov.PartialShape, ov.Tensor  # type: ignore[attr-defined]
    rt.get_version = lambda: "2022.3.2-9279-e2c7e4d7b4d-releases/2022/3"  # type: ignore[attr-defined]
    old.runtime = rt  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "openvino", old)
    monkeypatch.setitem(sys.modules, "openvino.runtime", rt)
    assert runtimes.get_runtime("openvino").version() == "2022.3.2-9279-e2c7e4d7b4d-releases/2022/3"
    path = random_model(tmp_path / "model.onnx")
    sess = load(path)
    assert sess.info["openvino_version"].startswith("2022.3.2")
    x = np.random.default_rng(6).standard_normal((2, 3, 32, 32)).astype(np.float32)
    monkeypatch.undo()
    assert np.abs(sess.run(x) - load_ort(path).run(x)).max() <= 1e-4

    empty = types.ModuleType("openvino")
    empty.__path__ = []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "openvino", empty)
    monkeypatch.setitem(sys.modules, "openvino.runtime", None)
    with pytest.raises(RuntimeBackendError, match="has neither openvino.Core nor openvino.runtime.Core"):
        runtimes.get_runtime("openvino").version()


class _Compiled:
    """A compiled model as MYRIAD reports it: no precision, thread or stream properties."""

    SUPPORTED = {"SUPPORTED_PROPERTIES": "RO", "PERFORMANCE_HINT": "RW", "NETWORK_NAME": "RO"}

    def __init__(self, real: Any) -> None:
        self._real = real

    def get_property(self, key: str) -> Any:
        if key == "SUPPORTED_PROPERTIES":
            return dict(self.SUPPORTED)
        if key not in self.SUPPORTED:
            raise RuntimeError("Exception from src/plugins/myriad:\nUnsupported property %s by MYRIAD plugin" % key)
        return self._real.get_property(key)

    def create_infer_request(self) -> Any:
        return self._real.create_infer_request()

    def output(self, i: int) -> Any:
        return self._real.output(i)


class _MyriadCore:
    """OpenVINO 2022.3 with an NCS2 plugged in, the MYRIAD part played by the CPU plugin."""

    compiled: List[Tuple[str, Dict[str, str]]] = []

    def __init__(self) -> None:
        self._core = ov.Core()
        self.available_devices = ["CPU", "MYRIAD"]

    def read_model(self, *args: str) -> Any:
        return self._core.read_model(*args)

    def get_property(self, device: str, key: str) -> Any:
        if device != "MYRIAD":
            return self._core.get_property(device, key)
        return {"SUPPORTED_PROPERTIES": {"FULL_DEVICE_NAME": "RO", "PERFORMANCE_HINT": "RW",
                                         "AVAILABLE_DEVICES": "RO"},
                "FULL_DEVICE_NAME": "Intel Movidius Myriad X VPU"}[key]

    def compile_model(self, model: Any, device: str, config: Dict[str, str]) -> Any:
        _MyriadCore.compiled.append((device, dict(config)))
        if device != "MYRIAD":
            return self._core.compile_model(model, device, config)
        return _Compiled(self._core.compile_model(model, "CPU", {"PERFORMANCE_HINT": config["PERFORMANCE_HINT"]}))


@pytest.fixture
def myriad(monkeypatch: pytest.MonkeyPatch) -> List[Tuple[str, Dict[str, str]]]:
    _MyriadCore.compiled = []
    fake = ov_backend._Ov(_MyriadCore, ov.PartialShape, ov.Tensor, "2022.3.2-fake")
    monkeypatch.setattr(ov_backend, "_import_ov", lambda: fake)
    return _MyriadCore.compiled


def test_myriad_gets_no_precision_thread_or_stream_settings(myriad: List[Tuple[str, Dict[str, str]]],
                                                            tmp_path: Path) -> None:
    path = random_model(tmp_path / "model.onnx")
    sess = load(path, {"device": "MYRIAD"}, threads=4)
    assert myriad == [("MYRIAD", {"PERFORMANCE_HINT": "LATENCY"})]  # compiled once, static, at load
    info = sess.info
    assert info["device_name"] == "Intel Movidius Myriad X VPU"
    assert info["precision_hint"] is None and info["inference_precision"] is None  # not applied, and says so
    assert info["inference_num_threads"] is None and info["num_streams"] is None
    assert info["performance_hint"] == "LATENCY"
    x = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    # the stand-in MYRIAD compiles on this CPU with no precision hint: OpenVINO's CPU default, bf16 on a CPU with
    # AVX512-BF16 (a real MYRIAD runs f16); either is far within 1e-2 of f32 on this small model
    assert np.abs(sess.run(x) - load_ort(path).run(x)).max() <= 1e-2
    assert myriad[-1] == ("MYRIAD", {"PERFORMANCE_HINT": "LATENCY"})  # batch 2 compiled static on first use


def test_myriad_refuses_an_explicit_precision(myriad: List[Tuple[str, Dict[str, str]]], tmp_path: Path) -> None:
    build_model(tmp_path / "model.onnx")
    with pytest.raises(RuntimeBackendError, match="runtime.options.precision: device MYRIAD does not take "
                                                  "INFERENCE_PRECISION_HINT; leave it unset"):
        load(tmp_path / "model.onnx", {"device": "MYRIAD", "precision": "f16"})
    assert myriad == []


# ------------------------------------------------------------------------------------------ several outputs
def test_run_all_returns_every_output_in_the_model_order(tmp_path: Path) -> None:
    """A three-headed torch model, heads (12, 7, 3) named z, a, m: neither sorted by size nor by name. ONNX and IR
    give every output in the torch forward's order; ``run`` is output 0."""
    torch = pytest.importorskip("torch")
    from .torch_models import Heads, export_onnx

    model = Heads((12, 7, 3)).eval()
    export_onnx(model, tmp_path / "model.onnx", output_names=["z", "a", "m"])
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    for path in (tmp_path / "model.onnx", save_ir(tmp_path / "model.onnx")):
        sess = load(path)
        outs = sess.run_all(x)
        assert [o.shape for o in outs] == [(4, 12), (4, 7), (4, 3)], path.name
        assert all(o.dtype == np.float32 for o in outs)
        for got, ref in zip(outs, want):
            assert np.abs(got - ref).max() <= 1e-4 and np.abs(ref).max() > 0.1
        assert np.array_equal(sess.run(x), outs[0])
        again = sess.run_all(x[:1])
        assert np.abs(again[2] - want[2][:1]).max() <= 1e-4 and np.abs(outs[2] - want[2]).max() <= 1e-4  # no aliasing
