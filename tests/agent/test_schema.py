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


@pytest.mark.parametrize("version", [0, 3, "1", None])
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
    assert JobSpec(job_id="j", artifact=old.artifact).schema_version == 2   # what the host writes now


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
