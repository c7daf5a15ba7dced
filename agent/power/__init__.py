"""Power sensors: discover once, read many. The registry of the sensors a job names in ``power.sensor``, one module
per sensor.

A sensor is a :class:`~agent.power.base.PowerSensor` subclass in its own module here, whose class attribute ``name``
is the name it is registered under, plus one line in ``_MEMBERS`` below (``"mysensor":
"agent.power.mysensor:MySensor",``). :func:`sensor_names` imports no sensor module; :func:`sensor_class` imports the
named one (importlib, on its first lookup). Sensor modules take their base class and option helpers from
:mod:`agent.power.base` and never import this package's ``__init__``.

``discover(spec, sys_root)`` returns a ready sensor, or ``None`` when the hardware is not there (the runner then
warns and reports no power; it never fails the job for a missing sensor; one log line says where it looked). A
misconfigured sensor (bad ``power.options``) raises :class:`~agent.SensorError`. A sensor is read in a background
thread at ``sample_hz`` during the timed window only: ``start()`` when the window opens, ``stop()`` when it closes.
Every window records how many samples were taken and what share of the window the sampling itself took.

Sensors (``power.options`` keys in brackets):

- ``model`` (:mod:`~agent.power.model`): an estimate, not a measurement. P = idle_w + (max_w - idle_w) * u, with u
  this process's CPU utilisation over the window divided by the device's CPUs. idle_w/max_w come from the job.
- ``rapl`` (:mod:`~agent.power.rapl`): Intel/AMD RAPL package energy counters under
  ``<sys_root>/class/powercap/intel-rapl:N``.
- ``ina3221`` (:mod:`~agent.power.ina3221`) [rails]: the INA3221 monitors on NVIDIA Jetson boards, read from sysfs
  (hwmon on JetPack 5 and later, else iio on JetPack 4 and earlier). The total is the input rail (VDD_IN /
  POM_5V_IN) when there is one, else the sum of the rails (see :func:`agent.power.rails.total_rails`).
- ``tegrastats`` (:mod:`~agent.power.tegrastats`) [command, interval_ms, rails]: the fallback on Jetsons whose sysfs
  is not readable: runs ``tegrastats --interval N`` for the window and parses each line.
- ``rpi5`` (:mod:`~agent.power.rpi5`) [command, timeout_s]: Raspberry Pi 5 PMIC rails from ``vcgencmd
  pmic_read_adc``; the total is the sum of V * I over the rails that report both.
- ``nvml`` (:mod:`~agent.power.nvml`) [device_index]: NVIDIA GPU energy counter
  ``nvmlDeviceGetTotalEnergyConsumption`` (mJ; Volta and newer) through ``pynvml``; the mean is the counter's delta
  over the window.
- ``command`` (:mod:`~agent.power.command`) [command, mode, timeout_s]: an external meter, an argv list (never a
  shell string) run once per sample, printing watts (``mode: "power"``, the default) or cumulative joules
  (``mode: "energy"``).

Energy per inference is always energy over the timed window / inferences (:func:`energy_mj_per_inference`).
"""
from __future__ import annotations

import logging
from typing import List, Optional, Type

from agent import SensorError
from agent.power.base import Clock, PowerSensor, PowerWindow, energy_mj_per_inference, to_result
from agent.registry import LazyRegistry
from agent.schema import PowerSpec

__all__ = ["Clock", "PowerSensor", "PowerWindow", "available_sensors", "discover", "energy_mj_per_inference",
           "sensor_class", "sensor_names", "to_result"]

log = logging.getLogger(__name__)

# power.sensor -> "module:Class", one line per sensor
_MEMBERS = {
    "command": "agent.power.command:CommandSensor",
    "ina3221": "agent.power.ina3221:Ina3221Sensor",
    "model": "agent.power.model:ModelSensor",
    "nvml": "agent.power.nvml:NvmlSensor",
    "rapl": "agent.power.rapl:RaplSensor",
    "rpi5": "agent.power.rpi5:Rpi5PmicSensor",
    "tegrastats": "agent.power.tegrastats:TegrastatsSensor",
}

_SENSORS: "LazyRegistry[PowerSensor]" = LazyRegistry("power sensor", SensorError, _MEMBERS)


def sensor_names() -> List[str]:
    """The registered sensor names, sorted; imports no sensor module."""
    return _SENSORS.names()


def sensor_class(name: str) -> Type[PowerSensor]:
    """The sensor class registered as ``name`` (its module imported now); SensorError if unknown."""
    return _SENSORS.lookup(name)


def discover(spec: PowerSpec, sys_root: str = "/sys") -> Optional[PowerSensor]:
    """The sensor the job names, ready to start; None if its hardware is absent; SensorError if misconfigured."""
    sensor = sensor_class(spec.sensor).discover(spec, sys_root)
    if sensor is None:
        log.info("power sensor %r not found (%s)", spec.sensor, sensor_class(spec.sensor).where)
    return sensor


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
