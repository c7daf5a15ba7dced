"""Power sensor ``model``: an estimate, not a measurement. P = idle_w + (max_w - idle_w) * u, with u this process's
CPU time over the window / wall time / the device's CPUs; idle_w and max_w come from the job.

Runs anywhere (``time.process_time`` and psutil's CPU count); verified here. An estimate by construction: its
results are always labelled ``model`` and ``modelled``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import psutil

from agent import SensorError
from agent.power.base import Clock, PowerSensor
from agent.schema import PowerSpec


class ModelSensor(PowerSensor):
    name = "model"
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
