"""Finite-loss checks of a step: stop with the term named, or skip the step (the losses checked are the
global ones, equal on every rank, so every rank skips alike)."""
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
