"""What does the SSH transport cost? Upload throughput vs OpenSSH, host overhead per job, many devices at once.

    python bench/transport.py [--sizes 1,10,100] [--reps 3] [--jobs 10] [--devices 32] [--sshds 32]
                              [--tune] [--out FILE.json]

Everything runs against real OpenSSH servers on 127.0.0.1 started by ``tests/sshd.py`` (each with its own host
key and the device's own cache folder), so the "devices" share this machine's CPUs with the host: read the
parallel section for the host's own CPU, not for device throughput.

1. Upload: random (incompressible) files of each size, median of ``--reps``:
   ``SSHTransport`` SFTP upload on its open connection (``sftp put``), the full ``ensure_file`` (upload, sha256
   verified by the device's python, rename into the cache), and OpenSSH's ``scp`` (which speaks SFTP since
   OpenSSH 9.0) both over a fresh connection per file and over an already open ControlMaster connection.
   The goal is >= 50 % of scp's throughput. ``--tune`` adds a sweep over SFTP request sizes and ciphers.
2. Host overhead per job with everything cached: wall time of ``run_job`` minus the agent's own window
   (report ``finished_at - started_at``), median of ``--jobs`` jobs, before and after the agent session
   (issue 18: one SSH command and agent process per job, ``session=False``, vs one ``python -m agent serve``
   session for all jobs), SSH and local, interleaved job by job; one bare SSH command round trip and one session
   ``ping`` for scale. Goal <= 0.1 s with the session.
3. ``--devices`` devices driven at once from one thread each (``--sshds`` sshd processes; devices beyond that
   share servers round robin), cold (connect + uploads + job) and warm (cached job): wall and this process's CPU
   time (psutil), against one device alone.

Printed: Markdown tables (copied into bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import paramiko
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent import schema  # noqa: E402
from host.fleet.ssh import SSHTransport  # noqa: E402
from host.fleet.transport import LocalTransport  # noqa: E402
from tests import sshd  # noqa: E402

MB = 1 << 20


def median_spread(xs: Sequence[float]) -> Tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def cpu_s() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def openssh_version() -> str:
    out = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().split(",")[0]


# ---------------------------------------------------------------------------------------------- upload
def ssh_base_args(fleet: sshd.SshdFleet, server: sshd.Sshd) -> List[str]:
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", "UserKnownHostsFile=%s" % fleet.known_hosts, "-i", str(fleet.client_key)]


def scp(fleet: sshd.SshdFleet, server: sshd.Sshd, src: Path, dest: str, control: str = "") -> float:
    cmd = ["scp", "-q", *ssh_base_args(fleet, server), "-P", str(server.port)]
    if control:
        cmd += ["-o", "ControlPath=%s" % control, "-o", "ControlMaster=no"]
    cmd += [str(src), "%s@127.0.0.1:%s" % (fleet.user, dest)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def bench_upload(fleet: sshd.SshdFleet, work: Path, sizes: Sequence[int], reps: int) -> Dict[str, Any]:
    server = fleet.servers[0]
    cache = work / "upload-cache"
    dev = fleet.device(0, cache_dir=str(cache))
    control = str(work / "cm.sock")
    master = ["ssh", *ssh_base_args(fleet, server), "-p", str(server.port), "-o", "ControlMaster=yes",
              "-o", "ControlPath=%s" % control, "-fN", "%s@127.0.0.1" % fleet.user]
    subprocess.run(master, check=True, stdin=subprocess.DEVNULL)
    rows = []
    try:
        with SSHTransport(dev) as t:
            t.cache_dir()
            tr = t._transport()
            cipher = "%s + %s" % (tr.local_cipher, tr.local_mac)
            for size in sizes:
                src = work / ("upload-%dMB.bin" % size)
                with open(src, "wb") as f:
                    for _ in range(size):
                        f.write(os.urandom(MB))
                sha = hashlib.sha256(src.read_bytes()).hexdigest()
                put, ensure, scp_new, scp_mux = [], [], [], []
                for _ in range(reps):                       # interleaved: drift hits every method alike
                    t0 = time.perf_counter()
                    tmp = t._upload(src, sha)
                    put.append(time.perf_counter() - t0)
                    (cache / tmp).unlink()
                    t0 = time.perf_counter()
                    t.ensure_file(src, sha)
                    ensure.append(time.perf_counter() - t0)
                    (cache / sha).unlink()
                    scp_new.append(scp(fleet, server, src, str(cache / "scp.bin")))
                    scp_mux.append(scp(fleet, server, src, str(cache / "scp.bin"), control))
                    (cache / "scp.bin").unlink()
                src.unlink()
                mbps = {k: [size / x for x in v] for k, v in
                        (("put", put), ("ensure", ensure), ("scp_new", scp_new), ("scp_mux", scp_mux))}
                rows.append({"size_mb": size, **{k: median_spread(v) for k, v in mbps.items()}})
    finally:
        subprocess.run(["ssh", "-F", "/dev/null", "-o", "ControlPath=%s" % control, "-O", "exit", "x"],
                       capture_output=True)
    return {"rows": rows, "cipher": cipher}


def print_upload(res: Dict[str, Any], reps: int) -> None:
    print("\n### Upload throughput (MB/s, median of %d; min–max in brackets)\n" % reps)
    print("paramiko cipher: %s; scp: OpenSSH client defaults (chacha20-poly1305), SFTP protocol\n" % res["cipher"])
    print("| size | SFTP put (open conn.) | ensure_file (put + device sha256 + rename) | scp, open conn. "
          "(ControlMaster) | scp, new conn. | put / scp open | ensure_file / scp new |")
    print("|---:|---:|---:|---:|---:|---:|---:|")

    def cell(ms: Tuple[float, float, float]) -> str:
        return "%.1f (%.0f–%.0f)" % ms

    for r in res["rows"]:
        print("| %d MB | %s | %s | %s | %s | %.0f %% | %.0f %% |" % (
            r["size_mb"], cell(r["put"]), cell(r["ensure"]), cell(r["scp_mux"]), cell(r["scp_new"]),
            100 * r["put"][0] / r["scp_mux"][0], 100 * r["ensure"][0] / r["scp_new"][0]))


def bench_tune(fleet: sshd.SshdFleet, work: Path, reps: int, size: int = 100) -> List[Dict[str, Any]]:
    src = work / "tune.bin"
    data = os.urandom(size * MB)
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    cache = work / "tune-cache"
    out = []
    orig = paramiko.Transport._preferred_ciphers
    try:
        for cipher in ("aes128-ctr", "aes128-gcm@openssh.com"):
            paramiko.Transport._preferred_ciphers = (cipher,) + tuple(c for c in orig if c != cipher)
            for req in (32 << 10, 64 << 10, 128 << 10, 255 << 10):
                with SSHTransport(fleet.device(0, cache_dir=str(cache)), sftp_request_bytes=req) as t:
                    t._sftp_client()
                    xs = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        tmp = t._upload(src, sha)
                        xs.append(size / (time.perf_counter() - t0))
                        (cache / tmp).unlink()
                    out.append({"cipher": cipher, "request_kib": t._sftp_write >> 10, "mbps": median_spread(xs)})
    finally:
        paramiko.Transport._preferred_ciphers = orig
        src.unlink()
    return out


def print_tune(rows: List[Dict[str, Any]], reps: int) -> None:
    print("\n### SFTP tuning: 100 MB upload, MB/s (median of %d; min–max)\n" % reps)
    print("| cipher | write request | MB/s |")
    print("|---|---:|---:|")
    for r in rows:
        print("| %s | %d KiB | %.1f (%.0f–%.0f) |" % (r["cipher"], r["request_kib"], *r["mbps"]))


# -------------------------------------------------------------------------------------------- jobs
def make_inputs(work: Path) -> Tuple[Path, str, Path, str]:
    from edgeprune import data, export, models

    model, meta = models.pretrained("resnet20")
    ev = data.eval_split(5)
    man = export.export_onnx(model, work / "r20.onnx", check_inputs=data.to_tensor_batch(ev.images[:8]),
                             model_name="resnet20", source_checkpoint_sha256=meta["sha256"],
                             pruning_plan_sha256="0" * 64)
    shard = ev.save(work / "eval.npz")
    return work / "r20.onnx", man.sha256, shard, models.sha256_file(shard)


def make_job(inputs: Tuple[Path, str, Path, str], job_id: str) -> schema.JobSpec:
    from edgeprune import data

    onnx, onnx_sha, shard, shard_sha = inputs
    return schema.JobSpec(
        job_id=job_id, artifact=schema.ArtifactSpec(path=str(onnx), sha256=onnx_sha),
        preprocess=schema.PreprocessSpec(scale=data.SCALE, mean=list(data.MEAN), std=list(data.STD)),
        timing=schema.TimingSpec(min_iters=20, min_duration_s=0.2, warmup_s=0.05, warmup_iters=2),
        power=schema.PowerSpec(sensor="model", idle_w=5.0, max_w=15.0),
        eval=schema.EvalSpec(path=str(shard), sha256=shard_sha, split="eval")).validate()


def window_s(report: schema.Report) -> float:
    return (datetime.fromisoformat(report.finished_at) - datetime.fromisoformat(report.started_at)).total_seconds()


def overheads(run: Callable[[schema.JobSpec, Path], schema.Report], inputs: Any, work: Path, n: int,
              tag: str) -> List[float]:
    out = []
    for i in range(n):
        job = make_job(inputs, "%s%d" % (tag, i))
        t0 = time.perf_counter()
        report = run(job, work / job.job_id)
        wall = time.perf_counter() - t0
        assert report.status == "ok", report.error
        out.append(wall - window_s(report))
    return out


def bench_overhead(fleet: sshd.SshdFleet, work: Path, inputs: Any, n: int) -> Dict[str, Any]:
    """Before/after the agent session (issue 18), interleaved in one run: SSH and local, one command (one agent
    process) per job vs one agent session for all of them."""
    res: Dict[str, Any] = {}
    cache = str(work / "job-cache")
    with SSHTransport(fleet.device(0, cache_dir=cache), session=False) as per_job, \
            SSHTransport(fleet.device(0, cache_dir=cache), session=True) as sess, \
            LocalTransport(session=False) as local_per_job, LocalTransport(session=True) as local_sess:
        runs = {"ssh_per_job": per_job, "ssh_session": sess, "local_per_job": local_per_job,
                "local_session": local_sess}
        for name, t in runs.items():                                # uploads, connects, unpacks, opens sessions
            t.run_job(make_job(inputs, "warm-" + name), work / ("warm-" + name))
        before = {k: t.counters.as_dict() for k, t in runs.items() if hasattr(t, "counters")}
        got: Dict[str, List[float]] = {k: [] for k in runs}
        for i in range(n):                                             # interleaved
            for name, t in runs.items():
                got[name] += overheads(t.run_job, inputs, work, 1, "%s%d-" % (name, i))
        after = {k: t.counters.as_dict() for k, t in runs.items() if hasattr(t, "counters")}
        rtt = []
        for _ in range(n):
            t0 = time.perf_counter()
            per_job.run(["true"])
            rtt.append(time.perf_counter() - t0)
        ping = []
        for _ in range(n):
            t0 = time.perf_counter()
            sess.agent_request("ping", 10.0)
            ping.append(time.perf_counter() - t0)
    res.update({k: median_spread(v) for k, v in got.items()})
    res.update(rtt=median_spread(rtt), ping=median_spread(ping),
               commands_per_job={k: (after[k]["commands_run"] - before[k]["commands_run"]) / n for k in after},
               bytes_per_job={k: (after[k]["bytes_uploaded"] - before[k]["bytes_uploaded"]) / n for k in after},
               sessions=sess.sessions_opened)
    return res


def print_overhead(res: Dict[str, Any], n: int) -> None:
    print("\n### Host overhead per job, everything cached (s; median of %d; min–max)\n" % n)
    print("overhead = wall time of `run_job` − the agent's own window (report `finished_at − started_at`); the four "
          "ways interleaved job by job\n")
    print("| what | median | min–max |")
    print("|---|---:|---:|")
    cpj = res["commands_per_job"]
    print("| SSH, before: one command and one agent process per job (%.0f command(s) per job) | %.3f | %.3f–%.3f |"
          % (cpj["ssh_per_job"], *res["ssh_per_job"]))
    print("| SSH, after: one agent session for all jobs (%.0f commands per job; %d session) | **%.3f** | %.3f–%.3f |"
          % (cpj["ssh_session"], res["sessions"], *res["ssh_session"]))
    print("| local, before: one agent process per job | %.3f | %.3f–%.3f |" % res["local_per_job"])
    print("| local, after: one agent session | **%.3f** | %.3f–%.3f |" % res["local_session"])
    print("| SSH before / after | %.1f× | |" % (res["ssh_per_job"][0] / max(res["ssh_session"][0], 1e-9)))
    print("| for scale: one bare SSH command round trip (`true`) | %.3f | %.3f–%.3f |" % res["rtt"])
    print("| for scale: one session request round trip over SSH (`ping`) | %.3f | %.3f–%.3f |" % res["ping"])


# ---------------------------------------------------------------------------------------- parallel
def drive(transports: List[SSHTransport], inputs: Any, work: Path, tag: str) -> Tuple[float, float, int]:
    errors: List[BaseException] = []

    def one(i: int, t: SSHTransport) -> None:
        try:
            r = t.run_job(make_job(inputs, "%s%d" % (tag, i)), work / ("%s%d" % (tag, i)))
            if r.status != "ok":
                raise RuntimeError(r.error)
        except BaseException as e:  # noqa: BLE001 - counted and reported
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i, t)) for i, t in enumerate(transports)]
    c0, t0 = cpu_s(), time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    if errors:
        print("  %d of %d jobs failed; first: %r" % (len(errors), len(transports), errors[0]), file=sys.stderr)
    return wall, cpu, len(errors)


def bench_parallel(fleet: sshd.SshdFleet, work: Path, inputs: Any, devices: int) -> Dict[str, Any]:
    n_srv = len(fleet.servers)
    res: Dict[str, Any] = {}
    for n in (1, devices):
        ts = [SSHTransport(fleet.device(i % n_srv, device_id="dev%d" % i, cache_dir=str(work / ("c%d-%d" % (n, i)))))
              for i in range(n)]
        try:
            cold = drive(ts, inputs, work, "cold%d-" % n)
            warm = drive(ts, inputs, work, "warm%d-" % n)
            res[n] = {"cold": cold, "warm": warm, "threads": threading.active_count()}
        finally:
            for t in ts:
                t.close()
    return res


def print_parallel(res: Dict[str, Any], devices: int, sshds: int) -> None:
    print("\n### %d loopback devices at once (%d sshd processes, one SSHTransport and thread per device)\n"
          % (devices, sshds))
    print("The agents run on this machine's %d CPUs too: wall time is bounded by them, not by the host. "
          "Host CPU = this process (paramiko threads included), psutil.\n" % (os.cpu_count() or 0))
    print("| devices | phase | wall s | host CPU s | host CPU per device s | failed |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in sorted(res):
        for phase in ("cold", "warm"):
            wall, cpu, failed = res[n][phase]
            label = "cold (connect, upload 3 files, job)" if phase == "cold" else "warm (cached job)"
            print("| %d | %s | %.2f | %.2f | %.3f | %d |" % (n, label, wall, cpu, cpu / n, failed))


# -------------------------------------------------------------------------------------------- main
def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1,10,100", help="upload sizes in MB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--jobs", type=int, default=10, help="cached jobs for the overhead figure")
    p.add_argument("--devices", type=int, default=32)
    p.add_argument("--sshds", type=int, default=32, help="sshd processes for the parallel section")
    p.add_argument("--tune", action="store_true", help="also sweep SFTP request sizes and ciphers")
    p.add_argument("--skip", default="", help="comma list of sections to skip: upload,overhead,parallel")
    p.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = p.parse_args(list(argv) or None)
    if not sshd.have_sshd():
        print("needs OpenSSH's sshd at %s (apt-get install openssh-server)" % sshd.SSHD, file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    work = Path(tempfile.mkdtemp(prefix="edgeprune-bench-transport-"))
    results: Dict[str, Any] = {}
    t_start = time.perf_counter()
    fleet = sshd.start_fleet(work / "fleet", max(1, args.sshds), log_level="ERROR")
    try:
        print("## SSH transport — `bench/transport.py`\n")
        print("paramiko %s, %s, Python %s, %s, %d CPUs, user %s; sshd on 127.0.0.1 (internal-sftp)"
              % (paramiko.__version__, openssh_version(), platform.python_version(), platform.machine(),
                 os.cpu_count() or 0, getpass.getuser()))
        if "upload" not in skip:
            sizes = [int(s) for s in args.sizes.split(",")]
            results["upload"] = bench_upload(fleet, work, sizes, args.reps)
            print_upload(results["upload"], args.reps)
            if args.tune:
                results["tune"] = bench_tune(fleet, work, args.reps)
                print_tune(results["tune"], args.reps)
        inputs = make_inputs(work) if {"overhead", "parallel"} - skip else None
        if "overhead" not in skip:
            results["overhead"] = bench_overhead(fleet, work, inputs, args.jobs)
            print_overhead(results["overhead"], args.jobs)
        if "parallel" not in skip:
            results["parallel"] = bench_parallel(fleet, work, inputs, args.devices)
            print_parallel(results["parallel"], args.devices, len(fleet.servers))
        print("\n(total %.0f s)" % (time.perf_counter() - t_start))
    finally:
        fleet.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
