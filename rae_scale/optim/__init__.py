"""Optimizers and LR schedules of the training loops: AdamW from a config section, warmup + decay factors."""
from rae_scale.optim.adamw import adamw
from rae_scale.optim.schedules import lr_factor_fn

__all__ = ["adamw", "lr_factor_fn"]
