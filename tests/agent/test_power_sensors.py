"""Hardware power sensors: parsers on captured device output (tests/agent/data, sources in its README), discovery
on fake sysfs trees built in tmp_path, sampling with a fake clock or a short real thread, NVML through a fake
``pynvml`` module, external meters as tiny Python scripts."""
from __future__ import annotations

import sys
import textwrap
import time
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import psutil
import pytest

from agent import SensorError, power
from agent.power import to_result
from agent.power.command import CommandSensor, parse_meter_output
from agent.power.ina3221 import Ina3221Sensor
from agent.power.nvml import NvmlSensor
from agent.power.rails import total_rails
from agent.power.rpi5 import Rpi5PmicSensor, parse_pmic_read_adc
from agent.power.tegrastats import TegrastatsSensor, parse_tegrastats, tegrastats_rails
from agent.schema import PowerSpec

DATA = Path(__file__).parent / "data"


def lines(name: str) -> List[str]:
    return (DATA / name).read_text().splitlines()


class Clock:
    def __init__(self) -> None:
        self.now = 7_000_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1e9)


# ---------------------------------------------------------------------------------------- tegrastats parser
def test_tegrastats_jetpack4_nano_line_exactly() -> None:
    assert parse_tegrastats(lines("tegrastats_jp4_nano.txt")[0]) == {
        "POM_5V_IN_mw": 4122.0, "POM_5V_IN_avg_mw": 3107.0, "POM_5V_GPU_mw": 109.0, "POM_5V_GPU_avg_mw": 85.0,
        "POM_5V_CPU_mw": 1167.0, "POM_5V_CPU_avg_mw": 748.0,
        "PLL_c": 39.0, "CPU_c": 44.0, "PMIC_c": 100.0, "GPU_c": 41.5, "AO_c": 47.5, "thermal_c": 42.5,
    }  # and nothing from "RAM 1501/3956MB", "IRAM 0/252kB(lfb 252kB)", "CPU [16%@1479,..." or "GR3D_FREQ 28%@76"


def test_tegrastats_every_nano_line() -> None:
    parsed = [parse_tegrastats(line) for line in lines("tegrastats_jp4_nano.txt")]
    assert [p["POM_5V_IN_mw"] for p in parsed] == [4122.0, 4531.0, 4523.0, 4531.0]
    assert [p["POM_5V_IN_avg_mw"] for p in parsed] == [3107.0, 3285.0, 3422.0, 3533.0]
    assert [p["POM_5V_GPU_mw"] for p in parsed] == [109.0, 1113.0, 1113.0, 1256.0]
    assert [p["thermal_c"] for p in parsed] == [42.5, 42.5, 43.0, 43.25]


def test_tegrastats_jetpack4_tx2_line_exactly() -> None:
    assert parse_tegrastats(lines("tegrastats_jp4_tx2.txt")[0]) == {
        "VDD_SYS_GPU_mw": 182.0, "VDD_SYS_GPU_avg_mw": 182.0, "VDD_SYS_SOC_mw": 730.0, "VDD_SYS_SOC_avg_mw": 730.0,
        "VDD_4V0_WIFI_mw": 0.0, "VDD_4V0_WIFI_avg_mw": 0.0, "VDD_IN_mw": 5297.0, "VDD_IN_avg_mw": 5297.0,
        "VDD_SYS_CPU_mw": 1917.0, "VDD_SYS_CPU_avg_mw": 1917.0, "VDD_SYS_DDR_mw": 1241.0, "VDD_SYS_DDR_avg_mw": 1241.0,
        "PLL_c": 42.5, "MCPU_c": 42.5, "PMIC_c": 50.0, "Tboard_c": 38.0, "GPU_c": 39.5, "BCPU_c": 42.5,
        "thermal_c": 41.3, "Tdiode_c": 39.25,
    }


def test_tegrastats_2018_tx2_lines() -> None:
    parsed = [parse_tegrastats(line) for line in lines("tegrastats_2018_tx2.txt")]
    assert [p["VDD_IN_mw"] for p in parsed] == [1931.0, 1776.0, 1738.0]
    assert [p["VDD_IN_avg_mw"] for p in parsed] == [1931.0, 1853.0, 1815.0]
    assert [p["VDD_DDR_mw"] for p in parsed] == [326.0, 250.0, 250.0]
    assert parsed[2]["BCPU_c"] == 40.5 and parsed[2]["thermal_c"] == 40.2
    assert sorted(tegrastats_rails(parsed[0])) == ["VDD_CPU", "VDD_DDR", "VDD_GPU", "VDD_IN", "VDD_SOC", "VDD_WIFI"]


def test_tegrastats_jetpack42_agx_xavier_rails_share_names_with_temperatures() -> None:
    p = parse_tegrastats(lines("tegrastats_jp42_agx_xavier.txt")[0])
    assert tegrastats_rails(p) == {"GPU": 463.0, "CPU": 618.0, "SOC": 2936.0, "CV": 0.0, "VDDRQ": 309.0,
                                   "SYS5V": 3306.0}
    assert (p["GPU_c"], p["CPU_c"], p["AUX_c"], p["thermal_c"], p["PMIC_c"]) == (30.5, 31.5, 30.5, 30.8, 100.0)
    assert "EMC_FREQ_mw" not in p and "RAM_mw" not in p and "SWAP_mw" not in p


def test_tegrastats_jetpack5_6_mw_layout() -> None:
    # NOT a capture (see data/README.md): the mW-suffixed layout with values an Orin Nano user reported
    p = parse_tegrastats(lines("tegrastats_jp6_orin_nano_NOT_CAPTURED.txt")[0])
    assert tegrastats_rails(p) == {"VDD_IN": 2180.0, "VDD_CPU_GPU_CV": 370.0, "VDD_SOC": 945.0}
    assert p["VDD_SOC_avg_mw"] == 945.0


def test_tegrastats_switched_off_sensor_is_left_out() -> None:
    # constructed tokens: tegrastats prints -256C for a temperature sensor that is switched off
    assert parse_tegrastats("cpu@-256C tj@47.343C") == {"tj_c": 47.343}


def test_total_is_the_input_rail_else_the_sum() -> None:
    nano = tegrastats_rails(parse_tegrastats(lines("tegrastats_jp4_nano.txt")[0]))
    assert total_rails(list(nano)) == (["POM_5V_IN"], "input rail POM_5V_IN")
    tx2 = tegrastats_rails(parse_tegrastats(lines("tegrastats_jp4_tx2.txt")[0]))
    assert total_rails(list(tx2))[0] == ["VDD_IN"]
    xavier = tegrastats_rails(parse_tegrastats(lines("tegrastats_jp42_agx_xavier.txt")[0]))
    assert total_rails(list(xavier)) == (["GPU", "CPU", "SOC", "CV", "VDDRQ", "SYS5V"],
                                         "sum of rails GPU + CPU + SOC + CV + VDDRQ + SYS5V")
    # AGX Orin's rails (NVIDIA docs): VDDQ_VDD2_1V8AO is already inside VIN_SYS_5V0
    orin = ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]
    assert total_rails(orin)[0] == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"]
    assert total_rails(["VDD_CPU_CV", "VDDQ_VDD2_1V8AO"])[0] == ["VDD_CPU_CV", "VDDQ_VDD2_1V8AO"]


# -------------------------------------------------------------------------------------- ina3221 (sysfs)
def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def hwmon_tree(sys_root: Path) -> Dict[str, Path]:
    """Xavier NX layout (alumet README): 7-0040/hwmon/hwmon6, channels 1-3 and in7 'sum of shunt voltages'
    (no curr7); plus an AGX-Orin-style second chip at 1-0041 whose channel 1 is labelled NC. Values: test values."""
    h = sys_root / "bus/i2c/drivers/ina3221/7-0040/hwmon/hwmon6"
    files = {}
    for n, label, mv, ma in ((1, "VDD_IN", 5000, 1000), (2, "VDD_CPU_GPU_CV", 5000, 200), (3, "VDD_SOC", 5000, 300)):
        write(h / ("in%d_label" % n), label)
        files[label + ".mv"] = write(h / ("in%d_input" % n), str(mv))
        files[label + ".ma"] = write(h / ("curr%d_input" % n), str(ma))
    write(h / "in7_label", "sum of shunt voltages")
    write(h / "in7_input", "1234")
    g = sys_root / "bus/i2c/drivers/ina3221/1-0041/hwmon/hwmon7"
    write(g / "in1_label", "NC")
    write(g / "in1_input", "0")
    write(g / "curr1_input", "0")
    return files


def iio_tree(sys_root: Path, with_power: bool = True) -> Dict[str, Path]:
    """Nano layout (rverdile/nano-temp-monitor): ina3221x/6-0040/iio:device0, in_power0..2 = total, GPU, CPU."""
    d = sys_root / "bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    files = {}
    for n, label, mw in ((0, "POM_5V_IN", 2000), (1, "POM_5V_GPU", 100), (2, "POM_5V_CPU", 400)):
        write(d / ("rail_name_%d" % n), label)
        if with_power:
            files[label] = write(d / ("in_power%d_input" % n), str(mw))
        write(d / ("in_voltage%d_input" % n), "5000")
        write(d / ("in_current%d_input" % n), str(mw // 5))
    return files


def test_ina3221_hwmon_discovery_and_window(tmp_path: Path) -> None:
    files = hwmon_tree(tmp_path / "sys")
    found = power.discover(PowerSpec(sensor="ina3221"), str(tmp_path / "sys"))
    assert isinstance(found, Ina3221Sensor) and found.layout == "hwmon"
    assert [r.name for r in found.rails] == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # not in7, not NC
    clock = Clock()
    sensor = Ina3221Sensor(found.rails, "hwmon", 10.0, clock=clock)
    sensor.start(background=False)             # VDD_IN 5000 mV * 1000 mA = 5000 mW
    files["VDD_IN.ma"].write_text("1400\n")    # 7000 mW
    clock.advance(0.5)
    sensor.sample()
    files["VDD_IN.ma"].write_text("1200\n")    # 6000 mW
    clock.advance(0.5)
    w = sensor.stop()                          # last sample reads 6000 mW again
    assert (w.source, w.modelled, w.samples) == ("ina3221", False, 3)
    assert w.mean_w == pytest.approx((5000 + 7000 + 6000) / 3 / 1000)
    assert w.details["total"] == "input rail VDD_IN" and w.details["layout"] == "hwmon"
    assert w.details["rails_mean_mw"] == pytest.approx({"VDD_IN": 6000.0, "VDD_CPU_GPU_CV": 1000.0,
                                                        "VDD_SOC": 1500.0})
    assert w.window_s == pytest.approx(1.0)
    result = to_result(w, duration_s=1.0, iterations=500, batch_size=2)  # 6 W over 1 s, 1000 images
    assert result.energy_mj_per_inference == pytest.approx(6.0)


def test_ina3221_chosen_rails_are_summed(tmp_path: Path) -> None:
    hwmon_tree(tmp_path / "sys")
    spec = PowerSpec(sensor="ina3221", options={"rails": ["VDD_CPU_GPU_CV", "VDD_SOC"]})
    found = power.discover(spec, str(tmp_path / "sys"))
    assert isinstance(found, Ina3221Sensor)
    sensor = Ina3221Sensor(found.rails, found.layout, 10.0, clock=Clock())
    sensor.start(background=False)
    w = sensor.stop()
    assert w.mean_w == pytest.approx(2.5)  # 1000 + 1500 mW
    assert w.details["total_rails"] == ["VDD_CPU_GPU_CV", "VDD_SOC"]


def test_ina3221_misconfiguration_is_an_error(tmp_path: Path) -> None:
    hwmon_tree(tmp_path / "sys")
    with pytest.raises(SensorError, match=r"rail 'VDD_GPU' not found \(this device has: VDD_IN, VDD_CPU_GPU_CV, "
                                          r"VDD_SOC\)"):
        power.discover(PowerSpec(sensor="ina3221", options={"rails": ["VDD_GPU"]}), str(tmp_path / "sys"))
    with pytest.raises(SensorError, match=r"power\.options\.rail: unknown option for the ina3221 sensor"):
        power.discover(PowerSpec(sensor="ina3221", options={"rail": ["VDD_IN"]}), str(tmp_path / "sys"))


def test_ina3221_iio_layout_power_files_then_voltage_times_current(tmp_path: Path) -> None:
    files = iio_tree(tmp_path / "sys")
    found = power.discover(PowerSpec(sensor="ina3221"), str(tmp_path / "sys"))
    assert isinstance(found, Ina3221Sensor) and found.layout == "iio"
    assert [(r.name, r.power_mw) for r in found.rails] == [(name, files[name]) for name in
                                                          ("POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU")]
    sensor = Ina3221Sensor(found.rails, "iio", 10.0, clock=Clock())
    sensor.start(background=False)
    w = sensor.stop()
    assert w.mean_w == pytest.approx(2.0) and w.details["total"] == "input rail POM_5V_IN"
    other = tmp_path / "other"
    iio_tree(other / "sys", with_power=False)
    found = power.discover(PowerSpec(sensor="ina3221"), str(other / "sys"))
    assert isinstance(found, Ina3221Sensor) and found.rails[0].power_mw is None
    assert found.rails[0].read_mw() == 5000 * 400 / 1000


def test_ina3221_prefers_hwmon_and_absent_is_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hwmon_tree(tmp_path / "sys")
    iio_tree(tmp_path / "sys")
    found = power.discover(PowerSpec(sensor="ina3221"), str(tmp_path / "sys"))
    assert isinstance(found, Ina3221Sensor) and found.layout == "hwmon"
    assert "ina3221" in power.available_sensors(str(tmp_path / "sys"))
    with caplog.at_level("INFO", logger="agent.power"):
        assert power.discover(PowerSpec(sensor="ina3221"), str(tmp_path / "empty")) is None
    assert [r.message for r in caplog.records if "ina3221" in r.message] == [
        "power sensor 'ina3221' not found (%s)" % Ina3221Sensor.where]


def test_ina3221_samples_in_the_background(tmp_path: Path) -> None:
    hwmon_tree(tmp_path / "sys")
    sensor = power.discover(PowerSpec(sensor="ina3221", sample_hz=200.0), str(tmp_path / "sys"))
    assert sensor is not None
    sensor.start()
    time.sleep(0.15)
    w = sensor.stop()
    assert w.samples >= 5 and w.mean_w == pytest.approx(5.0) and 0.0 < w.overhead_pct < 50.0


def test_ina3221_file_vanishing_mid_window_surfaces_at_stop(tmp_path: Path) -> None:
    files = hwmon_tree(tmp_path / "sys")
    sensor = power.discover(PowerSpec(sensor="ina3221", sample_hz=500.0), str(tmp_path / "sys"))
    assert sensor is not None
    sensor.start()
    files["VDD_SOC.ma"].unlink()
    time.sleep(0.05)
    with pytest.raises(SensorError, match="power sensor 'ina3221' failed while sampling"):
        sensor.stop()


# --------------------------------------------------------------------------------------- tegrastats sensor
FAKE_TEGRASTATS = textwrap.dedent("""\
    import sys, time
    lines = open(sys.argv[1]).read().splitlines()
    assert sys.argv[2] == "--interval"
    interval = int(sys.argv[3]) / 1000.0
    i = 0
    while True:
        time.sleep(interval)
        sys.stdout.write(lines[i % len(lines)] + "\\n")
        sys.stdout.flush()
        i += 1
    """)


def fake_tegrastats(tmp_path: Path, fixture: str) -> List[str]:
    script = tmp_path / "fake_tegrastats.py"
    script.write_text(FAKE_TEGRASTATS)
    return [sys.executable, str(script), str(DATA / fixture)]


def test_tegrastats_sensor_runs_parses_and_stops_the_process(tmp_path: Path) -> None:
    argv = fake_tegrastats(tmp_path, "tegrastats_jp4_nano.txt")
    sensor = power.discover(PowerSpec(sensor="tegrastats", options={"command": argv, "interval_ms": 30}))
    assert isinstance(sensor, TegrastatsSensor) and sensor.sample_hz == pytest.approx(1000 / 30)
    sensor.start()
    proc = sensor._proc
    assert proc is not None
    time.sleep(0.25)
    t0 = time.monotonic()
    w = sensor.stop()
    assert time.monotonic() - t0 < 4.0  # terminated, not left to the kill after a 5 s grace
    assert proc.returncode is not None and not psutil.pid_exists(proc.pid)  # terminated and reaped
    values = [4122.0, 4531.0, 4523.0, 4531.0]
    seen = [values[i % 4] for i in range(w.samples)]
    assert w.samples >= 2 and w.mean_w == pytest.approx(sum(seen) / len(seen) / 1000)
    assert w.details["total"] == "input rail POM_5V_IN" and w.details["interval_ms"] == 30
    assert w.details["temperatures_c"]["CPU_c"] in (44.0, 43.5)
    assert w.overhead_pct > 0.0


def test_tegrastats_short_window_waits_for_the_first_line(tmp_path: Path) -> None:
    argv = fake_tegrastats(tmp_path, "tegrastats_jp42_agx_xavier.txt")
    sensor = power.discover(PowerSpec(sensor="tegrastats", options={"command": argv, "interval_ms": 50,
                                                                     "rails": ["CPU", "GPU"]}))
    assert sensor is not None
    sensor.start()
    w = sensor.stop()  # before the first line: stop() waits for it
    assert w.samples >= 1 and w.mean_w == pytest.approx((618 + 463) / 1000)


def test_tegrastats_without_rails_is_an_error_and_absent_is_none(tmp_path: Path) -> None:
    silent = tmp_path / "silent.py"
    silent.write_text("import sys\nsys.stderr.write('needs root\\n')\nsys.exit(3)\n")
    sensor = power.discover(PowerSpec(sensor="tegrastats", options={"command": [sys.executable, str(silent)],
                                                                     "interval_ms": 10}))
    assert sensor is not None
    sensor.start()
    with pytest.raises(SensorError, match=r"printed no power rails \(exit status 3\); needs root"):
        sensor.stop()
    assert power.discover(PowerSpec(sensor="tegrastats")) is None  # no tegrastats on this machine's PATH
    with pytest.raises(SensorError, match="not a shell string"):
        power.discover(PowerSpec(sensor="tegrastats", options={"command": "tegrastats --interval 100"}))


# ----------------------------------------------------------------------------------------- Raspberry Pi 5
def test_pmic_read_adc_pairs_rails_by_name() -> None:
    rails = parse_pmic_read_adc((DATA / "pmic_read_adc_pi5.txt").read_text())
    assert sorted(rails) == sorted(["3V7_WL_SW", "3V3_SYS", "1V8_SYS", "DDR_VDD2", "DDR_VDDQ", "1V1_SYS", "0V8_SW",
                                    "VDD_CORE", "3V3_DAC", "3V3_ADC", "0V8_AON", "HDMI"])  # not EXT5V, BATT
    assert rails["VDD_CORE"] == 10.87674000 * 0.89745940
    assert rails["0V8_AON"] == 0.00579975 * 0.79736190    # current(16) pairs with volt(19): by name
    assert rails["3V7_WL_SW"] == 0.0
    assert sum(rails.values()) == pytest.approx(10.7998944, abs=1e-6)


def test_pmic_read_adc_with_a_rail_name_printed_twice() -> None:
    rails = parse_pmic_read_adc((DATA / "pmic_read_adc_pi5_duplicate_names.txt").read_text())
    assert rails["1V1_SYS"] == 0.18152300 * 1.10622600     # first current with first voltage
    assert rails["1V1_SYS#2"] == 5.55555000 * 0.79765500   # second with second, not overwriting the first
    assert rails["0V8_SYS"] == 0.32693650 * 0.80476110 and len(rails) == 12


def pmic_script(tmp_path: Path, fixture: str) -> List[str]:
    script = tmp_path / "vcgencmd_pmic.py"
    script.write_text("import sys\nsys.stdout.write(open(sys.argv[1]).read())\n")
    return [sys.executable, str(script), str(DATA / fixture)]


def test_rpi5_sensor_through_an_injected_command(tmp_path: Path) -> None:
    argv = pmic_script(tmp_path, "pmic_read_adc_pi5.txt")
    found = power.discover(PowerSpec(sensor="rpi5", options={"command": argv}))
    assert isinstance(found, Rpi5PmicSensor)
    sensor = Rpi5PmicSensor(found.argv, found.timeout_s, 10.0, clock=Clock())
    sensor.start(background=False)
    sensor.sample()
    w = sensor.stop()
    expected = sum(parse_pmic_read_adc((DATA / "pmic_read_adc_pi5.txt").read_text()).values())
    assert w.samples == 3 and w.mean_w == pytest.approx(expected)
    assert w.details["rails_mean_w"]["VDD_CORE"] == pytest.approx(10.87674 * 0.8974594)


def test_rpi5_absent_or_silent_is_none(tmp_path: Path) -> None:
    assert power.discover(PowerSpec(sensor="rpi5")) is None  # no vcgencmd here
    empty = tmp_path / "pi4.py"
    empty.write_text("print('error=1 error_msg=\"Command not registered\"')\n")
    assert power.discover(PowerSpec(sensor="rpi5", options={"command": [sys.executable, str(empty)]})) is None


# ---------------------------------------------------------------------------------------------------- NVML
class FakeNvml:
    """What NvmlSensor uses of pynvml; energy in mJ comes from ``energy`` (one value per call)."""

    def __init__(self, energy: List[int], count: int = 1, supported: bool = True, driver: bool = True) -> None:
        self.module = types.ModuleType("pynvml")
        self.energy, self.inits, self.shutdowns = list(energy), 0, 0

        class NVMLError(Exception):
            pass

        def init() -> None:
            if not driver:
                raise NVMLError("Driver Not Loaded")
            self.inits += 1

        def shutdown() -> None:
            self.shutdowns += 1

        def total_energy(handle: Any) -> int:
            if not supported:
                raise NVMLError("Not Supported")
            return self.energy.pop(0) if len(self.energy) > 1 else self.energy[0]

        m: Any = self.module
        m.NVMLError = NVMLError
        m.nvmlInit, m.nvmlShutdown = init, shutdown
        m.nvmlDeviceGetCount = lambda: count
        m.nvmlDeviceGetHandleByIndex = lambda i: ("handle", i)
        m.nvmlDeviceGetName = lambda h: b"NVIDIA H100 80GB HBM3"
        m.nvmlDeviceGetTotalEnergyConsumption = total_energy


def test_nvml_absent_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert power.discover(PowerSpec(sensor="nvml")) is None
    assert "nvml" not in power.available_sensors("/nonexistent")


def test_nvml_energy_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml([1_000_000, 999_999_999])  # discovery reads once; then the window's readings
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    found = power.discover(PowerSpec(sensor="nvml", options={"device_index": 0}))
    assert isinstance(found, NvmlSensor) and found.device_name == "NVIDIA H100 80GB HBM3"
    assert (fake.inits, fake.shutdowns) == (1, 1)
    fake.energy = [5_000, 5_750, 7_000]  # mJ
    clock = Clock()
    sensor = NvmlSensor(fake.module, 0, found.device_name, 10.0, clock=clock)
    sensor.start(background=False)
    clock.advance(0.5)
    sensor.sample()
    clock.advance(0.5)
    w = sensor.stop()
    assert w.mean_w == pytest.approx(2.0) and w.details["energy_j"] == pytest.approx(2.0)
    assert (w.source, w.modelled, w.samples) == ("nvml", False, 3)
    assert (fake.inits, fake.shutdowns) == (2, 2)


def test_nvml_without_energy_counter_or_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    no_gpu = FakeNvml([0], driver=False)  # pynvml installed, no NVIDIA driver or GPU: nvmlInit fails
    monkeypatch.setitem(sys.modules, "pynvml", no_gpu.module)
    assert power.discover(PowerSpec(sensor="nvml")) is None and no_gpu.shutdowns == 0
    fake = FakeNvml([0], supported=False)  # pre-Volta, or a Jetson's nvgpu: NVMLError_NotSupported
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    assert power.discover(PowerSpec(sensor="nvml")) is None and fake.shutdowns == 1
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([0], count=1).module)
    with pytest.raises(SensorError, match=r"device_index: 2 but this host has 1 NVIDIA GPU"):
        power.discover(PowerSpec(sensor="nvml", options={"device_index": 2}))


# ------------------------------------------------------------------------------------------ external meter
def meter(tmp_path: Path, body: str) -> List[str]:
    script = tmp_path / "meter.py"
    script.write_text(body)
    return [sys.executable, str(script)]


@pytest.mark.parametrize("text, unit, value", [("3.2", "W", 3.2), ("3.2W\n", "W", 3.2), ("starting\n 4 w ", "W", 4.0),
                                                ("1.5e3 J", "J", 1500.0), ("12", "J", 12.0)])
def test_meter_output_numbers(text: str, unit: str, value: float) -> None:
    assert parse_meter_output(text, unit) == value


@pytest.mark.parametrize("text", ["", "3.2 mA", "W", "nan", "3.2 J"])
def test_meter_output_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_meter_output(text, "W")


def test_command_meter_in_watts(tmp_path: Path) -> None:
    argv = meter(tmp_path, "print('3.5 W')\n")
    found = power.discover(PowerSpec(sensor="command", options={"command": argv, "timeout_s": 10.0}))
    assert isinstance(found, CommandSensor) and found.mode == "power"
    sensor = CommandSensor(found.argv, "power", 10.0, 5.0, clock=Clock())
    sensor.start(background=False)
    w = sensor.stop()
    assert (w.mean_w, w.samples, w.details["command"]) == (3.5, 2, argv)


def test_command_meter_in_joules(tmp_path: Path) -> None:
    counter = tmp_path / "joules"
    counter.write_text("100.0")
    argv = meter(tmp_path, "print(open(%r).read() + ' J')\n" % str(counter))
    found = power.discover(PowerSpec(sensor="command", options={"command": argv, "mode": "energy"}))
    assert isinstance(found, CommandSensor)
    clock = Clock()
    sensor = CommandSensor(found.argv, "energy", 10.0, 5.0, clock=clock)
    sensor.start(background=False)
    for joules in ("101.5", "103.0"):
        counter.write_text(joules)
        clock.advance(0.5)
        sensor.sample()
    counter.write_text("0.5")  # the meter restarted its counter: that interval is dropped, not negative
    clock.advance(0.5)
    w = sensor.stop()
    assert w.details["energy_j"] == pytest.approx(3.0) and w.details["counter_resets"] == 1
    assert w.mean_w == pytest.approx(3.0 / 1.5)


def test_command_meter_refuses_shell_strings_and_bad_options(tmp_path: Path) -> None:
    with pytest.raises(SensorError, match=r"must be a list of arguments \(argv\), not a shell string: "
                                          r"'meter --once \| tail -1'"):
        power.discover(PowerSpec(sensor="command", options={"command": "meter --once | tail -1"}))
    with pytest.raises(SensorError, match="power.options.command is required"):
        power.discover(PowerSpec(sensor="command"))
    with pytest.raises(SensorError, match=r"mode must be \"power\""):
        power.discover(PowerSpec(sensor="command", options={"command": ["x"], "mode": "amps"}))
    assert power.discover(PowerSpec(sensor="command", options={"command": [str(tmp_path / "no-meter")]})) is None
    assert "command" not in power.available_sensors("/nonexistent")


@pytest.mark.parametrize("body, message", [
    ("import sys\nsys.stderr.write('USB meter unplugged')\nsys.exit(2)\n", "exited with status 2: USB meter unplugged"),
    ("print('3.2 mA')\n", "expected a number with an optional 'W'"),
    ("import time\ntime.sleep(5)\n", "did not finish within 0.3 s"),
])
def test_command_meter_failures_are_sensor_errors(tmp_path: Path, body: str, message: str) -> None:
    sensor = CommandSensor(meter(tmp_path, body), "power", 0.3, 5.0)
    with pytest.raises(SensorError, match=message):
        sensor.start(background=False)


def test_command_meter_failure_in_the_background_surfaces_at_stop(tmp_path: Path) -> None:
    flag = tmp_path / "fail"
    argv = meter(tmp_path, "import os, sys\nif os.path.exists(%r): sys.exit(1)\nprint(2.0)\n" % str(flag))
    sensor = CommandSensor(argv, "power", 10.0, 50.0)
    sensor.start()
    flag.write_text("")
    time.sleep(0.3)
    with pytest.raises(SensorError, match="power sensor 'command' failed while sampling: .* exited with status 1"):
        sensor.stop()


def test_sensor_registry_lists_every_sensor() -> None:
    assert power.sensor_names() == ["command", "ina3221", "model", "nvml", "rapl", "rpi5", "tegrastats"]
    classes: Dict[str, Optional[type]] = {n: power.sensor_class(n) for n in power.sensor_names()}
    assert [n for n, c in classes.items() if c is not None and c.needs_config] == ["command", "model"]
