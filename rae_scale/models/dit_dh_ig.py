"""RAEv2's stage-2 model: DiT^DH with in-context condition tokens and the internal-guidance head.

Rebuilt from raev2_method.md section 3 (``DiTwDDTHead`` / ``DiTwDDTHeadIG`` in RAEv2's
``src/stage2/models/DDT.py``). Differences from RAE's DiT^DH (models/dit.py): the body has no
adaLN; time and condition enter as extra tokens after the patch tokens; RoPE rotates the patch
tokens only; text conditions mask padded keys. Parameter names are RAEv2's, so its state dicts
load with ``strict=True``.

Calling convention (shared with the other stage-2 models): ``model(x, t, cond)`` with x the noisy
latent [B, C, H, W], t the raw flow time [B] in [0, 1] (0 = data, 1 = noise) and cond either a
LongTensor of labels [B] (null label = num_classes) or a pair ``(context [B, Lc, context_dim],
mask [B, Lc])`` (mask 1 = token, 0 = pad; None = no padding). Outputs are x-predictions.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rae_scale.models.layers import (AxialRoPE, PatchEmbed, QKNormAttention, RMSNorm, SwiGLUMlp, body_head_pair,
                                     modulate, unpatchify)

CONDITION_TYPES = ("label", "text")


def key_padding_additive_mask(cond_mask: torch.Tensor, num_leading: int, dtype: torch.dtype) -> torch.Tensor:
    """RAEv2's body attention mask: [B, 1, 1, num_leading + Lc], 0 where a key is visible and
    finfo(dtype).min where a condition key is padding (mask 0). Queries are never masked, and the
    leading patch and time tokens are always visible, so no softmax row is empty."""
    keep = torch.ones(cond_mask.shape[0], num_leading + cond_mask.shape[1], device=cond_mask.device)
    keep[:, num_leading:] = cond_mask
    return (1.0 - keep[:, None, None, :]) * torch.finfo(dtype).min


class FourierTimeTokens(nn.Module):
    """Gaussian Fourier features of t -> MLP -> e_t; tokens = learnable (n, D) + e_t.

    ``W`` is created frozen, as RAEv2 does; RAEv2's trainer then unfreezes the whole model
    (raev2_method.md section 10.4), so ``learn_frequencies=True`` reproduces what it trains.
    """

    def __init__(self, hidden_size: int, num_tokens: int, embedding_size: int = 256,
                 learn_frequencies: bool = True):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=learn_frequencies)
        self.mlp = nn.Sequential(
            nn.Linear(2 * embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.learnable_tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) / hidden_size**0.5)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_t [B, 1, D], tokens [B, n, D])."""
        angles = t[:, None] * self.W[None, :] * 2 * torch.pi
        e_t = self.mlp(torch.cat([angles.sin(), angles.cos()], dim=-1)).unsqueeze(1)
        return e_t, self.learnable_tokens + e_t


class LabelTokens(nn.Module):
    """n learnable tokens plus the class embedding (table row num_classes = the null label)."""

    def __init__(self, hidden_size: int, num_classes: int, num_tokens: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.learnable_tokens = nn.Parameter(torch.randn(num_tokens, hidden_size) / hidden_size**0.5)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.learnable_tokens + self.embedding_table(labels).unsqueeze(1)


class TextTokens(nn.Module):
    """One condition token per text token: Linear(RMSNorm(context))."""

    def __init__(self, hidden_size: int, context_dim: int):
        super().__init__()
        self.norm = RMSNorm(context_dim)
        self.proj = nn.Linear(context_dim, hidden_size)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(context))


def _swiglu_hidden(hidden_size: int, mlp_ratio: float) -> int:
    return int(2 / 3 * hidden_size * mlp_ratio)  # RAEv2's order of operations (3840 for 1440)


class BodyBlock(nn.Module):
    """Pre-norm block without modulation: h + Attn(RMSNorm(h)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.norm2 = RMSNorm(hidden_size)
        self.attn = QKNormAttention(hidden_size, num_heads)
        self.mlp = SwiGLUMlp(hidden_size, _swiglu_hidden(hidden_size, mlp_ratio))

    def forward(self, x: torch.Tensor, rope: AxialRoPE, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask)
        return x + self.mlp(self.norm2(x))


class HeadBlock(BodyBlock):
    """Wide head block: adaLN (shift, scale, gate for attention and MLP) from a per-token condition."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: AxialRoPE) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln_modulation(c).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope=rope)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """RMSNorm, (shift, scale) from the per-token condition, Linear to p*p*C."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaln_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

    def zero_init(self) -> None:
        for p in (*self.adaln_modulation[-1].parameters(), *self.linear.parameters()):
            nn.init.zeros_(p)


class InContextDiTDH(nn.Module):
    """RAEv2's ``DiTwDDTHead``: returns the full head's x-prediction only (a tensor, as RAEv2).

    ``blocks`` holds the body blocks followed by the head blocks, as RAEv2 names them. With
    ``return_intermediate=True`` it returns ``(x_full, zt)``, zt = REPA projector output or None.

    Args (beyond the sizes, which are [body, head] pairs):
        num_t_tokens / num_c_tokens: in-context time / condition tokens (RAEv2's ``cond_arch``); for
            text, num_c_tokens is the padded caption length.
        context_dim: width of the text tokens (condition_type "text" only).
        enable_repa, repa_layer_depth, z_dim: the optional REPA projector on the body's patch tokens
            after block repa_layer_depth (1-based), output width z_dim.
        label_embed_std: init std of the class table (RAEv2 0.02); init only.
        learn_time_frequencies: whether the Fourier frequencies W train (RAEv2 trains them).
    """

    def __init__(
        self,
        input_size: int = 16,
        in_channels: int = 1024,
        patch_size: int | Sequence[int] = 1,
        hidden_size: Sequence[int] = (1440, 2048),
        depth: Sequence[int] = (28, 2),
        num_heads: Sequence[int] = (20, 16),
        mlp_ratio: float = 4.0,
        condition_type: str = "label",
        num_classes: int = 1000,
        context_dim: int | None = None,
        num_t_tokens: int = 4,
        num_c_tokens: int = 8,
        enable_repa: bool = False,
        repa_layer_depth: int = 8,
        z_dim: int | None = None,
        label_embed_std: float = 0.02,
        learn_time_frequencies: bool = True,
    ):
        super().__init__()
        s_patch, x_patch = body_head_pair(patch_size, "patch_size")
        if s_patch != x_patch:
            # the head is conditioned token by token on the body's patch tokens: the grids must match
            raise ValueError(f"patch_size must be the same for body and head, got {list(patch_size)}")
        body_dim, head_dim = body_head_pair(hidden_size, "hidden_size")
        body_depth, head_depth = body_head_pair(depth, "depth")
        body_heads, head_heads = body_head_pair(num_heads, "num_heads")
        if condition_type not in CONDITION_TYPES:
            raise ValueError(f"condition_type={condition_type!r} is not supported; allowed: "
                             f"{', '.join(CONDITION_TYPES)} (RAEv2's 'nwm' is not rebuilt)")
        if condition_type == "text" and not context_dim:
            raise ValueError("condition_type='text' needs context_dim (the text encoder's width), got "
                             f"{context_dim!r}")
        for name, value in (("num_t_tokens", num_t_tokens), ("num_c_tokens", num_c_tokens),
                            ("body depth", body_depth), ("head depth", head_depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, width, heads in (("body", body_dim, body_heads), ("head", head_dim, head_heads)):
            if width % heads or (width // heads) % 4:
                raise ValueError(f"{name} width {width} / {heads} heads must give a head dim that is a whole "
                                 f"multiple of 4 (axial RoPE), got {width / heads:g}")
        if enable_repa and (not z_dim or not 1 <= repa_layer_depth <= body_depth):
            raise ValueError(f"enable_repa needs z_dim >= 1 and 1 <= repa_layer_depth <= body depth {body_depth}, "
                             f"got z_dim={z_dim!r}, repa_layer_depth={repa_layer_depth}")

        self.in_channels = in_channels
        self.patch_size = s_patch
        self.condition_type = condition_type
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.num_c_tokens = num_c_tokens
        self.num_encoder_blocks = body_depth
        self.repa_layer_depth = repa_layer_depth if enable_repa else None
        self.label_embed_std = label_embed_std

        self.s_embedder = PatchEmbed(input_size, s_patch, in_channels, body_dim)
        self.x_embedder = PatchEmbed(input_size, x_patch, in_channels, head_dim)
        self.num_patches = self.s_embedder.num_patches
        self.s_projector = nn.Linear(body_dim, head_dim) if body_dim != head_dim else nn.Identity()
        self.t_embedder = FourierTimeTokens(body_dim, num_t_tokens, learn_frequencies=learn_time_frequencies)
        if condition_type == "label":
            self.ctx_embedder = LabelTokens(body_dim, num_classes, num_c_tokens)
        else:
            self.ctx_embedder = TextTokens(body_dim, context_dim)
        self.blocks = nn.ModuleList(
            [BodyBlock(body_dim, body_heads, mlp_ratio) for _ in range(body_depth)]
            + [HeadBlock(head_dim, head_heads, mlp_ratio) for _ in range(head_depth)]
        )
        self.final_layer = FinalLayer(head_dim, x_patch, in_channels)
        grid = self.s_embedder.grid_size
        self.enc_rope = AxialRoPE(body_dim // body_heads, grid, num_unrotated=num_t_tokens + num_c_tokens)
        self.dec_rope = AxialRoPE(head_dim // head_heads, grid)
        if enable_repa:
            self.repa_projector = nn.Linear(body_dim, z_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """raev2_method.md 3.7: no global init; embedders and zeros where RAEv2 sets them."""
        for embed in (self.x_embedder, self.s_embedder):
            w = embed.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(embed.proj.bias)
        if self.condition_type == "label":
            nn.init.normal_(self.ctx_embedder.embedding_table.weight, std=self.label_embed_std)
        for block in self.blocks[self.num_encoder_blocks:]:
            nn.init.zeros_(block.adaln_modulation[-1].weight)
            nn.init.zeros_(block.adaln_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        self.final_layer.zero_init()

    def transformer_blocks(self) -> list[nn.Module]:
        """Body blocks then head blocks, in execution order (for FSDP / activation checkpointing)."""
        return list(self.blocks)

    # -- inputs ---------------------------------------------------------------------------------

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],) or not t.is_floating_point():
            raise ValueError(f"t must be a float tensor [B] = [{x.shape[0]}] of flow times in [0, 1], got "
                             f"{t.dtype} of shape {tuple(t.shape)}")

    def condition_tokens(self, cond, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(condition tokens [B, n_c, D], padding mask [B, n_c] or None) for a label or text condition."""
        if self.condition_type == "label":
            if not isinstance(cond, torch.Tensor) or cond.dtype not in (torch.int64, torch.int32) \
                    or cond.shape != (batch,):
                raise ValueError(
                    "condition_type='label' takes a LongTensor of labels [B] = "
                    f"[{batch}] (null label {self.num_classes}), got {_describe(cond)}")
            return self.ctx_embedder(cond), None
        if not (isinstance(cond, (tuple, list)) and len(cond) == 2):
            raise ValueError("condition_type='text' takes a pair (context [B, Lc, context_dim], mask [B, Lc] "
                             f"or None), got {_describe(cond)}")
        context, mask = cond
        want = (batch, self.num_c_tokens, self.context_dim)
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != want:
            raise ValueError(f"text context must be [B, num_c_tokens, context_dim] = {list(want)}, got "
                             f"{_describe(context)}")
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != want[:2]):
            raise ValueError(f"text mask must be [B, num_c_tokens] = {list(want[:2])} (1 = token, 0 = pad), got "
                             f"{_describe(mask)}")
        return self.ctx_embedder(context), mask

    # -- forward --------------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, t: torch.Tensor, cond, return_intermediate: bool, base_depth: int | None):
        """(x_full, body patch tokens after block base_depth or None, REPA output or None)."""
        self._check_inputs(x, t)
        n = self.num_patches
        c_tokens, c_mask = self.condition_tokens(cond, x.shape[0])
        e_t, t_tokens = self.t_embedder(t)
        h = torch.cat([self.s_embedder(x), t_tokens, c_tokens], dim=1)
        attn_mask = None  # label conditions: nothing to mask (RAEv2 adds an all-zero mask)
        if c_mask is not None:
            attn_mask = key_padding_additive_mask(c_mask, h.shape[1] - c_mask.shape[1], h.dtype)
        base_tokens = zt = None
        for i, block in enumerate(self.blocks[: self.num_encoder_blocks], start=1):
            h = block(h, self.enc_rope, attn_mask)
            if return_intermediate and i == self.repa_layer_depth:
                zt = self.repa_projector(h[:, :n])
            if i == base_depth:
                base_tokens = h[:, :n]  # before any norm, as RAEv2
        # bridge: the head is conditioned per token on the body's patch tokens (time/cond tokens dropped)
        c = self.s_projector(F.silu(e_t + h[:, :n]))
        y = self.x_embedder(x)  # the head re-embeds the noisy latent itself
        for block in self.blocks[self.num_encoder_blocks:]:
            y = block(y, c, self.dec_rope)
        x_full = unpatchify(self.final_layer(y, c), self.patch_size, self.in_channels)
        base = None if base_tokens is None else F.silu(e_t + base_tokens)
        return x_full, base, zt

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, return_intermediate: bool = False):
        x_full, _, zt = self._run(x, t, cond, return_intermediate, base_depth=None)
        return (x_full, zt) if return_intermediate else x_full


class InContextDiTDHIG(InContextDiTDH):
    """RAEv2's ``DiTwDDTHeadIG``: also predicts x from the body's patch tokens after block
    ``base_model_depth`` (the internal-guidance "base" head) and returns ``(x_full, x_base)``;
    with ``return_intermediate=True`` ``((x_full, x_base), zt)``."""

    def __init__(self, *args, base_model_depth: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= base_model_depth <= self.num_encoder_blocks:
            raise ValueError(f"base_model_depth must be in [1, body depth {self.num_encoder_blocks}], "
                             f"got {base_model_depth}")
        self.base_model_depth = base_model_depth
        self.base_final_layer = FinalLayer(self.s_embedder.proj.out_channels, self.patch_size, self.in_channels)
        self.base_final_layer.zero_init()

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, return_intermediate: bool = False):
        x_full, base, zt = self._run(x, t, cond, return_intermediate, base_depth=self.base_model_depth)
        # the base tokens are their own adaLN condition
        x_base = unpatchify(self.base_final_layer(base, base), self.patch_size, self.in_channels)
        return ((x_full, x_base), zt) if return_intermediate else (x_full, x_base)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(_describe(v) for v in value)})"
    return type(value).__name__
