"""Pruning beyond the CIFAR ResNets: torchvision-style ResNet-18/50 and MobileNetV2, a concat network, and the
option-A ResNets' residual streams (ShortcutA re-indexing).

The torchvision-style models run on 32x32 inputs here: they are fully convolutional up to an adaptive pooling,
so the channel structure (all that pruning sees) is the same as at 224x224, at a fraction of the time.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from edgeprune import models, prune, zoo
from edgeprune.models import ShortcutA

SIZE = 32
X1 = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
XB = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
NUM_CLASSES = {"tv_resnet18": 1000, "tv_resnet50": 1000, "tv_mobilenet_v2": 1000, "concat_net": 10}


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def dense_with_pruned_channels_zeroed(dense: nn.Module, plan: prune.PruningPlan, x: torch.Tensor) -> nn.Module:
    """A copy of the unpruned ``dense`` in which every channel ``plan`` removes is forced to zero instead.

    Every output-channel member of a pruned group gets its BatchNorm scale and shift zeroed at those channels
    (so the channel is exactly 0 after BN, and after ReLU/ReLU6), and a ShortcutA whose output channels are pruned
    copies zeros there. Removing a zero channel does not change any consumer, so the pruned model must compute
    what this one computes, up to float summation order. The zoo's and the CIFAR ResNets' convs are all followed
    by a BatchNorm, which is what makes this construction complete for them.
    """
    dense = copy.deepcopy(dense).eval()
    graph = tp.DependencyGraph().build_dependency(dense, example_inputs=x,
                                                  customized_pruners={ShortcutA: prune.ShortcutAPruner()})
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for layer in plan.layers:
            root = modules[layer.name]
            drop = sorted(set(range(layer.channels)) - set(layer.keep))
            group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, drop)
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, nn.BatchNorm2d):
                    m.weight[idxs] = 0
                    m.bias[idxs] = 0
                elif isinstance(m, ShortcutA) and dep.handler == graph.get_pruner_of_module(m).prune_out_channels:
                    m.set_map(m.in_channels, [-1 if j in set(idxs) else s for j, s in enumerate(m.src)])
    return dense


@pytest.fixture(scope="module", params=sorted(zoo.ARCHS))
def pruned(request):
    """(arch name, the unpruned model, the pruned model, PruneResult) for 50 % with round_to=8."""
    name = request.param
    ref = zoo.build(name, seed=0)
    model = copy.deepcopy(ref)
    res = prune.prune(model, 0.5, X1, round_to=8)
    return name, ref, model, res


def _convs(model: nn.Module):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def test_zoo_matches_torchvision_sizes():
    # torchvision's published parameter counts (num_classes=1000) and state_dict sizes
    expect = {"tv_resnet18": (11_689_512, 122), "tv_resnet50": (25_557_032, 320), "tv_mobilenet_v2": (3_504_872, 314)}
    for name, (params, keys) in expect.items():
        m = zoo.build(name)
        assert (sum(p.numel() for p in m.parameters()), len(m.state_dict())) == (params, keys), name
    m = zoo.build("tv_resnet50", num_classes=7)
    assert m.fc.out_features == 7 and m.layer2[0].conv2.stride == (2, 2) and m.layer2[0].conv1.stride == (1, 1)
    a, b = zoo.build("concat_net", seed=3), zoo.build("concat_net", seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_arch_prunes_half_aligned(pruned):
    name, ref, model, res = pruned
    assert _run(model, XB).shape == (2, NUM_CLASSES[name])
    assert res.macs_after < 0.6 * res.macs_before and res.params_after < res.params_before
    before, after = _convs(ref), _convs(model)
    changed = [n for n in after if after[n].out_channels != before[n].out_channels]
    assert len(changed) >= len(res.plan.layers)
    for n in changed:
        if before[n].out_channels % 8 == 0:
            assert after[n].out_channels % 8 == 0, n
    protected = models.protected_layers(ref)
    names = {m: n for n, m in ref.named_modules()}
    assert all(names[p] not in changed for p in protected)
    assert {l.name for l in res.plan.layers} == {g.name for g in prune.prunable_groups(ref, X1)}


def test_arch_plan_replays_bit_identical(pruned):
    name, _, model, res = pruned
    plan = prune.PruningPlan.from_json(res.plan.to_json())
    fresh = prune.apply_plan(zoo.build(name, seed=0), plan, X1)
    assert torch.equal(_run(fresh, XB), _run(model, XB))


def test_arch_pruned_equals_dense_with_those_channels_zeroed(pruned):
    name, ref, model, res = pruned
    expect = _run(dense_with_pruned_channels_zeroed(ref, res.plan, X1), XB)
    got = _run(model, XB)
    # the zeroing did change the dense model (relative tolerance: MobileNetV2's torchvision init gives ~1e-10 logits)
    assert not torch.allclose(expect, _run(ref, XB), rtol=1e-2, atol=0)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-4 * float(expect.abs().max()))


@pytest.mark.parametrize("name", sorted(zoo.ARCHS))
def test_arch_zero_ratio_is_identity(name):
    model = zoo.build(name, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = _run(model, XB)
    res = prune.prune(model, 0.0, X1, round_to=8)
    assert res.plan.layers == [] and res.macs_after == res.macs_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fresh = prune.apply_plan(zoo.build(name, seed=0), prune.PruningPlan.from_json(res.plan.to_json()), X1)
    assert torch.equal(_run(model, XB), out) and torch.equal(_run(fresh, XB), out)


def _check_resnet(ref, model, res):
    # each stage's residual stream (downsample conv + every block's last conv) is one group: equal widths
    last = "conv3" if hasattr(model.layer1[0], "conv3") else "conv2"
    for stage, ref_stage in zip((model.layer2, model.layer3, model.layer4), (ref.layer2, ref.layer3, ref.layer4)):
        widths = {stage[0].downsample[0].out_channels} | {getattr(b, last).out_channels for b in stage}
        assert widths == {ref_stage[0].downsample[0].out_channels // 2}
    assert model.layer4[0].downsample[0].out_channels == model.fc.in_features
    assert model.conv1.out_channels == ref.conv1.out_channels  # the stem is protected...
    if last == "conv2":  # ...and with it layer1's stream in ResNet-18 (identity shortcuts there)
        assert [b.conv2.out_channels for b in model.layer1] == [64, 64]


def _check_mobilenet(ref, model, res):
    before, after = _convs(ref), _convs(model)
    dw = [n for n, m in before.items() if m.groups > 1]
    assert len(dw) == 17
    for n in dw:
        m = after[n]
        assert m.groups == m.in_channels == m.out_channels, n
        assert m.weight.shape[:2] == (m.out_channels, 1)
    # the expansion conv and its depthwise conv are one group, named after the expansion
    g = next(l for l in res.plan.layers if l.name == "features.2.conv.0.0")
    assert after["features.2.conv.1.0"].out_channels == len(g.keep) == 48
    # the projections of a residual sequence are coupled through the adds
    assert after["features.2.conv.2"].out_channels == after["features.3.conv.2"].out_channels == 16


def _check_concat(ref, model, res):
    b1 = model.block1
    width1 = b1.branch1[0].out_channels + b1.branch3[1][0].out_channels + b1.branch_pool[1][0].out_channels
    assert width1 < ref.block1.out_channels
    d0, d1 = model.dense.layers[0][0], model.dense.layers[1][0]
    assert d0.in_channels == width1
    assert d1.in_channels == width1 + d0.out_channels
    assert model.transition[0].in_channels == width1 + d0.out_channels + d1.out_channels
    b2 = model.block2
    assert model.fc.in_features == (b2.branch1[0].out_channels + b2.branch3[1][0].out_channels
                                    + b2.branch_pool[1][0].out_channels)
    # the same block-1 channels leave each of their consumers, in the right slice
    kept = {l.name: l.keep for l in res.plan.layers}
    keep_b1, keep_d0, keep_t = kept["block1.branch1.0"], kept["dense.layers.0.0"], kept["transition.0"]
    assert torch.equal(d0.weight[:, : len(keep_b1)], ref.dense.layers[0][0].weight[keep_d0][:, keep_b1])
    assert torch.equal(model.transition[0].weight[:, : len(keep_b1)], ref.transition[0].weight[keep_t][:, keep_b1])


def test_arch_structure_after_pruning(pruned):
    name, ref, model, res = pruned
    {"tv_resnet18": _check_resnet, "tv_resnet50": _check_resnet, "tv_mobilenet_v2": _check_mobilenet,
     "concat_net": _check_concat}[name](ref, model, res)


# ------------------------------------------------------------------------------------ option-A residual streams

def _reference_option_a(x: torch.Tensor, stride: int, before: int, after: int) -> torch.Tensor:
    """The original ShortcutA forward (before the general channel map existed)."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride]
    return F.pad(x, (0, 0, 0, 0, before, after))


def test_shortcut_identity_map_is_bit_identical_to_the_original_padding():
    x = torch.randn(2, 16, 8, 8)
    s = ShortcutA(2, 8, 8, in_channels=16)
    assert s.pad_before == 8 and s.pad_after == 8 and s.src == [-1] * 8 + list(range(16)) + [-1] * 8
    ref = _reference_option_a(x, 2, 8, 8)
    assert torch.equal(s(x), ref)
    assert torch.equal(s._gather_forward(x), ref)  # the general (Gather) path agrees bit for bit
    lazy = ShortcutA(2, 8, 8)
    assert torch.equal(lazy(x), ref) and lazy.in_channels == 16
    assert ShortcutA.from_map(2, 16, s.src).pad_before == 8  # a contiguous map goes back to the pad path


def test_shortcut_general_map():
    x = torch.randn(1, 4, 4, 4)
    s = ShortcutA.from_map(1, 4, [3, -1, 0, 0, -1])
    assert s.pad_before is None and s.out_channels == 5
    out = s(x)
    assert torch.equal(out[:, 0], x[:, 3]) and torch.equal(out[:, 2], x[:, 0]) and torch.equal(out[:, 3], x[:, 0])
    assert not out[:, [1, 4]].any()
    with pytest.raises(ValueError, match="-1..3"):
        ShortcutA.from_map(1, 4, [4])


def test_shortcut_pruner_reindexes():
    p = prune.ShortcutAPruner()
    s = ShortcutA(2, 4, 4, in_channels=8)                        # [-1]*4 + 0..7 + [-1]*4
    p.prune_in_channels(s, [0, 5])                                # inputs 0 and 5 gone: their copies become zeros
    assert s.in_channels == 6 and s.src == [-1] * 5 + [0, 1, 2, 3, -1, 4, 5] + [-1] * 4
    p.prune_out_channels(s, [0, 1, 2, 3, 4, 15])
    assert s.out_channels == 10 and s.src == [0, 1, 2, 3, -1, 4, 5, -1, -1, -1]


@pytest.fixture(scope="module")
def residual_pruned():
    torch.manual_seed(0)
    ref = models.build_model("resnet20").eval()
    model = copy.deepcopy(ref)
    res = prune.prune(model, 0.5, X1, round_to=8, prune_residual=True)
    return ref, model, res


def test_residual_pruning_resnet20(residual_pruned):
    _, model, res = residual_pruned
    assert res.plan.prune_residual and _run(model, XB).shape == (2, 10)
    names = [l.name for l in res.plan.layers]
    assert "layer2.0.conv2" in names and "layer3.0.conv2" in names and len(names) == 11
    widths = [[b.conv2.out_channels for b in s] for s in (model.layer1, model.layer2, model.layer3)]
    assert widths == [[16] * 3, [16] * 3, [32] * 3]  # stage 1's stream holds the protected stem
    assert [b.conv1.out_channels for b in model.layer2] == [16] * 3
    assert model.layer2[0].shortcut.in_channels == 16 and model.layer2[0].shortcut.out_channels == 16
    assert model.layer3[0].shortcut.in_channels == 16 and model.layer3[0].shortcut.out_channels == 32
    assert model.linear.in_features == 32
    assert res.macs_before / res.macs_after > 2.5  # more than the 2x of block-internal pruning alone


def test_residual_pruned_replays_and_matches_zeroed_dense(residual_pruned):
    ref, model, res = residual_pruned
    fresh = prune.apply_plan(copy.deepcopy(ref), prune.PruningPlan.from_json(res.plan.to_json()), X1)
    assert torch.equal(_run(fresh, XB), _run(model, XB))
    expect = _run(dense_with_pruned_channels_zeroed(ref, res.plan, X1), XB)
    torch.testing.assert_close(_run(model, XB), expect, rtol=1e-4, atol=1e-5)


def test_residual_pruned_exports_to_onnx(residual_pruned, tmp_path):
    import onnxruntime as ort

    _, model, _ = residual_pruned
    path = tmp_path / "r20-residual.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and constant-folding notes
        torch.onnx.export(model, (X1,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": XB.numpy()})[0]
    np.testing.assert_allclose(out, _run(model, XB).numpy(), rtol=0, atol=1e-4)


def test_residual_stream_with_unprotected_stem():
    model = models.build_model("resnet20").eval()
    res = prune.prune(model, 0.5, X1, round_to=8, ignored_layers=[model.linear])
    assert "conv1" in {l.name for l in res.plan.layers}
    assert model.conv1.out_channels == 8 and [b.conv2.out_channels for b in model.layer1] == [8] * 3
    assert model.layer2[0].shortcut.in_channels == 8 and _run(model, XB).shape == (2, 10)


def test_residual_pruning_twice_replays():
    """A second pruning pass traces ShortcutA's general (Gather) path; both plans replay in order."""
    ref = models.build_model("resnet20").eval()
    model = copy.deepcopy(ref)
    plans = [prune.prune(model, 0.3, X1, prune_residual=True).plan for _ in range(2)]
    assert model.layer3[0].shortcut.pad_before is None and model.layer3[0].conv2.out_channels < 45
    fresh = copy.deepcopy(ref)
    for plan in plans:
        prune.apply_plan(fresh, plan, X1)
    assert torch.equal(_run(fresh, XB), _run(model, XB))
