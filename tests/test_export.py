from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from edgeprune import data, export, prune
from edgeprune.errors import ExportError, UsageError


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
    v = export.compare(ref, bad, export.Tolerance())
    assert not v.passed and v.top1_agreement == 0.75
    assert export.compare(ref, ref, export.Tolerance()).passed


def test_fixed_batch_export(tmp_path, pruned, eval_split):
    model, _ = pruned
    man = _export(model, tmp_path / "fixed.onnx", eval_split, dynamic_batch=False)
    assert man.verification.passed and not man.dynamic_batch


def test_bad_opset_and_format(tmp_path, pruned, eval_split):
    with pytest.raises(UsageError, match="opset"):
        _export(pruned[0], tmp_path / "m.onnx", eval_split, opset=19)
    with pytest.raises(UsageError, match="unknown export format 'coreml'"):
        export.get_exporter("coreml")
