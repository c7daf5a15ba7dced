"""host.search (run, options, state, space, evaluator, driver, outcome), host.search.algos and host.fleet.targets:
target parsing, the algorithms against a fake evaluator (latency an affine function of MACs with deterministic noise), persistence and resume, outputs, and one real
end-to-end search on the local device (slow)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgeprune.errors import UsageError
from host.search import evaluator as sev
from host.search import options as so
from host.search import outcome as sout
from host.search import run as hs
from host.search import space as ssp
from host.search import state as sst
from host.search import algos as sa
from host.search.algos import bisect as sab
from host.search.algos import netadapt as san
from host.fleet import targets as tg
from host.fleet.devices import DeviceConfig, PowerConfig, local_device

# ------------------------------------------------------------------------------------------ fakes


def resnet_like_space(blocks: int = 9, sensitivities: bool = False) -> sa.ModelSpace:
    """A CIFAR ResNet-(6n+2)-shaped space: per stage `blocks` groups (conv1 outputs = conv2 inputs)."""
    layers = [sa.Layer("conv1", sa.LayerConfig("conv", 3, 16, (3, 3), in_hw=(32, 32)), (32, 32))]
    groups = []
    prev = 16
    for s, (c, hw) in enumerate(((16, 32), (32, 16), (64, 8))):
        for b in range(blocks):
            name = f"layer{s + 1}.{b}.conv1"
            stride = 2 if (b == 0 and s > 0) else 1
            cin = prev if b == 0 else c
            in_hw = hw * stride
            sens = (0.3 + 2.0 * (b == 0) + 0.5 * s) if sensitivities else None
            groups.append(sa.Group(name, c, sens))
            layers.append(sa.Layer(name, sa.LayerConfig("conv", cin, c, (3, 3), (stride, stride), (1, 1),
                                                        in_hw=(in_hw, in_hw)), (hw, hw), None, name))
            layers.append(sa.Layer(f"layer{s + 1}.{b}.conv2", sa.LayerConfig("conv", c, c, (3, 3), padding=(1, 1),
                                                                               in_hw=(hw, hw)), (hw, hw), name, None))
        prev = c
    layers.append(sa.Layer("linear", sa.LayerConfig("linear", 64, 10)))
    return sa.ModelSpace("fake-resnet", "0" * 64, groups, layers)


def _noise(key: str, amount: float) -> float:
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return 1.0 + amount * (2 * u - 1)


class FakeEvaluator:
    """Latency = dense_ms * (fixed + (1 - fixed) * MACs / dense MACs) * (1 +- noise), per device; top-1 falls
    with the pruned fraction (less with full recovery). Counts every call (evaluations, dense beside, final
    repetitions apart); can crash after N evaluations."""

    def __init__(self, space, *, dense_ms=None, fixed=0.15, noise=0.03, crash_after=None, top1_slope=0.08):
        self.space = space
        self.dense_ms = dense_ms or {}
        self.fixed, self.noise, self.crash_after, self.slope = fixed, noise, crash_after, top1_slope
        self.calls, self.host_calls, self.lut_calls = [], [], []
        self.paired = []   # the dense model measured beside a candidate (relative targets), not an evaluation
        self.timing = []   # the pick's final repetitions (host.search.final), not evaluations

    def metrics(self, dev_id, cand, key):
        frac = self.space.macs(cand.kept_map()) / self.space.dense_macs
        dense = self.dense_ms.get(dev_id, 4.0)
        lat = dense * (self.fixed + (1 - self.fixed) * frac) * _noise(key + dev_id, self.noise)
        pf = self.space.pruned_fraction(cand.kept_map())
        top1 = 0.93 - self.slope * pf ** 2 * (0.5 if cand.recovery == "full" else 1.0)
        power = 10.0
        return {"latency_p50_ms": lat, "latency_p90_ms": lat * 1.1, "throughput_ips": 1000 / lat, "power_w": power,
                "energy_mj": power * lat, "memory_mb": 100.0, "top1": round(top1, 4)}

    def measure(self, requests, done):
        for req in requests:
            timing = getattr(req, "split", "eval") == "timing"     # a final repetition, not an evaluation
            if self.crash_after is not None and len(self.calls) >= self.crash_after and not getattr(req, "pairs", "") \
                    and not timing:
                raise KeyboardInterrupt("simulated crash")
            (self.paired if getattr(req, "pairs", "") else self.timing if timing else self.calls).append(
                (req.device.id, req.key))
            m = sa.DeviceMeasurement(True, self.metrics(req.device.id, req.candidate, req.key), key=req.key,
                               artifact_sha256="a" * 64, plan_sha256="b" * 64)
            done(req, m, {"report": {"fake": True}})

    def host_top1(self, profile, cand):
        self.host_calls.append(cand)
        pf = self.space.pruned_fraction(cand.kept_map())
        # cutting the first block of a stage hurts more: netadapt should prefer the others
        hurt = sum(0.02 for g in cand.kept_map() if g.endswith(".0.conv1"))
        return 0.93 - 0.1 * pf ** 2 - hurt

    def layer_latency(self, requests, done):
        for dev, _profile, configs in requests:
            for cfg in configs:
                self.lut_calls.append((dev.id, cfg.key()))
                macs = cfg.out_channels * (cfg.in_channels // cfg.groups) * cfg.kernel[0] * cfg.kernel[1] \
                    * (cfg.in_hw[0] // cfg.stride[0]) * (cfg.in_hw[1] // cfg.stride[1])
                done(dev.id, cfg.key(), 0.01 + 4.0 * (1 - self.fixed) * macs / self.space.dense_macs,
                     {"hostname": "fake"})
        return {dev.id: None for dev, _, _ in requests}


def device(name="local", round_to=1, **kw) -> DeviceConfig:
    return local_device().model_copy(update={"id": name, "round_to": round_to, **kw})


def targets_for(devs, *specs, drop=5.0, targets_file=None):
    return tg.device_targets(devs, tg.parse_cli(list(specs), drop, targets_file))


def options(tmp_path, **kw) -> so.SearchOptions:
    """Search options for the algorithm tests: the final repetitions (default 5 in the product) are off unless a
    test asks for them (tests/test_search_final.py does; the CLI end-to-end test runs the default)."""
    algo_kw = kw.pop("algo_options", {})
    kw.setdefault("final_repeat", 1)
    return so.SearchOptions(model="fake", cache_dir=str(tmp_path / "cache"), algo_options=sa.AlgoOptions(**algo_kw),
                            **kw)


def run(tmp_path, devs, tset, ev, space, name="run", resume=False, **kw):
    out = tmp_path / name
    if resume:
        return hs.resume(name, out=out, space=space, evaluator=ev)
    return hs.start(options(tmp_path, **kw), devs, tset, out=out, run_id=name, space=space, evaluator=ev)


# ------------------------------------------------------------------------------------------ targets

def test_target_parsing_absolute_relative_scopes_and_aliases():
    assert tg.parse_target_arg("latency_p50_ms=12.5") == (None, "latency_p50_ms", 12.5, False)
    assert tg.parse_target_arg("jetson-1:latency_ms=0.5x") == ("jetson-1", "latency_p50_ms", 0.5, True)
    assert tg.parse_target_arg("throughput=2X") == (None, "throughput_ips", 2.0, True)
    assert tg.parse_target_arg(" energy_mj = 8 ") == (None, "energy_mj", 8.0, False)


@pytest.mark.parametrize("spec,match", [
    ("latency_p50_ms", "--target: expected [DEVICE_OR_CLASS:]METRIC=VALUE"),
    ("speed=3", "--target: unknown metric 'speed'; known: latency_p50_ms"),
    ("latency_p50_ms=-1", "--target: latency_p50_ms: must be > 0, got '-1'"),
    ("latency_p50_ms=0x", "--target: latency_p50_ms: must be > 0, got '0x'"),
    ("energy_mj=fast", "--target: energy_mj: expected a number or a multiple of dense like 0.5x, got 'fast'"),
    ("latency_p50_ms=inf", "--target: latency_p50_ms: must be finite"),
    ("accuracy_drop_pp=0.5x", "--target: accuracy_drop_pp: is a drop in percentage points"),
    ("accuracy_drop_pp=-1", "--target: accuracy_drop_pp: must be in [0, 100)"),
])
def test_target_parsing_errors_name_the_argument(spec, match):
    with pytest.raises(UsageError, match=match.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.").replace("*", r"\*")):
        tg.parse_target_arg(spec)


def test_contradictory_and_impossible_targets_are_usage_errors(tmp_path):
    dev = device()
    with pytest.raises(UsageError, match="latency_p50_ms is given twice with different values"):
        tg.parse_cli(["latency_p50_ms=2", "latency_p50_ms=0.5x"], 1.0)
    with pytest.raises(UsageError, match=r"--max-accuracy-drop: must be in \[0, 100\)|accuracy_drop_pp: must be"):
        tg.parse_cli(["latency_p50_ms=2"], -0.5)
    with pytest.raises(UsageError, match="--max-accuracy-drop: 2 contradicts --target accuracy_drop_pp=1"):
        tg.parse_cli(["accuracy_drop_pp=1"], 2.0)
    with pytest.raises(UsageError, match="--max-accuracy-drop: no maximum accuracy drop for device local"):
        targets_for([dev], "latency_p50_ms=2", drop=None)
    with pytest.raises(UsageError, match="no latency, throughput, power, energy or memory target for device local"):
        targets_for([dev], drop=1.0)
    nopower = device("np", power=None)
    with pytest.raises(UsageError, match="device np has no power section in its config, so its energy per "
                                         "inference cannot be measured"):
        targets_for([nopower], "energy_mj=5")
    with pytest.raises(UsageError, match=r"4 W is below device local's idle power \(5 W, modelled\): impossible"):
        targets_for([dev], "power_w=4")
    with pytest.raises(UsageError, match="--target: 'nope' is neither a device id nor a device class"):
        targets_for([dev], "latency_p50_ms=2", "nope:latency_p50_ms=1")


def test_target_precedence_config_file_cli_and_scopes(tmp_path):
    a = device("a")
    b = device("b").model_copy(update={"device_class": "pi"})
    # a device config with a targets: mapping (the field host.fleet.devices may grow) is the lowest layer
    c = SimpleNamespace(id="c", device_class="pi", source="c.yaml", power=PowerConfig(),
                        targets={"latency_p90_ms": 30, "energy_mj": "0.8x"})
    f = tmp_path / "targets.yaml"
    f.write_text("default: {latency_p50_ms: 0.5x, accuracy_drop_pp: 2}\nclasses: {pi: {latency_p50_ms: 20}}\n"
                 "devices: {a: {energy_mj: 3}}\n")
    got = targets_for([a, b, c], "b:latency_p50_ms=10", drop=None, targets_file=f)
    assert got["a"].targets["latency_p50_ms"].relative and got["a"].targets["energy_mj"].value == 3
    assert got["a"].max_accuracy_drop_pp == 2
    assert got["b"].targets["latency_p50_ms"].value == 10            # CLI device scope beats the file's class
    assert got["c"].targets["latency_p50_ms"].value == 20            # file class beats nothing for c's p50
    assert got["c"].targets["latency_p90_ms"].value == 30 and got["c"].targets["energy_mj"].relative
    got = targets_for([a, b], "latency_p50_ms=7", "pi:latency_p50_ms=9", drop=1.0, targets_file=f)
    assert got["a"].targets["latency_p50_ms"].value == 7 and got["b"].targets["latency_p50_ms"].value == 9
    assert got["a"].max_accuracy_drop_pp == 1.0                       # the command line beats the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: {a: {latency_ms: fast}}\n")
    with pytest.raises(UsageError, match="bad.yaml: devices.a.latency_ms: latency_p50_ms: expected a number"):
        targets_for([a], drop=1.0, targets_file=bad)
    bad.write_text("device: {}\n")
    with pytest.raises(UsageError, match="bad.yaml: device: unknown field"):
        targets_for([a], drop=1.0, targets_file=bad)


def test_bounds_resolve_relative_and_assess():
    ts = targets_for([device()], "latency_p50_ms=0.5x", "throughput_ips=500", drop=1.0)["local"]
    b = ts.resolve({"latency_p50_ms": 4.0, "throughput_ips": 250.0, "top1": 0.9})
    assert b.limits == {"latency_p50_ms": 2.0, "throughput_ips": 500.0}
    a = b.assess({"latency_p50_ms": 1.9, "throughput_ips": 510.0, "top1": 0.895})
    assert a.meets and a.drop_pp == pytest.approx(0.5)
    a = b.assess({"latency_p50_ms": 2.2, "throughput_ips": 400.0, "top1": 0.87})
    assert not a.meets_resources and not a.meets_accuracy
    assert a.violations["latency_p50_ms"] == pytest.approx(0.1)
    assert a.violations["throughput_ips"] == pytest.approx(0.25)
    assert a.violations["accuracy_drop_pp"] == pytest.approx(2.0)
    assert "latency_p50_ms <= 2 (0.5x)" in tg.describe(ts, b)


# ------------------------------------------------------------------------------------------ pure helpers

def test_isotonic_and_required_macs():
    assert sab.isotonic([1, 3, 2, 4]) == [1, 2.5, 2.5, 4]
    assert sab.isotonic([5, 4, 3]) == [4, 4, 4]
    # secant between bracketing points
    assert sab.required_macs([(100, 4.0), (50, 2.0)], 3.0, 100, 4.0, 0.15) == pytest.approx(75)
    # only the dense point: the prior (15 % fixed) extrapolates
    m = sab.required_macs([(100, 4.0)], 2.0, 100, 4.0, 0.15)
    assert 4.0 * (0.15 + 0.85 * m / 100) == pytest.approx(2.0)
    # everything within the bound
    assert sab.required_macs([(100, 1.0)], 2.0, 100, 1.0, 0.15) == math.inf
    # a noisy, non-monotone pair: the isotonic fit pools it and still gives a finite step
    assert sab.required_macs([(100, 4.0), (80, 4.2), (50, 2.5)], 2.0, 100, 4.0, 0.15) < 50


def test_allocation_keeps_the_mean_and_prunes_insensitive_groups_more():
    space = resnet_like_space(3, sensitivities=True)
    lr = sa.allocate(space, 0.5, cap=0.9)
    n = {g.name: g.channels for g in space.groups}
    assert sum(n[g] * r for g, r in lr.items()) / sum(n.values()) == pytest.approx(0.5, abs=1e-6)
    assert lr["layer1.1.conv1"] > lr["layer1.0.conv1"]          # first blocks are the sensitive ones here
    assert max(lr.values()) <= 0.9
    assert set(sa.allocate(space, 0.5, sensitivity=False).values()) == {0.5}
    assert sa.allocate(space, 0.95, cap=0.9) == {g.name: pytest.approx(0.9) for g in space.groups}


@pytest.mark.parametrize("round_to", [1, 4, 8])
def test_kept_counts_round_trip_through_layer_ratios(round_to):
    from edgeprune.prune import kept_channels

    space = resnet_like_space(2)
    for r in (0.1, 0.33, 0.5, 0.77):
        kept = space.kept_for(sa.allocate(space, r, sensitivity=False), round_to)
        ratios = space.layer_ratios(kept, round_to)
        assert {g: kept_channels(space.group(g).channels, x, round_to) for g, x in ratios.items()} == kept
    assert space.valid_kept("layer3.0.conv1", 8, 0.9) == [64, 56, 48, 40, 32, 24, 16, 8]


# ------------------------------------------------------------------------------------------ bisect

@pytest.mark.parametrize("fixed,noise,round_to,dense_ms", [
    (0.15, 0.03, 1, 4.0), (0.05, 0.05, 1, 3.0), (0.3, 0.03, 1, 4.5), (0.15, 0.08, 8, 4.0), (0.25, 0.05, 4, 2.0),
])
def test_bisect_meets_half_latency_in_at_most_6_device_evaluations(tmp_path, fixed, noise, round_to, dense_ms):
    space = resnet_like_space()
    dev = device(round_to=round_to)
    ev = FakeEvaluator(space, fixed=fixed, noise=noise, dense_ms={"local": dense_ms})
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.5x", drop=5.0), ev, space)
    r = res.devices[0]
    assert r.verdict == "met", r.reason
    assert r.device_evals == len(ev.calls) <= 6, (r.device_evals, r.reason)
    dense = r.rows[0]
    assert r.chosen["latency_p50_ms"] <= 0.5 * dense["latency_p50_ms"]
    assert res.all_met


def test_bisect_stops_at_once_when_dense_meets_and_uses_sensitivity(tmp_path):
    space = resnet_like_space(sensitivities=True)
    dev = device()
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=10", drop=1.0), ev, space)
    assert res.devices[0].verdict == "met" and len(ev.calls) == 1
    assert "dense model already meets" in res.devices[0].reason
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.5x", drop=5.0), ev, space, name="sens")
    kept = res.devices[0].chosen
    rec = json.loads((tmp_path / "sens" / "local" / "chosen" / "candidate.json").read_text())
    # sensitive first blocks keep more channels than the others of their stage
    assert rec["layer_ratios"].get("layer2.0.conv1", 0) < rec["layer_ratios"]["layer2.3.conv1"], kept


def test_infeasible_latency_gives_verdict_with_closest_candidate(tmp_path):
    space = resnet_like_space()
    dev = device()
    ev = FakeEvaluator(space, fixed=0.3)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.2x", drop=5.0), ev, space, max_evals=8)
    r = res.devices[0]
    assert r.verdict == "infeasible" and r.chosen is None and not res.all_met
    assert "maximum ratio" in r.reason or "max-evals" in r.reason
    assert r.closest["latency_p50_ms"] == min(x["latency_p50_ms"] for x in r.rows)
    out = tmp_path / "run" / "local"
    assert not (out / "chosen").exists() and json.loads((out / "closest" / "candidate.json").read_text())["key"] \
        == r.closest["key"]
    result = json.loads((out / "result.json").read_text())
    assert result["verdict"] == "infeasible" and result["closest"]["key"] == r.closest["key"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"][0]["verdict"] == "infeasible"


def test_accuracy_budget_too_tight_is_infeasible_with_closest(tmp_path):
    space = resnet_like_space()
    dev = device()
    ev = FakeEvaluator(space, top1_slope=0.4)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.5x", drop=0.2), ev, space)
    r = res.devices[0]
    assert r.verdict == "infeasible" and r.closest is not None and len(ev.calls) <= 6
    assert r.closest["meets_resources"] and r.closest["drop_pp"] > 0.2


def test_impossible_power_after_dense_stops_without_more_evaluations(tmp_path):
    space = resnet_like_space()
    dev = device()
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], targets_for([dev], "power_w=0.5x", drop=5.0), ev, space)
    assert res.devices[0].verdict == "infeasible" and len(ev.calls) == 1
    assert "idle power" in res.devices[0].reason


def test_pareto_fronts_and_files(tmp_path):
    space = resnet_like_space()
    dev = device()
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.5x", "energy_mj=0.6x", drop=5.0), ev, space)
    r = res.devices[0]
    par = json.loads((tmp_path / "run" / "local" / "pareto.json").read_text())
    assert len(par["points"]) == r.device_evals
    front = [p for p in par["points"] if p["front_latency"]]
    # non-dominated: sorted by latency, top-1 strictly falls
    lat = sorted(front, key=lambda p: p["latency_p50_ms"])
    assert all(a["top1"] > b["top1"] for a, b in zip(lat[1:], lat)) or len(lat) == 1
    for p in par["points"]:
        if not p["front_latency"]:
            assert any(q["latency_p50_ms"] <= p["latency_p50_ms"] and q["top1"] >= p["top1"] for q in front)
    assert par["energy_vs_accuracy"] and (tmp_path / "run" / "local" / "pareto.csv").read_text().startswith("key,")
    assert (tmp_path / "run" / "summary.csv").read_text().splitlines()[1].startswith("local,met,")


def test_two_devices_own_targets_alignment_and_keys(tmp_path):
    space = resnet_like_space()
    a, b = device("fast-a", round_to=1), device("pi-b", round_to=8)
    tset = targets_for([a, b], "fast-a:latency_p50_ms=0.6x", "pi-b:latency_p50_ms=3.6", drop=5.0)
    ev = FakeEvaluator(space, dense_ms={"fast-a": 2.0, "pi-b": 8.0})
    res = run(tmp_path, [a, b], tset, ev, space)
    ra, rb = res.devices
    assert ra.verdict == rb.verdict == "met", (ra.reason, rb.reason)
    assert ra.chosen["latency_p50_ms"] <= 1.2 and rb.chosen["latency_p50_ms"] <= 3.6
    assert ra.chosen["key"] != rb.chosen["key"]
    # pi-b's channels are multiples of 8
    kept = json.loads((tmp_path / "run" / "pi-b" / "chosen" / "candidate.json").read_text())["candidate"]["kept"]
    assert kept and all(k % 8 == 0 for k in kept.values())
    # the two devices' dense artifacts are one key (same format, nothing pruned), measured once per device
    assert ra.rows[0]["key"] == rb.rows[0]["key"] and ev.calls[:2] == [("fast-a", ra.rows[0]["key"]),
                                                                       ("pi-b", rb.rows[0]["key"])]


# ------------------------------------------------------------------------------------------ persistence

def test_resume_after_a_crash_repeats_no_completed_evaluation(tmp_path):
    space = resnet_like_space()
    devs = [device("d1"), device("d2", round_to=8)]
    tset = targets_for(devs, "d1:latency_p50_ms=0.5x", "d2:latency_p50_ms=0.6x", drop=5.0)
    ref = FakeEvaluator(space)
    full = run(tmp_path, devs, tset, ref, space, name="ref")

    crashing = FakeEvaluator(space, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, devs, tset, crashing, space, name="r1")
    assert len(crashing.calls) == 3
    lines = (tmp_path / "r1" / so.EVALUATIONS).read_text().splitlines()
    kinds = [json.loads(x)["kind"] for x in lines]
    assert kinds.count("device") == 3 and set(kinds) <= {"device", "paired"}   # paired: dense beside a candidate
    # a torn last line (killed inside a write) is cut off on resume
    with open(tmp_path / "r1" / so.EVALUATIONS, "a") as f:
        f.write('{"kind": "device", "dev')
    second = FakeEvaluator(space)
    res = run(tmp_path, devs, tset, second, space, name="r1", resume=True)
    assert not set(second.calls) & set(crashing.calls)               # nothing completed is measured again
    assert len(crashing.calls) + len(second.calls) == len(ref.calls)
    assert [(d.verdict, d.device_evals, d.chosen["key"]) for d in res.devices] == \
        [(d.verdict, d.device_evals, d.chosen["key"]) for d in full.devices]
    assert [d.new_device_evals for d in res.devices] == [
        sum(1 for c in second.calls if c[0] == d.device_id) for d in res.devices]
    # once finished, resuming again measures nothing
    third = FakeEvaluator(space)
    run(tmp_path, devs, tset, third, space, name="r1", resume=True)
    assert third.calls == []
    assert json.loads((tmp_path / "r1" / so.RUN_FILE).read_text())["status"] == "finished"


def test_resume_uses_stored_options_and_refuses_a_taken_folder(tmp_path):
    space = resnet_like_space()
    dev = device()
    tset = targets_for([dev], "latency_p50_ms=0.5x", drop=5.0)
    run(tmp_path, [dev], tset, FakeEvaluator(space), space, max_evals=2)
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], tset, ev, space, resume=True)
    assert res.devices[0].device_evals == 2 and ev.calls == []       # max_evals=2 came from search.json
    with pytest.raises(UsageError, match="already holds search run run; continue it with --resume run"):
        run(tmp_path, [dev], tset, FakeEvaluator(space), space)
    with pytest.raises(UsageError, match="holds run run, not other"):
        hs.resume("other", out=tmp_path / "run", space=space, evaluator=ev)
    with pytest.raises(UsageError, match="--resume: .*search.json not found"):
        hs.resume("nothing", out=tmp_path / "nothing", space=space, evaluator=ev)


def test_store_round_trip_and_bad_line(tmp_path):
    st = sst.EvaluationLog(tmp_path / "e.jsonl")
    st.put({"kind": "device", "device": "a", "key": "k1", "x": 1})
    st.put({"kind": "host", "device": "", "key": "k2"})
    again = sst.EvaluationLog(tmp_path / "e.jsonl")
    assert again.get("device", "a", "k1")["x"] == 1 and again.count("host") == 1
    (tmp_path / "e.jsonl").write_text("nope\n")
    with pytest.raises(UsageError, match=r"e.jsonl:1: not a JSON line"):
        sst.EvaluationLog(tmp_path / "e.jsonl")


def test_options_round_trip_through_search_json(tmp_path):
    opts = options(tmp_path, algo="netadapt", max_evals=5, algo_options={"netadapt_levels": (0.5,)})
    dev = device()
    sst.write_run(tmp_path / "o", "o", opts, [dev], targets_for([dev], "latency_p50_ms=2", drop=1.0))
    run_id, back, devs, tset = sst.read_run(tmp_path / "o")
    assert run_id == "o" and back == opts and devs[0] == dev
    assert tset["local"].targets["latency_p50_ms"].value == 2 and tset["local"].max_accuracy_drop_pp == 1.0


@pytest.mark.parametrize("kw,match", [
    ({"algo": "annealing"}, "--algo: unknown algorithm 'annealing'; known: bisect, netadapt"),
    ({"max_evals": 0}, "--max-evals: must be >= 1"),
    ({"importance": "random"}, "--importance: 'random' makes a candidate's plan differ"),
    ({"algo_options": {"max_ratio": 1.0}}, r"--max-ratio: must be in \(0, 1\)"),
])
def test_bad_options(tmp_path, kw, match):
    space = resnet_like_space()
    dev = device()
    with pytest.raises(UsageError, match=match):
        run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=2", drop=1.0), FakeEvaluator(space), space, **kw)
    assert not (tmp_path / "run").exists()


def test_device_ids_that_cannot_be_output_folders(tmp_path):
    with pytest.raises(UsageError, match="id 'work' cannot be a folder of the search output"):
        so.check_devices([device("work")])
    tfl = device("tfl").model_copy(update={"runtime": local_device().runtime.model_copy(update={"name": "tensorrt"}),
                                           "precisions": ["fp16"]})
    assert so.profile_for(tfl) == so.Profile(1, "tensorrt", (("precision", "fp16"),))
    assert so.profile_for(device(precisions=["fp16"]).model_copy(update={
        "runtime": local_device().runtime.model_copy(update={"name": "openvino"})})).fmt == "openvino-fp16"
    with pytest.raises(UsageError, match="runtime onnxruntime with precision int8: no export format"):
        so.profile_for(device(precisions=["int8"]))


# ------------------------------------------------------------------------------------------ netadapt

def test_netadapt_meets_target_and_caches_the_layer_table(tmp_path):
    space = resnet_like_space(3, sensitivities=True)
    dev = device(round_to=4)
    tset = targets_for([dev], "latency_p50_ms=0.6x", drop=5.0)
    ev = FakeEvaluator(space, noise=0.02)
    res = run(tmp_path, [dev], tset, ev, space, algo="netadapt", max_evals=4)
    r = res.devices[0]
    assert r.verdict == "met", r.reason
    assert r.chosen["recovery"] == "full" and r.device_evals <= 3
    assert ev.lut_calls and r.lut_jobs == len(ev.lut_calls) and r.host_evals == len(ev.host_calls) > 0
    # netadapt never cut a stage's (more harmful, by the fake host top-1) first block when another would do
    kept = json.loads((tmp_path / "run" / "local" / "chosen" / "candidate.json").read_text())["candidate"]["kept"]
    assert kept and not any(g.endswith(".0.conv1") for g in kept)
    # a second run on the same device reuses the cached table; its resume serves host evaluations from the store
    ev2 = FakeEvaluator(space, noise=0.02)
    res2 = run(tmp_path, [dev], tset, ev2, space, name="again", algo="netadapt", max_evals=4)
    assert ev2.lut_calls == [] and res2.devices[0].chosen["key"] == r.chosen["key"]
    ev3 = FakeEvaluator(space, noise=0.02)
    run(tmp_path, [dev], tset, ev3, space, name="again", resume=True)
    assert ev3.host_calls == [] and ev3.calls == [] and ev3.lut_calls == []


def test_lut_configs_and_estimator_track_macs():
    space = resnet_like_space(2)
    cfgs = san.lut_configs(space, 1, (0.75, 0.5, 0.25), 0.9)
    keys = {c.key() for c in cfgs}
    assert len(keys) == len(cfgs)
    lut = {c.key(): 1e-3 * c.out_channels * c.in_channels * c.in_hw[0] * c.in_hw[1] / c.stride[0] ** 2 for c in cfgs}
    dense = sum(lut[layer.config.key()] for layer in space.affected_layers())
    est = san.LutEstimator(space, lut, dense + 1.0, 1, (0.75, 0.5, 0.25), 0.9)
    kept = space.kept_for(sa.allocate(space, 0.5, sensitivity=False), 1)
    exact = 1.0 + sum(1e-3 * c.out_channels * c.in_channels * c.in_hw[0] * c.in_hw[1] / c.stride[0] ** 2
                      for c in (layer.shaped(kept) for layer in space.affected_layers()))
    assert est.estimate(kept) == pytest.approx(exact, rel=1e-6)
    odd = {g: 5 for g in kept}     # between measured widths: interpolated
    assert est.estimate(odd) < est.estimate(kept)


# ------------------------------------------------------------------------------------------ the real model space

def test_model_space_of_resnet20_matches_torch_pruning(resnet20):
    import copy

    import torch

    from edgeprune import prune

    model, meta = resnet20
    space = ssp.build_space("resnet20", model, meta)
    assert [g.name for g in space.groups] == [g.name for g in prune.prunable_groups(model, torch.zeros(1, 3, 32, 32))]
    kept = space.kept_for(sa.allocate(space, 0.5, sensitivity=False), 8)
    pr = prune.prune(copy.deepcopy(model), 0.0, torch.zeros(1, 3, 32, 32), round_to=8,
                     layer_ratios=space.layer_ratios(kept, 8))
    assert {layer.name: len(layer.keep) for layer in pr.plan.layers} == kept
    # conv/linear MACs from the shapes alone are within 2 % of Torch-Pruning's count (which adds BatchNorm etc.)
    assert space.dense_macs == pytest.approx(pr.macs_before, rel=0.02)
    assert space.macs(kept) == pytest.approx(pr.macs_after, rel=0.02)


# ------------------------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_bisect_end_to_end_on_the_local_device(tmp_path):
    """ResNet-20 on the local agent: quick timing, tiny fine-tune, 0.8x p50 latency.

    0.7x was flaky (1 run in 5 on the loaded VM): with 8-aligned widths only 8/8/16 reached it when the dense run
    happened to be timed fast, and 8/8/16 loses ~73 pp with this tiny recovery. Dense cannot meet 0.8x, so the
    search must still prune to pass."""
    dev = local_device().model_copy(update={"round_to": 8, "cache_dir": str(tmp_path / "dev-cache")})
    tset = targets_for([dev], "latency_p50_ms=0.8x", drop=60.0)
    opts = so.SearchOptions(model="resnet20", max_evals=6, quick=True, eval_per_class=20,
                            cache_dir=str(tmp_path / "cache"),
                            recovery=so.RecoveryOptions(finetune_per_class=10, batch_size=50),
                            algo_options=sa.AlgoOptions(allocation="uniform"))
    events = []
    res = hs.start(opts, [dev], tset, out=tmp_path / "out", run_id="e2e", events=lambda *e: events.append(e))
    r = res.devices[0]
    assert r.verdict == "met", (r.reason, r.rows)
    assert 2 <= r.device_evals <= 6
    chosen = tmp_path / "out" / "local" / "chosen"
    cand = json.loads((chosen / "candidate.json").read_text())
    manifests = list(chosen.glob("*.manifest.json"))
    assert len(manifests) == 1
    man = json.loads(manifests[0].read_text())
    assert (chosen / man["file"]).is_file() and (chosen / "plan.json").is_file()
    assert man["pruning_plan_sha256"] == cand["plan_sha256"] and man["sha256"] == cand["artifact_sha256"]
    assert cand["round_to"] == 8 and all(k % 8 == 0 for k in cand["candidate"]["kept"].values())
    from agent import schema
    rep = schema.loads_report((chosen / "report.json").read_text())
    assert rep.timing.latency_ms.median == pytest.approx(r.chosen["latency_p50_ms"])
    assert rep.accuracy.n == 200 and rep.timing.latency_ms.median <= r.bounds["limits"]["latency_p50_ms"]
    lines = [json.loads(x) for x in (tmp_path / "out" / so.EVALUATIONS).read_text().splitlines()]
    evals = [x for x in lines if x["kind"] == "device"]
    assert len(evals) == r.device_evals and all(x["artifact_sha256"] and x["report"]["status"] == "ok" for x in evals)
    # the pick and dense re-checked by the agent on the 9,800 test images the search did not choose on
    held = [x for x in lines if x["kind"] == "holdout"]
    assert sorted(x["key"] for x in held) == sorted({evals[0]["key"], r.chosen["key"]})
    assert all(x["accuracy"]["n"] == 9800 and x["accuracy"]["split"] == "holdout" for x in held)
    assert r.holdout["images"] == 9800 and r.holdout["test_images"] == 10_000   # eval: 20 per class here
    assert any(e[0] == "result" for e in events)
    # each pruned candidate's recovery is reported: wall time, images seen, precision
    pruned = [row for row in r.rows if row["recovery"] != "none"]
    assert pruned and all(row["recovery_s"] > 0 and row["images_seen"] > 0 and row["recovery_precision"] in
                          ("fp32", "bf16") for row in pruned)
    header = (tmp_path / "out" / "local" / "pareto.csv").read_text().splitlines()[0]
    assert "recovery_s,images_seen,recovery_precision" in header


KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
from tests.test_search import FakeEvaluator, resnet_like_space, device, targets_for, options
from host.search import run as hs

class Killed(FakeEvaluator):
    def measure(self, requests, done):
        def then_die(req, m, extra):
            done(req, m, extra)
            if len(self.calls) == {n}:
                os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no exception handlers: a real crash
        super().measure(requests, then_die)

space = resnet_like_space()
devs = [device("d1"), device("d2", round_to=8)]
tset = targets_for(devs, "d1:latency_p50_ms=0.5x", "d2:latency_p50_ms=0.6x", drop=5.0)
opts = options(__import__("pathlib").Path({tmp!r}))
hs.start(opts, devs, tset, out=__import__("pathlib").Path({tmp!r}) / "killed", run_id="killed", space=space,
         evaluator=Killed(space))
"""


def test_search_process_killed_then_resumed_repeats_nothing(tmp_path):
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    space = resnet_like_space()
    devs = [device("d1"), device("d2", round_to=8)]
    tset = targets_for(devs, "d1:latency_p50_ms=0.5x", "d2:latency_p50_ms=0.6x", drop=5.0)
    ref = FakeEvaluator(space)
    full = run(tmp_path, devs, tset, ref, space, name="ref")
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=root, n=3, tmp=str(tmp_path)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    done_before = [(json.loads(x)["device"], json.loads(x)["key"])
                   for x in (tmp_path / "killed" / so.EVALUATIONS).read_text().splitlines()]
    assert len(done_before) == 3
    after = FakeEvaluator(space)
    res = run(tmp_path, devs, tset, after, space, name="killed", resume=True)
    assert not set(after.calls) & set(done_before)
    assert len(after.calls) + 3 == len(ref.calls)
    assert [d.chosen["key"] for d in res.devices] == [d.chosen["key"] for d in full.devices]


@pytest.mark.slow
def test_fleet_evaluator_layer_table_and_host_top1_for_real(tmp_path, resnet20):
    """netadapt's real work on ResNet-20: two layer configurations timed alone by the local agent (cached as
    exported), and a proposal's short-recovery top-1 in torch."""
    model, meta = resnet20
    space = ssp.build_space("resnet20", model, meta)
    opts = so.SearchOptions(model="resnet20", eval_per_class=5, cache_dir=str(tmp_path / "cache"), lut_seconds=0.1,
                            short_recovery=so.RecoveryOptions(finetune_per_class=5, batch_size=25))
    ev = sev.FleetEvaluator(tmp_path / "run", "real", opts, "resnet20", model, meta, space)
    dev = local_device().model_copy(update={"cache_dir": str(tmp_path / "dev-cache")})
    prof = so.profile_for(dev)
    layer = space.affected_layers()[0]
    cfgs = [layer.config, layer.shaped({layer.out_group: 8})]
    got = {}
    errors = ev.layer_latency([(dev, prof, cfgs)], lambda d, k, ms, ident: got.update({k: (ms, ident)}))
    assert errors == {"local": None} and set(got) == {c.key() for c in cfgs}
    assert all(ms > 0 and ident["runtime"] == "onnxruntime" for ms, ident in got.values())
    assert len(list((tmp_path / "cache" / "lut-artifacts").glob("*/*.onnx"))) == 2
    cand = sa.Candidate.of(space, {space.groups[0].name: 8}, "short")
    top1 = ev.host_top1(prof, cand)
    assert 0.3 < top1 <= 1.0


def test_bisect_with_cheap_probes_measures_the_chosen_one_fully_recovered(tmp_path):
    space = resnet_like_space()
    dev = device(round_to=4)
    ev = FakeEvaluator(space)
    res = run(tmp_path, [dev], targets_for([dev], "latency_p50_ms=0.5x", drop=5.0), ev, space,
              algo_options={"probe_recovery": "short"})
    r = res.devices[0]
    assert r.verdict == "met" and "measured again with full recovery" in r.reason
    recoveries = [x["recovery"] for x in r.rows]
    assert recoveries[0] == "none" and set(recoveries[1:-1]) == {"short"} and recoveries[-1] == "full"
    assert r.chosen["recovery"] == "full" and r.device_evals <= 7
    # the final one is the lowest-ratio feasible probe, rebuilt: same channels, another key
    probe = min((x for x in r.rows[1:-1] if x["meets_resources"]), key=lambda x: x["ratio"])
    assert probe["macs"] == r.chosen["macs"] and probe["key"] != r.chosen["key"]


def test_a_relative_target_the_report_cannot_resolve_is_a_device_error(tmp_path):
    space = resnet_like_space()
    dev = device()

    class NoPower(FakeEvaluator):
        def metrics(self, dev_id, cand, key):
            return {k: v for k, v in super().metrics(dev_id, cand, key).items() if k not in ("power_w", "energy_mj")}

    ev = NoPower(space)
    res = run(tmp_path, [dev], targets_for([dev], "energy_mj=0.5x", drop=5.0), ev, space)
    r = res.devices[0]
    assert r.verdict == "error" and "energy_mj: relative to dense, but the dense measurement has no energy_mj" \
        in r.reason and len(ev.calls) == 1


def test_a_failing_device_does_not_stop_the_others_and_is_retried_on_resume(tmp_path):
    space = resnet_like_space()
    good, bad = device("good"), device("bad")
    tset = targets_for([good, bad], "latency_p50_ms=0.5x", drop=5.0)

    class Flaky(FakeEvaluator):
        def measure(self, requests, done):
            for req in requests:
                if req.device.id == "bad" and len(self.calls) >= 2 and not req.pairs:
                    self.calls.append((req.device.id, req.key))
                    done(req, sa.DeviceMeasurement(False, error="InfrastructureError: connection lost"), {})
                else:
                    super().measure([req], done)

    ev = Flaky(space)
    res = run(tmp_path, [good, bad], tset, ev, space)
    g, b = res.devices
    assert g.verdict == "met" and b.verdict == "error" and "connection lost" in b.reason
    assert b.closest is not None and b.folder == "bad/closest"       # what it had measured until then
    lines = (tmp_path / "run" / so.EVALUATIONS).read_text().splitlines()
    assert all(json.loads(x)["metrics"] for x in lines)              # failures are not recorded as completed
    # the failed evaluation is tried again on resume (its device is back): nothing else is repeated
    again = FakeEvaluator(space)
    res = run(tmp_path, [good, bad], tset, again, space, resume=True)
    assert res.devices[1].verdict == "met" and again.calls[0] == ev.calls[-1] and again.calls[0][0] == "bad"
    assert all(c[0] == "bad" for c in again.calls)


def test_devices_on_one_machine_are_measured_one_after_the_other():
    from host.fleet.devices import SSHConfig

    ssh = lambda host, **kw: device(host.replace(".", "-"), transport="ssh",  # noqa: E731
                                    ssh=SSHConfig(host=host, user="u", **kw))
    assert sev.machine_of(device("a")) == sev.machine_of(device("b")) == sev.machine_of(ssh("127.0.0.1")) == "local"
    assert sev.machine_of(ssh("pi.lan")) != sev.machine_of(ssh("jetson.lan"))
    assert sev.machine_of(ssh("127.0.0.1", proxy_jump="bastion")) != "local"


def test_results_store_gets_every_evaluation_once_across_a_crash_and_resume(tmp_path):
    from host.results.store import RunRecorder, Store

    space = resnet_like_space()
    devs = [device("d1"), device("d2", round_to=8)]
    tset = targets_for(devs, "d1:latency_p50_ms=0.5x", "d2:latency_p50_ms=0.6x", drop=5.0)
    store = Store(str(tmp_path / "r.db"))
    with pytest.raises(KeyboardInterrupt):
        with RunRecorder(store, "r1", "search", command=[], provenance={}) as rec:
            hs.start(options(tmp_path), devs, tset, out=tmp_path / "r1", run_id="r1", space=space,
                     evaluator=FakeEvaluator(space, crash_after=3), recorder=rec)
    assert store.run("r1")["status"] == "interrupted" and len(store.evaluations("r1")) == 3
    with RunRecorder(store, "r1", "search", command=[], provenance={}, resume=True) as rec:
        res = hs.resume("r1", out=tmp_path / "r1", space=space, evaluator=FakeEvaluator(space), recorder=rec)
    lines = [json.loads(x) for x in (tmp_path / "r1" / so.EVALUATIONS).read_text().splitlines()]
    lines = [x for x in lines if x["kind"] == "device"]   # not the dense model re-measured beside each candidate
    evals = store.evaluations("r1")
    assert sorted((e["device_id"], e["key"]) for e in evals) == sorted((x["device"], x["key"]) for x in lines)
    for d in res.devices:   # numbered 1..n per device, verdicts filled in at the end
        mine = [e for e in evals if e["device_id"] == d.device_id]
        assert sorted(e["seq"] for e in mine) == list(range(1, d.device_evals + 1))
        chosen = next(e for e in mine if e["key"] == d.chosen["key"])
        assert chosen["meets"] is True
    assert len(store.measurements("r1")) == len(lines)
    run = store.run("r1")
    assert run["status"] == "complete" and [d["device_id"] for d in run["summary"]["devices"]] == ["d1", "d2"]


# ------------------------------------------------------------------------------------------ label-free targets

def test_label_free_targets_from_flags_file_and_config(tmp_path):
    assert tg.parse_target_arg("agreement=0.95") == (None, "agreement", 0.95, False)
    assert tg.parse_target_arg("min_snr_db=20") == (None, "snr_db", 20.0, False)
    with pytest.raises(UsageError, match="agreement: is measured against the dense model's outputs"):
        tg.parse_target_arg("agreement=0.9x")
    with pytest.raises(UsageError, match=r"agreement: a fraction in \(0, 1\]"):
        tg.parse_target_arg("agreement=95")
    with pytest.raises(UsageError, match="--min-agreement: 0.8 contradicts --target agreement=0.9"):
        tg.parse_cli(["agreement=0.9"], None, min_agreement=0.8)
    f = tmp_path / "t.yaml"
    f.write_text("default: {latency_p50_ms: 0.5x, agreement: 0.9}\ndevices: {b: {snr_db: 25, min_agreement: 0.97}}\n")
    a, b = device("a"), device("b")
    ts = targets_for([a, b], drop=None, targets_file=f)
    assert (ts["a"].min_agreement, ts["a"].min_snr_db, ts["a"].max_accuracy_drop_pp) == (0.9, None, None)
    assert (ts["b"].min_agreement, ts["b"].min_snr_db) == (0.97, 25.0)
    assert ts["a"].accuracy_metric == "agreement" and "agreement >= 0.9" in ts["a"].text()
    cli = tg.device_targets([a], tg.parse_cli(["latency_p50_ms=2"], None, min_snr_db=30.0))["a"]
    assert cli.accuracy_metric == "snr_db" and cli.snr_source == "--min-snr-db"
    assert tg.TargetSet.from_dict(ts["b"].to_dict()) == ts["b"]
    # a device config's targets: take the label-free metrics too
    c = device("c").model_copy(update={"targets": {"latency_ms": "0.5x", "min_agreement": 0.99}})
    assert targets_for([c], drop=None)["c"].min_agreement == 0.99


def test_label_free_bounds_assess_agreement_and_snr():
    ts = tg.device_targets([device()], tg.parse_cli(["latency_p50_ms=0.5x"], None, min_agreement=0.9,
                                                    min_snr_db=20.0))["local"]
    b = ts.resolve({"latency_p50_ms": 4.0, "agreement": 1.0, "snr_db": 300.0})
    assert b.max_drop_pp is None and b.accuracy_metric == "agreement"
    a = b.assess({"latency_p50_ms": 1.9, "agreement": 0.95, "snr_db": 25.0})
    assert a.meets and a.drop_pp is None and set(a.violations) == {"latency_p50_ms", "agreement", "snr_db"}
    a = b.assess({"latency_p50_ms": 1.9, "agreement": 0.85, "snr_db": 25.0})
    assert a.meets_resources and not a.meets_accuracy
    assert a.violations["agreement"] == pytest.approx(0.5)      # 15 pp lost, 10 pp allowed
    a = b.assess({"latency_p50_ms": 1.9, "agreement": 0.95, "snr_db": 15.0})
    assert not a.meets_accuracy and a.violations["snr_db"] == pytest.approx(0.25)
    assert not b.assess({"latency_p50_ms": 1.9}).meets_accuracy     # a report without them: not met
    assert "agreement >= 0.9" in tg.describe(ts, b) and "drop <=" not in tg.describe(ts, b)


def test_metrics_from_a_label_free_report():
    from agent import schema

    rep = schema.Report(job_id="j", status="ok", accuracy=schema.AccuracyResult(
        split="data", n=10, agreement=0.9, snr_db=21.5, metric="agreement"))
    assert tg.metrics_from_report(rep) == {"agreement": 0.9, "snr_db": 21.5}


def test_search_on_agreement_ranks_by_agreement(tmp_path):
    """The fake evaluator's candidates carry agreement (no top-1): a search with --min-agreement alone meets the
    latency target and records which metric it used."""
    space = resnet_like_space()

    class Unlabelled(FakeEvaluator):
        def metrics(self, dev_id, cand, key):
            m = super().metrics(dev_id, cand, key)
            m["agreement"] = round(1.0 - 0.5 * (0.93 - m.pop("top1")), 4)
            return m

    devs = [device()]
    tset = tg.device_targets(devs, tg.parse_cli(["latency_p50_ms=0.5x"], None, min_agreement=0.9))
    res = run(tmp_path, devs, tset, Unlabelled(space), space)
    r = res.devices[0]
    assert r.verdict == "met" and r.accuracy_metric == "agreement" and r.chosen["agreement"] >= 0.9
    assert r.chosen["top1"] is None and r.chosen["drop_pp"] is None
    assert any(x["front_latency"] for x in r.rows)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["devices"][0]["accuracy_metric"] == "agreement"
    cand = json.loads((tmp_path / "run" / "local" / "chosen" / "candidate.json").read_text())
    assert cand["accuracy_metric"] == "agreement"
    doc = sout.result_document(res)
    assert doc["devices"][0]["candidate"]["metrics"]["agreement"] == r.chosen["agreement"]


def test_options_with_model_source_and_data_round_trip(tmp_path):
    opts = options(tmp_path, model_args={"width": 0.5}, weights="w.pt", input_shape=(1, 3, 64, 64),
                   ignore_layers=("aux",), data="d.npz", finetune_data="ft", mean="0.5,0.5,0.5")
    sst.write_run(tmp_path / "r", "r", opts, [device()], targets_for([device()], "latency_p50_ms=1"))
    _, back, _, _ = sst.read_run(tmp_path / "r")
    assert back == opts and back.input_shape == (1, 3, 64, 64) and back.ignore_layers == ("aux",)
    from host.search.data import source_key

    plain = options(tmp_path)
    assert source_key(plain) == {}
    space = resnet_like_space()
    prof = so.Profile(1, "onnx")
    cand = sa.Candidate.of(space, {space.groups[0].name: 8}, "full")
    # the reference path's keys are what they were; any model-source or data option changes them
    assert so.candidate_key(space, plain, prof, cand) != so.candidate_key(space, opts, prof, cand)
    assert so.candidate_key(space, plain, prof, cand) == so.candidate_key(space, options(tmp_path), prof, cand)


def test_grouped_conv_groups_keep_multiples_of_their_slices():
    g = sa.Group("g", 64, None, 4)
    space = sa.ModelSpace("m", "", [g], [sa.Layer("g", sa.LayerConfig("conv", 16, 64), (4, 4), None, "g")])
    assert g.step(1) == 4 and g.step(8) == 8 and sa.Group("h", 48, None, 3).step(8) == 24
    kept = space.kept_for({"g": 0.1}, 1)
    assert kept == {"g": 60}                     # 58 rounded up to a multiple of 4, as edgeprune.prune keeps it
    assert all(k % 4 == 0 for k in space.valid_kept("g", 1, 0.9))
    assert space.layer_ratios(kept, 1) == {"g": pytest.approx(4 / 64)}


def test_sensitivity_on_unlabelled_data_scores_agreement_with_dense():
    import numpy as np

    from edgeprune import data, sensitivity
    from tests.user_models import senet

    model = senet.two_head_net()
    rng = np.random.default_rng(0)
    split = data.Split("calib", (rng.random((6, 32, 32, 3)) * 255).astype(np.uint8), np.full(6, -1, np.int64), "t")
    ref = sensitivity.reference_argmax(model, split)
    assert len(ref) == 2 and sensitivity.agreement(model, split, ref) == 1.0   # both heads are logit-like
    import torch

    first = sensitivity.prune.prunable_groups(model, torch.zeros(1, 3, 32, 32))[0].name
    df = sensitivity.analyse(model, split, torch.zeros(1, 3, 32, 32), ratios=(0.5,), groups=[first],
                             metric="agreement")
    assert df.attrs["metric"] == "agreement" and df.attrs["dense_top1"] == 1.0
    assert 0.0 <= df["top1"].iloc[0] <= 1.0 and df["drop_pp"].iloc[0] == pytest.approx(100 * (1 - df["top1"].iloc[0]))
    with pytest.raises(UsageError, match="metric: 'top1' or 'agreement'"):
        sensitivity.analyse(model, split, torch.zeros(1, 3, 32, 32), metric="f1")


def test_every_registered_algorithm_is_one_module_named_after_it():
    for name, where in sa.ALGORITHMS.items():
        algo = sa.get_algorithm(name)
        assert algo.name == name and where == f"host.search.algos.{name}:{type(algo).__name__}"
        assert isinstance(algo, sa.SearchAlgorithm)
    with pytest.raises(UsageError, match="--algo: unknown algorithm 'sa'; known: bisect, netadapt"):
        sa.get_algorithm("sa")
