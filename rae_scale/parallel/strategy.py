"""The DDP and FSDP2 strategies, and the factories that build a strategy by name or from the config.

The interface itself is rae_scale.parallel.strategy_base.Strategy; DeepSpeed's implementation is
rae_scale.parallel.deepspeed, imported only when strategy 'deepspeed' is built (it is heavy).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from rae_scale.parallel.ddp import apply_ddp
from rae_scale.parallel.dist import DistInfo
from rae_scale.parallel.ema import EMA, trainable_local_params
from rae_scale.parallel.fsdp import apply_fsdp, build_mesh
from rae_scale.parallel.strategy_base import OptimizerFactory, Strategy, resolve_block_names

__all__ = ["STRATEGIES", "ZERO_STAGES", "OptimizerFactory", "Strategy", "TorchStrategy", "build_strategy",
           "build_strategy_from_config", "replicated_strategy", "resolve_block_names"]

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp", "deepspeed")
ZERO_STAGES = (1, 2, 3)


class TorchStrategy(Strategy):
    """DDP or FSDP2: plain torch optimizer, LambdaLR schedule, DCP-ready state."""

    def __init__(self, kind: str, *, reshard_after_forward: bool = True, hsdp_replicas: int | None = None,
                 **common) -> None:
        super().__init__(**common)
        self.kind = kind
        self.reshard_after_forward = reshard_after_forward
        self.hsdp_replicas = hsdp_replicas
        self.mesh = None

    def autocast(self) -> contextlib.AbstractContextManager:
        # FSDP2's MixedPrecisionPolicy already runs the blocks with bf16 parameters and casts the inputs
        return contextlib.nullcontext() if self.kind == "fsdp" else super().autocast()

    def wrap(self, model, *, blocks, optimizer_factory, lr_lambda=None, ema_decay=None):
        block_names, ema_copy = self._prepare(model, blocks, ema_decay)
        if self.kind == "ddp":
            self.module = model
            self.model = apply_ddp(model, self.dist.device)
        else:
            self.mesh = build_mesh(self.dist.device.type, self.dist.world_size, self.hsdp_replicas)
            apply_fsdp(model, [model.get_submodule(n) for n in block_names], self.mesh,
                       precision=self.precision, reshard_after_forward=self.reshard_after_forward)
            self.module = self.model = model
            if ema_copy is not None:
                # same mesh and units, so EMA shard i pairs with model shard i on every rank
                apply_fsdp(ema_copy, [ema_copy.get_submodule(n) for n in block_names], self.mesh,
                           precision=self.precision, reshard_after_forward=True)
        if ema_copy is not None:
            self.ema = EMA(ema_copy, ema_decay, lambda: trainable_local_params(self.module))
        self.optimizer = optimizer_factory([p for p in model.parameters() if p.requires_grad])
        self.scheduler = LambdaLR(self.optimizer, lr_lambda) if lr_lambda is not None else None
        return self.model

    @contextlib.contextmanager
    def accumulate(self, is_last: bool) -> Iterator[None]:
        self._is_last_micro = is_last
        if self.kind == "ddp":
            # no_sync skips the all-reduce; grads accumulate locally and the last backward reduces the sum
            with (contextlib.nullcontext() if is_last else self.model.no_sync()):
                yield
        else:
            # FSDP2 keeps unsharded grads across micro-batches and reduce-scatters on the last one
            self.model.set_requires_gradient_sync(is_last)
            yield

    def step(self, update_ema: bool = True) -> torch.Tensor:
        params = [p for p in self.module.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # sums the shards' squared norms across the mesh
        if self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        if update_ema and self.ema is not None:
            self.ema.update()
        return norm.detach()


def build_strategy(kind: str, *, dist: DistInfo, precision: str = "fp32", zero_stage: int = 2,
                   reshard_after_forward: bool = True, hsdp_replicas: int | None = None,
                   activation_checkpointing: str = "none", ac_every: int = 2, compile_blocks: bool = False,
                   deepspeed_overrides: dict | None = None, grad_clip: float = 0.0, grad_accum_steps: int = 1,
                   micro_batch_size: int | None = None) -> Strategy:
    """Build the strategy for `kind` ("ddp" | "fsdp" | "deepspeed").

    zero_stage and deepspeed_overrides (dotted keys, e.g. {"zero_optimization.overlap_comm": True}) are for
    deepspeed; reshard_after_forward and hsdp_replicas are for fsdp. micro_batch_size is required by
    deepspeed (its config states the batch layout).
    """
    if kind not in STRATEGIES:
        raise ValueError(f"strategy={kind!r} is not supported; allowed: {', '.join(STRATEGIES)}")
    common = dict(dist=dist, precision=precision, grad_accum_steps=grad_accum_steps, grad_clip=grad_clip,
                  activation_checkpointing=activation_checkpointing, ac_every=ac_every,
                  compile_blocks=compile_blocks)
    if kind != "deepspeed" and deepspeed_overrides:
        raise ValueError(f"deepspeed_overrides were given but strategy={kind!r}; they apply to 'deepspeed' only")
    if kind != "fsdp" and hsdp_replicas is not None:
        raise ValueError(f"hsdp_replicas={hsdp_replicas} applies to strategy 'fsdp' only, not {kind!r}")
    if kind == "deepspeed":
        if zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage={zero_stage!r} is not supported; allowed: 1, 2, 3")
        if micro_batch_size is None or micro_batch_size < 1:
            raise ValueError("strategy 'deepspeed' needs micro_batch_size >= 1 (per-rank batch of one micro-step)")
        # imported here: deepspeed is heavy and only this strategy needs it
        from rae_scale.parallel.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                                 overrides=deepspeed_overrides, **common)
    return TorchStrategy(kind, reshard_after_forward=reshard_after_forward, hsdp_replicas=hsdp_replicas, **common)


def build_strategy_from_config(parallel, *, dist: DistInfo, grad_accum_steps: int, micro_batch_size: int,
                               grad_clip: float = 0.0) -> Strategy:
    """The trained model's strategy from a `parallel` config section (strategy, precision, ZeRO stage,
    FSDP resharding, activation checkpointing, compile, DeepSpeed overrides); the batch layout and
    clipping come from the training section."""
    p = parallel
    return build_strategy(p.strategy, dist=dist, precision=p.precision, zero_stage=p.zero_stage,
                          reshard_after_forward=p.reshard_after_forward, hsdp_replicas=p.hsdp_replicas,
                          activation_checkpointing=p.activation_checkpointing, ac_every=p.ac_every,
                          compile_blocks=p.compile, deepspeed_overrides=p.deepspeed or None,
                          grad_clip=grad_clip, grad_accum_steps=grad_accum_steps,
                          micro_batch_size=micro_batch_size)


def replicated_strategy(*, dist: DistInfo, precision: str = "fp32", grad_accum_steps: int = 1) -> Strategy:
    """Plain data parallelism (every rank holds the whole module), for small trained modules such as
    the discriminator heads, whatever strategy the main model uses."""
    return build_strategy("ddp", dist=dist, precision=precision, grad_accum_steps=grad_accum_steps)
