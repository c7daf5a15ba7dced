from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from edgeprune import data

# 2-core machines: keep torch from oversubscribing while the agent processes run
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def full_data() -> Path | None:
    d = data.data_dir()
    return d if d is not None and (d / data.TEST_FILE).is_file() else None


needs_full_data = pytest.mark.skipif(full_data() is None,
                                     reason="full CIFAR-10 files not found (set EDGEPRUNE_DATA or provide ../shared/data)")


@pytest.fixture
def no_full_data(tmp_path, monkeypatch):
    """Point EDGEPRUNE_DATA at an empty folder: the bundled subsets are all there is (a fresh machine)."""
    empty = tmp_path / "empty-data"
    empty.mkdir()
    monkeypatch.setenv("EDGEPRUNE_DATA", str(empty))
    return empty


@pytest.fixture(scope="session")
def resnet20():
    from edgeprune import models

    model, meta = models.pretrained("resnet20")
    return model, meta


@pytest.fixture(scope="session")
def eval_split():
    return data.eval_split()


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory, resnet20):
    """A verified ResNet-20 ONNX artifact, its manifest and a 50-image eval shard, for transport tests."""
    from edgeprune import export

    d = tmp_path_factory.mktemp("artifact")
    ev = data.eval_split(5)
    man = export.export_onnx(resnet20[0], d / "r20.onnx", check_inputs=data.to_tensor_batch(ev.images[:8]),
                             model_name="resnet20", source_checkpoint_sha256=resnet20[1]["sha256"],
                             pruning_plan_sha256="0" * 64)
    shard = ev.save(d / "eval.npz")
    return d / "r20.onnx", man, shard


# ------------------------------------------------------------------------------------------ reliability table
# Tests marked ``@pytest.mark.reliability(kind=..., what=..., expected=...)`` are the rows of the README's
# Reliability table. With EDGEPRUNE_RELIABILITY_OUT=FILE each one's outcome is appended to FILE as a JSON line;
# ``python scripts/reliability_table.py`` runs them and rewrites the table from that file.
RELIABILITY_OUT = os.environ.get("EDGEPRUNE_RELIABILITY_OUT")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    mark = item.get_closest_marker("reliability")
    if mark is None or not RELIABILITY_OUT:
        return
    if rep.when == "call" or (rep.when == "setup" and rep.outcome != "passed"):
        import json

        outcome = "xfailed" if hasattr(rep, "wasxfail") else ("skipped" if rep.skipped else rep.outcome)
        row = {"test": item.nodeid, "outcome": outcome,
               "seconds": round(rep.duration, 2), **{k: str(v) for k, v in mark.kwargs.items()}}
        with open(RELIABILITY_OUT, "a") as f:
            f.write(json.dumps(row) + "\n")


def pytest_collection_modifyitems(config, items):
    """With EDGEPRUNE_RELIABILITY_LIST=FILE, write each reliability-marked test's id and mark there (one JSON line
    each): what ``tests/test_reliability_table.py`` checks the README's table against."""
    path = os.environ.get("EDGEPRUNE_RELIABILITY_LIST")
    if not path:
        return
    import json

    with open(path, "w") as f:
        for item in items:
            mark = item.get_closest_marker("reliability")
            if mark is not None:
                f.write(json.dumps({"test": item.nodeid, **{k: str(v) for k, v in mark.kwargs.items()}}) + "\n")
