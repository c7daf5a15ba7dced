"""The device helper: one program the SSH transport runs on the device for cache checks, and for jobs without an
agent session.

Sent as text: the host reads this file and runs ``<python> -c <this file's text> SPEC_JSON`` over SSH
(``host.fleet.ssh.cache``), with ``job.json`` on stdin when SPEC has ``"run"`` — it is what unpacks the agent
bundle, so it cannot come from it. It runs under the device's Python (3.8 or newer), standard library only, and
does its work only under ``__main__``. It lives in the agent package because an agent session
(:mod:`agent.session`) imports it for the same cache work (:func:`cache_ops`, :func:`link_all`, :func:`claim`):
one implementation of the cache's rules on the device; the host imports it for its constants (:data:`MARK`,
:func:`upload_name`).

SPEC (JSON, every key optional but ``cache``)
    ``cache``           the device cache folder (absolute)
    ``evict``           job folder names (under ``<cache>/jobs``) the host lost track of: their jobs are stopped if
                        they still run (the folder's ``.pgid`` group, when its ``.lock`` is still held) and removed
    ``discard``         temp upload names of the host's lost connections: removed, as is any temp upload older
                        than ``stale_upload_s`` (default 3600)
    ``commit``          ``[sha256, temp name]`` pairs: each upload is renamed to ``<cache>/<sha256>`` once its
                        sha256 verifies here, else removed (``bad_upload``)
    ``want``            sha256s that must be in the cache (verified: a tampered entry is deleted)
    ``bundle``          the agent bundle's sha256: unpacked once to ``<cache>/agent-<sha256>/`` (atomically)
    ``run``             a job, run only when nothing is missing: ``jobdir`` (its folder's name), ``python``,
                        ``argv`` (after ``-m agent``), ``timeout_s``, ``links`` (``[file name, sha256]``, linked into
                        ``artifact/``), ``max_report`` (bytes), ``log_tail`` (characters)

Output on stdout: the line :data:`MARK`, one JSON header line (the ``out`` dict of :func:`main`: ``hits``,
``missing``, ``replaced``, ``committed``, ``bad_upload`` and ``bad_upload_sizes``, ``evicted``, ``discarded``,
``free`` bytes in the cache, and for a job ``rc``, ``timed_out``, ``host_gone``, ``link_error``, ``report_size``,
``report_error``, ``log_tail``), then the report's bytes (``report_size`` of them; none without a job).

The helper leads its own process group and holds ``<jobdir>/.lock`` while it lives, so that a later helper can
tell whether a job folder's group is still that job's (:func:`evict`). The agent is killed at ``timeout_s``, and
at once when the host's end of stdout is gone (sshd closed it); then the whole group goes too.
"""
import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

MARK = b"EDGEPRUNE_HELPER\n"    # printed before the header: a chatty login shell may print before it
UPLOAD_RE = re.compile(r"^[0-9a-f]{64}\.tmp\.[0-9a-f]{16}$")   # upload_name's names: a file while it travels


def upload_name(sha, nonce):
    """The temp name (in the cache) of an upload of ``sha`` in flight; ``nonce`` is 16 hex digits."""
    return "%s.tmp.%s" % (sha, nonce)


def sha256(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def cached(cache, sha, out):
    p = os.path.join(cache, sha)
    if not os.path.isfile(p):
        return False
    if sha256(p) == sha:
        return True
    os.unlink(p)
    out["replaced"].append(sha)
    return False


def unpack(cache, sha, dest):
    tmp = tempfile.mkdtemp(prefix=".agent-", dir=cache)
    try:
        with zipfile.ZipFile(os.path.join(cache, sha)) as z:
            for n in z.namelist():
                if n.startswith("/") or ".." in n.split("/") or not n.startswith("agent/"):
                    raise ValueError("unexpected name in agent bundle: %r" % n)
            z.extractall(tmp)
        os.rename(tmp, dest)
    except OSError:
        if not os.path.isdir(dest):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_all(cache, links, pairs):
    # pairs: [file name, sha256 of a cache entry] (or, from an agent session on the host's own machine, [file
    # name, absolute path of the file])
    os.mkdir(links, 0o700)
    for name, sha in pairs:
        plain = isinstance(name, str) and name and not name.startswith(".") and "/" not in name and \
            "\\" not in name and "\0" not in name and len(name) <= 255
        source = isinstance(sha, str) and ((len(sha) == 64 and all(c in "0123456789abcdef" for c in sha))
                                           or (os.path.isabs(sha) and "\0" not in sha))
        if not (plain and source):
            return "refused to link %r to %r: not a plain file name and a sha256" % (name, sha)
        src, dst = os.path.join(cache, sha), os.path.join(links, name)
        try:
            os.symlink(src, dst)
        except (OSError, NotImplementedError):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return None


def claim(jobdir):
    # this helper's process group, then a lock held for its lifetime: evict() sees whether it still runs
    with open(os.path.join(jobdir, ".pgid"), "w") as f:
        f.write(str(os.getpgid(0)))
    fd = os.open(os.path.join(jobdir, ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def evict(jobs, name, out):
    # a job of this host's that it lost track of (connection lost, deadline passed): stop it if it still runs
    d = os.path.join(jobs, name)
    if "/" in name or name.startswith(".") or not os.path.isdir(d):
        return
    try:
        fd = os.open(os.path.join(d, ".lock"), os.O_RDWR)
    except OSError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:                 # held: its helper still runs
            try:
                with open(os.path.join(d, ".pgid")) as f:
                    os.killpg(int(f.read()), signal.SIGKILL)
                out["evicted"].append(name)
            except (OSError, ValueError):
                pass
            for _ in range(200):
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    time.sleep(0.05)
        finally:
            os.close(fd)
    shutil.rmtree(d, ignore_errors=True)


def run_agent(run, jobdir, bundle_dir, out):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in (bundle_dir, env.get("PYTHONPATH")) if p])
    logpath = os.path.join(jobdir, "agent.log")
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.signal(signal.SIGCHLD, lambda *a: None)   # a Python handler: the agent's exit writes to wake_w
    signal.set_wakeup_fd(wake_w)
    watch = select.poll()
    watch.register(wake_r, select.POLLIN)
    watch.register(1, 0)        # stdout: POLLERR/POLLHUP once sshd, the host's end of it, is gone
    deadline = time.monotonic() + run["timeout_s"]
    with open(logpath, "wb") as logf:
        proc = subprocess.Popen([run["python"], "-m", "agent"] + run["argv"], cwd=jobdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            left = deadline - time.monotonic()
            if left <= 0:
                out["timed_out"] = True
                break
            ready = dict(watch.poll(min(left, 60.0) * 1000))
            try:
                os.read(wake_r, 4096)
            except OSError:
                pass
            if ready.get(1, 0) & (select.POLLERR | select.POLLHUP):
                out["host_gone"] = True
                break
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        else:
            out["rc"] = proc.returncode
    out["log_tail"] = tail(logpath, run["log_tail"])
    rp = os.path.join(jobdir, "report.json")
    if not os.path.isfile(rp):
        return b""
    size = os.path.getsize(rp)
    if size > run["max_report"]:
        out["report_error"] = "report.json is %d bytes, over the %d-byte limit" % (size, run["max_report"])
        return b""
    with open(rp, "rb") as f:
        report = f.read()
    out["report_size"] = len(report)
    return report


def tail(path, n):
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode("utf-8", "replace")


def new_out():
    return {"hits": [], "missing": [], "replaced": [], "committed": [], "bad_upload": [], "rc": None,
            "timed_out": False, "report_size": None, "report_error": None, "log_tail": "", "link_error": None,
            "bad_upload_sizes": {}, "evicted": [], "discarded": [], "host_gone": False, "free": None}


def cache_ops(spec, out):
    # everything but "run": evict, discard, commit, want, bundle, free; returns the bundle's folder (or None).
    # An agent session (agent/session.py) calls this for its "cache" requests.
    cache = spec["cache"]
    jobs = os.path.join(cache, "jobs")
    for name in spec.get("evict", []):
        evict(jobs, name, out)
    now = time.time()
    for name in os.listdir(cache):
        if UPLOAD_RE.match(name):       # an upload whose connection was lost: the host's, or stale
            p = os.path.join(cache, name)
            try:
                if name in spec.get("discard", []) or now - os.stat(p).st_mtime > spec.get("stale_upload_s", 3600):
                    os.unlink(p)
                    out["discarded"].append(name)
            except OSError:
                pass
    for sha, tmp in spec.get("commit", []):
        t = os.path.join(cache, tmp)
        if sha256(t) == sha:
            os.replace(t, os.path.join(cache, sha))
            out["committed"].append(sha)
        else:
            out["bad_upload_sizes"][sha] = os.path.getsize(t)
            os.unlink(t)
            out["bad_upload"].append(sha)
    for sha in spec.get("want", []):
        if sha in out["committed"]:
            continue
        out["hits" if cached(cache, sha, out) else "missing"].append(sha)
    b = spec.get("bundle")
    d = None
    if b:
        d = os.path.join(cache, "agent-" + b)
        if os.path.isdir(d):
            out["hits"].append(b)
        elif b in out["committed"] or cached(cache, b, out):
            unpack(cache, b, d)
        else:
            out["missing"].append(b)
    st = os.statvfs(cache)
    out["free"] = st.f_bavail * st.f_frsize
    return d


def main():
    try:
        os.setpgid(0, 0)
    except OSError:
        pass
    spec = json.loads(sys.argv[1])
    cache = spec["cache"]
    out = new_out()
    jobs = os.path.join(cache, "jobs")
    d = cache_ops(spec, out)
    run = spec.get("run")
    report = b""
    if run and not out["missing"] and not out["bad_upload"]:
        if not os.path.isdir(jobs):
            os.makedirs(jobs, 0o700)
        jobdir = os.path.join(jobs, run["jobdir"])
        os.mkdir(jobdir, 0o700)
        try:
            claim(jobdir)
            with open(os.path.join(jobdir, "job.json"), "wb") as f:
                f.write(sys.stdin.buffer.read())
            out["link_error"] = link_all(cache, os.path.join(jobdir, "artifact"), run.get("links", []))
            if out["link_error"] is None:
                report = run_agent(run, jobdir, d, out)
        finally:
            shutil.rmtree(jobdir, ignore_errors=True)
    if out["host_gone"]:
        os.killpg(0, signal.SIGKILL)  # nobody to report to: the agent is stopped, and so is everything it started
    sys.stdout.buffer.write(MARK + json.dumps(out).encode() + b"\n" + report)
    sys.stdout.buffer.flush()
    if out["timed_out"]:
        os.killpg(0, signal.SIGKILL)  # whatever the killed agent started in this process group goes too


if __name__ == "__main__":
    main()
