"""The HTML report of one run in the results store: ``edgeprune report RUN [-o report.html]``.

One self-contained file: CSS inline, every figure a PNG in a ``data:`` URI, no JavaScript and no external URL, so
it can be mailed, attached to a CI job or opened offline. It reads only the results store (:mod:`host.results.store`):

- the run: id, kind (demo, bench, search), status, dates;
- the trade-off: latency p50 vs top-1 per device (one colour per device, each point labelled, the Pareto front as
  a staircase, a search's chosen candidate as a star), and energy per inference vs top-1 beside it when the run
  has energy;
- a summary table per device (p50/p90/p99, CV, throughput, top-1, power, energy, memory; modelled power marked
  with an asterisk: it is an estimate, not a measurement);
- latency distributions (the samples the agent kept, per measurement), power and energy, accuracy;
- every warning of every report (throttling, unstable or drifting latency, modelled power, ...), failed
  measurements with their error, and the artifacts' own caveats;
- provenance: the host (edgeprune version, git commit, packages, command line, seeds), each device's identity
  (OS, kernel, firmware, runtime and its version), the artifacts (sha256, format, manifest) and the timing
  protocol the agents applied.

A section without data (no measurement, no accuracy, no power) says so instead of drawing an empty figure.
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import inspect
import io
import json
import math
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from edgeprune.errors import UsageError
from host.results.store import dig

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console

    from host.results.store import Store

DEFAULT_DIR = Path("results") / "reports"
DPI = 100
MODELLED_NOTE = "modelled, not measured"
# device colours (matplotlib's tab10, in order), reused in the HTML tables
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
# per-measurement keys of the timing protocol (they differ by nature; the others are the protocol proper)
_PER_RUN_PROTOCOL_KEYS = ("stop_reason", "samples_kept", "samples_subsampled")


# ------------------------------------------------------------------------------------------ public API


def render(store: "Store", run_id: str) -> str:
    """The report of ``run_id`` as HTML text (ASCII: other characters are written as character references).
    UsageError (``RUN: no run ...``) when the store does not hold the run."""
    ctx = _load(store, run_id)
    text = _html(ctx)
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write(store: "Store", run_id: str, path: Path) -> Path:
    """Render the report of ``run_id`` and write it to ``path`` atomically (its folder is created); the path."""
    from host.files import write_text_atomic

    text = render(store, run_id)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_text_atomic(path, text)
    except OSError as e:
        raise UsageError(f"-o/--output: {path}: cannot write the report: {e}") from None


def default_output(run_id: str) -> Path:
    return DEFAULT_DIR / (re.sub(r"[^A-Za-z0-9._-]", "_", run_id) + ".html")


def register(sub: "argparse._SubParsersAction") -> None:
    """Add the ``report`` command to the ``edgeprune`` parser's subcommands."""
    p = sub.add_parser("report", help="write a self-contained HTML report of one run in the results store",
                       description="Write one self-contained HTML file (figures embedded, no JavaScript, no external "
                                   "URL) for one run in the results store: the latency/accuracy trade-off per device, "
                                   "latency distributions, power and energy, accuracy, every warning and the "
                                   "provenance of the numbers.")
    p.add_argument("run", metavar="RUN", help="the run's id in the results store")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help=f"HTML file to write (default {DEFAULT_DIR}/RUN.html)")
    p.add_argument("--db", default=None,
                   help="results database URL or path (default: the EDGEPRUNE_DB environment variable, else "
                        "results/edgeprune.db)")
    p.set_defaults(handler=main_report)


def main_report(args: argparse.Namespace, console: "Console") -> int:
    from host.results.store import Store

    out = args.output if args.output is not None else default_output(args.run)
    store = Store(args.db, create=False)
    try:
        path = write(store, args.run, out)
    finally:
        store.close()
    console.print(f"wrote {path}", markup=False, highlight=False)
    return 0


# ------------------------------------------------------------------------------------------ the data


@dataclass
class _Row:
    """One thing measured on one device: a measurement, or a search evaluation stored without one."""

    device: str
    label: str                      # as recorded ("ratio 0.5", "dense", ...)
    short: str                      # for the figures ("r=0.50", "dense", ...)
    ok: bool
    error: Optional[str] = None
    model: Optional[str] = None
    p50: Optional[float] = None
    p90: Optional[float] = None
    p99: Optional[float] = None
    cv: Optional[float] = None
    cv_warn: Optional[float] = None
    throughput: Optional[float] = None
    top1: Optional[float] = None
    top5: Optional[float] = None
    power: Optional[float] = None
    power_source: Optional[str] = None
    modelled: Optional[bool] = None
    energy: Optional[float] = None
    memory: Optional[float] = None
    throttled: Optional[bool] = None
    samples: List[float] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    report: Dict[str, Any] = field(default_factory=dict)
    meas: Optional[Dict[str, Any]] = None
    ev: Optional[Dict[str, Any]] = None
    ratio: Optional[float] = None
    sha: Optional[str] = None
    meets: Optional[bool] = None
    chosen: bool = False
    closest: bool = False           # a search that met no target: the candidate closest to them
    front: bool = False
    front_energy: bool = False


@dataclass
class _Ctx:
    run: Dict[str, Any]
    devices: Dict[str, Dict[str, Any]]           # device id -> devices row (may be empty)
    order: List[str]                             # device ids, sorted
    colour: Dict[str, str]
    rows: List[_Row]
    evaluations: List[Dict[str, Any]]
    artifacts: Dict[str, Optional[Dict[str, Any]]]
    chosen_how: str = ""


def _load(store: "Store", run_id: str) -> _Ctx:
    run = store.run(run_id)
    dev_rows = {d["device_id"]: d for d in store.devices(run_id)}
    meas = store.measurements(run_id)
    evals = store.evaluations(run_id)
    by_meas = {e["measurement_id"]: e for e in evals if e.get("measurement_id") is not None}
    rows = [_row_from_measurement(m, by_meas.get(m["id"])) for m in meas]
    ids = {m["id"] for m in meas}
    rows += [_row_from_evaluation(e) for e in evals if e.get("measurement_id") not in ids]
    order = sorted({*dev_rows, *(r.device for r in rows)})
    colour = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(order)}
    shas = sorted({r.sha for r in rows if r.sha})
    artifacts = {s: store.artifact(s) for s in shas}
    ctx = _Ctx(run, dev_rows, order, colour, rows, evals, artifacts)
    for d in order:
        _mark_front([r for r in rows if r.device == d], "p50", "front")
        _mark_front([r for r in rows if r.device == d], "energy", "front_energy")
    if run.get("kind") == "search":
        ctx.chosen_how = _mark_chosen(ctx)
    return ctx


def _num(x: Any) -> Optional[float]:
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _short(label: str, ratio: Optional[float]) -> str:
    if ratio is not None:
        return "dense" if ratio == 0 else f"r={ratio:.2f}"
    return label if len(label) <= 18 else label[:17] + "\u2026"


def _row_from_measurement(m: Dict[str, Any], ev: Optional[Dict[str, Any]]) -> _Row:
    extra = m.get("extra") or {}
    ratio = _num(extra.get("ratio")) if isinstance(extra, Mapping) else None
    if ratio is None and ev is not None:
        ratio = _num(ev.get("ratio"))
    report = m.get("report") if isinstance(m.get("report"), dict) else {}
    label = str(m.get("label") or m.get("key") or "?")
    return _Row(
        device=str(m["device_id"]), label=label, short=_short(label, ratio), ok=m.get("status") == "ok",
        error=m.get("error"), model=m.get("model"),
        p50=_num(m.get("latency_p50_ms")), p90=_num(m.get("latency_p90_ms")), p99=_num(m.get("latency_p99_ms")),
        cv=_num(m.get("latency_cv")), cv_warn=_num(dig(report, "timing", "protocol", "cv_warn")),
        throughput=_num(m.get("throughput_ips")), top1=_num(m.get("top1")), top5=_num(m.get("top5")),
        power=_num(m.get("power_w")), power_source=m.get("power_source"), modelled=m.get("power_modelled"),
        energy=_num(m.get("energy_mj")), memory=_num(m.get("memory_mb")), throttled=m.get("throttled"),
        samples=[float(s) for s in (m.get("samples_ms") or []) if _num(s) is not None],
        warnings=[str(w) for w in (m.get("warnings") or [])], report=report or {}, meas=m, ev=ev, ratio=ratio,
        sha=m.get("artifact_sha256") or (ev or {}).get("artifact_sha256"),
        meets=(ev or {}).get("meets"))


def _row_from_evaluation(e: Dict[str, Any]) -> _Row:
    """A search evaluation whose measurement is not in the store (served from a search's own cache)."""
    rec = e.get("record") if isinstance(e.get("record"), dict) else {}
    met = rec.get("metrics") if isinstance(rec.get("metrics"), dict) else {}
    report = rec.get("report") if isinstance(rec.get("report"), dict) else {}
    ratio = _num(e.get("ratio"))
    if ratio is None:
        ratio = _num(dig(rec, "candidate", "ratio"))
    label = f"evaluation {e.get('seq')}"
    power = report.get("power") if isinstance(report.get("power"), dict) else {}
    err = rec.get("error")
    return _Row(
        device=str(e["device_id"]), label=label, short=_short(label, ratio), ok=bool(e.get("ok")),
        error=None if e.get("ok") else str(err or "the device did not measure it"),
        p50=_num(met.get("latency_p50_ms")), p90=_num(met.get("latency_p90_ms")),
        p99=_num(dig(report, "timing", "latency_ms", "p99")), cv=_num(dig(report, "timing", "latency_ms", "cv")),
        throughput=_num(met.get("throughput_ips")), top1=_num(met.get("top1")),
        power=_num(met.get("power_w")), power_source=power.get("source"), modelled=power.get("modelled"),
        energy=_num(met.get("energy_mj")), memory=_num(met.get("memory_mb")),
        samples=[float(s) for s in (dig(report, "timing", "samples_ms") or []) if _num(s) is not None],
        warnings=[str(w) for w in (report.get("warnings") or [])], report=report, ev=e, ratio=ratio,
        sha=e.get("artifact_sha256") or rec.get("artifact_sha256"), meets=e.get("meets"))


def _mark_front(rows: Sequence[_Row], metric: str, flag: str) -> None:
    """Non-dominated rows: lower ``metric`` and higher top-1."""
    pts = [r for r in rows if r.ok and getattr(r, metric) is not None and r.top1 is not None]
    best = -math.inf
    for r in sorted(pts, key=lambda r: (getattr(r, metric), -(r.top1 or 0.0))):
        if (r.top1 or 0.0) > best:
            setattr(r, flag, True)
            best = r.top1 or 0.0


def _mark_chosen(ctx: _Ctx) -> str:
    """Mark each device's chosen candidate of a search run (and, where none met the targets, the closest one);
    how the chosen ones were found (for the figure's note)."""
    picks: Dict[str, Dict[str, Any]] = {}
    closest: Dict[str, Dict[str, Any]] = {}
    for it in _summary_devices(ctx.run):
        dev = str(it.get("device_id") or it.get("device"))
        if isinstance(it.get("chosen"), Mapping):
            picks[dev] = dict(it["chosen"])
        elif isinstance(it.get("closest"), Mapping):
            closest[dev] = dict(it["closest"])
    how = ""
    for d in ctx.order:
        rows = [r for r in ctx.rows if r.device == d and r.ok]
        near = _find(rows, closest.get(d))
        if near is not None:
            near.closest = True
        hit: Optional[_Row] = None
        pick = picks.get(d)
        if pick:
            hit = _find(rows, pick)
            how = how or "the run's summary"
        if hit is None:
            flagged = [r for r in rows if dig(r.ev, "record", "chosen") is True]
            if flagged:
                hit = flagged[0]
                how = how or "the search's record"
        if hit is None:
            meeting = [r for r in rows if r.meets]
            if meeting:
                hit = max(meeting, key=lambda r: (r.top1 or 0.0, -(r.p50 if r.p50 is not None else math.inf)))
                how = how or "meets every target, then highest top-1, then lowest p50"
        if hit is not None:
            hit.chosen = True
    return how


def _ev_key(r: _Row) -> Optional[str]:
    if r.ev is None:
        return None
    return r.ev.get("key") or dig(r.ev, "record", "key") or None


def _find(rows: Sequence[_Row], pick: Optional[Mapping[str, Any]]) -> Optional[_Row]:
    """The row a summary's pick (a search result row: its candidate ``key``, its ``artifact_sha256``) names."""
    if not pick:
        return None
    for r in rows:
        if pick.get("key") and _ev_key(r) == pick.get("key"):
            return r
    for r in rows:
        if pick.get("artifact_sha256") and r.sha == pick.get("artifact_sha256"):
            return r
    return None


def _summary_devices(run: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The per-device results in a run's summary (a search's: ``{"devices": [{"device_id", "verdict", "chosen",
    "closest", ...}]}``), or []."""
    summary = run.get("summary")
    items = summary.get("devices") if isinstance(summary, Mapping) else summary
    return [it for it in items if isinstance(it, Mapping)] if isinstance(items, list) else []


# ------------------------------------------------------------------------------------------ formatting


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


_SECRET = re.compile(r"(://[^/\s:@]*:)[^@\s/]*@")


def _redact(text: str) -> str:
    """A password in a URL (``postgresql://user:pw@host``) as ``***``."""
    return _SECRET.sub(r"\1***@", text)


NA = "\u2014"


def _f(x: Any, fmt: str = ".3f") -> str:
    v = _num(x)
    return NA if v is None else format(v, fmt)


def _pct(x: Any) -> str:
    return _f(x, ".2%")


def _date(x: Any) -> str:
    if isinstance(x, _dt.datetime):
        if x.tzinfo is None:
            x = x.replace(tzinfo=_dt.timezone.utc)
        return x.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return NA if x is None else str(x)


def _duration(a: Any, b: Any) -> str:
    if not (isinstance(a, _dt.datetime) and isinstance(b, _dt.datetime)):
        return NA
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    s = int(round((b - a).total_seconds()))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def _json(obj: Any) -> str:
    """JSON text: on one line when short, indented otherwise."""
    one = json.dumps(obj, sort_keys=True, default=str)
    return one if len(one) <= 110 else json.dumps(obj, indent=1, sort_keys=True, default=str)


def _val(v: Any) -> str:
    """A value for a table cell: strings as they are, anything else as JSON."""
    return v if isinstance(v, str) else _json(v)


def _table(head: Sequence[str], body: Sequence[Sequence[str]], cls: str = "",
           row_cls: Optional[Sequence[str]] = None) -> str:
    """A table; ``head`` is escaped, the cells are HTML already. A header starting with '#' is a number column;
    ``row_cls``: a CSS class per row ('' for none)."""
    num = [h.startswith("#") for h in head]
    th = "".join(f'<th class="num">{_e(h[1:])}</th>' if n else f"<th>{_e(h)}</th>" for h, n in zip(head, num))
    trs = []
    for j, row in enumerate(body):
        tds = "".join(f'<td class="num">{c}</td>' if i < len(num) and num[i] else f"<td>{c}</td>"
                      for i, c in enumerate(row))
        rc = row_cls[j] if row_cls is not None and j < len(row_cls) else ""
        trs.append((f'<tr class="{rc}">' if rc else "<tr>") + f"{tds}</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(trs)}</tbody></table>'


def _kv(pairs: Sequence[Tuple[str, str]], per_row: int = 1) -> str:
    """A key/value table, ``per_row`` pairs a row; keys escaped, values HTML."""
    rows = [pairs[i:i + per_row] for i in range(0, len(pairs), per_row)]
    return '<table class="kv"><tbody>' + "".join(
        "<tr>" + "".join(f"<th>{_e(k)}</th><td>{v}</td>" for k, v in row) + "</tr>" for row in rows) + \
        "</tbody></table>"


def _nodata(text: str) -> str:
    return f'<p class="nodata">no data: {_e(text)}</p>'


def _dev_chip(ctx: _Ctx, d: str) -> str:
    return (f'<span class="dev"><span class="chip" style="background:{ctx.colour.get(d, "#777")}"></span>'
            f"<code>{_e(d)}</code></span>")


def _power_cell(r: _Row) -> str:
    if r.power is None:
        return NA
    return _f(r.power, ".2f") + ('<span class="mod" title="modelled">*</span>' if r.modelled else "")


def _energy_cell(r: _Row) -> str:
    if r.energy is None:
        return NA
    return _f(r.energy, ".3f") + ('<span class="mod">*</span>' if r.modelled else "")


# ------------------------------------------------------------------------------------------ figures


def _mpl() -> Any:
    import matplotlib
    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure
    return Figure


def _t(s: str) -> str:
    """Text for matplotlib: '$' would start mathtext."""
    return str(s).replace("$", r"\$")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.15, metadata={"Software": None},
                facecolor="white")
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    w, h = struct.unpack(">II", png[16:24])       # IHDR: width, height
    b64 = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" width="{w}" height="{h}" alt="{_e(alt)}">'
            f"</figure>")


def _figure(draw: Callable[[], Any], alt: str) -> str:
    """Draw a figure and embed it; a note instead when drawing failed (the rest of the report still comes)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")   # missing glyphs
            png = _png(draw())
    except Exception as e:   # a report of an odd run is still worth writing
        return f'<p class="nodata">the figure "{_e(alt)}" could not be drawn: {_e(type(e).__name__)}: {_e(e)}</p>'
    return _img(png, alt)


def _pct_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def _tradeoff_fig(ctx: _Ctx, panels: List[Tuple[str, str, str]]) -> Any:
    from matplotlib.lines import Line2D

    Figure = _mpl()
    n = len(panels)
    fig = Figure(figsize=(6.4 * n, 4.8) if n > 1 else (9.0, 5.2))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (metric, flag, xlabel) in zip(axes, panels):
        for d in ctx.order:
            pts = [r for r in ctx.rows if r.device == d and r.ok and getattr(r, metric) is not None
                   and r.top1 is not None]
            if not pts:
                continue
            c = ctx.colour[d]
            ax.scatter([getattr(r, metric) for r in pts], [r.top1 for r in pts], s=46, color=c, zorder=3,
                       edgecolors="white", linewidths=0.6)
            front = sorted((r for r in pts if getattr(r, flag)), key=lambda r: getattr(r, metric))
            if len(front) > 1:
                ax.plot([getattr(r, metric) for r in front], [r.top1 for r in front], drawstyle="steps-post",
                        color=c, linestyle="--", linewidth=1.4, alpha=0.8, zorder=2)
            for r in pts:
                xy = (getattr(r, metric), r.top1)
                star = r.chosen or r.closest
                ax.annotate(_t(r.short), xy, xytext=(11, 6) if star else (5, 4), textcoords="offset points",
                            fontsize=8, color="#333333")
                if star:
                    ax.scatter([xy[0]], [xy[1]], s=340, marker="*", color=c if r.chosen else "white",
                               edgecolors=c if r.closest else "black", linewidths=1.6, zorder=5)
                    ax.annotate("chosen" if r.chosen else "closest (targets not met)", xy, xytext=(9, -13),
                                textcoords="offset points", fontsize=8.5, fontweight="bold", color="black")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (measured on the device)")
        _pct_axis(ax)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.12)
        ax.set_title(f"{'latency' if metric == 'p50' else 'energy'} vs accuracy: better is up and left",
                     fontsize=10.5)
    handles = [Line2D([], [], marker="o", linestyle="", color=ctx.colour[d], label=_t(d)) for d in ctx.order
               if any(r.device == d and r.ok and r.top1 is not None for r in ctx.rows)]
    handles.append(Line2D([], [], linestyle="--", color="#555555", label="Pareto front"))
    if any(r.chosen for r in ctx.rows):
        handles.append(Line2D([], [], marker="*", markersize=13, linestyle="", color="#bbbbbb",
                              markeredgecolor="black", label="chosen"))
    if any(r.closest for r in ctx.rows):
        handles.append(Line2D([], [], marker="*", markersize=13, linestyle="", color="white",
                              markeredgecolor="#555555", label="closest (none met)"))
    axes[0].legend(handles=handles, fontsize=8.5, loc="best", framealpha=0.9)
    fig.tight_layout()
    return fig


def _latency_fig(ctx: _Ctx, devs: List[str]) -> Any:
    Figure = _mpl()
    per = {d: [r for r in ctx.rows if r.device == d and r.samples] for d in devs}
    heights = [0.42 * len(per[d]) + 0.9 for d in devs]
    fig = Figure(figsize=(10.5, sum(heights) + 0.4))
    axes = fig.subplots(len(devs), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    horizontal = ({"orientation": "horizontal"} if "orientation" in inspect.signature(axes[0].boxplot).parameters
                  else {"vert": False})
    for ax, d in zip(axes, devs):
        rows = per[d]
        bp = ax.boxplot([r.samples for r in rows], whis=(1, 99), patch_artist=True, widths=0.6,
                        flierprops={"markersize": 2, "alpha": 0.35, "markeredgecolor": ctx.colour[d]},
                        medianprops={"color": "black", "linewidth": 1.4}, **horizontal)
        for box in bp["boxes"]:
            box.set_facecolor(ctx.colour[d])
            box.set_alpha(0.55)
        ax.set_yticks(range(1, len(rows) + 1))
        ax.set_yticklabels([_t(f"{r.short}  (n={len(r.samples)})") for r in rows], fontsize=8.5)
        ax.invert_yaxis()
        ax.set_title(_t(f"{d}"), fontsize=10, loc="left", color=ctx.colour[d], fontweight="bold")
        ax.grid(True, axis="x", alpha=0.3)
        ax.set_xlabel("latency per inference (ms)", fontsize=9)
        # a few far outliers (a preempted iteration) would squash every box: the axis spans the 0.5th to the
        # 99.5th percentile, and what lies beyond is counted at the edge
        import numpy as np
        lo = min(float(np.percentile(r.samples, 0.5)) for r in rows)
        hi = max(float(np.percentile(r.samples, 99.5)) for r in rows)
        span = max(hi - lo, 1e-9)
        med = min(float(np.median(r.samples)) for r in rows)
        if lo > 0 and hi / max(med, 1e-12) > 3.0:
            # a heavy tail (or measurements an order of magnitude apart): a log axis keeps every box readable
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
            lo, hi = lo / 1.08, hi * 1.08
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("latency per inference (ms, log scale)", fontsize=9)
        else:
            lo, hi = max(0.0, lo - 0.06 * span), hi + 0.06 * span
        ax.set_xlim(lo, hi)
        for y, r in enumerate(rows, 1):
            out = sum(1 for v in r.samples if v > hi)
            if out:
                ax.annotate(f"+{out} beyond (max {max(r.samples):.3g} ms) \u2192", (1.0, y),
                            xycoords=("axes fraction", "data"), xytext=(-4, -9), textcoords="offset points",
                            ha="right", fontsize=7.5, color="#555555")
    fig.tight_layout()
    return fig


def _bars_fig(ctx: _Ctx, panels: List[Tuple[str, str]], pct: bool = False) -> Any:
    Figure = _mpl()
    fig = None
    n_rows = 0
    axes: Any = None
    for i, (metric, title) in enumerate(panels):
        rows = [r for r in ctx.rows if getattr(r, metric) is not None]
        if fig is None:
            n_rows = len(rows)
            fig = Figure(figsize=(5.6 * len(panels) if len(panels) > 1 else 9.0, 0.34 * n_rows + 1.3))
            axes = fig.subplots(1, len(panels), squeeze=False)[0]
        ax = axes[i]
        ys = list(range(len(rows)))
        vals = [getattr(r, metric) for r in rows]
        ax.barh(ys, vals, color=[ctx.colour[r.device] for r in rows],
                hatch=None, edgecolor="white", height=0.7)
        for y, r, v in zip(ys, rows, vals):
            if metric in ("power", "energy") and r.modelled:
                ax.barh([y], [v], color="none", hatch="///", edgecolor="#333333", height=0.7, linewidth=0)
            ax.annotate(f"{v:.1%}" if pct else f"{v:.3g}" + ("*" if metric in ("power", "energy") and r.modelled
                                                               else ""),
                        (v, y), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
        ax.set_yticks(ys)
        ax.set_yticklabels([_t(f"{r.device} \u00b7 {r.short}") for r in rows], fontsize=8.5)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.margins(x=0.15)
        if pct:
            _pct_axis(ax, "x")
            ax.set_xlim(0, 1.08)
        if metric in ("power", "energy") and any(r.modelled for r in rows):
            ax.set_title(f"{title}\nhatched, *: {MODELLED_NOTE}", fontsize=10)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------------------ sections


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d1d1f;margin:0;
background:#f4f5f7;font-size:14px;line-height:1.45}
main{max-width:1240px;margin:0 auto;padding:18px 20px 40px}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:18px;margin:0 0 10px;border-bottom:2px solid #e3e5e8;
padding-bottom:4px}h3{font-size:15px;margin:16px 0 6px}
section{background:#fff;border:1px solid #e1e3e6;border-radius:8px;padding:14px 18px;margin:14px 0}
nav a{margin-right:12px;color:#0b5cad;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border-bottom:1px solid #e6e8eb;padding:4px 9px;text-align:left;vertical-align:top}
thead th{background:#f0f2f5;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{background:#f7f8fa;font-weight:600;white-space:nowrap;width:1%}
code,pre{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12px}
pre{background:#f7f8fa;border:1px solid #e6e8eb;padding:8px;overflow-x:auto;white-space:pre-wrap;
word-break:break-all;margin:4px 0}
figure{margin:8px 0}figure img{max-width:100%;height:auto;display:block}
.facts{display:flex;flex-wrap:wrap;gap:8px 22px;margin:6px 0}.facts div{white-space:nowrap}
.facts b{color:#666;font-weight:600;margin-right:4px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600;color:#fff;
background:#777}
.b-ok,.b-complete,.b-met{background:#2e7d32}.b-running{background:#1565c0}
.b-failed,.b-error,.b-interrupted{background:#c62828}.b-infeasible,.b-warn{background:#e65100}
.chip{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.mod{color:#c62828;font-weight:700}.note{color:#555;font-size:12.5px}
.nodata{color:#8a4b00;background:#fff7e6;border:1px solid #f3d9a4;border-radius:5px;padding:6px 10px}
.err{color:#c62828}.hi{background:#fff3e0}.chosen td{background:#fffde7;font-weight:600}
tr.failed td{color:#a01818;background:#fdf0f0}
.dev,.kind{white-space:nowrap}code.sha{display:inline-block;max-width:33ch;word-break:break-all}
.kind{display:inline-block;font-size:11.5px;font-weight:700;padding:0 6px;border-radius:4px;background:#eceff1}
.k-throttling,.k-failed,.k-run{background:#ffcdd2}.k-unstable,.k-drift{background:#ffe0b2}
.k-modelled-power{background:#e1bee7}
"""


def _header(ctx: _Ctx) -> str:
    run = ctx.run
    n_ok = sum(1 for r in ctx.rows if r.ok)
    n_fail = len(ctx.rows) - n_ok
    n_warn = len(_warnings(ctx))
    status = str(run.get("status"))
    facts = [("kind", _e(run.get("kind"))),
             ("status", f'<span class="badge b-{_e(status)}">{_e(status)}</span>'),
             ("started", _e(_date(run.get("started_at")))),
             ("finished", _e(_date(run.get("finished_at")))),
             ("took", _e(_duration(run.get("started_at"), run.get("finished_at")))),
             ("host", f"<code>{_e(run.get('host'))}</code>"),
             ("devices", str(len(ctx.order))),
             ("measured", f"{n_ok} ok" + (f', <span class="err">{n_fail} failed</span>' if n_fail else "")),
             ("warnings", f'<a href="#warnings">{n_warn}</a>')]
    err = f'<p class="err">run error: {_e(run.get("error"))}</p>' if run.get("error") else ""
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("tradeoff", "trade-off"), ("summary", "summary"), ("latency", "latency"), ("power", "power &amp; energy"),
        ("accuracy", "accuracy"), ("warnings", "warnings"), ("provenance", "provenance")))
    return (f'<section id="run"><h1>edgeprune report &mdash; run <code>{_e(run.get("run_id"))}</code></h1>'
            '<div class="facts">' + "".join(f"<div><b>{k}</b>{v}</div>" for k, v in facts) + "</div>" + err +
            f"<nav>{nav}</nav></section>")


def _tradeoff(ctx: _Ctx) -> str:
    out = ['<section id="tradeoff"><h2>Latency / accuracy trade-off</h2>']
    pts = [r for r in ctx.rows if r.ok and r.p50 is not None and r.top1 is not None]
    if not pts:
        why = ("this run recorded no measurements" if not ctx.rows else
               "no successful measurement has both a latency and a top-1 (accuracy was not measured, or every "
               "measurement failed)")
        out.append(_nodata(why) + "</section>")
        return "".join(out)
    panels = [("p50", "front", "latency p50 (ms, on the device)")]
    if any(r.ok and r.energy is not None and r.top1 is not None for r in ctx.rows):
        panels.append(("energy", "front_energy", "energy per inference (mJ)"))
    out.append(_figure(lambda: _tradeoff_fig(ctx, panels), "latency p50 vs top-1 per device"
                       + (", and energy per inference vs top-1" if len(panels) > 1 else "")))
    notes = ["Each point is one measured artifact (labelled by its pruning ratio, or its label), one colour per "
             "device; the dashed staircase is the device's Pareto front (no other point is both faster and more "
             "accurate)."]
    if ctx.run.get("kind") == "search":
        if any(r.chosen for r in ctx.rows):
            notes.append(f"The star is the search's chosen candidate per device (from {_e(ctx.chosen_how)}).")
        if any(r.closest for r in ctx.rows):
            notes.append("A hollow star: no candidate met that device's targets; the one closest to them.")
        if not any(r.chosen or r.closest for r in ctx.rows):
            notes.append("No candidate met the targets: nothing was chosen.")
    if any(r.modelled for r in pts) and len(panels) > 1:
        notes.append(f"Energy is computed from modelled power ({MODELLED_NOTE}).")
    left = [r for r in ctx.rows if r.ok and (r.p50 is None or r.top1 is None)]
    if left:
        notes.append(f"{len(left)} successful measurement(s) lack latency or accuracy and are not plotted.")
    out.append(f'<p class="note">{" ".join(notes)}</p></section>')
    return "".join(out)


def _summary(ctx: _Ctx) -> str:
    out = ['<section id="summary"><h2>Summary per device</h2>']
    if not ctx.order:
        return out[0] + _nodata("this run recorded no devices and no measurements") + "</section>"
    search = ctx.run.get("kind") == "search"
    verdicts = _verdicts(ctx)
    for d in ctx.order:
        dev = ctx.devices.get(d) or {}
        ident = dev.get("identity") if isinstance(dev.get("identity"), dict) else {}
        rows = [r for r in ctx.rows if r.device == d]
        bits = [f"class {_e(dev.get('device_class'))}" if dev.get("device_class") else "",
                (f"runtime {_e(ident.get('runtime'))} {_e(ident.get('runtime_version'))}" if ident.get("runtime")
                 else ""),
                f"host <code>{_e(ident.get('hostname'))}</code>" if ident.get("hostname") else ""]
        v = verdicts.get(d)
        if v:
            bits.append(f'verdict <span class="badge b-{_e(v)}">{_e(v)}</span>')
        out.append(f"<h3>{_dev_chip(ctx, d)} <span class=\"note\">{' &middot; '.join(b for b in bits if b)}"
                   "</span></h3>")
        if not rows:
            out.append(_nodata("no measurement on this device"))
            continue
        head = ["measurement", "model", "status", "#p50 ms", "#p90 ms", "#p99 ms", "#CV", "#throughput /s",
                "#top-1", "#power W", "#energy mJ/inf", "#memory MB"] + (["meets targets"] if search else [])
        body = []
        for r in rows:
            label = _e(r.label) + (' <span class="badge b-met">chosen</span>' if r.chosen else
                                   ' <span class="badge b-infeasible">closest</span>' if r.closest else "")
            status = ('<span class="badge b-ok">ok</span>' if r.ok else
                      f'<span class="badge b-error">error</span> <span class="err">{_e(_clip(r.error, 90))}</span>')
            if r.throttled:
                status += ' <span class="badge b-warn">throttled</span>'
            cv = _f(r.cv, ".3f")
            if r.cv is not None and r.cv > (r.cv_warn if r.cv_warn is not None else 0.10):
                cv = f'<span class="err">{cv}</span>'
            cells = [label, _e(r.model or NA), status, _f(r.p50), _f(r.p90), _f(r.p99), cv,
                     _f(r.throughput, ".1f"), _pct(r.top1), _power_cell(r), _energy_cell(r), _f(r.memory, ".1f")]
            if search:
                cells.append(NA if r.meets is None else ("yes" if r.meets else "no"))
            body.append(cells)
        out.append(_table(head, body, row_cls=["failed" if not r.ok else "chosen" if r.chosen else ""
                                               for r in rows]))
    notes = []
    if any(r.modelled for r in ctx.rows):
        notes.append('<span class="mod">*</span> power (and the energy computed from it) is '
                     f"<b>{MODELLED_NOTE}</b>: the device has no power sensor, so the agent estimated it from the "
                     "device config's idle/max watts and CPU utilisation.")
    notes.append("Latency in milliseconds per inference, measured by the agent on the device (median = p50); CV = "
                 "standard deviation / mean of the timed samples (red: above the job's cv_warn); top-1 measured "
                 "on the device on its eval shard; memory = the agent's peak RSS.")
    out.append("".join(f'<p class="note">{n}</p>' for n in notes) + "</section>")
    return "".join(out)


def _clip(s: Any, n: int) -> str:
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _verdicts(ctx: _Ctx) -> Dict[str, str]:
    return {str(it.get("device_id") or it.get("device")): str(it["verdict"]) for it in _summary_devices(ctx.run)
            if it.get("verdict")}


def _latency(ctx: _Ctx) -> str:
    out = ['<section id="latency"><h2>Latency distributions</h2>']
    devs = [d for d in ctx.order if any(r.device == d and r.samples for r in ctx.rows)]
    if not devs:
        out.append(_nodata("no latency samples in this run" + (" (every measurement failed)"
                                                                 if ctx.rows and not any(r.ok for r in ctx.rows)
                                                                 else "")))
        return "".join(out) + "</section>"
    out.append(_figure(lambda: _latency_fig(ctx, devs), "latency samples per measurement, per device"))
    missing = [r for r in ctx.rows if r.ok and not r.samples]
    note = ("Box: the middle half of the timed samples, black line: median, whiskers: 1st and 99th percentile, "
            "dots: beyond them. Each measurement on its own row; one panel per device. The axis spans the 0.5th to "
            "99.5th percentile; samples beyond it are counted at the right edge.")
    if missing:
        note += f" {len(missing)} successful measurement(s) kept no samples and are not drawn."
    return "".join(out) + f'<p class="note">{note}</p></section>'


def _power(ctx: _Ctx) -> str:
    out = ['<section id="power"><h2>Power and energy</h2>']
    panels = [(m, t) for m, t in (("power", "mean power (W)"), ("energy", "energy per inference (mJ)"))
              if any(getattr(r, m) is not None for r in ctx.rows)]
    if not panels:
        out.append(_nodata("no power was reported in this run (no sensor configured, or it failed: see the "
                           "warnings)"))
        return "".join(out) + "</section>"
    out.append(_figure(lambda: _bars_fig(ctx, panels), "power and energy per inference per measurement"))
    body = [[_dev_chip(ctx, r.device), _e(r.label), _e(r.power_source or NA),
             ('<span class="mod">yes*</span>' if r.modelled else "no" if r.modelled is not None else NA),
             _power_cell(r), _energy_cell(r), _e(dig(r.report, "power", "samples") or NA),
             _f(dig(r.report, "power", "sample_hz"), ".1f")]
            for r in ctx.rows if r.power is not None or r.energy is not None]
    out.append(_table(["device", "measurement", "source", "modelled", "#power W", "#energy mJ/inf", "#samples",
                       "#sample Hz"], body))
    if any(r.modelled for r in ctx.rows):
        out.append(f'<p class="note"><span class="mod">*</span> hatched / starred: {MODELLED_NOTE} (an estimate '
                   "from the device config and CPU utilisation; no power sensor).</p>")
    return "".join(out) + "</section>"


def _accuracy(ctx: _Ctx) -> str:
    out = ['<section id="accuracy"><h2>Accuracy</h2>']
    rows = [r for r in ctx.rows if r.top1 is not None]
    if not rows:
        out.append(_nodata("no accuracy was measured in this run (no eval shard in the jobs, or the measurements "
                           "failed)"))
        return "".join(out) + "</section>"
    out.append(_figure(lambda: _bars_fig(ctx, [("top1", "top-1 accuracy (measured on the device)")], pct=True),
                       "top-1 accuracy per measurement"))
    body = [[_dev_chip(ctx, r.device), _e(r.label), _e(dig(r.report, "accuracy", "split") or NA),
             _e(dig(r.report, "accuracy", "n") or NA), _pct(r.top1), _pct(r.top5),
             f"<code>{_e(_clip(dig(r.report, 'accuracy', 'eval_sha256'), 17) or NA)}</code>"] for r in rows]
    out.append(_table(["device", "measurement", "split", "#images", "#top-1", "#top-5", "eval shard sha256"], body))
    missing = [r for r in ctx.rows if r.ok and r.top1 is None]
    if missing:
        out.append(_nodata(f"{len(missing)} successful measurement(s) without accuracy: "
                           + ", ".join(f"{r.device} {r.label}" for r in missing)))
    return "".join(out) + "</section>"


def _kind(text: str) -> str:
    t = text.lower()
    # the stability warnings name throttling as a possible cause: classify them first
    if "latency cv" in t or "unstable" in t:
        return "unstable"
    if "drift" in t:
        return "drift"
    if "throttl" in t or "under-voltage" in t:
        return "throttling"
    if "modelled" in t:
        return "modelled-power"
    if "power" in t:
        return "power"
    if "thermal" in t:
        return "thermal"
    return "other"


def _warnings(ctx: _Ctx) -> List[Tuple[str, str, str, str]]:
    """(device, what, kind, message) for every warning, failure and caveat of the run."""
    out: List[Tuple[str, str, str, str]] = []
    run = ctx.run
    if run.get("status") in ("failed", "interrupted"):
        out.append(("", "run", "run", ("the run failed" if run.get("status") == "failed" else
                                        "the run was interrupted (its process ended before it finished)")
                    + (f": {run.get('error')}" if run.get("error") else "")))
    for r in ctx.rows:
        if not r.ok:
            out.append((r.device, r.label, "failed", f"measurement failed: {r.error or 'no error recorded'}"))
        for w in r.warnings:
            out.append((r.device, r.label, _kind(w), w))
        if r.modelled:
            out.append((r.device, r.label, "modelled-power",
                        f"power is modelled (source {r.power_source or 'model'!r}): {MODELLED_NOTE}; energy per "
                        "inference is computed from it"))
        if r.throttled and not any(_kind(w) == "throttling" for w in r.warnings):
            out.append((r.device, r.label, "throttling", "the agent saw thermal throttling during the job"))
    for sha, art in ctx.artifacts.items():
        man = (art or {}).get("manifest") if isinstance((art or {}).get("manifest"), dict) else {}
        for w in man.get("warnings") or []:
            out.append(("", f"artifact {sha[:12]}", "artifact", str(w)))
    return out


def _warnings_section(ctx: _Ctx) -> str:
    ws = _warnings(ctx)
    out = [f'<section id="warnings"><h2>Warnings ({len(ws)})</h2>']
    if not ws:
        out.append('<p class="note">No warning: every measurement succeeded and no report carried a warning.</p>')
        return "".join(out) + "</section>"
    body = [[_dev_chip(ctx, d) if d else NA, _e(what), f'<span class="kind k-{_e(k)}">{_e(k)}</span>', _e(msg)]
            for d, what, k, msg in ws]
    out.append(_table(["device", "measurement", "kind", "message"], body, cls="warnings"))
    return "".join(out) + "</section>"


def _provenance(ctx: _Ctx) -> str:
    run = ctx.run
    prov = run.get("provenance") if isinstance(run.get("provenance"), dict) else {}
    out = ['<section id="provenance"><h2>Provenance</h2><h3>Host</h3>']
    git = prov.get("git") if isinstance(prov.get("git"), dict) else {}
    git_s = (f"<code>{_e(git.get('sha'))}</code>" + (' <span class="badge b-warn">dirty</span>' if git.get("dirty")
                                                      else " clean" if git.get("dirty") is False else "")
             if git.get("sha") else "not a git checkout (or git unavailable)" if "git" in prov else NA)
    host = prov.get("host") if isinstance(prov.get("host"), dict) else {}
    pkgs = prov.get("packages") if isinstance(prov.get("packages"), dict) else {}
    argv = prov.get("argv")
    pairs = [("edgeprune", _e(prov.get("edgeprune_version") or NA)), ("git commit", git_s),
             ("host", _e(", ".join(f"{k} {v}" for k, v in sorted(host.items())) or NA)),
             ("packages", _e(", ".join(f"{k} {v}" for k, v in sorted(pkgs.items())) or NA)),
             ("command line", f"<code>{_e(_redact(' '.join(map(str, argv))))}</code>" if isinstance(argv, list)
              else NA),
             ("seeds", _e(", ".join(f"{k}={v}" for k, v in sorted((prov.get("seeds") or {}).items())) or NA))]
    known = {"edgeprune_version", "git", "host", "packages", "argv", "seeds"}
    for k in sorted(set(prov) - known):
        pairs.append((k, f"<pre>{_e(_redact(_json(prov[k])))}</pre>"))
    pairs.append(("options", f"<pre>{_e(_redact(_json(run.get('command'))))}</pre>"))
    out.append(_kv(pairs))

    out.append("<h3>Devices</h3>")
    if not ctx.order:
        out.append(_nodata("no device"))
    else:
        body = []
        for d in ctx.order:
            ident = _identity(ctx, d)
            fw = ident.get("firmware") if isinstance(ident.get("firmware"), dict) else {}
            rts = sorted({f"{r.meas.get('runtime')} {r.meas.get('runtime_version') or ''}".strip()
                          for r in ctx.rows if r.device == d and r.meas and r.meas.get("runtime")})
            rt = ", ".join(rts) or " ".join(str(ident.get(k) or "") for k in ("runtime", "runtime_version")).strip()
            body.append([_dev_chip(ctx, d), _e((ctx.devices.get(d) or {}).get("device_class") or NA),
                         _e(ident.get("hostname") or NA), _e(ident.get("os") or NA), _e(ident.get("kernel") or NA),
                         _e(" / ".join(str(ident.get(k)) for k in ("machine", "cpu_model") if ident.get(k)) or NA),
                         _e(", ".join(f"{k} {v}" for k, v in sorted(fw.items())) or NA),
                         _e(rt or NA), _e(ident.get("agent_version") or NA), _e(ident.get("serial") or NA)])
        out.append(_table(["device", "class", "hostname", "OS", "kernel", "machine / CPU", "firmware",
                           "runtime", "agent", "serial"], body))

    out.append("<h3>Artifacts</h3>")
    if not ctx.artifacts:
        out.append(_nodata("no artifact recorded"))
    else:
        body = []
        for sha, art in ctx.artifacts.items():
            man = (art or {}).get("manifest") if isinstance((art or {}).get("manifest"), dict) else {}
            ver = man.get("verification") if isinstance(man.get("verification"), dict) else {}
            check = (f"{'passed' if ver.get('passed') else 'FAILED'}: max |err| {_f(ver.get('max_abs_err'), '.1e')}, "
                     f"cosine {_f(ver.get('cosine'), '.6f')}, top-1 agreement {_f(ver.get('top1_agreement'), '.0%')} "
                     f"({ver.get('n')} images, {ver.get('checked_with') or '?'})") if ver else NA
            shape = man.get("input_shape")
            shape_s = "\u00d7".join(map(str, shape)) if isinstance(shape, list) else (shape or NA)
            used = sorted({f"{r.device} {r.label}" for r in ctx.rows if r.sha == sha})
            body.append([f'<code class="sha">{_e(sha)}</code>',
                         _e((art or {}).get("model") or man.get("model") or NA),
                         _e(" / ".join(dict.fromkeys(str(x) for x in (
                             (art or {}).get("format") or man.get("format"), man.get("export_format"),
                             man.get("precision")) if x)) or NA),
                         _e(shape_s), _e(_clip(man.get("pruning_plan_sha256"), 17) or NA),
                         _e(_clip(man.get("source_checkpoint_sha256"), 17) or NA), _e(check),
                         _e(", ".join(used))])
        out.append(_table(["sha256", "model", "format", "input", "pruning plan", "checkpoint", "export check",
                           "measured as"], body))
        if any(a is None for a in ctx.artifacts.values()):
            out.append('<p class="note">An artifact without a manifest in the store shows only its hash.</p>')

    out.append("<h3>Timing protocol</h3>")
    out.append(_protocol(ctx))
    if run.get("summary") is not None:
        out.append(f"<details><summary>the run's summary as recorded</summary><pre>{_e(_json(run['summary']))}"
                   "</pre></details>")
    return "".join(out) + "</section>"


def _identity(ctx: _Ctx, d: str) -> Dict[str, Any]:
    ident = (ctx.devices.get(d) or {}).get("identity")
    if isinstance(ident, dict) and ident:
        return ident
    for r in ctx.rows:
        if r.device == d and isinstance(r.report.get("identity"), dict):
            return r.report["identity"]
    return {}


def _protocol(ctx: _Ctx) -> str:
    timed = [r for r in ctx.rows if isinstance(dig(r.report, "timing", "protocol"), dict)]
    if not timed:
        return _nodata("no measurement reported a timing protocol")
    protos = [dict(r.report["timing"]["protocol"]) for r in timed]
    keys = sorted({k for p in protos for k in p})
    same = [k for k in keys if k not in _PER_RUN_PROTOCOL_KEYS and
            all(k in p and _json(p[k]) == _json(protos[0][k]) for p in protos)]
    varying = [k for k in keys if k not in same]
    out = [_kv([(k, _e(_val(protos[0][k]))) for k in same], per_row=3)] if same else []
    body = []
    for r, p in zip(timed, protos):
        t = r.report["timing"]
        body.append([_dev_chip(ctx, r.device), _e(r.label), _e(t.get("iterations")), _f(t.get("duration_s"), ".2f"),
                     _e(t.get("warmup_iters_done")), _f(t.get("load_time_ms"), ".1f"),
                     _f(t.get("first_inference_ms"), ".2f")] + [_e(_val(p.get(k)) if k in p else NA)
                                                                 for k in varying])
    out.append(_table(["device", "measurement", "#iterations", "#duration s", "#warm-up iters", "#load ms",
                       "#first inference ms"] + varying, body))
    out.append('<p class="note">The table above the per-measurement one holds the protocol settings shared by '
               "every measurement of the run.</p>")
    return "".join(out)


def _html(ctx: _Ctx) -> str:
    title = f"edgeprune report: {ctx.run.get('run_id')}"
    parts = [_header(ctx), _tradeoff(ctx), _summary(ctx), _latency(ctx), _power(ctx), _accuracy(ctx),
             _warnings_section(ctx), _provenance(ctx)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n"
            + "\n".join(parts) +
            f"\n<footer class=\"note\">written by edgeprune report from the results store; "
            f"{len(ctx.rows)} measurement(s) of run <code>{_e(ctx.run.get('run_id'))}</code>.</footer>"
            "\n</main></body></html>\n")
