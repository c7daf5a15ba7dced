"""The gate's outputs: the console summary (a rich table, the notes, the rule and the verdict line) and JUnit XML.

Contract: both only render a :class:`~.model.Comparison` (the JSON document is :meth:`~.model.Comparison.to_dict`);
the JUnit file is written atomically, as ASCII with character references.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from host import fmt
from host.results.regress.checks import FIDELITY
from host.results.regress.model import ARROW, FAILING, Check, Comparison
from host.results.regress.stats import MAX_TEST_SAMPLES

if TYPE_CHECKING:  # pragma: no cover
    from rich.console import Console


def write_junit(comparison: Comparison, path: Any) -> Path:
    """Write the comparison as JUnit XML (one testsuite ``edgeprune.regress``, one testcase per check) atomically."""
    import xml.etree.ElementTree as ET

    from host.files import write_text_atomic

    counts = comparison.counts()
    failures = sum(counts[v] for v in FAILING)
    errors = counts["incomparable"] + (1 if comparison.pairs == 0 else 0)
    tests = len(comparison.checks) + (1 if comparison.pairs == 0 else 0)
    stats = dict(tests=str(tests), failures=str(failures), errors=str(errors), skipped=str(counts["not measured"] + counts["inconclusive"]))
    root = ET.Element("testsuites", name="edgeprune regress", time="0", **stats)
    suite = ET.SubElement(root, "testsuite", name="edgeprune.regress", time="0", **stats)
    props = ET.SubElement(suite, "properties")
    for k, v in (("baseline", comparison.baseline), ("candidate", comparison.candidate),
                 ("latency_tol", f"{comparison.latency_tol:g}"), ("energy_tol", f"{comparison.energy_tol:g}"),
                 ("accuracy_tol_pp", f"{comparison.accuracy_tol_pp:g}"), ("alpha", f"{comparison.alpha:g}"),
                 ("compare_anyway", str(comparison.compare_anyway).lower()),
                 ("min_agreement", _opt(comparison.min_agreement)), ("min_snr_db", _opt(comparison.min_snr_db))):
        if v is not None:
            ET.SubElement(props, "property", name=k, value=_xml_text(v))
    for c in comparison.checks:
        case = ET.SubElement(suite, "testcase", classname=_xml_text(c.classname), name=_xml_text(c.name), time="0")
        details = _xml_text(_details(c))
        if c.failed:
            el = ET.SubElement(case, "failure", message=_xml_text(c.message), type=c.verdict)
            el.text = details
        elif c.verdict == "incomparable":
            el = ET.SubElement(case, "error", message=_xml_text(c.message), type="incomparable")
            el.text = details
        elif c.verdict in ("not measured", "inconclusive"):
            ET.SubElement(case, "skipped", message=_xml_text(c.message))
        else:
            ET.SubElement(case, "system-out").text = details
    if comparison.pairs == 0:
        case = ET.SubElement(suite, "testcase", classname="edgeprune.regress", name="pairs", time="0")
        ET.SubElement(case, "error", message=_xml_text(comparison.error or "no pairs"), type="no-pairs")
    if comparison.notes:
        ET.SubElement(suite, "system-out").text = _xml_text("\n".join(comparison.notes))
    ET.indent(root)
    # ASCII with character references (→ as &#8594;): the file is the same whatever the locale's encoding
    text = ET.tostring(root, encoding="us-ascii", xml_declaration=False).decode("ascii")
    return write_text_atomic(Path(path), '<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n")


def _opt(v: Optional[float]) -> Optional[str]:
    return None if v is None else f"{v:g}"


_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _xml_text(s: Any) -> str:
    """Text XML 1.0 can hold (control characters from error messages replaced)."""
    return _XML_BAD.sub("?", str(s))


def _details(c: Check) -> str:
    lines = [f"{c.verdict}: {c.message}"]
    if c.p is not None:
        lines.append(f"p (candidate slower) = {c.p:.3g}, p (candidate faster) = {c.p_faster:.3g}, "
                     f"samples {c.n_baseline} / {c.n_candidate} after thinning")
    lines.extend(f"note: {n}" for n in c.notes)
    if c.changes:
        lines.append("changed: " + ", ".join(c.changes))
    if c.differences:
        lines.append("compared anyway although: " + "; ".join(c.differences))
    return "\n".join(lines)


_COLOURS = {"pass": "green", "improved": "cyan", "regression": "red", "missing": "red", "failed": "red",
            "incomparable": "magenta", "not measured": "dim", "inconclusive": "yellow"}


def _value(c: Check, v: Optional[float]) -> str:
    if v is None:
        return fmt.NA
    if c.metric in ("accuracy", "agreement"):
        return f"{v:.2%}"
    if c.metric == "snr":
        return f"{v:.1f} dB"
    return f"{v:.4g} {c.unit}" + ("*" if c.modelled else "")


def _p_text(p: Optional[float]) -> str:
    if p is None:
        return fmt.NA
    return "<1e-300" if p < 1e-300 else f"{p:.2g}"


def _fidelity_rule(comp: Comparison) -> str:
    parts = []
    if comp.min_agreement is not None:
        parts.append(f"agreement when the candidate's top-1 agreement with the dense model is below "
                     f"{comp.min_agreement:.2%}")
    if comp.min_snr_db is not None:
        parts.append(f"snr when the candidate's SNR against the dense model's outputs is below {comp.min_snr_db:g} dB")
    if not parts:
        return "; label-free fidelity (agreement, SNR) not gated (--min-agreement, --min-snr-db)"
    return ("; " + "; ".join(parts) + " (absolute bounds on the candidate's worst trial; not measured when its "
            "reports lack them)")


def print_summary(comp: Comparison, console: "Console") -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"edgeprune regress: {escape(comp.baseline)} {ARROW} {escape(comp.candidate)}")
    for col in ("device", "model/label", "metric"):
        table.add_column(col)
    for col in ("baseline", "candidate", "change", "95% CI", "p"):
        table.add_column(col, justify="right")
    table.add_column("verdict")
    for c in comp.checks:
        if c.change is None:
            change = fmt.NA
        elif c.metric in ("accuracy", "agreement"):
            change = f"{c.change:+.2f} pp"
        elif c.metric == "snr":
            change = f"{c.change:+.1f} dB"
        else:
            change = fmt.change(c.change)
        ci = (f"{fmt.change(c.ci[0] - 1)}…{fmt.change(c.ci[1] - 1)}" if c.ci and all(map(math.isfinite, c.ci))
              else fmt.NA)
        p = c.p if (c.change or 0) >= 0 else c.p_faster
        verdict = c.verdict + (" (modelled)" if c.modelled and c.verdict != "not measured" else "")
        table.add_row(escape(c.device_id), escape(f"{c.model or '-'}/{c.label}"), c.metric, _value(c, c.baseline),
                      _value(c, c.candidate), change, ci, _p_text(p),
                      f"[{_COLOURS.get(c.verdict, 'white')}]{verdict}[/]")
    if comp.checks:
        console.print(table)
    shown = set()
    for c in comp.checks:
        key = (c.device_id, c.model, c.label)
        if key in shown:
            continue
        shown.add(key)
        extra = []
        if c.changes:
            extra.append("changed: " + ", ".join(c.changes))
        pair = [cc for cc in comp.checks if (cc.device_id, cc.model, cc.label) == key]
        # what decided fidelity: the agreement/SNR checks' reading, and why top-1 was not measured
        extra.extend(f"{cc.metric}: {cc.message}" for cc in pair
                     if cc.message and cc.verdict in ("pass", "regression", "not measured")
                     and (cc.metric in FIDELITY or (cc.metric == "accuracy" and cc.verdict == "not measured")))
        extra.extend(f"{cc.metric}: decided over repetitions: {cc.rule}" for cc in pair if cc.rule)
        extra.extend(dict.fromkeys(n for cc in pair for n in cc.notes))
        for line in extra:
            console.print(f"{c.device_id} {c.model or '-'}/{c.label}: {line}", highlight=False, markup=False)
    for i in comp.incomparable:
        console.print(("[yellow]compared anyway[/] " if i.compared else "[magenta]incomparable[/] ")
                      + escape(i.message), highlight=False)
    for n in comp.notes:
        console.print(f"note: {n}", highlight=False, markup=False)
    if any(c.modelled for c in comp.checks):
        console.print("* energy from MODELLED power (no sensor) on at least one side: a model, not a measurement.",
                      highlight=False)
    console.print(f"rule: latency measured in repetitions on both sides regresses when the median of the run "
                  f"medians grew by more than max(tolerance {comp.latency_tol:.1%}, the noise floor) AND a one-sided "
                  f"Mann-Whitney test over the run medians gives p < {comp.alpha:g} (inconclusive when the runs are "
                  f"too few to reach it, the effect lacks confidence, or a window reported unstable timings); "
                  f"latency from one window a side, and energy: a one-sided Mann-Whitney test (<= {MAX_TEST_SAMPLES} "
                  f"thinned samples) gives p < {comp.alpha:g} AND the median grew by more than the tolerance "
                  f"(latency {comp.latency_tol:.1%}, energy {comp.energy_tol:.1%}); accuracy when top-1 fell by "
                  f"more than {comp.accuracy_tol_pp:g} pp (not measured without labels on both sides)"
                  + _fidelity_rule(comp) + ". p shown in the direction of the change.",
                  highlight=False, style="dim")
    counts = comp.counts()
    tally = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    if comp.pairs == 0:
        console.print(f"[magenta]NO PAIRS[/]: {escape(comp.error or '')}", highlight=False)
    elif comp.exit_code == 2:
        console.print(f"[magenta]INCOMPARABLE[/]: {len(comp.refused)} pair(s) cannot be compared "
                      f"({tally}); fix the runs or pass --compare-anyway", highlight=False)
    elif comp.exit_code == 1:
        console.print(f"[red]FAIL[/]: {len(comp.failures)} failing check(s) of {len(comp.checks)} ({tally})",
                      highlight=False)
    elif comp.exit_code == 3:
        console.print(f"[yellow]INCONCLUSIVE[/]: {len(comp.inconclusive)} check(s) of {len(comp.checks)} could not "
                      f"be decided ({tally}); measure again (more repetitions, a quieter device)", highlight=False)
    else:
        console.print(f"[green]PASS[/]: {len(comp.checks)} check(s) over {comp.pairs} pair(s) ({tally})",
                      highlight=False)
