"""FeatureSet: what featurising images yields (Inception moments, optional per-sample features and
logits), and featurize_batches, which fills one in a single process. Shared by the sampling engine
(features.py) and reference statistics (reference.py), which import it, not each other."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from tqdm import tqdm

from rae_scale.eval.inception import POOL_DIM, SPATIAL_DIM, InceptionFeatures
from rae_scale.eval.metrics import MomentAccumulator


@dataclass
class FeatureSet:
    """Accumulated moments of pool3 (FID) and mixed_6 (sFID) features, plus optional per-sample
    pool features (precision/recall) and logits (IS), rows in sample-index order."""

    pool: MomentAccumulator = field(default_factory=lambda: MomentAccumulator(POOL_DIM))
    spatial: MomentAccumulator = field(default_factory=lambda: MomentAccumulator(SPATIAL_DIM))
    pool_features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    resumed_units: int = 0  # units read back from a progress folder instead of sampled (not saved)

    @property
    def count(self) -> int:
        return self.pool.count

    def merge(self, other: "FeatureSet") -> "FeatureSet":
        self.pool.merge(other.pool)
        self.spatial.merge(other.spatial)
        self.pool_features = _cat(self.pool_features, other.pool_features)
        self.logits = _cat(self.logits, other.logits)
        return self

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict(), "spatial": self.spatial.state_dict(),
                "pool_features": self.pool_features, "logits": self.logits}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureSet":
        return cls(MomentAccumulator.from_state_dict(state["pool"]),
                   MomentAccumulator.from_state_dict(state["spatial"]),
                   state.get("pool_features"), state.get("logits"))


def _cat(a, b):
    if a is None or b is None:
        return a if b is None else b
    return torch.cat([a, b])


def featurize_batches(batches: Iterable[torch.Tensor], inception: InceptionFeatures, *,
                      keep_pool: bool = False, keep_logits: bool = False,
                      progress: str | None = None) -> FeatureSet:
    """Featurise uint8 NCHW batches into a FeatureSet (single process)."""
    fs = FeatureSet()
    pools, logits = [], []
    for images in tqdm(batches, desc=progress, disable=progress is None or not sys.stderr.isatty()):
        out = inception(images)
        fs.pool.update(out["pool"])
        fs.spatial.update(out["spatial"])
        if keep_pool:
            pools.append(out["pool"].cpu())
        if keep_logits and "logits" in out:
            logits.append(out["logits"].cpu())
    fs.pool_features = torch.cat(pools) if pools else None
    fs.logits = torch.cat(logits) if logits else None
    return fs
