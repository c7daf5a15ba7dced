"""Power sensor ``rpi5`` [command, timeout_s]: Raspberry Pi 5 PMIC rails from ``vcgencmd pmic_read_adc``, run once
per sample and parsed by :func:`parse_pmic_read_adc`; the total is the sum of V * I over the rails that report both.

The parser is tested on captured real ``pmic_read_adc`` output from two Pi 5 firmwares (sources in
``tests/agent/data/README.md``); the sensor is tested with a stand-in program. Not run on the hardware.
"""
from __future__ import annotations

import logging
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from agent import SensorError
from agent.power.base import Clock, PowerSensor, _argv_option, _found, _number_option, _options, _run_argv
from agent.schema import PowerSpec

log = logging.getLogger(__name__)


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


class Rpi5PmicSensor(PowerSensor):
    """Raspberry Pi 5 PMIC: every sample runs ``vcgencmd pmic_read_adc``; total = sum over rails of V * I."""

    name = "rpi5"

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
