from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys


from agent import lease


def test_acquire_denies_second_holder_until_expiry(tmp_path):
    a = lease.acquire(tmp_path, {"host": "a"}, ttl_s=10, now=1000.0)
    assert a["acquired"] and len(a["token"]) == 32 and "token" not in a["lease"]
    b = lease.acquire(tmp_path, {"host": "b"}, ttl_s=10, now=1005.0)
    assert not b["acquired"] and b["lease"]["holder"] == {"host": "a"}
    c = lease.acquire(tmp_path, {"host": "b"}, ttl_s=10, now=1010.5)  # expired: taken over, and says from whom
    assert c["acquired"] and c["lease"]["took_over"]["holder"] == {"host": "a"}
    assert lease.release(tmp_path, a["token"]) == {"released": False, "reason": "not the holder"}
    assert lease.show(tmp_path, now=1011.0)["held"]
    assert lease.release(tmp_path, c["token"]) == {"released": True}
    assert not lease.show(tmp_path)["held"]


def test_renew_extends_only_for_the_holder(tmp_path):
    a = lease.acquire(tmp_path, {}, ttl_s=5, now=0.0)
    assert lease.renew(tmp_path, "nope", 100, now=1.0)["renewed"] is False
    assert lease.renew(tmp_path, a["token"], 100, now=4.0) == {"renewed": True, "expires_at": 104.0}
    assert not lease.acquire(tmp_path, {}, ttl_s=5, now=50.0)["acquired"]


def test_acquire_repeated_with_its_request_id_gets_its_own_lease_back(tmp_path):
    # the reply to the first acquire was lost: its retry, with the same request id, is given that lease again
    a = lease.acquire(tmp_path, {"host": "a"}, ttl_s=10, now=0.0, request="r1")
    assert a["acquired"] and "request" not in a["lease"] and "again" not in a
    again = lease.acquire(tmp_path, {"host": "a"}, ttl_s=10, now=8.0, request="r1")
    assert again["acquired"] and again["again"] and again["token"] == a["token"]
    assert again["lease"]["expires_at"] == 18.0                       # renewed from now
    other = lease.acquire(tmp_path, {"host": "b"}, ttl_s=10, now=9.0, request="r2")
    assert not other["acquired"] and "request" not in other["lease"] and "token" not in other["lease"]
    assert not lease.acquire(tmp_path, {"host": "b"}, ttl_s=10, now=9.0)["acquired"]    # no id: no match
    assert "request" not in (lease.show(tmp_path, now=9.0)["lease"] or {})
    # expired: a new lease (new token), even for the same id
    late = lease.acquire(tmp_path, {"host": "a"}, ttl_s=10, now=30.0, request="r1")
    assert late["acquired"] and "again" not in late and late["token"] != a["token"]


def test_corrupt_lease_file_counts_as_free(tmp_path):
    (tmp_path / lease.LEASE_FILE).write_text("{torn")
    assert lease.acquire(tmp_path, {}, ttl_s=5)["acquired"]


def _race(directory: str, i: int, start, results) -> None:
    start.wait()
    results.put(lease.acquire(__import__("pathlib").Path(directory), {"racer": i}, ttl_s=60)["acquired"])


def test_two_processes_racing_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("spawn")  # not fork: JAX (loaded by the tflite tests) warns on os.fork()
    for round_ in range(5):
        d = tmp_path / f"r{round_}"
        start, results = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(d), i, start, results)) for i in range(4)]
        for p in procs:
            p.start()
        start.set()
        won = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        assert sum(won) == 1, won


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "agent", "lease", *args], capture_output=True, text=True, timeout=60)


def test_cli_round_trip_and_bad_input(tmp_path):
    r = _cli("acquire", "--dir", str(tmp_path), "--holder", '{"host": "h1", "user": "u"}', "--ttl", "30")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["acquired"] and got["lease"]["holder"]["host"] == "h1" and "pid" in got["lease"]["holder"]
    busy = json.loads(_cli("acquire", "--dir", str(tmp_path)).stdout)
    assert not busy["acquired"]
    assert json.loads(_cli("release", "--dir", str(tmp_path), "--token", got["token"]).stdout)["released"]
    bad = _cli("acquire", "--dir", str(tmp_path), "--holder", "[1]")
    assert bad.returncode == 2 and "--holder: must be a JSON object" in bad.stderr
    assert _cli("release", "--dir", str(tmp_path)).returncode == 2
