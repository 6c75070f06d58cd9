"""MIND against a direct numpy implementation of the reference's definition (raev2_method.md section 8,
fd_evaluator mind.py) and against an analytic value."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rae_scale.eval.mind import MIND_SEED, NUM_PROJECTIONS, mind


def numpy_mind(x, y, num_projections: int = 1000, seed: int = 2020) -> float:
    """The definition written out: one CPU torch generator for the draws (subsets of the larger side,
    generated first; then float32 normal directions), everything else float64 numpy."""
    g = torch.Generator().manual_seed(seed)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    n = min(len(x), len(y))
    if len(x) > n:
        x = x[torch.randperm(len(x), generator=g)[:n].numpy()]
    if len(y) > n:
        y = y[torch.randperm(len(y), generator=g)[:n].numpy()]
    u = torch.randn(num_projections, x.shape[1], generator=g, dtype=torch.float32).numpy().astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    px = np.sort(x.astype(np.float64) @ u.T, axis=0)
    py = np.sort(y.astype(np.float64) @ u.T, axis=0)
    return float(3 * x.shape[1] * np.mean(np.mean((px - py) ** 2, axis=0)))


def photo_patches(img: np.ndarray, p: int = 4, step: int = 5) -> np.ndarray:
    h, w, _ = img.shape
    return np.stack([img[i:i + p, j:j + p].ravel() for i in range(0, h - p, step)
                     for j in range(0, w - p, step)]).astype(np.float32) / 255


@pytest.mark.parametrize("n_x, n_y, seed", [(400, 250, MIND_SEED), (250, 400, 7)])  # subset of x / of y
def test_mind_matches_numpy_definition(n_x, n_y, seed):
    from skimage import data

    rng = np.random.default_rng(n_x + n_y)
    a, b = photo_patches(data.astronaut()[::2, ::2]), photo_patches(data.coffee()[::2, ::2])
    x, y = a[rng.permutation(len(a))[:n_x]], b[rng.permutation(len(b))[:n_y]]  # 48-d real-image features
    ours = mind(x, y, seed=seed)
    assert (MIND_SEED, NUM_PROJECTIONS) == (2020, 1000)  # the reference's defaults
    ref = numpy_mind(x, y, seed=seed)  # the directions are keyed by the seed
    assert ref > 1e-3 and ours == pytest.approx(ref, rel=1e-6)
    if seed == MIND_SEED:  # chunking the directions changes nothing; torch tensors are accepted as they are
        assert mind(torch.from_numpy(x), y, chunk=7) == pytest.approx(ours, rel=1e-12)


def test_mind_of_a_shifted_set_is_the_analytic_value():
    """Y = X + c: every sorted projection moves by u.c, so MIND = 3 d mean_u (u.c)^2 exactly."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((200, 16)).astype(np.float32)
    c = np.linspace(-1, 1, 16).astype(np.float32)
    g = torch.Generator().manual_seed(11)
    u = torch.randn(500, 16, generator=g, dtype=torch.float32)
    u = (u / u.norm(dim=1, keepdim=True)).double().numpy()
    expect = 3 * 16 * np.mean((u @ c.astype(np.float64)) ** 2)
    assert mind(x, x + c, num_projections=500, seed=11) == pytest.approx(expect, rel=1e-5)
    assert mind(x, x) == 0.0


def test_mind_rejects_bad_input():
    with pytest.raises(ValueError, match="one width"):
        mind(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least one"):
        mind(np.zeros((0, 3)), np.zeros((4, 3)))
