"""Batch arithmetic: global batch = micro-batch x accumulation steps x world size, and the run's length."""
from __future__ import annotations

import math
from dataclasses import dataclass

from rae_scale.train.errors import TrainingSetupError


@dataclass(frozen=True)
class BatchLayout:
    global_batch: int
    micro_batch: int
    accum_steps: int
    world_size: int


def batch_layout(global_batch: int, micro_batch: int | None, accum_steps: int, world_size: int) -> BatchLayout:
    """global batch = micro-batch x accumulation x world size, checked before anything is built."""
    if micro_batch is None:
        denom = accum_steps * world_size
        if global_batch % denom:
            raise TrainingSetupError(
                f"training.global_batch_size={global_batch} is not divisible by grad_accum_steps x world size = "
                f"{accum_steps} x {world_size} = {denom}; choose a global batch that is a multiple of {denom}")
        micro_batch = global_batch // denom
    if micro_batch * accum_steps * world_size != global_batch:
        raise TrainingSetupError(
            f"training.global_batch_size={global_batch} != micro_batch_size x grad_accum_steps x world size = "
            f"{micro_batch} x {accum_steps} x {world_size} = {micro_batch * accum_steps * world_size}")
    return BatchLayout(global_batch, micro_batch, accum_steps, world_size)


def resolve_total_steps(max_steps: int | None, epochs: float | None, steps_per_epoch: int) -> int:
    if max_steps is not None:
        return int(max_steps)
    if epochs is not None:
        return max(1, int(math.ceil(epochs * steps_per_epoch)))
    raise TrainingSetupError("set training.max_steps or training.epochs")
