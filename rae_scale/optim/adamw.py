"""AdamW built from an optimizer config section (lr, betas, weight_decay, eps)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def adamw(section, lr: float | None = None) -> Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]:
    """The optimizer factory a strategy's wrap() takes: params -> AdamW with the section's settings.

    lr: the base learning rate, when not the section's own (the LR schedule multiplies it).
    """
    base_lr = section.lr if lr is None else lr
    betas, weight_decay, eps = tuple(section.betas), section.weight_decay, section.eps

    def build(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=base_lr, betas=betas, weight_decay=weight_decay, eps=eps)

    return build
