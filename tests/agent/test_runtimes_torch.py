"""The torch backend with real torch on this machine's CPU, and edgeprune's TorchScript exporter that feeds it.

The conftest network (1x1 conv -> global average pool -> dense) written in torch is traced to TorchScript; with
the conftest weights its crafted shard scores top-1 0.5 / top-5 0.8, with random weights its outputs are compared
with onnxruntime on an ONNX file holding the same weights. The CUDA path runs only where torch sees a GPU.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from agent import RuntimeBackendError, runtimes  # noqa: E402
from agent.runner import run_job  # noqa: E402
from agent.schema import ArtifactSpec, Report, dumps, loads_job, loads_report  # noqa: E402

from .conftest import SHARD_TOP1, SHARD_TOP5, W, build_model, sha256  # noqa: E402
from .torch_models import Tiny

MakeJob = Callable[..., Path]
INFO_KEYS = {"torch_version", "device", "device_name", "cuda_version", "cudnn_version", "cudnn_benchmark",
             "precision", "num_threads", "batch_mode", "load_warnings"}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")


def script(module: Any, path: Path) -> Path:
    with warnings.catch_warnings(record=True):  # torch 2.9+: TorchScript is deprecated (still what devices load)
        warnings.simplefilter("always")
        torch.jit.save(torch.jit.trace(module.eval(), torch.zeros(1, 3, 32, 32)), str(path))
    return path


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The backend sets torch's (process-wide) thread count; give the rest of the test session its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def onnx_and_script(tmp_path: Path) -> Dict[str, Path]:
    path = tmp_path / "random.onnx"
    build_model(path)
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(rng.standard_normal(arr.shape).astype(np.float32), init.name))
    onnx.save(model, str(path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {"onnx": path, "script": script(Tiny(weights["conv_w"], weights["W"], weights["b"]), tmp_path / "r.pt")}


def spec(**kw: Any) -> ArtifactSpec:
    return ArtifactSpec(path="model.pt", sha256="a" * 64, format="torchscript", **kw)


def load(path: Path, options: Optional[Dict[str, Any]] = None, threads: int = 1, **kw: Any) -> runtimes.Session:
    return runtimes.get_runtime("torch").load(path, spec(**kw), threads, options or {})


def run(job_path: Path) -> Report:
    return run_job(loads_job(job_path.read_text()), job_path.parent)


def use_torch(d: Dict[str, Any], tmp: Path, options: Optional[Dict[str, Any]] = None) -> None:
    path = script(Tiny(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), W, np.zeros(10, np.float32)),
                  tmp / "model.pt")
    d["artifact"].update(path=path.name, sha256=sha256(path), format="torchscript")
    d["runtime"] = {"name": "torch", "threads": 1, "options": options or {}}


# ------------------------------------------------------------------------------------------------- CPU
def test_cpu_outputs_equal_onnxruntime(onnx_and_script: Dict[str, Path]) -> None:
    sess = load(onnx_and_script["script"])
    ref = runtimes.get_runtime("onnxruntime").load(onnx_and_script["onnx"], spec(), 1, {})
    assert sess.input_shape == [None, 3, 32, 32]
    rng = np.random.default_rng(1)
    for b in (1, 5, 2):
        x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
        got, want = sess.run(x), ref.run(x)
        assert got.shape == want.shape == (b, 10) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5 and np.abs(want).max() > 0.1


def test_info_and_threads(onnx_and_script: Dict[str, Path]) -> None:
    info = load(onnx_and_script["script"], threads=1).info
    assert set(info) == INFO_KEYS
    assert info["torch_version"] == torch.__version__ and info["device"] == "cpu" and info["device_name"] == "cpu"
    assert info["precision"] == "fp32" and info["num_threads"] == 1 and info["cudnn_benchmark"] is None
    assert all(w.startswith("DeprecationWarning: `torch.jit.load`") for w in info["load_warnings"])


def test_job_with_torch_matches_the_onnxruntime_job(job_dir: MakeJob, tmp_path: Path) -> None:
    ref = run(job_dir())
    r = run(job_dir(lambda d: use_torch(d, tmp_path)))
    assert ref.status == "ok" and r.status == "ok", r.error
    assert r.accuracy == ref.accuracy and r.accuracy is not None
    assert (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    assert r.timing is not None and r.timing.iterations >= 20 and r.timing.protocol["runtime"] == "torch"
    assert INFO_KEYS <= set(r.timing.protocol)
    assert r.identity is not None and r.identity.runtime == "torch"
    assert r.identity.runtime_version == torch.__version__
    assert loads_report(dumps(r)).status == "ok"


def test_batched_timing(job_dir: MakeJob, tmp_path: Path) -> None:
    r = run(job_dir(lambda d: (use_torch(d, tmp_path), d["timing"].update(batch_size=4))))
    assert r.status == "ok", r.error
    assert r.timing is not None and r.timing.batch_size == 4
    assert r.accuracy is not None and r.accuracy.top1 == SHARD_TOP1


# ----------------------------------------------------------------------------------------- refused options
@pytest.mark.parametrize("options, message", [
    ({"providers": ["CPUExecutionProvider"]}, "runtime.options.providers: unknown option for torch "
                                              "(knows: device, precision, cudnn_benchmark)"),
    ({"device": "gpu"}, "runtime.options.device: 'gpu' is not \"cpu\", \"cuda\" or \"cuda:N\""),
    ({"device": "cuda:x"}, "runtime.options.device: 'cuda:x' is not"),
    ({"precision": "bf16"}, "runtime.options.precision: 'bf16' is not one of fp32, fp16"),
    ({"precision": "fp16"}, "runtime.options.precision: fp16 needs a CUDA device; use fp32 on the CPU"),
    ({"cudnn_benchmark": True}, "runtime.options.cudnn_benchmark: applies to CUDA devices only"),
    ({"cudnn_benchmark": "yes"}, "runtime.options.cudnn_benchmark: must be true or false"),
])
def test_bad_options_are_refused_clearly(onnx_and_script: Dict[str, Path], options: Dict[str, Any],
                                         message: str) -> None:
    with pytest.raises(RuntimeBackendError) as e:
        load(onnx_and_script["script"], options)
    assert message in str(e.value)


def test_cuda_without_a_gpu_is_refused(onnx_and_script: Dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    with pytest.raises(RuntimeBackendError) as e:
        load(onnx_and_script["script"], {"device": "cuda"})
    assert str(e.value) == ("runtime.options.device: cuda but this torch %s has no usable CUDA device "
                            "(built for CUDA %s)" % (torch.__version__, torch.version.cuda))


def test_not_torchscript_is_a_backend_error(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(RuntimeBackendError, match="torch cannot load model.pt as TorchScript: "):
        load(tmp_path / "model.pt")


def test_not_installed_names_the_runtime_and_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime("torch").version()
    assert str(e.value).startswith("runtime 'torch' is not installed on this device (")
    assert "pip install torch" in str(e.value) and "JetPack" in str(e.value)


# ------------------------------------------------------------------------------------------------- CUDA
@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_outputs_track_the_cpu(onnx_and_script: Dict[str, Path], precision: str) -> None:
    cpu = load(onnx_and_script["script"])
    gpu = load(onnx_and_script["script"], {"device": "cuda:0", "precision": precision, "cudnn_benchmark": True})
    assert gpu.info["device"] == "cuda:0" and gpu.info["device_name"] == torch.cuda.get_device_name(0)
    assert gpu.info["cudnn_benchmark"] is True and gpu.info["precision"] == precision
    x = np.random.default_rng(2).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = gpu.run(x)
    assert got.dtype == np.float32
    assert np.abs(got - cpu.run(x)).max() <= (1e-4 if precision == "fp32" else 2e-2)


# ---------------------------------------------------------------------------------- the TorchScript exporter
def test_export_torchscript_is_verified_and_runs_on_the_agent(tmp_path: Path) -> None:
    from edgeprune import export, models

    model = models.build_model("resnet20")
    check = torch.from_numpy(np.random.default_rng(3).standard_normal((6, 3, 32, 32)).astype(np.float32))
    man = export.get_exporter("torchscript")(model, tmp_path / "r20.pt", check_inputs=check, model_name="resnet20",
                                             source_checkpoint_sha256="c" * 64, pruning_plan_sha256="p" * 64)
    assert man.format == "torchscript" and man.layout == "NCHW" and man.dynamic_batch
    assert man.verification.passed and man.verification.n == 6 and man.verification.max_abs_err <= 1e-5
    assert man.sha256 == sha256(tmp_path / "r20.pt")
    assert any("torch.jit.trace" in w for w in man.exporter["warnings"])  # recorded, not raised
    sess = load(tmp_path / "r20.pt", input_name=man.input_name, input_shape=man.input_shape)
    with torch.no_grad():
        ref = model.eval()(check).numpy()
    assert np.abs(sess.run(check.numpy()) - ref).max() <= 1e-5


def test_export_torchscript_outside_tolerance_is_not_shipped(tmp_path: Path) -> None:
    from edgeprune import export, models
    from edgeprune.errors import ExportError

    check = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ExportError, match="TorchScript artifact disagrees with torch.*not shipped"):
        export.export_torchscript(models.build_model("resnet20"), tmp_path / "r20.pt", check_inputs=check,
                                  model_name="resnet20", source_checkpoint_sha256="c" * 64,
                                  pruning_plan_sha256="p" * 64,
                                  tolerance=export.Tolerance(max_abs_err=-1.0))
    assert not (tmp_path / "r20.pt").exists()


def test_run_all_flattens_tuple_outputs_in_order(tmp_path: Path) -> None:
    from .torch_models import Heads

    model = Heads((12, 7, 3)).eval()
    path = script(model, tmp_path / "heads.pt")
    sess = runtimes.get_runtime("torch").load(path, ArtifactSpec(path="m", sha256="a" * 64), 1, {})
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = [t.numpy() for t in model(torch.from_numpy(x))]
    outs = sess.run_all(x)
    assert [o.shape for o in outs] == [(2, 12), (2, 7), (2, 3)]
    assert all(np.abs(o - w).max() <= 1e-5 for o, w in zip(outs, want))
    assert np.array_equal(sess.run(x), outs[0])
