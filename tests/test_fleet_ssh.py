"""The fleet commands over real SSH: `edgeprune bench` and `devices check` on loopback sshd devices, leases
taken on the device through the SSH transport."""
from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from host.fleet import runner as host_fleet

from . import sshd
from .test_demo import edgeprune

pytestmark = sshd.needs_sshd()


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    f = sshd.start_fleet(tmp_path_factory.mktemp("sshd2"), 2)
    yield f
    f.stop()


def _fleet_yaml(two, path):
    fast = {"min_iters": 10, "min_duration_s": 0.1, "warmup_s": 0.0, "warmup_iters": 1}
    devs = []
    for i in range(2):
        d = two.device(i, device_id=f"pi-{i}").model_dump(by_alias=True, exclude={"source"}, exclude_none=True)
        d["timing"] = fast
        devs.append(d)
    path.write_text(yaml.safe_dump({"devices": devs}))
    return path


def test_bench_and_check_over_ssh(two, tmp_path):
    fleet_file = _fleet_yaml(two, tmp_path / "fleet.yaml")
    r = edgeprune("devices", "check", "--fleet", str(fleet_file), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert {k: v["health"] for k, v in json.loads(r.stdout).items()} == {"pi-0": "good", "pi-1": "good"}
    r = edgeprune("bench", "--model", "resnet20", "--fleet", str(fleet_file), "--run-id", "ssh-1", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader(io.StringIO((tmp_path / "results/runs/ssh-1/summary.csv").read_text())))
    assert [x["device"] for x in rows] == ["pi-0", "pi-1"]
    assert all(x["status"] == "ok" and float(x["accuracy_top1"]) == pytest.approx(0.923) for x in rows)


def test_lease_over_ssh_blocks_a_second_controller(two, tmp_path):
    fleet_file = _fleet_yaml(two, tmp_path / "fleet.yaml")
    dev = two.device(0, device_id="pi-0")
    transport = host_fleet.transport_for(dev)
    try:
        with host_fleet.Lease(transport, "pi-0", ttl_s=60, label="other-controller"):
            r = edgeprune("bench", "--model", "resnet20", "--fleet", str(fleet_file), "--lease-wait", "1",
                          "--run-id", "ssh-busy", cwd=tmp_path)
            assert r.returncode == 1, r.stdout + r.stderr
            out = " ".join(r.stdout.split())
            assert "DeviceBusy" in out or "leased by" in out
            rows = {x["device"]: x for x in csv.DictReader(io.StringIO(
                (tmp_path / "results/runs/ssh-busy/summary.csv").read_text()))}
            assert rows["pi-0"]["status"] == "error" and "other-controller" in rows["pi-0"]["error"]
            assert rows["pi-1"]["status"] == "ok"  # the other device was not held up
        rc, out, _ = transport.exec_agent(["lease", "show", "--dir", transport.cache_dir()])
        assert rc == 0 and json.loads(out)["held"] is False  # released on leaving the block
    finally:
        transport.close()
