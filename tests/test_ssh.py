"""SSHTransport against real OpenSSH servers on 127.0.0.1 (see tests/sshd.py); skipped where sshd is absent."""
from __future__ import annotations

import ast
import json
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest

paramiko = pytest.importorskip("paramiko")

from agent import schema  # noqa: E402
from edgeprune import data, models  # noqa: E402
from edgeprune.errors import ConfigError, DeviceError, HostKeyError, SSHError  # noqa: E402
from host.fleet.ssh import SSHTransport, agent_bundle, known_hosts_lines, parse_jump, quote_argv  # noqa: E402
from tests import sshd  # noqa: E402

pytestmark = sshd.needs_sshd()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory):
    f = sshd.start_fleet(tmp_path_factory.mktemp("sshd"), 4)
    yield f
    f.stop()


def _job(job_inputs, job_id="s1", **kw):
    onnx_path, man, shard = job_inputs
    return schema.JobSpec(
        job_id=job_id, artifact=schema.ArtifactSpec(path=str(onnx_path), sha256=man.sha256),
        preprocess=schema.PreprocessSpec(scale=data.SCALE, mean=list(data.MEAN), std=list(data.STD)),
        timing=schema.TimingSpec(min_iters=20, min_duration_s=0.2, warmup_s=0.05, warmup_iters=2),
        power=schema.PowerSpec(sensor="model", idle_w=5.0, max_w=15.0), thermal=None,
        eval=schema.EvalSpec(path=str(shard), sha256=models.sha256_file(shard), split="eval"), **kw).validate()


def _fake_python(tmp_path: Path, body: str) -> str:
    """A device "python" that runs the transport's helper (``-c``) with the real one and ``body`` for the agent."""
    script = tmp_path / "fake python"
    script.write_text('#!/bin/sh\nif [ "$1" = "-c" ]; then exec %s "$@"; fi\n%s\n' % (sys.executable, body))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


# ------------------------------------------------------------------------------------------------- jobs
def test_job_over_ssh_then_cache_hits_upload_nothing(fleet, tmp_path, job_inputs):
    with SSHTransport(fleet.device(0, cache_dir=str(tmp_path / "cache"))) as t:
        report = t.run_job(_job(job_inputs), tmp_path / "w")
        assert report.status == "ok", report.error
        assert report.identity.artifact_sha256 == job_inputs[1].sha256
        assert report.timing.iterations >= 20 and report.timing.latency_ms.median > 0
        assert report.accuracy.n == 50 and report.accuracy.top1 >= 0.8
        local = schema.loads_job((tmp_path / "w" / "job.json").read_text())
        assert local.artifact.path == str(job_inputs[0])               # the job as given, host paths
        assert schema.loads_report((tmp_path / "w" / "report.json").read_text()).job_id == "s1"
        first = t.counters.as_dict()
        assert first["files_uploaded"] == 3 and first["cache_hits"] == 0   # artifact, eval shard, agent bundle
        assert first["bytes_uploaded"] >= job_inputs[0].stat().st_size

        again = t.run_job(_job(job_inputs, job_id="s2"), tmp_path / "w2")
        assert again.status == "ok", again.error
        c = t.counters.as_dict()
        assert c["bytes_uploaded"] == first["bytes_uploaded"] and c["files_uploaded"] == 3
        # the second job: artifact and shard found in the cache through the agent session, no command at all
        assert c["cache_hits"] == first["cache_hits"] + 2 and c["commands_run"] == first["commands_run"]
        assert c["connects"] == 1 and t.sessions_opened == 1
    cache = tmp_path / "cache"
    assert sorted(p.name for p in (cache / "jobs").iterdir()) == []   # job folders are removed
    assert (cache / job_inputs[1].sha256).is_file() and not list(cache.glob("*.tmp.*"))


def test_several_eval_shards_each_travel_through_the_cache(fleet, tmp_path, job_inputs):
    """Job v3's ``eval.shards``: each shard uploaded once by its sha256, the device reads each from its cache entry,
    and the accuracy is that of the one shard they were cut from."""
    import numpy as np
    from edgeprune.shards import write_shards

    onnx_path, man, shard = job_inputs
    with np.load(shard) as z:
        images, labels = z["images"], z["labels"]
    infos = write_shards([(images[:25], labels[:25], None), (images[25:], labels[25:], None)], tmp_path / "shards",
                         max_bytes=images[:25].nbytes)
    assert len(infos) == 2
    job = _job(job_inputs, job_id="shards")
    job.eval = schema.EvalSpec(shards=[schema.ShardSpec(path=str(i.path), sha256=i.sha256) for i in infos],
                               split="eval")
    with SSHTransport(fleet.device(1, cache_dir=str(tmp_path / "cache"))) as t:
        report = t.run_job(job.validate(), tmp_path / "w")
        assert report.status == "ok", report.error
        assert report.accuracy.n == 50 and report.accuracy.shards == [i.sha256 for i in infos]
        assert t.counters.as_dict()["files_uploaded"] == 4             # artifact, two shards, agent bundle
        single = t.run_job(_job(job_inputs, job_id="single"), tmp_path / "w1")
    assert (report.accuracy.top1, report.accuracy.top5) == (single.accuracy.top1, single.accuracy.top5)
    assert all((tmp_path / "cache" / i.sha256).is_file() for i in infos)


def test_error_report_is_returned_not_raised(fleet, tmp_path, job_inputs):
    job = _job(job_inputs)
    job.artifact.input_shape = [1, 3, 16, 16]       # the model wants 32x32: the agent fails at run time
    with SSHTransport(fleet.device(1, cache_dir=str(tmp_path / "cache"))) as t:
        report = t.run_job(job, tmp_path / "w")
    assert report.status == "error" and report.error.message and report.timing is None


def test_wrong_sha_in_job_is_refused_before_anything_runs(fleet, tmp_path, job_inputs):
    job = _job(job_inputs)
    job.artifact.sha256 = "f" * 64
    with SSHTransport(fleet.device(1, cache_dir=str(tmp_path / "cache"))) as t:
        with pytest.raises(SSHError, match="does not match its sha256 f{64}") as e:
            t.run_job(job, tmp_path / "w")
    assert not e.value.infrastructure
    assert not list((tmp_path / "cache").glob("f" * 64 + "*"))


def test_tampered_cache_entry_is_replaced(fleet, tmp_path, job_inputs):
    onnx_path, man, _ = job_inputs
    with SSHTransport(fleet.device(2, cache_dir=str(tmp_path / "cache"))) as t:
        remote = t.ensure_file(onnx_path, man.sha256)
        assert remote == str((tmp_path / "cache" / man.sha256).resolve())
        assert t.ensure_file(onnx_path, man.sha256) == remote
        assert (t.counters.files_uploaded, t.counters.cache_hits) == (1, 1)
        Path(remote).write_bytes(b"not the model")                        # tamper with the device's copy
        t.ensure_file(onnx_path, man.sha256)
        assert (t.counters.files_uploaded, t.counters.cache_replaced) == (2, 1)
        assert Path(remote).read_bytes() == onnx_path.read_bytes()
        assert t.counters.bytes_uploaded == 2 * onnx_path.stat().st_size


def test_hung_agent_is_killed_at_job_timeout(fleet, tmp_path, job_inputs):
    pidfile = tmp_path / "pid"
    fake = _fake_python(tmp_path, "echo $$ > '%s'; exec sleep 60" % pidfile)
    dev = fleet.device(3, cache_dir=str(tmp_path / "cache"), python=fake)
    t0 = time.monotonic()
    # the one-command-per-job path (session=False); tests/test_agent_session.py times out a job in a session
    with SSHTransport(dev, grace_s=0.5, session=False) as t, \
            pytest.raises(SSHError, match="did not finish within 1 s; killed") as e:
        t.run_job(_job(job_inputs, timeout_s=0.5), tmp_path / "w")
    assert e.value.infrastructure and e.value.timed_out
    assert time.monotonic() - t0 < 15
    pid = int(pidfile.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert list((tmp_path / "cache" / "jobs").iterdir()) == []


def test_agent_without_report_is_not_an_infrastructure_error(fleet, tmp_path, job_inputs):
    fake = _fake_python(tmp_path, "echo 'job.json: runtime.threads: must be an integer' >&2; exit 2")
    dev = fleet.device(3, cache_dir=str(tmp_path / "cache"), python=fake)
    with SSHTransport(dev, session=False) as t, \
            pytest.raises(SSHError, match="exited 2 without a report: job.json: runtime") as e:
        t.run_job(_job(job_inputs), tmp_path / "w")
    assert isinstance(e.value, DeviceError) and not e.value.infrastructure


def test_invalid_report_is_refused(fleet, tmp_path, job_inputs):
    fake = _fake_python(tmp_path, "echo '{\"schema_version\": 99}' > report.json; exit 0")
    dev = fleet.device(3, cache_dir=str(tmp_path / "cache"), python=fake)
    with SSHTransport(dev, session=False) as t, \
            pytest.raises(SSHError, match="invalid report from the agent: schema_version"):
        t.run_job(_job(job_inputs), tmp_path / "w")


def test_four_devices_in_parallel(fleet, tmp_path, job_inputs):
    results: dict = {}

    def one(i: int) -> None:
        try:
            with SSHTransport(fleet.device(i, cache_dir=str(tmp_path / ("cache%d" % i)))) as t:
                results[i] = (t.run_job(_job(job_inputs, job_id="p%d" % i), tmp_path / ("w%d" % i)), t.counters)
        except Exception as e:  # pragma: no cover - reported by the assert below
            results[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert sorted(results) == [0, 1, 2, 3]
    for i, (report, counters) in sorted(results.items()):
        assert report.status == "ok" and report.job_id == "p%d" % i and report.accuracy.n == 50
        assert counters.files_uploaded == 3 and counters.connects == 1


def test_exec_agent_probe(fleet, tmp_path):
    with SSHTransport(fleet.device(0, cache_dir=str(tmp_path / "cache"))) as t:
        rc, out, err = t.exec_agent(["probe", "--json"])
        assert rc == 0, err
        info = json.loads(out)
        assert info["agent_version"] and "onnxruntime" in info["backends"]
        rc, out, err = t.exec_agent(["--version"])
        assert rc == 0 and out.startswith("agent ")
        # the bundle uploaded and unpacked (one helper command), then known for the connection: two agent commands
        assert t.counters.files_uploaded == 1 and t.counters.commands_run == 3


# ------------------------------------------------------------------------------------------ commands
def test_shell_metacharacters_are_inert(fleet, tmp_path, job_inputs):
    pwned = tmp_path / "pwned"
    payload = "$(touch %s1) `touch %s2`; touch %s3 | '\"\\ $HOME *" % (pwned, pwned, pwned)
    cache = tmp_path / ("c " + payload.replace("/", "_"))
    with SSHTransport(fleet.device(0, cache_dir=str(cache))) as t:
        rc, out, _ = t.run(["echo", payload, "$(touch %s4)" % pwned])
        assert rc == 0 and out == payload + " $(touch %s4)\n" % pwned
        report = t.run_job(_job(job_inputs), tmp_path / "w")
        assert report.status == "ok", report.error
        assert t.cache_dir() == str(cache)
    assert (cache / job_inputs[1].sha256).is_file()
    assert not list(tmp_path.glob("pwned*")) and not Path("/root/pwned1").exists()


def test_hung_command_is_killed_at_its_timeout(fleet):
    marker = "61.%d" % (time.time_ns() % 10**6)
    with SSHTransport(fleet.device(1)) as t:
        t0 = time.monotonic()
        with pytest.raises(SSHError, match="did not finish within 1 s; killed") as e:
            t.run(["sh", "-c", "sleep %s; echo late" % marker], timeout=1)
        assert e.value.timed_out and e.value.infrastructure and time.monotonic() - t0 < 10
        assert t.run(["echo", "still usable"])[1] == "still usable\n"   # the connection survives
    time.sleep(0.2)
    left = [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]
    assert left == []


def test_output_over_the_cap_is_refused(fleet):
    with SSHTransport(fleet.device(1), max_output_bytes=10_000) as t:
        with pytest.raises(SSHError, match="stdout exceeds 10000 bytes; refused"):
            t.run(["head", "-c", "50000", "/dev/zero"])
        assert t.run(["head", "-c", "10000", "/dev/zero"])[1] == "\0" * 10_000


def test_stdin_and_exit_status(fleet):
    with SSHTransport(fleet.device(2)) as t:
        assert t.run(["sh", "-c", "cat; echo err >&2; exit 3"], stdin=b"in\n") == (3, "in\n", "err\n")


def test_command_killed_by_a_signal_has_status_minus_one(fleet):
    with SSHTransport(fleet.device(2)) as t:
        assert t.run(["sh", "-c", "kill -KILL $$"])[0] == -1
        assert t.run(["true"])[0] == 0


def test_missing_device_python_is_a_clear_error(fleet, tmp_path):
    with SSHTransport(fleet.device(2, cache_dir=str(tmp_path / "cache"), python="/nonexistent/python3")) as t:
        with pytest.raises(SSHError, match="exit 127; is '/nonexistent/python3' a Python") as e:
            t.exec_agent(["--version"])
        assert not e.value.infrastructure and t.connected


def test_proxy_jump(fleet):
    jump = "%s@127.0.0.1:%d" % (fleet.user, fleet.servers[0].port)
    with SSHTransport(fleet.device(1, proxy_jump=jump)) as t:
        rc, out, _ = t.run(["sh", "-c", 'echo "$SSH_CONNECTION"'])
        assert rc == 0 and out.split()[2:] == ["127.0.0.1", str(fleet.servers[1].port)]
        assert t._jump is not None and t.connected
    assert t._jump is None and not t.connected


def test_quote_and_parse_helpers():
    assert quote_argv(["a b", "$(x)", "it's"]) == "'a b' '$(x)' 'it'\"'\"'s'"
    assert parse_jump("bastion", "pi") == ("pi", "bastion", 22)
    assert parse_jump("ops@10.0.0.1:2222", "pi") == ("ops", "10.0.0.1", 2222)
    assert parse_jump("ops@[::1]:2222", "pi") == ("ops", "::1", 2222)
    with pytest.raises(ValueError):
        parse_jump("a@b:c; rm -rf /", "pi")


def test_agent_bundle_is_deterministic_and_python_only():
    data1, sha1 = agent_bundle()
    data2, sha2 = agent_bundle()
    assert data1 == data2 and sha1 == sha2
    with zipfile.ZipFile(__import__("io").BytesIO(data1)) as z:
        names = z.namelist()
        assert names == sorted(names) and "agent/schema.py" in names and "agent/__main__.py" in names
        assert all(n.startswith("agent/") and n.endswith(".py") for n in names)
        assert {i.date_time for i in z.infolist()} == {(1980, 1, 1, 0, 0, 0)}



def test_device_helper_is_a_python_38_stdlib_program_sent_as_it_is():
    from host.fleet.ssh import cache
    from agent import device_helper

    text = Path(device_helper.__file__).read_text()
    assert cache.DEVICE_HELPER == text                      # what `python -c` gets is the file itself
    tree = ast.parse(text, feature_version=(3, 8))          # the device's python may be 3.8
    assert ast.get_docstring(tree)
    mods = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert mods and mods <= set(sys.stdlib_module_names) and not any(isinstance(n, ast.ImportFrom) for n in tree.body)
    *defs, guard = tree.body                                # importing it runs nothing: main() only under __main__
    assert all(isinstance(n, (ast.Expr, ast.Import, ast.Assign, ast.FunctionDef)) for n in defs)
    assert ast.unparse(guard) == "if __name__ == '__main__':\n    main()"
    assert device_helper.UPLOAD_RE.match(device_helper.upload_name("a" * 64, "0123456789abcdef"))
    assert device_helper.MARK == b"EDGEPRUNE_HELPER\n"


def test_device_helper_links_plain_file_names_only(tmp_path):
    from agent import device_helper

    sha = "a" * 64
    (tmp_path / sha).write_bytes(b"x")
    assert device_helper.link_all(str(tmp_path), str(tmp_path / "ok"), [["r20.bin", sha]]) is None
    assert (tmp_path / "ok" / "r20.bin").read_bytes() == b"x"
    for i, name in enumerate(["../x", ".hidden", "a/b", "", "a\\b"]):
        problem = device_helper.link_all(str(tmp_path), str(tmp_path / str(i)), [[name, sha]])
        assert problem is not None and problem.startswith("refused to link %r" % name)
        assert list((tmp_path / str(i)).iterdir()) == []

# -------------------------------------------------------------------------------- host keys and auth
def _fingerprint(key_file: Path) -> str:
    """OpenSSH's own ``SHA256:...`` fingerprint of a key file (``ssh-keygen -lf``), to check the transport's."""
    out = subprocess.run([sshd.SSH_KEYGEN, "-lf", str(key_file)], check=True, capture_output=True, text=True)
    return out.stdout.split()[1]


def test_unknown_host_key_is_refused(fleet, tmp_path):
    kh = sshd.write_known_hosts(tmp_path / "known_hosts", [])
    for path in (kh, tmp_path / "absent" / "known_hosts"):
        with SSHTransport(fleet.device(0, known_hosts=str(path))) as t, pytest.raises(HostKeyError) as e:
            t.run(["true"])
        msg = str(e.value)
        assert "unknown host key for [127.0.0.1]:%d" % fleet.servers[0].port in msg
        assert str(path) in msg and "ssh-keyscan -p %d" % fleet.servers[0].port in msg
        assert not e.value.infrastructure and t.counters.commands_run == 0
        err = e.value                                                  # the details, as attributes
        assert err.host == sshd.known_hosts_name(fleet.servers[0].port) and err.key_type == "ssh-ed25519"
        assert err.fingerprint == _fingerprint(fleet.servers[0].host_key) and err.fingerprint in msg
        assert err.expected_fingerprint is None and not err.changed
        assert err.known_hosts == str(path) and err.lines == ()
    assert kh.read_text() == "" and not (tmp_path / "absent").exists()


def test_changed_host_key_is_refused(fleet, tmp_path):
    other = sshd.keygen(tmp_path / "other_host_key").split()
    name = sshd.known_hosts_name(fleet.servers[0].port)
    kh = sshd.write_known_hosts(tmp_path / "known_hosts", ["# a comment", "%s %s %s" % (name, other[0], other[1])])
    for policy in ("reject", "accept-new"):
        with SSHTransport(fleet.device(0, known_hosts=str(kh), host_key_policy=policy)) as t:
            with pytest.raises(HostKeyError, match="HOST KEY CHANGED") as e:
                t.run(["true"])
        assert "man-in-the-middle" in str(e.value) and "%s:2" % kh in str(e.value)
        assert "ssh-keygen -R '%s'" % name in str(e.value)
        err = e.value                                                  # the details, as attributes
        assert (err.host, err.key_type, err.known_hosts, err.lines) == (name, "ssh-ed25519", str(kh), (2,))
        assert err.fingerprint == _fingerprint(fleet.servers[0].host_key) and err.fingerprint in str(e.value)
        assert err.expected_fingerprint == _fingerprint(tmp_path / "other_host_key") and err.changed
        assert err.expected_fingerprint in str(e.value) and not err.infrastructure
    assert kh.read_text().count("\n") == 2       # never rewritten


def test_accept_new_records_then_pins(fleet, tmp_path):
    server = sshd.start_sshd(tmp_path / "d", fleet.authorized_keys)
    try:
        name = sshd.known_hosts_name(server.port)
        for hashed in (False, True):
            kh = tmp_path / ("hashed" if hashed else "plain") / "known_hosts"
            dev = fleet.device(0, port=server.port, known_hosts=str(kh), host_key_policy="accept-new")
            with SSHTransport(dev, hash_known_hosts=hashed) as t:
                assert t.run(["echo", "ok"])[1] == "ok\n"
            lines = kh.read_text().splitlines()
            assert len(lines) == 1 and lines[0].split()[1:] == server.host_key_line.split()[:2]
            assert lines[0].startswith("|1|") if hashed else lines[0].split()[0] == name
            assert known_hosts_lines(kh, name) == [1]
            with SSHTransport(dev) as t:                                       # pinned: nothing appended
                assert t.run(["true"])[0] == 0
            assert kh.read_text().splitlines() == lines
        live = SSHTransport(dev)
        live.run(["true"])
        server.stop()                                      # the device goes away (its session process too) ...
        _kill_session(live, server.port)
        for _ in range(2):                                 # connection lost, then connection refused
            with pytest.raises(SSHError) as e:
                live.run(["true"])
            assert e.value.infrastructure and not isinstance(e.value, HostKeyError)
        server = sshd.start_sshd(tmp_path / "d2", fleet.authorized_keys, port=server.port)   # ... reinstalled
        with pytest.raises(HostKeyError, match="HOST KEY CHANGED"):
            live.run(["true"])
        live.close()
    finally:
        server.stop()


def _kill_session(t: SSHTransport, server_port: int) -> None:
    """Kill the sshd process serving ``t``'s connection (stopping the listener leaves sessions running)."""
    local_port = t._client.get_transport().sock.getsockname()[1]
    pids = {c.pid for c in psutil.net_connections("tcp")
            if c.laddr and c.laddr.port == server_port and c.raddr and c.raddr.port == local_port and c.pid}
    assert pids
    for pid in pids:
        psutil.Process(pid).kill()


def test_wrong_client_key_is_refused(fleet, tmp_path):
    sshd.keygen(tmp_path / "stranger")
    with SSHTransport(fleet.device(0, key=str(tmp_path / "stranger"))) as t, pytest.raises(SSHError) as e:
        t.run(["true"])
    assert "authentication failed with the key %s" % (tmp_path / "stranger") in str(e.value)
    assert not e.value.infrastructure


def test_missing_key_file_is_a_config_error(fleet, tmp_path):
    dev = fleet.device(0, key="keys/absent_ed25519").model_copy(update={"source": str(tmp_path / "pi.yaml")})
    with pytest.raises(ConfigError, match=r"pi\.yaml: ssh\.key: private key file .*keys/absent_ed25519 does not"):
        SSHTransport(dev).run(["true"])


def test_closed_port_fails_fast(fleet):
    t0 = time.monotonic()
    with SSHTransport(fleet.device(0, port=sshd.free_port(), connect_timeout_s=3)) as t:
        with pytest.raises(SSHError, match="cannot connect: Connection refused") as e:
            t.run(["true"])
    assert e.value.infrastructure and time.monotonic() - t0 < 3


def test_silent_server_times_out_within_connect_timeout(fleet):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)                      # accepts TCP, never says a word
        dev = fleet.device(0, port=listener.getsockname()[1], connect_timeout_s=1)
        t0 = time.monotonic()
        with SSHTransport(dev) as t, pytest.raises(SSHError, match="within 1 s") as e:
            t.run(["true"])
        assert e.value.infrastructure and e.value.timed_out and time.monotonic() - t0 < 4
