"""SpaceFeatureSet: a FeatureSet (Inception moments, pool features, logits) plus the same for the other
feature spaces (ConvNeXt, DINOv2, ...): exact fixed-point moments per space, and per-sample features
per space when MIND needs them. Units, resumes and all-reduces treat every space like pool3."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rae_scale.eval.feature_set import FeatureSet, _cat
from rae_scale.eval.metrics import MomentAccumulator


@dataclass
class SpaceFeatureSet(FeatureSet):
    spaces: dict = field(default_factory=dict)  # space -> MomentAccumulator
    space_features: dict = field(default_factory=dict)  # space -> [N, d] float32, sample-index order

    def update_space(self, name: str, feats: torch.Tensor, keep: bool) -> None:
        if name not in self.spaces:
            self.spaces[name] = MomentAccumulator(feats.shape[1])
        self.spaces[name].update(feats)
        if keep:
            self.space_features[name] = _cat(self.space_features.get(name), feats.float().cpu())

    def merge(self, other: FeatureSet) -> "SpaceFeatureSet":
        super().merge(other)
        for name, acc in getattr(other, "spaces", {}).items():
            self.spaces.setdefault(name, MomentAccumulator(acc.dim, frac_bits=acc.frac_bits)).merge(acc)
        for name, feats in getattr(other, "space_features", {}).items():
            self.space_features[name] = _cat(self.space_features.get(name), feats)
        return self

    def moments_only(self) -> "SpaceFeatureSet":
        """The moments without per-sample rows (what is summed across units and ranks)."""
        return SpaceFeatureSet(self.pool, self.spatial, spaces=dict(self.spaces))

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["spaces"] = {k: v.state_dict() for k, v in self.spaces.items()}
        state["space_features"] = dict(self.space_features)
        return state

    @classmethod
    def from_state_dict(cls, state: dict) -> "SpaceFeatureSet":
        base = FeatureSet.from_state_dict(state)
        return cls(base.pool, base.spatial, base.pool_features, base.logits,
                   spaces={k: MomentAccumulator.from_state_dict(v) for k, v in state.get("spaces", {}).items()},
                   space_features=dict(state.get("space_features") or {}))
