"""One emulated device: the cached root overlaid, chrooted, its aarch64 sshd on a free 127.0.0.1 port.

Files under ``--dir DIR`` for a device ``ID``::

    DIR/ID.yaml                  the device file the fleet commands take (written once; a restart updates ssh.port)
    DIR/ID/upper/                the device's own changes over the shared root (its venv, cache, keys, /etc/ssh)
    DIR/ID/work/, DIR/ID/merged/ overlayfs work folder and mount point (mounted only in the device's namespace)
    DIR/ID/client_ed25519        the key the device file logs in with (``pi`` on the device)
    DIR/ID/known_hosts           the device's host key, the only one accepted for it
    DIR/ID/sshd.log, state.json  sshd's log; pid, port, class and root of the running device

The device runs in a mount namespace of its own (``unshare --mount``): the overlay, ``/proc``, ``/sys``, ``/dev``
and a ``/run`` are mounted there only, and vanish with its last process. sshd runs in the foreground (``-D``) as
a process of its own session, so the device outlives the command that started it; ``--stop`` ends every process
whose root is the device's (sshd, its sessions, their agents).

qemu presents the board's own CPU model (the class's ``emulate.cpu``, e.g. cortex-a72 for a Pi 4; ``QEMU_CPU`` for
sshd and, through its ``SetEnv``, for every session), so libraries that pick kernels by CPU feature pick the
board's: under qemu 7.2's default ``max`` CPU, XNNPACK's int8 kernels gave wrong outputs.

The device trusts what this machine trusts: this machine's CA bundle (a lab's TLS-inspecting proxy included) and
``/etc/resolv.conf`` are copied in at each start, and pip there uses that bundle.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from edgeprune.errors import EmulationError, UsageError
from host.emulate.binfmt import ensure as ensure_binfmt
from host.emulate.recipe import Recipe, recipe_for
from host.emulate.root import ensure_root
from host.files import write_text_atomic

Events = Callable[[str], None]
LOOPBACK = "127.0.0.1"
_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SSHD_CONFIG = """\
# written by `edgeprune devices emulate`: this emulated device's sshd, on loopback only
Port {port}
ListenAddress {host}
HostKey /etc/ssh/edgeprune/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile /etc/ssh/edgeprune/authorized_keys
AllowUsers {user}
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
MaxStartups 100
MaxSessions 32
SetEnv QEMU_CPU={cpu}
LogLevel INFO
Subsystem sftp internal-sftp
"""
DEVICE_FILE = """\
# An emulated {cls}, made by `edgeprune devices emulate {cls} --dir {dir}`: an {arch} Debian {suite} root run by
# qemu-user on this machine ({host}), with its own sshd on 127.0.0.1. What runs there is real {qemu} code: its
# outputs (top-1, agreement) are a {qemu} build's. Its latency, throughput and power are the emulator's, not a
# board's: the agent reports that it is emulated, reports mark those figures, and a search refuses latency, power
# and energy targets on it. `edgeprune devices emulate --stop --dir {dir}` stops it; the same command as above
# starts it again (this file's ssh.port is updated when the port changes).
id: {id}
class: {cls}
description: emulated {cls} (qemu-user, {arch} Debian {suite}); not a device measurement
transport: ssh
ssh:
  host: {loopback}
  port: {port}
  user: {user}
  key: {id}/client_ed25519
  known_hosts: {id}/known_hosts
  command_timeout_s: 300      # every program there runs under qemu
python: /usr/bin/python3      # `edgeprune devices setup` points this at the agent's venv
runtime: {{threads: {threads}}}
timing: {{warmup_iters: 2, warmup_s: 0.0, min_iters: 10, min_duration_s: 1.0}}   # emulated timings: short windows
"""


def _need_root() -> None:
    if os.geteuid() != 0:
        raise EmulationError("devices emulate needs root: it mounts an overlay, /proc, /sys and /dev for the device, "
                             "chroots into it and may register qemu-user with binfmt_misc. Run it as root, e.g. "
                             "`sudo edgeprune devices emulate ...`")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.access(f"/usr/sbin/{name}", os.X_OK) else None)
    if path is None:
        raise EmulationError(f"{name} is not installed: apt-get install {package}")
    return path


def _free_port(preferred: Optional[int] = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise EmulationError("no free port on 127.0.0.1")  # pragma: no cover - port 0 always binds


def _keygen(path: Path, comment: str) -> str:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([_tool("ssh-keygen", "openssh-client"), "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(path)], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return Path(str(path) + ".pub").read_text().strip()


def _copy_in(src: Path, upper: Path, rel: str, mode: int = 0o644) -> None:
    dst = upper / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    for parent in reversed(dst.relative_to(upper).parents):
        if str(parent) != ".":
            os.chmod(upper / parent, 0o755)
    shutil.copyfile(src, dst)
    os.chmod(dst, mode)


def _state(state_dir: Path) -> Dict[str, Any]:
    try:
        return json.loads((state_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _processes_in(merged: Path) -> List[int]:
    """Pids whose root is ``merged`` (the device's sshd and everything it started)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == str(merged):
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def _running(state_dir: Path) -> Optional[Dict[str, Any]]:
    st = _state(state_dir)
    pid = st.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        if os.readlink(f"/proc/{pid}/root") != str(state_dir / "merged"):
            return None
    except OSError:
        return None
    return st


def _wait_banner(port: int, proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((LOOPBACK, port), timeout=2.0) as s:
                if s.recv(64).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def _start_script(lower: Path, state_dir: Path, port: int) -> str:
    q = {k: shlex.quote(str(v)) for k, v in (("lower", lower), ("upper", state_dir / "upper"),
                                               ("work", state_dir / "work"), ("merged", state_dir / "merged"))}
    m = q["merged"]
    return "\n".join([
        "set -e",
        f"mount -t overlay overlay -o lowerdir={q['lower']},upperdir={q['upper']},workdir={q['work']} {m}",
        f"mount -t proc proc {m}/proc",
        f"mount -t sysfs sysfs {m}/sys",
        f"mount --rbind /dev {m}/dev",
        f"mount -t tmpfs -o mode=0755 tmpfs {m}/run",
        f"mkdir -p {m}/run/sshd",
        f"exec chroot {m} /usr/sbin/sshd -D -e -f /etc/ssh/edgeprune/sshd_config",
    ])


def emulate(device_class: str, out_dir: Path, device_id: Optional[str] = None, mirror: str = "",
            events: Events = lambda msg: None, start_timeout_s: float = 60.0) -> Dict[str, Any]:
    """Make (or start again) the emulated ``device_class`` in ``out_dir``; its status (:func:`status`'s fields).
    Already running: returned as it is."""
    _need_root()
    recipe = recipe_for(device_class, mirror)
    device_id = device_id or f"{device_class}-emu"
    if not _ID.match(device_id):
        raise UsageError(f"--id: {device_id!r}: letters, digits, '.', '_' and '-' only, at most 64")
    for tool, package in (("unshare", "util-linux"), ("chroot", "coreutils"), ("mount", "mount")):
        _tool(tool, package)
    out_dir = Path(out_dir).expanduser().resolve()
    state_dir = out_dir / device_id
    running = _running(state_dir)
    if running is not None:
        if running.get("class") != device_class:
            raise UsageError(f"--dir {out_dir}: {device_id} is already running as an emulated {running.get('class')}")
        events(f"{device_id} is already running on 127.0.0.1:{running['port']}")
        return _status_of(state_dir)
    entry = ensure_binfmt(recipe.qemu, events)
    prior = _state(state_dir)
    lower = Path(prior["root"]) if prior.get("root") and (Path(prior["root"]).parent / "recipe.json").is_file() \
        and prior.get("class") == device_class else ensure_root(recipe, events)
    for sub in ("upper", "work", "merged"):
        (state_dir / sub).mkdir(parents=True, exist_ok=True)
    upper = state_dir / "upper"
    host_key = upper / "etc/ssh/edgeprune/ssh_host_ed25519_key"
    host_line = _keygen(host_key, f"{device_id}-host")
    for parent in (upper / "etc", upper / "etc/ssh", upper / "etc/ssh/edgeprune"):
        os.chmod(parent, 0o755)
    client_line = _keygen(state_dir / "client_ed25519", f"edgeprune-{device_id}")
    write_text_atomic(upper / "etc/ssh/edgeprune/authorized_keys", client_line + "\n")
    os.chmod(upper / "etc/ssh/edgeprune/authorized_keys", 0o644)
    _trust_like_this_machine(upper)
    if "F" not in entry.get("flags", ""):        # the interpreter is looked up inside the chroot: put it there
        interp = entry["interpreter"]
        _copy_in(Path(interp), upper, interp.lstrip("/"), 0o755)
    port = _free_port(prior.get("port"))
    write_text_atomic(upper / "etc/ssh/edgeprune/sshd_config",
                      SSHD_CONFIG.format(port=port, host=LOOPBACK, user=recipe.user, cpu=recipe.cpu))
    log = state_dir / "sshd.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen([_tool("unshare", "util-linux"), "--mount", "--propagation", "private", "--",
                                 "/bin/sh", "-c", _start_script(lower, state_dir, port)],
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
                                env={**os.environ, "QEMU_CPU": recipe.cpu})
    if not _wait_banner(port, proc, start_timeout_s):
        _kill(state_dir, [proc.pid])
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-10:])
        raise EmulationError(f"the emulated {device_class}'s sshd did not answer on 127.0.0.1:{port} within "
                             f"{start_timeout_s:.0f} s (log {log}):\n{tail}")
    write_text_atomic(state_dir / "known_hosts", f"[{LOOPBACK}]:{port} {' '.join(host_line.split()[:2])}\n")
    write_text_atomic(state_dir / "state.json", json.dumps({
        "id": device_id, "class": device_class, "pid": proc.pid, "port": port, "root": str(lower),
        "recipe": recipe.as_dict(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    _write_device_file(out_dir, device_id, recipe, port)
    events(f"{device_id}: emulated {device_class} on 127.0.0.1:{port}; device file {out_dir / (device_id + '.yaml')}")
    return _status_of(state_dir)


def build_root(device_class: str, mirror: str = "", events: Events = lambda msg: None) -> Path:
    """``device_class``'s cached root, built now if the cache lacks it (``devices emulate --build-only``)."""
    _need_root()
    return ensure_root(recipe_for(device_class, mirror), events)


def _trust_like_this_machine(upper: Path) -> None:
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.is_file():
        _copy_in(bundle, upper, "etc/ssl/certs/ca-certificates.crt")
        write_text_atomic(upper / "etc/pip.conf", "# edgeprune devices emulate: this machine's CA bundle\n"
                                                  "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
        os.chmod(upper / "etc/pip.conf", 0o644)
    if Path("/etc/resolv.conf").is_file():
        _copy_in(Path("/etc/resolv.conf").resolve(), upper, "etc/resolv.conf")


def _write_device_file(out_dir: Path, device_id: str, recipe: Recipe, port: int) -> None:
    from host.fleet.devices import load_class
    from host.fleet.edit import set_value

    path = out_dir / f"{device_id}.yaml"
    if path.is_file():
        set_value(path, device_id, ("ssh", "port"), port)
        return
    threads = int((load_class(recipe.device_class).get("runtime") or {}).get("threads", 1))
    write_text_atomic(path, DEVICE_FILE.format(
        cls=recipe.device_class, dir=out_dir, arch=recipe.arch, suite=recipe.suite, qemu=recipe.qemu,
        host=socket.gethostname(), id=device_id, loopback=LOOPBACK, port=port, user=recipe.user,
        threads=max(1, min(threads, len(os.sched_getaffinity(0))))))


def _kill(state_dir: Path, extra: List[int] = ()) -> int:
    merged = state_dir / "merged"
    pids = set(_processes_in(merged)) | set(extra)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and _not_zombie(p)}
            if not pids:
                return 0
            time.sleep(0.05)
    return len(pids)


def _not_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ids(out_dir: Path, device_id: Optional[str]) -> List[Path]:
    out_dir = Path(out_dir).expanduser().resolve()
    if device_id is not None:
        if not (out_dir / device_id / "state.json").is_file():
            raise UsageError(f"--id: no emulated device {device_id!r} in {out_dir}")
        return [out_dir / device_id]
    return sorted(p.parent for p in out_dir.glob("*/state.json"))


def _status_of(state_dir: Path) -> Dict[str, Any]:
    st = _state(state_dir)
    running = _running(state_dir) is not None
    return {"id": st.get("id", state_dir.name), "class": st.get("class"), "running": running,
            "pid": st.get("pid") if running else None, "port": st.get("port"), "root": st.get("root"),
            "device_file": str(state_dir.parent / f"{state_dir.name}.yaml"), "started_at": st.get("started_at")}


def status(out_dir: Path, device_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """Each emulated device in ``out_dir``: id, class, running, pid, port, root, device file."""
    return [_status_of(d) for d in _ids(out_dir, device_id)]


def stop(out_dir: Path, device_id: Optional[str] = None) -> List[Dict[str, Any]]:
    """Stop the emulated devices in ``out_dir`` (or ``device_id``): every process whose root is theirs. Their
    files stay (the next ``emulate`` starts them again, with their venv and cache)."""
    _need_root()
    out = []
    for d in _ids(out_dir, device_id):
        left = _kill(d)
        if left:
            raise EmulationError(f"{d.name}: {left} process(es) did not exit after SIGKILL")
        out.append(_status_of(d))
    return out
