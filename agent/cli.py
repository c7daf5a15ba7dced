"""``python -m agent``: the only place in the agent that prints or chooses exit codes.

Exit codes: 0 ok; 1 the job ran but failed (the report is still written, status "error");
2 bad job spec or usage (one line on stderr naming the file and the field).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional

import agent
from agent import lease, probe, runner
from agent.schema import SchemaError, dumps, loads_job

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE = 0, 1, 2


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temp file beside ``path``, fsync it, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, str(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent", description="edgeprune device agent")
    p.add_argument("--version", action="version", version="agent " + agent.__version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run = sub.add_parser("run", help="run a job spec and write its report")
    run.add_argument("job", type=Path, help="job spec JSON (paths in it are relative to its folder)")
    run.add_argument("--out", type=Path, help="report JSON path, written atomically (default: stdout)")
    se = sub.add_parser("serve", help="an agent session: JSON-line requests on stdin, replies on stdout "
                        "(protocol in agent/session.py)")
    se.add_argument("--log", default=None, help="append what the agent and the runtimes print to this file "
                    "(default: a temp file, named in the hello reply; removed when the session ends with bye)")
    pr = sub.add_parser("probe", help="describe this device")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.add_argument("--disk", default="~", help="report free disk space for this folder (default: home)")
    pr.add_argument("--devices", action="store_true",
                    help="also list OpenVINO devices and onnxruntime providers (imports those runtimes)")
    le = sub.add_parser("lease", help="take, renew, release or show this device's exclusive lease (JSON out)")
    le.add_argument("action", choices=["acquire", "renew", "release", "show"])
    le.add_argument("--dir", type=Path, required=True, help="lease folder (the device cache)")
    le.add_argument("--holder", default="{}", help="acquire: JSON object describing the holder")
    le.add_argument("--ttl", type=float, default=600.0, help="acquire/renew: seconds until the lease expires")
    le.add_argument("--token", default="", help="renew/release: the token acquire returned")
    le.add_argument("--request", default="",
                    help="acquire: a random id repeated on retries; a live lease taken with it is returned again "
                         "(the reply to the first acquire was lost)")
    return p


def _cmd_lease(args: argparse.Namespace) -> int:
    try:
        holder = json.loads(args.holder)
        if not isinstance(holder, dict):
            raise ValueError("not an object")
    except ValueError as e:
        print("--holder: must be a JSON object (%s)" % e, file=sys.stderr)
        return EXIT_USAGE
    if args.ttl <= 0:
        print("--ttl: must be > 0", file=sys.stderr)
        return EXIT_USAGE
    if args.action in ("renew", "release") and not args.token:
        print("--token: required for %s" % args.action, file=sys.stderr)
        return EXIT_USAGE
    holder.setdefault("pid", os.getppid())
    if args.action == "acquire":
        result = lease.acquire(args.dir, holder, args.ttl, request=args.request or None)
    elif args.action == "renew":
        result = lease.renew(args.dir, args.token, args.ttl)
    elif args.action == "release":
        result = lease.release(args.dir, args.token)
    else:
        result = lease.show(args.dir)
    print(json.dumps(result, sort_keys=True))
    return EXIT_OK


def _cmd_run(job_path: Path, out: Optional[Path]) -> int:
    try:
        text = job_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        print("%s: cannot read job spec: %s" % (job_path, e), file=sys.stderr)
        return EXIT_USAGE
    try:
        job = loads_job(text)
        runner.check_job(job)
        runner.check_paths(job, job_path.parent)
    except SchemaError as e:
        print("%s: %s" % (job_path, e), file=sys.stderr)
        return EXIT_USAGE
    if out is not None and not out.parent.is_dir():
        print("--out: folder %s does not exist" % out.parent, file=sys.stderr)
        return EXIT_USAGE
    report = runner.run_job(job, job_path.parent)
    text = dumps(report.validate()) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        write_atomic(out, text)
    if report.status != "ok" and report.error is not None:
        print("%s: job %s failed: %s: %s" % (job_path, job.job_id, report.error.type, report.error.message),
              file=sys.stderr)
        return EXIT_JOB_FAILED
    return EXIT_OK


def _cmd_probe(as_json: bool, disk: str = "~", devices: bool = False) -> int:
    info = probe.probe(devices=devices, disk_path=disk)
    if as_json:
        print(json.dumps(info, indent=1, sort_keys=True))
        return EXIT_OK
    for key in sorted(info):
        value = info[key]
        print("%-14s %s" % (key + ":", json.dumps(value, sort_keys=True) if isinstance(value, dict) else value))
    return EXIT_OK


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return _cmd_run(args.job, args.out)
    if args.command == "lease":
        return _cmd_lease(args)
    if args.command == "serve":
        from agent import session

        return session.main(args.log)
    return _cmd_probe(args.json, args.disk, args.devices)
