"""Power sensor ``ina3221`` [rails]: the INA3221 monitors on NVIDIA Jetson boards, read from sysfs: hwmon
(``bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in<N>_label``, ``in<N>_input`` mV, ``curr<N>_input`` mA; JetPack 5 and
later) first, else iio (``bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_<N>``, ``in_power<N>_input`` mW;
JetPack 4 and earlier). Rails are found by label; the total follows :func:`agent.power.rails.total_rails`.

Written against the kernel's ``Documentation/hwmon/ina3221.rst`` and published Jetson layouts (sources in
``tests/agent/data/README.md``). Tested on fake sysfs trees built from those layouts, with test values, not
captures: not run on the hardware.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from agent.power.base import Clock, PowerSensor, _options, _rails_option
from agent.power.rails import _choose_rails, _summarise_rails
from agent.schema import PowerSpec
from agent.sysfs import read_text

log = logging.getLogger(__name__)


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
    text = read_text(path)
    return text is not None and re.match(r"^-?\d+$", text) is not None


def find_ina3221_hwmon(sys_root: str) -> List[Ina3221Rail]:
    """JetPack 5+: ``bus/i2c/drivers/ina3221/<bus>-<addr>/hwmon/hwmon*/in<N>_label`` + ``in<N>_input`` (mV) +
    ``curr<N>_input`` (mA). Channels without a current file (``in7``, the sum of shunt voltages) or labelled
    ``NC`` (not connected) are skipped."""
    rails: List[Ina3221Rail] = []
    for hwmon in sorted((Path(sys_root) / "bus" / "i2c" / "drivers" / "ina3221").glob("*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            n = label_file.name[2:-len("_label")]
            label = read_text(label_file)
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
            label = read_text(name_file)
            if not label or label == "NC":
                continue
            power = dev / ("in_power%s_input" % n)
            volt, curr = dev / ("in_voltage%s_input" % n), dev / ("in_current%s_input" % n)
            if _readable_int(power):
                rails.append(Ina3221Rail(label, power_mw=power))
            elif _readable_int(volt) and _readable_int(curr):
                rails.append(Ina3221Rail(label, voltage_mv=volt, current_ma=curr))
    return rails


class Ina3221Sensor(PowerSensor):
    """Jetson on-module power monitors, each sample one read of every chosen rail (mW)."""

    name = "ina3221"

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
