"""Eval shards holding preprocessed ``inputs`` (float32, in the artifact's layout) instead of uint8 ``images``.

(The ``images`` path, batching and top-k are tested in test_runner.py.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from agent import EvalDataError, accuracy
from agent.schema import PreprocessSpec


def save(path: Path, **arrays: Any) -> Path:
    np.savez(str(path), **arrays)
    return path


def test_inputs_are_loaded_checked_and_fed_as_they_are(tmp_path: Path) -> None:
    inputs = np.random.default_rng(0).standard_normal((5, 32, 32, 3)).astype(np.float32)
    shard = accuracy.load_shard(save(tmp_path / "s.npz", inputs=inputs, labels=np.arange(5, dtype=np.int32)))
    data, labels = shard.data, shard.labels
    assert labels is not None and shard.references == []
    assert accuracy.is_inputs(data) and data.dtype == np.float32 and labels.dtype == np.int64
    accuracy.check_image_size(data, [1, 32, 32, 3], "NHWC")
    prepped = accuracy.preprocess(data[:2], PreprocessSpec(scale=1 / 255, mean=[0.5] * 3, std=[0.25] * 3), "NCHW")
    assert np.array_equal(prepped, inputs[:2])  # no scaling, no transpose: already in the artifact's layout


def test_inputs_through_evaluate_with_a_fixed_batch(tmp_path: Path) -> None:
    inputs = np.zeros((5, 3, 2, 2), np.float32)
    inputs[np.arange(5), np.arange(5) % 3] = 1.0  # channel c lit -> class c
    seen: List[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x.mean(axis=(2, 3))

    def prep(x: np.ndarray) -> np.ndarray:
        return accuracy.preprocess(x, PreprocessSpec(), "NCHW")

    labels = np.array([0, 1, 2, 0, 2])
    assert accuracy.evaluate(model, inputs, labels, prep, 4, 2) == (5, 0.8, 1.0)
    assert seen == [2, 2, 2]  # last batch padded


@pytest.mark.parametrize("arrays, message", [
    ({"inputs": np.zeros((2, 4, 4, 3), np.float64), "labels": np.zeros(2, np.int64)},
     "eval shard inputs must be float32, preprocessed, with shape (N, ...) in the artifact's layout; got float64"),
    ({"inputs": np.zeros(2, np.float32), "labels": np.zeros(2, np.int64)}, "inputs must be float32"),
    ({"inputs": np.zeros((2, 3), np.float32), "labels": np.zeros(3, np.int64)}, "has 2 inputs and 3 labels"),
    ({"inputs": np.zeros((2, 3), np.float32), "images": np.zeros((2, 4, 4, 3), np.uint8),
      "labels": np.zeros(2, np.int64)}, "has both 'images' and 'inputs'; keep one"),
    ({"pixels": np.zeros((2, 4, 4, 3), np.uint8), "labels": np.zeros(2, np.int64)},
     "has no array 'images' (or 'inputs') (has: pixels, labels)"),
])
def test_bad_inputs_shards_are_refused_clearly(tmp_path: Path, arrays: Dict[str, Any], message: str) -> None:
    with pytest.raises(EvalDataError) as e:
        accuracy.load_shard(save(tmp_path / "bad.npz", **arrays))
    assert message in str(e.value)


@pytest.mark.parametrize("shape, input_shape, message", [
    ((3, 3, 32, 32), [1, 32, 32, 3], "eval shard inputs have shape (3, 3, 32, 32) but the model input "
                                     "[1, 32, 32, 3] wants (N, 32, 32, 3)"),
    ((3, 32, 32, 3), [1, 3, 32, 32], "eval shard inputs have shape (3, 32, 32, 3) but the model input "
                                     "[1, 3, 32, 32] wants (N, 3, 32, 32)"),
    ((3, 3, 28, 28), [1, 3, 32, 32], "wants (N, 3, 32, 32)"),
])
def test_inputs_that_do_not_fit_the_artifact_name_the_expected_shape(shape: Any, input_shape: List[int],
                                                                    message: str) -> None:
    with pytest.raises(EvalDataError) as e:
        accuracy.check_image_size(np.zeros(shape, np.float32), input_shape, "NCHW")
    assert message in str(e.value)
