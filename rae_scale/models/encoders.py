"""Frozen representation encoders (DINOv2-with-registers, DINOv3, SigLIP2, MAE) on HF transformers.

Each wrapper takes images in [0, 1], resizes them (bicubic) to the encoder's input size,
applies the encoder's own mean/std and returns the patch tokens [B, N, C] of the last
layer, after a final LayerNorm whose affine parameters are removed (rae_method.md 1.2).

With ``layers`` (0-based block indices) the latent is RAEv2's multi-layer one (raev2_method.md
1.4): each selected block's output through that same non-affine norm, CLS/registers dropped, the
mean over the K blocks, plus for DINOv3 and SigLIP2 the token-mean of the deepest selected block
broadcast to every token. K = 1 is the plain single-block latent (no extra term).
transformers is imported lazily so that importing rae_scale.models stays cheap.
"""
from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager

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
    # RAEv2's DINOv3-L/16 at 256 px; RoPE positions, so image_size only sets the config's nominal grid
    "dinov3": {"patch_size": 16, "input_size": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224},
    "siglip2": {"patch_size": 16, "input_size": 256, "mean": (0.5,) * 3, "std": (0.5,) * 3, "image_size": 256},
    "mae": {"patch_size": 16, "input_size": 256, "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "image_size": 224},
}


# Kinds that take `layers`, and whether their multi-layer latent adds the deepest block's token-mean
# (RAEv2: DINOv3-MLS and SigLIP2-MLS add it, DINOv2-MLS is the plain mean; vision_encoder.py:333-500).
MULTI_LAYER_POOLED = {"dinov3": True, "dinov2": False, "siglip2": True}


def _final_norm(kind: str, model: nn.Module) -> nn.LayerNorm:
    if kind == "siglip2":
        return model.vision_model.post_layernorm
    return model.norm if kind == "dinov3" else model.layernorm


def _blocks(kind: str, model: nn.Module) -> nn.ModuleList:
    """The transformer blocks in order; block i's output is what `layers` index i selects."""
    if kind == "dinov3":
        return model.layer
    if kind == "siglip2":
        return model.vision_model.encoder.layers
    return model.encoder.layer


def _prefix_tokens(kind: str, model: nn.Module) -> int:
    """Tokens before the patch tokens: CLS + registers (DINO), CLS (MAE), none (SigLIP2)."""
    if kind in ("dinov2", "dinov3"):
        return 1 + model.config.num_register_tokens
    return 1 if kind == "mae" else 0


def check_layers(kind: str, layers, num_blocks: int) -> list[int] | None:
    """`layers` as sorted block indices (RAEv2 collects them in block order); a one-line error otherwise."""
    if layers is None:
        return None
    if kind not in MULTI_LAYER_POOLED:
        raise ValueError(f"encoder kind {kind!r} has no multi-layer latent; 'layers' is allowed for "
                         f"{sorted(MULTI_LAYER_POOLED)}")
    layers = list(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < num_blocks]
    if not layers or bad:
        raise ValueError(f"encoder layers {layers}: unknown layer index {bad[0] if bad else '(empty list)'}; "
                         f"allowed: a non-empty list of block indices 0..{num_blocks - 1} (0-based, {num_blocks} "
                         "blocks)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"encoder layers {layers} repeat an index; allowed: distinct block indices "
                         f"0..{num_blocks - 1}")
    return sorted(layers)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens [B, N, C] on a square grid -> latent [B, C, h, w] (token n = row * w + col)."""
    b, n, c = tokens.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"{n} tokens do not form a square grid")
    return tokens.transpose(1, 2).reshape(b, c, side, side)


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
        layers: list[int] | None = None,
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
        self.layers = check_layers(kind, layers, len(_blocks(kind, model)))
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
        if self.layers is not None:
            return self._multi_layer(x)
        if self.kind in ("dinov2", "dinov3"):
            out = self.model(pixel_values=x).last_hidden_state
            return out[:, 1 + self.model.config.num_register_tokens :]  # drop CLS + registers
        if self.kind == "siglip2":
            return self.model(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        # MAE: mask ratio 0 and noise 0..N-1 keep every patch in its original order.
        n = (x.shape[-2] // self.patch_size) * (x.shape[-1] // self.patch_size)
        noise = torch.arange(n, device=x.device, dtype=x.dtype).expand(x.shape[0], n)
        out = self.model(pixel_values=x, noise=noise, interpolate_pos_encoding=True).last_hidden_state
        return out[:, 1:]

    def _multi_layer(self, x: torch.Tensor) -> torch.Tensor:
        """RAEv2's multi-layer latent from the selected blocks' outputs (caught by one-call hooks)."""
        outputs: dict[int, torch.Tensor] = {}
        blocks = _blocks(self.kind, self.model)

        def keep(index):
            def hook(_module, _args, out):
                outputs[index] = out[0] if isinstance(out, tuple) else out
            return hook

        handles = [blocks[i].register_forward_hook(keep(i)) for i in self.layers]
        try:
            if self.kind == "siglip2":
                self.model(pixel_values=x, interpolate_pos_encoding=True)
            else:
                self.model(pixel_values=x)
        finally:
            for h in handles:
                h.remove()
        norm, skip = _final_norm(self.kind, self.model), _prefix_tokens(self.kind, self.model)
        normed = [norm(outputs[i])[:, skip:] for i in self.layers]  # per-token norm: dropping first is the same
        if len(normed) == 1:
            return normed[0]
        z = torch.stack(normed).mean(0)
        if MULTI_LAYER_POOLED[self.kind]:
            z = z + normed[-1].mean(1, keepdim=True)
        return z


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
    if kind == "dinov3":  # 4 registers and no key bias, as the released models
        return tf.DINOv3ViTConfig(intermediate_size=intermediate_size, num_register_tokens=4, **common)
    return tf.ViTMAEConfig(intermediate_size=intermediate_size, mask_ratio=0.0, **common)


def _hf_class(kind: str):
    import transformers as tf

    return {"dinov2": tf.Dinov2WithRegistersModel, "dinov3": tf.DINOv3ViTModel, "siglip2": tf.SiglipVisionModel,
            "mae": tf.ViTMAEModel}[kind]


@contextmanager
def _quiet_transformers():
    """transformers' loading chatter at ERROR for one load, then its verbosity as it was.

    Loading a frozen encoder from a full checkpoint prints "Some weights of ... were not initialized
    ... You should probably TRAIN this model" (heads we never use) and image-processor notices; both
    mislead here. What matters among the missing weights is checked in _load_pretrained instead.
    """
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


# Weights a frozen encoder may lack: the pooling head and the mask token, which forward() never uses, and
# the final norm's affine, which FrozenEncoder removes (so folders saved from a FrozenEncoder lack it).
_UNUSED_WEIGHTS = re.compile(r"(^|\.)(pooler|head|mask_token)(\.|$)"
                             r"|(^|\.)(norm|layernorm|post_layernorm)\.(weight|bias)$")


def _load_pretrained(kind: str, pretrained: str, **kwargs) -> nn.Module:
    with _quiet_transformers():
        model, info = _hf_class(kind).from_pretrained(pretrained, output_loading_info=True, **kwargs)
    missing = [k for k in info.get("missing_keys", ()) if not _UNUSED_WEIGHTS.search(k)]
    if missing:  # a checkpoint of another model: these layers are random, the latents are not the encoder's
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        logger.warning("%s encoder from %s lacks %d weight(s) it uses, left random: %s", kind, pretrained,
                       len(missing), shown)
    if info.get("unexpected_keys"):
        logger.debug("%s encoder from %s: %d checkpoint weight(s) not used (heads, decoder, text tower)",
                     kind, pretrained, len(info["unexpected_keys"]))
    return model


def image_stats(kind: str, pretrained: str | None = None) -> tuple[tuple, tuple]:
    """(mean, std) the encoder standardises pixels with, found without building it: a local folder's
    preprocessor_config.json or the kind's defaults need no transformers import (a decoding-only RAE)."""
    if kind not in ENCODER_DEFAULTS:
        raise ValueError(f"unknown encoder kind {kind!r}; allowed: {sorted(ENCODER_DEFAULTS)}")
    return _processor_stats(pretrained, kind) if pretrained else _kind_stats(kind)


def _kind_stats(kind: str) -> tuple[tuple, tuple]:
    """The kind's default (mean, std): what its released image processors carry."""
    return ENCODER_DEFAULTS[kind]["mean"], ENCODER_DEFAULTS[kind]["std"]


def _processor_stats(pretrained: str, kind: str) -> tuple[tuple, tuple]:
    if os.path.isdir(pretrained):
        path = os.path.join(pretrained, "preprocessor_config.json")
        saved = {}
        if os.path.exists(path):
            with open(path) as fh:
                saved = json.load(fh)
        if "image_mean" in saved and "image_std" in saved:
            return tuple(saved["image_mean"]), tuple(saved["image_std"])
        if not saved:  # no image processor saved: the kind's defaults, as below
            return _kind_stats(kind)
    try:
        from transformers import AutoImageProcessor

        with _quiet_transformers():
            proc = AutoImageProcessor.from_pretrained(pretrained)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, AttributeError) as exc:  # no preprocessor_config.json in the folder
        # the kind's defaults are the statistics its released processors carry
        logger.debug("no image processor at %s (%s); using %s defaults", pretrained, exc, kind)
        return _kind_stats(kind)


def build_encoder(
    kind: str,
    *,
    pretrained: str | None = None,
    model: nn.Module | None = None,
    layers: list[int] | None = None,
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
    """Build a frozen ``"dinov2"`` | ``"dinov3"`` | ``"siglip2"`` | ``"mae"`` encoder.

    With ``pretrained`` (a hub name or local folder) weights and sizes come from
    ``from_pretrained``; with ``model`` an already built transformers model of the kind is wrapped
    (e.g. one converted from Meta's original DINOv3 checkpoint by rae_scale.interop); otherwise the
    encoder is built with random weights from the sizes.

    Args:
        layers: 0-based block indices of RAEv2's multi-layer latent (dinov2, dinov3, siglip2);
            None is the last block's plain latent.
        input_size: encoder input resolution (default 224 for DINOv2, 256 otherwise).
        intermediate_size: MLP width (default 4 * hidden_size).
        image_size: resolution of the learned position grid (default as the released models).
    """
    if kind not in ENCODER_DEFAULTS:
        raise ValueError(f"unknown encoder kind {kind!r}; allowed: {sorted(ENCODER_DEFAULTS)}")
    if layers is not None and kind not in MULTI_LAYER_POOLED:  # before any weights are read
        check_layers(kind, layers, 0)
    defaults = ENCODER_DEFAULTS[kind]
    mean, std = _kind_stats(kind)
    if model is not None:
        if pretrained is not None:
            raise ValueError("build_encoder takes either pretrained or model, not both")
    elif pretrained is not None:
        kwargs = {"mask_ratio": 0.0} if kind == "mae" else {}
        model = _load_pretrained(kind, pretrained, **kwargs)
        mean, std = _processor_stats(pretrained, kind)
    else:
        config = _hf_config(
            kind, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
            patch_size=patch_size or defaults["patch_size"],
            intermediate_size=intermediate_size or 4 * hidden_size,
            image_size=image_size or defaults["image_size"],
        )
        model = _hf_class(kind)(config)
    return FrozenEncoder(
        kind, model,
        input_size=input_size or defaults["input_size"],
        image_mean=tuple(image_mean or mean), image_std=tuple(image_std or std), layers=layers,
    )
