"""Issue 5's acceptance check: ResNet-56 pruned 50 % with channels aligned to 8, exported for every CPU runtime.

MACs reduced ≥ 1.9× (counted), every pruned conv's output channels a multiple of 8, ONNX / OpenVINO / TFLite-fp32
agreeing with torch on top-1 for ≥ 99.9 % of a 2,000-image stratified eval shard, and TFLite int8 top-1 within
1 pp of fp32. Runs ``edgeprune prune`` itself (the library entry point behind the command).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgeprune import data, export, models, prune
from host.commands.pruning import PruneOptions, run_prune

from .conftest import needs_full_data

pytestmark = [pytest.mark.slow, needs_full_data]


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    pytest.importorskip("litert_torch")
    pytest.importorskip("openvino")
    out = tmp_path_factory.mktemp("r56")
    # no BN recalibration: the plan replayed on the checkpoint is then exactly the exported model
    res = run_prune(PruneOptions(model="resnet56", out=out, ratio=0.5, align=8, recalibrate=False,
                                 formats=("onnx", "openvino", "tflite", "tflite-int8")))
    return res, out


def test_macs_and_alignment(pruned):
    res, out = pruned
    assert res.macs_reduction >= 1.9, res.macs_reduction
    plan = prune.PruningPlan.from_json((out / "plan.json").read_text())
    base = models.build_model("resnet56")
    model = prune.apply_plan(copy.deepcopy(base), plan, torch.zeros(1, 3, 32, 32))
    pruned_convs = [(n, m.out_channels) for (n, m), (_, b) in zip(model.named_modules(), base.named_modules())
                    if isinstance(m, torch.nn.Conv2d) and m.out_channels != b.out_channels]
    assert len(pruned_convs) == 27 and all(c % 8 == 0 for _, c in pruned_convs), pruned_convs


def test_exports_agree_with_torch_on_2000_images_and_int8_within_1pp(pruned):
    res, out = pruned
    model, _ = models.pretrained("resnet56")
    model = prune.apply_plan(model, prune.PruningPlan.from_json((out / "plan.json").read_text()),
                             torch.zeros(1, 3, 32, 32)).eval()
    shard = data.eval_split(200)
    assert len(shard) == 2000
    x = data.to_tensor_batch(shard.images)
    with torch.no_grad():
        ref = torch.cat([model(x[s]) for s in data.batches(len(x), 250)]).numpy()
    agree = {fmt: export.agreement(out / f"{res.tag}.{fmt}.manifest.json", x, ref) for fmt in
             ("onnx", "openvino", "tflite")}
    assert all(a >= 0.999 for a in agree.values()), agree
    top1 = {fmt: float(np.mean(export.run_artifact(out / f"{res.tag}.{fmt}.manifest.json", x).argmax(1)
                               == shard.labels)) for fmt in ("tflite", "tflite-int8")}
    assert abs(top1["tflite-int8"] - top1["tflite"]) <= 0.01, top1
    record = json.loads((out / "prune.json").read_text())
    assert [a["format"] for a in record["artifacts"]] == ["onnx", "openvino", "tflite", "tflite-int8"]
