"""Search targets: what each device must reach, parsed from the command line, a targets file or the device config.

A target bounds one metric of the agent's report (:data:`METRICS`); all of them are *at most* bounds except
``throughput_ips`` (*at least*). A value is absolute (``latency_p50_ms=12.5``) or relative to the dense model
measured on the same device and runtime (``latency_p50_ms=0.5x``: at most half of dense; ``throughput_ips=2x``: at
least twice dense). The accuracy bounds are separate (:data:`ACCURACY_METRICS`), all measured by the agent on the
device, at least one of them per device:

* ``accuracy_drop_pp`` (``--max-accuracy-drop``): the maximum top-1 drop in percentage points against that same
  dense measurement; needs labelled eval data;
* ``agreement`` (``--min-agreement``): the minimum top-1 agreement with the dense model's outputs (a fraction in
  (0, 1]; the eval shards carry the dense outputs, so it needs no labels);
* ``snr_db`` (``--min-snr-db``): the minimum signal-to-noise ratio of the outputs against the dense ones, in dB.

Agreement and SNR are label-free and absolute (the dense model agrees with itself: a multiple of dense means
nothing).

Where targets come from, lowest precedence first (a later layer replaces a metric an earlier one set):

1. the device config's ``targets:`` mapping, where the device config has one (read with ``getattr``: the field is
   optional in :class:`host.fleet.devices.DeviceConfig`);
2. a targets file (``--targets FILE``)::

       default: {latency_p50_ms: 0.5x, accuracy_drop_pp: 1.0}
       classes: {jetson-orin-nano: {energy_mj: 8}}
       devices: {pi-kitchen: {latency_p90_ms: 40}}

3. the command line: ``--target [SCOPE:]METRIC=VALUE`` (SCOPE: a device id or a device class) and
   ``--max-accuracy-drop PP``, ``--min-agreement F``, ``--min-snr-db DB``.

Within one source a device's own entry beats its class's, which beats the default. Contradictory or impossible
targets (a metric given twice with different values in one place, a non-positive bound, a relative accuracy, a
power target on a device that cannot measure power, a modelled power below the device's idle power) are a
:class:`UsageError` naming the argument or file and field; the same bounds checked against the dense
measurement give :func:`impossible_reason`.

Pure data and functions: no torch here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from agent import schema
from edgeprune.errors import ConfigError, UsageError


@dataclass(frozen=True)
class Metric:
    name: str
    label: str
    unit: str
    at_most: bool = True          # False: a lower bound (throughput)


METRICS: Dict[str, Metric] = {m.name: m for m in (
    Metric("latency_p50_ms", "p50 latency", "ms"),
    Metric("latency_p90_ms", "p90 latency", "ms"),
    Metric("throughput_ips", "throughput", "img/s", at_most=False),
    Metric("power_w", "mean power", "W"),
    Metric("energy_mj", "energy per inference", "mJ"),
    Metric("memory_mb", "peak memory (RSS)", "MB"),
)}
ACCURACY = "accuracy_drop_pp"
AGREEMENT = "agreement"
SNR = "snr_db"
ACCURACY_METRICS = (ACCURACY, AGREEMENT, SNR)   # accuracy bounds: not resources, never in Bounds.limits
POWER_METRICS = ("power_w", "energy_mj")
ALIASES = {
    "latency_ms": "latency_p50_ms", "p50_ms": "latency_p50_ms", "p90_ms": "latency_p90_ms",
    "throughput": "throughput_ips", "power": "power_w", "energy": "energy_mj",
    "energy_mj_per_inference": "energy_mj", "memory": "memory_mb", "peak_memory_mb": "memory_mb",
    "max_accuracy_drop_pp": ACCURACY, "max_accuracy_drop": ACCURACY, "accuracy_drop": ACCURACY,
    "min_agreement": AGREEMENT, "top1_agreement": AGREEMENT, "snr": SNR, "min_snr_db": SNR,
}
_SPEC = re.compile(r"^\s*(?:(?P<scope>[A-Za-z0-9._-]+)\s*:\s*)?(?P<metric>[A-Za-z0-9_]+)\s*=\s*(?P<value>\S+)\s*$")


def known_metrics() -> str:
    return ", ".join(list(METRICS) + list(ACCURACY_METRICS))


@dataclass(frozen=True)
class Target:
    metric: str
    value: float
    relative: bool = False        # value x the dense measurement on the device
    source: str = ""              # where it was given, for messages

    def text(self) -> str:
        op = "<=" if METRICS[self.metric].at_most else ">="
        return f"{self.metric} {op} " + (f"{self.value:g}x dense" if self.relative else f"{self.value:g}")

    def bound(self, dense: Mapping[str, float]) -> float:
        if not self.relative:
            return self.value
        base = dense.get(self.metric)
        if base is None or not math.isfinite(base):
            raise KeyError(self.metric)
        return self.value * base

    def to_dict(self) -> Dict[str, Any]:
        return {"metric": self.metric, "value": self.value, "relative": self.relative, "source": self.source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Target":
        return cls(str(d["metric"]), float(d["value"]), bool(d["relative"]), str(d.get("source", "")))


@dataclass
class TargetSet:
    """One device's targets: resource bounds by metric, and the accuracy bounds: the maximum top-1 drop (pp), the
    minimum agreement with dense (fraction), the minimum SNR against dense (dB); at least one of those three."""

    targets: Dict[str, Target] = field(default_factory=dict)
    max_accuracy_drop_pp: Optional[float] = None
    accuracy_source: str = ""
    min_agreement: Optional[float] = None
    agreement_source: str = ""
    min_snr_db: Optional[float] = None
    snr_source: str = ""

    def text(self) -> str:
        parts = [t.text() for t in self.targets.values()]
        parts += _accuracy_texts(self.max_accuracy_drop_pp, self.min_agreement, self.min_snr_db)
        return ", ".join(parts)

    @property
    def accuracy_metric(self) -> str:
        """The metric candidates are ranked by: ``top1`` with a top-1 drop bound, else ``agreement``, else
        ``snr_db``."""
        if self.max_accuracy_drop_pp is not None:
            return "top1"
        if self.min_agreement is not None:
            return AGREEMENT
        return SNR if self.min_snr_db is not None else "top1"

    @property
    def has_accuracy_bound(self) -> bool:
        return any(v is not None for v in (self.max_accuracy_drop_pp, self.min_agreement, self.min_snr_db))

    def resolve(self, dense: Mapping[str, float]) -> "Bounds":
        """Absolute bounds from the dense model's measured metrics (relative targets need theirs)."""
        out: Dict[str, float] = {}
        for m, t in self.targets.items():
            try:
                out[m] = t.bound(dense)
            except KeyError:
                raise UsageError(f"{t.source or 'target'}: {m}: relative to dense, but the dense measurement has no "
                                 f"{m} (the device's report lacks it)") from None
        drop = self.max_accuracy_drop_pp
        if drop is None and not self.has_accuracy_bound:
            drop = 0.0   # (a TargetSet checked by check_device_targets always has one)
        return Bounds(out, None if drop is None else float(drop), dense.get("top1"), self.min_agreement,
                      self.min_snr_db, self.accuracy_metric)

    def to_dict(self) -> Dict[str, Any]:
        return {"targets": [t.to_dict() for t in self.targets.values()],
                "max_accuracy_drop_pp": self.max_accuracy_drop_pp, "accuracy_source": self.accuracy_source,
                "min_agreement": self.min_agreement, "agreement_source": self.agreement_source,
                "min_snr_db": self.min_snr_db, "snr_source": self.snr_source}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TargetSet":
        ts = [Target.from_dict(t) for t in d.get("targets", [])]
        return cls({t.metric: t for t in ts}, d.get("max_accuracy_drop_pp"), str(d.get("accuracy_source", "")),
                   d.get("min_agreement"), str(d.get("agreement_source", "")), d.get("min_snr_db"),
                   str(d.get("snr_source", "")))


def _accuracy_texts(drop: Optional[float], agreement: Optional[float], snr: Optional[float]) -> List[str]:
    parts = []
    if drop is not None:
        parts.append(f"top-1 drop <= {drop:g} pp")
    if agreement is not None:
        parts.append(f"agreement >= {agreement:g}")
    if snr is not None:
        parts.append(f"SNR >= {snr:g} dB")
    return parts


@dataclass
class Assessment:
    meets_resources: bool
    meets_accuracy: bool
    drop_pp: Optional[float]
    violations: Dict[str, float]      # metric (and accuracy_drop_pp) -> relative violation (0: met)

    @property
    def meets(self) -> bool:
        return self.meets_resources and self.meets_accuracy

    @property
    def score(self) -> float:
        """How far from meeting everything: the largest relative violation (0 when met)."""
        return max(self.violations.values(), default=0.0)


@dataclass
class Bounds:
    """Absolute bounds for one device (relative targets resolved against its dense measurement). ``limits`` are the
    resource bounds; the accuracy bounds are ``max_drop_pp``, ``min_agreement`` and ``min_snr_db`` (None: not
    bounded); ``accuracy_metric`` is the metric candidates are ranked by (``top1``, ``agreement`` or ``snr_db``)."""

    limits: Dict[str, float]
    max_drop_pp: Optional[float]
    dense_top1: Optional[float]
    min_agreement: Optional[float] = None
    min_snr_db: Optional[float] = None
    accuracy_metric: str = "top1"

    def violation(self, metric: str, value: Optional[float]) -> float:
        """Relative distance past the bound: 0 when met, inf when the value is missing."""
        bound = self.limits[metric]
        if value is None or not math.isfinite(value):
            return math.inf
        if METRICS[metric].at_most:
            return max(0.0, value / bound - 1.0) if bound > 0 else (0.0 if value <= bound else math.inf)
        return max(0.0, bound / value - 1.0) if value > 0 else math.inf

    def assess(self, metrics: Mapping[str, float]) -> Assessment:
        """Resource violations (relative) and accuracy violations: a drop past its bound, in units of the bound (at
        least 1 pp); agreement the same, as its drop from 1.0 in pp; SNR in units of the bound (at least 1 dB);
        inf when the report lacks the metric (no labels for top-1, no logit-like output for agreement)."""
        viol = {m: self.violation(m, metrics.get(m)) for m in self.limits}
        top1 = metrics.get("top1")
        drop = None if top1 is None or self.dense_top1 is None else 100.0 * (self.dense_top1 - top1)
        if self.max_drop_pp is not None:
            viol[ACCURACY] = math.inf if drop is None else \
                max(0.0, drop - self.max_drop_pp) / max(1.0, self.max_drop_pp)
        agree = metrics.get(AGREEMENT)
        if self.min_agreement is not None:
            allowed = 100.0 * (1.0 - self.min_agreement)
            viol[AGREEMENT] = math.inf if agree is None or not math.isfinite(agree) else \
                max(0.0, 100.0 * (1.0 - agree) - allowed) / max(1.0, allowed)
        snr = metrics.get(SNR)
        if self.min_snr_db is not None:
            viol[SNR] = math.inf if snr is None or not math.isfinite(snr) else \
                max(0.0, self.min_snr_db - snr) / max(1.0, abs(self.min_snr_db))
        res_ok = all(v == 0.0 for m, v in viol.items() if m not in ACCURACY_METRICS)
        acc_ok = all(v == 0.0 for m, v in viol.items() if m in ACCURACY_METRICS)
        return Assessment(res_ok, acc_ok, drop, viol)

    def to_dict(self) -> Dict[str, Any]:
        return {"limits": dict(self.limits), "max_drop_pp": self.max_drop_pp, "dense_top1": self.dense_top1,
                "min_agreement": self.min_agreement, "min_snr_db": self.min_snr_db,
                "accuracy_metric": self.accuracy_metric}


def metrics_from_report(report: schema.Report) -> Dict[str, float]:
    """The target metrics (and ``top1``, ``top5``, ``agreement``, ``snr_db``) of an agent report; a metric the
    report lacks is absent (``top1`` without labels, ``agreement`` without a logit-like output)."""
    out: Dict[str, float] = {}
    if report.timing is not None:
        lat = report.timing.latency_ms
        out.update(latency_p50_ms=float(lat.median), latency_p90_ms=float(lat.p90),
                   throughput_ips=float(report.timing.throughput_ips))
    if report.power is not None:
        out.update(power_w=float(report.power.mean_w), energy_mj=float(report.power.energy_mj_per_inference))
    if report.peak_rss_mb is not None:
        out["memory_mb"] = float(report.peak_rss_mb)
    if report.accuracy is not None:
        acc = report.accuracy
        for name in ("top1", "top5", AGREEMENT, SNR):
            v = getattr(acc, name, None)
            if v is not None:
                out[name] = float(v)
    return out


# ----------------------------------------------------------------------------------------------- parsing

def canonical_metric(name: str, where: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in METRICS and key not in ACCURACY_METRICS:
        raise UsageError(f"{where}: unknown metric {name!r}; known: {known_metrics()}")
    return key


def parse_value(metric: str, raw: Any, where: str) -> Tuple[float, bool]:
    """``(value, relative)`` from ``12.5``, ``"12.5"`` or ``"0.5x"``; UsageError naming ``where``."""
    relative = False
    text = raw
    if isinstance(raw, bool) or raw is None:
        raise UsageError(f"{where}: {metric}: expected a number or a multiple of dense like 0.5x, got {raw!r}")
    if isinstance(raw, str):
        text = raw.strip().lower()
        if text.endswith("x"):
            relative, text = True, text[:-1].strip()
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: {metric}: expected a number or a multiple of dense like 0.5x, "
                         f"got {raw!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{where}: {metric}: must be finite, got {raw!r}")
    if metric == ACCURACY:
        if relative:
            raise UsageError(f"{where}: {ACCURACY}: is a drop in percentage points against dense; "
                             f"a multiple of dense ({raw!r}) means nothing")
        if not 0.0 <= value < 100.0:
            raise UsageError(f"{where}: {ACCURACY}: must be in [0, 100) percentage points, got {value:g}")
        return value, False
    if metric in (AGREEMENT, SNR):
        if relative:
            raise UsageError(f"{where}: {metric}: is measured against the dense model's outputs (dense is "
                             f"{'1.0' if metric == AGREEMENT else 'exact'}); a multiple of dense ({raw!r}) means "
                             "nothing: give an absolute value")
        if metric == AGREEMENT and not 0.0 < value <= 1.0:
            raise UsageError(f"{where}: {AGREEMENT}: a fraction in (0, 1] (0.99 = 99 % of the samples' top-1 "
                             f"classes as dense), got {value:g}")
        return value, False
    if value <= 0:
        raise UsageError(f"{where}: {metric}: must be > 0, got {raw!r}")
    return value, relative


def parse_target_arg(text: str, where: str = "--target") -> Tuple[Optional[str], str, float, bool]:
    """``[SCOPE:]METRIC=VALUE`` → (scope, metric, value, relative)."""
    m = _SPEC.match(str(text))
    if not m:
        raise UsageError(f"{where}: expected [DEVICE_OR_CLASS:]METRIC=VALUE (e.g. latency_p50_ms=0.5x), "
                         f"got {text!r}")
    metric = canonical_metric(m.group("metric"), where)
    value, relative = parse_value(metric, m.group("value"), where)
    return m.group("scope"), metric, value, relative


def _layer_from_mapping(mapping: Any, where: str) -> Dict[str, Tuple[float, bool, str]]:
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise UsageError(f"{where}: expected a mapping of metric: value")
    out: Dict[str, Tuple[float, bool, str]] = {}
    for k, v in mapping.items():
        metric = canonical_metric(k, where)
        value, relative = parse_value(metric, v, f"{where}.{k}")
        if metric in out and out[metric][:2] != (value, relative):
            raise UsageError(f"{where}: {metric} is given twice with different values")
        out[metric] = (value, relative, f"{where}.{k}")
    return out


@dataclass
class TargetSources:
    """Target layers as given, before they are applied to devices."""

    cli_global: Dict[str, Tuple[float, bool, str]] = field(default_factory=dict)
    cli_scoped: Dict[str, Dict[str, Tuple[float, bool, str]]] = field(default_factory=dict)
    file_default: Dict[str, Tuple[float, bool, str]] = field(default_factory=dict)
    file_classes: Dict[str, Dict[str, Tuple[float, bool, str]]] = field(default_factory=dict)
    file_devices: Dict[str, Dict[str, Tuple[float, bool, str]]] = field(default_factory=dict)
    file: Optional[str] = None


def parse_cli(targets: Sequence[str], max_accuracy_drop: Optional[float],
              targets_file: Optional[Path] = None, *, min_agreement: Optional[float] = None,
              min_snr_db: Optional[float] = None) -> TargetSources:
    src = TargetSources()
    for text in targets:
        scope, metric, value, relative = parse_target_arg(text)
        layer = src.cli_global if scope is None else src.cli_scoped.setdefault(scope, {})
        if metric in layer and layer[metric][:2] != (value, relative):
            raise UsageError(f"--target: {metric} is given twice{f' for {scope}' if scope else ''} with different "
                             f"values ({layer[metric][2]} and {text!r}): contradictory")
        layer[metric] = (value, relative, f"--target {text}")
    if max_accuracy_drop is not None:
        value, _ = parse_value(ACCURACY, max_accuracy_drop, "--max-accuracy-drop")
        if ACCURACY in src.cli_global and src.cli_global[ACCURACY][0] != value:
            raise UsageError(f"--max-accuracy-drop: {value:g} contradicts --target {ACCURACY}="
                             f"{src.cli_global[ACCURACY][0]:g}")
        src.cli_global[ACCURACY] = (value, False, "--max-accuracy-drop")
    for metric, given, flag in ((AGREEMENT, min_agreement, "--min-agreement"), (SNR, min_snr_db, "--min-snr-db")):
        if given is None:
            continue
        value, _ = parse_value(metric, given, flag)
        if metric in src.cli_global and src.cli_global[metric][0] != value:
            raise UsageError(f"{flag}: {value:g} contradicts --target {metric}={src.cli_global[metric][0]:g}")
        src.cli_global[metric] = (value, False, flag)
    if targets_file is not None:
        _read_file(Path(targets_file), src)
    return src


def _read_file(path: Path, src: TargetSources) -> None:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a targets file is a mapping with default:, classes: and/or devices:")
    unknown = sorted(set(doc) - {"default", "classes", "devices"})
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown field (known: default, classes, devices)")
    src.file = str(path)
    src.file_default = _layer_from_mapping(doc.get("default"), f"{path}: default")
    for section, dest in (("classes", src.file_classes), ("devices", src.file_devices)):
        entries = doc.get(section) or {}
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: {section}: expected a mapping of name: {{metric: value}}")
        for name, mapping in entries.items():
            dest[str(name)] = _layer_from_mapping(mapping, f"{path}: {section}.{name}")


def device_targets(devices: Sequence[Any], src: TargetSources) -> Dict[str, TargetSet]:
    """Each device's :class:`TargetSet`, validated (see the module docstring for precedence)."""
    ids = {d.id for d in devices}
    classes = {d.device_class for d in devices}
    for scope in src.cli_scoped:
        if scope not in ids and scope not in classes:
            raise UsageError(f"--target: {scope!r} is neither a device id nor a device class of the selected "
                             f"devices ({', '.join(sorted(ids))}; classes {', '.join(sorted(classes))})")
    out: Dict[str, TargetSet] = {}
    for dev in devices:
        layers: List[Dict[str, Tuple[float, bool, str]]] = []
        cfg = getattr(dev, "targets", None)
        if cfg:
            layers.append(_layer_from_mapping(dict(cfg), f"{dev.source or dev.id}: targets"))
        layers += [src.file_default, src.file_classes.get(dev.device_class, {}), src.file_devices.get(dev.id, {}),
                   src.cli_global, src.cli_scoped.get(dev.device_class, {}) if dev.device_class != dev.id else {},
                   src.cli_scoped.get(dev.id, {})]
        merged: Dict[str, Tuple[float, bool, str]] = {}
        for layer in layers:
            merged.update(layer)
        ts = TargetSet()
        for metric, (value, relative, where) in merged.items():
            if metric == ACCURACY:
                ts.max_accuracy_drop_pp, ts.accuracy_source = value, where
            elif metric == AGREEMENT:
                ts.min_agreement, ts.agreement_source = value, where
            elif metric == SNR:
                ts.min_snr_db, ts.snr_source = value, where
            else:
                ts.targets[metric] = Target(metric, value, relative, where)
        check_device_targets(dev, ts)
        out[dev.id] = ts
    if not any(ts.targets for ts in out.values()):
        raise UsageError(f"--target: no latency, throughput, power, energy or memory target for device "
                         f"{', '.join(out)}; give at least one (e.g. --target latency_p50_ms=0.5x, or targets: in the "
                         "device config). A device with accuracy bounds only, beside devices with such targets, is "
                         "checked with the dense model")
    return out


def check_device_targets(dev: Any, ts: TargetSet) -> None:
    """UsageError for targets this device cannot be searched for."""
    if not ts.has_accuracy_bound:
        raise UsageError(f"--max-accuracy-drop: no maximum accuracy drop for device {dev.id} (give "
                         f"--max-accuracy-drop PP, --min-agreement F or --min-snr-db DB, or {ACCURACY}, {AGREEMENT} "
                         "or snr_db in a targets file or the device config's targets:)")
    power = getattr(dev, "power", None)
    for m in POWER_METRICS:
        if m in ts.targets and power is None:
            raise UsageError(f"{ts.targets[m].source}: device {dev.id} has no power section in its config, so "
                             f"its {METRICS[m].label} cannot be measured")
    p50, p90 = ts.targets.get("latency_p50_ms"), ts.targets.get("latency_p90_ms")
    if p50 is not None and p90 is not None and not p50.relative and not p90.relative and p90.value < p50.value:
        raise UsageError(f"{p90.source}: latency_p90_ms <= {p90.value:g} ms is below latency_p50_ms <= "
                         f"{p50.value:g} ms ({p50.source}) for device {dev.id}: contradictory (the 90th percentile "
                         "is never below the median)")
    p = ts.targets.get("power_w")
    if p is not None and not p.relative and power is not None and power.sensor == "model" \
            and power.idle_w is not None and p.value < power.idle_w:
        raise UsageError(f"{p.source}: {p.value:g} W is below device {dev.id}'s idle power ({power.idle_w:g} W, "
                         "modelled): impossible")


def impossible_reason(dev: Any, bounds: Bounds) -> Optional[str]:
    """Why ``bounds`` cannot be met on ``dev`` whatever is pruned, where that is known from its config."""
    p50, p90 = bounds.limits.get("latency_p50_ms"), bounds.limits.get("latency_p90_ms")
    if p50 is not None and p90 is not None and p90 < p50:
        return (f"latency_p90_ms <= {p90:.4g} ms is below latency_p50_ms <= {p50:.4g} ms: the 90th percentile is "
                "never below the median, so no model can meet both")
    power = getattr(dev, "power", None)
    lim = bounds.limits.get("power_w")
    if lim is not None and power is not None and power.sensor == "model" and power.idle_w is not None \
            and lim <= power.idle_w:
        return (f"power_w <= {lim:.3g} W is at or below the device's idle power ({power.idle_w:g} W, modelled): "
                "no pruned model can draw less")
    return None


def describe(ts: TargetSet, bounds: Optional[Bounds] = None) -> str:
    if bounds is None:
        return ts.text()
    parts = []
    for m, t in ts.targets.items():
        op = "<=" if METRICS[m].at_most else ">="
        rel = f" ({t.value:g}x)" if t.relative else ""
        parts.append(f"{m} {op} {bounds.limits[m]:.4g}{rel}")
    if bounds.max_drop_pp is not None:
        parts.append(f"drop <= {bounds.max_drop_pp:g} pp")
    parts += _accuracy_texts(None, bounds.min_agreement, bounds.min_snr_db)
    return ", ".join(parts)


def check_labelled(targets: Mapping[str, TargetSet], labelled: bool, what: str = "the eval data") -> None:
    """UsageError when a device has a top-1 drop bound but the eval data has no labels (top-1 cannot be measured):
    the label-free bounds are agreement and SNR against the dense model."""
    if labelled:
        return
    for dev_id, ts in targets.items():
        if ts.max_accuracy_drop_pp is not None:
            src = ts.accuracy_source or "--max-accuracy-drop"
            where = "" if src == "--max-accuracy-drop" else f" ({src}, device {dev_id})"
            raise UsageError(f"--max-accuracy-drop needs labelled eval data; use --min-agreement{where}: {what} has "
                             "no labels, so top-1 cannot be measured (agreement and SNR against the dense model's "
                             "outputs need none)")


def refuse_emulated(devices: Sequence[Any], targets: Mapping[str, TargetSet],
                    emulation_of: Callable[[Any], Mapping[str, Any]]) -> None:
    """UsageError for a resource target (latency, throughput, power, energy, memory) on a device whose agent runs
    under user-mode emulation (``emulation_of(dev)``, :func:`host.fleet.health.emulation_of`): those figures are the
    emulator's, not a device's. Its accuracy bounds stand: its outputs are its CPU architecture's own."""
    for dev in devices:
        ts = targets.get(dev.id)
        if ts is None or not ts.targets:
            continue
        emu = emulation_of(dev)
        if emu.get("emulated"):
            metric, t = next(iter(ts.targets.items()))
            by = emu.get("by") or "an emulator"
            raise UsageError(f"{t.source}: device {dev.id} runs under user-mode emulation ({by}): its {METRICS[metric].label} is the emulator's, not a device measurement, so "
                             "a search cannot target it. Give it accuracy bounds only (accuracy_drop_pp, agreement, "
                             "snr_db: its outputs are real), and scope resource targets to the other devices "
                             "(--target DEVICE:METRIC=VALUE)")
