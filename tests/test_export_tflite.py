"""The TFLite exporter (litert-torch) on the bundled ResNet-20, checked with LiteRT's interpreter, and one
ResNet-20 measured through every CPU runtime on this machine by the agent: the same top-1 as torch.

The int8 export of ResNet-20 (PT2E calibration + conversion, ~40 s on 2 cores) is marked slow; the int8 path is
also exercised, on a small network, by tests/agent/test_runtimes_tflite.py.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytest
import torch

pytest.importorskip("ai_edge_litert.interpreter")
pytest.importorskip("litert_torch")

from agent.schema import dumps, job_from_dict, loads_report  # noqa: E402
from edgeprune import data, export  # noqa: E402
from edgeprune.errors import ExportError, UsageError  # noqa: E402

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
    v = man.verification
    assert v.passed and v.n == 20 and v.max_abs_err <= 1e-4 and v.top1_agreement == 1.0
    assert man.sha256 == hashlib.sha256(fp32["path"].read_bytes()).hexdigest()
    assert man.exporter["name"] == "litert_torch.convert" and man.exporter["litert_torch"]
    man.write(fp32["dir"] / "r20.manifest.json")
    assert json.loads((fp32["dir"] / "r20.manifest.json").read_text())["layout"] == "NHWC"


def test_registry_knows_the_new_formats() -> None:
    assert export.get_exporter("tflite") is export.export_tflite
    assert export.get_exporter("torchscript") is export.export_torchscript
    with pytest.raises(UsageError, match="unknown export format 'coreml'; known: onnx, tflite, torchscript"):
        export.get_exporter("coreml")


def test_bad_precision_and_missing_calibration_are_usage_errors(tmp_path: Path, resnet20: Any) -> None:
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(UsageError, match="precision: tflite export supports fp32 and int8, got 'fp16'"):
        export.export_tflite(resnet20[0], tmp_path / "m.tflite", check_inputs=x, precision="fp16", **IDS)
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
    if importlib.util.find_spec("openvino") is not None:  # not imported here: see agent_top1
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
