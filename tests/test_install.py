"""The install story: the README's two commands, constraints.txt (the tested set) and the warning policy.

A fresh install once failed before collecting a single test: a newer pytest deprecated an alias that anyio's
pytest plugin imports, and ``filterwarnings = error`` made that fatal at plugin load (issue 14). These tests pin
the pieces that keep that from recurring: the lock covers every requirement and agrees with pyproject.toml, CI
installs with it, and third-party deprecations are shown while the project's own stay errors.
"""
from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _constraints() -> dict:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+!\-]+)", line)
        assert m, f"constraints.txt:{n}: not a 'name==version' pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt:{n}: {m.group(1)} pinned twice"
        pins[name] = m.group(2)
    return pins


def _requirements(extras=("test",)) -> list:
    proj = _pyproject()["project"]
    reqs = [Requirement(r) for r in proj["dependencies"]]
    for e in extras:
        reqs += [Requirement(r) for r in proj["optional-dependencies"][e]]
    return reqs


def test_constraints_pin_every_requirement_within_pyproject_bounds():
    pins = _constraints()
    assert "edgeprune" not in pins, "the project itself must not be pinned (it is installed editable)"
    for req in _requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt: no pin for {req.name} (required by pyproject.toml)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"constraints.txt: {req.name}=={pins[name]} is outside pyproject.toml's {req.specifier}"
        for extra in req.extras:  # psycopg[binary] -> psycopg-binary
            assert canonicalize_name(f"{req.name}-{extra}") in pins or extra not in ("binary",), \
                f"constraints.txt: no pin for {req.name}[{extra}]'s package"


def test_the_default_install_has_the_three_runtimes_and_tflite_export():
    """onnxruntime, OpenVINO and a LiteRT interpreter (with litert-torch for export) without asking for an extra;
    on Linux x86-64, this machine's platform, the LiteRT stack's markers hold."""
    env = {"sys_platform": "linux", "platform_machine": "x86_64"}
    default = {canonicalize_name(r.name) for r in _requirements(extras=()) if r.marker is None or r.marker.evaluate(env)}
    assert {"onnxruntime", "openvino", "ai-edge-litert", "litert-torch"} <= default
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["openvino"] == [] and extras["tflite"] == []     # old install lines still resolve


def test_constraints_pin_torch_without_local_label():
    # '==2.13.0' matches the CPU build on disk and the same release from any index; '+cpu' would not
    assert _constraints()["torch"] == "2.13.0"


def test_ci_installs_with_the_constraints_and_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-c constraints.txt" in ci and "--latest" in ci
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert len(block) == 2, "the README starts with exactly two set-up commands"
    install, test = block
    assert "edgeprune demo" in install
    assert re.search(r"^python -m pytest$", ci, re.M) and test == "python -m pytest"
    assert "pip install -c constraints.txt" in readme, "the README offers the tested set"


def _warn_from(module_name: str) -> None:
    mod = types.ModuleType(module_name)
    exec("import warnings\ndef go():\n    warnings.warn('old API', DeprecationWarning)\n", mod.__dict__)
    mod.go()


def test_third_party_deprecations_are_shown_not_fatal():
    with warnings.catch_warnings(record=True) as seen:  # keeps the configured filters, records what they let by
        _warn_from("somelib.internal")
    assert [str(w.message) for w in seen] == ["old API"]


@pytest.mark.parametrize("module", ["edgeprune.models", "host.cli", "agent", "tests.test_install"])
def test_project_deprecations_stay_errors(module):
    with pytest.raises(DeprecationWarning, match="old API"):
        _warn_from(module)


def test_other_warnings_stay_errors_everywhere():
    with pytest.raises(UserWarning):
        warnings.warn_explicit("odd", UserWarning, "x.py", 1, module="somelib.internal")


def test_anyio_plugin_is_not_loaded(pytestconfig):
    assert not pytestconfig.pluginmanager.has_plugin("anyio")
    assert "anyio" not in {getattr(p, "__name__", "") for p in pytestconfig.pluginmanager.get_plugins()}
    assert "no:anyio" in " ".join(pytestconfig.getini("addopts"))
