"""State-dict helpers that hide the wrapper: DCP `Stateful`s and consolidated full weights."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor


class ModelState:
    """`Stateful` model weights for torch.distributed.checkpoint (sharded under FSDP2, no DDP prefix)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState:
    """`Stateful` optimizer state keyed by parameter name (so it reshards and survives wrapper changes)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def gather_full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Full, unsharded CPU weights on rank 0 ({} elsewhere). Collective under FSDP2: call on every rank."""
    if is_sharded(module):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank != 0:
        return {}
    inner = module.module if hasattr(module, "module") and isinstance(module.module, nn.Module) else module
    return {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
