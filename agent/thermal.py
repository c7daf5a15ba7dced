"""Thermal sources: discover once, read many; a :class:`ThermalMonitor` watches one job.

A source class is registered by name; ``discover(sys_root, run)`` returns a ready source or ``None`` when the
device has none (missing = absent: one log line, never an exception). Temperatures are degrees Celsius in keys
ending ``_c``. Sources here:

- ``thermal_zone``: Linux thermal zones, ``<sys>/class/thermal/thermal_zone*/type`` and ``temp`` (m°C), with
  their trip points ``trip_point_<N>_temp`` (m°C) / ``trip_point_<N>_type`` (active, passive, hot, critical);
  a trip at 0 m°C is disabled and ignored. Sensors are named by zone type (``cpu-thermal``, ``CPU-therm``).
- ``apex``: Coral Edge TPU (PCIe) through the gasket/apex driver, ``<sys>/class/apex/apex_<N>/temp`` (m°C) with
  ``trip_point<0..2>_temp`` (the driver lowers the TPU clock past each: type passive) and ``hw_temp_warn<1,2>``
  (hardware alarms: type critical), as described at https://coral.ai/docs/pcie-parameters/.
- ``vcgencmd``: Raspberry Pi firmware, ``vcgencmd measure_temp`` (``temp=47.2'C``) and ``vcgencmd
  get_throttled`` (bit field decoded by :func:`decode_throttled`).

:func:`discover` gathers every source present into a :class:`ThermalMonitor`. One sensor is *primary* (the
job's ``thermal.zone`` if it names one, else the CPU zone, else the first found): the report's start/end/max
temperatures are its. Throttling is judged over all sensors (:func:`throttle_reasons`): throttle bits set
during the job, a temperature at or over a passive/hot/critical trip point, or latency drift while the
temperature rose.
"""
from __future__ import annotations

import abc
import logging
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from agent import SensorError
from agent.registry import Registry
from agent.schema import ThermalResult, ThermalSpec
from agent.sysfs import read_text
from agent.timing import DRIFT_WARN

log = logging.getLogger(__name__)

Run = Callable[[Sequence[str], float], Optional[str]]  # argv, timeout_s -> stdout, or None when it failed
MonoClock = Callable[[], float]

COMMAND_TIMEOUT_S = 2.0
POLL_S = 1.0            # wait-to-cool polling interval
SAMPLE_INTERVAL_S = 1.0  # background sampling during the timed window
RISE_C = 1.0            # a rise over the timed window that, with latency drift, counts as throttling
THROTTLE_TRIP_TYPES = ("passive", "hot", "critical")  # "active" trips start fans, they do not slow the chip
OFFLINE_C = -200.0      # at or below this a sensor is switched off (Jetson Orin reports -256 °C), not cold

_SOURCES: "Registry[ThermalSource]" = Registry("thermal source", SensorError)
register_source = _SOURCES.register
source_names = _SOURCES.names
source_class = _SOURCES.lookup


def run_command(argv: Sequence[str], timeout_s: float) -> Optional[str]:
    """Run ``argv`` (no shell); its stdout, or None if it is missing, fails or times out."""
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout_s,
                              check=False, universal_newlines=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


# ------------------------------------------------------------------------------------------ pure parsers
_MEASURE_TEMP = re.compile(r"temp=(-?\d+(?:\.\d+)?)'C")
_GET_THROTTLED = re.compile(r"throttled=(0x[0-9a-fA-F]+|\d+)")

# vcgencmd get_throttled bits, from https://www.raspberrypi.com/documentation/computers/os.html#get_throttled
THROTTLE_BITS = (
    (0, "under_voltage", "under-voltage detected"),
    (1, "arm_frequency_capped", "arm frequency capped"),
    (2, "currently_throttled", "currently throttled"),
    (3, "soft_temp_limit", "soft temperature limit active"),
    (16, "under_voltage_occurred", "under-voltage has occurred"),
    (17, "arm_frequency_capping_occurred", "arm frequency capping has occurred"),
    (18, "throttling_occurred", "throttling has occurred"),
    (19, "soft_temp_limit_occurred", "soft temperature limit has occurred"),
)
THROTTLING_NOW = (1 << 1) | (1 << 2) | (1 << 3)
THROTTLING_OCCURRED = (1 << 17) | (1 << 18) | (1 << 19)
UNDER_VOLTAGE_NOW = 1 << 0
UNDER_VOLTAGE_OCCURRED = 1 << 16


def parse_measure_temp(text: str) -> Optional[float]:
    """``temp=47.2'C`` -> 47.2; None when the text has no temperature."""
    m = _MEASURE_TEMP.search(text)
    return float(m.group(1)) if m else None


def parse_get_throttled(text: str) -> Optional[int]:
    """``throttled=0x50005`` -> 0x50005; None when the text has no value."""
    m = _GET_THROTTLED.search(text)
    return int(m.group(1), 0) if m else None


def decode_throttled(value: int) -> Dict[str, bool]:
    """Every documented bit of a ``get_throttled`` value by name (``currently_throttled``, ...)."""
    return {key: bool(value & (1 << bit)) for bit, key, _ in THROTTLE_BITS}


def describe_throttled(value: int) -> List[str]:
    """The documented meanings of the bits set in ``value``, lowest bit first."""
    return [text for bit, _, text in THROTTLE_BITS if value & (1 << bit)]


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Trip:
    name: str      # "trip_point_1", "hw_temp_warn2"
    type: str      # active | passive | hot | critical
    temp_c: float


def read_millicelsius(path: Path) -> Optional[float]:
    """A sysfs temperature in m°C as °C; None when missing, unreadable, not a number or switched off."""
    text = read_text(path)
    if text is None or re.match(r"^-?\d+$", text) is None:
        return None
    value = int(text) / 1000.0
    return value if value > OFFLINE_C else None


class ThermalSource(abc.ABC):
    """Base: ``read()`` returns sensor -> °C for the sensors that answered; trips and throttle bits optional."""

    name = ""
    where = ""  # what discover() looks for, for the log line when nothing is found

    @classmethod
    @abc.abstractmethod
    def discover(cls, sys_root: str, run: Run) -> Optional["ThermalSource"]:
        ...

    @abc.abstractmethod
    def sensors(self) -> List[str]:
        ...

    def aliases(self) -> Dict[str, str]:
        """Other names a job may use for a sensor (e.g. the sysfs folder), mapped to the sensor name."""
        return {}

    @abc.abstractmethod
    def read(self) -> Dict[str, float]:
        ...

    def trips(self) -> Dict[str, List[Trip]]:
        return {}

    def throttle_bits(self) -> Optional[int]:
        return None


@dataclass
class _SysfsSensor:
    label: str
    folder: str
    temp: Path
    trips: List[Trip] = field(default_factory=list)


def zone_trips(zone: Path) -> List[Trip]:
    """A thermal zone's enabled trip points (``trip_point_<N>_temp`` > 0 with a ``_type``), in index order."""
    trips = []
    numbered = []
    for f in zone.glob("trip_point_*_temp"):
        n = f.name[len("trip_point_"):-len("_temp")]
        if n.isdigit():
            numbered.append((int(n), f))
    for n, f in sorted(numbered):
        temp, kind = read_millicelsius(f), read_text(zone / ("trip_point_%d_type" % n))
        if temp is None or kind is None or temp <= 0:
            continue  # 0 m°C marks a disabled trip (e.g. x86_pkg_temp's passive trips)
        trips.append(Trip("trip_point_%d" % n, kind, temp))
    return trips


class _SysfsSource(ThermalSource):
    def __init__(self, sensors: List[_SysfsSensor]) -> None:
        self._sensors = sensors

    def sensors(self) -> List[str]:
        return [s.label for s in self._sensors]

    def aliases(self) -> Dict[str, str]:
        return {s.folder: s.label for s in self._sensors}

    def read(self) -> Dict[str, float]:
        out = {}
        for s in self._sensors:
            value = read_millicelsius(s.temp)
            if value is not None:
                out[s.label] = value
        return out

    def trips(self) -> Dict[str, List[Trip]]:
        return {s.label: list(s.trips) for s in self._sensors if s.trips}


def _unique(label: str, folder: str, taken: Sequence[str]) -> str:
    return label if label not in taken else "%s@%s" % (label, folder)


@register_source("thermal_zone")
class ThermalZones(_SysfsSource):
    where = "<sys>/class/thermal/thermal_zone*/temp"

    @classmethod
    def discover(cls, sys_root: str, run: Run) -> Optional[ThermalSource]:
        zones: List[_SysfsSensor] = []
        base = Path(sys_root) / "class" / "thermal"
        numbered = [(int(d.name[len("thermal_zone"):]), d) for d in base.glob("thermal_zone*")
                    if d.name[len("thermal_zone"):].isdigit()]
        for _, d in sorted(numbered):
            if read_millicelsius(d / "temp") is None:
                continue  # unreadable or switched off now: absent for this job
            label = _unique(read_text(d / "type") or d.name, d.name, [z.label for z in zones])
            zones.append(_SysfsSensor(label, d.name, d / "temp", zone_trips(d)))
        return cls(zones) if zones else None


# Coral PCIe driver attributes: the driver throttles the TPU clock at each trip point; the hardware warnings
# are its alarms (https://coral.ai/docs/pcie-parameters/)
APEX_TRIPS = (("trip_point0_temp", "passive"), ("trip_point1_temp", "passive"), ("trip_point2_temp", "passive"),
              ("hw_temp_warn1", "critical"), ("hw_temp_warn2", "critical"))


@register_source("apex")
class ApexTpu(_SysfsSource):
    where = "<sys>/class/apex/apex_*/temp (Coral Edge TPU, PCIe)"

    @classmethod
    def discover(cls, sys_root: str, run: Run) -> Optional[ThermalSource]:
        tpus = []
        for d in sorted((Path(sys_root) / "class" / "apex").glob("apex_*")):
            if read_millicelsius(d / "temp") is None:
                continue
            trips = []
            for attr, kind in APEX_TRIPS:
                value = read_millicelsius(d / attr)
                if value is not None and value > 0:
                    trips.append(Trip(attr[:-len("_temp")] if attr.endswith("_temp") else attr, kind, value))
            tpus.append(_SysfsSensor(d.name, d.name, d / "temp", trips))
        return cls(tpus) if tpus else None


@register_source("vcgencmd")
class Vcgencmd(ThermalSource):
    """Raspberry Pi firmware: SoC temperature and the throttle bit field."""

    where = "vcgencmd measure_temp (Raspberry Pi firmware)"
    sensor = "vcgencmd"

    def __init__(self, run: Run, has_throttled: bool) -> None:
        self._run = run
        self.has_throttled = has_throttled

    @classmethod
    def discover(cls, sys_root: str, run: Run) -> Optional[ThermalSource]:
        out = run(["vcgencmd", "measure_temp"], COMMAND_TIMEOUT_S)
        if out is None or parse_measure_temp(out) is None:
            return None
        throttled = run(["vcgencmd", "get_throttled"], COMMAND_TIMEOUT_S)
        return cls(run, throttled is not None and parse_get_throttled(throttled) is not None)

    def sensors(self) -> List[str]:
        return [self.sensor]

    def read(self) -> Dict[str, float]:
        out = self._run(["vcgencmd", "measure_temp"], COMMAND_TIMEOUT_S)
        value = parse_measure_temp(out) if out is not None else None
        return {self.sensor: value} if value is not None else {}

    def throttle_bits(self) -> Optional[int]:
        if not self.has_throttled:
            return None
        out = self._run(["vcgencmd", "get_throttled"], COMMAND_TIMEOUT_S)
        return parse_get_throttled(out) if out is not None else None


# ---------------------------------------------------------------------------------------------- monitor
@dataclass
class ThermalSample:
    t_s: float
    mark: str                      # "start", "wait", "window_start", "window", "end"
    temps_c: Dict[str, float]
    throttle: Dict[str, int]       # source name -> raw throttle bits


def throttle_reasons(samples: Sequence[ThermalSample], trips: Dict[str, List[Trip]], primary: str,
                     drift: Optional[Tuple[float, float]] = None, rise_c: float = RISE_C) -> List[str]:
    """Why the job counts as throttled (empty: it does not).

    - throttle bits for slowing the chip (arm frequency capped, currently throttled, soft temperature limit)
      set in any sample, or their "has occurred" bits newly set since the first sample;
    - any sensor at or over one of its passive/hot/critical trip points in any sample;
    - the latency median drifted up by more than ``timing.DRIFT_WARN`` between the first and last third of the
      timed window (``drift``: the two medians) while the primary sensor rose by ``rise_c`` or more over it.
    """
    reasons = []
    for src in sorted({s for sample in samples for s in sample.throttle}):
        values = [sample.throttle[src] for sample in samples if src in sample.throttle]
        now = 0
        for v in values:
            now |= v & THROTTLING_NOW
        if now:
            reasons.append("%s: %s" % (src, ", ".join(describe_throttled(now))))
        new = values[-1] & ~values[0] & THROTTLING_OCCURRED
        if new:
            reasons.append("%s: %s since the job started" % (src, ", ".join(describe_throttled(new))))
    for sensor in sorted(trips):
        seen = [sample.temps_c[sensor] for sample in samples if sensor in sample.temps_c]
        crossed = [t for t in trips[sensor] if t.type in THROTTLE_TRIP_TYPES and seen and max(seen) >= t.temp_c]
        if crossed:
            t = min(crossed, key=lambda trip: trip.temp_c)
            reasons.append("%s reached %g °C, at or over its %s trip point %s (%g °C)"
                           % (sensor, max(seen), t.type, t.name, t.temp_c))
    if drift is not None and drift[0] > 0 and (drift[1] - drift[0]) / drift[0] > DRIFT_WARN:
        begin = [s.temps_c[primary] for s in samples if s.mark == "window_start" and primary in s.temps_c]
        end = [s.temps_c[primary] for s in samples if s.mark == "end" and primary in s.temps_c]
        if begin and end and end[-1] - begin[0] >= rise_c:
            reasons.append("latency rose %+.0f%% over the timed window while %s warmed %.1f °C (%g -> %g °C)"
                           % (100.0 * (drift[1] - drift[0]) / drift[0], primary, end[-1] - begin[0], begin[0],
                              end[-1]))
    return reasons


class ThermalMonitor:
    """Every thermal source found on the device, sampled at the job's marks (and in the background during the
    timed window); :meth:`result` turns the samples into the report's thermal section."""

    def __init__(self, sources: List[ThermalSource], primary: str, clock: MonoClock = time.monotonic,
                 warnings: Optional[List[str]] = None) -> None:
        owner = [s for s in sources if primary in s.sensors()]
        if not owner:
            raise ValueError("primary sensor %r is not one of the sources' sensors" % primary)
        self.sources, self.primary = sources, primary
        self.source = "%s:%s" % (owner[0].name, primary)
        self.warnings = list(warnings) if warnings is not None else []
        self.samples: List[ThermalSample] = []
        self.wait: Optional[Dict[str, Any]] = None
        self.interval_s: Optional[float] = None
        self._clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def sensors(self) -> List[str]:
        return [name for s in self.sources for name in s.sensors()]

    def trips(self) -> Dict[str, List[Trip]]:
        out: Dict[str, List[Trip]] = {}
        for s in self.sources:
            out.update(s.trips())
        return out

    def sample(self, mark: str = "") -> Optional[float]:
        """Read every source once; the primary sensor's °C, or None if it did not answer."""
        temps: Dict[str, float] = {}
        throttle: Dict[str, int] = {}
        for src in self.sources:
            temps.update(src.read())
            bits = src.throttle_bits()
            if bits is not None:
                throttle[src.name] = bits
        with self._lock:
            self.samples.append(ThermalSample(self._clock(), mark, temps, throttle))
        return temps.get(self.primary)

    def start_background(self, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), name="thermal", daemon=True)
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            self.sample("window")

    def stop_background(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait_to_cool(self, target_c: float, timeout_s: float, poll_s: float = POLL_S,
                     sleep: Callable[[float], None] = time.sleep) -> Dict[str, Any]:
        """Sample every ``poll_s`` until the primary sensor is below ``target_c`` or ``timeout_s`` has passed."""
        t0 = self._clock()
        first = current = self.sample("wait")
        while (current is None or current >= target_c) and self._clock() - t0 < timeout_s:
            sleep(max(0.0, min(poll_s, timeout_s - (self._clock() - t0))))
            current = self.sample("wait")
        self.wait = {"target_c": target_c, "timeout_s": timeout_s, "waited_s": self._clock() - t0,
                     "reached": current is not None and current < target_c, "start_c": first, "end_c": current}
        return dict(self.wait)

    def result(self, drift: Optional[Tuple[float, float]] = None) -> Tuple[ThermalResult, List[str]]:
        """The report's thermal section and its warnings (throttling, under-voltage, a wait that timed out)."""
        with self._lock:
            samples = list(self.samples)
        per_sensor: Dict[str, Dict[str, float]] = {}
        for name in self.sensors():
            seen = [s.temps_c[name] for s in samples if name in s.temps_c]
            if seen:
                per_sensor[name] = {"start_c": seen[0], "end_c": seen[-1], "max_c": max(seen)}
        trips = self.trips()
        reasons = throttle_reasons(samples, trips, self.primary, drift)
        mine = per_sensor.get(self.primary, {})
        window = [s.temps_c[self.primary] for s in samples if s.mark == "window_start" and self.primary in s.temps_c]
        details: Dict[str, Any] = {
            "sensors": per_sensor,
            "trip_points_c": {k: {t.name: {"type": t.type, "temp_c": t.temp_c} for t in v} for k, v in trips.items()},
            "samples": len(samples), "sample_interval_s": self.interval_s,
            "window_start_c": window[0] if window else None,
            "throttle_reasons": reasons,
        }
        warnings = list(self.warnings)
        bits = {src: [s.throttle[src] for s in samples if src in s.throttle]
                for src in sorted({k for s in samples for k in s.throttle})}
        if bits:
            details["throttle_bits"] = {src: {"first": hex(v[0]), "last": hex(v[-1]),
                                              "decoded_last": decode_throttled(v[-1])} for src, v in bits.items()}
            under = [src for src, v in bits.items()
                     if any(x & UNDER_VOLTAGE_NOW for x in v) or v[-1] & ~v[0] & UNDER_VOLTAGE_OCCURRED]
            if under:
                warnings.append("under-voltage reported by %s during the job: the power supply sags, which "
                                "throttles the chip and makes latency and power unrepresentative" % ", ".join(under))
        if self.wait is not None:
            details["wait_to_cool"] = dict(self.wait)
        if reasons:
            warnings.append("thermal throttling detected (%s): latency and power may not represent the device's "
                            "unthrottled performance" % "; ".join(reasons))
        return ThermalResult(source=self.source, start_c=mine.get("start_c"), end_c=mine.get("end_c"),
                             max_c=mine.get("max_c"), throttled=bool(reasons), details=details), warnings


# ------------------------------------------------------------------------------------------- discovery
SOURCE_ORDER = ("thermal_zone", "vcgencmd", "apex")  # the first found provides the default primary sensor
PREFERRED_ZONES = ("cpu-thermal", "cpu_thermal", "cpu-therm", "x86_pkg_temp", "soc_thermal", "soc-thermal")


def _default_primary(sources: List[ThermalSource]) -> str:
    names = sources[0].sensors()
    lowered = {n.lower(): n for n in names}
    for preferred in PREFERRED_ZONES:
        if preferred in lowered:
            return lowered[preferred]
    cpu = [n for n in names if "cpu" in n.lower()]
    return cpu[0] if cpu else names[0]


def discover(root: str = "/", spec: Optional[ThermalSpec] = None, run: Run = run_command,
             clock: MonoClock = time.monotonic) -> Optional[ThermalMonitor]:
    """Every thermal source under ``root`` (sysfs at ``<root>/sys``) in one monitor; None when there is none."""
    sys_root = os.path.join(root, "sys")
    order = list(SOURCE_ORDER) + [n for n in source_names() if n not in SOURCE_ORDER]
    sources: List[ThermalSource] = []
    for name in order:
        cls = source_class(name)
        try:
            found = cls.discover(sys_root, run)
        except (OSError, ValueError) as e:
            log.info("thermal source %r: discovery failed: %s", name, e)
            continue
        if found is not None and found.sensors():
            sources.append(found)
    if not sources:
        log.info("no thermal source found (looked for %s)", "; ".join(source_class(n).where for n in order))
        return None
    warnings = []
    primary = None
    if spec is not None and spec.zone is not None:
        for src in sources:
            if spec.zone in src.sensors():
                primary = spec.zone
            elif spec.zone in src.aliases():
                primary = src.aliases()[spec.zone]
            if primary is not None:
                break
        if primary is None:
            fallback = _default_primary(sources)
            warnings.append("thermal.zone %r not found on this device (it has: %s); reporting %s instead"
                            % (spec.zone, ", ".join(n for s in sources for n in s.sensors()), fallback))
            primary = fallback
    return ThermalMonitor(sources, primary or _default_primary(sources), clock, warnings)
