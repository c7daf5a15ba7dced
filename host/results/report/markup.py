"""The report's HTML building blocks: escaping, cells, tables, key/value tables, the "no data" note, the
device chip, and the page's CSS.

Contract: pure functions from values to HTML text; every value passes through :func:`esc` (or a number format
from :mod:`host.fmt`) before it lands in the page, and a URL's password is shown as ``***`` (:func:`redact`).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import re
from typing import Any, Optional, Sequence, Tuple

from host.fmt import NA, fixed
from host.results.report.data import ReportData, ReportRow


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


_SECRET = re.compile(r"(://[^/\s:@]*:)[^@\s/]*@")


def redact(text: str) -> str:
    """A password in a URL (``postgresql://user:pw@host``) as ``***``."""
    return _SECRET.sub(r"\1***@", text)


def date_text(x: Any) -> str:
    if isinstance(x, _dt.datetime):
        if x.tzinfo is None:
            x = x.replace(tzinfo=_dt.timezone.utc)
        return x.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return NA if x is None else str(x)


def duration_text(a: Any, b: Any) -> str:
    if not (isinstance(a, _dt.datetime) and isinstance(b, _dt.datetime)):
        return NA
    if (a.tzinfo is None) != (b.tzinfo is None):
        a, b = a.replace(tzinfo=None), b.replace(tzinfo=None)
    s = int(round((b - a).total_seconds()))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def json_text(obj: Any) -> str:
    """JSON text: on one line when short, indented otherwise."""
    one = json.dumps(obj, sort_keys=True, default=str)
    return one if len(one) <= 110 else json.dumps(obj, indent=1, sort_keys=True, default=str)


def cell_text(v: Any) -> str:
    """A value for a table cell: strings as they are, anything else as JSON."""
    return v if isinstance(v, str) else json_text(v)


def table(head: Sequence[str], body: Sequence[Sequence[str]], cls: str = "",
           row_cls: Optional[Sequence[str]] = None) -> str:
    """A table; ``head`` is escaped, the cells are HTML already. A header starting with '#' is a number column;
    ``row_cls``: a CSS class per row ('' for none)."""
    num = [h.startswith("#") for h in head]
    th = "".join(f'<th class="num">{esc(h[1:])}</th>' if n else f"<th>{esc(h)}</th>" for h, n in zip(head, num))
    trs = []
    for j, row in enumerate(body):
        tds = "".join(f'<td class="num">{c}</td>' if i < len(num) and num[i] else f"<td>{c}</td>"
                      for i, c in enumerate(row))
        rc = row_cls[j] if row_cls is not None and j < len(row_cls) else ""
        trs.append((f'<tr class="{rc}">' if rc else "<tr>") + f"{tds}</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(trs)}</tbody></table>'


def kv_table(pairs: Sequence[Tuple[str, str]], per_row: int = 1) -> str:
    """A key/value table, ``per_row`` pairs a row; keys escaped, values HTML."""
    rows = [pairs[i:i + per_row] for i in range(0, len(pairs), per_row)]
    return '<table class="kv"><tbody>' + "".join(
        "<tr>" + "".join(f"<th>{esc(k)}</th><td>{v}</td>" for k, v in row) + "</tr>" for row in rows) + \
        "</tbody></table>"


def nodata(text: str) -> str:
    return f'<p class="nodata">no data: {esc(text)}</p>'


def dev_chip(ctx: ReportData, d: str) -> str:
    return (f'<span class="dev"><span class="chip" style="background:{ctx.colour.get(d, "#777")}"></span>'
            f"<code>{esc(d)}</code></span>")


def power_cell(r: ReportRow) -> str:
    if r.power is None:
        return NA
    return fixed(r.power, ".2f") + ('<span class="mod" title="modelled">*</span>' if r.modelled else "")


def energy_cell(r: ReportRow) -> str:
    if r.energy is None:
        return NA
    return fixed(r.energy, ".3f") + ('<span class="mod">*</span>' if r.modelled else "")


def clip(s: Any, n: int) -> str:
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


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
.k-modelled-power{background:#e1bee7}.k-emulated{background:#ffe0b2}
"""
