"""Jetson power rails, shared by the ``ina3221`` and ``tegrastats`` sensors: which rails make up the board's total
(:func:`total_rails`: the input rail when there is one, else the sum of the rails less those included in another),
the rails a job asks for, and per-rail means.

Contract: pure functions over rail names and readings, no I/O; the rail names are NVIDIA's, as quoted below.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from agent import SensorError


# The rail that measures the whole module's input, when the board has one: the other rails are parts of it
# (NVIDIA: "POM_5V_IN ... represents the total power consumption"; Orin Nano/NX and Xavier NX: VDD_IN).
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# Rails already counted inside another rail (Jetson AGX Orin: VDDQ_VDD2_1V8AO is included in VIN_SYS_5V0).
INCLUDED_IN = {"VDDQ_VDD2_1V8AO": "VIN_SYS_5V0"}


def total_rails(rails: Sequence[str]) -> Tuple[List[str], str]:
    """Which of ``rails`` make up the total, and the rule, for the report: the input rail when present, else
    the sum of the rails less those already included in another one."""
    for name in INPUT_RAILS:
        if name in rails:
            return [name], "input rail %s" % name
    summed = [r for r in rails if not (r in INCLUDED_IN and INCLUDED_IN[r] in rails)]
    return summed, "sum of rails " + " + ".join(summed)


def _choose_rails(found: Sequence[str], wanted: Optional[List[str]]) -> List[str]:
    if wanted is None:
        return list(found)
    missing = [r for r in wanted if r not in found]
    if missing:
        raise SensorError("power.options.rails: rail %r not found (this device has: %s)"
                          % (missing[0], ", ".join(found) or "none"))
    return list(wanted)


def _summarise_rails(readings: List[Tuple[int, Any]], rails: Sequence[str], unit: str,
                     scale_to_w: float) -> Tuple[float, Dict[str, Any]]:
    """Mean of per-sample totals (each a dict rail -> value in ``unit``) in watts, and per-rail means."""
    totals, rule = total_rails(rails)
    means = {r: sum(v[r] for _, v in readings) / len(readings) for r in rails}
    per_sample = [sum(v[r] for r in totals) for _, v in readings]
    mean_w = sum(per_sample) / len(per_sample) * scale_to_w
    return mean_w, {"rails": list(rails), "rails_mean_" + unit: means, "total": rule, "total_rails": totals}
