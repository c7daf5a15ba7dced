"""What an emulated device's root is made of: a device class's ``emulate:`` section, and its hash (the cache key).

A class file (``device_configs/classes/rpi4.yaml``) says::

    emulate:
      arch: arm64              # Debian architecture of the root
      suite: bookworm          # what Raspberry Pi OS (64-bit) is built on
      qemu: aarch64            # qemu-user target that runs it (qemu-aarch64-static)
      user: pi                 # the login user made in the root
      cpu: cortex-a72          # the CPU qemu presents (QEMU_CPU): the board's own, so libraries pick its kernels
      packages: [python3, python3-venv, openssh-server, ca-certificates]

Classes with the same recipe share one cached root.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Tuple

from edgeprune.errors import ConfigError, UsageError
from host.fleet.devices import CLASSES_DIR, class_names, load_class

RECIPE_VERSION = 2          # bump when the way a root is built changes (the hooks below), so caches rebuild
DEFAULT_MIRROR = "http://deb.debian.org/debian"
_NAME = re.compile(r"^[a-z0-9][a-z0-9.+-]*$")
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class Recipe:
    device_class: str
    arch: str
    suite: str
    qemu: str
    user: str
    packages: Tuple[str, ...]
    mirror: str = DEFAULT_MIRROR
    cpu: str = "max"          # qemu's CPU model for the device's processes; not part of the root (not in key())

    def key(self) -> str:
        """The cache key: what the root is built from (not which class asked for it)."""
        spec = {"v": RECIPE_VERSION, "arch": self.arch, "suite": self.suite, "user": self.user,
                "packages": sorted(self.packages), "mirror": self.mirror}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.suite}-{self.arch}-{h}"

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["packages"] = list(self.packages)
        d["key"] = self.key()
        return d


def recipe_for(device_class: str, mirror: str = "") -> Recipe:
    """The recipe of ``device_class``'s ``emulate:`` section. UsageError for an unknown class or one that cannot
    be emulated; ConfigError naming the class file and field for a bad section."""
    try:
        data = load_class(device_class)
    except KeyError:
        raise UsageError(f"CLASS: unknown device class {device_class!r}; known: {', '.join(class_names())}") from None
    where = CLASSES_DIR / f"{device_class}.yaml"
    section = data.get("emulate")
    if section is None:
        raise UsageError(f"CLASS: device class {device_class!r} cannot be emulated (no 'emulate:' section in {where}); "
                         f"classes that can: {', '.join(emulatable_classes()) or 'none'}")
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: emulate: expected a mapping")
    unknown = sorted(set(section) - {"arch", "suite", "qemu", "user", "packages", "cpu"})
    if unknown:
        raise ConfigError(f"{where}: emulate.{unknown[0]}: unknown field")
    values: Dict[str, Any] = {}
    for name, pattern in (("arch", _NAME), ("suite", _NAME), ("qemu", _NAME), ("user", _USER)):
        value = section.get(name)
        if not isinstance(value, str) or not pattern.match(value):
            raise ConfigError(f"{where}: emulate.{name}: expected a name like {'pi' if name == 'user' else 'arm64'}, "
                              f"got {value!r}")
        values[name] = value
    cpu = section.get("cpu", "max")
    if not isinstance(cpu, str) or not _NAME.match(cpu):
        raise ConfigError(f"{where}: emulate.cpu: expected a qemu CPU model like cortex-a72, got {cpu!r}")
    values["cpu"] = cpu
    packages = section.get("packages", [])
    if not isinstance(packages, list) or not all(isinstance(p, str) and _NAME.match(p) for p in packages):
        raise ConfigError(f"{where}: emulate.packages: expected a list of Debian package names")
    for needed in ("python3", "python3-venv", "openssh-server"):
        if needed not in packages:
            raise ConfigError(f"{where}: emulate.packages: needs {needed} (the agent and its sshd run from the root)")
    mirror = mirror or os.environ.get("EDGEPRUNE_DEBIAN_MIRROR", "") or DEFAULT_MIRROR
    if not re.match(r"^(https?|file)://\S+$", mirror):
        raise UsageError(f"--mirror: expected an http(s):// or file:// Debian mirror URL, got {mirror!r}")
    return Recipe(device_class=device_class, packages=tuple(packages), mirror=mirror, **values)


def emulatable_classes() -> List[str]:
    return [c for c in class_names() if isinstance(load_class(c).get("emulate"), dict)]
