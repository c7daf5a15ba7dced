#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions of every package the test suite was last green with.
#
#   bash scripts/update_constraints.sh            # newest allowed versions, full CI run, then write the file
#   bash scripts/update_constraints.sh --no-test  # resolve and write without running the suite (to inspect a
#                                                 # resolve; the header then says the suite was not run)
#
# It runs `.ci/run --latest` (CI's own setup: system packages, PostgreSQL, a fresh venv with the newest versions
# pyproject.toml allows, then `python -m pytest`) in a venv of its own, and only when that passes writes
# `pip freeze` of that venv to constraints.txt. The file pins the tested set for the interpreter and platform it
# was made on (its header says which); pyproject.toml keeps its open lower bounds for library users.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN_TESTS=1
case "${1:-}" in
    "") ;;
    --no-test) RUN_TESTS=0 ;;
    *) echo "update_constraints: unknown argument '$1' (expected nothing or --no-test)" >&2; exit 2 ;;
esac
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export EDGEPRUNE_CI_VENV="$TMP/venv"

if [ "$RUN_TESTS" = 1 ]; then
    bash .ci/run --latest \
        || { echo "update_constraints: the test suite failed with these versions; constraints.txt unchanged" >&2; exit 1; }
else
    python3 -m venv "$EDGEPRUNE_CI_VENV"
    "$EDGEPRUNE_CI_VENV/bin/python" -m pip install --quiet torch==2.13.0
    "$EDGEPRUNE_CI_VENV/bin/python" -m pip install --quiet -e '.[test,ray]' torch==2.13.0
fi

PY="$EDGEPRUNE_CI_VENV/bin/python"
{
    echo "# The versions the test suite was last green with: \`pip install -c constraints.txt ...\` installs exactly these."
    echo "# Made by scripts/update_constraints.sh on $(date -u +%Y-%m-%d) with $("$PY" -V) on $(uname -sm)$([ "$RUN_TESTS" = 1 ] || echo ' (suite NOT run)')."
    echo "# .ci/run installs with it; '.ci/run --latest' installs the newest versions pyproject.toml allows instead."
    # the project itself is editable (not pinned); torch is pinned without its local label (+cpu): '==2.13.0'
    # then matches the CPU build on this disk and the same release from any index
    "$PY" -m pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -vc '^#' constraints.txt) packages)"
