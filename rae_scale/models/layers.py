"""Building blocks shared by the DiT models: norms, attention, SwiGLU, RoPE, embedders.

Attribute names follow the upstream RAE code (and timm's PatchEmbed) so that upstream
state dicts load with ``strict=True``; see rae_method.md section 4.1. AxialRoPE, SwiGLUMlp and
QKNormAttention carry RAEv2's names (raev2_method.md section 3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """MAE-style 1-D sin/cos table for positions ``pos`` (float64): [len(pos), embed_dim]."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(
    embed_dim: int, grid_size: int, cls_token: bool = False, base_size: int | None = None
) -> torch.Tensor:
    """Fixed 2-D sin/cos position table [grid^2 (+1), embed_dim] in float32.

    Row-major tokens; the first half of the channels encodes the column (x) coordinate and
    the second half the row, as MAE's meshgrid(w, h) does. A CLS row of zeros is prepended
    when ``cls_token``. With ``base_size`` positions are rescaled by base_size / grid_size,
    as diffusers' table does (identical to MAE's when grid_size == base_size).
    """
    coords = torch.arange(grid_size, dtype=torch.float32)
    if base_size is not None:
        coords = coords / (grid_size / base_size)
    coords = coords.double()
    col = coords[None, :].expand(grid_size, grid_size)
    row = coords[:, None].expand(grid_size, grid_size)
    emb = torch.cat([sincos_1d(embed_dim // 2, col), sincos_1d(embed_dim // 2, row)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def modulate(x: torch.Tensor, shift: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift; shift/scale broadcast over tokens."""
    x = x * (1 + scale)
    return x if shift is None else x + shift


class RMSNorm(nn.Module):
    """RMSNorm with a learnable weight, computed in fp32 and cast back (upstream numerics)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def body_head_pair(value, name: str) -> list:
    """A DiT-DH size given as one number (body and head alike) or as a [body, head] pair."""
    if isinstance(value, (int, float)):
        return [value, value]
    value = list(value)
    if len(value) != 2:
        raise ValueError(f"{name} must be one number or a [body, head] pair, got {value}")
    return value


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, h*h, p*p*C] tokens -> [B, C, h*p, h*p] (a token's values ordered (p_row, p_col, C)).

    Contiguous: with p = 1 the reshape would be a strided view, which FSDP2 warns about as a
    module output (an in-place op on it would skip its backward hook)."""
    b, n, _ = tokens.shape
    h = int(round(n**0.5))
    x = tokens.reshape(b, h, h, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, h * patch_size, h * patch_size).contiguous()


def make_norm(dim: int, use_rmsnorm: bool) -> nn.Module:
    """RMSNorm, or a LayerNorm without affine (upstream's non-RMS choice)."""
    return RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP: w3(silu(a) * b) with (a, b) = split(w12(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GeluMlp(nn.Module):
    """timm-style MLP (fc1 -> tanh-GELU -> fc2)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): rotation on interleaved pairs."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


class RoPE2D(nn.Module):
    """EVA-style 2-D rotary embedding over a square token grid (upstream VisionRotaryEmbeddingFast).

    ``dim`` is half the head dim: the first half of each head rotates with the row index,
    the second half with the column index. The tables are persistent buffers because
    upstream checkpoints contain them (``freqs_cos``, ``freqs_sin``).
    """

    def __init__(self, dim: int, grid_size: int, theta: float = 10000.0):
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        pos = torch.arange(grid_size).float()
        angles = (pos[:, None] * freqs[None, :]).repeat_interleave(2, dim=-1)  # [G, dim]
        rows = angles[:, None, :].expand(grid_size, grid_size, dim)
        cols = angles[None, :, :].expand(grid_size, grid_size, dim)
        table = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, 2 * dim)
        self.register_buffer("freqs_cos", table.cos())
        self.register_buffer("freqs_sin", table.sin())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, L, head_dim]; the fp32 tables promote q/k, callers cast back.
        return x * self.freqs_cos + _rotate_pairs(x) * self.freqs_sin


class Attention(nn.Module):
    """Multi-head self-attention with fused SDPA, optional q/k norm and RoPE (upstream NormAttention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, use_rmsnorm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = (lambda d: RMSNorm(d)) if use_rmsnorm else (lambda d: nn.LayerNorm(d))
        self.q_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: RoPE2D | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class PatchEmbed(nn.Module):
    """timm PatchEmbed: Conv2d(kernel = stride = patch) then flatten to tokens; strict input size."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.input_size = input_size
        self.patch_size = (patch_size, patch_size)  # tuple, as timm stores it
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"input spatial size {tuple(x.shape[-2:])} does not match the model's "
                f"input_size {self.input_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Gaussian Fourier features of t in [0, 1] (fixed random W ~ N(0, 1)) then a 2-layer MLP."""

    def __init__(self, hidden_size: int, embedding_size: int = 256):
        super().__init__()
        # A frozen Parameter (not a buffer) because upstream checkpoints store it as one.
        self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t[:, None] * self.W.detach()[None, :] * 2 * math.pi
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))


class LabelEmbedder(nn.Module):
    """Class table with a null row (index num_classes) used for label dropout / CFG."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor, train: bool) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class AxialRoPE(nn.Module):
    """2-D axial RoPE on a square patch grid, followed by tokens that are not rotated (RAEv2's ``RoPE``).

    Channel pairs (2m, 2m + 1) rotate together; the first half of a head rotates with the patch
    row, the second half with the column, as RoPE2D. The ``num_unrotated`` tokens after the patches
    (time and condition tokens) get angle 0, i.e. no positional encoding. Tables are persistent
    buffers [grid^2 + num_unrotated, head_dim] because RAEv2 checkpoints contain them.
    """

    def __init__(self, head_dim: int, grid_size: int, num_unrotated: int = 0, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"axial RoPE needs a head dim that is a multiple of 4 (two axes of "
                             f"channel pairs), got head dim {head_dim}")
        if num_unrotated < 0:
            raise ValueError(f"num_unrotated must be >= 0, got {num_unrotated}")
        patch = RoPE2D(head_dim // 2, grid_size, theta)
        self.register_buffer("freqs_cos", torch.cat([patch.freqs_cos, torch.ones(num_unrotated, head_dim)]))
        self.register_buffer("freqs_sin", torch.cat([patch.freqs_sin, torch.zeros(num_unrotated, head_dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, L, head_dim] with L = the table length; fp32 tables promote, callers cast back
        return x * self.freqs_cos + _rotate_pairs(x) * self.freqs_sin


class SwiGLUMlp(nn.Module):
    """SwiGLU MLP with separate gate and value Linears: w3(silu(w1 x) * w2 x) (RAEv2's names)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim)
        self.w2 = nn.Linear(dim, hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class QKNormAttention(nn.Module):
    """Self-attention with separate q/k/v Linears, per-head q/k RMSNorm, RoPE and an optional
    additive mask, through fused SDPA (RAEv2's ``NormAttention``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, heads, L, hd]

    def forward(
        self, x: torch.Tensor, rope: nn.Module | None = None, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q).to(v.dtype), rope(k).to(v.dtype)
        if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
            # an additive mask built in fp32 (finfo.min) must stay finite in bf16/fp16
            attn_mask = attn_mask.clamp(min=torch.finfo(q.dtype).min).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).flatten(2))
