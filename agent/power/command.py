"""Power sensor ``command`` [command, mode, timeout_s]: an external meter. ``command`` is an argv list (never a shell
string) run once per sample; it prints watts (``mode: "power"``, the default) or cumulative joules
(``mode: "energy"``), a number with an optional unit (:func:`parse_meter_output`).

Tested with stand-in meter programs; not run with a real meter.
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Dict, List, Optional, Tuple

from agent import SensorError
from agent.power.base import Clock, PowerSensor, _argv_option, _found, _number_option, _options, _run_argv
from agent.schema import PowerSpec


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


class CommandSensor(PowerSensor):
    """An external meter program, run once per sample: it prints watts, or cumulative joules in energy mode."""

    name = "command"

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
