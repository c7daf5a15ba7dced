from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from edgeprune import data, finetune, sparsity
from edgeprune.errors import DataError, ExportError, UsageError


def _groups(w: torch.Tensor) -> torch.Tensor:
    """Rows of 4 along axis 1 (input features / input channels at each (out, kernel position))."""
    return w.movedim(1, -1).reshape(-1, 4)


@pytest.mark.parametrize("shape", [(8, 16), (6, 12, 3, 3), (4, 8, 1, 1), (4, 8, 3)])
def test_mask_keeps_exactly_the_two_largest_of_every_group(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    m = sparsity.mask_2to4_tensor(w)
    assert m.dtype == torch.bool and m.shape == w.shape
    g, gm = _groups(w.abs()), _groups(m)
    assert torch.all(gm.sum(1) == 2)
    kept_min = torch.where(gm, g, torch.inf).min(1).values
    dropped_max = torch.where(gm, -torch.inf, g).max(1).values
    assert torch.all(kept_min > dropped_max)  # the 2 kept are the 2 largest magnitudes


def test_mask_ties_are_deterministic_and_follow_the_axis():
    w = torch.ones(2, 8)
    m = sparsity.mask_2to4_tensor(w)
    assert m.tolist() == [[True, True, False, False] * 2] * 2  # stable: earlier index wins
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]])  # [4, 2]: groups along axis 0
    assert sparsity.mask_2to4_tensor(w, axis=0).sum().item() == 4
    with pytest.raises(UsageError, match="axis"):
        sparsity.mask_2to4_tensor(torch.ones(4, 6))  # 6 input features


def test_check_tensor_counts_violations_on_the_input_channel_axis():
    w = torch.randn(4, 8, 3, 3)
    w.masked_fill_(~sparsity.mask_2to4_tensor(w), 0)
    res = sparsity.check_2to4_tensor(w)
    assert res and res.ok and res.groups == 4 * 2 * 9 and res.violations == 0
    assert sparsity.check_2to4_tensor(w.numpy()).ok  # numpy too
    w[1, 4:8, 2, 0] = 1.0                               # one dense group of 4 input channels
    res = sparsity.check_2to4_tensor(w)
    assert not res and res.violations == 1
    # 2:4 along the flattened in·kh·kw axis of the NCHW weight is *not* the conv layout that counts
    flat = torch.randn(4, 8 * 9)
    flat.masked_fill_(~sparsity.mask_2to4_tensor(flat), 0)
    assert not sparsity.check_2to4_tensor(flat.view(4, 8, 3, 3))
    with pytest.raises(UsageError, match="axis"):
        sparsity.check_2to4_tensor(torch.ones(4, 3, 3, 3))
    with pytest.raises(UsageError, match="w:"):
        sparsity.check_2to4_tensor([[1, 2, 3, 4]])  # type: ignore[arg-type]


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.odd = nn.Linear(16, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        return self.head(self.odd(F.adaptive_avg_pool2d(x, 1).flatten(1)))


def test_skip_rules_report_why():
    m = _Mixed()
    res = sparsity.apply_2to4(m, min_reduction=0)
    assert res.sparsified == ["pw", "odd"]
    assert "in_channels=3" in res.skipped["stem"] and "depthwise" in res.skipped["dw"]
    assert "in_features=6" in res.skipped["head"]
    assert set(res.masks) == {"pw.weight", "odd.weight"}
    res = sparsity.apply_2to4(_Mixed())  # default min_reduction=16: a 1x1 conv over 8 channels is too small
    assert res.sparsified == ["odd"] and "min_reduction" in res.skipped["pw"]


def test_resnet20_defaults_layers_and_skip(resnet20):
    model = copy.deepcopy(resnet20[0])
    masks = sparsity.masks_2to4(model)
    convs = [n for n, mod in model.named_modules() if isinstance(mod, nn.Conv2d)]
    assert set(masks) == {f"{n}.weight" for n in convs[1:]} | {"linear.weight"}  # all but the RGB stem
    assert torch.equal(model.conv1.weight, resnet20[0].conv1.weight)           # masks_2to4 changes nothing
    assert set(sparsity.masks_2to4(model, skip=["linear", model.layer3[2].conv2])) == \
        set(masks) - {"linear.weight", "layer3.2.conv2.weight"}
    assert set(sparsity.masks_2to4(model, layers=["layer1.0.conv1", "conv1"])) == {"layer1.0.conv1.weight"}
    for kw, match in [({"skip": ["nope"]}, "skip: no module named 'nope'"),
                      ({"layers": ["bn1"]}, "layers: 'bn1' is a BatchNorm2d"),
                      ({"min_reduction": -1}, "min_reduction")]:
        with pytest.raises(UsageError, match=match):
            sparsity.masks_2to4(model, **kw)


def test_apply_reports_half_zeros_and_keeps_skipped_layers(resnet20):
    model = copy.deepcopy(resnet20[0])
    res = sparsity.apply_2to4(model)
    assert len(res.sparsified) == 19 and list(res.skipped) == ["conv1"]
    assert res.zeros == res.sparse_weights // 2 and res.zero_fraction == 0.5  # trained weights: no natural zeros
    assert 0.45 < res.model_zero_fraction < 0.5
    assert torch.equal(model.conv1.weight, resnet20[0].conv1.weight)
    for name, p in model.named_parameters():
        if name in res.masks:
            assert sparsity.check_2to4_tensor(p).ok and torch.equal(p != 0, res.masks[name])
    summary = res.to_dict()
    assert summary["pattern"] == "2:4" and summary["masks_sha256"] == sparsity.masks_sha256(res.masks)


def test_mask_keeper_keeps_exact_zeros_through_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    res = sparsity.apply_2to4(model, min_reduction=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    before = model[0].weight.detach().clone()
    with sparsity.MaskKeeper(model, res.masks, optimizer=opt) as keeper:
        for _ in range(5):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            assert torch.all(model[0].weight.grad[~res.masks["0.weight"]] == 0)
            opt.step()
        assert keeper.violations() == 0 and len(keeper) == 2
    assert not torch.equal(model[0].weight, before)  # the kept weights did train
    assert torch.all(model[0].weight[~res.masks["0.weight"]] == 0)
    # hooks are gone after the block: gradients flow everywhere again
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad[~res.masks["0.weight"]].abs().sum() > 0


def test_mask_keeper_validates_names_and_shapes():
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(UsageError, match=r"masks: .*did you mean '0.weight'"):
        sparsity.MaskKeeper(model, {"0": torch.ones(4, 8, dtype=torch.bool)})
    with pytest.raises(UsageError, match="shape"):
        sparsity.MaskKeeper(model, {"0.weight": torch.ones(4, 4, dtype=torch.bool)})


def test_finetune_with_masks_keeps_the_pattern(resnet20):
    model = copy.deepcopy(resnet20[0])
    res = sparsity.apply_2to4(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    split = data.calib_split(per_class=6)
    ft = finetune.finetune(model, split, epochs=1, batch_size=20, lr=0.05, weight_decay=5e-3, device="cpu",
                           masks=res.masks)
    assert ft.steps_done == 3 and ft.sparse_layers == 19 and ft.sparsity_kept is True
    for name, p in model.named_parameters():
        if name in res.masks:
            assert torch.all(p[~res.masks[name]] == 0), name           # exact zeros
            assert sparsity.check_2to4_tensor(p).ok
    assert not torch.equal(model.layer2[0].conv1.weight, before["layer2.0.conv1.weight"])  # it trained
    assert not torch.equal(model.conv1.weight, before["conv1.weight"])                     # dense stem too
    # labels-free BN recalibration touches only BN buffers: the pattern survives it
    finetune.recalibrate_bn(model, split, batch_size=30, device="cpu")
    for name, p in model.named_parameters():
        if name in res.masks:
            assert torch.all(p[~res.masks[name]] == 0)


# ----------------------------------------------------------------------------------------------- ONNX

def _export(model: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])


@pytest.fixture(scope="module")
def onnx_pair(resnet20, tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse-onnx")
    dense, sparse = copy.deepcopy(resnet20[0]), copy.deepcopy(resnet20[0])
    res = sparsity.apply_2to4(sparse)
    _export(dense, d / "dense.onnx")
    _export(sparse, d / "sparse.onnx")
    return d / "dense.onnx", d / "sparse.onnx", res


def test_onnx_of_a_2to4_model_passes(onnx_pair):
    _, path, res = onnx_pair
    rep = sparsity.check_onnx_2to4(path, min_layers=19, expected=res.sparsified)
    assert rep.ok and rep.require() is rep, rep.failures
    by_module = {c.module: c for c in rep.layers}
    assert len(rep.layers) == 20 and len(rep.sparse_layers) == 19
    stem = by_module["conv1"]
    assert not stem.eligible and "not a multiple of 4" in stem.reason and stem.shape == [16, 3, 3, 3]
    gemm = by_module["linear"]
    assert gemm.op == "Gemm" and gemm.sparse and gemm.axis == 1 and gemm.shape == [10, 64]
    # BatchNorm was folded into the convs (no BatchNormalization node) and the zeros survived the scaling
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert by_module["layer2.0.conv1"].sparse and by_module["layer2.0.conv1"].groups == 32 * 4 * 9


def test_onnx_of_a_dense_model_fails(onnx_pair):
    path = onnx_pair[0]
    rep = sparsity.check_onnx_2to4(path)
    assert not rep.ok and rep.sparse_layers == [] and "0 of 20" in rep.failures[0]
    assert all(c.violations > 0 for c in rep.layers if c.eligible)
    assert not sparsity.check_onnx_2to4(path, min_layers=0, expected=["layer1.0.conv1"])
    with pytest.raises(ExportError, match="dense.onnx"):
        rep.require()


def test_onnx_corrupted_initializer_is_detected(onnx_pair, tmp_path):
    _, path, res = onnx_pair
    model = onnx.load(str(path))
    rep = sparsity.check_onnx_2to4(path)
    target = next(c for c in rep.layers if c.module == "layer3.1.conv2")
    init = next(i for i in model.graph.initializer if i.name == target.initializer)
    w = numpy_helper.to_array(init).copy()
    w[5, 8:12, 1, 1] = 0.5                     # one dense group of 4 input channels
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    rep = sparsity.check_onnx_2to4(bad, expected=res.sparsified)
    assert not rep.ok and len(rep.failures) == 1
    assert "layer3.1.conv2" in rep.failures[0] and "1 of" in rep.failures[0]
    assert sparsity.check_onnx_2to4(bad, min_layers=18).ok       # 18 of 19 still sparse …
    assert not sparsity.check_onnx_2to4(bad, min_layers=19).ok   # … but not all of them
    with pytest.raises(ExportError, match="layer3.1.conv2"):
        rep.require()
    assert not sparsity.check_onnx_2to4(path, expected=["no.such.layer"]).ok


def test_onnx_layouts_matmul_and_errors(tmp_path):
    from onnx import TensorProto, helper

    w = np.zeros((8, 4), np.float32)  # MatMul B: [K=8, N=4], groups along K (axis 0)
    w[0:2, :] = 1.0
    w[4, :], w[7, :] = 2.0, 3.0
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                          [numpy_helper.from_array(w, "w")])
    p = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(g), str(p))
    rep = sparsity.check_onnx_2to4(p, expected=["mm"])
    assert rep.ok and rep.layers[0].axis == 0 and rep.layers[0].groups == 8
    with pytest.raises(DataError, match="missing.onnx"):
        sparsity.check_onnx_2to4(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(DataError, match="junk.onnx"):
        sparsity.check_onnx_2to4(tmp_path / "junk.onnx")
    with pytest.raises(UsageError, match="min_layers"):
        sparsity.check_onnx_2to4(p, min_layers=-1)
