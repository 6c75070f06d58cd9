"""Tiny random-weight transformers releases of the five non-Inception feature spaces, saved with
save_pretrained in the layout of the real ones (full CLIP / SigLIP models with a text tower), and
real photographs to featurise."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

LAYERS = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=16, hidden_size=8)


def _models(space: str):
    import transformers as tf

    text = dict(vocab_size=64, max_position_embeddings=16, **LAYERS)
    if space == "convnext":
        return tf.ConvNextV2Model(tf.ConvNextV2Config(num_stages=2, hidden_sizes=[4, 8], depths=[1, 1]))
    if space == "dinov2":  # native grid 19 x 19 = the 256 px input padded to 266
        return tf.Dinov2Model(tf.Dinov2Config(image_size=266, patch_size=14, mlp_ratio=2, **LAYERS))
    if space == "mae":
        return tf.ViTMAEModel(tf.ViTMAEConfig(image_size=224, patch_size=16, **LAYERS))
    if space == "siglip":
        return tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=dict(image_size=224, patch_size=16,
                                                                                   **LAYERS)))
    if space == "clip":  # native grid 16 x 16: the 19 x 19 of 256 px (padded) is resampled
        return tf.CLIPModel(tf.CLIPConfig(text_config=text, projection_dim=8,
                                          vision_config=dict(image_size=224, patch_size=14, **LAYERS)))
    raise ValueError(space)


def save_tiny_extractors(folder, spaces=("convnext", "dinov2", "mae", "siglip", "clip"), seed: int = 0) -> Path:
    """<folder>/<space>/ (config.json + model.safetensors) for each space; weights random but fixed."""
    folder = Path(folder)
    for i, space in enumerate(spaces):
        torch.manual_seed(seed + i)
        model = _models(space)
        with torch.no_grad():  # default inits leave LayerNorms at identity and biases at 0: perturb all
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(folder / space)
    return folder


def photo_crops(n: int, offset: int = 0, size: int = 256) -> np.ndarray:
    """uint8 NHWC size x size crops of scikit-image's photographs (distinct per (i, offset))."""
    from skimage import data

    src = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        img = src[(i + offset) % len(src)]
        h, w = img.shape[:2]
        k = i // len(src) + 3 * offset
        y, x = (37 * k) % (h - size), (53 * k + 11 * offset) % (w - size)
        out.append(img[y:y + size, x:x + size])
    return np.stack(out)
