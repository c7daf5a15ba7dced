"""The README's Reliability table lists exactly the tests marked ``@pytest.mark.reliability`` (and what they
assert): a fault or bad input cannot be added without its row, nor a row kept for a test that is gone. The table
itself is written by ``python scripts/reliability_table.py`` from a run of those tests."""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = runpy.run_path(str(ROOT / "scripts" / "reliability_table.py"))    # what writes the table
BEGIN, END, SOURCES = SCRIPT["BEGIN"], SCRIPT["END"], SCRIPT["SOURCES"]


def marked(tmp_path):
    """{test id: (kind, what, expected)} of every reliability-marked test, as pytest collects them."""
    out = tmp_path / "marked.jsonl"
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *SOURCES],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, EDGEPRUNE_RELIABILITY_LIST=str(out)))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {}
    for line in out.read_text().splitlines():
        d = json.loads(line)
        assert d.get("kind") in ("fault", "bad-input") and d.get("what") and d.get("expected"), d
        rows[d["test"]] = (d["kind"], d["what"].replace("\n", " "), d["expected"].replace("\n", " "))
    return rows


def readme_rows():
    text = (ROOT / "README.md").read_text()
    assert BEGIN in text and END in text, "README.md lacks the reliability table markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 6 and cells[0] in ("fault", "bad-input"):
            rows[cells[5].strip("`")] = (cells[0], cells[1], cells[2])
    return rows


def short(test_id: str) -> str:
    parts = test_id.split("::")
    return f"{parts[0]}::{parts[-1]}"


def test_readme_table_lists_exactly_the_marked_tests(tmp_path):
    tests = {short(k): v for k, v in marked(tmp_path).items()}
    readme = readme_rows()
    assert len(tests) >= 20, "the fault suite and the bad-input catalogue define the table"
    missing = sorted(set(tests) - set(readme))
    extra = sorted(set(readme) - set(tests))
    assert not missing, f"marked tests with no README row (run scripts/reliability_table.py): {missing[:5]}"
    assert not extra, f"README rows with no such test: {extra[:5]}"
    differ = [t for t in tests if tests[t] != readme[t]]
    assert not differ, f"README rows whose text differs from the test's mark: {differ[:5]}"
