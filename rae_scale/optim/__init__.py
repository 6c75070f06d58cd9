"""Optimizers and LR schedules of the training loops: AdamW or gmuon (Muon + AdamW) from a config section,
warmup + decay factors."""
from rae_scale.optim.adamw import adamw
from rae_scale.optim.muon import MuonWithAdamW, muon
from rae_scale.optim.schedules import lr_factor_fn

__all__ = ["MuonWithAdamW", "adamw", "lr_factor_fn", "muon", "optimizer_factory"]


def optimizer_factory(section, lr: float | None = None):
    """params -> optimizer for an optimizer config section, by its `kind` (adamw or muon)."""
    return muon(section, lr) if getattr(section, "kind", "adamw") == "muon" else adamw(section, lr)
