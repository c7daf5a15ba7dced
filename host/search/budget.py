"""The search's wall-time budget (``--budget-minutes``): cheap probes first, then one full recovery that gets the
rest of the time.

With a budget of *B* minutes (bisect; its probes use a cheap recovery, ``--probe-recovery short`` or ``none``):

* **Probes** may start until :data:`PROBE_SHARE` of *B* has passed (loading the model and data, the sensitivity
  table, the eval shards and the dense measurement count: the clock starts with ``start()``/``resume()``). A probe due later is not built; the algorithm
  is told the probe time is spent (:attr:`DeviceMeasurement.skipped`) and goes on to its final candidate.
* **The final candidate** (the chosen one, rebuilt with the full recovery) gets what is left, less a reserve for
  its export and device measurement and the hold-out re-check after it (1.5 × the slowest device round so far, per
  job, at least :data:`MIN_RESERVE_S`) and a
  margin of :data:`MARGIN_SHARE` of *B*, divided among the devices still waiting for their final (their
  recoveries run one after another on this host); never less than :data:`MIN_FINAL_S`. Its fine-tune runs over the whole
  fine-tune split (``finetune_per_class`` all) for as many epochs as fit at the throughput the probes' own
  recoveries measured (images/s, × :data:`COMPILE_GAIN` when the final will be compiled, × :data:`SAFETY`; a
  cosine schedule cut short never anneals, so the estimate is biased low; the compile gain only where
  :func:`edgeprune.cpu.compile_support` says it can compile), at most :data:`MAX_EPOCHS`, and its
  ``finetune_seconds`` is the time given. The user's ``--finetune-epochs/-per-class/-seconds`` are replaced (the
  plan says so; ``budget.json`` keeps what they were). When it is built, its hard stop is that time or what is left
  of the budget, whichever is less (:meth:`SearchBudget.hard_stop`: not part of the candidate's key, so a final
  resumed after a kill continues its checkpoint, without getting its whole time again).
* The sized recovery is decided once per device and written to ``budget.json`` in the run folder (with the time
  spent) before it is used, so ``--resume`` rebuilds the same candidate (the same key: an interrupted fine-tune
  resumes from its checkpoint) and continues the clock where the killed process left it (the time spent is saved
  every :data:`SAVE_EVERY_S` seconds while the search runs).

:meth:`SearchBudget.plan` is the plan shown before the first evaluation.
"""
from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from edgeprune.errors import UsageError
from host.files import write_text_atomic
from host.search.options import RecoveryOptions

BUDGET_FILE = "budget.json"
DEFAULT_BUDGET_MINUTES = 40.0   # edgeprune search's default (bisect): a ResNet-56 search within 45 min on 2 cores
BUDGET_DISTILL = 0.5            # the CLI's --distill under a budget (bench/recovery.py's budget runs used it)
PROBE_SHARE = 0.35        # probes may start until this share of the budget
MARGIN_SHARE = 0.05       # kept free at the end
MIN_RESERVE_S = 120.0     # the final's export + device measurement, before any was timed
MIN_FINAL_S = 120.0       # the final recovery never gets less
MAX_EPOCHS = 60
DEFAULT_IPS = 300.0       # images/s when no probe fine-tuned (ResNet-56, 2 cores, bf16 eager: ~350)
COMPILE_GAIN = 1.25       # compiled vs eager (bench/recovery.py measured 1.33x)
COMPILE_S = 60.0          # compiling the student once (~1 minute on 2 cores)
SAFETY = 0.9
SAVE_EVERY_S = 30.0       # the time spent is saved this often (a killed run loses at most that)


class SearchBudget:
    """The clock and the decisions of one search's budget; ``clock`` (seconds, monotonic) is replaceable in
    tests."""

    def __init__(self, folder: Path, minutes: float, clock: Callable[[], float] = time.monotonic,
                 t0: Optional[float] = None, later_jobs: int = 0) -> None:
        if not minutes > 0:
            raise UsageError(f"--budget-minutes: must be > 0, got {minutes}")
        self.path = Path(folder) / BUDGET_FILE
        self.minutes = float(minutes)
        self.clock = clock
        self.spent_before = 0.0
        self.finals: Dict[str, Dict[str, Any]] = {}
        self.skipped: List[str] = []
        self.round_overhead_s = 0.0
        self.later_jobs = int(later_jobs)   # device jobs after the final's (the hold-out re-check)
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text())
                self.spent_before = float(doc.get("spent_s", 0.0))
                self.finals = {k: dict(v) for k, v in (doc.get("finals") or {}).items()}
                self.skipped = list(doc.get("skipped") or [])
                self.round_overhead_s = float(doc.get("round_overhead_s", 0.0))
            except (OSError, ValueError, TypeError, AttributeError) as e:
                raise UsageError(f"{self.path}: not a readable budget file ({e}); delete it to start the budget "
                                 "again") from None
        self.t0 = clock() if t0 is None else t0
        self._lock = threading.Lock()
        self._stop: Optional[threading.Event] = None

    @property
    def total_s(self) -> float:
        return self.minutes * 60.0

    def elapsed(self) -> float:
        return self.spent_before + self.clock() - self.t0

    def probes_open(self) -> bool:
        return self.elapsed() < PROBE_SHARE * self.total_s

    def reserve_s(self) -> float:
        return max(MIN_RESERVE_S, 1.5 * self.round_overhead_s * (1 + self.later_jobs))

    def note_round(self, wall_s: float, recovery_s: float) -> None:
        """A device round took ``wall_s``, ``recovery_s`` of it recovering: the rest is export + measurement."""
        self.round_overhead_s = max(self.round_overhead_s, max(0.0, wall_s - recovery_s))
        self.save()

    def skip(self, key: str) -> None:
        if key not in self.skipped:
            self.skipped.append(key)
        self.save()

    def save(self) -> None:
        with self._lock:
            write_text_atomic(self.path, json.dumps({
                "minutes": self.minutes, "spent_s": round(self.elapsed(), 3), "finals": self.finals,
                "skipped": self.skipped, "round_overhead_s": round(self.round_overhead_s, 3)}, indent=1,
                sort_keys=True))

    def start_saving(self, every_s: float = SAVE_EVERY_S) -> None:
        """Save the time spent every ``every_s`` until :meth:`stop_saving` (a killed run loses at most that)."""
        self.save()
        stop = self._stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                try:
                    self.save()
                except OSError:   # a full disk must not kill the search; the next save tries again
                    pass

        threading.Thread(target=loop, name="search-budget", daemon=True).start()

    def stop_saving(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        self.save()

    def hard_stop(self, rec: RecoveryOptions) -> float:
        """The final recovery's wall-time limit now: its sized time, or what is left of the budget when less
        (a final resumed after a kill does not get its whole time again)."""
        left = self.total_s - self.elapsed() - self.reserve_s() - MARGIN_SHARE * self.total_s
        return max(30.0, min(rec.finetune_seconds or left, left))

    # -- the final recovery
    def final_recovery(self, device_id: str, base: RecoveryOptions, n_images: int, probe_rates: Iterable[float],
                       share: int = 1) -> Tuple[RecoveryOptions, Dict[str, Any]]:
        """The full recovery of ``device_id``'s final candidate, sized to what is left divided among the ``share``
        devices still waiting for theirs (decided once, then read back); and how it was sized."""
        if device_id in self.finals:
            doc = dict(self.finals[device_id])
            how = doc.pop("sizing", {})
            try:
                return RecoveryOptions(**doc), how
            except TypeError as e:
                raise UsageError(f"{self.path}: finals.{device_id}: not a recovery this edgeprune knows ({e}); "
                                 "delete the file to size it again") from None
        from edgeprune import cpu
        from edgeprune.recovery import COMPILE_MIN_IMAGES

        left = self.total_s - self.elapsed() - self.reserve_s() - MARGIN_SHARE * self.total_s
        seconds = max(MIN_FINAL_S, left / max(1, share))
        rates = [r for r in probe_rates if r and r > 0]
        eager = (sorted(rates)[len(rates) // 2] if rates else DEFAULT_IPS) * SAFETY
        source = f"median of {len(rates)} probe fine-tune(s)" if rates else "default (no probe fine-tuned)"
        n = max(1, int(n_images))
        # will it be compiled? (recover() compiles fine-tunes of at least COMPILE_MIN_IMAGES images)
        epochs_eager = math.floor(max(0.0, seconds - 15.0) * eager / n)
        compiled = epochs_eager * n >= COMPILE_MIN_IMAGES and cpu.compile_support()[0]
        rate = eager * COMPILE_GAIN if compiled else eager
        train_s = max(0.0, seconds - 15.0 - (COMPILE_S if compiled else 0.0))
        epochs = max(1, min(MAX_EPOCHS, math.floor(train_s * rate / n)))
        rec = replace(base, finetune_epochs=epochs, finetune_per_class=None, finetune_seconds=round(seconds, 1))
        how = {"seconds": round(seconds, 1), "images": n, "images_per_s": round(rate, 1), "rate_source": source,
               "compiled_expected": compiled, "at_elapsed_s": round(self.elapsed(), 1), "shared_by": share,
               "replaced": {"finetune_epochs": base.finetune_epochs, "finetune_per_class": base.finetune_per_class,
                            "finetune_seconds": base.finetune_seconds}}
        self.finals[device_id] = {**asdict(rec), "sizing": how}
        self.save()
        return rec, how

    # -- the plan shown up front
    def plan(self, max_evals: int, probe: str, final: RecoveryOptions) -> str:
        b = self.total_s
        return (f"budget {self.minutes:g} min: probes ({probe} recovery, at most {max_evals - 2} besides dense and "
                f"the final) start until minute {PROBE_SHARE * b / 60:.0f}; then the chosen candidate is rebuilt "
                f"with the full recovery (all fine-tune images, distill {final.distill:g}, as many epochs as fit, "
                f"at most {MAX_EPOCHS}; --finetune-epochs/-per-class/-seconds are replaced) in the time left, "
                f"shared by the devices, less its export and measurement (≥ {MIN_RESERVE_S / 60:.0f} min) and a "
                f"{MARGIN_SHARE:.0%} margin"
                + (f"; {self.elapsed() / 60:.1f} min already spent before this resume" if self.spent_before else ""))


def probe_rates(records: Iterable[Mapping[str, Any]]) -> List[float]:
    """images/s of the fine-tunes of earlier evaluations (their ``recovery_result``)."""
    out = []
    for rec in records:
        rr = rec.get("recovery_result") or {}
        if rr.get("images_seen") and rr.get("seconds"):
            out.append(float(rr["images_seen"]) / float(rr["seconds"]))
    return out
