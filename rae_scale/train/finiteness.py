"""Finite-loss checks of a step: stop with the term named, or skip the step on every rank alike."""
from __future__ import annotations

import logging
from typing import Mapping

import torch

from rae_scale.train.errors import NonFiniteLossError

log = logging.getLogger(__name__)


def check_finite(losses: Mapping[str, torch.Tensor], step: int, policy: str) -> bool:
    """True if every loss term is finite. Otherwise stop with the step and term named, or skip."""
    for name, value in losses.items():
        value = torch.as_tensor(value).detach().float()
        if not torch.isfinite(value).all():
            msg = f"non-finite loss at step {step}: term '{name}' = {value.item()}"
            if policy == "skip":
                log.warning("%s; skipping this step (training.on_nonfinite=skip)", msg)
                return False
            raise NonFiniteLossError(msg + " (set training.on_nonfinite=skip to skip such steps)")
    return True


def all_finite_across_ranks(ok: bool, device: torch.device) -> bool:
    """Every rank must agree to skip a step, or the collectives go out of step."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0
