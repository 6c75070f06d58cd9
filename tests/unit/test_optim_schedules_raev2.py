"""RAEv2's LR schedule (kind "linear" with its decay points) against its closed form; epochs <-> steps; EMA 0.9995."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from rae_scale.optim import MuonWithAdamW, lr_factor_fn
from rae_scale.optim.schedules import epochs_to_steps

BASE, FINAL = 2e-4, 2e-5
SPE = 1251  # RAEv2 ImageNet: len(loader) // accum at batch 1024


def schedule(**fields):
    base = dict(kind="linear", warmup_steps=0, warmup_epochs=None, warmup_from_zero=False,
                decay_start_step=None, decay_start_epoch=None, decay_end_step=None, decay_end_epoch=None,
                final_lr=FINAL)
    return SimpleNamespace(**{**base, **fields})


def closed_form(step, warm, start, end, ramp, final=FINAL / BASE):
    """The documented shape, written out independently (piecewise in steps)."""
    if step < warm:
        return (step + 1) / warm if ramp else 1.0
    if step < start:
        return 1.0
    if step >= end:
        return final
    return 1.0 + (final - 1.0) * (step - start) / (end - start)


def probe_steps(*points):
    """Each point, its neighbours, and a few steps inside every span."""
    out = {0, 1}
    for p in points:
        out |= {max(p - 1, 0), p, p + 1}
    pts = sorted(points)
    for a, b in zip(pts, pts[1:]):
        out |= {a + (b - a) // 3, a + (b - a) // 2, a + 2 * (b - a) // 3}
    return sorted(out)


def test_imagenet_recipe_in_epochs_is_constant_then_linear_then_constant():
    # RAEv2 imagenet-dinov3l-k7: warmup_epochs 25 (held, not ramped), decay_end_epoch 50, 80 epochs
    total = 80 * SPE
    factor = lr_factor_fn(schedule(warmup_epochs=25, decay_end_epoch=50), total, SPE, BASE)
    warm, end = 25 * SPE, 50 * SPE
    for step in probe_steps(warm, end, total - 1):
        assert factor(step) == pytest.approx(closed_form(step, warm, warm, end, False), rel=1e-12), step
    assert factor(warm - 1) == 1.0 and factor(warm) == 1.0  # the decay starts at 1 exactly
    assert factor((warm + end) // 2) == pytest.approx(1 - 0.9 * ((end - warm) // 2) / (end - warm))
    assert factor(end - 1) > FINAL / BASE and factor(end) * BASE == pytest.approx(FINAL)
    assert factor(total - 1) * BASE == pytest.approx(FINAL)


def test_step_spelling_equals_epoch_spelling():
    total = 80 * SPE
    by_epochs = lr_factor_fn(schedule(warmup_epochs=25, decay_end_epoch=50), total, SPE, BASE)
    by_steps = lr_factor_fn(schedule(warmup_steps=25 * SPE, decay_end_step=50 * SPE), total, SPE, BASE)
    mixed = lr_factor_fn(schedule(warmup_epochs=25, decay_start_step=25 * SPE, decay_end_epoch=50), total, SPE, BASE)
    for step in probe_steps(25 * SPE, 50 * SPE, total - 1):
        assert by_epochs(step) == by_steps(step) == mixed(step), step


def test_warmup_from_zero_ramps_then_holds_then_decays():
    f = lr_factor_fn(schedule(warmup_steps=10, warmup_from_zero=True, decay_start_step=30, decay_end_step=50),
                     100, 20, BASE)
    for step in probe_steps(10, 30, 50, 99):
        assert f(step) == pytest.approx(closed_form(step, 10, 30, 50, True), rel=1e-12), step
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0


def test_decay_end_defaults_to_the_last_step_and_start_to_the_warmup_end():
    f = lr_factor_fn(schedule(warmup_steps=20), 100, 10, BASE)
    for step in probe_steps(20, 100):
        assert f(step) == pytest.approx(closed_form(step, 20, 20, 100, False), rel=1e-12), step


def test_text_to_image_recipe_with_virtual_epochs():
    # t2i-dinov3l-k7: an "epoch" is 10,000 steps; const to epoch 5, linear to 15, 20 epochs
    f = lr_factor_fn(schedule(warmup_epochs=5, decay_end_epoch=15), 200_000, 10_000, BASE)
    for step in probe_steps(50_000, 150_000, 199_999):
        assert f(step) == pytest.approx(closed_form(step, 50_000, 50_000, 150_000, False), rel=1e-12), step


def test_epoch_conversion_truncates_like_raev2():
    assert epochs_to_steps(25, 1251) == 31275
    assert epochs_to_steps(0.5, 1251) == 625  # int(625.5): RAEv2 truncates (round() would give 626)
    assert epochs_to_steps(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert epochs_to_steps(2.5, 3) == 7
    f = lr_factor_fn(schedule(decay_start_epoch=0.5, decay_end_epoch=1.5), 3 * SPE, SPE, BASE)
    assert f(624) == 1.0 and f(625) == 1.0 and f(626) < 1.0 and f(1876) == FINAL / BASE


def test_lambdalr_moves_both_gmuon_groups_along_the_schedule():
    weight, bias = torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(4))
    opt = MuonWithAdamW([weight, bias], lr=BASE)
    f = lr_factor_fn(schedule(warmup_steps=2, decay_end_step=6), 10, 5, BASE)
    sched = LambdaLR(opt, f)
    for step in range(10):
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([BASE * f(step)] * 2), step
        opt.step()
        sched.step()


@pytest.mark.parametrize("fields, message", [
    (dict(warmup_steps=10, warmup_epochs=1), "warmup_steps=10 and schedule.warmup_epochs=1 are both set"),
    (dict(decay_end_step=10, decay_end_epoch=1), "both set"),
    (dict(warmup_steps=30, decay_start_step=20), "warmup <= decay start <= decay end"),
    (dict(decay_start_step=60, decay_end_step=50), "warmup 0, decay start 60, decay end 50"),
    (dict(decay_end_epoch=-1), "decay_end_epoch=-1 must be >= 0"),
])
def test_bad_schedules_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        lr_factor_fn(schedule(**fields), 100, 10, BASE)
    with pytest.raises(ValueError, match="steps_per_epoch >= 1"):
        lr_factor_fn(schedule(warmup_epochs=1), 100, 0, BASE)


def test_ema_decay_0_9995_is_settable():
    from rae_scale import config as C

    job = C.load_config(C.Stage2Job, None, ["training.ema_decay=0.9995"])
    assert job.training.ema_decay == 0.9995
    assert C.Stage2Job().training.ema_decay == 0.9995  # stage 2's default already
