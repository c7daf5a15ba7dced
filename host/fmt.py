"""How numbers read in every table the host prints or writes (CLI tables, HTML report, regression verdicts).

One place for the missing-value mark and the few formats, so that a value reads the same in the terminal, the
report and the gate's summary. Pure functions, no imports from the rest of the project: every room may use it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

NA = "—"
"""What a table shows where a value is missing (not measured, not applicable, not finite)."""
# under an emulated device's latency, throughput, power and energy in the CLI's tables (agent.emulation)
EMULATED_FOOTNOTE = ("† emulated — not a device measurement: that device runs under user-mode emulation (qemu-user); "
                     "its top-1 and agreement are real.")


def number(x: Any, *, parse: bool = True) -> Optional[float]:
    """``x`` as a finite float (numbers and numeric strings), or None for anything else (None, bools, NaN, ±inf).
    ``parse=False``: only an ``int`` or ``float`` counts (a numeric string is None too), for values that must already
    be numbers (a stored report's fields)."""
    if isinstance(x, bool) or x is None:
        return None
    if not parse and not isinstance(x, (int, float)):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fixed(x: Any, spec: str = ".3f") -> str:
    """``format(x, spec)`` for a finite number, :data:`NA` otherwise."""
    v = number(x)
    return NA if v is None else format(v, spec)


def pct(x: Any, digits: int = 2) -> str:
    """A fraction as a percentage: ``0.923`` → ``92.30%``; :data:`NA` when missing."""
    return fixed(x, f".{digits}%")


def change(ratio_minus_one: Any, digits: int = 1) -> str:
    """A relative change with its sign: ``0.056`` → ``+5.6%``; :data:`NA` when missing."""
    v = number(ratio_minus_one)
    return NA if v is None else f"{v * 100:+.{digits}f}%"


def field(row: Mapping[str, Any], key: str, spec: str = ".3f") -> str:
    """``row[key]`` formatted with ``spec``, :data:`NA` when absent or not a number."""
    return fixed(row.get(key), spec)
