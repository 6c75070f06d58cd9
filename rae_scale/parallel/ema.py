"""Exponential moving average of the trained weights, kept in the same layout as the trained model.

ema <- decay * ema + (1 - decay) * param, i.e. ``lerp(ema, param, 1 - decay)``, after every optimizer step.

Layouts (the strategy builds the EMA; see Strategy.wrap(ema_decay=...)):
- DDP: a plain full copy of the module on every rank; updated from the local (replicated) params.
- FSDP2: a second copy sharded the same way (same mesh and blocks); each rank lerps only its local
  shards, so the EMA costs 1/world of a full copy and no communication.
- DeepSpeed: a full fp32 copy per rank. ZeRO-1/2 in fp32: updated from the module's (full fp32) params.
  ZeRO-3, or bf16 (where the module holds bf16 weights and ZeRO partitions the fp32 masters): each rank
  lerps only the elements whose fp32 master it holds, with no communication in the step, and the full EMA
  is assembled (one all-reduce per tensor) when it is read (parallel.deepspeed.PartitionedEMA).
Only parameters with requires_grad are averaged; frozen parameters and buffers are copied at creation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def trainable_local_params(module: nn.Module) -> list[torch.Tensor]:
    """Local shards of the parameters that train, in registration order."""
    return [local_tensor(p.detach()) for p in module.parameters() if p.requires_grad]


class EMA:
    """EMA of a model; `module` is the averaged network, usable for sampling (call it like the model)."""

    def __init__(self, module: nn.Module, decay: float,
                 source_params: Callable[[], list[torch.Tensor]]) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"ema decay must be in [0, 1], got {decay}")
        # remember which params are averaged before requires_grad is switched off on the copy
        self._averaged = [name for name, p in module.named_parameters() if p.requires_grad]
        self.module = module.eval().requires_grad_(False)
        self.decay = decay
        self._source_params = source_params

    def _targets(self) -> list[torch.Tensor]:
        # looked up by name each time: FSDP2 re-registers parameter objects when it (un)shards
        params = dict(self.module.named_parameters())
        return [local_tensor(params[name].detach()) for name in self._averaged]

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA step from the current trained weights (call on every rank, after the optimizer step)."""
        d = self.decay if decay is None else decay
        sources = self._source_params()
        targets = self._targets()
        if len(sources) != len(targets):
            raise RuntimeError(f"EMA holds {len(targets)} tensors but the model gave {len(sources)}")
        torch._foreach_lerp_(targets, sources, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights in the module's layout (DTensor shards under FSDP2, ready for DCP)."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, state_dict)
