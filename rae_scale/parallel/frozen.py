"""Frozen networks (representation encoder, LPIPS, DINO backbone): replicated, never wrapped or sharded."""
from __future__ import annotations

import torch
import torch.nn as nn


def prepare_frozen(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None = None) -> nn.Module:
    """Move to device (and dtype), switch to eval, and stop gradients. Returns the same module.

    These networks are small next to the trained model (DINOv2-B is 86M), so every rank keeps a full
    copy: sharding them would add an all-gather per forward for no memory worth saving.
    """
    module.to(device=device, dtype=dtype) if dtype is not None else module.to(device=device)
    module.eval()
    module.requires_grad_(False)
    module._rae_scale_frozen = True  # strategies refuse to wrap a module marked frozen
    return module
