"""Process groups and the DDP / FSDP2 / DeepSpeed strategies, activation checkpointing, precision, EMA.

DeepSpeed is imported only when strategy 'deepspeed' is built (rae_scale.parallel.deepspeed).
"""
from rae_scale.parallel.ac import apply_ac
from rae_scale.parallel.compile import apply_compile
from rae_scale.parallel.dist import init_distributed
from rae_scale.parallel.ema import EMA
from rae_scale.parallel.frozen import prepare_frozen
from rae_scale.parallel.precision import set_tf32
from rae_scale.parallel.strategy import build_strategy, build_strategy_from_config, replicated_strategy

__all__ = [
    "EMA", "apply_ac", "apply_compile", "build_strategy", "build_strategy_from_config", "init_distributed",
    "prepare_frozen", "replicated_strategy", "set_tf32",
]
