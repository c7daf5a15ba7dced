from __future__ import annotations

import copy
import json

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


# ---------------------------------------------------------------------------------------------- criteria

CALIB = (torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 10)


@pytest.mark.parametrize("importance", sorted(prune.IMPORTANCE))
def test_every_criterion_prunes(model, importance):
    torch.manual_seed(0)
    res = prune.prune(model, 0.5, X, importance=importance, calib=CALIB if importance == "taylor" else None)
    assert res.plan.importance == importance and len(res.plan.layers) == 9 and not res.skipped
    assert res.macs_after < 0.55 * res.macs_before and model(X).shape == (1, 10)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_taylor_needs_calib(model):
    with pytest.raises(UsageError, match="calib.*taylor"):
        prune.prune(model, 0.5, X, importance="taylor")
    with pytest.raises(UsageError, match="calib: labels"):
        prune.prune(model, 0.5, X, importance="taylor", calib=(CALIB[0], CALIB[1].float()))
    with pytest.raises(UsageError, match="calib: labels must be class indices"):
        prune.prune(model, 0.5, X, importance="taylor", calib=(CALIB[0], CALIB[1] + 100))
    assert prune.prune(model, 0.0, X, importance="taylor").plan.layers == []  # nothing to prune: no gradients needed


def test_taylor_keeps_bn_statistics_and_gradient_flags(model):
    model.layer1[0].conv1.weight.requires_grad_(False)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    res = prune.prune(model, 0.0, X, importance="taylor", calib=CALIB, layer_ratios={"layer2.0.conv1": 0.5})
    assert [l.name for l in res.plan.layers] == ["layer2.0.conv1"]
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items() if k in stats and "layer2.0" not in k)
    assert not model.layer1[0].conv1.weight.requires_grad and model.layer2[0].conv1.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_bn_scale_keeps_largest_gammas(model):
    gamma = torch.tensor([0.1, -3.0, 0.2, 2.5, -0.05, 1.7, 0.3, -1.1, 0.9, 0.01, 2.2, -0.4, 1.3, 0.02, -2.9, 0.6])
    with torch.no_grad():
        model.layer1[0].bn1.weight.copy_(gamma)
    res = prune.prune(model, 0.0, X, importance="bn_scale", layer_ratios={"layer1.0.conv1": 0.5})
    assert res.plan.layers[0].keep == sorted(torch.argsort(gamma.abs(), descending=True)[:8].tolist())
    assert model.layer1[0].bn1.weight.abs().min() >= 0.9


def test_bn_scale_skips_groups_without_batchnorm():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    net(X)
    res = prune.prune(net, 0.5, X, importance="bn_scale")
    assert res.plan.layers == [] and set(res.skipped) == {"2", "4"} and "BatchNorm" in res.skipped["2"]


# ---------------------------------------------------------------------------------------------- groups, ratios

def test_prunable_groups_default_and_residual(model):
    groups = prune.prunable_groups(model, X)
    assert [g.name for g in groups] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert [g.channels for g in groups] == [16] * 3 + [32] * 3 + [64] * 3
    assert groups[0].members == ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"]
    res = {g.name: g for g in prune.prunable_groups(model, X, prune_residual=True)}
    assert len(res) == 11  # + one residual stream per stage 2 and 3 (stage 1's holds the protected stem)
    stream = res["layer2.0.conv2"]
    assert stream.producers == ["layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"] and stream.channels == 32
    assert {"layer2.0.shortcut", "layer3.0.shortcut", "layer3.0.conv1"} <= set(stream.members)
    assert "linear" in res["layer3.0.conv2"].members


def test_layer_ratios_prune_only_the_named_group(model):
    ref = copy.deepcopy(model)
    res = prune.prune(model, 0.0, X, layer_ratios={"layer2.1.conv1": 0.5})
    assert [(l.name, len(l.keep)) for l in res.plan.layers] == [("layer2.1.conv1", 16)]
    assert res.plan.layer_ratios == {"layer2.1.conv1": 0.5} and res.macs_after < res.macs_before
    changed = {k for k, v in model.state_dict().items() if v.shape != ref.state_dict()[k].shape}
    assert changed and all(k.startswith(("layer2.1.conv1", "layer2.1.bn1", "layer2.1.conv2")) for k in changed)


def test_layer_ratios_override_the_global_ratio(model):
    res = prune.prune(model, 0.5, X, layer_ratios={"layer1.0.conv1": 0.0, "layer3.2.conv1": 0.75})
    kept = {l.name: len(l.keep) for l in res.plan.layers}
    assert "layer1.0.conv1" not in kept and kept["layer3.2.conv1"] == 16 and kept["layer3.1.conv1"] == 32


@pytest.mark.parametrize("ratios,match", [
    ({"layer9.0.conv1": 0.5}, r"'layer9.0.conv1': no layer .*prunable groups: layer1.0.conv1, layer1.1.conv1"),
    ({"conv1": 0.5}, r"'conv1': it is not a layer whose output channels a prunable group removes .*protected"),
    ({"layer1.0.conv2": 0.5}, r"'layer1.0.conv2'.*protected"),
    ({"layer1.0.conv1": 1.0}, r"layer_ratios\['layer1.0.conv1'\]: must be a number in \[0, 1\)"),
    ({"layer1.0.conv1": "half"}, r"layer_ratios\['layer1.0.conv1'\]"),
])
def test_layer_ratios_errors(model, ratios, match):
    with pytest.raises(UsageError, match=match):
        prune.prune(model, 0.0, X, layer_ratios=ratios)


def test_layer_ratios_accept_a_producer_of_a_group(model):
    res = prune.prune(model, 0.0, X, prune_residual=True, round_to=8, layer_ratios={"layer2.2.conv2": 0.5})
    assert [(l.name, len(l.keep)) for l in res.plan.layers] == [("layer2.0.conv2", 16)]
    with pytest.raises(UsageError, match="'layer2.1.conv2' is in group 'layer2.0.conv2'"):
        prune.prune(copy.deepcopy(model), 0.0, X, prune_residual=True,
                    layer_ratios={"layer2.0.conv2": 0.5, "layer2.1.conv2": 0.25})


def _weaken_half(model, frac=1e-3):
    """Scale channels 8..15 of layer1.0's inner group (conv1 rows, bn1 scale, conv2 input) by ``frac``."""
    b = model.layer1[0]
    with torch.no_grad():
        b.conv1.weight[8:] *= frac
        b.bn1.weight[8:] *= frac
        b.conv2.weight[:, 8:] *= frac


def test_global_ranking_is_not_uniform_and_hits_the_total(model):
    _weaken_half(model)
    uniform = prune.prune(copy.deepcopy(model), 0.3, X)
    groups = prune.prunable_groups(model, X)
    total = sum(g.channels for g in groups)
    res = prune.prune(model, 0.3, X, global_ranking=True)
    assert res.plan.ranking == "global" and uniform.plan.ranking == "uniform"
    kept = {g.name: g.channels for g in groups}
    kept.update({l.name: len(l.keep) for l in res.plan.layers})
    assert sum(kept.values()) == total - int(total * 0.3)  # round_to=1: exactly the target
    first = res.plan.layers[0]
    assert first.name == "layer1.0.conv1" and set(first.keep) <= set(range(8))  # the weak half went first
    fractions = {n: kept[n] / g.channels for g in groups for n in [g.name]}
    assert max(fractions.values()) - min(fractions.values()) > 0.2
    assert {len(l.keep) for l in uniform.plan.layers} == {12, 23, 45}  # 16, 32, 64 each lose 30 %
    assert model(X).shape == (1, 10)


def test_global_ranking_ignores_a_groups_overall_scale(model):
    scaled = copy.deepcopy(model)
    b = scaled.layer2[1]
    with torch.no_grad():  # every weight l1 reads for this group, times 10: its scores are 10x, same spread
        b.conv1.weight *= 10
        b.bn1.weight *= 10
        b.conv2.weight *= 10
    a = prune.prune(model, 0.4, X, global_ranking=True).plan
    c = prune.prune(scaled, 0.4, X, global_ranking=True).plan
    assert [(l.name, l.keep) for l in a.layers] == [(l.name, l.keep) for l in c.layers]


def test_global_ranking_honours_round_to_and_min_channels(model):
    _weaken_half(model)
    groups = prune.prunable_groups(model, X)
    total = sum(g.channels for g in groups)
    res = prune.prune(model, 0.5, X, global_ranking=True, round_to=8, min_channels=16)
    kept = {g.name: g.channels for g in groups}
    kept.update({l.name: len(l.keep) for l in res.plan.layers})
    assert all(k % 8 == 0 and k >= 16 for k in kept.values())
    assert 0 <= sum(kept.values()) - (total - total // 2) < 8


def test_plan_v2_records_ranking_and_ratios_and_v1_still_replays(model, resnet20):
    res = prune.prune(model, 0.3, X, global_ranking=True, layer_ratios={"layer1.0.conv1": 0.5})
    text = res.plan.to_json()
    assert '"version":2' in text and '"ranking":"global"' in text
    assert prune.PruningPlan.from_json(text) == res.plan
    v1 = json.loads(text)
    for k in ("ranking", "layer_ratios", "prune_residual"):
        v1.pop(k)
    v1["version"] = 1
    v1_text = json.dumps(v1, sort_keys=True, separators=(",", ":"))
    plan = prune.PruningPlan.from_json(v1_text)
    assert plan.version == 1 and plan.to_json() == v1_text  # same JSON, same sha256 as written
    fresh = prune.apply_plan(copy.deepcopy(resnet20[0]).eval(), plan, X)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
    with pytest.raises(PruneError, match="unexpected field.*ranking"):
        prune.PruningPlan.from_json(v1_text[:-1] + ',"ranking":"global"}')


def test_output_layer_is_never_pruned(model):
    res = prune.prune(model, 0.5, X, ignored_layers=[])
    assert "linear" not in {l.name for l in res.plan.layers} and model(X).shape == (1, 10)
    assert "conv1" in {l.name for l in res.plan.layers}  # stem unprotected: stage 1's stream is one group


def test_grouped_convolutions_are_pruned_group_consistently():
    # the groups feeding and leaving a groups=2 conv are cut in 2 slices, each losing the same number of channels
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3, groups=2),
                              torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 3), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    net(X)
    net.eval()
    groups = prune.prunable_groups(net, X, ignored_layers=[])
    assert [(g.name, g.channel_groups) for g in groups] == [("0", 2), ("2", 2), ("4", 1)]
    prune.prune(net, 0.5, X, ignored_layers=[])
    assert (net[2].in_channels, net[2].out_channels, net[2].groups) == (4, 4, 2)
    assert net(X).shape == (len(X), 4)


@pytest.mark.parametrize("kw,match", [({"ignored_layers": [torch.nn.Conv2d(1, 1, 1)]}, "ignored_layers"),
                                      ({"prune_residual": True, "ignored_layers": []}, "prune_residual"),
                                      ({"layer_ratios": [("layer1.0.conv1", 0.5)]}, "layer_ratios"),
                                      ({"min_channels": 0}, "min_channels")])
def test_more_bad_arguments(model, kw, match):
    with pytest.raises(UsageError, match=match):
        prune.prune(model, 0.5, X, **kw)


def test_resnet56_done_when():
    """ResNet-56 (random weights: the structure is what counts), 50 % with round_to=8."""
    model = models.build_model("resnet56").eval()
    ref = copy.deepcopy(model)
    res = prune.prune(model, 0.5, X, round_to=8)
    macs0, _ = prune.count(ref, X)
    macs1, _ = prune.count(model, X)
    assert (macs0, macs1) == (res.macs_before, res.macs_after) and macs0 / macs1 >= 1.9
    ref_convs = dict(ref.named_modules())
    pruned = [(n, m) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Conv2d) and m.out_channels != ref_convs[n].out_channels]
    assert len(pruned) == 27 and all(m.out_channels % 8 == 0 for _, m in pruned)
    assert model(X).shape == (1, 10)


def test_untraceable_inputs_are_a_prune_error(model):
    with pytest.raises(PruneError, match="cannot trace CifarResNet on example_inputs"):
        prune.prunable_groups(model, torch.zeros(1, 4, 32, 32))
    with pytest.raises(PruneError, match="cannot run CifarResNet on example_inputs"):
        prune.prune(model, 0.5, torch.zeros(1, 4, 32, 32))
