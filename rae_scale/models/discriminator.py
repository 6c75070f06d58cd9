"""Stage-1 GAN discriminator: frozen DINO ViT with trainable heads, plus DiffAug (rae_method.md 2.4-2.5).

The DINO backbone is frozen and kept out of this module's parameters and state dict (as
upstream does), so optimizers, DDP and FSDP only see the heads and a ``disc`` checkpoint
has upstream's key names. Gradients still flow through the backbone to the input images.
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from rae_scale.models.layers import GeluMlp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINO_RECIPES: dict[str, dict] = {
    "S_8": {"depth": 12, "embed_dim": 384, "num_heads": 6, "patch_size": 8, "mlp_ratio": 4.0},
    "S_16": {"depth": 12, "embed_dim": 384, "num_heads": 6, "patch_size": 16, "mlp_ratio": 4.0},
    "B_16": {"depth": 12, "embed_dim": 768, "num_heads": 12, "patch_size": 16, "mlp_ratio": 4.0},
}


class _DinoAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _DinoBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = _DinoAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = GeluMlp(dim, round(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DinoBackbone(nn.Module):
    """DINO-v1 ViT with public-checkpoint names; returns token maps [B, C, L] at the taps.

    Input is an image in [-1, 1]; it is resized (bilinear) to 224 px and mapped to
    ImageNet-standardised pixels. Output order: last block first, then the key depths.
    """

    img_size = 224

    def __init__(self, *, depth: int, embed_dim: int, num_heads: int, patch_size: int, mlp_ratio: float = 4.0,
                 key_depths: tuple[int, ...] = (2, 5, 8, 11), norm_eps: float = 1e-6):
        super().__init__()
        self.key_depths = tuple(d for d in key_depths if d < depth)
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        grid = self.img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(_DinoBlock(embed_dim, num_heads, mlp_ratio, norm_eps) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)  # in the checkpoint; unused by the taps
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        # [-1, 1] -> ((x + 1) / 2 - mean) / std, folded into one scale and shift
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DinoBackbone":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        x = x * self.x_scale + self.x_shift
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        taps = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.key_depths:
                taps.append(x[:, 1:].transpose(1, 2))
        taps.insert(0, x[:, 1:].transpose(1, 2))
        return taps


def load_dino_state(source: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINO backbone weights with the key third of every qkv bias zeroed (a no-op for softmax;
    upstream does it, so logits match)."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
    state = {k: v.clone() for k, v in state.items()}
    for key, value in state.items():
        if key.endswith("attn.qkv.bias"):
            c = value.numel() // 3
            value[c : 2 * c] = 0
    return state


class BatchNormLocal(nn.Module):
    """Per-sample, per-channel normalisation over tokens (virtual batch 1), fp32, affine."""

    def __init__(self, num_features: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        mean = x.mean(dim=2, keepdim=True)
        var = x.var(dim=2, keepdim=True, unbiased=False)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return x * self.weight[None, :, None] + self.bias[None, :, None]


def _conv(c_in: int, c_out: int, ks: int, spec_norm: bool) -> nn.Conv1d:
    conv = nn.Conv1d(c_in, c_out, kernel_size=ks, padding=ks // 2, padding_mode="circular")
    # The classic hook API keeps upstream's weight_orig / weight_u / weight_v names.
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0) if spec_norm else conv


def _norm(channels: int, norm_type: str, eps: float) -> nn.Module:
    if norm_type == "bn":
        return BatchNormLocal(channels, eps=eps)
    if norm_type == "gn":
        return nn.GroupNorm(32, channels, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}; allowed: 'bn', 'gn'")


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.fn(x) + x) * (1 / math.sqrt(2))


def _head(c: int, ks: int, norm_type: str, eps: float, spec_norm: bool) -> nn.Sequential:
    def block(k: int) -> nn.Sequential:
        return nn.Sequential(_conv(c, c, k, spec_norm), _norm(c, norm_type, eps), nn.LeakyReLU(0.2))

    return nn.Sequential(block(1), _Residual(block(ks)), _conv(c, 1, 1, spec_norm))


class DinoDiscriminator(nn.Module):
    """Frozen DINO backbone + one trainable conv head per tap; logits [B, num_taps * L].

    Args:
        dino_checkpoint: path to (or state dict of) a public DINO checkpoint.
        recipe: a DINO_RECIPES name or a dict with depth / embed_dim / num_heads / patch_size.
    """

    def __init__(
        self,
        dino_checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        recipe: str | Mapping = "S_8",
        ks: int = 9,
        key_depths: tuple[int, ...] = (2, 5, 8, 11),
        norm_type: str = "bn",
        using_spec_norm: bool = True,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if isinstance(recipe, str):
            if recipe not in DINO_RECIPES:
                raise ValueError(f"unknown DINO recipe {recipe!r}; allowed: {sorted(DINO_RECIPES)} or a dict")
            recipe = DINO_RECIPES[recipe]
        arch = {k: recipe[k] for k in ("depth", "embed_dim", "num_heads", "patch_size")}
        backbone = DinoBackbone(**arch, mlp_ratio=recipe.get("mlp_ratio", 4.0),
                                key_depths=tuple(key_depths), norm_eps=norm_eps)
        state = load_dino_state(dino_checkpoint)
        result = backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"DINO checkpoint does not fit recipe {dict(recipe)}: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        self._backbone = (backbone,)  # a tuple hides it from parameters() and state_dict()
        c = backbone.embed_dim
        self.heads = nn.ModuleList(
            _head(c, ks, norm_type, norm_eps, using_spec_norm) for _ in range(len(backbone.key_depths) + 1)
        )

    @property
    def backbone(self) -> DinoBackbone:
        return self._backbone[0]

    def _apply(self, fn, recurse: bool = True):
        # .to() / .cuda() / .half() must move the hidden backbone too.
        self._backbone[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (after DiffAug) -> logits [B, num_heads * tokens]."""
        taps = self.backbone(x)
        return torch.cat([head(t).flatten(1) for head, t in zip(self.heads, taps)], dim=1)


class HeadStack(nn.Module):
    """The discriminator's trainable heads as one module: backbone taps -> logits [B, heads * tokens].

    Stage 1 wraps (DDP) only this, so the frozen backbone stays outside any data-parallel wrapper.
    """

    def __init__(self, heads: nn.ModuleList):
        super().__init__()
        self.heads = heads

    def forward(self, taps):
        return torch.cat([head(t).flatten(1) for head, t in zip(self.heads, taps)], dim=1)


class DiffAug(nn.Module):
    """Differentiable augmentation (StyleGAN-T / data-efficient GANs) with per-sample randomness.

    Each policy is switched on for the whole batch with probability ``prob``; then
    color: brightness + U(-0.5, 0.5), saturation x U(0, 2) around the pixel's channel
    mean, contrast x U(0.5, 1.5) around the image mean; translation: integer shift up to
    round(size / 8) per axis with zero fill; cutout: a zeroed square of ``cutout`` x size.
    """

    def __init__(self, prob: float = 1.0, cutout: float = 0.0, translation_ratio: float = 0.125):
        super().__init__()
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"DiffAug prob must be in [0, 1], got {prob}")
        self.prob = prob
        self.cutout = cutout
        self.translation_ratio = translation_ratio

    def _on(self, device, generator) -> bool:
        return self.prob > 0 and bool(torch.rand((), device=device, generator=generator) < self.prob)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()  # augment in fp32
        b, dev = x.shape[0], x.device

        def rand(*shape):
            return torch.rand(shape, device=dev, generator=generator)

        if self._on(dev, generator):
            x = x + (rand(b, 1, 1, 1) - 0.5)
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * (rand(b, 1, 1, 1) * 2) + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (rand(b, 1, 1, 1) + 0.5) + m
        if self._on(dev, generator):
            x = translate(x, self.translation_ratio, generator)
        if self.cutout > 0 and self._on(dev, generator):
            x = cutout(x, self.cutout, generator)
        return x.to(dtype)


def translate(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Shift each image by its own integer offset in [-round(ratio*H), round(ratio*H)], zero fill."""
    b, _, h, w = x.shape
    sh, sw = round(h * ratio), round(w * ratio)
    dy = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device, generator=generator)
    dx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row for each output row
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx
    valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)
    idx = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)  # [B, H*W]
    out = x.flatten(2).gather(2, idx.unsqueeze(1).expand(-1, x.shape[1], -1)).view_as(x)
    return out * valid


def cutout(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero one square of side ratio * size per image, at a random centre."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (b, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w + (1 - cw % 2), (b, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (rows >= cy - ch // 2) & (rows < cy - ch // 2 + ch) & (cols >= cx - cw // 2) & (cols < cx - cw // 2 + cw)
    return x * (~inside).unsqueeze(1)
