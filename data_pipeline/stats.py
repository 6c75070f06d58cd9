"""`rae-scale stats`: exact per-position mean and variance [C,H,W] of encoder latents, in float64.

Each shard gives (count, mean, M2) computed in memory with two passes; the driver merges the shard
results in shard order with Chan et al.'s pairwise update. The merge order never depends on which
worker computed which shard, so the numbers are bit-identical for any worker count.

These are RAEv2's statistics (raev2_method.md 1.5: per-(C,H,W) mean and population variance in
float64, its latents normalised as (z - mean) / sqrt(var + 1e-5), models.rae.LATENT_EPS); RAE's
upstream used a momentum (EMA) estimate instead (rae_method.md section 3). Beside our safetensors file
we write ``<stem>.pt`` = ``{"mean", "var"}`` as float32 (C,H,W) plain tensors, the ``stats.pt`` that
RAEv2's ``normalization_stat_path`` (and upstream RAE's) reads. RAEv2 takes them over the plain
(unflipped) training images: kind="images", or kind="latents" with ``both_variants=False``.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from rae_scale import storage
from rae_scale.data import schema
from rae_scale.data.latents import save_stats
from rae_scale.data.mds import read_index

from .cache_latents import ShardWorker, run_calls

logger = logging.getLogger(__name__)


def chan_merge(a, b):
    """Merge two (count, mean, M2) triples (Chan, Golub, LeVeque 1979)."""
    na, ma, m2a = a
    nb, mb, m2b = b
    if na == 0:
        return b
    n = na + nb
    delta = mb - ma
    mean = ma + delta * (nb / n)
    m2 = m2a + m2b + delta * delta * (na * nb / n)
    return n, mean, m2


def run_stats(*, input: str, kind: str = "latents", encoder_factory=None, num_workers: int = 2,
              output_path: str | None = None, upstream_format: bool = True, batch_size: int = 64,
              both_variants: bool = True, ray_address: str | None = None) -> dict:
    """Mean and population variance per latent position over every sample of ``input``.

    kind="latents": a `cache-latents` folder (both cached flip variants count as samples when
    ``both_variants``, the distribution stage 2 trains on); kind="images": an MDS image dataset
    encoded with ``encoder_factory``. ``num_workers`` actors (0: in this process, no Ray).
    Writes ``output_path`` (our safetensors file) and, with ``upstream_format``, ``<stem>.pt``
    holding upstream's {"mean", "var"}. Returns {"mean", "var" (float64 tensors), "count"}.
    """
    if kind not in ("latents", "images"):
        raise ValueError(f"kind must be 'latents' or 'images', got {kind!r}")
    if kind == "images" and encoder_factory is None:
        raise ValueError("kind='images' needs encoder_factory (a zero-argument callable returning the encoder)")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if output_path and output_path.endswith(".pt"):
        raise ValueError(f"output_path {output_path!r} is our stats file: name it *.safetensors; the "
                         "upstream {'mean','var'} .pt is written beside it")
    if kind == "latents":
        both_variants = both_variants and bool(schema.read_json(storage.join(input, schema.LATENT_META))["both_flips"])
    shards = read_index(input)
    calls = [("stats_shard", (input, s, kind, batch_size, both_variants)) for s in shards]
    factory = encoder_factory if kind == "images" else None
    parts = run_calls(ShardWorker, (factory,), calls, "stats", num_workers=num_workers, ray_address=ray_address)
    total = (0, None, None)
    for part in parts:  # fixed shard order -> identical result for any worker count
        total = chan_merge(total, part)
    n, mean, m2 = total
    mean_t = torch.from_numpy(np.asarray(mean, dtype=np.float64))
    var_t = torch.from_numpy(np.asarray(m2, dtype=np.float64) / n)
    if output_path:
        upstream = None
        if upstream_format:
            stem = output_path[: -len(".safetensors")] if output_path.endswith(".safetensors") else output_path
            upstream = f"{stem}.pt"
        save_stats(output_path, mean_t, var_t, n, upstream_url=upstream)
        logger.info("stats over %d latents written to %s%s", n, output_path,
                    f" and {upstream}" if upstream else "")
    return {"mean": mean_t, "var": var_t, "count": int(n)}
