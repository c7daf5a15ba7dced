"""Power sensors: the CPU-utilisation model, and RAPL against a fake sysfs tree built in tmp_path."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from agent import SensorError, power
from agent.power import energy_mj_per_inference, to_result
from agent.power.model import ModelSensor
from agent.power.rapl import RaplSensor
from agent.schema import PowerSpec


class Clock:
    def __init__(self) -> None:
        self.now = 5_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


def test_model_sensor_requires_idle_and_max_watts() -> None:
    with pytest.raises(SensorError, match=r"^power\.idle_w and power\.max_w are required for the model sensor$"):
        power.discover(PowerSpec(sensor="model", idle_w=None, max_w=10.0))
    with pytest.raises(SensorError, match="max_w must be >= power.idle_w"):
        power.discover(PowerSpec(sensor="model", idle_w=10.0, max_w=5.0))


def test_unknown_sensor_lists_known_ones() -> None:
    with pytest.raises(SensorError, match=r"unknown power sensor 'joulescope' \(this agent knows: command, ina3221, "
                                          r"model, nvml, rapl, rpi5, tegrastats\)"):
        power.discover(PowerSpec(sensor="joulescope"))


def test_model_sensor_formula_label_and_energy() -> None:
    clock, cpu = Clock(), [10.0]
    sensor = ModelSensor(idle_w=2.0, max_w=10.0, sample_hz=20.0, clock=clock, cpu_time=lambda: cpu[0], n_cpus=2)
    sensor.start(background=False)
    for _ in range(4):  # 1 s of wall time, 0.5 s of CPU time on 2 allowed CPUs: u = 0.25
        clock.advance(0.25)
        cpu[0] += 0.125
        sensor.sample()
    w = sensor.stop()
    assert (w.source, w.modelled, w.samples) == ("model", True, 6)
    assert w.mean_w == pytest.approx(2.0 + 8.0 * 0.25)
    assert w.details["idle_w"] == 2.0 and w.details["max_w"] == 10.0 and w.details["utilisation"] == 0.25
    assert "configuration values, not measurements" in w.details["note"]
    assert "idle_w + (max_w - idle_w) * u" in w.details["formula"]
    result = to_result(w, duration_s=1.0, iterations=100, batch_size=2)
    assert result.energy_mj_per_inference == pytest.approx(4.0 * 1.0 * 1000 / 200)
    assert result.source == "model" and result.modelled is True


def test_model_sensor_clamps_utilisation() -> None:
    clock, cpu = Clock(), [0.0]
    sensor = ModelSensor(idle_w=1.0, max_w=3.0, sample_hz=20.0, clock=clock, cpu_time=lambda: cpu[0], n_cpus=1)
    sensor.start(background=False)
    clock.advance(1.0)
    cpu[0] = 4.0  # more CPU than wall time on one CPU (threads outside the allowed set): clamp to 1
    assert sensor.stop().mean_w == 3.0
    assert sensor.watts(-0.5) == 1.0


def test_sampler_overhead_is_the_time_spent_reading() -> None:
    clock = Clock()

    def slow_read() -> float:
        clock.advance(0.001)
        return 0.0

    sensor = ModelSensor(idle_w=1.0, max_w=3.0, sample_hz=20.0, clock=clock, cpu_time=slow_read, n_cpus=1)
    sensor.start(background=False)
    clock.advance(0.999)
    w = sensor.stop()  # window: 1 s between the two readings' ends; 2 ms spent reading
    assert w.window_s == pytest.approx(1.0) and w.overhead_pct == pytest.approx(0.2)


def test_model_sensor_samples_in_the_background_while_busy() -> None:
    sensor = power.discover(PowerSpec(sensor="model", sample_hz=200.0, idle_w=2.0, max_w=10.0))
    assert isinstance(sensor, ModelSensor)
    sensor.start()
    end = time.perf_counter() + 0.2
    while time.perf_counter() < end:
        pass
    w = sensor.stop()
    assert w.samples >= 10 and 0.15 <= w.window_s < 1.0
    assert 2.0 < w.mean_w <= 10.0 and 0.0 < w.overhead_pct < 50.0


def test_sampling_failure_surfaces_at_stop() -> None:
    calls = []

    def flaky() -> float:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("sensor unplugged")
        return 0.0

    sensor = ModelSensor(idle_w=1.0, max_w=3.0, sample_hz=500.0, cpu_time=flaky, n_cpus=1)
    sensor.start()
    give_up = time.monotonic() + 10.0
    while len(calls) < 2 and time.monotonic() < give_up:  # until the background thread has tried a reading
        time.sleep(0.005)
    with pytest.raises(SensorError, match="failed while sampling: sensor unplugged"):
        sensor.stop()


def test_energy_per_inference_formula() -> None:
    assert energy_mj_per_inference(5.0, 2.0, 1000) == pytest.approx(10.0)
    assert energy_mj_per_inference(5.0, 2.0, 0) == 0.0


# ------------------------------------------------------------------------------------------ fake RAPL sysfs
def rapl_domain(sys_root: Path, name: str, label: str, energy: int, top: int = 262143328850) -> Path:
    d = sys_root / "class" / "powercap" / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text("%d\n" % energy)
    (d / "max_energy_range_uj").write_text("%d\n" % top)
    return d / "energy_uj"


@pytest.fixture
def fake_rapl(tmp_path: Path) -> Iterator[Dict[str, Path]]:
    sys_root = tmp_path / "sys"
    files = {
        "package-0": rapl_domain(sys_root, "intel-rapl:0", "package-0", 999_000, top=1_000_000),
        "package-1": rapl_domain(sys_root, "intel-rapl:1", "package-1", 5_000_000),
        "core": rapl_domain(sys_root, "intel-rapl:0:0", "core", 0),       # subdomain of package-0: not summed
        "psys": rapl_domain(sys_root, "intel-rapl:2", "psys", 0),         # platform: overlaps the packages
    }
    yield files


def test_rapl_discovers_package_domains_only(fake_rapl: Dict[str, Path], tmp_path: Path) -> None:
    sensor = power.discover(PowerSpec(sensor="rapl"), str(tmp_path / "sys"))
    assert isinstance(sensor, RaplSensor)
    assert [name for name, _, _ in sensor.domains] == ["package-0", "package-1"]
    assert power.available_sensors(str(tmp_path / "sys")) == ["rapl"]


def test_rapl_energy_delta_with_wraparound(fake_rapl: Dict[str, Path], tmp_path: Path) -> None:
    clock = Clock()
    found = RaplSensor.discover(PowerSpec(sensor="rapl", sample_hz=10.0), str(tmp_path / "sys"))
    assert found is not None
    sensor = RaplSensor(found.domains, sample_hz=10.0, clock=clock)  # type: ignore[attr-defined]
    sensor.start(background=False)
    steps: List[tuple] = [(500, 5_400_000), (2_500, 5_900_000)]  # package-0 wraps past 1_000_000 in step 1
    for p0, p1 in steps:
        fake_rapl["package-0"].write_text("%d\n" % p0)
        fake_rapl["package-1"].write_text("%d\n" % p1)
        fake_rapl["core"].write_text("123456789\n")
        fake_rapl["psys"].write_text("987654321\n")
        clock.advance(1.0)
        sensor.sample()
    w = sensor.stop()
    # package-0: (1_000_000 - 999_000 + 500) + 2_000 = 3_500 uJ; package-1: 900_000 uJ; over 2 s
    assert w.details["energy_j"] == pytest.approx(0.9035)
    assert w.details["wraps"] == 1
    assert w.mean_w == pytest.approx(0.9035 / 2.0)
    assert (w.source, w.modelled) == ("rapl", False)


def test_rapl_missing_means_none(tmp_path: Path) -> None:
    assert power.discover(PowerSpec(sensor="rapl"), str(tmp_path / "nothing")) is None
    d = tmp_path / "sys" / "class" / "powercap" / "intel-rapl:0"
    d.mkdir(parents=True)
    (d / "name").write_text("package-0\n")  # no energy_uj: not usable
    assert power.discover(PowerSpec(sensor="rapl"), str(tmp_path / "sys")) is None
    assert power.available_sensors(str(tmp_path / "sys")) == []
