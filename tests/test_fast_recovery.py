"""Fast CPU recovery: bf16 detection and its fp32 fallback, the uint8 data pipeline, the teacher-logit cache, the
wall-time budget, and resuming with all of them on."""
from __future__ import annotations

import copy
import functools
import time

import numpy as np
import pytest
import torch

from edgeprune import augment, cpu, data, finetune, prune
from edgeprune.errors import UsageError
from edgeprune.recovery import RecoveryPlan, recover
from edgeprune.teacher_cache import TeacherCache


@functools.lru_cache(maxsize=None)
def _small(per_class: int = 3) -> data.Split:
    return data.calib_split(per_class=per_class)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _plan(**kw):
    return RecoveryPlan(**{**dict(epochs=2, batch_size=8, lr=0.05, device="cpu", seed=3, recalibrate=False,
                                 distill=0.5), **kw})


@pytest.fixture(scope="module")
def pruned(resnet20):
    model = copy.deepcopy(resnet20[0])
    prune.prune(model, 0.5, torch.zeros(1, 3, 32, 32))
    return model


# ----------------------------------------------------------------------------------------------- bf16 detection

def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu.cpu_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16"}
    assert cpu.cpu_flags(tmp_path / "missing") == frozenset()
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert "bf16" in cpu.cpu_flags(arm)


def test_bf16_falls_back_to_fp32_when_the_cpu_lacks_it(monkeypatch, pruned, resnet20):
    monkeypatch.setenv(cpu.ENV_BF16, "0")
    device, precision, channels_last, threads, why = _plan().resolved()
    assert (device, precision, channels_last) == ("cpu", "fp32", False) and why == "EDGEPRUNE_CPU_BF16=0"
    assert threads == cpu.usable_cores()
    res = recover(copy.deepcopy(pruned), _plan(epochs=1), train=_small(), teacher=resnet20[0])
    assert res.precision == "fp32" and res.precision_reason == "EDGEPRUNE_CPU_BF16=0"
    with pytest.raises(UsageError, match=r"precision: bf16 was asked for, but EDGEPRUNE_CPU_BF16=0"):
        recover(copy.deepcopy(pruned), _plan(precision="bf16", distill=0.0), train=_small())
    monkeypatch.setenv(cpu.ENV_BF16, "1")
    assert _plan().resolved()[1] == "bf16" and _plan(precision="fp32").resolved()[1] == "fp32"
    monkeypatch.setenv(cpu.ENV_BF16, "yes")
    with pytest.raises(UsageError, match="EDGEPRUNE_CPU_BF16: must be 0 or 1"):
        _plan().resolved()


def test_fp32_and_bf16_runs_differ_only_by_rounding(monkeypatch, pruned, resnet20):
    monkeypatch.setenv(cpu.ENV_BF16, "1")
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    kw = dict(calib=_small(2), train=_small(), teacher=resnet20[0])
    ra = recover(a, _plan(epochs=1, lr=1e-3, recalibrate=True, precision="fp32"), **kw)
    rb = recover(b, _plan(epochs=1, lr=1e-3, recalibrate=True, precision="bf16"), **kw)
    assert (ra.precision, rb.precision) == ("fp32", "bf16") and not _same(a, b)
    assert all(p.dtype == torch.float32 for p in b.parameters())            # fp32 weights come out
    assert all(p.is_contiguous() for p in b.parameters())                     # and the default layout
    assert abs(ra.finetune.final_loss - rb.finetune.final_loss) < 0.1 * ra.finetune.final_loss
    split = data.eval_split(5)
    assert abs(finetune.evaluate(a, split) - finetune.evaluate(b, split)) <= 0.1


def test_bad_precision_and_budget():
    with pytest.raises(UsageError, match="precision: must be auto, fp32, bf16"):
        _plan(precision="fp16").validate()
    with pytest.raises(UsageError, match="max_seconds: must be > 0"):
        _plan(max_seconds=0).validate()


# ----------------------------------------------------------------------------------------------- data pipeline

def test_uint8_batches_match_the_float_augmentation():
    split = _small()
    idx = np.arange(len(split))[::2]
    ref = augment.augment(split.batch(idx), torch.Generator().manual_seed(7))
    fast = augment.TrainBatches(split).batch(idx, torch.Generator().manual_seed(7))
    assert fast.shape == ref.shape and fast.is_contiguous(memory_format=torch.channels_last)
    pad = (ref == 0).all(1, keepdim=True).expand_as(ref)     # the zero-padded pixels of the reference
    assert pad.any() and torch.allclose(fast[~pad], ref[~pad], atol=1e-5)
    assert fast[pad].abs().max() < 0.03                       # mean-valued padding normalises to ~0
    float_split = data.Split("f", split.batch(idx).numpy(), split.labels[idx], "t")
    again = augment.TrainBatches(float_split).batch(np.arange(len(idx)), torch.Generator().manual_seed(7))
    assert torch.equal(again, ref)


# ----------------------------------------------------------------------------------------------- teacher cache

def test_a_warm_teacher_cache_gives_the_same_weights(pruned, resnet20, tmp_path):
    cold, warm, none = (copy.deepcopy(pruned) for _ in range(3))
    cache = TeacherCache(tmp_path / "tc")
    r1 = recover(cold, _plan(), train=_small(), teacher=resnet20[0], teacher_cache=cache)
    steps = r1.finetune.steps_done
    assert r1.teacher_cache["misses"] == steps and r1.teacher_cache["hits"] == 0
    assert len(list((tmp_path / "tc" / cache.key).glob("epoch-*.pt"))) == 2
    fresh = TeacherCache(tmp_path / "tc")                     # another process: read from the files
    r2 = recover(warm, _plan(), train=_small(), teacher=resnet20[0], teacher_cache=fresh)
    assert r2.teacher_cache["hits"] == steps and r2.teacher_cache["misses"] == 0
    recover(none, _plan(), train=_small(), teacher=resnet20[0])
    assert _same(cold, warm) and _same(cold, none)
    # another seed is another key: nothing served from the first one
    r3 = recover(copy.deepcopy(pruned), _plan(seed=4), train=_small(), teacher=resnet20[0],
                 teacher_cache=fresh)
    assert r3.teacher_cache["hits"] == 0 and r3.teacher_cache["key"] != r2.teacher_cache["key"]


def test_a_torn_cache_file_is_recomputed(pruned, resnet20, tmp_path):
    cache = TeacherCache(tmp_path)
    a = copy.deepcopy(pruned)
    recover(a, _plan(epochs=1), train=_small(), teacher=resnet20[0], teacher_cache=cache)
    (f,) = (tmp_path / cache.key).glob("epoch-*.pt")
    f.write_bytes(b"torn")
    b = copy.deepcopy(pruned)
    res = recover(b, _plan(epochs=1), train=_small(), teacher=resnet20[0],
                  teacher_cache=TeacherCache(tmp_path))
    assert res.teacher_cache["hits"] == 0 and _same(a, b) and f.stat().st_size > 4


def test_the_cache_stops_keeping_past_its_size_limit(pruned, resnet20):
    cache = TeacherCache(max_bytes=8 * 10 * 4 * 3)            # room for 3 batches of 8 logits
    recover(copy.deepcopy(pruned), _plan(epochs=1), train=_small(), teacher=resnet20[0],
            teacher_cache=cache)
    assert cache.stats()["batches"] == 3 and cache.stats()["bytes"] == 8 * 10 * 4 * 3


# ----------------------------------------------------------------------------------------------- budget, resume

def test_the_wall_time_budget_is_honoured_within_10_percent(pruned, resnet20):
    budget = 5.0
    model = copy.deepcopy(pruned)
    t0 = time.perf_counter()
    res = recover(model, _plan(epochs=500, max_seconds=budget, recalibrate=True), calib=_small(2), train=_small(),
                  teacher=resnet20[0])
    wall = time.perf_counter() - t0
    assert res.finetune.stopped_by_time and not res.finetune.completed
    assert budget <= res.seconds <= wall <= 1.1 * budget, (res.seconds, wall, budget)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("channels_last", [False, pytest.param(True, marks=pytest.mark.slow)])  # True compiles: ~30 s
def test_interrupted_and_resumed_with_every_speed_up_is_bit_identical(pruned, resnet20, tmp_path, monkeypatch,
                                                                       channels_last):
    monkeypatch.setenv(cpu.ENV_BF16, "1")     # bf16 (emulated where the CPU lacks it), a cache, compile
    kw = dict(train=_small(), teacher=resnet20[0])
    # one variant compiled as well (compiling costs time; the other checks the eager path)
    _plan = functools.partial(globals()["_plan"], channels_last=channels_last,
                              compile=channels_last and cpu.compile_support()[0])
    whole = copy.deepcopy(pruned)
    recover(whole, _plan(checkpoint_every=2), teacher_cache=TeacherCache(), **kw)
    ck = tmp_path / "r.ckpt"
    cache = TeacherCache(tmp_path / "tc")

    def boom(kind, msg, done, total):
        if kind == "progress" and done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(copy.deepcopy(pruned), _plan(checkpoint_every=2), checkpoint=ck, events=boom, teacher_cache=cache,
                **kw)
    model = copy.deepcopy(pruned)
    res = recover(model, _plan(checkpoint_every=2), checkpoint=ck, teacher_cache=TeacherCache(tmp_path / "tc"),
                  **kw)
    assert res.finetune.resumed_from_step == 3 and _same(model, whole)
    assert res.teacher_cache["hits"] == 0          # steps 4.. were never computed before the interruption
