"""Metrics against independent computations: scipy sqrtm, numpy cov, brute-force k-NN, scikit-image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from rae_scale.eval.metrics import (MomentAccumulator, frechet_distance, frechet_distance_scipy,
                                    inception_score, precision_recall, psnr, ssim)


def relu_features(rng, n, d, shift):
    w = rng.standard_normal((d, d)) / np.sqrt(d)
    return np.maximum(rng.standard_normal((n, d)) @ w + shift, 0)


def stats(x):
    return x.mean(0), np.cov(x, rowvar=False)


def patch_features(img: np.ndarray, p: int = 4, step: int = 3) -> np.ndarray:
    """Real-image statistics: flattened p x p x 3 patches of a photo."""
    h, w, _ = img.shape
    return np.stack([img[i:i + p, j:j + p].ravel() for i in range(0, h - p, step)
                     for j in range(0, w - p, step)]).astype(np.float64) / 255


@pytest.mark.parametrize("n1,n2", [(600, 700), (40, 700)])  # full rank, and rank-deficient sigma1
def test_frechet_matches_scipy_sqrtm_on_random_stats(n1, n2):
    rng = np.random.default_rng(n1)
    a, b = stats(relu_features(rng, n1, 128, 0.1)), stats(relu_features(rng, n2, 128, 0.3))
    ours, ref = frechet_distance(*a, *b), frechet_distance_scipy(*a, *b)
    assert ours == pytest.approx(ref, rel=1e-6)


def test_frechet_matches_scipy_sqrtm_on_real_image_stats():
    from skimage import data

    a = stats(patch_features(data.astronaut()[::2, ::2]))
    b = stats(patch_features(data.chelsea()))
    ours, ref = frechet_distance(*a, *b), frechet_distance_scipy(*a, *b)
    assert ref > 0.1 and ours == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


def test_moments_match_numpy_and_merge_exactly():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(relu_features(rng, 301, 32, 0.2)).float()
    chunks = [x[:100], x[100:150], x[150:]]
    accs = []
    for c in chunks:
        acc = MomentAccumulator(32)
        acc.update(c)
        accs.append(acc)
    mu, sigma = stats(x.double().numpy())
    forward = MomentAccumulator(32).merge(accs[0]).merge(accs[1]).merge(accs[2])
    backward = MomentAccumulator(32).merge(accs[2]).merge(accs[0]).merge(accs[1])
    assert forward.count == 301
    assert torch.equal(forward.outer, backward.outer) and torch.equal(forward.sum, backward.sum)
    m, s = forward.stats()
    np.testing.assert_allclose(m, mu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(s, sigma, rtol=0, atol=1e-9)
    restored = MomentAccumulator.from_state_dict(forward.state_dict())
    assert torch.equal(restored.outer, forward.outer) and restored.count == 301
    with pytest.raises(ValueError, match="features"):
        forward.update(torch.zeros(3, 31))
    with pytest.raises(OverflowError):
        MomentAccumulator(2).update(torch.full((2, 2), 1e12))


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """guided-diffusion evaluator's formula, float64 numpy."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((1200, 50)) * 4
    assert inception_score(logits, split_size=500, shuffle_seed=None) == pytest.approx(
        adm_inception_score(logits, 500), rel=1e-10)
    # a second library: torch-fidelity's IS of the same 1008 logits (its splits are N / splits rows each)
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, isc_features_to_metric

    logits_1008 = torch.from_numpy(rng.standard_normal((2000, 1008)) * 3)
    theirs = isc_features_to_metric(logits_1008, splits=4, shuffle=False)[KEY_METRIC_ISC_MEAN]
    assert inception_score(logits_1008, split_size=500, shuffle_seed=None) == pytest.approx(theirs, rel=1e-10)
    # analytic: confident and uniform over C classes -> C; uninformative -> 1
    confident = np.eye(10)[np.arange(1000) % 10] * 60
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(np.zeros((100, 10))) == pytest.approx(1.0)
    # shuffling protects a class-sorted order from a collapsed score (guided-diffusion#165)
    sorted_logits = np.eye(10)[np.repeat(np.arange(10), 100)] * 60
    assert inception_score(sorted_logits, split_size=100, shuffle_seed=None) == pytest.approx(1.0, rel=1e-6)
    assert inception_score(sorted_logits, split_size=100) > 8


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 16)).astype(np.float32)
    fake = (rng.standard_normal((250, 16)) * 1.3 + 0.4).astype(np.float32)

    def radii(x):
        d = cdist(x, x, "sqeuclidean")
        return np.sort(d, axis=1)[:, 3]  # column 0 is the point itself

    precision = np.mean((cdist(fake, real, "sqeuclidean") <= radii(real)[None]).any(1))
    recall = np.mean((cdist(real, fake, "sqeuclidean") <= radii(fake)[None]).any(1))
    p, r = precision_recall(real, fake, block_size=64)  # small blocks exercise the blocking
    assert p == pytest.approx(precision, abs=1 / 250) and r == pytest.approx(recall, abs=1 / 300)
    assert 0.1 < p < 1 and 0.1 < r < 1


@pytest.fixture(scope="module")
def image_pairs():
    from scipy.ndimage import gaussian_filter
    from skimage import data

    rng = np.random.default_rng(4)
    out = []
    for img in (data.astronaut()[100:228, 150:310], data.chelsea()[:128, :160], data.coffee()[200:328, 100:260]):
        noisy = np.clip(img.astype(np.int16) + rng.integers(-25, 26, img.shape), 0, 255).astype(np.uint8)
        blurred = gaussian_filter(img, sigma=(1.2, 1.2, 0)).astype(np.uint8)
        out += [(img, noisy), (img, blurred)]
    return out


def to_nchw(*arrays):
    return torch.stack([torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1) for a in arrays])


def test_psnr_and_ssim_equal_scikit_image(image_pairs):
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = to_nchw(*[p[0] for p in image_pairs])
    b = to_nchw(*[p[1] for p in image_pairs])
    ours_psnr, ours_ssim = psnr(a, b), ssim(a, b)
    for i, (x, y) in enumerate(image_pairs):
        ref_psnr = peak_signal_noise_ratio(x, y, data_range=255)
        ref_ssim = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                         data_range=255, channel_axis=2)
        assert float(ours_psnr[i]) == pytest.approx(ref_psnr, abs=1e-4)
        assert float(ours_ssim[i]) == pytest.approx(ref_ssim, abs=1e-4)
    # RAE's convention (x / 255, data_range 1) is the same number
    torch.testing.assert_close(ssim(a / 255.0, b / 255.0, data_range=1.0), ours_ssim)
    assert float(ssim(a, a).min()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        psnr(a, b[:, :, :10])
