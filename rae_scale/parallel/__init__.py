"""Process groups and the DDP / FSDP2 / DeepSpeed strategies, activation checkpointing, precision, EMA.

DeepSpeed is imported only when strategy 'deepspeed' is built (rae_scale.parallel.deepspeed).
"""
from rae_scale.parallel.ac import apply_ac
from rae_scale.parallel.compile import apply_compile
from rae_scale.parallel.dist import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    destroy,
    init_distributed,
    same_seed_on_all_ranks,
    seed_everything,
)
from rae_scale.parallel.ema import EMA
from rae_scale.parallel.frozen import prepare_frozen, run_frozen
from rae_scale.parallel.precision import set_tf32
from rae_scale.parallel.strategy import STRATEGIES, build_strategy, build_strategy_from_config, replicated_strategy
from rae_scale.parallel.strategy_base import Strategy

__all__ = [
    "EMA", "STRATEGIES", "DistInfo", "Strategy", "all_reduce_mean", "apply_ac", "apply_compile", "barrier",
    "broadcast_object", "build_strategy", "build_strategy_from_config", "destroy", "init_distributed",
    "prepare_frozen", "replicated_strategy", "run_frozen", "same_seed_on_all_ranks", "seed_everything", "set_tf32",
]
