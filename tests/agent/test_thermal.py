"""Thermal sources and the monitor: parsers on captured vcgencmd output, thermal zones and trip points on fake
sysfs trees built from captured listings (tests/agent/data, sources in its README), the Coral apex layout,
wait-to-cool against a zone a thread cools down, throttling rules, the schema section, and the runner end to end."""
from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest

from agent import thermal
from agent.runner import run_job
from agent.schema import Report, SchemaError, ThermalSpec, loads_job
from agent.thermal import (ThermalMonitor, ThermalSample, Trip, decode_throttled, describe_throttled,
                           parse_get_throttled, parse_measure_temp, throttle_reasons, zone_trips)

DATA = Path(__file__).parent / "data"
MakeJob = Callable[..., Path]


def thermal_warnings(warnings: List[str]) -> List[str]:
    """The warnings thermal code adds (timing's drift warning also says "thermal", as a guess)."""
    return [w for w in warnings if w.startswith(("thermal", "under-voltage"))]


def text(name: str) -> str:
    return (DATA / name).read_text()


def write(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return path


def no_commands(argv: Sequence[str], timeout_s: float) -> Optional[str]:
    return None  # as on a machine without vcgencmd


# --------------------------------------------------------------------------------------------- vcgencmd
def test_measure_temp_on_captures() -> None:
    temps = [parse_measure_temp(line) for line in text("vcgencmd_pi5_rpi_eeprom518.txt").splitlines()]
    assert [t for t in temps if t is not None] == [76.8, 77.4, 82.9]
    assert parse_measure_temp(text("vcgencmd_rpi3_firmware615_a.txt")) == 39.2
    assert parse_measure_temp("frequency(0)=2000005120") is None


def test_get_throttled_on_captures() -> None:
    assert parse_get_throttled(text("vcgencmd_rpi3_firmware615_a.txt")) == 0x50000
    assert parse_get_throttled(text("vcgencmd_rpi3_firmware615_b.txt")) == 0x50005
    assert parse_get_throttled(text("vcgencmd_rpi3bplus_linux2367.txt")) == 0x80008
    assert parse_get_throttled(text("vcgencmd_rpi3b_get_throttled2.txt")) == 0x0
    assert parse_get_throttled("temp=38.6'C") is None


def test_throttle_bits_decoded_as_documented() -> None:
    assert {k for k, v in decode_throttled(0x50005).items() if v} == {
        "under_voltage", "currently_throttled", "under_voltage_occurred", "throttling_occurred"}
    assert {k for k, v in decode_throttled(0x80008).items() if v} == {"soft_temp_limit", "soft_temp_limit_occurred"}
    assert {k for k, v in decode_throttled(0x50000).items() if v} == {"under_voltage_occurred", "throttling_occurred"}
    assert not any(decode_throttled(0x0).values()) and len(decode_throttled(0)) == 8
    assert describe_throttled(0x2 | 0x20000) == ["arm frequency capped", "arm frequency capping has occurred"]


def scripted_vcgencmd(temps: List[str], throttled: List[str]) -> Callable[[Sequence[str], float], Optional[str]]:
    """A fake ``vcgencmd`` answering from captured lines, one per call (the last one repeats)."""
    queues = {"measure_temp": list(temps), "get_throttled": list(throttled)}

    def run(argv: Sequence[str], timeout_s: float) -> Optional[str]:
        assert argv[0] == "vcgencmd" and timeout_s > 0
        q = queues[argv[1]]
        return (q.pop(0) if len(q) > 1 else q[0]) + "\n"
    return run


def test_vcgencmd_source_flags_throttling_that_starts_during_the_job(tmp_path: Path) -> None:
    a, b = text("vcgencmd_rpi3_firmware615_a.txt").splitlines(), text("vcgencmd_rpi3_firmware615_b.txt").splitlines()
    run = scripted_vcgencmd([a[0], a[2], b[0], b[2]], [a[1], a[1], a[1], b[1]])  # 0x50000 ... then 0x50005
    monitor = thermal.discover(str(tmp_path), ThermalSpec(), run=run)
    assert monitor is not None and monitor.source == "vcgencmd:vcgencmd"
    assert monitor.sample("start") == 38.6
    monitor.sample("window_start")
    monitor.sample("end")
    result, warnings = monitor.result()
    assert (result.start_c, result.end_c, result.max_c, result.throttled) == (38.6, 38.6, 38.6, True)
    assert result.details["throttle_reasons"] == ["vcgencmd: currently throttled"]
    assert result.details["throttle_bits"]["vcgencmd"]["first"] == "0x50000"
    assert result.details["throttle_bits"]["vcgencmd"]["decoded_last"]["currently_throttled"] is True
    assert any(w.startswith("under-voltage reported by vcgencmd") for w in warnings)
    assert any(w.startswith("thermal throttling detected (vcgencmd: currently throttled)") for w in warnings)


def test_vcgencmd_sticky_bits_from_before_the_job_are_not_this_jobs_throttling(tmp_path: Path) -> None:
    a = text("vcgencmd_rpi3_firmware615_a.txt").splitlines()
    monitor = thermal.discover(str(tmp_path), ThermalSpec(), run=scripted_vcgencmd([a[0]], [a[1]]))
    assert monitor is not None
    monitor.sample("start")
    monitor.sample("end")
    result, warnings = monitor.result()
    assert result.throttled is False and warnings == [] and result.start_c == 39.2


def test_soft_temperature_limit_counts_as_throttling(tmp_path: Path) -> None:
    capped = text("vcgencmd_rpi3bplus_linux2367.txt").strip()
    monitor = thermal.discover(str(tmp_path), None, run=scripted_vcgencmd(["temp=82.9'C"], [capped]))
    assert monitor is not None
    monitor.sample("start")
    result, _ = monitor.result()
    assert result.details["throttle_reasons"] == ["vcgencmd: soft temperature limit active"]


# ------------------------------------------------------------------------------------------ thermal zones
def tree_from_grep(lines: str, root: Path) -> None:
    """Recreate files from ``grep . /sys/...:value`` lines under ``root``."""
    for line in lines.splitlines():
        path, _, value = line.partition(":")
        write(root / path.lstrip("/"), value)


def pi5_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    tree_from_grep(text("thermal_zone_pi5_linux5921.txt"), root)
    return root


def test_pi5_zone_from_the_capture(tmp_path: Path) -> None:
    root = pi5_root(tmp_path)
    monitor = thermal.discover(str(root), ThermalSpec(), run=no_commands)
    assert monitor is not None and monitor.sensors() == ["thermal_zone0"]  # the capture has no type line
    assert monitor.source == "thermal_zone:thermal_zone0" and monitor.trips() == {}
    assert monitor.sample("start") == 47.4
    result, warnings = monitor.result()
    assert (result.start_c, result.end_c, result.max_c, result.throttled, warnings) == (47.4, 47.4, 47.4, False, [])


def thermald_root(tmp_path: Path) -> Path:
    """Zones and trip points as thermald read them (captured); their temperatures are test values."""
    root = tmp_path / "root"
    zones = {}
    for line in text("thermald_debug_trip_points.txt").splitlines():
        m = re.search(r"Thermal Zone (\d+):(\S+)$", line)
        if m:
            zones[m.group(1)] = m.group(2)
            write(root / ("sys/class/thermal/thermal_zone%s/type" % m.group(1)), m.group(2))
        m = re.search(r"read_trip_points (\d+)/(trip_point_\d+_\w+):(\S+)$", line)
        if m:
            write(root / ("sys/class/thermal/thermal_zone%s/%s" % (m.group(1), m.group(2))), m.group(3))
    assert zones == {"0": "acpitz", "9": "B0D4", "10": "x86_pkg_temp"}
    for n, temp in (("0", "45000"), ("9", "52050"), ("10", "55000")):  # test values
        write(root / ("sys/class/thermal/thermal_zone%s/temp" % n), temp)
    return root


def test_trip_points_from_the_thermald_capture(tmp_path: Path) -> None:
    zones = thermald_root(tmp_path) / "sys/class/thermal"
    assert zone_trips(zones / "thermal_zone0") == [Trip("trip_point_0", "critical", 107.0)]
    assert zone_trips(zones / "thermal_zone9") == [Trip("trip_point_0", "critical", 115.05),
                                                   Trip("trip_point_1", "hot", 106.05)]
    assert zone_trips(zones / "thermal_zone10") == []  # passive trips at 0 m°C are disabled


def test_zone_over_a_trip_point_is_throttling(tmp_path: Path) -> None:
    root = thermald_root(tmp_path)
    monitor = thermal.discover(str(root), ThermalSpec(), run=no_commands)
    assert monitor is not None and monitor.primary == "x86_pkg_temp"  # the preferred CPU package zone
    assert monitor.sensors() == ["acpitz", "B0D4", "x86_pkg_temp"]   # in zone order 0, 9, 10
    monitor.sample("start")
    result, warnings = monitor.result()
    assert result.throttled is False and result.start_c == 55.0
    write(root / "sys/class/thermal/thermal_zone9/temp", "106050")  # test value: exactly at the hot trip
    monitor.sample("end")
    result, warnings = monitor.result()
    assert result.throttled is True
    assert result.details["throttle_reasons"] == [
        "B0D4 reached 106.05 °C, at or over its hot trip point trip_point_1 (106.05 °C)"]
    assert result.details["sensors"]["B0D4"] == {"start_c": 52.05, "end_c": 106.05, "max_c": 106.05}
    assert result.details["trip_points_c"]["acpitz"] == {"trip_point_0": {"type": "critical", "temp_c": 107.0}}
    assert len(warnings) == 1 and "thermal throttling detected" in warnings[0]


def nano_root(tmp_path: Path) -> Path:
    """Zone types from the captured Nano 2GB listing; temperatures are test values."""
    root = tmp_path / "root"
    for line in text("thermal_zone_types_nano2gb.txt").splitlines():
        path, _, kind = line.partition(": ")
        write(root / path.lstrip("/") / "type", kind)
        write(root / path.lstrip("/") / "temp", "40500")
    return root


@pytest.mark.parametrize("zone, primary", [(None, "CPU-therm"), ("GPU-therm", "GPU-therm"),
                                           ("thermal_zone3", "PLL-therm")])
def test_primary_zone_default_and_chosen(tmp_path: Path, zone: Optional[str], primary: str) -> None:
    monitor = thermal.discover(str(nano_root(tmp_path)), ThermalSpec(zone=zone), run=no_commands)
    assert monitor is not None and monitor.primary == primary and monitor.warnings == []
    assert monitor.sensors() == ["AO-therm", "CPU-therm", "GPU-therm", "PLL-therm", "PMIC-Die", "thermal-fan-est"]


def test_unknown_zone_falls_back_with_a_warning(tmp_path: Path) -> None:
    monitor = thermal.discover(str(nano_root(tmp_path)), ThermalSpec(zone="tj-thermal"), run=no_commands)
    assert monitor is not None and monitor.primary == "CPU-therm"
    assert monitor.warnings == ["thermal.zone 'tj-thermal' not found on this device (it has: AO-therm, CPU-therm, "
                                "GPU-therm, PLL-therm, PMIC-Die, thermal-fan-est); reporting CPU-therm instead"]


def test_switched_off_or_unreadable_zones_are_absent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(root / "sys/class/thermal/thermal_zone0/temp", "-256000")  # switched off (test value)
    write(root / "sys/class/thermal/thermal_zone1/type", "gpu-thermal")
    (root / "sys/class/thermal/thermal_zone1").mkdir(exist_ok=True)  # no temp file
    assert thermal.discover(str(root), None, run=no_commands) is None


def test_nothing_found_is_none_and_one_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="agent.thermal"):
        assert thermal.discover(str(tmp_path), ThermalSpec(), run=no_commands) is None
    assert len(caplog.records) == 1 and caplog.records[0].message.startswith("no thermal source found")


# ------------------------------------------------------------------------------------------- Coral apex
def test_coral_apex_documented_layout(tmp_path: Path) -> None:
    apex = tmp_path / "root/sys/class/apex/apex_0"  # layout from coral.ai/docs/pcie-parameters; test values
    for name, value in (("temp", "60000"), ("trip_point0_temp", "85000"), ("trip_point1_temp", "90000"),
                        ("trip_point2_temp", "95000"), ("hw_temp_warn1", "100000"), ("hw_temp_warn2", "0")):
        write(apex / name, value)
    monitor = thermal.discover(str(tmp_path / "root"), ThermalSpec(), run=no_commands)
    assert monitor is not None and monitor.source == "apex:apex_0"
    assert [(t.name, t.type, t.temp_c) for t in monitor.trips()["apex_0"]] == [
        ("trip_point0", "passive", 85.0), ("trip_point1", "passive", 90.0), ("trip_point2", "passive", 95.0),
        ("hw_temp_warn1", "critical", 100.0)]  # a warning at 0 is disabled
    monitor.sample("start")
    write(apex / "temp", "91000")
    monitor.sample("end")
    result, _ = monitor.result()
    assert (result.start_c, result.max_c, result.throttled) == (60.0, 91.0, True)
    assert result.details["throttle_reasons"] == [
        "apex_0 reached 91 °C, at or over its passive trip point trip_point0 (85 °C)"]


# ------------------------------------------------------------------------------------------ wait to cool
def test_wait_to_cool_until_a_thread_cools_the_zone(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    temp = write(root / "sys/class/thermal/thermal_zone0/temp", "60000")
    monitor = thermal.discover(str(root), ThermalSpec(), run=no_commands)
    assert monitor is not None

    def cool() -> None:
        time.sleep(0.15)
        temp.write_text("40000\n")

    t = threading.Thread(target=cool)
    t.start()
    waited = monitor.wait_to_cool(50.0, timeout_s=10.0, poll_s=0.01)
    t.join()
    assert waited["reached"] is True and (waited["start_c"], waited["end_c"]) == (60.0, 40.0)
    assert 0.1 <= waited["waited_s"] < 5.0
    assert all(s.mark == "wait" for s in monitor.samples) and len(monitor.samples) >= 3
    result, _ = monitor.result()
    assert result.details["wait_to_cool"]["reached"] is True


def test_wait_to_cool_gives_up_at_its_timeout(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write(root / "sys/class/thermal/thermal_zone0/type", "cpu-thermal")
    write(root / "sys/class/thermal/thermal_zone0/temp", "60000")
    monitor = thermal.discover(str(root), None, run=no_commands)
    assert monitor is not None
    waited = monitor.wait_to_cool(50.0, timeout_s=0.1, poll_s=0.02)
    assert waited["reached"] is False and waited["end_c"] == 60.0 and 0.1 <= waited["waited_s"] < 2.0


# ------------------------------------------------------------------------------------------- throttling
def samples(window_start: float, end: float) -> List[ThermalSample]:
    return [ThermalSample(0.0, "start", {"cpu": 40.0}, {}),
            ThermalSample(1.0, "window_start", {"cpu": window_start}, {}),
            ThermalSample(2.0, "end", {"cpu": end}, {})]


def test_latency_drift_with_rising_temperature_is_throttling() -> None:
    assert throttle_reasons(samples(50.0, 53.0), {}, "cpu", drift=(1.0, 1.2)) == [
        "latency rose +20% over the timed window while cpu warmed 3.0 °C (50 -> 53 °C)"]
    assert throttle_reasons(samples(50.0, 50.5), {}, "cpu", drift=(1.0, 1.2)) == []   # temperature steady
    assert throttle_reasons(samples(50.0, 53.0), {}, "cpu", drift=(1.0, 1.05)) == []  # latency steady
    assert throttle_reasons(samples(50.0, 53.0), {}, "cpu", drift=(1.2, 1.0)) == []   # got faster
    assert throttle_reasons(samples(50.0, 53.0), {}, "cpu", drift=None) == []


def test_active_trips_start_fans_they_are_not_throttling() -> None:
    trips = {"cpu": [Trip("trip_point_0", "active", 50.0), Trip("trip_point_1", "passive", 60.0)]}
    assert throttle_reasons(samples(55.0, 55.0), trips, "cpu") == []
    assert throttle_reasons(samples(55.0, 61.0), trips, "cpu") == [
        "cpu reached 61 °C, at or over its passive trip point trip_point_1 (60 °C)"]


def test_background_sampling_during_a_window(tmp_path: Path) -> None:
    monitor = thermal.discover(str(pi5_root(tmp_path)), None, run=no_commands)
    assert isinstance(monitor, ThermalMonitor)
    monitor.sample("window_start")
    monitor.start_background(0.01)
    time.sleep(0.1)
    monitor.stop_background()
    monitor.sample("end")
    assert sum(1 for s in monitor.samples if s.mark == "window") >= 3
    result, _ = monitor.result()
    assert result.details["sample_interval_s"] == 0.01 and result.details["window_start_c"] == 47.4


# ----------------------------------------------------------------------------------------------- schema
def minimal_job(**extra: object) -> str:
    d: Dict[str, object] = {"schema_version": 1, "job_id": "j1", "artifact": {"path": "m.onnx", "sha256": "a" * 64}}
    d.update(extra)
    return json.dumps(d)


def test_thermal_section_is_optional_with_defaults() -> None:
    job = loads_job(minimal_job())
    assert job.thermal == ThermalSpec(enabled=True, wait_to_cool_c=None, wait_to_cool_timeout_s=120.0, zone=None)
    job = loads_job(minimal_job(thermal={"wait_to_cool_c": 45, "zone": "cpu-thermal"}))
    assert job.thermal is not None and (job.thermal.wait_to_cool_c, job.thermal.zone) == (45.0, "cpu-thermal")
    assert loads_job(minimal_job(thermal=None)).thermal is None


@pytest.mark.parametrize("section, message", [
    ({"wait_to_cool_timeout_s": -1}, r"^thermal\.wait_to_cool_timeout_s: must be >= 0$"),
    ({"wait_to_cool_c": "45"}, r"^thermal\.wait_to_cool_c: must be a number$"),
    ({"enabled": 1}, r"^thermal\.enabled: must be true or false$"),
    ({"zones": "cpu"}, r"^thermal\.zones: unknown field$"),
    ({"zone": ""}, r"^thermal\.zone: must be null or a sensor name$"),
])
def test_bad_thermal_section_names_the_field(section: Dict[str, object], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        loads_job(minimal_job(thermal=section))


# ------------------------------------------------------------------------------------------- the runner
def run(job_path: Path, root: Path) -> Report:
    return run_job(loads_job(job_path.read_text()), job_path.parent, root=str(root))


def test_runner_reports_the_zone_it_found(job_dir: MakeJob, tmp_path: Path) -> None:
    r = run(job_dir(), pi5_root(tmp_path))
    assert r.status == "ok", r.error
    t = r.thermal
    assert t is not None and t.source == "thermal_zone:thermal_zone0"
    assert (t.start_c, t.end_c, t.max_c, t.throttled) == (47.4, 47.4, 47.4, False)
    assert t.details["samples"] >= 3 and t.details["window_start_c"] == 47.4
    assert thermal_warnings(r.warnings) == []


def test_runner_without_thermal_sources_reports_null_without_warning(job_dir: MakeJob, tmp_path: Path) -> None:
    r = run(job_dir(), tmp_path / "empty-root")
    assert r.status == "ok" and r.thermal is None and thermal_warnings(r.warnings) == []
    r = run(job_dir(lambda d: d.update(thermal={"enabled": False})), pi5_root(tmp_path))
    assert r.status == "ok" and r.thermal is None


def test_runner_waits_to_cool_and_warns_when_it_cannot(job_dir: MakeJob, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(thermal, "POLL_S", 0.01)
    job = job_dir(lambda d: d.update(thermal={"wait_to_cool_c": 40.0, "wait_to_cool_timeout_s": 0.05}))
    r = run(job, pi5_root(tmp_path))
    assert r.status == "ok", r.error
    assert r.thermal is not None and r.thermal.details["wait_to_cool"]["reached"] is False
    assert 0.05 <= r.thermal.details["wait_to_cool"]["waited_s"] < 2.0
    assert any(w.startswith("thermal.wait_to_cool_c=40 not reached after") and "47.4 °C" in w for w in r.warnings)
    r = run(job_dir(lambda d: d.update(thermal={"wait_to_cool_c": 50.0})), pi5_root(tmp_path / "again"))
    assert r.thermal is not None and r.thermal.details["wait_to_cool"]["reached"] is True
    assert r.thermal.details["wait_to_cool"]["waited_s"] < 1.0
    assert not [w for w in r.warnings if "wait_to_cool" in w]
    r = run(job_dir(lambda d: d.update(thermal={"wait_to_cool_c": 50.0})), tmp_path / "empty-root")
    assert r.thermal is None and any("no thermal source; not waiting" in w for w in r.warnings)


def test_runner_flags_a_zone_over_its_passive_trip(job_dir: MakeJob, tmp_path: Path) -> None:
    root = pi5_root(tmp_path)
    zone = root / "sys/class/thermal/thermal_zone0"
    write(zone / "trip_point_0_type", "passive")   # test values: a passive trip below the captured 47.4 °C
    write(zone / "trip_point_0_temp", "45000")
    r = run(job_dir(lambda d: d.update(thermal={"zone": "thermal_zone0"})), root)
    assert r.status == "ok" and r.thermal is not None and r.thermal.throttled is True
    assert any(w.startswith("thermal throttling detected (thermal_zone0 reached 47.4 °C") for w in r.warnings)
