"""The TFLite exporters (litert-torch: ``tflite`` fp32, ``tflite-fp16``, ``tflite-int8``) on the bundled ResNet-20,
checked with LiteRT's interpreter; the ``edgetpu`` exporter with a stand-in ``edgetpu_compiler``; top-1 agreement
of the ONNX, OpenVINO and TFLite artifacts with torch on the 1,000-image eval split; and one ResNet-20 measured
through every CPU runtime on this machine by the agent: the same top-1 as torch.

The int8 export of ResNet-20 (PT2E calibration + conversion, ~40 s on 2 cores) is marked slow; the int8 path is
also exercised, on a small network, by the edgetpu test here and by tests/agent/test_runtimes_tflite.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("litert_torch")
if importlib.util.find_spec("openvino") is not None:
    # imported while pytest collects, before litert-torch starts JAX's threads: see tests/test_export_openvino.py
    import openvino  # noqa: F401

from agent.schema import dumps, job_from_dict, loads_report  # noqa: E402
from edgeprune import data, export  # noqa: E402
from edgeprune.errors import ExportError, ToolchainError, UsageError  # noqa: E402
from edgeprune.exporters import base, edgetpu  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
IDS = dict(model_name="resnet20", source_checkpoint_sha256="c" * 64, pruning_plan_sha256="p" * 64)


@pytest.fixture(scope="module")
def subset() -> data.Split:
    return data.eval_split(20)  # 200 images, 20 per class


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory, resnet20: Any, subset: data.Split) -> Dict[str, Any]:
    d = tmp_path_factory.mktemp("tflite-export")
    man = export.get_exporter("tflite")(resnet20[0], d / "r20.tflite",
                                        check_inputs=data.to_tensor_batch(subset.images[::10]), **IDS)
    return {"dir": d, "manifest": man, "path": d / "r20.tflite"}


def test_fp32_export_is_verified_and_described(fp32: Dict[str, Any]) -> None:
    man = fp32["manifest"]
    assert man.format == "tflite" and man.precision == "fp32" and man.quantization is None
    assert man.layout == "NHWC" and man.input_shape == [1, 32, 32, 3] and not man.dynamic_batch
    assert man.input_dtype == "float32" and man.input_name == "serving_default_args_0"
    assert man.export_format == "tflite" and man.files == {"r20.tflite": man.sha256}
    v = man.verification
    assert v.passed and v.n == 20 and v.max_abs_err <= 1e-4 and v.top1_agreement == 1.0
    assert man.sha256 == hashlib.sha256(fp32["path"].read_bytes()).hexdigest()
    assert man.exporter["name"] == "litert_torch.convert" and man.exporter["litert_torch"]
    man.write(fp32["dir"] / "r20.manifest.json")
    assert json.loads((fp32["dir"] / "r20.manifest.json").read_text())["layout"] == "NHWC"


def test_registry_knows_the_new_formats() -> None:
    assert export.get_exporter("tflite") is export.export_tflite
    assert export.get_exporter("torchscript") is export.export_torchscript
    assert export.get_exporter("tflite-int8").keywords == {"precision": "int8"}
    assert export.get_exporter("tflite-fp16").keywords == {"precision": "fp16"}
    with pytest.raises(UsageError, match="unknown export format 'coreml'; known: edgetpu, onnx, openvino, "
                                         "openvino-fp16, tensorrt, tflite, tflite-fp16, tflite-int8, torchscript"):
        export.get_exporter("coreml")


def test_bad_precision_and_missing_calibration_are_usage_errors(tmp_path: Path, resnet20: Any) -> None:
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(UsageError, match="precision: tflite export supports fp32, fp16 and int8, got 'bf16'"):
        export.export_tflite(resnet20[0], tmp_path / "m.tflite", check_inputs=x, precision="bf16", **IDS)
    with pytest.raises(UsageError, match="calib_inputs: int8 tflite export needs a calibration batch"):
        export.export_tflite(resnet20[0], tmp_path / "m.tflite", check_inputs=x, precision="int8", **IDS)
    assert not (tmp_path / "m.tflite").exists()


def test_artifact_outside_tolerance_is_deleted_and_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 10)).eval()
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    with pytest.raises(ExportError, match="TFLite fp32 artifact disagrees with torch.*not shipped"):
        export.export_tflite(model, tmp_path / "m.tflite", check_inputs=x, tolerance=export.Tolerance(min_cosine=1.1),
                             **IDS)
    assert not (tmp_path / "m.tflite").exists()


@pytest.mark.slow
def test_int8_export_of_resnet20_tracks_torch(tmp_path: Path, resnet20: Any, subset: data.Split) -> None:
    """Full-integer PT2E int8, calibrated on the bundled calib split (200 images), checked on 200 eval images."""
    cal = data.to_tensor_batch(data.calib_split(20).images)
    check = data.to_tensor_batch(subset.images)
    man = export.export_tflite(resnet20[0], tmp_path / "r20-int8.tflite", check_inputs=check, precision="int8",
                               calib_inputs=cal, **IDS)
    v = man.verification
    assert v.passed and v.n == 200 and v.top1_agreement >= 0.9 and v.cosine >= 0.98
    q = man.quantization
    assert q is not None and q["calibration_n"] == 200
    assert q["input"]["dtype"] == "int8" and q["output"]["dtype"] == "int8" and q["input"]["scale"] > 0
    assert man.input_dtype == "float32" and man.layout == "NHWC"  # the agent feeds floats and quantizes them
    assert man.export_format == "tflite-int8" and man.verification.tolerance["max_abs_err"] is None


def test_fp16_export_is_smaller_and_agrees_on_top1(tmp_path: Path, fp32: Dict[str, Any], resnet20: Any,
                                                   subset: data.Split) -> None:
    """tflite-fp16 through export(): fp16 weights (ai-edge-quantizer), about half the fp32 file, same top-1."""
    check = data.to_tensor_batch(subset.images[::10])
    man = export.export(resnet20[0], "tflite-fp16", tmp_path, check_inputs=check, tag="r20", **IDS)
    path = tmp_path / "r20.fp16.tflite"
    assert man.format == "tflite" and man.export_format == "tflite-fp16" and man.precision == "fp16"
    assert man.files == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    assert (tmp_path / "r20.tflite-fp16.manifest.json").is_file() and man.layout == "NHWC"
    assert path.stat().st_size < 0.6 * fp32["path"].stat().st_size
    v = man.verification
    assert v.passed and v.top1_agreement == 1.0 and v.tolerance == base.FP16_TOLERANCE.to_dict()
    assert 1e-4 < v.max_abs_err < base.FP16_TOLERANCE.max_abs_err  # fp16 weights, not the fp32 model
    assert man.quantization is not None and man.quantization["weights"] == "float16"
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path))
    assert any(t["dtype"] == np.float16 for t in interp.get_tensor_details())
    x = data.to_tensor_batch(subset.images)
    with torch.no_grad():
        ref = resnet20[0].eval()(x)
    assert export.agreement(path, x, ref) >= 0.99  # its manifest found beside it


def test_onnx_openvino_tflite_agree_with_torch_on_the_eval_split(fp32: Dict[str, Any], resnet20: Any,
                                                                  eval_split: data.Split) -> None:
    """The done-when check, on ResNet-20 and the bundled 1,000-image eval split: top-1 agreement with torch."""
    model = resnet20[0].eval()
    x = data.to_tensor_batch(eval_split.images)
    with torch.no_grad():
        ref = torch.cat([model(x[sl]) for sl in data.batches(len(x), 250)])
    d = fp32["dir"]
    check = data.to_tensor_batch(eval_split.images[::100])
    export.export(model, "onnx", d, check_inputs=check, tag="agree", **IDS)
    artifacts = {"onnx": d / "agree.onnx.manifest.json", "tflite": fp32["path"]}
    if importlib.util.find_spec("openvino") is not None:
        export.export(model, "openvino", d, check_inputs=check, tag="agree", **IDS)
        artifacts["openvino"] = d / "agree.openvino.manifest.json"
    got = {name: export.agreement(path, x, ref) for name, path in artifacts.items()}
    assert got == {name: pytest.approx(1.0, abs=0.002) for name in artifacts}, got


# ------------------------------------------------------------------------------------------------ Edge TPU
# A stand-in for Coral's edgetpu_compiler 16.0: the same arguments (-s, -o DIR, -m N, MODEL), the same files
# (DIR/<model>_edgetpu.tflite and DIR/<model>_edgetpu.log) and the same console and log format as the real one
# (https://coral.ai/docs/edgetpu/compiler/). FAKE_EDGETPU_MODE: "partial" (one QUANTIZE left on the CPU), "all",
# "none" (nothing mapped), "fail" (exit 1), "nolog" (no .log written; the table only on the console).
FAKE_COMPILER = r'''#!{python}
import os, sys
args = sys.argv[1:]
out_dir, model, i = ".", None, 0
while i < len(args):
    if args[i] in ("-o", "--out_dir", "-m", "--min_runtime_version"):
        if args[i] in ("-o", "--out_dir"):
            out_dir = args[i + 1]
        i += 2
        continue
    if not args[i].startswith("-"):
        model = args[i]
    i += 1
if os.environ.get("FAKE_EDGETPU_ARGV"):
    open(os.environ["FAKE_EDGETPU_ARGV"], "w").write("\n".join(args))
mode = os.environ.get("FAKE_EDGETPU_MODE", "partial")
print("Edge TPU Compiler version 16.0.384591198")
if mode == "fail":
    print("ERROR: Attempting to use a delegate that only supports static-sized tensors with a graph that has "
          "dynamic-sized tensors.", file=sys.stderr)
    print("Compilation failed!")
    sys.exit(1)
MAPPED = "Mapped to Edge TPU"
OTHER = "Operation is otherwise supported, but not mapped due to some unspecified limitation"
rows = {"partial": [("CONV_2D", 21, MAPPED), ("ADD", 9, MAPPED), ("MEAN", 1, MAPPED), ("FULLY_CONNECTED", 1, MAPPED),
                    ("QUANTIZE", 1, OTHER)],
        "all": [("CONV_2D", 21, MAPPED), ("ADD", 9, MAPPED), ("MEAN", 1, MAPPED), ("FULLY_CONNECTED", 1, MAPPED)],
        "none": [("CONV_2D", 21, OTHER), ("ADD", 9, "More than one subgraph is not supported")]}[
    "partial" if mode == "nolog" else mode]
base = os.path.splitext(os.path.basename(model))[0]
out, log = (os.path.join(out_dir, base + "_edgetpu" + ext) for ext in (".tflite", ".log"))
data = open(model, "rb").read()
open(out, "wb").write(data + b"EDGETPU")
table = "Operator                       Count      Status\n\n" + "".join(
    "%-31s%-11d%s\n" % row for row in rows)
if mode != "nolog":
    open(log, "w").write("Edge TPU Compiler version 16.0.384591198\nInput: %s\nOutput: %s\n\n%s"
                         % (model, out, table))
total = sum(r[1] for r in rows)
cpu = sum(r[1] for r in rows if r[2] != MAPPED)
print("Started a compilation timeout timer of 180 seconds.\n")
print("Model compiled successfully in 412 ms.\n")
print("Input model: %s\nInput size: %.2fKiB\nOutput model: %s\nOutput size: %.2fKiB" % (model, len(data) / 1024.0,
      out, (len(data) + 7) / 1024.0))
print("On-chip memory used for caching model parameters: 271.25KiB")
print("On-chip memory remaining for caching model parameters: 7.62MiB")
print("Off-chip memory used for streaming uncached model parameters: 0.00B")
print("Number of Edge TPU subgraphs: 1\nTotal number of operations: %d\nOperation log: %s\n" % (total, log))
if cpu:
    print("Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of the "
          "model will instead run on the CPU, which is slower. If possible, consider updating your model to use "
          "only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.")
    print("Number of operations that will run on Edge TPU: %d\nNumber of operations that will run on CPU: %d\n"
          % (total - cpu, cpu))
    print("Operator                       Count      Status\n")
    for row in rows:
        if row[2] != MAPPED:
            print("%-31s%-11d%s" % row)
    print("... All other operators were mapped successfully. See %s." % os.path.basename(log))
print("Compilation child process completed within timeout period.\nCompilation succeeded! ")
'''


@pytest.fixture
def fake_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``edgetpu_compiler`` on PATH: the stand-in above, in a folder of its own put first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "edgetpu_compiler"
    script.write_text(FAKE_COMPILER.replace("{python}", sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv(edgetpu.EDGETPU_COMPILER_ENV, raising=False)
    monkeypatch.setenv("FAKE_EDGETPU_ARGV", str(tmp_path / "argv.txt"))
    return script


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()


def test_edgetpu_export_compiles_the_verified_int8_model(tmp_path: Path, fake_compiler: Path) -> None:
    """A small network (its int8 conversion takes seconds, ResNet-20's ~40 s) through export() with the stand-in."""
    out = tmp_path / "out"
    man = export.export(_tiny(), "edgetpu", out, check_inputs=data.to_tensor_batch(data.eval_split(2).images),
                        calib_inputs=data.to_tensor_batch(data.calib_split(2).images), tag="tiny",
                        min_runtime_version=13, **IDS)
    path = out / "tiny_edgetpu.tflite"
    assert sorted(p.name for p in out.iterdir()) == ["tiny.edgetpu.manifest.json", "tiny_edgetpu.log",
                                                     "tiny_edgetpu.tflite"]
    assert path.read_bytes().endswith(b"EDGETPU")  # the compiler's output, not the int8 model it was given
    assert man.file == path.name and man.files == {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    assert man.format == "tflite" and man.export_format == "edgetpu" and man.precision == "int8"
    assert man.target_runtime == "tflite" and man.runtime_options == {"delegate": "edgetpu"}
    assert man.layout == "NHWC" and man.input_dtype == "float32" and man.quantization["input"]["dtype"] == "int8"
    e = man.edgetpu
    assert e is not None and e["compiler_version"] == "16.0.384591198" and e["subgraphs"] == 1
    assert (e["ops_total"], e["ops_on_edgetpu"], e["ops_on_cpu"]) == (33, 32, 1) and e["table_from"] == "log"
    assert e["log"] == "tiny_edgetpu.log" and e["on_chip_memory_used"] == "271.25KiB" and e["min_runtime_version"] == 13
    assert e["source_tflite_sha256"] != man.sha256 and len(e["source_tflite_sha256"]) == 64
    assert man.verification.passed and man.verification.top1_agreement >= 0.9  # the int8 model's check
    assert "was not run here" in man.warnings[0] and "1 of 33 operations run on the CPU" in man.warnings[1]
    assert "QUANTIZE x1" in man.warnings[1]
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert argv[:2] == ["-s", "-o"] and argv[3:5] == ["-m", "13"] and argv[-1].endswith("tiny.tflite")
    assert export.Manifest.read(out / "tiny.edgetpu.manifest.json") == man
    with pytest.raises(ExportError, match="an Edge TPU model runs only on an Edge TPU"):
        export.run_artifact(path, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("mode, counts, source", [("all", (32, 32, 0), "log"), ("nolog", (33, 32, 1), "stdout")])
def test_compile_edgetpu_reads_the_log_or_the_console(tmp_path: Path, fake_compiler: Path,
                                                       monkeypatch: pytest.MonkeyPatch, mode: str,
                                                       counts: Any, source: str) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", mode)
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    stats = edgetpu.compile_edgetpu(tmp_path / "m.tflite", tmp_path / "m_edgetpu.tflite")
    assert (stats["ops_total"], stats["ops_on_edgetpu"], stats["ops_on_cpu"]) == counts
    assert stats["table_from"] == source and stats["warnings"] == []
    assert (tmp_path / "m_edgetpu.tflite").read_bytes() == b"TFL3EDGETPU"
    assert (tmp_path / "m_edgetpu.log").is_file() == (mode != "nolog")


@pytest.mark.parametrize("mode, message", [
    ("none", "mapped none of the model's 30 operations to the Edge TPU .*not shipped"),
    ("fail", "(?s)edgetpu_compiler failed \\(exit 1\\): .*static-sized tensors"),
])
def test_compile_edgetpu_refusals_leave_nothing(tmp_path: Path, fake_compiler: Path, monkeypatch: pytest.MonkeyPatch,
                                                mode: str, message: str) -> None:
    monkeypatch.setenv("FAKE_EDGETPU_MODE", mode)
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    with pytest.raises(ExportError, match=message):
        edgetpu.compile_edgetpu(tmp_path / "m.tflite", tmp_path / "out.tflite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["argv.txt", "bin", "m.tflite"]


def test_edgetpu_without_the_compiler_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         resnet20: Any) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no edgetpu_compiler
    monkeypatch.delenv(edgetpu.EDGETPU_COMPILER_ENV, raising=False)
    x = torch.zeros(2, 3, 32, 32)
    want = ("edgetpu export needs the Edge TPU Compiler (edgetpu_compiler), which is not on PATH; it is packaged "
            "for x86-64 Debian/Ubuntu only, in Coral's apt repository")
    with pytest.raises(ToolchainError, match=re.escape(want) + ".*sudo apt-get install edgetpu-compiler"):
        export.export(resnet20[0], "edgetpu", tmp_path / "out", check_inputs=x, calib_inputs=x, **IDS)
    assert not (tmp_path / "out").exists()
    assert export.FORMATS["edgetpu"].available().startswith(want)
    monkeypatch.setenv(edgetpu.EDGETPU_COMPILER_ENV, str(tmp_path / "nope"))
    with pytest.raises(ToolchainError, match="EDGETPU_COMPILER: '.*nope' is not an executable program"):
        edgetpu.find_edgetpu_compiler()


def test_parse_edgetpu_output_of_a_partly_mapped_model() -> None:
    """The log and console of a real compile (edgetpu_compiler 15, YOLO-tiny int8), as Coral documents the format."""
    log = ("Edge TPU Compiler version 15.0.340273435\nInput: yolov3-tiny_int8.tflite\n"
           "Output: yolov3-tiny_int8_edgetpu.tflite\n\nOperator                       Count      Status\n\n"
           "MAX_POOL_2D                    6          More than one subgraph is not supported\n"
           "QUANTIZE                       2          Operation is otherwise supported, but not mapped due to some "
           "unspecified limitation\n"
           "QUANTIZE                       1          Mapped to Edge TPU\n"
           "QUANTIZE                       1          More than one subgraph is not supported\n"
           "CONV_2D                        1          Mapped to Edge TPU\n"
           "CONV_2D                        12         More than one subgraph is not supported\n"
           "RESIZE_NEAREST_NEIGHBOR        1          Operation version not supported\n"
           "LEAKY_RELU                     11         Operation not supported\n"
           "CONCATENATION                  1          More than one subgraph is not supported\n")
    console = ("Edge TPU Compiler version 15.0.340273435\n\nModel compiled successfully in 93 ms.\n\n"
               "Number of Edge TPU subgraphs: 1\nTotal number of operations: 36\n"
               "Number of operations that will run on Edge TPU: 2\nNumber of operations that will run on CPU: 34\n")
    stats = edgetpu.parse_edgetpu_output(log, console)
    assert (stats["ops_total"], stats["ops_on_edgetpu"], stats["ops_on_cpu"]) == (36, 2, 34)
    assert stats["mapped_fraction"] == round(2 / 36, 4) and stats["compiler_version"] == "15.0.340273435"
    assert len(stats["operators"]) == 9 and stats["operators"][-1] == {
        "op": "CONCATENATION", "count": 1, "status": "More than one subgraph is not supported"}
    with pytest.raises(ExportError, match="no operator table"):
        edgetpu.parse_edgetpu_output("Edge TPU Compiler version 16.0\n", "Compilation failed!\n")


# ---------------------------------------------------------------- one ResNet-20 through every CPU runtime
def agent_top1(artifact: Path, man: export.Manifest, runtime: str, shard: Path,
               options: Optional[Dict[str, Any]] = None, n: int = 200) -> float:
    job = job_from_dict({
        "schema_version": 1, "job_id": "x-" + runtime, "device_id": "local",
        "artifact": {"path": artifact.name, "sha256": man.sha256, "format": man.format, "input_name": man.input_name,
                     "input_shape": man.input_shape, "input_dtype": man.input_dtype, "layout": man.layout},
        "preprocess": {k: man.preprocess[k] for k in ("scale", "mean", "std")},
        "runtime": {"name": runtime, "threads": 1, "options": options or {}},
        "timing": {"warmup_iters": 1, "warmup_s": 0.0, "min_iters": 3, "min_duration_s": 0.0, "max_iters": 10,
                   "max_duration_s": 5.0, "cv_warn": 100.0},
        "power": None,
        "eval": {"path": shard.name, "sha256": hashlib.sha256(shard.read_bytes()).hexdigest(), "split": "eval-200",
                 "batch_size": 50},
        "timeout_s": 300.0,
    })
    # through `python -m agent run` as on a device: a fresh process per runtime (this one has JAX loaded by
    # litert-torch, whose fork warning OpenVINO's telemetry process would trigger, and torch's thread setting)
    job_path = artifact.parent / ("job-%s.json" % runtime)
    job_path.write_text(dumps(job))
    out = artifact.parent / ("report-%s.json" % runtime)
    r = subprocess.run([sys.executable, "-m", "agent", "run", str(job_path), "--out", str(out)], cwd=str(REPO),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = loads_report(out.read_text())
    assert report.status == "ok", report.error
    assert report.accuracy is not None and report.accuracy.n == n
    return report.accuracy.top1


def test_resnet20_same_top1_on_every_runtime(fp32: Dict[str, Any], resnet20: Any, subset: data.Split) -> None:
    d = fp32["dir"]
    shard = subset.save(d / "eval200.npz")
    model = resnet20[0].eval()
    with torch.no_grad():
        torch_top1 = float((model(data.to_tensor_batch(subset.images)).argmax(1).numpy() == subset.labels).mean())
    check = data.to_tensor_batch(subset.images[::10])
    onnx_man = export.export_onnx(model, d / "r20.onnx", check_inputs=check, **IDS)
    ts_man = export.export_torchscript(model, d / "r20.pt", check_inputs=check, **IDS)
    got = {"onnxruntime": agent_top1(d / "r20.onnx", onnx_man, "onnxruntime", shard),
           "tflite": agent_top1(fp32["path"], fp32["manifest"], "tflite", shard),
           "torch": agent_top1(d / "r20.pt", ts_man, "torch", shard)}
    if importlib.util.find_spec("openvino") is not None:  # run by the agent in a process of its own: see agent_top1
        got["openvino"] = agent_top1(d / "r20.onnx", onnx_man, "openvino", shard, {"precision": "f32"})
    assert torch_top1 > 0.8  # the real pretrained weights, not chance
    assert got == {k: torch_top1 for k in got}


@pytest.mark.slow
@pytest.mark.skipif(data.data_dir() is None or not (data.data_dir() / data.TEST_FILE).is_file(),
                    reason="needs the full CIFAR-10 test set and the ResNet-56 checkpoint (EDGEPRUNE_DATA)")
def test_resnet56_same_top1_on_onnxruntime_openvino_litert_within_0_1pp(tmp_path: Path) -> None:
    """One ResNet-56 artifact set, a 2,000-image stratified eval shard, measured by the agent on each runtime."""
    from edgeprune import models

    model, meta = models.pretrained("resnet56")
    subset = data.eval_split(200)
    assert len(subset) == 2000
    shard = subset.save(tmp_path / "eval2000.npz")
    with torch.no_grad():
        logits = torch.cat([model(data.to_tensor_batch(subset.images[sl])) for sl in data.batches(2000, 250)])
    torch_top1 = float((logits.argmax(1).numpy() == subset.labels).mean())
    ids = dict(model_name="resnet56", source_checkpoint_sha256=str(meta["sha256"]), pruning_plan_sha256="")
    check = data.to_tensor_batch(subset.images[::100])
    onnx_man = export.export_onnx(model, tmp_path / "r56.onnx", check_inputs=check, **ids)
    tfl_man = export.export_tflite(model, tmp_path / "r56.tflite", check_inputs=check, **ids)
    got = {"onnxruntime": agent_top1(tmp_path / "r56.onnx", onnx_man, "onnxruntime", shard, n=2000),
           "tflite": agent_top1(tmp_path / "r56.tflite", tfl_man, "tflite", shard, n=2000)}
    if importlib.util.find_spec("openvino") is not None:
        got["openvino"] = agent_top1(tmp_path / "r56.onnx", onnx_man, "openvino", shard, {"precision": "f32"}, n=2000)
    assert torch_top1 > 0.9
    for runtime, top1 in got.items():
        assert abs(top1 - torch_top1) <= 0.001, (runtime, top1, torch_top1)
