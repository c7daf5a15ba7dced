"""Latency-aware allocation (issue 17): ``--allocation latency`` weighs each group's measured latency saved per
channel removed (the device's layer-latency table) against its accuracy sensitivity, so the same speed-up costs
fewer channels; against the fake evaluator, whose layer table is proportional to MACs."""
from __future__ import annotations

import pytest

from edgeprune.errors import UsageError
from host.search import algos as sa
from host.search.algos import latency as sal
from tests.test_search import FakeEvaluator, device, resnet_like_space, run, targets_for

LEVELS = (0.75, 0.5, 0.25)


def test_allocate_with_gains_prunes_most_where_latency_per_accuracy_is_cheapest():
    space = resnet_like_space(blocks=2, sensitivities=True)
    names = [g.name for g in space.groups]
    gain = {n: 1.0 for n in names}
    gain[names[1]] = 4.0          # block 1: less sensitive than block 0 and buys more latency per channel
    r = sa.allocate(space, 0.4, gain=gain)
    total = sum(g.channels for g in space.groups)
    assert sum(r[g.name] * g.channels for g in space.groups) / total == pytest.approx(0.4, abs=1e-6)
    assert r[names[1]] > r[names[0]]            # more gain, lower sensitivity: pruned more
    # equal gains: the order is the sensitivities' (block 0 of each stage is the sensitive one)
    flat = sa.allocate(space, 0.4, gain={n: 1.0 for n in names})
    assert flat[names[0]] < flat[names[1]]
    # no sensitivities: the gain alone decides
    plain = resnet_like_space(blocks=2)
    g2 = {g.name: (2.0 if g.name.startswith("layer1") else 1.0) for g in plain.groups}
    alone = sa.allocate(plain, 0.3, gain=g2)
    assert alone["layer1.0.conv1"] > alone["layer3.0.conv1"]
    assert sa.allocate(plain, 0.3) == {g.name: 0.3 for g in plain.groups}   # uniform without either


def test_group_gains_read_the_layer_table():
    space = resnet_like_space(blocks=2)
    ev = FakeEvaluator(space)
    lut = {}
    ev.layer_latency([(device(), None, sal.lut_configs(space, 1, LEVELS, 0.9))],
                     lambda dev, key, ms, ident: lut.__setitem__(key, ms))
    est = sal.LutEstimator(space, lut, 4.0, 1, LEVELS, 0.9)
    gains = sal.group_gains(space, est, 1, LEVELS, 0.9)
    # the fake table is proportional to MACs: a stage-1 channel (16 of them at 32x32) costs 4x a stage-3 one
    assert gains["layer1.1.conv1"] == pytest.approx(4 * gains["layer3.1.conv1"], rel=0.05)
    assert min(gains.values()) > 0


def test_bisect_with_latency_allocation_meets_the_target_with_fewer_channels_removed(tmp_path):
    space = resnet_like_space(sensitivities=False)
    devs = [device()]
    tset = targets_for(devs, "latency_p50_ms=0.6x", drop=5.0)
    picks = {}
    for alloc in ("uniform", "latency"):
        ev = FakeEvaluator(space, noise=0.0)
        res = run(tmp_path, devs, tset, ev, space, name=alloc, max_evals=8,
                  algo_options={"allocation": alloc})
        r = res.devices[0]
        assert r.verdict == "met", r.reason
        picks[alloc] = r.chosen["pruned_fraction"]
        assert bool(ev.lut_calls) is (alloc == "latency")   # the table is measured only when it is used
    assert picks["latency"] < picks["uniform"] - 0.05


def test_an_unknown_allocation_is_one_clear_error():
    with pytest.raises(UsageError, match="--allocation: one of sensitivity, latency, uniform"):
        sa.AlgoOptions(allocation="greedy").validate()
