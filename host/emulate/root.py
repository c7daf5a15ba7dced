"""The cached root of an emulated device: built once per recipe with ``mmdebstrap``, reused after.

Layout under the cache folder (``$EDGEPRUNE_EMULATE_CACHE``, else ``$XDG_CACHE_HOME/edgeprune/emulate``, else
``~/.cache/edgeprune/emulate``)::

    roots/<suite>-<arch>-<hash>/root/         the Debian root (never written after it is built: devices overlay it)
    roots/<suite>-<arch>-<hash>/recipe.json   written last: the root is complete
    roots/<suite>-<arch>-<hash>.lock          held while one process builds it (others wait)

A build runs in ``<key>.partial-<pid>/`` and is renamed into place whole; a failed build leaves nothing behind.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional

from edgeprune.errors import EmulationError
from host.emulate.recipe import Recipe

Events = Callable[[str], None]


def cache_dir() -> Path:
    given = os.environ.get("EDGEPRUNE_EMULATE_CACHE")
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgeprune" / "emulate"


def root_path(recipe: Recipe, cache: Optional[Path] = None) -> Path:
    return (cache or cache_dir()) / "roots" / recipe.key() / "root"


def _hooks(recipe: Recipe) -> list:
    user = shlex.quote(recipe.user)
    return [
        # the login user the fleet file names (a Pi's default user); uid 1000 as on Raspberry Pi OS
        f'chroot "$1" useradd --create-home --uid 1000 --shell /bin/bash {user}',
        # no password, and not locked ("!"): sshd without PAM refuses a locked account even with a good key
        f"chroot \"$1\" usermod --password '*' {user}",
        # each emulated device gets a fresh host key of its own: none is baked into the shared root
        'rm -f "$1"/etc/ssh/ssh_host_*',
    ]


_MIRROR_TROUBLE = re.compile(r"(Failed to fetch|Could not resolve|Temporary failure resolving|Could not connect|"
                             r"Connection failed|Release file .* is not valid|does not have a Release file|"
                             r"404\s+Not Found|Unable to connect)", re.I)


def ensure_root(recipe: Recipe, events: Events = lambda msg: None, cache: Optional[Path] = None) -> Path:
    """The root of ``recipe``, built now (a few minutes) unless the cache has it. EmulationError with the fix when
    mmdebstrap is missing, the mirror cannot be reached or the build fails."""
    final = root_path(recipe, cache).parent
    done = final / "recipe.json"
    if done.is_file():
        return final / "root"
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{recipe.key()}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # another process building the same root: wait for it
        if done.is_file():
            return final / "root"
        mmdebstrap = shutil.which("mmdebstrap")
        if mmdebstrap is None:
            raise EmulationError("mmdebstrap is not installed: it builds the emulated device's Debian root. Install "
                                 "it with: apt-get install mmdebstrap")
        if final.exists():                        # a folder without recipe.json: an interrupted rename; rebuild
            shutil.rmtree(final)
        partial = final.with_name(f"{final.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        target = partial / "root"
        cmd = [mmdebstrap, "--mode=root", f"--arch={recipe.arch}", "--variant=apt",
               f"--include={','.join(recipe.packages)}"]
        cmd += [f"--customize-hook={h}" for h in _hooks(recipe)]
        cmd += [recipe.suite, str(target), recipe.mirror]
        events(f"building the {recipe.suite} {recipe.arch} root for {recipe.device_class} with mmdebstrap "
               f"(once; a few minutes) into {final}")
        t0 = time.monotonic()
        log = partial / "mmdebstrap.log"
        try:
            with open(log, "wb") as out:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT).returncode
        except OSError as e:
            shutil.rmtree(partial, ignore_errors=True)
            raise EmulationError(f"cannot run {mmdebstrap}: {e.strerror}") from None
        if rc != 0:
            text = log.read_text(errors="replace")
            shutil.rmtree(partial, ignore_errors=True)
            tail = "\n".join(text.strip().splitlines()[-12:])
            if _MIRROR_TROUBLE.search(text):
                raise EmulationError(f"cannot fetch the {recipe.suite} {recipe.arch} packages from the Debian mirror "
                                     f"{recipe.mirror}: pass --mirror URL (or set EDGEPRUNE_DEBIAN_MIRROR) to a mirror "
                                     f"this machine reaches. mmdebstrap said:\n{tail}")
            if "Exec format error" in text:
                raise EmulationError(f"the {recipe.arch} root's programs do not run here (Exec format error): qemu-user "
                                     f"is not registered with binfmt_misc. mmdebstrap said:\n{tail}")
            raise EmulationError(f"mmdebstrap failed (exit {rc}) building the {recipe.suite} {recipe.arch} root:\n{tail}")
        (partial / "recipe.json").write_text(json.dumps(
            {**recipe.as_dict(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "build_seconds": round(time.monotonic() - t0, 1), "command": cmd}, indent=1))
        os.rename(partial, final)
        events(f"built the root in {time.monotonic() - t0:.0f} s")
    return final / "root"
