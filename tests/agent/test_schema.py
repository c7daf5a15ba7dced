"""The wire contract: round trips, and refusals that name the offending field."""
from __future__ import annotations

import json
import re

import pytest

from agent.schema import (ErrorInfo, JobSpec, LatencyStats, Report, SchemaError, TimingResult, dumps,
                          file_name_problem, job_from_dict, loads_job, loads_report)

SHA = "a" * 64


def minimal_job() -> dict:
    return {"schema_version": 1, "job_id": "j1", "artifact": {"path": "m.onnx", "sha256": SHA}}


def test_job_round_trip_keeps_every_field() -> None:
    d = minimal_job()
    d["eval"] = {"path": "e.npz", "sha256": "b" * 64, "batch_size": 7}
    d["timing"] = {"cpu_affinity": [0], "min_iters": 5}
    job = loads_job(json.dumps(d))
    assert isinstance(job, JobSpec)
    assert job.eval is not None and job.eval.batch_size == 7
    assert job.timing.cpu_affinity == [0] and job.timing.min_iters == 5 and job.timing.max_iters == 100000
    again = loads_job(dumps(job))
    assert again == job


def test_report_round_trip() -> None:
    stats = LatencyStats(mean=1.0, median=1.0, p90=1.5, p99=2.0, min=0.5, max=3.0, std=0.1, cv=0.1)
    timing = TimingResult(protocol={"threads": 1}, load_time_ms=3.0, first_inference_ms=2.0, warmup_iters_done=10,
                          iterations=100, duration_s=0.1, batch_size=1, latency_ms=stats, throughput_ips=1000.0,
                          samples_ms=[1.0, 2.0])
    report = Report(job_id="j1", status="error", timing=timing, warnings=["w"],
                    error=ErrorInfo(type="ArtifactError", message="m"))
    assert loads_report(dumps(report)) == report


@pytest.mark.parametrize("version", [0, 4, "1", None])
def test_unknown_schema_version_is_refused(version: object) -> None:
    d = minimal_job()
    d["schema_version"] = version
    with pytest.raises(SchemaError, match="schema_version"):
        job_from_dict(d)


def test_unknown_field_is_refused_by_name() -> None:
    d = minimal_job()
    d["timing"] = {"min_itres": 5}
    with pytest.raises(SchemaError, match=r"^timing\.min_itres: unknown field$"):
        job_from_dict(d)


@pytest.mark.parametrize("where, value, message", [
    (("runtime", "threads"), "4", r"^runtime\.threads: must be an integer$"),
    (("runtime", "threads"), True, r"^runtime\.threads: must be an integer$"),
    (("timing", "min_duration_s"), "2", r"^timing\.min_duration_s: must be a number$"),
    (("artifact", "input_shape"), [1, "3"], r"^artifact\.input_shape\[1\]: must be an integer$"),
    (("artifact", "sha256"), "ABC", r"^artifact\.sha256: must be 64 lowercase hex digits$"),
])
def test_wrong_type_or_value_names_the_field(where: tuple, value: object, message: str) -> None:
    d = minimal_job()
    d.setdefault(where[0], {})[where[1]] = value
    with pytest.raises(SchemaError, match=message):
        job_from_dict(d)


def test_missing_required_field_is_named() -> None:
    d = minimal_job()
    del d["artifact"]["sha256"]
    with pytest.raises(SchemaError, match=r"^artifact\.sha256: is required$"):
        job_from_dict(d)


def test_invalid_json_is_a_schema_error() -> None:
    with pytest.raises(SchemaError, match="not valid JSON"):
        loads_job("{")


# ------------------------------------------------------------------------------------ artifact.files (v2)
def test_v2_artifact_files_round_trip_and_v1_still_reads() -> None:
    d = minimal_job()
    d["schema_version"] = 2
    d["artifact"].update(path="r20.xml", format="openvino-ir", files={"r20.bin": "b" * 64})
    job = job_from_dict(d)
    assert job.schema_version == 2 and job.artifact.files == {"r20.bin": "b" * 64}
    assert loads_job(dumps(job)) == job
    old = job_from_dict(minimal_job())                      # version 1: no files, read as before
    assert old.schema_version == 1 and old.artifact.files == {}
    assert loads_job(dumps(old)) == old
    assert JobSpec(job_id="j", artifact=old.artifact).schema_version == 3   # what the host writes now


def test_v1_job_with_files_is_refused() -> None:
    d = minimal_job()
    d["artifact"]["files"] = {"m.bin": "b" * 64}
    with pytest.raises(SchemaError, match=r"^artifact\.files: needs schema_version 2 \(this job says 1\)$"):
        job_from_dict(d)


@pytest.mark.parametrize("name, message", [
    ("../x", "must be a plain file name, without folders"),
    ("sub/x.bin", "must be a plain file name, without folders"),
    ("..\\x.bin", "must be a plain file name, without folders"),
    ("/etc/passwd", "must be a plain file name, without folders"),
    ("..", "must not start with '.'"),
    (".", "must not start with '.'"),
    (".hidden", "must not start with '.'"),
    ("a\0b", "must not contain NUL"),
    ("", "must be a non-empty file name"),
    ("x" * 256, "is longer than 255 characters"),
])
def test_artifact_files_names_must_be_plain(name: str, message: str) -> None:
    d = minimal_job()
    d["schema_version"] = 2
    d["artifact"]["files"] = {"ok.bin": "b" * 64, name: "c" * 64}
    with pytest.raises(SchemaError, match=r"^artifact\.files: .* " + re.escape(message)):
        job_from_dict(d)


@pytest.mark.parametrize("files, message", [
    ({"m.onnx": "b" * 64}, r"^artifact\.files\.m\.onnx: is the artifact itself"),
    ({"m.bin": "B" * 64}, r"^artifact\.files\.m\.bin: must be 64 lowercase hex digits$"),
    ({"m.bin": 5}, r"^artifact\.files\.m\.bin: must be a string$"),
    (["m.bin"], r"^artifact\.files: must be an object$"),
])
def test_artifact_files_entries_are_checked(files: object, message: str) -> None:
    d = minimal_job()
    d["schema_version"] = 2
    d["artifact"]["files"] = files
    with pytest.raises(SchemaError, match=message):
        job_from_dict(d)


def test_file_name_problem_accepts_plain_names() -> None:
    for name in ("r20.bin", "r20.trt.calib.npz", "r20_edgetpu.log", "a..b", "x" * 255):
        assert file_name_problem(name) is None, name


# ----------------------------------------------------------------------------- eval.shards (job v3)
def v3_job(**eval_fields: object) -> dict:
    d = minimal_job()
    d["schema_version"] = 3
    d["eval"] = dict(eval_fields)
    return d


def test_v3_eval_shards_round_trip_and_the_single_shard_form_is_still_read() -> None:
    from agent.schema import ShardSpec
    job = job_from_dict(v3_job(shards=[{"path": "a.npz", "sha256": "b" * 64}, {"path": "b.npz", "sha256": "c" * 64}],
                               batch_size=8))
    assert job.eval is not None and job.eval.shard_list() == [ShardSpec("a.npz", "b" * 64), ShardSpec("b.npz", "c" * 64)]
    assert job.eval.shard_fields() == ["eval.shards[0].path", "eval.shards[1].path"]
    assert loads_job(dumps(job)) == job
    for version in (1, 2, 3):   # eval.path + eval.sha256: one shard
        d = minimal_job()
        d["schema_version"] = version
        d["eval"] = {"path": "e.npz", "sha256": "b" * 64}
        single = job_from_dict(d)
        assert single.eval is not None and single.eval.shard_list() == [ShardSpec("e.npz", "b" * 64)]
        assert single.eval.shard_fields() == ["eval.path"] and loads_job(dumps(single)) == single


@pytest.mark.parametrize("version, ev, message", [
    (2, {"shards": [{"path": "a.npz", "sha256": "b" * 64}]}, r"^eval\.shards: needs schema_version 3 \(this job says 2\)$"),
    (3, {"shards": [{"path": "a.npz", "sha256": "b" * 64}], "path": "e.npz", "sha256": "b" * 64},
     r"^eval\.path: give either eval\.shards or eval\.path and eval\.sha256 \(one shard\), not both$"),
    (3, {"shards": []}, r"^eval\.shards: must list at least one shard"),
    (3, {"shards": [{"path": "a.npz", "sha256": "b" * 64}, {"path": "b.npz", "sha256": "B" * 64}]},
     r"^eval\.shards\[1\]\.sha256: must be 64 lowercase hex digits$"),
    (3, {"shards": [{"path": "a.npz"}]}, r"^eval\.shards\[0\]\.sha256: is required$"),
    (3, {"shards": [{"path": "a.npz", "sha256": "b" * 64, "n": 3}]}, r"^eval\.shards\[0\]\.n: unknown field$"),
    (3, {"shards": {"path": "a.npz"}}, r"^eval\.shards: must be a list$"),
    (3, {"shards": [{"path": "", "sha256": "b" * 64}]}, r"^eval\.shards\[0\]\.path: must be a path$"),
    (3, {}, r"^eval\.path: is required \(or eval\.shards, job schema_version 3\)$"),
    (2, {"path": "e.npz"}, r"^eval\.sha256: is required$"),
    (1, {"path": "e.npz", "sha256": "x"}, r"^eval\.sha256: must be 64 lowercase hex digits$"),
])
def test_bad_eval_sections_name_the_field(version: int, ev: dict, message: str) -> None:
    d = v3_job(**ev)
    d["schema_version"] = version
    with pytest.raises(SchemaError, match=message):
        job_from_dict(d)


# ------------------------------------------------------------------------------------- report v1 and v2
def report_dict(version: int, accuracy: dict) -> dict:
    return {"schema_version": version, "job_id": "j1", "status": "ok", "accuracy": accuracy}


def test_a_version_1_report_still_loads() -> None:
    r = loads_report(json.dumps(report_dict(1, {"split": "eval", "n": 10, "top1": 0.5, "top5": 0.8,
                                                "eval_sha256": "b" * 64})))
    assert r.schema_version == 1 and r.accuracy is not None
    assert (r.accuracy.top1, r.accuracy.top5, r.accuracy.metric, r.accuracy.agreement, r.accuracy.outputs) == \
        (0.5, 0.8, "top1", None, [])


def test_a_version_1_report_without_top1_is_refused() -> None:
    with pytest.raises(SchemaError, match=r"^accuracy\.top1: is required in a version 1 report$"):
        loads_report(json.dumps(report_dict(1, {"split": "eval", "n": 10, "top1": None, "top5": 0.8})))


def test_version_2_accuracy_round_trip_and_checks() -> None:
    from agent.schema import REPORT_SCHEMA_VERSION, AccuracyResult, OutputFidelity
    acc = AccuracyResult(split="eval", n=4, eval_sha256="b" * 64, agreement=0.75, snr_db=31.5, max_abs_err=0.2,
                         outputs=[OutputFidelity(index=0, shape=[10], agreement=0.75, snr_db=31.5, max_abs_err=0.2),
                                  OutputFidelity(index=1, shape=[2, 2], snr_db=40.0, max_abs_err=0.1)],
                         metric="agreement", shards=["b" * 64])
    report = Report(job_id="j1", status="ok", accuracy=acc)
    assert report.schema_version == REPORT_SCHEMA_VERSION == 2
    text = dumps(report)
    assert loads_report(text) == report
    assert json.loads(text)["accuracy"]["top1"] is None
    bad = json.loads(text)
    bad["accuracy"]["metric"] = "accuracy"
    with pytest.raises(SchemaError, match=r"^accuracy\.metric: must be one of top1, agreement, snr_db$"):
        loads_report(json.dumps(bad))
    bad["accuracy"].update(metric="top1", agreement=75.0)
    with pytest.raises(SchemaError, match=r"^accuracy\.agreement: must be a fraction in 0\.\.1$"):
        loads_report(json.dumps(bad))


def test_an_older_reader_refuses_a_version_2_report_by_its_version() -> None:
    """What an edgeprune that knows report version 1 only says about a version 2 report (the same check)."""
    from agent import schema
    d = report_dict(2, {"split": "eval", "n": 1, "top1": None, "metric": "agreement", "agreement": 1.0})
    with pytest.raises(SchemaError, match=r"^schema_version: report version 2 is not supported by this edgeprune "
                                          r"\(knows 1\)$"):
        schema._check_version(d, (1,), "report")
