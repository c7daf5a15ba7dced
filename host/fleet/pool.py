"""One transport per device for a whole host run, and so one agent session per device: every candidate of a demo,
a search or a sensitivity analysis reuses it (:func:`host.fleet.runner.run_on_device` takes a ``pool``).

A transport whose session died is not replaced here: the transport itself opens a new session for its next
request. :meth:`TransportPool.close` ends every session (``bye``) at the end of the run.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict

from host.fleet.devices import DeviceConfig


class TransportPool:
    def __init__(self, factory: Callable[[DeviceConfig], Any]) -> None:
        self.factory = factory
        self._transports: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def get(self, dev: DeviceConfig) -> Any:
        """The device's transport, made on first use."""
        with self._lock:
            t = self._transports.get(dev.id)
            if t is None:
                t = self._transports[dev.id] = self.factory(dev)
            return t

    def close(self) -> None:
        with self._lock:
            transports, self._transports = list(self._transports.values()), {}
        for t in transports:
            t.close()

    def __enter__(self) -> "TransportPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
