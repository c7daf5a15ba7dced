"""edgeprune.shards (eval shards written on the host) and what carries them: host.fleet.jobs.build_job's job v3 with
``eval.shards`` and LocalTransport running it."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch

from agent import schema
from edgeprune.errors import UsageError
from edgeprune.shards import ShardInfo, reference_outputs, write_shards


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batches(n_batches: int, per: int = 4, refs: bool = True, labels: bool = True):
    rng = np.random.default_rng(0)
    for i in range(n_batches):
        x = rng.integers(0, 256, (per, 8, 8, 3), dtype=np.uint8)
        y = np.arange(i * per, (i + 1) * per) % 10 if labels else None
        r = [rng.standard_normal((per, 10)).astype(np.float32), rng.standard_normal((per, 2, 3)).astype(np.float32)]
        yield x, y, (r if refs else None)


# ------------------------------------------------------------------------------------------- write_shards
def test_write_shards_splits_at_max_bytes_and_hashes_what_is_on_disk(tmp_path) -> None:
    batches = list(_batches(5))
    per_batch = sum(a.nbytes for a in (batches[0][0], batches[0][1].astype(np.int64), *batches[0][2]))
    shards = write_shards(iter(batches), tmp_path / "out", max_bytes=2 * per_batch)
    assert [s.n for s in shards] == [8, 8, 4]                       # 2 + 2 + 1 batches
    assert [s.path.name for s in shards] == ["eval-00000.npz", "eval-00001.npz", "eval-00002.npz"]
    assert all(isinstance(s, ShardInfo) and s.sha256 == _sha(s.path) for s in shards)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [s.path.name for s in shards]   # no temp files
    with np.load(shards[1].path, allow_pickle=False) as z:
        assert sorted(z.files) == ["images", "labels", "reference_0", "reference_1"]
        assert np.array_equal(z["images"], np.concatenate([batches[2][0], batches[3][0]]))
        assert np.array_equal(z["reference_1"], np.concatenate([batches[2][2][1], batches[3][2][1]]))
        assert z["labels"].dtype == np.int64 and z["reference_0"].dtype == np.float32


def test_one_shard_when_everything_fits_and_a_big_batch_is_a_shard_of_its_own(tmp_path) -> None:
    assert [s.n for s in write_shards(_batches(3), tmp_path / "a")] == [12]
    assert [s.n for s in write_shards(_batches(3), tmp_path / "b", max_bytes=1, prefix="val")] == [4, 4, 4]
    assert (tmp_path / "b" / "val-00002.npz").is_file()
    assert write_shards([], tmp_path / "c") == []


def test_label_free_and_reference_free_shards(tmp_path) -> None:
    s = write_shards(_batches(2, labels=False), tmp_path / "a")[0]
    with np.load(s.path) as z:
        assert sorted(z.files) == ["images", "reference_0", "reference_1"]
    s = write_shards(_batches(2, refs=False), tmp_path / "b")[0]
    with np.load(s.path) as z:
        assert sorted(z.files) == ["images", "labels"]
    inputs = [(np.zeros((2, 3, 4, 4), np.float32), None, [np.zeros((2, 5), np.float64)])]
    s = write_shards(inputs, tmp_path / "c")[0]
    with np.load(s.path) as z:
        assert sorted(z.files) == ["inputs", "reference_0"] and z["reference_0"].dtype == np.float32


@pytest.mark.parametrize("batches, message", [
    ([(np.zeros((2, 4, 4, 3), np.uint8), None, None)], "batch 0: has neither labels nor references"),
    ([(np.zeros((2, 4, 4, 3), np.float64), np.zeros(2, int), None)], "uint8 images or float32 preprocessed inputs"),
    ([(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, int), None)], "labels must be integers of shape (2,)"),
    ([(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, int), None),
      (np.zeros((2, 4, 4, 3), np.uint8), None, [np.zeros((2, 3), np.float32)])], "every batch must hold the same"),
    ([(np.zeros((2, 4, 4, 3), np.uint8), None, [np.zeros((3, 3), np.float32)])], "reference 0 must be float with 2"),
])
def test_bad_batches_are_refused(tmp_path, batches, message) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_shards(batches, tmp_path)


# -------------------------------------------------------------------------------------- reference_outputs
class _Net(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.fc = torch.nn.Linear(3, 4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        f = self.drop(self.fc(x.mean(dim=(2, 3))))
        if self.kind == "tensor":
            return f
        if self.kind == "tuple":
            return f * 3, (f[:, :2], [f + 1])
        return OrderedDict([("zeta", f * 2), ("alpha", f[:, :1])])


@pytest.mark.parametrize("kind, shapes, scale", [
    ("tensor", [(2, 4)], [1]), ("tuple", [(2, 4), (2, 2), (2, 4)], [3, None, None]), ("dict", [(2, 4), (2, 1)], [2, None]),
])
def test_reference_outputs_flatten_in_the_export_order(kind, shapes, scale) -> None:
    net = _Net(kind).train()
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 5)).astype(np.float32)
    outs = reference_outputs(net, x)
    assert [o.shape for o in outs] == shapes and all(o.dtype == np.float32 for o in outs)
    with torch.no_grad():
        base = net.eval().fc(torch.from_numpy(x).mean(dim=(2, 3))).numpy()
    if scale[0] is not None:
        assert np.allclose(outs[0], base * scale[0], atol=1e-6)   # eval mode: no dropout
    if kind == "tuple":
        assert np.allclose(outs[1], base[:, :2], atol=1e-6) and np.allclose(outs[2], base + 1, atol=1e-6)
    if kind == "dict":
        assert np.allclose(outs[1], base[:, :1], atol=1e-6)    # insertion order: zeta, then alpha


def test_reference_outputs_restore_training_and_take_tensors() -> None:
    net = _Net("tensor").train()
    reference_outputs(net, torch.zeros(1, 3, 2, 2))
    assert net.training
    net.eval()
    reference_outputs(net, torch.zeros(1, 3, 2, 2))
    assert not net.training


def test_reference_outputs_match_the_onnx_export_order(tmp_path) -> None:
    """The ONNX exporter (dynamo=False) keeps a dict's insertion order and a nested tuple's flattening order."""
    import warnings

    ort = pytest.importorskip("onnxruntime")
    for kind in ("tuple", "dict"):
        net = _Net(kind).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (torch.zeros(2, 3, 5, 5),), str(tmp_path / f"{kind}.onnx"), dynamo=False,
                              input_names=["input"], opset_version=17)
        x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
        got = ort.InferenceSession(str(tmp_path / f"{kind}.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"input": x})
        want = reference_outputs(net, x)
        assert [g.shape for g in got] == [w.shape for w in want]
        assert all(np.allclose(g, w, atol=1e-5) for g, w in zip(got, want)), kind


# ---------------------------------------------------------------------------------------- job v3 on the host
def test_build_job_lists_every_shard_and_keeps_the_single_shard_call(tmp_path, job_inputs) -> None:
    from host.fleet.devices import local_device
    from host.fleet.jobs import build_job

    onnx_path, man, shard = job_inputs
    dev = local_device()
    one = build_job(dev, "j1", onnx_path, man, shard, _sha(shard), "eval")
    assert one.schema_version == 3 and one.eval is not None and one.eval.path is None
    assert [(s.path, s.sha256) for s in one.eval.shards] == [(str(shard.resolve()), _sha(shard))]
    with np.load(shard) as z:
        images, labels = z["images"], z["labels"]
    infos = write_shards([(images[:30], labels[:30], None), (images[30:], labels[30:], None)], tmp_path / "s",
                         max_bytes=images[:30].nbytes + labels[:30].nbytes * 2)
    assert len(infos) == 2
    many = build_job(dev, "j2", onnx_path, man, infos, eval_split="eval")
    assert [(s.path, s.sha256) for s in many.eval.shards] == [(str(i.path), i.sha256) for i in infos]
    assert schema.loads_job(schema.dumps(many)) == many
    pairs = build_job(dev, "j3", onnx_path, man, [(i.path, i.sha256) for i in infos])
    assert pairs.eval.shards == many.eval.shards
    assert build_job(dev, "j4", onnx_path, man, None).eval is None


def test_local_transport_runs_a_job_of_several_shards(tmp_path, job_inputs) -> None:
    """Two shards (one by a path relative to the workdir) score exactly what the one shard they were cut from
    scores."""
    from host.fleet.devices import local_device
    from host.fleet.jobs import build_job
    from host.fleet.transport import LocalTransport

    onnx_path, man, shard = job_inputs
    with np.load(shard) as z:
        images, labels = z["images"], z["labels"]
    work = tmp_path / "w"
    infos = write_shards([(images[:20], labels[:20], None), (images[20:], labels[20:], None)], work,
                         max_bytes=images[:20].nbytes)
    assert len(infos) == 2
    dev = local_device()
    job = build_job(dev, "many", onnx_path, man, infos, quick=True)
    job.eval.shards[1].path = infos[1].path.name          # relative to the workdir
    job.timing.cpu_affinity = None
    report = LocalTransport().run_job(job, work)
    assert report.status == "ok", report.error
    single = build_job(dev, "one", onnx_path, man, shard, _sha(shard), quick=True)
    single.timing.cpu_affinity = None
    ref = LocalTransport().run_job(single, tmp_path / "w1")
    assert ref.status == "ok", ref.error
    assert (report.accuracy.n, report.accuracy.top1, report.accuracy.top5) == \
        (ref.accuracy.n, ref.accuracy.top1, ref.accuracy.top5) == (50, ref.accuracy.top1, ref.accuracy.top5)
    assert report.accuracy.shards == [i.sha256 for i in infos] and report.accuracy.metric == "top1"
