"""What every power sensor shares: :class:`PowerSensor` (discovered once; sampled in a background thread during the
timed window only: ``start()`` when the window opens, ``stop()`` when it closes), :class:`PowerWindow` (what a
sensor saw over one window, with its sample count and the share of the window the sampling itself took),
:func:`to_result` and :func:`energy_mj_per_inference` (energy over the timed window / inferences), and the
``power.options`` checkers and the argv runner the sensors use.

Contract: a sensor's ``discover`` returns a ready sensor, ``None`` when its hardware is absent, or raises
:class:`~agent.SensorError` when misconfigured. Imports the agent's errors and schema only (never
:mod:`agent.power` itself, which imports this module).
"""
from __future__ import annotations

import abc
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from agent import SensorError
from agent.schema import PowerResult, PowerSpec


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


class PowerSensor(abc.ABC):
    """Base: a sampling thread calls :meth:`sample`; subclasses implement ``_read`` and ``_summarise``."""

    name = ""
    modelled = False
    needs_config = False  # True: usable only when the job configures it, so never listed by available_sensors()
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
    @abc.abstractmethod
    def discover(cls, spec: PowerSpec, sys_root: str = "/sys") -> Optional["PowerSensor"]:
        ...

    def _read(self) -> Any:
        """One reading, for sensors sampled by the base class's thread. Sensors that receive readings instead
        (tegrastats streams lines) override ``start`` and never get here."""
        raise SensorError("power sensor %r takes no polled readings" % self.name)

    @abc.abstractmethod
    def _summarise(self, readings: List[Tuple[int, Any]]) -> Tuple[float, Dict[str, Any]]:
        """Mean watts over the readings, and details for the report."""
        ...

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
        return self._window()

    def _window(self) -> PowerWindow:
        window_ns = self._readings[-1][0] - self._readings[0][0]
        mean_w, details = self._summarise(self._readings)
        return PowerWindow(source=self.name, modelled=self.modelled, sample_hz=self.sample_hz,
                           samples=len(self._readings), mean_w=mean_w, window_s=window_ns / 1e9,
                           overhead_pct=100.0 * self._read_ns / window_ns if window_ns > 0 else 0.0,
                           details=details)


# ----------------------------------------------------------------------------------------------- options
def _options(spec: PowerSpec, sensor: str, known: Sequence[str]) -> Dict[str, Any]:
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        raise SensorError("power.options.%s: unknown option for the %s sensor (knows: %s)"
                          % (unknown[0], sensor, ", ".join(known)))
    return spec.options


def _argv_option(options: Dict[str, Any], default: Optional[List[str]]) -> List[str]:
    """``options.command`` as an argv list; a shell string is refused (it would need a shell to split it)."""
    argv = options.get("command", default)
    if argv is None:
        raise SensorError("power.options.command is required: the meter program and its arguments as a list, "
                          "e.g. [\"/usr/local/bin/meter\", \"--once\"]")
    if isinstance(argv, str):
        raise SensorError("power.options.command must be a list of arguments (argv), not a shell string: %r; "
                          "write it as e.g. [\"/usr/local/bin/meter\", \"--once\"] (no shell is used)" % argv)
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and a for a in argv):
        raise SensorError("power.options.command must be a non-empty list of non-empty strings")
    return list(argv)


def _number_option(options: Dict[str, Any], key: str, default: float, minimum: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise SensorError("power.options.%s must be a number >= %g" % (key, minimum))
    return float(value)


def _rails_option(options: Dict[str, Any]) -> Optional[List[str]]:
    rails = options.get("rails")
    if rails is None:
        return None
    if not isinstance(rails, list) or not rails or not all(isinstance(r, str) for r in rails):
        raise SensorError("power.options.rails must be a non-empty list of rail names, e.g. [\"VDD_IN\"]")
    return list(rails)


def _found(argv: Sequence[str]) -> bool:
    return shutil.which(argv[0]) is not None


def _run_argv(argv: Sequence[str], timeout_s: float) -> str:
    """Run ``argv`` (no shell) and return its stdout; SensorError when it cannot run, fails or times out."""
    try:
        done = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout_s,
                              check=False, universal_newlines=True)
    except subprocess.TimeoutExpired:
        raise SensorError("%s did not finish within %g s" % (argv[0], timeout_s)) from None
    except OSError as e:
        raise SensorError("cannot run %s: %s" % (argv[0], e)) from None
    if done.returncode != 0:
        raise SensorError("%s exited with status %d: %s"
                          % (argv[0], done.returncode, (done.stderr or done.stdout).strip()[:200]))
    return done.stdout
