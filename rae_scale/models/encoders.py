"""Frozen representation encoders (DINOv2-with-registers, SigLIP2, MAE) on HF transformers.

Each wrapper takes images in [0, 1], resizes them (bicubic) to the encoder's input size,
applies the encoder's own mean/std and returns the patch tokens [B, N, C] of the last
layer, after a final LayerNorm whose affine parameters are removed (rae_method.md 1.2).
transformers is imported lazily so that importing rae_scale.models stays cheap.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Per-kind defaults: patch size, encoder input size, pixel statistics, and the size of the
# HF model's learned position grid (image_size), which the released checkpoints use.
ENCODER_DEFAULTS: dict[str, dict] = {
    "dinov2": {"patch_size": 14, "input_size": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 518},
    "siglip2": {"patch_size": 16, "input_size": 256, "mean": (0.5,) * 3, "std": (0.5,) * 3, "image_size": 256},
    "mae": {"patch_size": 16, "input_size": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224},
}


def _final_norm(kind: str, model: nn.Module) -> nn.LayerNorm:
    return model.vision_model.post_layernorm if kind == "siglip2" else model.layernorm


class FrozenEncoder(nn.Module):
    """A frozen HF vision transformer that maps images in [0, 1] to latent tokens [B, N, C].

    Always in eval mode with requires_grad off; ``forward`` runs without autograd.
    """

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        *,
        input_size: int,
        image_mean: tuple[float, ...],
        image_std: tuple[float, ...],
    ):
        super().__init__()
        cfg = model.config
        if input_size % cfg.patch_size:
            raise ValueError(f"input_size {input_size} must be a multiple of the patch size {cfg.patch_size}")
        self.kind = kind
        self.model = model
        self.hidden_size = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.input_size = input_size
        # Non-persistent: they come from the encoder's image processor, not from training.
        self.register_buffer("image_mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        norm = _final_norm(kind, model)
        # RAE uses the final LayerNorm without affine: each token is standardised over channels.
        norm.weight = None
        norm.bias = None
        model.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        """Ignore mode: the encoder is frozen and always evaluates in eval mode."""
        return super().train(False)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """Shape [C, H, W] of one latent."""
        return (self.hidden_size, self.grid_size, self.grid_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Bicubic resize to the encoder size (no antialias), then the encoder's standardisation."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return (x - self.image_mean.to(x.dtype)) / self.image_std.to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        if self.kind == "dinov2":
            out = self.model(pixel_values=x).last_hidden_state
            return out[:, 1 + self.model.config.num_register_tokens :]  # drop CLS + registers
        if self.kind == "siglip2":
            return self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        # MAE: mask ratio 0 and noise 0..N-1 keep every patch in its original order.
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        noise = torch.arange(n, device=x.device, dtype=x.dtype).expand(x.shape[0], n)
        out = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        return out[:, 1:]


def _hf_config(kind: str, *, hidden_size, num_layers, num_heads, patch_size, intermediate_size, image_size):
    import transformers as tf

    common = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        patch_size=patch_size, image_size=image_size,
    )
    if kind == "dinov2":
        return tf.Dinov2WithRegistersConfig(mlp_ratio=intermediate_size / hidden_size, **common)
    if kind == "siglip2":
        return tf.SiglipVisionConfig(intermediate_size=intermediate_size, **common)
    return tf.ViTMAEConfig(intermediate_size=intermediate_size, mask_ratio=0.0, **common)


def _hf_class(kind: str):
    import transformers as tf

    return {"dinov2": tf.Dinov2WithRegistersModel, "siglip2": tf.SiglipVisionModel, "mae": tf.ViTMAEModel}[kind]


def _processor_stats(pretrained: str, kind: str) -> tuple[tuple, tuple]:
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(pretrained)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError) as exc:  # no preprocessor_config.json in the folder
        logger.warning("no image processor at %s (%s); using %s defaults", pretrained, exc, kind)
        return ENCODER_DEFAULTS[kind]["mean"], ENCODER_DEFAULTS[kind]["std"]


def build_encoder(
    kind: str,
    *,
    pretrained: str | None = None,
    hidden_size: int = 768,
    num_layers: int = 12,
    num_heads: int = 12,
    patch_size: int | None = None,
    input_size: int | None = None,
    intermediate_size: int | None = None,
    image_size: int | None = None,
    image_mean: tuple[float, ...] | None = None,
    image_std: tuple[float, ...] | None = None,
) -> FrozenEncoder:
    """Build a frozen ``"dinov2"`` | ``"siglip2"`` | ``"mae"`` encoder.

    With ``pretrained`` (a hub name or local folder) weights and sizes come from
    ``from_pretrained``; otherwise the encoder is built with random weights from the sizes.

    Args:
        input_size: encoder input resolution (default 224 for DINOv2, 256 otherwise).
        intermediate_size: MLP width (default 4 * hidden_size).
        image_size: resolution of the learned position grid (default as the released models).
    """
    if kind not in ENCODER_DEFAULTS:
        raise ValueError(f"unknown encoder kind {kind!r}; allowed: {sorted(ENCODER_DEFAULTS)}")
    defaults = ENCODER_DEFAULTS[kind]
    if pretrained is not None:
        kwargs = {"mask_ratio": 0.0} if kind == "mae" else {}
        model = _hf_class(kind).from_pretrained(pretrained, **kwargs)
        mean, std = _processor_stats(pretrained, kind)
    else:
        config = _hf_config(
            kind, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            patch_size=patch_size or defaults["patch_size"],
            intermediate_size=intermediate_size or 4 * hidden_size,
            image_size=image_size or defaults["image_size"],
        )
        model = _hf_class(kind)(config)
        mean, std = defaults["mean"], defaults["std"]
    return FrozenEncoder(
        kind, model,
        input_size=input_size or defaults["input_size"],
        image_mean=tuple(image_mean or mean), image_std=tuple(image_std or std),
    )
