"""What this device is: identity, firmware, installed runtimes, power sensors.

Everything read from files goes through ``root`` (default ``/``) so tests can point it at a captured tree.
A file that is missing or unreadable means the key is absent, never an exception. Parsers are pure functions.
Runtimes are found with ``importlib.util.find_spec`` and ``importlib.metadata`` only: probing never imports them,
except OpenVINO and onnxruntime when ``probe(devices=True)`` asks which devices / providers they see.
The Edge TPU is found by its library (``ctypes.util.find_library``), its PCIe node (``/dev/apex_N``) or its
USB ids; power is ``"modelled only"`` when no power sensor is found.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import agent
from agent import emulation, power, thermal
from agent.schema import Identity

# import name -> distribution names that may provide it, in order of preference
RUNTIME_MODULES = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "openvino": ("openvino",),
    "tflite_runtime": ("tflite-runtime",),
    "ai_edge_litert": ("ai-edge-litert",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
    "torch": ("torch",),
}

# agent backend -> the import names that provide it, in the order the backend tries them
BACKEND_MODULES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",),
                   "tflite": ("ai_edge_litert", "tflite_runtime"), "tensorrt": ("tensorrt",), "torch": ("torch",)}

# Coral USB Accelerator ids: before its firmware is loaded (Global Unichip) and after (Google)
EDGETPU_USB_IDS = {("1a6e", "089a"), ("18d1", "9302")}

# L4T release -> JetPack release, from NVIDIA's JetPack archive (only releases we have checked)
L4T_TO_JETPACK = {"32.7.1": "4.6.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3", "36.3.0": "6.0", "36.4.0": "6.1",
                  "36.4.3": "6.2"}

_L4T_RE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)(.*)$")


def parse_l4t_release(text: str) -> Optional[Dict[str, str]]:
    """Parse /etc/nv_tegra_release, e.g. ``# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, ...``."""
    for line in text.splitlines():
        m = _L4T_RE.match(line.strip())
        if not m:
            continue
        out = {"l4t": "%s.%s" % (m.group(1), m.group(2))}
        for part in m.group(3).split(","):
            key, sep, value = part.partition(":")
            if sep and key.strip():
                out[key.strip().lower()] = value.strip()
        if out["l4t"] in L4T_TO_JETPACK:
            out["jetpack"] = L4T_TO_JETPACK[out["l4t"]]
        return out
    return None


def parse_os_release(text: str) -> Dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.startswith("#"):
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


# ARM "CPU implementer" 0x41 part numbers, and NVIDIA (0x4e) Carmel, for cpuinfo files without "model name"
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78", "0xd42": "Cortex-A78AE",
             "0xd4b": "Cortex-A78C"}


def parse_cpu_model(cpuinfo: str) -> Optional[str]:
    """The CPU model from /proc/cpuinfo: ``model name`` (x86), else the ARM core from ``CPU part``."""
    fields: Dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "cpu model"):
        if key in fields:
            return fields[key]
    part, implementer = fields.get("cpu part", "").lower(), fields.get("cpu implementer", "").lower()
    if implementer == "0x41" and part in ARM_PARTS:
        return "ARM " + ARM_PARTS[part]
    if implementer == "0x4e" and part == "0x004":
        return "NVIDIA Carmel"
    if part:
        return "ARM implementer %s part %s" % (implementer or "?", part)
    return fields.get("processor") if not fields.get("processor", "0").isdigit() else None


def _read(root: Path, rel: str) -> Optional[str]:
    try:
        return (root / rel).read_text(errors="replace")
    except (OSError, ValueError):
        return None


def _dt(text: Optional[str]) -> Optional[str]:
    """A device-tree string (NUL-terminated), or None."""
    if text is None:
        return None
    value = text.replace("\x00", "").strip()
    return value or None


def read_serial(root: Path) -> Optional[str]:
    for rel in ("proc/device-tree/serial-number", "sys/firmware/devicetree/base/serial-number",
                "sys/class/dmi/id/product_serial"):
        value = _dt(_read(root, rel))
        if value:
            return value
    for line in (_read(root, "proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Serial" and value.strip():
            return value.strip()
    return None


def runtimes_installed() -> Dict[str, Optional[str]]:
    """Import name -> version ("unknown" when installed without metadata), or None when not installed."""
    out: Dict[str, Optional[str]] = {}
    for module, dists in RUNTIME_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        out[module] = (_dist_version(dists) or "unknown") if found else None
    return out


def _dist_version(dists: Sequence[str]) -> Optional[str]:
    from importlib import metadata
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def backends_available(runtimes: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """Agent backend -> "module version" of the first module that provides it here, or None."""
    out: Dict[str, Optional[str]] = {}
    for backend, modules in BACKEND_MODULES.items():
        found = [m for m in modules if runtimes.get(m) is not None]
        out[backend] = "%s %s" % (found[0], runtimes[found[0]]) if found else None
    return out


def edgetpu(root: Path, find_library: Callable[[str], Optional[str]] = ctypes.util.find_library) -> Dict[str, Any]:
    """Coral Edge TPU: the runtime library (``libedgetpu.so.1``), PCIe/M.2 nodes (``/dev/apex_N``), USB ids."""
    try:
        library = find_library("edgetpu")
    except (OSError, ValueError):
        library = None
    try:
        pcie = sorted(p.name for p in (root / "dev").glob("apex_*"))
    except OSError:
        pcie = []
    usb: List[str] = []
    try:
        for dev in sorted((root / "sys/bus/usb/devices").iterdir()):
            ids = (_read(dev, "idVendor"), _read(dev, "idProduct"))
            if ids[0] is not None and ids[1] is not None and (ids[0].strip(), ids[1].strip()) in EDGETPU_USB_IDS:
                usb.append("%s:%s" % (ids[0].strip(), ids[1].strip()))
    except OSError:
        pass
    return {"library": library, "pcie": pcie, "usb": usb, "present": bool(library or pcie or usb)}


def runtime_devices() -> Dict[str, Any]:
    """What OpenVINO and onnxruntime can run on here (imports them: only when asked). Missing = None."""
    out: Dict[str, Any] = {"openvino": None, "onnxruntime": None}
    if importlib.util.find_spec("openvino") is not None:
        try:
            from agent.runtimes.openvino import _import_ov
            out["openvino"] = list(_import_ov().Core().available_devices)
        except Exception as e:  # a broken install is reported, never raised
            out["openvino"] = "error: %s" % e
    if importlib.util.find_spec("onnxruntime") is not None:
        try:
            import onnxruntime
            out["onnxruntime"] = list(onnxruntime.get_available_providers())
        except Exception as e:
            out["onnxruntime"] = "error: %s" % e
    return out


def _describe(r: Path) -> Dict[str, Any]:
    """Identity and firmware: what every report carries."""
    uname = platform.uname()
    osr = parse_os_release(_read(r, "etc/os-release") or "")
    info: Dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": osr.get("PRETTY_NAME") or "%s %s" % (uname.system, uname.release),
        "kernel": uname.release,
        "machine": uname.machine,
        "cpu_model": parse_cpu_model(_read(r, "proc/cpuinfo") or "") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count() or 1,
        "python": platform.python_version(),
        "agent_version": agent.__version__,
        "serial": read_serial(r),
        "firmware": {},
        "emulation": emulation.detect(str(r)),
    }
    setup = setup_record()
    if setup is not None:
        info["setup"] = setup
    l4t = parse_l4t_release(_read(r, "etc/nv_tegra_release") or "")
    if l4t is not None:
        info["firmware"] = {k: v for k, v in l4t.items() if k in ("l4t", "jetpack")}
        info["l4t"] = l4t
    model = _dt(_read(r, "proc/device-tree/model"))
    if model is not None:
        info["board_model"] = model
    return info


SETUP_RECORD = "edgeprune-setup.json"   # written into the venv by ``edgeprune devices setup``


def setup_record(prefix: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """What ``edgeprune devices setup`` installed into this Python's venv (requirements, versions, when), or None
    where this Python was not set up by it."""
    import json
    import sys
    try:
        with open(os.path.join(prefix or sys.prefix, SETUP_RECORD)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def disk_free_mb(path: str) -> Optional[float]:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent), in MB."""
    p = Path(os.path.expanduser(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return round(shutil.disk_usage(str(p)).free / 1e6, 1)
    except OSError:
        return None


def temperatures(root: str) -> Optional[Dict[str, float]]:
    """One reading of every thermal sensor found (°C), or None where the device has none."""
    monitor = thermal.discover(root)
    if monitor is None:
        return None
    monitor.sample("probe")
    return dict(monitor.samples[-1].temps_c) if monitor.samples else None


def probe(root: str = "/", devices: bool = False,
          find_library: Callable[[str], Optional[str]] = ctypes.util.find_library,
          disk_path: str = "~") -> Dict[str, Any]:
    """Everything known about this device, as plain data (what ``python -m agent probe --json`` prints).

    ``devices=True`` also asks OpenVINO and onnxruntime which devices and providers they see (imports them).
    ``disk_path``: where free disk space is reported for (the host passes the device cache folder).
    """
    r = Path(root)
    info = _describe(r)
    runtimes = runtimes_installed()
    sensors = power.available_sensors(str(r / "sys"))
    info.update({
        "runtimes": runtimes,
        "backends": backends_available(runtimes),
        "edgetpu": edgetpu(r, find_library),
        "power_sensors": sensors,
        "power": "measured: %s" % ", ".join(sensors) if sensors else "modelled only",
        "disk_free_mb": disk_free_mb(disk_path),
        "temperatures_c": temperatures(root),
    })
    if devices:
        info["runtime_devices"] = runtime_devices()
    return info


def identity(device_id: str, runtime: str, runtime_version: str, artifact_sha256: str,
             root: str = "/") -> Identity:
    p = _describe(Path(root))
    extra = {k: p[k] for k in ("board_model", "l4t", "emulation", "setup") if k in p}
    return Identity(device_id=device_id, hostname=p["hostname"], os=p["os"], kernel=p["kernel"],
                    machine=p["machine"], cpu_model=p["cpu_model"], cpu_count=p["cpu_count"], python=p["python"],
                    agent_version=p["agent_version"], runtime=runtime, runtime_version=runtime_version,
                    artifact_sha256=artifact_sha256, serial=p["serial"], firmware=p["firmware"], extra=extra)
