from __future__ import annotations

import pytest
import torch

from edgeprune import data, models
from edgeprune.errors import DataError

from .conftest import needs_full_data


def test_pretrained_resnet20_bundled_matches_published_sha(no_full_data):
    model, meta = models.pretrained("resnet20")
    assert meta["sha256"].startswith("12fca82f")
    assert "_assets" in str(meta["path"])
    assert sum(p.numel() for p in model.parameters()) == 269_722


@pytest.mark.parametrize("name,params", [("resnet20", 269_722), ("resnet32", 464_154),
                                         ("resnet44", 658_586), ("resnet56", 853_018)])
def test_architecture_parameter_counts(name, params):
    assert sum(p.numel() for p in models.build_model(name).parameters()) == params


def test_other_checkpoints_need_data_dir(no_full_data):
    with pytest.raises(DataError, match="resnet56-4bfd9763.th.*EDGEPRUNE_DATA"):
        models.pretrained("resnet56")


def test_unknown_model():
    with pytest.raises(DataError, match="unknown model 'resnet18'"):
        models.build_model("resnet18")


def test_corrupt_checkpoint_names_file(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.th"):
        models.load_checkpoint(models.build_model("resnet20"), bad)


def test_wrong_architecture_checkpoint_names_file(tmp_path):
    path = tmp_path / "r32.th"
    torch.save({"state_dict": models.build_model("resnet32").state_dict()}, path)
    with pytest.raises(DataError, match="r32.th: weights do not fit"):
        models.load_checkpoint(models.build_model("resnet20"), path)


def test_bundled_resnet20_accuracy_on_bundled_eval(no_full_data):
    model, _ = models.pretrained("resnet20")
    ev = data.eval_split()
    with torch.no_grad():
        pred = model(data.to_tensor_batch(ev.images)).argmax(1).numpy()
    # measured 92.3 % on these 1,000 images; published 91.73 % on all 10,000
    assert 0.90 <= (pred == ev.labels).mean() <= 0.95


def _full_top1(name: str) -> float:
    model, _ = models.pretrained(name)
    ev = data.eval_split(None)
    assert len(ev) == 10_000
    correct = 0
    with torch.no_grad():
        for sl in data.batches(len(ev), 500):
            correct += int((model(data.to_tensor_batch(ev.images[sl])).argmax(1).numpy() == ev.labels[sl]).sum())
    return correct / len(ev)


@needs_full_data
@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_published_accuracy_on_full_test_set(name):
    # The checkpoints' published test error: 8.27 % (resnet20) and 6.61 % (resnet56).
    assert _full_top1(name) == pytest.approx(models.PUBLISHED_TOP1[name], abs=1e-4)
