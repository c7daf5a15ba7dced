"""The gate's verdicts as data: one :class:`Check` per metric of a pair, an :class:`Incomparable` per pair that
cannot be compared as it is, and the :class:`Comparison` holding them with its exit code.

Contract: plain dataclasses, no I/O; :meth:`Comparison.to_dict` is the JSON document (non-finite floats as null).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple


METRICS = ("latency", "energy", "accuracy", "agreement", "snr")


COMPARABLE = ("artifact_sha256", "runtime", "format", "batch_size")


FAILING = ("regression", "missing", "failed")


VERDICTS = ("pass", "improved", "regression", "inconclusive", "not measured", "missing", "failed", "incomparable")


ARROW = "→"


Identity = Tuple[str, Optional[str], str]


@dataclass
class Check:
    """One metric of one pair, judged."""
    device_id: str
    model: Optional[str]
    label: str
    metric: str                                   # latency | energy | accuracy | agreement | snr | result
    verdict: str                                  # one of VERDICTS
    message: str
    unit: str = ""                                # ms | mJ | top-1 | agreement | dB | ""
    baseline: Optional[float] = None              # median latency / energy, top-1 or agreement (fraction), SNR (dB)
    candidate: Optional[float] = None
    change: Optional[float] = None                # latency/energy: candidate/baseline - 1; accuracy, agreement: pp
                                                  # difference; snr: dB difference (agreement/snr: for reading)
    ci: Optional[Tuple[float, float]] = None      # bootstrap 95 % CI of the median ratio (candidate/baseline)
    p: Optional[float] = None                     # one-sided p that the candidate is slower / costs more
    p_faster: Optional[float] = None              # one-sided p that it is faster / costs less
    tol: Optional[float] = None                   # fraction (latency/energy) or pp (accuracy)
    bound: Optional[float] = None                 # agreement (fraction) / snr (dB): the candidate's minimum
    n_baseline: int = 0                           # samples (or runs, run-level) in the test; trials, for accuracy
    n_candidate: int = 0
    trials_baseline: int = 0
    trials_candidate: int = 0
    modelled: bool = False                        # energy from modelled power on either side
    rule: str = ""                                # latency over repetitions: what decided (host.results.regress.runs)
    noise_floor: Optional[float] = None           # latency over repetitions: the noise floor it had to exceed
    notes: List[str] = field(default_factory=list)
    changes: List[str] = field(default_factory=list)       # environment changes of the pair
    differences: List[str] = field(default_factory=list)   # comparability differences (--compare-anyway)

    @property
    def failed(self) -> bool:
        return self.verdict in FAILING

    @property
    def name(self) -> str:
        return f"{self.label} {self.metric}"

    @property
    def classname(self) -> str:
        return f"{self.device_id}.{self.model or '-'}"


@dataclass
class Incomparable:
    """A pair that cannot be compared as is; ``compared`` when --compare-anyway compared it nevertheless."""
    device_id: str
    model: Optional[str]
    label: str
    reasons: List[str]
    compared: bool = False

    @property
    def message(self) -> str:
        what = f"{self.device_id} {self.model or '-'}/{self.label}"
        if self.compared:
            return f"{what}: compared anyway although {'; '.join(self.reasons)}"
        return f"{what}: not comparable: {'; '.join(self.reasons)}"


@dataclass
class Comparison:
    baseline: str
    candidate: str
    latency_tol: float
    energy_tol: float
    accuracy_tol_pp: float
    alpha: float
    compare_anyway: bool
    gate_modelled_energy: bool = False
    min_agreement: Optional[float] = None         # --min-agreement (fraction), None: not gated
    min_snr_db: Optional[float] = None            # --min-snr-db, None: not gated
    checks: List[Check] = field(default_factory=list)
    incomparable: List[Incomparable] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    pairs: int = 0
    error: Optional[str] = None                   # why nothing could be compared
    # (identity, baseline rows) -> earlier A/A effects from the store (checks._history_source); not serialised
    history: Optional[Callable[..., List[float]]] = field(default=None, repr=False, compare=False)

    @property
    def failures(self) -> List[Check]:
        return [c for c in self.checks if c.failed]

    @property
    def refused(self) -> List[Incomparable]:
        return [i for i in self.incomparable if not i.compared]

    @property
    def inconclusive(self) -> List[Check]:
        return [c for c in self.checks if c.verdict == "inconclusive"]

    @property
    def exit_code(self) -> int:
        if self.pairs == 0 or self.refused:
            return 2
        if self.failures:
            return 1
        return 3 if self.inconclusive else 0

    @property
    def verdict(self) -> str:
        return {0: "pass", 1: "fail", 2: "incomparable", 3: "inconclusive"}[self.exit_code]

    def counts(self) -> Dict[str, int]:
        out = {v: 0 for v in VERDICTS}
        for c in self.checks:
            out[c.verdict] = out.get(c.verdict, 0) + 1
        return out

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d.pop("history", None)
        for c, cd in zip(self.checks, d["checks"]):
            cd["name"], cd["classname"], cd["failed"] = c.name, c.classname, c.failed
            if cd["ci"] is not None:
                cd["ci"] = list(cd["ci"])
        for i, idd in zip(self.incomparable, d["incomparable"]):
            idd["message"] = i.message
        d.update(exit_code=self.exit_code, verdict=self.verdict, counts=self.counts())
        return _json_safe(d)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
