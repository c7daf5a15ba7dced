"""The gate's settings as written on a command line (``5%``, ``0.5pp``, ``0.99``, ``30dB``) and their checks.

Contract: each parser takes the text and the argument's name, returns the value in the unit :func:`.checks.compare`
takes (a fraction, percentage points, decibels), and raises :class:`~edgeprune.errors.UsageError` naming the
argument for anything else.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

from edgeprune.errors import UsageError


_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"


def parse_percent(text: Any, arg: str) -> float:
    """``5%`` or ``5`` (a bare number is percent) -> 0.05. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(%)?", s)
    if m is None:
        raise UsageError(f"{arg}: expected a percentage such as 5% (or 5, meaning 5%), got {text!r}")
    v = float(m.group(1))
    if not math.isfinite(v):
        raise UsageError(f"{arg}: {text!r} is not a finite percentage")
    return v / 100.0


def parse_pp(text: Any, arg: str) -> float:
    """``0.5pp`` or ``0.5`` (a bare number is percentage points) -> 0.5. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    if s.endswith("%"):
        raise UsageError(f"{arg}: give percentage points, such as 0.5pp (or 0.5): {text!r} is ambiguous between "
                         "a relative and an absolute change of top-1")
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(pp)?", s, flags=re.IGNORECASE)
    if m is None:
        raise UsageError(f"{arg}: expected percentage points such as 0.5pp (or 0.5), got {text!r}")
    v = float(m.group(1))
    if not math.isfinite(v):
        raise UsageError(f"{arg}: {text!r} is not a finite number of percentage points")
    return v


def parse_alpha(text: Any, arg: str = "--alpha") -> float:
    try:
        v = float(str(text).strip())
    except ValueError:
        raise UsageError(f"{arg}: expected a significance level between 0 and 1 (such as 0.01), got {text!r}") \
            from None
    if not (0.0 < v < 1.0):
        raise UsageError(f"{arg}: must be between 0 and 1 exclusive (such as 0.01), got {text!r}")
    return v


def parse_fraction(text: Any, arg: str = "--min-agreement") -> float:
    """``0.99`` or ``99%`` -> 0.99: a fraction in (0, 1]. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"(" + _NUMBER + r")\s*(%)?", s)
    v = float(m.group(1)) / (100.0 if m.group(3) else 1.0) if m else math.nan
    if not (math.isfinite(v) and 0.0 < v <= 1.0):
        raise UsageError(f"{arg}: expected a fraction in (0, 1] such as 0.99 (or a percentage such as 99%), "
                         f"got {text!r}")
    return v


def parse_db(text: Any, arg: str = "--min-snr-db") -> float:
    """``30``, ``30dB`` or ``-3.5 dB`` -> decibels. Bad values raise UsageError naming ``arg``."""
    s = str(text).strip()
    m = re.fullmatch(r"([-+]?" + _NUMBER + r")\s*(db)?", s, flags=re.IGNORECASE)
    v = float(m.group(1)) if m else math.nan
    if not math.isfinite(v):
        raise UsageError(f"{arg}: expected a signal-to-noise ratio in decibels such as 30 (or 30dB), got {text!r}")
    return v


def check_tolerance(v: float, arg: str) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
        raise UsageError(f"{arg}: must be a non-negative number, got {v!r}")
    return float(v)


def check_bound(v: Optional[float], arg: str, fraction: bool) -> Optional[float]:
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if fraction and not (ok and 0.0 < v <= 1.0):
        raise UsageError(f"{arg}: must be a fraction in (0, 1] such as 0.99, got {v!r}")
    if not ok:
        raise UsageError(f"{arg}: must be a finite number of decibels, got {v!r}")
    return float(v)
