"""`edgeprune search` over real SSH (loopback sshd, tests/sshd.py): two devices with their own channel alignment and
their own targets, both from their device config files, in one search. Each must meet its own target with its own
artifact, measured through its own SSH connection and device cache."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from agent import schema
from host.fleet import devices
from host.search import options as so
from host.search import run as hs
from host.search import algos as sa
from host.fleet import targets as tg

from . import sshd

pytestmark = sshd.needs_sshd()

# device id -> (sshd index, round_to, p50 latency target as a multiple of the device's own dense model). The dense
# model meets neither, so both devices must prune, each with its own alignment. Margins are set for a loaded 2-core
# VM, where one configuration's p50 moves by 10-30 % from one 1-second window to the next:
# - 8-aligned: ResNet-20's 8/24/40 and 8/16/32 measured 0.61-0.81x dense; anything faster is 8/8/16 or narrower,
#   which loses about 60 pp of top-1 with this tiny recovery (a 0.6x target came out infeasible on accuracy, and
#   0.75x failed once under a concurrent training job);
# - 4-aligned: widths that are multiples of 4 but not of 8 are erratic on x86 (bench/RESULTS.md): 12/28/52
#   measured 0.74-1.3x dense, 8/20/36 0.77-0.82x. Its target is the looser one.
# The 8-aligned device ends on 8/24/40, 8/16/32 or 16/24/x, the 4-aligned one on 12/x/y, 16/28/x or 8/20/36:
# different channels, so different artifacts.
DEVICES = {"pi-a": (0, 4, 0.9), "pi-b": (1, 8, 0.8)}
MAX_DROP_PP = 60.0     # tiny recovery (BN recalibration, 100 images fine-tune): accuracy is not what is tested


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    f = sshd.start_fleet(tmp_path_factory.mktemp("sshd-search"), 2)
    yield f
    f.stop()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_two_ssh_devices_with_their_own_targets_and_alignments_in_one_search(two, tmp_path):
    """Two loopback SSH devices with different targets and alignments in one search: each meets its own target
    with its own artifact."""
    fleet_dir = tmp_path / "fleet"
    fleet_dir.mkdir()
    for dev_id, (i, align, lat) in DEVICES.items():
        d = two.device(i, device_id=dev_id).model_dump(by_alias=True, exclude={"source"}, exclude_none=True)
        d.update(round_to=align, targets={"latency_ms": f"{lat}x", "accuracy_drop_pp": MAX_DROP_PP})
        (fleet_dir / f"{dev_id}.yaml").write_text(yaml.safe_dump(d))
    devs = devices.load_fleet(fleet_dir)
    assert [(d.id, d.transport, d.round_to) for d in devs] == [(k, "ssh", v[1]) for k, v in DEVICES.items()]
    tset = tg.device_targets(devs, tg.parse_cli([], None))      # the device configs' targets alone
    assert {k: (t.targets["latency_p50_ms"].value, t.max_accuracy_drop_pp) for k, t in tset.items()} == \
        {k: (v[2], MAX_DROP_PP) for k, v in DEVICES.items()}

    opts = so.SearchOptions(model="resnet20", algo="bisect", max_evals=8, quick=True, eval_per_class=20,
                            cache_dir=str(tmp_path / "cache"),
                            recovery=so.RecoveryOptions(finetune_per_class=10, batch_size=50),
                            algo_options=sa.AlgoOptions(allocation="uniform"))
    out = tmp_path / "out"
    res = hs.start(opts, devs, tset, out=out, run_id="ssh-two")
    results = {r.device_id: r for r in res.devices}
    assert set(results) == set(DEVICES)
    for dev_id, r in results.items():
        assert r.verdict == "met", (dev_id, r.reason, r.bounds,
                                    [(x["ratio"], x["macs"], x["latency_p50_ms"], x["drop_pp"]) for x in r.rows])
    assert res.all_met

    records = [json.loads(x) for x in (out / so.EVALUATIONS).read_text().splitlines()]
    # the final measurement over SSH: each pick 4 more times, round by round across the two devices
    finals = [(x["device"], x["rep"]) for x in records if x["kind"] == "final"]
    assert finals == [(d, rep) for rep in range(2, 6) for d in DEVICES], finals
    assert all(r.final["repetitions"] == 5 and "error" not in r.final for r in results.values())
    artifacts, kept_by = {}, {}
    for dev_id, (_, align, lat) in DEVICES.items():
        r = results[dev_id]
        mine = [x for x in records if x["kind"] == "device" and x["device"] == dev_id]
        assert len(mine) == r.device_evals >= 2 and all(x["report"]["status"] == "ok" for x in mine)
        dense = [x for x in mine if not x["candidate"]["kept"]]
        assert len(dense) == 1
        bound = lat * dense[0]["metrics"]["latency_p50_ms"]           # its own dense model, on itself
        assert r.bounds["limits"]["latency_p50_ms"] == pytest.approx(bound)

        chosen = out / dev_id / "chosen"
        cand = json.loads((chosen / "candidate.json").read_text())
        manifests = list(chosen.glob("*.manifest.json"))
        assert len(manifests) == 1
        man = json.loads(manifests[0].read_text())
        artifact = chosen / man["file"]
        assert artifact.is_file() and _sha256(artifact) == man["sha256"] == cand["artifact_sha256"]
        artifacts[dev_id] = man["sha256"]
        kept_by[dev_id] = cand["candidate"]["kept"]
        # measured on that device: the artifact went into its own cache, over its own SSH connection
        dev = next(d for d in devs if d.id == dev_id)
        assert (Path(dev.ssh.cache_dir) / man["sha256"]).is_file()

        # pruned with this device's alignment: the candidate and the pruning plan that built the artifact
        kept = cand["candidate"]["kept"]
        assert cand["round_to"] == align and kept and all(k % align == 0 for k in kept.values()), kept
        plan = json.loads((chosen / "plan.json").read_text())
        assert plan["round_to"] == align and man["pruning_plan_sha256"] == cand["plan_sha256"]
        assert all(len(layer["keep"]) % align == 0 for layer in plan["layers"]), plan["layers"]

        rep = schema.loads_report((chosen / "report.json").read_text())
        assert rep.status == "ok" and rep.accuracy.n == 200
        assert rep.timing.latency_ms.median == pytest.approx(r.chosen["latency_p50_ms"])
        # judged against its own dense model measured right after it (relative target: drift does not count)
        beside = next(x for x in records if x["kind"] == "paired" and x["device"] == dev_id
                      and x["key"] == cand["key"])
        assert r.chosen["dense_p50_beside_ms"] == beside["metrics"]["latency_p50_ms"]
        assert rep.timing.latency_ms.median <= lat * beside["metrics"]["latency_p50_ms"]
        assert 100.0 * (dense[0]["metrics"]["top1"] - rep.accuracy.top1) <= MAX_DROP_PP
    # each built for its device (own alignment, own plan, checked above); the bytes are the same exactly when the
    # two searches settled on the same channels (on a fast CPU 0.9x and 0.8x can land on one configuration)
    assert (artifacts["pi-a"] == artifacts["pi-b"]) == (kept_by["pi-a"] == kept_by["pi-b"])
    assert {x["device"] for x in records if x["kind"] == "device"} == set(DEVICES)
