"""MIND: a sliced Wasserstein-2 distance between generated and reference features (one value per space).

Definition as fd_evaluator's mind.py (raev2_method.md section 8): with one CPU torch.Generator
seeded `seed`, equal counts by a random subset of the larger side (generated first, then reference),
then `num_projections` standard-normal directions of float32 normalised to unit length; project both
sets, sort each projection, and take 3 d times the mean over directions of the mean squared
difference of the sorted values. The draws match fd_evaluator's; the arithmetic here is float64
(fd_evaluator's is float32), so values agree to float32 rounding, not bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

MIND_SEED = 2020
NUM_PROJECTIONS = 1000


def mind_directions(generator: torch.Generator, num_projections: int, dim: int) -> torch.Tensor:
    """Unit directions [P, d] drawn as fd_evaluator draws them (float32 normal, then normalised)."""
    u = torch.randn(num_projections, dim, generator=generator, dtype=torch.float32)
    return u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mind(generated, reference, *, num_projections: int = NUM_PROJECTIONS, seed: int = MIND_SEED,
         device="cpu", chunk: int = 250) -> float:
    """MIND between generated features [N, d] and reference features [M, d] (float64 arithmetic).

    Directions are processed `chunk` at a time, so memory stays at N x chunk per side."""
    x = torch.as_tensor(np.asarray(generated) if not torch.is_tensor(generated) else generated)
    y = torch.as_tensor(np.asarray(reference) if not torch.is_tensor(reference) else reference)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"MIND needs feature matrices of one width, got {tuple(x.shape)} and {tuple(y.shape)}")
    if min(x.shape[0], y.shape[0]) < 1:
        raise ValueError("MIND needs at least one feature vector on each side")
    # fd_evaluator casts both sides to float32 before anything else
    x, y = x.detach().cpu().float(), y.detach().cpu().float()
    g = torch.Generator(device="cpu").manual_seed(seed)
    n = min(x.shape[0], y.shape[0])
    if x.shape[0] > n:
        x = x[torch.randperm(x.shape[0], generator=g)[:n]]
    if y.shape[0] > n:
        y = y[torch.randperm(y.shape[0], generator=g)[:n]]
    u = mind_directions(g, num_projections, x.shape[1]).double().to(device)
    x, y = x.double().to(device), y.double().to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, num_projections, chunk):
        uc = u[start:start + chunk].T
        px, _ = (x @ uc).sort(dim=0)
        py, _ = (y @ uc).sort(dim=0)
        total += ((px - py) ** 2).mean(dim=0).sum()
    return float(3 * x.shape[1] * total / num_projections)
