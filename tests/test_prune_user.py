"""Bring your own model: pruning models written outside edgeprune (tests/user_models), with nothing registered.

* a two-headed MobileNetV3-style net (squeeze-excitation with hard-sigmoid, hard-swish, depthwise convs, a
  grouped conv): both heads protected, SE and grouped convs pruned consistently, plan replay, ONNX export;
* the akamaster CIFAR ResNet with its lambda option-A shortcut: what is safe is pruned, the lambda-coupled
  residual streams are left whole and reported;
* default protection by execution order, ``--ignore-layers`` globs, unprunable groups and their reasons, and the
  check that a pruned model still runs.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeprune import models, prune, prune_graph
from edgeprune.data import ASSETS
from edgeprune.errors import PruneError, UsageError

from .user_models import cifar_resnet_user, senet  # cifar_resnet_user: examples/cifar_resnet.py

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
XB = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _run(model, x):
    with torch.no_grad():
        return model(x)


def _zeroed_dense(dense: nn.Module, plan: prune.PruningPlan, x: torch.Tensor) -> nn.Module:
    """A copy of ``dense`` in which every channel ``plan`` removes is forced to zero instead: the output-channel
    weights and bias of each conv/linear member of a pruned group and its BatchNorms' scale and shift. Every
    activation here maps 0 to 0 (ReLU, hard-swish; a hard-sigmoid gate multiplies a zero channel), so the pruned
    model must compute what this one computes."""
    dense = copy.deepcopy(dense).eval()
    graph = prune_graph.dependency_graph(dense, x)
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for layer in plan.layers:
            root = modules[layer.name]
            drop = sorted(set(range(layer.channels)) - set(layer.keep))
            for dep, idxs in graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, drop):
                m, idxs = dep.target.module, [int(getattr(i, "idx", i)) for i in idxs]
                if not graph.is_out_channel_pruning_fn(dep.handler) or not isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                          nn.BatchNorm2d)):
                    continue
                m.weight[idxs] = 0
                if m.bias is not None:
                    m.bias[idxs] = 0
    return dense


# ------------------------------------------------------------------------------------------- the user models

def test_user_resnet_has_edgeprune_keys_and_loads_the_bundled_checkpoint():
    user, ours = cifar_resnet_user.resnet56().state_dict(), models.build_model("resnet56").state_dict()
    assert set(user) == set(ours) and all(user[k].shape == ours[k].shape for k in user)
    ck = torch.load(ASSETS / "resnet20-12fca82f.th", map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in ck["state_dict"].items()}
    m = cifar_resnet_user.resnet20().eval()
    m.load_state_dict(state, strict=True)
    ref, _ = models.pretrained("resnet20")
    torch.testing.assert_close(_run(m, X32), _run(ref, X32))  # the lambda shortcut computes what ShortcutA does


def test_two_head_net_runs():
    a, b = _run(senet.two_head_net(), XB)
    assert a.shape == (3, 10) and b.shape == (3, 4)


# ------------------------------------------------------------------------------------------ protected layers

class LateStem(nn.Module):
    """The first conv *defined* (``head``) runs last; the stem is defined after it."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(16, 5, 1)
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.head(F.relu(self.body(F.relu(self.stem(x))))).flatten(1)


def test_protected_layers_are_found_by_running_the_model():
    net = senet.two_head_net()
    names = {m: n for n, m in net.named_modules()}
    assert [names[m] for m in models.protected_layers(net, example_inputs=X)] == ["stem.0", "classifier.3", "aux"]
    assert [names[m] for m in models.protected_layers(net)] == ["stem.0", "aux"]  # definition-order fallback
    late = LateStem()
    assert models.protected_layers(late, example_inputs=torch.zeros(1, 3, 8, 8)) == [late.stem, late.head]
    assert models.protected_layers(late) == [late.head]
    r20 = models.build_model("resnet20")
    assert models.protected_layers(r20, example_inputs=X32) == models.protected_layers(r20)


def test_late_stem_is_protected_by_prune():
    late = LateStem().eval()
    x = torch.zeros(1, 3, 8, 8)
    assert [g.name for g in prune.prunable_groups(late, x)] == ["body"]
    assert prune.unprunable_groups(late, x)["stem"].startswith(prune.PROTECTED)


# --------------------------------------------------------------------------------- the two-headed SE network

@pytest.fixture(scope="module")
def pruned_two_head():
    ref = senet.two_head_net()
    model = copy.deepcopy(ref)
    res = prune.prune(model, 0.5, X)
    return ref, model, res


def test_two_head_prunes_with_both_heads_protected(pruned_two_head):
    ref, model, res = pruned_two_head
    a, b = _run(model, XB)
    assert a.shape == (3, 10) and b.shape == (3, 4)
    assert model.stem[0].out_channels == 16 and model.classifier[3].out_features == 10
    assert model.aux.out_features == 4
    assert res.macs_before / res.macs_after > 1.5 and res.params_after < res.params_before
    assert not res.skipped
    assert {"stem.0", "classifier.3", "aux"} <= set(res.unprunable)
    assert all(why.startswith(prune.PROTECTED) for why in res.unprunable.values())


def test_two_head_squeeze_excitation_is_pruned_consistently(pruned_two_head):
    ref, model, _ = pruned_two_head
    for i in (0, 3):  # conv SE: expand conv out == block channels == reduce conv in; the hidden width pruned too
        block, dense = model.features[i].block, ref.features[i].block
        dw, se = block[0][0] if i == 0 else block[1][0], block[1] if i == 0 else block[2]
        assert se.fc2.out_channels == dw.out_channels == se.fc1.in_channels
        assert se.fc1.out_channels < (dense[1] if i == 0 else dense[2]).fc1.out_channels
    se, dense = model.features[4].block[2], ref.features[4].block[2]  # linear SE
    assert se.expand.out_features == se.reduce.in_features == model.features[4].block[1][0].out_channels < 120
    assert se.reduce.out_features < dense.reduce.out_features
    # the first block is coupled to the protected stem (same channels): left whole
    assert model.features[0].block[0][0].out_channels == 16


def test_two_head_grouped_conv_is_pruned_group_consistently(pruned_two_head):
    ref, model, res = pruned_two_head
    g = model.features[5].grouped[0]
    assert g.groups == 4 and g.in_channels == g.out_channels == 32 and g.weight.shape == (32, 8, 3, 3)
    info = {i.name: i for i in prune.prunable_groups(ref, X)}
    assert info["features.5.reduce.0"].channel_groups == 4 and info["features.5.grouped.0"].channel_groups == 4
    for name in ("features.5.reduce.0", "features.5.grouped.0"):
        keep = next(l.keep for l in res.plan.layers if l.name == name)
        assert [sum(16 * s <= k < 16 * (s + 1) for k in keep) for s in range(4)] == [8] * 4


def test_two_head_pruned_equals_dense_with_those_channels_zeroed(pruned_two_head):
    ref, model, res = pruned_two_head
    expect = _run(_zeroed_dense(ref, res.plan, X), XB)
    got = _run(model, XB)
    for e, g, d in zip(expect, got, _run(ref, XB)):
        assert not torch.allclose(e, d, rtol=1e-3, atol=0)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_two_head_plan_replays_to_an_identical_model(pruned_two_head):
    _, model, res = pruned_two_head
    fresh = prune.apply_plan(senet.two_head_net(), prune.PruningPlan.from_json(res.plan.to_json()), X)
    a, b = fresh.state_dict(), model.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p, q) for p, q in zip(_run(fresh, XB), _run(model, XB)))


def test_two_head_pruned_exports_to_onnx_with_both_outputs(pruned_two_head, tmp_path):
    import onnxruntime as ort

    _, model, _ = pruned_two_head
    path = tmp_path / "two-head.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (X,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits", "aux"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "aux": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": XB.numpy()})
    assert len(outs) == 2
    for o, t in zip(outs, _run(model, XB)):
        assert o.shape == tuple(t.shape)
        np.testing.assert_allclose(o, t.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("importance", ["l2", "bn_scale", "taylor", "random"])
def test_two_head_global_ranking_and_alignment(importance):
    torch.manual_seed(0)
    model = senet.two_head_net()
    calib = (XB, torch.tensor([0, 3, 9])) if importance == "taylor" else None
    if importance == "taylor":  # the taylor loss wants logits: score through the class head only
        with pytest.raises(UsageError, match="logits"):
            prune.prune(model, 0.4, X, importance=importance, calib=calib)
        return
    res = prune.prune(model, 0.4, X, importance=importance, global_ranking=True, round_to=8)
    assert all(len(l.keep) % 8 == 0 for l in res.plan.layers)
    g = model.features[5].grouped[0]
    assert g.in_channels % 4 == 0 and g.out_channels % 4 == 0 and g.groups == 4
    assert [o.shape for o in _run(model, XB)] == [(3, 10), (3, 4)]
    fresh = prune.apply_plan(senet.two_head_net(), res.plan, X)
    assert all(torch.equal(p, q) for p, q in zip(_run(fresh, XB), _run(model, XB)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 1)
        self.bn_a = nn.BatchNorm2d(16)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.bn_g = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(F.relu(self.stem(x)))))
        return self.fc(F.relu(self.bn_g(self.g(x))).mean((2, 3)))


def test_grouped_conv_keeps_each_slices_own_channels():
    """``g`` has 2 groups of 8 inputs; the weak channels are offsets 0, 1 of slice 0 and 6, 7 of slice 1: each
    slice drops its own two (Torch-Pruning's own input pruning would drop the same offsets in both)."""
    torch.manual_seed(0)
    net = Grouped().eval()
    with torch.no_grad():
        for c in (0, 1, 14, 15):
            net.a.weight[c] *= 1e-3
            net.bn_a.weight[c] *= 1e-3
            net.g.weight[8 * (c // 8):8 * (c // 8 + 1), c % 8] *= 1e-3
    ref = copy.deepcopy(net)
    x = torch.randn(2, 3, 8, 8)
    res = prune.prune(net, 0.0, x[:1], layer_ratios={"a": 0.25})
    assert res.plan.layers[0].keep == list(range(2, 14))
    assert net.g.weight.shape == (16, 6, 3, 3) and net.g.in_channels == 12 and net.g.groups == 2
    torch.testing.assert_close(_run(net, x), _run(_zeroed_dense(ref, res.plan, x[:1]), x), rtol=1e-4, atol=1e-5)
    fresh = prune.apply_plan(copy.deepcopy(ref), res.plan, x[:1])
    assert torch.equal(_run(fresh, x), _run(net, x))


def test_grouped_conv_that_cannot_lose_a_channel_per_group_is_reported():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 3, groups=8), nn.BatchNorm2d(16),
                        nn.Flatten(), nn.LazyLinear(4)).eval()
    x = torch.zeros(1, 3, 8, 8)
    net(x)
    info = {g.name: g.channel_groups for g in prune.prunable_groups(net, x, ignored_layers=[])}
    assert info == {"2": 8}  # 16 outputs in 8 groups of 2
    assert "one input channel per group" in prune.unprunable_groups(net, x, ignored_layers=[])["0"]
    res = prune.prune(net, 0.3, x, ignored_layers=[])
    assert res.plan.layers == [] and "one input channel per group" in res.skipped["0"]
    assert "each of its 8 channel groups must lose the same number" in res.skipped["2"]
    assert prune.prune(net, 0.5, x, ignored_layers=[]).plan.layers[0].name == "2" and net[2].out_channels == 8


# ------------------------------------------------------------------------------- the lambda-shortcut ResNet

def test_user_resnet_with_lambda_shortcuts_prunes_what_is_safe():
    model = cifar_resnet_user.resnet20().eval()
    dense = _run(model, X32)
    res = prune.prune(model, 0.5, X32[:1])
    assert [l.name for l in res.plan.layers] == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)]
    assert _run(model, X32).shape == dense.shape == (2, 10)
    why = res.skipped["conv1"]  # the residual streams: one group through the lambdas, left whole
    assert prune.HIDDEN_OP in why and "layer2.0.shortcut (LambdaLayer: ConstantPadNd" in why
    assert "layer3.0.shortcut" in why and why.startswith(prune.PROTECTED)
    assert [b.conv2.out_channels for s in (model.layer1, model.layer2, model.layer3) for b in s] == \
        [16] * 3 + [32] * 3 + [64] * 3
    assert res.unprunable["conv1"] == why and "linear" in res.unprunable and "linear" not in res.skipped


def test_user_resnet_unprotected_stem_still_keeps_the_lambda_coupled_streams_whole():
    model = cifar_resnet_user.resnet20().eval()
    res = prune.prune(model, 0.5, X32[:1], ignored_layers=[])
    assert res.skipped["conv1"].startswith(prune.HIDDEN_OP) and model.conv1.out_channels == 16
    assert _run(model, X32).shape == (2, 10)
    fresh = prune.apply_plan(cifar_resnet_user.resnet20().eval(), res.plan, X32[:1])
    assert fresh.layer3[2].conv1.out_channels == 32


# --------------------------------------------------------------------------------------- --ignore-layers globs

def test_ignore_globs_add_to_the_defaults():
    net = senet.two_head_net()
    extra = prune.resolve_ignore_globs(net, ["features.5.*", "classifier.0"])
    names = {m: n for n, m in net.named_modules()}
    assert names[extra[0]] == "features.5.reduce" and net.features[5].grouped[0] in extra
    assert net.classifier[0] in extra and net.stem[0] not in extra
    groups = {g.name for g in prune.prunable_groups(net, X, extra_ignored=extra)}
    assert not groups & {"features.5.reduce.0", "features.5.grouped.0", "classifier.0"}
    whole = prune.unprunable_groups(net, X, extra_ignored=extra)
    assert whole["features.5.grouped.0"] == f"{prune.PROTECTED}: features.5.grouped.0"
    assert "stem.0" in whole and "aux" in whole  # the defaults are still protected
    res = prune.prune(net, 0.5, X, extra_ignored=extra)
    assert net.features[5].grouped[0].out_channels == 64 and net.classifier[0].out_features == 128
    assert net.stem[0].out_channels == 16 and res.macs_after < res.macs_before


def test_ignore_glob_matching_nothing_is_one_usage_error():
    net = senet.two_head_net()
    with pytest.raises(UsageError, match=r"--ignore-layers: 'head\.\*' matches no module of TwoHeadNet; "
                                         r"module names look like: stem, stem\.0"):
        prune.resolve_ignore_globs(net, ["features.*", "head.*"])
    with pytest.raises(UsageError, match="extra_ignored"):
        prune.prune(net, 0.5, X, extra_ignored=[nn.Conv2d(1, 1, 1)])


# ---------------------------------------------------------------------------- couplings that are not safe

class MyConv(nn.Module):
    """A conv written with F.conv2d and its own parameter: Torch-Pruning has no pruner for it."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class WithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.my = MyConv(32, 32)
        self.c3 = nn.Conv2d(32, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.my(F.relu(self.c2(F.relu(self.c1(x))))))
        return self.fc(F.relu(self.c3(x)).mean((2, 3)))


def test_custom_module_without_a_pruner_is_reported():
    net = WithCustom().eval()
    x = torch.randn(1, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning's note about the unwrapped parameter
        assert prune.unprunable_groups(net, x)["c2"] == "custom module MyConv without a pruner (parameter my.weight)"
        res = prune.prune(net, 0.5, x)
    assert [l.name for l in res.plan.layers] == ["c3"] and set(res.skipped) == {"c2"}
    assert net.c2.out_channels == 32 and _run(net, x).shape == (1, 10)


class HardCoded(nn.Module):
    """Flattens with a hard-coded feature count: runs dense, cannot run once ``c2`` loses channels."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        return self.fc(x.reshape(x.shape[0], 16 * 8 * 8))


def test_a_pruned_model_that_no_longer_runs_is_a_prune_error():
    net = HardCoded().eval()
    with pytest.raises(PruneError, match=r"no longer runs on example_inputs .*groups pruned: c1, c2"):
        prune.prune(net, 0.5, torch.randn(1, 3, 8, 8), ignored_layers=[])
