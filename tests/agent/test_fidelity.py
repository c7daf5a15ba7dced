"""Bring your own model and data: several outputs, any input size, label-free fidelity against the dense model.

A real two-headed torch model (24x24 input, logits (N, 10) and an auxiliary head (N, 5)) is exported to ONNX with
``torch.onnx.export(dynamo=False)``; its references are computed by torch on the host
(``edgeprune.shards.reference_outputs``) and shipped in the shards, which ``edgeprune.shards.write_shards``
writes. The agent runs as ``python -m agent run`` (or ``agent.cli.main``, the same code) and scores on the
device: top-1/top-5 where there are labels, and agreement / SNR / max abs error against the references.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from agent import EvalDataError, accuracy, cli  # noqa: E402
from agent.schema import Report, loads_job, loads_report  # noqa: E402
from edgeprune.shards import reference_outputs, write_shards  # noqa: E402

from .conftest import sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SIZE = 24
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
N = 12


class TwoHead(torch.nn.Module):
    """Conv -> ReLU -> global average pool, then two heads: class logits (10) and an auxiliary head (5)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.cls = torch.nn.Linear(16, 10)
        self.aux = torch.nn.Linear(16, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: Any) -> Any:
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.cls(f), self.aux(f)


def export_onnx(model: Any, path: Path, batch: Optional[int] = None) -> str:
    """The TorchScript-based exporter (``dynamo=False``): a dynamic batch unless ``batch`` is given."""
    dynamic = None if batch is not None else {"input": {0: "N"}, "logits": {0: "N"}, "aux": {0: "N"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(model.eval(), (torch.zeros(batch or 1, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["input"], output_names=["logits", "aux"], dynamic_axes=dynamic,
                          opset_version=17)
    return sha256(path)


def images(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


def host_preprocess(x: np.ndarray) -> np.ndarray:
    """What the job's preprocess does, on the host: scale, mean/std, NCHW."""
    f = (x.astype(np.float32) * np.float32(1 / 255) - np.float32(MEAN)) / np.float32(STD)
    return np.ascontiguousarray(f.transpose(0, 3, 1, 2))


def job(folder: Path, model_sha: str, shards: List[Any], version: int = 3, batch: int = 4) -> Path:
    ev: Dict[str, Any] = {"split": "byo", "batch_size": batch}
    if version >= 3:
        ev["shards"] = [{"path": p.name, "sha256": s} for p, s in shards]
    else:
        ev.update(path=shards[0][0].name, sha256=shards[0][1])
    d = {"schema_version": version, "job_id": "fidelity", "device_id": "local",
         "artifact": {"path": "model.onnx", "sha256": model_sha, "input_shape": [1, 3, SIZE, SIZE]},
         "preprocess": {"scale": 1 / 255, "mean": MEAN, "std": STD},
         "runtime": {"name": "onnxruntime", "threads": 1, "options": {}},
         "timing": {"warmup_iters": 1, "warmup_s": 0.0, "min_iters": 5, "min_duration_s": 0.01, "max_iters": 1000,
                    "max_duration_s": 2.0, "batch_size": 1, "seed": 0, "cv_warn": 100.0, "keep_samples": 100},
         "power": None, "thermal": None, "eval": ev, "timeout_s": 120.0}
    path = folder / "job.json"
    path.write_text(json.dumps(d))
    return path


def agent_run(job_path: Path) -> Report:
    """``python -m agent run JOB --out REPORT`` in a fresh interpreter, as a device runs it."""
    out = job_path.parent / "report.json"
    r = subprocess.run([sys.executable, "-m", "agent", "run", str(job_path), "--out", str(out)], capture_output=True,
                       text=True, timeout=300, cwd=str(job_path.parent), env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode in (0, 1), r.stderr
    return loads_report(out.read_text())


def main_run(job_path: Path) -> Report:
    out = job_path.parent / "report.json"
    cli.main(["run", str(job_path), "--out", str(out)])
    return loads_report(out.read_text())


@pytest.fixture(scope="module")
def dense() -> Any:
    return TwoHead(seed=0).eval()


def shard_batches(model: Any, x: np.ndarray, labels: Optional[np.ndarray], refs: bool = True,
                  step: int = 5) -> List[Any]:
    out = []
    for i in range(0, len(x), step):
        r = reference_outputs(model, host_preprocess(x[i:i + step])) if refs else None
        out.append((x[i:i + step], None if labels is None else labels[i:i + step], r))
    return out


def top5_of(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    logits = reference_outputs(model, host_preprocess(x))[0]
    return float(np.mean([y[i] in np.argsort(-logits[i])[:5] for i in range(len(y))]))


def labels_from(model: Any, x: np.ndarray, flip: int = 0) -> np.ndarray:
    """Labels = the dense model's own argmax, the first ``flip`` of them changed: top-1 is (N - flip) / N."""
    y = reference_outputs(model, host_preprocess(x))[0].argmax(axis=1)
    y[:flip] = (y[:flip] + 1) % 10
    return y.astype(np.int64)


def write(folder: Path, batches: List[Any], max_bytes: int = 256 << 20, prefix: str = "eval") -> List[Any]:
    return [(s.path, s.sha256) for s in write_shards(batches, folder, max_bytes=max_bytes, prefix=prefix)]


# ----------------------------------------------------------------------------------------------- end to end
def test_two_headed_model_is_faithful_on_every_output(tmp_path: Path, dense: Any) -> None:
    x = images()
    y = labels_from(dense, x, flip=3)
    shards = write(tmp_path, shard_batches(dense, x, y))
    report = agent_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards))
    assert report.status == "ok", report.error
    acc = report.accuracy
    assert acc is not None and acc.n == N and acc.metric == "top1" and acc.split == "byo"
    assert acc.top1 == pytest.approx(9 / 12) and acc.top5 == pytest.approx(top5_of(dense, x, y))
    assert [(o.index, o.shape) for o in acc.outputs] == [(0, [10]), (1, [5])]
    for o in acc.outputs:
        assert o.agreement == 1.0 and o.snr_db is not None and o.snr_db >= 60.0, o
        assert o.max_abs_err is not None and o.max_abs_err < 1e-3
    assert acc.agreement == 1.0 and acc.snr_db == min(o.snr_db for o in acc.outputs)
    assert acc.max_abs_err == max(o.max_abs_err for o in acc.outputs)
    assert acc.shards == [s for _, s in shards] and acc.eval_sha256 == shards[0][1]
    raw = json.loads((tmp_path / "report.json").read_text())
    assert raw["schema_version"] == 2
    assert {"top1", "top5", "agreement", "snr_db", "max_abs_err", "outputs", "metric", "n"} <= set(raw["accuracy"])


def test_a_perturbed_artifact_scores_lower(tmp_path: Path, dense: Any) -> None:
    x = images()
    shards = write(tmp_path, shard_batches(dense, x, None))
    pruned = TwoHead(seed=0).eval()
    with torch.no_grad():   # what a careless prune does: perturb the features and the heads
        g = torch.Generator().manual_seed(7)
        for p in pruned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.4)
    report = agent_run(job(tmp_path, export_onnx(pruned, tmp_path / "model.onnx"), shards))
    assert report.status == "ok", report.error
    acc = report.accuracy
    assert acc is not None and acc.top1 is None and acc.metric == "agreement"
    assert acc.snr_db is not None and acc.snr_db < 30.0
    assert acc.agreement is not None and acc.agreement < 1.0
    assert all(o.snr_db is not None and o.snr_db < 30.0 for o in acc.outputs)


def test_label_free_shard_scores_agreement(tmp_path: Path, dense: Any) -> None:
    shards = write(tmp_path, shard_batches(dense, images(), None))
    report = main_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards))
    acc = report.accuracy
    assert report.status == "ok" and acc is not None
    assert (acc.top1, acc.top5, acc.metric, acc.agreement) == (None, None, "agreement", 1.0)


def test_labels_without_references_score_top1_only(tmp_path: Path, dense: Any) -> None:
    x = images()
    shards = write(tmp_path, shard_batches(dense, x, labels_from(dense, x, flip=6), refs=False))
    report = main_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards))
    acc = report.accuracy
    assert report.status == "ok" and acc is not None
    assert acc.top1 == 0.5 and acc.metric == "top1" and (acc.agreement, acc.snr_db, acc.max_abs_err) == (None,) * 3
    assert [(o.shape, o.agreement, o.snr_db) for o in acc.outputs] == [([10], None, None), ([5], None, None)]


def test_a_shard_with_neither_labels_nor_references_is_one_clear_error(tmp_path: Path, dense: Any) -> None:
    np.savez(str(tmp_path / "bare.npz"), images=images(3))
    report = main_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"),
                          [(tmp_path / "bare.npz", sha256(tmp_path / "bare.npz"))]))
    assert report.status == "error" and report.error is not None and report.error.type == "EvalDataError"
    assert report.error.message == ("eval shard bare.npz has no array 'labels' and no 'reference_0': a shard needs "
                                    "labels, the dense model's outputs (reference_0, reference_1, ...) or both "
                                    "(has: images)")
    assert report.timing is not None   # measured before the eval phase, kept


def test_two_shards_score_as_one(tmp_path: Path, dense: Any) -> None:
    x = images()
    y = labels_from(dense, x, flip=2)
    batches = shard_batches(dense, x, y, step=3)
    one = write(tmp_path / "one", batches)
    per_batch = sum(b[0].nbytes + b[1].nbytes + sum(r.nbytes for r in b[2]) for b in batches[:1])
    two = write(tmp_path / "two", batches, max_bytes=2 * per_batch)   # 2 batches of 3 per shard: 2 shards
    assert len(one) == 1 and len(two) == 2
    model_sha = export_onnx(dense, tmp_path / "model.onnx")
    reports = []
    for folder, shards in ((tmp_path / "one", one), (tmp_path / "two", two)):
        (folder / "model.onnx").write_bytes((tmp_path / "model.onnx").read_bytes())
        reports.append(agent_run(job(folder, model_sha, shards)).accuracy)
    a, b = reports
    assert a is not None and b is not None
    assert (a.n, a.top1, a.top5, a.agreement, a.metric) == (b.n, b.top1, b.top5, b.agreement, b.metric) == \
        (N, 10 / 12, top5_of(dense, x, y), 1.0, "top1")
    assert b.snr_db == pytest.approx(a.snr_db, abs=0.5) and b.max_abs_err == pytest.approx(a.max_abs_err, abs=1e-5)
    assert len(b.shards) == 2 and b.eval_sha256 == accuracy.eval_digest(b.shards) != b.shards[0]


def test_v2_job_with_eval_path_still_runs(tmp_path: Path, dense: Any) -> None:
    x = images()
    shards = write(tmp_path, shard_batches(dense, x, labels_from(dense, x)))
    path = job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards, version=2)
    assert loads_job(path.read_text()).eval.shards is None   # type: ignore[union-attr]
    report = main_run(path)
    assert report.status == "ok" and report.accuracy is not None
    assert (report.accuracy.top1, report.accuracy.agreement, report.accuracy.shards) == (1.0, 1.0, [shards[0][1]])


def test_fixed_batch_pads_and_drops_the_padding_on_every_output(tmp_path: Path, dense: Any) -> None:
    """A model exported with a fixed batch of 5 scores 12 samples as 5 + 5 + 2 (padded): nothing of the padding
    reaches the sums, so the fidelity stays exact."""
    x = images()
    shards = write(tmp_path, shard_batches(dense, x, None))
    path = job(tmp_path, export_onnx(dense, tmp_path / "model.onnx", batch=5), shards)
    d = json.loads(path.read_text())
    d["artifact"]["input_shape"] = [5, 3, SIZE, SIZE]
    d["timing"]["batch_size"] = 5
    path.write_text(json.dumps(d))
    acc = main_run(path).accuracy
    assert acc is not None and acc.n == N and acc.agreement == 1.0 and acc.snr_db is not None and acc.snr_db >= 60


# ----------------------------------------------------------------------------------------- shard problems
def test_references_that_do_not_match_the_outputs_are_refused(tmp_path: Path, dense: Any) -> None:
    x = images(4)
    ref = reference_outputs(dense, host_preprocess(x))
    model_sha = export_onnx(dense, tmp_path / "model.onnx")
    cases = [
        ({"reference_0": ref[0]}, "has 1 references (reference_0..reference_0) but the model has 2 outputs"),
        ({"reference_0": ref[0], "reference_1": ref[1][:, :4]},
         "reference_1 has shape (N, 4) but the model's output 1 is (N, 5)"),
        ({"reference_0": ref[0], "reference_2": ref[1]}, "has reference_0, reference_2 but no 'reference_1'"),
        ({"reference_0": ref[0].astype(np.float64), "reference_1": ref[1]}, "reference_0 must be float32"),
        ({"reference_0": ref[0][:3], "reference_1": ref[1]}, "has 4 images and 3 rows in reference_0"),
    ]
    for arrays, message in cases:
        np.savez(str(tmp_path / "s.npz"), images=x, **arrays)
        report = main_run(job(tmp_path, model_sha, [(tmp_path / "s.npz", sha256(tmp_path / "s.npz"))]))
        assert report.status == "error" and report.error is not None, arrays.keys()
        assert report.error.type == "EvalDataError" and message in report.error.message, report.error.message


def test_shards_must_hold_the_same_arrays(tmp_path: Path, dense: Any) -> None:
    x = images(6)
    refs = reference_outputs(dense, host_preprocess(x))
    np.savez(str(tmp_path / "a.npz"), images=x[:3], labels=np.zeros(3, np.int64), reference_0=refs[0][:3],
             reference_1=refs[1][:3])
    np.savez(str(tmp_path / "b.npz"), images=x[3:], reference_0=refs[0][3:], reference_1=refs[1][3:])
    shards = [(tmp_path / n, sha256(tmp_path / n)) for n in ("a.npz", "b.npz")]
    report = main_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards))
    assert report.status == "error" and report.error is not None
    assert report.error.message == ("eval shard b.npz has no labels but the first shard a.npz has: every shard "
                                    "must hold the same arrays")


def test_every_shard_is_verified_before_the_model_runs(tmp_path: Path, dense: Any) -> None:
    shards = write(tmp_path, shard_batches(dense, images(), None), max_bytes=1)   # one shard per batch
    assert len(shards) == 3
    shards[2] = (shards[2][0], "0" * 64)
    report = main_run(job(tmp_path, export_onnx(dense, tmp_path / "model.onnx"), shards))
    assert report.status == "error" and report.error is not None and report.timing is None
    assert report.error.message.startswith("eval.shards[2] eval-00002.npz sha256 mismatch: expected " + "0" * 64)


def test_a_shard_path_out_of_the_job_folder_is_refused(tmp_path: Path, dense: Any,
                                                      capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    shards = write(folder, shard_batches(dense, images(), None))
    path = job(folder, export_onnx(dense, folder / "model.onnx"), shards)
    d = json.loads(path.read_text())
    d["eval"]["shards"].append({"path": "../x.npz", "sha256": "a" * 64})
    path.write_text(json.dumps(d))
    assert cli.main(["run", str(path)]) == 2
    assert "eval.shards[1].path: '../x.npz' escapes the job folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the scorer
def test_scorer_sums_energies_not_per_batch_snrs() -> None:
    """Two batches: one exact, one with an error. The SNR is that of the summed energies."""
    ref = np.array([[3.0, 4.0], [0.0, 1.0]], np.float32)
    out = ref.copy()
    out[1, 1] = 0.0   # error energy 1 in the second sample, whose argmax changes
    s = accuracy.Scorer()
    s.start_shard(accuracy.Shard("a", np.zeros((2, 1), np.float32), None, [ref]))
    s.add([out[:1]], None, [ref[:1]])
    s.add([out[1:]], None, [ref[1:]])
    r = s.result("x", "e", ["e"])
    assert r.snr_db == pytest.approx(10 * np.log10(26.0 / 1.0))   # not the mean of 300 and 0 dB
    assert (r.max_abs_err, r.agreement, r.n) == (1.0, 0.5, 2)


def test_exact_outputs_cap_at_300_db_and_non_logit_outputs_have_no_agreement() -> None:
    ref = [np.ones((3, 1), np.float32), np.ones((3, 2, 2), np.float32), np.zeros((3, 4), np.float32)]
    s = accuracy.Scorer()
    s.start_shard(accuracy.Shard("a", np.zeros((3, 1), np.float32), None, ref))
    s.add([r.copy() for r in ref], None, ref)
    r = s.result("x", "e", ["e"])
    assert [(o.shape, o.agreement, o.snr_db) for o in r.outputs] == [
        ([1], None, accuracy.SNR_CAP_DB), ([2, 2], None, accuracy.SNR_CAP_DB), ([4], 1.0, accuracy.SNR_CAP_DB)]
    assert (r.metric, r.agreement, r.snr_db, r.max_abs_err) == ("agreement", 1.0, 300.0, 0.0)
    assert accuracy.snr_db(0.0, 1.0) == -300.0


def test_no_logit_like_output_makes_snr_the_metric() -> None:
    ref = [np.ones((2, 3, 4), np.float32)]
    s = accuracy.Scorer()
    s.start_shard(accuracy.Shard("a", np.zeros((2, 1), np.float32), None, ref))
    s.add([ref[0] * 1.1], None, ref)
    r = s.result("x", "e", ["e"])
    assert (r.metric, r.agreement, r.top1) == ("snr_db", None, None) and r.snr_db == pytest.approx(20.0)


def test_non_finite_outputs_are_an_error_not_a_broken_report() -> None:
    ref = [np.ones((2, 3), np.float32)]
    s = accuracy.Scorer()
    s.start_shard(accuracy.Shard("a", np.zeros((2, 1), np.float32), None, ref))
    with pytest.raises(EvalDataError, match="model output 0 has non-finite values"):
        s.add([np.full((2, 3), np.nan, np.float32)], None, ref, " a")
