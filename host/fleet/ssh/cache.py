"""Remote files: the content-addressed cache on the device, SFTP uploads into it, the agent bundle, and the device
helper that checks the cache and runs jobs (:mod:`agent.device_helper`, sent as text with ``-c``).

:class:`DeviceCache` adds them to :class:`~host.fleet.ssh.commands.SSHCommands`. Layout of the cache
(``ssh.cache_dir``, default ``~/.cache/edgeprune``, ``~`` meaning the device user's home)::

    <cache>/<sha256>                  artifacts, eval shards and agent bundles, named by their sha256
    <cache>/agent-<sha256>/agent/     an agent bundle unpacked (to a temp dir, then renamed: atomic)
    <cache>/jobs/<job_id>.<random>/   one job's folder (job.json, agent.log, report.json, and artifact/: the
                                      artifact's files linked under their own names; .pgid and .lock: see the
                                      helper), created fresh for each job and removed when it ends

Uploads go to ``<cache>/<sha256>.tmp.<random>`` (:func:`~agent.device_helper.upload_name`) over SFTP and
are renamed into place only after the device's own python has verified their sha256. An entry counts as cached
only if it exists *and* its sha256 verifies on the device; a tampered entry is deleted and uploaded again. Files
that do not fit in the cache's free space (the helper reports it) are refused before any byte is sent, and an
upload that ran out of space says so: "no space left on the device", what is free and what was needed (retrying
cannot help). A temp file left by a lost connection is removed by the transport's next helper call, or by any
helper once it is :data:`STALE_UPLOAD_S` old; it is never taken for a cached entry. A job the host lost track of
(its connection died) is likewise stopped by the next helper call (``_abandoned``: the helper's ``evict``).

Per call the helper is one remote command; a cold cache adds one SFTP upload per missing file and one more
command (:meth:`DeviceCache._helper`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import secrets
import socket
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional, Tuple, Union

import paramiko

from agent import schema
from edgeprune.errors import ConfigError, SSHError
from host.fleet.devices import DeviceConfig
from host.fleet.ssh.commands import SSHCommands, quote_argv
from agent.device_helper import MARK, upload_name

log = logging.getLogger(__name__)

AGENT_PACKAGE = Path(__import__("agent").__file__).resolve().parent
# the device helper's source, run as ``<python> -c DEVICE_HELPER SPEC_JSON`` (never imported on the device)
DEVICE_HELPER = AGENT_PACKAGE.joinpath("device_helper.py").read_text()
LOG_TAIL_CHARS = 4000
STALE_UPLOAD_S = 3600.0              # a temp upload untouched this long on the device is a dead one: removed
UPLOAD_READ_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------ agent bundle
def agent_bundle(package: Path = AGENT_PACKAGE) -> Tuple[bytes, str]:
    """A deterministic zip of the agent package's ``.py`` files and its sha256.

    Entries sorted by name, stored (no compression: identical bytes whatever the zlib), fixed timestamps and
    permissions, so the same sources always give the same sha256 and the device cache is hit across hosts.
    """
    package = Path(package)
    files = sorted((p.relative_to(package.parent).as_posix(), p) for p in package.rglob("*.py")
                   if "__pycache__" not in p.parts)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.create_system = 3
            info.external_attr = 0o644 << 16
            z.writestr(info, path.read_bytes())
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()



# ------------------------------------------------------------------------------------------ device cache
class DeviceCache(SSHCommands):
    """The device's content-addressed cache: files and the agent bundle put there once, verified by sha256."""

    def __init__(self, device: DeviceConfig, **commands: Any) -> None:
        super().__init__(device, **commands)
        self.python = device.python or "python3"
        self._cache: Optional[str] = None
        self._bundle: Optional[Tuple[bytes, str]] = None
        self._bundle_dir: Optional[str] = None    # the bundle's folder, once found or unpacked on this connection
        # left on the device when a connection was lost: jobs that may still run there (their folder names) and
        # partial uploads (their temp names); the next helper call stops and removes them
        self._abandoned: List[str] = []
        self._discard: List[str] = []

    def close(self) -> None:
        """Close the connection (:meth:`SSHConnection.close`); the cache path is found out again after it."""
        with self._lock:
            super().close()
            self._cache = None
            self._bundle_dir = None

    def cache_dir(self) -> str:
        """The device cache's absolute path (created on first use, mode 0700)."""
        with self._lock:
            if self._cache is None:
                self._transport()
                raw = self.ssh.cache_dir
                if raw == "~" or raw.startswith("~/"):
                    rel = raw[2:] or "."       # sshd starts every command in the user's home
                elif raw.startswith("~"):
                    raise ConfigError("%s: only ~ and ~/... are supported (not ~user)" % self._field("cache_dir"))
                else:
                    rel = raw
                self._cache = self._make_cache_dir(raw, rel)
            return self._cache

    def _make_cache_dir(self, raw: str, rel: str) -> str:
        """``mkdir -p`` (mode 0700) and ``pwd -P`` of the cache folder, over SFTP: no command, no ``exec``
        (an agent session then needs one ``exec`` on a device whose cache has the agent)."""
        sftp = self._sftp_client()
        with self._wire("creating the cache folder %r" % raw):
            try:
                base = sftp.normalize(".")          # the user's home: where sshd starts every command, too
                path = rel if rel.startswith("/") else base.rstrip("/") + "/" + rel
                parts = [p for p in path.split("/") if p]
                for i in range(1, len(parts) + 1):
                    sub = "/" + "/".join(parts[:i])
                    try:
                        sftp.stat(sub)
                    except FileNotFoundError:
                        sftp.mkdir(sub, 0o700)
                real = sftp.normalize(path)
                sftp.listdir(real)                  # a folder we can read (not a file of that name)
            except socket.timeout:                  # an OSError too, but the link's, not the folder's
                self.close()
                raise SSHError("%s: creating the cache folder %r: no answer within %g s; connection dropped"
                               % (self.where, raw, self.ssh.command_timeout_s), infrastructure=True,
                               timed_out=True) from None
            except OSError as e:
                if not self.connected:
                    raise
                raise SSHError("%s: cannot create the cache folder %r: %s" % (self.where, raw, e),
                               infrastructure=False) from None
        if not real.startswith("/"):
            raise SSHError("%s: the cache folder %r resolved to %r, not an absolute path" % (self.where, raw, real),
                           infrastructure=False)
        return real

    def cache_path(self, sha256: str) -> str:
        return self.cache_dir() + "/" + check_sha256(sha256)

    def ensure_file(self, local_path: Union[str, Path], sha256: str) -> str:
        """Make ``<cache>/<sha256>`` hold ``local_path`` (verified on the device) and return that remote path.

        A cache hit sends nothing. A missing or tampered entry is uploaded to a temp name, verified by the
        device's python, then renamed into place.
        """
        sha256 = check_sha256(sha256)
        self._helper({"want": [sha256]}, {sha256: Path(local_path)}, None, self.ssh.command_timeout_s)
        return self.cache_path(sha256)

    def ensure_bundle(self) -> str:
        """Upload and unpack the agent bundle if the device lacks it; return its folder (a PYTHONPATH entry).
        Its presence is checked over SFTP once per connection; only a missing bundle costs a command (the helper
        unpacks it). Later calls (a lease renewal while an upload fills a slow link) send nothing: an SFTP request
        queued behind megabytes of upload would time out and take the connection, and the upload, with it."""
        if self._bundle_dir is not None:
            return self._bundle_dir
        data, sha = self.bundle()
        folder = self.cache_dir() + "/agent-" + sha
        sftp = self._sftp_client()
        with self._wire("checking the agent bundle"):
            try:
                sftp.stat(folder + "/agent/__init__.py")
                self.counters.cache_hits += 1
                self._bundle_dir = folder
                return folder
            except FileNotFoundError:
                pass
        self._helper({"bundle": sha}, {sha: data}, None, self.ssh.command_timeout_s, upload_first=[sha])
        self._bundle_dir = folder
        return folder

    def bundle(self) -> Tuple[bytes, str]:
        if self._bundle is None:
            self._bundle = agent_bundle()
        return self._bundle

    def _helper_in_session(self, spec: Dict[str, Any], timeout: float) -> Optional[Dict[str, Any]]:
        """The helper's cache work through the open agent session (no command); None when there is none."""
        return None

    def _helper(self, spec: Dict[str, Any], sources: Dict[str, Union[Path, bytes]], stdin: Optional[bytes],
                timeout: float, upload_first: List[str] = ()) -> Tuple[Dict[str, Any], bytes]:
        """Run DEVICE_HELPER (or its cache work in the agent session); upload what it reports missing and run it
        again with those commits. ``upload_first``: sha256s known to be missing, uploaded before the first run."""
        cache = self.cache_dir()
        with self._lock:
            spec = dict(spec, cache=cache, commit=[], evict=list(self._abandoned), discard=list(self._discard),
                        stale_upload_s=STALE_UPLOAD_S)
        for sha in upload_first:
            spec["commit"].append([sha, self._upload(sources[sha], sha)])
        for attempt in (1, 2):
            header = self._helper_in_session(spec, timeout) if "run" not in spec else None
            body = b""
            if header is None:
                script = "exec " + quote_argv([self.python, "-c", DEVICE_HELPER, json.dumps(spec, sort_keys=True)])
                rc, out, err = self._exec(script, timeout, stdin, what="%s -c <edgeprune device helper>" % self.python)
                header, body = _parse_helper_output(out)
            if not isinstance(header, dict):
                text = err.decode("utf-8", "replace").strip()
                if "Traceback (most recent call last)" in text:   # it ran, and failed: its last line says why
                    raise SSHError("%s: the device helper failed (exit %d): %s"
                                   % (self.where, rc, text.splitlines()[-1]), infrastructure=rc < 0 or rc > 128)
                raise SSHError("%s: the device helper failed (exit %d; is %r a Python >= 3.8? set `python` in %s): %s"
                               % (self.where, rc, self.python, self.device.source or "the device config",
                                  text[-LOG_TAIL_CHARS:] or "no output"),
                               infrastructure=rc < 0 or rc > 128)   # killed (OOM, signal): may pass next time
            with self._lock:               # the lease's renewal thread shares this transport
                self._abandoned = [n for n in self._abandoned if n not in spec["evict"]]
                self._discard = [n for n in self._discard if n not in spec["discard"]]
            self.counters.orphans_stopped += len(header["evicted"])
            if header["evicted"]:
                log.warning("%s: stopped job(s) %s left running on the device when the connection was lost",
                            self.where, ", ".join(header["evicted"]))
            if attempt == 1:
                self.counters.cache_hits += len(header["hits"])
            self.counters.cache_replaced += len(header["replaced"])
            if header["bad_upload"]:
                self._check_space(header, sources, {sha: header["bad_upload_sizes"].get(sha, 0)
                                                    for sha in header["bad_upload"]})
                raise SSHError("%s: %s hashed right here but not on the device after the upload (a disk or "
                               "transfer fault there)" % (self.where, ", ".join(header["bad_upload"])),
                               infrastructure=True)
            if not header["missing"]:
                return header, body
            if attempt == 2:  # pragma: no cover - the helper commits before it checks
                raise SSHError("%s: %s still missing after upload" % (self.where, header["missing"]),
                               infrastructure=True)
            self._check_space(header, sources, {sha: 0 for sha in header["missing"]},
                              unpack=spec.get("bundle") in header["missing"])
            for sha in header["missing"]:
                spec["commit"].append([sha, self._upload(sources[sha], sha)])
            if header["replaced"]:
                log.warning("%s: cache entries %s did not match their sha256: replaced", self.where,
                            ", ".join(header["replaced"]))
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_space(self, header: Dict[str, Any], sources: Dict[str, Union[Path, bytes]], have: Dict[str, int],
                     unpack: bool = False) -> None:
        """SSHError (retrying cannot help) when the device's cache has less free space than the files in ``have``
        still need (their sizes less the bytes already there); an agent bundle to ``unpack`` needs its size twice."""
        free = header.get("free")
        if free is None:
            return
        need = {sha: max(0, _size(sources[sha]) - got) for sha, got in have.items()}
        total = sum(need.values()) + (_size(sources[self.bundle()[1]]) if unpack else 0)
        if total <= free:
            return
        what = ", ".join("%s %s" % (sources[sha].name if isinstance(sources[sha], Path) else "the agent bundle",
                                    _mb(_size(sources[sha]))) for sha in have)
        raise SSHError("%s: no space left on the device for the upload: its cache %s has %s free, %s needed (%s)"
                       % (self.where, self.cache_dir(), _mb(free), _mb(total), what), infrastructure=False)

    def _free_space(self) -> Optional[int]:
        """Free bytes in the device's cache (None when that cannot be found out)."""
        try:
            rc, out, _ = self.run([self.python, "-c", "import os, sys; s = os.statvfs(sys.argv[1]); "
                                   "print(s.f_bavail * s.f_frsize)", self.cache_dir()],
                                  timeout=self.ssh.connect_timeout_s)
            return int(out) if rc == 0 else None
        except (SSHError, ValueError):
            return None

    @contextmanager
    def _discarded_if_lost(self, tmp: str) -> Iterator[None]:
        """An upload whose connection is lost leaves ``<cache>/tmp`` behind: the next helper call removes it."""
        try:
            yield
        except SSHError as e:
            if e.infrastructure:
                with self._lock:
                    self._discard.append(tmp)
            raise

    def _upload(self, source: Union[Path, bytes], sha256: str) -> str:
        """SFTP ``source`` to ``<cache>/<sha256>.tmp.<random>``; return that name (relative to the cache)."""
        tmp = upload_name(sha256, secrets.token_hex(8))
        remote = self.cache_dir() + "/" + tmp
        local_hash = hashlib.sha256()
        size = 0
        sftp = self._sftp_client()
        try:
            src: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        except OSError as e:
            raise SSHError("%s: cannot read %s to upload it: %s" % (self.where, source, e.strerror),
                           infrastructure=False) from None
        t0 = time.perf_counter()
        with src, self._discarded_if_lost(tmp), self._wire("uploading to %s" % remote):
            try:
                with sftp.open(remote, "wb") as f:
                    f.set_pipelined(True)
                    f.MAX_REQUEST_SIZE = self._sftp_write  # paramiko's fixed 32 KiB costs ~1/3 of the throughput
                    while True:
                        block = src.read(UPLOAD_READ_BYTES)
                        if not block:
                            break
                        local_hash.update(block)
                        f.write(block)
                        size += len(block)
            except socket.timeout:                # no answer within command_timeout_s: the link, not the file
                self.close()
                raise SSHError("%s: uploading to %s: no progress within %g s; connection dropped"
                               % (self.where, remote, self.ssh.command_timeout_s), infrastructure=True,
                               timed_out=True) from None
            except OSError as e:                  # paramiko's SFTP status errors (no space, permission) are OSErrors
                if not self.connected or sftp.get_channel().closed:
                    raise                             # ... and so is a dead socket: _wire says "connection lost"
                free = self._free_space()         # before the partial file goes: is it what filled the disk?
                try:
                    sftp.remove(remote)
                except (OSError, paramiko.SSHException, EOFError):
                    pass
                full = "no space left on the device: " if free is not None and free < _size(source) else ""
                raise SSHError("%s: %scannot write %s there: %s (%s; %s free)"
                               % (self.where, full, remote, e, _mb(_size(source)),
                                  "unknown" if free is None else _mb(free)), infrastructure=False) from None
        if local_hash.hexdigest() != sha256:
            with self._wire("removing %s" % remote):
                sftp.remove(remote)
            raise SSHError("%s: %s does not match its sha256 %s (it hashes to %s)"
                           % (self.where, source if isinstance(source, Path) else "upload", sha256,
                              local_hash.hexdigest()), infrastructure=False)
        self.counters.files_uploaded += 1
        self.counters.bytes_uploaded += size
        log.debug("%s: uploaded %d bytes to %s in %.3f s", self.where, size, remote, time.perf_counter() - t0)
        return tmp


def _parse_helper_output(out: bytes) -> Tuple[Optional[Dict[str, Any]], bytes]:
    """DEVICE_HELPER's stdout -> (header, report bytes); (None, b"") when it did not get to print its header."""
    start = out.find(MARK)      # a chatty login shell may have printed something before it
    if start < 0:
        return None, b""
    line, nl, body = out[start + len(MARK):].partition(b"\n")
    try:
        header = json.loads(line) if nl else None
    except ValueError:
        return None, b""
    return (header, body) if isinstance(header, dict) else (None, b"")


def _size(source: Union[Path, bytes]) -> int:
    return len(source) if isinstance(source, bytes) else Path(source).stat().st_size


def _mb(n: int) -> str:
    return "%.2f MB" % (n / 1e6)


def check_sha256(sha256: str) -> str:
    """``sha256`` itself when it is 64 lowercase hex digits (a cache entry's name), else ValueError."""
    if not schema.SHA256_RE.match(sha256 or ""):
        raise ValueError("sha256 must be 64 lowercase hex digits, got %r" % (sha256,))
    return sha256
