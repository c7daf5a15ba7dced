"""Power sensors: discover once, read many.

A sensor class is registered under the name a job uses in ``power.sensor``. ``discover(spec, sys_root)``
returns a ready sensor, or ``None`` when the hardware is not there (the runner then warns and reports no
power; it never fails the job for a missing sensor; one log line says where it looked). A misconfigured
sensor (bad ``power.options``) raises :class:`~agent.SensorError`. A sensor is read in a background thread at
``sample_hz`` during the timed window only: ``start()`` when the window opens, ``stop()`` when it closes. Every
window records how many samples were taken and what share of the window the sampling itself took.

Sensors here (``power.options`` keys in brackets):

- ``model``: an estimate, not a measurement. P = idle_w + (max_w - idle_w) * u, with u this process's CPU
  utilisation over the window divided by the number of CPUs it may run on. idle_w/max_w come from the job.
- ``rapl``: Intel/AMD RAPL package energy counters under ``<sys_root>/class/powercap/intel-rapl:N``.
- ``ina3221`` [rails]: the INA3221 monitors on NVIDIA Jetson boards, read from sysfs: hwmon
  (``bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label``, ``in<N>_input`` mV, ``curr<N>_input`` mA; JetPack 5
  and later) first, else iio (``bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_<N>``, ``in_power<N>_input`` mW;
  JetPack 4 and earlier). Rails are found by label; the total is the input rail (VDD_IN / POM_5V_IN) when
  there is one, else the sum of the rails (see :func:`total_rails`).
- ``tegrastats`` [command, interval_ms, rails]: the fallback on Jetsons whose sysfs is not readable: runs
  ``tegrastats --interval N`` for the window and parses each line with :func:`parse_tegrastats`.
- ``rpi5`` [command, timeout_s]: Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``
  (:func:`parse_pmic_read_adc`); the total is the sum of V * I over the rails that report both.
- ``nvml`` [device_index]: NVIDIA GPU energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (mJ; Volta and
  newer) through ``pynvml``, imported only here; the mean is the counter's delta over the window.
- ``command`` [command, mode, timeout_s]: an external meter. ``command`` is an argv list (never a shell string)
  run once per sample; it prints watts (``mode: "power"``, the default) or cumulative joules
  (``mode: "energy"``), a number with an optional unit (:func:`parse_meter_output`).

Energy per inference is always energy over the timed window / inferences (:func:`energy_mj_per_inference`).
"""
from __future__ import annotations

import abc
import importlib
import logging
import math
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil

from agent import SensorError
from agent.registry import Registry
from agent.schema import PowerResult, PowerSpec

log = logging.getLogger(__name__)

_SENSORS: "Registry[PowerSensor]" = Registry("power sensor", SensorError)

Clock = Callable[[], int]


@dataclass
class PowerWindow:
    """What a sensor saw over one window, before it is related to the inferences run in it."""
    source: str
    modelled: bool
    sample_hz: float
    samples: int
    mean_w: float
    window_s: float
    overhead_pct: float
    details: Dict[str, Any] = field(default_factory=dict)


def energy_mj_per_inference(mean_w: float, duration_s: float, inferences: int) -> float:
    return mean_w * duration_s * 1000.0 / inferences if inferences > 0 else 0.0


def to_result(w: PowerWindow, duration_s: float, iterations: int, batch_size: int) -> PowerResult:
    return PowerResult(source=w.source, modelled=w.modelled, sample_hz=w.sample_hz, samples=w.samples,
                       mean_w=w.mean_w,
                       energy_mj_per_inference=energy_mj_per_inference(w.mean_w, duration_s,
                                                                       iterations * batch_size),
                       overhead_pct=w.overhead_pct, details=w.details)


class PowerSensor(abc.ABC):
    """Base: a sampling thread calls :meth:`sample`; subclasses implement ``_read`` and ``_summarise``."""

    name = ""
    modelled = False
    needs_config = False  # True: usable only when the job configures it, so never listed by available_sensors()
    where = ""  # where discover() looks, for the warning when it finds nothing

    def __init__(self, sample_hz: float, clock: Clock = time.perf_counter_ns) -> None:
        self.sample_hz = sample_hz
        self._clock = clock
        self._readings: List[Tuple[int, Any]] = []
        self._read_ns = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._failure: Optional[BaseException] = None

    @classmethod
    @abc.abstractmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional["PowerSensor"]:
        ...

    def _read(self) -> Any:
        """One reading, for sensors sampled by the base class's thread. Sensors that receive readings instead
        (tegrastats streams lines) override ``start`` and never get here."""
        raise SensorError("power sensor %r takes no polled readings" % self.name)

    @abc.abstractmethod
    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        """Mean watts over the readings, and details for the report."""
        ...

    def sample(self) -> None:
        t0 = self._clock()
        value = self._read()
        t1 = self._clock()
        self._read_ns += t1 - t0
        self._readings.append((t1, value))

    def start(self, background: bool = True) -> None:
        self._readings, self._read_ns, self._failure = [], 0, None
        self._stop.clear()
        self.sample()
        if background:
            self._thread = threading.Thread(target=self._loop, name="power-" + self.name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        period = 1.0 / self.sample_hz
        try:
            while not self._stop.wait(period):
                self.sample()
        except Exception as e:  # surfaced by stop(); the sampling thread must not die silently
            self._failure = e

    def stop(self) -> PowerWindow:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            raise SensorError("power sensor %r failed while sampling: %s" % (self.name, self._failure))
        self.sample()
        return self._window()

    def _window(self) -> PowerWindow:
        window_ns = self._readings[-1][0] - self._readings[0][0]
        mean_w, details = self._summarise(self._readings)
        return PowerWindow(source=self.name, modelled=self.modelled, sample_hz=self.sample_hz,
                           samples=len(self._readings), mean_w=mean_w, window_s=window_ns / 1e9,
                           overhead_pct=100.0 * self._read_ns / window_ns if window_ns > 0 else 0.0,
                           details=details)


register_sensor = _SENSORS.register
sensor_names = _SENSORS.names
sensor_class = _SENSORS.lookup


def discover(spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
    """The sensor the job names, ready to start; None if its hardware is absent; SensorError if misconfigured."""
    sensor = sensor_class(spec.sensor).discover(spec, sys_root)
    if sensor is None:
        log.info("power sensor %r not found (%s)", spec.sensor, sensor_class(spec.sensor).where)
    return sensor


# ----------------------------------------------------------------------------------------------- options
def _options(spec: PowerSpec, sensor: str, known: Sequence[str]) -> Dict[str, Any]:
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        raise SensorError("power.options.%s: unknown option for the %s sensor (knows: %s)"
                          % (unknown[0], sensor, ", ".join(known)))
    return spec.options


def _argv_option(options: Dict[str, Any], default: Optional[List[str]]) -> List[str]:
    """``options.command`` as an argv list; a shell string is refused (it would need a shell to split it)."""
    argv = options.get("command", default)
    if argv is None:
        raise SensorError("power.options.command is required: the meter program and its arguments as a list, "
                          "e.g. [\"/usr/local/bin/meter\", \"--once\"]")
    if isinstance(argv, str):
        raise SensorError("power.options.command must be a list of arguments (argv), not a shell string: %r; "
                          "write it as e.g. [\"/usr/local/bin/meter\", \"--once\"] (no shell is used)" % argv)
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise SensorError("power.options.command must be a non-empty list of non-empty strings")
    return list(argv)


def _number_option(options: Dict[str, Any], key: str, default: float, minimum: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise SensorError("power.options.%s must be a number >= %g" % (key, minimum))
    return float(value)


def _rails_option(options: Dict[str, Any]) -> Optional[List[str]]:
    rails = options.get("rails")
    if rails is None:
        return None
    if not isinstance(rails, list) or not rails or not all(isinstance(r, str) for r in rails):
        raise SensorError("power.options.rails must be a non-empty list of rail names, e.g. [\"VDD_IN\"]")
    return list(rails)


def _found(argv: Sequence[str]) -> bool:
    return shutil.which(argv[0]) is not None


def _run_argv(argv: Sequence[str], timeout_s: float) -> str:
    """Run ``argv`` (no shell) and return its stdout; SensorError when it cannot run, fails or times out."""
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout_s,
                              check=False, universal_newlines=True)
    except subprocess.TimeoutExpired:
        raise SensorError("%s did not finish within %g s" % (argv[0], timeout_s)) from None
    except OSError as e:
        raise SensorError("cannot run %s: %s" % (argv[0], e)) from None
    if done.returncode != 0:
        raise SensorError("%s exited with status %d: %s"
                          % (argv[0], done.returncode, (done.stderr or done.stdout).strip()[:200]))
    return done.stdout


# ------------------------------------------------------------------------------------------------- model
@register_sensor("model")
class ModelSensor(PowerSensor):
    modelled = True
    needs_config = True
    where = "always available (an estimate from CPU utilisation)"

    def __init__(self, idle_w: float, max_w: float, sample_hz: float, clock: Clock = time.perf_counter_ns,
                 cpu_time: Optional[Callable[[], float]] = None, n_cpus: Optional[int] = None) -> None:
        super().__init__(sample_hz, clock)
        self.idle_w, self.max_w = idle_w, max_w
        self._cpu_time = cpu_time if cpu_time is not None else _process_cpu_time
        self._n_cpus = n_cpus
        self._allowed = 1

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        if spec.idle_w is None or spec.max_w is None:
            raise SensorError("power.idle_w and power.max_w are required for the model sensor")
        if not 0 <= spec.idle_w <= spec.max_w:
            raise SensorError("power.max_w must be >= power.idle_w >= 0 for the model sensor")
        return cls(spec.idle_w, spec.max_w, spec.sample_hz)

    def start(self, background: bool = True) -> None:
        # idle_w and max_w describe the whole device (max_w = every CPU busy), so utilisation is taken over all
        # of the device's CPUs, not only those the job is pinned to: 1 busy thread on 4 cores models 25 % load
        self._allowed = self._n_cpus if self._n_cpus is not None else (psutil.cpu_count(logical=True) or 1)
        super().start(background)

    def _read(self) -> float:
        return self._cpu_time()

    def watts(self, utilisation: float) -> float:
        u = min(1.0, max(0.0, utilisation))
        return self.idle_w + (self.max_w - self.idle_w) * u

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        (t0, c0), (t1, c1) = readings[0], readings[-1]
        wall_s = (t1 - t0) / 1e9
        u = (c1 - c0) / wall_s / self._allowed if wall_s > 0 else 0.0
        return self.watts(u), {
            "formula": "P = idle_w + (max_w - idle_w) * u; u = agent process CPU time / wall time / device CPUs, "
                       "clamped to 0..1",
            "idle_w": self.idle_w, "max_w": self.max_w,
            "note": "idle_w and max_w are configuration values, not measurements; this power is modelled",
            "utilisation": min(1.0, max(0.0, u)), "device_cpus": self._allowed,
        }


def _process_cpu_time() -> float:
    # user + system CPU seconds of all this process's threads: what psutil's cpu_times() gives, but read with
    # clock_gettime at nanosecond resolution instead of /proc/self/stat at 10 ms clock ticks, and cheaper
    return time.process_time()


# -------------------------------------------------------------------------------------------------- rapl
_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")


@register_sensor("rapl")
class RaplSensor(PowerSensor):
    """Package-domain energy counters (microjoules), summed over packages; wrap-around handled per interval."""

    where = "<sys>/class/powercap/intel-rapl:N/energy_uj, package domains, readable by this user"

    def __init__(self, domains: List[Tuple[str, Path, int]], sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self.domains = domains  # (name, energy_uj path, max_energy_range_uj)

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        base = Path(sys_root) / "class" / "powercap"
        if not base.is_dir():
            return None
        domains = []
        for d in sorted(base.iterdir()):
            if not _RAPL_PACKAGE.match(d.name):
                continue
            name = _read_text(d / "name") or d.name
            if not name.startswith("package"):  # e.g. "psys" overlaps the packages; summing it double counts
                continue
            energy, top = d / "energy_uj", _read_text(d / "max_energy_range_uj")
            if _read_text(energy) is None or top is None or not top.isdigit():
                continue  # commonly: energy_uj readable by root only
            domains.append((name, energy, int(top)))
        return cls(domains, spec.sample_hz) if domains else None

    def _read(self) -> List[int]:
        return [int(p.read_text()) for _, p, _ in self.domains]

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        total_uj, wraps = 0, 0
        for (_, prev), (_, cur) in zip(readings, readings[1:]):
            for (_, _, top), a, b in zip(self.domains, prev, cur):
                delta = b - a
                if delta < 0:
                    delta += top
                    wraps += 1
                total_uj += delta
        window_s = (readings[-1][0] - readings[0][0]) / 1e9
        return (total_uj / 1e6 / window_s if window_s > 0 else 0.0), {
            "domains": [name for name, _, _ in self.domains], "energy_j": total_uj / 1e6, "wraps": wraps,
        }


def _read_text(path: Path) -> Optional[str]:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ Jetson power rails
# The rail that measures the whole module's input, when the board has one: the other rails are parts of it
# (NVIDIA: "POM_5V_IN ... represents the total power consumption"; Orin Nano/NX and Xavier NX: VDD_IN).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# Rails already counted inside another rail (Jetson AGX Orin: VDDQ_VDD2_1V8AO is included in VIN_SYS_5V0).
INCLUDED_IN = {"VDDQ_VDD2_1V8AO": "VIN_SYS_5V0"}


def total_rails(rails: Sequence[str]) -> Tuple[List[str], str]:
    """Which of ``rails`` make up the total, and the rule, for the report: the input rail when present, else
    the sum of the rails less those already included in another one."""
    for name in INPUT_RAILS:
        if name in rails:
            return [name], "input rail %s" % name
    summed = [r for r in rails if not (r in INCLUDED_IN and INCLUDED_IN[r] in rails)]
    return summed, "sum of rails " + " + ".join(summed)


def _choose_rails(found: Sequence[str], wanted: Optional[List[str]]) -> List[str]:
    if wanted is None:
        return list(found)
    missing = [r for r in wanted if r not in found]
    if missing:
        raise SensorError("power.options.rails: rail %r not found (this device has: %s)"
                          % (missing[0], ", ".join(found) or "none"))
    return list(wanted)


def _summarise_rails(readings: List[Tuple[int, Any]], rails: Sequence[str], unit: str,
                     scale_to_w: float) -> Tuple[float, Dict[str, Any]]:
    """Mean of per-sample totals (each a dict rail -> value in ``unit``) in watts, and per-rail means."""
    totals, rule = total_rails(rails)
    means = {r: sum(v[r] for _, v in readings) / len(readings) for r in rails}
    per_sample = [sum(v[r] for r in totals) for _, v in readings]
    mean_w = sum(per_sample) / len(per_sample) * scale_to_w
    return mean_w, {"rails": list(rails), "rails_mean_" + unit: means, "total": rule, "total_rails": totals}


@dataclass
class Ina3221Rail:
    """One INA3221 channel, its files found once at discovery."""
    name: str
    power_mw: Optional[Path] = None   # iio in_power<N>_input
    voltage_mv: Optional[Path] = None
    current_ma: Optional[Path] = None

    def read_mw(self) -> float:
        if self.power_mw is not None:
            return float(int(self.power_mw.read_text()))
        assert self.voltage_mv is not None and self.current_ma is not None
        return int(self.voltage_mv.read_text()) * int(self.current_ma.read_text()) / 1000.0


def _readable_int(path: Path) -> bool:
    text = _read_text(path)
    return text is not None and re.match(r"^-?\d+$", text) is not None


def find_ina3221_hwmon(sys_root: str) -> List[Ina3221Rail]:
    """JetPack 5+: ``bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon*/in<N>_label`` + ``in<N>_input`` (mV) +
    ``curr<N>_input`` (mA). Channels without a current file (``in7``, the sum of shunt voltages) or labelled
    ``NC`` (not connected) are skipped."""
    rails: List[Ina3221Rail] = []
    for hwmon in sorted((Path(sys_root) / "bus" / "i2c" / "drivers" / "ina3221").glob("*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            n = label_file.name[2:-len("_label")]
            label = _read_text(label_file)
            volt, curr = hwmon / ("in%s_input" % n), hwmon / ("curr%s_input" % n)
            if not label or label == "NC" or not (_readable_int(volt) and _readable_int(curr)):
                continue
            rails.append(Ina3221Rail(label, voltage_mv=volt, current_ma=curr))
    return rails


def find_ina3221_iio(sys_root: str) -> List[Ina3221Rail]:
    """JetPack 4 and earlier: ``bus/i2c/drivers/ina3221x/<bus>-<addr>/iio:device*/rail_name_<N>`` with
    ``in_power<N>_input`` (mW), else ``in_voltage<N>_input`` (mV) * ``in_current<N>_input`` (mA)."""
    rails: List[Ina3221Rail] = []
    for dev in sorted((Path(sys_root) / "bus" / "i2c" / "drivers" / "ina3221x").glob("*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            n = name_file.name[len("rail_name_"):]
            label = _read_text(name_file)
            if not label or label == "NC":
                continue
            power = dev / ("in_power%s_input" % n)
            volt, curr = dev / ("in_voltage%s_input" % n), dev / ("in_current%s_input" % n)
            if _readable_int(power):
                rails.append(Ina3221Rail(label, power_mw=power))
            elif _readable_int(volt) and _readable_int(curr):
                rails.append(Ina3221Rail(label, voltage_mv=volt, current_ma=curr))
    return rails


@register_sensor("ina3221")
class Ina3221Sensor(PowerSensor):
    """Jetson on-module power monitors, each sample one read of every chosen rail (mW)."""

    where = ("<sys>/bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label (JetPack 5+) or "
             "<sys>/bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_<N> (JetPack 4)")

    def __init__(self, rails: List[Ina3221Rail], layout: str, sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self.rails = rails
        self.layout = layout

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        wanted = _rails_option(_options(spec, "ina3221", ("rails",)))
        for layout, finder in (("hwmon", find_ina3221_hwmon), ("iio", find_ina3221_iio)):
            found: Dict[str, Ina3221Rail] = {}
            for rail in finder(sys_root):
                if rail.name in found:
                    log.info("ina3221: rail %s appears twice; keeping the first", rail.name)
                    continue
                found[rail.name] = rail
            if found:
                chosen = _choose_rails(list(found), wanted)
                return cls([found[r] for r in chosen], layout, spec.sample_hz)
        return None

    def _read(self) -> Dict[str, float]:
        return {r.name: r.read_mw() for r in self.rails}

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        mean_w, details = _summarise_rails(readings, [r.name for r in self.rails], "mw", 1e-3)
        details["layout"] = self.layout
        return mean_w, details


# ----------------------------------------------------------------------------------------------- tegrastats
# "<NAME> <now>/<avg>" (JetPack 4: mW without a unit) or "<NAME> <now>mW/<avg>mW" (JetPack 5, 6); the value must
# end the token, so "RAM 1655/3956MB" and "IRAM 0/252kB(lfb 252kB)" are not rails
_TEGRA_RAIL = re.compile(r"(?<![\w@%])([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/\d+(?:mW)?)?(?=\s|$)")
_TEGRA_TEMP = re.compile(r"(?<![\w%])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C(?=[\s/]|$)")
_TEGRA_OFFLINE_C = -256.0  # what tegrastats prints for a temperature sensor that is switched off


def parse_tegrastats(line: str) -> Dict[str, float]:
    """One tegrastats line -> ``{"<RAIL>_mw": now, "<RAIL>_avg_mw": average, "<SENSOR>_c": °C}``.

    Rails are in milliwatts in every JetPack (the ``mW`` suffix appears from JetPack 5); temperatures like
    ``CPU@45.5C`` or ``cpu@44.125C``; a sensor reported at -256 C is switched off and left out.
    """
    out: Dict[str, float] = {}
    for m in _TEGRA_RAIL.finditer(line):
        out[m.group(1) + "_mw"] = float(m.group(2))
        out[m.group(1) + "_avg_mw"] = float(m.group(3))
    for m in _TEGRA_TEMP.finditer(line):
        value = float(m.group(2))
        if value != _TEGRA_OFFLINE_C:
            out[m.group(1) + "_c"] = value
    return out


def tegrastats_rails(parsed: Dict[str, float]) -> Dict[str, float]:
    """The instantaneous rail powers (mW) of a :func:`parse_tegrastats` result, by rail name."""
    return {k[:-len("_mw")]: v for k, v in parsed.items() if k.endswith("_mw") and not k.endswith("_avg_mw")}


@register_sensor("tegrastats")
class TegrastatsSensor(PowerSensor):
    """``tegrastats --interval N`` runs for the window; each line it prints is one sample (its own clock)."""

    where = "the tegrastats program (JetPack) on PATH, or power.options.command"

    def __init__(self, argv: List[str], interval_ms: int, rails: Optional[List[str]], sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self.argv, self.interval_ms, self.wanted = argv, interval_ms, rails
        self._proc: Optional["subprocess.Popen[str]"] = None
        self._got_line = threading.Event()
        self._temps: Dict[str, float] = {}
        self._started_ns = 0
        self._child_cpu_s = 0.0

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        options = _options(spec, "tegrastats", ("command", "interval_ms", "rails"))
        argv = _argv_option(options, ["tegrastats"])
        interval = _number_option(options, "interval_ms", max(1, round(1000.0 / spec.sample_hz)), 1)
        rails = _rails_option(options)
        if not _found(argv):
            return None
        return cls(argv, int(interval), rails, 1000.0 / interval)

    def start(self, background: bool = True) -> None:
        self._readings, self._read_ns, self._failure = [], 0, None
        self._got_line.clear()
        self._temps, self._child_cpu_s = {}, 0.0
        self._started_ns = self._clock()
        try:
            self._proc = subprocess.Popen(self.argv + ["--interval", str(self.interval_ms)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          universal_newlines=True, bufsize=1)
        except OSError as e:
            raise SensorError("cannot run %s: %s" % (self.argv[0], e)) from None
        self._thread = threading.Thread(target=self._reader, name="power-tegrastats", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            for line in self._proc.stdout:
                t0 = self._clock()
                parsed = parse_tegrastats(line)
                rails = tegrastats_rails(parsed)
                t1 = self._clock()
                self._read_ns += t1 - t0
                if rails:
                    self._readings.append((t0, rails))
                    self._temps = {k: v for k, v in parsed.items() if k.endswith("_c")}
                    self._got_line.set()
        except (OSError, ValueError) as e:  # the pipe closed under us; stop() reports what it has
            self._failure = e

    def stop(self) -> PowerWindow:
        proc = self._proc
        if proc is None:
            raise SensorError("tegrastats sensor stopped before it was started")
        if not self._readings:  # the window was shorter than the interval: wait for the first line
            self._got_line.wait(timeout=2 * self.interval_ms / 1000.0 + 1.0)
        end_ns = self._clock()
        try:
            cpu = psutil.Process(proc.pid).cpu_times()
            self._child_cpu_s = cpu.user + cpu.system
        except psutil.Error:
            self._child_cpu_s = 0.0
        proc.terminate()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        stderr = proc.stderr.read().strip() if proc.stderr is not None else ""
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        self._proc = None
        if not self._readings:
            why = "; " + stderr[:200] if stderr else (": %s" % self._failure if self._failure else "")
            raise SensorError("%s printed no power rails (exit status %s)%s" % (self.argv[0], proc.returncode, why))
        w = self._window()
        elapsed_ns = max(1, end_ns - self._started_ns)
        w.overhead_pct = 100.0 * (self._read_ns + self._child_cpu_s * 1e9) / elapsed_ns
        return w

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        found = [r for r in readings[0][1]]
        rails = _choose_rails(found, self.wanted)
        usable = [(t, v) for t, v in readings if all(r in v for r in rails)]
        if not usable:
            raise SensorError("tegrastats lines changed rails during the window; none has all of %s"
                              % ", ".join(rails))
        mean_w, details = _summarise_rails(usable, rails, "mw", 1e-3)
        details.update(interval_ms=self.interval_ms, temperatures_c=dict(self._temps),
                       overhead="parse time + tegrastats CPU time, over the window")
        return mean_w, details


# ------------------------------------------------------------------------------------------ Raspberry Pi 5
_PMIC_LINE = re.compile(r"^\s*(\S+)_([AV])\s+(current|volt)\(\d+\)=(-?[0-9.]+)([AV])\s*$")


def parse_pmic_read_adc(text: str) -> Dict[str, float]:
    """``vcgencmd pmic_read_adc`` output -> watts per rail: each ``<RAIL>_A current(n)=<I>A`` line is paired with
    its ``<RAIL>_V volt(m)=<U>V`` line by rail name (the numbers in brackets are ADC channels, not a pairing);
    rails with only a voltage (EXT5V, BATT) have no power and are left out. Some firmware prints a rail name
    twice (two channels labelled ``1V1_SYS``): the k-th current of a name pairs with its k-th voltage, and the
    second pair is reported as ``1V1_SYS#2``."""
    amps: Dict[str, List[float]] = {}
    volts: Dict[str, List[float]] = {}
    for line in text.splitlines():
        m = _PMIC_LINE.match(line)
        if m is None or m.group(2) != m.group(5):
            continue
        (amps if m.group(2) == "A" else volts).setdefault(m.group(1), []).append(float(m.group(4)))
    out: Dict[str, float] = {}
    for rail, currents in amps.items():
        for k, (i, u) in enumerate(zip(currents, volts.get(rail, []))):
            out[rail if k == 0 else "%s#%d" % (rail, k + 1)] = u * i
    return out


@register_sensor("rpi5")
class Rpi5PmicSensor(PowerSensor):
    """Raspberry Pi 5 PMIC: every sample runs ``vcgencmd pmic_read_adc``; total = sum over rails of V * I."""

    where = "vcgencmd pmic_read_adc (Raspberry Pi 5 firmware) on PATH, or power.options.command"

    def __init__(self, argv: List[str], timeout_s: float, sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self.argv, self.timeout_s = argv, timeout_s

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        options = _options(spec, "rpi5", ("command", "timeout_s"))
        argv = _argv_option(options, ["vcgencmd", "pmic_read_adc"])
        timeout = _number_option(options, "timeout_s", 2.0, 0.001)
        if not _found(argv):
            return None
        try:
            rails = parse_pmic_read_adc(_run_argv(argv, timeout))
        except SensorError as e:
            log.info("rpi5: %s", e)
            return None
        if not rails:
            log.info("rpi5: %s printed no rail with both a current and a voltage", " ".join(argv))
            return None
        return cls(argv, timeout, spec.sample_hz)

    def _read(self) -> Dict[str, float]:
        rails = parse_pmic_read_adc(_run_argv(self.argv, self.timeout_s))
        if not rails:
            raise SensorError("%s printed no rail with both a current and a voltage" % " ".join(self.argv))
        return rails

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        rails = sorted(set.intersection(*(set(v) for _, v in readings)))
        per_sample = [sum(v[r] for r in rails) for _, v in readings]
        return sum(per_sample) / len(per_sample), {
            "rails": rails, "rails_mean_w": {r: sum(v[r] for _, v in readings) / len(readings) for r in rails},
            "total": "sum of V * I over the PMIC rails (the 5 V input to USB, HATs and fan is not metered)",
        }


# --------------------------------------------------------------------------------------------------- NVML
def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


@register_sensor("nvml")
class NvmlSensor(PowerSensor):
    """NVIDIA GPU energy counter (mJ since the driver loaded, Volta and newer); mean = delta / window."""

    where = "pynvml importable and an NVIDIA GPU whose driver reports total energy consumption (Volta+)"

    def __init__(self, nvml: Any, index: int, device_name: str, sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self._nvml, self.index, self.device_name = nvml, index, device_name
        self._handle: Any = None

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        options = _options(spec, "nvml", ("device_index",))
        index = options.get("device_index", 0)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise SensorError("power.options.device_index must be an integer >= 0")
        nvml = _import_pynvml()
        if nvml is None:
            log.info("nvml: pynvml is not installed")
            return None
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            log.info("nvml: cannot initialise NVML: %s", e)
            return None
        try:
            count = nvml.nvmlDeviceGetCount()
            if index >= count:
                raise SensorError("power.options.device_index: %d but this host has %d NVIDIA GPU(s)"
                                  % (index, count))
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except nvml.NVMLError as e:
            log.info("nvml: GPU %d has no energy counter: %s", index, e)
            return None
        finally:
            nvml.nvmlShutdown()
        return cls(nvml, index, name.decode() if isinstance(name, bytes) else str(name), spec.sample_hz)

    def start(self, background: bool = True) -> None:
        try:
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(self.index)
        except self._nvml.NVMLError as e:
            raise SensorError("nvml: cannot open GPU %d: %s" % (self.index, e)) from None
        super().start(background)

    def stop(self) -> PowerWindow:
        try:
            return super().stop()
        finally:
            self._nvml.nvmlShutdown()

    def _read(self) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        (t0, e0), (t1, e1) = readings[0], readings[-1]
        window_s = (t1 - t0) / 1e9
        energy_j = (e1 - e0) / 1000.0
        return (energy_j / window_s if window_s > 0 else 0.0), {
            "device_index": self.index, "device_name": self.device_name, "energy_j": energy_j,
            "counter": "nvmlDeviceGetTotalEnergyConsumption (mJ); GPU board only, not the host",
        }


# ------------------------------------------------------------------------------------- external meter
_METER_VALUE = re.compile(r"^([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)$")


def parse_meter_output(text: str, unit: str = "W") -> float:
    """The last non-empty line of a meter's output as a number, optionally followed by ``unit`` (any case):
    ``"3.2"``, ``"3.2W"``, ``"3.2 w"``. ValueError for anything else (another unit, no number, not finite)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("no output")
    m = _METER_VALUE.match(lines[-1])
    if m is None or (m.group(2) and m.group(2).upper() != unit.upper()):
        raise ValueError("expected a number with an optional %r, got %r" % (unit, lines[-1][:80]))
    value = float(m.group(1))
    if not math.isfinite(value):
        raise ValueError("not a finite number: %r" % lines[-1][:80])
    return value


@register_sensor("command")
class CommandSensor(PowerSensor):
    """An external meter program, run once per sample: it prints watts, or cumulative joules in energy mode."""

    needs_config = True
    where = "power.options.command: a meter program (an argv list) found on PATH or by path"

    def __init__(self, argv: List[str], mode: str, timeout_s: float, sample_hz: float,
                 clock: Clock = time.perf_counter_ns) -> None:
        super().__init__(sample_hz, clock)
        self.argv, self.mode, self.timeout_s = argv, mode, timeout_s

    @classmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
        options = _options(spec, "command", ("command", "mode", "timeout_s"))
        argv = _argv_option(options, None)
        mode = options.get("mode", "power")
        if mode not in ("power", "energy"):
            raise SensorError("power.options.mode must be \"power\" (the meter prints watts) or \"energy\" "
                              "(it prints cumulative joules), not %r" % (mode,))
        timeout = _number_option(options, "timeout_s", 2.0, 0.001)
        if not (_found(argv) or os.path.isfile(argv[0])):
            return None
        return cls(argv, mode, timeout, spec.sample_hz)

    def _read(self) -> float:
        out = _run_argv(self.argv, self.timeout_s)
        try:
            return parse_meter_output(out, "W" if self.mode == "power" else "J")
        except ValueError as e:
            raise SensorError("%s: %s" % (self.argv[0], e)) from None

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        details: Dict[str, Any] = {"command": list(self.argv), "mode": self.mode}
        if self.mode == "power":
            return sum(v for _, v in readings) / len(readings), details
        energy_j, resets = 0.0, 0
        for (_, a), (_, b) in zip(readings, readings[1:]):
            if b < a:  # the meter's counter restarted: this interval is lost, not negative
                resets += 1
                continue
            energy_j += b - a
        window_s = (readings[-1][0] - readings[0][0]) / 1e9
        details.update(energy_j=energy_j, counter_resets=resets)
        return (energy_j / window_s if window_s > 0 else 0.0), details


def available_sensors(sys_root: str = "/sys") -> List[str]:
    """Names of hardware sensors present here (``model`` and ``command`` need configuring and are not listed)."""
    found = []
    probe_spec = PowerSpec(sensor="", idle_w=0.0, max_w=0.0)
    for name in sensor_names():
        cls = _SENSORS.lookup(name)
        if cls.needs_config:
            continue
        try:
            if cls.discover(probe_spec, sys_root) is not None:
                found.append(name)
        except (SensorError, OSError, ValueError) as e:
            log.info("power sensor %r: discovery failed: %s", name, e)
    return found
