"""The options of a search, the constants of its run folder, device profiles and candidate keys.

:class:`SearchOptions` is what ``search.json`` stores and ``--resume`` reads back (:meth:`SearchOptions.to_dict` /
:meth:`SearchOptions.from_dict` round-trip exactly); :class:`RecoveryOptions` is one recovery level of it, run by
:func:`edgeprune.recovery.recover` (:meth:`RecoveryOptions.plan`). :func:`profile_for` says what a device's
artifacts depend on (alignment, export format), :func:`candidate_key` hashes everything that determines a
candidate's artifact: equal keys are the same artifact, so a key found in the evaluations is never rebuilt.
Plain data; imports no torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

from edgeprune.errors import UsageError
from host.fleet.devices import DeviceConfig
from host.fleet.formats import Profile, profile_for  # noqa: F401  (the search names them too)
from host.search.algos import AlgoOptions, Candidate, ModelSpace, get_algorithm

if TYPE_CHECKING:  # pragma: no cover
    from edgeprune.recovery import RecoveryPlan

Events = Callable[[str, str, str], None]    # (kind, device id or "", message)

RUN_FILE = "search.json"
EVALUATIONS = "evaluations.jsonl"
RUN_VERSION = 1
RECORD_VERSION = 1
WORK = "work"
RESERVED_IDS = {WORK, ".", ".."}
DEFAULT_ROOT = Path("results") / "search"
ROW_METRICS = ["latency_p50_ms", "latency_p90_ms", "throughput_ips", "power_w", "energy_mj", "memory_mb", "top1",
               "top5", "agreement", "snr_db"]


# ------------------------------------------------------------------------------------------ options

@dataclass
class RecoveryOptions:
    """BatchNorm recalibration on the calib split, then a bounded fine-tune on the finetune split."""

    recalibrate: bool = True
    finetune_epochs: int = 1                    # 0: no fine-tune
    finetune_per_class: Optional[int] = 500     # finetune-split images per class (None: all)
    finetune_seconds: Optional[float] = None    # wall-time cap of the recovery (result depends on machine speed)
    lr: float = 0.01
    batch_size: int = 128
    distill: float = 0.0                        # weight of distillation from the dense model

    def validate(self, what: str) -> "RecoveryOptions":
        if self.finetune_epochs < 0:
            raise UsageError(f"--{what}-epochs: must be >= 0, got {self.finetune_epochs}")
        if self.finetune_per_class is not None and self.finetune_per_class < 1:
            raise UsageError(f"--{what}-per-class: must be >= 1, got {self.finetune_per_class}")
        if self.finetune_seconds is not None and not self.finetune_seconds > 0:
            raise UsageError(f"--{what}-seconds: must be > 0, got {self.finetune_seconds}")
        if not self.lr > 0 or self.batch_size < 1 or not 0.0 <= self.distill <= 1.0:
            raise UsageError(f"{what}: lr must be > 0, batch_size >= 1, distill in [0, 1]")
        return self

    def plan(self, seed: int) -> "RecoveryPlan":
        """This recovery as :func:`edgeprune.recovery.recover` runs it (the fine-tune split's size,
        ``finetune_per_class``, is the caller's to apply)."""
        from edgeprune.recovery import RecoveryPlan

        return RecoveryPlan(recalibrate=self.recalibrate, epochs=self.finetune_epochs,
                            max_seconds=self.finetune_seconds, lr=self.lr, batch_size=self.batch_size,
                            distill=self.distill, seed=seed)


@dataclass
class SearchOptions:
    model: str
    algo: str = "bisect"
    max_evals: int = 8                          # device evaluations per device, the dense one included
    importance: str = "l1"
    min_channels: int = 1
    prune_residual: bool = False
    recovery: RecoveryOptions = field(default_factory=RecoveryOptions)   # every measured candidate
    short_recovery: RecoveryOptions = field(default_factory=lambda: RecoveryOptions(finetune_per_class=100))
    eval_per_class: Optional[int] = 100         # eval split the agent scores (100: the shipped 1,000 images)
    sensitivity_ratio: float = 0.5              # sensitivity measured with each group alone at this ratio
    sensitivity_per_class: int = 100            # calib images per class for it
    quick: bool = False                         # short timing windows on the device
    lut_seconds: float = 0.5                    # timing window per layer configuration (netadapt's table)
    seed: int = 0
    lease_wait_s: float = 300.0
    cache_dir: Optional[str] = None             # default results/search/cache
    algo_options: AlgoOptions = field(default_factory=AlgoOptions)
    budget_minutes: Optional[float] = None      # wall-time budget of the whole search (host.search.budget)
    holdout: bool = True                        # re-check the pick on test images it was not chosen on
    final_repeat: int = 5                       # the pick timed in this many runs in all (host.search.final); 1: off
    # model source (edgeprune.sources) and data (edgeprune.workload): see host.search.data
    model_args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None
    trust_pickle: bool = False
    input_shape: Optional[Tuple[int, ...]] = None
    ignore_layers: Tuple[str, ...] = ()
    data: Optional[str] = None                  # None: CIFAR-10 for the reference models
    calib_data: Optional[str] = None
    finetune_data: Optional[str] = None
    resize: Optional[str] = None
    center_crop: Optional[str] = None
    mean: Optional[str] = None
    std: Optional[str] = None

    def validate(self) -> "SearchOptions":
        from edgeprune import prune

        get_algorithm(self.algo)
        if self.max_evals < 1:
            raise UsageError(f"--max-evals: must be >= 1, got {self.max_evals}")
        if not isinstance(self.final_repeat, int) or isinstance(self.final_repeat, bool) or self.final_repeat < 1:
            raise UsageError(f"--final-repeat: must be an integer >= 1, got {self.final_repeat!r}")
        if self.importance not in prune.IMPORTANCE:
            raise UsageError(f"--importance: unknown criterion {self.importance!r}; known: "
                             f"{', '.join(sorted(prune.IMPORTANCE))}")
        if self.importance == "random":
            raise UsageError("--importance: 'random' makes a candidate's plan differ from one build to the next; "
                             "a search needs a deterministic criterion")
        if self.min_channels < 1:
            raise UsageError(f"--min-channels: must be >= 1, got {self.min_channels}")
        if self.eval_per_class is not None and self.eval_per_class < 1:
            raise UsageError("--eval-per-class: must be >= 1")
        if not 0.0 < self.sensitivity_ratio < 1.0 or self.sensitivity_per_class < 1:
            raise UsageError("--sensitivity-ratio: must be in (0, 1), and its calib images per class >= 1")
        if not self.lut_seconds > 0:
            raise UsageError("--lut-seconds: must be > 0")
        self.recovery.validate("finetune")
        self.short_recovery.validate("short-finetune")
        self.algo_options.validate()
        if self.budget_minutes is not None:
            if not self.budget_minutes > 0:
                raise UsageError(f"--budget-minutes: must be > 0 (0 on the command line: no budget), got "
                                 f"{self.budget_minutes}")
            if self.algo != "bisect":
                raise UsageError("--budget-minutes: only with --algo bisect (netadapt recovers every device "
                                 "evaluation fully and has no single final recovery to give the time left)")
            if self.algo_options.probe_recovery == "full":
                raise UsageError("--budget-minutes: needs --probe-recovery short or none (with full recovery of "
                                 "every probe there is no final recovery to size)")
        return self

    def recovery_for(self, level: str) -> Optional[RecoveryOptions]:
        return {"none": None, "short": self.short_recovery, "full": self.recovery}[level]

    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else DEFAULT_ROOT / "cache"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> "SearchOptions":
        def build(kind: Any, raw: Any, path: str) -> Any:
            if not isinstance(raw, Mapping):
                raise UsageError(f"{where}: {path}: expected an object")
            known = {f.name: f for f in fields(kind)}
            unknown = sorted(set(raw) - set(known))
            if unknown:
                raise UsageError(f"{where}: {path}.{unknown[0]}: unknown option (written by another edgeprune?)")
            kw = dict(raw)
            if kind is SearchOptions:
                kw["recovery"] = build(RecoveryOptions, raw.get("recovery", {}), f"{path}.recovery")
                kw["short_recovery"] = build(RecoveryOptions, raw.get("short_recovery", {}), f"{path}.short_recovery")
                kw["algo_options"] = build(AlgoOptions, raw.get("algo_options", {}), f"{path}.algo_options")
            if kind is AlgoOptions and "netadapt_levels" in kw:
                kw["netadapt_levels"] = tuple(kw["netadapt_levels"])
            if kind is SearchOptions:
                for name in ("input_shape", "ignore_layers"):
                    if kw.get(name) is not None:
                        kw[name] = tuple(kw[name])
            return kind(**kw)

        return build(cls, d, "options")


def candidate_key(space: ModelSpace, opts: SearchOptions, profile: Profile, cand: Candidate,
                  kind: str = "device", recovery: Optional[RecoveryOptions] = None) -> str:
    """sha256 of what determines the candidate's artifact (device evaluations) or its host top-1 (``host``);
    ``recovery`` replaces the candidate's level's options (a budget's sized final recovery)."""
    rec = recovery if recovery is not None else opts.recovery_for(cand.recovery)
    doc: Dict[str, Any] = {
        "v": 1, "kind": kind, "model": space.model, "checkpoint": space.checkpoint_sha256,
        "importance": opts.importance, "min_channels": opts.min_channels, "prune_residual": opts.prune_residual,
        "round_to": profile.round_to if cand.kept else None, "kept": dict(cand.kept),
        "recovery": asdict(rec) if rec is not None and cand.kept else None, "seed": opts.seed,
    }
    from host.search.data import source_key

    src = source_key(opts)
    if src:   # the user's model source and data (absent for the reference models: their keys are unchanged)
        doc["source"] = src
    if kind == "device":
        doc.update(format=profile.fmt, export_options=dict(profile.export_options))
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_devices(devices: Sequence[DeviceConfig]) -> None:
    if not devices:
        raise UsageError("--devices: no devices selected")
    for dev in devices:
        if dev.id in RESERVED_IDS or dev.id.startswith("."):
            raise UsageError(f"{dev.source or dev.id}: id {dev.id!r} cannot be a folder of the search output "
                             f"(reserved: {', '.join(sorted(RESERVED_IDS))}, or a leading '.')")
        profile_for(dev)


def run_dir(run_id: str, out: Optional[Path]) -> Path:
    return Path(out) if out is not None else DEFAULT_ROOT / run_id
