"""ViT-MAE-style pixel decoder: latent tokens -> patch pixels (rae_method.md section 1.5).

Parameter names follow upstream's ``GeneralDecoder`` (HF ViT-MAE decoder layers), so
released decoder state dicts load. The decoder predicts pixels in the encoder's
standardised space; the RAE de-standardises them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rae_scale.config.presets import DECODER_PRESETS  # the one table of named sizes
from rae_scale.models.layers import sincos_2d


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return out.transpose(1, 2).reshape(b, n, c)


class _Dense(nn.Module):
    """Holds one Linear as ``.dense`` (HF naming)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.attention = _SelfAttention(dim, num_heads)
        self.output = _Dense(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.dense(self.attention(x))


class DecoderLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x)) with exact GELU."""

    def __init__(self, dim: int, num_heads: int, intermediate_size: int, eps: float = 1e-12):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by num_heads {num_heads}")
        self.attention = _Attention(dim, num_heads)
        self.intermediate = _Dense(dim, intermediate_size)
        self.output = _Dense(intermediate_size, dim)
        self.layernorm_before = nn.LayerNorm(dim, eps=eps)
        self.layernorm_after = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        h = F.gelu(self.intermediate.dense(self.layernorm_after(x)))
        return x + self.output.dense(h)


class ViTDecoder(nn.Module):
    """Decoder with a trainable CLS token and fixed 2-D sin-cos positions.

    Args:
        latent_dim: channel count C of the latent tokens (the encoder width).
        num_patches: token count of the trained grid (e.g. 256 for 16x16).
        patch_size: pixels per token side in the output (16; 32 gives 512 px from 16x16).
        pos_base_size: None for upstream's integer positions; 16 reproduces diffusers' table,
            which rescales positions by 16 / grid (the two agree on a 16x16 grid).
    """

    def __init__(
        self,
        *,
        latent_dim: int,
        decoder_hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        num_patches: int = 256,
        patch_size: int = 16,
        num_channels: int = 3,
        layer_norm_eps: float = 1e-12,
        pos_base_size: int | None = None,
    ):
        super().__init__()
        grid = int(round(num_patches**0.5))
        if grid * grid != num_patches:
            raise ValueError(f"num_patches must be a square number, got {num_patches}")
        self.latent_dim = latent_dim
        self.num_patches = num_patches
        self.grid_size = grid
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.decoder_embed = nn.Linear(latent_dim, decoder_hidden_size)
        # A frozen Parameter (not a buffer) because upstream checkpoints store it as one.
        self.decoder_pos_embed = nn.Parameter(
            sincos_2d(decoder_hidden_size, grid, cls_token=True, base_size=pos_base_size)[None],
            requires_grad=False,
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(decoder_hidden_size, num_heads, intermediate_size, layer_norm_eps)
            for _ in range(num_layers)
        )
        self.decoder_norm = nn.LayerNorm(decoder_hidden_size, eps=layer_norm_eps)
        self.decoder_pred = nn.Linear(decoder_hidden_size, patch_size * patch_size * num_channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_hidden_size))

    @property
    def image_size(self) -> int:
        return self.grid_size * self.patch_size

    def transformer_blocks(self) -> list[nn.Module]:
        return list(self.decoder_layers)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Latent tokens [B, N, C] -> patch predictions [B, num_patches, p*p*3]."""
        x = self.decoder_embed(tokens)
        b, n, c = x.shape
        if n != self.num_patches:  # a different latent grid is resized to the trained one
            side = int(round(n**0.5))
            x = x.transpose(1, 2).reshape(b, c, side, side)
            x = F.interpolate(x, size=(self.grid_size, self.grid_size), mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.trainable_cls_token.expand(b, -1, -1), x], dim=1) + self.decoder_pos_embed
        for layer in self.decoder_layers:
            x = layer(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h*w, p*p*C] -> [B, C, h*p, w*p]; each token's values ordered (row, col, channel)."""
        b, p, ch, g = x.shape[0], self.patch_size, self.num_channels, self.grid_size
        x = x.reshape(b, g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(b, ch, g * p, g * p)


def build_decoder(
    preset: str | None = None, *, latent_dim: int, num_patches: int = 256, patch_size: int = 16, **sizes
) -> ViTDecoder:
    """Decoder from a preset ("B", "L", "XL") and/or explicit sizes (which override the preset)."""
    if preset is not None and preset not in DECODER_PRESETS:
        raise ValueError(f"unknown decoder preset {preset!r}; allowed: {sorted(DECODER_PRESETS)}")
    named = {("decoder_hidden_size" if k == "hidden_size" else k): v
             for k, v in (DECODER_PRESETS[preset] if preset else {}).items()}
    args = {**named, **sizes}
    return ViTDecoder(latent_dim=latent_dim, num_patches=num_patches, patch_size=patch_size, **args)
