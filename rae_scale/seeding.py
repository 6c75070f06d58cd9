"""Seeds for every draw that must not depend on how work is split: one mixer, per-sample seeds, named streams.

A draw keyed by (run seed, step, sample index) gives the same number whether the sample sits on
rank 0 or 1, in micro-batch 0 or 3, in a run resumed mid-way or not. The mixer is splitmix64
(Steele, Lea, Flood 2014): its finaliser decorrelates nearby integers, so seed 7 and seed 8, or
sample 41 and sample 42, give unrelated streams. Every seed formula in the package is built from it
here; the formulas themselves are fixed, because the numbers of recorded runs depend on them.
"""
from __future__ import annotations

from enum import IntEnum
from typing import Sequence

import numpy as np
import torch

GOLDEN = 0x9E3779B97F4A7C15  # splitmix64's increment: 2^64 / golden ratio
MUL1 = 0xBF58476D1CE4E5B9
MUL2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1
MASK63 = (1 << 63) - 1  # seeds stay non-negative int64 (torch.Generator.manual_seed, tensors)


# ----------------------------------------------------------------------------- the mixer


def finalize64(z: int) -> int:
    """splitmix64's output function on a 64-bit integer (the avalanche, without the increment)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MUL1) & MASK64
    z = ((z ^ (z >> 27)) * MUL2) & MASK64
    return z ^ (z >> 31)


def splitmix64(x: int) -> int:
    """One splitmix64 step: the 64-bit output for state x."""
    return finalize64(x + GOLDEN)


def mix(x: int) -> int:
    """splitmix64 cut to 63 bits: the seed mixer of the training loops."""
    return splitmix64(x) & MASK63


def finalize64_array(z: np.ndarray) -> np.ndarray:
    """finalize64 over a uint64 array (wrap-around arithmetic, as the scalar form's mask)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MUL2)
        return z ^ (z >> np.uint64(31))


def splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 over a uint64 array."""
    with np.errstate(over="ignore"):
        return finalize64_array(x + np.uint64(GOLDEN))


# ----------------------------------------------------------------------------- named streams


class Stream(IntEnum):
    """The random streams of the training loops' per-sample draws (seeded_* below).

    The values are the stream numbers recorded runs were drawn with: never renumber one. Stage 1's
    and stage 2's streams never meet in one run, so their numbers overlap (see DecoderStream).
    """

    TIME = 1            # stage 2: training time t
    NOISE = 2           # stage 2: the noise eps of x_t
    LABEL_DROP = 3      # stage 2: classifier-free-guidance label dropout


class DecoderStream(IntEnum):
    """Stage 1's per-sample draws: the noise added to the encoder's tokens (rae.noise_tau)."""

    ENCODER_NOISE_SIGMA = 1  # each sample's noise level, uniform in [0, noise_tau)
    ENCODER_NOISE = 2        # the Gaussian noise itself


class AugmentDraw(IntEnum):
    """Which DiffAug call of a stage-1 micro-batch a generator serves."""

    GENERATOR_FAKE = 0  # the generator's GAN loss on its reconstructions
    DISC_REAL = 1       # the discriminator step's real images
    DISC_FAKE = 2       # the discriminator step's reconstructions


class HashStream(IntEnum):
    """Streams of hash_uniform (rae_scale.data.transforms): data-side draws per (seed, epoch, sample id)."""

    IMAGE_FLIP = 1   # horizontal flip of an image sample
    LATENT_FLIP = 2  # which of the two cached flip variants of a latent sample


SDE_NOISE_STREAM = 1  # sample_sde's per-step noise, a sub-stream of each sample's seed (derive_seed)


# ----------------------------------------------------------------------------- seeds


def per_sample_seeds(seed: int, step: int, indices) -> list[int]:
    """One seed per sample from (run seed, optimizer step, dataset index of the sample)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.tolist()
    base = mix(mix(int(seed)) ^ int(step))
    return [mix(base ^ mix(int(i) + 1)) for i in indices]


def augment_seed(seed: int, step: int, rank: int, micro: int, draw: AugmentDraw) -> int:
    """The seed of one DiffAug call: keyed by (run seed, step, rank, micro-batch, draw), not by sample.

    DiffAug draws a batch at once from one generator, so its key is the micro-batch's place (the
    global RNG would not do: data-loader iterators draw from it, and a resumed run makes them at
    other steps).
    """
    return per_sample_seeds(seed, step, [((rank * 1024 + micro) << 2) + int(draw)])[0]


def derive_seed(seed: int, stream: int) -> int:
    """A seed for sub-stream `stream` of `seed`, so a sample's streams do not overlap."""
    return mix(seed + stream * GOLDEN)


def index_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample `index` of a generation run: a function of the global seed and index only."""
    return finalize64(seed * GOLDEN + (index + 1) * MUL1) >> 1


# ----------------------------------------------------------------------------- seeded draws


def stream_generators(seeds: Sequence[int], stream: int) -> list[torch.Generator]:
    """One CPU generator per sample for `stream`."""
    return [torch.Generator().manual_seed(mix(s ^ mix(int(stream)))) for s in seeds]


def seeded_uniform(seeds: Sequence[int], stream: int) -> torch.Tensor:
    """One float64 uniform in [0, 1) per sample."""
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in stream_generators(seeds, stream)])


def seeded_normal(seeds: Sequence[int], shape, stream: int) -> torch.Tensor:
    """A standard-normal float32 tensor of `shape` per sample: [len(seeds), *shape]."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in stream_generators(seeds, stream)])


def seeded_bernoulli(seeds: Sequence[int], p: float, stream: int) -> torch.Tensor:
    """One bool per sample, True with probability p."""
    return seeded_uniform(seeds, stream) < p
