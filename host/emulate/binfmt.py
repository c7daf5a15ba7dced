"""qemu-user and binfmt_misc: the kernel must run the root's ELF files through qemu.

:func:`ensure` mounts ``binfmt_misc`` when it is not, and registers the qemu target when it is not registered,
with the ``F`` flag (the kernel opens the interpreter at registration, so it works inside a chroot that lacks it).
It uses the registration line qemu-user-static ships for systemd-binfmt (``/usr/lib/binfmt.d/qemu-<target>.conf``)
when present, else qemu's own magic and mask (qemu's ``scripts/qemu-binfmt-conf.sh``) with the static binary.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable, Dict, Optional

from edgeprune.errors import EmulationError

BINFMT = Path("/proc/sys/fs/binfmt_misc")
CONF_DIRS = (Path("/usr/lib/binfmt.d"), Path("/etc/binfmt.d"))
# qemu-binfmt-conf.sh: ELF magic and mask per target
_MAGIC: Dict[str, "tuple[str, str]"] = {
    "aarch64": (r"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00",
                r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"),
    "arm": (r"\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00",
            r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"),
}
FIX = "apt-get install qemu-user-static"


def _entry(target: str, binfmt: Path) -> Optional[Dict[str, str]]:
    try:
        text = (binfmt / f"qemu-{target}").read_text()
    except OSError:
        return None
    out = {"enabled": "disabled", "interpreter": "", "flags": ""}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("enabled", "disabled"):
            out["enabled"] = key
        elif key in ("interpreter", "flags:"):
            out[key.rstrip(":")] = value.strip()
    return out


def qemu_binary(target: str) -> Optional[str]:
    return shutil.which(f"qemu-{target}-static") or shutil.which(f"qemu-{target}")


def registration_line(target: str) -> str:
    """The line written to ``binfmt_misc/register`` for ``target``."""
    for folder in CONF_DIRS:
        conf = folder / f"qemu-{target}.conf"
        if conf.is_file():
            line = conf.read_text().strip()
            name, flags = line.split(":")[1], line.rsplit(":", 1)[1]
            if name == f"qemu-{target}" and Path(line.split(":")[6]).exists():
                return line if "F" in flags else line + "F"
    binary = qemu_binary(target)
    if binary is None or target not in _MAGIC:
        raise EmulationError(f"qemu-user for {target} is not installed (no qemu-{target}-static): {FIX}")
    magic, mask = _MAGIC[target]
    return f":qemu-{target}:M::{magic}:{mask}:{binary}:F"


def ensure(target: str, events: Callable[[str], None] = lambda msg: None, binfmt: Path = BINFMT) -> Dict[str, str]:
    """qemu-``target`` registered and enabled with binfmt_misc; its entry. EmulationError with the fix otherwise."""
    if qemu_binary(target) is None and not any((d / f"qemu-{target}.conf").is_file() for d in CONF_DIRS):
        raise EmulationError(f"qemu-user for {target} is not installed (no qemu-{target}-static on PATH): {FIX}")
    if not (binfmt / "register").exists():
        r = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], capture_output=True, text=True)
        if r.returncode != 0 or not (binfmt / "register").exists():
            raise EmulationError(f"binfmt_misc is not available at {binfmt} and mounting it failed "
                                 f"({r.stderr.strip() or 'exit %d' % r.returncode}): load it with `modprobe "
                                 f"binfmt_misc`, or run where the kernel has it (a container needs it from its host)")
        events(f"mounted binfmt_misc at {binfmt}")
    entry = _entry(target, binfmt)
    if entry is None:
        line = registration_line(target)
        try:
            (binfmt / "register").write_text(line)
        except OSError as e:
            raise EmulationError(f"cannot register qemu-{target} with binfmt_misc ({e.strerror}): {FIX}, then "
                                 f"`update-binfmts --enable qemu-{target}` (or restart systemd-binfmt)") from None
        events(f"registered qemu-{target} with binfmt_misc")
        entry = _entry(target, binfmt)
    elif entry["enabled"] != "enabled":
        (binfmt / f"qemu-{target}").write_text("1")
        events(f"enabled qemu-{target} in binfmt_misc")
        entry = _entry(target, binfmt)
    if entry is None or entry["enabled"] != "enabled":
        raise EmulationError(f"qemu-{target} is not enabled in binfmt_misc: `update-binfmts --enable qemu-{target}`")
    return entry
