"""LR schedules as multipliers of the base learning rate per optimizer step (for LambdaLR)."""
from __future__ import annotations

import math


def lr_factor_fn(schedule, total_steps: int, steps_per_epoch: int, base_lr: float):
    """Multiplier of base_lr per optimizer step: warmup, then cosine/linear to final_lr, then constant.

    `warmup_from_zero=False` holds base_lr through the warmup span (upstream's stage-2 recipe:
    constant, then linear decay); True ramps (step + 1) / warmup.
    """
    warm = schedule.warmup_steps
    if schedule.warmup_epochs is not None:
        warm = int(round(schedule.warmup_epochs * steps_per_epoch))
    end = schedule.decay_end_step if schedule.decay_end_step is not None else total_steps
    if schedule.decay_end_epoch is not None:
        end = int(round(schedule.decay_end_epoch * steps_per_epoch))
    final = schedule.final_lr / base_lr if base_lr > 0 else 1.0
    kind = schedule.kind

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm if schedule.warmup_from_zero else 1.0
        if kind == "constant" or step >= end or end <= warm:
            return 1.0 if kind == "constant" else (final if step >= end else 1.0)
        progress = (step - warm) / (end - warm)
        if kind == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 + (final - 1.0) * progress

    return factor

