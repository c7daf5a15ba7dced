"""The HTML report of one run in the results store (``edgeprune report RUN [-o report.html]``).

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

The package: :mod:`.data` (the run read from the store), :mod:`.figures` (matplotlib), :mod:`.markup` (HTML building
blocks, CSS), :mod:`.sections` (the page). Public: :func:`render`, :func:`write`, :func:`default_output`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from edgeprune.errors import UsageError
from host.results.report.data import load
from host.results.report.sections import page

if TYPE_CHECKING:  # pragma: no cover
    from host.results.store import Store


DEFAULT_DIR = Path("results") / "reports"


def render(store: "Store", run_id: str) -> str:
    """The report of ``run_id`` as HTML text (ASCII: other characters are written as character references).
    UsageError (``RUN: no run ...``) when the store does not hold the run."""
    ctx = load(store, run_id)
    text = page(ctx)
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
