"""Fixtures for the agent tests: a tiny ONNX classifier with known weights and an eval shard crafted for it.

Model: input (N,3,32,32) -> Conv 1x1 (identity) -> GlobalAveragePool -> Flatten -> Gemm (10x3) -> logits (N,10).
With a uniform image whose only non-zero channel is ``c`` (value 1.0 after preprocessing), the logits are
column ``c`` of W, where ``W[k, c] = 10 - ((k - c) % 10)``: class c ranks first, then c+1, c+2, ...
So an image of channel c labelled c is top-1 correct, labelled c+2 is top-5 but not top-1, labelled c+7 is neither.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

W = np.array([[10 - ((k - c) % 10) for c in range(3)] for k in range(10)], dtype=np.float32)

# (channel, label) per image: 5 top-1 hits, 3 top-5-only hits, 2 misses -> top1 0.5, top5 0.8
SHARD = [(0, 0), (1, 1), (2, 2), (0, 0), (1, 1), (2, 4), (0, 2), (1, 3), (2, 9), (0, 7)]
SHARD_TOP1, SHARD_TOP5 = 0.5, 0.8


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_model(path: Path, batch: Optional[int] = None, size: int = 32, input_name: str = "input") -> str:
    n = batch if batch is not None else "N"
    conv_w = np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", [input_name, "conv_w"], ["c"]),
         helper.make_node("GlobalAveragePool", ["c"], ["g"]),
         helper.make_node("Flatten", ["g"], ["f"]),
         helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1)],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [n, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, 10])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(W, "W"),
         numpy_helper.from_array(np.zeros(10, dtype=np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return sha256(path)


def build_shard(path: Path) -> str:
    images = np.zeros((len(SHARD), 32, 32, 3), dtype=np.uint8)
    for i, (c, _) in enumerate(SHARD):
        images[i, :, :, c] = 255
    labels = np.array([label for _, label in SHARD], dtype=np.int64)
    np.savez(str(path), images=images, labels=labels)
    return sha256(path)


def job_dict(model_sha: str, shard_sha: Optional[str] = None) -> Dict[str, Any]:
    return {
        "schema_version": 1, "job_id": "test-job", "device_id": "local",
        "artifact": {"path": "model.onnx", "sha256": model_sha, "input_shape": [1, 3, 32, 32]},
        "preprocess": {"scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "runtime": {"name": "onnxruntime", "threads": 1, "options": {}},
        "timing": {"warmup_iters": 3, "warmup_s": 0.0, "min_iters": 20, "min_duration_s": 0.05,
                   "max_iters": 100000, "max_duration_s": 5.0, "batch_size": 1, "seed": 0, "cv_warn": 100.0,
                   "keep_samples": 1000},
        "power": {"sensor": "model", "sample_hz": 50.0, "idle_w": 2.0, "max_w": 10.0},
        "eval": ({"path": "eval.npz", "sha256": shard_sha, "split": "crafted", "batch_size": 4}
                 if shard_sha is not None else None),
        "timeout_s": 60.0,
    }


@pytest.fixture
def job_dir(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write model.onnx, eval.npz and job.json into tmp_path; ``edit(d)`` may change the job dict."""

    def make(edit: Optional[Callable[[Dict[str, Any]], None]] = None, batch: Optional[int] = None) -> Path:
        d = job_dict(build_model(tmp_path / "model.onnx", batch=batch), build_shard(tmp_path / "eval.npz"))
        if edit is not None:
            edit(d)
        (tmp_path / "job.json").write_text(json.dumps(d))
        return tmp_path / "job.json"

    return make


def random_model(path: Path, seed: int = 0) -> Path:
    """The conftest model with random conv and Gemm weights, so outputs are not small integers."""
    build_model(path)
    model = onnx.load(str(path))
    rng = np.random.default_rng(seed)
    for i, init in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(init)
        model.graph.initializer[i].CopyFrom(
            numpy_helper.from_array(rng.standard_normal(arr.shape).astype(np.float32), init.name))
    onnx.save(model, str(path))
    return path


# Packages a job must not pull into the agent process (the host side, and every runtime the job does not use).
HEAVY = ("torch", "pandas", "pydantic", "scipy", "host", "edgeprune", "onnx", "onnxruntime", "openvino", "litert_torch",
         "ai_edge_litert")


def imports_of_job(job: Path, runtime_module: str) -> Dict[str, Any]:
    """Run ``agent.cli.main(['run', job])`` in a fresh interpreter (the test process has torch loaded) and say what
    it imported: ``{"rc", "bad": heavy packages other than the job's runtime, "runtime_loaded"}``."""
    heavy = tuple(m for m in HEAVY if m != runtime_module)
    code = ("import json, sys; from agent import cli; "
            "rc = cli.main(['run', %r, '--out', %r]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in %r); "
            "sys.stderr.write(json.dumps({'rc': rc, 'bad': bad, 'runtime_loaded': %r in sys.modules}))"
            ) % (str(job), str(job.parent / "r.json"), heavy, runtime_module)
    repo = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(job.parent),
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stderr.strip().splitlines()[-1])
