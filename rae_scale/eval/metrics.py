"""ADM-compatible metrics: Fréchet distance (FID/sFID/rFID), IS, precision/recall, PSNR, SSIM.

Everything that feeds a Fréchet distance is accumulated and decomposed in float64: float32
statistics or a float32 eigendecomposition move FID by percents (see evaluation_fid.md §4).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# ----------------------------------------------------------------------------- moments


class MomentAccumulator:
    """Streaming first and second moments (count, sum x, sum x x^T) of feature vectors.

    Each update's moments are computed in float64, then stored as fixed-point int64 with
    `frac_bits` fractional bits. Integer addition is associative, so merging accumulators from
    any number of workers, in any order, or after a resume gives bit-identical statistics.
    With the default 2^-24 resolution the rounding is ~3e-8 per update (negligible against
    float32 features) and totals up to 5e11 fit; overflow raises instead of wrapping.
    """

    def __init__(self, dim: int, *, frac_bits: int = 24, device="cpu"):
        self.dim, self.frac_bits = dim, frac_bits
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.int64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.int64, device=device)

    def _quantise(self, x: torch.Tensor) -> torch.Tensor:
        scaled = x * float(2 ** self.frac_bits)
        if scaled.abs().max() >= 2.0 ** 61:
            raise OverflowError(f"moment {x.abs().max().item():.3g} too large for frac_bits={self.frac_bits}; "
                                "use fewer fractional bits")
        return torch.round(scaled).to(torch.int64)

    def _add(self, count: int, s: torch.Tensor, o: torch.Tensor) -> None:
        limit = 2 ** 62
        if (self.outer.abs().max() >= limit - o.abs().max()) or (self.sum.abs().max() >= limit - s.abs().max()):
            raise OverflowError("moment accumulator overflow; use fewer fractional bits")
        self.count += count
        self.sum += s.to(self.sum.device)
        self.outer += o.to(self.outer.device)

    @torch.no_grad()
    def update(self, feats: torch.Tensor) -> None:
        """Add a batch of feature vectors [N, dim]."""
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {tuple(feats.shape)}")
        x = feats.to(device=self.sum.device, dtype=torch.float64)
        self._add(x.shape[0], self._quantise(x.sum(0)), self._quantise(x.T @ x))

    def merge(self, other: "MomentAccumulator") -> "MomentAccumulator":
        if (other.dim, other.frac_bits) != (self.dim, self.frac_bits):
            raise ValueError("cannot merge accumulators of different dim or frac_bits")
        self._add(other.count, other.sum, other.outer)
        return self

    def all_reduce(self, group=None) -> "MomentAccumulator":
        """Sum over all ranks of the default (or given) process group, in place; exact."""
        if dist.is_available() and dist.is_initialized():
            count = torch.tensor([self.count], dtype=torch.int64, device=self.sum.device)
            for t in (count, self.sum, self.outer):
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
            self.count = int(count.item())
        return self

    def mean(self) -> np.ndarray:
        return (self.sum.cpu().double() / 2 ** self.frac_bits / self.count).numpy()

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sigma) in float64, sigma unbiased (N - 1) as np.cov."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        n = self.count
        s = self.sum.cpu().double() / 2 ** self.frac_bits
        ss = self.outer.cpu().double() / 2 ** self.frac_bits
        mu = s / n
        sigma = (ss - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy()

    def state_dict(self) -> dict:
        return {"dim": self.dim, "frac_bits": self.frac_bits, "count": self.count,
                "sum": self.sum.cpu(), "outer": self.outer.cpu()}

    @classmethod
    def from_state_dict(cls, state: dict, device="cpu") -> "MomentAccumulator":
        acc = cls(state["dim"], frac_bits=state["frac_bits"], device=device)
        acc.count = int(state["count"])
        acc.sum.copy_(state["sum"])
        acc.outer.copy_(state["outer"])
        return acc


# ----------------------------------------------------------------------------- Fréchet distance


def _as_f64(x, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64) if not torch.is_tensor(x) else x,
                           dtype=torch.float64, device=device)


def trace_sqrt_product(sigma1, sigma2, device="cpu") -> float:
    """tr sqrt(S1 S2) in float64 via a symmetric form: eigvals(S1 S2) = eigvals(A^T S2 A), S1 = A A^T.

    A is the Cholesky factor (or S1^1/2 when S1 is singular); one symmetric eigenvalue solve, no
    complex arithmetic; agrees with
    tr(scipy.linalg.sqrtm(S1 @ S2)) to ~1e-10 relative for full-rank covariances.
    """
    s1, s2 = _as_f64(sigma1, device), _as_f64(sigma2, device)
    s1 = (s1 + s1.T) / 2  # symmetrise: eigh reads only one triangle
    lower, info = torch.linalg.cholesky_ex(s1)
    if int(info) == 0:  # full rank (N > d): S1 = L L^T, eigvals(S1 S2) = eigvals(L^T S2 L); cheapest
        m = lower.T @ s2 @ lower
    else:  # rank-deficient (N <= d): R = S1^1/2 from an eigendecomposition
        w, v = torch.linalg.eigh(s1)
        r = (v * _drop_noise(w).sqrt()) @ v.T
        m = r @ s2 @ r
    m = (m + m.T) / 2
    # on CPU numpy's LAPACK solves this ~2x faster than torch's MKL build (measured, d=2048)
    ev = torch.linalg.eigvalsh(m) if m.is_cuda else torch.from_numpy(np.linalg.eigvalsh(m.numpy()))
    return float(_drop_noise(ev).sqrt().sum())


def _drop_noise(ev: torch.Tensor) -> torch.Tensor:
    """Zero eigenvalues below the rounding level d * eps * max: with few samples (N < d) the null
    space holds ~2000 such values, and their square roots would add up to a visible bias."""
    tol = ev.abs().max() * ev.numel() * torch.finfo(torch.float64).eps
    return torch.where(ev > tol, ev, torch.zeros_like(ev))


def frechet_distance(mu1, sigma1, mu2, sigma2, device="cpu") -> float:
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), all float64 (FID, sFID, rFID)."""
    mu1, mu2 = _as_f64(mu1, device), _as_f64(mu2, device)
    s1, s2 = _as_f64(sigma1, device), _as_f64(sigma2, device)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"mismatched statistics: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
                         f"sigma {tuple(s1.shape)} vs {tuple(s2.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite values")
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(s1, s2, device)
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2)) - 2.0 * tr_covmean


def frechet_distance_scipy(mu1, sigma1, mu2, sigma2) -> float:
    """ADM's reference formula (scipy sqrtm with its eps / imaginary-part fallbacks), for checks."""
    import scipy.linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- IS, P/R


def inception_score(logits, *, split_size: int = 5000, shuffle_seed: int | None = 0) -> float:
    """ADM's IS: softmax (float64) over the 1008 logits, mean over splits of exp(mean KL(p(y|x) || p(y))).

    Splits are consecutive chunks of `split_size` (last one may be shorter). Rows are shuffled
    with `shuffle_seed` first, so a class-sorted sample order cannot deflate the score
    (guided-diffusion#165); None keeps the given order, as ADM does.
    """
    logits = torch.as_tensor(logits).double().cpu()
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"expected logits [N, C], got {tuple(logits.shape)}")
    if shuffle_seed is not None:
        g = torch.Generator().manual_seed(shuffle_seed)
        logits = logits[torch.randperm(logits.shape[0], generator=g)]
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, log_p.shape[0], split_size):
        lp = log_p[start:start + split_size]
        log_py = torch.logsumexp(lp, dim=0) - math.log(lp.shape[0])
        kl = (lp.exp() * (lp - log_py)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores))


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]
    return d.clamp_(min=0)


def manifold_radii(feats: torch.Tensor, *, k: int = 3, block_size: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    if feats.shape[0] <= k:
        raise ValueError(f"need more than k={k} points for manifold radii, have {feats.shape[0]}")
    out = []
    for start in range(0, feats.shape[0], block_size):
        d = _sq_dists(feats[start:start + block_size], feats)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself
    return torch.cat(out)


def _coverage(queries, points, radii, block_size) -> float:
    inside = 0
    for start in range(0, queries.shape[0], block_size):
        d = _sq_dists(queries[start:start + block_size], points)
        inside += int((d <= radii[None]).any(1).sum())
    return inside / queries.shape[0]


def precision_recall(real, fake, *, k: int = 3, block_size: int = 10000, device="cpu") -> tuple[float, float]:
    """Kynkäänniemi et al. (2019) as ADM: precision = share of fake inside the real k-NN manifold,
    recall = share of real inside the fake manifold (squared distances, fp32, blocks of 10k)."""
    real = torch.as_tensor(real).float().to(device)
    fake = torch.as_tensor(fake).float().to(device)
    r_real = manifold_radii(real, k=k, block_size=block_size)
    r_fake = manifold_radii(fake, k=k, block_size=block_size)
    return (_coverage(fake, real, r_real, block_size), _coverage(real, fake, r_fake, block_size))


# ----------------------------------------------------------------------------- PSNR, SSIM


def _check_pair(a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two [N, C, H, W] image batches of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 255.0) -> torch.Tensor:
    """Per-image PSNR [N] in dB (float64); MSE clamped at 1e-10 * range^2 as RAE does."""
    a, b = _check_pair(a, b)
    mse = (a - b).square().flatten(1).mean(1).clamp(min=1e-10 * data_range ** 2)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 255.0, win_size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM [N] (float64), matching scikit-image `structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, data_range=..., channel_axis=...)`: 11x11 Gaussian
    window, mean over the interior (border of win_size // 2 cropped) and over channels."""
    a, b = _check_pair(a, b)
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"images must be at least {win_size}x{win_size}, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    g = _gaussian_window(win_size, sigma).to(a.device)
    wy = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    wx = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)

    def blur(x):  # separable valid filtering = skimage's filter + crop of the border
        return F.conv2d(F.conv2d(x, wy, groups=c), wx, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)
