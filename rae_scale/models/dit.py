"""Stage-2 diffusion transformers: LightningDiT and DiT^DH (``DiTwDDTHead``).

Parameter names, shapes and initialisation follow the upstream RAE code (rae_method.md
section 4) so released checkpoints load with ``strict=True``. Both models take
``forward(x, t, y)`` with t the flow time in [0, 1] (t = 1 is noise) and return the
predicted velocity with the shape of x.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rae_scale.config.presets import DDT_HEAD, DIT_PRESETS  # the one table of named sizes
from rae_scale.models.layers import (
    Attention,
    GeluMlp,
    LabelEmbedder,
    PatchEmbed,
    RoPE2D,
    SwiGLUFFN,
    TimestepEmbedder,
    body_head_pair,
    make_norm,
    modulate,
    sincos_2d,
    unpatchify,
)



class DiTBlock(nn.Module):
    """adaLN-Zero transformer block; the condition is global [B, D] or per token [B, L, D]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
    ):
        super().__init__()
        self.norm1 = make_norm(hidden_size, use_rmsnorm)
        self.norm2 = make_norm(hidden_size, use_rmsnorm)
        self.attn = Attention(hidden_size, num_heads, qk_norm=use_qknorm, use_rmsnorm=use_rmsnorm)
        mlp_hidden = int(hidden_size * mlp_ratio)
        if use_swiglu:
            # upstream keeps the parameter count of a 4x GELU MLP: hidden = int(2/3 * 4D)
            self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_hidden))
        else:
            self.mlp = GeluMlp(hidden_size, mlp_hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size)
        )

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: RoPE2D | None = None) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)  # global condition: same modulation for every token
        if self.wo_shift:
            scale_a, gate_a, scale_m, gate_m = mod.chunk(4, dim=-1)
            shift_a = shift_m = None
        else:
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rope=rope)
        x = x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))
        return x


class FinalLayer(nn.Module):
    """Norm, (shift, scale) modulation without gate, then a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, use_rmsnorm: bool):
        super().__init__()
        self.norm_final = make_norm(hidden_size, use_rmsnorm)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c)
        if mod.dim() == 2:
            mod = mod.unsqueeze(1)
        shift, scale = mod.chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def _xavier_as_linear(conv: nn.Conv2d) -> None:
    w = conv.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(conv.bias)


class LightningDiT(nn.Module):
    """Plain DiT with SwiGLU, RoPE and RMSNorm (upstream ``stage2.models.lightningDiT.LightningDiT``)."""

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 768,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        label_embed_std: float = 0.02,
        learn_sigma: bool = False,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_gembed: bool = True,  # accepted for upstream-config compatibility; unused upstream too
        use_pos_embed: bool = True,  # not an upstream argument (upstream always adds it)
    ):
        super().__init__()
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.label_embed_std = label_embed_std
        grid = self.x_embedder.grid_size
        self.use_pos_embed = use_pos_embed
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = RoPE2D(hidden_size // num_heads // 2, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream init: global xavier for Linears, then the DiT special cases."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.use_pos_embed:
            self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.x_embedder.grid_size)[None])
        _xavier_as_linear(self.x_embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_embed_std)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def transformer_blocks(self) -> list[nn.Module]:
        """Every transformer block, in execution order (for FSDP / activation checkpointing)."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        if self.use_pos_embed:
            h = h + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # no extra SiLU here (unlike DiT^DH)
        for block in self.blocks:
            h = block(h, c, rope=self.feat_rope)
        out = unpatchify(self.final_layer(h, c), self.patch_size, self.out_channels)
        return out[:, : self.in_channels] if self.learn_sigma else out


class DiTwDDTHead(nn.Module):
    """DiT^DH: a DiT body plus a wide, shallow DDT head conditioned per token (section 4.3).

    ``blocks`` holds the body blocks followed by the head blocks, as upstream names them.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int | Sequence[int] = 1,
        in_channels: int = 768,
        hidden_size: Sequence[int] = (1152, 2048),
        depth: Sequence[int] = (28, 2),
        num_heads: int | Sequence[int] = (16, 16),
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        label_embed_std: float = 0.02,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        use_pos_embed: bool = True,
    ):
        super().__init__()
        patch = body_head_pair(patch_size, "patch_size")
        if patch != [1, 1]:
            # Upstream's head embedder expects C*p*p input channels, so p > 1 never ran there.
            raise ValueError(f"DiTwDDTHead supports patch_size 1 only (as upstream), got {patch_size}")
        body_dim, head_dim = body_head_pair(hidden_size, "hidden_size")
        body_depth, head_depth = body_head_pair(depth, "depth")
        body_heads, head_heads = body_head_pair(num_heads, "num_heads")
        self.in_channels = self.out_channels = in_channels
        self.num_encoder_blocks = body_depth
        self.num_decoder_blocks = head_depth
        self.use_pos_embed = use_pos_embed

        self.x_embedder = PatchEmbed(input_size, 1, in_channels, head_dim)
        self.s_embedder = PatchEmbed(input_size, 1, in_channels, body_dim)
        self.s_projector = nn.Linear(body_dim, head_dim) if body_dim != head_dim else nn.Identity()
        self.t_embedder = TimestepEmbedder(body_dim)
        self.y_embedder = LabelEmbedder(num_classes, body_dim, class_dropout_prob)
        self.label_embed_std = label_embed_std
        self.final_layer = FinalLayer(head_dim, 1, in_channels, use_rmsnorm)
        grid = self.s_embedder.grid_size
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, body_dim), requires_grad=False)
        if use_rope:
            self.enc_feat_rope = RoPE2D(body_dim // body_heads // 2, grid)
            self.dec_feat_rope = RoPE2D(head_dim // head_heads // 2, grid)
        else:
            self.enc_feat_rope = self.dec_feat_rope = None
        block_args = (mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
        self.blocks = nn.ModuleList(
            [DiTBlock(body_dim, body_heads, *block_args) for _ in range(body_depth)]
            + [DiTBlock(head_dim, head_heads, *block_args) for _ in range(head_depth)]
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Upstream DiT^DH init: no global xavier; attention/MLP keep PyTorch defaults."""
        _xavier_as_linear(self.x_embedder.proj)
        _xavier_as_linear(self.s_embedder.proj)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=self.label_embed_std)
        if self.use_pos_embed:
            self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.s_embedder.grid_size)[None])
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def transformer_blocks(self) -> list[nn.Module]:
        """Body blocks then head blocks, in execution order (for FSDP / activation checkpointing)."""
        return list(self.blocks)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_embedder(t)
        # Double SiLU on purpose: c goes through SiLU here and again inside each adaLN.
        c = F.silu(t_emb + self.y_embedder(y, self.training))
        s = self.s_embedder(x)
        if self.use_pos_embed:
            s = s + self.pos_embed
        for block in self.blocks[: self.num_encoder_blocks]:
            s = block(s, c, rope=self.enc_feat_rope)
        s = self.s_projector(F.silu(s + t_emb.unsqueeze(1)))
        h = self.x_embedder(x)  # the head re-embeds the noisy latent itself, without pos-embed
        for block in self.blocks[self.num_encoder_blocks :]:
            h = block(h, s, rope=self.dec_feat_rope)
        return unpatchify(self.final_layer(h, s), 1, self.out_channels)


def build_dit(model: str, preset: str | None = None, **kwargs) -> nn.Module:
    """Build ``"dit_dh"`` (DiTwDDTHead), ``"lightning_dit"`` or ``"dit_dh_ig"`` (RAEv2's DiT^DH-IG,
    models/dit_dh_ig.py) from a preset and/or explicit sizes.

    A preset fills hidden_size / depth / num_heads (for DiT^DH the body; the head is DDT_HEAD;
    for dit_dh_ig both, from DIT_DH_IG_PRESETS); explicit keyword arguments override it.
    """
    if preset is not None and preset not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; allowed: {sorted(DIT_PRESETS)}")
    if model == "dit_dh_ig":
        # imported here: this function is the only part of dit.py that knows the RAEv2 model
        from rae_scale.config.presets import dit_preset_sizes
        from rae_scale.models.dit_dh_ig import InContextDiTDHIG

        sizes = dit_preset_sizes(model, preset) if preset else {}
        return InContextDiTDHIG(**{**sizes, **kwargs})
    sizes = dict(DIT_PRESETS[preset]) if preset else {}
    if model == "dit_dh":
        if sizes:
            sizes = {k: [v, DDT_HEAD[k]] for k, v in sizes.items()}
        return DiTwDDTHead(**{**sizes, **kwargs})
    if model == "lightning_dit":
        return LightningDiT(**{**sizes, **kwargs})
    raise ValueError(f"unknown DiT model {model!r}; allowed: 'dit_dh', 'lightning_dit', 'dit_dh_ig'")
