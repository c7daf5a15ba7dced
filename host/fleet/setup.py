"""``edgeprune devices setup``: provision each SSH device for the agent.

Per device (in parallel, one failing never stops the others):

1. ask the device's system Python (``setup.python``) what it is: version, machine, glibc, home, whether it has
   ``venv``, and whether it runs under emulation (:mod:`agent.emulation`, sent inline: nothing is installed yet);
2. resolve the requirements: ``setup.packages`` (what the agent imports) and ``setup.runtimes[name]`` for the
   device's runtime and each ``--runtime``, with the versions of the first ``setup.known_good`` entry whose
   conditions (machine, python, emulated) hold -- measured versions, in the class files;
3. make the venv (``setup.venv``) if it is not there and install into it: from the device's own package index
   (``pip install``), or with ``wheels_from_host`` from wheels this machine downloads for the device's platform
   (``pip download --only-binary=:all: --platform ...``), pushed through the device's content-addressed cache
   over SFTP and installed with ``--no-index``;
4. import each package in its own process there (a runtime that crashes at import is named, with its signal);
5. write what was installed into the venv (``edgeprune-setup.json``: the agent reports it in every report's
   identity, so the versions are in each measurement's provenance) and point the device file's ``python:`` at the
   venv's Python.

Idempotent: a venv whose record has the same requirements and whose packages import is left as it is.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from edgeprune.errors import DeviceError, UsageError
from host.fleet.devices import DeviceConfig, SetupConfig

Events = Callable[[str, str], None]
RECORD = "edgeprune-setup.json"        # agent.probe.SETUP_RECORD
# requirement project name -> import name, where they differ from name.replace("-", "_")
IMPORT_NAMES = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime", "onnxruntime-gpu": "onnxruntime",
                "onnxruntime-openvino": "onnxruntime", "opencv-python": "cv2", "pyyaml": "yaml"}
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EMULATION_SRC = (Path(__file__).resolve().parents[2] / "agent" / "emulation.py").read_text()
PROBE = ("import importlib.util, json, os, platform, sys\n"
         + _EMULATION_SRC.replace("from __future__ import annotations\n", "") +
         "\nprint(json.dumps({'python': '%d.%d.%d' % sys.version_info[:3], 'machine': platform.machine(),"
         " 'glibc': platform.libc_ver()[1], 'home': os.path.expanduser('~'),"
         " 'venv': importlib.util.find_spec('ensurepip') is not None, 'emulation': detect()}))\n")
VERSIONS = ("import json, sys\nfrom importlib import metadata\nout = {}\nfor d in sys.argv[1:]:\n"
            "    try:\n        out[d] = metadata.version(d)\n    except metadata.PackageNotFoundError:\n"
            "        out[d] = None\nprint(json.dumps(out))\n")
LINKS = ("import json, os, sys\nfolder, links = sys.argv[1], json.loads(sys.argv[2])\nos.makedirs(folder, exist_ok=True)\n"
         "for name, target in links.items():\n    p = os.path.join(folder, name)\n    if os.path.lexists(p):\n"
         "        os.unlink(p)\n    os.symlink(target, p)\n")


def project(req: str) -> str:
    m = _NAME.match(req)
    if m is None:
        raise UsageError(f"setup: {req!r} is not a requirement (NAME[SPECIFIER])")
    return m.group(1)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(cfg: SetupConfig, runtimes: Sequence[str], facts: Dict[str, Any],
                 where: str = "setup") -> Tuple[List[str], Optional[str]]:
    """The requirement lines for ``runtimes`` on a device with ``facts`` (machine, python, emulated), and the
    ``measured`` note of the known-good entry that pinned them (None when none applied)."""
    reqs = list(cfg.packages)
    for name in runtimes:
        if name not in cfg.runtimes:
            raise UsageError(f"{where}: setup.runtimes has no packages for runtime {name!r} (it has: "
                             f"{', '.join(sorted(cfg.runtimes)) or 'none'}); a runtime that comes with the board's "
                             "image (TensorRT with JetPack) is not installed by setup")
        reqs += [r for r in cfg.runtimes[name] if r not in reqs]
    py = ".".join(str(facts.get("python", "")).split(".")[:2])
    for entry in cfg.known_good:
        when = entry.when
        if ("machine" in when and str(when["machine"]) != facts.get("machine")) or \
                ("python" in when and str(when["python"]) != py) or \
                ("emulated" in when and bool(when["emulated"]) != bool(facts.get("emulated"))):
            continue
        pins = {_norm(k): v for k, v in entry.pins.items()}
        reqs = [f"{project(r)}=={pins[_norm(project(r))]}" if _norm(project(r)) in pins else r for r in reqs]
        return reqs, entry.measured or "known good"
    return reqs, None


def _import_name(req: str) -> str:
    name = _norm(project(req))
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


class _Device:
    """One device's setup over its SSH connection."""

    def __init__(self, dev: DeviceConfig, events: Events, timeout_s: float) -> None:
        from host.fleet.ssh.transport import SSHTransport

        self.dev, self.timeout_s = dev, timeout_s
        self.say = lambda msg: events(dev.id, msg)
        self.t = SSHTransport(dev, session=False)

    def run(self, argv: Sequence[str], what: str, timeout: Optional[float] = None) -> Tuple[int, str, str]:
        """``argv`` on the device (``what`` names it in logs) -> (exit status, stdout, stderr)."""
        return self.t.run(list(argv), timeout=timeout or self.dev.ssh.command_timeout_s)

    def python_json(self, python: str, script: str, *args: str, what: str) -> Any:
        rc, out, err = self.run([python, "-c", script, *args], what)
        if rc != 0:
            raise DeviceError(f"{what}: {python} exited {_rc(rc)}: {err.strip()[-800:]}")
        try:
            return json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise DeviceError(f"{what}: unexpected output from {python}: {out.strip()[-300:]!r}") from None


def _rc(rc: int) -> str:
    if rc == -1:                  # SSH reports a signal death without its number
        return "killed by a signal"
    if rc < 0 or rc > 128:
        num = -rc if rc < 0 else rc - 128
        try:
            return f"with signal {signal.Signals(num).name}"
        except ValueError:
            return f"with signal {num}"
    return str(rc)


def setup_device(dev: DeviceConfig, extra_runtimes: Sequence[str] = (), wheels_from_host: bool = False,
                 timeout_s: float = 1800.0, events: Events = lambda dev, msg: None) -> Dict[str, Any]:
    """Set ``dev`` up (see the module docstring); a result dict (``status``: installed, up to date, nothing to do,
    failed, with ``error``)."""
    if dev.transport != "ssh":
        return {"status": "nothing to do", "note": "the local device runs in edgeprune's own environment"}
    d = _Device(dev, events, timeout_s)
    cfg, where = dev.setup, dev.source or f"device {dev.id}"
    try:
        facts = d.python_json(cfg.python, PROBE, what=f"{dev.id}: asking {cfg.python} what it is")
        facts["emulated"] = bool((facts.get("emulation") or {}).get("emulated"))
        result: Dict[str, Any] = {"python": facts["python"], "machine": facts["machine"], "emulated": facts["emulated"]}
        runtimes = [dev.runtime.name] + [r for r in extra_runtimes if r != dev.runtime.name]
        reqs, pinned_by = requirements(cfg, runtimes, facts, where)
        venv = cfg.venv.replace("~", facts["home"], 1) if cfg.venv.startswith("~") else cfg.venv
        venv_py = venv.rstrip("/") + "/bin/python"
        result.update(venv=venv, requirements=reqs, pinned_by=pinned_by)
        d.say(f"{facts['machine']}, Python {facts['python']}{' (emulated)' if facts['emulated'] else ''}: "
              f"{' '.join(reqs)}")
        record = _record(d, venv_py)
        if record is not None and record.get("requirements") == reqs and _imports_ok(d, venv_py, reqs):
            result.update(status="up to date", versions=record.get("versions"))
        else:
            if not facts.get("venv"):
                raise DeviceError(f"{cfg.python} has no venv module (ensurepip): on Debian and Raspberry Pi OS, "
                                  "`sudo apt install python3-venv` on the device")
            rc, _, err = d.run([cfg.python, "-m", "venv", venv], "venv", timeout=600)
            if rc != 0:
                raise DeviceError(f"{cfg.python} -m venv {venv} failed ({_rc(rc)}): {err.strip()[-600:]}")
            t0 = time.monotonic()
            if wheels_from_host:
                source = _install_from_host(d, venv, venv_py, facts, reqs)
            else:
                d.say("pip install from the device's package index")
                rc, out, err = d.run([venv_py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                                      *reqs], "pip install", timeout=timeout_s)
                if rc != 0:
                    raise DeviceError(f"pip install on the device failed ({_rc(rc)}): {(err or out).strip()[-1200:]}")
                source = "device index"
            _check_imports(d, venv_py, reqs, facts)
            versions = d.python_json(venv_py, VERSIONS, *[project(r) for r in reqs], what="installed versions")
            record = {"requirements": reqs, "versions": versions, "source": source, "pinned_by": pinned_by,
                      "python": facts["python"], "machine": facts["machine"], "emulated": facts["emulated"],
                      "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.monotonic() - t0, 1)}
            rc, _, err = d.run([venv_py, "-c", "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
                                venv.rstrip("/") + "/" + RECORD, json.dumps(record)], "record")
            if rc != 0:
                raise DeviceError(f"cannot write {venv}/{RECORD}: {err.strip()[-300:]}")
            result.update(status="installed", versions=versions, source=source)
        result["python_set"] = _point_python(dev, venv_py)
        if result["python_set"]:
            d.say(f"{where}: python: {venv_py}")
        return result
    except (DeviceError, UsageError, OSError) as e:
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    finally:
        d.t.close()


def _record(d: _Device, venv_py: str) -> Optional[Dict[str, Any]]:
    rc, out, _ = d.run([venv_py, "-c", "import sys, os; print(open(os.path.join(sys.prefix, %r)).read())" % RECORD],
                       "record")
    try:
        return json.loads(out) if rc == 0 else None
    except ValueError:
        return None


def _imports_ok(d: _Device, venv_py: str, reqs: Sequence[str]) -> bool:
    rc, _, _ = d.run([venv_py, "-c", "import " + ", ".join(sorted({_import_name(r) for r in reqs}))], "imports")
    return rc == 0


def _check_imports(d: _Device, venv_py: str, reqs: Sequence[str], facts: Dict[str, Any]) -> None:
    """Import every package in its own process: a runtime that crashes at import is named with its signal."""
    for req in reqs:
        mod = _import_name(req)
        rc, _, err = d.run([venv_py, "-c", f"import {mod}"], f"import {mod}")
        if rc != 0:
            emulated = " (under qemu-user emulation)" if facts.get("emulated") else ""
            raise DeviceError(f"{req} is installed but `import {mod}` fails{emulated} ({_rc(rc)}): "
                              f"{err.strip()[-400:] or 'no message'}; pin a version known to work in the device "
                              f"file's setup.known_good (the class files list measured ones)")


def wheel_platforms(machine: str, glibc: str) -> List[str]:
    """pip ``--platform`` tags a device with this machine and glibc (``2.36``) installs."""
    try:
        minor = int(glibc.split(".")[1])
    except (IndexError, ValueError):
        minor = 17
    tags = [f"manylinux_2_{m}_{machine}" for m in range(minor, 16, -1)]
    return tags + [f"manylinux2014_{machine}", f"linux_{machine}"]


def wheel_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeprune" / "wheels"


def _install_from_host(d: _Device, venv: str, venv_py: str, facts: Dict[str, Any], reqs: Sequence[str]) -> str:
    from edgeprune.models import sha256_file

    py = "".join(str(facts["python"]).split(".")[:2])
    folder = wheel_cache() / f"cp{py}-{facts['machine']}"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input",
           "--only-binary=:all:", "--dest", str(folder), "--python-version", py, "--implementation", "cp",
           "--abi", f"cp{py}"]
    for tag in wheel_platforms(facts["machine"], facts.get("glibc") or ""):
        cmd += ["--platform", tag]
    d.say(f"downloading wheels for cp{py} {facts['machine']} here, into {folder}")
    r = subprocess.run(cmd + list(reqs), capture_output=True, text=True, timeout=d.timeout_s)
    if r.returncode != 0:
        raise DeviceError(f"pip download for the device's platform (cp{py}, {facts['machine']}) failed: "
                          f"{(r.stderr or r.stdout).strip()[-1200:]}")
    names = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", r.stdout)
    wheels = [Path(n) for n in names] or sorted(folder.glob("*.whl"))
    links = {}
    for w in wheels:
        w = w if w.is_absolute() else folder / w.name
        links[w.name] = d.t.ensure_file(w, sha256_file(w))
    d.say(f"pushed {len(links)} wheels ({sum(w.stat().st_size for w in wheels) / 1e6:.0f} MB) through the device cache")
    wheel_dir = venv.rstrip("/") + "-wheels"
    rc, _, err = d.run([venv_py, "-c", LINKS, wheel_dir, json.dumps(links)], "wheel links")
    if rc != 0:
        raise DeviceError(f"cannot link the wheels on the device: {err.strip()[-400:]}")
    rc, out, err = d.run([venv_py, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-index",
                          "--find-links", wheel_dir, *reqs], "pip install --no-index", timeout=d.timeout_s)
    if rc != 0:
        raise DeviceError(f"pip install from the pushed wheels failed ({_rc(rc)}): {(err or out).strip()[-1200:]}")
    return "wheels from host"


def _point_python(dev: DeviceConfig, venv_py: str) -> bool:
    """The device file's ``python:`` set to ``venv_py``; whether it changed."""
    from host.fleet.edit import set_value

    if dev.python == venv_py or dev.source is None:
        return False
    return set_value(Path(dev.source), dev.id, ("python",), venv_py)


def setup_devices(devices: List[DeviceConfig], extra_runtimes: Sequence[str] = (), wheels_from_host: bool = False,
                  timeout_s: float = 1800.0, events: Events = lambda dev, msg: None) -> Dict[str, Dict[str, Any]]:
    from agent.runtimes import runtime_names

    for name in extra_runtimes:
        if name not in runtime_names():
            raise UsageError(f"--runtime: unknown runtime {name!r}; known: {', '.join(runtime_names())}")
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(devices)))) as pool:
        futures = {d.id: pool.submit(setup_device, d, extra_runtimes, wheels_from_host, timeout_s, events)
                   for d in devices}
        return {k: f.result() for k, f in futures.items()}
