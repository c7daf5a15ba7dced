"""Rewrite the README's Reliability table from the tests that define it.

    python scripts/reliability_table.py [--pytest-args "..."] [--from FILE]

Runs every test marked ``@pytest.mark.reliability(kind, what, expected)`` (the fault-injection suite, the
bad-input catalogue, the faults the local transport and fleet tests inject, and the Ray executor's) with ``EDGEPRUNE_RELIABILITY_OUT`` set, so ``tests/conftest.py`` records each one's outcome,
then replaces the table between the ``<!-- reliability:begin -->`` and ``<!-- reliability:end -->`` markers in
README.md: one row per test, with the fault or bad input, the behaviour the test asserts, its outcome in this run
and its duration. ``--from FILE`` re-renders from an earlier run's JSON lines instead of running the tests.
``tests/test_reliability_table.py`` checks that the README lists exactly the marked tests.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
# the test files holding reliability-marked tests (tests/test_reliability_table.py collects the same ones)
SOURCES = ("tests/test_faults.py", "tests/test_bad_inputs.py", "tests/test_transport.py", "tests/test_fleet.py",
           "tests/test_ray_executor.py")
ICON = {"passed": "passed", "failed": "**FAILED**", "skipped": "skipped", "xfailed": "known gap (xfail)"}


def render(rows, when: str) -> str:
    order = {"fault": 0, "bad-input": 1}
    rows = sorted(rows, key=lambda r: (order.get(r.get("kind"), 9), r["test"]))
    out = [BEGIN, "", f"Produced by `python scripts/reliability_table.py` on {when}.", "",
           "| kind | fault or bad input | asserted behaviour | outcome | s | test |",
           "| --- | --- | --- | --- | --- | --- |"]
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    for r in rows:
        test = r["test"].split("::")
        out.append(f"| {r.get('kind', '')} | {cell(r.get('what', ''))} | {cell(r.get('expected', ''))} | "
                   f"{ICON.get(r['outcome'], r['outcome'])} | {r['seconds']:g} | `{cell(test[0] + '::' + test[-1])}` |")
    out += ["", END]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments")
    ap.add_argument("--from", dest="src", type=Path, default=None, help="render from this JSON-lines file")
    args = ap.parse_args(argv)
    if args.src is None:
        fd, name = tempfile.mkstemp(suffix=".jsonl")
        os.close(fd)
        src = Path(name)
        src.write_text("")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SOURCES,
               *shlex.split(args.pytest_args)]
        rc = subprocess.call(cmd, cwd=ROOT, env=dict(os.environ, EDGEPRUNE_RELIABILITY_OUT=str(src)))
        print(f"pytest exited {rc}", file=sys.stderr)
    else:
        src = args.src
    rows = {}
    for line in src.read_text().splitlines():
        r = json.loads(line)
        rows[r["test"]] = r        # the last word for each test
    if not rows:
        print("no reliability-marked test ran", file=sys.stderr)
        return 1
    when = f"{time.strftime('%Y-%m-%d')}, {platform.machine()} Linux {platform.release()}, {os.cpu_count()} CPUs"
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md has no {BEGIN} … {END} block", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(head + render(rows.values(), when) + tail)
    failed = sum(r["outcome"] == "failed" for r in rows.values())
    print(f"README.md: {len(rows)} rows, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
