from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from edgeprune import data, finetune, prune
from edgeprune.errors import DataError, UsageError


@functools.lru_cache(maxsize=None)
def _small(per_class: int = 3) -> data.Split:
    return data.calib_split(per_class=per_class)  # loaded once: reading the npz is most of a tiny test's time


def test_crop_offsets_and_flip():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    from edgeprune.augment import _crop_nhwc

    padded = F.pad(x, (4, 4, 4, 4)).permute(0, 2, 3, 1)
    out = _crop_nhwc(padded, torch.tensor([4, 0]), torch.tensor([4, 8]), 32, 32).permute(0, 3, 1, 2)
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
        finetune.finetune(copy.deepcopy(resnet20[0]), _small(1), **kw)


# ----------------------------------------------------------------------------------------------- distillation

def test_distillation_loss_formula():
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g), torch.randint(0, 10, (6,), generator=g)
    ce = F.cross_entropy(s, y)
    assert torch.allclose(finetune.distillation_loss(s, t, y, alpha=0.0, temperature=4.0), ce)
    assert torch.allclose(finetune.distillation_loss(s, s, y, alpha=0.3, temperature=4.0), 0.7 * ce)
    T = 2.0
    p_t = F.softmax(t / T, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, 1))).sum(1).mean()   # KL(teacher || student), batch mean
    expected = 0.25 * ce + 0.75 * T * T * kl
    assert torch.allclose(finetune.distillation_loss(s, t, y, alpha=0.75, temperature=T), expected, atol=1e-6)


def test_finetune_with_teacher(resnet20):
    split = _small(4)
    teacher = copy.deepcopy(resnet20[0]).train()   # its mode and weights must come back unchanged
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    runs = {}
    for alpha in (None, 0.9):
        model = copy.deepcopy(resnet20[0])
        res = finetune.finetune(model, split, epochs=1, batch_size=20, device="cpu",
                                teacher=teacher if alpha else None, distill_alpha=alpha, distill_temperature=3.0)
        runs[alpha] = (model, res)
    res = runs[0.9][1]
    assert res.distill_alpha == 0.9 and res.distill_temperature == 3.0 and runs[None][1].distill_alpha is None
    assert not torch.equal(runs[None][0].linear.weight, runs[0.9][0].linear.weight)  # the KL term mattered
    assert teacher.training and all(torch.equal(t_before[k], v) for k, v in teacher.state_dict().items())


def test_distill_weight_zero_is_plain_cross_entropy_and_never_runs_the_teacher(resnet20):
    split = _small(2)
    teacher = copy.deepcopy(resnet20[0])
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    plain, zero = copy.deepcopy(resnet20[0]), copy.deepcopy(resnet20[0])
    r_plain = finetune.finetune(plain, split, epochs=1, batch_size=20, device="cpu", seed=3)
    r_zero = finetune.finetune(zero, split, epochs=1, batch_size=20, device="cpu", seed=3, teacher=teacher,
                               distill_alpha=0.0)
    assert calls == [] and r_zero.distill_alpha is None and r_plain.distill_alpha is None
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))


@pytest.mark.parametrize("kw,match", [({"distill_alpha": 0.5}, "distill_alpha: given without a teacher"),
                                      ({"teacher": "same", "distill_alpha": 0.5}, "teacher"),
                                      ({"teacher": "copy", "distill_alpha": 1.5}, "distill_alpha"),
                                      ({"teacher": "copy", "distill_temperature": 0}, "distill_temperature"),
                                      ({"batch_size": 0}, "batch_size"), ({"max_steps": 0}, "max_steps"),
                                      ({"checkpoint_every": 0}, "checkpoint_every"), ({"lr": 0}, "lr")])
def test_finetune_more_bad_arguments(resnet20, kw, match):
    model = copy.deepcopy(resnet20[0])
    if "teacher" in kw:
        kw = dict(kw, teacher=model if kw["teacher"] == "same" else copy.deepcopy(model))
    with pytest.raises(UsageError, match=match):
        finetune.finetune(model, _small(1), **kw)


# ----------------------------------------------------------------------------------------------- checkpoints

BATCH, EPOCHS = 8, 2  # 30 images: 4 steps per epoch (the last one 6 images), 8 in all


def _run(base, **kw):
    model = copy.deepcopy(base)
    res = finetune.finetune(model, _small(), epochs=EPOCHS, batch_size=BATCH, lr=0.05, device="cpu", seed=3, **kw)
    return model, res


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def uninterrupted(resnet20):
    return _run(resnet20[0])


def test_resume_after_max_steps_is_bit_identical(resnet20, uninterrupted, tmp_path):
    ck = tmp_path / "ft.ckpt"
    _, first = _run(resnet20[0], checkpoint=ck, max_steps=3, checkpoint_every=100)
    assert first.stopped_by_steps and first.steps_done == 3 and not first.resumed and ck.is_file()
    assert first.checkpoint == str(ck) and not first.completed
    model, res = _run(resnet20[0], checkpoint=ck)
    assert res.resumed and res.resumed_from_step == 3 and res.steps_done == res.steps_planned == 8
    assert res.images_seen == uninterrupted[1].images_seen == 60 and res.completed
    assert res.final_loss == uninterrupted[1].final_loss
    assert _same(model, uninterrupted[0])
    assert not list(tmp_path.glob("*.tmp"))
    # a completed checkpoint resumes to the same end without training
    again, res2 = _run(resnet20[0], checkpoint=ck)
    assert res2.resumed and res2.resumed_from_step == 8 and res2.steps_done == 8 and _same(again, model)


def test_resume_after_an_exception_across_an_epoch_boundary(resnet20, uninterrupted, tmp_path):
    ck = tmp_path / "ft.ckpt"
    done = []

    def boom(step, planned):
        done.append(step)
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(resnet20[0], checkpoint=ck, checkpoint_every=2, progress=boom)
    assert done == [1, 2, 3, 4, 5]
    model, res = _run(resnet20[0], checkpoint=ck, checkpoint_every=2)
    assert res.resumed_from_step == 5 and _same(model, uninterrupted[0])


def test_resume_with_masks_and_teacher(resnet20, tmp_path):
    from edgeprune import sparsity

    base = copy.deepcopy(resnet20[0])
    masks = sparsity.apply_2to4(base).masks
    kw = dict(masks=masks, teacher=resnet20[0], distill_alpha=0.5, max_steps=4)
    whole, _ = _run(base, **kw)
    ck = tmp_path / "ft.ckpt"
    _run(base, checkpoint=ck, **dict(kw, max_steps=2))
    model, res = _run(base, checkpoint=ck, **kw)
    assert res.resumed_from_step == 2 and res.steps_done == 4 and res.stopped_by_steps and res.sparsity_kept
    assert _same(model, whole)
    with pytest.raises(UsageError, match="masks_sha256"):  # other masks: not the same run
        _run(base, checkpoint=ck, **dict(kw, masks={"linear.weight": masks["linear.weight"]}))


def test_checkpoint_config_and_shape_mismatch(resnet20, tmp_path):
    ck = tmp_path / "ft.ckpt"
    _run(resnet20[0], checkpoint=ck, max_steps=1)
    model = copy.deepcopy(resnet20[0])
    with pytest.raises(UsageError, match=r"ft\.ckpt.*different configuration.*differs in: lr"):
        finetune.finetune(model, _small(), epochs=EPOCHS, batch_size=BATCH, lr=0.1, device="cpu", seed=3,
                          checkpoint=ck)
    assert _same(model, resnet20[0])  # refused before anything was changed
    other = copy.deepcopy(resnet20[0])  # a different structure (as a model pruned differently would be)
    other.linear = torch.nn.Linear(64, 5)
    with pytest.raises(DataError, match=r"ft\.ckpt: checkpoint does not fit the model \(linear.weight: "
                                        r"checkpoint \(10, 64\) vs model \(5, 64\)"):
        _run(other, checkpoint=ck)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="junk.ckpt"):
        _run(resnet20[0], checkpoint=junk)


# ----------------------------------------------------------------------------------------------- evaluate

def test_evaluate_top1(resnet20):
    split = data.eval_split(10)
    model = copy.deepcopy(resnet20[0]).train()
    acc = finetune.evaluate(model, split, batch_size=64, device="cpu")
    assert acc == _acc(model.eval(), split) == finetune.evaluate(model, split) and acc > 0.8
    model.train()
    finetune.evaluate(model, split, device="cpu")
    assert model.training  # mode restored
    with pytest.raises(UsageError, match="batch_size"):
        finetune.evaluate(model, split, batch_size=0)


# ----------------------------------------------------------------------------------------------- recover()

def _plan(**kw):
    from edgeprune.recovery import RecoveryPlan

    return RecoveryPlan(**{**dict(epochs=EPOCHS, batch_size=BATCH, lr=0.05, device="cpu", seed=3), **kw})


def test_recover_is_recalibration_then_the_same_finetune(resnet20):
    """recover() runs exactly what the commands ran themselves before it existed: same weights, bit for bit."""
    from edgeprune.recovery import recover

    pruned = copy.deepcopy(resnet20[0])
    prune.prune(pruned, 0.5, torch.zeros(1, 3, 32, 32))
    cal = _small(2)
    by_hand = copy.deepcopy(pruned)
    finetune.recalibrate_bn(by_hand, cal, device="cpu")
    _, precision, channels_last, threads, _why = _plan().resolved()   # what "auto" means on this host
    ft = finetune.finetune(by_hand, _small(), epochs=EPOCHS, batch_size=BATCH, lr=0.05, device="cpu", seed=3,
                           teacher=resnet20[0], distill_alpha=0.5, precision=precision,
                           channels_last=channels_last, threads=threads)
    events = []
    model = copy.deepcopy(pruned)
    res = recover(model, _plan(distill=0.5), calib=cal, train=_small(), teacher=resnet20[0],
                  events=lambda *e: events.append(e))
    assert _same(model, by_hand) and res.finetune is not None and res.finetune.final_loss == ft.final_loss
    assert res.recalibrated and res.calib_split == cal.name and res.calib_n == len(cal) and res.finetuned
    assert events[0] == ("stage", f"BatchNorm recalibration on {cal.name} ({len(cal)} images)", None, None)
    assert events[1] == ("stage", f"fine-tune on {_small().name} ({len(_small())} images, {precision})", 0, None)
    assert res.precision == precision
    assert events[2:] == [("progress", "fine-tune", i, 8) for i in range(1, 9)]
    # recalibration only: no fine-tune split, or epochs 0
    only_bn = copy.deepcopy(pruned)
    finetune.recalibrate_bn(only_bn, cal, device="cpu")
    for kw in (dict(train=None), dict(train=_small(), plan=_plan(epochs=0))):
        m = copy.deepcopy(pruned)
        r = recover(m, kw.pop("plan", _plan()), calib=cal, **kw)
        assert r.recalibrated and not r.finetuned and _same(m, only_bn)
    m = copy.deepcopy(pruned)
    r = recover(m, _plan(recalibrate=False, epochs=0), calib=cal, train=_small())
    assert not r.recalibrated and not r.finetuned and _same(m, pruned)


def test_recover_interrupted_then_resumed_is_bit_identical(resnet20, tmp_path):
    """With the host's defaults (bf16 autocast where the CPU has it)."""
    from edgeprune.recovery import recover

    whole = copy.deepcopy(resnet20[0])
    recover(whole, _plan(recalibrate=False), train=_small())

    ck = tmp_path / "ft.ckpt"

    def boom(kind, msg, done, total):
        if kind == "progress" and done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(resnet20[0]), _plan(recalibrate=False, checkpoint_every=2), train=_small(),
                checkpoint=ck, events=boom)
    model = copy.deepcopy(resnet20[0])
    res = recover(model, _plan(recalibrate=False, checkpoint_every=2), train=_small(), checkpoint=ck)
    assert res.finetune is not None and res.finetune.resumed_from_step == 5 and _same(model, whole)


@pytest.mark.parametrize("kw,match", [(dict(distill=0.5), "distillation needs a teacher"),
                                      (dict(epochs=-1), "epochs"), (dict(distill=2.0), "distill")])
def test_recover_bad_plans(resnet20, kw, match):
    from edgeprune.recovery import recover

    with pytest.raises(UsageError, match=match):
        recover(copy.deepcopy(resnet20[0]), _plan(**kw), train=_small())
