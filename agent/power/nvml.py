"""Power sensor ``nvml`` [device_index]: the NVIDIA GPU energy counter ``nvmlDeviceGetTotalEnergyConsumption`` (mJ;
Volta and newer) through ``pynvml``, imported only here; the mean is the counter's delta over the window.

Written against the NVML documentation; tested with a fake ``pynvml``. Never run: no GPU was available to this work.
"""
from __future__ import annotations

import importlib
import logging
import time
from typing import Any, Dict, List, Optional, Tuple

from agent import SensorError
from agent.power.base import Clock, PowerSensor, PowerWindow, _options
from agent.schema import PowerSpec

log = logging.getLogger(__name__)


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class NvmlSensor(PowerSensor):
    """NVIDIA GPU energy counter (mJ since the driver loaded, Volta and newer); mean = delta / window."""

    name = "nvml"

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
