"""Is this agent running under user-mode emulation (qemu-user through binfmt_misc), rather than on the CPU its
machine name says?

An arm64 root run by ``qemu-aarch64`` on an x86 machine answers ``uname -m`` with ``aarch64`` and runs real
aarch64 kernels: its outputs (accuracy, agreement) are an aarch64 build's outputs, but its timings are the
emulator's, hundreds of times slower than any board. Reports say so (``identity.extra["emulation"]``) so that the
host never presents such a latency as a device's.

Three independent signs, each recorded as evidence when seen (any one of them means emulated):

* ``exe``: the kernel's record of the executable this thread runs (``/proc/thread-self/exe``,
  ``/proc/self/task/<tid>/exe``) names a qemu binary. qemu-user hides it at ``/proc/self/exe`` but, in qemu 7.2,
  not under the thread's own path.
* ``cpuinfo``: ``/proc/cpuinfo`` describes another architecture than this process's machine (an x86 CPU's
  ``vendor_id``/``flags`` while the machine is aarch64 or arm; an ARM ``CPU implementer`` while it is x86_64).
  Newer qemu releases may write an emulated cpuinfo: the other signs still hold there.
* ``binfmt``: an enabled ``binfmt_misc`` handler whose interpreter is qemu takes ELF files of this very machine
  (only visible where ``binfmt_misc`` is mounted in this root).

Standard library only; every file goes through ``root`` (tests point it at captured trees).
"""
from __future__ import annotations

import os
import platform
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

# uname machine -> ELF e_machine (little-endian, as binfmt_misc's magic spells it at offset 18)
ELF_MACHINE = {"aarch64": 0xB7, "arm64": 0xB7, "armv7l": 0x28, "armv6l": 0x28, "x86_64": 0x3E, "amd64": 0x3E,
               "riscv64": 0xF3, "ppc64le": 0x15, "s390x": 0x16}
_ARM = ("aarch64", "arm64", "armv7l", "armv6l", "armv8l")
_X86 = ("x86_64", "amd64", "i686", "i386")


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text(errors="replace")
    except (OSError, ValueError):
        return None


def cpuinfo_arch(cpuinfo: str) -> Optional[str]:
    """``"x86"`` or ``"arm"`` from a /proc/cpuinfo text, or None when it says neither."""
    keys = set()
    for line in cpuinfo.splitlines():
        key, sep, _ = line.partition(":")
        if sep:
            keys.add(key.strip().lower())
    if "vendor_id" in keys and "flags" in keys:
        return "x86"
    if "cpu implementer" in keys or ("features" in keys and "cpu architecture" in keys):
        return "arm"
    return None


def _machine_arch(machine: str) -> Optional[str]:
    m = machine.lower()
    return "arm" if m in _ARM else "x86" if m in _X86 else None


def binfmt_handlers(root: Path) -> List[Dict[str, Any]]:
    """The binfmt_misc entries under ``root/proc/sys/fs/binfmt_misc``: name, enabled, interpreter, magic bytes."""
    folder = root / "proc/sys/fs/binfmt_misc"
    out: List[Dict[str, Any]] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return out
    for entry in entries:
        if entry.name in ("register", "status"):
            continue
        text = _read(entry)
        if text is None:
            continue
        info: Dict[str, Any] = {"name": entry.name, "enabled": False, "interpreter": None, "magic": None}
        for line in text.splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "enabled":
                info["enabled"] = True
            elif key == "interpreter":
                info["interpreter"] = value.strip()
            elif key == "magic":
                try:
                    info["magic"] = bytes.fromhex(value.strip())
                except ValueError:
                    pass
        out.append(info)
    return out


def _thread_exe(root: Path) -> Optional[str]:
    for rel in ("proc/thread-self/exe", "proc/self/task/%d/exe" % threading.get_native_id()):
        try:
            return os.readlink(str(root / rel))
        except (OSError, ValueError):
            continue
    return None


def detect(root: str = "/", machine: Optional[str] = None, thread_exe: Optional[str] = None) -> Dict[str, Any]:
    """``{"emulated": bool, "by": "qemu-user" | None, "evidence": [str, ...]}`` for this process, and ``cpu``, the
    CPU model qemu was asked for (``QEMU_CPU``), when emulated and set.

    ``machine`` (default ``platform.machine()``) and ``thread_exe`` (default: read from ``root``'s /proc) are
    parameters for tests; everything else is read under ``root``."""
    r = Path(root)
    machine = machine or platform.machine()
    evidence: List[str] = []
    exe = thread_exe if thread_exe is not None else _thread_exe(r)
    if exe and "qemu" in os.path.basename(exe.split(" (deleted)")[0]).lower():
        evidence.append("exe: this thread runs %s" % exe)
    cpu_arch, own_arch = cpuinfo_arch(_read(r / "proc/cpuinfo") or ""), _machine_arch(machine)
    if cpu_arch and own_arch and cpu_arch != own_arch:
        evidence.append("cpuinfo: /proc/cpuinfo describes an %s CPU, this process's machine is %s"
                        % (cpu_arch, machine))
    code = ELF_MACHINE.get(machine.lower())
    if code is not None:
        for h in binfmt_handlers(r):
            magic, interp = h["magic"], h["interpreter"] or ""
            if h["enabled"] and "qemu" in interp.lower() and magic is not None and len(magic) >= 20 \
                    and magic[:4] == b"\x7fELF" and magic[18] == code:
                evidence.append("binfmt: %s runs %s ELF files through %s" % (h["name"], machine, interp))
    out = {"emulated": bool(evidence), "by": "qemu-user" if evidence else None, "evidence": evidence}
    if evidence and os.environ.get("QEMU_CPU"):
        out["cpu"] = os.environ["QEMU_CPU"]     # the CPU model qemu presents (devices emulate sets the board's)
    return out
