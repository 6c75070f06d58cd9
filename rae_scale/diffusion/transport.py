"""Flow-matching transport on the linear path, with RAE's time convention (t = 1 is noise).

x_t = (1 - t) z + t eps, the network predicts the velocity dx_t/dt = eps - z. Training times are drawn
uniformly or logit-normally on [0, t_max] and then moved by the dimension-dependent shift
t <- s t / (1 + (s - 1) t), s = sqrt(m / n) (rae_method.md section 5).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

logger = logging.getLogger(__name__)

TIME_DISTS = ("uniform", "logit_normal")
DEFAULT_SHIFT_BASE = 4096


def shift_from_dim(dim: int, base: int = DEFAULT_SHIFT_BASE) -> float:
    """The dimension-dependent shift s = sqrt(dim / base)."""
    if dim <= 0 or base <= 0:
        raise ValueError(f"shift dim and base must be positive, got dim={dim}, base={base}")
    return math.sqrt(dim / base)


def time_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Map t to s t / (1 + (s - 1) t); s > 1 moves mass towards noise (t = 1)."""
    return shift * t / (1 + (shift - 1) * t)


@dataclass
class Transport:
    """Linear-path flow matching with velocity prediction.

    Args:
        time_dist: "uniform" or "logit_normal" (logit(t) ~ N(mu, sigma^2), truncated to [0, t_max]).
        shift: the time shift s; None computes it from shift_dim, or from the latent's C*H*W.
        shift_dim, shift_base: m and n of s = sqrt(m / n).
        t_max: upper end of the training times before the shift (upstream: 1 - 1/1000).
    """

    time_dist: str = "logit_normal"
    mu: float = 0.0
    sigma: float = 1.0
    shift: float | None = None
    shift_dim: int | None = None
    shift_base: int = DEFAULT_SHIFT_BASE
    t_max: float = 1.0 - 1e-3

    def __post_init__(self):
        if self.time_dist not in TIME_DISTS:
            raise ValueError(f"time_dist must be one of {TIME_DISTS}, got {self.time_dist!r}")
        if not self.sigma > 0:
            raise ValueError(f"logit-normal sigma must be > 0, got {self.sigma}")
        if not 0.0 < self.t_max <= 1.0:
            raise ValueError(f"t_max must be in (0, 1], got {self.t_max}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def shift_for(self, latent_shape: Sequence[int]) -> float:
        """The shift used for latents of per-sample shape (C, H, W) (or any shape)."""
        if self.shift is not None:
            return float(self.shift)
        dim = self.shift_dim if self.shift_dim is not None else math.prod(latent_shape)
        return shift_from_dim(dim, self.shift_base)

    def sample_time(self, batch_size: int, *, shift: float, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        """Draw batch_size shifted training times (float32)."""
        dev = generator.device if generator is not None else device
        u = torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64)
        t = self.time_from_uniform(u, shift)
        return t.to(device=device if device is not None else t.device)

    def time_from_uniform(self, u: torch.Tensor, shift: float) -> torch.Tensor:
        """Shifted training times (float32) from float64 uniforms u in [0, 1), one per sample.

        Each time depends on its own u only, bit for bit, whatever the batch (see _sigmoid_per_element):
        the loops draw u per sample from seeded generators, and a sample's time must not change with
        the rank or micro-batch it lands in.
        """
        if self.time_dist == "uniform":
            t = u * self.t_max
        else:
            # Truncated normal in logit space by inverse CDF: u ~ U(0, Phi(b)), b the standardised
            # logit(t_max); logit(0) = -inf so the lower bound has CDF 0.
            normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64, device=u.device),
                                                torch.tensor(1.0, dtype=torch.float64, device=u.device))
            if self.t_max < 1.0:
                b = (math.log(self.t_max / (1 - self.t_max)) - self.mu) / self.sigma
                u = u * normal.cdf(torch.tensor(b, dtype=torch.float64, device=u.device))
            u = u.clamp(1e-300, 1.0 - 1e-16)  # keep icdf finite
            t = _sigmoid_per_element(self.mu + self.sigma * normal.icdf(u)).clamp(0.0, self.t_max)
        return time_shift(t, shift).to(dtype=torch.float32)

    @staticmethod
    def interpolate(z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor):
        """Return (x_t, velocity target) for data z, noise eps and per-sample times t [B]."""
        tb = t.view(-1, *([1] * (z.dim() - 1))).to(z.dtype)
        return (1 - tb) * z + tb * eps, eps - z

    def training_loss(self, model: Callable, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss [B]: mean over all non-batch dims of (model(x_t, t) - (eps - z))^2.

        The caller draws the times t [B] (sample_time or time_from_uniform) and the noise eps, so
        their seeding stays the loop's business; model(x_t, t) returns the predicted velocity.
        """
        x_t, target = self.interpolate(z, eps, t)
        v = model(x_t, t)
        if v.shape != z.shape:
            raise ValueError(f"model output shape {tuple(v.shape)} does not match the latent shape "
                             f"{tuple(z.shape)}")
        return (v.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def _sigmoid_per_element(x: torch.Tensor) -> torch.Tensor:
    """Element-wise 1 / (1 + exp(-x)) in float64 as torch's scalar kernel computes it (libm exp).

    torch.sigmoid on a batch takes a SIMD path whose exp differs from libm's in the last bit for a
    few % of float64 inputs; on a batch of one it takes the scalar path, which this repeats for
    every element, so a sample's time is the same alone or in any batch.
    """
    out = []
    for v in x.tolist():
        try:
            out.append(1.0 / (1.0 + math.exp(-v)))
        except OverflowError:  # exp(-v) = inf in C: the sigmoid is 0
            out.append(0.0)
    return torch.tensor(out, dtype=torch.float64, device=x.device)
