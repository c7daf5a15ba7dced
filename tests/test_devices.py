from __future__ import annotations

import pytest

from edgeprune.errors import ConfigError
from host.fleet import devices


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
    ("id: a\nruntim: {}\n", r"dev.yaml:2: runtim: Extra inputs are not permitted"),
    ("id: a\nruntime: {threads: many}\n", r"dev.yaml:2: runtime.threads: Input should be a valid integer"),
    ("id: 'a;rm -rf /'\n", r"dev.yaml:1: id: String should match pattern"),
    ("runtime: {}\n", r"dev.yaml:1: id: Field required"),
    ("id: a\ntransport: carrier-pigeon\n", r"dev.yaml:2: transport: Input should be 'local' or 'ssh'"),
    ("id: a\ntransport: ssh\n", r"dev.yaml:1: \(top level\): Value error, transport 'ssh' needs an 'ssh' section"),
    ("id: a\ntransport: ssh\nssh: {host: h, user: 'u;rm'}\n", r"dev.yaml:3: ssh.user: String should match pattern"),
    ("id: a\ntransport: ssh\nssh: {host: h, user: u, host_key_policy: yes-please}\n",
     r"dev.yaml:3: ssh.host_key_policy: Input should be 'reject' or 'accept-new'"),
    ("id: [a\n", r"dev.yaml:2: not valid YAML"),
    ("- a\n- b\n", r"dev.yaml:1: a device config must be a YAML mapping"),
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
    with pytest.raises(ConfigError, match="nope.yaml: cannot read"):
        devices.resolve_device(str(tmp_path / "nope.yaml"))


def test_auto_affinity_leaves_cpu0_when_it_can():
    import os

    cpus = sorted(os.sched_getaffinity(0))
    got = devices.auto_affinity(1)
    assert len(got) == 1 and got[0] in cpus
    if len(cpus) > 1:
        assert got == [cpus[-1]]
    assert devices.auto_affinity(64) == cpus


SSH = "ssh: {host: 127.0.0.1, user: bench}\n"


@pytest.mark.parametrize("cls", devices.class_names())
def test_every_shipped_class_gives_a_valid_device(tmp_path, cls):
    p = tmp_path / "d.yaml"
    p.write_text(f"id: d1\nclass: {cls}\n" + ("" if cls == "local" else SSH))
    dev = devices.load_device(p)
    assert dev.device_class == cls and dev.power is not None and dev.precisions


def test_precedence_device_over_class_over_defaults(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("id: pi\nclass: rpi4\n" + SSH + "runtime: {threads: 2}\npower: {max_w: 7.0}\n")
    dev = devices.load_device(p)
    assert dev.runtime.threads == 2 and dev.runtime.name == "onnxruntime"   # device wins; class fills the rest
    assert dev.power.max_w == 7.0 and dev.power.idle_w == 2.7              # nested keys merge one by one
    assert dev.round_to == 4 and dev.python == "/usr/bin/python3"          # from the class
    assert dev.timing.min_iters == 200                                     # built-in default


def test_unknown_class_lists_known(tmp_path):
    p = tmp_path / "d.yaml"
    p.write_text("id: x\n\nclass: toaster\n")
    with pytest.raises(ConfigError, match=r"d.yaml:3: class: unknown device class 'toaster'; known: coral-devboard"):
        devices.load_device(p)


def test_fleet_file_inline_and_include_with_line_numbers(tmp_path):
    (tmp_path / "nano.yaml").write_text("id: nano-1\nclass: jetson-nano\n" + SSH)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("devices:\n  - include: nano.yaml\n  - id: pi-1\n    class: rpi5\n    " + SSH)
    got = devices.load_fleet(fleet)
    assert [d.id for d in got] == ["nano-1", "pi-1"] and got[0].source.endswith("nano.yaml")
    fleet.write_text("devices:\n  - id: pi-1\n    class: rpi5\n    " + SSH + "    round_to: zero\n")
    with pytest.raises(ConfigError, match=r"fleet.yaml:5: round_to: Input should be a valid integer"):
        devices.load_fleet(fleet)


@pytest.mark.parametrize("text,match", [
    ("devices: []\n", "the fleet has no devices"),
    ("hosts: []\n", "needs a 'devices:' list"),
    ("devices:\n  - id: a\n  - id: a\n", "device id 'a' is already used"),
    ("devices:\n  - id: a\nextra: 1\n", r"fleet.yaml:3: extra: unknown field in a fleet file"),
    ("devices:\n  - include: missing.yaml\n", r"missing.yaml: cannot read"),
])
def test_bad_fleet_files(tmp_path, text, match):
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(text)
    with pytest.raises(ConfigError, match=match):
        devices.load_fleet(fleet)


def test_fleet_folder(tmp_path):
    (tmp_path / "a.yaml").write_text("id: a\n")
    (tmp_path / "b.yaml").write_text("id: b\nclass: rpi4\n" + SSH)
    assert [d.id for d in devices.load_fleet(tmp_path)] == ["a", "b"]


# ------------------------------------------------------------------------------------------ search targets

def test_device_targets_load_canonical_and_feed_the_search(tmp_path):
    from host.fleet import targets as tg

    p = tmp_path / "pi.yaml"
    p.write_text("id: pi\npower: {idle_w: 2.0, max_w: 6.0}\ntargets:\n  latency_ms: 0.5x\n  energy_mj: 8\n"
                 "  accuracy_drop_pp: 1.5\n")
    dev = devices.load_device(p)
    assert dev.targets == {"latency_p50_ms": "0.5x", "energy_mj": 8.0, "accuracy_drop_pp": 1.5}
    assert devices.local_device().targets == {}
    # as search.json stores and --resume reads a device
    assert devices.DeviceConfig.model_validate(dev.model_dump(by_alias=True, mode="json")) == \
        dev.model_copy(update={"source": None})
    ts = tg.device_targets([dev], tg.parse_cli([], None))["pi"]     # the lowest layer: nothing else needed
    assert ts.targets["latency_p50_ms"].relative and ts.targets["latency_p50_ms"].value == 0.5
    assert ts.targets["energy_mj"].value == 8.0 and ts.max_accuracy_drop_pp == 1.5
    assert ts.targets["latency_p50_ms"].source == f"{p}: targets.latency_p50_ms"
    ts = tg.device_targets([dev], tg.parse_cli(["latency_p50_ms=0.7x"], None))["pi"]   # the command line wins
    assert ts.targets["latency_p50_ms"].value == 0.7 and ts.targets["energy_mj"].value == 8.0


@pytest.mark.parametrize("text,match", [
    ("id: a\ntargets:\n  latency_p50_ms: 0.5x\n  speed: 3\n",
     r"dev.yaml:4: targets.speed: unknown metric 'speed'; known: latency_p50_ms, latency_p90_ms"),
    ("id: a\ntargets:\n  latency_p50_ms: fast\n",
     r"dev.yaml:3: targets.latency_p50_ms: expected a number or a multiple of dense like 0.5x, got 'fast'"),
    ("id: a\ntargets: {latency_ms: 2xx}\n",
     r"dev.yaml:2: targets.latency_ms: latency_p50_ms: expected a number or a multiple of dense like 0.5x"),
    ("id: a\ntargets:\n  energy_mj: 8\n  memory_mb: -3\n", r"dev.yaml:4: targets.memory_mb: must be > 0, got -3"),
    ("id: a\ntargets:\n  memory_mb:\n", r"dev.yaml:3: targets.memory_mb: expected a number .* got None"),
    ("id: a\ntargets:\n  accuracy_drop_pp: 0.5x\n",
     r"dev.yaml:3: targets.accuracy_drop_pp: is a drop in percentage points against dense"),
    ("id: a\ntargets:\n  accuracy_drop_pp: 120\n", r"dev.yaml:3: targets.accuracy_drop_pp: must be in \[0, 100\)"),
    ("id: a\ntargets:\n  latency_ms: 1\n  latency_p50_ms: 2\n",
     r"dev.yaml:4: targets.latency_p50_ms: given twice with different values \(as latency_ms and latency_p50_ms\)"),
    ("id: a\ntargets: [latency_p50_ms]\n", r"dev.yaml:2: targets: Input should be a valid dictionary"),
])
def test_bad_targets_name_file_line_and_field(tmp_path, text, match):
    p = tmp_path / "dev.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        devices.load_device(p)


def test_class_targets_merge_per_metric_under_the_device(tmp_path):
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "board.yaml").write_text("targets: {latency_ms: 0.5x, memory_mb: 100, accuracy_drop_pp: 1}\n"
                                        "round_to: 8\n")
    (classes / "broken.yaml").write_text("targets: {latency_p50_ms: soon}\n")

    def load(text, name="d.yaml"):
        p = tmp_path / name
        p.write_text(text)
        data, node = devices._parse_yaml(p)
        return devices.device_from_mapping(data, p, node, classes_dir=classes)

    dev = load("id: b\nclass: board\ntargets:\n  latency_p50_ms: 0.6x\n  energy_mj: 3\n")
    # the device's p50 replaces the class's (written with an alias); the class fills in the rest
    assert dev.targets == {"latency_p50_ms": "0.6x", "memory_mb": 100.0, "accuracy_drop_pp": 1.0, "energy_mj": 3.0}
    assert dev.round_to == 8
    assert load("id: b\nclass: board\n").targets == {"latency_p50_ms": "0.5x", "memory_mb": 100.0,
                                                     "accuracy_drop_pp": 1.0}
    with pytest.raises(ConfigError, match=r"d.yaml:1: targets.latency_p50_ms: expected a number .* \(from class "
                                          r"'broken'\)"):
        load("id: b\nclass: broken\n")
    assert load("id: b\nclass: broken\ntargets: {latency_ms: 2}\n").targets == {"latency_p50_ms": 2.0}


def test_a_fleet_file_of_one_device_needs_no_devices_list(tmp_path):
    one = tmp_path / "pi.yaml"
    one.write_text("id: pi-1\nclass: rpi5\n" + SSH)
    got = devices.load_fleet(one)
    assert [d.id for d in got] == ["pi-1"] and got[0].source == str(one) and got[0].runtime.threads == 4
    assert devices.resolve_device(str(one)).id == "pi-1"      # demo --device takes it too
    two = tmp_path / "two.yaml"
    two.write_text("devices:\n  - id: a\n  - id: b\n")
    with pytest.raises(ConfigError, match=r"two.yaml: --device takes one device; this fleet has 2 \(a, b\)"):
        devices.resolve_device(str(two))
    assert devices.resolve_device(str(tmp_path / "two.yaml").replace("two", "pi")).id == "pi-1"


@pytest.mark.parametrize("cls,runtime,expect_threads", [("local", "openvino", 1), ("rpi4", "tflite", 4),
                                                        ("ncs2", "onnxruntime", 0)])
def test_another_runtime_than_the_class_starts_from_its_own_defaults(tmp_path, cls, runtime, expect_threads):
    """The class's runtime options belong to the class's runtime (onnxruntime's providers, OpenVINO's device):
    a device that names another runtime does not inherit them; the board's thread count stays."""
    p = tmp_path / "d.yaml"
    p.write_text(f"id: d\nclass: {cls}\nruntime: {{name: {runtime}}}\n" + ("" if cls == "local" else SSH))
    dev = devices.load_device(p)
    assert dev.runtime.name == runtime and dev.runtime.options == {} and dev.runtime.threads == expect_threads
    p.write_text(f"id: d\nclass: {cls}\nruntime: {{name: {runtime}, options: {{x: 1}}}}\n" +
                 ("" if cls == "local" else SSH))
    assert devices.load_device(p).runtime.options == {"x": 1}
    # the same runtime as the class: options merge key by key, as before
    p.write_text("id: d\nclass: local\nruntime: {name: onnxruntime, options: {intra_op_spinning: false}}\n")
    assert devices.load_device(p).runtime.options == {"providers": ["CPUExecutionProvider"],
                                                      "intra_op_spinning": False}
