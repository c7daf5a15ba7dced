"""The code's rooms, checked: module sizes, the direction of imports, no import cycle, the agent's reach.

These read the source (``ast``), so they run in well under a second and fail with the file and line to fix.
The rules are the README's *Layout* section; the reasons are in ``../shared/ARCHITECTURE.md``.
"""
from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("agent", "edgeprune", "host")
MAX_LINES = 600


def _modules() -> Dict[str, Path]:
    """Every project module by dotted name (packages by their ``__init__``)."""
    out: Dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _imports(name: str, path: Path) -> Iterator[Tuple[str, int]]:
    """(imported project module, line) for every import statement in the module, at any depth (inside functions
    and ``TYPE_CHECKING`` blocks too: a lazy import still ties the two modules together)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = _package_of(name, path).split(".")
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [base]
            targets += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
        for t in targets:
            # importing a.b.c runs a/__init__ and a/b/__init__ first: each is a dependency too, except the
            # packages that hold the importer (already running when it runs) unless it names one itself
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in MODULES and dep != name and (i == len(parts) or not name.startswith(dep + ".")):
                    yield dep, node.lineno


def _graph() -> Dict[str, Dict[str, int]]:
    g: Dict[str, Dict[str, int]] = defaultdict(dict)
    for name, path in MODULES.items():
        for dep, line in _imports(name, path):
            g[name].setdefault(dep, line)
    return g


GRAPH = _graph()


def _where(src: str, dst: str) -> str:
    return f"{MODULES[src].relative_to(ROOT)}:{GRAPH[src][dst]} imports {dst}"


def _cycles(g: Dict[str, Dict[str, int]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


def test_no_module_is_over_600_lines():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these along their seams (limit {MAX_LINES} lines): {big}"


def test_no_import_cycle_between_project_modules():
    cycles = _cycles(GRAPH)
    detail = []
    for comp in cycles:
        members = set(comp)
        detail.append("; ".join(_where(a, b) for a in comp for b in GRAPH[a] if b in members))
    assert not cycles, "import cycles (lazy imports count):\n" + "\n".join(detail)


def test_the_cycle_check_finds_a_cycle():
    names = sorted(MODULES)[:3]
    fake = {names[0]: {names[1]: 1}, names[1]: {names[2]: 1}, names[2]: {names[0]: 1}}
    assert _cycles(fake) == [sorted(names)]
    assert _cycles({names[0]: {names[1]: 1}}) == []


# Which room may import which. A room is a dotted prefix; the first matching rule for a module applies.
FORBIDDEN = [
    ("agent", ("host", "edgeprune")),
    ("edgeprune", ("host",)),
    ("host.files", ("host.fleet", "host.search", "host.results", "host.commands", "host.cli")),
    ("host.fmt", ("host.fleet", "host.search", "host.results", "host.commands", "host.cli")),
    ("host.fleet", ("host.search", "host.results", "host.commands", "host.cli")),
    ("host.executors", ("host.fleet", "host.search", "host.results", "host.commands", "host.cli")),
    ("host.results", ("host.search", "host.commands", "host.cli")),
    ("host.search", ("host.commands", "host.cli")),
    ("host.commands", ("host.cli",)),
]


def _in(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def test_imports_only_go_down():
    bad = []
    for name in sorted(GRAPH):
        for room, banned in FORBIDDEN:
            if _in(name, room):
                bad += [_where(name, dep) for dep in GRAPH[name] if any(_in(dep, b) for b in banned)]
                break
    assert not bad, "imports against the layering (see the README's Layout):\n" + "\n".join(bad)


def test_the_agent_reads_as_python_38_and_imports_only_what_a_device_has():
    allowed_third_party = {"numpy", "psutil",
                           # runtimes and sensors, each imported lazily by the member that needs it
                           "onnxruntime", "openvino", "ai_edge_litert", "tflite_runtime", "tensorrt", "torch",
                           "pycuda", "cuda", "pynvml", "jtop"}
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for name, path in MODULES.items():
        if not _in(name, "agent"):
            continue
        src = path.read_text()
        try:
            ast.parse(src, str(path), feature_version=(3, 8))
        except SyntaxError as e:
            bad.append(f"{path.relative_to(ROOT)}:{e.lineno}: not Python 3.8 syntax: {e.msg}")
        for node in ast.walk(ast.parse(src)):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            for m in mods:
                top = m.split(".")[0]
                if top not in stdlib and top != "agent" and top not in allowed_third_party:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {m}")
    assert not bad, "\n".join(bad)


def _classes() -> Iterator[Tuple[str, ast.ClassDef]]:
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                yield name, node


def test_class_names_are_not_reused():
    """One meaning per public class name (two ``Store`` classes were two different things). Model code is exempt:
    ``nn.Module`` architectures keep the names of the upstream code they mirror (torchvision, the CIFAR ResNets)."""
    seen: Dict[str, List[str]] = defaultdict(list)
    for name, node in _classes():
        is_model = any(isinstance(b, ast.Attribute) and b.attr == "Module" for b in node.bases)
        if not node.name.startswith("_") and not is_model:
            seen[node.name].append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}")
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_exceptions_live_in_one_module_per_side():
    """The host's and the pruning engine's errors are in edgeprune/errors.py (the CLI maps them to exit codes);
    the agent's in its package's ``__init__`` (the device side cannot import edgeprune). Private control-flow
    exceptions (``_Name``) may stay beside their one user."""
    homes = {"edgeprune.errors", "agent", "agent.schema"}  # agent.schema: SchemaError, part of the contract
    bad = []
    for name, node in _classes():
        bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
        looks_like_error = any(re.search(r"(Error|Exception|Busy|Timeout)$", b) for b in bases)
        if looks_like_error and not node.name.startswith("_") and name not in homes:
            bad.append(f"{MODULES[name].relative_to(ROOT)}:{node.lineno}: class {node.name}")
    assert not bad, "exception classes outside the errors modules:\n" + "\n".join(bad)


def test_one_version_string():
    import agent

    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "agent.__version__"' in pyproject
    literal = re.compile(r"""["']%s["']""" % re.escape(agent.__version__))
    where = [str(p.relative_to(ROOT)) for p in MODULES.values() if literal.search(p.read_text())]
    assert where == ["agent/__init__.py"], where


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.count(".") <= 2 and
                                          MODULES[m].name == "__init__.py"))
def test_every_room_says_what_it_holds(module):
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text()))
    assert doc and len(doc) > 40, f"{MODULES[module].relative_to(ROOT)}: a room's __init__ states its contract"


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in MODULES.values()
               if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"say in a module docstring what each of these holds: {missing}"


def _registries():
    import agent.power
    import agent.runtimes
    from edgeprune import export
    from host import executors
    from host.search import algos
    return [("agent.runtimes", agent.runtimes._MEMBERS), ("agent.power", agent.power._MEMBERS),
            ("host.search.algos", algos.ALGORITHMS), ("host.executors", executors.EXECUTORS),
            ("edgeprune.exporters", {k: v + ":FORMATS" for k, v in export.REGISTRY.items()})]


@pytest.mark.parametrize("package, members", _registries(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_registry_line_names_a_member_module(package, members):
    """One registry line per member, naming its own module under the registry's package, where the member is
    registered under the same name (an exporter module's FORMATS may serve several names of one format)."""
    import importlib
    for name, where in members.items():
        module, _, attr = where.partition(":")
        assert module.startswith(package + ".") and module in MODULES, f"{package}: {name!r} -> {where}"
        obj = getattr(importlib.import_module(module), attr)
        if isinstance(obj, dict):
            assert name in obj, f"{module}.{attr} does not serve {name!r}"
        else:
            assert getattr(obj, "name", None) == name, f"{where} is not registered as {name!r}"


def test_the_cli_starts_without_torch():
    """`edgeprune` loads its commands without torch (1 s of a 1.5-s start on this VM): `regress`, `results`,
    `report`, `devices` and the parsers of the rest start in ~0.5 s; a command imports torch when it runs one."""
    import subprocess

    code = "import sys, host.cli; print(sorted(m for m in ('torch', 'torch_pruning', 'pandas') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
