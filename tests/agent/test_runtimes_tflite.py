"""The tflite backend with the real LiteRT interpreter (ai_edge_litert) on this machine's CPU.

The models are the conftest network (1x1 conv -> global average pool -> dense) written in torch and converted
by litert-torch in a session fixture, NHWC as litert-torch produces it with ``to_channel_last_io``: one with the
conftest weights (its crafted shard scores top-1 0.5 / top-5 0.8), one with random weights beside an ONNX file
holding the same weights (outputs compared with onnxruntime), and an int8 one made by edgeprune's
``export_tflite`` (PT2E full-integer quantization). The Edge TPU delegate is tested where this machine has no
Edge TPU: its library is missing, and the error must say how to install it. The ``tflite_runtime`` fallback is
exercised with a stand-in package that re-exports LiteRT's interpreter (tflite-runtime 2.14 crashes under numpy 2).
"""
from __future__ import annotations

import ctypes.util
import json
import os
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import numpy as np
import pytest

pytest.importorskip("ai_edge_litert.interpreter")
litert_torch = pytest.importorskip("litert_torch")
torch = pytest.importorskip("torch")

import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from agent import RuntimeBackendError, runtimes  # noqa: E402
from agent.runner import run_job  # noqa: E402
from agent.runtimes import tflite as tfl_backend  # noqa: E402
from agent.schema import ArtifactSpec, Report, dumps, loads_job, loads_report  # noqa: E402

from .conftest import SHARD, SHARD_TOP1, SHARD_TOP5, W, random_model, imports_of_job, sha256  # noqa: E402
from .torch_models import Tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MakeJob = Callable[..., Path]
NHWC = [1, 32, 32, 3]
INFO_KEYS = {"module", "version", "delegate", "delegate_library", "delegate_options", "xnnpack", "op_resolver",
             "num_threads", "input_tensor", "input_dtype", "input_quantization", "quantized_in_agent",
             "output_dtype", "output_quantization", "outputs", "output_order", "batch_mode"}


def onnx_weights(path: Path) -> Dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def convert_fp32(module: Any, path: Path, dynamic: bool) -> Path:
    """litert-torch fp32 conversion with NHWC input; ``dynamic``: a -1 batch in the shape signature."""
    wrapped = litert_torch.to_channel_last_io(module.eval(), args=[0]).eval()
    kw: Dict[str, Any] = {}
    if dynamic:  # a sample batch of 1 would be specialised to a constant
        kw["dynamic_shapes"] = {"args": ({0: torch.export.Dim("batch", min=1, max=1024)},)}
    sample = torch.zeros(2 if dynamic else 1, 32, 32, 3)
    with warnings.catch_warnings(record=True):  # litert-torch's FutureWarnings from torch internals
        warnings.simplefilter("always")
        litert_torch.convert(wrapped, (sample,), **kw).export(str(path))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Path]]:
    from edgeprune import export

    d = tmp_path_factory.mktemp("tflite-models")
    shown = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        onnx_path = random_model(d / "random.onnx", seed=0)
        weights = onnx_weights(onnx_path)
        random_module = Tiny(weights["conv_w"], weights["W"], weights["b"])
        conftest_module = Tiny(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), W, np.zeros(10, np.float32))
        rng = np.random.default_rng(1)
        calib = torch.from_numpy(rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
        export.export_tflite(random_module, d / "int8.tflite", check_inputs=calib[:32], model_name="tiny",
                             source_checkpoint_sha256="c" * 64, pruning_plan_sha256="p" * 64, precision="int8",
                             calib_inputs=calib)
        yield {"onnx": onnx_path, "random": convert_fp32(random_module, d / "random.tflite", dynamic=True),
               "crafted": convert_fp32(conftest_module, d / "crafted.tflite", dynamic=True),
               "crafted_fixed": convert_fp32(conftest_module, d / "crafted_fixed.tflite", dynamic=False),
               "int8": d / "int8.tflite"}
    finally:
        if shown is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = shown


def spec(**kw: Any) -> ArtifactSpec:
    base: Dict[str, Any] = {"input_name": "serving_default_args_0", "input_shape": list(NHWC), "layout": "NHWC"}
    base.update(kw)
    return ArtifactSpec(path="model.tflite", sha256="a" * 64, **base)


def load(path: Path, options: Optional[Dict[str, Any]] = None, threads: int = 1,
         **spec_kw: Any) -> runtimes.Session:
    return runtimes.get_runtime("tflite").load(path, spec(**spec_kw), threads, options or {})


def run(job_path: Path) -> Report:
    return run_job(loads_job(job_path.read_text()), job_path.parent)


def use_tflite(d: Dict[str, Any], model: Path, tmp: Path, options: Optional[Dict[str, Any]] = None) -> None:
    target = tmp / "model.tflite"
    target.write_bytes(model.read_bytes())
    d["artifact"].update(path=target.name, sha256=sha256(target), format="tflite",
                         input_name="serving_default_args_0", input_shape=list(NHWC), layout="NHWC")
    d["runtime"] = {"name": "tflite", "threads": 1, "options": options or {}}


# ------------------------------------------------------------------------------------- outputs and session
def test_fp32_outputs_equal_onnxruntime(models: Dict[str, Path]) -> None:
    sess = load(models["random"])
    ref = runtimes.get_runtime("onnxruntime").load(models["onnx"], ArtifactSpec(path="m", sha256="a" * 64), 1, {})
    assert sess.input_name == "serving_default_args_0" and sess.input_shape == [None, 32, 32, 3]
    rng = np.random.default_rng(2)
    for b in (1, 4, 7, 1):
        x = rng.standard_normal((b, 3, 32, 32)).astype(np.float32)
        got, want = sess.run(np.ascontiguousarray(x.transpose(0, 2, 3, 1))), ref.run(x)
        assert got.shape == want.shape == (b, 10) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-4
        assert np.abs(want).max() > 0.1  # a real comparison, not of zeros


def test_info_records_what_was_applied(models: Dict[str, Path]) -> None:
    info = load(models["random"], threads=2).info
    assert set(info) == INFO_KEYS
    import ai_edge_litert
    assert info["module"] == "ai_edge_litert" and info["version"] == "ai-edge-litert %s" % ai_edge_litert.__version__
    assert info["delegate"] is None and info["xnnpack"] is True and info["num_threads"] == 2
    assert info["input_dtype"] == "float32" and info["input_quantization"] is None
    assert info["quantized_in_agent"] is False and info["output_quantization"] is None
    assert info["batch_mode"] == "dynamic in the model; resized to the batch fed"
    json.dumps(info)
    assert load(models["random"], threads=0).info["num_threads"] is None  # 0: LiteRT's default


def test_signature_name_or_tensor_name_both_match(models: Dict[str, Path]) -> None:
    assert load(models["random"], input_name="args_0").input_name == "args_0"
    assert load(models["random"]).input_name == "serving_default_args_0"


def test_xnnpack_off_gives_the_same_outputs(models: Dict[str, Path]) -> None:
    on, off = load(models["random"]), load(models["random"], {"xnnpack": False})
    assert off.info["xnnpack"] is False and off.info["op_resolver"] == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    x = np.random.default_rng(3).standard_normal((3, 32, 32, 3)).astype(np.float32)
    assert np.abs(on.run(x) - off.run(x)).max() <= 1e-5


def test_fixed_batch_stays_fixed(models: Dict[str, Path]) -> None:
    sess = load(models["crafted_fixed"])
    assert sess.input_shape == NHWC and sess.info["batch_mode"] == "fixed 1"
    with pytest.raises(RuntimeBackendError, match="has a fixed batch of 1; cannot run a batch of 2"):
        sess.run(np.zeros((2, 32, 32, 3), np.float32))


def test_outputs_do_not_alias_interpreter_buffers(models: Dict[str, Path]) -> None:
    sess = load(models["random"])
    x = np.random.default_rng(4).standard_normal((2, 32, 32, 3)).astype(np.float32)
    first = sess.run(x)
    kept = first.copy()
    sess.run(-x)
    assert np.array_equal(first, kept)


# ------------------------------------------------------------------------------------------------- int8
def int8_details(path: Path) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=1)
    interp.allocate_tensors()
    return interp, interp.get_input_details()[0], interp.get_output_details()[0]


def test_int8_model_quantizes_inputs_and_dequantizes_outputs(models: Dict[str, Path]) -> None:
    interp, inp, out = int8_details(models["int8"])
    assert np.dtype(inp["dtype"]) == np.int8 and np.dtype(out["dtype"]) == np.int8  # full-integer I/O
    (s_in, z_in), (s_out, z_out) = inp["quantization"], out["quantization"]
    sess = load(models["int8"])
    assert sess.info["input_dtype"] == "int8" and sess.info["quantized_in_agent"] is True
    assert sess.info["input_quantization"] == {"scale": pytest.approx(s_in), "zero_point": z_in}
    assert sess.info["output_quantization"] == {"scale": pytest.approx(s_out), "zero_point": z_out}

    # known floats: exactly on the input grid, so quantizing them must give these integers back
    q = np.random.default_rng(5).integers(-128, 128, size=(1, 32, 32, 3)).astype(np.int8)
    x = ((q.astype(np.float32) - z_in) * np.float32(s_in)).astype(np.float32)
    interp.set_tensor(inp["index"], q)
    interp.invoke()
    raw = interp.get_tensor(out["index"])
    reference = (raw.astype(np.float32) - z_out) * np.float32(s_out)
    got = sess.run(x)
    assert got.dtype == np.float32 and np.array_equal(got, reference)
    # the same integers fed as they are (artifact.input_dtype "int8"); floats are still quantized
    raw_sess = load(models["int8"], input_dtype="int8")
    assert np.array_equal(raw_sess.run(q), reference) and np.array_equal(raw_sess.run(x), reference)
    assert len(np.unique(raw)) > 1  # a real comparison, not of a constant


def test_int8_model_tracks_torch(models: Dict[str, Path]) -> None:
    weights = onnx_weights(models["onnx"])
    module = Tiny(weights["conv_w"], weights["W"], weights["b"]).eval()
    x = np.random.default_rng(6).standard_normal((16, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    sess = load(models["int8"])
    got = np.concatenate([sess.run(np.ascontiguousarray(x[i:i + 1].transpose(0, 2, 3, 1))) for i in range(16)])
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.98 and (ref.argmax(1) == got.argmax(1)).mean() >= 0.9


def test_quantize_rounds_half_away_from_zero_and_saturates() -> None:
    x = np.array([0.5, 1.5, -0.5, -1.5, 0.49, 1000.0, -1000.0], dtype=np.float32)
    assert tfl_backend.quantize(x, 1.0, 0, np.int8).tolist() == [1, 2, -1, -2, 0, 127, -128]
    assert tfl_backend.quantize(x, 1.0, 10, np.uint8).tolist() == [11, 12, 9, 8, 10, 255, 0]
    assert tfl_backend.dequantize(np.array([-128, 0, 127], np.int8), 0.5, -1).tolist() == [-63.5, 0.5, 64.0]


# ----------------------------------------------------------------------------------------- refused options
@pytest.mark.parametrize("options, message", [
    ({"num_threads": 2}, "runtime.options.num_threads: unknown option for tflite "
                         "(knows: xnnpack, delegate, delegate_options)"),
    ({"providers": ["CPUExecutionProvider"]}, "runtime.options.providers: unknown option for tflite"),
    ({"xnnpack": "yes"}, "runtime.options.xnnpack: must be true or false"),
    ({"delegate": "gpu"}, "runtime.options.delegate: 'gpu' is not one of edgetpu (or null for none)"),
    ({"delegate_options": {"device": "usb"}}, "runtime.options.delegate_options: given without "
                                              "runtime.options.delegate"),
    ({"delegate": "edgetpu", "delegate_options": ["usb"]}, "runtime.options.delegate_options: must be an object"),
])
def test_bad_options_are_refused_clearly(models: Dict[str, Path], options: Dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeBackendError) as e:
        load(models["random"], options)
    assert message in str(e.value)


def test_edgetpu_delegate_without_its_library_says_how_to_install(models: Dict[str, Path]) -> None:
    if ctypes.util.find_library("edgetpu"):
        pytest.skip("this machine has the Edge TPU runtime")
    with pytest.raises(RuntimeBackendError) as e:
        load(models["random"], {"delegate": "edgetpu", "delegate_options": {"device": "usb:0"}})
    message = str(e.value)
    assert message.startswith("runtime.options.delegate: 'edgetpu' needs the Edge TPU runtime library "
                              "libedgetpu.so.1, which cannot be loaded (")
    assert "sudo apt-get install libedgetpu1-std" in message and "coral.ai" in message


@pytest.mark.parametrize("kw, message", [
    ({"input_shape": [1, 3, 32, 32], "layout": "NCHW"},
     "model input 'serving_default_args_0' has shape [?, 32, 32, 3] but artifact.input_shape is [1, 3, 32, 32]"),
    ({"input_name": "images"}, "model input is named 'serving_default_args_0' but artifact.input_name is 'images'"),
    ({"input_dtype": "int8"}, "model input 'serving_default_args_0' has type float32 but artifact.input_dtype is "
                              "'int8'"),
])
def test_model_must_match_the_artifact_spec(models: Dict[str, Path], kw: Dict[str, Any], message: str) -> None:
    with pytest.raises(RuntimeBackendError) as e:
        load(models["random"], **kw)
    assert message in str(e.value)


def test_unreadable_model_is_a_backend_error(tmp_path: Path) -> None:
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(RuntimeBackendError, match="ai-edge-litert .* cannot load the model model.tflite: "):
        load(tmp_path / "model.tflite")


# --------------------------------------------------------------------------------------- full jobs, runner
def test_job_with_tflite_matches_the_onnxruntime_job(job_dir: MakeJob, models: Dict[str, Path],
                                                     tmp_path: Path) -> None:
    ref = run(job_dir())
    r = run(job_dir(lambda d: use_tflite(d, models["crafted"], tmp_path)))
    assert ref.status == "ok" and r.status == "ok", r.error
    assert r.accuracy is not None and ref.accuracy is not None
    assert r.accuracy == ref.accuracy and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    t = r.timing
    assert t is not None and t.iterations >= 20 and t.protocol["runtime"] == "tflite"
    assert INFO_KEYS <= set(t.protocol)
    ident = r.identity
    assert ident is not None and ident.runtime == "tflite" and ident.runtime_version.startswith("ai-edge-litert ")
    assert ident.extra["runtime"]["module"] == "ai_edge_litert"
    assert loads_report(dumps(r)).status == "ok"


def test_fixed_batch_tflite_job_and_batched_timing(job_dir: MakeJob, models: Dict[str, Path],
                                                   tmp_path: Path) -> None:
    r = run(job_dir(lambda d: use_tflite(d, models["crafted_fixed"], tmp_path)))
    assert r.status == "ok", r.error
    assert r.accuracy is not None and (r.accuracy.top1, r.accuracy.top5) == (SHARD_TOP1, SHARD_TOP5)
    r = run(job_dir(lambda d: (use_tflite(d, models["crafted"], tmp_path), d["timing"].update(batch_size=4))))
    assert r.status == "ok", r.error
    assert r.timing is not None and r.timing.batch_size == 4


def test_shard_of_preprocessed_nhwc_inputs(job_dir: MakeJob, models: Dict[str, Path], tmp_path: Path) -> None:
    """The eval shard may hold preprocessed ``inputs`` in the artifact's layout (NHWC here) instead of images."""
    inputs = np.zeros((len(SHARD), 32, 32, 3), dtype=np.float32)
    for i, (c, _) in enumerate(SHARD):
        inputs[i, :, :, c] = 1.0
    shard = tmp_path / "inputs.npz"
    np.savez(str(shard), inputs=inputs, labels=np.array([label for _, label in SHARD]))

    def edit(d: Dict[str, Any]) -> None:
        use_tflite(d, models["crafted"], tmp_path)
        d["eval"].update(path=shard.name, sha256=sha256(shard))

    r = run(job_dir(edit))
    assert r.status == "ok", r.error
    assert r.accuracy is not None and (r.accuracy.n, r.accuracy.top1, r.accuracy.top5) == (10, SHARD_TOP1,
                                                                                              SHARD_TOP5)
    # NCHW inputs (torch's layout, in which the host writes a user's dataset) are transposed for the NHWC model
    np.savez(str(shard), inputs=inputs.transpose(0, 3, 1, 2).copy(), labels=np.array([label for _, label in SHARD]))
    r = run(job_dir(edit))
    assert r.status == "ok", r.error
    assert (r.accuracy.n, r.accuracy.top1, r.accuracy.top5) == (10, SHARD_TOP1, SHARD_TOP5)
    np.savez(str(shard), inputs=inputs[:, :16, :16, :].copy(), labels=np.zeros(10, np.int64))  # the wrong size
    r = run(job_dir(edit))
    assert r.error is not None and r.error.type == "EvalDataError"
    assert r.error.message == ("eval shard inputs have shape (10, 16, 16, 3) but the model input [1, 32, 32, 3] "
                               "wants (N, 32, 32, 3)")


@pytest.mark.parametrize("options, message", [
    ({"delegate": "edgetpu"}, "runtime.options.delegate: 'edgetpu' needs the Edge TPU runtime library"),
    ({"threads": 1}, "runtime.options.threads: unknown option for tflite"),
])
def test_job_errors_are_reported(job_dir: MakeJob, models: Dict[str, Path], tmp_path: Path,
                                 options: Dict[str, Any], message: str) -> None:
    if "delegate" in options and ctypes.util.find_library("edgetpu"):
        pytest.skip("this machine has the Edge TPU runtime")
    r = run(job_dir(lambda d: use_tflite(d, models["crafted"], tmp_path, options)))
    assert r.status == "error" and r.error is not None
    assert r.error.type == "RuntimeBackendError" and message in r.error.message
    assert r.identity is not None and r.identity.runtime == "tflite" and r.timing is None


def test_tflite_job_imports_no_host_side_packages(job_dir: MakeJob, models: Dict[str, Path],
                                                  tmp_path: Path) -> None:
    """In a fresh interpreter: the agent with LiteRT, and no torch, onnxruntime or host code."""
    job = job_dir(lambda d: use_tflite(d, models["crafted"], tmp_path))
    assert imports_of_job(job, "ai_edge_litert") == {"rc": 0, "bad": [], "runtime_loaded": True}
    assert loads_report((job.parent / "r.json").read_text()).status == "ok"


# --------------------------------------------------- tflite_runtime fallback and a missing runtime
def test_not_installed_names_the_runtime_and_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(RuntimeBackendError) as e:
        runtimes.get_runtime("tflite").version()
    assert str(e.value).startswith("runtime 'tflite' is not installed on this device (ai_edge_litert: ")
    assert "pip install ai-edge-litert" in str(e.value) and "tflite-runtime" in str(e.value)


def test_tflite_runtime_is_used_when_litert_is_missing(monkeypatch: pytest.MonkeyPatch,
                                                       models: Dict[str, Path]) -> None:
    """A stand-in ``tflite_runtime`` package re-exporting LiteRT's interpreter module (same API as 2.14)."""
    from ai_edge_litert import interpreter as litert_interpreter

    stand_in = types.ModuleType("tflite_runtime")
    stand_in.__path__ = []  # type: ignore[attr-defined]
    stand_in.__version__ = "2.14.0"  # type: ignore[attr-defined]
    stand_in.interpreter = litert_interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", stand_in)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", litert_interpreter)
    assert runtimes.get_runtime("tflite").version() == "tflite-runtime 2.14.0"
    sess = load(models["random"])
    assert sess.info["module"] == "tflite_runtime" and sess.info["version"] == "tflite-runtime 2.14.0"
    assert sess.run(np.zeros((1, 32, 32, 3), np.float32)).shape == (1, 10)


# ------------------------------------------------------------------------------------------ several outputs
def convert_nchw(module: Any, path: Path) -> Path:
    """litert-torch fp32 conversion of ``module`` as it is (NCHW input, batch 1)."""
    shown = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            litert_torch.convert(module.eval(), (torch.zeros(1, 3, 32, 32),)).export(str(path))
    finally:
        if shown is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = shown
    return path


@pytest.mark.parametrize("sizes, keys", [
    ((12, 7, 3), None),                          # a tuple: neither sorted by size nor by name
    (tuple(range(2, 14)), None),                 # 12 outputs: the signature lists output_10 before output_2
    ((5, 3), ("zeta", "alpha")),                 # a dict: the signature lists alpha before zeta
], ids=["tuple", "twelve", "dict"])
def test_run_all_gives_the_outputs_in_the_torch_order(tmp_path: Path, sizes: Any, keys: Any) -> None:
    from .torch_models import Heads

    model = Heads(sizes, keys=keys).eval()
    path = convert_nchw(model, tmp_path / "heads.tflite")
    sess = load(path, input_shape=[1, 3, 32, 32], layout="NCHW")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        y = model(torch.from_numpy(x))
    want = [t.numpy() for t in (y.values() if isinstance(y, dict) else y)]
    outs = sess.run_all(x)
    assert [o.shape for o in outs] == [(1, n) for n in sizes]
    assert all(np.abs(o - w).max() <= 1e-4 for o, w in zip(outs, want))
    assert np.array_equal(sess.run(x), outs[0])
    assert sess.info["output_order"] == ("subgraph" if keys else "signature output_N")
    assert len(sess.info["outputs"]) == len(sizes)


def test_output_order_from_tensor_names_and_from_the_subgraph() -> None:
    """The TF converter's ``StatefulPartitionedCall:N`` names are ordered by N; other names keep the subgraph's
    order (stand-in interpreters without signatures: what tflite_runtime without runners looks like)."""

    class NoSignatures:
        def get_signature_list(self) -> Dict[str, Any]:
            raise ValueError("no signatures")

    tf = [{"name": "StatefulPartitionedCall:1", "index": 7}, {"name": "StatefulPartitionedCall:0", "index": 9},
          {"name": "StatefulPartitionedCall:10", "index": 3}, {"name": "StatefulPartitionedCall:2", "index": 4}]
    ordered, how = tfl_backend.tfl_output_order(NoSignatures(), tf)
    assert [d["index"] for d in ordered] == [9, 7, 4, 3] and how == "tensor StatefulPartitionedCall:N"
    plain = [{"name": "b", "index": 2}, {"name": "a", "index": 1}]
    assert tfl_backend.tfl_output_order(NoSignatures(), plain) == (plain, "subgraph")
