"""DistributedDataParallel wrapping."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """Wrap with DDP (one replica per rank).

    Buffers are not broadcast before every forward: here they are constants (RoPE tables, fixed
    position embeddings), so that would be pure overhead. (torch >= 2.12 names this switch
    forward_sync_buffers and deprecates broadcast_buffers.)
    """
    device_ids = [device.index] if device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    switch = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, **{switch: False})
