"""LR schedules as multipliers of the base learning rate per optimizer step (for LambdaLR)."""
from __future__ import annotations

import math


def lr_factor_fn(schedule, total_steps: int, steps_per_epoch: int, base_lr: float):
    """Multiplier of base_lr per optimizer step (for LambdaLR):

        step < warmup            (step + 1) / warmup if warmup_from_zero, else 1 (held)
        warmup <= step < start   1
        start <= step < end      cosine or linear from 1 to final_lr / base_lr
        step >= end              final_lr / base_lr  (kind "constant": 1 throughout after warmup)

    Points in steps or in epochs, not both: warmup_steps | warmup_epochs, decay_start_step |
    decay_start_epoch (default: the end of warmup), decay_end_step | decay_end_epoch (default:
    total_steps). RAE's stage-2 recipe and RAEv2's "linear" are kind linear with warmup_from_zero
    false: the held warmup is the constant span (RAEv2 ImageNet: warmup_epochs 25, decay_end_epoch
    50, final_lr 2e-5 at base 2e-4).
    """
    warm = _schedule_point(schedule, "warmup_steps", "warmup_epochs", steps_per_epoch, 0)
    start = _schedule_point(schedule, "decay_start_step", "decay_start_epoch", steps_per_epoch, warm)
    # a run shorter than its warmup (a test, a smoke run) never decays: the default end waits for the start
    end = _schedule_point(schedule, "decay_end_step", "decay_end_epoch", steps_per_epoch, max(total_steps, start))
    if not warm <= start <= end and schedule.kind != "constant":
        raise ValueError(f"schedule kind {schedule.kind!r} needs warmup <= decay start <= decay end (in steps); got "
                         f"warmup {warm}, decay start {start}, decay end {end}")
    final = schedule.final_lr / base_lr if base_lr > 0 else 1.0
    ramp, kind = bool(schedule.warmup_from_zero), schedule.kind

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm if ramp else 1.0
        if kind == "constant" or step < start:
            return 1.0
        if step >= end:
            return final
        progress = (step - start) / (end - start)
        if kind == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - final) * progress

    return factor


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """RAEv2's conversion: the whole steps in `epochs` epochs, int(epochs * steps_per_epoch).

    A product that lands a hair under an integer through float rounding (0.29 * 100 =
    28.999999999999996) counts as that integer.
    """
    exact = epochs * steps_per_epoch
    nearest = round(exact)
    return int(nearest) if abs(exact - nearest) <= 1e-9 * max(1.0, abs(exact)) else math.floor(exact)


def _schedule_point(schedule, step_field: str, epoch_field: str, steps_per_epoch: int, default: int) -> int:
    """A schedule point given in steps or in epochs (not both); `default` when neither is set."""
    steps, epochs = getattr(schedule, step_field, None), getattr(schedule, epoch_field, None)
    if step_field == "warmup_steps" and steps == 0:
        steps = None  # 0 is the schema's "not set" for warmup
    if steps is not None and epochs is not None:
        raise ValueError(f"schedule.{step_field}={steps} and schedule.{epoch_field}={epochs} are both set; "
                         f"give the point in steps or in epochs, not both")
    if epochs is not None:
        if epochs < 0:
            raise ValueError(f"schedule.{epoch_field}={epochs} must be >= 0")
        if steps_per_epoch < 1:
            raise ValueError(f"schedule.{epoch_field} needs steps_per_epoch >= 1, got {steps_per_epoch}")
        return epochs_to_steps(epochs, steps_per_epoch)
    if steps is not None:
        if steps < 0:
            raise ValueError(f"schedule.{step_field}={steps} must be >= 0")
        return int(steps)
    return default
