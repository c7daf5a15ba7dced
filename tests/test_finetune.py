from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from edgeprune import data, finetune, prune
from edgeprune.errors import UsageError


def test_crop_offsets_and_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    padded = F.pad(x, (4, 4, 4, 4))
    out = finetune._crop(padded, torch.tensor([4, 0]), torch.tensor([4, 8]), 32, 32)
    assert torch.equal(out[0], x[0])                         # centre crop = identity
    assert torch.equal(out[1][:, 4:, :28], x[1][:, :28, 4:])  # shifted down-left by 4
    assert torch.all(out[1][:, :4, :] == 0)                   # zero padding came in
    aug = finetune.augment(x, torch.Generator().manual_seed(0))
    assert aug.shape == x.shape


def _acc(model, split):
    with torch.no_grad():
        return float((model(data.to_tensor_batch(split.images)).argmax(1).numpy() == split.labels).mean())


def test_bn_recalibration_recovers_pruned_accuracy(resnet20, eval_split):
    model = copy.deepcopy(resnet20[0])
    prune.prune(model, 0.5, torch.zeros(1, 3, 32, 32))
    before = _acc(model, eval_split)
    n = finetune.recalibrate_bn(model, data.calib_split(), device="cpu")
    assert n == 1000 and not model.training
    after = _acc(model, eval_split)
    assert after > before + 0.10, (before, after)  # measured 0.26 -> 0.56


def test_finetune_lowers_loss_and_is_seeded(resnet20):
    split = data.calib_split(per_class=10)
    losses = []
    for _ in range(2):
        model = copy.deepcopy(resnet20[0])
        prune.prune(model, 0.5, torch.zeros(1, 3, 32, 32))
        x, y = data.to_tensor_batch(split.images), torch.from_numpy(split.labels)
        with torch.no_grad():
            loss0 = float(F.cross_entropy(model.train()(x), y))  # train-mode BN, as during fine-tuning
        res = finetune.finetune(model, split, epochs=2, batch_size=50, lr=0.02, device="cpu", seed=7)
        with torch.no_grad():
            loss1 = float(F.cross_entropy(model.train()(x), y))
        losses.append(loss1)
        assert res.steps_done == res.steps_planned == 4 and res.images_seen == 200 and not res.stopped_by_time
        assert loss1 < loss0
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # same seed, same result


def test_finetune_wall_time_bound(resnet20):
    split = data.calib_split()
    model = copy.deepcopy(resnet20[0])
    res = finetune.finetune(model, split, epochs=50, max_seconds=0.5, device="cpu")
    assert res.stopped_by_time and res.steps_done < res.steps_planned and res.seconds < 10


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs"), ({"max_seconds": 0}, "max_seconds")])
def test_finetune_bad_arguments(resnet20, kw, match):
    with pytest.raises(UsageError, match=match):
        finetune.finetune(copy.deepcopy(resnet20[0]), data.calib_split(per_class=1), **kw)
