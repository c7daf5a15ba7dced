"""`edgeprune prune`: one model → pruned → recovered → verified artifacts, through the console command."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from edgeprune import data, export, models, prune
from host.commands.pruning import PruneOptions, load_model, run_prune

from .test_demo import edgeprune


def test_prune_cli_half_aligned_writes_verified_artifact_and_replayable_plan(tmp_path, resnet20):
    out = tmp_path / "out"
    r = edgeprune("prune", "--model", "resnet20", "--ratio", "0.5", "--align", "8", "--formats", "onnx",
                  "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    record = json.loads((out / "prune.json").read_text())
    assert record["macs_reduction"] > 1.8 and record["macs_after"] < record["macs_before"]
    assert record["recovery"]["kind"] == "bn-recalibration"
    onnx_file = out / record["artifacts"][0]["file"]
    manifest = json.loads(next(out.glob("*.manifest.json")).read_text())
    assert manifest["sha256"] == models.sha256_file(onnx_file)
    plan = prune.PruningPlan.from_json((out / "plan.json").read_text())
    assert manifest["pruning_plan_sha256"] == plan.sha256() and plan.round_to == 8
    assert all(len(layer.keep) % 8 == 0 for layer in plan.layers) and len(plan.layers) == 9
    # the plan replayed on the original checkpoint gives the artifact's structure (weights differ: BN recalibrated)
    replayed = prune.apply_plan(copy.deepcopy(resnet20[0]), plan, torch.zeros(1, 3, 32, 32))
    assert prune.count(replayed, torch.zeros(1, 3, 32, 32))[0] == record["macs_after"]


def test_prune_ratio_zero_exports_dense_model_unchanged(tmp_path, resnet20):
    out = tmp_path / "dense"
    res = run_prune(PruneOptions(model="resnet20", out=out, ratio=0.0, formats=("onnx",)))
    assert res.macs_after == res.macs_before and res.recovery == {"kind": "none"}
    assert res.top1_pruned == res.top1_dense
    assert prune.PruningPlan.from_json((out / "plan.json").read_text()).layers == []
    x = data.to_tensor_batch(data.eval_split(2).images)
    with torch.no_grad():
        ref = resnet20[0](x).numpy()
    assert np.abs(export.run_artifact(out / res.artifacts[0]["manifest"], x) - ref).max() < 1e-4


def test_prune_from_checkpoint_file_with_short_finetune(tmp_path, resnet20):
    ck = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet20[0].state_dict().items()}}, ck)
    name, model, meta = load_model(str(ck))
    assert name == "resnet20" and meta["sha256"] == models.sha256_file(ck)
    out = tmp_path / "ft"
    res = run_prune(PruneOptions(model=str(ck), out=out, ratio=0.3, finetune_minutes=0.05, finetune_per_class=4,
                                 eval_per_class=5))
    assert res.recovery["kind"] == "finetune" and res.recovery["steps_done"] >= 1
    assert not (out / "finetune.ckpt").exists()  # removed once the artifacts are written
    assert res.eval_n == 50 and 0.0 <= res.top1_pruned <= 1.0


def test_prune_taylor_uses_a_labelled_calib_batch(tmp_path):
    res = run_prune(PruneOptions(model="resnet20", out=tmp_path / "t", ratio=0.5, importance="taylor",
                                 eval_per_class=5))
    plan = prune.PruningPlan.from_json((tmp_path / "t" / "plan.json").read_text())
    assert plan.importance == "taylor" and len(plan.layers) == 9 and res.macs_reduction > 1.8
    x, y = data.calib_split().tensors(4)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


@pytest.mark.parametrize("args, needle", [
    (["--ratio", "1.5"], "--ratio"),
    (["--ratio", "0.5", "--formats", "onnx,bogus"], "format"),
    (["--ratio", "0.5", "--align", "0"], "--align"),
    (["--ratio", "0.5", "--importance", "magic"], "--importance"),
    (["--ratio", "0.5", "--sparsity", "1:8"], "--sparsity"),
    (["--ratio", "0.5", "--distill", "2"], "--distill"),
])
def test_prune_bad_arguments_exit_2_naming_the_argument(tmp_path, args, needle):
    r = edgeprune("prune", "--model", "resnet20", "--out", str(tmp_path / "o"), *args, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o" / "prune.json").exists()


def test_prune_model_that_is_not_a_checkpoint_exit_2_naming_the_file(tmp_path):
    bad = tmp_path / "notes.th"
    bad.write_text("not a checkpoint")
    r = edgeprune("prune", "--model", str(bad), "--ratio", "0.5", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and str(bad) in r.stderr, r.stderr
    r = edgeprune("prune", "--model", "resnet999", "--ratio", "0.5", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode == 2 and "resnet999" in r.stderr and "resnet20" in r.stderr, r.stderr
