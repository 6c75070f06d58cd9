"""Reconstruction metrics of a stage-1 model over a dataset: rFID, PSNR and SSIM.

Originals and reconstructions are both quantised to uint8 (as saved images would be); their Inception
pool moments accumulate exactly across ranks (see metrics.MomentAccumulator), PSNR and SSIM are
averaged per image. rFID compares reconstructions with the originals of the same images unless a
reference (ADM npz or folder) is given.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import torch

from rae_scale.eval.inception import InceptionFeatures, build_inception
from rae_scale.eval.metrics import MomentAccumulator, frechet_distance, psnr, ssim

logger = logging.getLogger(__name__)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def evaluate_reconstruction(batches: Iterable, reconstruct: Callable[[torch.Tensor], torch.Tensor], *,
                            num_samples: int | None = None, reference=None, rank: int = 0, world_size: int = 1,
                            inception: InceptionFeatures | None = None, results_path: str | None = None) -> dict:
    """Score reconstruct(x) against x over (images in [0,1], labels) batches; same dict on every rank."""
    import torch.distributed as dist

    inception = inception or build_inception()
    real, fake = MomentAccumulator(2048), MomentAccumulator(2048)
    sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, count
    limit = None if num_samples is None else -(-num_samples // world_size)
    seen = 0
    for batch in batches:
        x = batch[0]
        if limit is not None and seen >= limit:
            break
        if limit is not None:
            x = x[: limit - seen]
        x8, r8 = _to_uint8(x), _to_uint8(reconstruct(x).cpu())
        real.update(inception(x8)["pool"].double())
        fake.update(inception(r8)["pool"].double())
        sums += torch.tensor([psnr(x8.double(), r8.double()).sum().item(),
                              ssim(x8.double(), r8.double()).sum().item(), len(x8)], dtype=torch.float64)
        seen += len(x8)
    if dist.is_available() and dist.is_initialized() and world_size > 1:
        real.all_reduce()
        fake.all_reduce()
        dist.all_reduce(sums)
    if reference is not None:
        from rae_scale.eval.reference import load_reference

        ref = load_reference(reference, inception=inception)
        ref_mu, ref_sigma = ref.mu, ref.sigma
    else:
        ref_mu, ref_sigma = real.stats()
    rfid = frechet_distance(*fake.stats(), ref_mu, ref_sigma)
    n = int(sums[2].item())
    metrics = {"rfid": rfid, "psnr": float(sums[0] / n), "ssim": float(sums[1] / n), "num_samples": n}
    if rank == 0:
        logger.info("reconstruction: %s", metrics)
        if results_path:
            Path(results_path).parent.mkdir(parents=True, exist_ok=True)
            Path(results_path).write_text(json.dumps({"metrics": metrics}, indent=1))
    return metrics
