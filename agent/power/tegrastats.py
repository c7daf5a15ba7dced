"""Power sensor ``tegrastats`` [command, interval_ms, rails]: the fallback on Jetsons whose sysfs is not readable.
Runs ``tegrastats --interval N`` for the window; each line it prints is one sample, parsed by
:func:`parse_tegrastats`. The total follows :func:`agent.power.rails.total_rails`.

The parser is tested on captured real tegrastats lines (JetPack 4 Nano and TX2, JetPack 4.2 AGX Xavier, a 2018
TX2) and on one assembled, NOT captured JetPack 6 line (sources in ``tests/agent/data/README.md``); the sensor is
tested with a stand-in program. Not run on the hardware.
"""
from __future__ import annotations

import re
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import psutil

from agent import SensorError
from agent.power.base import (Clock, PowerSensor, PowerWindow, _argv_option, _found, _number_option, _options,
                              _rails_option)
from agent.power.rails import _choose_rails, _summarise_rails
from agent.schema import PowerSpec


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


class TegrastatsSensor(PowerSensor):
    """``tegrastats --interval N`` runs for the window; each line it prints is one sample (its own clock)."""

    name = "tegrastats"

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
