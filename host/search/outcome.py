"""What a search concludes and how it reads: :class:`DeviceResult` per device, :class:`SearchResult` per run, the
rows of ``pareto.csv`` / ``summary.csv`` (their columns, the Pareto fronts, the closest candidate's ranking), the
progress texts, and :func:`result_document` (``edgeprune search --json``).

Pure functions over the evaluation records (:mod:`host.search.state`); numbers read through :mod:`host.fmt`.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from host.fmt import fixed, number, pct
from host.search.algos.base import Candidate, DeviceMeasurement
from host.search.options import EVALUATIONS, ROW_METRICS
from host.search.state import EvaluationLog

@dataclass
class DeviceResult:
    device_id: str
    verdict: str                      # "met" | "infeasible" | "error"
    reason: str
    targets: str
    bounds: Optional[Dict[str, Any]]
    chosen: Optional[Dict[str, Any]]  # the chosen row (met), or None
    closest: Optional[Dict[str, Any]]  # infeasible: the closest candidate's row
    device_evals: int
    new_device_evals: int             # measured in this process (not served from the log)
    host_evals: int
    lut_jobs: int
    rows: List[Dict[str, Any]]
    folder: Optional[str] = None      # chosen/ or closest/, relative to the run folder
    round_to: int = 1
    accuracy_metric: str = "top1"     # what candidates were ranked by: top1, agreement (unlabelled data) or snr_db
    selection_split: str = ""         # the split candidates were compared and chosen on (name, images)
    holdout: Optional[Dict[str, Any]] = None   # the pick re-checked on the hold-out split (host.search.holdout)
    final: Optional[Dict[str, Any]] = None     # the pick timed in repetitions (host.search.final)


@dataclass
class SearchResult:
    run_id: str
    out: Path
    algo: str
    devices: List[DeviceResult]
    seconds: float

    @property
    def all_met(self) -> bool:
        return all(d.verdict == "met" for d in self.devices)


PARETO_COLUMNS = ["key", "ratio", "pruned_fraction", "recovery", "recovery_s", "images_seen", "recovery_precision",
                  "macs", *ROW_METRICS, "dense_p50_beside_ms", "power_source", "drop_pp",
                  "meets", "meets_resources", "violation", "resource_violation", "front_latency", "front_energy",
                  "note", "artifact_sha256"]
SUMMARY_COLUMNS = ["device", "verdict", "targets", "latency_p50_ms", "latency_p90_ms", "energy_mj", "power_w",
                   "top1", "agreement", "snr_db", "drop_pp", "accuracy_metric", "selection_split", "holdout_split",
                   "holdout_top1", "holdout_drop_pp", "test_top1", "test_drop_pp", "final_p50_ms", "final_runs",
                   "final_run_spread", "device_evals", "host_evals",
                   "lut_jobs", "folder", "reason"]


def finite(x: float) -> float:
    """``x`` rounded for a row, or 1e9 (a violation too large to matter) when it is not a finite number."""
    v = number(x)
    return round(v, 4) if v is not None else 1e9


def quality(row: Mapping[str, Any], metric: str) -> float:
    """The row's accuracy metric for ranking; -inf when it was not measured."""
    v = number(row.get(metric))
    return v if v is not None else -math.inf


def mark_fronts(rows: List[Dict[str, Any]], acc: str = "top1") -> None:
    """Mark the non-dominated rows: lower cost and higher accuracy (``acc``: top1, or agreement/snr_db on unlabelled
    data), for latency p50 and for energy per inference."""
    for metric, flag in (("latency_p50_ms", "front_latency"), ("energy_mj", "front_energy")):
        for r in rows:
            r[flag] = False
        pts = [r for r in rows if r.get(metric) is not None and r.get(acc) is not None]
        best = -math.inf
        for r in sorted(pts, key=lambda r: (r[metric], -r[acc])):
            if r[acc] > best:
                r[flag], best = True, r[acc]


def to_csv(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def result_dict(r: DeviceResult) -> Dict[str, Any]:
    d = asdict(r)
    d.pop("rows")
    return d


def summary_row(r: DeviceResult) -> Dict[str, Any]:
    pick = r.chosen or r.closest or {}
    return {"device": r.device_id, "verdict": r.verdict, "targets": r.targets,
            **{k: pick.get(k) for k in ("latency_p50_ms", "latency_p90_ms", "energy_mj", "power_w", "top1",
                                        "agreement", "snr_db", "drop_pp")},
            "accuracy_metric": r.accuracy_metric, "selection_split": r.selection_split,
            **{f"holdout_{k}": (r.holdout or {}).get(k) for k in ("split", "top1", "drop_pp")},
            **{k: (r.holdout or {}).get(k) for k in ("test_top1", "test_drop_pp")},
            "final_p50_ms": (r.final or {}).get("latency_p50_ms"), "final_runs": (r.final or {}).get("repetitions"),
            "final_run_spread": (r.final or {}).get("run_spread"),
            "device_evals": r.device_evals, "host_evals": r.host_evals, "lut_jobs": r.lut_jobs,
            "folder": r.folder or "", "reason": r.reason}


def cand_dict(c: Candidate) -> Dict[str, Any]:
    return {"kept": dict(c.kept), "recovery": c.recovery, "ratio": c.ratio, "note": c.note}


def cand_text(c: Candidate) -> str:
    if c.dense:
        return "dense"
    return f"ratio {fixed(c.ratio)}" + (f" ({c.note})" if c.note else "") + f", recovery {c.recovery}"


def metrics_text(m: Mapping[str, float]) -> str:
    parts = []
    if "latency_p50_ms" in m:
        parts.append(f"p50 {fixed(m['latency_p50_ms'])} ms")
    if "energy_mj" in m:
        parts.append(f"{fixed(m['energy_mj'])} mJ")
    if "top1" in m:
        parts.append(f"top-1 {pct(m['top1'])}")
    if "agreement" in m:
        parts.append(f"agreement {pct(m['agreement'])}")
    if "snr_db" in m and "top1" not in m:
        parts.append(f"SNR {fixed(m['snr_db'], '.1f')} dB")
    return ", ".join(parts)


def measurement_of(rec: Mapping[str, Any], cached: bool = False) -> DeviceMeasurement:
    """A stored device evaluation as the algorithms receive it."""
    return DeviceMeasurement(True, dict(rec["metrics"]), None, str(rec["key"]), str(rec.get("artifact_sha256", "")),
                             str(rec.get("plan_sha256", "")), cached)


JSON_METRICS = ("top1", "top5", "agreement", "snr_db", "latency_p50_ms", "latency_p90_ms", "throughput_ips",
                "power_w", "energy_mj", "memory_mb")


def result_document(res: SearchResult) -> Dict[str, Any]:
    """The search's outcome as one JSON-able document (``edgeprune search --json``): per device the chosen candidate
    (or, when the targets were not met, the closest), its MACs, parameters, artifact files (paths under the run
    folder's ``<device>/chosen|closest/``), the metrics measured on the device and whether the targets are met."""
    log = EvaluationLog(Path(res.out) / EVALUATIONS)
    devices = []
    for r in res.devices:
        pick = r.chosen or r.closest
        cand: Optional[Dict[str, Any]] = None
        if pick is not None:
            rec = log.get("device", r.device_id, pick["key"]) or {}
            folder = Path(res.out) / r.folder if r.folder else None
            files = [str(folder / f) for f in rec.get("artifact_files", [])] if folder is not None else []
            cand = {"key": pick["key"], "ratio": pick.get("ratio"), "pruned_fraction": pick.get("pruned_fraction"),
                    "recovery": pick.get("recovery"), "macs": rec.get("macs", pick.get("macs")),
                    "macs_counted": rec.get("macs_counted"), "params": rec.get("params"),
                    "folder": str(folder) if folder is not None else None,
                    "artifact": str(folder / rec["artifact"]) if folder is not None and rec.get("artifact") else None,
                    "artifact_files": files,
                    "manifest": str(folder / rec["manifest"]) if folder is not None and rec.get("manifest") else None,
                    "artifact_sha256": rec.get("artifact_sha256"), "plan_sha256": rec.get("plan_sha256"),
                    "metrics": {k: pick.get(k) for k in JSON_METRICS}, "drop_pp": pick.get("drop_pp"),
                    "meets": bool(pick.get("meets")), "meets_resources": bool(pick.get("meets_resources"))}
        devices.append({"device": r.device_id, "verdict": r.verdict, "targets_met": r.verdict == "met",
                        "targets": r.targets, "bounds": r.bounds, "accuracy_metric": r.accuracy_metric,
                        "selection_split": r.selection_split, "holdout": r.holdout,
                        "final": r.final, "reason": r.reason, "device_evals": r.device_evals,
                        "host_evals": r.host_evals,
                        "candidate_kind": "chosen" if r.chosen else "closest" if r.closest else None,
                        "candidate": cand})
    return {"run_id": res.run_id, "algo": res.algo, "out": str(res.out), "all_met": res.all_met,
            "summary_csv": str(Path(res.out) / "summary.csv"), "evaluations": str(Path(res.out) / EVALUATIONS),
            "devices": devices}
