"""The report's figures (matplotlib, Agg, drawn off-screen) embedded as PNG ``data:`` URIs.

Contract: each ``*_fig`` function takes the :class:`~host.results.report.data.ReportData` and returns a
matplotlib Figure; :func:`figure` draws one and returns its ``<figure>`` HTML, or a "could not be drawn" note when
drawing fails (the rest of the report still comes). matplotlib is imported only when a figure is drawn.
"""
from __future__ import annotations

import base64
import inspect
import io
import struct
import warnings
from typing import Any, Callable, List, Tuple

from host.results.report.data import MODELLED_NOTE, ReportData
from host.results.report.markup import esc


DPI = 100


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
    return (f'<figure><img src="data:image/png;base64,{b64}" width="{w}" height="{h}" alt="{esc(alt)}">'
            f"</figure>")


def figure(draw: Callable[[], Any], alt: str) -> str:
    """Draw a figure and embed it; a note instead when drawing failed (the rest of the report still comes)."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")   # missing glyphs
            png = _png(draw())
    except Exception as e:   # a report of an odd run is still worth writing
        return f'<p class="nodata">the figure "{esc(alt)}" could not be drawn: {esc(type(e).__name__)}: {esc(e)}</p>'
    return _img(png, alt)


def _pct_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter
    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))


def tradeoff_fig(ctx: ReportData, panels: List[Tuple[str, str, str]]) -> Any:
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


def latency_fig(ctx: ReportData, devs: List[str]) -> Any:
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


def bars_fig(ctx: ReportData, panels: List[Tuple[str, str]], pct: bool = False) -> Any:
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
