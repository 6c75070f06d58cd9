"""Process groups and the DDP / FSDP2 / DeepSpeed strategies, activation checkpointing, precision, EMA.

The names below load on first use (PEP 562): a launcher that imports `rae_scale.parallel.launch` to
spawn local ranks does not pay for torch.distributed. DeepSpeed is imported only when strategy
'deepspeed' is built (rae_scale.parallel.deepspeed).
"""
import importlib

_HOMES = {
    "apply_ac": "ac", "apply_compile": "compile", "init_distributed": "dist", "EMA": "ema",
    "prepare_frozen": "frozen", "set_tf32": "precision", "build_strategy": "strategy",
    "build_strategy_from_config": "strategy", "replicated_strategy": "strategy",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
