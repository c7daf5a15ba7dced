from __future__ import annotations

import numpy as np
import pytest

from edgeprune import data
from edgeprune.errors import DataError

from .conftest import needs_full_data


def test_stratified_indices_balanced_deterministic_and_sorted():
    labels = np.repeat(np.arange(10), 50)
    a = data.stratified_indices(labels, 7, seed=3)
    b = data.stratified_indices(labels, 7, seed=3)
    assert np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert np.bincount(labels[a], minlength=10).tolist() == [7] * 10
    assert not np.array_equal(a, data.stratified_indices(labels, 7, seed=4))


def test_stratified_offset_gives_disjoint_splits():
    labels = np.repeat(np.arange(10), 50)
    first = data.stratified_indices(labels, 10, seed=1)
    rest = data.stratified_indices(labels, None, seed=1, offset=10)
    assert len(np.intersect1d(first, rest)) == 0
    assert len(first) + len(rest) == len(labels)


def test_stratified_too_many_per_class():
    with pytest.raises(DataError, match="class 0 has 5 images"):
        data.stratified_indices(np.repeat(np.arange(10), 5), 6, seed=0)


def test_bundled_splits_without_data_dir(no_full_data):
    ev, cal, ft = data.eval_split(), data.calib_split(), data.finetune_split()
    assert len(ev) == 1000 and np.bincount(ev.labels).tolist() == [100] * 10
    assert len(cal) == 1000 and ft.name == "finetune-bundled"
    assert "_assets" in ev.source
    sub = data.eval_split(10)
    assert len(sub) == 100 and set(map(bytes, sub.images.reshape(100, -1))) <= set(map(bytes, ev.images.reshape(1000, -1)))
    with pytest.raises(DataError, match="full CIFAR-10 test set.*EDGEPRUNE_DATA"):
        data.eval_split(None)


def test_bad_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="EDGEPRUNE_DATA=.*nope: not a directory"):
        data.data_dir()


@needs_full_data
def test_bundled_subsets_are_exactly_the_splits_of_the_full_files(monkeypatch):
    full_eval, full_cal = data.eval_split(), data.calib_split()
    bundled_images, bundled_labels = data.load_npz(data.ASSETS / data.BUNDLED_EVAL)
    assert np.array_equal(full_eval.images, bundled_images) and np.array_equal(full_eval.labels, bundled_labels)
    cal_images, _ = data.load_npz(data.ASSETS / data.BUNDLED_CALIB)
    assert np.array_equal(full_cal.images, cal_images)


@needs_full_data
def test_calib_and_finetune_disjoint():
    cal = data.calib_split()
    ft = data.finetune_split(per_class=200)
    assert ft.name == "finetune" and len(ft) == 2000
    cal_rows = set(map(bytes, cal.images.reshape(len(cal), -1)))
    assert not cal_rows & set(map(bytes, ft.images.reshape(len(ft), -1)))


@pytest.mark.parametrize("arrays,match", [
    ({"images": np.zeros((2, 32, 32, 3), np.uint8)}, "needs arrays 'images' and 'labels'"),
    ({"images": np.zeros((2, 32, 32, 3), np.float32), "labels": np.zeros(2, np.int64)}, "images must be uint8"),
    ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.zeros(3, np.int64)}, "labels must be an integer vector of length 2"),
    ({"images": np.zeros((2, 32, 32, 3), np.uint8), "labels": np.array([0, 10])}, "labels must lie in 0..9"),
])
def test_load_npz_rejects_malformed(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match="bad.npz: " + match):
        data.load_npz(path)


def test_load_npz_not_npz(tmp_path):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    with pytest.raises(DataError, match="x.npz: not a readable npz"):
        data.load_npz(path)


def test_split_save_roundtrip(tmp_path, eval_split):
    path = eval_split.save(tmp_path / "shard.npz")
    images, labels = data.load_npz(path)
    assert np.array_equal(images, eval_split.images) and np.array_equal(labels, eval_split.labels)


def test_to_tensor_batch_matches_reference_recipe(eval_split):
    x = data.to_tensor_batch(eval_split.images[:4])
    ref = (eval_split.images[:4].transpose(0, 3, 1, 2) / 255.0 - np.array(data.MEAN).reshape(1, 3, 1, 1)) \
        / np.array(data.STD).reshape(1, 3, 1, 1)
    assert x.shape == (4, 3, 32, 32)
    assert np.allclose(x.numpy(), ref, atol=1e-6)
