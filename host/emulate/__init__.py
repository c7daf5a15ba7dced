"""Emulated devices: an arm64 Debian root run by qemu-user, with its own sshd on loopback, standing in for a board.

``edgeprune devices emulate rpi4 --dir DIR`` makes one: the root is built once per recipe (the device class's
``emulate:`` section) with ``mmdebstrap`` and cached under the user's cache folder (:mod:`.root`); qemu-user is
registered with ``binfmt_misc`` when it is not (:mod:`.binfmt`); each emulated device is an overlay of that root
(its own changes under ``DIR/<id>/``) in a mount namespace of its own, chrooted, running the root's aarch64
sshd on a free 127.0.0.1 port with a fresh host key and client key, and ``DIR/<id>.yaml`` is the device file the
fleet commands take (:mod:`.instance`).

What runs there is real aarch64 code (Debian's Python, aarch64 wheels of the runtimes), so outputs are an aarch64
build's outputs; timings are qemu's, and the agent reports that it is emulated (:mod:`agent.emulation`).
Needs root (chroot, mounts, binfmt_misc).
"""
from host.emulate.instance import build_root, emulate, status, stop
from host.emulate.recipe import Recipe, recipe_for

__all__ = ["Recipe", "build_root", "emulate", "recipe_for", "status", "stop"]
