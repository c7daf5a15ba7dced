from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from dataclasses import asdict

import numpy as np
import onnx
import pytest
import torch

from edgeprune import data, export, prune
from edgeprune.errors import ExportError, ToolchainError, UsageError
from edgeprune.exporters import base


@pytest.fixture
def pruned(resnet20):
    model = copy.deepcopy(resnet20[0])
    res = prune.prune(model, 0.5, torch.zeros(1, 3, 32, 32))
    return model, res


def _export(model, path, eval_split, **kw):
    return export.export_onnx(model, path, check_inputs=data.to_tensor_batch(eval_split.images[::100]),
                              model_name="resnet20", source_checkpoint_sha256="c" * 64,
                              pruning_plan_sha256="p" * 64, **kw)


def test_onnx_export_is_verified_and_described(tmp_path, pruned, eval_split):
    model, res = pruned
    man = _export(model, tmp_path / "m.onnx", eval_split)
    assert man.verification.passed and man.verification.n == 10
    assert man.verification.max_abs_err < 1e-3 and man.verification.top1_agreement == 1.0
    graph = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version == 17
    assert [i.name for i in graph.graph.input] == ["input"]
    assert man.sha256 == __import__("hashlib").sha256((tmp_path / "m.onnx").read_bytes()).hexdigest()
    assert man.preprocess["mean"] == list(data.MEAN) and man.input_shape == [1, 3, 32, 32]
    man.write(tmp_path / "m.manifest.json")
    assert json.loads((tmp_path / "m.manifest.json").read_text())["pruning_plan_sha256"] == "p" * 64


def test_artifact_outside_tolerance_is_deleted_and_refused(tmp_path, pruned, eval_split):
    model, _ = pruned
    with pytest.raises(ExportError, match="disagrees with torch.*not shipped"):
        _export(model, tmp_path / "m.onnx", eval_split, tolerance=export.Tolerance(max_abs_err=0.0, min_cosine=1.1))
    assert not (tmp_path / "m.onnx").exists()


def test_compare_detects_a_wrong_artifact():
    ref = np.eye(4, 10, dtype=np.float32)
    bad = ref.copy()
    bad[0] = np.roll(bad[0], 1)
    v = base.compare(ref, bad, export.Tolerance())
    assert not v.passed and v.top1_agreement == 0.75
    assert base.compare(ref, ref, export.Tolerance()).passed


def test_fixed_batch_export(tmp_path, pruned, eval_split):
    model, _ = pruned
    man = _export(model, tmp_path / "fixed.onnx", eval_split, dynamic_batch=False)
    assert man.verification.passed and not man.dynamic_batch


def test_bad_opset_and_format(tmp_path, pruned, eval_split):
    with pytest.raises(UsageError, match="opset"):
        _export(pruned[0], tmp_path / "m.onnx", eval_split, opset=19)
    with pytest.raises(UsageError, match="unknown export format 'coreml'"):
        export.get_exporter("coreml")


# ------------------------------------------------------------------------------ registry, export(), manifest v2
IDS = dict(model_name="resnet20", source_checkpoint_sha256="c" * 64, pruning_plan_sha256="p" * 64)
ALL_FORMATS = ["edgetpu", "onnx", "openvino", "openvino-fp16", "tensorrt", "tflite", "tflite-fp16", "tflite-int8",
               "torchscript"]


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check(eval_split):
    return data.to_tensor_batch(eval_split.images[::100])


def test_registry_describes_every_format():
    assert sorted(export.FORMATS) == ALL_FORMATS
    for name, f in export.FORMATS.items():
        assert f.name == name and f.description and f.suffixes and f.precisions and f.checked_with
        assert f.manifest_format in ("onnx", "openvino-ir", "tflite", "torchscript") and f.runtimes
        assert export.get_exporter(name) is f.export and callable(f.requires)
    assert export.FORMATS["openvino"].suffixes == (".xml", ".bin")
    assert export.FORMATS["tflite-int8"].calibration and export.FORMATS["tflite-int8"].precisions == ("int8",)
    assert export.FORMATS["tensorrt"].precisions[0] == "fp16" and export.FORMATS["tensorrt"].runtimes == ("tensorrt",)
    assert export.FORMATS["onnx"].available() is None


def test_unknown_format_lists_the_known_ones(tmp_path, resnet20, eval_split):
    known = "known: " + ", ".join(ALL_FORMATS)
    with pytest.raises(UsageError, match=f"format: unknown export format 'coreml'; {known}$"):
        export.get_exporter("coreml")
    with pytest.raises(UsageError, match=f"unknown export format 'onnx-fp16'; {known}$"):
        export.export(resnet20[0], "onnx-fp16", tmp_path, check_inputs=_check(eval_split), **IDS)
    assert list(tmp_path.iterdir()) == []


TFLITE_HINT = "pip install litert-torch==0.10.0 ai-edge-litert==2.3.0 ai-edge-quantizer==0.10.0 (part of edgeprune's default install on Linux and arm64 macOS)"


@pytest.mark.parametrize("fmt, module, message", [
    ("openvino", "openvino", "openvino export needs openvino: pip install 'openvino>=2023.1' (part of edgeprune's default install)"),
    ("openvino-fp16", "openvino", "openvino-fp16 export needs openvino: pip install 'openvino>=2023.1' (part of edgeprune's default install)"),
    ("tflite", "litert_torch", "tflite export needs litert-torch: " + TFLITE_HINT),
    ("tflite-fp16", "litert_torch", "tflite-fp16 export needs litert-torch: " + TFLITE_HINT),
    ("tflite-int8", "litert_torch", "tflite-int8 export needs litert-torch: " + TFLITE_HINT),
    ("edgetpu", "litert_torch", "edgetpu export needs litert-torch: " + TFLITE_HINT),
    ("onnx", "onnxruntime", "onnx export needs onnxruntime: pip install onnxruntime"),
])
def test_missing_toolchain_is_one_clear_error(tmp_path, monkeypatch, resnet20, eval_split, fmt, module, message):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail, as when it is not installed
    assert export.FORMATS[fmt].available().startswith(message)
    with pytest.raises(ToolchainError, match=re.escape(message) + r" \(import .*ModuleNotFoundError"):
        export.export(resnet20[0], fmt, tmp_path / "out", check_inputs=_check(eval_split),
                      calib_inputs=_check(eval_split), **IDS)
    assert not (tmp_path / "out").exists()  # checked before anything is written
    assert issubclass(ToolchainError, ExportError)


def test_export_writes_artifact_and_manifest_v2(tmp_path, resnet20, eval_split):
    man = export.export(resnet20[0], "onnx", tmp_path, check_inputs=_check(eval_split), tag="r20", **IDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r20.onnx", "r20.onnx.manifest.json"]
    assert man.file == "r20.onnx" and man.files == {"r20.onnx": _sha(tmp_path / "r20.onnx")} == {man.file: man.sha256}
    assert man.format == man.export_format == "onnx" and man.version == export.MANIFEST_VERSION == 2
    assert man.target_runtime is None and man.runtime_options == {} and man.warnings == []
    assert man.verification.checked_with.startswith("onnxruntime ")
    assert man.verification.tolerance == {"max_abs_err": 1e-3, "min_cosine": 0.9999, "min_top1_agreement": 1.0}
    assert man.exporter["edgeprune"] and man.exporter["torch"] == torch.__version__
    assert export.manifest_path(tmp_path, "r20", "onnx") == tmp_path / "r20.onnx.manifest.json"
    assert export.find_manifest(tmp_path / "r20.onnx") == tmp_path / "r20.onnx.manifest.json"
    assert export.Manifest.read(tmp_path / "r20.onnx.manifest.json") == man
    # the default tag is the model name; another format of the same tag shares the folder
    m2 = export.export(resnet20[0], "torchscript", tmp_path, check_inputs=_check(eval_split), **IDS)
    assert m2.file == "resnet20.pt" and (tmp_path / "resnet20.torchscript.manifest.json").is_file()
    assert export.find_manifest(tmp_path / "resnet20.pt") == tmp_path / "resnet20.torchscript.manifest.json"


@pytest.fixture(scope="module")
def onnx_manifest(tmp_path_factory, resnet20, eval_split):
    d = tmp_path_factory.mktemp("onnx-manifest")
    return export.export(resnet20[0], "onnx", d, check_inputs=_check(eval_split), tag="r20", **IDS)


def test_reads_version_1_manifests(tmp_path, onnx_manifest):
    man = onnx_manifest
    raw = json.loads(json.dumps(asdict(man)))
    for key in ("files", "export_format", "target_runtime", "runtime_options", "edgetpu", "warnings"):
        del raw[key]
    for key in ("checked_with", "tolerance"):
        del raw["verification"][key]
    raw["version"] = 1
    (tmp_path / "v1.manifest.json").write_text(json.dumps(raw))
    old = export.Manifest.read(tmp_path / "v1.manifest.json")
    assert old.version == 2 and old.files == {"r20.onnx": man.sha256} and old.export_format == "onnx"
    assert old.verification.passed and old.verification.checked_with == ""
    # what host/benchmark.py does today still reads both versions
    raw["verification"] = export.Verification(**raw["verification"])
    assert export.Manifest(**raw).files == {"r20.onnx": man.sha256}
    tfl = dict(json.loads(json.dumps(asdict(man))), format="tflite", precision="int8", version=1)
    del tfl["export_format"]
    assert export.Manifest.from_dict(tfl).export_format == "tflite-int8"


@pytest.mark.parametrize("change, message", [
    ({"version": 3}, "version: 3 is not a manifest version this edgeprune reads"),
    ({"colour": "red"}, "colour: not a manifest field"),
    ({"file": "../r20.onnx"}, "file: '../r20.onnx' must be a plain file name"),
    ({"files": {"r20.onnx": "0" * 64, "sub/x.bin": "1" * 64}}, "files: must map plain file names"),
    ({"verification": {"n": 1}}, "not an edgeprune manifest"),
])
def test_bad_manifests_are_usage_errors(tmp_path, onnx_manifest, change, message):
    raw = dict(json.loads(json.dumps(asdict(onnx_manifest))), **change)
    (tmp_path / "bad.manifest.json").write_text(json.dumps(raw))
    with pytest.raises(UsageError, match=re.escape(message)):
        export.Manifest.read(tmp_path / "bad.manifest.json")


def test_export_option_errors_name_the_argument(tmp_path, resnet20, eval_split):
    x = _check(eval_split)
    with pytest.raises(UsageError, match=r"^opset: not an option of torchscript export \(it takes: input_shape, "
                                         r"tolerance\)$"):
        export.export(resnet20[0], "torchscript", tmp_path, check_inputs=x, opset=17, **IDS)
    with pytest.raises(UsageError, match="precision: onnx export produces fp32, not 'fp16'"):
        export.export(resnet20[0], "onnx", tmp_path, check_inputs=x, precision="fp16", **IDS)
    with pytest.raises(UsageError, match="precision: openvino export produces fp32, not 'fp16'; use format "
                                         "openvino-fp16"):
        export.export(resnet20[0], "openvino", tmp_path, check_inputs=x, precision="fp16", **IDS)
    with pytest.raises(UsageError, match="tag: '../r20' must be a plain file name"):
        export.export(resnet20[0], "onnx", tmp_path, check_inputs=x, tag="../r20", **IDS)
    with pytest.raises(UsageError, match="calib_inputs: tflite-int8 export needs a calibration batch"):
        export.export(resnet20[0], "tflite-int8", tmp_path, check_inputs=x, **IDS)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_target_is_the_verified_onnx_with_build_options(tmp_path, resnet20, eval_split):
    x = _check(eval_split)
    man = export.export(resnet20[0], "tensorrt", tmp_path, check_inputs=x, tag="a", **IDS)
    assert man.format == "onnx" and man.export_format == "tensorrt" and man.target_runtime == "tensorrt"
    assert man.precision == "fp16" and man.runtime_options == {"precision": "fp16"}
    assert man.files == {"a.trt.onnx": _sha(tmp_path / "a.trt.onnx")} and man.verification.passed
    assert man.verification.checked_with.startswith("onnxruntime") and "no TensorRT engine is built" in man.warnings[0]
    onnx.checker.check_model(onnx.load(str(tmp_path / "a.trt.onnx")))
    on_disk = json.loads((tmp_path / "a.tensorrt.manifest.json").read_text())
    assert on_disk["target_runtime"] == "tensorrt" and on_disk["format"] == "onnx"

    cal = data.to_tensor_batch(data.calib_split(2).images)
    m8 = export.export(resnet20[0], "tensorrt", tmp_path, check_inputs=x, calib_inputs=cal, tag="b",
                       precision="int8+fp16", sparsity=True, **IDS)
    assert m8.runtime_options == {"precision": "int8+fp16", "sparsity": True, "calibration_data": "b.trt.calib.npz"}
    assert set(m8.files) == {"b.trt.onnx", "b.trt.calib.npz"}
    assert m8.files["b.trt.calib.npz"] == _sha(tmp_path / "b.trt.calib.npz")
    with np.load(tmp_path / "b.trt.calib.npz") as z:  # what the agent's tensorrt calibrator reads
        assert z["inputs"].dtype == np.float32 and z["inputs"].shape == (20, 3, 32, 32)
    assert m8.quantization["calibration_n"] == 20

    with pytest.raises(UsageError, match="calib_inputs: tensorrt int8 needs a calibration batch"):
        export.export(resnet20[0], "tensorrt", tmp_path, check_inputs=x, precision="int8", tag="n", **IDS)
    with pytest.raises(UsageError, match=r"precision: tensorrt export produces fp16, fp32, int8, int8\+fp16, "
                                         r"not 'bf16'"):
        export.export(resnet20[0], "tensorrt", tmp_path, check_inputs=x, precision="bf16", tag="n", **IDS)
    assert not list(tmp_path.glob("n.*"))


def test_verify_or_delete_removes_every_file_of_the_artifact(tmp_path):
    files = [tmp_path / "m.xml", tmp_path / "m.bin"]
    for f in files:
        f.write_text("x")
    ref = np.eye(4, 10, dtype=np.float32)
    with pytest.raises(ExportError, match=r"m.xml: OpenVINO IR fp32 artifact disagrees with torch .*tolerance max abs "
                                          r"err <= 0.001.*not shipped: deleted \(and m.bin\)"):
        base.verify_or_delete(files, ref, np.roll(ref, 1, axis=1), export.Tolerance(), "OpenVINO IR fp32")
    assert not any(f.exists() for f in files)


def test_agreement_and_run_artifact_check_the_manifest(tmp_path, resnet20, eval_split):
    model = resnet20[0].eval()
    x = data.to_tensor_batch(eval_split.images[:50])
    with torch.no_grad():
        ref = model(x)
    export.export(model, "onnx", tmp_path, check_inputs=_check(eval_split), tag="r20", dynamic_batch=False, **IDS)
    assert export.agreement(tmp_path / "r20.onnx.manifest.json", x, ref) == 1.0
    assert export.agreement(tmp_path / "r20.onnx", x, ref.numpy()) == 1.0  # manifest found beside it
    assert export.agreement(tmp_path / "r20.onnx", x, -ref) < 0.2  # a wrong reference is not agreed with
    with pytest.raises(UsageError, match="reference_logits: shape"):
        export.agreement(tmp_path / "r20.onnx", x, ref[:10])
    with (tmp_path / "r20.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ExportError, match="r20.onnx: sha256 does not match its manifest"):
        export.run_artifact(tmp_path / "r20.onnx.manifest.json", x)
