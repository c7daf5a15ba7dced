"""The agent package's layout rules, checked on its source: every module has a docstring, stays under 600 lines,
parses as Python 3.8, imports nothing from ``host`` or ``edgeprune``, and no two modules import each other, directly
or round a loop (imports inside functions count; ``importlib.import_module`` by string does not). Every registry
line names a module that exists and a class registered under that name."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Set

import pytest

from agent import power, runtimes

AGENT = Path(__file__).resolve().parents[2] / "agent"
MAX_LINES = 600


def _modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(AGENT.rglob("*.py")):
        parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, known: Set[str]) -> Set[str]:
    """Every module this file imports, anywhere in it (``from a import b`` is ``a.b`` when that is a module)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = node.module + "." + a.name
                found.add(sub if sub in known else node.module)
    return found


def test_every_module_is_documented_short_and_python38() -> None:
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, feature_version=(3, 8))
        assert ast.get_docstring(tree), "%s has no module docstring" % name
        assert len(text.splitlines()) <= MAX_LINES, "%s has %d lines" % (name, len(text.splitlines()))


def test_the_agent_imports_no_host_code_and_has_no_import_cycle() -> None:
    modules = _modules()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        deps = _imports(path, set(modules))
        bad = sorted(d for d in deps if d.split(".")[0] in ("host", "edgeprune"))
        assert not bad, "%s imports %s" % (name, bad)
        graph[name] = {d for d in deps if d in modules and d != name}

    state: Dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(name: str, stack: List[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(dep):] + [name, dep]))
            if dep not in state:
                visit(dep, stack + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("package, members", [(runtimes, runtimes._MEMBERS), (power, power._MEMBERS)])
def test_every_registry_line_names_its_module_and_class(package: object, members: Dict[str, str]) -> None:
    for name, where in members.items():
        module, _, attr = where.partition(":")
        assert module.startswith(getattr(package, "__name__") + "."), where
        cls = getattr(importlib.import_module(module), attr)
        assert cls.name == name, where
