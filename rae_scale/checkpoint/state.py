"""App-state wrappers: what goes through DCP (sharded, global) and what is saved per rank."""
from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)


class ModelOptimizerState:
    """Stateful view of a model (DDP, FSDP2 or plain) and optionally its optimizer.

    Uses torch.distributed.checkpoint.state_dict so keys are plain FQNs (no ``module.``) and
    FSDP2 DTensors stay sharded: DCP then reshards on load to any world size.
    state_dict() is ``{"model": ...}`` or ``{"model": ..., "optim": ...}``.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 options: StateDictOptions | None = None):
        self.model = model
        self.optimizer = optimizer
        self.options = options

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model, options=self.options)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"], options=self.options)


class PerRank:
    """Marks an app-state entry to be saved in each rank's own file (rank_<r>.pt), not in DCP.

    Use it for state that differs between ranks and is small: a data loader's position, a
    sampler. obj is either Stateful (state_dict/load_state_dict) or a plain value. The file stores
    plain values as JSON and tensors beside them (rank_state.py), so that loading it runs no code:
    None, bool, int, float, str, bytes, lists, tuples, dicts, sets, tensors and numpy values come
    back exactly; anything else is refused at save.
    """

    def __init__(self, obj: Any):
        self.obj = obj

    def state_dict(self) -> Any:
        return self.obj.state_dict() if is_stateful(self.obj) else self.obj

    def load_state_dict(self, state: Any) -> None:
        if is_stateful(self.obj):
            self.obj.load_state_dict(state)
        else:
            self.obj = state


def is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def contains_tensor(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(contains_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(contains_tensor(v) for v in obj)
    return False


def goes_to_dcp(value: Any) -> bool:
    """DCP entries: Stateful objects and tensor containers; everything else is per rank."""
    if isinstance(value, PerRank):
        return False
    return is_stateful(value) or contains_tensor(value)
