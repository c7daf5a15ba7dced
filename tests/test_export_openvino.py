"""The OpenVINO IR exporters (``openvino``: FP32 weights, ``openvino-fp16``: weights compressed to FP16) on the
bundled ResNet-20: an .xml + .bin pair, both hashed in the manifest, checked on OpenVINO's CPU plugin with the f32
precision hint against torch, and deleted, both files, when outside tolerance.

openvino is imported at the top of this module, i.e. while pytest collects, before any test has run litert-torch:
``import openvino`` sends a telemetry event from a forked process, and once JAX (loaded by litert-torch in
tests/test_export_tflite.py) has started its threads, JAX warns about any fork, which this suite turns into an error.
"""
from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch

ov = pytest.importorskip("openvino")

from edgeprune import data, export  # noqa: E402
from edgeprune.errors import ExportError, UsageError  # noqa: E402
from edgeprune.exporters import base  # noqa: E402
from edgeprune.exporters import openvino as openvino_exporter  # noqa: E402

IDS = dict(model_name="resnet20", source_checkpoint_sha256="c" * 64, pruning_plan_sha256="p" * 64)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def check(eval_split: data.Split) -> torch.Tensor:
    return data.to_tensor_batch(eval_split.images[::50])  # 20 images, 2 per class


@pytest.fixture(scope="module")
def irs(tmp_path_factory: pytest.TempPathFactory, resnet20: Any, check: torch.Tensor) -> Dict[str, Any]:
    d = tmp_path_factory.mktemp("openvino-export")
    return {"dir": d, **{fmt: export.export(resnet20[0], fmt, d, check_inputs=check, tag="r20", **IDS)
                         for fmt in ("openvino", "openvino-fp16")}}


@pytest.mark.parametrize("fmt, precision, stem", [("openvino", "fp32", "r20"), ("openvino-fp16", "fp16", "r20.fp16")])
def test_ir_is_an_xml_bin_pair_hashed_in_the_manifest(irs: Dict[str, Any], fmt: str, precision: str,
                                                      stem: str) -> None:
    d, man = irs["dir"], irs[fmt]
    xml, bin_ = d / f"{stem}.xml", d / f"{stem}.bin"
    assert man.file == xml.name and man.sha256 == _sha(xml)
    assert man.files == {xml.name: _sha(xml), bin_.name: _sha(bin_)}
    assert man.format == "openvino-ir" and man.export_format == fmt and man.precision == precision
    assert man.input_name == "input" and man.output_name == "logits" and man.layout == "NCHW"
    assert man.input_shape == [1, 3, 32, 32] and man.dynamic_batch and man.input_dtype == "float32"
    assert man.target_runtime is None and man.runtime_options == {}
    assert man.exporter["openvino"] == ov.__version__ and man.exporter["compress_to_fp16"] == (precision == "fp16")
    assert man.exporter["onnx_verification"]["passed"]
    on_disk = export.Manifest.read(d / f"r20.{fmt}.manifest.json")
    assert on_disk == man and export.find_manifest(xml) == d / f"r20.{fmt}.manifest.json"
    man.check_files(d)
    assert sorted(p.name for p in d.iterdir()) == sorted([  # both formats of one tag; no temporary files left
        "r20.xml", "r20.bin", "r20.openvino.manifest.json",
        "r20.fp16.xml", "r20.fp16.bin", "r20.openvino-fp16.manifest.json"])
    ET.parse(xml)  # well-formed IR


def test_fp32_ir_matches_torch_tightly(irs: Dict[str, Any]) -> None:
    v = irs["openvino"].verification
    assert v.passed and v.n == 20 and v.max_abs_err < 1e-4 and v.cosine > 0.999999 and v.top1_agreement == 1.0
    assert "CPU, inference precision f32" in v.checked_with  # the f32 hint, read back from the compiled model
    assert v.tolerance == export.Tolerance().to_dict()


def test_fp16_ir_has_half_the_weights_and_fp16_tolerance(irs: Dict[str, Any]) -> None:
    d = irs["dir"]
    man, v = irs["openvino-fp16"], irs["openvino-fp16"].verification
    assert (d / "r20.fp16.bin").stat().st_size < 0.55 * (d / "r20.bin").stat().st_size
    assert v.passed and v.top1_agreement == 1.0 and v.tolerance == base.FP16_TOLERANCE.to_dict()
    assert 1e-4 < v.max_abs_err < base.FP16_TOLERANCE.max_abs_err  # fp16 rounding shows, within bounds
    assert v.cosine >= base.FP16_TOLERANCE.min_cosine and "inference precision f32" in v.checked_with
    assert man.quantization is not None and man.quantization["weights"] == "float16"


def test_ir_runs_like_torch_on_other_images(irs: Dict[str, Any], resnet20: Any, eval_split: data.Split) -> None:
    x = data.to_tensor_batch(eval_split.images[1::10])
    with torch.no_grad():
        ref = resnet20[0].eval()(x)
    for fmt in ("openvino", "openvino-fp16"):
        assert export.agreement(irs["dir"] / f"r20.{fmt}.manifest.json", x, ref) >= 0.99


def test_ir_that_disagrees_is_deleted_with_its_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       resnet20: Any, check: torch.Tensor) -> None:
    real = openvino_exporter.run_openvino

    def broken(path: Path, x: np.ndarray, threads: int = 1):  # a runtime returning the wrong class order
        out, how = real(path, x, threads)
        return [np.roll(o, 1, axis=1) for o in out], how  # every output, in order

    monkeypatch.setattr(openvino_exporter, "run_openvino", broken)
    with pytest.raises(ExportError, match=r"r20\.fp16\.xml: OpenVINO IR fp16 artifact disagrees with torch .* not "
                                          r"shipped: deleted \(and r20\.fp16\.bin\)"):
        export.export(resnet20[0], "openvino-fp16", tmp_path, check_inputs=check, tag="r20", **IDS)
    assert list(tmp_path.iterdir()) == []  # no .xml, .bin, manifest or temporary folder


def test_impossible_tolerance_refuses_the_ir(tmp_path: Path, resnet20: Any, check: torch.Tensor) -> None:
    with pytest.raises(ExportError, match="OpenVINO IR fp32 artifact disagrees with torch.*not shipped"):
        export.export_openvino(resnet20[0], tmp_path / "m.xml", check_inputs=check,
                               tolerance=export.Tolerance(max_abs_err=0.0, min_cosine=1.1), **IDS)
    assert list(tmp_path.iterdir()) == []


def test_bad_openvino_arguments_are_usage_errors(tmp_path: Path, resnet20: Any, check: torch.Tensor) -> None:
    with pytest.raises(UsageError, match="path: an OpenVINO IR artifact is an .xml file .*got m.onnx"):
        export.export_openvino(resnet20[0], tmp_path / "m.onnx", check_inputs=check, **IDS)
    with pytest.raises(UsageError, match="precision: openvino export supports fp32 and fp16 .*got 'int8'"):
        export.export_openvino(resnet20[0], tmp_path / "m.xml", check_inputs=check, precision="int8", **IDS)
    with pytest.raises(UsageError, match="precision: openvino-fp16 export produces fp16, not 'fp32'; use format "
                                         "openvino"):
        export.export(resnet20[0], "openvino-fp16", tmp_path, check_inputs=check, precision="fp32", **IDS)
    assert list(tmp_path.iterdir()) == []


def test_fixed_batch_ir(tmp_path: Path, resnet20: Any, check: torch.Tensor) -> None:
    man = export.export(resnet20[0], "openvino", tmp_path, check_inputs=check, dynamic_batch=False, tag="f", **IDS)
    assert man.verification.passed and not man.dynamic_batch
    model = ov.Core().read_model(str(tmp_path / "f.xml"))
    assert model.input(0).get_partial_shape().is_static
    assert json.loads((tmp_path / "f.openvino.manifest.json").read_text())["dynamic_batch"] is False
