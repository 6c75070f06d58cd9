"""The Strategy interface: what a training loop calls, whatever the parallelism (DDP, FSDP2, DeepSpeed ZeRO).

A loop does, per optimizer step::

    for i, batch in enumerate(micro_batches):
        with strategy.accumulate(is_last=i == len(micro_batches) - 1):
            with strategy.autocast():
                loss = loss_fn(model(batch))
            strategy.backward(loss)        # divides by grad_accum_steps: the only place
    grad_norm = strategy.step()            # clip, optimizer step, zero grads, LR schedule, EMA
    # or, for a step whose loss was not finite: grad_norm = strategy.skip_step()

and saves / resumes through strategy.checkpoint_io(manager, extra). The implementations live in
strategy.py (DDP, FSDP2) and deepspeed.py; this module imports neither, so both can import it.
Wrapping applies the techniques in a fixed order (torchtitan's): activation checkpointing per block,
then torch.compile per block, then data parallelism (FSDP2 shards each block, then the root).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from rae_scale.parallel.ac import AC_MODES, apply_ac
from rae_scale.parallel.checkpoint_io import CheckpointIO
from rae_scale.parallel.compile import apply_compile
from rae_scale.parallel.dist import DistInfo
from rae_scale.parallel.ema import EMA
from rae_scale.parallel.precision import autocast, check_precision
from rae_scale.parallel.state import ModelState, OptimizerState, gather_full_state_dict

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def resolve_block_names(model: nn.Module, blocks: Iterable[nn.Module]) -> list[str]:
    """Qualified names of `blocks` inside `model`, so the same blocks can be found in a copy (the EMA)."""
    names = {id(m): name for name, m in model.named_modules()}
    out = []
    for i, block in enumerate(blocks):
        if id(block) not in names or names[id(block)] == "":
            raise ValueError(f"block {i} ({type(block).__name__}) passed to wrap() is not a submodule of the model")
        out.append(names[id(block)])
    if not out:
        raise ValueError("wrap() needs at least one block (the model's transformer blocks) to shard/checkpoint")
    return out


class Strategy:
    """What the loops call. Subclasses fill in wrapping, stepping and state."""

    kind = "base"

    def __init__(self, *, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1,
                 grad_clip: float = 0.0, activation_checkpointing: str = "none", ac_every: int = 2,
                 compile_blocks: bool = False) -> None:
        if grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
        if activation_checkpointing not in AC_MODES:
            raise ValueError(f"activation_checkpointing={activation_checkpointing!r} is not supported; "
                             f"allowed: {', '.join(AC_MODES)}")
        self.dist = dist
        self.precision = check_precision(precision)
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.activation_checkpointing = activation_checkpointing
        self.ac_every = ac_every
        self.compile_blocks = compile_blocks
        self.model: nn.Module | None = None     # what the loop calls (DDP / FSDP module / DeepSpeed engine)
        self.module: nn.Module | None = None    # the bare nn.Module inside
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.ema: EMA | None = None
        self._is_last_micro = True

    # ---- wrapping ----------------------------------------------------------------------------------
    def _prepare(self, model: nn.Module, blocks: Iterable[nn.Module],
                 ema_decay: float | None) -> tuple[list[str], nn.Module | None]:
        """Device move, EMA copy (taken before AC/compile), then AC and compile on the blocks."""
        if self.model is not None:
            raise RuntimeError("this strategy already wrapped a model; build one strategy per trained model")
        if getattr(model, "_rae_scale_frozen", False):
            raise ValueError("this module was prepared with prepare_frozen(); frozen networks are never wrapped")
        block_names = resolve_block_names(model, blocks)
        model.to(self.dist.device)
        ema_copy = copy.deepcopy(model) if ema_decay is not None else None
        live_blocks = [model.get_submodule(n) for n in block_names]
        if self.activation_checkpointing != "none":
            chosen = apply_ac(live_blocks, self.activation_checkpointing, self.ac_every)
            log.info("activation checkpointing on %d of %d blocks", len(chosen), len(live_blocks))
        if self.compile_blocks:
            apply_compile(live_blocks)
        return block_names, ema_copy

    def wrap(self, model: nn.Module, *, blocks: Iterable[nn.Module], optimizer_factory: OptimizerFactory,
             lr_lambda: Callable[[int], float] | None = None, ema_decay: float | None = None) -> nn.Module:
        """Wrap `model`, build its optimizer (from the trainable parameters) and LR schedule (LambdaLR).

        Returns the module the loop should call; `.optimizer`, `.scheduler`, `.ema` are set.
        ema_decay: keep an EMA copy laid out like the model (see rae_scale.parallel.ema).
        """
        raise NotImplementedError

    # ---- the step ----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for the forward pass (bf16 autocast where the strategy needs it)."""
        return autocast(self.precision, self.dist.device)

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        """Wrap one micro-batch's forward + backward; gradients are synchronised only when is_last."""
        self._is_last_micro = is_last
        yield

    def backward(self, loss: torch.Tensor) -> None:
        # the one place the per-micro-batch loss is divided by the accumulation steps
        (loss / self.grad_accum_steps).backward()

    def step(self, update_ema: bool = True) -> torch.Tensor:
        """Clip, optimizer step, zero grads, LR schedule step, EMA update. Returns the pre-clip grad norm."""
        raise NotImplementedError

    def skip_step(self) -> torch.Tensor:
        """Discard this step's gradients (a step whose loss was not finite); NaN stands for its grad norm.

        No optimizer, schedule or EMA update: the next step starts from the same weights.
        """
        self.optimizer.zero_grad(set_to_none=True)
        return torch.tensor(float("nan"))

    def current_lr(self) -> float:
        """The learning rate of the trained parameters now (after the last schedule step)."""
        return self.optimizer.param_groups[0]["lr"]

    # ---- state -------------------------------------------------------------------------------------
    def model_state_for_checkpoint(self) -> ModelState:
        return ModelState(self.model)

    def optimizer_state_for_checkpoint(self) -> OptimizerState:
        return OptimizerState(self.model, self.optimizer)

    def checkpoint_states(self) -> dict[str, object]:
        """Every `Stateful` this strategy owns, keyed as the checkpoint stores them."""
        states: dict[str, object] = {"model": self.model_state_for_checkpoint(),
                                     "optimizer": self.optimizer_state_for_checkpoint()}
        if self.scheduler is not None:
            states["lr_scheduler"] = self.scheduler
        if self.ema is not None:
            states["ema"] = self.ema
        return states

    def checkpoint_io(self, manager, extra: Mapping[str, Any]) -> CheckpointIO:
        """Saves and resumes this strategy's state beside the loop's `extra` Statefuls through `manager`
        (a rae_scale.checkpoint.CheckpointManager)."""
        return CheckpointIO(self, manager, extra)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated full fp32 weights on rank 0 ({} on other ranks). Call on every rank."""
        return gather_full_state_dict(self.model)

    def ema_full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            raise RuntimeError("no EMA: pass ema_decay to wrap()")
        return gather_full_state_dict(self.ema.module)
