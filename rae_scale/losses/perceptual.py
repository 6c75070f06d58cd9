"""Frozen VGG16-LPIPS for the stage-1 reconstruction loss (inputs in [-1, 1]).

The linear heads are the lpips package's v0.1 VGG weights (the same heads taming-transformers ships as
vgg.pth). The VGG16 backbone comes from a given file or torchvision's local weight cache; nothing is
downloaded here: a missing file is an error that says where to put it.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Indices of the conv layers in torchvision's vgg16().features and the lpips slice holding each.
_VGG16_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips splits features[0:4], [4:9], [9:16], [16:23], [23:30]
VGG16_CACHE_NAME = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1 file


class LPIPSLoss(nn.Module):
    """LPIPS distance per sample, [B]; always frozen and in eval mode (its heads carry dropout)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPSLoss":
        # A parent's .train() must not switch on the heads' dropout.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, normalize=False).flatten()


def _torchvision_cache_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_CACHE_NAME


def _slice_of(index: int) -> int:
    return next(k for k, end in enumerate(_SLICE_ENDS) if index < end) + 1


def _load_vgg_backbone(lpips_net: nn.Module, path: str | os.PathLike) -> None:
    """Copy torchvision-format VGG16 conv weights (`features.N.*` or `N.*`) into lpips' slices."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    mapped, missing = {}, []
    for i in _VGG16_CONVS:
        for kind in ("weight", "bias"):
            src = next((k for k in (f"features.{i}.{kind}", f"{i}.{kind}") if k in state), None)
            if src is None:
                missing.append(f"features.{i}.{kind}")
            else:
                mapped[f"slice{_slice_of(i)}.{i}.{kind}"] = state[src]
    if missing:
        raise ValueError(f"{path} is not a torchvision VGG16 state dict: missing {missing[:4]} "
                         f"({len(missing)} of {2 * len(_VGG16_CONVS)} conv tensors)")
    own = lpips_net.net.state_dict()
    bad = [k for k, v in mapped.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: wrong shapes for {bad[:4]}, e.g. {bad[0]} is "
                         f"{tuple(mapped[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
    lpips_net.net.load_state_dict(mapped, strict=True)


def build_lpips(vgg_weights: str | os.PathLike | None = None, pretrained_backbone: bool = True) -> LPIPSLoss:
    """VGG16-LPIPS, frozen, eval mode; call it as lpips(x, y) with images in [-1, 1] -> [B].

    Args:
        vgg_weights: a torchvision VGG16 state dict file for the backbone. None looks in torchvision's
            cache (`$TORCH_HOME/hub/checkpoints/vgg16-397923af.pth`).
        pretrained_backbone: False keeps a random backbone (tests only; the distance is meaningless).
    """
    import lpips

    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg_weights is None and pretrained_backbone:
        cached = _torchvision_cache_file()
        if not cached.is_file():
            raise FileNotFoundError(
                f"VGG16 ImageNet weights not found at {cached}; nothing is downloaded at run time. "
                f"Copy torchvision's {VGG16_CACHE_NAME} there, pass vgg_weights=<file>, or "
                f"pretrained_backbone=False (random backbone, tests only)")
        vgg_weights = cached
    if vgg_weights is not None:
        _load_vgg_backbone(net, vgg_weights)
        logger.info("LPIPS VGG16 backbone loaded from %s", vgg_weights)
    elif not pretrained_backbone:
        logger.warning("LPIPS with a random VGG16 backbone: for tests only")
    return LPIPSLoss(net)
