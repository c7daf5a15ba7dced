"""Power sensor ``rapl``: Intel/AMD RAPL package energy counters (microjoules) under
``<sys_root>/class/powercap/intel-rapl:N``, summed over the package domains; wrap-around handled per interval.

Written against the Linux powercap sysfs interface. Tested on fake sysfs trees; not run on the hardware.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from agent.power.base import Clock, PowerSensor
from agent.schema import PowerSpec
from agent.sysfs import read_text


_RAPL_PACKAGE = re.compile(r"^intel-rapl:\d+$")


class RaplSensor(PowerSensor):
    """Package-domain energy counters (microjoules), summed over packages; wrap-around handled per interval."""

    name = "rapl"

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
            name = read_text(d / "name") or d.name
            if not name.startswith("package"):  # e.g. "psys" overlaps the packages; summing it double counts
                continue
            energy, top = d / "energy_uj", read_text(d / "max_energy_range_uj")
            if read_text(energy) is None or top is None or not top.isdigit():
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
