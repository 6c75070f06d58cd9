"""Image transforms shared by the shard writer and the readers.

The ADM center crop is the preprocessing of guided-diffusion (rae_method.md section 11): halve with
a BOX filter while the short side is at least twice the target, resize the short side to the target
with BICUBIC, then cut the central square. Random flips are drawn from a hash of
(seed, epoch, sample id) instead of a stateful RNG, so a resumed or re-partitioned run flips exactly
the samples the uninterrupted run would have flipped.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rae_scale.seeding import MUL1, MUL2, HashStream, splitmix64_array

__all__ = ["adm_center_crop", "flip_mask", "hash_uniform"]


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Return the ``size`` x ``size`` ADM center crop of an RGB PIL image (upsamples small ones)."""
    if size <= 0:
        raise ValueError(f"crop size must be positive, got {size}")
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return Image.fromarray(arr[top:top + size, left:left + size])


_M1, _M2 = np.uint64(MUL1), np.uint64(MUL2)  # spread (seed, epoch) over the key


def hash_uniform(seed: int, epoch: int, sample_ids, stream: int = 0) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, epoch, stream, sample id)."""
    ids = np.asarray(sample_ids, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = splitmix64_array(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) * _M1 + np.uint64(epoch) * _M2 + np.uint64(stream))
        h = splitmix64_array(ids ^ key)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def flip_mask(seed: int, epoch: int, sample_ids, stream: HashStream = HashStream.IMAGE_FLIP) -> torch.Tensor:
    """Bool tensor: which samples get a horizontal flip (probability 1/2 each). stream LATENT_FLIP gives
    the choice a latent cache with both flips makes, for images encoded online."""
    return torch.from_numpy(hash_uniform(seed, epoch, sample_ids, stream=stream) < 0.5)
