"""Power sensors: discover once, read many.

A sensor class is registered under the name a job uses in ``power.sensor``. ``discover(spec, sys_root)``
returns a ready sensor, or ``None`` when the hardware is not there (the runner then warns and reports no
power; it never fails the job for a missing sensor). A sensor is read in a background thread at
``sample_hz`` during the timed window only: ``start()`` when the window opens, ``stop()`` when it closes.

Sensors here:

- ``model``: an estimate, not a measurement. P = idle_w + (max_w - idle_w) * u, with u this process's CPU
  utilisation over the window divided by the number of CPUs it may run on. idle_w/max_w come from the job.
- ``rapl``: Intel/AMD RAPL package energy counters under ``<sys_root>/class/powercap/intel-rapl:N``.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

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


class PowerSensor:
    """Base: a sampling thread calls :meth:`sample`; subclasses implement ``_read`` and ``_summarise``."""

    name = ""
    modelled = False
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
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional["PowerSensor"]:
        raise NotImplementedError

    def _read(self) -> Any:
        raise NotImplementedError

    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        """Mean watts over the readings, and details for the report."""
        raise NotImplementedError

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


# ------------------------------------------------------------------------------------------------- model
@register_sensor("model")
class ModelSensor(PowerSensor):
    modelled = True
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


def available_sensors(sys_root: str = "/sys") -> List[str]:
    """Names of hardware sensors present here (``model`` is always possible and not listed)."""
    found = []
    probe_spec = PowerSpec(sensor="", idle_w=0.0, max_w=0.0)
    for name in sensor_names():
        if name == "model":
            continue
        try:
            if _SENSORS.lookup(name).discover(probe_spec, sys_root) is not None:
                found.append(name)
        except (SensorError, OSError, ValueError) as e:
            log.info("power sensor %r: discovery failed: %s", name, e)
    return found

