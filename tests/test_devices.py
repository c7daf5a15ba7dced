from __future__ import annotations

import pytest

from edgeprune.errors import ConfigError
from host import devices


def test_local_default_needs_no_file():
    dev = devices.resolve_device(None)
    assert dev.id == "local" and dev.transport == "local" and dev.power.sensor == "model"
    assert devices.resolve_device("local") == dev


def test_shipped_local_yaml_matches_builtin_default():
    shipped = devices.load_device("device_configs/local.yaml")
    assert shipped.model_dump(exclude={"source"}) == devices.local_device().model_dump(exclude={"source"})


def test_yaml_overrides(tmp_path):
    p = tmp_path / "dev.yaml"
    p.write_text("id: bench-01\nruntime: {threads: 2}\ntiming: {cpu_affinity: [0, 1], min_iters: 50}\n")
    dev = devices.load_device(p)
    assert dev.id == "bench-01" and dev.runtime.threads == 2 and dev.timing.cpu_affinity == [0, 1]
    assert dev.timing.min_iters == 50 and dev.timing.min_duration_s == 3.0 and dev.source == str(p)


@pytest.mark.parametrize("text,match", [
    ("id: a\nruntim: {}\n", r"dev.yaml: runtim: Extra inputs are not permitted"),
    ("id: a\nruntime: {threads: many}\n", r"dev.yaml: runtime.threads: Input should be a valid integer"),
    ("id: 'a;rm -rf /'\n", r"dev.yaml: id: String should match pattern"),
    ("runtime: {}\n", r"dev.yaml: id: Field required"),
    ("id: a\ntransport: carrier-pigeon\n", r"dev.yaml: transport: Input should be 'local' or 'ssh'"),
    ("id: a\ntransport: ssh\n", r"dev.yaml: \(top level\): Value error, transport 'ssh' needs an 'ssh' section"),
    ("id: a\ntransport: ssh\nssh: {host: h, user: 'u;rm'}\n", r"dev.yaml: ssh.user: String should match pattern"),
    ("id: a\ntransport: ssh\nssh: {host: h, user: u, host_key_policy: yes-please}\n",
     r"dev.yaml: ssh.host_key_policy: Input should be 'reject' or 'accept-new'"),
    ("id: [a\n", r"dev.yaml:2: not valid YAML"),
    ("- a\n- b\n", r"dev.yaml: a device config must be a YAML mapping"),
])
def test_bad_device_files_name_file_and_field(tmp_path, text, match):
    p = tmp_path / "dev.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        devices.load_device(p)


def test_ssh_device(tmp_path):
    p = tmp_path / "pi.yaml"
    p.write_text("id: pi5-lab-01\ntransport: ssh\nssh: {host: 10.0.0.21, user: bench, key: ~/.ssh/id_ed25519}\n")
    dev = devices.load_device(p)
    assert dev.ssh.port == 22 and dev.ssh.host_key_policy == "reject" and dev.ssh.known_hosts == "~/.ssh/known_hosts"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: cannot read device config"):
        devices.resolve_device(str(tmp_path / "nope.yaml"))


def test_auto_affinity_leaves_cpu0_when_it_can():
    import os

    cpus = sorted(os.sched_getaffinity(0))
    got = devices.auto_affinity(1)
    assert len(got) == 1 and got[0] in cpus
    if len(cpus) > 1:
        assert got == [cpus[-1]]
    assert devices.auto_affinity(64) == cpus
