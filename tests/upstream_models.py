"""Our DiT classes built from the golden fixtures' upstream class name and constructor arguments.

The fixtures (../shared/fixtures, made with the upstream RAE code) record `upstream_class` (its
`target:` module path) and `upstream_params`; our classes take the same arguments and keep upstream's
parameter names, so the fixtures' state dicts load strictly.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from rae_scale.models.dit import DiTwDDTHead, LightningDiT

UPSTREAM_CLASSES: dict[str, type[nn.Module]] = {
    "stage2.models.DDT.DiTwDDTHead": DiTwDDTHead,
    "stage2.models.lightningDiT.LightningDiT": LightningDiT,
}


def build_stage2_from_upstream(target: str, params: Mapping[str, Any]) -> nn.Module:
    """Our model for an upstream stage-2 class path (older configs prefix it with `src.`)."""
    return UPSTREAM_CLASSES[target.removeprefix("src.")](**params)
