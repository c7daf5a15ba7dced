"""Per-group pruning sensitivity on the calib split: the table, its numbers, the plot and the command."""
from __future__ import annotations

import copy

import pytest
import torch

from edgeprune import data, finetune, prune, sensitivity
from edgeprune.errors import UsageError

from .test_demo import edgeprune

X = torch.zeros(1, 3, 32, 32)
GROUPS = ["layer1.0.conv1", "layer3.2.conv1"]


@pytest.fixture(scope="module")
def calib():
    return data.calib_split(20)  # 200 images


@pytest.fixture(scope="module")
def table(resnet20, calib):
    return sensitivity.analyse(resnet20[0], calib, X, ratios=(0.5, 0.9), groups=GROUPS)


def test_table_has_one_row_per_group_and_ratio(table, resnet20, calib):
    assert list(table.columns) == sensitivity.COLUMNS
    assert list(zip(table["group"], table["ratio"])) == [(g, r) for g in GROUPS for r in (0.5, 0.9)]
    assert table.attrs["dense_top1"] == pytest.approx(finetune.evaluate(resnet20[0], calib))
    assert (table["kept"] < table["channels"]).all() and (table["macs_ratio"] > 1).all()


def test_row_equals_pruning_that_group_alone(table, resnet20, calib):
    row = table[(table["group"] == "layer3.2.conv1") & (table["ratio"] == 0.9)].iloc[0]
    m = copy.deepcopy(resnet20[0])
    res = prune.prune(m, 0.0, X, layer_ratios={"layer3.2.conv1": 0.9})
    assert [layer.name for layer in res.plan.layers] == ["layer3.2.conv1"]
    top1 = finetune.evaluate(m, calib)
    assert row["top1"] == pytest.approx(top1)
    assert row["drop_pp"] == pytest.approx(100 * (table.attrs["dense_top1"] - top1))
    assert row["kept"] == len(res.plan.layers[0].keep) == 7  # 64 channels, 90 % removed → 7 kept


def test_removing_more_costs_more_on_average(table):
    by_ratio = table.groupby("ratio")["drop_pp"].mean()
    assert by_ratio[0.9] > by_ratio[0.5]


def test_plot_writes_png(table, tmp_path):
    png = sensitivity.plot(table, tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_bad_ratios_and_groups(resnet20, calib):
    with pytest.raises(UsageError, match="ratios"):
        sensitivity.analyse(resnet20[0], calib, X, ratios=(0.0,))
    with pytest.raises(UsageError, match="layer9.conv1"):
        sensitivity.analyse(resnet20[0], calib, X, groups=["layer9.conv1"])


def test_sensitivity_command(tmp_path):
    out = tmp_path / "sens"
    r = edgeprune("sensitivity", "--model", "resnet20", "--ratios", "0.5", "--calib-per-class", "5",
                  "--out", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = (out / "sensitivity.csv").read_text().splitlines()
    assert lines[0] == ",".join(sensitivity.COLUMNS) and len(lines) == 1 + 9  # nine block-internal groups
    assert (out / "sensitivity.png").stat().st_size > 5000
    assert "most sensitive" in r.stdout


def test_residual_stream_groups_and_ignored_layers_of_the_callers_model(resnet20, calib):
    model = resnet20[0]
    plain = {g.name for g in prune.prunable_groups(model, X)}
    coupled = [g for g in prune.prunable_groups(model, X, prune_residual=True) if g.name not in plain]
    assert coupled, "option-A residual coupling adds the stage streams as groups"
    t = sensitivity.analyse(model, calib, X, ratios=(0.5,), groups=[coupled[0].name], prune_residual=True)
    assert len(t) == 1 and t["kept"].iloc[0] < t["channels"].iloc[0] and t["macs_ratio"].iloc[0] > 1
    with pytest.raises(UsageError, match=coupled[0].name):   # not a group without the coupling
        sensitivity.analyse(model, calib, X, ratios=(0.5,), groups=[coupled[0].name])
    # ignored layers are the caller's modules (analyse works on copies): that group is then not prunable
    with pytest.raises(UsageError, match="layer1.0.conv1"):
        sensitivity.analyse(model, calib, X, ratios=(0.5,), groups=["layer1.0.conv1"],
                            ignored_layers=[model.conv1, model.linear, model.layer1[0].conv1])
    t = sensitivity.analyse(model, calib, X, ratios=(0.5,), groups=["layer3.2.conv1"],
                            ignored_layers=[model.conv1, model.linear, model.layer1[0].conv1])
    assert list(t["group"]) == ["layer3.2.conv1"]
    with pytest.raises(UsageError, match="ignored_layers"):
        sensitivity.analyse(model, calib, X, ignored_layers=[torch.nn.Conv2d(3, 3, 1)])
