from __future__ import annotations

import copy

import pytest
import torch

from edgeprune import models, prune
from edgeprune.errors import PruneError, UsageError

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model(resnet20):
    return copy.deepcopy(resnet20[0]).eval()


def test_zero_ratio_is_exact_identity(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = prune.prune(model, 0.0, X)
    assert res.plan.layers == [] and res.macs_after == res.macs_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_half_ratio_halves_block_internal_channels_and_keeps_residual_stream(model):
    ref = copy.deepcopy(model)
    res = prune.prune(model, 0.5, X)
    assert len(res.plan.layers) == 9  # one group per BasicBlock of ResNet-20
    for layer in (model.layer1, model.layer2, model.layer3):
        for block, ref_block in zip(layer, (ref.layer1, ref.layer2, ref.layer3)[[model.layer1, model.layer2, model.layer3].index(layer)]):
            assert block.conv1.out_channels == ref_block.conv1.out_channels // 2
            assert block.bn1.num_features == block.conv1.out_channels == block.conv2.in_channels
            assert block.conv2.out_channels == ref_block.conv2.out_channels
    assert res.macs_after < 0.55 * res.macs_before and res.params_after < res.params_before
    assert model(X).shape == (1, 10)


def test_plan_replays_to_identical_model(model, resnet20):
    res = prune.prune(model, 0.3, X)
    plan = prune.PruningPlan.from_json(res.plan.to_json())
    assert plan == res.plan and plan.sha256() == res.plan.sha256()
    fresh = prune.apply_plan(copy.deepcopy(resnet20[0]).eval(), plan, X)
    batch = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fresh(batch), model(batch))


def test_plan_keeps_highest_l1_channels(model):
    w = model.layer1[0].conv1.weight.detach().abs().sum((1, 2, 3))
    res = prune.prune(copy.deepcopy(model), 0.5, X)
    kept = res.plan.layers[0]
    assert kept.name == "layer1.0.conv1" and kept.channels == 16 and len(kept.keep) == 8
    # group importance also counts bn1 and conv2's input weights; the kept set must beat the dropped on L1 overall
    dropped = sorted(set(range(16)) - set(kept.keep))
    assert w[kept.keep].mean() > w[dropped].mean()


@pytest.mark.parametrize("n,ratio,round_to,min_ch,expect", [
    (64, 0.5, 1, 1, 32), (64, 0.3, 1, 1, 45), (64, 0.3, 8, 1, 48), (16, 0.9, 1, 4, 4), (16, 0.99, 8, 1, 8), (10, 0.0, 8, 1, 10)])
def test_kept_channels_alignment(n, ratio, round_to, min_ch, expect):
    assert prune.kept_channels(n, ratio, round_to, min_ch) == expect


def test_round_to_aligns_every_pruned_layer(model):
    res = prune.prune(model, 0.3, X, round_to=8)
    assert all(len(l.keep) % 8 == 0 for l in res.plan.layers)


@pytest.mark.parametrize("kw,match", [({"ratio": 1.0}, "ratio"), ({"ratio": -0.1}, "ratio"),
                                      ({"ratio": 0.5, "importance": "magic"}, "importance"),
                                      ({"ratio": 0.5, "round_to": 0}, "round_to")])
def test_bad_arguments(model, kw, match):
    ratio = kw.pop("ratio")
    with pytest.raises(UsageError, match=match):
        prune.prune(model, ratio, X, **kw)


def test_plan_that_does_not_fit_is_refused(model, resnet20):
    plan = prune.prune(model, 0.5, X).plan
    other = models.build_model("resnet32").eval()
    plan.layers[0].name = "layer9.0.conv1"
    with pytest.raises(PruneError, match="layer9.0.conv1"):
        prune.apply_plan(other, plan, X)
    plan.layers[0].name, plan.layers[0].channels = "layer1.0.conv1", 99
    with pytest.raises(PruneError, match="expects 99"):
        prune.apply_plan(copy.deepcopy(resnet20[0]), plan, X)


def test_plan_version_refused():
    with pytest.raises(PruneError, match="version 7"):
        prune.PruningPlan.from_json('{"version": 7, "layers": []}')
